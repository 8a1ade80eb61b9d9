"""Small SVG charts for the evaluation reports, drawn without any library.

Each function returns one ``<svg>`` element as a string, ready to inline in an
HTML page: no script, no external font or stylesheet, so a report opens the
same way offline, from a file, or behind a strict content security policy.
Every chart carries a ``<title>`` and ``<desc>`` for screen readers, and every
drawn mark a ``<title>`` of its own, which browsers show on hover.

Colours come from CSS classes (``.pass``, ``.regression``, ...) the report's
stylesheet defines, so the charts follow the page; the meaning never rests on
colour alone (verdicts are also written as text beside the chart).

All text that reaches a chart is escaped here; callers pass plain strings.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "TrendPoint", "difference_dots", "forest_plot", "trend_chart"]

_FONT = 'font-family="system-ui, sans-serif" font-size="11"'
_BIN = 0.05
"""Bin width of the difference plot, on the -1 to +1 scale of score differences."""

Scale = Callable[[float], float]


@dataclass(frozen=True, slots=True)
class TrendPoint:
    """One run on a trend line: its label (shown on hover) and its mean."""

    label: str
    value: float | None
    current: bool = False


@dataclass(frozen=True, slots=True)
class Interval:
    """One row of a forest plot: a metric's mean difference and its interval."""

    label: str
    estimate: float | None
    low: float | None
    high: float | None
    margin: float
    verdict: str


