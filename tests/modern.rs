//! MCP 2026-07-28 (stateless) on the same /mcp as the 2025 sessions: classification
//! (M-1), validation order and codes (M-2, N-6, N-7), discover and result decoration
//! (M-3, M-4), MRTR for a legacy child (M-5, M-6), listen (M-7), cancellation on close
//! (M-8, N-9), progress and logs (M-9), modern children (M-10), and the carriers behind
//! them: pooled per token in session mode, one on the shared child.
mod common;
use common::*;
use serde_json::{json, Value};

const V: &str = "2026-07-28";

/// The envelope a 2026-07-28 client puts in every request.
fn envelope(caps: Value) -> Value {
    json!({"io.modelcontextprotocol/protocolVersion": V,
           "io.modelcontextprotocol/clientCapabilities": caps,
           "io.modelcontextprotocol/clientInfo": {"name": "modern-test", "version": "1"}})
}

fn all_caps() -> Value {
    json!({"elicitation": {"form": {}}, "sampling": {}, "roots": {}})
}

/// A modern request body, with the headers that mirror it (N-6).
fn request(
    id: Value,
    method: &str,
    mut params: Value,
    caps: Value,
) -> (Value, Vec<(String, String)>) {
    let mut meta = envelope(caps);
    if let Some(extra) = params.get("_meta").and_then(Value::as_object) {
        for (k, v) in extra {
            meta[k] = v.clone();
        }
    }
    params["_meta"] = meta;
    let mut headers = vec![
        ("MCP-Protocol-Version".to_string(), V.to_string()),
        ("Mcp-Method".to_string(), method.to_string()),
    ];
    if let Some(name) = params
        .get("name")
        .or_else(|| params.get("uri"))
        .and_then(Value::as_str)
    {
        headers.push(("Mcp-Name".to_string(), name.to_string()));
    }
    (
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        headers,
    )
}

fn send(s: &Server, body: &Value, headers: &[(String, String)], token: Option<&str>) -> Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut h: Vec<(&str, &str)> = vec![JSON_CT, ACCEPT_BOTH];
    h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if let Some(b) = &bearer {
        h.push(("Authorization", b.as_str()));
    }
    Conn::open(s).request("POST", "/mcp", &h, body.to_string().as_bytes())
}

/// One modern request with every capability declared; its response.
fn modern(s: &Server, id: i64, method: &str, params: Value) -> Response {
    let (body, headers) = request(json!(id), method, params, all_caps());
    send(s, &body, &headers, None)
}

/// The final JSON-RPC message of a response (JSON body or the last SSE event).
fn answer(r: &Response) -> Value {
    r.messages()
        .into_iter()
        .last()
        .unwrap_or_else(|| panic!("no message in {}", r.text()))
}

fn error_code(r: &Response) -> i64 {
    answer(r)["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {}", r.text()))
}

fn legacy_server(flags: &[&str]) -> Server {
    Server::start(flags, &everything())
}

/// M-1, M-3, M-4: discover is built from the legacy child's InitializeResult; every
/// result says resultType and serverInfo, lists and reads say how long to cache them;
/// no session id is minted; a 2025 session on the same endpoint is untouched.
#[test]
fn discover_and_results_are_decorated_and_2025_still_works() {
    let s = legacy_server(&[]);
    let d = modern(&s, 1, "server/discover", json!({}));
    assert_eq!(d.status, 200, "{}", d.text());
    assert!(
        d.header("Mcp-Session-Id").is_none(),
        "a modern answer mints no session (M-1)"
    );
    let r = &answer(&d)["result"];
    assert_eq!(r["resultType"], "complete");
    assert_eq!(r["supportedVersions"], json!([V]));
    assert_eq!(r["capabilities"]["tools"]["listChanged"], true, "{r}");
    assert_eq!(
        r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "stdio-sse-test-everything"
    );
    assert!(
        r["ttlMs"].as_u64().is_some() && r["cacheScope"] == "public",
        "{r}"
    );

    let list = answer(&modern(&s, 2, "tools/list", json!({})));
    let lr = &list["result"];
    assert!(lr["tools"].as_array().is_some_and(|t| !t.is_empty()));
    assert!(
        lr["resultType"] == "complete" && lr["ttlMs"].is_u64() && lr["cacheScope"].is_string(),
        "{lr}"
    );
    let read = answer(&modern(
        &s,
        3,
        "resources/read",
        json!({"uri": "test://static-text"}),
    ));
    assert!(read["result"]["ttlMs"].is_u64(), "{read}");
    let called = answer(&modern(
        &s,
        4,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "hi"}}),
    ));
    assert_eq!(called["id"], 4);
    assert_eq!(result_text(&called), "hi");
    assert_eq!(called["result"]["resultType"], "complete");
    assert!(
        called["result"].get("ttlMs").is_none(),
        "a tool result is not cached: {called}"
    );

    // A 2025 client on the same endpoint: a session, as before (M-1).
    let sess = Session::open(&s);
    let r = sess.call(1, "echo", json!({"message": "old"}));
    assert_eq!(result_text(&r.messages()[0]), "old");
    assert!(
        sess.init["result"].get("resultType").is_none(),
        "2025 results are not decorated"
    );
    let text = scrape(&s);
    assert_eq!(
        sample(&text, "stdio_sse_mcp_requests_total{era=\"2026\"}"),
        4.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "stdio_sse_mcp_requests_total{era=\"2025\"}"),
        3.0,
        "{text}"
    );
    s.wait_log("era=2026");
}

