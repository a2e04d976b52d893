//! `stdio-sse check`: the real binary starts real servers (the fixtures in
//! tests/fixtures/check/ and the everything fixture) and must give the right verdict, exit
//! status and words a person can act on, within its timeout.
mod common;
use common::*;
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Every check here ends well within this (python start-up on a loaded machine included).
const BOUND: Duration = Duration::from_secs(30);

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json printed no JSON ({e}): {}", self.stdout))
    }
    fn says(&self, needle: &str) -> bool {
        self.stdout.contains(needle)
    }
}

/// `stdio-sse check ARGS...`, stopped (and the test failed) if it outlasts `bound`.
fn check_env(args: &[&str], env: &[(&str, &str)], bound: Duration) -> Ran {
    let mut cmd = bin_command();
    cmd.arg("check")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("STDIO_SSE_CHECK_TIMEOUT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let began = Instant::now();
    let child = cmd.spawn().expect("start stdio-sse check");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(bound) {
        Ok(out) => out.expect("stdio-sse check ran"),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("stdio-sse check {args:?} took longer than {bound:?}");
        }
    };
    let ran = Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: began.elapsed(),
    };
    if std::env::var_os("STDIO_SSE_TEST_LOG").is_some() {
        eprintln!("{}{}", ran.stdout, ran.stderr);
    }
    ran
}

fn check(args: &[&str]) -> Ran {
    check_env(args, &[], BOUND)
}

fn fix(name: &str) -> String {
    fixture(&format!("check/{name}"))
}

