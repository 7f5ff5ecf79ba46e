"""The release, stage by stage: what the Airflow DAG, the CLI and the tests all call.

Each stage takes the spec's path and the small records of earlier stages, and returns a
record. Every stage is idempotent: its outputs live in the artifact store under
`runs/<model>/<release_key>/`, where the release key hashes the data, the spec and the code;
a stage that finds its output record there returns it instead of working again. Output
records are written last, after the files they point to.

Order of effects (payload first, pointer last): validate, train, export, quantize (all
private to the run), register in MLflow, publish the artifact to the store and verify it,
and only then commit the manifest that points to it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from importlib.metadata import version as _version
from pathlib import Path

from pipelines.identity import EVALUATION_CODE, code_digest, code_revision, library_versions, release_key
from pipelines.records import (
    Approval,
    CostReport,
    DataCheck,
    Decision,
    ExportedModel,
    GateVerdict,
    GitOpsCommit,
    ModelCard,
    PublishedArtifact,
    QuantizationPlan,
    RegisteredVersion,
    ReleaseOptions,
    ReleaseSummary,
    TrainedModel,
)
from pipelines.release.context import (
    DataValidationError,
    ReleaseError,
    context,
    evaluation_folder,
    resume,
    scratch,
    splits,
    stage_context,
    variant_outputs,
)
from pipelines.settings import Settings, get_settings
from pipelines.specs import ModelSpec, spec_dir
from pipelines.storage import ObjectStore, StoreError, sha256_file

log = logging.getLogger(__name__)

STAGES = ("validate_data", "train", "export", "quantize", "register", "edge_cost", "quality_gate", "fairness_gate",
          "parity_gate", "drift_gate", "explain", "model_card", "decide", "publish", "commit")


def validate_data(spec_path: str | Path, settings: Settings | None = None, salt: str = "") -> DataCheck:
    """Read the spec's data, fingerprint it, and check it against the spec's expectations.

    Raises DataValidationError listing every failed expectation on one line; the report is kept as
    evidence. On success, a snapshot of the columns the release uses is stored, so every
    later stage (on any worker) trains and evaluates on exactly these rows.

    `salt` (a forced retrain's run id) gives the same inputs a new release key. Without one,
    the key of the last forced release of these inputs that was committed is used, so a
    plain re-run after a forced retrain reuses that release instead of going back to the
    one before it.
    """
    from pipelines.data import DataError, check_target, fingerprint, read_source, resolve_features
    from pipelines.data.validation import validate_frame

    ctx = context(spec_path, settings)
    data_spec = ctx.spec.data
    try:
        frame = read_source(data_spec, spec_dir(ctx.spec_path), ctx.settings.s3_endpoint_url)
        task = check_target(frame, data_spec, ctx.spec.task)
        features = resolve_features(data_spec.features, list(frame.columns))
    except DataError as error:
        raise DataValidationError(f"{ctx.spec_path}: {error}") from None
    problem = ctx.spec.task_problem(task)
    if problem:
        raise DataValidationError(f"{ctx.spec_path}: {problem} (task {task}, inferred from {data_spec.target})")
    data_sha = fingerprint(frame)
    model_sha = _model_identity(ctx)
    salt = salt or _forced_salt(ctx, release_key(data_sha, model_sha))
    key = release_key(data_sha, model_sha, salt)
    cached = ctx.load_record(key, "validation.json", DataCheck)
    if cached is not None and cached.passed:
        return _this_run(ctx, cached)

    passed, failures, report = validate_frame(frame, data_spec, features)
    report_uri = ctx.store.put_bytes(json.dumps(report, indent=1, default=str).encode(),
                                     ctx.run_key(key, "great_expectations.json"))
    if not passed:
        raise DataValidationError(
            f"{ctx.spec_path}: data {data_spec.source} failed {len(failures)} check(s): "
            + "; ".join(failures)
        )
    columns = list(dict.fromkeys([*features, *data_spec.sensitive_features, data_spec.target]))
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "data.parquet"
        frame[columns].to_parquet(snapshot, index=False)
        snapshot_uri = ctx.store.put_file(snapshot, ctx.run_key(key, "data.parquet"))
    record = DataCheck(
        passed=True, source=data_spec.source, sha256=data_sha, rows=len(frame),
        schema={c: str(frame[c].dtype) for c in columns}, features=features,
        snapshot_uri=snapshot_uri, report_uri=report_uri, release_key=key, salt=salt,
        task=task, task_inferred=ctx.spec.task is None,
    )
    ctx.save_record(key, "validation.json", record)
    return _this_run(ctx, record)


def _this_run(ctx, data: DataCheck) -> DataCheck:
    """The validated data with what this run started with: the spec, stored for the later
    stages (they never read the file again), and the evaluation code's digest."""
    spec_sha = ctx.spec.digest()
    key = ctx.run_key(data.release_key, f"specs/{spec_sha}.json")  # content-addressed: written once
    spec_uri = ctx.store.uri(key) if ctx.store.exists(key) else \
        ctx.store.put_bytes(ctx.spec.model_dump_json(by_alias=True).encode(), key)
    return data.model_copy(update={"spec_sha256": spec_sha, "spec_uri": spec_uri,
                                   "evaluation_code": code_digest(EVALUATION_CODE)})


def _model_identity(ctx) -> str:
    """The spec's model digest, with what else shapes the model: the files of the spec's own
    training code, or what an imported model's source is now (its bytes, its pinned version)."""
    import hashlib

    from pipelines.identity import files_digest

    digest = ctx.spec.model_digest()
    extra = ""
    try:
        if ctx.spec.training.entrypoint is not None:
            from pipelines.training.entrypoint import code_files

            files, root = code_files(ctx.spec.training.entrypoint, spec_dir(ctx.spec_path))
            extra = files_digest(files, root)
        elif ctx.spec.model is not None:
            from pipelines.registry import sources

            extra = sources.identity(ctx.spec.model, spec_dir(ctx.spec_path), ctx.settings.tracking_uri,
                                     ctx.settings.s3_endpoint_url, ctx.settings.work_dir / "cache")
    except (ValueError, RuntimeError) as error:  # SourceError, TrainingCodeError: one line each
        raise DataValidationError(f"{ctx.spec_path}: {error}") from None
    return hashlib.sha256(f"{digest}:{extra}".encode()).hexdigest() if extra else digest


FORCED_RELEASE = "forced_release.json"


def _forced_salt(ctx, plain_key: str) -> str:
    """The salt of the last committed forced release of these inputs ('' when none)."""
    record = ctx.load_record(plain_key, FORCED_RELEASE, ReleaseOptions)
    return record.salt if record is not None else ""


def release_options(params: dict, run_id: str) -> ReleaseOptions:
    """A run's options from its trigger-form parameters (missing ones take their defaults);
    a forced retrain is salted with the run id, so the run's retries keep one release key."""
    options = ReleaseOptions.model_validate({k: v for k, v in params.items() if k in ReleaseOptions.model_fields
                                             and k != "salt" and v is not None})
    return options.model_copy(update={"salt": run_id if options.force_retrain else ""})


# -- model -----------------------------------------------------------------------------------
def train(spec_path: str | Path, data: DataCheck, settings: Settings | None = None) -> TrainedModel:
    """Fit the spec's model on the training split (or import the model `model.source` names);
    the task's metrics on the held-out split."""
    from pipelines import training
    from pipelines.onnx import export as onnx_export

    ctx, cached = resume(spec_path, data, "train.json", TrainedModel, settings)
    if cached is not None:
        return cached

    parts = splits(ctx, data)
    task = data.task
    federated = None
    if ctx.spec.model is not None:
        imported = _imported(ctx)
        if imported.framework == "onnx":
            outputs = onnx_export.predict(_contract_onnx(ctx, data, parts, imported.onnx_path), parts["x_test"])
        else:
            outputs = training.predict(imported.native, parts["x_test"], task)
        fitted = training.Fitted(imported.native, imported.framework, 0.0)
        source, local = imported.provenance, imported.onnx_path
    else:
        from pipelines.training.entrypoint import TrainingCodeError

        try:
            if ctx.spec.training.mode == "federated":
                from pipelines.release.federated import train_federated

                fitted, federated = train_federated(ctx, data, parts)
            else:
                fitted = training.fit(ctx.spec.training, parts["x_train"], parts["y_train"], len(parts["classes"]),
                                      task, spec_dir(ctx.spec_path))
            outputs = training.predict(fitted.model, parts["x_test"], task)
        except (TrainingCodeError, ValueError) as error:
            raise ReleaseError(f"{error}" if isinstance(error, TrainingCodeError) else
                               f"{ctx.spec_path}: {error}") from None
        source, local = {}, None
    _check_outputs(ctx, task, outputs, parts)
    metrics = training.task_metrics(task, outputs, parts["y_test"])
    suffix = {"sklearn": "joblib", "torch": "pt", "onnx": "onnx"}[fitted.framework]
    with tempfile.TemporaryDirectory() as tmp:
        if local is None:
            local = training.save(fitted, Path(tmp) / f"model.{suffix}")
        model_uri = ctx.store.put_file(local, ctx.run_key(data.release_key, f"model.{suffix}"))
    record = TrainedModel(framework=fitted.framework, model_uri=model_uri, metrics=metrics,
                          classes=parts["classes"], train_seconds=round(fitted.seconds, 3), task=task, source=source,
                          federated=federated)
    return ctx.save_record(data.release_key, "train.json", record)


def _imported(ctx):
    from pipelines.registry import sources

    try:
        return sources.fetch(ctx.spec.model, spec_dir(ctx.spec_path), ctx.settings.tracking_uri,
                             ctx.settings.s3_endpoint_url, Path(tempfile.mkdtemp(dir=scratch(ctx, "imports"))))
    except sources.SourceError as error:
        raise ReleaseError(f"{ctx.spec_path}: {error}") from None


def _check_outputs(ctx, task: str, outputs, parts: dict) -> None:
    """A model's answers have the task's shape: one probability per class, or one number per row."""
    import numpy as np

    outputs = np.asarray(outputs)
    if task == "regression":
        if outputs.ndim != 1 or not np.isfinite(outputs).all():
            raise ReleaseError(f"{ctx.spec_path}: the model does not give one finite number per row for task "
                               f"regression (outputs of shape {list(outputs.shape)})")
        return
    classes = len(parts["classes"])
    if outputs.ndim != 2 or outputs.shape[1] != classes:
        raise ReleaseError(f"{ctx.spec_path}: the model gives outputs of shape {list(outputs.shape)}, not one "
                           f"probability per class ({classes} classes of {ctx.spec.data.target})")
    if not np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        raise ReleaseError(f"{ctx.spec_path}: the model's outputs are not probabilities (rows do not sum to 1): "
                           "end a torch module with a softmax")


def _contract_onnx(ctx, data: DataCheck, parts: dict, path: Path) -> Path:
    """An imported ONNX file brought to the device contract, in place: its inputs are the
    spec's features (one per column, or one matrix), its answer is named `probabilities` (or
    `prediction`, `[N, 1]`, for a regression)."""
    import onnx

    from pipelines.onnx import export as onnx_export

    proto = onnx.load(str(path))
    inputs = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) > 1 and sorted(inputs) != sorted(data.features):
        raise ReleaseError(f"{ctx.spec_path}: model.source: the model's inputs {sorted(inputs)[:6]} are not the "
                           f"spec's features {data.features[:6]} (one input per feature, or one matrix)")
    wanted = onnx_export.output_name(data.task)
    tensors = [o for o in proto.graph.output if o.type.HasField("tensor_type")
               and o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)]
    if data.task != "regression":
        tensors = [o for o in tensors if len(o.type.tensor_type.shape.dim) == 2]
    chosen = next((o for o in tensors if o.name == wanted), tensors[-1] if tensors else None)
    if chosen is None:
        raise ReleaseError(f"{ctx.spec_path}: model.source: no float tensor output for a {data.task} model "
                           f"(outputs {[o.name for o in proto.graph.output]}; convert classifiers without ZipMap)")
    onnx_export.rename_output(proto, chosen.name, wanted)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return path


