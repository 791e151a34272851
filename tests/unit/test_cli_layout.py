"""The CLI's layout (nothing cut at any width), plain lines, progress lines and --version,
without a server."""

import dataclasses
import importlib.metadata
import io
import math
import re

import grpc
import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from propscope import Accepted, Done, Progress, PropertyResult, PropscopeError
from propscope._attribution import Attribution, Evaluation, MetricResult
from propscope._cli_layout import Column, logfmt, number, print_rows
from propscope._cli_output import ExplainOutput, OutputFormat, print_evaluation
from propscope._cli_progress import explain_progress
from propscope._images import AlphaDroppedWarning, encode_image
from propscope.cli import _attribution_summary, _unreachable_hint, app
from propscope.v1 import attribution_pb2
from propscope_server.backends.preprocessing import detection_warning
from propscope_server.regions import MaskEstimate

COLUMNS = (
    Column("property"),
    Column("score", numeric=True),
    Column("decision"),
    Column("settings", wraps=True),
)
ROWS = [
    ["background_brightness_of_the_scene", "9.342e-06", Text("Δp too small"), "grid 8, N 32"],
    ["hue", "0.09091", "relevant", "grid 8\nN 32\nestimator jansen"],
]


def _render(width: int) -> str:
    buffer = io.StringIO()
    print_rows(Console(file=buffer, width=width), "title", COLUMNS, ROWS)
    return buffer.getvalue()


@pytest.mark.parametrize("width", [40, 60, 80, 120, 200])
def test_every_cell_is_whole_at_any_width(width):
    out = _render(width)
    assert max(len(line) for line in out.splitlines()) <= width
    assert "…" not in out
    words = out.split()
    for token in ("background_brightness_of_the_scene", "9.342e-06", "0.09091", "jansen"):
        assert token in words, (token, out)
    assert re.search(r"Δp too small", out)


def test_a_table_when_it_fits_else_a_block_per_row():
    wide = _render(200).splitlines()
    assert wide[1].split() == ["property", "score", "decision", "settings"]
    assert wide[3].split()[:3] == ["background_brightness_of_the_scene", "9.342e-06", "Δp"]
    narrow = _render(60).splitlines()
    assert narrow[0] == "title"
    assert narrow[1] == "background_brightness_of_the_scene"
    assert narrow[2].split()[:2] == ["score", "9.342e-06"]
    # A wrapping column starts its own line; its further lines are items of their own.
    assert narrow[3].strip() == "settings grid 8, N 32"
    assert "settings grid 8  N 32  estimator jansen" in _render(60)


def test_a_block_line_longer_than_the_terminal_continues_indented():
    """A long item (a model's methods) is broken at a space and indented under its block, not
    left to the terminal to wrap at column 0; an empty title prints no line."""
    methods = "methods: propgrad, sobol, rise, deletion, insertion, mu_fidelity, causal_graph"
    buffer = io.StringIO()
    print_rows(Console(file=buffer, width=40), "", COLUMNS[:2] + (Column("details"),),
               [["synth_hue", "1", methods]])  # fmt: skip
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "synth_hue"
    assert all(len(line) <= 40 for line in lines)
    assert lines[2].startswith("  details methods: propgrad,")
    assert all(line.startswith("    ") for line in lines[3:]), lines
    assert " ".join(" ".join(lines[2:]).split()) == f"details {methods}"


def test_numbers_are_whole_and_bounded():
    assert number(9.342e-06) == "9.342e-06"
    assert number(0.0909090909) == "0.09091"
    assert number(-123456789.0) == "-1.235e+08"
    assert number(math.nan) == number(math.inf) == number(None) == "n/a"
    assert max(len(number(v)) for v in (-1.23456e-300, 1e300, -0.000123456)) <= 11


def test_logfmt_quotes_only_what_needs_it():
    line = logfmt(
        [("a", "x"), ("b", "two words"), ("c", 'say "hi"'), ("d", None), ("e", True), ("f", 0.1)]
    )
    assert line == 'a=x b="two words" c="say \\"hi\\"" e=yes f=0.1'


