"""The gate stages of a release: quality, fairness, quantization parity, drift, explanation,
the model card, and the decision they add up to.

Each stage evaluates the exact ONNX variant that would ship (through onnxruntime), writes
its evidence to the artifact store under `runs/<model>/<release key>/evidence/<gate>/`,
attaches the evidence and figures to the version's MLflow run, and returns a record. Like
every stage it is idempotent: a stored verdict is returned as it is.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from pipelines.records import (
    CostReport,
    DataCheck,
    Explanation,
    GateVerdict,
    ModelCard,
    QuantizationPlan,
    RegisteredVersion,
    ShippedVariant,
    TrainedModel,
)
from pipelines.release.context import Context, evaluation_folder, resume, splits, stage_context, variant_outputs
from pipelines.settings import Settings

log = logging.getLogger(__name__)


def _evidence_key(ctx: Context, data: DataCheck, registered: RegisteredVersion, gate: str, name: str) -> str:
    return ctx.run_key(evaluation_folder(data, registered), f"evidence/{gate}/{name}")


def _publish_evidence(ctx: Context, data: DataCheck, registered: RegisteredVersion, verdict: GateVerdict,
                      files: list[Path]) -> GateVerdict:
    """Upload evidence files, log the verdict to MLflow, store the verdict record (last)."""
    from pipelines import registry

    evidence = dict(verdict.evidence)
    for path in files:
        evidence[path.name] = ctx.store.put_file(path, _evidence_key(ctx, data, registered, verdict.gate, path.name),
                                                  retain_until=ctx.audit_until())
    verdict = verdict.model_copy(update={"evidence": evidence})
    registry.log_verdict(ctx.settings.tracking_uri, registered.run_id, verdict, files)
    return verdict


def _shipped(plan: QuantizationPlan, cost: CostReport | None) -> list[str]:
    """Every variant that ships to some device group (the base one first)."""
    return list(dict.fromkeys([plan.chosen, *(cost.variants_in_use() if cost else [])]))


def _evaluation(ctx: Context, data: DataCheck, plan: QuantizationPlan, variants: list[str] | None = None) -> dict:
    """Test split, and the answers of fp32 and of the shipped variants on it (class
    probabilities, or a regression's predictions) under `proba`, and the predicted labels (or
    values) under `predicted`."""
    parts = splits(ctx, data)
    wanted = {"fp32", plan.chosen, *(variants or [])}
    chosen = [c for c in plan.candidates if c.variant in wanted]
    paths = {c.variant: ctx.fetch(c.uri) for c in chosen}
    proba = {c.variant: variant_outputs(ctx, data, c.sha256, c.uri, parts["x_test"]) for c in chosen}
    predicted = {v: p if data.task == "regression" else p.argmax(axis=1) for v, p in proba.items()}
    return {**parts, "paths": paths, "proba": proba, "predicted": predicted, "n_classes": len(parts["classes"]),
            "task": data.task}


def shipped_variants(ctx: Context, data: DataCheck, plan: QuantizationPlan,
                     cost: CostReport | None) -> list[ShippedVariant]:
    """Each variant that ships (the base one first) with the device groups that run it and its
    metrics on the held-out rows (a release's headline figures): the answers the quantization
    plan scored (stored once per release), scored as the quality gate scores them."""
    from pipelines import training

    parts = splits(ctx, data)
    groups = {g["group"]: g.get("variant") or plan.chosen for g in (cost.estimate.get("groups") or [])} if cost else {}
    out = []
    for variant in _shipped(plan, cost):
        candidate = next(c for c in plan.candidates if c.variant == variant)
        outputs = variant_outputs(ctx, data, candidate.sha256, candidate.uri, parts["x_test"])
        runs = [g for g, v in groups.items() if v == variant]
        if groups and not runs:
            continue  # the manifest's base, overridden in every group
        out.append(ShippedVariant(variant=variant, groups=runs,
                                  metrics=training.task_metrics(data.task, outputs, parts["y_test"])))
    return out


# -- quality -----------------------------------------------------------------------------------
def deployed_manifest(ctx: Context) -> dict | None:
    """The manifest the GitOps repository deploys now for this model (None before the first release)."""
    from pipelines.gitops import manifest, repo

    text = repo.read_file(ctx.settings.remote, ctx.settings.gitops_branch,
                          manifest.base_manifest_path(ctx.spec.name), ctx.settings.work_dir / "gitops")
    return manifest.read_manifest(text) if text else None


def _champion_metrics(ctx: Context, data: DataCheck, parts: dict, registered: RegisteredVersion,
                      candidate_sha: str) -> tuple[dict | None, str | None, str, str]:
    """Metrics of the deployed model on the candidate's evaluation rows, its version, sha, and a note.

    The notes stay true after the candidate lands: no champion when it was evaluated, or the
    candidate is the deployed champion itself (nothing else to compare it with)."""
    import onnx

    from pipelines import training
    from pipelines.onnx import export as onnx_export
    from pipelines.storage import sha256_file

    deployed = deployed_manifest(ctx)
    if deployed is None:
        return (None, None, "none",
                f"no champion deployed when v{registered.version} was evaluated, nothing to compare against")
    ref = deployed["spec"]["modelRef"]
    version, checksum = str(ref["version"]), ref["checksum"].removeprefix("sha256:")
    if version == str(registered.version):
        return None, version, checksum, f"v{version} is the deployed champion itself"
    if checksum == candidate_sha:
        return None, version, checksum, f"the deployed champion v{version} is this very artifact"
    try:
        path = ctx.fetch(ref["sourceUri"])
    except Exception as error:  # a champion outside this store, or gone: say so, do not guess
        return None, version, checksum, f"champion v{version} artifact not readable here ({error})"
    if sha256_file(path) != checksum:
        return None, version, checksum, f"champion v{version} artifact does not match its checksum"
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    task = meta.get("edge.task", "binary" if len(parts["classes"]) == 2 else "multiclass")
    if json.loads(meta.get("edge.features", "[]")) != data.features or task != data.task or \
            json.loads(meta.get("edge.classes", "[]")) != parts["classes"]:
        return None, version, checksum, f"champion v{version} has other features, task or classes: not comparable"
    outputs = onnx_export.predict(path, parts["x_test"])
    return training.task_metrics(data.task, outputs, parts["y_test"]), version, checksum, ""


def quality_gate(spec_path: str | Path, data: DataCheck, plan: QuantizationPlan, registered: RegisteredVersion,
                 settings: Settings | None = None) -> GateVerdict:
    """Candidate (shipped variant) vs absolute thresholds and vs the deployed champion."""
    from pipelines import training
    from pipelines.gates import waived
    from pipelines.gates.quality import quality_verdict

    ctx = stage_context(spec_path, data, settings)
    if "quality" in ctx.spec.gates.waive:
        return waived("quality", ctx.spec.gates.waive["quality"])
    ev = _evaluation(ctx, data, plan)
    champion, version, champion_sha, note = _champion_metrics(ctx, data, ev, registered, plan.chosen_candidate.sha256)
    # The champion is part of this verdict's identity: a new deployment means a new comparison.
    # When the champion is this very artifact (a re-run after the release landed), the verdict
    # that let it land stands; comparing it with itself would only rewrite the manifest.
    name = f"gates/quality-{champion_sha[:16]}.json"
    for key in ((name, "gates/quality.json") if champion_sha == plan.chosen_candidate.sha256 else (name,)):
        cached = ctx.load_record(evaluation_folder(data, registered), key, GateVerdict)
        if cached is not None:
            return cached
    candidate = training.task_metrics(data.task, ev["proba"][plan.chosen], ev["y_test"])
    verdict = quality_verdict(ctx.spec.gates.quality_for(data.task), candidate, champion, version, note)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "quality.json"
        report.write_text(json.dumps({"candidate": candidate, "champion": champion, "champion_version": version,
                                      "variant": plan.chosen, "rows": len(ev["y_test"]), "note": note,
                                      "task": data.task, **_per_class(ev, plan.chosen)}, indent=2))
        verdict = _publish_evidence(ctx, data, registered, verdict, [report])
    ctx.save_record(evaluation_folder(data, registered), "gates/quality.json", verdict)
    return ctx.save_record(evaluation_folder(data, registered), name, verdict)


def _per_class(ev: dict, variant: str) -> dict:
    """A classifier's precision, recall, F1 and support per class (scikit-learn's report)."""
    if ev["task"] == "regression":
        return {}
    from sklearn.metrics import classification_report

    labels = list(range(len(ev["classes"])))
    report = classification_report(ev["y_test"], ev["predicted"][variant], labels=labels,
                                   target_names=ev["classes"], output_dict=True, zero_division=0)
    return {"per_class": {name: {k: round(float(v), 6) for k, v in report[name].items()} for name in ev["classes"]}}


# -- fairness and quantization parity ------------------------------------------------------------
def _group_reports(ctx: Context, ev: dict, variants: list[str]) -> dict[str, dict]:
    from pipelines.gates.fairness import group_report

    sensitive = ev["test"][ctx.spec.data.sensitive_features]
    fairness = ctx.spec.responsible_ai.fairness
    return {v: group_report(ev["y_test"], ev["predicted"][v], sensitive, fairness.min_group_size,
                            ev["n_classes"]) for v in variants}


def _gate_start(spec_path: str | Path, data: DataCheck, registered: RegisteredVersion, gate: str,
                settings: Settings | None) -> tuple[Context, GateVerdict | None]:
    """A gate's context, and its verdict when it is already stored or waived by the spec."""
    from pipelines.gates import waived

    ctx, cached = resume(spec_path, data, f"gates/{gate}.json", GateVerdict, settings, registered)
    if cached is None and gate in ctx.spec.gates.waive:
        cached = ctx.save_record(evaluation_folder(data, registered), f"gates/{gate}.json",
                                 waived(gate, ctx.spec.gates.waive[gate]))
    return ctx, cached


