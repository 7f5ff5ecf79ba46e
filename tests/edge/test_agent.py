"""The edge agent against a real release: install, tampering, crash safety, backoff, fleet, CLI.

One release for the module (about 15 s). Every test gets its own copy of the GitOps remote
and of the artifact (a `World`), so tampering never leaks into the next test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from conftest import ROOT, tabular_frame, write_spec

from pipelines.edge import telemetry
from pipelines.edge.agent import EdgeAgent
from pipelines.edge.desired import GitSource, in_rollout
from pipelines.gitops.rollback import ROLLBACK_ANNOTATION
from pipelines.gitops.signing import generate_key_pair, sign_artifact
from pipelines.settings import Settings
from pipelines.storage import sha256_file

MODEL = "edge-model"
BASE = f"apps/{MODEL}/base/mobileaimodeldeployment.yaml"
PHONE = {"apexlogic.dev/device-class": "android-phone", "app": "meter-reading"}


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """One real release of a tiny spec targeting android phones, in its own state folder."""
    from pipelines.release import run_release

    folder = tmp_path_factory.mktemp("edge-agent")
    previous = os.environ.get("EDGE_STATE_DIR")
    os.environ["EDGE_STATE_DIR"] = str(folder / "state")
    try:
        tabular_frame().to_csv(folder / "data.csv", index=False)
        summary = run_release(write_spec(folder, MODEL, "data.csv"))
        assert summary.status == "released", summary.reasons
        yield {"settings": Settings(), "summary": summary}
    finally:
        if previous is None:
            os.environ.pop("EDGE_STATE_DIR", None)
        else:
            os.environ["EDGE_STATE_DIR"] = previous


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A private copy of the remote and the artifact, and helpers to change them."""

    def __init__(self, released: dict, tmp: Path):
        settings, summary = released["settings"], released["summary"]
        self.tmp = tmp
        self.remote = tmp / "remote.git"
        shutil.copytree(settings.remote, self.remote)
        self.private_key, self.public_key = settings.signing_keys()
        self.artifact = Path(unquote(urlparse(summary.artifact_uri).path))
        self.sha = summary.artifact_sha256
        self.telemetry = tmp / "telemetry"
        self.clock = Clock()
        self.work = tmp / "work"
        _git("clone", "-q", str(self.remote), str(self.work))
        self.commit(lambda doc: self.point_at(doc, self.publish("v1")))

    def publish(self, name: str) -> Path:
        """A copy of the released artifact and its bundle under store/<name>/."""
        folder = self.tmp / "store" / name
        folder.mkdir(parents=True)
        shutil.copyfile(self.artifact, folder / "model.onnx")
        shutil.copyfile(f"{self.artifact}.sig", folder / "model.onnx.sig")
        return folder / "model.onnx"

    @staticmethod
    def point_at(doc: dict, artifact: Path) -> None:
        ref = doc["spec"]["modelRef"]
        ref["sourceUri"] = artifact.as_uri()
        ref["signatureRef"] = {"uri": Path(f"{artifact}.sig").as_uri()}

    def commit(self, edit) -> None:
        path = self.work / BASE
        doc = yaml.safe_load(path.read_text())
        edit(doc)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        _git("commit", "-q", "-am", "edit", "--allow-empty", cwd=self.work)
        _git("push", "-q", "origin", "HEAD:main", cwd=self.work)

    def release(self, version: str, name: str | None = None, **annotations: str) -> Path:
        """Commit `version` pointing at a fresh copy of the artifact (store/<name>)."""
        artifact = self.publish(name or f"v{version}")

        def edit(doc: dict) -> None:
            doc["spec"]["modelRef"]["version"] = version
            doc["metadata"]["annotations"].pop(ROLLBACK_ANNOTATION, None)
            doc["metadata"]["annotations"].update(annotations)
            self.point_at(doc, artifact)

        self.commit(edit)
        return artifact

    def agent(self, device: str = "dev-a", labels: dict | None = None, **options) -> EdgeAgent:
        folder = self.tmp / "devices" / device
        options.setdefault("clock", self.clock)
        return EdgeAgent(device, PHONE if labels is None else labels, folder,
                         GitSource(str(self.remote), "main", folder / "gitops"), self.public_key,
                         self.telemetry.as_uri(), **options)


@pytest.fixture
def world(released, tmp_path) -> World:
    return World(released, tmp_path)


