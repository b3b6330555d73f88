"""Pod volumes on the host and the per-container mount namespace that shows them at their ``mountPath``.

Volumes are materialised under ``<cluster>/pods/<uid>/volumes/<name>`` (emptyDir with medium Memory under
/dev/shm; hostPath is the host path itself). Each container process starts through ``unshare --mount`` and
``mountns.py``, which bind-mounts every volume (or its subPath) over its mountPath as written in the container's
mount plan (``<container>.mounts.json``), then execs the command; the mounts exist only in that process's mount
namespace. Every source is opened before the first mount, so a volume mounted over an ancestor of another
volume's host directory (an emptyDir at /tmp with the cluster under /tmp) cannot hide it. Missing mount points
are created on the host as empty directories or files (as root), like a container runtime does inside an image.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hack.localkube.kubeclient import KubeClient
from hack.localkube.node.env import ConfigError, field_value, resource_value

SHM_ROOT = Path("/dev/shm")
MOUNTNS_HELPER = Path(__file__).with_name("mountns.py")  # run by path: standard library only


class VolumeError(RuntimeError):
    """A volume cannot be set up (missing ConfigMap/Secret, unsupported type, bad hostPath)."""


@dataclass(frozen=True)
class Volume:
    """A volume ready on the host."""

    name: str
    path: Path
    read_only: bool = False  # configMap, secret, downwardAPI and projected volumes are read-only


class PodVolumes:
    """Creates and removes the volumes of one pod."""

    def __init__(self, client: KubeClient, pod: dict[str, Any], pod_dir: Path, pod_ip: str, host_ip: str,
                 node_cpu: str, node_memory: str) -> None:
        self.client = client
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self.root = pod_dir / "volumes"
        self.pod_ip = pod_ip
        self.host_ip = host_ip
        self.node_cpu = node_cpu
        self.node_memory = node_memory
        self.shm_prefix = f"localkube-{pod['metadata']['uid']}-"

    def prepare(self) -> dict[str, Volume]:
        """Materialise every volume; raises VolumeError with a kubelet-like message on failure."""
        volumes = {}
        for spec in self.pod["spec"].get("volumes") or []:
            try:
                volumes[spec["name"]] = self._prepare_one(spec)
            except ConfigError as exc:
                raise VolumeError(f'MountVolume.SetUp failed for volume "{spec["name"]}" : {exc}') from exc
        return volumes

    def _prepare_one(self, spec: dict[str, Any]) -> Volume:
        name = spec["name"]
        target = self.root / name
        if "hostPath" in spec:
            return Volume(name, self._host_path(spec["hostPath"]))
        if "emptyDir" in spec:
            if (spec["emptyDir"] or {}).get("medium") == "Memory":
                target = SHM_ROOT / f"{self.shm_prefix}{name}"
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o777)
            return Volume(name, target)
        files: dict[str, tuple[bytes, int]] = {}
        if "configMap" in spec:
            files = self._from_object("configMap", spec["configMap"])
        elif "secret" in spec:
            secret = dict(spec["secret"])
            secret["name"] = secret.pop("secretName", "")
            files = self._from_object("secret", secret)
        elif "downwardAPI" in spec:
            files = self._downward(spec["downwardAPI"])
        elif "projected" in spec:
            files = self._projected(spec["projected"])
        else:
            kinds = sorted(set(spec) - {"name"})
            raise VolumeError(f'volume "{name}": type {kinds} is not supported by the localkube node agent '
                              "(supported: hostPath, emptyDir, configMap, secret, downwardAPI, projected)")
        self._write_files(target, files)
        return Volume(name, target, read_only=True)

    def _host_path(self, spec: dict[str, Any]) -> Path:
        path, kind = Path(spec["path"]), spec.get("type") or ""
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        elif kind == "Directory" and not path.is_dir():
            raise VolumeError(f"hostPath type check failed: {path} is not a directory")
        elif kind == "File" and not path.is_file():
            raise VolumeError(f"hostPath type check failed: {path} is not a file")
        elif kind in ("Socket", "CharDevice", "BlockDevice") and not path.exists():
            raise VolumeError(f"hostPath type check failed: {path} does not exist")
        elif not kind and not path.exists():
            path.mkdir(parents=True)  # like a container runtime, which creates a missing hostPath directory
        return path

    def _fetch(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        plural = "configmaps" if kind == "configMap" else "secrets"
        found = self.client.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}", ok_missing=True)
        if found is None:
            if optional:
                return None
            raise ConfigError(f'{kind} "{name}" not found')
        if kind == "configMap":
            data = {key: value.encode() for key, value in (found.get("data") or {}).items()}
            data.update({key: base64.b64decode(value) for key, value in (found.get("binaryData") or {}).items()})
            return data
        return {key: base64.b64decode(value) for key, value in (found.get("data") or {}).items()}

    def _from_object(self, kind: str, source: dict[str, Any],
                     default_mode: int | None = None) -> dict[str, tuple[bytes, int]]:
        mode = source.get("defaultMode", default_mode if default_mode is not None else 0o644)
        data = self._fetch(kind, source.get("name", ""), bool(source.get("optional")))
        if data is None:
            return {}
        items = source.get("items")
        if not items:
            return {key: (value, mode) for key, value in data.items()}
        files = {}
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise ConfigError(f'configmap/secret "{source.get("name")}" has no key {item["key"]!r}')
            files[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return files

    def _downward(self, source: dict[str, Any], default_mode: int | None = None) -> dict[str, tuple[bytes, int]]:
        mode = source.get("defaultMode", default_mode if default_mode is not None else 0o644)
        files = {}
        for item in source.get("items") or []:
            if "fieldRef" in item:
                value = field_value(self.pod, item["fieldRef"]["fieldPath"], self.pod_ip, self.host_ip)
            else:
                ref = item["resourceFieldRef"]
                containers = {c["name"]: c for c in self.pod["spec"]["containers"]}
                container = containers.get(ref.get("containerName", ""), self.pod["spec"]["containers"][0])
                value = resource_value(container, ref, self.node_cpu, self.node_memory)
            files[item["path"]] = (value.encode(), item.get("mode", mode))
        return files

    def _projected(self, spec: dict[str, Any]) -> dict[str, tuple[bytes, int]]:
        mode = spec.get("defaultMode", 0o644)
        files: dict[str, tuple[bytes, int]] = {}
        for source in spec.get("sources") or []:
            if "configMap" in source:
                files.update(self._from_object("configMap", source["configMap"], mode))
            elif "secret" in source:
                files.update(self._from_object("secret", source["secret"], mode))
            elif "downwardAPI" in source:
                files.update(self._downward(source["downwardAPI"], mode))
            elif "serviceAccountToken" in source:
                token = self._request_token(source["serviceAccountToken"])
                files[source["serviceAccountToken"]["path"]] = (token.encode(), mode)
        return files

    def _request_token(self, source: dict[str, Any]) -> str:
        meta = self.pod["metadata"]
        account = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [source["audience"]] if source.get("audience") else None,
            "expirationSeconds": source.get("expirationSeconds", 3600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}
        result = self.client.create(f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", body)
        return result["status"]["token"]

    @staticmethod
    def _write_files(target: Path, files: dict[str, tuple[bytes, int]]) -> None:
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for relative, (content, mode) in files.items():
            path = target / relative
            if not path.resolve().is_relative_to(target.resolve()):
                raise VolumeError(f"volume item path {relative!r} escapes the volume")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode)

    def cleanup(self) -> None:
        """Remove the pod's volume data (never the hostPath volumes)."""
        shutil.rmtree(self.root, ignore_errors=True)
        for entry in SHM_ROOT.glob(f"{self.shm_prefix}*"):
            shutil.rmtree(entry, ignore_errors=True)


