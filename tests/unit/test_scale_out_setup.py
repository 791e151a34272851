"""What the scaled-out stack checks before starting anything: its model repository of
links (a classifier finds its weights through the link) and the sizes it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from propscope_dev import main, scale_out
from propscope_dev.stack import StackStartError
from propscope_dev.triton_launcher import TritonPorts, config_fields


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


def recorded_stack(run_dir: Path) -> scale_out.ScaledStack:
    """A scaled stack as scaled.json records it, with nothing running."""
    ports = [TritonPorts(41000 + i, 41010 + i, 41020 + i) for i in range(2)]
    nodes = ["127.0.0.1:42000", "127.0.0.1:42001", "127.0.0.1:42002"]
    return scale_out.ScaledStack(
        gateways=["127.0.0.1:43000"],
        gateway_metrics=["http://127.0.0.1:43001/metrics"],
        tritons=[f"127.0.0.1:{p.grpc}" for p in ports],
        triton_metrics=[f"http://127.0.0.1:{p.metrics}/metrics" for p in ports],
        redis_nodes=nodes,
        redis_url=f"redis+cluster://{nodes[0]}",
        triton_http=[f"http://127.0.0.1:{p.http}" for p in ports],
        run_dir=run_dir,
        _triton_ports=ports,
        _redis_bus_ports=[42100, 42101, 42102],
        _tritons=[scale_out._Process(f"triton-{i}", run_dir / "t.log") for i in range(2)],
        _redis=[scale_out._Process(f"redis-{i}", run_dir / "r.log") for i in range(3)],
        _gateways=[scale_out._Process("gateway", run_dir / "g.log")],
    )


def test_scaled_json_holds_what_a_restart_of_one_process_needs(tmp_path: Path) -> None:
    recorded_stack(tmp_path).save()
    loaded = scale_out.load_scaled(tmp_path, timeout_s=5.0)
    assert loaded is not None
    assert loaded.tritons == ["127.0.0.1:41010", "127.0.0.1:41011"]
    assert loaded._triton_ports[1] == TritonPorts(41001, 41011, 41021)
    assert loaded._redis_bus_ports == [42100, 42101, 42102]
    assert loaded.models == scale_out.SCALE_OUT_MODELS
    assert loaded.pids() == []  # nothing recorded runs


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["stop", "triton", "2"], "triton 2: the stack has 2 (0 to 1)"),
        (["start", "redis", "3"], "redis 3: the stack has 3 (0 to 2)"),
        (["stop", "gateway", "0"], "'gateway': name triton or redis"),
    ],
)
def test_scaled_refuses_a_process_the_stack_lacks(tmp_path: Path, args, named) -> None:
    recorded_stack(tmp_path).save()
    result = CliRunner().invoke(main.app, ["scaled", *args, "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert named in result.output


def test_scaled_without_a_stack_says_how_to_start_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main.app, ["scaled", "stop", "triton", "0", "--run-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert f"no scaled-out stack in {tmp_path}" in result.output
