"""Every third-party import is a declared dependency of the distribution and part that runs it:
in server/propscope_server the gateway's in [project] dependencies and Triton-side model code
(triton_models/, synthetic/) in the `triton` extra; in tools/propscope_dev (the dev tooling)
its own dependencies. The gateway depends on the stubs (propscope-api), never on the client SDK
(propscope) or the dev tooling. The clean-venv install (tests/integration/test_install.py)
proves the gateway starts; this finds imports on paths a start does not take."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# The repository's distributions: their folder and the package each ships.
DISTRIBUTIONS = {
    "propscope-api": (ROOT / "protos" / "python", "propscope.v1"),
    "propscope": (ROOT / "client", "propscope"),
    "propscope-server": (ROOT / "server", "propscope_server"),
    "propscope-dev": (ROOT / "tools", "propscope_dev"),
}
# Packages that are not distributions: the Triton python backend provides this module itself.
PROVIDED_BY_TRITON = {"triton_python_backend_utils"}
# Each part: its distribution, the top-level folders of its package that belong to it (empty: the
# rest), and the extras it may import from.
AREAS = {
    "gateway": ("propscope-server", (), ()),
    "triton_models": ("propscope-server", ("triton_models",), ("triton",)),
    "synthetic": ("propscope-server", ("synthetic",), ("triton",)),
    "dev": ("propscope-dev", (), ()),
}


@cache
def _project(distribution: str) -> dict:
    folder = DISTRIBUTIONS[distribution][0]
    return tomllib.loads((folder / "pyproject.toml").read_text())["project"]


def _requirements(distribution: str, extras: tuple[str, ...]) -> set[str]:
    """Names of the base requirements plus those of the extras, and of what the repository's own
    distributions among them declare (with the extras they name)."""
    pending = [(distribution, extras)]
    names: set[str] = set()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while pending:
        name, wanted = pending.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        project = _project(name)
        requirements = [Requirement(r) for r in project["dependencies"]]
        for extra in wanted:
            requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
        for requirement in requirements:
            required = canonicalize_name(requirement.name)
            names.add(required)
            if required in DISTRIBUTIONS:
                pending.append((required, tuple(sorted(requirement.extras))))
    return names


def _package_dir(distribution: str) -> Path:
    folder, package = DISTRIBUTIONS[distribution]
    return folder.joinpath(*package.split("."))


def _area(distribution: str, path: Path) -> str:
    parts = path.relative_to(_package_dir(distribution)).parts
    areas = [(area, dirs) for area, (owner, dirs, _) in AREAS.items() if owner == distribution]
    return next(
        (area for area, dirs in areas if parts[0] in dirs),
        next(area for area, dirs in areas if not dirs),
    )


def _third_party_imports(path: Path, own_package: str) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return {
        module
        for module in modules
        if module.split(".")[0] not in sys.stdlib_module_names | {own_package}
    }


@cache
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distribution(module: str) -> str:
    """The distribution that ships the module: one of the repository's by its package, else the
    installed one (namespace packages such as google.* are shared by several: the one with the
    module's files)."""
    ours = [
        (package, name)
        for name, (_, package) in DISTRIBUTIONS.items()
        if module == package or module.startswith(f"{package}.")
    ]
    if ours:
        return max(ours)[1]
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
    for distribution in {owner for owner, _, _ in AREAS.values()}:
        package = DISTRIBUTIONS[distribution][1]
        for path in sorted(_package_dir(distribution).rglob("*.py")):
            for module in _third_party_imports(path, package) - PROVIDED_BY_TRITON:
                where = str(path.relative_to(ROOT))
                found[_area(distribution, path)].setdefault(module, set()).add(where)
    return found


@pytest.mark.parametrize("area", list(AREAS))
def test_every_import_is_a_declared_dependency(area: str) -> None:
    imports = _imports_by_area()[area]
    assert imports, (
        f"no third-party imports found for {area}: is the scan looking in the right place?"
    )
    distribution, _, extras = AREAS[area]
    declared = _requirements(distribution, extras)
    undeclared = {
        module: (dependency, sorted(files))
        for module, files in imports.items()
        if (dependency := _distribution(module)) not in declared
    }
    assert not undeclared, (
        f"imported in {area} but not declared by {distribution} "
        f"(module: distribution, files): {undeclared}"
    )


def test_the_gateway_does_not_need_the_extras_the_client_or_the_dev_tooling() -> None:
    """torch, diffusers... are declared for Triton only, and the SDK and the dev tooling are not
    the gateway's: the gateway image stays small, and no gateway module may import them."""
    gateway = {_distribution(module) for module in _imports_by_area()["gateway"]}
    assert "propscope-api" in gateway, "the gateway no longer imports the stubs?"
    extras_only = _requirements("propscope-server", ("triton",)) - _requirements(
        "propscope-server", ()
    )
    assert extras_only, "the triton extra declares nothing beyond the base dependencies"
    assert not gateway & (extras_only | {"propscope", "propscope-dev"})
    assert not _requirements("propscope-server", ()) & {"propscope", "propscope-dev"}


def test_grpcio_lower_bounds_admit_only_runtimes_the_stubs_accept() -> None:
    """The stubs refuse a grpcio older than the grpcio-tools that generated them."""
    stub = (ROOT / "protos/python/propscope/v1/explain_pb2_grpc.py").read_text()
    generated = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub).group(1))
    bounds = {
        distribution: requirement.specifier
        for distribution in DISTRIBUTIONS
        for requirement in map(Requirement, _project(distribution)["dependencies"])
        if requirement.name == "grpcio"
    }
    assert "propscope-api" in bounds
    for distribution, specifier in bounds.items():
        lowest = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
        assert lowest and min(lowest) >= generated, f"{distribution}: grpcio{specifier}"
    pinned = re.search(r"^grpcio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert all(specifier.contains(pinned.group(1)) for specifier in bounds.values())
