"""Validation of a PyptoServing: schema (the pydantic models) plus semantic checks, with field-named messages.

The same `validate` runs in the admission webhook (rejecting at `kubectl apply` time) and in the reconciler
(phase `Invalid`, condition `SpecValid=False`, no pods), so a cluster without the webhook is still safe.
Every message starts with the field it is about, e.g. ``spec.parallel.pipelineParallelSize: ...``. The semantic
checks see the spec resolved with the operator's defaults (`defaults.resolve`); the defaults themselves are
checked when the operator starts (`check_defaults`), so a bad value in a resolved spec is always the spec's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pypto_serving.contract import CONTROL_TOKEN_DIR, CONTROL_TOKEN_FLAG, ENGINE_POD_ENV, ENV_VISIBLE_DEVICES
from pypto_serving.operator import security
from pypto_serving.operator.defaults import BUILTIN, FLAGS, OperatorDefaults, defaulted_fields, resolve
from pypto_serving.operator.groups import group_shape, split_problem
from pypto_serving.operator.types import ROUTING_POLICIES, SERVICE_TYPES, PyptoServingSpec

# Names the operator derives from metadata.name: "<name>-gateway" must stay a 63-character DNS label.
MAX_NAME_LENGTH = 63 - len("-gateway")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# An extended resource name: "<domain>/<name>", e.g. huawei.com/Ascend910 (qualified name rules).
EXTENDED_RESOURCE = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
QUANTITY = re.compile(
    r"^[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
CAPABILITY = re.compile(r"^(CAP_)?[A-Z_]+$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# Engine flags and env vars the operator sets itself; users may not override them.
MANAGED_FLAGS = ("--model", "--served-model-name", "--host", "--port", "--tensor-parallel-size",
                 "--pipeline-parallel-size", "--dtype", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--block-size", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--enable-expert-parallel", "--no-enable-expert-parallel", "--expert-placement-strategy",
                 "--all2all-backend", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless",
                 "--data-parallel-size", "--data-parallel-rank", "--data-parallel-address", "--data-parallel-rpc-port",
                 CONTROL_TOKEN_FLAG)
MANAGED_ENV = (*ENGINE_POD_ENV, ENV_VISIBLE_DEVICES)
RESERVED_MOUNTS = ("/dev/shm", "/etc/hccn.conf", CONTROL_TOKEN_DIR)
MAX_REPLICAS = 1024  # spec.replicas' bound (types.py)


@dataclass(frozen=True)
class Problem:
    """One validation failure: the field (dotted path) and what is wrong with it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _loc(parts: tuple[Any, ...]) -> str:
    out = "spec"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _schema_message(error: Mapping[str, Any]) -> str:
    """Turn one pydantic error into a short Kubernetes-style message."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']} (got {value!r})"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']} (got {value!r})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "literal_error":
        return f"unsupported value {value!r}; must be one of: {ctx['expected'].replace(' or ', ', ')}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer (got {value!r})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {value!r})"
    if kind in ("string_type",):
        return f"must be a string (got {value!r})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be an object (got {value!r})"
    if kind == "list_type":
        return f"must be a list (got {value!r})"
    return str(error["msg"])


def parse_spec(spec: Any) -> tuple[PyptoServingSpec | None, list[Problem]]:
    """Parse a raw ``spec`` with the models; return it or the schema problems."""
    if not isinstance(spec, Mapping):
        return None, [Problem("spec", "is required and must be an object")]
    try:
        return PyptoServingSpec.model_validate(dict(spec)), []
    except ValidationError as exc:
        return None, [Problem(_loc(err["loc"]), _schema_message(err)) for err in exc.errors()]


def check_name(name: Any) -> list[Problem]:
    """metadata.name must make valid pod, Service and gateway names."""
    if not isinstance(name, str) or not name:
        return [Problem("metadata.name", "is required")]
    if len(name) > MAX_NAME_LENGTH:
        return [Problem("metadata.name", f"must be at most {MAX_NAME_LENGTH} characters "
                        f"(the gateway Service is named <name>-gateway), got {len(name)}")]
    if not DNS1035_LABEL.match(name):
        return [Problem("metadata.name", f"{name!r} must be a DNS-1035 label (lowercase letters, digits and '-', "
                        "starting with a letter) because Services are named after it")]
    return []


def check_group_name(name: str, spec: PyptoServingSpec) -> list[Problem]:
    """A multi-pod group's pods are named <name>-dp-<group>-<pod>, and that is their hostname (a DNS label)."""
    shape = group_shape(spec)
    longest = len(f"-dp-{MAX_REPLICAS - 1}-{shape.pods - 1}")
    if shape.multi and len(name) > 63 - longest:
        return [Problem("metadata.name", f"must be at most {63 - longest} characters for serving groups of "
                        f"{shape.pods} pods (pod hostnames <name>-dp-<group>-<pod> are DNS labels), got {len(name)}")]
    return []


