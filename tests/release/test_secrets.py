"""No secret leaves a release: S3 credentials, a GitOps token and the signing keys are
configured, a model is released through the real Airflow DAG and through the CLI, and then
everything the releases produced is read back and searched for the secrets.

The stores are real services on 127.0.0.1: moto's S3 server, and `git http-backend` behind a
small HTTP server that asks for Basic credentials (so the token in the remote URL is really
used). Searched: the Airflow run's task logs (`airflow dags test` logs every task to its
output at INFO; it writes no log files), its XComs and rendered fields and the metadata
database; the CLI's output and the Python log records; every MLflow run's params, tags, metric
names and artifacts; every registered model and version; every file and commit message of the
GitOps remote; every S3 object; the local state (MLflow's database and artifacts); the
summaries.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import string
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from conftest import STATE, tabular_frame, write_spec

from pipelines import registry
from pipelines.gitops import repo
from pipelines.settings import Settings

pytestmark = pytest.mark.integration

GIT_USER = "edge-release-bot"
DAG_ID = "edge_release__secret-dag"
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{41,}")
_WINDOW = 41  # a chunk of a key's base64 body longer than 40 characters is a leak


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _GitHTTP(BaseHTTPRequestHandler):
    """Smart HTTP for the repositories under `root`: `git http-backend` as a CGI program,
    behind Basic authentication with one user and token."""

    root: Path
    authorization: str
    requests: dict[str, int]

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._backend()

    def do_POST(self):  # noqa: N802
        self._backend()

    def log_message(self, format, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _backend(self):
        body = self._body()
        if self.headers.get("Authorization") != self.authorization:
            self.requests["refused"] += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="gitops"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.requests["authorized"] += 1
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": GIT_USER, "REMOTE_ADDR": self.client_address[0],
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        output = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                                timeout=120).stdout
        separator = b"\r\n\r\n" if b"\r\n\r\n" in output else b"\n\n"
        head, _, payload = output.partition(separator)
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def git_server(tmp_path_factory):
    """(bare repository on disk, URL of it with the token in it, the token, request counts)."""
    root = tmp_path_factory.mktemp("git-http")
    subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(root / "gitops.git")], check=True)
    token = "ghp_" + secrets.token_hex(20)
    credentials = base64.b64encode(f"{GIT_USER}:{token}".encode()).decode()
    counts = {"authorized": 0, "refused": 0}
    handler = type("Handler", (_GitHTTP,), {"root": root, "authorization": f"Basic {credentials}",
                                            "requests": counts})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://{GIT_USER}:{token}@127.0.0.1:{server.server_address[1]}/gitops.git"
    yield root / "gitops.git", url, token, credentials, counts
    server.shutdown()
    server.server_close()


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    from pipelines.gitops.signing import generate_key_pair

    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    generate_key_pair(private, public)
    return private, public


def _pem_body(pem: str) -> str:
    return "".join(line.strip() for line in pem.splitlines() if line.strip() and not line.startswith("-----"))


class Sources:
    """Everything collected, by source: {source: {item name: text}}."""

    def __init__(self):
        self.items: dict[str, dict[str, str]] = {}

    def add(self, source: str, name: str, content: str | bytes) -> None:
        if isinstance(content, bytes):
            content = content.decode("utf-8", errors="replace")
        self.items.setdefault(source, {})[name] = content

    def add_tree(self, source: str, folder: Path, skip=lambda path: False) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not skip(p)):
            self.add(source, str(path.relative_to(folder)), path.read_bytes())

    def count(self, source: str) -> int:
        return len(self.items.get(source, {}))


def _leaks(sources: Sources, plain: dict[str, str], keys: dict[str, str]) -> list[str]:
    """(source, item, which secret) for every secret found: the plain secrets as substrings, the
    keys' PEM bodies by any base64 window of more than 40 characters."""
    windows = {}
    for name, pem in keys.items():
        body = _pem_body(pem)
        windows.update({body[i:i + _WINDOW]: name for i in range(len(body) - _WINDOW + 1)})
    found = set()
    for source, items in sources.items.items():
        for item, text in items.items():
            found |= {f"{source}: {item}: {name}" for name, secret in plain.items() if secret in text}
            for run in _BASE64_RUN.findall(text):
                hits = {windows[run[i:i + _WINDOW]] for i in range(len(run) - _WINDOW + 1)
                        if run[i:i + _WINDOW] in windows}
                found |= {f"{source}: {item}: {name} (base64 chunk)" for name in hits}
    return sorted(found)


