#!/usr/bin/env bash
# Counts the user-space instructions Sluice spends per WebSocket upgrade, under valgrind's
# callgrind: the same total every run for the same binary and inputs, whatever else the
# machine is doing (CPU-time A/B on a shared 2-core VM swings by +-10 %).
#
# usage: bench/callgrind/cg.sh [BIN] [OUT] [N]
#   BIN  the sluice binary (default target/release/sluice)
#   OUT  callgrind output file (default /tmp/sluice.callgrind)
#   N    measured upgrades (default 2000), after 200 unmeasured warm-up ones
# Then: callgrind_annotate --inclusive=yes OUT | head -60
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/sluice}
OUT=${2:-/tmp/sluice.callgrind}
N=${3:-2000}
DRIVE=bench/callgrind/drive.py
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 300); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),timeout=1)" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    return 1
}

# The bench's echo backend; it stops when its stdin closes, so hold stdin open.
mkfifo "$dir/hold"
sleep 100000 > "$dir/hold" &
pids+=($!)
target/release/sluice-bench backend --listen 127.0.0.1:0 < "$dir/hold" > "$dir/backend.out" &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$dir/backend.out" 2>/dev/null && break; sleep 0.1; done
backend=$(sed -n 's/.*listening \(127.0.0.1:[0-9]*\).*/\1/p' "$dir/backend.out" | head -1)
[ -n "$backend" ] || { echo "backend did not start" >&2; exit 1; }

port=$(free_port)
cat > "$dir/sluice.toml" <<TOML
# The bench's own Sluice config (bench/src/targets.rs), no plugins.
[log]
level = "warn"

[runtime]
workers = 2

[listeners.bench]
bind = "127.0.0.1:$port"
max_connections = 20000

[upstreams.echo]
servers = ["$backend"]

[[routes]]
path_prefix = "/"
upstream = "echo"
TOML

valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" \
    --log-file="$dir/valgrind.log" "$BIN" run "$dir/sluice.toml" > "$dir/sluice.out" 2>&1 &
vg=$!
pids+=($vg)
wait_port "$port"
python3 "$DRIVE" "127.0.0.1:$port" 200 4
callgrind_control -i on "$vg" > /dev/null
python3 "$DRIVE" "127.0.0.1:$port" "$N" 4
callgrind_control -i off "$vg" > /dev/null
kill -TERM "$vg"
wait "$vg" || true
total=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$dir/valgrind.log" | tail -1)
[ -n "$total" ] || { cat "$dir/valgrind.log" >&2; exit 1; }
echo "instructions: $total for $N upgrades = $((total / N)) per upgrade ($OUT)"
