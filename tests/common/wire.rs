//! The wire, as a client sees it: a keep-alive HTTP/1.1 connection, whole responses,
//! SSE events. Shared by the integration tests (`tests/common`) and the benchmark
//! (`tests/bench/bench.rs`, through `#[path]`), so both speak to stdio-sse alike.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Upper bound for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A parsed response whose body has been read in full.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn events(&self) -> Vec<Event> {
        parse_events(&self.text())
    }
    /// The JSON of each `message` event, or the body itself when it is JSON.
    pub fn messages(&self) -> Vec<Value> {
        if self
            .header("Content-Type")
            .is_some_and(|c| c.starts_with("application/json"))
        {
            return serde_json::from_slice(&self.body).into_iter().collect();
        }
        self.events()
            .iter()
            .filter(|e| e.event.as_deref().unwrap_or("message") == "message" && !e.data.is_empty())
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event: Option<String>,
    pub id: Option<String>,
    pub retry: Option<String>,
    pub data: String,
}

pub fn parse_events(text: &str) -> Vec<Event> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut ev = Event {
            event: None,
            id: None,
            retry: None,
            data: String::new(),
        };
        let mut any = false;
        let mut has_data = false;
        for line in block.lines() {
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line
                .split_once(':')
                .map(|(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)))
                .unwrap_or((line, ""));
            match field {
                "event" => ev.event = Some(value.to_string()),
                "id" => ev.id = Some(value.to_string()),
                "retry" => ev.retry = Some(value.to_string()),
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
        if any {
            out.push(ev);
        }
    }
    out
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    pub host: String,
}

impl Conn {
    pub fn open_addr(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.set_nodelay(true).unwrap();
        Conn::from_stream(s, addr)
    }
    /// A connection already made (the benchmark times its own connects).
    pub fn from_stream(s: TcpStream, addr: &str) -> Conn {
        Conn {
            // Large reads: the benchmark's big answers arrive in few syscalls.
            reader: BufReader::with_capacity(64 * 1024, s),
            host: addr.to_string(),
        }
    }

    /// Writes bytes as they are: hand-made or malformed requests.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// Sends a request; `headers` may override Host.
    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {}\r\n", self.host));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let s = self.reader.get_mut();
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        s.write_all(&bytes).unwrap();
    }

    /// Reads a status line and headers.
    pub fn head(&mut self) -> (u16, Vec<(String, String)>) {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("bad status line {line:?}"))
            .parse()
            .unwrap();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        (status, headers)
    }

    /// Reads one chunk of a chunked body; None at the terminating chunk.
    pub fn chunk(&mut self) -> Option<Vec<u8>> {
        let mut size = String::new();
        self.reader.read_line(&mut size).expect("chunk size");
        let n = usize::from_str_radix(size.trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        let mut data = vec![0; n + 2];
        self.reader.read_exact(&mut data).unwrap();
        data.truncate(n);
        (n > 0).then_some(data)
    }

    pub fn response(&mut self) -> Response {
        let (status, headers) = self.head();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if get("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            while let Some(c) = self.chunk() {
                body.extend(c);
            }
        } else if let Some(n) = get("Content-Length") {
            body.resize(n.parse().unwrap(), 0);
            self.reader.read_exact(&mut body).unwrap();
        } else {
            self.reader.read_to_end(&mut body).unwrap();
        }
        Response {
            status,
            headers,
            body,
        }
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.send(method, path, headers, body);
        self.response()
    }

    pub fn set_timeout(&self, d: Duration) {
        self.reader.get_ref().set_read_timeout(Some(d)).unwrap();
    }

    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }
}

pub const ACCEPT_BOTH: (&str, &str) = ("Accept", "application/json, text/event-stream");
pub const JSON_CT: (&str, &str) = ("Content-Type", "application/json");

pub fn init_body(version: &str) -> String {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {"sampling": {}, "elicitation": {}},
        "clientInfo": {"name": "stdio-sse-tests", "version": "1.0"}}})
    .to_string()
}
