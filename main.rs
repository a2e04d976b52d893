//! stdio-sse: serve a stdio MCP server (or any line-oriented JSON program) over HTTP.
//!
//!     stdio-sse [OPTIONS] [--] COMMAND [ARGS...]
//!
//! The file reads top to bottom in the order a message travels: configuration, the HTTP
//! front door, the three transports (Streamable HTTP, legacy HTTP+SSE, one-shot), sessions
//! and message routing, the child process, SSE framing, observability, and last the
//! built-in demo server that runs when no COMMAND is given.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ======================================================================================
/// Configuration: every default and limit in one block, the flag table, and parsing of
/// the command line and `STDIO_SSE_*` variables. Touches nothing but its own values.
mod config {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::time::Duration;

    /// Loopback only: exposing a local tool server on a network is a decision (rule O-3).
    pub const DEFAULT_HOST: &str = "127.0.0.1";
    pub const DEFAULT_PORT: &str = "8000";
    pub const DEFAULT_MODE: &str = "session";
    pub const DEFAULT_MCP_PATH: &str = "/mcp";
    pub const DEFAULT_SSE_PATH: &str = "/sse";
    pub const DEFAULT_MESSAGE_PATH: &str = "/message";
    /// Largest POST body; MCP requests are small, tool arguments rarely reach 1 MiB.
    pub const DEFAULT_MAX_BODY: &str = "4MiB";
    /// Largest line the child may print; beyond it the line is dropped (logged, counted)
    /// so one runaway message cannot take the bridge's memory.
    pub const DEFAULT_MAX_MESSAGE: &str = "64MiB";
    /// One child per session: this caps processes as much as sessions.
    pub const DEFAULT_MAX_SESSIONS: &str = "100";
    /// Clients that vanish without DELETE leave a child behind; this is when we reap it.
    pub const DEFAULT_SESSION_IDLE_TIMEOUT: &str = "30m";
    /// Below common proxy read timeouts (nginx 60 s) so idle streams survive them, and the
    /// write is how a vanished client is noticed.
    pub const DEFAULT_KEEPALIVE: &str = "15s";
    /// Time a child gets after stdin EOF, and again after SIGTERM, before the next step.
    pub const DEFAULT_SHUTDOWN_GRACE: &str = "5s";
    pub const DEFAULT_LOG_LEVEL: &str = "info";
    /// Child messages with no open stream wait for the session's next GET, up to this many.
    pub const DEFAULT_MAX_HELD: &str = "1000";
    /// Events queued per stream before the child is slowed down (back-pressure).
    pub const DEFAULT_STREAM_QUEUE: &str = "256";
    /// How long a stream may refuse events (client not reading) before we give up on it.
    pub const DEFAULT_STALL_TIMEOUT: &str = "30s";
    /// Child stderr lines kept to explain a crash in the error the client receives.
    pub const DEFAULT_STDERR_TAIL: &str = "20";

    /// Protocol versions whose HTTP framing we relay (rule V-3: validate against what
    /// the bridge can carry, not what the child negotiated).
    pub const SUPPORTED_VERSIONS: &[&str] =
        &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
    /// Rule V-2: a request without MCP-Protocol-Version is taken to be this version.
    pub const ASSUMED_VERSION: &str = "2025-03-26";
    /// The only version that allows JSON-RPC batches (rules B-1, B-2).
    pub const BATCH_VERSION: &str = "2025-03-26";
    /// Hidden first argument: run the built-in demo server on stdio.
    pub const DEMO_ARG: &str = "__demo-server";

    pub struct Flag {
        pub name: &'static str,
        pub value: &'static str,
        pub default: &'static str,
        pub repeatable: bool,
        pub help: &'static str,
    }

    const fn flag(
        name: &'static str,
        value: &'static str,
        default: &'static str,
        help: &'static str,
    ) -> Flag {
        Flag {
            name,
            value,
            default,
            repeatable: false,
            help,
        }
    }
    const fn many(name: &'static str, value: &'static str, help: &'static str) -> Flag {
        Flag {
            name,
            value,
            default: "",
            repeatable: true,
            help,
        }
    }

    /// Every flag, in `--help` order. Each is also read from `STDIO_SSE_<NAME>`.
    pub const FLAGS: &[Flag] = &[
        flag("host", "ADDR", DEFAULT_HOST, "address to listen on"),
        flag(
            "port",
            "PORT",
            DEFAULT_PORT,
            "port to listen on (0 picks a free one)",
        ),
        flag(
            "mode",
            "MODE",
            DEFAULT_MODE,
            "session: one child per client session; oneshot: one child per request",
        ),
        flag(
            "mcp-path",
            "PATH",
            DEFAULT_MCP_PATH,
            "Streamable HTTP endpoint (one-shot endpoint in oneshot mode)",
        ),
        flag(
            "sse-path",
            "PATH",
            DEFAULT_SSE_PATH,
            "legacy HTTP+SSE stream endpoint",
        ),
        flag(
            "message-path",
            "PATH",
            DEFAULT_MESSAGE_PATH,
            "legacy HTTP+SSE message endpoint",
        ),
        flag(
            "cwd",
            "DIR",
            "",
            "working directory of the child (default: ours)",
        ),
        many(
            "env",
            "KEY=VALUE",
            "extra environment variable for the child (repeatable)",
        ),
        many(
            "allowed-host",
            "HOST",
            "Host header value to accept besides loopback names (repeatable; * = any)",
        ),
        many(
            "allowed-origin",
            "ORIGIN",
            "Origin to accept besides loopback origins (repeatable; * = any)",
        ),
        flag("max-body", "SIZE", DEFAULT_MAX_BODY, "largest request body"),
        flag(
            "max-message",
            "SIZE",
            DEFAULT_MAX_MESSAGE,
            "largest line the child may print",
        ),
        flag(
            "max-sessions",
            "N",
            DEFAULT_MAX_SESSIONS,
            "most sessions (or one-shot children) at once",
        ),
        flag(
            "session-idle-timeout",
            "DURATION",
            DEFAULT_SESSION_IDLE_TIMEOUT,
            "end a session idle this long (0 = never)",
        ),
        flag(
            "keepalive",
            "DURATION",
            DEFAULT_KEEPALIVE,
            "SSE comment ping interval (0 = off)",
        ),
        flag(
            "shutdown-grace",
            "DURATION",
            DEFAULT_SHUTDOWN_GRACE,
            "wait after stdin EOF, then after SIGTERM, before SIGKILL",
        ),
        flag(
            "max-held",
            "N",
            DEFAULT_MAX_HELD,
            "child messages held for a session with no open stream",
        ),
        flag(
            "stream-queue",
            "N",
            DEFAULT_STREAM_QUEUE,
            "events queued per stream before the child is slowed",
        ),
        flag(
            "stall-timeout",
            "DURATION",
            DEFAULT_STALL_TIMEOUT,
            "give up on a stream that accepts no event this long",
        ),
        flag(
            "stderr-tail",
            "N",
            DEFAULT_STDERR_TAIL,
            "child stderr lines quoted when a child dies",
        ),
        flag(
            "log-level",
            "LEVEL",
            DEFAULT_LOG_LEVEL,
            "error, warn, info or debug",
        ),
    ];

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Mode {
        Session,
        Oneshot,
    }

    #[derive(Debug)]
    pub struct Config {
        pub host: String,
        pub port: u16,
        pub mode: Mode,
        pub mcp_path: String,
        pub sse_path: String,
        pub message_path: String,
        pub cwd: Option<PathBuf>,
        pub env: Vec<(String, String)>,
        pub allowed_hosts: Vec<String>,
        pub allowed_origins: Vec<String>,
        pub max_body: usize,
        pub max_message: usize,
        pub max_sessions: usize,
        pub session_idle_timeout: Option<Duration>,
        pub keepalive: Option<Duration>,
        pub shutdown_grace: Duration,
        pub max_held: usize,
        pub stream_queue: usize,
        pub stall_timeout: Duration,
        pub stderr_tail: usize,
        pub log_level: crate::observe::Level,
        /// Program and arguments of the child; for the demo server, ourselves.
        pub command: Vec<String>,
        pub demo: bool,
    }

    pub enum Parsed {
        Run(Box<Config>),
        Help,
        Version,
    }

    pub fn env_name(flag: &str) -> String {
        format!("STDIO_SSE_{}", flag.to_ascii_uppercase().replace('-', "_"))
    }

