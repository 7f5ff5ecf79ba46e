"""Device telemetry: what edge agents report, with optional differential privacy, and how
the pipeline reads it back.

Records live in the telemetry store (a local folder or an S3 prefix), partitioned by model,
UTC date and device group: `telemetry/<model>/<YYYY-MM-DD>/<group>/<device>.jsonl` on a local
store (one line per record) and `.../<device>-<epoch ms>.json` on S3 (one object per record,
S3 has no append). Two kinds of record:

- `status`: one per poll per model: the reconcile state, the installed version, an error,
  the smoke-test latency, and what the installed version costs the device (`measurements`,
  taken by the smoke test on synthetic inputs: load time, CPU and wall time per inference,
  resident memory the session added, model bytes, bytes downloaded; see `measured_cost`).
- `inference`: one per serving window per model: request and error counts, a latency
  histogram, a histogram of predicted classes, and a sample of inputs with their outputs.

Differential privacy (the spec's `telemetry.privacy.epsilon`, carried to devices by the
manifest): before a record leaves the device, Laplace noise of scale `SENSITIVITY / epsilon`
is added to every count and histogram bin. One inference changes at most four of them (the
request count, the error count, one latency bin, one prediction bin), so the record as a
whole is epsilon-differentially private with respect to any single inference. Noise is not
clipped (sums over devices stay unbiased); readers clip only where a negative count would
make no sense (quantiles). The samples of raw inputs are NOT protected: a spec that enables
privacy should set `sampleRate: 0` unless the inputs themselves are not personal.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from pipelines.storage import ObjectStore

# Latency bins: upper edges in ms, a factor sqrt(2) apart from 0.05 ms to ~13 s; a last bin
# holds everything slower. Fixed, so histograms from every device add up bin by bin.
LATENCY_EDGES_MS: tuple[float, ...] = tuple(round(0.05 * math.sqrt(2) ** k, 4) for k in range(37))
SENSITIVITY = 4.0  # counts one inference can change: requests, errors, a latency bin, a prediction bin
PREFIX = "telemetry"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def latency_bin(ms: float) -> int:
    """Index of the histogram bin holding `ms`."""
    for index, edge in enumerate(LATENCY_EDGES_MS):
        if ms <= edge:
            return index
    return len(LATENCY_EDGES_MS)


def laplace_noise(values: np.ndarray, epsilon: float, rng: np.random.Generator,
                  sensitivity: float = SENSITIVITY) -> np.ndarray:
    """`values` plus Laplace(0, sensitivity / epsilon) noise, element-wise."""
    if epsilon <= 0:
        raise ValueError("epsilon must be positive")
    values = np.asarray(values, dtype=np.float64)
    return values + rng.laplace(0.0, sensitivity / epsilon, size=values.shape)


@dataclass
class InferenceWindow:
    """Counts of one model version's inferences on one device since the last report."""

    model: str
    version: str | None
    group: str | None
    classes: int
    sample_rate: float = 0.0
    max_samples: int = 0
    started: datetime = field(default_factory=utc_now)
    requests: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    predictions: list[int] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if not self.predictions:
            self.predictions = [0] * self.classes

    def add(self, latency_ms: float, prediction: int | None, inputs: dict | None = None,
            inference_id: str | None = None, value: float | None = None) -> str | None:
        """One inference: `prediction` None means it failed. A sampled inference keeps its
        inputs, its output (and a regression's `value`) under its inference id (the caller's,
        or a random one): labels that arrive later for that id are joined to it on the server.
        Returns the id when the inference was sampled, else None."""
        self.requests += 1
        self.latency[latency_bin(latency_ms)] += 1
        if prediction is None:
            self.errors += 1
            return None
        self.predictions[prediction] += 1
        if inputs is not None and len(self.samples) < self.max_samples and self._rng.random() < self.sample_rate:
            sample = {"id": inference_id or uuid.UUID(int=self._rng.getrandbits(128), version=4).hex,
                      "inputs": inputs, "output": int(prediction)}
            if value is not None:
                sample["value"] = float(value)
            self.samples.append(sample)
            return sample["id"]
        return None

    def record(self, device_id: str, labels: dict[str, str], epsilon: float | None = None,
               rng: np.random.Generator | None = None, now: datetime | None = None) -> dict:
        """The record to send; counts carry Laplace noise when `epsilon` is set."""
        counts = np.array([self.requests, self.errors, *self.latency, *self.predictions], dtype=np.float64)
        privacy = None
        if epsilon:
            counts = np.round(laplace_noise(counts, epsilon, rng or np.random.default_rng()), 3)
            privacy = {"mechanism": "laplace", "epsilon": epsilon, "sensitivity": SENSITIVITY}
        n_latency = len(self.latency)
        record = {
            "kind": "inference", "device_id": device_id, "model": self.model, "version": self.version,
            "group": self.group, "window_start": timestamp(self.started), "ts": timestamp(now or utc_now()),
            "requests": float(counts[0]), "errors": float(counts[1]),
            "latency_hist": [float(c) for c in counts[2:2 + n_latency]],
            "predictions": {str(i): float(c) for i, c in enumerate(counts[2 + n_latency:])},
            "samples": self.samples, "privacy": privacy,
        }
        if "apexlogic.dev/device-class" in labels:
            record["device_class"] = labels["apexlogic.dev/device-class"]
        return record


