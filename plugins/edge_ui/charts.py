"""The Edge Releases charts: each read model of `trends` drawn server-side as a small SVG.

One function per chart turns a read model into a `Chart` (None when there is nothing to draw):
`cost_chart`, `fairness_chart`, `drift_chart`, `canary_chart`, `versions_chart`,
`quantization_chart`. A Chart carries its title, a text alternative, the SVG as a data: URI
(for `<img src>`: the pages' Content-Security-Policy allows `img-src data:` but no inline
styles) and the same figures as a table (header, rows) for `<details>` beside it.

Drawing: matplotlib's SVG backend without pyplot, text kept as text, no date in the
metadata and a fixed hash salt, so the same figures give the same bytes; colours from the
Okabe-Ito palette, with markers, hatches and line styles so that colour is never the only cue.
Each chart is rendered once per distinct content of its read model (an LRU cache keyed by the
model's JSON); renders are serialised, as matplotlib's settings are process-wide.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable
from datetime import timedelta
from functools import lru_cache, wraps

import matplotlib
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter
from pydantic import Field

from edge_ui.trends import (
    CanaryTrend,
    CostTrend,
    DriftTrend,
    FairnessGroups,
    QuantizationPoints,
    VersionsRunning,
)
from pipelines.edge.telemetry import parse_timestamp as _when
from pipelines.records import Record

# Okabe & Ito's colours, distinguishable with the common colour-vision deficiencies.
BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE, YELLOW, BLACK, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#000000", "#777777")
SERIES = (BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE, YELLOW, GREY)
HATCHES = ("", "//", "\\\\", "--")
WIDTH_IN = 6.4  # 460.8 pt: 640 px shows the 9 pt text at about 12.5 px

_STYLE = {
    "svg.fonttype": "none", "svg.hashsalt": "edge-releases", "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"], "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.facecolor": "white",
    "axes.facecolor": "white", "axes.edgecolor": "#444444", "axes.grid": True, "grid.color": "#dddddd",
    "grid.linewidth": 0.6, "axes.axisbelow": True, "axes.spines.top": False, "axes.spines.right": False,
    "legend.frameon": False, "hatch.color": BLACK, "hatch.linewidth": 0.6, "timezone": "UTC",
}
_LOCK = threading.Lock()


class Chart(Record):
    """A drawn chart and its figures as a table."""

    title: str
    alt: str = Field(description="The text alternative of the image.")
    uri: str = Field(description="data:image/svg+xml;base64,...")
    header: list[str]
    rows: list[list[str]]
    caption: str = Field("", description="What the figure caption adds to the title (sources, caveats).")


# -- drawing -------------------------------------------------------------------------------------
def _render(height_in: float, draw: Callable[[Figure], None]) -> str:
    """`draw` on a new figure WIDTH_IN wide, as an SVG data: URI."""
    with _LOCK, matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
        draw(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _by_content(build):
    """`build(record)`, computed once per distinct content of the record (its JSON is the key);
    None gives None."""

    @lru_cache(maxsize=64)
    def cached(kind: type[Record], data: str) -> Chart | None:
        return build(kind.model_validate_json(data))

    @wraps(build)
    def chart(record):
        return None if record is None else cached(type(record), record.model_dump_json())

    chart.cache_clear, chart.cache_info = cached.cache_clear, cached.cache_info
    return chart


def _time_axis(ax) -> None:
    locator = AutoDateLocator(minticks=3, maxticks=7)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _version(version: str | None) -> str:
    return f" v{version}" if version else ""


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


# -- 1. cost ---------------------------------------------------------------------------------------
@_by_content
def cost_chart(trend: CostTrend | None) -> Chart | None:
    """Monthly cost per device group (and training, and their total) against the budget, with
    the 30-day forecast and its interval."""
    forecast = trend.forecast
    bars = [(g.group, g.usd_per_month, BLUE, "", f"variant {g.variant}" if g.variant else "") for g in trend.groups]
    if trend.training_usd_per_month:
        bars.append(("training", trend.training_usd_per_month, SKY, "\\\\", "retraining, per month"))
    if trend.total_usd_per_month is not None:
        bars.append((f"total{_version(trend.version)}", trend.total_usd_per_month, GREEN, "", "release estimate"))
    if forecast is not None:
        simulated = "; history simulated from the release estimate" if forecast.simulated else ""
        bars.append((f"forecast, next {forecast.horizon_days} days", forecast.predicted_usd, ORANGE, "//",
                     f"as of {forecast.as_of}: {forecast.interval:.0%} interval {_usd(forecast.lower_usd)} to "
                     f"{_usd(forecast.upper_usd)}{simulated}"))
    if not bars:
        return None
    title = f"Cost of {trend.model}{_version(trend.version)} per month against the budget"

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        y = list(range(len(bars)))[::-1]
        ax.barh(y, [b[1] for b in bars], color=[b[2] for b in bars], hatch=[b[3] for b in bars],
                edgecolor=BLACK, linewidth=0.5, height=0.6)
        handles = []
        if trend.groups:
            handles.append(Patch(facecolor=BLUE, edgecolor=BLACK, linewidth=0.5, label="device group (estimate)"))
        if trend.training_usd_per_month:
            handles.append(Patch(facecolor=SKY, edgecolor=BLACK, hatch="\\\\", linewidth=0.5, label="training"))
        if trend.total_usd_per_month is not None:
            handles.append(Patch(facecolor=GREEN, edgecolor=BLACK, linewidth=0.5, label="total of the estimate"))
        if forecast is not None:
            spread = [[forecast.predicted_usd - forecast.lower_usd], [forecast.upper_usd - forecast.predicted_usd]]
            ax.errorbar([forecast.predicted_usd], [y[-1]], xerr=spread, capsize=4, color=BLACK, linewidth=1.2)
            handles.append(Patch(facecolor=ORANGE, edgecolor=BLACK, hatch="//", linewidth=0.5,
                                 label=f"forecast as of {forecast.as_of}" + (" (simulated history)"
                                                                            if forecast.simulated else "")))
            handles.append(Line2D([], [], color=BLACK, marker="|", markersize=8, linewidth=1.2,
                                  label=f"{forecast.interval:.0%} interval"))
        if trend.budget_usd_per_month is not None:
            ax.axvline(trend.budget_usd_per_month, color=VERMILLION, linestyle="--", linewidth=1.5)
            handles.append(Line2D([], [], color=VERMILLION, linestyle="--", linewidth=1.5,
                                  label=f"monthly budget {_usd(trend.budget_usd_per_month)}"))
        for position, (_, value, *_rest) in zip(y, bars):
            ax.annotate(_usd(value), (value, position), xytext=(4, 5), textcoords="offset points", fontsize=8)
        ax.set_yticks(y, [b[0] for b in bars])
        ax.set_xlabel("USD per month (30 days)")
        ax.set_xlim(0, max([b[1] for b in bars] + [trend.budget_usd_per_month or 0,
                                                   forecast.upper_usd if forecast else 0]) * 1.18 or 1)
        ax.grid(axis="y", visible=False)
        ax.set_title(title, loc="left")
        figure.legend(handles=handles, loc="outside lower center", ncols=2)

    parts = [f"{b[0]} {_usd(b[1])}" for b in bars if not b[0].startswith("forecast")]
    alt = f"Horizontal bar chart of the monthly cost of {trend.model}{_version(trend.version)}: " + "; ".join(parts)
    if trend.budget_usd_per_month is not None:
        alt += f"; budget {_usd(trend.budget_usd_per_month)}"
    if forecast is not None:
        alt += (f". Forecast for the {forecast.horizon_days} days from {forecast.as_of}: "
                f"{_usd(forecast.predicted_usd)} ({forecast.interval:.0%} interval {_usd(forecast.lower_usd)} "
                f"to {_usd(forecast.upper_usd)})" + (", above the budget" if forecast.breach else ""))
    rows = [[b[0], _usd(b[1]), b[4]] for b in bars]
    if trend.budget_usd_per_month is not None:
        rows.append(["budget", _usd(trend.budget_usd_per_month), "finops.monthlyBudgetUsd"])
    return Chart(title=title, alt=alt + ".", uri=_render(1.4 + 0.32 * len(bars), draw),
                 header=["item", "USD per month", "note"], rows=rows,
                 caption="Estimate from the release summary; forecast from the daily FinOps job."
                 if forecast is not None else "Estimate from the release summary; no FinOps forecast yet.")


# -- 2. fairness -----------------------------------------------------------------------------------
_FAIRNESS_AXES = {"selection_rate": ("selection rate (share positive)", BLUE),
                  "error": ("error rate (1 - accuracy)", ORANGE),
                  "mae": ("mean absolute error (target units)", ORANGE)}


@_by_content
def fairness_chart(data: FairnessGroups | None) -> Chart | None:
    """Selection rate and error rate (MAE for a regression) per sensitive group, with the
    largest value the fairness gate allows each feature's groups."""
    measured = [g for g in data.groups if not g.note]
    metrics = {"binary": ["selection_rate", "error"], "multiclass": ["error"], "regression": ["mae"]}[data.task]
    metrics = [m for m in metrics if any(getattr(g, m) is not None for g in measured)]
    if not metrics:
        return None
    features = list(dict.fromkeys(g.feature for g in measured))
    positions, at = [], 0.0
    for index, group in enumerate(measured):
        if index and group.feature != measured[index - 1].feature:
            at += 0.6  # a gap between features
        positions.append(at)
        at += 1
    verdict = "passed" if data.passed else "failed"
    title = f"Fairness of {data.model}{_version(data.version)} by group: the gate {verdict}"

    def draw(figure: Figure) -> None:
        axes = figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
        handles = []
        for ax, metric in zip(axes, metrics):
            label, colour = _FAIRNESS_AXES[metric]
            limits = {lim.feature: lim for lim in data.limits if lim.metric == metric}
            values = [getattr(g, metric) or 0.0 for g in measured]
            over = [lim is not None and v > lim.value for v, lim in
                    zip(values, (limits.get(g.feature) for g in measured))]
            ax.bar(positions, values, color=colour, edgecolor=BLACK, linewidth=0.5, width=0.7,
                   hatch=["//" if o else "" for o in over])
            name = label.split(" (")[0]
            handles.append(Patch(facecolor=colour, edgecolor=BLACK, linewidth=0.5, label=f"{name} per group"))
            for feature, limit in limits.items():
                xs = [p for p, g in zip(positions, measured) if g.feature == feature]
                ax.hlines(limit.value, xs[0] - 0.45, xs[-1] + 0.45, colors=VERMILLION, linestyles="--", linewidth=1.5)
                ax.annotate(f"{limit.value:.3g}", (xs[-1] + 0.45, limit.value), xytext=(2, 2),
                            textcoords="offset points", fontsize=8, color=VERMILLION)
            if limits:
                rule = next(iter(limits.values())).rule
                handles.append(Line2D([], [], color=VERMILLION, linestyle="--", linewidth=1.5,
                                      label=f"{name} limit: {rule.rsplit(' ', 1)[0]}"))
            if any(over):
                handles.append(Patch(facecolor=colour, edgecolor=BLACK, hatch="//", linewidth=0.5,
                                     label=f"{name} above the limit"))
            top = 1.0 if metric == "selection_rate" else 1.25 * max(values + [x.value for x in limits.values()])
            ax.set_ylim(0, (min(top, 1.0) if metric == "error" else top) or 1.0)
            ax.set_ylabel(label)
            ax.grid(axis="x", visible=False)
        figure.legend(handles=handles, loc="outside lower center", ncols=2)
        labels = [f"{g.feature}={g.group}" if len(features) > 1 else g.group for g in measured]
        crowded = max(map(len, labels)) * len(labels) > 44  # characters a 640 px axis holds side by side
        axes[-1].set_xticks(positions, labels, rotation=25 if crowded else 0, ha="right" if crowded else "center")
        axes[-1].set_xlabel(f"sensitive group ({', '.join(features)})")
        figure.align_ylabels(axes)
        axes[0].set_title(title, loc="left")

    columns = [m for m in ("selection_rate", "error", "mae") if m in metrics]
    names = {"selection_rate": "selection rate", "error": "error rate", "mae": "MAE"}

    def limit_text(group) -> str:
        found = [f"{names[lim.metric]} <= {lim.value:.3g} ({lim.rule})" for lim in data.limits
                 if lim.feature == group.feature]
        return "; ".join(found)

    rows = [[g.feature, g.group, "-" if g.count is None else f"{g.count:,}",
             *[_num(getattr(g, m)) for m in columns], limit_text(g), g.note] for g in data.groups]
    summary = "; ".join(
        f"{names[m]} " + ", ".join(f"{g.group} {_num(getattr(g, m))}" for g in measured) for m in metrics)
    limits = "; ".join(f"{names[lim.metric]} at most {lim.value:.3g} for {lim.feature}" for lim in data.limits)
    alt = (f"Bar chart of {' and '.join(names[m] for m in metrics)} per group of {', '.join(features)} for "
           f"{data.model}{_version(data.version)}: {summary}." + (f" Gate limits: {limits}." if limits else "")
           + f" The fairness gate {verdict}.")
    small = [g.group for g in data.groups if g.note]
    caption = f"From the fairness gate's evidence ({data.variant or 'shipped'} variant)." + (
        f" Not drawn, too small to compare: {', '.join(small)}." if small else "")
    return Chart(title=title, alt=alt, uri=_render(1.4 + 2.0 * len(metrics), draw),
                 header=["feature", "group", "rows", *[names[m] for m in columns], "gate limit", "note"], rows=rows,
                 caption=caption)


