"""Models trained elsewhere (`model.source`): an ONNX file, or a model in an MLflow registry.

`fetch` brings the model here and says where it came from: the URI as written, what it
resolved to (an MLflow alias moves; the version it pointed to does not), and the sha256 of
the bytes. A `model.checksum` must match the fetched ONNX file, or nothing goes further.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.specs import ModelSourceSpec
from pipelines.storage import ObjectStore, sha256_file


class SourceError(ValueError):
    """The model source cannot be read or does not match its checksum; one line naming it."""


@dataclass
class Imported:
    """A fetched model: an ONNX file (`onnx_path`) or a native one (`native`, with its framework)."""

    framework: str  # "onnx", "sklearn" or "torch"
    onnx_path: Path | None = None
    native: object = None
    provenance: dict[str, str] = field(default_factory=dict)


def _mlflow_resolved(uri: str, tracking_uri: str) -> tuple[str, dict[str, str]]:
    """A models:/ URI pinned to its version (an alias or a stage moves); runs:/ URIs are pinned."""
    if not uri.startswith("models:/"):
        return uri, {}
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, _, rest = uri.removeprefix("models:/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif rest.isdigit():
        version = client.get_model_version(name, rest)
    else:
        raise SourceError(f"model.source: {uri}: name a version (models:/name/3) or an alias (models:/name@champion)")
    return f"models:/{name}/{version.version}", {"mlflow_run_id": version.run_id or "",
                                                  "mlflow_version": str(version.version)}


def identity(spec: ModelSourceSpec, folder: Path, tracking_uri: str, store_endpoint: str | None,
             cache: Path) -> str:
    """What the source is now, as a digest: the file's sha256, or the pinned MLflow URI."""
    if spec.is_mlflow:
        try:
            pinned, info = _mlflow_resolved(spec.source, tracking_uri)
        except SourceError:
            raise
        except Exception as error:  # MLflow raises its own types
            raise SourceError(f"model.source: {spec.source}: {' '.join(str(error).split())[:200]}") from None
        return hashlib.sha256(f"{pinned}:{info.get('mlflow_run_id', '')}".encode()).hexdigest()
    return sha256_file(_onnx_file(spec, folder, store_endpoint, cache))


def _onnx_file(spec: ModelSourceSpec, folder: Path, store_endpoint: str | None, cache: Path) -> Path:
    source = spec.source
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        try:
            path = ObjectStore(f"s3://{bucket}", store_endpoint).get_file(key, cache / "source" / Path(key).name)
        except Exception as error:  # the store's own errors, already one line
            raise SourceError(f"model.source: {source}: {' '.join(str(error).split())[:200]}") from None
    else:
        path = Path(source.removeprefix("file://"))
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise SourceError(f"model.source: {source}: no such file")
    if spec.checksum is not None:
        digest = sha256_file(path)
        if f"sha256:{digest}" != spec.checksum:
            raise SourceError(f"model.checksum: {source} has sha256:{digest}, the spec says {spec.checksum}")
    return path


def fetch(spec: ModelSourceSpec, folder: Path, tracking_uri: str, store_endpoint: str | None,
          work: Path) -> Imported:
    """The model the spec names, here, with its provenance."""
    if not spec.is_mlflow:
        path = _onnx_file(spec, folder, store_endpoint, work)
        local = work / "imported.onnx"
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, local)
        return Imported("onnx", onnx_path=local,
                        provenance={"source": spec.source, "kind": "onnx", "sha256": sha256_file(path)})
    try:
        return _fetch_mlflow(spec, tracking_uri, work)
    except SourceError:
        raise
    except Exception as error:  # MLflow raises its own types
        raise SourceError(f"model.source: {spec.source}: {' '.join(str(error).split())[:200]}") from None


def _fetch_mlflow(spec: ModelSourceSpec, tracking_uri: str, work: Path) -> Imported:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    pinned, info = _mlflow_resolved(spec.source, tracking_uri)
    flavors = mlflow.models.get_model_info(pinned).flavors
    provenance = {"source": spec.source, "resolved": pinned, **info}
    if "onnx" in flavors:
        folder = Path(mlflow.artifacts.download_artifacts(pinned, dst_path=str(work / "mlflow")))
        files = sorted(folder.rglob("*.onnx"))
        if len(files) != 1:
            raise SourceError(f"model.source: {spec.source}: expected one .onnx file in the model, found {len(files)}")
        local = work / "imported.onnx"
        shutil.copyfile(files[0], local)
        return Imported("onnx", onnx_path=local, provenance={**provenance, "kind": "mlflow-onnx",
                                                              "sha256": sha256_file(local)})
    if "sklearn" in flavors:
        return Imported("sklearn", native=mlflow.sklearn.load_model(pinned), provenance={**provenance,
                                                                                        "kind": "mlflow-sklearn"})
    if "pytorch" in flavors:
        return Imported("torch", native=mlflow.pytorch.load_model(pinned).eval(),
                        provenance={**provenance, "kind": "mlflow-pytorch"})
    raise SourceError(f"model.source: {spec.source}: flavors {', '.join(sorted(flavors))}; releasable are onnx, "
                      "sklearn and pytorch")