def _combined(verdicts: dict[str, GateVerdict], base: str) -> GateVerdict:
    """One verdict over every shipped variant: passed only if each passed; figures of the
    other variants prefixed with their name."""
    verdict = verdicts[base]
    if len(verdicts) == 1:
        return verdict
    observed = dict(verdict.observed)
    for variant, other in verdicts.items():
        if variant != base:
            observed.update({f"{variant}.{key}": value for key, value in other.observed.items()})
    failed = [f"{v}: {x.reason}" for v, x in verdicts.items() if not x.passed]
    reason = "; ".join(failed) if failed else "; ".join(f"{v}: {x.reason}" for v, x in verdicts.items())
    return verdict.model_copy(update={"passed": not failed, "observed": observed, "reason": reason})


def fairness_gate(spec_path: str | Path, data: DataCheck, plan: QuantizationPlan, registered: RegisteredVersion,
                  cost: CostReport | None = None, settings: Settings | None = None) -> GateVerdict:
    """Fairlearn group metrics of every shipped variant; thresholds from responsibleAI.fairness."""
    from pipelines.gates.fairness import fairness_verdict, group_table, plot_groups

    ctx, done = _gate_start(spec_path, data, registered, "fairness", settings)
    if done is not None:
        return done
    shipped = _shipped(plan, cost)
    ev = _evaluation(ctx, data, plan, shipped)
    reports = _group_reports(ctx, ev, shipped)
    verdict = _combined({v: fairness_verdict(reports[v], ctx.spec.responsible_ai.fairness, {}, v)
                         for v in shipped}, plan.chosen)
    report = reports[plan.chosen]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "fairness.json").write_text(json.dumps(report if len(shipped) == 1 else reports, indent=2))
        group_table(report).to_csv(folder / "fairness_by_group.csv", index=False)
        plot_groups(report, folder / "fairness_by_group.png",
                    f"{ctx.spec.name} v{registered.version} ({plan.chosen}): metrics by group")
        verdict = _publish_evidence(ctx, data, registered, verdict, sorted(folder.iterdir()))
    return ctx.save_record(evaluation_folder(data, registered), "gates/fairness.json", verdict)


