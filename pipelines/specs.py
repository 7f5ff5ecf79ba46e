"""The model spec: what to release, validated before anything runs.

A spec is a YAML file in `model_specs/`. Keys are camelCase, as in the Kubernetes resources
the release ends in. Every model is strict (`extra="forbid"`): a misspelt key fails and the
error names the file and the field. Environment settings (stores, endpoints, keys) are never
part of a spec; they live in `pipelines.settings`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

BUILTIN_DATASETS = ("uci-adult", "uci-adult-test", "mnist-5k", "sklearn-diabetes")
SKLEARN_ESTIMATORS = ("logistic_regression", "linear_regression", "mlp", "random_forest", "gradient_boosting",
                      "xgboost", "lightgbm")
TASKS = ("binary", "multiclass", "regression")
# Quality metrics by kind of task, and which way is better.
CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "roc_auc")
REGRESSION_METRICS = ("mae", "rmse", "r2")
LOWER_IS_BETTER = frozenset({"mae", "rmse"})
TORCH_ARCHITECTURES = ("cnn", "mlp")
QUANTIZATION_MODES = ("dynamic", "static")
GATES = ("quality", "fairness", "quantization_parity", "drift")
MIN_JUSTIFICATION = 20

# An RFC 1123 label (lowercase letters, digits, '-', at most 63 characters): model, device
# group and cluster names, and every folder a device makes from one.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Kubernetes label keys and values (prefix/name, name segments of at most 63 characters).
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_QUANTITY_FACTORS = {
    None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}
_PERCENT_OR_INT = re.compile(r"^([0-9]+%?)$")


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
        frozen=True,
    )


UnitInterval = Annotated[float, Field(ge=0.0, le=1.0)]


def parse_quantity(value: str) -> float:
    """A Kubernetes resource quantity (`128Mi`, `500m`) as a plain number."""
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _QUANTITY_FACTORS[match.group(3)]


class DataValidation(_Strict):
    """What the data must satisfy before training (becomes a Great Expectations suite)."""

    max_null_share: UnitInterval = 0.0
    min_rows: int = Field(100, ge=1)
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    max_columns: int = Field(10_000, ge=1, le=1_000_000,
                             description="Most columns a data file may have (checked on its header, before reading).")
    max_cell_bytes: int = Field(65_536, ge=16, le=2**30,
                                description="Largest value a data file's cell may hold, in bytes (a CSV's lines are "
                                            "checked before the file is read).")

    @field_validator("ranges")
    @classmethod
    def _ordered(cls, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for column, (low, high) in ranges.items():
            if low > high:
                raise ValueError(f"range of {column!r} has min {low} above max {high}")
        return ranges


class DataSpec(_Strict):
    """Where the data comes from and which columns mean what.

    `source` is `builtin:<name>`, a CSV or Parquet path (relative to the spec file), or an
    `s3://bucket/key` URI. `features` entries may be glob patterns (`pixel_*`).
    """

    source: str
    target: str
    features: list[str] = Field(min_length=1)
    sensitive_features: list[str] = Field(default_factory=list)
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    validation: DataValidation = DataValidation()
    current_source: str | None = Field(
        None, description="Recent production data for the drift gate (same forms as `source`)."
    )

    @field_validator("source", "current_source")
    @classmethod
    def _known_source(cls, source: str | None) -> str | None:
        if source is None:
            return None
        if source.startswith("builtin:"):
            name = source.removeprefix("builtin:")
            if name not in BUILTIN_DATASETS:
                raise ValueError(
                    f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}"
                )
            return source
        path = source.removeprefix("file://")
        if not path.endswith((".csv", ".parquet")):
            raise ValueError("a data file must end in .csv or .parquet")
        return source

    @model_validator(mode="after")
    def _target_is_not_a_feature(self) -> DataSpec:
        if self.target in self.features:
            raise ValueError(f"target {self.target!r} is also listed in features")
        return self


_ENTRYPOINT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class DifferentialPrivacySpec(_Strict):
    """DP-SGD on every client (Opacus): each example's gradient clipped to `maxGradNorm`, Gaussian
    noise of `noiseMultiplier` x `maxGradNorm` added to each batch's sum; the accountant gives
    the (epsilon, delta) of each client's rows over all its rounds, the release reports the
    largest."""

    noise_multiplier: float = Field(gt=0, le=100, description="Noise standard deviation over the clipping norm.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example gradient clipping norm.")
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta of (epsilon, delta)-DP; keep it below one over "
                                                       "a client's rows.")
    max_epsilon: float | None = Field(None, gt=0, description="Fail the training when any client's epsilon would "
                                                              "exceed this.")


class FederatedSpec(_Strict):
    """How `training.mode: federated` trains (Flower): the strategy and its rounds over the
    clients, each training locally on its own rows; the server only aggregates weights."""

    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    rounds: int = Field(3, ge=1, le=1000)
    local_epochs: int = Field(1, ge=1, le=100, description="Epochs each client trains per round.")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Share of the clients sampled to train each round.")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="Share of the clients sampled to evaluate.")
    min_clients: int = Field(2, ge=1, description="Clients a round waits for (available, trained, evaluated).")
    proximal_mu: float = Field(0.0, ge=0, description="FedProx: weight of the proximal term mu/2 ||w - w_global||^2.")
    eval_share: float = Field(0.2, gt=0, lt=1, description="Share of each client's rows it holds out to evaluate "
                                                           "the global model (federated evaluation).")
    round_timeout_seconds: float = Field(600.0, gt=0, description="How long the server waits for a round's replies.")
    clients: int = Field(8, ge=1, le=1000, description="Embedded federation: how many of the fleet simulator's "
                                                       "devices in the targets' groups hold the training rows.")
    skew: float = Field(0.5, gt=0, description="Embedded federation: Dirichlet concentration of each class over the "
                                               "device groups (smaller: each group sees fewer classes).")
    differential_privacy: DifferentialPrivacySpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FederatedSpec:
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("training.federated.proximalMu: FedProx needs a proximal weight above 0")
        if self.strategy == "fedavg" and self.proximal_mu > 0:
            raise ValueError("training.federated.proximalMu is for strategy fedprox")
        if self.min_clients > self.clients:
            raise ValueError(f"training.federated.minClients ({self.min_clients}) is more than "
                             f"training.federated.clients ({self.clients})")
        return self


class TrainingSpec(_Strict):
    """How the model is trained: a built-in estimator or network, or the data scientist's own
    function (`entrypoint`). Absent for an imported model (`model.source`), but for its seed."""

    framework: Literal["sklearn", "torch"] | None = None
    estimator: str | None = None
    architecture: str | None = None
    entrypoint: str | None = Field(
        None, description="Own training code, `module:function`; the module is looked up in the spec's "
                          "folder first, then among installed packages.")
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, max_length=4,
        description="Shape of one row as an entrypoint's torch module takes it (e.g. [1, 28, 28]); "
                    "devices still send the flat features.")
    params: dict[str, int | float | str | bool | list[int] | None] = Field(default_factory=dict)
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed of every random choice (numpy's range).")
    mode: Literal["central", "federated"] = Field(
        "central", description="`federated`: trained with Flower on the devices' own rows (torch models only).")
    federated: FederatedSpec | None = Field(None, description="How `mode: federated` trains.")

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str | None) -> str | None:
        if value is not None and not _ENTRYPOINT.match(value):
            raise ValueError(f"{value!r} is not `module:function` (a Python module path, a colon, a function name)")
        return value

    @model_serializer(mode="wrap")
    def _without_central_defaults(self, handler):
        # A centrally trained spec dumps as before federated training existed: its digest, its
        # release key and its records stay the same.
        dumped = handler(self)
        if isinstance(dumped, dict) and dumped.get("mode") == "central" and dumped.get("federated") is None:
            dumped.pop("mode")
            dumped.pop("federated")
        return dumped

    @model_validator(mode="after")
    def _federated_needs_torch(self) -> TrainingSpec:
        if self.mode == "central":
            if self.federated is not None:
                raise ValueError("training.federated is for training.mode federated")
            return self
        if self.federated is None:
            raise ValueError("training.mode federated needs training.federated (strategy, rounds, clients)")
        if self.framework == "sklearn":
            raise ValueError("training.mode federated trains a torch network: training.framework torch with an "
                             "architecture, or training.entrypoint returning an nn.Module")
        return self

    @model_validator(mode="after")
    def _model_named_for_framework(self) -> TrainingSpec:
        if self.entrypoint is not None:
            for name in ("estimator", "architecture"):
                if getattr(self, name) is not None:
                    raise ValueError(f"training.{name} is for built-in models; training.entrypoint names your own")
            return self
        if self.input_shape is not None:
            raise ValueError("training.inputShape is for a torch module returned by training.entrypoint")
        if self.framework is None:
            if self.estimator is not None or self.architecture is not None:
                raise ValueError("training.framework is missing (sklearn for an estimator, torch for an architecture)")
            return self
        if self.framework == "sklearn":
            if self.estimator not in SKLEARN_ESTIMATORS:
                raise ValueError(
                    f"training.estimator must be one of {', '.join(SKLEARN_ESTIMATORS)} "
                    f"for framework sklearn (got {self.estimator!r})"
                )
            if self.architecture is not None:
                raise ValueError("training.architecture is for framework torch")
        else:
            if self.architecture not in TORCH_ARCHITECTURES:
                raise ValueError(
                    f"training.architecture must be one of {', '.join(TORCH_ARCHITECTURES)} "
                    f"for framework torch (got {self.architecture!r})"
                )
            if self.estimator is not None:
                raise ValueError("training.estimator is for framework sklearn")
        return self

    @property
    def trains(self) -> bool:
        """Whether this spec trains a model (a built-in one or its own code)."""
        return self.entrypoint is not None or self.framework is not None

    @property
    def model_type(self) -> str:
        return self.estimator or self.architecture or self.entrypoint or "imported"


_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


class ModelSourceSpec(_Strict):
    """A model trained elsewhere: released without training, through every gate."""

    source: str = Field(description="An ONNX file (a path relative to the spec, file:// or s3://) or an "
                                    "MLflow model URI (models:/name/3, models:/name@alias, runs:/<run id>/<path>).")
    checksum: str | None = Field(None, description="`sha256:<hex>` the fetched file must match (ONNX files).")

    @field_validator("source")
    @classmethod
    def _known(cls, source: str) -> str:
        if source.startswith(("models:/", "runs:/")):
            return source
        if not source.removeprefix("file://").endswith(".onnx"):
            raise ValueError("a model source is an .onnx file (path, file:// or s3://) or an MLflow URI "
                             "(models:/name/3, models:/name@alias, runs:/...)")
        return source

    @field_validator("checksum")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError(f"{value!r} is not sha256:<64 lowercase hex digits>")
        return value

    @property
    def is_mlflow(self) -> bool:
        return self.source.startswith(("models:/", "runs:/"))


class ParityTolerance(_Strict):
    """How close the ONNX model must be to the native one."""

    max_abs_diff: float = Field(1e-4, gt=0.0)
    min_label_agreement: UnitInterval = 0.999


class ExportSpec(_Strict):
    opset: int = Field(17, ge=9, le=23)
    quantization: list[Literal["dynamic", "static"]] = Field(
        default_factory=lambda: ["dynamic", "static"]
    )
    accuracy_budget: UnitInterval = Field(
        0.01, description="Largest accuracy drop vs fp32 a quantized variant may cost."
    )
    max_artifact_bytes: int | None = Field(
        None, gt=0, description="Size cap for the shipped file; makes size the binding constraint."
    )
    calibration_rows: int = Field(256, ge=16, le=100_000)
    parity: ParityTolerance = ParityTolerance()


class MetricThreshold(_Strict):
    """TFX/MLflow-style threshold: an absolute floor (or ceiling) and an allowed change."""

    direction: Literal["higher", "lower"] = "higher"
    min_value: float | None = None
    max_value: float | None = None
    max_regression: float | None = Field(None, ge=0.0)


class GatesSpec(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _direction_from_metric(cls, data: object) -> object:
        """A quality threshold without a direction takes its metric's (errors are better lower)."""
        quality = data.get("quality") if isinstance(data, dict) else None
        if isinstance(quality, dict):
            data = {**data, "quality": {
                metric: {"direction": "lower" if metric in LOWER_IS_BETTER else "higher", **rule}
                if isinstance(rule, dict) and "direction" not in rule else rule
                for metric, rule in quality.items()}}
        return data

    quality: dict[Literal["accuracy", "f1_macro", "roc_auc", "mae", "rmse", "r2"], MetricThreshold] | None = Field(
        None, description="Thresholds per metric; by default accuracy (classification) or R2 (regression) at least "
                          "0.5 and no more than 0.01 worse than the champion.")
    drift_share: UnitInterval = Field(0.5, description="Largest share of drifted columns.")
    quantization_fairness_change: UnitInterval = Field(
        0.02, description="How much an int8 variant may widen a fairness gap vs fp32."
    )
    waive: dict[Literal["quality", "fairness", "quantization_parity", "drift"], str] = Field(
        default_factory=dict,
        description="Gates not applied, each with a written justification (lands in the model card).",
    )

    @field_validator("waive")
    @classmethod
    def _justified(cls, waive: dict[str, str]) -> dict[str, str]:
        for gate, why in waive.items():
            if len(why.strip()) < MIN_JUSTIFICATION:
                raise ValueError(
                    f"waiving {gate} needs a written justification of at least {MIN_JUSTIFICATION} characters"
                )
        return waive


    def quality_for(self, task: str) -> dict[str, MetricThreshold]:
        """The quality thresholds of a task: the spec's, or the default."""
        if self.quality is not None:
            return self.quality
        metric = "r2" if task == "regression" else "accuracy"
        return {metric: MetricThreshold(minValue=0.5, maxRegression=0.01)}


