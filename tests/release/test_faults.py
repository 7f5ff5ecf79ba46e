"""Faults caused for real: an S3 store that goes away mid-release, Git remotes whose hooks
refuse pushes, a publish task killed with SIGKILL before its commit, an MLflow server that
cannot be reached, and a device whose telemetry store is full or unwritable.

Retry counts and delays are the product's own module constants, made small here.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, stop_group, tabular_frame, write_spec

from pipelines import registry, release, storage
from pipelines.gitops import repo
from pipelines.release import stages
from pipelines.settings import Settings

AUTHOR = ("edge-release-bot", "edge-release-bot@apexlogic.dev")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _git(remote, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(remote), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def _commits(remote, path: str | None = None) -> int:
    return int(_git(remote, "rev-list", "--count", "main", *(["--", path] if path else [])))


def _spec(folder: Path, name: str) -> Path:
    tabular_frame().to_csv(folder / "data.csv", index=False)
    return write_spec(folder, name, "data.csv")


def _until_publish(spec: Path, settings: Settings | None = None) -> SimpleNamespace:
    """The stages before publish, one call each as the DAG's tasks make them."""
    from pipelines.release import gates

    kw = {"settings": settings}
    data = release.validate_data(spec, **kw)
    trained = release.train(spec, data, **kw)
    exported = release.export(spec, data, trained, **kw)
    plan = release.quantize(spec, data, exported, **kw)
    registered = release.register(spec, data, trained, exported, plan, "test", **kw)
    cost = gates.edge_cost(spec, data, trained, plan, registered, **kw)
    verdicts = [gates.quality_gate(spec, data, plan, registered, **kw),
                gates.fairness_gate(spec, data, plan, registered, cost, **kw),
                gates.parity_gate(spec, data, plan, registered, cost, **kw),
                gates.drift_gate(spec, data, plan, registered, **kw), *cost.verdicts]
    explanation = gates.explain(spec, data, plan, registered, **kw)
    card = gates.model_card(spec, data, trained, plan, registered, verdicts, explanation, cost, **kw)
    assert release.decide(spec, data, verdicts, settings=settings).outcome == "release"
    return SimpleNamespace(data=data, trained=trained, plan=plan, registered=registered, verdicts=verdicts,
                           card=card, cost=cost)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """One small model taken through publish in a state folder of its own (no commit yet)."""
    folder = tmp_path_factory.mktemp("faults-published")
    settings = Settings(state_dir=folder / "state")
    spec = _spec(folder, "fault-model")
    stages = _until_publish(spec, settings)
    stages.published = release.publish(spec, stages.registered, stages.plan, stages.card, stages.cost,
                                       settings=settings)
    stages.spec, stages.settings = spec, settings
    return stages


def _commit(p: SimpleNamespace, remote: Path):
    settings = p.settings.model_copy(update={"gitops_remote": str(remote)})
    return release.commit(p.spec, p.data, p.trained, p.registered, p.published, p.plan, p.verdicts, None, p.cost,
                          settings=settings)


