//! Operating in production: process ownership that survives SIGKILL, PID 1 duties,
//! --exit-with-parent, signals, structured logs that leak no secret, the metrics an
//! operator graphs, and the --probe health check.
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// How long after SIGKILL of stdio-sse its children and grandchildren may linger.
const ORPHAN_BOUND: Duration = Duration::from_secs(1);

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stdio-sse-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The issue's test: SIGKILL stdio-sse while it has five sessions; within a second no
/// child or grandchild remains (PR_SET_PDEATHSIG for the children, the guardian for the
/// process groups their children live in).
/// Rules: OP-1.
#[test]
fn sigkill_leaves_no_child_or_grandchild() {
    let mut s = Server::start(&[], &everything());
    let sessions: Vec<Session> = (0..5).map(|_| Session::open(&s)).collect();
    let mut procs = Vec::new();
    for (i, sess) in sessions.iter().enumerate() {
        let (c, g) = child_and_grandchild(sess, 10 * i as i64);
        assert!(alive(c) && alive(g));
        procs.push((c, "child"));
        procs.push((g, "grandchild"));
    }
    let guardian = all_children_of(s.pid())
        .into_iter()
        .find(|p| comm(*p) == GUARDIAN_NAME)
        .expect("stdio-sse runs a guardian process");
    let status = s.stop_with(libc::SIGKILL);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let left: Vec<_> = procs
        .iter()
        .filter(|(pid, _)| !gone_within(*pid, ORPHAN_BOUND))
        .collect();
    assert!(
        left.is_empty(),
        "still running {ORPHAN_BOUND:?} after SIGKILL: {left:?}"
    );
    assert_gone(guardian, "the guardian, its work done");
    assert!(s.log_text().contains("killing them"), "{}", s.log_text());
}

/// Without SIGKILL the guardian has nothing to do: a clean exit tells it no group is
/// left, and it leaves quietly.
/// Rules: OP-1.
#[test]
fn clean_exit_leaves_the_guardian_nothing_to_kill() {
    let mut s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    let (c, g) = child_and_grandchild(&sess, 1);
    let guardian = all_children_of(s.pid())
        .into_iter()
        .find(|p| comm(*p) == GUARDIAN_NAME)
        .expect("guardian");
    assert_eq!(s.stop_with(libc::SIGTERM).code(), Some(0));
    for (pid, what) in [(c, "child"), (g, "grandchild"), (guardian, "guardian")] {
        assert_gone(pid, what);
    }
    assert!(!s.log_text().contains("killing them"), "{}", s.log_text());
}

