"""The edge agent: reconciles one device with the desired state, one poll at a time.

The desired state is a list of entries the release key vouches for (`pipelines.edge.sources`:
a TUF repository over HTTP, or an attested Git checkout). The device acts on nothing else:
names are DNS labels and paths are checked before they touch its folder, downloads are bounded
by the signed length and by time, a replayed (older) desired state is refused, and a version
lower than the installed one needs a signed rollback. A device outside a canary's share runs
the control version the entry names.

Per selected model, a poll installs a new version in this order, and any failure leaves the
active model as it was:

1. download the artifact and its signature bundle into `staging/` (nothing else sees it);
2. check the size and sha256 the entry signs, and the bundle's signature with the trusted key;
3. rename (fsynced) into `models/<model>/<version>-<sha12>/`;
4. run one inference with onnxruntime on zeros;
5. switch `models/<model>/active` with a symlink swap (`active.tmp` + `os.replace`),
   then record it in `state.json` (written atomically).

The active symlink is the truth: if the device dies between 5's two writes, the next start
reads the version back from the link. Failed models are retried with exponential backoff
(kept in `state.json`, so a restart does not hammer a broken store); a new desired version
is tried at once. One telemetry record per result goes to the telemetry store, and a
telemetry outage never stops the device from serving.

`serve()` runs the active model on requests, one inference each, and counts them in a
window; `flush_telemetry()` sends one inference record per model (counts, latency and
prediction histograms, sampled inputs; Laplace noise when the entry asks for privacy,
see `pipelines.edge.telemetry`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pipelines.edge import telemetry
from pipelines.edge.desired import Conflict, in_rollout
from pipelines.edge.desired_state import (
    MAX_BUNDLE_BYTES,
    Entry,
    EntryError,
    Release,
    check_name,
    is_dns_label,
    verify_files,
)
from pipelines.edge.sources import DesiredStateSource, DownloadError, RefusedError, StaleError
from pipelines.errors import one_line
from pipelines.storage import ObjectStore, sha256_file

log = logging.getLogger(__name__)

State = Literal["active", "unchanged", "refused", "failed", "stale", "not_selected"]
DEVICE_CLASS_LABEL = "apexlogic.dev/device-class"
MODEL_FILE = "model.onnx"
BUNDLE_FILE = "model.onnx.sig"
_ONNX_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint64)": "uint64", "tensor(uint32)": "uint32", "tensor(uint16)": "uint16", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class InstallError(RuntimeError):
    """A step of an installation failed; the message is one line for the device's report."""


@dataclass
class AgentResult:
    """What one poll did about one model."""

    model: str
    version: str | None
    state: State
    error: str | None = None
    latency_ms: float | None = None
    group: str | None = None
    note: str | None = None

    def line(self) -> str:
        text = f"{self.model} v{self.version or '-'} {self.state}"
        if self.group:
            text += f" (group {self.group})"
        if self.latency_ms is not None:
            text += f" smoke {self.latency_ms:.2f} ms"
        if self.note:
            text += f"; {self.note}"
        if self.error:
            text += f": {self.error}"
        return text


def _json_row(row: dict) -> dict:
    """A request's raw features as JSON values (numpy scalars and NaN made plain)."""
    out = {}
    for key, value in row.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and value != value:
            value = None
        out[key] = value
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as JSON beside `path`, fsync, rename over it: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


MEASURE_RUNS = 20  # smoke-test inferences whose cost the device reports