def export(spec_path: str | Path, data: DataCheck, trained: TrainedModel,
           settings: Settings | None = None) -> ExportedModel:
    """Convert to one ONNX file and check parity with the native model on the test split (an
    imported ONNX file has none: it gets the contract's metadata)."""
    import onnx

    from pipelines import training
    from pipelines.onnx import export as onnx_export

    ctx, cached = resume(spec_path, data, "export.json", ExportedModel, settings)
    if cached is not None:
        return cached

    parts = splits(ctx, data)
    task = data.task
    metadata = {"edge.model": ctx.spec.name, "edge.classes": json.dumps(trained.classes)}
    tolerance = ctx.spec.export.parity
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        if trained.framework == "onnx":
            native_out = None
            onnx_export.write_contract(ctx.fetch(trained.model_uri), path, parts["x_test"], metadata, task)
        else:
            native = training.load(trained.framework, ctx.fetch(trained.model_uri), ctx.spec.training,
                                   spec_dir(ctx.spec_path))
            native_out = training.predict(native, parts["x_test"], task)
            onnx_export.export_onnx(trained.framework, native, parts["x_test"], path, ctx.spec.export.opset,
                                    metadata, task)
        bins: list[float] = []
        if task == "regression":
            bins = onnx_export.prediction_bins(onnx_export.predict(path, parts["x_train"]))
            onnx_export.write_contract(path, path, parts["x_test"], {**metadata,
                                                                     "edge.prediction_bins": json.dumps(bins)}, task)
        result = None
        if native_out is not None:
            result = onnx_export.parity(native_out, onnx_export.predict(path, parts["x_test"]))
            try:
                onnx_export.check_parity(result, tolerance.max_abs_diff, tolerance.min_label_agreement)
            except onnx_export.ParityError as error:
                raise ReleaseError(f"{ctx.spec_path}: export: {error}") from None
        opset = max(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                    if o.domain in ("", "ai.onnx"))
        record = ExportedModel(
            uri=ctx.store.put_file(path, ctx.run_key(data.release_key, "model.fp32.onnx")),
            sha256=sha256_file(path), size_bytes=path.stat().st_size, opset=opset,
            max_abs_diff=result.max_abs_diff if result else None,
            label_agreement=result.label_agreement if result else None, prediction_bins=bins,
        )
    return ctx.save_record(data.release_key, "export.json", record)


