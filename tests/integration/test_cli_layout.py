"""The CLI as a user sees it on the live stack: its output in a real terminal (tmux) at 80 and
120 columns with nothing cut, exit code 3 for a failed property, the pre-flight's did-you-mean
before any work, the progress lines without a terminal, and --report's thumbnails (path images
the server shrinks), served version and duration."""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import propscope
from tests.integration.conftest import SAMPLE, inference_count, png

HUE = "object_hue=procedural:operation=hue,region=object"
# Long enough that the explain table needs more than 80 columns (a block per row there).
LONG = "background_brightness_of_the_scene=procedural:operation=brightness,region=background"
CLI = [sys.executable, "-m", "propscope"]


def _run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *arguments], capture_output=True, text=True, timeout=120)


def _in_terminal(arguments: list[str], width: int, tmp_path: Path) -> tuple[str, int]:
    """What the command prints to a ``width``-column terminal (stdout, wrapped lines joined
    back: a line wider than the terminal shows as such) and its exit code. Its own tmux
    server, so no other session's environment or windows interfere."""
    name = f"propscope-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", name, "-f", "/dev/null"]
    exit_file = tmp_path / f"{name}.rc"
    command = (
        f"env -u COLUMNS -u LINES {shlex.join([*CLI, *arguments])} 2>/dev/null;"
        f" echo $? > {exit_file}; tmux -L {name} wait-for -S {name}-ran;"
        f" tmux -L {name} wait-for {name}-read"
    )
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", name, "-x", str(width), "-y", "50", command],
        check=True,
    )
    try:
        subprocess.run([*tmux, "set-option", "-t", name, "history-limit", "5000"], check=True)
        subprocess.run([*tmux, "wait-for", f"{name}-ran"], check=True, timeout=180)
        screen = subprocess.run(
            [*tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    return screen, int(exit_file.read_text())


def _cells(screen: str, model: str, prop: str) -> dict[str, str]:
    """The score, p-value and Δp the screen shows for ``prop`` of ``model``, from its table row
    or its block (name alone on a line, then ``label value`` items)."""
    section = screen.split(f"propscope explain: {model} ", 1)[1].split("propscope explain:")[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [prop])
    tokens = lines[start].split()
    if len(tokens) > 1:  # a table row
        return dict(zip(("score", "p-value", "Δp"), tokens[1:4], strict=True))
    items = []  # the block's indented lines, up to the next row's name
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        items.append(line)
    block = " ".join(items)
    return {
        label: re.search(rf"(?:^|\s){re.escape(label)} (\S+)", block).group(1)
        for label in ("score", "p-value", "Δp")
    }


def _same_number(shown: str, value: float, digits: int) -> bool:
    return abs(float(shown) - value) <= 0.5 * 10 ** (1 - digits) * abs(value)


@pytest.mark.parametrize("width", [80, 120])
def test_explain_in_a_terminal_cuts_no_number_or_name(live_stack, tmp_path, width):
    arguments = ["explain", str(SAMPLE), "--target", live_stack.gateway, "-m", "synth_unbiased"]
    arguments += ["-m", "synth_hue", "-p", HUE, "-p", LONG, "--steps", "8"]
    found = _run(*arguments, "--json")
    assert found.returncode == 0, found.stderr
    results = [json.loads(line) for line in found.stdout.splitlines()]
    results = [e for e in results if e["event"] == "PropertyResult"]
    screen, code = _in_terminal(arguments, width, tmp_path)
    assert code == 0, screen
    lines = screen.rstrip("\n").splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width, screen
    assert "…" not in screen and "waiting" not in screen
    # The table when every cell fits on one line, else a block per property.
    headers = [line for line in lines if line.split()[:2] == ["property", "score"]]
    assert len(headers) == (2 if width == 120 else 0), screen
    assert len(results) == 4
    for result in results:
        cells = _cells(screen, result["model"], result["property_name"])
        assert _same_number(cells["score"], result["score"], 4), (cells, result)
        assert _same_number(cells["p-value"], result["p_value"], 2), (cells, result)
        change = result["probability_change"]
        if cells["Δp"] == "<0.01":
            assert 0 < change < 0.005
        else:
            assert abs(float(cells["Δp"]) - change) <= 0.005


@pytest.mark.parametrize("width", [80, 120])
def test_models_in_a_terminal_shows_every_name_and_parameter_whole(live_stack, tmp_path, width):
    listed = _run("models", "--target", live_stack.gateway, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    infos = [json.loads(line) for line in listed.stdout.splitlines()]
    screen, code = _in_terminal(["models", "--target", live_stack.gateway], width, tmp_path)
    assert code == 0, screen
    assert max(len(line.rstrip()) for line in screen.splitlines()) <= width, screen
    assert "…" not in screen
    tokens = set(screen.split())
    for info in infos:
        assert info["name"] in tokens, info["name"]
        for parameter in info["editor_parameters"]:
            assert f"{parameter['name']}={parameter['default_value']}" in tokens, parameter
    has_header = any(
        line.split()[:3] == ["name", "role", "versions"] for line in screen.splitlines()
    )
    assert has_header == (width == 120), screen


def test_a_failed_property_exits_3_and_the_others_are_reported(live_stack, tmp_path):
    path = tmp_path / "grey.png"
    path.write_bytes(png(np.full((64, 64, 3), 128, np.uint8)))
    finished = _run(
        "explain", str(path), "--target", live_stack.gateway, "-m", "synth_hue",
        "-p", "hue=procedural:operation=hue", "-p", "bright=procedural:operation=brightness",
        "--steps", "8", "--format", "plain",
    )  # fmt: skip
    assert finished.returncode == 3, finished.stderr
    lines = {
        line.split()[2]: line for line in finished.stdout.splitlines() if line.startswith("result ")
    }
    # A hue rotation of a grey image changes nothing: that property fails, the other is scored.
    assert "status=FAILED_PRECONDITION" in lines["property=hue"]
    assert "status=OK" in lines["property=bright"] and "score=" in lines["property=bright"]
    assert "properties_failed=1" in finished.stdout


def test_a_model_typo_is_refused_with_a_suggestion_before_any_work(live_stack, triton):
    classified = inference_count(triton, "synth_hue")
    edited = inference_count(triton, "procedural")
    finished = _run(
        "explain", str(SAMPLE), "--target", live_stack.gateway, "-m", "synth_hue", "-m", "synth_hu",
        "-p", "hue=procedural:operation=hue,regoin=object", "--steps", "8", "--json",
    )  # fmt: skip
    assert finished.returncode == 2
    assert finished.stdout == ""  # not even the first model's plan
    assert "model 'synth_hu' is not served (did you mean 'synth_hue'?)" in finished.stderr
    assert "no parameter 'regoin' (did you mean 'region'?)" in finished.stderr
    assert inference_count(triton, "synth_hue") == classified
    assert inference_count(triton, "procedural") == edited


def test_without_a_terminal_progress_is_a_few_lines_per_property(live_stack):
    finished = _run(
        "explain", str(SAMPLE), "--target", live_stack.gateway, "-m", "synth_patch",
        "-p", HUE, "-p", "patch=procedural:operation=blend", "--steps", "8", "--seed", "4",
        "--no-progress",
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    for name in ("object_hue", "patch"):
        lines = [line for line in finished.stderr.splitlines() if f": {name}: " in line]
        edits = [re.search(r": (\d+)/(\d+) edits \(", line) for line in lines[:-1]]
        assert edits and all(edits), lines
        assert edits[-1].group(1) == edits[-1].group(2)  # the last one says all are done
        assert re.fullmatch(rf"propscope: {name}: done in \d+\.\d s", lines[-1]), lines
        assert len(lines) <= 5
    # The table on stdout, once its results exist: no bar, no placeholder row.
    assert "waiting" not in finished.stdout and "edits" not in finished.stdout


def test_path_images_come_shrunk_to_the_size_asked_for(client):
    image = png(np.full((96, 128, 3), 90, np.uint8))
    sizes = {}
    for max_side in (0, 40):
        events = client.explain(
            image, "synth_hue", ["b=procedural:operation=brightness"], steps=6, seed=2,
            return_path_images=True, path_image_max_side_px=max_side,
        )  # fmt: skip
        (result,) = [e for e in events if isinstance(e, propscope.PropertyResult)]
        sizes[max_side] = {Image.open(io.BytesIO(p)).size for p in result.samples[0].path_images}
    assert sizes == {0: {(128, 96)}, 40: {(40, 30)}}


def test_a_report_has_thumbnails_the_served_version_and_the_duration(live_stack, tmp_path):
    image = tmp_path / "large.png"
    image.write_bytes(png(np.full((480, 480, 3), 200, np.uint8)))
    report = tmp_path / "report.html"
    finished = _run(
        "explain", str(image), "--target", live_stack.gateway, "-m", "synth_hue",
        "-p", "b=procedural:operation=brightness", "--steps", "6", "--report", str(report),
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    html = report.read_text()
    assert re.search(r"took \d[\d.]* s\.", html), "the report's duration is missing"
    assert re.search(r"synth_hue</td>\s*<td>1</td>", html), "no served version"
    strip = html.split("Path of <code>")[1]
    thumbnails = re.findall(r'<img src="data:image/png;base64,([^"]+)"', strip)
    assert len(thumbnails) >= 2
    for encoded in thumbnails:
        assert max(Image.open(io.BytesIO(base64.b64decode(encoded))).size) <= 160