# -- 3. drift --------------------------------------------------------------------------------------
@_by_content
def drift_chart(trend: DriftTrend | None) -> Chart | None:
    """The share of drifted columns per drift check over time, with the threshold."""
    points = trend.points
    if not points:
        return None
    judged = [p for p in points if p.drifted_share is not None]
    unjudged = [p for p in points if p.drifted_share is None]
    title = f"Drift of {trend.model}: share of columns drifted per check"

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        handles = []
        if judged:
            ax.plot([_when(p.checked_at) for p in judged], [p.drifted_share for p in judged], color=BLUE,
                    marker="o", markersize=4, linewidth=1.4)
            handles.append(Line2D([], [], color=BLUE, marker="o", markersize=4, label="drifted share"))
        drifted = [p for p in judged if p.status == "drift"]
        if drifted:
            ax.scatter([_when(p.checked_at) for p in drifted], [p.drifted_share for p in drifted], marker="X", s=60,
                       color=VERMILLION, edgecolors=BLACK, linewidths=0.5, zorder=3)
            handles.append(Line2D([], [], color=VERMILLION, marker="X", markersize=8, markeredgecolor=BLACK,
                                  markeredgewidth=0.5, linestyle="", label="drift found"))
        if unjudged:
            ax.scatter([_when(p.checked_at) for p in unjudged], [0.0] * len(unjudged), marker="|", s=160, color=GREY,
                       linewidths=2, zorder=3, clip_on=False)
            handles.append(Line2D([], [], color=GREY, marker="|", markersize=11, markeredgewidth=2, linestyle="",
                                  label="no verdict (too few rows)"))
        limited = [p for p in points if p.threshold is not None]
        if limited:
            ax.step([_when(p.checked_at) for p in limited], [p.threshold for p in limited], where="post",
                    color=BLACK, linestyle="--", linewidth=1.2)
            handles.append(Line2D([], [], color=BLACK, linestyle="--", linewidth=1.2,
                                  label="threshold (monitoring.driftShare)"))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("columns drifted (% of compared)")
        ax.set_xlabel("time of the check (UTC)")
        _time_axis(ax)
        ax.set_title(title, loc="left")
        figure.legend(handles=handles, loc="outside lower center", ncols=2)

    last = points[-1]
    found = sum(p.status == "drift" for p in points)
    alt = (f"Line chart of the share of drifted columns in {len(points)} drift checks of {trend.model} from "
           f"{points[0].checked_at} to {last.checked_at}; {found} found drift. Latest: {last.status}"
           + (f", {_pct(last.drifted_share)} drifted against a threshold of {_pct(last.threshold)}"
              if last.drifted_share is not None else "") + ".")
    rows = [[p.checked_at, p.status.replace("_", " "), _pct(p.drifted_share), _pct(p.threshold),
             p.deployed_version or "-"] for p in reversed(points)]
    return Chart(title=title, alt=alt, uri=_render(3.2, draw),
                 header=["checked at (UTC)", "status", "drifted share", "threshold", "deployed version"], rows=rows,
                 caption="From the edge_drift_monitor checks (monitoring/<model>/ in the artifact store).")


