//! Per-child resource limits (--child-memory, --child-cpu, --child-files,
//! --child-processes, --child-user): a hostile child is stopped at its own limit, its
//! client's call gets a JSON-RPC error that names the limit, the log and
//! `stdio_sse_child_limit_exits_total{limit}` say which, and every other session goes on.
//! Rules: ST-7 (the child's whole group ends with it), OP-8 (bad values refused at start).
mod common;
use common::*;
use serde_json::{json, Value};

fn hostile() -> Vec<String> {
    vec!["python3".into(), fixture("hostile_child.py")]
}

/// The fixture as `python3 -c`, with the system Python: an unprivileged user can read
/// neither this checkout (it may sit in a private temporary directory) nor a Python
/// under /root.
fn hostile_inline() -> Option<Vec<String>> {
    let python = "/usr/bin/python3";
    std::path::Path::new(python).exists().then(|| {
        let code = std::fs::read_to_string(fixture("hostile_child.py")).unwrap();
        vec![python.into(), "-c".into(), code]
    })
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The error the call's response carries (its only message).
fn call_error(sess: &Session, id: i64, tool: &str) -> Value {
    let r = sess.call(id, tool, json!({}));
    let msgs = r.messages();
    let answer = msgs
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("no answer to {tool}: {msgs:?}"));
    answer["error"].clone()
}

/// The error names the limit as its flag says it.
fn assert_names(err: &Value, shown: &str) {
    let message = err["message"].as_str().unwrap_or_default();
    assert!(message.contains(shown), "the error names {shown}: {err}");
}

/// An initialize on /mcp, whatever its answer.
fn initialize(s: &Server) -> Response {
    Conn::open(s).request(
        "POST",
        "/mcp",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    )
}

/// The pid and uid the child reports.
fn pid_uid(sess: &Session) -> (i32, u32) {
    let text = result_text(&sess.call(7, "pid", json!({})).messages()[0]);
    let (pid, uid) = text.split_once(' ').unwrap();
    (pid.parse().unwrap(), uid.parse().unwrap())
}

/// Live processes in a process group (the child's, whose id is its pid).
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f[0] != "Z" && f.get(2).and_then(|g| g.parse().ok()) == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// One line of /proc/PID/limits, e.g. "Max address space".
fn proc_limit(pid: i32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/limits"))
        .to_string()
}

/// The call meets the limit: the error names it, the data says which, the log and the
/// metric agree, the child's group is gone, and a second session is still served.
fn assert_limit_met(
    s: &Server,
    victim: &Session,
    bystander: &Session,
    tool: &str,
    limit: &str,
    shown: &str,
) {
    let (pid, _) = pid_uid(victim);
    let err = call_error(victim, 1, tool);
    assert_names(&err, shown);
    assert_eq!(err["data"]["limit"], limit, "{err}");
    s.wait_log(&format!("at its limit {shown}"));
    assert_eq!(
        metric(
            s,
            &format!("stdio_sse_child_limit_exits_total{{limit=\"{limit}\"}}")
        ),
        1.0
    );
    eventually_says(
        || format!("the child's group is gone: {:?}", group_members(pid)),
        || group_members(pid).is_empty(),
    );
    // Another session (its own child) goes on.
    let (other, _) = pid_uid(bystander);
    assert_ne!(other, pid);
    assert_eq!(
        victim.call(2, "pid", json!({})).status,
        404,
        "the session ended with its child"
    );
}

#[test]
fn a_child_allocating_1gib_under_child_memory_dies_at_its_limit() {
    let s = Server::start(&["--child-memory", "64MiB"], &hostile());
    let (victim, bystander) = (Session::open(&s), Session::open(&s));
    let (pid, _) = pid_uid(&victim);
    assert!(proc_limit(pid, "Max address space").contains("67108864"));
    assert_limit_met(
        &s,
        &victim,
        &bystander,
        "alloc",
        "memory",
        "--child-memory 64MiB",
    );
}

#[test]
fn a_busy_loop_under_child_cpu_is_killed_at_its_limit() {
    let s = Server::start(&["--child-cpu", "1s"], &hostile());
    let (victim, bystander) = (Session::open(&s), Session::open(&s));
    assert_limit_met(&s, &victim, &bystander, "spin", "cpu", "--child-cpu 1s");
}

#[test]
fn a_child_opening_files_past_child_files_dies_at_its_limit() {
    let s = Server::start(&["--child-files", "32"], &hostile());
    let (victim, bystander) = (Session::open(&s), Session::open(&s));
    let (pid, _) = pid_uid(&victim);
    assert!(proc_limit(pid, "Max open files")
        .split_whitespace()
        .any(|w| w == "32"));
    assert_limit_met(
        &s,
        &victim,
        &bystander,
        "open_files",
        "files",
        "--child-files 32",
    );
}

#[test]
fn a_fork_bomb_as_an_unprivileged_child_user_stops_at_child_processes() {
    let Some(cmd) = hostile_inline().filter(|_| is_root()) else {
        eprintln!("skipped: needs root (to run children as nobody) and /usr/bin/python3");
        return;
    };
    let s = Server::start(&["--child-user", "nobody", "--child-processes", "24"], &cmd);
    let (victim, bystander) = (Session::open(&s), Session::open(&s));
    let (pid, uid) = pid_uid(&victim);
    assert_eq!(uid, 65534, "the child runs as nobody");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert_eq!(groups.trim(), "Groups:", "supplementary groups dropped");
    assert_limit_met(
        &s,
        &victim,
        &bystander,
        "fork_bomb",
        "processes",
        "--child-processes 24",
    );
}

