//! Streamable HTTP in session mode, rule by rule (ids from shared/mcp-transport-rules.md).
mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn server() -> Server {
    Server::start(&[], &everything())
}

/// S-1, S-2: initialize mints a random visible-ASCII id and returns the child's own
/// InitializeResult for the client's own initialize (capabilities and clientInfo forwarded).
#[test]
fn initialize_mints_session_and_forwards_the_clients_initialize() {
    let s = server();
    let a = Session::open(&s);
    let b = Session::open(&s);
    assert_ne!(a.id, b.id);
    assert!(
        a.id.len() >= 32 && a.id.bytes().all(|c| (0x21..=0x7e).contains(&c)),
        "{}",
        a.id
    );
    assert_eq!(
        a.init["result"]["serverInfo"]["name"],
        "stdio-sse-test-everything"
    );
    assert_eq!(a.init["result"]["protocolVersion"], "2025-11-25");
    // The fixture echoes the clientInfo it received: the client's, not a canned one.
    assert_eq!(
        a.init["result"]["_meta"]["clientInfo"]["name"],
        "stdio-sse-tests"
    );
    // Sessions never share a child.
    let pa = result_text(&a.call(1, "pid", json!({})).messages()[0]);
    let pb = result_text(&b.call(1, "pid", json!({})).messages()[0]);
    assert_ne!(pa, pb);
}

/// P-4: notifications and responses alone get 202 with no body.
#[test]
fn notification_gets_202_without_body() {
    let s = server();
    let sess = Session::open(&s);
    let r = sess.post(&json!({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}));
    assert_eq!(r.status, 202);
    assert!(r.body.is_empty());
}

/// P-5, P-6, P-7, P-8: a request gets an SSE stream; notifications the child writes first
/// come first, the response last, then the stream ends.
#[test]
fn request_stream_carries_notifications_then_response_then_ends() {
    let s = server();
    let sess = Session::open(&s);
    let r = sess.call(7, "test_tool_with_logging", json!({}));
    assert_eq!(r.status, 200);
    assert!(r
        .header("Content-Type")
        .unwrap()
        .starts_with("text/event-stream"));
    let msgs = r.messages();
    let logs: Vec<_> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/message")
        .map(|m| m["params"]["data"].clone())
        .collect();
    assert_eq!(
        logs,
        vec![
            json!("Tool execution started"),
            json!("Tool processing data"),
            json!("Tool execution completed")
        ]
    );
    assert_eq!(msgs.last().unwrap()["id"], 7, "response last: {msgs:?}");
    assert_eq!(msgs.len(), 4);
}

/// P-7: progress reaches the stream of the request that carried the token, not another
/// stream that is open at the same time (R-2: each message on exactly one stream).
#[test]
fn progress_goes_only_to_its_requests_stream() {
    let s = server();
    let sess = Session::open(&s);
    let mut slow = sess.post_stream(&tool_call(1, "sleep", json!({"seconds": 0.6})));
    let mut call = tool_call(2, "test_tool_with_progress", json!({}));
    call["params"]["_meta"] = json!({"progressToken": "tok-2"});
    let r = sess.post(&call);
    let msgs = r.messages();
    let progress: Vec<_> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .map(|m| m["params"]["progress"].clone())
        .collect();
    assert_eq!(progress, vec![json!(0), json!(50), json!(100)]);
    assert_eq!(msgs.last().unwrap()["id"], 2);
    let other = slow.rest();
    assert_eq!(
        other.len(),
        1,
        "the sleeping request's stream got only its response: {other:?}"
    );
    assert_eq!(other[0]["id"], 1);
}

/// S-9, ST-9: a request from the child reaches the client on the stream of the request in
/// flight; the client's POSTed answer (202) goes back with the child's own id.
#[test]
fn sampling_request_round_trips_through_the_client() {
    let s = server();
    let sess = Session::open(&s);
    let mut stream = sess.post_stream(&tool_call(5, "test_sampling", json!({"prompt": "hello?"})));
    let req = stream.next_message().expect("sampling request");
    assert_eq!(req["method"], "sampling/createMessage");
    assert_eq!(req["params"]["messages"][0]["content"]["text"], "hello?");
    let answer = json!({"jsonrpc": "2.0", "id": req["id"], "result": {"role": "assistant", "content": {"type": "text", "text": "forty-two"}, "model": "test"}});
    assert_eq!(sess.post(&answer).status, 202);
    let result = stream.next_message().expect("tool result");
    assert_eq!(result["id"], 5);
    assert_eq!(result_text(&result), "LLM response: forty-two");
    assert!(
        stream.next_message().is_none(),
        "stream ends after the response"
    );
}

