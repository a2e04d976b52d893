//! What tests/fuzz.rs and tests/chaos.rs share: the run's knobs and seed, a small seeded
//! PRNG, a stdio-sse launcher that keeps only a bounded tail of its log (a long run makes
//! millions of lines), /proc bookkeeping (threads, descriptors, children, RSS, zombies,
//! marked orphans), an HTTP/1.1 client whose every wait has a deadline, and MCP clients of
//! both transports whose calls end in a `Verdict`: answered with the call's own payload,
//! refused with a clear error, failed (hang, or an answer that is no answer), or crossed
//! (another call's payload: the one thing a bridge must never do).
//!
//! Self-contained on purpose (it does not use tests/common): a long run must not keep every
//! log line, and these runs should not break when the everyday harness changes.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_stdio-sse");
/// Every payload a test sends starts with this; the client's own ones with its `owner`.
pub const PAYLOAD_PREFIX: &str = "pl-";
/// The name stdio-sse gives its guardian process (not a child of the command).
pub const GUARDIAN_NAME: &str = "stdio-sse-guard";

pub fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

// ---- knobs -------------------------------------------------------------------------------

/// STDIO_SSE_FUZZ_SKIP=1 (any value but empty or 0) skips the long runs.
pub fn skipped(what: &str) -> bool {
    let skip = std::env::var("STDIO_SSE_FUZZ_SKIP").is_ok_and(|v| !v.is_empty() && v != "0");
    if skip {
        eprintln!("{what}: skipped (STDIO_SSE_FUZZ_SKIP is set)");
    }
    skip
}

/// How long the storm part of a run lasts: STDIO_SSE_FUZZ_SECONDS, else `default`.
pub fn run_length(what: &str, default: f64) -> Duration {
    let secs = match std::env::var("STDIO_SSE_FUZZ_SECONDS") {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or_else(|| panic!("STDIO_SSE_FUZZ_SECONDS={v:?} is not a positive number")),
        Err(_) => default,
    };
    eprintln!("{what}: running {secs} s (STDIO_SSE_FUZZ_SECONDS)");
    Duration::from_secs_f64(secs)
}

/// The run's seed: STDIO_SSE_FUZZ_SEED (decimal or 0x hex), else from the clock. Printed
/// first, so a failing run can be replayed (as far as thread timing allows).
pub fn seed(what: &str) -> u64 {
    let seed = match std::env::var("STDIO_SSE_FUZZ_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            };
            parsed.unwrap_or_else(|| panic!("STDIO_SSE_FUZZ_SEED={v:?} is not a u64"))
        }
        Err(_) => {
            let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    };
    eprintln!("{what}: seed {seed} (replay with STDIO_SSE_FUZZ_SEED={seed})");
    seed
}

// ---- a seeded PRNG (splitmix64) ----------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// 0..n (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    /// lo..hi (lo when the range is empty).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi.saturating_sub(lo))
    }
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    pub fn weighted<T: Copy>(&mut self, v: &[(T, u32)]) -> T {
        let total: u32 = v.iter().map(|(_, w)| w).sum();
        let mut at = self.below(total as usize) as u32;
        for (t, w) in v {
            if at < *w {
                return *t;
            }
            at -= w;
        }
        v[v.len() - 1].0
    }
    /// An independent stream for another thread.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_micros() as usize;
        lo + Duration::from_micros(self.below(span.max(1)) as u64)
    }
}

// ---- the server under test ---------------------------------------------------------------

#[derive(Default)]
struct LogState {
    tail: VecDeque<String>,
    /// Lines that fail a run by themselves: panics, and a child saying the bridge wrote it
    /// something that is not JSON.
    notable: Vec<String>,
    lines: u64,
    events: BTreeMap<String, u64>,
    listening: Option<String>,
    closed: bool,
}

const TAIL_LINES: usize = 400;

/// A line that is a finding on its own.
fn is_notable(line: &str) -> bool {
    line.contains("\"event\":\"panic\"")
        || line.contains("panicked")
        || line.contains("BRIDGE SENT NON-JSON")
}

fn event_of(line: &str) -> Option<&str> {
    let at = line.find("\"event\":\"")? + 9;
    let rest = &line[at..];
    Some(&rest[..rest.find('"')?])
}

/// A running stdio-sse (JSON log). Dropping it stops the process (only the one we started).
pub struct Srv {
    pub name: String,
    pub child: Child,
    pub port: u16,
    log: Arc<(Mutex<LogState>, Condvar)>,
}

