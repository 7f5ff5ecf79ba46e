import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.specs import SpecError, discover_specs, json_schema, load_spec, parse_quantity, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted([*(ROOT / "model_specs").glob("*.yaml"),
                *(p for p in (ROOT / "model_specs").glob("*/*.yaml") if p.parent.name == p.stem)])
ADULT = ROOT / "model_specs" / "adult-income.yaml"


def test_the_demo_specs_exist_and_validate():
    assert {p.stem for p in SPECS} >= {"adult-income", "digit-recognizer"}
    for path in SPECS:
        spec = load_spec(path)
        assert spec.name == path.stem
        assert len(spec.digest()) == 64


def _adult() -> dict:
    return yaml.safe_load(ADULT.read_text())


def _set(doc: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value


_DELETE = object()

BAD = [
    ("training.estimatr", "x", "training.estimatr: unknown key"),
    ("training.estimator", "catboost", "training: training.estimator must be one of"),
    ("task", "regression", "gates.quality.accuracy: not a metric of a regression model (use mae, rmse, r2)"),
    ("task", "ranking", "task: Input should be 'binary', 'multiclass' or 'regression'"),
    ("model", {"source": "model.pkl"}, "model.source: a model source is an .onnx file"),
    ("model", {"source": "m.onnx", "checksum": "md5:abc"}, "model.checksum: 'md5:abc' is not sha256:"),
    ("training.entrypoint", "train.py", "training.entrypoint: 'train.py' is not `module:function`"),
    ("training.seed", -1, "training.seed: Input should be greater than or equal to 0"),
    ("finops.monthlyBudgetUsd", -5, "finops.monthlyBudgetUsd: Input should be greater than or equal to 0"),
    ("finops", _DELETE, "finops: Field required"),
    ("gates.driftShare", 1.5, "gates.driftShare: Input should be less than or equal to 1"),
    ("responsibleAI.fairness.biasScore", -0.1, "responsibleAI.fairness.biasScore"),
    ("schedule", "61 * * * *", "schedule: '61 * * * *' is neither a cron expression nor a preset"),
    ("targets.0.selector.matchLabels", {"bad key!": "x"}, "targets[0].selector.matchLabels: 'bad key!'"),
    ("targets.0.name", "Android Tablets", "targets[0].name"),
    ("resources.limits.memory", "lots", "resources.limits.memory: not a Kubernetes quantity"),
    ("resources.requests.memory", "1Gi", "resources: requests.memory 1Gi exceeds limits.memory 64Mi"),
    ("data.source", "data.xlsx", "data.source: a data file must end in .csv or .parquet"),
    ("data.source", "builtin:imagenet", "data.source: unknown built-in dataset 'imagenet'"),
    ("data.features", [], "data.features: List should have at least 1 item"),
    ("export.accuracyBudget", 2, "export.accuracyBudget: Input should be less than or equal to 1"),
    ("deploymentStrategy.maxUnavailable", "150%", "deploymentStrategy.maxUnavailable"),
    ("approval.mode", "sometimes", "approval.mode: Input should be 'auto' or 'manual'"),
]


@pytest.mark.parametrize("field,value,expected", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_spec_names_the_file_and_field(field, value, expected):
    doc = _adult()
    _set(doc, field, value)
    with pytest.raises(SpecError) as error:
        parse_spec(doc, "model_specs/adult-income.yaml")
    message = str(error.value)
    assert message.startswith("model_specs/adult-income.yaml: ")
    assert expected in message


def test_invalid_yaml_and_wrong_name(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken.yaml: not valid YAML \(line 2\)"):
        load_spec(broken)
    renamed = tmp_path / "other.yaml"
    renamed.write_text(ADULT.read_text())
    with pytest.raises(SpecError, match="other.yaml: name: 'adult-income' must equal the file name 'other'"):
        load_spec(renamed)
    with pytest.raises(SpecError, match="missing.yaml: cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_quantities():
    assert parse_quantity("64Mi") == 64 * 2**20
    assert parse_quantity("500m") == 0.5
    with pytest.raises(ValueError):
        parse_quantity("64MB")


def test_committed_json_schema_is_current():
    committed = json.loads((ROOT / "model_specs" / "model-spec.schema.json").read_text())
    assert committed == json_schema()
    assert "responsibleAI" in committed["properties"]


def test_the_schema_and_the_parser_take_the_explainability_shorthand_and_the_new_policies():
    import jsonschema

    validator = jsonschema.Draft202012Validator(json_schema())
    doc = _adult()
    for value, method in (("shap", "shap"), ({"method": "lime", "samples": 3}, "lime")):
        doc["responsibleAI"]["explainability"] = value
        assert not list(validator.iter_errors(doc))
        assert parse_spec(doc, "adult-income.yaml").responsible_ai.explainability.method == method
    doc["responsibleAI"]["explainability"] = "magic"
    assert list(validator.iter_errors(doc))
    with pytest.raises(SpecError, match="responsibleAI.explainability.method"):
        parse_spec(doc, "adult-income.yaml")
    doc = _adult()
    doc["responsibleAI"]["onBreach"] = ["notify", "notify"]
    with pytest.raises(SpecError, match="responsibleAI.onBreach: each action at most once"):
        parse_spec(doc, "adult-income.yaml")
    doc = _adult()
    doc["finops"]["onBreach"] = ["lower_sampling", "lower_sampling"]
    with pytest.raises(SpecError, match="finops.onBreach: each action at most once"):
        parse_spec(doc, "adult-income.yaml")
    doc = _adult()
    doc["finops"]["onBreach"] = ["switch_everything_off"]
    with pytest.raises(SpecError, match="finops.onBreach"):
        parse_spec(doc, "adult-income.yaml")
    doc = _adult()
    doc["monitoring"]["field"] = {"window": "a week"}
    with pytest.raises(SpecError, match="monitoring.field.window"):
        parse_spec(doc, "adult-income.yaml")


def test_cli_validate_spec_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "pipelines", "validate-spec", str(ADULT)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok (adult-income)" in ok.stdout
    doc = _adult()
    doc["finops"]["monthlyBudgetUsd"] = -1
    bad = tmp_path / "adult-income.yaml"
    bad.write_text(yaml.safe_dump(doc))
    failed = subprocess.run([sys.executable, "-m", "pipelines", "validate-spec", str(bad)],
                            capture_output=True, text=True)
    assert failed.returncode == 2
    assert f"{bad}: finops.monthlyBudgetUsd" in failed.stderr


def test_discover_specs_ignores_the_schema():
    assert set(discover_specs(ROOT / "model_specs")) == {p.stem for p in SPECS}


FEDERATED = ROOT / "model_specs" / "digit-recognizer-federated.yaml"
BAD_FEDERATED = [
    ("training.federated", _DELETE, "training.mode federated needs training.federated"),
    ("training.mode", "central", "training.federated is for training.mode federated"),
    ("training.mode", "split", "training.mode: Input should be 'central' or 'federated'"),
    ("training.federated.proximalMu", 0, "training.federated.proximalMu: FedProx needs a proximal weight above 0"),
    ("training.federated.strategy", "fedadam", "training.federated.strategy: Input should be 'fedavg' or 'fedprox'"),
    ("training.federated.minClients", 20, "training.federated.minClients (20) is more than"),
    ("training.federated.fractionTrain", 0, "training.federated.fractionTrain: Input should be greater than 0"),
    ("training.federated.differentialPrivacy.noiseMultiplier", 0,
     "training.federated.differentialPrivacy.noiseMultiplier: Input should be greater than 0"),
    ("training.federated.differentialPrivacy.delta", 1, "differentialPrivacy.delta: Input should be less than 1"),
    ("training.federated.rouns", 3, "training.federated.rouns: unknown key"),
]


@pytest.mark.parametrize("field,value,expected", BAD_FEDERATED, ids=[f"{b[0]}={b[1]!r}" for b in BAD_FEDERATED])
def test_bad_federated_training_names_the_field(field, value, expected):
    doc = yaml.safe_load(FEDERATED.read_text())
    _set(doc, field, value)
    with pytest.raises(SpecError) as error:
        parse_spec(doc, "model_specs/digit-recognizer-federated.yaml")
    assert expected in str(error.value)


def test_federated_training_is_for_torch_networks_and_trained_models():
    doc = yaml.safe_load(FEDERATED.read_text())
    doc["training"].update(framework="sklearn", estimator="mlp")
    doc["training"].pop("architecture")
    with pytest.raises(SpecError, match="training.mode federated trains a torch network"):
        parse_spec(doc, "f.yaml")
    doc = _adult()
    doc["training"] = {"seed": 1, "mode": "federated", "federated": {"rounds": 2}}
    doc["model"] = {"source": "m.onnx"}
    with pytest.raises(SpecError, match="model.source releases an existing model: training.federated does not apply"):
        parse_spec(doc, "f.yaml")


def test_a_centrally_trained_spec_keeps_its_digest():
    """The federated fields are left out of a central spec's canonical form: release keys of
    existing specs do not change."""
    spec = load_spec(ADULT)
    assert "mode" not in spec.model_dump(mode="json")["training"]
    # The digests of this spec before `training.mode` existed.
    assert spec.digest() == "eba3e6fe6cc7e2e4a7d66e79e52a481ed743f7c924977a47687b82ba4d372580"
    assert spec.model_digest() == "5b34db3a1ddc7c03e954119bcf04ce382ac5ed0ec9e618b782feee61dcdc2b3c"
