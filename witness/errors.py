"""Witness errors, one class per c2sp.org/tlog-witness status."""

from __future__ import annotations

from tlog.errors import TlogError


class WitnessError(TlogError):
    status = 500


class BadRequest(WitnessError):
    status = 400


class Forbidden(WitnessError):
    status = 403


class UnknownOrigin(WitnessError):
    status = 404


class Conflict(WitnessError):
    """old size is not the latest size this witness cosigned; known_size goes in the 409 body."""

    status = 409

    def __init__(self, known_size: int) -> None:
        super().__init__(f"the latest cosigned size is {known_size}")
        self.known_size = known_size


class BadProof(WitnessError):
    """A proof that does not show the checkpoint extends the cosigned one: it proves nothing about the log."""

    status = 422


class SplitViewProof(BadProof):
    """The request itself proves the log signed two histories (same size, other root; or a proof that
    yields the new root from another old root). Answered like any bad proof, and kept as evidence."""


class TooManyRequests(WitnessError):
    status = 429
    scope = "log"


class LogOverBudget(TooManyRequests):
    """The log has had its qpd of cosignatures in the last day."""

    scope = "log"


class ClientOverBudget(TooManyRequests):
    """This client made too many refused requests; it may still send one the witness can cosign."""

    scope = "client"


class Frozen(WitnessError):
    """This witness holds split-view evidence for the log and cosigns nothing more until an operator acts."""

    status = 422
