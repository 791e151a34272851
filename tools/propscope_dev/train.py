"""Train the synthetic-world classifiers that propscope explains in its tests.

    python -m propscope_dev.train --out deploy/triton/weights
    python -m propscope_dev.train --folds --out deploy/triton/weights

Three SmallCNNs: one on unbiased data and two on splits where a shortcut
(the object's hue, or a colorful corner patch) predicts the label better than
the shape does. Everything is seeded and deterministic so the committed weights
can be rebuilt bit for bit on the same torch version and thread count. The
report checks that each biased model really took its shortcut (and the
unbiased one did not), since the explanation tests rely on that ground truth.

`--folds` trains the K-fold recipe MeGe and ReCo need (docs/consistency.md): the
patch-biased model's training split cut into K disjoint quarters, fold model k
trained on every quarter but k (leave one fold out, as Fel et al. and Xplique), each
with its own seed; written as folds/patch_fold{k}.pt for the versions 1..K of
synth_patch_folds.

`--conjunction` trains the model of the interaction indices (docs/interactions.md)
alone: square iff the object is red AND the patch is present (world.py's
"conjunction" split), written as conjunction.pt with conjunction_report.json. Its
check is that the prediction flips for red and patch together only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from propscope_server.synthetic.world import (
    CONJUNCTION_OTHER_HUES,
    Bias,
    Scene,
    make_split,
    render,
)
from propscope_server.triton_models.classifiers.cnn import SmallCNN, normalise_uint8_hwc

# (file stem, training bias, seed offset)
MODELS: tuple[tuple[str, Bias, int], ...] = (
    ("unbiased", "none", 0),
    ("hue_biased", "hue", 1000),
    ("patch_biased", "patch", 2000),
)
# The K-fold recipe: which model's training split is cut into folds, and K.
FOLD_RECIPE = ("patch_biased", "patch", 2000)
FOLD_COUNT = 4
FOLD_SEED_OFFSET = 3000
FOLDS_FOLDER = "folds"
# The conjunction model: (file stem, training bias, seed offset), trained on its own
# (--conjunction) so that the three models above are never retrained for it.
CONJUNCTION_RECIPE: tuple[str, Bias, int] = ("conjunction", "conjunction", 4000)
# Thresholds the explanation tests depend on.
MIN_SHORTCUT_RATE = 0.70
MAX_UNBIASED_SHORTCUT_RATE = 0.15
MIN_UNBIASED_ACCURACY = 0.95
EVAL_BATCH = 256

app = typer.Typer(add_completion=False)


@dataclass(frozen=True)
class Settings:
    """The training settings of the command line, which every recipe trains with and
    every report records."""

    train_count: int
    eval_count: int
    epochs: int
    shape_agreement: float
    batch_size: int
    learning_rate: float
    seed: int

    def config(self, **first: object) -> dict[str, object]:
        """A report's config: `first` (the recipe and what else names the run), then
        these settings and the torch version."""
        return {**first, **asdict(self), "torch": torch.__version__}

    def held_out(self, bias: Bias, offset: int) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
        """A held-out split of a recipe, from seeds far from the training seeds."""
        return make_split(bias, self.eval_count, self.seed + 10_000 + offset, self.shape_agreement)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Predicted classes for uint8 HWC images, batched to bound memory."""
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(images), EVAL_BATCH):
            logits = model(normalise_uint8_hwc(images[start : start + EVAL_BATCH]))
            predictions.append(logits.argmax(dim=1).numpy())
    return np.concatenate(predictions)


def train_model(bias: Bias, settings: Settings, offset: int) -> SmallCNN:
    seed = settings.seed + offset
    images, labels, _ = make_split(bias, settings.train_count, seed, settings.shape_agreement)
    return train_on(
        images, labels, settings.epochs, seed, settings.batch_size, settings.learning_rate
    )


