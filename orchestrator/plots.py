"""Figures of a sweep's results: quality vs speed with its Pareto front, and metric vs rate.

Both read the database only, through :func:`orchestrator.queries.leaderboard`, so a plot shows
exactly the numbers (and the score) the leaderboard ranks. Only finished (``done``) trials are
drawn; failed, timed-out and invalid ones never are.

Choices a reader of the figures should know:

- One figure per (model, dataset) pair: quality and speed of different models or datasets are
  not comparable on one axis.
- Speed is comparable only within one hardware fingerprint. When the trials of a pair were
  timed on several machines, a figure that shows a hardware-dependent metric keeps only the
  trials measured on the baseline's hardware (on the most common hardware when there is no
  finished baseline) and says how many it left out in a note under the plot. Faceting would
  put each machine's points in a panel without their baseline, which is the reference the
  reader needs, so we do not facet.
- A series is a method; when one method ran with several parameter settings, each setting is
  a series of its own ("drop_layers (from=top)"), so a line never zigzags between settings.
- Metric vs rate: methods without a rate (cast, quantize) are horizontal dashed lines, like
  the baseline's dotted reference line, since they have no x position; each is labelled with
  its value on the plot and in the legend.
- Quality vs speed: each point is labelled with its rate (a rateless one with the parameters
  that set it apart, else its method), placed where it covers no marker, line or other label.
- A metric whose positive values span more than :data:`LOG_SPAN` times is drawn on a log
  axis: a collapsed variant's perplexity in the thousands would otherwise flatten the others.

Every series artist carries the SVG id ``series-<label>`` and the front ``pareto-front``, so
tests (and anyone post-processing an SVG) can find them in the rendered file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import BadInput, did_you_mean

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox
    from sqlalchemy.orm import Session

FORMATS: tuple[str, ...] = ("png", "svg")
QUALITY_VS_SPEED = "quality_vs_speed"
METRIC_VS_RATE = "metric_vs_rate"
DEFAULT_SPEED_METRIC = "decode_ms_per_token"
# Short names of the speed evaluator's decode metrics, for --speed; a stored metric of the
# same name wins.
SPEED_ALIASES: dict[str, str] = {"tokens_per_s": "decode_tokens_per_s",
                                 "ms_per_token": "decode_ms_per_token"}
# 10 × 6.25 in at 160 dpi: 1600 × 1000 px, text at 10 pt stays readable when scaled down.
FIGSIZE_IN: tuple[float, float] = (10.0, 6.25)
DPI = 160
LOG_SPAN = 20.0
BASELINE_LABEL = "baseline"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
# Amber, a hue no series of the tab10 palette has: the front never reads as a method.
FRONT_COLOR = "#f2a900"
FRONT_RING_COLOR = "#b07a00"


@dataclass(frozen=True)
class PlotFile:
    """One image written by :func:`plot_sweep`.

    ``series`` are the legend labels of the data series (each drawn with the SVG id
    :func:`series_id` of its label); ``pareto`` the trial keys on the Pareto front (quality
    vs speed only); ``notes`` the notes printed under the plot.
    """

    path: Path
    kind: str  # QUALITY_VS_SPEED or METRIC_VS_RATE
    model: str
    dataset: str
    x: str  # the metric on the x axis ("rate" for metric vs rate)
    y: str
    series: tuple[str, ...]
    pareto: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    format: str = "png"


# --------------------------------------------------------------------------- Pareto front


def pareto_front(
    points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (False, False)
) -> list[int]:
    """Indices (ascending) of the points no other point dominates.

    A point dominates another when it is at least as good on both coordinates and strictly
    better on one, "good" meaning larger where ``maximize`` says so and smaller elsewhere.
    Identical non-dominated points are all kept: neither is better than the other, and
    dropping one would hide a trial from the front. NaN has no order and is refused.
    """
    signs = tuple(-1.0 if up else 1.0 for up in maximize)
    if len(signs) != 2:
        raise ValueError(f"maximize must have two entries, not {maximize!r}")
    costs = []
    for i, (x, y) in enumerate(points):
        if math.isnan(x) or math.isnan(y):
            raise ValueError(f"point {i} is ({x!r}, {y!r}); NaN has no place on a front")
        costs.append((signs[0] * x, signs[1] * y))
    order = sorted(range(len(costs)), key=lambda i: costs[i])
    front: list[int] = []
    best = math.inf  # smallest second cost among points with a strictly smaller first cost
    start = 0
    while start < len(order):
        first = costs[order[start]][0]
        end = start
        while end < len(order) and costs[order[end]][0] == first:
            end += 1
        # Sorted by (first, second): the group's head has its smallest second cost.
        lowest = costs[order[start]][1]
        if lowest < best:
            front.extend(i for i in order[start:end] if costs[i][1] == lowest)
            best = lowest
        start = end
    return sorted(front)


# --------------------------------------------------------------------------- data


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")
    return slug or "x"


def series_id(label: str) -> str:
    """The SVG id of the series labelled ``label`` (``series-drop_layers``)."""
    return f"series-{_slug(label)}"


def _value(row: dict[str, Any], metric: str) -> float | None:
    from orchestrator.queries import COMPUTED_METRICS

    value = row[metric] if metric in COMPUTED_METRICS else row["metrics"].get(metric)
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _direction(rows: Sequence[dict[str, Any]], metric: str) -> str | None:
    """The direction most rows store for ``metric`` (computed metrics are higher-better)."""
    from orchestrator.queries import COMPUTED_METRICS

    if metric in COMPUTED_METRICS:
        return "higher"
    stored = Counter(d for row in rows if (d := row["directions"].get(metric)) is not None)
    if not stored:
        return None
    (top, count), *rest = stored.most_common()
    if rest and rest[0][1] == count:  # a tie: the first row's, as the leaderboard does
        return next(row["directions"][metric] for row in rows
                    if row["directions"].get(metric) is not None)
    return top


def _axis_label(metric: str, direction: str | None) -> str:
    return metric if direction is None else f"{metric} ({direction} is better)"


def _fmt(value: float) -> str:
    """A value as a label: 4 significant digits; large whole numbers (counts) in full."""
    if abs(value) >= 1e4 and float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def _series_labels(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
    """``{trial_key: series label}`` (the method, with the parameters that vary within it)
    and ``{trial_key: those parameters alone}`` ("" when none vary)."""
    params_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if not row["is_baseline"]:
            params_of[row["method"]].append(row["params"] or {})
    varying: dict[str, list[str]] = {}
    for method, all_params in params_of.items():
        keys = sorted({k for p in all_params for k in p})
        varying[method] = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True,
                                                              default=str)
                                                   for p in all_params}) > 1]
    labels, variants = {}, {}
    for row in rows:
        key = row["trial_key"]
        if row["is_baseline"]:
            labels[key], variants[key] = BASELINE_LABEL, ""
            continue
        params = row["params"] or {}
        shown = ", ".join(f"{k}={_param_text(params.get(k))}" for k in varying[row["method"]])
        labels[key] = f"{row['method']} ({shown})" if shown else row["method"]
        variants[key] = shown
    return labels, variants


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _hardware(session: Session, sweep: str) -> dict[str, str | None]:
    """``{trial_key: hardware fingerprint}`` of the finished trials of ``sweep``."""
    from sqlalchemy import select

    from orchestrator.db.models import Environment, Sweep, Trial

    rows = session.execute(
        select(Trial.trial_key, Environment.hardware_fingerprint)
        .join(Sweep, Trial.sweep_id == Sweep.id)
        .outerjoin(Environment, Trial.environment_id == Environment.id)
        .where(Sweep.name == sweep, Trial.status == "done")
    ).all()
    return {key: fingerprint for key, fingerprint in rows}


def _one_hardware(rows: list[dict[str, Any]], hardware: dict[str, str | None]
                  ) -> tuple[list[dict[str, Any]], str | None]:
    """The rows timed on the reference hardware and a note when others were left out.

    The reference is the baseline's hardware, or the most common one without a baseline
    (ties: the first in grid order). A trial with no recorded hardware is never comparable.
    """
    fingerprints = [hardware.get(r["trial_key"]) for r in rows]
    known = [f for f in fingerprints if f is not None]
    if not known:
        return rows, None
    base = next((hardware.get(r["trial_key"]) for r in rows if r["is_baseline"]), None)
    if base is not None:
        reference, whose = base, "the baseline's hardware"
    else:
        counts = Counter(known)
        top = max(counts.values())
        reference = next(f for f in known if counts[f] == top)
        whose = "the most common hardware (no finished baseline)"
    kept = [r for r, f in zip(rows, fingerprints, strict=True) if f == reference]
    left_out = len(rows) - len(kept)
    if not left_out:
        return rows, None
    return kept, (f"speed is comparable only within one hardware fingerprint: showing the "
                  f"trials measured on {whose} ({reference[:8]}); {left_out} trial(s) measured "
                  "on other hardware left out")


# --------------------------------------------------------------------------- drawing helpers


def _new_figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: Agg, no display, no pyplot global state
    return fig


def _scale_axis(ax: Axes, axis: str, values: Iterable[float]) -> None:
    """Log scale when positive values span more than LOG_SPAN times; plain numbers always."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

    values = [v for v in values if v is not None]
    target = ax.xaxis if axis == "x" else ax.yaxis
    if values and min(values) > 0 and max(values) / min(values) > LOG_SPAN:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        target.set_minor_formatter(NullFormatter())
    else:
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_powerlimits((-4, 6))
        target.set_major_formatter(formatter)


