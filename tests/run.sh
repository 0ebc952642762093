#!/usr/bin/env bash
# The whole test suite: build the plugin components the tests load, build and test the
# plugin template outside the workspace, test the JavaScript plugin helper under Node, then
# every test of the workspace (unit tests, SDK tests run natively, and the integration tests
# in tests/ that drive the real `sluice` binary over loopback sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash plugins/build.sh

# The plugin template, copied out of the repository as a user would: its tests pass and
# it builds to a component, with the SDK found by path and nothing from the workspace.
template="$(mktemp -d)"
trap 'rm -rf "$template"' EXIT
cp -r templates/plugin "$template/blocklist"
sed -i "s#path = \"../../plugin-sdk\"#path = \"$PWD/plugin-sdk\"#" "$template/blocklist/Cargo.toml"
(cd "$template/blocklist" && export CARGO_TARGET_DIR="$OLDPWD/target/template" &&
    cargo test --quiet && cargo build --quiet --release --target wasm32-wasip2)
test -s target/template/wasm32-wasip2/release/my_plugin.wasm

# The JavaScript helper (plugins/api-key-js/sluice.js): undeclared reads throw.
node --test plugins/api-key-js/test/

cargo test --workspace
