"""What ``propscope explain``, ``models`` and ``evaluate`` print, in each ``--format``: rows laid
out by ``_cli_layout`` (a table when it fits, else a block per row), ``key=value`` lines for
``plain`` and JSON lines for ``json``."""

from __future__ import annotations

import enum
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from propscope._attribution import Evaluation, EvaResult
from propscope._cli_layout import Column, logfmt, number, print_rows
from propscope._events import Accepted, Decision, Done, Event, ModelInfo, PropertyResult

__all__ = [
    "ExplainOutput",
    "OutputFormat",
    "eva_lines",
    "eva_pairs",
    "in_cli_terms",
    "plain_line",
    "print_evaluation",
    "print_models",
    "stdout_console",
    "write_json",
]


class OutputFormat(enum.Enum):
    TABLE = "table"
    PLAIN = "plain"
    JSON = "json"


def plain_line(kind: str, pairs: Iterable[tuple[str, object]]) -> None:
    """One ``plain`` output line on stdout: its kind, then logfmt ``key=value`` pairs."""
    sys.stdout.write(f"{kind} {logfmt(pairs)}\n")


def stdout_console() -> Console:
    """The console of tables, blocks and notes. On a terminal, rich's own. In a pipe (CI logs,
    files) lines carry no trailing spaces (rich pads table cells), and a note or timings line
    stays whole on one line for grep (soft wrap) unless COLUMNS asks for a width: then words
    wrap at it, as a log viewer of that width would show them."""
    console = Console()
    if console.is_terminal:
        return console
    return Console(file=_TrimmedLines(sys.stdout), soft_wrap="COLUMNS" not in os.environ)