def _legend(ax: Axes, title: str | None = None, extra: dict[Any, Any] | None = None) -> None:
    """The legend, outside the axes on the right where it can never cover a point.

    ``extra`` maps a handle to a tuple of handles drawn together in its entry (the front's
    line with its ring).
    """
    from matplotlib.legend_handler import HandlerTuple

    handles, labels = ax.get_legend_handles_labels()
    handles = [(h, *extra[h]) if extra and h in extra else h for h in handles]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, frameon=False, fontsize=9, title=title, title_fontsize=9,
              alignment="left", handler_map={tuple: HandlerTuple(ndivide=None, pad=0.0)})


def _notes(fig: Figure, notes: Sequence[str]) -> None:
    """Notes under the plot; the layout leaves them room."""
    import textwrap

    if not notes:
        return
    lines = [wrapped for note in notes
             for wrapped in textwrap.wrap("• " + note, width=150, subsequent_indent="  ")]
    height = (len(lines) * 9 * 1.35 + 8) / 72 / FIGSIZE_IN[1]  # 9 pt lines, in figure units
    fig.get_layout_engine().set(rect=(0.0, height, 1.0, 1.0 - height))
    fig.text(0.01, height - 4 / 72 / FIGSIZE_IN[1], "\n".join(lines), ha="left", va="top",
             fontsize=9, color="0.3", linespacing=1.35)


