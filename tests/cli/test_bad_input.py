"""Bad input through the command line, table by table: specs, data, hand-edited manifests and
arguments.

Every case ends with exit code 2 and exactly one line on stderr (`error: ...`, no traceback)
that names the file (or the argument) and the field, column or row. A release or rollback
stopped by bad input leaves nothing half-written: no stored run outputs or artifacts, no
registered MLflow model, no GitOps commit.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import tabular_frame, write_spec

from pipelines.__main__ import main
from pipelines.settings import Settings
from pipelines.storage import ObjectStore

MODEL = "bad-input"
DELETE = object()
BASE = f"apps/{MODEL}/base/mobileaimodeldeployment.yaml"


def _run(capsys, argv: list) -> tuple[int, list[str]]:
    """Exit code and stderr lines of one CLI call (argparse's usage errors exit by SystemExit)."""
    capsys.readouterr()
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def _one_line_error(capsys, argv: list, *needles: str) -> str:
    code, lines = _run(capsys, argv)
    assert code == 2, f"exit {code}: {lines}"
    assert len(lines) == 1, "\n".join(lines)
    [line] = lines
    assert line.startswith("error: ") and "Traceback" not in line, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def _git(remote, *args) -> str:
    return subprocess.run(["git", "--git-dir", str(remote), *args], capture_output=True, text=True,
                          check=True).stdout


def _commits(settings: Settings, path: str | None = None) -> int:
    if not Path(settings.remote).exists():
        return 0
    return int(_git(settings.remote, "rev-list", "--count", settings.gitops_branch, *(["--", path] if path else []))
               or 0)


def _store_keys(settings: Settings) -> list[str]:
    return ObjectStore(settings.store_url).list_keys("")


def _registered(settings: Settings) -> list:
    if not (settings.state / "mlflow").exists():
        return []
    from pipelines.registry import client

    return client(settings.tracking_uri).search_registered_models(f"name = '{MODEL}'")


def _assert_nothing_written(evidence: tuple[str, ...] = ()) -> None:
    """No run outputs or artifacts in the store (apart from the named failure evidence), no
    MLflow model and no GitOps commit for the model."""
    settings = Settings()
    keys = [k for k in _store_keys(settings) if not (evidence and k.endswith(evidence))]
    # The run's own record says it failed (Edge Releases lists it); nothing else is written.
    from pipelines.release.attempts import folder

    attempts = [k for k in keys if k.startswith(folder(MODEL))]
    for key in attempts:
        assert json.loads(ObjectStore(settings.store_url).read_bytes(key))["status"] == "failed", key
    assert [k for k in keys if k not in attempts] == [], keys
    assert _registered(settings) == []
    assert _commits(settings, f"apps/{MODEL}") == 0


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value


# -- specs -------------------------------------------------------------------------------------
# (id, {dotted field: value or DELETE}, the field the error must name first)
SPECS = [
    ("type-seed-is-text", {"training.seed": "forty-two"}, "training.seed"),
    ("type-features-not-a-list", {"data.features": "x1"}, "data.features"),
    ("type-target-is-a-list", {"data.target": ["label"]}, "data.target"),
    ("range-opset-too-new", {"export.opset": 99}, "export.opset"),
    ("range-min-rows-zero", {"data.validation.minRows": 0}, "data.validation.minRows"),
    ("range-test-size-one", {"data.testSize": 1.0}, "data.testSize"),
    ("range-reversed-bounds", {"data.validation.ranges": {"x1": [10, -10]}}, "data.validation.ranges"),
    ("unknown-top-level-key", {"owners": "team"}, "owners"),
    ("unknown-nested-key", {"finops.monthlyBudget": 5}, "finops.monthlyBudget"),
    ("missing-section-data", {"data": DELETE}, "data"),
    ("missing-section-targets", {"targets": DELETE}, "targets"),
    ("missing-field-finops-project", {"finops.project": DELETE}, "finops.project"),
    ("selector-empty", {"targets.0.selector.matchLabels": {}}, "targets[0].selector.matchLabels"),
    ("selector-bad-label-value", {"targets.0.selector.matchLabels": {"tier": "not ok!"}},
     "targets[0].selector.matchLabels"),
    ("selector-missing", {"targets.0.selector": DELETE}, "targets[0].selector"),
    ("budget-negative", {"finops.monthlyBudgetUsd": -1}, "finops.monthlyBudgetUsd"),
    ("threshold-null-share-above-1", {"data.validation.maxNullShare": 1.5}, "data.validation.maxNullShare"),
    ("threshold-equalized-odds-below-0", {"responsibleAI.fairness.equalizedOdds": -0.2},
     "responsibleAI.fairness.equalizedOdds"),
    ("threshold-sample-rate-above-1", {"telemetry.sampleRate": 2}, "telemetry.sampleRate"),
    ("cron-words", {"schedule": "every day at noon"}, "schedule"),
    ("cron-three-fields", {"schedule": "0 12 *"}, "schedule"),
    ("two-problems-stay-one-line", {"export.opset": 3, "telemetry.sampleRate": -1}, "export.opset"),
    ("range-seed-beyond-numpy", {"training.seed": 2**40}, "training.seed"),
    ("range-integer-of-40-digits", {"data.validation.minRows": 10**40}, "data.validation.minRows"),
    ("range-infinite-budget", {"finops.monthlyBudgetUsd": float("inf")}, "finops.monthlyBudgetUsd"),
]


@pytest.mark.parametrize("changes,field", [c[1:] for c in SPECS], ids=[c[0] for c in SPECS])
def test_bad_spec_fails_validate_spec_and_release_naming_file_and_field(tmp_path, state, capsys, changes, field):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    path = write_spec(tmp_path, MODEL, "data.csv")
    doc = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        _set(doc, dotted, value)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    for command in ("validate-spec", "release"):
        line = _one_line_error(capsys, [command, path])
        assert line.startswith(f"error: {path}: {field}: "), line
    _assert_nothing_written()


# (id, file text, the words the error must contain)
SPEC_FILES = [
    ("empty-file", "", "(top level): a spec must be a mapping"),
    ("a-list-not-a-mapping", "- name: bad-input\n", "(top level): a spec must be a mapping"),
    ("broken-yaml", "name: bad-input\ndata: {source: [\n", "not valid YAML (line 3)"),
    ("a-5000-digit-integer", "name: bad-input\ntraining: {seed: " + "9" * 5000 + "}\n",
     "a number is out of range: Exceeds the limit (4300 digits)"),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in SPEC_FILES], ids=[c[0] for c in SPEC_FILES])
