"""The environment a release runs in: stores, tracking server, GitOps remote.

Everything here comes from environment variables prefixed `EDGE_` (Airflow deployments set
them on the workers, or as connections resolved into the environment). Defaults give the
embedded setup: every store lives under one state folder, `./.edge-state` unless
`EDGE_STATE_DIR` says otherwise. Model specs never carry any of this.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.specs import specs_folder

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_", frozen=True, extra="ignore")

    state_dir: Path = Field(Path(".edge-state"), description="Root of all embedded state.")
    specs_dir: Path = Field(default_factory=specs_folder, description="Where model specs live.")
    mlflow_tracking_uri: str | None = Field(None, description="Default: SQLite under the state folder.")
    mlflow_artifact_root: str | None = Field(
        None, description="Default: the tracking server's proxied store, or a folder under the state folder.")
    artifact_store: str | None = Field(None, description="file:// or s3://bucket/prefix for models and evidence.")
    telemetry_store: str | None = Field(None, description="file:// or s3:// for device telemetry. Default: the artifact store.")
    s3_endpoint_url: str | None = Field(None, description="For S3-compatible stores (MinIO).")
    object_lock_mode: Literal["governance"] | None = Field(
        None, description="S3 Object Lock for audit evidence (a bucket created with Object Lock enabled): "
                          "governance locks each verdict, evidence file, approval and model card for the spec's "
                          "responsibleAI.auditRetentionDays. Default: no lock.")
    gitops_remote: str | None = Field(None, description="Any Git URL. Default: a bare repo in the state folder.")
    fleet_file: Path | None = Field(None, description="The fleet the cost projection prices.")
    device_catalog: Path | None = Field(
        None, description="The device catalog the cost projection uses (a reviewed file of `python -m pipelines "
                          "finops-calibrate`). Default: the catalog shipped with the pipelines.")
    signing_key: Path | None = Field(None, description="Private key (PEM) that signs artifacts. Default: demo keys.")
    signing_public_key: Path | None = Field(None, description="Public key (PEM) that verifies them.")
    tuf_prefix: str = Field("tuf", description="Where the TUF repository of desired states lives in the artifact store.")
    tuf_url: str | None = Field(
        None, description="The TUF repository as devices reach it (tuf+https://cdn/..., tuf+file://...). "
                          "Default: tuf+file:// of a local artifact store.")
    tuf_keys_dir: Path | None = Field(None, description="Demo TUF keys (root, snapshot, timestamp). Default: <state>/keys/tuf.")
    tuf_root_key: Path | None = Field(None, description="Root key (PEM): needed only to create the repository or rotate keys.")
    tuf_snapshot_key: Path | None = Field(None, description="Online snapshot key (PEM) of the publisher.")
    tuf_timestamp_key: Path | None = Field(None, description="Online timestamp key (PEM) of the publisher.")
    tuf_timestamp_expiry_hours: float = Field(24.0, gt=0, description="How long a signed timestamp is valid.")
    gitops_branch: str = "main"
    specs_remote: str | None = Field(
        None, description="The Git URL of the repository that holds the model specs: `finops-rightsize --propose` "
                          "pushes its spec changes there on a review branch (never to specs_remote_branch). "
                          "Default: none, recommendations are only printed and kept as evidence.")
    specs_remote_branch: str = Field("main", description="The specs repository's main branch (only ever read).")
    specs_remote_dir: str = Field(
        "model_specs", description="The folder of the specs inside that repository (`<dir>/<model>.yaml` or "
                                   "`<dir>/<model>/<model>.yaml`, as in EDGE_SPECS_DIR); '.' for its root.")
    mlflow_ui_url: str | None = Field(
        None, description="The MLflow UI as people reach it (https://mlflow.example.com): Edge Releases links runs "
                          "and model versions to it. Default: no links.")
    git_commit_url: str | None = Field(
        None, description="A web page of a GitOps commit, `{sha}` standing for the commit "
                          "(https://github.com/org/fleet/commit/{sha}). Default: the commit view of Edge Releases.")
    ui_url: str | None = Field(
        None, description="Edge Releases as people and systems reach it (https://airflow.example.com/edge): links in "
                          "alerts and the manifest's explainability endpoint. Default: paths relative to the "
                          "Airflow api-server (/edge/...).")
    flower_venv: Path = Field(
        PROJECT_ROOT / ".venv-flower", description="The Flower environment that runs federated training "
                                                   "(`make venv` builds it from requirements-flower.txt).")
    flower_superlink: str | None = Field(
        None, description="A running federation's SuperLink (host:port of its Control API): federated training "
                          "submits there, to the SuperNodes on devices, instead of starting an embedded federation.")
    flower_root_certificates: Path | None = Field(
        None, description="The CA certificate (PEM) the SuperLink's TLS certificate is checked against.")
    flower_insecure: bool = Field(False, description="Connect to the SuperLink without TLS (test federations only).")
    git_author_name: str = "edge-release-bot"
    git_author_email: str = "edge-release-bot@apexlogic.dev"

    @cached_property
    def state(self) -> Path:
        return self.state_dir.expanduser().resolve()

    def edge_link(self, path: str) -> str:
        """An Edge Releases page or route (`/models/adult-income`) as a link."""
        base = (self.ui_url or "/edge").rstrip("/")
        return f"{base}/{path.lstrip('/')}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.state / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> str:
        """Where new experiments keep their artifacts. With a tracking server and no root of
        its own, the server's proxied store (`mlflow-artifacts:/`): clients then need no
        credentials for the server's bucket."""
        if self.mlflow_artifact_root:
            return self.mlflow_artifact_root
        if self.tracking_uri.startswith(("http://", "https://")):
            return "mlflow-artifacts:/"
        return (self.state / "mlflow" / "artifacts").as_uri()

    @property
    def store_url(self) -> str:
        return self.artifact_store or (self.state / "artifacts").as_uri()

    @property
    def telemetry_url(self) -> str:
        return self.telemetry_store or self.store_url

    @property
    def remote(self) -> str:
        return self.gitops_remote or str(self.state / "gitops.git")

    @property
    def fleet_path(self) -> Path:
        return self.fleet_file or PROJECT_ROOT / "model_specs" / "fleet" / "inventory.yaml"

    def signing_keys(self) -> tuple[Path, Path]:
        """(private, public) key files; a demo pair under the state folder when none is configured."""
        if self.signing_key:
            if not self.signing_public_key:
                raise ValueError("EDGE_SIGNING_KEY is set but EDGE_SIGNING_PUBLIC_KEY is not")
            return self.signing_key, self.signing_public_key
        from pipelines.keys import ensure_demo_keys

        return ensure_demo_keys(self.state / "keys")

    @property
    def device_tuf_url(self) -> str:
        """The TUF repository's URL for devices."""
        if self.tuf_url:
            return self.tuf_url
        if not self.store_url.startswith("file://"):
            raise ValueError("EDGE_TUF_URL is not set: devices reach an S3 store's TUF repository over "
                             "HTTP(S) (tuf+https://<bucket website or CDN>/<prefix>)")
        return "tuf+" + self.store_url.rstrip("/") + "/" + self.tuf_prefix

    def tuf_keys(self) -> dict[str, Path | None]:
        """Key files by TUF role: targets is the release signing key; root only where it is
        configured (offline in production), demo keys under the state folder otherwise."""
        targets = self.signing_keys()[0]
        if self.tuf_snapshot_key or self.tuf_timestamp_key or self.signing_key:
            # Configured keys (production): never fall back to demo keys beside them.
            if not (self.tuf_snapshot_key and self.tuf_timestamp_key):
                raise ValueError("EDGE_TUF_SNAPSHOT_KEY and EDGE_TUF_TIMESTAMP_KEY must be set (with "
                                 "EDGE_SIGNING_KEY, the TUF repository's online keys are configured too)")
            return {"root": self.tuf_root_key, "targets": targets, "snapshot": self.tuf_snapshot_key,
                    "timestamp": self.tuf_timestamp_key}
        from pipelines.keys import ensure_demo_tuf_keys

        demo = ensure_demo_tuf_keys(self.tuf_keys_dir or self.state / "keys" / "tuf")
        return {"root": self.tuf_root_key or demo["root"], "targets": targets, "snapshot": demo["snapshot"],
                "timestamp": demo["timestamp"]}

    @property
    def work_dir(self) -> Path:
        """Scratch space of this machine (never shared between workers)."""
        return self.state / "work"


def get_settings() -> Settings:
    return Settings()