/// G-1..G-6, G-3: the GET stream receives messages unrelated to a request (list_changed),
/// the POST stream does not; a second GET is 409; held messages wait for the next GET.
#[test]
fn get_stream_gets_unsolicited_messages_and_only_one_is_allowed() {
    let s = server();
    let sess = Session::open(&s);
    // Nothing listening yet: held, then delivered on the GET that follows.
    let r = sess.call(1, "notify_list_changed", json!({}));
    assert_eq!(
        r.messages().len(),
        1,
        "POST stream has only the response: {:?}",
        r.messages()
    );
    let mut get = sess.get_stream();
    assert_eq!(get.status, 200);
    assert_eq!(get.header("Content-Type"), Some("text/event-stream"));
    assert_eq!(
        get.next_message().unwrap()["method"],
        "notifications/tools/list_changed"
    );
    // Second GET while one is open.
    let mut c = Conn::open(&s);
    let second = c.request(
        "GET",
        "/mcp",
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &sess.id),
        ],
        b"",
    );
    assert_eq!(second.status, 409);
    // A live notification goes to the open GET stream.
    let r = sess.call(2, "notify_list_changed", json!({}));
    assert_eq!(r.messages().len(), 1);
    assert_eq!(
        get.next_message().unwrap()["method"],
        "notifications/tools/list_changed"
    );
    // G-1: GET must accept text/event-stream.
    let bad = Conn::open(&s).request(
        "GET",
        "/mcp",
        &[("Accept", "application/json"), ("Mcp-Session-Id", &sess.id)],
        b"",
    );
    assert_eq!(bad.status, 406);
}

/// S-4, S-5, S-7: no id -> 400; unknown id -> 404; DELETE ends the session and its child,
/// then the id answers 404.
#[test]
fn session_ids_are_required_and_deleted_sessions_are_gone() {
    let s = server();
    let sess = Session::open(&s);
    let pid: i32 = result_text(&sess.call(1, "pid", json!({})).messages()[0])
        .parse()
        .unwrap();
    let mut c = Conn::open(&s);
    let no_id = c.request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        tool_call(2, "pid", json!({})).to_string().as_bytes(),
    );
    assert_eq!(no_id.status, 400);
    assert_eq!(no_id.json()["error"]["code"], -32000);
    let unknown = c.request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH, ("Mcp-Session-Id", "no-such-session")],
        tool_call(3, "pid", json!({})).to_string().as_bytes(),
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(sess.delete().status, 200);
    assert!(!alive(pid), "DELETE answers after the child is gone");
    assert_eq!(sess.call(4, "pid", json!({})).status, 404);
    assert_eq!(sess.delete().status, 404);
    let get = Conn::open(&s).request(
        "GET",
        "/mcp",
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &sess.id),
        ],
        b"",
    );
    assert_eq!(get.status, 404);
}

/// S-8: a second initialize on a live session is refused.
#[test]
fn second_initialize_on_a_session_is_refused() {
    let s = server();
    let sess = Session::open(&s);
    let r = sess.post(&serde_json::from_str(&init_body("2025-11-25")).unwrap());
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already initialized"));
}

/// V-2, V-3: a missing MCP-Protocol-Version is accepted; an unknown one is 400.
#[test]
fn protocol_version_header_is_validated() {
    let s = server();
    let sess = Session::open(&s);
    let body = tool_call(1, "echo", json!({"message": "v"})).to_string();
    let mut c = Conn::open(&s);
    let missing = c.request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH, ("Mcp-Session-Id", &sess.id)],
        body.as_bytes(),
    );
    assert_eq!(missing.status, 200);
    assert_eq!(result_text(&missing.messages()[0]), "v");
    let bad = c.request(
        "POST",
        "/mcp",
        &[
            JSON_CT,
            ACCEPT_BOTH,
            ("Mcp-Session-Id", &sess.id),
            ("MCP-Protocol-Version", "1999-01-01"),
        ],
        body.as_bytes(),
    );
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1999-01-01"));
}

