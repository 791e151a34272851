"""Each synthetic classifier's channel means on its own training distribution: the
`propscope.channel_means` its config declares (the baseline of a do-intervention).

    python -m propscope_dev.channel_means            # print each model's parameter line
    python -m propscope_dev.channel_means --write    # rewrite the configs' parameter line

Deterministic: a fixed number of images rendered with fixed seeds from the split the
model was trained on (train.py's MODELS and CONJUNCTION_RECIPE), run through the committed weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import typer

from propscope_dev.stack import DEFAULT_MODEL_REPOSITORY
from propscope_dev.train import CONJUNCTION_RECIPE, MODELS
from propscope_server.open_contract import (
    CHANNEL_MEANS_PARAMETER,
    LAYERS_PARAMETER,
    parse_layers,
)
from propscope_server.synthetic.world import make_split
from propscope_server.triton_models.classifiers.cnn import load_classifier, normalise_uint8_hwc
from propscope_server.triton_models.classifiers.open_model import OpenModel

IMAGES = 256
# Far from train.py's training (seed + offset) and held-out (seed + 10_000 + offset) seeds.
SEED = 20_000
DECIMALS = 6
_PARAMETER = re.compile(
    r'parameters: \{ key: "(?P<key>[^"]+)" value: \{ string_value: "(?P<value>(?:[^"\\]|\\.)*)" \} \}'
)

app = typer.Typer(add_completion=False)


def config_parameters(text: str) -> dict[str, str]:
    """The string parameters of a config.pbtxt written one per line, as this repository does."""
    return {m["key"]: json.loads(f'"{m["value"]}"') for m in _PARAMETER.finditer(text)}


def channel_means(config_file: Path) -> dict[str, list[float]] | None:
    """The means for the model of `config_file`, or None when it declares no layers or
    its weights were not trained by train.py."""
    parameters = config_parameters(config_file.read_text())
    layers = parse_layers(parameters.get(LAYERS_PARAMETER))
    weights = parameters.get("weights")
    splits = {stem: (bias, offset) for stem, bias, offset in (*MODELS, CONJUNCTION_RECIPE)}
    if not layers or weights is None or Path(weights).stem not in splits:
        return None
    bias, offset = splits[Path(weights).stem]
    images, _, _ = make_split(bias, IMAGES, SEED + offset)
    torch.set_num_threads(1)
    model = OpenModel(
        load_classifier(config_file.parent / weights), layers, torch.zeros(1, 3, 64, 64)
    )
    means = model(normalise_uint8_hwc(images), requested=["CHANNEL_MEANS"])["CHANNEL_MEANS"]
    average = means.astype(np.float64).mean(axis=0)
    result, start = {}, 0
    for layer in layers:
        values = average[start : start + layer.channels]
        result[layer.name] = [round(float(v), DECIMALS) for v in values]
        start += layer.channels
    return result


def parameter_line(means: dict[str, list[float]]) -> str:
    value = json.dumps(json.dumps(means, separators=(",", ":")))
    return f'parameters: {{ key: "{CHANNEL_MEANS_PARAMETER}" value: {{ string_value: {value} }} }}'


def with_means(text: str, line: str) -> str:
    """The config with its channel-means line replaced, or added after the layers line."""
    lines = text.splitlines()
    kept = [entry for entry in lines if f'"{CHANNEL_MEANS_PARAMETER}"' not in entry]
    index = next(i for i, entry in enumerate(kept) if f'"{LAYERS_PARAMETER}"' in entry)
    kept.insert(index + 1, line)
    return "\n".join(kept) + "\n"


@app.command()
def main(
    repository: Path = typer.Option(DEFAULT_MODEL_REPOSITORY, help="Model repository."),
    write: bool = typer.Option(False, help="Rewrite the configs' parameter line."),
) -> None:
    """Compute (and with --write, store) every open synthetic model's channel means."""
    for config_file in sorted(repository.glob("*/config.pbtxt")):
        means = channel_means(config_file)
        if means is None:
            continue
        line = parameter_line(means)
        if write:
            config_file.write_text(with_means(config_file.read_text(), line))
            typer.echo(f"wrote {config_file}")
        else:
            typer.echo(f"{config_file.parent.name}: {line}")


if __name__ == "__main__":
    app()
