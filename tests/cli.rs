//! The command line: every flag documented with its default and variable, variables
//! honoured, mistakes refused with exit status 2.
mod common;
use common::*;

/// Rules: OP-8.
#[test]
fn help_lists_every_flag_with_its_variable() {
    let out = bin_command().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "host",
        "port",
        "mode",
        "mcp-path",
        "sse-path",
        "message-path",
        "cwd",
        "env",
        "max-body",
        "max-message",
        "max-sessions",
        "session-idle-timeout",
        "keepalive",
        "shutdown-grace",
        "log-level",
        "allowed-host",
        "allowed-origin",
    ] {
        assert!(
            help.contains(&format!("--{flag} ")),
            "--{flag} missing from --help"
        );
        let var = format!("STDIO_SSE_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&var), "{var} missing from --help");
    }
    assert!(help.contains("[default: 4MiB]") && help.contains("[default: 30m]"));
    let v = bin_command().arg("--version").output().unwrap();
    assert!(String::from_utf8(v.stdout)
        .unwrap()
        .starts_with("stdio-sse "));
}

/// Rules: OP-8.
#[test]
fn mistakes_exit_2_with_a_reason() {
    for (args, needle) in [
        (&["--bogus"][..], "unknown option --bogus"),
        (&["--mode", "fast"], "--mode"),
        (&["--keepalive", "soon"], "--keepalive"),
        (&["--max-body", "4 parsecs"], "--max-body"),
        (&["--env", "NOEQUALS"], "KEY=VALUE"),
        (&["--children", "2"], "--children applies to --mode shared"),
        (
            &["--mode", "shared", "--warm", "2"],
            "--warm applies to --mode session",
        ),
        (&["--mode", "shared", "--children", "0"], "at least 1"),
        (&["--replay-buffer", "10,lots"], "--replay-buffer"),
        (
            &["--mode", "shared", "--pass-header", "X-Api-Key"],
            "--pass-header cannot work in --mode shared",
        ),
        (&["--pass-header", "X Bad"], "not a header name"),
        (
            &["--pass-header", "X-Key=1BAD"],
            "not an environment variable name",
        ),
        (
            &["--tls-cert", "/nonexistent.pem"],
            "--tls-cert and --tls-key go together",
        ),
        (
            &["--tls-cert", "/a.pem", "--tls-key", "/b.pem"],
            "this build has no TLS: use stdio-sse-tls",
        ),
        (
            &["--auth-token-file", "/nonexistent/tokens"],
            "cannot read --auth-token-file",
        ),
        (
            &["--auth-token", "has space"],
            "--auth-token may not be empty",
        ),
        (&["--auth-health=maybe"], "--auth-health is on or off"),
    ] {
        let out = bin_command().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Variables configure like flags; --env reaches the child; no COMMAND runs the demo.
/// Rules: OP-8.
#[test]
fn variables_configure_and_demo_server_runs() {
    let s = Server::start_env(&[], &[], &[("STDIO_SSE_MCP_PATH", "/rpc")]);
    s.wait_log("(mcp: /rpc, sse: /sse)");
    let mut c = Conn::open(&s);
    let r = c.request(
        "POST",
        "/rpc",
        &[JSON_CT, ACCEPT_BOTH],
        init_body("2025-06-18").as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.messages()[0]["result"]["serverInfo"]["name"],
        "stdio-sse-demo"
    );
    assert_eq!(r.messages()[0]["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(
        c.request(
            "POST",
            "/mcp",
            &[JSON_CT, ACCEPT_BOTH],
            init_body("2025-06-18").as_bytes()
        )
        .status,
        404
    );

    let s = Server::start(&["--env", "GREETING=hello, world"], &everything());
    let sess = Session::open(&s);
    let r = sess.call(1, "env", serde_json::json!({"name": "GREETING"}));
    assert_eq!(result_text(&r.messages()[0]), "hello, world");
}
