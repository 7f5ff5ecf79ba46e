"""The train stage of `training.mode: federated`: the spec's network trained with Flower where
the rows live, then released like any other model.

Embedded: the training split is dealt to simulated devices of the spec's target groups, non-IID
by device group (`pipelines.edge.federation`), and the train stage starts a SuperLink and one
SuperNode per device (`pipelines.training.federated`). The server aggregates weights and
metrics; only the devices' processes read rows. The test split stays central: it is the
held-out set every gate judges the model on, beside the federated evaluation each client runs
on its own held-out rows (the worst-served client is in the evidence and the model card).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.records import DataCheck, FederatedTraining, TrainingPrivacy
from pipelines.release.context import Context, ReleaseError, scratch


def _net(ctx: Context, n_features: int, n_classes: int) -> dict:
    """What `nets.build_module` builds: the spec's architecture or its own builder."""
    training = ctx.spec.training
    if training.entrypoint is not None:
        return {"entrypoint": training.entrypoint, "n_features": n_features, "n_classes": n_classes,
                "params": dict(training.params), "seed": training.seed, "input_shape": training.input_shape}
    from pipelines.training import torch_module

    return {"config": torch_module(training, n_features, n_classes).config}


def _config(ctx: Context):
    from pipelines.training.federated import FederatedConfig

    training = ctx.spec.training
    spec = training.federated
    params = training.params
    privacy = spec.differential_privacy
    return FederatedConfig(
        strategy=spec.strategy, rounds=spec.rounds, fraction_train=spec.fraction_train,
        fraction_evaluate=spec.fraction_evaluate, min_clients=spec.min_clients, proximal_mu=spec.proximal_mu,
        local_epochs=spec.local_epochs, learning_rate=float(params.get("learning_rate", 1e-3)),
        batch_size=int(params.get("batch_size", 64)), eval_share=spec.eval_share, seed=training.seed,
        round_timeout=spec.round_timeout_seconds,
        **({"dp_noise_multiplier": privacy.noise_multiplier, "dp_max_grad_norm": privacy.max_grad_norm,
            "dp_delta": privacy.delta, "dp_max_epsilon": privacy.max_epsilon or 0.0} if privacy else {}))


def _summary(ctx: Context, run, groups: dict[str, str], federation: str) -> FederatedTraining:
    per_round = []
    for entry in run.rounds:
        sent = [b[entry.round - 1] for b in run.client_bytes.values() if b[entry.round - 1]]
        per_round.append({"round": entry.round, "train_loss": entry.train.get("loss"),
                          "evaluate_loss": entry.evaluate.get("loss"),
                          "evaluate_accuracy": entry.evaluate.get("accuracy"),
                          "seconds": round(entry.seconds, 3),
                          "bytes_per_client": int(sum(sent) / len(sent)) if sent else 0,
                          "epsilon": max((c.epsilon for c in run.clients if c.round == entry.round
                                          and c.epsilon is not None), default=None)})
    last = max((c.round for c in run.clients if c.phase == "evaluate"), default=0)
    accuracy = {c.client: round(float(c.accuracy), 6) for c in run.clients
                if c.phase == "evaluate" and c.round == last and c.accuracy is not None}
    worst = run.worst_client()
    privacy = ctx.spec.training.federated.differential_privacy
    return FederatedTraining(
        strategy=run.strategy, rounds=len(run.rounds),
        clients=len({c.client for c in run.clients if c.phase == "train" and not c.error}),
        federation=federation, per_round=per_round, client_accuracy=accuracy, client_groups=groups,
        worst_client={"client": worst.client, "group": groups.get(worst.client, ""),
                      "accuracy": round(float(worst.accuracy), 6), "rows": worst.num_examples} if worst else {},
        privacy=TrainingPrivacy(epsilon=round(run.epsilon, 4), delta=privacy.delta,
                                noise_multiplier=privacy.noise_multiplier, max_grad_norm=privacy.max_grad_norm)
        if privacy and run.epsilon is not None else None,
        seconds=round(run.seconds, 3))


