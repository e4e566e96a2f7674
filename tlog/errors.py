"""The errors this package raises on bad input, as one small typed tree."""

from __future__ import annotations


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


class MalformedProofError(ProofError):
    """Not a proof for its sizes (a hash of the wrong length, the wrong number of hashes): it proves nothing."""


class SplitViewError(ProofError):
    """The log's trees cannot be one history: equal sizes with different roots, or a proof that
    yields the new root from an old root other than the one given. With two checkpoints the log
    signed, this is evidence of a fork."""


class NotFoundError(TlogError):
    """A resource (tile, entry, tree size) the log does not have."""


class PushbackError(TlogError):
    """The log is overloaded: answer 503 with Retry-After and let the client retry."""


class MissingDependencyError(TlogError):
    """A feature whose optional dependencies are not installed; the message names the extra to install."""

    def __init__(self, feature: str, extra: str, missing: ImportError) -> None:
        super().__init__(f"{feature} needs wasmlog[{extra}] ({missing.name or missing} is not installed): pip install 'wasmlog[{extra}]'")
        self.extra = extra


class StorageFullError(TlogError):
    """The storage has no room left; nothing of the failed batch was written."""


class StorageUnavailableError(TlogError):
    """The shared storage (database or bucket) could not be reached or failed; nothing was acknowledged."""


class UnknownLogError(TlogError):
    """A checkpoint of a log the policy does not name."""


class CosignatureError(SignatureError):
    """A cosignature by a witness the policy names that does not verify."""


class QuorumNotMetError(TlogError):
    """A checkpoint whose valid cosignatures do not meet the policy's witness quorum."""


class StaleCheckpointError(TlogError):
    """A checkpoint whose quorum time (the newest time by which a quorum had cosigned) is older than the caller allows (or that has none)."""
