//! Safe to expose: bearer tokens, sessions bound to their token, CORS, --pass-header.
//! Rules: S-2 (a session id is not a credential), O-1/O-2 (Origin and Host checks).

mod common;
use common::*;
use serde_json::json;

const INIT_HEADERS: [(&str, &str); 2] = [JSON_CT, ACCEPT_BOTH];

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// initialize with these extra headers; returns the session id.
fn init_with(s: &Server, extra: &[(&str, &str)]) -> Response {
    let mut headers = INIT_HEADERS.to_vec();
    headers.extend_from_slice(extra);
    Conn::open(s).request("POST", "/mcp", &headers, init_body("2025-11-25").as_bytes())
}

fn call_with(
    s: &Server,
    session: &str,
    auth: Option<&str>,
    id: i64,
    tool: &str,
    args: serde_json::Value,
) -> Response {
    let auth = auth.map(bearer);
    let mut headers = vec![JSON_CT, ACCEPT_BOTH, ("Mcp-Session-Id", session)];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    Conn::open(s).request(
        "POST",
        "/mcp",
        &headers,
        tool_call(id, tool, args).to_string().as_bytes(),
    )
}

#[test]
fn bearer_tokens_guard_every_route_but_health_and_reload_on_sighup() {
    let dir = std::env::temp_dir().join(format!("stdio-sse-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, "# team tokens\nfile-token-b2\n\n").unwrap();
    let s = Server::start(
        &[
            "--auth-token",
            "fixed-token-a1",
            "--auth-token-file",
            file.to_str().unwrap(),
        ],
        &everything(),
    );

    // No token, a wrong token, a wrong scheme: 401 with a Bearer challenge and a
    // JSON-RPC error body.
    let r = init_with(&s, &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("WWW-Authenticate").unwrap().starts_with("Bearer"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Bearer"));
    let r = init_with(&s, &[("Authorization", "Bearer guessed-token-zz")]);
    assert_eq!(r.status, 401);
    assert!(r
        .header("WWW-Authenticate")
        .unwrap()
        .contains("invalid_token"));
    let r = init_with(&s, &[("Authorization", "Basic Zml4ZWQtdG9rZW4tYTE=")]);
    assert_eq!(r.status, 401);

    // Health stays open; metrics follow the token rule.
    let get = |path: &str, auth: Option<&str>| {
        let a = auth.map(bearer);
        let h: Vec<(&str, &str)> = a.iter().map(|a| ("Authorization", a.as_str())).collect();
        Conn::open(&s).request("GET", path, &h, b"")
    };
    assert_eq!(get("/healthz", None).status, 200);
    assert_eq!(get("/readyz", None).status, 200);
    assert_eq!(get("/metrics", None).status, 401);
    let metrics = get("/metrics", Some("fixed-token-a1"));
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .text()
        .contains(r#"stdio_sse_requests_rejected_total{reason="unauthorized"} 4"#));

    // Both token sources work; a session answers only to the token that made it (S-2):
    // to another valid token it does not exist.
    let a = init_with(&s, &[("Authorization", "Bearer fixed-token-a1")]);
    assert_eq!(a.status, 200, "{}", a.text());
    let a_id = a.header("Mcp-Session-Id").unwrap().to_string();
    let b = init_with(&s, &[("Authorization", "Bearer file-token-b2")]);
    assert_eq!(b.status, 200);
    let r = call_with(
        &s,
        &a_id,
        Some("fixed-token-a1"),
        2,
        "echo",
        json!({"message": "mine"}),
    );
    assert_eq!(r.status, 200);
    assert!(result_text(&r.messages()[0]).contains("mine"));
    let r = call_with(
        &s,
        &a_id,
        Some("file-token-b2"),
        3,
        "echo",
        json!({"message": "theirs"}),
    );
    assert_eq!(
        r.status,
        404,
        "another token must not reach the session: {}",
        r.text()
    );
    let r = Conn::open(&s).request(
        "GET",
        "/mcp",
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &a_id),
            ("Authorization", "Bearer file-token-b2"),
        ],
        b"",
    );
    assert_eq!(r.status, 404);
    let r = Conn::open(&s).request(
        "DELETE",
        "/mcp",
        &[
            ("Mcp-Session-Id", &a_id),
            ("Authorization", "Bearer file-token-b2"),
        ],
        b"",
    );
    assert_eq!(r.status, 404);

    // SIGHUP re-reads the file: the new token works, the removed one does not, and the
    // session made with the fixed token lives on.
    std::fs::write(&file, "file-token-c3\n").unwrap();
    let from = s.log_len();
    unsafe { libc::kill(s.pid(), libc::SIGHUP) };
    s.wait_log_after("token file re-read: 2 tokens", from);
    assert_eq!(
        init_with(&s, &[("Authorization", "Bearer file-token-c3")]).status,
        200
    );
    assert_eq!(
        init_with(&s, &[("Authorization", "Bearer file-token-b2")]).status,
        401
    );
    let r = call_with(
        &s,
        &a_id,
        Some("fixed-token-a1"),
        4,
        "echo",
        json!({"message": "still here"}),
    );
    assert_eq!(r.status, 200);
    assert!(result_text(&r.messages()[0]).contains("still here"));

    // A broken file keeps the tokens in force.
    std::fs::write(&file, "# nothing\n").unwrap();
    let from = s.log_len();
    unsafe { libc::kill(s.pid(), libc::SIGHUP) };
    s.wait_log_after("keeping the tokens in force", from);
    assert_eq!(
        init_with(&s, &[("Authorization", "Bearer file-token-c3")]).status,
        200
    );

    // No token, valid or guessed, ever reaches the log or the metrics.
    let text = s.log_text() + &get("/metrics", Some("fixed-token-a1")).text();
    for secret in [
        "fixed-token-a1",
        "file-token-b2",
        "file-token-c3",
        "guessed-token-zz",
        "Zml4ZWQ",
    ] {
        assert!(!text.contains(secret), "{secret} leaked");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn auth_health_closes_the_health_routes_too() {
    let s = Server::start(&["--auth-token", "t0k", "--auth-health"], &everything());
    let r = Conn::open(&s).request("GET", "/healthz", &[], b"");
    assert_eq!(r.status, 401);
    let r = Conn::open(&s).request("GET", "/readyz", &[("Authorization", "Bearer t0k")], b"");
    assert_eq!(r.status, 200);
}

/// The warning needs a non-loopback address; a fresh network namespace (whose only
/// interface is a downed loopback) gives one that nothing outside can reach.
#[test]
fn unauthenticated_non_loopback_bind_warns_and_names_the_flags() {
    let run = |extra: &[&str]| -> String {
        let mut cmd = std::process::Command::new("unshare");
        cmd.arg("-rn")
            .args(bin_argv())
            .args(["--host", "0.0.0.0", "--port", "0"])
            .args(extra);
        cmd.stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("unshare");
        let mut err = child.stderr.take().unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        use std::io::Read;
        // Read until the listening line (printed after the warning would be).
        while !seen.contains("listening on") {
            let n = err.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap();
        seen
    };
    let out = run(&[]);
    assert!(out.contains("listening on"), "did not start: {out}");
    if out.contains("Operation not permitted") {
        panic!("unshare -rn is not permitted here: {out}");
    }
    assert!(
        out.contains("WARN")
            && out.contains("--auth-token")
            && out.contains("--allow-unauthenticated"),
        "{out}"
    );
    let quiet = run(&["--allow-unauthenticated"]);
    assert!(
        quiet.contains("listening on") && !quiet.contains("--allow-unauthenticated"),
        "{quiet}"
    );
    let with_token = run(&["--auth-token", "x"]);
    assert!(
        with_token.contains("listening on") && !with_token.contains("WARN"),
        "{with_token}"
    );
}

#[test]
fn cors_answers_preflight_for_listed_origins_only() {
    // Without --cors-origin there are no CORS headers at all.
    let plain = Server::start(&[], &everything());
    let r = Conn::open(&plain).request(
        "OPTIONS",
        "/mcp",
        &[
            ("Origin", "http://127.0.0.1:9"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    );
    assert_eq!(r.status, 405);
    assert!(r.header("Access-Control-Allow-Origin").is_none());
    let r = init_with(&plain, &[("Origin", "http://127.0.0.1:9")]);
    assert_eq!(r.status, 200);
    assert!(r.header("Access-Control-Allow-Origin").is_none());

    let s = Server::start(
        &[
            "--cors-origin",
            "https://app.example.com",
            "--auth-token",
            "tk",
        ],
        &everything(),
    );
    let pre = Conn::open(&s).request(
        "OPTIONS",
        "/mcp",
        &[
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type, mcp-session-id",
            ),
        ],
        b"",
    );
    assert_eq!(pre.status, 204, "preflight needs no token: {}", pre.text());
    assert_eq!(
        pre.header("Access-Control-Allow-Origin"),
        Some("https://app.example.com")
    );
    let allowed = pre
        .header("Access-Control-Allow-Headers")
        .unwrap()
        .to_ascii_lowercase();
    for h in [
        "content-type",
        "authorization",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
    ] {
        assert!(allowed.contains(h), "{h} missing from {allowed}");
    }
    assert!(pre
        .header("Access-Control-Allow-Methods")
        .unwrap()
        .contains("DELETE"));

    // The listed origin passes the Origin check (it is not loopback) and may read the
    // session id.
    let r = init_with(
        &s,
        &[
            ("Origin", "https://app.example.com"),
            ("Authorization", "Bearer tk"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        Some("https://app.example.com")
    );
    assert!(r
        .header("Access-Control-Expose-Headers")
        .unwrap()
        .contains("Mcp-Session-Id"));
    // A 401 carries CORS headers too, so the page can see why.
    let r = init_with(&s, &[("Origin", "https://app.example.com")]);
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        Some("https://app.example.com")
    );

    // An origin not listed: refused preflight, and no CORS headers on anything.
    let r = Conn::open(&s).request(
        "OPTIONS",
        "/mcp",
        &[
            ("Origin", "http://127.0.0.1:9"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    );
    assert_eq!(r.status, 403);
    assert!(r.header("Access-Control-Allow-Origin").is_none());
    let r = init_with(
        &s,
        &[
            ("Origin", "https://evil.example.net"),
            ("Authorization", "Bearer tk"),
        ],
    );
    assert_eq!(r.status, 403);
    assert!(r.header("Access-Control-Allow-Origin").is_none());
    s.wait_log("not allowed by CORS");
}

#[test]
fn pass_header_gives_each_session_its_own_value_and_nothing_else() {
    let s = Server::start_env(
        &[
            "--pass-header",
            "X-Api-Key",
            "--pass-header",
            "X-User=MCP_USER",
        ],
        &everything(),
        // Our own environment must never stand in for a missing header.
        &[("HTTP_X_API_KEY", "inherited-from-the-bridge")],
    );
    let open = |extra: &[(&str, &str)]| {
        let r = init_with(&s, extra);
        assert_eq!(r.status, 200, "{}", r.text());
        r.header("Mcp-Session-Id").unwrap().to_string()
    };
    let env_of = |session: &str, var: &str| {
        let r = call_with(&s, session, None, 7, "env", json!({"name": var}));
        assert_eq!(r.status, 200, "{}", r.text());
        result_text(&r.messages()[0])
    };
    let alice = open(&[("X-Api-Key", "alice-key-1"), ("X-User", "alice")]);
    let bob = open(&[("X-Api-Key", "bob key; $(rm -rf /) `x` \"q\"")]);
    let nobody = open(&[("X-Other", "ignored")]);
    assert_eq!(env_of(&alice, "HTTP_X_API_KEY"), "alice-key-1");
    assert_eq!(env_of(&alice, "MCP_USER"), "alice");
    // Passed as-is, never through a shell.
    assert_eq!(
        env_of(&bob, "HTTP_X_API_KEY"),
        "bob key; $(rm -rf /) `x` \"q\""
    );
    assert_eq!(env_of(&bob, "MCP_USER"), "");
    assert_eq!(
        env_of(&nobody, "HTTP_X_API_KEY"),
        "",
        "an absent header leaves the variable unset"
    );
    assert_eq!(
        env_of(&nobody, "HTTP_X_OTHER"),
        "",
        "only listed headers pass"
    );
    // Later requests cannot change the child's environment.
    let r = Conn::open(&s).request(
        "POST",
        "/mcp",
        &[
            JSON_CT,
            ACCEPT_BOTH,
            ("Mcp-Session-Id", &alice),
            ("X-Api-Key", "mallory"),
        ],
        tool_call(8, "env", json!({"name": "HTTP_X_API_KEY"}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(result_text(&r.messages()[0]), "alice-key-1");

    // CRLF injection: the raw bytes make a second header line, never part of a value.
    let mut c = Conn::open(&s);
    let body = init_body("2025-11-25");
    let raw = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nX-Api-Key: injected\r\nX-User: eve\r\nMCP_USER: root\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_raw(raw.as_bytes());
    let r = c.response();
    assert_eq!(r.status, 200);
    let eve = r.header("Mcp-Session-Id").unwrap().to_string();
    assert_eq!(env_of(&eve, "HTTP_X_API_KEY"), "injected");
    assert_eq!(env_of(&eve, "MCP_USER"), "eve");
    // A control character in a value is refused.
    let r = init_with(&s, &[("X-Api-Key", "a\u{1}b")]);
    assert_eq!(r.status, 400, "{}", r.text());
}
