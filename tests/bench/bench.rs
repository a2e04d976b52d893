//! The benchmark behind `./build.sh bench`: a load generator and the runs it makes.
//!
//!     bench --bin dist/stdio-sse [--rounds 5] [--seconds 2] [--quick] [--only GROUP,...] [--soak SECS] [--peers]
//!
//! Every reply is checked: it must carry the caller's own id and its own echoed message,
//! or the run fails. The child is the built-in demo server (`stdio-sse __demo-server`),
//! the same process for the direct pipe (the limit: no HTTP at all) and for every mode.
//! Scenarios run interleaved, round after round, so drift on a busy machine hits all of
//! them alike; each figure is the median over the rounds. Prints one markdown table.
//!
//! Not product code: it lives beside the tests and is built as a cargo example.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ACCEPT_BOTH: &str = "application/json, text/event-stream";

// ---- the client: tests/common/wire.rs, shared with the integration tests ------------

#[path = "../common/wire.rs"]
mod wire;
use wire::{Conn, Response as Reply};

/// The bench's way in: a connection by port, and the two requests it makes most.
trait BenchConn {
    fn at(port: u16) -> Conn;
    fn initialize(&mut self) -> Reply;
    fn post_mcp(&mut self, sid: &str, body: &[u8]) -> Reply;
    fn initialize_at(&mut self, path: &str) -> Reply;
    fn post_at(&mut self, path: &str, sid: &str, body: &[u8]) -> Reply;
}

impl BenchConn for Conn {
    fn at(port: u16) -> Conn {
        Conn::open_addr(&format!("127.0.0.1:{port}"))
    }

    /// The initialize that opens a Streamable HTTP session.
    fn initialize(&mut self) -> Reply {
        self.initialize_at("/mcp")
    }

    /// A POST to /mcp on a session, as a Streamable HTTP client sends it.
    fn post_mcp(&mut self, sid: &str, body: &[u8]) -> Reply {
        self.post_at("/mcp", sid, body)
    }

    /// The initialize on an MCP endpoint (a --config server's own, or the merged one).
    fn initialize_at(&mut self, path: &str) -> Reply {
        self.request(
            "POST",
            path,
            &[
                ("Content-Type", "application/json"),
                ("Accept", ACCEPT_BOTH),
            ],
            wire::init_body("2025-11-25").as_bytes(),
        )
    }

    fn post_at(&mut self, path: &str, sid: &str, body: &[u8]) -> Reply {
        self.request(
            "POST",
            path,
            &[
                ("Content-Type", "application/json"),
                ("Accept", ACCEPT_BOTH),
                ("Mcp-Session-Id", sid),
            ],
            body,
        )
    }
}

fn call(id: u64, message: &str) -> Value {
    call_tool("echo", id, message)
}

fn call_tool(tool: &str, id: u64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": {"message": message}}})
}