def _overlap(a: Bbox, b: Bbox) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def _outside(box: Bbox, frame: Bbox) -> float:
    """Area of ``box`` outside ``frame``."""
    return box.width * box.height - _overlap(box, frame)


def _dot(x: float, y: float, radius: float) -> Bbox:
    from matplotlib.transforms import Bbox

    return Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)


def _path_boxes(xy: Sequence[tuple[float, float]], radius: float, step: float = 5.0
                ) -> list[Bbox]:
    """Small boxes along a polyline in display space: obstacles for labels."""
    boxes = []
    for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        boxes.extend(_dot(x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n, radius)
                     for k in range(n + 1))
    if len(xy) == 1:
        boxes.append(_dot(*xy[0], radius))
    return boxes


# Offsets (points) tried around a marker, nearest first; the first that overlaps nothing wins.
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_RADII = (6.0, 13.0, 22.0, 34.0)
_LEADER_FROM = 20.0


def _place(frame: Bbox, obstacles: list[Bbox], placed: list[Bbox],
           candidates: Sequence[Callable[[], Any]], measure: Callable[[], Bbox]) -> int:
    """Apply each candidate placement in turn; keep the first that overlaps nothing (or the
    least overlapping), record its box in ``placed`` and return its index."""
    best, best_cost = 0, math.inf
    for i, apply in enumerate(candidates):
        apply()
        box = measure()
        cost = 50.0 * _outside(box, frame) + sum(_overlap(box, o) for o in placed) * 4.0 \
            + sum(_overlap(box, o) for o in obstacles)
        if cost < best_cost:
            best, best_cost = i, cost
        if cost == 0.0:
            break
    candidates[best]()
    placed.append(measure().expanded(1.0, 1.0))
    return best


