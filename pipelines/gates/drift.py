"""Drift gate (Evidently): training reference vs the most recent production window."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.gates import Breach, Check, failed, number
from pipelines.records import GateVerdict


def no_production_data(share: float, where: str) -> GateVerdict:
    return GateVerdict(gate="drift", passed=True, thresholds={"drift_share": share},
                       observed={"current_rows": 0}, reason=f"no production data yet ({where})")


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, share: float, html_path: Path) -> dict:
    """Run Evidently's DataDriftPreset and save its HTML report; return the figures."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    snapshot = Report([DataDriftPreset(drift_share=share)], include_tests=True).run(
        current_data=current, reference_data=reference)
    snapshot.save_html(str(html_path))
    result = snapshot.dict()
    figures = {"drifted_share": None, "drifted_columns": None, "columns": {}}
    for metric in result["metrics"]:
        kind = metric["config"]["type"]
        if kind.endswith("DriftedColumnsCount"):
            figures["drifted_share"] = float(metric["value"]["share"])
            figures["drifted_columns"] = int(metric["value"]["count"])
        elif kind.endswith("ValueDrift"):
            figures["columns"][metric["config"]["column"]] = float(metric["value"])
    prefix = "Value Drift for column "
    figures["drifted_column_names"] = sorted(
        t["name"].removeprefix(prefix) for t in result.get("tests", [])
        if t.get("name", "").startswith(prefix) and str(t.get("status")).endswith("FAIL"))
    return figures


def checks(thresholds: dict, observed: dict) -> list[Check]:
    """The drift rule: the share of drifted columns must stay below gates.driftShare. A check
    that ran without a share fails; without production data there is nothing to judge."""
    limit = number(thresholds.get("drift_share"))
    if limit is None or "drifted_share" not in observed:
        return []
    share = number(observed["drifted_share"])
    if share is None:
        return [Check("drifted_share", None, limit, "missing", "gates.driftShare", passed=False)]
    return [Check("drifted_share", share, limit, "max", "gates.driftShare", strict=True, passed=not share >= limit)]


def breaches(thresholds: dict, observed: dict) -> list[Breach]:
    """The drift check the figures fail, if any."""
    return failed(checks(thresholds, observed))


def drift_verdict(figures: dict, share: float, reference_rows: int, current_rows: int,
                  evidence: dict[str, str]) -> GateVerdict:
    drifted = figures["drifted_share"]
    names = figures.get("drifted_column_names", [])
    listed = f": {', '.join(names[:5])}{' …' if len(names) > 5 else ''}" if names else ""
    observed = {"drifted_share": drifted, "drifted_columns": figures["drifted_columns"],
                "reference_rows": reference_rows, "current_rows": current_rows,
                "drifted_column_names": ", ".join(names)}
    thresholds = {"drift_share": share}
    passed = not breaches(thresholds, observed)
    if drifted is None:
        reason = "Evidently returned no drift share"
    elif passed:
        reason = (f"{figures['drifted_columns']} of {len(figures['columns'])} columns drifted "
                  f"({drifted:.0%} < {share:.0%}){listed}")
    else:
        reason = (f"{figures['drifted_columns']} of {len(figures['columns'])} columns drifted "
                  f"({drifted:.0%} >= {share:.0%}){listed}")
    return GateVerdict(gate="drift", passed=passed, thresholds=thresholds, observed=observed,
                       evidence=evidence, reason=reason)
