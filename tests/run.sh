#!/usr/bin/env bash
# The whole test suite: build the plugin components the tests load, then every test of the
# workspace (unit tests, SDK tests run natively, and the integration tests in tests/ that
# drive the real `sluice` binary over loopback sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash plugins/build.sh
cargo test --workspace
