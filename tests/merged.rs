//! Issue 18: the merged endpoint (every --config server behind /mcp and /sse as one MCP
//! server, `NAME__tool`) and reload on SIGHUP. Real binary, real sockets, real children.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A config file of its own for one test (removed when dropped).
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(servers: Value) -> ConfigFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "stdio-sse-merged-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = ConfigFile(path);
        f.write(servers);
        f
    }
    fn write(&self, servers: Value) {
        let text = serde_json::to_string_pretty(&json!({ "mcpServers": servers })).unwrap();
        std::fs::write(&self.0, text).unwrap();
    }
    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn demo() -> Value {
    json!({"command": BIN, "args": ["__demo-server"]})
}

fn fixture_server() -> Value {
    json!({"command": "python3", "args": [fixture("everything.py")]})
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list["result"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {list}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

fn only(r: &Response) -> Value {
    r.messages()
        .into_iter()
        .last()
        .unwrap_or_else(|| panic!("no message in {}", r.text()))
}

fn list(s: &Session, id: i64, method: &str) -> Value {
    only(&s.post(&json!({"jsonrpc": "2.0", "id": id, "method": method})))
}

/// SIGHUP, then the log line (containing `says`) that tells how the reload went.
fn reload(server: &Server, says: &str) -> String {
    let from = server.log_len();
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    server.wait_log_after(says, from).1
}

fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let r = Conn::open(server).request("GET", path, &[], b"");
    (r.status, r.json())
}

#[test]
fn the_merged_endpoint_lists_every_servers_tools_prefixed_and_routes_each_call_to_its_server() {
    let file = ConfigFile::new(json!({
        "demo": demo(),
        "fx": {"command": "python3", "args": [fixture("everything.py")], "mode": "shared",
               "tools": {"deny": ["echo", "test_*_content"]}},
    }));
    let server = Server::start(&["--config", file.arg()], &[]);
    let s = Session::open(&server);
    assert_eq!(s.init["result"]["serverInfo"]["name"], "stdio-sse");
    assert!(s.init["result"]["capabilities"]["tools"].is_object());
    let tools = names(&list(&s, 2, "tools/list"), "tools");
    assert!(
        tools
            .iter()
            .all(|t| t.starts_with("demo__") || t.starts_with("fx__")),
        "{tools:?}"
    );
    for t in ["demo__echo", "demo__add", "fx__test_simple_text", "fx__pid"] {
        assert!(tools.contains(&t.to_string()), "{t} missing from {tools:?}");
    }
    // The fixture's filter holds on the merged endpoint too.
    for t in ["fx__echo", "fx__test_image_content"] {
        assert!(
            !tools.contains(&t.to_string()),
            "{t} should be filtered: {tools:?}"
        );
    }
    let sum = only(&s.call(3, "demo__add", json!({"a": 2, "b": 3})));
    assert_eq!(result_text(&sum), "5", "{sum}");
    let text = only(&s.call(4, "fx__test_simple_text", json!({})));
    assert_eq!(
        result_text(&text),
        "This is a simple text response for testing."
    );
    for (id, name) in [(5, "fx__echo"), (6, "nobody__echo"), (7, "echo")] {
        let refused = only(&s.call(id, name, json!({"message": "x"})));
        let err = &refused["error"];
        assert_eq!(err["code"], -32602, "{name}: {refused}");
        assert_eq!(err["message"], format!("Unknown tool: {name}"), "{refused}");
    }
    // A tool its server does not have: the server's own answer, as on its own endpoint.
    let theirs = only(&s.call(8, "demo__nothing", json!({})));
    assert_eq!(theirs["result"]["isError"], true, "{theirs}");
    // The demo is session mode: this merged session has a child of its own there; the
    // fixture is shared: one child whoever asks.
    let (_, servers) = get_json(&server, "/servers");
    let by = |n: &str| {
        servers["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by("demo")["children"], 1, "{servers}");
    assert_eq!(by("fx")["children"], 1, "{servers}");
    assert_eq!(servers["merged"]["sessions"], 1, "{servers}");
    let demo_child = children_of(server.pid())
        .into_iter()
        .find(|p| comm(*p).contains("stdio-sse"))
        .expect("the demo's child of this merged session");
    assert_eq!(s.delete().status, 200);
    assert_gone(demo_child, "the merged session's demo child after DELETE");
}

#[test]
fn prompts_and_resources_are_routed_by_name_and_by_uri() {
    // Two fixtures list the same URIs: the first in the file serves them.
    let file =
        ConfigFile::new(json!({"demo": demo(), "fx": fixture_server(), "fx2": fixture_server()}));
    let server = Server::start(&["--config", file.arg()], &[]);
    // A URI straight from a tool's result (a resource link), before any list: the
    // bridge reads the lists, then routes it.
    let fresh = Session::open(&server);
    let linked = only(&fresh.post(
        &json!({"jsonrpc": "2.0", "id": 2, "method": "resources/read",
        "params": {"uri": "test://template/3/data"}}),
    ));
    assert!(linked["result"]["contents"].is_array(), "{linked}");
    let s = Session::open(&server);
    let prompts = names(&list(&s, 2, "prompts/list"), "prompts");
    assert!(
        prompts.contains(&"fx__test_simple_prompt".to_string()),
        "{prompts:?}"
    );
    let got = only(
        &s.post(&json!({"jsonrpc": "2.0", "id": 3, "method": "prompts/get",
        "params": {"name": "fx__test_simple_prompt"}})),
    );
    assert!(got["result"]["messages"].is_array(), "{got}");
    let unknown = only(
        &s.post(&json!({"jsonrpc": "2.0", "id": 4, "method": "prompts/get",
        "params": {"name": "demo__none"}})),
    );
    assert!(unknown["error"].is_object(), "{unknown}");
    let resources = list(&s, 5, "resources/list");
    let uris: Vec<&str> = resources["result"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uri"].as_str().unwrap())
        .collect();
    assert!(uris.contains(&"test://static-text"), "{resources}");
    assert_eq!(
        uris.iter().filter(|u| **u == "test://static-text").count(),
        1,
        "{resources}"
    );
    server.wait_log("merged_uri_conflict");
    let read = only(&s.post(
        &json!({"jsonrpc": "2.0", "id": 6, "method": "resources/read",
        "params": {"uri": "test://static-text"}}),
    ));
    assert!(read["result"]["contents"][0]["text"].is_string(), "{read}");
    let templates = list(&s, 7, "resources/templates/list");
    assert!(
        templates["result"]["resourceTemplates"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{templates}"
    );
    let by_template = only(&s.post(
        &json!({"jsonrpc": "2.0", "id": 8, "method": "resources/read",
        "params": {"uri": "test://template/7/data"}}),
    ));
    assert!(
        by_template["result"]["contents"].is_array(),
        "{by_template}"
    );
    let nowhere = only(&s.post(
        &json!({"jsonrpc": "2.0", "id": 9, "method": "resources/read",
        "params": {"uri": "nowhere://x"}}),
    ));
    assert_eq!(nowhere["error"]["code"], -32002, "{nowhere}");
    let ping = only(&s.post(&json!({"jsonrpc": "2.0", "id": 10, "method": "ping"})));
    assert_eq!(ping["result"], json!({}));
    let odd = only(&s.post(&json!({"jsonrpc": "2.0", "id": 11, "method": "no/such"})));
    assert_eq!(odd["error"]["code"], -32601, "{odd}");
}

#[test]
fn a_server_that_cannot_start_leaves_its_tools_out_and_is_named_by_readyz() {
    let file = ConfigFile::new(json!({
        "demo": demo(),
        "broken": {"command": "/nonexistent/stdio-sse-test-server"},
    }));
    let server = Server::start(&["--config", file.arg()], &[]);
    let s = Session::open(&server);
    let tools = names(&list(&s, 2, "tools/list"), "tools");
    assert!(tools.contains(&"demo__echo".to_string()), "{tools:?}");
    assert!(
        !tools.iter().any(|t| t.starts_with("broken__")),
        "{tools:?}"
    );
    server.wait_log("merged_server_failed");
    let (status, ready) = get_json(&server, "/readyz");
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready["reason"].as_str().unwrap().contains("\"broken\""),
        "{ready}"
    );
    let (status, _) = get_json(&server, "/servers/demo/readyz");
    assert_eq!(status, 200);
    assert!(
        metric(
            &server,
            "stdio_sse_server_start_failures_total{server=\"broken\"}"
        ) >= 1.0
    );
}

#[test]
fn a_servers_request_reaches_the_merged_client_and_its_answer_goes_back() {
    let file = ConfigFile::new(json!({"demo": demo(), "fx": fixture_server()}));
    let server = Server::start(&["--config", file.arg()], &[]);
    let s = Session::open(&server);
    let mut stream = s.post_stream(&tool_call(2, "fx__test_sampling", json!({"prompt": "hi"})));
    let ask = stream
        .next_message()
        .expect("the fixture's sampling request");
    assert_eq!(ask["method"], "sampling/createMessage", "{ask}");
    let answer = json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"role": "assistant",
        "content": {"type": "text", "text": "sampled by the test"}, "model": "test"}});
    assert_eq!(s.post(&answer).status, 202);
    let done = stream.next_message().expect("the tool's result");
    assert_eq!(done["id"], 2, "{done}");
    assert!(result_text(&done).contains("sampled by the test"), "{done}");
}

#[test]
fn a_servers_list_changed_reaches_the_merged_clients_stream() {
    let file = ConfigFile::new(json!({"demo": demo(), "fx": fixture_server()}));
    let server = Server::start(&["--config", file.arg()], &[]);
    let s = Session::open(&server);
    let mut get = s.get_stream();
    assert_eq!(get.status, 200);
    let r = s.call(2, "fx__test_trigger_tool_change", json!({}));
    assert!(only(&r)["result"].is_object(), "{}", r.text());
    let note = get.next_message().expect("list_changed on the GET stream");
    assert_eq!(note["method"], "notifications/tools/list_changed", "{note}");
}

#[test]
fn the_merged_endpoint_serves_legacy_sse_and_2026_clients() {
    let file = ConfigFile::new(json!({"demo": demo(), "fx": fixture_server()}));
    let server = Server::start(&["--config", file.arg()], &[]);
    // Legacy HTTP+SSE on /sse: the endpoint event names /message.
    let mut c = Conn::open(&server);
    c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    let mut sse = SseReader::new(c);
    let ev = sse.next_event().expect("endpoint event");
    assert_eq!(ev.event.as_deref(), Some("endpoint"));
    assert!(ev.data.starts_with("/message?sessionId="), "{}", ev.data);
    let post = |body: Value| {
        Conn::open(&server).request("POST", &ev.data, &[JSON_CT], body.to_string().as_bytes())
    };
    assert_eq!(
        post(serde_json::from_str(&init_body("2024-11-05")).unwrap()).status,
        202
    );
    assert!(sse.next_message().unwrap()["result"]["capabilities"]["tools"].is_object());
    post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    post(tool_call(2, "demo__add", json!({"a": 40, "b": 2})));
    let sum = sse.next_message().unwrap();
    assert_eq!(result_text(&sum), "42", "{sum}");
    // 2026-07-28: no session, the envelope on each request.
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}});
    let modern = |id: i64, method: &str, name: Option<&str>, mut params: Value| {
        params["_meta"] = meta.clone();
        let mut h = vec![
            JSON_CT,
            ACCEPT_BOTH,
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Mcp-Method", method),
        ];
        if let Some(n) = name {
            h.push(("Mcp-Name", n));
        }
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        Conn::open(&server).request("POST", "/mcp", &h, body.to_string().as_bytes())
    };
    let listed = modern(3, "tools/list", None, json!({}));
    assert_eq!(listed.status, 200, "{}", listed.text());
    let tools = names(&listed.json(), "tools");
    assert!(tools.contains(&"fx__pid".to_string()) && tools.contains(&"demo__echo".to_string()));
    let echo = modern(
        4,
        "tools/call",
        Some("demo__echo"),
        json!({"name": "demo__echo", "arguments": {"message": "modern"}}),
    );
    assert_eq!(result_text(&echo.json()), "modern", "{}", echo.text());
}

