//! `--mode shared`: one child (or N) for every session, with ids, progress tokens,
//! cancellations, subscriptions and server requests routed to the right client; and the
//! supervisor that restarts a shared child and reports a crash loop on /readyz.
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn shared(extra: &[&str]) -> Server {
    let mut flags = vec!["--mode", "shared"];
    flags.extend_from_slice(extra);
    let s = Server::start(&flags, &everything());
    s.wait_log("shared child 0 started");
    s
}

/// Sends one request on a keep-alive connection and returns the messages of its stream.
fn exchange(conn: &mut Conn, sess: &Session, body: &Value) -> Vec<Value> {
    let r = conn.request("POST", "/mcp", &sess.headers(), body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    r.messages()
}

/// Two clients use the very same ids (numbers, strings, large and negative numbers) at
/// the same time, 10,000 calls in all: each answer reaches only the client that asked,
/// under the id it used (S-9, R-2).
#[test]
fn colliding_ids_never_cross_over_10000_calls() {
    let s = Server::start(&["--mode", "shared"], &[]); // the fast built-in demo child
    s.wait_log("shared child 0 started");
    let clients: Vec<_> = ["alpha", "beta"]
        .into_iter()
        .map(|name| {
            let sess = Session::open(&s);
            std::thread::spawn(move || {
                let mut conn = Conn::open_addr(&sess.addr);
                for i in 0..5000i64 {
                    let id = match i % 4 {
                        0 => json!(i),
                        1 => json!(-i - 1),
                        2 => json!(format!("req-{i}")),
                        _ => json!(9_007_199_254_740_993u64 + i as u64),
                    };
                    let text = format!("{name} {i}");
                    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                        "params": {"name": "echo", "arguments": {"message": text}}});
                    let msgs = exchange(&mut conn, &sess, &body);
                    assert_eq!(msgs.len(), 1, "{msgs:?}");
                    assert_eq!(msgs[0]["id"], id, "{name}: answer under the wrong id");
                    assert_eq!(result_text(&msgs[0]), text, "{name}: someone else's answer");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        metric(&s, "stdio_sse_children_spawned_total"),
        1.0,
        "one shared child served both clients"
    );
}

/// The child sees one initialize; later clients are answered from the cache with their
/// own session id and the child's protocol version, whatever version they asked for.
#[test]
fn initialize_runs_once_and_later_clients_get_the_cache() {
    let s = shared(&[]);
    let first = Session::open_version(&s, "2025-11-25");
    let second = Session::open_version(&s, "2025-06-18");
    assert_ne!(first.id, second.id);
    assert_eq!(second.init["result"]["protocolVersion"], "2025-11-25");
    assert_eq!(second.init["id"], 0);
    assert_eq!(first.init["result"], second.init["result"]);
    assert_eq!(child_pid(&first), child_pid(&second));
    let r = second.call(5, "initialize_count", json!({}));
    assert_eq!(result_text(&r.messages()[0]), "1");
    assert_eq!(s.log_text().matches("shared child initialized").count(), 1);
}

/// Progress tokens are rewritten too: two clients using the same token each get only
/// their own three progress notifications, then their own result.
#[test]
fn progress_reaches_only_its_owner() {
    let s = shared(&[]);
    let (a, b) = (Session::open(&s), Session::open(&s));
    let call = |steps: u64| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "slow_progress", "arguments": {"steps": steps, "delay": 0.05},
            "_meta": {"progressToken": "tok"}}})
    };
    let mut sa = a.post_stream(&call(3));
    let mut sb = b.post_stream(&call(5));
    for (stream, steps) in [(&mut sa, 3u64), (&mut sb, 5)] {
        let msgs = stream.rest();
        let progress: Vec<u64> = msgs[..msgs.len() - 1]
            .iter()
            .map(|m| {
                assert_eq!(m["params"]["progressToken"], "tok");
                assert_eq!(m["params"]["total"], steps);
                m["params"]["progress"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(progress, (1..=steps).collect::<Vec<_>>());
        assert_eq!(msgs.last().unwrap()["id"], 1);
        assert_eq!(
            result_text(msgs.last().unwrap()),
            format!("progressed {steps}")
        );
    }
}

/// notifications/cancelled reaches the child under the child's id for that client's
/// request, not the other client's request with the same id.
#[test]
fn cancellation_reaches_the_right_request() {
    let s = shared(&[]);
    let (a, b) = (Session::open(&s), Session::open(&s));
    let mut sa = a.post_stream(&tool_call(7, "sleep", json!({"seconds": 30})));
    let mut sb = b.post_stream(&tool_call(7, "sleep", json!({"seconds": 1})));
    let from = s.log_len();
    let n = a.post(
        &json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 7, "reason": "test"}}),
    );
    assert_eq!(n.status, 202);
    s.wait_log_after("cancelled request", from);
    let ma = sa.next_message().unwrap();
    assert_eq!(
        (ma["id"].clone(), result_text(&ma)),
        (json!(7), "cancelled".into())
    );
    let mb = sb.next_message().unwrap();
    assert_eq!(
        (mb["id"].clone(), result_text(&mb)),
        (json!(7), "slept".into())
    );
}