/// A change made to a good request to make it bad.
type Tamper = Box<dyn Fn(&mut Value, &mut Vec<(String, String)>)>;

/// M-2 and the bad-input list, each with its status and code, in M-2's order.
#[test]
fn bad_modern_requests_get_the_modern_codes_in_order() {
    let s = legacy_server(&[]);
    let call = |name: &str| json!({"name": name, "arguments": {"message": "x"}});
    // Envelope first: no clientCapabilities -> -32602 (even with a header mismatch).
    let (mut body, mut headers) = request(json!(1), "tools/call", call("echo"), json!({}));
    body["params"]["_meta"]
        .as_object_mut()
        .unwrap()
        .remove("io.modelcontextprotocol/clientCapabilities");
    headers[1].1 = "tools/list".into();
    let r = send(&s, &body, &headers, None);
    assert_eq!((r.status, error_code(&r)), (400, -32602), "{}", r.text());
    assert_eq!(
        answer(&r)["id"],
        1,
        "an error answering a request carries its id"
    );

    // Headers against the body: -32020, before the version is looked at.
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "Mcp-Method differs",
            Box::new(|_, h| h[1].1 = "tools/list".into()),
        ),
        ("Mcp-Name differs", Box::new(|_, h| h[2].1 = "other".into())),
        ("Mcp-Name missing", Box::new(|_, h| h.truncate(2))),
        (
            "version header missing",
            Box::new(|_, h| {
                h.remove(0);
            }),
        ),
        (
            "Base64 Mcp-Name differs",
            Box::new(|_, h| h[2].1 = "=?base64?b3RoZXI=?=".into()),
        ),
        (
            "body v999.0.0 under header 2026-07-28",
            Box::new(|b, _| {
                b["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("v999.0.0");
            }),
        ),
    ];
    for (what, change) in cases {
        let (mut body, mut headers) = request(json!(2), "tools/call", call("echo"), json!({}));
        change(&mut body, &mut headers);
        let r = send(&s, &body, &headers, None);
        assert_eq!(
            (r.status, error_code(&r)),
            (400, -32020),
            "{what}: {}",
            r.text()
        );
    }
    // The Base64 form of the right name is the name (N-6).
    let (body, mut headers) = request(json!(3), "tools/call", call("echo"), json!({}));
    headers[2].1 = "=?base64?ZWNobw==?=".into();
    let r = send(&s, &body, &headers, None);
    assert_eq!(result_text(&answer(&r)), "x", "{}", r.text());

    // A version we do not serve, said the same in header and body: -32022 with data.
    let (mut body, mut headers) = request(json!(4), "tools/list", json!({}), json!({}));
    body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    headers[0].1 = "2099-01-01".into();
    let r = send(&s, &body, &headers, None);
    assert_eq!((r.status, error_code(&r)), (400, -32022), "{}", r.text());
    let data = &answer(&r)["error"]["data"];
    assert_eq!(
        (data["supported"].clone(), data["requested"].clone()),
        (json!([V]), json!("2099-01-01"))
    );

    // Methods 2026-07-28 does not have: 404 -32601.
    for m in [
        "initialize",
        "ping",
        "resources/subscribe",
        "logging/setLevel",
    ] {
        let r = modern(&s, 5, m, json!({"uri": "test://x", "level": "info"}));
        assert_eq!(
            (r.status, error_code(&r)),
            (404, -32601),
            "{m}: {}",
            r.text()
        );
    }
    // A batch, and a response posted by a modern client: 400.
    let (one, headers) = request(json!(6), "tools/list", json!({}), json!({}));
    let r = send(&s, &json!([one]), &headers, None);
    assert_eq!((r.status, error_code(&r)), (400, -32600), "{}", r.text());
    let reply = json!({"jsonrpc": "2.0", "id": "srv-1", "result": {}});
    let r = send(&s, &reply, &headers, None);
    assert_eq!((r.status, error_code(&r)), (400, -32600), "{}", r.text());
    // An Mcp-Session-Id on a modern request is ignored (M-1): no 404 for a stale id.
    let (body, mut headers) = request(json!(7), "tools/call", call("echo"), json!({}));
    headers.push((
        "Mcp-Session-Id".into(),
        "0b7e2bd8-0000-4000-8000-000000000000".into(),
    ));
    let r = send(&s, &body, &headers, None);
    assert_eq!(
        (r.status, result_text(&answer(&r))),
        (200, "x".to_string()),
        "{}",
        r.text()
    );
    // GET and DELETE without a session, from a 2026-07-28 client: 405, POST only (N-1).
    for method in ["GET", "DELETE"] {
        let r = Conn::open(&s).request(
            method,
            "/mcp",
            &[("Accept", "text/event-stream"), ("MCP-Protocol-Version", V)],
            b"",
        );
        assert_eq!(
            (r.status, r.header("Allow")),
            (405, Some("POST")),
            "{method}: {}",
            r.text()
        );
    }
    // Every refusal above was logged with its reason.
    for why in [
        "Invalid params",
        "Header mismatch",
        "Unsupported protocol version",
        "Method not found",
    ] {
        assert!(s.log_text().contains(why), "no log line says {why}");
    }
}

