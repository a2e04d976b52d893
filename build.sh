#!/usr/bin/env bash
# stdio-sse build and test entry point.
#   ./build.sh        static release binaries (musl; glibc crt-static fallback):
#                     dist/stdio-sse, and dist/stdio-sse-tls with in-process TLS
#   ./build.sh test   every test: cargo integration tests, then the external judges
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
    echo target
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
    # External judges: conformance suite, Python and TypeScript SDK clients, real servers.
    set +e
    STDIO_SSE_BIN="$PWD/dist/stdio-sse" bash tests/external/run.sh
    local ext_rc=$?
    set -e
    local ext_passed ext_failed
    ext_passed=$(cat .cache/external-passed 2>/dev/null || echo 0)
    ext_failed=$(cat .cache/external-failed 2>/dev/null || echo 1)
    echo
    echo "cargo tests: ${cargo_passed:-0} passed, ${cargo_failed:-0} failed; external checks: $ext_passed passed, $ext_failed failed"
    echo "$(( ${cargo_passed:-0} + ext_passed )) passed, $(( ${cargo_failed:-0} + ext_failed )) failed"
    [ "$cargo_rc" -eq 0 ] && [ "$ext_rc" -eq 0 ]
}

case "${1:-build}" in
    build) build ;;
    test) run_tests ;;
    bench)
        # The load generator (tests/bench/bench.rs) against dist/stdio-sse; extra
        # arguments go to it (--quick, --rounds N, --seconds S).
        build
        cargo build --release --locked --example bench
        mkdir -p .cache
        target/release/examples/bench --bin dist/stdio-sse "${@:2}" | tee .cache/bench-latest.md ;;
    fuzz)
        # Mutated requests, resets, framing and slow clients with canaries (fuzz), and a
        # misbehaving child SIGKILLed under clients of both transports in both modes
        # (chaos), for SECONDS each; every failure names its seed.
        STDIO_SSE_FUZZ_SKIP=0 STDIO_SSE_FUZZ_SECONDS=${2:-600} \
            cargo test --release --locked --test fuzz --test chaos -- --nocapture ;;
    *) echo "usage: ./build.sh [build|test|bench [--quick]|fuzz [SECONDS]]" >&2; exit 2 ;;
esac