def parity_gate(spec_path: str | Path, data: DataCheck, plan: QuantizationPlan, registered: RegisteredVersion,
                cost: CostReport | None = None, settings: Settings | None = None) -> GateVerdict:
    """Every shipped variant vs fp32: overall accuracy and every group gap."""
    from pipelines.gates.parity import parity_verdict

    ctx, done = _gate_start(spec_path, data, registered, "quantization_parity", settings)
    if done is not None:
        return done
    shipped = _shipped(plan, cost)
    ev = _evaluation(ctx, data, plan, shipped)
    from pipelines import training

    variants = sorted({"fp32", *shipped})
    reports = _group_reports(ctx, ev, variants) if ctx.spec.data.sensitive_features else {v: {} for v in variants}
    accuracy = {v: training.score(data.task, ev["proba"][v], ev["y_test"]) for v in variants}
    # A regression's group gaps are errors in the target's units: their widening is judged as a
    # share of fp32's mean absolute error.
    scale = training.regression_metrics(ev["proba"]["fp32"], ev["y_test"])["mae"] if data.task == "regression" else 1.0
    verdict = _combined({v: parity_verdict(v, accuracy["fp32"], accuracy[v], reports["fp32"], reports[v],
                                           ctx.spec.export.accuracy_budget,
                                           ctx.spec.gates.quantization_fairness_change,
                                           metric=training.score_name(data.task), gap_scale=scale) for v in shipped},
                        plan.chosen)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "quantization_parity.json"
        path.write_text(json.dumps({"accuracy": accuracy, "groups": reports}, indent=2))
        verdict = _publish_evidence(ctx, data, registered, verdict, [path])
    return ctx.save_record(evaluation_folder(data, registered), "gates/quantization_parity.json", verdict)


