#!/usr/bin/env python3
"""/metrics read by a real Prometheus parser (prometheus_client), before and after traffic.

usage: metrics_check.py BASE_URL TOOL JSON_ARGS

Parses the exposition with prometheus_client's text parser (which rejects malformed
lines, duplicate families and bad histograms), drives one Streamable HTTP session with
a tool call through stdio-sse, parses again and checks the numbers that must have moved.
Prints one line and exits 0 on success.
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

BASE, TOOL, ARGS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ACCEPT = "application/json, text/event-stream"


def scrape():
    with urllib.request.urlopen(BASE + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers["Content-Type"]
        text = r.read().decode()
    samples = {}
    families = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def post(body, session=None, method="POST"):
    headers = {"Content-Type": "application/json", "Accept": ACCEPT}
    if session:
        headers["Mcp-Session-Id"] = session
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + "/mcp", data=data, headers=headers, method=method)
    with urllib.request.urlopen(req) as r:
        return r.headers.get("Mcp-Session-Id"), r.read().decode()


families, before = scrape()
expected = {
    "stdio_sse_http_requests": "counter",
    "stdio_sse_messages": "counter",
    "stdio_sse_request_duration_seconds": "histogram",
    "stdio_sse_sessions_opened": "counter",
    "stdio_sse_sessions_closed": "counter",
    "stdio_sse_sessions_active": "gauge",
    "stdio_sse_children_spawned": "counter",
    "stdio_sse_children_exited": "counter",
    "stdio_sse_children_active": "gauge",
    "stdio_sse_http_bytes": "counter",
    "stdio_sse_child_bytes": "counter",
    "stdio_sse_messages_dropped": "counter",
    "stdio_sse_requests_rejected": "counter",
    "stdio_sse_build_info": "gauge",
    "process_resident_memory_bytes": "gauge",
}
for name, kind in expected.items():
    if families.get(name) != kind:
        raise SystemExit("family %s: %r, expected %s" % (name, families.get(name), kind))

session, _ = post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "metrics", "version": "1"}}})
post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
_, answer = post({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": TOOL, "arguments": ARGS}}, session)
assert '"id":2' in answer.replace(" ", ""), answer
post(None, session, method="DELETE")
_, after = scrape()


def moved(name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


checks = {
    "POST /mcp 2xx": moved("stdio_sse_http_requests_total", route="mcp", method="POST", code="2xx") == 3,
    "DELETE /mcp 2xx": moved("stdio_sse_http_requests_total", route="mcp", method="DELETE", code="2xx") == 1,
    "requests to the child": moved("stdio_sse_messages_total", direction="to_child", kind="request") == 2,
    "responses to the client": moved("stdio_sse_messages_total", direction="to_client", kind="response") >= 2,
    "latency observations": moved("stdio_sse_request_duration_seconds_count") == 2,
    "sessions opened": moved("stdio_sse_sessions_opened_total", transport="streamable_http") == 1,
    "sessions closed by delete": moved("stdio_sse_sessions_closed_total", transport="streamable_http", reason="delete") == 1,
    "children spawned": moved("stdio_sse_children_spawned_total") >= 1,
    "bytes in": moved("stdio_sse_http_bytes_total", direction="in") > 0,
}
bad = [k for k, ok in checks.items() if not ok]
if bad:
    raise SystemExit("did not move as expected: %s" % ", ".join(bad))
print("%d families parsed by prometheus_client; %d counters moved as driven" % (len(families), len(checks)))
