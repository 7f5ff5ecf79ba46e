"""What every stage shares: its context, the run's spec, and its evaluation data.

A release's outputs live in the artifact store under `runs/<model>/<release key>/`
(`pipelines.identity`): the snapshot, the model, its ONNX files; its verdicts, cost, card and
summary under `runs/<model>/<release key>/evaluations/<evaluation key>/`. `resume` returns a
stage's stored output when it exists. A run keeps the keys and the spec it started with:
later stages read the spec snapshot `validate_data` stored, so an edit of the spec or the
code while a run goes on never changes or fails it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from pipelines.identity import evaluation_key
from pipelines.records import DataCheck, Record, RegisteredVersion
from pipelines.settings import Settings, get_settings
from pipelines.specs import ModelSpec, load_spec
from pipelines.storage import ObjectStore

R = TypeVar("R", bound=Record)


class ReleaseError(RuntimeError):
    """A stage cannot go on: bad data, an unfaithful export, a changed input. Not retried."""


class DataValidationError(ReleaseError):
    """The data failed its expectations."""


@dataclass
class Context:
    """What every stage needs: the validated spec, where it came from, and the environment."""

    spec: ModelSpec
    spec_path: Path
    settings: Settings
    store: ObjectStore

    def run_key(self, release_key: str, name: str) -> str:
        return f"runs/{self.spec.name}/{release_key}/{name}"

    def load_record(self, release_key: str, name: str, kind: type[R]) -> R | None:
        key = self.run_key(release_key, name)
        if not self.store.exists(key):
            return None
        return kind.model_validate_json(self.store.read_bytes(key))

    def audit_until(self) -> datetime:
        """Until when what is written now is audit evidence (`responsibleAI.auditRetentionDays`):
        the Object Lock date of a store that locks (EDGE_OBJECT_LOCK_MODE)."""
        return datetime.now(timezone.utc) + timedelta(days=self.spec.responsible_ai.audit_retention_days)

    def save_record(self, release_key: str, name: str, record: R) -> R:
        self.store.put_bytes(record.model_dump_json(indent=2, by_alias=True).encode(), self.run_key(release_key, name),
                             retain_until=self.audit_until())
        return record

    def fetch(self, uri: str) -> Path:
        return self.store.fetch(self.store.key_of(uri), self.settings.work_dir / "cache")


def evidence_store(settings: Settings) -> ObjectStore:
    """The artifact store as releases write to it: with Object Lock when the settings ask."""
    return ObjectStore(settings.store_url, settings.s3_endpoint_url, object_lock=settings.object_lock_mode)


def context(spec_path: str | Path, settings: Settings | None = None) -> Context:
    settings = settings or get_settings()
    return Context(load_spec(spec_path), Path(spec_path), settings, evidence_store(settings))


def stage_context(spec_path: str | Path, data: DataCheck, settings: Settings | None) -> Context:
    """A later stage's context, with the spec this run started with (the snapshot stored by
    `validate_data`; the file's content for a run that stored none)."""
    if not data.spec_uri:
        return context(spec_path, settings)
    settings = settings or get_settings()
    store = evidence_store(settings)
    spec = ModelSpec.model_validate_json(store.read_bytes(store.key_of(data.spec_uri)))
    return Context(spec, Path(spec_path), settings, store)


def evaluation_folder(data: DataCheck, registered: RegisteredVersion | None = None) -> str:
    """The run folder of an evaluation (verdicts, cost, card, summary): under the release that
    built the version, so a rebuild with the same bytes finds that release's evaluation of the
    same spec and evaluation code, and commits nothing new."""
    built_by = (registered.release_key if registered is not None else "") or data.release_key
    return f"{built_by}/evaluations/{evaluation_key(built_by, data.spec_sha256, data.evaluation_code)}"


def resume(spec_path: str | Path, data: DataCheck, name: str, kind: type[R],
           settings: Settings | None, registered: RegisteredVersion | None = None) -> tuple[Context, R | None]:
    """A stage's context, and its stored output (marked reused when the record has the flag);
    with `registered`, the output of an evaluation of that version (`evaluation_folder`)."""
    ctx = stage_context(spec_path, data, settings)
    folder = evaluation_folder(data, registered) if registered is not None else data.release_key
    cached = ctx.load_record(folder, name, kind)
    if cached is not None and "reused" in kind.model_fields:
        cached = cached.model_copy(update={"reused": True})
    return ctx, cached


