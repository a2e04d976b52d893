#!/usr/bin/env python3
"""Drives tests/fixtures/modern_server.py directly over stdio (no bridge) and checks every
answer the 2026-07-28 conformance scenarios depend on. Prints one line per check; exit 1 on
any failure. Usage: python3 tests/external/modern_fixture_check.py [path/to/modern_server.py]
"""
import json
import os
import queue
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "fixtures", "modern_server.py")
V = "2026-07-28"
CAPS = {"sampling": {}, "elicitation": {}, "roots": {"listChanged": True}}
FAILED = []


def meta(**over):
    m = {"io.modelcontextprotocol/protocolVersion": V,
         "io.modelcontextprotocol/clientInfo": {"name": "fixture-check", "version": "1"},
         "io.modelcontextprotocol/clientCapabilities": CAPS}
    m.update(over)
    return m


class Child:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, FIXTURE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, encoding="utf-8")
        self.q = queue.Queue()
        self.lines = []
        self.next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            assert "\n" not in line.rstrip("\n"), "embedded newline"
            msg = json.loads(line)
            self.lines.append(msg)
            self.q.put(msg)

    def write(self, msg):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()

    def request(self, method, params=None, rid=None, envelope=True, timeout=5):
        """Send a request; return (response, notifications seen before it)."""
        self.next += 1
        rid = self.next if rid is None else rid
        if envelope:
            params = dict(params or {})
            params["_meta"] = dict(meta(), **(params.get("_meta") or {}))
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.write(msg)
        notes, end = [], time.time() + timeout
        while time.time() < end:
            try:
                m = self.q.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                break
            if m.get("id") == rid and "method" not in m:
                return m, notes
            notes.append(m)
        raise AssertionError("no response to %s id %r" % (method, rid))

    def drain(self, secs):
        out, end = [], time.time() + secs
        while time.time() < end:
            try:
                out.append(self.q.get(timeout=max(0.01, end - time.time())))
            except queue.Empty:
                break
        return out


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else "  -- %s" % detail))
    if not cond:
        FAILED.append(name)


def result(resp):
    return resp.get("result") or {}


def has_server_meta(r):
    return (r.get("_meta") or {}).get("io.modelcontextprotocol/serverInfo", {}).get("name") is not None


