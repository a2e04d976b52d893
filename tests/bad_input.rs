//! Every bad input gets a clear HTTP status, a JSON-RPC error body and a log line (P-11,
//! P-12, P-3, and the issue's list).
mod common;
use common::*;
use serde_json::json;

fn assert_rpc_error(r: &Response, status: u16, code: i64, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let body = r.json();
    assert_eq!(body["jsonrpc"], "2.0");
    assert_eq!(body["error"]["code"], code, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
}

#[test]
fn malformed_and_invalid_bodies() {
    let s = Server::start(&["--max-body", "1KiB"], &everything());
    let mut c = Conn::open(&s);
    let r = c.request("POST", "/mcp", &[JSON_CT, ACCEPT_BOTH], b"{not json");
    assert_rpc_error(&r, 400, -32700, "Parse error");
    let r = c.request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        br#"{"hello":"world"}"#,
    );
    assert_rpc_error(&r, 400, -32600, "not a JSON-RPC 2.0 message");
    let r = c.request("POST", "/mcp", &[JSON_CT, ACCEPT_BOTH], b"[]");
    assert_rpc_error(&r, 400, -32600, "empty batch");
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"pad": "x".repeat(2000)}}).to_string();
    let r = c.request("POST", "/mcp", &[JSON_CT, ACCEPT_BOTH], big.as_bytes());
    assert_rpc_error(&r, 413, -32600, "1024 bytes");
    // A declared body over the limit is refused before it is read, and the connection
    // closed rather than read through: the rest goes on a new one.
    assert_eq!(r.header("Connection"), Some("close"));
    let mut c = Conn::open(&s);
    let r = c.request(
        "POST",
        "/mcp",
        &[("Content-Type", "text/plain"), ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    );
    assert_rpc_error(&r, 415, -32000, "application/json");
    let r = c.request(
        "POST",
        "/mcp",
        &[JSON_CT, ("Accept", "text/html")],
        init_body("2025-11-25").as_bytes(),
    );
    assert_rpc_error(&r, 406, -32000, "Not Acceptable");
    let r = c.request("GET", "/nowhere", &[], b"");
    assert_rpc_error(&r, 404, -32601, "/nowhere");
    let r = c.request("PUT", "/mcp", &[JSON_CT], b"{}");
    assert_rpc_error(&r, 405, -32000, "GET, POST, DELETE");
    assert_eq!(r.header("Allow"), Some("GET, POST, DELETE"));
    // Each refusal was logged with its reason.
    s.wait_log("413 Request body too large");
    s.wait_log("status=405");
    // After all that, a normal session works on the same connection.
    let r = c.request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn too_many_sessions_gets_503_with_retry_after() {
    let s = Server::start(&["--max-sessions", "1"], &everything());
    let first = Session::open(&s);
    let r = Conn::open(&s).request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    );
    assert_rpc_error(&r, 503, -32000, "max-sessions");
    assert!(r.header("Retry-After").is_some());
    let legacy = Conn::open(&s).request("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    assert_eq!(legacy.status, 503, "legacy sessions share the limit");
    assert_eq!(first.delete().status, 200);
    Session::open(&s);
}

#[test]
fn missing_command_fails_initialize_and_keeps_serving() {
    let s = Server::start(&[], &["/nonexistent/mcp-server".to_string()]);
    let mut c = Conn::open(&s);
    let r = c.request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    );
    assert_eq!(r.status, 502);
    let body = r.json();
    assert_eq!(body["id"], 0, "the error answers the initialize request");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/mcp-server"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not found"));
    assert_eq!(c.request("GET", "/healthz", &[], b"").status, 200);
    let ready = c.request("GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 503);
    assert!(ready.json()["reason"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/mcp-server"));
}

#[test]
fn health_and_readiness() {
    let s = Server::start(&[], &everything());
    let mut c = Conn::open(&s);
    assert_eq!(
        c.request("GET", "/healthz", &[], b"").json()["status"],
        "ok"
    );
    let ready = c.request("GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 200);
    assert!(ready.json()["command"]
        .as_str()
        .unwrap()
        .ends_with("python3"));
    let m = c.request("GET", "/metrics", &[], b"").text();
    assert!(m.contains("stdio_sse_build_info{"), "{m}");
}
