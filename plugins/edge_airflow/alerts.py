"""Alerts that reach people: a rejected release, an approval waiting, a field quality or
fairness breach, drift, a forecast budget breach, a rollback, a failed run.

`send_alert(event, model, title, ...)` builds one `Alert` (its link goes to the Edge Releases
page of the model, or of the version when known) and delivers it to every channel whose Airflow
connection exists:

| connection | type | what it sends | default minimum severity |
|---|---|---|---|
| `edge_alerts_webhook` | `http` | the alert as JSON (`WebhookNotifier`, through the HTTP provider's hook); a password without a login is sent as a bearer token, a login and password as basic auth | info |
| `edge_alerts_slack` | `slackwebhook` | a message (the Slack provider's `SlackWebhookNotifier`) | info |
| `edge_alerts_pagerduty` | `pagerduty_events` | an Events API v2 trigger, deduplicated per model, event and version (the PagerDuty provider's `PagerdutyNotifier`) | critical |

Slack and PagerDuty take `min_severity` (info, warning, critical) in the connection's extra;
the webhook receives every alert and its receiver routes on `severity`. A channel without a
connection is skipped; a channel that fails is logged as a warning naming its connection (never
its secret) and never fails the task that reports the event: the release, or the rollback,
stands. Every text is passed through Airflow's secrets masker before it leaves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)

EVENTS = ("release_rejected", "approval_waiting", "field_breach", "drift", "budget_breach", "rollback", "run_failed")
SEVERITIES = ("info", "warning", "critical")
WEBHOOK, SLACK, PAGERDUTY = "edge_alerts_webhook", "edge_alerts_slack", "edge_alerts_pagerduty"
MIN_SEVERITY = {WEBHOOK: "info", SLACK: "info", PAGERDUTY: "critical"}
SCHEMA = "edge-alert/v1"
TIMEOUT_SECONDS = 10
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com"
_SLACK_ICONS = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}


@dataclass(frozen=True)
class Alert:
    """One alert as every channel sends it: what happened to which model, how bad, the figures
    it rests on and the Edge Releases page that explains it."""

    event: str
    model: str
    severity: str
    title: str
    text: str
    link: str
    version: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    run: dict[str, str] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """The alert as the webhook's JSON body."""
        return {"schema": SCHEMA, **asdict(self)}

    @property
    def dedup_key(self) -> str:
        """One open PagerDuty incident per model, event and version: repeats join it."""
        return "/".join(["edge", self.model, self.event] + ([self.version] if self.version else []))

    def slack_text(self) -> str:
        """The alert as a Slack message (mrkdwn): title, text, figures, link."""
        lines = [f"{_SLACK_ICONS[self.severity]} *{_slack_escape(self.title)}*"]
        if self.text:
            lines.append(_slack_escape(self.text))
        if self.figures:
            lines.append(_slack_escape(", ".join(f"{key}: {_figure(value)}" for key, value in self.figures.items())))
        lines.append(f"<{self.link}|Open in Edge Releases>" if _absolute(self.link)
                     else f"Edge Releases: {_slack_escape(self.link)}")
        return "\n".join(lines)


def _absolute(link: str) -> bool:
    return link.startswith(("https://", "http://"))


