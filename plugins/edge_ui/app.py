"""The Edge Releases app: server-rendered pages and a JSON API over `edge_ui.views`.

Mounted by Airflow's api-server at `/edge` (see `plugins/edge_releases.py`). Every route
depends on `requires_authenticated()`, which accepts the `Authorization: Bearer <jwt>` header
or the `_token` cookie the Airflow UI sets, so a browser logged in to Airflow opens these
pages directly and inside the UI's iframe. Links between pages are relative, so the app works
under whatever prefix it is mounted at.
"""

from __future__ import annotations

import html
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from airflow.api_fastapi.core_api.security import GetUserDep, requires_authenticated
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_ui import history, verdicts, views
from pipelines.finops.cost import signed_usd
from pipelines.gates.card import shipped_label
from pipelines.gitops.git import GitError
from pipelines.records import usd
from pipelines.storage import StoreError

if TYPE_CHECKING:
    from edge_ui.charts import Chart

HERE = Path(__file__).resolve().parent
# Same origin only (the Airflow UI's iframe included); the pages need no script.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")
# Evidence HTML (model cards, Evidently reports with their own scripts) runs in an opaque
# origin: it cannot act as the logged-in user against the Airflow API.
EVIDENCE_POLICY = "sandbox allow-scripts allow-popups; frame-ancestors 'self'"

app = FastAPI(title="Edge Releases", docs_url=None, redoc_url=None, openapi_url=None,
              dependencies=[Depends(requires_authenticated())])
# Stylesheets only, and without a login: the page that asks for one is styled too.
app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
STYLESHEETS = ("edge.css", "verdicts.css", "charts.css", "history.css")


# -- rendering -------------------------------------------------------------------------------------
def _money(value) -> str:
    return "—" if value is None else usd(value)


def _signed_money(value) -> str:
    return "" if value is None else signed_usd(value)


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _share(value) -> str:
    return f"{value:g}% of devices" if value is not None else ""


def _when(value) -> str:
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment.utcoffset() is not None and \
        moment.utcoffset().total_seconds() == 0 else moment.strftime("%Y-%m-%d %H:%M %z")


def _short(value, length: int = 8) -> str:
    return str(value or "")[:length]


_STATUS = {"released": "ok", "ok": "ok", "pass": "ok", "release": "ok",
           "rejected": "bad", "drift": "bad", "fail": "bad",
           "awaiting_approval": "wait", "in_review": "info", "insufficient_data": "neutral", "rollout": "wait",
           "rolled_back": "warn", "rollback": "warn", "dry_run": "neutral", "failed": "bad", "running": "info",
           "breach": "bad", "insufficient_labels": "neutral"}


def _status_class(status) -> str:
    return _STATUS.get(str(status or ""), "neutral")


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
templates.globals.update(verdict_rows=verdicts.verdict_rows, context_rows=verdicts.context_rows)
templates.filters["shipped_label"] = lambda shipped: shipped_label(shipped.model_dump())
templates.filters.update(money=_money, signed_money=_signed_money, number=_number, figure=_figure, share=_share,
                         when=_when, short=_short, status_class=_status_class)


def _base(request: Request) -> str:
    """The relative path from this page back to the app's root ("", "../", "../../../")."""
    inside = request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"
    return "../" * inside.count("/", 1) or "./"


def _render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    base = _base(request)
    context.update(base=base, evidence_href=lambda uri: f"{base}evidence?uri={quote(str(uri), safe='')}",
                   stylesheets=[name for name in STYLESHEETS if (HERE / "static" / name).is_file()],
                   commit_href=lambda model, sha: views.commit_web_url(sha)
                   or f"{base}models/{quote(model, safe='')}/commits/{quote(sha, safe='')}")
    if "page" in context:
        context["model_href"] = f"{base}models/{quote(context['page'].model, safe='')}"
    text = templates.get_template(name).render(**context)
    return HTMLResponse(text, status_code=status_code, headers={"Content-Security-Policy": PAGE_POLICY,
                                                                "Cache-Control": "no-store"})


def _wants_json(request: Request) -> bool:
    inside = request.url.path.removeprefix(request.scope.get("root_path", ""))
    return inside.startswith("/api/") or "text/html" not in request.headers.get("accept", "")


def _login_url(request: Request) -> str | None:
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager().get_url_login(next_url=str(request.url))
    except Exception:  # noqa: BLE001 (no auth manager in this process: no link, still a 401)
        return None


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException):
    if _wants_json(request):
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
    if error.status_code in (401, 403):
        title = "Log in to see Edge Releases" if error.status_code == 401 else "Not allowed"
        message = ("These pages show release data to Airflow users: log in to Airflow, then open them again."
                   if error.status_code == 401 else f"{error.detail}.")
        return _render(request, "message.html", error.status_code, title=title, message=message,
                       login_url=_login_url(request))
    return _render(request, "message.html", error.status_code, title=f"Error {error.status_code}",
                   message=str(error.detail), login_url=None)


