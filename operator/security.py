"""What a PyptoServing may ask of the node: host paths, capabilities, users (pure checks, no Kubernetes calls).

The operator creates engine pods with its own rights, so anything a resource could put in a pod is checked here
first (the admission webhook and the reconciler both run these checks through `validation.validate`):

- hostPath volumes (``spec.model.volume.hostPath``, ``spec.devices.hccnConfPath``) only under the cluster's
  allow-list of path prefixes (``--allowed-host-paths``, the chart's ``security.allowedHostPaths``): normalised,
  no ``..``, matched on whole path components (``/data/models2`` is not under ``/data/models``);
- no privileged containers, no privilege escalation, no added capabilities beyond ``--allowed-capabilities``
  (empty by default: the Ascend device plugin gives access to the NPUs through device nodes, not capabilities),
  no Unconfined seccomp, no unmasked /proc, no SELinux type or user overrides, no unsafe sysctls;
- non-root engines unless the cluster allows root ones (``--allow-root-engines``, ``security.allowRootEngines``).

hostPID, hostNetwork and hostIPC cannot be expressed: the spec has no such fields and unknown fields are rejected.
A cluster admin widens these lists through the chart (operator flags), never through the resource.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

# Model directories, hccn.conf and the Ascend driver files the device plugin does not mount into containers.
DEFAULT_ALLOWED_HOST_PATHS: tuple[str, ...] = (
    "/data/models", "/mnt/models", "/models", "/etc/hccn.conf", "/usr/local/Ascend/driver", "/usr/local/dcmi",
    "/usr/local/bin/npu-smi", "/etc/ascend_install.info")
# Capabilities a resource may add back (--allowed-capabilities): none by default.
DEFAULT_ALLOWED_CAPABILITIES: tuple[str, ...] = ()
# Pod Security Standards "baseline": the sysctls that are namespaced and safe.
SAFE_SYSCTLS = ("kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range")
SAFE_SELINUX_TYPES = ("container_t", "container_init_t", "container_kvm_t")
Finding = tuple[str, str]  # (field, message)


def host_path_problem(path: Any) -> str | None:
    """What is wrong with the shape of a host path (absolute, no ``..``), or None."""
    if not isinstance(path, str) or not path.startswith("/"):
        return f"must be an absolute host path (got {path!r})"
    if ".." in path.split("/"):
        return f"must not contain '..' (got {path!r})"
    return None


def normalise(path: str) -> str:
    """``/a//b/./c/`` -> ``/a/b/c`` (callers reject ``..`` first: it is never resolved here)."""
    out = posixpath.normpath(path)
    return "/" + out.lstrip("/")  # normpath keeps a leading "//"