def quantize(spec_path: str | Path, data: DataCheck, exported: ExportedModel,
             settings: Settings | None = None) -> QuantizationPlan:
    """Build fp32, dynamic and static int8 candidates, measure each, choose one and say why."""
    from pipelines import training
    from pipelines.onnx import export as onnx_export
    from pipelines.onnx.quantize import quantize_candidates

    ctx, cached = resume(spec_path, data, "quantization.json", QuantizationPlan, settings)
    if cached is not None:
        return cached

    parts = splits(ctx, data)
    fp32 = ctx.fetch(exported.uri)
    sess = onnx_export.session(fp32)
    calibration_rows = parts["x_train"].sample(
        n=min(ctx.spec.export.calibration_rows, len(parts["x_train"])), random_state=ctx.spec.training.seed)
    calibration = [onnx_export.feeds(sess, calibration_rows.iloc[i:i + 1]) for i in range(len(calibration_rows))]
    latency_feed = onnx_export.feeds(sess, parts["x_test"].iloc[:1])

    outputs: dict[Path, object] = {}  # each variant's answers on the test split, inferred once

    def answers(path: Path):
        if path not in outputs:
            outputs[path] = onnx_export.predict(path, parts["x_test"])
        return outputs[path]

    def score(path: Path) -> float:
        return training.score(data.task, answers(path), parts["y_test"])

    export_spec = ctx.spec.export
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        plan, paths = quantize_candidates(
            fp32, list(export_spec.quantization), calibration, latency_feed, score,
            export_spec.accuracy_budget, export_spec.max_artifact_bytes, out_dir,
            uri_of=lambda p: ctx.store.uri(ctx.run_key(data.release_key, f"quant/{p.name}")),
            metric=training.score_name(data.task),
        )
        plan = _parity_eligible(ctx, data, plan, paths, parts, answers)
        for path in paths.values():
            ctx.store.put_file(path, ctx.run_key(data.release_key, f"quant/{path.name}"))
        for candidate in plan.candidates:
            if candidate.variant in paths and paths[candidate.variant] in outputs:
                variant_outputs(ctx, data, candidate.sha256, candidate.uri, None, outputs[paths[candidate.variant]])
    return ctx.save_record(data.release_key, "quantization.json", plan)


def _parity_eligible(ctx, data: DataCheck, plan: QuantizationPlan, paths: dict, parts: dict,
                     answers=None) -> QuantizationPlan:
    """The plan with every int8 variant that would fail the quantization parity gate (a sensitive
    group's gap widening beyond gates.quantizationFairnessChange) made ineligible, and the
    choice made again among the others, fp32 included: a release is then rejected for parity
    only when no variant passes it."""
    from pipelines import training
    from pipelines.gates.fairness import group_report
    from pipelines.gates.parity import parity_verdict
    from pipelines.onnx import export as onnx_export
    from pipelines.onnx.quantize import choose_variant

    spec = ctx.spec
    if not spec.data.sensitive_features or "quantization_parity" in spec.gates.waive:
        return plan
    sensitive = parts["test"][spec.data.sensitive_features]
    answers = answers or (lambda path: onnx_export.predict(path, parts["x_test"]))

    def report(variant: str) -> dict:
        outputs = answers(paths[variant])
        labels = outputs if data.task == "regression" else outputs.argmax(axis=1)
        return group_report(parts["y_test"], labels, sensitive, spec.responsible_ai.fairness.min_group_size,
                            len(parts["classes"]))

    fp32 = next(c for c in plan.candidates if c.variant == "fp32")
    scale = training.regression_metrics(answers(paths["fp32"]), parts["y_test"])["mae"] \
        if data.task == "regression" else 1.0
    base = None
    candidates = []
    for candidate in plan.candidates:
        if candidate.variant != "fp32" and candidate.eligible and candidate.variant in paths:
            base = base if base is not None else report("fp32")
            verdict = parity_verdict(candidate.variant, fp32.accuracy, candidate.accuracy, base,
                                     report(candidate.variant), spec.export.accuracy_budget,
                                     spec.gates.quantization_fairness_change, metric=plan.metric, gap_scale=scale)
            if not verdict.passed:
                note = "; ".join(filter(None, [candidate.note, f"fails quantization parity: {verdict.reason}"]))
                candidate = candidate.model_copy(update={"eligible": False, "note": note})
        candidates.append(candidate)
    if candidates == plan.candidates:
        return plan
    chosen, reason = choose_variant(candidates, spec.export.accuracy_budget, spec.export.max_artifact_bytes,
                                    metric=plan.metric)
    return plan.model_copy(update={"candidates": candidates, "chosen": chosen, "reason": reason})


