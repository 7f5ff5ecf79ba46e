from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml
from test_manifest import SHA, kustomize, make_inputs, spec_named, write_tree

from pipelines.gitops.crd import (
    CRD_PATH,
    cluster_files,
    crd_document,
    crd_yaml,
    skeleton_files,
    validate_object,
)
from pipelines.gitops.manifest import read_manifest, render_release_files
from pipelines.gitops.repo import ensure_remote

SPECS = {"adult-income": "branch-kiosks", "digit-recognizer": "ios-phones"}  # spec -> group on another variant
OTHER_SHA = "fedcba9876543210" * 4
FLUX = "kustomize.toolkit.fluxcd.io/v1"


def full_inputs(name: str):
    """Inputs shaped as the release stage builds them, every optional field present."""
    spec = spec_named(name)
    other = SPECS[name]
    return make_inputs(
        variant="fp32",
        source_uri=f"s3://edge-models/models/{name}/{SHA}/model.onnx",
        verdicts=[
            {"gate": "quality", "passed": True, "waived": False, "reason": "accuracy 0.85 >= 0.82"},
            {"gate": "fairness", "passed": True, "waived": True, "reason": "no sensitive attribute"},
        ],
        signature_uri=f"s3://edge-models/models/{name}/{SHA}/model.onnx.sig",
        model_card_uri=f"s3://edge-models/models/{name}/{SHA}/model_card.json",
        model_card_sha256="ab" * 32,
        cost={
            "totalUsdPerMonth": 12.34,
            "budgetUsdPerMonth": 250,
            "groups": {
                t.name: {"variant": "dynamic" if t.name == other else "fp32", "usdPerMonth": 6.17,
                         "energyWhPerDay": 0.123, "egressGbPerMonth": 0.5, "latencyP95Ms": 3.2}
                for t in spec.targets
            },
        },
        group_variants={other: {"variant": "dynamic", "sha256": OTHER_SHA, "sizeBytes": 12000,
                                "sourceUri": f"s3://edge-models/models/{name}/{SHA}/variants/dynamic/model.onnx"}},
    )