/// The input_required answer of a call that asks for input.
fn input_required(r: &Response) -> (String, String, Value) {
    let a = answer(r);
    let res = &a["result"];
    assert_eq!(res["resultType"], "input_required", "{a}");
    let (key, ask) = res["inputRequests"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    (
        key.clone(),
        res["requestState"].as_str().unwrap().to_string(),
        ask.clone(),
    )
}

/// M-5, M-6: the legacy child's elicitation becomes input_required with a key and a
/// requestState; the retry (new id) feeds the answer back and the result shows it. The
/// state is good for one retry, cannot be altered, and a retry under the old id or
/// without the answer is refused or asked again.
#[test]
fn mrtr_elicitation_round_trip_and_request_state_abuse() {
    let s = legacy_server(&["--log-level", "debug"]);
    let params = json!({"name": "test_elicitation", "arguments": {"message": "Your name?"}});
    let first = modern(&s, 10, "tools/call", params.clone());
    assert_eq!(first.status, 200, "{}", first.text());
    let (key, state, ask) = input_required(&first);
    assert_eq!(ask["method"], "elicitation/create");
    assert_eq!(ask["params"]["message"], "Your name?");
    s.wait_log("mrtr=parked");

    let retry = |id: i64, state: &str, responses: Value| {
        let mut p = params.clone();
        p["inputResponses"] = responses;
        p["requestState"] = json!(state);
        modern(&s, id, "tools/call", p)
    };
    // Altered state: refused; the call stays parked.
    let mut forged = state.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let r = retry(11, &forged, json!({}));
    assert_eq!((r.status, error_code(&r)), (400, -32602), "{}", r.text());
    // The original id again: refused.
    let r = retry(10, &state, json!({}));
    assert_eq!((r.status, error_code(&r)), (400, -32602), "{}", r.text());
    // No answer: asked again, under the same key, with a fresh state.
    let again = retry(12, &state, json!({}));
    let (key2, state2, _) = input_required(&again);
    assert_eq!(key2, key);
    assert_ne!(state2, state);
    // The used state is refused now (one retry each).
    let r = retry(13, &state, json!({key.as_str(): {"action": "accept"}}));
    assert_eq!((r.status, error_code(&r)), (400, -32602), "{}", r.text());
    // The answer: the child gets it, the result shows it.
    let done = retry(
        14,
        &state2,
        json!({key.as_str(): {"action": "accept",
        "content": {"username": "ada", "email": "ada@example.org"}}}),
    );
    let a = answer(&done);
    assert_eq!(a["id"], 14, "the result answers the retry's id");
    assert!(result_text(&a).contains("ada@example.org"), "{a}");
    s.wait_log("mrtr=resumed");
    // Finished: the state names no parked call any more.
    let r = retry(15, &state2, json!({}));
    assert_eq!((r.status, error_code(&r)), (400, -32602), "{}", r.text());
    assert_eq!(
        metric(&s, "stdio_sse_modern_calls_total{outcome=\"parked\"}"),
        2.0
    );
}

/// M-5: a call whose client did not declare sampling, when the child samples: 400
/// -32021 naming the capability, the child's request answered with an error and the
/// call cancelled on it.
#[test]
fn a_missing_capability_is_32021_and_the_child_is_not_left_waiting() {
    let s = legacy_server(&[]);
    let (body, headers) = request(
        json!(20),
        "tools/call",
        json!({"name": "test_sampling", "arguments": {"prompt": "hi"}}),
        json!({"elicitation": {}}),
    );
    let r = send(&s, &body, &headers, None);
    assert_eq!((r.status, error_code(&r)), (400, -32021), "{}", r.text());
    assert_eq!(
        answer(&r)["error"]["data"]["requiredCapabilities"],
        json!({"sampling": {}})
    );
    s.wait_log("input_refused");
    s.wait_log("cancelled request");
    // The carrier is free again for the next call.
    let next = answer(&modern(
        &s,
        21,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "after"}}),
    ));
    assert_eq!(result_text(&next), "after");
}