def _label_points(ax: Axes, renderer: RendererBase, points: Sequence[tuple[float, float]],
                  texts: Sequence[str], colors: Sequence[Any], obstacles: list[Bbox],
                  placed: list[Bbox]) -> None:
    """Annotate each data point (data coordinates) with its text where the text overlaps no
    marker, line or other label; a text pushed far from its marker gets a leader line."""
    frame = ax.get_window_extent(renderer)
    box_style = {"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.7}
    for xy, text, color in zip(points, texts, colors, strict=True):
        ann = ax.annotate(text, xy=xy, xytext=(0, 0), textcoords="offset points", fontsize=8,
                          color=color, zorder=6, bbox=box_style)
        ann.set_in_layout(False)
        options = []
        for radius in _RADII:
            for dx, dy in _DIRECTIONS:
                scale = radius / math.hypot(dx, dy)

                def apply(dx: int = dx, dy: int = dy, scale: float = scale,
                          ann: Any = ann) -> None:
                    ann.xyann = (dx * scale, dy * scale)
                    ann.set_ha({1: "left", -1: "right", 0: "center"}[dx])
                    ann.set_va({1: "bottom", -1: "top", 0: "center"}[dy])

                options.append((radius, apply))
        chosen = _place(frame, obstacles, placed, [o[1] for o in options],
                        lambda ann=ann: ann.get_window_extent(renderer))
        if options[chosen][0] >= _LEADER_FROM:
            leader = ax.annotate(text, xy=xy, xytext=ann.xyann, textcoords="offset points",
                                 fontsize=8, color=color, zorder=6, ha=ann.get_ha(),
                                 va=ann.get_va(), bbox=box_style,
                                 arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.45",
                                             "shrinkA": 0, "shrinkB": 5})
            leader.set_in_layout(False)
            ann.remove()


def _freeze_layout(fig: Figure) -> RendererBase:
    """Lay the figure out once and fix it, so labels placed from now on stay where they are
    measured; returns the renderer to measure them with."""
    fig.canvas.draw()
    fig.set_layout_engine("none")
    return fig.canvas.get_renderer()


def _display(ax: Axes, xy: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    if not xy:
        return []
    return [tuple(p) for p in ax.transData.transform(list(xy))]


def _save(fig: Figure, stem: Path, formats: Sequence[str]) -> list[tuple[Path, str]]:
    from matplotlib import rc_context

    written = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        # No date and a fixed salt for the SVG's internal ids: the same results give the same
        # file, so a report kept in git changes only when the numbers do.
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        with rc_context({"svg.hashsalt": "compress-sweep"}):
            fig.savefig(path, format=fmt, dpi=DPI, metadata=metadata)
        written.append((path, fmt))
    return written


# --------------------------------------------------------------------------- the two plots


@dataclass
class _Pair:
    """The finished trials of one (model, dataset) of a sweep."""

    sweep: str
    model: str
    dataset: str
    rows: list[dict[str, Any]]
    labels: dict[str, str]  # trial_key -> series label
    variants: dict[str, str]  # trial_key -> the parameters that set it apart in its method
    order: list[str]  # series labels in grid order, baseline first
    hardware: dict[str, str | None]

    def style(self, label: str) -> dict[str, Any]:
        """Color and marker of a series, the same in every figure of the pair."""
        if label == BASELINE_LABEL:
            return {"color": "black", "marker": "*"}
        from matplotlib import colormaps

        i = [s for s in self.order if s != BASELINE_LABEL].index(label)
        palette = colormaps["tab10"].colors
        return {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)]}

    def title(self, what: str) -> str:
        return f"{self.sweep}: {what}\nmodel {self.model} · dataset {self.dataset}"


