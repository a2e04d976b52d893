#!/usr/bin/env python3
"""A fleet of three stdio-sse instances behind a balancer (issue 19), judged through the
official Python SDK client (PyPI `mcp` 2.3).

usage: fleet_check.py CHECK --bin BIN --lb URL --ports P1,P2,P3 --logs DIR --label NAME

This script starts the three instances itself, on the balancer's upstream ports:
    BIN --port Pn --instance-id sn --drain-timeout 20s -- python3 tests/fixtures/everything.py
(stderr to DIR/NAME-CHECK-sn.log), and ends them at exit. The balancer (HAProxy or nginx,
started by run.sh from contrib/) is already listening at URL.

CHECK:
  load     30 concurrent clients (10 Streamable HTTP 2025 sessions, 10 legacy SSE
           sessions, 10 2026-07-28 clients), 3000 `echo` calls in all, each with a unique
           payload that must come back; 2025 clients end their session and open a new one
           every 20 calls. Zero errors, zero 404 (a session's request reaching an instance
           that does not own it gets 404), and each instance's /metrics count of sessions
           opened equals the sessions the clients saw minted with its prefix, all three > 0.
  kill     the same load; after 1.5 s, kill -9 of instance s2. Its 2025 clients' next
           request fails (404 from another instance, or the stream cut); they initialize
           again through the balancer, land on s1 or s3, and go on: the longest time from
           the kill to such a client's next good call is reported (must be < 5 s). Clients
           of s1 and s3 see no error; a 2026-07-28 call in flight on s2 when it died may
           fail (reported). Afterwards no process of s2's (its children) is left.
  rolling  the same load while each instance in turn gets SIGTERM (draining, 20 s
           timeout), exits and is started again with the same id and port. Zero failed
           calls for the 2026-07-28 clients, zero failed calls at all (2025 clients
           re-initialize as they cycle; no call in flight is lost), each instance exits 0.
           Also, before each SIGTERM, a legacy stream opened through the balancer on that
           instance (its endpoint event names the instance's session id): its initialize,
           sent after the SIGTERM, must be served (202, the result on the stream).
  latency  median of 50 (after 5 warm-ups), through the balancer and straight to the
           instance: a Streamable HTTP tools/call POST answer, and a legacy SSE event (from
           the POST /message to its answer on the stream). Each through the balancer must
           be within 2x of the same without it.
Prints one line starting with "ok" and exits 0 on success; otherwise what failed, exit 1.
"""
import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request

import anyio
import httpx2
from mcp import ClientSession
from mcp.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = secrets.token_hex(3)
MODERN = "2026-07-28"
IDS = ("s1", "s2", "s3")
CYCLE = 20  # calls per 2025 session before the client ends it and opens another
CALL_TIMEOUT = 8.0


def log(*a):
    print(*a, flush=True)