    /// Parses flags (`--name value`, `--name=value`) after the environment, so a flag
    /// overrides its variable; repeatable flags add to what the variable listed. The first
    /// argument that is not a flag starts COMMAND, as does anything after `--`.
    pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, String> {
        let mut values: HashMap<&'static str, Vec<String>> = HashMap::new();
        for f in FLAGS {
            if let Some(v) = env(&env_name(f.name)) {
                // --env values may hold commas, so its variable is split on newlines.
                let sep = if f.name == "env" { '\n' } else { ',' };
                let list = if f.repeatable {
                    v.split(sep)
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                } else {
                    vec![v]
                };
                values.insert(f.name, list);
            }
        }
        let mut command = Vec::new();
        let mut i = 0;
        let mut from_cli: Vec<&'static str> = Vec::new();
        while i < args.len() {
            let arg = &args[i];
            if arg == "--" {
                command.extend(args[i + 1..].iter().cloned());
                break;
            }
            if arg == "-h" || arg == "--help" {
                return Ok(Parsed::Help);
            }
            if arg == "-V" || arg == "--version" {
                return Ok(Parsed::Version);
            }
            let Some(body) = arg.strip_prefix("--") else {
                command.extend(args[i..].iter().cloned());
                break;
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let Some(f) = FLAGS.iter().find(|f| f.name == name) else {
                return Err(format!("unknown option --{name} (see --help)"));
            };
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("--{name} needs a value ({})", f.value))?
                }
            };
            let slot = values.entry(f.name).or_default();
            if !f.repeatable || !from_cli.contains(&f.name) {
                if !f.repeatable {
                    slot.clear();
                }
                from_cli.push(f.name);
            }
            slot.push(value);
            i += 1;
        }
        let get = |name: &str| -> String {
            let f = FLAGS
                .iter()
                .find(|f| f.name == name)
                .expect("flag in table");
            values
                .get(f.name)
                .and_then(|v| v.last().cloned())
                .unwrap_or_else(|| f.default.to_string())
        };
        let list = |name: &str| values.get(name).cloned().unwrap_or_default();

        let mode = match get("mode").as_str() {
            "session" => Mode::Session,
            "oneshot" | "one-shot" => Mode::Oneshot,
            other => return Err(format!("--mode must be session or oneshot, not {other:?}")),
        };
        let mut env_pairs = Vec::new();
        for kv in list("env") {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => env_pairs.push((k.to_string(), v.to_string())),
                _ => return Err(format!("--env takes KEY=VALUE, got {kv:?}")),
            }
        }
        let paths = ["mcp-path", "sse-path", "message-path"].map(|p| (p, get(p)));
        for (flag, path) in &paths {
            if !path.starts_with('/') {
                return Err(format!("--{flag} must start with '/', got {path:?}"));
            }
        }
        let demo = command.is_empty();
        let cwd = get("cwd");
        let cfg = Config {
            host: get("host"),
            port: get("port")
                .parse()
                .map_err(|_| format!("--port must be 0..65535, got {:?}", get("port")))?,
            mode,
            mcp_path: paths[0].1.clone(),
            sse_path: paths[1].1.clone(),
            message_path: paths[2].1.clone(),
            cwd: (!cwd.is_empty()).then(|| PathBuf::from(cwd)),
            env: env_pairs,
            allowed_hosts: list("allowed-host")
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            allowed_origins: list("allowed-origin")
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            max_body: parse_size("max-body", &get("max-body"))?,
            max_message: parse_size("max-message", &get("max-message"))?,
            max_sessions: parse_count("max-sessions", &get("max-sessions"))?,
            session_idle_timeout: nonzero(parse_duration(
                "session-idle-timeout",
                &get("session-idle-timeout"),
            )?),
            keepalive: nonzero(parse_duration("keepalive", &get("keepalive"))?),
            shutdown_grace: parse_duration("shutdown-grace", &get("shutdown-grace"))?,
            max_held: parse_count("max-held", &get("max-held"))?,
            stream_queue: parse_count("stream-queue", &get("stream-queue"))?.max(1),
            stall_timeout: parse_duration("stall-timeout", &get("stall-timeout"))?,
            stderr_tail: parse_count("stderr-tail", &get("stderr-tail"))?,
            log_level: crate::observe::Level::parse(&get("log-level")).ok_or_else(|| {
                format!(
                    "--log-level must be error, warn, info or debug, got {:?}",
                    get("log-level")
                )
            })?,
            command,
            demo,
        };
        Ok(Parsed::Run(Box::new(cfg)))
    }

    fn nonzero(d: Duration) -> Option<Duration> {
        (!d.is_zero()).then_some(d)
    }

    fn parse_count(flag: &str, s: &str) -> Result<usize, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("--{flag} takes a whole number, got {s:?}"))
    }

    /// `30m`, `15s`, `250ms`, `1h`; a bare number is seconds.
    pub fn parse_duration(flag: &str, s: &str) -> Result<Duration, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("--{flag} takes a duration like 30s, 500ms or 5m, got {s:?}"))?;
        let secs = match unit.trim() {
            "" | "s" => n,
            "ms" => n / 1000.0,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            _ => {
                return Err(format!(
                    "--{flag}: unknown unit {unit:?} (use ms, s, m or h)"
                ))
            }
        };
        Ok(Duration::from_secs_f64(secs))
    }

    /// `4MiB`, `64KiB`, `1G`, `512`; units are binary whatever their spelling.
    pub fn parse_size(flag: &str, s: &str) -> Result<usize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: usize = num
            .parse()
            .map_err(|_| format!("--{flag} takes a size like 4MiB or 65536, got {s:?}"))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => {
                return Err(format!(
                    "--{flag}: unknown unit {unit:?} (use KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .ok_or_else(|| format!("--{flag} is too large"))
    }

    pub fn help() -> String {
        let mut out = String::from(
            "stdio-sse: serve a stdio MCP server over Streamable HTTP, legacy HTTP+SSE and one-shot SSE\n\n\
             usage: stdio-sse [OPTIONS] [--] COMMAND [ARGS...]\n\
             \x20      stdio-sse [OPTIONS]            (no COMMAND: serve the built-in demo server)\n\noptions:\n",
        );
        for f in FLAGS {
            let left = format!("  --{} {}", f.name, f.value);
            let default = if f.default.is_empty() {
                String::new()
            } else {
                format!(" [default: {}]", f.default)
            };
            out.push_str(&format!(
                "{left:<34}{}{default}\n{:34}env {}\n",
                f.help,
                "",
                env_name(f.name)
            ));
        }
        out.push_str("  -h, --help                      this text\n  -V, --version                   print the version\n");
        out
    }
}

// ======================================================================================
/// HTTP front door: owns the listener, the worker threads, Host/Origin checks, body
/// reading and routing to a transport. Writes simple (non-streaming) responses itself.
mod http {
    use super::*;
    use crate::app;
    use crate::config::Mode;
    use std::io::{Read, Write};
    use tiny_http::Method;

    /// A request and what we parsed off it once.
    pub struct Incoming {
        pub rq: tiny_http::Request,
        pub path: String,
        pub query: String,
        pub started: Instant,
    }

    impl Incoming {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.rq
                .headers()
                .iter()
                .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                .map(|h| h.value.as_str())
        }
        pub fn method(&self) -> &Method {
            self.rq.method()
        }
        pub fn query_param(&self, key: &str) -> Option<String> {
            self.query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == key).then(|| percent_decode(v))
            })
        }
        /// HTTP/1.0 peers get an unchunked stream that ends with the connection.
        pub fn chunked(&self) -> bool {
            *self.rq.http_version() >= (1, 1)
        }
        pub fn summary(&self) -> String {
            format!("{} {}", self.rq.method(), self.path)
        }

        /// Reads the body, refusing more than `limit` bytes before reading them when the
        /// length is declared, and after `limit + 1` bytes otherwise.
        pub fn read_body(&mut self, limit: usize) -> Result<Vec<u8>, Reply> {
            let too_large = || {
                Reply::error(
                    413,
                    -32600,
                    format!("Request body too large: the limit is {limit} bytes (--max-body)"),
                )
            };
            if self.rq.body_length().is_some_and(|n| n > limit) {
                return Err(too_large());
            }
            let mut body = Vec::with_capacity(self.rq.body_length().unwrap_or(0).min(limit));
            let read = self
                .rq
                .as_reader()
                .take(limit as u64 + 1)
                .read_to_end(&mut body);
            match read {
                Err(e) => Err(Reply::error(
                    400,
                    -32700,
                    format!("Could not read request body: {e}"),
                )),
                Ok(_) if body.len() > limit => Err(too_large()),
                Ok(_) => Ok(body),
            }
        }
    }

    /// A complete, non-streaming response.
    pub struct Reply {
        pub status: u16,
        pub headers: Vec<(&'static str, String)>,
        pub content_type: &'static str,
        pub body: Vec<u8>,
    }

    impl Reply {
        /// A JSON-RPC error without id (rule P-4: HTTP-level errors carry no request id).
        pub fn error(status: u16, code: i64, message: impl Into<String>) -> Reply {
            Reply::rpc_error(status, &serde_json::Value::Null, code, message)
        }
        pub fn rpc_error(
            status: u16,
            id: &serde_json::Value,
            code: i64,
            message: impl Into<String>,
        ) -> Reply {
            let body = crate::message::error_response(id, code, &message.into(), None);
            Reply {
                status,
                headers: Vec::new(),
                content_type: "application/json",
                body: body.into_bytes(),
            }
        }
        pub fn json(status: u16, value: serde_json::Value) -> Reply {
            Reply {
                status,
                headers: Vec::new(),
                content_type: "application/json",
                body: value.to_string().into_bytes(),
            }
        }
        pub fn text(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
            Reply {
                status,
                headers: Vec::new(),
                content_type,
                body: body.into(),
            }
        }
        pub fn accepted() -> Reply {
            Reply::text(202, "", Vec::new())
        }
        pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
            self.headers.push((name, value.into()));
            self
        }
        pub fn message(&self) -> Option<String> {
            let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(String::from)
        }
    }

    /// Sends a complete response, logging every error status with its reason.
    pub fn respond(inc: Incoming, reply: Reply) {
        let app = app();
        app.metrics.http_response(reply.status);
        if reply.status >= 400 {
            let why = reply.message().unwrap_or_default();
            crate::log!(
                Info,
                "http_error",
                "{} -> {} {}",
                inc.summary(),
                reply.status,
                why
            );
        } else {
            crate::log!(
                Debug,
                "http",
                "{} -> {} in {:?}",
                inc.summary(),
                reply.status,
                inc.started.elapsed()
            );
        }
        let mut head = crate::sse::status_line(reply.status);
        if !reply.content_type.is_empty() {
            head.push_str(&format!("Content-Type: {}\r\n", reply.content_type));
        }
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
        let mut out = inc.rq.into_writer();
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&reply.body);
        let _ = out.write_all(&bytes).and_then(|_| out.flush());
    }

    /// The accept loop: an elastic pool of workers all blocking on the server's queue; a
    /// worker that takes a request makes sure another is waiting, so a long-lived SSE
    /// stream never stalls new requests. Spare idle workers exit.
    pub fn serve(server: Arc<tiny_http::Server>) {
        static IDLE: AtomicUsize = AtomicUsize::new(0);
        const SPARE_WORKERS: usize = 4;
        fn worker(server: Arc<tiny_http::Server>) {
            loop {
                let Ok(rq) = server.recv() else { return };
                if IDLE.fetch_sub(1, Ordering::AcqRel) == 1 {
                    spawn_worker(server.clone());
                }
                handle(rq);
                if IDLE.fetch_add(1, Ordering::AcqRel) >= SPARE_WORKERS {
                    IDLE.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
            }
        }
        fn spawn_worker(server: Arc<tiny_http::Server>) {
            IDLE.fetch_add(1, Ordering::AcqRel);
            crate::spawn_thread("http", move || worker(server));
        }
        for _ in 0..2 {
            spawn_worker(server.clone());
        }
    }

    fn handle(rq: tiny_http::Request) {
        let app = app();
        let url = rq.url().to_string();
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (url, String::new()),
        };
        let inc = Incoming {
            rq,
            path,
            query,
            started: Instant::now(),
        };
        if let Err(reply) = check_host_and_origin(&inc) {
            return respond(inc, reply);
        }
        if app.shutting_down.load(Ordering::Acquire) {
            return respond(
                inc,
                Reply::error(503, -32000, "Server is shutting down")
                    .with_header("Retry-After", "1"),
            );
        }
        let cfg = &app.cfg;
        let path = inc.path.as_str();
        let method = inc.method().clone();
        let allow = |allowed: &'static str| {
            Reply::error(
                405,
                -32000,
                format!("Method not allowed; allowed: {allowed}"),
            )
            .with_header("Allow", allowed)
        };
        match (path, cfg.mode) {
            ("/healthz", _) => match method {
                Method::Get => respond(inc, Reply::json(200, serde_json::json!({"status": "ok"}))),
                _ => respond(inc, allow("GET")),
            },
            ("/readyz", _) => match method {
                Method::Get => respond(inc, crate::child::readiness()),
                _ => respond(inc, allow("GET")),
            },
            ("/metrics", _) => match method {
                Method::Get => respond(
                    inc,
                    Reply::text(200, "text/plain; version=0.0.4", app.metrics.render()),
                ),
                _ => respond(inc, allow("GET")),
            },
            (p, Mode::Session) if p == cfg.mcp_path => match method {
                Method::Post => crate::streamable::post(inc),
                Method::Get => crate::streamable::get(inc),
                Method::Delete => crate::streamable::delete(inc),
                _ => respond(inc, allow("GET, POST, DELETE")),
            },
            (p, Mode::Oneshot) if p == cfg.mcp_path => match method {
                Method::Post => crate::oneshot::post(inc),
                Method::Get => crate::oneshot::get(inc),
                _ => respond(inc, allow("GET, POST")),
            },
            (p, Mode::Session) if p == cfg.sse_path => match method {
                Method::Get => crate::legacy::open(inc),
                _ => respond(inc, allow("GET")),
            },
            (p, Mode::Session) if p == cfg.message_path => match method {
                Method::Post => crate::legacy::post(inc),
                _ => respond(inc, allow("POST")),
            },
            _ => {
                let msg = format!("Not found: {path}");
                respond(inc, Reply::error(404, -32601, msg))
            }
        }
    }

    /// DNS-rebinding protection (rules O-1, O-2, O-5, L-5), on every endpoint: a browser
    /// tricked into talking to us sends the attacker's name in Host and Origin.
    fn check_host_and_origin(inc: &Incoming) -> Result<(), Reply> {
        let cfg = &app().cfg;
        let host_header = inc.header("Host");
        if let Some(host) = host_header {
            if !host_allowed(host, cfg) {
                return Err(Reply::error(
                    403,
                    -32000,
                    format!("Forbidden: Host {host:?} is not allowed (see --allowed-host)"),
                ));
            }
        }
        if let Some(origin) = inc.header("Origin") {
            if !origin_allowed(origin, host_header, cfg) {
                return Err(Reply::error(
                    403,
                    -32000,
                    format!("Forbidden: Origin {origin:?} is not allowed (see --allowed-origin)"),
                ));
            }
        }
        Ok(())
    }

    /// Splits `host[:port]` or `[v6][:port]` into the lowercase host part.
    fn host_name(authority: &str) -> String {
        let a = authority.trim().to_ascii_lowercase();
        if let Some(rest) = a.strip_prefix('[') {
            return rest.split(']').next().unwrap_or("").to_string();
        }
        match a.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
            _ => a,
        }
    }

    fn is_loopback_name(host: &str) -> bool {
        host == "localhost"
            || host == "::1"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    pub fn host_allowed(host: &str, cfg: &config::Config) -> bool {
        let name = host_name(host);
        let full = host.trim().to_ascii_lowercase();
        let bound = host_name(&cfg.host);
        is_loopback_name(&name)
            || (name == bound && bound != "0.0.0.0" && bound != "::")
            || cfg
                .allowed_hosts
                .iter()
                .any(|a| a == "*" || *a == name || *a == full)
    }

    /// An Origin passes when it is loopback, listed, or the very origin named by an
    /// already-validated Host header (a same-origin page of an allowed name).
    pub fn origin_allowed(origin: &str, host: Option<&str>, cfg: &config::Config) -> bool {
        let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if cfg.allowed_origins.iter().any(|a| a == "*" || *a == o) {
            return true;
        }
        let Some((_, authority)) = o.split_once("://") else {
            return false;
        };
        is_loopback_name(&host_name(authority))
            || host.is_some_and(|h| h.trim().eq_ignore_ascii_case(authority))
    }

    /// Media-type check that honours wildcards; an absent Accept accepts anything.
    pub fn accepts(accept: Option<&str>, wanted: &str) -> bool {
        let Some(accept) = accept else { return true };
        let (wtype, _) = wanted.split_once('/').unwrap_or((wanted, ""));
        accept.split(',').any(|item| {
            let media = item
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            media == wanted || media == "*/*" || media == format!("{wtype}/*")
        })
    }

    pub fn is_json_content_type(ct: Option<&str>) -> bool {
        ct.is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
    }

    fn percent_decode(s: &str) -> String {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let decoded = match b[i] {
                b'%' if i + 2 < b.len() => {
                    hex(b[i + 1]).zip(hex(b[i + 2])).map(|(h, l)| h << 4 | l)
                }
                _ => None,
            };
            match (b[i], decoded) {
                (_, Some(byte)) => {
                    out.push(byte);
                    i += 2;
                }
                (b'+', None) => out.push(b' '),
                (c, None) => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads and validates a JSON-RPC POST body: 415, 413, 400 (-32700 / -32600) as the
    /// rules and SDKs answer them (P-11).
    pub fn read_jsonrpc_body(inc: &mut Incoming) -> Result<(Vec<serde_json::Value>, bool), Reply> {
        if !is_json_content_type(inc.header("Content-Type")) {
            let got = inc.header("Content-Type").unwrap_or("none").to_string();
            return Err(Reply::error(
                415,
                -32000,
                format!("Unsupported Media Type: Content-Type must be application/json, got {got}"),
            ));
        }
        let body = inc.read_body(app().cfg.max_body)?;
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Reply::error(400, -32700, format!("Parse error: invalid JSON: {e}")))?;
        let (messages, batch) = match value {
            serde_json::Value::Array(items) => (items, true),
            other => (vec![other], false),
        };
        if batch && messages.is_empty() {
            return Err(Reply::error(400, -32600, "Invalid Request: empty batch"));
        }
        for m in &messages {
            if let crate::message::Kind::Invalid(why) = crate::message::classify(m) {
                return Err(Reply::error(
                    400,
                    -32600,
                    format!("Invalid Request: not a JSON-RPC 2.0 message ({why})"),
                ));
            }
        }
        Ok((messages, batch))
    }
}

// ======================================================================================
/// Streamable HTTP on the MCP endpoint (2025-03-26 .. 2025-11-25): POST, GET and DELETE
/// for session mode. Owns the HTTP-level rules (P-*, G-*, S-*, V-*, B-*); hands messages
/// to `sessions` and streams what `sessions` routes back.
mod streamable {
    use super::*;
    use crate::app;
    use crate::http::{accepts, respond, Incoming, Reply};
    use crate::message::{classify, Kind};
    use crate::sessions::{self, Session, Transport};

    const SESSION_HEADER: &str = "Mcp-Session-Id";

    pub fn post(mut inc: Incoming) {
        let accept = inc.header("Accept");
        if !accepts(accept, "application/json") || !accepts(accept, "text/event-stream") {
            let got = accept.unwrap_or("").to_string();
            return respond(inc, Reply::error(406, -32000, format!("Not Acceptable: Accept must list application/json and text/event-stream, got {got:?}")));
        }
        let (messages, batch) = match crate::http::read_jsonrpc_body(&mut inc) {
            Ok(m) => m,
            Err(reply) => return respond(inc, reply),
        };
        let app = app();
        let is_init = |m: &serde_json::Value| {
            matches!(
                classify(m),
                Kind::Request {
                    method: "initialize",
                    ..
                }
            )
        };
        let session_id = inc.header(SESSION_HEADER).map(str::to_string);
        if messages.iter().any(is_init) {
            if batch {
                return respond(
                    inc,
                    Reply::error(
                        400,
                        -32600,
                        "Invalid Request: initialize must not be part of a batch",
                    ),
                );
            }
            if let Some(id) = session_id {
                return match app.sessions.get(&id, Transport::Streamable) {
                    Some(_) => respond(inc, Reply::error(400, -32600, "Invalid Request: Server already initialized (this session has sent initialize)")),
                    None => respond(inc, Reply::error(404, -32001, "Session not found")),
                };
            }
            let init = messages.into_iter().next().expect("one message");
            return start_session(inc, init);
        }
        let Some(id) = session_id else {
            // Also the answer to a 2026-07-28 `server/discover` probe: a 400 without a
            // modern error code, so dual-era clients fall back to initialize (N-11).
            return respond(inc, Reply::error(400, -32000, "Bad Request: Mcp-Session-Id header is required (Server not initialized: send initialize first; this server speaks MCP 2024-11-05 to 2025-11-25)"));
        };
        let Some(session) = app.sessions.get(&id, Transport::Streamable) else {
            return respond(inc, Reply::error(404, -32001, "Session not found"));
        };
        if let Err(reply) = check_version(&inc) {
            return respond(inc, reply);
        }
        if batch
            && session
                .version()
                .as_deref()
                .unwrap_or(config::ASSUMED_VERSION)
                != config::BATCH_VERSION
        {
            return respond(inc, Reply::error(400, -32600, "Invalid Request: JSON-RPC batches are only allowed with protocol version 2025-03-26"));
        }
        session.touch();
        forward_and_stream(inc, &session, messages, None);
    }

    /// Rule V-3: a present but unknown MCP-Protocol-Version is a 400; absent is fine (V-2).
    fn check_version(inc: &Incoming) -> Result<(), Reply> {
        match inc.header("MCP-Protocol-Version") {
            Some(v) if !config::SUPPORTED_VERSIONS.contains(&v) => Err(Reply::error(
                400,
                -32000,
                format!(
                    "Bad Request: Unsupported protocol version: {v} (supported versions: {})",
                    config::SUPPORTED_VERSIONS.join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }

    fn start_session(inc: Incoming, init: serde_json::Value) {
        let init_id = match classify(&init) {
            Kind::Request { id, .. } => id.clone(),
            _ => serde_json::Value::Null,
        };
        match sessions::create(Transport::Streamable) {
            Ok(session) => {
                session.set_initialize(&init_id);
                forward_and_stream(inc, &session, vec![init], Some(session.id.clone()));
            }
            Err(sessions::CreateError::Full(reply)) => respond(inc, reply),
            Err(sessions::CreateError::Spawn(msg)) => {
                respond(inc, Reply::rpc_error(502, &init_id, -32603, msg))
            }
        }
    }

    /// Sends the client's messages to the child. Notifications and responses alone get
    /// 202 (P-4); requests get an SSE stream that carries what the child says about them
    /// and ends after the last response (P-5..P-8).
    fn forward_and_stream(
        inc: Incoming,
        session: &Arc<Session>,
        messages: Vec<serde_json::Value>,
        new_session: Option<String>,
    ) {
        let has_requests = messages
            .iter()
            .any(|m| matches!(classify(m), Kind::Request { .. }));
        let (sink, rx) = match has_requests.then(|| session.new_sink()) {
            Some((s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        let requests = match session.register_requests(&messages, sink.as_ref()) {
            Ok(n) => n,
            Err(reply) => return respond(inc, reply),
        };
        if let Err(e) = session.send_to_child(&messages) {
            session.forget_requests(&messages);
            let reply = Reply::error(
                502,
                -32603,
                format!("The server process is not accepting input ({e}); the session has ended"),
            );
            sessions::end_in_background(session.clone(), sessions::EndReason::ChildGone);
            return respond(inc, reply);
        }
        // Only the routing table may hold the sending side, so the stream sees the
        // channel close if the session ends.
        drop(sink);
        let Some(rx) = rx else {
            return respond(inc, Reply::accepted());
        };
        let mut headers = vec![];
        if let Some(id) = &new_session {
            headers.push((SESSION_HEADER, id.clone()));
        }
        app().metrics.http_response(200);
        crate::log!(
            Debug,
            "http",
            "{} -> 200 stream [{}]",
            inc.summary(),
            session.tag
        );
        let chunked = inc.chunked();
        let Ok(stream) = crate::sse::SseStream::open(inc.rq.into_writer(), chunked, &headers)
        else {
            return;
        };
        crate::sse::pump(stream, rx, requests, session, crate::sse::StreamKind::Post);
    }

    pub fn get(inc: Incoming) {
        if !accepts(inc.header("Accept"), "text/event-stream") {
            return respond(
                inc,
                Reply::error(
                    406,
                    -32000,
                    "Not Acceptable: Accept must list text/event-stream",
                ),
            );
        }
        let Some(id) = inc.header(SESSION_HEADER) else {
            return respond(
                inc,
                Reply::error(
                    400,
                    -32000,
                    "Bad Request: Mcp-Session-Id header is required",
                ),
            );
        };
        let Some(session) = app().sessions.get(id, Transport::Streamable) else {
            return respond(inc, Reply::error(404, -32001, "Session not found"));
        };
        if let Err(reply) = check_version(&inc) {
            return respond(inc, reply);
        }
        let Some((rx, held)) = session.attach_listener() else {
            return respond(
                inc,
                Reply::error(
                    409,
                    -32000,
                    "Conflict: only one GET stream is allowed per session",
                ),
            );
        };
        session.touch();
        app().metrics.http_response(200);
        crate::log!(
            Debug,
            "http",
            "{} -> 200 listen [{}]",
            inc.summary(),
            session.tag
        );
        let chunked = inc.chunked();
        let Ok(mut stream) = crate::sse::SseStream::open(inc.rq.into_writer(), chunked, &[]) else {
            session.detach_listener();
            return;
        };
        if stream.flush().is_err() || held.iter().any(|m| stream.message(m).is_err()) {
            session.detach_listener();
            return;
        }
        crate::sse::pump(stream, rx, 0, &session, crate::sse::StreamKind::Listener);
    }

    /// DELETE ends the session and its child (S-7); it answers once the child is gone.
    pub fn delete(inc: Incoming) {
        let Some(id) = inc.header(SESSION_HEADER) else {
            return respond(
                inc,
                Reply::error(
                    400,
                    -32000,
                    "Bad Request: Mcp-Session-Id header is required",
                ),
            );
        };
        let Some(session) = app().sessions.get(id, Transport::Streamable) else {
            return respond(inc, Reply::error(404, -32001, "Session not found"));
        };
        sessions::end(&session, sessions::EndReason::Deleted);
        respond(inc, Reply::text(200, "", Vec::new()));
    }
}

// ======================================================================================
/// Legacy HTTP+SSE (2024-11-05): GET on the SSE path opens a session whose whole life is
/// that one stream; POSTs to the message path feed it (rules L-1..L-5).
mod legacy {
    use crate::http::{accepts, respond, Incoming, Reply};
    use crate::sessions::{self, Transport};

    pub fn open(inc: Incoming) {
        if !accepts(inc.header("Accept"), "text/event-stream") {
            return respond(
                inc,
                Reply::error(
                    406,
                    -32000,
                    "Not Acceptable: Accept must list text/event-stream",
                ),
            );
        }
        let session = match sessions::create(Transport::Legacy) {
            Ok(s) => s,
            Err(sessions::CreateError::Full(reply)) => return respond(inc, reply),
            Err(sessions::CreateError::Spawn(msg)) => {
                return respond(inc, Reply::error(502, -32603, msg))
            }
        };
        let Some((rx, _held)) = session.attach_listener() else {
            return;
        };
        crate::app().metrics.http_response(200);
        crate::log!(
            Debug,
            "http",
            "{} -> 200 legacy stream [{}]",
            inc.summary(),
            session.tag
        );
        let chunked = inc.chunked();
        let opened = crate::sse::SseStream::open(inc.rq.into_writer(), chunked, &[]);
        let endpoint = format!("{}?sessionId={}", crate::app().cfg.message_path, session.id);
        if let Ok(mut stream) = opened {
            if stream.event(Some("endpoint"), &endpoint).is_ok() {
                crate::sse::pump(stream, rx, 0, &session, crate::sse::StreamKind::Legacy);
            }
        }
        // The stream is the session: when it ends, so does the child.
        sessions::end(&session, sessions::EndReason::ClientGone);
    }

    pub fn post(mut inc: Incoming) {
        let Some(id) = inc
            .query_param("sessionId")
            .or_else(|| inc.query_param("session_id"))
        else {
            return respond(
                inc,
                Reply::error(
                    400,
                    -32000,
                    "Bad Request: sessionId query parameter is required",
                ),
            );
        };
        let Some(session) = crate::app().sessions.get(&id, Transport::Legacy) else {
            return respond(inc, Reply::error(404, -32001, "Session not found"));
        };
        let messages = match crate::http::read_jsonrpc_body(&mut inc) {
            Ok((m, _)) => m,
            Err(reply) => return respond(inc, reply),
        };
        session.touch();
        let listener = session.listener_sink();
        if let Err(reply) = session.register_requests(&messages, listener.as_ref()) {
            return respond(inc, reply);
        }
        if let Err(e) = session.send_to_child(&messages) {
            session.forget_requests(&messages);
            sessions::end_in_background(session.clone(), sessions::EndReason::ChildGone);
            return respond(
                inc,
                Reply::error(
                    502,
                    -32603,
                    format!(
                        "The server process is not accepting input ({e}); the session has ended"
                    ),
                ),
            );
        }
        respond(inc, Reply::text(202, "text/plain", "Accepted"));
    }
}

// ======================================================================================
/// One-shot mode: each request runs the child once: body in as one line, stdin closed,
/// every stdout line out as an SSE `data:` event until the child exits. A client that
/// leaves takes the child's whole process group with it.
mod oneshot {
    use super::*;
    use crate::app;
    use crate::child::ChildProc;
    use crate::http::{accepts, respond, Incoming, Reply};
    use crossbeam_channel::RecvTimeoutError;

    static ACTIVE: AtomicUsize = AtomicUsize::new(0);
    static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

    pub fn post(mut inc: Incoming) {
        if !crate::http::is_json_content_type(inc.header("Content-Type")) {
            let got = inc.header("Content-Type").unwrap_or("none").to_string();
            return respond(
                inc,
                Reply::error(
                    415,
                    -32000,
                    format!(
                        "Unsupported Media Type: Content-Type must be application/json, got {got}"
                    ),
                ),
            );
        }
        let body = match inc.read_body(app().cfg.max_body) {
            Ok(b) => b,
            Err(reply) => return respond(inc, reply),
        };
        run(inc, &body);
    }

    /// `GET /mcp?request=<url-encoded JSON>` for EventSource clients.
    pub fn get(inc: Incoming) {
        let Some(request) = inc.query_param("request") else {
            return respond(
                inc,
                Reply::error(
                    400,
                    -32600,
                    "Bad Request: the request query parameter is required (url-encoded JSON)",
                ),
            );
        };
        if request.len() > app().cfg.max_body {
            return respond(
                inc,
                Reply::error(
                    413,
                    -32600,
                    format!(
                        "Request too large: the limit is {} bytes (--max-body)",
                        app().cfg.max_body
                    ),
                ),
            );
        }
        run(inc, request.as_bytes());
    }

    fn run(inc: Incoming, body: &[u8]) {
        if !accepts(inc.header("Accept"), "text/event-stream") {
            return respond(
                inc,
                Reply::error(
                    406,
                    -32000,
                    "Not Acceptable: Accept must allow text/event-stream",
                ),
            );
        }
        // Any JSON, compacted to one line (ST-1, ST-6): the program reads lines.
        let value: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return respond(
                    inc,
                    Reply::error(400, -32700, format!("Parse error: invalid JSON: {e}")),
                )
            }
        };
        let app = app();
        if ACTIVE.fetch_add(1, Ordering::AcqRel) >= app.cfg.max_sessions {
            ACTIVE.fetch_sub(1, Ordering::AcqRel);
            app.metrics.rejected("capacity");
            let msg = format!(
                "Too many requests in flight (--max-sessions {})",
                app.cfg.max_sessions
            );
            return respond(
                inc,
                Reply::error(503, -32000, msg).with_header("Retry-After", "1"),
            );
        }
        struct Slot;
        impl Drop for Slot {
            fn drop(&mut self) {
                ACTIVE.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _slot = Slot;
        let tag = format!("os-{}", NEXT_TAG.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = crossbeam_channel::bounded::<Option<String>>(app.cfg.stream_queue);
        let stall = app.cfg.stall_timeout;
        let on_line = move |line: String| {
            if tx.send_timeout(Some(line), stall).is_err() {
                app.metrics.dropped("client_gone");
            }
        };
        let child = match crate::child::spawn(&tag) {
            Ok((c, stdout)) => {
                // The reader's end drops the sender: the stream sees the channel close.
                crate::child::start_reader(&c, stdout, Box::new(on_line), Box::new(|| {}));
                c
            }
            Err(msg) => {
                let id = value.get("id").cloned().unwrap_or(serde_json::Value::Null);
                return respond(inc, Reply::rpc_error(502, &id, -32603, msg));
            }
        };
        if let Err(e) = child.send_message(&value) {
            // The program exited before reading; its exit status and stderr follow on
            // the stream.
            crate::log!(
                Info,
                "oneshot_input_lost",
                "[{tag}] could not write the request to the program: {e}"
            );
        }
        child.close_stdin();
        app.metrics.http_response(200);
        crate::log!(Debug, "http", "{} -> 200 oneshot [{tag}]", inc.summary());
        let chunked = inc.chunked();
        let stream = crate::sse::SseStream::open(inc.rq.into_writer(), chunked, &[]);
        let delivered = stream.and_then(|s| stream_output(s, &rx, &child));
        if delivered.is_err() {
            crate::log!(
                Info,
                "oneshot_client_gone",
                "[{tag}] client disconnected; ending the child's process group"
            );
            child.kill_now(app.cfg.shutdown_grace);
        }
    }

    fn stream_output(
        mut stream: crate::sse::SseStream,
        rx: &crossbeam_channel::Receiver<Option<String>>,
        child: &Arc<ChildProc>,
    ) -> std::io::Result<()> {
        let keepalive = app().cfg.keepalive.unwrap_or(Duration::from_secs(3600));
        loop {
            match rx.recv_timeout(keepalive) {
                Ok(Some(line)) => stream.data(&line)?,
                Ok(None) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => stream.comment("keepalive")?,
            }
        }
        // stdout is closed; the exit status follows at once, unless the program closed
        // stdout and kept running, in which case it gets the grace period.
        let status = match child.wait_exit(app().cfg.shutdown_grace) {
            Some(s) => s,
            None => child.terminate(app().cfg.shutdown_grace),
        };
        if !status.success() {
            let detail = serde_json::json!({
                "error": format!("the program {}", crate::child::describe(&status)),
                "exit_code": status.code(),
                "signal": std::os::unix::process::ExitStatusExt::signal(&status),
                "stderr": child.stderr_tail(),
            });
            stream.event(Some("error"), &detail.to_string())?;
        }
        stream.finish()
    }
}

// ======================================================================================
/// JSON-RPC message shapes: classifying a message and building error responses. Pure
/// functions over serde_json values.
mod message {
    use serde_json::Value;

    pub enum Kind<'a> {
        Request { id: &'a Value, method: &'a str },
        Notification { method: &'a str },
        Response { id: &'a Value },
        Invalid(&'static str),
    }

    pub fn classify(v: &Value) -> Kind<'_> {
        let Some(obj) = v.as_object() else {
            return Kind::Invalid("not an object");
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Kind::Invalid("jsonrpc must be \"2.0\"");
        }
        let id = obj.get("id");
        match (obj.get("method"), id) {
            (Some(Value::String(method)), Some(id)) if id.is_string() || id.is_number() => {
                Kind::Request { id, method }
            }
            (Some(Value::String(_)), Some(_)) => Kind::Invalid("id must be a string or a number"),
            (Some(Value::String(method)), None) => Kind::Notification { method },
            (Some(_), _) => Kind::Invalid("method must be a string"),
            (None, Some(id)) if obj.contains_key("result") != obj.contains_key("error") => {
                Kind::Response { id }
            }
            (None, Some(_)) => Kind::Invalid("a response needs exactly one of result and error"),
            (None, None) => Kind::Invalid("neither a request, a notification nor a response"),
        }
    }

    /// The map key of an id: its JSON text, so 1 and "1" stay distinct.
    pub fn id_key(id: &Value) -> String {
        id.to_string()
    }

    pub fn progress_token(v: &Value) -> Option<&Value> {
        v.pointer("/params/_meta/progressToken")
    }

    pub fn error_response(id: &Value, code: i64, message: &str, data: Option<Value>) -> String {
        let mut error = serde_json::json!({"code": code, "message": message});
        if let Some(d) = data {
            error["data"] = d;
        }
        serde_json::json!({"jsonrpc": "2.0", "id": id, "error": error}).to_string()
    }
}

// ======================================================================================
/// Sessions and message routing: the registry of live sessions, each with its child and
/// its routing table (which stream is waiting for which request id), the router that
/// sends each child message to exactly one stream (R-2), the held queue, idle expiry and
/// session ending. Touches `child` for processes and `sse` sinks for delivery.
mod sessions {
    use super::*;
    use crate::child::ChildProc;
    use crate::http::Reply;
    use crate::message::{classify, id_key, Kind};
    use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
    use serde_json::Value;
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Transport {
        Streamable,
        Legacy,
    }

    /// What a stream's writer receives. When the session ends, the routing table drops
    /// the sending side and the stream sees its channel close.
    pub enum Frame {
        /// A message for the client; `completes` is true for a response to a request that
        /// stream is waiting for.
        Message { json: String, completes: bool },
    }

    /// The sending half of one stream's queue.
    #[derive(Clone)]
    pub struct Sink {
        pub id: u64,
        tx: Sender<Frame>,
    }

    struct InFlight {
        sink: Sink,
        seq: u64,
    }

    #[derive(Default)]
    struct Routing {
        in_flight: HashMap<String, InFlight>,
        next_seq: u64,
        /// progressToken key -> request id key (progress reaches its request's stream).
        progress: HashMap<String, String>,
        listener: Option<Sink>,
        held: VecDeque<String>,
        version: Option<String>,
        initialize_id: Option<String>,
        closed: bool,
    }

    pub struct Session {
        pub id: String,
        /// Short id for logs: full ids are bearer-like and never logged (S-10).
        pub tag: String,
        pub transport: Transport,
        pub child: Arc<ChildProc>,
        routing: Mutex<Routing>,
        last_active_ms: AtomicU64,
    }

    pub enum EndReason {
        Deleted,
        Idle,
        ChildGone,
        ClientGone,
        InitializeFailed,
        Shutdown,
    }

    impl EndReason {
        fn label(&self) -> &'static str {
            match self {
                EndReason::Deleted => "delete",
                EndReason::Idle => "idle",
                EndReason::ChildGone => "child_exit",
                EndReason::ClientGone => "client_gone",
                EndReason::InitializeFailed => "initialize_failed",
                EndReason::Shutdown => "shutdown",
            }
        }
    }

    #[derive(Default)]
    pub struct Registry {
        map: Mutex<HashMap<String, Arc<Session>>>,
    }

    impl Registry {
        pub fn get(&self, id: &str, transport: Transport) -> Option<Arc<Session>> {
            let map = self.map.lock().unwrap();
            map.get(id).filter(|s| s.transport == transport).cloned()
        }
        pub fn all(&self) -> Vec<Arc<Session>> {
            self.map.lock().unwrap().values().cloned().collect()
        }
        pub fn len(&self) -> usize {
            self.map.lock().unwrap().len()
        }
        fn remove(&self, id: &str) -> bool {
            self.map.lock().unwrap().remove(id).is_some()
        }
    }

    pub enum CreateError {
        Full(Reply),
        Spawn(String),
    }

    /// Starts a child and registers a session for it. The capacity check and the insert
    /// happen under one lock so concurrent initializes cannot overshoot --max-sessions.
    pub fn create(transport: Transport) -> Result<Arc<Session>, CreateError> {
        let app = crate::app();
        let full = || {
            app.metrics.rejected("capacity");
            let msg = format!(
                "Too many sessions (--max-sessions {}); retry later or end a session",
                app.cfg.max_sessions
            );
            CreateError::Full(Reply::error(503, -32000, msg).with_header("Retry-After", "5"))
        };
        if app.sessions.len() >= app.cfg.max_sessions {
            return Err(full());
        }
        let id = crate::random_uuid()
            .map_err(|e| CreateError::Spawn(format!("cannot make a session id: {e}")))?;
        let tag = id[..8].to_string();
        let (child, stdout) = crate::child::spawn(&tag).map_err(CreateError::Spawn)?;
        let session = Arc::new(Session {
            id: id.clone(),
            tag: tag.clone(),
            transport,
            child: child.clone(),
            routing: Mutex::new(Routing::default()),
            last_active_ms: AtomicU64::new(crate::now_ms()),
        });
        {
            let mut map = app.sessions.map.lock().unwrap();
            if map.len() >= app.cfg.max_sessions {
                drop(map);
                child.terminate(Duration::ZERO);
                return Err(full());
            }
            map.insert(id, session.clone());
        }
        let (for_lines, for_eof) = (session.clone(), session.clone());
        crate::child::start_reader(
            &child,
            stdout,
            Box::new(move |line| route_from_child(&for_lines, line)),
            Box::new(move || child_stdout_closed(&for_eof)),
        );
        app.metrics.session_opened(transport);
        crate::log!(
            Info,
            "session_open",
            "[{tag}] {transport:?} session opened, child pid {}",
            child.pid
        );
        Ok(session)
    }

    impl Session {
        pub fn touch(&self) {
            self.last_active_ms
                .store(crate::now_ms(), Ordering::Relaxed);
        }

        pub fn idle_for(&self) -> Duration {
            Duration::from_millis(
                crate::now_ms().saturating_sub(self.last_active_ms.load(Ordering::Relaxed)),
            )
        }

        pub fn version(&self) -> Option<String> {
            self.routing.lock().unwrap().version.clone()
        }

        pub fn set_initialize(&self, id: &Value) {
            self.routing.lock().unwrap().initialize_id = Some(id_key(id));
        }

        /// A bounded queue for a new stream.
        pub fn new_sink(&self) -> (Sink, Receiver<Frame>) {
            let (tx, rx) = crossbeam_channel::bounded(crate::app().cfg.stream_queue);
            (
                Sink {
                    id: crate::next_id(),
                    tx,
                },
                rx,
            )
        }

        /// Records which stream waits for each request before the child can answer.
        /// Returns how many responses the stream should expect.
        pub fn register_requests(
            &self,
            messages: &[Value],
            sink: Option<&Sink>,
        ) -> Result<usize, Reply> {
            let mut r = self.routing.lock().unwrap();
            if r.closed {
                return Err(Reply::error(404, -32001, "Session not found"));
            }
            let keys: Vec<(String, Option<String>)> = messages
                .iter()
                .filter_map(|m| match classify(m) {
                    Kind::Request { id, .. } => {
                        Some((id_key(id), crate::message::progress_token(m).map(id_key)))
                    }
                    _ => None,
                })
                .collect();
            for (i, (key, _)) in keys.iter().enumerate() {
                if r.in_flight.contains_key(key) || keys[..i].iter().any(|(k, _)| k == key) {
                    return Err(Reply::error(400, -32600, format!("Invalid Request: request id {key} is already in flight in this session")));
                }
            }
            let Some(sink) = sink else {
                if keys.is_empty() {
                    return Ok(0);
                }
                return Err(Reply::error(
                    409,
                    -32000,
                    "Conflict: no open stream to answer on",
                ));
            };
            for (key, token) in &keys {
                let seq = r.next_seq;
                r.next_seq += 1;
                r.in_flight.insert(
                    key.clone(),
                    InFlight {
                        sink: sink.clone(),
                        seq,
                    },
                );
                if let Some(t) = token {
                    r.progress.insert(t.clone(), key.clone());
                }
            }
            Ok(keys.len())
        }

        pub fn forget_requests(&self, messages: &[Value]) {
            let mut r = self.routing.lock().unwrap();
            for m in messages {
                if let Kind::Request { id, .. } = classify(m) {
                    r.in_flight.remove(&id_key(id));
                }
            }
        }

        /// Writes each message to the child as one compact line (ST-1, ST-6); a batch is
        /// unrolled, since stdio servers answer messages, not arrays.
        pub fn send_to_child(&self, messages: &[Value]) -> std::io::Result<()> {
            for m in messages {
                self.child.send_message(m)?;
                crate::app().metrics.message_in();
            }
            Ok(())
        }

        /// Opens the session's listening stream (GET, or the legacy stream). Returns the
        /// held messages to write first, or None when one is already open (409).
        pub fn attach_listener(&self) -> Option<(Receiver<Frame>, Vec<String>)> {
            let mut r = self.routing.lock().unwrap();
            if r.listener.is_some() || r.closed {
                return None;
            }
            let (sink, rx) = self.new_sink();
            r.listener = Some(sink);
            Some((rx, r.held.drain(..).collect()))
        }

        pub fn detach_listener(&self) {
            self.routing.lock().unwrap().listener = None;
        }

        pub fn listener_sink(&self) -> Option<Sink> {
            self.routing.lock().unwrap().listener.clone()
        }

        fn hold(&self, json: String) {
            let app = crate::app();
            let overflow = {
                let mut r = self.routing.lock().unwrap();
                r.held.push_back(json);
                r.held.len() > app.cfg.max_held && r.held.pop_front().is_some()
            };
            if overflow {
                app.metrics.dropped("held_overflow");
                crate::log!(Warn, "message_dropped", "[{}] no open stream and the held queue is full (--max-held {}); oldest message dropped", self.tag, app.cfg.max_held);
            }
        }
    }

    /// Sends a frame, waiting up to --stall-timeout for a slow reader (back-pressure on
    /// the child). Gives the frame back when the stream is gone or stalled.
    fn deliver(sink: &Sink, frame: Frame) -> Result<(), Frame> {
        match sink.tx.send_timeout(frame, crate::app().cfg.stall_timeout) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(f)) | Err(SendTimeoutError::Disconnected(f)) => Err(f),
        }
    }

    /// The router: runs on the child's stdout reader thread, one line at a time, so the
    /// order the child wrote is the order each stream sees (P-7).
    fn route_from_child(session: &Arc<Session>, line: String) {
        let app = crate::app();
        let value: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                // ST-5: the child's bug, not the session's end.
                app.metrics.dropped("non_json");
                let shown: String = line.chars().take(200).collect();
                crate::log!(
                    Warn,
                    "child_non_json",
                    "[{}] skipped a stdout line that is not JSON ({e}): {shown}",
                    session.tag
                );
                return;
            }
        };
        // SSE splits on CR too; JSON text may hold a raw CR only as whitespace, so
        // re-serialize in that rare case.
        let json = if line.contains('\r') {
            value.to_string()
        } else {
            line
        };
        if let Value::Array(items) = value {
            for item in items {
                route_value(session, item.to_string(), &item);
            }
        } else {
            route_value(session, json, &value);
        }
    }

    fn route_value(session: &Arc<Session>, json: String, value: &Value) {
        let app = crate::app();
        app.metrics.message_out();
        match classify(value) {
            Kind::Response { id } => {
                let key = id_key(id);
                let (target, init_failed) = {
                    let mut r = session.routing.lock().unwrap();
                    let target = r.in_flight.remove(&key);
                    r.progress.retain(|_, req| *req != key);
                    let mut init_failed = false;
                    if r.initialize_id.as_deref() == Some(key.as_str()) {
                        r.initialize_id = None;
                        match value
                            .pointer("/result/protocolVersion")
                            .and_then(Value::as_str)
                        {
                            Some(v) => r.version = Some(v.to_string()),
                            None => init_failed = true,
                        }
                    }
                    (target, init_failed)
                };
                match target {
                    Some(t) => {
                        if deliver(
                            &t.sink,
                            Frame::Message {
                                json,
                                completes: true,
                            },
                        )
                        .is_err()
                        {
                            // P-9: the client left; its answer has nowhere to go.
                            app.metrics.dropped("client_gone");
                            crate::log!(Info, "message_dropped", "[{}] response to {key} dropped: its stream was closed by the client", session.tag);
                        }
                    }
                    None => {
                        app.metrics.dropped("unknown_id");
                        crate::log!(
                            Warn,
                            "message_dropped",
                            "[{}] child answered id {key}, which no request is waiting for",
                            session.tag
                        );
                    }
                }
                if init_failed {
                    crate::log!(
                        Warn,
                        "initialize_failed",
                        "[{}] the server refused initialize; ending the session",
                        session.tag
                    );
                    end_in_background(session.clone(), EndReason::InitializeFailed);
                }
            }
            Kind::Request { method, .. } | Kind::Notification { method } => {
                let candidates = targets(session, method, value);
                let mut frame = Frame::Message {
                    json,
                    completes: false,
                };
                for sink in candidates {
                    match deliver(&sink, frame) {
                        Ok(()) => return,
                        Err(f) => frame = f,
                    }
                }
                let Frame::Message { json, .. } = frame;
                session.hold(json);
            }
            Kind::Invalid(why) => {
                app.metrics.dropped("invalid");
                crate::log!(
                    Warn,
                    "child_invalid",
                    "[{}] skipped a child message that is not JSON-RPC ({why})",
                    session.tag
                );
            }
        }
    }

    /// Where a child request or notification goes, best first: progress to the stream of
    /// the request that carried the token; list-changed and resource updates to the GET
    /// stream (G-3); anything else to the newest in-flight request's stream (P-7, S-9),
    /// else the GET stream. With nowhere to go it is held for the next GET.
    fn targets(session: &Session, method: &str, value: &Value) -> Vec<Sink> {
        let r = session.routing.lock().unwrap();
        let mut out = Vec::with_capacity(2);
        let session_wide =
            method.ends_with("/list_changed") || method == "notifications/resources/updated";
        if method == "notifications/progress" {
            let owner = value
                .pointer("/params/progressToken")
                .and_then(|t| r.progress.get(&id_key(t)))
                .and_then(|k| r.in_flight.get(k));
            if let Some(f) = owner {
                out.push(f.sink.clone());
            }
        }
        if !session_wide && out.is_empty() {
            if let Some(f) = r.in_flight.values().max_by_key(|f| f.seq) {
                out.push(f.sink.clone());
            }
        }
        if let Some(l) = &r.listener {
            if !out.iter().any(|s| s.id == l.id) {
                out.push(l.clone());
            }
        }
        out
    }

    /// The child closed stdout: it has exited or is about to. Every request still waiting
    /// gets an error naming the exit status and stderr, and the session ends (ST-7).
    fn child_stdout_closed(session: &Arc<Session>) {
        if session.routing.lock().unwrap().closed {
            return;
        }
        let grace = crate::app().cfg.shutdown_grace;
        let status = session
            .child
            .wait_exit(grace)
            .unwrap_or_else(|| session.child.terminate(grace));
        crate::log!(
            Warn,
            "child_exit",
            "[{}] server process {} while the session was open",
            session.tag,
            crate::child::describe(&status)
        );
        end(session, EndReason::ChildGone);
    }

    pub fn end_in_background(session: Arc<Session>, reason: EndReason) {
        crate::spawn_thread("end-session", move || end(&session, reason));
    }

    /// Ends a session once: fails what is in flight, closes its streams, removes it (so
    /// its id answers 404, S-5) and ends its child. Returns after the child is reaped.
    pub fn end(session: &Arc<Session>, reason: EndReason) {
        let app = crate::app();
        let (in_flight, listener) = {
            let mut r = session.routing.lock().unwrap();
            if r.closed {
                drop(r);
                session.child.terminate(app.cfg.shutdown_grace);
                return;
            }
            r.closed = true;
            r.progress.clear();
            r.held.clear();
            (std::mem::take(&mut r.in_flight), r.listener.take())
        };
        app.sessions.remove(&session.id);
        let (code, message, data) = match reason {
            EndReason::ChildGone | EndReason::InitializeFailed => {
                let status = session.child.wait_exit(Duration::ZERO);
                let what = status
                    .as_ref()
                    .map(crate::child::describe)
                    .unwrap_or_else(|| "stopped answering".into());
                let tail = session.child.stderr_tail();
                let last = tail
                    .iter()
                    .rev()
                    .take(3)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" | ");
                let msg = if last.is_empty() {
                    format!("MCP server process {what}")
                } else {
                    format!("MCP server process {what}; last stderr: {last}")
                };
                (
                    -32603,
                    msg,
                    Some(serde_json::json!({"exit": what, "stderr": tail})),
                )
            }
            EndReason::Deleted => (-32000, "Session terminated by DELETE".to_string(), None),
            EndReason::Idle => (-32000, "Session expired (idle timeout)".to_string(), None),
            EndReason::ClientGone => (
                -32000,
                "Session ended: the client disconnected".to_string(),
                None,
            ),
            EndReason::Shutdown => (-32000, "Server is shutting down".to_string(), None),
        };
        for (key, f) in in_flight {
            let id: Value = serde_json::from_str(&key).unwrap_or(Value::Null);
            let json = crate::message::error_response(&id, code, &message, data.clone());
            if deliver(
                &f.sink,
                Frame::Message {
                    json,
                    completes: true,
                },
            )
            .is_err()
            {
                app.metrics.dropped("client_gone");
            }
        }
        drop(listener);
        app.metrics
            .session_closed(session.transport, reason.label());
        crate::log!(
            Info,
            "session_close",
            "[{}] session ended ({})",
            session.tag,
            reason.label()
        );
        session.child.terminate(app.cfg.shutdown_grace);
    }

    /// Ends sessions idle longer than --session-idle-timeout. A stream that is open and
    /// writable keeps its session active (each keepalive counts), so only clients that
    /// vanished are reaped.
    pub fn run_idle_reaper() {
        let app = crate::app();
        let Some(timeout) = app.cfg.session_idle_timeout else {
            return;
        };
        let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            std::thread::sleep(tick);
            for s in app.sessions.all() {
                if s.idle_for() > timeout {
                    crate::log!(
                        Info,
                        "session_idle",
                        "[{}] idle for {:?}; ending it",
                        s.tag,
                        s.idle_for()
                    );
                    end_in_background(s, EndReason::Idle);
                }
            }
        }
    }
}

// ======================================================================================
/// The child process: one long-lived spawner thread (so PR_SET_PDEATHSIG, which fires
/// when the spawning *thread* exits, means "when stdio-sse dies"), its own process group,
/// stdout split on `\n` only, stderr to our log, and the stdin-EOF / SIGTERM / SIGKILL
/// ending. Touches nothing of HTTP.
mod child {
    use super::*;
    use crate::http::Reply;
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
    use std::sync::{Condvar, Mutex};

    pub type OnLine = Box<dyn FnMut(String) + Send>;
    pub type OnEof = Box<dyn FnOnce() + Send>;

    pub struct ChildProc {
        pub pid: i32,
        pub tag: String,
        stdin: Mutex<Option<ChildStdin>>,
        life: Mutex<Life>,
        exited: Condvar,
        stderr_tail: Mutex<VecDeque<String>>,
    }

    #[derive(Default)]
    struct Life {
        /// Set (under this lock) just before the leader is reaped: after it, its pid may
        /// be reused, so no signal may be sent to the group.
        reaping: bool,
        status: Option<ExitStatus>,
    }

    struct SpawnJob {
        tag: String,
        reply: crossbeam_channel::Sender<Result<(std::process::Child, Arc<ChildProc>), String>>,
    }

    static SPAWNER: std::sync::OnceLock<crossbeam_channel::Sender<SpawnJob>> =
        std::sync::OnceLock::new();

    /// Starts the spawner thread; it lives as long as the process.
    pub fn start_spawner() {
        let (tx, rx) = crossbeam_channel::unbounded::<SpawnJob>();
        let _ = SPAWNER.set(tx);
        crate::spawn_thread("spawner", move || {
            for job in rx {
                let _ = job.reply.send(spawn_here(&job.tag));
            }
        });
    }

    fn command() -> Command {
        let cfg = &crate::app().cfg;
        let mut cmd = Command::new(&cfg.command[0]);
        cmd.args(&cfg.command[1..]);
        cmd.envs(cfg.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &cfg.cwd {
            cmd.current_dir(dir);
        }
        cmd
    }

    fn spawn_here(tag: &str) -> Result<(std::process::Child, Arc<ChildProc>), String> {
        let cfg = &crate::app().cfg;
        let mut cmd = command();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Own process group: the whole tree can be signalled, and a Ctrl-C at a terminal
        // reaches only us, so children end in order.
        cmd.process_group(0);
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // We may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            let shown = cfg.command.join(" ");
            match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("Cannot start the server command `{shown}`: command not found ({e})")
                }
                std::io::ErrorKind::PermissionDenied => {
                    format!("Cannot start the server command `{shown}`: permission denied ({e})")
                }
                _ => format!("Cannot start the server command `{shown}`: {e}"),
            }
        })?;
        let proc_ = Arc::new(ChildProc {
            pid: child.id() as i32,
            tag: tag.to_string(),
            stdin: Mutex::new(None),
            life: Mutex::new(Life::default()),
            exited: Condvar::new(),
            stderr_tail: Mutex::new(VecDeque::new()),
        });
        Ok((child, proc_))
    }

    /// Spawns the configured command and starts its stderr and waiter threads; the
    /// caller starts the stdout reader once it is ready to route what the child says.
    pub fn spawn(tag: &str) -> Result<(Arc<ChildProc>, ChildStdout), String> {
        let app = crate::app();
        let (reply, rx) = crossbeam_channel::bounded(1);
        let spawner = SPAWNER.get().ok_or("spawner not started")?;
        spawner
            .send(SpawnJob {
                tag: tag.to_string(),
                reply,
            })
            .map_err(|_| "spawner gone".to_string())?;
        let (mut child, proc_) = rx
            .recv()
            .map_err(|_| "spawner gone".to_string())?
            .inspect_err(|e| {
                crate::log!(Error, "spawn_failed", "[{tag}] {e}");
                app.metrics.spawn_failed();
            })?;
        *proc_.stdin.lock().unwrap() = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        app.metrics.child_spawned();
        app.children
            .lock()
            .unwrap()
            .insert(proc_.pid, proc_.clone());
        crate::log!(Debug, "child_spawn", "[{tag}] started pid {}", proc_.pid);
        let p = proc_.clone();
        crate::spawn_thread("child-stderr", move || read_stderr(stderr, &p));
        let p = proc_.clone();
        crate::spawn_thread("child-wait", move || wait_and_reap(child, &p));
        Ok((proc_, stdout))
    }

    /// The reader thread: each stdout line to `on_line`, then `on_eof` once.
    pub fn start_reader(p: &ChildProc, stdout: ChildStdout, on_line: OnLine, on_eof: OnEof) {
        let max = crate::app().cfg.max_message;
        let tag = p.tag.clone();
        crate::spawn_thread("child-stdout", move || {
            read_stdout(stdout, max, &tag, on_line, on_eof)
        });
    }

    /// Blocks until the leader exits without reaping it (so its pid cannot be reused),
    /// kills what is left of its process group (orphaned grandchildren), then reaps.
    fn wait_and_reap(mut child: std::process::Child, p: &Arc<ChildProc>) {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    p.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break;
            }
        }
        {
            let mut life = p.life.lock().unwrap();
            unsafe { libc::kill(-p.pid, libc::SIGKILL) };
            life.reaping = true;
        }
        let status = child.wait().unwrap_or_else(|_| ExitStatus::from_raw(0));
        crate::app().children.lock().unwrap().remove(&p.pid);
        crate::app().metrics.child_exited(&status);
        crate::log!(
            Debug,
            "child_exit",
            "[{}] pid {} {}",
            p.tag,
            p.pid,
            describe(&status)
        );
        p.life.lock().unwrap().status = Some(status);
        p.exited.notify_all();
    }

    /// Splits stdout on `\n` only (ST-1: U+2028 inside a string is not a line break).
    fn read_stdout(stdout: ChildStdout, max: usize, tag: &str, mut on_line: OnLine, on_eof: OnEof) {
        let mut reader = BufReader::with_capacity(64 * 1024, stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match read_line_limited(&mut reader, &mut buf, max) {
                Ok(LineRead::Line) => {
                    if buf.ends_with(b"\r") {
                        buf.pop();
                    }
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    match String::from_utf8(std::mem::take(&mut buf)) {
                        Ok(line) => on_line(line),
                        Err(_) => {
                            crate::app().metrics.dropped("non_utf8");
                            crate::log!(
                                Warn,
                                "child_bad_utf8",
                                "[{tag}] skipped a stdout line that is not UTF-8 (ST-10)"
                            );
                        }
                    }
                }
                Ok(LineRead::TooLong(n)) => {
                    crate::app().metrics.dropped("too_large");
                    crate::log!(Error, "message_dropped", "[{tag}] skipped a stdout line of {n}+ bytes: larger than --max-message {max}");
                }
                Ok(LineRead::Eof) | Err(_) => break,
            }
        }
        on_eof();
    }

    pub enum LineRead {
        Line,
        TooLong(usize),
        Eof,
    }

    /// Reads one line into `buf` without the `\n`; a line longer than `limit` is consumed
    /// and reported instead of being buffered.
    pub fn read_line_limited<R: BufRead>(
        r: &mut R,
        buf: &mut Vec<u8>,
        limit: usize,
    ) -> std::io::Result<LineRead> {
        let mut skipped = 0usize;
        loop {
            let avail = match r.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                return Ok(match (skipped, buf.is_empty()) {
                    (0, true) => LineRead::Eof,
                    (0, false) => LineRead::Line,
                    (n, _) => LineRead::TooLong(n),
                });
            }
            let (chunk, found) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (&avail[..i], Some(i + 1)),
                None => (avail, None),
            };
            if skipped > 0 || buf.len() + chunk.len() > limit {
                skipped += buf.len() + chunk.len();
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
            let used = found.unwrap_or(avail.len());
            r.consume(used);
            if found.is_some() {
                return Ok(if skipped > 0 {
                    LineRead::TooLong(skipped)
                } else {
                    LineRead::Line
                });
            }
        }
    }

    /// stderr is logging, never protocol (ST-4): each line goes to our log, tagged, and
    /// the last few are kept to explain a crash.
    fn read_stderr(stderr: std::process::ChildStderr, p: &ChildProc) {
        const MAX_LINE: usize = 1024;
        let keep = crate::app().cfg.stderr_tail;
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match (&mut reader).take(64 * 1024).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&buf);
            let line: String = text
                .trim_end_matches(['\n', '\r'])
                .chars()
                .take(MAX_LINE)
                .collect();
            crate::log!(Info, "child_stderr", "[{}] child: {line}", p.tag);
            let mut tail = p.stderr_tail.lock().unwrap();
            if keep > 0 {
                if tail.len() >= keep {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    }

    impl ChildProc {
        /// Writes one message as one compact JSON line (ST-1, ST-6): serialized straight
        /// into the buffer that also takes the newline, so it leaves in one write.
        pub fn send_message(&self, message: &serde_json::Value) -> std::io::Result<()> {
            let mut framed = serde_json::to_vec(message)?;
            framed.push(b'\n');
            let mut guard = self.stdin.lock().unwrap();
            let stdin = guard.as_mut().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin closed")
            })?;
            stdin.write_all(&framed)
        }

        pub fn close_stdin(&self) {
            // A writer blocked on a full pipe holds the lock; the signals below free it.
            if let Ok(mut g) = self.stdin.try_lock() {
                g.take();
            }
        }

        pub fn stderr_tail(&self) -> Vec<String> {
            self.stderr_tail.lock().unwrap().iter().cloned().collect()
        }

        pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
            let life = self.life.lock().unwrap();
            let (life, _) = self
                .exited
                .wait_timeout_while(life, timeout, |l| l.status.is_none())
                .unwrap();
            life.status
        }

        fn signal_group(&self, sig: libc::c_int) {
            let life = self.life.lock().unwrap();
            if !life.reaping {
                unsafe { libc::kill(-self.pid, sig) };
            }
        }

        /// ST-7: close stdin, wait the grace period, SIGTERM the group, wait again,
        /// SIGKILL the group. Returns once the child is reaped.
        pub fn terminate(&self, grace: Duration) -> ExitStatus {
            self.close_stdin();
            if let Some(s) = self.wait_exit(grace) {
                return s;
            }
            crate::log!(
                Info,
                "child_term",
                "[{}] pid {} ignored stdin EOF for {grace:?}; sending SIGTERM",
                self.tag,
                self.pid
            );
            self.signal_group(libc::SIGTERM);
            self.kill_after(grace)
        }

        /// For a child whose stdin is already closed (one-shot): SIGTERM now, SIGKILL
        /// after the grace period.
        pub fn kill_now(&self, grace: Duration) -> ExitStatus {
            self.close_stdin();
            self.signal_group(libc::SIGTERM);
            self.kill_after(grace)
        }

        fn kill_after(&self, grace: Duration) -> ExitStatus {
            if let Some(s) = self.wait_exit(grace) {
                return s;
            }
            crate::log!(
                Warn,
                "child_kill",
                "[{}] pid {} still running {grace:?} after SIGTERM; sending SIGKILL",
                self.tag,
                self.pid
            );
            self.signal_group(libc::SIGKILL);
            loop {
                if let Some(s) = self.wait_exit(Duration::from_secs(60)) {
                    return s;
                }
            }
        }
    }

    pub fn describe(status: &ExitStatus) -> String {
        match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "exited".to_string(),
        }
    }

    /// /readyz: can a child be started? The command must resolve to an executable file.
    pub fn readiness() -> Reply {
        let cfg = &crate::app().cfg;
        let program = &cfg.command[0];
        let path_var = cfg
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("PATH").ok());
        let found = resolve(program, cfg.cwd.as_deref(), path_var.as_deref());
        match found {
            Some(path) => Reply::json(
                200,
                serde_json::json!({"status": "ready", "command": path.display().to_string()}),
            ),
            None => Reply::json(
                503,
                serde_json::json!({"status": "not ready", "reason": format!("command {program:?} is not an executable file on PATH")}),
            ),
        }
    }

    fn resolve(
        program: &str,
        cwd: Option<&std::path::Path>,
        path_var: Option<&str>,
    ) -> Option<std::path::PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let executable = |p: &std::path::Path| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if program.contains('/') {
            let p = std::path::Path::new(program);
            let p = match cwd {
                Some(dir) if p.is_relative() => dir.join(p),
                _ => p.to_path_buf(),
            };
            return executable(&p).then_some(p);
        }
        path_var?
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| std::path::Path::new(d).join(program))
            .find(|p| executable(p))
    }
}

