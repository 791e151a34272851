"""Client.interactions and AsyncClient.interactions against an in-process fake
InteractionService: the request they send, the result folded from the stream, and the caller's
own edit functions rendered into a provided design (pure client logic; the real method runs in
tests/integration/test_interactions_clients.py)."""

from __future__ import annotations

import asyncio
import io
import json
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from propscope import AsyncClient, Client, InteractionsResult, Property, PropscopeError
from propscope._interactions import InteractionDesign, build_interactions_request, render_design
from propscope.cli import app
from propscope.v1 import (
    attribution_pb2,
    explain_pb2,
    explain_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
)

N = 4


def _design(properties: int, pair: list[int], seed: int) -> tuple[np.ndarray, list[str]]:
    """A replicated design shaped as the contract says (A, B, C_1..C_P, C_ij)."""
    rng = np.random.default_rng(seed)
    a, b = rng.random((N, properties)), rng.random((N, properties))
    rows, kinds = [a, b], ["A"] * N + ["B"] * N
    for i in range(properties):
        c = a.copy()
        c[:, i] = b[:, i]
        rows.append(c)
        kinds += [f"C{i + 1}"] * N
    if pair:
        c = a.copy()
        c[:, pair] = b[:, pair]
        rows.append(c)
        kinds += [f"C{pair[0] + 1}{pair[1] + 1}"] * N
    return np.concatenate(rows).astype(np.float32), kinds


def _estimate(value: float) -> interactions_pb2.Estimate:
    return interactions_pb2.Estimate(value=value, ci_low=value - 0.1, ci_high=value + 0.1)


class FakeInteractions(interactions_pb2_grpc.InteractionServiceServicer):
    def __init__(self) -> None:
        self.requests: list[interactions_pb2.InteractionsRequest] = []
        self.designs: list[interactions_pb2.InteractionDesignRequest] = []
        # A score that barely moves (the user trial's own edits on synth_conjunction).
        self.flat = False

    def InteractionDesign(self, request, context):  # noqa: N802
        self.designs.append(request)
        rows, kinds = _design(request.properties, list(request.second_order_pair), request.seed)
        return interactions_pb2.InteractionDesignResponse(
            rows=[interactions_pb2.DesignRow(strengths=row.tolist()) for row in rows],
            row_kinds=kinds,
        )

    def Interactions(self, request, context):  # noqa: N802
        self.requests.append(request)
        names = [p.name for p in request.properties]
        yield interactions_pb2.InteractionsEvent(
            request_id="rid",
            accepted=interactions_pb2.InteractionsAccepted(
                model_version="3",
                composition_order=names,
                design_size=request.design_size or 32,
                bootstrap=1000,
                confidence=0.95,
                planned_images=N * (len(names) + 2),
                warnings=["a warning"],
            ),
        )
        yield interactions_pb2.InteractionsEvent(
            request_id="rid",
            progress=interactions_pb2.InteractionsProgress(stage="classify", completed=8, total=16),
        )
        yield interactions_pb2.InteractionsEvent(
            request_id="rid",
            result=interactions_pb2.InteractionsResult(
                indices=[
                    interactions_pb2.PropertyIndices(
                        property_name=name,
                        first_order=_estimate(0.3),
                        total_order=_estimate(0.6),
                        interaction=_estimate(0.3),
                    )
                    for name in names
                ],
                second_order=interactions_pb2.SecondOrderIndex(
                    property_names=list(request.second_order_pair), index=_estimate(0.4)
                )
                if request.second_order_pair
                else None,
                interaction_share=interactions_pb2.Estimate(value=2.92, ci_low=0.48, ci_high=45.5)
                if self.flat
                else _estimate(0.6),
                interaction_significant=not self.flat,
                negligible_variance=self.flat,
                variance=7e-11 if self.flat else 0.04,
                mean=0.5,
                target_class=1,
                target_label="one",
                target_score=attribution_pb2.TARGET_SCORE_PROBABILITY,
                composition_order=names,
                cache_hits=2,
                cache_misses=14,
                edits=20,
                forward_passes=17,
                warnings=["a warning", "another"],
            ),
        )


@pytest.fixture
def service():
    fake = FakeInteractions()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    interactions_pb2_grpc.add_InteractionServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(grace=None)


def _image() -> np.ndarray:
    return np.full((6, 5, 3), 10, dtype=np.uint8)


def _decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as opened:
        return np.asarray(opened.convert("RGB"))


