#!/usr/bin/env bash
# stdio-sse build and test entry point.
#   ./build.sh        static release binaries (musl; glibc crt-static fallback):
#                     dist/stdio-sse, and dist/stdio-sse-tls with in-process TLS
#   ./build.sh test   every test: cargo integration tests (and again against the arm
#                     builds under qemu-user), then the external judges
#   ./build.sh cross  static builds for arm (README: Downloads): dist/stdio-sse-aarch64
#                     (musl) and dist/stdio-sse-armv7 (glibc, crt-static)
#   ./build.sh tiny   the size-optimised builds on a pinned nightly (README: The tiny
#                     build): dist/stdio-sse-tiny, dist/stdio-sse-aarch64-tiny
#   ./build.sh bench  the benchmark (BENCHMARKS.md says what it measures)
#   ./build.sh fuzz [SECONDS]
#                     the long fuzz and chaos runs (tests/fuzz.rs, tests/chaos.rs) of
#                     the release build, SECONDS each (default 600; `cargo test` runs
#                     them for 45 s). Each prints its seed first; STDIO_SSE_FUZZ_SEED=N
#                     replays it (as far as thread timing allows)
set -euo pipefail
cd "$(dirname "$0")"

MUSL=x86_64-unknown-linux-musl

# build_one OUT [CARGO ARGS...]: one static release binary into dist/OUT.
build_one() {
    local out=$1; shift
    if rustup target list --installed 2>/dev/null | grep -qx "$MUSL" || rustup target add "$MUSL" >/dev/null 2>&1; then
        # Non-PIE: a plain static executable ("statically linked"), a little smaller too.
        # ring (TLS build) compiles C and assembly: the host gcc does for musl objects.
        CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-gcc} \
        RUSTFLAGS="-C relocation-model=static -C target-feature=+crt-static" \
            cargo build --release --locked --target "$MUSL" "$@"
        install -m 755 "$(target_dir "$@")/$MUSL/release/stdio-sse" "dist/$out.new" && mv -f "dist/$out.new" "dist/$out"
    else
        echo "build: the musl target cannot be installed here; building a static glibc binary (crt-static) instead"
        RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu "$@"
        install -m 755 "$(target_dir "$@")/x86_64-unknown-linux-gnu/release/stdio-sse" "dist/$out.new" && mv -f "dist/$out.new" "dist/$out"
    fi
}

target_dir() {
    local prev=""
    for a in "$@"; do [ "$prev" = --target-dir ] && { echo "$a"; return; }; prev=$a; done
    echo "${CARGO_TARGET_DIR:-target}"
}

build() {
    mkdir -p dist
    build_one stdio-sse
    # TLS in-process is a separate binary: rustls costs ~280 KB the default one need not carry.
    build_one stdio-sse-tls --features tls --target-dir target/tls
    echo "build: dist/stdio-sse is $(stat -c %s dist/stdio-sse) bytes"
    echo "build: dist/stdio-sse-tls is $(stat -c %s dist/stdio-sse-tls) bytes"
    command -v file >/dev/null && file dist/stdio-sse dist/stdio-sse-tls || true
}

# need_debs PACKAGE... : installs the Debian packages that are not installed yet.
need_debs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "build: installing Debian packages: ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null \
        || { echo "build: cannot install ${missing[*]} (apt-get needs root and Debian's mirrors)" >&2; return 1; }
}

# install_static BUILT OUT: BUILT into dist/OUT, which `file` must call statically linked.
# (These functions return on each failure themselves: callers test them with ||, where
# set -e does not reach.)
install_static() {
    install -m 755 "$1" "dist/$2.new" && mv -f "dist/$2.new" "dist/$2" || return 1
    need_debs file || return 1
    file "dist/$2"
    file "dist/$2" | grep -q "statically linked" || { echo "build: dist/$2 is not statically linked" >&2; return 1; }
    echo "build: dist/$2 is $(stat -c %s "dist/$2") bytes"
}

# Other architectures (README: Downloads). aarch64 is musl like the x86_64 build; rustup's
# target brings musl's crt objects and libc, and rust-lld links them: no cross compiler.
# armv7: rustup offers no musl std for it here (its download is missing), so rather than
# a nightly build of std over a C library we would have to bring ourselves, a static
# glibc binary on stable, the same profile as the others, linked by Debian's cross gcc.
AARCH64=aarch64-unknown-linux-musl
ARMV7=armv7-unknown-linux-gnueabihf

