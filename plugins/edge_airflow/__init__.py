"""The Airflow adapter: the only code besides the DAG files that imports Airflow.

- `xcom`: a release stage as one task (`run_stage`), its records decoded from XCom;
- `approval`: the `decide` branch, the Required Actions operator and a person's answer;
- `run`: the run's options, what started it, its summary line;
- `attempts`: the run's attempt record: started, failed (the tasks' failure callback), approved;
- `operations`: the tasks after a release (rollout, rollback, drift, FinOps, desired state);
- `alerts`: alerts to people (webhook, Slack, PagerDuty) through their Airflow connections;
- `schedules`, `assets`, `params`: when DAGs run, the Assets that link them, trigger forms;
- `specs`: the folder of model specs the DAG files are built from;
- `connections`: settings and signing keys from Airflow connections.

The release library in `pipelines` stays importable, and testable, without Airflow.
"""