class _TrimmedLines(io.TextIOBase):
    """Writes each line to ``file`` without its trailing spaces."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._file.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._file.write(self._partial)
            self._partial = ""
        self._file.flush()


def write_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# The request fields the server's messages name, in the command line's words (the longer
# phrase first, where one contains another).
_CLI_TERMS = (
    ("(Property.region)", "(a ;mask=FILE or ;box=LEFT,TOP,RIGHT,BOTTOM suffix of --property)"),
    ("model.preprocessing.output_kind", "--output-kind"),
    ("pass model.preprocessing in the request", "pass --mean, --std, --output-kind or --resize"),
    ("pass model.preprocessing", "pass --mean, --std, --output-kind or --resize"),
    ("reference_images or choose baseline zero", "--reference images or choose --baseline zero"),
    ("lower min_probability_change", "lower --min-probability-change"),
    ("a design_size of", "a --design-size of"),
    (
        "steps, a smaller nodes_per_layer (pre-screens wide layers) or max_edges",
        "--steps, a smaller --nodes-per-layer (pre-screens wide layers) or --max-edges",
    ),
)


def in_cli_terms(message: str) -> str:
    """``message`` (a server's warning or error) with the request fields it names that an
    option sets spelt as that option."""
    for field, option in _CLI_TERMS:
        message = message.replace(field, option)
    return message


def note(where: str, kind: str, message: str, style: str) -> Text:
    text = Text(where, style="bold")
    text.append(kind, style=style)
    text.append(in_cli_terms(message))
    return text


# Decisions whose reason is printed under the table: the ones a caller acts on (a longer
# path, or a look at the curve). The others' reasons are in --format json.
_EXPLAINED_DECISIONS = (Decision.NOT_SIGNIFICANT, Decision.CANNOT_REACH_ALPHA)
_DECISION_CELLS = {
    Decision.RELEVANT: ("relevant", "bold green"),
    Decision.NOT_SIGNIFICANT: ("not significant", "yellow"),
    Decision.CHANGE_TOO_SMALL: ("Δp too small", "dim"),
    Decision.CANNOT_REACH_ALPHA: ("undecided", "yellow"),
}
_EXPLAIN_COLUMNS = (
    Column("property"),
    Column("score", numeric=True),
    Column("p-value", numeric=True),
    Column("Δp", numeric=True),
    Column("N", numeric=True),
    Column("decision"),
    Column("flip"),
    Column("target"),
)


class ExplainOutput:
    """Prints one explain run's events as they arrive (``json``) or each model's lines
    (``plain``) or rows (``table``) once its stream has ended, in the request's order (model
    by model, then property by property, whatever order they finished in: diffable logs), so
    a refused call prints its message alone. ``failed`` counts the properties that failed or
    got no result."""

    def __init__(self, output_format: OutputFormat) -> None:
        self._format = output_format
        self._console = stdout_console()
        self._accepted: dict[str, Accepted] = {}
        self._results: dict[str, dict[str, PropertyResult]] = {}
        self._done: dict[str, Done] = {}
        self._finished: set[str] = set()
        self.failed = 0

    def event(self, model: str, event: Event) -> None:
        if self._format is OutputFormat.JSON:
            write_json({"event": type(event).__name__, "model": model, **event.to_dict()})
        if isinstance(event, Accepted):
            self._accepted[model] = event
            self._results[model] = {}
        elif isinstance(event, PropertyResult):
            self._results.setdefault(model, {})[event.property_name] = event
            self.failed += not event.ok
        elif isinstance(event, Done):
            self._done[model] = event

    def finish(self, model: str) -> None:
        """The model's stream has ended (or failed): a property of its plan without a result
        counts as failed, and ``plain`` and ``table`` print what the model has."""
        if model in self._finished:
            return
        self._finished.add(model)
        accepted = self._accepted.get(model)
        results = self._results.get(model, {})
        missing = [n for n in (accepted.property_names if accepted else ()) if n not in results]
        self.failed += len(missing)
        if self._format is OutputFormat.PLAIN:
            self._print_plain(model)
        if self._format is not OutputFormat.TABLE or not results:
            return
        title = f"propscope explain: {model}"
        if accepted is not None and accepted.model_version:
            title += f" (version {accepted.model_version})"
        rows = [self._row(model, result) for result in self._in_request_order(model)]
        rows += [[name, "", "", "", "", Text("no result", style="red"), "", ""] for name in missing]
        print_rows(self._console, title, _EXPLAIN_COLUMNS, rows)
        for line in self._notes(model):
            self._console.print(line)
        done = self._done.get(model)
        if done is not None:
            self._console.print(self._timings(model, done))
        self._console.print()

    def _in_request_order(self, model: str) -> list[PropertyResult]:
        """The model's results in its plan's order, whatever order they finished in."""
        results = self._results.get(model, {})
        accepted = self._accepted.get(model)
        planned = [n for n in (accepted.property_names if accepted else ()) if n in results]
        return [results[n] for n in planned] + [
            result for name, result in results.items() if name not in planned
        ]

    def _print_plain(self, model: str) -> None:
        accepted = self._accepted.get(model)
        for warning in accepted.warnings if accepted else ():
            self._line("warning", model=model, message=warning)
        for result in self._in_request_order(model):
            self._line("result", **self._plain_result(model, result))
            for warning in result.warnings:
                self._line("warning", model=model, property=result.property_name, message=warning)
        done = self._done.get(model)
        if done is not None:
            self._line("done", **self._plain_done(model, done))

    def _line(self, kind: str, **pairs: object) -> None:
        for key in ("message", "error"):
            if isinstance(pairs.get(key), str):
                pairs[key] = in_cli_terms(pairs[key])
        plain_line(kind, pairs.items())
        sys.stdout.flush()

    def _plain_result(self, model: str, result: PropertyResult) -> dict[str, object]:
        pairs: dict[str, object] = {
            "model": model,
            "property": result.property_name,
            "status": result.status_code.name,
        }
        if not result.ok:
            return {**pairs, "error": result.error}
        return {
            **pairs,
            "decision": result.decision.value,
            "score": result.score,
            "p_value": result.p_value,
            "probability_change": result.probability_change,
            "steps": result.steps,
            "significant": result.significant,
            "relevant": result.relevant,
            "flipped": result.prediction_flipped,
            "flip_rate": result.flip_rate,
            "target_class": result.target_class,
            "target_label": self._class_name(model, result),
        }

    def _plain_done(self, model: str, done: Done) -> dict[str, object]:
        hits, misses = self._cache(model)
        return {
            "model": model,
            "total_ms": round(done.total_ms),
            "properties_failed": done.properties_failed,
            "cache_hits": hits,
            "cache_misses": misses,
            "request_id": done.request_id or None,
        }

    def _row(self, model: str, result: PropertyResult) -> list[str | Text]:
        if not result.ok:
            return [result.property_name, "", "", "", "", Text("failed", style="red"), "", ""]
        word, style = _DECISION_CELLS.get(
            result.decision,
            ("relevant", "bold green") if result.relevant else ("not relevant", "dim"),
        )
        flips = "yes" if result.prediction_flipped else "no"
        if result.prediction_flipped and len(result.samples) > 1:
            flips = f"{result.flip_rate:.0%}"
        return [
            result.property_name,
            number(result.score),
            number(result.p_value, 2),
            _change(result.probability_change),
            str(result.steps or ""),
            Text(word, style=style),
            flips,
            self._class(model, result),
        ]

    def _class_name(self, model: str, result: PropertyResult) -> str | None:
        accepted = self._accepted.get(model)
        return result.target_label or (
            accepted.class_name(result.target_class) if accepted is not None else None
        )

    def _class(self, model: str, result: PropertyResult) -> str:
        """The class name when the model has labels (its index is in --format json), else the
        index."""
        return self._class_name(model, result) or str(result.target_class)

    def _cache(self, model: str) -> tuple[int, int]:
        """Path cache hits and misses over the model's properties."""
        results = self._results.get(model, {}).values()
        return sum(r.cache_hits for r in results), sum(r.cache_misses for r in results)

    def _notes(self, model: str) -> list[Text]:
        """The model's Accepted warnings; per property, its decision in words (for the
        decisions a caller acts on), its warnings and its error: whole, wrapped by the console
        rather than cut."""
        lines: list[Text] = []
        accepted = self._accepted.get(model)
        for warning in accepted.warnings if accepted else ():
            lines.append(note(f"{model}: ", "warning: ", warning, "yellow"))
        for result in self._in_request_order(model):
            where = f"{result.property_name}: "
            if not result.ok:
                lines.append(
                    note(where, "failed: ", f"{result.status_code.name}: {result.error}", "red")
                )
                continue
            if result.decision in _EXPLAINED_DECISIONS:
                lines.append(note(where, "", result.decision_detail, ""))
            for warning in result.warnings:
                lines.append(note(where, "warning: ", warning, "yellow"))
        return lines

    def _timings(self, model: str, done: Done) -> Text:
        hits, misses = self._cache(model)
        # The stages' times add up over properties that run at the same time: they can
        # exceed the total, which the line says rather than let them read as a breakdown.
        text = Text(
            f"{model}: total {done.total_ms:.0f} ms, edit {done.edit_ms:.0f} ms, "
            f"classify {done.classify_ms:.0f} ms, score {done.score_ms:.0f} ms "
            "(stage times summed over properties run in parallel); "
            f"path cache {hits} hits, {misses} misses"
        )
        if done.request_id:
            text.append(f" (request {done.request_id})", style="dim")
        if done.properties_failed:
            text.append(f", failed properties: {done.properties_failed}", style="red")
        return text


