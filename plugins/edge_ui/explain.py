"""The explain route's read model: one input explained with the variant the GitOps repository
deploys to a device group, as `POST /edge/api/models/<model>/explain` answers it.

- `read_body`: the request body, at most MAX_BODY_BYTES, as JSON.
- `explain_input`: the body checked field by field (`ExplainRefused` names what is wrong), the
  deployment found (`views.UnknownModel` when nothing deploys the model), the deployed file
  fetched and checked against its manifest's checksum, the background read from the training
  rows of the release that built the version (seeded, cached per version), and the input
  explained with `pipelines.gates.explain.local_explanations`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from edge_ui import views
from pipelines.gates.explain import LOCAL_METHODS, ExplanationError, LocalExplanation, ModelInputs, local_method
from pipelines.records import Record
from pipelines.settings import Settings
from pipelines.specs import DNS_LABEL

MAX_BODY_BYTES = 64 * 1024
MAX_TOP = 100
BODY_FIELDS = ("inputs", "group", "method", "top")
_CACHED_VERSIONS = 8  # deployed versions whose model file and background stay in memory


class ExplainRefused(ValueError):
    """A request the route cannot answer; the message is the one-line reason (HTTP 400)."""


class ExplainAnswer(Record):
    """One input explained with the deployed variant of a device group."""

    model: str
    version: str
    variant: str
    group: str | None = Field(None, description="The device group whose variant explained the input; None: the base.")
    task: str
    explanation: LocalExplanation
    background_rows: int = Field(description="Training rows of the version the explainer perturbed from.")
    latency_ms: float = Field(description="Time to explain the input: the explainer and the model's answers.")
    request_ms: float = Field(description="Time to answer the request: finding the deployment, its file and "
                                          "background (cached per version), then the explanation.")


@dataclass(frozen=True)
class _Request:
    inputs: dict
    group: str | None
    method: str | None
    top: int


@dataclass(frozen=True)
class _Deployed:
    """What a device group (or the base) runs, per the tip of the GitOps branch."""

    version: str
    variant: str
    source_uri: str
    sha256: str
    release_key: str
    group: str | None


@dataclass
class _Version:
    """A deployed file and its background, loaded once."""

    path: Path
    model: ModelInputs
    task: str
    background: object  # a data frame of raw feature columns


async def read_body(chunks: AsyncIterator[bytes], length: str | None) -> dict:
    """The body as a JSON object, refused past MAX_BODY_BYTES without reading further."""
    from edge_ui.bodies import read_bounded

    data = await read_bounded(chunks, length, MAX_BODY_BYTES,
                              ExplainRefused(f"the body is larger than {MAX_BODY_BYTES} bytes"))
    try:
        body = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise ExplainRefused(f"the body is not JSON: {str(error).splitlines()[0][:120]}") from None
    if not isinstance(body, dict):
        raise ExplainRefused('the body must be a JSON object: {"inputs": {feature: value, ...}}')
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _request(body: dict) -> _Request:
    unknown = sorted(set(body) - set(BODY_FIELDS))
    if unknown:
        raise ExplainRefused(f"unknown field {unknown[0]!r} in the body (fields: {', '.join(BODY_FIELDS)})")
    inputs = body.get("inputs")
    if not isinstance(inputs, dict):
        raise ExplainRefused('"inputs" must be an object of feature -> value')
    group, method, top = body.get("group"), body.get("method"), body.get("top", 10)
    if group is not None and (not isinstance(group, str) or not DNS_LABEL.match(group)):
        raise ExplainRefused('"group" must name a device group')
    if method is not None and method not in LOCAL_METHODS:
        raise ExplainRefused(f'"method" must be one of {", ".join(LOCAL_METHODS)}')
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise ExplainRefused(f'"top" must be a whole number from 1 to {MAX_TOP}')
    return _Request(inputs, group, method, top)


def _input_frame(inputs: dict, model: ModelInputs):
    """The input as a one-row frame of the model's features; every feature present, none
    unknown, numbers where the model takes numbers and text where it takes text (null: missing)."""
    import pandas as pd

    unknown = sorted(set(inputs) - set(model.features))
    if unknown:
        raise ExplainRefused(f"unknown feature {unknown[0]!r} (the model takes {len(model.features)} features)")
    missing = [f for f in model.features if f not in inputs]
    if missing:
        raise ExplainRefused(f"inputs lack feature {missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                                      if len(missing) > 1 else ""))
    row = {}
    for name in model.features:
        value = inputs[name]
        if value is None:
            row[name] = None
        elif name in model.text:
            if not isinstance(value, str):
                raise ExplainRefused(f"feature {name!r} takes text, not {json.dumps(value)[:40]}")
            row[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ExplainRefused(f"feature {name!r} takes a number, not {json.dumps(value)[:40]}")
            row[name] = float(value)
    return pd.DataFrame([row], columns=model.features).astype(
        {name: "float64" for name in model.features if name not in model.text})


# -- the deployment ---------------------------------------------------------------------------------
def _deployed(model: str, group: str | None, settings: Settings) -> _Deployed:
    """The artifact a device group runs (the base's when no group is named)."""
    from pipelines.edge import desired
    from pipelines.gitops.manifest import manifest_checksum

    state = views._gitops(settings)
    base = state.bases.get(model)
    if base is None:
        raise views.UnknownModel(model)
    obj = base
    if group is not None:
        groups = {desired.group_of(o): o for o in state.objects.get(model, [])}
        if group not in groups:
            raise ExplainRefused(f"no device group {group!r} runs {model} (groups: {', '.join(sorted(groups))})")
        obj = groups[group]
    ref = obj["spec"]["modelRef"]
    key = ((obj.get("metadata") or {}).get("annotations") or {}).get("apexlogic.dev/release-key", "")
    return _Deployed(version=str(ref["version"]), variant=str(ref["variant"]), source_uri=str(ref["sourceUri"]),
                     sha256=manifest_checksum(obj), release_key=str(key), group=group)


def _spec_settings(model: str, settings: Settings) -> tuple[str, int, int]:
    """The model spec's explainability method, background rows and seed (defaults without a spec)."""
    from pipelines.specs import ExplainabilitySpec

    path = views._specs(settings).get(model)
    spec = views._load_spec(path)[0] if path else None
    how = spec.responsible_ai.explainability if spec else ExplainabilitySpec()
    return how.method, how.background_rows, spec.training.seed if spec else 0


_cache: dict[tuple, _Version] = {}
_lock = threading.Lock()


def _version(model: str, deployed: _Deployed, rows: int, seed: int, settings: Settings) -> _Version:
    """The deployed file (checked against the manifest's checksum) and `rows` training rows of
    the release that built it, loaded once per version and kept for the next requests."""
    key = (str(settings.store_url), model, deployed.sha256, deployed.release_key, rows, seed)
    with _lock:
        found = _cache.get(key)
    if found is None:
        found = _load_version(model, deployed, rows, seed, settings)
        with _lock:
            while len(_cache) >= _CACHED_VERSIONS:
                _cache.pop(next(iter(_cache)))
            _cache[key] = found
    return found


def _load_version(model: str, deployed: _Deployed, rows: int, seed: int, settings: Settings) -> _Version:
    import numpy as np
    import pandas as pd

    from pipelines.onnx.export import session
    from pipelines.storage import StoreError, sha256_file

    store = views._store(settings)
    try:
        path = store.fetch(store.key_of(deployed.source_uri), settings.work_dir / "cache")
    except (StoreError, ValueError) as error:
        raise ExplainRefused(f"{model} v{deployed.version}: the deployed file is not readable: {error}") from None
    if sha256_file(path) != deployed.sha256:
        raise ExplainRefused(f"{model} v{deployed.version}: {deployed.source_uri} does not match its checksum")
    inputs = ModelInputs.of(path)
    task = session(path).get_modelmeta().custom_metadata_map.get("edge.task", "binary")
    folder = f"runs/{model}/{deployed.release_key}"
    if not deployed.release_key or not store.exists(f"{folder}/data.parquet"):
        raise ExplainRefused(f"{model} v{deployed.version}: the training rows of its release are not in the store")
    frame = pd.read_parquet(store.fetch(f"{folder}/data.parquet", settings.work_dir / "cache"))
    if store.exists(f"{folder}/split.npy"):  # the training rows: split.npy holds train positions, test, then the count
        positions = np.load(store.fetch(f"{folder}/split.npy", settings.work_dir / "cache"), allow_pickle=False)
        frame = frame.take(positions[:int(positions[-1])])
    background = frame[inputs.features].sample(n=min(rows, len(frame)), random_state=seed)
    return _Version(path=path, model=inputs, task=task, background=background)


# -- the route ------------------------------------------------------------------------------------
def explain_input(model: str, body: dict, settings: Settings | None = None) -> ExplainAnswer:
    """Explain the input of `body` with the variant `body["group"]` runs (the base's without a
    group), in `body["method"]` or the spec's (permutation importance explains single inputs
    with LIME)."""
    from pipelines.gates.explain import local_explanations

    started = time.perf_counter()
    settings = views._settings(settings)
    views.check_model_name(model)
    request = _request(body)
    spec_method, rows, seed = _spec_settings(model, settings)
    if request.method is None and spec_method == "none":
        raise ExplainRefused(f"{model}'s spec asks for no explanations (responsibleAI.explainability.method: none); "
                             f'name a "method" to explain anyway')
    method = request.method or local_method(spec_method)
    deployed = _deployed(model, request.group, settings)
    version = _version(model, deployed, rows, seed, settings)
    frame = _input_frame(request.inputs, version.model)
    explaining = time.perf_counter()
    try:
        [found] = local_explanations(version.path, frame, version.background, method, version.task, seed,
                                     top=request.top)
    except ExplanationError as error:
        raise ExplainRefused(str(error)) from None
    done = time.perf_counter()
    return ExplainAnswer(model=model, version=deployed.version, variant=deployed.variant, group=deployed.group,
                         task=version.task, explanation=found, background_rows=len(version.background),
                         latency_ms=round((done - explaining) * 1000, 2), request_ms=round((done - started) * 1000, 2))
