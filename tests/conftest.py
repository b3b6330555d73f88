"""Root test configuration. Shared fixtures live in tests/support/, one module per concern."""

pytest_plugins = [
    "tests.support.common",
]
