"""Key rotation and revocation through the CLI, seen by a real device on the TUF repository.

One release of a tiny model; a device provisioned with root v1 (the `tuf-root` file) installs
it. Then the operator revokes a leaked timestamp key (`tuf-rotate --new-timestamp-key`) and
rotates the root key (`--new-root-key`): the device follows both root versions on its next
polls, keeps serving, and afterwards refuses a timestamp signed with the revoked key.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from conftest import tabular_frame, write_spec

from pipelines.__main__ import main
from pipelines.edge.agent import EdgeAgent
from pipelines.edge.sources import TufDesiredState
from pipelines.gitops.signing import generate_key_pair
from pipelines.settings import Settings

MODEL = "rotation-model"
PHONE = {"apexlogic.dev/device-class": "android-phone", "app": "meter-reading"}


def _root_version(device) -> int:
    return json.loads((device / "tuf" / "metadata" / "root.json").read_bytes())["signed"]["version"]


def test_root_rotation_and_revocation_of_a_leaked_timestamp_key(state, tmp_path, monkeypatch, capsys):
    from tuf.api.metadata import Metadata, Timestamp

    from pipelines.edge.tuf_repo import load_signer
    from pipelines.release import run_release

    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    assert run_release(write_spec(tmp_path, MODEL, "data.csv")).status == "released"
    settings = Settings()
    assert main(["tuf-root", "--output", str(tmp_path / "root.json")]) == 0
    device = tmp_path / "device"
    agent = EdgeAgent("dev-r", PHONE, device,
                      TufDesiredState(settings.device_tuf_url, "meter-phones-android", device,
                                      (tmp_path / "root.json").read_bytes()),
                      settings.signing_keys()[1], settings.telemetry_url)
    [first] = agent.poll_once()
    assert (first.model, first.state, first.version) == (MODEL, "active", "1")
    assert _root_version(device) == 1

    # The timestamp key leaked: a new one is trusted by root v2, the old one revoked.
    keys = settings.tuf_keys()
    leaked = keys["timestamp"]
    generate_key_pair(tmp_path / "timestamp2.key", tmp_path / "timestamp2.pub")
    assert main(["tuf-rotate", "--new-timestamp-key", str(tmp_path / "timestamp2.key")]) == 0
    assert "root v2 signed; new keys: timestamp" in capsys.readouterr().out
    monkeypatch.setenv("EDGE_TUF_SNAPSHOT_KEY", str(keys["snapshot"]))
    monkeypatch.setenv("EDGE_TUF_TIMESTAMP_KEY", str(tmp_path / "timestamp2.key"))
    assert main(["publish-desired-state"]) == 0
    [after] = agent.poll_once()
    assert (after.state, after.version) == ("unchanged", "1")
    assert _root_version(device) == 2

    # The root key itself is replaced (signed by the old and the new root key): root v3.
    generate_key_pair(tmp_path / "root2.key", tmp_path / "root2.pub")
    assert main(["tuf-rotate", "--root-key", str(keys["root"]), "--new-root-key", str(tmp_path / "root2.key")]) == 0
    [again] = agent.poll_once()
    assert again.state == "unchanged" and _root_version(device) == 3

    # Whoever holds the revoked timestamp key signs a newer timestamp: the device refuses it.
    store = settings.state / "artifacts" / settings.tuf_prefix / "metadata"
    genuine = (store / "timestamp.json").read_bytes()
    forged = Metadata[Timestamp].from_bytes(genuine)
    forged.signed.version += 1
    forged.signed.expires = (datetime.now(timezone.utc) + timedelta(days=1)).replace(microsecond=0)
    forged.signatures.clear()
    forged.sign(load_signer(leaked))
    (store / "timestamp.json").write_bytes(forged.to_bytes())
    [refused] = agent.poll_once()
    assert refused.state == "refused" and refused.version == "1"
    assert "refused by TUF" in refused.error and "timestamp" in refused.error.lower(), refused.error
    assert agent.installed_version(MODEL) == "1" and agent.active_model_path(MODEL) is not None

    # The genuine timestamp (the new key) served again: the device carries on.
    (store / "timestamp.json").write_bytes(genuine)
    [back] = agent.poll_once()
    assert (back.state, back.version) == ("unchanged", "1")