// ======================================================================================
/// SSE framing on a connection handed over by tiny_http: the status line and headers,
/// one HTTP chunk per flush (tiny_http's own encoder would hold ~8 KiB back), and the
/// stream pump that turns a session queue into events. Touches only the writer it owns.
mod sse {
    use super::*;
    use crate::sessions::{Frame, Session};
    use crossbeam_channel::{Receiver, RecvTimeoutError};
    use std::io::Write;

    pub fn status_line(status: u16) -> String {
        let reason = match status {
            200 => "OK",
            202 => "Accepted",
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            406 => "Not Acceptable",
            409 => "Conflict",
            413 => "Content Too Large",
            415 => "Unsupported Media Type",
            500 => "Internal Server Error",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            _ => "Status",
        };
        format!("HTTP/1.1 {status} {reason}\r\n")
    }

    pub struct SseStream {
        out: Box<dyn Write + Send>,
        chunked: bool,
        buf: Vec<u8>,
    }

    impl SseStream {
        /// Writes and flushes the head at once, so clients see the stream open (and the
        /// session id) before the first event.
        pub fn open(
            out: Box<dyn Write + Send>,
            chunked: bool,
            extra: &[(&str, String)],
        ) -> std::io::Result<SseStream> {
            let mut head = status_line(200);
            head.push_str("Content-Type: text/event-stream\r\nCache-Control: no-cache, no-transform\r\nX-Accel-Buffering: no\r\n");
            for (k, v) in extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str(if chunked {
                "Transfer-Encoding: chunked\r\n\r\n"
            } else {
                "Connection: close\r\n\r\n"
            });
            let mut s = SseStream {
                out,
                chunked,
                buf: Vec::with_capacity(4096),
            };
            s.buf.extend_from_slice(head.as_bytes());
            s.flush()?;
            Ok(s)
        }

