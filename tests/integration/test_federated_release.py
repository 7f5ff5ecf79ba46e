"""Federated training released like any other model: the demo spec through its Airflow DAG on
the embedded federation, and a spec trained by a running federation named by an Airflow
connection, its server writing to S3 (moto's server over HTTP)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tabular_frame, write_spec
from release_checks import check_release
from test_airflow_release import _bag, _states

from pipelines import registry
from pipelines.settings import Settings
from pipelines.storage import ObjectStore

FLOWER = Settings().flower_venv
pytestmark = pytest.mark.skipif(not (FLOWER / "bin" / "flower-superlink").exists(),
                                reason=f"the Flower environment {FLOWER.name} is not built (`make venv`)")
SPEC = ROOT / "model_specs" / "digit-recognizer-federated.yaml"


def test_the_federated_digit_recognizer_releases_through_its_dag(airflow_db, monkeypatch, capsys):
    settings = Settings()
    run = _bag(monkeypatch).dags["edge_release__digit-recognizer-federated"].test()
    assert str(getattr(run.state, "value", run.state)) == "success", _states(run)

    doc = check_release(settings, SPEC)  # every gate passed, signed, committed, overlays valid
    training = doc["spec"]["responsibleAI"]["training"]
    dp = training["differentialPrivacy"]
    print(f"\nmanifest spec.responsibleAI.training: {json.dumps(training)}")
    assert (training["mode"], training["strategy"], training["rounds"], training["clients"]) == \
        ("federated", "fedprox", 3, 8)
    assert dp["mechanism"] == "dp-sgd" and dp["delta"] == 1e-4 and dp["noiseMultiplier"] == 0.8
    assert 0 < dp["epsilon"] <= 10  # the spec's maxEpsilon: every client kept within it

    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    release_key = doc["metadata"]["annotations"]["apexlogic.dev/release-key"]
    evidence = json.loads(store.read_bytes(f"runs/digit-recognizer-federated/{release_key}/federated.json"))
    partitions = evidence["partitions"]
    # The 4,000 training rows went to 8 phones in both groups; the evidence keeps counts, no rows.
    assert len(partitions) == 8 and sum(p["rows"] for p in partitions.values()) == 4000
    assert {p["group"] for p in partitions.values()} == {"meter-phones-android", "meter-phones-ios"}
    assert all(set(p) == {"group", "rows", "rows_per_class"} for p in partitions.values())
    share = {}
    for p in partitions.values():
        share[p["group"]] = share.get(p["group"], np.zeros(10)) + np.asarray(p["rows_per_class"])
    android, ios = (share[g] / share[g].sum() for g in ("meter-phones-android", "meter-phones-ios"))
    assert np.abs(android - ios).max() > 0.1  # non-IID by device group
    for client in partitions:
        folder = settings.state / "fleet" / client / "federated" / "digit-recognizer-federated"
        assert len(np.load(folder / "labels.npy")) == partitions[client]["rows"]

    summary = evidence["summary"]
    worst = summary["worst_client"]
    assert worst["accuracy"] == min(summary["client_accuracy"].values())
    assert worst["group"] == partitions[worst["client"]]["group"]
    assert summary["privacy"]["epsilon"] == dp["epsilon"]
    epsilons = [r["epsilon"] for r in summary["per_round"]]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(dp["epsilon"], abs=1e-4)

    # Per-round metrics on the version's MLflow run, at the round as step.
    client = registry.client(settings.tracking_uri)
    version = client.get_model_version("digit-recognizer-federated", doc["spec"]["modelRef"]["version"])
    history = client.get_metric_history(version.run_id, "federated.evaluate_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.data.params["training.mode"] == "federated"
    assert mlflow_run.data.metrics["dp.epsilon"] == pytest.approx(dp["epsilon"])
    assert mlflow_run.data.metrics["federated.worst_client_accuracy"] == pytest.approx(worst["accuracy"])

    card_uri = doc["spec"]["modelRef"]["modelCard"]["uri"]
    card = json.loads(store.read_bytes(store.key_of(card_uri)))
    private = card["training"]["federated"]["differential_privacy"]
    assert private["epsilon"] == dp["epsilon"] and private["protects"] == "one example (row) of a client"
    html = store.read_bytes(store.key_of(card_uri.replace(".json", ".html"))).decode()
    assert "Federated training" in html and f"{worst['accuracy']:.4f}" in html
    from pipelines.__main__ import main

    capsys.readouterr()
    assert main(["summary", "digit-recognizer-federated"]) == 0
    printed = capsys.readouterr().out
    assert f"federated       fedprox, 3 rounds, 8 clients (embedded); worst client {worst['client']}" in printed
    assert f"privacy         DP-SGD: epsilon {dp['epsilon']:.2f}, delta 0.0001 for one example of a client" in printed
    print(f"rounds: {summary['per_round']}\nworst client: {worst}")


def _partition(folder: Path, frame) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "features.npy", frame[["x1", "x2"]].to_numpy(np.float32))
    np.save(folder / "labels.npy", frame["label"].to_numpy(np.int64))
    return folder


def test_a_running_federation_from_an_airflow_connection_trains_the_release(tmp_path, state, monkeypatch,
                                                                             s3_endpoint, capsys):
    """An operator's federation (a SuperLink and three SuperNodes, each with its own rows) is
    named by the `edge_flower` connection; the release submits to it, deals no rows, and reads
    the model the server wrote to the artifact store on S3."""
    import boto3
    from edge_airflow.connections import apply_connections

    from pipelines.__main__ import main
    from pipelines.training.federated import FlowerProcesses, flower_bin, free_ports

    credentials = {"AWS_ACCESS_KEY_ID": "AKIAFEDERATION", "AWS_SECRET_ACCESS_KEY": "federation-secret",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="fed-artifacts")
    monkeypatch.setenv("EDGE_ARTIFACT_STORE", "s3://fed-artifacts/releases")
    monkeypatch.setenv("EDGE_S3_ENDPOINT_URL", s3_endpoint)

    # The operator's federation: its nodes hold rows the train stage never sees.
    frame = tabular_frame(rows=900, seed=11)
    operator = tmp_path / "operator"
    operator.mkdir()
    processes = FlowerProcesses(flower_bin(FLOWER), operator)
    link, *nodes = free_ports(4)
    processes.start("superlink", ["flower-superlink", "--insecure", "--database", str(operator / "link.db"),
                                  "--port", str(link), "--disable-runtime-dependency-installation"])
    for index, port in enumerate(nodes):
        data = _partition(operator / f"site-{index}", frame.iloc[index * 300:(index + 1) * 300])
        processes.start(f"site-{index}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                          "--port", str(port),
                                          "--node-config", f"data-path='{data}' client-id='site-{index}'"])
    monkeypatch.setenv("AIRFLOW_CONN_EDGE_FLOWER", json.dumps({
        "conn_type": "generic", "host": "127.0.0.1", "port": link, "extra": {"insecure": True}}))
    environ = dict(os.environ)
    try:
        assert apply_connections() == ["edge_flower"]  # Airflow reads the connection; the settings follow
        assert Settings().flower_superlink == f"127.0.0.1:{link}" and Settings().flower_insecure

        tabular_frame().to_csv(tmp_path / "data.csv", index=False)
        spec = write_spec(tmp_path, "fed-sites", "data.csv",
                          data={"source": "data.csv", "target": "label", "features": ["x1", "x2"],
                                "sensitiveFeatures": ["group"], "validation": {"minRows": 50}},
                          training={"mode": "federated", "framework": "torch", "architecture": "mlp", "seed": 2,
                                    "params": {"hidden_layers": [16], "learning_rate": 0.02, "batch_size": 32},
                                    "federated": {"rounds": 2, "minClients": 3, "clients": 3, "localEpochs": 2}})
        deadline = time.monotonic() + 60
        while (operator / "superlink.log").read_text().count("Activated node_id") < 3:
            assert time.monotonic() < deadline, "the operator's SuperNodes did not join"
            time.sleep(1)
        capsys.readouterr()
        assert main(["release", str(spec), "--json"]) == 0
        released = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        processes.stop()
        os.environ.clear()
        os.environ.update(environ)
    assert released["status"] == "released"
    assert released["federated"]["federation"] == f"127.0.0.1:{link}" and released["federated"]["clients"] == 3
    settings = Settings()
    store = ObjectStore("s3://fed-artifacts/releases", s3_endpoint)
    [metrics_key] = [k for k in store.list_keys("runs/fed-sites/") if k.endswith("/federated/metrics.json")]
    metrics = json.loads(store.read_bytes(metrics_key))
    assert metrics["complete"] and [r["round"] for r in metrics["rounds"]] == [1, 2]
    trained = {c["client"] for r in metrics["rounds"] for c in r["clients"] if c["phase"] == "train"}
    assert trained == {"site-0", "site-1", "site-2"}
    assert store.exists(metrics_key.replace("metrics.json", "global.pt"))
    evidence_key = metrics_key.replace("federated/metrics.json", "federated.json")
    evidence = json.loads(store.read_bytes(evidence_key))
    assert evidence["summary"]["federation"] == f"127.0.0.1:{link}" and evidence["partitions"] == {}
    assert not list((settings.state / "fleet").glob("*/federated/fed-sites")), "rows were dealt"
    handled = [len(re.findall(r"Receiving: train message", (operator / f"site-{i}.log").read_text()))
               for i in range(3)]
    assert handled == [2, 2, 2], handled
