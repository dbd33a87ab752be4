"""The HTML report: one self-contained file (plotly.js inlined, no CDN) with tables and plots.

Plots are plotly figures (the library Optuna's own visualization uses): peak memory vs each
numeric hyperparameter coloured by end state, trials per worker over time with kills, recycles
and crashes marked, and available memory over time. They are drawn from ``build_report``'s dict,
so the HTML shows exactly what the text and JSON reports say.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from optuna_guard.analysis import _classify
from optuna_guard.analysis._tables import Block, Cell, Column, Note, report_blocks

END_STATE_COLORS = {
    _classify.COMPLETE: "#2ca02c",
    _classify.PRUNED: "#8c8c8c",
    _classify.FAILED: "#8c564b",
    _classify.KILLED: "#d62728",
    _classify.CRASHED: "#9467bd",
    _classify.PREEMPTED: "#ff7f0e",
    _classify.DIVERGED: "#e377c2",
    _classify.RUNNING: "#1f77b4",
    _classify.WAITING: "#bcbd22",
    "unknown": "#17becf",
}
_MARKER_STYLE = {  # event -> (label, plotly symbol, colour)
    "worker_killed": ("worker killed", "x", "#d62728"),
    "trial_killed": ("trial killed", "x-thin-open", "#d62728"),
    "worker_recycled": ("worker recycled", "triangle-down", "#1f77b4"),
    "worker_crashed": ("worker crashed", "star", "#9467bd"),
    "memory_warning": ("memory warning", "diamond-open", "#ff7f0e"),
}
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.meta { color: #666; margin-bottom: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warn { color: #a15c00; } .note { color: #666; font-style: italic; }
.grid { display: flex; flex-wrap: wrap; gap: 24px; } .grid > div { min-width: 280px; }
.plot { width: 100%; min-height: 360px; }
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The whole report as one HTML document that opens offline."""
    from plotly.offline import get_plotlyjs

    study = report["study"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>optuna-guard report: {_e(study['name'])}</title>",
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>optuna-guard report: study {_e(study['name'])}</h1>",
        f'<div class="meta">{study["n_trials"]} trials, {", ".join(_e(d) for d in study["directions"])}'
        f"{_span(study)} &middot; generated {_e(report['generated_at'])} by optuna-guard "
        f"{_e(report['optuna_guard_version'])} (report schema v{report['version']})</div>",
    ]
    parts += [_block_html(block) for block in report_blocks(report)]
    parts.append("<h2>Peak memory vs hyperparameters</h2>")
    parts.append(
        _figure_html(
            _memory_vs_params_figure(report),
            "plot-memory-vs-params",
            "no trial has both a peak_rss_gb tag and a numeric param",
        )
    )
    parts.append("<h2>Trials per worker over time</h2>")
    parts.append(_timeline_note(report))
    parts.append(
        _figure_html(_timeline_figure(report), "plot-timeline", "no trial has a start time yet")
    )
    parts.append("<h2>Memory over time</h2>")
    parts.append(
        _figure_html(
            _memory_over_time_figure(report),
            "plot-memory-over-time",
            "no memory_sample events: pass the launcher's event log with --event-log",
        )
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -- tables (their rows are built in _tables) -------------------------------------------


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _span(study: Mapping[str, Any]) -> str:
    if not study["first_start"]:
        return ""
    return f", from {_e(study['first_start'])} to {_e(study['last_complete'] or 'now')}"


def _block_html(block: Block) -> str:
    """A table under its heading, or a note as a paragraph (text escaped)."""
    if isinstance(block, Note):
        css = f' class="{block.kind}"' if block.kind != "plain" else ""
        return f"<p{css}>{_e(block.text)}</p>"
    heading = f"<h2>{_e(block.title)}</h2>"
    if not block.rows and block.empty is not None:
        return f'{heading}<p class="note">{_e(block.empty)}</p>'
    head = "".join(f"<th>{_e(c.name)}</th>" for c in block.columns)
    body = "".join(
        "<tr>"
        + "".join(_td(c, cell) for c, cell in zip(block.columns, row, strict=True))
        + "</tr>"
        for row in block.rows
    )
    return f"{heading}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(column: Column, cell: Cell) -> str:
    text = _e(cell) if isinstance(cell, str) else "<br>".join(_e(line) for line in cell)
    return f'<td class="num">{text}</td>' if column.numeric else f"<td>{text}</td>"


# -- figures --------------------------------------------------------------------------------


def _figure_html(fig: Any, div_id: str, empty_note: str) -> str:
    if fig is None:
        return f'<p class="note" id="{div_id}-empty">{_e(empty_note)}</p>'
    markup: str = fig.to_html(
        full_html=False, include_plotlyjs=False, div_id=div_id, config=_PLOT_CONFIG
    )
    return markup


def _when(ts: float | None) -> _dt.datetime | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts)


