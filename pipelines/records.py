"""Small typed records that stages pass to each other.

Each is JSON-serialisable (Airflow carries them as XCom, the CLI prints them), holds URIs,
digests and figures, and never data frames or models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_xcom(self) -> dict:
        return self.model_dump(mode="json")


class DataCheck(Record):
    """Outcome of `validate_data`: the data's fingerprint and its snapshot."""

    passed: bool
    source: str
    sha256: str = Field(description="Content hash of the data as read, before splitting.")
    rows: int
    schema_: dict[str, str] = Field(alias="schema")
    features: list[str] = Field(description="Feature columns after glob patterns resolved.")
    snapshot_uri: str = Field(description="The exact rows later stages train and evaluate on.")
    report_uri: str
    failures: list[str] = Field(default_factory=list)
    release_key: str = Field(description="Hash of the model's own inputs: the release's identity "
                                         "(pipelines.identity).")
    salt: str = Field("", description="Mixed into the release key by a forced retrain (its run id); "
                                      "empty for a plain release.")
    spec_sha256: str = Field("", description="Digest of the whole spec this run started with.")
    spec_uri: str = Field("", description="The spec this run started with, as stored; later stages read it.")
    evaluation_code: str = Field("", description="Digest of the evaluation code when this run started.")
    task: Literal["binary", "multiclass", "regression"] = "binary"
    task_inferred: bool = Field(False, description="The spec names no task: it was inferred from the target.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TrainingPrivacy(Record):
    """Differential privacy of a federated model's training: DP-SGD on every client."""

    mechanism: Literal["dp-sgd"] = "dp-sgd"
    epsilon: float = Field(description="The largest epsilon any client's rows spent over the whole training "
                                       "(Opacus' RDP accountant).")
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "rdp"
    unit: str = Field("one example (row) of a client", description="What the guarantee protects.")


class FederatedTraining(Record):
    """How a model was trained federated (`training.mode: federated`): rounds, clients, what
    each round measured, the worst-served client and the privacy spent. Rows never left the
    clients; the server saw weights and metrics."""

    strategy: str
    rounds: int
    clients: int = Field(description="Clients that trained in at least one round.")
    federation: str = Field(description="`embedded` (SuperLink and SuperNodes started by the train stage) or "
                                        "the SuperLink address of a running federation.")
    per_round: list[dict] = Field(description="Per round: train loss, federated evaluation loss and accuracy "
                                              "(weighted by rows), seconds, mean bytes per client.")
    client_accuracy: dict[str, float] = Field(description="Each client's accuracy of the final model on its own "
                                                          "held-out rows (federated evaluation).")
    client_groups: dict[str, str] = Field(default_factory=dict, description="Client -> device group (embedded).")
    worst_client: dict = Field(default_factory=dict, description="{client, group, accuracy, rows}: fairness "
                                                                 "across clients.")
    privacy: TrainingPrivacy | None = None
    evidence_uri: str = Field("", description="Every round's per-client metrics and the partition summary.")
    seconds: float = 0.0


class TrainedModel(Record):
    """The native model (trained here, or imported) and its held-out metrics."""

    framework: Literal["sklearn", "torch", "onnx"]
    model_uri: str
    metrics: dict[str, float]
    classes: list[str] = Field(description="Class labels in output order; empty for a regression.")
    train_seconds: float
    task: Literal["binary", "multiclass", "regression"] = "binary"
    source: dict[str, str] = Field(default_factory=dict, description="An imported model's provenance (its URI, "
                                                                     "sha256, and where it came from); empty when trained here.")
    federated: FederatedTraining | None = Field(None, description="Set when trained with training.mode federated.")
    reused: bool = False


class ExportedModel(Record):
    uri: str
    sha256: str
    size_bytes: int
    opset: int
    max_abs_diff: float | None = Field(description="Largest difference from the native model on the test split "
                                                   "(None: an imported ONNX file has no native model to compare).")
    label_agreement: float | None
    prediction_bins: list[float] = Field(default_factory=list, description="A regression's bin edges, in the "
                                                                           "file's metadata for devices.")
    reused: bool = False


class QuantCandidate(Record):
    variant: Literal["fp32", "dynamic", "static"]
    uri: str
    sha256: str
    size_bytes: int
    accuracy: float = Field(description="The task's score on the test split: accuracy, or R2 for a regression "
                                        "(the plan's `metric`).")
    accuracy_change: float
    latency_p50_ms: float
    latency_p95_ms: float
    eligible: bool
    note: str = ""


class QuantizationPlan(Record):
    candidates: list[QuantCandidate]
    chosen: Literal["fp32", "dynamic", "static"]
    reason: str
    metric: str = Field("accuracy", description="What the candidates' `accuracy` measures (accuracy, or r2).")
    reused: bool = False

    @property
    def chosen_candidate(self) -> QuantCandidate:
        return next(c for c in self.candidates if c.variant == self.chosen)


class RegisteredVersion(Record):
    name: str
    version: str
    run_id: str
    model_uri: str
    alias: str
    created: bool
    release_key: str = Field("", description="The release that built this version: a rebuild whose bytes came "
                                             "out the same is the same version, of the same release.")


Figure = float | int | str | bool | None


class GateVerdict(Record):
    """One gate's decision: what was required, what was seen, where the evidence is."""

    gate: str
    passed: bool
    waived: bool = False
    thresholds: dict[str, Figure] = Field(default_factory=dict)
    observed: dict[str, Figure] = Field(default_factory=dict)
    evidence: dict[str, str] = Field(default_factory=dict, description="Evidence name -> URI.")
    reason: str

    def brief(self) -> dict:
        """What the manifest carries."""
        return {"gate": self.gate, "passed": self.passed, "waived": self.waived, "reason": self.reason}


class Explanation(Record):
    method: str
    importances: dict[str, float] = Field(
        default_factory=dict, description="Feature -> importance, largest first: the mean drop in accuracy "
                                          "(permutation_importance), or the mean |LIME weight| or |SHAP value| over "
                                          "held-out rows (lime, shap).")
    evidence: dict[str, str] = Field(default_factory=dict)
    note: str = ""


class ModelCard(Record):
    json_uri: str
    html_uri: str
    sha256: str = Field(description="sha256 of the JSON card.")


class CostReport(Record):
    """The cost estimate, its gates, its diff against the champion, and the variant each
    device group ships."""

    estimate: dict
    verdicts: list[GateVerdict]
    diff: dict
    group_variants: dict[str, str]
    evidence: dict[str, str] = {}

    def variants_in_use(self) -> list[str]:
        return sorted(set(self.group_variants.values()))


class Decision(Record):
    """What the verdicts mean for this release."""

    outcome: Literal["release", "await_approval", "reject"]
    failed_gates: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)


