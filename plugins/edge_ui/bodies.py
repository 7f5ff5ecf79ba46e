"""Request bodies of the routes that take one: read within a bound, never past it."""

from __future__ import annotations

from collections.abc import AsyncIterator


async def read_bounded(chunks: AsyncIterator[bytes], length: str | None, limit: int, too_large: Exception) -> bytes:
    """The body's bytes; `too_large` is raised, without reading further, when the declared
    length or the bytes received pass `limit`."""
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)
