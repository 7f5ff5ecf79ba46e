"""The environment a release runs in: stores, tracking server, GitOps remote.

Everything here comes from environment variables prefixed `EDGE_` (Airflow deployments set
them on the workers, or as connections resolved into the environment). Defaults give the
embedded setup: every store lives under one state folder, `./.edge-state` unless
`EDGE_STATE_DIR` says otherwise. Model specs never carry any of this.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_", frozen=True, extra="ignore")

    state_dir: Path = Field(Path(".edge-state"), description="Root of all embedded state.")
    specs_dir: Path = Field(PROJECT_ROOT / "model_specs", description="Where model specs live.")
    mlflow_tracking_uri: str | None = Field(None, description="Default: SQLite under the state folder.")
    mlflow_artifact_root: str | None = Field(
        None, description="Default: the tracking server's proxied store, or a folder under the state folder.")
    artifact_store: str | None = Field(None, description="file:// or s3://bucket/prefix for models and evidence.")
    telemetry_store: str | None = Field(None, description="file:// or s3:// for device telemetry. Default: the artifact store.")
    s3_endpoint_url: str | None = Field(None, description="For S3-compatible stores (MinIO).")
    gitops_remote: str | None = Field(None, description="Any Git URL. Default: a bare repo in the state folder.")
    fleet_file: Path | None = Field(None, description="The fleet the cost projection prices.")
    signing_key: Path | None = Field(None, description="Private key (PEM) that signs artifacts. Default: demo keys.")
    signing_public_key: Path | None = Field(None, description="Public key (PEM) that verifies them.")
    gitops_branch: str = "main"
    git_author_name: str = "edge-release-bot"
    git_author_email: str = "edge-release-bot@apexlogic.dev"

    @cached_property
    def state(self) -> Path:
        return self.state_dir.expanduser().resolve()

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
        return self.fleet_file or PROJECT_ROOT / "model_specs" / "fleet" / "fleet.yaml"

    def signing_keys(self) -> tuple[Path, Path]:
        """(private, public) key files; a demo pair under the state folder when none is configured."""
        if self.signing_key:
            if not self.signing_public_key:
                raise ValueError("EDGE_SIGNING_KEY is set but EDGE_SIGNING_PUBLIC_KEY is not")
            return self.signing_key, self.signing_public_key
        from pipelines.gitops.signing import ensure_demo_keys

        return ensure_demo_keys(self.state / "keys")

    @property
    def work_dir(self) -> Path:
        """Scratch space of this machine (never shared between workers)."""
        return self.state / "work"


def get_settings() -> Settings:
    return Settings()
