"""What every stage shares: the release's identity, its context, and its evaluation data.

The release key hashes the data's content, the spec's canonical JSON and the domain
library's source. Stage outputs live in the artifact store under
`runs/<model>/<release key>/`; `resume` returns a stage's stored output when it exists.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pipelines.records import DataCheck, Record
from pipelines.settings import PROJECT_ROOT, Settings, get_settings
from pipelines.specs import ModelSpec, load_spec
from pipelines.storage import ObjectStore

R = TypeVar("R", bound=Record)


class ReleaseError(RuntimeError):
    """A stage cannot go on: bad data, an unfaithful export, a changed input. Not retried."""


class DataValidationError(ReleaseError):
    """The data failed its expectations."""


# Modules that never shape what a release produces (the UI's read models, the local process
# runner and the native production stack, the demo driver, the drift monitor, the command
# line): changing them must not make every model's next run retrain. Everything else under
# pipelines/ is release code.
NOT_RELEASE_CODE = frozenset({"views.py", "airflow_local.py", "prod_stack.py", "demo_loop.py", "monitor.py",
                              "__main__.py"})


@functools.cache
def code_digest() -> str:
    """sha256 over the release code's source: a release key changes when that code does."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).as_posix() in NOT_RELEASE_CODE:
            continue
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def code_revision() -> str:
    """The Git revision of the project, when it runs from a checkout ('unknown' otherwise)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipelines"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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

    def save_record(self, release_key: str, name: str, record: R) -> R:
        self.store.put_bytes(record.model_dump_json(indent=2, by_alias=True).encode(), self.run_key(release_key, name))
        return record

    def fetch(self, uri: str) -> Path:
        return self.store.fetch(self.store.key_of(uri), self.settings.work_dir / "cache")


def context(spec_path: str | Path, settings: Settings | None = None) -> Context:
    settings = settings or get_settings()
    return Context(load_spec(spec_path), Path(spec_path), settings,
                   ObjectStore(settings.store_url, settings.s3_endpoint_url))


def check_same_inputs(ctx: Context, data: DataCheck) -> None:
    key = release_key(data.sha256, ctx.spec.digest(), data.salt)
    if key != data.release_key:
        raise ReleaseError(
            f"{ctx.spec_path}: the spec or the code changed after validate_data ran "
            f"(release key {key[:12]} != {data.release_key[:12]}); start a new release"
        )


def stage_context(spec_path: str | Path, data: DataCheck, settings: Settings | None) -> Context:
    """A later stage's context, after checking that the spec and code are those validated."""
    ctx = context(spec_path, settings)
    check_same_inputs(ctx, data)
    return ctx


def resume(spec_path: str | Path, data: DataCheck, name: str, kind: type[R],
           settings: Settings | None) -> tuple[Context, R | None]:
    """A stage's context, and its stored output (marked reused when the record has the flag)."""
    ctx = stage_context(spec_path, data, settings)
    cached = ctx.load_record(data.release_key, name, kind)
    if cached is not None and "reused" in kind.model_fields:
        cached = cached.model_copy(update={"reused": True})
    return ctx, cached


def release_key(data_sha256: str, spec_sha256: str, salt: str = "") -> str:
    """The release's identity. A forced retrain adds a salt (its run id): a new identity for
    the same inputs, stable across that run's retries."""
    text = f"{data_sha256}:{spec_sha256}:{code_digest()}" + (f":{salt}" if salt else "")
    return hashlib.sha256(text.encode()).hexdigest()


# -- data ------------------------------------------------------------------------------------
def load_snapshot(ctx: Context, data: DataCheck):
    import pandas as pd

    frame = pd.read_parquet(ctx.fetch(data.snapshot_uri))
    return frame


def splits(ctx: Context, data: DataCheck):
    """Train and test rows, features prepared, targets as class indices; deterministic."""
    from pipelines.data import prepare_features, split

    frame = load_snapshot(ctx, data)
    target = ctx.spec.data.target
    classes = sorted(frame[target].unique().tolist())
    index = {c: i for i, c in enumerate(classes)}
    train, test = split(frame, target, ctx.spec.data.test_size, ctx.spec.training.seed)
    return {
        "classes": [str(c) for c in classes],
        "train": train, "test": test,
        "x_train": prepare_features(train, data.features), "y_train": train[target].map(index).to_numpy(),
        "x_test": prepare_features(test, data.features), "y_test": test[target].map(index).to_numpy(),
    }
