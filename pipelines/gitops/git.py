"""Running the `git` CLI: one command at a time, in a clean environment, credentials kept out
of every message.

The pipeline's GitOps clone (`pipelines.gitops.repo`) and a device's clone of the desired
state (`pipelines.edge.desired.GitSource`) both run git through `run`. A clone on a device's
disk is not trusted: `UNTRUSTED_CLONE` is the configuration that keeps git from running any
hook or fsmonitor command the clone's own `.git/config` names.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

TIMEOUT_S = 300

# Hooks and fsmonitor are commands git runs on its own; a clone whose `.git` may have been
# written by someone else must run neither.
UNTRUSTED_CLONE = {"core.hooksPath": "/dev/null", "core.fsmonitor": "false"}

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCP_LIKE = re.compile(r"^[^/:]+:")  # host:path or user@host:path
# Variables that would point git at another repository, work tree or object store.
_REDIRECTS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY")


class GitError(RuntimeError):
    """A git command failed; the message has credentials removed."""


class GitTimeout(GitError):
    """A git command did not finish in time."""


def redact(text: str) -> str:
    """`text` with the user-info part of any URL (`user:token@`) replaced by `***@`."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def is_path(remote: str) -> bool:
    """Whether `remote` is a plain local path: neither a URL nor `host:path`."""
    return not _URL.match(remote) and not _SCP_LIKE.match(remote)


def environment() -> dict[str, str]:
    """The process environment for git: nothing redirects it to another repository (a caller
    inside a git hook or worktree), it never waits for a password, and it speaks English."""
    env = {name: value for name, value in os.environ.items() if name not in _REDIRECTS}
    env["GIT_TERMINAL_PROMPT"] = "0"  # fail instead of waiting for a password
    env["LC_ALL"] = "C"  # messages are matched in English
    return env


def run(
    *args: str,
    cwd: Path | None = None,
    input: str | None = None,
    env: dict[str, str] | None = None,
    config: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """`git -c key=value… <args>` with text output captured; `env` defaults to `environment()`.

    GitTimeout when it runs longer than `timeout` seconds; with `check`, GitError (see
    `failure`) when it exits non-zero. OSError when git cannot be started.
    """
    flags = [part for key, value in (config or {}).items() for part in ("-c", f"{key}={value}")]
    try:
        result = subprocess.run(
            ["git", *flags, *args],
            cwd=cwd,
            input=input,
            env=env or environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise GitTimeout(redact(f"git {' '.join(args)} timed out after {timeout:g}s")) from None
    if check and result.returncode != 0:
        raise failure(args, result)
    return result


def failure(args: tuple[str, ...], result: subprocess.CompletedProcess[str]) -> GitError:
    """A failed git command as one line: git's own lines joined (the last 2,000 characters;
    the end says why), credentials redacted."""
    detail = " | ".join(line.strip() for line in (result.stderr.strip() or result.stdout.strip()).splitlines()
                        if line.strip())[-2000:]
    return GitError(redact(f"git {' '.join(args)} failed ({result.returncode}): {detail}"))