def test_editor_properties_go_in_the_request_and_the_stream_folds_into_one_result(service):
    fake, target = service
    progress = []
    with Client(target) as client:
        result = client.interactions(
            _image(),
            "synth_hue",
            ["hue=procedural:operation=hue", Property("patch", editor="procedural")],
            design_size=8,
            pair=("patch", "hue"),
            target_score="logit",
            seed=5,
            on_progress=progress.append,
        )
    (request,) = fake.requests
    assert [p.name for p in request.properties] == ["hue", "patch"]
    assert request.properties[0].editor.parameters == {"operation": "hue"}
    assert list(request.second_order_pair) == ["patch", "hue"]
    assert (request.design_size, request.seed) == (8, 5)
    assert request.target_score == attribution_pb2.TARGET_SCORE_LOGIT
    assert not request.HasField("provided_design") and not fake.designs
    assert isinstance(result, InteractionsResult) and not result.own_edits
    assert result.request_id == "rid" and result.model_version == "3"
    assert result.composition_order == ("hue", "patch")
    assert result["patch"].total_order.low == pytest.approx(0.5)
    assert result.second_order is not None and result.second_order.properties == ("patch", "hue")
    assert result.interaction_significant and result.target_score == "probability"
    assert not result.negligible_variance
    assert result.warnings == ("a warning", "another")  # the plan's warning once
    assert [(p.stage, p.completed, p.total) for p in progress] == [("classify", 8, 16)]
    assert json.loads(result.to_json())["interaction_share"]["high"] == pytest.approx(0.7)
    with pytest.raises(KeyError, match="hue, patch"):
        result["colour"]


def test_edit_functions_render_every_design_row_and_share_the_first_edit(service):
    fake, target = service
    calls = {"red": 0, "green": 0}

    def red(image: np.ndarray, strength: float) -> np.ndarray:
        calls["red"] += 1
        image[..., 0] = round(strength * 200)
        return image

    def green(image: np.ndarray, strength: float) -> Image.Image:  # a PIL image is fine too
        calls["green"] += 1
        image[..., 1] = round(strength * 200)
        return Image.fromarray(image)

    progress = []
    with Client(target) as client:
        result = client.interactions(
            _image(), "synth_hue", {"red": red, "green": green}, seed=9, on_progress=progress.append
        )
    (design_request,) = fake.designs
    assert (design_request.properties, design_request.seed) == (2, 9)
    (request,) = fake.requests
    assert [p.name for p in request.properties] == ["red", "green"]
    assert not any(p.HasField("editor") for p in request.properties)
    rows, _ = _design(2, [], 9)
    images = [_decoded(png) for png in request.provided_design.images]
    assert len(images) == len(rows) == 4 * N
    for row, image in zip(rows, images, strict=True):
        assert image.shape == (6, 5, 3)
        assert (image[0, 0, 0], image[0, 0, 1], image[0, 0, 2]) == (
            round(float(row[0]) * 200),
            round(float(row[1]) * 200),
            10,
        )
    # Rows C_1 start with B's strength, C_2 with A's: the first edit runs once per A and B row.
    assert calls == {"red": 2 * N, "green": 4 * N}
    assert result.own_edits
    assert [p.completed for p in progress if p.stage == "render"] == list(range(1, 4 * N + 1))


def test_async_client_renders_on_a_thread_and_returns_the_same_result(service):
    fake, target = service

    def brighten(image: np.ndarray, strength: float) -> np.ndarray:
        return np.clip(image + strength * 100, 0, 255).astype(np.uint8)

    async def run() -> InteractionsResult:
        async with AsyncClient(target) as client:
            return await client.interactions(
                _image(), "m", {"a": brighten, "b": brighten}, pair=["a", "b"]
            )

    result = asyncio.run(run())
    assert len(fake.requests[0].provided_design.images) == 5 * N  # A, B, C1, C2, C12
    assert list(fake.designs[0].second_order_pair) == [0, 1]
    assert result.second_order is not None and result.own_edits


def test_interaction_design_returns_the_rows_and_their_kinds(service):
    _, target = service
    with Client(target) as client:
        design = client.interaction_design(3, design_size=4, pair=(0, 2), seed=1)
    assert design.rows.shape == (6 * N, 3) and design.rows.dtype == np.float32
    assert design.row_kinds[-1] == "C13" and design.row_kinds.count("C2") == N