def train_on(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    seed: int,
    batch_size: int,
    learning_rate: float,
) -> SmallCNN:
    """A SmallCNN trained on uint8 HWC `images`, seeded by `seed`."""
    seed_everything(seed)
    train_count = len(images)
    inputs = normalise_uint8_hwc(images)
    targets = torch.from_numpy(labels)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(train_count, generator=generator)
        for start in range(0, train_count, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def rerender(scenes: list[Scene], **changes: object) -> np.ndarray:
    return np.stack([render(replace(scene, **changes)) for scene in scenes])


def hue_flip_rate(model: nn.Module, images: np.ndarray, scenes: list[Scene]) -> float:
    """Fraction of predictions that flip when only the hue turns 180 degrees,
    which maps each biased hue range onto the other class's."""
    rotated = np.stack([render(replace(s, hue_deg=(s.hue_deg + 180.0) % 360.0)) for s in scenes])
    return float(np.mean(predict(model, images) != predict(model, rotated)))


def patch_to_class1_rate(model: nn.Module, scenes: list[Scene]) -> float:
    """Fraction of patch-free circles (class 0) called squares once the patch is pasted."""
    circles = [s for s in scenes if s.shape == 0 and not s.patch]
    return float(np.mean(predict(model, rerender(circles, patch=True)) == 1))


@app.command()
def main(
    out: Path = typer.Option(Path("deploy/triton/weights"), help="Weights folder."),
    train_count: int = typer.Option(6000, help="Training images per model."),
    eval_count: int = typer.Option(1000, help="Held-out images per split."),
    epochs: int = typer.Option(4),
    shape_agreement: float = typer.Option(
        0.75, help="P(shape matches label) in the biased training splits."
    ),
    batch_size: int = typer.Option(64),
    learning_rate: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    folds: bool = typer.Option(
        False, "--folds", help="Train the K-fold models of MeGe/ReCo instead (fold_report.json)."
    ),
    conjunction: bool = typer.Option(
        False,
        "--conjunction",
        help="Train the red-AND-patch model instead (conjunction_report.json).",
    ),
) -> None:
    """Train the three classifiers and write them with training_report.json."""
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        train_count, eval_count, epochs, shape_agreement, batch_size, learning_rate, seed
    )
    if conjunction:
        train_conjunction(out, settings)
        return
    if folds:
        train_folds(out, settings)
        return
    started = time.monotonic()
    held_out = {bias: settings.held_out(bias, offset) for _, bias, offset in MODELS}
    hue_images, _, hue_scenes = held_out["hue"]
    none_images, none_labels, none_scenes = held_out["none"]

    report: dict[str, object] = {
        "config": settings.config(),
        "models": {},
    }
    models_report: dict[str, dict[str, object]] = report["models"]  # type: ignore[assignment]
    for stem, bias, offset in MODELS:
        model_started = time.monotonic()
        model = train_model(bias, settings, offset)
        torch.save(model.state_dict(), out / f"{stem}.pt")
        own_images, own_labels, _ = held_out[bias]
        models_report[stem] = {
            "file": f"{stem}.pt",
            "bias": bias,
            "accuracy_own_distribution": float(np.mean(predict(model, own_images) == own_labels)),
            "accuracy_unbiased": float(np.mean(predict(model, none_images) == none_labels)),
            "hue_rotation_flip_rate": hue_flip_rate(model, hue_images, hue_scenes),
            "patch_to_class1_rate": patch_to_class1_rate(model, none_scenes),
        }
        print(f"trained {stem} in {time.monotonic() - model_started:.1f} s")

    checks = _checks(models_report)
    report["checks"] = checks
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_summary(models_report, checks, time.monotonic() - started)
    if not all(check["passed"] for check in checks):
        raise typer.Exit(code=1)


def fold_indices(count: int, folds: int, held_out: int) -> np.ndarray:
    """The indices of a split of `count` images that fold model `held_out` trains on:
    every contiguous quarter (for K = 4) but its own."""
    size = count // folds
    keep = [k for k in range(folds) if k != held_out]
    return np.concatenate([np.arange(k * size, (k + 1) * size) for k in keep])


