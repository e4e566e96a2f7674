"""The wasmlog application: one command tree over tlog, witness, registry and edge; nothing imports it."""
