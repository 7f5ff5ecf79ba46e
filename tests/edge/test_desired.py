"""Desired state on the device: JSON6902, overlay resolution, selection, rollout buckets, GitSource."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.edge.desired import (
    Conflict,
    DesiredStateError,
    GitSource,
    SourceError,
    apply_patch,
    group_of,
    in_rollout,
    model_of,
    resolve,
    rollout_share,
    select,
)
from pipelines.gitops.manifest import ManifestInputs, render_release_files
from pipelines.specs import load_spec

SPECS_DIR = Path(__file__).resolve().parents[2] / "model_specs"
SHA = "0123456789abcdef" * 4
OTHER = "fedcba9876543210" * 4


def _inputs(**overrides) -> ManifestInputs:
    fields = dict(model_version="7", mlflow_run_id="run-1", release_key="rk-1",
                  source_uri="s3://edge-models/adult-income/model.onnx", sha256=SHA, size_bytes=100,
                  variant="fp32", signature_uri="s3://edge-models/adult-income/model.onnx.sig",
                  metrics={"accuracy": 0.85})
    fields.update(overrides)
    return ManifestInputs(**fields)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_json6902_add_replace_remove_and_pointer_escaping():
    doc = {"metadata": {"labels": {"a": "1"}}, "spec": {"list": [1, 2]}}
    out = apply_patch(doc, [
        {"op": "add", "path": "/metadata/labels/apexlogic.dev~1device-group", "value": "phones"},
        {"op": "add", "path": "/metadata/labels/tilde~0key", "value": "t"},
        {"op": "add", "path": "/metadata/labels/~01", "value": "literal ~1"},
        {"op": "replace", "path": "/metadata/labels/a", "value": "2"},
        {"op": "add", "path": "/spec/list/-", "value": 3},
        {"op": "add", "path": "/spec/list/0", "value": 0},
        {"op": "remove", "path": "/spec/list/1"},
        {"op": "replace", "path": "/spec/list/0", "value": 9},
        {"op": "add", "path": "/spec/new", "value": {"x": [1]}},
    ])
    assert out["metadata"]["labels"] == {"a": "2", "apexlogic.dev/device-group": "phones", "tilde~key": "t",
                                         "~1": "literal ~1"}
    assert out["spec"] == {"list": [9, 2, 3], "new": {"x": [1]}}
    assert doc == {"metadata": {"labels": {"a": "1"}}, "spec": {"list": [1, 2]}}  # the input is untouched
    assert apply_patch({"a": 1}, [{"op": "remove", "path": "/a"}]) == {}


@pytest.mark.parametrize("op, match", [
    ({"op": "replace", "path": "/missing", "value": 1}, "missing member"),
    ({"op": "remove", "path": "/a/b"}, "does not exist"),
    ({"op": "move", "path": "/a", "from": "/b"}, "not supported"),
    ({"op": "add", "path": "a", "value": 1}, "must start with '/'"),
    ({"op": "add", "path": "/list/5", "value": 1}, "out of range"),
    ({"op": "add", "path": "/list/x", "value": 1}, "not an array index"),
    ({"op": "add", "path": "/n"}, "needs a value"),
])
def test_json6902_errors(op, match):
    with pytest.raises(DesiredStateError, match=match):
        apply_patch({"list": [], "b": 1}, [op])


def test_resolve_renders_what_kustomize_would(tmp_path):
    spec = load_spec(SPECS_DIR / "adult-income.yaml")
    variant = {"variant": "dynamic", "sourceUri": "s3://edge-models/adult-income/dynamic.onnx", "sha256": OTHER,
               "sizeBytes": 40, "signatureUri": "s3://edge-models/adult-income/dynamic.onnx.sig"}
    files = render_release_files(spec, _inputs(group_variants={"branch-kiosks": variant}))
    objects = resolve(_write(tmp_path, files))

    assert [(model_of(o), group_of(o)) for o in objects] == [("adult-income", "android-tablets"),
                                                            ("adult-income", "branch-kiosks")]
    tablets, kiosks = objects
    assert tablets["metadata"]["name"] == "adult-income-android-tablets"
    assert tablets["metadata"]["labels"]["apexlogic.dev/device-group"] == "android-tablets"
    assert tablets["spec"]["targetDevices"]["selector"]["matchLabels"] == {
        "apexlogic.dev/app": "loan-advisor", "apexlogic.dev/device-class": "android-tablet"}
    assert tablets["spec"]["slo"] == {"latencyP95Ms": 20}
    assert tablets["spec"]["modelRef"]["checksum"] == f"sha256:{SHA}"
    assert kiosks["spec"]["modelRef"]["variant"] == "dynamic"
    assert kiosks["spec"]["modelRef"]["checksum"] == f"sha256:{OTHER}"
    assert kiosks["spec"]["modelRef"]["signatureRef"] == {"uri": variant["signatureUri"]}
    assert kiosks["spec"]["modelRef"]["version"] == "7"
    assert rollout_share(kiosks) == 100


def test_a_broken_overlay_is_skipped_and_reported(tmp_path):
    spec = load_spec(SPECS_DIR / "adult-income.yaml")
    files = render_release_files(spec, _inputs())
    kiosks = "apps/adult-income/overlays/branch-kiosks/kustomization.yaml"
    doc = yaml.safe_load(files[kiosks])
    doc["patches"][0]["patch"] = "spec: {strategic: merge}\n"
    files[kiosks] = yaml.safe_dump(doc)
    escaping = {"apps/evil/overlays/x/kustomization.yaml": "resources: [../../../../../../etc]\n"}
    errors: list[str] = []
    objects = resolve(_write(tmp_path, {**files, **escaping}), errors)
    assert [group_of(o) for o in objects] == ["android-tablets"]
    assert any("only JSON6902" in e for e in errors) and any("outside the repository" in e for e in errors)
    assert all(str(tmp_path) not in e for e in errors)


def _obj(model: str, group: str, labels: dict | None, version: str = "1") -> dict:
    target = {"group": group} if labels is None else {"group": group, "selector": {"matchLabels": labels}}
    return {"kind": "MobileAIModelDeployment", "metadata": {"name": f"{model}-{group}"},
            "spec": {"modelRef": {"name": model, "version": version}, "targetDevices": target}}


def test_select_matches_label_subsets_and_records_conflicts():
    phone = {"apexlogic.dev/device-class": "android-phone", "app": "meter-reading", "region": "eu"}
    objects = [
        _obj("meter", "phones-eu", {"apexlogic.dev/device-class": "android-phone", "region": "eu"}),
        _obj("meter", "all-phones", {"apexlogic.dev/device-class": "android-phone"}),
        _obj("meter", "tablets", {"apexlogic.dev/device-class": "android-tablet"}),
        _obj("ocr", "empty-selector", {}),
        _obj("fraud", "nobody", None),
    ]
    conflicts: list[Conflict] = []
    chosen = select(objects, phone, conflicts)
    # An empty selector selects no device: it must never mean "every device".
    assert [(model_of(o), group_of(o)) for o in chosen] == [("meter", "all-phones")]
    assert conflicts == [Conflict("meter", "all-phones", ("phones-eu",))]
    assert select(objects, {"apexlogic.dev/device-class": "ios-phone"}) == []
    assert select(objects, {}) == []


def test_in_rollout_is_deterministic_and_near_the_share():
    ids = [f"dev-{i:05d}" for i in range(10_000)]
    first = [in_rollout(d, "meter", 50) for d in ids]
    assert first == [in_rollout(d, "meter", 50) for d in ids]
    assert 4_700 <= sum(first) <= 5_300
    assert not any(in_rollout(d, "meter", 0) for d in ids[:500])
    assert all(in_rollout(d, "meter", 100) for d in ids[:500])
    # Another model's rollout picks another slice of the fleet.
    assert first != [in_rollout(d, "ocr", 50) for d in ids]
    # Growing the share only adds devices.
    assert all(in_rollout(d, "meter", 80) for d, inside in zip(ids, first) if inside)


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _push(work: Path, files: dict[str, str], message: str) -> None:
    _write(work, files)
    _git("add", "-A", cwd=work)
    _git("commit", "-q", "-m", message, cwd=work)
    _git("push", "-q", "origin", "HEAD:main", cwd=work)


def test_git_source_clones_once_then_fetches_only_what_changed(tmp_path):
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    _git("init", "-q", "--bare", "-b", "main", str(remote))
    _git("init", "-q", "-b", "main", str(work))
    _git("remote", "add", "origin", str(remote), cwd=work)
    spec = load_spec(SPECS_DIR / "adult-income.yaml")
    # Ballast: a large file the later commits never touch, so an incremental fetch is visibly smaller.
    ballast = {"docs/ballast.txt": "".join(f"line {i} {i * 7919 % 104729}\n" for i in range(20_000))}
    _push(work, {**render_release_files(spec, _inputs()), **ballast}, "v7")

    source = GitSource(str(remote), "main", tmp_path / "cache")
    objects = source.fetch()
    assert {o["spec"]["modelRef"]["version"] for o in objects} == {"7"}
    clone = source.stats[-1]
    assert clone.kind == "clone" and clone.bytes > 50_000 and clone.changed
    assert (tmp_path / "cache" / ".git" / "shallow").is_file()

    source.fetch()
    assert source.stats[-1].kind == "fetch" and source.stats[-1].bytes == 0 and not source.stats[-1].changed

    _push(work, render_release_files(spec, _inputs(model_version="8", sha256=OTHER)), "v8")
    objects = source.fetch()
    update = source.stats[-1]
    assert {o["spec"]["modelRef"]["version"] for o in objects} == {"8"}
    assert update.changed and 0 < update.bytes < clone.bytes / 4

    # The remote goes away: the error says so, and the last checkout is still there.
    remote.rename(tmp_path / "gone.git")
    with pytest.raises(SourceError, match="failed"):
        source.fetch()
    assert (tmp_path / "cache" / "apps" / "adult-income").is_dir()


def test_git_source_errors_name_the_command_without_credentials(tmp_path, monkeypatch):
    source = GitSource("https://device:t0ken@127.0.0.1:9/gitops.git", "main", tmp_path / "cache")
    with pytest.raises(SourceError) as caught:
        source.sync()
    assert str(caught.value).startswith("git clone https://***@127.0.0.1:9/gitops.git failed: ")
    assert "t0ken" not in str(caught.value) and not (tmp_path / "cache").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    with pytest.raises(SourceError, match="^cannot run git: "):
        source.sync()
