#!/usr/bin/env python3
"""Official Python SDK client (PyPI `mcp` 2.3) speaking protocol revision 2026-07-28
(stateless: per-request `_meta` envelope, no initialize, MRTR) to a running stdio-sse.

usage: py_modern_check.py [--server everything|time] [--auto] [--listen] URL

  --server everything (default): stdio-sse wraps @modelcontextprotocol/server-everything.
      Lists tools, calls `echo`, then completes `trigger-elicitation-request`,
      `trigger-sampling-request` and `get-roots-list` through MRTR (`input_required`
      results answered by this client's elicitation / sampling / roots callbacks, each
      with a distinctive value that must come back in the tool's text).
  --server time: stdio-sse wraps mcp-server-time. Lists tools and calls
      `get_current_time` with {"timezone": "UTC"}.
  --auto: connect with mode="auto" (a `server/discover` probe, with the fallback to
      initialize) instead of pinning mode="2026-07-28", and require that the negotiated
      version is 2026-07-28 (i.e. that the bridge answers discover for real, M-3).
  --listen: also open `subscriptions/listen` for tools list changes and require the
      `notifications/subscriptions/acknowledged` first message (M-7), then close it.

Also checks `server/discover` directly (its result must validate as a DiscoverResult that
offers 2026-07-28). Prints one line starting with "ok" and exits 0 on success; prints what
failed and exits 1 otherwise.
"""
import argparse
import asyncio
import secrets
import sys
import traceback

import mcp_types as types
from mcp import Client

MODERN = "2026-07-28"
# Per-run values for the answers given at call time (elicitation, sampling), so a
# result can only contain them if this run's callback really answered.
RUN = secrets.token_hex(4)
ELICITED_NAME = f"Zyx Elicited {RUN}"
SAMPLED_TEXT = f"sampled-quokka-{RUN}"
# Roots are fixed: server-everything caches the roots list it got for the life of its
# child process, so on a shared child a later run may be shown an earlier run's answer.
ROOT_URI = "file:///tmp/stdio-sse-modern-narwhal"
ROOT_NAME = "Narwhal root"

calls = {"elicitation": 0, "sampling": 0, "roots": 0}


async def on_elicit(context, params):
    calls["elicitation"] += 1
    return types.ElicitResult(action="accept", content={"name": ELICITED_NAME, "check": True})


async def on_sample(context, params):
    calls["sampling"] += 1
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text=SAMPLED_TEXT),
        model="stdio-sse-test-model",
        stop_reason="endTurn",
    )


async def on_roots(context):
    calls["roots"] += 1
    return types.ListRootsResult(roots=[types.Root(uri=ROOT_URI, name=ROOT_NAME)])


def text_of(result):
    return " ".join(getattr(c, "text", "") for c in result.content)


async def call(client, tool, args, want, failures, label=None):
    label = label or tool
    try:
        result = await client.call_tool(tool, args)
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        failures.append(f"{label}: {type(e).__name__}: {e}")
        return None
    text = text_of(result)
    if result.is_error:
        failures.append(f"{label}: isError result: {text[:300]!r}")
    elif want not in text:
        failures.append(f"{label}: expected {want!r} in {text[:400]!r}")
    return text


async def check_discover(client, failures):
    try:
        raw = await client.session.send_discover(MODERN)  # no adopt(): the connection is untouched
        discover = types.DiscoverResult.model_validate(raw)
    except Exception as e:  # noqa: BLE001
        failures.append(f"server/discover: {type(e).__name__}: {e}")
        return None
    if MODERN not in discover.supported_versions:
        failures.append(f"server/discover: supportedVersions {discover.supported_versions} lacks {MODERN}")
    return discover


async def check_listen(client, failures):
    try:
        async with asyncio.timeout(15):
            async with client.listen(tools_list_changed=True) as sub:
                if sub.honored.tools_list_changed is not True:
                    failures.append(f"listen: toolsListChanged not honored: {sub.honored}")
    except Exception as e:  # noqa: BLE001
        failures.append(f"subscriptions/listen: {type(e).__name__}: {e}")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", choices=("everything", "time"), default="everything")
    ap.add_argument("--auto", action="store_true")
    ap.add_argument("--listen", action="store_true")
    ap.add_argument("url")
    opts = ap.parse_args()

    failures = []
    client = Client(
        opts.url,
        mode="auto" if opts.auto else MODERN,
        elicitation_callback=on_elicit,
        sampling_callback=on_sample,
        list_roots_callback=on_roots,
        client_info=types.Implementation(name="stdio-sse-py-modern-check", version="1.0.0"),
        read_timeout_seconds=30,
    )
    async with client:
        version = client.protocol_version
        if version != MODERN:
            failures.append(f"negotiated protocol version {version!r}, want {MODERN!r}")
            print("FAIL:\n  " + "\n  ".join(failures))
            return 1
        if opts.auto and client.session.discover_result is None:
            failures.append("mode=auto did not adopt a server/discover result")

        discover = await check_discover(client, failures)
        tools = await client.list_tools()
        names = [t.name for t in tools.tools]
        if opts.server == "time":
            wanted = ["get_current_time"]
        else:
            wanted = ["echo", "trigger-elicitation-request", "trigger-sampling-request", "get-roots-list"]
        missing = [n for n in wanted if n not in names]
        if missing:
            failures.append(f"tools/list lacks {missing}: {names}")

        if opts.server == "time":
            await call(client, "get_current_time", {"timezone": "UTC"}, '"timezone": "UTC"', failures)
        else:
            await call(client, "echo", {"message": f"hi modern {RUN}"}, f"hi modern {RUN}", failures)
            await call(client, "trigger-elicitation-request", {}, f"Name: {ELICITED_NAME}", failures)
            await call(client, "trigger-sampling-request", {"prompt": "say something", "maxTokens": 50},
                       SAMPLED_TEXT, failures)
            await call(client, "get-roots-list", {}, ROOT_URI, failures)
            for kind in ("elicitation", "sampling"):
                if calls[kind] == 0:
                    failures.append(f"the {kind} callback was never asked (no input_required round)")

        if opts.listen:
            await check_listen(client, failures)

    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    server = discover.meta.get("io.modelcontextprotocol/serverInfo", {}).get("name") if discover and discover.meta else None
    print(f"ok modern mode={'auto' if opts.auto else 'pinned'} version={version} server={server!r} "
          f"tools={len(names)} callbacks={calls}")
    return 0


def run():
    try:
        return asyncio.run(asyncio.wait_for(main(), 90))
    except BaseException as e:  # noqa: BLE001 - print exception groups and timeouts readably
        if isinstance(e, SystemExit):
            raise
        print(f"FAIL: {type(e).__name__}: {e}")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(run())
