//! stdio-sse: serve a stdio MCP server (or any line-oriented JSON program) over HTTP.
//!
//!     stdio-sse [OPTIONS] [--] COMMAND [ARGS...]
//!     stdio-sse check [OPTIONS] [--] COMMAND [ARGS...]   (does the server work? why not?)
//!
//! The file reads top to bottom in the order a message travels: configuration, the HTTP
//! front door, the three transports (Streamable HTTP, legacy HTTP+SSE, one-shot), sessions
//! and message routing, the child process, SSE framing, observability, and last the
//! built-in demo server that runs when no COMMAND is given.
//!
//! Contents (each module opens with what it owns, what it touches and its rules):
//!
//! | module | what it is |
//! |---|---|
//! | `config` | every default and limit, the flag table, parsing flags and `STDIO_SSE_*` |
//! | `refusal` | every refusal the server gives: status, code, words, headers, reason |
//! | `door` | the connection layer below HTTP: accept, framing, deadlines, early refusals |
//! | `http` | the listener, workers, routing, Host/Origin/CORS, bodies, replies |
//! | `auth` | bearer tokens and what a session inherits from its first request |
//! | `ratelimit` | --rate-limit buckets per token or client address, --trusted-proxy, sessions per client |
//! | `servers` | the servers behind the port (COMMAND's, or --config's), their paths, reload |
//! | `streamable` | Streamable HTTP (2025-03-26 .. 2025-11-25): POST, GET, DELETE |
//! | `legacy` | HTTP+SSE (2024-11-05): the `/sse` stream and its message endpoint |
//! | `modern` | 2026-07-28 (stateless) on `/mcp`: validation, discover, carriers, MRTR, listen |
//! | `oneshot` | one child per request: body in, stdout out as SSE |
//! | `message` | JSON-RPC shapes: classification, ids, error bodies, parsing limits |
//! | `sessions` | sessions, streams, the replay buffer and routing to them |
//! | `upstream` | a session's child: its own, a warm one, or a shared one with id rewriting |
//! | `merged` | the merged endpoint: one MCP server made of every --config server |
//! | `child` | spawning, reading stdout and stderr, reaping, readiness |
//! | `check` | `stdio-sse check`: start a server, talk to it, say whether it works and why not |
//! | `ownership` | process groups, parent-death, the guardian, PID 1 duties |
//! | `teardown` | how a child ends (the escalation table), signals, shutdown in order |
//! | `sse` | SSE framing on a connection handed over by tiny_http |
//! | `observe` | the log, the access log, metrics |
//! | `console` | the browser page at `/` for trying the server (--console) |
//! | `demo` | the built-in MCP server run when no COMMAND is given |
//! | `memory` | a small allocation cache in front of musl's allocator |
//!
//! Last come `main` (its startup steps) and the panic hook.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ======================================================================================
/// Configuration: every default and limit in one block, the flag table, and parsing of
/// the command line and `STDIO_SSE_*` variables. Touches nothing but its own values.
/// Owns: every default and limit (each a named constant with its reason), the flag
/// table, `Config`. Touches: nothing but the files a flag names (token file, PEM).
/// Rules: O-3 (loopback by default), OP-8.
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
    /// Parsed, JSON takes about 17 times its text in memory (serde_json values): a
    /// `[0,0,…]` body of 4 MiB peaks near 70 MiB. Bodies over SMALL_BODY share this many
    /// bytes of text being parsed at once (about 1 GiB of peak memory), so a burst of
    /// large bodies on every connection cannot exhaust memory; beyond it they get 503.
    pub const DEFAULT_PARSE_BUDGET: &str = "64MiB";
    /// Bodies up to this size are parsed without asking the budget: even
    /// --max-connections of them at once cost little.
    pub const SMALL_BODY: usize = 64 * 1024;
    /// Largest line the child may print; beyond it the line is dropped (logged, counted)
    /// so one runaway message cannot take the bridge's memory.
    pub const DEFAULT_MAX_MESSAGE: &str = "64MiB";
    /// One child per session: this caps processes as much as sessions.
    pub const DEFAULT_MAX_SESSIONS: &str = "100";
    /// Clients that vanish without DELETE leave a child behind; this is when we reap it.
    pub const DEFAULT_SESSION_IDLE_TIMEOUT: &str = "30m";
    /// A child's request for a client with no stream open waits this long for one (a
    /// client that dropped its GET stream reconnects within its retry, a second or two);
    /// then the child gets an error, rather than wait on a client that may be gone.
    pub const DEFAULT_CLIENT_REQUEST_TIMEOUT: &str = "10s";
    /// At --max-sessions, a session unattended this long is ended for a new one rather
    /// than the new one refused: long enough that a client between two calls of one task
    /// keeps its session, short against --session-idle-timeout.
    pub const DEFAULT_EVICT_IDLE_AFTER: &str = "60s";
    /// Below common proxy read timeouts (nginx 60 s) so idle streams survive them, and the
    /// write is how a vanished client is noticed.
    pub const DEFAULT_KEEPALIVE: &str = "15s";
    /// Time a child gets after stdin EOF, and again after SIGTERM, before the next step.
    pub const DEFAULT_SHUTDOWN_GRACE: &str = "5s";
    pub const DEFAULT_LOG_LEVEL: &str = "info";
    /// Text for people at a terminal; json for log shippers (one object per line).
    pub const DEFAULT_LOG_FORMAT: &str = "text";
    /// A tap left on for a day of traffic fills no disk: two files of this size at most
    /// (PATH and PATH.1).
    pub const DEFAULT_TAP_MAX_SIZE: &str = "64MiB";
    /// One line per HTTP request: what an operator reads first when a client complains.
    pub const DEFAULT_ACCESS_LOG: &str = "true";
    /// The browser console at `/`: on only when bound to loopback (module `console`
    /// says why).
    pub const DEFAULT_CONSOLE: &str = "auto";
    /// --probe without a URL: the readiness endpoint of an instance on the default port.
    pub const DEFAULT_PROBE_PATH: &str = "/readyz";
    /// The longest duration any flag takes: a deadline computed from it never
    /// overflows, and no setting needs more.
    pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    /// --probe gives up on a server that does not answer within this.
    pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
    /// Events kept per session for clients that resume a stream (and for messages that
    /// wait for a GET stream): whichever bound is reached first evicts the oldest.
    pub const DEFAULT_REPLAY_BUFFER: &str = "1000,8MiB";
    /// Events and bytes queued for one connection before the child's next message
    /// waits for the client to read (session mode: the child waits, as it would on a
    /// pipe), or, on a shared child that must not wait for one client, before a client
    /// whose socket has taken nothing for NOT_READING is cut (its events stay in the
    /// replay buffer). A client that reads is never cut, however far behind.
    pub const DEFAULT_STREAM_QUEUE: &str = "1024,4MiB";
    /// The most events --stream-queue takes: a one-shot stream's queue is allocated
    /// whole when it opens.
    pub const MAX_STREAM_QUEUE_EVENTS: usize = 1 << 20;
    /// A shared child's connection over --stream-queue whose socket has taken nothing
    /// for this long is not reading: cut, so the other sessions on the child go on.
    pub const NOT_READING: std::time::Duration = std::time::Duration::from_secs(1);
    /// And one whose queue reaches this many times --stream-queue is cut whatever its
    /// socket does: memory stays bounded.
    pub const SHARED_QUEUE_HARD_FACTOR: usize = 4;
    /// With --keepalive 0 a stream writer still wakes this often (writing nothing), so
    /// a wait is never unbounded.
    pub const KEEPALIVE_OFF_WAKE: std::time::Duration = std::time::Duration::from_secs(3600);
    /// With --stall-timeout 0 (writes never fail) a child of its own still waits at
    /// most this long for a client that takes nothing, so no child waits for ever.
    pub const NOT_READING_UNBOUNDED_WRITES: std::time::Duration =
        std::time::Duration::from_secs(30);
    /// A write that the client does not drain for this long fails (SO_SNDTIMEO), so a
    /// stuck client never holds a thread for ever.
    pub const DEFAULT_STALL_TIMEOUT: &str = "30s";
    /// The `retry:` sent to clients at 2025-11-25 or later: how soon they reconnect.
    pub const DEFAULT_SSE_RETRY: &str = "1s";
    /// A POST answer's SSE head (and priming event) waits this long for the first event:
    /// most answers come sooner and then leave in one write, one wake-up for the client
    /// (the bench's c=64 rose by a third). A slower answer's head goes out after it.
    pub const DEFAULT_HEAD_HOLD: &str = "1ms";
    /// Shared mode: children serving all sessions. One is the point of sharing.
    pub const DEFAULT_CHILDREN: &str = "1";
    /// Session mode: children started ahead of sessions. Off: each costs a process.
    pub const DEFAULT_WARM: &str = "0";
    /// What the child speaks. Legacy: every stdio server in the wild wants
    /// `initialize`, and the SDKs' dual-era servers take it too; probing (auto) starts
    /// the server once more at startup (side effects, startup time; rmcp servers exit on
    /// a request before initialize), so it is asked for, not assumed.
    pub const DEFAULT_CHILD_PROTOCOL: &str = "legacy";
    /// Session mode: idle children kept initialized for 2026-07-28 calls (more are
    /// started as calls need them, and retired after a while idle).
    pub const DEFAULT_MODERN_POOL: &str = "4";
    /// A call parked for the client's input (MRTR) waits this long for its retry; then
    /// it is cancelled on the child. Long enough for a person to answer a form.
    pub const DEFAULT_INPUT_TTL: &str = "5m";
    /// Shared mode: first restart delay, doubled after each fast failure, up to the max.
    pub const DEFAULT_RESTART_DELAY: &str = "100ms";
    pub const DEFAULT_RESTART_DELAY_MAX: &str = "30s";
    /// This many failures in a row, none staying up for the window, is a crash loop:
    /// /readyz turns 503 until a child stays up.
    pub const DEFAULT_CRASH_LOOP_LIMIT: &str = "5";
    pub const DEFAULT_CRASH_LOOP_WINDOW: &str = "10s";
    /// Child stderr lines kept to explain a crash in the error the client receives.
    pub const DEFAULT_STDERR_TAIL: &str = "20";
    /// Each connection costs a thread; beyond this, new ones get 503 and are closed, so
    /// a flood cannot exhaust threads, memory or file descriptors.
    pub const DEFAULT_MAX_CONNECTIONS: &str = "1024";
    /// A request head must arrive within this of the connection opening (or of the
    /// previous response ending), and its body within this of the head: slowloris
    /// clients are dropped, and an idle keep-alive connection is closed.
    pub const DEFAULT_READ_TIMEOUT: &str = "10s";
    /// Largest request head (request line and headers). Browsers with cookies stay well
    /// under 16 KiB; nginx allows 4 x 8 KiB.
    pub const DEFAULT_MAX_HEADER_SIZE: &str = "32KiB";
    /// Most header lines in one request; browsers send about 20.
    pub const DEFAULT_MAX_HEADERS: &str = "100";
    /// Deepest JSON nesting accepted from a client or the child. MCP messages nest a
    /// dozen levels; deeper input is refused before parsing, which recurses per level.
    pub const DEFAULT_MAX_JSON_DEPTH: &str = "64";
    /// No rate limit unless asked: what a client may send is the operator's call.
    pub const DEFAULT_RATE_LIMIT: &str = "";
    /// Buckets held at once (about 100 bytes each, so a few MiB at most): tokens are few,
    /// but addresses are not, and IPv6 hands one client many /64s.
    pub const DEFAULT_RATE_LIMIT_KEYS: &str = "65536";
    /// No cap per client beyond --max-sessions unless asked.
    pub const DEFAULT_MAX_SESSIONS_PER_TOKEN: &str = "0";

    /// Protocol versions whose HTTP framing we relay (rule V-3: validate against what
    /// the bridge can carry, not what the child negotiated).
    pub const SUPPORTED_VERSIONS: &[&str] =
        &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
    /// Rule V-2: a request without MCP-Protocol-Version is taken to be this version.
    pub const ASSUMED_VERSION: &str = "2025-03-26";
    /// The first version whose clients expect priming events and `retry:` (R-5).
    pub const PRIMING_VERSION: &str = "2025-11-25";
    /// The only version that allows JSON-RPC batches (rules B-1, B-2).
    pub const BATCH_VERSION: &str = "2025-03-26";
    /// Hidden first argument: run the built-in demo server on stdio.
    pub const DEMO_ARG: &str = "__demo-server";

    pub struct Flag {
        pub name: &'static str,
        pub value: &'static str,
        pub default: &'static str,
        pub repeatable: bool,
        /// On or off: `--name` alone turns it on; a value may say `true` or `false`.
        pub switch: bool,
        /// Given alone (the next word not one of `words`): this value.
        pub alone: Option<(&'static str, &'static [&'static str])>,
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
            switch: false,
            alone: None,
            help,
        }
    }
    const fn many(name: &'static str, value: &'static str, help: &'static str) -> Flag {
        Flag {
            name,
            value,
            default: "",
            repeatable: true,
            switch: false,
            alone: None,
            help,
        }
    }
    /// A flag whose value is one of `words`, and `value` when given alone.
    const fn or_alone(f: Flag, value: &'static str, words: &'static [&'static str]) -> Flag {
        Flag {
            alone: Some((value, words)),
            ..f
        }
    }
    const fn switch(name: &'static str, help: &'static str) -> Flag {
        switch_default(name, "", help)
    }
    const fn switch_default(name: &'static str, default: &'static str, help: &'static str) -> Flag {
        Flag {
            name,
            value: "",
            default,
            repeatable: false,
            switch: true,
            alone: None,
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
            "session: a child per client session; shared: --children for all sessions; oneshot: a child per request",
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
            "instance-id",
            "ID",
            "",
            "prefix of every session id (ID_…) so a balancer can route by it; default the host name (a StatefulSet pod's name); none: no prefix",
        ),
        flag(
            "drain-timeout",
            "DURATION",
            DEFAULT_DRAIN_TIMEOUT,
            "on --drain-signal: refuse new sessions (503), serve the open ones this long at most, then shut down (0: shut down at once)",
        ),
        flag(
            "drain-signal",
            "SIGNAL",
            DEFAULT_DRAIN_SIGNAL,
            "the signal that drains: TERM, USR1 or USR2 (SIGINT always shuts down at once)",
        ),
        flag(
            "config",
            "FILE",
            "",
            "serve every stdio server of this mcpServers file (Claude Desktop / Cursor format) instead of a COMMAND",
        ),
        flag(
            "tool-separator",
            "TEXT",
            DEFAULT_TOOL_SEPARATOR,
            "joins server and tool names on the merged endpoint (NAME__tool)",
        ),
        flag(
            "cwd",
            "DIR",
            "",
            "working directory of the child (default: ours)",
        ),
        flag(
            "child-memory",
            "SIZE",
            "",
            "each child's address space (RLIMIT_AS; counts reservations, not use: give Node, Java and Go room)",
        ),
        flag(
            "child-cpu",
            "DURATION",
            "",
            "CPU time each child may use (RLIMIT_CPU, whole seconds); then it is killed",
        ),
        flag(
            "child-files",
            "N",
            "",
            "open files per child (RLIMIT_NOFILE)",
        ),
        flag(
            "child-processes",
            "N",
            "",
            "processes of the children's user (RLIMIT_NPROC; root ignores it: use with --child-user)",
        ),
        flag(
            "child-user",
            "USER[:GROUP]",
            "",
            "run children as this user (stdio-sse as root; supplementary groups dropped)",
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
            "parse-budget",
            "SIZE",
            DEFAULT_PARSE_BUDGET,
            "request bodies over 64 KiB parsed at once (503 beyond)",
        ),
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
            "client-request-timeout",
            "DURATION",
            DEFAULT_CLIENT_REQUEST_TIMEOUT,
            "a child's request waits this long for a client stream to open, then gets an error",
        ),
        flag(
            "evict-idle-after",
            "DURATION",
            DEFAULT_EVICT_IDLE_AFTER,
            "at --max-sessions, end a session unattended this long for a new one (0 = refuse)",
        ),
        flag(
            "max-sessions-per-token",
            "N",
            DEFAULT_MAX_SESSIONS_PER_TOKEN,
            "most sessions one bearer token (without tokens: one client address) holds; 429 beyond (0 = no limit)",
        ),
        flag(
            "rate-limit",
            "RATE[,BURST]",
            DEFAULT_RATE_LIMIT,
            "requests per bearer token (without tokens: per client address), RATE as N/s, N/m or N/h; BURST default RATE per second, at least 10; 429 beyond",
        ),
        flag(
            "rate-limit-keys",
            "N",
            DEFAULT_RATE_LIMIT_KEYS,
            "most clients with a --rate-limit bucket at once (the fullest are dropped beyond)",
        ),
        many(
            "trusted-proxy",
            "ADDR[,ADDR...]",
            "proxies (addresses or ADDR/BITS) whose X-Forwarded-For names the client address (repeatable)",
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
            "replay-buffer",
            "EVENTS,SIZE",
            DEFAULT_REPLAY_BUFFER,
            "events kept per session for resuming streams",
        ),
        flag(
            "stream-queue",
            "EVENTS,SIZE",
            DEFAULT_STREAM_QUEUE,
            "queued per connection before the child's messages wait for the client to read",
        ),
        flag(
            "stall-timeout",
            "DURATION",
            DEFAULT_STALL_TIMEOUT,
            "fail a write the client does not drain this long",
        ),
        flag(
            "sse-retry",
            "DURATION",
            DEFAULT_SSE_RETRY,
            "SSE retry: sent to clients at 2025-11-25 or later",
        ),
        flag(
            "head-hold",
            "DURATION",
            DEFAULT_HEAD_HOLD,
            "hold a POST answer's head this long for its first event (0: send at once)",
        ),
        flag(
            "children",
            "N",
            DEFAULT_CHILDREN,
            "shared mode: children serving all sessions",
        ),
        flag(
            "warm",
            "N",
            DEFAULT_WARM,
            "session mode: children kept started ahead of sessions",
        ),
        flag(
            "child-protocol",
            "ERA",
            DEFAULT_CHILD_PROTOCOL,
            "what the child speaks: legacy (2025, initialize), modern (2026-07-28) or auto (probe once)",
        ),
        flag(
            "modern-pool",
            "N",
            DEFAULT_MODERN_POOL,
            "session mode: idle children kept for 2026-07-28 calls",
        ),
        flag(
            "input-ttl",
            "DURATION",
            DEFAULT_INPUT_TTL,
            "how long a call waiting for the client's input (MRTR) is kept",
        ),
        flag(
            "restart-delay",
            "DURATION",
            DEFAULT_RESTART_DELAY,
            "shared mode: first restart delay, doubled per fast failure",
        ),
        flag(
            "restart-delay-max",
            "DURATION",
            DEFAULT_RESTART_DELAY_MAX,
            "shared mode: longest restart delay",
        ),
        flag(
            "crash-loop-limit",
            "N",
            DEFAULT_CRASH_LOOP_LIMIT,
            "shared mode: failures in a row that make /readyz 503",
        ),
        flag(
            "crash-loop-window",
            "DURATION",
            DEFAULT_CRASH_LOOP_WINDOW,
            "shared mode: a child up this long resets the count",
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
        flag(
            "log-format",
            "FORMAT",
            DEFAULT_LOG_FORMAT,
            "text, or json (one object per line)",
        ),
        switch_default(
            "access-log",
            DEFAULT_ACCESS_LOG,
            "a log line per HTTP request (--access-log=false: off)",
        ),
        flag(
            "tap",
            "PATH",
            "",
            "write every JSON-RPC message, each way, as a JSON line to PATH (- for stderr)",
        ),
        flag(
            "tap-max-size",
            "SIZE",
            DEFAULT_TAP_MAX_SIZE,
            "at this size the tap file moves to PATH.1 and a new one starts (0: never)",
        ),
        // Alone it means on, as websocketd's --devconsole does.
        or_alone(
            flag(
                "console",
                "WHEN",
                DEFAULT_CONSOLE,
                "serve the browser console at /: auto (only when --host is loopback), on or off; alone: on",
            ),
            "on",
            &["auto", "on", "off"],
        ),
        switch(
            "exit-with-parent",
            "exit (ending the children) when the process that started us exits",
        ),
        many(
            "auth-token",
            "TOKEN",
            "require Authorization: Bearer TOKEN (repeatable)",
        ),
        flag(
            "auth-token-file",
            "PATH",
            "",
            "tokens, one per line (# comments); re-read on SIGHUP",
        ),
        switch("auth-health", "require a token on /healthz and /readyz too"),
        switch(
            "allow-unauthenticated",
            "serve a non-loopback address without a token, without the warning",
        ),
        many(
            "cors-origin",
            "ORIGIN",
            "browser origin allowed by CORS (repeatable; * = any)",
        ),
        flag("tls-cert", "PATH", "", "PEM certificate chain (TLS build)"),
        flag("tls-key", "PATH", "", "PEM private key (TLS build)"),
        many(
            "pass-header",
            "NAME[=ENVVAR]",
            "session mode: this header of the first request becomes the child's ENVVAR (default HTTP_NAME)",
        ),
        flag(
            "max-connections",
            "N",
            DEFAULT_MAX_CONNECTIONS,
            "open connections; beyond it new ones get 503",
        ),
        flag(
            "read-timeout",
            "DURATION",
            DEFAULT_READ_TIMEOUT,
            "deadline for a request head, and then for its body",
        ),
        flag(
            "max-header-size",
            "SIZE",
            DEFAULT_MAX_HEADER_SIZE,
            "largest request head (431 beyond it)",
        ),
        flag(
            "max-headers",
            "N",
            DEFAULT_MAX_HEADERS,
            "most request header lines (431 beyond it)",
        ),
        flag(
            "max-json-depth",
            "N",
            DEFAULT_MAX_JSON_DEPTH,
            "deepest JSON nesting accepted from clients and the child",
        ),
    ];

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Mode {
        Session,
        Shared,
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
        pub parse_budget: usize,
        pub max_message: usize,
        pub max_sessions: usize,
        pub session_idle_timeout: Option<Duration>,
        pub evict_idle_after: Option<Duration>,
        pub client_request_timeout: Duration,
        pub keepalive: Option<Duration>,
        pub shutdown_grace: Duration,
        /// (events, bytes)
        pub replay_buffer: (usize, usize),
        /// (events, bytes) queued for one connection.
        pub stream_queue: (usize, usize),
        pub stall_timeout: Duration,
        pub sse_retry: Duration,
        pub head_hold: Duration,
        pub children: usize,
        pub warm: usize,
        pub child_protocol: crate::modern::ChildEra,
        pub modern_pool: usize,
        pub input_ttl: Duration,
        pub restart_delay: Duration,
        pub restart_delay_max: Duration,
        pub crash_loop_limit: u32,
        pub crash_loop_window: Duration,
        pub stderr_tail: usize,
        pub log_level: crate::observe::Level,
        pub log_json: bool,
        pub access_log: bool,
        /// --tap: where every message is written (None: off; "-": stderr).
        pub tap: Option<String>,
        pub tap_max_size: usize,
        pub exit_with_parent: bool,
        pub auth: Auth,
        pub cors_origins: Vec<String>,
        /// (certificate chain, private key), PEM, already read.
        pub tls: Option<TlsPem>,
        /// (lowercase header name, environment variable)
        pub pass_headers: Vec<(String, String)>,
        pub max_connections: usize,
        pub read_timeout: Duration,
        pub max_header_size: usize,
        pub max_headers: usize,
        pub max_json_depth: usize,
        /// --console: when `/` serves the browser console.
        pub console: crate::console::Console,
        /// --rate-limit, --rate-limit-keys, --trusted-proxy, --max-sessions-per-token.
        pub rate: crate::ratelimit::Settings,
        /// Program and arguments of the child; for the demo server, ourselves.
        pub command: Vec<String>,
        pub demo: bool,
        /// --config: the mcpServers file, re-read on SIGHUP.
        pub config_file: Option<PathBuf>,
        /// --instance-id: what every session id this instance mints starts with (and
        /// INSTANCE_SEPARATOR); None: no prefix.
        pub instance_id: Option<String>,
        /// --drain-timeout (None: no drain) and --drain-signal.
        pub drain_timeout: Option<Duration>,
        pub drain_signal: libc::c_int,
        pub tool_separator: String,
        /// What the flags say every server gets unless its entry says otherwise.
        pub server_defaults: ServerSpec,
        /// The servers to run: the COMMAND's (or the demo's) alone, or the file's.
        pub servers: Vec<ServerSpec>,
        /// Entries of the file that are not run, and why (logged at start).
        pub skipped: Vec<(String, String)>,
    }

    #[derive(Debug, Default)]
    pub struct Auth {
        /// From --auth-token / STDIO_SSE_AUTH_TOKEN: fixed for the process's life.
        pub tokens: Vec<String>,
        /// Re-read on SIGHUP; its tokens are added to the fixed ones.
        pub token_file: Option<PathBuf>,
        pub health: bool,
        pub allow_unauthenticated: bool,
    }

    impl Auth {
        pub fn enabled(&self) -> bool {
            !self.tokens.is_empty() || self.token_file.is_some()
        }
    }

    /// Reads a token file: one token per line, blank lines and `#` comments skipped.
    /// Errors name the file and the line, never a token.
    pub fn read_token_file(path: &std::path::Path) -> Result<Vec<String>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --auth-token-file {}: {e}", path.display()))?;
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "--auth-token-file {} line {}: a token may not contain spaces",
                    path.display(),
                    n + 1
                ));
            }
            tokens.push(t.to_string());
        }
        if tokens.is_empty() {
            return Err(format!(
                "--auth-token-file {} holds no token (an empty file would lock everyone out)",
                path.display()
            ));
        }
        Ok(tokens)
    }

    // ---- servers: the one of a COMMAND, or the mcpServers of --config ----------------

    /// Off by default: a SIGTERM ends the sessions at once, as it always has. Behind a
    /// balancer, set it under the orchestrator's grace period (Kubernetes
    /// terminationGracePeriodSeconds, systemd TimeoutStopSec, compose stop_grace_period)
    /// less twice --shutdown-grace, which the shutdown after it takes at most.
    pub const DEFAULT_DRAIN_TIMEOUT: &str = "0";
    /// What orchestrators send to stop a process.
    pub const DEFAULT_DRAIN_SIGNAL: &str = "TERM";

    /// Between an instance id and the random part of a session id it mints. Host names
    /// and Kubernetes pod names never hold it (RFC 952, DNS-1123), so a balancer splits
    /// `web-0_4f1c…` at the first one.
    pub const INSTANCE_SEPARATOR: char = '_';
    /// --instance-id's longest value: a DNS label.
    pub const MAX_INSTANCE_ID: usize = 63;

    /// What `NAME__tool` joins on the merged endpoint (--tool-separator).
    pub const DEFAULT_TOOL_SEPARATOR: &str = "__";
    /// The smallest --child-memory: below it not even a shell starts (musl sh maps
    /// about 1 MiB; an interpreter many more), so every child would fail at exec.
    pub const MIN_CHILD_MEMORY: u64 = 8 << 20;
    /// The smallest --child-files: stdin, stdout, stderr and an interpreter's own few.
    pub const MIN_CHILD_FILES: u64 = 8;
    /// Longest server name: it is a URL path segment, a metric label and a tool prefix.
    pub const MAX_SERVER_NAME: usize = 64;
    /// The name of the server a COMMAND (or the demo) runs: /servers shows it.
    pub const SOLE_SERVER: &str = "default";

    /// A tool filter: a tool is served when it matches an `allow` entry (or there is
    /// none) and no `deny` entry. Entries are names, `*` standing for any run of
    /// characters.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct ToolFilter {
        pub allow: Vec<String>,
        pub deny: Vec<String>,
    }

    impl ToolFilter {
        pub fn is_open(&self) -> bool {
            self.allow.is_empty() && self.deny.is_empty()
        }
        pub fn admits(&self, tool: &str) -> bool {
            (self.allow.is_empty() || self.allow.iter().any(|p| glob(p, tool)))
                && !self.deny.iter().any(|p| glob(p, tool))
        }
    }

    /// `*` matches any run of characters (none included); nothing else is special.
    fn glob(pattern: &str, text: &str) -> bool {
        let mut parts = pattern.split('*');
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = text.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty();
        };
        for p in middle {
            match rest.find(p) {
                Some(i) => rest = &rest[i + p.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }

    /// One server: what runs it and how it is served. Flags give every field's default;
    /// an entry of --config may set its own.
    #[derive(Clone, Debug, PartialEq)]
    pub struct ServerSpec {
        pub name: String,
        /// Program and arguments; for the demo server, ourselves.
        pub command: Vec<String>,
        /// --env first, then the entry's `env` (which wins).
        pub env: Vec<(String, String)>,
        pub cwd: Option<PathBuf>,
        pub mode: Mode,
        pub warm: usize,
        pub children: usize,
        pub max_sessions: usize,
        pub session_idle_timeout: Option<Duration>,
        pub child_protocol: crate::modern::ChildEra,
        /// (lowercase header name, environment variable)
        pub pass_headers: Vec<(String, String)>,
        pub tools: ToolFilter,
        pub disabled: bool,
        pub limits: ChildLimits,
    }

    /// What a child may use, set between fork and exec (setrlimit, setgid, setuid): a
    /// runaway child (a leak, a fork loop, a busy loop) is stopped at its own limit
    /// instead of taking the machine. None: inherited from us.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct ChildLimits {
        /// RLIMIT_AS, bytes.
        pub memory: Option<u64>,
        /// RLIMIT_CPU, whole seconds.
        pub cpu: Option<u64>,
        /// RLIMIT_NOFILE.
        pub files: Option<u64>,
        /// RLIMIT_NPROC: counted per user, so it binds only a child that is not root.
        pub processes: Option<u64>,
        pub user: Option<ChildUser>,
    }

    #[derive(Clone, Debug, PartialEq)]
    pub struct ChildUser {
        /// As given (for messages).
        pub name: String,
        pub uid: u32,
        pub gid: u32,
    }

    /// Which limit a child met (a label of `stdio_sse_child_limit_exits_total`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Limit {
        Memory,
        Cpu,
        Files,
        Processes,
    }

    impl Limit {
        pub const ALL: [Limit; 4] = [Limit::Memory, Limit::Cpu, Limit::Files, Limit::Processes];
        pub fn label(self) -> &'static str {
            match self {
                Limit::Memory => "memory",
                Limit::Cpu => "cpu",
                Limit::Files => "files",
                Limit::Processes => "processes",
            }
        }
    }

    impl ChildLimits {
        pub fn get(&self, limit: Limit) -> Option<u64> {
            match limit {
                Limit::Memory => self.memory,
                Limit::Cpu => self.cpu,
                Limit::Files => self.files,
                Limit::Processes => self.processes,
            }
        }

        /// The limit as its flag says it: `--child-memory 64MiB`.
        pub fn shown(&self, limit: Limit) -> String {
            let n = self.get(limit).unwrap_or(0);
            let value = match limit {
                Limit::Memory if n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
                Limit::Memory if n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
                Limit::Cpu => format!("{n}s"),
                _ => n.to_string(),
            };
            format!("--child-{} {value}", limit.label())
        }

        /// From the flags (or an entry's `limits` object, whose keys are the same words).
        pub fn parse(get: &dyn Fn(&str) -> Option<String>) -> Result<ChildLimits, String> {
            let some = |key: &str| get(key).filter(|v| !v.trim().is_empty());
            let positive = |key: &str, n: u64| {
                if n == 0 {
                    Err(format!(
                        "--{key} must be above 0 (leave it out for no limit)"
                    ))
                } else {
                    Ok(n)
                }
            };
            let mut limits = ChildLimits::default();
            if let Some(v) = some("child-memory") {
                let n = parse_size("child-memory", &v)? as u64;
                // Below this not even a shell starts: every child would fail at exec.
                if n < MIN_CHILD_MEMORY {
                    return Err(format!(
                        "--child-memory {v} is too small for any program to start (at least {}MiB)",
                        MIN_CHILD_MEMORY >> 20
                    ));
                }
                limits.memory = Some(n);
            }
            if let Some(v) = some("child-cpu") {
                let d = parse_duration("child-cpu", &v)?;
                let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                limits.cpu = Some(positive("child-cpu", secs)?);
            }
            if let Some(v) = some("child-files") {
                let n = parse_count("child-files", &v)? as u64;
                // stdin, stdout, stderr and an interpreter's own few.
                if n < MIN_CHILD_FILES {
                    return Err(format!("--child-files {v}: a child needs at least {MIN_CHILD_FILES} (its stdio and an interpreter's own)"));
                }
                limits.files = Some(n);
            }
            if let Some(v) = some("child-processes") {
                limits.processes = Some(positive(
                    "child-processes",
                    parse_count("child-processes", &v)? as u64,
                )?);
            }
            if let Some(v) = some("child-user") {
                limits.user = Some(user_of(&v)?);
            }
            Ok(limits)
        }
    }

    /// `USER[:GROUP]`, each a name (from /etc/passwd, /etc/group) or a number; the group
    /// defaults to the user's own. Only root can become another user.
    fn user_of(given: &str) -> Result<ChildUser, String> {
        let (user, group) = match given.split_once(':') {
            Some((u, g)) => (u.trim(), Some(g.trim())),
            None => (given.trim(), None),
        };
        let (uid, primary) = match lookup_user(user) {
            Some(found) => found,
            None => match user.parse::<u32>() {
                Ok(uid) => (uid, uid),
                Err(_) => {
                    return Err(format!(
                        "--child-user {given:?}: no user {user:?} on this machine (/etc/passwd)"
                    ))
                }
            },
        };
        let gid = match group {
            None | Some("") => primary,
            Some(g) => match lookup_group(g).or_else(|| g.parse().ok()) {
                Some(gid) => gid,
                None => {
                    return Err(format!(
                        "--child-user {given:?}: no group {g:?} on this machine (/etc/group)"
                    ))
                }
            },
        };
        let me = unsafe { libc::geteuid() };
        if me != 0 && (uid != me || gid != unsafe { libc::getegid() }) {
            return Err(format!("--child-user {given:?}: only root can run children as another user (stdio-sse runs as uid {me})"));
        }
        Ok(ChildUser {
            name: given.trim().to_string(),
            uid,
            gid,
        })
    }

    /// (uid, primary gid) of a user name, by getpwnam_r (musl reads /etc/passwd).
    fn lookup_user(name: &str) -> Option<(u32, u32)> {
        let cname = std::ffi::CString::new(name).ok()?;
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        };
        (rc == 0 && !out.is_null()).then_some((pw.pw_uid, pw.pw_gid))
    }

    fn lookup_group(name: &str) -> Option<u32> {
        let cname = std::ffi::CString::new(name).ok()?;
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut out: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut gr,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        };
        (rc == 0 && !out.is_null()).then_some(gr.gr_gid)
    }

    /// What --config holds: the servers to run, and why others are not run.
    #[derive(Debug)]
    pub struct ServersFile {
        pub servers: Vec<ServerSpec>,
        /// An entry that is not a stdio server (a `url`, `type: http`): skipped, and why.
        pub skipped: Vec<(String, String)>,
    }

    /// Keys of ours in an entry besides the four every client knows.
    const OUR_KEYS: &[&str] = &[
        "mode",
        "warm",
        "children",
        "maxSessions",
        "sessionIdleTimeout",
        "childProtocol",
        "passHeader",
        "tools",
        "disabled",
        "limits",
    ];
    /// Keys other clients keep in the same file (Cline, Cursor, Claude Desktop
    /// extensions) that say nothing about how to run the server: ignored.
    const OTHER_CLIENTS_KEYS: &[&str] = &[
        "type",
        "autoApprove",
        "alwaysAllow",
        "timeout",
        "description",
        "disabledTools",
    ];

    /// Reads and checks a `mcpServers` file; `defaults` is what the flags say. Every
    /// error names the file and, where it can, the server, the key and the line.
    pub fn read_servers_file(
        path: &std::path::Path,
        defaults: &ServerSpec,
        separator: &str,
    ) -> Result<ServersFile, String> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config {shown}: cannot read it: {e}"))?;
        servers_of(&text, defaults, separator).map_err(|e| format!("--config {shown}: {e}"))
    }

    /// The checks of `read_servers_file`, on the text.
    pub fn servers_of(
        text: &str,
        defaults: &ServerSpec,
        separator: &str,
    ) -> Result<ServersFile, String> {
        let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            format!(
                "not valid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        let Some(entries) = doc.get("mcpServers") else {
            return Err("has no \"mcpServers\" object (the format Claude Desktop and Cursor use: {\"mcpServers\": {\"NAME\": {\"command\": ..., \"args\": [...]}}})".into());
        };
        let Some(entries) = entries.as_object() else {
            return Err("\"mcpServers\" is not an object of servers by name".into());
        };
        // serde_json keeps keys sorted and the last of two equal ones; the file's order
        // decides who wins a resource URI two servers list, and two servers of one name
        // are a mistake to report: the keys are read from the text, with their lines.
        let keys = server_keys(text);
        for (i, (name, line)) in keys.iter().enumerate() {
            if keys[..i].iter().any(|(n, _)| n == name) {
                return Err(format!(
                    "server {name:?} is defined twice in \"mcpServers\" (line {line})"
                ));
            }
        }
        let mut file = ServersFile {
            servers: Vec::new(),
            skipped: Vec::new(),
        };
        for (name, line) in &keys {
            let Some(entry) = entries.get(name.as_str()) else {
                continue;
            };
            let at = || format!("server {name:?} (line {line})");
            let Some(obj) = entry.as_object() else {
                return Err(format!("{}: not an object", at()));
            };
            if let Some(why) = not_stdio(obj).map_err(|e| format!("{}: {e}", at()))? {
                file.skipped.push((name.clone(), why));
                continue;
            }
            check_server_name(name, separator)?;
            file.servers
                .push(server_of(name, obj, defaults).map_err(|e| format!("{}: {e}", at()))?);
        }
        let mut lower: Vec<String> = Vec::new();
        for s in &file.servers {
            let l = s.name.to_ascii_lowercase();
            if lower.contains(&l) {
                return Err(format!("server {:?}: another server differs from its name only in case (names are paths and metric labels: keep them apart)", s.name));
            }
            lower.push(l);
        }
        Ok(file)
    }

    /// Names become a path segment, a label and a tool prefix: letters, digits, `-`,
    /// `_`, `.`; not `.` or `..`; without the tool separator, so `NAME__tool` splits
    /// one way only and no two servers' tools can collide after prefixing.
    fn check_server_name(name: &str, separator: &str) -> Result<(), String> {
        let safe = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if name.is_empty() || name.len() > MAX_SERVER_NAME || !name.chars().all(safe) {
            return Err(format!("server name {name:?} is not URL-safe: use 1 to {MAX_SERVER_NAME} letters, digits, '-', '_' or '.'"));
        }
        if name == "." || name == ".." {
            return Err(format!("server name {name:?} is not a usable path segment"));
        }
        let ends_in_part = (1..separator.len())
            .filter(|n| separator.is_char_boundary(*n))
            .any(|n| name.ends_with(&separator[..n]));
        if !separator.is_empty() && (name.contains(separator) || ends_in_part) {
            return Err(format!("server name {name:?} holds or ends in part of the tool separator {separator:?}: its tools could collide with another server's after prefixing (rename it, or set --tool-separator)"));
        }
        Ok(())
    }

    /// Why an entry is not a stdio server, if it is not.
    fn not_stdio(
        obj: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<String>, String> {
        let ty = match obj.get("type") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) => Some(t.as_str()),
            Some(_) => return Err("\"type\" must be a string (\"stdio\")".into()),
        };
        if let Some(t) = ty.filter(|t| *t != "stdio") {
            return Ok(Some(format!(
                "type {t:?} is a remote server, not a stdio one (point the client at it directly)"
            )));
        }
        if obj.contains_key("url") || obj.contains_key("serverUrl") {
            return Ok(Some(
                "it has a url: a remote server, not a stdio one (point the client at it directly)"
                    .into(),
            ));
        }
        Ok(None)
    }

    /// One entry over the defaults.
    fn server_of(
        name: &str,
        obj: &serde_json::Map<String, serde_json::Value>,
        defaults: &ServerSpec,
    ) -> Result<ServerSpec, String> {
        use serde_json::Value;
        for key in obj.keys() {
            let known = ["command", "args", "env", "cwd"].contains(&key.as_str())
                || OUR_KEYS.contains(&key.as_str())
                || OTHER_CLIENTS_KEYS.contains(&key.as_str());
            if !known {
                return Err(format!(
                    "unknown key {key:?} (known: command, args, env, cwd, {})",
                    OUR_KEYS.join(", ")
                ));
            }
        }
        let text = |key: &str| -> Result<Option<String>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{key:?} must be a string")),
            }
        };
        let strings = |key: &str| -> Result<Vec<String>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::String(s)) => Ok(vec![s.clone()]),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("{key:?} must be a list of strings")),
                Some(_) => Err(format!("{key:?} must be a list of strings")),
            }
        };
        let count = |key: &str, default: usize| -> Result<usize, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("{key:?} must be a whole number")),
            }
        };
        let mut spec = defaults.clone();
        spec.name = name.to_string();
        let Some(command) = text("command")?.filter(|c| !c.trim().is_empty()) else {
            return Err("has no \"command\" (a stdio server needs the program to run)".into());
        };
        if obj
            .get("args")
            .is_some_and(|a| !a.is_array() && !a.is_null())
        {
            return Err("\"args\" must be a list of strings".into());
        }
        spec.command = std::iter::once(command).chain(strings("args")?).collect();
        match obj.get("env") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => return Err(format!("\"env\": {k:?} must be a string")),
                    };
                    if k.is_empty() || k.contains('=') || k.contains('\0') {
                        return Err(format!("\"env\": {k:?} is not a variable name"));
                    }
                    spec.env.retain(|(have, _)| have != k);
                    spec.env.push((k.clone(), v));
                }
            }
            Some(_) => return Err("\"env\" must be an object of strings".into()),
        }
        if let Some(cwd) = text("cwd")? {
            spec.cwd = Some(PathBuf::from(cwd));
        }
        if let Some(mode) = text("mode")? {
            spec.mode = mode_of(&mode).map_err(|e| format!("\"mode\": {e}"))?;
        }
        spec.warm = count(
            "warm",
            if spec.mode == Mode::Session {
                defaults.warm
            } else {
                0
            },
        )?;
        spec.children = count(
            "children",
            if spec.mode == Mode::Shared {
                defaults.children
            } else {
                1
            },
        )?;
        spec.max_sessions = count("maxSessions", defaults.max_sessions)?;
        match obj.get("sessionIdleTimeout") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                let d = parse_duration("sessionIdleTimeout", &n.to_string())?;
                spec.session_idle_timeout = nonzero(d);
            }
            Some(Value::String(s)) => {
                spec.session_idle_timeout = nonzero(parse_duration("sessionIdleTimeout", s)?)
            }
            Some(_) => {
                return Err(
                    "\"sessionIdleTimeout\" must be a duration like \"30m\" or seconds".into(),
                )
            }
        }
        match obj.get("limits") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                const KEYS: [&str; 5] = ["memory", "cpu", "files", "processes", "user"];
                if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
                    return Err(format!(
                        "\"limits\": unknown key {k:?} ({})",
                        KEYS.join(", ")
                    ));
                }
                let own = ChildLimits::parse(&|flag| {
                    m.get(flag.trim_start_matches("child-")).map(|v| match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        other => other.to_string(),
                    })
                })
                .map_err(|e| e.replace("--child-", "\"limits\".").replace("--", ""))?;
                // An entry's limits replace the flags' one by one.
                let l = &mut spec.limits;
                l.memory = own.memory.or(l.memory);
                l.cpu = own.cpu.or(l.cpu);
                l.files = own.files.or(l.files);
                l.processes = own.processes.or(l.processes);
                l.user = own.user.or(l.user.take());
            }
            Some(_) => {
                return Err(
                    "\"limits\" must be an object (memory, cpu, files, processes, user)".into(),
                )
            }
        }
        if let Some(era) = text("childProtocol")? {
            spec.child_protocol = era_of(&era).map_err(|e| format!("\"childProtocol\": {e}"))?;
        }
        if obj.contains_key("passHeader") {
            spec.pass_headers = pass_headers_from(&strings("passHeader")?)
                .map_err(|e| e.replace("--pass-header", "\"passHeader\""))?;
        }
        match obj.get("tools") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                if let Some(k) = m.keys().find(|k| *k != "allow" && *k != "deny") {
                    return Err(format!("\"tools\": unknown key {k:?} (allow, deny)"));
                }
                let list = |key: &str| -> Result<Vec<String>, String> {
                    match m.get(key) {
                        None | Some(Value::Null) => Ok(Vec::new()),
                        Some(Value::Array(a)) => a
                            .iter()
                            .map(|v| v.as_str().filter(|s| !s.is_empty()).map(String::from))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| {
                                format!("\"tools\".{key} must be a list of tool names or patterns")
                            }),
                        Some(_) => Err(format!(
                            "\"tools\".{key} must be a list of tool names or patterns"
                        )),
                    }
                };
                spec.tools = ToolFilter {
                    allow: list("allow")?,
                    deny: list("deny")?,
                };
            }
            Some(_) => {
                return Err(
                    "\"tools\" must be an object: {\"allow\": [...], \"deny\": [...]}".into(),
                )
            }
        }
        spec.disabled = match obj.get("disabled") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("\"disabled\" must be true or false".into()),
        };
        check_server(&spec)?;
        Ok(spec)
    }

    /// What cannot work together, for a server of the file or of the command line.
    fn check_server(spec: &ServerSpec) -> Result<(), String> {
        if spec.children == 0 {
            return Err("children must be at least 1".into());
        }
        if spec.children != 1 && spec.mode != Mode::Shared {
            return Err("children applies to mode shared only".into());
        }
        if spec.warm != 0 && spec.mode != Mode::Session {
            return Err(
                "warm applies to mode session only (a shared child is always running)".into(),
            );
        }
        if !spec.pass_headers.is_empty() && spec.mode == Mode::Shared {
            return Err("passHeader cannot work in mode shared: one child serves every client, so no one client's header can become its environment".into());
        }
        Ok(())
    }

    fn mode_of(s: &str) -> Result<Mode, String> {
        match s {
            "session" => Ok(Mode::Session),
            "shared" => Ok(Mode::Shared),
            "oneshot" | "one-shot" => Ok(Mode::Oneshot),
            other => Err(format!("must be session, shared or oneshot, not {other:?}")),
        }
    }

    fn era_of(s: &str) -> Result<crate::modern::ChildEra, String> {
        match s {
            "legacy" => Ok(crate::modern::ChildEra::Legacy),
            "modern" => Ok(crate::modern::ChildEra::Modern),
            "auto" => Ok(crate::modern::ChildEra::Auto),
            other => Err(format!("must be legacy, modern or auto, not {other:?}")),
        }
    }

    /// The keys of the `mcpServers` object as written, each with its 1-based line (the
    /// text is valid JSON here).
    fn server_keys(text: &str) -> Vec<(String, usize)> {
        #[derive(PartialEq)]
        enum Where {
            Before,
            Inside,
            After,
        }
        let b = text.as_bytes();
        let mut depth = 0usize;
        let mut at = Where::Before;
        let mut key_at_top: Option<String> = None;
        let mut seen: Vec<(String, usize)> = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'"' => {
                    let start = i;
                    i += 1;
                    while i < b.len() && b[i] != b'"' {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                    let s: String = serde_json::from_str(&text[start..(i + 1).min(b.len())])
                        .unwrap_or_default();
                    let next = b
                        .get(i + 1..)
                        .unwrap_or(&[])
                        .iter()
                        .find(|c| !c.is_ascii_whitespace());
                    if next == Some(&b':') {
                        if depth == 1 {
                            key_at_top = Some(s);
                        } else if depth == 2 && at == Where::Inside {
                            let line = text[..start].matches('\n').count() + 1;
                            seen.push((s, line));
                        }
                    }
                }
                b'{' | b'[' => {
                    depth += 1;
                    if b[i] == b'{'
                        && depth == 2
                        && at == Where::Before
                        && key_at_top.as_deref() == Some("mcpServers")
                    {
                        at = Where::Inside;
                    }
                }
                b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 1 && at == Where::Inside {
                        at = Where::After;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        seen
    }

    pub enum Parsed {
        Run(Box<Config>),
        Help,
        Version,
        /// --probe [URL]: ask a running instance whether it is ready (for health checks
        /// in images that hold nothing but this binary).
        Probe(String),
    }

    pub fn env_name(flag: &str) -> String {
        format!("STDIO_SSE_{}", flag.to_ascii_uppercase().replace('-', "_"))
    }

    /// The PEM certificate chain and private key of --tls-cert and --tls-key.
    pub type TlsPem = (Vec<u8>, Vec<u8>);

    /// Parses flags (`--name value`, `--name=value`) after the environment, so a flag
    /// overrides its variable; repeatable flags add to what the variable listed. The first
    /// argument that is not a flag starts COMMAND, as does anything after `--`. In two
    /// steps: `read` gathers the values as given, `build` turns them into a Config and
    /// refuses what would not work.
    pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, String> {
        match read(args, env)? {
            Reading::Done(parsed) => Ok(parsed),
            Reading::Values(v) => Ok(Parsed::Run(Box::new(build(v)?))),
        }
    }

    /// What the command line and the environment said, before any of it is checked.
    struct Values {
        given: HashMap<&'static str, Vec<String>>,
        command: Vec<String>,
    }

    enum Reading {
        /// --help, --version, --probe: nothing more to read.
        Done(Parsed),
        Values(Values),
    }

    impl Values {
        /// The last value given for a flag, or its default.
        fn get(&self, name: &str) -> String {
            let f = FLAGS
                .iter()
                .find(|f| f.name == name)
                .expect("flag in table");
            self.given
                .get(f.name)
                .and_then(|v| v.last().cloned())
                .unwrap_or_else(|| f.default.to_string())
        }
        /// Every value of a repeatable flag.
        fn list(&self, name: &str) -> Vec<String> {
            self.given.get(name).cloned().unwrap_or_default()
        }
        /// A switch: on or off in any common spelling.
        fn switch(&self, name: &str) -> Result<bool, String> {
            match self.get(name).to_ascii_lowercase().as_str() {
                "" | "0" | "false" | "no" | "off" => Ok(false),
                "1" | "true" | "yes" | "on" => Ok(true),
                other => Err(format!("--{name} is on or off, not {other:?}")),
            }
        }
    }

    /// The environment first, then the flags over it, then COMMAND.
    fn read(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Reading, String> {
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
                return Ok(Reading::Done(Parsed::Help));
            }
            if arg == "-V" || arg == "--version" {
                return Ok(Reading::Done(Parsed::Version));
            }
            if arg == "--probe" || arg.starts_with("--probe=") {
                let url = match arg.strip_prefix("--probe=") {
                    Some(u) => u.to_string(),
                    None => match args.get(i + 1).filter(|a| !a.starts_with('-')) {
                        Some(u) => u.clone(),
                        None => {
                            let port = values
                                .get("port")
                                .and_then(|v| v.last().cloned())
                                .unwrap_or_else(|| DEFAULT_PORT.to_string());
                            format!("http://127.0.0.1:{port}{DEFAULT_PROBE_PATH}")
                        }
                    },
                };
                return Ok(Reading::Done(Parsed::Probe(url)));
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
            // A flag that may stand alone takes the next word only when it is one of
            // its values.
            let alone = f
                .alone
                .filter(|(_, words)| !args.get(i + 1).is_some_and(|a| words.contains(&a.as_str())));
            let value = match (inline, alone) {
                (Some(v), _) => v,
                (None, _) if f.switch => "true".to_string(),
                (None, Some((v, _))) => v.to_string(),
                (None, None) => {
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
        Ok(Reading::Values(Values {
            given: values,
            command,
        }))
    }

    /// --auth-token, --auth-token-file (read now, so a bad file fails at start),
    /// --auth-health, --allow-unauthenticated.
    fn auth_of(v: &Values) -> Result<Auth, String> {
        let auth = Auth {
            tokens: v.list("auth-token"),
            token_file: Some(v.get("auth-token-file"))
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            health: v.switch("auth-health")?,
            allow_unauthenticated: v.switch("allow-unauthenticated")?,
        };
        if auth
            .tokens
            .iter()
            .any(|t| t.is_empty() || t.contains(char::is_whitespace))
        {
            return Err("--auth-token may not be empty or contain spaces".into());
        }
        if let Some(path) = &auth.token_file {
            read_token_file(path)?;
        }
        Ok(auth)
    }

    /// --tls-cert and --tls-key: both or neither, PEM, and only in the TLS build.
    fn tls_of(v: &Values) -> Result<Option<TlsPem>, String> {
        let tls = match (v.get("tls-cert"), v.get("tls-key")) {
            (c, k) if c.is_empty() && k.is_empty() => None,
            (c, k) if c.is_empty() || k.is_empty() => {
                return Err("--tls-cert and --tls-key go together".into())
            }
            (c, k) => {
                if !cfg!(feature = "tls") {
                    return Err("this build has no TLS: use stdio-sse-tls (cargo feature tls), or a reverse proxy".into());
                }
                let read = |flag: &str, p: &str| {
                    std::fs::read(p).map_err(|e| format!("cannot read --{flag} {p}: {e}"))
                };
                let (cert, key) = (read("tls-cert", &c)?, read("tls-key", &k)?);
                check_pem("tls-cert", &cert, &["CERTIFICATE"])?;
                check_pem("tls-key", &key, &["PRIVATE KEY", "RSA PRIVATE KEY"])?;
                Some((cert, key))
            }
        };
        Ok(tls)
    }

    /// --pass-header NAME[=ENVVAR]: a header name and an environment variable name.
    fn pass_headers_from(specs: &[String]) -> Result<Vec<(String, String)>, String> {
        let mut pass_headers = Vec::new();
        for spec in specs {
            let (name, var) = match spec.split_once('=') {
                Some((n, v)) => (n.trim().to_string(), v.trim().to_string()),
                None => {
                    let n = spec.trim().to_string();
                    let v = format!("HTTP_{}", n.to_ascii_uppercase().replace('-', "_"));
                    (n, v)
                }
            };
            let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || !name.chars().all(token_char) {
                return Err(format!("--pass-header: {name:?} is not a header name"));
            }
            if var.is_empty()
                || var.starts_with(|c: char| c.is_ascii_digit())
                || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(format!(
                    "--pass-header: {var:?} is not an environment variable name"
                ));
            }
            pass_headers.push((name.to_ascii_lowercase(), var));
        }
        Ok(pass_headers)
    }

    /// The Config the values describe, or why they cannot work together.
    fn build(v: Values) -> Result<Config, String> {
        let mode = match v.get("mode").as_str() {
            "session" => Mode::Session,
            "shared" => Mode::Shared,
            "oneshot" | "one-shot" => Mode::Oneshot,
            other => {
                return Err(format!(
                    "--mode must be session, shared or oneshot, not {other:?}"
                ))
            }
        };
        let children = parse_count("children", &v.get("children"))?;
        let warm = parse_count("warm", &v.get("warm"))?;
        if children == 0 {
            return Err("--children must be at least 1".into());
        }
        if children != 1 && mode != Mode::Shared {
            return Err("--children applies to --mode shared only".into());
        }
        if warm != 0 && mode != Mode::Session {
            return Err(
                "--warm applies to --mode session only (a shared child is always running)".into(),
            );
        }
        let replay_buffer = {
            let v = v.get("replay-buffer");
            let (events, size) = v.split_once(',').unwrap_or((v.as_str(), "8MiB"));
            (
                parse_count("replay-buffer", events)?,
                parse_size("replay-buffer", size)?,
            )
        };
        let stream_queue = {
            let v = v.get("stream-queue");
            let (events, size) = v.split_once(',').unwrap_or((v.as_str(), "4MiB"));
            let events = parse_count("stream-queue", events)?.max(1);
            if events > MAX_STREAM_QUEUE_EVENTS {
                return Err(format!(
                    "--stream-queue: at most {MAX_STREAM_QUEUE_EVENTS} events, got {events}"
                ));
            }
            (events, parse_size("stream-queue", size)?.max(1))
        };
        let mut env_pairs = Vec::new();
        for kv in v.list("env") {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => env_pairs.push((k.to_string(), v.to_string())),
                _ => return Err(format!("--env takes KEY=VALUE, got {kv:?}")),
            }
        }
        let paths = ["mcp-path", "sse-path", "message-path"].map(|p| (p, v.get(p)));
        for (flag, path) in &paths {
            if !path.starts_with('/') {
                return Err(format!("--{flag} must start with '/', got {path:?}"));
            }
        }
        let auth = auth_of(&v)?;
        let tls = tls_of(&v)?;
        let pass_headers = pass_headers_from(&v.list("pass-header"))?;
        if !pass_headers.is_empty() && mode == Mode::Shared {
            return Err("--pass-header cannot work in --mode shared: one child serves every client, so no one client's header can become its environment".into());
        }
        let cors_origins = v
            .list("cors-origin")
            .iter()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect();
        let demo = v.command.is_empty();
        let cwd = v.get("cwd");
        let (tool_separator, config_file) = (v.get("tool-separator"), v.get("config"));
        let instance_id = instance_id_of(&v.get("instance-id"), host_name)?;
        let drain_timeout = nonzero(parse_duration("drain-timeout", &v.get("drain-timeout"))?);
        let drain_signal = match v.get("drain-signal").trim_start_matches("SIG") {
            "TERM" => libc::SIGTERM,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            other => {
                return Err(format!(
                    "--drain-signal must be TERM, USR1 or USR2, not {other:?}"
                ))
            }
        };
        let child_limits = ChildLimits::parse(&|k| Some(v.get(k)))?;
        let cfg = Config {
            host: v.get("host"),
            port: v
                .get("port")
                .parse()
                .map_err(|_| format!("--port must be 0..65535, got {:?}", v.get("port")))?,
            mode,
            mcp_path: paths[0].1.clone(),
            sse_path: paths[1].1.clone(),
            message_path: paths[2].1.clone(),
            cwd: (!cwd.is_empty()).then(|| PathBuf::from(cwd)),
            env: env_pairs,
            allowed_hosts: v
                .list("allowed-host")
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            allowed_origins: v
                .list("allowed-origin")
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            max_body: parse_size("max-body", &v.get("max-body"))?,
            parse_budget: parse_size("parse-budget", &v.get("parse-budget"))?,
            max_message: parse_size("max-message", &v.get("max-message"))?,
            max_sessions: parse_count("max-sessions", &v.get("max-sessions"))?,
            session_idle_timeout: nonzero(parse_duration(
                "session-idle-timeout",
                &v.get("session-idle-timeout"),
            )?),
            client_request_timeout: parse_duration(
                "client-request-timeout",
                &v.get("client-request-timeout"),
            )?,
            evict_idle_after: nonzero(parse_duration(
                "evict-idle-after",
                &v.get("evict-idle-after"),
            )?),
            keepalive: nonzero(parse_duration("keepalive", &v.get("keepalive"))?),
            shutdown_grace: parse_duration("shutdown-grace", &v.get("shutdown-grace"))?,
            replay_buffer,
            stream_queue,
            stall_timeout: parse_duration("stall-timeout", &v.get("stall-timeout"))?,
            sse_retry: parse_duration("sse-retry", &v.get("sse-retry"))?,
            head_hold: parse_duration("head-hold", &v.get("head-hold"))?,
            children,
            warm,
            child_protocol: match v.get("child-protocol").as_str() {
                "legacy" => crate::modern::ChildEra::Legacy,
                "modern" => crate::modern::ChildEra::Modern,
                "auto" => crate::modern::ChildEra::Auto,
                other => {
                    return Err(format!(
                        "--child-protocol must be legacy, modern or auto, not {other:?}"
                    ))
                }
            },
            modern_pool: parse_count("modern-pool", &v.get("modern-pool"))?,
            input_ttl: parse_duration("input-ttl", &v.get("input-ttl"))?
                .max(Duration::from_secs(1)),
            restart_delay: parse_duration("restart-delay", &v.get("restart-delay"))?,
            restart_delay_max: parse_duration("restart-delay-max", &v.get("restart-delay-max"))?,
            crash_loop_limit: parse_count("crash-loop-limit", &v.get("crash-loop-limit"))?.max(1)
                as u32,
            crash_loop_window: parse_duration("crash-loop-window", &v.get("crash-loop-window"))?,
            stderr_tail: parse_count("stderr-tail", &v.get("stderr-tail"))?,
            log_level: crate::observe::Level::parse(&v.get("log-level")).ok_or_else(|| {
                format!(
                    "--log-level must be error, warn, info or debug, got {:?}",
                    v.get("log-level")
                )
            })?,
            log_json: match v.get("log-format").as_str() {
                "text" => false,
                "json" => true,
                other => return Err(format!("--log-format must be text or json, got {other:?}")),
            },
            access_log: v.switch("access-log")?,
            tap: Some(v.get("tap")).filter(|t| !t.is_empty()),
            tap_max_size: parse_size("tap-max-size", &v.get("tap-max-size"))?,
            exit_with_parent: v.switch("exit-with-parent")?,
            auth,
            cors_origins,
            tls,
            pass_headers,
            max_connections: parse_count("max-connections", &v.get("max-connections"))?.max(1),
            read_timeout: parse_duration("read-timeout", &v.get("read-timeout"))?,
            max_header_size: parse_size("max-header-size", &v.get("max-header-size"))?.max(256),
            max_headers: parse_count("max-headers", &v.get("max-headers"))?.max(1),
            max_json_depth: parse_count("max-json-depth", &v.get("max-json-depth"))?.clamp(1, 100),
            console: crate::console::Console::parse(&v.get("console"))?,
            rate: crate::ratelimit::Settings::from_flags(
                &v.get("rate-limit"),
                parse_count("rate-limit-keys", &v.get("rate-limit-keys"))?,
                &v.list("trusted-proxy"),
                parse_count("max-sessions-per-token", &v.get("max-sessions-per-token"))?,
            )?,
            command: v.command,
            demo,
            config_file: None,
            instance_id,
            drain_timeout,
            drain_signal,
            tool_separator,
            server_defaults: ServerSpec {
                name: SOLE_SERVER.to_string(),
                command: Vec::new(),
                env: Vec::new(),
                cwd: None,
                mode,
                warm,
                children,
                max_sessions: 0,
                session_idle_timeout: None,
                child_protocol: crate::modern::ChildEra::Legacy,
                pass_headers: Vec::new(),
                tools: ToolFilter::default(),
                disabled: false,
                limits: child_limits,
            },
            servers: Vec::new(),
            skipped: Vec::new(),
        };
        with_servers(cfg, config_file)
    }

    /// --instance-id: given (checked), `none`, or the host name made fit (a letter,
    /// digit, `-` or `.` each; anything else becomes `-`; none when it is empty).
    fn instance_id_of(given: &str, host: fn() -> Option<String>) -> Result<Option<String>, String> {
        let fit = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        match given.trim() {
            "none" => Ok(None),
            "" => Ok(host()
                .map(|h| h.chars().map(|c| if fit(c) { c } else { '-' }).collect::<String>())
                .map(|h| h.chars().take(MAX_INSTANCE_ID).collect::<String>())
                .filter(|h| !h.is_empty())),
            id if id.len() <= MAX_INSTANCE_ID && id.chars().all(fit) => Ok(Some(id.to_string())),
            id => Err(format!("--instance-id {id:?}: use 1 to {MAX_INSTANCE_ID} letters, digits, '-' or '.' (it prefixes session ids, before a '{INSTANCE_SEPARATOR}'), or none")),
        }
    }

    /// This machine's host name (the pod's name in a Kubernetes StatefulSet).
    fn host_name() -> Option<String> {
        let mut buf = [0u8; 256];
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        ok.then(|| String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// The server defaults from the flags, then the servers: the file's, or the one of
    /// COMMAND (the demo when there is neither).
    fn with_servers(mut cfg: Config, config_file: String) -> Result<Config, String> {
        let d = &mut cfg.server_defaults;
        d.command = cfg.command.clone();
        d.env = cfg.env.clone();
        d.cwd = cfg.cwd.clone();
        d.max_sessions = cfg.max_sessions;
        d.session_idle_timeout = cfg.session_idle_timeout;
        d.child_protocol = cfg.child_protocol;
        d.pass_headers = cfg.pass_headers.clone();
        if config_file.is_empty() {
            cfg.servers = vec![cfg.server_defaults.clone()];
            return Ok(cfg);
        }
        if !cfg.command.is_empty() {
            return Err(format!(
                "give a COMMAND or --config, not both (COMMAND: {:?}; --config: {config_file})",
                cfg.command.join(" ")
            ));
        }
        if cfg.mode == Mode::Oneshot {
            return Err("--mode oneshot is not a default for --config servers: set \"mode\": \"oneshot\" on the ones that want it".into());
        }
        if cfg.tool_separator.is_empty()
            || cfg
                .tool_separator
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "--tool-separator must be non-empty text without spaces, got {:?}",
                cfg.tool_separator
            ));
        }
        cfg.demo = false;
        let path = PathBuf::from(&config_file);
        let file = read_servers_file(&path, &cfg.server_defaults, &cfg.tool_separator)?;
        cfg.config_file = Some(path);
        cfg.servers = file.servers;
        cfg.skipped = file.skipped;
        Ok(cfg)
    }

    /// tiny_http panics on a key it cannot parse, and our panics abort: check the PEM
    /// framing and its base64 here, so a bad file is an error message instead.
    fn check_pem(flag: &str, pem: &[u8], labels: &[&str]) -> Result<(), String> {
        let text = std::str::from_utf8(pem).map_err(|_| format!("--{flag}: not a PEM file"))?;
        let mut found = false;
        let mut rest = text;
        while let Some(start) = rest.find("-----BEGIN ") {
            let after = &rest[start + 11..];
            let Some((label, body)) = after.split_once("-----") else {
                break;
            };
            let end = format!("-----END {label}-----");
            let Some(stop) = body.find(&end) else {
                return Err(format!("--{flag}: {label} block has no END line"));
            };
            let b64: String = body[..stop]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let valid = b64.len() % 4 == 0
                && !b64.is_empty()
                && b64
                    .trim_end_matches('=')
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
            if !valid {
                return Err(format!("--{flag}: {label} block is not valid base64"));
            }
            found |= labels.contains(&label);
            rest = &body[stop + end.len()..];
        }
        if !found {
            return Err(format!(
                "--{flag}: no {} block found (EC keys: convert with `openssl pkcs8 -topk8 -nocrypt`)",
                labels.join(" or ")
            ));
        }
        Ok(())
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
        // Deadlines are Instant::now() + a duration: one beyond MAX_DURATION would
        // overflow (a panic) where it is used, so it is refused here.
        Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| *d <= MAX_DURATION)
            .ok_or_else(|| format!("--{flag}: {s:?} is not a duration from 0 to 10 years"))
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
             \x20      stdio-sse [OPTIONS]            (no COMMAND: serve the built-in demo server)\n\
             \x20      stdio-sse check [--] COMMAND   (start it, ask what it serves, say why not; check --help)\n\noptions:\n",
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

    #[cfg(test)]
    mod tests {
        use super::*;

        fn run(args: &[&str]) -> Result<Config, String> {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            match parse(&args, &|_| None)? {
                Parsed::Run(cfg) => Ok(*cfg),
                _ => Err("not a run".into()),
            }
        }

        #[test]
        fn a_tool_pattern_star_matches_any_run_and_deny_wins() {
            assert!(glob("get_*", "get_file") && glob("get_*", "get_"));
            assert!(glob("*_issue", "create_issue") && glob("a*b*c", "aXbYc"));
            assert!(!glob("get_*", "list_files") && !glob("a*b", "ab_"));
            assert!(glob("exact", "exact") && !glob("exact", "exactly"));
            let f = ToolFilter {
                allow: vec!["get_*".into(), "list".into()],
                deny: vec!["get_secret*".into()],
            };
            assert!(f.admits("get_file") && f.admits("list"));
            assert!(!f.admits("get_secret_key") && !f.admits("delete"));
            assert!(ToolFilter::default().admits("anything"));
        }

        #[test]
        fn servers_come_in_the_files_order_with_their_own_lines() {
            let text = "{\"mcpServers\": {\n  \"zeta\": {\"command\": \"alpha\"},\n  \"alpha\": {\"command\": \"zeta\", \"env\": {\"zeta\": \"1\"}}\n}}";
            let keys = server_keys(text);
            assert_eq!(keys, [("zeta".to_string(), 2), ("alpha".to_string(), 3)]);
            let d = run(&["--", "x"]).unwrap().server_defaults;
            let file = servers_of(text, &d, "__").unwrap();
            let names: Vec<&str> = file.servers.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["zeta", "alpha"]);
            assert_eq!(file.servers[1].env, [("zeta".to_string(), "1".to_string())]);
        }

        #[test]
        fn a_server_entry_is_checked_key_by_key() {
            let d = run(&["--warm", "2", "--", "x"]).unwrap().server_defaults;
            let of = |entry: &str| {
                servers_of(&format!("{{\"mcpServers\": {{\"s\": {entry}}}}}"), &d, "__")
            };
            let s = &of("{\"command\": \"c\", \"args\": [\"a\"]}")
                .unwrap()
                .servers[0];
            assert_eq!((s.command.len(), s.warm, s.mode), (2, 2, Mode::Session));
            let shared = &of("{\"command\": \"c\", \"mode\": \"shared\"}")
                .unwrap()
                .servers[0];
            assert_eq!((shared.warm, shared.children), (0, 1));
            for (entry, says) in [
                ("{\"args\": []}", "no \"command\""),
                (
                    "{\"command\": \"c\", \"bogus\": 1}",
                    "unknown key \"bogus\"",
                ),
                (
                    "{\"command\": \"c\", \"args\": \"a b\"}",
                    "\"args\" must be a list",
                ),
                (
                    "{\"command\": \"c\", \"type\": 3}",
                    "\"type\" must be a string",
                ),
                ("{\"command\": \"c\", \"mode\": \"x\"}", "\"mode\""),
                (
                    "{\"command\": \"c\", \"warm\": 1, \"mode\": \"shared\"}",
                    "warm applies",
                ),
                (
                    "{\"command\": \"c\", \"tools\": {\"only\": []}}",
                    "unknown key \"only\"",
                ),
            ] {
                let e = of(entry).unwrap_err();
                assert!(
                    e.contains(says) && e.contains("server \"s\""),
                    "{entry}: {e}"
                );
            }
            let skipped = of("{\"url\": \"https://x\"}").unwrap();
            assert!(skipped.servers.is_empty() && skipped.skipped[0].0 == "s");
            assert!(servers_of(
                "{\"mcpServers\": {\"a__b\": {\"command\": \"c\"}}}",
                &d,
                "__"
            )
            .unwrap_err()
            .contains("tool separator"));
            // `a_` with `__`: its tool `x` would be `a___x`, read as server `a`, tool `_x`.
            for name in ["a_", "x__y"] {
                let text = format!("{{\"mcpServers\": {{\"{name}\": {{\"command\": \"c\"}}}}}}");
                let e = servers_of(&text, &d, "__").unwrap_err();
                assert!(e.contains("tool separator"), "{name}: {e}");
            }
            assert!(
                servers_of("{\"mcpServers\": {\"_a\": {\"command\": \"c\"}}}", &d, "__").is_ok()
            );
        }

        #[test]
        fn sizes_are_binary_whatever_their_spelling() {
            assert_eq!(parse_size("x", "512"), Ok(512));
            assert_eq!(parse_size("x", "4MiB"), Ok(4 << 20));
            assert_eq!(parse_size("x", "64KiB"), Ok(64 << 10));
            assert_eq!(parse_size("x", "1G"), Ok(1 << 30));
            assert!(parse_size("x", "4 lots").is_err());
            assert!(parse_size("x", "").is_err());
        }

        #[test]
        fn durations_take_units_and_stay_within_ten_years() {
            assert_eq!(parse_duration("x", "30"), Ok(Duration::from_secs(30)));
            assert_eq!(parse_duration("x", "500ms"), Ok(Duration::from_millis(500)));
            assert_eq!(parse_duration("x", "5m"), Ok(Duration::from_secs(300)));
            assert_eq!(parse_duration("x", "1.5h"), Ok(Duration::from_secs(5400)));
            for bad in ["1e30", "99999999999999999999", "-1s", "5 fortnights", "NaN"] {
                assert!(parse_duration("x", bad).is_err(), "{bad}");
            }
        }

        #[test]
        fn flags_override_their_variables_and_refuse_what_would_do_nothing() {
            let cfg = run(&["--stream-queue", "16", "--", "cat"]).unwrap();
            assert_eq!(cfg.stream_queue, (16, 4 << 20));
            assert!(run(&["--stream-queue", "2000000", "--", "cat"]).is_err());
            assert!(
                run(&["--children", "2", "--", "cat"]).is_err(),
                "--children outside shared"
            );
            assert!(run(&["--warm", "1", "--mode", "shared", "--", "cat"]).is_err());
            let env = |k: &str| (k == "STDIO_SSE_MAX_BODY").then(|| "1KiB".to_string());
            let args: Vec<String> = ["--max-body", "2KiB", "--", "cat"]
                .map(String::from)
                .to_vec();
            let Ok(Parsed::Run(cfg)) = parse(&args, &env) else {
                panic!("parse")
            };
            assert_eq!(cfg.max_body, 2048, "the flag wins over its variable");
        }
    }
}

// ======================================================================================
/// Refusals: every answer the server gives instead of serving a request, in one table.
/// Each names its HTTP status, its JSON-RPC error code, its message (with the limit or
/// the value it concerns), the headers that go with it (`Allow`, `Retry-After`,
/// `WWW-Authenticate`) and the reason label its log line and metric carry. Same kind,
/// same words, wherever it is given.
/// Owns: the wording and numbers of every refusal (the README's bad-input table is
/// checked against it by a unit test).
/// Touches: nothing; `door` writes a refusal on the raw socket, `http` turns one into a
/// `Reply`.
/// Rules: P-4 (HTTP-level errors carry no request id), P-11 (malformed input is an
/// invalid request: -32600, or -32700 when it is not JSON), S-4 (404 for an unknown
/// session), V-3, G-6, R-4, O-1, O-2, A-1.
mod refusal {
    use std::time::Duration;

    /// How long a refused client is told to wait when a restart is a moment away.
    pub const RETRY_SOON: Duration = Duration::from_secs(1);
    /// ... and when capacity or a crash loop has to clear first.
    pub const RETRY_LATER: Duration = Duration::from_secs(5);

    /// What was wrong with a request's credentials.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum TokenFault {
        /// No `Authorization: Bearer` at all.
        Missing,
        /// A token that is not configured.
        Invalid,
    }

    /// The Accept a request lacked.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Wanted {
        /// POST /mcp: both `application/json` and `text/event-stream` (P-2).
        JsonAndEventStream,
        /// A stream: `text/event-stream` (G-2).
        EventStream,
    }

    #[derive(Clone, Debug, PartialEq)]
    pub enum Refusal {
        // ---- the connection (module door: before tiny_http reads a byte) -------------
        /// Over --max-connections.
        TooManyConnections {
            limit: usize,
        },
        HeadTooLarge {
            limit: usize,
        },
        TooManyHeaders {
            limit: usize,
        },
        /// A body over --max-body: declared, counted as it came, or a one-shot query.
        BodyTooLarge {
            declared: Option<u64>,
            limit: usize,
        },
        /// A chunked body that breaks RFC 9112 §7.1 (the reason says how).
        BadChunk(&'static str),
        /// Bytes a request head may not hold: non-ASCII, NUL or other controls.
        BadHeadBytes,
        /// Not `METHOD SP target SP HTTP/x.y` (RFC 9112 §3).
        BadRequestLine,
        /// A header line that is not `name: value` (RFC 9112 §5); the reason says how.
        BadHeaderLine(&'static str),
        /// HTTP/2, HTTP/3 (and their preface): HTTP/1.0 and 1.1 only.
        HttpVersion,
        /// Content-Length and Transfer-Encoding that could frame the body two ways
        /// (RFC 9112 §6.1, §6.3): the smuggling cases. The reason says which.
        AmbiguousFraming(&'static str),
        /// A transfer coding other than chunked (RFC 9112 §6.1).
        UnknownCoding,
        /// HTTP/1.1 without exactly one Host, HTTP/1.0 with several (RFC 9112 §3.2).
        HostCount,
        HeadTimeout,
        BodyTimeout,
        /// A chunked body over TLS: the door sees only ciphertext, so it cannot bound
        /// the chunk framing, and tiny_http's decoder does not (`http::handle`).
        LengthRequired,
        // ---- any endpoint (module http) ----------------------------------------------
        ShuttingDown,
        /// A new session while the instance drains (--drain-signal): a balancer retries
        /// it on another instance.
        Draining,
        /// No bearer token, or one not configured (A-1).
        Unauthorized(TokenFault),
        /// DNS-rebinding protection (O-1, O-2).
        ForeignHost(String),
        ForeignOrigin(String),
        /// A CORS preflight from an origin not listed.
        CorsOrigin(String),
        NotFound(String),
        MethodNotAllowed {
            allow: &'static str,
        },
        UnsupportedMediaType {
            got: String,
        },
        NotAcceptable {
            wanted: Wanted,
            got: String,
        },
        UnreadableBody(String),
        NotJson(String),
        NotJsonRpc(String),
        EmptyBatch,
        /// A request id MCP does not allow, or one the carrier could not give back
        /// exactly; `range` says what is allowed.
        IdNotAllowed {
            id: String,
            range: String,
        },
        /// A --pass-header value with a control character.
        HeaderControl {
            name: String,
        },
        /// Over --rate-limit (module ratelimit): the whole seconds until the client's
        /// bucket holds a request again.
        RateLimited {
            rate: String,
            kind: crate::ratelimit::KeyKind,
            retry_after: Duration,
        },
        // ---- sessions (modules streamable, legacy, sessions, upstream) ---------------
        /// A new session over --max-sessions-per-token (module ratelimit counts it).
        ClientSessions {
            limit: usize,
            kind: crate::ratelimit::KeyKind,
        },
        SessionIdRequired,
        SessionQueryRequired,
        SessionNotFound,
        AlreadyInitialized,
        InitializeInBatch,
        BatchNotNegotiated,
        UnsupportedVersion {
            got: String,
            supported: String,
        },
        IdInFlight(String),
        UnexpectedResponse(String),
        NoStreamToAnswer,
        SecondGetStream,
        LastEventIdMalformed(String),
        LastEventIdUnknown(String),
        LastEventIdEvicted(String),
        TooManySessions {
            limit: usize,
        },
        /// Large bodies being parsed at once over --parse-budget.
        ParseBudget {
            limit: usize,
        },
        /// Writing to the child failed: the session has ended.
        ChildNotAccepting(String),
        /// The child could not be started (its reason).
        ChildNotStarted(String),
        /// Shared mode: every child is between a death and its restart.
        Restarting,
        /// Shared mode: the children are crash-looping (the reason says how).
        CrashLoop(String),
        // ---- 2026-07-28 (module modern: M-2, M-5, M-10) -----------------------------
        /// A modern body that is an array.
        ModernBatch,
        /// A response POSTed by a modern client (answers ride on the retry, M-5).
        ModernResponse,
        /// The envelope lacks a required field (the reason says which).
        ModernEnvelope(String),
        /// `MCP-Protocol-Version`, `Mcp-Method` or `Mcp-Name` missing or not the body's.
        HeaderMismatch(String),
        /// A modern version we do not serve.
        ModernVersion {
            requested: String,
        },
        /// A method 2026-07-28 does not have (or the child does not serve).
        ModernUnknownMethod(String),
        /// The child asked for input the request's clientCapabilities do not declare.
        MissingCapability {
            method: String,
            required: serde_json::Value,
        },
        /// A forged, altered, expired, replayed or foreign `requestState`.
        BadRequestState(String),
        /// --child-protocol modern (or auto found it): a 2025 client cannot be served.
        ChildModernOnly,
        /// No child for a modern call now (capacity, restarting): the reason says which.
        ModernUnavailable(String),
        // ---- servers (module servers) ---------------------------------------------------
        /// A tool its server's filter hides, or on the merged endpoint one no server
        /// lists: the answer an unknown tool gets (in band: the HTTP exchange succeeds).
        UnknownTool(String),
        /// On the merged endpoint: a prompt no server lists.
        UnknownPrompt(String),
        /// On the merged endpoint: a resource URI no server listed or templates.
        UnknownResource(String),
        /// On the merged endpoint: a method none of its servers serve.
        MergedUnknownMethod(String),
        // ---- one-shot ----------------------------------------------------------------
        OneShotQueryRequired,
        TooManyInFlight {
            limit: usize,
        },
    }

    impl Refusal {
        pub fn status(&self) -> u16 {
            use Refusal::*;
            match self {
                BadChunk(_)
                | BadHeadBytes
                | BadRequestLine
                | BadHeaderLine(_)
                | AmbiguousFraming(_)
                | HostCount
                | UnreadableBody(_)
                | NotJson(_)
                | NotJsonRpc(_)
                | EmptyBatch
                | IdNotAllowed { .. }
                | HeaderControl { .. }
                | SessionIdRequired
                | SessionQueryRequired
                | AlreadyInitialized
                | InitializeInBatch
                | BatchNotNegotiated
                | UnsupportedVersion { .. }
                | IdInFlight(_)
                | UnexpectedResponse(_)
                | LastEventIdMalformed(_)
                | LastEventIdUnknown(_)
                | LastEventIdEvicted(_)
                | ModernBatch
                | ModernResponse
                | ModernEnvelope(_)
                | HeaderMismatch(_)
                | ModernVersion { .. }
                | MissingCapability { .. }
                | BadRequestState(_)
                | ChildModernOnly
                | OneShotQueryRequired => 400,
                Unauthorized(_) => 401,
                ForeignHost(_) | ForeignOrigin(_) | CorsOrigin(_) => 403,
                NotFound(_) | SessionNotFound | ModernUnknownMethod(_) => 404,
                MethodNotAllowed { .. } => 405,
                NotAcceptable { .. } => 406,
                HeadTimeout | BodyTimeout => 408,
                LengthRequired => 411,
                NoStreamToAnswer | SecondGetStream => 409,
                BodyTooLarge { .. } => 413,
                UnsupportedMediaType { .. } => 415,
                HeadTooLarge { .. } | TooManyHeaders { .. } => 431,
                UnknownCoding => 501,
                ChildNotAccepting(_) | ChildNotStarted(_) => 502,
                TooManyConnections { .. }
                | ShuttingDown
                | Draining
                | TooManySessions { .. }
                | ParseBudget { .. }
                | Restarting
                | CrashLoop(_)
                | TooManyInFlight { .. }
                | ModernUnavailable(_) => 503,
                HttpVersion => 505,
                RateLimited { .. } | ClientSessions { .. } => 429,
                UnknownTool(_) | UnknownPrompt(_) | UnknownResource(_) | MergedUnknownMethod(_) => {
                    200
                }
            }
        }

        /// The JSON-RPC error code (P-11: what the SDKs answer for the same fault).
        pub fn code(&self) -> i64 {
            use Refusal::*;
            match self {
                UnreadableBody(_) | NotJson(_) => -32700,
                NotFound(_) | ModernUnknownMethod(_) => -32601,
                Unauthorized(_) | SessionNotFound => -32001,
                ModernEnvelope(_) | BadRequestState(_) | UnknownTool(_) | UnknownPrompt(_) => {
                    -32602
                }
                UnknownResource(_) => -32002,
                MergedUnknownMethod(_) => -32601,
                HeaderMismatch(_) => -32020,
                MissingCapability { .. } => -32021,
                ModernVersion { .. } => -32022,
                ChildNotAccepting(_) | ChildNotStarted(_) | ModernUnavailable(_) => -32603,
                HeadTooLarge { .. }
                | TooManyHeaders { .. }
                | BodyTooLarge { .. }
                | BadChunk(_)
                | BadHeadBytes
                | BadRequestLine
                | BadHeaderLine(_)
                | LengthRequired
                | HttpVersion
                | AmbiguousFraming(_)
                | UnknownCoding
                | HostCount
                | NotJsonRpc(_)
                | EmptyBatch
                | IdNotAllowed { .. }
                | HeaderControl { .. }
                | AlreadyInitialized
                | InitializeInBatch
                | BatchNotNegotiated
                | IdInFlight(_)
                | UnexpectedResponse(_)
                | ModernBatch
                | ModernResponse
                | ChildModernOnly
                | OneShotQueryRequired => -32600,
                TooManyConnections { .. }
                | HeadTimeout
                | BodyTimeout
                | ShuttingDown
                | Draining
                | ForeignHost(_)
                | ForeignOrigin(_)
                | CorsOrigin(_)
                | MethodNotAllowed { .. }
                | UnsupportedMediaType { .. }
                | NotAcceptable { .. }
                | SessionIdRequired
                | SessionQueryRequired
                | UnsupportedVersion { .. }
                | NoStreamToAnswer
                | SecondGetStream
                | LastEventIdMalformed(_)
                | LastEventIdUnknown(_)
                | LastEventIdEvicted(_)
                | TooManySessions { .. }
                | ParseBudget { .. }
                | Restarting
                | CrashLoop(_)
                | TooManyInFlight { .. }
                | RateLimited { .. }
                | ClientSessions { .. } => -32000,
            }
        }

        pub fn message(&self) -> String {
            use Refusal::*;
            match self {
                TooManyConnections { limit } => format!("Service unavailable: too many connections (--max-connections {limit})"),
                HeadTooLarge { limit } => format!("Request header fields too large: the limit is {limit} bytes (--max-header-size)"),
                TooManyHeaders { limit } => format!("Request header fields too large: more than {limit} header lines (--max-headers)"),
                BodyTooLarge { declared: Some(n), limit } => format!("Request body too large: {n} bytes declared, the limit is {limit} bytes (--max-body)"),
                BodyTooLarge { declared: None, limit } => format!("Request body too large: the limit is {limit} bytes (--max-body)"),
                BadChunk(why) => format!("Bad Request: malformed chunked body ({why})"),
                BadHeadBytes => "Bad Request: the request head holds bytes that are not printable ASCII".into(),
                BadRequestLine => "Bad Request: the request line is not METHOD SP target SP HTTP/1.x".into(),
                BadHeaderLine(why) => format!("Bad Request: {why}"),
                HttpVersion => "HTTP Version Not Supported: only HTTP/1.0 and HTTP/1.1 are served".into(),
                AmbiguousFraming(why) => format!("Bad Request: {why}"),
                UnknownCoding => "Not Implemented: the only transfer coding accepted is chunked".into(),
                HostCount => "Bad Request: an HTTP/1.1 request needs exactly one Host header".into(),
                HeadTimeout => "Request timeout: the request did not arrive within --read-timeout".into(),
                BodyTimeout => "Request timeout: the body did not arrive within --read-timeout".into(),
                LengthRequired => "Length Required: over TLS a request body needs Content-Length".into(),
                ShuttingDown => "Server is shutting down".into(),
                Draining => "Service Unavailable: this instance is draining (it serves its open sessions, then stops); open the session on another instance".into(),
                Unauthorized(TokenFault::Missing) => "Unauthorized: send Authorization: Bearer <token>".into(),
                Unauthorized(TokenFault::Invalid) => "Unauthorized: the bearer token is not valid".into(),
                ForeignHost(host) => format!("Forbidden: Host {host:?} is not allowed (see --allowed-host)"),
                ForeignOrigin(origin) => format!("Forbidden: Origin {origin:?} is not allowed (see --allowed-origin)"),
                CorsOrigin(origin) => format!("Forbidden: Origin {origin:?} is not allowed by CORS (see --cors-origin)"),
                NotFound(path) => format!("Not found: {path}"),
                MethodNotAllowed { allow } => format!("Method not allowed; allowed: {allow}"),
                UnsupportedMediaType { got } => format!("Unsupported Media Type: Content-Type must be application/json, got {got}"),
                NotAcceptable { wanted: Wanted::JsonAndEventStream, got } => format!("Not Acceptable: Accept must list application/json and text/event-stream, got {got:?}"),
                NotAcceptable { wanted: Wanted::EventStream, got } => format!("Not Acceptable: Accept must list text/event-stream, got {got:?}"),
                UnreadableBody(e) => format!("Could not read request body: {e}"),
                NotJson(e) => format!("Parse error: invalid JSON: {e}"),
                NotJsonRpc(why) => format!("Invalid Request: not a JSON-RPC 2.0 message ({why})"),
                EmptyBatch => "Invalid Request: empty batch".into(),
                IdNotAllowed { id, range } => format!("Invalid Request: id {id} is not a string or an integer {range} (MCP request ids)"),
                HeaderControl { name } => format!("Bad Request: header {name} holds a control character"),
                SessionIdRequired => "Bad Request: Mcp-Session-Id header is required (Server not initialized: send initialize first, or send a 2026-07-28 request with its _meta envelope)".into(),
                SessionQueryRequired => "Bad Request: sessionId query parameter is required".into(),
                SessionNotFound => "Session not found".into(),
                AlreadyInitialized => "Invalid Request: Server already initialized (this session has sent initialize)".into(),
                InitializeInBatch => "Invalid Request: initialize must not be part of a batch".into(),
                BatchNotNegotiated => "Invalid Request: JSON-RPC batches are only allowed with protocol version 2025-03-26".into(),
                UnsupportedVersion { got, supported } => format!("Bad Request: Unsupported protocol version: {got} (supported versions: {supported})"),
                IdInFlight(key) => format!("Invalid Request: request id {key} is already in flight in this session"),
                UnexpectedResponse(key) => format!("Invalid Request: response to id {key}, but the server sent this session no request with that id (or it was already answered)"),
                NoStreamToAnswer => "Conflict: no open stream to answer on".into(),
                SecondGetStream => "Conflict: only one GET stream is allowed per session (send Last-Event-ID to resume it)".into(),
                LastEventIdMalformed(given) => format!("Bad Request: invalid Last-Event-ID {given:?} (expected STREAM-EVENT as sent by this server)"),
                LastEventIdUnknown(given) => format!("Bad Request: Last-Event-ID {given:?} names no stream of this session; it ended and left the replay buffer"),
                LastEventIdEvicted(given) => format!("Bad Request: events after Last-Event-ID {given:?} are no longer in the replay buffer (--replay-buffer); they cannot be replayed"),
                TooManySessions { limit } => format!("Too many sessions (--max-sessions {limit}); retry later or end a session"),
                ParseBudget { limit } => format!("Service Unavailable: large request bodies are being parsed over --parse-budget ({limit} bytes); retry later"),
                ChildNotAccepting(e) => format!("The server process is not accepting input ({e}); the session has ended"),
                ChildNotStarted(why) => why.clone(),
                Restarting => "Service Unavailable: the server process is restarting".into(),
                CrashLoop(why) => format!("Service Unavailable: {why}"),
                ModernBatch => "Invalid Request: a 2026-07-28 request is one JSON-RPC message, not a batch".into(),
                ModernResponse => "Invalid Request: a 2026-07-28 client sends no responses (answers to the server's questions ride on the retry, as inputResponses)".into(),
                ModernEnvelope(why) => format!("Invalid params: {why}"),
                HeaderMismatch(why) => format!("Header mismatch: {why}"),
                ModernVersion { requested } => format!("Unsupported protocol version: {requested} (supported: {})", crate::modern::VERSIONS.join(", ")),
                ModernUnknownMethod(m) => format!("Method not found: {m} (not a 2026-07-28 method the server provides; initialize, ping, logging/setLevel and resources/subscribe are gone in 2026-07-28)"),
                MissingCapability { method, .. } => format!("Missing capability: the server asked {method}, which this request's clientCapabilities do not declare"),
                BadRequestState(why) => format!("Invalid params: requestState {why}"),
                ModernUnavailable(why) => format!("Service unavailable for 2026-07-28 calls: {why}"),
                UnknownTool(name) => format!("Unknown tool: {name}"),
                UnknownPrompt(name) => format!("Unknown prompt: {name}"),
                UnknownResource(uri) => format!("Resource not found: {uri}"),
                MergedUnknownMethod(m) => format!("Method not found: {m}"),
                ChildModernOnly => format!("Unsupported protocol version: the server behind this bridge speaks only {} (no initialize); connect with a 2026-07-28 client", crate::modern::VERSIONS.join(", ")),
                OneShotQueryRequired => "Bad Request: the request query parameter is required (url-encoded JSON)".into(),
                TooManyInFlight { limit } => format!("Too many requests in flight (--max-sessions {limit})"),
                RateLimited { rate, kind, retry_after } => format!("Too Many Requests: {} is over --rate-limit {rate}; retry after {} s", kind.words(), retry_after.as_secs()),
                ClientSessions { limit, kind } => format!("Too Many Requests: {} holds --max-sessions-per-token {limit} sessions; end one (DELETE) or retry later", kind.words()),
            }
        }

        /// Headers that go with the refusal.
        pub fn headers(&self) -> Vec<(&'static str, String)> {
            use Refusal::*;
            let retry = |d: Duration| vec![("Retry-After", d.as_secs().to_string())];
            match self {
                MethodNotAllowed { allow } => vec![("Allow", allow.to_string())],
                Unauthorized(TokenFault::Missing) => {
                    vec![("WWW-Authenticate", "Bearer realm=\"stdio-sse\"".into())]
                }
                Unauthorized(TokenFault::Invalid) => vec![(
                    "WWW-Authenticate",
                    "Bearer realm=\"stdio-sse\", error=\"invalid_token\"".into(),
                )],
                ShuttingDown | Draining | Restarting | TooManyInFlight { .. } => retry(RETRY_SOON),
                ModernUnavailable(_) => retry(RETRY_LATER),
                TooManySessions { .. } | CrashLoop(_) => retry(RETRY_LATER),
                ParseBudget { .. } => retry(RETRY_SOON),
                RateLimited { retry_after, .. } => retry(*retry_after),
                ClientSessions { .. } => retry(RETRY_LATER),
                _ => Vec::new(),
            }
        }

        /// The label of its log line (`error=`) and, for the refusals counted in
        /// `stdio_sse_requests_rejected_total`, of that metric.
        pub fn reason(&self) -> &'static str {
            use Refusal::*;
            match self {
                TooManyConnections { .. } => "max_connections",
                HeadTooLarge { .. } => "header_too_large",
                TooManyHeaders { .. } => "too_many_headers",
                BodyTooLarge { .. } => "body_too_large",
                BadChunk(_) => "bad_chunked_body",
                BadHeadBytes => "bad_header_bytes",
                BadRequestLine => "bad_request_line",
                BadHeaderLine(_) => "bad_header_line",
                HttpVersion => "unsupported_http_version",
                AmbiguousFraming(_) => "bad_framing",
                UnknownCoding => "unknown_transfer_coding",
                HostCount => "bad_host_header",
                HeadTimeout | BodyTimeout => "read_timeout",
                LengthRequired => "length_required",
                ShuttingDown => "shutting_down",
                Draining => "draining",
                Unauthorized(_) => "unauthorized",
                ForeignHost(_) => "foreign_host",
                ForeignOrigin(_) => "foreign_origin",
                CorsOrigin(_) => "cors_origin",
                NotFound(_) => "not_found",
                MethodNotAllowed { .. } => "method_not_allowed",
                UnsupportedMediaType { .. } => "unsupported_media_type",
                NotAcceptable { .. } => "not_acceptable",
                UnreadableBody(_) => "unreadable_body",
                NotJson(_) => "not_json",
                NotJsonRpc(_) | EmptyBatch => "not_jsonrpc",
                IdNotAllowed { .. } => "id_not_allowed",
                HeaderControl { .. } => "bad_passed_header",
                SessionIdRequired | SessionQueryRequired => "session_id_required",
                SessionNotFound => "session_not_found",
                AlreadyInitialized | InitializeInBatch => "bad_initialize",
                BatchNotNegotiated => "batch_not_negotiated",
                UnsupportedVersion { .. } => "unsupported_protocol_version",
                IdInFlight(_) => "id_in_flight",
                UnexpectedResponse(_) => "unexpected_response",
                NoStreamToAnswer | SecondGetStream => "stream_conflict",
                LastEventIdMalformed(_) | LastEventIdUnknown(_) | LastEventIdEvicted(_) => {
                    "bad_last_event_id"
                }
                TooManySessions { .. } | TooManyInFlight { .. } => "capacity",
                ParseBudget { .. } => "parse_budget",
                ChildNotAccepting(_) | ChildNotStarted(_) => "child_unavailable",
                Restarting | CrashLoop(_) => "child_restarting",
                OneShotQueryRequired => "query_required",
                ModernBatch | ModernResponse => "not_jsonrpc",
                ModernEnvelope(_) => "bad_envelope",
                HeaderMismatch(_) => "header_mismatch",
                ModernVersion { .. } | ChildModernOnly => "unsupported_protocol_version",
                ModernUnknownMethod(_) => "method_not_found",
                MissingCapability { .. } => "missing_capability",
                BadRequestState(_) => "bad_request_state",
                ModernUnavailable(_) => "capacity",
                UnknownTool(_) | UnknownPrompt(_) | UnknownResource(_) => "unknown_name",
                MergedUnknownMethod(_) => "method_not_found",
                RateLimited { .. } => "rate_limited",
                ClientSessions { .. } => "client_sessions",
            }
        }

        /// The JSON-RPC error's `data`, for the refusals whose clients read it (M-2, M-5).
        pub fn data(&self) -> Option<serde_json::Value> {
            use Refusal::*;
            let supported = crate::modern::VERSIONS;
            match self {
                ModernVersion { requested } => {
                    Some(serde_json::json!({"supported": supported, "requested": requested}))
                }
                ChildModernOnly => Some(serde_json::json!({"supported": supported})),
                MissingCapability { required, .. } => {
                    Some(serde_json::json!({"requiredCapabilities": required}))
                }
                _ => None,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// One of each refusal. `kind` has no wildcard arm: a new refusal does not compile
        /// until it is listed here, and so checked against the README.
        fn every() -> Vec<Refusal> {
            use Refusal::*;
            let s = || "x".to_string();
            let all = vec![
                TooManyConnections { limit: 1 },
                HeadTooLarge { limit: 1 },
                TooManyHeaders { limit: 1 },
                BodyTooLarge {
                    declared: Some(2),
                    limit: 1,
                },
                BodyTooLarge {
                    declared: None,
                    limit: 1,
                },
                BadChunk("x"),
                BadHeadBytes,
                BadRequestLine,
                BadHeaderLine("x"),
                HttpVersion,
                AmbiguousFraming("x"),
                UnknownCoding,
                HostCount,
                HeadTimeout,
                BodyTimeout,
                LengthRequired,
                ShuttingDown,
                Draining,
                Unauthorized(TokenFault::Missing),
                Unauthorized(TokenFault::Invalid),
                ForeignHost(s()),
                ForeignOrigin(s()),
                CorsOrigin(s()),
                NotFound(s()),
                MethodNotAllowed { allow: "GET" },
                UnsupportedMediaType { got: s() },
                NotAcceptable {
                    wanted: Wanted::JsonAndEventStream,
                    got: s(),
                },
                NotAcceptable {
                    wanted: Wanted::EventStream,
                    got: s(),
                },
                UnreadableBody(s()),
                NotJson(s()),
                NotJsonRpc(s()),
                EmptyBatch,
                IdNotAllowed {
                    id: s(),
                    range: s(),
                },
                HeaderControl { name: s() },
                SessionIdRequired,
                SessionQueryRequired,
                SessionNotFound,
                AlreadyInitialized,
                InitializeInBatch,
                BatchNotNegotiated,
                UnsupportedVersion {
                    got: s(),
                    supported: s(),
                },
                IdInFlight(s()),
                UnexpectedResponse(s()),
                NoStreamToAnswer,
                SecondGetStream,
                LastEventIdMalformed(s()),
                LastEventIdUnknown(s()),
                LastEventIdEvicted(s()),
                TooManySessions { limit: 1 },
                ParseBudget { limit: 1 },
                ChildNotAccepting(s()),
                ChildNotStarted(s()),
                Restarting,
                CrashLoop(s()),
                OneShotQueryRequired,
                TooManyInFlight { limit: 1 },
                ModernBatch,
                ModernResponse,
                ModernEnvelope(s()),
                HeaderMismatch(s()),
                ModernVersion { requested: s() },
                ModernUnknownMethod(s()),
                MissingCapability {
                    method: s(),
                    required: serde_json::Value::Null,
                },
                BadRequestState(s()),
                ChildModernOnly,
                ModernUnavailable(s()),
                UnknownTool(s()),
                UnknownPrompt(s()),
                UnknownResource(s()),
                MergedUnknownMethod(s()),
                RateLimited {
                    rate: s(),
                    kind: crate::ratelimit::KeyKind::Token,
                    retry_after: Duration::from_secs(1),
                },
                ClientSessions {
                    limit: 1,
                    kind: crate::ratelimit::KeyKind::Address,
                },
            ];
            for r in &all {
                kind(r);
            }
            all
        }

        fn kind(r: &Refusal) {
            use Refusal::*;
            match r {
                TooManyConnections { .. }
                | HeadTooLarge { .. }
                | TooManyHeaders { .. }
                | BodyTooLarge { .. }
                | BadChunk(_)
                | BadHeadBytes
                | BadRequestLine
                | BadHeaderLine(_)
                | HttpVersion
                | AmbiguousFraming(_)
                | UnknownCoding
                | HostCount
                | HeadTimeout
                | BodyTimeout
                | LengthRequired
                | ShuttingDown
                | Draining
                | Unauthorized(_)
                | ForeignHost(_)
                | ForeignOrigin(_)
                | CorsOrigin(_)
                | NotFound(_)
                | MethodNotAllowed { .. }
                | UnsupportedMediaType { .. }
                | NotAcceptable { .. }
                | UnreadableBody(_)
                | NotJson(_)
                | NotJsonRpc(_)
                | EmptyBatch
                | IdNotAllowed { .. }
                | HeaderControl { .. }
                | SessionIdRequired
                | SessionQueryRequired
                | SessionNotFound
                | AlreadyInitialized
                | InitializeInBatch
                | BatchNotNegotiated
                | UnsupportedVersion { .. }
                | IdInFlight(_)
                | UnexpectedResponse(_)
                | NoStreamToAnswer
                | SecondGetStream
                | LastEventIdMalformed(_)
                | LastEventIdUnknown(_)
                | LastEventIdEvicted(_)
                | TooManySessions { .. }
                | ParseBudget { .. }
                | ChildNotAccepting(_)
                | ChildNotStarted(_)
                | Restarting
                | CrashLoop(_)
                | OneShotQueryRequired
                | TooManyInFlight { .. }
                | ModernBatch
                | ModernResponse
                | ModernEnvelope(_)
                | HeaderMismatch(_)
                | ModernVersion { .. }
                | ModernUnknownMethod(_)
                | MissingCapability { .. }
                | BadRequestState(_)
                | ChildModernOnly
                | ModernUnavailable(_)
                | UnknownTool(_)
                | UnknownPrompt(_)
                | UnknownResource(_)
                | MergedUnknownMethod(_)
                | RateLimited { .. }
                | ClientSessions { .. } => {}
            }
        }

        /// The README's bad-input table: (statuses, codes) of each row; a cell may list
        /// several (`400 / 404`).
        fn readme_rows() -> Vec<(String, Vec<u16>, Vec<i64>)> {
            let readme = include_str!("README.md");
            let section = readme
                .split("\n## Bad input\n")
                .nth(1)
                .and_then(|rest| rest.split("\n## ").next())
                .expect("README has a Bad input section");
            section
                .lines()
                .filter(|l| {
                    l.starts_with('|') && !l.starts_with("| input") && !l.starts_with("|--")
                })
                .map(|l| {
                    let cells: Vec<&str> = l.trim_matches('|').rsplitn(3, '|').collect();
                    let nums = |c: &str| -> Vec<i64> {
                        c.split('/').filter_map(|n| n.trim().parse().ok()).collect()
                    };
                    let statuses = nums(cells[1]).into_iter().map(|n| n as u16).collect();
                    (cells[2].trim().to_string(), statuses, nums(cells[0]))
                })
                .collect()
        }

        #[test]
        fn the_readme_bad_input_table_matches_the_refusals() {
            let rows = readme_rows();
            assert!(rows.len() > 30, "{rows:?}");
            let refusals = every();
            for r in &refusals {
                let (status, code) = (r.status(), r.code());
                assert!(
                    rows.iter()
                        .any(|(_, st, co)| st.contains(&status) && co.contains(&code)),
                    "{r:?} ({status}, {code}) has no row in the README's bad-input table"
                );
            }
            for (input, statuses, codes) in &rows {
                assert!(
                    !statuses.is_empty() && statuses.len() == codes.len(),
                    "row {input:?}"
                );
                for (st, co) in statuses.iter().zip(codes) {
                    assert!(
                        refusals
                            .iter()
                            .any(|r| r.status() == *st && r.code() == *co),
                        "README row {input:?} says {st} {co}: no refusal gives that"
                    );
                }
            }
        }

        #[test]
        fn each_refusal_reads_as_a_whole_answer() {
            for r in every() {
                let m = r.message();
                assert!(!m.is_empty() && !m.ends_with(' '), "{r:?}: {m:?}");
                let in_band = r.status() == 200;
                assert!(in_band || (400..600).contains(&r.status()), "{r:?}");
                assert!(!r.reason().is_empty(), "{r:?}");
                let headers: Vec<&str> = r.headers().iter().map(|(k, _)| *k).collect();
                match r.status() {
                    401 => assert_eq!(headers, ["WWW-Authenticate"], "{r:?}"),
                    405 => assert_eq!(headers, ["Allow"], "{r:?}"),
                    503 if !matches!(r, Refusal::TooManyConnections { .. }) => {
                        assert_eq!(headers, ["Retry-After"], "{r:?}")
                    }
                    // RFC 6585 §4: when to come back.
                    429 => assert_eq!(headers, ["Retry-After"], "{r:?}"),
                    _ => assert!(headers.is_empty(), "{r:?}"),
                }
            }
        }
    }
}

// ======================================================================================
/// The connection layer, below HTTP: every connection from accept until its requests are
/// in. tiny_http has no accept hook and reads request heads with no bound of size, count
/// or time; it also drains a declared body on drop into a buffer of the declared size.
/// So we interpose the two libc calls it makes on our sockets: `accept4` on the listening
/// socket (its accept thread) and `recv` on each connection (its connection threads and
/// our handlers reading bodies). Both are plain symbol definitions the linker prefers to
/// libc's; every other caller passes straight through. Here we see every byte a client
/// sends, in order, and follow HTTP/1.1 framing (heads, Content-Length and chunked
/// bodies), so each head is checked whole before tiny_http acts on it.
/// It also watches the sockets of standing streams for a client that left (`watch`),
/// and tells a waiting 2026-07-28 call whether its client hung up (`hung_up`).
/// Owns: the connection table, --max-connections, --read-timeout, --max-header-size,
/// --max-headers, the early refusals (503, 408, 413, 431) written on the raw socket, and
/// the stream watcher. Touches: raw sockets, the config limits it is given, metrics and
/// the log.
mod door {
    use crate::refusal::Refusal;
    use crate::Locked;
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    /// A TLS byte stream cannot be framed: its head phase may use this much beyond
    /// --max-header-size (handshake, record overhead, one read-ahead record).
    const TLS_HEAD_SLACK: usize = 64 * 1024;
    /// A refused connection is closed this long after its answer, so the answer is read
    /// before the close (a close with unread input sends RST, which can discard it).
    const LINGER: Duration = Duration::from_millis(500);
    /// At most this many refused connections linger; beyond it they close at once.
    const MAX_LINGERING: usize = 256;
    /// Liveness of tracked connections is re-checked this often (a closed fd is noticed
    /// by its inode no longer matching).
    const SWEEP_EVERY: Duration = Duration::from_secs(5);
    /// A chunk-size line (size and extensions) longer than this is refused with 400: no
    /// client needs more, and each byte of it waits in memory until the line ends.
    const MAX_CHUNK_LINE: usize = 1024;
    /// Hex digits of a chunk size: sixteen already exceed any --max-body.
    const MAX_CHUNK_DIGITS: usize = 16;
    /// After an accept that failed for want of descriptors or memory, the next try
    /// waits this long (the condition clears as connections end).
    const ACCEPT_RETRY: Duration = Duration::from_millis(50);
    /// Refusals over --max-connections are logged at most once in this, with a count.
    const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);
    /// The accept thread waits at most this long for tiny_http to start reading the
    /// connection it accepted last (see `wait_for_pickup`).
    const PICKUP_WAIT: Duration = Duration::from_millis(100);

    pub struct Limits {
        pub max_connections: usize,
        pub read_timeout: Duration,
        pub max_head: usize,
        pub max_headers: usize,
        pub max_body: usize,
        pub tls: bool,
    }

    static LIMITS: OnceLock<Limits> = OnceLock::new();
    static LISTENER: AtomicI32 = AtomicI32::new(-1);
    static KEEPER_WAKE: Condvar = Condvar::new();
    /// Connections holding a deferred refusal: while none does, a read skips the check.
    static DEFERRED: AtomicUsize = AtomicUsize::new(0);
    /// Signalled when a handler leaves (`answer_deferred` waits for it).
    static IDLE: Condvar = Condvar::new();
    thread_local! {
        /// The connection (inode) this thread's handler is answering, 0 for none: a
        /// handler reading ahead must not wait for its own end.
        static VISITING: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    static TABLE: Mutex<Option<Table>> = Mutex::new(None);
    static LOG_FLOOD: AtomicBool = AtomicBool::new(false);

    #[derive(Default)]
    struct Table {
        /// Keyed by socket inode: tiny_http reads through a dup of the accepted fd.
        conns: HashMap<u64, Connection>,
        /// A peer address can name two connections at once: one reset by its client
        /// but still being answered, and a new one from the same port. Oldest first.
        by_peer: HashMap<SocketAddr, Vec<u64>>,
        lingering: Vec<(i32, Instant)>,
        /// When the keeper will next look; a deadline earlier than this wakes it.
        keeper_at: Option<Instant>,
        refused_unlogged: u64,
        last_refusal_log: Option<Instant>,
    }

    struct Connection {
        fd: i32,
        peer: SocketAddr,
        /// Requests of this connection being handled now.
        active: u32,
        /// The next head must be in by then (set while no request is being handled).
        head_deadline: Option<Instant>,
        /// The body now arriving must be in by then.
        body_deadline: Option<Instant>,
        body_timed_out: bool,
        frame: Framing,
        /// Bytes of the head now arriving (TLS: of the whole head phase).
        head_bytes: usize,
        /// Request heads read so far: tells a handler whether the body the stream is in
        /// is its own or already the next request's.
        heads: u64,
        /// Requests a handler has taken (`Visit::begin`): those not yet taken are
        /// `heads - claimed`.
        claimed: u64,
        /// Chunked body bytes declared so far (checked against --max-body per chunk).
        chunked_total: u64,
        /// A cut found while a handler was busy with this connection: the handler answers
        /// it (a body it was reading) or, at its end, the door does. Either way exactly
        /// one answer, then the connection closes.
        pending_cut: Option<Refusal>,
        /// The handler answered the cut itself: close when it leaves.
        close_after: bool,
        /// A refused request whose answer waits for the answers of the requests before it
        /// (how many: requests whose handlers must have ended first).
        deferred: Option<(Refusal, u64)>,
        /// Requests whose handler has ended (compared with `heads`).
        ended: u64,
        /// Where in the bytes of the current read the head now arriving began (0 when
        /// it began in an earlier read).
        head_at: usize,
        /// Of the head now arriving: the bytes and lines already checked (`check_lines`).
        head_checked: (usize, usize),
        /// Our own descriptor of the socket, taken when a cut must wait for its handler:
        /// by the time the handler leaves, tiny_http may have closed `fd` and the number
        /// may name another client's connection. Closed with the entry.
        cut_fd: Option<i32>,
    }

    impl Connection {
        /// Whether the socket is still open somewhere (ours or tiny_http's).
        fn alive(&self, ino: u64) -> bool {
            self.cut_fd.is_some() || inode(self.fd) == Some(ino)
        }
        /// A descriptor of our own for this connection's socket (`ino` is its key), if it
        /// is still open: tiny_http closes `fd` on its own schedule, and the number may
        /// already name another client's connection, so we act only through a dup whose
        /// inode we have checked.
        fn hold(&self, ino: u64) -> Option<Held> {
            hold(self.cut_fd.unwrap_or(self.fd), ino)
        }
    }

    /// A dup of a connection's socket, closed when dropped.
    struct Held(i32);

    impl Drop for Held {
        fn drop(&mut self) {
            unsafe { libc::close(self.0) };
        }
    }

    fn hold(fd: i32, ino: u64) -> Option<Held> {
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return None;
        }
        let held = Held(dup);
        (inode(dup) == Some(ino)).then_some(held)
    }

    impl Drop for Connection {
        fn drop(&mut self) {
            if self.deferred.take().is_some() {
                DEFERRED.fetch_sub(1, Ordering::AcqRel);
            }
            if let Some(fd) = self.cut_fd.take() {
                unsafe { libc::close(fd) };
            }
        }
    }

    /// Where a connection's byte stream is.
    enum Framing {
        Head(Vec<u8>),
        Body(u64),
        ChunkSize(Vec<u8>),
        ChunkData(u64),
        ChunkEnd(u8),
        Trailer(Vec<u8>),
        /// TLS: only the head-phase byte budget applies.
        Opaque,
    }

    fn limits() -> &'static Limits {
        LIMITS
            .get()
            .expect("door installed before the server starts")
    }

    /// Arms the door for this listening socket and starts the keeper thread.
    pub fn install(listener: i32, l: Limits) {
        let _ = LIMITS.set(l);
        *TABLE.locked() = Some(Table::default());
        LISTENER.store(listener, Ordering::Release);
        crate::spawn_thread("door-keeper", keeper);
    }

    fn with_table<R>(f: impl FnOnce(&mut Table) -> R) -> Option<R> {
        TABLE.locked().as_mut().map(f)
    }

    fn inode(fd: i32) -> Option<u64> {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino as u64)
    }

    fn peer_of(fd: i32) -> Option<SocketAddr> {
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if unsafe {
            libc::getpeername(
                fd,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        } != 0
        {
            return None;
        }
        match ss.ss_family as i32 {
            libc::AF_INET => {
                let a: libc::sockaddr_in =
                    unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                let a: libc::sockaddr_in6 =
                    unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    fn raw_recv(fd: i32, buf: &mut [u8], flags: i32) -> isize {
        unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                buf.as_mut_ptr(),
                buf.len(),
                flags,
                0usize,
                0usize,
            ) as isize
        }
    }

    /// A complete HTTP response with a JSON-RPC error body, on the raw socket, then our
    /// side shut for writing. Never blocks: a client that cannot take ~300 bytes at once
    /// gets a plain close.
    fn write_refusal(fd: i32, refusal: &Refusal) {
        let body = crate::message::error_response(
            &serde_json::Value::Null,
            refusal.code(),
            &refusal.message(),
            None,
        );
        let head = crate::sse::status_line(refusal.status());
        let text = format!(
            "{head}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        unsafe {
            libc::send(
                fd,
                text.as_ptr().cast(),
                text.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            );
            libc::shutdown(fd, libc::SHUT_WR);
        }
    }

    fn count(refusal: &Refusal) {
        if let Some(app) = crate::APP.get() {
            app.metrics.rejected(refusal.reason());
        }
    }

    // ---- accept ----------------------------------------------------------------------

    /// tiny_http's accept thread calls this for our listening socket. Transient errors
    /// (a connection reset before accept, out of descriptors) are retried here: tiny_http
    /// would end its accept loop for good on any error.
    ///
    /// # Safety
    /// Called by libc users with accept4's contract.
    #[no_mangle]
    pub unsafe extern "C" fn accept4(
        fd: libc::c_int,
        addr: *mut libc::sockaddr,
        len: *mut libc::socklen_t,
        flags: libc::c_int,
    ) -> libc::c_int {
        if fd == LISTENER.load(Ordering::Acquire) {
            wait_for_pickup();
        }
        loop {
            let c = libc::syscall(libc::SYS_accept4, fd, addr, len, flags) as libc::c_int;
            if fd != LISTENER.load(Ordering::Acquire) {
                return c;
            }
            if c < 0 {
                let err = *libc::__errno_location();
                match err {
                    libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM => continue,
                    libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                        if !LOG_FLOOD.swap(true, Ordering::Relaxed) {
                            crate::log!(Error, "accept_failed", "cannot accept connections: {} (lower --max-connections or raise the open-files limit); retrying", std::io::Error::from_raw_os_error(err));
                        }
                        std::thread::sleep(ACCEPT_RETRY);
                        continue;
                    }
                    _ => return c,
                }
            }
            LOG_FLOOD.store(false, Ordering::Relaxed);
            if admit(c) {
                if let Some(ino) = inode(c) {
                    *AWAITING_PICKUP.locked() = Some((ino, Instant::now()));
                    AWAITED_INODE.store(ino, Ordering::Release);
                }
                return c;
            }
        }
    }

    /// tiny_http hands each accepted connection to its thread pool, which starts a new
    /// thread only when it counts no idle one. Two connections accepted back to back can
    /// both be given to the same idle thread (the first wakes it, the second is queued
    /// while the count still shows it idle): the second then waits, unread, until some
    /// other connection ends, and a busy keep-alive load never ends one. So the next
    /// accept waits until the previous connection's first read has begun (or PICKUP_WAIT
    /// has passed): by then the pool's count is true again.
    static AWAITING_PICKUP: Mutex<Option<(u64, Instant)>> = Mutex::new(None);
    static PICKED_UP: Condvar = Condvar::new();
    static AWAITED_INODE: AtomicU64 = AtomicU64::new(0);

    fn wait_for_pickup() {
        let mut awaiting = AWAITING_PICKUP.locked();
        while let Some((_, since)) = *awaiting {
            let left = PICKUP_WAIT.saturating_sub(since.elapsed());
            if left.is_zero() {
                *awaiting = None;
                AWAITED_INODE.store(0, Ordering::Release);
                break;
            }
            awaiting = PICKED_UP
                .wait_timeout(awaiting, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Called as a connection's reader starts reading: ends the accept thread's wait.
    /// (Every read passes here: only the awaited connection's takes the lock.)
    fn picked_up(ino: u64) {
        if AWAITED_INODE.load(Ordering::Acquire) != ino {
            return;
        }
        let mut awaiting = AWAITING_PICKUP.locked();
        if matches!(*awaiting, Some((i, _)) if i == ino) {
            *awaiting = None;
            AWAITED_INODE.store(0, Ordering::Release);
            PICKED_UP.notify_all();
        }
    }

    /// Registers a new connection, or answers 503 and lets it linger before closing.
    fn admit(fd: i32) -> bool {
        let l = limits();
        let (Some(ino), Some(peer)) = (inode(fd), peer_of(fd)) else {
            unsafe { libc::close(fd) };
            return false;
        };
        let admitted = with_table(|t| {
            if t.conns.len() >= l.max_connections {
                sweep(t);
            }
            if t.conns.len() >= l.max_connections {
                return false;
            }
            if let Some(old) = t.conns.remove(&ino) {
                t.unlink_peer(&old.peer, ino);
            }
            let deadline = (!l.read_timeout.is_zero()).then(|| Instant::now() + l.read_timeout);
            t.by_peer.entry(peer).or_default().push(ino);
            t.conns.insert(
                ino,
                Connection {
                    fd,
                    peer,
                    active: 0,
                    head_deadline: deadline,
                    body_deadline: None,
                    body_timed_out: false,
                    frame: if l.tls {
                        Framing::Opaque
                    } else {
                        Framing::Head(Vec::new())
                    },
                    head_bytes: 0,
                    heads: 0,
                    chunked_total: 0,
                    pending_cut: None,
                    close_after: false,
                    cut_fd: None,
                    deferred: None,
                    ended: 0,
                    head_at: 0,
                    head_checked: (0, 0),
                    claimed: 0,
                },
            );
            if let Some(d) = deadline {
                wake_keeper_by(t, d);
            }
            true
        })
        .unwrap_or(true);
        if admitted {
            return true;
        }
        let refusal = Refusal::TooManyConnections {
            limit: l.max_connections,
        };
        count(&refusal);
        if !l.tls {
            write_refusal(fd, &refusal);
        }
        with_table(|t| {
            t.refused_unlogged += 1;
            let quiet = t
                .last_refusal_log
                .is_some_and(|at| at.elapsed() < REFUSAL_LOG_EVERY);
            if !quiet {
                crate::log!(
                    Warn,
                    "connection_refused",
                    "{} connection(s) refused: --max-connections {} reached (latest from {peer})",
                    t.refused_unlogged,
                    l.max_connections
                );
                t.refused_unlogged = 0;
                t.last_refusal_log = Some(Instant::now());
            }
            if t.lingering.len() < MAX_LINGERING {
                t.lingering.push((fd, Instant::now() + LINGER));
                wake_keeper_by(t, Instant::now() + LINGER);
            } else {
                unsafe { libc::close(fd) };
            }
        });
        false
    }

    /// Forgets connections whose fd is closed (or now names another socket).
    fn sweep(t: &mut Table) {
        let gone: Vec<u64> = t
            .conns
            .iter()
            .filter(|(ino, c)| !c.alive(**ino))
            .map(|(ino, _)| *ino)
            .collect();
        for ino in gone {
            if let Some(c) = t.conns.remove(&ino) {
                t.unlink_peer(&c.peer, ino);
            }
        }
    }

    pub fn open_connections() -> usize {
        with_table(|t| {
            sweep(t);
            t.conns.len()
        })
        .unwrap_or(0)
    }

    // ---- recv: follow the framing ------------------------------------------------------

    /// Every read of a client socket, by tiny_http or by a handler reading a body.
    ///
    /// # Safety
    /// Called by libc users with recv's contract.
    #[no_mangle]
    pub unsafe extern "C" fn recv(
        fd: libc::c_int,
        buf: *mut libc::c_void,
        len: libc::size_t,
        flags: libc::c_int,
    ) -> libc::ssize_t {
        let watched = LISTENER.load(Ordering::Acquire) >= 0;
        let ino = if watched { inode(fd) } else { None };
        if let Some(ino) = ino {
            picked_up(ino);
            if DEFERRED.load(Ordering::Acquire) > 0 && matches!(answer_deferred(fd, ino), Pass::Cut)
            {
                *libc::__errno_location() = libc::ECONNRESET;
                return -1;
            }
        }
        let n =
            libc::syscall(libc::SYS_recvfrom, fd, buf, len, flags, 0usize, 0usize) as libc::ssize_t;
        let Some(ino) = ino.filter(|_| n > 0 && flags & libc::MSG_PEEK == 0) else {
            return n;
        };
        let data = std::slice::from_raw_parts(buf as *const u8, n as usize);
        match inspect(fd, ino, data) {
            Pass::All => n,
            Pass::First(k) => k as libc::ssize_t,
            Pass::Cut => {
                *libc::__errno_location() = libc::ECONNRESET;
                -1
            }
        }
    }

    /// What a read may hand on after the door has seen its bytes.
    enum Pass {
        /// All of them.
        All,
        /// Only the first n: the rest begins a request that is refused, whose answer
        /// waits until the requests before it are answered (`Connection::deferred`).
        First(usize),
        /// None: the connection is cut (the reader gets ECONNRESET).
        Cut,
    }

    fn inspect(fd: i32, ino: u64, data: &[u8]) -> Pass {
        let l = limits();
        // Logged and counted once the table's lock is let go: every read waits on it.
        let mut cut_seen = None;
        let verdict = with_table(|t| {
            let c = t.conns.get_mut(&ino)?;
            let before = c.head_deadline.or(c.body_deadline);
            let r = feed(c, data, l);
            let after = c.head_deadline.or(c.body_deadline);
            if let Some(d) = after.filter(|d| Some(*d) != before) {
                wake_keeper_by(t, d);
            }
            let Err(cut) = r else {
                return Some(Pass::All);
            };
            let c = t.conns.get_mut(&ino)?;
            cut_seen = Some((c.peer, cut.clone()));
            // A cut in a head is a new request's; one in a body, the request's whose
            // body it is.
            if !matches!(c.frame, Framing::Head(_)) {
                if c.active == 0 {
                    // No handler has this body's request yet: the refusal is its answer,
                    // after those of the requests before it.
                    defer(c, cut, c.heads.saturating_sub(1));
                    return Some(Pass::First(0));
                }
                // Its handler is reading the body: it answers the cut (`take_cut`), or
                // it already answered and the connection just closes when it leaves, on
                // a descriptor of ours (tiny_http may have closed `fd` by then).
                c.pending_cut = Some(cut);
                if c.cut_fd.is_none() {
                    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                    c.cut_fd = (dup >= 0).then_some(dup);
                }
                unsafe { libc::shutdown(fd, libc::SHUT_RD) };
                return Some(Pass::Cut);
            }
            // A refused request's answer follows the answers of the requests before it
            // on this connection. The bytes of those go on; the refusal waits for the
            // next read (`answer_deferred`).
            defer(c, cut, c.heads);
            Some(Pass::First(c.head_at))
        })
        .flatten();
        if let Some((peer, cut)) = cut_seen {
            count(&cut);
            crate::log!(
                Info,
                "connection_cut",
                "{peer}: {} {}",
                cut.status(),
                cut.message()
            );
        }
        match verdict {
            None | Some(Pass::All) => Pass::All,
            Some(Pass::First(0)) => answer_deferred(fd, ino),
            Some(other) => other,
        }
    }

    fn defer(c: &mut Connection, cut: Refusal, before: u64) {
        if c.deferred.replace((cut, before)).is_none() {
            DEFERRED.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Answers the refusal a connection holds (`Connection::deferred`) once every request
    /// before it has been answered, then cuts the connection. Called by the reader
    /// that would read the refused request: tiny_http's connection thread, which
    /// shuts the socket for writing as soon as its read fails, so it waits here.
    fn answer_deferred(fd: i32, ino: u64) -> Pass {
        let l = limits();
        let mut g = TABLE.locked();
        let Some((refusal, before)) = g
            .as_mut()
            .and_then(|t| t.conns.get_mut(&ino))
            .and_then(|c| c.deferred.clone())
        else {
            return Pass::All;
        };
        if VISITING.with(|v| v.get()) != ino {
            // Requests handed over but not yet taken by a handler count as unanswered
            // until --read-timeout passes without one being taken.
            let mut progress = (0, Instant::now());
            while let Some(c) = g.as_ref().and_then(|t| t.conns.get(&ino)) {
                if c.active == 0 && c.ended >= before {
                    break;
                }
                if c.ended != progress.0 {
                    progress = (c.ended, Instant::now());
                }
                let patience = l.read_timeout.max(LINGER);
                if c.active == 0 && progress.1.elapsed() >= patience {
                    break;
                }
                g = IDLE
                    .wait_timeout(g, patience)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        }
        if let Some(t) = g.as_mut() {
            if !l.tls {
                write_refusal(fd, &refusal);
            }
            if let Some(c) = t.conns.remove(&ino) {
                t.unlink_peer(&c.peer, ino);
            }
            // The answer, then the slot is free at once: the socket lingers on a
            // descriptor of the keeper's (bounded), which drains what the client still
            // sends so the answer is not lost to a reset, while tiny_http's thread and
            // descriptors go now.
            if l.tls {
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            } else {
                linger_dup(t, fd);
            }
        }
        Pass::Cut
    }

    /// Keeps the socket open on a descriptor of our own until LINGER has passed (at most
    /// MAX_LINGERING at a time; beyond that it closes with its last user).
    fn linger_dup(t: &mut Table, fd: i32) {
        if t.lingering.len() >= MAX_LINGERING {
            return;
        }
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup >= 0 {
            linger_own(t, dup);
        }
    }

    /// Takes a descriptor of ours to close once LINGER has passed (at once when
    /// MAX_LINGERING are already waiting).
    fn linger_own(t: &mut Table, own: i32) {
        if t.lingering.len() >= MAX_LINGERING {
            unsafe { libc::close(own) };
            return;
        }
        let at = Instant::now() + LINGER;
        t.lingering.push((own, at));
        wake_keeper_by(t, at);
    }

    /// The cut found while this peer's handler was reading its body: the handler answers
    /// it (its status and message), and the connection closes when the handler leaves.
    pub fn take_cut(conn: Option<u64>) -> Option<Refusal> {
        let ino = conn?;
        let cut = with_table(|t| {
            let c = t.conns.get_mut(&ino)?;
            let cut = c.pending_cut.take()?;
            c.close_after = true;
            Some(cut)
        })??;
        Some(cut)
    }

    /// Advances a connection's framing over bytes it sent; Err when it broke a limit
    /// or a framing rule.
    fn feed(c: &mut Connection, data: &[u8], l: &Limits) -> Result<(), Refusal> {
        let mut i = 0;
        c.head_at = 0;
        while i < data.len() {
            let rest = &data[i..];
            if matches!(&c.frame, Framing::Head(buf) if buf.is_empty()) {
                c.head_at = i;
            }
            match &mut c.frame {
                Framing::Opaque => {
                    if c.active == 0 {
                        c.head_bytes += rest.len();
                        if c.head_bytes > l.max_head + TLS_HEAD_SLACK {
                            return Err(Refusal::HeadTooLarge { limit: l.max_head });
                        }
                    }
                    return Ok(());
                }
                Framing::Head(buf) => {
                    let room = (l.max_head + 1).saturating_sub(buf.len());
                    let piece = &rest[..rest.len().min(room)];
                    let from = buf.len().saturating_sub(3);
                    let old = buf.len();
                    buf.extend_from_slice(piece);
                    match blank_line(&buf[from..]) {
                        None if buf.len() > l.max_head => {
                            return Err(Refusal::HeadTooLarge { limit: l.max_head })
                        }
                        None => {
                            i += piece.len();
                            c.head_checked = check_lines(buf, c.head_checked, l)?;
                        }
                        Some(p) => {
                            let end = from + p + 4;
                            i += end - old;
                            c.head_checked = (0, 0);
                            let head = std::mem::take(buf);
                            c.frame = after_head(&head[..end], l)?;
                            c.heads += 1;
                            c.head_bytes = 0;
                            c.chunked_total = 0;
                            // Until a handler takes the request, the connection still
                            // has a deadline: the hand-over, or the body's arrival.
                            c.head_deadline = None;
                            let deadline = (!l.read_timeout.is_zero())
                                .then(|| Instant::now() + l.read_timeout);
                            if !matches!(c.frame, Framing::Head(_)) {
                                c.body_deadline = deadline;
                            } else if c.active == 0 {
                                c.head_deadline = deadline;
                            }
                        }
                    }
                }
                Framing::Body(left) => {
                    let n = (*left).min(rest.len() as u64);
                    *left -= n;
                    i += n as usize;
                    if *left == 0 {
                        body_done(c, l);
                    }
                }
                Framing::ChunkSize(line) => {
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        line.extend_from_slice(rest);
                        if line.len() > MAX_CHUNK_LINE {
                            return Err(Refusal::BadChunk("a chunk size line over 1024 bytes"));
                        }
                        return Ok(());
                    };
                    line.extend_from_slice(&rest[..nl]);
                    i += nl + 1;
                    if line.len() > MAX_CHUNK_LINE + 1 {
                        return Err(Refusal::BadChunk("a chunk size line over 1024 bytes"));
                    }
                    let size = chunk_size(line, l)?;
                    c.chunked_total = c.chunked_total.saturating_add(size);
                    if c.chunked_total > l.max_body as u64 {
                        return Err(Refusal::BodyTooLarge {
                            declared: Some(c.chunked_total),
                            limit: l.max_body,
                        });
                    }
                    c.frame = if size == 0 {
                        Framing::Trailer(Vec::new())
                    } else {
                        Framing::ChunkData(size)
                    };
                }
                Framing::ChunkData(left) => {
                    let n = (*left).min(rest.len() as u64);
                    *left -= n;
                    i += n as usize;
                    if *left == 0 {
                        c.frame = Framing::ChunkEnd(0);
                    }
                }
                Framing::ChunkEnd(seen) => {
                    // Exactly CRLF after a chunk's data.
                    match (*seen, rest[0]) {
                        (0, b'\r') => *seen = 1,
                        (1, b'\n') => c.frame = Framing::ChunkSize(Vec::new()),
                        _ => return Err(Refusal::BadChunk("chunk data not followed by CRLF")),
                    }
                    i += 1;
                }
                Framing::Trailer(buf) => {
                    // Only an empty trailer section (CRLF): tiny_http's decoder reads no
                    // trailer fields, so it would take any for the next request while we
                    // took them for this body's end (RFC 9112 §7.1.2 lets us refuse them).
                    match (buf.len(), rest[0]) {
                        (0, b'\r') => buf.push(b'\r'),
                        (1, b'\n') => {
                            buf.clear();
                            body_done(c, l);
                        }
                        (0, _) => {
                            return Err(Refusal::BadChunk(
                                "trailer fields after the last chunk are not accepted",
                            ))
                        }
                        _ => return Err(Refusal::BadChunk("the last chunk not followed by CRLF")),
                    }
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// A chunk-size line without its LF (RFC 9112 §7.1): hex digits, optional
    /// extensions after `;` (whitespace allowed before it), then CR.
    fn chunk_size(line: &[u8], l: &Limits) -> Result<u64, Refusal> {
        let Some(line) = line.strip_suffix(b"\r") else {
            return Err(Refusal::BadChunk("a chunk size line not ended by CRLF"));
        };
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let ext = &line[digits..];
        let ext_ok = ext.is_empty()
            || ext.trim_ascii_start().first() == Some(&b';')
                && ext.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
        if digits == 0 || !ext_ok {
            return Err(Refusal::BadChunk("a chunk size that is not hex digits"));
        }
        if digits > MAX_CHUNK_DIGITS {
            return Err(Refusal::BodyTooLarge {
                declared: None,
                limit: l.max_body,
            });
        }
        let hex = std::str::from_utf8(&line[..digits]).unwrap_or("");
        u64::from_str_radix(hex, 16).map_err(|_| Refusal::BodyTooLarge {
            declared: None,
            limit: l.max_body,
        })
    }

    fn body_done(c: &mut Connection, l: &Limits) {
        c.frame = Framing::Head(Vec::new());
        c.body_deadline = None;
        if c.active == 0 && !l.read_timeout.is_zero() {
            // Read before any handler took the request: the hand-over has a deadline.
            c.head_deadline = Some(Instant::now() + l.read_timeout);
        }
    }

    /// Where the first CRLF CRLF starts. Every read passes through here: it looks at each
    /// byte once and compares only at line feeds.
    fn blank_line(hay: &[u8]) -> Option<usize> {
        (3..hay.len())
            .find(|&i| hay[i] == b'\n' && hay[i - 3..i] == *b"\r\n\r")
            .map(|i| i - 3)
    }

    /// Checks a whole request head and says what follows it, as tiny_http will read it:
    /// chunked when Transfer-Encoding says so, else Content-Length, else nothing.
    /// `Connection: upgrade` changes nothing: we never upgrade, so the next bytes are
    /// the next request, framed and checked like any (tiny_http reads only the first
    /// Connection header, so trusting any would let a second one hide requests from
    /// us). Anything that could be framed two ways is refused here, before tiny_http
    /// reads it (RFC 9112 §6.1, §6.3).
    fn after_head(head: &[u8], l: &Limits) -> Result<Framing, Refusal> {
        // tiny_http would drop a non-ASCII head without a word, and a control byte in a
        // value could reach a child's environment (--pass-header). One pass: a CR must
        // be followed by LF, and an LF preceded by CR.
        let mut prev = 0u8;
        for &b in head {
            let control = b >= 0x7f || (b < 0x20 && !matches!(b, b'\r' | b'\n' | b'\t'));
            if control || (prev == b'\r') != (b == b'\n') {
                return Err(Refusal::BadHeadBytes);
            }
            prev = b;
        }
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
        let version = request_line(lines.next().unwrap_or_default())?;
        let mut n = 0;
        let mut hosts = 0;
        let mut length: Option<u64> = None;
        let mut codings: Vec<&[u8]> = Vec::new();
        for line in lines.filter(|line| !line.is_empty()) {
            n += 1;
            if n > l.max_headers {
                return Err(Refusal::TooManyHeaders {
                    limit: l.max_headers,
                });
            }
            header_line(line)?;
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                codings.extend(
                    value
                        .split(|&b| b == b',')
                        .map(|c| c.trim_ascii())
                        .filter(|c| !c.is_empty()),
                );
            } else if name.eq_ignore_ascii_case(b"content-length") {
                // Plain digits only: RFC 9112 §6.3 lets a recipient take a list of equal
                // values as one, but tiny_http would read `7, 7` as no length at all and
                // serve the body as the next request. A sign, a space or two different
                // values are refused too.
                {
                    let v = value;
                    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                        return Err(Refusal::AmbiguousFraming(
                            "Content-Length is not a plain number",
                        ));
                    }
                    let n = std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(u64::MAX);
                    if length.is_some_and(|m| m != n) {
                        return Err(Refusal::AmbiguousFraming(
                            "two different Content-Length values",
                        ));
                    }
                    length = Some(n);
                }
            } else if name.eq_ignore_ascii_case(b"host") {
                hosts += 1;
            }
        }
        if hosts > 1 || (hosts == 0 && version == HttpVersion::Http11) {
            return Err(Refusal::HostCount);
        }
        if !codings.is_empty() {
            if length.is_some() {
                return Err(Refusal::AmbiguousFraming(
                    "Transfer-Encoding together with Content-Length",
                ));
            }
            if version == HttpVersion::Http10 {
                return Err(Refusal::AmbiguousFraming(
                    "Transfer-Encoding in an HTTP/1.0 request",
                ));
            }
            if !codings
                .last()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
            {
                return Err(Refusal::AmbiguousFraming(
                    "chunked is not the final transfer coding",
                ));
            }
            if !codings.iter().all(|c| c.eq_ignore_ascii_case(b"chunked")) {
                return Err(Refusal::UnknownCoding);
            }
            if codings.len() > 1 {
                return Err(Refusal::AmbiguousFraming("chunked applied more than once"));
            }
        }
        if !codings.is_empty() {
            return Ok(Framing::ChunkSize(Vec::new()));
        }
        match length {
            Some(n) if n > l.max_body as u64 => Err(Refusal::BodyTooLarge {
                declared: Some(n),
                limit: l.max_body,
            }),
            Some(n) if n > 0 => Ok(Framing::Body(n)),
            _ => Ok(Framing::Head(Vec::new())),
        }
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum HttpVersion {
        Http10,
        Http11,
    }

    /// `METHOD SP request-target SP HTTP-version` (RFC 9112 §3): a token, an origin-,
    /// absolute- or asterisk-form target, and HTTP/1.0 or 1.1. Any other `HTTP/d.d`
    /// (2.0, 3.0, the HTTP/2 preface) is 505; anything else 400.
    /// The complete lines of a head still arriving, checked as they come: tiny_http acts
    /// on each line as soon as it ends (a bad one got tiny_http's bare 400, in whatever
    /// version the client named), so each must pass here before tiny_http sees it.
    /// `(from, lines)`: the bytes and lines already checked; returns the new pair.
    fn check_lines(
        buf: &[u8],
        (from, mut lines): (usize, usize),
        l: &Limits,
    ) -> Result<(usize, usize), Refusal> {
        let mut at = from;
        while let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') {
            check_line(&buf[at..at + nl + 1], lines)?;
            if lines > l.max_headers {
                return Err(Refusal::TooManyHeaders {
                    limit: l.max_headers,
                });
            }
            at += nl + 1;
            lines += 1;
        }
        Ok((at, lines))
    }

    /// One head line with its line end; `index` 0 is the request line.
    fn check_line(line: &[u8], index: usize) -> Result<(), Refusal> {
        let Some(text) = line.strip_suffix(b"\r\n") else {
            return Err(Refusal::BadHeadBytes);
        };
        if text.iter().any(|&b| b >= 0x7f || (b < 0x20 && b != b'\t')) {
            return Err(Refusal::BadHeadBytes);
        }
        if index == 0 {
            return request_line(text).map(|_| ());
        }
        header_line(text)
    }

    /// RFC 9112 §5: `name: value`; a line folded onto the one before (§5.2, obsolete) or
    /// one without a colon is refused.
    fn header_line(text: &[u8]) -> Result<(), Refusal> {
        if matches!(text.first(), Some(b' ' | b'\t')) {
            return Err(Refusal::BadHeaderLine("a folded header line (obs-fold)"));
        }
        match text.iter().position(|&b| b == b':') {
            Some(colon) if colon > 0 && !text[colon - 1].is_ascii_whitespace() => Ok(()),
            Some(_) => Err(Refusal::BadHeaderLine(
                "a header name that is empty or ends in a space",
            )),
            None => Err(Refusal::BadHeaderLine("a header line without a colon")),
        }
    }

    fn request_line(line: &[u8]) -> Result<HttpVersion, Refusal> {
        let mut parts = line.split(|&b| b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::BadRequestLine);
        };
        let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        let lower = target.to_ascii_lowercase();
        let target_ok = target.first() == Some(&b'/')
            || target == b"*"
            || lower.starts_with(b"http://")
            || lower.starts_with(b"https://");
        if method.is_empty() || !method.iter().all(token) || !target_ok {
            return Err(Refusal::BadRequestLine);
        }
        match version {
            b"HTTP/1.1" => Ok(HttpVersion::Http11),
            b"HTTP/1.0" => Ok(HttpVersion::Http10),
            [b'H', b'T', b'T', b'P', b'/', major, rest @ ..]
                if major.is_ascii_digit()
                    && (rest.is_empty()
                        || matches!(rest, [b'.', minor] if minor.is_ascii_digit())) =>
            {
                Err(Refusal::HttpVersion)
            }
            _ => Err(Refusal::BadRequestLine),
        }
    }

    // ---- requests being handled ------------------------------------------------------

    /// Held by the HTTP handler for as long as a request is being answered: no read
    /// deadline applies to a connection meanwhile (an SSE stream may last hours).
    /// Names the connection by its socket's inode (a peer address can be reused by the
    /// next connection before this one's handler leaves) and keeps its head count when
    /// the request began (its own head is the last one read then).
    pub struct Visit(Option<u64>, u64);

    impl Visit {
        pub fn begin(peer: Option<&SocketAddr>) -> Visit {
            let mut heads = 0;
            let ino = peer.and_then(|p| {
                with_table(|t| {
                    let ino = t.request_conn(p)?;
                    let c = t.conns.get_mut(&ino)?;
                    c.claimed += 1;
                    c.active += 1;
                    c.head_deadline = None;
                    heads = c.heads;
                    VISITING.with(|v| v.set(ino));
                    if matches!(c.frame, Framing::Opaque) {
                        c.head_bytes = 0;
                    }
                    Some(ino)
                })
                .flatten()
            });
            Visit(ino, heads)
        }

        /// The connection this request came on (its socket's inode), for `shut`,
        /// `take_cut` and `body_timed_out`.
        pub fn conn(&self) -> Option<u64> {
            self.0
        }
    }

    impl Table {
        fn unlink_peer(&mut self, peer: &SocketAddr, ino: u64) {
            if let Some(list) = self.by_peer.get_mut(peer) {
                list.retain(|i| *i != ino);
                if list.is_empty() {
                    self.by_peer.remove(peer);
                }
            }
        }

        /// The connection a request from `peer` was read on: the oldest with a head
        /// no handler has taken yet (a reset connection's late request is its own, not
        /// the new connection's from the same port); over TLS, where heads are not
        /// counted, the newest.
        fn request_conn(&self, peer: &SocketAddr) -> Option<u64> {
            let list = self.by_peer.get(peer)?;
            list.iter()
                .copied()
                .find(|ino| self.conns.get(ino).is_some_and(|c| c.claimed < c.heads))
                .or_else(|| list.last().copied())
        }
    }

    /// Shuts this peer's connection for reading (`libc::SHUT_RD`) or both ways.
    pub fn shut(conn: Option<u64>, how: i32) {
        let Some(ino) = conn else { return };
        with_table(|t| {
            if let Some(held) = t.conns.get(&ino).and_then(|c| c.hold(ino)) {
                unsafe { libc::shutdown(held.0, how) };
            }
        });
    }

    /// The client has closed this connection (or reset it): a 2026-07-28 call waiting
    /// on it is cancelled (M-8). Bytes of a next request do not count: only the hang-up.
    pub fn hung_up(conn: Option<u64>) -> bool {
        let Some(ino) = conn else { return false };
        with_table(|t| {
            let held = t.conns.get(&ino).and_then(|c| c.hold(ino))?;
            Some(peer_left(held.0))
        })
        .flatten()
        .unwrap_or(true)
    }

    // ---- standing streams: a client that left ---------------------------------------

    /// A standing stream's socket is looked at this often, all of them by one thread: a
    /// client that left is noticed within it, without a write having to fail first.
    const WATCH_EVERY: Duration = Duration::from_millis(250);
    /// TCP states (linux/tcp_states.h) in which the peer has closed or reset: FIN
    /// received (CLOSE_WAIT, LAST_ACK), or the connection is gone (CLOSE). A standing
    /// stream's reading side is shut by us (`http::open_sse`), so poll reports a hang-up
    /// at once whatever the peer did: the state is what tells.
    const PEER_LEFT: [u8; 3] = [7, 8, 9];

    struct Watched {
        /// Our own dup of the socket, for the life of the watch.
        fd: i32,
        gone: Option<Box<dyn FnOnce() + Send>>,
    }

    static WATCHED: Mutex<Option<HashMap<u64, Watched>>> = Mutex::new(None);
    static WATCHER: std::sync::Once = std::sync::Once::new();

    /// Held while a standing stream is written; dropping it ends the watch.
    pub struct Watch(Option<u64>);

    impl Drop for Watch {
        fn drop(&mut self) {
            let Some(id) = self.0 else { return };
            let w = WATCHED.locked().as_mut().and_then(|m| m.remove(&id));
            if let Some(w) = w {
                unsafe { libc::close(w.fd) };
            }
        }
    }

    /// Calls `gone` (once, on the watcher thread) when the client of this connection
    /// closes or resets it.
    pub fn watch(conn: Option<u64>, gone: impl FnOnce() + Send + 'static) -> Watch {
        let Some(ino) = conn else { return Watch(None) };
        let Some(held) = with_table(|t| t.conns.get(&ino).and_then(|c| c.hold(ino))).flatten()
        else {
            return Watch(None);
        };
        let fd = held.0;
        std::mem::forget(held);
        let id = crate::next_id();
        WATCHED.locked().get_or_insert_with(HashMap::new).insert(
            id,
            Watched {
                fd,
                gone: Some(Box::new(gone)),
            },
        );
        WATCHER.call_once(|| {
            crate::spawn_thread("stream-watcher", watcher);
        });
        Watch(Some(id))
    }

    fn watcher() {
        loop {
            std::thread::sleep(WATCH_EVERY);
            let mut fired = Vec::new();
            if let Some(m) = WATCHED.locked().as_mut() {
                for w in m.values_mut() {
                    if w.gone.is_some() && peer_left(w.fd) {
                        fired.extend(w.gone.take());
                    }
                }
            }
            for gone in fired {
                gone();
            }
        }
    }

    fn peer_left(fd: i32) -> bool {
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        r == 0 && PEER_LEFT.contains(&info.tcpi_state)
    }

    /// The body of this peer's request did not arrive within --read-timeout.
    pub fn body_timed_out(conn: Option<u64>) -> bool {
        let Some(ino) = conn else { return false };
        with_table(|t| t.conns.get(&ino).is_some_and(|c| c.body_timed_out)).unwrap_or(false)
    }

    impl Drop for Visit {
        fn drop(&mut self) {
            let Some(ino) = self.0 else { return };
            let own_head = self.1;
            let l = limits();
            with_table(|t| {
                let Some(c) = t.conns.get_mut(&ino) else {
                    return;
                };
                c.active = c.active.saturating_sub(1);
                c.ended += 1;
                VISITING.with(|v| v.set(0));
                IDLE.notify_all();
                if c.active == 0 {
                    // A cut in this request's body that its handler did not take: it
                    // answered without reading the body, so one answer has gone; nothing
                    // more is read.
                    if c.pending_cut.take().is_some() {
                        c.close_after = true;
                    }
                    if std::mem::take(&mut c.close_after) {
                        if let Some(held) = c.hold(ino) {
                            unsafe { libc::shutdown(held.0, libc::SHUT_RDWR) };
                        }
                        // Our descriptor lingers so the answer is read before the close.
                        if let Some(own) = c.cut_fd.take() {
                            linger_own(t, own);
                        }
                        return;
                    }
                }
                // A body under way belongs to this request only if no later head has been
                // read: a keep-alive client may already be sending the next one.
                if c.active == 0
                    && c.heads == own_head
                    && !matches!(c.frame, Framing::Head(_) | Framing::Opaque)
                {
                    // Answered without reading its whole (chunked) body: tiny_http would
                    // take the rest for the next request head. End the reading side.
                    crate::log!(
                        Debug,
                        "unread_body",
                        "{}: body left unread; closing after the response",
                        c.peer
                    );
                    if let Some(held) = c.hold(ino) {
                        unsafe { libc::shutdown(held.0, libc::SHUT_RD) };
                    }
                }
                if c.active == 0 && !l.read_timeout.is_zero() {
                    let d = Instant::now() + l.read_timeout;
                    c.head_deadline = Some(d);
                    wake_keeper_by(t, d);
                }
            });
        }
    }

    // ---- the keeper: deadlines and lingering closes ------------------------------------

    fn wake_keeper_by(t: &mut Table, at: Instant) {
        if t.keeper_at.map_or(true, |k| at < k) {
            t.keeper_at = Some(at);
            KEEPER_WAKE.notify_one();
        }
    }

    fn keeper() {
        let mut last_sweep = Instant::now();
        let mut guard = TABLE.locked();
        loop {
            let now = Instant::now();
            let Some(t) = guard.as_mut() else { return };
            if now.duration_since(last_sweep) >= SWEEP_EVERY {
                sweep(t);
                last_sweep = now;
            }
            let mut next = now + SWEEP_EVERY;
            let mut expired = Vec::new();
            for (ino, c) in t.conns.iter_mut() {
                if c.active > 0 {
                    // A handler has it: no head is due (an SSE stream may last hours).
                    c.head_deadline = None;
                }
                if c.head_deadline.is_some_and(|d| d <= now) {
                    c.head_deadline = None;
                    let partial = matches!(&c.frame, Framing::Head(b) if !b.is_empty());
                    expired.push((*ino, c.fd, c.peer, false, partial));
                } else if c.body_deadline.is_some_and(|d| d <= now) {
                    c.body_deadline = None;
                    c.body_timed_out = true;
                    // tiny_http reads bodies up to 1 KiB itself, before any handler:
                    // with none running, we answer.
                    expired.push((*ino, c.fd, c.peer, c.active > 0, c.active == 0));
                }
                for d in [c.head_deadline, c.body_deadline].into_iter().flatten() {
                    next = next.min(d);
                }
            }
            t.lingering.retain(|&(fd, at)| {
                if at <= now {
                    let mut scratch = [0u8; 4096];
                    for _ in 0..64 {
                        if raw_recv(fd, &mut scratch, libc::MSG_DONTWAIT) <= 0 {
                            break;
                        }
                    }
                    unsafe { libc::close(fd) };
                    false
                } else {
                    next = next.min(at);
                    true
                }
            });
            t.keeper_at = Some(next);
            let tls = limits().tls;
            for (ino, fd, peer, body, partial) in expired {
                // Through a dup we checked: the number may already be another socket's.
                let Some(held) = hold(fd, ino) else {
                    continue;
                };
                let fd = held.0;
                if body {
                    count(&Refusal::BodyTimeout);
                } else if partial {
                    count(&Refusal::HeadTimeout);
                }
                if body {
                    // The handler is reading it: end only the reading side, so it can
                    // still answer 408.
                    crate::log!(
                        Info,
                        "read_timeout",
                        "{peer}: request body not received within --read-timeout; closing"
                    );
                    unsafe { libc::shutdown(fd, libc::SHUT_RD) };
                } else {
                    if partial {
                        crate::log!(
                            Info,
                            "read_timeout",
                            "{peer}: request not received within --read-timeout; closing"
                        );
                        if !tls {
                            write_refusal(fd, &Refusal::HeadTimeout);
                        }
                    } else {
                        crate::log!(
                            Debug,
                            "idle_close",
                            "{peer}: idle connection closed after --read-timeout"
                        );
                    }
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
            let wait = next.saturating_duration_since(Instant::now());
            guard = KEEPER_WAKE
                .wait_timeout(guard, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    #[cfg(test)]
    mod head_tests {
        use super::*;

        fn check(head: &[u8]) -> Result<Framing, Refusal> {
            let l = Limits {
                max_connections: 1,
                read_timeout: Duration::ZERO,
                max_head: 8192,
                max_headers: 3,
                max_body: 100,
                tls: false,
            };
            after_head(head, &l)
        }

        #[test]
        fn heads_are_checked_in_one_pass() {
            let bad: [&[u8]; 6] = [
                b"GET / HTTP/1.1\nHost: a\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: a\x7f\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: \xc3\xa9\r\n\r\n",
                b"\nGET / HTTP/1.1\r\n\r\n",
            ];
            for head in bad {
                assert!(
                    matches!(check(head), Err(Refusal::BadHeadBytes)),
                    "{head:?}"
                );
            }
            let ok = |head: &[u8]| check(head).unwrap_or_else(|e| panic!("{head:?}: {e:?}"));
            assert!(matches!(
                ok(b"GET / HTTP/1.1\r\nHost: a\r\nX:\ta\r\n\r\n"),
                Framing::Head(_)
            ));
            assert!(matches!(
                ok(b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH:  7 \r\nContent-Length: 7\r\n\r\n"),
                Framing::Body(7)
            ));
            assert!(matches!(
                ok(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"),
                Framing::ChunkSize(_)
            ));
            assert!(matches!(
                ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, UPGRADE\r\n\r\n"),
                Framing::Head(_)
            ));
            assert!(matches!(
                ok(b"GET http://a/ HTTP/1.0\r\n\r\n"),
                Framing::Head(_)
            ));
            // RFC 9112: the framing a smuggler relies on, each refused.
            let refused: [(&[u8], Refusal); 10] = [
                (
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n",
                    Refusal::BodyTooLarge {
                        declared: Some(101),
                        limit: 100,
                    },
                ),
                (
                    b"GET / HTTP/1.1\r\nHost: a\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
                    Refusal::TooManyHeaders { limit: 3 },
                ),
                (
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nContent-Length: 9\r\n\r\n",
                    Refusal::AmbiguousFraming("two different Content-Length values"),
                ),
                (
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +7\r\n\r\n",
                    Refusal::AmbiguousFraming("Content-Length is not a plain number"),
                ),
                (
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7, 7\r\n\r\n",
                    Refusal::AmbiguousFraming("Content-Length is not a plain number"),
                ),
                (
                    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
                    Refusal::AmbiguousFraming("chunked is not the final transfer coding"),
                ),
                (
                    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                    Refusal::UnknownCoding,
                ),
                (b"GET / HTTP/1.1\r\n\r\n", Refusal::HostCount),
                (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", Refusal::HttpVersion),
                (b"GET /\r\nHost: a\r\n\r\n", Refusal::BadRequestLine),
            ];
            for (head, cut) in refused {
                assert_eq!(
                    check(head).err(),
                    Some(cut),
                    "{}",
                    String::from_utf8_lossy(head)
                );
            }
            assert!(matches!(
                check(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"),
                Err(Refusal::AmbiguousFraming(_))
            ));
            assert_eq!(blank_line(b"a\r\nb\r\n\r\nc"), Some(4));
            assert_eq!(blank_line(b"\r\n\r"), None);
        }
    }
}

// ======================================================================================
/// HTTP front door: owns the listener, the worker threads, Host/Origin checks, body
/// reading and routing to a transport. Writes simple (non-streaming) responses itself.
/// Owns: the worker pool, routing, `Incoming` and `Reply`, Host/Origin/CORS checks,
/// body reading and --parse-budget, /healthz, /readyz, /metrics. Touches: `door` (its
/// per-request view), `auth`, the transports it routes to, `observe`.
/// Rules: O-1, O-2, O-5, P-1, P-2, P-11, RB-3.
mod http {
    use super::*;
    use crate::app;
    use crate::config::Mode;
    pub use crate::refusal::{Refusal, Wanted};
    use std::io::{Read, Write};
    use tiny_http::Method;

    /// Workers waiting for a request at most: a worker that takes one starts another
    /// while fewer wait, so a long stream never stalls the next request.
    const SPARE_WORKERS: usize = 4;
    /// Idle workers kept for ever; more than this leave after IDLE_WORKER_LINGER.
    const MIN_IDLE_WORKERS: usize = 2;
    const IDLE_WORKER_LINGER: Duration = Duration::from_secs(3);

    /// A request and what we parsed off it once.
    pub struct Incoming {
        pub rq: tiny_http::Request,
        /// The connection it came on, as the door knows it (`door::Visit::conn`).
        pub conn: Option<u64>,
        pub path: String,
        pub query: String,
        /// The valid bearer token it carried (None when auth is off): sessions are bound
        /// to it.
        pub token: Option<Arc<str>>,
        /// Its Origin, when CORS allows it: echoed on every response.
        pub cors: Option<String>,
        /// The authority of an absolute-form target (`GET http://host:port/path`): it
        /// stands for the Host header (RFC 9112 §3.2.2).
        pub target_host: Option<String>,
        /// The server its path names (set for the MCP endpoints), and by which door.
        pub server: Option<Arc<crate::servers::Server>>,
        pub door: crate::servers::Door,
    }

    impl Incoming {
        /// The server an MCP endpoint's request is for: the router sets it before any
        /// transport sees the request.
        pub fn server(&self) -> &Arc<crate::servers::Server> {
            self.server
                .as_ref()
                .expect("an MCP endpoint's request is routed to a server")
        }
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
            let too_large = |declared: Option<usize>| {
                Reply::from(Refusal::BodyTooLarge {
                    declared: declared.map(|n| n as u64),
                    limit,
                })
            };
            if let Some(n) = self.rq.body_length().filter(|n| *n > limit) {
                return Err(too_large(Some(n)));
            }
            let mut body = Vec::with_capacity(self.rq.body_length().unwrap_or(0).min(limit));
            let read = self
                .rq
                .as_reader()
                .take(limit as u64 + 1)
                .read_to_end(&mut body);
            if let (Err(_), Some(cut)) = (&read, crate::door::take_cut(self.conn)) {
                // The door found the body malformed or too large as it arrived.
                return Err(Reply::from(cut).with_header("Connection", "close"));
            }
            if crate::door::body_timed_out(self.conn) {
                return Err(Refusal::BodyTimeout.into());
            }
            match read {
                Err(e) => Err(Refusal::UnreadableBody(e.to_string()).into()),
                Ok(_) if body.len() > limit => Err(too_large(None)),
                Ok(_) => {
                    crate::observe::bytes_in(body.len());
                    Ok(body)
                }
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

    impl From<Refusal> for Reply {
        /// A refusal's answer: its status, JSON-RPC error without id (P-4), headers.
        fn from(r: Refusal) -> Reply {
            Reply::answering(&serde_json::Value::Null, r)
        }
    }

    impl Reply {
        /// A refusal's answer: its status, headers and JSON-RPC error, which carries the
        /// id of the request it answers, or none (rule P-4: HTTP-level errors carry no
        /// request id). Every error we make ourselves is a `Refusal`.
        pub fn answering(id: &serde_json::Value, r: Refusal) -> Reply {
            let body = crate::message::error_response(id, r.code(), &r.message(), r.data());
            Reply {
                status: r.status(),
                headers: r.headers(),
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
        crate::observe::response_status(reply.status);
        if reply.status >= 400 {
            let why = reply.message().unwrap_or_default();
            if !crate::observe::response_error(&why) {
                crate::log!(
                    Info,
                    "http_error",
                    "{} -> {} {}",
                    inc.summary(),
                    reply.status,
                    why
                );
            }
        }
        let mut head = crate::sse::status_line(reply.status);
        if !reply.content_type.is_empty() {
            head.push_str(&format!("Content-Type: {}\r\n", reply.content_type));
        }
        for (k, v) in reply.headers.iter().chain(&cors_headers(&inc)) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
        let mut out = inc.rq.into_writer();
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&reply.body);
        crate::observe::bytes_out(bytes.len());
        let _ = out.write_all(&bytes).and_then(|_| out.flush());
    }

    /// How long an SSE response is expected to live.
    #[derive(Clone, Copy, PartialEq)]
    pub enum Lifetime {
        /// Answers one POST: the connection serves the next request after it.
        Request,
        /// A GET stream that lasts as long as its session or client.
        Standing,
    }

    /// Opens an SSE response with our headers and the CORS ones. A standing stream's head
    /// is sent at once; an answer's head waits in the stream's buffer for its first
    /// flush, so it leaves with the first events (the answer itself, see --head-hold).
    ///
    /// A standing stream gives its connection's reading thread back: tiny_http would
    /// otherwise keep a thread (and a dup of the socket) blocked reading a next request
    /// that never comes while the stream is open, two threads and two descriptors per
    /// idle stream. Shutting the socket's reading side ends that thread at once; the
    /// stream says `Connection: close`, so the client opens a new connection after it.
    /// (Over TLS tiny_http's reader waits on a channel instead, so it stays.)
    pub fn open_sse(
        inc: Incoming,
        mut extra: Vec<(&'static str, String)>,
        lifetime: Lifetime,
    ) -> std::io::Result<crate::sse::SseStream> {
        extra.extend(cors_headers(&inc));
        let chunked = inc.chunked();
        let release_reader = lifetime == Lifetime::Standing && chunked && !inc.rq.secure();
        if release_reader {
            extra.push(("Connection", "close".into()));
        }
        let conn = inc.conn;
        let mut stream = crate::sse::SseStream::open(inc.rq.into_writer(), chunked, &extra);
        if lifetime == Lifetime::Standing {
            stream.flush()?;
        }
        if release_reader {
            crate::door::shut(conn, libc::SHUT_RD);
        }
        Ok(stream)
    }

    /// A 200 SSE response carrying a session's stream until it ends: opened, then
    /// pumped (a connection that cannot take the head leaves the stream to a resume).
    pub fn stream(
        inc: Incoming,
        headers: Vec<(&'static str, String)>,
        lifetime: Lifetime,
        attached: crate::sessions::Attached,
        session: &Arc<crate::sessions::Session>,
    ) {
        crate::observe::response_status(200);
        let _watch =
            (lifetime == Lifetime::Standing).then(|| watch_client(&inc, session, &attached));
        match open_sse(inc, headers, lifetime) {
            Ok(stream) => crate::sse::pump(stream, attached, session),
            Err(_) => session.detach(
                attached.stream,
                attached.conn_id,
                crate::sessions::Delivery::Partial,
            ),
        }
    }

    /// A standing stream's client that leaves is noticed within a second, without a
    /// write failing first (`door::watch`): its connection leaves the stream.
    pub fn watch_client(
        inc: &Incoming,
        session: &Arc<crate::sessions::Session>,
        attached: &crate::sessions::Attached,
    ) -> crate::door::Watch {
        let (session, stream, conn) = (session.clone(), attached.stream, attached.conn_id);
        crate::door::watch(inc.conn, move || session.client_left(stream, conn))
    }

    /// CORS on an actual (not preflight) response: who may read it and which of our
    /// headers a page may see.
    fn cors_headers(inc: &Incoming) -> Vec<(&'static str, String)> {
        match &inc.cors {
            None => Vec::new(),
            Some(origin) => vec![
                ("Access-Control-Allow-Origin", origin.clone()),
                (
                    "Access-Control-Expose-Headers",
                    "Mcp-Session-Id, MCP-Protocol-Version, WWW-Authenticate".into(),
                ),
                ("Vary", "Origin".into()),
            ],
        }
    }

    /// The origin to echo, when --cors-origin lists it (or is `*`).
    fn cors_origin(inc: &Incoming) -> Option<String> {
        let listed = &app().cfg.cors_origins;
        let origin = inc.header("Origin")?;
        let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        listed
            .iter()
            .any(|a| a == "*" || *a == o)
            .then(|| origin.trim().to_string())
    }

    /// A CORS preflight: 204 with what a page may send, or 403 for an origin not listed.
    fn preflight(inc: Incoming) {
        if inc.cors.is_none() {
            let origin = inc.header("Origin").unwrap_or("none").to_string();
            return respond(inc, Refusal::CorsOrigin(origin).into());
        }
        let reply = Reply::text(204, "", Vec::new())
            .with_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            .with_header(
                "Access-Control-Allow-Headers",
                "Content-Type, Authorization, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID",
            )
            .with_header("Access-Control-Max-Age", "600");
        respond(inc, reply)
    }

    /// The accept loop: an elastic pool of workers all blocking on the server's queue; a
    /// worker that takes a request makes sure another is waiting, so a long-lived SSE
    /// stream never stalls new requests. Spare idle workers exit.
    pub fn serve(server: Arc<tiny_http::Server>) {
        static IDLE: AtomicUsize = AtomicUsize::new(0);
        fn worker(server: Arc<tiny_http::Server>) {
            loop {
                let rq = match server.recv_timeout(IDLE_WORKER_LINGER) {
                    Ok(Some(rq)) => rq,
                    Ok(None) => {
                        // After a burst: give the extra threads (and their stacks) back.
                        let shed = IDLE
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                                (n > MIN_IDLE_WORKERS).then(|| n - 1)
                            })
                            .is_ok();
                        if shed {
                            return;
                        }
                        continue;
                    }
                    Err(_) => return,
                };
                if IDLE.fetch_sub(1, Ordering::AcqRel) == 1 {
                    spawn_worker(server.clone());
                }
                // A bug in one request's handling ends that request (its connection is
                // closed with it), never the worker pool or the server.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(rq)));
                if IDLE.fetch_add(1, Ordering::AcqRel) >= SPARE_WORKERS {
                    IDLE.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
            }
        }
        fn spawn_worker(server: Arc<tiny_http::Server>) {
            // Counted before it starts, so two requests never both see it idle; a
            // thread that cannot be started is no spare.
            IDLE.fetch_add(1, Ordering::AcqRel);
            if !crate::spawn_thread("http", move || worker(server)) {
                IDLE.fetch_sub(1, Ordering::AcqRel);
            }
        }
        for _ in 0..2 {
            spawn_worker(server.clone());
        }
    }

    /// Over TLS the door sees only ciphertext, so a declared body over --max-body is
    /// refused here.
    fn refuse_tls_oversized(
        rq: tiny_http::Request,
        conn: Option<u64>,
    ) -> Option<tiny_http::Request> {
        let max = app().cfg.max_body;
        let Some(declared) = rq.body_length().filter(|n| *n > max && rq.secure()) else {
            return Some(rq);
        };
        let refusal = Refusal::BodyTooLarge {
            declared: Some(declared as u64),
            limit: max,
        };
        app().metrics.rejected(refusal.reason());
        // Reading shut first: tiny_http's drain of the body (8 KiB at a time, vendor
        // patch 8) ends at once.
        crate::door::shut(conn, libc::SHUT_RD);
        Some(rq)
    }

    fn handle(rq: tiny_http::Request) {
        let visit = crate::door::Visit::begin(rq.remote_addr());
        let Some(rq) = refuse_tls_oversized(rq, visit.conn()) else {
            return;
        };
        let app = app();
        let (target_host, url) = origin_form(rq.url());
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (url, String::new()),
        };
        let _access = crate::observe::request_begins(
            rq.method().as_str(),
            &path,
            route_of(&path, &app.cfg),
            rq.remote_addr().copied(),
        );
        let mut inc = Incoming {
            rq,
            conn: visit.conn(),
            path,
            query,
            token: None,
            cors: None,
            target_host,
            server: None,
            door: crate::servers::Door::Front,
        };
        if inc.rq.secure() && inc.header("Transfer-Encoding").is_some() {
            // The door sees only ciphertext, so it cannot bound chunk framing, and
            // tiny_http's decoder does not: no chunked body is read over TLS.
            crate::door::shut(inc.conn, libc::SHUT_RD);
            let refusal = Reply::from(Refusal::LengthRequired);
            return respond(inc, refusal.with_header("Connection", "close"));
        }
        if let Err(reply) = check_host_and_origin(&inc) {
            return respond(inc, reply);
        }
        inc.cors = cors_origin(&inc);
        let cfg = &app.cfg;
        if *inc.method() == Method::Options && !cfg.cors_origins.is_empty() {
            return preflight(inc);
        }
        if app.shutting_down.load(Ordering::Acquire) {
            return respond(inc, Refusal::ShuttingDown.into());
        }
        let route = crate::servers::resolve(&inc.path);
        if inc.path == "/" && route.is_none() && crate::console::enabled(cfg) {
            // The page holds no secret: served without a token, it asks for one to send
            // on the MCP requests, which still demand it.
            return crate::console::serve(inc);
        }
        let kind = match &route {
            Some(r) if r.endpoint == crate::servers::Endpoint::Readyz => {
                crate::ratelimit::Kind::Probe
            }
            _ => crate::ratelimit::Kind::Work,
        };
        let open_route = (kind == crate::ratelimit::Kind::Probe
            || matches!(inc.path.as_str(), "/healthz" | "/readyz"))
            && !cfg.auth.health;
        if !open_route {
            match crate::auth::check(inc.header("Authorization")) {
                Ok(token) => inc.token = token,
                Err(reply) => {
                    // A wrong token is a guess: it draws on its address's bucket, so
                    // guessing goes no faster than --rate-limit.
                    if let Err(limited) = crate::ratelimit::admit(&inc, kind) {
                        return respond(inc, limited);
                    }
                    return respond(inc, reply);
                }
            }
        }
        // After the token check: the token is the bucket's key (RFC 6585 §4).
        if let Err(reply) = crate::ratelimit::admit(&inc, kind) {
            return respond(inc, reply);
        }
        let path = inc.path.as_str();
        let method = inc.method().clone();
        let allow = |allow: &'static str| Reply::from(Refusal::MethodNotAllowed { allow });
        use crate::servers::Endpoint;
        match path {
            "/healthz" => match method {
                Method::Get => respond(inc, Reply::json(200, serde_json::json!({"status": "ok"}))),
                _ => respond(inc, allow("GET")),
            },
            "/readyz" => match method {
                Method::Get => respond(inc, readyz(None)),
                _ => respond(inc, allow("GET")),
            },
            "/metrics" => match method {
                Method::Get => respond(
                    inc,
                    Reply::text(200, "text/plain; version=0.0.4", app.metrics.render()),
                ),
                _ => respond(inc, allow("GET")),
            },
            "/servers" => match method {
                Method::Get => respond(inc, Reply::json(200, crate::servers::list())),
                _ => respond(inc, allow("GET")),
            },
            _ => {
                let Some(route) = route else {
                    let refusal = Refusal::NotFound(path.to_string());
                    return respond(inc, refusal.into());
                };
                let mode = route.server.spec.mode;
                inc.door = route.door;
                inc.server = Some(route.server);
                match (route.endpoint, mode) {
                    (Endpoint::Readyz, _) => match method {
                        Method::Get => {
                            let reply = readyz(inc.server.as_deref());
                            respond(inc, reply)
                        }
                        _ => respond(inc, allow("GET")),
                    },
                    (Endpoint::Mcp, Mode::Session | Mode::Shared) => match method {
                        Method::Post => crate::streamable::post(inc),
                        Method::Get => crate::streamable::get(inc),
                        Method::Delete => crate::streamable::delete(inc),
                        _ => respond(inc, allow("GET, POST, DELETE")),
                    },
                    (Endpoint::Mcp, Mode::Oneshot) => match method {
                        Method::Post => crate::oneshot::post(inc),
                        Method::Get => crate::oneshot::get(inc),
                        _ => respond(inc, allow("GET, POST")),
                    },
                    (Endpoint::Sse, Mode::Session | Mode::Shared) => match method {
                        Method::Get => crate::legacy::open(inc),
                        _ => respond(inc, allow("GET")),
                    },
                    (Endpoint::Message, Mode::Session | Mode::Shared) => match method {
                        Method::Post => crate::legacy::post(inc),
                        _ => respond(inc, allow("POST")),
                    },
                    _ => {
                        let refusal = Refusal::NotFound(inc.path.clone());
                        respond(inc, refusal.into())
                    }
                }
            }
        }
    }

    /// /readyz (every server) and /servers/NAME/readyz (one): 200 when a child can be
    /// started and no shared child is crash-looping, else 503 with the reason.
    fn readyz(one: Option<&crate::servers::Server>) -> Reply {
        let not_ready = |reason: String| {
            Reply::json(
                503,
                serde_json::json!({"status": "not ready", "reason": reason}),
            )
        };
        if crate::teardown::DRAINING.load(Ordering::Acquire) {
            return Reply::json(
                503,
                serde_json::json!({"status": "draining", "reason": "this instance is draining: it takes no new session"}),
            );
        }
        let all = crate::servers::all();
        let one = one.or(match (all.as_slice(), &app().cfg.config_file) {
            ([sole], None) => Some(&**sole),
            _ => None,
        });
        if let Some(s) = one {
            return match s.not_ready() {
                Some(reason) => not_ready(reason),
                None => match crate::child::startable(&s.spec) {
                    Ok(path) => Reply::json(
                        200,
                        serde_json::json!({"status": "ready", "command": path.display().to_string()}),
                    ),
                    Err(reason) => not_ready(reason),
                },
            };
        }
        match crate::servers::not_ready() {
            Some(reason) => not_ready(reason),
            None => {
                let names: Vec<&str> = all.iter().map(|s| &*s.name).collect();
                Reply::json(
                    200,
                    serde_json::json!({"status": "ready", "servers": names}),
                )
            }
        }
    }

    /// A request target in origin form: an absolute-form one (`http://a:1/p?q`, as sent
    /// to proxies) is split into its authority and `/p?q` (RFC 9112 §3.2.2).
    fn origin_form(target: &str) -> (Option<String>, String) {
        let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
        let scheme = ["http://", "https://"]
            .into_iter()
            .find(|s| lower.starts_with(s));
        let Some(rest) = scheme.map(|s| &target[s.len()..]) else {
            return (None, target.to_string());
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let authority = authority.rsplit('@').next().unwrap_or("").to_string();
        let path = if tail.starts_with('/') {
            tail.to_string()
        } else {
            format!("/{tail}")
        };
        (Some(authority), path)
    }

    /// The route label for /metrics: the configured paths by name, anything else `other`.
    fn route_of(path: &str, cfg: &config::Config) -> crate::observe::Route {
        use crate::observe::Route;
        match path {
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            p if p == cfg.mcp_path => Route::Mcp,
            p if p == cfg.sse_path && cfg.mode != Mode::Oneshot => Route::Sse,
            p if p == cfg.message_path && cfg.mode != Mode::Oneshot => Route::Message,
            _ => Route::Other,
        }
    }

    /// DNS-rebinding protection (rules O-1, O-2, O-5, L-5), on every endpoint: a browser
    /// tricked into talking to us sends the attacker's name in Host and Origin.
    fn check_host_and_origin(inc: &Incoming) -> Result<(), Reply> {
        let cfg = &app().cfg;
        let host_header = inc.target_host.as_deref().or(inc.header("Host"));
        if let Some(host) = host_header {
            if !host_allowed(host, cfg) {
                return Err(Refusal::ForeignHost(host.to_string()).into());
            }
        }
        if let Some(origin) = inc.header("Origin") {
            if !origin_allowed(origin, host_header, cfg) {
                return Err(Refusal::ForeignOrigin(origin.to_string()).into());
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
        let mut listed = cfg.allowed_origins.iter().chain(&cfg.cors_origins);
        if listed.any(|a| a == "*" || *a == o) {
            return true;
        }
        let Some((_, authority)) = o.split_once("://") else {
            return false;
        };
        is_loopback_name(&host_name(authority))
            || host.is_some_and(|h| h.trim().eq_ignore_ascii_case(authority))
    }

    /// Text of large bodies being parsed now (--parse-budget).
    static PARSING: AtomicUsize = AtomicUsize::new(0);

    /// A request body as JSON: within --parse-budget when it is large (503 beyond).
    pub fn parse_body(body: &[u8]) -> Result<serde_json::Value, Reply> {
        let claim = if body.len() > crate::config::SMALL_BODY {
            body.len()
        } else {
            0
        };
        let budget = app().cfg.parse_budget;
        let before = PARSING.fetch_add(claim, Ordering::AcqRel);
        struct Claim(usize);
        impl Drop for Claim {
            fn drop(&mut self) {
                PARSING.fetch_sub(self.0, Ordering::AcqRel);
            }
        }
        let _claim = Claim(claim);
        // One body is always parsed, however large, when nothing else is.
        if claim > 0 && before > 0 && before + claim > budget {
            let refusal = Refusal::ParseBudget { limit: budget };
            app().metrics.rejected(refusal.reason());
            return Err(refusal.into());
        }
        crate::message::parse(body).map_err(|e| Reply::from(Refusal::NotJson(e.to_string())))
    }

    /// 406 unless the request's Accept allows what the answer will be (P-2, G-2).
    pub fn require_accept(inc: &Incoming, wanted: Wanted) -> Result<(), Reply> {
        let accept = inc.header("Accept");
        let ok = match wanted {
            Wanted::JsonAndEventStream => {
                accepts(accept, "application/json") && accepts(accept, "text/event-stream")
            }
            Wanted::EventStream => accepts(accept, "text/event-stream"),
        };
        if ok {
            return Ok(());
        }
        let got = accept.unwrap_or("").to_string();
        Err(Refusal::NotAcceptable { wanted, got }.into())
    }

    /// 415 unless the body is declared JSON (P-1).
    pub fn require_json(inc: &Incoming) -> Result<(), Reply> {
        if is_json_content_type(inc.header("Content-Type")) {
            return Ok(());
        }
        let got = inc.header("Content-Type").unwrap_or("none").to_string();
        Err(Refusal::UnsupportedMediaType { got }.into())
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
        require_json(inc)?;
        let body = inc.read_body(app().cfg.max_body)?;
        let value = parse_body(&body)?;
        let (messages, batch) = match value {
            serde_json::Value::Array(items) => (items, true),
            other => (vec![other], false),
        };
        if batch && messages.is_empty() {
            return Err(Refusal::EmptyBatch.into());
        }
        use crate::message::IdCarrier;
        let carrier = if app().cfg.mode == Mode::Shared {
            IdCarrier::Bridge
        } else {
            IdCarrier::Child
        };
        for m in &messages {
            match crate::message::classify(m) {
                crate::message::Kind::Invalid(why) => {
                    return Err(Refusal::NotJsonRpc(why.to_string()).into())
                }
                crate::message::Kind::Request { id, .. }
                    if !crate::message::id_allowed(id, carrier) =>
                {
                    let range = match carrier {
                        IdCarrier::Child => format!(
                            "within ±{}, which the server process gives back exactly",
                            crate::message::MAX_SAFE_ID
                        ),
                        IdCarrier::Bridge => "of at most 64 bits".to_string(),
                    };
                    let id = id.to_string();
                    return Err(Refusal::IdNotAllowed { id, range }.into());
                }
                _ => {}
            }
        }
        crate::observe::request_messages(&messages);
        Ok((messages, batch))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn cfg(args: &[&str]) -> config::Config {
            let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            all.extend(["--".to_string(), "cat".to_string()]);
            match config::parse(&all, &|_| None) {
                Ok(config::Parsed::Run(c)) => *c,
                _ => panic!("config"),
            }
        }

        #[test]
        fn absolute_form_targets_stand_for_their_host() {
            assert_eq!(origin_form("/mcp?x=1"), (None, "/mcp?x=1".into()));
            assert_eq!(
                origin_form("http://127.0.0.1:8000/healthz"),
                (Some("127.0.0.1:8000".into()), "/healthz".into())
            );
            assert_eq!(
                origin_form("HTTPS://u@a.example?q"),
                (Some("a.example".into()), "/?q".into())
            );
        }

        #[test]
        fn hosts_and_origins_are_loopback_unless_listed() {
            let c = cfg(&[]);
            for h in ["127.0.0.1:8000", "localhost", "[::1]:8000", "127.1.2.3"] {
                assert!(host_allowed(h, &c), "{h}");
            }
            assert!(!host_allowed("evil.example", &c));
            assert!(!host_allowed("evil.example:8000", &c));
            let listed = cfg(&["--allowed-host", "mcp.example"]);
            assert!(host_allowed("mcp.example:443", &listed));
            assert!(origin_allowed("http://localhost:3000", None, &c));
            assert!(!origin_allowed("https://evil.example", None, &c));
            assert!(origin_allowed(
                "https://mcp.example",
                Some("mcp.example"),
                &c
            ));
            assert!(!origin_allowed("null", None, &c));
        }

        #[test]
        fn media_types_honour_wildcards_and_parameters() {
            assert!(accepts(None, "text/event-stream"));
            assert!(accepts(Some("*/*"), "application/json"));
            assert!(accepts(Some("text/*;q=0.5"), "text/event-stream"));
            assert!(accepts(
                Some("application/json, text/event-stream"),
                "text/event-stream"
            ));
            assert!(!accepts(Some("text/html"), "application/json"));
            assert!(is_json_content_type(Some(
                "application/json; charset=utf-8"
            )));
            assert!(!is_json_content_type(Some("text/plain")));
            assert!(!is_json_content_type(None));
            assert_eq!(percent_decode("a%20b+c%2"), "a b c%2");
        }
    }
}

// ======================================================================================
/// Who may call: bearer tokens (--auth-token, --auth-token-file re-read on SIGHUP), the
/// constant-time check, and what a session inherits from the request that created it
/// (its owner token, --pass-header values). Tokens never reach a log, a metric or an
/// error message: callers learn only "valid" and which token, to bind sessions to it.
/// Owns: the token list, its reload, the session's inherited context. Touches: the
/// token file, `refusal` (401). Rules: A-1, RB-3.
mod auth {
    use crate::http::{Incoming, Refusal, Reply};
    use crate::refusal::TokenFault;
    use std::sync::{Arc, RwLock};

    static TOKENS: RwLock<Vec<Arc<str>>> = RwLock::new(Vec::new());

    /// The tokens in force (for the log and the tap, which never print them).
    pub fn tokens() -> Vec<Arc<str>> {
        TOKENS
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Loads the fixed tokens and the token file; on SIGHUP, again. A file that cannot
    /// be read keeps the tokens we have, so a bad edit never locks everyone out.
    pub fn load() -> Result<usize, String> {
        let auth = &crate::app().cfg.auth;
        let mut tokens: Vec<Arc<str>> = auth.tokens.iter().map(|t| Arc::from(t.as_str())).collect();
        if let Some(path) = &auth.token_file {
            tokens.extend(
                crate::config::read_token_file(path)?
                    .iter()
                    .map(|t| Arc::from(t.as_str())),
            );
        }
        let n = tokens.len();
        *TOKENS
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tokens;
        Ok(n)
    }

    pub fn reload() {
        if crate::app().cfg.auth.token_file.is_none() {
            crate::log!(
                Info,
                "signal",
                "SIGHUP received; no --auth-token-file to re-read"
            );
            return;
        }
        match load() {
            Ok(n) => crate::log!(
                Info,
                "auth_reload",
                "token file re-read: {n} tokens in force"
            ),
            Err(e) => crate::log!(Error, "auth_reload", "{e}; keeping the tokens in force"),
        }
    }

    /// Compares every byte of the longer input whatever differs first, so the time taken
    /// says nothing about how much of a guess was right.
    pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
        let mut diff = a.len() ^ b.len();
        for i in 0..a.len().max(b.len()) {
            let x = a.get(i).copied().unwrap_or(0);
            let y = b.get(i).copied().unwrap_or(0);
            diff |= usize::from(x ^ y);
        }
        diff == 0
    }

    /// Ok(None) when auth is off; Ok(token) for a valid bearer; else a 401 to send.
    pub fn check(header: Option<&str>) -> Result<Option<Arc<str>>, Reply> {
        if !crate::app().cfg.auth.enabled() {
            return Ok(None);
        }
        let presented = header.and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        let Some(presented) = presented else {
            return Err(unauthorized(TokenFault::Missing));
        };
        let mut found = None;
        for t in TOKENS
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            if ct_eq(t.as_bytes(), presented.as_bytes()) {
                found = Some(t.clone());
            }
        }
        match found {
            Some(t) => Ok(Some(t)),
            None => Err(unauthorized(TokenFault::Invalid)),
        }
    }

    fn unauthorized(fault: TokenFault) -> Reply {
        let refusal = Refusal::Unauthorized(fault);
        crate::app().metrics.rejected(refusal.reason());
        refusal.into()
    }

    /// What a new session takes from the request that creates it.
    #[derive(Default, Clone)]
    pub struct Context {
        pub owner: Option<Arc<str>>,
        /// --pass-header values present on the request, as (variable, value).
        pub env: Vec<(String, String)>,
        /// By which door the session came: its later requests may come by the same.
        pub door: crate::servers::Door,
        /// Who it counts against for --max-sessions-per-token (`ratelimit`).
        pub client: Option<crate::ratelimit::Client>,
    }

    pub fn context(inc: &Incoming) -> Result<Context, Reply> {
        let mut env = Vec::new();
        for (name, var) in &inc.server().spec.pass_headers {
            let Some(value) = inc.header(name) else {
                continue;
            };
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(Refusal::HeaderControl { name: name.clone() }.into());
            }
            env.push((var.clone(), value.to_string()));
        }
        Ok(Context {
            owner: inc.token.clone(),
            env,
            door: inc.door,
            client: Some(crate::ratelimit::client_of(inc)),
        })
    }

    /// A session answers only to the token that created it (S-2: a session id is not
    /// a credential); to any other it does not exist.
    pub fn owns(owner: &Option<Arc<str>>, token: &Option<Arc<str>>) -> bool {
        match (owner, token) {
            (None, _) => true,
            (Some(o), Some(t)) => ct_eq(o.as_bytes(), t.as_bytes()),
            (Some(_), None) => false,
        }
    }
}

// ======================================================================================
/// Rate limits: a token bucket per client (--rate-limit), and how many sessions a client
/// may hold (--max-sessions-per-token). A client is its bearer token when tokens are
/// configured (`auth`), else its address: the peer's, or, when the peer is a
/// --trusted-proxy, the right-most address of `X-Forwarded-For` that is not itself
/// trusted (what a trusted proxy appended; a client's own header is ignored from any
/// other peer, so it cannot choose its key). An IPv6 client counts by its /64, which one
/// host usually holds whole. Tokens and addresses are keys here and nowhere else: never a
/// metric label, never a token in a log line.
/// Counted: every request past the Host/Origin and token checks except /healthz,
/// /readyz (a server's too), /metrics, DELETE (it frees what the limit protects) and
/// OPTIONS (a browser's preflight). A refused request takes nothing from the bucket.
/// The table of buckets is bounded: a bucket that has refilled is the same as none and
/// is dropped as it is met (swept every SWEEP_EVERY); at --rate-limit-keys the fullest
/// buckets go first, so only a client that has spent least loses anything.
/// Owns: the RATE syntax, --rate-limit, --rate-limit-keys, --trusted-proxy, the client
/// key, the buckets, its counters. Touches: `refusal` (429), `observe` (log, the access
/// line's reason), `sessions` asks it for a session's client key.
/// Rules: RFC 6585 §4 (429 Too Many Requests), RFC 9110 §10.2.3 (Retry-After in whole
/// seconds), RFC 7239 §5.2 (X-Forwarded-For), RB-3, OP-6.
mod ratelimit {
    use crate::http::{Incoming, Refusal, Reply};
    use crate::Locked;
    use std::collections::HashMap;
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// --rate-limit's default BURST is RATE per second rounded up, but at least this: an
    /// MCP client's start is several requests in a row (initialize, initialized, the GET
    /// stream, tools/list, a call), and a smaller bucket would refuse the start itself.
    pub const MIN_DEFAULT_BURST: u32 = 10;
    /// The most requests a RATE or BURST names: beyond it a limit limits nothing.
    pub const MAX_RATE: u64 = 1_000_000;
    /// How often buckets that have refilled (the same as none) are dropped.
    const SWEEP_EVERY: Duration = Duration::from_secs(10);
    /// At --rate-limit-keys with no refilled bucket to drop, this share of the table
    /// (the fullest buckets) goes at once, so a flood of new keys costs one sort per
    /// eighth of the table, not one scan per key.
    const EVICT_SHARE: usize = 8;

    /// What a request is to the limit: a server's own readiness probe (never counted:
    /// probes poll, and a balancer that sees 429 takes the instance out), or work.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kind {
        Probe,
        Work,
    }

    /// Whose bucket a request draws on, and the label its refusals are counted under.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum KeyKind {
        Token,
        Address,
    }

    impl KeyKind {
        pub const ALL: [KeyKind; 2] = [KeyKind::Token, KeyKind::Address];
        pub fn label(self) -> &'static str {
            match self {
                KeyKind::Token => "token",
                KeyKind::Address => "address",
            }
        }
        /// How a refusal names the client: never the token itself.
        pub fn words(self) -> &'static str {
            match self {
                KeyKind::Token => "this bearer token",
                KeyKind::Address => "this client address",
            }
        }
    }

    /// A client: its token, or its address (an IPv6 one cut to its /64).
    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    pub enum Client {
        Token(Arc<str>),
        Address(IpAddr),
    }

    impl Client {
        pub fn kind(&self) -> KeyKind {
            match self {
                Client::Token(_) => KeyKind::Token,
                Client::Address(_) => KeyKind::Address,
            }
        }

        /// How the log names it: an address, never a token.
        fn shown(&self) -> Option<String> {
            match self {
                Client::Address(ip) => Some(ip.to_string()),
                Client::Token(_) => None,
            }
        }
    }

    /// A sustained rate and the burst above it, as --rate-limit gave them.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Rate {
        pub per_second: f64,
        pub burst: u32,
        /// `600/m,20`: how messages name it.
        pub shown: String,
    }

    /// An address, or a network `ADDR/BITS`, of --trusted-proxy.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Net {
        addr: IpAddr,
        bits: u8,
    }

    impl Net {
        fn contains(&self, ip: IpAddr) -> bool {
            match (self.addr, plain(ip)) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                    u32::from(a) & mask == u32::from(b) & mask
                }
                (IpAddr::V6(a), IpAddr::V6(b)) => {
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(self.bits))
                        .unwrap_or(0);
                    u128::from(a) & mask == u128::from(b) & mask
                }
                _ => false,
            }
        }
    }

    /// What the four flags say.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct Settings {
        /// None: no rate limit (the default).
        pub rate: Option<Rate>,
        /// --rate-limit-keys: the most buckets held at once.
        pub keys: usize,
        pub trusted: Vec<Net>,
        /// --max-sessions-per-token (0: no limit).
        pub sessions_per_client: usize,
    }

    impl Settings {
        pub fn from_flags(
            rate: &str,
            keys: usize,
            trusted: &[String],
            sessions_per_client: usize,
        ) -> Result<Settings, String> {
            let rate = match rate.trim() {
                "" | "0" | "off" => None,
                given => Some(parse_rate(given)?),
            };
            if keys == 0 {
                return Err("--rate-limit-keys must be at least 1".into());
            }
            let mut nets = Vec::new();
            for spec in trusted.iter().flat_map(|s| s.split(',')) {
                if !spec.trim().is_empty() {
                    nets.push(parse_net(spec.trim())?);
                }
            }
            Ok(Settings {
                rate,
                keys,
                trusted: nets,
                sessions_per_client,
            })
        }
    }

    /// `RATE[,BURST]`: RATE is `N/s`, `N/m` or `N/h` (N whole, 1 to MAX_RATE); BURST a
    /// whole number of requests (default: RATE per second rounded up, at least
    /// MIN_DEFAULT_BURST).
    pub fn parse_rate(given: &str) -> Result<Rate, String> {
        let wrong = |why: &str| {
            format!("--rate-limit {given:?}: {why} (RATE[,BURST]: RATE is N/s, N/m or N/h, N a whole number from 1 to {MAX_RATE}; BURST a whole number of requests, e.g. 10/s or 600/m,20)")
        };
        let (rate, burst) = match given.split_once(',') {
            Some((r, b)) => (r.trim(), Some(b.trim())),
            None => (given.trim(), None),
        };
        let Some((n, unit)) = rate.split_once('/') else {
            return Err(wrong("no unit: say /s, /m or /h"));
        };
        let whole = |s: &str, what: &str| -> Result<u64, String> {
            match s.trim().parse::<u64>() {
                Ok(n) if (1..=MAX_RATE).contains(&n) => Ok(n),
                Ok(_) => Err(wrong(&format!("{what} must be from 1 to {MAX_RATE}"))),
                Err(_) => Err(wrong(&format!("{what} {s:?} is not a whole number"))),
            }
        };
        let n = whole(n, "the count")?;
        let seconds = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(wrong(&format!("unknown unit {other:?}"))),
        };
        let per_second = n as f64 / seconds;
        let burst = match burst {
            Some(b) => whole(b, "BURST")? as u32,
            None => (per_second.ceil() as u32).max(MIN_DEFAULT_BURST),
        };
        Ok(Rate {
            per_second,
            burst,
            shown: format!("{rate},{burst}"),
        })
    }

    fn parse_net(spec: &str) -> Result<Net, String> {
        let wrong = || {
            format!("--trusted-proxy {spec:?}: not an IP address or ADDR/BITS network (e.g. 127.0.0.1, 10.0.0.0/8, ::1)")
        };
        let (addr, bits) = match spec.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (spec, None),
        };
        let addr = plain(
            addr.trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .map_err(|_| wrong())?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(wrong()),
            },
        };
        Ok(Net { addr, bits })
    }

    /// An IPv4 address carried in IPv6 (a dual-stack listener's peers) is the IPv4 one.
    fn plain(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        }
    }

    /// One host's key: an IPv6 address cut to its /64 (a host is handed a /64 and may
    /// take any address in it).
    fn host_key(ip: IpAddr) -> IpAddr {
        match plain(ip) {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
            v4 => v4,
        }
    }

    /// The client's address: the peer's, or, from a trusted peer, the right-most entry
    /// of `X-Forwarded-For` (every such header, in order) that is not trusted itself. An
    /// entry that is not an address stops the walk at the last good one: only a client
    /// writes such a thing, and the trusted proxy's own entry to its right is the truth.
    pub fn client_address(peer: IpAddr, forwarded: &[&str], trusted: &[Net]) -> IpAddr {
        let peer = plain(peer);
        if !trusted.iter().any(|n| n.contains(peer)) {
            return peer;
        }
        let mut client = peer;
        for hop in forwarded.iter().flat_map(|h| h.split(',')).rev() {
            let hop = hop.trim();
            let parsed = hop
                .parse::<IpAddr>()
                .ok()
                .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
                .or_else(|| hop.trim_matches(|c| c == '[' || c == ']').parse().ok());
            let Some(ip) = parsed.map(plain) else {
                break;
            };
            client = ip;
            if !trusted.iter().any(|n| n.contains(ip)) {
                break;
            }
        }
        client
    }

    /// The client a request comes from (its token when auth is on).
    pub fn client_of(inc: &Incoming) -> Client {
        if let Some(t) = &inc.token {
            return Client::Token(t.clone());
        }
        let peer = inc
            .rq
            .remote_addr()
            .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let trusted = &crate::app().cfg.rate.trusted;
        let forwarded: Vec<&str> = if trusted.is_empty() {
            Vec::new()
        } else {
            inc.rq
                .headers()
                .iter()
                .filter(|h| h.field.equiv("X-Forwarded-For"))
                .map(|h| h.value.as_str())
                .collect()
        };
        Client::Address(host_key(client_address(peer, &forwarded, trusted)))
    }

    struct Bucket {
        /// Requests it holds at `at`.
        tokens: f64,
        at: Instant,
        /// Requests refused since it last served one (its first refusal is logged, the
        /// rest counted, and the sum said when it is served again).
        refused: u64,
    }

    impl Bucket {
        fn level(&self, rate: &Rate, now: Instant) -> f64 {
            let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate.per_second;
            (self.tokens + refill).min(f64::from(rate.burst))
        }
    }

    struct Table {
        buckets: HashMap<Client, Bucket>,
        swept: Instant,
    }

    static TABLE: Mutex<Option<Table>> = Mutex::new(None);
    /// Refused requests and refused sessions, by KeyKind (ALL's order).
    static RATE_LIMITED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
    static SESSIONS_REFUSED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

    /// What the bucket said.
    enum Verdict {
        /// Served; `refused` requests had been refused since the last one served.
        Served { refused: u64 },
        /// Refused: a request is in the bucket again after `wait`.
        Refused { wait: Duration, first: bool },
    }

    fn take(rate: &Rate, keys: usize, client: &Client, now: Instant) -> Verdict {
        let mut guard = TABLE.locked();
        let table = guard.get_or_insert_with(|| Table {
            buckets: HashMap::new(),
            swept: now,
        });
        if now.saturating_duration_since(table.swept) >= SWEEP_EVERY {
            sweep(table, rate, now);
        }
        if !table.buckets.contains_key(client) && table.buckets.len() >= keys {
            sweep(table, rate, now);
            // Room for an eighth of the table at once: a flood of new keys then costs one
            // sort per eighth, not a sweep per key when a sweep frees only a few.
            let room = (keys / EVICT_SHARE).max(1);
            let over = (table.buckets.len() + room).saturating_sub(keys);
            if over > 0 {
                evict_fullest(table, rate, now, keys, over);
            }
        }
        let b = table.buckets.entry(client.clone()).or_insert(Bucket {
            tokens: f64::from(rate.burst),
            at: now,
            refused: 0,
        });
        b.tokens = b.level(rate, now);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            let refused = std::mem::take(&mut b.refused);
            return Verdict::Served { refused };
        }
        b.refused += 1;
        Verdict::Refused {
            wait: Duration::from_secs_f64((1.0 - b.tokens) / rate.per_second),
            first: b.refused == 1,
        }
    }

    /// Drops every bucket that has refilled: it says nothing a new one would not.
    fn sweep(table: &mut Table, rate: &Rate, now: Instant) {
        let full = f64::from(rate.burst);
        table.buckets.retain(|_, b| b.level(rate, now) < full);
        table.swept = now;
    }

    /// At --rate-limit-keys: the `n` fullest buckets go (their clients lose least).
    fn evict_fullest(table: &mut Table, rate: &Rate, now: Instant, keys: usize, n: usize) {
        let mut levels: Vec<(f64, Client)> = table
            .buckets
            .iter()
            .map(|(k, b)| (b.level(rate, now), k.clone()))
            .collect();
        levels.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, k) in levels.into_iter().take(n) {
            table.buckets.remove(&k);
        }
        crate::log!(Warn, "rate_limit_keys", "--rate-limit-keys {keys} reached: the {n} fullest buckets dropped (their clients start again with a full bucket)");
    }

    /// Whether this request may go on (--rate-limit); a refusal is logged (once until
    /// its client is served again), counted, and shown on the access line.
    pub fn admit(inc: &Incoming, request: Kind) -> Result<(), Reply> {
        let app = crate::app();
        let Some(rate) = &app.cfg.rate.rate else {
            return Ok(());
        };
        let exempt_path = matches!(inc.path.as_str(), "/healthz" | "/readyz" | "/metrics");
        let exempt_method = matches!(
            inc.method(),
            tiny_http::Method::Delete | tiny_http::Method::Options
        );
        if request == Kind::Probe || exempt_path || exempt_method {
            return Ok(());
        }
        let client = client_of(inc);
        let kind = client.kind();
        match take(rate, app.cfg.rate.keys, &client, Instant::now()) {
            Verdict::Served { refused: 0 } => Ok(()),
            Verdict::Served { refused } => {
                crate::log!(Info, "rate_limit_served", key_kind = kind.label(), client = client.shown();
                    "{} served again after {refused} request(s) refused over --rate-limit {}", kind.words(), rate.shown);
                Ok(())
            }
            Verdict::Refused { wait, first } => {
                // Whole seconds, rounded up: a client that waits this long is served.
                let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
                let refusal = Refusal::RateLimited {
                    rate: rate.shown.clone(),
                    kind,
                    retry_after: Duration::from_secs(secs),
                };
                RATE_LIMITED[kind as usize].fetch_add(1, Ordering::Relaxed);
                app.metrics.rejected(refusal.reason());
                crate::observe::request_reason(refusal.reason());
                if first {
                    crate::log!(Warn, "rate_limited", key_kind = kind.label(), client = client.shown();
                        "{} is over --rate-limit {}: 429, retry after {secs} s (further refusals counted, not logged, until it is served again)", kind.words(), rate.shown);
                }
                Err(refusal.into())
            }
        }
    }

    /// A session refused at --max-sessions-per-token: counted, logged, on the access line.
    pub fn session_refused(client: &Client, limit: usize) -> Refusal {
        let kind = client.kind();
        let refusal = Refusal::ClientSessions { limit, kind };
        SESSIONS_REFUSED[kind as usize].fetch_add(1, Ordering::Relaxed);
        crate::app().metrics.rejected(refusal.reason());
        crate::observe::request_reason(refusal.reason());
        let shown = client.shown();
        crate::log!(Info, "client_sessions", key_kind = kind.label(), client = shown;
            "{} holds --max-sessions-per-token {limit} sessions: a new one refused (429)", kind.words());
        refusal
    }

    /// /metrics: refusals by key kind and the buckets held.
    #[allow(clippy::type_complexity)]
    pub fn families() -> Vec<(&'static str, &'static str, &'static str, Vec<(String, f64)>)> {
        let by_kind = |list: &[AtomicU64; 2]| {
            KeyKind::ALL
                .iter()
                .map(|k| {
                    (
                        format!("{{key_kind=\"{}\"}}", k.label()),
                        list[*k as usize].load(Ordering::Relaxed) as f64,
                    )
                })
                .collect()
        };
        let held = TABLE.locked().as_ref().map_or(0, |t| t.buckets.len());
        vec![
            (
                "stdio_sse_rate_limited_total",
                "Requests refused with 429 over --rate-limit, by whose bucket (a bearer token's, or a client address's).",
                "counter",
                by_kind(&RATE_LIMITED),
            ),
            (
                "stdio_sse_rate_limit_buckets",
                "Clients with a --rate-limit bucket held now (at most --rate-limit-keys; a refilled one is dropped).",
                "gauge",
                vec![(String::new(), held as f64)],
            ),
            (
                "stdio_sse_client_sessions_refused_total",
                "New sessions refused with 429 at --max-sessions-per-token, by key kind.",
                "counter",
                by_kind(&SESSIONS_REFUSED),
            ),
        ]
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn rates_take_a_count_per_unit_and_a_burst() {
            let r = parse_rate("10/s").unwrap();
            assert_eq!((r.per_second, r.burst), (10.0, 10));
            let r = parse_rate("600/m,20").unwrap();
            assert_eq!((r.per_second, r.burst), (10.0, 20));
            assert_eq!(parse_rate("5/h").unwrap().burst, MIN_DEFAULT_BURST);
            assert_eq!(parse_rate("50/s").unwrap().burst, 50);
            assert_eq!(parse_rate(" 2/s , 3 ").unwrap().burst, 3);
            for bad in [
                "10",
                "10/d",
                "0/s",
                "-1/s",
                "1.5/s",
                "ten/s",
                "10/s,0",
                "10/s,x",
                "/s",
                "10/s,",
                "2000000/s",
            ] {
                assert!(parse_rate(bad).is_err(), "{bad}");
            }
        }

        #[test]
        fn forwarded_for_is_read_only_from_trusted_peers() {
            let nets = |l: &[&str]| l.iter().map(|s| parse_net(s).unwrap()).collect::<Vec<_>>();
            let ip = |s: &str| s.parse::<IpAddr>().unwrap();
            let trusted = nets(&["127.0.0.1", "10.0.0.0/8"]);
            // An untrusted peer's header is its own invention.
            assert_eq!(
                client_address(ip("192.0.2.9"), &["198.51.100.1"], &trusted),
                ip("192.0.2.9")
            );
            // The right-most untrusted entry, past trusted hops.
            assert_eq!(
                client_address(
                    ip("127.0.0.1"),
                    &["1.1.1.1, 203.0.113.5, 10.1.2.3"],
                    &trusted
                ),
                ip("203.0.113.5")
            );
            // Several headers are one list, in order.
            assert_eq!(
                client_address(ip("127.0.0.1"), &["1.1.1.1", "203.0.113.6"], &trusted),
                ip("203.0.113.6")
            );
            // A forged garbage entry left of the proxy's own stops nothing it should not.
            assert_eq!(
                client_address(ip("127.0.0.1"), &["evil, 10.0.0.1"], &trusted),
                ip("10.0.0.1")
            );
            assert_eq!(
                client_address(ip("127.0.0.1"), &[], &trusted),
                ip("127.0.0.1")
            );
            assert_eq!(
                client_address(ip("::ffff:127.0.0.1"), &["[2001:db8::1]:443"], &trusted),
                ip("2001:db8::1")
            );
            assert_eq!(host_key(ip("2001:db8::1:2:3:4")), ip("2001:db8::"));
            assert!(parse_net("10.0.0.0/33").is_err() && parse_net("proxy").is_err());
        }

        #[test]
        fn a_bucket_refuses_past_its_burst_and_says_when_it_serves_again() {
            let rate = parse_rate("2/s,3").unwrap();
            let t0 = Instant::now();
            let me = Client::Token(Arc::from("test-bucket-a"));
            for _ in 0..3 {
                assert!(matches!(take(&rate, 100, &me, t0), Verdict::Served { .. }));
            }
            let Verdict::Refused { wait, first: true } = take(&rate, 100, &me, t0) else {
                panic!("the fourth at once is refused")
            };
            assert!(wait <= Duration::from_millis(500), "{wait:?}");
            assert!(matches!(
                take(&rate, 100, &me, t0 + wait),
                Verdict::Served { refused: 1 }
            ));
        }
    }
}
// ======================================================================================
/// The servers behind the port: the one of COMMAND (or the demo), or every stdio server
/// of a --config file. Which server a path is for (`/servers/NAME/mcp`, or the front
/// endpoints), each server's live state (its shared children, warm pool, 2026-07-28
/// carriers), `/servers` and each server's readiness, and reload on SIGHUP: added servers
/// start, removed ones drain, changed ones serve new sessions with their new settings
/// while the sessions they have keep their child until they end.
/// Owns: the server table, path resolution, reload, tool filters. Touches: `upstream`
/// and `modern` (a server's children), `sessions` (draining a removed server).
mod servers {
    use super::*;
    use crate::config::{Mode, ServerSpec};
    use crate::http::Refusal;
    use serde_json::{json, Value};
    use std::sync::{Mutex, RwLock};

    /// Every server's own endpoints are under this: /servers/NAME/mcp.
    pub const PREFIX: &str = "/servers/";

    pub struct Server {
        pub name: Arc<str>,
        pub spec: ServerSpec,
        /// Removed or replaced by a reload: it takes no new session.
        retired: AtomicBool,
        pub children: crate::upstream::Children,
        pub modern: crate::modern::PerServer,
        /// One-shot children running now.
        pub oneshot_active: AtomicUsize,
        /// How many tools it lists (after its filter), once a list has been seen; -1 before.
        tools_seen: std::sync::atomic::AtomicI64,
        /// Why its last start failed, until one succeeds.
        failure: Mutex<Option<String>>,
        /// What its child answered to an initialize, once one did: the merged
        /// endpoint's capabilities and instructions come from it.
        hello: Mutex<Option<Value>>,
        kind: Kind,
    }

    /// A server of the file, or the merged endpoint made of them.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Kind {
        Command,
        Merged,
    }

    /// The merged endpoint's name in logs and sessions: no file's name can be it.
    pub const MERGED_NAME: &str = "*";

    impl Server {
        pub fn new(spec: ServerSpec) -> Arc<Server> {
            Arc::new(Server {
                name: spec.name.as_str().into(),
                spec,
                retired: AtomicBool::new(false),
                children: Default::default(),
                modern: Default::default(),
                oneshot_active: AtomicUsize::new(0),
                tools_seen: std::sync::atomic::AtomicI64::new(-1),
                failure: Mutex::new(None),
                hello: Mutex::new(None),
                kind: Kind::Command,
            })
        }

        /// The merged endpoint, over the servers now serving: a session-mode server of
        /// its own, whose "child" is in-process (`merged`).
        fn merged(servers: &[Arc<Server>]) -> Arc<Server> {
            let cfg = &crate::app().cfg;
            let mut spec = cfg.server_defaults.clone();
            spec.name = MERGED_NAME.to_string();
            spec.command = Vec::new();
            spec.mode = Mode::Session;
            spec.warm = 0;
            spec.children = 1;
            spec.child_protocol = crate::modern::ChildEra::Legacy;
            spec.tools = crate::config::ToolFilter::default();
            // A header any server passes on is taken; each server session gets its own.
            spec.pass_headers = Vec::new();
            for s in servers {
                for h in &s.spec.pass_headers {
                    if !spec.pass_headers.contains(h) {
                        spec.pass_headers.push(h.clone());
                    }
                }
            }
            let mut server = Server::new(spec);
            Arc::get_mut(&mut server).expect("not shared yet").kind = Kind::Merged;
            server
        }

        pub fn is_merged(&self) -> bool {
            self.kind == Kind::Merged
        }

        /// Its child's InitializeResult, once any session (or carrier) has seen one.
        pub fn known_hello(&self) -> Option<Value> {
            if let Some(h) = self.hello.locked().clone() {
                return Some(h);
            }
            self.modern.discovered_result()
        }

        pub fn remember_hello(&self, result: &Value) {
            let mut h = self.hello.locked();
            if h.is_none() {
                *h = Some(result.clone());
            }
        }
        pub fn retired(&self) -> bool {
            self.retired.load(Ordering::Acquire)
        }
        /// Before a child's tag in logs: whose child it is, when there may be several.
        pub fn tag_prefix(&self) -> String {
            if crate::app().cfg.config_file.is_some() {
                format!("{}/", self.name)
            } else {
                String::new()
            }
        }
        /// A child of it started, or could not: /servers and /readyz say which.
        pub fn started(&self, outcome: Result<(), &str>) {
            let mut f = self.failure.locked();
            match outcome {
                Ok(()) => *f = None,
                Err(why) => {
                    if f.is_none() {
                        crate::app().metrics.server_failed(&self.name);
                    }
                    *f = Some(why.to_string());
                }
            }
        }
        /// Why it cannot serve now, if it cannot.
        pub fn not_ready(&self) -> Option<String> {
            if self.is_merged() {
                return None;
            }
            if let Some(reason) = crate::upstream::crash_loop(self) {
                return Some(reason);
            }
            if let Err(reason) = crate::child::startable(&self.spec) {
                return Some(reason);
            }
            self.failure.locked().clone()
        }
        pub fn saw_tools(&self, n: usize) {
            self.tools_seen.store(n as i64, Ordering::Relaxed);
        }
        pub fn tools_known(&self) -> Option<usize> {
            usize::try_from(self.tools_seen.load(Ordering::Relaxed)).ok()
        }
        /// What `/servers` says of it.
        fn describe(&self) -> Value {
            let app = crate::app();
            let sessions = app
                .sessions
                .all()
                .iter()
                .filter(|s| s.server.name == self.name && !s.is_carrier())
                .count();
            let children = app
                .children
                .locked()
                .values()
                .filter(|c| c.server == self.name)
                .count();
            let (state, reason) = match self.not_ready() {
                None if self.spec.mode == Mode::Shared && !crate::upstream::any_running(self) => {
                    ("starting", None)
                }
                None => ("ready", None),
                Some(r) if r.starts_with("crash loop") => ("crash_loop", Some(r)),
                Some(r) => ("failed", Some(r)),
            };
            let tools = self.tools_known();
            let mut v = json!({
                "name": &*self.name,
                "mode": mode_name(self.spec.mode),
                "state": state,
                "endpoints": endpoints(&self.name, self.spec.mode),
                "sessions": sessions,
                "children": children,
                "tools": tools,
            });
            if let Some(r) = reason {
                v["reason"] = r.into();
            }
            if !self.spec.tools.is_open() {
                v["toolFilter"] =
                    json!({"allow": self.spec.tools.allow, "deny": self.spec.tools.deny});
            }
            v
        }
    }

    pub fn mode_name(mode: Mode) -> &'static str {
        match mode {
            Mode::Session => "session",
            Mode::Shared => "shared",
            Mode::Oneshot => "oneshot",
        }
    }

    fn endpoints(name: &str, mode: Mode) -> Value {
        let base = format!("{PREFIX}{name}");
        match mode {
            Mode::Oneshot => {
                json!({"mcp": format!("{base}/mcp"), "readyz": format!("{base}/readyz")})
            }
            _ => json!({
                "mcp": format!("{base}/mcp"),
                "sse": format!("{base}/sse"),
                "message": format!("{base}/message"),
                "readyz": format!("{base}/readyz"),
            }),
        }
    }

    /// The servers serving now, in the file's order (retired ones are not here).
    static TABLE: RwLock<Vec<Arc<Server>>> = RwLock::new(Vec::new());
    /// Entries the file has but that do not run: disabled, or not stdio.
    static IDLE_ENTRIES: Mutex<Vec<Value>> = Mutex::new(Vec::new());
    /// Retired servers whose sessions or children have not all ended yet.
    static RETIRED: Mutex<Vec<Arc<Server>>> = Mutex::new(Vec::new());
    /// The merged endpoint, while more than one server serves.
    static MERGED: RwLock<Option<Arc<Server>>> = RwLock::new(None);

    fn merged() -> Option<Arc<Server>> {
        MERGED
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn all() -> Vec<Arc<Server>> {
        TABLE
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every server with state to look after: serving, and retired but not yet drained.
    pub fn live() -> Vec<Arc<Server>> {
        let mut v = all();
        v.extend(RETIRED.locked().iter().cloned());
        v
    }

    pub fn named(name: &str) -> Option<Arc<Server>> {
        all().into_iter().find(|s| &*s.name == name)
    }

    /// Which endpoint of a server a request is for.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Endpoint {
        Mcp,
        Sse,
        Message,
        Readyz,
    }

    /// Whose endpoint: a server's own (`/servers/NAME/...`), or the front paths
    /// (--mcp-path, --sse-path, --message-path), which serve the one server there is.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
    pub enum Door {
        #[default]
        Front,
        Own,
    }

    /// A session opened on `(server, door)` may be used by a request routed to
    /// `(to, by)`: on its server's own paths, or on the front paths whatever they lead
    /// to now (a reload that turns one server into several, or back, changes what the
    /// front paths serve; a session opened there stays reachable there).
    pub fn same_place(server: &Server, door: Door, to: &Server, by: Door) -> bool {
        match (door, by) {
            (Door::Front, Door::Front) => true,
            _ => server.name == to.name,
        }
    }

    pub struct Route {
        pub server: Arc<Server>,
        pub endpoint: Endpoint,
        pub door: Door,
    }

    /// The server and endpoint a path names, if any.
    pub fn resolve(path: &str) -> Option<Route> {
        let cfg = &crate::app().cfg;
        if let Some(rest) = path.strip_prefix(PREFIX) {
            let (name, tail) = rest.split_once('/')?;
            let endpoint = match tail {
                "mcp" => Endpoint::Mcp,
                "sse" => Endpoint::Sse,
                "message" => Endpoint::Message,
                "readyz" => Endpoint::Readyz,
                _ => return None,
            };
            let server = named(name)?;
            return Some(Route {
                server,
                endpoint,
                door: Door::Own,
            });
        }
        let endpoint = if path == cfg.mcp_path {
            Endpoint::Mcp
        } else if path == cfg.sse_path {
            Endpoint::Sse
        } else if path == cfg.message_path {
            Endpoint::Message
        } else {
            return None;
        };
        let table = all();
        let server = match table.as_slice() {
            [one] => one.clone(),
            _ => merged()?,
        };
        Some(Route {
            server,
            endpoint,
            door: Door::Front,
        })
    }

    /// Where a legacy stream's client posts its messages.
    pub fn message_path(server: &Server, door: Door) -> String {
        match door {
            Door::Front => crate::app().cfg.message_path.clone(),
            Door::Own => format!("{PREFIX}{}/message", server.name),
        }
    }

    /// GET /servers.
    pub fn list() -> Value {
        let mut servers: Vec<Value> = all().iter().map(|s| s.describe()).collect();
        servers.extend(IDLE_ENTRIES.locked().iter().cloned());
        for s in RETIRED.locked().iter().filter(|s| !s.is_merged()) {
            let mut d = s.describe();
            d["state"] = "draining".into();
            servers.push(d);
        }
        let mut out = json!({"servers": servers});
        if merged().is_some() {
            let cfg = &crate::app().cfg;
            let sessions = crate::app()
                .sessions
                .all()
                .iter()
                .filter(|s| s.server.is_merged() && !s.is_carrier())
                .count();
            out["merged"] = json!({"endpoints": {"mcp": cfg.mcp_path, "sse": cfg.sse_path,
                "message": cfg.message_path}, "toolSeparator": cfg.tool_separator,
                "sessions": sessions, "servers": all().iter().map(|s| s.name.to_string()).collect::<Vec<_>>()});
        }
        out
    }

    /// Why the whole instance is not ready: every enabled server that cannot serve.
    pub fn not_ready() -> Option<String> {
        let failing: Vec<String> = all()
            .iter()
            .filter_map(|s| s.not_ready().map(|r| format!("server {:?}: {r}", &*s.name)))
            .collect();
        (!failing.is_empty()).then(|| failing.join("; "))
    }

    /// The file's entries that do not run (disabled, or not stdio), each logged, as
    /// /servers lists them.
    fn idle_entries(specs: &[ServerSpec], skipped: &[(String, String)]) -> Vec<Value> {
        let mut idle = Vec::new();
        for spec in specs.iter().filter(|s| s.disabled) {
            crate::log!(Info, "server_disabled", server = spec.name; "server {:?} is disabled in the file: not started", spec.name);
            idle.push(
                json!({"name": spec.name, "mode": mode_name(spec.mode), "state": "disabled"}),
            );
        }
        for (name, why) in skipped {
            crate::log!(Warn, "server_skipped", "server {name:?} skipped: {why}");
            idle.push(json!({"name": name, "state": "skipped", "reason": why}));
        }
        idle
    }

    /// Installs the servers of the configuration and starts each.
    pub fn install(specs: &[ServerSpec], skipped: &[(String, String)]) {
        *IDLE_ENTRIES.locked() = idle_entries(specs, skipped);
        let table: Vec<Arc<Server>> = specs
            .iter()
            .filter(|s| !s.disabled)
            .map(|s| Server::new(s.clone()))
            .collect();
        *TABLE
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table.clone();
        *MERGED
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            (table.len() > 1).then(|| Server::merged(&table));
        for s in &table {
            start(s);
        }
    }

    // ---- tool filters ------------------------------------------------------------------

    /// A `tools/call` of a tool the server's filter hides gets what an unknown tool
    /// gets: this answer, and the child never hears of it.
    pub fn hidden_call(server: &Server, m: &Value) -> Option<Value> {
        if server.spec.tools.is_open() || m.get("method")?.as_str()? != "tools/call" {
            return None;
        }
        let name = m.pointer("/params/name")?.as_str()?;
        if server.spec.tools.admits(name) {
            return None;
        }
        let refusal = Refusal::UnknownTool(name.to_string());
        crate::app().metrics.rejected(refusal.reason());
        crate::log!(Info, "tool_hidden", server = server.name; "tools/call of {name:?}, which the server's tool filter hides: answered as an unknown tool");
        let id = m.get("id").cloned().unwrap_or(Value::Null);
        Some(json!({"jsonrpc": "2.0", "id": id,
            "error": {"code": refusal.code(), "message": refusal.message()}}))
    }

    /// A `tools/list` answer with the hidden tools taken out (None when nothing was);
    /// what is left is counted for /servers either way.
    pub fn filter_tool_list(server: &Server, answer: &Value) -> Option<Value> {
        let tools = answer.pointer("/result/tools")?.as_array()?;
        let name = |t: &Value| {
            t.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let kept: Vec<Value> = tools
            .iter()
            .filter(|t| server.spec.tools.admits(&name(t)))
            .cloned()
            .collect();
        if answer.pointer("/result/nextCursor").is_none() {
            server.saw_tools(kept.len());
        }
        if kept.len() == tools.len() {
            return None;
        }
        let mut out = answer.clone();
        out["result"]["tools"] = Value::Array(kept);
        Some(out)
    }

    // ---- reload (SIGHUP) -----------------------------------------------------------------

    /// Re-reads --config. Added servers start; removed (or now disabled) ones drain:
    /// their sessions end and their children are stopped as on shutdown; changed ones
    /// serve new sessions with the new settings while the sessions they have keep their
    /// child until they end. A file that does not read or check keeps the running
    /// configuration, and the log says what is wrong.
    pub fn reload() {
        let app = crate::app();
        let Some(path) = &app.cfg.config_file else {
            return;
        };
        let file = match crate::config::read_servers_file(
            path,
            &app.cfg.server_defaults,
            &app.cfg.tool_separator,
        ) {
            Ok(f) => f,
            Err(e) => {
                app.metrics.config_reload("failed");
                crate::log!(
                    Error,
                    "config_reload_failed",
                    "{e}; keeping the configuration in force"
                );
                return;
            }
        };
        let old = all();
        let mut table = Vec::new();
        let (mut added, mut changed, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        let idle = idle_entries(&file.servers, &file.skipped);
        for spec in file.servers.iter().filter(|s| !s.disabled) {
            match old.iter().find(|s| *s.name == *spec.name) {
                Some(s) if s.spec == *spec => {
                    kept.push(s.name.to_string());
                    table.push(s.clone());
                }
                Some(_) => {
                    changed.push(spec.name.clone());
                    table.push(Server::new(spec.clone()));
                }
                None => {
                    added.push(spec.name.clone());
                    table.push(Server::new(spec.clone()));
                }
            }
        }
        let gone: Vec<Arc<Server>> = old
            .iter()
            .filter(|s| !table.iter().any(|t| Arc::ptr_eq(s, t)))
            .cloned()
            .collect();
        let removed: Vec<Arc<Server>> = gone
            .iter()
            .filter(|s| !changed.iter().any(|c| **c == *s.name))
            .cloned()
            .collect();
        let old_merged = merged();
        *IDLE_ENTRIES.locked() = idle;
        *TABLE
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table.clone();
        let new_merged = (table.len() > 1).then(|| {
            // The same servers: the merged endpoint (and its carriers) stays.
            match &old_merged {
                Some(m) if gone.is_empty() && added.is_empty() => m.clone(),
                _ => Server::merged(&table),
            }
        });
        *MERGED
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new_merged.clone();
        let mut retiring = gone.clone();
        if let Some(m) =
            old_merged.filter(|m| !new_merged.as_ref().is_some_and(|n| Arc::ptr_eq(m, n)))
        {
            retiring.push(m);
        }
        for s in &retiring {
            s.retired.store(true, Ordering::Release);
            RETIRED.locked().push(s.clone());
        }
        for s in table
            .iter()
            .filter(|s| !old.iter().any(|o| Arc::ptr_eq(o, s)))
        {
            start(s);
        }
        app.metrics.config_reload("applied");
        crate::log!(
            Info,
            "config_reload",
            "{} re-read: {} added ({}), {} changed ({}), {} removed ({}), {} unchanged",
            path.display(),
            added.len(),
            added.join(", "),
            changed.len(),
            changed.join(", "),
            removed.len(),
            removed
                .iter()
                .map(|s| s.name.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            kept.len()
        );
        for s in retiring {
            let how = removed_or_changed(&s, &removed);
            crate::spawn_thread("retire-server", move || retire(&s, how));
        }
    }

    /// Whether a retired server's sessions end now (removed) or run on (changed).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Retire {
        Drain,
        KeepSessions,
    }

    fn removed_or_changed(s: &Arc<Server>, removed: &[Arc<Server>]) -> Retire {
        if removed.iter().any(|r| Arc::ptr_eq(r, s)) {
            Retire::Drain
        } else {
            Retire::KeepSessions
        }
    }

    /// A retired server: its warm children stop, a removed one's sessions end (their
    /// children with them), and its shared children stop once no session is on them.
    fn retire(server: &Arc<Server>, how: Retire) {
        crate::upstream::retire_children(server);
        if how == Retire::Drain {
            let app = crate::app();
            let mine: Vec<Arc<crate::sessions::Session>> = app
                .sessions
                .all()
                .into_iter()
                .filter(|s| Arc::ptr_eq(&s.server, server))
                .collect();
            crate::log!(Info, "server_removed", server = server.name; "server {:?} removed: ending its {} session(s)", &*server.name, mine.len());
            for s in mine {
                crate::sessions::end(&s, crate::sessions::EndReason::ServerRemoved);
            }
        }
        crate::upstream::stop_idle_shared(server);
    }

    /// Forgets retired servers with nothing left running (the housekeeper calls it).
    pub fn prune_retired() {
        let app = crate::app();
        let sessions = app.sessions.all();
        RETIRED.locked().retain(|r| {
            sessions.iter().any(|s| Arc::ptr_eq(&s.server, r)) || crate::upstream::any_running(r)
        });
    }

    /// Starts what a server keeps running: its shared children or warm pool, and the
    /// probe of what it speaks (--child-protocol auto).
    fn start(server: &Arc<Server>) {
        if crate::app().cfg.config_file.is_some() {
            crate::log!(Info, "server_start", server = server.name; "server {:?}: {} ({} mode)", &*server.name, server.spec.command.join(" "), mode_name(server.spec.mode));
        }
        match server.spec.mode {
            Mode::Shared => crate::upstream::start_shared(server),
            Mode::Session => crate::upstream::start_warm_pool(server),
            Mode::Oneshot => return,
        }
        crate::modern::probe_child_era(server);
    }
}

// ======================================================================================
/// Streamable HTTP on the MCP endpoint (2025-03-26 .. 2025-11-25): POST, GET and DELETE
/// for session mode. Owns the HTTP-level rules (P-*, G-*, S-*, V-*, B-*); hands messages
/// to `sessions` and streams what `sessions` routes back.
/// Owns: the Streamable HTTP rules of one request. Touches: `sessions` only (never a
/// child or an upstream), `http` for replies and streams.
mod streamable {
    use super::*;
    use crate::app;
    use crate::http::{require_accept, respond, Incoming, Lifetime, Refusal, Reply, Wanted};
    use crate::message::{classify, Kind};
    use crate::sessions::{self, Session, Transport};

    const SESSION_HEADER: &str = "Mcp-Session-Id";

    pub fn post(mut inc: Incoming) {
        if let Err(reply) = require_accept(&inc, Wanted::JsonAndEventStream) {
            return respond(inc, reply);
        }
        let (messages, batch) = match crate::http::read_jsonrpc_body(&mut inc) {
            Ok(m) => m,
            Err(reply) => return respond(inc, reply),
        };
        if crate::modern::claims(&inc, &messages) {
            return crate::modern::post(inc, messages, batch);
        }
        crate::observe::request_era("2025");
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
                return respond(inc, Reply::from(Refusal::InitializeInBatch));
            }
            if let Some(id) = session_id {
                return match app.sessions.get(&id, Transport::Streamable, &inc) {
                    Some(_) => respond(inc, Refusal::AlreadyInitialized.into()),
                    None => respond(inc, Reply::from(Refusal::SessionNotFound)),
                };
            }
            let init = messages.into_iter().next().expect("one message");
            if crate::modern::child_era(inc.server()) == crate::modern::ChildEra::Modern {
                let id = init.get("id").cloned().unwrap_or_default();
                return respond(inc, Reply::answering(&id, Refusal::ChildModernOnly));
            }
            return start_session(inc, init);
        }
        let Some(id) = session_id else {
            // Also the answer to a 2026-07-28 `server/discover` probe: a 400 without a
            // modern error code, so dual-era clients fall back to initialize (N-11).
            return respond(inc, Refusal::SessionIdRequired.into());
        };
        let Some(session) = app.sessions.get(&id, Transport::Streamable, &inc) else {
            return respond(inc, Reply::from(Refusal::SessionNotFound));
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
            return respond(inc, Refusal::BatchNotNegotiated.into());
        }
        session.mark_request();
        forward_and_stream(inc, &session, messages, None);
    }

    /// Rule V-3: a present but unknown MCP-Protocol-Version is a 400; absent is fine (V-2).
    fn check_version(inc: &Incoming) -> Result<(), Reply> {
        match inc.header("MCP-Protocol-Version") {
            Some(v) if !config::SUPPORTED_VERSIONS.contains(&v) => {
                Err(Reply::from(Refusal::UnsupportedVersion {
                    got: v.to_string(),
                    supported: config::SUPPORTED_VERSIONS.join(", "),
                }))
            }
            _ => Ok(()),
        }
    }

    fn start_session(inc: Incoming, init: serde_json::Value) {
        let init_id = match classify(&init) {
            Kind::Request { id, .. } => id.clone(),
            _ => serde_json::Value::Null,
        };
        let ctx = match crate::auth::context(&inc) {
            Ok(ctx) => ctx,
            Err(reply) => return respond(inc, reply),
        };
        match sessions::create(&inc.server().clone(), Transport::Streamable, ctx) {
            Ok(session) => {
                session.set_initialize(&init_id);
                forward_and_stream(inc, &session, vec![init], Some(session.id.clone()));
            }
            Err(sessions::CreateError::Refused(reply)) => respond(inc, reply),
            Err(sessions::CreateError::Spawn(msg)) => respond(
                inc,
                Reply::answering(&init_id, Refusal::ChildNotStarted(msg)),
            ),
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
        let attached = match session.accept_post(&messages) {
            Ok(attached) => attached,
            Err(reply) => return respond(inc, reply),
        };
        let Some(attached) = attached else {
            return respond(inc, Reply::accepted());
        };
        let headers = new_session
            .map(|id| (SESSION_HEADER, id))
            .into_iter()
            .collect();
        crate::http::stream(inc, headers, Lifetime::Request, attached, session);
    }

    /// GET opens the session's listening stream (G-1..G-6), or with `Last-Event-ID`
    /// resumes any stream of the session where the client lost it (R-4).
    pub fn get(inc: Incoming) {
        if modern_without_session(&inc) {
            return respond(inc, Refusal::MethodNotAllowed { allow: "POST" }.into());
        }
        if let Err(reply) = crate::http::require_accept(&inc, Wanted::EventStream) {
            return respond(inc, reply);
        }
        let Some(id) = inc.header(SESSION_HEADER) else {
            return respond(inc, Refusal::SessionIdRequired.into());
        };
        let Some(session) = app().sessions.get(id, Transport::Streamable, &inc) else {
            return respond(inc, Reply::from(Refusal::SessionNotFound));
        };
        if let Err(reply) = check_version(&inc) {
            return respond(inc, reply);
        }
        session.touch();
        let attached = match session.attach_get(inc.header("Last-Event-ID")) {
            Ok(a) => a,
            Err(reply) => return respond(inc, reply),
        };
        crate::http::stream(inc, Vec::new(), Lifetime::Standing, attached, &session);
    }

    /// A GET or DELETE that says 2026-07-28 and names no session: that revision has
    /// neither (N-1), so 405 as a 2026-only server answers.
    fn modern_without_session(inc: &Incoming) -> bool {
        inc.header(SESSION_HEADER).is_none()
            && inc
                .header("MCP-Protocol-Version")
                .is_some_and(|v| crate::modern::VERSIONS.contains(&v.trim()))
    }

    /// DELETE ends the session and its child (S-7); it answers once the child is gone.
    pub fn delete(inc: Incoming) {
        if modern_without_session(&inc) {
            return respond(inc, Refusal::MethodNotAllowed { allow: "POST" }.into());
        }
        let Some(id) = inc.header(SESSION_HEADER) else {
            return respond(inc, Refusal::SessionIdRequired.into());
        };
        let Some(session) = app().sessions.get(id, Transport::Streamable, &inc) else {
            return respond(inc, Reply::from(Refusal::SessionNotFound));
        };
        sessions::end(&session, sessions::EndReason::Deleted);
        respond(inc, Reply::text(200, "", Vec::new()));
    }
}

// ======================================================================================
/// Legacy HTTP+SSE (2024-11-05): GET on the SSE path announces a session whose whole
/// life is that one stream; its first POST to the message path starts the session and its
/// child (a stream that only probes costs a socket), later ones feed it (rules L-1..L-5).
/// Owns: the legacy endpoint's rules. Touches: `sessions` only, `http` for replies and
/// the stream.
mod legacy {
    use super::*;
    use crate::http::{respond, Incoming, Refusal, Reply, Wanted};
    use crate::sessions::{self, Session, Transport};
    use crossbeam_channel::{RecvTimeoutError, Sender};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A stream that announced its endpoint and waits for its first message, which
    /// starts the session and its child: a client that only probes (mcp-remote opens
    /// two such connections per run) costs a socket and nothing more.
    struct Announced {
        server: Arc<crate::servers::Server>,
        ctx: crate::auth::Context,
        to_stream: Sender<Arc<Session>>,
    }

    static ANNOUNCED: Mutex<Option<HashMap<String, Announced>>> = Mutex::new(None);

    /// Streams that announced a session id and wait for its first message: a drain
    /// waits for them as for open sessions.
    pub fn announced_count() -> usize {
        ANNOUNCED.locked().as_ref().map_or(0, |m| m.len())
    }

    fn forget(id: &str) -> Option<Announced> {
        ANNOUNCED.locked().as_mut().and_then(|m| m.remove(id))
    }

    pub fn open(inc: Incoming) {
        if let Err(reply) = crate::http::require_accept(&inc, Wanted::EventStream) {
            return respond(inc, reply);
        }
        if crate::modern::child_era(inc.server()) == crate::modern::ChildEra::Modern {
            return respond(inc, Refusal::ChildModernOnly.into());
        }
        let ctx = match crate::auth::context(&inc) {
            Ok(ctx) => ctx,
            Err(reply) => return respond(inc, reply),
        };
        if crate::teardown::DRAINING.load(Ordering::Acquire) {
            app().metrics.rejected(Refusal::Draining.reason());
            return respond(inc, Refusal::Draining.into());
        }
        if let Some(refusal) = sessions::full(inc.server()) {
            return respond(inc, refusal.into());
        }
        if let Some(refusal) = sessions::client_full(&ctx) {
            return respond(inc, refusal.into());
        }
        let id = match crate::new_session_id() {
            Ok(id) => id,
            Err(e) => {
                return respond(
                    inc,
                    Refusal::ChildNotStarted(format!("cannot make a session id: {e}")).into(),
                )
            }
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let server = inc.server().clone();
        let endpoint = format!(
            "{}?sessionId={id}",
            crate::servers::message_path(&server, inc.door)
        );
        ANNOUNCED.locked().get_or_insert_with(HashMap::new).insert(
            id.clone(),
            Announced {
                server,
                ctx,
                to_stream: tx,
            },
        );
        let conn = inc.conn;
        // A client that leaves before its first message: forgotten, which ends the wait.
        let gone = {
            let id = id.clone();
            crate::door::watch(conn, move || {
                forget(&id);
            })
        };
        crate::observe::response_status(200);
        let opened = crate::http::open_sse(inc, Vec::new(), crate::http::Lifetime::Standing);
        let Ok(mut stream) = opened else {
            forget(&id);
            return;
        };
        if stream.event(Some("endpoint"), &endpoint).is_err() {
            forget(&id);
            return;
        }
        let keepalive = crate::app()
            .cfg
            .keepalive
            .unwrap_or(config::KEEPALIVE_OFF_WAKE);
        let session = loop {
            match rx.recv_timeout(keepalive) {
                Ok(session) => break session,
                Err(RecvTimeoutError::Timeout) => {
                    if stream.comment("keepalive").is_err() {
                        forget(&id);
                        return;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        drop(gone);
        let attached = match session.attach_get(None) {
            Ok(a) => a,
            Err(_) => {
                // The session ended as it opened (its child died at once).
                sessions::end(&session, sessions::EndReason::ChildGone);
                return;
            }
        };
        let _watch = {
            let (s, no, c) = (session.clone(), attached.stream, attached.conn_id);
            crate::door::watch(conn, move || s.client_left(no, c))
        };
        crate::sse::pump(stream, attached, &session);
        // The stream is the session: when it ends, so does the child.
        sessions::end(&session, sessions::EndReason::ClientGone);
    }

    pub fn post(mut inc: Incoming) {
        let Some(id) = inc
            .query_param("sessionId")
            .or_else(|| inc.query_param("session_id"))
        else {
            return respond(inc, Refusal::SessionQueryRequired.into());
        };
        let app = crate::app();
        let existing = app.sessions.get(&id, Transport::Legacy, &inc);
        if existing.is_none() && !announced(&id, &inc) {
            return respond(inc, Reply::from(Refusal::SessionNotFound));
        }
        let messages = match crate::http::read_jsonrpc_body(&mut inc) {
            Ok((m, _)) => m,
            Err(reply) => return respond(inc, reply),
        };
        let session = match existing {
            Some(s) => s,
            None => match start(&id, &inc) {
                Ok(s) => s,
                Err(reply) => return respond(inc, reply),
            },
        };
        session.mark_request();
        let listener = session.listener_stream();
        if let Err(reply) = session.accept_on(&messages, Some(listener)) {
            return respond(inc, reply);
        }
        respond(inc, Reply::text(202, "text/plain", "Accepted"))
    }

    /// A stream announced this id to this token and waits for its first message.
    fn announced(id: &str, inc: &Incoming) -> bool {
        ANNOUNCED
            .locked()
            .as_ref()
            .and_then(|m| m.get(id))
            .is_some_and(|a| a.owned_by(inc))
    }

    impl Announced {
        /// Its stream was opened with this request's token, on this request's server.
        fn owned_by(&self, inc: &Incoming) -> bool {
            crate::servers::same_place(&self.server, self.ctx.door, inc.server(), inc.door)
                && crate::auth::owns(&self.ctx.owner, &inc.token)
        }
    }

    /// The first message of an announced stream: its session, and so its child, start
    /// now (a warm child taken now), and the stream is handed the session.
    fn start(id: &str, inc: &Incoming) -> Result<Arc<Session>, Reply> {
        let announced = {
            let mut guard = ANNOUNCED.locked();
            let map = guard.as_mut();
            match map.and_then(|m| m.get(id)) {
                Some(a) if a.owned_by(inc) => guard.as_mut().and_then(|m| m.remove(id)),
                _ => None,
            }
        };
        let Some(announced) = announced else {
            return Err(Refusal::SessionNotFound.into());
        };
        let server = announced.server.clone();
        match sessions::create_with_id(&server, Transport::Legacy, announced.ctx, id.to_string()) {
            Ok(session) => {
                if announced.to_stream.send(session.clone()).is_err() {
                    // The stream ended meanwhile: so does the session.
                    sessions::end(&session, sessions::EndReason::ClientGone);
                    return Err(Refusal::SessionNotFound.into());
                }
                Ok(session)
            }
            // Dropping `announced` ends the waiting stream: its client reconnects.
            Err(sessions::CreateError::Refused(reply)) => Err(reply),
            Err(sessions::CreateError::Spawn(msg)) => Err(Refusal::ChildNotStarted(msg).into()),
        }
    }
}

// ======================================================================================
/// MCP 2026-07-28 ("modern": stateless) on the same endpoint as the 2025 sessions. A
/// POST is modern when its body carries the `_meta` envelope (M-1); it is validated in
/// the order M-2 gives and then answered by the bridge (`server/discover`,
/// `subscriptions/listen`) or by a child through a *carrier*: a hidden session
/// (`Transport::Modern`) that no client can name. In session mode a carrier serves one
/// call at a time, so everything its child says between the call and its answer (logs,
/// requests for input) belongs to that call; idle carriers wait in a pool keyed by
/// token and --pass-header values. In shared mode one carrier on the shared child takes
/// every modern call at once, ids and tokens rewritten there as for any session.
///
/// A legacy child (one that wants `initialize`) is initialized by the carrier with the
/// client capabilities the bridge can relay; its requests for input (elicitation,
/// sampling, roots) become MRTR `input_required` answers (M-5, M-6): the call is parked
/// on the child, and the client's retry feeds each answer back as the JSON-RPC reply.
/// A modern child gets the bodies as they are, ids and tokens remapped (M-10).
///
/// Owns: classification and validation of modern requests, discover, result decoration,
/// the carriers and their pool, parked calls and their `requestState`, listeners.
/// Touches: `sessions` (create, submit, end a carrier), `http` (replies, streams),
/// `door::hung_up` (a closed stream is cancellation). Never the child directly.
/// Rules: N-1..N-13, M-1..M-10.
mod modern {
    use super::*;
    use crate::http::{respond, Incoming, Lifetime, Refusal, Reply};
    use crate::message::{classify, id_key, Kind};
    use crate::servers::Server;
    use crate::sessions::{self, EndReason, Session, Transport};
    use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
    use serde_json::{json, Value};
    use std::collections::HashMap;
    use std::sync::{Condvar, Mutex, OnceLock};

    /// The modern revisions we serve.
    pub const VERSIONS: &[&str] = &["2026-07-28"];
    const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
    const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
    const META_LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";
    const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
    const META_SUBSCRIPTION: &str = "io.modelcontextprotocol/subscriptionId";
    const META_PREFIX: &str = "io.modelcontextprotocol/";
    /// JSON pointers to those keys in `_meta` (a `/` in a key is `~1`).
    const SERVER_INFO_POINTER: &str = "/_meta/io.modelcontextprotocol~1serverInfo";
    /// What a legacy child is initialized with: the newest 2025 revision.
    const CHILD_VERSION: &str = "2025-11-25";
    /// How long a client may keep discover, list and read results (M-4). Short: a
    /// legacy child's lists can change, and a client that listens hears of it anyway.
    const CACHE_TTL_MS: u64 = 60_000;
    /// After the child's first question during a call, how long its request waits for
    /// the others the child asks at once (several written together), so one
    /// input_required carries them all.
    const INPUT_GATHER: Duration = Duration::from_millis(10);
    /// A call waiting for its child looks at its client's socket this often: a stream
    /// the client closed is cancellation (M-8), noticed within this.
    const HANGUP_CHECK: Duration = Duration::from_millis(100);
    /// A cancelled call's carrier waits this long for the child's answer to it before
    /// it takes another call (anything the child says meanwhile is about the cancelled
    /// work); a child that never answers has its carrier retired.
    const CANCEL_DRAIN: Duration = Duration::from_secs(2);
    /// Idle carriers beyond --modern-pool are retired after this long idle (a burst's
    /// children are not kept, a steady load's are not thrashed).
    const SURPLUS_IDLE: Duration = Duration::from_secs(30);
    /// The housekeeper (parked calls past --input-ttl, drains, surplus carriers) looks
    /// this often.
    const HOUSEKEEPING: Duration = Duration::from_millis(250);
    /// Notifications kept for a parked call until its retry comes (progress while the
    /// person answers); beyond it they are dropped and counted.
    const PARKED_NOTES_MAX: usize = 256;
    /// A carrier's initialize (and the auto probe) waits this long for the child.
    const INIT_TIMEOUT: Duration = Duration::from_secs(30);
    const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Listeners get their final result on shutdown: this long at most is waited for
    /// their writers.
    const LISTENER_FAREWELL: Duration = Duration::from_secs(1);
    /// Methods a legacy child serves for modern clients (the rest are 404, M-2).
    const FORWARDED: &[&str] = &[
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "completion/complete",
    ];
    /// How a final answer that parks its call reads (the access log says "parked").
    const INPUT_REQUIRED: &str = "\"resultType\":\"input_required\"";
    /// Only these may answer `input_required` (M-5).
    const MAY_ASK: &[&str] = &["tools/call", "prompts/get", "resources/read"];
    /// Their results carry ttlMs and cacheScope (M-4).
    const CACHEABLE: &[&str] = &[
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
    ];
    /// Methods whose `Mcp-Name` header mirrors a body field (N-6).
    const NAMED: &[(&str, &str)] = &[
        ("tools/call", "name"),
        ("prompts/get", "name"),
        ("resources/read", "uri"),
    ];
    /// RFC 5424 severities, least first (`logging/setLevel`'s order).
    const LOG_LEVELS: &[&str] = &[
        "debug",
        "info",
        "notice",
        "warning",
        "error",
        "critical",
        "alert",
        "emergency",
    ];
    /// What a legacy child is told the client can do: what the bridge relays (M-6).
    fn relayed_capabilities() -> Value {
        json!({"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {}})
    }

    /// Which protocol the child speaks (--child-protocol).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum ChildEra {
        /// Wants `initialize` first: modern clients are served by translation.
        Legacy,
        /// Speaks 2026-07-28 itself: bodies pass through.
        Modern,
        /// Probed once at startup in a child of its own.
        Auto,
    }

    /// What --child-protocol auto found (or the flag said).
    /// A server's 2026-07-28 state: what its child speaks, what it said of itself, its
    /// carriers.
    #[derive(Default)]
    pub struct PerServer {
        /// What --child-protocol auto found.
        era: OnceLock<ChildEra>,
        /// The child's InitializeResult (legacy) or discover result (modern), first seen.
        discovered: Mutex<Option<Arc<Value>>>,
        info: OnceLock<Value>,
        info_text: OnceLock<Arc<str>>,
        pool: Mutex<Pool>,
        /// Shared mode: one carrier starts at a time.
        shared_start: Mutex<()>,
    }

    impl PerServer {
        /// The child's InitializeResult a carrier saw, if one has.
        pub fn discovered_result(&self) -> Option<Value> {
            self.discovered.locked().as_deref().cloned()
        }
    }

    pub fn child_era(server: &Server) -> ChildEra {
        *server
            .modern
            .era
            .get()
            .unwrap_or(&server.spec.child_protocol)
    }

    // ---- classification (M-1) --------------------------------------------------------

    /// A POST to /mcp is modern when a message carries the envelope, or when it says
    /// the modern version in its header and names no session (a modern client's
    /// response or bare notification).
    pub fn claims(inc: &Incoming, messages: &[Value]) -> bool {
        let enveloped = messages.iter().any(|m| {
            crate::message::at(m, &["params", "_meta"])
                .and_then(Value::as_object)
                .is_some_and(|meta| {
                    // Keys only 2026-07-28 has: 2025-11-25 has other keys under the same
                    // prefix (related-task).
                    meta.contains_key(META_VERSION) || meta.contains_key(META_CAPABILITIES)
                })
        });
        let header = inc
            .header("MCP-Protocol-Version")
            .is_some_and(|v| VERSIONS.contains(&v.trim()));
        enveloped || (header && inc.header("Mcp-Session-Id").is_none())
    }

    // ---- the front door: validation (M-2) and dispatch --------------------------------

    /// A parsed, validated modern request.
    struct Request {
        id: Value,
        method: String,
        params: Value,
        caps: Value,
        log_level: Option<usize>,
    }

    pub fn post(inc: Incoming, mut messages: Vec<Value>, batch: bool) {
        crate::observe::request_era("2026");
        if batch {
            return respond(inc, Refusal::ModernBatch.into());
        }
        let message = messages.pop().expect("one message");
        let (id, method) = match classify(&message) {
            Kind::Request { id, method } => (id.clone(), method.to_string()),
            Kind::Notification { method } => {
                // Nothing a modern client notifies reaches a child: a stream it closes
                // is its cancellation (M-8). Accepted and said (N-2).
                crate::log!(
                    Debug,
                    "modern_notification",
                    "{method} from a 2026-07-28 client: accepted, nothing to forward"
                );
                crate::app().metrics.dropped("modern_notification");
                return respond(inc, Reply::accepted());
            }
            _ => return respond(inc, Refusal::ModernResponse.into()),
        };
        let request = match validate(&inc, id, method, message) {
            Ok(r) => r,
            Err((id, refusal)) => return respond(inc, Reply::answering(&id, refusal)),
        };
        match request.method.as_str() {
            "server/discover" => discover(inc, request),
            "subscriptions/listen" => listen(inc, request),
            m if child_era(inc.server()) == ChildEra::Legacy && !FORWARDED.contains(&m) => {
                let refusal = Refusal::ModernUnknownMethod(request.method.clone());
                respond(inc, Reply::answering(&request.id, refusal))
            }
            _ => call(inc, request),
        }
    }

    /// M-2, in its order: the envelope, the headers against the body, the version, and
    /// (for a legacy child, in `post`) the method.
    fn validate(
        inc: &Incoming,
        id: Value,
        method: String,
        mut message: Value,
    ) -> Result<Request, (Value, Refusal)> {
        let fail = |r: Refusal| Err((id.clone(), r));
        let params = message
            .as_object_mut()
            .and_then(|m| m.remove("params"))
            .unwrap_or_else(|| json!({}));
        let empty = json!({});
        let meta = params.get("_meta").unwrap_or(&empty);
        let Some(version) = meta.get(META_VERSION).and_then(Value::as_str) else {
            return fail(Refusal::ModernEnvelope(format!(
                "params._meta[\"{META_VERSION}\"] is required"
            )));
        };
        let Some(caps) = meta.get(META_CAPABILITIES).filter(|c| c.is_object()) else {
            return fail(Refusal::ModernEnvelope(format!(
                "params._meta[\"{META_CAPABILITIES}\"] must be an object"
            )));
        };
        let mirrored = |header: &'static str, body: &str| -> Result<(), Refusal> {
            match inc.header(header).map(decode_header) {
                Some(Some(v)) if v == body => Ok(()),
                Some(Some(v)) => Err(Refusal::HeaderMismatch(format!(
                    "{header} is {v:?} but the body says {body:?}"
                ))),
                Some(None) => Err(Refusal::HeaderMismatch(format!(
                    "{header} holds a malformed =?base64?...?= value"
                ))),
                None => Err(Refusal::HeaderMismatch(format!(
                    "{header} is required and must equal the body ({body:?})"
                ))),
            }
        };
        if let Err(r) =
            mirrored("MCP-Protocol-Version", version).and_then(|_| mirrored("Mcp-Method", &method))
        {
            return fail(r);
        }
        if let Some((_, field)) = NAMED.iter().find(|(m, _)| *m == method) {
            let Some(name) = name_of(&method, &params) else {
                return fail(Refusal::ModernEnvelope(format!(
                    "params.{field} is required for {method}"
                )));
            };
            if let Err(r) = mirrored("Mcp-Name", name) {
                return fail(r);
            }
        }
        if !VERSIONS.contains(&version) {
            return fail(Refusal::ModernVersion {
                requested: version.to_string(),
            });
        }
        let log_level = meta
            .get(META_LOG_LEVEL)
            .and_then(Value::as_str)
            .and_then(|l| LOG_LEVELS.iter().position(|x| *x == l));
        Ok(Request {
            id,
            method,
            caps: caps.clone(),
            params,
            log_level,
        })
    }

    /// What `Mcp-Name` mirrors for this method (N-6): the tool's or prompt's name, the
    /// resource's URI; None for other methods or when the body lacks it.
    fn name_of<'a>(method: &str, params: &'a Value) -> Option<&'a str> {
        NAMED
            .iter()
            .find(|(m, _)| *m == method)
            .and_then(|(_, f)| params.get(*f))
            .and_then(Value::as_str)
    }

    /// A header value, with the `=?base64?...?=` form decoded (N-6); None when that form
    /// is malformed.
    fn decode_header(v: &str) -> Option<String> {
        let v = v.trim();
        let Some(inner) = v
            .strip_prefix("=?base64?")
            .and_then(|r| r.strip_suffix("?="))
        else {
            return Some(v.to_string());
        };
        String::from_utf8(base64_decode(inner)?).ok()
    }

    fn base64_decode(s: &str) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' | b'-' => 62,
                b'/' | b'_' => 63,
                _ => return None,
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        Some(out)
    }

    // ---- decoration (M-3, M-4) --------------------------------------------------------

    /// A request's progress token (in `params._meta`).
    fn token_of(params: &Value) -> Option<Value> {
        crate::message::at(params, &["_meta", "progressToken"]).cloned()
    }

    /// The child's serverInfo, once known; ours until then.
    fn server_info(server: &Server) -> Value {
        if let Some(v) = server.modern.info.get() {
            return v.clone();
        }
        let found = server.modern.discovered.locked().as_ref().and_then(|d| {
            d.get("serverInfo")
                .or_else(|| d.pointer(SERVER_INFO_POINTER))
                .cloned()
        });
        match found {
            Some(v) => server.modern.info.get_or_init(|| v).clone(),
            None => json!({"name": "stdio-sse", "version": env!("CARGO_PKG_VERSION")}),
        }
    }

    fn cache_scope() -> &'static str {
        if crate::app().cfg.auth.enabled() {
            "private"
        } else {
            "public"
        }
    }

    /// Every result says what it is and who answered (M-4); lists, reads and discover
    /// say how long they may be kept.
    fn decorate(server: &Server, method: &str, result: &mut Value) {
        let Some(obj) = result.as_object_mut() else {
            return;
        };
        obj.entry("resultType").or_insert_with(|| json!("complete"));
        let meta = obj.entry("_meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            m.entry(META_SERVER_INFO)
                .or_insert_with(|| server_info(server));
        }
        if CACHEABLE.contains(&method) || method == "server/discover" {
            obj.entry("ttlMs").or_insert_with(|| json!(CACHE_TTL_MS));
            obj.entry("cacheScope")
                .or_insert_with(|| json!(cache_scope()));
        }
    }

    /// A plain result's answer without parsing and printing the result again (a tool's
    /// result can be megabytes): the child's own text with our id, and the decoration
    /// put in front of the result's members. None unless the result is an object with
    /// none of the decoration's keys (then `decorate` does it on the parsed value).
    fn spliced_answer(
        server: &Server,
        raw: &str,
        client_id: &Value,
        method: &str,
        result: &Value,
    ) -> Option<String> {
        let taken = ["resultType", "_meta", "ttlMs", "cacheScope"];
        if !result.is_object() || taken.iter().any(|k| result.get(*k).is_some()) {
            return None;
        }
        let (start, end) = json_text::member(raw, "result")?;
        let inner = raw[start..end].strip_prefix('{')?.strip_suffix('}')?;
        let info = server_info_text(server);
        let mut out = String::with_capacity(raw.len() + info.len() + 160);
        out.push_str("{\"jsonrpc\":\"2.0\",\"id\":");
        out.push_str(&client_id.to_string());
        out.push_str(",\"result\":{\"resultType\":\"complete\",\"_meta\":{\"");
        out.push_str(META_SERVER_INFO);
        out.push_str("\":");
        out.push_str(&info);
        out.push('}');
        if CACHEABLE.contains(&method) {
            use std::fmt::Write as _;
            let _ = write!(
                out,
                ",\"ttlMs\":{CACHE_TTL_MS},\"cacheScope\":\"{}\"",
                cache_scope()
            );
        }
        if !inner.trim().is_empty() {
            out.push(',');
            out.push_str(inner);
        }
        out.push_str("}}");
        Some(out)
    }

    /// `server_info()` as JSON text.
    fn server_info_text(server: &Server) -> Arc<str> {
        if let Some(t) = server.modern.info_text.get() {
            return t.clone();
        }
        let text: Arc<str> = server_info(server).to_string().into();
        if server.modern.discovered.locked().is_some() {
            return server.modern.info_text.get_or_init(|| text).clone();
        }
        text
    }

    /// Spans in JSON text already known to be valid (the child's line, parsed).
    pub mod json_text {
        fn ws(b: &[u8], mut i: usize) -> usize {
            while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
                i += 1;
            }
            i
        }

        /// Just past the closing quote of the string starting at `i`.
        fn string_end(b: &[u8], i: usize) -> Option<usize> {
            let mut j = i + 1;
            while j < b.len() {
                match b[j] {
                    b'\\' => j += 2,
                    b'"' => return Some(j + 1),
                    _ => j += 1,
                }
            }
            None
        }

        fn value_end(b: &[u8], i: usize) -> Option<usize> {
            match b.get(i)? {
                b'"' => string_end(b, i),
                b'{' | b'[' => {
                    let (mut depth, mut j) = (0usize, i);
                    while j < b.len() {
                        match b[j] {
                            b'"' => j = string_end(b, j)?,
                            b'{' | b'[' => {
                                depth += 1;
                                j += 1;
                            }
                            b'}' | b']' => {
                                depth = depth.checked_sub(1)?;
                                j += 1;
                                if depth == 0 {
                                    return Some(j);
                                }
                            }
                            _ => j += 1,
                        }
                    }
                    None
                }
                _ => {
                    let mut j = i;
                    while j < b.len()
                        && !matches!(b[j], b',' | b'}' | b']')
                        && !b[j].is_ascii_whitespace()
                    {
                        j += 1;
                    }
                    Some(j)
                }
            }
        }

        /// The span of a top-level member's value in an object's text (a key written
        /// with escapes is not recognised: the caller then takes the slow way).
        pub fn member(raw: &str, key: &str) -> Option<(usize, usize)> {
            let b = raw.as_bytes();
            let mut i = ws(b, 0);
            if b.get(i) != Some(&b'{') {
                return None;
            }
            i += 1;
            loop {
                i = ws(b, i);
                if b.get(i) != Some(&b'"') {
                    return None;
                }
                let key_end = string_end(b, i)?;
                let k = raw.get(i + 1..key_end - 1)?;
                i = ws(b, key_end);
                if b.get(i) != Some(&b':') {
                    return None;
                }
                let start = ws(b, i + 1);
                let end = value_end(b, start)?;
                if k == key {
                    return Some((start, end));
                }
                i = ws(b, end);
                if b.get(i) != Some(&b',') {
                    return None;
                }
                i += 1;
            }
        }

        #[cfg(test)]
        mod tests {
            #[test]
            fn members_are_found_past_strings_and_nesting() {
                let raw = r#" { "jsonrpc" : "2.0", "a": {"x": "}\"{", "y": [1, {"z": "]"}]}, "id": 3 , "result":{"k":"v"} } "#;
                let (s, e) = super::member(raw, "result").unwrap();
                assert_eq!(&raw[s..e], r#"{"k":"v"}"#);
                let (s, e) = super::member(raw, "id").unwrap();
                assert_eq!(&raw[s..e], "3");
                assert_eq!(super::member(raw, "none"), None);
                assert_eq!(super::member("[1]", "result"), None);
            }
        }
    }

    /// The HTTP status of a final answer sent as JSON: a method the child does not know
    /// is 404 (N-7); a modern child's envelope errors are 400 (M-10).
    fn status_of(server: &Server, answer: &Value) -> u16 {
        match crate::message::at(answer, &["error", "code"]).and_then(Value::as_i64) {
            Some(-32601) => 404,
            Some(-32022..=-32020) => 400,
            Some(-32602) if child_era(server) == ChildEra::Modern => 400,
            _ => 200,
        }
    }

    // ---- server/discover (M-3) --------------------------------------------------------

    fn discover(inc: Incoming, request: Request) {
        if child_era(inc.server()) == ChildEra::Modern {
            return call(inc, request);
        }
        let init = match initialize_result(&inc) {
            Ok(init) => init,
            Err(refusal) => return respond(inc, Reply::answering(&request.id, refusal)),
        };
        let mut result = json!({
            "supportedVersions": VERSIONS,
            "capabilities": init.get("capabilities").cloned().unwrap_or(json!({})),
        });
        if let Some(i) = init.get("instructions") {
            result["instructions"] = i.clone();
        }
        decorate(inc.server(), "server/discover", &mut result);
        let answer = json!({"jsonrpc": "2.0", "id": request.id, "result": result});
        respond(inc, Reply::json(200, answer))
    }

    /// The child's InitializeResult: known once any carrier has initialized a child,
    /// else a carrier starts one now.
    fn initialize_result(inc: &Incoming) -> Result<Arc<Value>, Refusal> {
        let discovered = &inc.server().modern.discovered;
        let known = discovered.locked().clone();
        if let Some(init) = known {
            return Ok(init);
        }
        let carrier = Pool::lease(inc).map_err(refusal_of)?;
        release_if_idle(&carrier);
        let known = discovered.locked().clone();
        known.ok_or_else(|| {
            Refusal::ChildNotStarted("the server process gave no initialize result".into())
        })
    }

    // ---- carriers and their pool ------------------------------------------------------

    /// A child serving modern calls: the hidden session's era-specific state.
    #[derive(Default)]
    pub struct Carrier {
        state: Mutex<CarrierState>,
    }

    #[derive(Default)]
    struct CarrierState {
        /// Calls on the child by the id the child sees (which is also their progress
        /// token there).
        calls: HashMap<u64, Arc<Call>>,
        /// The child's requests for input made while no call could carry them.
        held: Vec<Ask>,
        /// Session mode: serving a call (or draining one).
        leased: bool,
        /// A cancelled call whose answer has not come yet, and since when.
        draining: Option<(u64, Instant)>,
        idle_since: Option<Instant>,
        /// Resource URI -> listeners on it (one `resources/subscribe` on the child).
        subscriptions: HashMap<String, usize>,
        /// The child's capabilities (from initialize or discover).
        capabilities: Value,
        /// Listeners on this carrier: it is not retired while any listens.
        listeners: usize,
        ended: bool,
    }

    /// Every carrier, leased or idle, oldest first (an idle old one is taken first:
    /// the others grow idle and retire). Counted against --max-sessions as sessions.
    #[derive(Default)]
    struct Pool {
        carriers: Vec<Arc<Session>>,
    }

    fn carrier_of(s: &Session) -> &Carrier {
        s.carrier.as_deref().expect("a carrier session")
    }

    impl Pool {
        /// A carrier for one call. Session mode: an idle one of this token and
        /// --pass-header values, else a new one (its child from the warm pool when there
        /// is one, initialized now). Shared mode: the one carrier on the shared child.
        fn lease(inc: &Incoming) -> Result<Arc<Session>, Reply> {
            let ctx = crate::auth::context(inc)?;
            let server = inc.server();
            let shared = server.spec.mode == config::Mode::Shared;
            if let Some(s) = Pool::take(server, &ctx, shared) {
                return Ok(s);
            }
            // Shared mode has one carrier: the first requests wait for it to start
            // rather than each start one.
            let _one_at_a_time = shared.then(|| server.modern.shared_start.locked());
            if let Some(s) = shared.then(|| Pool::take(server, &ctx, shared)).flatten() {
                return Ok(s);
            }
            let s = start_carrier(server, ctx)?;
            let mut pool = server.modern.pool.locked();
            let mut st = carrier_of(&s).state.locked();
            if st.ended {
                // Its child ended as it started (`carrier_ended` ran before this).
                drop(st);
                drop(pool);
                return Err(Refusal::ChildNotStarted(
                    "The server process ended as it started".into(),
                )
                .into());
            }
            st.leased = true;
            drop(st);
            pool.carriers.push(s.clone());
            Ok(s)
        }

        /// An idle carrier of this token and --pass-header values (shared: the one).
        fn take(server: &Server, ctx: &crate::auth::Context, shared: bool) -> Option<Arc<Session>> {
            let pool = server.modern.pool.locked();
            for s in &pool.carriers {
                if !crate::auth::owns(&s.owner, &ctx.owner) || s.env != ctx.env {
                    continue;
                }
                let mut st = carrier_of(s).state.locked();
                if !st.ended && (shared || (!st.leased && st.draining.is_none())) {
                    st.leased = true;
                    st.idle_since = None;
                    drop(st);
                    s.mark_request();
                    return Some(s.clone());
                }
            }
            None
        }
    }

    fn start_carrier(
        server: &Arc<Server>,
        ctx: crate::auth::Context,
    ) -> Result<Arc<Session>, Reply> {
        let session = match sessions::create(server, Transport::Modern, ctx) {
            Ok(s) => s,
            Err(sessions::CreateError::Refused(reply)) => return Err(reply),
            Err(sessions::CreateError::Spawn(msg)) => {
                return Err(Refusal::ChildNotStarted(msg).into())
            }
        };
        if child_era(server) == ChildEra::Modern {
            return Ok(session);
        }
        let init = json!({"jsonrpc": "2.0", "method": "initialize", "params": {
            "protocolVersion": CHILD_VERSION,
            "capabilities": relayed_capabilities(),
            "clientInfo": {"name": "stdio-sse", "version": env!("CARGO_PKG_VERSION")}}});
        match internal_call(&session, init, INIT_TIMEOUT) {
            Some(answer) if answer.pointer("/result/protocolVersion").is_some() => {
                let result = answer["result"].clone();
                carrier_of(&session).state.locked().capabilities =
                    result.get("capabilities").cloned().unwrap_or(json!({}));
                server
                    .modern
                    .discovered
                    .locked()
                    .get_or_insert_with(|| Arc::new(result));
                let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
                if let Err(r) = session.submit(&[initialized]) {
                    return Err(r.into());
                }
                crate::log!(Info, "carrier_ready", session = session.tag; "child initialized for 2026-07-28 clients");
                Ok(session)
            }
            other => {
                let why = other
                    .and_then(|a| {
                        a.pointer("/error/message")
                            .and_then(Value::as_str)
                            .map(String::from)
                    })
                    .unwrap_or_else(|| "no answer to initialize".into());
                sessions::end(&session, EndReason::InitializeFailed);
                Err(Refusal::ChildNotStarted(format!(
                    "The server process refused initialize: {why}"
                ))
                .into())
            }
        }
    }

    /// A request of the bridge's own to a carrier's child; its answer, or None when the
    /// child gave none within `wait` (or ended).
    fn internal_call(session: &Arc<Session>, mut message: Value, wait: Duration) -> Option<Value> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let id = crate::next_id();
        message["id"] = id.into();
        let method = message["method"].as_str().unwrap_or("").to_string();
        let call = Call::internal(id, method);
        call.st.locked().sink = Some(tx);
        carrier_of(session).state.locked().calls.insert(id, call);
        if session.submit(&[message]).is_err() {
            return None;
        }
        match rx.recv_timeout(wait) {
            Ok(Out::Final { json, .. }) => serde_json::from_str(&json).ok(),
            _ => {
                carrier_of(session).state.locked().calls.remove(&id);
                None
            }
        }
    }

    impl Carrier {
        /// A call is waiting on its client that could carry the child's question.
        pub fn can_receive(&self) -> bool {
            self.state
                .locked()
                .calls
                .values()
                .any(|c| MAY_ASK.contains(&c.method.as_str()) && c.st.locked().sink.is_some())
        }

        /// Serving nothing: no call, no listener, not leased (eviction may end it).
        pub fn unused(&self) -> bool {
            let st = self.state.locked();
            !st.leased && st.calls.is_empty() && st.listeners == 0 && st.subscriptions.is_empty()
        }

        /// Session mode: a carrier with no call (and nothing draining) goes back to the
        /// pool.
        fn release_if_idle_locked(st: &mut CarrierState) {
            if st.calls.values().all(|c| c.kind != CallKind::Client)
                && st.draining.is_none()
                && crate::app().cfg.mode != config::Mode::Shared
            {
                st.leased = false;
                st.idle_since.get_or_insert_with(Instant::now);
            }
        }
    }

    fn release_if_idle(carrier: &Session) {
        Carrier::release_if_idle_locked(&mut carrier_of(carrier).state.locked());
    }

    // ---- calls ------------------------------------------------------------------------

    /// What reaches the HTTP request waiting for a call.
    enum Out {
        /// A notification about the call (progress, a log line).
        Note(String),
        /// The child asked for input: gather what else it asks at once, then park.
        Asked,
        /// Its answer: the result (or `input_required`), or an error.
        Final { json: String, status: u16 },
    }

    /// One client call on a carrier's child; lives across MRTR retries.
    struct Call {
        /// The id the child sees (and its progress token there).
        id: u64,
        method: String,
        name: Option<String>,
        owner: Option<Arc<str>>,
        caps: Value,
        log_level: Option<usize>,
        kind: CallKind,
        st: Mutex<CallState>,
    }

    /// Whose a call is, which decides how its answer goes and what it holds.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum CallKind {
        /// A client's call: answered decorated, under the client's id; it holds its
        /// carrier (session mode) and is the call a log line belongs to.
        Client,
        /// The bridge's own request (a carrier's initialize, a subscription): its answer
        /// goes back raw, or nowhere.
        Internal,
        /// A modern child's listen: long-lived, it neither holds its carrier from other
        /// calls nor counts as the one call a log line belongs to.
        Listen,
    }

    struct CallState {
        /// The id of the HTTP request answering now (a retry brings a new one).
        client_id: Value,
        /// The client's progress token on that request.
        token: Option<Value>,
        /// The request waiting for the call, when one is.
        sink: Option<Sender<Out>>,
        /// The child's requests for input not yet answered.
        asks: Vec<Ask>,
        /// Notifications that arrived while the call was parked.
        buffered: Vec<Out>,
        /// The answer (and its status), when it came while the call was parked: its id
        /// is the retry's, set when it goes out.
        answer: Option<(Value, u16)>,
        /// An "asked" signal is in the waiting request's queue.
        signalled: bool,
        /// Bumped at each `input_required`: a `requestState` is good for one retry.
        serial: u64,
        parked_at: Option<Instant>,
        next_key: u64,
        done: bool,
        /// The carrier session it runs on.
        carrier: Option<Arc<Session>>,
    }

    /// A request of the child's for input from the client.
    struct Ask {
        key: String,
        child_id: Value,
        method: String,
        params: Value,
        since: Instant,
    }

    impl Call {
        /// A request of the bridge's own, `method`, under `id` on the child.
        fn internal(id: u64, method: String) -> Arc<Call> {
            let mut call = Call::new(id, method, None, &None, json!({}), None, Value::Null, None);
            Arc::get_mut(&mut call).expect("not shared yet").kind = CallKind::Internal;
            call
        }

        #[allow(clippy::too_many_arguments)]
        fn new(
            id: u64,
            method: String,
            name: Option<String>,
            owner: &Option<Arc<str>>,
            caps: Value,
            log_level: Option<usize>,
            client_id: Value,
            token: Option<Value>,
        ) -> Arc<Call> {
            let kind = if method == "subscriptions/listen" {
                CallKind::Listen
            } else {
                CallKind::Client
            };
            Arc::new(Call {
                id,
                kind,
                method,
                name,
                owner: owner.clone(),
                caps,
                log_level,
                st: Mutex::new(CallState {
                    client_id,
                    token,
                    sink: None,
                    asks: Vec::new(),
                    buffered: Vec::new(),
                    answer: None,
                    signalled: false,
                    serial: 0,
                    parked_at: None,
                    next_key: 0,
                    done: false,
                    carrier: None,
                }),
            })
        }

        /// The call's answer: to the request waiting for it, under that request's id,
        /// or kept for the retry when the call is parked.
        fn answer(cs: &mut CallState, mut answer: Value, status: u16) {
            match &cs.sink {
                Some(tx) => {
                    answer["id"] = cs.client_id.clone();
                    let _ = tx.send(Out::Final {
                        json: answer.to_string(),
                        status,
                    });
                }
                None => cs.answer = Some((answer, status)),
            }
        }

        /// Hands a notification (or an internal call's answer) to the request waiting
        /// for the call, or keeps it for the retry when the call is parked.
        fn deliver(&self, out: Out) {
            let mut st = self.st.locked();
            if let Some(tx) = &st.sink {
                let sent = match out {
                    Out::Note(json) => note(tx, json),
                    other => tx.send(other).is_ok(),
                };
                if !sent {
                    st.sink = None;
                }
                return;
            }
            if st.buffered.len() < PARKED_NOTES_MAX || matches!(out, Out::Final { .. }) {
                st.buffered.push(out);
            } else {
                crate::app().metrics.dropped("parked_overflow");
                crate::log!(Debug, "message_dropped", "a notification for a parked call is dropped: {PARKED_NOTES_MAX} already wait for its retry");
            }
        }
    }

    /// The queue between the child's router and the request answering a call (or a
    /// listener). Unbounded in its type (a bounded one allocates its whole capacity per
    /// call) and bounded by `note`: --stream-queue events of notifications; the answer
    /// and the one "asked" signal are never dropped.
    fn queue() -> (Sender<Out>, Receiver<Out>) {
        crossbeam_channel::unbounded()
    }

    /// A notification for a client: dropped (logged, counted) when its queue already
    /// holds --stream-queue events, a client not reading; the router never waits for
    /// one client. False when the request is gone.
    fn note(tx: &Sender<Out>, json: String) -> bool {
        if tx.len() >= crate::app().cfg.stream_queue.0 {
            crate::app().metrics.dropped("client_not_reading");
            crate::log!(Debug, "message_dropped", "a 2026-07-28 client is not reading its stream (--stream-queue full); a notification is dropped");
            return true;
        }
        !matches!(
            tx.try_send(Out::Note(json)),
            Err(crossbeam_channel::TrySendError::Disconnected(_))
        )
    }

    /// All parked calls, by the id the child sees.
    static PARKED: Mutex<Option<HashMap<u64, Arc<Call>>>> = Mutex::new(None);

    fn parked_insert(call: &Arc<Call>) {
        PARKED
            .locked()
            .get_or_insert_with(HashMap::new)
            .insert(call.id, call.clone());
    }
    fn parked_remove(id: u64) -> Option<Arc<Call>> {
        PARKED.locked().as_mut().and_then(|m| m.remove(&id))
    }

    /// A call to the child: a fresh one, or the retry of a parked one (`requestState`).
    fn call(inc: Incoming, request: Request) {
        if let Some(state) = request
            .params
            .get("requestState")
            .filter(|_| child_era(inc.server()) == ChildEra::Legacy)
        {
            let state = state.as_str().unwrap_or("").to_string();
            return resume(inc, request, &state);
        }
        let carrier = match Pool::lease(&inc) {
            Ok(c) => c,
            Err(reply) => return respond(inc, Reply::answering(&request.id, refusal_of(reply))),
        };
        let id = crate::next_id();
        let token = token_of(&request.params);
        let name = name_of(&request.method, &request.params).map(String::from);
        let Request {
            id: client_id,
            method,
            mut params,
            caps,
            log_level,
        } = request;
        let call = Call::new(
            id,
            method.clone(),
            name,
            &inc.token,
            caps,
            log_level,
            client_id.clone(),
            token.clone(),
        );
        if child_era(&carrier.server) == ChildEra::Legacy {
            strip_envelope(&mut params);
        }
        if token.is_some() {
            params["_meta"]["progressToken"] = id.into();
        }
        let message = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let (tx, rx) = queue();
        {
            let mut cs = call.st.locked();
            cs.sink = Some(tx);
            cs.carrier = Some(carrier.clone());
        }
        {
            let mut st = carrier_of(&carrier).state.locked();
            st.calls.insert(id, call.clone());
            // Requests for input that waited for a call able to carry them (M-6).
            if MAY_ASK.contains(&call.method.as_str()) {
                let (fit, rest): (Vec<Ask>, Vec<Ask>) = std::mem::take(&mut st.held)
                    .into_iter()
                    .partition(|a| missing_capability(&call.caps, &a.method, &a.params).is_none());
                st.held = rest;
                if !fit.is_empty() {
                    let mut cs = call.st.locked();
                    for a in fit {
                        add_ask(&call, &mut cs, a);
                    }
                    park(&call, &mut cs);
                }
            }
        }
        if let Err(r) = carrier.submit(&[message]) {
            carrier_of(&carrier).state.locked().calls.remove(&id);
            return respond(inc, Reply::answering(&client_id, r));
        }
        if call.kind == CallKind::Listen {
            crate::app().metrics.modern_call("listen");
            release_if_idle(&carrier);
        }
        wait_for_call(inc, call, rx);
    }

    /// A Reply's refusal back from a lease failure: its status and words, as a refusal
    /// answering the request (lease refusals are capacity and spawn failures).
    fn refusal_of(reply: Reply) -> Refusal {
        let why = reply.message().unwrap_or_default();
        match reply.status {
            503 => Refusal::ModernUnavailable(why),
            400 => Refusal::ModernEnvelope(why),
            _ => Refusal::ChildNotStarted(why),
        }
    }

    /// The envelope is for the bridge: a legacy child gets the params without it.
    fn strip_envelope(params: &mut Value) {
        if let Some(meta) = params.get_mut("_meta").and_then(Value::as_object_mut) {
            meta.retain(|k, _| !k.starts_with(META_PREFIX));
            if meta.is_empty() {
                params.as_object_mut().map(|p| p.remove("_meta"));
            }
        }
        if let Some(p) = params.as_object_mut() {
            p.remove("inputResponses");
            p.remove("requestState");
        }
    }

    /// Waits for what the child says about a call and answers with it: JSON when the
    /// answer comes first, else an SSE stream of notifications and then the answer. A
    /// client that closes the connection first cancels the call (M-8).
    fn wait_for_call(inc: Incoming, call: Arc<Call>, rx: Receiver<Out>) {
        let conn = inc.conn;
        let mut inc = Some(inc);
        let mut stream: Option<crate::sse::SseStream> = None;
        let keepalive = crate::app().cfg.keepalive;
        let mut last_write = Instant::now();
        let mut gathering = false;
        // A call in progress is its carrier's activity: the idle reaper leaves it be.
        let carrier = call.st.locked().carrier.clone();
        loop {
            let wait = if gathering {
                INPUT_GATHER
            } else {
                HANGUP_CHECK
            };
            match rx.recv_timeout(wait) {
                Ok(Out::Asked) => gathering = true,
                Err(RecvTimeoutError::Timeout) if gathering => {
                    gathering = false;
                    let mut cs = call.st.locked();
                    cs.signalled = false;
                    if !cs.done && !cs.asks.is_empty() && cs.sink.is_some() {
                        park(&call, &mut cs);
                    }
                }
                Ok(Out::Final { json, status }) => {
                    if json.contains(INPUT_REQUIRED) {
                        crate::observe::request_mrtr("parked");
                    }
                    match (stream.take(), inc.take()) {
                        (Some(mut s), _) => {
                            let _ = s.event(Some("message"), &json);
                            let _ = s.finish();
                        }
                        (None, Some(inc)) => {
                            respond(inc, Reply::text(status, "application/json", json))
                        }
                        (None, None) => {}
                    }
                    return;
                }
                Ok(Out::Note(json)) => {
                    // A call whose child keeps talking (progress every 100 ms) may never
                    // reach the quiet branch below: its carrier is busy, not idle.
                    if let Some(c) = &carrier {
                        c.touch();
                    }
                    if stream.is_none() {
                        let Some(i) = inc.take() else { return };
                        crate::observe::response_status(200);
                        match crate::http::open_sse(i, Vec::new(), Lifetime::Request) {
                            Ok(s) => stream = Some(s),
                            Err(_) => return abandon(&call, "the client's connection failed"),
                        }
                    }
                    if let Some(s) = &mut stream {
                        if s.event(Some("message"), &json).is_err() {
                            return abandon(&call, "the client closed its stream");
                        }
                        last_write = Instant::now();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if crate::door::hung_up(conn) {
                        return abandon(&call, "the client closed its stream");
                    }
                    if let Some(c) = &carrier {
                        c.touch();
                    }
                    if let (Some(s), Some(k)) = (&mut stream, keepalive) {
                        if last_write.elapsed() >= k {
                            if s.comment("keepalive").is_err() {
                                return abandon(&call, "the client closed its stream");
                            }
                            last_write = Instant::now();
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Parked by the router (its input_required went out as Final first)
                    // or the carrier ended (a Final said so): nothing more comes here.
                    if let Some(i) = inc.take() {
                        respond(
                            i,
                            Reply::answering(
                                &Value::Null,
                                Refusal::ChildNotAccepting(
                                    "the call ended without an answer".into(),
                                ),
                            ),
                        );
                    }
                    return;
                }
            }
        }
    }

    /// The client left a call (M-8): the child is told to cancel it, its questions are
    /// answered with an error, and nothing more is sent for it.
    fn abandon(call: &Arc<Call>, why: &str) {
        let app = crate::app();
        let (carrier, asks, answered) = {
            let mut cs = call.st.locked();
            let answered = std::mem::replace(&mut cs.done, true);
            cs.sink = None;
            (cs.carrier.clone(), std::mem::take(&mut cs.asks), answered)
        };
        parked_remove(call.id);
        let Some(carrier) = carrier else { return };
        let mut out = Vec::new();
        if !answered {
            {
                let mut st = carrier_of(&carrier).state.locked();
                if st.calls.remove(&call.id).is_some()
                    && carrier.server.spec.mode != config::Mode::Shared
                    && call.kind != CallKind::Listen
                {
                    st.draining = Some((call.id, Instant::now()));
                }
            }
            app.metrics.modern_call("cancelled");
            crate::log!(Info, "modern_cancelled", session = carrier.tag; "{} cancelled: {why}; telling the child", call.method);
            out.push(
                json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": call.id, "reason": why}}),
            );
        }
        // Its open questions (its own, or held ones it carried) get an error answer.
        for a in asks {
            out.push(json!({"jsonrpc": "2.0", "id": a.child_id,
                "error": {"code": -32000, "message": format!("The client did not answer ({why})")}}));
        }
        if !out.is_empty() {
            let _ = carrier.submit(&out);
        }
    }

    // ---- MRTR (M-5, M-6) --------------------------------------------------------------

    /// The client capability a request for input needs, when the call lacks it.
    fn missing_capability(caps: &Value, method: &str, params: &Value) -> Option<Value> {
        let need = match method {
            "elicitation/create" => {
                let mode = params.get("mode").and_then(Value::as_str).unwrap_or("form");
                let has = caps.get("elicitation").is_some_and(|e| {
                    // `elicitation: {}` means form mode (the 2025-11-25 reading).
                    e.get(mode).is_some() || (mode == "form" && e.get("url").is_none())
                });
                return (!has).then(|| json!({"elicitation": {mode: {}}}));
            }
            "sampling/createMessage" => "sampling",
            "roots/list" => "roots",
            _ => return None,
        };
        caps.get(need).is_none().then(|| json!({need: {}}))
    }

    fn add_ask(call: &Arc<Call>, cs: &mut CallState, mut a: Ask) {
        cs.next_key += 1;
        let short = a.method.split('/').next().unwrap_or("input");
        a.key = format!("{short}-{}", cs.next_key);
        let _ = call;
        cs.asks.push(a);
    }

    /// Answers the waiting request with `input_required` naming every open question, and
    /// parks the call until the retry.
    fn park(call: &Arc<Call>, cs: &mut CallState) {
        cs.serial += 1;
        cs.parked_at = Some(Instant::now());
        let requests: serde_json::Map<String, Value> = cs
            .asks
            .iter()
            .map(|a| {
                (
                    a.key.clone(),
                    json!({"method": a.method, "params": a.params}),
                )
            })
            .collect();
        let mut result = json!({"resultType": "input_required", "inputRequests": requests,
            "requestState": request_state(call.id, cs.serial)});
        if let Some(carrier) = &cs.carrier {
            decorate(&carrier.server, &call.method, &mut result);
        }
        if let Some(r) = result.as_object_mut() {
            r.remove("ttlMs");
            r.remove("cacheScope");
        }
        let answer = json!({"jsonrpc": "2.0", "id": cs.client_id, "result": result});
        if let Some(tx) = cs.sink.take() {
            let _ = tx.send(Out::Final {
                json: answer.to_string(),
                status: 200,
            });
        }
        parked_insert(call);
        crate::app().metrics.modern_call("parked");
    }

    /// The child asked for input during (or between) calls.
    fn child_asks(session: &Arc<Session>, id: &Value, method: &str, value: &Value) {
        let app = crate::app();
        let params = value.get("params").cloned().unwrap_or(json!({}));
        let ask = Ask {
            key: String::new(),
            child_id: id.clone(),
            method: method.to_string(),
            params: params.clone(),
            since: Instant::now(),
        };
        let mut st = carrier_of(session).state.locked();
        let able: Vec<Arc<Call>> = st
            .calls
            .values()
            .filter(|c| MAY_ASK.contains(&c.method.as_str()) && !c.st.locked().done)
            .cloned()
            .collect();
        // A call answering now, before a parked one: a client may never come back for a
        // parked call, and its questions were all asked before it parked.
        let live: Vec<&Arc<Call>> = able
            .iter()
            .filter(|c| c.st.locked().sink.is_some())
            .collect();
        let draining = st.draining.is_some();
        let call = match (live.len(), able.len()) {
            (1, _) => live[0].clone(),
            (0, 1) => able[0].clone(),
            (0, 0) if draining => {
                // About the call a client just cancelled: nobody to ask.
                drop(st);
                return refuse_ask(session, id, method, "its call was cancelled");
            }
            (0, 0) => {
                crate::log!(Info, "input_held", session = session.tag; "the child asked {method} with no call to carry it; held for the next call that can (--input-ttl)");
                st.held.push(ask);
                return;
            }
            _ => {
                drop(st);
                app.metrics.dropped("input_ambiguous");
                crate::log!(Warn, "input_refused", session = session.tag; "the child asked {method} while {} calls were in flight on it; answering with an error (whose call it is cannot be told)", able.len());
                let answer = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32000,
                    "message": "The bridge cannot tell which client this request is for"}});
                let _ = session.submit(&[answer]);
                return;
            }
        };
        drop(st);
        if let Some(required) = missing_capability(&call.caps, method, &params) {
            return refuse_capability(session, &call, id, method, required);
        }
        let mut cs = call.st.locked();
        if cs.done {
            drop(cs);
            return refuse_ask(session, id, method, "its call has ended");
        }
        add_ask(&call, &mut cs, ask);
        // The request waiting for the call gathers what else the child asks at once,
        // then parks the call (`wait_for_call`): one signal in its queue.
        if cs.sink.is_some() && !std::mem::replace(&mut cs.signalled, true) {
            if let Some(tx) = &cs.sink {
                let _ = tx.try_send(Out::Asked);
            }
        }
        // Parked already: the retry sees this question unanswered and is asked again.
    }

    /// A question of the child's that no client will be asked: answered with an error
    /// at once, so the child does not wait.
    fn refuse_ask(session: &Arc<Session>, id: &Value, method: &str, why: &str) {
        crate::app().metrics.dropped("input_refused");
        crate::log!(Info, "input_refused", session = session.tag; "the child asked {method}, but {why}; answering it with an error");
        let answer = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32000,
            "message": format!("No client will answer: {why}")}});
        let _ = session.submit(&[answer]);
    }

    /// -32021 (M-5): the client did not declare what the child asks for. The child's
    /// request gets an error and the call is cancelled on it.
    fn refuse_capability(
        session: &Arc<Session>,
        call: &Arc<Call>,
        id: &Value,
        method: &str,
        required: Value,
    ) {
        let refusal = Refusal::MissingCapability {
            method: method.to_string(),
            required: required.clone(),
        };
        let answer = json!({"jsonrpc": "2.0", "id": null, "error": {
            "code": refusal.code(), "message": refusal.message(), "data": refusal.data()}});
        let parked = {
            let mut cs = call.st.locked();
            Call::answer(&mut cs, answer, refusal.status());
            cs.parked_at.is_some()
        };
        crate::log!(Info, "input_refused", session = session.tag; "the child asked {method}, which the client did not declare: -32021");
        let _ = session.submit(
            &[json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32000,
            "message": format!("The client does not support {method}")}})],
        );
        abandon(call, "the client lacks a capability the server asked for");
        if parked {
            // Its retry is answered with the refusal (M-5), not "no such call".
            parked_insert(call);
        }
    }

    /// A retry (M-5): the `requestState` checked, each answer fed to the child as the
    /// reply to its request, then the call is waited for again on this request.
    fn resume(inc: Incoming, request: Request, state: &str) {
        let refuse = |inc: Incoming, why: String| {
            respond(
                inc,
                Reply::answering(&request.id, Refusal::BadRequestState(why)),
            )
        };
        let (id, serial) = match check_request_state(state) {
            Ok(v) => v,
            Err(why) => return refuse(inc, why),
        };
        let Some(call) = PARKED.locked().as_ref().and_then(|m| m.get(&id).cloned()) else {
            return refuse(inc, "names no parked call (the call completed, was cancelled, or waited past --input-ttl)".into());
        };
        let name = name_of(&request.method, &request.params);
        if !crate::auth::owns(&call.owner, &inc.token)
            || call.method != request.method
            || call.name.as_deref() != name
        {
            return refuse(inc, "belongs to another call".into());
        }
        let responses = request
            .params
            .get("inputResponses")
            .cloned()
            .unwrap_or(json!({}));
        let (tx, rx) = queue();
        let (carrier, answers) = {
            let mut cs = call.st.locked();
            if cs.serial != serial || cs.parked_at.is_none() {
                drop(cs);
                return refuse(
                    inc,
                    "was already used (a requestState is good for one retry)".into(),
                );
            }
            if id_key(&cs.client_id) == id_key(&request.id) {
                drop(cs);
                return refuse(
                    inc,
                    "came back with the request id it was issued for (a retry must use a new id)"
                        .into(),
                );
            }
            let mut answers = Vec::new();
            let mut open = Vec::new();
            for a in std::mem::take(&mut cs.asks) {
                match responses.get(&a.key) {
                    Some(r) => answers.push(answer_to_child(&a.child_id, r)),
                    None => open.push(a),
                }
            }
            cs.asks = open;
            cs.client_id = request.id.clone();
            cs.token = token_of(&request.params);
            cs.sink = Some(tx);
            cs.parked_at = None;
            crate::observe::request_mrtr("resumed");
            crate::app().metrics.modern_call("resumed");
            if !cs.asks.is_empty() {
                // Partial answers: ask again for the rest (M-5).
                park(&call, &mut cs);
            } else {
                parked_remove(call.id);
                let buffered = std::mem::take(&mut cs.buffered);
                if let Some(tx) = &cs.sink {
                    for out in buffered {
                        if let Out::Note(json) = out {
                            note(tx, json);
                        }
                    }
                }
                if let Some((answer, status)) = cs.answer.take() {
                    Call::answer(&mut cs, answer, status);
                }
            }
            (cs.carrier.clone(), answers)
        };
        if let Some(c) = carrier {
            if !answers.is_empty() {
                let _ = c.submit(&answers);
            }
        }
        wait_for_call(inc, call, rx);
    }

    /// A client's input response as the JSON-RPC reply to the child's request: an
    /// error object passes as an error, anything else is the result.
    fn answer_to_child(child_id: &Value, response: &Value) -> Value {
        match response.get("error").filter(|e| e.get("code").is_some()) {
            Some(e) => json!({"jsonrpc": "2.0", "id": child_id, "error": e}),
            None => json!({"jsonrpc": "2.0", "id": child_id, "result": response}),
        }
    }

    // ---- requestState: HMAC-SHA-256 with a per-process key ----------------------------

    fn state_key() -> &'static [u8; 32] {
        static KEY: OnceLock<[u8; 32]> = OnceLock::new();
        KEY.get_or_init(|| {
            let mut k = [0u8; 32];
            let n = unsafe { libc::getrandom(k.as_mut_ptr().cast(), k.len(), 0) };
            if n != k.len() as isize {
                use std::io::Read;
                if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                    let _ = f.read_exact(&mut k);
                }
            }
            k
        })
    }

    fn unix_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// `v1.CALL.SERIAL.EXPIRES.MAC`: which parked call, which of its retries, until
    /// when (unix ms), and the MAC over all of it. Opaque to clients.
    fn request_state(call: u64, serial: u64) -> String {
        let expires = unix_ms() + crate::app().cfg.input_ttl.as_millis() as u64;
        let body = format!("v1.{call}.{serial}.{expires}");
        let mac = hmac_sha256(state_key(), body.as_bytes());
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        format!("{body}.{hex}")
    }

    fn check_request_state(s: &str) -> Result<(u64, u64), String> {
        let (body, mac) = s.rsplit_once('.').ok_or("is not one this server issued")?;
        let want = hmac_sha256(state_key(), body.as_bytes());
        let hex: String = want.iter().map(|b| format!("{b:02x}")).collect();
        if !crate::auth::ct_eq(hex.as_bytes(), mac.as_bytes()) {
            return Err("was altered, or not issued by this server".into());
        }
        let parts: Vec<&str> = body.split('.').collect();
        let num = |i: usize| parts.get(i).and_then(|p| p.parse::<u64>().ok());
        match (parts.first(), num(1), num(2), num(3)) {
            (Some(&"v1"), Some(call), Some(serial), Some(expires)) => {
                if unix_ms() > expires {
                    return Err("has expired (--input-ttl)".into());
                }
                Ok((call, serial))
            }
            _ => Err("is not one this server issued".into()),
        }
    }

    pub fn sha256(data: &[u8]) -> [u8; 32] {
        const K: [u32; 64] = [
            0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
            0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
            0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
            0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
            0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
            0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
            0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
            0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
            0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
            0xc67178f2,
        ];
        let mut h: [u32; 8] = [
            0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
            0x5be0cd19,
        ];
        let mut msg = data.to_vec();
        let bits = (data.len() as u64).wrapping_mul(8);
        msg.push(0x80);
        while msg.len() % 64 != 56 {
            msg.push(0);
        }
        msg.extend_from_slice(&bits.to_be_bytes());
        for block in msg.chunks(64) {
            let mut w = [0u32; 64];
            for i in 0..16 {
                w[i] = u32::from_be_bytes([
                    block[4 * i],
                    block[4 * i + 1],
                    block[4 * i + 2],
                    block[4 * i + 3],
                ]);
            }
            for i in 16..64 {
                let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
                let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
                w[i] = w[i - 16]
                    .wrapping_add(s0)
                    .wrapping_add(w[i - 7])
                    .wrapping_add(s1);
            }
            let mut v = h;
            for i in 0..64 {
                let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
                let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
                let t1 = v[7]
                    .wrapping_add(s1)
                    .wrapping_add(ch)
                    .wrapping_add(K[i])
                    .wrapping_add(w[i]);
                let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
                let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
                let t2 = s0.wrapping_add(maj);
                v = [
                    t1.wrapping_add(t2),
                    v[0],
                    v[1],
                    v[2],
                    v[3].wrapping_add(t1),
                    v[4],
                    v[5],
                    v[6],
                ];
            }
            for i in 0..8 {
                h[i] = h[i].wrapping_add(v[i]);
            }
        }
        let mut out = [0u8; 32];
        for (i, x) in h.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
        }
        out
    }

    pub fn hmac_sha256(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
        let mut ipad = vec![0x36u8; 64];
        let mut opad = vec![0x5cu8; 64];
        for (i, k) in key.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        ipad.extend_from_slice(data);
        opad.extend_from_slice(&sha256(&ipad));
        sha256(&opad)
    }

    // ---- the child's messages on a carrier --------------------------------------------

    /// Everything a carrier's child says (already in the carrier's ids: a shared child's
    /// were mapped back by `upstream`). `aside`: a shared child's notification while
    /// other sessions had work in flight (it cannot be tied to a call here).
    pub fn from_child(session: &Arc<Session>, json: String, value: &Value, aside: bool) {
        let app = crate::app();
        match classify(value) {
            Kind::Response { id } => {
                let Some(cid) = id.as_u64() else {
                    app.metrics.dropped("unknown_id");
                    return;
                };
                let call = {
                    let mut st = carrier_of(session).state.locked();
                    let call = st.calls.remove(&cid);
                    if call.is_none() && st.draining.is_some_and(|(d, _)| d == cid) {
                        st.draining = None;
                    }
                    Carrier::release_if_idle_locked(&mut st);
                    call
                };
                let Some(call) = call else {
                    app.metrics.dropped("cancelled");
                    crate::log!(Debug, "message_dropped", session = session.tag; "answer to call {cid}, which was cancelled or ended");
                    return;
                };
                if call.kind == CallKind::Internal {
                    return call.deliver(Out::Final { json, status: 200 });
                }
                let mut cs = call.st.locked();
                if cs.done {
                    return;
                }
                cs.done = true;
                // The common case, a plain result to a request waiting for it: the
                // child's own text, spliced.
                let spliced = cs
                    .sink
                    .as_ref()
                    .zip(value.get("result"))
                    .and_then(|(tx, r)| {
                        spliced_answer(&session.server, &json, &cs.client_id, &call.method, r)
                            .map(|text| (tx, text))
                    });
                if let Some((tx, text)) = spliced {
                    let _ = tx.send(Out::Final {
                        json: text,
                        status: 200,
                    });
                    app.metrics.modern_call("complete");
                    return;
                }
                let mut answer = value.clone();
                answer["id"] = cs.client_id.clone();
                if let Some(r) = answer.get_mut("result") {
                    if let Some(sub) = r
                        .get_mut("_meta")
                        .and_then(|m| m.get_mut(META_SUBSCRIPTION))
                    {
                        *sub = cs.client_id.clone();
                    }
                    decorate(&session.server, &call.method, r);
                }
                // -32000..-32019 mean something else in 2026-07-28 (M-2).
                if let Some(code) = answer.get_mut("error").and_then(|e| e.get_mut("code")) {
                    if code
                        .as_i64()
                        .is_some_and(|c| (-32019..=-32000).contains(&c))
                    {
                        *code = json!(-32603);
                    }
                }
                let status = status_of(&session.server, &answer);
                app.metrics
                    .modern_call(if status == 200 { "complete" } else { "error" });
                Call::answer(&mut cs, answer, status);
                // A parked call keeps its open questions (some may be held ones it
                // carries, which the child still waits for) until the retry or the TTL.
                if cs.parked_at.is_none() {
                    drop(cs);
                    parked_remove(call.id);
                }
            }
            Kind::Request { id, method } => match method {
                "ping" => {
                    let _ = session.submit(&[json!({"jsonrpc": "2.0", "id": id, "result": {}})]);
                }
                "elicitation/create" | "sampling/createMessage" | "roots/list"
                    if child_era(&session.server) == ChildEra::Legacy =>
                {
                    child_asks(session, id, method, value)
                }
                _ => {
                    app.metrics.dropped("unrelayable_request");
                    crate::log!(Warn, "message_dropped", session = session.tag; "the child sent {method}, which cannot reach a 2026-07-28 client; answering it with an error");
                    let _ = session.submit(&[
                        json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601,
                        "message": format!("{method} cannot be relayed to a 2026-07-28 client")}}),
                    ]);
                }
            },
            Kind::Notification { method } => notification(session, method, json, value, aside),
            Kind::Invalid(why) => {
                app.metrics.dropped("invalid");
                crate::log!(Warn, "child_invalid", session = session.tag; "skipped a child message that is not JSON-RPC ({why})");
            }
        }
    }

    fn notification(
        session: &Arc<Session>,
        method: &str,
        json: String,
        value: &Value,
        aside: bool,
    ) {
        let app = crate::app();
        let st = carrier_of(session).state.locked();
        // A modern child's listen stream: its notifications name the listen by the id
        // the child saw (M-10).
        let listen = value
            .get("params")
            .and_then(|p| crate::message::at(p, &["_meta", META_SUBSCRIPTION]))
            .and_then(Value::as_u64)
            .and_then(|id| st.calls.get(&id).cloned());
        if let Some(call) = listen {
            drop(st);
            let mut v = value.clone();
            v["params"]["_meta"][META_SUBSCRIPTION] = call.st.locked().client_id.clone();
            return call.deliver(Out::Note(v.to_string()));
        }
        match method {
            "notifications/progress" => {
                let call = value
                    .get("params")
                    .and_then(|p| p.get("progressToken"))
                    .and_then(Value::as_u64)
                    .and_then(|t| st.calls.get(&t).cloned());
                drop(st);
                let Some(call) = call else {
                    app.metrics.dropped("no_call");
                    return;
                };
                let token = call.st.locked().token.clone();
                let mut v = value.clone();
                v["params"]["progressToken"] = token.unwrap_or(Value::Null);
                call.deliver(Out::Note(v.to_string()));
            }
            "notifications/message" => {
                // Tied to a call only when it is the one thing in flight (M-9).
                let mut foreground = st.calls.values().filter(|c| c.kind == CallKind::Client);
                let sole = match (foreground.next(), foreground.next()) {
                    (Some(c), None) if !aside && st.draining.is_none() => Some(c.clone()),
                    _ => None,
                };
                drop(st);
                let Some(call) = sole else {
                    app.metrics.dropped("log_unattributed");
                    crate::log!(Debug, "message_dropped", session = session.tag; "a log message from the child concerns no single 2026-07-28 call");
                    return;
                };
                let level = value
                    .pointer("/params/level")
                    .and_then(Value::as_str)
                    .and_then(|l| LOG_LEVELS.iter().position(|x| *x == l))
                    .unwrap_or(0);
                if call.log_level.is_some_and(|min| level >= min) {
                    call.deliver(Out::Note(json));
                }
            }
            m if m.ends_with("/list_changed") || m == "notifications/resources/updated" => {
                drop(st);
                to_listeners(session, method, value);
            }
            _ => {
                drop(st);
                app.metrics.dropped("modern_unrelayed");
                crate::log!(Debug, "message_dropped", session = session.tag; "{method} from the child has no 2026-07-28 counterpart");
            }
        }
    }

    /// The carrier's session ended (child exit, idle, shutdown): every call on it gets
    /// the error the session's clients get.
    pub fn carrier_ended(session: &Arc<Session>, code: i64, message: &str, data: Option<Value>) {
        let (calls, held) = {
            let mut st = carrier_of(session).state.locked();
            st.ended = true;
            (std::mem::take(&mut st.calls), std::mem::take(&mut st.held))
        };
        let _ = held;
        // 2025's -32000 (idle, shutdown) is a legacy code: a modern client gets -32603.
        let code = if (-32019..=-32000).contains(&code) {
            -32603
        } else {
            code
        };
        for (_, call) in calls {
            let mut cs = call.st.locked();
            if cs.done {
                continue;
            }
            cs.done = true;
            let answer = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message, "data": data}});
            // A parked call stays parked: its retry gets this answer.
            Call::answer(&mut cs, answer, 200);
            cs.sink = None;
        }
        let pool = &session.server.modern.pool;
        pool.locked().carriers.retain(|s| !Arc::ptr_eq(s, session));
        let mut listeners = LISTENERS.locked();
        listeners.retain(|l| {
            let mine = Arc::ptr_eq(&l.carrier, session);
            if mine {
                let _ = l.tx.try_send(Out::Final {
                    json: l.farewell(),
                    status: 200,
                });
            }
            !mine
        });
    }

    // ---- subscriptions/listen (M-7) ---------------------------------------------------

    struct Listener {
        id: Value,
        carrier: Arc<Session>,
        owner: Option<Arc<str>>,
        /// The honoured subset, as acknowledged.
        tools: bool,
        prompts: bool,
        resources: bool,
        uris: Vec<String>,
        tx: Sender<Out>,
    }

    impl Listener {
        fn farewell(&self) -> String {
            json!({"jsonrpc": "2.0", "id": self.id, "result": {"resultType": "complete",
                "_meta": {META_SUBSCRIPTION: self.id}}})
            .to_string()
        }
    }

    static LISTENERS: Mutex<Vec<Arc<Listener>>> = Mutex::new(Vec::new());
    /// Listener streams being written, for shutdown's farewell.
    static LISTENING: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

    fn listen(inc: Incoming, request: Request) {
        if child_era(inc.server()) == ChildEra::Modern {
            // The child keeps its own subscriptions: the listen passes through as a
            // call that does not hold its carrier.
            return call(inc, request);
        }
        let carrier = match Pool::lease(&inc) {
            Ok(c) => c,
            Err(reply) => return respond(inc, Reply::answering(&request.id, refusal_of(reply))),
        };
        // The listener keeps the carrier's child running; calls may still use it.
        carrier_of(&carrier).state.locked().listeners += 1;
        release_if_idle(&carrier);
        let caps = carrier_of(&carrier).state.locked().capabilities.clone();
        let modern_child = child_era(inc.server()) == ChildEra::Modern;
        let wants = request
            .params
            .get("notifications")
            .cloned()
            .unwrap_or(json!({}));
        let wanted = |k: &str| wants.get(k).and_then(Value::as_bool).unwrap_or(false);
        let declares =
            |p: &str| modern_child || caps.pointer(p).and_then(Value::as_bool).unwrap_or(false);
        let tools = wanted("toolsListChanged") && declares("/tools/listChanged");
        let prompts = wanted("promptsListChanged") && declares("/prompts/listChanged");
        let resources = wanted("resourcesListChanged") && declares("/resources/listChanged");
        let uris: Vec<String> = if declares("/resources/subscribe") {
            wants
                .get("resourceSubscriptions")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|u| u.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut honoured = serde_json::Map::new();
        if tools {
            honoured.insert("toolsListChanged".into(), json!(true));
        }
        if prompts {
            honoured.insert("promptsListChanged".into(), json!(true));
        }
        if resources {
            honoured.insert("resourcesListChanged".into(), json!(true));
        }
        if !uris.is_empty() {
            honoured.insert("resourceSubscriptions".into(), json!(uris));
        }
        let (tx, rx) = queue();
        let listener = Arc::new(Listener {
            id: request.id.clone(),
            carrier: carrier.clone(),
            owner: inc.token.clone(),
            tools,
            prompts,
            resources,
            uris: uris.clone(),
            tx,
        });
        subscribe(&carrier, &uris, "resources/subscribe");
        LISTENERS.locked().push(listener.clone());
        *LISTENING.0.locked() += 1;
        crate::app().metrics.modern_call("listen");
        crate::observe::response_status(200);
        let ack = json!({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
            "params": {"_meta": {META_SUBSCRIPTION: request.id}, "notifications": honoured}});
        let conn = inc.conn;
        if let Ok(mut stream) = crate::http::open_sse(inc, Vec::new(), Lifetime::Request) {
            let keepalive = crate::app().cfg.keepalive;
            let mut last_write = Instant::now();
            let mut ok = stream.event(Some("message"), &ack.to_string()).is_ok();
            while ok {
                match rx.recv_timeout(HANGUP_CHECK) {
                    Ok(Out::Asked) => {}
                    Ok(Out::Note(json)) => {
                        ok = stream.event(Some("message"), &json).is_ok();
                        last_write = Instant::now();
                    }
                    Ok(Out::Final { json, .. }) => {
                        let _ = stream.event(Some("message"), &json);
                        let _ = stream.finish();
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if crate::door::hung_up(conn) {
                            break;
                        }
                        // A listener keeps its carrier's child (and its subscriptions)
                        // from the idle reaper.
                        carrier.touch();
                        if keepalive.is_some_and(|k| last_write.elapsed() >= k) {
                            ok = stream.comment("keepalive").is_ok();
                            last_write = Instant::now();
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        let was_listed = {
            let mut all = LISTENERS.locked();
            let before = all.len();
            all.retain(|l| !Arc::ptr_eq(l, &listener));
            before != all.len()
        };
        if was_listed {
            subscribe(&carrier, &uris, "resources/unsubscribe");
            crate::log!(Info, "listen_closed", session = carrier.tag; "listener {} closed its stream", listener.id);
        }
        {
            let mut st = carrier_of(&carrier).state.locked();
            st.listeners = st.listeners.saturating_sub(1);
        }
        let (count, cv) = &LISTENING;
        *count.locked() -= 1;
        cv.notify_all();
    }

    /// Reference-counted resource subscriptions on a carrier's child (M-7): the first
    /// listener on a URI subscribes, the last one gone unsubscribes.
    fn subscribe(carrier: &Arc<Session>, uris: &[String], method: &str) {
        let mut to_child = Vec::new();
        {
            let mut st = carrier_of(carrier).state.locked();
            for uri in uris {
                let n = st.subscriptions.entry(uri.clone()).or_insert(0);
                let send = if method == "resources/subscribe" {
                    *n += 1;
                    *n == 1
                } else {
                    *n = n.saturating_sub(1);
                    *n == 0
                };
                if *n == 0 {
                    st.subscriptions.remove(uri);
                }
                if send {
                    let id = crate::next_id();
                    st.calls.insert(id, Call::internal(id, method.into()));
                    to_child.push(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": {"uri": uri}}));
                }
            }
        }
        if !to_child.is_empty() {
            let _ = carrier.submit(&to_child);
        }
    }

    fn to_listeners(session: &Arc<Session>, method: &str, value: &Value) {
        let uri = value.pointer("/params/uri").and_then(Value::as_str);
        let listeners: Vec<Arc<Listener>> = LISTENERS.locked().clone();
        let shared = session.server.spec.mode == config::Mode::Shared;
        let mut delivered = 0;
        for l in listeners {
            if l.carrier.server.name != session.server.name {
                continue;
            }
            // Session mode: a change any child of this token reports (they run one
            // program); shared: the listener's own carrier (another carrier on the same
            // child would report the same change twice).
            let hears = if shared {
                Arc::ptr_eq(&l.carrier, session)
            } else {
                crate::auth::owns(&l.owner, &session.owner)
            };
            if !hears {
                continue;
            }
            let wanted = match method {
                "notifications/tools/list_changed" => l.tools,
                "notifications/prompts/list_changed" => l.prompts,
                "notifications/resources/list_changed" => l.resources,
                "notifications/resources/updated" => {
                    Arc::ptr_eq(&l.carrier, session)
                        && uri.is_some_and(|u| l.uris.iter().any(|x| x == u))
                }
                _ => false,
            };
            if !wanted {
                continue;
            }
            let mut v = value.clone();
            tag_subscription(&mut v, &l.id);
            let _ = note(&l.tx, v.to_string());
            delivered += 1;
        }
        if delivered == 0 {
            crate::log!(Debug, "message_dropped", session = session.tag; "{method}: no 2026-07-28 client listens for it");
        }
    }

    /// Puts the listen's id in a notification's `params._meta` (M-7), whatever the child
    /// put there: a `params` or `_meta` that is not an object is replaced.
    fn tag_subscription(v: &mut Value, id: &Value) {
        if !v.get("params").is_some_and(Value::is_object) {
            v["params"] = json!({});
        }
        let params = &mut v["params"];
        if !params.get("_meta").is_some_and(Value::is_object) {
            params["_meta"] = json!({});
        }
        params["_meta"][META_SUBSCRIPTION] = id.clone();
    }

    /// Shutdown: every listener gets its final result (M-7) before the process ends.
    pub fn farewell() {
        let listeners: Vec<Arc<Listener>> = std::mem::take(&mut *LISTENERS.locked());
        for l in &listeners {
            let _ = l.tx.try_send(Out::Final {
                json: l.farewell(),
                status: 200,
            });
        }
        let (count, cv) = &LISTENING;
        let deadline = Instant::now() + LISTENER_FAREWELL;
        let mut n = count.locked();
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = cv
                .wait_timeout(n, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    // ---- housekeeping -----------------------------------------------------------------

    /// Parked calls past --input-ttl are cancelled on the child (their questions
    /// answered with an error); held questions past it are answered with an error;
    /// carriers draining a cancelled call too long, and surplus idle carriers, retire.
    pub fn run_housekeeper() {
        let app = crate::app();
        loop {
            std::thread::sleep(HOUSEKEEPING);
            let ttl = app.cfg.input_ttl;
            // Taken out of PARKED first: a call's lock is never taken under PARKED
            // (`resume` takes them the other way round).
            let parked: Vec<Arc<Call>> = PARKED
                .locked()
                .as_ref()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            for call in parked {
                let (waited, carrier) = {
                    let cs = call.st.locked();
                    (cs.parked_at.map(|t| t.elapsed()), cs.carrier.clone())
                };
                match waited {
                    Some(w) if w > ttl => {
                        app.metrics.modern_call("expired");
                        crate::log!(Info, "input_expired", "a parked {} waited past --input-ttl ({ttl:?}) for its retry; cancelling it on the child", call.method);
                        abandon(&call, "the client did not retry within --input-ttl");
                    }
                    // A call waiting for its client keeps its child from the idle reaper.
                    Some(_) => {
                        if let Some(c) = carrier {
                            c.touch();
                        }
                    }
                    None => {}
                }
            }
            for server in crate::servers::live() {
                tend_carriers(&server, ttl);
            }
            crate::servers::prune_retired();
        }
    }

    /// One server's carriers: stale held questions answered, drained and surplus idle
    /// carriers retired (all of them once the server is retired).
    fn tend_carriers(server: &Server, ttl: Duration) {
        let app = crate::app();
        {
            let carriers = server.modern.pool.locked().carriers.clone();
            let mut idle = 0;
            for s in carriers.iter().rev() {
                let (stale, retire) = {
                    let mut st = carrier_of(s).state.locked();
                    let (old, keep): (Vec<Ask>, Vec<Ask>) = std::mem::take(&mut st.held)
                        .into_iter()
                        .partition(|a| a.since.elapsed() > ttl);
                    st.held = keep;
                    // A child that never answers a cancelled call (the spec lets it stay
                    // silent) has had its quiet time: its carrier serves again.
                    if st.draining.is_some_and(|(_, t)| t.elapsed() > CANCEL_DRAIN) {
                        st.draining = None;
                        Carrier::release_if_idle_locked(&mut st);
                    }
                    let unused = !st.leased && st.calls.is_empty() && st.listeners == 0;
                    if unused && st.idle_since.is_some() {
                        idle += 1;
                    }
                    let surplus = unused
                        && st.subscriptions.is_empty()
                        && (server.retired()
                            || st.idle_since.is_some_and(|t| t.elapsed() > SURPLUS_IDLE)
                                && idle > app.cfg.modern_pool);
                    // Decided and marked under the lock: `Pool::take` skips it from now on.
                    if surplus {
                        st.ended = true;
                    }
                    (old, surplus)
                };
                if !stale.is_empty() {
                    let answers: Vec<Value> = stale.iter().map(|a| json!({"jsonrpc": "2.0", "id": a.child_id,
                        "error": {"code": -32000, "message": "No 2026-07-28 call carried this request to a client within --input-ttl"}})).collect();
                    app.metrics.dropped("input_unasked");
                    crate::log!(Info, "input_expired", session = s.tag; "{} request(s) of the child found no call to carry them; answered with an error", answers.len());
                    let _ = s.submit(&answers);
                }
                if retire {
                    crate::log!(Info, "carrier_retired", session = s.tag; "surplus idle carrier (over --modern-pool)");
                    sessions::end_in_background(s.clone(), EndReason::Idle);
                }
            }
        }
    }

    // ---- --child-protocol auto ---------------------------------------------------------

    /// Asks a throw-away child `server/discover` with the envelope: a result naming
    /// 2026-07-28 means a modern child; anything else (an error, silence, an exit)
    /// legacy. Run once at startup.
    pub fn probe_child_era(server: &Arc<Server>) {
        if server.spec.child_protocol != ChildEra::Auto {
            return;
        }
        let era = probe(server).unwrap_or(ChildEra::Legacy);
        crate::log!(
            Info,
            "child_protocol",
            server = server.name; "--child-protocol auto: the server speaks {}",
            if era == ChildEra::Modern {
                "2026-07-28 (bodies pass through)"
            } else {
                "2025 (modern clients are served by translation)"
            }
        );
        let _ = server.modern.era.set(era);
    }

    fn probe(server: &Arc<Server>) -> Option<ChildEra> {
        use std::io::BufRead;
        let tag = format!("{}probe", server.tag_prefix());
        let (child, stdout) = crate::child::spawn(server, &tag, Vec::new()).ok()?;
        let discover = json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": {
            META_VERSION: VERSIONS[0], META_CAPABILITIES: {}}}});
        let (tx, rx) = crossbeam_channel::bounded(1);
        let sent = child.send_message(&discover).is_ok();
        let reader = crate::spawn_thread("probe-read", move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = if sent && reader {
            rx.recv_timeout(PROBE_TIMEOUT).ok()
        } else {
            None
        };
        child.terminate(Duration::ZERO);
        let v: Value = serde_json::from_str(line?.trim()).ok()?;
        let modern = v
            .pointer("/result/supportedVersions")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(VERSIONS[0])));
        Some(if modern {
            ChildEra::Modern
        } else {
            ChildEra::Legacy
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn sha256_and_hmac_match_the_published_vectors() {
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            assert_eq!(
                hex(&sha256(b"abc")),
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            );
            assert_eq!(
                hex(&sha256(b"")),
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            );
            let long = vec![b'a'; 1000];
            assert_eq!(
                hex(&sha256(&long)),
                "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
            );
            // RFC 4231 test case 2 uses a 4-byte key; ours are 32 bytes, zero-padded the same way.
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(b"Jefe");
            assert_eq!(
                hex(&hmac_sha256(&key, b"what do ya want for nothing?")),
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
            );
        }

        #[test]
        fn mirrored_headers_decode_the_base64_form() {
            assert_eq!(decode_header("echo").as_deref(), Some("echo"));
            assert_eq!(
                decode_header("=?base64?ZWNobw==?=").as_deref(),
                Some("echo")
            );
            assert_eq!(decode_header("=?base64?w6l0w6k?=").as_deref(), Some("été"));
            assert_eq!(decode_header("=?base64?***?="), None);
        }

        #[test]
        fn missing_capabilities_are_named() {
            let caps = json!({"sampling": {}, "elicitation": {}});
            assert!(missing_capability(&caps, "sampling/createMessage", &json!({})).is_none());
            assert!(missing_capability(&caps, "elicitation/create", &json!({})).is_none());
            assert_eq!(
                missing_capability(&caps, "elicitation/create", &json!({"mode": "url"})),
                Some(json!({"elicitation": {"url": {}}}))
            );
            assert_eq!(
                missing_capability(&caps, "roots/list", &json!({})),
                Some(json!({"roots": {}}))
            );
        }
    }
}

// ======================================================================================
/// One-shot mode: each request runs the child once: body in as one line, stdin closed,
/// every stdout line out as an SSE `data:` event until the child exits. A client that
/// leaves takes the child's whole process group with it.
/// Owns: its in-flight count (--max-sessions). Touches: `child` directly (a one-shot
/// request has no session), `http`, `sse` framing. Rules: OS-1..OS-3, ST-1, ST-7.
mod oneshot {
    use super::*;
    use crate::app;
    use crate::child::ChildProc;
    use crate::http::{respond, Incoming, Refusal, Reply, Wanted};
    use crossbeam_channel::RecvTimeoutError;

    static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

    pub fn post(mut inc: Incoming) {
        if let Err(reply) = crate::http::require_json(&inc) {
            return respond(inc, reply);
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
            return respond(inc, Refusal::OneShotQueryRequired.into());
        };
        if request.len() > app().cfg.max_body {
            return respond(
                inc,
                Reply::from(Refusal::BodyTooLarge {
                    declared: None,
                    limit: app().cfg.max_body,
                }),
            );
        }
        run(inc, request.as_bytes());
    }

    fn run(inc: Incoming, body: &[u8]) {
        if let Err(reply) = crate::http::require_accept(&inc, Wanted::EventStream) {
            return respond(inc, reply);
        }
        // Any JSON, compacted to one line (ST-1, ST-6): the program reads lines.
        let value = match crate::http::parse_body(body) {
            Ok(v) => v,
            Err(reply) => return respond(inc, reply),
        };
        crate::observe::request_messages(std::slice::from_ref(&value));
        let app = app();
        let server = inc.server().clone();
        let limit = server.spec.max_sessions;
        if server.oneshot_active.fetch_add(1, Ordering::AcqRel) >= limit {
            server.oneshot_active.fetch_sub(1, Ordering::AcqRel);
            let refusal = Refusal::TooManyInFlight { limit };
            app.metrics.rejected(refusal.reason());
            return respond(inc, refusal.into());
        }
        struct Slot(Arc<crate::servers::Server>);
        impl Drop for Slot {
            fn drop(&mut self) {
                self.0.oneshot_active.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _slot = Slot(server.clone());
        let tag = format!("os-{}", NEXT_TAG.fetch_add(1, Ordering::Relaxed));
        crate::observe::request_session(&tag);
        let (tx, rx) = crossbeam_channel::bounded::<Option<String>>(app.cfg.stream_queue.0);
        let stall = app.cfg.stall_timeout;
        if let Some(answer) = crate::servers::hidden_call(&server, &value) {
            return respond(inc, Reply::json(200, answer));
        }
        // The server's tool filter holds here too: a tools/list answer is filtered on
        // its way out (other lines pass untouched).
        let filter = (value.get("method").and_then(serde_json::Value::as_str)
            == Some("tools/list"))
        .then(|| server.clone());
        let env = match crate::auth::context(&inc) {
            Ok(ctx) => ctx.env,
            Err(reply) => return respond(inc, reply),
        };
        let secrets = env.clone();
        use crate::observe::tap;
        tap::record(
            tap::Direction::ClientToBridge,
            &tag,
            &server.name,
            tap::Message::Value(&value),
            &secrets,
        );
        let (tap_tag, tap_server) = (tag.clone(), server.name.clone());
        let on_line = move |line: String| {
            let line = match &filter {
                Some(server) => crate::message::parse(line.as_bytes())
                    .ok()
                    .and_then(|v| crate::servers::filter_tool_list(server, &v))
                    .map_or(line, |v| v.to_string()),
                None => line,
            };
            tap::record(
                tap::Direction::BridgeToClient,
                &tap_tag,
                &tap_server,
                tap::Message::Line(&line),
                &secrets,
            );
            if tx.send_timeout(Some(line), stall).is_err() {
                app.metrics.dropped("client_gone");
            }
        };
        let child = match crate::child::spawn(&server, &tag, env) {
            Ok((c, stdout)) => {
                // The reader's end drops the sender: the stream sees the channel close.
                crate::child::start_reader(&c, stdout, Box::new(on_line), Box::new(|| {}));
                c
            }
            Err(msg) => {
                let id = value.get("id").cloned().unwrap_or(serde_json::Value::Null);
                return respond(inc, Reply::answering(&id, Refusal::ChildNotStarted(msg)));
            }
        };
        if let Err(e) = child.send_message(&value) {
            // The program exited before reading; its exit status and stderr follow on
            // the stream.
            crate::log!(
                Info,
                "oneshot_input_lost",
                session = tag; "could not write the request to the program: {e}"
            );
        }
        child.close_stdin();
        crate::observe::response_status(200);
        // The head goes at once: the client sees the stream open while the program starts.
        let stream = crate::http::open_sse(inc, Vec::new(), crate::http::Lifetime::Request)
            .and_then(|mut s| s.flush().map(|_| s));
        let delivered = stream.and_then(|s| stream_output(s, &rx, &child));
        if delivered.is_err() {
            crate::log!(
                Info,
                "oneshot_client_gone",
                session = tag; "client disconnected; ending the child's process group"
            );
            child.kill_now(app.cfg.shutdown_grace);
        }
    }

    fn stream_output(
        mut stream: crate::sse::SseStream,
        rx: &crossbeam_channel::Receiver<Option<String>>,
        child: &Arc<ChildProc>,
    ) -> std::io::Result<()> {
        let keepalive = app().cfg.keepalive.unwrap_or(config::KEEPALIVE_OFF_WAKE);
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
                "error": format!("the program {}", child.ended(&status)),
                "limit": child.limit_hit().map(|(l, _)| l.label()),
                "exit_code": status.code(),
                "signal": std::os::unix::process::ExitStatusExt::signal(&status),
                "stderr": child.final_stderr_tail(),
            });
            stream.event(Some("error"), &detail.to_string())?;
        }
        stream.finish()
    }
}

// ======================================================================================
/// JSON-RPC message shapes: classifying a message and building error responses. Pure
/// functions over serde_json values.
/// Owns: what a message is (`Kind`), which ids MCP allows, error bodies, the JSON depth
/// check. Touches: nothing. Rules: P-11, ST-1, ST-10.
mod message {
    use serde_json::Value;

    pub enum Kind<'a> {
        Request { id: &'a Value, method: &'a str },
        Notification { method: &'a str },
        Response { id: &'a Value },
        Invalid(&'static str),
    }

    /// The largest id magnitude a child of its own sees from a client: 2^53 - 1, the
    /// largest integer that every JSON implementation a child may be written in
    /// (JavaScript's numbers among them) reads and writes back exactly. An id the child
    /// re-renders differently (`1e3`, `1.5`, a longer integer) would never match its
    /// request: its answer would be dropped and the client's request wait for ever.
    pub const MAX_SAFE_ID: u64 = (1 << 53) - 1;

    /// Who has to give a client's id back.
    #[derive(Clone, Copy, PartialEq)]
    pub enum IdCarrier {
        /// The child itself (session mode): integers within ±MAX_SAFE_ID.
        Child,
        /// The bridge (shared mode rewrites ids and keeps the client's): any 64-bit
        /// integer comes back exactly.
        Bridge,
    }

    /// MCP request ids are strings or integers (JSON-RPC allows fractions, MCP does not).
    /// Checked on what clients send; the child's own ids are its business.
    pub fn id_allowed(id: &Value, carrier: IdCarrier) -> bool {
        match id {
            Value::String(_) => true,
            Value::Number(n) if carrier == IdCarrier::Bridge => n.is_i64() || n.is_u64(),
            Value::Number(n) => n
                .as_i64()
                .map(|i| i.unsigned_abs())
                .or(n.as_u64())
                .is_some_and(|m| m <= MAX_SAFE_ID),
            _ => false,
        }
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
        at(v, &["params", "_meta", "progressToken"])
    }

    /// The value at a path of object keys. `Value::pointer` parses its string and
    /// allocates per segment: this is for the per-message paths.
    pub fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
        path.iter().try_fold(v, |v, k| v.get(*k))
    }

    /// Parses JSON from a client or the child. Nesting is checked first, without
    /// recursion: serde_json recurses per level, and our threads have small stacks.
    pub fn parse(bytes: &[u8]) -> Result<Value, String> {
        let limit = crate::app().cfg.max_json_depth;
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in bytes {
            if in_string {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return Err(format!(
                            "nested deeper than {limit} levels (--max-json-depth)"
                        ));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    pub fn error_response(id: &Value, code: i64, message: &str, data: Option<Value>) -> String {
        let mut error = serde_json::json!({"code": code, "message": message});
        if let Some(d) = data {
            error["data"] = d;
        }
        serde_json::json!({"jsonrpc": "2.0", "id": id, "error": error}).to_string()
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use serde_json::json;

        #[test]
        fn messages_are_classified_by_shape() {
            let kinds = [
                (
                    json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
                    "request",
                ),
                (
                    json!({"jsonrpc": "2.0", "method": "notifications/x"}),
                    "notification",
                ),
                (
                    json!({"jsonrpc": "2.0", "id": "a", "result": {}}),
                    "response",
                ),
                (
                    json!({"jsonrpc": "2.0", "id": 1, "error": {"code": 1}}),
                    "response",
                ),
                (
                    json!({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}}),
                    "invalid",
                ),
                (
                    json!({"jsonrpc": "1.0", "id": 1, "method": "ping"}),
                    "invalid",
                ),
                (
                    json!({"jsonrpc": "2.0", "id": [1], "method": "ping"}),
                    "invalid",
                ),
                (json!({"jsonrpc": "2.0", "method": 7}), "invalid"),
                (json!([1, 2]), "invalid"),
            ];
            for (v, want) in kinds {
                let got = match classify(&v) {
                    Kind::Request { .. } => "request",
                    Kind::Notification { .. } => "notification",
                    Kind::Response { .. } => "response",
                    Kind::Invalid(_) => "invalid",
                };
                assert_eq!(got, want, "{v}");
            }
        }

        #[test]
        fn ids_must_come_back_exactly() {
            let ok = |v: Value, c| id_allowed(&v, c);
            assert!(ok(json!("x"), IdCarrier::Child));
            assert!(ok(json!(MAX_SAFE_ID), IdCarrier::Child));
            assert!(ok(json!(-(MAX_SAFE_ID as i64)), IdCarrier::Child));
            assert!(!ok(json!(MAX_SAFE_ID + 1), IdCarrier::Child));
            assert!(ok(json!(MAX_SAFE_ID + 1), IdCarrier::Bridge));
            assert!(ok(json!(u64::MAX), IdCarrier::Bridge));
            for c in [IdCarrier::Child, IdCarrier::Bridge] {
                assert!(!ok(json!(1.5), c));
                assert!(!ok(serde_json::from_str("1e3").unwrap(), c));
                assert!(!ok(json!(null), c));
            }
            assert_ne!(id_key(&json!(1)), id_key(&json!("1")));
        }
    }
}

// ======================================================================================
/// Sessions and message routing: the registry of live sessions; each session's streams
/// (a POST's stream, the GET stream) as logical streams that outlive their connections;
/// the replay buffer that lets a client resume a stream (R-3, R-4); the router that puts
/// each child message on exactly one stream (R-2); idle expiry and session ending.
/// Touches `upstream` to reach the child and hands frames to `sse` writers.
/// Owns: `Session`, `Registry`, streams, the replay buffer, the router, backpressure
/// (`Link`). Touches: `upstream` (the child side), `sse` (frames to writers), `observe`.
/// Rules: S-1..S-7, R-2..R-5, G-6, P-5..P-8, RB-8.
mod sessions {
    use super::*;
    use crate::http::{Refusal, Reply};
    use crate::message::{classify, id_key, Kind};
    use crate::servers::Server;
    use crate::upstream::Upstream;
    use crossbeam_channel::{Receiver, Sender};
    use serde_json::Value;
    use std::collections::{HashMap, HashSet, VecDeque};
    use std::sync::Mutex;

    /// The idle reaper looks a quarter of --session-idle-timeout apart, within these.
    const REAPER_TICK_MIN: Duration = Duration::from_millis(50);
    const REAPER_TICK_MAX: Duration = Duration::from_secs(1);
    /// A router waiting for a client to read is woken by each write it takes, and
    /// re-reads the socket's progress at most this far apart near its deadline.
    const ROOM_RECHECK_MIN: Duration = Duration::from_millis(10);

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Transport {
        Streamable,
        Legacy,
        /// A carrier: a child serving 2026-07-28 calls (`modern`); no client names it.
        Modern,
        /// A merged-endpoint session's session on one of the servers (`merged`): its
        /// messages come from and go to the merged server, never to a stream.
        Member,
    }

    /// One event on its way to a connection. Its SSE id is `{stream}-{n}`: `n` counts
    /// events across the session, so ids are unique in the session and name their stream.
    pub struct Frame {
        pub stream: u64,
        pub n: u64,
        pub json: Arc<str>,
        /// The response that completes a POST stream; the writer ends the stream after it.
        pub last: bool,
    }

    pub fn event_id(stream: u64, n: u64) -> String {
        format!("{stream}-{n}")
    }

    fn parse_event_id(s: &str) -> Option<(u64, u64)> {
        let (stream, n) = s.trim().split_once('-')?;
        Some((stream.parse().ok()?, n.parse().ok()?))
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum StreamKind {
        /// A POST's stream: ends after the responses to its requests.
        Post,
        /// The GET stream (or the legacy stream): lives as long as the session.
        Listener,
    }

    /// Shared by a connection's queue and its writer.
    pub struct Link {
        /// Frames sent and not yet taken by the writer, and their bytes (the bound is
        /// --stream-queue).
        queued: AtomicUsize,
        queued_bytes: AtomicUsize,
        /// Frames the writer has taken: it takes the next ones only once its last
        /// write went out, so this moving is the socket draining.
        taken: AtomicU64,
        /// When `taken` last moved (crate::now_ms).
        progress_ms: AtomicU64,
        /// Set when the connection is detached from its stream (its client stopped
        /// reading, or resumed the stream on a new connection): the writer ends the HTTP
        /// response and leaves the stream to the replay buffer.
        pub cut: AtomicBool,
        /// The writer has ended.
        closed: AtomicBool,
        /// The router waits here for the writer to make room (backpressure).
        waiters: AtomicUsize,
        room: Mutex<()>,
        room_changed: std::sync::Condvar,
    }

    /// What waiting for a congested connection came to.
    #[derive(PartialEq, Debug)]
    enum Room {
        /// Below its bound again, or the connection is gone (nothing to wait for).
        Made,
        /// Its socket took nothing for the allowed time: the client is not reading.
        NotReading,
    }

    impl Default for Link {
        fn default() -> Link {
            Link {
                queued: AtomicUsize::new(0),
                queued_bytes: AtomicUsize::new(0),
                taken: AtomicU64::new(0),
                progress_ms: AtomicU64::new(crate::now_ms()),
                cut: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                waiters: AtomicUsize::new(0),
                room: Mutex::new(()),
                room_changed: std::sync::Condvar::new(),
            }
        }
    }

    impl Link {
        fn push(&self, bytes: usize) {
            self.queued.fetch_add(1, Ordering::AcqRel);
            self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        }

        /// The writer took a frame of `bytes` off the queue.
        pub fn take(&self, bytes: usize) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.taken.fetch_add(1, Ordering::AcqRel);
            self.progress_ms.store(crate::now_ms(), Ordering::Release);
            if self.waiters.load(Ordering::Acquire) > 0 {
                let _g = self.room.locked();
                self.room_changed.notify_all();
            }
        }

        /// The writer has ended: nobody waits for it any more.
        pub fn close(&self) {
            self.closed.store(true, Ordering::Release);
            let _g = self.room.locked();
            self.room_changed.notify_all();
        }

        /// Over `factor` times --stream-queue, in events or bytes.
        fn over(&self, factor: usize) -> bool {
            let (events, bytes) = crate::app().cfg.stream_queue;
            self.queued.load(Ordering::Acquire) > events.saturating_mul(factor)
                || self.queued_bytes.load(Ordering::Acquire) > bytes.saturating_mul(factor)
        }

        fn gone(&self) -> bool {
            self.closed.load(Ordering::Acquire) || self.cut.load(Ordering::Acquire)
        }

        /// How long the socket has taken nothing (the writer took no frame).
        fn idle(&self) -> Duration {
            let last = self.progress_ms.load(Ordering::Acquire);
            Duration::from_millis(crate::now_ms().saturating_sub(last))
        }

        /// Backpressure: waits while the queue is over its bound and the writer keeps
        /// taking frames; NotReading once it has taken none for `patience`. A writer
        /// that has not written its first frame yet is given its own --stall-timeout
        /// (it ends by itself then): a stream is never cut before its first event, so
        /// the client always has an id to resume from.
        fn wait_for_room(&self, patience: Duration) -> Room {
            self.waiters.fetch_add(1, Ordering::AcqRel);
            let mut g = self.room.locked();
            let verdict = loop {
                if !self.over(1) || self.gone() {
                    break Room::Made;
                }
                let idle = self.idle();
                if idle >= patience && self.taken.load(Ordering::Acquire) > 0 {
                    break Room::NotReading;
                }
                let step = patience.saturating_sub(idle).max(ROOM_RECHECK_MIN);
                g = self
                    .room_changed
                    .wait_timeout(g, step)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            };
            drop(g);
            self.waiters.fetch_sub(1, Ordering::AcqRel);
            verdict
        }
    }

    /// A connection attached to a logical stream.
    struct Conn {
        id: u64,
        tx: Sender<Frame>,
        link: Arc<Link>,
    }

    /// How a stream writer's connection ended: with the POST stream's last response
    /// written and the response ended cleanly (nothing to keep for a resume), or not.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Delivery {
        Whole,
        Partial,
    }

    /// What a stream writer needs to start.
    pub struct Attached {
        pub stream: u64,
        pub conn_id: u64,
        pub kind: StreamKind,
        pub rx: Receiver<Frame>,
        pub link: Arc<Link>,
        /// Events to write before anything from the queue (a resume, or messages that
        /// waited for a GET stream).
        pub replay: Vec<Frame>,
        /// The priming event's id (R-5): sessions at 2025-11-25 or later.
        pub priming: Option<String>,
        /// The `retry:` value to send with the first event (R-5, G-5).
        pub retry_ms: Option<u128>,
        /// A POST stream that already ended and has nothing left to replay.
        pub finished: bool,
    }

    struct Stream {
        kind: StreamKind,
        conn: Option<Conn>,
        /// Requests on this POST stream not yet answered.
        open: usize,
        /// Its last response has been emitted.
        done: bool,
        /// Its first and last events' numbers (0: none yet).
        first_event: u64,
        last_event: u64,
        /// Highest event number of this stream evicted from the replay buffer.
        evicted: u64,
    }

    struct Event {
        stream: u64,
        n: u64,
        json: Arc<str>,
        last: bool,
        /// Handed to a connection at least once.
        queued: bool,
    }

    struct InFlight {
        stream: u64,
        seq: u64,
        /// When the client's request reached us: the latency histogram's start.
        since: Instant,
    }

    #[derive(Default)]
    struct Routing {
        /// Client request id key -> the stream waiting for its answer.
        in_flight: HashMap<String, InFlight>,
        /// Ids of `tools/list` requests in flight: their answers pass the tool filter.
        tool_lists: HashSet<String>,
        next_seq: u64,
        /// progressToken key -> request id key (progress reaches its request's stream).
        progress: HashMap<String, String>,
        streams: HashMap<u64, Stream>,
        listener: Option<u64>,
        next_stream: u64,
        next_event: u64,
        replay: VecDeque<Event>,
        replay_bytes: usize,
        /// Streams can be resumed (Streamable HTTP); a legacy stream is the session, so
        /// an event its connection took is never asked for again.
        resumable: bool,
        /// Ids of the server's requests sent to this client and not yet answered.
        awaiting_answer: HashSet<String>,
        /// The child's requests waiting in the replay buffer for a stream to open:
        /// (stream, id key, the child's id, since). Answered with an error by the bridge
        /// after --client-request-timeout (`expire_unsent`).
        unsent: Vec<(u64, String, Value, Instant)>,
        version: Option<String>,
        initialize_id: Option<String>,
        lost_logged: bool,
        closed: bool,
    }

    /// A stream's connection an event put over --stream-queue: the router makes room
    /// for it (`Session::make_room`) once the routing lock is let go.
    pub struct Congested(u64, Arc<Link>);

    pub struct Session {
        pub id: String,
        /// Short id for logs: full ids are bearer-like and never logged (S-10).
        pub tag: String,
        pub transport: Transport,
        /// The server it was opened on (after a reload, perhaps one since replaced).
        pub server: Arc<Server>,
        pub upstream: Arc<Upstream>,
        /// The token that created it; no other may use it.
        pub owner: Option<Arc<str>>,
        /// The --pass-header values its child was started with.
        pub env: Vec<(String, String)>,
        /// By which door it was opened (the front paths, or its server's own).
        pub door: crate::servers::Door,
        /// A carrier's 2026-07-28 state (`Transport::Modern` only).
        pub carrier: Option<Arc<crate::modern::Carrier>>,
        /// The merged server it serves (`Transport::Member` only).
        pub member: Option<crate::merged::MemberLink>,
        /// Its client, for --max-sessions-per-token.
        pub client: Option<crate::ratelimit::Client>,
        routing: Mutex<Routing>,
        last_active_ms: AtomicU64,
        /// Orders sessions by their latest request (a sequence, not a clock, so two
        /// requests in one millisecond still have an order): who a shared child's own
        /// request goes to.
        last_request: AtomicU64,
    }

    pub enum EndReason {
        Deleted,
        Idle,
        ChildGone,
        ClientGone,
        InitializeFailed,
        Shutdown,
        /// Ended for a new session at --max-sessions (`evict_one`).
        Evicted,
        /// A server session whose merged-endpoint session ended.
        MergedEnded,
        /// Its server was removed from --config by a reload.
        ServerRemoved,
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
                EndReason::Evicted => "evicted",
                EndReason::MergedEnded => "merged_session_ended",
                EndReason::ServerRemoved => "server_removed",
            }
        }
    }

    #[derive(Default)]
    pub struct Registry {
        map: Mutex<HashMap<String, Arc<Session>>>,
    }

    /// Sessions open now by transport, and what their replay buffers hold.
    #[derive(Default)]
    pub struct Stats {
        pub active: [usize; 4],
        pub replay_events: usize,
        pub replay_bytes: usize,
    }

    impl Registry {
        /// The session, if it exists on this transport and on the request's server (by
        /// name: a reload replaces a server, its sessions stay), and answers to its token.
        pub fn get(
            &self,
            id: &str,
            transport: Transport,
            inc: &crate::http::Incoming,
        ) -> Option<Arc<Session>> {
            let map = self.map.locked();
            let found = map
                .get(id)
                .filter(|s| {
                    s.transport == transport
                        && crate::servers::same_place(&s.server, s.door, inc.server(), inc.door)
                        && crate::auth::owns(&s.owner, &inc.token)
                })
                .cloned();
            if let Some(s) = &found {
                crate::observe::request_session(&s.tag);
            }
            found
        }
        pub fn all(&self) -> Vec<Arc<Session>> {
            self.map.locked().values().cloned().collect()
        }
        /// The figures /metrics shows about sessions, in one call.
        pub fn stats(&self) -> Stats {
            let mut st = Stats::default();
            for s in self.all() {
                st.active[s.transport as usize] += 1;
                let (events, bytes) = s.replay_held();
                st.replay_events += events;
                st.replay_bytes += bytes;
            }
            st
        }
        pub fn len(&self) -> usize {
            self.map.locked().len()
        }
        /// Sessions (carriers included) open on a server of this name.
        pub fn count_for(&self, server: &Server) -> usize {
            let map = self.map.locked();
            map.values()
                .filter(|s| s.server.name == server.name)
                .count()
        }
        fn remove(&self, id: &str) -> bool {
            self.map.locked().remove(id).is_some()
        }
    }

    pub enum CreateError {
        /// Capacity, or no shared child to join: the reply says which.
        Refused(Reply),
        Spawn(String),
    }

    /// Registers a session on a child: its own (session mode, from the warm pool when
    /// there is one) or the least loaded shared child. The capacity check and the insert
    /// happen under one lock so concurrent initializes cannot overshoot --max-sessions.
    pub fn create(
        server: &Arc<Server>,
        transport: Transport,
        ctx: crate::auth::Context,
    ) -> Result<Arc<Session>, CreateError> {
        let id = crate::new_session_id()
            .map_err(|e| CreateError::Spawn(format!("cannot make a session id: {e}")))?;
        create_with_id(server, transport, ctx, id)
    }

    /// `create` under an id minted earlier (a legacy stream announces its id before its
    /// session, and so its child, exists).
    pub fn create_with_id(
        server: &Arc<Server>,
        transport: Transport,
        ctx: crate::auth::Context,
        id: String,
    ) -> Result<Arc<Session>, CreateError> {
        open(server, transport, ctx, id, None)
    }

    /// A merged-endpoint session's session on one of its servers.
    pub fn create_member(
        server: &Arc<Server>,
        ctx: crate::auth::Context,
        link: crate::merged::MemberLink,
    ) -> Result<Arc<Session>, String> {
        let id = crate::new_session_id().map_err(|e| format!("cannot make a session id: {e}"))?;
        match open(server, Transport::Member, ctx, id, Some(link)) {
            Ok(s) => Ok(s),
            Err(CreateError::Spawn(why)) => Err(why),
            Err(CreateError::Refused(reply)) => Err(reply.message().unwrap_or_default()),
        }
    }

    fn open(
        server: &Arc<Server>,
        transport: Transport,
        ctx: crate::auth::Context,
        id: String,
        mut link: Option<crate::merged::MemberLink>,
    ) -> Result<Arc<Session>, CreateError> {
        let app = crate::app();
        let limit = server.spec.max_sessions;
        let full = || {
            let refusal = Refusal::TooManySessions { limit };
            app.metrics.rejected(refusal.reason());
            CreateError::Refused(refusal.into())
        };
        if server.retired() {
            // Replaced by a reload between the route and here: the new one takes it.
            return Err(CreateError::Refused(Refusal::Restarting.into()));
        }
        // A legacy session is created by the first message of a stream that announced
        // its id before the drain (a new stream is refused in `legacy::open`): it is
        // served, as an open session is.
        let client = transport == Transport::Streamable;
        if client && crate::teardown::DRAINING.load(Ordering::Acquire) {
            app.metrics.rejected(Refusal::Draining.reason());
            return Err(CreateError::Refused(Refusal::Draining.into()));
        }
        if app.sessions.count_for(server) >= limit && !evict_one(server) {
            return Err(full());
        }
        let per_client = app.cfg.rate.sessions_per_client;
        let client = ctx
            .client
            .clone()
            .filter(|_| counts_per_client(transport) && per_client > 0);
        if let Some(c) = &client {
            if held_by(c) >= per_client && !evict_own(c) {
                return Err(CreateError::Refused(
                    crate::ratelimit::session_refused(c, per_client).into(),
                ));
            }
        }
        let tag = crate::session_tag(&id);
        // A shared child can end between being picked and being joined: its sessions
        // were ended then, so this one would wait for ever. It picks again (the restarted
        // child, or a 503 once the restart takes too long).
        let (session, upstream, stdout) = loop {
            let (upstream, stdout) = if server.is_merged() {
                let merger = crate::merged::Merger::new(ctx.clone());
                (Arc::new(Upstream::merged(merger)), None)
            } else if server.spec.mode == config::Mode::Shared {
                (
                    crate::upstream::pick(server).map_err(CreateError::Refused)?,
                    None,
                )
            } else {
                let (u, out) = crate::upstream::dedicated(server, &tag, ctx.env.clone())
                    .map_err(CreateError::Spawn)?;
                (u, Some(out))
            };
            let session = Arc::new(Session {
                id: id.clone(),
                tag: tag.clone(),
                transport,
                server: server.clone(),
                upstream: upstream.clone(),
                owner: ctx.owner.clone(),
                env: ctx.env.clone(),
                door: ctx.door,
                carrier: (transport == Transport::Modern).then(Arc::default),
                member: link.take(),
                client: ctx.client.clone(),
                routing: Mutex::new(Routing {
                    resumable: transport == Transport::Streamable,
                    ..Routing::default()
                }),
                last_active_ms: AtomicU64::new(crate::now_ms()),
                last_request: AtomicU64::new(crate::next_id()),
            });
            {
                let mut map = app.sessions.map.locked();
                let of_server = map.values().filter(|s| s.server.name == server.name);
                if of_server.count() >= limit {
                    drop(map);
                    if stdout.is_some() {
                        upstream.end_own(Duration::ZERO);
                    }
                    return Err(full());
                }
                // Again under the lock: a client's initializes at once stop at its limit.
                if let Some(c) = &client {
                    if map.values().filter(|s| s.holds_for(c)).count() >= per_client {
                        drop(map);
                        if stdout.is_some() {
                            upstream.end_own(Duration::ZERO);
                        }
                        let refusal = crate::ratelimit::session_refused(c, per_client);
                        return Err(CreateError::Refused(refusal.into()));
                    }
                }
                map.insert(id.clone(), session.clone());
            }
            if server.retired() {
                // A reload retired the server while this session opened (its drain
                // may not have seen it): it ends now, as the drain would have ended it.
                app.sessions.remove(&id);
                if stdout.is_some() {
                    upstream.end_own(Duration::ZERO);
                }
                return Err(CreateError::Refused(Refusal::Restarting.into()));
            }
            if upstream.join(&session) {
                break (session, upstream, stdout);
            }
            app.sessions.remove(&id);
            crate::log!(Debug, "child_gone_before_join", session = tag; "the shared child ended as the session opened; picking another");
        };
        if let Some(stdout) = stdout {
            crate::upstream::start_router(&upstream, stdout);
        }
        if let Some(merger) = upstream.merger() {
            merger.attach(&session);
        }
        app.metrics.session_opened(transport);
        crate::observe::request_session(&tag);
        crate::log!(
            Info,
            "session_open",
            session = tag, server = server.name; "{transport:?} session opened on {}",
            match upstream.process() {
                Some(c) => format!("child pid {}", c.pid),
                None => "the merged endpoint".into(),
            }
        );
        Ok(session)
    }

    impl Session {
        /// One line of --tap for this session (its pass-header values redacted).
        pub fn tap(&self, direction: crate::observe::tap::Direction, message: &Value) {
            if !crate::observe::tap::on() {
                return;
            }
            crate::observe::tap::record(
                direction,
                &self.tag,
                &self.server.name,
                crate::observe::tap::Message::Value(message),
                &self.env,
            );
        }

        /// A hidden session carrying 2026-07-28 calls, not a client's.
        pub fn is_carrier(&self) -> bool {
            self.transport == Transport::Modern
        }

        pub fn touch(&self) {
            self.last_active_ms
                .store(crate::now_ms(), Ordering::Relaxed);
        }

        /// A request from the client: activity, and what makes it the most recent.
        pub fn mark_request(&self) {
            self.last_active_ms
                .store(crate::now_ms(), Ordering::Relaxed);
            self.last_request.store(crate::next_id(), Ordering::Relaxed);
        }

        pub fn last_request(&self) -> u64 {
            self.last_request.load(Ordering::Relaxed)
        }

        fn last_active_ms(&self) -> u64 {
            self.last_active_ms.load(Ordering::Relaxed)
        }

        pub fn idle_for(&self) -> Duration {
            Duration::from_millis(crate::now_ms().saturating_sub(self.last_active_ms()))
        }

        pub fn version(&self) -> Option<String> {
            self.routing.locked().version.clone()
        }

        pub fn set_initialize(&self, id: &Value) {
            self.routing.locked().initialize_id = Some(id_key(id));
        }

        pub fn awaits_answer(&self, key: &str) -> bool {
            self.routing.locked().awaiting_answer.contains(key)
        }

        /// A new POST stream with a connection attached, primed for clients at
        /// 2025-11-25 or later (R-5).
        pub fn open_post_stream(&self) -> Result<Attached, Reply> {
            let mut r = self.routing.locked();
            if r.closed {
                return Err(Reply::from(Refusal::SessionNotFound));
            }
            let no = r.new_stream(StreamKind::Post);
            let primed = r.primed();
            let priming = primed.then(|| {
                r.next_event += 1;
                event_id(no, r.next_event)
            });
            let mut a = r.attach(no);
            a.retry_ms = primed.then(|| crate::app().cfg.sse_retry.as_millis());
            a.priming = priming;
            Ok(a)
        }

        /// Forgets a stream whose POST failed before anything was sent to the child.
        pub fn drop_stream(&self, stream: u64) {
            self.routing.locked().streams.remove(&stream);
        }

        /// The listening stream of a legacy session (created on first use).
        pub fn listener_stream(&self) -> u64 {
            self.routing.locked().listener_stream()
        }

        /// Records which stream waits for each request before the child can answer, and
        /// checks that each response answers a request this client was sent. Returns how
        /// many requests the stream carries.
        pub fn register_requests(
            &self,
            messages: &[Value],
            stream: Option<u64>,
        ) -> Result<usize, Reply> {
            let mut r = self.routing.locked();
            if r.closed {
                return Err(Reply::from(Refusal::SessionNotFound));
            }
            let mut keys: Vec<(String, Option<String>)> = Vec::new();
            let mut answers: Vec<String> = Vec::new();
            for m in messages {
                match classify(m) {
                    Kind::Request { id, .. } => {
                        let key = id_key(id);
                        if r.in_flight.contains_key(&key) || keys.iter().any(|(k, _)| *k == key) {
                            return Err(Refusal::IdInFlight(key).into());
                        }
                        keys.push((key, crate::message::progress_token(m).map(id_key)));
                    }
                    Kind::Response { id } => {
                        let key = id_key(id);
                        if !r.awaiting_answer.contains(&key) || answers.contains(&key) {
                            return Err(Refusal::UnexpectedResponse(key).into());
                        }
                        answers.push(key);
                    }
                    _ => {}
                }
            }
            for key in &answers {
                r.awaiting_answer.remove(key);
            }
            if keys.is_empty() {
                return Ok(0);
            }
            let Some(stream) = stream else {
                return Err(Refusal::NoStreamToAnswer.into());
            };
            for (key, token) in &keys {
                let seq = r.next_seq;
                r.next_seq += 1;
                r.in_flight.insert(
                    key.clone(),
                    InFlight {
                        stream,
                        seq,
                        since: Instant::now(),
                    },
                );
                if let Some(t) = token {
                    r.progress.insert(t.clone(), key.clone());
                }
            }
            if let Some(s) = r.streams.get_mut(&stream) {
                s.open += keys.len();
            }
            Ok(keys.len())
        }

        /// A POST's messages, taken whole or refused: a stream for its requests (when it
        /// has any), the requests registered on it, the messages handed to the child.
        /// `None`: nothing to stream back (notifications and responses only: 202).
        pub fn accept_post(
            self: &Arc<Self>,
            messages: &[Value],
        ) -> Result<Option<Attached>, Reply> {
            let has_requests = messages
                .iter()
                .any(|m| matches!(classify(m), Kind::Request { .. }));
            let attached = if has_requests {
                Some(self.open_post_stream()?)
            } else {
                None
            };
            self.accept_on(messages, attached.as_ref().map(|a| a.stream))?;
            Ok(attached)
        }

        /// Messages whose answers go to `stream` (a POST's own, or the legacy session's
        /// one stream): registered, then handed to the child. A stream opened for them
        /// is dropped when they are refused.
        pub fn accept_on(
            self: &Arc<Self>,
            messages: &[Value],
            stream: Option<u64>,
        ) -> Result<(), Reply> {
            if let Err(reply) = self.register_requests(messages, stream) {
                if let Some(no) = stream {
                    self.drop_stream(no);
                }
                return Err(reply);
            }
            self.submit(messages).map_err(Reply::from)
        }

        /// Hands a client's messages to the child. A child that no longer takes input
        /// ends the session (in the background): the refusal says so, and the requests
        /// are no longer waited for.
        pub fn submit(self: &Arc<Self>, messages: &[Value]) -> Result<(), Refusal> {
            // A member session's messages come from the merged server, tapped as they
            // came in to it.
            if crate::observe::tap::on() && self.member.is_none() {
                for m in messages {
                    self.tap(crate::observe::tap::Direction::ClientToBridge, m);
                }
            }
            // Calls of tools the server's filter hides (by position), and their answers.
            let mut hidden: Vec<(usize, Value)> = Vec::new();
            let mut lists = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                match m.get("method").and_then(Value::as_str) {
                    Some("tools/call") => {
                        if let Some(answer) = crate::servers::hidden_call(&self.server, m) {
                            hidden.push((i, answer));
                        }
                    }
                    Some("tools/list") => lists.extend(m.get("id").map(id_key)),
                    _ => {}
                }
            }
            if !lists.is_empty() {
                self.routing.locked().tool_lists.extend(lists);
            }
            let sent = if hidden.is_empty() {
                self.upstream.send(self, messages)
            } else {
                let rest: Vec<Value> = messages
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !hidden.iter().any(|(h, _)| h == i))
                    .map(|(_, m)| m.clone())
                    .collect();
                self.upstream.send(self, &rest)
            };
            for (_, answer) in hidden {
                route_value(self, answer.to_string(), &answer, false);
            }
            let Err(e) = sent else {
                return Ok(());
            };
            self.forget_requests(messages);
            end_in_background(self.clone(), EndReason::ChildGone);
            Err(Refusal::ChildNotAccepting(e.to_string()))
        }

        /// The answer to a `tools/list` of this session, filtered, when the server's
        /// filter hid something (None: it goes as the child wrote it).
        fn tools_listed(&self, value: &Value) -> Option<Value> {
            // Only an answer carrying a tool list (or an error) can be one: the common
            // answer is not.
            if value.get("error").is_none() {
                value.get("result")?.get("tools")?;
            }
            let Kind::Response { id } = classify(value) else {
                return None;
            };
            let key = id_key(id);
            if !self.routing.locked().tool_lists.remove(&key) {
                return None;
            }
            crate::servers::filter_tool_list(&self.server, value)
        }

        pub fn forget_requests(&self, messages: &[Value]) {
            let mut r = self.routing.locked();
            for m in messages {
                if let Kind::Request { id, .. } = classify(m) {
                    r.in_flight.remove(&id_key(id));
                }
            }
        }

        /// Attaches a connection to the GET stream. Without `Last-Event-ID` it is the
        /// session's listening stream (409 if a connection is already on it, G-6) and it
        /// first receives what waited for it. With one, it resumes the stream the id
        /// names, wherever it began (R-4): what followed that event on that stream and
        /// nothing from any other, then live events; a connection still on that stream
        /// is ended, since the client has evidently lost it.
        pub fn attach_get(&self, last_event_id: Option<&str>) -> Result<Attached, Reply> {
            let mut r = self.routing.locked();
            if r.closed {
                return Err(Reply::from(Refusal::SessionNotFound));
            }
            let retry = r.primed().then(|| crate::app().cfg.sse_retry.as_millis());
            let Some(given) = last_event_id else {
                let no = r.listener_stream();
                if r.streams[&no].conn.is_some() {
                    return Err(Refusal::SecondGetStream.into());
                }
                let replay = r.take_replay(no, |e| !e.queued);
                let priming = (retry.is_some() && replay.is_empty()).then(|| {
                    r.next_event += 1;
                    event_id(no, r.next_event)
                });
                let mut a = r.attach(no);
                a.replay = replay;
                a.priming = priming;
                a.retry_ms = retry;
                return Ok(a);
            };
            let Some((no, n)) = parse_event_id(given) else {
                return Err(Refusal::LastEventIdMalformed(given.to_string()).into());
            };
            let Some(stream) = r.streams.get_mut(&no) else {
                return Err(Refusal::LastEventIdUnknown(given.to_string()).into());
            };
            if stream.evicted > n {
                return Err(Refusal::LastEventIdEvicted(given.to_string()).into());
            }
            if let Some(old) = stream.conn.take() {
                old.link.cut.store(true, Ordering::Release);
                crate::app().metrics.stream_cut("resumed");
                crate::log!(
                    Info,
                    "stream_resumed",
                    session = self.tag; "stream {no} resumed on a new connection; ending the old one");
            }
            let replay = r.take_replay(no, |e| e.n > n);
            let stream = &r.streams[&no];
            if stream.done && !replay.iter().any(|f| f.last) {
                // Everything this POST stream carried was already delivered.
                return Ok(Attached {
                    finished: true,
                    ..r.attach_detached(no)
                });
            }
            let mut a = r.attach(no);
            a.replay = replay;
            a.retry_ms = retry;
            Ok(a)
        }

        /// Events held for replay, and their bytes (for /metrics).
        pub fn replay_held(&self) -> (usize, usize) {
            let r = self.routing.locked();
            (r.replay.len(), r.replay_bytes)
        }

        /// After an event put its connection over --stream-queue. On a child of its own
        /// the router waits for the client to read (the child waits with it, as on a
        /// pipe) and cuts only a client whose socket took nothing for --stall-timeout. A
        /// shared child must not wait for one client: it cuts a client that took nothing
        /// for NOT_READING, or whose queue reached SHARED_QUEUE_HARD_FACTOR times the
        /// bound; a client that reads just gets a longer queue.
        pub fn make_room(&self, congested: Option<Congested>) {
            let Some(Congested(no, link)) = congested else {
                return;
            };
            let cfg = &crate::app().cfg;
            let verdict = if cfg.mode == config::Mode::Shared {
                let stalled =
                    link.idle() >= config::NOT_READING && link.taken.load(Ordering::Acquire) > 0;
                if stalled || link.over(config::SHARED_QUEUE_HARD_FACTOR) {
                    Room::NotReading
                } else {
                    Room::Made
                }
            } else {
                let patience = if cfg.stall_timeout.is_zero() {
                    config::NOT_READING_UNBOUNDED_WRITES
                } else {
                    cfg.stall_timeout
                };
                link.wait_for_room(patience)
            };
            if verdict == Room::Made || link.gone() {
                return;
            }
            let mut r = self.routing.locked();
            let Some(s) = r.streams.get_mut(&no) else {
                return;
            };
            if s.conn.as_ref().is_some_and(|c| Arc::ptr_eq(&c.link, &link)) {
                link.cut.store(true, Ordering::Release);
                s.conn = None;
                drop(r);
                crate::app().metrics.stream_cut("not_reading");
                crate::log!(Warn, "stream_cut", session = self.tag; "stream {no}: the client is not reading (its socket took nothing while {} events waited); closing the connection, events stay in the replay buffer for a resume", link.queued.load(Ordering::Acquire));
            }
        }

        /// The child's requests that waited longer than `timeout` for a stream to open:
        /// no longer awaited from the client; their ids, for the bridge's error answer.
        pub fn expire_unsent(&self, timeout: Duration) -> Vec<Value> {
            let mut r = self.routing.locked();
            if r.unsent.is_empty() {
                return Vec::new();
            }
            let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut r.unsent)
                .into_iter()
                .partition(|(.., since)| since.elapsed() >= timeout);
            r.unsent = keep;
            old.into_iter()
                .filter(|(_, key, ..)| r.awaiting_answer.remove(key))
                .map(|(_, _, id, _)| id)
                .collect()
        }

        /// A stream of this session has a connection on it (a client that can receive);
        /// for a carrier, a 2026-07-28 call is waiting that could carry a question.
        pub fn has_open_stream(&self) -> bool {
            if let Some(c) = &self.carrier {
                return c.can_receive();
            }
            if let Some(link) = &self.member {
                return link.client_can_receive();
            }
            self.routing
                .locked()
                .streams
                .values()
                .any(|s| s.conn.is_some())
        }

        /// Whether it counts against `client`'s --max-sessions-per-token.
        pub fn holds_for(&self, client: &crate::ratelimit::Client) -> bool {
            counts_per_client(self.transport) && self.client.as_ref() == Some(client)
        }

        /// How long the session has been unattended: no request in flight, no stream
        /// with a connection, no 2026-07-28 call or listener on a carrier. None while
        /// it is attended.
        pub fn unattended_for(&self) -> Option<Duration> {
            {
                let r = self.routing.locked();
                if r.closed
                    || !r.in_flight.is_empty()
                    || r.streams.values().any(|s| s.conn.is_some())
                {
                    return None;
                }
            }
            if self.carrier.as_ref().is_some_and(|c| !c.unused()) {
                return None;
            }
            Some(self.idle_for())
        }

        /// The client of a standing stream closed its connection (`door::watch`): the
        /// connection leaves the stream at once, which ends its writer, and a reconnect
        /// finds the stream free (no 409).
        pub fn client_left(&self, stream: u64, conn_id: u64) {
            let mut r = self.routing.locked();
            let Some(s) = r.streams.get_mut(&stream) else {
                return;
            };
            if !s.conn.as_ref().is_some_and(|c| c.id == conn_id) {
                return;
            }
            if let Some(c) = s.conn.take() {
                c.link.cut.store(true, Ordering::Release);
            }
            drop(r);
            crate::app().metrics.stream_cut("client_gone");
            crate::log!(Info, "client_gone", session = self.tag; "the client of stream {stream} closed its connection");
        }

        /// The writer of a connection is done with it. `Delivery::Whole`: it wrote the
        /// POST stream's last response and ended the response cleanly, so the client has
        /// every event and none needs keeping for a resume.
        pub fn detach(&self, stream: u64, conn_id: u64, delivery: Delivery) {
            let mut r = self.routing.locked();
            let Some(s) = r.streams.get_mut(&stream) else {
                return;
            };
            if s.conn.as_ref().is_some_and(|c| c.id == conn_id) {
                s.conn = None;
            }
            if delivery == Delivery::Whole && s.done {
                r.forget_events(stream);
            }
            let Some(s) = r.streams.get(&stream) else {
                return;
            };
            if s.done && s.conn.is_none() && s.evicted >= s.last_event {
                r.streams.remove(&stream);
            }
        }
    }

    impl Routing {
        fn new_stream(&mut self, kind: StreamKind) -> u64 {
            self.next_stream += 1;
            let no = self.next_stream;
            self.streams.insert(
                no,
                Stream {
                    kind,
                    conn: None,
                    open: 0,
                    done: false,
                    first_event: 0,
                    last_event: 0,
                    evicted: 0,
                },
            );
            no
        }

        fn listener_stream(&mut self) -> u64 {
            if let Some(l) = self.listener {
                return l;
            }
            let no = self.new_stream(StreamKind::Listener);
            self.listener = Some(no);
            no
        }

        /// Priming and `retry:` are for clients at 2025-11-25 or later (R-5): older
        /// clients may choke on an event with empty data.
        fn primed(&self) -> bool {
            self.version
                .as_deref()
                .is_some_and(|v| v >= config::PRIMING_VERSION)
        }

        fn attach_detached(&mut self, no: u64) -> Attached {
            let (_, rx) = crossbeam_channel::bounded(0);
            Attached {
                stream: no,
                conn_id: 0,
                kind: self.streams[&no].kind,
                rx,
                link: Arc::default(),
                replay: Vec::new(),
                priming: None,
                retry_ms: None,
                finished: false,
            }
        }

        /// A connection for stream `no`. The queue is unbounded in memory and bounded by
        /// the `queued` count, so an idle stream costs no preallocated slots.
        fn attach(&mut self, no: u64) -> Attached {
            let (tx, rx) = crossbeam_channel::unbounded();
            let link = Arc::new(Link::default());
            let id = crate::next_id();
            // What waited for a connection on this stream goes out on this one.
            self.unsent.retain(|(s, ..)| *s != no);
            let stream = self.streams.get_mut(&no).expect("stream exists");
            stream.conn = Some(Conn {
                id,
                tx,
                link: link.clone(),
            });
            Attached {
                stream: no,
                conn_id: id,
                kind: stream.kind,
                rx,
                link,
                replay: Vec::new(),
                priming: None,
                retry_ms: None,
                finished: false,
            }
        }

        fn take_replay(&mut self, no: u64, wanted: impl Fn(&Event) -> bool) -> Vec<Frame> {
            self.replay
                .iter_mut()
                .filter(|e| e.stream == no && wanted(e))
                .map(|e| {
                    e.queued = true;
                    Frame {
                        stream: e.stream,
                        n: e.n,
                        json: e.json.clone(),
                        last: e.last,
                    }
                })
                .collect()
        }

        /// Where a child request or notification goes: progress to the stream of the
        /// request that carried the token; list-changed and resource updates to the GET
        /// stream (G-3); anything else to the newest in-flight request's stream (P-7,
        /// S-9), else the GET stream, where it waits for a connection if there is none.
        fn target_stream(&mut self, method: &str, value: &Value) -> u64 {
            if method == "notifications/progress" {
                let owner = value
                    .get("params")
                    .and_then(|p| p.get("progressToken"))
                    .and_then(|t| self.progress.get(&id_key(t)))
                    .and_then(|k| self.in_flight.get(k));
                if let Some(f) = owner {
                    return f.stream;
                }
            }
            let session_wide =
                method.ends_with("/list_changed") || method == "notifications/resources/updated";
            if !session_wide {
                if let Some(f) = self.in_flight.values().max_by_key(|f| f.seq) {
                    return f.stream;
                }
            }
            self.listener_stream()
        }

        /// Numbers an event, keeps it for replay and hands it to the stream's connection
        /// if one is attached. A connection this puts over --stream-queue is returned,
        /// for `Session::make_room`, which runs without this lock held.
        #[must_use]
        fn emit(
            &mut self,
            tag: &str,
            no: u64,
            json: Arc<str>,
            completes: bool,
        ) -> Option<Congested> {
            let app = crate::app();
            self.next_event += 1;
            let n = self.next_event;
            let Some(stream) = self.streams.get_mut(&no) else {
                app.metrics.dropped("no_stream");
                crate::log!(
                    Error,
                    "message_dropped",
                    session = tag; "event for stream {no}, which this session no longer has"
                );
                return None;
            };
            let mut last = false;
            if completes && stream.kind == StreamKind::Post {
                stream.open = stream.open.saturating_sub(1);
                if stream.open == 0 {
                    stream.done = true;
                    last = true;
                }
            }
            if stream.first_event == 0 {
                stream.first_event = n;
            }
            stream.last_event = n;
            let mut queued = false;
            let mut congested = None;
            if let Some(conn) = &stream.conn {
                conn.link.push(json.len());
                queued = conn
                    .tx
                    .send(Frame {
                        stream: no,
                        n,
                        json: json.clone(),
                        last,
                    })
                    .is_ok();
                if conn.link.over(1) {
                    congested = Some(Congested(no, conn.link.clone()));
                }
            }
            if queued && !self.resumable {
                stream.evicted = n;
                return congested;
            }
            self.replay_bytes += json.len();
            self.replay.push_back(Event {
                stream: no,
                n,
                json,
                last,
                queued,
            });
            self.evict(tag);
            congested
        }

        /// Drops a delivered stream's events. They are the newest in the buffer as a
        /// rule, so the search starts at the stream's first event.
        fn forget_events(&mut self, no: u64) {
            let Some(s) = self.streams.get_mut(&no) else {
                return;
            };
            s.evicted = s.last_event;
            let first = s.first_event;
            if first == 0 {
                return;
            }
            let mut i = self.replay.partition_point(|e| e.n < first);
            while i < self.replay.len() {
                if self.replay[i].stream == no {
                    let e = self.replay.remove(i).expect("index in range");
                    self.replay_bytes -= e.json.len();
                } else {
                    i += 1;
                }
            }
        }

        fn evict(&mut self, tag: &str) {
            let app = crate::app();
            let (max_events, max_bytes) = app.cfg.replay_buffer;
            while self.replay.len() > max_events
                || (self.replay_bytes > max_bytes && self.replay.len() > 1)
            {
                let Some(e) = self.replay.pop_front() else {
                    break;
                };
                self.replay_bytes -= e.json.len();
                if let Some(s) = self.streams.get_mut(&e.stream) {
                    s.evicted = e.n;
                    if s.done && s.conn.is_none() && s.last_event == e.n {
                        self.streams.remove(&e.stream);
                    }
                }
                if !e.queued {
                    app.metrics.dropped("replay_overflow");
                    if !self.lost_logged {
                        self.lost_logged = true;
                        crate::log!(Warn, "message_dropped", session = tag; "a message that waited for a GET stream left the replay buffer undelivered (--replay-buffer); further losses in this session are only counted");
                    }
                }
            }
        }
    }

    /// Delivers one child message (ids already in the client's terms) to this session:
    /// a response to the stream waiting for it, anything else to its target stream, or
    /// to the GET stream when `aside` (a shared child's notification about other work).
    pub fn route_value(session: &Arc<Session>, json: String, value: &Value, aside: bool) {
        let app = crate::app();
        let filtered = session.tools_listed(value);
        let (json, value) = match &filtered {
            Some(v) => (v.to_string(), v),
            None => (json, value),
        };
        if let Some(link) = &session.member {
            // Counted when it reaches the client through the merged session.
            return crate::merged::from_member(link, session, json, value);
        }
        app.metrics.message(crate::observe::Way::ToClient, value);
        session.tap(crate::observe::tap::Direction::BridgeToClient, value);
        if session.carrier.is_some() {
            return crate::modern::from_child(session, json, value, aside);
        }
        let tag = session.tag.as_str();
        match classify(value) {
            Kind::Response { id } => {
                let key = id_key(id);
                let mut r = session.routing.locked();
                let Some(f) = r.in_flight.remove(&key) else {
                    let ended = r.closed;
                    drop(r);
                    if ended {
                        // Its session ended while the answer was on its way (the bridge's
                        // cached initialize answer among them): not an id nobody sent.
                        app.metrics.dropped("session_ended");
                        crate::log!(
                            Info,
                            "message_dropped",
                            session = tag; "answer to {key} arrived after the session ended"
                        );
                        return;
                    }
                    app.metrics.dropped("unknown_id");
                    crate::log!(
                        Warn,
                        "message_dropped",
                        session = tag; "child answered id {key}, which no request is waiting for"
                    );
                    return;
                };
                app.metrics.request_latency(f.since.elapsed());
                r.progress.retain(|_, req| *req != key);
                let mut init_failed = false;
                if r.initialize_id.as_deref() == Some(key.as_str()) {
                    r.initialize_id = None;
                    match value
                        .pointer("/result/protocolVersion")
                        .and_then(Value::as_str)
                    {
                        Some(v) => {
                            r.version = Some(v.to_string());
                            session.server.remember_hello(&value["result"]);
                        }
                        None => init_failed = true,
                    }
                }
                let congested = r.emit(tag, f.stream, json.into(), true);
                drop(r);
                session.make_room(congested);
                if init_failed {
                    crate::log!(
                        Warn,
                        "initialize_failed",
                        session = tag; "the server refused initialize; ending the session"
                    );
                    end_in_background(session.clone(), EndReason::InitializeFailed);
                }
            }
            Kind::Request { method, .. } | Kind::Notification { method } => {
                let mut r = session.routing.locked();
                if r.closed {
                    drop(r);
                    app.metrics.dropped("session_ended");
                    crate::log!(
                        Info,
                        "message_dropped",
                        session = tag; "{method} arrived after the session ended"
                    );
                    return;
                }
                let stream = if aside {
                    r.listener_stream()
                } else {
                    r.target_stream(method, value)
                };
                if let Kind::Request { id, .. } = classify(value) {
                    let key = id_key(id);
                    r.awaiting_answer.insert(key.clone());
                    if r.streams.get(&stream).is_some_and(|s| s.conn.is_none()) {
                        r.unsent.push((stream, key, id.clone(), Instant::now()));
                    }
                }
                let congested = r.emit(tag, stream, json.into(), false);
                drop(r);
                session.make_room(congested);
            }
            Kind::Invalid(why) => {
                app.metrics.dropped("invalid");
                crate::log!(
                    Warn,
                    "child_invalid",
                    session = tag; "skipped a child message that is not JSON-RPC ({why})"
                );
            }
        }
    }

    /// The child's requests no client will answer get an error answer from the bridge,
    /// so the child never waits on a client that is gone; logged and counted.
    pub fn answer_unanswerable(session: &Arc<Session>, ids: Vec<Value>, why: &str) {
        let app = crate::app();
        let answers: Vec<Value> = ids
            .into_iter()
            .map(|id| {
                app.metrics.client_request_unanswered();
                serde_json::json!({"jsonrpc": "2.0", "id": id,
                    "error": {"code": -32000, "message": format!("The client cannot answer: {why}")}})
            })
            .collect();
        crate::log!(Info, "client_request_unanswered", session = session.tag; "{} request(s) of the child answered with an error: {why}", answers.len());
        let _ = session.upstream.send_answers(&answers);
    }

    /// At --max-sessions, a new session ends the one unattended longest (no request in
    /// flight, no open stream, idle at least --evict-idle-after) rather than be refused:
    /// clients that never send DELETE (the TypeScript SDK's, the Inspector's) would
    /// otherwise lock everyone out until --session-idle-timeout. The evicted client gets
    /// 404 and initializes again. True when one was ended (its child with it).
    fn evict_one(server: &Server) -> bool {
        let Some((idle, s)) = evictable(server) else {
            return false;
        };
        crate::log!(Info, "session_evicted", session = s.tag; "--max-sessions reached: ending the session unattended longest ({idle:?}) for a new one");
        end(&s, EndReason::Evicted);
        true
    }

    /// The session unattended longest, if eviction may end it.
    fn evictable(server: &Server) -> Option<(Duration, Arc<Session>)> {
        let app = crate::app();
        let floor = app.cfg.evict_idle_after?;
        app.sessions
            .all()
            .into_iter()
            // A merged session's session on this server ends with it, never alone.
            .filter(|s| s.server.name == server.name && s.transport != Transport::Member)
            .filter_map(|s| s.unattended_for().map(|d| (d, s)))
            .filter(|(d, _)| *d >= floor)
            .max_by_key(|(d, _)| *d)
    }

    /// A new session would be refused now: --max-sessions reached and none evictable.
    /// (A legacy stream asks before it announces its endpoint; it evicts nothing yet.)
    pub fn full(server: &Server) -> Option<Refusal> {
        let app = crate::app();
        let limit = server.spec.max_sessions;
        (app.sessions.count_for(server) >= limit && evictable(server).is_none()).then(|| {
            let refusal = Refusal::TooManySessions { limit };
            app.metrics.rejected(refusal.reason());
            refusal
        })
    }

    /// The sessions --max-sessions-per-token counts: those a client opened (Streamable
    /// HTTP, legacy), not 2026-07-28 carriers (no client names them) or a merged
    /// session's sessions on its servers (the merged session counts, once).
    fn counts_per_client(t: Transport) -> bool {
        matches!(t, Transport::Streamable | Transport::Legacy)
    }

    fn held_by(client: &crate::ratelimit::Client) -> usize {
        let app = crate::app();
        app.sessions
            .map
            .locked()
            .values()
            .filter(|s| s.holds_for(client))
            .count()
    }

    /// At --max-sessions-per-token, the client's own session unattended longest (as
    /// `evict_one`, and for the same clients: those that never send DELETE) makes room.
    fn evict_own(client: &crate::ratelimit::Client) -> bool {
        let Some((idle, s)) = evictable_own(client) else {
            return false;
        };
        crate::log!(Info, "session_evicted", session = s.tag; "--max-sessions-per-token reached: ending this client's session unattended longest ({idle:?}) for a new one");
        end(&s, EndReason::Evicted);
        true
    }

    fn evictable_own(client: &crate::ratelimit::Client) -> Option<(Duration, Arc<Session>)> {
        let floor = crate::app().cfg.evict_idle_after?;
        crate::app()
            .sessions
            .all()
            .into_iter()
            .filter(|s| s.holds_for(client))
            .filter_map(|s| s.unattended_for().map(|d| (d, s)))
            .filter(|(d, _)| *d >= floor)
            .max_by_key(|(d, _)| *d)
    }

    /// A new session of this client would be refused now (a legacy stream asks before it
    /// announces its endpoint; it evicts nothing yet).
    pub fn client_full(ctx: &crate::auth::Context) -> Option<Refusal> {
        let per_client = crate::app().cfg.rate.sessions_per_client;
        let c = ctx.client.as_ref().filter(|_| per_client > 0)?;
        (held_by(c) >= per_client && evictable_own(c).is_none())
            .then(|| crate::ratelimit::session_refused(c, per_client))
    }

    pub fn end_in_background(session: Arc<Session>, reason: EndReason) {
        crate::spawn_thread("end-session", move || end(&session, reason));
    }

    /// Ends a session once: fails what is in flight, ends its streams, removes it (so its
    /// id answers 404, S-5) and lets go of its child: its own child is ended and reaped
    /// before this returns; a shared child is told to drop the session's work.
    pub fn end(session: &Arc<Session>, reason: EndReason) {
        let app = crate::app();
        let mut r = session.routing.locked();
        if r.closed {
            drop(r);
            session.upstream.release(session, Vec::new());
            return;
        }
        r.closed = true;
        r.progress.clear();
        let in_flight = std::mem::take(&mut r.in_flight);
        let awaiting: Vec<String> = r.awaiting_answer.drain().collect();
        drop(r);
        app.sessions.remove(&session.id);
        if let Some(link) = &session.member {
            crate::merged::member_ended(link, reason.label());
        }
        let (code, message, data) = match reason {
            EndReason::ChildGone | EndReason::InitializeFailed
                if session.upstream.process().is_none() =>
            {
                (-32603, "A server of the merged endpoint ended".into(), None)
            }
            EndReason::ChildGone | EndReason::InitializeFailed => {
                let child = session.upstream.process().expect("guarded above");
                let status = child.wait_exit(Duration::ZERO);
                let what = status
                    .as_ref()
                    .map(|s| child.ended(s))
                    .unwrap_or_else(|| "stopped answering".into());
                let limit = child.limit_hit().map(|(l, _)| l.label());
                let tail = if status.is_some() {
                    child.final_stderr_tail()
                } else {
                    child.stderr_tail()
                };
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
                    Some(match limit {
                        Some(limit) => {
                            serde_json::json!({"exit": what, "limit": limit, "stderr": tail})
                        }
                        None => serde_json::json!({"exit": what, "stderr": tail}),
                    }),
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
            EndReason::MergedEnded => {
                (-32000, "Session ended with its merged session".into(), None)
            }
            EndReason::ServerRemoved => (
                -32000,
                "Session ended: its server was removed from the configuration".into(),
                None,
            ),
            EndReason::Evicted => (
                -32000,
                "Session ended to make room for a new one (--max-sessions, --evict-idle-after)"
                    .to_string(),
                None,
            ),
        };
        if session.carrier.is_some() {
            crate::modern::carrier_ended(session, code, &message, data.clone());
        }
        {
            let mut r = session.routing.locked();
            for (key, f) in in_flight {
                let id: Value = serde_json::from_str(&key).unwrap_or(Value::Null);
                let json = crate::message::error_response(&id, code, &message, data.clone());
                if crate::observe::tap::on() {
                    if let Ok(v) = serde_json::from_str::<Value>(&json) {
                        session.tap(crate::observe::tap::Direction::BridgeToClient, &v);
                    }
                }
                // The session is ending: its connections are dropped next, not waited for.
                let _ = r.emit(&session.tag, f.stream, json.into(), true);
            }
            // Dropping every connection's sender lets its writer end the stream.
            for s in r.streams.values_mut() {
                s.conn = None;
            }
        }
        app.metrics
            .session_closed(session.transport, reason.label());
        crate::log!(
            Info,
            "session_close",
            session = session.tag; "session ended ({})",
            reason.label());
        session.upstream.release(session, awaiting);
    }

    /// Ends sessions idle longer than --session-idle-timeout. Activity is a request from
    /// the client or an event or keepalive written to one of its streams; a stream that
    /// closes does not count, so a client that vanished is reaped on time.
    pub fn run_idle_reaper() {
        let app = crate::app();
        loop {
            // Each server has its own timeout (--config), and a reload may change them.
            let tick = crate::servers::live()
                .iter()
                .filter_map(|s| s.spec.session_idle_timeout)
                .chain([app.cfg.client_request_timeout])
                .map(|t| (t / 4).clamp(REAPER_TICK_MIN, REAPER_TICK_MAX))
                .min()
                .unwrap_or(REAPER_TICK_MAX);
            std::thread::sleep(tick);
            for s in app.sessions.all() {
                let unsent = s.expire_unsent(app.cfg.client_request_timeout);
                if !unsent.is_empty() {
                    answer_unanswerable(
                        &s,
                        unsent,
                        "no stream was open to carry it within --client-request-timeout",
                    );
                }
                // A server session of the merged endpoint lives as long as its
                // merged session (one left behind by a race is ended here).
                if let Some(link) = &s.member {
                    if !link.serving() {
                        end_in_background(s, EndReason::MergedEnded);
                    }
                    continue;
                }
                let Some(timeout) = s.server.spec.session_idle_timeout else {
                    continue;
                };
                if s.upstream.stdout_closed() {
                    // Its child is gone (the router ends such sessions; this is the
                    // backstop): keepalives must not keep it alive.
                    end_in_background(s, EndReason::ChildGone);
                } else if s.idle_for() > timeout {
                    crate::log!(
                        Info,
                        "session_idle",
                        session = s.tag; "idle for {:?}; ending it",
                        s.idle_for());
                    end_in_background(s, EndReason::Idle);
                }
            }
        }
    }
}

// ======================================================================================
/// The child side of routing. An `Upstream` is one running child and the sessions on it:
/// in session mode exactly one, whose messages pass through untouched; in shared mode
/// many, so request ids and progress tokens are rewritten to values unique on the child
/// and mapped back, `initialize` runs once and is answered from a cache, subscriptions
/// are reference-counted, and server-wide notifications reach every session. Also the
/// supervisors that restart shared children and the warm pool of session mode. Touches
/// `child` for processes and `sessions` for delivery.
/// Owns: `Upstream`, id and token rewriting, the initialize cache, subscriptions, the
/// shared supervisors and the warm pool. Touches: `child`, `sessions` (delivery).
/// Rules: S-9, ST-7, OP-9.
mod upstream {
    use super::*;
    use crate::child::ChildProc;
    use crate::http::{Refusal, Reply};
    use crate::message::{classify, id_key, Kind};
    use crate::servers::Server;
    use crate::sessions::{self, EndReason, Session};

    /// A new session waits for a pending restart at most --restart-delay-max and this
    /// (the restart itself: spawn and initialize).
    const RESTART_WAIT_SLACK: Duration = Duration::from_secs(1);
    /// A supervisor waiting on a child that has stayed up re-checks this often.
    const EXIT_RECHECK: Duration = Duration::from_secs(3600);
    use serde_json::{json, Value};
    use std::collections::{HashMap, VecDeque};
    use std::process::ChildStdout;
    use std::sync::{Condvar, Mutex, OnceLock};

    pub struct Upstream {
        feed: Feed,
        shared: bool,
        state: Mutex<State>,
    }

    /// What takes a session's messages: a child process, or the merged endpoint's
    /// in-process server (which reaches the servers' children through sessions of
    /// their own).
    pub enum Feed {
        Process(Arc<ChildProc>),
        Merged(Arc<crate::merged::Merger>),
    }

    #[derive(Default)]
    struct State {
        members: Vec<Arc<Session>>,
        /// Child-side request id -> whose request it is.
        pending: HashMap<u64, Pending>,
        /// Child-side progress token -> its session and the client's own token.
        tokens: HashMap<u64, (Arc<Session>, Value)>,
        next: u64,
        /// Resource URI -> the sessions subscribed to it; the child sees one subscription.
        subscriptions: HashMap<String, Vec<Arc<Session>>>,
        init: Init,
        initialized_sent: bool,
        /// The child's stdout has ended: its sessions were ended, and no session may
        /// join it any more (it would wait for answers that cannot come).
        stdout_closed: bool,
    }

    enum Pending {
        Client {
            session: Arc<Session>,
            id: Value,
            token: Option<u64>,
            subscribed: Option<String>,
        },
        /// The child's one `initialize`; its session may have left, the cache still fills.
        Initialize {
            session: Option<Arc<Session>>,
            id: Value,
        },
        /// Ours (an unsubscribe after the last subscriber left), or orphaned by a session
        /// that ended: the answer has nowhere to go.
        Discard,
    }

    #[derive(Default)]
    enum Init {
        #[default]
        Fresh,
        /// Sessions whose initialize waits for the one in flight.
        Running(Vec<(Arc<Session>, Value)>),
        Ready(Value),
    }

    impl Upstream {
        fn new(child: Arc<ChildProc>, shared: bool) -> Upstream {
            Upstream {
                feed: Feed::Process(child),
                shared,
                state: Mutex::new(State::default()),
            }
        }

        /// A merged-endpoint session's upstream.
        pub fn merged(merger: Arc<crate::merged::Merger>) -> Upstream {
            Upstream {
                feed: Feed::Merged(merger),
                shared: false,
                state: Mutex::new(State::default()),
            }
        }

        /// The merged endpoint's server, when this is its session's upstream.
        pub fn merger(&self) -> Option<&Arc<crate::merged::Merger>> {
            match &self.feed {
                Feed::Merged(m) => Some(m),
                Feed::Process(_) => None,
            }
        }

        /// Its child process (none on the merged endpoint).
        pub fn process(&self) -> Option<&Arc<ChildProc>> {
            match &self.feed {
                Feed::Process(c) => Some(c),
                Feed::Merged(_) => None,
            }
        }

        /// For logs: the child's tag, or "merged".
        pub fn tag(&self) -> &str {
            match &self.feed {
                Feed::Process(c) => &c.tag,
                Feed::Merged(_) => "merged",
            }
        }

        /// The child's pid, for logs (0 on the merged endpoint).
        pub fn pid(&self) -> i32 {
            self.process().map_or(0, |c| c.pid)
        }

        /// One message to the child (or the merged server), as one line.
        fn write(&self, m: &Value) -> std::io::Result<()> {
            match &self.feed {
                Feed::Process(c) => c.send_message(m),
                Feed::Merged(merger) => merger.hear_client(m),
            }
        }

        /// Ends what is this session's alone: its child (reaped before this returns),
        /// or the merged server with every server session it opened.
        pub fn end_own(&self, grace: Duration) {
            match &self.feed {
                Feed::Process(c) => {
                    c.terminate(grace);
                }
                Feed::Merged(merger) => merger.close(),
            }
        }

        /// Adds a session to this child's members; false once the child's stdout has
        /// ended (the caller picks another child).
        #[must_use]
        pub fn join(&self, session: &Arc<Session>) -> bool {
            let mut st = self.state.locked();
            if st.stdout_closed {
                return false;
            }
            st.members.push(session.clone());
            true
        }

        /// The child's stdout has ended (it exited, or is about to).
        pub fn stdout_closed(&self) -> bool {
            self.state.locked().stdout_closed
        }

        fn load(&self) -> usize {
            self.state.locked().members.len()
        }

        /// Writes a client's messages to the child, each as one line. In shared mode ids
        /// and tokens are rewritten first, and what the bridge answers itself (a cached
        /// initialize, a subscription the child already has) is answered here.
        pub fn send(&self, session: &Arc<Session>, messages: &[Value]) -> std::io::Result<()> {
            let app = crate::app();
            if !self.shared {
                // The merged server's own writes to its servers' children are counted
                // there: a message is counted once, when it reaches a child.
                let counted = self.process().is_some();
                for m in messages {
                    self.write(m)?;
                    if counted {
                        app.metrics.message(crate::observe::Way::ToChild, m);
                    }
                }
                return Ok(());
            }
            let mut to_child = Vec::with_capacity(messages.len());
            let mut answers = Vec::new();
            {
                let mut st = self.state.locked();
                for m in messages {
                    st.rewrite(session, m, &mut to_child, &mut answers);
                }
            }
            for a in answers {
                sessions::route_value(session, a.to_string(), &a, false);
            }
            for m in &to_child {
                self.write(m)?;
                app.metrics.message(crate::observe::Way::ToChild, m);
            }
            Ok(())
        }

        /// The child's pid when it is this session's alone (session mode).
        pub fn own_child_pid(&self) -> Option<i32> {
            self.process().filter(|_| !self.shared).map(|c| c.pid)
        }

        /// The bridge's answers to the child's own requests (ids are the child's).
        pub fn send_answers(&self, answers: &[Value]) -> std::io::Result<()> {
            for a in answers {
                self.write(a)?;
                crate::app()
                    .metrics
                    .message(crate::observe::Way::ToChild, a);
            }
            Ok(())
        }

        /// A session is done with this child. Its own child is ended (and reaped before
        /// this returns); on a shared child its requests are cancelled, its subscriptions
        /// released, and requests waiting for its answer get an error, so the child is
        /// not left waiting.
        pub fn release(&self, session: &Arc<Session>, awaiting: Vec<String>) {
            let grace = crate::app().cfg.shutdown_grace;
            // The child's questions to this client are answered first, in either mode: a
            // child waiting for one (server-filesystem's roots) ignores stdin EOF and
            // would take the whole grace to end; a shared one would wait for ever.
            if !awaiting.is_empty() {
                let ids = awaiting
                    .iter()
                    .map(|k| serde_json::from_str(k).unwrap_or(Value::Null))
                    .collect();
                sessions::answer_unanswerable(session, ids, "its session has ended");
            }
            let mut to_child = Vec::new();
            {
                let mut st = self.state.locked();
                st.members.retain(|m| !Arc::ptr_eq(m, session));
                if !self.shared {
                    drop(st);
                    self.end_own(grace);
                    return;
                }
                for (cid, p) in st.pending.iter_mut() {
                    match p {
                        Pending::Client { session: s, .. } if Arc::ptr_eq(s, session) => {
                            to_child.push(json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                "params": {"requestId": cid, "reason": "the client's session ended"}}));
                            *p = Pending::Discard;
                        }
                        Pending::Initialize { session: s, .. }
                            if s.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) =>
                        {
                            *s = None;
                        }
                        _ => {}
                    }
                }
                st.tokens.retain(|_, (s, _)| !Arc::ptr_eq(s, session));
                if st.members.is_empty() && session.server.retired() {
                    // The last session on a replaced or removed server's shared child.
                    let child = self.process().cloned();
                    crate::spawn_thread("retire-shared", move || {
                        if let Some(c) = child {
                            c.terminate(crate::app().cfg.shutdown_grace);
                        }
                    });
                }
                if let Init::Running(waiters) = &mut st.init {
                    waiters.retain(|(s, _)| !Arc::ptr_eq(s, session));
                }
                let mut released = Vec::new();
                for (uri, subs) in st.subscriptions.iter_mut() {
                    let before = subs.len();
                    subs.retain(|s| !Arc::ptr_eq(s, session));
                    if before > 0 && subs.is_empty() {
                        released.push(uri.clone());
                    }
                }
                for uri in released {
                    st.subscriptions.remove(&uri);
                    let cid = st.next_id();
                    st.pending.insert(cid, Pending::Discard);
                    to_child.push(json!({"jsonrpc": "2.0", "id": cid, "method": "resources/unsubscribe", "params": {"uri": uri}}));
                }
            }
            for m in to_child {
                let _ = self.write(&m);
            }
        }

        /// The session a shared child's own request goes to, among those with a stream
        /// open to carry it: the one session with work in flight on the child, when
        /// there is exactly one; otherwise the most recently active. None when no session
        /// can receive it now: the child gets an error at once rather than wait on a
        /// client that is gone.
        fn server_request_target(&self) -> Option<Arc<Session>> {
            let st = self.state.locked();
            st.sole_busy().filter(|s| s.has_open_stream()).or_else(|| {
                st.members
                    .iter()
                    .filter(|s| s.has_open_stream())
                    .max_by_key(|s| s.last_request())
                    .cloned()
            })
        }
    }

    impl State {
        /// The one session with requests in flight on the child, if exactly one has.
        fn sole_busy(&self) -> Option<Arc<Session>> {
            let mut busy: Option<&Arc<Session>> = None;
            for p in self.pending.values() {
                let s = match p {
                    Pending::Client { session, .. } => Some(session),
                    Pending::Initialize { session, .. } => session.as_ref(),
                    Pending::Discard => None,
                };
                match (s, busy) {
                    (Some(s), None) => busy = Some(s),
                    (Some(s), Some(b)) if !Arc::ptr_eq(s, b) => return None,
                    _ => {}
                }
            }
            busy.cloned()
        }

        fn next_id(&mut self) -> u64 {
            self.next += 1;
            self.next
        }

        fn rewrite(
            &mut self,
            session: &Arc<Session>,
            m: &Value,
            to_child: &mut Vec<Value>,
            answers: &mut Vec<Value>,
        ) {
            let ok =
                |id: &Value, result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
            match classify(m) {
                Kind::Request {
                    id,
                    method: "initialize",
                } => match &mut self.init {
                    Init::Ready(result) => answers.push(ok(id, result.clone())),
                    Init::Running(waiters) => waiters.push((session.clone(), id.clone())),
                    Init::Fresh => {
                        self.init = Init::Running(Vec::new());
                        let cid = self.next_id();
                        self.pending.insert(
                            cid,
                            Pending::Initialize {
                                session: Some(session.clone()),
                                id: id.clone(),
                            },
                        );
                        let mut out = m.clone();
                        out["id"] = cid.into();
                        to_child.push(out);
                    }
                },
                Kind::Request { id, method } => {
                    let uri = m
                        .pointer("/params/uri")
                        .and_then(Value::as_str)
                        .map(String::from);
                    let mut subscribed = None;
                    if let (Some(uri), "resources/subscribe" | "resources/unsubscribe") =
                        (uri, method)
                    {
                        let subs = self.subscriptions.entry(uri.clone()).or_default();
                        let had = subs.iter().any(|s| Arc::ptr_eq(s, session));
                        if method == "resources/subscribe" {
                            if !had {
                                subs.push(session.clone());
                            }
                            if had || subs.len() > 1 {
                                return answers.push(ok(id, json!({})));
                            }
                            subscribed = Some(uri);
                        } else {
                            subs.retain(|s| !Arc::ptr_eq(s, session));
                            let still = !subs.is_empty();
                            if !still {
                                self.subscriptions.remove(&uri);
                            }
                            if !had || still {
                                return answers.push(ok(id, json!({})));
                            }
                        }
                    }
                    let cid = self.next_id();
                    let mut out = m.clone();
                    out["id"] = cid.into();
                    let token = crate::message::progress_token(m).cloned().map(|t| {
                        let ct = self.next_id();
                        self.tokens.insert(ct, (session.clone(), t));
                        out["params"]["_meta"]["progressToken"] = ct.into();
                        ct
                    });
                    self.pending.insert(
                        cid,
                        Pending::Client {
                            session: session.clone(),
                            id: id.clone(),
                            token,
                            subscribed,
                        },
                    );
                    to_child.push(out);
                }
                Kind::Notification {
                    method: "notifications/initialized",
                } => {
                    // The child was initialized once, by the first client.
                    if !std::mem::replace(&mut self.initialized_sent, true) {
                        to_child.push(m.clone());
                    }
                }
                Kind::Notification {
                    method: "notifications/cancelled",
                } => {
                    let wanted = m.pointer("/params/requestId").map(id_key);
                    let cid = self.pending.iter().find_map(|(cid, p)| match p {
                        Pending::Client { session: s, id, .. }
                            if Arc::ptr_eq(s, session) && Some(id_key(id)) == wanted =>
                        {
                            Some(*cid)
                        }
                        _ => None,
                    });
                    if let Some(cid) = cid {
                        let mut out = m.clone();
                        out["params"]["requestId"] = cid.into();
                        to_child.push(out);
                    }
                }
                // Other notifications, and answers to the child's own requests (whose ids
                // are the child's already).
                _ => to_child.push(m.clone()),
            }
        }
    }

    /// A child for a new session-mode session: a warm one if the pool has it.
    /// A child for one session. A warm child was started before any request, so it can
    /// serve only a session with no --pass-header value to give it.
    pub fn dedicated(
        server: &Arc<Server>,
        tag: &str,
        env: Vec<(String, String)>,
    ) -> Result<(Arc<Upstream>, ChildStdout), String> {
        let warm = if env.is_empty() {
            warm_take(server)
        } else {
            None
        };
        let (child, stdout) = match warm {
            Some((c, out)) => {
                crate::log!(
                    Info,
                    "warm_take",
                    session = tag; "took warm child {} (pid {})",
                    c.tag,
                    c.pid
                );
                (c, out)
            }
            None => crate::child::spawn(server, tag, env)?,
        };
        Ok((Arc::new(Upstream::new(child, false)), stdout))
    }

    /// Starts the thread that reads the child's stdout and routes each message.
    pub fn start_router(up: &Arc<Upstream>, stdout: ChildStdout) {
        let (lines, eof) = (up.clone(), up.clone());
        crate::child::start_reader(
            up.process().expect("a router reads a child's stdout"),
            stdout,
            Box::new(move |line| route_line(&lines, line)),
            Box::new(move || child_gone(&eof)),
        );
    }

    /// The router: runs on the child's stdout reader thread, one line at a time, so the
    /// order the child wrote is the order each stream sees (P-7).
    fn route_line(up: &Arc<Upstream>, line: String) {
        let app = crate::app();
        let value: Value = match crate::message::parse(line.as_bytes()) {
            Ok(v) => v,
            Err(e) => {
                // ST-5: the child's bug, not the session's end.
                app.metrics.dropped("non_json");
                let shown: String = line.chars().take(200).collect();
                crate::log!(
                    Warn,
                    "child_non_json",
                    session = up.tag(); "skipped a stdout line that is not JSON ({e}): {shown}");
                return;
            }
        };
        if let Value::Array(items) = value {
            for item in items {
                route_one(up, item.to_string(), item);
            }
        } else {
            // SSE splits on CR too; JSON text may hold a raw CR only as whitespace, so
            // re-serialize in that rare case.
            let json = if line.contains('\r') {
                value.to_string()
            } else {
                line
            };
            route_one(up, json, value);
        }
    }

    fn route_one(up: &Arc<Upstream>, json: String, value: Value) {
        let app = crate::app();
        let tag = up.tag();
        if !up.shared {
            let session = up.state.locked().members.first().cloned();
            match session {
                Some(s) => sessions::route_value(&s, json, &value, false),
                None => {
                    app.metrics.dropped("session_ended");
                    crate::log!(
                        Info,
                        "message_dropped",
                        session = tag; "child message after its session ended"
                    );
                }
            }
            return;
        }
        match classify(&value) {
            Kind::Response { id } => route_response(up, id.as_u64(), value),
            Kind::Request { id, method } => match up.server_request_target() {
                Some(s) => sessions::route_value(&s, json, &value, false),
                None => {
                    app.metrics.dropped("no_session");
                    app.metrics.client_request_unanswered();
                    crate::log!(
                        Warn,
                        "message_dropped",
                        session = tag; "child sent {method} but no session has a stream open to receive it; answering it with an error"
                    );
                    let answer = json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32000, "message": "No client is connected to answer this request"}});
                    let _ = up.write(&answer);
                }
            },
            Kind::Notification { method } => {
                let st = up.state.locked();
                // A server-wide notification (a log line, list_changed) reaches every
                // session once: on its GET stream, except for the one session whose
                // work is in flight, which gets it beside that work as in session mode.
                let owner = st.sole_busy();
                // A 2026-07-28 child's listen stream names its listen request by the id
                // the child saw: that request's session only, under its own id (M-10).
                let listen = value
                    .get("params")
                    .and_then(|p| {
                        crate::message::at(p, &["_meta", "io.modelcontextprotocol/subscriptionId"])
                    })
                    .and_then(Value::as_u64)
                    .and_then(|cid| match st.pending.get(&cid) {
                        Some(Pending::Client { session, id, .. }) => {
                            Some((session.clone(), id.clone()))
                        }
                        _ => None,
                    });
                if let Some((s, id)) = listen {
                    drop(st);
                    let mut v = value.clone();
                    v["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] = id;
                    return sessions::route_value(&s, v.to_string(), &v, false);
                }
                let targets: Vec<(Arc<Session>, Option<Value>)> = match method {
                    "notifications/progress" => {
                        let owner = value
                            .get("params")
                            .and_then(|p| p.get("progressToken"))
                            .and_then(Value::as_u64)
                            .and_then(|t| st.tokens.get(&t));
                        owner
                            .map(|(s, t)| (s.clone(), Some(t.clone())))
                            .into_iter()
                            .collect()
                    }
                    "notifications/resources/updated" => {
                        let uri = value.pointer("/params/uri").and_then(Value::as_str);
                        uri.and_then(|u| st.subscriptions.get(u))
                            .map(|subs| subs.iter().map(|s| (s.clone(), None)).collect())
                            .unwrap_or_default()
                    }
                    "notifications/cancelled" => {
                        let key = value.pointer("/params/requestId").map(id_key);
                        st.members
                            .iter()
                            .filter(|s| key.as_deref().is_some_and(|k| s.awaits_answer(k)))
                            .map(|s| (s.clone(), None))
                            .collect()
                    }
                    _ => st.members.iter().map(|s| (s.clone(), None)).collect(),
                };
                drop(st);
                let aside = |s: &Arc<Session>| {
                    method != "notifications/progress"
                        && !owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, s))
                };
                if targets.is_empty() {
                    app.metrics.dropped("no_session");
                    crate::log!(
                        Debug,
                        "message_dropped",
                        session = tag; "{method} concerns no open session"
                    );
                }
                for (s, token) in targets {
                    match token {
                        Some(t) => {
                            let mut v = value.clone();
                            v["params"]["progressToken"] = t;
                            sessions::route_value(&s, v.to_string(), &v, false);
                        }
                        None => sessions::route_value(&s, json.clone(), &value, aside(&s)),
                    }
                }
            }
            Kind::Invalid(why) => {
                app.metrics.dropped("invalid");
                crate::log!(
                    Warn,
                    "child_invalid",
                    session = tag; "skipped a child message that is not JSON-RPC ({why})"
                );
            }
        }
    }

    /// A shared child's response: back to the client's own id, to the client that asked.
    fn route_response(up: &Arc<Upstream>, cid: Option<u64>, mut value: Value) {
        let app = crate::app();
        let tag = up.tag();
        let failed = value.get("error").is_some();
        let mut st = up.state.locked();
        match cid.and_then(|c| st.pending.remove(&c)) {
            Some(Pending::Client {
                session,
                id,
                token,
                subscribed,
            }) => {
                if let Some(t) = token {
                    st.tokens.remove(&t);
                }
                if let (true, Some(uri)) = (failed, subscribed) {
                    if let Some(subs) = st.subscriptions.get_mut(&uri) {
                        subs.retain(|s| !Arc::ptr_eq(s, &session));
                    }
                }
                drop(st);
                value["id"] = id;
                sessions::route_value(&session, value.to_string(), &value, false);
            }
            Some(Pending::Initialize { session, id }) => {
                let result = value
                    .get("result")
                    .filter(|r| r.get("protocolVersion").is_some())
                    .cloned();
                let waiters = match std::mem::take(&mut st.init) {
                    Init::Running(w) => w,
                    _ => Vec::new(),
                };
                match &result {
                    Some(r) => {
                        st.init = Init::Ready(r.clone());
                        crate::log!(
                            Info,
                            "shared_initialized",
                            session = tag; "shared child initialized (protocol {}); later sessions are answered from the cache",
                            r["protocolVersion"].as_str().unwrap_or("?")
                        );
                    }
                    None => st.init = Init::Fresh,
                }
                drop(st);
                let recipients = session.map(|s| (s, id)).into_iter().chain(waiters);
                for (s, client_id) in recipients {
                    let mut v = value.clone();
                    v["id"] = client_id;
                    sessions::route_value(&s, v.to_string(), &v, false);
                }
            }
            Some(Pending::Discard) => {
                drop(st);
                app.metrics.dropped("client_gone");
                crate::log!(
                    Debug,
                    "message_dropped",
                    session = tag; "answer to a request whose session has ended"
                );
            }
            None => {
                drop(st);
                app.metrics.dropped("unknown_id");
                crate::log!(
                    Warn,
                    "message_dropped",
                    session = tag; "child answered id {:?}, which the bridge never sent",
                    value.get("id")
                );
            }
        }
    }

    /// The child closed stdout: it has exited or is about to. Its sessions end; each
    /// request still waiting gets an error naming the exit status and stderr (ST-7).
    fn child_gone(up: &Arc<Upstream>) {
        let grace = crate::app().cfg.shutdown_grace;
        let members = {
            let mut st = up.state.locked();
            st.stdout_closed = true;
            std::mem::take(&mut st.members)
        };
        if members.is_empty() && !up.shared {
            return;
        }
        let Some(child) = up.process() else {
            return;
        };
        let status = child
            .wait_exit(grace)
            .unwrap_or_else(|| child.terminate(grace));
        crate::log!(
            Warn,
            "child_exit",
            session = child.tag; "server process {} with {} session(s) open",
            child.ended(&status),
            members.len());
        for s in members {
            sessions::end(&s, EndReason::ChildGone);
        }
        // Answers that can no longer come.
        let mut st = up.state.locked();
        st.pending.clear();
        st.tokens.clear();
        st.subscriptions.clear();
    }

    // ---- shared mode: one supervisor per child slot -----------------------------------

    #[derive(Default)]
    struct Slot {
        up: Option<Arc<Upstream>>,
        /// Set after --crash-loop-limit fast failures in a row; /readyz reports it.
        crash_loop: Option<String>,
    }

    struct Slots {
        slots: Mutex<Vec<Slot>>,
        changed: Condvar,
    }

    /// A server's children kept running: its shared slots, or its warm pool.
    #[derive(Default)]
    pub struct Children {
        slots: OnceLock<Slots>,
        warm: OnceLock<Warm>,
    }

    /// Delay before the next start after `failures` fast failures in a row.
    fn backoff(failures: u32) -> Duration {
        let cfg = &crate::app().cfg;
        let factor = 1u32 << failures.min(16);
        cfg.restart_delay
            .checked_mul(factor)
            .map_or(cfg.restart_delay_max, |d| d.min(cfg.restart_delay_max))
    }

    pub fn start_shared(server: &Arc<Server>) {
        let n = server.spec.children;
        let _ = server.children.slots.set(Slots {
            slots: Mutex::new((0..n).map(|_| Slot::default()).collect()),
            changed: Condvar::new(),
        });
        for i in 0..n {
            let server = server.clone();
            crate::spawn_thread("supervisor", move || supervise(&server, i));
        }
    }

    /// Keeps slot `i` running: starts the child, waits for it to exit, restarts it after
    /// an exponential backoff. A child that lives past --crash-loop-window resets the
    /// count; --crash-loop-limit fast failures in a row mark the slot as crash-looping
    /// (it keeps retrying at the capped delay, and recovers by itself).
    fn supervise(server: &Arc<Server>, i: usize) {
        let app = crate::app();
        let slots = server.children.slots.get().expect("slots");
        let (window, limit) = (app.cfg.crash_loop_window, app.cfg.crash_loop_limit);
        let mut failures: u32 = 0;
        let mut generation: u64 = 0;
        loop {
            if app.shutting_down.load(Ordering::Acquire) || server.retired() {
                return;
            }
            generation += 1;
            let tag = format!("{}shared-{i}.{generation}", server.tag_prefix());
            let why = match crate::child::spawn(server, &tag, Vec::new()) {
                Ok((child, stdout)) => {
                    let up = Arc::new(Upstream::new(child.clone(), true));
                    start_router(&up, stdout);
                    slots.slots.locked()[i].up = Some(up);
                    slots.changed.notify_all();
                    if generation > 1 {
                        app.metrics.child_restarted();
                    }
                    crate::log!(
                        Info,
                        "shared_child",
                        session = tag; "shared child {i} started, pid {}",
                        child.pid
                    );
                    let status = match child.wait_exit(window) {
                        Some(s) => s,
                        None => {
                            failures = 0;
                            if slots.slots.locked()[i].crash_loop.take().is_some() {
                                crate::log!(
                                    Info,
                                    "crash_loop_over",
                                    session = tag; "child has stayed up for {window:?}; ready again"
                                );
                            }
                            loop {
                                if let Some(s) = child.wait_exit(EXIT_RECHECK) {
                                    break s;
                                }
                            }
                        }
                    };
                    slots.slots.locked()[i].up = None;
                    let tail = child.final_stderr_tail();
                    let last = tail.last().map(|l| format!("; last stderr: {l}"));
                    format!("{}{}", child.ended(&status), last.unwrap_or_default())
                }
                Err(msg) => msg,
            };
            if app.shutting_down.load(Ordering::Acquire) || server.retired() {
                return;
            }
            // A child that stayed up past the window reset the count while it ran.
            failures += 1;
            let delay = backoff(failures - 1);
            if failures >= limit {
                let reason = format!("crash loop: the server process failed {failures} times in a row without staying up for {window:?}; last: {why}");
                let mut g = slots.slots.locked();
                if g[i].crash_loop.is_none() {
                    crate::log!(Error, "crash_loop", session = tag; "{reason}");
                }
                g[i].crash_loop = Some(reason);
                drop(g);
                slots.changed.notify_all();
            }
            crate::log!(
                Warn,
                "child_restart",
                session = tag; "shared child {i} {why}; restarting in {delay:?}"
            );
            std::thread::sleep(delay);
        }
    }

    /// The least loaded running shared child. While none is running (between a crash and
    /// its restart) this waits for one, for at most the longest restart delay; a slot
    /// that is crash-looping answers 503 at once.
    pub fn pick(server: &Server) -> Result<Arc<Upstream>, Reply> {
        let app = crate::app();
        let Some(slots) = server.children.slots.get() else {
            return Err(Refusal::Restarting.into());
        };
        let deadline = Instant::now() + app.cfg.restart_delay_max + RESTART_WAIT_SLACK;
        let mut g = slots.slots.locked();
        loop {
            // A child whose stdout has ended is not offered, though not yet reaped.
            let best = g
                .iter()
                .filter_map(|s| s.up.clone())
                .filter(|u| !u.stdout_closed())
                .min_by_key(|u| u.load());
            if let Some(up) = best {
                return Ok(up);
            }
            if let Some(reason) = g.iter().find_map(|s| s.crash_loop.clone()) {
                return Err(Refusal::CrashLoop(reason).into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Refusal::Restarting.into());
            }
            g = slots
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Why /readyz should say no, in shared mode.
    pub fn crash_loop(server: &Server) -> Option<String> {
        let slots = server.children.slots.get()?;
        let g = slots.slots.locked();
        g.iter().find_map(|s| s.crash_loop.clone())
    }

    /// A retired server's warm children: ended (no session will take them).
    pub fn retire_children(server: &Server) {
        let Some(warm) = server.children.warm.get() else {
            return;
        };
        let ready: Vec<_> = warm.ready.locked().drain(..).collect();
        let _ = warm.wake.send(());
        let grace = crate::app().cfg.shutdown_grace;
        for (c, _) in ready {
            c.terminate(grace);
        }
    }

    /// A retired server's shared children that no session is on: ended now (the
    /// others end when their last session leaves, `Upstream::release`).
    pub fn stop_idle_shared(server: &Server) {
        let Some(slots) = server.children.slots.get() else {
            return;
        };
        let idle: Vec<Arc<Upstream>> = slots
            .slots
            .locked()
            .iter()
            .filter_map(|s| s.up.clone())
            .filter(|u| u.load() == 0)
            .collect();
        let grace = crate::app().cfg.shutdown_grace;
        for u in idle {
            if let Some(c) = u.process() {
                crate::log!(Info, "shared_retired", session = c.tag; "the server was replaced or removed and no session is left on this child: ending it");
                c.terminate(grace);
            }
        }
    }

    /// A shared server has a child up now.
    pub fn any_running(server: &Server) -> bool {
        server
            .children
            .slots
            .get()
            .is_some_and(|s| s.slots.locked().iter().any(|s| s.up.is_some()))
    }

    // ---- session mode: the warm pool -------------------------------------------------

    struct Warm {
        ready: Mutex<VecDeque<(Arc<ChildProc>, ChildStdout)>>,
        wake: crossbeam_channel::Sender<()>,
    }

    fn warm_take(server: &Server) -> Option<(Arc<ChildProc>, ChildStdout)> {
        let warm = server.children.warm.get()?;
        let taken = {
            let mut ready = warm.ready.locked();
            loop {
                match ready.pop_front() {
                    Some((c, _)) if c.has_exited() => continue,
                    other => break other,
                }
            }
        };
        let _ = warm.wake.send(());
        taken
    }

    /// Keeps --warm children started (not initialized) so a new session skips the cold
    /// start. A pooled child that dies is replaced; one that keeps dying fast is
    /// replaced with the supervisor's backoff.
    pub fn start_warm_pool(server: &Arc<Server>) {
        let app = crate::app();
        let want = server.spec.warm;
        if want == 0 {
            return;
        }
        let (wake, rx) = crossbeam_channel::unbounded::<()>();
        let _ = server.children.warm.set(Warm {
            ready: Mutex::new(VecDeque::new()),
            wake: wake.clone(),
        });
        let _ = wake.send(());
        let server = server.clone();
        crate::spawn_thread("warm-pool", move || {
            let warm = server.children.warm.get().expect("warm pool");
            let window = app.cfg.crash_loop_window;
            let mut failures = 0u32;
            let mut generation = 0u64;
            while rx.recv().is_ok() {
                while rx.try_recv().is_ok() {}
                loop {
                    if app.shutting_down.load(Ordering::Acquire) || server.retired() {
                        return;
                    }
                    let mut died_fast = false;
                    let have = {
                        let mut ready = warm.ready.locked();
                        ready.retain(|(c, _)| {
                            if !c.has_exited() {
                                return true;
                            }
                            let lived = c.started.elapsed();
                            died_fast |= lived < window;
                            crate::log!(Warn, "warm_exit", session = c.tag; "warm child pid {} exited while waiting for a session (after {lived:?}); replacing it", c.pid);
                            false
                        });
                        ready.len()
                    };
                    if died_fast {
                        failures += 1;
                        std::thread::sleep(backoff(failures - 1));
                    } else if have > 0 {
                        failures = 0;
                    }
                    if have >= want {
                        break;
                    }
                    generation += 1;
                    let tag = format!("{}warm-{generation}", server.tag_prefix());
                    match crate::child::spawn(&server, &tag, Vec::new()) {
                        Ok((c, out)) => {
                            let wake = wake.clone();
                            c.on_exit(Box::new(move || {
                                let _ = wake.send(());
                            }));
                            let pid = c.pid;
                            // In the pool before the line that says it is there.
                            warm.ready.locked().push_back((c, out));
                            crate::log!(
                                Info,
                                "warm_ready",
                                session = tag; "warm child started, pid {pid}"
                            );
                        }
                        Err(_) => {
                            failures += 1;
                            std::thread::sleep(backoff(failures - 1));
                        }
                    }
                }
            }
        });
    }
}

// ======================================================================================
/// The merged endpoint: with more than one server in --config, the front paths (/mcp,
/// /sse) serve one MCP server made of them all. It is in-process and speaks to its
/// session as a 2025 child would (so both eras, resumption and the legacy transport
/// serve it as they serve any child), and it reaches each server through a session of
/// its own on that server (`Transport::Member`), opened the first time the server is
/// needed: each server keeps its mode (a child per merged session in session mode, the
/// shared child with id rewriting in shared mode), its tool filter and its limits.
/// Tools and prompts are named `SERVER__name` (--tool-separator); resources keep their
/// URIs and go to the server that listed them (the first in the file, when two do).
/// Owns: the merged server of one session (`Merger`), name prefixes, URI routing,
/// merged lists and capabilities. Touches: `sessions` (its own session and its server
/// sessions), `servers` (what each server said at initialize). Rules: issue 18.
mod merged {
    use super::*;
    use crate::http::Refusal;
    use crate::message::{classify, id_key, Kind};
    use crate::servers::Server;
    use crate::sessions::{self, EndReason, Session};
    use serde_json::{json, Value};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock, Weak};

    /// A merged answer waits this long for servers started for it (their initialize, a
    /// list): a slow or stuck server leaves its part out rather than hold the client.
    pub const DEFAULT_MERGE_WAIT: Duration = Duration::from_secs(10);
    /// A server that could not start for a session is tried again after this (a
    /// shared child restarting, capacity): not at every request, not never.
    const MEMBER_RETRY: Duration = Duration::from_secs(5);
    /// Pages of one server's list followed for one merged list (ours has no cursor).
    const MAX_LIST_PAGES: usize = 100;
    /// The version the merged server answers when the client asks for one we do not
    /// carry.
    const LATEST: &str = "2025-11-25";

    /// A server session's tie to the merged server it serves.
    pub struct MemberLink {
        merger: Weak<Merger>,
        index: usize,
    }

    impl MemberLink {
        /// Its merged server is still open.
        pub fn serving(&self) -> bool {
            self.merger.upgrade().is_some_and(|m| !m.st.locked().closed)
        }

        /// A server's request can reach the client now (the merged session has a
        /// stream open): what a shared child's request target is chosen by.
        pub fn client_can_receive(&self) -> bool {
            self.merger
                .upgrade()
                .and_then(|m| m.session.get().and_then(Weak::upgrade))
                .is_some_and(|s| s.has_open_stream())
        }
    }

    /// The merged server of one session (or one 2026-07-28 carrier).
    pub struct Merger {
        me: Weak<Merger>,
        session: OnceLock<Weak<Session>>,
        ctx: crate::auth::Context,
        st: Mutex<State>,
    }

    struct State {
        members: Vec<Member>,
        /// The client's initialize params: each server is initialized with them.
        hello: Option<Value>,
        next: u64,
        /// Our request id on a server -> what it is for.
        pending: HashMap<u64, Pending>,
        /// Our id for a server's request to the client -> (server, its id).
        asks: HashMap<u64, (usize, Value)>,
        /// Resource URI -> the server that listed it (the first, in file order).
        uris: HashMap<String, usize>,
        /// Resource template prefix (before its first `{`) -> the server.
        templates: Vec<(String, usize)>,
        /// The resource lists have been read for this session (a URI no list named
        /// reads them once before it is refused); a server's list_changed clears it.
        uris_learnt: bool,
        closed: bool,
    }

    struct Member {
        server: Arc<Server>,
        session: Option<Arc<Session>>,
        phase: Phase,
        /// Its capabilities, from its initialize (or what the server said before).
        caps: Value,
    }

    enum Phase {
        /// Not started for this session yet.
        Idle,
        /// Initializing: what is for it waits here.
        Starting(Vec<Value>),
        Ready,
        /// Cannot serve this session (start failed, removed by a reload): why, since.
        Failed(String, Instant),
    }

    impl Phase {
        /// Worth asking: not a failure younger than MEMBER_RETRY.
        fn usable(&self) -> bool {
            !matches!(self, Phase::Failed(_, since) if since.elapsed() < MEMBER_RETRY)
        }
    }

    enum Pending {
        /// A client request handed to one server: its answer goes back under `id`.
        Pass { id: Value, member: usize },
        /// One server's part of a merged answer.
        Part { gather: Arc<Gather>, member: usize },
        /// Our initialize of a server (and the merged initialize waiting for it).
        Hello {
            member: usize,
            gather: Option<Arc<Gather>>,
        },
        /// Ours, its answer unwanted (logging/setLevel).
        Discard,
    }

    /// A merged answer being put together from several servers.
    struct Gather {
        client_id: Value,
        method: String,
        st: Mutex<GatherState>,
        /// Wakes the MERGE_WAIT timer when the answer has gone.
        finished: std::sync::Condvar,
        /// The bridge's own gather (the resource lists, learnt on a URI it cannot
        /// route): no answer goes out; this runs instead.
        then: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    /// Capabilities the merged endpoint routes: a server's others (tasks,
    /// experimental) are not offered, since no method of theirs would reach it.
    const ROUTED_CAPABILITIES: &[&str] =
        &["tools", "prompts", "resources", "logging", "completions"];

    #[derive(Default)]
    struct GatherState {
        waiting: usize,
        pages: usize,
        /// (server, its result) in arrival order; put in file order at the end.
        parts: Vec<(usize, Value)>,
        done: bool,
    }

    /// A request to a server under our id. Built member by member: `json!` would copy
    /// `params` through the serializer (a tool's arguments can be large).
    fn request_to(ours: u64, method: &str, params: Value) -> Value {
        let mut m = serde_json::Map::with_capacity(4);
        m.insert("jsonrpc".into(), Value::from("2.0"));
        m.insert("id".into(), Value::from(ours));
        m.insert("method".into(), Value::from(method));
        m.insert("params".into(), params);
        Value::Object(m)
    }

    /// What a list method merges, and which capability a server needs for it.
    fn list_kind(method: &str) -> Option<(&'static str, &'static str)> {
        match method {
            "tools/list" => Some(("tools", "tools")),
            "prompts/list" => Some(("prompts", "prompts")),
            "resources/list" => Some(("resources", "resources")),
            "resources/templates/list" => Some(("resourceTemplates", "resources")),
            _ => None,
        }
    }

    impl Merger {
        pub fn new(ctx: crate::auth::Context) -> Arc<Merger> {
            let members = crate::servers::all()
                .into_iter()
                .filter(|s| s.spec.mode != crate::config::Mode::Oneshot)
                .map(|server| Member {
                    caps: server
                        .known_hello()
                        .and_then(|h| h.get("capabilities").cloned())
                        .unwrap_or(Value::Null),
                    server,
                    session: None,
                    phase: Phase::Idle,
                })
                .collect();
            Arc::new_cyclic(|me| Merger {
                me: me.clone(),
                session: OnceLock::new(),
                ctx,
                st: Mutex::new(State {
                    members,
                    hello: None,
                    next: 0,
                    pending: HashMap::new(),
                    asks: HashMap::new(),
                    uris: HashMap::new(),
                    templates: Vec::new(),
                    uris_learnt: false,
                    closed: false,
                }),
            })
        }

        /// The merged session (or carrier) it serves.
        pub fn attach(&self, session: &Arc<Session>) {
            let _ = self.session.set(Arc::downgrade(session));
        }

        fn to_client(&self, value: Value) {
            let Some(session) = self.client_session() else {
                return;
            };
            sessions::route_value(&session, value.to_string(), &value, false);
        }

        /// The merged session, while it exists; a message for it after its end is
        /// counted and logged, as a child's message after its session's end is.
        fn client_session(&self) -> Option<Arc<Session>> {
            let session = self.session.get().and_then(Weak::upgrade);
            if session.is_none() {
                crate::app().metrics.dropped("session_ended");
                crate::log!(
                    Info,
                    "message_dropped",
                    "merged endpoint: a server's message after its merged session ended"
                );
            }
            session
        }

        fn answer(&self, id: &Value, result: Value) {
            self.to_client(json!({"jsonrpc": "2.0", "id": id, "result": result}));
        }

        fn refuse(&self, id: &Value, refusal: Refusal) {
            crate::app().metrics.rejected(refusal.reason());
            self.to_client(json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": refusal.code(), "message": refusal.message()}}));
        }

        fn error(&self, id: &Value, code: i64, message: &str) {
            self.to_client(json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": code, "message": message}}));
        }

        /// A message from the merged session's client, as a child would read it.
        pub fn hear_client(&self, m: &Value) -> std::io::Result<()> {
            match classify(m) {
                Kind::Request { id, method } => self.request(id, method, m),
                Kind::Notification { method } => self.notification(method, m),
                Kind::Response { id } => self.answer_to_server(id, m),
                Kind::Invalid(_) => {}
            }
            Ok(())
        }

        fn request(&self, id: &Value, method: &str, m: &Value) {
            let params = m.get("params").cloned().unwrap_or(json!({}));
            match method {
                "initialize" => self.initialize(id, params),
                "ping" => self.answer(id, json!({})),
                "logging/setLevel" => {
                    self.to_every_ready(Some(method), &params);
                    self.answer(id, json!({}));
                }
                m if list_kind(m).is_some() => self.list(id, method, params),
                "tools/call" | "prompts/get" => {
                    let name = params.get("name").and_then(Value::as_str).unwrap_or("");
                    let sep = &crate::app().cfg.tool_separator;
                    // The server by its prefix, unless its filter hides the tool.
                    let found = name.split_once(sep.as_str()).and_then(|(server, inner)| {
                        let st = self.st.locked();
                        let i = st.members.iter().position(|x| &*x.server.name == server)?;
                        let tools = &st.members[i].server.spec.tools;
                        let hidden = method == "tools/call" && !tools.admits(inner);
                        (!hidden).then(|| (i, inner.to_string()))
                    });
                    let Some((member, inner)) = found else {
                        let what = if method == "tools/call" {
                            Refusal::UnknownTool(name.to_string())
                        } else {
                            Refusal::UnknownPrompt(name.to_string())
                        };
                        return self.refuse(id, what);
                    };
                    let mut params = params;
                    params["name"] = inner.into();
                    self.pass(member, id, method, params);
                }
                "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                    let uri = params.get("uri").and_then(Value::as_str).unwrap_or("");
                    match self.owner_of(uri) {
                        Some(member) => self.pass(member, id, method, params),
                        None if !self.st.locked().uris_learnt => {
                            // A URI from a tool's result (a resource link), before the
                            // client listed anything: the lists are read, then it is
                            // routed (or refused) as if they had been.
                            let (me, id, m) = (self.me.clone(), id.clone(), m.clone());
                            self.learn_uris(Box::new(move || {
                                if let Some(me) = me.upgrade() {
                                    let method = m["method"].as_str().unwrap_or("").to_string();
                                    me.request(&id, &method, &m);
                                }
                            }));
                        }
                        None => self.refuse(id, Refusal::UnknownResource(uri.to_string())),
                    }
                }
                "completion/complete" => {
                    let r = params.get("ref").cloned().unwrap_or(json!({}));
                    let sep = crate::app().cfg.tool_separator.clone();
                    let target = match r.get("type").and_then(Value::as_str) {
                        Some("ref/prompt") => r
                            .get("name")
                            .and_then(Value::as_str)
                            .and_then(|n| n.split_once(sep.as_str()))
                            .and_then(|(server, inner)| {
                                let st = self.st.locked();
                                let i =
                                    st.members.iter().position(|x| &*x.server.name == server)?;
                                Some((i, Some(inner.to_string())))
                            }),
                        Some("ref/resource") => r
                            .get("uri")
                            .and_then(Value::as_str)
                            .and_then(|u| self.owner_of(u))
                            .map(|i| (i, None)),
                        _ => None,
                    };
                    match target {
                        Some((member, inner)) => {
                            let mut params = params;
                            if let Some(inner) = inner {
                                params["ref"]["name"] = inner.into();
                            }
                            self.pass(member, id, method, params);
                        }
                        None => {
                            self.answer(id, json!({"completion": {"values": [], "hasMore": false}}))
                        }
                    }
                }
                other => self.refuse(id, Refusal::MergedUnknownMethod(other.to_string())),
            }
        }

        fn notification(&self, method: &str, m: &Value) {
            match method {
                // The servers were initialized by us, each when it was first needed.
                "notifications/initialized" => {}
                "notifications/cancelled" => {
                    let wanted = m.pointer("/params/requestId").map(id_key);
                    let found = {
                        let st = self.st.locked();
                        st.pending.iter().find_map(|(ours, p)| match p {
                            Pending::Pass { id, member } if Some(id_key(id)) == wanted => {
                                Some((*ours, *member))
                            }
                            _ => None,
                        })
                    };
                    if let Some((ours, member)) = found {
                        // Its answer, if one still comes, has no one to go to.
                        self.st.locked().pending.remove(&ours);
                        let mut out = m.clone();
                        out["params"]["requestId"] = ours.into();
                        self.send(member, out);
                    }
                }
                _ => self.to_every_ready(None, m),
            }
        }

        /// The client's answer to a server's request: back to that server, under its id.
        fn answer_to_server(&self, id: &Value, m: &Value) {
            let found = id.as_u64().and_then(|n| self.st.locked().asks.remove(&n));
            let Some((member, their_id)) = found else {
                crate::app().metrics.dropped("unknown_id");
                crate::log!(
                    Warn,
                    "message_dropped",
                    "merged endpoint: the client answered id {id}, which no server asked"
                );
                return;
            };
            let mut out = m.clone();
            out["id"] = their_id;
            self.send(member, out);
        }

        fn next_id(st: &mut State) -> u64 {
            st.next += 1;
            st.next
        }

        /// The server that serves a resource URI: the one that listed it, else the one
        /// whose template it matches (the longest), else the only server with resources.
        fn owner_of(&self, uri: &str) -> Option<usize> {
            let st = self.st.locked();
            if let Some(i) = st.uris.get(uri) {
                return Some(*i);
            }
            if let Some((_, i)) = st
                .templates
                .iter()
                .filter(|(prefix, _)| uri.starts_with(prefix.as_str()))
                .max_by_key(|(prefix, _)| prefix.len())
            {
                return Some(*i);
            }
            let with: Vec<usize> = (0..st.members.len())
                .filter(|i| st.members[*i].caps.get("resources").is_some())
                .collect();
            match with.as_slice() {
                [one] => Some(*one),
                _ => None,
            }
        }

        fn initialize(&self, id: &Value, params: Value) {
            let asked = params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or(LATEST)
                .to_string();
            let version = if crate::config::SUPPORTED_VERSIONS.contains(&asked.as_str()) {
                asked
            } else {
                LATEST.to_string()
            };
            let gather = Arc::new(Gather {
                client_id: id.clone(),
                method: format!("initialize {version}"),
                st: Mutex::new(GatherState::default()),
                finished: std::sync::Condvar::new(),
                then: Mutex::new(None),
            });
            let to_start: Vec<usize> = {
                let mut st = self.st.locked();
                st.hello = Some(params);
                (0..st.members.len())
                    .filter(|i| st.members[*i].caps.is_null())
                    .collect()
            };
            gather.st.locked().waiting = to_start.len();
            for i in to_start {
                self.start(i, Some(gather.clone()));
            }
            self.wait_then_finish(&gather);
        }

        /// Finishes a gather now if nothing is outstanding, else after MERGE_WAIT at
        /// the latest.
        fn wait_then_finish(&self, gather: &Arc<Gather>) {
            if gather.st.locked().waiting == 0 {
                return self.finish(gather);
            }
            let (me, g) = (self.me.clone(), gather.clone());
            crate::spawn_thread("merged-wait", move || {
                let deadline = Instant::now() + DEFAULT_MERGE_WAIT;
                let mut st = g.st.locked();
                while !st.done {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    st = g
                        .finished
                        .wait_timeout(st, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
                let late = !st.done;
                drop(st);
                if let (true, Some(m)) = (late, me.upgrade()) {
                    crate::log!(Warn, "merged_slow", "merged {}: a server did not answer within {DEFAULT_MERGE_WAIT:?}; answering without it", g.method);
                    m.finish(&g);
                }
            });
        }

        /// Starts a server for this session: its session, then our initialize.
        fn start(&self, member: usize, gather: Option<Arc<Gather>>) {
            let (server, hello) = {
                let mut st = self.st.locked();
                let closed = st.closed;
                let m = &mut st.members[member];
                if m.server.retired() {
                    // A reload replaced it since this session began: the new one serves.
                    match crate::servers::named(&m.server.name) {
                        Some(now) => m.server = now,
                        None => {
                            m.phase = Phase::Failed(
                                "removed from the configuration".into(),
                                Instant::now(),
                            )
                        }
                    }
                }
                let startable = match m.phase {
                    Phase::Idle => true,
                    Phase::Failed(..) => m.phase.usable(),
                    Phase::Starting(_) | Phase::Ready => false,
                };
                if closed || !startable {
                    drop(st);
                    if let Some(g) = gather {
                        self.part_done(&g, None);
                    }
                    return;
                }
                m.phase = Phase::Starting(Vec::new());
                (m.server.clone(), st.hello.clone().unwrap_or(json!({})))
            };
            // On a thread of its own: a spawn, or a shared child's restart (up to
            // --restart-delay-max), holds up neither the client's request nor the
            // other servers; what is for this one waits in its queue.
            let me = self.me.clone();
            let g = gather.clone();
            let started = crate::spawn_thread("merged-start", move || {
                if let Some(m) = me.upgrade() {
                    m.open_member(member, server, hello, g);
                }
            });
            if !started {
                self.failed(member, "no thread to start it");
                if let Some(g) = gather {
                    self.part_done(&g, None);
                }
            }
        }

        /// A server's session for this merged session, and our initialize on it.
        fn open_member(
            &self,
            member: usize,
            server: Arc<Server>,
            hello: Value,
            gather: Option<Arc<Gather>>,
        ) {
            let tag = self
                .session
                .get()
                .and_then(Weak::upgrade)
                .map(|s| s.tag.clone())
                .unwrap_or_default();
            crate::log!(Info, "merged_start", session = tag, server = server.name; "merged session needs server {:?}: opening its session there", &*server.name);
            let mut ctx = self.ctx.clone();
            ctx.env
                .retain(|(k, _)| server.spec.pass_headers.iter().any(|(_, v)| v == k));
            let link = MemberLink {
                merger: self.me.clone(),
                index: member,
            };
            let session = match sessions::create_member(&server, ctx, link) {
                Ok(s) => s,
                Err(why) => {
                    crate::log!(Warn, "merged_server_failed", server = server.name; "merged endpoint: server {:?} cannot start: {why}; its tools are left out", &*server.name);
                    self.failed(member, &why);
                    if let Some(g) = gather {
                        self.part_done(&g, None);
                    }
                    return;
                }
            };
            let ours = {
                let mut st = self.st.locked();
                // Closed, or the session ended, while it opened: it is not wanted.
                let overtaken =
                    st.closed || !matches!(st.members[member].phase, Phase::Starting(_));
                if overtaken {
                    drop(st);
                    sessions::end(&session, EndReason::MergedEnded);
                    if let Some(g) = gather {
                        self.part_done(&g, None);
                    }
                    return;
                }
                st.members[member].session = Some(session.clone());
                let ours = Self::next_id(&mut st);
                st.pending.insert(ours, Pending::Hello { member, gather });
                ours
            };
            let init =
                json!({"jsonrpc": "2.0", "id": ours, "method": "initialize", "params": hello});
            if session.submit(&[init]).is_err() {
                self.failed(member, "it does not take input");
            }
        }

        /// A server that cannot serve this session: what waited for it gets an error.
        fn failed(&self, member: usize, why: &str) {
            let queued = {
                let mut st = self.st.locked();
                let failed = Phase::Failed(why.into(), Instant::now());
                match std::mem::replace(&mut st.members[member].phase, failed) {
                    Phase::Starting(q) => q,
                    _ => Vec::new(),
                }
            };
            for q in queued {
                self.unsendable(member, &q, why);
            }
        }

        /// A message for a server: now if it is ready, queued while it starts (and it is
        /// started if it has not been).
        fn send(&self, member: usize, m: Value) {
            enum Then {
                Submit(Arc<Session>),
                Start,
                Refuse(String),
            }
            // Twice at most: an idle server is started, then the message goes.
            for _ in 0..2 {
                let then = {
                    let mut st = self.st.locked();
                    let mm = &mut st.members[member];
                    let usable = mm.phase.usable();
                    match &mut mm.phase {
                        Phase::Starting(q) => {
                            q.push(m);
                            return;
                        }
                        Phase::Ready => match mm.session.clone() {
                            Some(s) => Then::Submit(s),
                            None => Then::Refuse("its session is gone".into()),
                        },
                        Phase::Idle => Then::Start,
                        Phase::Failed(..) if usable => Then::Start,
                        Phase::Failed(why, _) => Then::Refuse(why.clone()),
                    }
                };
                match then {
                    Then::Submit(s) => {
                        let _ = s.submit(&[m]);
                        return;
                    }
                    Then::Start => self.start(member, None),
                    Then::Refuse(why) => return self.unsendable(member, &m, &why),
                }
            }
            // Not started (the merged session is closing): a request still gets its answer.
            self.unsendable(member, &m, "it could not be started");
        }

        /// A message that cannot reach its server: a request is answered with an error.
        fn unsendable(&self, member: usize, m: &Value, why: &str) {
            if let Some(ours) = m.get("id").and_then(Value::as_u64) {
                let name = self.st.locked().members[member].server.name.clone();
                self.server_answered(member, ours, &json!({"jsonrpc": "2.0", "id": ours,
                    "error": {"code": -32603, "message": format!("server {name:?} cannot serve: {why}")}}));
            }
        }

        /// A client request for one server, under an id of ours.
        fn pass(&self, member: usize, id: &Value, method: &str, params: Value) {
            let ours = {
                let mut st = self.st.locked();
                let ours = Self::next_id(&mut st);
                st.pending.insert(
                    ours,
                    Pending::Pass {
                        id: id.clone(),
                        member,
                    },
                );
                ours
            };
            self.send(member, request_to(ours, method, params));
        }

        /// The same message to every server running for this session.
        /// `request`: a request of that method with `message` as its params, under an
        /// id of ours each (its answer unwanted); None: `message` is a notification,
        /// passed as it is.
        fn to_every_ready(&self, request: Option<&str>, message: &Value) {
            let targets: Vec<(Arc<Session>, Value)> = {
                let mut st = self.st.locked();
                let ready: Vec<Arc<Session>> = st
                    .members
                    .iter()
                    .filter(|m| matches!(m.phase, Phase::Ready))
                    .filter_map(|m| m.session.clone())
                    .collect();
                ready
                    .into_iter()
                    .map(|s| match request {
                        Some(method) => {
                            let n = Self::next_id(&mut st);
                            st.pending.insert(n, Pending::Discard);
                            (s, request_to(n, method, message.clone()))
                        }
                        None => (s, message.clone()),
                    })
                    .collect()
            };
            for (s, m) in targets {
                let _ = s.submit(&[m]);
            }
        }

        /// Reads every server's resources and templates for this session, then runs
        /// `then`.
        fn learn_uris(&self, then: Box<dyn FnOnce() + Send>) {
            self.st.locked().uris_learnt = true;
            let me = self.me.clone();
            self.gather(
                Value::Null,
                "resources/list",
                json!({}),
                Some(Box::new(move || {
                    if let Some(m) = me.upgrade() {
                        m.gather(
                            Value::Null,
                            "resources/templates/list",
                            json!({}),
                            Some(then),
                        );
                    }
                })),
            );
        }

        /// A merged list: every server that may have one is asked (started if it must
        /// be); the answer comes when all have answered or MERGE_WAIT has passed.
        fn list(&self, id: &Value, method: &str, params: Value) {
            self.gather(id.clone(), method, params, None);
        }

        fn gather(
            &self,
            client_id: Value,
            method: &str,
            params: Value,
            then: Option<Box<dyn FnOnce() + Send>>,
        ) {
            let (_, cap) = list_kind(method).expect("a list method");
            let gather = Arc::new(Gather {
                client_id,
                method: method.to_string(),
                st: Mutex::new(GatherState::default()),
                finished: std::sync::Condvar::new(),
                then: Mutex::new(then),
            });
            let asked: Vec<usize> = {
                let st = self.st.locked();
                (0..st.members.len())
                    .filter(|i| {
                        let m = &st.members[*i];
                        m.phase.usable() && (m.caps.is_null() || m.caps.get(cap).is_some())
                    })
                    .collect()
            };
            gather.st.locked().waiting = asked.len();
            let mut params = params;
            if let Some(p) = params.as_object_mut() {
                p.remove("cursor");
            }
            for member in asked {
                self.ask_part(member, &gather, method, params.clone());
            }
            self.wait_then_finish(&gather);
        }

        fn ask_part(&self, member: usize, gather: &Arc<Gather>, method: &str, params: Value) {
            let ours = {
                let mut st = self.st.locked();
                let ours = Self::next_id(&mut st);
                st.pending.insert(
                    ours,
                    Pending::Part {
                        gather: gather.clone(),
                        member,
                    },
                );
                ours
            };
            self.send(member, request_to(ours, method, params));
        }

        /// One server's part is in (None: it had nothing to give).
        fn part_done(&self, gather: &Arc<Gather>, part: Option<(usize, Value)>) {
            let complete = {
                let mut g = gather.st.locked();
                if let Some(p) = part {
                    g.parts.push(p);
                }
                g.waiting = g.waiting.saturating_sub(1);
                g.waiting == 0
            };
            if complete {
                self.finish(gather);
            }
        }

        /// The merged answer, once.
        fn finish(&self, gather: &Arc<Gather>) {
            let mut parts = {
                let mut g = gather.st.locked();
                if std::mem::replace(&mut g.done, true) {
                    return;
                }
                gather.finished.notify_all();
                std::mem::take(&mut g.parts)
            };
            parts.sort_by_key(|(i, _)| *i);
            let id = gather.client_id.clone();
            if let Some(version) = gather.method.strip_prefix("initialize ") {
                let result = self.initialize_result(version);
                return self.answer(&id, result);
            }
            let (key, _) = list_kind(&gather.method).expect("a list gather");
            let sep = crate::app().cfg.tool_separator.clone();
            let mut items: Vec<Value> = Vec::new();
            let mut st = self.st.locked();
            for (member, result) in parts {
                let name = st.members[member].server.name.clone();
                let Some(list) = result.get(key).and_then(Value::as_array) else {
                    continue;
                };
                for item in list {
                    // A server's list entry that is not an object is its bug: left out.
                    if !item.is_object() {
                        continue;
                    }
                    let mut item = item.clone();
                    match key {
                        "tools" | "prompts" => {
                            let inner = item.get("name").and_then(Value::as_str).unwrap_or("");
                            item["name"] = format!("{name}{sep}{inner}").into();
                        }
                        "resources" => {
                            let uri = item.get("uri").and_then(Value::as_str).unwrap_or("");
                            match st.uris.get(uri) {
                                Some(first) if *first != member => {
                                    let first = st.members[*first].server.name.clone();
                                    crate::log!(Warn, "merged_uri_conflict", server = name; "resource {uri} is listed by {first:?} and {name:?}: {first:?} (first in the file) serves it");
                                    continue;
                                }
                                _ => {
                                    st.uris.insert(uri.to_string(), member);
                                }
                            }
                        }
                        _ => {
                            let t = item
                                .get("uriTemplate")
                                .and_then(Value::as_str)
                                .unwrap_or("");
                            let prefix = t.split('{').next().unwrap_or("").to_string();
                            if !prefix.is_empty() && !st.templates.iter().any(|(p, _)| *p == prefix)
                            {
                                st.templates.push((prefix, member));
                            }
                        }
                    }
                    items.push(item);
                }
            }
            drop(st);
            if let Some(then) = gather.then.locked().take() {
                return then();
            }
            self.answer(&id, json!({ key: items }));
        }

        /// The merged InitializeResult: the union of the capabilities of every server
        /// that could answer, their instructions under their names.
        fn initialize_result(&self, version: &str) -> Value {
            let st = self.st.locked();
            let mut caps = serde_json::Map::new();
            let mut instructions = Vec::new();
            for m in &st.members {
                let Some(c) = m.caps.as_object() else {
                    continue;
                };
                for (k, v) in c
                    .iter()
                    .filter(|(k, _)| ROUTED_CAPABILITIES.contains(&k.as_str()))
                {
                    let entry = caps.entry(k.clone()).or_insert_with(|| json!({}));
                    if let (Some(e), Some(v)) = (entry.as_object_mut(), v.as_object()) {
                        for (kk, vv) in v {
                            if vv.as_bool() == Some(true) || !e.contains_key(kk) {
                                e.insert(kk.clone(), vv.clone());
                            }
                        }
                    }
                }
                if let Some(text) = m.server.known_hello().and_then(|h| {
                    h.get("instructions")
                        .and_then(Value::as_str)
                        .map(String::from)
                }) {
                    instructions.push(format!("## {}\n{text}", m.server.name));
                }
            }
            // Any server's list may change for this session (one starts, one leaves).
            for k in ["tools", "prompts", "resources"] {
                if let Some(o) = caps.get_mut(k).and_then(Value::as_object_mut) {
                    o.insert("listChanged".into(), json!(true));
                }
            }
            let mut result = json!({
                "protocolVersion": version,
                "capabilities": caps,
                "serverInfo": {"name": "stdio-sse", "title": "stdio-sse (merged)",
                    "version": env!("CARGO_PKG_VERSION")},
            });
            if !instructions.is_empty() {
                result["instructions"] = instructions.join("\n\n").into();
            }
            result
        }

        /// What a server said, on its session's reader thread.
        fn hear_server(&self, member: usize, session: &Arc<Session>, json: String, value: &Value) {
            match classify(value) {
                Kind::Response { id } => {
                    let Some(ours) = id.as_u64() else {
                        crate::app().metrics.dropped("unknown_id");
                        return;
                    };
                    let pass = {
                        let mut st = self.st.locked();
                        match st.pending.remove(&ours) {
                            Some(Pending::Pass { id, member: m }) if m == member => Some(id),
                            Some(p) => {
                                st.pending.insert(ours, p);
                                None
                            }
                            None => None,
                        }
                    };
                    match pass {
                        Some(id) => self.pass_answer(id, json, value),
                        None => self.server_answered(member, ours, value),
                    }
                }
                Kind::Request { id, method } => {
                    if method == "ping" {
                        let _ =
                            session.submit(&[json!({"jsonrpc": "2.0", "id": id, "result": {}})]);
                        return;
                    }
                    let ours = {
                        let mut st = self.st.locked();
                        let ours = Self::next_id(&mut st);
                        st.asks.insert(ours, (member, id.clone()));
                        ours
                    };
                    let mut out = value.clone();
                    out["id"] = ours.into();
                    self.to_client(out);
                }
                Kind::Notification { method } => {
                    if method == "notifications/resources/list_changed" {
                        self.st.locked().uris_learnt = false;
                    }
                    let mut out = value.clone();
                    if method == "notifications/cancelled" {
                        let theirs = value.pointer("/params/requestId").map(id_key);
                        let ours = self.st.locked().asks.iter().find_map(|(o, (m, t))| {
                            (*m == member && Some(id_key(t)) == theirs).then_some(*o)
                        });
                        match ours {
                            Some(o) => out["params"]["requestId"] = o.into(),
                            None => return,
                        }
                    }
                    self.to_client(out);
                }
                Kind::Invalid(_) => {}
            }
        }

        /// A server's answer to a client's request, under the client's id: the server's
        /// own text with the id put back (a tool's result can be large: not parsed and
        /// printed again), except for a 2026-07-28 carrier, which reads the whole answer.
        fn pass_answer(&self, id: Value, json: String, value: &Value) {
            let Some(session) = self.client_session() else {
                return;
            };
            let span = crate::modern::json_text::member(&json, "id");
            match span.filter(|_| !session.is_carrier()) {
                Some((start, end)) => {
                    let id_text = id.to_string();
                    let mut text = String::with_capacity(json.len() + id_text.len());
                    text.push_str(&json[..start]);
                    text.push_str(&id_text);
                    text.push_str(&json[end..]);
                    // What routing reads of an answer: its id, and result or error.
                    let outcome = if value.get("error").is_some() {
                        "error"
                    } else {
                        "result"
                    };
                    let mut stub = serde_json::Map::with_capacity(3);
                    stub.insert("jsonrpc".into(), Value::from("2.0"));
                    stub.insert("id".into(), id);
                    stub.insert(outcome.into(), Value::Object(serde_json::Map::new()));
                    sessions::route_value(&session, text, &Value::Object(stub), false);
                }
                None => {
                    let mut out = value.clone();
                    out["id"] = id;
                    self.to_client(out);
                }
            }
        }

        fn server_answered(&self, member: usize, ours: u64, value: &Value) {
            // Only an answer from the server it was sent to (ids are ours, one count for
            // every server: another server's answer under it is that server's bug).
            let pending = {
                let mut st = self.st.locked();
                let from = |p: &Pending| match p {
                    Pending::Pass { member: m, .. }
                    | Pending::Part { member: m, .. }
                    | Pending::Hello { member: m, .. } => *m == member,
                    Pending::Discard => true,
                };
                match st.pending.get(&ours) {
                    Some(p) if from(p) => st.pending.remove(&ours),
                    _ => None,
                }
            };
            match pending {
                Some(Pending::Pass { id, .. }) => {
                    let mut out = value.clone();
                    out["id"] = id;
                    self.to_client(out);
                }
                Some(Pending::Part { gather, member }) => {
                    let Some(result) = value.get("result") else {
                        return self.part_done(&gather, None);
                    };
                    let next = result.get("nextCursor").filter(|c| !c.is_null()).cloned();
                    let more = next.is_some() && {
                        let mut g = gather.st.locked();
                        g.pages += 1;
                        g.pages < MAX_LIST_PAGES
                    };
                    {
                        let mut g = gather.st.locked();
                        g.parts.push((member, result.clone()));
                        if more {
                            g.waiting += 1;
                        }
                    }
                    if more {
                        self.ask_part(member, &gather, &gather.method, json!({"cursor": next}));
                    }
                    self.part_done(&gather, None);
                }
                Some(Pending::Hello { gather, .. }) => {
                    self.hello_answered(member, value);
                    if let Some(g) = gather {
                        self.part_done(&g, None);
                    }
                }
                Some(Pending::Discard) => {}
                None => {
                    crate::app().metrics.dropped("unknown_id");
                    crate::log!(
                        Debug,
                        "message_dropped",
                        "merged endpoint: answer {ours} that nothing waits for"
                    );
                }
            }
        }

        fn hello_answered(&self, member: usize, value: &Value) {
            let Some(result) = value
                .get("result")
                .filter(|r| r.get("protocolVersion").is_some())
            else {
                let why = value
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("no initialize result")
                    .to_string();
                crate::log!(
                    Warn,
                    "merged_server_failed",
                    "merged endpoint: a server refused initialize: {why}"
                );
                return self.failed(member, &format!("initialize refused: {why}"));
            };
            // What waited goes after `initialized`, in order, before anything sent later:
            // the phase stays Starting (so later messages queue) until the queue is empty.
            let (session, mut batch) = {
                let mut st = self.st.locked();
                let m = &mut st.members[member];
                m.server.remember_hello(result);
                m.caps = result.get("capabilities").cloned().unwrap_or(json!({}));
                let queued = match &mut m.phase {
                    Phase::Starting(q) => std::mem::take(q),
                    _ => Vec::new(),
                };
                (m.session.clone(), queued)
            };
            let Some(session) = session else { return };
            batch.insert(
                0,
                json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            );
            loop {
                let _ = session.submit(&batch);
                let mut st = self.st.locked();
                let m = &mut st.members[member];
                match &mut m.phase {
                    Phase::Starting(q) if !q.is_empty() => batch = std::mem::take(q),
                    Phase::Starting(_) => {
                        m.phase = Phase::Ready;
                        return;
                    }
                    _ => return,
                }
            }
        }

        /// A server's session ended (its child exited, a reload removed it): what waited
        /// on it gets an error, and the client hears its lists changed. A server still
        /// configured starts again when next needed.
        fn server_ended(&self, member: usize, why: &str) {
            let (orphans, parts, name) = {
                let mut st = self.st.locked();
                if st.closed {
                    return;
                }
                let m = &mut st.members[member];
                m.session = None;
                let next = if m.server.retired() {
                    Phase::Failed(why.to_string(), Instant::now())
                } else {
                    Phase::Idle
                };
                // Requests that waited for it to start are among its pending entries,
                // answered below with the rest.
                m.phase = next;
                let name = m.server.name.clone();
                let mine: Vec<u64> = st
                    .pending
                    .iter()
                    .filter(|(_, p)| match p {
                        Pending::Pass { member: x, .. } | Pending::Part { member: x, .. } => {
                            *x == member
                        }
                        Pending::Hello { member: x, .. } => *x == member,
                        Pending::Discard => false,
                    })
                    .map(|(k, _)| *k)
                    .collect();
                let mut orphans = Vec::new();
                let mut parts = Vec::new();
                for k in mine {
                    match st.pending.remove(&k) {
                        Some(Pending::Pass { id, .. }) => orphans.push(id),
                        Some(Pending::Part { gather, .. }) => parts.push(gather),
                        Some(Pending::Hello {
                            gather: Some(g), ..
                        }) => parts.push(g),
                        _ => {}
                    }
                }
                st.asks.retain(|_, (m, _)| *m != member);
                st.uris.retain(|_, m| *m != member);
                st.templates.retain(|(_, m)| *m != member);
                (orphans, parts, name)
            };
            for id in orphans {
                self.error(&id, -32603, &format!("server {name:?} ended: {why}"));
            }
            for g in parts {
                self.part_done(&g, None);
            }
            for list in ["tools", "prompts", "resources"] {
                self.to_client(json!({"jsonrpc": "2.0", "method": format!("notifications/{list}/list_changed")}));
            }
        }

        /// The merged session ended: so does every server session it opened (their
        /// children are ended as a session's are).
        pub fn close(&self) {
            let sessions: Vec<Arc<Session>> = {
                let mut st = self.st.locked();
                st.closed = true;
                st.pending.clear();
                st.members
                    .iter_mut()
                    .filter_map(|m| m.session.take())
                    .collect()
            };
            for s in sessions {
                sessions::end(&s, EndReason::MergedEnded);
            }
        }
    }

    /// A server session's output: to its merged server.
    pub fn from_member(link: &MemberLink, session: &Arc<Session>, json: String, value: &Value) {
        match link.merger.upgrade() {
            Some(m) => m.hear_server(link.index, session, json, value),
            None => {
                crate::app().metrics.dropped("session_ended");
            }
        }
    }

    /// A server session ended.
    pub fn member_ended(link: &MemberLink, why: &str) {
        if let Some(m) = link.merger.upgrade() {
            m.server_ended(link.index, why);
        }
    }
}

// ======================================================================================
/// The child process: one long-lived spawner thread (so PR_SET_PDEATHSIG, which fires
/// when the spawning *thread* exits, means "when stdio-sse dies"), its own process group,
/// stdout split on `\n` only, stderr to our log; its ending is `teardown`'s escalation.
/// Also whether a child can be started at all (`startable`, for /readyz).
/// Touches nothing of HTTP.
/// Owns: spawning, the stdout reader, the stderr tail, reaping, the child table.
/// Touches: `ownership` (process groups), `teardown` (its escalation). Rules: ST-1,
/// ST-4, ST-5, ST-6.
mod child {
    use super::*;
    use crate::config::{ChildLimits, Limit, ServerSpec};
    use crate::servers::Server;
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
    use std::sync::{Condvar, Mutex};

    /// A child's stderr line is logged up to this many characters.
    const MAX_LINE: usize = 1024;
    /// After a child's exit its stderr tail waits this long for the reader's EOF (a
    /// grandchild may hold stderr open).
    const STDERR_SETTLE: Duration = Duration::from_millis(500);

    pub type OnLine = Box<dyn FnMut(String) + Send>;
    pub type OnEof = Box<dyn FnOnce() + Send>;

    pub struct ChildProc {
        pub pid: i32,
        pub tag: String,
        /// The server it runs.
        pub server: Arc<str>,
        pub started: Instant,
        stdin: Mutex<Option<ChildStdin>>,
        life: Mutex<Life>,
        exited: Condvar,
        stderr_tail: Mutex<VecDeque<String>>,
        on_exit: Mutex<Option<OnEof>>,
        /// What it was started under (to say which limit it met).
        limits: crate::config::ChildLimits,
        /// The --pass-header variables it was given: their values are never in the log
        /// or the tap.
        pub secrets: Vec<(String, String)>,
    }

    #[derive(Default)]
    struct Life {
        /// The limit it met, found when it was reaped.
        limit_hit: Option<Limit>,
        /// Set (under this lock) just before the leader is reaped: after it, its pid may
        /// be reused, so no signal may be sent to the group.
        reaping: bool,
        status: Option<ExitStatus>,
        /// stderr reached EOF: the tail holds everything the child wrote.
        stderr_eof: bool,
    }

    struct SpawnJob {
        spec: Arc<Server>,
        tag: String,
        env: Vec<(String, String)>,
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
                let _ = job.reply.send(spawn_here(&job.spec, &job.tag, &job.env));
            }
        });
    }

    fn command(cfg: &ServerSpec) -> Command {
        let mut cmd = Command::new(&cfg.command[0]);
        cmd.args(&cfg.command[1..]);
        // A --pass-header variable is the client's to give: never inherited from us, and
        // absent unless its header is present (or --env gives a fallback).
        for (_, var) in &cfg.pass_headers {
            cmd.env_remove(var);
        }
        cmd.envs(cfg.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &cfg.cwd {
            cmd.current_dir(dir);
        }
        cmd
    }

    fn spawn_here(
        server: &Server,
        tag: &str,
        env: &[(String, String)],
    ) -> Result<(std::process::Child, Arc<ChildProc>), String> {
        let cfg = &server.spec;
        let mut cmd = command(cfg);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Own process group: the whole tree can be signalled, and a Ctrl-C at a terminal
        // reaches only us, so children end in order.
        cmd.process_group(0);
        let limits = &cfg.limits;
        if let Some(user) = &limits.user {
            // std drops the supplementary groups (setgroups(0)) before setuid when root.
            cmd.uid(user.uid).gid(user.gid);
        }
        let rlimits = rlimits_of(limits);
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                // After setuid (std's order): lowering is allowed to anyone, and the
                // parent-death signal below is not cleared by a later credential change.
                for &(resource, soft, hard) in &rlimits {
                    set_rlimit(resource, soft, hard)?;
                }
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
        let spawned = cmd.spawn();
        if let Ok(c) = &spawned {
            crate::ownership::own_group(c.id() as i32);
        }
        let child = spawned.map_err(|e| {
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
            server: server.name.clone(),
            started: Instant::now(),
            stdin: Mutex::new(None),
            life: Mutex::new(Life::default()),
            exited: Condvar::new(),
            stderr_tail: Mutex::new(VecDeque::new()),
            on_exit: Mutex::new(None),
            limits: cfg.limits.clone(),
            secrets: env.to_vec(),
        });
        Ok((child, proc_))
    }

    /// A CPU limit's hard limit is this much above its soft one: at the soft limit the
    /// child gets SIGXCPU (it may say why it ends), at the hard one SIGKILL.
    const CPU_HARD_MARGIN: u64 = 1;

    /// setrlimit's resource argument: an enum type in glibc, a plain int in musl.
    #[cfg(target_env = "gnu")]
    type Resource = libc::__rlimit_resource_t;
    #[cfg(not(target_env = "gnu"))]
    type Resource = libc::c_int;

    /// (resource, soft, hard) for each limit set; computed before fork, as the child
    /// may not allocate between fork and exec.
    fn rlimits_of(limits: &ChildLimits) -> Vec<(Resource, u64, u64)> {
        let mut out = Vec::new();
        for limit in Limit::ALL {
            let Some(n) = limits.get(limit) else { continue };
            out.push(match limit {
                Limit::Memory => (libc::RLIMIT_AS, n, n),
                Limit::Cpu => (libc::RLIMIT_CPU, n, n + CPU_HARD_MARGIN),
                Limit::Files => (libc::RLIMIT_NOFILE, n, n),
                Limit::Processes => (libc::RLIMIT_NPROC, n, n),
            });
        }
        out
    }

    /// Lowers a limit; never raises a hard limit we were given (only root may).
    fn set_rlimit(resource: Resource, soft: u64, hard: u64) -> std::io::Result<()> {
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if unsafe { libc::getrlimit(resource, &mut now) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // rlim_t is 32 bits on 32-bit glibc (armv7): a larger limit is no limit there.
        let clamp = |n: u64| libc::rlim_t::try_from(n).unwrap_or(libc::RLIM_INFINITY);
        let hard = clamp(hard).min(now.rlim_max);
        let new = libc::rlimit {
            rlim_cur: clamp(soft).min(hard),
            rlim_max: hard,
        };
        if unsafe { libc::setrlimit(resource, &new) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// What a child's stderr says when a limit refused it something: an allocation
    /// (RLIMIT_AS), a file (EMFILE), a fork (EAGAIN under RLIMIT_NPROC).
    const LIMIT_WORDS: [(Limit, &[&str]); 3] = [
        (
            Limit::Memory,
            &[
                "MemoryError",
                "Cannot allocate memory",
                "out of memory",
                "Out of memory",
                "bad_alloc",
                "memory allocation of",
                "ENOMEM",
                // Refused at its start: glibc's loader cannot map a library, the JVM
                // cannot reserve its heap, Go's runtime its arena.
                "failed to map segment",
                "Could not reserve enough space",
                "cannot allocate memory",
            ],
        ),
        (Limit::Files, &["Too many open files", "EMFILE"]),
        (
            Limit::Processes,
            &["Resource temporarily unavailable", "EAGAIN", "fork: retry"],
        ),
    ];

    /// Which limit a child that ended met, if one did: CPU by the time it used (its
    /// rusage), the others by what its last stderr lines say, and only when the
    /// limit was set and the child did not end well.
    fn limit_met(
        limits: &ChildLimits,
        status: &ExitStatus,
        cpu_used: Duration,
        tail: &[String],
    ) -> Option<Limit> {
        if status.success() {
            return None;
        }
        if let Some(cpu) = limits.cpu {
            let killed_for_cpu =
                matches!(status.signal(), Some(libc::SIGXCPU) | Some(libc::SIGKILL));
            if killed_for_cpu && cpu_used + Duration::from_millis(100) >= Duration::from_secs(cpu) {
                return Some(Limit::Cpu);
            }
        }
        LIMIT_WORDS.iter().find_map(|(limit, words)| {
            let said = tail.iter().any(|l| words.iter().any(|w| l.contains(w)));
            (limits.get(*limit).is_some() && said).then_some(*limit)
        })
    }

    /// Spawns the configured command and starts the thread that watches its stderr and
    /// its exit; the caller starts the stdout reader once it is ready to route what the
    /// child says.
    pub fn spawn(
        server: &Arc<Server>,
        tag: &str,
        env: Vec<(String, String)>,
    ) -> Result<(Arc<ChildProc>, ChildStdout), String> {
        let app = crate::app();
        let (reply, rx) = crossbeam_channel::bounded(1);
        let spawner = SPAWNER.get().ok_or("spawner not started")?;
        spawner
            .send(SpawnJob {
                spec: server.clone(),
                tag: tag.to_string(),
                env,
                reply,
            })
            .map_err(|_| "spawner gone".to_string())?;
        let (mut child, proc_) = rx
            .recv()
            .map_err(|_| "spawner gone".to_string())?
            .inspect_err(|e| {
                crate::log!(Error, "spawn_failed", session = tag, server = server.name; "{e}");
                app.metrics.spawn_failed();
                server.started(Err(e));
            })?;
        server.started(Ok(()));
        *proc_.stdin.locked() = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        app.metrics.child_spawned();
        app.children.locked().insert(proc_.pid, proc_.clone());
        crate::log!(Debug, "child_spawn", session = tag; "started pid {}", proc_.pid);
        let p = proc_.clone();
        match pidfd(p.pid) {
            Some(exit) => {
                crate::spawn_thread("child-watch", move || {
                    watch_stderr_and_exit(child, stderr, exit, &p)
                });
            }
            None => {
                // Linux before 5.3: no pidfd, so a thread blocks in waitid instead.
                crate::spawn_thread("child-stderr", move || {
                    StderrLines::default().read_to_end(stderr, &p)
                });
                let p = proc_.clone();
                crate::spawn_thread("child-wait", move || {
                    wait_for_exit(p.pid);
                    reap(child, &p);
                });
            }
        }
        Ok((proc_, stdout))
    }

    /// A descriptor that becomes readable when the process exits.
    fn pidfd(pid: i32) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    }

    /// One thread per child for both its stderr and its exit (poll on the stderr pipe
    /// and a pidfd). What stderr holds when the child exits is read before it is
    /// reaped, so a crash's last words are in the tail; the rest is read to EOF after.
    fn watch_stderr_and_exit(
        child: std::process::Child,
        mut stderr: std::process::ChildStderr,
        exit: std::os::fd::OwnedFd,
        p: &Arc<ChildProc>,
    ) {
        use std::os::fd::AsRawFd;
        let mut lines = StderrLines::default();
        let (mut child, mut stderr_open) = (Some(child), true);
        while stderr_open || child.is_some() {
            let mut fds = [
                libc::pollfd {
                    fd: if stderr_open { stderr.as_raw_fd() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if child.is_some() {
                        exit.as_raw_fd()
                    } else {
                        -1
                    },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Cannot poll (ENOMEM): block on each in turn instead.
                if let Some(c) = child.take() {
                    wait_for_exit(p.pid);
                    reap(c, p);
                }
                if stderr_open {
                    lines.read_to_end(stderr, p);
                }
                break;
            }
            if fds[0].revents != 0 {
                stderr_open = lines.read_once(&mut stderr, p);
            }
            if fds[1].revents != 0 {
                if let Some(c) = child.take() {
                    // Bounded: a grandchild may still be writing.
                    for _ in 0..16 {
                        let mut ready = [libc::pollfd {
                            fd: stderr.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        }];
                        if !stderr_open || unsafe { libc::poll(ready.as_mut_ptr(), 1, 0) } != 1 {
                            break;
                        }
                        stderr_open = lines.read_once(&mut stderr, p);
                    }
                    reap(c, p);
                }
            }
        }
    }

    /// The reader thread: each stdout line to `on_line`, then `on_eof` once.
    pub fn start_reader(p: &ChildProc, stdout: ChildStdout, on_line: OnLine, on_eof: OnEof) {
        let max = crate::app().cfg.max_message;
        let who = Who {
            tag: p.tag.clone(),
            server: p.server.clone(),
            secrets: p.secrets.clone(),
        };
        crate::spawn_thread("child-stdout", move || {
            read_stdout(stdout, max, &who, on_line, on_eof)
        });
    }

    /// Whose stdout a reader reads: for the log and the tap.
    struct Who {
        tag: String,
        server: Arc<str>,
        secrets: Vec<(String, String)>,
    }

    /// Blocks until the leader exits, without reaping it.
    fn wait_for_exit(pid: i32) {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break;
            }
        }
    }

    /// After the leader exited and before it is reaped (so its pid cannot be reused):
    /// kills what is left of its process group (orphaned grandchildren), then reaps.
    fn reap(mut child: std::process::Child, p: &Arc<ChildProc>) {
        {
            let mut life = p.life.locked();
            unsafe { libc::kill(-p.pid, libc::SIGKILL) };
            crate::ownership::forget(p.pid);
            life.reaping = true;
        }
        let (status, cpu_used) = wait_with_usage(&mut child);
        drop(child);
        crate::app().children.locked().remove(&p.pid);
        crate::app().metrics.child_exited(&status);
        let limit_hit = limit_met(&p.limits, &status, cpu_used, &p.stderr_tail());
        match limit_hit {
            Some(limit) => {
                crate::app().metrics.child_limit_exit(limit);
                crate::log!(
                    Warn,
                    "child_limit",
                    session = p.tag, server = p.server, limit = limit.label(); "pid {} {} at its limit {}",
                    p.pid,
                    describe(&status),
                    p.limits.shown(limit));
            }
            None => crate::log!(
                Debug,
                "child_exit",
                session = p.tag; "pid {} {}",
                p.pid,
                describe(&status)),
        }
        {
            let mut life = p.life.locked();
            life.status = Some(status);
            life.limit_hit = limit_hit;
        }
        p.exited.notify_all();
        if let Some(hook) = p.on_exit.locked().take() {
            hook();
        }
    }

    /// Reaps the leader with wait4, for the CPU time it used (std's wait gives none).
    fn wait_with_usage(child: &mut std::process::Child) -> (ExitStatus, Duration) {
        let pid = child.id() as libc::pid_t;
        let mut raw = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            let rc = unsafe { libc::wait4(pid, &mut raw, 0, &mut usage) };
            if rc == pid {
                let tv = |t: libc::timeval| {
                    Duration::from_secs(t.tv_sec.max(0) as u64)
                        + Duration::from_micros(t.tv_usec.max(0) as u64)
                };
                return (
                    ExitStatus::from_raw(raw),
                    tv(usage.ru_utime) + tv(usage.ru_stime),
                );
            }
            if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // Reaped elsewhere already (cannot happen: we own it): std's answer.
            let status = child.wait().unwrap_or_else(|_| ExitStatus::from_raw(0));
            return (status, Duration::ZERO);
        }
    }

    /// Splits stdout on `\n` only (ST-1: U+2028 inside a string is not a line break).
    fn read_stdout(stdout: ChildStdout, max: usize, who: &Who, mut on_line: OnLine, on_eof: OnEof) {
        let tag = who.tag.as_str();
        let mut reader = BufReader::with_capacity(64 * 1024, stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match read_line_limited(&mut reader, &mut buf, max) {
                Ok(LineRead::Line) => {
                    crate::app()
                        .metrics
                        .child_bytes(crate::observe::Way::ToClient, buf.len() + 1);
                    if buf.ends_with(b"\r") {
                        buf.pop();
                    }
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    match String::from_utf8(std::mem::take(&mut buf)) {
                        Ok(line) => {
                            if crate::observe::enabled(crate::observe::Level::Debug) {
                                let body = crate::observe::body_excerpt(&crate::observe::redact(
                                    &line,
                                    &who.secrets,
                                ));
                                crate::log!(Debug, "message", session = tag, direction = "from_child"; "{body}");
                            }
                            crate::observe::tap::record(
                                crate::observe::tap::Direction::ChildToBridge,
                                tag,
                                &who.server,
                                crate::observe::tap::Message::Line(&line),
                                &who.secrets,
                            );
                            // A routing bug (a panic, logged and counted by the hook)
                            // loses this line, not the reader: a reader that died would
                            // leave the child's sessions waiting for ever.
                            let routed =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    on_line(line)
                                }));
                            if routed.is_err() {
                                crate::app().metrics.dropped("routing_panic");
                            }
                        }
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
                    crate::log!(Error, "message_dropped", session = tag; "skipped a stdout line of {n}+ bytes: larger than --max-message {max}");
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
    #[derive(Default)]
    struct StderrLines {
        partial: Vec<u8>,
    }

    impl StderrLines {
        /// A line longer than this is logged in pieces of this size.
        const MAX_PIECE: usize = 64 * 1024;

        fn feed(&mut self, mut data: &[u8], p: &ChildProc) {
            while let Some(nl) = data.iter().position(|&b| b == b'\n') {
                self.partial.extend_from_slice(&data[..nl]);
                self.log_line(p);
                data = &data[nl + 1..];
            }
            self.partial.extend_from_slice(data);
            while self.partial.len() >= Self::MAX_PIECE {
                let rest = self.partial.split_off(Self::MAX_PIECE);
                self.log_line(p);
                self.partial = rest;
            }
        }

        /// One read; false once stderr has ended (EOF or an error), after `end`.
        fn read_once(&mut self, stderr: &mut std::process::ChildStderr, p: &ChildProc) -> bool {
            let mut buf = [0u8; 4096];
            match stderr.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    self.feed(&buf[..n], p);
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return true,
                Err(_) => {}
            }
            self.end(p);
            false
        }

        fn read_to_end(mut self, mut stderr: std::process::ChildStderr, p: &ChildProc) {
            while self.read_once(&mut stderr, p) {}
        }

        /// EOF: the last unterminated line, then the tail is complete.
        fn end(&mut self, p: &ChildProc) {
            if !self.partial.is_empty() {
                self.log_line(p);
            }
            p.life.locked().stderr_eof = true;
            p.exited.notify_all();
        }

        fn log_line(&mut self, p: &ChildProc) {
            let text = String::from_utf8_lossy(&self.partial);
            // Before the cut, so no part of a secret is left at the end (OP-5).
            let text = crate::observe::redact(&text, &p.secrets);
            let line: String = text
                .trim_end_matches(['\n', '\r'])
                .chars()
                .take(MAX_LINE)
                .collect();
            self.partial.clear();
            crate::log!(Info, "child_stderr", session = p.tag, source = "child"; "child: {line}");
            let keep = crate::app().cfg.stderr_tail;
            if keep > 0 {
                let mut tail = p.stderr_tail.locked();
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
            if crate::observe::enabled(crate::observe::Level::Debug) {
                let text = String::from_utf8_lossy(&framed);
                let body =
                    crate::observe::body_excerpt(&crate::observe::redact(&text, &self.secrets));
                crate::log!(Debug, "message", session = self.tag.as_str(), direction = "to_child"; "{body}");
            }
            crate::observe::tap::record(
                crate::observe::tap::Direction::BridgeToChild,
                &self.tag,
                &self.server,
                crate::observe::tap::Message::Value(message),
                &self.secrets,
            );
            framed.push(b'\n');
            crate::app()
                .metrics
                .child_bytes(crate::observe::Way::ToChild, framed.len());
            let mut guard = self.stdin.locked();
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

        pub fn has_exited(&self) -> bool {
            self.life.locked().status.is_some()
        }

        /// The limit it met and how the flag says it, once it has been reaped.
        pub fn limit_hit(&self) -> Option<(Limit, String)> {
            let limit = self.life.locked().limit_hit?;
            Some((limit, self.limits.shown(limit)))
        }

        /// How it ended, naming the limit it met: "was killed by signal 24 at its
        /// limit --child-cpu 1s".
        pub fn ended(&self, status: &ExitStatus) -> String {
            match self.limit_hit() {
                Some((_, shown)) => format!("{} at its limit {shown}", describe(status)),
                None => describe(status),
            }
        }

        /// Runs `hook` once the child has been reaped (at once if it already has).
        pub fn on_exit(&self, hook: OnEof) {
            let mut slot = self.on_exit.locked();
            if self.has_exited() {
                drop(slot);
                hook();
            } else {
                *slot = Some(hook);
            }
        }

        pub fn stderr_tail(&self) -> Vec<String> {
            self.stderr_tail.locked().iter().cloned().collect()
        }

        /// The stderr tail once the reader has seen EOF, so the last words of a child
        /// that just died are in it; bounded, as a grandchild may hold stderr open.
        pub fn final_stderr_tail(&self) -> Vec<String> {
            let life = self.life.locked();
            drop(
                self.exited
                    .wait_timeout_while(life, STDERR_SETTLE, |l| !l.stderr_eof)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            self.stderr_tail()
        }

        pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
            let life = self.life.locked();
            let (life, _) = self
                .exited
                .wait_timeout_while(life, timeout, |l| l.status.is_none())
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            life.status
        }

        pub fn signal_group(&self, sig: libc::c_int) {
            let life = self.life.locked();
            if !life.reaping {
                unsafe { libc::kill(-self.pid, sig) };
            }
        }

        /// ST-7: close stdin, wait the grace period, SIGTERM the group, wait again,
        /// SIGKILL the group. Returns once the child is reaped.
        pub fn terminate(&self, grace: Duration) -> ExitStatus {
            crate::teardown::escalate(self, grace, 0)
        }

        /// For a child whose stdin is already closed (one-shot): SIGTERM now, SIGKILL
        /// after the grace period.
        pub fn kill_now(&self, grace: Duration) -> ExitStatus {
            self.close_stdin();
            crate::teardown::escalate(self, grace, 1)
        }
    }

    pub fn describe(status: &ExitStatus) -> String {
        match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "exited".to_string(),
        }
    }

    /// Can a child be started? The command must resolve to an executable file (relative
    /// to --cwd, or on the child's PATH): its path, or why not.
    pub fn startable(cfg: &ServerSpec) -> Result<std::path::PathBuf, String> {
        let Some(program) = cfg.command.first() else {
            return Err("no command".into());
        };
        let path_var = cfg
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("PATH").ok());
        resolve(program, cfg.cwd.as_deref(), path_var.as_deref())
            .ok_or_else(|| format!("command {program:?} is not an executable file on PATH"))
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

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_line_over_the_limit_is_consumed_and_reported_not_buffered() {
            let input = b"short\nthis one is far too long\nok\nlast without newline";
            let mut r = std::io::BufReader::with_capacity(4, &input[..]);
            let mut buf = Vec::new();
            let mut seen = Vec::new();
            loop {
                buf.clear();
                match read_line_limited(&mut r, &mut buf, 10).unwrap() {
                    LineRead::Line => seen.push(String::from_utf8(buf.clone()).unwrap()),
                    LineRead::TooLong(n) => seen.push(format!("<{n} bytes>")),
                    LineRead::Eof => break,
                }
                assert!(buf.len() <= 10);
            }
            assert_eq!(seen, ["short", "<24 bytes>", "ok", "<20 bytes>"]);
        }
    }
}

// ======================================================================================
/// `stdio-sse check [OPTIONS] [--] COMMAND...` and `stdio-sse check --config FILE`: the
/// first thing to run when a server does not work. Starts each server as a session would
/// (`child::spawn`: the same environment, working directory, process group, parent-death
/// and limits), talks to it as a client would (initialize, then
/// notifications/initialized; server/discover for a 2026-07-28 child), lists its tools,
/// prompts and resources, ends it by `teardown`'s escalation, and says what it saw: a
/// short report, or one JSON object (--json). When a server does not work the report says
/// why in words a person can act on and the exit status is 1; a usage mistake is 2.
/// Owns: the check's own flags, its conversation with the child (answering what the child
/// asks meanwhile), the verdict and the report. Touches: `config` (flags and the --config
/// file, read as for serving), `child` (spawn, stdout lines, the stderr tail, the ending),
/// `ownership` (the guardian). No HTTP.
/// Rules: ST-1, ST-4, ST-5, ST-7, ST-8, ST-9, ST-10.
mod check {
    use super::*;
    use crate::child::{ChildProc, LineRead};
    use crate::config::ServerSpec;
    use crate::message::{classify, Kind};
    use crate::modern::ChildEra;
    use crate::servers::Server;
    use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
    use serde_json::{json, Value};
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    /// The first argument that makes stdio-sse check servers instead of serving one (a
    /// program named `check` is served with `stdio-sse -- check`).
    pub const ARG: &str = "check";
    /// How long a server has to answer initialize, and then each request: a server
    /// started by npx or uvx from a warm cache answers within a few seconds, and a person
    /// waiting for a verdict should not wait longer (--timeout).
    pub const DEFAULT_TIMEOUT: &str = "10s";
    const TIMEOUT_ENV: &str = "STDIO_SSE_CHECK_TIMEOUT";
    /// After a 2025 handshake, how long server/discover is waited for: whether the server
    /// also speaks 2026-07-28 is a question, not a requirement.
    const DISCOVER_WAIT: Duration = Duration::from_secs(2);
    /// Pages of one list followed at most: a server whose nextCursor never ends still
    /// gets a verdict.
    const MAX_PAGES: usize = 100;
    /// Bad stdout lines quoted, each cut to QUOTE_CHARS; more are only counted.
    const QUOTED_LINES: usize = 5;
    const QUOTE_CHARS: usize = 300;
    /// After stdout closed, how long the exit is waited for: it follows at once, unless
    /// the child closed stdout and lives on.
    const EXIT_SETTLE: Duration = Duration::from_secs(2);
    /// Lines read from the child's stdout ahead of the conversation.
    const PENDING_LINES: usize = 256;
    /// Where the 2026-07-28 envelope keeps the version and the client's capabilities (the
    /// keys `modern` validates), and where a 2026-07-28 result names its server.
    const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
    const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
    const SERVER_INFO_POINTER: &str = "/_meta/io.modelcontextprotocol~1serverInfo";

    /// Exit statuses (README: "When a server does not work").
    pub const WORKS: i32 = 0;
    pub const DOES_NOT_WORK: i32 = 1;
    pub const USAGE: i32 = 2;

    #[derive(Clone, Copy, PartialEq)]
    enum Output {
        Text,
        Json,
    }

    #[derive(Clone, Copy)]
    struct Options {
        timeout: Duration,
        output: Output,
        /// --log-level was given (as a flag or its variable).
        log_level: bool,
    }

    enum Asked {
        Help,
        Check(Options, Vec<String>),
    }

    /// Why a server does not work; each has a stable name for --json.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Trouble {
        NotFound,
        PermissionDenied,
        CannotStart,
        Exited,
        StdoutClosed,
        NonJson,
        TooLarge,
        Timeout,
        InvalidJsonRpc,
        InitializeError,
        DiscoverError,
        UnsupportedVersion,
        ModernOnly,
        ListFailed,
    }

    impl Trouble {
        fn name(self) -> &'static str {
            match self {
                Trouble::NotFound => "not_found",
                Trouble::PermissionDenied => "permission_denied",
                Trouble::CannotStart => "cannot_start",
                Trouble::Exited => "exited",
                Trouble::StdoutClosed => "stdout_closed",
                Trouble::NonJson => "non_json_stdout",
                Trouble::TooLarge => "line_too_large",
                Trouble::Timeout => "timeout",
                Trouble::InvalidJsonRpc => "invalid_jsonrpc",
                Trouble::InitializeError => "initialize_error",
                Trouble::DiscoverError => "discover_error",
                Trouble::UnsupportedVersion => "unsupported_version",
                Trouble::ModernOnly => "modern_only",
                Trouble::ListFailed => "list_failed",
            }
        }
    }

    /// How the child ended.
    #[derive(Clone, Copy, PartialEq)]
    enum Ending {
        /// Before the check was done with it.
        Itself,
        /// When its stdin closed, as a server should (ST-8).
        StdinEof,
        Sigterm,
        Sigkill,
    }

    impl Ending {
        fn name(self) -> &'static str {
            match self {
                Ending::Itself => "itself",
                Ending::StdinEof => "stdin_eof",
                Ending::Sigterm => "sigterm",
                Ending::Sigkill => "sigkill",
            }
        }
    }

    /// What one server showed.
    struct Report {
        name: String,
        command: Vec<String>,
        problems: Vec<(Trouble, String)>,
        warnings: Vec<String>,
        protocol: Option<String>,
        speaks_2026: Option<bool>,
        server_info: Option<Value>,
        capabilities: Option<Value>,
        instructions: Option<String>,
        tools: Option<Vec<String>>,
        prompts: Option<usize>,
        resources: Option<usize>,
        start: Option<Duration>,
        stderr: Vec<String>,
        non_json: Vec<String>,
        non_json_count: usize,
        asked: Vec<String>,
        notifications: usize,
        exit: Option<ExitStatus>,
        ending: Option<(Ending, Duration)>,
    }

    impl Report {
        fn new(spec: &ServerSpec) -> Report {
            Report {
                name: spec.name.clone(),
                command: spec.command.clone(),
                problems: Vec::new(),
                warnings: Vec::new(),
                protocol: None,
                speaks_2026: None,
                server_info: None,
                capabilities: None,
                instructions: None,
                tools: None,
                prompts: None,
                resources: None,
                start: None,
                stderr: Vec::new(),
                non_json: Vec::new(),
                non_json_count: 0,
                asked: Vec::new(),
                notifications: 0,
                exit: None,
                ending: None,
            }
        }

        /// The first of each kind is kept: the first bad line says what the rest do.
        fn problem(&mut self, trouble: Trouble, message: String) {
            if !self.problems.iter().any(|(t, _)| *t == trouble) {
                self.problems.push((trouble, message));
            }
        }

        fn works(&self) -> bool {
            self.problems.is_empty()
        }
    }

    /// `stdio-sse check ...`: the exit status.
    pub fn run(args: &[String]) -> i32 {
        let env = |k: &str| std::env::var(k).ok();
        let (opts, rest) = match options(&args[2..], &env) {
            Ok(Asked::Help) => return say(&help(), WORKS),
            Ok(Asked::Check(o, rest)) => (o, rest),
            Err(e) => return say_err(&e),
        };
        let cfg = match config::parse(&rest, &env) {
            Ok(config::Parsed::Run(c)) => c,
            Ok(config::Parsed::Help) => return say(&help(), WORKS),
            Ok(config::Parsed::Version) => {
                return say(&format!("stdio-sse {}\n", env!("CARGO_PKG_VERSION")), WORKS)
            }
            Ok(config::Parsed::Probe(_)) => {
                return say_err("--probe asks a running stdio-sse; check starts the server itself")
            }
            Err(e) => return say_err(&e),
        };
        if cfg.demo {
            return say_err("give the server's COMMAND (stdio-sse check -- python3 server.py) or --config FILE (see stdio-sse check --help)");
        }
        // The report says what the child wrote on stderr and how it ended: the log
        // repeating it line by line is noise, unless asked for.
        crate::start_logging(&cfg);
        if !opts.log_level {
            crate::observe::LEVEL.store(crate::observe::Level::Error as u8, Ordering::Relaxed);
        }
        START.get_or_init(Instant::now);
        if !crate::ownership::init_if_pid1() {
            crate::ownership::start_guardian();
        }
        let mut skipped: Vec<(String, String)> = cfg.skipped.clone();
        let mut specs = Vec::new();
        for spec in &cfg.servers {
            if spec.disabled {
                skipped.push((spec.name.clone(), "\"disabled\": true in the file".into()));
            } else {
                specs.push(spec.clone());
            }
        }
        let from_file = cfg.config_file.is_some();
        if specs.is_empty() {
            let why: Vec<String> = skipped.iter().map(|(n, w)| format!("{n}: {w}")).collect();
            return say_err(&format!(
                "no stdio server to check in the file ({})",
                why.join("; ")
            ));
        }
        crate::install_app(cfg);
        crate::child::start_spawner();
        // Every server at once: a file of servers that hang takes one timeout, not one
        // each.
        let reports: Vec<Report> = std::thread::scope(|s| {
            let running: Vec<_> = specs
                .iter()
                .map(|spec| (spec, s.spawn(move || check_server(spec, opts))))
                .collect();
            running
                .into_iter()
                .map(|(spec, h)| {
                    h.join().unwrap_or_else(|_| {
                        let mut r = Report::new(spec);
                        r.problem(
                            Trouble::CannotStart,
                            "the check itself failed (a bug in stdio-sse: see the log)".into(),
                        );
                        r
                    })
                })
                .collect()
        });
        let ok = reports.iter().all(Report::works);
        let text = match opts.output {
            Output::Json => {
                let skipped: Vec<Value> = skipped
                    .iter()
                    .map(|(n, why)| json!({"name": n, "reason": why}))
                    .collect();
                let servers: Vec<Value> = reports.iter().map(to_json).collect();
                format!(
                    "{}\n",
                    json!({"ok": ok, "servers": servers, "skipped": skipped})
                )
            }
            Output::Text => {
                let mut out = String::new();
                for r in &reports {
                    out.push_str(&to_text(r, from_file));
                }
                for (n, why) in &skipped {
                    out.push_str(&format!("server {n}: not checked: {why}\n"));
                }
                if from_file {
                    let bad = reports.iter().filter(|r| !r.works()).count();
                    out.push_str(&format!(
                        "{} server{} checked: {} work{}, {bad} do{} not\n",
                        reports.len(),
                        if reports.len() == 1 { "" } else { "s" },
                        reports.len() - bad,
                        if reports.len() - bad == 1 { "s" } else { "" },
                        if bad == 1 { "es" } else { "" },
                    ));
                }
                out
            }
        };
        say(&text, if ok { WORKS } else { DOES_NOT_WORK })
    }

    /// Writes to stdout (a closed stdout is no reason to panic) and gives back `code`.
    fn say(text: &str, code: i32) -> i32 {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        code
    }

    fn say_err(e: &str) -> i32 {
        eprintln!("stdio-sse check: {e}");
        USAGE
    }

    /// Takes the check's own flags out of `args`; the rest (the flags that shape the
    /// child, and COMMAND) stays in order for `config::parse`.
    fn options(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Asked, String> {
        let mut timeout = env(TIMEOUT_ENV).unwrap_or_else(|| DEFAULT_TIMEOUT.to_string());
        let mut output = Output::Text;
        let mut log_level = env(&config::env_name("log-level")).is_some();
        let mut rest = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            if arg == "-h" || arg == "--help" {
                return Ok(Asked::Help);
            }
            let Some(body) = arg.strip_prefix("--").filter(|b| !b.is_empty()) else {
                // `--`, or the first word of COMMAND.
                rest.extend_from_slice(&args[i..]);
                break;
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            match name {
                "timeout" => {
                    timeout = match inline {
                        Some(v) => v.to_string(),
                        None => {
                            i += 1;
                            args.get(i)
                                .cloned()
                                .ok_or("--timeout needs a value (DURATION)")?
                        }
                    }
                }
                "json" => {
                    output = match inline.map(str::to_ascii_lowercase).as_deref() {
                        None | Some("true" | "1" | "yes" | "on") => Output::Json,
                        Some("false" | "0" | "no" | "off") => Output::Text,
                        Some(v) => return Err(format!("--json is on or off, not {v:?}")),
                    }
                }
                flag => {
                    log_level |= flag == "log-level";
                    rest.push(arg.clone());
                    let takes_value = config::FLAGS.iter().any(|f| f.name == flag && !f.switch);
                    if inline.is_none() && takes_value {
                        if let Some(v) = args.get(i + 1) {
                            rest.push(v.clone());
                            i += 1;
                        }
                    }
                }
            }
            i += 1;
        }
        let timeout = config::parse_duration("timeout", &timeout)?;
        if timeout.is_zero() {
            return Err("--timeout must be more than 0".into());
        }
        Ok(Asked::Check(
            Options {
                timeout,
                output,
                log_level,
            },
            rest,
        ))
    }

    pub fn help() -> String {
        format!(
            "stdio-sse check: start a stdio MCP server as a session would, talk to it, and say whether it works, and if not, why\n\n\
             usage: stdio-sse check [OPTIONS] [--] COMMAND [ARGS...]\n\
             \x20      stdio-sse check [OPTIONS] --config FILE    (every server of the file, at once)\n\n\
             options:\n\
             \x20 --timeout DURATION              how long the server has to answer initialize, and each request after it [default: {DEFAULT_TIMEOUT}]\n\
             \x20                                 env {TIMEOUT_ENV}\n\
             \x20 --json                          one JSON object on stdout instead of the report\n\
             \x20 and the options of stdio-sse that shape the child, as when serving: --env, --cwd,\n\
             \x20 --child-protocol, --shutdown-grace, --stderr-tail, --max-message, --log-level, ...\n\n\
             exit status: {WORKS} every server works; {DOES_NOT_WORK} a server does not work (the report says why); {USAGE} a usage mistake\n"
        )
    }

    // ---- one server --------------------------------------------------------------------

    /// A line from the child's stdout, as the reader saw it.
    enum Out {
        Line(String),
        NotUtf8(String),
        TooLong(usize),
        Closed,
    }

    /// What became of one request.
    enum Answer {
        Result(Value),
        Error(Value),
        /// Nothing within the wait.
        Silent,
        /// stdout closed (or stdin would not take the request).
        Gone,
        /// A wrong answer: the problem is recorded.
        Wrong,
    }

    /// Whether the conversation goes on.
    #[derive(Clone, Copy, PartialEq)]
    enum Line {
        Open,
        Over,
    }

    fn check_server(spec: &ServerSpec, opts: Options) -> Report {
        let mut report = Report::new(spec);
        let server = Server::new(spec.clone());
        let tag = format!("{}check", server.tag_prefix());
        let started = Instant::now();
        let (child, stdout) = match crate::child::spawn(&server, &tag, Vec::new()) {
            Ok(c) => c,
            Err(e) => {
                let (trouble, words) = cannot_start(spec, &e);
                report.problem(trouble, words);
                return report;
            }
        };
        let (tx, rx) = crossbeam_channel::bounded(PENDING_LINES);
        let max = crate::app().cfg.max_message;
        // Without its thread the channel is closed at once: read as stdout closed.
        crate::spawn_thread("check-stdout", move || read_stdout(stdout, max, tx));
        // Writes leave from their own thread: a child that does not read its stdin (and
        // floods requests whose answers fill the pipe) cannot hold the check past its
        // --timeout. A write that fails ends the thread, so a later send sees Gone.
        let (to_child, writes) = crossbeam_channel::bounded::<Value>(PENDING_LINES);
        let writer = child.clone();
        crate::spawn_thread("check-stdin", move || {
            for message in writes {
                if writer.send_message(&message).is_err() {
                    return;
                }
            }
        });
        let mut talk = Talk {
            child,
            to_child,
            rx,
            report,
            next_id: 1,
            abandoned: Vec::new(),
            timeout: opts.timeout,
            started,
            line: Line::Open,
        };
        talk.converse(spec.child_protocol);
        talk.end()
    }

    /// Reads stdout as the bridge does (`\n` only, ST-1; --max-message), reporting what
    /// the bridge would skip instead of skipping it.
    fn read_stdout(stdout: std::process::ChildStdout, max: usize, tx: Sender<Out>) {
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let out = match crate::child::read_line_limited(&mut reader, &mut buf, max) {
                Ok(LineRead::Line) => {
                    if buf.ends_with(b"\r") {
                        buf.pop();
                    }
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    match String::from_utf8(std::mem::take(&mut buf)) {
                        Ok(line) => Out::Line(line),
                        Err(e) => Out::NotUtf8(String::from_utf8_lossy(e.as_bytes()).into_owned()),
                    }
                }
                Ok(LineRead::TooLong(n)) => Out::TooLong(n),
                Ok(LineRead::Eof) | Err(_) => {
                    let _ = tx.send(Out::Closed);
                    return;
                }
            };
            if tx.send(out).is_err() {
                return;
            }
        }
    }

    /// Why the command could not be started, found out further than the error says.
    fn cannot_start(spec: &ServerSpec, err: &str) -> (Trouble, String) {
        let program = spec.command.first().map(String::as_str).unwrap_or("");
        if let Some(dir) = spec.cwd.as_ref().filter(|d| !d.is_dir()) {
            return (
                Trouble::CannotStart,
                format!(
                    "the working directory {} (--cwd, or \"cwd\" in the file) does not exist or is not a directory",
                    dir.display()
                ),
            );
        }
        let path_var = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_default();
        let found = locate(program, spec.cwd.as_deref(), &path_var);
        if err.contains("command not found") {
            return match found {
                Some(path) => {
                    let interpreter = std::fs::read(&path).ok().and_then(|head| {
                        let first = head.split(|b| *b == b'\n').next()?.to_vec();
                        let text = String::from_utf8(first).ok()?;
                        Some(text.strip_prefix("#!")?.trim().to_string())
                    });
                    match interpreter {
                        Some(i) => (Trouble::NotFound, format!("{} exists, but the interpreter its first line names ({i}) was not found: install it, or fix the #! line", path.display())),
                        None => (Trouble::NotFound, format!("{} exists but cannot be run: {err}", path.display())),
                    }
                }
                None if program.contains('/') => (
                    Trouble::NotFound,
                    format!("command not found: there is no file {program}{}", relative_to(program, spec)),
                ),
                None => (
                    Trouble::NotFound,
                    format!("command not found: {program:?} is in no directory of PATH ({path_var}). Install it, give its full path, or give the child the PATH it needs (--env PATH=...)"),
                ),
            };
        }
        if err.contains("permission denied") {
            let words = match found {
                Some(path) if path.is_dir() => format!("permission denied: {} is a directory, not a program", path.display()),
                Some(path) if !executable(&path) => format!(
                    "permission denied: {} is not executable. Make it so (chmod +x {}) or run it through its interpreter (for example python3 {})",
                    path.display(), path.display(), path.display()
                ),
                Some(path) => format!("permission denied running {}: its file system may be mounted noexec, or a directory on the way is not searchable ({err})", path.display()),
                None => format!("permission denied: {err}"),
            };
            return (Trouble::PermissionDenied, words);
        }
        (Trouble::CannotStart, err.to_string())
    }

    fn relative_to(program: &str, spec: &ServerSpec) -> String {
        if program.starts_with('/') {
            return String::new();
        }
        let dir = spec
            .cwd
            .clone()
            .or_else(|| std::env::current_dir().ok())
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        format!(" (a relative path: from the working directory {dir})")
    }

    fn executable(path: &std::path::Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }

    /// The file the command names, executable or not: as given when it holds a `/`
    /// (from the working directory), else the first of that name on PATH.
    fn locate(
        program: &str,
        cwd: Option<&std::path::Path>,
        path_var: &str,
    ) -> Option<std::path::PathBuf> {
        if program.contains('/') {
            let p = std::path::Path::new(program);
            let p = match cwd {
                Some(dir) if p.is_relative() => dir.join(p),
                _ => p.to_path_buf(),
            };
            return p.exists().then_some(p);
        }
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| std::path::Path::new(d).join(program))
            .find(|p| p.exists())
    }

    /// One conversation with one child.
    struct Talk {
        child: Arc<ChildProc>,
        /// To the writer thread (check_server), which writes to the child's stdin.
        to_child: Sender<Value>,
        rx: Receiver<Out>,
        report: Report,
        next_id: u64,
        /// Requests given up on: a late answer to one is no mistake.
        abandoned: Vec<u64>,
        timeout: Duration,
        started: Instant,
        line: Line,
    }

    impl Talk {
        fn converse(&mut self, era: ChildEra) {
            if era == ChildEra::Modern {
                return self.discover_first();
            }
            let params = json!({
                "protocolVersion": config::SUPPORTED_VERSIONS[config::SUPPORTED_VERSIONS.len() - 1],
                "capabilities": {},
                "clientInfo": {"name": "stdio-sse check", "version": env!("CARGO_PKG_VERSION")},
            });
            match self.ask("initialize", params, self.timeout) {
                Answer::Result(r) => {
                    self.report.start = Some(self.started.elapsed());
                    if !self.hello_2025(&r) {
                        return;
                    }
                }
                Answer::Error(e) => {
                    self.report.start = Some(self.started.elapsed());
                    return self.refused_initialize(&e, era);
                }
                Answer::Silent => return self.silent("initialize"),
                Answer::Gone => return self.gone("initialize"),
                Answer::Wrong => return,
            }
            self.notify("notifications/initialized");
            self.lists(None);
            self.ask_discover_too();
        }

        /// --child-protocol modern: server/discover is the handshake.
        fn discover_first(&mut self) {
            let envelope = envelope_2026();
            match self.ask("server/discover", envelope.clone(), self.timeout) {
                Answer::Result(r) if speaks_2026(&r) => {
                    self.report.start = Some(self.started.elapsed());
                    self.report.speaks_2026 = Some(true);
                    self.hello_2026(&r);
                    self.lists(Some(&envelope));
                }
                Answer::Result(r) => self.report.problem(
                    Trouble::UnsupportedVersion,
                    format!("the server's answer to server/discover does not list {} in supportedVersions: {}. --child-protocol modern is for 2026-07-28 servers: serve this one without it (or with auto)", crate::modern::VERSIONS[0], show(&r)),
                ),
                Answer::Error(e) => self.report.problem(
                    Trouble::DiscoverError,
                    format!("the server answered server/discover with an error: {}. It does not seem to speak 2026-07-28: serve it without --child-protocol modern (or with auto)", show(&e)),
                ),
                Answer::Silent => self.silent("server/discover"),
                Answer::Gone => self.gone("server/discover"),
                Answer::Wrong => {}
            }
        }

        /// An InitializeResult: what it says, or why a client would give up on it.
        fn hello_2025(&mut self, r: &Value) -> bool {
            let Some(version) = r.get("protocolVersion").and_then(Value::as_str) else {
                self.report.problem(
                    Trouble::InvalidJsonRpc,
                    format!("the answer to initialize has no protocolVersion (an InitializeResult needs one): {}", show(r)),
                );
                self.line = Line::Over;
                return false;
            };
            self.report.protocol = Some(version.to_string());
            self.report.server_info = r.get("serverInfo").cloned();
            if self.report.server_info.is_none() {
                self.report
                    .warnings
                    .push("the InitializeResult has no serverInfo (it is required)".into());
            }
            self.report.instructions = r
                .get("instructions")
                .and_then(Value::as_str)
                .map(String::from);
            self.report.capabilities = Some(match r.get("capabilities") {
                Some(c) if c.is_object() => c.clone(),
                _ => {
                    self.report.warnings.push(
                        "the InitializeResult has no capabilities object: nothing is listed".into(),
                    );
                    json!({})
                }
            });
            if !config::SUPPORTED_VERSIONS.contains(&version) {
                self.report.problem(
                    Trouble::UnsupportedVersion,
                    format!(
                        "the server answered initialize with protocol version {version:?}, which stdio-sse does not carry ({}): clients end the session there",
                        config::SUPPORTED_VERSIONS.join(", ")
                    ),
                );
                self.line = Line::Over;
                return false;
            }
            true
        }

        /// A discover result: what it says.
        fn hello_2026(&mut self, r: &Value) {
            self.report.protocol = Some(crate::modern::VERSIONS[0].to_string());
            self.report.server_info = r.pointer(SERVER_INFO_POINTER).cloned();
            self.report.instructions = r
                .get("instructions")
                .and_then(Value::as_str)
                .map(String::from);
            self.report.capabilities = Some(
                r.get("capabilities")
                    .filter(|c| c.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({})),
            );
        }

        /// initialize got an error: a 2026-07-28-only server refuses it, and answers
        /// server/discover instead.
        fn refused_initialize(&mut self, error: &Value, era: ChildEra) {
            let envelope = envelope_2026();
            match self.ask(
                "server/discover",
                envelope.clone(),
                DISCOVER_WAIT.min(self.timeout),
            ) {
                Answer::Result(r) if speaks_2026(&r) => {
                    self.report.speaks_2026 = Some(true);
                    self.hello_2026(&r);
                    if era == ChildEra::Legacy {
                        self.report.problem(
                            Trouble::ModernOnly,
                            format!("the server speaks only 2026-07-28: it refused initialize ({}) and answered server/discover. stdio-sse starts a child with initialize unless told otherwise: serve it with --child-protocol modern (or auto, which asks once at start)", show(error)),
                        );
                    }
                    self.lists(Some(&envelope));
                }
                answer => {
                    if let Answer::Silent = answer {
                        self.abandon();
                    }
                    self.report.problem(
                        Trouble::InitializeError,
                        format!(
                            "the server answered initialize with an error: {}",
                            show(error)
                        ),
                    );
                    self.line = Line::Over;
                }
            }
        }

        /// After a 2025 handshake: does it speak 2026-07-28 as well? An answer either
        /// way is fine; a server that cannot take a method it does not know is warned of.
        fn ask_discover_too(&mut self) {
            if self.line == Line::Over {
                return;
            }
            let wait = DISCOVER_WAIT.min(self.timeout);
            self.report.speaks_2026 = Some(
                match self.ask("server/discover", envelope_2026(), wait) {
                    Answer::Result(r) => speaks_2026(&r),
                    Answer::Error(_) | Answer::Wrong => false,
                    Answer::Silent => {
                        self.abandon();
                        self.report.warnings.push(format!("no answer to server/discover within {wait:?}: a request for a method a server does not know should get an error (-32601 Method not found), or its client waits"));
                        false
                    }
                    Answer::Gone => {
                        self.line = Line::Over;
                        let (how, last) = self.exit_words();
                        self.report.warnings.push(format!("the server {how} on server/discover, a method it does not know ({last}): a client may send any method, and should get an error (-32601 Method not found)"));
                        false
                    }
                },
            );
        }

        /// tools/list, prompts/list, resources/list, as the capabilities say.
        fn lists(&mut self, envelope: Option<&Value>) {
            let caps = self
                .report
                .capabilities
                .clone()
                .unwrap_or_else(|| json!({}));
            if caps.get("tools").is_some() {
                if let Some(tools) = self.list("tools/list", "tools", envelope) {
                    let names = tools
                        .iter()
                        .map(|t| match t.get("name").and_then(Value::as_str) {
                            Some(n) => n.to_string(),
                            None => "(a tool without a name)".to_string(),
                        })
                        .collect();
                    self.report.tools = Some(names);
                }
            }
            if caps.get("prompts").is_some() && self.line == Line::Open {
                self.report.prompts = self
                    .list("prompts/list", "prompts", envelope)
                    .map(|p| p.len());
            }
            if caps.get("resources").is_some() && self.line == Line::Open {
                self.report.resources = self
                    .list("resources/list", "resources", envelope)
                    .map(|r| r.len());
            }
        }

        /// Every page of one list (bounded), or None when it failed (recorded).
        fn list(
            &mut self,
            method: &str,
            key: &str,
            envelope: Option<&Value>,
        ) -> Option<Vec<Value>> {
            let mut items = Vec::new();
            let mut cursors: Vec<String> = Vec::new();
            for _ in 0..MAX_PAGES {
                let mut params = envelope.cloned().unwrap_or_else(|| json!({}));
                if let Some(c) = cursors.last() {
                    params["cursor"] = c.as_str().into();
                }
                let r = match self.ask(method, params, self.timeout) {
                    Answer::Result(r) => r,
                    Answer::Error(e) => {
                        self.report.problem(
                            Trouble::ListFailed,
                            format!("the server answered {method} with an error, though its capabilities announce it: {}", show(&e)),
                        );
                        return None;
                    }
                    Answer::Silent => {
                        self.silent(method);
                        return None;
                    }
                    Answer::Gone => {
                        self.gone(method);
                        return None;
                    }
                    Answer::Wrong => return None,
                };
                let Some(page) = r.get(key).and_then(Value::as_array) else {
                    self.report.problem(
                        Trouble::InvalidJsonRpc,
                        format!("the answer to {method} has no {key:?} list: {}", show(&r)),
                    );
                    return None;
                };
                items.extend(page.iter().cloned());
                match r.get("nextCursor").and_then(Value::as_str) {
                    Some(c) if !c.is_empty() => {
                        if cursors.iter().any(|seen| seen == c) {
                            self.report.warnings.push(format!(
                                "{method} gave the cursor {} twice: the list was read once",
                                quote(c)
                            ));
                            return Some(items);
                        }
                        cursors.push(c.to_string());
                    }
                    _ => return Some(items),
                }
            }
            self.report.warnings.push(format!(
                "{method}: stopped after {MAX_PAGES} pages (its nextCursor did not end)"
            ));
            Some(items)
        }

        fn notify(&mut self, method: &str) {
            let _ = self
                .to_child
                .try_send(json!({"jsonrpc": "2.0", "method": method}));
        }

        /// Sends a request and waits for its answer, taking care of everything else the
        /// child says meanwhile.
        fn ask(&mut self, method: &str, params: Value, wait: Duration) -> Answer {
            if self.line == Line::Over {
                return Answer::Wrong;
            }
            let id = self.next_id;
            self.next_id += 1;
            let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
            let deadline = Instant::now() + wait;
            match self.to_child.send_timeout(request, wait) {
                Ok(()) => {}
                // Its stdin has taken nothing for the whole wait.
                Err(SendTimeoutError::Timeout(_)) => return Answer::Silent,
                Err(SendTimeoutError::Disconnected(_)) => return Answer::Gone,
            }
            loop {
                // A child that writes faster than this reads would otherwise keep a
                // ready line in the channel past the deadline for ever.
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Answer::Silent;
                }
                match self.rx.recv_timeout(left) {
                    Ok(Out::Line(line)) => {
                        if let Some(answer) = self.take(&line, id, method) {
                            return answer;
                        }
                    }
                    Ok(Out::NotUtf8(shown)) => {
                        self.bad_line(&shown, "is not UTF-8 (ST-10)");
                    }
                    Ok(Out::TooLong(n)) => self.report.problem(
                        Trouble::TooLarge,
                        format!("the server wrote a stdout line of {n} bytes or more, over --max-message ({}): stdio-sse skips such a line, so its answer is lost", crate::app().cfg.max_message),
                    ),
                    Ok(Out::Closed) | Err(RecvTimeoutError::Disconnected) => return Answer::Gone,
                    Err(RecvTimeoutError::Timeout) => return Answer::Silent,
                }
            }
        }

        /// One stdout line; the answer to `id` if it is one.
        fn take(&mut self, line: &str, id: u64, method: &str) -> Option<Answer> {
            let value = match crate::message::parse(line.as_bytes()) {
                Ok(v) => v,
                Err(_) => {
                    self.bad_line(line, "is not JSON");
                    return None;
                }
            };
            // A batch (2025-03-26, ST-3) is read item by item, as the bridge reads it.
            let items = match value {
                Value::Array(items) => items,
                v => vec![v],
            };
            let mut answer = None;
            for item in items {
                if let Some(a) = self.one(&item, id, method) {
                    answer.get_or_insert(a);
                }
            }
            answer
        }

        fn one(&mut self, item: &Value, id: u64, method: &str) -> Option<Answer> {
            let ours = json!(id);
            match classify(item) {
                Kind::Request {
                    id: rid,
                    method: asked,
                } => {
                    let rid = rid.clone();
                    let asked = asked.to_string();
                    self.answer_request(rid, &asked);
                    None
                }
                Kind::Notification { .. } => {
                    self.report.notifications += 1;
                    None
                }
                Kind::Response { id: rid } if *rid == ours => Some(match item.get("error") {
                    Some(e) => Answer::Error(e.clone()),
                    None => Answer::Result(item.get("result").cloned().unwrap_or(Value::Null)),
                }),
                Kind::Response { id: rid } => {
                    if rid.as_u64().is_some_and(|r| self.abandoned.contains(&r)) {
                        return None;
                    }
                    self.report.problem(
                        Trouble::InvalidJsonRpc,
                        format!("the server answered id {rid} while {method} (id {id}) was waiting: an answer must carry its request's id, or the client waits for ever: {}", show(item)),
                    );
                    self.line = Line::Over;
                    Some(Answer::Wrong)
                }
                Kind::Invalid(why) => {
                    let answers_us = item.get("id") == Some(&ours)
                        && (item.get("result").is_some() || item.get("error").is_some());
                    let what = if answers_us {
                        format!("the server's answer to {method}")
                    } else {
                        "a message of the server's".to_string()
                    };
                    // A structured logger writing JSON to stdout is the usual culprit.
                    let log = item.get("id").is_none() && item.get("method").is_none();
                    let hint = if log {
                        " (if it is a log line, logs go to stderr: stdout carries only JSON-RPC)"
                    } else {
                        ""
                    };
                    self.report.problem(
                        Trouble::InvalidJsonRpc,
                        format!(
                            "{what} is not valid JSON-RPC 2.0 ({why}): {}{hint}",
                            show(item)
                        ),
                    );
                    answers_us.then(|| {
                        self.line = Line::Over;
                        Answer::Wrong
                    })
                }
            }
        }

        /// A request of the child's during the check (ST-9): answered so it does not
        /// wait, with what a client that offers nothing would say.
        fn answer_request(&mut self, id: Value, method: &str) {
            let reply = match method {
                "ping" => json!({"jsonrpc": "2.0", "id": id, "result": {}}),
                "roots/list" => json!({"jsonrpc": "2.0", "id": id, "result": {"roots": []}}),
                _ => json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601,
                    "message": format!("Method not found: {method} (stdio-sse check answers ping and roots/list only)")}}),
            };
            // Each method once, and only the first few: a server asking in a loop would
            // otherwise grow the report for as long as the check lasts.
            let method = cut(method);
            if !self.report.asked.contains(&method) && self.report.asked.len() < QUOTED_LINES {
                self.report.asked.push(method);
            }
            // Full: the child is not reading its stdin, and the answer would wait for ever.
            let _ = self.to_child.try_send(reply);
        }

        /// A stdout line that is not a message (ST-5).
        fn bad_line(&mut self, line: &str, what: &str) {
            self.report.non_json_count += 1;
            if self.report.non_json.len() < QUOTED_LINES {
                self.report.non_json.push(cut(line));
            }
            let framing = if line.starts_with("Content-Length") {
                " (Content-Length headers are LSP's framing: MCP's stdio is one JSON message per line)"
            } else {
                ""
            };
            self.report.problem(
                Trouble::NonJson,
                format!("the server wrote a line on stdout that {what}: {}{framing}. stdout must carry only JSON-RPC messages, one per line; logs and banners go to stderr (stdio-sse skips such lines, other clients may fail on them)", quote(line)),
            );
        }

        fn abandon(&mut self) {
            self.abandoned.push(self.next_id - 1);
        }

        fn silent(&mut self, during: &str) {
            self.line = Line::Over;
            self.abandon();
            let lsp = self
                .report
                .non_json
                .iter()
                .any(|l| l.starts_with("Content-Length"));
            let hint = if lsp {
                "it frames its messages with Content-Length headers (LSP), not one JSON message per line"
            } else {
                "it may still be starting (raise --timeout), wait for something of its own (a login, a terminal prompt, the network), or not speak MCP on stdio"
            };
            let waited = self.timeout;
            self.report.problem(
                Trouble::Timeout,
                format!("no answer to {during} within {waited:?} (--timeout): the server is running but did not answer; {hint}"),
            );
        }

        fn gone(&mut self, during: &str) {
            self.line = Line::Over;
            self.drain();
            let (how, last) = self.exit_words();
            let trouble = if self.child.has_exited() {
                Trouble::Exited
            } else {
                Trouble::StdoutClosed
            };
            self.report.problem(
                trouble,
                format!("the server {how} before answering {during}; {last}"),
            );
        }

        /// What the child wrote on stdout before it went (a request that failed to be
        /// written leaves it unread): a usage text or an error printed there is quoted.
        fn drain(&mut self) {
            let deadline = Instant::now() + EXIT_SETTLE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(Out::Line(line)) => {
                        if crate::message::parse(line.as_bytes()).is_err() {
                            self.bad_line(&line, "is not JSON");
                        }
                    }
                    Ok(Out::NotUtf8(shown)) => self.bad_line(&shown, "is not UTF-8 (ST-10)"),
                    Ok(Out::TooLong(_)) => {}
                    Ok(Out::Closed) | Err(_) => return,
                }
            }
        }

        /// How the child went away, and its last words on stderr.
        fn exit_words(&self) -> (String, String) {
            let words = match self.child.wait_exit(EXIT_SETTLE) {
                Some(status) => {
                    // A loader refused memory by --child-memory exits 127 as well.
                    let limit = self.child.limit_hit().is_some();
                    let hint = match status.code() {
                        _ if limit => "",
                        Some(127) => " (127: a command it runs was not found)",
                        Some(126) => " (126: a command it runs is not executable)",
                        _ => "",
                    };
                    format!("{}{hint}", self.child.ended(&status))
                }
                None => "closed its stdout and is still running".to_string(),
            };
            let last = match self.child.final_stderr_tail().last() {
                Some(last) => format!("its last line on stderr: {}", quote(last)),
                None => "it wrote nothing on stderr".to_string(),
            };
            (words, last)
        }

        /// Ends the child by the escalation (stdin EOF first) and completes the report.
        fn end(self) -> Report {
            let mut report = self.report;
            let began = Instant::now();
            let (status, ending) = match self.child.wait_exit(Duration::ZERO) {
                Some(status) => {
                    // Unless its going was already said (a problem, or the discover warning).
                    if report.works() && self.line == Line::Open {
                        report.warnings.push(format!("the server {} by itself before its stdin closed: a session whose child ends early fails its client's next request", crate::child::describe(&status)));
                    }
                    (status, Ending::Itself)
                }
                None => {
                    let grace = crate::app().cfg.shutdown_grace;
                    let status = self.child.terminate(grace);
                    let ending = match status.signal() {
                        Some(libc::SIGKILL) => Ending::Sigkill,
                        Some(libc::SIGTERM) => Ending::Sigterm,
                        _ if began.elapsed() >= grace => Ending::Sigterm,
                        _ => Ending::StdinEof,
                    };
                    if ending != Ending::StdinEof {
                        report.warnings.push(format!("the server did not exit when its stdin closed: it was sent {} after {grace:?} (--shutdown-grace). A server should exit on stdin EOF (ST-7, ST-8): stdio-sse waits that long for each such child", if ending == Ending::Sigkill { "SIGTERM, then SIGKILL," } else { "SIGTERM" }));
                    }
                    (status, ending)
                }
            };
            report.exit = Some(status);
            report.ending = Some((ending, began.elapsed()));
            report.stderr = self.child.final_stderr_tail();
            report
        }
    }

    fn envelope_2026() -> Value {
        json!({"_meta": {META_VERSION: crate::modern::VERSIONS[0], META_CAPABILITIES: {}}})
    }

    fn speaks_2026(discover: &Value) -> bool {
        discover
            .get("supportedVersions")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter()
                    .any(|v| v.as_str() == Some(crate::modern::VERSIONS[0]))
            })
    }

    fn cut(line: &str) -> String {
        let mut s: String = line.chars().take(QUOTE_CHARS).collect();
        if s.len() < line.len() {
            s.push('…');
        }
        s
    }

    /// A line as a JSON string: its quotes and escapes show exactly what was written.
    fn quote(line: &str) -> String {
        serde_json::to_string(&cut(line)).unwrap_or_default()
    }

    /// A message of the server's, as compact JSON (cut).
    fn show(value: &Value) -> String {
        cut(&value.to_string())
    }

    // ---- the report --------------------------------------------------------------------

    fn to_json(r: &Report) -> Value {
        let problems: Vec<Value> = r
            .problems
            .iter()
            .map(|(t, m)| json!({"kind": t.name(), "message": m}))
            .collect();
        let exit = r.exit.map(|s| match (s.code(), s.signal()) {
            (Some(c), _) => json!({"code": c}),
            (None, Some(sig)) => json!({"signal": sig}),
            _ => Value::Null,
        });
        json!({
            "name": r.name,
            "command": r.command,
            "ok": r.works(),
            "problems": problems,
            "warnings": r.warnings,
            "protocolVersion": r.protocol,
            "speaks2026": r.speaks_2026,
            "serverInfo": r.server_info,
            "capabilities": r.capabilities,
            "instructions": r.instructions,
            "tools": r.tools,
            "prompts": r.prompts,
            "resources": r.resources,
            "startMs": r.start.map(|d| d.as_millis() as u64),
            "stderr": r.stderr,
            "nonJsonStdout": r.non_json,
            "nonJsonLines": r.non_json_count,
            "serverRequests": r.asked,
            "notifications": r.notifications,
            "exit": exit,
            "endedBy": r.ending.map(|(e, _)| e.name()),
        })
    }

    /// `tools (listChanged)`: each capability with the flags it turns on.
    fn capability_words(caps: &Value) -> String {
        let Some(map) = caps.as_object() else {
            return String::new();
        };
        let words: Vec<String> = map
            .iter()
            .map(|(k, v)| {
                let on: Vec<&str> = v
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(_, x)| x.as_bool() == Some(true) || x.is_object())
                            .map(|(n, _)| n.as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                if on.is_empty() {
                    k.clone()
                } else {
                    format!("{k} ({})", on.join(", "))
                }
            })
            .collect();
        if words.is_empty() {
            "none".into()
        } else {
            words.join(", ")
        }
    }

    fn to_text(r: &Report, from_file: bool) -> String {
        let mut out = String::new();
        let mut row = |label: &str, value: String| {
            out.push_str(&format!("  {label:<13} {value}\n"));
        };
        let head = if from_file {
            format!("server {}: {}\n", r.name, r.command.join(" "))
        } else {
            format!("check: {}\n", r.command.join(" "))
        };
        if let Some(info) = &r.server_info {
            let field = |k: &str| {
                info.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            row("server", format!("{} {}", field("name"), field("version")));
        }
        if let Some(p) = &r.protocol {
            let also = match (p.as_str() == crate::modern::VERSIONS[0], r.speaks_2026) {
                (false, Some(true)) => " (also speaks 2026-07-28)",
                (false, Some(false)) => " (does not speak 2026-07-28)",
                _ => "",
            };
            row("protocol", format!("{p}{also}"));
        }
        if let Some(d) = r.start {
            row(
                "started in",
                format!("{} ms (to its first answer)", d.as_millis()),
            );
        }
        if let Some(c) = &r.capabilities {
            row("capabilities", capability_words(c));
        }
        if let Some(tools) = &r.tools {
            let label = format!("tools ({})", tools.len());
            row(
                &label,
                if tools.is_empty() {
                    "none".into()
                } else {
                    tools.join(", ")
                },
            );
        }
        if let Some(n) = r.prompts {
            row("prompts", n.to_string());
        }
        if let Some(n) = r.resources {
            row("resources", n.to_string());
        }
        if !r.asked.is_empty() {
            row("it asked", format!("{} (answered)", r.asked.join(", ")));
        }
        let more = r.non_json_count.saturating_sub(r.non_json.len());
        for (i, l) in r.non_json.iter().enumerate() {
            row(if i == 0 { "bad stdout" } else { "" }, quote(l));
        }
        if more > 0 {
            row("", format!("... and {more} more"));
        }
        for (i, l) in r.stderr.iter().enumerate() {
            row(if i == 0 { "stderr" } else { "" }, format!("| {l}"));
        }
        if let (Some(status), Some((ending, took))) = (r.exit, r.ending) {
            let how = crate::child::describe(&status);
            let when = match ending {
                Ending::Itself => "during the check".to_string(),
                Ending::StdinEof => format!("once its stdin closed ({} ms)", took.as_millis()),
                Ending::Sigterm => format!(
                    "on SIGTERM ({} ms after its stdin closed)",
                    took.as_millis()
                ),
                Ending::Sigkill => format!(
                    "on SIGKILL ({} ms after its stdin closed)",
                    took.as_millis()
                ),
            };
            row("ended", format!("{how} {when}"));
        }
        for w in &r.warnings {
            row("warning", w.clone());
        }
        for (t, m) in &r.problems {
            row("PROBLEM", format!("[{}] {m}", t.name()));
        }
        out.insert_str(0, &head);
        out.push_str(if r.works() {
            "  verdict: works\n"
        } else {
            "  verdict: DOES NOT WORK\n"
        });
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn split(args: &[&str]) -> Result<(Duration, bool, Vec<String>), String> {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            match options(&args, &|_| None)? {
                Asked::Check(o, rest) => Ok((o.timeout, o.output == Output::Json, rest)),
                Asked::Help => Err("help".into()),
            }
        }

        #[test]
        fn the_checks_flags_are_taken_out_and_the_rest_kept_in_order() {
            let (t, json, rest) = split(&[
                "--env",
                "A=1",
                "--timeout",
                "2s",
                "--json",
                "--cwd=/tmp",
                "python3",
                "--timeout",
                "x",
            ])
            .unwrap();
            assert_eq!((t, json), (Duration::from_secs(2), true));
            assert_eq!(
                rest,
                ["--env", "A=1", "--cwd=/tmp", "python3", "--timeout", "x"]
            );
            let (t, json, rest) = split(&["--access-log", "--", "srv"]).unwrap();
            assert_eq!((t, json), (Duration::from_secs(10), false));
            assert_eq!(rest, ["--access-log", "--", "srv"]);
            assert!(split(&["--timeout", "0", "x"]).is_err());
            assert!(split(&["--timeout"]).is_err());
            assert!(split(&["--json=maybe", "x"]).is_err());
            assert!(split(&["-h"]).is_err_and(|e| e == "help"));
        }

        #[test]
        fn capabilities_read_as_words() {
            let caps = json!({"tools": {"listChanged": true}, "logging": {}, "resources": {"subscribe": false, "listChanged": true}});
            assert_eq!(
                capability_words(&caps),
                "logging, resources (listChanged), tools (listChanged)"
            );
            assert_eq!(capability_words(&json!({})), "none");
        }
    }
}
// ======================================================================================
/// Process ownership past our own end: the guardian, a forked process that ends every
/// child's process group if we die without doing it ourselves (SIGKILL, the OOM killer);
/// the init duties when we are PID 1 (reap orphans, forward signals); and
/// --exit-with-parent. The forks happen in main before any thread exists. Touches only
/// process groups it was told about, and its own pipe.
/// Owns: the guardian, PID 1 duties, parent-death. Touches: process groups it is told
/// of, its own pipe. Rules: OP-1..OP-3.
mod ownership {
    use super::*;

    /// Write end of the guardian's pipe (-1: no guardian).
    static GUARDIAN_PIPE: AtomicI32 = AtomicI32::new(-1);
    static GUARDIAN_PID: AtomicI32 = AtomicI32::new(0);
    /// Signals PID 1 passes on to stdio-sse; any other is of no use to it.
    const FORWARDED: [libc::c_int; 6] = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ];
    /// Without pidfd_open (Linux before 5.3), how often --exit-with-parent looks.
    const PARENT_POLL: Duration = Duration::from_millis(500);

    fn set_name(name: &str) {
        let mut buf = [0u8; 16];
        let n = name.len().min(15);
        buf[..n].copy_from_slice(&name.as_bytes()[..n]);
        unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
    }

    /// As PID 1 (a container with no init) every orphan in the namespace becomes ours to
    /// reap, and signals with no handler are ignored. We fork: PID 1 stays a tiny init
    /// that reaps everything and forwards signals, and the child goes on as stdio-sse.
    /// Returns true in that child, false when we are not PID 1; never returns in PID 1.
    pub fn init_if_pid1() -> bool {
        if unsafe { libc::getpid() } != 1 {
            return false;
        }
        // Named before the fork, so "stdio-sse-init" is in place by the time the worker
        // says it is listening; the worker takes its own name back at once.
        let mut own_name = [0u8; 16];
        unsafe {
            libc::prctl(
                libc::PR_GET_NAME,
                own_name.as_mut_ptr() as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        set_name("stdio-sse-init");
        let worker = unsafe { libc::fork() };
        if worker < 0 {
            unsafe {
                libc::prctl(
                    libc::PR_SET_NAME,
                    own_name.as_ptr() as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
            let e = std::io::Error::last_os_error();
            crate::log!(Warn, "init", "running as PID 1 but cannot fork a worker ({e}); orphans of the children will not be reaped");
            return false;
        }
        if worker == 0 {
            unsafe {
                libc::prctl(
                    libc::PR_SET_NAME,
                    own_name.as_ptr() as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
            // If PID 1 goes, the namespace goes; this just makes it immediate.
            unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
            return true;
        }
        run_init(worker)
    }

    fn run_init(worker: libc::pid_t) -> ! {
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            for s in FORWARDED {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
        crate::log!(
            Debug,
            "init",
            "PID 1: reaping orphans; stdio-sse runs as pid {worker}"
        );
        loop {
            let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
            if sig != libc::SIGCHLD {
                if sig > 0 {
                    unsafe { libc::kill(worker, sig) };
                }
                continue;
            }
            loop {
                let mut status = 0;
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if pid == worker {
                    let code = if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        128 + libc::WTERMSIG(status)
                    };
                    std::process::exit(code);
                }
            }
        }
    }

    /// Forks the guardian. It holds the read end of a pipe whose write end only we hold
    /// (close-on-exec, so no child inherits it): when we die, however we die, it reads
    /// EOF and kills every process group still on its list.
    pub fn start_guardian() {
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            let e = std::io::Error::last_os_error();
            crate::log!(Warn, "guardian", "cannot make the guardian's pipe ({e}); children's children may outlive a SIGKILL of stdio-sse");
            return;
        }
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { libc::close(fds[1]) };
            guard(fds[0]);
        }
        unsafe { libc::close(fds[0]) };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            crate::log!(Warn, "guardian", "cannot fork the guardian ({e}); children's children may outlive a SIGKILL of stdio-sse");
            unsafe { libc::close(fds[1]) };
            return;
        }
        // A stopped guardian must never block a spawn: a full pipe is reported instead.
        unsafe {
            let flags = libc::fcntl(fds[1], libc::F_GETFL);
            libc::fcntl(fds[1], libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        GUARDIAN_PID.store(pid, Ordering::Relaxed);
        GUARDIAN_PIPE.store(fds[1], Ordering::Release);
    }

    /// The guardian's whole life: a list of process groups, kept from the pipe.
    fn guard(fd: libc::c_int) -> ! {
        set_name("stdio-sse-guard");
        // Nothing to read or print here; the terminal and pipes of our parent's are not
        // held open by this process.
        unsafe {
            libc::close(0);
            libc::close(1);
        }
        let mut groups: Vec<i32> = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n as usize]);
            let whole = pending.len() / 4 * 4;
            for rec in pending[..whole].chunks_exact(4) {
                let v = i32::from_ne_bytes([rec[0], rec[1], rec[2], rec[3]]);
                if v > 0 {
                    groups.push(v);
                } else {
                    groups.retain(|g| *g != -v);
                }
            }
            pending.drain(..whole);
        }
        if !groups.is_empty() {
            crate::log!(
                Warn,
                "guardian",
                "stdio-sse ended with {} child process group(s) still running; killing them",
                groups.len()
            );
            for g in &groups {
                unsafe { libc::kill(-g, libc::SIGKILL) };
            }
        }
        unsafe { libc::_exit(0) }
    }

    /// A child's process group to end if we die: called once it is spawned.
    pub fn own_group(pgid: i32) {
        tell(pgid);
    }

    /// The group has been killed and is about to be reaped: its id may be reused after.
    pub fn forget(pgid: i32) {
        tell(-pgid);
    }

    fn tell(v: i32) {
        let fd = GUARDIAN_PIPE.load(Ordering::Acquire);
        if fd < 0 {
            return;
        }
        let rec = v.to_ne_bytes();
        let n = unsafe { libc::write(fd, rec.as_ptr().cast(), rec.len()) };
        if n == rec.len() as isize {
            return;
        }
        let e = std::io::Error::last_os_error();
        if GUARDIAN_PIPE.swap(-1, Ordering::AcqRel) == fd {
            unsafe {
                libc::close(fd);
                let mut status = 0;
                libc::waitpid(
                    GUARDIAN_PID.load(Ordering::Relaxed),
                    &mut status,
                    libc::WNOHANG,
                );
            }
            crate::log!(Warn, "guardian", "the guardian process is gone ({e}); children's children may now outlive a SIGKILL of stdio-sse");
        }
    }

    /// --exit-with-parent: waits for the process that started us to exit (a pidfd, so no
    /// polling), then asks for the usual graceful shutdown.
    pub fn exit_with_parent(parent: libc::pid_t) {
        crate::spawn_thread("parent-watch", move || {
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, parent, 0) } as libc::c_int;
            if fd >= 0 {
                // The parent may have gone before the pidfd was made.
                if unsafe { libc::getppid() } == parent {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    while unsafe { libc::poll(&mut p, 1, -1) } < 0 {}
                }
                unsafe { libc::close(fd) };
            } else {
                while unsafe { libc::getppid() } == parent {
                    std::thread::sleep(PARENT_POLL);
                }
            }
            crate::log!(
                Info,
                "parent_exit",
                "the parent process (pid {parent}) exited; shutting down (--exit-with-parent)"
            );
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        });
    }
}

// ======================================================================================
/// Teardown: how stdio-sse and its children end, read in one place. A child ends by the
/// escalation table below; stdio-sse answers SIGINT/SIGTERM by ending every session and
/// child in order (a second signal: SIGKILL to every child's group at once), and SIGHUP
/// by re-reading the token file. SIGKILL of stdio-sse itself is `ownership`'s (the
/// kernel's PDEATHSIG and the guardian).
/// Owns: the escalation steps, the signal thread, the shutdown sequence.
/// Touches: each session (ended), the child table (children without a session are
/// terminated), `auth` (reload), the log.
/// Rules: ST-7 (stdin EOF, then SIGTERM after a reasonable time, then SIGKILL), OP-4.
mod teardown {
    use crate::{app, auth, log, sessions, spawn_thread, Locked};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    /// One step of ending a child.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Step {
        /// stdin EOF: a well-behaved server exits on it.
        CloseStdin,
        /// A signal to the child's whole process group.
        Signal(libc::c_int),
    }

    /// How long a step waits for the exit before the next.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Wait {
        /// --shutdown-grace.
        Grace,
        /// Until it has exited (SIGKILL cannot be ignored).
        Exit,
    }

    /// A child's end, step by step (websocketd's table, with stdin EOF first: an MCP
    /// server's documented way to stop).
    pub const ESCALATION: [(Step, Wait); 3] = [
        (Step::CloseStdin, Wait::Grace),
        (Step::Signal(libc::SIGTERM), Wait::Grace),
        (Step::Signal(libc::SIGKILL), Wait::Exit),
    ];

    /// While waiting for a SIGKILLed child, the exit is re-checked this often.
    const KILLED_RECHECK: Duration = Duration::from_secs(60);

    /// Ends `child` by ESCALATION from step `first` on (1: stdin already closed).
    pub fn escalate(
        child: &crate::child::ChildProc,
        grace: Duration,
        first: usize,
    ) -> std::process::ExitStatus {
        let mut waited = None;
        for &(step, wait) in &ESCALATION[first.min(ESCALATION.len() - 1)..] {
            match (step, waited) {
                (Step::CloseStdin, _) => child.close_stdin(),
                (Step::Signal(sig), Some(after)) => {
                    let why = format!(
                        "pid {} {after} for {grace:?}; sending {}",
                        child.pid,
                        signal_name(sig)
                    );
                    if sig == libc::SIGKILL {
                        log!(Warn, "child_kill", session = child.tag; "{why}");
                    } else {
                        log!(Info, "child_term", session = child.tag; "{why}");
                    }
                    child.signal_group(sig);
                }
                (Step::Signal(sig), None) => child.signal_group(sig),
            }
            match wait {
                Wait::Grace => {
                    if let Some(status) = child.wait_exit(grace) {
                        return status;
                    }
                }
                Wait::Exit => loop {
                    if let Some(status) = child.wait_exit(KILLED_RECHECK) {
                        return status;
                    }
                },
            }
            waited = Some(match step {
                Step::CloseStdin => "ignored stdin EOF",
                Step::Signal(_) => "still running after SIGTERM",
            });
        }
        unreachable!("the last step waits for the exit")
    }

    fn signal_name(sig: libc::c_int) -> &'static str {
        match sig {
            libc::SIGTERM => "SIGTERM",
            libc::SIGKILL => "SIGKILL",
            _ => "a signal",
        }
    }

    pub fn block_signals() -> libc::sigset_t {
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGUSR1,
                libc::SIGUSR2,
            ] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        }
    }

    /// First SIGINT/SIGTERM: refuse new work, end every session and child in order, exit 0.
    /// A second one during that: kill every child group at once and exit.
    pub fn handle_signals(set: libc::sigset_t) {
        loop {
            let mut sig: libc::c_int = 0;
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            let app = app();
            if sig == libc::SIGHUP {
                if app.cfg.auth.token_file.is_some() || app.cfg.config_file.is_none() {
                    auth::reload();
                }
                crate::servers::reload();
                continue;
            }
            let drains = sig == app.cfg.drain_signal && app.cfg.drain_timeout.is_some();
            if sig != libc::SIGINT && sig != libc::SIGTERM && !drains {
                if sig == app.cfg.drain_signal {
                    log!(
                        Info,
                        "signal",
                        "signal {sig} received: --drain-timeout is 0; shutting down"
                    );
                } else {
                    log!(Info, "signal", "signal {sig} ignored (not --drain-signal)");
                    continue;
                }
            }
            if drains && !DRAINING.swap(true, Ordering::AcqRel) {
                spawn_thread("drain", drain);
                continue;
            }
            if app.shutting_down.swap(true, Ordering::AcqRel) {
                log!(Warn, "signal", "second signal: killing every child now");
                for c in app.children.locked().values() {
                    unsafe { libc::kill(-c.pid, libc::SIGKILL) };
                }
                crate::observe::tap::close();
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

    /// Draining: the instance is on its way out (--drain-signal); /readyz says so.
    pub static DRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Sessions a drain waits for: clients' own (carriers serve 2026-07-28 calls, which
    /// are still served; a merged session's server sessions end with it).
    fn client_sessions() -> usize {
        app()
            .sessions
            .all()
            .iter()
            .filter(|s| {
                matches!(
                    s.transport,
                    crate::sessions::Transport::Streamable | crate::sessions::Transport::Legacy
                )
            })
            .count()
            + crate::legacy::announced_count()
    }

    /// A drain: /readyz turns 503 and new sessions are refused with 503 and
    /// Retry-After (a balancer retries elsewhere) while the open ones, and 2026-07-28
    /// calls, are served until the last session ends or --drain-timeout passes; then the
    /// usual shutdown.
    fn drain() {
        let app = app();
        let timeout = app.cfg.drain_timeout.unwrap_or_default();
        log!(
            Info,
            "drain",
            "draining: /readyz 503, new sessions refused; {} session(s) open, served for {timeout:?} at most",
            client_sessions()
        );
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let open = client_sessions();
            if open == 0 {
                log!(Info, "drain", "drained: no session left; shutting down");
                break;
            }
            if std::time::Instant::now() >= deadline {
                log!(
                    Info,
                    "drain",
                    "--drain-timeout passed with {open} session(s) open; shutting down"
                );
                break;
            }
            std::thread::sleep(
                DRAIN_TICK.min(deadline.saturating_duration_since(std::time::Instant::now())),
            );
        }
        if !app.shutting_down.swap(true, Ordering::AcqRel) {
            shutdown();
        }
    }

    /// How often a drain looks at what is left.
    const DRAIN_TICK: Duration = Duration::from_millis(100);

    fn shutdown() {
        let app = app();
        // 2026-07-28 listeners get their final result while their children still run.
        crate::modern::farewell();
        let mut joins = Vec::new();
        // Every ending runs at once, each on a thread of its own; one that cannot get a
        // thread (a thread limit reached) runs here, so shutdown is slower, never stuck.
        let mut run = |job: Box<dyn FnOnce() + Send>| {
            let job = Arc::new(std::sync::Mutex::new(Some(job)));
            let theirs = job.clone();
            match std::thread::Builder::new().spawn(move || {
                if let Some(f) = theirs.locked().take() {
                    f()
                }
            }) {
                Ok(j) => joins.push(j),
                Err(_) => {
                    if let Some(f) = job.locked().take() {
                        f()
                    }
                }
            }
        };
        for s in app.sessions.all() {
            run(Box::new(move || {
                sessions::end(&s, sessions::EndReason::Shutdown)
            }));
        }
        // Children of sessions are ended by their session (which answers the child's
        // open requests first); the rest (shared, warm, one-shot) here.
        let owned: std::collections::HashSet<i32> = app
            .sessions
            .all()
            .iter()
            .filter_map(|s| s.upstream.own_child_pid())
            .collect();
        let others: Vec<_> = app
            .children
            .locked()
            .values()
            .filter(|c| !owned.contains(&c.pid))
            .cloned()
            .collect();
        for c in others {
            let grace = app.cfg.shutdown_grace;
            run(Box::new(move || {
                c.terminate(grace);
            }));
        }
        for j in joins {
            let _ = j.join();
        }
        log!(Info, "shutdown", "all children ended; exiting");
        crate::observe::tap::close();
        std::process::exit(0);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_child_is_asked_first_and_killed_last() {
            assert_eq!(ESCALATION[0], (Step::CloseStdin, Wait::Grace));
            assert_eq!(ESCALATION[1], (Step::Signal(libc::SIGTERM), Wait::Grace));
            assert_eq!(
                ESCALATION.last(),
                Some(&(Step::Signal(libc::SIGKILL), Wait::Exit))
            );
        }
    }
}

// ======================================================================================
/// SSE framing on a connection handed over by tiny_http: the status line and headers,
/// one HTTP chunk per flush (tiny_http's own encoder would hold ~8 KiB back), and the
/// stream pump that turns a session queue into events. Touches the writer it owns, and
/// the session it pumps for (`touch` on each write, `detach` at the end).
/// Owns: `SseStream` (framing), the pump. Touches: the writer, the session it pumps
/// for. Rules: R-3, R-5, G-5.
mod sse {
    use super::*;
    use crate::sessions::{Attached, Frame, Session, StreamKind};
    use crossbeam_channel::RecvTimeoutError;
    use std::io::Write;

    /// Frames already waiting that one flush carries at most.
    const MAX_BATCH: usize = 64;

    pub fn status_line(status: u16) -> String {
        let reason = match status {
            200 => "OK",
            202 => "Accepted",
            204 => "No Content",
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            406 => "Not Acceptable",
            401 => "Unauthorized",
            408 => "Request Timeout",
            409 => "Conflict",
            411 => "Length Required",
            413 => "Content Too Large",
            415 => "Unsupported Media Type",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            502 => "Bad Gateway",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "Status",
        };
        format!("HTTP/1.1 {status} {reason}\r\n")
    }

    /// A stream keeps at most this much pending-buffer capacity between flushes.
    const IDLE_BUFFER_MAX: usize = 64 * 1024;

    pub struct SseStream {
        out: Box<dyn Write + Send>,
        chunked: bool,
        buf: Vec<u8>,
    }

    impl SseStream {
        /// Puts the head in the pending buffer; the first flush sends it.
        pub fn open(
            out: Box<dyn Write + Send>,
            chunked: bool,
            extra: &[(&str, String)],
        ) -> SseStream {
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
            // The pending buffer starts as the head and grows with the events: an idle
            // stream holds no more than it ever needed at once.
            SseStream {
                out,
                chunked,
                buf: head.into_bytes(),
            }
        }

        /// Frames one event into the pending buffer as its own chunk.
        fn push(&mut self, parts: &[&[u8]]) {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            if self.chunked {
                use std::io::Write as _;
                let _ = write!(self.buf, "{len:x}\r\n");
            }
            for p in parts {
                self.buf.extend_from_slice(p);
            }
            if self.chunked {
                self.buf.extend_from_slice(b"\r\n");
            }
        }

        /// `id:` names the event for resumption (R-3); `retry:` rides on the first event
        /// of a stream for clients that poll (R-5).
        pub fn push_frame(&mut self, f: &Frame, retry_ms: Option<u128>) {
            use std::fmt::Write as _;
            // One small stack-sized head per frame; the JSON is copied once, into the
            // pending buffer.
            let mut head = String::with_capacity(64);
            let _ = writeln!(head, "id: {}-{}", f.stream, f.n);
            if let Some(ms) = retry_ms {
                let _ = writeln!(head, "retry: {ms}");
            }
            head.push_str("event: message\ndata: ");
            self.push(&[head.as_bytes(), f.json.as_bytes(), b"\n\n"]);
        }

        /// An event with an id and empty data: the client can resume from here even
        /// before the first message (R-5).
        pub fn push_priming(&mut self, id: &str, retry_ms: Option<u128>) {
            let retry = retry_ms
                .map(|ms| format!("retry: {ms}\n"))
                .unwrap_or_default();
            self.push(&[format!("id: {id}\n{retry}data: \n\n").as_bytes()]);
        }

        pub fn push_comment(&mut self, text: &str) {
            self.push(&[b": ", text.as_bytes(), b"\n\n"]);
        }

        pub fn flush(&mut self) -> std::io::Result<()> {
            crate::observe::bytes_out(self.buf.len());
            let r = self.out.write_all(&self.buf).and_then(|_| self.out.flush());
            self.buf.clear();
            // After a large result, an idle stream gives the memory back.
            if self.buf.capacity() > IDLE_BUFFER_MAX {
                self.buf.shrink_to(IDLE_BUFFER_MAX);
            }
            r
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
            self.push_comment(text);
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

    /// Writes a stream's events until it is done: the priming event and what is to be
    /// replayed first, then frames from its queue, those already waiting together in one
    /// flush. A POST stream ends after its last response; any stream ends when the
    /// session ends or the connection is cut from it (the end tells the client to
    /// resume with Last-Event-ID). Each successful write counts as session activity; a
    /// failed write means the client left.
    pub fn pump(mut stream: SseStream, a: Attached, session: &Session) {
        let keepalive = crate::app()
            .cfg
            .keepalive
            .unwrap_or(crate::config::KEEPALIVE_OFF_WAKE);
        let post = a.kind == StreamKind::Post;
        let mut retry = a.retry_ms;
        if let Some(id) = &a.priming {
            stream.push_priming(id, retry.take());
        }
        let mut finished = a.finished;
        for f in &a.replay {
            stream.push_frame(f, retry.take());
            if f.last && post {
                finished = true;
                break;
            }
        }
        // The head and priming wait in the buffer for a quick answer (--head-hold).
        let hold = crate::app().cfg.head_hold;
        let mut holding = post && !hold.is_zero();
        let done = loop {
            if finished || a.link.cut.load(Ordering::Acquire) {
                break true;
            }
            let wait = if holding {
                hold
            } else {
                if stream.flush().is_err() {
                    break false;
                }
                session.touch();
                keepalive
            };
            let first = match a.rx.recv_timeout(wait) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) if holding => {
                    holding = false;
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    stream.push_comment("keepalive");
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break true,
            };
            holding = false;
            let mut frame = Some(first);
            let mut batched = 0;
            while let Some(f) = frame.take() {
                a.link.take(f.json.len());
                stream.push_frame(&f, retry.take());
                finished = f.last && post;
                batched += 1;
                if !finished && batched < MAX_BATCH {
                    frame = a.rx.try_recv().ok();
                }
            }
        };
        let delivery = if done {
            let ended = stream.finish().is_ok();
            if ended {
                session.touch();
            }
            if ended && finished && post {
                crate::sessions::Delivery::Whole
            } else {
                crate::sessions::Delivery::Partial
            }
        } else {
            crate::log!(
                Debug,
                "stream_closed",
                session = session.tag; "client closed stream {}",
                a.stream);
            crate::sessions::Delivery::Partial
        };
        a.link.close();
        session.detach(a.stream, a.conn_id, delivery);
    }
}

// ======================================================================================
/// Observability: the log (one line per event to stderr, text or JSON), the access log
/// (one line per HTTP request, gathered per handler thread), and the counters behind
/// /metrics. Everything else calls in; for /metrics this asks the sessions for their
/// figures (`Registry::stats`), the door for its connection count, the child table for
/// its size, and /proc for the process's own figures.
/// Owns: the log, the access log, `Metrics`. Touches: see above, read-only.
/// Rules: OP-5, OP-6.
mod observe {
    use super::*;
    use std::cell::RefCell;
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
        fn lower(self) -> &'static str {
            match self {
                Level::Error => "error",
                Level::Warn => "warn",
                Level::Info => "info",
                Level::Debug => "debug",
            }
        }
    }

    pub static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
    /// --log-format json: one JSON object per line instead of text.
    pub static JSON: AtomicBool = AtomicBool::new(false);
    /// --access-log: a line per HTTP request.
    pub static ACCESS_LOG: AtomicBool = AtomicBool::new(true);
    /// Longest message body printed at debug; the rest is summarised by its size.
    pub const BODY_LOG_LIMIT: usize = 1024;
    /// Longest request path in the access log (the path is the client's to choose).
    const PATH_LOG_LIMIT: usize = 256;

    pub fn enabled(level: Level) -> bool {
        level as u8 <= LEVEL.load(Ordering::Relaxed)
    }

    /// A structured field: text in text lines, and in JSON a string or, for numbers, a
    /// bare number. `None` leaves the field out.
    pub trait Field {
        fn text(&self, out: &mut String);
        fn json(&self, out: &mut String);
        fn present(&self) -> bool {
            true
        }
    }

    fn json_string(out: &mut String, s: &str) {
        out.push_str(&serde_json::Value::from(s).to_string());
    }

    /// A text value as is when it is one word, else quoted, so `k=v` pairs stay
    /// splittable (logfmt).
    fn text_value(out: &mut String, s: &str) {
        if !s.is_empty()
            && !s.contains(|c: char| c == ' ' || c == '"' || c == '=' || c.is_control())
        {
            out.push_str(s);
        } else {
            let _ = write!(out, "{s:?}");
        }
    }

    impl Field for &str {
        fn text(&self, out: &mut String) {
            text_value(out, self);
        }
        fn json(&self, out: &mut String) {
            json_string(out, self);
        }
    }
    impl Field for String {
        fn text(&self, out: &mut String) {
            text_value(out, self);
        }
        fn json(&self, out: &mut String) {
            json_string(out, self);
        }
    }
    /// A server's name: left out when it is the one server of a COMMAND, so logs of a
    /// single-server instance read as before.
    impl Field for Arc<str> {
        fn text(&self, out: &mut String) {
            text_value(out, self);
        }
        fn json(&self, out: &mut String) {
            json_string(out, self);
        }
        fn present(&self) -> bool {
            crate::APP
                .get()
                .is_some_and(|a| a.cfg.config_file.is_some())
        }
    }
    macro_rules! number_field {
        ($($t:ty),*) => {$(
            impl Field for $t {
                fn text(&self, out: &mut String) {
                    let _ = write!(out, "{self}");
                }
                fn json(&self, out: &mut String) {
                    let _ = write!(out, "{self}");
                }
            }
        )*};
    }
    number_field!(u16, u32, u64, usize, i32, i64);
    /// Milliseconds with microsecond precision.
    impl Field for Duration {
        fn text(&self, out: &mut String) {
            let _ = write!(out, "{:.3}", self.as_secs_f64() * 1e3);
        }
        fn json(&self, out: &mut String) {
            self.text(out);
        }
    }
    /// A JSON-RPC id as the client sent it: `7` and `"7"` stay distinct.
    impl Field for serde_json::Value {
        fn text(&self, out: &mut String) {
            out.push_str(&self.to_string());
        }
        fn json(&self, out: &mut String) {
            out.push_str(&self.to_string());
        }
    }
    impl<T: Field> Field for Option<T> {
        fn text(&self, out: &mut String) {
            if let Some(v) = self {
                v.text(out);
            }
        }
        fn json(&self, out: &mut String) {
            if let Some(v) = self {
                v.json(out);
            }
        }
        fn present(&self) -> bool {
            self.is_some()
        }
    }

    /// One event, one line, one write. Text: `TIME LEVEL event: [session] message k=v`.
    /// JSON: `{"time","level","event","session",...fields,"msg"}`.
    pub fn write_event(
        level: Level,
        event: &str,
        fields: &[(&str, &dyn Field)],
        msg: std::fmt::Arguments,
    ) {
        use std::io::Write;
        let mut line = String::with_capacity(128);
        let session = fields.iter().find(|(k, v)| *k == "session" && v.present());
        let rest = fields
            .iter()
            .filter(|(k, v)| *k != "session" && v.present());
        if JSON.load(Ordering::Relaxed) {
            line.push_str("{\"time\":\"");
            line.push_str(&timestamp());
            let _ = write!(line, "\",\"level\":\"{}\",\"event\":", level.lower());
            json_string(&mut line, event);
            for (k, v) in session.into_iter().chain(rest) {
                let _ = write!(line, ",\"{k}\":");
                v.json(&mut line);
            }
            let text = msg.to_string();
            if !text.is_empty() {
                line.push_str(",\"msg\":");
                json_string(&mut line, &text);
            }
            line.push_str("}\n");
        } else {
            let _ = write!(line, "{} {:5} {event}: ", timestamp(), level.name());
            if let Some((_, tag)) = session {
                line.push('[');
                tag.text(&mut line);
                line.push_str("] ");
            }
            let _ = write!(line, "{msg}");
            for (k, v) in rest {
                if !line.ends_with(' ') {
                    line.push(' ');
                }
                let _ = write!(line, "{k}=");
                v.text(&mut line);
            }
            line.push('\n');
        }
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    /// Secrets never printed, in the log or the tap: the bearer tokens, and the
    /// --pass-header values a child was given (`extra`), should a message carry them.
    pub fn redact<'a>(text: &'a str, extra: &[(String, String)]) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(text);
        let tokens = crate::auth::tokens();
        let secrets = tokens
            .iter()
            .map(|t| &**t)
            .chain(extra.iter().map(|(_, value)| value.as_str()))
            .filter(|s| s.len() >= MIN_SECRET);
        for secret in secrets {
            // Inside a JSON string a `"`, `\` or tab of the secret stands escaped.
            let quoted = serde_json::Value::from(secret).to_string();
            let escaped = &quoted[1..quoted.len() - 1];
            for form in [escaped, secret] {
                if out.contains(form) {
                    out = std::borrow::Cow::Owned(out.replace(form, REDACTED));
                }
            }
        }
        out
    }

    /// What stands where a secret was.
    pub const REDACTED: &str = "[redacted]";
    /// Shorter values are not hidden: "1" or "on" would blank out every number.
    const MIN_SECRET: usize = 4;

    /// --tap: every JSON-RPC message as one JSON line, `{"time", "session", "server",
    /// "direction", "message"}`, in the order each point saw it. The four directions
    /// are the four places a message crosses: from the client into the bridge, from the
    /// bridge to the child's stdin, from the child's stdout, and out to the client; a
    /// message the bridge answers itself shows only the two client legs. Secrets are
    /// redacted as in the log. At --tap-max-size the file moves to PATH.1 (the one
    /// before is dropped) and a new one starts. Each line leaves in one write under one
    /// lock, and exit takes the lock last, so the file never ends mid-line.
    pub mod tap {
        use super::*;
        use std::io::Write;

        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Direction {
            ClientToBridge,
            BridgeToChild,
            ChildToBridge,
            BridgeToClient,
        }

        impl Direction {
            pub fn label(self) -> &'static str {
                match self {
                    Direction::ClientToBridge => "client_to_bridge",
                    Direction::BridgeToChild => "bridge_to_child",
                    Direction::ChildToBridge => "child_to_bridge",
                    Direction::BridgeToClient => "bridge_to_client",
                }
            }
        }

        enum Sink {
            Stderr,
            File {
                path: std::path::PathBuf,
                file: std::fs::File,
                size: u64,
                max: u64,
            },
            /// After exit began: nothing more is written.
            Closed,
        }

        static TAP: Mutex<Option<Sink>> = Mutex::new(None);
        /// Read on every message: the lock is taken only when the tap is on.
        static ON: AtomicBool = AtomicBool::new(false);

        pub fn on() -> bool {
            ON.load(Ordering::Relaxed)
        }

        /// Opens --tap at start (appending: a restart adds to the file).
        pub fn open(cfg: &crate::config::Config) -> Result<(), String> {
            let Some(path) = &cfg.tap else {
                return Ok(());
            };
            let sink = if path == "-" {
                Sink::Stderr
            } else {
                let path = std::path::PathBuf::from(path);
                let file = append(&path)
                    .map_err(|e| format!("--tap {}: cannot open it: {e}", path.display()))?;
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                Sink::File {
                    path,
                    file,
                    size,
                    max: cfg.tap_max_size as u64,
                }
            };
            *TAP.locked() = Some(sink);
            ON.store(true, Ordering::Release);
            Ok(())
        }

        fn append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
        }

        /// Writes one line: a message (parsed, or the raw text of a line that is not
        /// JSON) crossing `direction` for a session (or a child's tag) of a server.
        pub fn record(
            direction: Direction,
            session: &str,
            server: &str,
            message: Message,
            secrets: &[(String, String)],
        ) {
            if !on() {
                return;
            }
            let message = match message {
                Message::Value(v) => v.to_string(),
                Message::Line(text) => match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(v) => v.to_string(),
                    Err(_) => serde_json::Value::String(text.to_string()).to_string(),
                },
            };
            let message = redact(&message, secrets);
            let mut line = String::with_capacity(message.len() + 128);
            let _ = write!(
                line,
                "{{\"time\":\"{}\",\"session\":{},\"server\":{},\"direction\":\"{}\",\"message\":{message}}}",
                timestamp(),
                serde_json::Value::from(session),
                serde_json::Value::from(server),
                direction.label()
            );
            line.push('\n');
            write_line(line.as_bytes());
        }

        pub enum Message<'a> {
            Value(&'a serde_json::Value),
            /// A child's stdout line as it came.
            Line(&'a str),
        }

        fn write_line(bytes: &[u8]) {
            let mut guard = TAP.locked();
            let failed = match guard.as_mut() {
                Some(Sink::Stderr) => std::io::stderr().lock().write_all(bytes).is_err(),
                Some(Sink::File {
                    path,
                    file,
                    size,
                    max,
                }) => {
                    if *max > 0 && *size > 0 && *size + bytes.len() as u64 > *max {
                        let old = path.with_extension(match path.extension() {
                            Some(e) => format!("{}.1", e.to_string_lossy()),
                            None => "1".into(),
                        });
                        match std::fs::rename(&*path, &old).and_then(|_| append(path)) {
                            Ok(f) => {
                                *file = f;
                                *size = 0;
                            }
                            Err(e) => {
                                // This line is lost as a failed write's is: counted too.
                                crate::app().metrics.dropped("tap_write_failed");
                                crate::log!(
                                    Error,
                                    "tap",
                                    "cannot rotate --tap {}: {e}; the tap stops",
                                    path.display()
                                );
                                *guard = Some(Sink::Closed);
                                return;
                            }
                        }
                    }
                    *size += bytes.len() as u64;
                    file.write_all(bytes).is_err()
                }
                Some(Sink::Closed) | None => false,
            };
            if failed {
                crate::app().metrics.dropped("tap_write_failed");
                crate::log!(Error, "tap", "cannot write to --tap; the tap stops");
                *guard = Some(Sink::Closed);
            }
        }

        /// At exit: waits for the line being written, then lets no other begin.
        pub fn close() {
            if on() {
                *TAP.locked() = Some(Sink::Closed);
            }
        }
    }

    /// A message body for a debug line: at most BODY_LOG_LIMIT bytes of it.
    pub fn body_excerpt(body: &str) -> String {
        if body.len() <= BODY_LOG_LIMIT {
            return body.to_string();
        }
        let mut end = BODY_LOG_LIMIT;
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes in all)", &body[..end], body.len())
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

    // ---- the access log ---------------------------------------------------------------

    /// The routes /metrics names: the configured ones, and `other` for any other path,
    /// so a scanner cannot grow the label set.
    #[derive(Clone, Copy)]
    pub enum Route {
        Mcp,
        Sse,
        Message,
        Healthz,
        Readyz,
        Metrics,
        Other,
    }
    const ROUTES: [&str; 7] = [
        "mcp", "sse", "message", "healthz", "readyz", "metrics", "other",
    ];
    const METHODS: [&str; 5] = ["GET", "POST", "DELETE", "OPTIONS", "other"];

    fn method_index(m: &str) -> usize {
        METHODS[..4].iter().position(|x| *x == m).unwrap_or(4)
    }

    /// What the access line of the request this thread is handling will say.
    struct Access {
        method: String,
        path: String,
        peer: Option<std::net::SocketAddr>,
        route: Route,
        started: Instant,
        status: Option<u16>,
        session: Option<String>,
        rpc_method: Option<String>,
        rpc_id: Option<serde_json::Value>,
        messages: usize,
        /// Why an error status was given (the JSON-RPC error message we sent).
        error: Option<String>,
        /// "2026" for a 2026-07-28 request (2025 ones say nothing).
        era: Option<&'static str>,
        /// MRTR: the call was parked (answered input_required) or resumed (a retry).
        mrtr: Option<&'static str>,
        /// The refusal's reason label, for the refusals that set it (rate limits).
        reason: Option<&'static str>,
        bytes_in: u64,
        bytes_out: u64,
    }

    thread_local! {
        static CURRENT: RefCell<Option<Access>> = const { RefCell::new(None) };
    }

    fn with_current(f: impl FnOnce(&mut Access)) {
        CURRENT.with(|c| {
            if let Some(a) = c.borrow_mut().as_mut() {
                f(a)
            }
        });
    }

    /// Held by the handler for the whole request (streams included); its drop writes the
    /// access line.
    pub struct AccessGuard(());

    pub fn request_begins(
        method: &str,
        path: &str,
        route: Route,
        peer: Option<std::net::SocketAddr>,
    ) -> AccessGuard {
        let mut shown: String = path.chars().take(PATH_LOG_LIMIT).collect();
        if shown.len() < path.len() {
            shown.push_str("...");
        }
        CURRENT.with(|c| {
            *c.borrow_mut() = Some(Access {
                method: method.to_string(),
                path: shown,
                peer,
                route,
                started: Instant::now(),
                status: None,
                session: None,
                rpc_method: None,
                rpc_id: None,
                messages: 0,
                error: None,
                era: None,
                mrtr: None,
                reason: None,
                bytes_in: 0,
                bytes_out: 0,
            })
        });
        AccessGuard(())
    }

    impl Drop for AccessGuard {
        fn drop(&mut self) {
            let Some(a) = CURRENT.with(|c| c.borrow_mut().take()) else {
                return;
            };
            if !ACCESS_LOG.load(Ordering::Relaxed) || !enabled(Level::Info) {
                return;
            }
            let peer = a.peer.map(|p| p.to_string());
            let messages = (a.messages > 1).then_some(a.messages);
            crate::log!(Info, "access",
                session = a.session, method = a.method.as_str(), path = a.path.as_str(),
                status = a.status, duration_ms = a.started.elapsed(),
                rpc_method = a.rpc_method, rpc_id = a.rpc_id, messages = messages,
                era = a.era, mrtr = a.mrtr, reason = a.reason,
                bytes_in = a.bytes_in, bytes_out = a.bytes_out, peer = peer,
                instance = crate::app().cfg.instance_id.as_deref(),
                error = a.error; "");
        }
    }

    /// The response status, once: counted by route, method and class, and remembered
    /// for the access line.
    pub fn response_status(status: u16) {
        let mut counted = false;
        with_current(|a| {
            if a.status.is_none() {
                a.status = Some(status);
                crate::app()
                    .metrics
                    .http_response(a.route, &a.method, status);
            }
            counted = true;
        });
        if !counted {
            crate::app()
                .metrics
                .http_response(Route::Other, "other", status);
        }
    }

    /// The reason for an error status, for the access line. False when there will be no
    /// access line to carry it (the caller logs it instead).
    pub fn response_error(why: &str) -> bool {
        let mut recorded = false;
        if ACCESS_LOG.load(Ordering::Relaxed) && enabled(Level::Info) {
            with_current(|a| {
                a.error = Some(why.to_string());
                recorded = true;
            });
        }
        recorded
    }

    pub fn request_era(era: &'static str) {
        with_current(|a| a.era = Some(era));
        crate::app().metrics.era_request(era);
    }

    pub fn request_mrtr(what: &'static str) {
        with_current(|a| a.mrtr = Some(what));
    }

    /// A refusal's reason label for the access line (`reason=rate_limited`).
    pub fn request_reason(reason: &'static str) {
        with_current(|a| a.reason = Some(reason));
    }

    pub fn request_session(tag: &str) {
        with_current(|a| a.session = Some(tag.to_string()));
    }

    /// The JSON-RPC messages of a POST: the first one's method and id, and how many.
    pub fn request_messages(messages: &[serde_json::Value]) {
        with_current(|a| {
            a.messages = messages.len();
            if let Some(m) = messages.first() {
                a.rpc_method = m.get("method").and_then(|v| v.as_str()).map(String::from);
                a.rpc_id = m.get("id").cloned();
            }
        });
    }

    pub fn bytes_in(n: usize) {
        crate::app().metrics.bytes(0, n);
        with_current(|a| a.bytes_in += n as u64);
    }

    pub fn bytes_out(n: usize) {
        crate::app().metrics.bytes(1, n);
        with_current(|a| a.bytes_out += n as u64);
    }

    // ---- /metrics ---------------------------------------------------------------------

    /// Upper bounds of the request latency buckets, in seconds: 100 µs (a fast child on
    /// loopback) to a minute (a tool doing real work).
    const LATENCY_BUCKETS: [f64; 17] = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        10.0, 30.0, 60.0,
    ];
    const HTTP_CELLS: usize = ROUTES.len() * METHODS.len() * 5;
    const KINDS: [&str; 4] = ["request", "notification", "response", "error"];

    /// Counters with bounded label values (no session ids, no free-form paths).
    pub struct Metrics {
        /// [route][method][status class]
        http: [AtomicU64; HTTP_CELLS],
        /// [direction][kind]: 0 = to the child, 1 = to the client.
        messages: [[AtomicU64; 4]; 2],
        /// [in, out] HTTP bytes; [to child, from child] pipe bytes.
        http_bytes: [AtomicU64; 2],
        child_bytes: [AtomicU64; 2],
        sessions_opened: [AtomicU64; 4],
        sessions_closed: Mutex<Vec<(&'static str, &'static str, u64)>>,
        children_spawned: AtomicU64,
        spawn_failures: AtomicU64,
        /// Configured servers whose start failed, by name (names come from the file).
        server_failures: Mutex<Vec<(Arc<str>, u64)>>,
        config_reloads: Mutex<Vec<(&'static str, u64)>>,
        /// success, failure (non-zero status), signal
        children_exited: [AtomicU64; 3],
        /// By crate::config::Limit, in Limit::ALL's order.
        child_limit_exits: [AtomicU64; 4],
        children_restarted: AtomicU64,
        panics: AtomicU64,
        dropped: Mutex<Vec<(&'static str, u64)>>,
        rejected: Mutex<Vec<(&'static str, u64)>>,
        /// The child's requests the bridge answered because no client could.
        client_requests_unanswered: AtomicU64,
        /// POSTs to the MCP endpoint by era ("2025", "2026").
        eras: Mutex<Vec<(&'static str, u64)>>,
        /// 2026-07-28 calls by outcome (complete, error, parked, resumed, cancelled,
        /// expired, listen).
        modern_calls: Mutex<Vec<(&'static str, u64)>>,
        stream_cuts: Mutex<Vec<(&'static str, u64)>>,
        latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
        latency_count: AtomicU64,
        latency_sum_us: AtomicU64,
        /// Unix time we started, for process_start_time_seconds.
        started_unix: f64,
    }

    impl Default for Metrics {
        fn default() -> Metrics {
            Metrics {
                http: std::array::from_fn(|_| AtomicU64::new(0)),
                messages: Default::default(),
                http_bytes: Default::default(),
                child_bytes: Default::default(),
                sessions_opened: Default::default(),
                sessions_closed: Default::default(),
                children_spawned: Default::default(),
                spawn_failures: Default::default(),
                server_failures: Default::default(),
                config_reloads: Default::default(),
                children_exited: Default::default(),
                child_limit_exits: Default::default(),
                children_restarted: Default::default(),
                panics: Default::default(),
                dropped: Default::default(),
                rejected: Default::default(),
                eras: Default::default(),
                modern_calls: Default::default(),
                client_requests_unanswered: Default::default(),
                stream_cuts: Default::default(),
                latency_buckets: Default::default(),
                latency_count: Default::default(),
                latency_sum_us: Default::default(),
                started_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            }
        }
    }

    fn bump(list: &Mutex<Vec<(&'static str, u64)>>, label: &'static str) {
        let mut l = list.locked();
        match l.iter_mut().find(|(k, _)| *k == label) {
            Some((_, n)) => *n += 1,
            None => l.push((label, 1)),
        }
    }

    /// A metric family: name, help, type, and its (labels, value) samples.
    type Family = (&'static str, &'static str, &'static str, Vec<(String, f64)>);

    fn transport_label(t: crate::sessions::Transport) -> &'static str {
        match t {
            crate::sessions::Transport::Streamable => "streamable_http",
            crate::sessions::Transport::Legacy => "sse",
            crate::sessions::Transport::Modern => "modern",
            crate::sessions::Transport::Member => "member",
        }
    }

    /// Resident memory, open descriptors and threads, from /proc (absent without it,
    /// as in a scratch container that mounts none).
    fn process_figures() -> Option<(f64, f64, f64)> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
        let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))?
            .trim()
            .parse()
            .ok()?;
        Some((pages * page, fds, threads))
    }

    /// Which way a message or byte went (the index of its counters).
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Way {
        ToChild = 0,
        ToClient = 1,
    }

    impl Metrics {
        pub fn http_response(&self, route: Route, method: &str, status: u16) {
            let class = (status / 100).clamp(1, 5) as usize - 1;
            let cell = (route as usize * METHODS.len() + method_index(method)) * 5 + class;
            self.http[cell].fetch_add(1, Ordering::Relaxed);
        }
        /// A JSON-RPC message relayed.
        pub fn message(&self, way: Way, value: &serde_json::Value) {
            let kind = match crate::message::classify(value) {
                crate::message::Kind::Request { .. } => 0,
                crate::message::Kind::Notification { .. } => 1,
                crate::message::Kind::Response { .. } if value.get("error").is_some() => 3,
                crate::message::Kind::Response { .. } => 2,
                crate::message::Kind::Invalid(_) => return,
            };
            self.messages[way as usize][kind].fetch_add(1, Ordering::Relaxed);
        }
        fn bytes(&self, direction: usize, n: usize) {
            self.http_bytes[direction].fetch_add(n as u64, Ordering::Relaxed);
        }
        /// Bytes on the child's pipes: written to its stdin, or read from its stdout.
        pub fn child_bytes(&self, way: Way, n: usize) {
            self.child_bytes[way as usize].fetch_add(n as u64, Ordering::Relaxed);
        }
        /// From a client's request to the child's response.
        pub fn request_latency(&self, d: Duration) {
            let secs = d.as_secs_f64();
            if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
            self.latency_count.fetch_add(1, Ordering::Relaxed);
            self.latency_sum_us
                .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        }
        pub fn session_opened(&self, t: crate::sessions::Transport) {
            self.sessions_opened[t as usize].fetch_add(1, Ordering::Relaxed);
        }
        pub fn session_closed(&self, t: crate::sessions::Transport, reason: &'static str) {
            let mut l = self.sessions_closed.locked();
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
        /// A configured server could not start (it was serving, or new).
        pub fn server_failed(&self, server: &str) {
            let mut list = self.server_failures.locked();
            match list.iter_mut().find(|(n, _)| **n == *server) {
                Some((_, c)) => *c += 1,
                None => list.push((server.into(), 1)),
            }
        }
        pub fn child_exited(&self, status: &std::process::ExitStatus) {
            let class = match status.code() {
                Some(0) => 0,
                Some(_) => 1,
                None => 2,
            };
            self.children_exited[class].fetch_add(1, Ordering::Relaxed);
        }
        /// A child that ended at one of its --child-* limits.
        pub fn child_limit_exit(&self, limit: crate::config::Limit) {
            let i = crate::config::Limit::ALL
                .iter()
                .position(|l| *l == limit)
                .unwrap_or(0);
            self.child_limit_exits[i].fetch_add(1, Ordering::Relaxed);
        }
        /// A message we could not deliver: logged by the caller, counted here.
        pub fn dropped(&self, reason: &'static str) {
            bump(&self.dropped, reason);
        }
        pub fn rejected(&self, reason: &'static str) {
            bump(&self.rejected, reason);
        }
        pub fn client_request_unanswered(&self) {
            self.client_requests_unanswered
                .fetch_add(1, Ordering::Relaxed);
        }
        pub fn era_request(&self, era: &'static str) {
            bump(&self.eras, era);
        }
        pub fn modern_call(&self, outcome: &'static str) {
            bump(&self.modern_calls, outcome);
        }
        /// A SIGHUP's re-read of --config: applied or failed.
        pub fn config_reload(&self, outcome: &'static str) {
            bump(&self.config_reloads, outcome);
        }
        /// A connection detached from its stream (overflow, or resumed elsewhere).
        pub fn stream_cut(&self, reason: &'static str) {
            bump(&self.stream_cuts, reason);
        }
        pub fn child_restarted(&self) {
            self.children_restarted.fetch_add(1, Ordering::Relaxed);
        }
        pub fn panicked(&self) {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }

        /// /metrics in the Prometheus text format, one group of families after another.
        pub fn render(&self) -> String {
            let mut families = self.http_families();
            families.extend(self.message_families());
            families.extend(self.session_families());
            families.extend(self.child_families());
            families.extend(self.bridge_families());
            families.extend(self.server_families());
            families.extend(crate::ratelimit::families());
            families.extend(process_families(self.started_unix));
            let mut o = String::new();
            for (name, help, kind, samples) in families {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (labels, value) in samples {
                    let _ = writeln!(o, "{name}{labels} {value}");
                }
            }
            o
        }

        /// Each configured server (label `server`: names from the file, so bounded).
        fn server_families(&self) -> Vec<Family> {
            let app = crate::app();
            let servers = crate::servers::all();
            let sessions = app.sessions.all();
            let children: Vec<Arc<str>> = app
                .children
                .locked()
                .values()
                .map(|c| c.server.clone())
                .collect();
            let (mut up, mut open, mut kids, mut tools) = (vec![], vec![], vec![], vec![]);
            for s in &servers {
                let l = label("server", &s.name);
                up.push((l.clone(), if s.not_ready().is_none() { 1.0 } else { 0.0 }));
                let n = sessions
                    .iter()
                    .filter(|x| x.server.name == s.name && !x.is_carrier())
                    .count();
                open.push((l.clone(), n as f64));
                let c = children.iter().filter(|c| **c == s.name).count();
                kids.push((l.clone(), c as f64));
                if let Some(t) = s.tools_known() {
                    tools.push((l, t as f64));
                }
            }
            let failures = self
                .server_failures
                .locked()
                .iter()
                .map(|(n, c)| (label("server", n), *c as f64))
                .collect();
            vec![
                (
                    "stdio_sse_server_ready",
                    "1 when the server can serve (its command starts, no crash loop).",
                    "gauge",
                    up,
                ),
                (
                    "stdio_sse_server_sessions",
                    "Client sessions open on the server.",
                    "gauge",
                    open,
                ),
                (
                    "stdio_sse_server_children",
                    "The server's child processes running.",
                    "gauge",
                    kids,
                ),
                (
                    "stdio_sse_server_tools",
                    "Tools the server lists after its filter (once a list was seen).",
                    "gauge",
                    tools,
                ),
                (
                    "stdio_sse_server_start_failures_total",
                    "Times the server's command could not be started.",
                    "counter",
                    failures,
                ),
                (
                    "stdio_sse_config_reloads_total",
                    "Re-reads of --config on SIGHUP, by outcome (applied; failed: the running configuration stayed).",
                    "counter",
                    by("outcome", &self.config_reloads),
                ),
            ]
        }

        /// Build info, requests by route, method and class, and HTTP bytes.
        fn http_families(&self) -> Vec<Family> {
            let app = crate::app();
            let mode = match app.cfg.config_file {
                Some(_) => "config".to_string(),
                None => format!("{:?}", app.cfg.mode).to_lowercase(),
            };
            let version = env!("CARGO_PKG_VERSION");
            let mut http = Vec::new();
            for (i, c) in self.http.iter().enumerate() {
                let n = load(c);
                if n > 0.0 {
                    let (route, rest) = (i / (METHODS.len() * 5), i % (METHODS.len() * 5));
                    let (method, class) = (rest / 5, rest % 5 + 1);
                    http.push((
                        format!(
                            "{{route=\"{}\",method=\"{}\",code=\"{class}xx\"}}",
                            ROUTES[route], METHODS[method]
                        ),
                        n,
                    ));
                }
            }
            vec![
                (
                    "stdio_sse_build_info",
                    "Version and mode of this stdio-sse.",
                    "gauge",
                    vec![(
                        format!(
                            "{{version=\"{version}\",mode=\"{mode}\",instance=\"{}\"}}",
                            app.cfg.instance_id.as_deref().unwrap_or("")
                        ),
                        1.0,
                    )],
                ),
                (
                    "stdio_sse_http_requests_total",
                    "HTTP requests answered, by route, method and status class (streams count when they open).",
                    "counter",
                    http,
                ),
                (
                    "stdio_sse_http_bytes_total",
                    "HTTP bytes: request bodies read (in) and responses written, streams included (out).",
                    "counter",
                    vec![
                        (label("direction", "in"), load(&self.http_bytes[0])),
                        (label("direction", "out"), load(&self.http_bytes[1])),
                    ],
                ),
            ]
        }

        /// JSON-RPC messages, child pipe bytes, request latency.
        fn message_families(&self) -> Vec<Family> {
            let mut messages = Vec::new();
            for (d, direction) in ["to_child", "to_client"].iter().enumerate() {
                for (k, kind) in KINDS.iter().enumerate() {
                    messages.push((
                        format!("{{direction=\"{direction}\",kind=\"{kind}\"}}"),
                        load(&self.messages[d][k]),
                    ));
                }
            }
            let mut latency = Vec::new();
            let mut cumulative = 0.0;
            for (b, c) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
                cumulative += load(c);
                latency.push((format!("_bucket{{le=\"{b}\"}}"), cumulative));
            }
            let count = load(&self.latency_count);
            latency.push(("_bucket{le=\"+Inf\"}".to_string(), count));
            latency.push(("_sum".to_string(), load(&self.latency_sum_us) / 1e6));
            latency.push(("_count".to_string(), count));
            vec![
                (
                    "stdio_sse_messages_total",
                    "JSON-RPC messages relayed, by direction and kind.",
                    "counter",
                    messages,
                ),
                (
                    "stdio_sse_child_bytes_total",
                    "Bytes written to children's stdin and read from their stdout.",
                    "counter",
                    vec![
                        (label("direction", "to_child"), load(&self.child_bytes[0])),
                        (label("direction", "from_child"), load(&self.child_bytes[1])),
                    ],
                ),
                (
                    "stdio_sse_request_duration_seconds",
                    "From a client's request reaching us to the child's response leaving for the client (session and shared modes).",
                    "histogram",
                    latency,
                ),
            ]
        }

        /// Sessions opened, closed and open now.
        fn session_families(&self) -> Vec<Family> {
            let active = crate::app().sessions.stats().active.map(|n| n as f64);
            vec![
                (
                    "stdio_sse_sessions_opened_total",
                    "Sessions opened, by transport.",
                    "counter",
                    ["streamable_http", "sse", "modern", "member"]
                        .iter()
                        .zip(&self.sessions_opened)
                        .map(|(t, c)| (label("transport", t), load(c)))
                        .collect(),
                ),
                (
                    "stdio_sse_sessions_closed_total",
                    "Sessions closed, by transport and reason (delete, idle, child_exit, client_gone, initialize_failed, shutdown).",
                    "counter",
                    self.sessions_closed
                        .locked()
                        .iter()
                        .map(|(t, r, n)| {
                            (format!("{{transport=\"{t}\",reason=\"{r}\"}}"), *n as f64)
                        })
                        .collect(),
                ),
                (
                    "stdio_sse_sessions_active",
                    "Sessions open now, by transport.",
                    "gauge",
                    vec![
                        (label("transport", "streamable_http"), active[0]),
                        (label("transport", "sse"), active[1]),
                        (label("transport", "modern"), active[2]),
                        (label("transport", "member"), active[3]),
                    ],
                ),
            ]
        }

        /// Children started, failed, reaped, restarted and running.
        fn child_families(&self) -> Vec<Family> {
            let app = crate::app();
            vec![
                (
                    "stdio_sse_children_spawned_total",
                    "Child processes started.",
                    "counter",
                    one(load(&self.children_spawned)),
                ),
                (
                    "stdio_sse_child_spawn_failures_total",
                    "Child processes that could not be started.",
                    "counter",
                    one(load(&self.spawn_failures)),
                ),
                (
                    "stdio_sse_children_exited_total",
                    "Child processes reaped, by how they ended: status 0, another status, or a signal.",
                    "counter",
                    ["success", "failure", "signal"]
                        .iter()
                        .zip(&self.children_exited)
                        .map(|(s, c)| (label("status", s), load(c)))
                        .collect(),
                ),
                (
                    "stdio_sse_child_limit_exits_total",
                    "Child processes that ended at a --child-* limit, by which.",
                    "counter",
                    crate::config::Limit::ALL
                        .iter()
                        .zip(&self.child_limit_exits)
                        .map(|(l, c)| (label("limit", l.label()), load(c)))
                        .collect(),
                ),
                (
                    "stdio_sse_children_restarted_total",
                    "Shared children restarted after exiting.",
                    "counter",
                    one(load(&self.children_restarted)),
                ),
                (
                    "stdio_sse_children_active",
                    "Child processes running now.",
                    "gauge",
                    one(app.children.locked().len() as f64),
                ),
            ]
        }

        /// The bridge's own health: panics, connections, replay buffers, what it could
        /// not deliver, cut or accept.
        fn bridge_families(&self) -> Vec<Family> {
            let stats = crate::app().sessions.stats();
            let (replay_events, replay_bytes) =
                (stats.replay_events as f64, stats.replay_bytes as f64);
            vec![
                (
                    "stdio_sse_panics_total",
                    "Threads that panicked (a bug: each is logged with where). The server goes on.",
                    "counter",
                    one(load(&self.panics)),
                ),
                (
                    "stdio_sse_connections_open",
                    "Client connections open now (bounded by --max-connections).",
                    "gauge",
                    one(crate::door::open_connections() as f64),
                ),
                (
                    "stdio_sse_replay_buffer_events",
                    "Events held for resumes and for a GET stream not yet open, all sessions (bounded per session by --replay-buffer).",
                    "gauge",
                    one(replay_events),
                ),
                (
                    "stdio_sse_replay_buffer_bytes",
                    "Bytes of the events held for resumes and for a GET stream not yet open, all sessions.",
                    "gauge",
                    one(replay_bytes),
                ),
                (
                    "stdio_sse_messages_dropped_total",
                    "Messages that could not be delivered, by reason.",
                    "counter",
                    by("reason", &self.dropped),
                ),
                (
                    "stdio_sse_client_requests_unanswered_total",
                    "The child's requests (roots, sampling, elicitation, ping) answered with an error by the bridge because no client could: its session ended, or no stream opened within --client-request-timeout.",
                    "counter",
                    one(load(&self.client_requests_unanswered)),
                ),
                (
                    "stdio_sse_mcp_requests_total",
                    "POSTs to the MCP endpoint by protocol era (2025: sessions; 2026: 2026-07-28, stateless).",
                    "counter",
                    by("era", &self.eras),
                ),
                (
                    "stdio_sse_modern_calls_total",
                    "2026-07-28 calls by outcome (complete, error, parked for input, resumed, cancelled, expired, listen).",
                    "counter",
                    by("outcome", &self.modern_calls),
                ),
                (
                    "stdio_sse_stream_connections_cut_total",
                    "Connections closed by the bridge with their stream left to the replay buffer, by reason.",
                    "counter",
                    by("reason", &self.stream_cuts),
                ),
                (
                    "stdio_sse_requests_rejected_total",
                    "Requests and connections refused, by reason.",
                    "counter",
                    by("reason", &self.rejected),
                ),
            ]
        }
    }

    fn load(c: &AtomicU64) -> f64 {
        c.load(Ordering::Relaxed) as f64
    }

    fn label(key: &str, value: &str) -> String {
        format!("{{{key}=\"{value}\"}}")
    }

    fn one(v: f64) -> Vec<(String, f64)> {
        vec![(String::new(), v)]
    }

    fn by(key: &str, list: &Mutex<Vec<(&'static str, u64)>>) -> Vec<(String, f64)> {
        list.locked()
            .iter()
            .map(|(v, n)| (label(key, v), *n as f64))
            .collect()
    }

    /// The process's own figures (from /proc; absent where it is not mounted).
    fn process_families(started_unix: f64) -> Vec<Family> {
        let mut families: Vec<Family> = vec![(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            "gauge",
            one(started_unix),
        )];
        if let Some((rss, fds, threads)) = process_figures() {
            families.extend([
                (
                    "process_resident_memory_bytes",
                    "Resident memory of stdio-sse itself (children not included), in bytes.",
                    "gauge",
                    one(rss),
                ),
                (
                    "process_open_fds",
                    "Open file descriptors.",
                    "gauge",
                    one(fds),
                ),
                (
                    "stdio_sse_threads",
                    "Threads of stdio-sse (one per open connection, plus a few per child).",
                    "gauge",
                    one(threads),
                ),
            ]);
        }
        families
    }

    /// `log!(Level, "event", key = value, ...; "format", args)`, or without fields
    /// `log!(Level, "event", "format", args)`. A `session` field is the session tag.
    #[macro_export]
    macro_rules! log {
        ($level:ident, $event:expr, $($key:ident = $val:expr),+ ; $($arg:tt)*) => {
            if $crate::observe::enabled($crate::observe::Level::$level) {
                $crate::observe::write_event(
                    $crate::observe::Level::$level,
                    $event,
                    &[$((stringify!($key), &$val as &dyn $crate::observe::Field)),+],
                    format_args!($($arg)*),
                )
            }
        };
        ($level:ident, $event:expr, $($arg:tt)*) => {
            if $crate::observe::enabled($crate::observe::Level::$level) {
                $crate::observe::write_event($crate::observe::Level::$level, $event, &[], format_args!($($arg)*))
            }
        };
    }
}

// ======================================================================================
/// The console: one HTML page at `/` (GET and HEAD) with which a person tries the
/// wrapped server from a browser. The page is a client like any other: it speaks
/// Streamable HTTP (2025-11-25 and earlier with a session, SSE bodies read with fetch;
/// or 2026-07-28, stateless, answering `input_required` on a retry) to this instance's
/// own MCP endpoint, or with --config to one server's `/servers/NAME/mcp` or the merged
/// one, so its requests pass the same Host/Origin checks, tokens and limits, and show
/// in the access log as any client's do.
///
/// On by default only when bound to a loopback address (`--console auto`): there only
/// people on this machine reach it, and they could call the tools with curl anyway. On
/// a network address the operator deployed a bridge for programs, and a page they did
/// not ask for is one more thing exposed (a person's browser, a token typed into it):
/// `--console on` says they want it. The page itself holds no secret and is served
/// without a token even when auth is on; the token it asks for is kept in the page's
/// memory only and sent on the MCP requests, which still demand it (A-1).
///
/// Its script and style are inline and allowed by their SHA-256 hashes in the
/// Content-Security-Policy (no other script, style, frame or origin is): a tool result
/// the page shows cannot run as script. The hashes are written here, and a unit test
/// recomputes them, so an edit to the page without them fails the tests.
/// Served uncompressed: gzip would need a dependency (or a deflate written here) to
/// save about 20 KB, once, on what is mostly a loopback connection.
///
/// Owns: the page, its headers, --console. Touches: `http` (routes `/` here, before
/// the token check), `servers` (which mode the front path serves), `door` (closes the
/// connection after a HEAD answer).
/// Rules: O-1, O-2 (Host/Origin on the page as everywhere), A-1.
mod console {
    use crate::http::{respond, Incoming, Refusal, Reply};
    use tiny_http::Method;

    /// --console: when the page is served.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Console {
        /// Only when --host is a loopback address.
        Auto,
        On,
        Off,
    }

    impl Console {
        pub fn parse(s: &str) -> Result<Console, String> {
            match s {
                "auto" => Ok(Console::Auto),
                "on" | "true" if PAGE.is_empty() => Err("--console on: this build has no console (the tiny build leaves it out; use dist/stdio-sse)".into()),
                "on" | "true" => Ok(Console::On),
                "off" | "false" => Ok(Console::Off),
                other => Err(format!("--console must be auto, on or off, not {other:?}")),
            }
        }
    }

    /// Whether `/` serves the page under this configuration.
    pub fn enabled(cfg: &crate::config::Config) -> bool {
        if PAGE.is_empty() {
            return false;
        }
        match cfg.console {
            Console::On => true,
            Console::Off => false,
            Console::Auto => loopback(&cfg.host),
        }
    }

    /// `--host` names a loopback address (`localhost`, 127.0.0.0/8, `::1`).
    fn loopback(host: &str) -> bool {
        let h = host.trim().trim_start_matches('[').trim_end_matches(']');
        h.eq_ignore_ascii_case("localhost")
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The log line that says where the page is.
    pub fn announce(url: &str) {
        if enabled(&crate::app().cfg) {
            crate::log!(
                Info,
                "console",
                "open {url}/ in a browser to try the server (--console off: not served)"
            );
        }
    }

    /// GET or HEAD `/`: the page; any other method 405.
    pub fn serve(inc: Incoming) {
        let head = match inc.method() {
            Method::Get => Answer::Whole,
            Method::Head => Answer::HeadersOnly,
            _ => {
                let refusal = Refusal::MethodNotAllowed { allow: "GET, HEAD" };
                return respond(inc, refusal.into());
            }
        };
        let cfg = &crate::app().cfg;
        let page = PAGE
            .replace("{{MCP}}", &attribute(&cfg.mcp_path))
            .replace("{{AUTH}}", if cfg.auth.enabled() { "on" } else { "off" })
            .replace("{{MODE}}", front_mode());
        let reply = Reply::text(200, "text/html; charset=utf-8", page)
            .with_header("Content-Security-Policy", csp())
            .with_header("X-Content-Type-Options", "nosniff")
            .with_header("Referrer-Policy", "no-referrer")
            .with_header("Cross-Origin-Resource-Policy", "same-origin")
            // Small, and it says what this instance serves now (paths, auth).
            .with_header("Cache-Control", "no-store");
        match head {
            Answer::Whole => respond(inc, reply),
            Answer::HeadersOnly => headers_only(inc, reply),
        }
    }

    /// What a request for the page gets.
    #[derive(Clone, Copy)]
    enum Answer {
        Whole,
        HeadersOnly,
    }

    /// HEAD: the headers GET would send, its Content-Length too, and no body. The
    /// connection then closes, so a client that reads a body by its length (not knowing
    /// it asked with HEAD) sees the end at once instead of waiting for bytes.
    fn headers_only(inc: Incoming, reply: Reply) {
        use std::io::Write;
        crate::observe::response_status(reply.status);
        let mut head = crate::sse::status_line(reply.status);
        head.push_str(&format!("Content-Type: {}\r\n", reply.content_type));
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            reply.body.len()
        ));
        let conn = inc.conn;
        let mut out = inc.rq.into_writer();
        crate::observe::bytes_out(head.len());
        let _ = out.write_all(head.as_bytes()).and_then(|_| out.flush());
        drop(out);
        crate::door::shut(conn, libc::SHUT_RDWR);
    }

    /// What the front MCP path serves: the one server's mode, or the merged endpoint
    /// (sessions) when there are several.
    fn front_mode() -> &'static str {
        match crate::servers::all().as_slice() {
            [one] => crate::servers::mode_name(one.spec.mode),
            _ => "session",
        }
    }

    pub fn csp() -> String {
        format!(
            "default-src 'none'; script-src '{SCRIPT_HASH}'; style-src '{STYLE_HASH}'; \
             connect-src 'self'; img-src data:; media-src data:; frame-ancestors 'none'; \
             base-uri 'none'; form-action 'none'"
        )
    }

    /// A value placed in a double-quoted HTML attribute.
    fn attribute(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('"', "&quot;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    }

    /// SHA-256 of the page's `<script>` and `<style>` contents, base64 (CSP level 2).
    const SCRIPT_HASH: &str = "sha256-GPp6xB6diMkFjjmrXLVhLh0c96rS5FbjclFLWWGEyhw=";
    const STYLE_HASH: &str = "sha256-GqspnsMq4qIq33N5H27qdF1hLbGnHIcZjZyzQosrVYA=";

    /// The page. Its script and style are hashed into the CSP above (see the tests).
    #[cfg(feature = "console")]
    pub const PAGE: &str = r####"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>stdio-sse console</title>
<style>
:root{color-scheme:light dark;--b:#8885;--a:#2563eb;--bad:#d32f2f;font:14px/1.4 system-ui,sans-serif}
body{margin:0;display:flex;flex-direction:column;height:100vh}
header{display:flex;gap:.5em;align-items:center;flex-wrap:wrap;padding:.5em .8em;border-bottom:1px solid var(--b)}
#status{margin-left:auto;font-size:.9em}
main{flex:1;display:grid;grid-template-columns:minmax(200px,23%) 1fr minmax(260px,32%);min-height:0}
main>section{overflow:auto;padding:.6em .8em;border-right:1px solid var(--b)}
h2{font-size:1.05em;margin:.2em 0 .4em}h3{font-size:.95em;margin:.3em 0}
.tabs{display:flex;gap:2px;margin:.6em 0 .3em}.tabs button{flex:1;padding:.25em .2em}
.tabs .on,button.primary{background:var(--a);color:#fff;border-color:var(--a)}
#list{list-style:none;margin:0;padding:0}
#list li{padding:.35em .4em;border-bottom:1px solid var(--b);cursor:pointer}
#list li:hover,#list li.on{background:#8882}
#list small{display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;overflow:hidden}
#list small,.muted{opacity:.7}
.field{display:grid;gap:.15em;margin:.55em 0;justify-items:start}.field>b{font-weight:600}.field>:not(b,small){width:100%}.field>[type=checkbox]{width:auto}
input,select,textarea,button{font:inherit}
textarea{width:100%;box-sizing:border-box;font:12px/1.35 ui-monospace,monospace}
input:not([type=checkbox]),select{max-width:100%;box-sizing:border-box}
button{cursor:pointer;padding:.25em .8em;border:1px solid var(--b);border-radius:4px;background:#8881}
button:disabled{cursor:default;opacity:.5}
.row{display:flex;gap:.5em;margin:.5em 0;flex-wrap:wrap}
pre{margin:.3em 0;padding:.4em;background:#8881;border-radius:4px;overflow:auto;font:12px/1.35 ui-monospace,monospace}
.wrap{white-space:pre-wrap;word-break:break-word}
.bad{color:var(--bad)}
.ask{border:2px solid #e0a800;border-radius:6px;padding:.4em .8em;margin-bottom:.8em;background:#e0a80018}
.result{border-left:3px solid var(--a);padding-left:.6em;margin-top:.6em}.result.bad{border-color:var(--bad)}
.notes{margin:.3em 0;padding-left:1.2em;font-size:.9em}
.msg summary{cursor:pointer;font:12px/1.6 ui-monospace,monospace;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.msg.bad summary{color:var(--bad)}
.msg time{float:right;opacity:.6;margin-left:.5em}
.out{color:var(--a)}.in{color:#2e7d32}
img{max-width:100%}
.opts{display:flex;flex-wrap:wrap;gap:.2em .9em}
#info pre{max-height:14em}
#logp h2{position:sticky;top:-.6em;background:Canvas;margin:-.6em 0 0;padding:.5em 0 .3em;z-index:1}
</style>
</head>
<body data-mcp="{{MCP}}" data-auth="{{AUTH}}" data-mode="{{MODE}}">
<header>
<b>stdio-sse console</b>
<select id="ep" title="which server" hidden></select>
<select id="ver" title="protocol version to ask for"><option>2025-11-25</option><option>2025-06-18</option><option>2025-03-26</option><option value="2026-07-28">2026-07-28 (stateless)</option></select>
<label id="tokbar" hidden>token <input id="tok" type="password" autocomplete="off" size="18" placeholder="bearer token"></label>
<button id="conn" class="primary">Connect</button>
<button id="disc" disabled>Disconnect</button>
<span id="status">not connected</span>
</header>
<main>
<section id="nav">
<div id="info"><p class="muted">Not connected.</p></div>
<div class="tabs"><button data-tab="tools">Tools</button><button data-tab="prompts">Prompts</button><button data-tab="resources">Resources</button><button data-tab="roots">Roots</button></div>
<ul id="list"></ul>
</section>
<section id="work">
<div id="asks"></div>
<div id="detail"><p class="muted">Pick a tool, a prompt or a resource.</p></div>
</section>
<section id="logp">
<h2>Messages <button id="clear">clear</button></h2>
<div id="log"></div>
</section>
</main>
<script>
"use strict";
// Everything this page knows stays in this script's memory: the token is never put in
// the URL, in storage or in a cookie, and every request goes to this page's origin.
const $ = (s) => document.querySelector(s);
const D = document.body.dataset;
const LOG_MAX = 500, PAGES_MAX = 50;
const CAPS = { roots: { listChanged: true }, sampling: {}, elicitation: { form: {}, url: {} } };
// 2026-07-28: no session; every request carries the era in _meta and mirrored headers,
// and the server's questions come back as input_required results answered on a retry.
const MODERN = "2026-07-28", META = "io.modelcontextprotocol/";
const NAMED = { "tools/call": "name", "prompts/get": "name", "resources/read": "uri" };
const S = { token: "", url: D.mcp, session: null, version: null, server: null, id: 0, gen: 0,
  pending: new Map(), get: null, tab: "tools", lists: {}, ver: {}, roots: ["file:///tmp"],
  ctl: new AbortController() };

function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else if (k in e && !k.includes("-")) e[k] = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of kids.flat(9)) if (c != null && c !== false) e.append(c);
  return e;
}
const pre = (v, cls) => el("pre", { class: cls, text: typeof v === "string" ? v : JSON.stringify(v, null, 2) });
const raw = (v, title) => el("details", {}, el("summary", { text: title || "raw JSON" }), pre(v));
const row = (...k) => el("div", { class: "row" }, k);
// replaceChildren, skipping absent parts and flattening lists (as el does).
const put = (node, ...kids) => node.replaceChildren(...kids.flat(9).filter((k) => k != null && k !== false));
const btn = (text, f, cls) => el("button", { type: "button", text, class: cls, onclick: f });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
function status(text, cls) { const s = $("#status"); s.textContent = text; s.className = cls || ""; }
function oops(e) { status(String(e && e.message || e), "bad"); }

// ---- the message log -------------------------------------------------------------
function brief(m) {
  const p = m.params || {};
  if (m.method === "notifications/progress") return `${p.progress}${p.total != null ? "/" + p.total : ""} ${p.message || ""}`;
  if (m.method === "notifications/message") return `[${p.level}] ${typeof p.data === "string" ? p.data : JSON.stringify(p.data)}`;
  if (m.method === "tools/call" || m.method === "prompts/get") return p.name;
  if (m.method === "resources/read") return p.uri;
  if (m.error) return m.error.message;
  return "";
}
function log(dir, m, note) {
  const what = m.method || (m.error ? "error" : "result") + (m.id != null ? " #" + m.id : "");
  const head = el("summary", {}, el("span", { class: dir, text: dir === "out" ? "→ " : "← " }),
    what + (m.method && m.id != null ? " #" + m.id : ""), " ", el("span", { class: "muted", text: (note ? note + " " : "") + brief(m) }),
    el("time", { text: new Date().toLocaleTimeString() }));
  const box = $("#log");
  const stick = box.parentNode.scrollTop + box.parentNode.clientHeight >= box.parentNode.scrollHeight - 20;
  box.append(el("details", { class: "msg" + (m.error ? " bad" : "") }, head, pre(m)));
  while (box.childElementCount > LOG_MAX) box.firstElementChild.remove();
  if (stick) box.parentNode.scrollTop = box.parentNode.scrollHeight;
}

// ---- HTTP: Streamable HTTP with fetch, SSE bodies read as they stream -------------
function hdrs(extra) {
  const h = { Accept: "application/json, text/event-stream" };
  if (S.token) h.Authorization = "Bearer " + S.token;
  if (S.session) h["Mcp-Session-Id"] = S.session;
  if (S.version) h["MCP-Protocol-Version"] = S.version;
  return Object.assign(h, extra);
}
// Every request of a connection ends with it: one still on its way when the session is
// DELETEd would otherwise come back 404 for a session the person already left.
async function hit(method, body, extra, signal) {
  signal = signal ? AbortSignal.any([signal, S.ctl.signal]) : S.ctl.signal;
  const r = await fetch(S.url, { method, headers: hdrs(extra), body, signal, cache: "no-store", credentials: "omit" });
  if (r.status === 401) needToken("The server wants a bearer token (401).");
  return r;
}
class RpcError extends Error {
  constructor(e) { super((e.code != null ? e.code + ": " : "") + (e.message || "error")); this.error = e; }
}
function settle(id, result, error) {
  const p = S.pending.get(id);
  if (!p) return;
  S.pending.delete(id);
  if (error) p.reject(new RpcError(error)); else p.resolve(result);
}
async function send(m, extra, signal) {
  log("out", m);
  const r = await hit("POST", JSON.stringify(m), { "Content-Type": "application/json", ...extra }, signal);
  const sid = r.headers.get("Mcp-Session-Id");
  if (sid && m.method === "initialize") S.session = sid;
  if (r.status === 202) return;
  const type = r.headers.get("Content-Type") || "";
  if (r.ok && type.startsWith("text/event-stream")) return readSse(r, m.id);
  const text = await r.text();
  let body;
  try { body = JSON.parse(text); } catch { body = { jsonrpc: "2.0", error: { code: r.status, message: text || r.statusText } }; }
  if (r.ok) return handle(body, m.id);
  // An HTTP-level refusal carries no request id (P-4): it answers the request sent.
  log("in", body, "HTTP " + r.status);
  if (r.status === 404 && S.session && m.method !== "initialize") lost("the session is gone (404): connect again");
  const err = body.error || { code: r.status, message: r.statusText };
  if (m.id != null) settle(m.id, null, err); else oops(new RpcError(err));
}
async function readSse(r, forId) {
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf = (buf + dec.decode(value, { stream: true })).replace(/\r\n?/g, "\n");
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue; // a priming event or a comment
      let m;
      try { m = JSON.parse(data); } catch { log("in", { error: { message: "not JSON: " + data } }); continue; }
      handle(m, forId);
    }
  }
  if (forId != null) settle(forId, null, { message: "the stream ended before the answer came" });
}
function handle(m, forId) {
  if (Array.isArray(m)) return m.forEach((x) => handle(x, forId));
  if (!m || typeof m !== "object") return;
  log("in", m);
  if (m.method && m.id != null) return ask(m);
  if (m.method) return note(m, forId);
  settle(m.id, m.result, m.error);
}
// A header value as 2026-07-28 mirrors it: plain when printable ASCII, else =?base64?…?=.
function mirror(v) {
  v = String(v);
  return /^[\x20-\x7e]*$/.test(v) ? v : `=?base64?${btoa(String.fromCharCode(...new TextEncoder().encode(v)))}?=`;
}
function call(method, params, onNote) {
  const ctl = new AbortController();
  let last = null;
  const once = (q) => {
    const id = last = ++S.id;
    const m = { jsonrpc: "2.0", id, method }, extra = {};
    if (q || S.modern) {
      const meta = { ...((q && q._meta) || {}) };
      if (onNote) meta.progressToken = id;
      if (S.modern) {
        Object.assign(meta, { [META + "protocolVersion"]: MODERN, [META + "clientCapabilities"]: CAPS });
        if (S.level) meta[META + "logLevel"] = S.level;
        extra["Mcp-Method"] = method;
        if (NAMED[method] && q) extra["Mcp-Name"] = mirror(q[NAMED[method]]);
      }
      m.params = Object.keys(meta).length ? { ...q, _meta: meta } : { ...q };
    }
    return new Promise((resolve, reject) => {
      S.pending.set(id, { resolve, reject, onNote });
      send(m, extra, ctl.signal).catch((e) => settle(id, null, { message: String(e.message || e) }));
    });
  };
  const p = !S.modern ? once(params) : (async () => {
    let r = await once(params);
    while (r && r.resultType === "input_required") {
      const answers = await inputs(r.inputRequests || {});
      r = await once({ ...params, inputResponses: answers, requestState: r.requestState });
    }
    return r;
  })();
  // 2026-07-28: closing the stream is cancellation; before, a notification says it.
  p.cancel = () => S.modern ? ctl.abort() : notify("notifications/cancelled", { requestId: last, reason: "cancelled at the console" });
  return p;
}
function notify(method, params) {
  const m = { jsonrpc: "2.0", method };
  if (params) m.params = params;
  return send(m).catch(oops);
}
function note(m, forId) {
  const p = m.params || {};
  let owner = S.pending.get(forId);
  if (m.method === "notifications/progress") owner = S.pending.get(p.progressToken) || owner;
  if (owner && owner.onNote) owner.onNote(m);
  const changed = { "notifications/tools/list_changed": "tools", "notifications/prompts/list_changed": "prompts",
    "notifications/resources/list_changed": "resources" }[m.method];
  if (changed) {
    // Servers announce changes in bursts (one per tool registered): list once after.
    delete S.lists[changed];
    S.ver[changed] = (S.ver[changed] || 0) + 1;
    clearTimeout(S.relist);
    S.relist = setTimeout(() => { if (S.tab === changed && S.server) showTab(changed); }, 200);
  }
}

// ---- connecting --------------------------------------------------------------------
function needToken(why) {
  $("#tokbar").hidden = false;
  $("#tok").placeholder = S.token ? "another token" : "bearer token";
  $("#tok").focus();
  status(why || "This server wants a bearer token: enter it and Connect.", "bad");
}
async function servers() {
  // With --config there are several servers: each on /servers/NAME/mcp, and all of
  // them merged on the front path.
  const r = await fetch("/servers", { headers: S.token ? { Authorization: "Bearer " + S.token } : {}, cache: "no-store" });
  if (r.status === 401) { needToken(); return false; }
  if (!r.ok) return true;
  const j = await r.json();
  const list = (j.servers || []).filter((s) => s.endpoints && s.endpoints.mcp);
  if (!j.merged && list.length < 2) return true;
  const ep = $("#ep"), keep = ep.value;
  put(ep, j.merged ? el("option", { value: D.mcp, text: "all servers, merged (" + D.mcp + ")" }) : null,
    list.map((s) => el("option", { value: s.endpoints.mcp, disabled: s.mode === "oneshot",
      text: `${s.name} (${s.mode}, ${s.state}${s.mode === "oneshot" ? ": one-shot, no session" : ""})` })));
  if (keep) ep.value = keep;
  ep.hidden = false;
  return true;
}
async function connect() {
  const typed = $("#tok").value.trim();
  if (typed) { S.token = typed; $("#tok").value = ""; $("#tok").placeholder = "token set (in memory)"; }
  await disconnect(true);
  const gen = S.gen;
  if (!(await servers().catch(() => true))) return;
  S.url = $("#ep").hidden ? D.mcp : $("#ep").value;
  S.lists = {};
  status("connecting…");
  try {
    let res;
    if ($("#ver").value === MODERN) {
      S.modern = true;
      S.version = MODERN;
      res = await call("server/discover", {});
      res.serverInfo = (res._meta || {})[META + "serverInfo"];
      res.protocolVersion = MODERN;
    } else {
      res = await call("initialize", { protocolVersion: $("#ver").value, capabilities: CAPS,
        clientInfo: { name: "stdio-sse-console", title: "stdio-sse console", version: "1.0.0" } });
    }
    if (gen !== S.gen) return;
    S.version = res.protocolVersion;
    S.server = res;
    if (!S.modern) await notify("notifications/initialized");
    const info = res.serverInfo || {};
    status(`connected to ${info.name || "server"} · protocol ${S.version}` +
      (S.session ? ` · session ${S.session.slice(-8)}` : S.modern ? " · stateless, no session" : ""), "ok");
    document.body.dataset.state = "connected";
    $("#disc").disabled = false;
    showInfo(res);
    if (S.modern) subscribe(gen); else listen(gen);
    showTab(S.tab);
  } catch (e) {
    if (gen === S.gen) { S.session = null; status("not connected: " + e.message, "bad"); }
  }
}
async function disconnect(quiet) {
  S.gen++;
  if (S.get) S.get.abort();
  S.get = null;
  S.ctl.abort();
  S.ctl = new AbortController();
  // Nothing may start on the old session while its DELETE is on the way (a re-list
  // timed after a list_changed burst would get a 404).
  clearTimeout(S.relist);
  S.server = null;
  for (const id of [...S.pending.keys()]) settle(id, null, { message: "disconnected" });
  if (S.session) {
    log("out", { method: "DELETE " + S.url + " (end the session)" });
    await hit("DELETE").catch(() => {});
  }
  S.session = S.version = S.server = null;
  S.modern = false;
  $("#disc").disabled = true;
  $("#asks").replaceChildren();
  $("#list").replaceChildren();
  $("#info").replaceChildren(el("p", { class: "muted", text: "Not connected." }));
  $("#detail").replaceChildren(el("p", { class: "muted", text: "Pick a tool, a prompt or a resource." }));
  document.body.dataset.state = "disconnected";
  if (!quiet) status("disconnected");
}
function lost(why) {
  S.gen++;
  S.session = S.version = null;
  $("#disc").disabled = true;
  document.body.dataset.state = "disconnected";
  status(why, "bad");
}
// The GET stream: what the server says outside any request (list changes, its own
// requests when no call is open), reopened while the session lasts.
async function listen(gen) {
  let tries = 0;
  while (gen === S.gen && S.session) {
    const ctl = new AbortController();
    S.get = ctl;
    try {
      const r = await hit("GET", undefined, { Accept: "text/event-stream" }, ctl.signal);
      if (r.status === 405) return;
      if (r.status === 404) return gen === S.gen && lost("the session is gone (404): connect again");
      if (r.ok) { tries = 0; await readSse(r); } else await r.text();
    } catch (e) { if (gen !== S.gen) return; }
    await sleep(Math.min(1000 * ++tries, 10000));
  }
}
// 2026-07-28 has no GET stream: list changes come on a subscriptions/listen answer.
async function subscribe(gen) {
  const caps = S.server.capabilities || {}, want = {};
  for (const [k, flag] of [["tools", "toolsListChanged"], ["prompts", "promptsListChanged"], ["resources", "resourcesListChanged"]])
    if (caps[k] && caps[k].listChanged) want[flag] = true;
  if (!Object.keys(want).length) return;
  const p = call("subscriptions/listen", { notifications: want });
  S.get = { abort: p.cancel };
  // Listened again when the stream ends; not when the server refuses to listen.
  const again = await p.then(() => true, (e) => !(e.error && e.error.code));
  if (again && gen === S.gen) { await sleep(1000); if (gen === S.gen) subscribe(gen); }
}
addEventListener("pagehide", () => {
  if (S.session) fetch(S.url, { method: "DELETE", headers: hdrs(), keepalive: true }).catch(() => {});
});

// ---- what the server offers ------------------------------------------------------------
function showInfo(res) {
  const i = res.serverInfo || {}, caps = res.capabilities || {};
  let level = null;
  if (caps.logging) {
    // 2026-07-28 asks for logs per request (_meta logLevel); before, logging/setLevel.
    level = el("select", { title: "log level", onchange: () => S.modern ? (S.level = level.value || null) : call("logging/setLevel", { level: level.value }).catch(oops) },
      S.modern ? el("option", { value: "", text: "none" }) : null,
      ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"].map((l) => el("option", { text: l })));
    level.value = S.modern ? "" : "info";
    S.level = null;
  }
  put($("#info"),
    el("h2", { id: "server-name", text: (i.title || i.name || "server") + (i.version ? " " + i.version : "") }),
    el("div", { class: "muted", id: "negotiated", text: "protocol " + res.protocolVersion }),
    i.description ? el("p", { text: i.description }) : null,
    res.instructions ? el("details", { open: true }, el("summary", { text: "instructions" }), pre(res.instructions, "wrap")) : null,
    raw(caps, "capabilities"),
    level ? el("label", {}, "log level ", level) : null);
}
async function listAll(method, key) {
  let out = [], cursor;
  for (let n = 0; n < PAGES_MAX; n++) {
    const r = await call(method, cursor ? { cursor } : undefined);
    out = out.concat(r[key] || []);
    if (!r.nextCursor) break;
    cursor = r.nextCursor;
  }
  return out;
}
async function showTab(tab) {
  S.tab = tab;
  document.querySelectorAll(".tabs button").forEach((b) => b.classList.toggle("on", b.dataset.tab === tab));
  const ul = $("#list");
  const say = (text, cls) => ul.replaceChildren(el("li", { class: cls || "muted", text }));
  if (tab === "roots") return rootsPanel();
  if (!S.server) return say("not connected");
  if (!(S.server.capabilities || {})[tab]) return say("the server offers no " + tab);
  say("loading…");
  try {
    let items = S.lists[tab];
    if (!items) {
      const ver = S.ver[tab];
      if (tab === "resources") {
        const [res, tpl] = await Promise.all([listAll("resources/list", "resources"),
          listAll("resources/templates/list", "resourceTemplates").catch(() => [])]);
        items = res.concat(tpl.map((t) => ({ ...t, template: true })));
      } else items = await listAll(tab + "/list", tab);
      // A list asked for before a change was announced is shown, not kept.
      if (ver === S.ver[tab]) S.lists[tab] = items;
    }
    if (S.tab !== tab) return;
    if (!items.length) return say("none");
    ul.replaceChildren(...items.map((item) => {
      const li = el("li", { "data-name": item.name, tabIndex: 0, title: item.uri || item.uriTemplate || item.name },
        el("b", { text: (item.title || item.name) + (item.template ? " (template)" : "") }),
        item.description ? el("small", { text: item.description }) : null);
      if (S.picked === tab + " " + item.name) li.classList.add("on");
      const go = () => {
        ul.querySelectorAll("li.on").forEach((x) => x.classList.remove("on"));
        li.classList.add("on");
        S.picked = tab + " " + item.name;
        pick(tab, item);
      };
      li.addEventListener("click", go);
      li.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
      return li;
    }));
  } catch (e) { say(e.message, "bad"); }
}

// ---- forms from JSON Schema ----------------------------------------------------------
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
function choicesOf(s) {
  if (!s) return null;
  if (Array.isArray(s.enum)) return s.enum.map((v, i) => [v, (s.enumNames && s.enumNames[i]) || String(v)]);
  const alt = s.oneOf || s.anyOf;
  if (Array.isArray(alt) && alt.length && alt.every((o) => o && "const" in o)) return alt.map((o) => [o.const, o.title || String(o.const)]);
  return null;
}
function field(name, s, required) {
  let type = s.type;
  if (Array.isArray(type)) { const t = type.filter((x) => x !== "null"); type = t.length === 1 ? t[0] : "json"; }
  const miss = () => { if (required) throw new Error(name + " is required"); };
  const choices = type !== "array" && choicesOf(s), items = type === "array" && choicesOf(s.items);
  let input, get, box = "label";
  if (choices) {
    input = el("select", { name }, required && s.default !== undefined ? null : el("option", { value: "", text: "—" }),
      choices.map(([, t], i) => el("option", { value: String(i), text: t })));
    const d = choices.findIndex(([v]) => same(v, s.default));
    if (d >= 0) input.value = String(d);
    get = () => input.value === "" ? miss() : choices[+input.value][0];
  } else if (type === "boolean") {
    input = el("input", { type: "checkbox", name, checked: s.default === true });
    let touched = s.default !== undefined || required;
    input.addEventListener("change", () => { touched = true; });
    get = () => touched ? input.checked : undefined;
  } else if (type === "number" || type === "integer") {
    input = el("input", { type: "number", name, step: type === "integer" ? "1" : "any", value: s.default ?? "" });
    get = () => {
      if (input.value === "") return miss();
      const n = Number(input.value);
      if (!Number.isFinite(n) || (type === "integer" && !Number.isInteger(n))) throw new Error(`${name}: not ${type === "integer" ? "an integer" : "a number"}`);
      return n;
    };
  } else if (items) {
    box = "div";
    const boxes = items.map(([v]) => el("input", { type: "checkbox", checked: (s.default || []).some((d) => same(d, v)) }));
    input = el("span", { class: "opts", "data-field": name }, items.map(([, t], i) => el("label", {}, boxes[i], " " + t)));
    get = () => { const v = items.filter((_, i) => boxes[i].checked).map(([x]) => x); return v.length || required ? v : undefined; };
  } else if (type === "string") {
    const kind = { email: "email", uri: "url", date: "date", "date-time": "datetime-local" }[s.format] || "text";
    input = el("input", { type: kind, name, value: s.default ?? "", placeholder: s.format || "" });
    get = () => input.value === "" ? miss() : kind === "datetime-local" ? new Date(input.value).toISOString() : input.value;
  } else {
    // objects, arrays and anything else: JSON, checked when sent
    input = el("textarea", { name, rows: 3, placeholder: type === "array" ? "[…] (JSON)" : type === "object" ? "{…} (JSON)" : "JSON",
      value: s.default !== undefined ? JSON.stringify(s.default) : "" });
    get = () => {
      if (!input.value.trim()) return miss();
      try { return JSON.parse(input.value); } catch (e) { throw new Error(`${name}: not JSON (${e.message})`); }
    };
  }
  const hint = [type && type !== "json" ? type : "", s.description || ""].filter(Boolean).join(" · ");
  return { name, get, node: el(box, { class: "field" }, el("b", { text: (s.title || name) + (required ? " *" : "") }), input, hint ? el("small", { class: "muted", text: hint }) : null) };
}
function schemaForm(schema) {
  const req = new Set((schema && schema.required) || []);
  const fields = Object.entries((schema && schema.properties) || {}).map(([n, s]) => field(n, s || {}, req.has(n)));
  return {
    node: el("div", { class: "fields" }, fields.length ? fields.map((f) => f.node) : el("p", { class: "muted", text: "no arguments" })),
    value() { const o = {}; for (const f of fields) { const v = f.get(); if (v !== undefined) o[f.name] = v; } return o; },
  };
}

// ---- showing results -------------------------------------------------------------------
const mime = (m, d) => /^[\w.+-]+\/[\w.+-]+$/.test(m || "") ? m : d;
function content(list) {
  return (Array.isArray(list) ? list : [list]).filter(Boolean).map((c) => {
    switch (c.type) {
      case "text": return pre(c.text, "wrap");
      case "image": return el("img", { alt: "image", src: `data:${mime(c.mimeType, "image/png")};base64,${c.data}` });
      case "audio": return el("audio", { controls: true, src: `data:${mime(c.mimeType, "audio/wav")};base64,${c.data}` });
      case "resource": return resource(c.resource || {});
      case "resource_link": return el("div", { text: `link: ${c.uri}${c.name ? " (" + c.name + ")" : ""}` });
      default: return pre(c);
    }
  });
}
function resource(r) {
  const head = el("div", { class: "muted", text: `${r.uri || ""} ${r.mimeType || ""}` });
  if (r.text != null) return el("div", {}, head, pre(r.text, "wrap"));
  if (r.blob != null && /^image\//.test(r.mimeType || "")) return el("div", {}, head, el("img", { alt: r.uri, src: `data:${mime(r.mimeType)};base64,${r.blob}` }));
  return el("div", {}, head, el("div", { text: `binary, ${Math.floor(String(r.blob || "").length * 3 / 4)} bytes` }));
}
function pick(tab, item) {
  let form, verb, run;
  if (tab === "tools") {
    form = schemaForm(item.inputSchema || {});
    verb = "Call";
    run = (args, onNote) => call("tools/call", { name: item.name, arguments: args }, onNote);
  } else if (tab === "prompts") {
    const props = {}, required = [];
    for (const a of item.arguments || []) { props[a.name] = { type: "string", title: a.title || a.name, description: a.description }; if (a.required) required.push(a.name); }
    form = schemaForm({ properties: props, required });
    verb = "Get";
    run = (args, onNote) => call("prompts/get", { name: item.name, arguments: args }, onNote);
  } else {
    form = schemaForm({ properties: { uri: { type: "string", default: item.uri || item.uriTemplate, description: item.template ? "fill in the template" : "" } }, required: ["uri"] });
    verb = "Read";
    run = (args, onNote) => call("resources/read", { uri: args.uri }, onNote);
  }
  const out = el("div", { id: "out" }), cancel = btn("Cancel", null);
  cancel.disabled = true;
  const go = async () => {
    let args;
    try { args = form.value(); } catch (e) { return out.replaceChildren(el("p", { class: "bad", text: e.message })); }
    const notes = el("ul", { class: "notes" }), bar = el("progress", { hidden: true });
    out.replaceChildren(bar, notes);
    const t0 = performance.now();
    const p = run(args, (n) => {
      const q = n.params || {};
      if (n.method === "notifications/progress") {
        bar.hidden = false;
        if (q.total) { bar.max = q.total; bar.value = q.progress; } else bar.removeAttribute("value");
      }
      notes.append(el("li", { text: `${n.method.replace("notifications/", "")} ${brief(n)}` }));
    });
    cancel.disabled = false;
    cancel.onclick = () => p.cancel();
    try {
      const r = await p;
      const ms = Math.round(performance.now() - t0);
      const shown = tab === "tools" ? [content(r.content), r.structuredContent ? raw(r.structuredContent, "structuredContent") : null]
        : tab === "prompts" ? [r.description ? el("p", { text: r.description }) : null, (r.messages || []).map((m) => el("div", {}, el("b", { text: m.role }), content(m.content)))]
        : (r.contents || []).map(resource);
      out.append(el("div", { class: "result" + (r.isError ? " bad" : ""), id: "result" },
        el("h3", { text: (r.isError ? "error result" : "result") + ` (${ms} ms)` }), shown, raw(r)));
    } catch (e) {
      out.append(el("div", { class: "result bad", id: "result" }, el("h3", { text: "error" }), pre(e.message, "wrap"), e.error ? raw(e.error) : null));
    } finally { cancel.disabled = true; bar.hidden = true; }
  };
  const extra = tab === "tools" && item.annotations ? raw(item.annotations, "annotations") : null;
  const schema = tab === "tools" ? raw(item.inputSchema || {}, "input schema") : null;
  put($("#detail"), el("h2", { text: item.title || item.name }),
    item.description ? el("p", { class: "wrap", text: item.description }) : null, extra, schema,
    form.node, row(btn(verb, go, "primary"), cancel), out);
  $("#detail button.primary").id = "run";
}

// ---- what the server asks of the person ------------------------------------------------
const rootOf = (uri) => ({ uri, name: uri.replace(/\/+$/, "").split("/").pop() || uri });
function parseRoots(text) {
  const list = text.split("\n").map((l) => l.trim()).filter(Boolean);
  for (const u of list) if (!u.startsWith("file://")) throw new Error(`${u}: a root is a file:// URI`);
  return list;
}
function rootsPanel() {
  const ta = el("textarea", { rows: 5, value: S.roots.join("\n") }), err = el("p", { class: "bad" });
  $("#list").replaceChildren(el("li", {}, el("p", { class: "muted", text: "Roots this client offers (one file:// URI a line)." }), ta, err,
    row(btn("Save", () => {
      try { S.roots = parseRoots(ta.value); err.textContent = ""; } catch (e) { err.textContent = e.message; return; }
      if (S.session) notify("notifications/roots/list_changed");
    }, "primary"))));
}
// The answers to a 2026-07-28 input_required result, each asked of the person.
function inputs(requests) {
  const keys = Object.keys(requests), answers = {};
  return new Promise((resolve) => {
    if (!keys.length) resolve(answers);
    for (const k of keys) {
      ask({ id: k, method: requests[k].method, params: requests[k].params }, (result, error) => {
        answers[k] = error ? { error } : result;
        if (Object.keys(answers).length === keys.length) resolve(answers);
      });
    }
  });
}
function ask(m, reply) {
  const p = m.params || {}, err = el("p", { class: "bad" });
  const card = el("div", { class: "ask", "data-method": m.method });
  const done = (result, error) => {
    card.remove();
    if (reply) return reply(result, error);
    send(error ? { jsonrpc: "2.0", id: m.id, error } : { jsonrpc: "2.0", id: m.id, result }).catch(oops);
  };
  const guard = (f) => () => { try { f(); } catch (e) { err.textContent = e.message; } };
  let body;
  if (m.method === "ping") return done({});
  if (m.method === "elicitation/create" && p.mode === "url") {
    body = [el("p", { class: "wrap", text: p.message || "" }), el("p", {}, "It asks you to open ", el("code", { text: p.url }), " (not opened from here)."),
      row(btn("Accept", () => done({ action: "accept" }), "primary"), btn("Decline", () => done({ action: "decline" })), btn("Cancel", () => done({ action: "cancel" })))];
  } else if (m.method === "elicitation/create") {
    const f = schemaForm(p.requestedSchema || {});
    body = [el("p", { class: "wrap", text: p.message || "" }), f.node, err,
      row(btn("Accept", guard(() => done({ action: "accept", content: f.value() })), "primary"),
        btn("Decline", () => done({ action: "decline" })), btn("Cancel", () => done({ action: "cancel" })))];
  } else if (m.method === "sampling/createMessage") {
    const ta = el("textarea", { rows: 4, placeholder: "You are the model: write its reply." });
    body = [p.systemPrompt ? el("p", { class: "muted wrap", text: "system prompt: " + p.systemPrompt }) : null,
      (p.messages || []).map((x) => el("div", {}, el("b", { text: x.role }), content(x.content))),
      el("p", { class: "muted", text: `maxTokens ${p.maxTokens}` }), ta,
      row(btn("Send reply", () => done({ role: "assistant", content: { type: "text", text: ta.value }, model: "person-at-console", stopReason: "endTurn" }), "primary"),
        btn("Reject", () => done(null, { code: -1, message: "rejected by the person at the console" })))];
  } else if (m.method === "roots/list") {
    const ta = el("textarea", { rows: 3, value: S.roots.join("\n") });
    body = [el("p", { text: "Roots to give (one file:// URI a line):" }), ta, err,
      row(btn("Send", guard(() => { S.roots = parseRoots(ta.value); done({ roots: S.roots.map(rootOf) }); }), "primary"),
        btn("Reject", () => done(null, { code: -1, message: "rejected by the person at the console" })))];
  } else {
    return done(null, { code: -32601, message: "Method not found: " + m.method });
  }
  card.append(el("h3", { text: "The server asks: " + m.method }), ...body.flat(9).filter(Boolean), raw(m));
  $("#asks").append(card);
  card.scrollIntoView({ block: "nearest" });
}

// ---- start -------------------------------------------------------------------------
document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
$("#conn").addEventListener("click", () => connect().catch(oops));
$("#disc").addEventListener("click", () => disconnect().catch(oops));
$("#tok").addEventListener("keydown", (e) => { if (e.key === "Enter") connect().catch(oops); });
$("#ep").addEventListener("change", () => connect().catch(oops));
$("#clear").addEventListener("click", () => $("#log").replaceChildren());
if (D.mode === "oneshot") {
  status("one-shot mode: each request runs its own child, so there is no session to hold; the console needs --mode session or shared", "bad");
  $("#conn").disabled = true;
} else if (D.auth === "on") needToken("This server wants a bearer token: enter it and Connect.");
else connect().catch(oops);
</script>
</body>
</html>
"####;
    /// The tiny build (`--no-default-features`) leaves the page out: it is a third of
    /// what that build may weigh beyond its limit, and an edge device is driven by
    /// programs, not a person at a browser.
    #[cfg(not(feature = "console"))]
    pub const PAGE: &str = "";

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The most the page may weigh: it is loaded whole before anything shows.
        const MAX_PAGE: usize = 40 * 1024;

        /// The 2026-07-28 module's SHA-256 (it signs the tokens of parked calls), here
        /// checking the CSP hashes without a dependency.
        use crate::modern::sha256;

        fn base64(data: &[u8]) -> String {
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for c in data.chunks(3) {
                let n = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
                for i in 0..4 {
                    let sextet = (n >> (18 - 6 * i)) & 63;
                    out.push(if i <= c.len() {
                        A[sextet as usize] as char
                    } else {
                        '='
                    });
                }
            }
            out
        }

        fn between<'a>(page: &'a str, open: &str, close: &str) -> &'a str {
            let start = page.find(open).expect("opening tag") + open.len();
            let end = start + page[start..].find(close).expect("closing tag");
            assert_eq!(page.matches(open).count(), 1, "one {open} block");
            &page[start..end]
        }

        #[test]
        fn csp_hashes_are_those_of_the_inline_blocks() {
            let script = base64(&sha256(between(PAGE, "<script>", "</script>").as_bytes()));
            let style = base64(&sha256(between(PAGE, "<style>", "</style>").as_bytes()));
            assert_eq!(
                SCRIPT_HASH,
                format!("sha256-{script}"),
                "the page's script changed: put this hash in SCRIPT_HASH"
            );
            assert_eq!(
                STYLE_HASH,
                format!("sha256-{style}"),
                "the page's style changed: put this hash in STYLE_HASH"
            );
            assert!(
                !PAGE.contains(" style=") && !PAGE.contains(" onclick="),
                "inline attributes the CSP would block"
            );
        }

        #[test]
        fn page_is_small_and_self_contained() {
            assert!(
                PAGE.len() <= MAX_PAGE,
                "the page is {} bytes, over {MAX_PAGE}",
                PAGE.len()
            );
            for outside in ["http://", "https://", "//cdn", "src=\"/", "@import"] {
                assert!(!PAGE.contains(outside), "the page names {outside}");
            }
            for secret in ["localStorage", "sessionStorage", "document.cookie"] {
                assert!(
                    !PAGE.contains(secret),
                    "the page may not keep anything in {secret}"
                );
            }
        }

        #[test]
        fn console_values_and_loopback() {
            assert_eq!(Console::parse("auto"), Ok(Console::Auto));
            assert_eq!(Console::parse("on"), Ok(Console::On));
            assert_eq!(Console::parse("off"), Ok(Console::Off));
            assert!(Console::parse("yes").is_err());
            for h in ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"] {
                assert!(loopback(h), "{h}");
            }
            for h in ["0.0.0.0", "::", "10.0.0.1", "example.com"] {
                assert!(!loopback(h), "{h}");
            }
            assert_eq!(attribute("/a\"b<&"), "/a&quot;b&lt;&amp;");
        }
    }
}
// ======================================================================================
/// The built-in demo server, run as a real child (`stdio-sse __demo-server`) when no
/// COMMAND is given: an MCP server on stdio with `echo`, `add` and `broadcast` (a
/// list_changed notification for every client) tools. Also the
/// benchmark's fast child. Shares nothing with the bridge but serde_json.
/// Owns: the demo tools. Touches: stdin and stdout only.
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
            let Some(reply) = reply_to(&msg) else {
                continue;
            };
            let mut lines = String::new();
            if msg.pointer("/params/name").and_then(Value::as_str) == Some("broadcast") {
                // A server-wide notification first: in shared mode every session gets it.
                lines.push_str(r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#);
                lines.push('\n');
            }
            lines.push_str(&reply.to_string());
            lines.push('\n');
            if out
                .write_all(lines.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                return;
            }
        }
    }

    fn reply_to(msg: &Value) -> Option<Value> {
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
                 "inputSchema": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}},
                {"name": "broadcast", "description": "Sends notifications/tools/list_changed to every client",
                 "inputSchema": {"type": "object", "properties": {}}}
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
                    Some("broadcast") => {
                        Ok(json!({"content": [{"type": "text", "text": "broadcast sent"}]}))
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
/// Memory: a small cache of freed blocks in front of the C library's allocator. musl's
/// allocator takes one process-wide lock on every call and does real work each time;
/// with tens of busy threads that lock is where the time goes (c=64: 15k req/s on musl
/// against 22k on glibc, same code). Blocks up to MAX_CLASS_SIZE are rounded to a size
/// class and, when freed, kept on one of SHARDS free lists (a thread always uses the
/// same shard), a bounded number per class so an idle process gives memory back.
/// Larger or over-aligned blocks go straight to the system. Touches nothing else.
/// Owns: the size-class free lists. Touches: the C allocator.
mod memory {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::{Cell, UnsafeCell};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Threads are spread over this many independently locked caches.
    const SHARDS: usize = 8;
    /// Sizes up to 128 in steps of 16, then four classes per power of two up to this.
    const MAX_CLASS_SIZE: usize = 4096;
    const CLASSES: usize = 28;
    /// Every block is at least this aligned (as malloc's are).
    const ALIGN: usize = 16;
    /// A shard keeps at most this many free blocks of a class...
    const CACHE_BLOCKS: usize = 64;
    /// ...and at most this many bytes of one class: at most ~350 KiB a shard in all.
    const CACHE_BYTES: usize = 16 * 1024;

    #[derive(Clone, Copy)]
    struct FreeList {
        head: *mut u8,
        len: usize,
    }

    struct Shard {
        locked: AtomicBool,
        lists: UnsafeCell<[FreeList; CLASSES]>,
    }

    // The lists are only touched with `locked` held.
    unsafe impl Sync for Shard {}

    #[allow(clippy::declare_interior_mutable_const)]
    const EMPTY_SHARD: Shard = Shard {
        locked: AtomicBool::new(false),
        lists: UnsafeCell::new(
            [FreeList {
                head: std::ptr::null_mut(),
                len: 0,
            }; CLASSES],
        ),
    };
    static SHARD_TABLE: [Shard; SHARDS] = [EMPTY_SHARD; SHARDS];
    static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        // Const-initialised and without a destructor: safe to read inside the
        // allocator, even while a thread is exiting.
        static MY_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }

    /// The size class of a small block: (index, rounded size).
    fn class_of(size: usize, align: usize) -> Option<(usize, usize)> {
        if size > MAX_CLASS_SIZE || align > ALIGN {
            return None;
        }
        let size = size.max(1);
        if size <= 128 {
            let i = size.div_ceil(16) - 1;
            return Some((i, (i + 1) * 16));
        }
        let p = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize; // 7..=11
        let k = (size - 1) >> (p - 2); // 4..=7
        Some((8 + (p - 7) * 4 + (k - 4), (k + 1) << (p - 2)))
    }

    fn shard() -> &'static Shard {
        let i = MY_SHARD
            .try_with(|s| {
                if s.get() == usize::MAX {
                    s.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
                }
                s.get()
            })
            .unwrap_or(0);
        &SHARD_TABLE[i]
    }

    /// Runs `f` on a shard's lists under its lock. The critical sections are a few
    /// instructions; a waiter yields its time slice rather than spin against a holder
    /// that was preempted.
    fn locked<R>(s: &Shard, f: impl FnOnce(&mut [FreeList; CLASSES]) -> R) -> R {
        let mut spins = 0u32;
        while s
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let r = f(unsafe { &mut *s.lists.get() });
        s.locked.store(false, Ordering::Release);
        r
    }

    pub struct Cached;

    // `inline(never)` on the three entry points: inlined into every allocation site
    // they cost ~100 KB of binary for no measured speed.
    unsafe impl GlobalAlloc for Cached {
        #[inline(never)]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let Some((class, size)) = class_of(layout.size(), layout.align()) else {
                return System.alloc(layout);
            };
            let block = locked(shard(), |lists| {
                let list = &mut lists[class];
                let block = list.head;
                if !block.is_null() {
                    list.head = *(block as *mut *mut u8);
                    list.len -= 1;
                }
                block
            });
            if block.is_null() {
                System.alloc(Layout::from_size_align_unchecked(size, ALIGN))
            } else {
                block
            }
        }

        #[inline(never)]
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let Some((class, size)) = class_of(layout.size(), layout.align()) else {
                return System.dealloc(ptr, layout);
            };
            let kept = locked(shard(), |lists| {
                let list = &mut lists[class];
                if list.len >= CACHE_BLOCKS || (list.len + 1) * size > CACHE_BYTES {
                    return false;
                }
                *(ptr as *mut *mut u8) = list.head;
                list.head = ptr;
                list.len += 1;
                true
            });
            if !kept {
                System.dealloc(ptr, Layout::from_size_align_unchecked(size, ALIGN));
            }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if class_of(layout.size(), layout.align()).is_none() {
                return System.alloc_zeroed(layout);
            }
            let p = self.alloc(layout);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }

        #[inline(never)]
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let old = class_of(layout.size(), layout.align());
            let new = class_of(new_size, layout.align());
            match (old, new) {
                (Some((a, _)), Some((b, _))) if a == b => ptr,
                (None, None) => System.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let p = self.alloc(new_layout);
                    if !p.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    p
                }
            }
        }
    }

    #[global_allocator]
    static GLOBAL: Cached = Cached;

    #[cfg(test)]
    mod tests {
        #[test]
        fn classes_cover_every_small_size_and_round_up() {
            let mut last = (0, 0);
            for size in 0..=super::MAX_CLASS_SIZE {
                let (i, rounded) = super::class_of(size, 8).unwrap();
                assert!(rounded >= size.max(1) && rounded % 16 == 0, "{size}");
                assert!(i < super::CLASSES && i >= last.0, "{size}");
                assert!(i != last.0 || rounded == last.1 || size == 0, "{size}");
                last = (i, rounded);
            }
            assert_eq!(last, (super::CLASSES - 1, super::MAX_CLASS_SIZE));
            assert!(super::class_of(super::MAX_CLASS_SIZE + 1, 8).is_none());
            assert!(super::class_of(64, 32).is_none());
        }
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

/// A lock that outlives a panic. Panics unwind (Cargo.toml says why): a thread that
/// panics while holding one of our locks must not turn every later user of that lock
/// into another panic. The data under our locks is kept consistent step by step, so
/// the guard is taken as it is.
pub trait Locked<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T> Locked<T> for std::sync::Mutex<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A panic is a bug: it is logged (with the thread's name and where) and counted in
/// `stdio_sse_panics_total`, and only its own thread unwinds. A connection's thread
/// ends its connection; the HTTP workers catch it per request (`http::serve`).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log!(
            Error,
            "panic",
            "bug: thread {name} panicked at {at}: {what}"
        );
        if let Some(app) = APP.get() {
            app.metrics.panicked();
        }
    }));
}

/// Idle SSE streams are threads; a small stack keeps thousands of them cheap.
/// False (logged) when the system refuses a thread.
pub fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> bool {
    const THREAD_STACK: usize = 256 * 1024;
    match std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(THREAD_STACK)
        .spawn(f)
    {
        Ok(_) => true,
        Err(e) => {
            log!(
                Error,
                "thread_spawn_failed",
                "cannot start a {name} thread: {e}"
            );
            false
        }
    }
}

/// A new session id: `INSTANCE_<uuid>` (--instance-id) so a balancer can route it to
/// this instance by its prefix, or the UUID alone.
pub fn new_session_id() -> std::io::Result<String> {
    let uuid = random_uuid()?;
    Ok(match &app().cfg.instance_id {
        Some(i) => format!("{i}{}{uuid}", config::INSTANCE_SEPARATOR),
        None => uuid,
    })
}

/// A session's short name in logs: the start of its random part (never the whole id,
/// which is bearer-like; never the instance prefix, which all share).
pub fn session_tag(id: &str) -> String {
    let random = id.rsplit(config::INSTANCE_SEPARATOR).next().unwrap_or(id);
    random.chars().take(8).collect()
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
/// A connection costs a descriptor (two while tiny_http reads it) and each child three:
/// take the hard limit, so --max-connections, not the soft default of 1024, is the bound.
fn raise_open_files_limit() {
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Anyone who can reach a non-loopback port without a token can run the child's tools.
fn warn_if_exposed(cfg: &config::Config, addr: &std::net::SocketAddr) {
    if cfg.auth.enabled() || cfg.auth.allow_unauthenticated || addr.ip().is_loopback() {
        return;
    }
    log!(
        Warn,
        "unauthenticated",
        "listening on {addr} with no --auth-token: anyone who can reach this port can call the server's tools. Set --auth-token or --auth-token-file, or --allow-unauthenticated to accept the risk and silence this warning"
    );
}

/// RLIMIT_NPROC does not bind root: a --child-processes for children that run as root
/// would promise what it does not do.
fn warn_if_limit_unbound(cfg: &config::Config) {
    let root = unsafe { libc::geteuid() } == 0;
    for s in &cfg.servers {
        let as_root = match &s.limits.user {
            Some(u) => u.uid == 0,
            None => root,
        };
        if s.limits.processes.is_some() && as_root {
            log!(
                Warn,
                "limit_unbound",
                server = s.name;
                "--child-processes does not bind children that run as root: add --child-user (e.g. nobody)"
            );
        }
    }
}

/// Our own executable, for the demo child. /proc may be missing (scratch containers,
/// chroots), so fall back to argv[0] when it names a path.
fn self_exe(argv0: &str) -> Option<String> {
    if let Ok(p) = std::env::current_exe() {
        return Some(p.display().to_string());
    }
    argv0.contains('/').then(|| argv0.to_string())
}

/// --probe: GET the URL and exit 0 on a 2xx, 1 otherwise, so an image that holds only
/// this binary can still have a health check. Plain http; the token, when the server
/// wants one, comes from the same variables the server reads.
fn probe(url: &str) -> i32 {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let Some(rest) = url.strip_prefix("http://") else {
        eprintln!("stdio-sse: --probe takes an http:// URL, got {url:?}");
        return 2;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Some(addr) = authority.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        eprintln!("stdio-sse: --probe: cannot resolve {authority:?}");
        return 2;
    };
    let token = std::env::var("STDIO_SSE_AUTH_TOKEN")
        .ok()
        .and_then(|t| {
            t.split(',')
                .map(str::trim)
                .find(|t| !t.is_empty())
                .map(String::from)
        })
        .or_else(|| {
            let file = std::env::var("STDIO_SSE_AUTH_TOKEN_FILE").ok()?;
            config::read_token_file(std::path::Path::new(&file))
                .ok()?
                .into_iter()
                .next()
        });
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let answer = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, config::PROBE_TIMEOUT)?;
        s.set_read_timeout(Some(config::PROBE_TIMEOUT))?;
        s.set_write_timeout(Some(config::PROBE_TIMEOUT))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Connection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.take(64 * 1024).read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })();
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stdio-sse: --probe {url}: {e}");
            return 1;
        }
    };
    let status: u16 = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    println!("{status} {}", body.trim());
    i32::from(!(200..300).contains(&status))
}

/// The startup, step by step; each step is a function below.
fn main() {
    // First, before anything can make us an orphan unnoticed (--exit-with-parent).
    let parent = unsafe { libc::getppid() };
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(config::DEMO_ARG) {
        demo::run();
        return;
    }
    if args.get(1).map(String::as_str) == Some(check::ARG) {
        std::process::exit(check::run(&args));
    }
    let mut cfg = read_config(&args);
    start_logging(&cfg);
    if let Err(e) = observe::tap::open(&cfg) {
        eprintln!("stdio-sse: {e}");
        std::process::exit(2);
    }
    if cfg.demo {
        cfg.command = vec![demo_command(&args[0]), config::DEMO_ARG.to_string()];
        cfg.server_defaults.command = cfg.command.clone();
        cfg.servers = vec![cfg.server_defaults.clone()];
    }
    START.get_or_init(Instant::now);
    let sigset = teardown::block_signals();
    // Both forks happen here, while we are one thread.
    let pid1 = unsafe { libc::getpid() } == 1;
    if !ownership::init_if_pid1() {
        ownership::start_guardian();
    }
    let listener = listen(&cfg);
    let addr = listener.local_addr().expect("bound socket has an address");
    raise_open_files_limit();
    let tls = cfg.tls.take();
    install_app(cfg);
    let cfg = &app().cfg;
    if let Err(e) = auth::load() {
        eprintln!("stdio-sse: {e}");
        std::process::exit(2);
    }
    warn_if_exposed(cfg, &addr);
    warn_if_limit_unbound(cfg);
    follow_parent(parent, pid1);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = start_http(listener, tls);
    child::start_spawner();
    announce(&format!("{scheme}://{addr}"));
    servers::install(&cfg.servers, &cfg.skipped);
    spawn_thread("idle-reaper", sessions::run_idle_reaper);
    spawn_thread("modern-housekeeper", modern::run_housekeeper);
    http::serve(server);
    teardown::handle_signals(sigset);
}

/// The command line and `STDIO_SSE_*`; --help, --version and --probe end here, and a
/// mistake exits 2 with its reason.
fn read_config(args: &[String]) -> Box<config::Config> {
    match config::parse(&args[1..], &|k| std::env::var(k).ok()) {
        Ok(config::Parsed::Run(c)) => c,
        Ok(config::Parsed::Help) => {
            print!("{}", config::help());
            std::process::exit(0);
        }
        Ok(config::Parsed::Version) => {
            println!("stdio-sse {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        Ok(config::Parsed::Probe(url)) => std::process::exit(probe(&url)),
        Err(e) => {
            eprintln!("stdio-sse: {e}");
            std::process::exit(2);
        }
    }
}

fn start_logging(cfg: &config::Config) {
    observe::LEVEL.store(cfg.log_level as u8, Ordering::Relaxed);
    observe::JSON.store(cfg.log_json, Ordering::Relaxed);
    install_panic_hook();
    observe::ACCESS_LOG.store(cfg.access_log, Ordering::Relaxed);
}

/// No COMMAND: the demo server is this binary run again with DEMO_ARG.
fn demo_command(argv0: &str) -> String {
    self_exe(argv0).unwrap_or_else(|| {
        eprintln!(
            "stdio-sse: cannot find our own executable to run the demo server; give a COMMAND"
        );
        std::process::exit(2);
    })
}

/// The listening socket. Accepted sockets inherit its options: TCP_NODELAY, so each SSE
/// event leaves when it is flushed; SO_SNDTIMEO, so a write to a client that stopped
/// reading fails after --stall-timeout instead of holding its thread for ever.
fn listen(cfg: &config::Config) -> std::net::TcpListener {
    let listener = match std::net::TcpListener::bind((cfg.host.as_str(), cfg.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("stdio-sse: cannot listen on {}:{}: {e}", cfg.host, cfg.port);
            std::process::exit(1);
        }
    };
    unsafe {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        if !cfg.stall_timeout.is_zero() {
            let tv = libc::timeval {
                tv_sec: cfg.stall_timeout.as_secs() as _,
                tv_usec: cfg.stall_timeout.subsec_micros() as _,
            };
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
    }
    listener
}

fn install_app(cfg: Box<config::Config>) {
    let installed = APP.set(App {
        cfg: *cfg,
        sessions: sessions::Registry::default(),
        children: Default::default(),
        metrics: observe::Metrics::default(),
        shutting_down: AtomicBool::new(false),
    });
    if installed.is_err() {
        unreachable!("main runs once");
    }
}

/// --exit-with-parent (nothing to follow as PID 1).
fn follow_parent(parent: libc::pid_t, pid1: bool) {
    if !app().cfg.exit_with_parent {
        return;
    }
    if pid1 {
        log!(
            Warn,
            "parent_exit",
            "--exit-with-parent has no effect as PID 1: there is no parent to follow"
        );
    } else {
        ownership::exit_with_parent(parent);
    }
}

/// The front door on the listener, then tiny_http over it.
fn start_http(
    listener: std::net::TcpListener,
    tls: Option<config::TlsPem>,
) -> Arc<tiny_http::Server> {
    let cfg = &app().cfg;
    {
        use std::os::fd::AsRawFd;
        door::install(
            listener.as_raw_fd(),
            door::Limits {
                max_connections: cfg.max_connections,
                read_timeout: cfg.read_timeout,
                max_head: cfg.max_header_size,
                max_headers: cfg.max_headers,
                max_body: cfg.max_body,
                tls: tls.is_some(),
            },
        );
    }
    let ssl = tls.map(|(certificate, private_key)| tiny_http::SslConfig {
        certificate,
        private_key,
    });
    match tiny_http::Server::from_listener(listener, ssl) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("stdio-sse: cannot start the HTTP server: {e}");
            std::process::exit(1);
        }
    }
}

/// The "listening" line, and what runs behind it.
fn announce(url: &str) {
    let cfg = &app().cfg;
    console::announce(url);
    if let Some(i) = &cfg.instance_id {
        log!(
            Info,
            "instance",
            "instance id {i}: session ids start with {i}{}",
            config::INSTANCE_SEPARATOR
        );
    }
    let mcp = &cfg.mcp_path;
    if let Some(file) = &cfg.config_file {
        let names: Vec<&str> = cfg
            .servers
            .iter()
            .filter(|s| !s.disabled)
            .map(|s| s.name.as_str())
            .collect();
        log!(
            Info,
            "listening",
            "listening on {url} (servers of {}: {}; each on {}NAME/mcp and {}NAME/sse; GET /servers lists them)",
            file.display(),
            names.join(", "),
            servers::PREFIX,
            servers::PREFIX
        );
        return;
    }
    match cfg.mode {
        config::Mode::Session | config::Mode::Shared => log!(
            Info,
            "listening",
            "listening on {url} (mcp: {mcp}, sse: {})",
            cfg.sse_path
        ),
        config::Mode::Oneshot => log!(Info, "listening", "listening on {url} (oneshot: {mcp})"),
    }
    if !cfg.demo {
        log!(Info, "command", "child command: {}", cfg.command.join(" "));
        return;
    }
    log!(
        Info,
        "demo",
        "no COMMAND given: serving the built-in demo server (tools: echo, add, broadcast)"
    );
    if !cfg.log_json {
        eprintln!(
            "try:\n  curl -N -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\\n    -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{{}},\"clientInfo\":{{\"name\":\"curl\",\"version\":\"1\"}}}}}}' \\\n    {url}{mcp}"
        );
    }
}