def _collect_mlflow(sources: Sources, settings: Settings, models: list[str], tmp: Path) -> None:
    client = registry.client(settings.tracking_uri)
    for model in models:
        experiment = client.get_experiment_by_name(f"edge-release/{model}")
        for run in client.search_runs([experiment.experiment_id]):
            run_id = run.info.run_id
            sources.add("mlflow params", run_id, json.dumps(run.data.params, sort_keys=True))
            sources.add("mlflow tags", run_id, json.dumps(run.data.tags, sort_keys=True))
            sources.add("mlflow metric names", run_id, "\n".join(sorted(run.data.metrics)))
            local = Path(client.download_artifacts(run_id, "", str(tmp / run_id)))
            sources.add_tree("mlflow artifacts", local)
        registered = client.get_registered_model(model)
        sources.add("mlflow registered models", model,
                    json.dumps({"description": registered.description, "tags": registered.tags,
                                "aliases": registered.aliases}, sort_keys=True, default=str))
        for version in client.search_model_versions(f"name = '{model}'"):
            sources.add("mlflow model versions", f"{model} v{version.version}",
                        json.dumps({"description": version.description, "tags": version.tags,
                                    "source": version.source, "run_link": version.run_link},
                                   sort_keys=True, default=str))


def _collect_git(sources: Sources, bare: Path) -> None:
    def git(*args) -> str:
        return subprocess.run(["git", "--git-dir", str(bare), *args], capture_output=True, text=True,
                              check=True).stdout

    branches = git("for-each-ref", "--format=%(refname)", "refs/heads").split()
    for ref in branches:
        for path in git("ls-tree", "-r", "--name-only", ref).splitlines():
            sources.add("gitops files", f"{ref}:{path}", git("show", f"{ref}:{path}"))
    for sha in git("rev-list", "--all").split():
        sources.add("gitops commit messages", sha, git("log", "-1", "--format=%an <%ae>%n%B", sha))


def _collect_s3(sources: Sources, s3) -> None:
    for bucket in s3.list_buckets()["Buckets"]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for item in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
                sources.add("s3 objects", f"s3://{bucket['Name']}/{item['Key']}", body)


def _collect_airflow(sources: Sources, output: str, db_path: Path) -> set[str]:
    """The run's task logs (split by task), XComs and rendered fields; the tasks seen."""
    tasks = set()
    for i, chunk in enumerate(re.split(r"(?=\[DAG TEST\] starting task_id=)", output)):
        task = re.match(r"\[DAG TEST\] starting task_id=(\S+)", chunk)
        tasks.add(task.group(1)) if task else None
        sources.add("airflow task logs", task.group(1) if task else f"outside tasks {i}", chunk)
    logs = STATE / "airflow" / "logs"  # dag.test() logs to its output; any log files are searched too
    if logs.is_dir():
        sources.add_tree("airflow log files", logs)
    with sqlite3.connect(db_path) as db:
        for task_id, key, value in db.execute("select task_id, key, value from xcom where dag_id = ?", (DAG_ID,)):
            sources.add("airflow xcoms", f"{task_id}/{key}", str(value))
        for task_id, fields in db.execute(
                "select task_id, rendered_fields from rendered_task_instance_fields where dag_id = ?", (DAG_ID,)):
            sources.add("airflow rendered fields", task_id, str(fields))
    sources.add("airflow metadata database", db_path.name, db_path.read_bytes())
    return tasks