def _quality_vs_speed(pair: _Pair, quality: str, speed: str, stem: Path,
                      formats: Sequence[str], hardware_bound: frozenset[str],
                      skipped: list[str]) -> list[PlotFile]:
    rows, notes = pair.rows, []
    if {quality, speed} & hardware_bound:
        rows, note = _one_hardware(rows, pair.hardware)
        if note:
            notes.append(note)
    points = [(r, x, y) for r in rows
              if (x := _value(r, speed)) is not None and (y := _value(r, quality)) is not None]
    lacking = len(rows) - len(points)
    if not points:
        skipped.append(f"{QUALITY_VS_SPEED} of {pair.model} × {pair.dataset}: no finished "
                       f"trial has both {quality} and {speed}")
        return []
    if lacking:
        notes.append(f"{lacking} finished trial(s) without {quality} or {speed} not shown")
    x_dir, y_dir = _direction(pair.rows, speed), _direction(pair.rows, quality)

    fig = _new_figure()
    ax = fig.add_subplot()
    ax.set_title(pair.title(f"{quality} vs {speed}"), fontsize=11)
    ax.set_xlabel(_axis_label(speed, x_dir))
    ax.set_ylabel(_axis_label(quality, y_dir))
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    _scale_axis(ax, "x", [p[1] for p in points])
    _scale_axis(ax, "y", [p[2] for p in points])

    series: list[str] = []
    by_series: dict[str, list[tuple[dict[str, Any], float, float]]] = defaultdict(list)
    for point in points:
        by_series[pair.labels[point[0]["trial_key"]]].append(point)
    for label in pair.order:
        if label not in by_series:
            continue
        style = pair.style(label)
        members = by_series[label]
        is_base = label == BASELINE_LABEL
        ax.plot([p[1] for p in members], [p[2] for p in members], linestyle="none",
                marker=style["marker"], color=style["color"], markersize=15 if is_base else 8,
                markeredgecolor="white", markeredgewidth=0.8, zorder=4 if is_base else 3,
                label=label, gid=series_id(label))
        series.append(label)

    front_keys: list[str] = []
    front_xy: list[tuple[float, float]] = []
    if x_dir is None or y_dir is None:
        unknown = speed if x_dir is None else quality
        notes.append(f"no direction is stored for {unknown}: no Pareto front drawn")
    else:
        front = pareto_front([(p[1], p[2]) for p in points],
                             maximize=(x_dir == "higher", y_dir == "higher"))
        chosen = sorted((points[i] for i in front), key=lambda p: (p[1], p[2]))
        front_keys = [p[0]["trial_key"] for p in chosen]
        front_xy = [(p[1], p[2]) for p in chosen]
        # The boundary of what the front dominates: flat after a point when lower x is better.
        (line,) = ax.plot(
            [p[0] for p in front_xy], [p[1] for p in front_xy],
            drawstyle="steps-post" if x_dir == "lower" else "steps-pre",
            color=FRONT_COLOR, linewidth=6.0, alpha=0.45, solid_capstyle="round",
            solid_joinstyle="round", zorder=2,
            label=f"Pareto front ({len(front_xy)} trial{'s' * (len(front_xy) != 1)})",
            gid="pareto-front")
        rings = ax.plot([p[0] for p in front_xy], [p[1] for p in front_xy], linestyle="none",
                        marker="o", markersize=14, markerfacecolor="none",
                        markeredgecolor=FRONT_RING_COLOR, markeredgewidth=1.6, zorder=5,
                        gid="pareto-points")
        front_handles = {line: tuple(rings)}
    ax.margins(0.08)
    _legend(ax, "point labels: rate", front_handles if front_xy else None)
    _notes(fig, notes)

    renderer = _freeze_layout(fig)
    shown = _display(ax, [(p[1], p[2]) for p in points])
    obstacles = [_dot(x, y, 9.0 * DPI / 72) for x, y in shown]
    if front_xy:
        obstacles += _path_boxes(_display(ax, _steps(front_xy, x_dir == "lower")), 2.5)
    _label_points(ax, renderer, [(p[1], p[2]) for p in points],
                  [_point_text(p[0], pair) for p in points],
                  [_darker(pair.style(pair.labels[p[0]["trial_key"]])["color"]) for p in points],
                  obstacles, [])
    return [PlotFile(path=path, kind=QUALITY_VS_SPEED, model=pair.model, dataset=pair.dataset,
                     x=speed, y=quality, series=tuple(series), pareto=tuple(front_keys),
                     notes=tuple(notes), format=fmt)
            for path, fmt in _save(fig, stem, formats)]


