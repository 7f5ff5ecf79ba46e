"""The GitOps repository: the desired state of edge model deployments, one commit per release.

Everything goes through the `git` CLI, so any remote git understands works (a local bare
repository, `file://`, SSH, HTTPS with a token). A release owns exactly `apps/<model>/`:
`commit_release` replaces that folder and nothing else, which is what lets concurrent
releases of different models land without coordinating. Remote URLs are redacted
(`https://***@host/...`) in every message and record this module produces.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pipelines.gitops import git
from pipelines.gitops.crd import README, skeleton_files  # noqa: F401 (README: re-exported)
from pipelines.gitops.git import GitError, redact  # noqa: F401 (re-exported)
from pipelines.records import GitOpsCommit
from pipelines.specs import DNS_LABEL

PUSH_ATTEMPTS = 6  # the first push and up to 5 retries
FIRST_BACKOFF_S = 0.2

# Configuration of every git command this module runs.
_CONFIG = {"commit.gpgsign": "false", "core.quotepath": "off"}
# Push failures worth a fetch-and-retry: someone else moved the branch first.
_RACE_MARKERS = (
    "non-fast-forward",
    "fetch first",
    "cannot lock ref",
    "incorrect old value",
    "failed to update ref",
)

def _is_local(remote: str) -> bool:
    return remote.startswith("file://") or git.is_path(remote)


def _local_path(remote: str) -> Path:
    return Path(remote.removeprefix("file://")).expanduser()


# HTTP(S) remotes given with `user:password@`: the URL without them -> the Authorization
# header git sends for it (see `_resolve`).
_HTTP_AUTH: dict[str, str] = {}
_HTTP_CREDENTIALS = re.compile(r"^(?P<scheme>https?://)(?P<user>[^/@:\s]+):(?P<password>[^/@\s]+)@(?P<rest>.*)$")


def _resolve(remote: str) -> str:
    """The remote as git commands are given it: a local path made absolute (git runs inside
    clones, where relative paths differ); an HTTP(S) URL with `user:password@` without them,
    the credentials going to git as an Authorization header through the environment of each
    command (`_env`), so they never land in a clone's `.git/config`, a message or a record."""
    if _is_local(remote) and not remote.startswith("file://"):
        return str(_local_path(remote).resolve())
    found = _HTTP_CREDENTIALS.match(remote)
    if found:
        from urllib.parse import unquote

        clean = found["scheme"] + found["rest"]
        basic = base64.b64encode(f"{unquote(found['user'])}:{unquote(found['password'])}".encode()).decode()
        _HTTP_AUTH[clean] = f"Authorization: Basic {basic}"
        return clean
    return remote


def _env() -> dict[str, str]:
    env = git.environment()
    # Credentials of HTTP(S) remotes as configuration that lives only in this environment.
    count = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
    for url, header in _HTTP_AUTH.items():
        env[f"GIT_CONFIG_KEY_{count}"] = f"http.{url}.extraHeader"
        env[f"GIT_CONFIG_VALUE_{count}"] = header
        count += 1
    if _HTTP_AUTH:
        env["GIT_CONFIG_COUNT"] = str(count)
    return env


