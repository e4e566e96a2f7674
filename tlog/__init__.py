"""wasmlog's transparency log: RFC 9162 Merkle trees and the C2SP formats around them.

The pure core (hashes, merkle, compact, tiles, note, checkpoint, cosignature,
proof_file) does no I/O; storage, sequencer and server build on it. The commands are in wasmlog/
"""
