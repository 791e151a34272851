"""Generates the gRPC stubs from ../ (the contract) whenever the package is built."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).parent))
from generate_stubs import generate  # noqa: E402


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
