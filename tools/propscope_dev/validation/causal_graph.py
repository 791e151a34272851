"""The causal-graph validation (issue 17, part 4): faithfulness, stability, repair and a
TRACER-style block comparison of the graphs the service builds (SDK `Client.graph`).

The service has no call for a plain classification, a multi-channel ablation or a
Grad x Activation map, so those measurements run in-process on the weights and the
channel means the served config names (`Reference`): the same network, the same baseline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import propscope
from propscope_dev.channel_means import config_parameters
from propscope_dev.stack import DEFAULT_MODEL_REPOSITORY
from propscope_dev.train import MODELS
from propscope_server.open_contract import (
    CHANNEL_MEANS_PARAMETER,
    LAYERS_PARAMETER,
    parse_layers,
)
from propscope_server.scoring.property_gradient import permutation_p_values
from propscope_server.synthetic.world import make_split, render
from propscope_server.triton_models.classifiers.cnn import load_classifier, normalise_uint8_hwc

# Far from training (0..2000), the training report (10_000..12_000), the channel means
# (20_000..22_000) and the bias table (50_000).
GRAPH_SEED = 60_000
# The properties whose shortcut each biased model learnt, as Explain's property text.
REPAIR_PROPERTIES = {
    "synth_hue": "hue=procedural:operation=hue",
    "synth_patch": "patch=procedural:operation=blend",
}
NOISE_SIGMA = 2.0  # uint8 levels
TOP = 10


class Reference:
    """The served classifier in-process: the weights and channel means its config names,
    with a forward hook per declared layer that sets chosen channels to their mean."""

    def __init__(self, model: str, repository: Path = DEFAULT_MODEL_REPOSITORY) -> None:
        config = repository / model / "config.pbtxt"
        parameters = config_parameters(config.read_text())
        self.name = model
        self.layers = parse_layers(parameters[LAYERS_PARAMETER])
        self.network = load_classifier(config.parent / parameters["weights"])
        means = json.loads(parameters[CHANNEL_MEANS_PARAMETER])
        self.offsets = np.cumsum([0] + [layer.channels for layer in self.layers])
        self.means = torch.tensor(
            np.concatenate([means[layer.name] for layer in self.layers]), dtype=torch.float32
        )
        self.bias = dict((stem, bias) for stem, bias, _ in MODELS)[Path(parameters["weights"]).stem]
        self._mask: torch.Tensor | None = None  # [B, sum C] 1 = set to the mean
        self._kept: list[torch.Tensor] = []
        modules = dict(self.network.named_modules())
        for index, layer in enumerate(self.layers):
            modules[layer.name].register_forward_hook(self._hook(index))

    @property
    def total_channels(self) -> int:
        return int(self.offsets[-1])

    def key(self, flat: int) -> str:
        index = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        return f"{self.layers[index].name}:{flat - self.offsets[index]}"

    def flat(self, layer: str, channel: int) -> int:
        names = [entry.name for entry in self.layers]
        return int(self.offsets[names.index(layer)] + channel)

    def _hook(self, index: int):
        low, high = int(self.offsets[index]), int(self.offsets[index + 1])

        def hook(module: torch.nn.Module, args: object, output: torch.Tensor):
            self._kept.append(output)
            if self._mask is None:
                return None
            mask = self._mask[:, low:high, None, None]
            return (1 - mask) * output + mask * self.means[low:high][None, :, None, None]

        return hook

    def logits(self, images: np.ndarray, ablate: np.ndarray | None = None) -> np.ndarray:
        """Logits of uint8 images; `ablate` [B, sum C] (or [sum C] for all) marks the
        channels set to their mean in that image's pass."""
        if ablate is not None:
            ablate = np.broadcast_to(ablate, (len(images), self.total_channels))
            self._mask = torch.tensor(np.asarray(ablate, dtype=np.float32))
        try:
            with torch.inference_mode():
                return self.network(normalise_uint8_hwc(images)).numpy().astype(np.float64)
        finally:
            self._mask = None
            self._kept = []

    def largest_activation(self, images: np.ndarray) -> np.ndarray:
        """[B, sum C]: each channel's largest |activation| over its map, per image."""
        self._kept = []
        try:
            with torch.inference_mode():
                self.network(normalise_uint8_hwc(images))
            parts = [a.abs().amax(dim=(2, 3)) for a in self._kept]
        finally:
            self._kept = []
        return torch.cat(parts, dim=1).numpy().astype(np.float64)

    def dead_channels(self) -> np.ndarray:
        """Flat indices of the channels whose declared mean is exactly 0: ReLU channels that
        never fired on the reference images."""
        return np.flatnonzero(self.means.numpy() == 0.0)

    def grad_x_activation(
        self, image: np.ndarray, target: int, from_mean: bool = False
    ) -> np.ndarray:
        """Per channel sum_hw a * d logit[target] / d a (the design's GRAD_X_ACTIVATION);
        `from_mean`: (a - the channel's mean) instead of a, the first-order estimate of
        the mean-ablation the graph's nodes measure."""
        self._kept = []
        try:
            logits = self.network(normalise_uint8_hwc(image[None]))
            activations = list(self._kept)
            gradients = torch.autograd.grad(logits[0, target], activations)
        finally:
            self._kept = []
        baseline = torch.split(self.means, [layer.channels for layer in self.layers])
        parts = [
            ((a - b[None, :, None, None] if from_mean else a) * g).sum(dim=(2, 3))[0]
            for a, g, b in zip(activations, gradients, baseline, strict=True)
        ]
        return torch.cat(parts).detach().numpy().astype(np.float64)