def may_read_data(user, model: str | None) -> bool:
    """Whether Airflow's auth manager lets `user` read a model's training data and model files:
    the people who may start the model's release DAG (which reads them anyway). For a file of no
    model, the right to start any DAG."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    details = DagDetails(id=views.release_dag_id(model)) if model else None
    return get_auth_manager().is_authorized_dag(method="POST", access_entity=DagAccessEntity.RUN, details=details,
                                                user=user)


def _unknown(error: KeyError) -> HTTPException:
    return HTTPException(404, f"No model or version named {error.args[0]!r}")


# -- charts ----------------------------------------------------------------------------------------
def _drawn(problems: list[str], what: str, draw) -> Chart | None:
    """One chart, or None with the reason among the page's problems when its data is unreadable."""
    try:
        return draw()
    except (StoreError, ValueError, KeyError, OSError) as error:
        problems.append(f"{what} chart not drawn: {error}")
        return None


def _model_charts(page: views.ModelPage) -> dict[str, Chart | None]:
    """The model's charts; the cost is the deployed version's (the latest release's before one is).
    matplotlib is imported by the first page with a chart, not when the api-server starts."""
    from edge_ui import charts, trends

    model, problems = page.model, page.problems
    deployed = next((v for v in page.versions if v.version == page.row.deployed_version), None)
    summary = _drawn(problems, "stored summary", lambda: views.stored_summary(model, deployed.release_key)) \
        if deployed else None
    return {
        "cost": _drawn(problems, "cost", lambda: charts.cost_chart(trends.cost_trend(model, summary=summary))),
        "versions": _drawn(problems, "versions running", lambda: charts.versions_chart(trends.versions_running(model))),
        "canary": _drawn(problems, "canary", lambda: charts.canary_chart(trends.canary_trend(model))),
        "drift": _drawn(problems, "drift", lambda: charts.drift_chart(trends.drift_trend(model))),
    }


def _version_charts(model: str, release_key: str | None, problems: list[str]) -> dict[str, Chart | None]:
    from edge_ui import charts, trends

    summary = _drawn(problems, "stored summary", lambda: views.stored_summary(model, release_key))
    if not summary:
        return {}
    return {
        "fairness": _drawn(problems, "fairness", lambda: charts.fairness_chart(trends.fairness_groups(model, summary=summary))),
        "quantization": _drawn(problems, "quantization", lambda: charts.quantization_chart(trends.quantization_points(summary))),
        "cost": _drawn(problems, "cost", lambda: charts.cost_chart(trends.cost_trend(model, summary=summary))),
    }


# -- pages ---------------------------------------------------------------------------------------
@app.get("/", response_class=HTMLResponse)
def index(request: Request):
    return _render(request, "index.html", rows=views.list_models())


@app.get("/models/{model}", response_class=HTMLResponse)
def model(request: Request, model: str):
    try:
        page = views.model_page(model)
    except views.UnknownModel as error:
        raise _unknown(error) from None
    try:
        events = history.model_history(model)
    except (StoreError, ValueError, OSError, GitError) as error:
        events = []
        page.problems.append(f"history not readable: {error}")
    return _render(request, "model.html", page=page, charts=_model_charts(page), events=events)


@app.get("/models/{model}/versions/{version}", response_class=HTMLResponse)
def version(request: Request, user: GetUserDep, model: str, version: str):
    try:
        page = views.version_page(model, version)
    except views.UnknownModel as error:
        raise _unknown(error) from None
    return _render(request, "version.html", page=page, links=views.version_links(
        model, page.version, experiment_id=views.experiment_of(page.version.run_id)),
        may_read_data=may_read_data(user, model),
        charts=_version_charts(model, page.version.release_key, page.problems))


@app.get("/models/{model}/compare", response_class=HTMLResponse)
def compare(request: Request, model: str, a: str = Query(..., max_length=9), b: str = Query(..., max_length=9)):
    try:
        page = views.compare_page(model, a, b)
    except views.UnknownModel as error:
        raise _unknown(error) from None
    return _render(request, "compare.html", page=page)


@app.get("/models/{model}/commits/{sha}", response_class=HTMLResponse)
def commit(request: Request, model: str, sha: str):
    try:
        page = views.commit_page(model, sha)
    except views.UnknownModel as error:
        raise _unknown(error) from None
    return _render(request, "commit.html", page=page)


_STORE_LINK = re.compile(r'(href|src)="([^"]+)"')


