"""Render a release as Kubernetes-style manifests laid out for Flux / kustomize.

One model owns `apps/<model>/`:

    apps/<model>/kustomization.yaml                     every overlay (the whole app)
    apps/<model>/base/kustomization.yaml
    apps/<model>/base/mobileaimodeldeployment.yaml      what is shipped, targets nothing
    apps/<model>/overlays/<group>/kustomization.yaml    one device group each

The base carries everything shared by the device groups (the artifact, its checksum,
resources, responsible-AI thresholds, evaluation evidence). Each overlay only adds what
differs per group: which devices it selects, the group's latency objective, and its own
resources where the spec gives it some (`targets[].resources`). Output is
deterministic: the same spec and inputs give byte-identical files.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from pipelines.records import Record
from pipelines.settings import Settings, get_settings
from pipelines.specs import ModelSpec

API_VERSION = "apexlogic.dev/v1alpha1"
KIND = "MobileAIModelDeployment"
KUSTOMIZE_API_VERSION = "kustomize.config.k8s.io/v1beta1"
MANIFEST_FILE = "mobileaimodeldeployment.yaml"
DEVICE_GROUP_LABEL = "apexlogic.dev/device-group"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class ManifestInputs(Record):
    """What a release adds to the spec: the artifact, its identity and its evidence."""

    model_version: str = Field(min_length=1)
    mlflow_run_id: str
    release_key: str
    source_uri: str
    sha256: str = Field(description="Hex digest of the shipped file.")
    size_bytes: int = Field(ge=0)
    variant: Literal["fp32", "dynamic", "static"]
    signature_uri: str | None = None
    metrics: dict[str, float]
    verdicts: list[dict] = Field(
        default_factory=list, description="Brief gate verdicts: gate, passed, waived, reason."
    )
    cost: dict | None = None
    model_card_uri: str | None = None
    model_card_sha256: str | None = None
    group_variants: dict[str, dict] = Field(
        default_factory=dict,
        description="Device group -> {variant, sourceUri, sha256, sizeBytes} where it ships another variant.",
    )
    rollout: dict | None = Field(
        None, description="Canary progress {share, step, steps, previousVersion}; None: every selected device.")
    training: dict | None = Field(
        None, description="How a federated model was trained, with its differential privacy "
                          "(`training_block`); None: trained centrally.")
    explain_endpoint: str | None = Field(
        None, description="The explain route of Edge Releases for this model; None: `explain_endpoint` under the "
                          "environment's settings.")

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.lower().removeprefix("sha256:")
        if not _SHA256.match(value):
            raise ValueError("sha256 must be 64 hexadecimal characters")
        return value


def label_value(text: str) -> str:
    """`text` as a valid Kubernetes label value ('@' becomes '_at_', at most 63 characters)."""
    value = text.replace("@", "_at_")
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63]
    # A value must start and end with an alphanumeric character.
    value = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)
    return value


def _number(value: float) -> int | float:
    # 20.0 renders as 20: a YAML diff should show meaning, not float formatting.
    return int(value) if float(value).is_integer() else value


def _number_text(value: float) -> str:
    return str(_number(value))


def _canonical(value: Any) -> Any:
    """Free-form data (verdicts, cost) with sorted keys, so key order never depends on callers."""
    if isinstance(value, dict):
        return {str(k): _canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _compact(mapping: dict) -> dict:
    return {k: v for k, v in mapping.items() if v is not None}


class _Dumper(yaml.SafeDumper):
    """Block style, indented sequences, literal blocks for multi-line strings."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def dump(document: Any) -> str:
    """A manifest as the YAML the repository holds (stable key order, block style)."""
    return yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=4096,
    )


def _kustomization(**fields: Any) -> dict:
    return {"apiVersion": KUSTOMIZE_API_VERSION, "kind": "Kustomization", **fields}


def _resources(spec: ModelSpec, group=None) -> dict:
    """The spec-wide resources, or a device group's (its own values over the spec-wide ones)."""
    resources = spec.resources if group is None else group.resources_over(spec.resources)
    dumped = resources.model_dump(mode="json", by_alias=True)
    out = {}
    for section in ("requests", "limits"):
        values = _compact(dumped.get(section) or {})
        if values:
            out[section] = values
    return out


def explain_endpoint(model: str, settings: Settings | None = None) -> str:
    """Where a model's inputs are explained one at a time: the explain route of Edge Releases."""
    return (settings or get_settings()).edge_link(f"/api/models/{model}/explain")


