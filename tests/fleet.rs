//! Issue 19 (fleets behind a balancer): instance-routed session ids. Real binary, real
//! sockets, real children.

mod common;

use common::*;
use serde_json::json;

fn initialize(server: &Server) -> Response {
    Conn::open(server).request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    )
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

#[test]
fn session_ids_start_with_the_instance_id_and_keep_their_random_part() {
    let server = Server::start(&["--instance-id", "web-1"], &[]);
    let r = initialize(&server);
    let id = r
        .header("Mcp-Session-Id")
        .expect("a session id")
        .to_string();
    let (prefix, random) = id.split_once('_').expect("INSTANCE_random");
    assert_eq!(prefix, "web-1", "{id}");
    assert!(is_uuid(random), "the random part stays a v4 UUID: {id}");
    // The id works as any id does, and the log names the session by its random part.
    let s = Session {
        id: id.clone(),
        addr: server.addr(),
        init: serde_json::Value::Null,
        path: "/mcp".into(),
    };
    let echo = s.call(2, "echo", json!({"message": "routed"}));
    assert_eq!(result_text(&echo.messages()[0]), "routed");
    server.wait_log(&format!("[{}] method=POST", &random[..8]));
    // Legacy SSE: the endpoint's sessionId carries the same prefix.
    let mut c = Conn::open(&server);
    c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    let mut sse = SseReader::new(c);
    let ev = sse.next_event().expect("endpoint event");
    let sid = ev.data.split("sessionId=").nth(1).expect("sessionId");
    assert!(
        sid.starts_with("web-1_") && is_uuid(&sid[6..]),
        "{}",
        ev.data
    );
    // /metrics and the access log say which instance this is.
    assert!(
        scrape(&server).contains("instance=\"web-1\""),
        "build_info names the instance"
    );
    server.wait_log("instance=web-1");
}

#[test]
fn the_default_instance_id_is_the_host_name_and_none_turns_it_off() {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("host name")
        .trim()
        .to_string();
    let server = Server::start(&[], &[]);
    let id = initialize(&server)
        .header("Mcp-Session-Id")
        .unwrap()
        .to_string();
    let fit: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    assert_eq!(
        id.split_once('_').map(|(p, _)| p),
        Some(fit.as_str()),
        "{id}"
    );
    let bare = Server::start(&["--instance-id", "none"], &[]);
    let id = initialize(&bare)
        .header("Mcp-Session-Id")
        .unwrap()
        .to_string();
    assert!(is_uuid(&id), "{id}");
}

#[test]
fn an_instance_id_that_could_not_be_split_off_again_is_refused() {
    for bad in ["web_1", "a b", "x/y", &"a".repeat(64)] {
        let out = bin_command()
            .args(["--port", "0", "--instance-id", bad])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--instance-id"), "{bad}: {err}");
    }
}

/// SIGTERM, and the drain it starts (--drain-timeout set).
fn start_drain(server: &Server) {
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    server.wait_log("draining:");
}

/// Waits (bounded) for the server to exit on its own; its exit status.
fn exit_status(server: &mut Server) -> std::process::ExitStatus {
    let mut status = None;
    eventually("stdio-sse exits", || {
        status = server.child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

fn modern_echo(server: &Server, message: &str) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": message},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}});
    Conn::open(server).request(
        "POST",
        "/mcp",
        &[
            JSON_CT,
            ACCEPT_BOTH,
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Mcp-Method", "tools/call"),
            ("Mcp-Name", "echo"),
        ],
        body.to_string().as_bytes(),
    )
}

#[test]
fn a_drain_refuses_new_sessions_serves_the_open_ones_and_exits_when_the_last_ends() {
    let mut server = Server::start(&["--drain-timeout", "60s"], &everything());
    let open = Session::open(&server);
    let child = child_pid(&open);
    start_drain(&server);
    // A balancer's health check sees it at once.
    let ready = Conn::open(&server).request("GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(ready.json()["status"], "draining");
    // A new session is refused, with a Retry-After the balancer honours elsewhere.
    let refused = initialize(&server);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.header("Retry-After").is_some());
    assert_eq!(refused.json()["error"]["code"], -32000);
    let mut c = Conn::open(&server);
    let sse = c.request("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    assert_eq!(sse.status, 503);
    // The open session, and 2026-07-28 calls, are served.
    let echo = open.call(2, "echo", json!({"message": "still served"}));
    assert_eq!(result_text(&echo.messages()[0]), "still served");
    let modern = modern_echo(&server, "modern too");
    assert_eq!(modern.status, 200, "{}", modern.text());
    assert_eq!(result_text(&modern.json()), "modern too");
    // The last session ends: the instance goes without waiting for --drain-timeout.
    assert_eq!(open.delete().status, 200);
    let status = exit_status(&mut server);
    assert_eq!(status.code(), Some(0));
    server.wait_log("drained: no session left");
    assert_gone(child, "the drained session's child");
}

#[test]
fn a_drain_that_times_out_ends_what_is_left_as_a_shutdown_does() {
    let mut server = Server::start(&["--drain-timeout", "1s"], &everything());
    let open = Session::open(&server);
    let child = child_pid(&open);
    start_drain(&server);
    let status = exit_status(&mut server);
    assert_eq!(status.code(), Some(0));
    server.wait_log("--drain-timeout passed with 1 session(s) open");
    assert_gone(child, "a session's child after the drain timed out");
}

#[test]
fn sigint_or_a_second_sigterm_during_a_drain_shuts_down_at_once() {
    for second in [libc::SIGINT, libc::SIGTERM] {
        let mut server = Server::start(&["--drain-timeout", "60s"], &[]);
        let open = Session::open(&server);
        start_drain(&server);
        unsafe { libc::kill(server.pid(), second) };
        assert_eq!(exit_status(&mut server).code(), Some(0));
        server.wait_log("ending 1 sessions");
        drop(open);
    }
}

#[test]
fn without_a_drain_timeout_sigterm_shuts_down_at_once_as_before() {
    let mut server = Server::start(&[], &[]);
    let _open = Session::open(&server);
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    assert_eq!(exit_status(&mut server).code(), Some(0));
    assert!(!server.log_text().contains("draining:"));
}

#[test]
fn a_legacy_stream_announced_before_a_drain_is_served_and_waited_for() {
    let mut server = Server::start(&["--drain-timeout", "60s"], &[]);
    let mut c = Conn::open(&server);
    c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    let mut sse = SseReader::new(c);
    let ev = sse.next_event().expect("endpoint event");
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    server.wait_log("draining: /readyz 503, new sessions refused; 1 session(s) open");
    let post =
        |body: String| Conn::open(&server).request("POST", &ev.data, &[JSON_CT], body.as_bytes());
    assert_eq!(post(init_body("2024-11-05")).status, 202);
    assert!(sse.next_message().unwrap()["result"].is_object());
    let call = tool_call(2, "echo", json!({"message": "late"})).to_string();
    assert_eq!(post(call).status, 202);
    assert_eq!(result_text(&sse.next_message().unwrap()), "late");
    drop(sse);
    assert_eq!(exit_status(&mut server).code(), Some(0));
}
