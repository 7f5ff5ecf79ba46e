"""Sign model artifacts offline and verify them before use (OpenSSF `model-signing`, EC keys).

The publisher signs the ONNX file with an EC P-256 private key; the bundle (a Sigstore
bundle v0.3 JSON with a DSSE envelope, no transparency log) is stored next to the artifact
and the manifest points at both. An edge device verifies the file against the bundle with
the public key before loading it.

How the library binds names, checked against `model-signing` 1.1.1: a single-file model is
recorded as one resource named `.` (the path relative to the model itself) with the
file's sha256. The file name appears only as the informative subject name, which
verification ignores; the directory is not recorded at all. So a device may store the file
under any folder and name (e.g. `active.onnx`) and verification still passes; the tests
check this. For a directory model, names of files *inside* the directory are bound.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipelines.keys import (  # noqa: F401 (re-exported: key files are part of signing's API)
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    ensure_demo_keys,
    generate_key_pair,
    write_temp,
)


class SignatureError(ValueError):
    """The artifact failed verification; `reason` is a short code, the message one line."""

    def __init__(self, artifact: Path, reason: str, detail: str):
        self.artifact = Path(artifact)
        self.reason = reason
        super().__init__(f"{artifact}: {detail}")


def public_key_fingerprint(public_key_path: Path) -> str:
    """sha256 hex of the DER SubjectPublicKeyInfo: names the signing key without the key.

    Not the same as the `hint` the library writes in bundles (sha256 of the PEM text).
    """
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(Path(public_key_path).read_bytes())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


# --- sign / verify -----------------------------------------------------------------------


def sign_artifact(model_path: Path, bundle_path: Path, private_key_path: Path) -> Path:
    """Sign the model (a file, or a directory model) and write the bundle atomically.

    The bundle holds the DSSE-signed manifest (sha256 per file), the signature and a hash
    hint of the public key; never the private key. A symlinked model is signed as its target.
    """
    from model_signing import signing

    model, bundle = Path(model_path), Path(bundle_path)
    if not model.exists():
        raise FileNotFoundError(f"model to sign not found: {model}")
    target = model.resolve()
    bundle.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and bundle.parent.resolve().is_relative_to(target):
        # The temp bundle would be hashed as part of the model.
        raise ValueError(f"bundle {bundle} must not be inside the model directory {model}")
    config = signing.Config().use_elliptic_key_signer(private_key=Path(private_key_path))
    tmp = write_temp(bundle.parent, bundle.name, b"", 0o644)
    try:
        config.sign(target, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, bundle)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return bundle


def verify_artifact(model_path: Path, bundle_path: Path, public_key_path: Path) -> None:
    """Check the model against its bundle and public key; raise SignatureError on any failure.

    The file's name and folder may differ from the publisher's (see the module docstring);
    a symlink (e.g. `active.onnx -> v7.onnx`) is verified as its target. Failures, by
    `SignatureError.reason`: `model_missing`, `public_key`, `bundle_missing`,
    `bundle_unreadable`, `bundle_malformed`, `wrong_key`, `bad_signature`, `mismatch`.
    """
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    model, bundle, public_key = Path(model_path), Path(bundle_path), Path(public_key_path)
    if not model.exists():
        raise SignatureError(model, "model_missing", "model file is missing")
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise SignatureError(model, "public_key", f"cannot use public key {public_key}: {_one_line(exc)}") from exc
    if not bundle.exists():
        raise SignatureError(model, "bundle_missing", f"signature bundle {bundle} is missing")

    try:
        config.verify(model.resolve(), bundle)
    except OSError as exc:
        raise SignatureError(model, "bundle_unreadable", f"signature bundle {bundle} is unreadable: {exc.strerror}") from exc
    except InvalidSignature as exc:
        raise SignatureError(
            model, "bad_signature", f"signature in {bundle} does not verify with {public_key} (bundle altered or forged)"
        ) from exc
    except ValueError as exc:
        text = str(exc)
        # The library reports these two only through the message text.
        if text.startswith("Key mismatch"):
            raise SignatureError(
                model, "wrong_key", f"bundle {bundle} was signed by another key than {public_key}"
            ) from exc
        if text.startswith("Signature mismatch"):
            raise SignatureError(
                model, "mismatch", f"content does not match the digest signed in {bundle} (modified or another model)"
            ) from exc
        raise SignatureError(model, "bundle_malformed", f"signature bundle {bundle} is malformed: {_one_line(exc)}") from exc
    except Exception as exc:  # the library leaks KeyError/TypeError/... on odd JSON: fail closed
        raise SignatureError(model, "bundle_malformed", f"signature bundle {bundle} is malformed: {_one_line(exc)}") from exc


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or "no detail"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"
