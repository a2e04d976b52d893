#!/usr/bin/env python3
"""Many servers behind one port (--config FILE), through the official Python SDK client.

usage: many_check.py CHECK streamable|sse BASE_URL

The instance at BASE_URL serves the file run.sh writes for these checks:
  everything  @modelcontextprotocol/server-everything (stdio), a child per session
  time        mcp-server-time, "mode": "shared"
  fixture     tests/fixtures/everything.py, "tools": {"deny": ["echo", "test_elicitation*"]}
or, for the claude checks, the Claude Desktop file (everything and time with "env", one
"url" entry named remote-notes).

CHECK:
  servers        each server on its own endpoint (/servers/NAME/mcp, or /servers/NAME/sse
                 with its /servers/NAME/message): list its tools, call one and check the
                 answer is that server's; the fixture's filtered tools are absent and their
                 calls get -32602 "Unknown tool"; GET /servers counts the tools listed.
  merged         the merged endpoint (/mcp, or /sse + /message): initialize answers with the
                 union of the capabilities; tools/list is exactly every server's list (from
                 its own endpoint), each name NAME__tool with its input schema; one tool of
                 each server called by its prefixed name answers with that server's result;
                 filtered, unknown and unprefixed names get -32602 "Unknown tool".
  merged-extras  the merged endpoint's prompts (prefixed like tools, got from their server)
                 and resources (by URI, static and templated, read from their server).
  merged-advertised  what the merged initialize advertises is served: ping, completions
                 (by prefixed prompt), logging/setLevel, tasks/list when tasks is
                 advertised, resources/subscribe with the update delivered.
  merged-links   on a fresh merged session, with no list asked: a resource_link a tool
                 returned is read from its server (its URI matches that server's template).
  claude         the Claude Desktop file served unchanged: GET /servers lists the stdio
                 servers and the url entry as skipped (by its name); each stdio server
                 answers on its own endpoint with the file's "env" in its environment.
  claude-merged  the same file's merged endpoint: both stdio servers' tools, none of the
                 remote entry's, calls routed.
Prints one line and exits 0 on success; a failure says what was sent and what came back.
"""
import asyncio
import contextlib
import json
import sys
import traceback
import urllib.request

from mcp import ClientSession, MCPError, types
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

SEP = "__"
SERVERS = ("everything", "time", "fixture")
# One call per server: (tool, arguments, a substring only that server's answer has).
CALLS = {
    "everything": ("echo", {"message": "hi from many_check"}, "Echo: hi from many_check"),
    "time": ("get_current_time", {"timezone": "UTC"}, '"timezone": "UTC"'),
    "fixture": ("test_simple_text", {}, "This is a simple text response for testing."),
}
# The fixture's filter: {"deny": ["echo", "test_elicitation*"]}.
HIDDEN = ("echo", "test_elicitation", "test_elicitation_sep1034_defaults", "test_elicitation_sep1330_enums")
# The Claude Desktop file's "env" values (run.sh writes the same).
CLAUDE_ENV = {"everything": ("MANY_DEMO_TOKEN", "demo-token-from-claude-config")}


def text_of(result):
    return " ".join(getattr(c, "text", "") for c in result.content)


@contextlib.asynccontextmanager
async def connect(transport, url):
    cm = streamable_http_client(url) if transport == "streamable" else sse_client(url)
    async with cm as streams:
        async with ClientSession(streams[0], streams[1]) as session:
            init = await session.initialize()
            yield session, init


async def all_tools(s):
    tools, cursor = [], None
    for _ in range(50):
        page = await s.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            return tools
    raise AssertionError("tools/list never stopped paging")


async def called(s, name, args, want):
    result = await s.call_tool(name, args)
    text = text_of(result)
    assert not result.is_error, f"tools/call {name} {json.dumps(args)}: isError: {text!r}"
    assert want in text, f"tools/call {name} {json.dumps(args)}: expected {want!r} in {text!r}"
    return text


async def refused(s, name, args=None):
    """The call must get the unknown-tool answer: JSON-RPC -32602, 'Unknown tool: ...'."""
    try:
        result = await s.call_tool(name, args or {})
    except MCPError as e:
        assert e.code == -32602 and "Unknown tool" in e.message, \
            f"tools/call {name}: expected -32602 'Unknown tool...', got {e.code} {e.message!r} data={e.data!r}"
        return e.message
    raise AssertionError(f"tools/call {name} was served (it must be refused with -32602): "
                         f"isError={result.is_error} {text_of(result)[:200]!r}")


