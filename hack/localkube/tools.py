"""Where the cluster's binaries are: the cache that hack/install-tools.sh fills, then PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

K8S_VERSION = "1.20.2"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """``$PYPTO_CACHE_DIR`` or ``~/.cache/pypto-serving``."""
    return Path(os.environ.get("PYPTO_CACHE_DIR", Path.home() / ".cache" / "pypto-serving"))


class MissingToolError(RuntimeError):
    """A binary the cluster needs is not installed."""


def k8s_binary(name: str) -> Path:
    """Path of kube-apiserver, kube-controller-manager or kube-scheduler."""
    path = cache_dir() / f"k8s-v{K8S_VERSION}" / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    raise MissingToolError(f"{path} is missing: run `make tools` (bash hack/install-tools.sh) to build it")


def etcd_binary() -> Path:
    """Path of etcd (Debian's etcd-server)."""
    found = shutil.which("etcd")
    if not found:
        raise MissingToolError("etcd is not installed: run `make tools` (it installs Debian's etcd-server)")
    return Path(found)


def kubectl_binary() -> Path:
    """A kubectl: the one on PATH, else the 1.35 client shipped next to helm in the cache."""
    found = shutil.which("kubectl")
    if found:
        return Path(found)
    fallback = cache_dir() / "bin" / "kubectl-1.35"
    if fallback.is_file():
        return fallback
    raise MissingToolError("kubectl is not installed: run `make tools`")


def helm_binary() -> Path:
    """Path of helm (installed by `make tools` into the cache)."""
    path = cache_dir() / "bin" / "helm"
    if path.is_file():
        return path
    found = shutil.which("helm")
    if found:
        return Path(found)
    raise MissingToolError(f"{path} is missing: run `make tools`")
