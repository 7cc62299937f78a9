#!/usr/bin/env bash
# A Canopy cluster that spans hosts, on one machine: 3 core nodes and 6 relays, each in its
# own network namespace with its own address, joined by veth pairs to a bridge. It writes a
# file through one relay, checks that every relay's materialized copy converged, patches it
# through another, checks again, and removes everything it made on exit.
#
# This is docs/quickstart.md as a script (tests/quickstart.rs runs it). Needs root and `ip`
# (iproute2), and the binaries on PATH (`cargo install --path .`) or in CANOPY_BIN_DIR.
#
# usage: deploy/quickstart-netns.sh [--size BYTES] [--keep]
#   --size BYTES  size of the file written (default 4000000)
#   --keep        leave the cluster running; print how to reach it, and how to remove it
set -euo pipefail

SIZE=4000000
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "quickstart: $*" >&2; exit 1; }
say() { echo "quickstart: $*"; }

[ "$(id -u)" = 0 ] || die "needs root (ip netns)"
command -v ip >/dev/null || die "needs ip (apt-get install iproute2)"
BIN_DIR="${CANOPY_BIN_DIR:-}"
bin() { if [ -n "$BIN_DIR" ]; then echo "$BIN_DIR/$1"; else command -v "$1" || die "$1 not on PATH: run cargo install --path . (or set CANOPY_BIN_DIR)"; fi; }
CANOPY="$(bin canopy)"; CORE_NODE="$(bin core-node)"; RELAY_NODE="$(bin relay-node)"
for b in "$CANOPY" "$CORE_NODE" "$RELAY_NODE"; do [ -x "$b" ] || die "$b is not executable"; done

# Names unique to this run, so that two runs (or a run and a kept cluster) never collide.
RUN="cq$$"
WORK="$(mktemp -d "/tmp/canopy-quickstart.XXXXXX")"
CORES=(core-1 core-2 core-3)
RELAYS=(relay-1 relay-2 relay-3 relay-4 relay-5 relay-6)
declare -A ADDR
i=11; for n in "${CORES[@]}"; do ADDR[$n]="10.77.0.$i"; i=$((i + 1)); done
i=21; for n in "${RELAYS[@]}"; do ADDR[$n]="10.77.0.$i"; i=$((i + 1)); done
BRIDGE_NS="$RUN-bridge"

ns() { echo "$RUN-$1"; }
# Runs a command "on host" $1, i.e. inside its namespace.
on() { local host="$1"; shift; ip netns exec "$(ns "$host")" "$@"; }

# Stops every process inside this run's namespaces (SIGTERM, then SIGKILL after 10 s), then
# deletes the namespaces: a deleted namespace's processes would otherwise run on unseen.
stop_all() {
  local n pids deadline
  for n in "${CORES[@]}" "${RELAYS[@]}"; do
    ip netns pids "$(ns "$n")" 2>/dev/null | xargs -r kill 2>/dev/null || true
  done
  deadline=$(( $(date +%s) + 10 ))
  for n in "${CORES[@]}" "${RELAYS[@]}"; do
    while pids="$(ip netns pids "$(ns "$n")" 2>/dev/null)" && [ -n "$pids" ]; do
      if [ "$(date +%s)" -ge "$deadline" ]; then echo "$pids" | xargs -r kill -9 2>/dev/null || true; fi
      sleep 0.1
    done
    ip netns del "$(ns "$n")" 2>/dev/null || true
  done
  ip netns del "$BRIDGE_NS" 2>/dev/null || true
}

cleanup() {
  local code=$?
  if [ "$KEEP" = 1 ] && [ "$code" = 0 ]; then return; fi
  stop_all
  if [ "$code" != 0 ]; then
    echo "quickstart: failed (exit $code); last log lines:" >&2
    for f in "$WORK"/logs/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 5 "$f" >&2; }; done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local secs="$1"; shift
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

say "1. certificates: one cluster CA, one certificate per node (its name and role are in it)"
"$CANOPY" ca init --out "$WORK/ca" >/dev/null
for n in "${CORES[@]}"; do "$CANOPY" cert issue --ca "$WORK/ca" --name "$n" --role core --out "$WORK/tls" >/dev/null; done
for n in "${RELAYS[@]}"; do "$CANOPY" cert issue --ca "$WORK/ca" --name "$n" --role relay --out "$WORK/tls" >/dev/null; done