def _rss_bytes() -> int | None:
    """This process's resident memory now (Linux /proc), or None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def smoke_test(model_path: Path, runs: int = MEASURE_RUNS) -> dict:
    """Load the model and run it `runs` times on zeros (empty strings for string inputs), batch
    1, one thread: refused (InstallError) if it cannot load, run or answer in contract.

    Returns what it cost on this device, measured on these synthetic inputs only (no user data,
    so nothing to keep private): `latency_ms` (the first run), `load_ms` (creating the session),
    `cpu_ms` and `wall_ms` (median per run: CPU time of the running thread, and elapsed time),
    `rss_bytes` (resident memory the session and its runs added; None where not measurable)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One thread: the device is serving the active model while this runs.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    rss_before = _rss_bytes()
    began = time.perf_counter()
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise InstallError(f"smoke test: onnxruntime cannot load the model: {one_line(error, 160)}") from None
    load_ms = (time.perf_counter() - began) * 1000
    from pipelines.onnx.export import answer_contract

    try:  # what the device counts its answers by (a regression's bin edges) must be in contract
        answer_contract(session)
    except ValueError as error:
        raise InstallError(f"smoke test: {one_line(error, 160)}") from None
    feeds = {}
    for item in session.get_inputs():
        shape = [1 if i == 0 or not isinstance(d, int) or d <= 0 else d for i, d in enumerate(item.shape)]
        if item.type == "tensor(string)":
            feeds[item.name] = np.full(shape, "", dtype=object)
        elif item.type in _ONNX_DTYPES:
            feeds[item.name] = np.zeros(shape, dtype=_ONNX_DTYPES[item.type])
        else:
            raise InstallError(f"smoke test: input {item.name!r} has type {item.type}, which the agent cannot feed")
    walls, cpus = [], []
    for _ in range(max(1, runs)):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            session.run(None, feeds)
        except Exception as error:
            raise InstallError(f"smoke test: inference failed: {one_line(error, 160)}") from None
        cpus.append((time.thread_time() - cpu) * 1000)
        walls.append((time.perf_counter() - wall) * 1000)
    rss_after = _rss_bytes()
    grown = max(0, rss_after - rss_before) if rss_before is not None and rss_after is not None else None
    return {"latency_ms": walls[0], "load_ms": round(load_ms, 3), "cpu_ms": round(float(np.median(cpus)), 4),
            "wall_ms": round(float(np.median(walls)), 4), "rss_bytes": grown, "runs": len(walls)}


def clean_measurements(value: object) -> dict | None:
    """Measurements as the agent records them, or None: the state file is the device's own disk,
    which may be hostile, so only known keys with finite, non-negative numbers leave the device."""
    if not isinstance(value, dict):
        return None
    out = {}
    for key in MEASUREMENT_KEYS:
        number = value.get(key)
        if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number) \
                and 0 <= number < 1e15:
            out[key] = number
    return out or None


MEASUREMENT_KEYS = ("load_ms", "cpu_ms", "wall_ms", "rss_bytes", "runs", "model_bytes", "downloaded_bytes")


class AgentBusy(RuntimeError):
    """Another agent works on the same device folder."""


