"""Release gates: quality vs the champion, fairness, quantization parity, drift.

Each gate is a pure function from figures to a `GateVerdict` (passed, thresholds, observed
values, evidence, a one-line reason). A gate that says no is an outcome, not an exception.

Each gate module also has a `checks(thresholds, observed)` function: every comparison the
gate's rule makes on the figures a verdict records, passed or not. Its `breaches` are the failed
checks: the verdict passes exactly when there is none, and the Edge Releases view explains a
failed verdict from the same breaches and shows every check.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipelines.records import GateVerdict
from pipelines.specs import QUANTIZATION_MODES

VARIANTS = ("fp32", *QUANTIZATION_MODES)


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison a gate's rule makes on a verdict's figures.

    `observed` and `limit` are the two figures the rule compares. `kind` says how: "min" (at
    least a floor), "max" (at most a ceiling; below it when `strict`), "regression" (`observed` is
    how much worse `value` is than `baseline`, `limit` how much worse it may be) or "missing" (the
    figure was not measured: always failed). `field` is where the limit is set (a spec field such
    as "gates.quality.accuracy.minValue"). `passed`: the figures meet the rule.
    """

    metric: str
    observed: float | None
    limit: float | None
    kind: Literal["min", "max", "regression", "missing"]
    field: str
    group: str | None = None
    variant: str | None = None
    value: float | None = None
    baseline: float | None = None
    champion: str | None = None
    direction: Literal["higher", "lower"] | None = None
    device_class: str | None = None
    limit_text: str | None = None
    strict: bool = False
    passed: bool = dataclasses.field(kw_only=True)


Breach = Check
"""A check that failed: what each gate's `breaches` returns."""


def failed(checks: list[Check]) -> list[Breach]:
    """The checks whose figures break the rule."""
    return [check for check in checks if not check.passed]


def by_variant(observed: dict) -> dict[str, dict]:
    """A verdict's figures per shipped variant: a verdict over several variants records the
    other variants' figures with the prefix `<variant>.` (the verdict's own variant first)."""
    base = str(observed.get("variant") or "")
    split: dict[str, dict] = {base: {}}
    for key, value in observed.items():
        head, _, rest = key.partition(".")
        if head in VARIANTS and head != base and rest:
            split.setdefault(head, {})[rest] = value
        else:
            split[base][key] = value
    return split


def number(value) -> float | None:
    """A recorded figure as a float; None when it is absent."""
    return None if value is None or isinstance(value, bool) else float(value)


def waived(gate: str, justification: str) -> GateVerdict:
    """A gate the spec waives: passes, and says why in the spec's own words."""
    return GateVerdict(gate=gate, passed=True, waived=True, reason=f"waived: {' '.join(justification.split())}")


def rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)