def get_servers(base):
    with urllib.request.urlopen(base + "/servers", timeout=10) as r:
        return json.loads(r.read())["servers"]


def own_url(base, transport, name):
    return f"{base}/servers/{name}/" + ("mcp" if transport == "streamable" else "sse")


def merged_url(base, transport):
    return base + ("/mcp" if transport == "streamable" else "/sse")


async def per_server_lists(base, transport, names=SERVERS):
    """Each server's tools as its own endpoint lists them: name -> {tool: inputSchema}."""
    out = {}
    for name in names:
        async with connect(transport, own_url(base, transport, name)) as (s, _):
            out[name] = {t.name: t.input_schema for t in await all_tools(s)}
    return out


async def check_servers(base, transport):
    notes = []
    for name in SERVERS:
        async with connect(transport, own_url(base, transport, name)) as (s, init):
            names = [t.name for t in await all_tools(s)]
            tool, args, want = CALLS[name]
            assert tool in names, f"{name}: {tool} not in tools/list: {names}"
            await called(s, tool, args, want)
            if name == "fixture":
                listed = [h for h in HIDDEN if h in names]
                assert not listed, f"fixture: filtered tools listed: {listed}"
                for h in HIDDEN:
                    await refused(s, h, {"message": "must not reach the child"} if h == "echo" else {})
                assert "test_simple_text" in names and "json_schema_2020_12_tool" in names, names
            entry = next((e for e in get_servers(base) if e.get("name") == name), None)
            assert entry is not None, f"GET /servers has no {name}: {get_servers(base)}"
            assert entry.get("tools") == len(names), \
                f"GET /servers says {name} has {entry.get('tools')} tools; tools/list gave {len(names)}"
            want_mode = "shared" if name == "time" else "session"
            assert entry.get("mode") == want_mode, f"{name}: mode {entry.get('mode')!r}, want {want_mode}"
            notes.append(f"{name}={len(names)}")
    print(f"ok per-server {transport}: {' '.join(notes)} tools, one call each, "
          f"fixture's {len(HIDDEN)} filtered tools absent and refused (-32602), /servers counts agree")


async def check_merged(base, transport):
    lists = await per_server_lists(base, transport)
    async with connect(transport, merged_url(base, transport)) as (s, init):
        caps = init.capabilities
        missing = [k for k in ("tools", "prompts", "resources", "logging") if getattr(caps, k) is None]
        assert not missing, f"merged initialize lacks {missing} (every one some server has): {caps}"
        tools = await all_tools(s)
        got = {t.name: t.input_schema for t in tools}
        assert len(got) == len(tools), f"merged tools/list repeats names: {[t.name for t in tools]}"
        unprefixed = [n for n in got if n.split(SEP, 1)[0] not in SERVERS or SEP not in n]
        assert not unprefixed, f"merged tools without a server prefix: {unprefixed}"
        want = {f"{srv}{SEP}{n}": schema for srv, tl in lists.items() for n, schema in tl.items()}
        extra, lost = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        assert not extra and not lost, f"merged tools/list differs from the servers' own lists: extra {extra}, missing {lost}"
        bad = [n for n in want if got[n] != want[n]]
        assert not bad, f"merged tools whose inputSchema differs from their server's: {bad[:5]}"
        for srv in SERVERS:
            tool, args, want_text = CALLS[srv]
            await called(s, f"{srv}{SEP}{tool}", args, want_text)
        # everything's echo is not filtered; the fixture's is.
        await called(s, f"everything{SEP}echo", {"message": "unfiltered"}, "Echo: unfiltered")
        for h in HIDDEN:
            assert f"fixture{SEP}{h}" not in got, f"fixture{SEP}{h} listed"
            await refused(s, f"fixture{SEP}{h}", {"message": "must not reach the child"} if h == "echo" else {})
        msg = await refused(s, f"nosuch{SEP}tool")
        await refused(s, "echo", {"message": "no prefix"})
        await refused(s, f"time{SEP}no_such_tool")
        per = " ".join(f"{srv}={len(lists[srv])}" for srv in SERVERS)
        print(f"ok merged {transport}: {len(got)} tools ({per}), caps {sorted(k for k, v in caps.model_dump().items() if v is not None)}, "
              f"a call routed to each server, filtered/unknown refused ({msg!r})")