        /// Frames one event into the pending buffer as its own chunk.
        fn push(&mut self, parts: &[&[u8]]) {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            if self.chunked {
                self.buf
                    .extend_from_slice(format!("{len:x}\r\n").as_bytes());
            }
            for p in parts {
                self.buf.extend_from_slice(p);
            }
            if self.chunked {
                self.buf.extend_from_slice(b"\r\n");
            }
        }

        pub fn push_message(&mut self, json: &str) {
            self.push(&[b"event: message\ndata: ", json.as_bytes(), b"\n\n"]);
        }

        pub fn flush(&mut self) -> std::io::Result<()> {
            let r = self.out.write_all(&self.buf).and_then(|_| self.out.flush());
            self.buf.clear();
            r
        }

        pub fn message(&mut self, json: &str) -> std::io::Result<()> {
            self.push_message(json);
            self.flush()
        }

        pub fn event(&mut self, event: Option<&str>, data: &str) -> std::io::Result<()> {
            match event {
                Some(e) => self.push(&[
                    b"event: ",
                    e.as_bytes(),
                    b"\ndata: ",
                    data.as_bytes(),
                    b"\n\n",
                ]),
                None => self.push(&[b"data: ", data.as_bytes(), b"\n\n"]),
            }
            self.flush()
        }