# -- registry, store, Git ----------------------------------------------------------------------




def register(spec_path: str | Path, data: DataCheck, trained: TrainedModel, exported: ExportedModel,
             plan: QuantizationPlan, trigger: str = "manual",
             settings: Settings | None = None, options: ReleaseOptions | None = None) -> RegisteredVersion:
    """Register the chosen variant in MLflow with its provenance and the parameters of the
    run that created it (`release.*` tags); alias `candidate`."""
    from pipelines import registry
    from pipelines.onnx import export as onnx_export

    ctx = stage_context(spec_path, data, settings)
    spec = ctx.spec
    chosen = plan.chosen_candidate
    onnx_path = ctx.fetch(chosen.uri)
    if sha256_file(onnx_path) != chosen.sha256:
        raise ReleaseError(f"{chosen.uri}: sha256 differs from the quantization record")
    parts = splits(ctx, data)
    example = parts["x_test"].head(5)
    if trained.framework == "torch" or len(onnx_export.session(onnx_path).get_inputs()) == 1:
        example = example.to_numpy("float32")
    output = onnx_export.predict(onnx_path, parts["x_test"].head(5)).astype("float32")
    params = {
        "framework": trained.framework, "task": data.task,
        "model_type": spec.training.model_type,
        "seed": str(spec.training.seed), "opset": str(exported.opset),
        "quantization.modes": ",".join(spec.export.quantization),
        "quantization.chosen": plan.chosen, "rows": str(data.rows),
        "features": str(len(data.features)),
        **{f"param.{k}": registry.json_safe(v) for k, v in sorted(spec.training.params.items())},
        **_federated_params(trained),
    }
    metrics = {f"test_{k}": v for k, v in trained.metrics.items()}
    if trained.federated is not None:
        metrics.update(_federated_metrics(trained.federated))
    metrics["train_seconds"] = trained.train_seconds
    if exported.max_abs_diff is not None:
        metrics.update({"onnx_max_abs_diff": exported.max_abs_diff, "onnx_label_agreement": exported.label_agreement})
    for candidate in plan.candidates:
        if candidate.size_bytes:
            metrics.update({f"{candidate.variant}_size_bytes": candidate.size_bytes,
                            f"{candidate.variant}_accuracy": candidate.accuracy,
                            f"{candidate.variant}_latency_p50_ms": candidate.latency_p50_ms,
                            f"{candidate.variant}_latency_p95_ms": candidate.latency_p95_ms})
    tags = {
        "data_sha256": data.sha256, "data_source": data.source, "spec_sha256": spec.digest(),
        "code_digest": code_digest(), "code_revision": code_revision(), "trigger": trigger,
        "variant": plan.chosen, "artifact_sha256": chosen.sha256, "owner": spec.owner,
        **{f"source.{k}": v for k, v in trained.source.items()},
        "finops.cost_center": spec.finops.cost_center, "finops.project": spec.finops.project,
        **{f"version.{k}": v for k, v in {**library_versions(), "mlflow": _version("mlflow")}.items()},
        **(options or ReleaseOptions()).tags(), **({"release.salt": data.salt} if data.salt else {}),
    }
    return registry.with_retries(lambda: registry.register_version(
        tracking_uri=ctx.settings.tracking_uri, artifact_root=ctx.settings.mlflow_artifacts,
        model=spec.name, release_key=data.release_key, onnx_path=onnx_path,
        framework=trained.framework, signature_input=example, signature_output=output,
        params=params, metrics=metrics, tags=tags,
        artifacts={"quantization.json": plan.to_xcom(), "data_validation.json": data.to_xcom(),
                   "spec.json": spec.model_dump(mode="json"),
                   **({"federated.json": trained.federated.model_dump(mode="json")} if trained.federated else {})},
        run_name=f"{spec.name}-{data.release_key[:12]}", description=spec.description,
        # A forced retrain asks for a new version even when the bytes come out the same.
        same_bytes_same_version=not data.salt, series=_federated_series(trained),
    ), _redact(ctx.settings.tracking_uri))


def _federated_params(trained: TrainedModel) -> dict[str, str]:
    fed = trained.federated
    if fed is None:
        return {}
    params = {"training.mode": "federated", "federated.strategy": fed.strategy, "federated.rounds": str(fed.rounds),
              "federated.clients": str(fed.clients), "federated.federation": fed.federation}
    if fed.privacy is not None:
        params.update({"dp.mechanism": fed.privacy.mechanism, "dp.noise_multiplier": str(fed.privacy.noise_multiplier),
                       "dp.max_grad_norm": str(fed.privacy.max_grad_norm), "dp.delta": str(fed.privacy.delta)})
    return params


def _federated_metrics(fed) -> dict[str, float]:
    metrics = {"federated.worst_client_accuracy": fed.worst_client["accuracy"]} if fed.worst_client else {}
    if fed.privacy is not None:
        metrics["dp.epsilon"] = fed.privacy.epsilon
    return metrics


def _federated_series(trained: TrainedModel) -> dict[str, list[tuple[int, float]]]:
    """A federated training's per-round figures, as MLflow metrics at the round's step."""
    if trained.federated is None:
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in trained.federated.per_round:
        for key in ("train_loss", "evaluate_loss", "evaluate_accuracy", "seconds", "bytes_per_client", "epsilon"):
            if entry.get(key) is not None:
                series.setdefault(f"federated.{key}", []).append((int(entry["round"]), float(entry[key])))
    return series


