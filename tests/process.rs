//! Process ownership: no zombies, no orphans after DELETE, idle expiry, shutdown, and a
//! child that forks a grandchild (ST-7).
mod common;
use common::*;
use serde_json::json;

#[test]
fn delete_leaves_no_process_behind() {
    let s = Server::start(&[], &everything());
    let sess = Session::open(&s);
    let (child, grandchild) = child_and_grandchild(&sess, 100);
    assert!(alive(child) && alive(grandchild));
    assert_eq!(sess.delete().status, 200);
    assert!(!alive(child), "child reaped before DELETE answered");
    assert_gone(grandchild, "grandchild");
    assert!(
        children_of(s.pid()).is_empty(),
        "stdio-sse has no children left: {:?}",
        children_of(s.pid())
    );
}

/// A session's child costs two threads: one reads its stdout, one its stderr and its
/// exit (a pidfd); both end with the child.
#[test]
fn each_child_costs_two_threads() {
    let s = Server::start(&[], &everything());
    let child_threads = || {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", s.pid()))
            .unwrap()
            .flatten()
            .filter_map(|t| t.file_name().to_string_lossy().parse().ok())
            .map(comm)
            .filter(|n| n.starts_with("child-"))
            .collect();
        names.sort();
        names
    };
    let sessions: Vec<Session> = (0..3).map(|_| Session::open(&s)).collect();
    let mut want = vec!["child-stdout".to_string(); 3];
    want.extend(vec!["child-watch".to_string(); 3]);
    want.sort();
    assert_eq!(child_threads(), want);
    for sess in &sessions {
        assert_eq!(sess.delete().status, 200);
    }
    eventually("the children's threads end with them", || {
        child_threads().is_empty()
    });
}

#[test]
fn idle_sessions_expire_with_their_children() {
    let s = Server::start(
        // Long enough that a loaded machine opens the session (initialize, then
        // initialized) well within it.
        &["--session-idle-timeout", "1500ms", "--keepalive", "0"],
        &everything(),
    );
    let sess = Session::open(&s);
    let (child, grandchild) = child_and_grandchild(&sess, 100);
    s.wait_log("session ended (idle)");
    assert_gone(child, "idle session's child");
    assert_gone(grandchild, "idle session's grandchild");
    assert_eq!(sess.call(1, "pid", json!({})).status, 404);
}

#[test]
fn sigterm_ends_every_child_and_exits_zero() {
    let mut s = Server::start(&[], &everything());
    let a = Session::open(&s);
    let b = Session::open(&s);
    let (ca, ga) = child_and_grandchild(&a, 100);
    let (cb, gb) = child_and_grandchild(&b, 100);
    let status = s.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    for (pid, what) in [
        (ca, "child a"),
        (ga, "grandchild a"),
        (cb, "child b"),
        (gb, "grandchild b"),
    ] {
        assert_gone(pid, what);
    }
}

/// A child that ignores stdin EOF and SIGTERM is SIGKILLed after the grace periods, and
/// the request it was working on gets an error.
#[test]
fn stubborn_child_is_killed_after_grace() {
    let stubborn = vec![
        "sh".into(),
        "-c".into(),
        format!("trap '' TERM; exec python3 {}", fixture("everything.py")),
    ];
    let s = Server::start_env(
        &["--shutdown-grace", "200ms"],
        &stubborn,
        &[("EVERYTHING_IGNORE_EOF", "1")],
    );
    let sess = Session::open(&s);
    let child: i32 = result_text(&sess.call(1, "pid", json!({})).messages()[0])
        .parse()
        .unwrap();
    let mut busy = sess.post_stream(&tool_call(2, "sleep", json!({"seconds": 60})));
    assert_eq!(busy.status, 200);
    assert_eq!(sess.delete().status, 200);
    assert!(!alive(child));
    s.wait_log("ignored stdin EOF");
    s.wait_log("sending SIGKILL");
    let err = busy.next_message().unwrap();
    assert_eq!(err["id"], 2);
    assert!(err["error"]["message"].as_str().unwrap().contains("DELETE"));
}
