//! Issue 14's findings, each as what a client sees over a real loopback socket: resets,
//! HTTP versions and framing we do not serve, ids MCP does not allow, a child that dies
//! (or looks dead) under a request, and a reading client whose stream must not be cut.
//!
//! Every response here is read with an overall deadline, so a server that stays silent
//! fails the test at its bound instead of hanging it.
//!
//! Rules: RB-1, RB-3, RB-6, RB-7, RB-8 (README, "Rules of our own").

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

// ---- a raw HTTP/1.1 client with deadlines -------------------------------------------

/// A parsed response (the body decoded when it is whole; empty after `head`).
#[derive(Debug, Default)]
struct Resp {
    status: u16,
    head: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn chunked(&self) -> bool {
        self.header("Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
    /// The JSON-RPC messages of the body: an SSE stream's `message` events, or JSON.
    fn messages(&self) -> Vec<Value> {
        let ct = self.header("Content-Type").unwrap_or("");
        if ct.starts_with("text/event-stream") {
            parse_events(&self.text())
                .into_iter()
                .filter(|e| e.event.as_deref().unwrap_or("message") == "message")
                .filter_map(|e| serde_json::from_str(&e.data).ok())
                .collect()
        } else {
            match serde_json::from_slice::<Value>(&self.body) {
                Ok(Value::Array(v)) => v,
                Ok(v) => vec![v],
                Err(_) => vec![],
            }
        }
    }
    /// `error.code` of a JSON error body.
    fn error_code(&self) -> Option<i64> {
        serde_json::from_slice::<Value>(&self.body)
            .ok()?
            .pointer("/error/code")?
            .as_i64()
    }
    fn summary(&self) -> String {
        format!("{}\n\n{}", self.head, self.text())
    }
}

fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(600)]).into_owned();
    if b.len() > 600 {
        format!("{s}... ({} bytes)", b.len())
    } else {
        s
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A response head at the start of `buf`: the response and the head's length.
fn parse_head(buf: &[u8]) -> Option<(Resp, usize)> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((
        Resp {
            status,
            head,
            headers,
            body: Vec::new(),
        },
        end + 4,
    ))
}

/// One chunk at the start of `buf`: Some((data, used)); data empty at the last chunk
/// (whose trailer section must be whole too). None while incomplete.
fn parse_chunk(buf: &[u8]) -> Option<Result<(Vec<u8>, usize), String>> {
    let nl = find(buf, b"\r\n")?;
    let line = String::from_utf8_lossy(&buf[..nl]);
    let size_text = line.split(';').next().unwrap_or("").trim();
    let Ok(n) = usize::from_str_radix(size_text, 16) else {
        return Some(Err(format!("bad chunk size line {line:?}")));
    };
    let start = nl + 2;
    if n == 0 {
        let end = find(&buf[start - 2..], b"\r\n\r\n")?;
        return Some(Ok((Vec::new(), start - 2 + end + 4)));
    }
    if buf.len() < start + n + 2 {
        return None;
    }
    Some(Ok((buf[start..start + n].to_vec(), start + n + 2)))
}

/// A whole response at the start of `buf`, given whether the peer has closed.
fn parse_response(buf: &[u8], closed: bool) -> Option<Result<(Resp, usize), String>> {
    let (mut resp, mut used) = parse_head(buf)?;
    if (100..200).contains(&resp.status) || resp.status == 204 || resp.status == 304 {
        return Some(Ok((resp, used)));
    }
    if resp.chunked() {
        loop {
            match parse_chunk(&buf[used..])? {
                Err(e) => return Some(Err(e)),
                Ok((data, n)) => {
                    used += n;
                    if data.is_empty() {
                        return Some(Ok((resp, used)));
                    }
                    resp.body.extend(data);
                }
            }
        }
    }
    if let Some(n) = resp.header("Content-Length") {
        let Ok(n) = n.parse::<usize>() else {
            return Some(Err(format!("bad Content-Length in {:?}", resp.head)));
        };
        if buf.len() < used + n {
            return None;
        }
        resp.body = buf[used..used + n].to_vec();
        return Some(Ok((resp, used + n)));
    }
    // Delimited by the close.
    if !closed {
        return None;
    }
    resp.body = buf[used..].to_vec();
    Some(Ok((resp, buf.len())))
}

/// A client socket whose every wait has an overall deadline.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// How the server ended the connection: "EOF" or "reset".
    end: Option<String>,
}

