"""bench/validate_causal_graph.py --quick against the test stack: part 4 of issue 17 on a
few images, through the real service (graphs) and the served weights (ablations)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "validate_causal_graph.py"


def test_the_causal_graph_table_on_a_few_images(live_stack, tmp_path):
    command = [sys.executable, str(SCRIPT), "--quick", "--target", live_stack.gateway]
    finished = subprocess.run(
        [*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert (tmp_path / "causal_graph.json").is_file(), finished.stderr[-3000:]
    data = json.loads((tmp_path / "causal_graph.json").read_text())
    assert "## Checks" in (tmp_path / "causal_graph.md").read_text()
    # The exit code says whether every gating check held, whatever three images gave.
    gating = [c for c in data["checks"] if not c["informational"]]
    assert finished.returncode == (0 if all(c["passed"] for c in gating) else 1), finished.stderr[
        -3000:
    ]
    calibration = data["calibration"]["calibration"]
    # synth_patch's dead channels of features.2, silent on both images: never significant.
    assert calibration["curves"] >= 2 * 10 and calibration["significant"] == 0
    assert calibration["noise_null_ks_greater_p_value"] > 0.05
    faithfulness = data["faithfulness"]["faithfulness"]
    assert sorted(faithfulness) == ["synth_hue", "synth_patch"]
    for found in faithfulness.values():
        assert found["images"] == 3 and found["clean_accuracy"] == 1.0
        # Mean-ablating the graph's top-10 nodes lowers the target's margin more than ten
        # random channels do, on average over the images.
        drops = found["margin_drops"]
        assert sum(drops["graph"]["10"]) > sum(drops["random"]["10"])
    for found in data["faithfulness"]["stability"].values():
        assert all(0.0 <= j <= 1.0 for j in found["graph_jaccard"])
        assert found["same_target"] == 1.0
    repairs = data["repair"]["repair"]
    assert sorted(repairs) == ["synth_hue", "synth_patch"]
    for found in repairs.values():
        assert found["before"]["shortcut_rate"] > 0.7
        # At most floor(0.05 * 112) channels; none only with a warning that says why.
        assert 0 <= found["channels"] <= 5
        assert found["channels"] > 0 or found["warnings"]
        assert len(found["random"]) == (5 if found["channels"] else 0)
    blocks = data["blocks"]["blocks"]
    assert {b["layer"] for found in blocks.values() for b in found} == {
        "features.0",
        "features.1",
        "features.2",
    }