def _memory_vs_params_figure(report: Mapping[str, Any]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    plots = report["plots"]
    points = plots["memory_points"]
    params = [
        p
        for p in plots["numeric_params"]
        if any(_is_number(pt["params"].get(p["name"])) for pt in points)
    ]
    if not params:
        return None
    cols = min(3, len(params))
    rows = math.ceil(len(params) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[p["name"] for p in params],
        horizontal_spacing=0.08,
        vertical_spacing=0.18,
    )
    shown: set[str] = set()
    states = [s for s in END_STATE_COLORS if any(pt["end_state"] == s for pt in points)]
    for index, param in enumerate(params):
        row, col = index // cols + 1, index % cols + 1
        for state in states:
            chosen = [
                pt
                for pt in points
                if pt["end_state"] == state and _is_number(pt["params"].get(param["name"]))
            ]
            if not chosen:
                continue
            killed = state == _classify.KILLED
            fig.add_trace(
                go.Scatter(
                    x=[pt["params"][param["name"]] for pt in chosen],
                    y=[pt["peak_rss_gb"] for pt in chosen],
                    mode="markers",
                    name=state,
                    legendgroup=state,
                    showlegend=state not in shown,
                    marker={
                        "color": END_STATE_COLORS.get(state, "#17becf"),
                        "size": 11 if killed else 8,
                        "symbol": "x" if killed else "circle",
                        "line": {"width": 1, "color": "#333"} if killed else {"width": 0},
                        "opacity": 0.95 if killed else 0.75,
                    },
                    customdata=[pt["number"] for pt in chosen],
                    hovertemplate=f"trial %{{customdata}}<br>{param['name']}=%{{x}}<br>peak %{{y:.2f}} GB<extra>{state}</extra>",
                ),
                row=row,
                col=col,
            )
            shown.add(state)
        fig.update_xaxes(type="log" if param["log"] else "linear", row=row, col=col)
        fig.update_yaxes(title_text="peak RSS (GB)" if col == 1 else None, row=row, col=col)
    fig.update_layout(
        height=340 * rows + 60,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        legend_title_text="end state",
        template="plotly_white",
    )
    return fig


def _timeline_note(report: Mapping[str, Any]) -> str:
    plots = report["plots"]
    if plots["timeline_source"] == "event_log":
        return '<p class="note">Trial bars from the launcher\'s event log; markers: kills, recycles, crashes.</p>'
    if report["event_log"] is None:
        return '<p class="note">Trial bars from the storage (start/complete times, worker_id tag); pass --event-log for kills, recycles and crashes.</p>'
    return '<p class="note">Trial bars from the storage (the event log has no trial_started events); markers from the event log.</p>'


def _worker_label(worker_id: Any) -> str:
    return "worker ?" if worker_id is None else f"worker {worker_id}"


def _timeline_figure(report: Mapping[str, Any]) -> Any:
    import plotly.graph_objects as go

    plots = report["plots"]
    segments = [s for s in plots["timeline"] if s["start_ts"] is not None]
    marks = plots["markers"]
    if not segments and not marks:
        return None
    last = max([s["end_ts"] or s["start_ts"] for s in segments] + [m["ts"] for m in marks])
    labels = sorted(
        {_worker_label(s["worker_id"]) for s in segments}
        | {_worker_label(m["worker_id"]) for m in marks}
    )
    fig = go.Figure()
    for state in END_STATE_COLORS:
        chosen = [s for s in segments if s["end_state"] == state]
        if not chosen:
            continue
        starts = [_when(s["start_ts"]) for s in chosen]
        # a date axis takes bar lengths in milliseconds; keep very short trials visible
        lengths = [max(((s["end_ts"] or last) - s["start_ts"]) * 1000.0, 1.0) for s in chosen]
        fig.add_trace(
            go.Bar(
                base=starts,
                x=lengths,
                y=[_worker_label(s["worker_id"]) for s in chosen],
                orientation="h",
                name=state,
                marker={
                    "color": END_STATE_COLORS[state],
                    "line": {"width": 0.5, "color": "#ffffff"},
                },
                customdata=[
                    [s["trial_number"], round((s["end_ts"] or last) - s["start_ts"], 1)]
                    for s in chosen
                ],
                hovertemplate="trial %{customdata[0]}<br>%{customdata[1]} s<extra>"
                + state
                + "</extra>",
            )
        )
    for event, (label, symbol, color) in _MARKER_STYLE.items():
        chosen = [m for m in marks if m["event"] == event]
        if not chosen:
            continue
        fig.add_trace(
            go.Scatter(
                x=[_when(m["ts"]) for m in chosen],
                y=[_worker_label(m["worker_id"]) for m in chosen],
                mode="markers",
                name=label,
                marker={
                    "symbol": symbol,
                    "size": 14,
                    "color": color,
                    "line": {"width": 2, "color": color},
                },
                text=[f"trial {m['trial_number']}: {m['reason'] or ''}" for m in chosen],
                hovertemplate="%{text}<extra>" + label + "</extra>",
            )
        )
    fig.update_layout(
        barmode="overlay",
        height=max(300, 70 * len(labels) + 200),
        xaxis={"type": "date", "title": "time"},
        yaxis={"categoryorder": "array", "categoryarray": labels[::-1], "title": None},
        margin={"l": 90, "r": 20, "t": 30, "b": 50},
        legend={
            "orientation": "h",
            "yanchor": "top",
            "y": -0.3,
            "x": 0,
            "title": {"text": "end state / event: "},
        },
        template="plotly_white",
    )
    return fig


def _memory_over_time_figure(report: Mapping[str, Any]) -> Any:
    """Available memory (top) and each worker's RSS (bottom, its own scale), kills marked."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    plots = report["plots"]
    samples = plots["memory_samples"]
    available = [s for s in samples if s["available_gb"] is not None]
    rss = [s for s in samples if s["rss_gb"] is not None and s["worker_id"] is not None]
    if not available and not rss:
        return None
    rows = (["available memory (GB)"] if available else []) + (["worker RSS (GB)"] if rss else [])
    fig = make_subplots(
        rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=rows
    )
    rss_row = len(rows)
    if available:
        fig.add_trace(
            go.Scatter(
                x=[_when(s["ts"]) for s in available],
                y=[s["available_gb"] for s in available],
                mode="lines",
                name="available (system)",
                line={"color": "#1f77b4", "width": 2},
            ),
            row=1,
            col=1,
        )
    for worker in sorted({s["worker_id"] for s in rss}, key=str):
        chosen = [s for s in rss if s["worker_id"] == worker]
        fig.add_trace(
            go.Scatter(
                x=[_when(s["ts"]) for s in chosen],
                y=[s["rss_gb"] for s in chosen],
                mode="lines",
                name=f"{_worker_label(worker)} RSS",
                line={"width": 1.5},
            ),
            row=rss_row,
            col=1,
        )
    kills = [m for m in plots["markers"] if m["event"] in ("worker_killed", "trial_killed")]
    if kills:
        on_available = bool(available)
        fig.add_trace(
            go.Scatter(
                x=[_when(m["ts"]) for m in kills],
                y=[
                    (
                        m["available_gb"]
                        if m["available_gb"] is not None
                        else _nearest(available, m["ts"])
                    )
                    if on_available
                    else m["rss_gb"]
                    for m in kills
                ],
                mode="markers",
                name="kill",
                marker={"symbol": "x", "size": 13, "color": "#d62728"},
                text=[
                    f"{_worker_label(m['worker_id'])}, trial {m['trial_number']}: {m['reason'] or ''}"
                    for m in kills
                ],
                hovertemplate="%{text}<extra>kill</extra>",
                legendgroup="kill",
            ),
            row=1,
            col=1,
        )
        with_rss = [m for m in kills if m["rss_gb"] is not None]
        if on_available and rss and with_rss:  # the same kills on the killed worker's RSS line
            fig.add_trace(
                go.Scatter(
                    x=[_when(m["ts"]) for m in with_rss],
                    y=[m["rss_gb"] for m in with_rss],
                    mode="markers",
                    name="kill",
                    showlegend=False,
                    legendgroup="kill",
                    marker={"symbol": "x", "size": 13, "color": "#d62728"},
                    text=[
                        f"{_worker_label(m['worker_id'])}, trial {m['trial_number']}: {m['reason'] or ''}"
                        for m in with_rss
                    ],
                    hovertemplate="%{text}<extra>kill</extra>",
                ),
                row=rss_row,
                col=1,
            )
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(type="date")
    fig.update_xaxes(title_text="time", row=len(rows), col=1)
    fig.update_layout(
        height=260 * len(rows) + 80,
        margin={"l": 60, "r": 20, "t": 40, "b": 50},
        template="plotly_white",
    )
    return fig


def _nearest(samples: Sequence[Mapping[str, Any]], ts: float) -> float | None:
    if not samples:
        return None
    nearest: float | None = min(samples, key=lambda s: abs(s["ts"] - ts))["available_gb"]
    return nearest


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
