"""Screenshots of HTML files with Debian's headless Chromium (``make setup`` installs it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


def screenshot_html(
    html: Path, png: Path, width: int = 1280, height: int = 4000, timeout_s: float = 60
) -> None:
    """Render ``html`` in a ``width`` x ``height`` viewport and save that viewport as ``png``.

    Raises RuntimeError when chromium is missing or writes no screenshot.
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError(
            "chromium is not installed: `make setup` installs it "
            "(deploy/scripts/install-system-deps.sh)"
        )
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="propscope-chromium-") as profile:
        run = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                f"--screenshot={png.resolve()}",
                html.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    if run.returncode != 0 or not png.is_file():
        raise RuntimeError(
            f"chromium exited with {run.returncode} and wrote no {png}:\n{run.stderr[-2000:]}"
        )