def _distinct(actions: list[str]) -> list[str]:
    """An ordered list of policy actions, each at most once."""
    if len(set(actions)) != len(actions):
        raise ValueError(f"each action at most once (got {actions})")
    return actions


BudgetAction = Literal["notify", "lower_sampling", "cheaper_variant", "pause_rollout"]


class FinOpsSpec(_Strict):
    cost_center: str
    project: str
    monthly_budget_usd: float = Field(ge=0.0)
    on_breach: list[BudgetAction] = Field(
        default_factory=lambda: ["notify"],
        description="What the daily FinOps job does, in order, when the 30-day forecast breaches the monthly budget: "
                    "notify (alerts), lower_sampling (a commit halving the devices' telemetry.sampleRate, down to "
                    "minSampleRate), cheaper_variant (a commit switching each device group to the cheapest variant "
                    "of the deployed release that passed its gates and fits the group's memory, even past its "
                    "latency SLO), pause_rollout (a commit holding a canary where it is). Each is a recorded, "
                    "reversible GitOps commit; `python -m pipelines finops-restore` reverses sampling and variants.")
    min_sample_rate: UnitInterval = Field(
        0.01, description="lower_sampling never takes telemetry.sampleRate below this.")
    review: bool = Field(
        False, description="Commit the onBreach actions to a review branch finops/<model>/<date> for a person to "
                           "merge, instead of the GitOps branch.")

    _once_each = field_validator("on_breach")(classmethod(lambda cls, actions: _distinct(actions)))

    @field_validator("cost_center", "project")
    @classmethod
    def _label_value(cls, value: str) -> str:
        if not _LABEL_VALUE.match(value) or not value:
            raise ValueError(f"{value!r} is not a valid Kubernetes label value")
        return value