def _slack_escape(text: str) -> str:
    """Text shown as itself in Slack: `&`, `<` and `>` are its markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _figure(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _masked(value: Any) -> Any:
    """`value` with every secret Airflow knows in this process (connection passwords read,
    sensitive variables) replaced by `***`."""
    from airflow.sdk._shared.secrets_masker import redact

    return redact(value)


def _run_of(context: dict | None) -> dict[str, str]:
    """The DAG, run and task an alert comes from (empty outside a task)."""
    if context is None:
        try:
            from airflow.sdk import get_current_context

            context = get_current_context()
        except Exception:  # not in a task: a test, the command line
            return {}
    ti = context.get("ti")
    if ti is None:
        return {}
    return {"dag_id": str(ti.dag_id), "run_id": str(ti.run_id), "task_id": str(ti.task_id)}


def build_alert(event: str, model: str, title: str, text: str = "", severity: str = "warning",
                figures: dict | None = None, version: str | None = None, run: dict[str, str] | None = None) -> Alert:
    """An `Alert` linked to the version's Edge Releases page (the model's when no version is
    known), its texts and figures masked. An unknown event or severity is a ValueError."""
    from pipelines.settings import get_settings

    if event not in EVENTS:
        raise ValueError(f"alert event {event!r} is not one of {', '.join(EVENTS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"alert severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    version = str(version) if version not in (None, "") else None
    page = f"/models/{model}" + (f"/versions/{version}" if version else "")
    figures = json.loads(json.dumps(figures or {}, default=str))  # JSON values only
    return Alert(event=event, model=model, severity=severity, title=_masked(" ".join(title.split())),
                 text=_masked(text.strip()), link=get_settings().edge_link(page), version=version,
                 figures=_masked(figures), run=run or {})


class WebhookNotifier(BaseNotifier):
    """POST a JSON body to the HTTP connection `http_conn_id` (its host is the URL, `endpoint`
    a path under it) through the HTTP provider's `HttpHook`. The connection's password is sent
    as a bearer token when it has no login (with a login: basic auth); its extra may set
    `timeout` (seconds, default 10), `proxies`, `verify` and headers, as for any HTTP
    connection. A reply other than 2xx or 3xx raises."""

    template_fields = ("http_conn_id", "endpoint", "payload")

    def __init__(self, *, payload: dict, http_conn_id: str = WEBHOOK, endpoint: str = "",
                 timeout: float = TIMEOUT_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.payload, self.http_conn_id, self.endpoint, self.timeout = payload, http_conn_id, endpoint, timeout

    def notify(self, context) -> None:
        from airflow.providers.http.hooks.http import HttpHook

        hook = HttpHook(method="POST", http_conn_id=self.http_conn_id)
        connection = hook.get_connection(self.http_conn_id)
        headers = {"Content-Type": "application/json"}
        if connection.password and not connection.login:
            headers["Authorization"] = f"Bearer {connection.password}"
        timeout = (connection.extra_dejson or {}).get("timeout", self.timeout)
        hook.run(self.endpoint, json=self.payload, headers=headers, extra_options={"timeout": timeout})


def _send_webhook(alert: Alert, connection: Any, context: dict) -> None:
    WebhookNotifier(payload=alert.payload()).notify(context)


def _send_slack(alert: Alert, connection: Any, context: dict) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    timeout = int((connection.extra_dejson or {}).get("timeout", TIMEOUT_SECONDS))
    SlackWebhookNotifier(slack_webhook_conn_id=SLACK, text=alert.slack_text(), timeout=timeout,
                         unfurl_links=False).notify(context)


def _send_pagerduty(alert: Alert, connection: Any, context: dict) -> None:
    """An Events API v2 trigger through the provider's notifier. Its asynchronous hook is the
    one whose Events API URL can be set: the connection's host when given (the EU service
    region, `https://events.eu.pagerduty.com`, or a relay), else PagerDuty's US endpoint. The
    provider's synchronous hook always posts to `https://events.pagerduty.com`."""
    import asyncio

    from airflow.providers.pagerduty.notifications.pagerduty import PagerdutyNotifier

    details = {"event": alert.event, "model": alert.model, "version": alert.version, "text": alert.text,
               "figures": alert.figures, "link": alert.link, "run": alert.run}
    notifier = PagerdutyNotifier(
        pagerduty_events_conn_id=PAGERDUTY, summary=alert.title[:1024], severity=alert.severity,
        source=f"edge-release/{alert.model}", component=alert.model, group="edge-release", class_type=alert.event,
        dedup_key=alert.dedup_key, custom_details=details,
        links=[{"href": alert.link, "text": "Edge Releases"}] if _absolute(alert.link) else None)
    host = (connection.host or PAGERDUTY_EVENTS_URL).rstrip("/")
    notifier.hook_async.base_url = host if "://" in host else f"https://{host}"
    asyncio.run(notifier.async_notify(context))


