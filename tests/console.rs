//! The console at `/` (--console): the page and its headers (a strict CSP with the hashes
//! of its inline blocks, nosniff, no referrer, no caching), at most 40 KB; HEAD (no body,
//! then the connection closes); served
//! without a token while /mcp still demands one; off with `--console off` and by
//! default on a non-loopback address; a method other than GET or HEAD refused through
//! the refusal table; Host checked on the page as everywhere (O-1); `--mcp-path /`
//! keeps `/` for MCP. The page's behaviour in a browser is tests/external
//! (console_check.mjs).
mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

const MAX_PAGE: usize = 40 * 1024;

fn get_page(server: &Server, headers: &[(&str, &str)]) -> Response {
    Conn::open(server).request("GET", "/", headers, b"")
}

#[test]
fn the_page_comes_with_a_strict_csp_and_its_headers() {
    let s = Server::start(&[], &[]);
    let r = get_page(&s, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("text/html; charset=utf-8"));
    let csp = r.header("Content-Security-Policy").expect("a CSP");
    for part in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(part), "CSP lacks {part}: {csp}");
    }
    // Inline blocks are allowed by hash only: no 'unsafe-inline', no other source.
    for directive in ["script-src", "style-src"] {
        let value = csp
            .split(';')
            .map(str::trim)
            .find_map(|d| d.strip_prefix(directive))
            .unwrap_or_else(|| panic!("no {directive} in {csp}"));
        let sources: Vec<&str> = value.split_whitespace().collect();
        assert_eq!(sources.len(), 1, "{directive}: {value}");
        assert!(sources[0].starts_with("'sha256-"), "{directive}: {value}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(r.header("Referrer-Policy"), Some("no-referrer"));
    assert_eq!(r.header("Cache-Control"), Some("no-store"));
    let page = r.text();
    assert!(
        r.body.len() <= MAX_PAGE,
        "the page is {} bytes",
        r.body.len()
    );
    assert!(page.starts_with("<!doctype html>"), "{}", &page[..40]);
    assert_eq!(page.matches("<script>").count(), 1, "one inline script");
    assert!(!page.contains("<script src"), "no external script");
    assert!(page.contains("data-mcp=\"/mcp\"") && page.contains("data-auth=\"off\""));
    // The access log shows it like any request.
    s.wait_log("access: method=GET path=/ status=200");
}

#[test]
fn head_gives_the_headers_and_length_without_the_body() {
    let s = Server::start(&[], &[]);
    let length = get_page(&s, &[]).body.len();
    let mut c = Conn::open(&s);
    c.send("HEAD", "/", &[], b"");
    let (status, headers) = c.head();
    assert_eq!(status, 200);
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("Content-Length"), Some(length.to_string().as_str()));
    assert_eq!(get("Content-Type"), Some("text/html; charset=utf-8"));
    assert!(get("Content-Security-Policy").is_some());
    // No body follows: the connection ends right after the headers.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut c.into_stream(), &mut rest).expect("the connection closes");
    assert!(rest.is_empty(), "{} bytes after a HEAD answer", rest.len());
    s.wait_log("access: method=HEAD path=/ status=200");
}

#[test]
fn other_methods_are_refused_with_405_and_allow() {
    let s = Server::start(&[], &[]);
    for method in ["POST", "DELETE", "PUT"] {
        let r = Conn::open(&s).request(method, "/", &[JSON_CT], b"{}");
        assert_eq!(r.status, 405, "{method}: {}", r.text());
        assert_eq!(r.header("Allow"), Some("GET, HEAD"), "{method}");
        let body: Value = r.json();
        assert_eq!(body["error"]["code"], -32000, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("GET, HEAD"),
            "{body}"
        );
    }
}

