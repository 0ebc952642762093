#!/usr/bin/env bash
# Build every Sluice plugin to a WebAssembly component.
#
#   plugins/build.sh            # from anywhere
#
# Output (fixed): target/plugins/NAME.wasm under the workspace root, for
#   jwt-auth origin-allowlist tenant-router sticky-key hostile   (Rust, wasm32-wasip2)
#   hostile-deny, hostile-floor                                   (the fixture's `deny` and `floor` builds)
#   api-key-js                                                     (JavaScript, componentize-js)
#   path-guard-py                                                  (Python, componentize-py)
#
# Needs: rustup (adds the wasm32-wasip2 target if missing), Node.js >= 18 and
# npm (installs the pinned componentize-js from plugins/api-key-js/package-lock.json
# into target/plugin-toolchain/js), python3 with pip (installs the pinned
# componentize-py into target/plugin-toolchain/py). No wasm-tools needed: cargo emits
# components directly for wasm32-wasip2.
#
# Idempotent and quick on re-run: cargo rebuilds only what changed, the JS
# component is rebuilt only when its sources, lock file or the WIT change,
# and outputs are rewritten only when their bytes change.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/target/plugins"
rust_plugins=(jwt-auth origin-allowlist tenant-router sticky-key hostile)
mkdir -p "$out"

log() { printf 'plugins/build.sh: %s\n' "$*" >&2; }

# Copy only when the bytes differ, so unchanged outputs keep their mtime.
install_if_changed() {
  if ! cmp -s "$1" "$2"; then
    cp "$1" "$2.tmp" && mv "$2.tmp" "$2"
    log "wrote ${2#"$root"/}"
  fi
}

# --- Rust plugins -------------------------------------------------------------
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  log "adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi
packages=()
for p in "${rust_plugins[@]}"; do packages+=(-p "$p"); done
(cd "$root" && cargo build --quiet --profile plugin --target wasm32-wasip2 "${packages[@]}")
for p in "${rust_plugins[@]}"; do
  install_if_changed "$root/target/wasm32-wasip2/plugin/${p//-/_}.wasm" "$out/$p.wasm"
done
# The fixture's `deny` build: other code for the same config (tests/reload.rs).
(cd "$root" && cargo build --quiet --profile plugin --target wasm32-wasip2 -p hostile --features deny)
install_if_changed "$root/target/wasm32-wasip2/plugin/hostile.wasm" "$out/hostile-deny.wasm"
# The `floor` build, without `on_close`: the bench's plugins that do nothing.
(cd "$root" && cargo build --quiet --profile plugin --target wasm32-wasip2 -p hostile --features floor)
install_if_changed "$root/target/wasm32-wasip2/plugin/hostile.wasm" "$out/hostile-floor.wasm"

# --- Python plugin (componentize-py) ---------------------------------------------
# componentize-py, pinned, from PyPI into the target dir (no system-wide install);
# rebuilt only when the sources, the pin or the WIT change.
py_version="0.25.1"
py_src="$root/plugins/path-guard-py"
py_tool="$root/target/plugin-toolchain/py"
py_out="$out/path-guard-py.wasm"
command -v python3 >/dev/null || {
  log "python3 (with pip) is required for the Python plugin (apt-get install python3-pip)"
  exit 1
}
if [[ "$(cat "$py_tool/.version" 2>/dev/null)" != "$py_version" ]]; then
  log "installing componentize-py $py_version into ${py_tool#"$root"/}"
  rm -rf "$py_tool"
  # A target directory of its own: nothing is installed into the system Python.
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
    --target "$py_tool" \
    "componentize-py==$py_version"
  echo "$py_version" >"$py_tool/.version"
fi
py_hash="$(cat "$py_src"/*.py "$root"/plugin-sdk/wit/*.wit "$py_tool/.version" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$py_out" || "$(cat "$py_tool/.built" 2>/dev/null)" != "$py_hash" ]]; then
  log "componentizing path-guard-py"
  PYTHONPATH="$py_tool" "$py_tool/bin/componentize-py" -d "$root/plugin-sdk/wit" -w plugin \
    componentize app -p "$py_src" -o "$py_tool/path-guard-py.wasm" >/dev/null
  install_if_changed "$py_tool/path-guard-py.wasm" "$py_out"
  echo "$py_hash" >"$py_tool/.built"
fi

# --- JavaScript plugin (componentize-js) ----------------------------------------
js_src="$root/plugins/api-key-js"
js_tool="$root/target/plugin-toolchain/js"
js_out="$out/api-key-js.wasm"
command -v node >/dev/null && command -v npm >/dev/null || {
  log "node and npm are required for the JavaScript plugin (apt-get install nodejs npm)"
  exit 1
}
inputs_hash="$(cat "$js_src"/package.json "$js_src"/package-lock.json "$js_src"/build.mjs \
  "$js_src"/plugin.js "$js_src"/sluice.js "$root"/plugin-sdk/wit/*.wit | sha256sum | cut -d' ' -f1)"
if [[ -f "$js_out" && "$(cat "$js_tool/.built" 2>/dev/null)" == "$inputs_hash" ]]; then
  exit 0
fi
mkdir -p "$js_tool"
if ! cmp -s "$js_src/package-lock.json" "$js_tool/package-lock.json" \
  || [[ ! -d "$js_tool/node_modules/@bytecodealliance/componentize-js" ]]; then
  log "installing componentize-js into ${js_tool#"$root"/}"
  cp "$js_src/package.json" "$js_src/package-lock.json" "$js_tool/"
  (cd "$js_tool" && npm ci --no-audit --no-fund --loglevel=error)
fi
# Node resolves packages next to the importing file, so the build script and
# the plugin source run from the toolchain directory.
cp "$js_src/build.mjs" "$js_src/plugin.js" "$js_src/sluice.js" "$js_tool/"
log "componentizing api-key-js (takes a minute)"
(cd "$js_tool" && node build.mjs "$root/plugin-sdk/wit" "$js_tool/api-key-js.wasm")
install_if_changed "$js_tool/api-key-js.wasm" "$js_out"
echo "$inputs_hash" >"$js_tool/.built"
