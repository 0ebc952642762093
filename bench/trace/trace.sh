#!/usr/bin/env bash
# Deterministic counts per WebSocket upgrade through one target, for one client/server
# pair: the proxy's system calls by type (strace -c -f, with their errors), the machine's
# TCP counters (nstat), TIME_WAIT sockets by side (ss), and optionally a loopback capture
# of a few cycles summarised per connection and leg (tcpdump + segments.py).
#
# usage: bench/trace/trace.sh TARGET [PAIR] [N] [C]
#   TARGET  direct, sluice, nginx, haproxy or floor, configured as the bench configures
#           them (`sluice-bench config`; nginx with its master and workers, HAProxy
#           master-worker: every process of the tree is traced)
#   PAIR    bench (default: the bench's own client and backend) or tungstenite
#   N       measured handshake cycles (default 2000), after 200 unmeasured ones
#   C       cycles in flight at a time (default 4)
# Environment: SLUICE (default target/dist/sluice), BENCH (default
# target/dist/sluice-bench), CAPTURE=K to also capture K cycles made one at a time
# (default 0), STRACE=0 to leave out strace (which slows the proxy several-fold, and so
# changes how many events one epoll_wait returns; nstat and ss then see the proxy at speed).
#
# Everything runs in a private network namespace (`unshare --net`, as root), so nstat's
# counters and ss see only this client, proxy and backend: every connection has both its
# ends there, so each segment counts once as sent and once as received. Without
# `unshare` the counters are the whole machine's, with whatever else uses TCP.
set -euo pipefail
if [ -z "${TRACE_NETNS:-}" ] && unshare --net true 2> /dev/null; then
    exec env TRACE_NETNS=1 unshare --net bash "$0" "$@"
fi
if [ -n "${TRACE_NETNS:-}" ]; then
    ip link set lo up
fi
cd "$(dirname "$0")/../.."
TARGET=${1:-sluice}
PAIR=${2:-bench}
N=${3:-2000}
C=${4:-4}
BIN=${SLUICE:-target/dist/sluice}
BENCH=${BENCH:-target/dist/sluice-bench}
CAPTURE=${CAPTURE:-0}
STRACE=${STRACE:-1}
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.2
    rm -rf "$dir"
}
trap cleanup EXIT
export NSTAT_HISTORY=$dir/nstat.history

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 300); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),timeout=1)" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    return 1
}
tree() { # a process and all its descendants
    local p
    echo "$1"
    for p in $(pgrep -P "$1" || true); do tree "$p"; done
}
tw() { ss -Htan state time-wait "$1" | wc -l; }

# The echo backend; it stops when its stdin closes, so hold stdin open.
mkfifo "$dir/hold"
sleep 100000 > "$dir/hold" &
pids+=($!)
"$BENCH" backend --listen 127.0.0.1:0 --ws "$PAIR" < "$dir/hold" > "$dir/backend.out" &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$dir/backend.out" 2>/dev/null && break; sleep 0.1; done
backend=$(sed -n 's/.*listening \(127.0.0.1:[0-9]*\).*/\1/p' "$dir/backend.out" | head -1)
[ -n "$backend" ] || { echo "backend did not start" >&2; exit 1; }
bport=${backend##*:}

proxy=
case "$TARGET" in
direct)
    port=$bport
    ;;
floor)
    port=$(free_port)
    "$BENCH" relay --listen "127.0.0.1:$port" --upstream "$backend" --workers 2 > "$dir/proxy.out" 2>&1 &
    proxy=$!
    ;;
*)
    port=$(free_port)
    mapfile -t cmd < <("$BENCH" config "$TARGET" --backend "$backend" \
        --listen "127.0.0.1:$port" --dir "$dir/proxy" --sluice "$BIN")
    [ "${#cmd[@]}" -gt 0 ] || exit 2
    "${cmd[@]}" > "$dir/proxy.out" 2>&1 &
    proxy=$!
    ;;
esac
[ -n "$proxy" ] && pids+=("$proxy")
wait_port "$port"
sleep 0.5
"$BENCH" drive "127.0.0.1:$port" 200 "$C" --ws "$PAIR"
sleep 0.5

echo "== $TARGET, pair $PAIR: $N cycles, $C at a time (front port $port, backend $bport)"
tw_before=$(ss -Htan state time-wait | wc -l)
tw_front_proxy=$(tw "( sport = :$port )")
tw_front_client=$(tw "( dport = :$port )")
tw_back_proxy=$(tw "( dport = :$bport )")
tw_back_server=$(tw "( sport = :$bport )")
cpu() { # utime + stime ticks of the proxy tree
    local sum=0 p
    for p in $(tree "$proxy"); do
        [ -r "/proc/$p/stat" ] || continue
        sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$sum"
}
if [ -n "$proxy" ] && [ "$STRACE" = 1 ]; then
    args=()
    for p in $(tree "$proxy"); do args+=(-p "$p"); done
    strace -c -f -o "$dir/strace" "${args[@]}" 2> "$dir/strace.err" &
    st=$!
    sleep 1
