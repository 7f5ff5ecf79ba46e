"""The attack matrix, for real: each attack against a real agent and a real TUF repository.

Two real releases for the module (the device's model, and a second model for the kiosks whose
valid, signed artifact is the material of mix-and-match attacks). Every test gets a `World`
(see test_agent.py): its own GitOps remote, artifact store and TUF repository, which
`http_server.StaticServer` serves on 127.0.0.1 (the store's folder: `/tuf/metadata/...`,
`/tuf/targets/...`), so devices read it over HTTP as a fleet does.

Every case ends the same way: the last good model still serving (the active file and the
installed version unchanged), a named reason in the device's report (its AgentResult and the
status record in the telemetry store; for attacks the publisher stops, its refusal and a Git
device's), and nothing written outside the device's folder and the telemetry store. What each
case observed is collected in `MATRIX` and written at the end of the module as a Markdown
table to `$EDGE_STATE_DIR/attack-matrix.md`, and printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from http_server import StaticServer
from securesystemslib.signer import CryptoSigner
from test_agent import BASE, GROUP, MODEL, OVERLAY, PHONE, World, release_model
from tuf.api.metadata import Metadata, MetaFile

from pipelines.edge.agent import AgentResult, EdgeAgent
from pipelines.edge.desired_state import ROLLBACK_ANNOTATION, EntryError, check_entry
from pipelines.edge.publish import ensure_repository
from pipelines.edge.sources import DesiredState
from pipelines.edge.tuf_client import ConditionalFetcher
from pipelines.edge.tuf_repo import TufRepository, load_signer
from pipelines.storage import ObjectStore

OTHER = "kiosk-model"  # released for the kiosks: never selected by the phones
KIOSKS = [{"name": "kiosks", "selector": {"matchLabels": {"apexlogic.dev/device-class": "raspberry-pi-4"}}}]
MATRIX: list[tuple[str, str, str]] = []  # (attack, what the device did, the reason it reported)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge-attacks")
    # One variant each: every device group runs the base's artifact (with a quantized variant, the
    # host's timing may leave the base on fp32 while a group's cost picks int8, in its overlay).
    fp32 = {"opset": 17, "quantization": [], "accuracyBudget": 0.02}
    first = release_model(folder, export=fp32)
    # Another seed: the second model's file must differ from the first one's.
    other = release_model(folder, OTHER, targets=KIOSKS, export=fp32,
                          training={"framework": "sklearn", "estimator": "logistic_regression", "seed": 7})
    assert other["summary"].artifact_sha256 != first["summary"].artifact_sha256
    return {**first, "others": {OTHER: other["summary"]}}


@pytest.fixture(scope="module", autouse=True)
def attack_matrix(request):
    """Write the observed matrix after the module's last test, and print it."""
    yield MATRIX
    if not MATRIX:
        return
    lines = ["| Attack | What the device did | Reason it reported |", "|---|---|---|"]
    lines += [f"| {attack} | {outcome} | {reason.replace('|', '/')} |" for attack, outcome, reason in MATRIX]
    text = "\n".join(lines) + "\n"
    path = Path(os.environ["EDGE_STATE_DIR"]) / "attack-matrix.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    # Printed past pytest's capture, so a passing run shows it too.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n\nattack matrix ({path}):\n{text}", flush=True)


def _scrub(text: str, world: World | None) -> str:
    """A reason as the README shows it: no test folder, digests and ports shortened."""
    if world is not None:
        text = text.replace(str(world.tmp), "…")
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    text = re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1…", text)
    return re.sub(r"\d{13}", "<ms>", text)


def record(attack: str, outcome: str, reason: str, world: World | None = None) -> None:
    MATRIX.append((attack, outcome, _scrub(reason, world)))


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture
def world(released, tmp_path) -> Iterator[World]:
    """A World whose TUF repository devices read over HTTP from `world.server`."""
    world = World(released, tmp_path)
    with StaticServer(world.store_dir) as server:
        world.server = server
        world.tuf_url = f"tuf+{server.url}/tuf"
        yield world


