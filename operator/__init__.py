"""The PyptoServing operator: CRD models, reconcile logic and kopf handlers (no torch).

Installed as ``pypto_serving.operator``. When a command runs with the repository root on ``sys.path``
(``python -m ...`` from a checkout), this folder would otherwise be found before the standard library's
``operator`` module and break everything that imports it; in that case load the real module instead.
"""

if __name__ == "operator":  # pragma: no cover - exercised by tests/test_packaging.py in a subprocess
    import sys as _sys
    import sysconfig as _sysconfig
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec

    _spec = _PathFinder.find_spec("operator", [_sysconfig.get_path("stdlib")])
    assert _spec is not None and _spec.loader is not None
    _stdlib_operator = _module_from_spec(_spec)
    _sys.modules["operator"] = _stdlib_operator
    _spec.loader.exec_module(_stdlib_operator)
