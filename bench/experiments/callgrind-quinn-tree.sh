#!/usr/bin/env bash
# callgrind-quinn-tree.sh [WRITES] [quic|tcp|redis]: every instruction one leaf process
# executes per delivered write, counted as bench/callgrind-process counts a leaf relay-node:
# a root and one leaf on 127.0.0.1, the leaf under callgrind with one keyspace subscriber;
# counters zeroed once the leaf holds the first value, WRITES SETs of 100 bytes at about
# 20/s on the root, dumped once the subscriber has seen them all. quic (the default) and
# tcp: `quinn-tree node` over bare quinn with Canopy's transport settings or bare TCP;
# redis: a Redis master and one `redis-server --replicaof` replica, as bench/propagation
# starts them. Prints the instructions per delivery.
set -euo pipefail
WRITES=${1:-200}
KIND=${2:-quic}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
if [ "$KIND" = redis ]; then
    redis-server --port 27811 --bind 127.0.0.1 --dir "$W" --save "" --appendonly no \
        --repl-diskless-sync yes --repl-diskless-sync-delay 0 --logfile "" >"$W/root.log" 2>&1 &
else
    "$BIN/quinn-tree" certs "$W/c"
    "$BIN/quinn-tree" node --certs "$W/c" --transport "$KIND" --resp 127.0.0.1:27811 \
        --listen 127.0.0.1:27813 --key k >"$W/root.log" 2>&1 &
fi
until redis-cli -p 27811 PING >/dev/null 2>&1; do sleep 0.1; done
redis-cli -p 27811 SET k initial >/dev/null
if [ "$KIND" = redis ]; then
    mkdir -p "$W/r"
    valgrind --tool=callgrind --callgrind-out-file="$W/callgrind.out" \
        redis-server --port 27911 --bind 127.0.0.1 --dir "$W/r" --save "" --appendonly no \
        --logfile "" --replicaof 127.0.0.1 27811 --notify-keyspace-events 'K$' \
        --repl-diskless-load on-empty-db >"$W/leaf.log" 2>&1 &
else
    valgrind --tool=callgrind --callgrind-out-file="$W/callgrind.out" \
        "$BIN/quinn-tree" node --certs "$W/c" --transport "$KIND" --resp 127.0.0.1:27911 \
        --listen 127.0.0.1:27913 --parent 127.0.0.1:27813 --key k >"$W/leaf.log" 2>&1 &
fi
LEAF=$!
until [ "$(redis-cli -p 27911 GET k 2>/dev/null)" = initial ]; do sleep 0.2; done
redis-cli -p 27911 SUBSCRIBE __keyspace@0__:k >"$W/sub.out" &
until grep -q subscribe "$W/sub.out" 2>/dev/null; do sleep 0.1; done
callgrind_control -z "$LEAF" >/dev/null
value=$(head -c 100 /dev/zero | tr '\0' x)
for ((i = 0; i < WRITES; i++)); do redis-cli -p 27811 SET k "$value" >/dev/null; sleep 0.05; done
until [ "$(grep -c '^set$' "$W/sub.out")" -ge "$WRITES" ]; do sleep 0.1; done
callgrind_control -d "$LEAF" >/dev/null
sleep 1
total=$(callgrind_annotate "$(ls "$W"/callgrind.out* | tail -1)" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "$KIND leaf: $total instructions for $WRITES writes, $((total / WRITES)) per delivery"
