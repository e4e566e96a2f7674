"""wasmlog's registry: release statements, log records, namespace state, blobs and the HTTP API."""
