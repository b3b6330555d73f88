"""Root test configuration. Shared fixtures live in tests/support/, one module per concern."""

from pypto_serving.engine.cli import idle_openmp_threads  # imports no torch

# As `pypto-serving engine` does: the engines that tests run in this process share the cores with the engine
# processes they start, where spinning OpenMP workers slow everything down. Before torch loads.
idle_openmp_threads()

pytest_plugins = [
    "tests.support.common",   # free ports, wait_for with deadlines
    "tests.support.models",   # tiny HF models generated once into the cache
    "tests.support.engines",  # real `pypto-serving engine` processes on loopback
    "tests.support.cluster",  # the real local Kubernetes cluster (session scoped)
]