cross() {
    mkdir -p dist
    local t
    for t in "$AARCH64" "$ARMV7"; do
        rustup target list --installed 2>/dev/null | grep -qx "$t" || rustup target add "$t" >/dev/null 2>&1 \
            || { echo "build: rustup cannot install the $t target" >&2; return 1; }
    done
    need_debs gcc-arm-linux-gnueabihf libc6-dev-armhf-cross || return 1
    local td=${CARGO_TARGET_DIR:-target}
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld \
    RUSTFLAGS="-C relocation-model=static -C target-feature=+crt-static" \
        cargo build --release --locked --target "$AARCH64" || return 1
    install_static "$td/$AARCH64/release/stdio-sse" stdio-sse-aarch64 || return 1
    CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc \
    RUSTFLAGS="-C relocation-model=static -C target-feature=+crt-static" \
        cargo build --release --locked --target "$ARMV7" || return 1
    install_static "$td/$ARMV7/release/stdio-sse" stdio-sse-armv7
}

# The tiny build (README: The tiny build): std rebuilt for size, panics abort at once,
# opt-level "z". Only here, on a pinned nightly: the default build stays on stable.
# On this nightly, `panic_immediate_abort` is the unstable `-Cpanic=immediate-abort`
# (the std feature of that name only says to use it). std's own deprecation of
# fetch_update (renamed try_update, not yet stable) is allowed: the code must build on
# stable first.
NIGHTLY=nightly-2026-10-01
TINY_LIMIT=1000000  # bytes: "at most 1.0 MB", in decimal megabytes

tiny_build() {
    mkdir -p dist
    local have
    have=$(rustup "+$NIGHTLY" component list --installed 2>/dev/null | tr '\n' ' ')
    if [[ $have != *rust-src* || $have != *"rust-std-$MUSL"* || $have != *"rust-std-$AARCH64"* ]] \
        && ! rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
            --target "$MUSL" --target "$AARCH64" >/dev/null 2>&1; then
        echo "build: the pinned $NIGHTLY (with rust-src and the $MUSL and $AARCH64 targets) cannot be installed here: no tiny build" >&2
        return 1
    fi
    local td=${CARGO_TARGET_DIR:-target}/tiny t out f
    for t in "$MUSL" "$AARCH64"; do
        # rust-lld for both (8 KB less than the host's ld on x86_64).
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld \
        RUSTFLAGS="-Zunstable-options -Cpanic=immediate-abort -C relocation-model=static -C target-feature=+crt-static -A deprecated" \
            cargo "+$NIGHTLY" build --release --locked --target "$t" --target-dir "$td" \
                --no-default-features -Z build-std=std,panic_abort -Z build-std-features=optimize_for_size \
                --config 'profile.release.opt-level="z"' --config 'profile.release.panic="abort"' \
            || return 1
        out=stdio-sse-tiny; [ "$t" = "$AARCH64" ] && out=stdio-sse-aarch64-tiny
        install_static "$td/$t/release/stdio-sse" "$out" || return 1
    done
    for f in dist/stdio-sse-tiny dist/stdio-sse-aarch64-tiny; do
        [ "$(stat -c %s "$f")" -le "$TINY_LIMIT" ] || { echo "build: $f is over $TINY_LIMIT bytes" >&2; return 1; }
    done
}

# emulated_tests LOG BIN RUNNER FILE... : integration test files against another build
# of stdio-sse (tests/common: STDIO_SSE_TEST_BIN, STDIO_SSE_TEST_RUNNER), output to LOG.
emulated_tests() {
    local log=$1 bin=$2 runner=$3; shift 3
    local args=() f
    for f in "$@"; do args+=(--test "$f"); done
    echo "== cargo tests ${*} against $bin${runner:+ under $runner}"
    STDIO_SSE_TEST_BIN="$bin" STDIO_SSE_TEST_RUNNER="$runner" \
        cargo test --locked --no-fail-fast "${args[@]}" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}

# The tiny build's rows (BENCHMARKS.md: "The tiny build"): the same load generator on
# startup, the Streamable HTTP loads (c=1 p50, c=64) and the callgrind count, then each
# binary's size. Where the pinned nightly cannot be had, says so and leaves them out.
bench_tiny() {
    if ! { cross && tiny_build; }; then
        echo "bench: no tiny (or arm) build here: the tiny rows and the size table are left out"
        return 0
    fi
    "$(target_dir)/release/examples/bench" --bin dist/stdio-sse-tiny --only startup,streamable,callgrind "$@" \
        | tee .cache/bench-tiny.md
    local f
    {
        echo
        echo "| binary | bytes |"
        echo "|---|---|"
        for f in stdio-sse stdio-sse-tiny stdio-sse-aarch64 stdio-sse-aarch64-tiny stdio-sse-armv7; do
            echo "| dist/$f | $(stat -c %s "dist/$f") |"
        done
    } | tee -a .cache/bench-tiny.md
}

