import json
from datetime import date

import pytest
from conftest import tabular_frame, write_spec

from pipelines import release
from pipelines.__main__ import main


def test_cli_finops_report_after_a_release(tmp_path, state, capsys):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "small-model", "data.csv")
    summary = release.run_release(spec)
    assert summary.status == "released" and summary.cost["groups"][0]["group"] == "phones"
    assert summary.cost_diff["baseline"] == "new"
    assert main(["finops-report", "small-model", "--as-of", "2026-11-27", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["as_of"] == "2026-11-27" and report["simulated"]
    assert set(report["evidence"]) == {"forecast.json", "forecast.png", "report.txt"}
    png = report["evidence"]["forecast.png"].removeprefix("file://")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["finops-report", "small-model", "--as-of", "27/11/2026"]) == 2
    assert "--as-of: '27/11/2026' is not an ISO date" in capsys.readouterr().err


def test_report_needs_a_release(state):
    from pipelines.operate.finops_report import finops_report

    with pytest.raises(ValueError, match="never-released: no released cost estimate yet"):
        finops_report("never-released", date(2026, 11, 27))