def scratch(ctx: Context, name: str) -> Path:
    """A folder of the worker's scratch space (`<work>/<name>`) for files a stage only needs
    while it runs."""
    folder = ctx.settings.work_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- data ------------------------------------------------------------------------------------
def load_snapshot(ctx: Context, data: DataCheck):
    import pandas as pd

    frame = pd.read_parquet(ctx.fetch(data.snapshot_uri))
    return frame


def variant_outputs(ctx: Context, data: DataCheck, sha256: str, onnx_uri: str, x_test, computed=None):
    """A variant's answers on the test split, computed once per release (one batched inference
    per variant) and shared by the stages that judge it: stored under the run as
    `outputs/<the variant's sha256>.npy`. `computed` stores answers the caller already has."""
    import tempfile

    import numpy as np

    key = ctx.run_key(data.release_key, f"outputs/{sha256}.npy")
    if computed is None and ctx.store.exists(key):
        return np.load(ctx.fetch(ctx.store.uri(key)), allow_pickle=False)
    if computed is None:
        from pipelines.onnx import export as onnx_export

        computed = onnx_export.predict(ctx.fetch(onnx_uri), x_test)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outputs.npy"
        np.save(path, np.asarray(computed), allow_pickle=False)
        ctx.store.put_file(path, key)
    return computed


class _Parts(dict):
    """The split: `train`, `test`, `x_test`, `y_test`, `classes`; the training rows' prepared
    features and targets (`x_train`, `y_train`) are made when first asked for (the gates never
    need them)."""

    def __init__(self, values: dict, features: list[str], target: str, index: dict | None):
        super().__init__(values)
        self._features, self._target, self._index = features, target, index

    def __missing__(self, key: str):
        from pipelines.data import prepare_features

        if key == "x_train":
            value = prepare_features(self["train"], self._features)
        elif key == "y_train":
            column = self["train"][self._target]
            value = column.to_numpy("float64") if self._index is None else column.map(self._index).to_numpy()
        else:
            raise KeyError(key)
        self[key] = value
        return value


def _split_positions(ctx: Context, data: DataCheck, frame):
    """Row positions of the test split, computed once per release and stored with it
    (`split.npy`: the train positions, then the test positions, and the train count)."""
    import tempfile

    import numpy as np

    from pipelines.data import split

    key = ctx.run_key(data.release_key, "split.npy")
    if ctx.store.exists(key):
        return np.load(ctx.fetch(ctx.store.uri(key)), allow_pickle=False)
    positions = frame[[ctx.spec.data.target]].assign(_position=np.arange(len(frame)))
    train, test = split(positions, ctx.spec.data.target, ctx.spec.data.test_size, ctx.spec.training.seed,
                        stratified=data.task != "regression")
    stored = np.concatenate([train["_position"].to_numpy(np.int64), test["_position"].to_numpy(np.int64),
                             [len(train)]])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.npy"
        np.save(path, stored, allow_pickle=False)
        ctx.store.put_file(path, key)
    return stored


def splits(ctx: Context, data: DataCheck):
    """Train and test rows, features prepared, targets as class indices (or values, for a
    regression); deterministic (the same rows and order as `pipelines.data.split` gives)."""
    from pipelines.data import prepare_features

    frame = load_snapshot(ctx, data)
    target = ctx.spec.data.target
    stored = _split_positions(ctx, data, frame)
    n_train = int(stored[-1])
    train, test = frame.take(stored[:n_train]), frame.take(stored[n_train:-1])
    if data.task == "regression":
        return _Parts({"classes": [], "train": train, "test": test,
                       "x_test": prepare_features(test, data.features), "y_test": test[target].to_numpy("float64")},
                      data.features, target, None)
    classes = sorted(frame[target].unique().tolist())
    index = {c: i for i, c in enumerate(classes)}
    return _Parts({"classes": [str(c) for c in classes], "train": train, "test": test,
                   "x_test": prepare_features(test, data.features), "y_test": test[target].map(index).to_numpy()},
                  data.features, target, index)
