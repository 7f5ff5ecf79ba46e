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
import tempfile
from pathlib import Path

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"


class SignatureError(ValueError):
    """The artifact failed verification; `reason` is a short code, the message one line."""

    def __init__(self, artifact: Path, reason: str, detail: str):
        self.artifact = Path(artifact)
        self.reason = reason
        super().__init__(f"{artifact}: {detail}")


# --- keys --------------------------------------------------------------------------------


def _private_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_temp(folder: Path, name: str, data: bytes, mode: int) -> Path:
    """Write `data` to a fresh temp file beside the final name, flushed, with `mode`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return Path(tmp)


def _write_public_key(public_path: Path, pem: bytes) -> None:
    tmp = _write_temp(public_path.parent, public_path.name, pem, 0o644)
    try:
        os.replace(tmp, public_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_key_pair(private_path: Path, public_path: Path) -> None:
    """Create an EC P-256 key pair as PEM: PKCS8 private key (0600), SPKI public key (0644).

    Raises FileExistsError if `private_path` exists; an existing public key is replaced.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.exists():
        raise FileExistsError(f"refusing to overwrite private key {private_path}")
    key = ec.generate_private_key(ec.SECP256R1())
    tmp = _write_temp(private_path.parent, private_path.name, _private_pem(key), 0o600)
    try:
        # link() fails if the name exists, so a racing writer can never be overwritten and
        # readers never see a partly written key.
        os.link(tmp, private_path)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite private key {private_path}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _write_public_key(public_path, _public_pem(key.public_key()))


def ensure_demo_keys(folder: Path, name: str = PRIVATE_KEY_NAME.removesuffix(".key")) -> tuple[Path, Path]:
    """Return `(folder/<name>.key, folder/<name>.pub)`, creating the pair on first use.

    For demos and tests only; production keys come from a secret store. Safe under
    concurrent callers: the first private key linked into place wins, and the public key is
    always (re)derived from that installed private key.
    """
    from cryptography.hazmat.primitives import serialization

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    try:
        generate_key_pair(private_path, public_path)
    except FileExistsError:
        pass
    key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    expected = _public_pem(key.public_key())
    # Repairs a missing or stale public key (a crash or a racer between the two writes).
    if not public_path.is_file() or public_path.read_bytes() != expected:
        _write_public_key(public_path, expected)
    return private_path, public_path


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
    tmp = _write_temp(bundle.parent, bundle.name, b"", 0o644)
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