/// list_changed goes to every session once; resources/updated only to the subscribers;
/// subscribe/unsubscribe are reference-counted, so the child unsubscribes only when
/// the last subscriber leaves.
#[test]
fn notifications_fan_out_and_subscriptions_are_counted() {
    let s = shared(&[]);
    let sessions: Vec<Session> = (0..3).map(|_| Session::open(&s)).collect();
    let mut streams: Vec<SseReader> = sessions.iter().map(|x| x.get_stream()).collect();
    let uri = "test://watched-resource";
    let sub = |id: i64, method: &str| json!({"jsonrpc": "2.0", "id": id, "method": method, "params": {"uri": uri}});
    for x in &sessions[..2] {
        let r = x.post(&sub(10, "resources/subscribe"));
        assert_eq!(r.messages()[0]["result"], json!({}));
    }
    let marker = |x: &Session| {
        let r = x.call(20, "notify_list_changed", json!({}));
        assert_eq!(result_text(&r.messages()[0]), "notified");
    };
    let touch = |x: &Session| x.call(21, "touch_resource", json!({"uri": uri}));
    assert_eq!(result_text(&touch(&sessions[0]).messages()[0]), "updated");
    marker(&sessions[2]);
    let methods = |st: &mut SseReader, n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                st.next_message().unwrap()["method"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let updated = "notifications/resources/updated".to_string();
    let changed = "notifications/tools/list_changed".to_string();
    assert_eq!(
        methods(&mut streams[0], 2),
        [updated.clone(), changed.clone()]
    );
    assert_eq!(
        methods(&mut streams[1], 2),
        [updated.clone(), changed.clone()]
    );
    assert_eq!(methods(&mut streams[2], 1), std::slice::from_ref(&changed));

    // One subscriber leaves: the child keeps its subscription for the other.
    let r = sessions[1].post(&sub(11, "resources/unsubscribe"));
    assert_eq!(r.messages()[0]["result"], json!({}));
    assert!(!s.log_text().contains("unsubscribe test://"));
    touch(&sessions[2]);
    marker(&sessions[2]);
    assert_eq!(
        methods(&mut streams[0], 2),
        [updated.clone(), changed.clone()]
    );
    assert_eq!(methods(&mut streams[1], 1), std::slice::from_ref(&changed));
    assert_eq!(methods(&mut streams[2], 1), std::slice::from_ref(&changed));

    // The last subscriber's session ends: the bridge unsubscribes on its behalf.
    assert_eq!(sessions[0].delete().status, 200);
    s.wait_log("unsubscribe test://watched-resource");
    assert_eq!(
        result_text(&touch(&sessions[2]).messages()[0]),
        "not subscribed"
    );
}

/// A sampling request from the shared child goes to the session whose tool call is in
/// flight; when two sessions have work in flight, to the most recently active one.
#[test]
fn sampling_goes_to_the_session_that_asked() {
    let s = shared(&[]);
    let (a, b) = (Session::open(&s), Session::open(&s));
    let mut b_get = b.get_stream();
    for (round, busy_other) in [(1, false), (2, true)] {
        let mut other = busy_other
            .then(|| b.post_stream(&tool_call(50 + round, "sleep", json!({"seconds": 1}))));
        // post_stream returns once the stream is open, which is after the bridge has
        // sent the call to the child: B's sleep is in flight from here on.
        let mut st = a.post_stream(&tool_call(round, "test_sampling", json!({"prompt": "hi"})));
        let req = st.next_message().unwrap();
        assert_eq!(
            req["method"], "sampling/createMessage",
            "round {round}: {req}"
        );
        let answer = json!({"jsonrpc": "2.0", "id": req["id"], "result": {
            "role": "assistant", "content": {"type": "text", "text": format!("sampled {round}")},
            "model": "test", "stopReason": "endTurn"}});
        assert_eq!(a.post(&answer).status, 202);
        let result = st.next_message().unwrap();
        assert_eq!(result["id"], round);
        assert!(
            result_text(&result).contains(&format!("sampled {round}")),
            "{result}"
        );
        if let Some(o) = other.as_mut() {
            assert_eq!(result_text(&o.next_message().unwrap()), "slept");
        }
    }
    // B never saw a sampling request: its GET stream's next message is this marker.
    b.call(9, "notify_list_changed", json!({}));
    assert_eq!(
        b_get.next_message().unwrap()["method"],
        "notifications/tools/list_changed"
    );
    // A response from a session that was never asked is refused.
    let stray = json!({"jsonrpc": "2.0", "id": "srv-1", "result": {}});
    assert_eq!(b.post(&stray).status, 400);
}

/// --children 2 spreads sessions over both children (least loaded); each session stays
/// on its child.
#[test]
fn children_share_the_load() {
    let s = shared(&["--children", "2"]);
    s.wait_log("shared child 1 started");
    let sessions: Vec<Session> = (0..4).map(|_| Session::open(&s)).collect();
    let pids: Vec<i32> = sessions.iter().map(child_pid).collect();
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 2, "{pids:?}");
    for p in &distinct {
        assert_eq!(pids.iter().filter(|x| *x == p).count(), 2, "{pids:?}");
    }
    assert_eq!(child_pid(&sessions[0]), pids[0]);
}

