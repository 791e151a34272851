"""What the scaled-out stack checks before starting anything: its model repository of
links (a classifier finds its weights through the link) and the sizes it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from propscope_dev import main, scale_out
from propscope_dev.stack import StackStartError
from propscope_dev.triton_launcher import config_fields


def test_the_repository_links_each_model_and_a_classifier_finds_its_weights(
    tmp_path: Path,
) -> None:
    repository = scale_out.model_repository(tmp_path, ("procedural", "synth_hue"))
    assert sorted(p.name for p in repository.iterdir()) == ["procedural", "synth_hue"]
    folder = repository / "synth_hue"
    text = (folder / "config.pbtxt").read_text()
    assert config_fields(text, ("name",)) == {"name": "synth_hue"}
    # The weights path is relative to the model's folder (../../weights/...): through the
    # link it must reach the real file, as the classifier's loader resolves it.
    relative = text.split('key: "weights" value: { string_value: "')[1].split('"')[0]
    assert relative.startswith("..") and (folder / relative).is_file()
    scale_out.model_repository(tmp_path, ("procedural", "synth_hue"))  # again: no error


def test_an_unknown_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(StackStartError, match="no model 'nonexistent'"):
        scale_out.model_repository(tmp_path, ("nonexistent",))


def test_a_cluster_of_fewer_than_three_masters_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    with pytest.raises(StackStartError, match="redis_nodes=2"):
        scale_out.up_scaled(tmp_path, redis_nodes=2)
    assert not (tmp_path / "models").exists()


def test_up_scaled_out_without_a_cluster_names_the_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(main.app, ["up", "--tritons", "2", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--redis-cluster 3" in result.output


def test_up_scaled_out_refuses_the_options_it_would_ignore(tmp_path: Path) -> None:
    """--port 52500 used to start gateways on other, free ports without a word."""
    scaled = ["up", "--tritons", "2", "--redis-cluster", "3", "--run-dir", str(tmp_path)]
    result = CliRunner().invoke(main.app, [*scaled, "--port", "52500", "--no-redis"])
    assert result.exit_code == 2
    assert "--port 52500, --no-redis: not for a scaled-out stack" in result.output
    assert not (tmp_path / "models").exists()