tiny() {
    tiny_build || exit 1
    # Proof that they serve: a session of each transport (Streamable HTTP, shared mode,
    # refusals) against both.
    local log rc=0
    log=$(mktemp)
    emulated_tests "$log" dist/stdio-sse-tiny "" streamable shared bad_input || rc=1
    need_debs qemu-user-static || exit 1
    emulated_tests "$log" dist/stdio-sse-aarch64-tiny qemu-aarch64-static streamable shared bad_input || rc=1
    echo "tiny builds: $(test_counts "$log")"
    rm -f "$log"
    return $rc
}

# test_counts LOG: "N passed, M failed" over cargo's test result lines.
test_counts() {
    local passed failed
    passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$1" | grep -Eo '[0-9]+' | awk "{s+=\$1} END {print s+0}")
    failed=$(grep -Eo '[0-9]+ failed;' "$1" | grep -Eo '[0-9]+' | awk "{s+=\$1} END {print s+0}")
    echo "$passed passed, $failed failed"
}

# The test files run again against the arm builds under qemu-user (no binfmt handler is
# needed: the emulator is named). Children (python3 fixtures) run natively.
EMULATED_TESTS=${EMULATED_TESTS:-streamable legacy shared process bad_input cli modern resume}

run_tests() {
    build
    local log
    log=$(mktemp)
    # Integration tests: the real binary over real sockets with real child processes.
    set +e
    cargo test --locked --no-fail-fast 2>&1 | tee "$log"
    local cargo_rc=${PIPESTATUS[0]}
    set -e
    local cargo_passed cargo_failed
    cargo_passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" | grep -Eo '[0-9]+' | awk "{s+=\$1} END {print s+0}")
    cargo_failed=$(grep -Eo '[0-9]+ failed;' "$log" | grep -Eo '[0-9]+' | awk "{s+=\$1} END {print s+0}")
    rm -f "$log"
    # The arm builds under emulation: the integration tests against each.
    local emu_log emu_rc=0
    emu_log=$(mktemp)
    { need_debs qemu-user-static && cross; } || emu_rc=1
    if [ "$emu_rc" -eq 0 ]; then
        # shellcheck disable=SC2086
        emulated_tests "$emu_log" dist/stdio-sse-aarch64 qemu-aarch64-static $EMULATED_TESTS || emu_rc=1
        # shellcheck disable=SC2086
        emulated_tests "$emu_log" dist/stdio-sse-armv7 qemu-arm-static $EMULATED_TESTS || emu_rc=1
    else
        echo "1 failed; the arm builds" >>"$emu_log"
    fi
    local emu_passed emu_failed
    read -r emu_passed _ emu_failed _ <<<"$(test_counts "$emu_log")"
    rm -f "$emu_log"
    # External judges: conformance suite, Python and TypeScript SDK clients, real servers.
    set +e
    STDIO_SSE_BIN="$PWD/dist/stdio-sse" bash tests/external/run.sh
    local ext_rc=$?
    set -e
    local ext_passed ext_failed
    ext_passed=$(cat .cache/external-passed 2>/dev/null || echo 0)
    ext_failed=$(cat .cache/external-failed 2>/dev/null || echo 1)
    echo
    echo "cargo tests: ${cargo_passed:-0} passed, ${cargo_failed:-0} failed; emulated (aarch64, armv7 under qemu): $emu_passed passed, $emu_failed failed; external checks: $ext_passed passed, $ext_failed failed"
    echo "$(( ${cargo_passed:-0} + emu_passed + ext_passed )) passed, $(( ${cargo_failed:-0} + emu_failed + ext_failed )) failed"
    [ "$cargo_rc" -eq 0 ] && [ "$emu_rc" -eq 0 ] && [ "$ext_rc" -eq 0 ]
}

case "${1:-build}" in
    build) build ;;
    cross) cross ;;
    tiny) tiny ;;
    test) run_tests ;;
    bench)
        # The load generator (tests/bench/bench.rs) against dist/stdio-sse; extra
        # arguments go to it (--quick, --rounds N, --seconds S).
        build
        cargo build --release --locked --example bench
        mkdir -p .cache
        "$(target_dir)/release/examples/bench" --bin dist/stdio-sse "${@:2}" | tee .cache/bench-latest.md
        bench_tiny "${@:2}" ;;
    fuzz)
        # Mutated requests, resets, framing and slow clients with canaries (fuzz), and a
        # misbehaving child SIGKILLed under clients of both transports in both modes
        # (chaos), for SECONDS each; every failure names its seed.
        STDIO_SSE_FUZZ_SKIP=0 STDIO_SSE_FUZZ_SECONDS=${2:-600} \
            cargo test --release --locked --test fuzz --test chaos -- --nocapture ;;
    *) echo "usage: ./build.sh [build|cross|tiny|test|bench [--quick]|fuzz [SECONDS]]" >&2; exit 2 ;;
esac
