"""The client's pre-flight: every model, editor, parameter and setting checked against a
ListModels answer before any work, every problem in one error with did-you-mean suggestions."""

import itertools

import pytest

from propscope import Client, ModelInfo, Property, _preflight
from propscope._preflight import Classifier, PreflightError, did_you_mean, preflight
from propscope.v1 import explain_pb2
from propscope_server.api import convert
from propscope_server.config import Limits
from propscope_server.errors import InvalidArgument

PNG = b"\x89PNG\r\n\x1a\n"


def served() -> explain_pb2.ListModelsResponse:
    info = explain_pb2.ModelInfo
    return explain_pb2.ListModelsResponse(
        models=[
            info(
                name="synthetic_cnn",
                versions=["1", "2"],
                role=info.ROLE_CLASSIFIER,
                state="READY",
                methods=["propgrad", "sobol", "rise"],
            ),
            info(
                name="synthetic_cnn_shortcut",
                versions=["1"],
                role=info.ROLE_CLASSIFIER,
                state="READY",
                methods=["propgrad"],
            ),
            info(
                name="broken_classifier",
                role=info.ROLE_CLASSIFIER,
                state="UNAVAILABLE",
                state_reason="unknown backend 'onnxruntime'",
            ),
            info(
                name="procedural",
                versions=["1"],
                role=info.ROLE_EDITOR,
                state="READY",
                editor_parameters=[
                    explain_pb2.EditorParameter(
                        name="operation", choices=["hue", "brightness", "saturation"]
                    ),
                    explain_pb2.EditorParameter(
                        name="region", choices=["all", "object"], default_value="all"
                    ),
                    explain_pb2.EditorParameter(name="amount"),
                ],
            ),
        ]
    )


def hue(**parameters: str) -> Property:
    return Property("hue", editor="procedural", parameters={"operation": "hue", **parameters})


def problems_of(**kwargs) -> tuple[str, ...]:
    with pytest.raises(PreflightError) as info:
        preflight(served(), **kwargs)
    return info.value.problems


def test_a_request_that_can_run_resolves_to_the_served_models():
    models = preflight(
        served(),
        classifiers=["synthetic_cnn:2", Classifier("synthetic_cnn_shortcut")],
        properties=[hue(region="object", amount="90")],
        steps=8,
        alpha=0.05,
    )
    assert isinstance(models["synthetic_cnn"], ModelInfo)
    assert models["procedural"].editor_parameters[0].name == "operation"


def test_a_list_of_model_infos_works_as_the_listing():
    listing = [ModelInfo.from_proto(msg) for msg in served().models]
    assert "procedural" in preflight(listing, classifiers=["synthetic_cnn"], properties=[hue()])


def test_every_problem_is_listed_in_one_error_with_suggestions():
    problems = problems_of(
        classifiers=["synthetic_cnn", "synthetic_cn", "synthetic_cnn:7"],
        properties=[
            hue(regoin="all"),
            Property("b", editor="procedural", parameters={"operation": "brightnes"}),
            Property("c", editor="procedurl"),
        ],
    )
    assert problems == (
        "model 'synthetic_cn' is not served (did you mean 'synthetic_cnn'?); served classifiers: "
        "broken_classifier, synthetic_cnn, synthetic_cnn_shortcut",
        "model 'synthetic_cnn' has no version '7'; versions: 1, 2",
        "property 'hue': editor 'procedural' has no parameter 'regoin' (did you mean 'region'?); "
        "it accepts: operation, region, amount",
        "property 'b': parameter 'operation' of 'procedural' is 'brightnes' (did you mean "
        "'brightness'?); one of: hue, brightness, saturation",
        "property 'c': editor 'procedurl' is not served (did you mean 'procedural'?); served "
        "editors: procedural",
    )


def test_the_error_message_counts_and_lists_the_problems():
    with pytest.raises(PreflightError) as info:
        preflight(served(), classifiers=["resnet"], properties=[hue(regoin="x")])
    text = str(info.value)
    assert text.startswith("2 problems found before any work started:\n  - model 'resnet'")
    assert "\n  - property 'hue': editor 'procedural' has no parameter 'regoin'" in text


def test_models_of_the_wrong_kind_or_not_ready_are_named_with_the_reason():
    problems = problems_of(
        classifiers=["procedural", "broken_classifier"],
        properties=[Property("x", editor="synthetic_cnn")],
    )
    assert problems[0].startswith("model 'procedural' is an editor, not a classifier")
    assert problems[1] == (
        "model 'broken_classifier' is UNAVAILABLE: unknown backend 'onnxruntime'"
    )
    assert problems[2].startswith(
        "property 'x': editor 'synthetic_cnn' is a classifier, not an editor; served editors: "
        "procedural"
    )


def test_a_model_the_gateway_loads_on_demand_is_left_to_the_call():
    # Listed unloaded and undescribed (no role, methods or parameters) until its first
    # request; the same listing without loads_on_demand is refused.
    listing = served()
    for name in ("synth_conjunction", "diffusion"):
        listing.models.add(name=name, state="UNAVAILABLE", state_reason="unloaded")
    request = dict(
        classifiers=["synth_conjunction", Classifier("synth_conjunction", "", ("interactions",))],
        properties=[Property("style", editor="diffusion", parameters={"prompt": "snow"})],
    )
    with pytest.raises(PreflightError) as refused:
        preflight(listing, **request)
    assert refused.value.problems[0] == "model 'synth_conjunction' is UNAVAILABLE: unloaded"
    for model in listing.models[-2:]:
        model.loads_on_demand = True
    assert set(preflight(listing, **request)) >= {"synth_conjunction", "diffusion"}
    assert ModelInfo.from_proto(listing.models[-1]).loads_on_demand


