//! Rate limits (issue 20): --rate-limit per bearer token or per client address,
//! --trusted-proxy and X-Forwarded-For, --max-sessions-per-token, each through the real
//! binary on loopback, as a client sees it: the status, Retry-After, the JSON-RPC error,
//! the log, the access line and /metrics.
//! Rules: RL-1, RL-2, RL-3 (README, "Rules of our own"), RB-3 (bad input gets a clear status, a JSON-RPC error body and a log line, and
//! leaves the server as it was), OP-6 (metrics, bounded labels), OP-8 (a mistake exits 2
//! with a reason), P-4 (HTTP-level errors carry no id), A-1 (tokens); RFC 6585 §4 (429),
//! RFC 9110 §10.2.3 (Retry-After).
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A client of the Streamable HTTP endpoint with headers of its own (a bearer token, an
/// X-Forwarded-For).
struct Client<'a> {
    server: &'a Server,
    extra: Vec<(&'static str, String)>,
    session: Option<String>,
    /// The loopback address its connections come from (127.0.0.1 when None).
    source: Option<[u8; 4]>,
}

/// A connection from another loopback address (127.0.0.0/8 is all this machine's), so a
/// peer address of its own, with no proxy in between.
fn conn_from(source: [u8; 4], server: &Server) -> Conn {
    use std::os::fd::FromRawFd;
    let addr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (src, dst) = (addr(source, 0), addr([127, 0, 0, 1], server.port));
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let bound = libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len);
        assert_eq!(
            bound,
            0,
            "bind {source:?}: {}",
            std::io::Error::last_os_error()
        );
        let connected = libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len);
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    };
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    Conn::from_stream(stream, &server.addr())
}

impl<'a> Client<'a> {
    fn new(server: &'a Server, extra: &[(&'static str, &str)]) -> Client<'a> {
        Client {
            server,
            extra: extra.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            session: None,
            source: None,
        }
    }
    fn bearer(server: &'a Server, token: &str) -> Client<'a> {
        Client::new(server, &[("Authorization", &format!("Bearer {token}"))])
    }
    fn send(&self, method: &str, path: &str, body: &[u8]) -> Response {
        let mut h: Vec<(&str, &str)> =
            vec![JSON_CT, ACCEPT_BOTH, ("MCP-Protocol-Version", "2025-11-25")];
        if let Some(id) = &self.session {
            h.push(("Mcp-Session-Id", id));
        }
        h.extend(self.extra.iter().map(|(k, v)| (*k, v.as_str())));
        let mut conn = match self.source {
            Some(ip) => conn_from(ip, self.server),
            None => Conn::open(self.server),
        };
        conn.request(method, path, &h, body)
    }
    fn post(&self, body: &Value) -> Response {
        self.send("POST", "/mcp", body.to_string().as_bytes())
    }
    /// initialize + notifications/initialized; the initialize's response.
    fn open(&mut self) -> Response {
        let r = self.send("POST", "/mcp", init_body("2025-11-25").as_bytes());
        if r.status == 200 {
            self.session = Some(r.header("Mcp-Session-Id").expect("session id").to_string());
            let n = self.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
            assert_eq!(n.status, 202, "{}", n.text());
        }
        r
    }
    fn echo(&self, id: i64) -> Response {
        self.post(&tool_call(
            id,
            "echo",
            json!({"message": format!("call {id}")}),
        ))
    }
    fn delete(&self) -> Response {
        self.send("DELETE", "/mcp", b"")
    }
    /// Calls until one is refused (at most `most`): (calls served, the refusal).
    fn until_refused(&self, first_id: i64, most: i64) -> (i64, Response) {
        for i in 0..most {
            let r = self.echo(first_id + i);
            if r.status == 429 {
                return (i, r);
            }
            assert_eq!(r.status, 200, "call {i}: {}", r.text());
        }
        panic!("{most} calls and none refused");
    }
}

/// What a 429 must carry: Retry-After in whole seconds (at least 1), a JSON-RPC error
/// without an id (P-4) naming the limit. Returns Retry-After.
fn assert_rate_refusal(r: &Response, words: &str) -> Duration {
    assert_eq!(r.status, 429, "{}", r.text());
    let retry = r.header("Retry-After").expect("Retry-After on a 429");
    let secs: u64 = retry
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {retry:?} is not whole seconds"));
    assert!(secs >= 1, "Retry-After {secs}");
    let body = r.json();
    assert_eq!(body["jsonrpc"], "2.0");
    assert_eq!(body["id"], Value::Null, "{body}");
    assert_eq!(body["error"]["code"], -32000, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Too Many Requests") && message.contains(words),
        "{message}"
    );
    Duration::from_secs(secs)
}

