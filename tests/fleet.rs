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
        let out = std::process::Command::new(BIN)
            .args(["--port", "0", "--instance-id", bad])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--instance-id"), "{bad}: {err}");
    }
}