/// A legacy SSE client and a Streamable HTTP client share the one child.
#[test]
fn both_transports_share_one_child() {
    let s = shared(&[]);
    let streamable = Session::open(&s);
    let mut c = Conn::open(&s);
    c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    let mut legacy = SseReader::new(c);
    let endpoint = legacy.next_event().unwrap().data;
    let post = |body: Value| {
        let r = Conn::open(&s).request("POST", &endpoint, &[JSON_CT], body.to_string().as_bytes());
        assert_eq!(r.status, 202, "{}", r.text());
    };
    post(serde_json::from_str(&init_body("2024-11-05")).unwrap());
    assert_eq!(legacy.next_message().unwrap()["id"], 0);
    post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    post(tool_call(1, "pid", json!({})));
    let m = legacy.next_message().unwrap();
    assert_eq!(m["id"], 1);
    assert_eq!(
        result_text(&m).parse::<i32>().unwrap(),
        child_pid(&streamable)
    );
}

/// The shared child is killed mid-call: the call gets a JSON-RPC error, the session is
/// gone (404, so the client re-initializes, S-6), and a restarted child serves it.
#[test]
fn killed_shared_child_fails_in_flight_calls_and_is_restarted() {
    let s = shared(&[]);
    let sess = Session::open(&s);
    let pid = child_pid(&sess);
    let mut st = sess.post_stream(&tool_call(3, "sleep", json!({"seconds": 30})));
    let from = s.log_len();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let m = st.next_message().unwrap();
    assert_eq!(m["id"], 3);
    assert_eq!(m["error"]["code"], -32603);
    assert!(
        m["error"]["message"].as_str().unwrap().contains("signal 9"),
        "{m}"
    );
    assert!(
        st.next_message().is_none(),
        "the stream ends after the error"
    );
    assert_eq!(sess.call(4, "pid", json!({})).status, 404);
    s.wait_log_after("shared child 0 started", from);
    let again = Session::open(&s);
    assert_ne!(child_pid(&again), pid);
    assert_eq!(metric(&s, "stdio_sse_children_restarted_total"), 1.0);
}