@dataclass(frozen=True)
class Calibration:
    """Channels that provably cannot affect the output: zero on the image and moved toward
    a baseline of 0, so every pass of their path is the clean pass."""

    model: str
    images: int
    dead_channels: list[str]
    curves: int  # tested (image, dead channel) pairs whose map is all zero
    significant: int
    largest_curve_range: float
    p_values: list[float]
    # i.i.d. curves through the same permutation test. Its p-values are discrete and
    # conservative ((b + 1) / (K + 1)), which a two-sided KS over 1000 of them can detect;
    # the one-sided KS (an excess of small p-values) is the check that means calibrated,
    # as in the honesty table.
    noise_null_ks_p_value: float
    noise_null_ks_greater_p_value: float
    noise_null_false_positive_rate: float


def calibration(
    results: Sequence[propscope.GraphResult],
    reference: Reference,
    images: np.ndarray,
    null_curves: int = 1000,
    seed: int = 0,
) -> Calibration:
    """The dead channels' nodes of each image's graph (every channel tested), counted only
    where the channel's map is all zero on that image; and the test's null distribution
    on exchangeable curves (i.i.d. Gaussian, in-process), which must be uniform."""
    dead = reference.dead_channels()
    silent = reference.largest_activation(images)[:, dead] == 0.0
    keys = {reference.key(int(flat)) for flat in dead}
    p_values, significant, largest = [], 0, 0.0
    for index, result in enumerate(results):
        for node in result.image_nodes(0):
            flat = reference.flat(node.layer, node.channel)
            if node.key not in keys or not silent[index, list(dead).index(flat)]:
                continue
            if node.screened_out:
                raise RuntimeError(f"{node.key} was screened out; ask for every channel")
            p_values.append(node.p_value)
            significant += node.significant
            largest = max(largest, float(np.ptp(node.curve)))
    rng = np.random.default_rng(seed)
    null, _ = permutation_p_values(rng.normal(size=(null_curves, 11)), 999, rng)
    return Calibration(
        model=reference.name,
        images=len(images),
        dead_channels=sorted(keys),
        curves=len(p_values),
        significant=significant,
        largest_curve_range=largest,
        p_values=p_values,
        noise_null_ks_p_value=float(stats.kstest(null, "uniform").pvalue),
        noise_null_ks_greater_p_value=float(
            stats.kstest(null, "uniform", alternative="greater").pvalue
        ),
        noise_null_false_positive_rate=float(np.mean(null < 0.05)),
    )