impl Srv {
    pub fn start(name: &str, flags: &[&str], command: &[String], env: &[(&str, &str)]) -> Srv {
        let mut cmd = Command::new(BIN);
        cmd.args(["--port", "0", "--host", "127.0.0.1", "--log-format", "json"])
            .args(flags);
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
        let echo = std::env::var_os("STDIO_SSE_TEST_LOG").is_some();
        let tag = name.to_string();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match r.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                if echo {
                    eprintln!("[{tag}] {line}");
                }
                let mut st = sink.0.lock().unwrap_or_else(|e| e.into_inner());
                st.lines += 1;
                if let Some(ev) = event_of(&line) {
                    *st.events.entry(ev.to_string()).or_default() += 1;
                }
                if st.listening.is_none() && line.contains("listening on http://") {
                    st.listening = Some(line.clone());
                }
                if is_notable(&line) && st.notable.len() < 200 {
                    st.notable.push(line.clone());
                }
                if st.tail.len() == TAIL_LINES {
                    st.tail.pop_front();
                }
                st.tail.push_back(line);
                sink.1.notify_all();
            }
            sink.0.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            sink.1.notify_all();
        });
        let mut srv = Srv {
            name: name.to_string(),
            child,
            port: 0,
            log,
        };
        let line = {
            let (lock, cv) = &*srv.log;
            let end = Instant::now() + Duration::from_secs(20);
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(l) = st.listening.clone() {
                    break l;
                }
                let now = Instant::now();
                if now >= end || st.closed {
                    let tail: Vec<String> = st.tail.iter().cloned().collect();
                    drop(st);
                    panic!("{name}: no listening line; log:\n{}", tail.join("\n"));
                }
                st = cv
                    .wait_timeout(st, end - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        srv.port = line
            .rsplit_once("127.0.0.1:")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        srv
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// Running, and not a zombie.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none() && alive(self.pid())
    }
    pub fn tail(&self, n: usize) -> String {
        let st = self.log.0.lock().unwrap_or_else(|e| e.into_inner());
        let skip = st.tail.len().saturating_sub(n);
        st.tail
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
    /// Panic lines and "the bridge sent non-JSON" lines so far.
    pub fn notable(&self) -> Vec<String> {
        self.log
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notable
            .clone()
    }
    /// Waits (at most `bound`) for a log line holding every one of `needles` among the
    /// last lines kept; None when none came.
    pub fn wait_line(&self, needles: &[&str], bound: Duration) -> Option<String> {
        let (lock, cv) = &*self.log;
        let end = Instant::now() + bound;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(l) = st
                .tail
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= end || st.closed {
                return None;
            }
            st = cv
                .wait_timeout(st, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn log_lines(&self) -> u64 {
        self.log.0.lock().unwrap_or_else(|e| e.into_inner()).lines
    }
    pub fn events(&self) -> BTreeMap<String, u64> {
        self.log
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .clone()
    }

    /// One sample of /metrics by its name with labels as printed; None when the scrape
    /// fails or the sample is absent.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let r = get(&self.addr(), "/metrics", Duration::from_secs(10)).ok()?;
        String::from_utf8_lossy(&r.body)
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Every way this run has seen the server panic: log lines and the counter.
    pub fn panics(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .notable()
            .into_iter()
            .filter(|l| !l.contains("BRIDGE SENT NON-JSON"))
            .collect();
        match self.metric("stdio_sse_panics_total") {
            Some(n) if n > 0.0 => out.push(format!("stdio_sse_panics_total is {n}")),
            Some(_) => {}
            None => out.push("stdio_sse_panics_total could not be read from /metrics".into()),
        }
        out
    }

    /// SIGTERM and a bounded wait; SIGKILL after it.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- /proc -------------------------------------------------------------------------------

/// (state, ppid) from /proc/PID/stat.
pub fn stat_of(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    matches!(stat_of(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn status_field(pid: i32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub fn threads(pid: i32) -> usize {
    status_field(pid, "Threads:").unwrap_or(0) as usize
}

pub fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub fn rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS:").unwrap_or(0)
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Direct children of `ppid` with their state (zombies included).
pub fn kids(ppid: i32) -> Vec<(i32, char)> {
    all_pids()
        .into_iter()
        .filter_map(|p| match stat_of(p) {
            Some((s, pp)) if pp == ppid => Some((p, s)),
            _ => None,
        })
        .collect()
}

/// Live children of `ppid` that run the command (the guardian left out).
pub fn children(ppid: i32) -> Vec<i32> {
    kids(ppid)
        .into_iter()
        .filter(|(p, s)| *s != 'Z' && *s != 'X' && comm(*p) != GUARDIAN_NAME)
        .map(|(p, _)| p)
        .collect()
}

pub fn zombies(ppid: i32) -> Vec<i32> {
    kids(ppid)
        .into_iter()
        .filter(|(_, s)| *s == 'Z')
        .map(|(p, _)| p)
        .collect()
}

/// Processes whose command line holds `marker`, with their parent.
pub fn marked(marker: &str) -> Vec<(i32, i32)> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|p| *p != me)
        .filter_map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            if !cmd.split('\0').any(|a| a == marker) {
                return None;
            }
            let (s, ppid) = stat_of(p)?;
            (s != 'Z' && s != 'X').then_some((p, ppid))
        })
        .collect()
}

/// SIGKILLs `pid` if, and only if, it is a child of `server` (checked through a pidfd
/// opened first, so a recycled pid is never hit). True when the signal went out.
pub fn kill_child_of(server: i32, pid: i32) -> bool {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return false;
    }
    let ours = matches!(stat_of(pid), Some((s, pp)) if pp == server && s != 'Z')
        && comm(pid) != GUARDIAN_NAME;
    let sent = ours
        && unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        } == 0;
    unsafe { libc::close(fd) };
    sent
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snap {
    pub threads: usize,
    pub fds: usize,
    pub children: usize,
    pub rss_kib: u64,
}

pub fn snap(pid: i32) -> Snap {
    Snap {
        threads: threads(pid),
        fds: fds(pid),
        children: children(pid).len(),
        rss_kib: rss_kib(pid),
    }
}

/// The server's resting state: polls until threads, descriptors and children have not
/// changed for `quiet` (idle connection threads end 5 s after their last task), at most
/// `bound`; returns the last sample.
pub fn settle(pid: i32, quiet: Duration, bound: Duration) -> Snap {
    let end = Instant::now() + bound;
    let mut last = snap(pid);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = snap(pid);
        if (now.threads, now.fds, now.children) != (last.threads, last.fds, last.children) {
            since = Instant::now();
        }
        last = now;
        if since.elapsed() >= quiet || Instant::now() >= end {
            return last;
        }
    }
}

/// Polls (at most `bound`) until threads and descriptors are at or below `base`, the
/// children are as many as in `base` and the RSS is within `rss_slack_kib` of it.
pub fn back_to(pid: i32, base: Snap, rss_slack_kib: u64, bound: Duration) -> Result<Snap, String> {
    let end = Instant::now() + bound;
    loop {
        let now = snap(pid);
        let ok = now.threads <= base.threads
            && now.fds <= base.fds
            && now.children == base.children
            && now.rss_kib <= base.rss_kib + rss_slack_kib;
        if ok {
            return Ok(now);
        }
        if Instant::now() >= end {
            return Err(format!(
                "not back to the baseline {bound:?} after the run: now {now:?}, baseline {base:?} \
                 (threads and fds at most, children equal, RSS within {rss_slack_kib} KiB)"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- an HTTP/1.1 client with deadlines ---------------------------------------------------

#[derive(Debug, Default, Clone)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn chunked(&self) -> bool {
        self.header("Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
    pub fn is_sse(&self) -> bool {
        self.header("Content-Type")
            .is_some_and(|v| v.starts_with("text/event-stream"))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// `error.code` and message of a JSON-RPC error body.
    pub fn rpc_error(&self) -> Option<(i64, String)> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        let code = v.pointer("/error/code")?.as_i64()?;
        let msg = v.pointer("/error/message")?.as_str()?.to_string();
        Some((code, msg))
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(400)]).into_owned();
    if b.len() > 400 {
        format!("{s}... ({} bytes)", b.len())
    } else {
        s
    }
}

/// A response head at the start of `buf`, and its length.
pub fn parse_head(buf: &[u8]) -> Option<(Resp, usize)> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((
        Resp {
            status,
            head,
            headers,
            body: Vec::new(),
        },
        end + 4,
    ))
}

/// One chunk at the start of `buf`: (data, bytes used), data empty for the last chunk
/// (trailers included). None while incomplete.
pub fn parse_chunk(buf: &[u8]) -> Option<Result<(Vec<u8>, usize), String>> {
    let nl = find(buf, b"\r\n")?;
    let line = String::from_utf8_lossy(&buf[..nl]);
    let size = line.split(';').next().unwrap_or("").trim();
    let Ok(n) = usize::from_str_radix(size, 16) else {
        return Some(Err(format!("bad chunk size line {line:?}")));
    };
    let start = nl + 2;
    if n == 0 {
        let end = find(&buf[start - 2..], b"\r\n\r\n")?;
        return Some(Ok((Vec::new(), start - 2 + end + 4)));
    }
    if buf.len() < start + n + 2 {
        return None;
    }
    Some(Ok((buf[start..start + n].to_vec(), start + n + 2)))
}

/// A whole response at the start of `buf` (given whether the peer closed).
pub fn parse_response(buf: &[u8], closed: bool) -> Option<Result<(Resp, usize), String>> {
    let (mut resp, mut used) = parse_head(buf)?;
    if (100..200).contains(&resp.status) || resp.status == 204 || resp.status == 304 {
        return Some(Ok((resp, used)));
    }
    if resp.chunked() {
        loop {
            match parse_chunk(&buf[used..])? {
                Err(e) => return Some(Err(e)),
                Ok((data, n)) => {
                    used += n;
                    if data.is_empty() {
                        return Some(Ok((resp, used)));
                    }
                    resp.body.extend(data);
                }
            }
        }
    }
    if let Some(n) = resp.header("Content-Length") {
        let Ok(n) = n.parse::<usize>() else {
            return Some(Err(format!("bad Content-Length in {:?}", resp.head)));
        };
        if buf.len() < used + n {
            return None;
        }
        resp.body = buf[used..used + n].to_vec();
        return Some(Ok((resp, used + n)));
    }
    if !closed {
        return None;
    }
    resp.body = buf[used..].to_vec();
    Some(Ok((resp, buf.len())))
}

/// A client connection whose every wait has a deadline.
pub struct Http {
    pub s: TcpStream,
    pub buf: Vec<u8>,
    /// How the server ended the connection ("EOF", "reset", ...), once it has.
    pub end: Option<String>,
}

impl Http {
    /// A new connection; from a port of this thread's private range when it has one
    /// (`use_private_ports`), else from the kernel's ephemeral range.
    pub fn connect(addr: &str) -> Result<Http, String> {
        let sa: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let s = match next_private_port() {
            Some(mut port) => {
                let mut tries = 0;
                loop {
                    match connect_from(&sa, port) {
                        Ok(s) => break s,
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable
                            ) && tries < 100 =>
                        {
                            tries += 1;
                            port = next_private_port().unwrap();
                        }
                        Err(e) => return Err(format!("connect {addr} from port {port}: {e}")),
                    }
                }
            }
            None => TcpStream::connect_timeout(&sa, Duration::from_secs(5))
                .map_err(|e| format!("connect {addr}: {e}"))?,
        };
        s.set_nodelay(true).ok();
        s.set_write_timeout(Some(Duration::from_secs(10))).ok();
        Ok(Http {
            s,
            buf: Vec::new(),
            end: None,
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.s.write_all(bytes).map_err(|e| format!("write: {e}"))
    }

    /// One read, waiting at most until `until`.
    pub fn fill(&mut self, until: Instant) -> Result<(), String> {
        if let Some(end) = &self.end {
            return Err(format!("connection closed ({end})"));
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("deadline passed".into());
        }
        self.s
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok();
        let mut chunk = [0u8; 65536];
        match self.s.read(&mut chunk) {
            Ok(0) => self.end = Some("EOF".into()),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err("deadline passed".into())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => self.end = Some("reset".into()),
            Err(e) => self.end = Some(e.to_string()),
        }
        Ok(())
    }

    /// The next whole response by `until`.
    pub fn response(&mut self, until: Instant) -> Result<Resp, String> {
        loop {
            match parse_response(&self.buf, self.end.is_some()) {
                Some(Ok((resp, used))) => {
                    self.buf.drain(..used);
                    return Ok(resp);
                }
                Some(Err(e)) => return Err(format!("{e}; got {:?}", lossy(&self.buf))),
                None => {}
            }
            if let Some(end) = &self.end {
                return Err(format!(
                    "connection closed ({end}) before a whole response; got {:?}",
                    lossy(&self.buf)
                ));
            }
            self.fill(until)
                .map_err(|e| format!("no whole response ({e}); got {:?}", lossy(&self.buf)))?;
        }
    }

    /// The next response head (body left unread) by `until`.
    pub fn head(&mut self, until: Instant) -> Result<Resp, String> {
        loop {
            if let Some((resp, used)) = parse_head(&self.buf) {
                self.buf.drain(..used);
                return Ok(resp);
            }
            if let Some(end) = &self.end {
                return Err(format!(
                    "connection closed ({end}) before a response head; got {:?}",
                    lossy(&self.buf)
                ));
            }
            self.fill(until)
                .map_err(|e| format!("no response head ({e}); got {:?}", lossy(&self.buf)))?;
        }
    }

    /// The body of a response whose head was read with `head`.
    pub fn body(&mut self, head: &mut Resp, until: Instant) -> Result<(), String> {
        if head.chunked() {
            while let Some(c) = self.chunk(until)? {
                head.body.extend(c);
            }
            return Ok(());
        }
        if let Some(n) = head.header("Content-Length") {
            let n: usize = n.parse().map_err(|_| format!("bad Content-Length {n:?}"))?;
            while self.buf.len() < n {
                if self.end.is_some() {
                    return Err("closed in the middle of the body".into());
                }
                self.fill(until)?;
            }
            head.body = self.buf.drain(..n).collect();
            return Ok(());
        }
        while self.end.is_none() {
            self.fill(until)?;
        }
        head.body = std::mem::take(&mut self.buf);
        Ok(())
    }

    /// The next chunk of a chunked body (None at its end) by `until`.
    pub fn chunk(&mut self, until: Instant) -> Result<Option<Vec<u8>>, String> {
        loop {
            match parse_chunk(&self.buf) {
                Some(Ok((data, used))) => {
                    self.buf.drain(..used);
                    return Ok((!data.is_empty()).then_some(data));
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
            if let Some(end) = &self.end {
                return Err(format!("stream cut ({end}) in the middle of the body"));
            }
            self.fill(until)?;
        }
    }

    /// Closes with a TCP RST (SO_LINGER 0) instead of a FIN.
    pub fn reset(self) {
        reset_close(self.s);
    }
}

thread_local! {
    static PRIVATE_PORTS: std::cell::Cell<Option<(u16, u16, u16)>> = const { std::cell::Cell::new(None) };
}

/// From now on this thread's connections come from local ports `lo..hi`, in turn: ports
/// below the kernel's ephemeral range (32768 and up here) that no other connection of
/// the run uses, so no other connection can ever have had this one's address. (Used by
/// the canaries: see `a_reset_connections_handler_never_touches_a_new_connection_on_its_port`
/// in tests/fuzz.rs for why the address matters to the server.)
pub fn use_private_ports(lo: u16, hi: u16) {
    assert!(
        lo < hi && hi <= 32768,
        "private ports must stay below the ephemeral range"
    );
    PRIVATE_PORTS.with(|p| p.set(Some((lo, lo, hi))));
}

fn next_private_port() -> Option<u16> {
    PRIVATE_PORTS.with(|p| {
        let (next, lo, hi) = p.get()?;
        let after = if next + 1 >= hi { lo } else { next + 1 };
        p.set(Some((after, lo, hi)));
        Some(next)
    })
}

/// A blocking connect from `local_port` on 127.0.0.1 (SO_REUSEADDR, so a port whose
/// last connection is in TIME_WAIT can be used again).
pub fn connect_from(to: &std::net::SocketAddr, local_port: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(to) = to else {
        return Err(std::io::Error::new(ErrorKind::Unsupported, "IPv4 only"));
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd); // owns fd from here on
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        // Bounds the connect too (Linux applies SO_SNDTIMEO to it).
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let local = sin(std::net::Ipv4Addr::LOCALHOST, local_port);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(*to.ip(), to.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// Closes with SO_LINGER 0: the kernel sends a RST instead of a FIN.
pub fn reset_close(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(s);
}

pub fn half_close(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
}

/// A whole GET on a new connection.
pub fn get(addr: &str, path: &str, bound: Duration) -> Result<Resp, String> {
    let until = Instant::now() + bound;
    let mut c = Http::connect(addr)?;
    c.write(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    c.response(until)
}

// ---- SSE ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Event {
    pub event: Option<String>,
    pub data: String,
}

/// Events of a chunked SSE body, read as they come.
pub struct Sse {
    pub http: Http,
    pending: Vec<u8>,
    pub ended: bool,
}

fn parse_block(block: &str) -> Option<Event> {
    let mut ev = Event {
        event: None,
        data: String::new(),
    };
    let mut any = false;
    let mut has_data = false;
    for line in block.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = line
            .split_once(':')
            .map(|(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)))
            .unwrap_or((line, ""));
        match field {
            "event" => ev.event = Some(value.to_string()),
            "data" => {
                if has_data {
                    ev.data.push('\n');
                }
                has_data = true;
                ev.data.push_str(value);
            }
            _ => {}
        }
        any = true;
    }
    any.then_some(ev)
}

impl Sse {
    pub fn new(http: Http) -> Sse {
        Sse {
            http,
            pending: Vec::new(),
            ended: false,
        }
    }
    /// The next event (comments skipped); None when the stream ended cleanly.
    pub fn next_event(&mut self, until: Instant) -> Result<Option<Event>, String> {
        loop {
            if let Some(i) = find(&self.pending, b"\n\n") {
                let block: Vec<u8> = self.pending.drain(..i + 2).collect();
                if let Some(ev) = parse_block(&String::from_utf8_lossy(&block)) {
                    return Ok(Some(ev));
                }
                continue;
            }
            if self.ended {
                return Ok(None);
            }
            match self.http.chunk(until)? {
                Some(c) => self.pending.extend(c),
                None => self.ended = true,
            }
        }
    }
    /// The next JSON-RPC message (a `message` event with JSON data).
    pub fn next_message(&mut self, until: Instant) -> Result<Option<Value>, String> {
        loop {
            let Some(ev) = self.next_event(until)? else {
                return Ok(None);
            };
            if ev.event.as_deref().unwrap_or("message") != "message" || ev.data.is_empty() {
                continue;
            }
            return serde_json::from_str(&ev.data)
                .map(Some)
                .map_err(|e| format!("event data is not JSON ({e}): {:?}", ev.data));
        }
    }
}

// ---- calls and their verdicts ------------------------------------------------------------

/// How one call ended.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Answered with its own payload.
    Answered,
    /// Refused with a clear error: an HTTP error status, a JSON-RPC error, or the stream
    /// ending without an answer. `gone`: the session is over (re-initialize).
    Refused { why: String, gone: bool },
    /// No answer within the bound, or something that is neither an answer nor a refusal.
    Failed(String),
    /// Another call's payload, or an answer to our id that is not ours: never allowed.
    Crossed(String),
}

/// What one call expects back.
#[derive(Debug, Clone)]
pub struct Expect {
    pub id: u64,
    pub payload: String,
    /// The prefix of every payload this client sends.
    pub owner: String,
}

pub enum Judged {
    /// A message about our call.
    Ours(Verdict),
    /// An answer to one of this client's earlier calls (a duplicate): not ours now.
    Stale,
    /// Nothing to do with us (a notification, a request from the child, ...).
    Other,
}

fn rpc_error_key(m: &Value) -> String {
    let code = m
        .pointer("/error/code")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    format!("JSON-RPC error {code}")
}

/// Judges one message that reached this client while it waited for `exp`.
pub fn judge(m: &Value, exp: &Expect) -> Judged {
    if m.get("method").is_some() {
        return Judged::Other;
    }
    let Some(id) = m.get("id") else {
        return Judged::Other;
    };
    let text = m.pointer("/result/content/0/text").and_then(Value::as_str);
    let has_result = m.get("result").is_some();
    let has_error = m.get("error").is_some();
    if !has_result && !has_error {
        return Judged::Other;
    }
    if *id == json!(exp.id) {
        return Judged::Ours(match text {
            Some(t) if t == exp.payload => Verdict::Answered,
            Some(t) => Verdict::Crossed(format!(
                "the answer to id {} carries {t:?}, not its own {:?}",
                exp.id, exp.payload
            )),
            None if has_error => Verdict::Refused {
                why: rpc_error_key(m),
                gone: false,
            },
            None => Verdict::Crossed(format!("the answer to id {} is not its echo: {m}", exp.id)),
        });
    }
    match text {
        Some(t) if t.starts_with(PAYLOAD_PREFIX) && !t.starts_with(&exp.owner) => {
            Judged::Ours(Verdict::Crossed(format!(
                "another client's answer reached {} while it waited for id {}: {m}",
                exp.owner, exp.id
            )))
        }
        Some(t) if t.starts_with(&exp.owner) => Judged::Stale,
        _ => Judged::Other,
    }
}

/// Tallies of many calls.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub calls: u64,
    pub answered: u64,
    pub stale: u64,
    pub refused: BTreeMap<String, u64>,
    pub failed: Vec<String>,
    pub crossed: Vec<String>,
}

impl Tally {
    pub fn add(&mut self, v: &Verdict, context: &str) {
        self.calls += 1;
        match v {
            Verdict::Answered => self.answered += 1,
            Verdict::Refused { why, .. } => *self.refused.entry(why.clone()).or_default() += 1,
            Verdict::Failed(e) => {
                if self.failed.len() < 50 {
                    self.failed.push(format!("{context}: {e}"));
                }
            }
            Verdict::Crossed(e) => {
                if self.crossed.len() < 50 {
                    self.crossed.push(format!("{context}: {e}"));
                }
            }
        }
    }
    pub fn merge(&mut self, o: &Tally) {
        self.calls += o.calls;
        self.answered += o.answered;
        self.stale += o.stale;
        for (k, v) in &o.refused {
            *self.refused.entry(k.clone()).or_default() += v;
        }
        self.failed.extend(o.failed.iter().cloned());
        self.crossed.extend(o.crossed.iter().cloned());
    }
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
    pub fn summary(&self) -> String {
        format!(
            "{} calls: {} answered with their own payload, {} refused {:?}, {} failed, {} crossed; {} stale duplicates seen",
            self.calls,
            self.answered,
            self.refused_total(),
            self.refused,
            self.failed.len(),
            self.crossed.len(),
            self.stale
        )
    }
}

fn http_refusal(r: &Resp) -> Verdict {
    let why = match r.rpc_error() {
        Some((code, _)) => format!("HTTP {} ({code})", r.status),
        None => format!("HTTP {}", r.status),
    };
    Verdict::Refused {
        why,
        gone: r.status == 404,
    }
}

pub const PROTOCOL: &str = "2025-11-25";

pub fn initialize_body(id: u64, version: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {},
        "clientInfo": {"name": "stdio-sse-stress", "version": "1.0"}}})
    .to_string()
}

pub fn call_body(id: u64, tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": args}})
    .to_string()
}

pub const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

/// A raw POST /mcp.
pub fn mcp_post(addr: &str, session: Option<&str>, body: &str) -> String {
    let mut req = format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
    );
    if let Some(id) = session {
        req.push_str(&format!(
            "Mcp-Session-Id: {id}\r\nMCP-Protocol-Version: {PROTOCOL}\r\n"
        ));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    req
}

/// A Streamable HTTP session.
#[derive(Debug, Clone)]
pub struct Streamable {
    pub addr: String,
    pub id: String,
}

impl Streamable {
    /// initialize + notifications/initialized; Err is the verdict of the initialize.
    pub fn open(addr: &str, bound: Duration) -> Result<Streamable, Verdict> {
        let until = Instant::now() + bound;
        let fail = |e: String| Verdict::Failed(format!("initialize: {e}"));
        let mut c = Http::connect(addr).map_err(fail)?;
        c.write(mcp_post(addr, None, &initialize_body(0, PROTOCOL)).as_bytes())
            .map_err(fail)?;
        let mut head = c.head(until).map_err(fail)?;
        if head.status != 200 {
            let _ = c.body(&mut head, until);
            return Err(http_refusal(&head));
        }
        let Some(id) = head.header("Mcp-Session-Id").map(str::to_string) else {
            return Err(fail(format!("200 without a session id: {}", head.head)));
        };
        let mut answered = false;
        if head.is_sse() {
            let mut sse = Sse::new(c);
            loop {
                match sse.next_message(until) {
                    Ok(Some(m)) if m["id"] == json!(0) => {
                        if m.get("error").is_some() {
                            return Err(Verdict::Refused {
                                why: format!("initialize: {}", rpc_error_key(&m)),
                                gone: true,
                            });
                        }
                        answered = m.get("result").is_some();
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return Err(fail(e)),
                }
            }
        } else {
            c.body(&mut head, until).map_err(fail)?;
            answered = serde_json::from_slice::<Value>(&head.body)
                .is_ok_and(|v| v.get("result").is_some());
        }
        if !answered {
            return Err(Verdict::Refused {
                why: "initialize: stream ended without an answer".into(),
                gone: true,
            });
        }
        let s = Streamable {
            addr: addr.to_string(),
            id,
        };
        match s.notify(INITIALIZED, until) {
            Ok(202) => Ok(s),
            Ok(status) => Err(Verdict::Refused {
                why: format!("notifications/initialized: HTTP {status}"),
                gone: true,
            }),
            Err(e) => Err(fail(format!("notifications/initialized: {e}"))),
        }
    }

    /// Posts a notification (or an answer); its status.
    pub fn notify(&self, body: &str, until: Instant) -> Result<u16, String> {
        let mut c = Http::connect(&self.addr)?;
        c.write(mcp_post(&self.addr, Some(&self.id), body).as_bytes())?;
        c.response(until).map(|r| r.status)
    }

    /// One tools/call, judged.
    pub fn call(&self, body: &str, exp: &Expect, bound: Duration, stale: &mut u64) -> Verdict {
        let until = Instant::now() + bound;
        let fail = |e: String| Verdict::Failed(format!("id {}: {e}", exp.id));
        let mut c = match Http::connect(&self.addr) {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        if let Err(e) = c.write(mcp_post(&self.addr, Some(&self.id), body).as_bytes()) {
            return fail(e);
        }
        let mut head = match c.head(until) {
            Ok(h) => h,
            Err(e) => return fail(e),
        };
        if head.status != 200 {
            let _ = c.body(&mut head, until);
            return http_refusal(&head);
        }
        if !head.is_sse() {
            if let Err(e) = c.body(&mut head, until) {
                return fail(e);
            }
            let msgs = match serde_json::from_slice::<Value>(&head.body) {
                Ok(Value::Array(v)) => v,
                Ok(v) => vec![v],
                Err(e) => return fail(format!("a 200 JSON body that is not JSON ({e})")),
            };
            return judge_all(msgs.iter(), exp, stale).unwrap_or_else(|| {
                fail(format!(
                    "a 200 JSON body without an answer: {}",
                    head.text()
                ))
            });
        }
        let mut sse = Sse::new(c);
        loop {
            match sse.next_message(until) {
                Ok(Some(m)) => match judge(&m, exp) {
                    Judged::Ours(v) => return v,
                    Judged::Stale => *stale += 1,
                    Judged::Other => {}
                },
                Ok(None) => {
                    return Verdict::Refused {
                        why: "POST stream ended without an answer".into(),
                        gone: false,
                    }
                }
                Err(e) if e.contains("deadline") => return fail(format!("no answer: {e}")),
                Err(e) if e.contains("stream cut") => {
                    // The server closed the connection in the middle of the stream: no
                    // answer, and said so by closing. Counted as a refusal.
                    return Verdict::Refused {
                        why: "POST stream cut without an answer".into(),
                        gone: false,
                    };
                }
                Err(e) => return fail(e),
            }
        }
    }

    pub fn delete(&self, bound: Duration) -> Result<u16, String> {
        let until = Instant::now() + bound;
        let mut c = Http::connect(&self.addr)?;
        c.write(
            format!(
                "DELETE /mcp HTTP/1.1\r\nHost: {}\r\nMcp-Session-Id: {}\r\n\r\n",
                self.addr, self.id
            )
            .as_bytes(),
        )?;
        c.response(until).map(|r| r.status)
    }
}

fn judge_all<'a>(
    msgs: impl Iterator<Item = &'a Value>,
    exp: &Expect,
    stale: &mut u64,
) -> Option<Verdict> {
    for m in msgs {
        match judge(m, exp) {
            Judged::Ours(v) => return Some(v),
            Judged::Stale => *stale += 1,
            Judged::Other => {}
        }
    }
    None
}

/// A legacy HTTP+SSE session: the stream is the session.
pub struct Legacy {
    pub addr: String,
    pub endpoint: String,
    pub sse: Sse,
}

impl Legacy {
    /// GET /sse, the endpoint event, initialize (answered on the stream), initialized.
    pub fn open(addr: &str, bound: Duration) -> Result<Legacy, Verdict> {
        let until = Instant::now() + bound;
        let fail = |e: String| Verdict::Failed(format!("legacy open: {e}"));
        let mut c = Http::connect(addr).map_err(fail)?;
        c.write(
            format!("GET /sse HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        )
        .map_err(fail)?;
        let mut head = c.head(until).map_err(fail)?;
        if head.status != 200 {
            let _ = c.body(&mut head, until);
            return Err(http_refusal(&head));
        }
        let mut sse = Sse::new(c);
        let endpoint = match sse.next_event(until) {
            Ok(Some(ev)) if ev.event.as_deref() == Some("endpoint") => ev.data,
            Ok(Some(ev)) => return Err(fail(format!("first event is not the endpoint: {ev:?}"))),
            Ok(None) => {
                return Err(Verdict::Refused {
                    why: "legacy stream ended before its endpoint".into(),
                    gone: true,
                })
            }
            Err(e) => return Err(fail(e)),
        };
        let mut l = Legacy {
            addr: addr.to_string(),
            endpoint,
            sse,
        };
        match l.post(&initialize_body(0, "2024-11-05"), until) {
            Ok(202) => {}
            Ok(s) => {
                return Err(Verdict::Refused {
                    why: format!("legacy initialize: HTTP {s}"),
                    gone: true,
                })
            }
            Err(e) => return Err(fail(e)),
        }
        loop {
            match l.sse.next_message(until) {
                Ok(Some(m)) if m["id"] == json!(0) && m.get("method").is_none() => {
                    if m.get("result").is_some() {
                        break;
                    }
                    return Err(Verdict::Refused {
                        why: format!("legacy initialize: {}", rpc_error_key(&m)),
                        gone: true,
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(Verdict::Refused {
                        why: "legacy initialize: stream ended".into(),
                        gone: true,
                    })
                }
                Err(e) if e.contains("stream cut") => {
                    return Err(Verdict::Refused {
                        why: "legacy initialize: stream cut".into(),
                        gone: true,
                    })
                }
                Err(e) => return Err(fail(e)),
            }
        }
        match l.post(INITIALIZED, until) {
            Ok(202) => Ok(l),
            Ok(s) => Err(Verdict::Refused {
                why: format!("legacy initialized: HTTP {s}"),
                gone: true,
            }),
            Err(e) => Err(fail(e)),
        }
    }

    /// POSTs a message to the endpoint; the status.
    pub fn post(&mut self, body: &str, until: Instant) -> Result<u16, String> {
        let mut c = Http::connect(&self.addr)?;
        c.write(
            format!(
                "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                self.endpoint,
                self.addr,
                body.len()
            )
            .as_bytes(),
        )?;
        c.response(until).map(|r| r.status)
    }

    /// One tools/call: posted, then its answer read from the stream, judged.
    pub fn call(&mut self, body: &str, exp: &Expect, bound: Duration, stale: &mut u64) -> Verdict {
        let until = Instant::now() + bound;
        let fail = |e: String| Verdict::Failed(format!("id {}: {e}", exp.id));
        match self.post(body, until) {
            Ok(202) => {}
            Ok(s) => {
                return Verdict::Refused {
                    why: format!("legacy POST: HTTP {s}"),
                    gone: s == 404,
                }
            }
            Err(e) => return fail(format!("legacy POST: {e}")),
        }
        loop {
            match self.sse.next_message(until) {
                Ok(Some(m)) => match judge(&m, exp) {
                    Judged::Ours(v) => return v,
                    Judged::Stale => *stale += 1,
                    Judged::Other => {}
                },
                Ok(None) => {
                    return Verdict::Refused {
                        why: "legacy stream ended without an answer".into(),
                        gone: true,
                    }
                }
                Err(e) if e.contains("stream cut") => {
                    return Verdict::Refused {
                        why: "legacy stream cut without an answer".into(),
                        gone: true,
                    }
                }
                Err(e) => return fail(format!("no answer on the legacy stream: {e}")),
            }
        }
    }
}
