"""The consistency SDK's fold of the stream and `propscope consistency`'s output and
refusals, without a server (what a new user hit trying it)."""

from __future__ import annotations

from typer.testing import CliRunner

from propscope import cli  # first: _cli_consistency imports the cli module
from propscope._consistency import ConsistencyCollector
from propscope.v1 import consistency_pb2

SAME_MODEL = "models[0] and models[1] are the same model 'synth_hue' version 1: ..."


def test_a_warning_of_the_plan_sent_in_accepted_and_done_is_kept_once():
    collector = ConsistencyCollector("r1")
    collector.add(
        consistency_pb2.EvaluateConsistencyEvent(
            accepted=consistency_pb2.ConsistencyAccepted(image_count=2, warnings=[SAME_MODEL])
        )
    )
    collector.add(
        consistency_pb2.EvaluateConsistencyEvent(
            done=consistency_pb2.ConsistencyDone(warnings=[SAME_MODEL, "another"])
        )
    )
    assert collector.result().warnings == (SAME_MODEL, "another")


def test_an_empty_folder_is_refused_in_one_line_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        cli.app, ["consistency", str(tmp_path / "empty"), "-m", "a", "-m", "b", "-e", "random"]
    )
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "IMAGE" in result.output and "holds no image" in result.output