fi
nstat -n
ticks0=$([ -n "$proxy" ] && cpu || echo 0)
"$BENCH" drive "127.0.0.1:$port" "$N" "$C" --ws "$PAIR"
ticks1=$([ -n "$proxy" ] && cpu || echo 0)
# Late segments (the last closes) settle.
sleep 0.3
nstat -sz TcpActiveOpens TcpPassiveOpens TcpOutSegs TcpInSegs TcpRetransSegs TcpOutRsts \
    TcpEstabResets TcpExtTCPPureAcks TcpExtTCPHPAcks TcpExtDelayedACKs TcpExtTCPAbortOnData \
    TcpExtTCPAbortOnClose TcpExtTCPAbortOnLinger TcpExtTW TcpExtTWRecycled TcpExtTWKilled \
    TcpExtTCPTimeWaitOverflow TcpExtTCPOrigDataSent TcpExtTCPRcvCoalesce TcpExtTCPBacklogCoalesce \
    TcpExtTCPDeferAcceptDrop TcpExtTCPAutoCorking TcpExtTCPWantZeroWindowAdv > "$dir/nstat"
if [ -n "${st:-}" ]; then
    kill -INT "$st"
    wait "$st" || true
fi

echo "-- TCP counters per cycle (every leg; a segment counts once sent and once received)"
awk -v n="$N" 'NR > 1 && $2 != "" { printf "   %-28s %8.3f\n", $1, $2 / n }' "$dir/nstat"
echo "-- TIME_WAIT sockets made per cycle (by the side that holds them)"
per() { python3 -c "print(f'{($1) / $N:.3f}')"; }
if [ "$TARGET" = direct ]; then
    echo "   server:              $(per "$(tw "( sport = :$port )") - $tw_front_proxy")"
else
    echo "   proxy, client leg:   $(per "$(tw "( sport = :$port )") - $tw_front_proxy")"
fi
echo "   client:              $(per "$(tw "( dport = :$port )") - $tw_front_client")"
if [ "$TARGET" != direct ]; then
    echo "   proxy, backend leg:  $(per "$(tw "( dport = :$bport )") - $tw_back_proxy")"
    echo "   backend:             $(per "$(tw "( sport = :$bport )") - $tw_back_server")"
fi
echo "   (all TIME_WAIT sockets on the machine: $tw_before before, $(ss -Htan state time-wait | wc -l) after)"
if [ -n "$proxy" ]; then
    hz=$(getconf CLK_TCK)
    echo "-- proxy CPU: $(python3 -c "print(f'{($ticks1 - $ticks0) / $hz * 1e6 / $N:.1f}')") µs per cycle (ticks of 1/$hz s; slowed by strace when it ran)"
fi
if [ -s "$dir/strace" ]; then
    echo "-- proxy system calls per cycle (strace -c -f; errors are mostly EAGAIN)"
    awk -v n="$N" '
        $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {
            name = $NF; calls = $4; errors = (NF == 6) ? $5 : 0
            printf "   %-16s %7.3f", name, calls / n
            if (errors > 0) printf "   (errors %.3f)", errors / n
            printf "\n"
        }
        $NF == "total" {
            printf "   %-16s %7.3f", "total", $(NF - 2) / n
            if (NF == 6) printf "   (errors %.3f)", $(NF - 1) / n
            printf "\n"
        }
    ' "$dir/strace"
fi

if [ "$CAPTURE" -gt 0 ]; then
    filter="tcp port $port"
    [ "$TARGET" != direct ] && filter="$filter or tcp port $bport"
    tcpdump -i lo -nn -s 96 --immediate-mode -U -w "$dir/cap.pcap" "$filter" 2> "$dir/tcpdump.err" &
    td=$!
    for _ in $(seq 1 50); do grep -q listening "$dir/tcpdump.err" && break; sleep 0.1; done
    "$BENCH" drive "127.0.0.1:$port" "$CAPTURE" 1 --ws "$PAIR"
    sleep 0.5
    kill -INT "$td"
    wait "$td" || true
    echo "-- capture of $CAPTURE cycles made one at a time ($(grep -h 'captured\|dropped by kernel' "$dir/tcpdump.err" | tr '\n' ' '))"
    if [ "$TARGET" = direct ]; then
        python3 bench/trace/segments.py "$dir/cap.pcap" "$port"
    else
        python3 bench/trace/segments.py "$dir/cap.pcap" "$port" "$bport"
    fi
fi
