"""The XCom codec: a release stage runs as one Airflow task on the records earlier tasks left.

Stages pass small typed records (`pipelines.records`); Airflow carries them between tasks as
JSON (XCom). `run_stage(name, ...)` turns each XCom value back into the record type the stage
function's annotation names, calls `pipelines.release.<name>`, keeps how long it took as the
task's XCom `seconds`, fails the task without retries when the input is at fault (a
`ReleaseError` or a `SpecError`: retrying cannot help), and returns the record as XCom.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

from airflow.sdk import get_current_context

SECONDS = "seconds"  # the XCom key of a stage's duration


def _record_type(annotation: Any) -> type | None:
    from pipelines.records import Record

    return annotation if isinstance(annotation, type) and issubclass(annotation, Record) else None


def decode(value: Any, annotation: Any) -> Any:
    """An XCom value as the type `annotation` names: a record (`DataCheck`), a list or dict of
    records, or an optional record (`X | None`); any other value is returned as it is."""
    if value is None:
        return None
    record = _record_type(annotation)
    if record is not None:
        return value if isinstance(value, record) else record.model_validate(value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            record = _record_type(option)
            if record is not None and isinstance(value, (dict, record)):
                return decode(value, record)
        return value
    if origin in (list, tuple) and args and isinstance(value, (list, tuple)):
        return [decode(item, args[0]) for item in value]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {key: decode(item, args[1]) for key, item in value.items()}
    return value


@functools.cache
def _hints(function: Callable) -> dict[str, Any]:
    return typing.get_type_hints(function)


def call(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` with every argument decoded into the type its parameter's
    annotation names (`typing.get_type_hints`), so nothing is rebuilt by hand."""
    hints = _hints(function)
    bound = inspect.signature(function).bind(*args, **kwargs)
    for name, value in bound.arguments.items():
        if name in hints:
            bound.arguments[name] = decode(value, hints[name])
    return function(*bound.args, **bound.kwargs)


@contextlib.contextmanager
def failing_fast() -> Iterator[None]:
    """Bad input (a `ReleaseError` or a `SpecError`) fails the task at once, without retries,
    with the error's message on one line; any other error is left to the task's retries."""
    from airflow.exceptions import AirflowFailException

    from pipelines.errors import one_line
    from pipelines.release import ReleaseError
    from pipelines.specs import SpecError

    try:
        yield
    except (ReleaseError, SpecError) as error:
        raise AirflowFailException(one_line(error)) from None


def run_stage(name: str, *args: Any, signing: bool = False, **kwargs: Any) -> dict:
    """Run the release stage `pipelines.release.<name>` on XCom values and return its record
    as XCom. `signing`: the stage signs, and takes its settings with the keys of the
    `edge_signing` connection (see `edge_airflow.connections`)."""
    from edge_airflow import connections
    from pipelines import release

    stage = getattr(release, name)
    with connections.signing_settings() if signing else contextlib.nullcontext() as settings:
        if settings is not None:
            kwargs["settings"] = settings
        start = time.perf_counter()
        with failing_fast():
            record = call(stage, *args, **kwargs)
        seconds = round(time.perf_counter() - start, 3)
    get_current_context()["ti"].xcom_push(key=SECONDS, value=seconds)
    return record.to_xcom()


def pulled(task_id: str, key: str = "return_value") -> Any:
    """The XCom `key` of another task of this run; None when that task was skipped."""
    return get_current_context()["ti"].xcom_pull(task_ids=task_id, key=key)


def stage_seconds() -> dict[str, float]:
    """How long each stage of this run took, for the stages that ran."""
    from pipelines.release import STAGES

    seconds = {name: pulled(name, SECONDS) for name in STAGES}
    return {name: value for name, value in seconds.items() if value is not None}


def every_verdict(gates: list[dict], cost: dict) -> list[dict]:
    """Every verdict the release is decided on (`pipelines.release.all_verdicts`), as XCom."""
    from pipelines.records import CostReport, GateVerdict
    from pipelines.release import all_verdicts

    return [v.to_xcom() for v in all_verdicts([GateVerdict.model_validate(g) for g in gates],
                                              CostReport.model_validate(cost))]