def _steps(xy: Sequence[tuple[float, float]], post: bool) -> list[tuple[float, float]]:
    """The corners of a step line through ``xy`` (sorted by x), as matplotlib draws it."""
    out = [xy[0]]
    for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
        out.append((x1, y0) if post else (x0, y1))
        out.append((x1, y1))
    return out


def _point_text(row: dict[str, Any], pair: _Pair) -> str:
    if row["is_baseline"]:
        return BASELINE_LABEL
    if row["rate"] is not None:
        return f"{row['rate']:g}"
    # No rate: the color names the method; the parameters (or the name) tell points apart.
    return pair.variants[row["trial_key"]] or row["method"]


def _darker(color: Any) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(0.75 * c for c in to_rgb(color))


def _metric_vs_rate(pair: _Pair, metric: str, stem: Path, formats: Sequence[str],
                    hardware_bound: frozenset[str], skipped: list[str]) -> list[PlotFile]:
    rows, notes = pair.rows, []
    if metric in hardware_bound:
        rows, note = _one_hardware(rows, pair.hardware)
        if note:
            notes.append(note)
    valued = [(r, v) for r in rows if (v := _value(r, metric)) is not None]
    if not valued:
        skipped.append(f"{metric} vs rate of {pair.model} × {pair.dataset}: no finished trial "
                       f"has a value of {metric}")
        return []
    lacking = len(rows) - len(valued)
    if lacking:
        why = " (a score needs the quality metric and the time per token, timed on the " \
              "baseline's hardware)" if metric in ("score", "speed_norm") else ""
        notes.append(f"{lacking} finished trial(s) without {metric} not shown{why}")
    direction = _direction(pair.rows, metric)

    fig = _new_figure()
    ax = fig.add_subplot()
    ax.set_title(pair.title(f"{metric} vs rate"), fontsize=11)
    ax.set_ylabel(_axis_label(metric, direction))
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    _scale_axis(ax, "y", [v for _, v in valued])

    by_series: dict[str, list[tuple[dict[str, Any], float]]] = defaultdict(list)
    for row, value in valued:
        by_series[pair.labels[row["trial_key"]]].append((row, value))
    series: list[str] = []
    rated_xy: list[tuple[float, float]] = []
    lines_xy: list[list[tuple[float, float]]] = []
    levels: list[tuple[str, float, Any]] = []  # (label, value, color) of horizontal lines
    for label in pair.order:
        members = by_series.get(label)
        if not members:
            continue
        style = pair.style(label)
        rated = sorted(((r["rate"], v) for r, v in members if r["rate"] is not None))
        if label == BASELINE_LABEL or not rated:
            value = members[0][1]
            base = label == BASELINE_LABEL
            ax.axhline(value, color=style["color"], linestyle=":" if base else "--",
                       linewidth=1.6 if base else 1.4, zorder=2, gid=series_id(label),
                       label=f"{label}: {_fmt(value)} "
                             f"({'no compression' if base else 'no rate'})")
            levels.append((label, value, style["color"]))
            if len(members) > 1:
                notes.append(f"{label}: {len(members)} trials, the first in grid order is drawn")
        else:
            ax.plot([p[0] for p in rated], [p[1] for p in rated], color=style["color"],
                    marker=style["marker"], markersize=7, linewidth=1.8, zorder=3,
                    markeredgecolor="white", markeredgewidth=0.7, label=label,
                    gid=series_id(label))
            rated_xy += rated
            lines_xy.append(rated)
        series.append(label)

    rates = sorted({x for x, _ in rated_xy})
    if rates:
        ax.set_xlabel("rate")
        if len(rates) <= 12:
            ax.set_xticks(rates, [f"{r:g}" for r in rates])
        span = (rates[-1] - rates[0]) or max(abs(rates[0]), 1.0)
        ax.set_xlim(rates[0] - 0.08 * span, rates[-1] + 0.08 * span)
    else:
        ax.set_xlabel("rate (no method with a rate finished)")
        ax.set_xlim(0.0, 1.0)
        ax.set_xticks([])
    ax.margins(y=0.1)
    _legend(ax)
    _notes(fig, notes)

    renderer = _freeze_layout(fig)
    frame = ax.get_window_extent(renderer)
    obstacles = [_dot(x, y, 6.0 * DPI / 72) for x, y in _display(ax, rated_xy)]
    for xy in lines_xy:
        obstacles += _path_boxes(_display(ax, xy), 2.0)
    for _, value, _ in levels:
        y = ax.transData.transform((0.0, value))[1]
        obstacles += _path_boxes([(frame.x0, y), (frame.x1, y)], 1.5, step=12.0)
    placed: list[Bbox] = []
    for label, value, color in levels:  # the reference lines are labelled on the plot too
        ann = ax.annotate(f"{label} {_fmt(value)}", xy=(0.0, value),
                          xycoords=ax.get_yaxis_transform(), xytext=(0, 0),
                          textcoords="offset points", fontsize=8, color=_darker(color),
                          zorder=6, bbox={"boxstyle": "round,pad=0.12", "fc": "white",
                                          "ec": "none", "alpha": 0.8})
        ann.set_in_layout(False)
        options = []
        for x_frac, ha in ((0.99, "right"), (0.01, "left"), (0.5, "center")):
            for dy, va in ((2, "bottom"), (-2, "top")):
                def apply(x_frac: float = x_frac, ha: str = ha, dy: int = dy, va: str = va,
                          ann: Any = ann, value: float = value) -> None:
                    ann.xy = (x_frac, value)
                    ann.xyann = (0, dy)
                    ann.set_ha(ha)
                    ann.set_va(va)

                options.append(apply)
        _place(frame, obstacles, placed, options,
               lambda ann=ann: ann.get_window_extent(renderer))
    return [PlotFile(path=path, kind=METRIC_VS_RATE, model=pair.model, dataset=pair.dataset,
                     x="rate", y=metric, series=tuple(series), notes=tuple(notes), format=fmt)
            for path, fmt in _save(fig, stem, formats)]


