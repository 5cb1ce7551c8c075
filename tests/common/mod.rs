//! Test harness: starts the real `kv` binary on a free port with a temporary data directory, and a
//! minimal HTTP/1.1 client over `TcpStream` (a polite client library could not send the malformed
//! and oversized requests the tests need). Every server runs on the backend of the test run, SQLite
//! or PostgreSQL (see backend.rs).

#![allow(dead_code)]

mod backend;

// Each test file uses a different part of the harness.
#[allow(unused_imports)]
pub use backend::{
    Backend, backend, database_url, on_postgres, postgres_only, postgres_required, sqlite_only,
};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `kv`; killed when dropped, so a failing test leaks no server.
pub struct TestServer {
    child: Child,
    client: Client,
    pub port: u16,
    pub db_path: PathBuf,
    /// The `KV_DATABASE_URL` it was given: None on SQLite.
    pub database_url: Option<String>,
    log: Arc<Mutex<String>>,
    exited: Mutex<Receiver<()>>,
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Runs `kv` to completion with the given environment and arguments; returns its status and stderr.
pub fn run_to_exit(env: &[(&str, &str)], args: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kv"));
    cmd.env_clear().env("RUST_LOG", "info").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run kv");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Talks HTTP to a kv at an address; `TestServer` derefs to it, and threads make their own with
/// `TestServer::client`.
pub struct Client {
    addr: String,
}

impl Client {
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// One request on a fresh connection (`Connection: close`).
    pub fn request(&self, method: &str, target: &str, body: Option<&[u8]>) -> Response {
        let mut raw =
            format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(body) = body {
            raw.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        raw.push_str("\r\n");
        let mut bytes = raw.into_bytes();
        if let Some(body) = body {
            bytes.extend_from_slice(body);
        }
        let mut stream = self.connect();
        stream.write_all(&bytes).expect("send request");
        // A response to HEAD announces its Content-Length but has no body.
        read_response_with(&mut stream, method != "HEAD")
    }

    /// One request with extra header lines (`Name: value`) on a fresh connection.
    pub fn request_with(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        let mut raw =
            format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        raw.push_str(body.unwrap_or(""));
        let mut stream = self.connect();
        stream.write_all(raw.as_bytes()).expect("send request");
        read_response_with(&mut stream, method != "HEAD")
    }

    /// Opens `GET target` as an event stream (Accept: text/event-stream), past the response head.
    pub fn events(&self, target: &str, headers: &[(&str, &str)]) -> EventStream {
        let mut raw =
            format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        let mut stream = self.connect();
        stream.write_all(raw.as_bytes()).expect("send request");
        let mut reader = BufReader::new(stream);
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read head");
            if line.trim_end().is_empty() {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        EventStream {
            head,
            reader,
            chunk_left: 0,
        }
    }

    /// `GET /changes?query`, which must answer 200; its JSON.
    pub fn changes(&self, query: &str) -> Value {
        let resp = self.get(&format!("/changes?{query}"));
        assert_eq!(
            resp.status,
            200,
            "{:?}",
            String::from_utf8_lossy(&resp.body)
        );
        resp.json()
    }

    pub fn get(&self, target: &str) -> Response {
        self.request("GET", target, None)
    }

    pub fn put(&self, target: &str, body: &str) -> Response {
        self.request("PUT", target, Some(body.as_bytes()))
    }

    pub fn delete(&self, target: &str) -> Response {
        self.request("DELETE", target, None)
    }

    /// Sends raw bytes, reads until the server closes, parses one response.
    pub fn raw(&self, bytes: &[u8]) -> Response {
        let mut stream = self.connect();
        stream.write_all(bytes).expect("send request");
        read_response(&mut stream)
    }

    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr()).expect("connect to kv");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
    }

    /// Asserts the server still answers `/health` with 200.
    pub fn assert_healthy(&self) {
        let resp = self.get("/health");
        assert_eq!(resp.status, 200, "server unhealthy");
        assert_eq!(resp.json(), serde_json::json!({"status": "healthy"}));
    }
}

impl std::ops::Deref for TestServer {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl TestServer {
    /// A client of the server at `addr` (from `addr()`), for another thread.
    pub fn client(addr: &str) -> Client {
        Client {
            addr: addr.to_string(),
        }
    }

    /// A server on a fresh temporary data directory (kept until the test's `TempDir` drops).
    pub fn start(dir: &Path) -> TestServer {
        TestServer::start_with(dir, &[])
    }

    /// A server on `dir` with extra environment variables.
    pub fn start_with(dir: &Path, env: &[(&str, &str)]) -> TestServer {
        let mut all = vec![("PORT", "0"), ("DB_PATH", dir.to_str().unwrap())];
        all.extend_from_slice(env);
        TestServer::launch(dir, &all, &[])
    }

    /// One of several kv nodes on the PostgreSQL database `database_url` (from `database_url`),
    /// each with a data directory `dir` of its own.
    pub fn start_node(dir: &Path, database_url: &str, env: &[(&str, &str)]) -> TestServer {
        let mut all = vec![("KV_DATABASE_URL", database_url)];
        all.extend_from_slice(env);
        TestServer::start_with(dir, &all)
    }

    /// A server on SQLite in `dir` whatever the backend of the test run, for a database that only
    /// SQLite can open (a restored backup).
    pub fn start_sqlite(dir: &Path, env: &[(&str, &str)]) -> TestServer {
        let mut all = vec![("PORT", "0"), ("DB_PATH", dir.to_str().unwrap())];
        all.extend_from_slice(env);
        TestServer::spawn(dir, &all, &[], None)
    }

    /// A server with exactly this environment (plus RUST_LOG=info, and on PostgreSQL the
    /// `KV_DATABASE_URL` of `dir` unless `env` or `args` name a database) and these arguments.
    pub fn launch(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> TestServer {
        let named = env.iter().any(|(k, _)| *k == "KV_DATABASE_URL")
            || args.iter().any(|a| a.starts_with("--database-url"));
        let database = if named { None } else { database_url(dir) };
        TestServer::spawn(dir, env, args, database)
    }

    fn spawn(
        dir: &Path,
        env: &[(&str, &str)],
        args: &[&str],
        database: Option<String>,
    ) -> TestServer {
        let database_url = database.clone().or_else(|| {
            env.iter()
                .find(|(k, _)| *k == "KV_DATABASE_URL")
                .map(|(_, v)| v.to_string())
        });
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kv"));
        cmd.env_clear()
            .env("RUST_LOG", "info")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(url) = &database {
            cmd.env("KV_DATABASE_URL", url);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn kv");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = channel();
        let (exited_tx, exited) = channel();
        let log_writer = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                {
                    let mut log = log_writer.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let port = rest
                        .split_whitespace()
                        .next()
                        .and_then(|addr| addr.rsplit(':').next())
                        .and_then(|p| p.parse::<u16>().ok());
                    let _ = port_tx.send(port);
                }
            }
            let _ = exited_tx.send(());
        });
        let port = match port_rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(port)) => port,
            _ => {
                let _ = child.kill();
                panic!("kv did not start; its log:\n{}", log.lock().unwrap());
            }
        };
        TestServer {
            child,
            client: Client {
                addr: format!("127.0.0.1:{port}"),
            },
            port,
            db_path: dir.to_path_buf(),
            database_url,
            log,
            exited: Mutex::new(exited),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// kv's resident memory, from /proc (Linux), in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?;
        Some(kib * 1024)
    }

    /// Sends SIGTERM and waits (up to `within`) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(within)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(10));
    }