async def check_merged_extras(base, transport):
    async with connect(transport, merged_url(base, transport)) as (s, init):
        prompts = [p.name for p in (await s.list_prompts()).prompts]
        unprefixed = [n for n in prompts if n.split(SEP, 1)[0] not in SERVERS or SEP not in n]
        assert not unprefixed, f"merged prompts without a server prefix: {unprefixed}"
        for p in (f"everything{SEP}simple-prompt", f"fixture{SEP}test_simple_prompt"):
            assert p in prompts, f"{p} not in merged prompts/list: {prompts}"
        got = await s.get_prompt(f"fixture{SEP}test_simple_prompt")
        text = " ".join(getattr(m.content, "text", "") for m in got.messages)
        assert "This is a simple prompt for testing." in text, f"fixture{SEP}test_simple_prompt gave {got}"
        got = await s.get_prompt(f"everything{SEP}simple-prompt")
        assert got.messages, f"everything{SEP}simple-prompt gave {got}"
        try:
            r = await s.get_prompt(f"nosuch{SEP}prompt")
            raise AssertionError(f"prompts/get nosuch{SEP}prompt was served: {r}")
        except MCPError as e:
            assert e.code == -32602, f"prompts/get of an unknown prompt: {e.code} {e.message!r}"
        uris = [str(r.uri) for r in (await s.list_resources()).resources]
        for u in ("test://static-text", "demo://resource/static/document/features.md"):
            assert u in uris, f"{u} not in merged resources/list: {uris}"
        templates = [t.uri_template for t in (await s.list_resource_templates()).resource_templates]
        assert "test://template/{id}/data" in templates, f"merged resources/templates/list: {templates}"
        r = await s.read_resource("test://static-text")
        assert "This is the content of the static text resource." in r.contents[0].text, r
        r = await s.read_resource("demo://resource/static/document/features.md")
        assert getattr(r.contents[0], "text", ""), f"everything's features.md: {r}"
        r = await s.read_resource("test://template/7/data")
        assert "Data for ID: 7" in r.contents[0].text, f"templated read: {r}"
        print(f"ok merged {transport} extras: {len(prompts)} prompts prefixed and got from their server, "
              f"{len(uris)} resources and {len(templates)} templates read by URI from their server")


async def check_merged_advertised(base, transport):
    """What the merged initialize advertises, it serves: a client takes it at its word."""
    updated = []

    async def on_message(m):
        if isinstance(m, types.ResourceUpdatedNotification):
            updated.append(str(m.params.uri))

    cm = streamable_http_client(merged_url(base, transport)) if transport == "streamable" else sse_client(merged_url(base, transport))
    served = []
    async with cm as streams:
        async with ClientSession(streams[0], streams[1], message_handler=on_message) as s:
            caps = (await s.initialize()).capabilities
            await s.send_ping()
            if caps.completions is not None:
                r = await s.complete(types.PromptReference(type="ref/prompt", name=f"fixture{SEP}test_prompt_with_arguments"),
                                     {"name": "arg1", "value": "pa"})
                assert "paris" in r.completion.values, f"completion/complete for fixture{SEP}test_prompt_with_arguments: {r}"
                served.append("completions")
            if caps.logging is not None:
                await s.set_logging_level("info")
                served.append("logging")
            if caps.tasks is not None:
                try:
                    await s.send_request(types.ListTasksRequest(), types.ListTasksResult)
                except MCPError as e:
                    raise AssertionError(f"initialize advertises tasks ({caps.tasks.model_dump(exclude_none=True)}) "
                                         f"but tasks/list gets {e.code} {e.message!r}") from None
                served.append("tasks")
            if caps.resources is not None and caps.resources.subscribe:
                await s.list_resources()
                await s.subscribe_resource("test://watched-resource")
                r = await s.call_tool(f"fixture{SEP}touch_resource", {"uri": "test://watched-resource"})
                assert text_of(r) == "updated", f"fixture{SEP}touch_resource after subscribing: {text_of(r)!r}"
                for _ in range(50):
                    if updated:
                        break
                    await asyncio.sleep(0.05)
                assert updated == ["test://watched-resource"], f"notifications/resources/updated received: {updated}"
                served.append("resources.subscribe")
    print(f"ok merged {transport}: ping and every advertised extra served ({', '.join(served)})")