def _redact(uri: str) -> str:
    from pipelines.gitops.repo import redact

    return redact(uri)


def decide(spec_path: str | Path, data: DataCheck, verdicts: list[GateVerdict], options: ReleaseOptions | None = None,
           settings: Settings | None = None) -> Decision:
    """What the verdicts mean: any failed gate rejects; all passed releases, or asks a person
    when the spec says manual or the run's options ask for it (a run can ask more than its
    spec, never less)."""
    ctx = stage_context(spec_path, data, settings)
    failed = [v for v in verdicts if not v.passed]
    if failed:
        return Decision(outcome="reject", failed_gates=[v.gate for v in failed],
                        reasons=[f"{v.gate}: {v.reason}" for v in failed])
    if ctx.spec.approval.mode == "manual":
        return Decision(outcome="await_approval", reasons=["the spec asks for a person's approval"])
    if options is not None and options.approval == "manual":
        return Decision(outcome="await_approval",
                        reasons=["the run's approval parameter asks for a person's approval (the spec says auto)"])
    return Decision(outcome="release")


def all_verdicts(gates: list[GateVerdict], cost: CostReport) -> list[GateVerdict]:
    """Every verdict a release is decided on: the responsible-AI gates' and the edge cost gates'."""
    return [*gates, *cost.verdicts]


def next_step(decision: Decision, options: ReleaseOptions | None = None,
              approval: Approval | None = None) -> str:
    """What follows the decision: `publish`, `ask` (a person must approve first) or `stop`
    (rejected, a dry run, or a person said no)."""
    if (options is not None and options.dry_run) or decision.outcome == "reject":
        return "stop"
    if decision.outcome == "release":
        return "publish"
    if approval is None:
        return "ask"
    return "publish" if approval.approved else "stop"


def publish(spec_path: str | Path, registered: RegisteredVersion, plan: QuantizationPlan,
            card: ModelCard | None = None, cost: CostReport | None = None,
            settings: Settings | None = None) -> PublishedArtifact:
    """Copy the chosen ONNX file (and its model card) to their content-addressed place in the
    store, verify the sha256 of what landed, and write the completion marker last."""
    ctx = context(spec_path, settings)
    chosen = plan.chosen_candidate
    folder = f"models/{ctx.spec.name}/{chosen.sha256}"
    uploads = {"model.onnx": (chosen.uri, chosen.sha256)}
    # The same bytes may be evaluated again under another spec: each card (and the cost rows
    # that go with it) has a place of its own beside the model.
    cards = f"cards/{card.sha256}/" if card is not None else ""
    if card is not None:
        uploads[f"{cards}model_card.json"] = (card.json_uri, card.sha256)
        uploads[f"{cards}model_card.html"] = (card.html_uri, None)
    if cost is not None:
        uploads[f"{cards}focus.csv"] = (cost.evidence["focus.csv"], None)
    # Every other variant that passed its gates is signed and kept beside the chosen one: the
    # device groups that run it now, and those a budget policy may switch to (finops.onBreach).
    others = {c.variant: c for c in plan.candidates
              if cost and c.variant != plan.chosen and (c.eligible or c.variant in cost.variants_in_use())}
    for variant, candidate in others.items():
        uploads[f"variants/{variant}/model.onnx"] = (candidate.uri, candidate.sha256)
    from pipelines.gitops.signing import sign_artifact, verify_artifact

    private_key, public_key = ctx.settings.signing_keys()
    uploaded = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, (uri, expected) in uploads.items():
            key = f"{folder}/{name}"
            if not ctx.store.exists(key):
                ctx.store.put_file(ctx.fetch(uri), key)
                uploaded = True
            if expected is None:
                continue
            copy = ctx.store.get_file(key, Path(tmp) / name)
            digest = sha256_file(copy)
            if digest != expected:
                raise StoreError(f"{ctx.store.uri(key)}: sha256 after upload is {digest}, expected {expected}")
            if name.endswith(".onnx"):
                # Sign what landed in the store, then verify the stored bundle against the stored
                # bytes with the public key, as a device will.
                if not ctx.store.exists(f"{key}.sig"):
                    bundle = sign_artifact(copy, Path(tmp) / f"{name}.sig", private_key)
                    ctx.store.put_file(bundle, f"{key}.sig")
                verify_artifact(copy, ctx.store.get_file(f"{key}.sig", Path(tmp) / f"{name}.sig.stored"),
                                public_key)
        size = (Path(tmp) / "model.onnx").stat().st_size
    # The marker goes last: a reader that sees it knows the artifact is complete.
    ctx.store.put_bytes(json.dumps({"model": ctx.spec.name, "version": registered.version,
                                    "sha256": chosen.sha256, "size_bytes": size, "variant": plan.chosen,
                                    "model_card_sha256": card.sha256 if card else None},
                                   sort_keys=True).encode(), f"{folder}/model.json")
    return PublishedArtifact(
        uri=ctx.store.uri(f"{folder}/model.onnx"), sha256=chosen.sha256, size_bytes=size, uploaded=uploaded,
        signature_uri=ctx.store.uri(f"{folder}/model.onnx.sig"),
        model_card_uri=ctx.store.uri(f"{folder}/{cards}model_card.json") if card else None,
        model_card_html_uri=ctx.store.uri(f"{folder}/{cards}model_card.html") if card else None,
        model_card_sha256=card.sha256 if card else None,
        variants={v: {"uri": ctx.store.uri(f"{folder}/variants/{v}/model.onnx"), "sha256": c.sha256,
                      "size_bytes": c.size_bytes,
                      "signature_uri": ctx.store.uri(f"{folder}/variants/{v}/model.onnx.sig")}
                  for v, c in others.items()},
    )


def _verdict_lines(verdicts: list[GateVerdict]) -> str:
    return "".join(f"  {'waived' if v.waived else 'pass' if v.passed else 'FAIL'}  {v.gate}: {v.reason}\n"
                   for v in verdicts)


