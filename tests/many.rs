//! Issue 18, "many servers behind one port": `--config FILE` reads a Claude-Desktop-style
//! `mcpServers` file and serves every stdio server in it on its own paths
//! (/servers/NAME/mcp, /sse, /message, /readyz), lists them on GET /servers, names on
//! /readyz the ones that cannot serve, filters each one's tools and labels the metrics
//! and log lines by server. A file it cannot use is refused at startup: exit status 2 and
//! one line on stderr naming the file and, where it can, the server, the key and the line.
mod common;
use common::*;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Instant;

// ---- helpers ----------------------------------------------------------------------------

/// A config file of one test, alone in a temporary directory removed at the end.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    /// The file holding `text` as it is (line numbers in messages refer to it).
    fn text(test: &str, text: &str) -> ConfigFile {
        let dir =
            std::env::temp_dir().join(format!("stdio-sse-many-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mcp.json");
        std::fs::write(&path, text).unwrap();
        ConfigFile { dir, path }
    }
    fn json(test: &str, doc: &Value) -> ConfigFile {
        Self::text(test, &serde_json::to_string_pretty(doc).unwrap())
    }
    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// stdio-sse serving the servers of `file`, after `flags`.
fn serve(file: &ConfigFile, flags: &[&str]) -> Server {
    let mut args = vec!["--config", file.arg()];
    args.extend_from_slice(flags);
    Server::start(&args, &[])
}

/// The built-in demo server as a file's entry: `stdio-sse __demo-server` (echo, add,
/// broadcast).
fn demo(extra: Value) -> Value {
    let mut entry = json!({"command": BIN, "args": ["__demo-server"]});
    entry
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    entry
}

/// The everything fixture as a file's entry.
fn everything_entry(extra: Value) -> Value {
    let mut entry = json!({"command": "python3", "args": [fixture("everything.py")]});
    entry
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    entry
}

/// A command that does not exist anywhere.
const NO_SUCH_COMMAND: &str = "/nonexistent/stdio-sse-test/no-such-mcp-server";

/// Runs stdio-sse with `args` until it exits or says it is listening (then it is
/// stopped): its exit code if it exited by itself (None if it served), and its stderr.
fn run_until_exit_or_listening(args: &[&str]) -> (Option<i32>, String) {
    let mut child = bin_command()
        .args(["--port", "0", "--host", "127.0.0.1"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stdio-sse");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + DEADLINE;
    let mut log = String::new();
    loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.contains("listening on http://") {
                    stop(&mut child);
                    return (None, log);
                }
            }
            // Its stderr closed: it is exiting.
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                stop(&mut child);
                panic!("stdio-sse {args:?} neither exited nor served within {DEADLINE:?}:\n{log}");
            }
        }
    }
    (child.wait().unwrap().code(), log)
}

/// Stops a stdio-sse this test started the way an operator does (SIGTERM: it ends its
/// children), killing it only if it has not exited within the deadline.
fn stop(child: &mut std::process::Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + DEADLINE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs stdio-sse with `args`, expecting it to refuse to start: it exits with status 2.
/// Its stderr.
fn refused(args: &[&str]) -> String {
    let (code, log) = run_until_exit_or_listening(args);
    assert_eq!(
        code,
        Some(2),
        "stdio-sse {args:?} should exit with status 2:\n{log}"
    );
    log
}

/// The message stdio-sse refuses the file `text` with, after its
/// `stdio-sse: --config FILE: ` prefix (asserted).
fn refused_file(test: &str, text: &str) -> String {
    let file = ConfigFile::text(test, text);
    let err = refused(&["--config", file.arg()]);
    let prefix = format!("stdio-sse: --config {}: ", file.arg());
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.starts_with(&prefix),
        "the message should start with {prefix:?}: {err}"
    );
    first[prefix.len()..].to_string()
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} should mention {p:?}");
    }
}

/// A 2025-11-25 Streamable HTTP session on one server's own endpoint, /servers/NAME/mcp.
fn open(s: &Server, name: &str) -> Session {
    Session::open_at(s, &format!("/servers/{name}/mcp"), "2025-11-25")
}