async def check_merged_links(base, transport):
    """A resource link a tool returns, read on a fresh session that has listed nothing
    (clients read links from tool results as they come). Its URI matches only the
    everything server's template demo://resource/dynamic/blob/{resourceId}: the README's
    routing ("a URI no list named goes to the server whose template it matches") sends it
    there."""
    async with connect(transport, merged_url(base, transport)) as (s, _):
        r = await s.call_tool(f"everything{SEP}get-resource-links", {"count": 1})
        links = [str(c.uri) for c in r.content if getattr(c, "type", "") == "resource_link"]
        assert links, f"everything{SEP}get-resource-links returned no resource_link: {r.content}"
        try:
            got = await s.read_resource(links[0])
        except MCPError as e:
            raise AssertionError(f"resources/read {links[0]} (a resource_link from everything{SEP}get-resource-links, "
                                 f"no list asked on this session) -> {e.code} {e.message!r}") from None
        assert got.contents and str(got.contents[0].uri) == links[0], f"resources/read {links[0]}: {got}"
        print(f"ok merged {transport}: {links[0]} (a tool's resource_link) read from its server without listing first")


async def check_claude(base, transport):
    async with connect(transport, own_url(base, transport, "everything")) as (s, _):
        var, value = CLAUDE_ENV["everything"]
        env = await called(s, "get-env", {}, value)
        assert json.loads(env).get(var) == value, f"{var} not passed from the file's env"
    async with connect(transport, own_url(base, transport, "time")) as (s, _):
        await called(s, *CALLS["time"])
    servers = get_servers(base)
    by_name = {e.get("name"): e for e in servers}
    for name in ("everything", "time"):
        assert name in by_name and by_name[name].get("state") == "ready", \
            f"GET /servers: {name} is not ready: {json.dumps(servers)}"
    skipped = [e for e in servers if e.get("state") == "skipped"]
    assert len(skipped) == 1, f"GET /servers: expected one skipped entry, got {json.dumps(servers)}"
    assert "url" in skipped[0].get("reason", ""), f"skipped without saying why: {json.dumps(skipped[0])}"
    assert skipped[0].get("name") == "remote-notes", \
        f"GET /servers: the skipped entry has no \"name\": \"remote-notes\" (stdio servers and disabled ones do): {json.dumps(skipped[0])}"
    print(f"ok claude desktop file {transport}: everything (the file's env passed) and time answer, "
          f"remote-notes listed as skipped ({skipped[0].get('reason')!r})")


async def check_claude_merged(base, transport):
    async with connect(transport, merged_url(base, transport)) as (s, init):
        names = [t.name for t in await all_tools(s)]
        prefixes = sorted({n.split(SEP, 1)[0] for n in names})
        assert prefixes == ["everything", "time"], f"merged tools of servers {prefixes}: {names}"
        var, value = CLAUDE_ENV["everything"]
        await called(s, f"everything{SEP}get-env", {}, value)
        await called(s, f"time{SEP}get_current_time", {"timezone": "UTC"}, '"timezone": "UTC"')
        await refused(s, f"remote-notes{SEP}anything")
        print(f"ok claude desktop file merged {transport}: {len(names)} tools of everything and time, calls routed, none of remote-notes")


CHECKS = {"servers": check_servers, "merged": check_merged, "merged-extras": check_merged_extras,
          "merged-advertised": check_merged_advertised, "merged-links": check_merged_links,
          "claude": check_claude, "claude-merged": check_claude_merged}

def leaves(e):
    """The exceptions themselves, out of the task groups the SDK wraps them in."""
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            yield from leaves(sub)
    else:
        yield e


if __name__ == "__main__":
    check, transport, base = sys.argv[1], sys.argv[2], sys.argv[3].rstrip("/")
    assert transport in ("streamable", "sse"), transport
    try:
        asyncio.run(asyncio.wait_for(CHECKS[check](base, transport), 60))
    except BaseException as e:  # noqa: BLE001 - the last lines say what failed
        traceback.print_exc()
        sys.stderr.flush()
        for leaf in leaves(e):
            what = f"MCPError {leaf.code}: {leaf.message}" if isinstance(leaf, MCPError) else f"{type(leaf).__name__}: {leaf}"
            print(f"FAIL {what}", flush=True)
        sys.exit(1)