def under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether normalised ``path`` is one of ``prefixes`` or inside one, comparing whole path components."""
    path = normalise(path)
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in (normalise(x) for x in prefixes))


def check_allowed_host_paths(prefixes: Iterable[str]) -> list[str]:
    """Problems with the allow-list itself (checked when the operator starts)."""
    out = []
    for prefix in prefixes:
        problem = host_path_problem(prefix)
        if problem is not None:
            out.append(f"{prefix!r}: {problem}")
        elif normalise(prefix) == "/":
            out.append("'/' would allow any host path (list the directories instead)")
    return out


def check_host_path(field: str, path: Any, allowed: Iterable[str]) -> list[Finding]:
    """A hostPath the resource asks for: well-formed and under the allow-list."""
    problem = host_path_problem(path)
    if problem is not None:
        return [(field, problem)]
    allowed = tuple(allowed)
    if not under(path, allowed):
        return [(field, f"host path {path} is not allowed by this cluster (allowed: {', '.join(allowed) or 'none'}; "
                 "an administrator widens the list with the chart's security.allowedHostPaths)")]
    return []


def _capabilities(field: str, caps: Any, allowed: tuple[str, ...]) -> list[Finding]:
    if not isinstance(caps, Mapping):
        return [(field, "must be an object with add and/or drop lists")]
    out: list[Finding] = []
    for key in caps:
        if key not in ("add", "drop"):
            out.append((f"{field}.{key}", "unknown field (use add or drop)"))
    added = caps.get("add") or []
    for i, cap in enumerate(added if isinstance(added, list) else [added]):
        name = str(cap).upper().removeprefix("CAP_")
        if name not in allowed:
            out.append((f"{field}.add[{i}]", f"adding capability {cap} is not allowed (engines drop ALL; allowed: "
                        f"{', '.join(allowed) or 'none'}, widened with the chart's security.allowedCapabilities)"))
    return out


def check_security_context(field: str, ctx: Any, allowed_caps: Iterable[str], allow_root: bool) -> list[Finding]:
    """A container securityContext from the spec: nothing that gives the container more than a plain one."""
    if ctx is None:
        return []
    if not isinstance(ctx, Mapping):
        return [(field, "must be an object")]
    out: list[Finding] = []
    if ctx.get("privileged") is True:
        out.append((f"{field}.privileged", "privileged containers are not allowed"))
    if ctx.get("allowPrivilegeEscalation") is True:
        out.append((f"{field}.allowPrivilegeEscalation", "must be false (privilege escalation is not allowed)"))
    if "capabilities" in ctx:
        out += _capabilities(f"{field}.capabilities", ctx["capabilities"], tuple(c.upper() for c in allowed_caps))
    if ctx.get("procMount") not in (None, "Default"):
        out.append((f"{field}.procMount", f"only Default is allowed (got {ctx['procMount']!r})"))
    windows = ctx.get("windowsOptions") or {}
    if isinstance(windows, Mapping) and windows.get("hostProcess") is True:
        out.append((f"{field}.windowsOptions.hostProcess", "host processes are not allowed"))
    return out + _common(field, ctx, allow_root)


def check_pod_security_context(field: str, ctx: Any, allow_root: bool) -> list[Finding]:
    """A pod securityContext from the spec: the container checks that apply to pods, plus safe sysctls only."""
    if ctx is None:
        return []
    if not isinstance(ctx, Mapping):
        return [(field, "must be an object")]
    out: list[Finding] = []
    for i, sysctl in enumerate(ctx.get("sysctls") or []):
        name = sysctl.get("name") if isinstance(sysctl, Mapping) else None
        if name not in SAFE_SYSCTLS:
            out.append((f"{field}.sysctls[{i}].name", f"{name!r} is not a safe sysctl (allowed: "
                        f"{', '.join(SAFE_SYSCTLS)})"))
    windows = ctx.get("windowsOptions") or {}
    if isinstance(windows, Mapping) and windows.get("hostProcess") is True:
        out.append((f"{field}.windowsOptions.hostProcess", "host processes are not allowed"))
    return out + _common(field, ctx, allow_root)


def _common(field: str, ctx: Mapping[str, Any], allow_root: bool) -> list[Finding]:
    """Checks shared by pod and container security contexts: seccomp, SELinux, root."""
    out: list[Finding] = []
    seccomp = ctx.get("seccompProfile") or {}
    if isinstance(seccomp, Mapping) and seccomp.get("type") == "Unconfined":
        out.append((f"{field}.seccompProfile.type", "Unconfined is not allowed (use RuntimeDefault or Localhost)"))
    selinux = ctx.get("seLinuxOptions") or {}
    if isinstance(selinux, Mapping):
        if selinux.get("type") not in (None, "", *SAFE_SELINUX_TYPES):
            out.append((f"{field}.seLinuxOptions.type", f"{selinux['type']!r} is not allowed (allowed: "
                        f"{', '.join(SAFE_SELINUX_TYPES)})"))
        for key in ("user", "role"):
            if selinux.get(key):
                out.append((f"{field}.seLinuxOptions.{key}", "must not be set"))
    if not allow_root:
        if ctx.get("runAsNonRoot") is False:
            out.append((f"{field}.runAsNonRoot", "engines run as non-root on this cluster (an administrator allows "
                        "root engines with the chart's security.allowRootEngines)"))
        if ctx.get("runAsUser") == 0:
            out.append((f"{field}.runAsUser", "uid 0 (root) is not allowed on this cluster (an administrator allows "
                        "root engines with the chart's security.allowRootEngines)"))
    return out