/// B-1..B-3: batches are answered in full on 2025-03-26 and refused on later versions.
#[test]
fn batches_only_for_2025_03_26() {
    let s = server();
    let old = Session::open_version(&s, "2025-03-26");
    let batch = json!([tool_call(1, "echo", json!({"message": "a"})), {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}, tool_call(2, "echo", json!({"message": "b"}))]);
    let r = old.post(&batch);
    assert_eq!(r.status, 200);
    let mut ids: Vec<i64> = r
        .messages()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
    let new = Session::open(&s);
    let r = new.post(&batch);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32600);
}

/// N-11 and section 13 item 10: a 2026-07-28 `server/discover` probe gets a 400 without a
/// modern error code, so dual-era clients fall back to initialize.
#[test]
fn discover_probe_gets_a_legacy_answer() {
    let s = server();
    let probe = json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}});
    let r = Conn::open(&s).request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH, ("MCP-Protocol-Version", "2026-07-28")],
        probe.to_string().as_bytes(),
    );
    assert_eq!(r.status, 400);
    let code = r.json()["error"]["code"].as_i64().unwrap();
    assert!(
        ![-32020, -32021, -32022].contains(&code),
        "modern error code {code}"
    );
}

/// P-9: a client closing its POST stream does not cancel the child's work or end the
/// session; the child stays the same process.
#[test]
fn closed_post_stream_does_not_cancel_or_end_the_session() {
    let s = server();
    let sess = Session::open(&s);
    let pid = result_text(&sess.call(1, "pid", json!({})).messages()[0]);
    let stream = sess.post_stream(&tool_call(2, "sleep", json!({"seconds": 0.3})));
    assert_eq!(stream.status, 200);
    drop(stream);
    // The work goes on: a request that outlives it still sees the same child, and the
    // session was not ended.
    let later = sess.call(3, "sleep", json!({"seconds": 0.5}));
    assert_eq!(result_text(&later.messages()[0]), "slept");
    assert_eq!(
        result_text(&sess.call(4, "pid", json!({})).messages()[0]),
        pid
    );
    assert!(!s.log_text().contains("session ended"), "{}", s.log_text());
}

/// ST-1: U+2028 inside a string is not a line break; escaped newlines survive.
#[test]
fn framing_keeps_u2028_and_escaped_newlines() {
    let s = server();
    let sess = Session::open(&s);
    let r = sess.call(1, "test_unicode", json!({}));
    assert!(r.text().contains('\u{2028}'), "raw U+2028 passed through");
    assert_eq!(
        result_text(&r.messages()[0]),
        "line\u{2028}separator and escaped\nnewline"
    );
    let echo = sess.call(2, "echo", json!({"message": "a\nb\u{2028}c 你好"}));
    assert_eq!(result_text(&echo.messages()[0]), "a\nb\u{2028}c 你好");
}

/// ST-4, ST-5: stderr is logged with the session tag and never parsed; a non-JSON stdout
/// line is logged and skipped and the session goes on.
#[test]
fn stderr_is_logged_and_non_json_stdout_is_skipped() {
    let s = server();
    let sess = Session::open(&s);
    assert_eq!(
        result_text(&sess.call(1, "test_stderr_noise", json!({})).messages()[0]),
        "ok despite stderr"
    );
    let line = s.wait_log("noise on stderr: not protocol");
    assert!(
        line.contains(&format!("[{}]", tag_of(&sess.id))),
        "tagged: {line}"
    );
    assert!(
        !line.contains(&sess.id),
        "full session id never logged (S-10): {line}"
    );
    assert_eq!(
        result_text(&sess.call(2, "not_json_then_answer", json!({})).messages()[0]),
        "still here"
    );
    s.wait_log("not JSON");
}