def main():
    c = Child()
    SI = "io.modelcontextprotocol/serverInfo"

    # --- discovery and envelope validation
    r, _ = c.request("server/discover")
    d = result(r)
    check("discover: supportedVersions", d.get("supportedVersions") == [V], r)
    check("discover: resultType/ttlMs/cacheScope/serverInfo",
          d.get("resultType") == "complete" and isinstance(d.get("ttlMs"), int) and d.get("cacheScope") in ("public", "private")
          and has_server_meta(d), r)
    caps = d.get("capabilities", {})
    check("discover: capabilities", caps.get("tools", {}).get("listChanged") and caps.get("resources", {}).get("subscribe")
          and caps.get("resources", {}).get("listChanged") and caps.get("prompts", {}).get("listChanged")
          and "completions" in caps, caps)
    r, _ = c.request("server/discover", {}, envelope=False, rid=101)
    check("missing params/_meta -> -32602 (id echoed)", r.get("error", {}).get("code") == -32602 and r["id"] == 101, r)
    r, _ = c.request("server/discover", {"_meta": {"io.modelcontextprotocol/clientCapabilities": {}}}, envelope=False)
    check("missing protocolVersion -> -32602", r.get("error", {}).get("code") == -32602, r)
    r, _ = c.request("server/discover", {"_meta": {"io.modelcontextprotocol/protocolVersion": V}}, envelope=False)
    check("missing clientCapabilities -> -32602", r.get("error", {}).get("code") == -32602, r)
    r, _ = c.request("server/discover", {"_meta": {"io.modelcontextprotocol/protocolVersion": V,
                                                   "io.modelcontextprotocol/clientCapabilities": {}}}, envelope=False)
    check("clientInfo optional", result(r).get("supportedVersions") == [V], r)
    r, _ = c.request("server/discover", {"_meta": {"io.modelcontextprotocol/protocolVersion": "v999.0.0"}})
    e = r.get("error", {})
    check("unsupported version -> -32022 supported/requested", e.get("code") == -32022 and e.get("data") ==
          {"supported": [V], "requested": "v999.0.0"}, r)
    r, _ = c.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                    "clientInfo": {"name": "legacy", "version": "1"}}, envelope=False)
    check("legacy initialize -> -32601 naming 2026-07-28", r.get("error", {}).get("code") == -32601
          and V in r["error"]["message"], r)
    r, _ = c.request("initialize", {})
    check("enveloped initialize -> -32601", r.get("error", {}).get("code") == -32601, r)
    for m in ("ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe", "unknown/method"):
        r, _ = c.request(m, {"uri": "test://watched-resource", "level": "info"})
        check("%s -> -32601" % m, r.get("error", {}).get("code") == -32601, r)

    # --- lists and caching hints
    names = {}
    for m, field in (("tools/list", "tools"), ("prompts/list", "prompts"), ("resources/list", "resources"),
                     ("resources/templates/list", "resourceTemplates")):
        r, _ = c.request(m)
        res = result(r)
        names[field] = [x.get("name") for x in res.get(field, [])]
        check("%s: list + resultType + ttlMs + cacheScope + serverInfo" % m, isinstance(res.get(field), list) and res.get(field)
              and res.get("resultType") == "complete" and res.get("ttlMs", -1) >= 0 and res.get("cacheScope") in ("public", "private")
              and has_server_meta(res), r)
    want_tools = ["test_simple_text", "test_image_content", "test_audio_content", "test_embedded_resource",
                  "test_multiple_content_types", "test_error_handling", "test_tool_with_progress", "test_missing_capability",
                  "test_streaming_elicitation", "test_logging_tool", "test_trigger_tool_change", "test_trigger_prompt_change"] + \
                 ["test_input_required_result_" + k for k in ("elicitation", "sampling", "list_roots", "request_state",
                                                              "multiple_inputs", "multi_round", "tampered_state", "capabilities")]
    check("tools/list has every suite tool", all(t in names["tools"] for t in want_tools),
          [t for t in want_tools if t not in names["tools"]])
    r, _ = c.request("tools/list")
    check("every tool has description + inputSchema", all(t.get("description") and t.get("inputSchema", {}).get("type") == "object"
                                                           for t in result(r)["tools"]))

    # --- tools
    def call(name, args=None, **extra):
        p = {"name": name}
        if args is not None:
            p["arguments"] = args
        p.update(extra)
        return c.request("tools/call", p)

    r, _ = call("test_simple_text")
    check("test_simple_text", result(r).get("content") == [{"type": "text", "text": "This is a simple text response for testing."}]
          and result(r).get("resultType") == "complete" and has_server_meta(result(r)) and "ttlMs" not in result(r), r)
    r, _ = call("test_image_content", {})
    check("test_image_content", result(r)["content"][0]["type"] == "image" and result(r)["content"][0]["mimeType"] == "image/png", r)
    r, _ = call("test_audio_content", {})
    check("test_audio_content", result(r)["content"][0]["mimeType"] == "audio/wav" and result(r)["content"][0]["data"], r)
    r, _ = call("test_embedded_resource", {})
    check("test_embedded_resource", result(r)["content"][0]["resource"]["text"] == "This is an embedded resource content.", r)
    r, _ = call("test_multiple_content_types", {})
    check("test_multiple_content_types", [x["type"] for x in result(r)["content"]] == ["text", "image", "resource"], r)
    r, _ = call("test_error_handling", {})
    check("test_error_handling isError", result(r).get("isError") is True, r)
    r, notes = call("test_tool_with_progress", {}, _meta={"progressToken": "progress-test-1"})
    prog = [n["params"] for n in notes if n.get("method") == "notifications/progress"]
    check("progress 0/50/100 with the request's token", [p["progress"] for p in prog] == [0, 50, 100]
          and all(p["progressToken"] == "progress-test-1" and p["total"] == 100 for p in prog) and "content" in result(r), (prog, r))
    r, notes = call("test_tool_with_progress", {})
    check("no progress without a token", not notes, notes)
    r, notes = call("test_tool_with_logging", {})
    check("no logs without logLevel", not notes and "content" in result(r), notes)
    r, notes = call("test_tool_with_logging", {}, _meta={"io.modelcontextprotocol/logLevel": "debug"})
    logs = [n["params"] for n in notes if n.get("method") == "notifications/message"]
    check("3 info logs with logLevel debug", len(logs) == 3 and all(l["level"] == "info" and l["data"] for l in logs), notes)
    r, notes = call("test_tool_with_logging", {}, _meta={"io.modelcontextprotocol/logLevel": "warning"})
    check("no info logs with logLevel warning", not notes, notes)
    r, notes = call("test_logging_tool", {})
    check("test_logging_tool silent without logLevel", not notes, notes)
    r, _ = call("test_missing_capability", {}, _meta={"io.modelcontextprotocol/clientCapabilities": {}})
    check("test_missing_capability -> -32021 {sampling:{}}", r.get("error", {}).get("code") == -32021 and
          r["error"].get("data") == {"requiredCapabilities": {"sampling": {}}}, r)
    r, _ = call("test_missing_capability", {})
    check("test_missing_capability with sampling -> complete", "content" in result(r), r)
    r, notes = call("test_streaming_elicitation", {}, _meta={"io.modelcontextprotocol/clientCapabilities": {"elicitation": {}}})
    check("test_streaming_elicitation -> input_required, no requests", result(r).get("resultType") == "input_required"
          and not any("id" in n for n in notes), r)
    r, _ = call("no_such_tool", {})
    check("unknown tool -> -32602", r.get("error", {}).get("code") == -32602, r)

    # --- resources
    r, _ = c.request("resources/read", {"uri": "test://static-text"})
    res = result(r)
    check("read static-text + ttlMs/cacheScope", res["contents"][0]["text"] == "This is the content of the static text resource."
          and res.get("ttlMs") is not None and res.get("cacheScope") and has_server_meta(res), r)
    r, _ = c.request("resources/read", {"uri": "test://static-binary"})
    check("read static-binary", result(r)["contents"][0].get("blob") and result(r)["contents"][0]["mimeType"] == "image/png", r)
    r, _ = c.request("resources/read", {"uri": "test://template/123/data"})
    check("read template 123", "123" in result(r)["contents"][0]["text"], r)
    u = "test://nonexistent-resource-for-conformance-testing"
    r, _ = c.request("resources/read", {"uri": u})
    check("unknown resource -> -32602 data.uri", r.get("error", {}).get("code") == -32602 and r["error"]["data"] == {"uri": u}, r)
    r, _ = c.request("resources/read", {"uri": "test://input-required-resource"})
    ir = result(r)
    check("resources/read MRTR round 1", ir.get("resultType") == "input_required" and "resource_reason" in ir.get("inputRequests", {})
          and "ttlMs" not in ir, r)
    r, _ = c.request("resources/read", {"uri": "test://input-required-resource",
                                        "inputResponses": {"resource_reason": {"action": "accept", "content": {"reason": "tests"}}}})
    check("resources/read MRTR round 2", result(r)["contents"][0]["text"] == "Reason: tests" and result(r).get("ttlMs") is not None, r)

    # --- prompts and completion
    r, _ = c.request("prompts/get", {"name": "test_simple_prompt"})
    check("test_simple_prompt", result(r)["messages"][0]["role"] == "user", r)
    r, _ = c.request("prompts/get", {"name": "test_prompt_with_arguments", "arguments": {"arg1": "testValue1", "arg2": "testValue2"}})
    t = result(r)["messages"][0]["content"]["text"]
    check("test_prompt_with_arguments", "testValue1" in t and "testValue2" in t, r)
    r, _ = c.request("prompts/get", {"name": "test_prompt_with_embedded_resource", "arguments": {"resourceUri": "test://example-resource"}})
    check("test_prompt_with_embedded_resource", result(r)["messages"][0]["content"]["resource"]["uri"] == "test://example-resource", r)
    r, _ = c.request("prompts/get", {"name": "test_prompt_with_image"})
    check("test_prompt_with_image", result(r)["messages"][0]["content"]["type"] == "image", r)
    r, _ = c.request("completion/complete", {"ref": {"type": "ref/prompt", "name": "test_prompt_with_arguments"},
                                             "argument": {"name": "arg1", "value": "test"}})
    check("completion/complete", result(r).get("completion", {}).get("values") == ["test", "testValue1", "testValue2"]
          and result(r).get("resultType") == "complete", r)
    r, _ = c.request("completion/complete", {"ref": {"type": "ref/resource", "uri": "test://template/{id}/data"},
                                             "argument": {"name": "id", "value": "1"}})
    check("completion on the resource template", result(r)["completion"]["values"] == ["1", "123"], r)

    # --- MRTR
    def retry(name, responses, state=None, method="tools/call", **p):
        params = {"name": name, "inputResponses": responses}
        params.update(p)
        if method == "tools/call":
            params.setdefault("arguments", {})
        if state is not None:
            params["requestState"] = state
        return c.request(method, params)[0]

    accept = lambda **content: {"action": "accept", "content": content}
    sampled = {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "m", "stopReason": "endTurn"}
    roots = {"roots": [{"uri": "file:///test/root", "name": "Test Root"}]}

    r, _ = call("test_input_required_result_elicitation", {})
    ir = result(r)
    check("elicitation r1: key user_name, explicit resultType", ir.get("resultType") == "input_required"
          and ir["inputRequests"]["user_name"]["method"] == "elicitation/create" and has_server_meta(ir), r)
    r = retry("test_input_required_result_elicitation", {"user_name": accept(name="Alice")})
    check("elicitation r2 complete", result(r).get("content", [{}])[0].get("text") == "Hello, Alice!", r)
    r = retry("test_input_required_result_elicitation", {"wrong_key": accept(data="x")})
    check("wrong key -> asks again", result(r).get("resultType") == "input_required", r)
    r = retry("test_input_required_result_elicitation", {"user_name": accept(name="Alice"), "unknown_extra_key": accept(foo="bar")})
    check("extra keys ignored", result(r).get("resultType") == "complete", r)
    r = retry("test_input_required_result_elicitation", {"user_name": 12345})
    check("invalid response -> error", r.get("error", {}).get("code") == -32602, r)
    r = retry("test_input_required_result_elicitation", None)
    check("null inputResponses -> error", r.get("error", {}).get("code") == -32602, r)
    r, _ = call("test_input_required_result_elicitation", {}, _meta={"io.modelcontextprotocol/clientCapabilities": {"sampling": {}}})
    check("elicitation without the capability -> -32021", r.get("error", {}).get("code") == -32021
          and r["error"]["data"] == {"requiredCapabilities": {"elicitation": {}}}, r)

    r, _ = call("test_input_required_result_sampling", {})
    key = list(result(r)["inputRequests"])[0]
    check("sampling r1", key == "capital_question" and result(r)["inputRequests"][key]["method"] == "sampling/createMessage", r)
    r = retry("test_input_required_result_sampling", {key: sampled})
    check("sampling r2", result(r)["content"][0]["text"] == "Sampling result: Paris", r)

    r, _ = call("test_input_required_result_list_roots", {})
    key = list(result(r)["inputRequests"])[0]
    check("roots r1", key == "client_roots" and result(r)["inputRequests"][key]["method"] == "roots/list", r)
    r = retry("test_input_required_result_list_roots", {key: roots})
    check("roots r2", result(r)["content"][0]["text"].startswith("Found 1 root(s)"), r)

    r, _ = call("test_input_required_result_request_state", {})
    st = result(r).get("requestState")
    check("request_state r1", isinstance(st, str) and "confirm" in result(r)["inputRequests"], r)
    r = retry("test_input_required_result_request_state", {"confirm": accept(ok=True)}, st)
    check("request_state r2 state-ok", "state-ok" in result(r)["content"][0]["text"], r)
    r = retry("test_input_required_result_request_state", {"confirm": accept(ok=True)}, st + "x")
    check("request_state tampered -> error", r.get("error", {}).get("code") == -32602, r)

    r, _ = call("test_input_required_result_multiple_inputs", {})
    reqs, st = result(r)["inputRequests"], result(r).get("requestState")
    check("multiple r1: 3 methods + state", sorted(v["method"] for v in reqs.values()) ==
          ["elicitation/create", "roots/list", "sampling/createMessage"] and st, r)
    r = retry("test_input_required_result_multiple_inputs", {"user_name": accept(name="Alice")}, st)
    check("multiple partial -> asks the rest", sorted(result(r).get("inputRequests", {})) == ["client_roots", "greeting"], r)
    r = retry("test_input_required_result_multiple_inputs", {"greeting": sampled, "client_roots": roots}, result(r)["requestState"])
    check("multiple complete after partial rounds", result(r).get("content", [{}])[0].get("text") == "Name: Alice; Greeting: Paris; Roots: 1", r)
    r, _ = call("test_input_required_result_multiple_inputs", {})
    st = result(r)["requestState"]
    r = retry("test_input_required_result_multiple_inputs", {"user_name": accept(name="A"), "greeting": sampled, "client_roots": roots}, st)
    check("multiple complete in one retry", result(r).get("resultType") == "complete", r)

    r, _ = call("test_input_required_result_multi_round", {})
    s1 = result(r)["requestState"]
    r = retry("test_input_required_result_multi_round", {"step1": accept(name="Alice")}, s1)
    s2 = result(r).get("requestState")
    check("multi_round r2: new input_required with a different state", result(r).get("resultType") == "input_required"
          and "step2" in result(r)["inputRequests"] and s2 and s2 != s1, r)
    r = retry("test_input_required_result_multi_round", {"step2": accept(color="blue")}, s2)
    check("multi_round r3 complete", result(r)["content"][0]["text"] == "Multi-round complete for Alice who likes blue", r)

    r, _ = call("test_input_required_result_tampered_state", {})
    st = result(r)["requestState"]
    r = retry("test_input_required_result_tampered_state", {"confirm": accept(ok=True)}, st + "-TAMPERED")
    check("tampered_state -> error", r.get("error", {}).get("code") == -32602, r)
    r = retry("test_input_required_result_tampered_state", {"confirm": accept(ok=True)}, st)
    check("tampered_state with the real state -> complete", "integrity-ok" in result(r)["content"][0]["text"], r)

    r, _ = call("test_input_required_result_capabilities", {}, _meta={"io.modelcontextprotocol/clientCapabilities": {"sampling": {}}})
    check("capabilities: sampling only", list(result(r).get("inputRequests", {})) == ["sample_input"], r)
    r = retry("test_input_required_result_capabilities", {"sample_input": sampled}, result(r)["requestState"],
              _meta={"io.modelcontextprotocol/clientCapabilities": {"sampling": {}}})
    check("capabilities r2 complete", "capabilities-ok" in result(r)["content"][0]["text"], r)

    r, _ = c.request("prompts/get", {"name": "test_input_required_result_prompt"})
    check("prompt MRTR r1", "user_context" in result(r).get("inputRequests", {}), r)
    r = retry("test_input_required_result_prompt", {"user_context": accept(context="test context")}, method="prompts/get")
    check("prompt MRTR r2", result(r)["messages"][0]["content"]["text"] == "Prompt with context: test context", r)
    for m in ("tools/list", "prompts/list"):
        r, _ = c.request(m)
        check("%s never input_required" % m, result(r).get("resultType") == "complete", r)

    # --- subscriptions/listen
    c.write({"jsonrpc": "2.0", "id": "L1", "method": "subscriptions/listen",
             "params": {"_meta": meta(), "notifications": {"toolsListChanged": True,
                                                           "resourceSubscriptions": ["test://watched-resource", "test://nope"]}}})
    ack = c.drain(0.3)
    check("listen: ack first, subscriptionId = request id, honoured subset",
          len(ack) == 1 and ack[0].get("method") == "notifications/subscriptions/acknowledged"
          and ack[0]["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "L1"
          and ack[0]["params"]["notifications"] == {"toolsListChanged": True, "resourceSubscriptions": ["test://watched-resource"]}, ack)
    c.write({"jsonrpc": "2.0", "id": "L2", "method": "subscriptions/listen",
             "params": {"_meta": meta(), "notifications": {"promptsListChanged": True}}})
    c.drain(0.3)
    r, notes = call("test_trigger_tool_change", {})
    notes += c.drain(0.2)
    tl = [n for n in notes if n.get("method") == "notifications/tools/list_changed"]
    check("tools list_changed only to L1, tagged", len(tl) == 1 and tl[0]["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "L1", notes)
    r, notes = call("test_trigger_prompt_change", {})
    notes += c.drain(0.2)
    pl = [n for n in notes if n.get("method") == "notifications/prompts/list_changed"]
    check("prompts list_changed only to L2", len(pl) == 1 and pl[0]["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "L2", notes)
    r, notes = call("test_trigger_resource_update", {"uri": "test://watched-resource"})
    notes += c.drain(0.2)
    ru = [n for n in notes if n.get("method") == "notifications/resources/updated"]
    check("resources/updated to L1", len(ru) == 1 and ru[0]["params"]["uri"] == "test://watched-resource", notes)
    c.write({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "L2", "reason": "closed"}})
    time.sleep(0.1)
    r, notes = call("test_trigger_prompt_change", {})
    notes += c.drain(0.2)
    check("cancelled listen gets nothing more", not [n for n in notes if n.get("method", "").startswith("notifications/prompts")], notes)
    r, notes = call("bridge_end_subscriptions", {})
    notes += c.drain(0.2)
    fin = [n for n in notes if n.get("id") == "L1"]
    check("graceful end: final listen result", len(fin) == 1 and fin[0]["result"]["resultType"] == "complete"
          and fin[0]["result"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "L1"
          and not [n for n in notes if n.get("id") == "L2"], notes)

    # --- cancellation of a running call
    c.write({"jsonrpc": "2.0", "id": 9001, "method": "tools/call",
             "params": {"name": "bridge_slow", "arguments": {"seconds": 5}, "_meta": meta(progressToken="slow")}})
    got = c.drain(0.35)
    c.write({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 9001}})
    time.sleep(0.2)
    c.drain(0.2)
    after = c.drain(0.4)
    check("cancelled call: progress before, silence after", any(n.get("method") == "notifications/progress" for n in got)
          and not after, after)
    r, _ = call("bridge_cancelled_requests", {})
    check("cancellation recorded", 9001 in json.loads(result(r)["content"][0]["text"]), r)

    # --- framing and exit
    c.write({"jsonrpc": "2.0", "id": "r", "result": {}})  # a stray response is ignored
    c.p.stdin.write("not json\n")
    c.p.stdin.flush()
    bad = c.drain(0.3)
    check("parse error answered with -32700, stray response ignored", len(bad) == 1 and bad[0]["error"]["code"] == -32700, bad)
    check("never wrote a JSON-RPC request", not [m for m in c.lines if "method" in m and "id" in m], "")
    c.p.stdin.close()
    try:
        c.p.wait(3)
        check("exits on stdin EOF", c.p.returncode == 0, c.p.returncode)
    except subprocess.TimeoutExpired:
        c.p.kill()
        check("exits on stdin EOF", False, "still running")
    print("%d failed" % len(FAILED) if FAILED else "all fixture checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