@pytest.mark.parametrize(
    ("properties", "options", "message"),
    [
        (["hue=procedural:operation=hue"], {}, "at least two properties, got 1"),
        (["a=procedural", "a=procedural"], {}, "'a' is given twice"),
        (["a=procedural", "b=procedural"], {"design_size": 24}, "nearest: 16 or 32"),
        (["a=procedural", "b=procedural"], {"pair": ("a", "c")}, "unknown property 'c'"),
        (["a=procedural", "b=procedural"], {"pair": ("a", "a")}, "two different"),
        (["a=procedural", "b=procedural"], {"confidence": 1.0}, "confidence must be in"),
        ({"a": "procedural", "b": lambda image, s: image}, {}, "not both"),
        (
            [Property("a", provided_path=[b"x"]), "b=procedural"],
            {},
            r"properties\[0\] \('a'\): a provided path cannot compose",
        ),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_sent(properties, options, message):
    with pytest.raises(ValueError, match=message):
        build_interactions_request(_image(), "m", properties, **options)


def test_an_edit_function_of_the_wrong_shape_is_named():
    design = InteractionDesign(np.array([[0.5, 0.5]], dtype=np.float32), ("A",))
    png = build_interactions_request(_image(), "m", ["a=p", "b=p"])[0].image
    functions = [("a", lambda image, s: image), ("b", lambda image, s: image[:2])]
    with pytest.raises(ValueError, match=r"property 'b'.*shape \(6, 5, 3\), got uint8 \(2, 5, 3\)"):
        render_design(png, functions, design)


def test_an_edit_function_that_raises_is_named_with_its_row_and_strength():
    design = InteractionDesign(np.array([[0.0, 0.0], [0.25, 0.75]], dtype=np.float32), ("A", "B"))
    png = build_interactions_request(_image(), "m", ["a=p", "b=p"])[0].image

    def failing(image: np.ndarray, strength: float) -> np.ndarray:
        if strength > 0.5:
            raise ZeroDivisionError("no such strength")
        return image

    functions = [("a", lambda image, s: image), ("b", failing)]
    with pytest.raises(
        RuntimeError, match=r"property 'b'.*design row 1 at strength 0\.75"
    ) as raised:
        render_design(png, functions, design)
    assert "ZeroDivisionError: no such strength" in str(raised.value)
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_a_refusal_of_the_server_is_a_propscope_error():
    class Refusing(FakeInteractions):
        def Interactions(self, request, context):  # noqa: N802
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "design_size: too large")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    interactions_pb2_grpc.add_InteractionServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client, pytest.raises(PropscopeError) as raised:
            client.interactions(_image(), "m", ["a=procedural", "b=procedural"])
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(grace=None)


# --- the CLI ----------------------------------------------------------------------------------


class FakeModels(explain_pb2_grpc.ExplainServiceServicer):
    """ListModels for the CLI's pre-flight."""

    def ListModels(self, request, context):  # noqa: N802
        operation = explain_pb2.EditorParameter(name="operation", choices=["hue", "blend"])
        return explain_pb2.ListModelsResponse(
            models=[
                explain_pb2.ModelInfo(
                    name="synth_conjunction",
                    versions=["1"],
                    state="READY",
                    role=explain_pb2.ModelInfo.ROLE_CLASSIFIER,
                    methods=["propgrad", "interactions"],
                ),
                explain_pb2.ModelInfo(
                    name="procedural",
                    versions=["1"],
                    state="READY",
                    role=explain_pb2.ModelInfo.ROLE_EDITOR,
                    editor_parameters=[operation],
                ),
            ]
        )


@pytest.fixture
def gateway(tmp_path):
    fake = FakeInteractions()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    interactions_pb2_grpc.add_InteractionServiceServicer_to_server(fake, server)
    explain_pb2_grpc.add_ExplainServiceServicer_to_server(FakeModels(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    image = tmp_path / "scene.png"
    Image.fromarray(_image()).save(image)
    yield fake, f"127.0.0.1:{port}", image
    server.stop(grace=None)


HUE = "hue=procedural:operation=hue"
PATCH = "patch=procedural:operation=blend"


def _run(target: str, *arguments: str):
    return CliRunner().invoke(
        app,
        ["interactions", *arguments, "--target", target],
        env={"COLUMNS": "80"},
        catch_exceptions=False,
    )


def test_the_table_fits_80_columns_without_a_terminal(gateway):
    fake, target, image = gateway
    found = _run(
        target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH,
        "--pair", "hue,patch", "--design-size", "8",
    )  # fmt: skip
    assert found.exit_code == 0, found.output
    lines = found.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    header = next(line for line in lines if line.lstrip().startswith("property"))
    assert header.split() == ["property", "first", "interval", "total", "interval",
                              "interaction", "interval"]  # fmt: skip
    hue = next(line for line in lines if line.startswith("hue"))
    assert hue.split() == ["hue", "0.30", "0.20–0.40", "0.60", "0.50–0.70", "0.30", "0.20–0.40"]
    # The title's details on a line of their own: never broken mid-phrase at 80 columns.
    assert lines[0] == "propscope interactions: synth_conjunction:3"
    assert lines[1].endswith("; N 8; 95% intervals")
    assert lines[-1].startswith("cost: images 16, edits 20, forward_passes ")
    assert "interaction share 0.60 (0.50–0.70): significant" in found.stdout
    assert "second order hue × patch: 0.40 (0.30–0.50)" in found.stdout
    assert list(fake.requests[0].second_order_pair) == ["hue", "patch"]
    assert "warning: synth_conjunction: another" in found.stderr


def test_a_score_that_barely_moves_is_not_decided_in_the_table_plain_json_and_report(
    gateway, tmp_path
):
    fake, target, image = gateway
    fake.flat = True
    report = tmp_path / "interactions.html"
    found = _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH,
                 "--report", str(report))  # fmt: skip
    assert found.exit_code == 0, found.output
    lines = found.stdout.splitlines()
    share = next(i for i, line in enumerate(lines) if "interaction share" in line)
    assert lines[share : share + 2] == [
        "interaction share 2.92 (0.48–45.50):",
        "  not decided: the score barely moves (variance 7e-11)",
    ]
    assert all(len(line) <= 80 for line in lines), lines
    assert "significant" not in found.stdout
    html = report.read_text()
    assert "not decided: the score barely moves (variance 7e-11)" in html
    assert "significant" not in html.split("Interaction share", 1)[1].split("</p>", 1)[0]
    plain = _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH,
                 "--format", "plain")  # fmt: skip
    (line,) = [line for line in plain.stdout.splitlines() if line.startswith("share ")]
    assert " significant=no negligible_variance=yes variance=7e-11 " in line
    document = json.loads(
        _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH, "--json").stdout
    )
    assert document["negligible_variance"] is True
    assert document["interaction_significant"] is False


