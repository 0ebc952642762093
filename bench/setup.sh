#!/usr/bin/env bash
# Installs the peers the benchmark compares against (Debian's nginx and HAProxy), the
# Redis server the `sluice-limits-redis` target shares limits through, and the profiler. Idempotent: does nothing when everything is already installed. Never enables or
# starts the packages' system services: the benchmark runs its own instances on loopback.
set -euo pipefail

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [[ "${SLUICE_BENCH_PERF:-1}" == 1 ]] && ! command -v perf >/dev/null 2>&1; then
    need+=(linux-perf)
fi
if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d exit 101 keeps dpkg from starting the packages' services during install.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    trap '[[ $created_policy == 1 ]] && rm -f "$policy"' EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
nginx -v 2>&1
haproxy -v 2>&1 | head -n 1
redis-server --version