def _relink(text: str, prefix: str) -> str:
    """Links of an evidence page that point into the store, rewritten to go through this app."""

    def replace(match: re.Match) -> str:
        target = html.unescape(match.group(2))
        if not target.startswith(prefix):
            return match.group(0)
        return f'{match.group(1)}="evidence?uri={quote(target, safe="")}"'

    return _STORE_LINK.sub(replace, text)


CSV_ROWS_SHOWN = 2_000  # a CSV's rows shown as a table; the file itself is one link away


@app.get("/evidence")
def evidence(request: Request, user: GetUserDep, uri: str = Query(..., max_length=2048), raw: bool = False):
    try:
        key = views.evidence_key(uri)
    except views.EvidenceError:
        raise HTTPException(400, "Refused: only evidence files inside the artifact store are served") from None
    if views.is_data_file(key):
        model = views.evidence_model(key)
        if not may_read_data(user, model):
            dag = views.release_dag_id(model) if model else "a DAG"
            raise HTTPException(403, f"Data snapshots and model files are for people who may run {dag}; "
                                     f"your role may read the pages, verdicts and reports")
    try:
        data, kind = views.open_evidence(uri)
    except FileNotFoundError:
        raise HTTPException(404, "No such evidence file in the artifact store") from None
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=300"}
    if kind.startswith("text/csv") and not raw:
        header, rows, total = views.csv_table(data, CSV_ROWS_SHOWN)
        return _render(request, "table.html", title=uri.rsplit("/", 1)[-1], header=header, rows=rows, total=total,
                       truncated=total > len(rows),
                       raw_href=f"{_base(request)}evidence?uri={quote(uri, safe='')}&raw=1")
    if kind.startswith("text/html"):
        data = _relink(data.decode("utf-8", errors="replace"), views.store_prefix()).encode()
        headers["Content-Security-Policy"] = EVIDENCE_POLICY
    elif raw or not kind.startswith(("image/", "text/", "application/json")):
        headers["Content-Disposition"] = f'attachment; filename="{uri.rsplit("/", 1)[-1][:100]}"'
    return Response(data, media_type=kind, headers=headers)


# -- JSON ----------------------------------------------------------------------------------------
@app.get("/api/models", response_model=list[views.ModelRow])
def api_models():
    return views.list_models()


@app.get("/api/models/{model}", response_model=views.ModelPage)
def api_model(model: str):
    try:
        return views.model_page(model)
    except views.UnknownModel as error:
        raise _unknown(error) from None


@app.post("/api/models/{model}/explain")
async def api_explain(request: Request, user: GetUserDep, model: str):
    """One input explained with the variant the GitOps repository deploys (edge_ui.explain): for
    people who may read the model's data, since the answer shows what the model makes of it."""
    from starlette.concurrency import run_in_threadpool

    from edge_ui import explain

    if not may_read_data(user, model):
        raise HTTPException(403, f"Explanations are for people who may run {views.release_dag_id(model)}")
    try:
        body = await explain.read_body(request.stream(), request.headers.get("content-length"))
        answer = await run_in_threadpool(explain.explain_input, model, body)
    except explain.ExplainRefused as error:
        raise HTTPException(400, str(error)) from None
    except views.UnknownModel as error:
        raise _unknown(error) from None
    return JSONResponse(answer.model_dump(mode="json"), headers={"Cache-Control": "no-store"})


@app.post("/api/models/{model}/feedback")
async def api_feedback(request: Request, user: GetUserDep, model: str):
    """Labels of sampled inferences from a business system (edge_ui.feedback): for users who may
    run the model's release, since labels decide rollbacks and retraining."""
    from starlette.concurrency import run_in_threadpool

    from edge_ui import feedback

    if not may_read_data(user, model):
        raise HTTPException(403, f"Labels are taken from users who may run {views.release_dag_id(model)}")
    try:
        body = await feedback.read_body(request.stream(), request.headers.get("content-length"))
        receipt = await run_in_threadpool(feedback.store, model, body, user.get_name())
    except feedback.FeedbackRefused as error:
        raise HTTPException(400, str(error)) from None
    except KeyError:
        raise HTTPException(404, f"No model named {model!r}") from None
    return JSONResponse(receipt.model_dump(mode="json", exclude={"uri"}), status_code=201,
                        headers={"Cache-Control": "no-store"})


@app.get("/api/models/{model}/compare", response_model=views.Comparison)
def api_compare(model: str, a: str = Query(..., max_length=9), b: str = Query(..., max_length=9)):
    try:
        return views.compare_page(model, a, b)
    except views.UnknownModel as error:
        raise _unknown(error) from None


@app.get("/api/models/{model}/versions/{version}", response_model=views.VersionPage)
def api_version(model: str, version: str):
    try:
        return views.version_page(model, version)
    except views.UnknownModel as error:
        raise _unknown(error) from None
