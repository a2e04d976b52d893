//! `--warm N`: children started ahead of sessions, so a session does not pay the child's
//! cold start; a warm child that dies while waiting is replaced.
mod common;
use common::*;

fn slow_start_server(warm: &str) -> Server {
    Server::start_env(
        &["--warm", warm],
        &everything(),
        &[("EVERYTHING_START_DELAY", "0.5")],
    )
}

/// A new session gets a child that was started (and finished its slow start) before the
/// session existed, and the pool is refilled.
/// Rules: OP-9.
#[test]
fn warm_children_serve_new_sessions() {
    let s = slow_start_server("2");
    let (i, first) = s.wait_log_after("warm child started, pid", 0);
    let (_, second) = s.wait_log_after("warm child started, pid", i + 1);
    let pid_of = |line: &str| line.rsplit(' ').next().unwrap().parse::<i32>().unwrap();
    let warm = [pid_of(&first), pid_of(&second)];
    let (i, _) = s.wait_log_after("ready after 0.5s", 0);
    s.wait_log_after("ready after 0.5s", i + 1);
    let spawned = metric(&s, "stdio_sse_children_spawned_total");
    let from = s.log_len();
    let sess = Session::open(&s);
    // The session started no child of its own: it took a warm one (the pool refills
    // after). How much sooner it answered is the benchmark's to measure.
    assert!(warm.contains(&child_pid(&sess)), "{warm:?}");
    s.wait_log_after("took warm child", from);
    s.wait_log_after("warm child started", from);
    assert_eq!(
        metric(&s, "stdio_sse_children_spawned_total"),
        spawned + 1.0,
        "one child started since: the refill, none for the session"
    );
}

/// A warm child that dies while waiting for a session is replaced, and sessions never
/// get a dead one.
/// Rules: OP-9.
#[test]
fn dead_warm_child_is_replaced() {
    let s = slow_start_server("1");
    let line = s.wait_log("warm child started, pid");
    let pid: i32 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let from = s.log_len();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    s.wait_log_after("exited while waiting for a session", from);
    let (_, line) = s.wait_log_after("warm child started, pid", from);
    let replacement: i32 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_ne!(replacement, pid);
    let sess = Session::open(&s);
    assert_eq!(child_pid(&sess), replacement);
}