def device(world: World, name: str = "dev-a", *, source: str = "tuf", **fetcher_options) -> EdgeAgent:
    """A device on v1 of the model; over HTTP (TUF) with `fetcher_options` for its fetcher."""
    fetcher = None
    if source == "tuf":
        fetcher_options.setdefault("root_check_interval_s", 0)
        fetcher = ConditionalFetcher(world.device_dir(name) / "tuf" / "http-cache", **fetcher_options)
    agent = world.agent(name, source=source, fetcher=fetcher, backoff_base_s=0)
    first = mine(agent.poll_once())
    assert (first.state, first.version) == ("active", "1"), first
    return agent


def mine(results: list[AgentResult]) -> AgentResult:
    """The phone model's result; the kiosk model (which a Git device also sees) selects no phone."""
    others = [r for r in results if r.model != MODEL]
    assert all((r.model, r.state) == (OTHER, "not_selected") for r in others), results
    [result] = [r for r in results if r.model == MODEL]
    return result


def listing(root: Path, *skip: Path) -> dict[str, tuple]:
    """Every path under `root` (links not followed, `skip` folders left out): type, size, mtime."""
    skipped = {str(p) for p in skip}
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skipped]
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            found[os.path.relpath(path, root)] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns)
    return found


@contextmanager
def nothing_written_outside(world: World, agent: EdgeAgent) -> Iterator[None]:
    """Whatever runs inside writes nothing in the world's folder but the device's folder and the
    telemetry store."""
    before = listing(world.tmp, agent.state_dir, world.telemetry)
    yield
    after = listing(world.tmp, agent.state_dir, world.telemetry)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) ^ set(after)
                             or [k for k in after if after[k] != before[k]]}


def poll(world: World, agent: EdgeAgent) -> AgentResult:
    with nothing_written_outside(world, agent):
        return mine(agent.poll_once())


def kept(world: World, agent: EdgeAgent, result: AgentResult, *, serving: Path, version: str, state: str,
         reason: str, attack: str) -> None:
    """The device still serves `serving` (v`version`) and reported `state` with a reason
    matching `reason` (AgentResult and telemetry); the case goes into the matrix."""
    assert result.state == state, result
    assert result.error and "\n" not in result.error and re.search(reason, result.error), result.error
    assert agent.active_model_path(MODEL) == serving and agent.installed_version(MODEL) == version
    status = world.status_records(agent.device_id)[-1]
    assert (status["state"], status["version"], status["error"]) == (state, result.version, result.error)
    record(attack, f"keeps v{version}; reports {state}" + (f" for v{result.version}" if result.version != version
                                                            else ""), result.error, world)


def target_path(world: World, path: str) -> str:
    """The URL path of a TUF target (content-addressed: `/tuf/targets/<dir>/<sha256>.<name>`)."""
    info = ensure_repository(world.settings).targets()[path]
    return f"/tuf/targets/{info.get_prefixed_paths()[0]}"


def cli_env(world: World) -> dict[str, str]:
    settings = world.settings
    return {"EDGE_STATE_DIR": str(settings.state_dir), "EDGE_ARTIFACT_STORE": settings.store_url,
            "EDGE_GITOPS_REMOTE": settings.remote, "EDGE_SIGNING_KEY": str(world.private_key),
            "EDGE_SIGNING_PUBLIC_KEY": str(world.public_key), "EDGE_TELEMETRY_STORE": settings.telemetry_url,
            "EDGE_TUF_URL": world.tuf_url}


# -- the repository and the network ----------------------------------------------------------
@pytest.mark.parametrize("forged", ["same-length", "larger"])
def test_arbitrary_artifact(world, forged):
    agent = device(world)
    serving = agent.active_model_path(MODEL)
    world.release("2", "v2")
    key = world.key("v2")
    data = os.urandom(world.size if forged == "same-length" else world.size * 4)
    world.path(key).write_bytes(data)  # the store's file, and the repository's copy of it
    (world.store_dir / target_path(world, key).lstrip("/")).write_bytes(data)
    result = poll(world, agent)
    expected = r"LengthOrHashMismatchError" if forged == "same-length" else r"DownloadLengthMismatchError"
    kept(world, agent, result, serving=serving, version="1", state="failed", reason=expected,
         attack=f"arbitrary artifact ({forged} bytes in the store and the repository)")


