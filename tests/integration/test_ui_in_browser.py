"""Edge Releases and a manual approval in a real browser: headless Chromium (Debian's package,
driven by Playwright) against one embedded Airflow with a scheduler, a dag-processor, an
api-server and the triggerer that resumes the approval task.

A person logs in through Airflow's login page, opens Edge Releases from Airflow's navigation,
sees a released model with its verdicts and a rejected version explained in plain words, then
approves a waiting release in Airflow's Required Actions and sees its GitOps commit appear.

Screenshots go to the test's temporary folder; with EDGE_UPDATE_SCREENSHOTS=1 they also
replace the ones in docs/screenshots/.
"""

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, tabular_frame, write_spec

from stack.airflow_local import LOCAL_COMPONENTS, EmbeddedAirflow

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Playwright never downloads a browser here: it drives the Debian binary.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SHIPPED, REJECTED, MANUAL = "shipped-model", "rejected-model", "waiting-model"
MANUAL_DAG = f"edge_release__{MANUAL}"
SCREENSHOTS = ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1400, "height": 900}
TALL = {"width": 1400, "height": 1300}


def _start(airflow: EmbeddedAirflow) -> None:
    """Airflow up, the waiting model's DAG registered and unpaused (the others stay paused, so
    no schedule takes the two cores from the test)."""
    airflow.start()
    airflow.wait_dag(MANUAL_DAG)
    airflow.request("PATCH", f"dags/{MANUAL_DAG}", json={"is_paused": False})


def _awaiting_input(airflow: EmbeddedAirflow, run_id: str) -> bool:
    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(MANUAL_DAG, run_id)}
    run = airflow.run(MANUAL_DAG, run_id)
    assert run["state"] not in ("failed", "success"), (
        f"the run ended {run['state']} before its approval: {states}; task logs in {airflow.home / 'logs'}")
    return states.get("approve_release") == "awaiting_input"


