//! Legacy HTTP+SSE (2024-11-05), rules L-1..L-5.
mod common;
use common::*;
use serde_json::json;

fn open_legacy(s: &Server) -> (SseReader, String) {
    let mut c = Conn::open(s);
    c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    let mut stream = SseReader::new(c);
    assert_eq!(stream.status, 200);
    let endpoint = stream.next_event().expect("endpoint event");
    assert_eq!(endpoint.event.as_deref(), Some("endpoint"));
    (stream, endpoint.data)
}

/// L-1, L-2, L-3, L-4: endpoint first (relative, same origin), 202 "Accepted" for each
/// POST, every reply as an `event: message`.
#[test]
fn legacy_session_round_trip() {
    let s = Server::start(&[], &everything());
    let (mut stream, endpoint) = open_legacy(&s);
    assert!(endpoint.starts_with("/message?sessionId="), "{endpoint}");
    let mut c = Conn::open(&s);
    let r = c.request(
        "POST",
        &endpoint,
        &[JSON_CT],
        init_body("2024-11-05").as_bytes(),
    );
    assert_eq!((r.status, r.text().as_str()), (202, "Accepted"));
    let init = stream.next_event().unwrap();
    assert_eq!(init.event.as_deref(), Some("message"));
    let init: serde_json::Value = serde_json::from_str(&init.data).unwrap();
    assert_eq!(init["result"]["protocolVersion"], "2024-11-05");
    let r = c.request(
        "POST",
        &endpoint,
        &[JSON_CT],
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 202);
    let r = c.request(
        "POST",
        &endpoint,
        &[JSON_CT],
        tool_call(1, "test_tool_with_logging", json!({}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 202);
    let mut methods = Vec::new();
    loop {
        let m = stream.next_message().unwrap();
        if m["id"] == 1 {
            break;
        }
        methods.push(m["method"].as_str().unwrap().to_string());
    }
    assert_eq!(methods, vec!["notifications/message"; 3]);
    // The stream is the session (no resume): what it carried is not kept.
    assert_eq!(metric(&s, "stdio_sse_replay_buffer_events"), 0.0);
}

/// L-4: an unknown session id gets a prompt 404; a missing one 400; bad bodies 400/415.
#[test]
fn legacy_message_errors() {
    let s = Server::start(&[], &everything());
    let mut c = Conn::open(&s);
    let r = c.request(
        "POST",
        "/message?sessionId=nope",
        &[JSON_CT],
        init_body("2024-11-05").as_bytes(),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], -32001);
    assert_eq!(c.request("POST", "/message", &[JSON_CT], b"{}").status, 400);
    let (_stream, endpoint) = open_legacy(&s);
    assert_eq!(
        c.request("POST", &endpoint, &[JSON_CT], b"{oops").status,
        400
    );
    assert_eq!(
        c.request("POST", &endpoint, &[("Content-Type", "text/plain")], b"{}")
            .status,
        415
    );
}

/// The stream is the session: when the client goes, the child goes.
#[test]
fn closing_the_stream_ends_the_child() {
    let s = Server::start(&["--keepalive", "100ms"], &everything());
    let (mut stream, endpoint) = open_legacy(&s);
    let mut c = Conn::open(&s);
    c.request(
        "POST",
        &endpoint,
        &[JSON_CT],
        init_body("2024-11-05").as_bytes(),
    );
    stream.next_message().unwrap();
    c.request(
        "POST",
        &endpoint,
        &[JSON_CT],
        tool_call(1, "pid", json!({})).to_string().as_bytes(),
    );
    let pid: i32 = result_text(&stream.next_message().unwrap())
        .parse()
        .unwrap();
    drop(stream);
    s.wait_log("session ended (client_gone)");
    assert_gone(pid, "legacy session child");
    let r = c.request(
        "POST",
        &endpoint,
        &[JSON_CT],
        tool_call(2, "pid", json!({})).to_string().as_bytes(),
    );
    assert_eq!(r.status, 404);
}
