"""Every canary analysis is saved to the artifact store (a dry run's is not), with its time."""

from datetime import timedelta

import yaml
from conftest import tabular_frame, write_spec

from pipelines import release
from pipelines.edge import telemetry
from pipelines.operate.rollout import ROLLOUTS_PREFIX, AnalysisRecord, analysis_key, step_rollout
from pipelines.settings import Settings
from pipelines.storage import ObjectStore

CANARY = {"type": "Canary", "canary": {"steps": [{"share": 30, "pause": "10m"}, {"share": 100}],
                                       "analysis": {"minRequests": 200}}}


def _serve(store: ObjectStore, version: str, devices: int, when) -> None:
    """Healthy inference windows of `devices` devices on `version`, written as agents write them."""
    for device in range(devices):
        window = telemetry.InferenceWindow("saved-canary", version, "phones", 2, started=when)
        for i in range(100):
            window.add(0.5, i % 2)
        telemetry.write_record(store, window.record(f"v{version}-dev-{device}", {}, now=when))


def test_a_hold_and_an_advance_are_saved_and_a_dry_run_is_not(tmp_path, state):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "saved-canary", "data.csv", deploymentStrategy=CANARY)
    assert release.run_release(spec).status == "released"
    doc = yaml.safe_load(spec.read_text())
    doc["training"]["params"] = {"C": 5.0}  # another version, at the first canary step
    spec.write_text(yaml.safe_dump(doc))
    assert release.run_release(spec).status == "released"
    settings = Settings(specs_dir=tmp_path)
    store = ObjectStore(settings.store_url)
    prefix = f"{ROLLOUTS_PREFIX}/saved-canary/"
    start = telemetry.utc_now()

    dry = step_rollout(spec, settings, now=start, dry_run=True, publish=False)
    assert dry.decision == "hold" and store.list_keys(prefix) == [], "a dry run saves nothing"

    held = step_rollout(spec, settings, now=start, publish=False)
    assert held.decision == "hold" and "canary requests" in held.reason
    assert store.list_keys(prefix) == [analysis_key("saved-canary", start)]

    _serve(ObjectStore(settings.telemetry_url), "2", 3, start)
    _serve(ObjectStore(settings.telemetry_url), "1", 6, start)
    later = start + timedelta(hours=1)
    advanced = step_rollout(spec, settings, now=later, publish=False)
    assert advanced.decision == "advance" and advanced.commit, advanced.lines()
    done = step_rollout(spec, settings, now=later + timedelta(minutes=5), publish=False)
    assert done.decision == "complete"

    keys = store.list_keys(prefix)
    assert keys == [analysis_key("saved-canary", moment) for moment in
                    (start, later, later + timedelta(minutes=5))]
    saved = [AnalysisRecord.model_validate_json(store.read_bytes(key)) for key in keys]
    assert [s.decision for s in saved] == ["hold", "advance", "complete"]
    assert saved[0] == AnalysisRecord(**held.model_dump(), at=telemetry.timestamp(start))
    assert saved[1] == AnalysisRecord(**advanced.model_dump(), at=telemetry.timestamp(later))
    assert (saved[1].share, saved[1].next_share, saved[1].commit) == (30, 100, advanced.commit)
    assert [c.name for c in saved[1].checks if c.passed] == ["error_rate", "error_rate_increase",
                                                             "p95_latency_ratio", "prediction_shift"]
