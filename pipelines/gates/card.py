"""Model card: one JSON (for machines and audits) and one self-contained HTML per version."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from pipelines.records import usd


def card_document(**sections) -> dict:
    """The card's JSON document, sections in a fixed order."""
    order = ("schema", "model", "intended_use", "limitations", "data", "training", "shipped", "metrics",
             "quantization", "verdicts", "waivers", "explainability", "cost", "approval")
    return {key: sections[key] for key in order if key in sections}


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if isinstance(value, dict):  # evidence: name -> URI, as links
        return ", ".join(f'<a href="{html.escape(uri)}">{html.escape(name)}</a>' for name, uri in value.items())
    return html.escape(_fmt(value))


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _facts(pairs: list[tuple[str, object]]) -> str:
    """Facts as a two-column table: a name per row, so long values (digests) never squeeze the
    headers of a wide table."""
    rows = "".join(f"<tr><th scope=\"row\">{html.escape(name)}</th><td>{_cell(value)}</td></tr>"
                   for name, value in pairs if value not in (None, "", {}, []))
    return f"<table class=\"facts\"><tbody>{rows}</tbody></table>"


def _training_facts(training: dict) -> list[tuple[str, object]]:
    """The training section as rows: what trained the model, then each parameter by name."""
    pairs = [(key.replace("_", " "), training.get(key)) for key in ("framework", "entrypoint", "seed",
                                                                   "train_seconds")]
    pairs += [(f"params.{name}", json.dumps(value) if isinstance(value, list | dict | bool) or value is None
               else value) for name, value in (training.get("params") or {}).items()]
    pairs += [(f"imported from: {key}", value) for key, value in (training.get("imported_from") or {}).items()]
    return pairs


def _federated(federated: dict | None) -> list[str]:
    """A federated training: its privacy first, then how each client fares with the model."""
    if not federated:
        return []
    dp = federated.get("differential_privacy")
    if isinstance(dp, dict):
        privacy = [("differential privacy", dp["mechanism"]), ("epsilon", dp["epsilon"]), ("delta", dp["delta"]),
                   ("noise multiplier", dp["noise_multiplier"]), ("max grad norm", dp["max_grad_norm"]),
                   ("accountant", dp["accountant"]), ("protects", dp["protects"]),
                   ("does not cover", dp["does_not_cover"])]
    else:
        privacy = [("differential privacy", dp)]
    worst = federated.get("worst_client") or {}
    groups = federated.get("client_groups") or {}
    rows = [{"client": client, "group": groups.get(client, ""), "accuracy": f"{accuracy:.4f}"}
            for client, accuracy in sorted(federated.get("client_accuracy", {}).items(), key=lambda kv: kv[1])]
    return ["<h2>Federated training</h2>",
            _facts([("strategy", federated["strategy"]), ("rounds", federated["rounds"]),
                    ("clients", federated["clients"]), ("federation", federated["federation"]),
                    ("raw rows left the clients", "no"), *privacy,
                    ("worst client", f"{worst.get('client', '')} ({worst.get('group', '')}): accuracy "
                                     f"{worst.get('accuracy', float('nan')):.4f} on its own held-out rows")]),
            "<p>Each client's accuracy of the final model on its own held-out rows (federated evaluation):</p>",
            _table(rows, ["client", "group", "accuracy"])]


def _metrics(card: dict) -> list[str]:
    """The held-out metrics: each shipped variant's (the headline; the base one is what the
    quality gate measured) with the device groups that run it, beside the native model's."""
    shipped = card.get("shipped") or []
    if not shipped:
        return ["<h2>Metrics (held-out split, native model)</h2>",
                _table([{"metric": k, "value": v} for k, v in card["metrics"].items()], ["metric", "value"])]
    columns = [shipped_label(v) for v in shipped]
    rows = [{"metric": k, **{c: f"{v['metrics'][k]:.4f}" for c, v in zip(columns, shipped) if k in v["metrics"]},
             "native model": f"{card['metrics'][k]:.4f}" if k in card["metrics"] else ""}
            for k in shipped[0]["metrics"]]
    return ["<h2>Metrics (held-out split)</h2>",
            "<p>What the devices run, measured on the held-out rows; the native model before export and "
            "quantization beside it.</p>",
            _table(rows, ["metric", *columns, "native model"])]


def shipped_label(shipped: dict) -> str:
    """`dynamic (shipped to phones, tablets)`: a shipped variant as every summary names it."""
    groups = shipped.get("groups") or []
    return f"{shipped['variant']} (shipped" + (f" to {', '.join(groups)})" if groups else ")")


def _cost_headline(cost: dict) -> list[str]:
    """Total, training and budget per month, formatted as every page formats money."""
    return [f"<p>Total <b>{usd(cost['total_usd_per_month'])}</b>/month (training "
            f"{usd(cost['training_usd_per_month'])}), budget {usd(cost['budget_usd_per_month'])}.</p>"]


