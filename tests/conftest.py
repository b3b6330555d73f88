"""Root test configuration. Shared fixtures live in tests/support/, one module per concern."""

pytest_plugins = [
    "tests.support.common",   # free ports, wait_for with deadlines
    "tests.support.models",   # tiny HF models generated once into the cache
    "tests.support.engines",  # real `pypto-serving engine` processes on loopback
    "tests.support.cluster",  # the real local Kubernetes cluster (session scoped)
]