impl Raw {
    fn open(s: &Server) -> Raw {
        let s = TcpStream::connect(s.addr()).expect("connect");
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            buf: Vec::new(),
            end: None,
        }
    }

    /// A connection whose receive buffer is set small before the connect, so the
    /// server's writes wait on this client's reading from the start.
    fn open_small_window(s: &Server) -> Raw {
        use std::os::fd::FromRawFd;
        let rcvbuf: libc::c_int = 4096;
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: s.port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let s = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let s = TcpStream::from_raw_fd(fd); // owns fd from here on
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&rcvbuf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
            let rc = libc::connect(
                fd,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
            s
        };
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            buf: Vec::new(),
            end: None,
        }
    }

    /// Writes everything; false when the server has already closed (its answer may
    /// still be waiting to be read).
    fn write(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).is_ok()
    }

    /// One read, waiting at most until `until`.
    fn fill(&mut self, until: Instant) -> Result<(), String> {
        if let Some(end) = &self.end {
            return Err(format!("connection closed ({end})"));
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("deadline passed".into());
        }
        self.s
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut chunk = [0u8; 65536];
        match self.s.read(&mut chunk) {
            Ok(0) => self.end = Some("EOF".into()),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err("deadline passed".into())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => self.end = Some("reset".into()),
            Err(e) => self.end = Some(e.to_string()),
        }
        Ok(())
    }

    /// The next whole response, within `bound`.
    fn response(&mut self, bound: Duration) -> Result<Resp, String> {
        let until = Instant::now() + bound;
        loop {
            match parse_response(&self.buf, self.end.is_some()) {
                Some(Ok((resp, used))) => {
                    self.buf.drain(..used);
                    return Ok(resp);
                }
                Some(Err(e)) => return Err(format!("{e}; got {:?}", lossy(&self.buf))),
                None => {}
            }
            if let Some(end) = &self.end {
                return Err(format!(
                    "connection closed ({end}) before a whole response; got {:?}",
                    lossy(&self.buf)
                ));
            }
            self.fill(until).map_err(|e| {
                format!(
                    "no whole response within {bound:?} ({e}); got {:?}",
                    lossy(&self.buf)
                )
            })?;
        }
    }

    /// The next response head (its body left unread), within `bound`.
    fn head(&mut self, bound: Duration) -> Result<Resp, String> {
        let until = Instant::now() + bound;
        loop {
            if let Some((resp, used)) = parse_head(&self.buf) {
                self.buf.drain(..used);
                return Ok(resp);
            }
            if let Some(end) = &self.end {
                return Err(format!(
                    "connection closed ({end}) before a response head; got {:?}",
                    lossy(&self.buf)
                ));
            }
            self.fill(until).map_err(|e| {
                format!(
                    "no response head within {bound:?} ({e}); got {:?}",
                    lossy(&self.buf)
                )
            })?;
        }
    }

    /// The next chunk of a chunked body (None at its end), by `until`.
    fn chunk(&mut self, until: Instant) -> Result<Option<Vec<u8>>, String> {
        loop {
            match parse_chunk(&self.buf) {
                Some(Ok((data, used))) => {
                    self.buf.drain(..used);
                    return Ok((!data.is_empty()).then_some(data));
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
            if let Some(end) = &self.end {
                return Err(format!("stream cut ({end}) in the middle of the body"));
            }
            self.fill(until)?;
        }
    }

    /// Nothing more comes, and the server closes the connection within `bound`.
    fn expect_close(&mut self, bound: Duration) -> Result<(), String> {
        let until = Instant::now() + bound;
        while self.end.is_none() {
            if let Err(e) = self.fill(until) {
                return Err(if self.buf.is_empty() {
                    format!("the connection was still open {bound:?} after the response ({e})")
                } else {
                    format!(
                        "more after the response, and no close ({e}): {:?}",
                        lossy(&self.buf)
                    )
                });
            }
        }
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "more after the response before the close: {:?}",
                lossy(&self.buf)
            ))
        }
    }

    /// Exactly one response with `status`, then the close, all within `bound`.
    fn one_then_close(&mut self, status: u16, bound: Duration) -> Result<Resp, String> {
        let until = Instant::now() + bound;
        let r = self.response(bound)?;
        if r.status != status {
            let _ = self.expect_close(until.saturating_duration_since(Instant::now()));
            return Err(format!(
                "status {} (want {status}), then {:?}: {}",
                r.status,
                lossy(&self.buf),
                r.summary()
            ));
        }
        self.expect_close(until.saturating_duration_since(Instant::now()))
            .map_err(|e| format!("{status} came, but then: {e}"))?;
        Ok(r)
    }
}

/// Closes with SO_LINGER 0: the kernel sends a TCP RST instead of a FIN.
fn reset_close(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
}

fn healthz(s: &Server) -> Result<Resp, String> {
    let mut c = Raw::open(s);
    c.write(HEALTHZ);
    c.response(Duration::from_secs(5))
}

/// The server's descriptor count once it has settled after startup and a few requests:
/// what every storm must come back to.
fn settled_fds(s: &Server) -> usize {
    let pid = s.pid();
    let fds0 = open_fds(pid);
    for _ in 0..3 {
        assert_eq!(healthz(s).map(|r| r.status), Ok(200));
    }
    eventually("descriptors settle after three plain requests", || {
        open_fds(pid) <= fds0
    });
    fds0
}

fn assert_no_failures(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} failure(s):\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}

/// A POST /mcp head for a raw request (Content-Length added by the caller).
fn mcp_head() -> String {
    "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n".to_string()
}

// ---- 1. resets -----------------------------------------------------------------------