# --------------------------------------------------------------------------- entry point


def _check_metric(metric: str, available: set[str], sweep: str, option: str) -> None:
    if metric not in available:
        raise BadInput(
            f"{option}: unknown metric {metric!r} in sweep {sweep!r}"
            f"{did_you_mean(metric, available)}; available: {', '.join(sorted(available))}"
        )


def _stems(sweep: str, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """File name stems ``<sweep>__<model>__<dataset>`` that stay apart when slugs collide."""
    stems: dict[tuple[str, str], str] = {}
    used: set[str] = set()
    for model, dataset in pairs:
        stem = f"{_slug(sweep)}__{_slug(model)}__{_slug(dataset)}"
        if stem in used:  # e.g. org/name and org:name
            digest = hashlib.sha256(f"{model}\0{dataset}".encode()).hexdigest()[:8]
            stem = f"{stem}-{digest}"
        used.add(stem)
        stems[(model, dataset)] = stem
    return stems


def plot_sweep(
    session: Session,
    sweep: str,
    out_dir: Path,
    formats: Sequence[str] = ("png",),
    quality: str | None = None,
    speed: str | None = None,
    metrics: Sequence[str] | None = None,
    *,
    skipped: list[str] | None = None,
) -> list[PlotFile]:
    """Draw the plots of ``sweep`` into ``out_dir``; one entry per file written.

    Per (model, dataset): ``quality`` (default the spec's ``score.quality_metric``) against
    ``speed`` (default ``decode_ms_per_token``) with the Pareto front, then each of
    ``metrics`` (default the quality metric and ``score``) against the rate. Each figure is
    written in every one of ``formats`` (png, svg). Any stored metric, or ``score``,
    ``perf_norm``, ``speed_norm``, may be named (``speed`` also ``tokens_per_s`` or
    ``ms_per_token``, see :data:`SPEED_ALIASES`); the direction shown and used for the front
    is the stored one.

    A metric named explicitly that no finished trial stores raises :class:`BadInput` listing
    those that exist; so does a sweep without finished trials. A figure the data cannot
    make (a default metric nobody measured) is left out, with the reason appended to
    ``skipped`` when given.
    """
    from sqlalchemy import select

    from orchestrator import queries
    from orchestrator.db.models import Sweep

    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise BadInput(f"--format must be one of {', '.join(FORMATS)}, not "
                       f"{', '.join(map(repr, bad)) or 'nothing'}")
    formats = list(dict.fromkeys(formats))
    rows = queries.leaderboard(session, metric="score", sweep=sweep)
    rows = sorted((r for r in rows if r["status"] == "done"), key=lambda r: r["position"])
    if not rows:
        raise BadInput(f"no finished trials in sweep {sweep}; nothing to plot")
    spec = session.scalar(select(Sweep.spec).where(Sweep.name == sweep)) or {}
    spec_quality = (spec.get("score") or {}).get("quality_metric") \
        or queries.DEFAULT_QUALITY_METRIC

    available = set(queries.COMPUTED_METRICS) | {m for r in rows for m in r["metrics"]}
    if quality is not None:
        _check_metric(quality, available, sweep, "--quality")
    if speed is not None:
        if speed not in available and SPEED_ALIASES.get(speed) in available:
            speed = SPEED_ALIASES[speed]
        _check_metric(speed, available, sweep, "--speed")
    for metric in metrics or ():
        _check_metric(metric, available, sweep, "--metric")
    quality = quality or spec_quality
    speed = speed or DEFAULT_SPEED_METRIC
    vs_rate = list(dict.fromkeys(metrics or (quality, "score")))
    notes_out = skipped if skipped is not None else []
    for metric in dict.fromkeys((quality, speed, *vs_rate)):
        if metric not in available:
            notes_out.append(f"no finished trial of sweep {sweep} stores {metric}; the plots "
                             "of it are left out")

    hardware = _hardware(session, sweep)
    hardware_bound = queries.hardware_dependent_metrics()
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_pair[(row["model"], row["dataset"])].append(row)
    stems = _stems(sweep, by_pair)
    written: list[PlotFile] = []
    for (model, dataset), pair_rows in by_pair.items():
        labels, variants = _series_labels(pair_rows)
        order = list(dict.fromkeys(
            [BASELINE_LABEL] * any(r["is_baseline"] for r in pair_rows)
            + [labels[r["trial_key"]] for r in pair_rows]))
        pair = _Pair(sweep, model, dataset, pair_rows, labels, variants, order, hardware)
        stem = out_dir / stems[(model, dataset)]
        if quality in available and speed in available:
            written += _quality_vs_speed(pair, quality, speed,
                                         stem.with_name(f"{stem.name}__{QUALITY_VS_SPEED}"),
                                         formats, hardware_bound, notes_out)
        for metric in vs_rate:
            if metric in available:
                written += _metric_vs_rate(
                    pair, metric, stem.with_name(f"{stem.name}__{_slug(metric)}_vs_rate"),
                    formats, hardware_bound, notes_out)
    return written