def test_unreadable_spec_file(tmp_path, state, capsys, text, expected):
    path = tmp_path / f"{MODEL}.yaml"
    path.write_text(text)
    for command in ("validate-spec", "release"):
        _one_line_error(capsys, [command, path], f"{path}: {expected}")
    _assert_nothing_written()


# -- data --------------------------------------------------------------------------------------
def _frame_csv(change):
    def write(path: Path) -> None:
        frame = tabular_frame()
        frame = change(frame) if change else frame
        frame.to_csv(path, index=False)
    return write


def _text(text: str | bytes):
    def write(path: Path) -> None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return write


def _assign(column: str, value, rows=None):
    def change(frame):
        frame[column] = frame[column].astype(object)
        if rows is None:
            frame[column] = value
        else:
            frame.loc[rows, column] = value
        return frame
    return change


def _semicolons(path: Path) -> None:
    tabular_frame().to_csv(path, index=False, sep=";")


def _ragged(path: Path) -> None:
    lines = tabular_frame().to_csv(index=False).splitlines()
    lines[7] += ",surplus"
    path.write_text("\n".join(lines) + "\n")


def _duplicate_column(path: Path) -> None:
    lines = tabular_frame().to_csv(index=False).splitlines()
    path.write_text("\n".join([lines[0] + ",x1", *(line + ",0.5" for line in lines[1:])]) + "\n")