# -- 4. canary -------------------------------------------------------------------------------------
_DECISIONS = {"advance": ("^", GREEN, "advance"), "hold": ("o", SKY, "hold"),
              "rollback": ("X", VERMILLION, "rollback"), "complete": ("s", BLACK, "complete"),
              "not_canary": ("D", GREY, "not a canary")}


def _runs(points: list, check: str, times: list) -> dict[bool, list[tuple[float, float]]]:
    """(start, width) spans, in matplotlib's date numbers, over which `check` passed and failed:
    each analysis's result holds until the next one, for at most the usual interval between
    analyses; touching spans of the same result merge."""
    from statistics import median

    from matplotlib.dates import date2num

    stamps = [float(date2num(t)) for t in times]
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
    usual = median(gaps) if gaps else 1 / 96  # a lone analysis: 15 minutes
    ends = [min(b, a + usual) for a, b in zip(stamps, stamps[1:])] + [stamps[-1] + usual]
    spans: dict[bool, list[list[float]]] = {True: [], False: []}
    for point, start, end in zip(points, stamps, ends):
        state = next((c.passed for c in point.checks if c.name == check), None)
        if state is None:
            continue
        found = spans[state]
        if found and found[-1][0] + found[-1][1] == start:
            found[-1][1] = end - found[-1][0]
        else:
            found.append([start, end - start])
    return {state: [(a, w) for a, w in found] for state, found in spans.items() if found}


