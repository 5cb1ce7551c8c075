//! Test harness: starts the real `kv` binary on a free port with a temporary data directory, and a
//! minimal HTTP/1.1 client over `TcpStream` (a polite client library could not send the malformed
//! and oversized requests the tests need).

#![allow(dead_code)]

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
    pub port: u16,
    pub db_path: PathBuf,
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

impl TestServer {
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

    /// A server with exactly this environment (plus RUST_LOG=info) and these arguments.
    pub fn launch(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> TestServer {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kv"));
        cmd.env_clear()
            .env("RUST_LOG", "info")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
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
            port,
            db_path: dir.to_path_buf(),
            log,
            exited: Mutex::new(exited),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
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
        assert_eq!(resp.status, 200, "server unhealthy; log:\n{}", self.log());
        assert_eq!(resp.json(), serde_json::json!({"status": "healthy"}));
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
    let mut body = Vec::new();
    match length {
        _ if !has_body => {}
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