def test_rollback_by_replayed_old_metadata(world):
    agent = device(world)
    metadata = world.store_dir / "tuf" / "metadata"
    old = {p.name: p.read_bytes() for p in metadata.iterdir()}
    world.release("2", "v2")
    assert poll(world, agent).state == "active"
    serving = agent.active_model_path(MODEL)
    for name, data in old.items():  # the mirror serves the v1 timestamp, snapshot and targets again
        (metadata / name).write_bytes(data)
    result = poll(world, agent)
    kept(world, agent, result, serving=serving, version="2", state="refused",
         reason=r"refused by TUF \(BadVersionNumberError\)", attack="rollback: replayed old metadata")


def test_indefinite_freeze(world):
    agent = device(world)
    serving = agent.active_model_path(MODEL)
    # The last timestamp the publisher signed before it froze, two days ago (valid for one).
    keys = world.settings.tuf_keys()
    two_days_ago = datetime.now(timezone.utc) - timedelta(days=2)
    frozen = TufRepository(ObjectStore(world.settings.store_url), "tuf", clock=lambda: two_days_ago)
    frozen.refresh_timestamp(keys["snapshot"], keys["timestamp"], force=True)
    result = poll(world, agent)
    kept(world, agent, result, serving=serving, version="1", state="stale",
         reason=r"^desired state is stale: the signed desired state has expired", attack="indefinite freeze")

    from pipelines.edge.publish import refresh_timestamp

    assert refresh_timestamp(world.settings).changed  # the publisher is back: no lasting freeze
    assert poll(world, agent).state == "unchanged"


@pytest.mark.parametrize("what", ["artifact", "group document", "timestamp"])
def test_endless_data(world, what):
    agent = device(world, read_timeout=5, deadline_s=20)
    serving = agent.active_model_path(MODEL)
    world.release("2", "v2")
    path = {"artifact": lambda: target_path(world, world.key("v2")),
            "group document": lambda: target_path(world, f"groups/{GROUP}.json"),
            "timestamp": lambda: "/tuf/metadata/timestamp.json"}[what]()
    world.server.attack(path, "endless")
    started = time.monotonic()
    result = poll(world, agent)
    assert time.monotonic() - started < 5, "cut at the allowed length, not at the deadline"
    assert world.server.client_left.wait(5), "the device hung up"
    state = "failed"
    reason = r"DownloadLengthMismatchError" if what == "artifact" else \
        r"^desired state unavailable: download failed \(DownloadLengthMismatchError\)"
    kept(world, agent, result, serving=serving, version="1", state=state, reason=reason,
         attack=f"endless data ({what})")


def test_slow_retrieval(world):
    agent = device(world, read_timeout=1, deadline_s=2)
    serving = agent.active_model_path(MODEL)
    world.release("2", "v2")
    world.server.attack(target_path(world, world.key("v2")), "slow")
    started = time.monotonic()
    result = poll(world, agent)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"the 2 s deadline stopped it ({elapsed:.1f} s)"
    assert world.server.client_left.wait(5), "the device hung up"
    [(path, sent)] = world.server.cut
    assert sent <= 4, f"{sent} bytes dripped before the device hung up"
    kept(world, agent, result, serving=serving, version="1", state="failed", reason=r"SlowRetrievalError",
         attack="slow retrieval (1 byte/s; 2 s deadline)")