#[test]
fn a_working_server_is_reported_with_its_name_protocol_and_tools() {
    let everything = fixture("everything.py");
    let r = check(&["--", "python3", &everything]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for needle in [
        "stdio-sse-test-everything 1.0.0",
        "2025-11-25",
        "tools (",
        "echo",
        "test_simple_text",
        "prompts       5",
        "resources     3",
        "everything fixture starting",
        "once its stdin closed",
        "verdict: works",
    ] {
        assert!(r.says(needle), "{needle:?} missing from:\n{}", r.stdout);
    }
}

#[test]
fn a_command_that_does_not_exist_is_said_so_with_the_path_searched() {
    let r = check(&["--", "no-such-mcp-server-here"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.says("[not_found]") && r.says("\"no-such-mcp-server-here\" is in no directory of PATH")
    );
    assert!(r.says("--env PATH="), "{}", r.stdout);
    let r = check(&["--", "/no/such/dir/server"]);
    assert_eq!(r.code, 1);
    assert!(
        r.says("there is no file /no/such/dir/server"),
        "{}",
        r.stdout
    );
}

#[test]
fn a_file_without_its_execute_bit_is_permission_denied_and_the_fix_named() {
    let file = fix("not_executable.sh");
    let r = check(&["--", &file]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.says("[permission_denied]"), "{}", r.stdout);
    assert!(r.says(&format!("chmod +x {file}")), "{}", r.stdout);
}

/// Rules: ST-4 (stderr is the server's log: quoted, not parsed).
#[test]
fn a_server_that_exits_gives_its_status_and_its_last_words() {
    let r = check(&["--", "sh", &fix("exits.sh")]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.says("[exited] the server exited with status 3 before answering initialize"),
        "{}",
        r.stdout
    );
    assert!(
        r.says("\"config error: WEATHER_API_KEY is not set\""),
        "{}",
        r.stdout
    );
    assert!(
        r.says("| starting weather server"),
        "the stderr tail: {}",
        r.stdout
    );
    // Its words on stdout, written before it exited, are quoted too.
    let r = check(&["--", "sh", "-c", "echo 'usage: server --db PATH'; exit 2"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.says("[exited] the server exited with status 2") && r.says("\"usage: server --db PATH\""),
        "{}",
        r.stdout
    );
}

/// Rules: ST-5 (stdout carries only messages).
#[test]
fn a_banner_on_stdout_is_quoted_and_said_to_belong_on_stderr() {
    let r = check(&["--", "sh", &fix("banner.sh")]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.says("[non_json_stdout]"), "{}", r.stdout);
    assert!(
        r.says("\"Weather MCP server v1.2 listening on stdio\""),
        "{}",
        r.stdout
    );
    assert!(r.says("logs and banners go to stderr"), "{}", r.stdout);
    assert!(
        r.says("echo"),
        "the rest of the check still ran: {}",
        r.stdout
    );
}

#[test]
fn a_server_that_never_answers_gets_its_verdict_when_the_timeout_is_up() {
    let silent = fix("silent.py");
    let r = check(&["--timeout", "1s", "--", "python3", &silent]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.says("[timeout] no answer to initialize within 1s (--timeout)"),
        "{}",
        r.stdout
    );
    assert!(r.says("loading model"), "its stderr: {}", r.stdout);
    assert!(r.took >= Duration::from_secs(1), "{:?}", r.took);
    assert!(r.took < Duration::from_secs(8), "verdict took {:?}", r.took);
    // The same from the variable.
    let r = check_env(
        &["--json", "--", "python3", &silent],
        &[("STDIO_SSE_CHECK_TIMEOUT", "1s")],
        BOUND,
    );
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["servers"][0]["problems"][0]["kind"], "timeout");
    assert!(r.took < Duration::from_secs(8), "verdict took {:?}", r.took);
}

#[test]
fn wrong_jsonrpc_is_quoted() {
    let wrong = fix("wrong.py");
    for (mode, kind, needle) in [
        ("no-version", "[invalid_jsonrpc]", "jsonrpc must be \"2.0\""),
        (
            "wrong-id",
            "[invalid_jsonrpc]",
            "the server answered id 4242 while initialize (id 1) was waiting",
        ),
        (
            "error",
            "[initialize_error]",
            "database unavailable: connection refused",
        ),
    ] {
        let r = check(&["--", "python3", &wrong, mode]);
        assert_eq!(r.code, 1, "{mode}: {}", r.stdout);
        assert!(
            r.says(kind) && r.says(needle),
            "{mode}: {needle:?} missing from\n{}",
            r.stdout
        );
    }
}

/// The --json shape (README: "When a server does not work"), and the requests a server
/// makes during the check answered (ST-9): roots/list with none, ping with {}, the rest
/// with -32601. The fixture's tool names say what it got back; its tools come in two pages.
#[test]
fn json_gives_one_object_with_stable_fields() {
    let r = check(&["--json", "--", "python3", &fix("asks.py")]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout.trim().lines().count(), 1, "one line: {}", r.stdout);
    let v = r.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["skipped"], json!([]));
    let s = &v["servers"][0];
    let mut keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "capabilities",
            "command",
            "endedBy",
            "exit",
            "instructions",
            "name",
            "nonJsonLines",
            "nonJsonStdout",
            "notifications",
            "ok",
            "problems",
            "prompts",
            "protocolVersion",
            "resources",
            "serverInfo",
            "serverRequests",
            "speaks2026",
            "startMs",
            "stderr",
            "tools",
            "warnings"
        ]
    );
    assert_eq!(s["name"], "default");
    assert_eq!(s["ok"], true);
    assert_eq!(s["problems"], json!([]));
    assert_eq!(s["protocolVersion"], "2025-11-25");
    assert_eq!(s["serverInfo"], json!({"name": "asks", "version": "2.0"}));
    assert_eq!(
        s["tools"],
        json!(["roots_0", "ping_ok", "sampling_-32601", "last_page"])
    );
    assert_eq!(
        s["serverRequests"],
        json!(["roots/list", "ping", "sampling/createMessage"])
    );
    assert_eq!(
        (s["prompts"].as_u64(), s["resources"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(s["speaks2026"], false);
    assert!(s["startMs"].is_u64());
    assert_eq!(s["endedBy"], "stdin_eof");
    assert_eq!(s["exit"], json!({"code": 0}));
    // A failure in the same shape.
    let r = check(&["--json", "--", "sh", &fix("exits.sh")]);
    assert_eq!(r.code, 1);
    let s = &r.json()["servers"][0];
    assert_eq!(r.json()["ok"], false);
    assert_eq!(s["problems"][0]["kind"], "exited");
    assert_eq!(s["exit"], json!({"code": 3}));
    assert_eq!(s["endedBy"], "itself");
    assert_eq!(s["tools"], Value::Null);
    assert!(s["stderr"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l.as_str().unwrap().contains("WEATHER_API_KEY")));
}

#[test]
fn a_config_file_is_checked_server_by_server() {
    let dir = std::env::temp_dir().join(format!("stdio-sse-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("servers.json");
    // Written as text: the servers come in the file's order.
    let servers = format!(
        r#"{{"mcpServers": {{
            "good": {{"command": "python3", "args": [{}]}},
            "bad": {{"command": "sh", "args": [{}]}},
            "remote": {{"url": "https://example.com/mcp"}}
        }}}}"#,
        json!(fixture("everything.py")),
        json!(fix("exits.sh"))
    );
    std::fs::write(&file, servers).unwrap();
    let path = file.to_str().unwrap();
    let r = check(&["--config", path]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.says("server good: python3") && r.says("server bad: sh"),
        "{}",
        r.stdout
    );
    assert!(
        r.says("verdict: works") && r.says("exited with status 3"),
        "{}",
        r.stdout
    );
    assert!(r.says("server remote: not checked"), "{}", r.stdout);
    assert!(
        r.says("2 servers checked: 1 works, 1 does not"),
        "{}",
        r.stdout
    );
    let v = check(&["--json", "--config", path]).json();
    let states: Vec<(&str, bool)> = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(states, [("good", true), ("bad", false)]);
    assert_eq!(v["skipped"][0]["name"], "remote");
    assert!(v["servers"][0]["tools"]
        .as_array()
        .unwrap()
        .contains(&json!("echo")));
    std::fs::remove_dir_all(&dir).ok();
}

