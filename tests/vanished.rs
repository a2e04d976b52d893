//! Clients that never say goodbye (issue 17): a standing stream whose client left is
//! noticed within a second, without a write failing first (G-6, L-1; RB-8).
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A legacy session and its child's pid: GET /sse, initialize, call `pid`.
fn legacy_session(s: &Server) -> (SseReader, String, i32) {
    let mut c = Conn::open(s);
    c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    let mut stream = SseReader::new(c);
    let endpoint = stream.next_event().expect("endpoint event").data;
    let post = |body: Value| {
        let r = Conn::open(s).request("POST", &endpoint, &[JSON_CT], body.to_string().as_bytes());
        assert_eq!(r.status, 202, "{}", r.text());
    };
    post(serde_json::from_str(&init_body("2024-11-05")).unwrap());
    let _init = stream.next_message().unwrap();
    post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    post(tool_call(1, "pid", json!({})));
    let pid = result_text(&stream.next_message().unwrap())
        .parse()
        .unwrap();
    (stream, endpoint, pid)
}

/// A legacy client that exits cleanly: its session and child are gone within a second,
/// though the next keepalive write is 15 s away (issue 17's first observation).
#[test]
fn a_legacy_client_that_exits_takes_its_session_and_child_within_a_second() {
    let s = Server::start(&["--keepalive", "15s"], &everything());
    let (stream, endpoint, pid) = legacy_session(&s);
    assert!(alive(pid));
    let left = Instant::now();
    drop(stream);
    assert!(
        gone_within(pid, Duration::from_secs(1)),
        "child {pid} outlived its client by over a second"
    );
    s.wait_log("session ended (client_gone)");
    assert!(left.elapsed() < Duration::from_secs(2));
    let r = Conn::open(&s).request("POST", &endpoint, &[JSON_CT], b"{}");
    assert_eq!(r.status, 404, "the session is gone: {}", r.text());
    assert_eq!(
        metric(
            &s,
            "stdio_sse_stream_connections_cut_total{reason=\"client_gone\"}"
        ),
        1.0
    );
}

/// G-6: a client whose GET stream dropped reconnects at once and gets its stream, not
/// 409 because the server still thinks the old connection holds it.
#[test]
fn a_get_stream_that_drops_frees_its_slot_for_the_reconnect() {
    let s = Server::start(&["--keepalive", "15s"], &everything());
    let sess = Session::open(&s);
    let first = sess.get_stream();
    assert_eq!(first.status, 200);
    drop(first);
    s.wait_log("client_gone");
    let again = sess.get_stream();
    assert_eq!(again.status, 200, "the reconnect was refused");
    // The session lives on: a Streamable HTTP session is not its GET stream.
    assert_eq!(
        result_text(&sess.call(2, "echo", json!({"message": "still"})).messages()[0]),
        "still"
    );
}

/// Evict instead of refuse: with --max-sessions 3, five clients in turn that never send
/// DELETE are all served; the sessions unattended longest were ended for them (404
/// afterwards), and there were never more than three children.
#[test]
fn at_max_sessions_the_longest_unattended_session_makes_room() {
    let s = Server::start(
        &["--max-sessions", "3", "--evict-idle-after", "300ms"],
        &everything(),
    );
    let try_open = || {
        let r = Conn::open(&s).request(
            "POST",
            "/mcp",
            &[JSON_CT, ACCEPT_BOTH],
            init_body("2025-11-25").as_bytes(),
        );
        (r.status == 200).then(|| r.header("Mcp-Session-Id").unwrap().to_string())
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut id = None;
        // A full server makes room once a session has been unattended for the floor.
        eventually(&format!("client {i} to get a session"), || {
            id = try_open();
            id.is_some()
        });
        let id = id.unwrap();
        let r = Conn::open(&s).request(
            "POST",
            "/mcp",
            &[JSON_CT, ACCEPT_BOTH, ("Mcp-Session-Id", &id)],
            tool_call(1, "echo", json!({"message": format!("client {i}")}))
                .to_string()
                .as_bytes(),
        );
        assert_eq!(result_text(&r.messages()[0]), format!("client {i}"));
        assert!(
            metric(&s, "stdio_sse_children_active") <= 3.0,
            "more children than --max-sessions"
        );
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        let r = Conn::open(&s).request(
            "POST",
            "/mcp",
            &[JSON_CT, ACCEPT_BOTH, ("Mcp-Session-Id", id)],
            tool_call(2, "echo", json!({"message": "again"}))
                .to_string()
                .as_bytes(),
        );
        let want = if i < 2 { 404 } else { 200 };
        assert_eq!(r.status, want, "client {i}: {}", r.text());
    }
    assert_eq!(
        metric(
            &s,
            "stdio_sse_sessions_closed_total{transport=\"streamable_http\",reason=\"evicted\"}"
        ),
        2.0
    );
}