/// Each SSE event is flushed when the child prints it: the first event arrives while the
/// child is still waiting a second before printing the next.
#[test]
fn events_are_flushed_as_they_happen() {
    let s = server();
    let sess = Session::open(&s);
    let mut stream = sess.post_stream(&tool_call(1, "slow_events", json!({})));
    let first = stream.next_message().unwrap();
    let t_first = Instant::now();
    assert_eq!(first["params"]["data"], "first");
    let second = stream.next_message().unwrap();
    assert_eq!(second["params"]["data"], "second");
    assert!(
        t_first.elapsed() >= Duration::from_millis(500),
        "first event was held back until the second: {:?}",
        t_first.elapsed()
    );
}

/// ST-7: a child that dies fails every request in flight with its exit status and stderr;
/// the session ends and its id answers 404, so the client re-initializes.
#[test]
fn child_crash_fails_in_flight_requests_and_ends_the_session() {
    let s = server();
    let sess = Session::open(&s);
    let mut waiting = sess.post_stream(&tool_call(1, "sleep", json!({"seconds": 30})));
    let r = sess.call(2, "crash", json!({}));
    let err = &r.messages()[0];
    assert_eq!(err["id"], 2);
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("status 3") && msg.contains("simulated crash"),
        "{msg}"
    );
    let other = waiting.next_message().unwrap();
    assert_eq!(other["id"], 1);
    assert!(other["error"]["message"]
        .as_str()
        .unwrap()
        .contains("status 3"));
    assert_eq!(sess.call(3, "pid", json!({})).status, 404);
    assert_eq!(
        Session::open(&s)
            .call(1, "echo", json!({"message": "again"}))
            .status,
        200
    );
}

/// A 5 MiB tool result arrives whole.
#[test]
fn five_mib_result_arrives_whole() {
    let s = server();
    let sess = Session::open(&s);
    let r = sess.call(1, "big_result", json!({"bytes": 5 * 1024 * 1024}));
    let text = result_text(&r.messages()[0]);
    assert_eq!(text.len(), 5 * 1024 * 1024);
    assert!(text.bytes().all(|b| b == b'x'));
}

/// O-1, O-2, O-5, L-5: a foreign Host or Origin gets 403 on every endpoint; loopback names
/// and the URL's own host pass; --allowed-host / --allowed-origin add more.
#[test]
fn dns_rebinding_is_refused_everywhere() {
    let s = Server::start(
        &[
            "--allowed-host",
            "mcp.internal",
            "--allowed-origin",
            "https://app.example.com",
        ],
        &everything(),
    );
    let init = init_body("2025-11-25");
    let mut c = Conn::open(&s);
    for path in [
        "/mcp",
        "/sse",
        "/message?sessionId=x",
        "/healthz",
        "/metrics",
    ] {
        let method = if path.starts_with("/mcp") || path.starts_with("/message") {
            "POST"
        } else {
            "GET"
        };
        let r = c.request(
            method,
            path,
            &[JSON_CT, ACCEPT_BOTH, ("Host", "evil.example.com")],
            init.as_bytes(),
        );
        assert_eq!(r.status, 403, "{method} {path} with a foreign Host");
        let r = c.request(
            method,
            path,
            &[JSON_CT, ACCEPT_BOTH, ("Origin", "http://evil.example.com")],
            init.as_bytes(),
        );
        assert_eq!(r.status, 403, "{method} {path} with a foreign Origin");
    }
    let own = format!("localhost:{}", s.port);
    let origin = format!("http://{own}");
    for (host, origin) in [
        (own.as_str(), origin.as_str()),
        ("[::1]:1", "http://127.0.0.1:3000"),
        ("mcp.internal:8000", "https://app.example.com"),
        ("mcp.internal", "http://mcp.internal"),
    ] {
        let r = c.request(
            "POST",
            "/mcp",
            &[JSON_CT, ACCEPT_BOTH, ("Host", host), ("Origin", origin)],
            init.as_bytes(),
        );
        assert_eq!(r.status, 200, "Host {host} Origin {origin}");
    }
    let r = c.request("GET", "/healthz", &[("Origin", "null")], b"");
    assert_eq!(r.status, 403);
}