_FOLDER = re.compile(r"^[1-9][0-9]{0,8}-[0-9a-f]{12}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


def _clean_state(state: object, device_id: str) -> tuple[dict, str | None]:
    """`state` if it has the shape this agent writes, else an empty state and the reason."""
    empty = {"models": {}, "backoff": {}, "sequences": {}, "device_id": device_id}
    if not isinstance(state, dict):
        return empty, "not an object"
    models, backoff, sequences = state.get("models", {}), state.get("backoff", {}), state.get("sequences", {})
    if not all(isinstance(x, dict) for x in (models, backoff, sequences)):
        return empty, "models, backoff and sequences must be objects"
    for model, info in models.items():
        if not is_dns_label(model) or not isinstance(info, dict) or not _VERSION.match(str(info.get("version"))) \
                or not _HEX64.match(str(info.get("sha256", ""))) \
                or str(info.get("folder", "")) != f"{info['version']}-{str(info.get('sha256'))[:12]}" \
                or (info.get("previous") is not None and not _FOLDER.match(str(info["previous"]))) \
                or (info.get("group") is not None and not is_dns_label(info["group"])):
            return empty, f"models.{str(model)[:63]} is malformed"
    for model, info in backoff.items():
        if not is_dns_label(model) or not isinstance(info, dict) or not isinstance(info.get("target"), str) \
                or not isinstance(info.get("failures"), int) \
                or not isinstance(info.get("next_attempt"), (int, float)):
            return empty, f"backoff.{str(model)[:63]} is malformed"
    if not all(is_dns_label(m) and isinstance(v, int) and not isinstance(v, bool) for m, v in sequences.items()):
        return empty, "sequences is malformed"
    return {"models": models, "backoff": backoff, "sequences": sequences, "device_id": device_id}, None


class EdgeAgent:
    """Reconciles the models of one device (see the module docstring for the order of steps).

    `source` gives signed desired-state entries and the files they name
    (`pipelines.edge.sources`). `before_switch(model, version)` is a test hook called after the
    new version is verified, installed and smoke-tested, just before the symlink switch.
    `clock` returns epoch seconds (the backoff's time; tests move it forward). A second agent
    on the same folder waits up to `lock_wait_s` for the first one's poll, then raises
    AgentBusy.
    """

    def __init__(self, device_id: str, labels: dict[str, str], state_dir: Path, source: DesiredStateSource,
                 trusted_public_key: Path, telemetry_root_url: str, s3_endpoint_url: str | None = None, *,
                 before_switch: Callable[[str, str], None] | None = None, backoff_base_s: float = 30.0,
                 backoff_max_s: float = 3600.0, clock: Callable[[], float] = time.time,
                 sessions: dict | None = None, seed: int | None = None, lock_wait_s: float = 10.0):
        check_name(device_id, "device id")
        self.device_id = device_id
        self.labels = dict(labels)
        self.state_dir = Path(os.path.abspath(state_dir))
        self.source = source
        self.trusted_public_key = Path(trusted_public_key)
        if not self.trusted_public_key.is_file():
            # A device never makes keys: the key it trusts is provisioned with it.
            raise FileNotFoundError(f"trusted public key {self.trusted_public_key} does not exist")
        self.telemetry_root_url = telemetry_root_url
        self.s3_endpoint_url = s3_endpoint_url
        self.before_switch = before_switch
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.lock_wait_s = lock_wait_s
        self.downloads = 0  # artifacts (model files) fetched by this process
        self.downloaded_bytes = 0  # artifacts and signature bundles
        self.telemetry_dropped = 0  # records the telemetry store did not take
        self.telemetry_error: str | None = None  # why the last one was dropped
        self.conflicts: list[Conflict] = []
        self._telemetry: ObjectStore | None = None
        # Inference sessions by model file; a simulator shares one dict between its devices.
        self._sessions = sessions if sessions is not None else {}
        self._windows: dict[str, telemetry.InferenceWindow] = {}
        self._reporting: dict[str, dict] = {}  # model -> telemetry settings of the selected entry
        self._seed = seed
        import numpy as np

        # Each device draws its own noise: a seed (simulations) is combined with the device id,
        # or the generator is seeded from the operating system's entropy.
        device_key = int(hashlib.sha256(device_id.encode()).hexdigest()[:16], 16)
        self._noise = np.random.default_rng(None if seed is None else [seed, device_key])
        self.models_dir = self.state_dir / "models"
        self.staging_dir = self.state_dir / "staging"
        self.state_file = self.state_dir / "state.json"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.models_dir, self.staging_dir):
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise InstallError(f"{folder} is not a folder of this device (a link or a file)")
        self.models_dir.mkdir(exist_ok=True)
        with self._locked():
            self.state = self._load_state()
            self._recover()

    # -- state ---------------------------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            if self.state_file.is_symlink():
                raise ValueError("it is a symbolic link")
            loaded = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            loaded = {}
        except (OSError, ValueError) as error:
            # Renames make a torn file impossible; this is a disk fault or a hostile edit. The
            # links still say what is installed (see _recover), so start over rather than stop.
            log.error("%s unreadable (%s); rebuilding it from the active links", self.state_file, one_line(error))
            loaded = {}
        state, problem = _clean_state(loaded, self.device_id)
        if problem:
            log.error("%s has the wrong shape (%s); rebuilding it from the active links", self.state_file, problem)
        return state

    def _save_state(self) -> None:
        write_json_atomic(self.state_file, self.state)

    def _recover(self) -> None:
        """Drop what an interrupted poll left behind and trust the active links over state.json."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        changed = False
        for model_dir in sorted(self.models_dir.iterdir()):
            model = model_dir.name
            if model_dir.is_symlink() or not model_dir.is_dir() or not is_dns_label(model):
                continue
            (model_dir / "active.tmp").unlink(missing_ok=True)
            link = model_dir / "active"
            if not link.is_symlink():
                continue
            folder = os.readlink(link)
            recorded = self.state["models"].get(model) or {}
            artifact = model_dir / folder / MODEL_FILE
            if recorded.get("folder") == folder or not _FOLDER.match(folder) or (model_dir / folder).is_symlink() \
                    or artifact.is_symlink() or not artifact.is_file():
                continue
            # Died between the link switch and the state write (or the state was lost): the link wins.
            previous = recorded.get("folder")
            self.state["models"][model] = {
                "version": folder.split("-", 1)[0], "sha256": sha256_file(artifact),
                "folder": folder, "previous": previous if previous and _FOLDER.match(previous) else None,
                "group": recorded.get("group") if is_dns_label(recorded.get("group")) else None,
                "installed_at": recorded.get("installed_at"),
            }
            changed = True
        if changed:
            self._save_state()

    def installed_version(self, model: str) -> str | None:
        return (self.state["models"].get(model) or {}).get("version")

    def _model_dir(self, model: str) -> Path:
        """`models/<model>`, after checking the name and that the path stays in the device folder."""
        path = self.models_dir / check_name(model, "model name")
        if path.is_symlink() or not os.path.abspath(path).startswith(str(self.models_dir) + os.sep):
            raise InstallError(f"{path} is not a folder of this device")
        return path

    def active_model_path(self, model: str) -> Path | None:
        """The file the device serves for `model` (symlink resolved), or None."""
        if not is_dns_label(model):
            return None
        path = self.models_dir / model / "active" / MODEL_FILE
        if not path.is_file():
            return None
        resolved = path.resolve()
        return resolved if resolved.is_relative_to(self.models_dir.resolve()) else None

    # -- poll ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One agent at a time per device folder: a second one waits for the first one's poll
        (up to `lock_wait_s`) and never touches its staging files."""
        try:
            import fcntl
        except ImportError:  # not POSIX: one agent per folder is then the caller's promise
            yield
            return
        lock = self.state_dir / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            deadline = time.monotonic() + self.lock_wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise AgentBusy(f"another agent is working on {self.state_dir} "
                                        f"(waited {self.lock_wait_s:g} s)") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def poll_once(self) -> list[AgentResult]:
        """Fetch the desired state and reconcile every model; one result per model.

        Models this device runs but no entry selects any more keep running (nothing is
        pruned) and are reported as not_selected with their installed version.
        """
        with self._locked():
            # Another process may have installed something since this one started.
            self.state = self._load_state()
            return self._poll()

    def _poll(self) -> list[AgentResult]:
        try:
            desired = self.source.fetch()
        except Exception as error:  # any source failure: keep serving what is installed
            state, what = ("stale", "desired state is stale") if isinstance(error, StaleError) else \
                ("refused", "desired state refused") if isinstance(error, RefusedError) else \
                ("failed", "desired state unavailable")
            message = f"{what}: {one_line(error, 300)}"
            log.warning("%s: %s", self.device_id, message)
            results = [AgentResult(m, info.get("version"), state, message, group=info.get("group"))
                       for m, info in sorted(self.state["models"].items())]
            results = results or [AgentResult("-", None, state, message)]
            self._report(results)
            return results
        conflicts: list[Conflict] = []
        selected = select_entries(desired.entries, self.labels, conflicts)
        self.conflicts = conflicts
        notes = {c.model: f"also matched by {', '.join(c.ignored)} (ignored)" for c in conflicts}
        results = []
        known = {e.model for e in desired.entries} | set(selected) | set(self.state["models"]) | set(desired.refused)
        for model in sorted(known):
            if not is_dns_label(model):  # no source lets one through; never a path, never reported
                results.append(AgentResult(model[:63], None, "refused", f"model name {model[:63]!r} is not a DNS label"))
                continue
            if model in desired.refused and model not in selected:
                results.append(AgentResult(model, self.installed_version(model), "refused", desired.refused[model],
                                           group=(self.state["models"].get(model) or {}).get("group")))
                continue
            if model not in selected:
                results.append(AgentResult(model, self.installed_version(model), "not_selected"))
                continue
            try:
                result = self._reconcile(selected[model])
            except InstallError as error:
                result = AgentResult(model, self.installed_version(model), "refused", one_line(error, 300))
            if model in notes:
                result.note = "; ".join(filter(None, [result.note, notes[model]]))
            results.append(result)
        self._report(results)
        return results

    def _reconcile(self, entry: Entry) -> AgentResult:
        model, group = entry.model, entry.group
        self._reporting[model] = entry.telemetry.model_dump(by_alias=True, exclude_none=True)
        installed = self.state["models"].get(model)
        if installed and not (self._model_dir(model) / "active" / MODEL_FILE).is_file():
            log.warning("%s: %s v%s is recorded but its files are gone; installing again", self.device_id, model,
                        installed["version"])
            installed = None
        seen = self.state["sequences"].get(model)
        if seen is not None and entry.sequence < seen:
            return AgentResult(model, self.installed_version(model), "refused",
                               f"desired state sequence {entry.sequence} is older than the {seen} already applied "
                               "(replayed)", group=group)
        release: Release = entry
        note = None
        if entry.rollout is not None and not in_rollout(self.device_id, entry.rollout.salt, entry.rollout.share):
            if entry.rollout.control is None:
                return AgentResult(model, installed["version"] if installed else None,
                                   "unchanged" if installed else "not_selected", group=group,
                                   note=f"outside the {entry.rollout.share:g}% rollout of v{entry.version}; "
                                        "no control version named")
            release = entry.rollout.control
            note = f"control: outside the {entry.rollout.share:g}% rollout of v{entry.version}"
        version, digest = release.version, release.artifact.sha256
        if installed and installed["version"] == version and installed["sha256"] == digest:
            changed = self.state["backoff"].pop(model, None) is not None
            if self.state["sequences"].get(model) != entry.sequence:
                self.state["sequences"][model] = entry.sequence
                changed = True
            if changed:
                self._save_state()
            return AgentResult(model, version, "unchanged", group=group, note=note)
        if installed and int(version) < int(installed["version"]) and not entry.rollback:
            return AgentResult(model, version, "refused",
                               f"v{version} is lower than the installed v{installed['version']} and the signed "
                               "desired state is not a rollback", group=group)
        target = f"{version}:{digest}"
        backoff = self.state["backoff"].get(model)
        if backoff and backoff["target"] == target and self.clock() < backoff["next_attempt"]:
            wait = backoff["next_attempt"] - self.clock()
            return AgentResult(model, version, "failed", f"{backoff['error']} (retry in {wait:.0f} s)", group=group)
        try:
            measured = self._install(model, release)
        except Exception as error:  # every failure is reported the same way; nothing was switched
            message = one_line(error, 300) if isinstance(error, (InstallError, DownloadError)) else \
                one_line(f"{type(error).__name__}: {error}", 300)
            failures = backoff["failures"] + 1 if backoff and backoff["target"] == target else 1
            delay = min(self.backoff_base_s * 2 ** (failures - 1), self.backoff_max_s)
            self.state["backoff"][model] = {"target": target, "failures": failures, "error": message,
                                            "next_attempt": self.clock() + delay}
            self._save_state()
            log.warning("%s: %s v%s failed (attempt %d, next in %.0f s): %s", self.device_id, model, version,
                        failures, delay, message)
            return AgentResult(model, version, "failed", message, group=group, note=note)
        previous = installed["folder"] if installed else None
        self.state["models"][model] = {
            "version": version, "sha256": digest, "folder": f"{version}-{digest[:12]}", "previous": previous,
            "group": group, "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "measurements": {k: v for k, v in measured.items() if k in MEASUREMENT_KEYS and v is not None},
        }
        self.state["sequences"][model] = entry.sequence
        self.state["backoff"].pop(model, None)
        self._save_state()
        self._prune(model)
        return AgentResult(model, version, "active", latency_ms=round(measured["latency_ms"], 3), group=group,
                           note=note)

    # -- installation --------------------------------------------------------------------
    def _install(self, model: str, release: Release) -> dict:
        """Install `release` of `model` and switch to it; what the smoke test measured, with the
        file's size and the bytes this install downloaded."""
        version, digest = release.version, release.artifact.sha256
        model_dir = self._model_dir(model)
        folder = f"{version}-{digest[:12]}"
        final = model_dir / folder
        kept = {self._link_target(model_dir), (self.state["models"].get(model) or {}).get("previous")}
        self.staging_dir.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{model}-", dir=self.staging_dir))
        created = False
        try:
            artifact, bundle = final / MODEL_FILE, final / BUNDLE_FILE
            reused = not final.is_symlink() and artifact.is_file() and not artifact.is_symlink() \
                and bundle.is_file() and not bundle.is_symlink()
            if reused:
                # Kept from before (the previous version on a rollback, or an interrupted
                # switch): verified again, so the folder itself need not be trusted.
                try:
                    self._verify(artifact, bundle, release)
                except InstallError as error:
                    log.warning("%s: local copy of %s v%s is bad (%s); downloading it again", self.device_id,
                                model, version, error)
                    reused = False
            if not reused:
                if folder not in kept and (final.exists() or final.is_symlink()):
                    _remove(final)
                artifact, bundle = staging / MODEL_FILE, staging / BUNDLE_FILE
                self.source.download(release.artifact, artifact, release.artifact.length)
                self.downloads += 1
                self.source.download(release.signature, bundle, release.signature.length or MAX_BUNDLE_BYTES)
                downloaded = artifact.stat().st_size + bundle.stat().st_size
                self.downloaded_bytes += downloaded
                self._verify(artifact, bundle, release)
                created = not final.exists()
                final.mkdir(parents=True, exist_ok=True)
                for path in (bundle, artifact):
                    _fsync_file(path)
                    os.replace(path, final / path.name)
                _fsync_dir(final)
                _fsync_dir(model_dir)
            measured = smoke_test(final / MODEL_FILE)
            if self.before_switch is not None:
                self.before_switch(model, version)
            self._switch(model_dir, folder)
            return {**measured, "model_bytes": (final / MODEL_FILE).stat().st_size,
                    "downloaded_bytes": 0 if reused else downloaded}
        except BaseException:
            if created and folder not in kept:
                shutil.rmtree(final, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _link_target(model_dir: Path) -> str | None:
        link = model_dir / "active"
        return os.readlink(link) if link.is_symlink() else None

    def _verify(self, artifact: Path, bundle: Path, release: Release) -> None:
        try:
            verify_files(artifact, bundle, release, self.trusted_public_key)
        except EntryError as error:
            raise InstallError(str(error)) from None

    def _switch(self, model_dir: Path, folder: str) -> None:
        tmp = model_dir / "active.tmp"
        tmp.unlink(missing_ok=True)
        # Relative target: the state folder may be moved or mounted elsewhere.
        os.symlink(folder, tmp)
        os.replace(tmp, model_dir / "active")
        _fsync_dir(model_dir)

    def _prune(self, model: str) -> None:
        """Keep the active version and the one before it (an instant rollback); drop the rest
        of this model's version folders (and nothing else)."""
        info = self.state["models"][model]
        keep = {info["folder"], info.get("previous")}
        model_dir = self._model_dir(model)
        for path in model_dir.iterdir():
            if path.name not in keep and _FOLDER.match(path.name):
                _remove(path)


    # -- telemetry -----------------------------------------------------------------------
    def _telemetry_store(self) -> ObjectStore:
        if self._telemetry is None:
            # One attempt: a device does not stall its requests waiting for the telemetry store.
            self._telemetry = ObjectStore(self.telemetry_root_url, self.s3_endpoint_url, attempts=1)
        return self._telemetry

    def _send(self, record: dict) -> None:
        try:
            telemetry.write_record(self._telemetry_store(), record)
        except Exception as error:  # telemetry must never stop serving
            self.telemetry_dropped += 1
            self.telemetry_error = one_line(error, 200)
            log.warning("%s: telemetry for %s not written: %s", self.device_id, record.get("model"),
                        self.telemetry_error)

    def _report(self, results: list[AgentResult]) -> None:
        """One status record per result; models that do not select the device, and names that are
        not DNS labels (they become paths in the telemetry store), are not reported."""
        ts = telemetry.timestamp(telemetry.utc_now())
        for result in results:
            if result.state == "not_selected" or not is_dns_label(result.model):
                continue
            record = {"kind": "status", "device_id": self.device_id, "model": result.model,
                      "version": result.version, "state": result.state, "error": result.error,
                      "latency_ms": result.latency_ms, "group": result.group, "ts": ts}
            installed = self.state["models"].get(result.model) or {}
            measured = clean_measurements(installed.get("measurements")) \
                if str(installed.get("version")) == str(result.version) else None
            if measured:
                record["measurements"] = measured
            if DEVICE_CLASS_LABEL in self.labels:
                record["device_class"] = self.labels[DEVICE_CLASS_LABEL]
            self._send(record)

    # -- serving -------------------------------------------------------------------------
    def _session(self, path: Path):
        key = str(path)
        if key not in self._sessions:
            from pipelines.onnx.export import session

            self._sessions[key] = session(path)
        return self._sessions[key]

    def serve(self, model: str, requests, added_latency_ms: float = 0.0, fail=None,
              ids: list[str] | None = None) -> list[int | None]:
        """Run the active model once per row of `requests` (a data frame of the model's raw
        features); the predicted class per row (for a regression, the bin of its value), None for a
        failed request.

        `ids`: the app's inference id per row (an application or transaction id its business
        system will label later); a sampled inference is reported under it. Without ids, sampled
        inferences get random ones.

        `added_latency_ms` and `fail` (one bool per row) are the fleet simulator's fault
        injection: a slower device, requests that fail as a crashing model's would.
        """
        from pipelines.data import prepare_features
        from pipelines.onnx.export import answer_contract, answer_labels, feeds

        path = self.active_model_path(model)
        if path is None:
            raise InstallError(f"{model} is not installed on {self.device_id}")
        info = self.state["models"][model]
        sess = self._session(path)
        arrays = feeds(sess, prepare_features(requests, list(requests.columns)))
        outputs = [o.name for o in sess.get_outputs()]
        answer, bins = answer_contract(sess)
        probabilities = outputs.index(answer)
        window = self._windows.get(model)
        if window is not None and window.version != info["version"]:
            self._flush(model)
            window = None
        if window is None and len(requests):
            classes = sess.get_outputs()[probabilities].shape[-1] if bins is None else len(bins) + 1
            if not isinstance(classes, int):  # a dynamic dimension: ask the model once
                classes = sess.run(None, {n: v[:1] for n, v in arrays.items()})[probabilities].shape[1]
            config = self._reporting.get(model) or {}
            window = telemetry.InferenceWindow(
                model, info["version"], info.get("group"), int(classes),
                sample_rate=float(config.get("sampleRate", 0.0)), max_samples=int(config.get("maxSamples", 0)))
            if self._seed is not None:
                window._rng.seed(f"{self._seed}:{self.device_id}:{model}")
            self._windows[model] = window
        if ids is not None:
            if len(ids) != len(requests):
                raise ValueError(f"{len(ids)} inference ids for {len(requests)} requests")
            bad = next((i for i in ids if not isinstance(i, str) or not telemetry.INFERENCE_ID.match(i)), None)
            if bad is not None:
                raise ValueError(f"inference id {str(bad)[:40]!r}: 1-128 letters, digits, '.', '_', ':' or '-'")
        raw = requests.to_dict("records")
        predictions: list[int | None] = []
        for index in range(len(requests)):
            row = {name: value[index:index + 1] for name, value in arrays.items()}
            began = time.perf_counter()
            value = None
            if fail is not None and fail[index]:
                prediction = None
            else:
                answer_values = sess.run(None, row)[probabilities]
                prediction = int(answer_labels(answer_values, bins)[0])
                if bins is not None:
                    value = float(answer_values.reshape(-1)[0])
            elapsed = (time.perf_counter() - began) * 1000 + added_latency_ms
            window.add(elapsed, prediction, _json_row(raw[index]), None if ids is None else ids[index], value)
            predictions.append(prediction)
        return predictions

    def _flush(self, model: str) -> None:
        window = self._windows.pop(model, None)
        if window is None or window.requests == 0:
            return
        privacy = (self._reporting.get(model) or {}).get("privacy") or {}
        self._send(window.record(self.device_id, self.labels, privacy.get("epsilon"), self._noise))

    def flush_telemetry(self) -> None:
        """Send one inference record per model served since the last flush."""
        for model in list(self._windows):
            self._flush(model)

    def summary(self) -> dict:
        return {"device_id": self.device_id, "labels": self.labels, "downloads": self.downloads,
                "downloaded_bytes": self.downloaded_bytes,
                "telemetry_dropped": self.telemetry_dropped, "telemetry_error": self.telemetry_error,
                "models": {m: dict(v) for m, v in self.state["models"].items()},
                "conflicts": [asdict(c) for c in self.conflicts]}


def _remove(path: Path) -> None:
    """Remove `path` itself: a link is unlinked (never followed), a folder removed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def select_entries(entries: list[Entry], labels: dict[str, str],
                   conflicts: list[Conflict] | None = None) -> dict[str, Entry]:
    """Per model, the entry whose selector the device's labels satisfy (the first by group name
    when several do; the others are reported as conflicts)."""
    by_model: dict[str, list[Entry]] = {}
    for entry in entries:
        if entry.selects(labels):
            by_model.setdefault(entry.model, []).append(entry)
    chosen = {}
    for model in sorted(by_model):
        candidates = sorted(by_model[model], key=lambda e: e.group)
        chosen[model] = candidates[0]
        if len(candidates) > 1:
            conflict = Conflict(model, candidates[0].group, tuple(e.group for e in candidates[1:]))
            log.warning("%s: device matches groups %s; using %s", model,
                        ", ".join([conflict.chosen, *conflict.ignored]), conflict.chosen)
            if conflicts is not None:
                conflicts.append(conflict)
    return chosen
