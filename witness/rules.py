"""The tlog-witness add-checkpoint rules as one pure function."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tlog.errors import ProofError, SplitViewError
from tlog.hashes import EMPTY_ROOT
from tlog.merkle import check_extends

from .errors import BadProof, BadRequest, Conflict, SplitViewProof


@dataclass(frozen=True)
class Tree:
    size: int
    root_hash: bytes


EMPTY_TREE = Tree(0, EMPTY_ROOT)


def check_update(known: Tree, old_size: int, proof: Sequence[bytes], new: Tree) -> None:
    """Apply the c2sp.org/tlog-witness rules to a checkpoint whose log signature verified.

    known is the latest tree cosigned for this origin (EMPTY_TREE if none).
    Raises BadRequest (400), Conflict (409) or BadProof (422); SplitViewProof (a BadProof)
    when the request proves the log signed two histories.
    """
    if old_size > new.size:
        raise BadRequest(f"old size {old_size} > checkpoint size {new.size}")
    if old_size != known.size:
        raise Conflict(known.size)
    try:  # same size, other root: SplitViewProof, 422 (v1.0.0 said 409; C2SP main, PR #280, says 422: it cannot loop a client)
        check_extends(old_size, known.root_hash, new.size, new.root_hash, proof)
    except SplitViewError as e:
        raise SplitViewProof(str(e)) from e
    except ProofError as e:
        raise BadProof(str(e)) from e