/// Issue 14 finding 1: 3,000 clients each send a whole request and at once reset the
/// connection (SO_LINGER 0). The server stays up, keeps answering, and gives back every
/// descriptor those connections took; and nothing panics (the release build aborts on a
/// panic, which is how a reset once ended the whole server: tiny_http unwrapped
/// `peer_addr()` of a connection already reset).
#[test]
fn a_reset_storm_leaves_the_server_serving_with_its_descriptors_back() {
    let s = Server::start(&[], &everything());
    let pid = s.pid();
    let fds0 = settled_fds(&s);
    let addr = s.addr();
    let started = Instant::now();
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut failed = 0;
                for _ in 0..300 {
                    let Ok(mut c) = TcpStream::connect(&addr) else {
                        failed += 1;
                        continue;
                    };
                    let _ = c.write_all(HEALTHZ);
                    reset_close(c);
                }
                failed
            })
        })
        .collect();
    let refused: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let took = started.elapsed();
    assert!(
        alive(pid),
        "the server died during the reset storm ({refused} connects failed, {took:?}); log:\n{}",
        s.log_text()
    );
    let r = healthz(&s);
    assert_eq!(
        r.as_ref().map(|r| r.status),
        Ok(200),
        "healthz after the storm: {r:?}"
    );
    // The shipped binary is built with panic = "abort": a panic anywhere ends the server
    // (and its children). This test runs the dev build, where it ends only a thread, so
    // the log is where it shows.
    let log = s.log_text();
    assert!(
        !log.contains("panicked"),
        "the server panicked during the reset storm ({} panics); the release build would have aborted. First:\n{}",
        log.matches("panicked").count(),
        log.lines()
            .skip_while(|l| !l.contains("panicked"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        alive(pid),
        "the server died after the reset storm; log:\n{}",
        s.log_text()
    );
    eventually_says(
        || {
            format!(
                "descriptors did not come back: {} open, {fds0} before the storm",
                open_fds(pid)
            )
        },
        || open_fds(pid) <= fds0,
    );
    assert!(alive(pid));
}

// ---- 2. HTTP versions ----------------------------------------------------------------

/// Issue 14 finding 2; RFC 9110 §15.6.6, RFC 9112 §2.6: a request in an HTTP version we
/// do not serve (HTTP/2.0, HTTP/3.0, the HTTP/2 connection preface) gets one 505 with a
/// JSON-RPC error body and the connection is closed by the server, at once. 60 such
/// clients that never close their side do not use up `--max-connections 30`, and the
/// server's descriptors come back.
#[test]
fn unsupported_http_versions_get_505_and_a_close() {
    let s = Server::start(
        &["--max-connections", "30", "--read-timeout", "30s"],
        &everything(),
    );
    let pid = s.pid();
    let fds0 = settled_fds(&s);
    let variants: [(&str, &[u8]); 3] = [
        ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n"),
        ("HTTP/3.0", b"GET / HTTP/3.0\r\nHost: 127.0.0.1\r\n\r\n"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ];
    let mut held = Vec::new();
    let mut failures = Vec::new();
    for i in 0..60 {
        let (name, bytes) = variants[i % 3];
        let mut c = Raw::open(&s);
        c.write(bytes);
        let got = c.one_then_close(505, Duration::from_secs(5)).and_then(|r| {
            let ct = r.header("Content-Type").unwrap_or("");
            if !ct.starts_with("application/json") || r.error_code().is_none() {
                return Err(format!("not a JSON-RPC error body: {}", r.summary()));
            }
            Ok(())
        });
        if let Err(e) = got {
            failures.push(format!("connection {i} ({name}): {e}"));
            if failures.len() >= 3 {
                break;
            }
        }
        held.push(c); // kept open on our side: the server must close it
    }
    assert_no_failures("unsupported versions", &failures);
    let r = healthz(&s);
    assert_eq!(
        r.as_ref().map(|r| r.status),
        Ok(200),
        "healthz after 60 refused versions: {r:?}"
    );
    eventually_says(
        || {
            format!(
                "descriptors did not come back: {} open, {fds0} before",
                open_fds(pid)
            )
        },
        || open_fds(pid) <= fds0,
    );
    drop(held);
}

// ---- 3. request smuggling ------------------------------------------------------------

/// Issue 14 finding 3; RFC 9112 §6.1, §6.3: a request whose body length is ambiguous or
/// invalid (Transfer-Encoding with Content-Length, a signed or listed Content-Length,
/// two different Content-Lengths) gets one 400 and a close, so a request pipelined behind
/// it is never answered; a transfer coding we do not implement gets 501 and a close.
/// Two identical Content-Length headers are fine (§6.3 item 5 allows treating them as one,
/// and tiny_http reads the first).
#[test]
fn ambiguous_body_lengths_are_refused_and_the_connection_closed() {
    let s = Server::start(&["--read-timeout", "30s"], &everything());
    let body = init_body("2025-11-25");
    let n = body.len();
    let chunked_body = format!("{n:x}\r\n{body}\r\n0\r\n\r\n");
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "Transfer-Encoding and Content-Length",
            format!(
                "{}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n{chunked_body}",
                mcp_head()
            ),
            400,
        ),
        (
            "Content-Length: -1",
            format!("{}Content-Length: -1\r\n\r\n{body}", mcp_head()),
            400,
        ),
        (
            "Content-Length: +N",
            format!("{}Content-Length: +{n}\r\n\r\n{body}", mcp_head()),
            400,
        ),
        (
            "two different Content-Lengths",
            format!(
                "{}Content-Length: {n}\r\nContent-Length: {}\r\n\r\n{body}",
                mcp_head(),
                n + 1
            ),
            400,
        ),
        // A list of equal values: RFC 9112 would allow it, but tiny_http reads it as no
        // length and would serve the body as the next request.
        (
            "Content-Length: N, N",
            format!("{}Content-Length: {n}, {n}\r\n\r\n{body}", mcp_head()),
            400,
        ),
        (
            "Content-Length: N, N+1",
            format!("{}Content-Length: {n}, {}\r\n\r\n{body}", mcp_head(), n + 1),
            400,
        ),
        // RFC 9112 §6.3 item 4: chunked is not the final coding, the length cannot be
        // known: 400. §6.1: a coding we do not implement before chunked: 501.
        (
            "Transfer-Encoding: gzip",
            format!("{}Transfer-Encoding: gzip\r\n\r\n{body}", mcp_head()),
            400,
        ),
        (
            "Transfer-Encoding: gzip, chunked",
            format!(
                "{}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                mcp_head()
            ),
            501,
        ),
    ];
    let workers: Vec<_> = cases
        .into_iter()
        .map(|(name, req, status)| {
            let mut c = Raw::open(&s);
            std::thread::spawn(move || {
                let mut bytes = req.into_bytes();
                bytes.extend_from_slice(HEALTHZ);
                c.write(&bytes);
                c.one_then_close(status, Duration::from_secs(5))
                    .err()
                    .map(|e| format!("{name}: {e}"))
            })
        })
        .collect();
    let mut failures: Vec<String> = workers
        .into_iter()
        .filter_map(|w| w.join().unwrap())
        .collect();

    // Two identical Content-Length headers: served, and so is the request behind it.
    let mut c = Raw::open(&s);
    let mut bytes = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_vec();
    bytes.extend_from_slice(HEALTHZ);
    c.write(&bytes);
    for which in [
        "the request with two identical Content-Lengths",
        "the request pipelined behind it",
    ] {
        match c.response(Duration::from_secs(5)) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => failures.push(format!("{which}: {}", r.summary())),
            Err(e) => failures.push(format!("{which}: {e}")),
        }
    }
    let mut c = Raw::open(&s);
    c.write(
        format!(
            "{}Content-Length: {n}\r\nContent-Length: {n}\r\n\r\n{body}",
            mcp_head()
        )
        .as_bytes(),
    );
    match c.response(Duration::from_secs(5)) {
        Ok(r)
            if r.status == 200
                && r.messages()
                    .iter()
                    .any(|m| m["result"]["protocolVersion"].is_string()) => {}
        Ok(r) => failures.push(format!(
            "initialize with two identical Content-Lengths: {}",
            r.summary()
        )),
        Err(e) => failures.push(format!(
            "initialize with two identical Content-Lengths: {e}"
        )),
    }
    assert_no_failures("body framing", &failures);
}