/// M-6: a parked call not resumed within --input-ttl is cancelled on the child, its
/// question answered with an error; its state is refused afterwards.
#[test]
fn a_parked_call_expires_after_input_ttl() {
    let s = legacy_server(&["--input-ttl", "1s"]);
    let params = json!({"name": "test_elicitation", "arguments": {"message": "late"}});
    let (_, state, _) = input_required(&modern(&s, 30, "tools/call", params.clone()));
    s.wait_log("input_expired");
    s.wait_log("cancelled request");
    let mut p = params;
    p["requestState"] = json!(state);
    p["inputResponses"] = json!({});
    let r = modern(&s, 31, "tools/call", p);
    assert_eq!((r.status, error_code(&r)), (400, -32602), "{}", r.text());
    assert_eq!(
        metric(&s, "stdio_sse_modern_calls_total{outcome=\"expired\"}"),
        1.0
    );
}

/// M-6: a request the child makes between calls (server-everything asks for roots as
/// soon as it is initialized) is held, never answered with something made up, and the
/// next call that can carry it asks the client; the child then has the client's roots.
#[test]
fn a_request_between_calls_is_held_for_the_next_call() {
    let s = Server::start_env(
        &["--log-level", "debug"],
        &everything(),
        &[("EVERYTHING_ASK_ROOTS", "1")],
    );
    // Discover starts a child and lets it go: its question comes with no call open.
    assert_eq!(modern(&s, 39, "server/discover", json!({})).status, 200);
    s.wait_log("input_held");
    // A client without roots: its call goes through; the question stays held.
    let (body, headers) = request(
        json!(40),
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "plain"}}),
        json!({}),
    );
    assert_eq!(
        result_text(&answer(&send(&s, &body, &headers, None))),
        "plain"
    );
    // A client with roots: its call carries the question.
    let params = json!({"name": "echo", "arguments": {"message": "carried"}});
    let first = modern(&s, 41, "tools/call", params.clone());
    let (key, state, ask) = input_required(&first);
    assert_eq!(ask["method"], "roots/list", "{}", first.text());
    let mut p = params;
    p["requestState"] = json!(state);
    p["inputResponses"] =
        json!({key.as_str(): {"roots": [{"uri": "file:///work", "name": "work"}]}});
    // The echo answered while the call was parked: its answer goes to the retry, under
    // the retry's id.
    let carried = answer(&modern(&s, 42, "tools/call", p));
    assert_eq!(
        (carried["id"].clone(), result_text(&carried)),
        (json!(42), "carried".to_string())
    );
    // The child stores the answer on a thread of its own: ask until it has.
    eventually("the child to have the client's roots", || {
        let roots = answer(&modern(
            &s,
            43,
            "tools/call",
            json!({"name": "cached_roots", "arguments": {}}),
        ));
        result_text(&roots).contains("file:///work")
    });
}

