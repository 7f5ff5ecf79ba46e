"""The model card's HTML: facts and training parameters as tables, the task's score."""

from pipelines.gates.card import card_document, render_html


def _card() -> dict:
    candidate = {"variant": "fp32", "uri": "file:///m.onnx", "sha256": "a" * 64, "size_bytes": 27037,
                 "accuracy": 0.5137, "accuracy_change": 0.0, "latency_p50_ms": 0.012, "latency_p95_ms": 0.013,
                 "eligible": True, "note": ""}
    static = {**candidate, "variant": "static", "accuracy": 0.4691, "accuracy_change": -0.0446, "eligible": False,
              "note": "r2 drop 4.46 pt exceeds the 2.00 pt budget"}
    return card_document(
        schema="edge-release/model-card/v1",
        model={"name": "diabetes-progression", "version": "1", "owner": "clinical-ml@example.com",
               "description": "Estimates progression.", "framework": "sklearn", "task": "regression",
               "model_type": "gradient_boosting", "variant": "fp32", "artifact_sha256": "a" * 64,
               "size_bytes": 27037, "mlflow_run_id": "r1", "release_key": "b" * 64},
        intended_use="A talking point.", limitations=["Small data."],
        data={"source": "builtin:sklearn-diabetes", "sha256": "c" * 64, "rows": 442, "feature_count": 10,
              "sensitive_features": "sex"},
        training={"framework": "sklearn", "seed": 11, "params": {"n_estimators": 100, "hidden_layer_sizes": [32]},
                  "train_seconds": 0.31},
        metrics={"mae": 49.18, "rmse": 59.96, "r2": 0.5137},
        quantization={"candidates": [candidate, static], "chosen": "fp32", "metric": "r2",
                      "reason": "kept fp32 (26.4 KiB): static loses 4.46 pt r2"},
        verdicts=[], waivers={}, explainability={"method": "none"}, approval="auto")


def test_the_card_shows_facts_and_parameters_as_tables_and_the_tasks_score():
    page = render_html(_card(), {})
    assert '<th scope="row">task</th><td>regression</td>' in page
    assert '<th scope="row">params.n_estimators</th><td>100</td>' in page
    assert '<th scope="row">params.hidden_layer_sizes</th><td>[32]</td>' in page
    assert "<pre>" not in page.split("<h2>Training</h2>")[1].split("<h2>")[0], "no raw JSON for training"
    assert "<th>r2</th>" in page and "<th>accuracy</th>" not in page
    assert "no: r2 drop 4.46 pt exceeds the 2.00 pt budget" in page
    assert "Shipped: <b>fp32</b>. Why: kept fp32" in page
    assert "th{white-space:nowrap" in page, "headers never break inside a word"


def test_the_card_names_the_explanation_method_and_its_global_summary():
    card = _card()
    assert "Method: <b>none</b>. </p>" in render_html(card, {})
    card["explainability"] = {"method": "shap", "importances": {"bmi": 22.64, "s5": 22.5, "bp": 8.49},
                              "note": "mean |SHAP value| toward the predicted value, over 50 held-out rows"}
    page = render_html(card, {}).split("<h2>Explainability</h2>")[1].split("<h2>")[0]
    assert page.startswith("<p>Method: <b>SHAP</b>. mean |SHAP value| toward the predicted value")
    assert "<th>feature</th><th>mean |SHAP value|</th>" in page
    assert page.index("<td>bmi</td><td>22.64</td>") < page.index("<td>s5</td>") < page.index("<td>bp</td>")
