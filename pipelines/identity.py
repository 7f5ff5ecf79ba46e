"""The release's identity: what makes two releases the same model.

A release key hashes the model's own inputs and nothing else: the data's content, the spec
fields that shape the model (`ModelSpec.model_digest`), the source of the folders whose code
shapes a model (`MODEL_CODE`, a fixed list), and the installed versions of the libraries
that train, convert and quantize it (`ML_LIBRARIES`). Editing the device agent, the UI, the
DAGs, the command line or the service tooling never changes it.

An evaluation key adds what decides and deploys a model (the whole spec, and the code of
`EVALUATION_CODE`): the gates run again when it changes, while the model, its ONNX bytes and
its registry version stay those of the release key.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE.parent

# Folders of `pipelines/` whose code shapes the model: reading and preparing the data,
# training, ONNX export and quantization.
MODEL_CODE = ("data", "training", "onnx")
# Folders whose code judges, prices or packages a model (gates, FinOps, the stages).
EVALUATION_CODE = ("gates", "finops", "release")
# Libraries whose version can change a trained or converted model's bytes.
ML_LIBRARIES = ("numpy", "pandas", "scikit-learn", "torch", "onnx", "onnxruntime", "onnxscript", "skl2onnx",
                "xgboost-cpu", "lightgbm", "onnxmltools")


@functools.cache
def code_digest(folders: tuple[str, ...] = MODEL_CODE, package: Path = PACKAGE) -> str:
    """sha256 over the Python source of `folders` of the package (paths and bytes)."""
    digest = hashlib.sha256()
    for folder in folders:
        root = package / folder
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(package).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def library_versions() -> dict[str, str]:
    """Installed versions of `ML_LIBRARIES` (a library that is not installed is left out)."""
    found = {}
    for name in ML_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def files_digest(paths: list[Path], root: Path) -> str:
    """sha256 over files (their paths relative to `root`, and their bytes): a data scientist's
    training code, which shapes the model as much as the spec does."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def release_key(data_sha256: str, model_sha256: str, salt: str = "") -> str:
    """The release's identity from the data's fingerprint and the spec's model digest. A forced
    retrain adds a salt (its run id): a new identity for the same inputs, stable across that
    run's retries."""
    libraries = ",".join(f"{k}={v}" for k, v in sorted(library_versions().items()))
    text = f"{data_sha256}:{model_sha256}:{code_digest()}:{libraries}" + (f":{salt}" if salt else "")
    return hashlib.sha256(text.encode()).hexdigest()


def evaluation_key(release_key: str, spec_sha256: str, evaluation_code: str) -> str:
    """Where a release's gate verdicts, cost, card and summary live: the release key, the whole
    spec and the evaluation code's digest (`code_digest(EVALUATION_CODE)`)."""
    text = f"{release_key}:{spec_sha256}:{evaluation_code}"
    return hashlib.sha256(text.encode()).hexdigest()


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