class LabelSelector(_Strict):
    match_labels: dict[str, str] = Field(min_length=1)

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"{key!r} is not a valid label key")
            if not _LABEL_VALUE.match(value):
                raise ValueError(f"{value!r} (label {key!r}) is not a valid label value")
        return labels


class DeviceGroup(_Strict):
    name: str
    selector: LabelSelector
    latency_slo_ms: float | None = Field(None, gt=0.0, description="p95 latency objective.")
    requires_review: bool = False
    resources: ResourcesSpec | None = Field(
        None, description="This group's requests and limits, over the spec-wide `resources` field by field (what "
                          "it leaves out is the spec-wide value); its overlay carries them and the memory gate "
                          "checks the group against its own limits.memory. `finops-rightsize --propose` offers "
                          "them from what the group's devices measured.")

    @field_validator("name")
    @classmethod
    def _dns(cls, name: str) -> str:
        if not DNS_LABEL.match(name):
            raise ValueError(f"{name!r} must be a DNS label (lowercase, digits, '-')")
        return name

    @model_serializer(mode="wrap")
    def _without_unset_resources(self, handler):
        # A group without its own resources dumps as before they existed: the spec's digest,
        # its records and its manifests stay byte-identical.
        dumped = handler(self)
        if isinstance(dumped, dict) and dumped.get("resources", 0) is None:
            dumped.pop("resources")
        return dumped

    def resources_over(self, spec_wide: ResourcesSpec) -> ResourcesSpec:
        """The group's effective resources: its own values, the spec-wide ones where it sets none."""
        if self.resources is None:
            return spec_wide
        own = self.resources
        merged = {section: {name: getattr(getattr(own, section), name) or getattr(getattr(spec_wide, section), name)
                            for name in ("cpu", "memory")} for section in ("requests", "limits")}
        return ResourcesSpec.model_validate(
            {section: {k: v for k, v in values.items() if v is not None} for section, values in merged.items()})


