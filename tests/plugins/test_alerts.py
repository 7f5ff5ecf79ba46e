"""Alerts (plugins/edge_airflow/alerts.py) delivered for real: a local HTTP receiver on
127.0.0.1 takes the webhook's JSON (the HTTP provider's hook), the Slack message (the Slack
provider's notifier and hook) and the PagerDuty Events API v2 trigger (the PagerDuty
provider's notifier, its Events API URL set by the connection's host), with the channels
configured by Airflow connections in `AIRFLOW_CONN_*` variables."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from edge_airflow import alerts

TOKEN = "whk-7d1f0c2e9b8a4e55"  # the webhook connection's password
SLACK_TOKEN = "T0001/B0002/slacksecret0003"
ROUTING_KEY = "pd-routing-key-4c9e1a"


class _Receiver(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        status = self.server.status
        if self.path.startswith("/services/"):  # Slack answers a webhook with a plain "ok"
            reply, kind = b"ok", "text/plain"
        else:
            reply, kind = json.dumps({"status": "success", "message": "Event processed",
                                      "dedup_key": "d"}).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


class Receiver(ThreadingHTTPServer):
    """Records every POST (path, headers, JSON body) and answers `status`."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Receiver)
        self.requests: list[dict] = []
        self.status = 200
        self.url = f"http://127.0.0.1:{self.server_port}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def to(self, prefix: str) -> list[dict]:
        return [r for r in self.requests if r["path"].startswith(prefix)]


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def ui_url(monkeypatch):
    monkeypatch.setenv("EDGE_UI_URL", "https://airflow.example.com/edge")
    for conn_id in alerts.CHANNELS:
        monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id.upper()}", raising=False)


def connect(monkeypatch, conn_id: str, **fields) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


def all_channels(monkeypatch, url: str, **pagerduty_extra) -> None:
    connect(monkeypatch, alerts.WEBHOOK, conn_type="http", host=f"{url}/hooks/edge", password=TOKEN)
    connect(monkeypatch, alerts.SLACK, conn_type="slackwebhook", host=f"{url}/services", password=SLACK_TOKEN)
    connect(monkeypatch, alerts.PAGERDUTY, conn_type="pagerduty_events", host=url, password=ROUTING_KEY,
            extra=pagerduty_extra)


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_every_channel_receives_a_critical_alert_with_its_link(monkeypatch, receiver):
    all_channels(monkeypatch, receiver.url)
    delivered = alerts.send_alert(
        "rollback", "adult-income", "adult-income: canary of version 3 rolled back to 2",
        "Decision: rollback: error rate 4.1% over 2.0%", "critical",
        {"previous_version": "2", "share": 10, "commit": "c0ffee"}, version="3")
    assert delivered == [alerts.WEBHOOK, alerts.SLACK, alerts.PAGERDUTY]
    link = "https://airflow.example.com/edge/models/adult-income/versions/3"

    [webhook] = receiver.to("/hooks/edge")
    assert webhook["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert webhook["body"] == {
        "schema": "edge-alert/v1", "event": "rollback", "model": "adult-income", "severity": "critical",
        "title": "adult-income: canary of version 3 rolled back to 2",
        "text": "Decision: rollback: error rate 4.1% over 2.0%", "link": link, "version": "3",
        "figures": {"previous_version": "2", "share": 10, "commit": "c0ffee"}, "run": {}}

    [slack] = receiver.to("/services/")
    assert slack["path"] == f"/services/{SLACK_TOKEN}"
    text = slack["body"]["text"]
    assert text.startswith(":rotating_light: *adult-income: canary of version 3 rolled back to 2*")
    assert f"<{link}|Open in Edge Releases>" in text and "share: 10" in text

    [pagerduty] = receiver.to("/v2/enqueue")
    event = pagerduty["body"]
    assert (event["routing_key"], event["event_action"], event["dedup_key"]) == (
        ROUTING_KEY, "trigger", "edge/adult-income/rollback/3")
    assert event["payload"]["summary"] == "adult-income: canary of version 3 rolled back to 2"
    assert (event["payload"]["severity"], event["payload"]["component"], event["payload"]["class"]) == (
        "critical", "adult-income", "rollback")
    assert event["payload"]["custom_details"]["figures"]["commit"] == "c0ffee"
    assert event["links"] == [{"href": link, "text": "Edge Releases"}]


def test_slack_and_pagerduty_take_their_minimum_severity(monkeypatch, receiver):
    all_channels(monkeypatch, receiver.url)
    assert alerts.send_alert("drift", "m", "m: drift", severity="warning") == [alerts.WEBHOOK, alerts.SLACK]
    all_channels(monkeypatch, receiver.url, min_severity="warning")
    connect(monkeypatch, alerts.SLACK, conn_type="slackwebhook", host=f"{receiver.url}/services",
            password=SLACK_TOKEN, extra={"min_severity": "critical"})
    assert alerts.send_alert("drift", "m", "m: drift", severity="warning") == [alerts.WEBHOOK, alerts.PAGERDUTY]
    assert len(receiver.to("/v2/enqueue")) == 1 and len(receiver.to("/services/")) == 1
    [first, _] = receiver.to("/hooks/edge")
    assert first["body"]["link"] == "https://airflow.example.com/edge/models/m", "no version: the model's page"