@dataclass(frozen=True)
class Mount:
    """One bind mount inside a container's mount namespace."""

    source: Path
    target: str
    read_only: bool


def container_mounts(container: dict[str, Any], volumes: dict[str, Volume], env: dict[str, str]) -> list[Mount]:
    """The bind mounts of ``container``'s volumeMounts, parents before children."""
    mounts = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise VolumeError(f'volumeMount "{mount["name"]}" refers to no volume of the pod')
        source = volume.path
        sub_path = mount.get("subPath") or ""
        if mount.get("subPathExpr"):
            from hack.localkube.node.env import expand

            sub_path = expand(mount["subPathExpr"], env)
        if sub_path:
            source = source / sub_path
            if not source.exists():
                source.mkdir(parents=True, exist_ok=True)
        mounts.append(Mount(source, mount["mountPath"], bool(mount.get("readOnly")) or volume.read_only))
    return sorted(mounts, key=lambda m: len(Path(m.target).parts))


def mount_plan(mounts: list[Mount], working_dir: str = "/", image: list[str] | None = None) -> dict[str, Any]:
    """The JSON-able plan ``mountns.py`` performs: ``mounts`` in order, the ``image`` directories kept visible,
    then ``working_dir`` (which may lie inside a mount)."""
    return {"mounts": [{"source": str(m.source), "target": m.target, "readOnly": m.read_only} for m in mounts],
            "image": list(image or []), "workingDir": working_dir}


def write_mount_plan(path: Path, mounts: list[Mount], working_dir: str = "/", image: list[str] | None = None) -> Path:
    """Write the plan for ``mounts`` to ``path`` (kept in the pod directory for debugging) and return it."""
    path.write_text(json.dumps(mount_plan(mounts, working_dir, image), indent=1) + "\n")
    return path


def container_command(plan: Path, command: list[str]) -> list[str]:
    """The command line that runs ``command`` in a private mount namespace set up by ``plan``."""
    return ["unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-I", "-S", str(MOUNTNS_HELPER), str(plan), "--", *command]
