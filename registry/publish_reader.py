"""Reading the body of ``POST /api/v1/publish`` in two steps (spec/registry-api.md, Publishing).

The parts come in the order signer, envelope, module, sbom, as CBOR (registry/publish_body.py,
read from the stream) or multipart/form-data. signed() reads up to the envelope and no further,
so a forged or unauthorized publish is refused before its module is read; contents() reads
the rest. Every part is read straight into its own buffer, within its limit. A CBOR body of at most
WHOLE_BODY_BYTES (its Content-Length) is read at once and decoded from memory: one read instead of
one per CBOR head, and nothing worth sparing to read after the envelope.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from tlog.errors import MalformedError, TooLargeError

from .dsse import MAX_ENVELOPE_BYTES
from .publish_body import (
    ENDS_EARLY,
    TRAILING,
    Decoder,
    check_part_order,
    publish_body_decoder,
)
from .sbom import MAX_SBOM_BYTES
from .wasm import MAX_MODULE_BYTES

PUBLISH_PARTS = {"signer": 1024, "envelope": MAX_ENVELOPE_BYTES, "module": MAX_MODULE_BYTES, "sbom": MAX_SBOM_BYTES}
WHOLE_BODY_BYTES = 64 << 10
MISSING = "publish needs the parts signer, envelope and module, in that order (then sbom when the statement names one)"


def part_text(parts: dict[str, bytes], name: str) -> str:
    try:
        return parts[name].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        raise MalformedError(f"missing or non-UTF-8 part {name}") from None


class PublishReader:
    """The parts of one publish request, read as far as asked. Raises MalformedError, TooLargeError."""

    def __init__(self, request: web.Request) -> None:
        cbor = request.content_type == "application/cbor"
        if not cbor and not request.content_type.startswith("multipart/"):
            raise MalformedError("a publish body is application/cbor or multipart/form-data")
        self._request = request
        self.parts: dict[str, bytes] = {}
        self._done = False
        self._decoder = publish_body_decoder(PUBLISH_PARTS, self.parts) if cbor else None  # None: multipart
        self._need = 0 if self._decoder is None else next(self._decoder)  # how many bytes the decoder wants next
        self._multipart: MultipartReader | None = None
        length = request.content_length
        self._whole = length if cbor and length is not None and length <= WHOLE_BODY_BYTES else None
        self._body: memoryview | None = None  # a whole small body, once read
        self._pos = 0

    async def signed(self) -> tuple[str, bytes]:
        """The signer and the envelope; nothing after them has been read."""
        await self._read_through("envelope")
        if "envelope" not in self.parts:
            raise MalformedError(MISSING)
        return part_text(self.parts, "signer"), self.parts["envelope"]

    async def contents(self) -> tuple[bytes, bytes | None]:
        """The module and the SBOM (None if not sent), once the whole body is read."""
        await self._read_through(None)
        if "module" not in self.parts:
            raise MalformedError(MISSING)
        return self.parts["module"], self.parts.get("sbom")

    async def _read_through(self, name: str | None) -> None:
        """Read until the part name is read (None: to the end of the body)."""
        if self._whole is not None and self._body is None:
            try:
                self._body = memoryview(await self._request.content.readexactly(self._whole))
            except asyncio.IncompleteReadError:
                raise MalformedError(ENDS_EARLY) from None
        while not self._done and (name is None or name not in self.parts):
            if self._decoder is None:
                await self._multipart_part()
            elif self._body is not None:  # a whole small body: decoded from memory, no await per CBOR head
                if self._feed(self._decoder, self._take(self._need)) and self._pos != len(self._body):
                    raise MalformedError(TRAILING)
            elif self._feed(self._decoder, await self._read(self._need)) and await self._request.content.read(1):
                raise MalformedError(TRAILING)

    async def _read(self, n: int) -> bytes:
        """The body's next n bytes from the stream. Raises MalformedError if it ends first."""
        try:
            return await self._request.content.readexactly(n)
        except asyncio.IncompleteReadError:
            raise MalformedError(ENDS_EARLY) from None

    def _take(self, n: int) -> bytes:
        """The whole body's next n bytes. Raises MalformedError if it ends first."""
        assert self._body is not None
        if self._pos + n > len(self._body):
            raise MalformedError(ENDS_EARLY)
        self._pos += n
        return bytes(self._body[self._pos - n : self._pos])

    def _feed(self, decoder: Decoder, chunk: bytes) -> bool:
        """Send the decoder the bytes it asked for; whether it is done (the map is complete)."""
        try:
            self._need = decoder.send(chunk)
        except StopIteration:
            self._done = True
        return self._done

    async def _multipart_part(self) -> None:
        try:
            if self._multipart is None:
                self._multipart = await self._request.multipart()
            part = await self._multipart.next()
            if part is None:
                self._done = True
                return
            if not isinstance(part, BodyPartReader):
                raise MalformedError("a publish part is not itself multipart")
            name = check_part_order(PUBLISH_PARTS, self.parts, part.name)
            data = bytearray()
            while chunk := await part.read_chunk(1 << 16):  # raw bytes: no Content-Transfer-Encoding decoding
                data += chunk
                if len(data) > PUBLISH_PARTS[name]:
                    raise TooLargeError(f"part {name} is over {PUBLISH_PARTS[name]} bytes")
            self.parts[name] = bytes(data)
        except (ValueError, HttpProcessingError) as e:  # no boundary, a missing or broken delimiter, a bad part header
            raise MalformedError(f"malformed multipart body: {getattr(e, 'message', e)!s:.200}") from None
