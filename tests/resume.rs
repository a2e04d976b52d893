//! Resumable streams (R-3..R-6): every event has an id naming its stream, a client that
//! loses a connection resumes with Last-Event-ID and gets exactly what it missed on that
//! stream, clients at 2025-11-25 get a priming event and `retry:`, and a client that
//! vanishes has its session reaped on time.
mod common;
use common::*;
use serde_json::{json, Value};

fn progress_call(steps: u64, delay: f64) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "slow_progress", "arguments": {"steps": steps, "delay": delay},
        "_meta": {"progressToken": "p"}}})
}

/// The connection drops in the middle of a slow tool call; a GET with the last event id
/// delivers the remaining progress and the result: nothing lost, nothing twice.
#[test]
fn post_stream_resumes_after_a_dropped_connection() {
    let s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    let mut st = sess.post_stream(&progress_call(8, 0.1));
    let priming = st.next_event().unwrap();
    assert!(
        priming.data.is_empty() && priming.id.is_some(),
        "{priming:?}"
    );
    let mut seen = Vec::new();
    let mut last_id = priming.id.clone().unwrap();
    while seen.len() < 3 {
        let ev = st.next_event().unwrap();
        let m: Value = serde_json::from_str(&ev.data).unwrap();
        seen.push(m["params"]["progress"].as_u64().unwrap());
        last_id = ev.id.unwrap();
    }
    drop(st); // the connection is lost mid-call (P-9: this does not cancel the call)
    let mut resumed = sess.resume(Some(&last_id));
    assert_eq!(resumed.status, 200);
    let rest = resumed.rest();
    let (result, progress) = rest.split_last().unwrap();
    seen.extend(
        progress
            .iter()
            .map(|m| m["params"]["progress"].as_u64().unwrap()),
    );
    assert_eq!(seen, (1..=8).collect::<Vec<_>>());
    assert_eq!(result["id"], 1);
    assert_eq!(result_text(result), "progressed 8");
    assert!(resumed.ended, "the resumed stream ends after the response");
}

/// a POST stream of a 2025-11-25 session starts with an event that has an id, empty
/// data and `retry:`; older sessions get ids but no priming and no retry.
#[test]
fn priming_and_retry_only_for_2025_11_25() {
    let s = Server::start(&["--sse-retry", "750ms"], &everything());
    let new = Session::open_version(&s, "2025-11-25");
    let events = new.call(1, "echo", json!({"message": "x"})).events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].data, "");
    assert_eq!(events[0].retry.as_deref(), Some("750"));
    assert!(events[0].id.is_some() && events[1].id.is_some());
    let old = Session::open_version(&s, "2025-06-18");
    let events = old.call(1, "echo", json!({"message": "x"})).events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].id.is_some() && events[0].retry.is_none());
}

/// the priming event goes out while a slow call runs; the head is held for the
/// answer only briefly (--head-hold), never until it comes.
#[test]
fn priming_goes_out_before_a_slow_answer() {
    let s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    let started = std::time::Instant::now();
    let mut st = sess.post_stream(&tool_call(1, "sleep", json!({"seconds": 5})));
    assert_eq!(st.status, 200);
    let priming = st.next_event().unwrap();
    assert!(
        priming.data.is_empty() && priming.id.is_some(),
        "{priming:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "the head waited for the answer"
    );
    let answer = st.next_message().unwrap();
    assert_eq!(answer["id"], 1);
}

/// Ids are unique in the session and name their stream; resuming a stream replays only
/// that stream's events.
#[test]
fn resume_replays_only_its_stream() {
    let s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    let mut get = sess.get_stream();
    get.next_event().unwrap(); // priming
    sess.call(1, "notify_list_changed", json!({}));
    let first = get.next_event().unwrap();
    let post = sess.call(2, "test_tool_with_logging", json!({}));
    sess.call(3, "notify_list_changed", json!({}));
    let second = get.next_event().unwrap();
    drop(get);
    let mut ids: Vec<String> = post.events().into_iter().filter_map(|e| e.id).collect();
    ids.extend([first.id.clone().unwrap(), second.id.clone().unwrap()]);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids repeat: {ids:?}");
    let stream_of = |id: &str| id.split('-').next().unwrap().to_string();
    assert_ne!(stream_of(&ids[0]), stream_of(first.id.as_ref().unwrap()));

    let mut resumed = sess.resume(first.id.as_deref());
    let ev = resumed.next_event().unwrap();
    assert_eq!(
        (ev.id, ev.data),
        (second.id, second.data),
        "only the GET stream's later event, no POST events"
    );
}