# -- drift ---------------------------------------------------------------------------------------
DRIFT_SAMPLE_ROWS = 100_000  # most rows of each side the drift gate compares (a seeded sample)


def drift_gate(spec_path: str | Path, data: DataCheck, plan: QuantizationPlan, registered: RegisteredVersion,
               settings: Settings | None = None) -> GateVerdict:
    """Evidently DataDriftPreset: training rows vs the most recent production window, over the
    features and the shipped variant's predictions (`prediction`: a class, or a regression's value)."""
    from pipelines.data import fingerprint, read_source
    from pipelines.gates import waived
    from pipelines.gates.drift import drift_report, drift_verdict, no_production_data
    from pipelines.specs import spec_dir

    ctx = stage_context(spec_path, data, settings)
    share = ctx.spec.gates.drift_share
    if "drift" in ctx.spec.gates.waive:
        return waived("drift", ctx.spec.gates.waive["drift"])
    source = ctx.spec.data.current_source
    if source is None:
        return no_production_data(share, "the spec names no data.currentSource")
    current = read_source(ctx.spec.data.model_copy(update={"source": source}), spec_dir(ctx.spec_path),
                          ctx.settings.s3_endpoint_url)
    # The window is part of the verdict's identity: new production data, new comparison.
    name = f"gates/drift-{fingerprint(current)[:16]}.json"
    cached = ctx.load_record(evaluation_folder(data, registered), name, GateVerdict)
    if cached is not None:
        return cached
    if current.empty:
        return no_production_data(share, f"{source} has no rows")
    columns = [c for c in data.features if c in current.columns]
    missing = sorted(set(data.features) - set(columns))
    reference = splits(ctx, data)["train"][columns]
    current = current[columns]
    # Bounded samples (seeded): a distribution is known well before millions of rows, and
    # Evidently's time grows with them.
    totals = {"reference_rows_total": len(reference), "current_rows_total": len(current)}
    reference = reference.sample(n=min(DRIFT_SAMPLE_ROWS, len(reference)), random_state=ctx.spec.training.seed)
    current = current.sample(n=min(DRIFT_SAMPLE_ROWS, len(current)), random_state=ctx.spec.training.seed)
    if not missing:
        reference, current = _with_predictions(ctx, data, plan, reference), _with_predictions(ctx, data, plan, current)
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "drift_report.html"
        figures = drift_report(reference, current, share, html)
        verdict = drift_verdict(figures, share, len(reference), len(current), {})
        verdict = verdict.model_copy(update={"observed": {**verdict.observed, **totals}})
        if missing:
            verdict = verdict.model_copy(update={
                "passed": False, "reason": f"current data lacks feature columns {missing}; {verdict.reason}"})
        summary = Path(tmp) / "drift.json"
        summary.write_text(json.dumps({**figures, "current_source": source, "missing_columns": missing}, indent=2))
        verdict = _publish_evidence(ctx, data, registered, verdict, [html, summary])
    return ctx.save_record(evaluation_folder(data, registered), name, verdict)


def _with_predictions(ctx: Context, data: DataCheck, plan: QuantizationPlan, frame):
    """`frame` with the shipped variant's answer to each row in `prediction` (a class label as
    text, or a regression's value), as the drift monitor compares it."""
    from pipelines.data import prepare_features
    from pipelines.onnx import export as onnx_export

    outputs = onnx_export.predict(ctx.fetch(plan.chosen_candidate.uri), prepare_features(frame, data.features))
    prediction = outputs if data.task == "regression" else outputs.argmax(axis=1).astype(str)
    return frame.assign(prediction=prediction)