        /// A `data:` event for a line of any program (one-shot); a CR inside the line
        /// would end the SSE line early, so it splits into several data lines.
        pub fn data(&mut self, line: &str) -> std::io::Result<()> {
            if !line.contains('\r') {
                return self.event(None, line);
            }
            let body: String = line.split('\r').map(|l| format!("data: {l}\n")).collect();
            self.push(&[body.as_bytes(), b"\n"]);
            self.flush()
        }

        pub fn comment(&mut self, text: &str) -> std::io::Result<()> {
            self.push(&[b": ", text.as_bytes(), b"\n\n"]);
            self.flush()
        }

        /// Ends the stream; the connection stays open for the next request.
        pub fn finish(mut self) -> std::io::Result<()> {
            if self.chunked {
                self.buf.extend_from_slice(b"0\r\n\r\n");
            }
            self.flush()
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum StreamKind {
        /// A POST's stream: ends after `expected` responses.
        Post,
        /// The GET stream: lives until the session ends or the client leaves.
        Listener,
        /// The legacy stream: like a listener; its end ends the session.
        Legacy,
    }

    /// Writes queued frames as events until the stream is done. Frames already waiting
    /// are written together in one flush. Each successful write counts as session
    /// activity; a failed write means the client left.
    pub fn pump(
        mut stream: SseStream,
        rx: Receiver<Frame>,
        mut expected: usize,
        session: &Session,
        kind: StreamKind,
    ) {
        const MAX_BATCH: usize = 64;
        let keepalive = crate::app()
            .cfg
            .keepalive
            .unwrap_or(Duration::from_secs(3600));
        let done = loop {
            let first = match rx.recv_timeout(keepalive) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) => {
                    if stream.comment("keepalive").is_err() {
                        break false;
                    }
                    session.touch();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break true,
            };
            let mut finished = false;
            let mut frame = Some(first);
            let mut batched = 0;
            while let Some(Frame::Message { json, completes }) = frame.take() {
                stream.push_message(&json);
                if completes && kind == StreamKind::Post {
                    expected = expected.saturating_sub(1);
                    finished = expected == 0;
                }
                batched += 1;
                if !finished && batched < MAX_BATCH {
                    frame = rx.try_recv().ok();
                }
            }
            if finished {
                break true;
            }
            if stream.flush().is_err() {
                break false;
            }
            session.touch();
        };
        if done {
            if stream.finish().is_ok() {
                session.touch();
            }
        } else {
            crate::log!(
                Debug,
                "stream_closed",
                "[{}] client closed a stream",
                session.tag
            );
        }
        if kind == StreamKind::Listener {
            session.detach_listener();
        }
    }
}

// ======================================================================================
/// Observability: the log (one line per event to stderr) and the counters behind
/// /metrics. Everything else calls in; this calls nothing.
mod observe {
    use super::*;
    use std::fmt::Write as _;
    use std::sync::Mutex;

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
    pub enum Level {
        Error = 0,
        Warn = 1,
        Info = 2,
        Debug = 3,
    }