/// What the tests ask of such a session.
trait Ask {
    /// A request's answer, from the POST's SSE stream.
    fn answer(&self, body: &Value) -> Value;
    fn ask(&self, id: i64, tool: &str, args: Value) -> Value {
        self.answer(&tool_call(id, tool, args))
    }
    fn tools(&self, id: i64) -> Vec<String> {
        tool_names(&self.answer(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"})))
    }
    /// POST (a tools/list), GET or DELETE with this session's id on another path.
    fn elsewhere(&self, method: &str, path: &str) -> Response;
}

impl Ask for Session {
    fn answer(&self, body: &Value) -> Value {
        let r = self.post(body);
        assert_eq!(r.status, 200, "{body} on {}: {}", self.path, r.text());
        assert!(
            r.header("Content-Type")
                .is_some_and(|c| c.starts_with("text/event-stream")),
            "a 2025 POST answers on an SSE stream: {r:?}"
        );
        let id = &body["id"];
        r.messages()
            .into_iter()
            .find(|m| &m["id"] == id && m.get("method").is_none())
            .unwrap_or_else(|| panic!("no answer to {body} in {}", r.text()))
    }
    fn elsewhere(&self, method: &str, path: &str) -> Response {
        let mut c = Conn::open_addr(&self.addr);
        let id = ("Mcp-Session-Id", self.id.as_str());
        match method {
            "POST" => {
                let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
                c.request("POST", path, &self.headers(), list.to_string().as_bytes())
            }
            "GET" => c.request("GET", path, &[("Accept", "text/event-stream"), id], b""),
            _ => c.request(method, path, &[id], b""),
        }
    }
}

fn initialize(s: &Server, path: &str) -> Response {
    Conn::open(s).request(
        "POST",
        path,
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-11-25").as_bytes(),
    )
}

fn tool_names(list: &Value) -> Vec<String> {
    list.pointer("/result/tools")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("not a tool list: {list}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// A legacy HTTP+SSE (2024-11-05) session on one server's own /sse, initialized.
struct Legacy {
    stream: SseReader,
    endpoint: String,
    addr: String,
}

impl Legacy {
    fn open(s: &Server, name: &str) -> Legacy {
        let mut c = Conn::open(s);
        let path = format!("/servers/{name}/sse");
        c.send("GET", &path, &[("Accept", "text/event-stream")], b"");
        let mut stream = SseReader::new(c);
        assert_eq!(stream.status, 200, "GET {path}");
        let ev = stream.next_event().expect("endpoint event");
        assert_eq!(ev.event.as_deref(), Some("endpoint"));
        let own = format!("/servers/{name}/message?sessionId=");
        assert!(
            ev.data.starts_with(&own),
            "the endpoint event of {path} should name {own}...: {:?}",
            ev.data
        );
        let mut l = Legacy {
            stream,
            endpoint: ev.data,
            addr: s.addr(),
        };
        let init: Value = serde_json::from_str(&init_body("2024-11-05")).unwrap();
        let answer = l.request(&init);
        // (A shared child answers every client with the version it negotiated first.)
        assert!(answer["result"]["protocolVersion"].is_string(), "{answer}");
        l.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        l
    }
    fn session_id(&self) -> &str {
        self.endpoint.split_once("sessionId=").unwrap().1
    }
    fn post(&self, body: &Value) {
        let r = Conn::open_addr(&self.addr).request(
            "POST",
            &self.endpoint,
            &[JSON_CT],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 202, "{body} to {}: {}", self.endpoint, r.text());
    }
    /// Posts a request; every message the stream carries up to its answer, the answer
    /// last.
    fn request_all(&mut self, body: &Value) -> Vec<Value> {
        self.post(body);
        let mut seen = Vec::new();
        loop {
            let m = self
                .stream
                .next_message()
                .unwrap_or_else(|| panic!("the stream ended before the answer to {body}"));
            let done = m["id"] == body["id"] && m.get("method").is_none();
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
    fn request(&mut self, body: &Value) -> Value {
        self.request_all(body).pop().unwrap()
    }
}

/// One MCP 2026-07-28 (stateless) request on a server's own endpoint, with the envelope
/// and the headers that mirror it; its final message.
fn modern(s: &Server, name: &str, id: i64, method: &str, mut params: Value) -> Value {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "many-test", "version": "1"}});
    let mut headers = vec![
        JSON_CT,
        ACCEPT_BOTH,
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", method),
    ];
    if let Some(n) = params.get("name").and_then(Value::as_str) {
        headers.push(("Mcp-Name", n));
    }
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    let path = format!("/servers/{name}/mcp");
    let r = Conn::open(s).request("POST", &path, &headers, body.to_string().as_bytes());
    r.messages()
        .into_iter()
        .last()
        .unwrap_or_else(|| panic!("no answer to {body} on {path}: {} {}", r.status, r.text()))
}

fn get(s: &Server, path: &str) -> Response {
    Conn::open(s).request("GET", path, &[], b"")
}

/// GET /servers: its entries.
fn servers(s: &Server) -> Vec<Value> {
    let r = get(s, "/servers");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["servers"].as_array().unwrap().clone()
}

/// The /servers entry of `name`.
fn entry(s: &Server, name: &str) -> Value {
    servers(s)
        .into_iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in /servers"))
}

/// Waits (bounded) until the /servers entry of `name` satisfies `f`; that entry.
fn entry_when(s: &Server, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let last = RefCell::new(Value::Null);
    eventually_says(
        || {
            format!(
                "/servers entry of {name}: {what}; last seen {}",
                last.borrow()
            )
        },
        || {
            *last.borrow_mut() = entry(s, name);
            f(&last.borrow())
        },
    );
    last.into_inner()
}

/// Waits (bounded) for one log line holding every one of `needles`.
fn wait_log_all(s: &Server, needles: &[&str]) -> String {
    let mut from = 0;
    loop {
        let (i, line) = s.wait_log_after(needles[0], from);
        if needles.iter().all(|n| line.contains(n)) {
            return line;
        }
        from = i + 1;
    }
}

fn error_of(answer: &Value) -> (i64, String) {
    let e = answer
        .get("error")
        .unwrap_or_else(|| panic!("not an error: {answer}"));
    (
        e["code"].as_i64().unwrap(),
        e["message"].as_str().unwrap().to_string(),
    )
}

// ---- startup refusals: exit status 2, a message naming what is wrong --------------------

#[test]
fn a_missing_file_is_refused() {
    let path = std::env::temp_dir().join(format!(
        "stdio-sse-many-{}-nowhere/mcp.json",
        std::process::id()
    ));
    let path = path.to_str().unwrap();
    let err = refused(&["--config", path]);
    assert!(
        err.starts_with(&format!("stdio-sse: --config {path}: cannot read it")),
        "{err}"
    );
}

#[test]
fn invalid_json_is_refused_with_its_line_and_column() {
    // A trailing comma, the mistake hand-edited files have: line 3, at the `}` (col 26).
    let msg = refused_file(
        "bad-json",
        "{\n  \"mcpServers\": {\n    \"a\": {\"command\": \"x\",}\n  }\n}\n",
    );
    assert_mentions(&msg, &["not valid JSON at line 3 column 26"]);
}

#[test]
fn a_file_without_mcp_servers_is_refused() {
    let msg = refused_file("no-mcp-servers", r#"{"servers": {"a": {"command": "x"}}}"#);
    assert_mentions(&msg, &["has no \"mcpServers\""]);
}

#[test]
fn a_server_without_a_command_is_refused_with_its_line() {
    let text = "{\n  \"mcpServers\": {\n    \"ok\": {\"command\": \"python3\"},\n    \"broken\": {\"args\": [\"serve\"]}\n  }\n}\n";
    let msg = refused_file("no-command", text);
    assert_mentions(&msg, &["server \"broken\" (line 4)", "has no \"command\""]);
    // An empty command is no command either.
    let msg = refused_file(
        "empty-command",
        r#"{"mcpServers": {"blank": {"command": "  "}}}"#,
    );
    assert_mentions(&msg, &["server \"blank\"", "has no \"command\""]);
}

#[test]
fn a_server_defined_twice_is_refused_with_the_second_line() {
    // serde_json would keep the last one silently; the file has a mistake to report.
    let text = "{\n  \"mcpServers\": {\n    \"git\": {\"command\": \"x\"},\n    \"fetch\": {\"command\": \"y\"},\n    \"git\": {\"command\": \"z\"}\n  }\n}\n";
    let msg = refused_file("twice", text);
    assert_mentions(&msg, &["server \"git\"", "defined twice", "line 5"]);
}

/// The line a message gives is the entry's own, also when the server's name appears
/// earlier in the file as a value: a server named after a command (docker) after another
/// server that runs that command is a real file.
#[test]
fn line_numbers_point_at_the_entry_not_an_earlier_value_of_the_same_text() {
    let no_command = "{\n  \"mcpServers\": {\n    \"github\": {\"command\": \"docker\", \"args\": [\"run\", \"-i\", \"ghcr.io/github/github-mcp-server\"]},\n    \"docker\": {\"args\": [\"mcp\", \"gateway\", \"run\"]}\n  }\n}\n";
    let msg = refused_file("line-no-command", no_command);
    assert_mentions(&msg, &["server \"docker\" (line 4)", "has no \"command\""]);

    let twice = "{\n  \"mcpServers\": {\n    \"docker\": {\"command\": \"docker\"},\n    \"github\": {\"command\": \"docker\"},\n    \"docker\": {\"command\": \"docker\"}\n  }\n}\n";
    let msg = refused_file("line-twice", twice);
    assert_mentions(&msg, &["server \"docker\"", "defined twice", "(line 5)"]);
}

#[test]
fn names_that_are_not_url_safe_are_refused() {
    for name in ["a b", "a/b", "a%2Fb", "a?b", "a#b", "caf\u{e9}", ""] {
        let doc = json!({"mcpServers": {name: {"command": "x"}}});
        let msg = refused_file("unsafe", &doc.to_string());
        let shown = format!("server name {name:?}");
        assert_mentions(&msg, &[&shown, "is not URL-safe"]);
    }
}

#[test]
fn dot_names_are_refused() {
    for name in [".", ".."] {
        let doc = json!({"mcpServers": {name: {"command": "x"}}});
        let msg = refused_file("dots", &doc.to_string());
        assert_mentions(&msg, &[&format!("server name {name:?}")]);
    }
}

#[test]
fn names_longer_than_64_characters_are_refused() {
    let long = "n".repeat(65);
    let doc = json!({"mcpServers": {&long: {"command": "x"}}});
    let msg = refused_file("long", &doc.to_string());
    assert_mentions(&msg, &[&format!("server name {long:?}"), "is not URL-safe"]);
    // 64 is the limit, not past it: that one serves.
    let name = "n".repeat(64);
    let file = ConfigFile::json("long-ok", &json!({"mcpServers": {&name: demo(json!({}))}}));
    let s = serve(&file, &[]);
    let r = get(&s, &format!("/servers/{name}/readyz"));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_name_holding_the_tool_separator_is_refused() {
    // `NAME__tool` must split one way only: a__b's tools could collide with a's.
    let msg = refused_file(
        "separator",
        r#"{"mcpServers": {"a": {"command": "x"}, "a__b": {"command": "y"}}}"#,
    );
    assert_mentions(
        &msg,
        &[
            "server name \"a__b\"",
            "tool separator",
            "\"__\"",
            "collide",
        ],
    );
    // The separator is --tool-separator's: with another, `__` is an ordinary name.
    let file = ConfigFile::json(
        "separator-flag",
        &json!({"mcpServers": {"a..b": {"command": "x"}}}),
    );
    let err = refused(&["--config", file.arg(), "--tool-separator", ".."]);
    assert_mentions(&err, &["server name \"a..b\"", "tool separator", "\"..\""]);
    let file = ConfigFile::json(
        "separator-ok",
        &json!({"mcpServers": {"a__b": demo(json!({}))}}),
    );
    let s = serve(&file, &["--tool-separator", ".."]);
    assert_eq!(entry(&s, "a__b")["state"], "ready");
}

#[test]
fn names_differing_only_in_case_are_refused() {
    let msg = refused_file(
        "case",
        r#"{"mcpServers": {"GitHub": {"command": "x"}, "github": {"command": "y"}}}"#,
    );
    assert_mentions(&msg, &["\"github\"", "only in case"]);
}

#[test]
fn an_unknown_key_is_refused_naming_the_server_and_the_line() {
    // A typo of ours (`mdoe`) must not be a silent default.
    let text = "{\n  \"mcpServers\": {\n    \"ok\": {\"command\": \"x\"},\n    \"typo\": {\n      \"command\": \"y\",\n      \"mdoe\": \"shared\"\n    }\n  }\n}\n";
    let msg = refused_file("unknown-key", text);
    assert_mentions(
        &msg,
        &["server \"typo\"", "(line 4)", "unknown key \"mdoe\""],
    );
}

#[test]
fn values_of_the_wrong_type_are_refused_naming_server_and_key() {
    // (the entry's keys besides "command": "x", what the message must mention)
    let cases: Vec<(Value, &[&str])> = vec![
        (json!({"command": ["npx", "-y"]}), &["\"command\""]),
        (json!({"args": 5}), &["\"args\""]),
        (json!({"args": ["ok", 5]}), &["\"args\""]),
        (json!({"env": ["A=b"]}), &["\"env\""]),
        (json!({"env": {"A": ["b"]}}), &["\"env\"", "\"A\""]),
        (json!({"cwd": 1}), &["\"cwd\""]),
        (json!({"mode": "bogus"}), &["\"mode\"", "bogus"]),
        (json!({"warm": "3"}), &["\"warm\""]),
        (json!({"children": -1}), &["\"children\""]),
        (json!({"maxSessions": 1.5}), &["\"maxSessions\""]),
        (
            json!({"sessionIdleTimeout": true}),
            &["\"sessionIdleTimeout\""],
        ),
        (json!({"childProtocol": "v2"}), &["\"childProtocol\""]),
        (json!({"passHeader": 7}), &["\"passHeader\""]),
        (json!({"tools": ["echo"]}), &["\"tools\""]),
        (json!({"tools": {"allow": "echo"}}), &["\"tools\"", "allow"]),
        (json!({"tools": {"only": ["echo"]}}), &["\"tools\"", "only"]),
        (json!({"disabled": "yes"}), &["\"disabled\""]),
    ];
    let mut wrong = Vec::new();
    for (extra, parts) in cases {
        let mut e = json!({"command": "x"});
        e.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let file = ConfigFile::json("types", &json!({"mcpServers": {"srv": e}}));
        let (code, err) = run_until_exit_or_listening(&["--config", file.arg()]);
        let ok = code == Some(2)
            && err.contains("server \"srv\"")
            && parts.iter().all(|p| err.contains(p));
        if !ok {
            wrong.push(format!("{extra} -> exit {code:?}: {}", err.trim()));
        }
    }
    assert!(
        wrong.is_empty(),
        "values of the wrong type not refused as such:\n{}",
        wrong.join("\n")
    );
}

/// `type` is another client's key, but its value decides whether an entry is a stdio
/// server: present and not "stdio", the entry is not run as one. A `type` that is not a
/// string is refused as a wrong type, or at least skipped; never served.
#[test]
fn a_type_that_is_not_a_string_is_not_taken_for_stdio() {
    let doc = json!({"mcpServers": {"srv": demo(json!({"type": 3})), "ok": demo(json!({}))}});
    let file = ConfigFile::json("type-number", &doc);
    let (code, log) = run_until_exit_or_listening(&["--config", file.arg()]);
    if code == Some(2) {
        assert_mentions(&log, &["server \"srv\"", "\"type\""]);
        return;
    }
    let s = serve(&file, &[]);
    let list = servers(&s);
    assert!(
        list.iter().all(|e| e["name"] != "srv"),
        "an entry with \"type\": 3 is served as a stdio server: {list:?}"
    );
}

#[test]
fn mcp_servers_that_is_not_an_object_is_refused() {
    let msg = refused_file("servers-array", r#"{"mcpServers": [{"command": "x"}]}"#);
    assert_mentions(&msg, &["\"mcpServers\"", "not an object"]);
    let msg = refused_file("entry-string", r#"{"mcpServers": {"srv": "npx foo"}}"#);
    assert_mentions(&msg, &["server \"srv\"", "not an object"]);
}

#[test]
fn a_command_and_a_config_together_are_refused() {
    let file = ConfigFile::json("both", &json!({"mcpServers": {"a": demo(json!({}))}}));
    let err = refused(&["--config", file.arg(), "--", "python3", "server.py"]);
    assert_mentions(&err, &["give a COMMAND or --config, not both"]);
}

#[test]
fn oneshot_is_not_a_default_for_config_servers() {
    let file = ConfigFile::json("oneshot", &json!({"mcpServers": {"a": demo(json!({}))}}));
    let err = refused(&["--config", file.arg(), "--mode", "oneshot"]);
    assert_mentions(&err, &["--mode oneshot", "--config"]);
}

// ---- serving a file ---------------------------------------------------------------------

/// A file as Claude Desktop (and Cline, Cursor) keep it, served as it is: `env` reaches
/// the child, other clients' keys and top-level keys are ignored, the remote entry is
/// skipped with a WARN line saying why, and the file is not touched.
#[test]
fn a_claude_desktop_file_is_served_unchanged() {
    let path = fixture("many/claude_desktop_config.json");
    let before = std::fs::read(&path).unwrap();
    // Its args are relative, as a user's often are: stdio-sse runs in the package root.
    let s = Server::start(&["--config", &path], &[]);

    let skipped = wait_log_all(&s, &["WARN", "server_skipped", "\"linear\""]);
    assert_mentions(&skipped, &["url"]);
    let list = servers(&s);
    let names: Vec<&Value> = list.iter().map(|e| &e["name"]).collect();
    assert_eq!(
        names[..2],
        [&json!("everything"), &json!("notes")],
        "{list:?}"
    );
    assert_eq!(entry(&s, "everything")["state"], "ready");
    assert_eq!(entry(&s, "notes")["state"], "ready");
    let linear: Vec<&Value> = list.iter().filter(|e| e["state"] == "skipped").collect();
    assert_eq!(linear.len(), 1, "{list:?}");
    assert_eq!(linear[0]["name"], "linear", "{list:?}");
    assert_mentions(linear[0]["reason"].as_str().unwrap(), &["url"]);

    let everything = open(&s, "everything");
    let greeting = everything.ask(1, "env", json!({"name": "GREETING"}));
    assert_eq!(
        result_text(&greeting),
        "hello from claude_desktop_config.json"
    );
    let notes = open(&s, "notes");
    let dir = notes.ask(1, "env", json!({"name": "NOTES_DIR"}));
    assert_eq!(result_text(&dir), "/tmp/notes");
    assert_eq!(
        result_text(&notes.ask(2, "echo", json!({"message": "noted"}))),
        "noted"
    );
    // disabledTools is the client's own business: the tool is still served.
    assert!(notes.tools(3).contains(&"crash".to_string()));
    assert_eq!(
        get(&s, "/servers/linear/mcp").status,
        404,
        "a skipped entry has no endpoint"
    );
    assert_eq!(
        get(&s, "/readyz").status,
        200,
        "a skipped entry is not a failure"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is read, not written"
    );
}

/// Entries that are not stdio servers (`type` sse/http, `url`, Windsurf's `serverUrl`)
/// are skipped, each with a WARN `server_skipped` line and a /servers entry saying why;
/// the stdio ones serve.
#[test]
fn non_stdio_entries_are_skipped_and_logged_while_the_rest_serve() {
    let file = ConfigFile::json(
        "skipped",
        &json!({"mcpServers": {
            "local": demo(json!({"type": "stdio"})),
            "sse-remote": {"type": "sse", "url": "https://example.com/sse"},
            "http-remote": {"type": "http", "url": "https://example.com/mcp"},
            "bare-url": {"url": "https://example.com/mcp"},
            "windsurf": {"serverUrl": "https://example.com/mcp"},
        }}),
    );
    let s = serve(&file, &[]);
    for (name, why) in [
        ("sse-remote", "\"sse\""),
        ("http-remote", "\"http\""),
        ("bare-url", "url"),
        ("windsurf", "url"),
    ] {
        let shown = format!("\"{name}\"");
        wait_log_all(&s, &["server_skipped", "WARN", &shown, why]);
        assert_eq!(get(&s, &format!("/servers/{name}/mcp")).status, 404);
    }
    let list = servers(&s);
    let skipped: Vec<&str> = list
        .iter()
        .filter(|e| e["state"] == "skipped")
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(skipped.len(), 4, "{list:?}");
    let local = open(&s, "local");
    assert_eq!(
        result_text(&local.ask(1, "echo", json!({"message": "still here"}))),
        "still here"
    );
    let ready = get(&s, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["servers"], json!(["local"]));
}

/// Two servers, one in session mode and one shared, each on its own paths: a tool call on
/// each over Streamable HTTP (2025-11-25 and 2026-07-28) and over legacy HTTP+SSE.
#[test]
fn each_server_answers_on_its_own_endpoints_in_every_transport() {
    let file = ConfigFile::json(
        "endpoints",
        &json!({"mcpServers": {
            // `cwd` and `env` per entry: the relative script is found from its cwd.
            "alpha": {"command": "python3", "args": ["everything.py"],
                      "cwd": fixture(""), "env": {"MANY_WHO": "alpha"}},
            "beta": demo(json!({"mode": "shared"})),
        }}),
    );
    let s = serve(&file, &[]);

    let a = open(&s, "alpha");
    assert_eq!(
        a.init["result"]["serverInfo"]["name"],
        "stdio-sse-test-everything"
    );
    assert_eq!(
        result_text(&a.ask(1, "echo", json!({"message": "to alpha"}))),
        "to alpha"
    );
    assert_eq!(
        result_text(&a.ask(2, "env", json!({"name": "MANY_WHO"}))),
        "alpha"
    );
    let b = open(&s, "beta");
    assert_eq!(b.init["result"]["serverInfo"]["name"], "stdio-sse-demo");
    assert_eq!(result_text(&b.ask(1, "add", json!({"a": 2, "b": 3}))), "5");

    let mut la = Legacy::open(&s, "alpha");
    let answer = la.request(&tool_call(7, "echo", json!({"message": "legacy alpha"})));
    assert_eq!(result_text(&answer), "legacy alpha");
    let mut lb = Legacy::open(&s, "beta");
    let answer = lb.request(&tool_call(7, "echo", json!({"message": "legacy beta"})));
    assert_eq!(result_text(&answer), "legacy beta");

    for (name, id) in [("alpha", 21), ("beta", 22)] {
        let msg = format!("2026 {name}");
        let answer = modern(
            &s,
            name,
            id,
            "tools/call",
            json!({"name": "echo", "arguments": {"message": &msg}}),
        );
        assert_eq!(answer["id"], id, "{answer}");
        assert_eq!(result_text(&answer), msg);
    }
    // An unknown server and an unknown endpoint of a known one are 404.
    assert_eq!(initialize(&s, "/servers/gamma/mcp").status, 404);
    assert_eq!(get(&s, "/servers/alpha/other").status, 404);
    wait_log_all(&s, &["session_open", "server=alpha"]);
    wait_log_all(&s, &["session_open", "server=beta"]);
}

/// A session belongs to its server: its id on another server's path (or the front /mcp)
/// is 404 (Streamable HTTP POST, GET and DELETE, and the legacy message endpoint), and
/// the session is unharmed.
#[test]
fn a_session_of_one_server_is_not_found_on_another() {
    let file = ConfigFile::json(
        "cross",
        &json!({"mcpServers": {
            "alpha": everything_entry(json!({})),
            "beta": demo(json!({"mode": "shared"})),
        }}),
    );
    let s = serve(&file, &[]);
    let a = open(&s, "alpha");
    let b = open(&s, "beta");
    for (c, other) in [(&a, "/servers/beta/mcp"), (&b, "/servers/alpha/mcp")] {
        let r = c.elsewhere("POST", other);
        assert_eq!(r.status, 404, "POST {other} with {}: {}", c.path, r.text());
        assert!(r.json()["error"]["code"].is_i64(), "{}", r.text());
        let r = c.elsewhere("GET", other);
        assert_eq!(r.status, 404, "GET {other} with {}: {}", c.path, r.text());
        let r = c.elsewhere("DELETE", other);
        assert_eq!(
            r.status,
            404,
            "DELETE {other} with {}: {}",
            c.path,
            r.text()
        );
    }
    // Nor is it a session of the front path (the merged endpoint, or nothing).
    for method in ["POST", "GET", "DELETE"] {
        let r = a.elsewhere(method, "/mcp");
        assert_eq!(r.status, 404, "{method} /mcp with {}: {}", a.path, r.text());
    }
    // Both sessions still serve on their own paths.
    assert_eq!(result_text(&a.ask(2, "echo", json!({"message": "a"}))), "a");
    assert_eq!(result_text(&b.ask(2, "echo", json!({"message": "b"}))), "b");

    let mut la = Legacy::open(&s, "alpha");
    let foreign = format!("/servers/beta/message?sessionId={}", la.session_id());
    let r = Conn::open(&s).request(
        "POST",
        &foreign,
        &[JSON_CT],
        tool_call(3, "echo", json!({"message": "x"}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 404, "POST {foreign}: {}", r.text());
    let answer = la.request(&tool_call(4, "echo", json!({"message": "own"})));
    assert_eq!(result_text(&answer), "own");
}

/// GET /servers: each server's name, mode, state, endpoints and counts (sessions,
/// children, tools once a list was seen); disabled and skipped entries too.
#[test]
fn servers_lists_each_server_with_its_counts() {
    let file = ConfigFile::json(
        "listing",
        &json!({"mcpServers": {
            "alpha": everything_entry(json!({})),
            "beta": demo(json!({"mode": "shared", "children": 2})),
            "off": everything_entry(json!({"disabled": true})),
            "remote": {"type": "http", "url": "https://example.com/mcp"},
        }}),
    );
    let s = serve(&file, &[]);
    let beta = entry_when(&s, "beta", "ready with its 2 shared children", |e| {
        e["state"] == "ready" && e["children"] == 2
    });
    assert_eq!(beta["mode"], "shared");
    assert_eq!(beta["sessions"], 0);
    assert_eq!(beta["tools"], Value::Null, "no list seen yet");
    let alpha = entry(&s, "alpha");
    assert_eq!(
        alpha,
        json!({"name": "alpha", "mode": "session", "state": "ready",
               "endpoints": {"mcp": "/servers/alpha/mcp", "sse": "/servers/alpha/sse",
                             "message": "/servers/alpha/message",
                             "readyz": "/servers/alpha/readyz"},
               "sessions": 0, "children": 0, "tools": null})
    );
    let list = servers(&s);
    assert_eq!(list.len(), 4, "{list:?}");
    assert_eq!(
        entry(&s, "off"),
        json!({"name": "off", "mode": "session", "state": "disabled"})
    );
    assert_eq!(
        get(&s, "/servers/off/mcp").status,
        404,
        "a disabled server has no endpoint"
    );
    let skipped: Vec<&Value> = list.iter().filter(|e| e["state"] == "skipped").collect();
    assert_eq!(skipped.len(), 1, "{list:?}");
    assert_eq!(skipped[0]["name"], "remote", "{list:?}");
    assert_mentions(skipped[0]["reason"].as_str().unwrap(), &["\"http\""]);

    let a1 = open(&s, "alpha");
    let _a2 = open(&s, "alpha");
    let b1 = open(&s, "beta");
    let alpha_tools = a1.tools(1).len();
    assert!(alpha_tools > 10, "the everything fixture lists many tools");
    assert_eq!(b1.tools(1), ["echo", "add", "broadcast"]);
    let alpha = entry(&s, "alpha");
    assert_eq!(
        (&alpha["sessions"], &alpha["children"], &alpha["tools"]),
        (&json!(2), &json!(2), &json!(alpha_tools)),
        "{alpha}"
    );
    let beta = entry(&s, "beta");
    assert_eq!(
        (&beta["sessions"], &beta["children"], &beta["tools"]),
        (&json!(1), &json!(2), &json!(3)),
        "{beta}"
    );

    // A session ended: its count and its child go.
    assert_eq!(a1.delete().status, 200);
    entry_when(&s, "alpha", "one session and one child left", |e| {
        e["sessions"] == 1 && e["children"] == 1
    });
    let ready = get(&s, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(
        ready.json(),
        json!({"status": "ready", "servers": ["alpha", "beta"]})
    );
}

/// The file's order is the order of /servers (and decides who wins a shared resource URI
/// on a merged endpoint), also when a name appears earlier in the file as a value.
#[test]
fn servers_are_listed_in_the_files_order() {
    let text = r#"{"mcpServers": {
        "github": {"command": "docker", "args": ["run", "-i", "ghcr.io/github/github-mcp-server"]},
        "fetch": {"command": "uvx", "args": ["mcp-server-fetch"]},
        "docker": {"command": "docker", "args": ["mcp", "gateway", "run"]}
    }}"#;
    let file = ConfigFile::text("order", text);
    let s = serve(&file, &[]);
    let names: Vec<Value> = servers(&s).iter().map(|e| e["name"].clone()).collect();
    assert_eq!(names, [json!("github"), json!("fetch"), json!("docker")]);
}

/// /readyz is 503 naming a server whose command does not exist; that server shows
/// `failed` with the reason, its own /readyz is 503, and the others serve as before.
#[test]
fn readyz_names_a_server_that_cannot_start_while_the_others_serve() {
    let file = ConfigFile::json(
        "readyz",
        &json!({"mcpServers": {
            "alpha": everything_entry(json!({})),
            "ghost": {"command": NO_SUCH_COMMAND},
            "beta": demo(json!({"mode": "shared"})),
        }}),
    );
    let s = serve(&file, &[]);
    let r = get(&s, "/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!(body["status"], "not ready");
    let reason = body["reason"].as_str().unwrap();
    assert_mentions(reason, &["server \"ghost\"", NO_SUCH_COMMAND]);
    assert!(
        !reason.contains("alpha") && !reason.contains("beta"),
        "{reason}"
    );

    let r = get(&s, "/servers/ghost/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_mentions(r.json()["reason"].as_str().unwrap(), &[NO_SUCH_COMMAND]);
    for name in ["alpha", "beta"] {
        let r = get(&s, &format!("/servers/{name}/readyz"));
        assert_eq!(r.status, 200, "/servers/{name}/readyz: {}", r.text());
        assert_eq!(r.json()["status"], "ready");
    }
    assert_eq!(get(&s, "/servers/nobody/readyz").status, 404);

    let ghost = entry(&s, "ghost");
    assert_eq!(ghost["state"], "failed", "{ghost}");
    assert_mentions(ghost["reason"].as_str().unwrap(), &[NO_SUCH_COMMAND]);
    assert_eq!(entry(&s, "alpha")["state"], "ready");
    entry_when(&s, "beta", "ready", |e| e["state"] == "ready");

    // A client of ghost gets an error, with a log line naming the server; alpha and beta
    // answer calls all along.
    let r = initialize(&s, "/servers/ghost/mcp");
    assert!(r.status >= 500, "{} {}", r.status, r.text());
    assert!(r.json()["error"]["code"].is_i64(), "{}", r.text());
    wait_log_all(&s, &["spawn_failed", "server=ghost"]);
    let a = open(&s, "alpha");
    assert_eq!(
        result_text(&a.ask(1, "echo", json!({"message": "up"}))),
        "up"
    );
    let b = open(&s, "beta");
    assert_eq!(
        result_text(&b.ask(1, "echo", json!({"message": "up"}))),
        "up"
    );
    assert_eq!(get(&s, "/readyz").status, 503, "ghost still cannot start");
}

/// A shared server whose child exits at once is `crash_loop` on /servers, and /readyz
/// (its own and the whole instance's) says why, while a session-mode neighbour serves.
#[test]
fn a_crash_looping_shared_server_is_named_while_the_others_serve() {
    let file = ConfigFile::json(
        "crash-loop",
        &json!({"mcpServers": {
            "dies": {"command": "python3", "args": ["-c", "import sys; sys.exit(1)"],
                     "mode": "shared"},
            "ok": demo(json!({})),
        }}),
    );
    let s = serve(&file, &[]);
    let dies = entry_when(&s, "dies", "in crash_loop", |e| e["state"] == "crash_loop");
    assert_mentions(dies["reason"].as_str().unwrap(), &["crash loop"]);
    let r = get(&s, "/servers/dies/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_mentions(r.json()["reason"].as_str().unwrap(), &["crash loop"]);
    let r = get(&s, "/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_mentions(
        r.json()["reason"].as_str().unwrap(),
        &["server \"dies\"", "crash loop"],
    );
    assert_eq!(get(&s, "/servers/ok/readyz").status, 200);
    let ok = open(&s, "ok");
    assert_eq!(
        result_text(&ok.ask(1, "echo", json!({"message": "fine"}))),
        "fine"
    );
    assert_eq!(metric(&s, "stdio_sse_server_ready{server=\"dies\"}"), 0.0);
    assert_eq!(metric(&s, "stdio_sse_server_ready{server=\"ok\"}"), 1.0);
}

/// Flags are every server's defaults; an entry's own keys win: `maxSessions` over
/// --max-sessions, `env` over --env (variable by variable).
#[test]
fn an_entrys_keys_override_the_flags() {
    let file = ConfigFile::json(
        "override",
        &json!({"mcpServers": {
            "alpha": everything_entry(json!({"env": {"MANY_BOTH": "entry"}})),
            "beta": everything_entry(json!({"maxSessions": 2})),
        }}),
    );
    let s = serve(
        &file,
        &[
            "--max-sessions",
            "1",
            "--env",
            "MANY_FLAG=flag",
            "--env",
            "MANY_BOTH=flag",
        ],
    );
    let a = open(&s, "alpha");
    let r = initialize(&s, "/servers/alpha/mcp");
    assert_eq!(r.status, 503, "alpha takes the flag's 1: {}", r.text());
    let b1 = open(&s, "beta");
    let _b2 = open(&s, "beta");
    let r = initialize(&s, "/servers/beta/mcp");
    assert_eq!(r.status, 503, "beta takes its own 2: {}", r.text());

    let env = |c: &Session, name: &str| result_text(&c.ask(9, "env", json!({"name": name})));
    assert_eq!(env(&a, "MANY_FLAG"), "flag");
    assert_eq!(env(&a, "MANY_BOTH"), "entry");
    assert_eq!(env(&b1, "MANY_FLAG"), "flag");
    assert_eq!(env(&b1, "MANY_BOTH"), "flag");
}

/// `sessionIdleTimeout` per entry over --session-idle-timeout, with the flag's meaning of
/// 0: never. Sessions of `keep` (0) and `long` (30m) outlive two of `short` (the flag's
/// 1s), each reaped while they were idle longer.
#[test]
fn session_idle_timeout_per_server_and_zero_is_never() {
    let file = ConfigFile::json(
        "idle",
        &json!({"mcpServers": {
            "keep": demo(json!({"sessionIdleTimeout": 0})),
            "long": demo(json!({"sessionIdleTimeout": "30m"})),
            "short": demo(json!({})),
        }}),
    );
    let s = serve(&file, &["--session-idle-timeout", "1s"]);
    let keep = open(&s, "keep");
    let long = open(&s, "long");
    for _ in 0..2 {
        let short = open(&s, "short");
        entry_when(&s, "short", "its idle session reaped", |e| {
            e["sessions"] == 0
        });
        assert_eq!(short.post(&tool_call(1, "echo", json!({}))).status, 404);
    }
    let r = long.post(&tool_call(1, "echo", json!({"message": "long"})));
    assert_eq!(r.status, 200, "sessionIdleTimeout 30m: {}", r.text());
    let r = keep.post(&tool_call(1, "echo", json!({"message": "keep"})));
    assert_eq!(r.status, 200, "sessionIdleTimeout 0 (never): {}", r.text());
}

// ---- tool filters -----------------------------------------------------------------------

/// `*` matches any run of characters, as the filters do.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len()).any(|i| {
                    text.is_char_boundary(head.len() + i) && glob(tail, &text[head.len() + i..])
                })
        }
    }
}

/// A filtered tool (allow and deny, with `*`) in session mode: absent from tools/list in
/// every transport; its call answered -32602 "Unknown tool: NAME" on the POST's stream
/// (2025) or the legacy stream; the child never sees it (the hidden `crash` would end it).
#[test]
fn a_tool_filter_hides_tools_in_session_mode() {
    let allow = ["echo", "pid", "crash", "test_*"];
    let deny = ["*_content", "crash", "test_error*"];
    let file = ConfigFile::json(
        "filter-session",
        &json!({"mcpServers": {
            "plain": everything_entry(json!({})),
            "filtered": everything_entry(json!({"tools": {"allow": allow, "deny": deny}})),
        }}),
    );
    let s = serve(&file, &[]);
    let all = open(&s, "plain").tools(1);
    let expected: Vec<String> = all
        .iter()
        .filter(|t| allow.iter().any(|p| glob(p, t)) && !deny.iter().any(|p| glob(p, t)))
        .cloned()
        .collect();
    assert!(
        expected.contains(&"echo".to_string())
            && expected.contains(&"test_simple_text".to_string())
    );
    for gone in [
        "crash",
        "test_image_content",
        "test_error_handling",
        "sleep",
    ] {
        assert!(all.contains(&gone.to_string()), "the fixture has {gone}");
        assert!(!expected.contains(&gone.to_string()));
    }

    let c = open(&s, "filtered");
    assert_eq!(c.tools(1), expected);
    let pid = child_pid(&c);
    for (id, hidden) in [(2, "crash"), (3, "test_image_content"), (4, "sleep")] {
        let answer = c.ask(id, hidden, json!({"seconds": 30}));
        assert_eq!(answer["id"], id, "{answer}");
        assert_eq!(
            error_of(&answer),
            (-32602, format!("Unknown tool: {hidden}"))
        );
    }
    wait_log_all(&s, &["tool_hidden", "server=filtered", "\"crash\""]);
    assert_eq!(child_pid(&c), pid, "the child never got `crash`");
    assert_eq!(
        result_text(&c.ask(5, "echo", json!({"message": "ok"}))),
        "ok"
    );

    let mut legacy = Legacy::open(&s, "filtered");
    let list = legacy.request(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}));
    assert_eq!(tool_names(&list), expected);
    let answer = legacy.request(&tool_call(2, "crash", json!({})));
    assert_eq!(error_of(&answer), (-32602, "Unknown tool: crash".into()));

    // 2026-07-28 requests on the same endpoint get the same filter.
    let listed = modern(&s, "filtered", 3, "tools/list", json!({}));
    assert_eq!(tool_names(&listed), expected);
    let answer = modern(
        &s,
        "filtered",
        4,
        "tools/call",
        json!({"name": "crash", "arguments": {}}),
    );
    assert_eq!(answer["id"], 4, "{answer}");
    assert_eq!(error_of(&answer), (-32602, "Unknown tool: crash".into()));

    let filtered = entry(&s, "filtered");
    assert_eq!(
        filtered["toolFilter"],
        json!({"allow": allow, "deny": deny})
    );
    assert_eq!(filtered["tools"], json!(expected.len()), "{filtered}");
    assert!(entry(&s, "plain").get("toolFilter").is_none());
}

/// The same in shared mode, and for 2026-07-28 requests: absent from the list, the call
/// answered -32602 "Unknown tool". The shared child never sees it: the demo's `broadcast`
/// would send every session a tools/list_changed, which a legacy stream would carry
/// before the answer to the next call.
#[test]
fn a_tool_filter_hides_tools_in_shared_mode() {
    let file = ConfigFile::json(
        "filter-shared",
        &json!({"mcpServers": {
            "beta": demo(json!({"mode": "shared",
                                "tools": {"allow": ["*d*", "echo"], "deny": ["broad*"]}})),
        }}),
    );
    let s = serve(&file, &[]);
    let c = open(&s, "beta");
    assert_eq!(c.tools(1), ["echo", "add"]);
    let answer = c.ask(2, "broadcast", json!({}));
    assert_eq!(
        error_of(&answer),
        (-32602, "Unknown tool: broadcast".into())
    );
    assert_eq!(result_text(&c.ask(3, "add", json!({"a": 1, "b": 1}))), "2");

    let listed = modern(&s, "beta", 4, "tools/list", json!({}));
    assert_eq!(tool_names(&listed), ["echo", "add"]);
    let answer = modern(
        &s,
        "beta",
        5,
        "tools/call",
        json!({"name": "broadcast", "arguments": {}}),
    );
    assert_eq!(answer["id"], 5, "{answer}");
    assert_eq!(
        error_of(&answer),
        (-32602, "Unknown tool: broadcast".into())
    );

    let mut legacy = Legacy::open(&s, "beta");
    let answer = legacy.request(&tool_call(6, "broadcast", json!({})));
    assert_eq!(
        error_of(&answer),
        (-32602, "Unknown tool: broadcast".into())
    );
    let seen = legacy.request_all(&tool_call(7, "echo", json!({"message": "after"})));
    assert_eq!(result_text(seen.last().unwrap()), "after");
    assert!(
        seen.iter()
            .all(|m| m["method"] != "notifications/tools/list_changed"),
        "the shared child ran the hidden broadcast: {seen:?}"
    );
    let beta = entry(&s, "beta");
    assert_eq!(beta["tools"], 2, "{beta}");
    assert_eq!(
        beta["toolFilter"],
        json!({"allow": ["*d*", "echo"], "deny": ["broad*"]})
    );
}

/// A oneshot server (a child per request) is served on its own /mcp only, and its tool
/// filter holds as in the other modes: the file accepts `tools` on it, so a hidden tool
/// must not be listed or run.
#[test]
fn a_tool_filter_hides_tools_in_oneshot_mode() {
    let file = ConfigFile::json(
        "filter-oneshot",
        &json!({"mcpServers": {
            "once": demo(json!({"mode": "oneshot", "tools": {"deny": ["a*"]}})),
        }}),
    );
    let s = serve(&file, &[]);
    let once = entry(&s, "once");
    assert_eq!(once["mode"], "oneshot");
    assert_eq!(
        once["endpoints"],
        json!({"mcp": "/servers/once/mcp", "readyz": "/servers/once/readyz"})
    );
    assert_eq!(get(&s, "/servers/once/sse").status, 404);
    let post = |body: Value| {
        let r = Conn::open(&s).request(
            "POST",
            "/servers/once/mcp",
            &[JSON_CT, ACCEPT_BOTH],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{body}: {}", r.text());
        r.messages().into_iter().last().unwrap()
    };
    let echoed = post(tool_call(1, "echo", json!({"message": "once"})));
    assert_eq!(result_text(&echoed), "once");
    let listed = post(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    assert_eq!(tool_names(&listed), ["echo", "broadcast"]);
    let hidden = post(tool_call(3, "add", json!({"a": 1, "b": 2})));
    assert_eq!(error_of(&hidden), (-32602, "Unknown tool: add".into()));
}

// ---- metrics and logs -------------------------------------------------------------------

/// /metrics: stdio_sse_server_* samples by `server` label.
#[test]
fn metrics_carry_the_server_label() {
    let file = ConfigFile::json(
        "metrics",
        &json!({"mcpServers": {
            "alpha": everything_entry(json!({"tools": {"deny": ["crash"]}})),
            "beta": demo(json!({"mode": "shared"})),
            "ghost": {"command": NO_SUCH_COMMAND},
        }}),
    );
    let s = serve(&file, &[]);
    wait_log_all(&s, &["server_start", "server=alpha"]);
    wait_log_all(&s, &["server_start", "server=beta"]);
    let a = open(&s, "alpha");
    let alpha_tools = a.tools(1).len() as f64;
    assert!(initialize(&s, "/servers/ghost/mcp").status >= 500);
    let m = |text: &str, name: &str, server: &str| {
        sample(text, &format!("{name}{{server=\"{server}\"}}"))
    };
    let text = RefCell::new(String::new());
    eventually_says(
        || {
            format!(
                "server metrics as expected; last scrape:\n{}",
                text.borrow()
            )
        },
        || {
            *text.borrow_mut() = scrape(&s);
            let t = text.borrow();
            m(&t, "stdio_sse_server_children", "beta") == 1.0
                && m(&t, "stdio_sse_server_start_failures_total", "ghost") >= 1.0
        },
    );
    let text = text.into_inner();
    let got = |name: &str, server: &str| m(&text, name, server);
    assert_eq!(got("stdio_sse_server_ready", "alpha"), 1.0, "{text}");
    assert_eq!(got("stdio_sse_server_ready", "beta"), 1.0, "{text}");
    assert!(
        text.contains("stdio_sse_server_ready{server=\"ghost\"} 0"),
        "{text}"
    );
    assert_eq!(got("stdio_sse_server_sessions", "alpha"), 1.0, "{text}");
    assert_eq!(got("stdio_sse_server_sessions", "beta"), 0.0, "{text}");
    assert_eq!(got("stdio_sse_server_children", "alpha"), 1.0, "{text}");
    assert_eq!(
        got("stdio_sse_server_tools", "alpha"),
        alpha_tools,
        "{text}"
    );
    assert_eq!(
        got("stdio_sse_server_start_failures_total", "alpha"),
        0.0,
        "{text}"
    );
    assert_eq!(
        got("stdio_sse_server_start_failures_total", "beta"),
        0.0,
        "{text}"
    );
    wait_log_all(&s, &["session_open", "server=alpha"]);
    wait_log_all(&s, &["spawn_failed", "server=ghost"]);
}
