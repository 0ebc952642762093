#!/usr/bin/env bash
# The whole benchmark in one command: install the peers (nginx, HAProxy), build the
# binaries with the `dist` profile (release + fat LTO: the build to deploy), run every
# scenario against every target (3 repetitions), print JSON lines and the Markdown
# report, and save both under bench/results/. Extra arguments go to
# `sluice-bench all`, e.g. `bench/run.sh --quick` or `bench/run.sh --targets sluice,nginx`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup.sh
cargo build --profile dist -p sluice -p sluice-bench
exec target/dist/sluice-bench all "$@"