def test_a_release_leaves_no_secret_behind(airflow_db, monkeypatch, tmp_path, state, caplog, capfd,
                                           s3_endpoint, git_server):
    from pipelines.__main__ import main
    from pipelines.gitops.signing import verify_artifact

    bare, remote, token, git_basic, git_requests = git_server
    alphabet = string.ascii_uppercase + string.digits
    access_key = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
    secret_key = secrets.token_urlsafe(30)
    keys = tmp_path / "keys"
    keys.mkdir()
    conn_private, conn_public = _key_pair(keys, "connection")
    file_private, file_public = _key_pair(keys, "file")
    bucket, data_bucket = f"edge-{secrets.token_hex(4)}", f"edge-data-{secrets.token_hex(4)}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": "us-east-1",
        "EDGE_ARTIFACT_STORE": f"s3://{bucket}/releases", "EDGE_S3_ENDPOINT_URL": s3_endpoint,
        "EDGE_GITOPS_REMOTE": remote, "EDGE_SIGNING_KEY": str(file_private), "EDGE_SIGNING_PUBLIC_KEY": str(file_public),
        "AIRFLOW_CONN_EDGE_SIGNING": json.dumps({"conn_type": "generic", "password": conn_private.read_text(),
                                                 "extra": {"public_key": conn_public.read_text()}}),
    }.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket=data_bucket)
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    s3.upload_file(str(tmp_path / "data.csv"), data_bucket, "tables/small.csv")
    specs = tmp_path / "specs"
    specs.mkdir()
    write_spec(specs, "secret-dag", f"s3://{data_bucket}/tables/small.csv")
    cli_spec = write_spec(specs, "secret-cli", f"s3://{data_bucket}/tables/small.csv")
    caplog.set_level(logging.INFO)

    # Through Airflow (`airflow dags test`: dag.test() in its own process, so its task logs
    # are at INFO, as on a worker): the signing key comes from the `edge_signing` connection.
    monkeypatch.setenv("EDGE_SPECS_DIR", str(specs))
    airflow = subprocess.run([str(Path(sys.executable).parent / "airflow"), "dags", "test", DAG_ID],
                             env={**os.environ, "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO", "PYTHONWARNINGS": "ignore"},
                             capture_output=True, text=True, timeout=600)
    assert airflow.returncode == 0, airflow.stderr[-3000:]
    with sqlite3.connect(airflow_db) as db:
        [(state,)] = db.execute("select state from dag_run where dag_id = ?", (DAG_ID,)).fetchall()
        [(value,)] = db.execute("select value from xcom where dag_id = ? and task_id = 'summarize' "
                                "and key = 'return_value'", (DAG_ID,)).fetchall()
    assert state == "success", airflow.stdout[-3000:]
    dag_summary = json.loads(value)
    assert dag_summary["status"] == "released", dag_summary

    # Through the CLI: the signing key comes from EDGE_SIGNING_KEY.
    assert main(["release", str(cli_spec), "--json"]) == 0
    cli = capfd.readouterr()
    cli_summary = json.loads(cli.out.strip().splitlines()[-1])
    assert cli_summary["status"] == "released", cli_summary

    settings = Settings()
    # The server asks for the token: the same remote without it is refused.
    assert git_requests["authorized"] > 0, git_requests
    bare_url = re.sub(r"//[^@/]+@", "//", remote)
    anonymous = subprocess.run(["git", "ls-remote", bare_url], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    assert anonymous.returncode != 0 and git_requests["refused"] > 0, (anonymous.stderr, git_requests)
    signed_by = {"secret-dag": conn_public, "secret-cli": file_public}
    for summary in (dag_summary, cli_summary):
        key = summary["artifact_uri"].removeprefix(f"s3://{bucket}/")
        for suffix in ("", ".sig"):
            s3.download_file(bucket, key + suffix, str(tmp_path / f"{summary['model']}.onnx{suffix}"))
        onnx = tmp_path / f"{summary['model']}.onnx"
        verify_artifact(onnx, onnx.with_name(onnx.name + ".sig"), signed_by[summary["model"]])
    assert not list(Path(tempfile.gettempdir()).glob("edge-signing-*")), "key files were left behind"

    sources = Sources()
    tasks = _collect_airflow(sources, f"{airflow.stdout}\n{airflow.stderr}", airflow_db)
    assert {"validate_data", "register", "publish", "commit", "summarize"} <= tasks, tasks
    sources.add("cli output", "stdout", cli.out)
    sources.add("cli output", "stderr", cli.err)
    for i, record in enumerate(caplog.records):
        sources.add("python logging", f"{i} {record.name}", f"{record.getMessage()}\n{record.exc_text or ''}")
    sources.add("python logging", "caplog.text", caplog.text)
    assert any(r.name.startswith("pipelines") for r in caplog.records), "no log record of the release"
    _collect_mlflow(sources, settings, ["secret-dag", "secret-cli"], tmp_path / "mlflow")
    _collect_git(sources, bare)
    _collect_s3(sources, s3)
    # The local state: MLflow's database and artifacts, scratch files, the working clones'
    # `.git` folders (their config names the remote without credentials) but for their
    # compressed objects, whose contents the GitOps check above reads from the remote.
    sources.add_tree("local state", settings.state,
                     skip=lambda p: {".git", "objects"} <= set(p.relative_to(settings.state).parts))
    assert any(path.endswith(".git/config") for path in sources.items["local state"]), "no working clone scanned"
    for summary in (dag_summary, cli_summary):
        sources.add("summaries", f"{summary['model']} (xcom / cli)", json.dumps(summary))
        stored = s3.get_object(Bucket=bucket, Key=f"releases/releases/{summary['model']}/latest.json")["Body"].read()
        sources.add("summaries", f"{summary['model']} latest.json", stored)

    expected = ["airflow task logs", "airflow xcoms", "airflow rendered fields", "airflow metadata database",
                "cli output", "python logging", "mlflow params", "mlflow tags", "mlflow metric names", "mlflow artifacts", "mlflow registered models", "mlflow model versions",
                "gitops files", "gitops commit messages", "s3 objects", "local state", "summaries"]
    counts = {source: sources.count(source) for source in [*expected, "airflow log files"]}
    assert all(counts[source] for source in expected), counts
    texts = {s: items for s, items in sources.items.items()}
    assert any("release(secret-dag)" in t for t in texts["gitops commit messages"].values())
    assert any("release(secret-cli)" in t for t in texts["gitops commit messages"].values())
    assert any(n.endswith("secret-cli/base/mobileaimodeldeployment.yaml") for n in texts["gitops files"])
    assert any(n.endswith(".json") for n in texts["s3 objects"]) and any(
        n.endswith(".html") for n in texts["s3 objects"])
    assert any("test_accuracy" in t for t in texts["mlflow metric names"].values())
    shown = f"http://***@127.0.0.1:{remote.rsplit(':', 1)[1]}"  # the commit record names the remote, redacted
    assert shown in texts["airflow xcoms"]["commit/return_value"] and shown in texts["airflow task logs"]["commit"]

    plain = {"AWS secret access key": secret_key, "AWS access key id": access_key, "Git token": token,
             "Git Basic credentials": git_basic, "PEM header of a private key": "PRIVATE KEY-----"}
    pems = {"connection's private key": conn_private.read_text(), "file's private key": file_private.read_text()}
    plain.update({f"{name} (PEM)": pem.strip() for name, pem in pems.items()})
    leaks = _leaks(sources, plain, pems)
    print("scanned:", json.dumps(counts))
    assert not leaks, "\n".join(leaks)


def test_a_push_to_a_credentialed_remote_that_fails_names_no_token(tmp_path):
    token = "ghp_" + secrets.token_hex(20)
    remote = f"https://{GIT_USER}:{token}@127.0.0.1:{_free_port()}/edge-gitops.git"
    with pytest.raises(repo.GitError) as failure:
        repo.ensure_remote(remote, "main", ("bot", "bot@example.com"))
    # git never sees the credentials in the URL: the message names the remote without them.
    assert token not in str(failure.value) and "https://127.0.0.1:" in str(failure.value)
    with pytest.raises(repo.GitError) as failure:
        repo.commit_release(remote, "main", "m", {"apps/m/a.yaml": "a: 1\n"}, "release", ("bot", "bot@example.com"),
                            tmp_path)
    assert token not in str(failure.value)


def test_the_edge_gitops_connection_authenticates_with_a_header(git_server, monkeypatch, tmp_path):
    """The `edge_gitops` connection's token reaches the Git server as a header for the clean
    URL: the remote answers with it and refuses without it; no clone keeps it."""
    from airflow.sdk import Connection
    from edge_airflow.connections import gitops_variables

    _, remote, token, _, _ = git_server
    clean = re.sub(r"//[^@/]+@", "//", remote)
    monkeypatch.setattr(repo, "_HTTP_AUTH", {})  # forget the credentialed URL an earlier test used
    connection = Connection(conn_id="edge_gitops", conn_type="generic", host=clean, login=GIT_USER, password=token)
    with monkeypatch.context() as patch:
        for name, value in gitops_variables(connection, {}).items():
            patch.setenv(name, value)
        repo.ensure_remote(clean, "main", ("bot", "bot@example.com"))
        assert repo.has_branch(clean, "main")
        files, _ = repo.app_files(clean, "main", "absent-model", tmp_path / "work")
        assert files == {}
    anonymous = subprocess.run(["git", "ls-remote", clean], capture_output=True, text=True, timeout=60,
                               env={k: v for k, v in os.environ.items() if not k.startswith("GIT_CONFIG_")}
                               | {"GIT_TERMINAL_PROMPT": "0"})
    assert anonymous.returncode != 0  # without the connection's header the server refuses
    configs = [p.read_text() for p in (tmp_path / "work").rglob("config") if ".git" in p.parts]
    assert configs and all(token not in text for text in configs)