# -- the artifact store goes away during publish -------------------------------------------------
class S3Server:
    """moto's S3 server on a fixed port, stopped for real (its socket closed: connections are
    refused) and started again on the same port with the same buckets."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server._server.server_close()
            self._server = None


@pytest.fixture
def s3(monkeypatch):
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAEDGEFAULTS", "AWS_SECRET_ACCESS_KEY": "edge-faults-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = S3Server()
    server.start()
    boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="edge-faults")
    monkeypatch.setenv("EDGE_ARTIFACT_STORE", "s3://edge-faults/releases")
    monkeypatch.setenv("EDGE_S3_ENDPOINT_URL", server.url)
    yield server
    server.stop()


def _model_keys(server: S3Server, model: str) -> list[str]:
    import boto3

    listed = boto3.client("s3", endpoint_url=server.url).list_objects_v2(
        Bucket="edge-faults", Prefix=f"releases/models/{model}/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_store_unreachable_during_publish_is_retried_then_fails_in_one_line_and_commits_nothing(
        tmp_path, state, s3, monkeypatch):
    monkeypatch.setattr(storage, "STORE_ATTEMPTS", 3)
    monkeypatch.setattr(storage, "STORE_BACKOFF_S", 0.2)
    spec = _spec(tmp_path, "s3-fault-model")
    real_publish = stages.publish
    outage = {"restart_after_s": None}

    def publish_while_the_store_is_down(*args, **kwargs):
        s3.stop()
        if outage["restart_after_s"] is not None:
            threading.Timer(outage["restart_after_s"], s3.start).start()
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(stages, "publish", publish_while_the_store_is_down)
    started = time.monotonic()
    with pytest.raises(storage.StoreError) as failure:
        release.run_release(spec, trigger="test")
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("cannot reach s3://edge-faults/releases/models/s3-fault-model/")
    assert "Could not connect to the endpoint URL" in message and message.endswith("(3 attempts)")
    assert time.monotonic() - started > 0.2 + 0.4, "two backoffs were waited"
    settings = Settings()
    assert not Path(settings.remote).exists(), "nothing was committed"
    s3.start()
    assert _model_keys(s3, "s3-fault-model") == [], "nothing was published"
    version = registry.client(settings.tracking_uri).get_model_version("s3-fault-model", "1")
    assert "release_status" not in version.tags and "champion" not in version.aliases

    # The store comes back 0.5 s into the next publish: the retries carry it through.
    monkeypatch.setattr(storage, "STORE_ATTEMPTS", 5)
    outage["restart_after_s"] = 0.5
    summary = release.run_release(spec, trigger="test")
    assert summary.status == "released" and summary.gitops_commit_created
    folder = f"releases/models/s3-fault-model/{summary.artifact_sha256}"
    names = [key.removeprefix(f"{folder}/") for key in _model_keys(s3, "s3-fault-model")]
    [card] = {name.split("/")[1] for name in names if name.startswith("cards/")}
    # Every other variant that passed its gates is signed and kept beside it (a budget policy may switch to it).
    others = [f"variants/{c.variant}/model.onnx{suffix}" for c in summary.quantization.candidates
              if c.eligible and c.variant != summary.quantization.chosen for suffix in ("", ".sig")]
    assert sorted(names) == sorted([f"cards/{card}/focus.csv", f"cards/{card}/model_card.html",
                                    f"cards/{card}/model_card.json", "model.json", "model.onnx", "model.onnx.sig",
                                    *others])
    assert _commits(settings.remote) == 2 and _commits(settings.remote, "apps/s3-fault-model") == 1
    assert len(registry.client(settings.tracking_uri).search_model_versions("name = 's3-fault-model'")) == 1


# -- the Git remote refuses pushes -----------------------------------------------------------------
_HOOK = """#!/bin/sh
# Refuses the first {rejects} pushes ({rejects} < 0: every push). Before refusing the first,
# another clone pushes a commit of its own, so the release must also replay onto a new tip.
[ -n "$FAULT_NESTED_PUSH" ] && exit 0
n=$(cat '{counter}' 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > '{counter}'
if [ "$n" -eq 1 ] && [ -n '{other}' ]; then
  (unset GIT_DIR GIT_QUARANTINE_PATH GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES
   export FAULT_NESTED_PUSH=1
   cd '{other}' && mkdir -p apps/other-model && echo "version: '7'" > apps/other-model/manifest.yaml &&
   git add apps && git commit -q -m "release(other-model): concurrent" && git push -q origin HEAD:main) >&2 || exit 3
fi
if [ {rejects} -lt 0 ] || [ "$n" -le {rejects} ]; then
  echo "gitops policy: branch main is busy (push $n), try again" >&2
  exit 1
fi
"""


def _hooked_remote(tmp_path: Path, name: str, rejects: int, concurrent: bool) -> tuple[Path, Path]:
    remote = tmp_path / f"{name}.git"
    repo.ensure_remote(str(remote), "main", AUTHOR)
    other = ""
    if concurrent:
        other = str(tmp_path / f"{name}-other")
        subprocess.run(["git", "clone", "-q", str(remote), other], check=True)
    counter = tmp_path / f"{name}.pushes"
    hook = remote / "hooks" / "pre-receive"
    hook.write_text(_HOOK.format(rejects=rejects, counter=counter, other=other))
    hook.chmod(0o755)
    return remote, counter


def test_a_refused_push_is_replayed_on_the_new_tip_and_retried_until_it_lands(published, tmp_path, monkeypatch):
    monkeypatch.setattr(repo, "FIRST_BACKOFF_S", 0.05)
    remote, pushes = _hooked_remote(tmp_path, "flaky", rejects=2, concurrent=True)

    committed = _commit(published, remote)

    assert committed.created and pushes.read_text().strip() == "3", "refused twice, accepted the third time"
    assert _commits(remote) == 3 and _commits(remote, "apps/fault-model") == 1
    assert _git(remote, "rev-parse", "main") == committed.commit
    assert _git(remote, "log", "-1", "--format=%s", f"{committed.commit}^") == "release(other-model): concurrent"
    assert _git(remote, "show", "main:apps/other-model/manifest.yaml") == "version: '7'", "the other commit kept"
    assert _git(remote, "log", "-1", "--format=%s", "main").startswith("release(fault-model): version 1")


def test_a_remote_that_always_refuses_fails_in_one_line_after_bounded_retries(published, tmp_path, monkeypatch):
    monkeypatch.setattr(repo, "FIRST_BACKOFF_S", 0.05)
    monkeypatch.setattr(repo, "PUSH_ATTEMPTS", 3)
    remote, pushes = _hooked_remote(tmp_path, "closed", rejects=-1, concurrent=False)
    mlflow = registry.client(published.settings.tracking_uri)
    before = mlflow.get_model_version("fault-model", published.registered.version).tags.get("gitops_commit")

    with pytest.raises(repo.GitError) as failure:
        _commit(published, remote)

    message = str(failure.value)
    assert "\n" not in message and f"push to {remote} (main) still rejected after 3 attempts" in message
    assert "[remote rejected] (pre-receive hook declined)" in message
    assert "remote: gitops policy: branch main is busy (push 3), try again" in message
    assert pushes.read_text().strip() == "3"
    assert _commits(remote) == 1, "only the skeleton"
    after = mlflow.get_model_version("fault-model", published.registered.version).tags.get("gitops_commit")
    assert after == before, "MLflow does not point at a commit that never landed"


# -- a task killed between publish and commit ------------------------------------------------------
_STALL_AT_COMMIT = """
import sys, time
from pipelines.release import stages

def stall(*args, **kwargs):  # the worker dies here: after publish, before the commit
    print("published", flush=True)
    time.sleep(600)

stages.commit = stall
stages.run_release(sys.argv[1], trigger="test")
"""


def test_a_task_killed_after_publish_and_retried_commits_once(tmp_path, state):
    spec = _spec(tmp_path, "killed-model")
    worker = subprocess.Popen([sys.executable, "-c", _STALL_AT_COMMIT, str(spec)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert worker.stdout.readline().strip() == "published"
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL
    settings = Settings()
    store = settings.state / "artifacts" / "models" / "killed-model"
    [folder] = list(store.iterdir())
    artifact = folder / "model.onnx"
    assert (folder / "model.json").is_file(), "publish had finished"
    assert not Path(settings.remote).exists(), "the commit never ran"
    first = artifact.stat()

    retried = release.run_release(spec, trigger="test")
    assert retried.status == "released" and retried.gitops_commit_created
    assert _commits(settings.remote) == 2 and _commits(settings.remote, "apps/killed-model") == 1
    assert [p.name for p in store.iterdir()] == [folder.name] == [retried.artifact_sha256]
    again = artifact.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns), "not uploaded a second time"

    once_more = release.run_release(spec, trigger="test")
    assert not once_more.gitops_commit_created and once_more.gitops_commit == retried.gitops_commit
    assert _commits(settings.remote) == 2
    versions = registry.client(settings.tracking_uri).search_model_versions("name = 'killed-model'")
    assert [str(v.version) for v in versions] == ["1"]


# -- MLflow unreachable during register --------------------------------------------------------------
class Gate:
    """A TCP forwarder in front of a server: closed, it refuses connections and cuts the open
    ones (as a server that went down would); opened again, on the same port."""

    def __init__(self, target_port: int) -> None:
        self.port = _free_port()
        self.target = target_port
        self._server = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def open(self) -> None:
        gate = self

        class Forward(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(("127.0.0.1", gate.target))
                with gate._lock:
                    gate._sockets.update({self.request, upstream})
                pairs = {self.request: upstream, upstream: self.request}
                with selectors.DefaultSelector() as selector:
                    for sock in pairs:
                        selector.register(sock, selectors.EVENT_READ)
                    try:
                        while True:
                            for key, _ in selector.select():
                                data = key.fileobj.recv(65536)
                                if not data:
                                    return
                                pairs[key.fileobj].sendall(data)
                    except OSError:
                        return
                    finally:
                        upstream.close()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Forward)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._sockets.clear()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 (sqlite, proxied artifacts), stopped by its pid."""
    import requests

    port = _free_port()
    log = open(tmp_path / "mlflow.log", "wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "mlflow-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "MLflow server did not start"
            time.sleep(0.25)
        yield port
    finally:
        stop_group(server)
        log.close()


def test_mlflow_unreachable_during_register_is_retried_and_leaves_no_orphan_commit(
        tmp_path, state, mlflow_server, monkeypatch):
    gate = Gate(mlflow_server)
    monkeypatch.setenv("EDGE_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{gate.port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the product's retries, not the client's
    monkeypatch.setattr(registry, "REGISTER_ATTEMPTS", 2)
    monkeypatch.setattr(registry, "REGISTER_BACKOFF_S", 0.1)
    spec = _spec(tmp_path, "mlflow-fault-model")
    real_register = stages.register
    outage = {"back_after_s": None}

    def register_while_mlflow_is_down(*args, **kwargs):
        gate.close()
        if outage["back_after_s"] is not None:
            threading.Timer(outage["back_after_s"], gate.open).start()
        return real_register(*args, **kwargs)

    monkeypatch.setattr(stages, "register", register_while_mlflow_is_down)
    with pytest.raises(registry.RegistryError) as failure:
        release.run_release(spec, trigger="test")
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"MLflow at http://127.0.0.1:{gate.port}: ")
    assert "Connection refused" in message and message.endswith("(2 attempts)")
    settings = Settings()
    assert not Path(settings.remote).exists(), "no commit without a registered version"
    assert not (settings.state / "artifacts" / "models").exists(), "nothing published"
    direct = registry.client(f"http://127.0.0.1:{mlflow_server}")
    assert direct.search_model_versions("name = 'mlflow-fault-model'") == []

    # MLflow comes back a second into the next register: the retries carry it through.
    monkeypatch.setattr(registry, "REGISTER_ATTEMPTS", 4)
    monkeypatch.setattr(registry, "REGISTER_BACKOFF_S", 0.5)
    outage["back_after_s"] = 1.0
    summary = release.run_release(spec, trigger="test")
    assert summary.status == "released" and summary.model_version == "1"
    [version] = direct.search_model_versions("name = 'mlflow-fault-model'")
    assert version.tags["release_status"] == "released" and version.tags["gitops_commit"] == summary.gitops_commit
    assert _commits(settings.remote) == 2 and _commits(settings.remote, "apps/mlflow-fault-model") == 1
    gate.close()


# -- a device whose telemetry store is full or unwritable --------------------------------------------
@pytest.mark.parametrize("fault", ["file-where-the-folder-is", "disk-full", "s3-closed-port"])
def test_a_device_keeps_serving_when_its_telemetry_store_fails(published, tmp_path, monkeypatch, caplog, fault):
    from datetime import datetime, timezone

    from pipelines.edge import telemetry
    from pipelines.edge.agent import EdgeAgent
    from pipelines.edge.sources import GitDesiredState

    remote = tmp_path / "gitops.git"
    _commit(published, remote)
    endpoint = None
    if fault == "file-where-the-folder-is":
        blocked = tmp_path / "telemetry"
        blocked.write_text("a regular file where the telemetry folder should be")
        root, expected = (blocked / "store").as_uri(), "Not a directory"
    elif fault == "disk-full":
        root = tmp_path / "telemetry"
        day = datetime.now(timezone.utc)
        log = root / f"{telemetry.record_key('fault-model', 'phones', 'dev-f', day)}.jsonl"
        log.parent.mkdir(parents=True)
        # The device's own log file is /dev/full (a character device, not a link: the agent
        # opens telemetry files with O_NOFOLLOW): every write fails with ENOSPC.
        try:
            os.mknod(log, stat.S_IFCHR | 0o666, os.makedev(1, 7))
        except PermissionError:  # no CAP_MKNOD: fail the same writes at the system call
            real_write = os.write

            def full(fd, data):
                if os.readlink(f"/proc/self/fd/{fd}") == str(log):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(fd, data)

            monkeypatch.setattr(os, "write", full)
        root, expected = root.as_uri(), "No space left on device"
    else:
        for name, value in {"AWS_ACCESS_KEY_ID": "AKIAEDGEFAULTS", "AWS_SECRET_ACCESS_KEY": "edge-faults-secret",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        endpoint = f"http://127.0.0.1:{_free_port()}"
        root, expected = "s3://edge-telemetry/fleet", "Could not connect to the endpoint URL"
    folder = tmp_path / "device"
    public_key = published.settings.signing_keys()[1]
    source = GitDesiredState(str(remote), "main", folder / "gitops", published.settings.store_url, public_key)
    agent = EdgeAgent("dev-f", {"apexlogic.dev/device-class": "android-phone"}, folder, source, public_key,
                      root, endpoint)

    [result] = agent.poll_once()
    assert (result.state, result.version, result.error) == ("active", "1", None)
    rows = tabular_frame(rows=25, seed=3)[["x1", "x2", "colour"]]
    started = time.monotonic()
    first = agent.serve("fault-model", rows)
    agent.flush_telemetry()
    second = agent.serve("fault-model", rows)
    agent.flush_telemetry()
    assert time.monotonic() - started < 10, "the device did not stall on its telemetry store"
    assert first == second and len(first) == 25 and set(first) <= {0, 1}
    assert agent.telemetry_dropped == 3, "the status record and two inference records"
    assert expected in agent.telemetry_error and "\n" not in agent.telemetry_error
    assert agent.summary()["telemetry_dropped"] == 3
    assert caplog.text.count("dev-f: telemetry for fault-model not written") == 3
