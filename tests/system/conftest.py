"""The whole system on the session's real cluster: the operator (a subprocess with the least-privilege RBAC of
operator/rbac.yaml is tested separately), a PyptoServing with 2 real engines and a gateway requiring an API key.
Shared by the system tests (chaos, security)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.chaos_system import System, deploy_serving
from tests.operator.clusterkit import OperatorProcess

SYSTEM_REPLICAS = 2


@pytest.fixture(scope="session")
def serving_system(cluster: Any, crd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A served tiny model: operator + 2 engine pods + 1 gateway pod (API key), ready and routing."""
    from tests.support.models import tiny_model_dir

    namespace = cluster.create_namespace("system")
    env = cluster.host_env
    log_dir: Path = tmp_path_factory.mktemp("system")
    operator = OperatorProcess(namespace, env, log_dir / "operator.log").start()
    system = System(cluster.kubeconfig, namespace, "sys", api_key=f"key-{uuid.uuid4().hex}", cluster=cluster.local)
    try:
        deploy_serving(system, tiny_model_dir("qwen3"), SYSTEM_REPLICAS, gateway_replicas=1)
        yield system
    except BaseException:
        print(f"operator log tail:\n{operator.log_tail()}")
        raise
    finally:
        operator.stop()
        system.kube.close()
        cluster.delete_namespace(namespace)
