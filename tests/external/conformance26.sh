# shellcheck shell=bash
# Sourced by tests/external/run.sh (or by hand). Defines
#
#   conformance26 URL LABEL [EXPECTED_FAILURES_FILE]
#
# which runs every scored server scenario of `conformance --requirements 2026-07-28`
# (@modelcontextprotocol/conformance 0.2.0-alpha.12) against URL, one scenario at a time,
# each at the 2026-07-28 wire exactly as the requirements run does it
# (`--scenario S --spec-version 2026-07-28 --force`), under `timeout`, and judges each
# scenario's checks.json itself:
#   - a scenario passes when no check is FAILURE or WARNING (a WARNING counts as a failure,
#     as in the 0.1.16 runs; the suite's own baseline logic does the same);
#   - EXPECTED_FAILURES_FILE is the suite's YAML baseline format:
#         server:
#           - scenario-name              # reason (shown in the PASS line)
#           - scenario-name:check-id     # reason: only this check may fail
#     A listed scenario/check that fails is a pass, labelled "(expected: reason)"; one that
#     no longer fails is a FAIL ("stale"), so the list stays honest. An entry naming a
#     scenario outside the 2026-07-28 set is a FAIL too (typo guard).
#   - no checks.json (timeout, crash) is always a FAIL.
# The caller sets:
#   NODE22  path to a Node >= 22 binary
#   CONF26  path to the 0.2.0-alpha.12 cli (node_modules/@modelcontextprotocol/conformance/dist/index.js)
# and defines `pass NAME` and `fail NAME [LOGFILE]`. Optional: CONF26_TIMEOUT (seconds per
# scenario, default 60), CONF26_LOGS (log directory, default $ROOT/.cache/logs or a temp dir),
# CONF26_PY (python3 used to read checks.json, default python3).

conformance26() {
    local url=$1 label=$2 xfail=${3:-}
    local logs=${CONF26_LOGS:-${ROOT:+$ROOT/.cache/logs}}
    [ -n "$logs" ] || logs=$(mktemp -d)
    mkdir -p "$logs"
    local py=${CONF26_PY:-python3} secs=${CONF26_TIMEOUT:-60}
    local listlog=$logs/conformance26-$label-list.log
    if [ -n "$xfail" ] && [ ! -r "$xfail" ]; then
        echo "expected-failures file $xfail is not readable" >"$listlog"
        fail "conformance26 ($label): expected-failures file" "$listlog"
        return 1
    fi
    local scenarios=()
    mapfile -t scenarios < <("$NODE22" "$CONF26" list --server --requirements 2026-07-28 2>"$listlog" |
        awk '/^Server scenarios/ {on=1; next} on && /^  - / {sub(/^  - /, ""); print; next} on {on=0}')
    if [ "${#scenarios[@]}" -eq 37 ]; then
        pass "conformance26 ($label) lists 37 required server scenarios"
    else
        printf 'got %s scenarios: %s\n' "${#scenarios[@]}" "${scenarios[*]}" >>"$listlog"
        fail "conformance26 ($label) lists ${#scenarios[@]} required server scenarios, expected 37" "$listlog"
        [ "${#scenarios[@]}" -gt 0 ] || return 1
    fi
    if [ -n "$xfail" ]; then
        local unknown
        unknown=$("$py" - "$xfail" "${scenarios[@]}" <<'EOF'
import re, sys
known = set(sys.argv[2:])
section = None
for line in open(sys.argv[1], encoding="utf-8"):
    body = line.split("#", 1)[0].rstrip()
    m = re.match(r"^(\w+):\s*$", body)
    if m:
        section = m.group(1)
        continue
    m = re.match(r"^\s+-\s+(\S+)\s*$", body)
    if m and section == "server" and m.group(1).split(":", 1)[0] not in known:
        print(m.group(1))
EOF
)
        if [ -n "$unknown" ]; then
            printf 'entries naming no 2026-07-28 server scenario:\n%s\n' "$unknown" >"$listlog"
            fail "conformance26 ($label): $xfail names unknown scenarios" "$listlog"
        fi
    fi

    local sc out dir verdict
    for sc in "${scenarios[@]}"; do
        out=$logs/conformance26-$label-$sc.log
        dir=$(mktemp -d)
        timeout "$secs" "$NODE22" "$CONF26" server --url "$url" --scenario "$sc" \
            --spec-version 2026-07-28 --force -o "$dir" >"$out" 2>&1
        echo "exit status $?" >>"$out"
        verdict=$("$py" - "$dir" "$sc" "${xfail:-}" <<'EOF' 2>>"$out"
import glob, json, re, sys
out_dir, scenario, xfail = sys.argv[1], sys.argv[2], sys.argv[3]

# Expected failures: the suite's YAML baseline (server section only); "# reason" comments
# are kept for the label. Only the subset of YAML that format uses is parsed.
entries = {}  # check id or None (whole scenario) -> reason
if xfail:
    section = None
    for line in open(xfail, encoding="utf-8"):
        body, _, comment = line.partition("#")
        m = re.match(r"^(\w+):\s*$", body.rstrip())
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^\s+-\s+(\S+)\s*$", body.rstrip())
        if not m or section != "server":
            continue
        name, _, check = m.group(1).partition(":")
        if name == scenario:
            entries[check or None] = comment.strip() or "listed in %s" % xfail

files = glob.glob(out_dir + "/*/checks.json")
if not files:
    print("FAIL no checks.json (timed out or crashed)")
    sys.exit()
checks = json.load(open(files[0], encoding="utf-8"))
failed = {}
for c in checks:
    if c.get("status") in ("FAILURE", "WARNING"):
        failed.setdefault(c["id"], "%s %s: %s" % (c["status"], c["id"], (c.get("errorMessage") or "")[:300]))
status = {}
for c in checks:  # most severe status per check id (ids repeat)
    rank = ["INFO", "SKIPPED", "SUCCESS", "WARNING", "FAILURE"]
    s = c.get("status", "INFO")
    if rank.index(s) >= rank.index(status.get(c["id"], "INFO")):
        status[c["id"]] = s
for line in failed.values():
    sys.stderr.write(line + "\n")

if None in entries:  # whole scenario expected to fail
    reason = entries[None]
    if failed:
        print("XFAIL " + reason)
    else:
        print("FAIL expected to fail (%s) but every check passed: remove it from %s" % (reason, xfail))
elif entries:
    unexpected = [i for i in failed if i not in entries]
    stale = [i for i in entries if i not in failed]
    if unexpected:
        print("FAIL unexpected failing checks: " + ", ".join(unexpected))
    elif stale:
        print("FAIL expected failing checks that did not fail (%s): %s; remove them from %s" % (
            ", ".join(status.get(i, "absent") for i in stale), ", ".join(stale), xfail))
    else:
        print("XFAIL " + "; ".join(sorted(set(entries.values()))))
elif failed:
    print("FAIL " + ", ".join(failed))
elif not any(c.get("status") == "SUCCESS" for c in checks):
    print("FAIL no check succeeded")
else:
    print("PASS")
EOF
)
        rm -rf "$dir"
        echo "verdict: $verdict" >>"$out"
        case $verdict in
            PASS) pass "conformance26 ($label) $sc" ;;
            XFAIL*) pass "conformance26 ($label) $sc (expected: ${verdict#XFAIL })" ;;
            *) fail "conformance26 ($label) $sc: ${verdict#FAIL }" "$out" ;;
        esac
    done
}