def minimal_inputs(name: str):
    return make_inputs(verdicts=[])


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One overlay of adult-income as kustomize renders it."""
    root = tmp_path_factory.mktemp("overlay")
    write_tree(root, render_release_files(spec_named("adult-income"), full_inputs("adult-income")))
    (doc,) = kustomize(root / "apps/adult-income/overlays/android-tablets")
    return doc


def test_crd_parses_and_has_the_right_names() -> None:
    text = crd_yaml()
    assert text == crd_yaml()
    doc = yaml.safe_load(text)
    assert doc == crd_document()
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["kind"] == "CustomResourceDefinition"
    assert doc["metadata"]["name"] == "mobileaimodeldeployments.apexlogic.dev"
    spec = doc["spec"]
    assert spec["group"] == "apexlogic.dev" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"], names["shortNames"]) == (
        "MobileAIModelDeployment", "mobileaimodeldeployments", "mobileaimodeldeployment", ["mad"]
    )
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Version"] == ".spec.modelRef.version"
    assert columns["Variant"] == ".spec.modelRef.variant"
    assert columns["Group"] == ".spec.targetDevices.group"
    assert CRD_PATH == f"crds/{doc['metadata']['name']}.yaml"


def test_crd_schema_is_structural() -> None:
    """The rules the API server enforces on a CRD schema (it cannot be installed otherwise)."""
    problems: list[str] = []

    def walk(node: dict, path: str) -> None:
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
        if isinstance(node.get("additionalProperties"), bool):
            problems.append(f"{path}: additionalProperties must be a schema")
        if ("properties" in node or "additionalProperties" in node) and node.get("type") != "object":
            problems.append(f"{path}: fields on a non-object")
        if ("items" in node) != (node.get("type") == "array"):
            problems.append(f"{path}: items and type array go together")
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    root = crd_document()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    walk(root, "")
    assert problems == []
    assert root["properties"]["metadata"] == {"type": "object"}
    assert "x-kubernetes-preserve-unknown-fields" not in crd_yaml()


def test_kustomize_accepts_the_crd_as_a_resource(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        CRD_PATH: crd_yaml(),
        "crds/kustomization.yaml": "resources:\n  - mobileaimodeldeployments.apexlogic.dev.yaml\n",
    })
    assert kustomize(tmp_path / "crds") == [crd_document()]


@pytest.mark.parametrize("inputs", [minimal_inputs, full_inputs])
@pytest.mark.parametrize("name", list(SPECS))
def test_every_rendered_overlay_validates(name: str, inputs, tmp_path: Path) -> None:
    spec = spec_named(name)
    files = render_release_files(spec, inputs(name))
    write_tree(tmp_path, files)
    base = read_manifest(files[f"apps/{name}/base/mobileaimodeldeployment.yaml"])
    assert validate_object(base) == []
    for group in spec.targets:
        (doc,) = kustomize(tmp_path / "apps" / name / "overlays" / group.name)
        assert doc["spec"]["targetDevices"]["group"] == group.name
        if inputs is full_inputs and group.name == SPECS[name]:
            # The overlay replaced the artifact: the group ships another variant.
            assert doc["spec"]["modelRef"]["variant"] == "dynamic"
            assert doc["spec"]["modelRef"]["checksum"] == f"sha256:{OTHER_SHA}"
        assert validate_object(doc) == [], group.name


def test_a_missing_checksum_is_named(overlay: dict) -> None:
    doc = copy.deepcopy(overlay)
    del doc["spec"]["modelRef"]["checksum"]
    assert validate_object(doc) == ["spec.modelRef.checksum: required field is missing"]
    doc["spec"]["modelRef"]["checksum"] = "sha256:abc"
    (line,) = validate_object(doc)
    assert line.startswith("spec.modelRef.checksum: 'sha256:abc' does not match '^sha256:")


def test_a_wrong_type_is_named(overlay: dict) -> None:
    doc = copy.deepcopy(overlay)
    doc["spec"]["modelRef"]["sizeBytes"] = "big"
    assert validate_object(doc) == ["spec.modelRef.sizeBytes: 'big' is not of type 'integer'"]


@pytest.mark.parametrize("section", ["modelRef", "targetDevices", "slo"])
def test_an_unknown_key_in_a_fixed_shape_fails(overlay: dict, section: str) -> None:
    doc = copy.deepcopy(overlay)
    doc["spec"][section]["checksumm"] = "x"
    assert validate_object(doc) == [f"spec.{section}.checksumm: unknown field"]


@pytest.mark.parametrize(("group", "valid"), [("g" * 63, True), ("g" * 64, False), ("Phones", False),
                                               ("phones-", False), ("a", True)])
def test_the_device_group_is_a_dns_label(overlay: dict, group: str, valid: bool) -> None:
    doc = copy.deepcopy(overlay)
    doc["spec"]["targetDevices"]["group"] = group
    problems = validate_object(doc)
    assert (problems == []) is valid
    assert all(p.startswith("spec.targetDevices.group:") for p in problems)


def test_explainability_names_a_method_and_its_endpoint(overlay: dict) -> None:
    assert overlay["spec"]["responsibleAI"]["explainability"] == {
        "method": "lime", "endpoint": "/edge/api/models/adult-income/explain"}
    doc = copy.deepcopy(overlay)
    doc["spec"]["responsibleAI"]["explainability"]["method"] = "shap"
    assert validate_object(doc) == []
    doc["spec"]["responsibleAI"]["explainability"]["method"] = "saliency"
    (line,) = validate_object(doc)
    assert line.startswith("spec.responsibleAI.explainability.method: 'saliency' is not one of")
    del doc["spec"]["responsibleAI"]["explainability"]["endpoint"]
    assert "spec.responsibleAI.explainability.endpoint: required field is missing" in validate_object(doc)
    doc["spec"]["responsibleAI"]["explainability"] = "lime"
    assert validate_object(doc) == ["spec.responsibleAI.explainability: 'lime' is not of type 'object'"]


def test_other_problems_are_reported_with_their_paths(overlay: dict) -> None:
    doc = copy.deepcopy(overlay)
    doc["kind"] = "Deployment"
    doc["spec"]["modelRef"]["variant"] = "int4"
    doc["spec"]["slo"]["latencyP95Ms"] = 0
    doc["spec"]["resources"]["limits"]["memory"] = "lots"
    doc["spec"]["rollout"] = {"share": 101}
    doc["spec"]["targetDevices"]["selector"]["matchLabels"]["apexlogic.dev/app"] = 3
    problems = validate_object(doc)
    assert len(problems) == 6
    for prefix in ("kind:", "spec.modelRef.variant:", "spec.slo.latencyP95Ms:", "spec.resources.limits.memory:",
                   "spec.rollout.share:", "spec.targetDevices.selector.matchLabels[apexlogic.dev/app]:"):
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    assert validate_object({**overlay, "spec": "x"}) == ["spec: 'x' is not of type 'object'"]


def test_skeleton_flux_entry_points() -> None:
    files = skeleton_files()
    assert set(files) == {
        "README.md", "apps/.gitkeep", CRD_PATH, "clusters/edge-default/apps.yaml",
        "clusters/edge-default/crds.yaml", "clusters/edge-default/namespace.yaml",
    }
    (crds,) = yaml.safe_load_all(files["clusters/edge-default/crds.yaml"])
    (apps,) = yaml.safe_load_all(files["clusters/edge-default/apps.yaml"])
    (namespace,) = yaml.safe_load_all(files["clusters/edge-default/namespace.yaml"])
    for doc in (crds, apps):
        assert doc["apiVersion"] == FLUX and doc["kind"] == "Kustomization"
        assert doc["metadata"]["namespace"] == "flux-system"
        assert doc["spec"]["sourceRef"] == {"kind": "GitRepository", "name": "edge-gitops"}
        assert doc["spec"]["interval"] == "1m"
    assert crds["spec"]["path"] == "./crds"
    assert apps["spec"]["path"] == "./apps" and apps["spec"]["prune"] is True
    assert apps["spec"]["dependsOn"] == [{"name": crds["metadata"]["name"]}]
    # Flux refuses namespaced objects without a namespace; the manifests carry none.
    assert apps["spec"]["targetNamespace"] == namespace["metadata"]["name"]
    readme = files["README.md"]
    for text in ("flux bootstrap git", "--path=clusters/edge-default", "edge agent", "git revert",
                 "apps/<model>/base/", "apps/<model>/overlays/<device-group>/", "by hand"):
        assert text in readme, text


def test_cluster_files_per_model_paths() -> None:
    files = cluster_files({"plant-7": ["./apps/digit-recognizer/", "apps/adult-income"]})
    docs = list(yaml.safe_load_all(files["clusters/plant-7/apps.yaml"]))
    assert [(d["metadata"]["name"], d["spec"]["path"]) for d in docs] == [
        ("edge-apps-adult-income", "./apps/adult-income"),
        ("edge-apps-digit-recognizer", "./apps/digit-recognizer"),
    ]
    assert all(d["apiVersion"] == FLUX and d["spec"]["dependsOn"] == [{"name": "edge-crds"}] for d in docs)
    for bad in ({"plant-7": ["apps", "apps/adult-income"]}, {"plant-7": ["crds"]},
                {"plant-7": ["apps/../crds"]}, {"Plant 7": ["apps"]}, {"plant-7": []}, {"p" * 64: ["apps"]},
                {"plant-7": [f"apps/{'m' * 64}"]}):
        with pytest.raises(ValueError):
            cluster_files(bad)


def test_ensure_remote_initialises_the_skeleton(tmp_path: Path) -> None:
    remote = tmp_path / "gitops.git"
    ensure_remote(str(remote), "main", ("bot", "bot@example.com"))
    tree = subprocess.run(["git", "ls-tree", "-r", "--name-only", "main"], cwd=remote,
                          capture_output=True, text=True, check=True).stdout.split()
    assert "crds/mobileaimodeldeployments.apexlogic.dev.yaml" in tree
    assert any(path.startswith("clusters/edge-default/") for path in tree)
    crd = subprocess.run(["git", "show", f"main:{CRD_PATH}"], cwd=remote,
                         capture_output=True, text=True, check=True).stdout
    assert crd == crd_yaml()
