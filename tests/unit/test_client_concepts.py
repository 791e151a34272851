"""The SDK's concept results and requests (client/propscope/_concepts.py), without a server:
a ConceptBank from its message and back to JSON, the stream folded into the bank, and the
arguments refused before anything is sent."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from propscope import ConceptBank, ConceptMaps, PropscopeError
from propscope._concepts import (
    ConceptsCollector,
    build_decompose_request,
    build_fit_concepts_request,
)
from propscope.v1 import concepts_pb2 as cpb

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 8


def bank_message() -> cpb.ConceptBank:
    return cpb.ConceptBank(
        bank_id="cb_" + "a" * 32,
        model="synth_patch",
        model_version="1",
        layer="features.2",
        channels=3,
        rank=2,
        concepts=[
            cpb.Concept(
                index=1,
                sobol_total_importance=0.7,
                logit_share=0.9,
                top_crops=[cpb.ConceptCrop(image=0, width=19, height=19, png=PNG)],
            ),
            cpb.Concept(index=0, sobol_total_importance=0.1, logit_share=0.1),
        ],
        basis=[1, 2, 3, 4, 5, 6],
        warnings=["w"],
    )


def test_a_bank_from_its_message_keeps_the_ranking_the_basis_and_writes_json(tmp_path):
    bank = ConceptBank.from_proto(bank_message())
    assert [c.index for c in bank.concepts] == [1, 0] and bank.concept(0).logit_share == 0.1
    assert bank.basis.shape == (2, 3) and bank.basis[1, 0] == 4
    document = json.loads(bank.to_json())
    assert document["basis"] == [[1, 2, 3], [4, 5, 6]]
    assert document["concepts"][0]["top_crops"][0]["png_bytes"] == len(PNG)
    assert bank.write_crops(str(tmp_path)) == [str(tmp_path / "concept1_0.png")]
    with pytest.raises(KeyError):
        bank.concept(7)


def test_maps_are_shaped_as_the_image_and_the_grid():
    message = cpb.ConceptMapsResponse(
        bank_id="b",
        height=2,
        width=3,
        grid_height=1,
        grid_width=1,
        maps=[cpb.ConceptMap(concept=1, values=range(6), grid=[2.0])],
    )
    maps = ConceptMaps.from_proto(message)
    assert maps.maps[0].values.shape == (2, 3) and np.asarray(maps.maps[0].grid).shape == (1, 1)


def test_the_stream_folds_into_its_bank_and_reports_progress():
    seen = []
    collector = ConceptsCollector("r", seen.append)
    collector.add(
        cpb.FitConceptsEvent(request_id="s", progress=cpb.ConceptsProgress(passes_done=3))
    )
    collector.add(cpb.FitConceptsEvent(request_id="s", done=bank_message()))
    assert seen[0].request_id == "s" and seen[0].passes_done == 3
    assert collector.result().bank_id == "cb_" + "a" * 32
    with pytest.raises(PropscopeError) as caught:
        ConceptsCollector("r").result()
    assert caught.value.code == grpc.StatusCode.INTERNAL


def test_bad_arguments_are_refused_before_anything_is_sent():
    with pytest.raises(ValueError, match="non-empty"):
        build_fit_concepts_request([], "m")
    with pytest.raises(ValueError, match="rank"):
        build_fit_concepts_request([PNG], "m", rank=-1)
    with pytest.raises(ValueError, match="model_version needs model"):
        build_decompose_request("cb_x", 0, [PNG], model_version="2")
    request = build_fit_concepts_request([PNG], "m", target_class=1, rank=4)
    assert request.model.target_class == 1 and request.rank == 4 and request.images == [PNG]
