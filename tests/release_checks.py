"""What a released model must look like, wherever it ran: the embedded set-up (SQLite, a local
folder, a bare Git repo) or the production profile (PostgreSQL, an MLflow server, S3, a Git
daemon). Everything is read through the product's own settings and clients, so the same
checks hold for file:// and s3:// stores and for any Git URL.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from pipelines import registry
from pipelines.gitops import manifest, repo
from pipelines.gitops.crd import validate_object
from pipelines.settings import Settings
from pipelines.specs import load_spec
from pipelines.storage import ObjectStore

GATES = {"quality", "fairness", "quantization_parity", "drift", "edge_memory", "edge_latency", "budget"}


def manifest_path(model: str) -> str:
    return f"apps/{model}/base/mobileaimodeldeployment.yaml"


def stored_sha256(settings: Settings, uri: str) -> str:
    """sha256 of a file in the artifact store, read through the store (file:// or s3://)."""
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    return hashlib.sha256(store.read_bytes(store.key_of(uri))).hexdigest()


def check_release(settings: Settings, spec_path: Path, *, trigger: str = "manual") -> dict:
    """Assert that the spec's model is released end to end; returns its manifest.

    The manifest on the GitOps branch names an artifact whose bytes in the store match its
    checksum, as do the ONNX file MLflow holds for that version; the version carries its
    provenance tags, is `candidate` and `champion`, is tagged released; every gate passed; the
    cost covers every target group; the model card matches its checksum; each overlay renders
    with kustomize into an object the CRD accepts.
    """
    spec = load_spec(spec_path)
    model = spec.name
    text = repo.read_file(settings.remote, settings.gitops_branch, manifest_path(model), settings.work_dir)
    assert text is not None, f"{manifest_path(model)} is not on {settings.gitops_branch}"
    doc = manifest.read_manifest(text)
    checksum = manifest.manifest_checksum(doc)
    model_ref = doc["spec"]["modelRef"]
    assert model_ref["sourceUri"].startswith(settings.store_url.rstrip("/") + "/")
    assert stored_sha256(settings, model_ref["sourceUri"]) == checksum
    version = model_ref["version"]
    assert registry.model_file_sha256(settings.tracking_uri, model, version) == checksum

    client = registry.client(settings.tracking_uri)
    assert str(client.get_model_version_by_alias(model, "candidate").version) == version
    assert str(client.get_model_version_by_alias(model, "champion").version) == version
    tags = client.get_model_version(model, version).tags
    assert tags["artifact_sha256"] == checksum and tags["trigger"].startswith(trigger), tags
    assert tags["release_status"] == "released"
    assert {"data_sha256", "spec_sha256", "code_digest", "code_revision", "version.onnxruntime"} <= set(tags)

    verdicts = {v["gate"]: v for v in doc["spec"]["evaluation"]["verdicts"]}
    assert set(verdicts) == GATES
    assert all(v["passed"] for v in verdicts.values()), verdicts
    assert doc["spec"]["cost"]["budgetUsdPerMonth"] == spec.finops.monthly_budget_usd
    assert set(doc["spec"]["cost"]["groups"]) == {t.name for t in spec.targets}
    card = model_ref["modelCard"]
    assert stored_sha256(settings, card["uri"]) == card["checksum"].removeprefix("sha256:")

    check_overlays(settings, model, [t.name for t in spec.targets])
    return doc


def check_overlays(settings: Settings, model: str, groups: list[str]) -> None:
    """Each group's overlay, cloned from the remote, renders into one object the CRD accepts."""
    with tempfile.TemporaryDirectory(prefix="edge-checkout-") as tmp:
        checkout = Path(tmp) / "checkout"
        subprocess.run(["git", "clone", "-q", "--branch", settings.gitops_branch, settings.remote, str(checkout)],
                       check=True, capture_output=True)
        assert (checkout / "crds" / "mobileaimodeldeployments.apexlogic.dev.yaml").is_file()
        for group in groups:
            rendered = subprocess.run([shutil.which("kubectl") or "kubectl", "kustomize",
                                       str(checkout / "apps" / model / "overlays" / group)],
                                      capture_output=True, text=True, check=True).stdout
            [obj] = [d for d in yaml.safe_load_all(rendered) if d]
            assert validate_object(obj) == [], group
            assert obj["spec"]["modelRef"]["signatureRef"]["uri"].endswith(".onnx.sig")