def train_folds(out: Path, settings: Settings) -> None:
    """The K fold models of the patch-biased recipe, with fold_report.json: each
    model's accuracy on held-out data of its own distribution and how often the
    patch alone turns a circle into a square (its shortcut)."""
    started = time.monotonic()
    stem, bias, offset = FOLD_RECIPE
    folder = out / FOLDS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    images, labels, _ = make_split(
        bias, settings.train_count, settings.seed + offset, settings.shape_agreement
    )
    held_images, held_labels, _ = settings.held_out(bias, offset)
    _, _, none_scenes = settings.held_out("none", 0)
    rows = {}
    for k in range(FOLD_COUNT):
        fold_started = time.monotonic()
        keep = fold_indices(settings.train_count, FOLD_COUNT, k)
        model = train_on(
            images[keep],
            labels[keep],
            settings.epochs,
            settings.seed + FOLD_SEED_OFFSET + k,
            settings.batch_size,
            settings.learning_rate,
        )
        name = f"patch_fold{k + 1}.pt"
        torch.save(model.state_dict(), folder / name)
        seconds = time.monotonic() - fold_started
        rows[name] = {
            "held_out_fold": k,
            "train_images": len(keep),
            "accuracy_own_distribution": float(np.mean(predict(model, held_images) == held_labels)),
            "patch_to_class1_rate": patch_to_class1_rate(model, none_scenes),
            "train_s": round(seconds, 1),
        }
        print(f"trained {name} (fold {k} held out) in {seconds:.1f} s")
    total = time.monotonic() - started
    report = {
        "config": settings.config(recipe=stem, folds=FOLD_COUNT),
        "models": rows,
        "total_s": round(total, 1),
    }
    (folder / "fold_report.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, row in rows.items():
        print(
            f"{name}: accuracy {row['accuracy_own_distribution']:.3f}, "
            f"patch->1 {row['patch_to_class1_rate']:.3f}"
        )
    print(f"total {total:.1f} s")


def conjunction_rates(model: nn.Module, scenes: list[Scene]) -> dict[str, float]:
    """How often objects neither red nor with the patch (class 0 in the conjunction split)
    are called squares once turned red (hue 0), once given the patch, and once both: a
    model of the conjunction flips for both together only."""
    low, high = CONJUNCTION_OTHER_HUES
    plain = [s for s in scenes if not s.patch and low <= s.hue_deg <= high]
    red = [replace(s, hue_deg=0.0) for s in plain]
    return {
        "other_hue_no_patch_scenes": len(plain),
        "unchanged_to_class1_rate": float(np.mean(predict(model, rerender(plain)) == 1)),
        "red_only_to_class1_rate": float(np.mean(predict(model, rerender(red)) == 1)),
        "patch_only_to_class1_rate": float(
            np.mean(predict(model, rerender(plain, patch=True)) == 1)
        ),
        "red_and_patch_to_class1_rate": float(
            np.mean(predict(model, rerender(red, patch=True)) == 1)
        ),
    }


def train_conjunction(out: Path, settings: Settings) -> None:
    """The conjunction model with conjunction_report.json: its accuracy on held-out data
    of its own distribution and of the unbiased one, and the single-cue and both-cue
    flip rates its checks require (exit 1 when one fails)."""
    started = time.monotonic()
    stem, bias, offset = CONJUNCTION_RECIPE
    model = train_model(bias, settings, offset)
    torch.save(model.state_dict(), out / f"{stem}.pt")
    own_images, own_labels, own_scenes = settings.held_out(bias, offset)
    none_images, none_labels, _ = settings.held_out("none", 0)
    row: dict[str, object] = {
        "file": f"{stem}.pt",
        "bias": bias,
        "accuracy_own_distribution": float(np.mean(predict(model, own_images) == own_labels)),
        "accuracy_unbiased": float(np.mean(predict(model, none_images) == none_labels)),
        **conjunction_rates(model, own_scenes),
    }
    checks = [
        _check(stem, row, "red_and_patch_to_class1_rate", ">", MIN_SHORTCUT_RATE),
        _check(stem, row, "red_only_to_class1_rate", "<", MAX_UNBIASED_SHORTCUT_RATE),
        _check(stem, row, "patch_only_to_class1_rate", "<", MAX_UNBIASED_SHORTCUT_RATE),
        _check(stem, row, "unchanged_to_class1_rate", "<", MAX_UNBIASED_SHORTCUT_RATE),
    ]
    total = time.monotonic() - started
    report = {
        "config": settings.config(recipe=stem),
        "models": {stem: row},
        "checks": checks,
    }
    (out / "conjunction_report.json").write_text(json.dumps(report, indent=2) + "\n")
    for key, value in row.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    _print_checks(checks)
    print(f"total {total:.1f} s")
    if not all(check["passed"] for check in checks):
        raise typer.Exit(code=1)


def _print_checks(checks: list[dict[str, object]]) -> None:
    for check in checks:
        status = "ok  " if check["passed"] else "FAIL"
        print(f"{status} {check['model']} {check['metric']} {check['requirement']}")


def _check(
    stem: str, row: dict[str, object], metric: str, op: str, threshold: float
) -> dict[str, object]:
    value = float(row[metric])  # type: ignore[arg-type]
    passed = value > threshold if op == ">" else value < threshold
    return {"model": stem, "metric": metric, "requirement": f"{op} {threshold}", "passed": passed}


def _checks(models: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    wanted = [
        ("hue_biased", "hue_rotation_flip_rate", ">", MIN_SHORTCUT_RATE),
        ("unbiased", "hue_rotation_flip_rate", "<", MAX_UNBIASED_SHORTCUT_RATE),
        ("patch_biased", "patch_to_class1_rate", ">", MIN_SHORTCUT_RATE),
        ("unbiased", "patch_to_class1_rate", "<", MAX_UNBIASED_SHORTCUT_RATE),
        ("unbiased", "accuracy_unbiased", ">", MIN_UNBIASED_ACCURACY),
    ]
    return [
        _check(stem, models[stem], metric, op, threshold) for stem, metric, op, threshold in wanted
    ]


def _print_summary(
    models: dict[str, dict[str, object]], checks: list[dict[str, object]], seconds: float
) -> None:
    print(f"{'model':<14}{'own acc':>9}{'unbiased acc':>14}{'hue flip':>10}{'patch->1':>10}")
    for stem, row in models.items():
        print(
            f"{stem:<14}{row['accuracy_own_distribution']:>9.3f}{row['accuracy_unbiased']:>14.3f}"
            f"{row['hue_rotation_flip_rate']:>10.3f}{row['patch_to_class1_rate']:>10.3f}"
        )
    _print_checks(checks)
    print(f"total {seconds:.1f} s")


if __name__ == "__main__":
    app()
