"""MeGe and ReCo on the K = 4 fold models (issue 18, part 5), through the running service.

The fold models (synth_patch_folds versions 1..4, `make fold-weights`) are the patch-biased
recipe retrained leave-one-quarter-out. On ordinary images they all follow the patch and
agree; their decisions differ only near the boundary, so the images are unbiased scenes
whose patch is blended in at strengths spread around it (an eighth without the patch, an
eighth with all of it, the rest at strengths 0.45..0.65), and the predictions decide which pairs
agree (no labels: a half-pasted patch has no true class). Every real explainer must score
above the random-map control on MeGe and, where both are defined, on ReCo; identical models
(one version twice) must give MeGe = 1. The full run retrains the folds into a temporary
folder to time the whole run with its trainings (and checks they rebuild the committed
weights); bench/validate_concepts.py writes the table."""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import propscope
from propscope_dev import train
from propscope_dev.validation.tables import result_row
from propscope_server.synthetic.world import make_split, render

PART = "MeGe/ReCo"
FOLD_MODEL = "synth_patch_folds"
FOLD_MODELS = tuple(f"{FOLD_MODEL}:{k}" for k in range(1, train.FOLD_COUNT + 1))
REAL_EXPLAINERS = ("sobol", "rise", "saliency", "gradient_x_input")
# ReCo from fewer disagreeing pairs than this is recorded, not gating: a threshold that
# splits a handful of pairs is chance as often as not.
MIN_DISAGREEING_PAIRS = 12
SEED = 72_000
COMMITTED_FOLDS = Path(__file__).resolve().parents[3] / "deploy" / "triton" / "weights"
# The whole run with its trainings, issue 18 part 5.
MAX_RUN_S = 15 * 60
# (images, Sobol N, Sobol grid, RISE masks) of the full and the quick run.
FULL = (24, 32, 8, 1000)
QUICK = (8, 8, 4, 100)

logger = logging.getLogger(__name__)


def boundary_images(count: int, seed: int = SEED) -> list[np.ndarray]:
    """`count` unbiased scenes, the patch blended in: an eighth at 0, an eighth at 1, the
    rest at strengths spread over 0.45..0.65 (where the fold models' decisions differ)."""
    _, _, scenes = make_split("none", count, seed)
    eighth = max(1, count // 8)
    strengths = np.concatenate(
        [np.zeros(eighth), np.ones(eighth), np.linspace(0.45, 0.65, count - 2 * eighth)]
    )
    images = []
    for scene, strength in zip(scenes, strengths, strict=True):
        without = render(replace(scene, patch=False)).astype(np.float64)
        with_patch = render(replace(scene, patch=True)).astype(np.float64)
        blended = (1.0 - strength) * without + strength * with_patch
        images.append(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    return images


_row = functools.partial(result_row, PART)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def retrain_folds() -> tuple[float, bool]:
    """Seconds the fold recipe takes, and whether it rebuilt the committed weights bit for
    bit (same torch version and thread count)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        train.train_folds(out, 6000, 1000, 4, 0.75, 64, 2e-3, 0)
        seconds = time.monotonic() - started
        same = all(
            _same_weights(
                out / train.FOLDS_FOLDER / f"patch_fold{k}.pt",
                COMMITTED_FOLDS / train.FOLDS_FOLDER / f"patch_fold{k}.pt",
            )
            for k in range(1, train.FOLD_COUNT + 1)
        )
    return seconds, same


def _same_weights(first: Path, second: Path) -> bool:
    a, b = torch.load(first), torch.load(second)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def validate(address: str, quick: bool = False) -> list[dict]:
    """The MeGe/ReCo rows of the concepts table (dicts: part, criterion, target, measured,
    met, informational)."""
    started = time.monotonic()
    rows: list[dict] = []
    training_s = 0.0
    if not quick:
        training_s, same = retrain_folds()
        rows.append(
            _row(
                "the fold recipe rebuilds the committed weights (make fold-weights)",
                "bit for bit",
                f"{'identical' if same else 'different'}; {training_s:.0f} s for K = 4",
                same,
                informational=True,
            )
        )
    count, nb_design, grid, masks = QUICK if quick else FULL
    images = boundary_images(count)
    with propscope.Client(address) as client:
        evaluated = time.monotonic()
        result = client.evaluate_consistency(
            images,
            FOLD_MODELS,
            sobol_nb_design=nb_design,
            sobol_grid=grid,
            rise_samples=masks,
            seed=SEED,
        )
        evaluation_s = time.monotonic() - evaluated
        identical = client.evaluate_consistency(
            images[:4],
            [FOLD_MODELS[0], FOLD_MODELS[0]],
            sobol_nb_design=nb_design,
            sobol_grid=grid,
            rise_samples=masks,
            seed=SEED,
        )
    logger.info("MeGe/ReCo: %s", result.to_json(indent=None))
    random = result.explainer("random")
    for explainer in REAL_EXPLAINERS:
        scores = result.explainer(explainer)
        rows.append(
            _row(
                f"{explainer}: MeGe above the random-map explainer's",
                f"> {_fmt(random.mege)}",
                f"{_fmt(scores.mege)} (mean distance of {scores.agreeing_pairs} agreeing "
                f"pairs {_fmt(scores.mean_distance_agreeing)})",
                scores.mege is not None and random.mege is not None and scores.mege > random.mege,
            )
        )
        defined = scores.reco is not None and random.reco is not None
        few = scores.disagreeing_pairs < MIN_DISAGREEING_PAIRS
        rows.append(
            _row(
                f"{explainer}: ReCo above the random-map explainer's",
                f"> {_fmt(random.reco)}",
                f"{_fmt(scores.reco)} ({scores.agreeing_pairs} agreeing, "
                f"{scores.disagreeing_pairs} disagreeing pairs"
                + (f"; fewer than {MIN_DISAGREEING_PAIRS}: recorded, not gating)" if few else ")"),
                defined and scores.reco > random.reco,  # type: ignore[operator]
                informational=few,
            )
        )
    ones = [e.explainer for e in identical.explainers if e.mege == 1.0]
    rows.append(
        _row(
            "identical models (one fold version twice): MeGe = 1 for every explainer",
            "MeGe = 1",
            f"{len(ones)} of {len(identical.explainers)} explainers: "
            + ", ".join(f"{e.explainer} {_fmt(e.mege)}" for e in identical.explainers),
            len(ones) == len(identical.explainers),
        )
    )
    total_s = time.monotonic() - started
    rows.append(
        _row(
            "the whole MeGe/ReCo run with its trainings",
            f"<= {MAX_RUN_S // 60} min",
            f"{total_s:.0f} s (trainings {training_s:.0f} s, evaluation {evaluation_s:.0f} s "
            f"for {len(images)} images x {len(FOLD_MODELS)} models x "
            f"{len(result.explainers)} explainers, {result.passes} passes)"
            + (" (quick: no training, small designs)" if quick else ""),
            total_s <= MAX_RUN_S,
            informational=quick,
        )
    )
    return rows
