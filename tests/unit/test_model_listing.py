"""ListModels lists each model once, though Triton's index has one entry per served version."""

from __future__ import annotations

from propscope._cli_output import OutputFormat, print_models
from propscope._events import ModelInfo
from propscope_server.api.convert import model_listing
from propscope_server.inference import ModelDescription, RepositoryEntry, Tensor


def described(name: str, version: str, description: str = "") -> ModelDescription:
    return ModelDescription(
        name=name,
        version=version,
        versions=(version,),
        role="classifier",
        inputs=(Tensor("IMAGE", "UINT8", [8, 8, 3]),),
        outputs=(Tensor("LOGITS", "FP32", [2]),),
        max_batch_size=4,
        description=description,
    )


def test_a_model_served_at_two_versions_is_listed_once_with_both():
    entries = [
        RepositoryEntry("repaired", "1", "READY"),
        RepositoryEntry("other", "1", "READY"),
        RepositoryEntry("repaired", "10", "READY"),
        RepositoryEntry("repaired", "2", "READY"),
    ]
    descriptions = [
        described("repaired", "1", "original"),
        described("other", "1"),
        described("repaired", "10", "latest"),
        described("repaired", "2"),
    ]
    listing = model_listing(entries, descriptions)
    assert [info.name for info in listing] == ["repaired", "other"]
    assert list(listing[0].versions) == ["1", "2", "10"]
    assert listing[0].description == "latest" and listing[0].state == "READY"


def test_a_version_that_failed_does_not_hide_the_one_that_serves():
    entries = [
        RepositoryEntry("model", "1", "READY"),
        RepositoryEntry("model", "2", "UNAVAILABLE", "load failed"),
        RepositoryEntry("broken", "1", "UNAVAILABLE", "no backend"),
    ]
    listing = model_listing(entries, [described("model", "1"), None, None])
    assert [(info.name, info.state, list(info.versions)) for info in listing] == [
        ("model", "READY", ["1"]),
        ("broken", "UNAVAILABLE", []),
    ]
    assert listing[1].state_reason == "no backend"


def test_a_served_model_names_its_failed_versions_and_their_reasons():
    entries = [
        RepositoryEntry("model", "1", "READY"),
        RepositoryEntry("model", "2", "UNAVAILABLE", "failed to load 'model' version 2: bad"),
        RepositoryEntry("model", "3", "UNAVAILABLE"),
        RepositoryEntry("fine", "1", "READY"),
    ]
    listing = model_listing(entries, [described("model", "1"), None, None, described("fine", "1")])
    assert [(info.state, list(info.versions)) for info in listing] == [
        ("READY", ["1"]),
        ("READY", ["1"]),
    ]
    assert listing[0].state_reason == (
        "version 2: failed to load 'model' version 2: bad; version 3: UNAVAILABLE"
    )
    assert listing[1].state_reason == ""


def test_a_model_loaded_on_demand_says_so_loaded_or_not():
    entries = [
        RepositoryEntry("lazy", "", "UNAVAILABLE", "unloaded", loads_on_demand=True),
        RepositoryEntry("loaded", "1", "READY", loads_on_demand=True),
        RepositoryEntry("plain", "1", "READY"),
    ]
    listing = model_listing(entries, [None, described("loaded", "1"), described("plain", "1")])
    assert [info.loads_on_demand for info in listing] == [True, True, False]


def test_propscope_models_prints_the_failed_version_of_a_served_model(capsys):
    entries = [
        RepositoryEntry("model", "1", "READY"),
        RepositoryEntry("model", "2", "UNAVAILABLE", "load failed: no weights"),
        RepositoryEntry("fine", "1", "READY"),
    ]
    listing = model_listing(entries, [described("model", "1"), None, described("fine", "1")])
    infos = [ModelInfo.from_proto(info) for info in listing]
    print_models(infos, OutputFormat.TABLE)
    notes = [line for line in capsys.readouterr().out.splitlines() if "version 2" in line]
    assert notes == ["model: READY: version 2: load failed: no weights"]
    print_models(infos, OutputFormat.PLAIN)
    assert "version 2: load failed: no weights" in capsys.readouterr().out
