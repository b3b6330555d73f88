"""One reconcile of one PyptoServing: observe, plan (pure), act on the difference, write the status.

Blocking (API and engine HTTP calls); the controller runs it in worker threads, never two at once for the
same resource. It keeps no memory between calls: everything it needs is read from the cluster each time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pypto_serving.operator import desired as d
from pypto_serving.operator import plan as planner
from pypto_serving.operator.actuator import NETWORK_POLICY_KINDS, Actuator
from pypto_serving.operator.control import engine_token
from pypto_serving.operator.defaults import BUILTIN, OperatorDefaults
from pypto_serving.operator.metrics import Metrics
from pypto_serving.operator.state import PodView, pod_view
from pypto_serving.operator.validation import validate

log = logging.getLogger("pypto_serving.operator.reconciler")


@dataclass(frozen=True)
class Outcome:
    """Result of a reconcile: whether the resource exists, and when to look again (None: next resync)."""

    exists: bool
    requeue_after: float | None = None


def observed_pods(raw: list[dict[str, Any]], owner_uid: str) -> list[PodView]:
    """Engine pods as views; pods of the same name owned by an older incarnation only block their rank."""
    out = []
    for pod in raw:
        view = pod_view(pod)
        if view is None:
            continue
        refs = (pod.get("metadata") or {}).get("ownerReferences") or []
        if not any(ref.get("uid") == owner_uid for ref in refs):
            view = replace(view, deleting=True, ready=False)
        out.append(view)
    return out


def status_changed(previous: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether writing ``new`` would change the stored status."""
    return any(previous.get(key) != value for key, value in new.items())


class Reconciler:
    """observe -> plan -> act -> status. ``operator_namespace`` is where the operator's pods run (the engines'
    NetworkPolicy admits them from there); ``control_key`` derives each resource's control token (control.py)."""

    def __init__(self, actuator: Actuator, metrics: Metrics, clock: Callable[[], float] = time.time,
                 defaults: OperatorDefaults = BUILTIN, *, operator_namespace: str, control_key: bytes) -> None:
        self.act, self.metrics, self.clock, self.defaults = actuator, metrics, clock, defaults
        self.operator_namespace, self.control_key = operator_namespace, control_key

    def reconcile(self, namespace: str, name: str) -> Outcome:
        """Bring one resource one step closer to its spec."""
        body = self.act.get_resource(namespace, name)
        if body is None:
            self.metrics.forget(namespace, name)
            return Outcome(exists=False)
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return Outcome(exists=True)  # owner references garbage-collect the children
        owner = d.Owner(name, namespace, meta["uid"])
        spec, problems = validate(body, self.defaults)  # the spec resolved with the operator's defaults
        pods = observed_pods(self.act.list_pods(namespace, name), owner.uid)
        loads = self.act.fetch_loads(planner.loads_needed(spec, pods))
        now = self.clock()
        previous = dict(body.get("status") or {})
        decision = planner.plan(planner.Observed(
            name=name, namespace=namespace, generation=int(meta.get("generation") or 0), spec=spec,
            problems=problems, pods=pods, loads=loads, now=now, previous_status=previous))
        if spec is not None:
            self._act(body, owner, spec, decision, now)
            self._children(body, owner, spec, now, had_gateway=bool(previous.get("gateway")))
        for event in decision.events:
            self.act.event(body, event.type, event.reason, event.message, now)
        status = decision.status.to_kube()
        if spec is not None and not spec.gateway.enabled and previous.get("gateway"):
            status["gateway"] = None  # the merge patch removes it (an invalid spec keeps what was there)
        # The gauge first: whoever sees the new status must also see the metrics that go with it.
        self.metrics.set_replicas(namespace, name, status.get("replicas") or 0, status.get("readyReplicas") or 0)
        if status_changed(previous, status):
            self.act.patch_status(namespace, name, status)
        return Outcome(exists=True, requeue_after=decision.requeue_after)

    def _act(self, body: dict[str, Any], owner: d.Owner, spec: Any, decision: planner.Plan, now: float) -> None:
        shape = d.spec_hash(spec)
        token = engine_token(self.control_key, owner.namespace, owner.name)
        creates = [a for a in decision.actions if isinstance(a, planner.CreatePod)]
        if creates:  # before the pods that mount it (a pod waits for a missing Secret; it is never rewritten)
            self.act.create_control_secret(d.control_secret(owner, token))
        manifests = [d.engine_pod(owner, spec, a.rank, shape, d.GroupPod(a.rank, a.index, a.leader_ip))
                     for a in creates]
        for action, manifest, created in zip(creates, manifests, self.act.create_pods(manifests), strict=True):
            if created:
                self.metrics.actions.labels("create").inc()
                self.act.event(body, "Normal", "CreatedReplica",
                               f"created pod {manifest['metadata']['name']} (rank {action.rank}, {action.reason})",
                               now)
        for action in decision.actions:
            if isinstance(action, planner.LabelPod):
                self.act.label_pod(owner.namespace, action.pod, action.key, action.value, action.annotation)
            if isinstance(action, planner.StartDrain):
                self.act.start_drain(owner.namespace, action.pod, action.reason, action.ip, now, action.restamp,
                                     token)
                if action.restamp:
                    self.metrics.actions.labels("drain").inc()
                    self.act.event(body, "Normal", "DrainingReplica", f"draining pod {action.pod} ({action.reason})",
                                   now)
            elif isinstance(action, planner.DeletePod):
                self.act.delete_pod(owner.namespace, action.pod)
                self.metrics.actions.labels("delete").inc()
                self.act.event(body, "Warning" if action.reason == "failed" else "Normal", "DeletedReplica",
                               f"deleted pod {action.pod} ({action.reason})", now)

    def _children(self, body: dict[str, Any], owner: d.Owner, spec: Any, now: float, had_gateway: bool) -> None:
        for child in d.children(owner, spec, self.operator_namespace):
            result = self.act.apply(child, owner.uid)
            kind, child_name = child["kind"], child["metadata"]["name"]
            if result == "conflict":
                self.act.event(body, "Warning", "NameConflict", f"{kind} {child_name} exists and is not owned by "
                               "this PyptoServing; leaving it alone", now)
            else:
                log.debug("%s %s %s/%s", result, kind, owner.namespace, child_name)
        if not spec.gateway.enabled and had_gateway and self.act.delete_gateway(owner.namespace, owner.name, owner.uid):
            self.act.event(body, "Normal", "GatewayRemoved", "deleted the gateway (spec.gateway.enabled is false)",
                           now)
        if not spec.network_policy.enabled and self.act.delete_owned(
                owner.namespace, d.network_policy_name(owner.name), NETWORK_POLICY_KINDS, owner.uid):
            self.act.event(body, "Normal", "NetworkPolicyRemoved",
                           "deleted the engines' NetworkPolicy (spec.networkPolicy.enabled is false)", now)