def _result(name: str, code: grpc.StatusCode = grpc.StatusCode.OK) -> PropertyResult:
    return PropertyResult(
        request_id="r", property_name=name, status_code=code, error=None, score=0.1,
        score_per_unit_strength=0.0, score_ci_low=0.0, score_ci_high=0.0, p_value=0.01,
        significant=True, prediction_flipped=False, flip_rate=0.0, mean_signed_gradient=0.0,
        probability_change=0.5, relevant=True, pearson_correlation=None,
        mutual_information=None, target_class=0, samples=(), cache_hits=0, cache_misses=1,
    )  # fmt: skip


def _accepted(*names: str) -> Accepted:
    return Accepted(
        request_id="r", property_names=names, samples=2, steps=20, permutations=100,
        alpha=0.01, model_version="1", planned_edits=40, planned_classifications=42,
        min_probability_change=0.05,
    )  # fmt: skip


def test_progress_log_lines_per_quarter_and_result(capsys):
    with explain_progress("log", several_models=False) as shown:
        shown.update("m", _accepted("hue", "old"))
        for done in range(4, 41, 4):  # a gateway that streams every 4 of 40 edits
            shown.update("m", Progress("r", "edit", "hue", done, 40))
        shown.update("m", Progress("r", "classify", "hue", 42, 42))
        shown.update("m", _result("hue"))
        shown.update("m", Progress("r", "edit", "old", 2, 2))  # an older gateway: one event
        shown.update("m", _result("old", grpc.StatusCode.FAILED_PRECONDITION))
    lines = capsys.readouterr().err.splitlines()
    hue = [line for line in lines if line.startswith("propscope: hue: ")]
    assert [line.split()[2] for line in hue[:4]] == ["12/40", "20/40", "32/40", "40/40"]
    assert "ETA" in hue[0] and hue[4].startswith("propscope: hue: done in ")
    assert len(hue) == 5
    old = [line for line in lines if line.startswith("propscope: old: ")]
    assert old[0].startswith("propscope: old: 2/2 edits (100%")
    assert old[1].startswith("propscope: old: failed (FAILED_PRECONDITION) in ")
    assert len(old) == 2


def test_progress_bar_follows_edits_and_stops_at_the_result():
    with explain_progress("bar", several_models=True) as shown:
        shown.update("m", _accepted("hue"))
        shown.update("m", Progress("r", "edit", "hue", 10, 40))
        (task,) = shown._bar.tasks
        assert (task.completed, task.total, task.description) == (10, 40, "hue")
        shown.update("m", Progress("r", "edit", "hue", 40, 80))  # an adaptive path lengthened
        shown.update("m", Progress("r", "classify", "hue", 82, 82))
        assert task.total == 80 and task.fields["state"] == "classifying"
        shown.update("m", _result("hue"))
        assert task.finished and task.fields["state"] == "done"


@pytest.mark.parametrize(
    "names", [("background_brightness_of_the_scene", "hue"), ("hue",), ("x" * 90,)]
)
def test_progress_rows_keep_counts_and_times_whole_at_80_columns(names):
    """Only a long name gives way (an ellipsis); state, edits done / total, elapsed and ETA
    are whole on each row's one line."""
    with explain_progress("bar", several_models=False) as shown:
        shown.update("synth_hue_fp32", _accepted(*names))
        for name in names:
            shown.update("synth_hue_fp32", Progress("r", "edit", name, 1000, 1280))
        shown.update("synth_hue_fp32", Progress("r", "classify", names[0], 1282, 1282))
        shown.update("synth_hue_fp32", _result(names[-1]))
        buffer = io.StringIO()
        Console(file=buffer, width=80).print(shown._bar.make_tasks_table(shown._bar.tasks))
    lines = buffer.getvalue().splitlines()
    assert len(lines) == len(names) and max(len(line) for line in lines) <= 80, lines
    for line, name in zip(lines, names, strict=True):
        shown_name = line.split()[0]
        assert shown_name == name or (
            shown_name.endswith("…") and name.startswith(shown_name[:-1])
        ), line
        assert re.search(
            r" (classifying|done) +\S* *(1000|1280)/1280 edits \d:\d\d:\d\d ETA "
            r"(\d:\d\d:\d\d|-:--:--)$",
            line,
        ), line


