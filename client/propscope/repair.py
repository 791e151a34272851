"""Model repair on disk: version N+1 of a Triton model = a copy of version N's folder plus
``propscope_ablation.json`` (the channels an open model sets to fixed values in every forward
pass), and the request that makes Triton load it.

The file's format (the open-model contract)::

    {"channels": [{"layer": "features.1", "channel": 7, "value": 0.123}, ...], "source": "..."}

Both versions are served only when the model's config.pbtxt says so (``version_policy: { all
{ } }``, or a policy that names both): otherwise the new version would silently replace the old
one, and nothing could compare them.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ABLATION_FILE",
    "RepairError",
    "check_repairable",
    "check_version_policy",
    "load_model",
    "write_repaired_version",
]

ABLATION_FILE = "propscope_ablation.json"
POLICY_FIX = "version_policy: { all { } }"
LOAD_TIMEOUT_S = 120.0


class RepairError(Exception):
    """What stops a repair, in words that name the fix."""


def _block(text: str, start: int) -> str:
    """The text inside the braces that open at or after ``start`` (balanced)."""
    opening = text.index("{", start)
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening + 1 : index]
    raise RepairError("config.pbtxt: version_policy's braces are not balanced")


def _without_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def check_version_policy(config: str, version: int, versions: Iterable[int]) -> None:
    """RepairError unless ``config`` (config.pbtxt's text) serves both ``version`` and
    ``version + 1`` once the new one exists beside ``versions`` (the folders there are)."""
    text = _without_comments(config)
    found = re.search(r"\bversion_policy\s*:?\s*\{", text)
    new = version + 1

    def refusal(why: str) -> RepairError:
        return RepairError(
            f"the model's config.pbtxt would not serve versions {version} and {new} together "
            f"({why}); set `{POLICY_FIX}` in it so that both the original and the repaired "
            "version are served"
        )

    if found is None:
        raise refusal("no version_policy: Triton serves the latest only")
    policy = _block(text, found.start())
    if re.search(r"\ball\s*:?\s*\{", policy):
        return
    latest = re.search(r"\blatest\s*:?\s*\{", policy)
    if latest:
        count = re.search(r"num_versions\s*:\s*(\d+)", _block(policy, latest.start()))
        served = int(count.group(1)) if count else 1
        newest = sorted({*versions, new}, reverse=True)[:served]
        if version in newest and new in newest:
            return
        raise refusal(f"latest {{ num_versions: {served} }}")
    specific = re.search(r"\bspecific\s*:?\s*\{", policy)
    if specific:
        named = {int(v) for v in re.findall(r"\d+", _block(policy, specific.start()))}
        if {version, new} <= named:
            return
        raise refusal(f"specific versions {sorted(named)}")
    raise refusal("an unknown version_policy")


def _ablation(previous: Path, channels: Iterable[Mapping[str, Any]], source: str) -> dict[str, Any]:
    """The new file's object: version N's own ablation (when it has one) kept, the new
    channels added (a channel named twice takes the new value)."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    sources = []
    if previous.is_file():
        try:
            earlier = json.loads(previous.read_text(encoding="utf-8"))
            for channel in earlier["channels"]:
                merged[channel["layer"], int(channel["channel"])] = channel
        except (ValueError, KeyError, TypeError) as error:
            raise RepairError(f"{previous} is not a valid ablation file ({error})") from None
        if earlier.get("source"):
            sources.append(str(earlier["source"]))
    for channel in channels:
        layer, index, value = channel["layer"], int(channel["channel"]), float(channel["value"])
        merged[layer, index] = {"layer": layer, "channel": index, "value": value}
    sources.append(source)
    return {"channels": list(merged.values()), "source": "; ".join(filter(None, sources))}


def check_repairable(repository: Path, model: str, version: int) -> tuple[Path, Path]:
    """(version's folder, the new version's folder) when version + 1 can be written and served
    beside version; else RepairError. Checked before the graph is built, and again before
    anything is written."""
    model_dir = repository / model
    old, new = model_dir / str(version), model_dir / str(version + 1)
    if not old.is_dir():
        raise RepairError(f"{old} is not a folder: no version {version} of {model} to copy")
    if new.exists():
        raise RepairError(
            f"{new} exists already: version {version + 1} of {model} is taken; repair the "
            "latest version, or remove that folder"
        )
    config = model_dir / "config.pbtxt"
    if not config.is_file():
        raise RepairError(f"{config} is missing: {model_dir} is not a Triton model folder")
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    check_version_policy(config.read_text(encoding="utf-8"), version, versions)
    return old, new


def write_repaired_version(
    repository: Path,
    model: str,
    version: int,
    channels: Iterable[Mapping[str, Any]],
    source: str,
) -> Path:
    """Writes ``repository/model/(version + 1)``: a copy of ``version``'s folder with the
    ablation of ``channels`` (each with layer, channel, value). Refuses, writing nothing,
    when the new version exists, the old one does not, or the config would not serve both.
    Returns the new folder."""
    channels = list(channels)
    if not channels:
        raise RepairError("the repair names no channel to ablate: nothing to write")
    old, new = check_repairable(repository, model, version)
    ablation = _ablation(old / ABLATION_FILE, channels, source)
    # Written beside the target and renamed into place: Triton, polling the repository,
    # never sees a version folder without its ablation.
    staging = Path(tempfile.mkdtemp(prefix=f".{version + 1}.", dir=old.parent))
    try:
        copy = staging / "version"
        shutil.copytree(old, copy, symlinks=True)
        (copy / ABLATION_FILE).write_text(json.dumps(ablation, indent=2) + "\n", encoding="utf-8")
        copy.rename(new)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return new


def load_model(triton_url: str, model: str, timeout: float = LOAD_TIMEOUT_S) -> None:
    """Asks Triton (its HTTP port, e.g. http://localhost:8000) to load ``model`` again, which
    picks up the new version: POST /v2/repository/models/MODEL/load. RepairError with
    Triton's answer when it refuses (explicit model control must be on)."""
    url = f"{triton_url.rstrip('/')}/v2/repository/models/{model}/load"
    request = urllib.request.Request(url, data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - the user's URL
            return
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace").strip()
        raise RepairError(
            f"Triton refused to load {model} ({error.code}: {body or error.reason}); "
            "its model control mode must be explicit (--model-control-mode=explicit)"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RepairError(f"cannot reach Triton at {triton_url} ({reason})") from None


def load_command(triton_url: str, model: str) -> str:
    """The command that asks Triton to load ``model`` (printed when no --triton-url is given)."""
    return f"curl -X POST {triton_url.rstrip('/')}/v2/repository/models/{model}/load"