def _change(value: float) -> str:
    """Δp: two decimals, and "<0.01" rather than a misleading 0.00."""
    return "<0.01" if 0 < value < 0.005 else f"{value:.2f}"


_MODEL_COLUMNS = (
    Column("name"),
    Column("role"),
    Column("versions"),
    Column("state"),
    Column("inputs", wraps=True),
    Column("parameters / preprocessing", wraps=True, label=""),
)


def eva_lines(eva: EvaResult) -> list[Text]:
    """What an EVA map rests on, for the attribute summary: the guarantee first (a hybrid's in
    yellow), then the overlap's bounds, certification and adversary, and the verdict (an
    undecided ball names the bound's looseness); numbers whole."""
    label = f" ({eva.adversary_label})" if eva.adversary_label else ""
    certified = "yes" if eva.certified else "no"
    if eva.certified and not eva.guaranteed:
        certified += " (by a hybrid bound: NOT guaranteed)"
    between = (
        "the true overlap lies between"
        if eva.guaranteed
        else "a hybrid bound may lie below the true overlap"
    )
    return [
        Text(
            f"bounds: {eva.guarantee}, {eva.bound}, epsilon {number(eva.epsilon)} of the "
            f"pixel range",
            style="green" if eva.guaranteed else "yellow",
        ),
        Text(
            f"overlap bound {number(eva.overlap_bound)} (every region perturbed), sampled "
            f"overlap {number(eva.sampled_overlap)} ({eva.samples} samples): {between}"
        ),
        Text(f"certified: {certified}; adversary class {eva.adversary_class}{label}"),
        Text(f"verdict: {eva.verdict}", style="green" if eva.decision == "certified" else ""),
        Text(f"{eva.bound_passes} bound passes, {eva.sample_passes} sampled passes"),
    ]


def eva_pairs(eva: EvaResult) -> list[tuple[str, object]]:
    """The EVA figures of ``--format plain``'s attribution line."""
    return [
        ("guaranteed", eva.guaranteed),
        ("bound", eva.bound),
        ("epsilon", eva.epsilon),
        ("hybrid_layer", eva.hybrid_layer or None),
        ("overlap_bound", eva.overlap_bound),
        ("sampled_overlap", eva.sampled_overlap),
        ("certified", eva.certified),
        ("decision", eva.decision),
        ("adversary_class", eva.adversary_class),
        ("adversary_label", eva.adversary_label or None),
        ("bound_passes", eva.bound_passes),
        ("sample_passes", eva.sample_passes),
    ]