# -- explanation, model card, decision -------------------------------------------------------------
def explain(spec_path: str | Path, data: DataCheck, plan: QuantizationPlan, registered: RegisteredVersion,
            settings: Settings | None = None) -> Explanation:
    """How the shipped variant answers, in the method the spec's explainability names:
    permutation importance, or the mean absolute LIME or SHAP weight of each feature over a
    sample of held-out rows (their local explanations kept as evidence)."""
    from pipelines import registry
    from pipelines.gates.explain import plot_importances

    ctx, cached = resume(spec_path, data, "explanation.json", Explanation, settings, registered)
    if cached is not None:
        return cached
    method = ctx.spec.responsible_ai.explainability.method
    if method == "none":
        return ctx.save_record(evaluation_folder(data, registered), "explanation.json",
                               Explanation(method="none", note="the spec asks for no explanation"))
    figures = _permutation_figures(ctx, data, plan) if method == "permutation_importance" else \
        _local_figures(ctx, data, plan, method)
    importances, note = figures.pop("importances"), figures.pop("note")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / f"{method}_importance.json").write_text(json.dumps(importances, indent=2))
        for name, value in figures.items():
            (folder / name).write_text(json.dumps(value, indent=2))
        plot_importances(importances, folder / f"{method}_importance.png",
                         f"{ctx.spec.name} v{registered.version} ({plan.chosen})", data.task, method=method)
        files = sorted(folder.iterdir())
        evidence = {p.name: ctx.store.put_file(p, _evidence_key(ctx, data, registered, "explainability", p.name),
                                               retain_until=ctx.audit_until()) for p in files}
        registry.log_evidence(ctx.settings.tracking_uri, registered.run_id, "evidence/explainability", files)
    record = Explanation(method=method, importances=importances, evidence=evidence, note=note)
    return ctx.save_record(evaluation_folder(data, registered), "explanation.json", record)


def _permutation_figures(ctx: Context, data: DataCheck, plan: QuantizationPlan) -> dict:
    """Permutation importance of the shipped variant on the held-out rows."""
    from pipelines.gates.explain import permutation_importances

    ev = _evaluation(ctx, data, plan)
    importances = permutation_importances(ev["paths"][plan.chosen], ev["x_test"], ev["y_test"],
                                          ctx.spec.training.seed, data.task)
    what = "mean absolute error increase" if data.task == "regression" else "mean accuracy drop"
    return {"importances": importances,
            "note": f"{what} over 5 shuffles of each feature, on up to 2,000 held-out rows"}


def _local_figures(ctx: Context, data: DataCheck, plan: QuantizationPlan, method: str) -> dict:
    """LIME or SHAP explanations of a seeded sample of held-out rows (against a background of
    training rows) and each feature's mean absolute weight over them."""
    from pipelines.gates.explain import SUMMARY_ROWS, local_explanations, mean_abs_weights

    spec = ctx.spec
    seed = spec.training.seed
    parts = splits(ctx, data)
    rows = parts["test"].sample(n=min(SUMMARY_ROWS, len(parts["test"])), random_state=seed)
    background = parts["train"].sample(n=min(spec.responsible_ai.explainability.background_rows,
                                             len(parts["train"])), random_state=seed)
    found = local_explanations(ctx.fetch(plan.chosen_candidate.uri), rows[data.features], background[data.features],
                               method, data.task, seed, top=None)
    what = "value" if data.task == "regression" else "class's probability"
    return {"importances": mean_abs_weights(found),
            "local_explanations.json": [e.model_dump(mode="json") for e in found],
            "note": f"mean |{'SHAP value' if method == 'shap' else 'LIME weight'}| toward the predicted {what}, "
                    f"over {len(found)} held-out rows "
                    f"explained against {len(background)} training rows"}


