#!/usr/bin/env python3
"""Idle streams through a reverse proxy (contrib/nginx.conf), with the standard library.

usage: idle_check.py BASE_URL IDLE_SECONDS [--expect-cut]

BASE_URL is the proxy (https://localhost:PORT); MCP_CA_FILE is the CA to trust. The
proxy's read timeout is shorter than IDLE_SECONDS; stdio-sse's keepalive comments are
what keeps the streams open:
  - Streamable HTTP: a GET stream stays idle for IDLE_SECONDS, a tools/call `sleep`
    keeps its POST stream silent as long, and afterwards the GET stream still delivers
    a notification;
  - legacy SSE: the stream stays idle for IDLE_SECONDS, then a tool call round-trips
    through it.
With --expect-cut (stdio-sse run with --keepalive 0) the idle GET stream must instead be
cut by the proxy: the control that shows the comments are what matters.
Prints one line and exits 0 when everything held.
"""
import http.client
import json
import os
import queue
import ssl
import sys
import threading
import time
import urllib.parse

BASE = urllib.parse.urlsplit(sys.argv[1])
IDLE = float(sys.argv[2])
EXPECT_CUT = "--expect-cut" in sys.argv
CTX = ssl.create_default_context(cafile=os.environ.get("MCP_CA_FILE"))
ACCEPT_BOTH = "application/json, text/event-stream"


def conn():
    return http.client.HTTPSConnection(BASE.hostname, BASE.port, context=CTX, timeout=IDLE + 30)


def events(resp):
    """Yields SSE events as (event, data) pairs; comments are counted, not yielded."""
    event, data = "message", []
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\r\n")
        if line.startswith(":"):
            events.comments += 1
        elif line == "":
            if any(data):  # an empty `data:` is a priming event (resumption point)
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


events.comments = 0


def reader(resp, q):
    """Pushes every event of a stream, then None when it ends (cut or closed)."""
    try:
        for ev in events(resp):
            q.put(ev)
    except Exception as e:  # a cut mid-chunk surfaces as an exception
        q.put(("cut", repr(e)))
    q.put(None)


def post(path, msg, session=None):
    c = conn()
    headers = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    if session:
        headers["Mcp-Session-Id"] = session
    c.request("POST", path, json.dumps(msg), headers)
    return c.getresponse()


def call(id_, tool, args):
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": tool, "arguments": args}}


def answer(resp, id_):
    for _, data in events(resp):
        msg = json.loads(data)
        if msg.get("id") == id_:
            return msg
    raise SystemExit("stream ended without the answer to %r" % id_)


INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "idle", "version": "1"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def streamable():
    r = post("/mcp", INIT)
    session = r.getheader("Mcp-Session-Id")
    answer(r, 0)
    assert post("/mcp", INITIALIZED, session).status == 202
    g = conn()
    g.request("GET", "/mcp", headers={"Accept": "text/event-stream", "Mcp-Session-Id": session})
    listen = g.getresponse()
    assert listen.status == 200, listen.status
    q = queue.Queue()
    threading.Thread(target=reader, args=(listen, q), daemon=True).start()
    if EXPECT_CUT:
        try:
            got = q.get(timeout=IDLE + 10)
        except queue.Empty:
            raise SystemExit("the idle stream was not cut by the proxy within %.0fs" % (IDLE + 10))
        if got is not None and got[0] != "cut":
            raise SystemExit("unexpected event on an idle stream: %r" % (got,))
        return "without keepalive comments the proxy cut the idle stream"
    started = time.monotonic()
    slept = answer(post("/mcp", call(1, "sleep", {"seconds": IDLE}), session), 1)
    assert slept["result"]["content"][0]["text"] == "slept", slept
    waited = time.monotonic() - started
    answer(post("/mcp", call(2, "notify_list_changed", {}), session), 2)
    while True:
        got = q.get(timeout=10)
        if got is None or got[0] == "cut":
            raise SystemExit("the idle GET stream was cut: %r" % (got,))
        if json.loads(got[1]).get("method") == "notifications/tools/list_changed":
            break
    return "streamable: POST silent %.1fs and GET idle, both held" % waited


def legacy():
    c = conn()
    c.request("GET", "/sse", headers={"Accept": "text/event-stream"})
    stream = c.getresponse()
    q = queue.Queue()
    threading.Thread(target=reader, args=(stream, q), daemon=True).start()
    kind, endpoint = q.get(timeout=10)
    assert kind == "endpoint", kind
    time.sleep(IDLE)  # the idle period itself: the proxy's read timeout passes
    for msg in (INIT, INITIALIZED, call(3, "echo", {"message": "after the idle"})):
        r = post(endpoint, msg)
        assert r.status == 202, r.status
        r.read()
    while True:
        got = q.get(timeout=10)
        if got is None or got[0] == "cut":
            raise SystemExit("the idle legacy stream was cut: %r" % (got,))
        msg = json.loads(got[1])
        if msg.get("id") == 3:
            assert msg["result"]["content"][0]["text"] == "after the idle", msg
            return "legacy: idle %.0fs, then a call went through" % IDLE


if EXPECT_CUT:
    print(streamable())
else:
    a, b = streamable(), legacy()
    print("%s; %s; %d keepalive comments seen" % (a, b, events.comments))
