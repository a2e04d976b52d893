#!/usr/bin/env python3
"""Official Python SDK client (PyPI `mcp`) against a running stdio-sse.

usage: py_client.py streamable|auto|sse URL TOOL JSON_ARGS EXPECTED_SUBSTRING

Optional environment: MCP_BEARER (sent as Authorization: Bearer) and MCP_CA_FILE (the
only CA trusted for https URLs), for the security checks.

Connects, lists tools, calls TOOL and checks that its text contains EXPECTED_SUBSTRING.
`auto` uses the high-level Client in its default dual-era mode, which first probes with
a 2026-07-28 `server/discover` and must fall back to initialize (rule N-11).
Prints one line and exits 0 on success.
"""
import asyncio
import json
import os
import ssl
import sys

import httpx2

from mcp import ClientSession, Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client


def text_of(result):
    return " ".join(getattr(c, "text", "") for c in result.content)


async def with_session(transport_cm, tool, args):
    async with transport_cm as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            tools = await session.list_tools()
            result = await session.call_tool(tool, args)
            return init.protocol_version, [t.name for t in tools.tools], text_of(result)


async def with_client(url, tool, args):
    async with Client(url) as client:
        tools = await client.list_tools()
        result = await client.call_tool(tool, args)
        return client.protocol_version, [t.name for t in tools.tools], text_of(result)


def client_options():
    """Headers and TLS trust from the environment (empty when unset)."""
    opts = {}
    if os.environ.get("MCP_BEARER"):
        opts["headers"] = {"Authorization": "Bearer " + os.environ["MCP_BEARER"]}
    if os.environ.get("MCP_CA_FILE"):
        opts["verify"] = ssl.create_default_context(cafile=os.environ["MCP_CA_FILE"])
    return opts


async def main():
    kind, url, tool, args, expected = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    opts = client_options()
    if kind == "streamable" and opts:
        timeout = httpx2.Timeout(30, read=300)
        async with httpx2.AsyncClient(timeout=timeout, **opts) as http:
            version, names, text = await with_session(streamable_http_client(url, http_client=http), tool, args)
    elif kind == "streamable":
        version, names, text = await with_session(streamable_http_client(url), tool, args)
    elif kind == "sse" and opts:
        def factory(headers=None, timeout=None, auth=None):
            merged = {**opts, "headers": {**opts.get("headers", {}), **(headers or {})}}
            return httpx2.AsyncClient(timeout=timeout, auth=auth, **merged)
        version, names, text = await with_session(sse_client(url, httpx_client_factory=factory), tool, args)
    elif kind == "sse":
        version, names, text = await with_session(sse_client(url), tool, args)
    else:
        version, names, text = await with_client(url, tool, args)
    assert tool in names, f"{tool} not in tools/list: {names}"
    assert expected in text, f"expected {expected!r} in {text!r}"
    print(f"ok {kind} version={version} tools={len(names)} result={text[:60]!r}")


asyncio.run(asyncio.wait_for(main(), 60))
