//! A front door hostile traffic cannot exhaust: the connection cap, read deadlines,
//! header caps, and a bounded loop of hostile inputs after which the server is exactly
//! as it was.

mod common;
use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn raw(s: &Server) -> TcpStream {
    let c = TcpStream::connect(s.addr()).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c
}

/// Everything the server sends until it closes (or the deadline).
fn read_to_close(c: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Threads of `pid` with this name (/proc/PID/task/*/comm).
fn threads_named(pid: i32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == name)
                })
                .count()
        })
        .unwrap_or(0)
}

fn status_of(text: &str) -> u16 {
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Rules: RB-2.
#[test]
fn connections_beyond_the_cap_get_503_and_slots_come_back() {
    let s = Server::start(&["--max-connections", "4"], &everything());
    // Four open connections (accepted in order), then a fifth.
    let held: Vec<TcpStream> = (0..4).map(|_| raw(&s)).collect();
    let mut over = raw(&s);
    over.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .ok();
    let text = read_to_close(&mut over);
    assert_eq!(status_of(&text), 503, "{text}");
    assert!(
        text.contains("--max-connections 4") && text.contains("\"jsonrpc\":\"2.0\""),
        "{text}"
    );
    s.wait_log("--max-connections 4 reached");
    // The held ones are served normally.
    let mut first = held.into_iter().next().unwrap();
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(status_of(&read_to_close(&mut first)), 200);
    // A closed connection frees its slot. The client sees the end of the response as
    // tiny_http's writer closes; its reading thread closes the socket's other descriptor
    // a moment later, and only then is the slot free.
    drop(first);
    eventually("a closed connection's slot comes back", || {
        Conn::open(&s).request("GET", "/healthz", &[], b"").status == 200
    });
}

/// Rules: RB-1.
#[test]
fn slow_heads_and_bodies_are_cut_at_the_read_deadline() {
    let s = Server::start(&["--read-timeout", "1s"], &everything());
    // Slowloris: a byte of header every 200 ms never completes a head.
    let mut slow = raw(&s);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .unwrap();
    let started = Instant::now();
    let dripper = {
        let mut w = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..50 {
                if w.write_all(b"a").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let text = read_to_close(&mut slow);
    assert_eq!(status_of(&text), 408, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "cut late: {:?}",
        started.elapsed()
    );
    dripper.join().unwrap();
    s.wait_log("request not received within --read-timeout");

    // Half a body, then silence: 408 from the handler, which was waiting for it.
    let mut half = raw(&s);
    half.write_all(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: 4000\r\n\r\n{\"jsonrpc\":").unwrap();
    let text = read_to_close(&mut half);
    assert_eq!(status_of(&text), 408, "{text}");
    assert!(text.contains("body did not arrive"), "{text}");

    // A connection that says nothing is closed without an answer.
    let mut idle = raw(&s);
    assert_eq!(read_to_close(&mut idle), "");
    // A kept-alive connection is fine as long as each request comes in time.
    let mut c = Conn::open(&s);
    for _ in 0..3 {
        assert_eq!(c.request("GET", "/healthz", &[], b"").status, 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        metric(
            &s,
            r#"stdio_sse_requests_rejected_total{reason="read_timeout"}"#
        ) >= 2.0
    );
}

/// Rules: RB-4.
#[test]
fn long_streams_are_never_cut_by_the_read_deadline() {
    let s = Server::start(
        &["--read-timeout", "1s", "--keepalive", "300ms"],
        &everything(),
    );
    let sess = Session::open(&s);
    let mut get = sess.get_stream();
    // Well past the deadline the stream still delivers.
    std::thread::sleep(Duration::from_millis(2500));
    let r = sess.call(5, "touch_resource", json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let _ = get
        .next_event()
        .expect("stream alive after the read deadline");
}

/// The issue's list, in a bounded loop; then the server must be as it was.
/// Rules: RB-3.
#[test]
fn hostile_inputs_leave_the_server_as_it_was() {
    let s = Server::start(
        &[
            "--read-timeout",
            "1s",
            "--max-body",
            "4MiB",
            "--pass-header",
            "X-Api-Key",
        ],
        &everything(),
    );
    let pid = s.pid();
    // Warm the pools the way normal traffic does, then take the baseline.
    let warm = Session::open(&s);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let addr = s.addr();
            std::thread::spawn(move || {
                Conn::open_addr(&addr)
                    .request("GET", "/healthz", &[], b"")
                    .status
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    assert_eq!(warm.delete().status, 200);
    let kids0 = children_of(pid).len();
    // The spare HTTP workers the warm-up started leave once idle (two always stay).
    eventually("spare HTTP workers leave after the warm-up", || {
        threads_named(pid, "http") <= 2
    });
    let threads0 = threads(pid);

    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut random = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let post = |body: &[u8]| -> (u16, String) {
        let mut c = raw(&s);
        let head = format!("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n", body.len());
        c.write_all(head.as_bytes()).unwrap();
        let _ = c.write_all(body);
        let t = read_to_close_or_first_response(&mut c);
        (status_of(&t), t)
    };
    for round in 0..2 {
        // Slowloris clients and half-sent bodies, all at once, each cut at the deadline.
        let slow: Vec<_> = (0..20)
            .map(|i| {
                let mut c = raw(&s);
                let start: &[u8] = if i % 2 == 0 {
                    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
                } else {
                    b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n{\"a\":"
                };
                c.write_all(start).unwrap();
                std::thread::spawn(move || read_to_close(&mut c))
            })
            .collect();
        // Invalid UTF-8 and NUL bytes in headers.
        for bad in [&b"X-Bad: \xff\xfe\xfd"[..], b"X-Nul: a\x00b", b"X\x00Y: z"] {
            let mut c = raw(&s);
            let mut req = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_vec();
            req.extend_from_slice(bad);
            req.extend_from_slice(b"\r\n\r\n");
            c.write_all(&req).unwrap();
            let t = read_to_close(&mut c);
            assert_eq!(status_of(&t), 400, "{t}");
        }
        // Invalid UTF-8 and NUL bytes in bodies, `[]`, deep nesting, a million elements.
        assert_eq!(
            post(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\xff\xfe\"}").0,
            400
        );
        assert_eq!(post(b"{\"jsonrpc\":\"2.0\",\x00\"id\":1}").0, 400);
        let (st, t) = post(b"[]");
        assert!(st == 400 && t.contains("empty batch"), "{t}");
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        let (st, t) = post(deep.as_bytes());
        assert!(st == 400 && t.contains("-32700"), "{t}");
        let deep_obj = "{\"a\":".repeat(100_000) + "1" + &"}".repeat(100_000);
        assert_eq!(post(deep_obj.as_bytes()).0, 400);
        let million = format!("[{}0]", "0,".repeat(999_999));
        let (st, t) = post(million.as_bytes());
        assert!(st == 400 && t.contains("-32600"), "{t}");
        // A 100 MB body: declared, it is refused before a byte of it is read; chunked,
        // reading stops at the limit.
        let mut c = raw(&s);
        c.write_all(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n").unwrap();
        let _ = c.write_all(&vec![b' '; 1 << 20]);
        let t = read_to_close(&mut c);
        assert_eq!(status_of(&t), 413, "{t}");
        let mut c = raw(&s);
        c.write_all(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        let chunk = vec![b' '; 1 << 20];
        let writer = {
            let mut w = c.try_clone().unwrap();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
                    piece.extend_from_slice(&chunk);
                    piece.extend_from_slice(b"\r\n");
                    if w.write_all(&piece).is_err() {
                        return;
                    }
                }
            })
        };
        let t = read_to_close_or_first_response(&mut c);
        assert_eq!(status_of(&t), 413, "{t}");
        drop(c);
        writer.join().unwrap();
        // CRLF injection in a session id (header and legacy query) and a passed header.
        let mut c = raw(&s);
        c.write_all(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: abc\r\nSet-Cookie: pwned=1\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        let t = read_to_close_or_first_response(&mut c);
        assert!(!t.to_ascii_lowercase().contains("set-cookie"), "{t}");
        let r = Conn::open(&s).request(
            "POST",
            "/message?sessionId=abc%0D%0ASet-Cookie:%20pwned=1",
            &[JSON_CT],
            br#"{"jsonrpc":"2.0","method":"x"}"#,
        );
        assert_eq!(r.status, 404);
        assert!(r.header("Set-Cookie").is_none());
        let mut c = raw(&s);
        c.write_all(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: a\rInjected: b\r\n\r\n",
        )
        .unwrap();
        let t = read_to_close_or_first_response(&mut c);
        assert_eq!(status_of(&t), 400, "a bare CR in a header: {t}");
        // Random bytes.
        for _ in 0..30 {
            let mut c = raw(&s);
            let n = 1 + (random() % 4096) as usize;
            let bytes: Vec<u8> = (0..n).map(|_| random() as u8).collect();
            let _ = c.write_all(&bytes);
            let _ = c.shutdown(std::net::Shutdown::Write);
            let _ = read_to_close(&mut c);
        }
        for h in slow {
            let t = h.join().unwrap();
            assert_eq!(status_of(&t), 408, "round {round}: {t}");
        }
    }

    // Still answers a normal session correctly...
    let sess = Session::open(&s);
    let r = sess.call(2, "echo", json!({"message": "after the storm"}));
    assert!(result_text(&r.messages()[0]).contains("after the storm"));
    assert_eq!(sess.delete().status, 200);
    // ...is back to its threads and children, and nothing panicked.
    eventually("children back to the baseline", || {
        children_of(pid).len() <= kids0
    });
    let names = |pid: i32| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .map(|t| comm(t.file_name().to_string_lossy().parse().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let before = names(pid);
    eventually_says(
        || {
            format!("threads back to the baseline {threads0}: {:?} (at the end of the storm: {before:?})", names(pid))
        },
        || threads(pid) <= threads0,
    );
    assert!(alive(pid));
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        metric(
            &s,
            r#"stdio_sse_requests_rejected_total{reason="bad_header_bytes"}"#
        ) >= 6.0
    );
}

/// Reads one response: its head, then its body by Content-Length (or to the close).
fn read_to_close_or_first_response(c: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                if out.len() >= end + 4 + len {
                    break;
                }
            }
        }
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A burst of connections that all stay open (keep-alive clients, SSE): every one is
/// read and answered at once. tiny_http's pool could queue one behind an idle thread it
/// had already handed another connection, and that one then waited, unread, until some
/// connection ended; under a steady keep-alive load none does, so it was answered
/// never (at --read-timeout it was closed as idle).
/// Rules: RB-5.
#[test]
fn a_burst_of_lasting_connections_is_served_at_once() {
    const ROUNDS: usize = 5;
    const BURST: usize = 32;
    let s = Server::start(&["--read-timeout", "60s"], &everything());
    let mut held = Vec::new();
    for round in 0..ROUNDS {
        let mut burst: Vec<TcpStream> = (0..BURST)
            .map(|_| {
                let mut c = raw(&s);
                c.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    .unwrap();
                c
            })
            .collect();
        for (i, c) in burst.iter_mut().enumerate() {
            // Well under --read-timeout: a queued connection would not be read at all.
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut head = [0u8; 12];
            let got = c.read_exact(&mut head);
            assert!(
                got.is_ok() && head.starts_with(b"HTTP/1.1 200"),
                "round {round}, connection {i} of {BURST}: no answer within 5 s ({got:?})"
            );
        }
        held.extend(burst); // they stay open, as keep-alive clients' do
    }
}