def _cost_brief(cost: CostReport | None) -> dict | None:
    from pipelines.finops.cost import CostEstimate

    return CostEstimate.model_validate(cost.estimate).brief() if cost else None


def _cost_diff_lines(cost: CostReport) -> list[str]:
    from pipelines.finops.cost import diff_lines

    return diff_lines(cost.diff)


def initial_rollout(spec: ModelSpec, version: str, current: dict | None) -> dict | None:
    """`spec.rollout` for a release of `version` given the deployed base manifest (None: none).

    RollingUpdate and first releases go to every device (no rollout section). A re-run of the
    release that is already deployed keeps its progress. A new version during a canary keeps
    the control on the version the control devices run.
    """
    if spec.deployment_strategy.type != "Canary" or current is None:
        return None
    deployed = str(current["spec"]["modelRef"]["version"])
    rollout = current["spec"].get("rollout")
    if deployed == str(version):
        return rollout
    control = rollout.get("previousVersion", deployed) if rollout and rollout.get("share", 100) < 100 else deployed
    steps = spec.deployment_strategy.canary.steps
    return {"share": steps[0].share, "step": 1, "steps": len(steps), "previousVersion": control}


def commit(spec_path: str | Path, data: DataCheck, trained: TrainedModel, registered: RegisteredVersion,
           published: PublishedArtifact, plan: QuantizationPlan, verdicts: list[GateVerdict] = (),
           approval: Approval | None = None, cost: CostReport | None = None,
           settings: Settings | None = None) -> GitOpsCommit:
    """Render the MobileAIModelDeployment, commit it to the GitOps remote, and move the
    MLflow alias `champion` to this version once the commit has landed."""
    from pipelines import registry
    from pipelines.edge.desired_state import attest_commit
    from pipelines.gitops import manifest, repo

    ctx = stage_context(spec_path, data, settings)
    spec, settings = ctx.spec, ctx.settings
    if registered.release_key and registered.release_key != data.release_key:
        # A rebuild whose bytes came out the same: the version's facts are the release's that built it.
        plan = ctx.load_record(registered.release_key, "quantization.json", QuantizationPlan) or plan
        trained = ctx.load_record(registered.release_key, "train.json", TrainedModel) or trained
    tags = registry.client(settings.tracking_uri).get_model_version(spec.name, registered.version).tags
    if tags.get("release_status") == "rolled_back":
        raise ReleaseError(
            f"{spec.name} version {registered.version} was rolled back by {tags.get('rolled_back_by')} "
            f"({tags.get('rollback_reason')}); it is not committed again. Release a new version.")
    author = (settings.git_author_name, settings.git_author_email)
    repo.ensure_remote(settings.remote, settings.gitops_branch, author)
    deployed = repo.read_file(settings.remote, settings.gitops_branch,
                              manifest.base_manifest_path(spec.name), settings.work_dir / "gitops")
    current = manifest.read_manifest(deployed) if deployed else None
    rollout = initial_rollout(spec, registered.version, current)
    # The deployed version again, under changed deployment fields of the spec: a deploy commit.
    verb = "deploy" if current and str(current["spec"]["modelRef"]["version"]) == str(registered.version) \
        else "release"
    files = manifest.render_release_files(spec, manifest.ManifestInputs(
        rollout=rollout,
        model_version=registered.version, mlflow_run_id=registered.run_id,
        release_key=registered.release_key or data.release_key,
        source_uri=published.uri, sha256=published.sha256, size_bytes=published.size_bytes,
        variant=plan.chosen, metrics=trained.metrics, verdicts=[v.brief() for v in verdicts],
        signature_uri=published.signature_uri,
        model_card_uri=published.model_card_uri, model_card_sha256=published.model_card_sha256,
        cost=_cost_brief(cost), explain_endpoint=manifest.explain_endpoint(spec.name, settings),
        training=manifest.training_block(trained.federated),
        group_variants={group: {"variant": variant, "sourceUri": published.variants[variant]["uri"],
                                "sha256": published.variants[variant]["sha256"],
                                "sizeBytes": published.variants[variant]["size_bytes"],
                                "signatureUri": published.variants[variant]["signature_uri"]}
                        for group, variant in (cost.group_variants if cost else {}).items()
                        if variant != plan.chosen},
    ))
    chosen = plan.chosen_candidate
    approved = f"Approved by: {approval.by} at {approval.at}{': ' + approval.comment if approval.comment else ''}\n" \
        if approval else f"Approval: {spec.approval.mode}\n"
    message = (
        f"{verb}({spec.name}): version {registered.version} ({plan.chosen})\n\n"
        f"Model: {spec.name}\nVersion: {registered.version}\nMLflow run: {registered.run_id}\n"
        f"Artifact: {published.uri}\nSHA256: {published.sha256}\n"
        f"Release key: {registered.release_key or data.release_key}\n"
        f"Metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(trained.metrics.items())) + "\n"
        f"Variant: {plan.chosen}, {chosen.size_bytes} bytes, p95 {chosen.latency_p95_ms:.3f} ms on the build host\n"
        f"Why: {plan.reason}\n" + (f"Gates:\n{_verdict_lines(verdicts)}" if verdicts else "") + approved
        + ("\n" + "\n".join(_cost_diff_lines(cost)) + "\n" if cost else "")
        + (f"Rollout: canary at {rollout['share']}% of each device group (step {rollout['step']} of "
           f"{rollout['steps']}), control v{rollout['previousVersion']}\n" if rollout else "")
    )
    files[f"apps/{spec.name}/RELEASE.md"] = _release_notes(spec, registered, published, plan, verdicts, approval, cost)
    review = [t.name for t in spec.targets if t.requires_review]
    files = attest_commit(settings, spec.name, files,
                          branch=f"release/{spec.name}/{registered.version}" if review else None)
    if review:
        # A device group that requires review puts the whole release on a review branch: the
        # base manifest is shared by every group, so no group can move without the others.
        result = repo.propose_release(settings.remote, settings.gitops_branch,
                                      f"release/{spec.name}/{registered.version}", spec.name, files, message,
                                      author, settings.work_dir / "gitops")
        if result.branch != settings.gitops_branch:
            registry.mark_version(settings.tracking_uri, spec.name, registered.version,
                                  {"release_status": "in_review", "gitops_review_branch": result.branch,
                                   "gitops_commit": result.commit})
            return result
    else:
        result = repo.commit_release(settings.remote, settings.gitops_branch, spec.name, files, message, author,
                                     settings.work_dir / "gitops")
    registry.mark_version(settings.tracking_uri, spec.name, registered.version,
                          {"release_status": "released", "gitops_commit": result.commit},
                          alias=registry.CHAMPION_ALIAS)
    return result


