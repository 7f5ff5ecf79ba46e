"""Edge AI release pipeline: the domain library.

Stages are plain functions in `pipelines.release`; Airflow DAGs, the CLI and tests call them.
This package never imports Airflow.
"""

__version__ = "0.1.0"