def test_plain_and_json_carry_every_digit(gateway):
    _, target, image = gateway
    plain = _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH,
                 "--format", "plain")  # fmt: skip
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("property model=synth_conjunction:3 name=hue first=0.3 ")
    assert (
        "share model=synth_conjunction:3 value=0.6 low=0.5 high=0.7 significant=yes "
        "negligible_variance=no variance=0.04 mean=0.5" in lines
    )  # the variance to read first (docs/interactions.md) is in the script's output too
    assert lines[-1].startswith("cost model=synth_conjunction:3 images=16 edits=20")
    found = _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH, "--json")
    document = json.loads(found.stdout)
    assert document["indices"][1]["total_order"] == {"value": 0.6, "low": 0.5, "high": 0.7}


def test_report_writes_the_bars_and_the_table(gateway, tmp_path):
    _, target, image = gateway
    report = tmp_path / "interactions.html"
    found = _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH,
                 "--report", str(report))  # fmt: skip
    assert found.exit_code == 0, found.output
    html = report.read_text()
    assert html.count('<img class="plot" src="data:image/png;base64,') == 1
    assert "<td>patch</td>" in html and "Interaction share 0.6</b>" in html


def test_preprocessing_options_reach_the_request(gateway):
    """A model's undeclared output kind is answered with "pass --output-kind": interactions
    takes it, as explain and attribute do."""
    fake, target, image = gateway
    found = _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH,
                 "--output-kind", "probabilities", "--mean", "0.5,0.5,0.5")  # fmt: skip
    assert found.exit_code == 0, found.output
    sent = fake.requests[0].model.preprocessing
    assert sent.output_kind == explain_pb2.Preprocessing.OUTPUT_KIND_PROBABILITIES
    assert list(sent.mean) == pytest.approx([0.5, 0.5, 0.5])
    refused = _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH,
                   "--output-kind", "odds")  # fmt: skip
    assert refused.exit_code == 2 and "--output-kind must be one of" in refused.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--pair", "hue"], "--pair 'hue': give two property names"),
        (["-p", "rain=@rain/"], "rain"),
        (["-m", "synth_hue"], "'synth_hue'"),
        (["--pair", "hue,shape"], "--pair: unknown property 'shape'; the properties: hue, patch"),
        (["--confidence", "1"], "--confidence must be in (0, 1)"),
        (["--target-score", "logits"], "--target-score must be one of auto, probability,"),
    ],
)
def test_bad_options_are_refused_in_one_line_naming_them(gateway, arguments, message):
    fake, target, image = gateway
    found = _run(target, str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH, *arguments)
    assert found.exit_code == 2 and message in found.stderr
    assert not fake.requests


def test_the_cli_spells_the_interval_warnings_design_size_as_its_option():
    # Imported after propscope.cli (at the top), which registers the command module.
    from propscope._cli_interactions import warning_text

    warning = "the interaction share's interval ...; a design_size of 128 (now 32) narrows it"
    assert warning_text(warning).endswith("; a --design-size of 128 (now 32) narrows it")
    unreliable = "...; the bootstrap is unreliable at this design_size (8); raise design_size"
    assert warning_text(unreliable).endswith(
        "unreliable at this --design-size (8); raise --design-size"
    )