def _release_notes(spec, registered: RegisteredVersion, published: PublishedArtifact, plan: QuantizationPlan,
                   verdicts: list[GateVerdict], approval: Approval | None, cost: CostReport | None) -> str:
    """apps/<model>/RELEASE.md: what this release is and why it may ship (also the description
    of its pull request when a device group requires review)."""
    review = [t.name for t in spec.targets if t.requires_review]
    lines = [f"# {spec.name} version {registered.version}", "",
             f"Variant **{plan.chosen}**, `sha256:{published.sha256}`, {published.size_bytes:,} bytes.",
             f"MLflow run `{registered.run_id}`. Artifact: {published.uri}",
             f"Model card: {published.model_card_html_uri or 'none'}", ""]
    if review:
        lines += [f"Device groups that require review: {', '.join(review)}. Merge this branch to release.", ""]
    lines += ["| gate | result | reason |", "|---|---|---|"]
    lines += [f"| {v.gate} | {'waived' if v.waived else 'pass' if v.passed else 'FAIL'} | "
              f"{v.reason.replace('|', '/')} |" for v in verdicts]
    if cost:
        lines += ["", "```", *_cost_diff_lines(cost), "```"]
    lines += ["", f"Quantization: {plan.reason}"]
    if approval:
        lines += ["", f"Approved by {approval.by} at {approval.at}."]
    return "\n".join(lines) + "\n"


def summarize(spec_path: str | Path, data: DataCheck, trained: TrainedModel, plan: QuantizationPlan,
              registered: RegisteredVersion, verdicts: list[GateVerdict], decision: Decision,
              published: PublishedArtifact | None, committed: GitOpsCommit | None, card: ModelCard | None,
              approval: Approval | None, stages: dict[str, float], trigger: str, cost: CostReport | None = None,
              settings: Settings | None = None, options: ReleaseOptions | None = None,
              attempt_id: str = "") -> ReleaseSummary:
    """The release's outcome in one record. A version that was not committed is tagged
    `release_status=rejected` (or `awaiting_approval`) in MLflow with the reasons, unless an
    earlier run shipped it: it then keeps its status and its summary, and this run's outcome
    is in the model's latest summary and the run's attempt. A version this run committed is
    tagged with its `trigger`. With `attempt_id` (the run's id), the run's attempt record is
    finished with the summary (`pipelines.release.attempts`).

    A dry run says what the decision was (`would`); its summary is kept apart from the
    releases' (`latest-dry-run.json`), and a version that an earlier run released keeps its
    status (the dry run adds `dry_run.*` tags only)."""
    from pipelines import registry
    from pipelines.release.gates import shipped_variants

    ctx = stage_context(spec_path, data, settings)
    # The salt actually in the release key: a plain run may resume a forced release's.
    options = (options or ReleaseOptions()).model_copy(update={"salt": data.salt})
    would = None
    if options.dry_run:
        status, would = "dry_run", decision.outcome
        reasons = [f"dry run: {_WOULD[decision.outcome]}; nothing was published or committed", *decision.reasons]
    elif committed is not None and committed.branch.startswith("release/"):
        status = "in_review"
        reasons = [f"review: committed to branch {committed.branch}; merging it releases to the fleet"]
    elif committed is not None:
        status, reasons = "released", []
    elif decision.outcome == "reject":
        status, reasons = "rejected", decision.reasons
    elif approval is not None and not approval.approved:
        status = "rejected"
        reasons = [f"approval: rejected by {approval.by} at {approval.at}"
                   + (f": {approval.comment}" if approval.comment else "")]
    else:
        status = "awaiting_approval"
        reasons = [f"approval: waiting for a person ({'; '.join(decision.reasons) or 'manual approval'})"]
    mlflow_client = registry.client(ctx.settings.tracking_uri)
    current = mlflow_client.get_model_version(ctx.spec.name, registered.version).tags.get("release_status")
    # A version an earlier run shipped keeps its status and its summary when a later run of it
    # stops short (waits for a person again, or is rejected): that run is its attempt's record.
    kept = status not in ("released", "in_review") and current in ("released", "in_review", "rolled_back")
    if status == "dry_run":
        tags = {"dry_run.outcome": would, "dry_run.reasons": " | ".join(reasons)}
        if not kept:
            tags["release_status"] = "dry_run"
        registry.mark_version(ctx.settings.tracking_uri, ctx.spec.name, registered.version, tags)
        log.warning("%s v%s DRY RUN: %s", ctx.spec.name, registered.version, "; ".join(reasons))
    elif status not in ("released", "in_review"):
        if not kept:
            registry.mark_version(ctx.settings.tracking_uri, ctx.spec.name, registered.version,
                                  {"release_status": status, "release_reasons": " | ".join(reasons)})
        log.warning("%s v%s %s: %s", ctx.spec.name, registered.version, status.upper(), "; ".join(reasons))
    elif committed is not None and committed.created:
        # The version names the run that released it (its `trigger` tag was set when it was registered).
        registry.mark_version(ctx.settings.tracking_uri, ctx.spec.name, registered.version, {"trigger": trigger})
    summary = ReleaseSummary(
        model=ctx.spec.name, model_version=registered.version, status=status, reasons=reasons,
        release_key=data.release_key, run_id=registered.run_id, trigger=trigger,
        artifact_uri=published.uri if published else None, artifact_sha256=plan.chosen_candidate.sha256,
        gitops_commit=committed.commit if committed else None,
        gitops_commit_created=bool(committed and committed.created), quantization=plan, metrics=trained.metrics,
        shipped=shipped_variants(ctx, data, plan, cost),
        task=data.task + (" (inferred from the target)" if data.task_inferred else ""), model_source=trained.source,
        federated=trained.federated, verdicts=verdicts, approval=approval,
        model_card_uri=(published.model_card_html_uri if published else None) or (card.html_uri if card else None),
        cost=cost.estimate if cost else None, cost_diff=cost.diff if cost else None,
        stages={k: round(v, 3) for k, v in stages.items()}, options=options, would=would,
    )
    if status in ("released", "in_review") and options.force_retrain and data.salt:
        # Plain runs of these inputs now resume this release (see validate_data).
        ctx.save_record(release_key(data.sha256, ctx.spec.model_digest()), FORCED_RELEASE,
                        ReleaseOptions(force_retrain=True, salt=data.salt, reason=options.reason))
    suffix = "-dry-run" if status == "dry_run" else ""
    ctx.save_record(evaluation_folder(data, registered), f"summary{suffix}.json", summary)
    if status == "dry_run" or not kept:
        # The version's latest summary, beside the release that built it (what Edge Releases reads).
        ctx.save_record(registered.release_key or data.release_key, f"summary{suffix}.json", summary)
    ctx.store.put_bytes(summary.model_dump_json(indent=2).encode(), f"releases/{ctx.spec.name}/latest{suffix}.json")
    if attempt_id:
        from pipelines.release.attempts import finish_attempt

        finish_attempt(summary, attempt_id, ctx.store)
    return summary