def _git(
    *args: str,
    cwd: Path | None = None,
    input: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return git.run(*args, cwd=cwd, input=input, env=env or _env(), config=_CONFIG, check=check)


def _author_env(author: tuple[str, str]) -> dict[str, str]:
    name, email = author
    env = _env()
    env.update(
        GIT_AUTHOR_NAME=name,
        GIT_AUTHOR_EMAIL=email,
        GIT_COMMITTER_NAME=name,
        GIT_COMMITTER_EMAIL=email,
    )
    return env


def _remote_has_branch(remote: str, branch: str) -> bool:
    result = _git("ls-remote", "--heads", remote, f"refs/heads/{branch}")
    return bool(result.stdout.strip())


def _absent(remote: str) -> bool:
    """Whether `remote` (resolved) is a local repository that does not exist yet."""
    return _is_local(remote) and not _local_path(remote).exists()


def has_branch(remote: str, branch: str) -> bool:
    """Whether the remote exists and has `branch` (False before the first release)."""
    remote = _resolve(remote)
    return not _absent(remote) and _remote_has_branch(remote, branch)


def ensure_branch(remote: str, base: str, branch: str, work_dir: Path) -> bool:
    """Make `branch` on the remote from the tip of `base` unless it exists; whether it was made."""
    if _git("check-ref-format", "--branch", branch, check=False).returncode != 0 or branch.startswith("-"):
        raise ValueError(f"{branch!r} is not a valid branch name")
    remote = _resolve(remote)
    if _remote_has_branch(remote, branch):
        return False
    with _opened(remote, work_dir) as clone:
        _fetch(clone, base)
        result = _git("push", "-q", "origin", f"refs/remotes/origin/{base}:refs/heads/{branch}", cwd=clone,
                      check=False)
        if result.returncode != 0 and not _remote_has_branch(remote, branch):
            raise GitError(redact(f"creating branch {branch} on the remote failed: {result.stderr.strip()[-1000:]}"))
    return True


def ensure_remote(remote: str, branch: str, author: tuple[str, str]) -> None:
    """Make sure `remote` has `branch`: create a local bare repo and push a skeleton if needed."""
    remote = _resolve(remote)
    if _is_local(remote):
        path = _local_path(remote)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            path.parent.mkdir(parents=True, exist_ok=True)
            _git("init", "--bare", "-q", "-b", branch, str(path))
        elif not _git("for-each-ref", "refs/heads", cwd=path).stdout.strip():
            # An empty bare repo: make `branch` its default so clones check it out.
            _git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=path)
    if _remote_has_branch(remote, branch):
        return
    with tempfile.TemporaryDirectory(prefix="gitops-skeleton-") as tmp:
        clone = Path(tmp)
        _git("init", "-q", "-b", branch, str(clone))
        for rel, text in skeleton_files().items():
            target = clone / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        _git("add", "-A", cwd=clone)
        _git("commit", "-q", "-m", "Initialise the GitOps repository", cwd=clone, env=_author_env(author))
        pushed = _git("push", "-q", remote, f"HEAD:refs/heads/{branch}", cwd=clone, check=False)
        # Losing the race to another initialiser is fine; anything else is not.
        if pushed.returncode != 0 and not _remote_has_branch(remote, branch):
            raise GitError(redact(f"cannot initialise {remote}: {pushed.stderr.strip()}"))


