"""Witness errors, one class per c2sp.org/tlog-witness refusal (witness/server.py maps each to its status)."""

from __future__ import annotations

from tlog.errors import TlogError


class WitnessError(TlogError):
    """A refusal by the witness."""


class BadRequest(WitnessError):
    """A request the protocol does not allow (a malformed body, an old size beyond the checkpoint's)."""


class Forbidden(WitnessError):
    """The checkpoint is not validly signed by the log it names."""


class UnknownOrigin(WitnessError):
    """The checkpoint's origin is not in this witness's log list."""


class Conflict(WitnessError):
    """old size is not the latest size this witness cosigned; known_size goes in the answer's body."""

    def __init__(self, known_size: int) -> None:
        super().__init__(f"the latest cosigned size is {known_size}")
        self.known_size = known_size


class BadProof(WitnessError):
    """A proof that does not show the checkpoint extends the cosigned one: it proves nothing about the log."""


class SplitViewProof(BadProof):
    """The request itself proves the log signed two histories (same size, other root; or a proof that
    yields the new root from another old root). Answered like any bad proof, and kept as evidence."""


class TooManyRequests(WitnessError):
    """A rate limit; scope says whose: the log's qpd or the client's refused requests."""

    scope = "log"


class LogOverBudget(TooManyRequests):
    """The log has had its qpd of cosignatures in the last day."""

    scope = "log"


class ClientOverBudget(TooManyRequests):
    """This client made too many refused requests; it may still send one the witness can cosign."""

    scope = "client"


class Frozen(WitnessError):
    """This witness holds split-view evidence for the log and cosigns nothing more until an operator acts."""
