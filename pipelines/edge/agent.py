"""The edge agent: reconciles one device with the desired state, one poll at a time.

Per selected model, a poll installs a new version in this order, and any failure leaves the
active model as it was:

1. download the artifact and its signature bundle into `staging/` (nothing else sees it);
2. check the size, the sha256 of the manifest and the signature with the trusted key;
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
prediction histograms, sampled inputs; Laplace noise when the manifest asks for privacy,
see `pipelines.edge.telemetry`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pipelines.edge import telemetry
from pipelines.edge.desired import (
    Conflict,
    DesiredStateSource,
    group_of,
    in_rollout,
    model_of,
    rollout_share,
    select,
)
from pipelines.errors import one_line
from pipelines.gitops.manifest import manifest_checksum
from pipelines.gitops.rollback import ROLLBACK_ANNOTATION
from pipelines.storage import ObjectStore, sha256_file

log = logging.getLogger(__name__)

State = Literal["active", "unchanged", "refused", "failed", "not_selected"]
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


def _version_number(version: str) -> int:
    try:
        return int(version)
    except ValueError:
        raise InstallError(f"version {version!r} is not an integer") from None


def smoke_inference(model_path: Path) -> float:
    """Run the model once on zeros (empty strings for string inputs), batch 1; milliseconds."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One thread: the device is serving the active model while this runs.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise InstallError(f"smoke test: onnxruntime cannot load the model: {one_line(error, 160)}") from None
    feeds = {}
    for item in session.get_inputs():
        shape = [1 if i == 0 or not isinstance(d, int) or d <= 0 else d for i, d in enumerate(item.shape)]
        if item.type == "tensor(string)":
            feeds[item.name] = np.full(shape, "", dtype=object)
        elif item.type in _ONNX_DTYPES:
            feeds[item.name] = np.zeros(shape, dtype=_ONNX_DTYPES[item.type])
        else:
            raise InstallError(f"smoke test: input {item.name!r} has type {item.type}, which the agent cannot feed")
    start = time.perf_counter()
    try:
        session.run(None, feeds)
    except Exception as error:
        raise InstallError(f"smoke test: inference failed: {one_line(error, 160)}") from None
    return (time.perf_counter() - start) * 1000


