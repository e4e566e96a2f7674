#!/bin/sh
# Create the network's keys and files in the shared "keys" volume on first start; reuse them after.
set -eu
cd /keys
[ -f log.key ] || wasmlog keygen registry.wasmlog.internal/log --out log
[ -f shared-log.key ] || wasmlog keygen shared.wasmlog.internal/log --out shared-log  # the "shared" profile's registry
for i in 1 2 3; do
  [ -f witness$i.key ] || wasmlog keygen witness$i.wasmlog.internal --witness --out witness$i
done
printf 'logs/v0\nvkey %s\nqpd 864000\nurl http://registry:7380/log\n' "$(cat log.vkey)" > logs.txt
{
  echo "log $(cat log.vkey)"
  for i in 1 2 3; do echo "witness W$i $(cat witness$i.vkey) http://witness$i:7381"; done
  echo "group witnesses 2 W1 W2 W3"
  echo "quorum witnesses"
} > tlog-policy.txt
{
  echo "max_checkpoint_age = 86400"
  echo 'tlog_policy = """'
  cat tlog-policy.txt
  echo '"""'
} > trust-policy.toml
chown -R 10001:10001 /keys  # the servers run as the unprivileged wasmlog user
