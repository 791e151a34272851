"""Generates the gRPC stubs from the contract whenever the package is built; an sdist carries a
copy of the contract (protos/) and generate_stubs.py, so that it builds anywhere."""

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

sys.path.insert(0, str(Path(__file__).parent))
from generate_stubs import CONTRACT_PARTS, contract_dir, generate  # noqa: E402


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate()
        super().run()


class SdistWithContract(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        for part in CONTRACT_PARTS:
            shutil.copytree(contract_dir() / part, Path(base_dir) / "protos" / part)


setup(cmdclass={"build_py": BuildWithStubs, "sdist": SdistWithContract})
