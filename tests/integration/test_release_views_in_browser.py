"""Edge Releases as a data scientist reads it, in headless Chromium against a real api-server:
charts, readable verdicts, history (a failed run, a rejection, a rollout), two versions side by
side, links, roles and the styled login page. The state is made by the real code in this
process: releases, a simulated fleet serving, drift checks, canary steps and a FinOps report.

Each page's load time in the browser is printed; with EDGE_UPDATE_SCREENSHOTS=1 the
screenshots replace the ones in docs/screenshots/.
"""

import json
import os
import re
import shutil
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from conftest import ROOT, phones_fleet, running_api_server, tabular_frame, write_spec

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "docs" / "screenshots"
MODEL = "loan-approval"
def _edit(spec: Path, **changes) -> None:
    doc = yaml.safe_load(spec.read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))


def build_state(specs: Path, settings) -> dict:
    """Releases of one model with everything after them, as the product makes them:
    v1 released and served by 40 devices; a drift check; v2 released as a canary, held, advanced
    and completed by the rollout; inputs shifted and checked again; v3 rejected by its quality
    gate; labels of what was served, for one group of people changed, and a field quality check;
    a run that failed (its data file gone); a FinOps report."""
    from pipelines.__main__ import main
    from pipelines.edge.simulator import Fleet, OutcomeShift, parse_fault
    from pipelines.operate.feedback import check_rows, store_labels
    from pipelines.operate.finops_report import finops_report
    from pipelines.operate.monitor import check_drift
    from pipelines.operate.quality import check_field_quality
    from pipelines.operate.rollout import step_rollout
    from pipelines.release import latest_summary
    from pipelines.storage import ObjectStore

    tabular_frame(rows=800).to_csv(specs / "data.csv", index=False)
    fleet_file = specs.parent / "fleet.yaml"
    fleet_file.write_text(phones_fleet(400_000))
    canary = {"type": "Canary", "canary": {"steps": [{"share": 30}, {"share": 100}],
                                           "analysis": {"minRequests": 200}}}
    spec = write_spec(specs, MODEL, "data.csv", description="Approves small loans on the phone, offline.",
                      finops={"costCenter": "cc-lending", "project": "loans", "monthlyBudgetUsd": 2},
                      deploymentStrategy=canary, telemetry={"sampleRate": 0.5, "maxSamples": 50},
                      responsibleAI={"fairness": {"biasScore": 0.2, "equalizedOdds": 0.25, "minGroupAccuracy": 0.6}},
                      monitoring={"driftShare": 0.3, "window": "1d", "minRows": 50,
                                  "field": {"window": "1d", "minLabels": 50, "attributes": "attributes.csv"}})
    done = {}
    # The analyses of one afternoon: each an hour after the previous.
    hour = iter(datetime.now(timezone.utc) + timedelta(hours=h) for h in range(1, 12))
    assert main(["release", str(spec)]) == 0
    fleet = Fleet(40, settings, seed=3, fleet_path=fleet_file)
    fleet.poll_round()
    fleet.serve_round(40)
    done["drift_1"] = check_drift(spec, settings, now=next(hour)).status
    _edit(spec, training={"framework": "sklearn", "estimator": "logistic_regression", "seed": 1,
                          "params": {"C": 5.0}})
    assert main(["release", str(spec)]) == 0
    fleet.poll_round()
    done["steps"] = [step_rollout(spec, settings, now=next(hour)).decision]
    fleet.serve_round(60)
    done["steps"].append(step_rollout(spec, settings, now=next(hour)).decision)
    fleet.poll_round()
    fleet.serve_round(40, [parse_fault("shift=x1:+3;x2:+2")])
    done["steps"].append(step_rollout(spec, settings, now=next(hour)).decision)
    done["drift_2"] = check_drift(spec, settings, now=next(hour)).status
    # The outcomes of everything served arrive; for group b the world has changed.
    outcomes = fleet.outcomes(MODEL, OutcomeShift("group", "b", 0, 0.9))
    store_labels(ObjectStore(settings.telemetry_url), MODEL,
                 check_rows(outcomes[["inference_id", "label"]].to_dict("records"), "binary"), next(hour))
    outcomes[["inference_id", "group"]].to_csv(specs / "attributes.csv", index=False)
    field = check_field_quality(spec, settings, now=next(hour))
    done["field"] = field.status
    fair = {"fairness": {"biasScore": 0.2, "equalizedOdds": 0.25}}
    _edit(spec, responsibleAI={"fairness": {"biasScore": 0.01, "equalizedOdds": 0.25}},
          training={"framework": "sklearn", "estimator": "logistic_regression", "seed": 1, "params": {"C": 0.5}})
    assert main(["release", str(spec)]) == 0  # a rejection is an outcome, not an error
    done["rejected"] = latest_summary(MODEL, settings).status
    _edit(spec, responsibleAI=fair)
    (specs / "data.csv").rename(specs / "data.csv.away")
    assert main(["release", str(spec)]) != 0  # failed: the data file is gone
    (specs / "data.csv.away").rename(specs / "data.csv")
    done["finops"] = finops_report(MODEL, date.today(), settings).reason
    return done