def train_federated(ctx: Context, data: DataCheck, parts: dict):
    """Train the spec's network federated; the fitted model and what the training was."""
    import torch

    from pipelines import training
    from pipelines.edge.federation import deal
    from pipelines.training.entrypoint import TrainingCodeError
    from pipelines.training.federated import FederatedError, run_federated
    from pipelines.training.nets import build_module

    spec = ctx.spec.training.federated
    if data.task == "regression":
        raise ReleaseError(f"{ctx.spec_path}: training.mode federated trains classifiers; "
                           f"{ctx.spec.data.target} is a regression target")
    from pipelines.data import is_categorical

    categorical = [c for c in parts["x_train"].columns if is_categorical(parts["x_train"][c])]
    if categorical:
        raise ReleaseError(f"{ctx.spec_path}: training.mode federated: clients hold numeric rows; data.features "
                           f"{categorical[0]} is categorical (encode it as numbers, or leave it out)")
    x = parts["x_train"].to_numpy(np.float32)
    y = np.asarray(parts["y_train"], dtype=np.int64)
    n_classes = len(parts["classes"])
    started = time.perf_counter()
    code = None
    folder = Path(ctx.spec_path).resolve().parent
    try:
        net = _net(ctx, x.shape[1], n_classes)
        if ctx.spec.training.entrypoint is not None:
            from pipelines.training.entrypoint import code_files

            code = code_files(ctx.spec.training.entrypoint, folder)
        federation = _federation(ctx, data)
        if federation is None:
            partitions = deal(ctx.spec, ctx.settings, x, y, spec.clients, spec.skew, ctx.spec.training.seed)
            folders, groups, dealt = partitions.folders, partitions.groups, partitions.summary()
        else:  # the federation's SuperNodes hold their own rows: nothing is dealt
            folders, groups, dealt = {}, {}, {}
        work = Path(tempfile.mkdtemp(prefix=f"federated-{ctx.spec.name}-", dir=scratch(ctx, "federated")))
        run = run_federated(net, folders, _config(ctx), work, flower_venv=ctx.settings.flower_venv,
                            timeout=spec.rounds * spec.round_timeout_seconds + 120, code=code, federation=federation)
        module = build_module(net, code[1] if code else None)
        module.load_state_dict(torch.load(run.state_dict_path, weights_only=True))
        shutil.rmtree(work, ignore_errors=True)  # kept only when the run failed (its processes' logs)
    except (FederatedError, TrainingCodeError) as error:
        raise ReleaseError(f"{ctx.spec_path}: training.mode federated: {error}") from None
    except ValueError as error:
        raise ReleaseError(f"{ctx.spec_path}: {error}") from None
    module.eval()
    summary = _summary(ctx, run, groups, federation.superlink if federation else "embedded")
    evidence = {"summary": summary.model_dump(mode="json", exclude={"evidence_uri"}),
                "partitions": dealt, "run": run.model_dump(mode="json", exclude={"state_dict_path"})}
    uri = ctx.store.put_bytes(json.dumps(evidence, indent=1).encode(),
                              ctx.run_key(data.release_key, "federated.json"), retain_until=ctx.audit_until())
    summary = summary.model_copy(update={"evidence_uri": uri})
    return training.Fitted(module, "torch", time.perf_counter() - started), summary


def _federation(ctx: Context, data: DataCheck):
    """The running federation of the settings (EDGE_FLOWER_SUPERLINK, or the `edge_flower`
    Airflow connection), its server writing to this release's folder of the artifact store;
    None: the embedded one."""
    from pipelines.training.federated import Federation

    settings = ctx.settings
    if not settings.flower_superlink:
        return None
    try:
        return Federation(superlink=settings.flower_superlink,
                          outputs=ctx.store.uri(ctx.run_key(data.release_key, "federated")),
                          store_endpoint=settings.s3_endpoint_url or "", insecure=settings.flower_insecure,
                          root_certificates=settings.flower_root_certificates)
    except ValueError:
        raise ReleaseError(f"EDGE_FLOWER_SUPERLINK: {settings.flower_superlink!r} is not host:port") from None