#[test]
fn the_page_needs_no_token_but_mcp_still_does() {
    let token = "console-test-token-5d1e";
    let s = Server::start(&["--auth-token", token], &[]);
    let r = get_page(&s, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let page = r.text();
    assert!(page.contains("data-auth=\"on\""));
    assert!(!page.contains(token), "the page never carries a token");
    let init = init_body("2025-11-25");
    let refused = Conn::open(&s).request("POST", "/mcp", &[JSON_CT, ACCEPT_BOTH], init.as_bytes());
    assert_eq!(refused.status, 401, "{}", refused.text());
    let bearer = format!("Bearer {token}");
    let ok = Conn::open(&s).request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH, ("Authorization", &bearer)],
        init.as_bytes(),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    // And /servers, which the page reads for its picker, wants the token too.
    let servers = Conn::open(&s).request("GET", "/servers", &[], b"");
    assert_eq!(servers.status, 401);
}

#[test]
fn console_off_is_404() {
    let s = Server::start(&["--console", "off"], &[]);
    let r = get_page(&s, &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(!r.text().contains("<html"));
    assert!(
        !s.log_text().contains("in a browser"),
        "no console line in the log"
    );
}

#[test]
fn a_foreign_host_is_refused_on_the_page_too() {
    let s = Server::start(&[], &[]);
    let r = get_page(&s, &[("Host", "evil.example")]);
    assert_eq!(r.status, 403, "{}", r.text());
    let r = get_page(&s, &[("Origin", "https://evil.example")]);
    assert_eq!(r.status, 403, "{}", r.text());
}

#[test]
fn the_page_names_the_configured_path_and_an_mcp_path_of_slash_keeps_slash() {
    let s = Server::start(&["--mcp-path", "/x/mcp"], &[]);
    let page = get_page(&s, &[]).text();
    assert!(page.contains("data-mcp=\"/x/mcp\""), "{}", &page[..400]);

    let s = Server::start(&["--mcp-path", "/"], &[]);
    let r = get_page(&s, &[("Accept", "text/event-stream")]);
    assert_ne!(
        r.header("Content-Type"),
        Some("text/html; charset=utf-8"),
        "GET / is the MCP endpoint's: {}",
        r.text()
    );
}

#[test]
fn the_page_knows_the_mode_of_the_front_endpoint() {
    // One-shot has no session to hold: the page says so instead of connecting.
    let s = Server::start(&["--mode", "oneshot"], &[]);
    assert!(get_page(&s, &[]).text().contains("data-mode=\"oneshot\""));
    let s = Server::start(&["--mode", "shared"], &[]);
    assert!(get_page(&s, &[]).text().contains("data-mode=\"shared\""));
}

/// A stdio-sse bound to 0.0.0.0 (all addresses, not loopback), reached over loopback.
struct Exposed {
    child: Child,
    port: u16,
}

impl Exposed {
    fn start(flags: &[&str]) -> Exposed {
        let mut child = bin_command()
            .args([
                "--host",
                "0.0.0.0",
                "--port",
                "0",
                "--allow-unauthenticated",
            ])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stdio-sse");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://0.0.0.0:").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let _ = tx.send(port.parse::<u16>().ok());
                }
            }
        });
        let port = rx
            .recv_timeout(DEADLINE)
            .ok()
            .flatten()
            .expect("a listening line with the port");
        Exposed { child, port }
    }
    fn get_page(&self) -> Response {
        Conn::open_addr(&format!("127.0.0.1:{}", self.port)).request("GET", "/", &[], b"")
    }
}

impl Drop for Exposed {
    fn drop(&mut self) {
        // SIGTERM, so it ends as it would for an operator (its guardian and children too).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = std::time::Instant::now() + DEADLINE;
        while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bound_to_a_non_loopback_address_the_console_is_off_unless_asked_for() {
    let by_default = Exposed::start(&[]);
    assert_eq!(by_default.get_page().status, 404);
    let asked = Exposed::start(&["--console", "on"]);
    let r = asked.get_page();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("Content-Security-Policy").is_some());
    drop(asked);
    // Alone, as websocketd's --devconsole: on.
    let bare = Exposed::start(&["--console"]);
    assert_eq!(bare.get_page().status, 200);
}

#[test]
fn a_bad_console_value_is_refused_at_startup() {
    let out = bin_command()
        .args(["--port", "0", "--console=maybe"])
        .output()
        .expect("run stdio-sse");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--console must be auto, on or off"), "{err}");
}
