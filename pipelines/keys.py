"""Key files: EC P-256 key pairs as PEM, written atomically, and the demo keys of the
embedded set-up (the release signing key and the TUF repository's online and root keys).
Production keys come from a secret store; these are for demos and tests only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"
# The TUF roles whose demo keys are made beside the release key (targets is the release key).
DEMO_TUF_ROLES = ("root", "snapshot", "timestamp")


def _private_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_temp(folder: Path, name: str, data: bytes, mode: int) -> Path:
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
    tmp = write_temp(public_path.parent, public_path.name, pem, 0o644)
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
    tmp = write_temp(private_path.parent, private_path.name, _private_pem(key), 0o600)
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


def ensure_demo_tuf_keys(folder: str | Path) -> dict[str, Path]:
    """`{"root": folder/root.key, "snapshot": ..., "timestamp": ...}`, creating missing pairs
    (with `.pub` beside them). For the embedded demo; production keys come from a secret store.
    The targets key is the release signing key (`ensure_demo_keys`)."""
    return {role: ensure_demo_keys(Path(folder), role)[0] for role in DEMO_TUF_ROLES}
