"""The edge side: signed desired state for devices, and an agent that acts only on it.

Phones and small devices run no Kubernetes and cannot run git at fleet scale, so a publisher
(`publish`) renders the GitOps tip, checked against the release key's attestation
(`desired_state`), into one document per device group of a TUF repository in the artifact
store (`tuf_repo`), which any static web server or CDN serves. The agent (`agent`) reads its
group's document through python-tuf's client (`tuf_client`, `sources`), or the attested Git
checkout itself (`desired` resolves the kustomize overlays as kustomize would), installs what
selects the device after checking length, sha256, signature and a smoke inference, and a
simulator runs a fleet of agents (`simulator`). Nothing here imports MLflow or Airflow.
"""