    impl Level {
        pub fn parse(s: &str) -> Option<Level> {
            match s.to_ascii_lowercase().as_str() {
                "error" => Some(Level::Error),
                "warn" | "warning" => Some(Level::Warn),
                "info" => Some(Level::Info),
                "debug" => Some(Level::Debug),
                _ => None,
            }
        }
        fn name(self) -> &'static str {
            match self {
                Level::Error => "ERROR",
                Level::Warn => "WARN",
                Level::Info => "INFO",
                Level::Debug => "DEBUG",
            }
        }
    }

    pub static LEVEL: std::sync::atomic::AtomicU8 =
        std::sync::atomic::AtomicU8::new(Level::Info as u8);

    pub fn enabled(level: Level) -> bool {
        level as u8 <= LEVEL.load(Ordering::Relaxed)
    }

    pub fn emit(level: Level, event: &str, msg: std::fmt::Arguments) {
        use std::io::Write;
        let line = format!("{} {:5} {event}: {msg}\n", timestamp(), level.name());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    /// RFC 3339 UTC with milliseconds, from the civil-from-days algorithm (no tz data).
    fn timestamp() -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs() as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            now.subsec_millis()
        )
    }

    /// Counters with bounded label values (no session ids, no free-form paths).
    #[derive(Default)]
    pub struct Metrics {
        http: [AtomicU64; 5],
        sessions_opened: [AtomicU64; 2],
        sessions_closed: Mutex<Vec<(&'static str, &'static str, u64)>>,
        children_spawned: AtomicU64,
        spawn_failures: AtomicU64,
        children_exited_ok: AtomicU64,
        children_exited_err: AtomicU64,
        messages_in: AtomicU64,
        messages_out: AtomicU64,
        dropped: Mutex<Vec<(&'static str, u64)>>,
        rejected: Mutex<Vec<(&'static str, u64)>>,
    }

    fn bump(list: &Mutex<Vec<(&'static str, u64)>>, label: &'static str) {
        let mut l = list.lock().unwrap();
        match l.iter_mut().find(|(k, _)| *k == label) {
            Some((_, n)) => *n += 1,
            None => l.push((label, 1)),
        }
    }

    /// A metric family: name, help, type, and its (labels, value) samples.
    type Family<'a> = (&'a str, &'a str, &'a str, Vec<(String, u64)>);

    fn transport_label(t: crate::sessions::Transport) -> &'static str {
        match t {
            crate::sessions::Transport::Streamable => "streamable_http",
            crate::sessions::Transport::Legacy => "sse",
        }
    }

    impl Metrics {
        pub fn http_response(&self, status: u16) {
            let class = (status / 100).clamp(1, 5) as usize - 1;
            self.http[class].fetch_add(1, Ordering::Relaxed);
        }
        pub fn session_opened(&self, t: crate::sessions::Transport) {
            self.sessions_opened[t as usize].fetch_add(1, Ordering::Relaxed);
        }
        pub fn session_closed(&self, t: crate::sessions::Transport, reason: &'static str) {
            let mut l = self.sessions_closed.lock().unwrap();
            let tl = transport_label(t);
            match l.iter_mut().find(|(a, b, _)| *a == tl && *b == reason) {
                Some((_, _, n)) => *n += 1,
                None => l.push((tl, reason, 1)),
            }
        }
        pub fn child_spawned(&self) {
            self.children_spawned.fetch_add(1, Ordering::Relaxed);
        }
        pub fn spawn_failed(&self) {
            self.spawn_failures.fetch_add(1, Ordering::Relaxed);
        }
        pub fn child_exited(&self, status: &std::process::ExitStatus) {
            let c = if status.success() {
                &self.children_exited_ok
            } else {
                &self.children_exited_err
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        pub fn message_in(&self) {
            self.messages_in.fetch_add(1, Ordering::Relaxed);
        }
        pub fn message_out(&self) {
            self.messages_out.fetch_add(1, Ordering::Relaxed);
        }
        /// A message we could not deliver: logged by the caller, counted here.
        pub fn dropped(&self, reason: &'static str) {
            bump(&self.dropped, reason);
        }
        pub fn rejected(&self, reason: &'static str) {
            bump(&self.rejected, reason);
        }

        pub fn render(&self) -> String {
            let app = crate::app();
            let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
            let label = |key: &str, value: &str| format!("{{{key}=\"{value}\"}}");
            let by = |key: &str, list: &Mutex<Vec<(&'static str, u64)>>| -> Vec<(String, u64)> {
                list.lock()
                    .unwrap()
                    .iter()
                    .map(|(v, n)| (label(key, v), *n))
                    .collect()
            };
            let mode = format!("{:?}", app.cfg.mode).to_lowercase();
            let version = env!("CARGO_PKG_VERSION");
            let families: Vec<Family> = vec![
                (
                    "build_info",
                    "Version and mode of this stdio-sse.",
                    "gauge",
                    vec![(format!("{{version=\"{version}\",mode=\"{mode}\"}}"), 1)],
                ),
                (
                    "http_responses_total",
                    "HTTP responses by status class.",
                    "counter",
                    self.http
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (label("class", &format!("{}xx", i + 1)), load(c)))
                        .collect(),
                ),
                (
                    "sessions_opened_total",
                    "Sessions opened, by transport.",
                    "counter",
                    ["streamable_http", "sse"]
                        .iter()
                        .zip(&self.sessions_opened)
                        .map(|(t, c)| (label("transport", t), load(c)))
                        .collect(),
                ),
                (
                    "sessions_closed_total",
                    "Sessions closed, by transport and reason.",
                    "counter",
                    self.sessions_closed
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(t, r, n)| (format!("{{transport=\"{t}\",reason=\"{r}\"}}"), *n))
                        .collect(),
                ),
                (
                    "sessions_active",
                    "Sessions open now.",
                    "gauge",
                    vec![(String::new(), app.sessions.len() as u64)],
                ),
                (
                    "children_spawned_total",
                    "Child processes started.",
                    "counter",
                    vec![(String::new(), load(&self.children_spawned))],
                ),
                (
                    "child_spawn_failures_total",
                    "Child processes that could not be started.",
                    "counter",
                    vec![(String::new(), load(&self.spawn_failures))],
                ),
                (
                    "children_exited_total",
                    "Child processes reaped, by outcome.",
                    "counter",
                    vec![
                        (label("status", "success"), load(&self.children_exited_ok)),
                        (label("status", "failure"), load(&self.children_exited_err)),
                    ],
                ),
                (
                    "children_active",
                    "Child processes running now.",
                    "gauge",
                    vec![(String::new(), app.children.lock().unwrap().len() as u64)],
                ),
                (
                    "messages_total",
                    "JSON-RPC messages relayed, by direction.",
                    "counter",
                    vec![
                        (label("direction", "to_child"), load(&self.messages_in)),
                        (label("direction", "from_child"), load(&self.messages_out)),
                    ],
                ),
                (
                    "messages_dropped_total",
                    "Messages that could not be delivered, by reason.",
                    "counter",
                    by("reason", &self.dropped),
                ),
                (
                    "requests_rejected_total",
                    "Requests refused for capacity, by reason.",
                    "counter",
                    by("reason", &self.rejected),
                ),
            ];
            let mut o = String::new();
            for (name, help, kind, samples) in families {
                let _ = writeln!(
                    o,
                    "# HELP stdio_sse_{name} {help}\n# TYPE stdio_sse_{name} {kind}"
                );
                for (labels, value) in samples {
                    let _ = writeln!(o, "stdio_sse_{name}{labels} {value}");
                }
            }
            o
        }
    }

    #[macro_export]
    macro_rules! log {
        ($level:ident, $event:expr, $($arg:tt)*) => {
            if $crate::observe::enabled($crate::observe::Level::$level) {
                $crate::observe::emit($crate::observe::Level::$level, $event, format_args!($($arg)*))
            }
        };
    }
}