def _check_model(spec: PyptoServingSpec, policy: OperatorDefaults) -> list[Problem]:
    model, out = spec.model, []
    if not model.name.strip():
        out.append(Problem("spec.model.name", "must not be empty"))
    elif model.name != model.name.strip() or any(ch.isspace() for ch in model.name):
        out.append(Problem("spec.model.name", f"must not contain whitespace (got {model.name!r})"))
    if not model.path.strip():
        out.append(Problem("spec.model.path", "must not be empty"))
    elif not model.path.startswith("/"):
        out.append(Problem("spec.model.path", f"must be an absolute path inside the pod (got {model.path!r})"))
    if not model.mount_path.startswith("/") or model.mount_path.rstrip("/") == "":
        out.append(Problem("spec.model.mountPath", f"must be an absolute path other than / (got {model.mount_path!r})"))
    elif model.mount_path.rstrip("/") in RESERVED_MOUNTS:
        out.append(Problem("spec.model.mountPath", f"{model.mount_path} is used by the operator"))
    if model.volume is not None and len(model.volume) != 1:
        out.append(Problem("spec.model.volume", "must set exactly one volume source (e.g. hostPath or "
                           f"persistentVolumeClaim), got {sorted(model.volume) or 'none'}"))
    host = (model.volume or {}).get("hostPath")
    if host is not None:
        path = host.get("path") if isinstance(host, Mapping) else None
        out += _found(security.check_host_path("spec.model.volume.hostPath.path", path, policy.allowed_host_paths))
    return out


def _found(findings: list[security.Finding]) -> list[Problem]:
    return [Problem(field, message) for field, message in findings]


def _source(field: str, value: object, defaulted: frozenset[str] | set[str]) -> str:
    """Where a resolved value came from, for messages: ``spec.x.y = 8`` or ``the operator's --default-... = 8``."""
    return f"the operator's {FLAGS[field]} = {value}" if field in defaulted else f"{field} = {value}"


def _check_parallel(spec: PyptoServingSpec, defaulted: frozenset[str] | set[str]) -> list[Problem]:
    par, out = spec.parallel, []
    if par.expert_parallel.enabled and not spec.model.moe:
        out.append(Problem("spec.parallel.expertParallel.enabled",
                           "expert parallelism needs a MoE model (set spec.model.moe: true)"))
    per_node = spec.devices.per_node
    source = _source("spec.devices.perNode", per_node, defaulted)
    if par.data_parallel_size > 1:
        if not par.expert_parallel.enabled:
            out.append(Problem("spec.parallel.dataParallelSize",
                               f"DP ranks of a serving group step in lockstep to share a MoE model's experts, so "
                               f"dataParallelSize {par.data_parallel_size} needs spec.parallel.expertParallel.enabled "
                               f"(for a dense model, use spec.replicas)"))
        if par.pipeline_parallel_size > 1:
            out.append(Problem("spec.parallel.pipelineParallelSize",
                               f"DP+EP groups with pipelineParallelSize > 1 are not supported yet (got "
                               f"{par.pipeline_parallel_size} with dataParallelSize {par.data_parallel_size})"))
        if per_node is not None and spec.devices_per_replica > per_node:
            out.append(Problem("spec.parallel.dataParallelSize",
                               f"each DP rank is one pod: tensorParallelSize x pipelineParallelSize = "
                               f"{spec.devices_per_replica} devices must fit on one node ({source})"))
    elif (problem := split_problem(spec.devices_per_replica, per_node)) is not None:
        out.append(Problem("spec.parallel.tensorParallelSize",
                           f"tensorParallelSize x pipelineParallelSize = {spec.devices_per_replica} devices span "
                           f"nodes ({source}) but {problem}"))
    return out