def trend_chart(
    metric: str, points: Sequence[TrendPoint], *, width: int = 320, height: int = 150
) -> str:
    """A line chart of one metric's mean across runs, oldest on the left."""
    left, right, top, bottom = 34, 10, 12, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [p.value for p in points if p.value is not None]
    low = min([0.0, *values])
    high = max([1.0, *values])

    def x(i: float) -> float:
        return left + (
            plot_w / 2 if len(points) == 1 else plot_w * i / (len(points) - 1)
        )

    def y(v: float) -> float:
        return top + plot_h * (high - v) / (high - low)

    parts = [_open("plot trend", metric, width, height)]
    parts.append(_title(f"Mean {metric} across runs", _trend_desc(metric, points)))
    parts.extend(_y_axis(left, width - right, y, (low, (low + high) / 2, high)))
    if not values:
        parts.append(_note(width / 2, top + plot_h / 2, "no scored runs yet"))
    parts.extend(_trend_lines(points, x, y))
    for i, point in enumerate(points):
        if point.value is None:
            continue
        css = "point current" if point.current else "point"
        radius = 4.5 if point.current else 3
        tip = f"{point.label}: {point.value:.3f}"
        parts.append(
            f'<circle class="{css}" cx="{x(i):.1f}" cy="{y(point.value):.1f}" '
            f'r="{radius}"><title>{_e(tip)}</title></circle>'
        )
    parts.append(
        f'<text x="{left}" y="{height - 6}" {_FONT}>{len(points)} run'
        f"{'' if len(points) == 1 else 's'}, oldest first</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def forest_plot(rows: Sequence[Interval], *, width: int = 560) -> str:
    """Each metric's mean paired difference with its interval, against its margin.

    The zero line marks "no change"; the dashed mark on each row sits at minus
    that metric's margin, the drop the comparison treats as a regression.
    """
    row_h, top, bottom, left, right = 30, 10, 28, 140, 24
    height = top + bottom + row_h * max(1, len(rows))
    span = _forest_span(rows)
    plot_w = width - left - right

    def x(v: float) -> float:
        return left + plot_w * (v + span) / (2 * span)

    parts = [_open("plot forest", "all", width, height)]
    parts.append(
        _title(
            "Mean paired difference per metric (run minus baseline)",
            "; ".join(_interval_text(r) for r in rows) or "no metrics",
        )
    )
    axis_y = height - bottom
    for tick in (-span, -span / 2, 0.0, span / 2, span):
        parts.append(
            f'<line class="grid" x1="{x(tick):.1f}" y1="{top}" x2="{x(tick):.1f}" '
            f'y2="{axis_y}"/><text x="{x(tick):.1f}" y="{axis_y + 14}" '
            f'text-anchor="middle" {_FONT}>{tick:+.2f}</text>'
        )
    parts.append(
        f'<line class="zero" x1="{x(0):.1f}" y1="{top}" x2="{x(0):.1f}" y2="{axis_y}"/>'
    )
    for i, row in enumerate(rows):
        parts.append(_forest_row(row, top + row_h * i + row_h / 2, left, x))
    parts.append("</svg>")
    return "".join(parts)


def difference_dots(
    metric: str,
    differences: dict[str, float],
    margin: float,
    *,
    width: int = 320,
    height: int = 150,
) -> str:
    """The per-question differences of one metric as a dot histogram.

    Each question is a dot stacked in its bin (0.05 wide, centred on multiples
    of 0.05, so unchanged questions sit on the zero line); when a bin holds too
    many to draw as dots, the bins become bars.
    """
    left, right, top, bottom = 16, 16, 10, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    bins: dict[int, list[tuple[str, float]]] = {}
    for question_id, diff in sorted(differences.items(), key=lambda kv: kv[1]):
        index = max(-20, min(20, round(diff / _BIN)))
        bins.setdefault(index, []).append((question_id, diff))
    tallest = max((len(b) for b in bins.values()), default=0)

    def x(v: float) -> float:
        return left + plot_w * (v + 1) / 2

    axis_y = top + plot_h
    parts = [_open("plot differences", metric, width, height)]
    parts.append(
        _title(f"Per-question difference in {metric}", _dots_desc(differences))
    )
    parts.append(
        f'<rect class="worse" x="{left}" y="{top}" width="{x(-margin) - left:.1f}" '
        f'height="{plot_h}"><title>{_e(f"drops larger than the margin ({margin:g})")}'
        "</title></rect>"
    )
    for tick in (-1.0, -0.5, 0.0, 0.5, 1.0):
        parts.append(
            f'<line class="{"zero" if tick == 0 else "grid"}" x1="{x(tick):.1f}" '
            f'y1="{top}" x2="{x(tick):.1f}" y2="{axis_y}"/><text x="{x(tick):.1f}" '
            f'y="{axis_y + 14}" text-anchor="middle" {_FONT}>{tick:+.1f}</text>'
        )
    if not differences:
        parts.append(_note(width / 2, top + plot_h / 2, "no paired questions"))
    bin_w = plot_w * _BIN / 2
    if tallest <= plot_h / 9:
        parts.extend(_dot_stacks(bins, bin_w, x, axis_y))
    else:
        parts.extend(_bars(bins, bin_w, x, axis_y, plot_h / tallest))
    parts.append("</svg>")
    return "".join(parts)


# -- pieces -------------------------------------------------------------------------


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _open(css_class: str, metric: str, width: int, height: int) -> str:
    return (
        f'<svg class="{css_class}" data-metric="{_e(metric)}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
    )


def _title(title: str, desc: str) -> str:
    return f"<title>{_e(title)}</title><desc>{_e(desc)}</desc>"


def _note(cx: float, cy: float, text: str) -> str:
    return (
        f'<text class="note" x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle" '
        f"{_FONT}>{_e(text)}</text>"
    )


def _y_axis(x1: float, x2: float, y: Scale, ticks: Sequence[float]) -> list[str]:
    return [
        f'<line class="grid" x1="{x1}" y1="{y(t):.1f}" x2="{x2}" y2="{y(t):.1f}"/>'
        f'<text x="{x1 - 4}" y="{y(t) + 4:.1f}" text-anchor="end" {_FONT}>{t:.1f}</text>'
        for t in ticks
    ]


def _trend_lines(points: Sequence[TrendPoint], x: Scale, y: Scale) -> list[str]:
    """One polyline per unbroken stretch of runs that have a mean."""
    stretches: list[list[str]] = [[]]
    for i, point in enumerate(points):
        if point.value is None:
            stretches.append([])
        else:
            stretches[-1].append(f"{x(i):.1f},{y(point.value):.1f}")
    return [
        f'<polyline class="line" fill="none" points="{" ".join(s)}"/>'
        for s in stretches
        if len(s) > 1
    ]


def _trend_desc(metric: str, points: Sequence[TrendPoint]) -> str:
    shown = [f"{p.label} {p.value:.3f}" for p in points if p.value is not None]
    return f"Mean {metric} per run, oldest first: " + (", ".join(shown) or "none")


def _forest_span(rows: Sequence[Interval]) -> float:
    """Half the x range: a round number wide enough for every interval and margin."""
    reach = [0.1]
    for row in rows:
        reach.append(row.margin * 1.5)
        reach.extend(abs(v) for v in (row.low, row.high, row.estimate) if v is not None)
    needed = max(reach) * 1.1
    return next((s for s in (0.1, 0.2, 0.3, 0.5, 0.75) if s >= needed), 1.0)


def _forest_row(row: Interval, cy: float, left: int, x: Scale) -> str:
    label = (
        f'<text x="{left - 8}" y="{cy + 4:.1f}" text-anchor="end" {_FONT}>'
        f"{_e(row.label)}</text>"
        f'<line class="margin" x1="{x(-row.margin):.1f}" y1="{cy - 10:.1f}" '
        f'x2="{x(-row.margin):.1f}" y2="{cy + 10:.1f}">'
        f"<title>{_e(f'margin: -{row.margin:g}')}</title></line>"
    )
    if row.estimate is None:
        return label + _note(x(0) + 6, cy + 4, "not enough paired questions")
    css = f"estimate {row.verdict}"
    whisker = ""
    if row.low is not None and row.high is not None:
        whisker = (
            f'<line class="ci {row.verdict}" x1="{x(row.low):.1f}" y1="{cy:.1f}" '
            f'x2="{x(row.high):.1f}" y2="{cy:.1f}"/>'
        )
    return (
        label
        + whisker
        + f'<rect class="{css}" x="{x(row.estimate) - 5:.1f}" y="{cy - 5:.1f}" '
        f'width="10" height="10"><title>{_e(_interval_text(row))}</title></rect>'
    )


def _interval_text(row: Interval) -> str:
    if row.estimate is None:
        return f"{row.label}: no paired difference ({row.verdict})"
    interval = ""
    if row.low is not None and row.high is not None:
        interval = f" [{row.low:+.3f}, {row.high:+.3f}]"
    return (
        f"{row.label}: {row.estimate:+.3f}{interval}, margin {row.margin:g}, "
        f"{row.verdict}"
    )


def _dots_desc(differences: dict[str, float]) -> str:
    if not differences:
        return "No question was scored in both runs."
    worse = sum(1 for d in differences.values() if d < 0)
    better = sum(1 for d in differences.values() if d > 0)
    same = len(differences) - worse - better
    return (
        f"{len(differences)} questions: {worse} scored lower, {better} higher, "
        f"{same} the same."
    )


def _dot_stacks(
    bins: dict[int, list[tuple[str, float]]], bin_w: float, x: Scale, axis_y: float
) -> list[str]:
    radius = min(4.0, bin_w / 2)
    parts = []
    for index, members in bins.items():
        cx = x(index * _BIN)
        for level, (question_id, diff) in enumerate(members):
            cy = axis_y - radius - 2 * radius * level - 1
            css = "dot worse" if diff < 0 else "dot"
            parts.append(
                f'<circle class="{css}" cx="{cx:.1f}" cy="{cy:.1f}" r="{radius:.1f}">'
                f"<title>{_e(f'{question_id}: {diff:+.3f}')}</title></circle>"
            )
    return parts


def _bars(
    bins: dict[int, list[tuple[str, float]]],
    bin_w: float,
    x: Scale,
    axis_y: float,
    per_question: float,
) -> list[str]:
    parts = []
    for index, members in bins.items():
        centre = index * _BIN
        bar_h = per_question * len(members)
        css = "bar worse" if index < 0 else "bar"
        tip = f"{len(members)} questions near {centre:+.2f}"
        parts.append(
            f'<rect class="{css}" x="{x(centre) - bin_w / 2 + 0.5:.1f}" '
            f'y="{axis_y - bar_h:.1f}" '
            f'width="{bin_w - 1:.1f}" height="{bar_h:.1f}"><title>{_e(tip)}</title></rect>'
        )
    return parts
