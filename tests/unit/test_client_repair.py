"""propscope.repair on a temporary model repository: version N+1 is a copy of N plus
propscope_ablation.json, refused when it cannot be served beside N; Triton's load request
against a local HTTP server standing in for Triton's endpoint."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from propscope.repair import (
    ABLATION_FILE,
    RepairError,
    check_version_policy,
    load_model,
    write_repaired_version,
)

ALL = 'name: "synth_hue"\nbackend: "python"\nversion_policy: { all { } }\nmax_batch_size: 8\n'
CHANNELS = [{"layer": "features.1", "channel": 7, "value": 0.125}]


def repository(tmp_path: Path, config: str = ALL) -> Path:
    model = tmp_path / "synth_hue"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text("# the model\n")
    (model / "1" / "weights").mkdir()
    (model / "1" / "weights" / "w.pt").write_bytes(b"\x00\x01")
    (model / "config.pbtxt").write_text(config)
    return tmp_path


def test_the_new_version_is_a_copy_plus_the_ablation(tmp_path):
    root = repository(tmp_path)
    new = write_repaired_version(root, "synth_hue", 1, CHANNELS, "propscope repair: hue")
    assert new == root / "synth_hue" / "2"
    assert (new / "model.py").read_text() == "# the model\n"
    assert (new / "weights" / "w.pt").read_bytes() == b"\x00\x01"
    assert json.loads((new / ABLATION_FILE).read_text()) == {
        "channels": CHANNELS,
        "source": "propscope repair: hue",
    }
    assert not (root / "synth_hue" / "1" / ABLATION_FILE).exists()  # N untouched
    assert sorted(p.name for p in (root / "synth_hue").iterdir()) == ["1", "2", "config.pbtxt"]


def test_a_repair_of_a_repaired_version_keeps_its_channels(tmp_path):
    root = repository(tmp_path)
    write_repaired_version(root, "synth_hue", 1, CHANNELS, "first")
    again = [
        {"layer": "features.1", "channel": 7, "value": 0.5},
        {"layer": "features.2", "channel": 1, "value": 0.0},
    ]
    new = write_repaired_version(root, "synth_hue", 2, again, "second")
    ablation = json.loads((new / ABLATION_FILE).read_text())
    assert ablation["channels"] == again  # channel 7 takes the new value, once
    assert ablation["source"] == "first; second"


def test_refusals_write_nothing(tmp_path):
    root = repository(tmp_path)
    (root / "synth_hue" / "2").mkdir()
    with pytest.raises(RepairError, match="synth_hue/2 exists already"):
        write_repaired_version(root, "synth_hue", 1, CHANNELS, "")
    with pytest.raises(RepairError, match="no version 5 of synth_hue"):
        write_repaired_version(root, "synth_hue", 5, CHANNELS, "")
    with pytest.raises(RepairError, match="names no channel"):
        write_repaired_version(root, "synth_hue", 2, [], "")
    other = repository(tmp_path / "other", config='name: "synth_hue"\nbackend: "python"\n')
    with pytest.raises(RepairError, match=r"version_policy: \{ all \{ \} \}"):
        write_repaired_version(other, "synth_hue", 1, CHANNELS, "")
    assert sorted(p.name for p in (other / "synth_hue").iterdir()) == ["1", "config.pbtxt"]


@pytest.mark.parametrize(
    ("policy", "versions", "served"),
    [
        ("version_policy: { all { } }", [1], True),
        ("version_policy { all: {} }  # every version", [1], True),
        ("", [1], False),
        ("version_policy: { latest { num_versions: 1 } }", [1], False),
        ("version_policy: { latest { num_versions: 2 } }", [1], True),
        ("version_policy: { latest { num_versions: 2 } }", [1, 3], False),
        ("version_policy: { specific { versions: [1, 2] } }", [1], True),
        ("version_policy: { specific { versions: 1 } }", [1], False),
        ("# version_policy: { all { } }", [1], False),
    ],
)
def test_version_policy_must_serve_both_versions(policy, versions, served):
    config = f'name: "m"\n{policy}\n'
    if served:
        check_version_policy(config, 1, versions)
    else:
        with pytest.raises(RepairError, match="would not serve versions 1 and 2 together"):
            check_version_policy(config, 1, versions)


class _Triton(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.paths.append(self.path)
        self.rfile.read(int(self.headers["Content-Length"]))
        refused = "unknown" in self.path
        self.send_response(400 if refused else 200)
        self.end_headers()
        self.wfile.write(b'{"error":"failed to load \'unknown\'"}' if refused else b"")

    def log_message(self, *args: object) -> None:
        pass


def test_load_posts_to_tritons_repository_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Triton)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        load_model(url, "synth_hue")
        assert _Triton.paths == ["/v2/repository/models/synth_hue/load"]
        with pytest.raises(RepairError, match="Triton refused to load unknown .400"):
            load_model(url, "unknown")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RepairError, match="cannot reach Triton at"):
        load_model(url, "synth_hue", timeout=5)
