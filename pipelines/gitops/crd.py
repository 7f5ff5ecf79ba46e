"""The MobileAIModelDeployment CRD, its validation, and the GitOps repository skeleton.

`crd_document()` is the CustomResourceDefinition clusters install from `crds/`; its
openAPIV3Schema describes exactly what `manifest.render_release_files` produces, so a
rendered overlay can be checked offline with `validate_object` before it is committed.
`cluster_files` and `skeleton_files` give the Flux entry points and the files a new
GitOps repository starts with.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, get_args

from pipelines.gitops.manifest import API_VERSION, KIND, dump
from pipelines.specs import DNS_LABEL, ExplanationMethod

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "mobileaimodeldeployments"
SINGULAR = "mobileaimodeldeployment"
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_PATH = f"crds/{CRD_NAME}.yaml"

FLUX_API_VERSION = "kustomize.toolkit.fluxcd.io/v1"
FLUX_NAMESPACE = "flux-system"
SOURCE_NAME = "edge-gitops"
TARGET_NAMESPACE = "edge-models"
CRDS_KUSTOMIZATION = "edge-crds"
DEFAULT_CLUSTER = "edge-default"

_VARIANTS = ["fp32", "dynamic", "static"]
_CHECKSUM = r"^sha256:[0-9a-f]{64}$"
# The pattern Kubernetes publishes for resource.Quantity.
_QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_COUNT_OR_PERCENT = r"^[0-9]+%?$"
_DURATION = r"^[0-9]+(s|m|h|d)$"
_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _string(description: str | None = None, **rules: Any) -> dict:
    node: dict[str, Any] = {"type": "string"}
    if description:
        node["description"] = description
    return {**node, **rules}


def _number(**rules: Any) -> dict:
    return {"type": "number", **rules}


def _integer(**rules: Any) -> dict:
    return {"type": "integer", **rules}


def _object(properties: dict, required: list[str] | None = None, description: str | None = None) -> dict:
    node: dict[str, Any] = {"type": "object"}
    if description:
        node["description"] = description
    if required:
        node["required"] = required
    node["properties"] = properties
    return node


def _map(values: dict, description: str | None = None, **rules: Any) -> dict:
    node: dict[str, Any] = {"type": "object"}
    if description:
        node["description"] = description
    return {**node, **rules, "additionalProperties": values}


def _model_ref() -> dict:
    return _object(
        {
            "name": _string("Model name (the spec's name).", minLength=1),
            "version": _string("Registered model version.", minLength=1),
            "sourceUri": _string("Where devices download the ONNX file.", minLength=1),
            "checksum": _string("sha256 of the file at sourceUri.", pattern=_CHECKSUM),
            "sizeBytes": _integer(minimum=0),
            "format": _string(enum=["onnx"]),
            "variant": _string("Quantization variant of the file.", enum=_VARIANTS),
            "signatureRef": _object({"uri": _string(minLength=1)}, required=["uri"]),
            "modelCard": _object(
                {"uri": _string(minLength=1), "checksum": _string(pattern=_CHECKSUM)},
                required=["uri", "checksum"],
            ),
        },
        required=["name", "version", "sourceUri", "checksum", "sizeBytes", "format", "variant"],
        description="The artifact to run: devices refuse a file whose sha256 differs from checksum.",
    )


def _resources() -> dict:
    quantities = _object({"cpu": _string(pattern=_QUANTITY), "memory": _string(pattern=_QUANTITY)})
    return _object({"requests": quantities, "limits": quantities})


def _responsible_ai() -> dict:
    share = _number(minimum=0, maximum=1)
    return _object(
        {
            "explainability": _object(
                {
                    "method": _string("How answers are explained (responsibleAI.explainability.method).",
                                      enum=list(get_args(ExplanationMethod))),
                    "endpoint": _string("Edge Releases' route that explains one input with the deployed variant "
                                        "(POST, authenticated).", minLength=1),
                },
                required=["method", "endpoint"],
            ),
            "fairness": _object(
                {
                    "biasScore": share,
                    "equalizedOdds": share,
                    "minGroupAccuracy": share,
                    "minGroupSize": _integer(minimum=1),
                }
            ),
            "auditRetentionDays": _integer(minimum=1, maximum=3650),
            "training": _object(
                {
                    "mode": _string("How the model was trained.", enum=["federated"]),
                    "strategy": _string(enum=["fedavg", "fedprox"]),
                    "rounds": _integer(minimum=1),
                    "clients": _integer(minimum=1),
                    "worstClientAccuracy": share,
                    "differentialPrivacy": _object(
                        {
                            "mechanism": _string(enum=["dp-sgd"]),
                            "epsilon": _number(minimum=0),
                            "delta": _number(minimum=0, maximum=1),
                            "noiseMultiplier": _number(minimum=0),
                            "maxGradNorm": _number(minimum=0),
                            "accountant": _string(),
                        },
                        required=["mechanism", "epsilon", "delta"],
                        description="The (epsilon, delta) the training spent, for one example of one client.",
                    ),
                },
                required=["mode", "strategy", "rounds", "clients"],
                description="Set for a model trained with federated learning (training.mode federated).",
            ),
        },
        required=["explainability", "fairness", "auditRetentionDays"],
    )


def _deployment_strategy() -> dict:
    share = _number(minimum=0, maximum=1)
    step = _object({"share": _integer(minimum=1, maximum=100), "pause": _string(pattern=_DURATION)},
                   required=["share"])
    analysis = _object({"minRequests": _integer(minimum=1), "maxErrorRate": share, "maxErrorRateIncrease": share,
                        "maxP95LatencyRatio": _number(minimum=1), "maxPredictionShift": share,
                        "latencyFloorMs": _number(minimum=0)})
    return _object(
        {
            "type": _string(enum=["RollingUpdate", "Canary"]),
            "maxUnavailable": _string(pattern=_COUNT_OR_PERCENT),
            "maxSurge": _string(pattern=_COUNT_OR_PERCENT),
            "canary": _object({"steps": {"type": "array", "minItems": 1, "items": step}, "analysis": analysis,
                               "interval": _string(pattern=_DURATION)}, required=["steps"]),
        },
        required=["type"],
    )


def _telemetry() -> dict:
    return _object(
        {
            "sampleRate": _number(minimum=0, maximum=1),
            "maxSamples": _integer(minimum=0),
            "privacy": _object({"epsilon": _number(minimum=0, exclusiveMinimum=True)}, required=["epsilon"]),
        },
        description="What devices report about inferences; privacy adds Laplace noise to counts.",
    )


def _evaluation() -> dict:
    verdict = _object(
        {
            "gate": _string(minLength=1),
            "passed": {"type": "boolean"},
            "waived": {"type": "boolean"},
            "reason": _string(),
        },
        required=["gate", "passed"],
    )
    return _object(
        {
            "metrics": _map(_number(), "Held-out metrics of the shipped model."),
            "verdicts": {"type": "array", "items": verdict},
        },
        required=["metrics", "verdicts"],
        description="The evidence the release was gated on.",
    )


def _cost() -> dict:
    money = _number(minimum=0)
    group = _object(
        {
            "variant": _string(enum=_VARIANTS),
            "usdPerMonth": money,
            "energyWhPerDay": money,
            "egressGbPerMonth": money,
            "latencyP95Ms": money,
        }
    )
    return _object(
        {"totalUsdPerMonth": money, "budgetUsdPerMonth": money, "groups": _map(group, "Per device group.")},
        required=["totalUsdPerMonth", "budgetUsdPerMonth", "groups"],
        description="Projected monthly cost of the release across its device groups.",
    )


def _spec_schema() -> dict:
    return _object(
        {
            "modelRef": _model_ref(),
            "resources": _resources(),
            "responsibleAI": _responsible_ai(),
            "deploymentStrategy": _deployment_strategy(),
            "telemetry": _telemetry(),
            "evaluation": _evaluation(),
            "cost": _cost(),
            "targetDevices": _object(
                {
                    "group": _string("Device group name.", pattern=DNS_LABEL.pattern, maxLength=63),
                    "selector": _object(
                        {"matchLabels": _map(_string(), minProperties=1)}, required=["matchLabels"]
                    ),
                },
                required=["group", "selector"],
                description="Which devices run the model; absent in the base, set by each overlay.",
            ),
            "slo": _object(
                {"latencyP95Ms": _number(minimum=0, exclusiveMinimum=True)}, required=["latencyP95Ms"]
            ),
            "rollout": _object(
                {
                    "share": _integer(minimum=0, maximum=100),
                    "step": _integer(minimum=1),
                    "steps": _integer(minimum=1),
                    "previousVersion": _string("The version the control cohort runs.", minLength=1),
                    "hold": _object(
                        {"by": _string(minLength=1), "since": _string(minLength=1), "reason": _string()},
                        required=["by", "reason"],
                        description="The canary is held where it is (by the field quality monitor or a person) "
                                    "until a commit lifts the hold.",
                    ),
                },
                required=["share"],
                description="Canary progress: devices outside the share keep the version they run.",
            ),
        },
        required=["modelRef", "resources", "responsibleAI", "deploymentStrategy", "evaluation"],
    )


def _open_api_schema() -> dict:
    return _object(
        {
            "apiVersion": _string(),
            "kind": _string(),
            # ObjectMeta is validated by the API server itself.
            "metadata": {"type": "object"},
            "spec": _spec_schema(),
        },
        required=["spec"],
        description="An ONNX model release targeted at a group of edge devices.",
    )


def crd_document() -> dict:
    """The CustomResourceDefinition of MobileAIModelDeployment (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": ["mad"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": _open_api_schema()},
                    "additionalPrinterColumns": [
                        {"name": "Version", "type": "string", "jsonPath": ".spec.modelRef.version"},
                        {"name": "Variant", "type": "string", "jsonPath": ".spec.modelRef.variant"},
                        {"name": "Group", "type": "string", "jsonPath": ".spec.targetDevices.group"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML file committed at CRD_PATH (byte-identical on every call)."""
    return dump(crd_document())


def _json_schema(node: Any, top: bool = False) -> Any:
    """A Kubernetes structural schema as JSON Schema, closed where Kubernetes drops unknown fields."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "exclusiveMinimum", "exclusiveMaximum"):
            continue
        if key == "properties":
            out[key] = {name: _json_schema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_json_schema(child) for child in value]
        else:
            out[key] = value
    # OpenAPI v3.0 has boolean exclusive bounds; JSON Schema 2020-12 has numeric ones.
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(flag) is True and bound in out:
            out[flag] = out.pop(bound)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    # The API server prunes, or with strict field validation rejects, fields the schema
    # does not list: a typo would silently vanish on the cluster, so it fails here.
    if "properties" in out and "additionalProperties" not in out and not node.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    if top:
        served = [f"{GROUP}/{v['name']}" for v in crd_document()["spec"]["versions"] if v["served"]]
        out["properties"]["apiVersion"] = {"enum": served}
        out["properties"]["kind"] = {"const": KIND}
        out["required"] = ["apiVersion", "kind", *out.get("required", [])]
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _SIMPLE_KEY.match(str(part)):
            text += f".{part}" if text else str(part)
        else:
            text += f"[{part}]"
    return text


def validate_object(doc: dict) -> list[str]:
    """Problems of one MobileAIModelDeployment against the CRD schema, one line each
    (`spec.modelRef.checksum: ...`); an empty list when the object is valid."""
    from jsonschema import Draft202012Validator

    version = crd_document()["spec"]["versions"][0]
    schema = _json_schema(version["schema"]["openAPIV3Schema"], top=True)
    problems = []
    for error in Draft202012Validator(schema).iter_errors(doc):
        where = list(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, dict):
            missing = [name for name in error.validator_value if name not in error.instance]
            problems += [f"{_path([*where, name])}: required field is missing" for name in missing]
        elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = error.schema.get("properties", {})
            problems += [f"{_path([*where, name])}: unknown field" for name in error.instance if name not in known]
        else:
            problems.append(f"{_path(where) or '(object)'}: {error.message}")
    return sorted(set(problems))


def _app_path(path: str) -> PurePosixPath:
    clean = PurePosixPath(path.removeprefix("./").rstrip("/"))
    if clean.parts[:1] != ("apps",) or not all(DNS_LABEL.match(part) for part in clean.parts):
        raise ValueError(f"{path!r} is not apps/ or a folder under it")
    return clean


def _flux_kustomization(name: str, path: str, **spec: Any) -> dict:
    return {
        "apiVersion": FLUX_API_VERSION,
        "kind": "Kustomization",
        "metadata": {"name": name, "namespace": FLUX_NAMESPACE},
        "spec": {
            "interval": "1m",
            "path": f"./{path}",
            "sourceRef": {"kind": "GitRepository", "name": SOURCE_NAME},
            **spec,
        },
    }


def cluster_files(clusters: dict[str, list[str]]) -> dict[str, str]:
    """Flux entry points per cluster: `clusters/<cluster>/{namespace,crds,apps}.yaml`.

    `clusters` maps a cluster to the repository paths it runs: `apps` (every model) or
    `apps/<model>` (one model; an overlay folder selects one device group).
    """
    files = {}
    for cluster, paths in clusters.items():
        if not DNS_LABEL.match(cluster):
            raise ValueError(f"{cluster!r} must be a DNS label")
        apps = sorted({_app_path(p) for p in paths})
        if not apps:
            raise ValueError(f"cluster {cluster!r} runs no apps")
        for a in apps:
            for b in apps:
                # Two Kustomizations applying the same object fight over it.
                if a != b and a in b.parents:
                    raise ValueError(f"cluster {cluster!r}: {b} is already inside {a}")
        root = f"clusters/{cluster}"
        files[f"{root}/namespace.yaml"] = dump(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TARGET_NAMESPACE}}
        )
        # prune is off for CRDs: deleting one deletes every MobileAIModelDeployment with it.
        files[f"{root}/crds.yaml"] = dump(
            _flux_kustomization(CRDS_KUSTOMIZATION, "crds", prune=False, wait=True)
        )
        files[f"{root}/apps.yaml"] = "---\n".join(
            dump(
                _flux_kustomization(
                    "edge-" + "-".join(app.parts),
                    str(app),
                    prune=True,
                    targetNamespace=TARGET_NAMESPACE,
                    dependsOn=[{"name": CRDS_KUSTOMIZATION}],
                )
            )
            for app in apps
        )
    return dict(sorted(files.items()))


