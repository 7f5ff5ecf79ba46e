"""The edge agent against a real release: install, tampering, crash safety, backoff, fleet, CLI.

One release for the module (about 12 s). Every test gets a `World`: its own copy of the
GitOps remote, of the artifact store (the released model under its real key
`models/<model>/<sha256>/model.onnx`) and of the pipeline's settings, with the release key.
`World.release` does what the pipeline does for a new version (edit the base manifest,
attest it with the release key, commit, push, publish the TUF repository); `World.hand_edit`
is a Git writer without the key. Devices read the TUF repository (`tuf+file://`) by default,
or the attested Git checkout (`source="git"`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import onnx
import pytest
import yaml
from conftest import ROOT, tabular_frame, write_spec

from pipelines.edge import telemetry
from pipelines.edge.agent import EdgeAgent
from pipelines.edge.desired import in_rollout
from pipelines.edge.desired_state import ROLLBACK_ANNOTATION, attest_commit
from pipelines.edge.publish import DesiredStatePublished, ensure_repository, publish_desired_state
from pipelines.edge.sources import GitDesiredState, TufDesiredState
from pipelines.gitops import repo
from pipelines.gitops.signing import generate_key_pair, sign_artifact
from pipelines.settings import Settings
from pipelines.storage import ObjectStore, sha256_file

MODEL = "edge-model"
BASE = f"apps/{MODEL}/base/mobileaimodeldeployment.yaml"
OVERLAY = f"apps/{MODEL}/overlays/phones/kustomization.yaml"
GROUP = "meter-phones-android"  # the fleet file's group whose labels the release's selector matches
PHONE = {"apexlogic.dev/device-class": "android-phone", "app": "meter-reading"}
SOURCES = ["tuf", "git"]


def release_model(folder: Path, name: str = MODEL, **spec) -> dict:
    """One real release of a tiny spec (targeting android phones unless `spec` says otherwise)
    in `folder/state`: its settings (which keep pointing there) and summary."""
    from pipelines.release import run_release

    previous = os.environ.get("EDGE_STATE_DIR")
    os.environ["EDGE_STATE_DIR"] = str(folder / "state")
    try:
        tabular_frame().to_csv(folder / "data.csv", index=False)
        summary = run_release(write_spec(folder, name, "data.csv", **spec))
        assert summary.status == "released", summary.reasons
        return {"settings": Settings(), "summary": summary}
    finally:
        if previous is None:
            os.environ.pop("EDGE_STATE_DIR", None)
        else:
            os.environ["EDGE_STATE_DIR"] = previous


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return release_model(tmp_path_factory.mktemp("edge-agent"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Released:
    """A released model file in the original store."""

    path: Path
    sha: str
    size: int


class World:
    """A private GitOps remote, artifact store, TUF repository and telemetry store, and the
    pipeline's moves on them (with the release key) and an intruder's (without it).

    `released` is what `release_model` returned, plus `others` (model -> summary) for further
    models released into the same state folder.
    """

    def __init__(self, released: dict, tmp: Path, *, store_url: str | None = None, s3_endpoint: str | None = None,
                 tuf_url: str | None = None, telemetry_url: str | None = None):
        source = released["settings"]
        summaries = {MODEL: released["summary"], **released.get("others", {})}
        self.tmp = tmp
        self.remote = tmp / "remote.git"
        shutil.copytree(source.remote, self.remote)
        self.private_key, self.public_key = source.signing_keys()
        tuf_keys = source.tuf_keys()  # the release's demo TUF keys, configured explicitly here
        self.models = {}
        for model, summary in summaries.items():
            path = Path(unquote(urlparse(summary.artifact_uri).path))
            self.models[model] = Released(path, summary.artifact_sha256, path.stat().st_size)
        self.artifact, self.sha, self.size = self.models[MODEL].path, self.models[MODEL].sha, self.models[MODEL].size
        self.telemetry = tmp / "telemetry"
        self.store_dir = tmp / "store"
        self.clock = Clock()
        self.settings = Settings(
            state_dir=tmp / "state", artifact_store=store_url or self.store_dir.as_uri(),
            gitops_remote=str(self.remote), signing_key=self.private_key, signing_public_key=self.public_key,
            telemetry_store=telemetry_url or self.telemetry.as_uri(), s3_endpoint_url=s3_endpoint, tuf_url=tuf_url,
            tuf_root_key=tuf_keys["root"], tuf_snapshot_key=tuf_keys["snapshot"],
            tuf_timestamp_key=tuf_keys["timestamp"])
        self.tuf_url = self.settings.device_tuf_url
        self.store = ObjectStore(self.settings.store_url, s3_endpoint)
        self.genuine: dict[str, dict[str, str]] = {}  # model -> its files as the pipeline last committed them
        for model in self.models:  # the pipeline's commit of each model, pointing at this store
            self.release("1", model=model, publish=False)
        self.published = publish_desired_state(self.settings)
        assert self.published.refused == {}, self.published.refused
        self.trusted_root = ensure_repository(self.settings).trusted_root()

    # -- the store ---------------------------------------------------------------------------
    def key(self, variant: str | None = None, sha: str | None = None, model: str = MODEL) -> str:
        """The store key of a model file: `models/<model>/<sha>/[variants/<variant>/]model.onnx`."""
        middle = f"variants/{variant}/" if variant else ""
        return f"models/{model}/{sha or self.models[model].sha}/{middle}model.onnx"

    def put(self, variant: str | None = None, model: str = MODEL) -> str:
        """The released artifact and its bundle under `key(variant)`; the key."""
        key = self.key(variant, model=model)
        self.store.put_file(self.models[model].path, key)
        self.store.put_file(f"{self.models[model].path}.sig", f"{key}.sig")
        return key

    def path(self, key: str) -> Path:
        """The local file of a key (file:// stores)."""
        return self.store.local_path(key)

    # -- Git ---------------------------------------------------------------------------------
    def files(self, model: str = MODEL) -> dict[str, str]:
        """The model's files at the tip of the GitOps branch."""
        return repo.app_files(self.settings.remote, "main", model, self.settings.work_dir / "gitops")[0]

    def commit(self, edit: Callable[[dict[str, str]], None], *, attest: bool = True, model: str = MODEL,
               message: str = "edit", publish: bool = True) -> DesiredStatePublished | None:
        """Edit the model's files, commit, push, and publish the TUF repository. With `attest`
        this is the pipeline: it starts from what it committed last and signs the result with
        the release key. Without, a Git writer who holds no key edits the tip."""
        files = dict(self.genuine.get(model) or self.files(model)) if attest else self.files(model)
        edit(files)
        if attest:
            files = attest_commit(self.settings, model, files)
            self.genuine[model] = files
        repo.commit_release(self.settings.remote, "main", model, files, message,
                            ("test", "test@example.com"), self.settings.work_dir / "gitops")
        return publish_desired_state(self.settings) if publish else None

    def edit_base(self, change: Callable[[dict], None], *, attest: bool = True, model: str = MODEL,
                  publish: bool = True) -> DesiredStatePublished | None:
        base = f"apps/{model}/base/mobileaimodeldeployment.yaml"

        def edit(files: dict[str, str]) -> None:
            doc = yaml.safe_load(files[base])
            change(doc)
            files[base] = yaml.safe_dump(doc, sort_keys=False)

        return self.commit(edit, attest=attest, model=model, publish=publish)

    def hand_edit(self, change: Callable[[dict], None]) -> DesiredStatePublished:
        """A commit by someone who can push but holds no key; then the publisher runs."""
        return self.edit_base(change, attest=False)

    def point_at(self, doc: dict, key: str, sha: str | None = None, size: int | None = None,
                 model: str = MODEL) -> None:
        ref = doc["spec"]["modelRef"]
        ref["sourceUri"] = self.store.uri(key)
        ref["signatureRef"] = {"uri": self.store.uri(f"{key}.sig")}
        ref["checksum"] = f"sha256:{sha or self.models[model].sha}"
        ref["sizeBytes"] = size or self.models[model].size

    def release(self, version: str, variant: str | None = None, *, rollback: bool = False,
                tamper: Callable[[World, str], None] | None = None, spec: dict | None = None,
                model: str = MODEL, publish: bool = True) -> DesiredStatePublished | None:
        """Version `version` of the released artifact, copied under `key(variant)` (after
        `tamper(world, key)` changed the copy, if given), committed by the pipeline with `spec`
        merged into the manifest's spec, and published."""
        key = self.put(variant, model)
        if tamper is not None:
            tamper(self, key)

        def change(doc: dict) -> None:
            doc["spec"]["modelRef"]["version"] = version
            self.point_at(doc, key, model=model)
            annotations = doc["metadata"].setdefault("annotations", {})
            annotations.pop(ROLLBACK_ANNOTATION, None)
            if rollback:
                annotations[ROLLBACK_ANNOTATION] = "true"
            doc["spec"].update(spec or {})

        return self.edit_base(change, model=model, publish=publish)

    # -- devices -----------------------------------------------------------------------------
    def device_dir(self, device: str) -> Path:
        return self.tmp / "devices" / device

    def source(self, device: str, kind: str = "tuf", group: str = GROUP, **options):
        folder = self.device_dir(device)
        if kind == "git":
            return GitDesiredState(self.settings.remote, "main", folder / "gitops", self.settings.store_url,
                                   self.public_key, self.settings.s3_endpoint_url)
        return TufDesiredState(self.tuf_url, group, folder, self.trusted_root, root_check_interval_s=0, **options)

    def agent(self, device: str = "dev-a", labels: dict | None = None, *, source: str = "tuf",
              group: str = GROUP, fetcher=None, **options) -> EdgeAgent:
        options.setdefault("clock", self.clock)
        extra = {"fetcher": fetcher} if fetcher is not None else {}
        return EdgeAgent(device, PHONE if labels is None else labels, self.device_dir(device),
                         self.source(device, source, group, **extra), self.public_key, self.settings.telemetry_url,
                         self.settings.s3_endpoint_url, **options)

    def status_records(self, device: str, group: str = "phones") -> list[dict]:
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        log = self.telemetry / "telemetry" / MODEL / day / group / f"{device}.jsonl"
        if not log.is_file():
            return []
        return [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "status"]


@pytest.fixture
def world(released, tmp_path) -> World:
    return World(released, tmp_path)


def _folders(agent: EdgeAgent) -> list[str]:
    return sorted(p.name for p in (agent.models_dir / MODEL).iterdir())


def _no_leftovers(agent: EdgeAgent) -> None:
    assert not [p for p in agent.models_dir.rglob("*") if ".tmp" in p.name]
    assert not agent.staging_dir.exists() or not any(agent.staging_dir.iterdir())


# -- (a) install, unchanged, not selected ------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
def test_agent_installs_a_verified_model_and_reports_it(world, source):
    agent = world.agent(source=source)
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
    assert state["sequences"][MODEL] > 0
    _no_leftovers(agent)

    [record] = world.status_records("dev-a")
    assert record["state"] == "active" and record["version"] == "1" and record["device_id"] == "dev-a"
    assert record["device_class"] == "android-phone" and record["latency_ms"] > 0 and record["ts"].endswith("Z")

    mtime = active.stat().st_mtime_ns
    [again] = agent.poll_once()
    assert again.state == "unchanged" and again.version == "1"
    assert agent.downloads == 1 and active.stat().st_mtime_ns == mtime
    assert len(world.status_records("dev-a")) == 2

    # A device of the group whose labels the entry does not select.
    other = world.agent("dev-b", {"apexlogic.dev/device-class": "ios-phone", "app": "meter-reading"},
                        source=source)
    [skipped] = other.poll_once()
    assert skipped.state == "not_selected" and skipped.version is None
    assert other.active_model_path(MODEL) is None and other.downloads == 0
    assert not any(other.models_dir.iterdir())
    if source == "tuf":  # the iOS group's document offers nothing at all
        ios = world.agent("dev-c", {"apexlogic.dev/device-class": "ios-phone", "app": "meter-reading"},
                          group="meter-phones-ios")
        assert ios.poll_once() == [] and ios.downloads == 0


def test_the_device_reports_what_the_installed_model_costs_it(world):
    """The smoke test's measurements (synthetic inputs: nothing private) go with every status
    record of the installed version; values planted in the device's state file do not leave it."""
    from pipelines.edge.telemetry import measured_cost

    agent = world.agent()
    agent.poll_once()
    [record] = world.status_records("dev-a")
    measured = record["measurements"]
    active = agent.active_model_path(MODEL)
    assert measured["model_bytes"] == active.stat().st_size and measured["runs"] == 20
    assert measured["downloaded_bytes"] == active.stat().st_size + (active.parent / "model.onnx.sig").stat().st_size
    assert measured["load_ms"] > 0 and 0 < measured["cpu_ms"] <= measured["wall_ms"] * 1.5
    assert measured["rss_bytes"] >= 0
    [row] = measured_cost(world.status_records("dev-a"))
    assert (row["model"], row["version"], row["device_class"], row["devices"]) == (MODEL, "1", "android-phone", 1)
    assert row["model_bytes"] == measured["model_bytes"]

    # The device's disk is hostile: a planted value is dropped, never sent.
    state_file = agent.state_dir / "state.json"
    state = json.loads(state_file.read_text())
    state["models"][MODEL]["measurements"] = {"cpu_ms": "DROP TABLE", "load_ms": float("inf"), "wall_ms": -1,
                                              "secret": "x" * 10_000, "model_bytes": 1234}
    state_file.write_text(json.dumps(state))
    world.agent().poll_once()
    last = world.status_records("dev-a")[-1]
    assert last["state"] == "unchanged" and last["measurements"] == {"model_bytes": 1234}


# -- (b) tampering ----------------------------------------------------------------------------
# A store file changed after the pipeline signed and attested it. Through Git the device reads
# the store itself and refuses the file; through TUF the publisher refuses to publish it, so
# devices keep the last good state and never see it.
def _flip_byte(world: World, key: str) -> None:
    path = world.path(key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _foreign_signature(world: World, key: str) -> None:
    keys = world.tmp / "other-keys"
    keys.mkdir()
    generate_key_pair(keys / "other.key", keys / "other.pub")
    sign_artifact(world.path(key), Path(f"{world.path(key)}.sig"), keys / "other.key")


def _drop_signature(world: World, key: str) -> None:
    Path(f"{world.path(key)}.sig").unlink()


def _cut_off(world: World, key: str) -> None:
    path = world.path(key)
    path.write_bytes(path.read_bytes()[: world.size // 2])


TAMPERING = {  # tampering, what the device says (Git), what the publisher says (TUF)
    "flip-byte": (_flip_byte, r"sha256 mismatch: artifact is [0-9a-f]{12}…, the desired state says [0-9a-f]{12}…",
                  r"the store's file is not the attested one: sha256 mismatch"),
    "foreign-signature": (_foreign_signature, r"signature check failed \(wrong_key\)",
                          r"signature check failed \(wrong_key\)"),
    "drop-signature": (_drop_signature, r"variants/v2/model\.onnx\.sig: does not exist",
                       r"variants/v2/model\.onnx\.sig: does not exist"),
    "cut-off": (_cut_off, r"artifact is \d+ bytes, the desired state says \d+ \(download cut off or another file\)",
                r"the store's file is not the attested one: artifact is \d+ bytes"),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("tampering", TAMPERING)
def test_a_tampered_store_file_is_never_activated(world, tampering, source):
    tamper, device_error, publisher_error = TAMPERING[tampering]
    agent = world.agent(source=source, backoff_base_s=0)
    assert agent.poll_once()[0].state == "active"
    before = agent.active_model_path(MODEL)

    published = world.release("2", "v2", tamper=tamper)
    [result] = agent.poll_once()
    if source == "git":
        assert (result.state, result.version) == ("failed", "2")
        assert result.error and "\n" not in result.error
        assert re.search(device_error, result.error), result.error
        assert world.status_records("dev-a")[-1]["error"] == result.error
    else:
        assert re.search(publisher_error, published.refused[MODEL]), published.refused
        assert not published.changed, "the publisher keeps the last good desired state"
        assert (result.state, result.version, result.error) == ("unchanged", "1", None)
    assert agent.active_model_path(MODEL) == before and agent.installed_version(MODEL) == "1"
    assert _folders(agent) == ["1-" + world.sha[:12], "active"]
    _no_leftovers(agent)

    # A fresh device never activates v2 either (through TUF it gets the last good v1).
    fresh = world.agent("dev-fresh", source=source, backoff_base_s=0)
    [first] = fresh.poll_once()
    assert (first.state, first.version) == (("failed", "2") if source == "git" else ("active", "1"))
    assert fresh.installed_version(MODEL) in (None, "1")


@pytest.mark.parametrize("source", SOURCES)
def test_signed_garbage_is_caught_by_the_smoke_test(world, source):
    # The right length, sha256 and a valid signature by the release key, attested and
    # published: only running it shows it is not a model.
    garbage = world.tmp / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model" * 10)
    sign_artifact(garbage, Path(f"{garbage}.sig"), world.private_key)
    sha = sha256_file(garbage)
    key = world.key(sha=sha)
    world.store.put_file(garbage, key)
    world.store.put_file(f"{garbage}.sig", f"{key}.sig")
    agent = world.agent(source=source, backoff_base_s=0)
    assert agent.poll_once()[0].state == "active"

    def change(doc: dict) -> None:
        doc["spec"]["modelRef"]["version"] = "2"
        world.point_at(doc, key, sha=sha, size=garbage.stat().st_size)

    assert world.edit_base(change).refused == {}
    [result] = agent.poll_once()
    assert (result.state, result.version) == ("failed", "2")
    assert result.error.startswith("smoke test: onnxruntime cannot load the model"), result.error
    assert agent.installed_version(MODEL) == "1" and _folders(agent) == ["1-" + world.sha[:12], "active"]
    _no_leftovers(agent)


# Commits by someone who can push to the GitOps repository but holds no key: the overlays no
# longer resolve to the attested entries. A Git device refuses the model; the publisher
# refuses to publish it, and TUF devices keep the last good state.
def _edit_checksum(doc: dict, world: World) -> None:
    doc["spec"]["modelRef"]["checksum"] = "sha256:" + "ab" * 32


def _unsigned_manifest(doc: dict, world: World) -> None:
    doc["spec"]["modelRef"].pop("signatureRef")


def _store_unreachable(doc: dict, world: World) -> None:
    doc["spec"]["modelRef"]["sourceUri"] = (world.tmp / "missing" / "model.onnx").as_uri()


UNATTESTED = {
    "edit-checksum": (_edit_checksum, r"apps/edge-model/overlays/phones: differs from the attested desired state "
                                      r"\(edited without the release key\)"),
    "unsigned-manifest": (_unsigned_manifest, r"spec\.modelRef\.signatureRef: unsigned artifacts are not shipped"),
    "store-unreachable": (_store_unreachable, r"missing/model\.onnx' is not inside the artifact store"),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("edit", UNATTESTED)
def test_an_edit_without_the_release_key_is_refused(world, edit, source):
    change, reason = UNATTESTED[edit]
    agent = world.agent(source=source)
    assert agent.poll_once()[0].state == "active"
    before = agent.active_model_path(MODEL)

    published = world.hand_edit(lambda doc: change(doc, world))
    [result] = agent.poll_once()
    if source == "git":
        assert (result.state, result.version) == ("refused", "1")
        assert re.search(reason, result.error), result.error
        assert world.status_records("dev-a")[-1]["state"] == "refused"
    else:
        assert re.search(reason, published.refused[MODEL]), published.refused
        assert not published.changed
        assert (result.state, result.version) == ("unchanged", "1")
    assert agent.active_model_path(MODEL) == before and agent.downloads == 1


def test_a_lower_version_needs_a_signed_rollback(world):
    agent = world.agent()
    world.release("5", "v5")
    assert agent.poll_once()[0].state == "active"

    assert world.release("3", "v3").refused == {}
    [refused] = agent.poll_once()
    assert (refused.state, refused.version) == ("refused", "3")
    assert refused.error == "v3 is lower than the installed v5 and the signed desired state is not a rollback"
    assert agent.installed_version(MODEL) == "5" and agent.downloads == 1

    world.release("3", "v3-rollback", rollback=True)
    [rolled] = agent.poll_once()
    assert rolled.state == "active" and agent.installed_version(MODEL) == "3"
    # The version rolled back from stays on the device; older ones are pruned.
    assert _folders(agent) == [f"3-{world.sha[:12]}", f"5-{world.sha[:12]}", "active"]


def test_rollout_share_and_the_control_version(world):
    devices = [f"dev-{i}" for i in range(100)]
    outside = [d for d in devices if not in_rollout(d, MODEL, 30)]
    inside = [d for d in devices if in_rollout(d, MODEL, 30)]
    running = world.agent(outside[0])
    assert running.poll_once()[0].state == "active"

    world.release("2", "v2", spec={"rollout": {"share": 30, "previousVersion": "1"}})
    [kept] = running.poll_once()
    assert (kept.state, kept.version) == ("unchanged", "1")
    assert kept.note == "control: outside the 30% rollout of v2"
    [fresh] = world.agent(outside[1]).poll_once()  # a new device outside the share gets the control
    assert (fresh.state, fresh.version, fresh.note) == ("active", "1", "control: outside the 30% rollout of v2")
    canary = world.agent(inside[0])
    assert canary.poll_once()[0].state == "active"
    assert canary.installed_version(MODEL) == "2"

    # A canary whose manifest names no control version: devices outside keep what they run.
    world.release("3", "v3", spec={"rollout": {"share": 30}})
    [kept] = running.poll_once()
    assert (kept.state, kept.version) == ("unchanged", "1") and "no control version named" in kept.note
    [skipped] = world.agent(outside[2]).poll_once()
    assert skipped.state == "not_selected" and "outside the 30% rollout of v3" in skipped.note
    assert canary.poll_once()[0].state == "active" and canary.installed_version(MODEL) == "3"


def test_a_device_no_longer_selected_keeps_serving(world):
    agent = world.agent()
    agent.poll_once()

    def to_ios(files: dict[str, str]) -> None:
        files[OVERLAY] = files[OVERLAY].replace("android-phone", "ios-phone")

    assert world.commit(to_ios).refused == {}  # the pipeline retargets the group (attested)
    [result] = agent.poll_once()
    assert (result.state, result.version) == ("not_selected", "1")
    assert agent.active_model_path(MODEL) is not None
    ios = world.agent("dev-ios", {"apexlogic.dev/device-class": "ios-phone", "app": "meter-reading"},
                      group="meter-phones-ios")
    assert ios.poll_once()[0].state == "active"


# -- (c) crash safety, recovery, backoff -------------------------------------------------------
def test_a_crash_before_the_switch_keeps_the_old_model(world):
    assert world.agent().poll_once()[0].state == "active"
    old = world.agent().active_model_path(MODEL)
    world.release("2", "v2")

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
    world.release("2", "v2")
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
    world.release("2", "v2")
    # The repository's copy of v2 is missing (a mirror that lost a file).
    [target] = (world.store_dir / "tuf" / "targets").rglob("*/variants/v2/*.model.onnx")
    hidden = world.tmp / "hidden.onnx"
    target.rename(hidden)
    agent = world.agent(backoff_base_s=60)
    [first] = agent.poll_once()
    assert first.state == "failed" and "DownloadHTTPError" in first.error, first.error
    world.clock.now += 61
    assert "DownloadHTTPError" in agent.poll_once()[0].error  # retried: second failure, next in 120 s
    world.clock.now += 61
    [waiting] = agent.poll_once()
    assert waiting.state == "failed" and "(retry in 59 s)" in waiting.error
    backoff = json.loads((agent.state_dir / "state.json").read_text())["backoff"][MODEL]
    assert backoff["failures"] == 2

    hidden.rename(target)  # the mirror has it again
    restarted = world.agent(backoff_base_s=60)
    assert "(retry in 59 s)" in restarted.poll_once()[0].error  # the backoff survived the restart
    world.clock.now += 60
    assert restarted.poll_once()[0].state == "active"
    assert json.loads((agent.state_dir / "state.json").read_text())["backoff"] == {}


def test_s3_store_tuf_over_http_and_s3_telemetry(released, tmp_path, s3_endpoint, monkeypatch):
    """The publisher writes the TUF repository into S3; devices read it over plain HTTP (a
    public-read prefix, as a bucket website or CDN serves it) and send telemetry to S3."""
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    models, fleet = f"agent-models-{uuid.uuid4().hex[:8]}", f"agent-telemetry-{uuid.uuid4().hex[:8]}"
    for bucket in (models, fleet):
        s3.create_bucket(Bucket=bucket)
    s3.put_bucket_policy(Bucket=models, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{models}/store/tuf/*"}]}))
    world = World(released, tmp_path, store_url=f"s3://{models}/store", s3_endpoint=s3_endpoint,
                  tuf_url=f"tuf+{s3_endpoint}/{models}/store/tuf", telemetry_url=f"s3://{fleet}/fleet")
    agent = world.agent("dev-s3")
    assert agent.poll_once()[0].state == "active"
    assert sha256_file(agent.active_model_path(MODEL)) == world.sha
    quiet = dict(agent.source.stats)
    assert agent.poll_once()[0].state == "unchanged"
    assert agent.source.stats["not_modified"] == quiet["not_modified"] + 1, "a quiet poll is a 304"
    git = world.agent("dev-s3-git", source="git")  # the Git source reads the S3 store itself
    assert git.poll_once()[0].state == "active"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=fleet)["Contents"]]
    assert len(keys) == 3 and all(k.startswith(f"fleet/telemetry/{MODEL}/") for k in keys)
    assert sum(bool(re.search(r"/phones/dev-s3-\d+\.json$", k)) for k in keys) == 2


def test_a_telemetry_outage_does_not_stop_the_device(world, caplog):
    blocked = world.tmp / "telemetry-blocked"
    blocked.write_text("a file where the telemetry folder should be")
    folder = world.device_dir("dev-t")
    agent = EdgeAgent("dev-t", PHONE, folder, world.source("dev-t"), world.public_key, blocked.as_uri())
    assert agent.poll_once()[0].state == "active"
    assert "telemetry for edge-model not written" in caplog.text
    assert agent.telemetry_dropped == 1


def _inference_records(world: World, device: str) -> list[dict]:
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


def test_privacy_in_the_signed_state_noises_what_devices_send(world):
    world.edit_base(lambda doc: doc["spec"]["telemetry"].update(privacy={"epsilon": 1.0}, sampleRate=0.0))
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
def test_a_small_fleet_converges_with_one_download_per_device(world):
    from pipelines.edge.simulator import format_convergence, simulate

    result = simulate(20, 2, world.settings)
    assert result["source"] == "tuf"
    assert result["converged_round"] == {MODEL: 1}
    for record in result["rounds"]:
        info = record["models"][MODEL]
        assert info["selected"] == info["on_desired"] == info["versions"]["1"] == result["groups"][GROUP]
    first, second = (r["source_bytes_per_device"]["mean"] for r in result["rounds"])
    timestamp = world.store_dir / "tuf" / "metadata" / "timestamp.json"
    assert first > second == timestamp.stat().st_size, "a quiet poll reads the timestamp, nothing else"
    downloads = result["downloads_per_device"]
    assert downloads["min"] == downloads["max"] == 1
    assert downloads["devices_with_models"] == result["rounds"][0]["models"][MODEL]["selected"]
    table = format_convergence(result)
    assert "every selected device on the desired version since round 1" in table


def test_cli_edge_agent_and_fleet_simulate(world, tmp_path, capsys, monkeypatch):
    from pipelines.__main__ import main

    settings = world.settings
    for name, value in {"EDGE_STATE_DIR": settings.state_dir, "EDGE_ARTIFACT_STORE": settings.store_url,
                        "EDGE_GITOPS_REMOTE": settings.remote, "EDGE_SIGNING_KEY": world.private_key,
                        "EDGE_SIGNING_PUBLIC_KEY": world.public_key,
                        "EDGE_TUF_SNAPSHOT_KEY": settings.tuf_snapshot_key,
                        "EDGE_TUF_TIMESTAMP_KEY": settings.tuf_timestamp_key,
                        "EDGE_TELEMETRY_STORE": settings.telemetry_url}.items():
        monkeypatch.setenv(name, str(value))
    root = tmp_path / "root.json"
    assert main(["tuf-root", "--output", str(root)]) == 0
    assert root.read_bytes() == world.trusted_root
    assert main(["publish-desired-state"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("desired state unchanged")

    labels = "apexlogic.dev/device-class=android-phone,app=meter-reading"
    args = ["edge-agent", "--device-id", "cli-1", "--labels", labels, "--group", GROUP, "--trusted-root", str(root),
            "--state", str(tmp_path / "cli-1"), "--once"]
    assert main(args) == 0
    assert re.fullmatch(rf"{MODEL} v1 active \(group phones\) smoke \d+\.\d\d ms", capsys.readouterr().out.strip())
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"{MODEL} v1 unchanged (group phones)"
    git = ["edge-agent", "--device-id", "cli-2", "--labels", labels, "--source", "git",
           "--state", str(tmp_path / "cli-2")]
    assert main(git) == 0
    assert capsys.readouterr().out.startswith(f"{MODEL} v1 active (group phones)")

    assert main(["edge-agent", "--device-id", "x", "--labels", "a=b,broken"]) == 2
    assert capsys.readouterr().err.strip() == "error: --labels: 'broken' is not key=value"
    assert main(["edge-agent", "--device-id", "x", "--labels", "a=b", "--state", str(tmp_path / "x")]) == 2
    assert "--group is required with --source tuf" in capsys.readouterr().err

    # A branch name that would break out of its line in the clone's .git/config (and name a
    # command git runs) is refused before anything is cloned or written.
    monkeypatch.setenv("EDGE_GITOPS_BRANCH", 'main"]\n[core]\n\tsshCommand = touch pwned\n[x "')
    injected = ["edge-agent", "--device-id", "cli-3", "--labels", labels, "--source", "git",
                "--state", str(tmp_path / "cli-3")]
    assert main(injected) == 2
    assert capsys.readouterr().err.strip().startswith("error: cli-3: branch 'main\"]\\n[core]")
    assert not (tmp_path / "cli-3" / "gitops").exists() and not (tmp_path / "pwned").exists()
    monkeypatch.delenv("EDGE_GITOPS_BRANCH")

    assert main(["fleet", "simulate", "--devices", "4", "--rounds", "1"]) == 0
    assert "Fleet of 4 devices (source: tuf)" in capsys.readouterr().out


def test_the_edge_package_imports_neither_mlflow_nor_airflow():
    code = ("import sys, pipelines.edge.agent, pipelines.edge.sources, pipelines.edge.tuf_client, "
            "pipelines.edge.simulator; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'airflow')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def regression_release(tmp_path_factory) -> dict:
    data = {"source": "data.csv", "target": "x2", "features": ["x1", "colour"], "sensitiveFeatures": ["group"],
            "validation": {"minRows": 50}}
    return release_model(tmp_path_factory.mktemp("edge-regression"), data=data, task="regression",
                         training={"framework": "sklearn", "estimator": "linear_regression", "seed": 1},
                         gates={"quality": {"r2": {"minValue": -1.0}}},
                         responsibleAI={"fairness": {"maxErrorGap": 5.0}})


@pytest.mark.parametrize("bins", ["[" + ",".join(str(i) for i in range(5000)) + "]", "[3, 1]", '[1, "NaN"]'])
def test_signed_bins_out_of_contract_are_never_activated(regression_release, tmp_path, bins):
    """A release-signed regression file whose bin edges a device would size its telemetry by
    are too many, unordered or not finite: the smoke test refuses it, version 1 keeps serving."""
    world = World(regression_release, tmp_path)
    agent = world.agent("dev-b", backoff_base_s=0)
    assert agent.poll_once()[0].state == "active"
    model = onnx.load(world.models[MODEL].path)
    [entry] = [p for p in model.metadata_props if p.key == "edge.prediction_bins"]
    entry.value = bins
    crafted = tmp_path / "crafted.onnx"
    onnx.save(model, str(crafted))
    sign_artifact(crafted, Path(f"{crafted}.sig"), world.private_key)
    sha = sha256_file(crafted)
    key = world.key(sha=sha)
    world.store.put_file(crafted, key)
    world.store.put_file(f"{crafted}.sig", f"{key}.sig")

    def change(doc: dict) -> None:
        doc["spec"]["modelRef"]["version"] = "2"
        world.point_at(doc, key, sha=sha, size=crafted.stat().st_size)

    assert world.edit_base(change).refused == {}
    [result] = agent.poll_once()
    assert (result.state, result.version) == ("failed", "2")
    assert result.error.startswith("smoke test: edge.prediction_bins is not a list"), result.error
    assert agent.installed_version(MODEL) == "1"
    assert agent.serve(MODEL, tabular_frame(rows=5, seed=2)[["x1", "colour"]])  # v1 answers
    _no_leftovers(agent)


def test_a_regression_is_served_and_its_answers_counted_in_the_files_bins(regression_release, tmp_path):
    """A regression's answers are numbers: the device counts each in the bin the file's
    metadata gives (ten equal shares of the training predictions), as a classifier's classes."""
    from pipelines.data import prepare_features
    from pipelines.onnx.export import answer_contract, answer_labels, predict, session

    world = World(regression_release, tmp_path)
    agent = world.agent("dev-r")
    assert agent.poll_once()[0].state == "active"
    rows = tabular_frame(rows=60, seed=8)[["x1", "colour"]]
    served = agent.serve(MODEL, rows)
    path = agent.active_model_path(MODEL)
    name, bins = answer_contract(session(path))
    assert name == "prediction" and len(bins) == 9
    expected = answer_labels(predict(path, prepare_features(rows, list(rows.columns))), bins)
    assert served == expected.tolist() and len(set(served)) > 3
    agent.flush_telemetry()
    [record] = _inference_records(world, "dev-r")
    assert set(record["predictions"]) == {str(b) for b in range(10)}
    assert {k: int(v) for k, v in record["predictions"].items() if v} == {
        str(b): int((expected == b).sum()) for b in set(expected.tolist())}
