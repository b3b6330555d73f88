"""The security policy's pure checks (operator/security.py) and how validation applies the cluster's policy."""

from __future__ import annotations

import dataclasses

import pytest

from pypto_serving.operator import security, validation
from pypto_serving.operator.defaults import BUILTIN
from tests.operator.corpus import minimal


@pytest.mark.parametrize(("path", "allowed"), [
    ("/data/models", True), ("/data/models/", True), ("/data/models/qwen3", True), ("/data//models/./qwen", True),
    ("/data/models2", False), ("/data/model", False), ("/data", False), ("/", False), ("/etc/hccn.conf", True),
    ("/etc/hccn.conf.d/x", False), ("/usr/local/Ascend/driver/lib64", True), ("/usr/local/Ascend", False),
    ("//data/models", True), ("/models", True), ("/modelsx", False)])
def test_host_paths_match_whole_components_of_normalised_paths(path: str, allowed: bool) -> None:
    assert security.under(path, security.DEFAULT_ALLOWED_HOST_PATHS) is allowed
    assert (security.check_host_path("f", path, security.DEFAULT_ALLOWED_HOST_PATHS) == []) is allowed


@pytest.mark.parametrize("path", ["/data/models/../../etc", "/data/models/..", "../data/models", "data/models", "",
                                  None, 7])
def test_backsteps_and_relative_host_paths_are_rejected_before_matching(path: object) -> None:
    ((field, message),) = security.check_host_path("spec.x", path, security.DEFAULT_ALLOWED_HOST_PATHS)
    assert field == "spec.x" and ("'..'" in message or "absolute" in message)


def test_the_allow_list_is_the_operators_not_the_resources() -> None:
    body = minimal(model={"name": "m", "path": "/m", "volume": {"hostPath": {"path": "/srv/llm/qwen"}}})
    _, problems = validation.validate(body)
    assert [p.field for p in problems] == ["spec.model.volume.hostPath.path"]
    assert "security.allowedHostPaths" in problems[0].message
    wider = dataclasses.replace(BUILTIN, allowed_host_paths=(*BUILTIN.allowed_host_paths, "/srv/llm"))
    spec, problems = validation.validate(body, wider)
    assert problems == [] and spec is not None
    body["spec"]["devices"] = {"hccnConfPath": "/srv/llm/../../etc/shadow"}
    _, problems = validation.validate(body, wider)
    assert [str(p) for p in problems] == ["spec.devices.hccnConfPath: must not contain '..' "
                                          "(got '/srv/llm/../../etc/shadow')"]


def test_security_contexts_that_give_more_than_a_plain_container_are_rejected() -> None:
    ctx = {"privileged": True, "allowPrivilegeEscalation": True, "procMount": "Unmasked",
           "capabilities": {"add": ["NET_ADMIN", "CAP_SYS_ADMIN"], "drop": ["ALL"], "keep": []},
           "seLinuxOptions": {"type": "spc_t", "user": "root"}, "windowsOptions": {"hostProcess": True},
           "seccompProfile": {"type": "Unconfined"}, "runAsNonRoot": False, "runAsUser": 0}
    fields = [f for f, _ in security.check_security_context("c", ctx, (), allow_root=False)]
    assert fields == ["c.privileged", "c.allowPrivilegeEscalation", "c.capabilities.keep", "c.capabilities.add[0]",
                      "c.capabilities.add[1]", "c.procMount", "c.windowsOptions.hostProcess",
                      "c.seccompProfile.type", "c.seLinuxOptions.type", "c.seLinuxOptions.user", "c.runAsNonRoot",
                      "c.runAsUser"]
    # what the cluster allows: a listed capability (with or without CAP_), root engines
    assert security.check_security_context("c", {"capabilities": {"add": ["CAP_IPC_LOCK"]}, "runAsUser": 0},
                                           ("IPC_LOCK",), allow_root=True) == []


def test_pod_security_context_allows_only_safe_sysctls_and_non_root_by_default() -> None:
    good = {"runAsNonRoot": True, "runAsUser": 1000, "supplementalGroups": [1001], "fsGroup": 1001,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "1"}]}
    assert security.check_pod_security_context("p", good, allow_root=False) == []
    bad = {"sysctls": [{"name": "kernel.msgmax", "value": "1"}], "runAsNonRoot": False}
    assert [f for f, _ in security.check_pod_security_context("p", bad, allow_root=False)] == [
        "p.sysctls[0].name", "p.runAsNonRoot"]
    assert [f for f, _ in security.check_pod_security_context("p", bad, allow_root=True)] == ["p.sysctls[0].name"]


@pytest.mark.parametrize("field", ["hostNetwork", "hostPID", "hostIPC", "volumes", "hostAliases"])
def test_host_namespaces_cannot_be_expressed_in_the_spec(field: str) -> None:
    _, problems = validation.validate(minimal(engine={field: True}))
    assert [str(p) for p in problems] == [f"spec.engine.{field}: unknown field"]
    _, problems = validation.validate(minimal(**{field: True}))
    assert [str(p) for p in problems] == [f"spec.{field}: unknown field"]


def test_operator_policy_flags_are_checked_at_start_up() -> None:
    bad = dataclasses.replace(BUILTIN, allowed_host_paths=("/", "relative", "/a/../b", "/data/models"),
                              allowed_capabilities=("IPC_LOCK", "ALL", "bad cap"), engine_cpu_limit="lots")
    assert [str(p) for p in validation.check_defaults(bad)] == [
        "--default-engine-cpu-limit: 'lots' is not a valid quantity (e.g. 2 or 500m)",
        "--allowed-host-paths: '/' would allow any host path (list the directories instead)",
        "--allowed-host-paths: 'relative': must be an absolute host path (got 'relative')",
        "--allowed-host-paths: '/a/../b': must not contain '..' (got '/a/../b')",
        "--allowed-capabilities: 'ALL' is not a capability name (e.g. IPC_LOCK)",
        "--allowed-capabilities: 'bad cap' is not a capability name (e.g. IPC_LOCK)"]
    assert validation.check_defaults(BUILTIN) == []
