"""The packages of the wheel, found rather than listed: a new subpackage of align/ cannot be left out of it.
conf/ and recipes/ stay at the top of the repository and ship inside the wheel as align.conf and align.recipe_files
(a package align/recipes once shadowed the module of that name, now align/config/recipes.py).
Everything else about the project is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["align", "align.*"]), "align.conf", "align.recipe_files"],
    package_dir={"align.conf": "conf", "align.recipe_files": "recipes"},
)