VALIDATION = {"maxNullShare": 0.05, "minRows": 50, "ranges": {"x1": [-10, 10]}}

# (id, writer of data.csv, spec overrides, the words the error must contain, evidence key allowed)
DATA = [
    ("empty-file", _text(""), {}, ["data.csv: cannot be read as csv"], False),
    ("header-only", _text("x1,x2,colour,group,label\n"), {}, ["data.csv: no rows"], False),
    ("binary-file", _text(bytes(range(256)) * 8), {}, ["data.csv: cannot be read as csv"], False),
    ("wrong-delimiter", _semicolons, {}, ["data.csv: ", "';'"], False),
    ("ragged-row", _ragged, {}, ["data.csv: cannot be read as csv", "line 8"], False),
    ("file-missing", None, {}, ["data.csv: data file not found"], False),
    ("feature-glob-matches-nothing", _frame_csv(None), {"features": ["img_*"]},
     ["data.features: pattern 'img_*' matches no column"], False),
    ("all-null-column", _frame_csv(_assign("x2", None)), {},
     ["data data.csv failed", "column 'x2': expect_column_values_to_not_be_null"], True),
    ("target-with-one-class", _frame_csv(_assign("label", 1)), {},
     ["column 'label': expect_column_unique_value_count_to_be_between"], True),
    ("target-column-missing", _frame_csv(lambda f: f.drop(columns=["label"])), {},
     ["column 'label': expect_column_to_exist"], True),
    ("target-has-nulls", _frame_csv(_assign("label", None, rows=[3, 4])), {},
     ["column 'label': expect_column_values_to_not_be_null"], True),
    ("too-few-rows", _frame_csv(lambda f: f.head(10)), {},
     ["table: expect_table_row_count_to_be_between(min_value=50)"], True),
    ("non-numeric-ranged-feature", _frame_csv(_assign("x1", "abc")), {},
     ["column 'x1': expect_column_values_to_be_in_type_list"], True),
    ("non-numeric-cell-in-numeric-feature", _frame_csv(_assign("x2", "twelve", rows=[7])), {},
     ["column 'x2': row 7: 'twelve' is not a number"], True),
    ("value-out-of-range", _frame_csv(_assign("x1", 99.0, rows=[3])), {},
     ["column 'x1': expect_column_values_to_be_between"], True),
    ("huge-value", _frame_csv(_assign("x2", 1e300, rows=[5])), {},
     ["column 'x2': row 5: 1e+300"], True),
    ("infinite-value", _frame_csv(_assign("x2", float("inf"), rows=[9])), {},
     ["column 'x2': row 9: inf"], True),
    ("duplicate-column", _duplicate_column, {}, ["data.csv: column 'x1' appears more than once in the header"], False),
    ("too-many-columns", _frame_csv(None), {"validation": {**VALIDATION, "maxColumns": 4}},
     ["data.csv: 5 columns, more than data.validation.maxColumns (4)"], False),
    ("cell-too-large", _frame_csv(_assign("colour", "r" * 70_000, rows=[5])), {},
     ["data.csv: column 'colour' holds a value of 70,000 characters, more than data.validation.maxCellBytes "
      "(65,536)"], False),
    ("line-too-long", _frame_csv(_assign("colour", "r" * 200, rows=[5])),
     {"validation": {**VALIDATION, "maxCellBytes": 16}},
     ["data.csv: line 7 is longer than 5 cells of data.validation.maxCellBytes (16) can be"], False),
    ("target-mixes-numbers-and-text", _frame_csv(_assign("label", "yes", rows=[3])), {},
     ["column 'label' (data.target) mixes numbers and text", "'yes'"], False),
    ("more-classes-than-the-test-split", _frame_csv(lambda f: f.assign(label=[f"c{i}" for i in range(len(f))])), {},
     ["column 'label' (data.target) has 400 classes, more than the 80 rows of the test split"], False),
    ("whole-number-target-named-multiclass", _frame_csv(lambda f: f.assign(label=range(len(f)))),
     {"_spec": {"task": "multiclass"}}, ["column 'label' (data.target) has 400 classes, more than the 80 rows"], False),
    ("text-target-named-regression", _frame_csv(lambda f: f.assign(label=f["colour"])), {"_spec": {"task": "regression", "responsibleAI": {"fairness": {"maxErrorGap": 1}},
                "training": {"framework": "sklearn", "estimator": "linear_regression"}}},
     ["column 'label' (data.target) is not numeric: task regression needs a number"], False),
    ("regression-metric-for-a-classifier", _frame_csv(lambda f: f), {"_spec": {"gates": {"quality": {"mae": {"maxValue": 1}}}}},
     ["gates.quality.mae: not a metric of a binary model (use accuracy, f1_macro, roc_auc)"], False),
]