def _folders(agent: EdgeAgent) -> list[str]:
    return sorted(p.name for p in (agent.models_dir / MODEL).iterdir())


def _no_leftovers(agent: EdgeAgent) -> None:
    assert not [p for p in agent.models_dir.rglob("*") if ".tmp" in p.name]
    assert not agent.staging_dir.exists() or not any(agent.staging_dir.iterdir())


# -- (a) install, unchanged, not selected ------------------------------------------------------
def test_agent_installs_a_verified_model_and_reports_it(world):
    agent = world.agent()
    [result] = agent.poll_once()
    assert (result.model, result.version, result.state, result.error) == (MODEL, "1", "active", None)
    assert result.group == "phones" and result.latency_ms > 0

    link = agent.models_dir / MODEL / "active"
    assert link.is_symlink() and os.readlink(link) == f"1-{world.sha[:12]}"
    active = agent.active_model_path(MODEL)
    assert active.parent.parent == (agent.models_dir / MODEL).resolve()
    assert sha256_file(active) == world.sha and (active.parent / "model.onnx.sig").is_file()
    state = json.loads((agent.state_dir / "state.json").read_text())
    assert state["models"][MODEL]["version"] == "1" and state["backoff"] == {}
    _no_leftovers(agent)

    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    log = world.telemetry / "telemetry" / MODEL / day / "phones" / "dev-a.jsonl"
    [record] = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["state"] == "active" and record["version"] == "1" and record["device_id"] == "dev-a"
    assert record["device_class"] == "android-phone" and record["latency_ms"] > 0 and record["ts"].endswith("Z")

    mtime = active.stat().st_mtime_ns
    [again] = agent.poll_once()
    assert again.state == "unchanged" and again.version == "1"
    assert agent.downloads == 1 and active.stat().st_mtime_ns == mtime
    assert len(log.read_text().splitlines()) == 2

    other = world.agent("dev-b", {"apexlogic.dev/device-class": "ios-phone"})
    [skipped] = other.poll_once()
    assert skipped.state == "not_selected" and skipped.version is None
    assert other.active_model_path(MODEL) is None and other.downloads == 0
    assert not any(other.models_dir.iterdir())


# -- (b) tampering ----------------------------------------------------------------------------
def _flip_byte(artifact: Path, world: World) -> None:
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))


def _foreign_signature(artifact: Path, world: World) -> None:
    keys = world.tmp / "other-keys"
    keys.mkdir()
    generate_key_pair(keys / "other.key", keys / "other.pub")
    sign_artifact(artifact, Path(f"{artifact}.sig"), keys / "other.key")


def _drop_signature(artifact: Path, world: World) -> None:
    Path(f"{artifact}.sig").unlink()


def _edit_checksum(artifact: Path, world: World) -> None:
    world.commit(lambda doc: doc["spec"]["modelRef"].update(checksum="sha256:" + "ab" * 32))


def _store_unreachable(artifact: Path, world: World) -> None:
    world.commit(lambda doc: doc["spec"]["modelRef"].update(
        sourceUri=(world.tmp / "missing" / "model.onnx").as_uri()))


