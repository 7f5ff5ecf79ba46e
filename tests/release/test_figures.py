"""One source for each figure of a release: the shipped variant's metrics, the money and the
champion sentence read the same in the stored summary, the model card, the CLI summary and the
Edge Releases read model."""

import html
import json

import pytest
import yaml
from conftest import tabular_frame, write_spec
from edge_ui import views

from pipelines import release
from pipelines.__main__ import main
from pipelines.records import money, usd
from pipelines.settings import Settings
from pipelines.storage import ObjectStore

# An MLP whose fp32 file (about 20 KiB) exceeds the cap while its dynamic int8 variant fits:
# size binds, so an int8 variant ships whatever the timings.
INT8_SHIPPED = {
    "training": {"framework": "sklearn", "estimator": "mlp", "seed": 1,
                 "params": {"hidden_layer_sizes": [64, 64], "max_iter": 300}},
    "export": {"opset": 17, "quantization": ["dynamic"], "accuracyBudget": 0.05, "maxArtifactBytes": 15_000},
}


def _read(store: ObjectStore, uri: str) -> bytes:
    return store.read_bytes(store.key_of(uri))


def _quality(verdicts) -> str:
    return next(v["reason"] if isinstance(v, dict) else v.reason for v in verdicts
                if (v["gate"] if isinstance(v, dict) else v.gate) == "quality")


def test_the_shipped_figures_read_the_same_everywhere(tmp_path, state, capsys):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "figures-model", "data.csv", **INT8_SHIPPED)
    assert release.run_release(spec).status == "released"
    settings = Settings(specs_dir=tmp_path)
    store = ObjectStore(settings.store_url)

    # (a) the stored summary: the headline is the shipped int8 variant's, scored as the plan scored it.
    summary = json.loads(store.read_bytes("releases/figures-model/latest.json"))
    plan = summary["quantization"]
    chosen = next(c for c in plan["candidates"] if c["variant"] == plan["chosen"])
    [entry] = summary["shipped"]
    variant, shipped = entry["variant"], entry["metrics"]
    assert variant == plan["chosen"] == "dynamic" and entry["groups"] == ["phones"]
    assert shipped[plan["metric"]] == pytest.approx(chosen["accuracy"], abs=1e-12)
    quality = next(v for v in summary["verdicts"] if v["gate"] == "quality")
    assert quality["observed"][f"{plan['metric']}.candidate"] == pytest.approx(shipped[plan["metric"]], abs=1e-6)
    accuracy = f"{shipped['accuracy']:.4f}"
    total, training = usd(summary["cost"]["total_usd_per_month"]), usd(summary["cost"]["training_usd_per_month"])
    champion = _quality(summary["verdicts"])
    # The budget gate records money at the precision it is shown: never $0.0004 here and 0 there.
    budget = next(v for v in summary["verdicts"] if v["gate"] == "budget")
    assert usd(budget["observed"]["training_usd_per_month"]) == training
    assert usd(budget["observed"]["total_usd_per_month"]) == total and budget["reason"].startswith(f"{total}/month")

    # (b) the model card: the same figures, the native model's beside them.
    page = _read(store, summary["model_card_uri"]).decode()
    card = json.loads(_read(store, summary["model_card_uri"].removesuffix(".html") + ".json"))
    assert card["shipped"] == [{"variant": variant, "groups": ["phones"], "metrics": shipped}]
    assert card["metrics"] == summary["metrics"]
    assert usd(card["cost"]["total_usd_per_month"]) == total and usd(card["cost"]["training_usd_per_month"]) == training
    assert _quality(card["verdicts"]) == champion
    assert f"<th>{variant} (shipped to phones)</th>" in page and f"<td>{accuracy}</td>" in page
    assert f"Total <b>{total}</b>/month (training {training})" in page
    assert html.escape(champion) in page

    # (c) the command line's summary.
    assert main(["summary", "figures-model"]) == 0
    text = capsys.readouterr().out
    assert f"metrics         {variant} (shipped to phones): accuracy {accuracy}," in text
    assert f"cost            {total}/month (training {training})" in text
    assert f"quality               pass     {champion}\n" in text

    # (d) the Edge Releases read model of the version.
    view = views.version_page("figures-model", summary["model_version"], settings).version.summary
    assert view.quantization_choice == variant
    assert f"{next(c for c in view.quantization_candidates if c.variant == variant).accuracy:.4f}" == accuracy
    assert view.metrics == summary["metrics"]  # fp32's, shown as fp32's
    assert [(v.variant, v.groups, v.metrics) for v in view.shipped] == [(variant, ["phones"], shipped)]
    assert usd(view.cost.total_usd_per_month) == total and usd(view.cost.training_usd_per_month) == training
    assert _quality(view.verdicts) == champion


def test_a_re_release_of_the_deployed_version_knows_it_is_the_champion(tmp_path, state):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "champion-model", "data.csv")
    first = release.run_release(spec)
    assert "no champion deployed when v1 was evaluated" in _quality(first.verdicts)

    # The same release again: the verdict it landed with stands (the manifest does not change).
    again = release.run_release(spec)
    assert (again.model_version, again.gitops_commit_created) == (first.model_version, False)
    assert "no champion deployed yet" not in _quality(again.verdicts)
    assert _quality(again.verdicts) == _quality(first.verdicts)

    # Evaluated again (a spec change that keeps the model): the deployed v1 is the candidate itself.
    doc = yaml.safe_load(spec.read_text())
    doc["description"] = "the same model under a new spec"
    spec.write_text(yaml.safe_dump(doc))
    evaluated = release.run_release(spec)
    assert evaluated.model_version == first.model_version
    quality = next(v for v in evaluated.verdicts if v.gate == "quality")
    assert quality.passed and quality.reason == "meets every threshold; v1 is the deployed champion itself"
    assert quality.observed["champion_version"] == "1"


@pytest.mark.parametrize(("value", "shown"), [(0, "$0.00"), (0.00004, "$0.00"), (0.0004, "$0.0004"),
                                              (0.00999, "$0.01"), (13.3812, "$13.38"), (1234.5, "$1,234.50")])
def test_money_has_one_rounding_rule(value, shown):
    assert usd(value) == shown == usd(money(value))
