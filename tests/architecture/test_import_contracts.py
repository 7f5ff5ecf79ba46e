"""The release library's architecture (.importlinter): its layers, no Airflow anywhere in it,
and neither MLflow nor Airflow on the device side. Checked by import-linter itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_release_library_keeps_its_contracts():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Contracts: 4 kept, 0 broken." in done.stdout


def test_a_device_side_import_of_mlflow_breaks_a_contract(tmp_path):
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    agent = tmp_path / "pipelines" / "edge" / "agent.py"
    agent.write_text(agent.read_text() + "\n\ndef _registry():\n    from pipelines.registry import client\n\n"
                                           "    return client\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "pipelines.edge.agent -> pipelines.registry" in done.stdout


def test_every_module_of_the_release_library_has_a_layer():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    layered = {name.strip() for line in config["importlinter:contract:layers"]["layers"].split("\n")
               for name in line.replace("|", ":").split(":") if name.strip()}
    package = ROOT / "pipelines"
    modules = {f"pipelines.{p.stem}" for p in package.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"pipelines.{p.name}" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert modules == layered
