"""Container environment as the kubelet builds it: a base image-like env, service variables, ``envFrom``,
``env`` (value with $(VAR) expansion, fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef), and the
$(VAR) expansion of command and args."""

from __future__ import annotations

import base64
import math
import os
import re
from typing import Any

from hack.localkube.kubeclient import KubeClient

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VAR_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


class ConfigError(RuntimeError):
    """A referenced ConfigMap, Secret or key is missing (the kubelet's CreateContainerConfigError)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known variables are replaced, unknown ones kept, ``$$`` escapes ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REFERENCE.sub(replace, text)


def field_value(pod: dict[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """Resolve a downward-API ``fieldRef.fieldPath``."""
    meta, spec = pod["metadata"], pod["spec"]
    simple = {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
              "spec.serviceAccountName": spec.get("serviceAccountName", ""), "status.hostIP": host_ip,
              "status.podIP": pod_ip, "status.podIPs": pod_ip}
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{key}="{value}"' for key, value in sorted(items.items()))
    raise ConfigError(f"unsupported fieldRef {path!r}")


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "m": 1e-3}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "2Gi", "4") as a number."""
    text = str(value)
    for suffix, factor in sorted(_SUFFIX.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def resource_value(container: dict[str, Any], ref: dict[str, Any], node_cpu: str, node_memory: str) -> str:
    """Resolve a ``resourceFieldRef`` (limits default to the node's allocatable, like the kubelet)."""
    kind, name = ref["resource"].split(".", 1)
    resources = container.get("resources") or {}
    fallback = {"cpu": node_cpu, "memory": node_memory}.get(name, "0")
    raw = (resources.get(kind) or {}).get(name) or (fallback if kind == "limits" else "0")
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(raw) / divisor))


class EnvResolver:
    """Builds a container's environment, reading ConfigMaps and Secrets through the API."""

    def __init__(self, client: KubeClient, pass_through_prefixes: list[str], path_prefix: str,
                 apiserver_port: int, node_cpu: str, node_memory: str) -> None:
        self.client = client
        self.prefixes = tuple(pass_through_prefixes)
        self.path_prefix = path_prefix
        self.apiserver_port = apiserver_port
        self.node_cpu = node_cpu
        self.node_memory = node_memory

    def _object(self, namespace: str, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        plural = "configmaps" if kind == "configMap" else "secrets"
        found = self.client.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}", ok_missing=True)
        if found is None:
            if optional:
                return None
            raise ConfigError(f'{kind} "{name}" not found')
        if kind == "configMap":
            return dict(found.get("data") or {})
        data = found.get("data") or {}
        return {key: base64.b64decode(value).decode(errors="replace") for key, value in data.items()}

    def base(self, pod: dict[str, Any]) -> dict[str, str]:
        """What every container gets before its own env: PATH (project venv first), HOME, HOSTNAME, API address."""
        env = {"PATH": f"{self.path_prefix}:{DEFAULT_PATH}" if self.path_prefix else DEFAULT_PATH,
               "HOME": os.environ.get("HOME", "/root"), "HOSTNAME": pod["metadata"]["name"],
               "LANG": os.environ.get("LANG", "C.UTF-8"), "PYTHONUNBUFFERED": "1"}
        for key, value in os.environ.items():
            if key.startswith(self.prefixes):
                env[key] = value
        port = str(self.apiserver_port)  # the kubelet always sets these, whatever enableServiceLinks says
        env.update({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port,
                    "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
                    "KUBERNETES_PORT_443_TCP": f"tcp://127.0.0.1:{port}", "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
                    "KUBERNETES_PORT_443_TCP_PORT": port, "KUBERNETES_PORT_443_TCP_ADDR": "127.0.0.1"})
        return env

    def container_env(self, pod: dict[str, Any], container: dict[str, Any], pod_ip: str, host_ip: str,
                      devices_env: dict[str, str]) -> dict[str, str]:
        """The full environment of ``container``; raises ConfigError for a missing ConfigMap/Secret/key."""
        namespace = pod["metadata"]["namespace"]
        env = self.base(pod)
        env.update(devices_env)
        declared: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind in ("configMap", "secret"):
                ref = source.get(f"{kind}Ref")
                if ref:
                    data = self._object(namespace, kind, ref["name"], bool(ref.get("optional"))) or {}
                    declared.update({f"{prefix}{key}": value for key, value in data.items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                declared[name] = expand(item.get("value", ""), {**env, **declared})
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                declared[name] = field_value(pod, source["fieldRef"]["fieldPath"], pod_ip, host_ip)
            elif "resourceFieldRef" in source:
                declared[name] = resource_value(container, source["resourceFieldRef"], self.node_cpu, self.node_memory)
            else:
                kind = "configMap" if "configMapKeyRef" in source else "secret"
                ref = source[f"{kind}KeyRef"]
                data = self._object(namespace, kind, ref["name"], bool(ref.get("optional")))
                if data is None:
                    continue
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind} {namespace}/{ref["name"]}')
                declared[name] = data[ref["key"]]
        env.update(declared)
        return env


def expand_command(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """``command`` + ``args`` with $(VAR) expanded; with no command, ``args`` alone (there is no image entrypoint)."""
    command = [expand(part, env) for part in container.get("command") or []]
    args = [expand(part, env) for part in container.get("args") or []]
    return command + args