def test_the_bearer_token_is_sent_but_never_logged(monkeypatch, receiver, caplog, capfd):
    connect(monkeypatch, alerts.WEBHOOK, conn_type="http", host=f"{receiver.url}/hooks/edge", password=TOKEN)
    caplog.set_level(logging.DEBUG)
    assert alerts.send_alert("budget_breach", "m", "m: forecast over budget") == [alerts.WEBHOOK]
    receiver.status = 500  # a failing receiver: the error path logs too
    assert alerts.send_alert("budget_breach", "m", "m: forecast over budget") == []
    assert [r["headers"]["Authorization"] for r in receiver.requests] == [f"Bearer {TOKEN}"] * 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(alerts.WEBHOOK in w and "500" in w for w in warnings), warnings
    out, err = capfd.readouterr()
    assert TOKEN not in caplog.text + out + err


def test_a_secret_in_a_text_is_masked_before_it_leaves(monkeypatch, receiver):
    connect(monkeypatch, alerts.WEBHOOK, conn_type="http", host=f"{receiver.url}/hooks/edge", password=TOKEN)
    alerts.send_alert("run_failed", "m", "m: failed", "first attempt")  # the connection's password is known now
    alerts.send_alert("run_failed", "m", "m: failed", f"could not reach https://user:{TOKEN}@store/x",
                      figures={"error": TOKEN})
    sent = json.dumps(receiver.requests[-1]["body"])
    assert TOKEN not in sent and "***" in sent


def test_an_unreachable_channel_is_logged_and_does_not_raise(monkeypatch, receiver, caplog):
    dead = closed_port_url()
    connect(monkeypatch, alerts.WEBHOOK, conn_type="http", host=f"{dead}/hooks/edge", password=TOKEN)
    connect(monkeypatch, alerts.SLACK, conn_type="slackwebhook", host=f"{dead}/services", password=SLACK_TOKEN)
    connect(monkeypatch, alerts.PAGERDUTY, conn_type="pagerduty_events", host=receiver.url, password=ROUTING_KEY)
    caplog.set_level(logging.WARNING)
    assert alerts.send_alert("rollback", "m", "m: rolled back", severity="critical") == [alerts.PAGERDUTY]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert alerts.WEBHOOK in warned and alerts.SLACK in warned
    assert TOKEN not in caplog.text and SLACK_TOKEN not in caplog.text


def test_without_connections_nothing_is_sent(receiver):
    assert alerts.send_alert("approval_waiting", "m", "m: version 1 waits for approval", severity="info") == []
    assert receiver.requests == []


def test_an_unknown_event_or_severity_is_refused():
    with pytest.raises(ValueError, match="event 'released'"):
        alerts.build_alert("released", "m", "t")
    with pytest.raises(ValueError, match="severity 'high'"):
        alerts.build_alert("drift", "m", "t", severity="high")


def test_a_relative_link_is_shown_as_text_in_slack(monkeypatch):
    monkeypatch.delenv("EDGE_UI_URL")
    alert = alerts.build_alert("drift", "m", "m: <drift> & more", version="2")
    assert alert.link == "/edge/models/m/versions/2"
    assert alert.slack_text().splitlines() == [":warning: *m: &lt;drift&gt; &amp; more*",
                                               "Edge Releases: /edge/models/m/versions/2"]


@pytest.mark.integration
def test_a_failed_release_run_alerts_through_the_task_failure_callback(airflow_db, state, monkeypatch, tmp_path,
                                                                        receiver):
    from airflow.dag_processing.dagbag import DagBag
    from conftest import ROOT, tabular_frame, write_spec

    connect(monkeypatch, alerts.WEBHOOK, conn_type="http", host=f"{receiver.url}/hooks/edge", password=TOKEN)
    tabular_frame().drop(columns=["colour"]).to_csv(tmp_path / "data.csv", index=False)
    write_spec(tmp_path, "alerted-dag", "data.csv")
    monkeypatch.setenv("EDGE_SPECS_DIR", str(tmp_path))
    bag = DagBag(dag_folder=str(ROOT / "dags" / "edge_release.py"))
    run = bag.dags["edge_release__alerted-dag"].test()
    assert str(getattr(run.state, "value", run.state)) == "failed"

    [alert] = [r["body"] for r in receiver.to("/hooks/edge")]
    assert (alert["event"], alert["model"], alert["severity"], alert["version"]) == (
        "run_failed", "alerted-dag", "warning", None)
    assert alert["title"] == "alerted-dag: edge_release__alerted-dag failed in validate_data"
    assert "colour" in alert["text"] and alert["link"] == "https://airflow.example.com/edge/models/alerted-dag"
    assert alert["run"] == {"dag_id": "edge_release__alerted-dag", "run_id": run.run_id, "task_id": "validate_data"}


def test_the_decision_alerts_a_rejection_with_the_failed_gates(monkeypatch, receiver):
    from edge_airflow.approval import alert_decision

    connect(monkeypatch, alerts.WEBHOOK, conn_type="http", host=f"{receiver.url}/hooks/edge")
    decision = {"outcome": "reject", "failed_gates": ["fairness"], "reasons": ["bias score 0.31 above 0.2"]}
    assert alert_decision("release_rejected", {"name": "m", "version": 4}, decision) == [alerts.WEBHOOK]
    [sent] = receiver.requests
    assert "Authorization" not in sent["headers"], "no password: no token"
    assert (sent["body"]["title"], sent["body"]["text"], sent["body"]["link"]) == (
        "m version 4 rejected: fairness", "bias score 0.31 above 0.2",
        "https://airflow.example.com/edge/models/m/versions/4")
