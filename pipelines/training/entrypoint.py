"""A data scientist's own training code: `training.entrypoint: "module:function"`.

The contract (docs/bring-your-own-model.md):

    function(features: pandas.DataFrame, target: numpy.ndarray, params: dict, seed: int)

`features` are the prepared feature columns (numbers as float32, categories as strings, as
devices send them); `target` holds class indices 0..K-1 (classification) or the values to
predict (regression); `params` is `training.params`; `seed` is `training.seed`. It returns a
fitted scikit-learn-compatible estimator (a Pipeline included) or a torch `nn.Module` that
maps a float32 batch `[N, features]` (reshaped to `training.inputShape` first, when the spec
gives one) to class probabilities `[N, K]` or to predictions `[N, 1]`.

The module is looked up in the spec's folder first, then among installed packages. Its files
are part of the release's identity (`code_files`): editing them makes a new release.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from pathlib import Path

log = logging.getLogger(__name__)


class TrainingCodeError(RuntimeError):
    """The entrypoint could not be loaded, failed, or returned something that is not a model;
    the message is one line naming the user's file and line."""


def _split(entrypoint: str) -> tuple[str, str]:
    module, _, function = entrypoint.partition(":")
    return module, function


def _local_files(module: str, folder: Path) -> list[Path] | None:
    """The module's files when it lives in the spec's folder (a module file or a package)."""
    top = module.split(".")[0]
    package = folder / top
    if (package / "__init__.py").is_file():
        return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    single = folder / f"{top}.py"
    return [single] if single.is_file() else None


def code_files(entrypoint: str, folder: Path) -> tuple[list[Path], Path]:
    """The files of the entrypoint's module and the folder they are named against: in the spec's
    folder, or the installed package's own files."""
    module, _ = _split(entrypoint)
    local = _local_files(module, folder)
    if local is not None:
        return local, folder
    found = importlib.util.find_spec(module.split(".")[0])
    if found is None or found.origin is None:
        raise TrainingCodeError(f"training.entrypoint: module {module!r} is neither in {folder} nor installed")
    origin = Path(found.origin)
    if origin.name == "__init__.py":
        return sorted(p for p in origin.parent.rglob("*.py") if "__pycache__" not in p.parts), origin.parent.parent
    return [origin], origin.parent


def load_module(entrypoint: str, folder: Path):
    """Import the entrypoint's module, from the spec's folder when it is there. A module of that
    name imported earlier from elsewhere (another spec's `train.py`) is imported afresh."""
    module, _ = _split(entrypoint)
    top = module.split(".")[0]
    local = _local_files(module, folder) is not None
    if local:
        for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if not Path(file).resolve().is_relative_to(folder.resolve()):
                del sys.modules[name]
        sys.path.insert(0, str(folder))
    try:
        importlib.invalidate_caches()
        loaded = importlib.import_module(module)
        if local:
            loaded = importlib.reload(loaded)
        return loaded
    except Exception as error:  # noqa: BLE001 - user code: any error is reported as one line
        raise TrainingCodeError(located(error, folder, f"training.entrypoint: importing {module}")) from error
    finally:
        if local:
            sys.path.remove(str(folder))


def located(error: BaseException, folder: Path, what: str) -> str:
    """`<file>:<line>: <what>: <Error>: <message>`, at the innermost frame in the user's code."""
    log.error("%s failed", what, exc_info=error)
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        where = f"{error.filename}:{error.lineno}"
    else:
        mine = [f for f in frames if Path(f.filename).resolve().is_relative_to(folder.resolve())]
        frame = (mine or frames or [None])[-1]
        where = f"{frame.filename}:{frame.lineno}" if frame is not None else str(folder)
    message = " ".join(str(error).split()) or "(no message)"
    return f"{_shown(where)}: {what}: {type(error).__name__}: {message[:300]}"


def _shown(where: str) -> str:
    """A file of the user's as they know it: relative to the working folder when it is inside it."""
    path = Path(where.rsplit(":", 1)[0])
    try:
        relative = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return where
    return f"{relative}:{where.rsplit(':', 1)[1]}" if ":" in where else str(relative)


def run(entrypoint: str, folder: Path, features, target, params: dict, seed: int, task: str):
    """Call the user's function and check what it returned; the model, and 'sklearn' or 'torch'."""
    module = load_module(entrypoint, folder)
    name = _split(entrypoint)[1]
    function = getattr(module, name, None)
    if not callable(function):
        raise TrainingCodeError(f"{getattr(module, '__file__', entrypoint)}: training.entrypoint: "
                                f"no function {name!r} in module {module.__name__}")
    try:
        model = function(features, target, dict(params), seed)
    except Exception as error:  # noqa: BLE001 - user code
        raise TrainingCodeError(located(error, folder, f"training.entrypoint {entrypoint}")) from error
    where = f"{module.__file__}: training.entrypoint {entrypoint}"
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            return model.eval(), "torch"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    needs = ("fit", "predict") if task == "regression" else ("fit", "predict_proba")
    missing = [m for m in needs if not callable(getattr(model, m, None))]
    if missing:
        raise TrainingCodeError(f"{where} returned {type(model).__name__}, not a fitted scikit-learn-compatible "
                                f"estimator ({', '.join(missing)} missing) or a torch nn.Module")
    return model, "sklearn"
