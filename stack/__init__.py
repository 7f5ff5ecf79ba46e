"""Tooling that runs the services around the release library: the embedded Airflow
(`airflow_local`), the native production stack (`prod_stack`), the closed-loop demo
(`demo_loop`) and the UI launcher (`python -m stack ui`). None of it is release code: a
change here never changes what a release produces."""