// ======================================================================================
/// The built-in demo server, run as a real child (`stdio-sse __demo-server`) when no
/// COMMAND is given: an MCP server on stdio with an `echo` and an `add` tool. Also the
/// benchmark's fast child. Shares nothing with the bridge but serde_json.
mod demo {
    use serde_json::{json, Value};
    use std::io::{BufRead, Write};

    pub fn run() {
        let stdin = std::io::stdin();
        let mut out = std::io::stdout().lock();
        let mut line = String::new();
        let mut input = stdin.lock();
        loop {
            line.clear();
            match input.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let Some(reply) = answer(&msg) else { continue };
            if out
                .write_all(reply.to_string().as_bytes())
                .and_then(|_| out.write_all(b"\n"))
                .and_then(|_| out.flush())
                .is_err()
            {
                return;
            }
        }
    }

    fn answer(msg: &Value) -> Option<Value> {
        let id = msg.get("id")?.clone();
        let method = msg.get("method")?.as_str()?;
        let params = msg.get("params").cloned().unwrap_or(json!({}));
        let result = match method {
            "initialize" => {
                let asked = params
                    .get("protocolVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let version = if crate::config::SUPPORTED_VERSIONS.contains(&asked) {
                    asked
                } else {
                    "2025-11-25"
                };
                Ok(json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "stdio-sse-demo", "version": env!("CARGO_PKG_VERSION")}
                }))
            }
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({"tools": [
                {"name": "echo", "description": "Returns its message",
                 "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}},
                {"name": "add", "description": "Adds two numbers",
                 "inputSchema": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}
            ]})),
            "tools/call" => {
                let args = params.get("arguments").cloned().unwrap_or(json!({}));
                match params.get("name").and_then(Value::as_str) {
                    Some("echo") => {
                        let text = args
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string();
                        Ok(json!({"content": [{"type": "text", "text": text}]}))
                    }
                    Some("add") => {
                        let sum = args.get("a").and_then(Value::as_f64).unwrap_or(0.0)
                            + args.get("b").and_then(Value::as_f64).unwrap_or(0.0);
                        Ok(json!({"content": [{"type": "text", "text": sum.to_string()}]}))
                    }
                    other => Ok(
                        json!({"isError": true, "content": [{"type": "text", "text": format!("Unknown tool: {}", other.unwrap_or(""))}]}),
                    ),
                }
            }
            _ => Err(json!({"code": -32601, "message": format!("Method not found: {method}")})),
        };
        Some(match result {
            Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
            Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e}),
        })
    }
}