@_by_content
def canary_chart(trend: CanaryTrend | None) -> Chart | None:
    """The canary's share over time (per analysis, and after its decision) and each check's
    pass or fail."""
    points = [p for p in trend.points if p.share is not None or p.share_after is not None]
    if not points:
        return None
    checks = list(dict.fromkeys(c.name for p in points for c in p.checks))
    title = f"Canary of {trend.model}: share of the devices and checks per analysis"

    def draw(figure: Figure) -> None:
        axes = figure.subplots(2 if checks else 1, 1, sharex=True, squeeze=False,
                               height_ratios=[3, 1.2] if checks else None)
        ax = axes[0, 0]
        times = [_when(p.at) for p in points]
        shares = [p.share_after if p.share_after is not None else p.share for p in points]
        ax.step(times, shares, where="post", color=BLUE, linewidth=1.4)
        handles = [Line2D([], [], color=BLUE, linewidth=1.4, label="share after the decision")]
        for decision, (marker, colour, label) in _DECISIONS.items():
            chosen = [p for p in points if p.decision == decision]
            if chosen:
                ax.scatter([_when(p.at) for p in chosen], [p.share if p.share is not None else p.share_after
                                                             for p in chosen],
                           marker=marker, s=45, color=colour, edgecolors=BLACK, linewidths=0.5, zorder=3)
                handles.append(Line2D([], [], marker=marker, color=colour, markeredgecolor=BLACK, markeredgewidth=0.5,
                                      linestyle="", markersize=7, label=label))
        previous = None
        for p in points:
            if p.version and p.version != previous:
                ax.annotate(f"v{p.version}", (_when(p.at), p.share or 0), xytext=(3, 6), textcoords="offset points",
                            fontsize=8)
                previous = p.version
        ax.set_ylim(-5, 112)
        ax.set_ylabel("devices on the canary (%)")
        ax.set_title(title, loc="left")
        if checks:
            low = axes[1, 0]
            for row, name in enumerate(checks):
                for passed, spans in _runs(points, name, times).items():
                    low.broken_barh(spans, (row - 0.3, 0.6), facecolors=BLUE if passed else VERMILLION,
                                    edgecolor=BLACK, linewidth=0.4, hatch="" if passed else "//")
            states = {c.passed for p in points for c in p.checks}
            handles += [Patch(facecolor=BLUE if passed else VERMILLION, edgecolor=BLACK, linewidth=0.4,
                              hatch="" if passed else "//", label="check passed" if passed else "check failed")
                        for passed in (True, False) if passed in states]
            low.set_yticks(range(len(checks)), [c.replace("_", " ") for c in checks])
            low.set_ylim(-0.6, len(checks) - 0.4)
            low.invert_yaxis()
            low.grid(axis="y", visible=False)
        axes[-1, 0].set_xlabel("time of the analysis (UTC)")
        _time_axis(axes[-1, 0])
        figure.legend(handles=handles, loc="outside lower center", ncols=4)

    last = points[-1]
    decisions = ", ".join(f"{n} {d}" for d, n in sorted(
        {d: sum(p.decision == d for p in points) for d in _DECISIONS}.items()) if n)
    failed = sorted({c.name for p in points for c in p.checks if not c.passed})
    alt = (f"Step chart of the canary share of {trend.model} over {len(points)} analyses from {points[0].at} to "
           f"{last.at} ({decisions}). Latest: {last.decision}{_version(last.version)} at {last.share}%"
           + (f"; checks that failed at least once: {', '.join(failed)}" if failed else "; no check failed") + ".")
    rows = [[p.at, p.version or "-", p.decision, "-" if p.share is None else f"{p.share}%",
             "-" if p.share_after is None else f"{p.share_after}%",
             ", ".join(f"{c.name} {'pass' if c.passed else 'FAIL'}" for c in p.checks) or "-"]
            for p in reversed(points)]
    return Chart(title=title, alt=alt, uri=_render(4.0 if checks else 3.0, draw),
                 header=["analysed at (UTC)", "version", "decision", "share", "share after", "checks"], rows=rows,
                 caption="From the analyses edge_rollout saves (rollouts/<model>/ in the artifact store).")