CHANNELS: dict[str, Callable[[Alert, Any, dict], None]] = {
    WEBHOOK: _send_webhook, SLACK: _send_slack, PAGERDUTY: _send_pagerduty}


def _connection(conn_id: str):
    """The Airflow connection `conn_id`, or None when it is not defined."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import Connection

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def _wanted(alert: Alert, conn_id: str, connection: Any) -> bool:
    """Whether the channel takes an alert this severe (its extra `min_severity`; the webhook
    takes every alert)."""
    if conn_id == WEBHOOK:
        return True
    least = str((connection.extra_dejson or {}).get("min_severity", MIN_SEVERITY[conn_id]))
    if least not in SEVERITIES:
        log.warning("connection %s: min_severity %r is not one of %s; using %s", conn_id, least,
                    ", ".join(SEVERITIES), MIN_SEVERITY[conn_id])
        least = MIN_SEVERITY[conn_id]
    return SEVERITIES.index(alert.severity) >= SEVERITIES.index(least)


def _why(error: BaseException, connection: Any) -> str:
    """A delivery error on one line, without the connection's secret."""
    from pipelines.errors import one_line

    text = f"{type(error).__name__}: {one_line(error, 300)}"
    for secret in (connection.password,):
        if secret:
            text = text.replace(secret.strip(), "***")
    return _masked(text)


def deliver(alert: Alert, context: dict | None = None) -> list[str]:
    """Send `alert` to every channel whose connection exists and that takes its severity;
    returns the connection ids of the channels that took it. Never raises for a channel."""
    context = context or {}
    delivered = []
    for conn_id, send in CHANNELS.items():
        try:
            connection = _connection(conn_id)
        except Exception as error:  # a secrets backend that does not answer: the other channels still go
            log.warning("alert %s of %s: connection %s not read: %s", alert.event, alert.model, conn_id,
                        type(error).__name__)
            continue
        if connection is None or not _wanted(alert, conn_id, connection):
            continue
        try:
            send(alert, connection, context)
        except Exception as error:  # an alert never fails the task whose event it reports
            log.warning("alert %s of %s not delivered to %s: %s", alert.event, alert.model, conn_id,
                        _why(error, connection))
            continue
        delivered.append(conn_id)
    return delivered


def send_alert(event: str, model: str, title: str, text: str = "", severity: str = "warning",
               figures: dict | None = None, version: str | None = None, *,
               context: dict | None = None) -> list[str]:
    """Alert people that `event` happened to `model` (`version` when known): the channels
    configured by Airflow connections (see the module docstring) receive the title, the text,
    the figures and the link to Edge Releases. Returns the connection ids that took it; a
    channel that fails is logged, never raised. `context`: the task's, when called from a
    callback (default: the running task's)."""
    alert = build_alert(event, model, title, text, severity, figures, version, _run_of(context))
    log.info("ALERT %s %s %s: %s", alert.severity, alert.event, alert.model, alert.title)
    delivered = deliver(alert, context)
    if delivered:
        log.info("alert %s of %s sent to %s", alert.event, alert.model, ", ".join(delivered))
    return delivered


def on_failure(model: str | None = None) -> Callable[[dict[str, Any]], None]:
    """An `on_failure_callback` (called after the last retry) that alerts `run_failed` for
    `model`, or for the run's `model` parameter when none is given (the rollback DAG)."""

    def alert(context: dict[str, Any]) -> None:
        failed_run(model or str((context.get("params") or {}).get("model") or "unknown"), context)

    return alert


def failed_run(model: str, context: dict[str, Any], version: str | None = None) -> list[str]:
    """Alert that the context's task failed for good, with its one-line error."""
    from airflow.exceptions import AirflowFailException

    from pipelines.errors import one_line

    ti = context["ti"]
    error = context.get("exception") or "the task failed"
    message = str(error) if isinstance(error, AirflowFailException) else one_line(error, 500)
    return send_alert("run_failed", model, f"{model}: {ti.dag_id} failed in {ti.task_id}", message,
                      "warning", {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id}, version,
                      context=context)