def _git(remote: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(remote), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


class Shots:
    """Screenshots into the test's folder, copied to docs/screenshots/ when asked."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.update = os.environ.get("EDGE_UPDATE_SCREENSHOTS") == "1"

    def take(self, page, name: str, **options) -> Path:
        path = self.folder / name
        page.screenshot(path=str(path), animations="disabled", **options)
        if self.update:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS / name)
        return path


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (make test installs Debian's "
                                             "chromium package; Playwright does not download a browser)")
def test_a_person_reviews_releases_and_approves_one_in_the_browser(tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    from pipelines import release
    from pipelines.settings import Settings

    started = time.monotonic()
    specs, state = tmp_path / "specs", tmp_path / "state"
    specs.mkdir()
    tabular_frame().to_csv(specs / "data.csv", index=False)
    shipped_spec = write_spec(specs, SHIPPED, "data.csv", description="A model every gate lets through.")
    rejected_spec = write_spec(specs, REJECTED, "data.csv", description="Asks for an accuracy it cannot reach.",
                               gates={"quality": {"accuracy": {"minValue": 0.999}}})
    write_spec(specs, MANUAL, "data.csv", description="Released once a person approves.")
    monkeypatch.setenv("EDGE_STATE_DIR", str(state))
    settings = Settings(state_dir=state)
    airflow = EmbeddedAirflow(tmp_path / "airflow", log_dir=tmp_path / "logs", components=LOCAL_COMPONENTS, env={
        "EDGE_STATE_DIR": str(state), "EDGE_SPECS_DIR": str(specs),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        # No DAG file changes during the test: parse each once.
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600"})
    shots = Shots(tmp_path / "screenshots")
    pool = ThreadPoolExecutor(max_workers=1)
    starting = pool.submit(_start, airflow)
    try:
        # While Airflow starts: a release every gate passes and one the quality gate rejects,
        # through the CLI's path in this process, on the same state.
        shipped = release.run_release(shipped_spec, settings=settings)
        rejected = release.run_release(rejected_spec, settings=settings)
        assert (shipped.status, rejected.status) == ("released", "rejected"), (shipped.reasons, rejected.reasons)
        starting.result(timeout=300)
        prepared = time.monotonic() - started
        # A person asks for approval in the trigger form (the spec says auto).
        run_id = airflow.trigger(MANUAL_DAG, {"approval": "manual", "reason": "reviewed in the browser"})["dag_run_id"]
        base = airflow.base_url

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport=VIEWPORT).new_page()
            # Two cores run Airflow, its task workers and the browser: generous waits.
            page.set_default_timeout(60_000)
            expect.set_options(timeout=30_000)
            try:
                # Not logged in: Edge Releases sends the browser to Airflow's login page.
                page.goto(f"{base}/edge/")
                expect(page.get_by_role("heading", name="Log in to see Edge Releases")).to_be_visible()
                page.get_by_role("link", name="Log in to Airflow").click()
                page.wait_for_url(re.compile(r"/auth/login"))
                page.get_by_label("Username").fill("admin")
                page.get_by_label("Password").fill(airflow.admin_password)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url(re.compile(r"/edge/$"))
                expect(page.get_by_role("heading", name="Models")).to_be_visible()

                # Edge Releases from Airflow's navigation: the external view inside the UI.
                page.goto(f"{base}/")
                page.get_by_role("link", name="Edge Releases").click()
                page.wait_for_url(re.compile(r"/plugin/edge-releases$"))
                view = page.frame_locator("iframe")
                rows = view.locator("table.models tbody tr")
                expect(rows.filter(has_text=SHIPPED)).to_contain_text("released")
                expect(rows.filter(has_text=SHIPPED)).to_contain_text(f"phones v{shipped.model_version}")
                expect(rows.filter(has_text=REJECTED)).to_contain_text("rejected")
                expect(rows.filter(has_text=REJECTED)).to_contain_text("quality: accuracy")
                expect(rows.filter(has_text=REJECTED)).to_contain_text("not deployed")
                expect(rows.filter(has_text=MANUAL)).to_contain_text("not deployed")  # its run has just begun

                # The released model: deployed, every verdict, its commit.
                view.get_by_role("link", name=SHIPPED, exact=True).click()
                expect(view.get_by_role("heading", name=SHIPPED, exact=True)).to_be_visible()
                body = view.locator("body")
                expect(body).to_contain_text("Deployed now")
                expect(body).to_contain_text(f"commit {shipped.gitops_commit[:8]}")
                verdicts = view.locator("details.version").first
                for gate in ("quality", "fairness", "quantization parity", "drift", "edge memory", "edge latency",
                             "budget"):
                    row = verdicts.locator(f'tr:has(td:text-is("{gate}"))')
                    expect(row.locator("td").nth(1)).to_have_text("pass")
                expect(body).to_contain_text(f"release({SHIPPED}): version {shipped.model_version}")
                page.set_viewport_size(TALL)  # the spec's facts, the deployment and the verdicts
                shots.take(page, "edge-releases-model.png")
                page.set_viewport_size(VIEWPORT)

                # The rejected version explains itself in plain words.
                view.get_by_role("link", name="Edge Releases").click()
                view.locator("table.models tbody tr", has_text=REJECTED).get_by_role(
                    "link", name=f"v{rejected.model_version}").click()
                expect(view.get_by_role("heading", name="Why this version did not ship")).to_be_visible()
                expect(view.locator("body")).to_contain_text(re.compile(
                    r"The quality gate failed: accuracy on the held-out test rows is 0\.\d{4}, below the 0\.999 "
                    r"required by gates\.quality\.accuracy\.minValue"))
                expect(view.locator("body")).to_contain_text("no device group runs it now")
                shots.take(page, "edge-releases-rejected.png")

                # The triggered run reaches its approval task (the REST API says when).
                waited = time.monotonic()
                airflow.wait_for("approve_release to await input", lambda: _awaiting_input(airflow, run_id), 300)
                awaiting_after = time.monotonic() - started

                # Required Actions: open the pending approval, read it, approve.
                page.goto(f"{base}/required_actions")
                subject = f"Release {MANUAL}? All gates passed"
                page.get_by_role("link", name=subject).click()
                approve = page.get_by_role("button", name="Approve", exact=True)
                expect(approve).to_be_enabled()
                expect(page.get_by_text(f"{MANUAL} version 1 passed every gate and waits for your decision")
                       ).to_be_visible()
                expect(page.get_by_text("the run's approval parameter asks for a person's approval")).to_be_visible()
                version_href = page.get_by_role("link", name=f"{MANUAL} version 1").get_attribute("href")
                assert version_href == f"/edge/models/{MANUAL}/versions/1"
                page.set_viewport_size(TALL)
                # The model card's link names a file in this machine's temporary state.
                shots.take(page, "required-actions-approve.png", mask_color="#e2e8f0",
                           mask=[page.get_by_role("link", name=re.compile(r"^file:"))])
                page.set_viewport_size(VIEWPORT)
                page.locator("#element_comment").fill("numbers checked against last quarter")  # the form's field
                approve.click()
                expect(page.get_by_text(re.compile(r"Response received at .* from admin"))).to_be_visible()
                approved = time.monotonic()

                finished = airflow.wait_run(MANUAL_DAG, run_id, timeout=300)
                run_after_click = time.monotonic() - approved
                states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(MANUAL_DAG, run_id)}
                assert finished["state"] == "success", states
                assert states["publish"] == states["commit"] == "success", states
                released = release.latest_summary(MANUAL, settings)
                assert released.status == "released" and released.gitops_commit
                tip = _git(settings.remote, "log", "-1", "--format=%H%n%B", "main")
                assert tip.startswith(released.gitops_commit) and "Approved by: admin" in tip

                # The approval's link: the version page names the person and the commit.
                page.goto(base + version_href)
                expect(page.locator("body")).to_contain_text("by admin at")
                expect(page.locator("body")).to_contain_text("numbers checked against last quarter")
                expect(page.locator("body")).to_contain_text(released.gitops_commit)

                # The model page, reloaded: released, deployed, its commit in the GitOps history.
                page.goto(f"{base}/edge/models/{MANUAL}")
                page.reload()
                versions = page.locator("details.version").first
                expect(versions).to_contain_text("released")
                expect(versions).to_contain_text(f"commit {released.gitops_commit[:8]}")
                expect(page.locator("body")).to_contain_text(f"release({MANUAL}): version 1")
                expect(page.locator("table").first).to_contain_text("phones")
                shots.take(page, "edge-releases-after-approval.png", full_page=True)

                # The release's trigger form: the reason may stay empty, the form says what each field does.
                page.goto(f"{base}/dags/{MANUAL_DAG}")
                page.locator("button", has_text="Trigger").first.click()
                dialog = page.get_by_role("dialog")
                expect(dialog.get_by_text("Optional: why this release is started")).to_be_attached()
                expect(dialog.locator("button", has_text="Trigger").last).to_be_enabled()
                shots.take(page, "release-trigger-form.png")
                page.keyboard.press("Escape")

                # The overview in Airflow's navigation now shows all three outcomes.
                page.goto(f"{base}/")
                page.get_by_role("link", name="Edge Releases").click()
                rows = page.frame_locator("iframe").locator("table.models tbody tr")
                expect(rows.filter(has_text=MANUAL)).to_contain_text("released")
                expect(rows.filter(has_text=MANUAL)).to_contain_text("phones v1")
                shots.take(page, "edge-releases-list.png")
            except BaseException:
                page.screenshot(path=str(shots.folder / "failure.png"), full_page=True)  # never into the docs
                raise
            finally:
                browser.close()
    finally:
        starting.cancel()
        try:
            starting.result(timeout=300)
        except BaseException:  # noqa: BLE001 (a failed start stopped itself; the test's error is reported)
            pass
        pool.shutdown()
        airflow.stop()
    total = time.monotonic() - started
    print(f"browser test: data and Airflow ready in {prepared:.0f} s, approval awaited "
          f"{awaiting_after - (waited - started):.0f} s (at {awaiting_after:.0f} s), run finished "
          f"{run_after_click:.0f} s after the click, {total:.0f} s in all; screenshots in {shots.folder}")
