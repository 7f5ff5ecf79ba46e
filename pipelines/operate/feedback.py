"""Ground truth from the field: labels for sampled inferences, keyed by inference id.

An app passes an inference id with each request (an application or transaction id its business
system knows); a device reports a sampled inference under that id (`telemetry`). Later the
business system learns the true outcome (for a loan: whether it was repaid) and sends it with
the id: `POST /edge/api/models/<model>/feedback` (Edge Releases, authenticated) or
`python -m pipelines feedback <model> <file>` (CSV with the header `inference_id,label`, or JSON
lines of `{"inference_id": ..., "label": ...}`).

A batch is checked whole before anything is written: at most `MAX_BATCH` labels; each row has
exactly `inference_id` (1-128 letters, digits, `.`, `_`, `:`, `-`) and `label` (a regression's
finite number; a class as the training data names it, a number or a string of at most 64
characters); an id twice in one batch is refused (which one is right?). A valid batch becomes
one object in the telemetry store, `feedback/<model>/<arrival date>/<HHMMSS>-<sha256 of the
content, 16 hex>.jsonl`, written at once, each line with its arrival time and who sent it;
sending the same batch again in the same second writes the same object.

What the field monitor makes of labels (`pipelines.operate.quality`): a label for an id sampled
more than once, or sent again later, is a correction, and the latest one received counts; a
label whose inference was never sampled (most are: devices sample a share of inferences) is
counted as unmatched; a label received more than `monitoring.field.labelWindow` after its
inference is late: counted, not judged. Sensitive attributes are never part of a label: the
operator's own table (`monitoring.field.attributes`) holds them, joined by inference id on the
server.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from datetime import datetime
from pathlib import Path

from pipelines.edge.telemetry import INFERENCE_ID, parse_timestamp, timestamp
from pipelines.records import Record
from pipelines.storage import ObjectStore

FEEDBACK_PREFIX = "feedback"
MAX_BATCH = 100_000
MAX_LABEL_CHARS = 64
FIELDS = ("inference_id", "label")


class FeedbackError(ValueError):
    """A batch of labels that cannot be taken; the message names the row and the field."""


class FeedbackReceipt(Record):
    """What was stored: how many labels, where, when."""

    model: str
    labels: int
    received_at: str
    key: str
    uri: str


def model_task(spec_path: Path, settings) -> str:
    """What the model predicts (labels are checked against it): the spec's task, else the one
    its latest release inferred from the target, else a classifier's."""
    from pipelines.release import latest_summary
    from pipelines.specs import load_spec

    spec = load_spec(spec_path)
    if spec.task:
        return spec.task
    summary = latest_summary(spec.name, settings)
    return summary.task if summary is not None else "binary"


