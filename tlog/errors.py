"""The errors this package raises on bad input, as one small typed tree."""

from __future__ import annotations

from collections.abc import Sequence


class TlogError(Exception):
    """Base class for everything this package raises on bad input or state."""


class MalformedError(TlogError):
    """Input that is not in the canonical form of its format."""


class TooLargeError(MalformedError):
    """Input over a named size bound."""


class UnsupportedEncodingError(MalformedError):
    """A request body in a Content-Encoding we do not decode."""


class BodyTimeoutError(TlogError):
    """A request body that did not arrive within the server's body timeout."""


class ProofError(TlogError):
    """A Merkle proof that does not verify, or cannot be produced for its arguments."""


class SignatureError(TlogError):
    """A signature from a known key that does not verify."""


class UnverifiedNoteError(TlogError):
    """A note that carries no signature from any key the verifier knows."""


class InconsistentCheckpoints(ProofError):
    """Two signed checkpoints that cannot both be honest. Keep them: they are evidence."""

    def __init__(self, older: bytes, newer: bytes, proof: Sequence[bytes], reason: str) -> None:
        super().__init__(f"log checkpoints are inconsistent: {reason}")
        self.older, self.newer, self.proof = older, newer, tuple(proof)


class NotFoundError(TlogError):
    """A resource (tile, entry, tree size) the log does not have."""


class PushbackError(TlogError):
    """The log is overloaded: answer 503 with Retry-After and let the client retry."""


class StorageFullError(TlogError):
    """The storage has no room left; nothing of the failed batch was written."""