README = f"""\
# Edge model deployments (GitOps)

This repository is the desired state of the machine-learning models deployed to edge
devices (phones, tablets, kiosks). The release pipeline writes it, one commit per release;
Flux or Argo CD apply it to edge clusters, and the edge agent applies it on devices without
Kubernetes. Nobody deploys by hand: a change here is a deployment.

## Layout

- `crds/` - the `{KIND}` CustomResourceDefinition
  (`{GROUP}/{VERSION}`). Its schema is the contract of every manifest under `apps/`.
- `apps/<model>/` - one folder per model, owned by that model's releases:
  - `apps/<model>/base/` - the `{KIND}`: artifact URI, sha256 checksum,
    resources, responsible-AI thresholds, evaluation evidence. It targets no devices.
  - `apps/<model>/overlays/<device-group>/` - one kustomize overlay per device group: the
    device selector, the group's latency objective and, where the group runs another
    quantization variant, that variant's artifact.
  - `apps/<model>/kustomization.yaml` - all overlays of the model.
- `clusters/<cluster>/` - Flux entry points of one cluster: `namespace.yaml` (the
  `{TARGET_NAMESPACE}` namespace), `crds.yaml` (applies `crds/`) and `apps.yaml` (applies
  `apps/` or single models into `{TARGET_NAMESPACE}`, after the CRDs).

Render any folder offline: `kubectl kustomize apps/<model>/overlays/<device-group>`.

## Flux

Bootstrap a cluster on its entry point:

    flux bootstrap git --url=ssh://git@<host>/<org>/<this-repo>.git --branch=main \\
      --path=clusters/{DEFAULT_CLUSTER}

The entry points read from a GitRepository named `{SOURCE_NAME}` in `{FLUX_NAMESPACE}`;
bootstrap names its own source `flux-system`, so create `{SOURCE_NAME}` once, with the
deploy key bootstrap generated, and commit it beside the entry points:

    flux create source git {SOURCE_NAME} --url=ssh://git@<host>/<org>/<this-repo>.git \\
      --branch=main --interval=1m --secret-ref=flux-system --export \\
      > clusters/{DEFAULT_CLUSTER}/source.yaml

Another cluster gets its own `clusters/<cluster>/` folder (for instance only some models).
Argo CD: point an Application at `crds/` and one at `apps/` (or `apps/<model>`).

## Devices without Kubernetes

The edge agent on the device reconciles the same manifests: it pulls this repository,
renders the overlays, keeps the objects whose `spec.targetDevices.selector.matchLabels` all
match the device's labels, downloads `spec.modelRef.sourceUri` and installs it only if its
sha256 equals `spec.modelRef.checksum`.

## Rollback

Every release is one commit. To roll a model back, revert that commit
(`git revert <sha>`) and push, or run the pipeline's `edge_rollback` DAG; the controllers
and agents converge to the previous manifest.

Never edit `apps/<model>/` by hand: releases own those paths and the next release replaces
the whole folder. Change the model spec and release instead.
"""


def skeleton_files() -> dict[str, str]:
    """The files a new GitOps repository starts with, by path relative to its root."""
    files = {
        "README.md": README,
        "apps/.gitkeep": "",
        CRD_PATH: crd_yaml(),
        **cluster_files({DEFAULT_CLUSTER: ["apps"]}),
    }
    return dict(sorted(files.items()))