class Fleet:
    def __init__(self, opts, check):
        self.o = opts
        self.check = check
        self.procs = {}
        self.exits = {}
        self.ports = dict(zip(IDS, opts.ports))

    def logfile(self, sid):
        return os.path.join(self.o.logs, f"{self.o.label}-{self.check}-{sid}.log")

    def start(self, sid, append=False):
        f = open(self.logfile(sid), "a" if append else "w")
        p = subprocess.Popen(
            [self.o.bin, "--port", str(self.ports[sid]), "--instance-id", sid, "--drain-timeout", "20s",
             "--", "python3", os.path.join(ROOT, "tests/fixtures/everything.py")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f)
        self.procs[sid] = p
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[sid]}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return p
            except Exception:  # noqa: BLE001
                pass
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"instance {sid} did not become ready (see {self.logfile(sid)})")

    def start_all(self):
        for sid in IDS:
            self.start(sid)
        # The balancer's view: HAProxy marks a server up after two checks 0.5 s apart.
        time.sleep(1.2)

    def metrics(self, sid):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[sid]}/metrics", timeout=2) as r:
                return r.read().decode()
        except Exception:  # noqa: BLE001
            return ""

    def metric(self, sid, pattern, text=None):
        text = self.metrics(sid) if text is None else text
        total = 0.0
        for line in text.splitlines():
            if re.match(pattern, line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop_all(self):
        for sid, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for sid, p in self.procs.items():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def children_of(pid):
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,pgid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return [r for r in rows if len(r) >= 3 and r[1] == str(pid)]


def alive(pids):
    out = subprocess.run(["ps", "-e", "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout
    live = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in pids and not parts[1].startswith("Z"):
            live[parts[0]] = line.strip()
    return live


class Stats:
    def __init__(self):
        self.calls = {"streamable": 0, "sse": 0, "modern": 0}
        self.errors = []  # (t, kind, client, owner, message)
        self.sessions = {"streamable": {s: 0 for s in IDS}, "sse": {s: 0 for s in IDS}}
        self.status404 = []  # (t, url, session)
        self.recovered = {}  # client -> first good call time after an error
        self.owner_of_client = {}


def describe(e):
    """The leaf exceptions of an exception group (the SDK nests them), one line."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(describe(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


def hook_for(stats):
    async def on_response(response):
        if response.status_code == 404:
            req = response.request
            stats.status404.append((time.monotonic(), str(req.url), req.headers.get("mcp-session-id")))
    return on_response


async def call_echo(session_or_client, payload):
    with anyio.fail_after(CALL_TIMEOUT):
        res = await session_or_client.call_tool("echo", {"message": payload})
    text = " ".join(getattr(c, "text", "") for c in res.content)
    if res.is_error or text != payload:
        raise AssertionError(f"echo {payload!r} answered {text!r} (isError={res.is_error})")


async def legacy_worker(kind, idx, n, url, stats, stop):
    """A 2025 client: Streamable HTTP or legacy SSE, a new session every CYCLE calls, and
    a new session after any failure (as an SDK user does on 404)."""
    name = f"{kind}{idx}"
    done = 0
    failed_at = None
    while done < n and not stop.is_set():
        sid = {}
        stats.owner_of_client[name] = None
        closer = contextlib.nullcontext()
        try:
            if kind == "streamable":
                http = closer = create_mcp_http_client()
                http.event_hooks["response"].append(hook_for(stats))

                async def capture(response, sid=sid):
                    if response.headers.get("mcp-session-id"):
                        sid["id"] = response.headers["mcp-session-id"]
                        stats.owner_of_client[name] = sid["id"].split("_", 1)[0]
                http.event_hooks["response"].append(capture)
                cm = streamable_http_client(url + "/mcp", http_client=http)
            else:
                def factory(headers=None, timeout=None, auth=None):
                    c = create_mcp_http_client(headers=headers, timeout=timeout, auth=auth)
                    c.event_hooks["response"].append(hook_for(stats))
                    return c
                cm = sse_client(url + "/sse", httpx_client_factory=factory,
                                on_session_created=lambda s: (sid.__setitem__("id", s),
                                                              stats.owner_of_client.__setitem__(name, s.split("_", 1)[0])))
            async with closer, cm as streams:
                async with ClientSession(streams[0], streams[1]) as s:
                    with anyio.fail_after(CALL_TIMEOUT):
                        await s.initialize()
                    owner = (sid.get("id") or "?_").split("_", 1)[0]
                    if owner in IDS:
                        stats.sessions[kind][owner] += 1
                    stats.owner_of_client[name] = owner
                    for _ in range(CYCLE):
                        if done >= n or stop.is_set():
                            break
                        payload = f"{name}-{done}-{RUN}-{secrets.token_hex(4)}"
                        await call_echo(s, payload)
                        done += 1
                        stats.calls[kind] += 1
                        if failed_at is not None:
                            stats.recovered.setdefault(name, []).append(time.monotonic() - failed_at)
                            failed_at = None
        except BaseException as e:  # noqa: BLE001 - every failure is recorded
            if isinstance(e, asyncio.CancelledError):
                raise
            msg = describe(e)
            stats.errors.append((time.monotonic(), kind, name, stats.owner_of_client.get(name), msg[:400]))
            if failed_at is None:
                failed_at = time.monotonic()
            await asyncio.sleep(0.05)


async def modern_worker(idx, n, url, stats, stop):
    name = f"modern{idx}"
    done = 0
    while done < n and not stop.is_set():
        try:
            async with Client(url + "/mcp", mode=MODERN) as c:
                while done < n and not stop.is_set():
                    payload = f"{name}-{done}-{RUN}-{secrets.token_hex(4)}"
                    await call_echo(c, payload)
                    done += 1
                    stats.calls["modern"] += 1
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, asyncio.CancelledError):
                raise
            msg = describe(e)
            stats.errors.append((time.monotonic(), "modern", name, None, msg[:400]))
            await asyncio.sleep(0.05)


async def run_load(url, stats, total=3000, per_kind=10, stop=None, counts=None):
    stop = stop or asyncio.Event()
    n = total // (3 * per_kind)
    tasks = []
    for i in range(per_kind):
        tasks.append(asyncio.create_task(legacy_worker("streamable", i, n, url, stats, stop)))
        tasks.append(asyncio.create_task(legacy_worker("sse", i, n, url, stats, stop)))
        tasks.append(asyncio.create_task(modern_worker(i, n, url, stats, stop)))
    return tasks


def summary(stats):
    c = stats.calls
    return (f"{sum(c.values())} calls ({c['streamable']} streamable, {c['sse']} sse, {c['modern']} 2026-07-28), "
            f"sessions streamable {stats.sessions['streamable']} sse {stats.sessions['sse']}")


async def wait_tasks(tasks, secs):
    done, pending = await asyncio.wait(tasks, timeout=secs)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return not pending


def check_sessions(fleet, stats, failures, ids=IDS):
    for kind, metric in (("streamable", "streamable_http"), ("sse", "sse")):
        for sid in ids:
            got = fleet.metric(sid, rf'stdio_sse_sessions_opened_total\{{transport="{metric}"\}}')
            want = stats.sessions[kind][sid]
            if int(got) != want:
                failures.append(f"{sid}: /metrics says {int(got)} {kind} sessions opened, clients saw {want} with its prefix")
            if want == 0:
                failures.append(f"no {kind} session landed on {sid}")


def all_answered(finished, stats, opts):
    """The failures of a run whose clients should all have finished every call."""
    failures = []
    if not finished:
        failures.append("clients did not finish within 100 s")
    total = sum(stats.calls.values())
    if total != opts.calls:
        failures.append(f"{total} calls answered, expected {opts.calls}")
    return failures


async def check_load(fleet, opts):
    stats = Stats()
    t0 = time.monotonic()
    tasks = await run_load(opts.lb, stats, total=opts.calls)
    finished = await wait_tasks(tasks, 100)
    took = time.monotonic() - t0
    failures = all_answered(finished, stats, opts)
    for e in stats.errors[:10]:
        failures.append(f"error: {e[1:]}")
    if stats.errors:
        failures.append(f"{len(stats.errors)} client errors")
    if stats.status404:
        failures.append(f"{len(stats.status404)} responses 404 (misrouted): {stats.status404[:3]}")
    check_sessions(fleet, stats, failures)
    modern = {sid: int(fleet.metric(sid, r'stdio_sse_sessions_opened_total\{transport="modern"\}')) for sid in IDS}
    return failures, f"{summary(stats)}, 0 misrouted, {len(stats.errors)} errors, {took:.1f} s; modern carriers per instance {modern}"


async def check_kill(fleet, opts):
    stats = Stats()
    victim = "s2"
    vpid = fleet.procs[victim].pid
    tasks = await run_load(opts.lb, stats, total=opts.calls)
    for _ in range(200):  # every client under way
        if sum(stats.calls.values()) >= opts.calls // 10:
            break
        await asyncio.sleep(0.1)
    kids = children_of(vpid)
    owners_before = dict(stats.owner_of_client)
    t_kill = time.monotonic()
    os.kill(vpid, signal.SIGKILL)
    fleet.procs[victim].wait()
    finished = await wait_tasks(tasks, 100)
    failures = all_answered(finished, stats, opts)
    after = [e for e in stats.errors if e[0] >= t_kill]
    # A client of the victim: its session was s2's, or its initialize was in flight
    # (no session yet) when s2 died.
    victims = {c for c, o in owners_before.items() if o == victim}
    victims |= {e[2] for e in after if e[1] != "modern" and (e[3] == victim or (e[3] is None and e[0] - t_kill < 1))}
    before = [e for e in stats.errors if e[0] < t_kill]
    if before:
        failures.append(f"{len(before)} errors before the kill: {before[:3]}")
    other = [e for e in after if e[1] != "modern" and e[2] not in victims]
    if other:
        failures.append(f"{len(other)} errors for clients of the live instances: {other[:3]}")
    modern_err = [e for e in after if e[1] == "modern"]
    # A 2026-07-28 call in flight on s2 when it died is lost (a balancer must not replay
    # a call that may have run); one a client makes afterwards must not fail.
    late = [e for e in modern_err if e[0] - t_kill >= 1]
    if late or len(modern_err) > 10:
        failures.append(f"{len(modern_err)} 2026-07-28 errors after the kill, {len(late)} of them later than 1 s: {modern_err[:3]}")
    hit = [e for e in after if e[2] in victims]
    if not hit:
        failures.append(f"no client of {victim} noticed the kill (victims: {sorted(victims)})")
    rec = [max(v) for c, v in stats.recovered.items() if c in victims]
    unrecovered = {e[2] for e in hit} - set(stats.recovered)
    if unrecovered:
        failures.append(f"clients never recovered: {sorted(unrecovered)}")
    worst = max(rec) if rec else float("nan")
    if rec and worst >= 5:
        failures.append(f"a client took {worst:.2f} s to recover")
    # After the kill, new sessions go to s1 and s3 only; 404s only for s2's sessions.
    wrong404 = [x for x in stats.status404 if not (x[2] or "").startswith(victim + "_") and "sessionId=" + victim + "_" not in x[1]]
    if wrong404:
        failures.append(f"{len(wrong404)} 404s for sessions of live instances (misrouted): {wrong404[:3]}")
    # No orphan: every child the killed instance had is gone (its guardian kills them).
    kid_pids = {k[0] for k in kids}
    left = {}
    for _ in range(40):
        left = alive(kid_pids)
        if not left:
            break
        await asyncio.sleep(0.1)
    if left:
        failures.append(f"children of the killed instance still running: {list(left.values())}")
    n404 = len([x for x in stats.status404 if x[0] >= t_kill])
    kinds = sorted({e[1] for e in hit})
    return failures, (f"{summary(stats)}; kill -9 {victim} ({len(victims)} of its clients, kinds {kinds}, "
                      f"{n404} 404s after it) recovered in at most {worst:.2f} s (median "
                      f"{statistics.median(rec) if rec else float('nan'):.2f} s); {len(other)} errors elsewhere; "
                      f"{len(modern_err)} 2026-07-28 calls lost in flight {[e[4][:120] for e in modern_err[:2]]}; {len(kid_pids)} children of {victim}, none left")


async def check_rolling(fleet, opts):
    stats = Stats()
    stop = asyncio.Event()
    tasks = await run_load(opts.lb, stats, total=30 * 100000, stop=stop)
    await asyncio.sleep(1.0)
    failures, notes = [], []
    for sid in IDS:
        p = fleet.procs[sid]
        # A legacy client that opened its stream (and got its endpoint, with this
        # instance's session id) just before the SIGTERM: its first message must be served.
        probe = await open_legacy_stream(opts.lb, sid)
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        if probe:
            verdict = await finish_legacy_stream(probe)
            if verdict:
                failures.append(f"{sid}: a legacy stream opened before its drain: {verdict}")
        deadline = t + 25
        while p.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if p.poll() is None:
            failures.append(f"{sid} did not exit within 25 s of SIGTERM")
            p.kill()
            p.wait()
        elif p.returncode != 0:
            failures.append(f"{sid} exited with {p.returncode}")
        notes.append(f"{sid} drained in {time.monotonic() - t:.1f} s")
        await asyncio.to_thread(fleet.start, sid, True)
        await asyncio.sleep(1.5)  # the balancer sees it ready (HAProxy: two checks)
    await asyncio.sleep(1.0)
    stop.set()
    await wait_tasks(tasks, 20)
    modern_err = [e for e in stats.errors if e[1] == "modern"]
    if modern_err:
        failures.append(f"{len(modern_err)} failed 2026-07-28 calls: {modern_err[:3]}")
    legacy_err = [e for e in stats.errors if e[1] != "modern"]
    if legacy_err:
        failures.append(f"{len(legacy_err)} failed 2025 calls: {legacy_err[:3]}")
    if sum(stats.calls.values()) < 300:
        failures.append(f"only {sum(stats.calls.values())} calls during the restart")
    return failures, f"{summary(stats)} during a rolling restart ({', '.join(notes)}); {len(stats.errors)} failed calls"


async def open_legacy_stream(lb, sid):
    """GET /sse through the balancer until one lands on instance sid (round-robin: a few
    tries); returns (client, stream context, line iterator, endpoint) or None."""
    for _ in range(12):
        h = httpx2.AsyncClient(timeout=10)
        cm = h.stream("GET", lb + "/sse")
        r = await cm.__aenter__()
        lines = r.aiter_lines()
        endpoint = None
        async for line in lines:
            if line.startswith("data:"):
                endpoint = line[5:].strip()
                break
        if endpoint and f"sessionId={sid}_" in endpoint:
            return h, cm, lines, endpoint, lb
        await cm.__aexit__(None, None, None)
        await h.aclose()
    return None


async def finish_legacy_stream(probe):
    h, cm, lines, endpoint, lb = probe
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "fleet", "version": "1"}}}
    try:
        r = await h.post(lb + endpoint, json=init)
        if r.status_code != 202:
            return f"POST {endpoint} initialize answered {r.status_code} {r.text[:200]!r}"
        with anyio.fail_after(5):
            async for line in lines:
                if line.startswith("data:") and '"id":1' in line.replace(" ", ""):
                    return None
        return "its stream ended without the initialize result"
    except Exception as e:  # noqa: BLE001
        return describe(e)
    finally:
        with anyio.move_on_after(2, shield=True):
            await cm.__aexit__(None, None, None)
            await h.aclose()


async def latency_pair(base, n=50):
    """(POST answer median, legacy SSE event median) in ms against base."""
    post, sse = [], []
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "fleet", "version": "1"}}}
    async with httpx2.AsyncClient(timeout=10) as h:
        r = await h.post(base + "/mcp", json=init, headers=headers)
        sid = r.headers["mcp-session-id"]
        hs = dict(headers, **{"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"})
        await h.post(base + "/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=hs)
        for i in range(n + 5):
            body = {"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": f"p{i}"}}}
            t = time.perf_counter()
            r = await h.post(base + "/mcp", json=body, headers=hs)
            dt = time.perf_counter() - t
            assert f"p{i}" in r.text, r.text
            if i >= 5:
                post.append(dt * 1000)
        await h.delete(base + "/mcp", headers=hs)
    async with httpx2.AsyncClient(timeout=10) as h, h.stream("GET", base + "/sse") as stream:
        lines = stream.aiter_lines()

        async def next_data():
            async for line in lines:
                if line.startswith("data:"):
                    return line[5:].strip()
        endpoint = await next_data()
        msg_url = base + endpoint
        await h.post(msg_url, json=init)
        await next_data()
        await h.post(msg_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        for i in range(n + 5):
            body = {"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": f"e{i}"}}}
            t = time.perf_counter()
            await h.post(msg_url, json=body)
            data = await next_data()
            dt = time.perf_counter() - t
            assert f"e{i}" in data, data
            if i >= 5:
                sse.append(dt * 1000)
    return statistics.median(post), statistics.median(sse), endpoint.split("sessionId=")[1].split("_")[0]


async def check_latency(fleet, opts):
    failures = []
    via_post, via_sse, owner = await latency_pair(opts.lb)
    direct_post, direct_sse, _ = await latency_pair(f"http://127.0.0.1:{fleet.ports[owner]}")
    if via_post > 2 * direct_post:
        failures.append(f"POST answer through the balancer {via_post:.2f} ms > 2x direct {direct_post:.2f} ms")
    if via_sse > 2 * direct_sse:
        failures.append(f"SSE event through the balancer {via_sse:.2f} ms > 2x direct {direct_sse:.2f} ms")
    return failures, (f"median of 50: POST answer {via_post:.2f} ms via balancer vs {direct_post:.2f} ms direct "
                      f"({via_post / direct_post:.2f}x); legacy SSE event {via_sse:.2f} ms vs {direct_sse:.2f} ms "
                      f"({via_sse / direct_sse:.2f}x)")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("check", choices=("load", "kill", "rolling", "latency"))
    ap.add_argument("--bin", required=True)
    ap.add_argument("--lb", required=True)
    ap.add_argument("--ports", required=True, type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--logs", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--calls", type=int, default=3000, help="load and kill: calls in all (a multiple of 30)")
    opts = ap.parse_args()
    fleet = Fleet(opts, opts.check)
    try:
        fleet.start_all()
        fn = {"load": check_load, "kill": check_kill, "rolling": check_rolling, "latency": check_latency}[opts.check]
        failures, line = await fn(fleet, opts)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        failures, line = ["crashed"], ""
    finally:
        fleet.stop_all()
    if failures:
        for f in failures:
            log("FAIL:", f)
        log(line)
        return 1
    log("ok " + line)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