// ======================================================================================
// Process-wide state, signals and main.

pub struct App {
    pub cfg: config::Config,
    pub sessions: sessions::Registry,
    pub children: std::sync::Mutex<std::collections::HashMap<i32, Arc<child::ChildProc>>>,
    pub metrics: observe::Metrics,
    pub shutting_down: AtomicBool,
}

static APP: std::sync::OnceLock<App> = std::sync::OnceLock::new();
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

pub fn app() -> &'static App {
    APP.get().expect("app initialised in main")
}

pub fn now_ms() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Idle SSE streams are threads; a small stack keeps thousands of them cheap.
pub fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    const THREAD_STACK: usize = 256 * 1024;
    if let Err(e) = std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(THREAD_STACK)
        .spawn(f)
    {
        log!(
            Error,
            "thread_spawn_failed",
            "cannot start a {name} thread: {e}"
        );
    }
}

/// A version-4 UUID from the kernel's random source (S-2: unguessable session ids).
pub fn random_uuid() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in every thread (threads inherit the mask; std
/// resets it in children) so one thread can take them with sigwait.
fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// First SIGINT/SIGTERM: refuse new work, end every session and child in order, exit 0.
/// A second one during that: kill every child group at once and exit.
fn handle_signals(set: libc::sigset_t) {
    loop {
        let mut sig: libc::c_int = 0;
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        let app = app();
        if sig == libc::SIGHUP {
            log!(Info, "signal", "SIGHUP received; nothing to reload");
            continue;
        }
        if app.shutting_down.swap(true, Ordering::AcqRel) {
            log!(Warn, "signal", "second signal: killing every child now");
            for c in app.children.lock().unwrap().values() {
                unsafe { libc::kill(-c.pid, libc::SIGKILL) };
            }
            std::process::exit(0);
        }
        log!(
            Info,
            "shutdown",
            "signal {sig} received: ending {} sessions and their children",
            app.sessions.len()
        );
        spawn_thread("shutdown", shutdown);
    }
}

fn shutdown() {
    let app = app();
    let mut joins = Vec::new();
    for s in app.sessions.all() {
        joins.push(std::thread::spawn(move || {
            sessions::end(&s, sessions::EndReason::Shutdown)
        }));
    }
    let others: Vec<_> = app.children.lock().unwrap().values().cloned().collect();
    for c in others {
        let grace = app.cfg.shutdown_grace;
        joins.push(std::thread::spawn(move || {
            c.terminate(grace);
        }));
    }
    for j in joins {
        let _ = j.join();
    }
    log!(Info, "shutdown", "all children ended; exiting");
    std::process::exit(0);
}

/// Our own executable, for the demo child. /proc may be missing (scratch containers,
/// chroots), so fall back to argv[0] when it names a path.
fn self_exe(argv0: &str) -> Option<String> {
    if let Ok(p) = std::env::current_exe() {
        return Some(p.display().to_string());
    }
    argv0.contains('/').then(|| argv0.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(config::DEMO_ARG) {
        demo::run();
        return;
    }
    let mut cfg = match config::parse(&args[1..], &|k| std::env::var(k).ok()) {
        Ok(config::Parsed::Run(c)) => c,
        Ok(config::Parsed::Help) => {
            print!("{}", config::help());
            return;
        }
        Ok(config::Parsed::Version) => {
            println!("stdio-sse {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) => {
            eprintln!("stdio-sse: {e}");
            std::process::exit(2);
        }
    };
    observe::LEVEL.store(cfg.log_level as u8, Ordering::Relaxed);
    if cfg.demo {
        let Some(exe) = self_exe(&args[0]) else {
            eprintln!(
                "stdio-sse: cannot find our own executable to run the demo server; give a COMMAND"
            );
            std::process::exit(2);
        };
        cfg.command = vec![exe, config::DEMO_ARG.to_string()];
    }
    START.get_or_init(Instant::now);
    let sigset = block_signals();

    let listener = match std::net::TcpListener::bind((cfg.host.as_str(), cfg.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("stdio-sse: cannot listen on {}:{}: {e}", cfg.host, cfg.port);
            std::process::exit(1);
        }
    };
    // Accepted sockets inherit TCP_NODELAY: each SSE event leaves when it is flushed.
    unsafe {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            4,
        );
    }
    let addr = listener.local_addr().expect("bound socket has an address");
    let server = match tiny_http::Server::from_listener(listener, None) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("stdio-sse: cannot start the HTTP server: {e}");
            std::process::exit(1);
        }
    };
    let demo = cfg.demo;
    let mode = cfg.mode;
    let (mcp, sse) = (cfg.mcp_path.clone(), cfg.sse_path.clone());
    let command = cfg.command.join(" ");
    if APP
        .set(App {
            cfg: *cfg,
            sessions: sessions::Registry::default(),
            children: Default::default(),
            metrics: observe::Metrics::default(),
            shutting_down: AtomicBool::new(false),
        })
        .is_err()
    {
        unreachable!("main runs once");
    }
    child::start_spawner();
    let url = format!("http://{addr}");
    match mode {
        config::Mode::Session => log!(
            Info,
            "listening",
            "listening on {url} (mcp: {mcp}, sse: {sse})"
        ),
        config::Mode::Oneshot => log!(Info, "listening", "listening on {url} (oneshot: {mcp})"),
    }
    if demo {
        log!(
            Info,
            "demo",
            "no COMMAND given: serving the built-in demo server (tools: echo, add)"
        );
        eprintln!(
            "try:\n  curl -N -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\\n    -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{{}},\"clientInfo\":{{\"name\":\"curl\",\"version\":\"1\"}}}}}}' \\\n    {url}{mcp}"
        );
    } else {
        log!(Info, "command", "child command: {command}");
    }
    spawn_thread("idle-reaper", sessions::run_idle_reaper);
    http::serve(server);
    handle_signals(sigset);
}