# -- 5. versions running ---------------------------------------------------------------------------
@_by_content
def versions_chart(data: VersionsRunning | None) -> Chart | None:
    """Devices per version in each device group, per day or hour, stacked."""
    if not data.rows:
        return None
    step = timedelta(days=1) if data.per == "day" else timedelta(hours=1)
    parse = (lambda b: _when(b + "T00:00:00Z")) if data.per == "day" else _when
    groups = sorted({r.group for r in data.rows})
    versions = sorted({r.version for r in data.rows}, key=_version_key)
    first, last = min(parse(r.bucket) for r in data.rows), max(parse(r.bucket) for r in data.rows)
    times = [first + i * step for i in range(int((last - first) / step) + 1)]
    index = {t: i for i, t in enumerate(times)}
    counts = {(g, v): [0] * len(times) for g in groups for v in versions}
    for r in data.rows:
        counts[(r.group, r.version)][index[parse(r.bucket)]] = r.devices
    style = {v: (SERIES[i % len(SERIES)], HATCHES[i // len(SERIES) % len(HATCHES)]) for i, v in enumerate(versions)}
    title = f"Versions of {data.model} running per device group, per {data.per}"

    def draw(figure: Figure) -> None:
        axes = figure.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
        edges = times + [times[-1] + step]
        for ax, group in zip(axes, groups):
            shown = [v for v in versions if any(counts[(group, v)])]
            columns = list(zip(*(counts[(group, v)] for v in shown)))
            # Steps hold until the next change: only buckets that change something are drawn.
            kept = [i for i in range(len(times)) if i == 0 or columns[i] != columns[i - 1]] + [len(times)]
            stacks = ax.stackplot([edges[i] for i in kept],
                                  [[counts[(group, v)][min(i, len(times) - 1)] for i in kept] for v in shown],
                                  step="post", colors=[style[v][0] for v in shown], edgecolor=BLACK, linewidth=0.3)
            for patch, version in zip(stacks, shown):
                patch.set_hatch(style[version][1])
            ax.set_ylabel("devices")
            ax.set_title(group, loc="left", fontsize=9)
            ax.grid(axis="x", visible=False)
        axes[0].set_xlim(edges[0], edges[-1])
        axes[-1].set_xlabel(f"{data.per} (UTC)")
        _time_axis(axes[-1])
        figure.suptitle(title, x=0.01, ha="left", fontsize=10)
        figure.legend(handles=[Patch(facecolor=style[v][0], hatch=style[v][1], edgecolor=BLACK, linewidth=0.3,
                                     label=f"v{v}") for v in versions],
                      loc="outside right upper", title="version")

    newest = max(r.bucket for r in data.rows)
    latest = "; ".join(f"{g}: " + ", ".join(f"v{r.version} on {r.devices}" for r in data.rows
                                            if r.group == g and r.bucket == newest) for g in groups)
    alt = (f"Stacked area charts, one per device group, of the devices running each version of {data.model} per "
           f"{data.per} from {times[0]:%Y-%m-%d} to {newest}. In {newest}: {latest}.")
    table = {}
    for r in data.rows:
        table.setdefault((r.bucket, r.group), {})[r.version] = r.devices
    rows = [[bucket, group, *[str(found.get(v, 0)) for v in versions]]
            for (bucket, group), found in sorted(table.items(), reverse=True)]
    caption = (f"From device telemetry: each device counted once per {data.per}, with its newest report; "
               f"{data.records_read:,} records read.")
    if data.truncated:
        caption += f" The cap on records read was reached: {data.oldest_read} and earlier are incomplete or missing."
    return Chart(title=title, alt=alt, uri=_render(0.9 + 1.5 * len(groups), draw),
                 header=[data.per, "device group", *[f"v{v}" for v in versions]], rows=rows, caption=caption)


# -- 6. quantization -------------------------------------------------------------------------------
_VARIANTS = {"fp32": ("o", BLUE), "dynamic": ("s", ORANGE), "static": ("^", GREEN)}


@_by_content
def quantization_chart(data: QuantizationPoints | None) -> Chart | None:
    """Each quantization variant's size and p95 latency against its score; the chosen one ringed,
    ineligible ones hollow."""
    points = data.points
    if not points:
        return None
    kib = max(p.size_bytes for p in points) < 2**20
    unit, scale = ("KiB", 2**10) if kib else ("MiB", 2**20)
    metric = "R²" if data.metric == "r2" else data.metric
    chosen = next((p for p in points if p.chosen), None)
    title = f"Quantization of {data.model}{_version(data.version)}: size, latency and {metric}"

    def draw(figure: Figure) -> None:
        axes = figure.subplots(1, 2, sharey=True)
        for ax, (x_of, label) in zip(axes, ((lambda p: p.size_bytes / scale, f"size ({unit})"),
                                            (lambda p: p.latency_p95_ms, "p95 latency (ms)"))):
            for p in points:
                marker, colour = _VARIANTS.get(p.variant, ("D", GREY))
                ax.scatter([x_of(p)], [p.score], marker=marker, s=55, color=colour if p.eligible else "white",
                           edgecolors=colour if not p.eligible else BLACK, linewidths=1.4 if not p.eligible else 0.5,
                           zorder=3)
                ax.annotate(p.variant, (x_of(p), p.score), xytext=(11 if p.chosen else 6, -3),
                            textcoords="offset points", fontsize=8)
                if p.chosen:
                    ax.scatter([x_of(p)], [p.score], marker="o", s=260, facecolors="none", edgecolors=BLACK,
                               linewidths=1.4, zorder=2)
            ax.set_xlabel(label)
            ax.margins(x=0.25, y=0.3)
        axes[0].set_ylabel(f"{metric} on the test split")
        handles = [Line2D([], [], marker=_VARIANTS.get(p.variant, ("D", GREY))[0], linestyle="",
                          color=_VARIANTS.get(p.variant, ("D", GREY))[1], markeredgecolor=BLACK, markeredgewidth=0.5,
                          markersize=7, label=p.variant) for p in points]
        if chosen:
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=13, markerfacecolor="none",
                                  markeredgecolor=BLACK, markeredgewidth=1.4, label=f"chosen ({chosen.variant})"))
        if not all(p.eligible for p in points):
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor="white",
                                  markeredgecolor=GREY, markeredgewidth=1.4, label="not eligible (hollow)"))
        figure.suptitle(title, x=0.01, ha="left", fontsize=10)
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))

    alt = (f"Scatter plots of the quantization variants of {data.model}{_version(data.version)}, size and p95 latency "
           f"against {metric}: " + "; ".join(
               f"{p.variant} {p.size_bytes / scale:,.1f} {unit}, {p.latency_p95_ms:.3f} ms, {metric} {p.score:.4f}"
               + ("" if p.eligible else " (not eligible)") for p in points)
           + (f". Chosen: {chosen.variant}." if chosen else "."))
    rows = [[p.variant + (" (chosen)" if p.chosen else ""), f"{p.size_bytes / scale:,.1f}", f"{p.latency_p50_ms:.3f}",
             f"{p.latency_p95_ms:.3f}", f"{p.score:.4f}", f"{p.score_change:+.4f}", "yes" if p.eligible else "no",
             p.note or "-"] for p in points]
    return Chart(title=title, alt=alt, uri=_render(3.0, draw),
                 header=["variant", f"size ({unit})", "p50 ms", "p95 ms", metric, f"{metric} change", "eligible",
                         "note"], rows=rows, caption=data.reason)