def test_version_names_the_client_and_the_api():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"propscope {importlib.metadata.version('propscope')} ")
    assert "propscope.v1" in result.stdout and "propscope-api " in result.stdout


def test_help_shows_the_property_syntax_examples_and_exit_codes_whole():
    result = CliRunner().invoke(app, ["explain", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert "--property NAME=EDITOR[@VERSION][:key=value,...][;REGION]" in result.stdout
    assert "propscope explain cat.png -m resnet50 -p 'hue=procedural:operation=hue'" in (
        result.stdout
    )
    assert "--min-probability-change" in result.stdout and "…" not in result.stdout
    assert re.search(r"^\s+3\s+explain: a property failed", result.stdout, re.MULTILINE)


def _done(total_ms: float = 100.0) -> Done:
    return Done(
        request_id="r", total_ms=total_ms, edit_ms=56.0, classify_ms=142.0, score_ms=3.0,
        cache_ms=1.0, properties_failed=0,
    )  # fmt: skip


def _explained(output_format: OutputFormat, finished: dict[str, list[str]]) -> ExplainOutput:
    """An ExplainOutput fed each model's plan (a, b, c), results in ``finished``'s order and
    Done, model after model."""
    output = ExplainOutput(output_format)
    for model, order in finished.items():
        output.event(model, _accepted("a", "b", "c"))
        for name in order:
            output.event(model, _result(name))
        output.event(model, _done())
        output.finish(model)
    return output


def test_plain_lines_come_in_request_order_whatever_order_results_finish_in(capsys):
    _explained(OutputFormat.PLAIN, {"m2": ["c", "a", "b"], "m1": ["b", "c", "a"]})
    lines = capsys.readouterr().out.splitlines()
    shown = [re.search(r"model=(\S+)(?: property=(\S+))?", line).groups() for line in lines]
    assert [line.split()[0] for line in lines] == ["result"] * 3 + ["done"] + ["result"] * 3 + [
        "done"
    ]
    assert shown == [
        ("m2", "a"), ("m2", "b"), ("m2", "c"), ("m2", None),
        ("m1", "a"), ("m1", "b"), ("m1", "c"), ("m1", None),
    ]  # fmt: skip


def test_the_timings_line_says_stage_times_are_summed_over_parallel_properties(capsys):
    _explained(OutputFormat.TABLE, {"m": ["a", "b", "c"]})
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "m: total 100 ms, edit 56 ms, classify 142 ms, score 3 ms (stage times summed over "
        "properties run in parallel); path cache 0 hits, 3 misses" in out
    ), out
    result = CliRunner().invoke(app, ["explain", "--help"], env={"COLUMNS": "80"})
    assert "summed over the properties run in parallel" in " ".join(result.stdout.split())


def _rgba_png(min_alpha: int) -> bytes:
    pixels = np.full((4, 4, 4), 255, np.uint8)
    pixels[0, 0] = (200, 10, 10, min_alpha)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_with_transparent_pixels_warns_that_its_alpha_is_dropped(tmp_path, recwarn):
    transparent = _rgba_png(0)
    webp = tmp_path / "cat.webp"
    Image.open(io.BytesIO(transparent)).save(webp, lossless=True)
    for image in (transparent, webp, Image.open(io.BytesIO(transparent))):
        with pytest.warns(AlphaDroppedWarning, match="alpha channel is dropped, not blended"):
            encode_image(image)
    assert encode_image(transparent) == transparent  # PNG bytes are still sent unchanged
    recwarn.clear()
    encode_image(_rgba_png(255))  # an alpha channel with every pixel opaque: nothing to say
    encode_image(b"\x89PNG\r\n\x1a\nnot decoded")  # the service names what is wrong with it
    assert not [w for w in recwarn if issubclass(w.category, AlphaDroppedWarning)]


def test_the_cli_says_on_stderr_that_an_image_loses_its_alpha(tmp_path):
    image = tmp_path / "logo.png"
    image.write_bytes(_rgba_png(0))
    result = CliRunner().invoke(
        app, ["attribute", str(image), "-m", "m", "--target", "127.0.0.1:1", "--timeout", "5"]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"propscope: warning: {image} has transparent pixels; the alpha channel is dropped, "
        "not blended"
    ), result.stderr


def test_every_command_summary_is_whole_in_the_top_level_help():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"})
    commands = result.stdout.split("Commands:")[1].split("Exit codes:")[0]
    summaries = [line for line in commands.splitlines() if line.strip()]
    assert [line.split()[0] for line in summaries] == [
        "explain", "attribute", "evaluate", "graph", "repair", "visualize", "models", "explore",
        "consistency", "interactions", "concepts", "review",
    ]  # fmt: skip
    assert not [line for line in summaries if line.endswith("...")], commands


@pytest.mark.parametrize("long_name", ["b", "background_brightness_of_the_scene_and_more"])
def test_piped_output_has_no_trailing_spaces_and_notes_stay_on_one_line(
    capsys, monkeypatch, long_name
):
    """Not a terminal (capsys) and no COLUMNS: each note and the timings line whole on its
    own line, however long, and no line of the table (or blocks) ends in the spaces rich
    pads cells with."""
    monkeypatch.delenv("COLUMNS", raising=False)
    warning = "the automatic object/background split is unreliable on this image " * 3
    output = ExplainOutput(OutputFormat.TABLE)
    output.event("m", _accepted("a", long_name, "c"))
    for name in ("c", "a", long_name):
        output.event("m", dataclasses.replace(_result(name), warnings=(warning.strip(),)))
    output.event("m", _done())
    output.finish("m")
    lines = capsys.readouterr().out.splitlines()
    assert lines and [line for line in lines if line != line.rstrip()] == [], lines
    assert f"a: warning: {warning.strip()}" in lines
    timings = [line for line in lines if line.startswith("m: total 100 ms")]
    assert len(timings) == 1 and timings[0].endswith("path cache 0 hits, 3 misses (request r)")


def test_piped_output_wraps_notes_at_words_when_columns_asks_for_a_width(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    warning = "the automatic object/background split is unreliable on this image " * 3
    output = ExplainOutput(OutputFormat.TABLE)
    output.event("m", _accepted("a"))
    output.event("m", dataclasses.replace(_result("a"), warnings=(warning.strip(),)))
    output.event("m", _done())
    output.finish("m")
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert f"a: warning: {warning.strip()}" in " ".join(out.split())


def test_an_unreachable_gateway_gets_a_hint_on_how_to_reach_one():
    result = CliRunner().invoke(app, ["models", "--target", "127.0.0.1:1", "--timeout", "5"])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("propscope: error: 127.0.0.1:1: UNAVAILABLE: "), line
    assert line.endswith(
        "; is the gateway running at 127.0.0.1:1? Start one with `make up` in the propscope "
        "checkout, or pass --target HOST:PORT (or set $PROPSCOPE_TARGET)"
    ), line
    # An UNAVAILABLE the gateway itself returns: it is running, the hint would mislead.
    sick = PropscopeError(grpc.StatusCode.UNAVAILABLE, "model 'resnet' is unavailable: reloading")
    assert _unreachable_hint(sick, "localhost:50051") == ""


def test_server_warnings_name_the_cli_syntax_not_request_fields(capsys):
    """The server's own sentences (so that a rewording there fails here): its region and
    output-kind advice reads as --property and --output-kind on the command line."""
    region = MaskEstimate(np.zeros((2, 2), bool), ("the 'object' covers 90% of the image",))
    detected = detection_warning("m", "logits")
    for output_format in (OutputFormat.TABLE, OutputFormat.PLAIN):
        output = ExplainOutput(output_format)
        output.event("m", dataclasses.replace(_accepted("a"), warnings=(detected,)))
        output.event("m", dataclasses.replace(_result("a"), warnings=(region.warning,)))
        output.finish("m")
        out = " ".join(capsys.readouterr().out.split())
        assert "Property." not in out and "model.preprocessing" not in out, out
        assert (
            "give the region as a mask or a box (a ;mask=FILE or ;box=LEFT,TOP,RIGHT,BOTTOM "
            "suffix of --property) instead" in out
        ), out
        assert "or pass --output-kind to be sure" in out, out


def test_plain_evaluation_keeps_every_warning_on_its_own_line(capsys):
    """A CI log reads the caveats too: plain output writes what the table notes under it."""
    metric = MetricResult(
        metric="insertion", value=0.5, settings="s", target_score="logit", forward_passes=11,
        warnings=("the area is high even for a random map",),
    )  # fmt: skip
    found = Evaluation(
        request_id="r", metrics=("insertion",), results=(metric,), model_version="1",
        planned_forward_passes=11, target_class=0, target_label="", target_score="logit",
        warnings=("the map was made for another size",),
    )  # fmt: skip
    print_evaluation("m", "img.png", found, OutputFormat.PLAIN)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("metric model=m metric=insertion value=0.5")
    assert lines[1:] == [
        'warning model=m message="the map was made for another size"',
        'warning model=m metric=insertion message="the area is high even for a random map"',
    ]


def _eva_attribution(guaranteed: bool) -> Attribution:
    grid = attribution_pb2.AttributionMap(height=2, width=2, values=[0.25, 0.5, 0.75, 1.0])
    accepted = attribution_pb2.AttributeAccepted(
        method="eva",
        eva=attribution_pb2.EvaOptions(
            grid_size=2,
            epsilon=8 / 255,
            bound=attribution_pb2.BOUND_METHOD_CROWN,
            hybrid_layer="" if guaranteed else "features.block_three.conv_two",
            samples=65536,
        ),
        target_class=7,
        target_label="a class label long enough to wrap the line it is on",
    )
    result = attribution_pb2.AttributionResult(
        map=grid,
        grid=grid,
        forward_passes=5,
        original_score=-1.234567e-05,
        target_class=7,
        eva=attribution_pb2.EvaResult(
            guaranteed=guaranteed,
            bound=attribution_pb2.BOUND_METHOD_CROWN,
            epsilon=8 / 255,
            hybrid_layer=accepted.eva.hybrid_layer,
            overlap_bound=-123456.789,
            adversary_class=912,
            adversary_label="another quite long adversary label",
            sampled_overlap=-9.87654321e-07,
            samples=65536,
            region_bounds=[-1.0, -2.0, -3.0, -4.0],
            certified=True,
            bound_passes=5,
            sample_passes=98765432109,
            # The server's decision (scoring/eva.py decide) for these overlaps.
            decision=attribution_pb2.EVA_DECISION_CERTIFIED
            if guaranteed
            else attribution_pb2.EVA_DECISION_UNDECIDED,
            verdict="certified: no input of the ball makes another class reach the target"
            if guaranteed
            else "undecided: the hybrid bound -1.235e+05 is below 0 but NOT guaranteed (it may "
            "lie below the true overlap); verify from the input to certify",
        ),
    )
    return Attribution.from_events("r", accepted, result)


@pytest.mark.parametrize("guaranteed", [True, False])
def test_an_eva_summary_is_whole_at_80_columns(guaranteed, tmp_path):
    """The guarantee said plainly, every bound and count whole, no line beyond 80 columns."""
    found = _eva_attribution(guaranteed)
    buffer = io.StringIO()
    console = Console(file=buffer, width=80)
    for line in _attribution_summary(
        "a_model_name", found, tmp_path / "x.png", tmp_path / "x.json"
    ):
        console.print(line)
    out = buffer.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out
    words = out.split()
    for token in ("-1.235e+05", "-9.877e-07", "98765432109", "65536", "912", "0.03137"):
        assert token in words, (token, out)
    flat = " ".join(words)
    if guaranteed:
        assert "bounds: verified (guaranteed), crown" in flat
        assert "certified: yes;" in flat
        assert "the true overlap lies between" in flat
        assert "verdict: certified: no input of the ball" in flat
    else:
        assert "bounds: hybrid from features.block_three.conv_two: NOT guaranteed" in flat
        assert "certified: yes (by a hybrid bound: NOT guaranteed)" in flat
        assert "a hybrid bound may lie below the true overlap" in flat
        assert "the true overlap lies between" not in flat
        assert "verdict: undecided: the hybrid bound -1.235e+05 is below 0 but NOT" in flat
    assert "perturbation:" not in flat
