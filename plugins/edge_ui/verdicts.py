"""Gate verdicts in words, for the Edge Releases pages.

- `verdict_rows`: one row per comparison the gate's rule makes (its `checks` in
  `pipelines.gates` and `pipelines.finops.cost`), passed or not: what was compared, the observed
  value and the limit with units, the comparison, and the spec field that sets the limit.
- `context_rows`: the other figures the verdict records that are worth reading (rows compared,
  champion version, drifted columns, training cost...), without empty ones.
- `summary_checks`: the rows of each verdict of a release summary, by gate name.

A waived verdict has no rows, only its waiver. A gate this module does not know, or figures its
rule cannot read, has no rows either, and its recorded figures as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pydantic import Field

from pipelines.gates import VARIANTS, Check, by_variant, number
from pipelines.records import Figure, GateVerdict, Record


class VerdictRow(Record):
    """One comparison a gate made, in words."""

    label: str = Field(description='What was compared, e.g. "p95 latency on the budget-phones group".')
    observed: str = Field(description='The observed value with its unit; "not measured" when it is missing.')
    comparison: str = Field(description='How the observed value must relate to the limit: "≥", "≤" or "<"; '
                                        'empty when nothing was measured.')
    limit: str = Field(description="The limit with its unit; empty when the rule has none.")
    field: str = Field(description="The spec (or device catalog) field that sets the limit.")
    passed: bool
    variant: str | None = Field(None, description="The shipped variant the figures are of.")
    group: str | None = Field(None, description="The device group, or the sensitive feature, compared.")
    detail: str = Field("", description="What the observed value was computed from, e.g. the champion's value.")


class VerdictFact(Record):
    """A figure a verdict records besides what its checks compare."""

    label: str
    value: str = ""
    listed: list[str] = Field(default_factory=list, description="A figure that is a list (drifted columns).")


# -- units -----------------------------------------------------------------------------------------
Unit = Callable[[float, int | None], str]


def _plain(value: float, digits: int | None) -> str:
    """`digits` decimals; None: as few as the figure needs (a limit as the spec wrote it)."""
    return f"{value:,.6g}" if digits is None else f"{value:,.{digits}f}"


def _percent(value: float, digits: int | None) -> str:
    return f"{_plain(100 * value, digits)}%"


def _points(value: float, digits: int | None) -> str:
    text = _plain(100 * value, digits)
    return f"{text} point{'' if text == '1' else 's'}"


def _ms(value: float, digits: int | None) -> str:
    return f"{_plain(value, digits)} ms"


def _mib(value: float, digits: int | None) -> str:
    return f"{_plain(value / 2**20, digits)} MiB"


def _usd(value: float, digits: int | None) -> str:
    return f"${value:,.2f}/month"


def _rows(value: float, digits: int | None) -> str:
    return f"{value:,.0f}"


_COMPARISONS = {"min": "≥", "max": "≤", "regression": "≤"}
_METRICS = {"accuracy": "accuracy", "f1_macro": "macro F1", "roc_auc": "ROC AUC", "r2": "R²",
            "mae": "mean absolute error", "rmse": "root mean squared error", "log_loss": "log loss"}
_SHARES = frozenset({"accuracy", "f1_macro", "roc_auc"})  # values in %, their differences in points
_GAPS = {"demographic_parity_difference": "demographic parity difference",
         "equalized_odds_difference": "equalized odds difference",
         "accuracy_difference": "accuracy gap", "mae_difference": "mean absolute error gap"}


def _metric(name: str) -> str:
    return _METRICS.get(name, name.replace("_", " "))


def _value(metric: str) -> tuple[Unit, int]:
    """How a quality metric's value reads: a share in %, anything else as a number."""
    return (_percent, 2) if metric in _SHARES else (_plain, 4)


def _change(metric: str) -> tuple[Unit, int]:
    """How a change of a quality metric reads: a share's in points, anything else as a number."""
    return (_points, 2) if metric in _SHARES else (_plain, 4)


def _gap(metric: str) -> tuple[Unit, int]:
    """How a gap between groups reads: a difference of rates in points, of errors in the target's units."""
    return (_plain, 4) if metric == "mae_difference" else (_points, 2)