/// M-8 (N-9): a modern client that closes its stream cancels the call on the child
/// (notifications/cancelled with the child's id); nothing more is sent for it, and the
/// carrier serves the next call.
#[test]
fn closing_the_stream_cancels_the_call_on_the_child() {
    let s = legacy_server(&[]);
    let (body, headers) = request(
        json!("slow"),
        "tools/call",
        json!({"name": "slow_progress", "arguments": {"steps": 200, "delay": 0.05},
               "_meta": {"progressToken": "p"}}),
        json!({}),
    );
    let mut c = Conn::open(&s);
    let mut h: Vec<(&str, &str)> = vec![JSON_CT, ACCEPT_BOTH];
    h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    c.send("POST", "/mcp", &h, body.to_string().as_bytes());
    let mut stream = SseReader::new(c);
    let first = stream.next_message().expect("a progress event");
    assert_eq!(
        first["params"]["progressToken"], "p",
        "progress carries the client's own token (M-9)"
    );
    drop(stream);
    s.wait_log("modern_cancelled");
    s.wait_log("cancelled request");
    assert_eq!(
        metric(&s, "stdio_sse_modern_calls_total{outcome=\"cancelled\"}"),
        1.0
    );
    let next = answer(&modern(
        &s,
        51,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "next"}}),
    ));
    assert_eq!(result_text(&next), "next");
}

/// M-9: progress on the call's stream with the client's token; log messages only when
/// the request asked for them, at or above its level.
#[test]
fn progress_and_logs_follow_the_request() {
    let s = legacy_server(&[]);
    let logs = |level: Option<&str>| -> Vec<Value> {
        let mut p = json!({"name": "test_tool_with_logging", "arguments": {}});
        if let Some(l) = level {
            p["_meta"] = json!({"io.modelcontextprotocol/logLevel": l});
        }
        modern(&s, 60, "tools/call", p)
            .messages()
            .into_iter()
            .filter(|m| m["method"] == "notifications/message")
            .collect()
    };
    assert_eq!(logs(None).len(), 0, "no logLevel: no logs");
    assert_eq!(logs(Some("info")).len(), 3);
    assert_eq!(logs(Some("error")).len(), 0, "below the level asked for");
    let r = modern(
        &s,
        61,
        "tools/call",
        json!({"name": "test_tool_with_progress", "arguments": {},
        "_meta": {"progressToken": 7}}),
    );
    let msgs = r.messages();
    let progress: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{msgs:?}");
    assert!(progress.iter().all(|p| p["params"]["progressToken"] == 7));
    assert_eq!(msgs.last().unwrap()["id"], 61);
}

/// A listen stream: its messages as they come.
fn listen(s: &Server, id: &str, notifications: Value) -> SseReader {
    let (body, headers) = request(
        json!(id),
        "subscriptions/listen",
        json!({"notifications": notifications}),
        json!({}),
    );
    let mut c = Conn::open(s);
    let mut h: Vec<(&str, &str)> = vec![JSON_CT, ACCEPT_BOTH];
    h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    c.send("POST", "/mcp", &h, body.to_string().as_bytes());
    let r = SseReader::new(c);
    assert_eq!(r.status, 200);
    r
}

