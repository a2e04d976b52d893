//! Test harness: runs the real stdio-sse binary on a loopback port and talks to it with a
//! small HTTP/1.1 client over real sockets, including incremental SSE reading.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

// The wire: the HTTP/1.1 client, responses and SSE parsing, shared with the benchmark
// (tests/bench/bench.rs includes the same file).
mod wire;
pub use wire::*;

/// The binary cargo built for this host. A test that starts the stdio-sse under test
/// uses `bin()`, `bin_argv()`, `bin_command()` or `Server`, which follow the overrides
/// below; BIN itself is for what must be native (e.g. a `__demo-server` child).
pub const BIN: &str = env!("CARGO_BIN_EXE_stdio-sse");

/// The stdio-sse under test: `STDIO_SSE_TEST_BIN` (e.g. dist/stdio-sse-aarch64 or
/// dist/stdio-sse-tiny, as ./build.sh test runs it), else the one cargo built.
pub fn bin() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| match std::env::var("STDIO_SSE_TEST_BIN") {
        Ok(p) if !p.is_empty() => std::fs::canonicalize(&p)
            .unwrap_or_else(|e| panic!("STDIO_SSE_TEST_BIN={p}: {e}"))
            .to_string_lossy()
            .into_owned(),
        _ => BIN.to_string(),
    })
}

/// The words that run `bin()`: `STDIO_SSE_TEST_RUNNER`'s (an emulator such as
/// `qemu-aarch64-static`, which runs the foreign binary in its own process, so the pid is
/// still stdio-sse's and its children are still ours), then the binary.
pub fn bin_argv() -> Vec<&'static str> {
    let mut argv = runner().to_vec();
    argv.push(bin());
    argv
}

/// A Command that starts `bin()` (under the runner, if any).
pub fn bin_command() -> Command {
    let argv = bin_argv();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// The name /proc gives the process `bin_argv()` starts (the emulator's, under one),
/// for a test that finds it among others by name.
pub fn bin_comm() -> String {
    let exe = bin_argv()[0];
    let name = exe.rsplit('/').next().unwrap_or(exe);
    name.chars().take(15).collect()
}

fn runner() -> &'static [&'static str] {
    static WORDS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    WORDS.get_or_init(|| {
        let words = std::env::var("STDIO_SSE_TEST_RUNNER").unwrap_or_default();
        let words: &'static str = Box::leak(words.into_boxed_str());
        words.split_whitespace().collect()
    })
}