def _row(check: Check, label: str, unit: tuple[Unit, int], detail: str = "") -> VerdictRow:
    show, digits = unit
    limit = "" if check.limit is None else show(check.limit, None)
    if check.limit_text:
        limit += f" ({check.limit_text})"
    comparison = "" if check.kind == "missing" else "<" if check.strict else _COMPARISONS[check.kind]
    return VerdictRow(label=label, observed="not measured" if check.observed is None else show(check.observed, digits),
                      comparison=comparison, limit=limit, field=check.field, passed=check.passed,
                      variant=check.variant, group=check.group, detail=detail)


def _fact(label: str, value: Figure, unit: tuple[Unit, int | None] = (_plain, None)) -> VerdictFact | None:
    """A recorded figure as a fact; None when it is absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (str, bool)):
        return VerdictFact(label=label, value=str(value))
    show, digits = unit
    return VerdictFact(label=label, value=show(float(value), digits))


# -- quality ---------------------------------------------------------------------------------------
def _quality_rows(verdict: GateVerdict) -> list[VerdictRow]:
    from pipelines.gates.quality import checks

    rows = []
    for check in checks(verdict.thresholds, verdict.observed):
        name = _metric(check.metric)
        if check.kind != "regression":
            rows.append(_row(check, f"{name} on the held-out test rows", _value(check.metric)))
            continue
        show, digits = _value(check.metric)
        detail = f"{show(check.value, digits)} against {show(check.baseline, digits)} for champion v{check.champion}"
        worse = "drop in" if check.direction == "higher" else "rise in"
        rows.append(_row(check, f"{worse} {name} vs champion v{check.champion}", _change(check.metric), detail))
    return rows


def _quality_facts(verdict: GateVerdict) -> list[VerdictFact | None]:
    from pipelines.gates.quality import checks

    judged = checks(verdict.thresholds, verdict.observed)
    measured = {c.metric for c in judged}
    compared = {c.metric for c in judged if c.kind == "regression"}
    champion = verdict.observed.get("champion_version")
    facts = [_fact("champion compared against", None if champion is None else f"v{champion}")]
    for key, value in verdict.observed.items():
        name, _, side = key.rpartition(".")
        if side == "candidate" and name not in measured:
            facts.append(_fact(f"{_metric(name)} on the held-out test rows", value, _value(name)))
        elif side == "champion" and name not in compared:
            facts.append(_fact(f"{_metric(name)} of champion v{champion}", value, _value(name)))
    return facts


# -- fairness --------------------------------------------------------------------------------------
def _fairness_rows(verdict: GateVerdict) -> list[VerdictRow]:
    from pipelines.gates.fairness import checks

    rows = []
    for observed in by_variant(verdict.observed).values():
        for check in checks(verdict.thresholds, observed):
            if check.metric == "min_group_accuracy":
                rows.append(_row(check, "lowest accuracy of any group", (_percent, 2)))
            else:
                across = f" across {check.group}" if check.group else ""
                rows.append(_row(check, _GAPS[check.metric] + across, _gap(check.metric)))
    return rows


def _fairness_facts(verdict: GateVerdict) -> list[VerdictFact | None]:
    from pipelines.gates.fairness import GAP_METRICS, checks

    parts = by_variant(verdict.observed)
    facts = [VerdictFact(label="variants judged", listed=[v for v in parts if v])] if any(parts) else []
    for variant, observed in parts.items():
        judged = checks(verdict.thresholds, observed)
        of = f" ({variant})" if len(parts) > 1 else ""
        for key, value in observed.items():
            metric, _, feature = key.partition(".")
            if metric in GAP_METRICS and feature and not any(c.metric == metric and c.group == feature for c in judged):
                facts.append(_fact(f"{_GAPS[metric]} across {feature}{of}", value, _gap(metric)))
        if not any(c.metric == "min_group_accuracy" for c in judged):
            facts.append(_fact(f"lowest accuracy of any group{of}", observed.get("min_group_accuracy"), (_percent, 2)))
        facts.append(_fact(f"largest mean absolute error of any group{of}", observed.get("max_group_mae"), (_plain, 4)))
    size = number(verdict.thresholds.get("min_group_size"))
    if size is not None:
        facts.append(VerdictFact(label="groups compared", value=f"those with at least {size:,.0f} rows "
                                                                 f"(smaller ones are reported, not compared)"))
    return facts


# -- quantization parity ---------------------------------------------------------------------------
def _parity_rows(verdict: GateVerdict) -> list[VerdictRow]:
    from pipelines.gates.parity import checks

    rows = []
    for observed in by_variant(verdict.observed).values():
        score = str(observed.get("metric") or "accuracy")
        for check in checks(verdict.thresholds, observed):
            if check.metric == "accuracy":
                show, digits = _value(score)
                detail = f"{show(check.value, digits)} against {show(check.baseline, digits)} for fp32"
                label = f"drop in {_metric(score)} from fp32 to the {check.variant} variant"
                rows.append(_row(check, label, (_points, 2), detail))
            elif check.metric == "mae_difference":  # divided by fp32's mean absolute error
                label = (f"widening of the mean absolute error gap across {check.group}, {check.variant} vs fp32, "
                         f"as a share of fp32's error")
                rows.append(_row(check, label, (_percent, 1)))
            else:
                label = f"widening of the {_GAPS[check.metric]} across {check.group}, {check.variant} vs fp32"
                rows.append(_row(check, label, (_points, 2)))
    return rows


def _parity_facts(verdict: GateVerdict) -> list[VerdictFact | None]:
    from pipelines.gates.fairness import GAP_METRICS
    from pipelines.gates.parity import checks

    facts = []
    for variant, observed in by_variant(verdict.observed).items():
        score = str(observed.get("metric") or "accuracy")
        if not any(c.metric == "accuracy" for c in checks(verdict.thresholds, observed)):
            facts.append(_fact(f"{_metric(score)} of fp32", observed.get("fp32_accuracy"), _value(score)))
            if variant != "fp32":
                facts.append(_fact(f"{_metric(score)} of {variant}", observed.get("variant_accuracy"), _value(score)))
        for key, value in observed.items():
            metric, _, of = key.partition(".")
            if metric in GAP_METRICS and of in VARIANTS:
                facts.append(_fact(f"largest {_GAPS[metric]} of {of} (worst feature)", value, _gap(metric)))
    return facts


# -- drift -----------------------------------------------------------------------------------------
def _drift_rows(verdict: GateVerdict) -> list[VerdictRow]:
    from pipelines.gates.drift import checks

    return [_row(check, "share of columns that drifted", (_percent, 1))
            for check in checks(verdict.thresholds, verdict.observed)]


def _compared_rows(label: str, rows: Figure, total: Figure) -> VerdictFact | None:
    """Rows compared, and of how many when they were a sample."""
    fact = _fact(label, rows, (_rows, None))
    if fact is None or number(total) is None or number(total) == number(rows):
        return fact
    return fact.model_copy(update={"value": f"{fact.value} (a sample of {number(total):,.0f})"})


def _drift_facts(verdict: GateVerdict) -> list[VerdictFact | None]:
    observed = verdict.observed
    names = observed.get("drifted_column_names")
    listed = [n.strip() for n in str(names or "").split(",") if n.strip()]
    return [_fact("columns that drifted", observed.get("drifted_columns"), (_rows, None)),
            VerdictFact(label="drifted columns", listed=listed) if listed else None,
            _compared_rows("training rows compared", observed.get("reference_rows"),
                           observed.get("reference_rows_total")),
            _compared_rows("production rows compared", observed.get("current_rows"),
                           observed.get("current_rows_total"))]


# -- edge latency, memory and budget ---------------------------------------------------------------
def _latency_rows(verdict: GateVerdict) -> list[VerdictRow]:
    from pipelines.finops.cost import latency_checks

    return [_row(check, f"p95 latency on the {check.group} group", (_ms, 3))
            for check in latency_checks(verdict.thresholds, verdict.observed)]


def _latency_facts(verdict: GateVerdict) -> list[VerdictFact | None]:
    from pipelines.finops.cost import latency_checks

    judged = {c.group for c in latency_checks(verdict.thresholds, verdict.observed)}
    return [_fact(f"p95 latency on the {group} group (no SLO set)", value, (_ms, 3))
            for group, value in _by_group(verdict.observed, ".latency_p95_ms") if group not in judged]


def _memory_rows(verdict: GateVerdict) -> list[VerdictRow]:
    from pipelines.finops.cost import memory_checks

    rows = []
    for check in memory_checks(verdict.thresholds, verdict.observed):
        label = f"memory the model needs on the {check.group} group"
        if check.device_class:
            label += f", vs {check.device_class} device memory"
        rows.append(_row(check, label, (_mib, 1)))
    return rows


def _memory_facts(verdict: GateVerdict) -> list[VerdictFact | None]:
    from pipelines.finops.cost import memory_checks

    judged = {c.group for c in memory_checks(verdict.thresholds, verdict.observed)}
    return [_fact(f"memory the model needs on the {group} group (no limit set)", value, (_mib, 1))
            for group, value in _by_group(verdict.observed, ".memory_bytes") if group not in judged]


def _budget_rows(verdict: GateVerdict) -> list[VerdictRow]:
    from pipelines.finops.cost import budget_checks

    return [_row(check, "projected cost per month", (_usd, 2), "every device group, and training")
            for check in budget_checks(verdict.thresholds, verdict.observed)]


def _budget_facts(verdict: GateVerdict) -> list[VerdictFact | None]:
    from pipelines.finops.cost import budget_checks

    observed = verdict.observed
    total = None if budget_checks(verdict.thresholds, observed) else observed.get("total_usd_per_month")
    return [_fact("projected cost per month", total, (_usd, 2)),
            _fact("training cost", observed.get("training_usd_per_month"), (_usd, 2)),
            *(_fact(f"cost of the {group} group", value, (_usd, 2))
              for group, value in _by_group(observed, ".usd_per_month"))]


def _by_group(observed: dict, suffix: str) -> list[tuple[str, Figure]]:
    """(device group, figure) of the keys `<group><suffix>`."""
    return [(key.removesuffix(suffix), value) for key, value in observed.items() if key.endswith(suffix)]


# -- any verdict -----------------------------------------------------------------------------------
_GATES: dict[str, tuple[Callable[[GateVerdict], list[VerdictRow]],
                        Callable[[GateVerdict], list[VerdictFact | None]]]] = {
    "quality": (_quality_rows, _quality_facts), "fairness": (_fairness_rows, _fairness_facts),
    "quantization_parity": (_parity_rows, _parity_facts), "drift": (_drift_rows, _drift_facts),
    "edge_latency": (_latency_rows, _latency_facts), "edge_memory": (_memory_rows, _memory_facts),
    "budget": (_budget_rows, _budget_facts),
}


def _verdict(verdict: GateVerdict | dict) -> GateVerdict:
    return verdict if isinstance(verdict, GateVerdict) else GateVerdict.model_validate(verdict)


def _judged(verdict: GateVerdict) -> tuple[list[VerdictRow], list[VerdictFact | None]] | None:
    """A known gate's rows and facts; None when waived, unknown, or its figures do not read."""
    if verdict.waived or verdict.gate not in _GATES:
        return None
    rows_of, facts_of = _GATES[verdict.gate]
    try:
        return rows_of(verdict), facts_of(verdict)
    except (TypeError, ValueError, KeyError):  # figures of another shape (an older release's)
        return None