/// The check every reply gets: its own id, its own message.
fn check_echo(reply: &Value, id: u64, message: &str) {
    let text = reply
        .pointer("/result/content/0/text")
        .and_then(Value::as_str);
    if reply["id"] != id || text != Some(message) {
        panic!(
            "reply for id {id} is not ours: {}",
            truncate(&reply.to_string())
        );
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

// ---- stdio-sse and the child -----------------------------------------------------------

struct Bridge {
    child: Child,
    port: u16,
}

/// Every process the bench started and has not yet stopped: a failed check aborts
/// (release profile), so the panic hook ends them instead of the drops.
static STARTED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn stop_group_or_process(pid: i32, sig: i32) {
    let leader = unsafe { libc::getpgid(pid) } == pid;
    unsafe { libc::kill(if leader { -pid } else { pid }, sig) };
}

impl Bridge {
    fn new(child: Child, port: u16) -> Bridge {
        STARTED.lock().unwrap().push(child.id() as i32);
        Bridge { child, port }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        STARTED
            .lock()
            .unwrap()
            .retain(|p| *p != self.child.id() as i32);
        // A peer leads its own process group: end what it spawned too.
        let pid = self.child.id() as i32;
        let leader = unsafe { libc::getpgid(pid) } == pid;
        stop_group_or_process(pid, libc::SIGTERM);
        let _ = self.child.wait();
        if leader {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Starts stdio-sse on a free port with the demo child and waits until it answers.
fn bridge(bin: &str, flags: &[&str]) -> Bridge {
    let port = free_port();
    let level = std::env::var("BENCH_SERVER_LOG_LEVEL").unwrap_or_else(|_| "warn".into());
    let child = Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--log-level",
            &level,
            "--access-log=false",
        ])
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // BENCH_SERVER_LOG=FILE keeps stdio-sse's log (when a run fails).
        .stderr(
            std::env::var_os("BENCH_SERVER_LOG")
                .and_then(|f| std::fs::File::create(f).ok())
                .map_or_else(Stdio::null, Stdio::from),
        )
        .spawn()
        .expect("start stdio-sse");
    let b = Bridge::new(child, port);
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "stdio-sse did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    b
}

/// A Streamable HTTP session: initialize and initialized; returns its id.
fn open_session(port: u16) -> String {
    let mut c = Conn::at(port);
    let r = c.initialize();
    assert_eq!(r.status, 200, "initialize");
    let sid = r.header("Mcp-Session-Id").expect("session id").to_string();
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
    let r = c.post_mcp(&sid, note.as_bytes());
    assert_eq!(r.status, 202);
    sid
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    field(&status, "VmRSS:")
}

fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    field(&status, "Threads:")
}

fn field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---- load ------------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct Load {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs `workers` closed loops for `secs`; each iteration is one checked round trip.
fn closed_loop<F>(workers: usize, secs: Duration, make: impl Fn(usize) -> F) -> Load
where
    F: FnMut(u64) + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let ready = Arc::new(std::sync::Barrier::new(workers + 1));
    for w in 0..workers {
        let mut one = make(w);
        let stop = stop.clone();
        let ready = ready.clone();
        handles.push(std::thread::spawn(move || {
            let mut lat = Vec::with_capacity(1 << 16);
            ready.wait();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let t = Instant::now();
                one(((w as u64) << 40) | n);
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    ready.wait();
    let started = Instant::now();
    std::thread::sleep(secs);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u32> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("worker"))
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64;
    Load {
        rps: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// Streamable HTTP: every worker on its own keep-alive connection, all on `sessions`.
fn streamable_load(port: u16, sessions: &[String], workers: usize, secs: Duration) -> Load {
    closed_loop(workers, secs, |w| {
        let sid = sessions[w % sessions.len()].clone();
        let mut c = Conn::at(port);
        move |id| {
            let msg = format!("m{id}");
            let body = call(id, &msg).to_string();
            let r = c.post_mcp(&sid, body.as_bytes());
            assert_eq!(r.status, 200);
            let m = r.messages();
            check_echo(m.last().expect("a reply"), id, &msg);
        }
    })
}

/// Issue 18: a --config file of `n` demo servers (s0, s1, ...), session mode.
fn servers_file(bin: &str, n: usize) -> std::path::PathBuf {
    let servers: serde_json::Map<String, Value> = (0..n)
        .map(|i| {
            (
                format!("s{i}"),
                json!({"command": bin, "args": ["__demo-server"]}),
            )
        })
        .collect();
    let path =
        std::env::temp_dir().join(format!("stdio-sse-bench-{}-{n}.json", std::process::id()));
    std::fs::write(&path, json!({ "mcpServers": servers }).to_string()).expect("write config");
    path
}

/// Streamable HTTP on one session of an MCP endpoint, calling `tool` (echo by its name
/// there): a server's own endpoint against the merged one.
fn endpoint_load(
    port: u16,
    path: &'static str,
    tool: &'static str,
    workers: usize,
    secs: Duration,
) -> Load {
    let mut c = Conn::at(port);
    let r = c.initialize_at(path);
    assert_eq!(r.status, 200, "initialize on {path}");
    let sid = r.header("Mcp-Session-Id").expect("session id").to_string();
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
    assert_eq!(c.post_at(path, &sid, note.as_bytes()).status, 202);
    closed_loop(workers, secs, |_| {
        let sid = sid.clone();
        let mut c = Conn::at(port);
        move |id| {
            let msg = format!("m{id}");
            let body = call_tool(tool, id, &msg).to_string();
            let r = c.post_at(path, &sid, body.as_bytes());
            assert_eq!(r.status, 200);
            let m = r.messages();
            check_echo(m.last().expect("a reply"), id, &msg);
        }
    })
}

/// 2026-07-28: every worker on its own keep-alive connection, no session: each request
/// carries the envelope and the mirrored headers, as the SDKs' modern clients send it.
fn modern_load(port: u16, workers: usize, secs: Duration) -> Load {
    closed_loop(workers, secs, |_| {
        let mut c = Conn::at(port);
        move |id| {
            let msg = format!("m{id}");
            let r = modern_call(&mut c, id, &msg);
            assert_eq!(r.status, 200, "{}", r.text());
            let m = r.messages();
            check_echo(m.last().expect("a reply"), id, &msg);
        }
    })
}

/// One 2026-07-28 `tools/call` of echo: the envelope and the mirrored headers.
fn modern_call(c: &mut Conn, id: u64, msg: &str) -> Reply {
    let mut body = call(id, msg);
    body["params"]["_meta"] = serde_json::json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}});
    c.request(
        "POST",
        "/mcp",
        &[
            ("Content-Type", "application/json"),
            ("Accept", ACCEPT_BOTH),
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Mcp-Method", "tools/call"),
            ("Mcp-Name", "echo"),
        ],
        body.to_string().as_bytes(),
    )
}

/// Which protocol era a measured round trip speaks.
#[derive(Clone, Copy, PartialEq)]
enum Era {
    /// A 2025 session's tools/call.
    Sessions,
    /// A 2026-07-28 tools/call (a carrier's child).
    Modern,
    /// Issue 18: a 2025 session on a --config server's own endpoint, /servers/s0/mcp.
    OwnEndpoint,
    /// ... and through the merged endpoint, /mcp, the same server's `s0__echo`.
    MergedEndpoint,
}

type Waiters = Arc<Mutex<HashMap<u64, crossbeam_channel::Sender<Value>>>>;

/// Legacy SSE: one stream per session; POSTs on their own connections, answers routed
/// back to each waiting worker by id.
fn legacy_load(port: u16, workers: usize, secs: Duration) -> Load {
    let mut stream = Conn::at(port);
    stream.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
    let (status, _) = stream.head();
    assert_eq!(status, 200);
    let waiters: Waiters = Arc::default();
    let (endpoint_tx, endpoint_rx) = crossbeam_channel::bounded::<String>(1);
    let routes = waiters.clone();
    std::thread::spawn(move || {
        let mut pending = String::new();
        while let Some(chunk) = stream.chunk() {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = pending.find("\n\n") {
                let block: String = pending.drain(..i + 2).collect();
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                if block.contains("event: endpoint") {
                    let _ = endpoint_tx.send(data.unwrap_or("").to_string());
                } else if let Some(v) = data.and_then(|d| serde_json::from_str::<Value>(d).ok()) {
                    if let Some(tx) = v["id"]
                        .as_u64()
                        .and_then(|id| routes.lock().unwrap().remove(&id))
                    {
                        let _ = tx.send(v);
                    }
                }
            }
        }
    });
    let endpoint = endpoint_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("endpoint");
    let mut c = Conn::at(port);
    let post = |c: &mut Conn, body: &Value| {
        let r = c.request(
            "POST",
            &endpoint,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 202);
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    waiters.lock().unwrap().insert(0, tx);
    post(
        &mut c,
        &serde_json::from_str(&wire::init_body("2025-11-25")).unwrap(),
    );
    rx.recv_timeout(Duration::from_secs(5))
        .expect("initialize answer");
    post(
        &mut c,
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    closed_loop(workers, secs, |_| {
        let mut c = Conn::at(port);
        let endpoint = endpoint.clone();
        let waiters = waiters.clone();
        move |id| {
            let msg = format!("m{id}");
            let (tx, rx) = crossbeam_channel::bounded(1);
            waiters.lock().unwrap().insert(id, tx);
            let r = c.request(
                "POST",
                &endpoint,
                &[("Content-Type", "application/json")],
                call(id, &msg).to_string().as_bytes(),
            );
            assert_eq!(r.status, 202);
            let v = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("answer on the stream");
            check_echo(&v, id, &msg);
        }
    })
}

/// The limit: the same child on a pipe, no HTTP. Writers share stdin; one reader routes
/// answers by id.
fn pipe_load(bin: &str, workers: usize, secs: Duration) -> Load {
    let mut child = Command::new(bin)
        .arg("__demo-server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("demo child");
    let stdin = Arc::new(Mutex::new(child.stdin.take().unwrap()));
    let stdout = child.stdout.take().unwrap();
    let waiters: Waiters = Arc::default();
    let routes = waiters.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).expect("child JSON");
            if let Some(tx) = v["id"]
                .as_u64()
                .and_then(|id| routes.lock().unwrap().remove(&id))
            {
                let _ = tx.send(v);
            }
        }
    });
    let load = closed_loop(workers, secs, |_| {
        let stdin = stdin.clone();
        let waiters = waiters.clone();
        move |id| {
            let msg = format!("m{id}");
            let (tx, rx) = crossbeam_channel::bounded(1);
            waiters.lock().unwrap().insert(id, tx);
            let mut line = call(id, &msg).to_string();
            line.push('\n');
            stdin.lock().unwrap().write_all(line.as_bytes()).unwrap();
            check_echo(&rx.recv().expect("answer"), id, &msg);
        }
    });
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    load
}

/// One-shot: a child per request, its answer streamed back.
fn oneshot_load(port: u16, workers: usize, secs: Duration) -> Load {
    closed_loop(workers, secs, |_| {
        let mut c = Conn::at(port);
        move |id| {
            let msg = format!("m{id}");
            let r = c.request(
                "POST",
                "/mcp",
                &[
                    ("Content-Type", "application/json"),
                    ("Accept", "text/event-stream"),
                ],
                call(id, &msg).to_string().as_bytes(),
            );
            assert_eq!(r.status, 200);
            check_echo(r.messages().last().expect("a reply"), id, &msg);
        }
    })
}

/// Exec until an initialize is answered.
fn startup(bin: &str) -> Duration {
    let port = free_port();
    let t = Instant::now();
    let mut child = Command::new(bin)
        .args(["--port", &port.to_string(), "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let took = loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_nodelay(true);
            let mut c = Conn::from_stream(s, &format!("127.0.0.1:{port}"));
            let r = c.initialize();
            assert_eq!(r.status, 200);
            break t.elapsed();
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    took
}

fn big_round_trip(port: u16) -> Duration {
    let sid = open_session(port);
    let msg = "x".repeat(5 << 20);
    let mut c = Conn::at(port);
    let t = Instant::now();
    let r = c.post_mcp(&sid, call(1, &msg).to_string().as_bytes());
    let took = t.elapsed();
    check_echo(r.messages().last().expect("reply"), 1, &msg);
    took
}

/// What the idle-stream run found.
struct Idle {
    rss_kib: u64,
    threads: u64,
    held: usize,
    /// From the `broadcast` call until the last held stream had its notification.
    broadcast: Option<Duration>,
}

/// Waits (one thread, poll) until every stream has carried `needle`.
fn all_receive(streams: &mut [BufReader<TcpStream>], needle: &[u8], within: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut done: Vec<bool> = streams
        .iter()
        .map(|r| r.buffer().windows(needle.len()).any(|w| w == needle))
        .collect();
    let mut tails: Vec<Vec<u8>> = vec![Vec::new(); streams.len()];
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while done.iter().any(|d| !d) {
        if Instant::now() > end {
            return false;
        }
        let waiting: Vec<usize> = (0..streams.len()).filter(|i| !done[*i]).collect();
        let mut fds: Vec<libc::pollfd> = waiting
            .iter()
            .map(|i| libc::pollfd {
                fd: streams[*i].get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) } <= 0 {
            continue;
        }
        for (k, p) in fds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            let i = waiting[k];
            let n =
                unsafe { libc::recv(p.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                return false;
            }
            let t = &mut tails[i];
            t.extend_from_slice(&buf[..n as usize]);
            if t.windows(needle.len()).any(|w| w == needle) {
                done[i] = true;
            }
            let keep = t.len().saturating_sub(needle.len());
            t.drain(..keep);
        }
    }
    true
}

/// N legacy streams held open on one shared child: RSS and threads of stdio-sse, how
/// many streams it actually held (fewer when a limit of this machine stops it first),
/// and how long a server-wide notification takes to reach every one of them.
fn idle_streams(bin: &str, wanted: usize) -> Idle {
    // stdio-sse holds two descriptors per stream (the writer's and the watcher's): stay
    // under its open-files limit so the broadcast's own session can still connect.
    let hard = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_max as usize
    };
    let n = wanted.min(hard.saturating_sub(256) / 2);
    if n < wanted {
        eprintln!("bench: {wanted} streams need more than the open-files limit ({hard}) allows; holding {n}");
    }
    let cap = (n + 64).to_string();
    let b = bridge(
        bin,
        &[
            "--mode",
            "shared",
            "--max-connections",
            &cap,
            "--max-sessions",
            &cap,
        ],
    );
    let mut held = Vec::with_capacity(n);
    // A legacy stream becomes a session with its first message: each gets initialize.
    let mut poster = Conn::at(b.port);
    for i in 0..n {
        // Fallible all the way: the release profile aborts on panic.
        let opened = (|| {
            let sock = TcpStream::connect(("127.0.0.1", b.port)).ok()?;
            let mut r = BufReader::new(sock);
            r.get_mut()
                .write_all(
                    b"GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
                )
                .ok()?;
            let mut line = String::new();
            r.read_line(&mut line).ok()?;
            if !line.starts_with("HTTP/1.1 200") {
                return None;
            }
            let endpoint = loop {
                line.clear();
                if r.read_line(&mut line).ok()? == 0 {
                    return None;
                }
                if let Some(e) = line.trim().strip_prefix("data: ") {
                    break e.to_string();
                }
            };
            let body = wire::init_body("2024-11-05");
            let posted = poster.request(
                "POST",
                &endpoint,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            );
            (posted.status == 202).then_some(r)
        })();
        match opened {
            Some(c) => held.push(c),
            None => {
                eprintln!(
                    "bench: stream {} of {n} could not be opened; stopping there",
                    i + 1
                );
                break;
            }
        }
    }
    let (rss, thr) = (rss_kib(b.child.id()), threads(b.child.id()));
    if held.len() < n {
        // stdio-sse ran into a limit of this machine (a thread's stack and guard are
        // memory maps: vm.max_map_count); a new session could not connect either.
        eprintln!("bench: no broadcast figure for {n} streams: stdio-sse is at a limit");
        return Idle {
            rss_kib: rss,
            threads: thr,
            held: held.len(),
            broadcast: None,
        };
    }
    let sid = open_session(b.port);
    let mut c = Conn::at(b.port);
    let t = Instant::now();
    let r = c.post_mcp(
        &sid,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "broadcast", "arguments": {}}})
        .to_string()
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    let broadcast =
        all_receive(&mut held, b"tools/list_changed", Duration::from_secs(30)).then(|| t.elapsed());
    Idle {
        rss_kib: rss,
        threads: thr,
        held: held.len(),
        broadcast,
    }
}

/// A peer (supergateway, mcp-proxy) wrapping the same demo child, in its own process
/// group so that it and whatever it spawned end together.
struct Peer {
    name: &'static str,
    argv: Vec<String>,
    /// Legacy SSE (/sse + /message) rather than Streamable HTTP.
    legacy: bool,
}

/// Installs the peers from npm (pinned) into `.cache/peers`; None when npm fails.
fn install_peers(bin: &str) -> Option<Vec<Peer>> {
    let dir = std::fs::canonicalize(".").ok()?.join(".cache/peers");
    let bins = dir.join("node_modules/.bin");
    if !bins.join("supergateway").exists() || !bins.join("mcp-proxy").exists() {
        eprintln!(
            "bench: installing supergateway and mcp-proxy into {}",
            dir.display()
        );
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .args(["supergateway@4.0.0", "mcp-proxy@6.7.19"])
            .stdout(Stdio::null())
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
    }
    let sg = bins.join("supergateway").display().to_string();
    let mp = bins.join("mcp-proxy").display().to_string();
    let child = format!("{bin} __demo-server");
    let supergateway = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![sg.clone(), "--stdio".into(), child.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(["--logLevel".into(), "none".into(), "--port".into()]);
        v
    };
    Some(vec![
        Peer {
            name: "supergateway 4.0 --stateful (Streamable HTTP)",
            argv: supergateway(&["--outputTransport", "streamableHttp", "--stateful"]),
            legacy: false,
        },
        Peer {
            name: "supergateway 4.0 SSE (shared child)",
            argv: supergateway(&["--outputTransport", "sse"]),
            legacy: true,
        },
        Peer {
            name: "mcp-proxy npm 6.7 (Streamable HTTP)",
            argv: vec![mp, "--host".into(), "127.0.0.1".into(), "--port".into()],
            legacy: false,
        },
    ])
}

/// Starts a peer on `port` (its argv ends with the port flag; mcp-proxy's command
/// follows it): the process, and how long until an initialize was answered.
fn start_peer(peer: &Peer, bin: &str, port: u16) -> Option<(Bridge, Duration)> {
    use std::os::unix::process::CommandExt;
    let mut argv = peer.argv.clone();
    argv.push(port.to_string());
    if peer.name.starts_with("mcp-proxy") {
        argv.extend(["--".into(), bin.into(), "__demo-server".into()]);
    }
    let t = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let b = Bridge::new(child, port);
    let end = t + Duration::from_secs(30);
    loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            let mut c = Conn::from_stream(s, &format!("127.0.0.1:{port}"));
            if peer.legacy {
                c.send("GET", "/sse", &[("Accept", "text/event-stream")], b"");
                if c.head().0 == 200 {
                    return Some((b, t.elapsed()));
                }
            } else if c.initialize().status == 200 {
                return Some((b, t.elapsed()));
            }
        }
        if Instant::now() > end {
            eprintln!("bench: {} did not answer within 30 s", peer.name);
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One peer's figures: startup ms, idle RSS KiB, c=1 p50 µs, c=1 req/s, c=64 req/s.
fn measure_peer(peer: &Peer, bin: &str, secs: Duration) -> Option<[f64; 5]> {
    let port = free_port();
    let (b, took) = start_peer(peer, bin, port)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(b.child.id()) as f64;
    let run = |c: usize| {
        if peer.legacy {
            legacy_load(port, c, secs)
        } else {
            let sid = open_session(port);
            streamable_load(port, std::slice::from_ref(&sid), c, secs)
        }
    };
    let one = run(1);
    let many = run(64);
    Some([took.as_secs_f64() * 1e3, rss, one.p50_us, one.rps, many.rps])
}

/// Memory under a long load: c=64 on one session for `total`, RSS sampled every
/// `SOAK_STEP`. Returns (RSS after the first minute, highest, last, req/s overall).
fn soak(bin: &str, total: Duration) -> (u64, u64, u64, f64) {
    const SOAK_STEP: Duration = Duration::from_secs(10);
    let b = bridge(bin, &[]);
    let sid = open_session(b.port);
    let started = Instant::now();
    let (mut warm, mut high, mut last, mut done) = (0, 0, 0, 0.0);
    while started.elapsed() < total {
        let l = streamable_load(b.port, std::slice::from_ref(&sid), 64, SOAK_STEP);
        done += l.rps * SOAK_STEP.as_secs_f64();
        last = rss_kib(b.child.id());
        high = high.max(last);
        if warm == 0 && started.elapsed() >= Duration::from_secs(60) {
            warm = last;
        }
        eprintln!(
            "bench: soak {:>4.0} s: {:>6.0} req/s, RSS {last} KiB",
            started.elapsed().as_secs_f64(),
            l.rps
        );
    }
    (
        warm.max(1),
        high,
        last,
        done / started.elapsed().as_secs_f64(),
    )
}

/// Instructions stdio-sse executes per round trip (callgrind: the same count on a busy
/// machine), from two runs that differ only in the number of round trips.
fn instructions_per_round_trip(bin: &str, era: Era) -> Option<f64> {
    let (path, tool) = match era {
        Era::OwnEndpoint => ("/servers/s0/mcp", "echo"),
        Era::MergedEndpoint => ("/mcp", "s0__echo"),
        Era::Sessions | Era::Modern => ("/mcp", "echo"),
    };
    let file = matches!(era, Era::OwnEndpoint | Era::MergedEndpoint).then(|| servers_file(bin, 2));
    let config: Vec<String> = match &file {
        Some(f) => vec!["--config".into(), f.display().to_string()],
        None => Vec::new(),
    };
    let total = |n: u64| -> Option<f64> {
        let port = free_port();
        // `%p`: processes stdio-sse forks (its guardian) write their own counts, which
        // must not overwrite the server's.
        let out = |pid: &str| std::env::temp_dir().join(format!("bench-callgrind-{port}.{pid}"));
        let mut child = Command::new("valgrind")
            .args([
                "--tool=callgrind",
                &format!("--callgrind-out-file={}", out("%p").display()),
            ])
            .arg(bin)
            .args([
                "--port",
                &port.to_string(),
                "--log-level",
                "warn",
                "--access-log=false",
            ])
            .args(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let end = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > end {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut c = Conn::at(port);
        let r = c.initialize_at(path);
        let sid = r.header("Mcp-Session-Id")?.to_string();
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
        c.post_at(path, &sid, note.as_bytes());
        for id in 1..=n {
            let msg = format!("m{id}");
            let r = match era {
                Era::Modern => modern_call(&mut c, id, &msg),
                _ => c.post_at(path, &sid, call_tool(tool, id, &msg).to_string().as_bytes()),
            };
            check_echo(r.messages().last()?, id, &msg);
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        let text = std::fs::read_to_string(out(&child.id().to_string())).ok();
        let prefix = format!("bench-callgrind-{port}.");
        for e in std::fs::read_dir(std::env::temp_dir()).ok()?.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let text = text?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix("summary: ")
                    .or_else(|| l.strip_prefix("totals: "))
            })
            .and_then(|v| v.trim().parse().ok())
    };
    let (small, large) = (100, 1100);
    let per = (|| Some((total(large)? - total(small)?) / (large - small) as f64))();
    if let Some(f) = file {
        let _ = std::fs::remove_file(f);
    }
    per
}

// ---- the run ---------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .map(|t| field(&t, "MemTotal:") / 1024 / 1024)
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {}", kernel.trim())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let bin = opt("--bin").unwrap_or_else(|| "dist/stdio-sse".into());
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        for pid in STARTED.lock().map(|v| v.clone()).unwrap_or_default() {
            stop_group_or_process(pid, libc::SIGKILL);
        }
        default_hook(info);
    }));
    let quick = args.iter().any(|a| a == "--quick");
    // --only pipe,streamable,modern,sessions,many,legacy,shared,oneshot,big,streams,callgrind: a
    // subset of the scenarios (while working on one figure); all by default.
    let only = opt("--only");
    let want = |group: &str| {
        only.as_deref()
            .map_or(true, |o| o.split(',').any(|g| g == group))
    };
    let rounds: usize = opt("--rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 5 });
    let secs = Duration::from_secs_f64(
        opt("--seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 0.5 } else { 2.0 }),
    );
    let bin = std::fs::canonicalize(&bin)
        .unwrap_or_else(|_| panic!("no binary at {bin} (./build.sh makes it)"))
        .display()
        .to_string();
    // Many sockets for the idle-stream runs.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }

    let mut rows: Vec<(String, &'static str, Vec<f64>)> = Vec::new();
    let mut record = |name: String, unit: &'static str, v: f64| match rows
        .iter_mut()
        .find(|(n, _, _)| *n == name)
    {
        Some((_, _, vals)) => vals.push(v),
        None => rows.push((name, unit, vec![v])),
    };
    for round in 0..rounds {
        eprintln!("bench: round {} of {rounds}", round + 1);
        if want("startup") {
            record(
                "startup (exec to initialize answered)".into(),
                "ms",
                startup(&bin).as_secs_f64() * 1e3,
            );
        }
        for c in [1usize, 8, 64].into_iter().filter(|_| want("pipe")) {
            let l = pipe_load(&bin, c, secs);
            record(format!("direct pipe c={c} req/s"), "req/s", l.rps);
            if c == 1 {
                record("direct pipe c=1 p50".into(), "µs", l.p50_us);
            }
        }
        if want("streamable") {
            let b = bridge(&bin, &[]);
            std::thread::sleep(Duration::from_millis(200));
            record("idle RSS".into(), "KiB", rss_kib(b.child.id()) as f64);
            let sid = open_session(b.port);
            for c in [1usize, 8, 64] {
                let l = streamable_load(b.port, std::slice::from_ref(&sid), c, secs);
                record(format!("streamable c={c} req/s"), "req/s", l.rps);
                record(format!("streamable c={c} p50"), "µs", l.p50_us);
                record(format!("streamable c={c} p99"), "µs", l.p99_us);
            }
        }
        if want("modern") {
            // A child of its own per call in flight (session mode's carriers), warmed by
            // a first run so no call waits for a spawn.
            let b = bridge(&bin, &["--modern-pool", "64", "--max-sessions", "200"]);
            let _ = modern_load(b.port, 64, Duration::from_millis(300));
            for c in [1usize, 64] {
                let l = modern_load(b.port, c, secs);
                record(format!("2026-07-28 c={c} req/s"), "req/s", l.rps);
                record(format!("2026-07-28 c={c} p50"), "µs", l.p50_us);
            }
            // The 2025 load with as many children: 64 sessions, a child each.
            let sessions: Vec<String> = (0..64).map(|_| open_session(b.port)).collect();
            let l = streamable_load(b.port, &sessions, 64, secs);
            record(
                "64 sessions (own child each) c=64 req/s".into(),
                "req/s",
                l.rps,
            );
            record(
                "64 sessions (own child each) c=64 p50".into(),
                "µs",
                l.p50_us,
            );
            drop(b);
            let b = bridge(&bin, &["--mode", "shared"]);
            let l = modern_load(b.port, 1, secs);
            record("2026-07-28 shared c=1 p50".into(), "µs", l.p50_us);
            let l = modern_load(b.port, 64, secs);
            record("2026-07-28 shared c=64 req/s".into(), "req/s", l.rps);
        }
        if want("sessions") {
            let b = bridge(&bin, &[]);
            let sessions: Vec<String> = (0..32).map(|_| open_session(b.port)).collect();
            let l = streamable_load(b.port, &sessions, 32, secs);
            record("32 sessions (own child each) req/s".into(), "req/s", l.rps);
            record(
                "32 sessions RSS of stdio-sse".into(),
                "KiB",
                rss_kib(b.child.id()) as f64,
            );
        }
        if want("many") {
            // Issue 18: what ten configured servers cost idle (none started: session
            // mode starts children per session), and a call through the merged
            // endpoint against the same server's own endpoint, in one process.
            for n in [1usize, 10] {
                let file = servers_file(&bin, n);
                let b = bridge(&bin, &["--config", file.to_str().unwrap()]);
                std::thread::sleep(Duration::from_millis(200));
                record(
                    format!("--config with {n} server(s): idle RSS"),
                    "KiB",
                    rss_kib(b.child.id()) as f64,
                );
                drop(b);
                let _ = std::fs::remove_file(file);
            }
            let file = servers_file(&bin, 2);
            let b = bridge(&bin, &["--config", file.to_str().unwrap()]);
            for (what, path, tool) in [
                ("own endpoint", "/servers/s0/mcp", "echo"),
                ("merged endpoint", "/mcp", "s0__echo"),
            ] {
                let l = endpoint_load(b.port, path, tool, 1, secs);
                record(format!("{what} c=1 p50"), "µs", l.p50_us);
                let l = endpoint_load(b.port, path, tool, 8, secs);
                record(format!("{what} c=8 req/s"), "req/s", l.rps);
            }
            drop(b);
            let _ = std::fs::remove_file(file);
        }
        if want("legacy") {
            let b = bridge(&bin, &[]);
            for c in [1usize, 64] {
                let l = legacy_load(b.port, c, secs);
                record(format!("legacy SSE c={c} req/s"), "req/s", l.rps);
                record(format!("legacy SSE c={c} p50"), "µs", l.p50_us);
            }
        }
        if want("shared") {
            let b = bridge(&bin, &["--mode", "shared"]);
            let sessions: Vec<String> = (0..8).map(|_| open_session(b.port)).collect();
            let l = streamable_load(b.port, &sessions[..1], 1, secs);
            record("shared c=1 p50".into(), "µs", l.p50_us);
            let l = streamable_load(b.port, &sessions, 64, secs);
            record("shared 8 sessions c=64 req/s".into(), "req/s", l.rps);
        }
        if want("oneshot") {
            let b = bridge(&bin, &["--mode", "oneshot"]);
            let l = oneshot_load(b.port, 8, secs);
            record("one-shot c=8 req/s".into(), "req/s", l.rps);
        }
        if want("big") {
            let b = bridge(&bin, &["--max-body", "16MiB"]);
            record(
                "5 MiB tool result round trip".into(),
                "ms",
                big_round_trip(b.port).as_secs_f64() * 1e3,
            );
        }
    }
    let streams = match (want("streams"), quick) {
        (false, _) => vec![],
        (true, true) => vec![1000],
        (true, false) => vec![1000, 10_000],
    };
    for n in streams {
        let idle = idle_streams(&bin, n);
        let (rss, thr, held) = (idle.rss_kib, idle.threads, idle.held);
        match idle.broadcast {
            Some(d) => record(
                format!("{n} idle SSE streams: broadcast reached all"),
                "ms",
                d.as_secs_f64() * 1e3,
            ),
            None => eprintln!("bench: no broadcast figure for {held} streams"),
        }
        record(
            format!("{n} idle SSE streams: streams held"),
            "",
            held as f64,
        );
        record(
            format!("{n} idle SSE streams, shared child: RSS"),
            "KiB",
            rss as f64,
        );
        record(format!("{n} idle SSE streams: threads"), "", thr as f64);
    }
    if !quick && want("callgrind") {
        match instructions_per_round_trip(&bin, Era::Sessions) {
            Some(i) => record("instructions per round trip (callgrind)".into(), "", i),
            None => eprintln!("bench: valgrind not available; no instruction count"),
        }
        if let Some(i) = instructions_per_round_trip(&bin, Era::Modern) {
            record(
                "instructions per 2026-07-28 round trip (callgrind)".into(),
                "",
                i,
            );
        }
        for (era, what) in [
            (Era::OwnEndpoint, "a --config server's own endpoint"),
            (Era::MergedEndpoint, "the merged endpoint, same server"),
        ] {
            if let Some(i) = instructions_per_round_trip(&bin, era) {
                record(
                    format!("instructions per round trip, {what} (callgrind)"),
                    "",
                    i,
                );
            }
        }
    }
    // --soak SECS: the memory-flatness run (the budget says 600 s), on its own.
    if let Some(secs) = opt("--soak").and_then(|v| v.parse::<u64>().ok()) {
        let (warm, high, last, rps) = soak(&bin, Duration::from_secs(secs));
        record(format!("soak c=64 {secs} s: req/s"), "req/s", rps);
        record(
            "soak: RSS after the first minute".into(),
            "KiB",
            warm as f64,
        );
        record("soak: highest RSS".into(), "KiB", high as f64);
        record("soak: RSS at the end".into(), "KiB", last as f64);
        record(
            "soak: RSS growth, end against the first minute".into(),
            "%",
            (last as f64 / warm as f64 - 1.0) * 100.0,
        );
    }
    // --peers: the same figures for supergateway and mcp-proxy (from npm), same child.
    const PEER_FIGURES: [(&str, &str); 5] = [
        ("startup (exec to initialize answered)", "ms"),
        ("idle RSS", "KiB"),
        ("streamable c=1 p50", "µs"),
        ("streamable c=1 req/s", "req/s"),
        ("streamable c=64 req/s", "req/s"),
    ];
    let mut peer_rows: Vec<(&'static str, [f64; 5])> = Vec::new();
    if args.iter().any(|a| a == "--peers") {
        match install_peers(&bin) {
            Some(peers) => {
                for peer in &peers {
                    let runs: Vec<[f64; 5]> = (0..rounds)
                        .filter_map(|_| measure_peer(peer, &bin, secs))
                        .collect();
                    if runs.is_empty() {
                        continue;
                    }
                    let m: Vec<f64> = (0..5)
                        .map(|i| median(runs.iter().map(|r| r[i]).collect()))
                        .collect();
                    peer_rows.push((peer.name, [m[0], m[1], m[2], m[3], m[4]]));
                }
            }
            None => eprintln!("bench: npm could not install the peers; no peer figures"),
        }
    }
    // The best peer per figure: least time and memory, most requests per second.
    let best_peer = |name: &str| -> Option<f64> {
        let i = PEER_FIGURES.iter().position(|(n, _)| *n == name)?;
        let vals = peer_rows.iter().map(|(_, v)| v[i]);
        if name.ends_with("req/s") {
            vals.reduce(f64::max)
        } else {
            vals.reduce(f64::min)
        }
    };
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);

    let value = |name: &str| {
        rows.iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| median(v.clone()))
    };
    println!("machine: {}", machine());
    println!("binary: {bin}, {size} bytes; medians of {rounds} rounds of {secs:?} per load\n");
    println!("| figure | stdio-sse | unit | vs direct pipe | vs best peer |");
    println!("|---|---|---|---|---|");
    for (name, unit, vals) in &rows {
        let m = median(vals.clone());
        let pipe_name = if name.ends_with("req/s") {
            name.split(' ')
                .find(|w| w.starts_with("c="))
                .map(|c| format!("direct pipe {c} req/s"))
        } else if name.ends_with("c=1 p50") {
            Some("direct pipe c=1 p50".to_string())
        } else {
            None
        };
        let ratio = pipe_name
            .filter(|p| p != name)
            .and_then(|p| value(&p))
            .map(|p| format!("{:.2}x", m / p))
            .unwrap_or_default();
        let shown = if m >= 100.0 {
            format!("{m:.0}")
        } else {
            format!("{m:.2}")
        };
        let vs_peer = best_peer(name)
            .map(|p| match m / p {
                r if r < 0.1 => format!("{r:.3}x"),
                r => format!("{r:.2}x"),
            })
            .unwrap_or_default();
        println!("| {name} | {shown} | {unit} | {ratio} | {vs_peer} |");
    }
    if !peer_rows.is_empty() {
        println!("\nPeers, same child, same load (medians of {rounds} rounds):\n");
        print!("| peer |");
        for (n, u) in PEER_FIGURES {
            print!(" {} ({u}) |", n.trim_start_matches("streamable "));
        }
        println!("\n|---|---|---|---|---|---|");
        for (name, v) in &peer_rows {
            println!(
                "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                v[0], v[1], v[2], v[3], v[4]
            );
        }
    }
}