def _clone_dir(remote: str, work_dir: Path) -> Path:
    digest = hashlib.sha256(remote.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", redact(remote).rstrip("/").rsplit("/", 1)[-1])
    stem = stem.removesuffix(".git").strip("-.") or "remote"
    return Path(work_dir) / f"{stem[:40]}-{digest}"


@contextlib.contextmanager
def _locked(clone: Path) -> Iterator[None]:
    """Serialise users of one working clone (several tasks may share a worker)."""
    clone.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, callers use separate work dirs
        yield
        return
    with open(clone.with_name(clone.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_clone(remote: str, work_dir: Path) -> Path:
    """The working clone of `remote`, created or repaired as needed (call under `_locked`)."""
    clone = _clone_dir(remote, work_dir)
    if (clone / ".git").is_dir():
        current = _git("remote", "get-url", "origin", cwd=clone, check=False)
        if current.returncode == 0 and current.stdout.strip() == remote:
            # Left by a git process killed mid-write; we hold the clone's lock, so it is stale.
            (clone / ".git" / "index.lock").unlink(missing_ok=True)
            return clone
    shutil.rmtree(clone, ignore_errors=True)
    _git("init", "-q", str(clone))
    _git("remote", "add", "origin", remote, cwd=clone)
    return clone


@contextlib.contextmanager
def _opened(remote: str, work_dir: Path) -> Iterator[Path]:
    """The working clone of `remote` (resolved), held under its lock while the block runs."""
    clone = _clone_dir(remote, Path(work_dir))
    with _locked(clone):
        yield _open_clone(remote, Path(work_dir))


def _fetch(clone: Path, branch: str, missing_ok: bool = False) -> bool:
    """Fetch `branch` into `origin/<branch>`. With `missing_ok`, a remote that has no such
    branch yet (an empty repository) answers False instead of failing."""
    args = ("fetch", "-q", "--prune", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}")
    result = _git(*args, cwd=clone, check=False)
    if result.returncode == 0:
        return True
    if missing_ok and "couldn't find remote ref" in result.stderr:
        return False
    raise git.failure(args, result)


def _sync(clone: Path, branch: str) -> None:
    """Fetch and make the working tree exactly `origin/<branch>` (no leftovers)."""
    _fetch(clone, branch)
    _git("checkout", "-q", "-f", "-B", branch, f"origin/{branch}", cwd=clone)
    _git("reset", "-q", "--hard", f"origin/{branch}", cwd=clone)
    _git("clean", "-q", "-fdx", cwd=clone)


def _head(clone: Path) -> str:
    return _git("rev-parse", "HEAD", cwd=clone).stdout.strip()


def _check_paths(model: str, files: dict[str, str]) -> None:
    if not DNS_LABEL.match(model):
        raise ValueError(f"{model!r} is not a valid model name")
    for path in files:
        pure = PurePosixPath(path)
        parts = pure.parts
        if (
            "\\" in path
            or pure.is_absolute()
            or len(parts) < 3
            or parts[:2] != ("apps", model)
            or any(part in ("", ".", "..", ".git") for part in parts)
            or str(pure) != path
        ):
            raise ValueError(f"{path!r} is outside apps/{model}/ (a release may only write there)")


def _apply(clone: Path, model: str, files: dict[str, str]) -> list[str]:
    """Replace `apps/<model>/` with `files` and stage it; the staged paths, sorted."""
    app = f"apps/{model}"
    _git("rm", "-r", "-q", "--ignore-unmatch", "--", app, cwd=clone)
    shutil.rmtree(clone / app, ignore_errors=True)
    for rel, text in files.items():
        target = clone / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    if files:
        # -f: the release's files are the desired state even if a .gitignore disagrees.
        _git("add", "-f", "--", *sorted(files), cwd=clone)
    staged = _git("diff", "--cached", "--name-only", "--no-renames", "-z", cwd=clone).stdout
    return sorted(p for p in staged.split("\0") if p)


def _push_reason(output: str) -> str:
    """A push's outcome in one line: the refused ref's status and what the remote said."""
    lines = [" ".join(line.lstrip("!").split()) for line in output.splitlines()
             if line.startswith(("!", "remote:", "error:", "fatal:")) and line.strip() != "remote:"]
    return redact("; ".join(lines) or " ".join(output.split()))


def _push(clone: Path, branch: str) -> tuple[str, str]:
    """Push HEAD: ("pushed", ""), ("current", "") when the remote already had this very
    commit, ("moved", reason) when the branch moved under us, or ("rejected", reason) when
    the remote refused it (a hook, a busy server): both are worth a replay and a retry."""
    result = _git("push", "--porcelain", "origin", f"HEAD:refs/heads/{branch}", cwd=clone, check=False)
    if result.returncode == 0:
        # Porcelain flag '=': up to date. Happens when a racing worker committed the same
        # tree on the same parent with the same message in the same second (same sha).
        up_to_date = any(line.startswith("=\t") for line in result.stdout.splitlines())
        return ("current" if up_to_date else "pushed"), ""
    output = f"{result.stdout}\n{result.stderr}"
    if any(marker in output for marker in _RACE_MARKERS):
        return "moved", _push_reason(output)
    if "[remote rejected]" in output:
        return "rejected", _push_reason(output)
    raise GitError(f"git push to origin/{branch} failed: {_push_reason(output)[-2000:]}")


def _checked_remote(remote: str, branch: str, model: str, files: dict[str, str]) -> str:
    """The resolved remote, after checking the release's paths and that `branch` exists."""
    _check_paths(model, files)
    remote = _resolve(remote)
    if not _remote_has_branch(remote, branch):
        raise GitError(redact(f"{remote} has no branch {branch!r}; call ensure_remote first"))
    return remote


def commit_release(
    remote: str,
    branch: str,
    model: str,
    files: dict[str, str],
    message: str,
    author: tuple[str, str],
    work_dir: Path,
    expect_tree: str | None = None,
) -> GitOpsCommit:
    """Make `apps/<model>/` on `branch` exactly `files`, in one commit (none if already so).

    `expect_tree` (the git tree id of `apps/<model>/` the caller read, see `app_tree`) makes
    the commit conditional: if another commit changed the model's folder since, GitError
    is raised instead of replaying over it (a rollout step must not undo a new release).

    Paths are relative to the repository root and must lie under `apps/<model>/`; files
    of that model not in `files` are deleted (empty `files` removes the model), nothing
    else is touched. A push rejected
    because the branch moved, or refused by the remote (a pre-receive hook), is retried on
    top of the new tip (up to 5 times, backoff from 0.2 s doubling); the last refusal is
    then raised as one line.
    """
    if not message.strip():
        raise ValueError("a commit message is required")
    shown, remote = remote, _checked_remote(remote, branch, model, files)
    with _opened(remote, work_dir) as clone:
        delay = FIRST_BACKOFF_S
        last_reason = ""
        for attempt in range(PUSH_ATTEMPTS):
            if attempt:
                time.sleep(delay)
                delay *= 2
            # Each attempt replays the release onto the current tip: fetch, reset, rewrite
            # apps/<model>/. This is a rebase that cannot conflict, because the release
            # owns the whole folder; another release of the same model simply lands first.
            _sync(clone, branch)
            if expect_tree is not None and _tree(clone, model) != expect_tree:
                raise GitError(f"apps/{model}/ changed on {branch} since it was read; nothing committed")
            changed = _apply(clone, model, files)
            if not changed:
                return _record(shown, branch, _head(clone), [], created=False)
            _git("commit", "-q", "--no-verify", "-F", "-", cwd=clone, input=message, env=_author_env(author))
            outcome, last_reason = _push(clone, branch)
            if outcome == "pushed":
                return _record(shown, branch, _head(clone), changed, created=True)
            if outcome == "current":
                return _record(shown, branch, _head(clone), [], created=False)
        raise GitError(
            f"push to {redact(remote)} ({branch}) still rejected after {PUSH_ATTEMPTS} attempts: "
            f"{last_reason[-1000:]}"
        )


def _tree(clone: Path, model: str) -> str:
    return _git("rev-parse", f"HEAD:apps/{model}", cwd=clone, check=False).stdout.strip()


@contextlib.contextmanager
def tip(remote: str, branch: str, work_dir: Path) -> Iterator[Path]:
    """The working clone, made exactly the tip of `branch`, held under the clone's lock (the
    same clone and lock releases use) for reading while the block runs."""
    with _opened(_resolve(remote), work_dir) as clone:
        _sync(clone, branch)
        yield clone


@contextlib.contextmanager
def fetched(remote: str, branch: str, work_dir: Path) -> Iterator[Path]:
    """The working clone with `origin/<branch>` fetched (the working tree left as it is), held
    under the clone's lock (the same clone and lock releases use) while the block runs."""
    with _opened(_resolve(remote), work_dir) as clone:
        _fetch(clone, branch)
        yield clone


def head(clone: Path) -> str:
    """The commit a clone (from `tip`) is at."""
    return _head(clone)


def app_files(remote: str, branch: str, model: str, work_dir: Path) -> tuple[dict[str, str], str]:
    """Every file of `apps/<model>/` at the tip of `branch`, and the folder's tree id."""
    with tip(remote, branch, work_dir) as clone:
        names = _git("ls-files", "--", f"apps/{model}/", cwd=clone).stdout.split()
        return {name: (clone / name).read_text(encoding="utf-8") for name in names}, _tree(clone, model)


def _record(remote: str, branch: str, commit: str, changed: list[str], created: bool) -> GitOpsCommit:
    return GitOpsCommit(
        remote=redact(remote), branch=branch, commit=commit, changed_paths=changed, created=created
    )


def read_file(remote: str, branch: str, path: str, work_dir: Path) -> str | None:
    """Text of `path` at the tip of the remote `branch`, or None if it is absent (as it is
    while the remote, or its branch, does not exist yet)."""
    remote = _resolve(remote)
    if _absent(remote):
        return None
    with _opened(remote, work_dir) as clone:
        if not _fetch(clone, branch, missing_ok=True):
            return None
        spec = f"refs/remotes/origin/{branch}:{path.lstrip('/')}"
        kind = _git("cat-file", "-t", spec, cwd=clone, check=False)
        if kind.returncode != 0 or kind.stdout.strip() != "blob":
            return None
        return _git("cat-file", "blob", spec, cwd=clone).stdout


def log(remote: str, branch: str, work_dir: Path, path: str | None = None) -> list[dict]:
    """Commits of the remote `branch` newest first (sha, committer date, subject, body),
    optionally for `path`."""
    with fetched(remote, branch, work_dir) as clone:
        args = ["log", "-z", "--format=%H%x1f%cI%x1f%s%x1f%b", f"refs/remotes/origin/{branch}"]
        if path:
            args += ["--", path]
        output = _git(*args, cwd=clone).stdout
    commits = []
    for entry in output.split("\0"):
        if not entry.strip():
            continue
        sha, date, subject, body = (entry.split("\x1f", 3) + ["", "", ""])[:4]
        commits.append({"sha": sha.strip(), "date": date, "subject": subject, "body": body.strip()})
    return commits


def show(remote: str, branch: str, sha: str, path: str, work_dir: Path) -> dict | None:
    """A commit of the remote `branch` (sha, committer date, author, subject, body) with the files
    under `path` it changed and its diff of them; None when `sha` names no commit of the branch."""
    with fetched(remote, branch, work_dir) as clone:
        found = _git("rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}", cwd=clone, check=False)
        full = found.stdout.strip()
        if found.returncode != 0 or not full or _git(
                "merge-base", "--is-ancestor", full, f"refs/remotes/origin/{branch}", cwd=clone,
                check=False).returncode != 0:
            return None
        head = _git("show", "-s", "--format=%H%x1f%cI%x1f%an%x1f%s%x1f%b", full, cwd=clone).stdout
        commit, date, author, subject, body = (head.split("\x1f", 4) + [""] * 5)[:5]
        files = _git("show", "--format=", "--name-only", full, "--", path, cwd=clone).stdout.split()
        diff = _git("show", "--format=", "--patch", "--no-color", full, "--", path, cwd=clone).stdout
    return {"sha": commit.strip(), "date": date, "author": author, "subject": subject, "body": body.strip(),
            "files": files, "diff": diff}


def history(remote: str, branch: str, path: str, work_dir: Path) -> list[tuple[str, str | None]]:
    """Commits of the remote `branch` that changed `path`, newest first, each with the text of
    `path` at that commit (None where the commit deleted it)."""
    with fetched(remote, branch, work_dir) as clone:
        shas = _git("log", "--format=%H", f"refs/remotes/origin/{branch}", "--", path, cwd=clone).stdout.split()
        found: list[tuple[str, str | None]] = []
        for sha in shas:
            shown = _git("show", f"{sha}:{path}", cwd=clone, check=False)
            found.append((sha, shown.stdout if shown.returncode == 0 else None))
        return found


def files_at(remote: str, commit: str, prefix: str, work_dir: Path) -> dict[str, str]:
    """Every file under `prefix` as `commit` has it; the commit must already be in the working
    clone (one `history` or `log` listed)."""
    with _opened(_resolve(remote), work_dir) as clone:
        names = _git("ls-tree", "-r", "--name-only", commit, "--", prefix, cwd=clone).stdout.split()
        return {name: _git("show", f"{commit}:{name}", cwd=clone).stdout for name in names}


def propose_release(
    remote: str,
    branch: str,
    review_branch: str,
    model: str,
    files: dict[str, str],
    message: str,
    author: tuple[str, str],
    work_dir: Path,
) -> GitOpsCommit:
    """Commit the release to `review_branch` (from the tip of `branch`) for a person to merge.

    Nothing changes on `branch`. The review branch belongs to this release, so it is
    (re)written with a forced push; when it already holds exactly these files, or `branch`
    already does, no commit is made.
    """
    shown, remote = remote, _checked_remote(remote, branch, model, files)
    with _opened(remote, work_dir) as clone:
        _sync(clone, branch)
        changed = _apply(clone, model, files)
        if not changed:
            return _record(shown, branch, _head(clone), [], created=False)
        if _remote_has_branch(remote, review_branch):
            _git("fetch", "-q", "origin", f"+refs/heads/{review_branch}:refs/remotes/origin/{review_branch}",
                 cwd=clone)
            same = _git("diff", "--quiet", f"refs/remotes/origin/{review_branch}", "--", f"apps/{model}/",
                        cwd=clone, check=False).returncode == 0
            if same:
                head = _git("rev-parse", f"refs/remotes/origin/{review_branch}", cwd=clone).stdout.strip()
                return _record(shown, review_branch, head, [], created=False)
        _git("commit", "-q", "--no-verify", "-F", "-", cwd=clone, input=message, env=_author_env(author))
        result = _git("push", "-q", "--force", "origin", f"HEAD:refs/heads/{review_branch}", cwd=clone, check=False)
        if result.returncode != 0:
            raise GitError(redact(f"git push to origin/{review_branch} failed: {result.stderr.strip()[-2000:]}"))
        return _record(shown, review_branch, _head(clone), changed, created=True)