/// A session with a request in flight or an open stream is never evicted: the new one is
/// refused (503) instead.
#[test]
fn an_attended_session_is_not_evicted() {
    let s = Server::start(
        &["--max-sessions", "1", "--evict-idle-after", "100ms"],
        &everything(),
    );
    let sess = Session::open(&s);
    let stream = sess.get_stream();
    assert_eq!(stream.status, 200);
    // Past the floor, with its GET stream open: attended.
    let idle_since = std::time::Instant::now();
    while idle_since.elapsed() < Duration::from_millis(300) {
        let r = Conn::open(&s).request(
            "POST",
            "/mcp",
            &[JSON_CT, ACCEPT_BOTH],
            init_body("2025-11-25").as_bytes(),
        );
        assert_eq!(r.status, 503, "{}", r.text());
    }
    drop(stream);
    s.wait_log("client_gone");
    // Its stream gone and idle past the floor: now it makes room.
    eventually("the unattended session to make room", || {
        Conn::open(&s)
            .request(
                "POST",
                "/mcp",
                &[JSON_CT, ACCEPT_BOTH],
                init_body("2025-11-25").as_bytes(),
            )
            .status
            == 200
    });
}

/// A child's request for a client with no stream open waits at most
/// --client-request-timeout, then the child gets an error answer, never one made up.
#[test]
fn a_request_no_stream_carries_gets_an_error_within_the_bound() {
    let s = Server::start_env(
        &["--client-request-timeout", "500ms"],
        &everything(),
        &[("EVERYTHING_ASK_ROOTS", "1")],
    );
    // No GET stream: the child's roots/list waits for one, in vain.
    let sess = Session::open(&s);
    s.wait_log("client_request_unanswered");
    eventually("the child to have the bridge's error", || {
        result_text(&sess.call(3, "cached_roots", json!({})).messages()[0])
            .contains("cannot answer")
    });
    assert_eq!(
        metric(&s, "stdio_sse_client_requests_unanswered_total"),
        1.0
    );
}

/// When a session ends, the child's requests still open towards it are answered with an
/// error first: a child that will not exit while one is open (server-filesystem's roots)
/// then ends on stdin EOF, without waiting out --shutdown-grace.
#[test]
fn a_session_ending_answers_the_childs_open_requests_first() {
    let s = Server::start_env(
        &["--client-request-timeout", "60s", "--shutdown-grace", "10s"],
        &everything(),
        &[
            ("EVERYTHING_ASK_ROOTS", "1"),
            ("EVERYTHING_WAIT_PENDING_ON_EOF", "1"),
        ],
    );
    let sess = Session::open(&s);
    // The child's roots/list may come on this call's stream: the pid is the answer's.
    let r = sess.call(7, "pid", json!({}));
    let answer = r
        .messages()
        .into_iter()
        .find(|m| m["id"] == 7)
        .expect("the pid answer");
    let pid: i32 = result_text(&answer).parse().unwrap();
    eventually("the child's roots/list to reach the bridge", || {
        metric(
            &s,
            "stdio_sse_messages_total{direction=\"to_client\",kind=\"request\"}",
        ) >= 1.0
    });
    let asked = Instant::now();
    assert_eq!(sess.delete().status, 200);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "ending the session took {:?}: the child waited out the grace",
        asked.elapsed()
    );
    assert!(gone_within(pid, Duration::from_secs(1)));
    s.wait_log("nothing pending; exiting");
}

/// Shared mode: a child's request when no session has a stream open gets its error at
/// once, not after a wait on the most recent session's client.
#[test]
fn shared_mode_answers_a_request_nobody_can_receive_at_once() {
    let s = Server::start_env(
        &["--mode", "shared"],
        &everything(),
        &[("EVERYTHING_ASK_ROOTS", "1")],
    );
    s.wait_log("shared child 0 started");
    let sess = Session::open(&s);
    s.wait_log("no session has a stream open to receive it");
    eventually("the child to have the bridge's error", || {
        result_text(&sess.call(3, "cached_roots", json!({})).messages()[0]).contains("error")
    });
    assert_eq!(
        metric(&s, "stdio_sse_client_requests_unanswered_total"),
        1.0
    );
}

/// No child for a probe: legacy streams that never POST start no child (mcp-remote opens
/// two such probes per run); the first message starts the session, and with --warm it
/// is then that the warm child is taken.
#[test]
fn probing_legacy_streams_start_no_child() {
    let s = Server::start(&["--warm", "1"], &everything());
    s.wait_log("warm child");
    let spawned = || metric(&s, "stdio_sse_children_spawned_total");
    let warm_only = spawned();
    let probes: Vec<SseReader> = (0..3)
        .map(|_| {
            let mut c = Conn::open(&s);
            c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
            let mut r = SseReader::new(c);
            assert_eq!(r.next_event().unwrap().event.as_deref(), Some("endpoint"));
            r
        })
        .collect();
    assert_eq!(spawned(), warm_only, "a probe started a child");
    assert_eq!(
        metric(&s, "stdio_sse_sessions_active{transport=\"sse\"}"),
        0.0
    );
    assert!(
        !s.log_text().contains("warm_take"),
        "a probe took the warm child"
    );
    drop(probes);
    // A real client: its first message starts the session, on the warm child.
    let (_stream, _endpoint, pid) = legacy_session(&s);
    assert!(alive(pid));
    s.wait_log("warm_take");
    assert_eq!(
        metric(&s, "stdio_sse_sessions_active{transport=\"sse\"}"),
        1.0
    );
}
