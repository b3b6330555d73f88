"""Unit tests of the runtime pieces that need no cluster: work queue, lease decisions, TLS, webhook config,
admission decisions, status diffing."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from pypto_serving.operator import webhook as wh
from pypto_serving.operator.controller import Controller, ControllerConfig
from pypto_serving.operator.handlers import admission_decision
from pypto_serving.operator.leader import decide, identity, micro_time
from pypto_serving.operator.metrics import Metrics
from pypto_serving.operator.reconciler import Outcome, observed_pods, status_changed
from pypto_serving.operator.workqueue import WorkQueue
from tests.operator.corpus import load_corpus, minimal
from tests.support.common import free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_workqueue_dedups_delays_and_never_hands_out_a_key_twice() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = WorkQueue(clock)
        q.add("a")
        q.add("a")
        q.add("b", delay=5)
        assert len(q) == 2
        assert await q.get() == "a"
        q.add("a")  # triggered while processing: kept aside, not handed to another worker
        q.add("c")
        assert await q.get() == "c"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.get(), 0.05)  # "a" is in progress, "b" not due yet
        q.done("a")
        assert await q.get() == "a"
        q.done("a")
        clock.now += 5
        assert await q.get() == "b"
        q.done("b")
        assert q.add_rate_limited("x") == 0.5 and q.add_rate_limited("x") == 1.0
        q.forget("x")
        assert q.add_rate_limited("x") == 0.5
        q.discard("x")
        assert len(q) == 0

    asyncio.run(scenario())


def test_workqueue_wakes_a_waiting_worker() -> None:
    async def scenario() -> str:
        q = WorkQueue()
        waiter = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        q.add("k")
        return str(await asyncio.wait_for(waiter, 1))

    assert asyncio.run(scenario()) == "k"


def lease(holder: str, renewed: float, duration: int = 15, transitions: int = 0) -> dict:
    return {"metadata": {"name": "op", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "renewTime": micro_time(renewed), "leaseDurationSeconds": duration,
                     "leaseTransitions": transitions}}


def test_lease_decisions() -> None:
    first = decide(None, "me", 1000.0, 15, "ns", "op")
    assert first.action == "create" and first.leading and first.lease["spec"]["holderIdentity"] == "me"
    renew = decide(lease("me", 990.0), "me", 1000.0, 15, "ns", "op")
    assert renew.action == "update" and renew.leading
    assert renew.lease["metadata"]["resourceVersion"] == "7"  # optimistic concurrency on the write
    assert decide(lease("other", 990.0), "me", 1000.0, 15, "ns", "op") == decide(
        lease("other", 999.0), "me", 1000.0, 15, "ns", "op")
    assert not decide(lease("other", 990.0), "me", 1000.0, 15, "ns", "op").leading
    takeover = decide(lease("other", 980.0, transitions=2), "me", 1000.0, 15, "ns", "op")
    assert takeover.action == "update" and takeover.leading
    assert takeover.lease["spec"]["holderIdentity"] == "me" and takeover.lease["spec"]["leaseTransitions"] == 3
    released = decide(lease("", 999.0, duration=1), "me", 1000.0, 15, "ns", "op")
    assert released.leading


def test_lease_identity_names_the_pod_and_is_unique_per_process() -> None:
    pod_env = {"POD_NAME": "pypto-serving-operator-7d9f-x2k4q"}
    assert identity(pod_env, hostname="node-1", pid=1, suffix="ab12") == "pypto-serving-operator-7d9f-x2k4q_ab12"
    # two processes of one pod (or one host) never share an identity; the pod's name still leads it
    first, second = identity(pod_env), identity(pod_env)
    assert first != second and first.startswith("pypto-serving-operator-7d9f-x2k4q_")
    assert first.split("_")[0] == second.split("_")[0] == pod_env["POD_NAME"]
    # outside a pod (or without the downward API): hostname and pid, plus the unique suffix
    assert identity({}, hostname="dev-box", pid=4242, suffix="ff00ff00") == "dev-box_4242_ff00ff00"
    assert identity({"POD_NAME": "  "}, hostname="dev-box", pid=7, suffix="s") == "dev-box_7_s"
    assert identity({}).startswith(f"{socket.gethostname()}_{os.getpid()}_")


def test_generated_tls_is_a_ca_chain_for_the_hosts(tmp_path: Path) -> None:
    bundle = wh.generate(["127.0.0.1", "localhost", "svc.ns.svc"])
    assert wh.covers(bundle, ["127.0.0.1", "svc.ns.svc"])
    assert not wh.covers(bundle, ["10.0.0.1"])
    assert not wh.covers(bundle, ["127.0.0.1"], now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3640))
    ca = x509.load_pem_x509_certificate(bundle.ca)
    cert = x509.load_pem_x509_certificate(bundle.cert)
    assert cert.issuer == ca.subject and cert.subject != ca.subject
    ca_path, cert_path, key_path = bundle.write(tmp_path)
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    assert wh.load(tmp_path) == bundle  # what service mode reads from the chart's mounted Secret
    key_path.unlink()
    with pytest.raises(ValueError, match=r"tls\.key"):
        wh.load(tmp_path)
    bundle.write(tmp_path)

    # a real TLS handshake verified against the CA, by IP
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hi")

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Hello)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    import httpx

    client_ctx = ssl.create_default_context(cafile=str(ca_path))
    response = httpx.get(f"https://127.0.0.1:{server.server_port}/", verify=client_ctx, trust_env=False)
    assert response.text == "hi"
    thread.join(5)
    server.server_close()


def test_webhook_url_mode_configuration() -> None:
    url = wh.client_config(b"CA", "127.0.5.6", 9443)
    assert url == {"url": "https://127.0.5.6:9443/validate-pyptoserving", "caBundle": "Q0E="}
    assert wh.client_config(b"CA", "fd00::1", 9443)["url"] == "https://[fd00::1]:9443/validate-pyptoserving"
    body = wh.configuration("pps-validate", url, "Ignore")
    (hook,) = body["webhooks"]
    assert hook["rules"][0]["resources"] == ["pyptoservings"] and hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
    assert hook["name"] == "validate.pyptoservings.serving.pypto.io"


def test_webhook_registration_merges_into_a_configuration_it_does_not_own() -> None:
    ours = wh.configuration("op", wh.client_config(b"NEW-CA", "127.0.5.6"), "Fail")
    helm = {"app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/name": "pypto-serving", "helm.sh/chart": "c-1"}
    annotations = {"meta.helm.sh/release-name": "rel", "meta.helm.sh/release-namespace": "sys"}
    foreign = {"name": "other.example.com", "clientConfig": {"url": "https://127.0.0.9/x"}, "sideEffects": "None"}
    stale = {**ours["webhooks"][0], "failurePolicy": "Ignore",
             "clientConfig": {"service": {"name": "old", "namespace": "sys"}, "caBundle": "T0xE"},
             "namespaceSelector": {"matchLabels": {"team": "a"}}}
    current = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
               "metadata": {"name": "op", "resourceVersion": "42", "labels": helm, "annotations": annotations},
               "webhooks": [foreign, stale]}
    out = wh.merged(current, ours)
    assert out["metadata"] == {**current["metadata"], "labels": {**helm, "app.kubernetes.io/name": "pypto-serving"}}
    assert out["webhooks"][0] == foreign  # other webhooks are kept, in place
    mine = out["webhooks"][1]
    assert mine["clientConfig"] == {"url": "https://127.0.5.6:9443/validate-pyptoserving",
                                    "caBundle": base64.b64encode(b"NEW-CA").decode()}  # replaced whole: no service
    assert mine["failurePolicy"] == "Fail" and mine["namespaceSelector"] == {"matchLabels": {"team": "a"}}
    assert current["webhooks"][1] is stale and stale["failurePolicy"] == "Ignore"  # the input is not modified
    assert wh.merged(out, ours) == out  # registering again changes nothing (no write)
    # helm's url-mode configuration has no webhooks: ours is added
    empty = {"metadata": {"name": "op", "labels": helm, "annotations": annotations}}
    assert wh.merged(empty, ours)["webhooks"] == ours["webhooks"]
    assert wh.without(out, {wh.WEBHOOK_NAME})["webhooks"] == [foreign]


def test_admission_decision() -> None:
    case = next(c for c in load_corpus() if c.name == "bad-data-parallel-group")
    message = admission_decision(case.body, None, "CREATE")
    assert message is not None and case.expect in message
    assert admission_decision(minimal(), None, "CREATE") is None
    # metadata-only updates of an (already stored) invalid object are allowed, spec changes are not
    assert admission_decision(case.body, case.body, "UPDATE") is None
    assert admission_decision(case.body, minimal(), "UPDATE") is not None
    deleting = {**case.body, "metadata": {**case.body["metadata"], "deletionTimestamp": "2024-01-01T00:00:00Z"}}
    assert admission_decision(deleting, minimal(), "UPDATE") is None


def test_status_changed_and_foreign_pods() -> None:
    assert not status_changed({"phase": "Ready", "replicas": 2, "extra": 1}, {"phase": "Ready", "replicas": 2})
    assert status_changed({"phase": "Ready"}, {"phase": "Degraded"})
    assert status_changed({"gateway": {"url": "x"}}, {"gateway": None})
    pod = {"metadata": {"name": "demo-dp-0", "labels": {"serving.pypto.io/dp-rank": "0"},
                        "ownerReferences": [{"uid": "old-uid"}]}, "status": {"phase": "Running"}}
    (view,) = observed_pods([pod], "new-uid")
    assert view.deleting and not view.active  # an older incarnation's pod only blocks its rank
    (mine,) = observed_pods([{**pod, "metadata": {**pod["metadata"], "ownerReferences": [{"uid": "new-uid"}]}}],
                            "new-uid")
    assert mine.active


class FakeReconciler:
    """Records calls; answers from a script of outcomes (an exception is raised)."""

    def __init__(self, script: list[Any]) -> None:
        self.script, self.calls = script, []

    def reconcile(self, namespace: str, name: str) -> Any:
        self.calls.append((namespace, name))
        step = self.script.pop(0) if self.script else Outcome(exists=True)
        if isinstance(step, Exception):
            raise step
        return step


def test_controller_enqueues_new_recreated_or_changed_resources_only() -> None:
    async def scenario() -> None:
        c = Controller(FakeReconciler([]), Metrics(), ControllerConfig(workers=1))  # type: ignore[arg-type]
        key = ("ns", "a")
        c.resource_seen(key, "uid-1", 1)
        assert len(c.queue) == 1
        c.queue.done(await c.queue.get())
        c.resource_seen(key, "uid-1", 1)  # a status-only update: same generation
        assert len(c.queue) == 0
        c.resource_seen(key, "uid-1", 2)  # spec changed
        c.queue.done(await c.queue.get())
        c.resource_seen(key, "uid-2", 1)  # deleted and recreated while the watch was down
        assert len(c.queue) == 1
        c.queue.done(await c.queue.get())
        c.trigger(("ns", "unknown"))  # a pod of a resource this operator does not know
        assert len(c.queue) == 0
        c.trigger(key)
        assert len(c.queue) == 1
        c.resource_gone(key)
        assert len(c.queue) == 0 and key not in c.known
        c.pool.shutdown()

    asyncio.run(scenario())


def test_controller_workers_requeue_retry_and_forget() -> None:
    async def scenario() -> tuple[FakeReconciler, Metrics]:
        script = [Outcome(exists=True, requeue_after=0.05), RuntimeError("apiserver hiccup"), Outcome(exists=False)]
        fake = FakeReconciler(script)
        metrics = Metrics()
        c = Controller(fake, metrics, ControllerConfig(workers=2))  # type: ignore[arg-type]
        c.start()
        c.resource_seen(("ns", "a"), "uid-1", 1)
        deadline = asyncio.get_running_loop().time() + 10
        while ("ns", "a") in c.known and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert c.alive()
        await c.stop()
        return fake, metrics

    fake, metrics = asyncio.run(scenario())
    assert fake.calls == [("ns", "a")] * 3  # requeued after 0.05 s, retried after the error, then gone
    text = metrics.render().decode()
    assert 'pypto_operator_reconciles_total{result="success"} 2.0' in text
    assert "pypto_operator_reconcile_errors_total 1.0" in text
