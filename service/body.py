"""The image of a ``POST /segment`` request: the raw body or the multipart field ``file``, read streamed with
the size limit enforced, as a FastAPI dependency.

The dependency gives the route a reader, not the bytes: the service first admits the request (a queue slot)
and only then reads the body, so that a burst is refused before anyone's body is buffered.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.errors import ServiceError

# Raw-body content types that may carry an image (TIFF, PNG, ... are told apart by their bytes).
IMAGE_CONTENT_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "application/octet-stream",
    }
)


class ImageBody:
    """Reads one request's image bytes on demand (``read``), at most ``limit`` bytes."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.limit: int = request.app.state.service.settings.max_body_bytes

    async def read(self) -> bytes:
        """The image bytes, from the raw body or the multipart field ``file``; the size limit is enforced from
        Content-Length and again while the body streams in, so no oversized body is ever buffered. Raises
        ``ServiceError``: 413 over the limit, 415 for a content type that is not an image, 400 for a malformed
        body or a client that went away."""
        request, limit = self.request, self.limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ServiceError(413, f"body of {declared} bytes exceeds the limit of {limit}", "bad_input")
        media_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            return await self._multipart()
        if media_type not in IMAGE_CONTENT_TYPES:
            raise ServiceError(
                415,
                f"content type {media_type!r} is not an image; send image/jpeg, image/png, image/webp, "
                "image/bmp, image/tiff, application/octet-stream or multipart/form-data",
                "bad_input",
            )
        return b"".join([chunk async for chunk in self._chunks()])

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        received = 0
        try:
            async for chunk in self.request.stream():
                received += len(chunk)
                if received > self.limit:
                    raise ServiceError(413, f"body exceeds the limit of {self.limit} bytes", "bad_input")
                yield chunk
        except ClientDisconnect:
            raise ServiceError(400, "the client went away before sending the whole body", "bad_input") from None

    async def _multipart(self) -> bytes:
        parser = MultiPartParser(
            self.request.headers, self._chunks(), max_files=1, max_fields=8, max_part_size=self.limit
        )
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise ServiceError(400, f"malformed multipart body: {error.message}", "bad_input") from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ServiceError(400, "the multipart body needs the image in a file field named 'file'", "bad_input")
            return await upload.read()
        finally:
            await form.close()


Body = Annotated[ImageBody, Depends(ImageBody)]