def resource_name_problem(name: str) -> str | None:
    """What is wrong with a device resource name, or None."""
    prefix = name.split("/", 1)[0]
    if not EXTENDED_RESOURCE.match(name) or len(name) > 253:
        return (f"{name!r} is not a valid extended resource name (want <vendor-domain>/<name>, e.g. "
                "huawei.com/Ascend910)")
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io") or prefix == "requests":
        return f"{name!r} is not a device-plugin resource"
    return None


def _check_devices(spec: PyptoServingSpec, policy: OperatorDefaults) -> list[Problem]:
    dev, out = spec.devices, []
    problem = resource_name_problem(dev.resource_name or "")
    if problem is not None:
        out.append(Problem("spec.devices.resourceName", problem))
    if dev.hccn_conf_path is not None:
        out += _found(security.check_host_path("spec.devices.hccnConfPath", dev.hccn_conf_path,
                                               policy.allowed_host_paths))
    return out


def _check_engine(spec: PyptoServingSpec, policy: OperatorDefaults) -> list[Problem]:
    eng, out = spec.engine, []
    for i, arg in enumerate(eng.extra_args):
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            out.append(Problem(f"spec.engine.extraArgs[{i}]", f"{flag} is set by the operator from the spec"))
    for i, var in enumerate(eng.env):
        name = var.get("name")
        if not isinstance(name, str) or not ENV_NAME.match(name):
            out.append(Problem(f"spec.engine.env[{i}].name", f"must be a valid variable name (got {name!r})"))
        elif name in MANAGED_ENV:
            out.append(Problem(f"spec.engine.env[{i}].name", f"{name} is set by the operator"))
    if (eng.max_num_batched_tokens is not None and eng.max_num_seqs is not None
            and eng.max_num_batched_tokens < eng.max_num_seqs):
        out.append(Problem("spec.engine.maxNumBatchedTokens", f"must be >= maxNumSeqs ({eng.max_num_seqs}), got "
                           f"{eng.max_num_batched_tokens}"))
    if eng.shm_size is not None and not QUANTITY.match(eng.shm_size):
        out.append(Problem("spec.engine.shmSize", f"{eng.shm_size!r} is not a valid quantity (e.g. 16Gi)"))
    out += _check_resources("spec.engine.resources", eng.resources, spec.devices.resource_name or "")
    if eng.priority_class_name is not None and not DNS1123_SUBDOMAIN.match(eng.priority_class_name):
        out.append(Problem("spec.engine.priorityClassName", f"{eng.priority_class_name!r} is not a valid name"))
    out += _found(security.check_security_context("spec.engine.securityContext", eng.security_context,
                                                  policy.allowed_capabilities, policy.allow_root_engines))
    out += _found(security.check_pod_security_context("spec.engine.podSecurityContext", eng.pod_security_context,
                                                      policy.allow_root_engines))
    return out


def _check_resources(field: str, resources: Mapping[str, Any] | None, device: str) -> list[Problem]:
    out: list[Problem] = []
    for section, values in (resources or {}).items():
        if section not in ("requests", "limits"):
            out.append(Problem(f"{field}.{section}", "unknown field (use requests or limits)"))
            continue
        if not isinstance(values, Mapping):
            out.append(Problem(f"{field}.{section}", "must be an object of resource quantities"))
            continue
        for resource, quantity in values.items():
            if resource == device:
                out.append(Problem(f"{field}.{section}.{resource}", "devices are requested by the operator from "
                                   "spec.parallel (tensorParallelSize x pipelineParallelSize)"))
            elif not QUANTITY.match(str(quantity)):
                out.append(Problem(f"{field}.{section}.{resource}", f"{quantity!r} is not a valid quantity"))
    return out