@pytest.mark.parametrize("write,data,needles,evidence", [c[1:] for c in DATA], ids=[c[0] for c in DATA])
def test_bad_data_stops_the_release_at_the_data_stage(tmp_path, state, capsys, write, data, needles, evidence):
    if write is not None:
        write(tmp_path / "data.csv")
    spec = write_spec(tmp_path, MODEL, "data.csv")
    if data:
        doc = yaml.safe_load(spec.read_text())
        data = dict(data)
        doc.update(data.pop("_spec", {}))  # top-level fields, where a case needs them
        doc["data"].update(data)
        spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    _one_line_error(capsys, ["release", spec], f"error: {spec}: ", *needles)
    # The failed expectations' report is kept as evidence; nothing a later stage would use is.
    _assert_nothing_written(("/great_expectations.json",) if evidence else ())


# -- hand-edited manifests ---------------------------------------------------------------------
def _release_files(tmp_path: Path, version: str) -> dict[str, str]:
    from pipelines.gitops.manifest import ManifestInputs, render_release_files
    from pipelines.specs import load_spec

    spec = load_spec(write_spec(tmp_path, MODEL, "data.csv"))
    inputs = ManifestInputs(model_version=version, mlflow_run_id=f"run-{version}", release_key=version * 64,
                            source_uri=f"file:///artifacts/{MODEL}/v{version}/model.onnx",
                            sha256=version * 64, size_bytes=1000 + int(version), variant="fp32",
                            metrics={"accuracy": 0.9})
    return render_release_files(spec, inputs)


def _edit_text(edit):
    def apply(text: str) -> str:
        doc = yaml.safe_load(text)
        edit(doc)
        return yaml.safe_dump(doc, sort_keys=False)
    return apply


def _field(dotted: str, value):
    return _edit_text(lambda doc: _set(doc, dotted, value))


# (id, which release is hand-edited, the edit of its base manifest, the words the error must contain)
MANIFESTS = [
    ("current-not-yaml", "2", lambda text: text + "spec: [unclosed\n", [BASE, "not valid YAML"]),
    ("current-kind-changed", "2", _field("kind", "Deployment"), [BASE, "kind"]),
    ("current-version-deleted", "2", _field("spec.modelRef.version", DELETE), [BASE, "spec.modelRef.version"]),
    ("target-checksum-not-sha256", "1", _field("spec.modelRef.checksum", "md5:abc"),
     [BASE, "spec.modelRef.checksum"]),
    ("target-size-is-text", "1", _field("spec.modelRef.sizeBytes", "big"), [BASE, "spec.modelRef.sizeBytes"]),
    ("target-unknown-field", "1", _field("spec.modelRef.checksumm", "sha256:" + "1" * 64),
     [BASE, "spec.modelRef.checksumm: unknown field"]),
    ("target-threshold-above-1", "1", _field("spec.responsibleAI.fairness.biasScore", 1.5),
     [BASE, "spec.responsibleAI.fairness.biasScore"]),
]