def training_block(federated) -> dict | None:
    """`spec.responsibleAI.training` of a federated model (a `FederatedTraining` record): the
    federation's shape and the (epsilon, delta) its differential privacy spent."""
    if federated is None:
        return None
    block: dict[str, Any] = {"mode": "federated", "strategy": federated.strategy, "rounds": federated.rounds,
                             "clients": federated.clients}
    if federated.worst_client:
        block["worstClientAccuracy"] = _number(round(federated.worst_client["accuracy"], 6))
    if federated.privacy is not None:
        dp = federated.privacy
        block["differentialPrivacy"] = {"mechanism": dp.mechanism, "epsilon": _number(round(dp.epsilon, 4)),
                                        "delta": _number(dp.delta), "noiseMultiplier": _number(dp.noise_multiplier),
                                        "maxGradNorm": _number(dp.max_grad_norm), "accountant": dp.accountant}
    return block


def _responsible_ai(spec: ModelSpec, inputs: ManifestInputs) -> dict:
    rai = spec.responsible_ai.model_dump(mode="json", by_alias=True)
    block = {
        "explainability": {"method": rai["explainability"]["method"],
                           "endpoint": inputs.explain_endpoint or explain_endpoint(spec.name)},
        "fairness": {k: _number(v) for k, v in _compact(rai["fairness"]).items()},
        "auditRetentionDays": rai["auditRetentionDays"],
    }
    if inputs.training is not None:
        block["training"] = _canonical(inputs.training)
    return block


def _deployment_strategy(spec: ModelSpec) -> dict:
    strategy = spec.deployment_strategy.model_dump(mode="json", by_alias=True, exclude_none=True)
    if "canary" in strategy:
        strategy["canary"]["analysis"] = {k: _number(v) for k, v in strategy["canary"]["analysis"].items()}
    return strategy


def _telemetry(spec: ModelSpec) -> dict:
    """What devices report (they read it from the manifest)."""
    telemetry = spec.telemetry.model_dump(mode="json", by_alias=True, exclude_none=True)
    telemetry["sampleRate"] = _number(telemetry["sampleRate"])
    if "privacy" in telemetry:
        telemetry["privacy"] = {"epsilon": _number(telemetry["privacy"]["epsilon"])}
    return telemetry


def _base_manifest(spec: ModelSpec, inputs: ManifestInputs) -> dict:
    model_ref: dict[str, Any] = {
        "name": spec.name,
        "version": inputs.model_version,
        "sourceUri": inputs.source_uri,
        "checksum": f"sha256:{inputs.sha256}",
        "sizeBytes": inputs.size_bytes,
        "format": "onnx",
        "variant": inputs.variant,
    }
    if inputs.signature_uri:
        model_ref["signatureRef"] = {"uri": inputs.signature_uri}
    if inputs.model_card_uri:
        model_ref["modelCard"] = {"uri": inputs.model_card_uri, "checksum": f"sha256:{inputs.model_card_sha256}"}
    evaluation = {
        "metrics": {k: _number(round(inputs.metrics[k], 6)) for k in sorted(inputs.metrics)},
        "verdicts": _canonical(inputs.verdicts),
    }
    body: dict[str, Any] = {
        "modelRef": model_ref,
        "resources": _resources(spec),
        "responsibleAI": _responsible_ai(spec, inputs),
        "deploymentStrategy": _deployment_strategy(spec),
        "telemetry": _telemetry(spec),
        "evaluation": evaluation,
    }
    if inputs.rollout is not None:
        body["rollout"] = _canonical(inputs.rollout)
    if inputs.cost is not None:
        body["cost"] = _canonical(inputs.cost)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "labels": {
                "app.kubernetes.io/name": spec.name,
                "app.kubernetes.io/version": label_value(inputs.model_version),
                "finops.apexlogic.dev/cost-center": spec.finops.cost_center,
                "finops.apexlogic.dev/project": spec.finops.project,
                "finops.apexlogic.dev/owner": label_value(spec.owner),
            },
            "annotations": {
                "apexlogic.dev/release-key": inputs.release_key,
                "apexlogic.dev/mlflow-run-id": inputs.mlflow_run_id,
                "finops.apexlogic.dev/monthly-budget-usd": _number_text(
                    spec.finops.monthly_budget_usd
                ),
            },
        },
        "spec": body,
    }