    /// SIGINT, as Ctrl-C sends.
    pub fn signal_int(&self) {
        self.signal(libc::SIGINT);
    }

    /// SIGHUP, which asks kv to re-read its tokens file.
    pub fn signal_hup(&self) {
        self.signal(libc::SIGHUP);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) only sends a signal; the pid is our own live child.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits for the process to exit, failing the test after `within`.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let _ = self
                    .exited
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(5));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kv did not exit within {within:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keep-alive request with a body, as raw bytes.
pub fn raw_request(method: &str, target: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one HTTP response: headers, then the body by Content-Length (or to EOF).
pub fn read_response(stream: &mut TcpStream) -> Response {
    read_response_with(stream, true)
}

fn read_response_with(stream: &mut TcpStream, has_body: bool) -> Response {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .expect("read status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read header");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let mut body = Vec::new();
    // 1xx, 204 and 304 answers never have a body (RFC 9112 §6.3), whatever their headers say.
    let bodiless = status == 204 || status == 304 || (100..200).contains(&status);
    match length {
        _ if !has_body || bodiless => {}
        _ if chunked => loop {
            let mut size = String::new();
            reader.read_line(&mut size).expect("read chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).expect("read chunk");
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        },
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body).expect("read body");
        }
        None => {
            reader.read_to_end(&mut body).expect("read body");
        }
    }
    Response {
        status,
        headers,
        body,
    }
}

/// Polls `check` until it is true or `within` passes.
pub fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A Server-Sent Events stream read off a chunked response.
pub struct EventStream {
    /// The status line and header lines.
    pub head: Vec<String>,
    reader: BufReader<TcpStream>,
    chunk_left: usize,
}

/// One event: its `id`, `event` and `data` fields; comments are kept apart.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub comment: Option<String>,
}

impl EventStream {
    /// The next byte of the body, unchunked; `None` at the end of the body or of the connection.
    fn byte(&mut self) -> Option<u8> {
        if self.chunk_left == 0 {
            let mut size = String::new();
            if self.reader.read_line(&mut size).ok()? == 0 {
                return None;
            }
            if size.trim().is_empty() {
                // The CRLF after the previous chunk.
                size.clear();
                self.reader.read_line(&mut size).ok()?;
            }
            self.chunk_left = usize::from_str_radix(size.trim(), 16).ok()?;
            if self.chunk_left == 0 {
                return None;
            }
        }
        let mut b = [0u8];
        self.reader.read_exact(&mut b).ok()?;
        self.chunk_left -= 1;
        Some(b[0])
    }

    fn line(&mut self) -> Option<String> {
        let mut bytes = Vec::new();
        loop {
            match self.byte()? {
                b'\n' => return Some(String::from_utf8(bytes).expect("UTF-8 event")),
                b => bytes.push(b),
            }
        }
    }

    /// The next event or comment; `None` once the stream has ended.
    pub fn next_event(&mut self) -> Option<Event> {
        let mut event = Event::default();
        let mut any = false;
        loop {
            let line = self.line()?;
            if line.is_empty() {
                if any {
                    return Some(event);
                }
                continue;
            }
            any = true;
            if let Some(comment) = line.strip_prefix(':') {
                event.comment = Some(comment.trim().to_string());
            } else if let Some((field, value)) = line.split_once(": ") {
                match field {
                    "id" => event.id = Some(value.to_string()),
                    "event" => event.event = Some(value.to_string()),
                    "data" => event.data.push_str(value),
                    other => panic!("unexpected field {other:?}"),
                }
            }
        }
    }

    /// Sets how long `next_event` may wait for data.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .unwrap();
    }
}
