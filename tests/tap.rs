//! --tap: every JSON-RPC message as one JSON line (time, session, server, direction,
//! message), in order, each way; secrets redacted as in the log; a size cap with one
//! rotated file; complete when stdio-sse exits.
mod common;
use common::*;
use serde_json::{json, Value};

fn tap_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stdio-sse-tap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines_of(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON line ({e}): {l}")))
        .collect()
}

/// A session opened with headers of its own (a bearer token, a pass-header value) that
/// every later POST carries too.
struct Keyed {
    conn: Conn,
    headers: Vec<(&'static str, String)>,
    session: String,
}

impl Keyed {
    /// initialize, then notifications/initialized.
    fn open(s: &Server, extra: &[(&'static str, &str)]) -> Keyed {
        let mut k = Keyed {
            conn: Conn::open(s),
            headers: extra.iter().map(|(n, v)| (*n, v.to_string())).collect(),
            session: String::new(),
        };
        let r = k.send(init_body("2025-11-25").as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        k.session = r.header("Mcp-Session-Id").unwrap().to_string();
        let n = k.post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        assert_eq!(n.status, 202);
        k
    }
    fn send(&mut self, body: &[u8]) -> Response {
        let mut h: Vec<(&str, &str)> = vec![JSON_CT, ACCEPT_BOTH];
        if !self.session.is_empty() {
            h.push(("Mcp-Session-Id", &self.session));
            h.push(("MCP-Protocol-Version", "2025-11-25"));
        }
        h.extend(self.headers.iter().map(|(n, v)| (*n, v.as_str())));
        self.conn.request("POST", "/mcp", &h, body)
    }
    fn post(&mut self, body: Value) -> Response {
        self.send(body.to_string().as_bytes())
    }
}

/// The directions, in order, of the tap lines about request `id` of `session`.
fn directions_of(lines: &[Value], id: i64) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["message"]["id"] == id)
        .map(|l| l["direction"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_sessions_messages_appear_in_order_each_way_with_secrets_redacted() {
    let dir = tap_dir("order");
    let tap = dir.join("tap.jsonl");
    let token = "tok-8b1d9e2f5a";
    let header_secret = "sk-live-3c7a9f";
    let mut s = Server::start(
        &[
            "--tap",
            tap.to_str().unwrap(),
            "--log-level",
            "debug",
            "--auth-token",
            token,
            "--pass-header",
            "X-User-Key=USER_KEY",
        ],
        &everything(),
    );
    let bearer = format!("Bearer {token}");
    let mut c = Keyed::open(
        &s,
        &[("Authorization", &bearer), ("X-User-Key", header_secret)],
    );
    let sid = c.session.clone();
    let mut post = |body: Value| c.post(body);
    let r = post(tool_call(5, "echo", json!({"message": "hello tap"})));
    assert_eq!(result_text(&r.messages()[0]), "hello tap");
    // The child says the secret it was given; a client puts the token in a message.
    let r = post(tool_call(6, "env", json!({"name": "USER_KEY"})));
    assert_eq!(
        result_text(&r.messages()[0]),
        header_secret,
        "the client sees its own"
    );
    let r = post(tool_call(7, "echo", json!({"message": token})));
    assert_eq!(r.status, 200);
    assert_eq!(s.stop_with(libc::SIGTERM).code(), Some(0));

    let text = std::fs::read_to_string(&tap).unwrap();
    assert!(text.ends_with('\n'), "the file ends with a whole line");
    let lines = lines_of(&tap);
    let tag = tag_of(&sid);
    for l in &lines {
        for key in ["time", "session", "server", "direction", "message"] {
            assert!(l.get(key).is_some(), "{key} in {l}");
        }
    }
    let four = [
        "client_to_bridge",
        "bridge_to_child",
        "child_to_bridge",
        "bridge_to_client",
    ];
    assert_eq!(
        directions_of(&lines, 5),
        four,
        "a call crosses four places, in order"
    );
    let init: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"]["method"] == "initialize")
        .collect();
    assert_eq!(init[0]["direction"], "client_to_bridge");
    assert_eq!(init[0]["session"], tag.as_str());
    assert_eq!(init[0]["server"], "default");
    assert!(lines
        .iter()
        .any(|l| l["message"]["method"] == "notifications/initialized"
            && l["direction"] == "bridge_to_child"));
    let call = lines
        .iter()
        .find(|l| l["message"]["id"] == 5 && l["direction"] == "child_to_bridge")
        .unwrap();
    assert_eq!(call["message"]["result"]["content"][0]["text"], "hello tap");
    // Secrets: neither in the tap nor in the debug log, redacted where they were.
    for secret in [token, header_secret] {
        assert!(!text.contains(secret), "{secret} in the tap");
        assert!(!s.log_text().contains(secret), "{secret} in the log");
    }
    let said = lines
        .iter()
        .find(|l| l["message"]["id"] == 6 && l["direction"] == "bridge_to_client")
        .unwrap();
    assert_eq!(
        said["message"]["result"]["content"][0]["text"],
        "[redacted]"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_tap_rotates_at_its_size_and_every_line_stays_whole() {
    let dir = tap_dir("rotate");
    let tap = dir.join("tap.jsonl");
    let s = Server::start(
        &["--tap", tap.to_str().unwrap(), "--tap-max-size", "4KiB"],
        &everything(),
    );
    let sess = Session::open(&s);
    for i in 0..40 {
        let r = sess.call(100 + i, "echo", json!({"message": "x".repeat(100)}));
        assert_eq!(r.status, 200);
    }
    let old = dir.join("tap.jsonl.1");
    eventually("the tap rotated to tap.jsonl.1", || old.exists());
    for path in [&tap, &old] {
        let size = std::fs::metadata(path).unwrap().len();
        assert!(size <= 4096, "{} is {size} bytes", path.display());
        lines_of(path);
    }
    // The newest calls are in the newest file.
    assert_eq!(directions_of(&lines_of(&tap), 139).len(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tap_to_stderr_with_a_dash() {
    let s = Server::start(&["--tap", "-"], &everything());
    let sess = Session::open(&s);
    assert_eq!(
        sess.call(3, "echo", json!({"message": "to stderr"})).status,
        200
    );
    let line = s.wait_log("\"direction\":\"bridge_to_client\",\"message\":{\"id\":3");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["message"]["result"]["content"][0]["text"], "to stderr");
}

/// OP-8: a tap that cannot be written is refused at start.
#[test]
fn a_tap_path_that_cannot_be_opened_is_refused_at_start() {
    let out = bin_command()
        .args([
            "--port",
            "0",
            "--tap",
            "/nonexistent-dir-stdio-sse/tap.jsonl",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--tap") && err.contains("cannot open"),
        "{err}"
    );
}

/// A secret with characters JSON escapes (`"`, `\`) stands escaped in a message's text:
/// the tap and the debug log hide it in that form too.
#[test]
fn a_secret_that_json_escapes_is_redacted_in_its_escaped_form() {
    let dir = tap_dir("escaped");
    let tap = dir.join("tap.jsonl");
    let secret = r#"sk"q\7d2e9"#;
    let escaped = r#"sk\"q\\7d2e9"#;
    let mut s = Server::start(
        &[
            "--tap",
            tap.to_str().unwrap(),
            "--log-level",
            "debug",
            "--pass-header",
            "X-User-Key=USER_KEY",
        ],
        &everything(),
    );
    let mut c = Keyed::open(&s, &[("X-User-Key", secret)]);
    let mut post = |body: Value| c.post(body);
    let r = post(tool_call(6, "env", json!({"name": "USER_KEY"})));
    assert_eq!(
        result_text(&r.messages()[0]),
        secret,
        "the client sees its own"
    );
    assert_eq!(s.stop_with(libc::SIGTERM).code(), Some(0));
    let text = std::fs::read_to_string(&tap).unwrap();
    assert!(
        lines_of(&tap)
            .iter()
            .any(|l| l["message"]["id"] == 6 && l["direction"] == "child_to_bridge"),
        "the answer is tapped"
    );
    for shown in [secret, escaped] {
        assert!(!text.contains(shown), "{shown} in the tap");
        assert!(!s.log_text().contains(shown), "{shown} in the log");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rotation that fails (PATH.1 is a directory) stops the tap: said in the log and
/// counted as a dropped message, as a failed write is, not lost unseen (OP-6).
#[test]
fn a_rotation_that_fails_stops_the_tap_logged_and_counted() {
    let dir = tap_dir("rotfail");
    let tap = dir.join("tap.jsonl");
    let blocker = dir.join("tap.jsonl.1");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let s = Server::start(
        &["--tap", tap.to_str().unwrap(), "--tap-max-size", "2KiB"],
        &everything(),
    );
    let sess = Session::open(&s);
    for i in 0..10 {
        let r = sess.call(200 + i, "echo", json!({"message": "y".repeat(300)}));
        assert_eq!(r.status, 200, "the tap stopping stops no call");
    }
    s.wait_log("cannot rotate --tap");
    let m = scrape(&s);
    assert!(
        sample(
            &m,
            "stdio_sse_messages_dropped_total{reason=\"tap_write_failed\"}"
        ) >= 1.0,
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// OP-5: a child that prints its --pass-header value on stderr (a debug line of its own)
/// does not put it in our log, where its stderr lines are logged.
#[test]
fn a_secret_a_child_prints_on_stderr_stays_out_of_the_log() {
    let secret = "sk-stderr-5e0b1d";
    let s = Server::start(
        &["--pass-header", "X-User-Key=USER_KEY"],
        &[
            "sh".into(),
            "-c".into(),
            format!(
                "echo \"using key $USER_KEY\" >&2; exec python3 {}",
                fixture("everything.py")
            ),
        ],
    );
    let mut c = Conn::open(&s);
    let r = c.request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH, ("X-User-Key", secret)],
        init_body("2025-11-25").as_bytes(),
    );
    assert_eq!(r.status, 200);
    let line = s.wait_log("using key");
    assert!(!line.contains(secret), "{line}");
    assert!(!s.log_text().contains(secret), "the secret in the log");
}

/// One-shot mode: the request, the line to the child, each stdout line, and what the
/// client got, under the request's tag.
#[test]
fn one_shot_requests_are_tapped_each_way() {
    let dir = tap_dir("oneshot");
    let tap = dir.join("tap.jsonl");
    let mut s = Server::start(
        &["--mode", "oneshot", "--tap", tap.to_str().unwrap()],
        &["python3".to_string(), fixture("stdio_mcp_server.py")],
    );
    let body = r#"{"jsonrpc":"2.0","id":"abc","params":{"message":"tapped once"}}"#;
    let r = Conn::open(&s).request(
        "POST",
        "/mcp",
        &[JSON_CT, ("Accept", "*/*")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(s.stop_with(libc::SIGTERM).code(), Some(0));
    let lines = lines_of(&tap);
    let mine: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"]["id"] == "abc")
        .collect();
    let directions: Vec<&str> = mine
        .iter()
        .map(|l| l["direction"].as_str().unwrap())
        .collect();
    assert_eq!(
        directions,
        [
            "client_to_bridge",
            "bridge_to_child",
            "child_to_bridge",
            "bridge_to_client"
        ]
    );
    assert!(mine.iter().all(|l| l["session"] == mine[0]["session"]));
    assert_eq!(mine[3]["message"]["result"]["echo"], "tapped once");
    let _ = std::fs::remove_dir_all(&dir);
}