say "2. network: a bridge, and one namespace per node with its own address (10.77.0.0/24)"
say "namespaces $RUN-bridge, $RUN-core-1 ... $RUN-relay-6; files in $WORK"
ip netns add "$BRIDGE_NS"
ip -n "$BRIDGE_NS" link add br0 type bridge
ip -n "$BRIDGE_NS" link set br0 up
i=0
for n in "${CORES[@]}" "${RELAYS[@]}"; do
  ip netns add "$(ns "$n")"
  ip -n "$(ns "$n")" link set lo up
  ip -n "$(ns "$n")" link add eth0 type veth peer name "port$i" netns "$BRIDGE_NS"
  ip -n "$(ns "$n")" addr add "${ADDR[$n]}/24" dev eth0
  ip -n "$(ns "$n")" link set eth0 up
  ip -n "$BRIDGE_NS" link set "port$i" master br0
  ip -n "$BRIDGE_NS" link set "port$i" up
  i=$((i + 1))
done

mkdir -p "$WORK/logs"
PEERS=()
for n in "${CORES[@]}"; do PEERS+=(--peer "$n=${ADDR[$n]}:7000"); done
JOIN="$(for n in "${CORES[@]}"; do printf '%s:7000,' "${ADDR[$n]}"; done)"; JOIN="${JOIN%,}"

say "3. three core nodes (QUIC on <address>:7000, the API on each host's 127.0.0.1:7070; fan-out 2)"
for n in "${CORES[@]}"; do
  ip netns exec "$(ns "$n")" "$CORE_NODE" --name "$n" --listen "${ADDR[$n]}:7000" --api 127.0.0.1:7070 \
    --data "$WORK/data/$n" --tls "$WORK/tls" "${PEERS[@]}" --init --fanout 2 \
    > "$WORK/logs/$n.log" 2>&1 &
done
leader() {
  for n in "${CORES[@]}"; do
    on "$n" "$CANOPY" status --json 2>/dev/null | grep -q '"role":"leader"' && return 0
  done
  return 1
}
wait_for 60 leader || die "no core leader within 60 s"
say "   a leader is elected"

say "4. six relays (fan-out 2, so that the tree has depth); each keeps its copy in --file"
for n in "${RELAYS[@]}"; do
  ip netns exec "$(ns "$n")" "$RELAY_NODE" --name "$n" --listen "${ADDR[$n]}:7000" --api 127.0.0.1:7070 \
    --data "$WORK/data/$n" --tls "$WORK/tls" --join "$JOIN" --fanout 2 \
    --file "$WORK/files/$n/table.bin" \
    > "$WORK/logs/$n.log" 2>&1 &
done

say "5. write a $SIZE-byte file through relay-6 (relays forward writes to the core; --data finds the node's API token)"
head -c "$SIZE" /dev/urandom > "$WORK/table.bin"
wait_for 60 on relay-6 "$CANOPY" status || die "relay-6's API did not come up"
on relay-6 "$CANOPY" --data "$WORK/data/relay-6" put "$WORK/table.bin"

# Every relay's materialized file equals $1.
converged() {
  for n in "${RELAYS[@]}"; do cmp -s "$1" "$WORK/files/$n/table.bin" || return 1; done
}
wait_for 60 converged "$WORK/table.bin" || die "the relays' files did not converge within 60 s"
say "   every relay's --file is byte-identical to what was written"

say "6. patch 16 bytes at offset 1000 through relay-2; check again"
printf 'patched-by-relay' > "$WORK/piece.bin"
on relay-2 "$CANOPY" --data "$WORK/data/relay-2" patch --offset 1000 "$WORK/piece.bin"
dd if="$WORK/piece.bin" of="$WORK/table.bin" bs=1 seek=1000 conv=notrunc status=none
wait_for 60 converged "$WORK/table.bin" || die "the patch did not reach every relay within 60 s"
VERSION="$(on core-1 "$CANOPY" status --json | sed -n 's/.*"version":\([0-9]*\).*/\1/p')"
say "   converged at version $VERSION on all 6 relays"

say "7. the whole tree, from one core node (every core member's subtree merged)"
on core-1 "$CANOPY" tree

if [ "$KEEP" = 1 ]; then
  say "the cluster keeps running. Reach a host with: ip netns exec $(ns relay-3) $CANOPY status"
  say "remove it with: for n in \$(ip netns list | grep -o '^$RUN-[a-z0-9-]*'); do ip netns pids \$n | xargs -r kill; ip netns del \$n; done; rm -rf $WORK"
fi
say "converged"
