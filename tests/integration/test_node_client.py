"""The TypeScript/Node client's own tests (client/node/test/) against the session's stack: how
`make test` runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

NODE_CLIENT = Path(__file__).resolve().parents[2] / "client" / "node"


def test_the_node_client_passes_its_tests_against_the_live_service(live_stack):
    npm = shutil.which("npm")
    assert npm, "npm is not on PATH: the Node client needs Node 20 and npm"
    assert (NODE_CLIENT / "node_modules").is_dir(), "client/node is not installed: run make setup"
    finished = subprocess.run(
        [npm, "test"],
        cwd=NODE_CLIENT,
        env={**os.environ, "PROPSCOPE_TARGET": live_stack.gateway},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, f"npm test failed:\n{finished.stdout}\n{finished.stderr}"