/// A server that speaks only 2026-07-28 works with --child-protocol modern, and without it
/// the check says which flag it needs.
#[test]
fn a_2026_only_server_is_checked_by_discover_and_the_flag_it_needs_named() {
    let modern = fixture("modern_server.py");
    let r = check(&["--", "python3", &modern]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.says("[modern_only]") && r.says("--child-protocol modern"),
        "{}",
        r.stdout
    );
    let r = check(&[
        "--json",
        "--child-protocol",
        "modern",
        "--",
        "python3",
        &modern,
    ]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let s = &r.json()["servers"][0];
    assert_eq!(s["protocolVersion"], "2026-07-28");
    assert_eq!(s["serverInfo"]["name"], "stdio-sse-modern-fixture");
    assert!(s["tools"]
        .as_array()
        .unwrap()
        .contains(&json!("test_simple_text")));
}

/// Rules: ST-7, ST-8 (a server should exit on stdin EOF; the escalation ends it anyway).
#[test]
fn a_server_that_ignores_stdin_eof_is_ended_and_warned_of() {
    let r = check(&[
        "--json",
        "--shutdown-grace",
        "300ms",
        "--env",
        "EVERYTHING_IGNORE_EOF=1",
        "--",
        "python3",
        &fixture("everything.py"),
    ]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let s = &r.json()["servers"][0];
    assert_eq!(s["endedBy"], "sigterm");
    assert!(s["warnings"][0]
        .as_str()
        .unwrap()
        .contains("did not exit when its stdin closed"));
}

#[test]
fn usage_mistakes_exit_2() {
    for (args, needle) in [
        (&[][..], "give the server's COMMAND"),
        (&["--timeout", "soon", "--", "x"], "--timeout"),
        (&["--timeout", "0", "--", "x"], "more than 0"),
        (&["--bogus", "--", "x"], "unknown option --bogus"),
    ] {
        let r = check(args);
        assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    }
    let r = check(&["--help"]);
    assert_eq!(r.code, 0);
    assert!(r.says("--timeout DURATION") && r.says("STDIO_SSE_CHECK_TIMEOUT"));
}

/// A server stopped by a --child-* limit of the check's own flags is said to have met
/// it, not to be missing a command (127 is the loader's status here).
#[test]
fn a_server_stopped_by_a_child_limit_is_said_to_have_met_it() {
    let r = check(&[
        "--child-memory",
        "8MiB",
        "--",
        "python3",
        "-c",
        "import sys; sys.stdin.read()",
    ]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.says("at its limit --child-memory 8MiB"), "{}", r.stdout);
    assert!(!r.says("a command it runs was not found"), "{}", r.stdout);
}

/// A server that floods requests of its own (pings) and never reads its stdin: the
/// answers fill its stdin pipe, and the check must not wait on that pipe past its
/// --timeout. Its verdict comes in time, and the methods it asked are listed once.
#[test]
fn a_server_flooding_requests_without_reading_stdin_gets_its_verdict_in_time() {
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let r = check_env(
        &[
            "--timeout",
            "1s",
            "--shutdown-grace",
            "1s",
            "--",
            "sh",
            "-c",
            &format!("exec yes '{ping}'"),
        ],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.says("no answer to initialize within 1s"), "{}", r.stdout);
    assert!(!r.says("ping, ping"), "{}", r.stdout);
}
