#!/usr/bin/env bash
# Builds the Extism echo plugin into target/plugins/extism-echo.wasm (a core
# module: Extism plugins are not components). Uses a rustup wasm target when
# installed, else Debian's rustc-web with -Zbuild-std, like plugins/build.sh
# (run that first on a fresh machine: it installs the Debian toolchain).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target_dir="$root/target/wasm-extism"
out="$root/target/plugins"
mkdir -p "$out"
if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    (cd "$here" && cargo build --quiet --release --target wasm32-unknown-unknown --target-dir "$target_dir")
else
    (cd "$here" && env -u RUSTUP_TOOLCHAIN -u RUSTC -u RUSTC_WRAPPER PATH="/usr/bin:$PATH" RUSTC_BOOTSTRAP=1 \
        /usr/bin/cargo build --quiet --release -Zbuild-std=std,panic_abort \
        --target wasm32-unknown-unknown --target-dir "$target_dir")
fi
cp "$target_dir/wasm32-unknown-unknown/release/extism_echo.wasm" "$out/extism-echo.wasm"
echo "built $out/extism-echo.wasm"
