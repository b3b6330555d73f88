"""The names the operator, the engine and the gateway agree on (CONTRACT.md), defined once.

Labels, annotations, HTTP headers and paths, ports, the engine pods' environment variable names and the
``GET /load`` document live here and nowhere else: each part imports them. Torch-free and cheap to import
(pydantic only), so the operator and the gateway can use it. tests/test_contract.py fails when a part
spells one of these names on its own.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

# --- ports -------------------------------------------------------------------------------------------------------
ENGINE_PORT = 8000
ENGINE_PORT_NAME = "http"  # the engine container's named port; the gateway's discovery reads it
GATEWAY_PORT = 8080
OPERATOR_HEALTH_PORT = 8081
WEBHOOK_PORT = 9443
GROUP_PORT = 29500  # + the group index: a multi-pod serving group's rendezvous (torch.distributed store, leader)
GROUP_PORT_NAME = "rendezvous"

# --- labels and annotations on the objects the operator creates --------------------------------------------------
L_NAME = "app.kubernetes.io/name"
L_INSTANCE = "app.kubernetes.io/instance"
L_COMPONENT = "app.kubernetes.io/component"
L_MANAGED_BY = "app.kubernetes.io/managed-by"
L_RANK = "serving.pypto.io/dp-rank"
L_HASH = "serving.pypto.io/spec-hash"
L_DRAINING = "serving.pypto.io/draining"  # "true" while a replica drains: the gateway stops routing to it
# Serving groups (a replica of several pods). dp-rank above is the group's index; these only on multi-pod groups,
# so the pods of a one-pod group keep the labels they always had.
L_GROUP_POD = "serving.pypto.io/group-pod"  # the pod's index in its group (group rank, or DP rank for DP+EP)
L_GROUP_SIZE = "serving.pypto.io/group-size"  # pods in the pod's group
L_ROLE = "serving.pypto.io/role"  # ROLE_LEADER or ROLE_WORKER
L_SERVES = "serving.pypto.io/serves"  # "true" on the pods that run an OpenAI server; "false": the gateway skips it
L_GROUP_READY = "serving.pypto.io/group-ready"  # on serving pods: "true" only while every pod of the group is Ready
A_GROUP_COMPLETE = "serving.pypto.io/group-complete"  # on the leader: every pod of the group was created
ROLE_LEADER, ROLE_WORKER = "leader", "worker"
A_DRAIN_STARTED = "serving.pypto.io/drain-started"
A_DRAIN_REASON = "serving.pypto.io/drain-reason"
A_REAL_DEVICES = "huawei.com/AscendReal"  # the Ascend device plugin's record of the devices it assigned
APP = "pypto-serving"  # the value of L_NAME on everything we create
ENGINE, GATEWAY, OPERATOR = "engine", "gateway", "operator"  # values of L_COMPONENT
MANAGER = "pypto-serving-operator"  # L_MANAGED_BY, and the server-side apply field manager

# --- the engine pods' environment (set by the operator, read by the engine and by people) -----------------------
ENV_TP_SIZE = "PYPTO_TP_SIZE"
ENV_PP_SIZE = "PYPTO_PP_SIZE"
ENV_POD_NAME = "POD_NAME"
ENV_POD_NAMESPACE = "POD_NAMESPACE"
ENV_POD_IP = "POD_IP"
ENV_HCCL_IF_IP = "HCCL_IF_IP"
# Multi-pod serving groups only: the group's rendezvous (also passed as engine flags).
ENV_GROUP_SIZE = "PYPTO_GROUP_SIZE"  # pods in the group
ENV_GROUP_RANK = "PYPTO_GROUP_RANK"  # this pod's index in the group
ENV_GROUP_LEADER_ADDR = "PYPTO_GROUP_LEADER_ADDR"  # the leader pod's IP
ENV_GROUP_LEADER_HOST = "PYPTO_GROUP_LEADER_HOST"  # the leader's DNS name (headless Service; clusters with DNS)
ENV_GROUP_PORT = "PYPTO_GROUP_PORT"
ENV_WORLD_SIZE = "PYPTO_WORLD_SIZE"  # model ranks of the group across its pods
ENGINE_POD_ENV = (ENV_TP_SIZE, ENV_PP_SIZE, ENV_POD_NAME, ENV_POD_NAMESPACE, ENV_POD_IP, ENV_HCCL_IF_IP,
                  ENV_GROUP_SIZE, ENV_GROUP_RANK, ENV_GROUP_LEADER_ADDR, ENV_GROUP_LEADER_HOST,
                  ENV_GROUP_PORT, ENV_WORLD_SIZE)  # all of them: a user's spec.engine.env may not set these
ENV_VISIBLE_DEVICES = "ASCEND_RT_VISIBLE_DEVICES"  # set by the Ascend device plugin, never by a user

# --- HTTP ----------------------------------------------------------------------------------------------------------
REQUEST_ID_HEADER = "x-request-id"  # echoed by the engine and the gateway; one id for every retry of a request
REPLICA_HEADER = "x-pypto-replica"  # the gateway: which replica answered
ROUTING_HEADER = "x-pypto-routing"  # the gateway: a per-request routing policy
SESSION_HEADER = "x-session-id"  # the gateway's session policy
PATH_HEALTH, PATH_READY, PATH_LOAD, PATH_DRAIN, PATH_METRICS = "/health", "/ready", "/load", "/drain", "/metrics"
# Engine control (POST /drain, DELETE /drain undoes it): a bearer token the operator shares with its engines.
AUTHORIZATION_HEADER = "authorization"  # `Authorization: Bearer <token>` (RFC 6750)
CONTROL_SECRET_KEY = "token"  # the key of the per-resource Secret the operator creates (`<name>-control`)
CONTROL_TOKEN_DIR = "/etc/pypto-serving/control"  # where engine pods mount that Secret (read-only)
CONTROL_TOKEN_FILE = f"{CONTROL_TOKEN_DIR}/{CONTROL_SECRET_KEY}"  # passed as `--control-token-file`
CONTROL_TOKEN_FLAG = "--control-token-file"
# What routers written for vLLM probe (smg, vllm-router): `GET /version`, `owned_by` in `/v1/models`, and
# vllm-router's `GET /get_load` (`{"load": N}`, N = the engine's pending tokens).
PATH_VERSION, PATH_GET_LOAD = "/version", "/get_load"
OWNED_BY = "vllm"  # /v1/models `owned_by`: smg classifies a worker as vLLM by it (then reads /metrics' vllm: gauges)
# Pushed load: `GET /load?watch=1` answers server-sent events, one `data:` line of a `LoadUpdate` each, sent when the
# load changes (at most one per LOAD_PUSH_MIN_INTERVAL_S) and at least every LOAD_HEARTBEAT_S. The gateway tags each
# attempt with DISPATCH_HEADER; an update lists the dispatch ids the engine admitted since the previous update (the
# first update of a stream: every admitted request still in flight), and its counts include those requests.
LOAD_WATCH_PARAM = "watch"
DISPATCH_HEADER = "x-pypto-dispatch"
LOAD_PUSH_MIN_INTERVAL_S = 0.01
LOAD_HEARTBEAT_S = 1.0
MAX_DISPATCH_ID_LEN = 64
MAX_ADMITTED_PER_UPDATE = 256  # more ids go out in several updates (each with the same counts)
MAX_RUNNING_REMAINING = 16  # /load's running_remaining: the next slots to free up, enough to rank replicas
_DISPATCH_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.")


def dispatch_id_of(value: str | None) -> str | None:
    """A dispatch id as the engine accepts it (1-64 characters of [A-Za-z0-9._-]), else None."""
    if value and len(value) <= MAX_DISPATCH_ID_LEN and _DISPATCH_ID_CHARS.issuperset(value):
        return value
    return None


class LoadReport(BaseModel):
    """An engine's ``GET /load`` document: its own work, cheap to poll. The engine writes it with
    :meth:`to_json`; the operator and the gateway read untrusted bytes back with :meth:`parse`."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)  # "8" or true is no count

    running: int = Field(default=0, ge=0, description="Requests in the running batch.")
    waiting: int = Field(default=0, ge=0, description="Requests admitted but not scheduled yet.")
    pending_tokens: int = Field(
        default=0, ge=0, description="For every unfinished request: prompt tokens not computed yet + tokens still "
        "to generate.")
    kv_cache_usage: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction of KV-cache blocks in use.")
    draining: bool = Field(default=False, description="The engine accepts no new requests.")
    max_num_seqs: int | None = Field(default=None, gt=0, description="Batch slots, once the model is loaded.")
    running_remaining: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=MAX_RUNNING_REMAINING, description="For the running requests, the tokens each has "
        "left at most (prompt tokens not computed + tokens up to max_tokens), smallest first, at most 16: when the "
        "next batch slots free up.")
    dp_rank: int | None = Field(default=None, ge=0, description="DP+EP: this engine's data-parallel rank (its "
                                "load is its own; each rank is routed to like a replica).")
    dp_size: int | None = Field(default=None, gt=0, description="DP+EP: the engines of its lockstep group.")

    @property
    def in_flight(self) -> int:
        """Requests not finished yet."""
        return self.running + self.waiting

    def to_json(self) -> dict[str, Any]:
        """The document as the engine sends it (max_num_seqs only once known)."""
        return self.model_dump(exclude_none=True)

    @classmethod
    def parse(cls, data: Any) -> LoadReport:
        """Validate an engine's answer; ValueError names what is wrong (a negative count, a wrong type...)."""
        if not isinstance(data, dict):
            raise ValueError(f"/load must be a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"invalid /load document: {exc.errors(include_url=False, include_input=False)}") from None


DispatchId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_DISPATCH_ID_LEN,
                                             pattern=r"^[A-Za-z0-9._-]+$")]


class LoadUpdate(LoadReport):
    """One event of the pushed load (``GET /load?watch=1``): the engine's load, and the dispatch ids it admitted
    since the previous event (its counts include them)."""

    admitted: list[DispatchId] = Field(default_factory=list, max_length=MAX_ADMITTED_PER_UPDATE,
                                       description="Dispatch ids (x-pypto-dispatch) admitted since the last event.")
