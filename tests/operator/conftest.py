"""Fixtures for the operator's real-cluster tests: the CRD installed, operator subprocesses, API access."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pypto_serving.kube import Kube, load_config
from tests.operator.clusterkit import OperatorProcess


@pytest.fixture(scope="session")
def kube(cluster: Any) -> Iterator[Kube]:
    """A REST client for fast polling from tests (user actions go through kubectl)."""
    client = Kube(load_config(str(cluster.kubeconfig)))
    yield client
    client.close()


@pytest.fixture
def start_operator(cluster: Any, crd: str, namespace: str, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """Factory: start operators watching the test namespace; all are stopped at the end."""
    started: list[OperatorProcess] = []
    env = cluster.host_env

    def start(*extra: str, wait: bool = True) -> OperatorProcess:
        proc = OperatorProcess(namespace, env, tmp_path / f"operator-{len(started)}.log", list(extra))
        started.append(proc)
        return proc.start(wait=wait)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def operator(start_operator: Callable[..., OperatorProcess]) -> OperatorProcess:
    """One operator (leader election on, no webhook) watching the test namespace."""
    return start_operator()


@pytest.fixture(scope="session")
def model_volume(cluster: Any) -> dict[str, Any]:
    """spec.model for the tiny Qwen3 model, as a hostPath volume (the node agent runs pods on this host)."""
    from tests.support.models import tiny_model_dir

    path = tiny_model_dir("qwen3")
    return {"name": "tiny", "path": "/models/tiny", "mountPath": "/models/tiny",
            "volume": {"hostPath": {"path": str(path), "type": "Directory"}}}
