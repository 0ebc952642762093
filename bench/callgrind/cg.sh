#!/usr/bin/env bash
# Counts the user-space instructions a proxy spends per WebSocket upgrade, under valgrind's
# callgrind: the same total every run for the same binary and inputs, whatever else the
# machine is doing (CPU-time A/B on a shared 2-core VM swings by +-10 %). Kernel time is
# not counted: this measures only the part a proxy's own code controls.
#
# usage: bench/callgrind/cg.sh [TARGET] [BIN] [OUT] [N]
#   TARGET  sluice (default), nginx or haproxy, configured as the bench configures them
#           (`sluice-bench config`, from bench/src/targets.rs) except that nginx runs
#           without its master process and HAProxy without master-worker; or a plugin
#           target (sluice-1p, sluice-4p, sluice-4p-called, sluice-4p-floor), whose
#           upgrades carry what its chain admits, as in `run` (plugins from target/plugins,
#           or PLUGINS=DIR)
#   BIN     the sluice binary (default target/dist/sluice; ignored for the peers)
#   OUT     callgrind output file (default /tmp/TARGET.callgrind)
#   N       measured upgrades (default 2000), after 200 unmeasured warm-up ones
# CG_OPTS in the environment adds valgrind options (e.g. --dump-instr=yes).
# CONC=C in the environment makes the measured upgrades C at a time (default 4; 1 makes
# every event of an upgrade wake the proxy on its own).
# PAIR=tungstenite in the environment drives the upgrades with tokio-tungstenite's client
# (`sluice-bench drive --ws tungstenite`) against its echo server (the
# handshake-tungstenite scenario's pair) instead of drive.py and the bench's backend.
# ECHO=SIZE in the environment counts echo round trips instead of upgrades: N round trips
# of a masked SIZE-byte frame over CONC upgraded connections (drive_echo.py, bench pair
# only), the per-message cost of the tunnel.
# Then: callgrind_annotate --inclusive=yes OUT | head -60
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${1:-sluice}
BIN=${2:-target/dist/sluice}
OUT=${3:-/tmp/$TARGET.callgrind}
N=${4:-2000}
PAIR=${PAIR:-bench}
CONC=${CONC:-4}
ECHO=${ECHO:-}
drive() { # ADDR N C
    if [ "$PAIR" = bench ]; then
        if [ "${TARGET#sluice-}" != "$TARGET" ]; then
            target/dist/sluice-bench drive "$@" --target "$TARGET"
        else
            python3 bench/callgrind/drive.py "$@"
        fi
    else
        target/dist/sluice-bench drive "$@" --ws "$PAIR"
    fi
}
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
target/dist/sluice-bench backend --listen 127.0.0.1:0 --ws "$PAIR" < "$dir/hold" > "$dir/backend.out" &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$dir/backend.out" 2>/dev/null && break; sleep 0.1; done
backend=$(sed -n 's/.*listening \(127.0.0.1:[0-9]*\).*/\1/p' "$dir/backend.out" | head -1)
[ -n "$backend" ] || { echo "backend did not start" >&2; exit 1; }

port=$(free_port)
# The bench's own config and command line for the target (bench/src/targets.rs).
mapfile -t cmd < <(target/dist/sluice-bench config "$TARGET" --backend "$backend" \
    --listen "127.0.0.1:$port" --dir "$dir/proxy" --sluice "$BIN" --single-process \
    --plugins "${PLUGINS:-target/plugins}")
[ "${#cmd[@]}" -gt 0 ] || exit 2

valgrind --tool=callgrind --instr-atstart=no ${CG_OPTS:-} --callgrind-out-file="$OUT" \
    --log-file="$dir/valgrind.log" "${cmd[@]}" > "$dir/proxy.out" 2>&1 &
vg=$!
pids+=($vg)
wait_port "$port"
drive "127.0.0.1:$port" 200 4
# callgrind_control's request is seen only when the program runs: a proxy asleep in
# epoll_wait (nginx; HAProxy) is woken by single upgrades until it is. Those few, at most
# partly counted, are reported.
wakes=0
toggle() {
    callgrind_control -i "$1" "$vg" > /dev/null &
    local c=$!
    for _ in $(seq 1 50); do
        sleep 0.2
        kill -0 "$c" 2>/dev/null || break
        drive "127.0.0.1:$port" 1 1
        wakes=$((wakes + 1))
    done
    wait "$c"
}
toggle on
if [ -n "$ECHO" ]; then
    python3 bench/callgrind/drive_echo.py "127.0.0.1:$port" "$N" "$CONC" "$ECHO"
else
    drive "127.0.0.1:$port" "$N" "$CONC"
fi
toggle off
kill -TERM "$vg"
wait "$vg" || true
total=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$dir/valgrind.log" | tail -1)
[ -n "$total" ] || { cat "$dir/valgrind.log" >&2; exit 1; }
if [ -n "$ECHO" ]; then
    echo "$TARGET ($ECHO B echo, $CONC connections) instructions: $total for $N round trips = $((total / N)) per round trip (+ $CONC upgrades; $OUT; $wakes wake-up upgrades)"
else
    echo "$TARGET ($PAIR pair, $CONC at a time) instructions: $total for $N upgrades = $((total / N)) per upgrade ($OUT; $wakes wake-up upgrades)"
fi