MIX_AND_MATCH = {
    # The kiosk model's file: genuine and signed by the release key, but not this target.
    "another model's signed artifact under this target": (
        lambda world, old: (world.key("v2"), world.models[OTHER].path.read_bytes()),
        "failed", r"(LengthOrHashMismatchError|DownloadLengthMismatchError)"),
    "the old signed group document with new metadata": (
        lambda world, old: (f"groups/{GROUP}.json", old), "refused",
        r"refused by TUF \(LengthOrHashMismatchError\)"),
}


@pytest.mark.parametrize("mix", MIX_AND_MATCH)
def test_mix_and_match(world, mix):
    make, state, reason = MIX_AND_MATCH[mix]
    agent = device(world)
    serving = agent.active_model_path(MODEL)
    old = ensure_repository(world.settings).read_target(f"groups/{GROUP}.json")
    world.release("2", "v2")
    target, data = make(world, old)
    world.server.attack(target_path(world, target), "replace", data)
    result = poll(world, agent)
    kept(world, agent, result, serving=serving, version="1", state=state, reason=reason,
         attack=f"mix-and-match: {mix}")


def test_stolen_timestamp_key_alone(world):
    agent = device(world)
    serving = agent.active_model_path(MODEL)
    metadata = world.store_dir / "tuf" / "metadata"
    thief = load_signer(world.settings.tuf_keys()["timestamp"])
    timestamp = Metadata.from_bytes((metadata / "timestamp.json").read_bytes())
    version = timestamp.signed.snapshot_meta.version
    # A forged snapshot (it would name forged targets) and a new timestamp naming it, both
    # signed with the one key the thief holds.
    snapshot = Metadata.from_bytes((metadata / f"{version}.snapshot.json").read_bytes())
    snapshot.signed.version += 1
    _resign(snapshot, thief)
    (metadata / f"{version + 1}.snapshot.json").write_bytes(snapshot.to_bytes())
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile(version=version + 1)
    _resign(timestamp, thief)
    (metadata / "timestamp.json").write_bytes(timestamp.to_bytes())
    result = poll(world, agent)
    kept(world, agent, result, serving=serving, version="1", state="refused",
         reason=r"refused by TUF \(UnsignedMetadataError\)", attack="stolen timestamp key alone (forged snapshot)")


def _resign(md: Metadata, signer: CryptoSigner) -> None:
    md.signatures.clear()
    md.sign(signer)


# -- Git writers without keys ------------------------------------------------------------------
def test_another_models_artifact_under_this_name(world):
    agent = device(world)
    git = device(world, "dev-git", source="git")
    serving = agent.active_model_path(MODEL)
    other = world.models[OTHER]
    published = world.hand_edit(lambda doc: world.point_at(
        doc, world.key(model=OTHER), sha=other.sha, size=other.size, model=OTHER))
    reason = published.refused[MODEL]
    assert "differs from the attested desired state" in reason and not published.changed
    assert poll(world, agent).state == "unchanged" and agent.active_model_path(MODEL) == serving
    result = poll(world, git)
    kept(world, git, result, serving=git.active_model_path(MODEL), version="1", state="refused",
         reason=r"differs from the attested desired state \(edited without the release key\)",
         attack="another model's artifact under this name (Git writer, Git device)")
    record("another model's artifact under this name (Git writer, TUF device)",
           "keeps v1 (unchanged): never offered", f"publisher refused: {reason}", world)


def _old_manifest_rolled_back(world: World, v1: dict[str, str]) -> Callable[[dict[str, str]], None]:
    def edit(files: dict[str, str]) -> None:
        doc = yaml.safe_load(v1[BASE])
        doc["metadata"]["annotations"][ROLLBACK_ANNOTATION] = "true"
        files[BASE] = yaml.safe_dump(doc, sort_keys=False)
    return edit


def _base(change: Callable[[dict], None]) -> Callable[[dict[str, str]], None]:
    def edit(files: dict[str, str]) -> None:
        doc = yaml.safe_load(files[BASE])
        change(doc)
        files[BASE] = yaml.safe_dump(doc, sort_keys=False)
    return edit


