#!/usr/bin/env bash
# Builds every plugin in plugins/ from source into a component at
# target/plugins/<name>.wasm (and the echo core module at
# target/plugins/core/echo.wasm, used by tests of malformed input).
#
# Rust guests: if rustup has the wasm targets installed they are used;
# otherwise Debian's rustc-web toolchain is used with -Zbuild-std (installed
# with apt-get when missing and running as root). See ../shared/TOOLCHAIN.md.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/plugins"
wasm_target_dir="$root/target/wasm"
mkdir -p "$out/core"

log() { printf 'plugins: %s\n' "$*" >&2; }

debian_packages=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22 wasi-libc)

have_rustup_target() {
    command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx "$1"
}

ensure_debian_toolchain() {
    if [ -x /usr/bin/cargo ] && dpkg -s rust-web-src lld-22 wasi-libc >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        log "no rustup wasm target and no Debian rustc-web; install: apt-get install ${debian_packages[*]}"
        exit 1
    fi
    log "installing Debian's wasm-capable Rust toolchain"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debian_packages[@]}" >/dev/null
}

# Builds the listed packages for one target; prints nothing, leaves core
# modules in $wasm_target_dir/<target>/release/<name>.wasm.
cargo_wasm() {
    local target=$1; shift
    local pkgs=()
    for p in "$@"; do pkgs+=(-p "$p"); done
    if have_rustup_target "$target"; then
        (cd "$root/plugins" && cargo build --quiet --release --target "$target" \
            --target-dir "$wasm_target_dir" "${pkgs[@]}")
    else
        ensure_debian_toolchain
        local rustflags=""
        if [ "$target" = wasm32-wasip1 ]; then
            rustflags="-L /usr/lib/wasm32-wasi -C link-self-contained=no"
        fi
        # rustup's shims come first on PATH; Debian's cargo must find Debian's rustc.
        (cd "$root/plugins" && env -u RUSTUP_TOOLCHAIN -u RUSTC -u RUSTC_WRAPPER \
            PATH="/usr/bin:$PATH" RUSTC_BOOTSTRAP=1 RUSTFLAGS="$rustflags" \
            /usr/bin/cargo build --quiet --release -Zbuild-std=std,panic_abort \
            --target "$target" --target-dir "$wasm_target_dir" "${pkgs[@]}")
    fi
}

# Plugins declare a non-default target in [package.metadata.orch].
unknown=() wasip1=()
for manifest in "$root"/plugins/*/Cargo.toml; do
    dir=$(dirname "$manifest"); name=$(basename "$dir")
    if grep -q '^target = "wasm32-wasip1"' "$manifest"; then wasip1+=("$name"); else unknown+=("$name"); fi
done

log "building the componentize tool"
(cd "$root" && cargo build --quiet --release -p orch-componentize)
componentize="$root/target/release/orch-componentize"

start=$(date +%s)
log "building ${unknown[*]} for wasm32-unknown-unknown"
cargo_wasm wasm32-unknown-unknown "${unknown[@]}"
if [ ${#wasip1[@]} -gt 0 ]; then
    log "building ${wasip1[*]} for wasm32-wasip1"
    cargo_wasm wasm32-wasip1 "${wasip1[@]}"
fi

for name in "${unknown[@]}" "${wasip1[@]}"; do
    target=wasm32-unknown-unknown
    for w in "${wasip1[@]}"; do [ "$w" = "$name" ] && target=wasm32-wasip1; done
    core="$wasm_target_dir/$target/release/${name//-/_}.wasm"
    "$componentize" "$core" "$out/$name.wasm"
done
cp "$wasm_target_dir/wasm32-unknown-unknown/release/echo.wasm" "$out/core/echo.wasm"
log "built $(ls "$out"/*.wasm | wc -l) components into target/plugins in $(( $(date +%s) - start ))s"