def _cut_off(artifact: Path, world: World) -> None:
    data = artifact.read_bytes()
    artifact.write_bytes(data[: len(data) // 2])


def _unsigned_manifest(artifact: Path, world: World) -> None:
    world.commit(lambda doc: doc["spec"]["modelRef"].pop("signatureRef"))


def _signed_garbage(artifact: Path, world: World) -> None:
    # Correct checksum and a valid signature by the trusted key, but not a model: only the
    # smoke inference can stop it.
    artifact.write_bytes(b"not an onnx model" * 10)
    sign_artifact(artifact, Path(f"{artifact}.sig"), world.private_key)
    world.commit(lambda doc: doc["spec"]["modelRef"].update(
        checksum=f"sha256:{sha256_file(artifact)}", sizeBytes=artifact.stat().st_size))


TAMPERING = [
    (_flip_byte, r"sha256 mismatch"),
    (_foreign_signature, r"signature check failed \(wrong_key\)"),
    (_drop_signature, r"cannot download signature bundle .*does not exist"),
    (_edit_checksum, r"sha256 mismatch: artifact is [0-9a-f]{12}…, the manifest says abababababab"),
    (_store_unreachable, r"cannot download artifact .*missing/model.onnx: it does not exist"),
    (_cut_off, r"download cut off"),
    (_unsigned_manifest, r"unsigned artifacts are not installed"),
    (_signed_garbage, r"smoke test: onnxruntime cannot load the model"),
]


@pytest.mark.parametrize("tamper, error", TAMPERING, ids=[t.__name__.strip("_") for t, _ in TAMPERING])
def test_a_tampered_update_is_never_activated(world, tamper, error):
    agent = world.agent(backoff_base_s=0)
    assert agent.poll_once()[0].state == "active"
    before = agent.active_model_path(MODEL)

    tamper(world.release("2"), world)
    [result] = agent.poll_once()
    assert result.state == "failed" and result.version == "2"
    assert result.error and "\n" not in result.error
    assert re.search(error, result.error), result.error
    assert agent.active_model_path(MODEL) == before and agent.installed_version(MODEL) == "1"
    assert _folders(agent) == ["1-" + world.sha[:12], "active"]
    _no_leftovers(agent)

    # A fresh device never activates it either.
    fresh = world.agent("dev-fresh", backoff_base_s=0)
    assert fresh.poll_once()[0].state == "failed"
    assert fresh.active_model_path(MODEL) is None


def test_a_lower_version_needs_the_rollback_annotation(world):
    agent = world.agent()
    world.release("5")
    assert agent.poll_once()[0].state == "active"

    world.release("3", name="v3")
    [refused] = agent.poll_once()
    assert refused.state == "refused" and refused.version == "3"
    assert "lower than the installed v5" in refused.error and ROLLBACK_ANNOTATION in refused.error
    assert agent.installed_version(MODEL) == "5" and agent.downloads == 1

    world.release("3", name="v3-rollback", **{ROLLBACK_ANNOTATION: "true"})
    [rolled] = agent.poll_once()
    assert rolled.state == "active" and agent.installed_version(MODEL) == "3"
    # The version rolled back from stays on the device; older ones are pruned.
    assert _folders(agent) == [f"3-{world.sha[:12]}", f"5-{world.sha[:12]}", "active"]


def test_rollout_share_limits_who_updates(world):
    devices = [f"dev-{i}" for i in range(100)]
    outside = [d for d in devices if not in_rollout(d, MODEL, 30)]
    inside = [d for d in devices if in_rollout(d, MODEL, 30)]
    running = world.agent(outside[0])
    assert running.poll_once()[0].state == "active"

    world.release("2")
    world.commit(lambda doc: doc["spec"].update(rollout={"share": 30}))
    [kept] = running.poll_once()
    assert (kept.state, kept.version) == ("unchanged", "1") and "outside the 30% rollout of v2" in kept.note
    [fresh] = world.agent(outside[1]).poll_once()
    assert fresh.state == "not_selected" and "outside the 30% rollout" in fresh.note
    assert world.agent(inside[0]).poll_once()[0].state == "active"


def test_a_device_no_longer_selected_keeps_serving(world):
    agent = world.agent()
    agent.poll_once()
    overlay = world.work / f"apps/{MODEL}/overlays/phones/kustomization.yaml"
    overlay.write_text(overlay.read_text().replace("android-phone", "ios-phone"))
    _git("commit", "-q", "-am", "phones group now selects ios", cwd=world.work)
    _git("push", "-q", "origin", "HEAD:main", cwd=world.work)
    [result] = agent.poll_once()
    assert (result.state, result.version) == ("not_selected", "1")
    assert agent.active_model_path(MODEL) is not None


# -- (c) crash safety, recovery, backoff -------------------------------------------------------
def test_a_crash_before_the_switch_keeps_the_old_model(world):
    assert world.agent().poll_once()[0].state == "active"
    old = world.agent().active_model_path(MODEL)
    world.release("2")

    def power_loss(model: str, version: str) -> None:
        raise RuntimeError(f"simulated power loss before switching {model} to v{version}")

    # No backoff: a real power loss would not get to record one, so the next poll retries.
    crashing = world.agent(before_switch=power_loss, backoff_base_s=0)
    [result] = crashing.poll_once()
    assert result.state == "failed" and "simulated power loss" in result.error
    assert crashing.active_model_path(MODEL) == old and crashing.installed_version(MODEL) == "1"
    assert _folders(crashing) == ["1-" + world.sha[:12], "active"]
    _no_leftovers(crashing)

    restarted = world.agent()
    [result] = restarted.poll_once()
    assert result.state == "active" and restarted.installed_version(MODEL) == "2"
    assert _folders(restarted) == ["1-" + world.sha[:12], "2-" + world.sha[:12], "active"]


def test_the_active_link_wins_over_a_lost_state_write(world):
    agent = world.agent()
    agent.poll_once()
    world.release("2")
    agent.poll_once()
    state_file = agent.state_dir / "state.json"
    state = json.loads(state_file.read_text())
    state["models"][MODEL].update(version="1", folder="1-" + world.sha[:12])  # as if the write was lost
    state_file.write_text(json.dumps(state))
    (agent.models_dir / MODEL / "active.tmp").symlink_to("nowhere")  # and a half-made switch

    restarted = world.agent()
    assert restarted.installed_version(MODEL) == "2"
    assert not (agent.models_dir / MODEL / "active.tmp").is_symlink()
    assert restarted.poll_once()[0].state == "unchanged" and restarted.downloads == 0


def test_failures_back_off_exponentially_across_restarts(world):
    artifact = world.tmp / "store" / "late" / "model.onnx"
    world.commit(lambda doc: (doc["spec"]["modelRef"].update(version="2"), world.point_at(doc, artifact)))
    agent = world.agent(backoff_base_s=60)
    assert agent.poll_once()[0].state == "failed"
    world.clock.now += 61
    assert "does not exist" in agent.poll_once()[0].error  # retried: second failure, next in 120 s
    world.clock.now += 61
    [waiting] = agent.poll_once()
    assert waiting.state == "failed" and "(retry in 59 s)" in waiting.error
    backoff = json.loads((agent.state_dir / "state.json").read_text())["backoff"][MODEL]
    assert backoff["failures"] == 2

    shutil.copytree(world.artifact.parent, artifact.parent)  # the store has it now
    restarted = world.agent(backoff_base_s=60)
    assert "(retry in 59 s)" in restarted.poll_once()[0].error  # the backoff survived the restart
    world.clock.now += 60
    assert restarted.poll_once()[0].state == "active"
    assert json.loads((agent.state_dir / "state.json").read_text())["backoff"] == {}


def test_s3_store_and_s3_telemetry(world, monkeypatch):
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models")
        s3.create_bucket(Bucket="telemetry")
        s3.upload_file(str(world.artifact), "models", "edge/model.onnx")
        s3.upload_file(f"{world.artifact}.sig", "models", "edge/model.onnx.sig")
        world.commit(lambda doc: doc["spec"]["modelRef"].update(
            sourceUri="s3://models/edge/model.onnx", signatureRef={"uri": "s3://models/edge/model.onnx.sig"}))
        folder = world.tmp / "devices" / "dev-s3"
        agent = EdgeAgent("dev-s3", PHONE, folder, GitSource(str(world.remote), "main", folder / "gitops"),
                          world.public_key, "s3://telemetry/fleet")
        assert agent.poll_once()[0].state == "active"
        assert agent.poll_once()[0].state == "unchanged"
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="telemetry")["Contents"]]
        assert len(keys) == 2 and all(k.startswith(f"fleet/telemetry/{MODEL}/") for k in keys)
        assert all("/phones/dev-s3-" in k and k.endswith(".json") for k in keys)