def _check_gateway(spec: PyptoServingSpec) -> list[Problem]:
    gw, out = spec.gateway, []
    if gw.api_key_secret is not None and not DNS1123_SUBDOMAIN.match(gw.api_key_secret.name):
        out.append(Problem("spec.gateway.apiKeySecret.name", f"{gw.api_key_secret.name!r} is not a valid Secret name"))
    out += _check_resources("spec.gateway.resources", gw.resources, spec.devices.resource_name or "")
    return out


def _check_rollout(spec: PyptoServingSpec) -> list[Problem]:
    if spec.rollout.max_unavailable == 0 and spec.rollout.max_surge == 0:
        return [Problem("spec.rollout", "maxUnavailable and maxSurge cannot both be 0 (a rollout could never "
                        "progress)")]
    return []


def check_spec(spec: PyptoServingSpec, defaulted: frozenset[str] | set[str] = frozenset(),
               policy: OperatorDefaults = BUILTIN) -> list[Problem]:
    """Semantic checks on a resolved spec that passed the schema; ``defaulted`` names the fields that came from
    the operator's defaults (messages then name the flag instead of the field); ``policy`` is the cluster's
    security policy (allowed host paths and capabilities, root engines; operator/security.py)."""
    return (_check_model(spec, policy) + _check_parallel(spec, defaulted) + _check_devices(spec, policy)
            + _check_engine(spec, policy) + _check_gateway(spec) + _check_rollout(spec))


def check_defaults(defaults: OperatorDefaults) -> list[Problem]:
    """The operator's own defaults (checked at start-up); each problem names the ``--default-*`` flag."""
    out: list[Problem] = []
    for field, image in (("spec.engine.image", defaults.engine_image), ("spec.gateway.image", defaults.gateway_image)):
        if image is not None and (not image.strip() or any(ch.isspace() for ch in image)):
            out.append(Problem(FLAGS[field], f"{image!r} is not an image reference"))
    problem = resource_name_problem(defaults.device_resource_name)
    if problem is not None:
        out.append(Problem(FLAGS["spec.devices.resourceName"], problem))
    if defaults.devices_per_node is not None and not 1 <= defaults.devices_per_node <= 1024:
        out.append(Problem(FLAGS["spec.devices.perNode"],
                           f"must be between 1 and 1024 (got {defaults.devices_per_node})"))
    if defaults.routing not in ROUTING_POLICIES:
        out.append(Problem(FLAGS["spec.gateway.routing"], f"must be one of {', '.join(ROUTING_POLICIES)}"))
    if defaults.gateway_service_type not in SERVICE_TYPES:
        out.append(Problem(FLAGS["spec.gateway.serviceType"], f"must be one of {', '.join(SERVICE_TYPES)}"))
    for field, value in (("spec.engine.resources.requests.cpu", defaults.engine_cpu_request),
                         ("spec.engine.resources.limits.cpu", defaults.engine_cpu_limit)):
        if value is not None and not QUANTITY.match(value):
            out.append(Problem(FLAGS[field], f"{value!r} is not a valid quantity (e.g. 2 or 500m)"))
    out += [Problem("--allowed-host-paths", problem) for problem in
            security.check_allowed_host_paths(defaults.allowed_host_paths)]
    out += [Problem("--allowed-capabilities", f"{cap!r} is not a capability name (e.g. IPC_LOCK)")
            for cap in defaults.allowed_capabilities if not CAPABILITY.match(cap) or cap.upper() == "ALL"]
    return out


def validate(body: Mapping[str, Any], defaults: OperatorDefaults = BUILTIN
             ) -> tuple[PyptoServingSpec | None, list[Problem]]:
    """Validate a whole PyptoServing object; return its spec resolved with the operator's ``defaults`` (when it
    parses and is valid) and all problems."""
    problems = check_name((body.get("metadata") or {}).get("name"))
    spec, schema_problems = parse_spec(body.get("spec"))
    problems += schema_problems
    resolved = None
    if spec is not None:
        resolved = resolve(spec, defaults)
        problems += check_spec(resolved, defaulted_fields(spec), defaults)
        if not problems:
            problems += check_group_name((body.get("metadata") or {}).get("name"), resolved)
    return (resolved if not problems else None), problems


def summary(problems: list[Problem]) -> str:
    """All problems in one message (for the webhook response and the SpecValid condition)."""
    return "; ".join(str(p) for p in problems)