/// A malformed id, an unknown stream, and an id whose successors left the replay buffer
/// each get a clear 400; a plain second GET gets 409 (G-6).
#[test]
fn bad_or_expired_ids_get_clear_errors() {
    let s = Server::start(&["--replay-buffer", "4,1MiB"], &everything());
    let sess = Session::open(&s);
    let mut get = sess.get_stream();
    let priming = get.next_event().unwrap().id.unwrap();
    for id in 1..=6 {
        sess.call(id, "notify_list_changed", json!({}));
        get.next_event().unwrap();
    }
    let err = |id: &str| {
        let headers = [
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", sess.id.as_str()),
            ("Last-Event-ID", id),
        ];
        let r = Conn::open(&s).request("GET", "/mcp", &headers, b"");
        assert_eq!(r.status, 400, "Last-Event-ID {id}");
        r.json()["error"]["message"].as_str().unwrap().to_string()
    };
    assert!(err(&priming).contains("no longer in the replay buffer"));
    assert!(err("nonsense").contains("invalid Last-Event-ID"));
    assert!(err("999-1").contains("names no stream"));
    assert_eq!(sess.get_stream().status, 409);
}

/// The replay buffer holds what a client may still ask for, not every answer: a POST
/// stream written to its end leaves it, the GET stream's events stay for a resume
/// and /metrics shows what is held.
#[test]
fn delivered_post_streams_leave_the_replay_buffer() {
    let s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    let mut get = sess.get_stream();
    let priming = get.next_event().unwrap().id.unwrap();
    sess.call(1, "notify_list_changed", json!({}));
    let note = get.next_event().unwrap();
    let mut answered = Vec::new();
    for id in 2..=11 {
        answered = sess.call(id, "echo", json!({"message": "x"})).events();
    }
    let held = || metric(&s, "stdio_sse_replay_buffer_events");
    eventually("only the GET stream's event is held", || held() == 1.0);
    assert_eq!(
        metric(&s, "stdio_sse_replay_buffer_bytes"),
        note.data.len() as f64
    );
    let answer_id = answered.last().unwrap().id.clone().unwrap();
    let headers = [
        ("Accept", "text/event-stream"),
        ("Mcp-Session-Id", sess.id.as_str()),
        ("Last-Event-ID", answer_id.as_str()),
    ];
    let gone = Conn::open(&s).request("GET", "/mcp", &headers, b"");
    assert_eq!(gone.status, 400, "a delivered stream is not kept");
    assert!(gone.text().contains("names no stream"), "{}", gone.text());
    let ev = sess.resume(Some(&priming)).next_event().unwrap();
    assert_eq!((ev.id, ev.data), (note.id, note.data));
}

/// A client whose GET connection died (and was not noticed yet) resumes it on a new
/// connection: the new one takes the stream over, the old one is ended.
#[test]
fn resume_takes_over_a_stale_get_stream() {
    let s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    let mut old = sess.get_stream();
    let priming = old.next_event().unwrap();
    let mut new = sess.resume(priming.id.as_deref());
    assert_eq!(new.status, 200);
    assert!(
        old.next_event().is_none(),
        "the old connection's stream is ended"
    );
    sess.call(1, "notify_list_changed", json!({}));
    assert_eq!(
        new.next_message().unwrap()["method"],
        "notifications/tools/list_changed"
    );
    assert!(
        metric(
            &s,
            "stdio_sse_stream_connections_cut_total{reason=\"resumed\"}"
        ) >= 1.0
    );
}

/// A client that vanishes without DELETE: its stream's keepalive write fails, and the
/// session (and its child) is reaped by the idle timer, counted from its last activity.
#[test]
fn vanished_client_is_reaped_with_its_child() {
    let s = Server::start(
        &["--keepalive", "100ms", "--session-idle-timeout", "1s"],
        &everything(),
    );
    let sess = Session::open(&s);
    let pid = child_pid(&sess);
    let mut get = sess.get_stream();
    get.next_event().unwrap();
    drop(get); // gone without a word
    s.wait_log("session_idle");
    assert_gone(pid, "the vanished client's child");
    assert_eq!(sess.call(2, "pid", json!({})).status, 404);
}
