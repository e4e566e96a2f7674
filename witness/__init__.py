"""wasmlog's witness: c2sp.org/tlog-witness add-checkpoint, cosigning with tlog-cosignature v1."""