class ResourceList(_Strict):
    cpu: str | None = None
    memory: str | None = None

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None:
            parse_quantity(value)
        return value


class ResourcesSpec(_Strict):
    requests: ResourceList = ResourceList()
    limits: ResourceList = ResourceList()

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourcesSpec:
        for name in ("cpu", "memory"):
            req, lim = getattr(self.requests, name), getattr(self.limits, name)
            if req and lim and parse_quantity(req) > parse_quantity(lim):
                raise ValueError(f"requests.{name} {req} exceeds limits.{name} {lim}")
        return self


class FairnessSpec(_Strict):
    bias_score: UnitInterval = Field(
        0.1, description="Largest demographic parity difference across sensitive groups."
    )
    equalized_odds: UnitInterval = Field(0.1, description="Largest equalized odds difference.")
    min_group_accuracy: UnitInterval | None = None
    min_group_size: int = Field(
        30, ge=1, description="Groups with fewer evaluation rows are reported but not compared."
    )
    max_error_gap: float | None = Field(
        None, ge=0.0, description="Regression: largest difference in mean absolute error between groups "
                                  "(in the target's units).")


ExplanationMethod = Literal["permutation_importance", "lime", "shap", "none"]
BreachAction = Literal["notify", "hold", "rollback", "retrain"]


