"""The consistency SDK's fold of the stream and `propscope consistency`'s output and
refusals, without a server (what a new user hit trying it)."""

from __future__ import annotations

from typer.testing import CliRunner

from propscope import cli  # first: _cli_consistency imports the cli module
from propscope._cli_consistency import print_consistency
from propscope._cli_output import OutputFormat
from propscope._consistency import ConsistencyCollector, ConsistencyModel, ConsistencyResult
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


def test_the_title_wraps_at_the_terminals_width_not_the_tables(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    models = tuple(
        ConsistencyModel("synth_patch_folds", str(version), (0, 1), None) for version in (1, 2)
    )
    result = ConsistencyResult("r1", models, (), 10, False, 0, 0, 0.0, ())
    print_consistency(result, OutputFormat.TABLE)
    title = "propscope consistency: synth_patch_folds:1, synth_patch_folds:2, 10 images"
    assert title in capsys.readouterr().out.splitlines()


def test_an_empty_folder_is_refused_in_one_line_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        cli.app, ["consistency", str(tmp_path / "empty"), "-m", "a", "-m", "b", "-e", "random"]
    )
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "IMAGE" in result.output and "holds no image" in result.output