def test_a_telemetry_outage_does_not_stop_the_device(world, caplog):
    blocked = world.tmp / "telemetry-blocked"
    blocked.write_text("a file where the telemetry folder should be")
    folder = world.tmp / "devices" / "dev-t"
    agent = EdgeAgent("dev-t", PHONE, folder, GitSource(str(world.remote), "main", folder / "gitops"),
                      world.public_key, blocked.as_uri())
    assert agent.poll_once()[0].state == "active"
    assert "telemetry for edge-model not written" in caplog.text


def _inference_records(world, device: str) -> list[dict]:
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    log = world.telemetry / "telemetry" / MODEL / day / "phones" / f"{device}.jsonl"
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "inference"]


def test_the_agent_serves_and_reports_what_it_served(world):
    from pipelines.data import prepare_features
    from pipelines.onnx.export import predict_proba

    agent = world.agent()
    assert agent.poll_once()[0].state == "active"
    rows = tabular_frame(rows=40, seed=5)[["x1", "x2", "colour"]]
    predictions = agent.serve(MODEL, rows)
    expected = predict_proba(agent.active_model_path(MODEL), prepare_features(rows, list(rows.columns))).argmax(1)
    assert predictions == expected.tolist(), "one inference per row gives the batch's answers"
    assert agent.serve(MODEL, rows.head(10), added_latency_ms=500.0, fail=[True] * 10) == [None] * 10
    agent.flush_telemetry()
    [record] = _inference_records(world, "dev-a")
    assert (record["version"], record["requests"], record["errors"]) == ("1", 50, 10)
    assert sum(record["latency_hist"]) == 50 and record["privacy"] is None
    slow = telemetry.latency_bin(500.0)
    assert record["latency_hist"][slow] == 10 and sum(record["latency_hist"][:slow]) == 40
    assert {k: int(v) for k, v in record["predictions"].items()} == {
        "0": int((expected == 0).sum()), "1": int((expected == 1).sum())}
    for sample in record["samples"]:  # the spec's default sample rate (0.1): a few of the 40
        assert set(sample["inputs"]) == {"x1", "x2", "colour"} and sample["output"] in (0, 1)
    agent.flush_telemetry()
    assert len(_inference_records(world, "dev-a")) == 1, "nothing served, nothing sent"