def model_card(spec_path: str | Path, data: DataCheck, trained: TrainedModel, plan: QuantizationPlan,
               registered: RegisteredVersion, verdicts: list[GateVerdict], explanation: Explanation,
               cost: CostReport | None = None, settings: Settings | None = None) -> ModelCard:
    """The version's model card (JSON + HTML), in the store and on the MLflow run."""
    from pipelines import registry
    from pipelines.gates.card import card_document, write_card
    from pipelines.storage import sha256_file

    ctx, cached = resume(spec_path, data, "model_card.record.json", ModelCard, settings, registered)
    if cached is not None:
        return cached
    spec = ctx.spec
    chosen = plan.chosen_candidate
    card = card_document(
        schema="edge-release/model-card/v1",
        model={"name": spec.name, "version": registered.version, "owner": spec.owner,
               "description": " ".join(spec.description.split()), "framework": trained.framework,
               "task": data.task + (" (inferred from the target)" if data.task_inferred else ""),
               "model_type": spec.training.model_type, "variant": plan.chosen,
               "artifact_sha256": chosen.sha256, "size_bytes": chosen.size_bytes, "mlflow_run_id": registered.run_id,
               "release_key": registered.release_key or data.release_key},
        intended_use=" ".join(spec.intended_use.split()),
        limitations=spec.limitations,
        data={"source": data.source, "sha256": data.sha256, "rows": data.rows, "feature_count": len(data.features),
              "features": data.features if len(data.features) <= 50 else data.features[:50] + ["…"],
              "sensitive_features": ", ".join(spec.data.sensitive_features) or "none",
              "test_size": spec.data.test_size},
        training={"framework": trained.framework, "seed": spec.training.seed,
                  "params": spec.training.params, "train_seconds": trained.train_seconds,
                  **({"entrypoint": spec.training.entrypoint} if spec.training.entrypoint else {}),
                  **({"imported_from": trained.source} if trained.source else {}),
                  **({"federated": _card_federated(trained.federated)} if trained.federated else {})},
        shipped=[v.model_dump(mode="json") for v in shipped_variants(ctx, data, plan, cost)],
        metrics=trained.metrics,
        quantization=plan.model_dump(mode="json", exclude={"reused"}),
        verdicts=[v.model_dump(mode="json") for v in verdicts],
        waivers=dict(spec.gates.waive),
        explainability=explanation.model_dump(mode="json"),
        cost=_card_cost(cost),
        approval=f"{spec.approval.mode}: " + ("a person approves in Airflow before the commit"
                                              if spec.approval.mode == "manual" else
                                              "released when every gate passes"),
    )
    images = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for key, name, gate in (("fairness", "fairness_by_group.png", "fairness"),
                                ("importance", f"{explanation.method}_importance.png", "explainability")):
            store_key = _evidence_key(ctx, data, registered, gate, name)
            if ctx.store.exists(store_key):
                images[key] = ctx.store.get_file(store_key, folder / "images" / name)
        json_path, html_path = write_card(card, images, folder / "card")
        folder = evaluation_folder(data, registered)
        record = ModelCard(json_uri=ctx.store.put_file(json_path, ctx.run_key(folder, "model_card.json"),
                                                        retain_until=ctx.audit_until()),
                           html_uri=ctx.store.put_file(html_path, ctx.run_key(folder, "model_card.html"),
                                                        retain_until=ctx.audit_until()),
                           sha256=sha256_file(json_path))
        registry.log_evidence(ctx.settings.tracking_uri, registered.run_id, "model_card", [json_path, html_path],
                              tags={"model_card_sha256": record.sha256})
    return ctx.save_record(evaluation_folder(data, registered), "model_card.record.json", record)


def _card_federated(federated) -> dict:
    """What the card says of a federated training: the federation, the spread across clients
    and, with differential privacy, the (epsilon, delta) spent and what it protects."""
    card = {"strategy": federated.strategy, "rounds": federated.rounds, "clients": federated.clients,
            "federation": federated.federation,
            "raw_rows_left_the_clients": False,
            "federated_evaluation": federated.per_round[-1] if federated.per_round else {},
            "worst_client": federated.worst_client,
            "client_accuracy": federated.client_accuracy, "client_groups": federated.client_groups,
            "evidence": federated.evidence_uri}
    if federated.privacy is not None:
        dp = federated.privacy
        card["differential_privacy"] = {
            "mechanism": "DP-SGD on every client (Opacus): per-example gradient clipping and Gaussian noise",
            "epsilon": dp.epsilon, "delta": dp.delta, "noise_multiplier": dp.noise_multiplier,
            "max_grad_norm": dp.max_grad_norm, "accountant": dp.accountant, "protects": dp.unit,
            "does_not_cover": "a client's whole data (client-level privacy), the model's architecture and "
                              "hyperparameters, or what the central held-out set reveals"}
    else:
        card["differential_privacy"] = "none: clients share exact weight updates"
    return card


