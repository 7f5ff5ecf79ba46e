"""The desired-state publisher on a real release: idempotent, refuses what the release key did
not attest, keeps the last good state, and never reads review branches."""

from __future__ import annotations

import json
import subprocess

import yaml
from conftest import tabular_frame, write_spec

from pipelines.__main__ import main
from pipelines.edge.publish import publish_desired_state
from pipelines.gitops.manifest import base_manifest_path
from pipelines.settings import Settings

MODEL = "publish-model"
BASE = base_manifest_path(MODEL)


def _git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _listing(settings: Settings) -> dict[str, int]:
    root = settings.state / "artifacts" / settings.tuf_prefix
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _document(settings: Settings, group: str) -> dict:
    from pipelines.edge.publish import repository

    return json.loads(repository(settings).read_target(f"groups/{group}.json"))


def test_publish_is_idempotent_refuses_unattested_edits_and_skips_review_branches(state, tmp_path, capsys):
    from pipelines.release import run_release

    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    assert run_release(write_spec(tmp_path, MODEL, "data.csv")).status == "released"
    settings = Settings()
    phones = _document(settings, "meter-phones-android")
    [entry] = phones["entries"]
    assert (entry["model"], entry["version"], entry["group"]) == (MODEL, "1", "phones")
    assert entry["artifact"]["path"].startswith(f"models/{MODEL}/") and entry["sequence"] > 0
    assert _document(settings, "branch-kiosks")["entries"] == []  # its labels select nothing of this model

    # The same tip again: nothing written, no version moves.
    before = _listing(settings)
    again = publish_desired_state(settings)
    assert not again.changed and again.refused == {}
    assert _listing(settings) == before

    # A Git writer without the key moves the phones to a made-up version: refused, the last good
    # state stays published, and the CLI names the model and why.
    work = tmp_path / "work"
    _git("clone", "-q", str(settings.remote), str(work))
    doc = yaml.safe_load((work / BASE).read_text())
    doc["spec"]["modelRef"]["version"] = "999999"
    (work / BASE).write_text(yaml.safe_dump(doc, sort_keys=False))
    _git("commit", "-qam", "bump", cwd=work)
    _git("push", "-q", "origin", "HEAD:main", cwd=work)
    capsys.readouterr()
    assert main(["publish-desired-state"]) == 0
    out = capsys.readouterr().out
    assert "desired state unchanged" in out, out
    assert f"REFUSED {MODEL}: apps/{MODEL}/overlays/phones: differs from the attested desired state" in out, out
    assert _listing(settings) == before
    assert _document(settings, "meter-phones-android")["entries"] == phones["entries"]

    # A review branch carries a valid attestation but is never published.
    _git("checkout", "-q", "-b", "release/x", "HEAD~1", cwd=work)
    (work / "apps" / MODEL / "RELEASE.md").write_text("under review\n")
    _git("commit", "-qam", "review", cwd=work)
    _git("push", "-q", "origin", "release/x", cwd=work)
    assert not publish_desired_state(settings).changed
    assert _listing(settings) == before

    # A Git writer deletes the model's folder: nothing signed says so, so devices keep it.
    _git("checkout", "-q", "main", cwd=work)
    _git("rm", "-qr", f"apps/{MODEL}", cwd=work)
    _git("commit", "-qm", "remove", cwd=work)
    _git("push", "-q", "origin", "HEAD:main", cwd=work)
    removed = publish_desired_state(settings)
    assert removed.refused == {MODEL: f"apps/{MODEL} is gone from the tip without an attested change"}
    assert not removed.changed and _listing(settings) == before