#[test]
fn child_processes_for_root_children_warns_that_it_does_not_bind() {
    if !is_root() {
        eprintln!("skipped: the warning is for stdio-sse running as root");
        return;
    }
    let s = Server::start(&["--child-processes", "10"], &hostile());
    s.wait_log("--child-processes does not bind children that run as root");
}

#[test]
fn per_server_limits_from_the_config_file() {
    let dir = std::env::temp_dir().join(format!("stdio-sse-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("servers.json");
    let entry = |limits: Value| {
        let mut e = json!({"command": "python3", "args": [fixture("hostile_child.py")]});
        if !limits.is_null() {
            e["limits"] = limits;
        }
        e
    };
    std::fs::write(
        &file,
        json!({"mcpServers": {
            "small": entry(json!({"memory": "64MiB", "files": 40})),
            "plain": entry(Value::Null),
        }})
        .to_string(),
    )
    .unwrap();
    let s = Server::start(
        &["--config", file.to_str().unwrap(), "--child-cpu", "30s"],
        &[],
    );
    let small = Session::open_at(&s, "/servers/small/mcp", "2025-11-25");
    let plain = Session::open_at(&s, "/servers/plain/mcp", "2025-11-25");
    let (small_pid, _) = pid_uid(&small);
    let (plain_pid, _) = pid_uid(&plain);
    assert!(proc_limit(small_pid, "Max address space").contains("67108864"));
    assert!(proc_limit(small_pid, "Max open files")
        .split_whitespace()
        .any(|w| w == "40"));
    assert!(proc_limit(small_pid, "Max cpu time")
        .split_whitespace()
        .any(|w| w == "30"));
    assert!(proc_limit(plain_pid, "Max address space").contains("unlimited"));
    assert!(proc_limit(plain_pid, "Max cpu time")
        .split_whitespace()
        .any(|w| w == "30"));
    let err = call_error(&small, 1, "alloc");
    assert_names(&err, "--child-memory 64MiB");
    assert_eq!(pid_uid(&plain).0, plain_pid, "the other server goes on");
    let _ = std::fs::remove_dir_all(&dir);
}

/// OP-8: a limit that cannot be honoured is refused at start, with exit status 2 and a
/// message that says why.
#[test]
fn bad_limits_are_refused_at_start() {
    let cases: &[(&[&str], &str)] = &[
        (&["--child-user", "no-such-user-stdio-sse"], "no user"),
        (
            &["--child-user", "root:no-such-group-stdio-sse"],
            "no group",
        ),
        (&["--child-memory", "64 parsecs"], "--child-memory"),
        (&["--child-memory", "1KiB"], "too small"),
        (&["--child-cpu", "soon"], "--child-cpu"),
        (&["--child-cpu", "0"], "above 0"),
        (&["--child-files", "2"], "at least"),
        (&["--child-processes", "-1"], "--child-processes"),
    ];
    for (flags, says) in cases {
        let out = bin_command()
            .args(["--port", "0"])
            .args(*flags)
            .args(["--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(says), "{flags:?} says {says:?}: {err}");
    }
}

#[test]
fn an_unknown_user_in_the_config_file_names_the_server() {
    let dir = std::env::temp_dir().join(format!("stdio-sse-limits-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("servers.json");
    std::fs::write(
        &file,
        json!({"mcpServers": {"odd": {"command": "true", "limits": {"user": "no-such-user-stdio-sse"}}}})
            .to_string(),
    )
    .unwrap();
    let out = bin_command()
        .args(["--port", "0", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("\"odd\"") && err.contains("no user"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Shared mode: the one child meets its limit under every session; the call that drove
/// it gets the error naming the limit, and the supervisor's next child serves again.
#[test]
fn a_shared_child_at_its_limit_names_it_and_is_replaced() {
    let s = Server::start(
        &[
            "--mode",
            "shared",
            "--child-cpu",
            "1s",
            "--restart-delay",
            "100ms",
        ],
        &hostile(),
    );
    let victim = Session::open(&s);
    let (pid, _) = pid_uid(&victim);
    let err = call_error(&victim, 1, "spin");
    assert_names(&err, "--child-cpu 1s");
    assert_eq!(err["data"]["limit"], "cpu", "{err}");
    assert_eq!(
        metric(&s, "stdio_sse_child_limit_exits_total{limit=\"cpu\"}"),
        1.0
    );
    eventually("a new shared child serves a new session", || {
        initialize(&s).status == 200
    });
    let fresh = Session::open(&s);
    assert_ne!(pid_uid(&fresh).0, pid);
}

/// A child refused at its start by --child-memory (the loader cannot map a library:
/// "failed to map segment") is named as meeting the limit, as one that dies later is.
#[test]
fn a_child_that_cannot_even_load_under_child_memory_names_the_limit() {
    let s = Server::start(
        &["--child-memory", "8MiB"],
        &[
            "python3".into(),
            "-c".into(),
            "import sys; sys.stdin.read()".into(),
        ],
    );
    let r = initialize(&s);
    let msgs = r.messages();
    let err = &msgs
        .iter()
        .find(|m| m.get("error").is_some())
        .unwrap_or_else(|| panic!("no error for initialize: {}", r.text()))["error"];
    assert_names(err, "--child-memory 8MiB");
    assert_eq!(err["data"]["limit"], "memory", "{err}");
    s.wait_log("at its limit --child-memory 8MiB");
}