# An inference id: what the app passes with a request (an application or transaction id) and
# what the business system keys its labels by. Bounded and path-free.
INFERENCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def record_key(model: str, group: str | None, device_id: str, moment: datetime) -> str:
    """Where a device's records for a model and day go (without the extension)."""
    return f"{PREFIX}/{model}/{moment:%Y-%m-%d}/{group or 'unknown'}/{device_id}"


def write_record(store: ObjectStore, record: dict) -> None:
    """Append a record (local store) or put it as its own object (S3)."""
    moment = parse_timestamp(record["ts"])
    key = record_key(record["model"], record.get("group"), record["device_id"], moment)
    line = json.dumps(record, sort_keys=True, separators=(",", ":"))
    local = store.local_path(f"{key}.jsonl")
    if local is not None:
        _append_no_follow(store.local_path(""), local, (line + "\n").encode())
    else:
        store.put_bytes(line.encode(), f"{key}-{int(moment.timestamp() * 1000)}.json")


def _append_no_follow(root: Path, path: Path, data: bytes) -> None:
    """Append `data` to `path` below `root` without following a symbolic link on the way: a
    device's own disk may hold links planted to make it write elsewhere. The root itself is
    configured, not planted: it is created when missing."""
    root.mkdir(parents=True, exist_ok=True)
    parts = path.relative_to(root).parts
    if any(part in ("", ".", "..") for part in parts):
        raise OSError(f"{path}: a '..' in a telemetry key; nothing is written outside {root}")
    folder = root
    for part in parts[:-1]:
        folder = folder / part
        if folder.is_symlink():
            raise OSError(f"{folder} is a symbolic link; telemetry is not written through links")
        folder.mkdir(exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        # One write() in append mode: concurrent writers never interleave a line.
        os.write(fd, data)
    finally:
        os.close(fd)


def read_records(store: ObjectStore, model: str, since: datetime, until: datetime | None = None,
                 kind: str | None = None) -> list[dict]:
    """Records of `model` with `since <= ts < until` (and of `kind`), oldest first.

    Only the date partitions the window touches are listed.
    """
    until = until or utc_now() + timedelta(seconds=1)
    records = []
    day = since.astimezone(timezone.utc).date()
    while day <= until.astimezone(timezone.utc).date():
        for key in store.list_keys(f"{PREFIX}/{model}/{day:%Y-%m-%d}/"):
            if not key.endswith((".jsonl", ".json")):
                continue
            for line in store.read_bytes(key).decode().splitlines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if kind and record.get("kind", "status") != kind:
                    continue
                if since <= parse_timestamp(record["ts"]) < until:
                    records.append(record)
        day += timedelta(days=1)
    records.sort(key=lambda r: r["ts"])
    return records


@dataclass
class CohortStats:
    """Inference telemetry of a set of devices, summed (noise included, if any)."""

    devices: int
    records: int
    requests: float
    errors: float
    latency_hist: list[float]
    predictions: dict[str, float]

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None

    def latency_quantile(self, q: float) -> float | None:
        """The q-quantile of latency in ms, interpolated geometrically inside its bin."""
        counts = [max(0.0, c) for c in self.latency_hist]
        total = sum(counts)
        if total <= 0:
            return None
        target, seen = q * total, 0.0
        for index, count in enumerate(counts):
            if count > 0 and seen + count >= target:
                upper = LATENCY_EDGES_MS[index] if index < len(LATENCY_EDGES_MS) else LATENCY_EDGES_MS[-1] * 2
                lower = LATENCY_EDGES_MS[index - 1] if index > 0 else 0.0
                fraction = (target - seen) / count
                return lower + (upper - lower) * fraction if lower == 0 else lower * (upper / lower) ** fraction
            seen += count
        return LATENCY_EDGES_MS[-1] * 2

    def prediction_shares(self) -> dict[str, float]:
        counts = {k: max(0.0, v) for k, v in self.predictions.items()}
        total = sum(counts.values())
        return {k: (v / total if total > 0 else 0.0) for k, v in sorted(counts.items())}

    def brief(self) -> dict:
        p95 = self.latency_quantile(0.95)
        rate = self.error_rate
        return {"devices": self.devices, "requests": round(self.requests, 1), "errors": round(self.errors, 1),
                "error_rate": None if rate is None else round(rate, 5),
                "p95_ms": None if p95 is None else round(p95, 3),
                "prediction_shares": {k: round(v, 4) for k, v in self.prediction_shares().items()}}


def cohort_stats(records: list[dict]) -> CohortStats:
    """Sum the inference records of a cohort."""
    latency = [0.0] * (len(LATENCY_EDGES_MS) + 1)
    predictions: dict[str, float] = {}
    requests = errors = 0.0
    devices = set()
    inference = [r for r in records if r.get("kind") == "inference"]
    for record in inference:
        devices.add(record["device_id"])
        requests += record["requests"]
        errors += record["errors"]
        for index, count in enumerate(record["latency_hist"]):
            latency[index] += count
        for label, count in record["predictions"].items():
            predictions[label] = predictions.get(label, 0.0) + count
    return CohortStats(devices=len(devices), records=len(inference), requests=requests, errors=errors,
                       latency_hist=latency, predictions=predictions)


def measured_cost(records: list[dict]) -> list[dict]:
    """What devices measured of the models they run (the `measurements` of status records, each
    device's latest per version): per model version and device class, the devices and the
    median of each measure (load time, CPU and wall time per inference, resident memory the
    session added, model bytes, bytes downloaded per install)."""
    import statistics

    latest: dict[tuple, dict] = {}
    for record in records:
        if record.get("kind", "status") == "status" and isinstance(record.get("measurements"), dict):
            latest[(record.get("model"), str(record.get("version")), record["device_id"])] = record
    groups: dict[tuple, list[dict]] = {}
    for (model, version, _), record in sorted(latest.items()):
        groups.setdefault((model, version, record.get("device_class")), []).append(record["measurements"])
    out = []
    for (model, version, device_class), measured in groups.items():
        row = {"model": model, "version": version, "device_class": device_class, "devices": len(measured)}
        for key in ("load_ms", "cpu_ms", "wall_ms", "rss_bytes", "model_bytes", "downloaded_bytes"):
            values = [m[key] for m in measured if isinstance(m.get(key), (int, float))]
            row[key] = round(statistics.median(values), 4) if values else None
        out.append(row)
    return out


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Total variation distance between two distributions over labels (0 same, 1 disjoint)."""
    labels = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in labels)


def samples_frame(records: list[dict]):
    """The sampled inputs of inference records as a data frame, one row per sample, with the
    model's output in `prediction` and the record's `version`, `group` and `device_id`."""
    import pandas as pd

    rows = []
    for record in records:
        for sample in record.get("samples") or []:
            rows.append({**sample["inputs"], "prediction": sample["output"], "version": record.get("version"),
                         "group": record.get("group"), "device_id": record["device_id"]})
    return pd.DataFrame(rows)


def sampled_outputs(records: list[dict]):
    """The sampled inferences of inference records without their inputs, one row each:
    `inference_id`, `prediction` (class index or a regression's bin), `value` (a regression's
    output, else NaN), `version`, `device_group`, `device_id` and `ts` (the record's, as UTC time).
    Samples without an id (sent by agents before inference ids) are left out."""
    import pandas as pd

    ids, outputs, values, versions, groups, devices, stamps = [], [], [], [], [], [], []
    for record in records:
        samples = record.get("samples") or ()
        if not samples:
            continue
        version, group, device, ts = str(record.get("version")), record.get("group"), record["device_id"], record["ts"]
        for sample in samples:
            if "id" not in sample:
                continue
            ids.append(sample["id"])
            outputs.append(sample["output"])
            values.append(sample.get("value", float("nan")))
            versions.append(version)
            groups.append(group)
            devices.append(device)
            stamps.append(ts)
    return pd.DataFrame({"inference_id": pd.Series(ids, dtype=object), "prediction": pd.Series(outputs, dtype="int64"),
                         "value": pd.Series(values, dtype="float64"), "version": pd.Series(versions, dtype=object),
                         "device_group": pd.Series(groups, dtype=object),
                         "device_id": pd.Series(devices, dtype=object),
                         "ts": pd.to_datetime(pd.Series(stamps, dtype=object), utc=True, format="ISO8601")})
