from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.gitops.manifest import (
    ManifestInputs,
    base_manifest_path,
    explain_endpoint,
    label_value,
    manifest_checksum,
    read_manifest,
    render_release_files,
)
from pipelines.settings import Settings
from pipelines.specs import ModelSpec, load_spec

SPECS_DIR = Path(__file__).resolve().parents[2] / "model_specs"
SPEC_NAMES = ["adult-income", "digit-recognizer"]
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
SHA = "0123456789abcdef" * 4


def spec_named(name: str) -> ModelSpec:
    return load_spec(SPECS_DIR / f"{name}.yaml")


def make_inputs(**overrides) -> ManifestInputs:
    fields = dict(
        model_version="7",
        mlflow_run_id="run-0f3a",
        release_key="rk-5e1d",
        source_uri="s3://edge-models/adult-income/7/model.dynamic.onnx",
        sha256=SHA,
        size_bytes=48213,
        variant="dynamic",
        metrics={"roc_auc": 0.91234567891, "accuracy": 0.85},
        verdicts=[{"name": "quality", "passed": True, "reason": "accuracy 0.85 >= 0.82"}],
    )
    fields.update(overrides)
    return ManifestInputs(**fields)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def kustomize(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: overlays cannot be rendered with kustomize")
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_layout_has_base_app_and_one_overlay_per_target(name: str) -> None:
    spec = spec_named(name)
    files = render_release_files(spec, make_inputs())
    expected = {
        f"apps/{name}/kustomization.yaml",
        f"apps/{name}/base/kustomization.yaml",
        f"apps/{name}/base/mobileaimodeldeployment.yaml",
    } | {f"apps/{name}/overlays/{t.name}/kustomization.yaml" for t in spec.targets}
    assert set(files) == expected
    assert base_manifest_path(name) == f"apps/{name}/base/mobileaimodeldeployment.yaml"
    app = yaml.safe_load(files[f"apps/{name}/kustomization.yaml"])
    assert app["resources"] == [f"overlays/{t.name}" for t in spec.targets]
    base = yaml.safe_load(files[f"apps/{name}/base/kustomization.yaml"])
    assert base == {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["mobileaimodeldeployment.yaml"],
    }


def test_rendering_is_deterministic_and_independent_of_key_order() -> None:
    spec = spec_named("adult-income")
    first = render_release_files(spec, make_inputs())
    second = render_release_files(spec, make_inputs())
    assert first == second
    reordered = make_inputs(
        metrics={"accuracy": 0.85, "roc_auc": 0.91234567891},
        verdicts=[{"reason": "accuracy 0.85 >= 0.82", "passed": True, "name": "quality"}],
    )
    assert render_release_files(spec, reordered) == first
    assert list(first) == sorted(first)
    # A different artifact must change the base, and only the base.
    changed = render_release_files(spec, make_inputs(sha256="f" * 64))
    assert [p for p in first if first[p] != changed[p]] == [
        "apps/adult-income/base/mobileaimodeldeployment.yaml"
    ]


def test_base_manifest_content() -> None:
    spec = spec_named("adult-income")
    files = render_release_files(spec, make_inputs())
    doc = read_manifest(files["apps/adult-income/base/mobileaimodeldeployment.yaml"])
    assert doc["apiVersion"] == "apexlogic.dev/v1alpha1"
    assert doc["kind"] == "MobileAIModelDeployment"
    assert doc["metadata"]["name"] == "adult-income"
    assert doc["metadata"]["labels"] == {
        "app.kubernetes.io/name": "adult-income",
        "app.kubernetes.io/version": "7",
        "finops.apexlogic.dev/cost-center": "cc-4410",
        "finops.apexlogic.dev/project": "loan-advisor",
        "finops.apexlogic.dev/owner": "credit-risk-ml_at_example.com",
    }
    assert doc["metadata"]["annotations"] == {
        "apexlogic.dev/release-key": "rk-5e1d",
        "apexlogic.dev/mlflow-run-id": "run-0f3a",
        "finops.apexlogic.dev/monthly-budget-usd": "250",
    }
    body = doc["spec"]
    assert "targetDevices" not in body and "slo" not in body
    assert body["modelRef"] == {
        "name": "adult-income",
        "version": "7",
        "sourceUri": "s3://edge-models/adult-income/7/model.dynamic.onnx",
        "checksum": f"sha256:{SHA}",
        "sizeBytes": 48213,
        "format": "onnx",
        "variant": "dynamic",
    }
    assert manifest_checksum(doc) == SHA
    assert body["resources"] == {
        "requests": {"cpu": "100m", "memory": "32Mi"},
        "limits": {"cpu": "500m", "memory": "64Mi"},
    }
    assert body["responsibleAI"] == {
        "explainability": {"method": "lime", "endpoint": "/edge/api/models/adult-income/explain"},
        "fairness": {"biasScore": 0.2, "equalizedOdds": 0.2, "minGroupAccuracy": 0.8, "minGroupSize": 200},
        "auditRetentionDays": 730,
    }
    assert body["deploymentStrategy"] == {
        "type": "Canary",
        "maxUnavailable": "10%",
        "maxSurge": "0",
        "canary": {
            "steps": [{"share": 10, "pause": "30m"}, {"share": 50, "pause": "30m"}, {"share": 100, "pause": "0s"}],
            "analysis": {"minRequests": 500, "maxErrorRate": 0.02, "maxErrorRateIncrease": 0.01,
                         "maxP95LatencyRatio": 1.5, "maxPredictionShift": 0.3, "latencyFloorMs": 1.0},
            "interval": "15m",
        },
    }
    assert body["telemetry"] == {"sampleRate": 0.25, "maxSamples": 50, "privacy": {"epsilon": 4}}
    assert "rollout" not in body, "no rollout section unless a canary is in progress"
    assert body["evaluation"]["metrics"] == {"accuracy": 0.85, "roc_auc": 0.912346}
    assert body["evaluation"]["verdicts"][0]["passed"] is True
    assert "cost" not in body


def test_the_explain_endpoint_follows_the_edge_releases_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec's method and Edge Releases' explain route: the inputs' endpoint, else the environment's."""
    spec = spec_named("diabetes-progression")
    monkeypatch.setenv("EDGE_UI_URL", "https://airflow.example.com/edge/")
    assert explain_endpoint(spec.name) == "https://airflow.example.com/edge/api/models/diabetes-progression/explain"
    assert explain_endpoint(spec.name, Settings(ui_url=None)) == "/edge/api/models/diabetes-progression/explain"

    def explainability(inputs: ManifestInputs) -> dict:
        files = render_release_files(spec, inputs)
        return read_manifest(files[base_manifest_path(spec.name)])["spec"]["responsibleAI"]["explainability"]

    assert explainability(make_inputs()) == {
        "method": spec.responsible_ai.explainability.method,
        "endpoint": "https://airflow.example.com/edge/api/models/diabetes-progression/explain"}
    given = make_inputs(explain_endpoint="https://ui.example.org/edge/api/models/diabetes-progression/explain")
    assert explainability(given)["endpoint"] == given.explain_endpoint


def test_optional_signature_and_cost_appear_only_when_given() -> None:
    spec = spec_named("digit-recognizer")
    inputs = make_inputs(signature_uri="s3://edge-models/sig/model.sig", cost={"monthlyUsd": 12.5})
    files = render_release_files(spec, inputs)
    body = read_manifest(files["apps/digit-recognizer/base/mobileaimodeldeployment.yaml"])["spec"]
    assert body["modelRef"]["signatureRef"] == {"uri": "s3://edge-models/sig/model.sig"}
    assert body["cost"] == {"monthlyUsd": 12.5}


def test_owner_label_is_a_valid_label_value() -> None:
    long_owner = "a-very-long-team-name-that-goes-on-and-on-and-on@subdomain.example.com"
    value = label_value(long_owner)
    assert len(value) <= 63 and LABEL_VALUE.match(value)
    assert value.startswith("a-very-long-team-name")
    assert label_value("ml@example.com") == "ml_at_example.com"
    assert label_value("-x y@z.") == "x-y_at_z"


def test_inputs_reject_a_malformed_digest() -> None:
    with pytest.raises(ValueError):
        make_inputs(sha256="not-hex")
    assert make_inputs(sha256="sha256:" + "A" * 64).sha256 == "a" * 64


def test_read_manifest_and_checksum_errors() -> None:
    with pytest.raises(ValueError):
        read_manifest("kind: ConfigMap\n")
    with pytest.raises(ValueError):
        manifest_checksum({"spec": {}})
    with pytest.raises(ValueError):
        manifest_checksum({"spec": {"modelRef": {"checksum": "md5:abc"}}})


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_overlay_renders_one_targeted_object(name: str, tmp_path: Path) -> None:
    spec = spec_named(name)
    write_tree(tmp_path, render_release_files(spec, make_inputs()))
    for group in spec.targets:
        docs = kustomize(tmp_path / "apps" / name / "overlays" / group.name)
        assert len(docs) == 1
        doc = read_manifest(yaml.safe_dump(docs[0]))
        assert doc["metadata"]["name"] == f"{name}-{group.name}"
        assert doc["metadata"]["labels"]["apexlogic.dev/device-group"] == group.name
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == name
        assert manifest_checksum(doc) == SHA
        assert doc["spec"]["targetDevices"] == {
            "group": group.name,
            "selector": {"matchLabels": group.selector.match_labels},
        }
        assert doc["spec"]["slo"] == {"latencyP95Ms": group.latency_slo_ms}
        # The base's content survives the overlay untouched.
        assert doc["spec"]["resources"] == spec.resources.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_base_alone_targets_nothing_and_app_renders_all_groups(name: str, tmp_path: Path) -> None:
    spec = spec_named(name)
    write_tree(tmp_path, render_release_files(spec, make_inputs()))
    base = kustomize(tmp_path / "apps" / name / "base")
    assert len(base) == 1 and "targetDevices" not in base[0]["spec"]
    app = kustomize(tmp_path / "apps" / name)
    assert sorted(d["metadata"]["name"] for d in app) == sorted(
        f"{name}-{t.name}" for t in spec.targets
    )


def test_overlay_without_latency_slo_has_no_slo(tmp_path: Path) -> None:
    data = yaml.safe_load((SPECS_DIR / "digit-recognizer.yaml").read_text())
    del data["targets"][0]["latencySloMs"]
    spec = ModelSpec.model_validate(data)
    write_tree(tmp_path, render_release_files(spec, make_inputs()))
    group = spec.targets[0].name
    (doc,) = kustomize(tmp_path / "apps" / spec.name / "overlays" / group)
    assert "slo" not in doc["spec"]
    assert doc["spec"]["targetDevices"]["group"] == group


def test_a_group_shipping_another_variant_overrides_only_its_artifact(tmp_path: Path) -> None:
    other = "fedcba9876543210" * 4
    inputs = make_inputs(variant="fp32", group_variants={"branch-kiosks": {
        "variant": "dynamic", "sourceUri": "s3://edge-models/adult-income/variants/dynamic/model.onnx",
        "sha256": other, "sizeBytes": 12000}})
    write_tree(tmp_path, render_release_files(spec_named("adult-income"), inputs))
    [kiosk] = kustomize(tmp_path / "apps/adult-income/overlays/branch-kiosks")
    [tablet] = kustomize(tmp_path / "apps/adult-income/overlays/android-tablets")
    assert kiosk["spec"]["modelRef"]["variant"] == "dynamic"
    assert manifest_checksum(kiosk) == other and kiosk["spec"]["modelRef"]["sizeBytes"] == 12000
    assert tablet["spec"]["modelRef"]["variant"] == "fp32" and manifest_checksum(tablet) == SHA