/// M-7: the acknowledgement comes first with the honoured subset; two listeners each get
/// one list_changed tagged with their own subscription id; a resource subscription is
/// one `resources/subscribe` on the child however many listen, released with the last;
/// on shutdown each listener gets its final result.
#[test]
fn two_listeners_hear_one_list_changed_and_subscriptions_are_counted() {
    let mut s = legacy_server(&[]);
    let watched = "test://watched-resource";
    let wants = json!({"toolsListChanged": true, "resourceSubscriptions": [watched]});
    let mut a = listen(&s, "listen-a", wants.clone());
    let mut b = listen(&s, "listen-b", wants);
    for (l, id) in [(&mut a, "listen-a"), (&mut b, "listen-b")] {
        let ack = l.next_message().unwrap();
        assert_eq!(
            ack["method"], "notifications/subscriptions/acknowledged",
            "{ack}"
        );
        assert_eq!(
            ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
            id
        );
        assert_eq!(ack["params"]["notifications"]["toolsListChanged"], true);
        assert_eq!(
            ack["params"]["notifications"]["resourceSubscriptions"],
            json!([watched])
        );
    }
    let call = |tool: &str, args: Value| {
        result_text(&answer(&modern(
            &s,
            70,
            "tools/call",
            json!({"name": tool, "arguments": args}),
        )))
    };
    assert_eq!(call("notify_list_changed", json!({})), "notified");
    for (l, id) in [(&mut a, "listen-a"), (&mut b, "listen-b")] {
        let n = l.next_message().unwrap();
        assert_eq!(n["method"], "notifications/tools/list_changed");
        assert_eq!(
            n["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
            id
        );
    }
    assert_eq!(
        call("touch_resource", json!({"uri": watched})),
        "updated",
        "the child holds the subscription"
    );
    for l in [&mut a, &mut b] {
        let n = l.next_message().unwrap();
        assert_eq!(
            (n["method"].as_str(), n["params"]["uri"].as_str()),
            (Some("notifications/resources/updated"), Some(watched))
        );
    }
    drop(a);
    s.wait_log("listen_closed");
    assert_eq!(
        call("touch_resource", json!({"uri": watched})),
        "updated",
        "still one listener"
    );
    assert!(
        !s.log_text().contains("unsubscribe test://"),
        "unsubscribed while one listens"
    );
    let _ = b.next_message();
    s.stop_with(libc::SIGTERM);
    let last = b.rest();
    let fin = last.last().expect("a final result on shutdown");
    assert_eq!(fin["id"], "listen-b");
    assert_eq!(fin["result"]["resultType"], "complete");
    assert_eq!(
        fin["result"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        "listen-b"
    );
}

/// Carriers in session mode: a child serves calls one after another (no spawn per
/// request), and one token's calls never reach a child serving another token.
#[test]
fn carriers_are_reused_and_never_shared_between_tokens() {
    let s = legacy_server(&["--auth-token", "alpha", "--auth-token", "beta"]);
    let pid = |token: &str, id: i64| -> String {
        let (body, headers) = request(
            json!(id),
            "tools/call",
            json!({"name": "pid", "arguments": {}}),
            json!({}),
        );
        let r = send(&s, &body, &headers, Some(token));
        assert_eq!(r.status, 200, "{}", r.text());
        result_text(&answer(&r))
    };
    let a = pid("alpha", 1);
    for i in 2..20 {
        assert_eq!(
            pid("alpha", i),
            a,
            "the same idle child serves the next call"
        );
    }
    let b = pid("beta", 1);
    assert_ne!(a, b, "another token gets a child of its own");
    assert_eq!(pid("alpha", 30), a);
    assert_eq!(
        s.log_text().matches("Modern session opened").count(),
        2,
        "two children in all"
    );
    let (body, headers) = request(json!(1), "tools/list", json!({}), json!({}));
    let r = send(&s, &body, &headers, Some("wrong"));
    assert_eq!(r.status, 401);
}

/// Shared mode: a modern client and a 2025 client interleave 1,000 calls on one shared
/// child with the same ids; every answer reaches the client that asked (S-9, M-1).
#[test]
fn modern_and_2025_clients_share_a_child_without_crossing() {
    let s = Server::start(&["--mode", "shared"], &[]);
    s.wait_log("shared child 0 started");
    let addr = s.addr();
    let old = {
        let sess = Session::open(&s);
        std::thread::spawn(move || {
            let mut conn = Conn::open_addr(&sess.addr);
            for i in 0..500i64 {
                let text = format!("2025 {i}");
                let body = tool_call(i, "echo", json!({"message": text}));
                let r = conn.request("POST", "/mcp", &sess.headers(), body.to_string().as_bytes());
                let m = r.messages();
                assert_eq!((m[0]["id"].clone(), result_text(&m[0])), (json!(i), text));
            }
        })
    };
    let new = std::thread::spawn(move || {
        let mut conn = Conn::open_addr(&addr);
        for i in 0..500i64 {
            let text = format!("2026 {i}");
            let (body, headers) = request(
                json!(i),
                "tools/call",
                json!({"name": "echo", "arguments": {"message": text}}),
                json!({}),
            );
            let mut h: Vec<(&str, &str)> = vec![JSON_CT, ACCEPT_BOTH];
            h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let r = conn.request("POST", "/mcp", &h, body.to_string().as_bytes());
            let m = answer(&r);
            assert_eq!((m["id"].clone(), result_text(&m)), (json!(i), text));
        }
    });
    old.join().unwrap();
    new.join().unwrap();
    assert_eq!(metric(&s, "stdio_sse_children_spawned_total"), 1.0);
}

/// M-10: a child that speaks 2026-07-28 gets the bodies as they are (ids remapped); a
/// 2025 client is told the server speaks only 2026-07-28; `auto` finds each era.
#[test]
fn a_modern_child_passes_through_and_auto_finds_the_era() {
    let modern_child = vec!["python3".to_string(), fixture("modern_server.py")];
    let s = Server::start(&["--child-protocol", "modern"], &modern_child);
    let d = answer(&modern(&s, 1, "server/discover", json!({})));
    assert_eq!(d["result"]["supportedVersions"], json!([V]), "{d}");
    let tools = answer(&modern(&s, 2, "tools/list", json!({})));
    assert!(
        tools["result"]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{tools}"
    );
    let r = modern(&s, 3, "no/such", json!({}));
    assert_eq!(
        (r.status, error_code(&r)),
        (404, -32601),
        "the child's -32601 is a 404: {}",
        r.text()
    );
    let r = Conn::open(&s).request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("speaks only 2026-07-28"), "{}", r.text());
    drop(s);

    let s = Server::start(&["--child-protocol", "auto"], &modern_child);
    s.wait_log("the server speaks 2026-07-28");
    drop(s);
    let s = Server::start(&["--child-protocol", "auto"], &everything());
    s.wait_log("the server speaks 2025");
    let called = answer(&modern(
        &s,
        1,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "legacy"}}),
    ));
    assert_eq!(result_text(&called), "legacy");
}

