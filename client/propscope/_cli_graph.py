"""``propscope graph`` and ``propscope repair`` output: the graph's nodes, edges, task graph
and repair as rows (``_cli_layout``: nothing cut), ``plain`` lines or one JSON object, and the
HTML report (the SVG drawing and the same tables)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from rich.text import Text

from propscope._cli_layout import Column, number, print_rows
from propscope._cli_output import OutputFormat, note, plain_line, stdout_console, write_json
from propscope._graph import GraphEdge, GraphNode, GraphResult, TaskEdge, TaskNode

__all__ = ["print_graph", "write_graph_report"]

NODE_COLUMNS = (
    Column("node"),
    Column("score", numeric=True),
    Column("q", numeric=True),
    Column("Δp", numeric=True),
    Column("kept"),
)
EDGE_COLUMNS = (
    Column("edge"),
    Column("direct", numeric=True),
    Column("path effect", numeric=True),
    Column("q", numeric=True),
    Column("kept"),
)
TASK_COLUMNS = (
    Column("node or edge"),
    Column("share", numeric=True),
    Column("bootstrap", numeric=True),
    Column("mean score", numeric=True),
)
REPAIR_COLUMNS = (
    Column("channel"),
    Column("value", numeric=True),
    Column("movement", numeric=True),
    Column("score", numeric=True),
)


def _tested(nodes: Sequence[GraphNode]) -> list[GraphNode]:
    return [node for node in nodes if not node.screened_out]


def _node_row(node: GraphNode) -> list[str]:
    return [
        node.key,
        number(node.score),
        number(node.q_value),
        number(node.probability_change),
        "yes" if node.relevant else "no",
    ]


def _edge_row(edge: GraphEdge) -> list[str]:
    return [
        f"{edge.source} -> {edge.target}",
        number(edge.direct_effect),
        number(edge.path_effect),
        number(edge.q_value),
        "yes" if edge.relevant else "no",
    ]


def _images(indices: Sequence[int]) -> str:
    return ("image " if len(indices) == 1 else "images ") + ", ".join(map(str, indices))


def _task_order(item: TaskNode | TaskEdge) -> tuple[float, float]:
    """The task graph's rows: the most shared first, then by mean score."""
    return (-item.share, -item.mean_score)


def _rows(result: GraphResult) -> list[tuple[str, Sequence[Column], list[list[str]]]]:
    """(title, columns, rows) of every table: per image its significant nodes by score
    and its edges, each marked kept when relevant (``GraphResult.kept_nodes``/``kept_edges``:
    significant and a large enough change), then the task graph and the repair."""
    tables: list[tuple[str, Sequence[Column], list[list[str]]]] = []
    for image in range(result.images):
        label = result.target_labels[image] if image < len(result.target_labels) else ""
        target = result.targets[image] if image < len(result.targets) else 0
        tested = _tested(result.image_nodes(image))
        significant = [node for node in tested if node.significant]
        significant.sort(key=lambda node: node.score, reverse=True)
        title = (
            f"image {image}, class {target}{f' ({label})' if label else ''}: "
            f"{len(result.kept_nodes(image))} of {len(tested)} tested channels kept "
            f"(relevant), {len(significant)} significant (by score)"
        )
        tables.append((title, NODE_COLUMNS, [_node_row(node) for node in significant]))
        edges = result.image_edges(image)
        if edges:
            title = f"image {image}: {len(result.kept_edges(image))} of {len(edges)} edges kept"
            tables.append((title, EDGE_COLUMNS, [_edge_row(e) for e in edges]))
    task = result.task_graph
    if task is not None:
        rows = [
            [
                node.key,
                number(node.share),
                number(node.bootstrap_frequency),
                number(node.mean_score),
            ]
            for node in sorted(task.nodes, key=_task_order)
        ] + [
            [
                f"{edge.source} -> {edge.target}",
                number(edge.share),
                number(edge.bootstrap_frequency),
                number(edge.mean_score),
            ]
            for edge in sorted(task.edges, key=_task_order)
        ]
        excluded = task.excluded_images
        title = (
            f"task graph of class {task.target_class}"
            f"{f' ({task.target_label})' if task.target_label else ''} over {len(task.images)} "
            f"images, min share {number(task.min_share)}"
            + (f" ({_images(task.excluded_images)} excluded: another class)" if excluded else "")
        )
        tables.append((title, TASK_COLUMNS, rows))
    repair = result.repair
    if repair is not None:
        rows = [
            [f"{c.layer}:{c.channel}", number(c.value), number(c.movement), number(c.score)]
            for c in repair.channels
        ]
        tables.append((f"repair of {repair.property}: channels to ablate", REPAIR_COLUMNS, rows))
    return tables


