"""Package discovery for the one `mlx_oss` namespace.

pyproject.toml maps each top-level folder to its import name (`cpu` -> `mlx_oss.cpu`, see its package-dir), but
setuptools' `packages.find` names what it finds after the folder (`cpu`), so it cannot discover under that mapping;
a hand-kept list in pyproject.toml once left out `mlx_oss.mlx_backend` (the wheel had no MLX backend). Here every
folder with an `__init__.py` under a mapped folder is installed, under its mapped name.
"""

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

root = Path(__file__).parent
package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
packages = [
    package
    for name, folder in package_dir.items()
    for package in [name, *(f"{name}.{sub}" for sub in find_packages(root / folder))]
]
setup(packages=packages)