class ExplainabilitySpec(_Strict):
    """How the model's answers are explained: globally in the model card, for a sample of
    field inferences in each quality monitor report, and one input at a time by the explain
    route of Edge Releases (`POST /edge/api/models/<model>/explain`)."""

    method: ExplanationMethod = Field(
        "permutation_importance",
        description="lime (the lime package) or shap (the shap package) over the shipped ONNX variant; "
                    "permutation_importance explains globally only (field samples and the route then use lime).")
    samples: int = Field(5, ge=0, le=100, description="Field inferences explained in each quality monitor report.")
    background_rows: int = Field(
        200, ge=10, le=5000, description="Training rows the local explainer perturbs from (seeded).")

    @model_validator(mode="before")
    @classmethod
    def _from_method(cls, data: object) -> object:
        """`explainability: lime` is short for `explainability: {method: lime}`."""
        return {"method": data} if isinstance(data, str) else data


class ResponsibleAISpec(_Strict):
    explainability: ExplainabilitySpec = ExplainabilitySpec()
    fairness: FairnessSpec = FairnessSpec()
    audit_retention_days: int = Field(
        365, ge=1, le=3650, description="Evidence, verdicts, approvals and model cards are kept at least this long, "
                                        "and always while their version is deployed.")
    on_breach: list[BreachAction] = Field(
        default_factory=lambda: ["notify"],
        description="What the field quality monitor does, in order, when a version's quality or fairness in the "
                    "field breaks the spec's thresholds: notify (alerts), hold (a commit that stops the canary "
                    "where it is), rollback (a commit restoring the previous version), retrain (the Asset event "
                    "edge-quality://<model>, which starts the model's release).")

    _once_each = field_validator("on_breach")(classmethod(lambda cls, actions: _distinct(actions)))


_DURATION = re.compile(r"^([0-9]+)(s|m|h|d)$")
_DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> float:
    """`30s`, `15m`, `6h`, `2d` as seconds."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration like 30s, 15m, 6h or 2d")
    return float(int(match.group(1)) * _DURATION_SECONDS[match.group(2)])


def _duration(value: str) -> str:
    parse_duration(value)
    return value


class CanaryStep(_Strict):
    """One step of a canary: the share of each device group's devices on the new version,
    and how long it runs before the analysis may advance it."""

    share: int = Field(ge=1, le=100, description="Percent of the devices of each group.")
    pause: str = Field("0s", description="Least time at this step before it may advance (30m, 2h).")

    @field_validator("pause")
    @classmethod
    def _pause(cls, value: str) -> str:
        return _duration(value)


class CanaryAnalysis(_Strict):
    """What the canary cohort (devices on the new version) must show against the control
    cohort (devices still on the previous version) in the step's telemetry."""

    min_requests: int = Field(200, ge=1, description="Fewer canary requests than this: hold, do not judge.")
    max_error_rate: UnitInterval = Field(0.02, description="Largest canary error rate.")
    max_error_rate_increase: UnitInterval = Field(0.01, description="Largest error rate above the control's.")
    max_p95_latency_ratio: float = Field(1.5, gt=1.0, description="Largest canary p95 / control p95.")
    latency_floor_ms: float = Field(
        1.0, ge=0.0, description="Canary p95 latencies below this are not compared (timer noise, under any SLO).")
    max_prediction_shift: UnitInterval = Field(
        0.1, description="Largest total variation distance between canary and control prediction distributions.")