def print_graph(
    model: str, images: Sequence[str], result: GraphResult, output: OutputFormat
) -> None:
    """``propscope graph``'s stdout: ``json`` one object (the result, whose ``images`` is
    their count, and ``image_files``, the names),
    ``plain`` a ``node``/``edge``/``task_node``/``task_edge``/``repair_channel`` line per
    item, ``warning`` lines and a ``graph`` line; ``table`` the tables and the warnings."""
    if output is OutputFormat.JSON:
        write_json({"model": model, **result.to_dict(), "image_files": list(images)})
        return
    if output is OutputFormat.PLAIN:
        _print_plain(model, images, result)
        return
    console = stdout_console()
    version = f" version {result.model_version}" if result.model_version else ""
    layers = ", ".join(f"{layer.name} ({layer.channels})" for layer in result.layers)
    console.print(
        Text(f"propscope graph: {model}{version}, layers {layers}", style="bold"), soft_wrap=True
    )
    console.print(
        Text(
            f"{result.images} images, {result.steps} steps, baseline {result.baseline_source}; "
            f"{result.passes} forward passes, {result.total_ms:.0f} ms"
        )
    )
    for warning in result.warnings:
        console.print(note("", "warning: ", warning, "yellow"))
    for title, columns, rows in _rows(result):
        if rows:
            # Printed apart: a table's own title wraps at the table's width, not the terminal's.
            console.print(Text(title, style="bold"))
            print_rows(console, "", columns, rows)
        else:
            console.print(Text(f"{title}: none"))
    if result.repair is not None:
        for warning in result.repair.warnings:
            console.print(note("", "warning: ", warning, "yellow"))


def _print_plain(model: str, images: Sequence[str], result: GraphResult) -> None:
    for node in _tested(result.nodes):
        plain_line(
            "node",
            [
                ("model", model),
                ("image", images[node.image] if node.image < len(images) else node.image),
                ("layer", node.layer),
                ("channel", node.channel),
                ("score", node.score),
                ("p_value", node.p_value),
                ("q_value", node.q_value),
                ("probability_change", node.probability_change),
                ("significant", node.significant),
                ("relevant", node.relevant),
            ],
        )
    for edge in result.edges:
        plain_line(
            "edge",
            [
                ("model", model),
                ("image", images[edge.image] if edge.image < len(images) else edge.image),
                ("source", edge.source),
                ("target", edge.target),
                ("direct_effect", edge.direct_effect),
                ("path_effect", edge.path_effect),
                ("q_value", edge.q_value),
                ("significant", edge.significant),
                ("relevant", edge.relevant),
            ],
        )
    task = result.task_graph
    if task is not None:
        for node in task.nodes:
            plain_line(
                "task_node",
                [
                    ("model", model),
                    ("class", task.target_class),
                    ("node", node.key),
                    ("share", node.share),
                    ("bootstrap_frequency", node.bootstrap_frequency),
                    ("mean_score", node.mean_score),
                ],
            )
        for edge in task.edges:
            plain_line(
                "task_edge",
                [
                    ("model", model),
                    ("class", task.target_class),
                    ("source", edge.source),
                    ("target", edge.target),
                    ("share", edge.share),
                    ("bootstrap_frequency", edge.bootstrap_frequency),
                    ("mean_score", edge.mean_score),
                ],
            )
    if result.repair is not None:
        for channel in result.repair.channels:
            plain_line(
                "repair_channel",
                [
                    ("model", model),
                    ("property", result.repair.property),
                    ("layer", channel.layer),
                    ("channel", channel.channel),
                    ("value", channel.value),
                    ("movement", channel.movement),
                    ("score", channel.score),
                ],
            )
    warnings = [*result.warnings, *(result.repair.warnings if result.repair else ())]
    for warning in warnings:
        plain_line("warning", [("model", model), ("message", warning)])
    plain_line(
        "graph",
        [
            ("model", model),
            ("version", result.model_version),
            ("images", result.images),
            ("nodes", len(_tested(result.nodes))),
            ("edges", len(result.edges)),
            ("kept_nodes", sum(len(result.kept_nodes(i)) for i in range(result.images))),
            ("kept_edges", sum(len(result.kept_edges(i)) for i in range(result.images))),
            ("passes", result.passes),
            ("total_ms", round(result.total_ms)),
        ],
    )


def write_graph_report(path: Path, model: str, images: Sequence[str], result: GraphResult) -> None:
    """One self-contained HTML page: the drawing (SVG when Graphviz's dot is there, else
    the DOT text) and the tables of ``propscope graph``."""
    try:
        drawing = result.to_svg()
    except RuntimeError as error:
        drawing = (
            f"<p>{html.escape(str(error))}; the DOT text:</p>"
            f"<pre>{html.escape(result.to_dot())}</pre>"
        )
    else:
        drawing = drawing[drawing.find("<svg") :]  # inline: no XML prolog
    sections = []
    for title, columns, rows in _rows(result):
        head = "".join(f"<th>{html.escape(c.header)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in rows
        )
        sections.append(
            f"<h2>{html.escape(title)}</h2>"
            + (f"<table><tr>{head}</tr>{body}</table>" if rows else "<p>none</p>")
        )
    warnings = "".join(
        f"<li>{html.escape(w)}</li>"
        for w in (*result.warnings, *(result.repair.warnings if result.repair else ()))
    )
    title = f"propscope graph: {model} version {result.model_version}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>images: {html.escape(", ".join(images))}; layers: {
        html.escape(", ".join(f"{layer.name} ({layer.channels})" for layer in result.layers))
    }; {result.steps} steps, baseline {html.escape(result.baseline_source)}, {result.passes}
forward passes, {result.total_ms:.0f} ms</p>
{f"<ul>{warnings}</ul>" if warnings else ""}
{drawing}
{"".join(sections)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")
