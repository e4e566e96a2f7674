"""The compact range: the right frontier of a tree, extended in O(log n) per entry.

It holds the hashes of the perfect subtrees of [0, size) (merkle.range_nodes(0, size)),
so appending needs no reads of old data, and it reports every node it completes,
which is how the tile hashes are produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .hashes import EMPTY_ROOT, HASH_SIZE, node_hash
from .merkle import fold_range, range_nodes

NodeSink = Callable[[int, int, bytes], None]  # (height, index, hash)


class CompactRange:
    """The perfect subtrees covering [0, size); mutable, owned by one appender."""

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        """Requires len(hashes) == len(range_nodes(0, size)), each HASH_SIZE bytes."""
        if size < 0 or len(hashes) != (len(range_nodes(0, size)) if size else 0):
            raise ValueError(f"a compact range of size {size} needs {size.bit_count()} hashes")
        if any(len(h) != HASH_SIZE for h in hashes):
            raise ValueError("compact range hashes must be 32 bytes")
        self.size = size
        self._hashes = list(hashes)

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self._hashes)

    def append(self, leaf: bytes, on_node: NodeSink | None = None) -> None:
        """Append one leaf hash; call on_node for the leaf and every node it completes."""
        index, height, h, s = self.size, 0, leaf, self.size
        if on_node is not None:
            on_node(0, index, h)
        while s & 1:
            h = node_hash(self._hashes.pop(), h)
            height += 1
            index >>= 1
            s >>= 1
            if on_node is not None:
                on_node(height, index, h)
        self._hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        """Return MTH of the tree of this size."""
        return fold_range(self._hashes) if self._hashes else EMPTY_ROOT
