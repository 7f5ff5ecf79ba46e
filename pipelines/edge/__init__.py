"""The edge side: an agent that reconciles one device against the GitOps repository.

Phones and small devices run no Kubernetes, so the agent resolves the kustomize overlays of
`apps/<model>/` itself (`desired`), installs what selects the device after checking the
checksum, the signature and a smoke inference (`agent`), and a simulator runs a fleet of
agents to measure convergence (`simulator`). Nothing here imports MLflow or Airflow.
"""