/// As PID 1 of a PID namespace (a container with no init), stdio-sse reaps the orphans
/// that are reparented to it and passes SIGTERM on to the graceful shutdown.
/// Rules: OP-2.
#[test]
fn pid1_reaps_orphans_and_forwards_sigterm() {
    let dir = scratch_dir("pid1");
    let fifo = dir.join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    // Held open for reading and writing: the orphans' reads never see EOF early, and
    // our writes never wait for a reader.
    let mut release = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let maker = vec!["sh".to_string(), fixture("orphan_maker.sh")];
    let mut wrapper = vec![
        "unshare",
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--kill-child",
    ];
    wrapper.extend(bin_argv());
    let mut s = Server::launch(
        &wrapper,
        &[],
        &maker,
        &[("ORPHAN_DIR", dir.to_str().unwrap())],
    );
    let init = children_of(s.pid());
    assert_eq!(init.len(), 1, "unshare runs one process: {init:?}");
    let init = init[0];
    assert_eq!(comm(init), "stdio-sse-init", "PID 1 stays a small init");
    let sessions: Vec<Session> = (0..3).map(|_| Session::open(&s)).collect();
    // Each session's child left an orphan; find them as children of our PID 1.
    let mut orphans = Vec::new();
    eventually("3 orphans (and their pid files) under PID 1", || {
        let files = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("orphan."))
            .count();
        orphans = all_children_of(init)
            .into_iter()
            .filter(|p| comm(*p) == "sh")
            .collect();
        files == 3 && orphans.len() == 3
    });
    use std::io::Write;
    release.write_all(b"go\ngo\ngo\n").unwrap();
    for pid in &orphans {
        // Reaped: not even a zombie entry is left.
        eventually_says(
            || {
                let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
                format!("orphan {pid} was not reaped by PID 1 (state: {state:?})")
            },
            || !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        );
    }
    // The sessions still work after the reaping.
    for (i, sess) in sessions.iter().enumerate() {
        let r = sess.call(100 + i as i64, "echo", json!({"message": "after"}));
        assert_eq!(result_text(&r.messages()[0]), "after");
    }
    // Pids as we see them: the sessions' children are the worker's children (in the
    // namespace they have other numbers). An init needs no guardian: when PID 1 ends,
    // the kernel ends the namespace.
    let worker: Vec<i32> = all_children_of(init)
        .into_iter()
        .filter(|p| comm(*p) == bin_comm())
        .collect();
    assert_eq!(worker.len(), 1, "one stdio-sse under PID 1: {worker:?}");
    let children = all_children_of(worker[0]);
    assert_eq!(
        children.len(),
        3,
        "the sessions' children only: {children:?}"
    );
    unsafe { libc::kill(init, libc::SIGTERM) };
    s.wait_log("signal 15 received");
    let mut status = None;
    eventually("PID 1 exits after SIGTERM", || {
        status = s.child.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap();
    assert_eq!(status.code(), Some(0), "graceful shutdown's status");
    for c in children {
        assert_gone(c, "session child");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// --exit-with-parent: when the script that started stdio-sse dies, stdio-sse ends its
/// children in order and exits.
/// Rules: OP-3.
#[test]
fn exit_with_parent_follows_the_parent() {
    let mut wrapper = vec!["sh", "-c", "\"$@\" & wait", "sh"];
    wrapper.extend(bin_argv());
    wrapper.push("--exit-with-parent");
    let s = Server::launch(&wrapper, &[], &everything(), &[]);
    let ours = children_of(s.pid());
    assert_eq!(ours.len(), 1, "{ours:?}");
    let bridge = ours[0];
    let sess = Session::open(&s);
    let (c, g) = child_and_grandchild(&sess, 1);
    unsafe { libc::kill(s.pid(), libc::SIGKILL) };
    s.wait_log("the parent process");
    s.wait_log("all children ended; exiting");
    for (pid, what) in [(c, "child"), (g, "grandchild"), (bridge, "stdio-sse")] {
        assert_gone(pid, what);
    }
}

/// A second SIGTERM during the grace period ends the children at once.
/// Rules: OP-4, ST-7.
#[test]
fn second_sigterm_kills_children_at_once() {
    let stubborn = vec![
        "sh".into(),
        "-c".into(),
        format!("trap '' TERM; exec python3 {}", fixture("everything.py")),
    ];
    let mut s = Server::start_env(
        &["--shutdown-grace", "60s"],
        &stubborn,
        &[("EVERYTHING_IGNORE_EOF", "1")],
    );
    let sess = Session::open(&s);
    let child = child_pid(&sess);
    unsafe { libc::kill(s.pid(), libc::SIGTERM) };
    s.wait_log("stdin closed; staying alive anyway");
    // The first SIGTERM would wait 60 s for this child; the second does not.
    let status = s.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status:?}");
    assert_gone(child, "stubborn child");
    assert!(s.log_text().contains("second signal"));
}

fn json_lines(s: &Server) -> Vec<Value> {
    s.log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// --log-format json: every line is one object with time, level and event; the access
/// log carries method, path, status, duration, the session and the JSON-RPC method and
/// id; child stderr comes with its session and `source: child`; bodies at debug stop at
/// 1 KiB; and no secret is ever printed, at any level.
/// Rules: OP-5.
#[test]
fn json_logs_carry_fields_and_no_secrets() {
    let token = "tok-SECRET-7f3a9c";
    let env_secret = "env-SECRET-b81d2e";
    let header_secret = "hdr-SECRET-55aa01";
    let env_flag = format!("API_KEY={env_secret}");
    let s = Server::start(
        &[
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--auth-token",
            token,
            "--env",
            &env_flag,
            "--pass-header",
            "X-User-Key",
        ],
        &everything(),
    );
    let bearer = format!("Bearer {token}");
    let mut c = Conn::open(&s);
    let r = c.request(
        "POST",
        "/mcp",
        &[
            JSON_CT,
            ACCEPT_BOTH,
            ("Authorization", &bearer),
            ("X-User-Key", header_secret),
        ],
        init_body("2025-11-25").as_bytes(),
    );
    assert_eq!(r.status, 200);
    let sid = r.header("Mcp-Session-Id").unwrap().to_string();
    let tag = tag_of(&sid);
    let tag = tag.as_str();
    let hdrs = [
        JSON_CT,
        ACCEPT_BOTH,
        ("Authorization", bearer.as_str()),
        ("Mcp-Session-Id", sid.as_str()),
    ];
    let big = "z".repeat(3000);
    let r = c.request(
        "POST",
        "/mcp",
        &hdrs,
        tool_call(7, "echo", json!({"message": big}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(result_text(&r.messages()[0]), big);
    let r = c.request(
        "POST",
        "/mcp",
        &hdrs,
        tool_call(8, "test_stderr_noise", json!({}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200);
    let r = c.request("GET", "/metrics", &[("Authorization", "Bearer wrong")], b"");
    assert_eq!(r.status, 401);
    let r = c.request("DELETE", "/mcp", &hdrs, b"");
    assert_eq!(r.status, 200);
    s.wait_log("\"status\":200,\"duration_ms\"");
    s.wait_log("\"method\":\"DELETE\"");

    let lines = json_lines(&s);
    for l in &lines {
        for key in ["time", "level", "event"] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
    }
    let access: Vec<&Value> = lines.iter().filter(|l| l["event"] == "access").collect();
    let call = access
        .iter()
        .find(|l| l["rpc_id"] == 7)
        .expect("an access line for the tools/call");
    assert_eq!(call["rpc_method"], "tools/call");
    assert_eq!(call["method"], "POST");
    assert_eq!(call["path"], "/mcp");
    assert_eq!(call["status"], 200);
    assert_eq!(call["session"], tag);
    assert!(call["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(call["bytes_out"].as_u64().unwrap() > 3000);
    let refused = access.iter().find(|l| l["status"] == 401).unwrap();
    assert_eq!(refused["path"], "/metrics");
    assert!(refused["error"].as_str().unwrap().contains("not valid"));
    let noise = lines
        .iter()
        .find(|l| l["event"] == "child_stderr" && l["msg"].as_str().unwrap().contains("noise"))
        .expect("child stderr logged");
    assert_eq!(noise["source"], "child");
    assert_eq!(noise["session"], tag);
    assert_eq!(noise["level"], "info");
    let bodies: Vec<&Value> = lines.iter().filter(|l| l["event"] == "message").collect();
    assert!(bodies.iter().any(|l| l["direction"] == "to_child"));
    assert!(bodies.iter().any(|l| l["direction"] == "from_child"));
    for b in &bodies {
        let msg = b["msg"].as_str().unwrap();
        assert!(
            msg.len() <= 1024 + 64,
            "body not truncated: {} bytes",
            msg.len()
        );
    }
    assert!(bodies
        .iter()
        .any(|l| l["msg"].as_str().unwrap().contains("bytes in all")));
    let text = s.log_text();
    for secret in [token, env_secret, header_secret] {
        assert!(!text.contains(secret), "{secret} appears in the log");
    }
}

/// The default text format, and --access-log=false: no access lines, but refusals are
/// still logged with their reason.
/// Rules: OP-5.
#[test]
fn text_logs_and_access_log_off() {
    let s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    sess.call(1, "echo", json!({"message": "x"}));
    let (_, line) = s.wait_log_after("rpc_method=tools/call", 0);
    assert!(line.contains(" INFO  access: ["), "{line}");
    assert!(line.contains("status=200") && line.contains("duration_ms="));

    let s = Server::start(&["--access-log=false"], &everything());
    let sess = Session::open(&s);
    sess.call(1, "echo", json!({"message": "x"}));
    assert_eq!(
        Conn::open(&s).request("GET", "/nowhere", &[], b"").status,
        404
    );
    s.wait_log("http_error: GET /nowhere -> 404 Not found");
    assert!(!s.log_text().contains("access:"), "{}", s.log_text());
}

/// Every family has HELP and TYPE, label values stay bounded, and the numbers move as
/// traffic flows. (The external checks parse the same text with prometheus_client.)
/// Rules: OP-6.
#[test]
fn metrics_move_with_traffic() {
    let s = Server::start(&[], &everything());
    let before = scrape(&s);
    let sess = Session::open(&s);
    for i in 0..5 {
        sess.call(i, "echo", json!({"message": "m"}));
    }
    let _ = Conn::open(&s).request("GET", "/scanner/probe/a", &[], b"");
    let _ = Conn::open(&s).request("GET", "/scanner/probe/b", &[], b"");
    let legacy = SseReader::new({
        let mut c = Conn::open(&s);
        c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
        c
    });
    let mid = scrape(&s);
    assert_eq!(
        sample(
            &mid,
            r#"stdio_sse_sessions_active{transport="streamable_http"}"#
        ),
        1.0
    );
    // A legacy stream that has sent nothing yet is no session (issue 17: a probe costs
    // a socket and nothing more).
    assert_eq!(
        sample(&mid, r#"stdio_sse_sessions_active{transport="sse"}"#),
        0.0
    );
    drop(legacy);
    assert_eq!(sess.delete().status, 200);
    let after = scrape(&s);

    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    // initialize, notifications/initialized, 5 calls; then DELETE
    assert_eq!(
        moved(r#"stdio_sse_http_requests_total{route="mcp",method="POST",code="2xx"}"#),
        7.0
    );
    assert_eq!(
        moved(r#"stdio_sse_http_requests_total{route="mcp",method="DELETE",code="2xx"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"stdio_sse_http_requests_total{route="other",method="GET",code="4xx"}"#),
        2.0
    );
    assert!(!after.contains("scanner"), "paths never become labels");
    assert_eq!(
        moved(r#"stdio_sse_messages_total{direction="to_child",kind="request"}"#),
        6.0
    );
    assert_eq!(
        moved(r#"stdio_sse_messages_total{direction="to_child",kind="notification"}"#),
        1.0
    );
    assert!(moved(r#"stdio_sse_messages_total{direction="to_client",kind="response"}"#) >= 6.0);
    assert_eq!(moved("stdio_sse_request_duration_seconds_count"), 6.0);
    assert_eq!(
        moved(r#"stdio_sse_request_duration_seconds_bucket{le="+Inf"}"#),
        6.0
    );
    assert!(moved("stdio_sse_request_duration_seconds_sum") > 0.0);
    assert_eq!(
        moved(r#"stdio_sse_sessions_closed_total{transport="streamable_http",reason="delete"}"#),
        1.0
    );
    assert!(moved(r#"stdio_sse_http_bytes_total{direction="in"}"#) > 0.0);
    assert!(moved(r#"stdio_sse_http_bytes_total{direction="out"}"#) > 0.0);
    assert!(moved(r#"stdio_sse_child_bytes_total{direction="to_child"}"#) > 0.0);
    assert!(moved(r#"stdio_sse_children_exited_total{status="success"}"#) >= 1.0);
    assert!(sample(&after, "process_resident_memory_bytes") > 0.0);
    assert!(sample(&after, "stdio_sse_threads") > 0.0);
    // Format: every sample belongs to a family announced with HELP and TYPE.
    let mut announced = std::collections::HashSet::new();
    for l in after.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            announced.insert(rest.split(' ').next().unwrap().to_string());
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| name.strip_suffix(suf).filter(|f| announced.contains(*f)))
                .unwrap_or(name);
            assert!(announced.contains(family), "{name} has no TYPE line");
        }
    }
}

/// --probe, the health check for images that hold only this binary.
/// Rules: OP-7.
#[test]
fn probe_answers_for_health_checks() {
    let s = Server::start(
        &["--auth-token", "probe-token", "--auth-health"],
        &everything(),
    );
    let url = format!("http://{}/readyz", s.addr());
    let run = |env: &[(&str, &str)]| {
        let mut cmd = bin_command();
        cmd.arg("--probe")
            .arg(&url)
            .env_remove("STDIO_SSE_AUTH_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1), "no token: 401");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("401"));
    let out = run(&[("STDIO_SSE_AUTH_TOKEN", "probe-token")]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ready\""));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = bin_command()
        .args(["--probe", &format!("http://127.0.0.1:{port}/readyz")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "nothing listening");
}
