"""Where the DAG files find the model specs they are built from: `EDGE_SPECS_DIR`, or the
repository's `model_specs/` (the folder `pipelines.settings` names too). Read without the
settings: importing them would cost every parse of a DAG file about a tenth of a second."""

from __future__ import annotations

import os
from pathlib import Path


def specs_folder() -> Path:
    """The specs folder, read again at each parse (a changed `EDGE_SPECS_DIR` applies)."""
    return Path(os.environ.get("EDGE_SPECS_DIR", Path(__file__).resolve().parents[2] / "model_specs"))
