"""Evidence opens in a real browser: the model card's title, Evidently's rendered report."""

import shutil
import subprocess

import pytest
from conftest import tabular_frame, write_spec

from pipelines import release

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _render(url: str, profile) -> str:
    """The DOM after scripts ran, from headless Chromium (no network, fresh profile)."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (make test installs Debian's)")
def test_drift_rejection_evidence_and_model_card_open_in_chromium(tmp_path, state):
    rows = tabular_frame(rows=1000, seed=3)
    rows.iloc[:600].to_csv(tmp_path / "data.csv", index=False)
    shifted = rows.iloc[600:].copy()
    shifted["x1"] += 3.0
    shifted["x2"] *= 4.0
    shifted.to_csv(tmp_path / "current.csv", index=False)
    data = {"source": "data.csv", "currentSource": "current.csv", "target": "label",
            "features": ["x1", "x2", "colour"], "sensitiveFeatures": ["group"],
            "validation": {"maxNullShare": 0.05, "minRows": 50}}
    spec = write_spec(tmp_path, "drifting-model", "data.csv", data=data)

    summary = release.run_release(spec)

    assert summary.status == "rejected"
    [drift] = [v for v in summary.verdicts if v.gate == "drift"]
    assert not drift.passed
    assert {"x1", "x2"} <= set(drift.observed["drifted_column_names"].split(", "))
    assert drift.observed["drifted_share"] >= 2 / 3
    report = drift.evidence["drift_report.html"]
    card_dom = _render(summary.model_card_uri, tmp_path / "profile-card")
    assert "<title>Model card: drifting-model version 1</title>" in card_dom
    assert "FAILED" in card_dom and "columns drifted" in card_dom
    report_dom = _render(report, tmp_path / "profile-report")
    assert ">Data Drift Summary<" in report_dom  # only present once the report's scripts ran