@pytest.mark.parametrize("edited,edit,needles", [c[1:] for c in MANIFESTS], ids=[c[0] for c in MANIFESTS])
def test_rollback_over_a_hand_edited_manifest(tmp_path, state, capsys, edited, edit, needles):
    from pipelines.gitops import repo

    settings = Settings()
    author = (settings.git_author_name, settings.git_author_email)
    repo.ensure_remote(settings.remote, settings.gitops_branch, author)
    for version in ("1", "2"):
        files = _release_files(tmp_path, version)
        if version == edited:
            files[BASE] = edit(files[BASE])
        repo.commit_release(settings.remote, settings.gitops_branch, MODEL, files, f"release v{version}", author,
                            settings.work_dir / "gitops")
    commits = _commits(settings)
    _one_line_error(capsys, ["rollback", MODEL, "--reason", "hand-edited manifest test"], f"error: {MODEL}: ",
                    *needles)
    assert _commits(settings) == commits
    assert _registered(settings) == []


# -- arguments ---------------------------------------------------------------------------------
ARGS = [
    ("no-command", [], ["the following arguments are required: command"]),
    ("unknown-command", ["deploy"], ["argument command: invalid choice: 'deploy'"]),
    ("release-without-spec", ["release"], ["python -m pipelines release", "spec"]),
    ("release-bad-approval", ["release", "x.yaml", "--approval", "auto"], ["--approval", "invalid choice: 'auto'"]),
    ("release-spec-not-found", ["release", "nowhere/bad-input.yaml"], ["nowhere/bad-input.yaml: cannot read"]),
    ("validate-spec-is-a-folder", ["validate-spec", "."], [".: cannot read"]),
    ("rollback-without-reason", ["rollback", MODEL], ["--reason"]),
    ("rollback-short-reason", ["rollback", MODEL, "--reason", "ok"], [f"{MODEL}: reason: "]),
    ("fleet-devices-zero", ["fleet", "simulate", "--devices", "0"], ["--devices"]),
    ("fleet-devices-not-a-number", ["fleet", "simulate", "--devices", "many"], ["--devices", "'many'"]),
    ("fleet-bad-fault", ["fleet", "simulate", "--devices", "2", "--fault", "error_rate=3"],
     ["--fault", "error_rate must lie in [0, 1]"]),
    ("fleet-bad-source", ["fleet", "simulate", "--devices", "2", "--source", "svn"], ["--source", "'svn'"]),
    ("edge-agent-without-labels", ["edge-agent", "--device-id", "d1"], ["--labels"]),
    ("edge-agent-repeated-label", ["edge-agent", "--device-id", "d1", "--labels", "a=1,a=2"],
     ["--labels: label 'a' is given twice"]),
    ("edge-agent-device-id-escapes", ["edge-agent", "--device-id", "../x", "--labels", "a=1"],
     ["device id '../x' is not a DNS label"]),
    ("edge-agent-bad-group", ["edge-agent", "--device-id", "d1", "--labels", "a=1", "--group", "A/B"],
     ["device group 'A/B' is not a DNS label"]),
    ("edge-agent-without-a-public-key", ["edge-agent", "--device-id", "d1", "--labels", "a=1", "--group", "g"],
     ["--public-key", "does not exist (the device's trusted release key)"]),
    ("edge-agent-interval-zero", ["edge-agent", "--device-id", "d1", "--labels", "a=1", "--interval", "0"],
     ["--interval"]),
    ("edge-agent-once-and-interval", ["edge-agent", "--device-id", "d1", "--labels", "a=1", "--once",
                                      "--interval", "5"], ["--interval", "not allowed with argument --once"]),
    ("finops-report-bad-date", ["finops-report", MODEL, "--as-of", "31/12/2026"], ["--as-of", "'31/12/2026'"]),
    ("monitor-unknown-model", ["monitor", "no-such-model"], ["'no-such-model'"]),
]


@pytest.mark.parametrize("argv,needles", [c[1:] for c in ARGS], ids=[c[0] for c in ARGS])
def test_bad_arguments(tmp_path, state, capsys, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, argv, *needles)
    settings = Settings()
    assert _store_keys(settings) == [] and _commits(settings) == 0