class EdgeAgent:
    """Reconciles the models of one device (see the module docstring for the order of steps).

    `before_switch(model, version)` is a test hook called after the new version is verified,
    installed and smoke-tested, just before the symlink switch. `clock` returns epoch seconds
    (the backoff's time; tests move it forward).
    """

    def __init__(self, device_id: str, labels: dict[str, str], state_dir: Path, source: DesiredStateSource,
                 trusted_public_key: Path, telemetry_root_url: str, s3_endpoint_url: str | None = None, *,
                 before_switch: Callable[[str, str], None] | None = None, backoff_base_s: float = 30.0,
                 backoff_max_s: float = 3600.0, clock: Callable[[], float] = time.time,
                 sessions: dict | None = None, seed: int | None = None):
        self.device_id = device_id
        self.labels = dict(labels)
        self.state_dir = Path(state_dir)
        self.source = source
        self.trusted_public_key = Path(trusted_public_key)
        self.telemetry_root_url = telemetry_root_url
        self.s3_endpoint_url = s3_endpoint_url
        self.before_switch = before_switch
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.downloads = 0  # artifacts (model files) fetched by this process
        self.downloaded_bytes = 0  # artifacts and signature bundles
        self.telemetry_dropped = 0  # records the telemetry store did not take
        self.telemetry_error: str | None = None  # why the last one was dropped
        self.conflicts: list[Conflict] = []
        self._stores: dict[str, ObjectStore] = {}
        self._telemetry: ObjectStore | None = None
        # Inference sessions by model file; a simulator shares one dict between its devices.
        self._sessions = sessions if sessions is not None else {}
        self._windows: dict[str, telemetry.InferenceWindow] = {}
        self._reporting: dict[str, dict] = {}  # model -> spec.telemetry of the selected manifest
        self._seed = seed
        import numpy as np

        # Each device draws its own noise: a seed (simulations) is combined with the device id,
        # or the generator is seeded from the operating system's entropy.
        device_key = int(hashlib.sha256(device_id.encode()).hexdigest()[:16], 16)
        self._noise = np.random.default_rng(None if seed is None else [seed, device_key])
        self.models_dir = self.state_dir / "models"
        self.staging_dir = self.state_dir / "staging"
        self.state_file = self.state_dir / "state.json"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()
        self._recover()

    # -- state ---------------------------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as error:
            # Renames make a torn file impossible; this is a disk fault. The links still say
            # what is installed (see _recover), so start over rather than stop serving.
            log.error("%s unreadable (%s); rebuilding it from the active links", self.state_file, error)
            state = {}
        state.setdefault("models", {})
        state.setdefault("backoff", {})
        state["device_id"] = self.device_id
        return state

    def _save_state(self) -> None:
        write_json_atomic(self.state_file, self.state)

    def _recover(self) -> None:
        """Drop what an interrupted poll left behind and trust the active links over state.json."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        changed = False
        for model_dir in sorted(p for p in self.models_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            (model_dir / "active.tmp").unlink(missing_ok=True)
            link = model_dir / "active"
            model = model_dir.name
            if not link.is_symlink():
                continue
            folder = os.readlink(link)
            recorded = self.state["models"].get(model) or {}
            if recorded.get("folder") == folder or not (model_dir / folder / MODEL_FILE).is_file():
                continue
            # Died between the link switch and the state write: the link wins.
            self.state["models"][model] = {
                "version": folder.rsplit("-", 1)[0], "sha256": sha256_file(model_dir / folder / MODEL_FILE),
                "folder": folder, "previous": recorded.get("folder"), "group": recorded.get("group"),
                "installed_at": recorded.get("installed_at"),
            }
            changed = True
        if changed:
            self._save_state()

    def installed_version(self, model: str) -> str | None:
        return (self.state["models"].get(model) or {}).get("version")

    def active_model_path(self, model: str) -> Path | None:
        """The file the device serves for `model` (symlink resolved), or None."""
        path = self.models_dir / model / "active" / MODEL_FILE
        return path.resolve() if path.is_file() else None

    # -- poll ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One poll at a time per state folder (a `--once` run beside a running agent waits)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: one agent per folder is then the caller's promise
            yield
            return
        with open(self.state_dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def poll_once(self) -> list[AgentResult]:
        """Fetch the desired state and reconcile every model; one result per model.

        Models this device runs but no overlay selects any more keep running (nothing is
        pruned) and are reported as not_selected with their installed version.
        """
        with self._locked():
            # Another process may have installed something since this one started.
            self.state = self._load_state()
            return self._poll()

    def _poll(self) -> list[AgentResult]:
        try:
            objects = self.source.fetch()
        except Exception as error:  # any source failure: keep serving what is installed
            message = f"desired state unavailable: {one_line(error, 300)}"
            log.warning("%s: %s", self.device_id, message)
            results = [AgentResult(m, info.get("version"), "failed", message, group=info.get("group"))
                       for m, info in sorted(self.state["models"].items())]
            results = results or [AgentResult("-", None, "failed", message)]
            self._report(results)
            return results
        conflicts: list[Conflict] = []
        selected = {model_of(o): o for o in select(objects, self.labels, conflicts)}
        self.conflicts = conflicts
        notes = {c.model: f"also matched by {', '.join(c.ignored)} (ignored)" for c in conflicts}
        results = []
        for model in sorted({model_of(o) for o in objects} | set(selected) | set(self.state["models"])):
            if model not in selected:
                results.append(AgentResult(model, self.installed_version(model), "not_selected"))
                continue
            result = self._reconcile(model, selected[model])
            if model in notes:
                result.note = "; ".join(filter(None, [result.note, notes[model]]))
            results.append(result)
        self._report(results)
        return results

    def _reconcile(self, model: str, obj: dict) -> AgentResult:
        ref = (obj.get("spec") or {}).get("modelRef") or {}
        group = group_of(obj) or None
        self._reporting[model] = (obj.get("spec") or {}).get("telemetry") or {}
        version = str(ref.get("version", ""))
        installed = self.state["models"].get(model)
        if installed and not (self.models_dir / model / "active" / MODEL_FILE).is_file():
            log.warning("%s: %s v%s is recorded but its files are gone; installing again", self.device_id, model,
                        installed["version"])
            installed = None
        try:
            digest = manifest_checksum(obj)
            wanted = _version_number(version)
        except (ValueError, InstallError) as error:
            return AgentResult(model, version or None, "failed", f"bad manifest: {one_line(error, 300)}",
                               group=group)
        if installed and installed["version"] == version and installed["sha256"] == digest:
            if self.state["backoff"].pop(model, None) is not None:
                self._save_state()
            return AgentResult(model, version, "unchanged", group=group)
        share = rollout_share(obj)
        if not in_rollout(self.device_id, model, share):
            return AgentResult(model, installed["version"] if installed else None,
                               "unchanged" if installed else "not_selected", group=group,
                               note=f"outside the {share:g}% rollout of v{version}")
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        if installed and wanted < _version_number(installed["version"]) \
                and str(annotations.get(ROLLBACK_ANNOTATION)).lower() != "true":
            return AgentResult(model, version, "refused",
                               f"v{version} is lower than the installed v{installed['version']} and the "
                               f"manifest is not marked {ROLLBACK_ANNOTATION}: \"true\"", group=group)
        target = f"{version}:{digest}"
        backoff = self.state["backoff"].get(model)
        if backoff and backoff["target"] == target and self.clock() < backoff["next_attempt"]:
            wait = backoff["next_attempt"] - self.clock()
            return AgentResult(model, version, "failed", f"{backoff['error']} (retry in {wait:.0f} s)", group=group)
        try:
            latency = self._install(model, version, digest, ref)
        except Exception as error:  # every failure is reported the same way; nothing was switched
            message = one_line(error, 300) if isinstance(error, InstallError) else \
                one_line(f"{type(error).__name__}: {error}", 300)
            failures = backoff["failures"] + 1 if backoff and backoff["target"] == target else 1
            delay = min(self.backoff_base_s * 2 ** (failures - 1), self.backoff_max_s)
            self.state["backoff"][model] = {"target": target, "failures": failures, "error": message,
                                            "next_attempt": self.clock() + delay}
            self._save_state()
            log.warning("%s: %s v%s failed (attempt %d, next in %.0f s): %s", self.device_id, model, version,
                        failures, delay, message)
            return AgentResult(model, version, "failed", message, group=group)
        previous = installed["folder"] if installed else None
        self.state["models"][model] = {
            "version": version, "sha256": digest, "folder": f"{version}-{digest[:12]}", "previous": previous,
            "group": group, "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.state["backoff"].pop(model, None)
        self._save_state()
        self._prune(model)
        return AgentResult(model, version, "active", latency_ms=round(latency, 3), group=group)

    # -- installation --------------------------------------------------------------------
    def _install(self, model: str, version: str, digest: str, ref: dict) -> float:
        source_uri = ref.get("sourceUri")
        bundle_uri = (ref.get("signatureRef") or {}).get("uri")
        if not source_uri:
            raise InstallError("bad manifest: no spec.modelRef.sourceUri")
        if not bundle_uri:
            raise InstallError("manifest has no spec.modelRef.signatureRef: unsigned artifacts are not installed")
        model_dir = self.models_dir / model
        folder = f"{version}-{digest[:12]}"
        final = model_dir / folder
        kept = {self._link_target(model_dir), (self.state["models"].get(model) or {}).get("previous")}
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{model}-", dir=self.staging_dir))
        created = False
        try:
            artifact, bundle = final / MODEL_FILE, final / BUNDLE_FILE
            reused = artifact.is_file() and bundle.is_file()
            if reused:
                # Kept from before (the previous version on a rollback, or an interrupted
                # switch): verified again, so the folder itself need not be trusted.
                try:
                    self._verify(artifact, bundle, digest, ref.get("sizeBytes"))
                except InstallError as error:
                    log.warning("%s: local copy of %s v%s is bad (%s); downloading it again", self.device_id,
                                model, version, error)
                    reused = False
                    if folder not in kept:
                        shutil.rmtree(final, ignore_errors=True)
            if not reused:
                artifact, bundle = staging / MODEL_FILE, staging / BUNDLE_FILE
                self._download(source_uri, artifact, "artifact")
                self.downloads += 1
                self._download(bundle_uri, bundle, "signature bundle")
                self.downloaded_bytes += artifact.stat().st_size + bundle.stat().st_size
                self._verify(artifact, bundle, digest, ref.get("sizeBytes"))
                created = not final.exists()
                final.mkdir(parents=True, exist_ok=True)
                for path in (bundle, artifact):
                    _fsync_file(path)
                    os.replace(path, final / path.name)
                _fsync_dir(final)
                _fsync_dir(model_dir)
            latency = smoke_inference(final / MODEL_FILE)
            if self.before_switch is not None:
                self.before_switch(model, version)
            self._switch(model_dir, folder)
            return latency
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

    def _store_for(self, root: str) -> ObjectStore:
        if root not in self._stores:
            self._stores[root] = ObjectStore(root, self.s3_endpoint_url)
        return self._stores[root]

    def _download(self, uri: str, target: Path, what: str) -> None:
        parsed = urlparse(uri)
        try:
            if parsed.scheme in ("", "file"):
                source = Path(unquote(parsed.path) if parsed.scheme else uri)
                with open(source, "rb") as reader, open(target, "wb") as writer:
                    shutil.copyfileobj(reader, writer, 1 << 20)
            elif parsed.scheme == "s3":
                self._store_for(f"s3://{parsed.netloc}").get_file(parsed.path.lstrip("/"), target)
            else:
                raise InstallError(f"cannot download {what} {uri}: unsupported scheme {parsed.scheme!r}")
        except InstallError:
            raise
        except FileNotFoundError:
            raise InstallError(f"cannot download {what} {uri}: it does not exist") from None
        except OSError as error:
            raise InstallError(f"cannot download {what} {uri}: {error.strerror or error}") from None
        except Exception as error:  # StoreError and whatever boto3 raises
            raise InstallError(f"cannot download {what}: {one_line(error, 200)}") from None

    def _verify(self, artifact: Path, bundle: Path, digest: str, size: int | None) -> None:
        from pipelines.gitops.signing import SignatureError, verify_artifact

        actual_size = artifact.stat().st_size
        if size is not None and actual_size != int(size):
            raise InstallError(f"artifact is {actual_size} bytes, the manifest says {size} "
                               "(download cut off or another file)")
        actual = sha256_file(artifact)
        if actual != digest:
            raise InstallError(f"sha256 mismatch: artifact is {actual[:12]}…, the manifest says {digest[:12]}…")
        try:
            verify_artifact(artifact, bundle, self.trusted_public_key)
        except SignatureError as error:
            detail = str(error).replace(str(artifact.parent) + os.sep, "")
            raise InstallError(f"signature check failed ({error.reason}): {one_line(detail, 200)}") from None

    def _switch(self, model_dir: Path, folder: str) -> None:
        tmp = model_dir / "active.tmp"
        tmp.unlink(missing_ok=True)
        # Relative target: the state folder may be moved or mounted elsewhere.
        os.symlink(folder, tmp)
        os.replace(tmp, model_dir / "active")
        _fsync_dir(model_dir)

    def _prune(self, model: str) -> None:
        """Keep the active version and the one before it (an instant rollback); drop the rest."""
        info = self.state["models"][model]
        keep = {info["folder"], info.get("previous"), "active"}
        for path in (self.models_dir / model).iterdir():
            if path.name not in keep and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)

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
        """One status record per result; models that do not select the device are not reported."""
        ts = telemetry.timestamp(telemetry.utc_now())
        for result in results:
            if result.state == "not_selected" or result.model == "-":
                continue
            record = {"kind": "status", "device_id": self.device_id, "model": result.model,
                      "version": result.version, "state": result.state, "error": result.error,
                      "latency_ms": result.latency_ms, "group": result.group, "ts": ts}
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

    def serve(self, model: str, requests, added_latency_ms: float = 0.0, fail=None) -> list[int | None]:
        """Run the active model once per row of `requests` (a data frame of the model's raw
        features); the predicted class per row, None for a failed request.

        `added_latency_ms` and `fail` (one bool per row) are the fleet simulator's fault
        injection: a slower device, requests that fail as a crashing model's would.
        """
        from pipelines.data import prepare_features
        from pipelines.onnx.export import feeds

        path = self.active_model_path(model)
        if path is None:
            raise InstallError(f"{model} is not installed on {self.device_id}")
        info = self.state["models"][model]
        sess = self._session(path)
        arrays = feeds(sess, prepare_features(requests, list(requests.columns)))
        outputs = [o.name for o in sess.get_outputs()]
        probabilities = outputs.index("probabilities")
        window = self._windows.get(model)
        if window is not None and window.version != info["version"]:
            self._flush(model)
            window = None
        if window is None and len(requests):
            classes = sess.get_outputs()[probabilities].shape[-1]
            if not isinstance(classes, int):  # a dynamic dimension: ask the model once
                classes = sess.run(None, {n: v[:1] for n, v in arrays.items()})[probabilities].shape[1]
            config = self._reporting.get(model) or {}
            window = telemetry.InferenceWindow(
                model, info["version"], info.get("group"), int(classes),
                sample_rate=float(config.get("sampleRate", 0.0)), max_samples=int(config.get("maxSamples", 0)))
            if self._seed is not None:
                window._rng.seed(f"{self._seed}:{self.device_id}:{model}")
            self._windows[model] = window
        raw = requests.to_dict("records")
        predictions: list[int | None] = []
        for index in range(len(requests)):
            row = {name: value[index:index + 1] for name, value in arrays.items()}
            began = time.perf_counter()
            if fail is not None and fail[index]:
                prediction = None
            else:
                prediction = int(sess.run(None, row)[probabilities][0].argmax())
            elapsed = (time.perf_counter() - began) * 1000 + added_latency_ms
            window.add(elapsed, prediction, _json_row(raw[index]))
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