def _card_cost(cost: CostReport | None) -> dict | None:
    if cost is None:
        return None
    from pipelines.finops.cost import CostEstimate, cost_table, diff_lines

    estimate = CostEstimate.model_validate(cost.estimate)
    return {"total_usd_per_month": estimate.total_usd_per_month,
            "training_usd_per_month": estimate.training_usd_per_month,
            "budget_usd_per_month": estimate.monthly_budget_usd,
            "brief": estimate.brief(), "table": cost_table(estimate), "diff": diff_lines(cost.diff),
            "assumptions": sorted({a for g in estimate.groups for a in g.assumptions})}


def approval_body(spec_name: str, version: str, verdicts: list[GateVerdict], card: ModelCard,
                  plan: QuantizationPlan, why: str = "") -> str:
    """Markdown a reviewer reads in Airflow's Required Actions before approving: why a person
    is asked, the verdicts, the variant, a link to the version's page in the Edge Releases
    view (relative: the api-server serves it) and the evidence."""
    from urllib.parse import quote

    page = f"/edge/models/{quote(spec_name, safe='')}/versions/{quote(str(version), safe='')}"
    lines = [f"**{spec_name}** version **{version}** passed every gate and waits for your decision.", ""]
    if why:
        lines += [f"Why a person: {why}.", ""]
    lines += [f"Edge Releases view: [{spec_name} version {version}]({page})", "",
              "| gate | result | reason |", "|---|---|---|"]
    for v in verdicts:
        result = "waived" if v.waived else ("passed" if v.passed else "FAILED")
        lines.append(f"| {v.gate} | {result} | {v.reason.replace('|', '/')} |")
    def evidence(uri: str) -> str:
        # Through the Edge Releases view: a browser cannot open the store's file:// or s3:// URIs.
        return f"/edge/evidence?uri={quote(uri, safe='')}"

    lines += ["", f"Variant: **{plan.chosen}** ({plan.chosen_candidate.size_bytes:,} bytes). {plan.reason}", "",
              f"Model card: [model card]({evidence(card.html_uri)})"]
    for v in verdicts:
        for name, uri in v.evidence.items():
            lines.append(f"- {v.gate} evidence: [{name}]({evidence(uri)})")
    return "\n".join(lines)


# -- edge cost (FinOps) ------------------------------------------------------------------------------
def _host_calibration(ctx: Context):
    """The build host's calibration (a rate per operator class, per-node and per-run costs),
    measured once per worker and kept in scratch. The file name carries the calibration's
    version: a file of the single-rate calibration (no classes) is never read as this one."""
    import platform

    from pipelines.finops.profile import HostCalibration, calibrate_host

    path = ctx.settings.work_dir / f"host-calibration-classes-v1-{platform.node() or 'host'}.json"
    if path.is_file():
        return HostCalibration.model_validate_json(path.read_text())
    calibration = calibrate_host()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(calibration.model_dump_json())
    return calibration