pub fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The everything fixture as a COMMAND.
pub fn everything() -> Vec<String> {
    vec!["python3".into(), fixture("everything.py")]
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

/// A running stdio-sse. Dropping it stops the process (only the one this test started).
pub struct Server {
    pub child: Child,
    pub port: u16,
    log: Arc<(Mutex<LogState>, Condvar)>,
}

impl Server {
    pub fn start(flags: &[&str], command: &[String]) -> Server {
        Self::start_env(flags, command, &[])
    }

    pub fn start_env(flags: &[&str], command: &[String], env: &[(&str, &str)]) -> Server {
        Self::launch(&bin_argv(), flags, command, env)
    }

    /// Runs `wrapper` (whose last words are `bin_argv()`, e.g. under `unshare`) with the
    /// usual loopback flags, then `flags` and COMMAND.
    pub fn launch(
        wrapper: &[&str],
        flags: &[&str],
        command: &[String],
        env: &[(&str, &str)],
    ) -> Server {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]);
        cmd.args(["--port", "0", "--host", "127.0.0.1"]).args(flags);
        // No COMMAND runs the built-in demo: stdio-sse execs itself again. An emulated
        // stdio-sse cannot (its own file is foreign and no binfmt handler is registered
        // here), so under a runner the same demo is named as COMMAND, through the runner.
        let demo: Vec<String>;
        let command = if command.is_empty()
            && !runner().is_empty()
            && wrapper.ends_with(&bin_argv())
            && !flags.contains(&"--config")
        {
            demo = bin_argv()
                .into_iter()
                .map(String::from)
                .chain(["__demo-server".to_string()])
                .collect();
            &demo[..]
        } else {
            command
        };
        if !command.is_empty() {
            cmd.arg("--").args(command);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start stdio-sse");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(LogState::default()), Condvar::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("STDIO_SSE_TEST_LOG").is_some() {
                    eprintln!("{line}");
                }
                sink.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .lines
                    .push(line);
                sink.1.notify_all();
            }
            sink.0.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            sink.1.notify_all();
        });
        let mut server = Server {
            child,
            port: 0,
            log,
        };
        let line = server.wait_log("listening on http://");
        let port = line
            .rsplit_once("127.0.0.1:")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok());
        server.port = port.unwrap_or_else(|| panic!("no port in {line:?}"));
        server
    }

    /// Waits (bounded) for a log line containing `needle` and returns it.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_after(needle, 0).1
    }

    /// Like wait_log, but only lines from index `from` on; returns (index, line).
    pub fn wait_log_after(&self, needle: &str, from: usize) -> (usize, String) {
        let (lock, cv) = &*self.log;
        let end = Instant::now() + DEADLINE;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((i, l)) = st
                .lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(needle))
            {
                return (i, l.clone());
            }
            let now = Instant::now();
            if now >= end || st.closed {
                let log = st.lines.join("\n");
                drop(st);
                panic!("log line containing {needle:?} never came; log:\n{log}");
            }
            st = cv
                .wait_timeout(st, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn log_len(&self) -> usize {
        self.log
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .len()
    }

    pub fn log_text(&self) -> String {
        self.log
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .join("\n")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal and waits (bounded) for the exit.
    pub fn stop_with(&mut self, sig: i32) -> std::process::ExitStatus {
        unsafe { libc::kill(self.pid(), sig) };
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < end,
                "stdio-sse did not exit after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("STDIO_SSE_TEST_LOG").is_some() {
            eprintln!("---- server log ----\n{}", self.log_text());
        }
        if self.child.try_wait().ok().flatten().is_none() {
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Conn {
    pub fn open(server: &Server) -> Conn {
        Self::open_addr(&server.addr())
    }
}

/// Reads SSE events from a chunked stream one at a time.
pub struct SseReader {
    pub conn: Conn,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pending: String,
    pub ended: bool,
}

impl SseReader {
    pub fn new(mut conn: Conn) -> SseReader {
        let (status, headers) = conn.head();
        SseReader {
            conn,
            status,
            headers,
            pending: String::new(),
            ended: false,
        }
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The next event (comments skipped); None when the stream ends.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(i) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..i + 2).collect();
                if let Some(ev) = parse_events(&block).into_iter().next() {
                    return Some(ev);
                }
                continue;
            }
            if self.ended {
                return None;
            }
            match self.conn.chunk() {
                Some(c) => self.pending.push_str(&String::from_utf8(c).unwrap()),
                None => self.ended = true,
            }
        }
    }
    pub fn next_message(&mut self) -> Option<Value> {
        loop {
            let ev = self.next_event()?;
            if ev.event.as_deref().unwrap_or("message") == "message" && !ev.data.is_empty() {
                return Some(serde_json::from_str(&ev.data).unwrap());
            }
        }
    }
    /// Every remaining message until the stream ends.
    pub fn rest(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.next_message()).collect()
    }
}

/// A Streamable HTTP session set up the way SDK clients do it.
pub struct Session {
    pub id: String,
    pub addr: String,
    pub init: Value,
    /// The MCP endpoint it was opened on (/mcp, or a server's /servers/NAME/mcp).
    pub path: String,
}

impl Session {
    pub fn open(server: &Server) -> Session {
        Self::open_version(server, "2025-11-25")
    }
    pub fn open_version(server: &Server, version: &str) -> Session {
        Self::open_at(server, "/mcp", version)
    }
    /// A session on another MCP endpoint (a --config server's /servers/NAME/mcp).
    pub fn open_at(server: &Server, path: &str, version: &str) -> Session {
        let mut c = Conn::open(server);
        let r = c.request(
            "POST",
            path,
            &[JSON_CT, ACCEPT_BOTH],
            init_body(version).as_bytes(),
        );
        assert_eq!(r.status, 200, "initialize failed: {}", r.text());
        let id = r.header("Mcp-Session-Id").expect("session id").to_string();
        let init = r.messages().into_iter().last().expect("initialize result");
        let s = Session {
            id,
            addr: server.addr(),
            init,
            path: path.to_string(),
        };
        let n = s.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        assert_eq!(n.status, 202);
        s
    }
    pub fn headers(&self) -> Vec<(&str, &str)> {
        vec![
            JSON_CT,
            ACCEPT_BOTH,
            ("Mcp-Session-Id", self.id.as_str()),
            ("MCP-Protocol-Version", "2025-11-25"),
        ]
    }
    pub fn post(&self, body: &Value) -> Response {
        Conn::open_addr(&self.addr).request(
            "POST",
            &self.path,
            &self.headers(),
            body.to_string().as_bytes(),
        )
    }
    /// POSTs and returns the open stream for incremental reading.
    pub fn post_stream(&self, body: &Value) -> SseReader {
        let mut c = Conn::open_addr(&self.addr);
        c.send(
            "POST",
            &self.path,
            &self.headers(),
            body.to_string().as_bytes(),
        );
        SseReader::new(c)
    }
    pub fn call(&self, id: i64, tool: &str, args: Value) -> Response {
        self.post(&tool_call(id, tool, args))
    }
    pub fn get_stream(&self) -> SseReader {
        self.resume(None)
    }
    /// GET, resuming from `last_event_id` when given.
    pub fn resume(&self, last_event_id: Option<&str>) -> SseReader {
        let mut c = Conn::open_addr(&self.addr);
        let mut headers = vec![
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", self.id.as_str()),
        ];
        if let Some(id) = last_event_id {
            headers.push(("Last-Event-ID", id));
        }
        c.send("GET", &self.path, &headers, b"");
        SseReader::new(c)
    }
    pub fn delete(&self) -> Response {
        Conn::open_addr(&self.addr).request(
            "DELETE",
            &self.path,
            &[("Mcp-Session-Id", self.id.as_str())],
            b"",
        )
    }
}

