"""Labels for sampled inferences, posted by a business system (`POST
/edge/api/models/<model>/feedback`): the body read within its bound, checked whole by
`pipelines.operate.feedback`, stored as one object of the telemetry store.

The body is `{"labels": [{"inference_id": "...", "label": ...}, ...]}`: at most
`pipelines.operate.feedback.MAX_BATCH` labels in at most MAX_BODY_BYTES."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone

MAX_BODY_BYTES = 16 * 1024 * 1024


class FeedbackRefused(ValueError):
    """A body that is not a batch of labels; the message says why in one line."""


async def read_body(chunks: AsyncIterator[bytes], length: str | None) -> dict:
    """The body as a JSON object, refused past MAX_BODY_BYTES without reading further."""
    from edge_ui.bodies import read_bounded

    data = await read_bounded(chunks, length, MAX_BODY_BYTES, FeedbackRefused(
        f"the body is larger than {MAX_BODY_BYTES:,} bytes; send the labels in batches"))
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeedbackRefused(f"the body is not JSON: {getattr(error, 'msg', error)}") from None
    if not isinstance(body, dict) or set(body) != {"labels"}:
        raise FeedbackRefused('the body must be {"labels": [{"inference_id": ..., "label": ...}, ...]}')
    return body


def store(model: str, body: dict, submitted_by: str):
    """Check and store the batch as sent by `submitted_by`; the receipt (FeedbackReceipt).
    KeyError for an unknown model, FeedbackRefused for a bad batch."""
    from pipelines.operate.feedback import FeedbackError, check_rows, model_task, store_labels
    from pipelines.operate.monitor import spec_path_of
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    settings = get_settings()
    spec_path = spec_path_of(model, settings)
    try:
        rows = check_rows(body["labels"], model_task(spec_path, settings), "labels")
    except FeedbackError as error:
        raise FeedbackRefused(str(error)) from None
    return store_labels(ObjectStore(settings.telemetry_url, settings.s3_endpoint_url), model, rows,
                        datetime.now(timezone.utc), by=submitted_by)
