"""Root test configuration. Shared fixtures live in tests/support/, one module per concern."""

import os

# As `pypto-serving engine` does (engine/cli.py): the engines that tests run in this process share the cores with
# the engine processes they start, where spinning OpenMP workers slow everything down. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = [
    "tests.support.common",   # free ports, wait_for with deadlines
    "tests.support.models",   # tiny HF models generated once into the cache
    "tests.support.engines",  # real `pypto-serving engine` processes on loopback
    "tests.support.cluster",  # the real local Kubernetes cluster (session scoped)
]
