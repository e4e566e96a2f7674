"""wasmlog's edge side: the verifier (pure), the anti-rollback state, and the I/O around them."""