def _everyone(files: dict[str, str]) -> None:
    overlay = yaml.safe_load(files[OVERLAY])
    ops = yaml.safe_load(overlay["patches"][0]["patch"])
    for op in ops:
        if op["path"] == "/spec/targetDevices":
            op["value"]["selector"] = {"matchLabels": {}}
    overlay["patches"][0]["patch"] = yaml.safe_dump(ops, sort_keys=False)
    files[OVERLAY] = yaml.safe_dump(overlay, sort_keys=False)
    _base(lambda doc: doc["spec"].update(rollout={"share": 100}))(files)


def _unreadable_patch(files: dict[str, str]) -> None:
    overlay = yaml.safe_load(files[OVERLAY])
    overlay["patches"][0]["patch"] = "- op: [add\n  path: {"
    files[OVERLAY] = yaml.safe_dump(overlay, sort_keys=False)


def _rewind(world: World, v1: dict[str, str]) -> Callable[[dict[str, str]], None]:
    def edit(files: dict[str, str]) -> None:
        files.clear()
        files.update(v1)  # the v1 manifests and their (genuine, older) attestation
    return edit


WRITERS = {
    "rollback annotation on an old manifest": (_old_manifest_rolled_back, "differs from the attested"),
    "old artifact re-published as v999999": (
        lambda world, v1: _base(lambda doc: (doc["spec"]["modelRef"].update(version="999999"),
                                             world.point_at(doc, world.key()))),
        "differs from the attested"),
    "empty selector, share 100": (lambda world, v1: _everyone, "differs from the attested"),
    "privacy epsilon 0, sampleRate 1": (
        lambda world, v1: _base(lambda doc: doc["spec"]["telemetry"].update(privacy={"epsilon": 0}, sampleRate=1)),
        "differs from the attested"),
    "modelRef.name ../../victim": (
        lambda world, v1: _base(lambda doc: doc["spec"]["modelRef"].update(name="../../victim")),
        "differs from the attested"),
    "replayed old attestation and files (rewind)": (_rewind, "older than the published"),
    # Malformed rather than merely different: refused too, and never a crash of the publisher
    # or the agent that would hold back every other model.
    "rollout share that is not a number": (
        lambda world, v1: _base(lambda doc: doc["spec"].update(rollout={"share": "all"})),
        "cannot be read (ValueError)"),
    "an overlay patch that is not YAML": (lambda world, v1: _unreadable_patch, "cannot be resolved"),
}


@pytest.mark.parametrize("push", WRITERS)
def test_compromised_git_writer_without_keys(world, push):
    make_edit, publisher_reason = WRITERS[push]
    v1 = dict(world.genuine[MODEL])
    agent = device(world)
    git = device(world, "dev-git", source="git")
    world.release("2", "v2")
    assert poll(world, agent).state == "active" and poll(world, git).state == "active"
    serving, serving_git = agent.active_model_path(MODEL), git.active_model_path(MODEL)

    published = world.commit(make_edit(world, v1), attest=False)
    assert publisher_reason in published.refused[MODEL], published.refused
    assert published.groups[GROUP] == [f"{MODEL} v2"], "the publisher keeps the genuine release"
    assert poll(world, agent).state == "unchanged" and agent.active_model_path(MODEL) == serving
    result = poll(world, git)
    device_reason = r"older than the .* already applied \(replayed\)" if "rewind" in push else \
        re.escape(publisher_reason)
    assert (result.state, result.version) == ("refused", "2"), result
    assert re.search(device_reason, result.error), result.error
    assert git.installed_version(MODEL) == "2" and git.active_model_path(MODEL) == serving_git
    status = world.status_records("dev-git")[-1]
    assert (status["state"], status["error"]) == ("refused", result.error)
    said = published.refused[MODEL]
    record(f"Git writer without keys: {push}",
           "keeps v2 (TUF device: not published, unchanged; Git device: refused); the next release installs",
           f"publisher and Git device: {said}" if said == result.error else
           f"publisher: {said} / Git device: {result.error}", world)

    world.release("3", "v3")  # the next genuine release goes through: no freeze
    assert poll(world, agent).state == "active" and agent.installed_version(MODEL) == "3"
    assert poll(world, git).state == "active" and git.installed_version(MODEL) == "3"