/// /metrics with a token (auth covers it).
fn scrape_as(server: &Server, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h = vec![];
    if let Some(a) = &auth {
        h.push(("Authorization", a.as_str()));
    }
    let r = Conn::open(server).request("GET", "/metrics", &h, b"");
    assert_eq!(r.status, 200, "/metrics: {}", r.text());
    r.text()
}

/// Polls (each poll itself a request, which a refusal does not charge) until a call is
/// served; bounded. Returns how long it took.
fn served_within(c: &Client, first_id: i64, bound: Duration) -> Duration {
    let start = Instant::now();
    let mut id = first_id;
    loop {
        let r = c.echo(id);
        if r.status == 200 {
            return start.elapsed();
        }
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(
            start.elapsed() < bound,
            "still refused after {:?}",
            start.elapsed()
        );
        id += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A token over its rate gets 429 with Retry-After and a JSON-RPC error, and is served
/// again once Retry-After has passed; another token is served all the while; /healthz,
/// /metrics and DELETE are not counted; the log, the access line and /metrics show it.
/// Rules: RL-1, P-4, A-1 (no token in the log), OP-6.
#[test]
fn a_token_over_its_rate_gets_429_then_is_served_after_retry_after() {
    let s = Server::start(
        &[
            "--auth-token",
            "token-a",
            "--auth-token",
            "token-b",
            "--rate-limit",
            "2/s,4",
        ],
        &[],
    );
    let mut a = Client::bearer(&s, "token-a");
    let mut b = Client::bearer(&s, "token-b");
    assert_eq!(a.open().status, 200);
    // initialize and initialized took two of the four; the bucket refills at 2/s.
    let (served, refused) = a.until_refused(1, 50);
    assert!(served >= 2, "only {served} calls before the refusal");
    let retry_after = assert_rate_refusal(&refused, "this bearer token is over --rate-limit 2/s,4");
    assert_eq!(retry_after, Duration::from_secs(1), "1/(2/s) rounded up");

    // Meanwhile: the other token, the probes and the scrape.
    assert_eq!(b.open().status, 200);
    let r = b.echo(1);
    assert_eq!(
        (r.status, result_text(&r.messages()[0])),
        (200, "call 1".to_string())
    );
    for _ in 0..10 {
        let h = Conn::open(&s).request("GET", "/healthz", &[], b"");
        assert_eq!(h.status, 200);
    }
    assert!(
        sample(
            &scrape_as(&s, Some("token-a")),
            "stdio_sse_rate_limited_total{key_kind=\"token\"}"
        ) >= 1.0,
        "the refusal is counted under its key kind"
    );

    // Served again: within Retry-After (it is rounded up), polling.
    let waited = served_within(&a, 100, retry_after + Duration::from_secs(3));
    assert!(
        waited <= retry_after + Duration::from_millis(1500),
        "{waited:?}"
    );

    // DELETE is never refused: it frees what the limit protects.
    let (_, refused) = a.until_refused(200, 50);
    assert_eq!(refused.status, 429);
    let d = a.delete();
    assert!(
        (200..300).contains(&d.status),
        "DELETE over the rate: {} {}",
        d.status,
        d.text()
    );

    let m = scrape_as(&s, Some("token-b"));
    assert!(
        sample(&m, "stdio_sse_rate_limited_total{key_kind=\"token\"}") >= 2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "stdio_sse_rate_limited_total{key_kind=\"address\"}"),
        0.0
    );
    assert!(
        sample(
            &m,
            "stdio_sse_requests_rejected_total{reason=\"rate_limited\"}"
        ) >= 2.0
    );
    assert!(sample(&m, "stdio_sse_rate_limit_buckets") >= 1.0);
    // The log: a warning at the first refusal (no token in it), a note when served again,
    // and the access line's reason.
    let warn = s.wait_log("rate_limited:");
    assert!(
        warn.contains("key_kind=token") && !warn.contains("token-a"),
        "{warn}"
    );
    s.wait_log("rate_limit_served:");
    let access = s.wait_log("status=429");
    assert!(access.contains("reason=rate_limited"), "{access}");
    assert!(!s.log_text().contains("token-a"), "a token reached the log");
}

/// Without tokens the bucket is the client address; behind a --trusted-proxy that
/// address comes from X-Forwarded-For, the right-most entry not itself trusted, so two
/// clients behind the same proxy have a bucket each, and a client cannot pick another
/// by writing the header's left part itself. Rules: RL-1, RL-2.
#[test]
fn behind_a_trusted_proxy_each_forwarded_address_has_its_own_bucket() {
    let s = Server::start(
        &["--trusted-proxy", "127.0.0.1", "--rate-limit", "1/h,3"],
        &[],
    );
    let mut one = Client::new(&s, &[("X-Forwarded-For", "203.0.113.1")]);
    assert_eq!(one.open().status, 200);
    let r = one.echo(1);
    assert_eq!(r.status, 200);
    let r = one.echo(2);
    let retry_after = assert_rate_refusal(&r, "this client address is over --rate-limit 1/h,3");
    // One request an hour: 3600 s, rounded up, at the least.
    assert!(retry_after >= Duration::from_secs(3599), "{retry_after:?}");

    // Another address behind the same proxy: its own bucket.
    let mut two = Client::new(&s, &[("X-Forwarded-For", "203.0.113.2")]);
    assert_eq!(two.open().status, 200);
    assert_eq!(two.echo(1).status, 200);

    // The first client writing a left part of its own: the proxy's appended entry (the
    // right-most untrusted) is still 203.0.113.1.
    let mut forged = Client::new(&s, &[("X-Forwarded-For", "198.51.100.7, 203.0.113.1")]);
    forged.session = one.session.clone();
    assert_eq!(forged.echo(3).status, 429);
    // And a hop through a second trusted proxy (127.0.0.1 again) changes nothing.
    let mut via = Client::new(&s, &[("X-Forwarded-For", "203.0.113.1, 127.0.0.1")]);
    via.session = one.session.clone();
    assert_eq!(via.echo(4).status, 429);

    let m = scrape_as(&s, None);
    assert_eq!(
        sample(&m, "stdio_sse_rate_limited_total{key_kind=\"address\"}"),
        3.0,
        "{m}"
    );
    let warn = s.wait_log("rate_limited:");
    assert!(
        warn.contains("key_kind=address") && warn.contains("client=203.0.113.1"),
        "{warn}"
    );
}

/// Without tokens and without a proxy, each peer address has its own bucket: two
/// clients from two loopback addresses, one over its rate, the other served.
/// Rules: RL-1.
#[test]
fn each_peer_address_has_its_own_bucket() {
    let s = Server::start(&["--rate-limit", "1/h,3"], &[]);
    let mut one = Client::new(&s, &[]);
    one.source = Some([127, 0, 0, 2]);
    assert_eq!(one.open().status, 200);
    assert_eq!(one.echo(1).status, 200);
    assert_rate_refusal(
        &one.echo(2),
        "this client address is over --rate-limit 1/h,3",
    );
    let mut two = Client::new(&s, &[]);
    two.source = Some([127, 0, 0, 3]);
    assert_eq!(two.open().status, 200);
    let r = two.echo(1);
    assert_eq!(result_text(&r.messages()[0]), "call 1");
    let warn = s.wait_log("rate_limited:");
    assert!(warn.contains("client=127.0.0.2"), "{warn}");
    let access = s.wait_log("status=429");
    assert!(access.contains("peer=127.0.0.2:"), "{access}");
}

/// From a peer that is not a trusted proxy, X-Forwarded-For is the client's own
/// invention and is ignored: every request from loopback shares loopback's bucket,
/// whatever the header says. Rules: RL-2.
#[test]
fn a_forged_forwarded_for_from_an_untrusted_peer_is_ignored() {
    for flags in [
        &["--rate-limit", "1/h,3"][..],
        &[
            "--rate-limit",
            "1/h,3",
            "--trusted-proxy",
            "192.0.2.1,10.0.0.0/8",
        ][..],
    ] {
        let s = Server::start(flags, &[]);
        let mut c = Client::new(&s, &[("X-Forwarded-For", "203.0.113.10")]);
        assert_eq!(c.open().status, 200, "{flags:?}");
        c.extra = vec![("X-Forwarded-For", "203.0.113.11".into())];
        assert_eq!(c.echo(1).status, 200, "{flags:?}");
        // A fourth request, under yet another made-up address: refused all the same.
        c.extra = vec![("X-Forwarded-For", "203.0.113.12".into())];
        let r = c.echo(2);
        assert_rate_refusal(&r, "this client address");
        let warn = s.wait_log("rate_limited:");
        assert!(warn.contains("client=127.0.0.1"), "{flags:?}: {warn}");
    }
}

/// A legacy client is counted too: its GET /sse and each POST to /message.
/// Rules: RL-1, L-1.
#[test]
fn legacy_requests_count_against_the_same_bucket() {
    let s = Server::start(&["--rate-limit", "1/h,2"], &[]);
    let mut c = Conn::open(&s);
    c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    let mut stream = SseReader::new(c);
    assert_eq!(stream.status, 200);
    let endpoint = stream.next_event().expect("endpoint event").data;
    let post = |body: &str| Conn::open(&s).request("POST", &endpoint, &[JSON_CT], body.as_bytes());
    assert_eq!(post(&init_body("2024-11-05")).status, 202);
    let r = post(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    assert_rate_refusal(&r, "over --rate-limit 1/h,2");
    // A new stream from the same address: refused before it opens.
    let r = Conn::open(&s).request("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    assert_rate_refusal(&r, "over --rate-limit");
}

/// A malformed --rate-limit (or a companion flag) is refused at start, exit status 2,
/// with the syntax in the message; the variable likewise. Rules: OP-8.
#[test]
fn malformed_rate_limits_exit_2_with_the_syntax() {
    for bad in [
        "10",
        "10/d",
        "0/s",
        "-1/s",
        "1.5/s",
        "ten/s",
        "10/s,0",
        "10/s,x",
        "10/s,",
        "/s",
        "10/",
        "5000000/s",
        "10 per second",
    ] {
        let out = bin_command().args(["--rate-limit", bad]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--rate-limit {bad:?}: {err}");
        assert!(
            err.contains(&format!("--rate-limit {bad:?}")) && err.contains("N/s, N/m or N/h"),
            "--rate-limit {bad:?}: {err}"
        );
    }
    let out = bin_command()
        .env("STDIO_SSE_RATE_LIMIT", "fast")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate-limit \"fast\""));
    for (args, needle) in [
        (
            &["--trusted-proxy", "proxy.example"][..],
            "--trusted-proxy \"proxy.example\"",
        ),
        (
            &["--trusted-proxy", "10.0.0.0/40"],
            "--trusted-proxy \"10.0.0.0/40\"",
        ),
        (
            &["--rate-limit-keys", "0"],
            "--rate-limit-keys must be at least 1",
        ),
        (
            &["--max-sessions-per-token", "some"],
            "--max-sessions-per-token takes a whole number",
        ),
    ] {
        let out = bin_command().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let help = bin_command().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "STDIO_SSE_RATE_LIMIT",
        "STDIO_SSE_TRUSTED_PROXY",
        "STDIO_SSE_MAX_SESSIONS_PER_TOKEN",
        "STDIO_SSE_RATE_LIMIT_KEYS",
    ] {
        assert!(help.contains(var), "{var} not in --help");
    }
}

/// --max-sessions-per-token: a token's extra session is refused with 429 (its own limit,
/// not the server's), Retry-After and a JSON-RPC error; another token is served; after a
/// DELETE the token opens one again. Metrics and the log show it. Rules: RL-3, RB-3.
#[test]
fn a_token_at_its_session_limit_is_refused_until_it_ends_one() {
    let s = Server::start(
        &[
            "--auth-token",
            "token-a",
            "--auth-token",
            "token-b",
            "--max-sessions-per-token",
            "2",
        ],
        &[],
    );
    let mut first = Client::bearer(&s, "token-a");
    let mut second = Client::bearer(&s, "token-a");
    assert_eq!(first.open().status, 200);
    assert_eq!(second.open().status, 200);
    let mut third = Client::bearer(&s, "token-a");
    let r = third.open();
    assert_rate_refusal(
        &r,
        "this bearer token holds --max-sessions-per-token 2 sessions",
    );
    assert_eq!(r.header("Retry-After"), Some("5"));
    // A legacy stream of the same token: refused before it announces an endpoint.
    let r = Conn::open(&s).request(
        "GET",
        "/sse",
        &[
            ("Accept", "text/event-stream"),
            ("Authorization", "Bearer token-a"),
        ],
        b"",
    );
    assert_rate_refusal(&r, "--max-sessions-per-token 2");
    // Another token is its own count.
    let mut other = Client::bearer(&s, "token-b");
    assert_eq!(other.open().status, 200);
    // The first two still work.
    assert_eq!(first.echo(1).status, 200);
    assert_eq!(second.echo(1).status, 200);
    // One ended: the token opens one again.
    assert!((200..300).contains(&first.delete().status));
    assert_eq!(third.open().status, 200);
    assert_eq!(third.echo(1).status, 200);

    let m = scrape_as(&s, Some("token-b"));
    assert_eq!(
        sample(
            &m,
            "stdio_sse_client_sessions_refused_total{key_kind=\"token\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "stdio_sse_requests_rejected_total{reason=\"client_sessions\"}"
        ),
        2.0
    );
    let line = s.wait_log("client_sessions:");
    assert!(
        line.contains("key_kind=token") && !line.contains("token-a"),
        "{line}"
    );
    let access = s.wait_log("reason=client_sessions");
    assert!(access.contains("status=429"), "{access}");
}

/// Without tokens the session limit is per client address (here behind a trusted
/// proxy), and a client's own session left unattended for --evict-idle-after makes room
/// for its new one (clients that never send DELETE do not lock themselves out), while
/// another client's sessions are never touched. Rules: RL-3, RL-2, S-4.
#[test]
fn per_address_session_limit_evicts_only_the_clients_own_unattended_session() {
    let s = Server::start(
        &[
            "--trusted-proxy",
            "127.0.0.1",
            "--max-sessions-per-token",
            "1",
            "--evict-idle-after",
            "1s",
        ],
        &[],
    );
    let mut neighbour = Client::new(&s, &[("X-Forwarded-For", "203.0.113.20")]);
    assert_eq!(neighbour.open().status, 200);
    let mut old = Client::new(&s, &[("X-Forwarded-For", "203.0.113.21")]);
    assert_eq!(old.open().status, 200);
    let mut new = Client::new(&s, &[("X-Forwarded-For", "203.0.113.21")]);
    // Refused while the old one is fresh; served once it has been unattended 1 s.
    let start = Instant::now();
    loop {
        let r = new.open();
        if r.status == 200 {
            break;
        }
        assert_rate_refusal(&r, "this client address holds --max-sessions-per-token 1");
        assert!(start.elapsed() < DEADLINE, "never served");
        new.session = None;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    // The old session was the one ended (404, S-4); the neighbour's lives on.
    assert_eq!(old.echo(1).status, 404);
    assert_eq!(neighbour.echo(1).status, 200);
    assert_eq!(new.echo(1).status, 200);
    let m = scrape_as(&s, None);
    assert!(
        sample(
            &m,
            "stdio_sse_client_sessions_refused_total{key_kind=\"address\"}"
        ) >= 1.0,
        "{m}"
    );
}

/// The table of buckets is bounded by --rate-limit-keys: clients past it (here ten
/// forwarded addresses for four keys) cost no more memory, the fullest buckets going
/// first, and the refusals of a client that spent its bucket go on. Rules: RL-1, RB-3.
#[test]
fn the_bucket_table_stays_within_rate_limit_keys() {
    let s = Server::start(
        &[
            "--trusted-proxy",
            "127.0.0.1",
            "--rate-limit",
            "1/h,2",
            "--rate-limit-keys",
            "4",
        ],
        &[],
    );
    let mut spender = Client::new(&s, &[("X-Forwarded-For", "203.0.113.50")]);
    assert_eq!(spender.open().status, 200);
    assert_eq!(spender.echo(1).status, 429);
    for i in 1..=10 {
        let xff = format!("203.0.113.{i}");
        let c = Client::new(&s, &[("X-Forwarded-For", &xff)]);
        let r = c.send("GET", "/servers", b"");
        assert_eq!(r.status, 200, "{xff}: {}", r.text());
        let held = sample(&scrape_as(&s, None), "stdio_sse_rate_limit_buckets");
        assert!(held <= 4.0, "{held} buckets held with --rate-limit-keys 4");
    }
    s.wait_log("--rate-limit-keys 4 reached");
    // The spent bucket is the emptiest: it stayed, so its client is still refused.
    assert_eq!(spender.echo(2).status, 429);
}

/// A wrong token is a guess: with --rate-limit on, guesses draw on their address's
/// bucket, so token guessing goes no faster than the rate (401s, then 429), while a
/// client with the right token keeps its own bucket.
#[test]
fn wrong_tokens_draw_on_the_address_bucket() {
    let s = Server::start(
        &["--auth-token", "right-token-1", "--rate-limit", "1/h,3"],
        &everything(),
    );
    let guesser = Client::bearer(&s, "wrong-guess");
    let statuses: Vec<u16> = (0..4).map(|i| guesser.echo(i).status).collect();
    assert_eq!(
        statuses,
        [401, 401, 401, 429],
        "three guesses, then refused"
    );
    let mut good = Client::bearer(&s, "right-token-1");
    assert_eq!(
        good.open().status,
        200,
        "the right token has its own bucket"
    );
}