def probabilities(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def own_images(
    reference: Reference, count: int, seed: int = GRAPH_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out images of the model's own training distribution: (images, labels)."""
    offset = dict((bias, offset) for _, bias, offset in MODELS)[reference.bias]
    images, labels, _ = make_split(reference.bias, count, seed + offset)
    return images, labels


def noisy(images: np.ndarray, seed: int, sigma: float = NOISE_SIGMA) -> np.ndarray:
    """The images with Gaussian noise of `sigma` uint8 levels, rounded and clipped."""
    rng = np.random.default_rng(seed)
    values = images.astype(np.float64) + rng.normal(0.0, sigma, images.shape)
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def node_scores(result: propscope.GraphResult, reference: Reference, image: int = 0) -> dict:
    """One image's nodes as flat vectors: score (0 where screened out), significant."""
    score = np.zeros(reference.total_channels)
    significant = np.zeros(reference.total_channels, dtype=bool)
    tested = np.zeros(reference.total_channels, dtype=bool)
    for node in result.image_nodes(image):
        flat = reference.flat(node.layer, node.channel)
        tested[flat] = not node.screened_out
        if not node.screened_out:
            score[flat] = node.score
            significant[flat] = node.significant
    return {"score": score, "significant": significant, "tested": tested}


def graph_ranking(nodes: dict) -> np.ndarray:
    """Channels in the graph's order: significant nodes by score, then the other tested
    nodes by score, then the screened-out ones."""
    key = np.where(nodes["tested"], nodes["score"], -1.0) + np.where(nodes["significant"], 2.0, 0.0)
    return np.argsort(-key, kind="stable")


@dataclass(frozen=True)
class Paired:
    """The graph's top-k against another ranking's, over images (one-sided Wilcoxon)."""

    k: int
    other: str
    graph_mean_drop: float
    other_mean_drop: float
    wins: int
    images: int
    p_value: float


def paired_greater(first: np.ndarray, second: np.ndarray) -> float:
    """One-sided Wilcoxon signed-rank p-value that `first` exceeds `second` (1 if equal)."""
    difference = np.asarray(first) - np.asarray(second)
    if not np.any(difference != 0):
        return 1.0
    return float(stats.wilcoxon(difference, alternative="greater").pvalue)


@dataclass(frozen=True)
class Faithfulness:
    model: str
    images: int
    clean_probability_median: float
    significant_per_image: float
    relevant_per_image: float
    drops: dict[str, dict[int, list[float]]]  # ranking -> k -> target probability drop
    margin_drops: dict[str, dict[int, list[float]]]  # the same in logit margin
    comparisons: list[Paired]
    margin_comparisons: list[Paired]
    clean_accuracy: float
    retained_accuracy: float
    kept_per_image: float


def faithfulness(
    results: Sequence[propscope.GraphResult],
    reference: Reference,
    images: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (5, 10),
    seed: int = 0,
) -> Faithfulness:
    """Mean-ablate each image's top-k graph nodes, top-k Grad x Activation channels and k
    random channels; keep only the graph's significant nodes (all else mean-ablated).
    `results`: one single-image graph per image."""
    rng = np.random.default_rng(seed)
    total = reference.total_channels
    # The last is reported, not checked: the design compares with Grad x Activation.
    rankings = ("graph", "grad_x_activation", "random", "grad_x_delta")
    drops = {name: {k: [] for k in ks} for name in rankings}
    margin_drops = {name: {k: [] for k in ks} for name in rankings}
    kept_correct, kept_sizes, clean_correct, clean_p = [], [], [], []
    significant_counts, relevant_counts = [], []
    for index, image in enumerate(images):
        result = results[index]
        nodes = node_scores(result, reference)
        target = result.targets[0]
        order = {
            "graph": graph_ranking(nodes),
            "grad_x_activation": np.argsort(
                -reference.grad_x_activation(image, target), kind="stable"
            ),
            "random": rng.permutation(total),
            "grad_x_delta": np.argsort(
                -reference.grad_x_activation(image, target, from_mean=True), kind="stable"
            ),
        }
        masks = [np.zeros(total)]
        for name in rankings:
            for k in ks:
                mask = np.zeros(total)
                mask[order[name][:k]] = 1
                masks.append(mask)
        masks.append((~nodes["significant"]).astype(np.float64))
        logits = reference.logits(np.repeat(image[None], len(masks), 0), np.stack(masks))
        p = probabilities(logits)[:, target]
        margin = logits[:, target] - logits[:, 1 - target]
        row = 1
        for name in rankings:
            for k in ks:
                drops[name][k].append(float(p[0] - p[row]))
                margin_drops[name][k].append(float(margin[0] - margin[row]))
                row += 1
        clean_p.append(float(p[0]))
        clean_correct.append(int(np.argmax(logits[0])) == int(labels[index]))
        kept_correct.append(int(np.argmax(logits[-1])) == int(labels[index]))
        kept_sizes.append(int(nodes["significant"].sum()))
        significant_counts.append(int(nodes["significant"].sum()))
        relevant_counts.append(sum(n.relevant for n in result.image_nodes(0)))

    def compare(values: dict[str, dict[int, list[float]]]) -> list[Paired]:
        return [
            Paired(
                k,
                other,
                float(np.mean(values["graph"][k])),
                float(np.mean(values[other][k])),
                int(np.sum(np.array(values["graph"][k]) > np.array(values[other][k]))),
                len(images),
                paired_greater(values["graph"][k], values[other][k]),
            )
            for k in ks
            for other in rankings[1:]
        ]

    return Faithfulness(
        model=reference.name,
        images=len(images),
        clean_probability_median=float(np.median(clean_p)),
        significant_per_image=float(np.mean(significant_counts)),
        relevant_per_image=float(np.mean(relevant_counts)),
        drops=drops,
        margin_drops=margin_drops,
        comparisons=compare(drops),
        margin_comparisons=compare(margin_drops),
        clean_accuracy=float(np.mean(clean_correct)),
        retained_accuracy=float(np.mean(kept_correct)),
        kept_per_image=float(np.mean(kept_sizes)),
    )


def jaccard(first: Sequence[int], second: Sequence[int]) -> float:
    a, b = set(map(int, first)), set(map(int, second))
    return len(a & b) / len(a | b) if a | b else 1.0


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rho; 1 for two identical constant vectors, 0 for one constant."""
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return 1.0 if np.array_equal(first, second) else 0.0
    return float(stats.spearmanr(first, second).statistic)


@dataclass(frozen=True)
class Stability:
    model: str
    images: int
    sigma: float
    same_target: float
    graph_jaccard: list[float]
    graph_spearman: list[float]
    gxa_jaccard: list[float]
    gxa_spearman: list[float]
    jaccard_p_value: float  # graph > Grad x Activation, one-sided Wilcoxon
    spearman_p_value: float


def stability(
    clean: Sequence[propscope.GraphResult],
    perturbed: Sequence[propscope.GraphResult],
    reference: Reference,
    images: np.ndarray,
    noisy_images: np.ndarray,
    sigma: float = NOISE_SIGMA,
) -> Stability:
    """Top-10 Jaccard and Spearman of node scores (screened-out nodes score 0) between each
    image and its noisy copy, against |Grad x Activation| on the same pairs."""
    graph_j, graph_s, gxa_j, gxa_s = [], [], [], []
    for index in range(len(images)):
        a, b = node_scores(clean[index], reference), node_scores(perturbed[index], reference)
        graph_j.append(jaccard(graph_ranking(a)[:TOP], graph_ranking(b)[:TOP]))
        graph_s.append(spearman(a["score"], b["score"]))
        target = clean[index].targets[0]
        ga = np.abs(reference.grad_x_activation(images[index], target))
        gb = np.abs(reference.grad_x_activation(noisy_images[index], target))
        gxa_j.append(jaccard(np.argsort(-ga)[:TOP], np.argsort(-gb)[:TOP]))
        gxa_s.append(spearman(ga, gb))
    return Stability(
        model=reference.name,
        images=len(images),
        sigma=sigma,
        same_target=float(
            np.mean([a.targets[0] == b.targets[0] for a, b in zip(clean, perturbed, strict=True)])
        ),
        graph_jaccard=graph_j,
        graph_spearman=graph_s,
        gxa_jaccard=gxa_j,
        gxa_spearman=gxa_s,
        jaccard_p_value=paired_greater(graph_j, gxa_j),
        spearman_p_value=paired_greater(graph_s, gxa_s),
    )


@dataclass(frozen=True)
class RepairRates:
    """A model with some channels mean-ablated, on the repair's measurements. The shortcut
    rate: synth_hue, predictions that flip under a 180-degree hue rotation; synth_patch,
    patch-free circles called squares once the patch is pasted."""

    channels: list[str]
    shortcut_rate: float
    unbiased_accuracy: float
    unbiased_square_share: float


@dataclass(frozen=True)
class Repair:
    model: str
    property: str
    graph_images: int
    channels: int
    max_share: float
    before: RepairRates
    after: RepairRates
    random: list[RepairRates]
    warnings: list[str]


def shortcut_sets(
    model: str, count: int, seed: int = GRAPH_SEED + 500
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, shortcut-edited images, unbiased images, labels) for the repair's rates:
    synth_hue on its own world, each image against the same scene with the hue turned
    180 degrees; synth_patch on patch-free circles against the same circles with the
    patch pasted (train.py's two measurements)."""
    unbiased, labels, _ = make_split("none", count, seed)
    if model == "synth_hue":
        _, _, scenes = make_split("hue", count, seed + 1)
        changed = [replace(s, hue_deg=(s.hue_deg + 180.0) % 360.0) for s in scenes]
    else:
        _, _, scenes = make_split("none", 4 * count, seed + 2)
        scenes = [s for s in scenes if s.shape == 0 and not s.patch][:count]
        changed = [replace(s, patch=True) for s in scenes]
    original = np.stack([render(s) for s in scenes])
    return original, np.stack([render(s) for s in changed]), unbiased, labels


def repair_rates(
    reference: Reference, channels: Sequence[int], sets: tuple[np.ndarray, ...]
) -> RepairRates:
    original, changed, unbiased, labels = sets
    mask = np.zeros(reference.total_channels)
    mask[list(channels)] = 1
    before = reference.logits(original, mask).argmax(axis=1)
    after = reference.logits(changed, mask).argmax(axis=1)
    rate = np.mean(before != after) if reference.name == "synth_hue" else np.mean(after == 1)
    predicted = reference.logits(unbiased, mask).argmax(axis=1)
    return RepairRates(
        channels=[reference.key(c) for c in channels],
        shortcut_rate=float(rate),
        unbiased_accuracy=float(np.mean(predicted == labels)),
        unbiased_square_share=float(np.mean(predicted == 1)),
    )


def repair(
    result: propscope.GraphResult,
    reference: Reference,
    sets: tuple[np.ndarray, ...],
    random_draws: int,
    seed: int = 0,
) -> Repair:
    """The service's repair channels against the same number of random channels (no draws
    when the service chose none)."""
    if result.repair is None:
        raise RuntimeError(f"{result.model}: the graph came back without a repair")
    chosen = [reference.flat(c.layer, c.channel) for c in result.repair.channels]
    rng = np.random.default_rng(seed)
    draws = [
        repair_rates(reference, rng.choice(reference.total_channels, len(chosen), False), sets)
        for _ in range(random_draws if chosen else 0)
    ]
    return Repair(
        model=result.model,
        property=result.repair.property,
        graph_images=result.images,
        channels=len(chosen),
        max_share=len(chosen) / reference.total_channels,
        before=repair_rates(reference, [], sets),
        after=repair_rates(reference, chosen, sets),
        random=draws,
        warnings=list(result.repair.warnings),
    )


@dataclass(frozen=True)
class BlockEffect:
    """TRACER's block-level average causal effect: KL(clean || block mean-ablated)."""

    model: str
    layer: str
    mean_kl: float
    accuracy: float
    square_share: float


def block_effects(
    reference: Reference, images: np.ndarray, labels: np.ndarray
) -> list[BlockEffect]:
    clean = probabilities(reference.logits(images))
    found = []
    for index, layer in enumerate(reference.layers):
        mask = np.zeros(reference.total_channels)
        mask[reference.offsets[index] : reference.offsets[index + 1]] = 1
        ablated = probabilities(reference.logits(images, mask))
        kl = np.sum(clean * (np.log(clean + 1e-300) - np.log(ablated + 1e-300)), axis=1)
        predicted = ablated.argmax(axis=1)
        found.append(
            BlockEffect(
                reference.name,
                layer.name,
                float(kl.mean()),
                float(np.mean(predicted == labels)),
                float(np.mean(predicted == 1)),
            )
        )
    return found
