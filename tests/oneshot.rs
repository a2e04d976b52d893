//! One-shot mode: one child per request, stdout streamed back as SSE `data:` events.
mod common;
use common::*;

fn oneshot(args: &[&str]) -> Server {
    let mut cmd = vec!["python3".to_string(), fixture("oneshot_tool.py")];
    cmd.extend(args.iter().map(|a| a.to_string()));
    Server::start(&["--mode", "oneshot", "--keepalive", "100ms"], &cmd)
}

/// The exchange from the issue, byte for byte, as `curl -N` sends it (Accept: */*).
/// Rules: OS-1, ST-1.
#[test]
fn issue_exchange_byte_for_byte() {
    let s = Server::start(
        &["--mode", "oneshot"],
        &["python3".to_string(), fixture("stdio_mcp_server.py")],
    );
    let body = r#"{"jsonrpc":"2.0","id":"abc","params":{"message":"你好，世界"}}"#;
    let r = Conn::open(&s).request(
        "POST",
        "/mcp",
        &[("Content-Type", "application/json"), ("Accept", "*/*")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
    assert_eq!(
        r.text(),
        "data: {\"jsonrpc\":\"2.0\",\"id\":\"abc\",\"result\":{\"echo\":\"你好，世界\"}}\n\n"
    );
}

/// Every stdout line is an event, in order; GET ?request= does the same for EventSource.
/// Rules: OS-1.
#[test]
fn every_line_streams_and_get_works_too() {
    let s = oneshot(&["lines", "5"]);
    let r = Conn::open(&s).request("POST", "/mcp", &[JSON_CT], br#"{"q": 1}"#);
    let events = r.events();
    assert_eq!(events.len(), 5);
    for (i, e) in events.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(v["n"], i);
        assert_eq!(v["request"]["q"], 1, "the body arrived as one compact line");
    }
    let r = Conn::open(&s).request(
        "GET",
        "/mcp?request=%7B%22q%22%3A%202%7D",
        &[("Accept", "text/event-stream")],
        b"",
    );
    assert_eq!(r.events().len(), 5);
    assert!(r.events()[0].data.contains(r#""q": 2"#));
    let r = Conn::open(&s).request("GET", "/mcp", &[], b"");
    assert_eq!(r.status, 400);
    let r = Conn::open(&s).request("POST", "/mcp", &[JSON_CT], b"nope");
    assert_eq!(r.status, 400);
    let r = Conn::open(&s).request("DELETE", "/mcp", &[], b"");
    assert_eq!(r.status, 405);
}

/// A non-zero exit ends the stream with `event: error` carrying the status and stderr.
/// Rules: OS-2.
#[test]
fn failure_ends_with_an_error_event() {
    let s = oneshot(&["fail"]);
    let r = Conn::open(&s).request("POST", "/mcp", &[JSON_CT], b"{}");
    let events = r.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].data, r#"{"partial": true}"#);
    assert_eq!(events[1].event.as_deref(), Some("error"));
    let err: serde_json::Value = serde_json::from_str(&events[1].data).unwrap();
    assert_eq!(err["exit_code"], 4);
    assert_eq!(
        err["stderr"],
        serde_json::json!(["something went wrong", "fatal: giving up"])
    );
}

/// A client disconnect kills the child's whole process group.
/// Rules: OS-3.
#[test]
fn client_disconnect_kills_the_process_group() {
    let s = oneshot(&["hang"]);
    let mut c = Conn::open(&s);
    c.send("POST", "/mcp", &[JSON_CT], b"{}");
    let mut stream = SseReader::new(c);
    let first: serde_json::Value =
        serde_json::from_str(&stream.next_event().unwrap().data).unwrap();
    let (pid, grandchild) = (
        first["pid"].as_i64().unwrap() as i32,
        first["grandchild"].as_i64().unwrap() as i32,
    );
    assert!(alive(pid) && alive(grandchild));
    drop(stream);
    assert_gone(pid, "one-shot child");
    assert_gone(grandchild, "one-shot grandchild");
    s.wait_log("client disconnected");
}