/// M-5, M-6: questions the child asks at once (three written together) go out in one
/// input_required, under three keys; answering all three completes the call in one
/// retry. (Found by the 2026 suite: the first question alone went out, the others on
/// the retry.)
#[test]
fn questions_asked_at_once_go_out_together() {
    let s = legacy_server(&[]);
    let params = json!({"name": "test_input_required_result_multiple_inputs", "arguments": {}});
    let a = answer(&modern(&s, 80, "tools/call", params.clone()));
    let requests = a["result"]["inputRequests"]
        .as_object()
        .unwrap_or_else(|| panic!("{a}"));
    let mut methods: Vec<&str> = requests
        .values()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    methods.sort();
    assert_eq!(
        methods,
        ["elicitation/create", "roots/list", "sampling/createMessage"],
        "{a}"
    );
    let responses: serde_json::Map<String, Value> = requests
        .iter()
        .map(|(k, r)| {
            let v = match r["method"].as_str().unwrap() {
                "elicitation/create" => json!({"action": "accept", "content": {"name": "Alice"}}),
                "sampling/createMessage" => json!({"role": "assistant", "model": "m",
                    "content": {"type": "text", "text": "Hello there!"}}),
                _ => json!({"roots": [{"uri": "file:///a", "name": "a"}]}),
            };
            (k.clone(), v)
        })
        .collect();
    let mut p = params;
    p["inputResponses"] = Value::Object(responses);
    p["requestState"] = a["result"]["requestState"].clone();
    let done = answer(&modern(&s, 81, "tools/call", p));
    assert_eq!(done["result"]["resultType"], "complete", "{done}");
    assert!(
        result_text(&done).contains("Alice") && result_text(&done).contains("Hello there!"),
        "{done}"
    );
}

/// M-6, shared mode: a parked call whose client never comes back does not make the
/// next call's questions ambiguous (found by the 2026 suite run back to back: one
/// abandoned call refused every later question until --input-ttl).
#[test]
fn an_abandoned_parked_call_does_not_block_the_next_question() {
    let s = legacy_server(&["--mode", "shared"]);
    s.wait_log("shared child 0 started");
    let abandoned = modern(
        &s,
        90,
        "tools/call",
        json!({"name": "test_elicitation", "arguments": {"message": "never answered"}}),
    );
    input_required(&abandoned);
    let next = modern(
        &s,
        91,
        "tools/call",
        json!({"name": "test_input_required_result_sampling", "arguments": {}}),
    );
    let (_, _, ask) = input_required(&next);
    assert_eq!(ask["method"], "sampling/createMessage", "{}", next.text());
}