/// A child that keeps failing at start turns /readyz red with the reason, and new
/// sessions get 503 instead of waiting.
#[test]
fn crash_loop_turns_readyz_red() {
    let s = Server::start(
        &[
            "--mode",
            "shared",
            "--crash-loop-limit",
            "3",
            "--restart-delay",
            "10ms",
            "--restart-delay-max",
            "40ms",
        ],
        &[
            "sh".into(),
            "-c".into(),
            "echo cannot start >&2; exit 3".into(),
        ],
    );
    s.wait_log("crash loop");
    let r = Conn::open(&s).request("GET", "/readyz", &[], b"");
    assert_eq!(r.status, 503);
    let reason = r.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("status 3") && reason.contains("cannot start"),
        "{reason}"
    );
    let r = Conn::open(&s).request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    );
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("crash loop"));
}

/// A client that never reads its stream does not slow the shared child or another
/// client: once its queue is over --stream-queue and its socket takes nothing, its
/// connection is cut (logged and counted as not reading) while the other client's calls
/// go through, and memory stays bounded.
#[test]
fn a_client_that_never_reads_does_not_slow_the_others() {
    let s = shared(&["--stream-queue", "16"]);
    let (slow, fast) = (Session::open(&s), Session::open(&s));
    let _stuck = slow.post_stream(&tool_call(
        1,
        "flood",
        json!({"count": 4000, "size": 20000}),
    ));
    s.wait_log("stream_cut");
    for i in 0..100 {
        let r = fast.call(i, "echo", json!({"message": format!("m{i}")}));
        assert_eq!(result_text(&r.messages()[0]), format!("m{i}"));
    }
    assert!(
        metric(
            &s,
            "stdio_sse_stream_connections_cut_total{reason=\"not_reading\"}"
        ) >= 1.0
    );
    assert!(vm_rss_kib(s.pid()) < 64 * 1024);
}

/// Standing streams are cheap: each idle GET stream (legacy or Streamable HTTP) costs
/// one thread and two descriptors (the writer's, and the watcher's that notices the
/// client leaving), because its connection's reading thread is given back (the stream
/// says `Connection: close`); and a broadcast from the shared child still
/// reaches every one of them (S-9: list_changed goes to each session's GET stream).
#[test]
fn standing_streams_cost_one_thread_and_one_descriptor_each() {
    const STREAMS: usize = 40;
    let s = Server::start(&["--mode", "shared"], &[]); // the demo child has `broadcast`
    s.wait_log("shared child 0 started");
    let caller = Session::open(&s);
    let pid = s.pid();
    let (fds_before, threads_before) = (open_fds(pid), threads(pid));
    let mut streams: Vec<SseReader> = (0..STREAMS)
        .map(|i| {
            if i % 2 == 0 {
                let mut c = Conn::open(&s);
                c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
                let mut r = SseReader::new(c);
                let endpoint = r.next_event().unwrap();
                assert_eq!(endpoint.event.as_deref(), Some("endpoint"));
                // Its first message makes it a session (a stream that only probes is none).
                let post = Conn::open(&s).request(
                    "POST",
                    &endpoint.data,
                    &[JSON_CT],
                    init_body("2024-11-05").as_bytes(),
                );
                assert_eq!(post.status, 202);
                assert!(r.next_message().unwrap()["result"].is_object());
                r
            } else {
                Session::open(&s).get_stream()
            }
        })
        .collect();
    for r in &streams {
        r.conn.set_timeout(Duration::from_secs(10));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Connection"), Some("close"), "{:?}", r.headers);
    }
    // A few spare workers may come and go; two per stream would be far above this.
    let slack = 12;
    let fds = open_fds(pid);
    assert!(
        fds <= fds_before + 2 * STREAMS + slack,
        "{fds} descriptors for {STREAMS} streams (from {fds_before})"
    );
    eventually("spare threads are shed, one per stream is left", || {
        threads(pid) <= threads_before + STREAMS + slack
    });
    let r = caller.call(7, "broadcast", json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    for (i, st) in streams.iter_mut().enumerate() {
        let m = st.next_message().unwrap();
        assert_eq!(
            m["method"], "notifications/tools/list_changed",
            "stream {i}: {m}"
        );
    }
}