/// How the log names a session: the first 8 characters of its id's random part (after
/// the instance prefix, `--instance-id`, when there is one).
pub fn tag_of(session_id: &str) -> String {
    session_id.rsplit('_').next().unwrap_or(session_id)[..8].to_string()
}

pub fn tool_call(id: i64, tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

/// The text of a tools/call result.
pub fn result_text(msg: &Value) -> String {
    msg.pointer("/result/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no text in {msg}"))
        .to_string()
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Waits (bounded by `within`) for a process to be gone or a zombie; true if it went.
pub fn gone_within(pid: i32, within: Duration) -> bool {
    let end = Instant::now() + within;
    while alive(pid) {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Waits (bounded) for a process to be gone; a kill takes effect asynchronously.
pub fn assert_gone(pid: i32, what: &str) {
    assert!(
        gone_within(pid, DEADLINE),
        "{what} (pid {pid}) is still running"
    );
}

/// The pid of the session's child and of a grandchild it starts (the demo fixture's
/// `pid` and `spawn_grandchild` tools), with request ids `id` and `id + 1`.
pub fn child_and_grandchild(sess: &Session, id: i64) -> (i32, i32) {
    let child = result_text(&sess.call(id, "pid", json!({})).messages()[0])
        .parse()
        .unwrap();
    let grandchild = result_text(&sess.call(id + 1, "spawn_grandchild", json!({})).messages()[0])
        .parse()
        .unwrap();
    (child, grandchild)
}

/// The name stdio-sse gives its guardian process (not a child of the command).
pub const GUARDIAN_NAME: &str = "stdio-sse-guard";

pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Pids whose parent is `ppid`, without stdio-sse's guardian.
pub fn children_of(ppid: i32) -> Vec<i32> {
    all_children_of(ppid)
        .into_iter()
        .filter(|p| comm(*p) != GUARDIAN_NAME)
        .collect()
}

/// Live pids whose parent is `ppid`.
pub fn all_children_of(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some((_, rest)) = stat.rsplit_once(") ") {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                if fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(ppid)
                    && !fields[0].starts_with('Z')
                {
                    out.push(pid);
                }
            }
        }
    }
    out
}

pub fn vm_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// One sample of /metrics, by its name with labels as printed (0 when absent).
pub fn metric(server: &Server, name: &str) -> f64 {
    sample(&scrape(server), name)
}

/// The whole /metrics text, to compare several samples at one moment.
pub fn scrape(server: &Server) -> String {
    Conn::open(server)
        .request("GET", "/metrics", &[], b"")
        .text()
}

/// One sample of a /metrics text (0 when absent).
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// The number a `pid` tool call returns: which child served the session.
pub fn child_pid(sess: &Session) -> i32 {
    let r = sess.call(900_001, "pid", json!({}));
    result_text(&r.messages()[0]).parse().unwrap()
}

/// Threads of a process, from /proc.
pub fn threads(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Open file descriptors of a process, from /proc.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits (bounded by DEADLINE) until `f` holds; the pools shed idle threads after a few
/// seconds.
pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_says(|| what.to_string(), f);
}

/// `eventually`, with a failure message made when it fails (it can show what is seen).
pub fn eventually_says(what: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(std::time::Instant::now() < until, "{}", what());
        std::thread::sleep(Duration::from_millis(50));
    }
}