/// M-6: parked calls of several clients at once never mix: each retry resumes its own
/// call, on its own child, and its answer reaches only that call's result.
#[test]
fn concurrent_parked_calls_never_mix() {
    let s = legacy_server(&[]);
    let names = ["ada", "grace", "edsger"];
    let parked: Vec<(Value, String, String)> = names
        .iter()
        .enumerate()
        .map(|(i, who)| {
            let params =
                json!({"name": "test_elicitation", "arguments": {"message": format!("for {who}")}});
            let (key, state, ask) =
                input_required(&modern(&s, 100 + i as i64, "tools/call", params.clone()));
            assert_eq!(
                ask["params"]["message"],
                format!("for {who}"),
                "each call asks its own question"
            );
            (params, key, state)
        })
        .collect();
    let done: Vec<_> = parked
        .into_iter()
        .zip(names)
        .enumerate()
        .rev()
        .map(|(i, ((mut params, key, state), who))| {
            params["requestState"] = json!(state);
            params["inputResponses"] = json!({key.as_str(): {"action": "accept",
                "content": {"username": who, "email": format!("{who}@example.org")}}});
            (
                who,
                answer(&modern(&s, 200 + i as i64, "tools/call", params)),
            )
        })
        .collect();
    for (who, a) in done {
        let text = result_text(&a);
        assert!(text.contains(&format!("{who}@example.org")), "{who}: {a}");
        for other in names.iter().filter(|o| **o != who) {
            assert!(!text.contains(other), "{who} got {other}'s answer: {a}");
        }
    }
}

/// The warm pool feeds carriers: a 2026-07-28 call takes the warm child, no spawn on
/// the call's path.
#[test]
fn a_modern_call_takes_a_warm_child() {
    let s = legacy_server(&["--warm", "1"]);
    s.wait_log("warm child");
    let called = answer(&modern(
        &s,
        1,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "warm"}}),
    ));
    assert_eq!(result_text(&called), "warm");
    s.wait_log("warm_take");
}

/// M-7 (found in review): a child's list_changed whose `_meta` is not an object reaches
/// the listener tagged all the same; before, tagging it panicked the child's reader and
/// nothing more from that child was routed.
#[test]
fn a_listener_survives_a_child_notification_with_an_odd_meta() {
    let s = legacy_server(&[]);
    let mut l = listen(&s, "listen-odd", json!({"toolsListChanged": true}));
    let _ack = l.next_message().unwrap();
    let call = |id: i64, args: Value| {
        answer(&modern(
            &s,
            id,
            "tools/call",
            json!({"name": "notify_list_changed", "arguments": args}),
        ))
    };
    assert_eq!(result_text(&call(1, json!({"meta": 1}))), "notified");
    let n = l.next_message().unwrap();
    assert_eq!(
        n["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-odd",
        "{n}"
    );
    assert_eq!(
        result_text(&call(2, json!({}))),
        "notified",
        "the child's messages are still routed"
    );
    assert_eq!(metric(&s, "stdio_sse_panics_total"), 0.0);
}

/// A call in progress is its child's activity (found in review): a call longer than
/// --session-idle-timeout is not ended as idle under it.
#[test]
fn a_long_call_is_not_ended_as_idle() {
    let s = legacy_server(&["--session-idle-timeout", "1s"]);
    let r = modern(
        &s,
        1,
        "tools/call",
        json!({"name": "slow_progress", "arguments": {"steps": 25, "delay": 0.1},
        "_meta": {"progressToken": "t"}}),
    );
    let a = answer(&r);
    assert_eq!(result_text(&a), "progressed 25", "{a}");
}

/// M-8 with a modern child (found in review): closing a listen (a call that does not
/// hold its carrier) does not retire the carrier under the next call.
#[test]
fn closing_a_listen_on_a_modern_child_leaves_its_child_serving() {
    let s = Server::start(
        &["--child-protocol", "modern"],
        &["python3".to_string(), fixture("modern_server.py")],
    );
    let mut l = listen(&s, "listen-m", json!({"toolsListChanged": true}));
    let ack = l.next_message().unwrap();
    assert_eq!(
        ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-m",
        "{ack}"
    );
    drop(l);
    s.wait_log("modern_cancelled");
    let r = modern(
        &s,
        2,
        "tools/call",
        json!({"name": "bridge_slow", "arguments": {"seconds": 3}}),
    );
    let a = answer(&r);
    assert_eq!(a["result"]["resultType"], "complete", "{a}");
}

/// M-1 (found in review): a 2025-11-25 request may carry `_meta` keys under the same
/// prefix (related-task); it stays a session's request.
#[test]
fn a_2025_request_with_a_2025_meta_key_stays_in_its_session() {
    let s = legacy_server(&[]);
    let sess = Session::open(&s);
    let body = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "echo",
        "arguments": {"message": "task"}, "_meta": {"io.modelcontextprotocol/related-task": {"taskId": "t1"}}}});
    let r = sess.post(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(result_text(&r.messages()[0]), "task");
}