# -- local attacks -----------------------------------------------------------------------------
def test_path_escape_by_device_id(world, capsys, monkeypatch):
    from pipelines.__main__ import main

    for name, value in cli_env(world).items():
        monkeypatch.setenv(name, value)
    root = world.tmp / "root.json"
    root.write_bytes(world.trusted_root)
    before = listing(world.tmp)
    with pytest.raises(EntryError, match=r"device id '\.\./x' is not a DNS label"):
        EdgeAgent("../x", PHONE, world.device_dir("../x"), ForgedSource([]), world.public_key,
                  world.settings.telemetry_url)
    code = main(["edge-agent", "--device-id", "../x", "--labels", "app=meter-reading", "--group", GROUP,
                 "--trusted-root", str(root), "--once"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: device id '../x' is not a DNS label"
    assert listing(world.tmp) == before and not (world.tmp.parent / "x").exists()
    record("path escape by device id `../x`", "refused before any filesystem use (CLI exits 2)", err, world)


class ForgedSource:
    """A source that hands the agent entries no real source lets through (a bug or a
    compromise in it): the agent's own checks must hold."""

    def __init__(self, entries: list, refused: dict[str, str] | None = None):
        self.entries, self.refused, self.downloads = entries, refused or {}, 0

    def fetch(self) -> DesiredState:
        return DesiredState(list(self.entries), dict(self.refused))

    def download(self, ref, target, max_length):
        self.downloads += 1
        raise AssertionError("nothing may be downloaded for a forged name")


def test_path_escape_by_model_name(world):
    agent = device(world)
    serving = agent.active_model_path(MODEL)
    [genuine] = world.source("probe").fetch().entries
    forged = genuine.model_construct(**{**dict(genuine), "model": "../x"})  # no validation
    with pytest.raises(EntryError, match="must be a DNS label"):
        check_entry(dict(forged))
    source = ForgedSource([forged], {"../../escape": "refused by the source"})
    hostile = EdgeAgent("dev-a", PHONE, agent.state_dir, source, world.public_key, world.settings.telemetry_url)
    telemetry_before = listing(world.telemetry)
    with nothing_written_outside(world, hostile):
        results = hostile.poll_once()
    by_model = {r.model: r for r in results}
    assert set(by_model) == {"../x", "../../escape", MODEL}, results
    for name in ("../x", "../../escape"):
        assert by_model[name].state == "refused" and "is not a DNS label" in by_model[name].error, by_model[name]
    assert by_model[MODEL].state == "not_selected" and source.downloads == 0
    assert not (agent.models_dir.parent / "x").exists() and not (agent.state_dir.parent / "escape").exists()
    assert listing(world.telemetry) == telemetry_before, "nothing reported under a forged name"
    assert hostile.active_model_path(MODEL) == serving and hostile.installed_version(MODEL) == "1"
    state = json.loads((agent.state_dir / "state.json").read_text())
    assert set(state["models"]) == {MODEL} and set(state["backoff"]) <= {MODEL}
    assert EdgeAgent("dev-a", PHONE, agent.state_dir, source, world.public_key,
                     world.settings.telemetry_url).installed_version(MODEL) == "1", "state.json is intact"
    record("path escape by model name `../x`", "keeps v1; refuses the entry before any filesystem use",
           by_model["../x"].error, world)


def _larger(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(64 << 20)  # 64 MiB (sparse)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _folder_outside(path: Path) -> None:
    # The genuine files, in a folder outside the store that the store links to: verified bytes,
    # but the store is the only place a device reads from.
    outside = path.parents[6] / "outside-store"
    outside.mkdir()
    for name in ("model.onnx", "model.onnx.sig"):
        shutil.copyfile(path.parent / name, outside / name)
    shutil.rmtree(path.parent)
    path.parent.symlink_to(outside, target_is_directory=True)


SPECIAL = {
    "a file larger than the signed length": (_larger, r"67108864 bytes, larger than the signed \d+"),
    "a folder linked out of the store": (_folder_outside, r"resolves outside the artifact store"),
    "a FIFO": (_fifo, r"model\.onnx: not a regular file"),
    "a link to /dev/zero": (_dev_zero, r"model\.onnx: Too many levels of symbolic links"),
}


@pytest.mark.parametrize("special", SPECIAL)
def test_oversized_or_special_file_from_a_git_store(world, special):
    change, reason = SPECIAL[special]
    agent = device(world, source="git")
    serving = agent.active_model_path(MODEL)
    world.release("2", "v2")
    change(world.path(world.key("v2")))
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:  # a hang fails the test instead of stalling the run
        result = pool.submit(poll, world, agent).result(timeout=30)
    assert time.monotonic() - started < 5, "refused at once"
    kept(world, agent, result, serving=serving, version="1", state="failed", reason=reason,
         attack=f"oversized download from a Git store: {special}")


_INSTALLED = '"sha256": "{sha}", "folder": "1-{sha12}"'
SHAPES = ["[]", '{"models": 5}', '{"models": {"../x": {"version": "1"}}}',
          '{"models": {"edge-model": {"version": "abc", ' + _INSTALLED + '}}}',
          '{"models": {"edge-model": {"version": "1", "group": "../../x", ' + _INSTALLED + '}}}']


@pytest.mark.parametrize("shape", SHAPES)
def test_a_wrong_shaped_state_file_is_rebuilt_from_the_active_link(world, shape, caplog):
    agent = device(world)
    serving = agent.active_model_path(MODEL)
    (agent.state_dir / "state.json").write_text(shape.replace("{sha}", world.sha).replace("{sha12}", world.sha[:12]))
    caplog.clear()
    restarted = world.agent("dev-a", fetcher=ConditionalFetcher(world.device_dir("dev-a") / "tuf" / "http-cache"))
    assert restarted.installed_version(MODEL) == "1"
    [logged] = [r.getMessage() for r in caplog.records if "rebuilding it from the active links" in r.getMessage()]
    result = poll(world, restarted)
    assert (result.state, result.version) == ("unchanged", "1") and restarted.downloads == 0
    assert restarted.active_model_path(MODEL) == serving
    assert set(json.loads((agent.state_dir / "state.json").read_text())["models"]) == {MODEL}
    record(f"wrong-shaped state.json `{shape}`", "rebuilt from the active link on start; keeps v1 (unchanged)",
           logged.replace(str(agent.state_dir), "<device>"), world)


def test_two_agents_on_one_folder(world):
    agent = device(world, source="tuf")
    world.release("2", "v2")
    entered, go = threading.Event(), threading.Event()

    def hold(model: str, version: str) -> None:
        entered.set()
        assert go.wait(60)

    agent.before_switch = hold
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(agent.poll_once)
        assert entered.wait(30), "the first agent reached the switch"
        inside = listing(agent.state_dir)
        root = world.tmp / "root.json"
        root.write_bytes(world.trusted_root)
        second = subprocess.run(
            [sys.executable, "-m", "pipelines", "edge-agent", "--device-id", "dev-a", "--labels",
             "apexlogic.dev/device-class=android-phone,app=meter-reading", "--group", GROUP, "--trusted-root",
             str(root), "--state", str(agent.state_dir), "--lock-wait", "0.5", "--once"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **cli_env(world)})
        assert listing(agent.state_dir) == inside, "the second agent touched nothing of the first one's"
        go.set()
        [result] = first.result(timeout=60)
    assert second.returncode == 2 and second.stdout == ""
    [line] = second.stderr.strip().splitlines()
    assert re.fullmatch(r"error: dev-a: another agent is working on .* \(waited 0\.5 s\)", line), line
    assert (result.state, result.version) == ("active", "2") and agent.installed_version(MODEL) == "2"
    record("two agents on one folder", "the second exits 2 at once; the first one's update to v2 completes",
           line.replace(str(agent.state_dir), "<device>"), world)


def test_a_telemetry_folder_replaced_by_a_symlink(world):
    agent = device(world)
    serving = agent.active_model_path(MODEL)
    elsewhere = world.tmp / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(world.telemetry / "telemetry")
    (world.telemetry / "telemetry").symlink_to(elsewhere)
    with nothing_written_outside(world, agent):
        [result] = agent.poll_once()
    assert (result.state, result.version) == ("unchanged", "1") and agent.active_model_path(MODEL) == serving
    assert not any(elsewhere.iterdir()), "nothing written through the link"
    assert agent.telemetry_dropped == 1 and "is a symbolic link" in agent.telemetry_error
    record("telemetry folder replaced by a symlink", "keeps serving v1; writes nothing through the link",
           agent.telemetry_error, world)


def test_a_device_without_a_public_key(world, tmp_path, capsys, monkeypatch):
    from pipelines.__main__ import main

    fresh = tmp_path / "fresh-device"
    monkeypatch.setenv("EDGE_STATE_DIR", str(fresh))
    monkeypatch.delenv("EDGE_SIGNING_PUBLIC_KEY", raising=False)
    monkeypatch.delenv("EDGE_SIGNING_KEY", raising=False)
    root = tmp_path / "root.json"
    root.write_bytes(world.trusted_root)
    args = ["edge-agent", "--device-id", "dev-k", "--labels", "app=meter-reading", "--group", GROUP,
            "--trusted-root", str(root), "--tuf-url", world.tuf_url, "--once"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --public-key: {fresh}/keys/signing.pub does not exist (the device's trusted release key)"
    assert not fresh.exists(), "no key, no folder made"
    missing = tmp_path / "provisioned.pub"
    assert main([*args, "--public-key", str(missing)]) == 2
    assert capsys.readouterr().err.strip().endswith("does not exist (the device's trusted release key)")
    assert not missing.exists() and not fresh.exists()
    record("device without a public key", "CLI exits 2; no key file or folder is made",
           err.replace(str(fresh), "<state>"), world)


def test_a_tuf_cache_folder_replaced_by_a_symlink(world):
    agent = device(world)
    serving = agent.active_model_path(MODEL)
    world.release("2", "v2")
    elsewhere = world.tmp / "elsewhere-tuf"
    elsewhere.mkdir()
    cache = agent.state_dir / "tuf"
    shutil.rmtree(cache)
    cache.symlink_to(elsewhere, target_is_directory=True)
    result = poll(world, agent)
    assert not any(elsewhere.iterdir()), "nothing written through the link"
    kept(world, agent, result, serving=serving, version="1", state="failed",
         reason=r"tuf is a symbolic link; TUF metadata is not kept through links",
         attack="the device's TUF metadata folder replaced by a symlink")


def test_a_planted_git_config_runs_nothing(world):
    """A clone's `.git/config` on the device's disk names commands git would run (an
    upload-pack on fetch, an fsmonitor on reset): the agent writes its own config first."""
    git = device(world, "dev-git", source="git")
    world.release("2", "v2")
    markers = [world.tmp / "upload-pack-ran", world.tmp / "fsmonitor-ran"]
    config = git.state_dir / "gitops" / ".git" / "config"
    config.write_text(config.read_text()
                      + f'[core]\n\tfsmonitor = "touch {markers[1]}"\n'
                      + f'[remote "origin"]\n\tuploadpack = "touch {markers[0]}; git-upload-pack"\n')
    result = poll(world, git)
    assert (result.state, result.version) == ("active", "2"), result
    assert not any(m.exists() for m in markers), "a planted command ran"
    record("a planted .git/config (upload-pack and fsmonitor commands) in a Git device's clone",
           "updates to v2 as usual; runs none of the planted commands", "no error: the agent rewrites the "
           "clone's config before each fetch and runs git without hooks or fsmonitor", world)
