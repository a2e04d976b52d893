#!/usr/bin/env python3
"""One run of `mcp-remote` (npm), the stdio proxy users put in front of remote MCP
servers, as an MCP client drives it: initialize, initialized, tools/list, then stdin
closed. It never sends DELETE, and with `--transport sse-only` it probes /sse first.

usage: remote_client.py NODE MCP_REMOTE_JS URL [extra mcp-remote args...]
Exits 0 when tools/list answered and mcp-remote exited; prints the tool count.
"""
import json
import subprocess
import sys


def main():
    node, js, url, *extra = sys.argv[1:]
    p = subprocess.Popen([node, js, url, "--allow-http", *extra], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def ask(msg):
        p.stdin.write(json.dumps(msg) + "\n")
        p.stdin.flush()
        if "id" not in msg:
            return None
        for line in p.stdout:
            reply = json.loads(line)
            if reply.get("id") == msg["id"]:
                return reply
        raise SystemExit("mcp-remote ended before answering %s" % msg["method"])

    init = ask({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {"roots": {}},
        "clientInfo": {"name": "remote-check", "version": "1"}}})
    if "result" not in init:
        raise SystemExit("initialize failed: %s" % init)
    ask({"jsonrpc": "2.0", "method": "notifications/initialized"})
    tools = ask({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    if "result" not in tools:
        raise SystemExit("tools/list failed: %s" % tools)
    p.stdin.close()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        raise SystemExit("mcp-remote did not exit after stdin closed")
    print("tools=%d" % len(tools["result"]["tools"]))


if __name__ == "__main__":
    main()