def _overlay(spec: ModelSpec, group_index: int, inputs: ManifestInputs | None = None) -> dict:
    group = spec.targets[group_index]
    # JSON6902 rather than a strategic-merge patch: kustomize has no schema for this kind,
    # and `op: add` states exactly which fields the overlay owns.
    operations: list[dict[str, Any]] = [
        {
            "op": "add",
            "path": "/metadata/labels/" + DEVICE_GROUP_LABEL.replace("~", "~0").replace("/", "~1"),
            "value": group.name,
        },
        {
            "op": "add",
            "path": "/spec/targetDevices",
            "value": {
                "group": group.name,
                "selector": {
                    "matchLabels": {
                        k: group.selector.match_labels[k] for k in sorted(group.selector.match_labels)
                    }
                },
            },
        },
    ]
    if group.latency_slo_ms is not None:
        operations.append(
            {"op": "add", "path": "/spec/slo", "value": {"latencyP95Ms": _number(group.latency_slo_ms)}}
        )
    if group.resources is not None:
        # The group's own requests/limits (targets[].resources over the spec-wide ones): the
        # overlay owns the whole block for the group; the base keeps the spec-wide one.
        operations.append({"op": "replace", "path": "/spec/resources", "value": _resources(spec, group)})
    override = (inputs.group_variants if inputs else {}).get(group.name)
    if override:
        # This group ships another quantization variant than the base (its devices run it
        # cheaper within the SLO): the overlay owns the artifact reference for the group.
        operations += model_ref_operations(override)
    return _kustomization(
        resources=["../../base"],
        nameSuffix=f"-{group.name}",
        patches=[
            {
                "target": {
                    "group": API_VERSION.split("/")[0],
                    "version": API_VERSION.split("/")[1],
                    "kind": KIND,
                    "name": spec.name,
                },
                "patch": dump(operations),
            }
        ],
    )


def model_ref_operations(override: dict) -> list[dict[str, Any]]:
    """The overlay's JSON patch operations that make a device group run another variant:
    `override` is {variant, sourceUri, sha256, sizeBytes[, signatureUri]}."""
    operations: list[dict[str, Any]] = [
        {"op": "replace", "path": f"/spec/modelRef/{key}", "value": value}
        for key, value in (("variant", override["variant"]), ("sourceUri", override["sourceUri"]),
                           ("checksum", f"sha256:{override['sha256']}"), ("sizeBytes", override["sizeBytes"]))]
    if override.get("signatureUri"):
        operations.append({"op": "replace", "path": "/spec/modelRef/signatureRef",
                           "value": {"uri": override["signatureUri"]}})
    return operations


def with_group_variant(overlay: str, override: dict | None) -> str:
    """A device group's overlay (kustomization.yaml text) running `override` instead of the
    variant it names now; None: the base manifest's variant. The other operations stay as they are."""
    doc = yaml.safe_load(overlay)
    patch = doc["patches"][0]
    operations = yaml.safe_load(patch["patch"])
    ours = [i for i, op in enumerate(operations) if op["path"].startswith("/spec/modelRef/")]
    at = ours[0] if ours else len(operations)
    kept = [op for op in operations if not op["path"].startswith("/spec/modelRef/")]
    patch["patch"] = dump(kept[:at] + (model_ref_operations(override) if override else []) + kept[at:])
    return dump(doc)


def overlay_path(model: str, group: str) -> str:
    """A device group's overlay of the model, relative to the repository root."""
    return f"apps/{model}/overlays/{group}/kustomization.yaml"


def base_manifest_path(model: str) -> str:
    """The model's base manifest, relative to the repository root."""
    return f"apps/{model}/base/{MANIFEST_FILE}"


def render_release_files(spec: ModelSpec, inputs: ManifestInputs) -> dict[str, str]:
    """Every file of `apps/<model>/` for this release, by path relative to the repo root."""
    app = f"apps/{spec.name}"
    files = {
        f"{app}/kustomization.yaml": dump(
            _kustomization(resources=[f"overlays/{group.name}" for group in spec.targets])
        ),
        f"{app}/base/kustomization.yaml": dump(_kustomization(resources=[MANIFEST_FILE])),
        base_manifest_path(spec.name): dump(_base_manifest(spec, inputs)),
    }
    for index, group in enumerate(spec.targets):
        files[overlay_path(spec.name, group.name)] = dump(_overlay(spec, index, inputs))
    return dict(sorted(files.items()))


def read_manifest(text: str) -> dict:
    """The one MobileAIModelDeployment in `text` (a base file or a rendered overlay)."""
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    found = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(found) != 1:
        raise ValueError(f"expected exactly one {KIND}, found {len(found)}")
    return found[0]


def manifest_checksum(doc: dict) -> str:
    """The hex sha256 in `spec.modelRef.checksum`."""
    try:
        checksum = doc["spec"]["modelRef"]["checksum"]
    except (KeyError, TypeError):
        raise ValueError("manifest has no spec.modelRef.checksum") from None
    algorithm, _, digest = str(checksum).partition(":")
    if algorithm != "sha256" or not _SHA256.match(digest):
        raise ValueError(f"checksum {checksum!r} is not of the form sha256:<hex>")
    return digest
