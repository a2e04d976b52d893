# The arm builds under emulation (issue 20), sourced by run.sh: section `arm`
# (EXTERNAL_ONLY=arm runs it alone). Each of dist/stdio-sse-aarch64 (musl) and
# dist/stdio-sse-armv7 (glibc, crt-static) runs under Debian's qemu-user-static, named
# directly (no binfmt handler is registered on these machines), and:
#   - is a static ELF for its architecture (`file`);
#   - answers --version with the version Cargo.toml gives, prints the same --help as
#     the x86_64 build, and refuses an unknown flag and a bad value with exit 2 and the
#     reason (the CLI's promises, as tests/cli.rs checks them natively);
#   - serves the official Python SDK client (PyPI `mcp`, run.sh's PY_PKGS) over
#     Streamable HTTP and over legacy SSE, with a child per session and with one shared
#     child: the real mcp-server-time, which runs natively (only stdio-sse is emulated).
# Uses run.sh's check/pass/fail, PIDS (stopped at exit), ROOT, BIN, PY and TOOLS.

# start_emulated NAME RUNNER BIN ARGS... : like run.sh's start_server, under RUNNER.
start_emulated() {
    local name=$1 runner=$2 bin=$3; shift 3
    local log=$ROOT/.cache/logs/$name.log
    "$runner" "$bin" --port 0 "$@" 2>"$log" &
    PIDS+=($!)
    PORT=""
    for _ in $(seq 1 400); do
        PORT=$(grep -Eo 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' | head -1)
        [ -n "$PORT" ] && return 0
        kill -0 "${PIDS[-1]}" 2>/dev/null || break
        sleep 0.05
    done
    say "stdio-sse ($name) did not start:"; cat "$log"; return 1
}

# stop_last: stops the server start_emulated started last (and waits for it).
stop_last() {
    kill "${PIDS[-1]}" 2>/dev/null
    wait "${PIDS[-1]}" 2>/dev/null
    return 0
}

# arm_cli RUNNER BIN : --version, --help, and two mistakes (each bounded: check runs a
# shell function without its timeout).
arm_cli() {
    local runner=$1 bin=$2 want out rc
    want="stdio-sse $(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)"
    out=$(timeout 20 "$runner" "$bin" --version) || { echo "--version failed"; return 1; }
    [ "$out" = "$want" ] || { echo "--version said '$out', want '$want'"; return 1; }
    out=$(timeout 20 "$runner" "$bin" --help) || { echo "--help failed"; return 1; }
    if [ -x "$BIN" ]; then
        diff <("$BIN" --help) <(printf '%s\n' "$out") >/dev/null \
            || { echo "--help differs from $BIN's"; return 1; }
    fi
    case $out in *"--port "*STDIO_SSE_PORT*) ;; *) echo "--help lacks --port"; return 1 ;; esac
    out=$(timeout 20 "$runner" "$bin" --bogus 2>&1); rc=$?
    [ "$rc" -eq 2 ] && [[ $out == *"unknown option --bogus"* ]] \
        || { echo "--bogus: exit $rc, said: $out"; return 1; }
    out=$(timeout 20 "$runner" "$bin" --keepalive soon 2>&1); rc=$?
    [ "$rc" -eq 2 ] && [[ $out == *"--keepalive"* ]] \
        || { echo "--keepalive soon: exit $rc, said: $out"; return 1; }
    echo "ok: $want, --help as the x86_64 build's, --bogus and --keepalive soon refused with exit 2"
}

arm_builds() {
    local arch runner bin mode kind url want
    if [ ! -x "$ROOT/dist/stdio-sse-aarch64" ] || [ ! -x "$ROOT/dist/stdio-sse-armv7" ]; then
        say "arm: building them (./build.sh cross)"
        "$ROOT/build.sh" cross >"$ROOT/.cache/logs/arm-cross.log" 2>&1 \
            || { fail "arm: ./build.sh cross" "$ROOT/.cache/logs/arm-cross.log"; return 1; }
    fi
    for arch in aarch64 armv7; do
        bin=$ROOT/dist/stdio-sse-$arch
        runner=qemu-aarch64-static; want="ARM aarch64"
        [ "$arch" = armv7 ] && { runner=qemu-arm-static; want="32-bit LSB executable, ARM"; }
        if ! command -v "$runner" >/dev/null; then
            fail "arm ($arch): $runner is missing (Debian package qemu-user-static)"
            continue
        fi
        check "arm ($arch): a static $want ELF" 10 \
            sh -c "file -b '$bin' | grep '$want.*statically linked'"
        check "arm ($arch) under $runner: --version, --help, mistakes exit 2" 60 arm_cli "$runner" "$bin"
        for mode in session shared; do
            if ! start_emulated "arm-$arch-$mode" "$runner" "$bin" --mode "$mode" -- "$TOOLS/venv/bin/mcp-server-time"; then
                fail "arm ($arch, $mode): stdio-sse starts under $runner" "$ROOT/.cache/logs/arm-$arch-$mode.log"
                continue
            fi
            for kind in streamable sse; do
                url=http://127.0.0.1:$PORT/mcp; [ "$kind" = sse ] && url=http://127.0.0.1:$PORT/sse
                check "arm ($arch, --mode $mode) python-sdk $kind: mcp-server-time" 120 \
                    "$PY" tests/external/py_client.py "$kind" "$url" get_current_time '{"timezone":"UTC"}' '"timezone": "UTC"'
            done
            stop_last
        done
    done
}