def edge_cost(spec_path: str | Path, data: DataCheck, trained: TrainedModel, plan: QuantizationPlan,
              registered: RegisteredVersion, settings: Settings | None = None) -> CostReport:
    """Profile the shipped variant, project latency, memory, energy and $/month per device
    group, gate them (memory limit, latency SLO, budget) and diff against the deployed version."""
    from pipelines import registry
    from pipelines.finops import cost
    from pipelines.finops.catalog import load_catalog, load_fleet
    from pipelines.finops.profile import measure_host, profile_graph
    from pipelines.onnx import export as onnx_export

    ctx = stage_context(spec_path, data, settings)
    chosen = plan.chosen_candidate
    deployed = deployed_manifest(ctx)
    deployed_sha = deployed["spec"]["modelRef"]["checksum"].removeprefix("sha256:") if deployed else "none"
    # As for quality: the diff is against what is deployed, and a re-run after this very
    # artifact landed keeps the diff that was committed.
    name = f"cost-{deployed_sha[:16]}.json"
    for key in ((name, "cost.json") if deployed_sha == chosen.sha256 else (name,)):
        cached = ctx.load_record(evaluation_folder(data, registered), key, CostReport)
        if cached is not None:
            return cached
    catalog = load_catalog(ctx.settings.device_catalog)
    fleet = load_fleet(ctx.settings.fleet_path, catalog)
    fp32 = next(c for c in plan.candidates if c.variant == "fp32")
    parts = splits(ctx, data)
    eligible = [c for c in plan.candidates if c.eligible]
    variants, measurements = {}, {}
    for candidate in eligible:
        path = ctx.fetch(candidate.uri)
        feed = onnx_export.feeds(onnx_export.session(path), parts["x_test"].iloc[:1])
        # Shapes static inference cannot give (behind ai.onnx.ml ops) come from one real run.
        graph = profile_graph(path, feed)
        measured = measure_host(path, feed)
        measurements[candidate.variant] = {"graph": graph.model_dump(mode="json"),
                                           "host": measured.model_dump(mode="json")}
        variants[candidate.variant] = cost.VariantFigures(
            flops=graph.flops, artifact_bytes=candidate.size_bytes,
            memory_bytes=max(graph.weight_bytes + graph.peak_activation_bytes,
                             measured.peak_rss_bytes - measured.baseline_rss_bytes))
    calibration = _host_calibration(ctx)
    # Devices are compared with the host's compute peak (what HPL measures on a device); the
    # per-class figures and each variant's own measurement serve the int8 projection.
    host = cost.HostFigures(
        gflops=calibration.peak_gflops or calibration.gflops, overhead_ms=calibration.overhead_ms,
        fp32_latency_p50_ms=fp32.latency_p50_ms, fp32_latency_p95_ms=fp32.latency_p95_ms,
        train_seconds=trained.train_seconds, variants=variants,
        gflops_by_class=calibration.gflops_by_class, gflops_by_weights_mib=calibration.gflops_by_weights_mib,
        node_ms=calibration.node_ms, node_ms_by_class=calibration.node_ms_by_class,
        measured={v: cost.HostVariant(
            latency_p50_ms=m["host"]["latency_p50_ms"], latency_p95_ms=m["host"]["latency_p95_ms"],
            flops_by_class=m["graph"].get("flops_by_class", {}), nodes=m["graph"].get("nodes", 0),
            nodes_by_class=m["graph"].get("nodes_by_class", {}),
            matmul_weight_bytes=m["graph"].get("matmul_weight_bytes", 0)) for v, m in measurements.items()})
    try:
        estimate = cost.estimate(ctx.spec, catalog, fleet, host, plan.chosen, [c.variant for c in eligible])
    except ValueError as error:
        from pipelines.release.context import ReleaseError

        raise ReleaseError(f"{ctx.spec_path}: {error} ({ctx.settings.fleet_path})") from None
    diff = cost.cost_diff(estimate.brief(), (deployed or {}).get("spec", {}).get("cost"),
                          str(deployed["spec"]["modelRef"]["version"]) if deployed else None)
    verdicts = [cost.memory_verdict(ctx.spec, estimate, catalog), cost.latency_verdict(ctx.spec, estimate),
                cost.budget_verdict(estimate)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "cost.json").write_text(json.dumps({"estimate": estimate.model_dump(mode="json"),
                                                      "measurements": measurements, "diff": diff}, indent=2))
        import csv

        with open(folder / "focus.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=cost.FOCUS_COLUMNS)
            writer.writeheader()
            writer.writerows(cost.focus_rows(estimate, registered.version))
        (folder / "cost_table.txt").write_text("\n".join(cost.cost_table(estimate) + [""] + cost.diff_lines(diff)) + "\n")
        files = sorted(folder.iterdir())
        evidence = {p.name: ctx.store.put_file(p, _evidence_key(ctx, data, registered, "cost", p.name),
                                               retain_until=ctx.audit_until()) for p in files}
        for verdict in verdicts:
            registry.log_verdict(ctx.settings.tracking_uri, registered.run_id, verdict, [])
        registry.log_evidence(ctx.settings.tracking_uri, registered.run_id, "evidence/cost", files,
                              metrics={"cost.total_usd_per_month": estimate.total_usd_per_month,
                                       "cost.delta_usd_per_month": diff["deltaUsdPerMonth"]},
                              tags={"cost.diff": "\n".join(cost.diff_lines(diff))})
    verdicts = [v.model_copy(update={"evidence": {"cost.json": evidence["cost.json"]}}) for v in verdicts]
    report = CostReport(estimate=estimate.model_dump(mode="json"), verdicts=verdicts, diff=diff,
                        group_variants=estimate.group_variants(), evidence=evidence)
    ctx.save_record(evaluation_folder(data, registered), "cost.json", report)
    return ctx.save_record(evaluation_folder(data, registered), name, report)
