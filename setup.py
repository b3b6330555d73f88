"""Package discovery for the CONTRACT.md layout.

Top-level folders ``operator/``, ``engine/`` and ``gateway/`` are installed as ``pypto_serving.operator``,
``pypto_serving.engine`` and ``pypto_serving.gateway``; nothing is installed as a top-level ``operator``
(which would shadow the standard library). Subpackages are discovered, never listed by hand.
"""

from setuptools import find_packages, setup

PARTS = {"pypto_serving": "pypto_serving", "operator": "pypto_serving.operator",
         "engine": "pypto_serving.engine", "gateway": "pypto_serving.gateway"}

package_dir: dict[str, str] = {}
packages: list[str] = []
for folder, name in PARTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(package_dir=package_dir, packages=packages)