def print_models(infos: Sequence[ModelInfo], output_format: OutputFormat) -> None:
    """``propscope models``: a row per model (``plain``: a line), then each model's state
    reason: why one is not READY, or which of a READY model's versions failed to load."""
    if output_format is OutputFormat.JSON:
        for info in infos:
            write_json(info.to_dict())
        return
    if output_format is OutputFormat.PLAIN:
        for info in infos:
            plain_line(
                "model",
                [
                    ("name", info.name),
                    ("role", _role(info)),
                    ("versions", ",".join(info.versions)),
                    ("state", info.state),
                    ("reason", info.state_reason or None),
                ],
            )
        return
    console = stdout_console()
    rows = [
        [
            info.name,
            _role(info),
            ", ".join(info.versions),
            Text(info.state, style="green" if info.state == "READY" else "yellow"),
            "\n".join(
                f"{t.name} {t.datatype}[{','.join(str(d) for d in t.shape)}]" for t in info.inputs
            ),
            "\n".join(_model_details(info)),
        ]
        for info in infos
    ]
    print_rows(console, "propscope models", _MODEL_COLUMNS, rows)
    for info in infos:
        if info.state_reason:
            console.print(note(f"{info.name}: ", f"{info.state}: ", info.state_reason, "yellow"))


def _role(info: ModelInfo) -> str:
    return "editor" if not info.is_classifier else "classifier"


def _model_details(info: ModelInfo) -> list[str]:
    if not info.is_classifier:
        return [
            f"{p.name}={p.default_value}" + (f" ({'|'.join(p.choices)})" if p.choices else "")
            for p in info.editor_parameters
        ]
    details = [] if info.preprocessing.empty else [info.preprocessing.describe()]
    if info.class_labels:
        details.append(_labels_summary(info.class_labels))
    if info.methods:
        details.append(f"methods: {', '.join(info.methods)}")
    if info.layers:
        details.append(
            "layers: " + ", ".join(f"{layer.name} ({layer.channels})" for layer in info.layers)
        )
    return details


def _labels_summary(labels: Sequence[str], shown: int = 4) -> str:
    head = ", ".join(labels[:shown])
    more = f", ... ({len(labels)} classes)" if len(labels) > shown else ""
    return f"labels: {head}{more}"


# Whether a higher value of a metric means a better map (or method).
_BETTER = {
    "deletion": "lower",
    "insertion": "higher",
    "mu_fidelity": "higher",
    "stability": "lower",
}
_EVALUATION_COLUMNS = (
    Column("metric"),
    Column("value", numeric=True),
    Column("better"),
    Column("passes", numeric=True),
    Column("settings", wraps=True),
)


def print_evaluation(
    model: str, image: str, found: Evaluation, output_format: OutputFormat
) -> None:
    """``propscope evaluate``: a row per metric (``plain``: a line), then the warnings (``plain``:
    a ``warning`` line each, as ``explain`` writes them)."""
    if output_format is OutputFormat.JSON:
        write_json({"model": model, "image": image, **found.to_dict()})
        return
    if output_format is OutputFormat.PLAIN:
        for result in found.results:
            plain_line(
                "metric",
                [
                    ("model", model),
                    ("metric", result.metric),
                    ("value", result.value),
                    ("passes", result.forward_passes),
                    ("target_class", found.target_class),
                ],
            )
        for warning in found.warnings:
            plain_line("warning", [("model", model), ("message", warning)])
        for result in found.results:
            for warning in result.warnings:
                plain_line(
                    "warning", [("model", model), ("metric", result.metric), ("message", warning)]
                )
        return
    console = stdout_console()
    label = f" ({found.target_label})" if found.target_label else ""
    version = f" version {found.model_version}" if found.model_version else ""
    title = (
        f"propscope evaluate: {model}{version}, class {found.target_class}{label}, "
        f"{found.target_score}"
    )
    rows = [
        [
            result.metric,
            number(result.value),
            _BETTER.get(result.metric, ""),
            str(result.forward_passes),
            result.settings,
        ]
        for result in found.results
    ]
    print_rows(console, title, _EVALUATION_COLUMNS, rows)
    for warning in found.warnings:
        console.print(note("", "warning: ", warning, "yellow"))
    for result in found.results:
        for warning in result.warnings:
            console.print(note(f"{result.metric}: ", "warning: ", warning, "yellow"))