def _image(path: Path | None, alt: str) -> str:
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


METHOD_NAMES = {"permutation_importance": "permutation importance", "lime": "LIME", "shap": "SHAP",
                "none": "none"}
SUMMARY_COLUMNS = {"permutation_importance": "importance", "lime": "mean |LIME weight|",
                   "shap": "mean |SHAP value|"}


def _explainability(explain: dict, image: Path | None) -> list[str]:
    """The method, what its figures mean, and each feature's global importance (largest first)."""
    method = explain.get("method", "none")
    name = METHOD_NAMES.get(method, method)
    column = SUMMARY_COLUMNS.get(method, "importance")
    rows = [{"feature": k, column: v} for k, v in list((explain.get("importances") or {}).items())[:20]]
    return ["<h2>Explainability</h2>", f"<p>Method: <b>{html.escape(name)}</b>. {html.escape(explain.get('note', ''))}</p>",
            _table(rows, ["feature", column]) if rows else "", _image(image, f"{name} by feature")]


def render_html(card: dict, images: dict[str, Path]) -> str:
    """Self-contained HTML (images inlined), readable offline and in an audit archive."""
    model = card["model"]
    title = f"Model card: {model['name']} version {model['version']}"
    verdict_rows = [{"gate": v["gate"], "result": "waived" if v["waived"] else ("passed" if v["passed"] else "FAILED"),
                     "reason": v["reason"], "evidence": v.get("evidence", {})} for v in card["verdicts"]]
    score = card["quantization"].get("metric", "accuracy")
    quant_rows = [{"variant": c["variant"], "size_bytes": c["size_bytes"], score: c["accuracy"],
                   "change vs fp32": c["accuracy_change"], "latency_p50_ms": c["latency_p50_ms"],
                   "latency_p95_ms": c["latency_p95_ms"], "eligible": "yes" if c["eligible"] else f"no: {c['note']}"}
                  for c in card["quantization"]["candidates"]]
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(model.get('description', ''))}</p>",
        _facts([(key.replace("_", " "), model.get(key)) for key in
                ("name", "version", "owner", "task", "framework", "model_type", "variant", "size_bytes",
                 "artifact_sha256", "mlflow_run_id", "release_key")]),
        "<h2>Intended use</h2>", f"<p>{html.escape(card.get('intended_use') or 'Not stated in the spec.')}</p>",
        "<h2>Limitations</h2>",
        "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in card.get("limitations") or ["None stated."]) + "</ul>",
        "<h2>Data</h2>", _facts([(key.replace("_", " "), card["data"].get(key)) for key in
                                 ("source", "sha256", "rows", "feature_count", "sensitive_features", "test_size")]),
        "<h2>Training</h2>", _facts(_training_facts(card["training"])),
        *_federated(card["training"].get("federated")),
        *_metrics(card),
        "<h2>Gate verdicts</h2>", _table(verdict_rows, ["gate", "result", "reason", "evidence"]),
    ]
    if card.get("waivers"):
        parts += ["<h2>Waivers</h2>", _table([{"gate": g, "justification": j} for g, j in card["waivers"].items()],
                                             ["gate", "justification"])]
    parts += ["<h2>Fairness by group</h2>", _image(images.get("fairness"), "fairness by group")]
    parts += ["<h2>Quantization</h2>", _table(quant_rows, list(quant_rows[0]) if quant_rows else []),
              f"<p>Shipped: <b>{html.escape(card['quantization']['chosen'])}</b>. Why: "
              f"{html.escape(card['quantization']['reason'])}</p>"]
    parts += _explainability(card.get("explainability") or {}, images.get("importance"))
    if card.get("cost"):
        cost = card["cost"]
        parts += ["<h2>Edge cost (estimate)</h2>", *_cost_headline(cost), f"<pre>{html.escape(chr(10).join(cost['table']))}</pre>",
                  f"<pre>{html.escape(chr(10).join(cost['diff']))}</pre>",
                  "<p>Figures marked as assumptions in the device catalog: "
                  f"{html.escape(', '.join(cost['assumptions']) or 'none')}.</p>"]
    parts += ["<h2>Approval</h2>", f"<p>{html.escape(card.get('approval', ''))}</p>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:13px;text-align:left;vertical-align:top}th{white-space:nowrap;background:#f6f6f6}"
             "td{overflow-wrap:break-word}table.facts th{font-weight:600}img{max-width:100%}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_card(card: dict, images: dict[str, Path], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "model_card.json"
    json_path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    html_path = folder / "model_card.html"
    html_path.write_text(render_html(card, images))
    return json_path, html_path