def check_rows(rows: list, task: str, where: str = "batch") -> list[dict]:
    """The batch as clean `{inference_id, label}` rows, or FeedbackError naming the first bad
    row (`where` names the file or the request in the message)."""
    if not isinstance(rows, list):
        raise FeedbackError(f"{where}: labels must be a list of {{inference_id, label}} objects")
    if not rows:
        raise FeedbackError(f"{where}: no labels")
    if len(rows) > MAX_BATCH:
        raise FeedbackError(f"{where}: {len(rows):,} labels; at most {MAX_BATCH:,} per batch")
    clean, seen = [], {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise FeedbackError(f"{where}: row {number}: not an object with inference_id and label")
        extra = sorted(set(row) - set(FIELDS))
        if extra:
            raise FeedbackError(f"{where}: row {number}: unknown field {extra[0]!r} (a label has only inference_id and "
                                "label; sensitive attributes belong in the operator's table, monitoring.field.attributes)")
        missing = [f for f in FIELDS if row.get(f) in (None, "")]
        if missing:
            raise FeedbackError(f"{where}: row {number}: {missing[0]} is missing")
        inference_id = row["inference_id"]
        if not isinstance(inference_id, str) or not INFERENCE_ID.match(inference_id):
            raise FeedbackError(f"{where}: row {number}: inference_id {str(inference_id)[:40]!r} must be 1-128 letters, "
                                "digits, '.', '_', ':' or '-'")
        if inference_id in seen:
            raise FeedbackError(f"{where}: row {number}: inference_id {inference_id!r} again (first in row "
                                f"{seen[inference_id]}); send one label per inference")
        seen[inference_id] = number
        clean.append({"inference_id": inference_id, "label": _label(row["label"], task, f"{where}: row {number}")})
    return clean


def _label(value, task: str, where: str):
    if task == "regression":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise FeedbackError(f"{where}: label {str(value)[:40]!r} is not a number (the model is a regression)") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise FeedbackError(f"{where}: label {value!r} is not a finite number")
        return number
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_LABEL_CHARS:
        return int(value) if value.lstrip("-").isdigit() else value
    raise FeedbackError(f"{where}: label {str(value)[:40]!r} is not a class (a number, or a name of at most "
                        f"{MAX_LABEL_CHARS} characters)")


def read_file(path: Path) -> list[dict]:
    """Rows of a labels file: CSV with a header (`inference_id,label`), or JSON lines (`.jsonl`,
    `.json`: one object per line, or one list)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FeedbackError(f"{path}: cannot be read: {error}") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        stripped = text.strip()
        try:
            if stripped.startswith("["):
                return json.loads(stripped)
            return [json.loads(line) for line in stripped.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise FeedbackError(f"{path}: line {error.lineno}: not JSON ({error.msg})") from None
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or [f.strip() for f in reader.fieldnames] != list(FIELDS):
        raise FeedbackError(f"{path}: the first line must be the header inference_id,label "
                            f"(got {','.join(reader.fieldnames or []) or 'nothing'})")
    rows = []
    for row in reader:
        if None in row:
            raise FeedbackError(f"{path}: line {reader.line_num}: more values than the header's two columns")
        rows.append({k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()})
    return rows


def store_labels(store: ObjectStore, model: str, rows: list[dict], received: datetime,
                 by: str | None = None) -> FeedbackReceipt:
    """Write checked rows as one object of the model's feedback (on each line the arrival time
    and who sent it)."""
    at = timestamp(received)
    sender = {"by": by} if by else {}
    body = "".join(json.dumps({**row, "received_at": at, **sender}, sort_keys=True, separators=(",", ":")) + "\n"
                   for row in rows).encode()
    digest = hashlib.sha256(body).hexdigest()[:16]
    moment = parse_timestamp(at)
    key = f"{FEEDBACK_PREFIX}/{model}/{moment:%Y-%m-%d}/{moment:%H%M%S}-{digest}.jsonl"
    uri = store.put_bytes(body, key)
    return FeedbackReceipt(model=model, labels=len(rows), received_at=at, key=key, uri=uri)


def read_labels(store: ObjectStore, model: str, since: datetime, until: datetime):
    """Labels received in [since, until): a frame of `inference_id`, `label`, `received_at`
    (UTC), with every label received (corrections included), oldest first."""
    from datetime import timedelta

    import pandas as pd

    frames = []
    day = since.date()
    while day <= until.date():
        for key in store.list_keys(f"{FEEDBACK_PREFIX}/{model}/{day:%Y-%m-%d}/"):
            if key.endswith(".jsonl"):
                frames.append(pd.read_json(io.BytesIO(store.read_bytes(key)), lines=True, dtype=False,
                                           convert_dates=False))
        day += timedelta(days=1)
    if not frames:
        return pd.DataFrame({"inference_id": pd.Series(dtype=object), "label": pd.Series(dtype=object),
                             "received_at": pd.Series(dtype="datetime64[ns, UTC]")})
    labels = pd.concat(frames, ignore_index=True)
    labels["received_at"] = pd.to_datetime(labels["received_at"], utc=True, format="ISO8601")
    labels = labels[(labels["received_at"] >= since) & (labels["received_at"] < until)]
    return labels.sort_values("received_at", kind="stable").reset_index(drop=True)
