"""Offline signing of ONNX artifacts: round trip, renamed copies, tampering, key handling."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.gitops.signing import (
    SignatureError,
    ensure_demo_keys,
    generate_key_pair,
    public_key_fingerprint,
    sign_artifact,
    verify_artifact,
)


def write_add_model(path: Path, bias: float = 1.0) -> Path:
    """A real ONNX file: y = x + b, one Add node, b a 16-float initializer."""
    import onnx
    from onnx import TensorProto, helper

    b = helper.make_tensor("b", TensorProto.FLOAT, [16], [bias + i for i in range(16)])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
        initializer=[b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return ensure_demo_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> tuple[Path, Path]:
    return ensure_demo_keys(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture
def signed(tmp_path, keys) -> tuple[Path, Path]:
    model = write_add_model(tmp_path / "publish" / "model.fp32.onnx")
    bundle = sign_artifact(model, tmp_path / "publish" / "model.fp32.onnx.sig", keys[0])
    return model, bundle


def expect_failure(model: Path, bundle: Path, public_key: Path, reason: str, *words: str) -> SignatureError:
    with pytest.raises(SignatureError) as caught:
        verify_artifact(model, bundle, public_key)
    error = caught.value
    message = str(error)
    assert error.reason == reason, message
    assert "\n" not in message
    assert model.name in message
    for word in words:
        assert word in message, message
    return error


# --- round trip --------------------------------------------------------------------------


def test_sign_then_verify(signed, keys):
    model, bundle = signed
    verify_artifact(model, bundle, keys[1])
    document = json.loads(bundle.read_text())
    assert document["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert document["verificationMaterial"]["tlogEntries"] == []
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o644
    assert sorted(p.name for p in bundle.parent.iterdir()) == [model.name, bundle.name]  # no temp left
    assert bundle.stat().st_size < 2048


def test_bundle_records_content_digest_not_location(signed):
    model, bundle = signed
    payload = json.loads(base64.b64decode(json.loads(bundle.read_text())["dsseEnvelope"]["payload"]))
    (resource,) = payload["predicate"]["resources"]
    assert resource == {"name": ".", "algorithm": "sha256", "digest": hashlib.sha256(model.read_bytes()).hexdigest()}
    assert str(model.parent) not in bundle.read_text()


def test_verify_after_copy_and_rename(signed, keys, tmp_path):
    model, bundle = signed
    device = tmp_path / "device" / "models"
    device.mkdir(parents=True)
    active = device / "active.onnx"
    shutil.copyfile(model, active)
    shutil.copyfile(bundle, device / "active.sig")
    model.unlink()
    verify_artifact(active, device / "active.sig", keys[1])


def test_verify_through_symlink(signed, keys, tmp_path):
    model, bundle = signed
    link = tmp_path / "active.onnx"
    link.symlink_to(model)
    verify_artifact(link, bundle, keys[1])


def test_sign_missing_model_leaves_nothing(tmp_path, keys):
    with pytest.raises(FileNotFoundError):
        sign_artifact(tmp_path / "absent.onnx", tmp_path / "out" / "absent.sig", keys[0])
    assert not (tmp_path / "out").exists()


def test_resign_replaces_bundle(signed, keys):
    model, bundle = signed
    before = bundle.read_bytes()
    write_add_model(model, bias=5.0)
    assert sign_artifact(model, bundle, keys[0]) == bundle
    assert bundle.read_bytes() != before
    verify_artifact(model, bundle, keys[1])


# --- tamper matrix -----------------------------------------------------------------------


def test_one_byte_changed(signed, keys):
    model, bundle = signed
    data = bytearray(model.read_bytes())
    data[-10] ^= 0x01
    model.write_bytes(bytes(data))
    assert model.stat().st_size == len(data)
    expect_failure(model, bundle, keys[1], "mismatch", "does not match")


def test_truncated(signed, keys):
    model, bundle = signed
    model.write_bytes(model.read_bytes()[:-7])
    expect_failure(model, bundle, keys[1], "mismatch", "does not match")


def test_bundle_from_another_key_pair(signed, keys, other_keys):
    model, bundle = signed
    sign_artifact(model, bundle, other_keys[0])
    expect_failure(model, bundle, keys[1], "wrong_key", "another key", keys[1].name)


def test_forged_key_hint(signed, keys, other_keys):
    """A bundle from another key that claims to be ours still fails, on the signature itself."""
    model, bundle = signed
    ours = json.loads(bundle.read_text())["verificationMaterial"]["publicKey"]["hint"]
    sign_artifact(model, bundle, other_keys[0])
    document = json.loads(bundle.read_text())
    document["verificationMaterial"]["publicKey"]["hint"] = ours
    bundle.write_text(json.dumps(document))
    expect_failure(model, bundle, keys[1], "bad_signature", "does not verify")


def test_bundle_missing(signed, keys):
    model, bundle = signed
    bundle.unlink()
    expect_failure(model, bundle, keys[1], "bundle_missing", "missing", bundle.name)


def test_bundle_is_a_directory(signed, keys):
    model, bundle = signed
    bundle.unlink()
    bundle.mkdir()
    expect_failure(model, bundle, keys[1], "bundle_unreadable", "unreadable")


@pytest.mark.parametrize(
    "content",
    [os.urandom(256), b"", b"{}", b"[]", b"null", b"not json at all"],
    ids=["random", "empty", "empty-object", "array", "null", "text"],
)
def test_bundle_garbage(signed, keys, content):
    model, bundle = signed
    bundle.write_bytes(content)
    expect_failure(model, bundle, keys[1], "bundle_malformed", "malformed", bundle.name)


def test_bundle_truncated_json(signed, keys):
    model, bundle = signed
    bundle.write_bytes(bundle.read_bytes()[:300])
    expect_failure(model, bundle, keys[1], "bundle_malformed", "malformed")


def test_bundle_of_another_model(signed, keys, tmp_path):
    model, bundle = signed
    other = write_add_model(tmp_path / "other" / "model.fp32.onnx", bias=2.0)
    other_bundle = sign_artifact(other, tmp_path / "other" / "model.fp32.onnx.sig", keys[0])
    expect_failure(model, other_bundle, keys[1], "mismatch", "does not match")


def test_model_missing(signed, keys):
    model, bundle = signed
    model.unlink()
    expect_failure(model, bundle, keys[1], "model_missing", "missing")


def test_public_key_unusable(signed, tmp_path):
    model, bundle = signed
    expect_failure(model, bundle, tmp_path / "absent.pub", "public_key", "absent.pub")
    (tmp_path / "junk.pub").write_text("junk")
    expect_failure(model, bundle, tmp_path / "junk.pub", "public_key", "junk.pub")


# --- keys --------------------------------------------------------------------------------


def test_ensure_demo_keys_is_idempotent(tmp_path):
    private, public = ensure_demo_keys(tmp_path / "k")
    first = (private.read_bytes(), public.read_bytes())
    assert ensure_demo_keys(tmp_path / "k") == (private, public)
    assert (private.read_bytes(), public.read_bytes()) == first
    assert (private.name, public.name) == ("signing.key", "signing.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert first[0].startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert first[1].startswith(b"-----BEGIN PUBLIC KEY-----")


def test_ensure_demo_keys_repairs_missing_public_key(tmp_path):
    private, public = ensure_demo_keys(tmp_path)
    expected = public.read_bytes()
    public.unlink()
    ensure_demo_keys(tmp_path)
    assert public.read_bytes() == expected


def test_ensure_demo_keys_racing_callers_agree(tmp_path):
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: ensure_demo_keys(tmp_path), range(8)))
    assert len(set(results)) == 1
    private, public = results[0]
    model = write_add_model(tmp_path / "m.onnx")
    verify_artifact(model, sign_artifact(model, tmp_path / "m.sig", private), public)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.sig", "signing.key", "signing.pub"]


def test_generate_key_pair_refuses_to_overwrite(tmp_path):
    private, public = tmp_path / "a.key", tmp_path / "a.pub"
    generate_key_pair(private, public)
    before = private.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key_pair(private, tmp_path / "b.pub")
    assert private.read_bytes() == before
    assert not (tmp_path / "b.pub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "a.pub"]


def test_fingerprint_is_stable_sha256_of_der(keys, other_keys):
    from cryptography.hazmat.primitives import serialization

    fingerprint = public_key_fingerprint(keys[1])
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    assert public_key_fingerprint(keys[1]) == fingerprint
    der = serialization.load_pem_public_key(keys[1].read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert fingerprint == hashlib.sha256(der).hexdigest()
    assert public_key_fingerprint(other_keys[1]) != fingerprint


def test_private_key_never_in_bundle(signed, keys):
    from cryptography.hazmat.primitives import serialization

    _, bundle = signed
    pem = keys[0].read_text()
    text = bundle.read_text()
    assert pem not in text
    body_lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    assert not any(line in text for line in body_lines)
    key = serialization.load_pem_private_key(keys[0].read_bytes(), password=None)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    payload = base64.b64decode(json.loads(text)["dsseEnvelope"]["payload"])
    for blob in (text.encode(), payload):
        assert scalar not in blob and scalar.hex().encode() not in blob
