"""Every third-party import in server/propscope_server is a declared dependency of the part that
runs it: the gateway's in [project] dependencies, Triton-side model code and training in the
`triton` extra, validation tooling in the `validation` extra. The clean-venv install
(tests/integration/test_install.py) proves the gateway starts; this finds imports on paths a
start does not take."""

from __future__ import annotations

import ast
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "server"
PACKAGE = SERVER / "propscope_server"
DISTRIBUTION = "propscope-server"
# Packages that are not distributions: the Triton python backend provides this module itself.
PROVIDED_BY_TRITON = {"triton_python_backend_utils"}
# Which declared requirements each part of the package may import from.
AREAS = {
    "gateway": ((), ()),
    "triton_models": (("triton_models",), ("triton",)),
    "synthetic": (("synthetic",), ("triton",)),
    "validation": (("validation",), ("validation",)),
}


@cache
def _project() -> dict:
    return tomllib.loads((SERVER / "pyproject.toml").read_text())["project"]


def _requirements(extras: tuple[str, ...]) -> set[str]:
    """Names of the base requirements plus those of the extras (and the extras they name)."""
    project = _project()
    pending = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        pending += [Requirement(r) for r in project["optional-dependencies"][extra]]
    names: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name == DISTRIBUTION:
            for extra in requirement.extras:
                pending += [Requirement(r) for r in project["optional-dependencies"][extra]]
        else:
            names.add(name)
    return names


def _area(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return next((area for area, (dirs, _) in AREAS.items() if parts[0] in dirs), "gateway")


def _third_party_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return {
        module
        for module in modules
        if module.split(".")[0] not in sys.stdlib_module_names | {"propscope_server"}
    }


@cache
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distribution(module: str) -> str:
    """The installed distribution that ships the module (namespace packages such as google.* are
    shared by several: the one with the module's files)."""
    parts = module.split(".")
    candidates = _packages_distributions().get(parts[0], [])
    assert candidates, f"{module} is imported but not installed: which distribution provides it?"
    if len(candidates) == 1:
        return canonicalize_name(candidates[0])
    prefix = "/".join(parts[:2])
    owners = {
        canonicalize_name(name)
        for name in candidates
        if any(
            str(file).startswith(f"{prefix}/") or str(file) == f"{prefix}.py"
            for file in metadata.distribution(name).files or ()
        )
    }
    assert len(owners) == 1, f"{module}: shipped by {sorted(owners) or candidates}"
    return owners.pop()


def _imports_by_area() -> dict[str, dict[str, set[str]]]:
    found: dict[str, dict[str, set[str]]] = {area: {} for area in AREAS}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module in _third_party_imports(path) - PROVIDED_BY_TRITON:
            where = str(path.relative_to(SERVER))
            found[_area(path)].setdefault(module, set()).add(where)
    return found


@pytest.mark.parametrize("area", list(AREAS))
def test_every_import_is_a_declared_dependency(area: str) -> None:
    imports = _imports_by_area()[area]
    assert imports, (
        f"no third-party imports found for {area}: is the scan looking in the right place?"
    )
    declared = _requirements(AREAS[area][1])
    undeclared = {
        module: (distribution, sorted(files))
        for module, files in imports.items()
        if (distribution := _distribution(module)) not in declared
    }
    assert not undeclared, (
        f"imported in {area} but not declared in server/pyproject.toml "
        f"(module: distribution, files): {undeclared}"
    )


def test_the_gateway_does_not_need_the_extras() -> None:
    """torch, diffusers, captum... are declared for Triton and validation only: the gateway image
    stays small, and no gateway module may import them."""
    gateway = {_distribution(module) for module in _imports_by_area()["gateway"]}
    extras_only = _requirements(("triton", "validation")) - _requirements(())
    assert extras_only, "the extras declare nothing beyond the base dependencies"
    assert not gateway & extras_only