#[test]
fn reload_adds_removes_and_changes_servers_without_failing_a_call_on_the_kept_one() {
    let file = ConfigFile::new(json!({
        "a": demo(),
        "b": {"command": "python3", "args": [fixture("everything.py")], "mode": "shared"},
    }));
    let server = Server::start(&["--config", file.arg()], &[]);
    let on_a = Arc::new(Session::open_at(&server, "/servers/a/mcp", "2025-11-25"));
    let on_b = Session::open_at(&server, "/servers/b/mcp", "2025-11-25");
    let b_child = result_text(&only(&on_b.call(2, "pid", json!({}))))
        .parse::<i32>()
        .unwrap();
    // A client calls A in a loop while the file changes under it.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let looping = {
        let (s, stop, calls, failures) =
            (on_a.clone(), stop.clone(), calls.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut id = 100;
            while !stop.load(Ordering::Acquire) {
                id += 1;
                let r = s.call(id, "add", json!({"a": id, "b": 1}));
                let ok = r
                    .messages()
                    .last()
                    .is_some_and(|m| result_text(m) == (id + 1).to_string());
                if !ok {
                    eprintln!("call {id} on A failed: {}", r.text());
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    eventually("calls on A before the reload", || {
        calls.load(Ordering::Relaxed) >= 5
    });
    file.write(json!({
        "a": {"command": BIN, "args": ["__demo-server"], "tools": {"deny": ["add"]}},
        "c": demo(),
    }));
    reload(&server, "config_reload:");
    let before = calls.load(Ordering::Relaxed);
    eventually("calls on A after the reload", || {
        calls.load(Ordering::Relaxed) >= before + 5
    });
    stop.store(true, Ordering::Release);
    looping.join().unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "a call on A failed across the reload"
    );
    // C serves; B is gone with its sessions and its child.
    let on_c = Session::open_at(&server, "/servers/c/mcp", "2025-11-25");
    assert_eq!(
        result_text(&only(&on_c.call(2, "add", json!({"a": 1, "b": 1})))),
        "2"
    );
    assert_eq!(on_b.call(3, "pid", json!({})).status, 404);
    assert_gone(b_child, "the removed server's shared child");
    let r = Conn::open(&server).request(
        "POST",
        "/servers/b/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // A's new sessions see the new filter; the session held across keeps its child.
    let fresh = Session::open_at(&server, "/servers/a/mcp", "2025-11-25");
    let tools = names(&list(&fresh, 2, "tools/list"), "tools");
    assert!(!tools.contains(&"add".to_string()), "{tools:?}");
    assert_eq!(
        only(&fresh.call(3, "add", json!({"a": 1, "b": 1})))["error"]["code"],
        -32602
    );
    assert_eq!(
        result_text(&only(&on_a.call(4, "add", json!({"a": 1, "b": 2})))),
        "3"
    );
    // The merged endpoint now joins A and C.
    let merged = Session::open(&server);
    let tools = names(&list(&merged, 2, "tools/list"), "tools");
    assert!(
        tools.contains(&"c__add".to_string()) && !tools.iter().any(|t| t.starts_with("b__")),
        "{tools:?}"
    );
    assert_eq!(
        metric(
            &server,
            "stdio_sse_config_reloads_total{outcome=\"applied\"}"
        ),
        1.0
    );
}

#[test]
fn a_reload_with_a_broken_file_keeps_the_running_servers_and_says_where() {
    let file = ConfigFile::new(json!({"a": demo(), "b": demo()}));
    let server = Server::start(&["--config", file.arg()], &[]);
    std::fs::write(
        &file.0,
        "{\"mcpServers\": {\n  \"a\": {\"command\": \"x\",}\n}}",
    )
    .unwrap();
    let line = reload(&server, "config_reload_failed");
    assert!(line.contains("line 2 column"), "{line}");
    assert!(
        line.contains("keeping the configuration in force"),
        "{line}"
    );
    file.write(json!({"a": demo(), "b": {"command": "x", "bogus": 1}}));
    let line = reload(&server, "config_reload_failed");
    assert!(
        line.contains("\"b\"") && line.contains("\"bogus\""),
        "{line}"
    );
    let s = Session::open_at(&server, "/servers/b/mcp", "2025-11-25");
    assert_eq!(
        result_text(&only(&s.call(2, "echo", json!({"message": "still here"})))),
        "still here"
    );
    assert_eq!(
        metric(
            &server,
            "stdio_sse_config_reloads_total{outcome=\"failed\"}"
        ),
        2.0
    );
}

// ---- the review's findings (issue 18), each seen failing before its fix -----------------

#[test]
fn a_server_listing_entries_that_are_not_objects_leaves_them_out_and_keeps_serving() {
    let file = ConfigFile::new(json!({
        "demo": demo(),
        "odd": {"command": "python3", "args": [fixture("odd_lists.py")], "mode": "shared"},
    }));
    let server = Server::start(&["--config", file.arg()], &[]);
    let s = Session::open(&server);
    let tools = names(&list(&s, 2, "tools/list"), "tools");
    assert!(
        tools.contains(&"odd__ok".to_string()) && tools.contains(&"demo__echo".to_string()),
        "{tools:?}"
    );
    let prompts = names(&list(&s, 3, "prompts/list"), "prompts");
    assert_eq!(prompts, ["odd__p"]);
    // The shared child's reader is alive: its answers still come, to this session and
    // to another one.
    assert_eq!(result_text(&only(&s.call(4, "odd__ok", json!({})))), "ok");
    let other = Session::open_at(&server, "/servers/odd/mcp", "2025-11-25");
    assert_eq!(result_text(&only(&other.call(2, "ok", json!({})))), "ok");
    assert_eq!(metric(&server, "stdio_sse_panics_total"), 0.0);
}

#[test]
fn a_server_session_opening_as_its_merged_session_ends_is_ended_too() {
    let file = ConfigFile::new(json!({
        "demo": demo(),
        "sh": {"command": "python3", "args": [fixture("everything.py")], "mode": "shared"},
    }));
    let server = Server::start(&["--config", file.arg(), "--restart-delay", "2s"], &[]);
    let s = Session::open(&server);
    assert!(only(&s.call(2, "sh__pid", json!({})))["result"].is_object());
    // The shared child exits: its restart takes --restart-delay, and the merged
    // session's next call to it waits for it while the client deletes the session.
    let from = server.log_len();
    let _ = s.call(3, "sh__crash", json!({}));
    let (from, _) = server.wait_log_after("child_restart", from);
    let mut waiting = Conn::open(&server);
    let call = tool_call(4, "sh__pid", json!({})).to_string();
    waiting.send("POST", "/mcp", &s.headers(), call.as_bytes());
    server.wait_log_after("merged_start", from);
    assert_eq!(s.delete().status, 200);
    let _ = SseReader::new(waiting).rest();
    server.wait_log_after("shared child 0 started, pid", from);
    eventually("no server session outlives its merged session", || {
        metric(&server, "stdio_sse_sessions_active{transport=\"member\"}") == 0.0
    });
}

#[test]
fn servers_answers_after_a_reload_replaced_the_merged_endpoint_under_an_open_session() {
    let file = ConfigFile::new(json!({"a": demo(), "b": demo()}));
    let server = Server::start(&["--config", file.arg()], &[]);
    let s = Session::open(&server);
    assert_eq!(
        result_text(&only(&s.call(2, "a__add", json!({"a": 1, "b": 1})))),
        "2"
    );
    file.write(json!({"a": demo(), "b": demo(), "c": demo()}));
    reload(&server, "config_reload:");
    let (status, servers) = get_json(&server, "/servers");
    assert_eq!(status, 200, "{servers}");
    assert_eq!(servers["servers"].as_array().unwrap().len(), 3, "{servers}");
    // The session opened before the reload goes on, on the endpoint it knew.
    assert_eq!(
        result_text(&only(&s.call(3, "b__add", json!({"a": 2, "b": 2})))),
        "4"
    );
    assert_eq!(metric(&server, "stdio_sse_panics_total"), 0.0);
}

#[test]
fn a_front_path_session_survives_a_reload_from_one_server_to_several() {
    let file = ConfigFile::new(json!({"a": demo()}));
    let server = Server::start(&["--config", file.arg()], &[]);
    let s = Session::open(&server);
    assert_eq!(
        result_text(&only(&s.call(2, "add", json!({"a": 1, "b": 2})))),
        "3"
    );
    file.write(json!({"a": demo(), "b": demo()}));
    reload(&server, "config_reload:");
    // /mcp is now the merged endpoint; the session opened there still reaches its child.
    assert_eq!(
        result_text(&only(&s.call(3, "add", json!({"a": 2, "b": 2})))),
        "4"
    );
    let merged = Session::open(&server);
    assert_eq!(
        result_text(&only(&merged.call(2, "b__add", json!({"a": 5, "b": 5})))),
        "10"
    );
}

#[test]
fn a_merged_sessions_server_session_counts_against_that_servers_max_sessions() {
    let file = ConfigFile::new(json!({
        "a": {"command": BIN, "args": ["__demo-server"], "maxSessions": 1},
        "b": demo(),
    }));
    let server = Server::start(&["--config", file.arg()], &[]);
    let s = Session::open(&server);
    assert_eq!(
        result_text(&only(&s.call(2, "a__add", json!({"a": 1, "b": 1})))),
        "2"
    );
    let (_, servers) = get_json(&server, "/servers");
    let a = servers["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "a")
        .unwrap()
        .clone();
    assert_eq!(a["sessions"], 1, "{servers}");
    let spawned = metric(&server, "stdio_sse_children_spawned_total");
    let r = Conn::open(&server).request(
        "POST",
        "/servers/a/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        metric(&server, "stdio_sse_children_spawned_total"),
        spawned,
        "a child was started for a refused session"
    );
}
