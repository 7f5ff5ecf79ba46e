"""The embedded Airflow's REST client: a busy SQLite database is waited out, other errors are not."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stack import airflow_local
from stack.airflow_local import AirflowError, EmbeddedAirflow


def _server(answers: list[tuple[int, dict]]):
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            calls.append(self.path)
            status, body = answers[min(len(calls), len(answers)) - 1]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


def _client(tmp_path, server) -> EmbeddedAirflow:
    client = EmbeddedAirflow(tmp_path / "airflow", port=server.server_address[1])
    client._token = "test-token"
    return client


def test_a_database_error_is_retried_until_the_request_goes_through(tmp_path, monkeypatch):
    monkeypatch.setattr(airflow_local.time, "sleep", lambda seconds: None)
    locked = (500, {"detail": {"reason": "Database error", "statement": "hidden"}})
    server, calls = _server([locked, locked, (200, {"id": 7})])
    try:
        assert _client(tmp_path, server).request("POST", "assets/events", json={}) == {"id": 7}
        assert calls == ["/api/v2/assets/events"] * 3
    finally:
        server.shutdown()


def test_other_errors_and_a_lasting_database_error_fail_with_the_answer(tmp_path, monkeypatch):
    monkeypatch.setattr(airflow_local.time, "sleep", lambda seconds: None)
    server, calls = _server([(400, {"detail": "bad conf"})])
    try:
        with pytest.raises(AirflowError, match="POST assets/events: 400 .*bad conf"):
            _client(tmp_path, server).request("POST", "assets/events", json={})
        assert len(calls) == 1, "only a database error is tried again"
    finally:
        server.shutdown()
    server, calls = _server([(500, {"detail": {"reason": "Database error"}})])
    try:
        with pytest.raises(AirflowError, match="500"):
            _client(tmp_path, server).request("POST", "assets/events", json={})
        assert len(calls) == airflow_local.DB_RETRIES + 1
    finally:
        server.shutdown()


def test_the_celery_worker_comes_with_the_celery_executor_and_only_with_it(tmp_path):
    from stack.airflow_local import DEFAULT_COMPONENTS, LOCAL_COMPONENTS, EmbeddedAirflow

    EmbeddedAirflow(tmp_path / "a", components=LOCAL_COMPONENTS)
    EmbeddedAirflow(tmp_path / "b", components=(*DEFAULT_COMPONENTS, "celery-worker"), executor="CeleryExecutor",
                    database="postgresql+psycopg2://u@127.0.0.1/db")
    with pytest.raises(ValueError, match="celery-worker"):
        EmbeddedAirflow(tmp_path / "c", components=(*LOCAL_COMPONENTS, "celery-worker"))
    with pytest.raises(ValueError, match="celery-worker"):
        EmbeddedAirflow(tmp_path / "d", executor="CeleryExecutor")


def test_sqlite_connect_arguments_stay_off_another_database(tmp_path, monkeypatch):
    from stack.airflow_local import SQLITE_ENV, EmbeddedAirflow

    for name, value in SQLITE_ENV.items():
        monkeypatch.setenv(name, value)
    sqlite = EmbeddedAirflow(tmp_path / "a").env
    postgres = EmbeddedAirflow(tmp_path / "b", database="postgresql+psycopg2://u@127.0.0.1/db").env
    assert all(sqlite[name] == value for name, value in SQLITE_ENV.items())
    assert not set(SQLITE_ENV) & set(postgres)


def test_make_ui_links_edge_releases_to_the_mlflow_people_open(tmp_path):
    from pipelines.settings import Settings

    started = "http://127.0.0.1:5000/"
    assert airflow_local.ui_links(Settings(state_dir=tmp_path), started) == {"EDGE_MLFLOW_UI_URL": started}
    configured = Settings(state_dir=tmp_path, mlflow_ui_url="https://mlflow.example.com")
    assert airflow_local.ui_links(configured, started) == {"EDGE_MLFLOW_UI_URL": "https://mlflow.example.com"}
    # A tracking URI that is no web page (a database) gives no link.
    assert airflow_local.ui_links(Settings(state_dir=tmp_path), "postgresql://db/mlflow") == {}