class CanarySpec(_Strict):
    steps: list[CanaryStep] = Field(min_length=1)
    analysis: CanaryAnalysis = CanaryAnalysis()
    interval: str = Field("15m", description="How often the rollout DAG analyses the canary.")

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        if parse_duration(_duration(value)) < 60:
            raise ValueError(f"interval {value!r} is shorter than a minute")
        return value

    @field_validator("steps")
    @classmethod
    def _rising_to_all(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        shares = [step.share for step in steps]
        if any(b <= a for a, b in zip(shares, shares[1:])):
            raise ValueError(f"step shares must rise strictly (got {shares})")
        if shares[-1] != 100:
            raise ValueError(f"the last step must bring the share to 100 (got {shares[-1]})")
        return steps


class DeploymentStrategy(_Strict):
    type: Literal["RollingUpdate", "Canary"] = "RollingUpdate"
    max_unavailable: str = "10%"
    max_surge: str = "0"
    canary: CanarySpec | None = None

    @field_validator("max_unavailable", "max_surge")
    @classmethod
    def _int_or_percent(cls, value: str) -> str:
        if not _PERCENT_OR_INT.match(value) or (value.endswith("%") and int(value[:-1]) > 100):
            raise ValueError(f"{value!r} must be a count or a percentage up to 100%")
        return value

    @model_validator(mode="after")
    def _canary_has_steps(self) -> DeploymentStrategy:
        if self.type == "Canary" and self.canary is None:
            raise ValueError("type Canary needs canary.steps (shares rising to 100)")
        if self.type == "RollingUpdate" and self.canary is not None:
            raise ValueError("canary is only for type Canary")
        return self


class PrivacySpec(_Strict):
    """Laplace noise on every count and histogram a device reports (one record per window)."""

    epsilon: float = Field(gt=0.0, le=10.0, description="Privacy budget per telemetry record.")


class TelemetrySpec(_Strict):
    """What devices report about the model's inferences."""

    sample_rate: UnitInterval = Field(
        0.1, description="Share of inferences whose inputs and output are kept as samples (0: none).")
    max_samples: int = Field(50, ge=0, le=10_000, description="Most samples per record.")
    privacy: PrivacySpec | None = Field(None, description="Differential privacy for counts and histograms.")


class FieldMonitoringSpec(_Strict):
    """The field quality and fairness monitor: sampled inferences whose labels have arrived
    (`python -m pipelines feedback`), per version, device group and sensitive group."""

    window: str = Field("7d", description="How far back (by inference time) labelled inferences are judged.")
    min_labels: int = Field(
        200, ge=10, description="Fewer labelled inferences of a version in the window: no verdict. Sensitive groups "
                                "use responsibleAI.fairness.minGroupSize.")
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="Bootstrap confidence level: a breach needs the whole interval past the "
                                          "threshold.")
    resamples: int = Field(1000, ge=100, le=20_000, description="Bootstrap resamples.")
    label_window: str = Field(
        "30d", description="Labels of inferences older than this (at the monitor's time) are late: counted, not judged.")
    attributes: str | None = Field(
        None, description="The operator's table of sensitive attributes keyed by inference_id (a CSV or Parquet "
                          "path relative to the spec, or s3://); devices never send them. None: no field fairness.")

    @field_validator("window", "label_window")
    @classmethod
    def _durations(cls, value: str) -> str:
        return _duration(value)


class MonitoringSpec(_Strict):
    """The drift monitor: training reference vs the latest telemetry window."""

    drift_share: UnitInterval = Field(
        0.3, description="Share of drifted columns (inputs and prediction) that raises a drift event.")
    window: str = Field("6h", description="How far back the telemetry window reaches.")
    min_rows: int = Field(200, ge=10, description="Fewer sampled rows than this: no verdict.")
    field: FieldMonitoringSpec = FieldMonitoringSpec()

    @field_validator("window")
    @classmethod
    def _window(cls, value: str) -> str:
        return _duration(value)


class ApprovalSpec(_Strict):
    mode: Literal["auto", "manual"] = "auto"