def test_privacy_in_the_manifest_noises_what_devices_send(world):
    world.commit(lambda doc: doc["spec"]["telemetry"].update(privacy={"epsilon": 1.0}, sampleRate=0.0))
    agent = world.agent("dev-p", seed=4)
    assert agent.poll_once()[0].state == "active"
    agent.serve(MODEL, tabular_frame(rows=30, seed=6)[["x1", "x2", "colour"]])
    agent.flush_telemetry()
    [record] = _inference_records(world, "dev-p")
    assert record["privacy"] == {"mechanism": "laplace", "epsilon": 1.0, "sensitivity": 4.0}
    assert record["requests"] != 30 and record["samples"] == []
    counts = [record["requests"], record["errors"], *record["latency_hist"], *record["predictions"].values()]
    assert sum(c != int(c) for c in counts) >= len(counts) - 1, "every count carries noise"
    twin = world.agent("dev-q", seed=4)  # the same simulation seed, another device
    twin.poll_once()
    twin.serve(MODEL, tabular_frame(rows=30, seed=6)[["x1", "x2", "colour"]])
    twin.flush_telemetry()
    [other] = _inference_records(world, "dev-q")
    assert other["requests"] != record["requests"], "devices draw independent noise, or it would not average out"


# -- (e) fleet, CLI, imports -------------------------------------------------------------------
def test_a_small_fleet_converges_with_one_download_per_device(released):
    from pipelines.edge.simulator import format_convergence, simulate

    result = simulate(20, 2, released["settings"])
    assert result["git_mode"] == "per-device"
    assert result["converged_round"] == {MODEL: 1}
    for record in result["rounds"]:
        info = record["models"][MODEL]
        assert info["selected"] == info["on_desired"] == info["versions"]["1"] > 0
    assert result["rounds"][0]["git_bytes_per_device"]["mean"] > 0
    assert result["rounds"][1]["git_bytes_per_device"]["max"] == 0
    downloads = result["downloads_per_device"]
    assert downloads["min"] == downloads["max"] == 1
    assert downloads["devices_with_models"] == result["rounds"][0]["models"][MODEL]["selected"]
    table = format_convergence(result)
    assert "every selected device on the desired version since round 1" in table


def test_cli_edge_agent_and_fleet_simulate(released, tmp_path, capsys):
    from pipelines.__main__ import main

    args = ["edge-agent", "--device-id", "cli-1", "--labels", "apexlogic.dev/device-class=android-phone",
            "--state", str(tmp_path / "cli-1"), "--once"]
    assert main(args) == 0
    assert re.fullmatch(rf"{MODEL} v1 active \(group phones\) smoke \d+\.\d\d ms", capsys.readouterr().out.strip())
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"{MODEL} v1 unchanged (group phones)"

    assert main(["edge-agent", "--device-id", "x", "--labels", "a=b,broken"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --labels: 'broken' is not key=value"

    assert main(["fleet", "simulate", "--devices", "4", "--rounds", "1"]) == 0
    assert "Fleet of 4 devices" in capsys.readouterr().out


def test_the_edge_package_imports_neither_mlflow_nor_airflow():
    code = ("import sys, pipelines.edge.agent, pipelines.edge.simulator; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'airflow')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