def test_a_method_the_classifier_cannot_run_is_named():
    (problem,) = problems_of(
        classifiers=[Classifier("synthetic_cnn_shortcut", methods=("propgrad", "sobol"))]
    )
    assert problem == "model 'synthetic_cnn_shortcut' cannot run sobol; its methods: propgrad"


def test_eva_on_a_model_without_bounds_says_what_it_needs():
    (problem,) = problems_of(classifiers=[Classifier("synthetic_cnn", methods=("eva",))])
    assert problem == (
        "model 'synthetic_cnn' cannot run eva; its methods: propgrad, sobol, rise; eva needs an "
        "open model that declares the bounds capability (docs/eva.md)"
    )


def test_a_case_slip_is_suggested():
    assert did_you_mean("Synthetic_CNN", ["synthetic_cnn", "procedural"]) == (
        " (did you mean 'synthetic_cnn'?)"
    )
    assert did_you_mean("zzz", ["synthetic_cnn"]) == ""


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"steps": 1}, "steps must be 0 (the default, 10) or at least 2; got 1"),
        ({"alpha": 0.7}, "alpha must be in (0, 0.5]"),
        ({"permutations": 50}, "with 50 permutations the smallest p-value is 0.0196"),
        ({"steps": 2}, "steps: a path of 3 images can never be significant at alpha 0.01"),
        ({"max_steps": 4, "steps": 8}, "max_steps (4) must be at least steps (8)"),
        ({"max_steps": 40, "path_mode": "fixed"}, "max_steps applies to adaptive paths"),
        ({"max_steps": 8, "steps": 6, "path_mode": "fixed"}, "fixed path has exactly steps (6)"),
    ],
)
def test_settings_the_api_refuses_are_found_before_the_first_image(settings, words):
    (problem,) = problems_of(classifiers=["synthetic_cnn"], properties=[hue()], **settings)
    assert words in problem


def test_a_provided_path_is_checked_for_length_and_samples():
    short = Property("own", provided_path=[PNG, PNG])
    problems = problems_of(properties=[short], samples=2, alpha=0.05)
    assert problems == (
        "property 'own': the provided path: a path of 3 images can never be significant at "
        "alpha 0.05 (smallest p-value 0.333); use at least 5 images",
        "samples must be 1 with provided paths (they are one path each: 'own'); got 2",
    )


def test_a_client_is_asked_for_its_listing_once():
    class FakeClient(Client):
        def __init__(self):
            self.calls = 0

        def list_models(self, **_):
            self.calls += 1
            return [ModelInfo.from_proto(msg) for msg in served().models]

    client = FakeClient()
    assert "synthetic_cnn" in preflight(client, classifiers=["synthetic_cnn"])
    assert client.calls == 1


def server_refuses(check, *args) -> bool:
    try:
        check(*args)
    except InvalidArgument:
        return True
    return False


def test_the_copied_defaults_are_the_servers():
    assert (
        _preflight.DEFAULT_STEPS,
        _preflight.DEFAULT_PERMUTATIONS,
        _preflight.DEFAULT_ALPHA,
    ) == (
        convert.DEFAULT_STEPS,
        convert.DEFAULT_PERMUTATIONS,
        convert.DEFAULT_ALPHA,
    )


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.1, 0.3, 0.5])
def test_the_copied_reachability_rule_refuses_what_the_server_refuses(alpha):
    for points in range(2, 25):
        client = _preflight._reachable("steps", points, alpha)
        server = server_refuses(convert.check_reachable, points, 10**9, alpha, "steps")
        assert bool(client) == server, (points, alpha)
        if client:  # the same number of images asked for
            needed = client[0].rsplit("use at least ", 1)[1]
            with pytest.raises(InvalidArgument, match=f"use at least {needed}$"):
                convert.check_reachable(points, 10**9, alpha, "steps")
    for permutations in (1, 9, 19, 99, 999, 10_000):
        client = _preflight._setting_problems([], 0, 0, permutations, alpha)
        server = server_refuses(convert.check_reachable, 100, permutations, alpha, "steps")
        assert bool(client) == server, (permutations, alpha)


@pytest.mark.parametrize("path_mode", ["fixed", "adaptive"])
def test_max_steps_is_refused_as_the_server_refuses_it(path_mode):
    mode = {"fixed": explain_pb2.PATH_MODE_FIXED, "adaptive": explain_pb2.PATH_MODE_ADAPTIVE}
    for steps, max_steps in itertools.product([0, 4, 8], [0, 4, 8, 10, 40]):
        request = explain_pb2.ExplainRequest(max_steps=max_steps, path_mode=mode[path_mode])
        resolved = steps or convert.DEFAULT_STEPS
        server = server_refuses(
            convert.resolve_max_steps,
            request,
            (64, 64, 3),
            resolved,
            1,
            path_mode == "adaptive",
            Limits(),
        )
        client = _preflight._path_problems([], steps, 1, max_steps, path_mode)
        assert bool(client) == server, (steps, max_steps)