_WOULD = {"release": "would release (every gate passed)", "await_approval": "would wait for a person's approval",
          "reject": "would be rejected"}


def latest_summary(model: str, settings: Settings | None = None, dry_run: bool = False) -> ReleaseSummary | None:
    """The model's latest release summary (or its latest dry run's); None before the first."""
    settings = settings or get_settings()
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    key = f"releases/{model}/latest{'-dry-run' if dry_run else ''}.json"
    return ReleaseSummary.model_validate_json(store.read_bytes(key)) if store.exists(key) else None


def run_release(spec_path: str | Path, trigger: str = "cli", approval: Approval | None = None,
                settings: Settings | None = None, options: ReleaseOptions | None = None,
                attempt_id: str | None = None) -> ReleaseSummary:
    """Every stage in order, in this process (the CLI's path; the DAG runs the same calls).

    A spec (or `options.approval`) asking for manual approval stops before publishing unless
    `approval` is given (the CLI's `--approve-as`); the decision is recorded with the release.
    A dry run stops after the decision.

    The run is an attempt (`pipelines.release.attempts`) under `attempt_id` (default: a new
    `cli__…` id): `running` from the start, then its outcome, or `failed` with the stage
    that raised and the error, which is raised again.
    """
    from pipelines.release import attempts

    ctx = context(spec_path, settings)
    run_id = attempt_id or attempts.new_run_id()
    attempts.start_attempt(ctx.spec.name, run_id, trigger, ctx.store)
    progress: dict[str, str] = {"stage": STAGES[0]}
    try:
        return _run_stages(spec_path, trigger, approval, settings, options or ReleaseOptions(), run_id, progress)
    except BaseException as error:
        try:
            attempts.fail_attempt(ctx.spec.name, run_id, progress["stage"], error, ctx.store, trigger,
                                  progress.get("version"), (Path(spec_path).parent, ctx.settings.state))
        except Exception as unrecorded:  # noqa: BLE001 (the release's own error is the one to raise)
            log.warning("%s: the failed attempt %s was not recorded: %s", ctx.spec.name, run_id, unrecorded)
        raise


def _run_stages(spec_path: str | Path, trigger: str, approval: Approval | None, settings: Settings | None,
                options: ReleaseOptions, attempt_id: str, progress: dict[str, str]) -> ReleaseSummary:
    """`run_release`'s stages; `progress` names the stage running (and the version, once registered)."""
    import time

    from pipelines.release import gates

    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        progress["stage"] = name
        start = time.perf_counter()
        result = fn(*args, settings=settings, **kwargs)
        timings[name] = time.perf_counter() - start
        log.info("%s: %.2f s", name, timings[name])
        return result

    data = timed("validate_data", validate_data, spec_path, salt=options.salt)
    trained = timed("train", train, spec_path, data)
    exported = timed("export", export, spec_path, data, trained)
    plan = timed("quantize", quantize, spec_path, data, exported)
    registered = timed("register", register, spec_path, data, trained, exported, plan, trigger, options=options)
    progress["version"] = registered.version
    cost = timed("edge_cost", gates.edge_cost, spec_path, data, trained, plan, registered)
    verdicts = [
        timed("quality_gate", gates.quality_gate, spec_path, data, plan, registered),
        timed("fairness_gate", gates.fairness_gate, spec_path, data, plan, registered, cost),
        timed("parity_gate", gates.parity_gate, spec_path, data, plan, registered, cost),
        timed("drift_gate", gates.drift_gate, spec_path, data, plan, registered),
    ]
    verdicts = all_verdicts(verdicts, cost)
    explanation = timed("explain", gates.explain, spec_path, data, plan, registered)
    card = timed("model_card", gates.model_card, spec_path, data, trained, plan, registered, verdicts, explanation,
                 cost)
    decision = timed("decide", decide, spec_path, data, verdicts, options)
    go = next_step(decision, options, approval) == "publish"
    published = committed = None
    if go:
        published = timed("publish", publish, spec_path, registered, plan, card, cost)
        committed = timed("commit", commit, spec_path, data, trained, registered, published, plan, verdicts,
                          approval, cost)
        if committed.branch == (settings or get_settings()).gitops_branch:
            # Without Airflow no publisher DAG runs after the commit: devices get it now.
            from pipelines.edge.publish import publish_after_commit

            publish_after_commit(settings or get_settings())
    progress["stage"] = "summarize"
    return summarize(spec_path, data, trained, plan, registered, verdicts, decision, published, committed, card,
                     approval if decision.outcome == "await_approval" and not options.dry_run else None, timings,
                     trigger, cost, settings, options, attempt_id)