/// Found by the panic audit of issue 14: a head the front door framed one way and
/// tiny_http another let a smuggled request past every check of the door, and its
/// `Content-Length: 2^60` aborted the process when tiny_http allocated a buffer of that
/// size to drain it. Both ways in (a listed Content-Length, a second Connection header
/// saying upgrade) now end in a refusal, the smuggled head is never served, and the
/// server goes on.
#[test]
fn heads_framed_two_ways_cannot_smuggle_a_request_past_the_door() {
    let s = Server::start(&[], &everything());
    let smuggled =
        "GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1152921504606846976\r\n\r\n";
    let n = smuggled.len();
    let cases = [
        (
            "a listed Content-Length",
            format!("POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {n}, {n}\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "a second Connection header saying upgrade",
            format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\nConnection: upgrade\r\n\r\n{smuggled}"),
            200,
        ),
    ];
    let mut failures = Vec::new();
    for (name, req, first) in cases {
        let mut c = Raw::open(&s);
        c.write(req.as_bytes());
        match c.response(Duration::from_secs(5)) {
            Ok(r) if r.status == first => {}
            Ok(r) => failures.push(format!("{name}: first answer {}", r.summary())),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
        if first == 200 {
            // The next head is the door's to check: its length is refused.
            match c.response(Duration::from_secs(5)) {
                Ok(r) if r.status == 413 => {}
                Ok(r) => failures.push(format!("{name}: second answer {}", r.summary())),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        if let Err(e) = healthz(&s) {
            failures.push(format!("after {name}: the server does not answer: {e}"));
        }
    }
    assert_no_failures("smuggling past the door", &failures);
    assert!(
        !s.log_text().contains("GET /nowhere"),
        "the smuggled request was served"
    );
}

// ---- 4. bare LF in a chunked body ----------------------------------------------------

/// Issue 14 finding 4; RFC 9112 §7.1: chunk lines end in CRLF. A chunked body framed with
/// bare LFs gets one 400 and a close at once, not a wait for the read deadline.
#[test]
fn a_chunked_body_with_bare_lf_lines_gets_400_at_once() {
    let s = Server::start(&["--read-timeout", "3s"], &everything());
    let mut c = Raw::open(&s);
    let req = format!(
        "{}Transfer-Encoding: chunked\r\n\r\n2\n{{}}\n0\n\n",
        mcp_head()
    );
    c.write(req.as_bytes());
    let started = Instant::now();
    if let Err(e) = c.one_then_close(400, Duration::from_secs(6)) {
        panic!("bare-LF chunked body, after {:?}: {e}", started.elapsed());
    }
}

// ---- 5. ids MCP does not allow -------------------------------------------------------

fn raw_session_post(s: &Server, sess: &Session, body: &str) -> Raw {
    let mut c = Raw::open(s);
    let mut head = String::from("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in sess.headers() {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    c.write(head.as_bytes());
    c
}

fn echo_with_id(id: &str, message: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo","arguments":{{"message":"{message}"}}}}}}"#
    )
}

/// MCP ids are strings or integers. A fractional, exponent or out-of-range numeric id
/// is refused with 400 and -32600 at once; the largest integer the id's carrier gives
/// back exactly and a string id are served under exactly that id. In session mode the
/// child itself gives ids back: ±(2^53−1), what every JSON implementation (JavaScript's
/// among them) round-trips. In shared mode the bridge rewrites ids and keeps the
/// client's: any 64-bit integer.
fn ids_mcp_does_not_allow_are_refused(s: &Server, shared: bool) {
    let sess = Session::open(s);
    let mut bad = vec![
        "1277055878575869647274924e-11",
        "1.5",
        "1e3",
        "18446744073709551616",
    ];
    let mut good = vec![
        ("9007199254740991", json!(9_007_199_254_740_991i64)),
        ("\"req-α\"", json!("req-α")),
    ];
    if shared {
        good.push(("9007199254740993", json!(9_007_199_254_740_993u64)));
        good.push(("-9007199254740993", json!(-9_007_199_254_740_993i64)));
    } else {
        bad.extend(["9007199254740993", "-9007199254740993"]);
    }
    let mut workers = Vec::new();
    for id in bad {
        let mut c = raw_session_post(s, &sess, &echo_with_id(id, "x"));
        workers.push(std::thread::spawn(move || {
            match c.response(Duration::from_secs(5)) {
                Ok(r) if r.status == 400 && r.error_code() == Some(-32600) => None,
                Ok(r) => Some(format!("id {id}: want 400 with -32600: {}", r.summary())),
                Err(e) => Some(format!("id {id}: {e}")),
            }
        }));
    }
    for (id, want) in good {
        let msg = format!("hello {}", id.len());
        let mut c = raw_session_post(s, &sess, &echo_with_id(id, &msg));
        workers.push(std::thread::spawn(move || {
            match c.response(Duration::from_secs(10)) {
                Ok(r) if r.status == 200 => {
                    let msgs = r.messages();
                    let ok = msgs.iter().any(|m| {
                        m["id"] == want && m.pointer("/result/content/0/text") == Some(&json!(msg))
                    });
                    (!ok).then(|| format!("id {id}: no echo under that id: {}", r.summary()))
                }
                Ok(r) => Some(format!("id {id}: {}", r.summary())),
                Err(e) => Some(format!("id {id}: {e}")),
            }
        }));
    }
    let failures: Vec<String> = workers
        .into_iter()
        .filter_map(|w| w.join().unwrap())
        .collect();
    assert_no_failures("ids", &failures);
}

/// Issue 14 finding 5 (session mode); MCP basic/messages "Requests": the id MUST be a
/// string or integer; JSON-RPC 2.0 §4.
#[test]
fn session_mode_refuses_ids_mcp_does_not_allow() {
    let s = Server::start(&[], &everything());
    ids_mcp_does_not_allow_are_refused(&s, false);
}

/// Issue 14 finding 5 (shared mode, where ids are rewritten and mapped back).
#[test]
fn shared_mode_refuses_ids_mcp_does_not_allow() {
    let s = Server::start(&["--mode", "shared"], &everything());
    s.wait_log("shared child 0 started");
    ids_mcp_does_not_allow_are_refused(&s, true);
}

// ---- 6. RFC 9112 request rules -------------------------------------------------------

/// Issue 14 finding 6; RFC 9112 §3.2: an HTTP/1.1 request without Host, or with two,
/// gets 400 and a close; the absolute form (§3.2.2) is served; an HTTP/1.0 request
/// needs no Host.
#[test]
fn host_rules_of_rfc_9112() {
    let s = Server::start(&["--read-timeout", "30s"], &everything());
    let one = |req: String, status: u16, close: bool| -> Result<Resp, String> {
        let mut c = Raw::open(&s);
        c.write(req.as_bytes());
        if close {
            c.one_then_close(status, Duration::from_secs(5))
        } else {
            let r = c.response(Duration::from_secs(5))?;
            if r.status == status {
                Ok(r)
            } else {
                Err(format!(
                    "status {} (want {status}): {}",
                    r.status,
                    r.summary()
                ))
            }
        }
    };
    let mut failures = Vec::new();
    let mut check = |name: &str, got: Result<Resp, String>, body: Option<&str>| match got {
        Ok(r) if body.map_or(true, |b| r.text().contains(b)) => {}
        Ok(r) => failures.push(format!("{name}: unexpected body: {}", r.summary())),
        Err(e) => failures.push(format!("{name}: {e}")),
    };
    check(
        "HTTP/1.1 without Host",
        one("GET /healthz HTTP/1.1\r\n\r\n".into(), 400, true),
        None,
    );
    check(
        "two Host headers",
        one(
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n".into(),
            400,
            true,
        ),
        None,
    );
    check(
        "absolute-form target",
        one(
            format!(
                "GET http://127.0.0.1:{}/healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
                s.port, s.port
            ),
            200,
            false,
        ),
        Some("\"ok\""),
    );
    check(
        "HTTP/1.0 without Host",
        one("GET /healthz HTTP/1.0\r\n\r\n".into(), 200, false),
        Some("\"ok\""),
    );
    assert_no_failures("Host rules", &failures);
}

/// Issue 14 finding 6; RFC 9110 §10.1.1: a server MUST NOT send a 100 (Continue)
/// response to an HTTP/1.0 client; the first bytes it gets are the final status line.
#[test]
fn http_1_0_expect_continue_gets_no_interim_response() {
    let s = Server::start(&[], &everything());
    let body = init_body("2025-11-25");
    let mut c = Raw::open(&s);
    c.write(
        format!(
            "POST /mcp HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let r = c.head(Duration::from_secs(10)).unwrap();
    assert!(
        !(100..200).contains(&r.status),
        "an interim response to an HTTP/1.0 client: {:?}",
        r.head
    );
    assert_eq!(r.status, 200, "{}", r.head);
}

/// Issue 14 finding 6; RFC 9112 §7.1, RFC 9110 §15.5.14: a chunked body is held to
/// --max-body however it is split (one 413, then a close; not a 413 and a stray 400), a
/// chunk extension is bounded (one 400 and a close, not a silent close), and an absurd
/// chunk size is refused at once with 413 rather than waited on until --read-timeout.
#[test]
fn chunked_bodies_are_bounded_with_one_clear_answer() {
    let s = Server::start(
        &["--max-body", "1KiB", "--read-timeout", "30s"],
        &everything(),
    );
    let chunked_head = format!("{}Transfer-Encoding: chunked\r\n\r\n", mcp_head());
    let cases: Vec<(&str, Vec<Vec<u8>>, u16)> = vec![
        (
            "two 800-byte chunks over --max-body 1KiB",
            vec![
                format!(
                    "{chunked_head}320\r\n{}\r\n320\r\n{}\r\n",
                    " ".repeat(800),
                    " ".repeat(800)
                )
                .into_bytes(),
                b"0\r\n\r\n".to_vec(),
            ],
            413,
        ),
        (
            "a 100 KB chunk extension",
            vec![format!("{chunked_head}5;{}\r\n", "a".repeat(100_000)).into_bytes()],
            400,
        ),
        (
            "chunk size ffffffffffffffff",
            vec![format!("{chunked_head}ffffffffffffffff\r\n").into_bytes()],
            413,
        ),
    ];
    let workers: Vec<_> = cases
        .into_iter()
        .map(|(name, writes, status)| {
            let mut c = Raw::open(&s);
            std::thread::spawn(move || {
                let started = Instant::now();
                for w in writes {
                    c.write(&w);
                }
                c.one_then_close(status, Duration::from_secs(5))
                    .err()
                    .map(|e| format!("{name} (after {:?}): {e}", started.elapsed()))
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .filter_map(|w| w.join().unwrap())
        .collect();
    assert_no_failures("chunked bodies", &failures);
}

// ---- 7. shared mode: a child that dies under a request -------------------------------

fn linger_child(extra: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), fixture("linger_child.py")];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// True when `r` carries an answer for `id` (a result or a JSON-RPC error), or is an HTTP
/// error whose body is a JSON-RPC error.
fn answers(r: &Resp, id: &Value) -> bool {
    r.messages().iter().any(|m| {
        (m["id"] == *id || m["id"].is_null())
            && (m.get("result").is_some() || m.get("error").is_some())
    })
}

/// Issue 14 finding 7: in shared mode a child that closed its stdout but has not exited
/// yet is dead to every request sent to it. A session opened meanwhile gets its
/// initialize and its next call answered (by a restarted child, or with a JSON-RPC
/// error) in bounded time, instead of a stream of keepalives for ever.
#[test]
fn shared_child_with_closed_stdout_does_not_swallow_requests() {
    let s = Server::start(
        &["--mode", "shared", "--keepalive", "1s"],
        &linger_child(&[]),
    );
    s.wait_log("shared child 0 started");
    let a = Session::open(&s);
    let kids = children_of(s.pid());
    assert_eq!(kids.len(), 1, "one shared child: {kids:?}");
    let child = kids[0];
    let r = a.call(1, "close_stdout", json!({}));
    assert_eq!(result_text(&r.messages()[0]), "closing stdout");
    assert!(alive(child), "the child lingers with its stdout closed");

    // Session B, opened while the child still lingers.
    let mut c = Raw::open(&s);
    let init = init_body("2025-11-25");
    c.write(format!("{}Content-Length: {}\r\n\r\n{init}", mcp_head(), init.len()).as_bytes());
    let started = Instant::now();
    let r = c
        .response(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("B's initialize: {e}"));
    assert!(answers(&r, &json!(0)), "B's initialize: {}", r.summary());
    let Some(id) = r.header("Mcp-Session-Id").map(str::to_string) else {
        // Refused with a JSON-RPC error (no session): answered, which is what we require.
        eprintln!("B's initialize answered with an error: {}", r.summary());
        return;
    };
    let b = Session {
        id,
        addr: s.addr(),
        init: Value::Null,
        path: "/mcp".into(),
    };
    let n = b.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    assert_eq!(n.status, 202, "{}", n.text());
    let mut c = raw_session_post(&s, &b, &echo_with_id("2", "to b"));
    let r = c.response(Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!(
            "B's echo (sent {:?} after B's initialize; old child alive: {}): {e}",
            started.elapsed(),
            alive(child)
        )
    });
    assert!(answers(&r, &json!(2)), "B's echo: {}", r.summary());
}

fn temp_marker(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "stdio-sse-hardening-{name}-{}-{nanos}",
        std::process::id()
    ))
}

/// Sends an initialize on a new connection; the answer (or why none came) within 10 s.
fn initialize_in_thread(s: &Server, what: String) -> std::thread::JoinHandle<Option<String>> {
    let mut c = Raw::open(s);
    std::thread::spawn(move || {
        let init = init_body("2025-11-25");
        c.write(format!("{}Content-Length: {}\r\n\r\n{init}", mcp_head(), init.len()).as_bytes());
        match c.response(Duration::from_secs(10)) {
            Ok(r) if answers(&r, &json!(0)) => None,
            Ok(r) => Some(format!("{what}: no answer in {}", r.summary())),
            Err(e) => Some(format!("{what}: {e}")),
        }
    })
}

fn join_all(workers: Vec<std::thread::JoinHandle<Option<String>>>) -> Vec<String> {
    workers
        .into_iter()
        .filter_map(|w| w.join().unwrap())
        .collect()
}

/// Issue 14 finding 7: a shared child that exits during its first initialize, with
/// initializes waiting on it. Three sent at once each get an answer (from a restarted
/// child, or a JSON-RPC error) within 10 s; and so do two that arrive after the dying
/// child has closed its stdout but before it has exited (the child is then dead to the
/// bridge's reader but still counted as running).
#[test]
fn shared_child_dying_on_initialize_answers_every_waiting_initialize() {
    // All three at once; the child exits at once.
    let marker = temp_marker("die-now");
    let _ = std::fs::remove_file(&marker);
    let s = Server::start(
        &["--mode", "shared", "--keepalive", "1s"],
        &linger_child(&["--die-on-first-initialize", &marker.to_string_lossy()]),
    );
    s.wait_log("shared child 0 started");
    let workers = (0..3)
        .map(|i| initialize_in_thread(&s, format!("concurrent initialize {i}")))
        .collect();
    let mut failures = join_all(workers);
    let _ = std::fs::remove_file(&marker);
    drop(s);

    // One initialize; the child closes stdout on it and exits 2 s later; two more
    // initializes arrive in between.
    let marker = temp_marker("die-late");
    let _ = std::fs::remove_file(&marker);
    let s = Server::start(
        &["--mode", "shared", "--keepalive", "1s"],
        &linger_child(&["--die-on-first-initialize", &marker.to_string_lossy(), "2"]),
    );
    s.wait_log("shared child 0 started");
    let kids = children_of(s.pid());
    assert_eq!(kids.len(), 1, "one shared child: {kids:?}");
    let child = kids[0];
    let mut workers = vec![initialize_in_thread(&s, "the first initialize".into())];
    eventually(
        "the child closes its stdout on its first initialize",
        || marker.exists() && !std::path::Path::new(&format!("/proc/{child}/fd/1")).exists(),
    );
    assert!(alive(child), "the dying child lingers for 2 s");
    workers.extend((0..2).map(|i| initialize_in_thread(&s, format!("late initialize {i}"))));
    failures.extend(join_all(workers));
    let _ = std::fs::remove_file(&marker);
    assert_no_failures("initializes on a dying child", &failures);
}

// ---- 8. a reading client is never cut --------------------------------------------------

const FLOOD: u64 = 50_000;

/// Reads `event`s from a chunked SSE body until the answer to `id`; checks the flood's
/// notifications arrive whole and in order.
fn read_flood(c: &mut Raw, id: &Value, until: Instant) -> Result<(), String> {
    let mut pending = String::new();
    let mut next_i = 0u64;
    loop {
        let whole = pending.rfind("\n\n").map_or(0, |at| at + 2);
        for ev in parse_events(&pending[..whole]) {
            if ev.event.as_deref().unwrap_or("message") != "message" || ev.data.is_empty() {
                continue;
            }
            let m: Value = serde_json::from_str(&ev.data)
                .map_err(|e| format!("bad event data ({e}): {:?}", ev.data))?;
            if m["method"] == "notifications/message" {
                let i = m.pointer("/params/data/i").and_then(Value::as_u64);
                if i != Some(next_i) {
                    return Err(format!("notification {i:?} where {next_i} was due"));
                }
                next_i += 1;
            } else if m["id"] == *id {
                if next_i != FLOOD {
                    return Err(format!(
                        "the answer came after {next_i} of {FLOOD} notifications: {m}"
                    ));
                }
                return match m.pointer("/result/content/0/text") {
                    Some(t) if t == "flooded" => Ok(()),
                    _ => Err(format!("not the flood's result: {m}")),
                };
            }
        }
        pending.drain(..whole);
        match c.chunk(until) {
            Ok(Some(data)) => pending.push_str(&String::from_utf8_lossy(&data)),
            Ok(None) => {
                return Err(format!(
                    "the stream ended after {next_i} of {FLOOD} notifications, with no answer"
                ))
            }
            Err(e) => return Err(format!("after {next_i} of {FLOOD} notifications: {e}")),
        }
    }
}

/// Issue 14 finding 8; P-rule "a client that reads is never cut": a POST stream carrying
/// 50,000 notifications to a client reading as fast as it can delivers every one, in
/// order, and then the result.
#[test]
fn a_reading_client_gets_a_whole_flood_on_a_post_stream() {
    let s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    let call = tool_call(7, "flood", json!({"count": FLOOD, "size": 100})).to_string();
    let mut c = Raw::open_small_window(&s);
    let mut head = String::from("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in sess.headers() {
        if k != "Accept" {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str(&format!(
        "Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{call}",
        call.len()
    ));
    c.write(head.as_bytes());
    let until = Instant::now() + Duration::from_secs(30);
    let r = c.head(Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.chunked(), "{}", r.head);
    if let Err(e) = read_flood(&mut c, &json!(7), until) {
        panic!("{e}");
    }
}

/// Issue 14 finding 8, over legacy HTTP+SSE: the session's one stream carries the whole
/// flood and the answer to a client that reads it.
#[test]
fn a_reading_client_gets_a_whole_flood_on_a_legacy_stream() {
    let s = Server::start(&[], &everything());
    let until = Instant::now() + Duration::from_secs(30);
    let mut c = Raw::open_small_window(&s);
    c.write(b"GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n");
    let r = c.head(Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.chunked(), "{}", r.head);
    // The endpoint event.
    let mut pending = String::new();
    let endpoint = loop {
        if let Some(ev) = pending
            .find("\n\n")
            .and_then(|at| parse_events(&pending[..at + 2]).into_iter().next())
        {
            assert_eq!(ev.event.as_deref(), Some("endpoint"), "{ev:?}");
            break ev.data;
        }
        let data = c.chunk(until).unwrap().expect("the endpoint event");
        pending.push_str(&String::from_utf8_lossy(&data));
    };
    let post = |body: &str| {
        let r = Conn::open(&s).request("POST", &endpoint, &[JSON_CT], body.as_bytes());
        assert_eq!(r.status, 202, "{}", r.text());
    };
    post(&init_body("2024-11-05"));
    post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string());
    post(&tool_call(7, "flood", json!({"count": FLOOD, "size": 100})).to_string());
    // The initialize answer comes first, then the flood; read_flood skips the former.
    if let Err(e) = read_flood(&mut c, &json!(7), until) {
        panic!("{e}");
    }
}

/// Found by this suite flaking under load: a bad request pipelined behind one still being
/// answered gets its refusal after that answer, on its own connection. It was lost
/// (tiny_http shuts the socket for writing as soon as its read of the next head fails,
/// before the refusal could follow the answer), and the close that followed used a
/// descriptor number tiny_http had already closed, which could name another client's
/// connection.
#[test]
fn a_bad_request_pipelined_behind_a_slow_one_is_refused_after_its_answer() {
    let s = Server::start(&["--max-body", "1KiB"], &everything());
    let sess = Session::open(&s);
    let call = tool_call(5, "sleep", json!({"seconds": 0.5})).to_string();
    let mut bytes = String::from("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in sess.headers() {
        bytes.push_str(&format!("{k}: {v}\r\n"));
    }
    bytes.push_str(&format!("Content-Length: {}\r\n\r\n{call}", call.len()));
    bytes.push_str("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n");
    let mut c = Raw::open(&s);
    assert!(c.write(bytes.as_bytes()));
    // Another client, connected meanwhile, is served before and after.
    let mut other = Raw::open(&s);
    assert!(other.write(HEALTHZ));
    assert_eq!(
        other.response(Duration::from_secs(10)).map(|r| r.status),
        Ok(200)
    );
    let first = c.response(Duration::from_secs(10)).unwrap();
    assert_eq!(first.status, 200, "{}", first.head);
    assert!(answers(&first, &json!(5)), "{}", first.text());
    let second = c.response(Duration::from_secs(10)).unwrap();
    assert_eq!(second.status, 413, "{}", second.head);
    assert!(second.text().contains("--max-body"), "{}", second.text());
    // Then the close, and nothing after it.
    let until = Instant::now() + Duration::from_secs(10);
    while c.end.is_none() {
        c.fill(until).unwrap();
    }
    assert!(c.buf.is_empty(), "after the refusal: {:?}", lossy(&c.buf));
    assert!(other.write(HEALTHZ));
    assert_eq!(
        other.response(Duration::from_secs(10)).map(|r| r.status),
        Ok(200)
    );
}

// ---- 9. metrics ------------------------------------------------------------------------

// Issue 14 finding 9 (stdio_sse_messages_dropped_total{reason="unknown_id"} must not
// count the bridge's own cached initialize answer reaching a legacy session that just
// ended) is not tested here: whether the cached answer reaches the session before or
// after it ends is a race inside the server that no client action orders
// deterministically, so a test of it could pass on the unfixed code by timing alone.