def _recorded(verdict: GateVerdict) -> list[VerdictFact | None]:
    """Every non-empty figure as `key: value` (the limits marked)."""
    return [*(_fact(key, value) for key, value in verdict.observed.items()),
            *(_fact(f"{key} (limit)", value) for key, value in verdict.thresholds.items())]


def verdict_rows(verdict: GateVerdict | dict) -> list[VerdictRow]:
    """One row per comparison the verdict's gate made; none for a waived or unknown gate."""
    judged = _judged(_verdict(verdict))
    return judged[0] if judged else []


def context_rows(verdict: GateVerdict | dict) -> list[VerdictFact]:
    """The verdict's other figures worth reading, each label once, without empty ones; a waived
    verdict's waiver; an unknown gate's recorded figures."""
    verdict = _verdict(verdict)
    if verdict.waived:
        return [VerdictFact(label="waived because", value=verdict.reason.removeprefix("waived: "))]
    judged = _judged(verdict)
    kept: dict[str, VerdictFact] = {}
    for fact in judged[1] if judged else _recorded(verdict):
        if fact is not None:
            kept.setdefault(fact.label, fact)
    return list(kept.values())


def summary_checks(verdicts: Iterable[GateVerdict | dict]) -> dict[str, list[VerdictRow]]:
    """Each verdict's rows, by gate name (a release summary's verdicts, for the templates)."""
    return {v.gate: verdict_rows(v) for v in map(_verdict, verdicts)}