class ReleaseOptions(Record):
    """What the person starting a release asked for: the trigger form's parameters (Airflow)
    or the command line's flags. Each may only make a release do more, or ask more."""

    reason: str = ""
    force_retrain: bool = Field(False, description="Retrain and re-run every stage even when the same data, "
                                                   "spec and code were released before.")
    approval: Literal["spec", "manual"] = Field("spec", description="`manual`: a person approves even when the "
                                                                    "spec says auto. Never less than the spec.")
    dry_run: bool = Field(False, description="Stop after the decision: nothing published or committed.")
    salt: str = Field("", description="The run id when force_retrain (mixed into the release key), else empty.")

    @field_validator("approval", mode="before")
    @classmethod
    def _only_stricter(cls, value):
        if value not in ("spec", "manual"):
            raise ValueError(f"approval {value!r} is not allowed: a run may ask for 'manual' approval (stricter "
                             "than an auto spec) or follow the 'spec'; it can never relax a manual spec")
        return value

    def tags(self) -> dict[str, str]:
        """As MLflow tags (`release.*`)."""
        return {"release.force_retrain": str(self.force_retrain).lower(), "release.approval": self.approval,
                "release.dry_run": str(self.dry_run).lower(),
                **({"release.reason": self.reason} if self.reason else {}),
                **({"release.salt": self.salt} if self.salt else {})}


class Approval(Record):
    approved: bool
    by: str
    at: str
    comment: str = ""


class PublishedArtifact(Record):
    uri: str
    sha256: str
    size_bytes: int
    uploaded: bool
    signature_uri: str | None = None
    model_card_uri: str | None = None
    model_card_html_uri: str | None = None
    model_card_sha256: str | None = None
    variants: dict[str, dict] = Field(default_factory=dict,
                                      description="Other variants shipped to some device groups: uri, sha256, size.")


class GitOpsCommit(Record):
    remote: str
    branch: str
    commit: str
    changed_paths: list[str]
    created: bool


def money(value: float) -> float:
    """A dollar figure at the precision it is shown and recorded: cents from $0.01, four decimals below."""
    small = round(value, 4)
    return small if abs(small) < 0.01 else round(value, 2)


def usd(value: float) -> str:
    """A dollar figure as every summary, card and page shows it (at `money`'s precision)."""
    value = money(value)
    return f"${value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"${value:.4f}"


class ShippedVariant(Record):
    """A variant some device groups run, measured on the held-out rows from the same answers the
    quantization plan and the gates scored."""

    variant: str
    groups: list[str] = Field(default_factory=list, description="The device groups that run it (all, without a "
                                                                "cost estimate).")
    metrics: dict[str, float] = Field(default_factory=dict)


class ReleaseSummary(Record):
    model: str
    model_version: str
    status: Literal["released", "in_review", "rejected", "awaiting_approval", "dry_run"]
    reasons: list[str] = Field(default_factory=list, description="Why a release was not committed.")
    release_key: str
    run_id: str
    trigger: str
    artifact_uri: str | None
    artifact_sha256: str
    gitops_commit: str | None
    gitops_commit_created: bool
    quantization: QuantizationPlan
    metrics: dict[str, float] = Field(description="The trained model's metrics on the held-out rows (native, fp32: "
                                                  "before quantization).")
    shipped: list[ShippedVariant] = Field(
        default_factory=list, description="Each variant that ships, with the device groups that run it and its "
                                          "metrics on the held-out rows: the release's headline figures.")
    task: str = Field("binary", description="What the model predicts; `(inferred)` when the spec names no task.")
    model_source: dict[str, str] = Field(default_factory=dict, description="An imported model's provenance.")
    federated: FederatedTraining | None = Field(None, description="How a federated model was trained.")
    verdicts: list[GateVerdict] = Field(default_factory=list)
    approval: Approval | None = None
    model_card_uri: str | None = None
    cost: dict | None = Field(None, description="Cost estimate of the shipped variant (per device group).")
    cost_diff: dict | None = None
    stages: dict[str, float]
    options: ReleaseOptions = Field(default_factory=ReleaseOptions, description="The run's parameters.")
    would: Literal["release", "await_approval", "reject"] | None = Field(
        None, description="A dry run's decision: what a real run would have done.")

    def headline(self) -> str:
        """The outcome in one line: `RELEASED <model> v<n>: commit <sha>`, or the status
        (`REJECTED`, `AWAITING_APPROVAL`, `DRY_RUN`, `IN_REVIEW`) with the reasons."""
        if self.status == "released":
            return f"RELEASED {self.model} v{self.model_version}: commit {self.gitops_commit}"
        return f"{self.status.upper()} {self.model} v{self.model_version}: " + "; ".join(self.reasons)