def _password(user: str) -> str:
    from conftest import STATE

    return json.loads((STATE / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())[user]


class Pages:
    """Opens pages in one browser tab, timing each load as the browser measured it."""

    def __init__(self, page, base: str, folder: Path):
        self.page, self.base, self.folder = page, base, folder
        self.times: dict[str, float] = {}
        self.update = os.environ.get("EDGE_UPDATE_SCREENSHOTS") == "1"
        folder.mkdir(parents=True, exist_ok=True)

    def open(self, name: str, path: str) -> None:
        answer = self.page.goto(self.base + path)
        assert answer is not None and answer.ok, (path, answer and answer.status)
        self.timed(name)

    def timed(self, name: str) -> None:
        self.times[name] = self.page.evaluate(
            "() => { const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime; }")

    def shot(self, name: str, locator=None, **options) -> None:
        path = self.folder / name
        (locator or self.page).screenshot(path=str(path), animations="disabled", **options)
        if self.update:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS / name)


def _charts_drawn(page) -> list[str]:
    """The titles of the charts whose image the browser decoded (an undecodable SVG has no width)
    and that carry a text alternative."""
    return page.eval_on_selector_all("figure.chart", """figures => figures
        .filter(f => { const i = f.querySelector('img'); return i.complete && i.naturalWidth > 0 && i.alt; })
        .map(f => f.querySelector('figcaption strong').textContent)""")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (make browser installs Debian's package)")
def test_a_data_scientist_reads_charts_verdicts_history_and_comparisons(airflow_db, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    from pipelines.settings import Settings

    started = time.monotonic()
    state, specs = tmp_path / "state", tmp_path / "state" / "specs"
    specs.mkdir(parents=True)
    env = {"EDGE_STATE_DIR": str(state), "EDGE_SPECS_DIR": str(specs), "EDGE_FLEET_FILE": str(state / "fleet.yaml"),
           "EDGE_MLFLOW_UI_URL": "http://mlflow.example.test"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    done = build_state(specs, Settings())
    assert done["steps"] == ["hold", "advance", "complete"] and done["rejected"] == "rejected", done
    assert (done["drift_1"], done["drift_2"], done["field"]) == ("ok", "drift", "breach"), done
    built = time.monotonic() - started

    from conftest import SESSION_DIR, user_token

    with running_api_server(env, SESSION_DIR / "browser-api-server.log") as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        page.set_default_timeout(60_000)
        expect.set_options(timeout=30_000)
        pages = Pages(page, base, tmp_path / "screenshots")
        try:
            # Not logged in: a styled page (the stylesheet needs no login) pointing to Airflow's login.
            page.goto(f"{base}/edge/models/{MODEL}")
            expect(page.get_by_role("heading", name="Log in to see Edge Releases")).to_be_visible()
            button = page.get_by_role("link", name="Log in to Airflow")
            assert button.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(9, 105, 218)"
            pages.shot("edge-releases-login.png")
            button.click()
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(_password("admin"))
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"**/edge/models/{MODEL}")

            # The list: the last release, and the run that failed after it.
            pages.open("index", "/edge/")
            row = page.locator("table.models tbody tr", has_text=MODEL)
            expect(row).to_contain_text("rejected")
            expect(row.locator(".attempt")).to_contain_text("failed")
            expect(row.locator(".attempt")).to_contain_text("in validate_data")

            # The model page: charts the browser drew, offline (data: images under the page's CSP).
            pages.open("model", f"/edge/models/{MODEL}")
            drawn = _charts_drawn(page)
            for title in ("Versions of loan-approval running per device group", "Cost of loan-approval v2",
                          "Canary of loan-approval", "Drift of loan-approval"):
                assert any(alt.startswith(title) for alt in drawn), (title, drawn)
            expect(page.locator("body")).to_contain_text("3 of 4 columns drifted")
            pages.shot("edge-releases-model-charts.png", full_page=True)
            # Quality and fairness in the field: v2 breaks its checks for group b.
            field = page.locator("table.field-quality")
            expect(field.locator("tr", has_text="v2")).to_contain_text("breach")
            expect(field).to_contain_text("by group")
            expect(page.locator("body")).to_contain_text("Evidently report")
            pages.shot("edge-releases-field-quality.png", locator=field)
            # Its history: every run with its outcome, the rollout steps.
            events = page.locator("table.history-events tbody tr")
            expect(events.first).to_contain_text("failed")
            expect(events.first).to_contain_text(f"validate_data: {MODEL}.yaml: data.csv: data file not found")
            expect(events.filter(has_text="fairness")).to_contain_text("rejected")
            expect(page.locator("table.history-events")).to_contain_text("30% → 100%")
            pages.shot("edge-releases-history.png", locator=page.locator("table.history-events"))

            # The rejected version: each check with its limit and mark; the fairness chart in its gate.
            pages.open("version", f"/edge/models/{MODEL}/versions/3")
            fairness = page.locator("#gate-fairness")
            failed = fairness.locator("tr.check-fail")
            expect(failed).to_contain_text("demographic parity difference across group")
            expect(failed).to_contain_text("responsibleAI.fairness.biasScore")
            expect(failed.locator(".check-mark")).to_contain_text("fail")
            assert any(title.startswith("Fairness") for title in _charts_drawn(page)), _charts_drawn(page)
            assert fairness.locator("img.chart-image").count() == 1
            mlflow = page.get_by_role("link", name="model version 3")
            assert mlflow.get_attribute("href") == f"http://mlflow.example.test/#/models/{MODEL}/versions/3"
            assert page.get_by_role("link", name="download the signed ONNX file").count() == 0  # not shipped
            fairness.scroll_into_view_if_needed()
            pages.shot("edge-releases-verdicts.png", full_page=True)
            # Its CSV evidence reads as a table, in a tab of its own.
            with page.context.expect_page() as opened:
                fairness.get_by_role("link", name="fairness_by_group.csv").click()
            table = opened.value
            expect(table.locator("thead th").first).to_have_text("feature")
            expect(table.locator("tbody tr").first).to_contain_text("group")
            expect(table.get_by_role("link", name="Download the CSV file")).to_be_visible()
            table.close()

            # Two versions side by side, from the model page's form.
            pages.open("model (again)", f"/edge/models/{MODEL}")
            page.get_by_label("Compare").select_option("1")
            page.get_by_label("with").select_option("2")
            page.get_by_role("button", name="Compare").click()
            page.wait_for_url(f"**/edge/models/{MODEL}/compare?a=1&b=2")
            pages.timed("compare")
            params = page.locator("table.compare").last
            expect(params.locator("tr.changed")).to_contain_text("C")
            expect(page.locator("body")).to_contain_text("same data")
            pages.shot("edge-releases-compare.png", full_page=True)

            # The release commit of v2, in the plugin's commit view (no Git host configured).
            pages.open("version v2", f"/edge/models/{MODEL}/versions/2")
            page.locator("dt:text-is('GitOps commit') + dd a").click()
            page.wait_for_url(re.compile(rf"/edge/models/{MODEL}/commits/[0-9a-f]{{40}}$"))
            pages.timed("commit")
            expect(page.locator("pre.diff")).to_contain_text(f"+++ b/apps/{MODEL}/")
            # The message and the diff name the artifact's URI, a file in this test's temporary state.
            pages.shot("edge-releases-commit.png", clip={"x": 0, "y": 0, "width": 1400, "height": 250})
            page.go_back()
            expect(page.get_by_role("link", name="download the signed ONNX file")).to_be_visible()

            # A viewer reads the same pages, but no model file or data snapshot.
            viewer = browser.new_context(viewport={"width": 1400, "height": 900})
            viewer.add_cookies([{"name": "_token", "value": user_token(base, "viewer"), "url": base}])
            seen = viewer.new_page()
            seen.goto(f"{base}/edge/models/{MODEL}/versions/2")
            expect(seen.locator("#gate-fairness")).to_contain_text("pass")
            expect(seen.locator("body")).to_contain_text("for people who may run the model's release DAG")
            assert seen.get_by_role("link", name="download the signed ONNX file").count() == 0
            snapshot = Settings().store_url.rstrip("/") + f"/runs/{MODEL}/"
            key = next((state / "artifacts" / "runs" / MODEL).glob("*/data.parquet")).parent.name
            denied = seen.goto(f"{base}/edge/evidence?uri={quote(snapshot + key + '/data.parquet', safe='')}")
            assert denied.status == 403
            expect(seen.get_by_role("heading", name="Not allowed")).to_be_visible()
            expect(seen.locator("body")).to_contain_text(f"may run edge_release__{MODEL}")
        except BaseException:
            page.screenshot(path=str(pages.folder / "failure.png"), full_page=True)  # never into the docs
            raise
        finally:
            browser.close()
    total = time.monotonic() - started
    print(f"browser views: state built in {built:.0f} s; page loads (ms): "
          + ", ".join(f"{name} {ms:.0f}" for name, ms in pages.times.items()) + f"; {total:.0f} s in all")