class ModelSpec(_Strict):
    """One model to release (a file in `model_specs/`)."""

    name: str
    owner: str
    description: str = ""
    intended_use: str = Field("", description="What the model is for and who uses it (model card).")
    limitations: list[str] = Field(default_factory=list, description="Known limits (model card).")
    task: Literal["binary", "multiclass", "regression"] | None = Field(
        None, description="What the model predicts; inferred from the target when absent (see the summary).")
    data: DataSpec
    training: TrainingSpec = TrainingSpec()
    model: ModelSourceSpec | None = Field(None, description="Release an existing model instead of training one.")
    export: ExportSpec = ExportSpec()
    gates: GatesSpec = GatesSpec()
    finops: FinOpsSpec
    targets: list[DeviceGroup] = Field(min_length=1)
    resources: ResourcesSpec = ResourcesSpec()
    responsible_ai: ResponsibleAISpec = Field(ResponsibleAISpec(), alias="responsibleAI")
    deployment_strategy: DeploymentStrategy = DeploymentStrategy()
    telemetry: TelemetrySpec = TelemetrySpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    schedule: str | None = Field(None, description="Cron expression or preset (@daily); none: manual only.")
    approval: ApprovalSpec = ApprovalSpec()

    @field_validator("name")
    @classmethod
    def _dns(cls, name: str) -> str:
        if not DNS_LABEL.match(name) or len(name) > 50:
            raise ValueError(f"{name!r} must be a DNS label of at most 50 characters")
        return name

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str | None) -> str | None:
        if schedule is None:
            return None
        from croniter import croniter

        presets = {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually"}
        if schedule not in presets and not croniter.is_valid(schedule):
            raise ValueError(f"{schedule!r} is neither a cron expression nor a preset")
        return schedule

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        names = [group.name for group in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets have duplicate names: {names}")
        for group in self.targets:  # a group's own resources over the spec-wide ones must still be coherent
            if group.resources is not None:
                try:
                    group.resources_over(self.resources)
                except ValidationError as error:
                    problem = error.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"targets[{group.name}].resources over the spec-wide resources: {problem}") \
                        from None
        if not self.data.sensitive_features and "fairness" not in self.gates.waive:
            raise ValueError(
                "data.sensitiveFeatures is empty: name the sensitive features, or waive the fairness "
                "gate with a justification (gates.waive.fairness)"
            )
        if self.model is not None:
            extra = [k for k in ("framework", "estimator", "architecture", "entrypoint", "input_shape", "params",
                                 "federated")
                     if getattr(self.training, k)]
            if extra:
                raise ValueError(f"model.source releases an existing model: training.{to_camel(extra[0])} "
                                 "does not apply (training may only give the seed of the data split)")
        elif not self.training.trains:
            raise ValueError("training names no model: give training.framework with an estimator or "
                             "architecture, training.entrypoint, or model.source for an existing model")
        if self.task is not None:
            problem = task_problem(self, self.task)
            if problem:
                raise ValueError(problem)
        return self

    def task_problem(self, task: str) -> str | None:
        return task_problem(self, task)

    def digest(self) -> str:
        """sha256 of the spec's canonical JSON: changes exactly when the spec's meaning does."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    # The fields that shape the model itself: its name, its data (and how it is checked), its
    # training and its export. Everything else (targets, SLOs, rollout, budget, telemetry,
    # gate thresholds, approval, the card's prose) only decides or deploys a model.
    def model_digest(self) -> str:
        """sha256 of the canonical JSON of the fields that shape the model."""
        dumped = self.model_dump(mode="json")
        shaping = {"name": dumped["name"], "training": dumped["training"], "export": dumped["export"],
                   "task": dumped["task"], "model": dumped["model"],
                   "data": {k: v for k, v in dumped["data"].items() if k != "current_source"}}
        canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def task_problem(spec: ModelSpec, task: str) -> str | None:
    """What in the spec does not fit the task (the field and why), or None."""
    allowed = REGRESSION_METRICS if task == "regression" else CLASSIFICATION_METRICS
    for metric in spec.gates.quality or {}:
        if metric not in allowed:
            return (f"gates.quality.{metric}: not a metric of a {task} model (use {', '.join(allowed)})")
        rule = spec.gates.quality[metric]
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        if rule.direction != better:
            return f"gates.quality.{metric}.direction: {metric} is better when {better}, not {rule.direction}"
    if task == "regression" and spec.data.sensitive_features and "fairness" not in spec.gates.waive \
            and spec.responsible_ai.fairness.max_error_gap is None:
        return ("responsibleAI.fairness.maxErrorGap: a regression model's fairness is the gap in mean absolute "
                "error between groups; give the largest gap allowed, in the target's units")
    if task == "regression" and spec.training.architecture is not None:
        return f"training.architecture: the built-in {spec.training.architecture} networks are classifiers"
    if task != "regression" and spec.training.estimator == "linear_regression":
        return "training.estimator: linear_regression is for task regression"
    if task == "regression" and spec.training.estimator == "logistic_regression":
        return "training.estimator: logistic_regression is a classifier (linear_regression is its regression)"
    return None


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in ("function-after", "function-before") or "[" in str(item):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line: `file: field: message`, further problems after `; ` as `field: message`."""
    problems = []
    for problem in error.errors():
        message = " ".join(problem["msg"].removeprefix("Value error, ").split())
        if problem["type"] == "extra_forbidden":
            message = "unknown key (not part of the spec)"
        problems.append(f"{_field_path(problem['loc'])}: {message}")
    return f"{source}: " + "; ".join(problems)


# The largest magnitude a number in a spec may have: beyond it no field means anything, and a
# library (numpy's seeds, JSON consumers) would fail far from the spec.
MAX_SPEC_NUMBER = 2**53


def _numbers_in_range(data: object, source: str, path: str = "") -> None:
    """Refuse a number no field can mean (beyond ±2**53, infinite, not a number), naming it."""
    import math

    if isinstance(data, dict):
        for key, value in data.items():
            _numbers_in_range(value, source, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            _numbers_in_range(value, source, f"{path}[{index}]")
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        if isinstance(data, float) and not math.isfinite(data):
            raise SpecError(f"{source}: {path or '(top level)'}: {data} is not a finite number")
        if abs(data) > MAX_SPEC_NUMBER:
            shown = f"{data:.3g}" if isinstance(data, float) else f"an integer of {len(str(abs(data)))} digits"
            raise SpecError(f"{source}: {path or '(top level)'}: {shown} is out of range "
                            f"(at most {MAX_SPEC_NUMBER:,} in magnitude)")


def parse_spec(data: object, source: str = "<spec>") -> ModelSpec:
    """Validate an already-loaded mapping; raise SpecError naming `source` and the field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: (top level): a spec must be a mapping of keys to values")
    _numbers_in_range(data, source)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(format_validation_error(source, error)) from None


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate one spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    except ValueError as error:  # an integer too long for Python to convert (over 4,300 digits)
        raise SpecError(f"{path}: a number is out of range: {str(error).split(';')[0]}") from None
    spec = parse_spec(data, str(path))
    if path.stem != spec.name:
        raise SpecError(f"{path}: name: {spec.name!r} must equal the file name {path.stem!r}")
    return spec


def spec_dir(path: str | Path) -> Path:
    """Folder a spec's relative data paths are resolved against."""
    return Path(path).resolve().parent


def discover_specs(folder: str | Path) -> dict[str, Path]:
    """Spec files in a folder by model name (the file stem), without validating them: `<name>.yaml`,
    and `<name>/<name>.yaml` for a spec that keeps its own files (training code) beside it."""
    folder = Path(folder)
    found = {p.stem: p for p in sorted(folder.glob("*/*.yaml")) if p.parent.name == p.stem}
    found.update({p.stem: p for p in sorted(folder.glob("*.yaml"))})
    return dict(sorted(found.items()))


def specs_folder() -> Path:
    """Where model specs live: `EDGE_SPECS_DIR`, or the project's `model_specs/` (the settings'
    default too). Read without the settings, which cost a DAG file's parse a tenth of a second."""
    return Path(os.environ.get("EDGE_SPECS_DIR") or Path(__file__).resolve().parent.parent / "model_specs")


def load_specs(folder: str | Path) -> dict[Path, ModelSpec | SpecError]:
    """Every spec file of a folder, validated: the spec, or the error that says why it is not one."""
    loaded: dict[Path, ModelSpec | SpecError] = {}
    for path in discover_specs(folder).values():
        try:
            loaded[path] = load_spec(path)
        except SpecError as error:
            loaded[path] = error
    return loaded


def json_schema() -> dict:
    """JSON schema of a spec file, for editors (yaml-language-server)."""
    schema = ModelSpec.model_json_schema(by_alias=True)
    # `explainability: lime` is short for `explainability: {method: lime}`: editors accept both.
    field = schema["$defs"]["ResponsibleAISpec"]["properties"]["explainability"]
    method = schema["$defs"]["ExplainabilitySpec"]["properties"]["method"]
    shorthand = {"type": "string", "enum": method["enum"], "description": "Short for {method: <this>}."}
    schema["$defs"]["ResponsibleAISpec"]["properties"]["explainability"] = {
        "anyOf": [{key: value for key, value in field.items() if key != "default"}, shorthand],
        **({"default": field["default"]} if "default" in field else {})}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Edge model release spec"
    return schema
