//! End-to-end tests of connection handling (issue 10 §2): one client holding thousands of idle
//! connections and hundreds of request heads sent a byte a second must not keep others out; the
//! request-head deadline; and which connection makes room at the cap.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{TestServer, read_response};

/// The attack of the issue's target: one client's idle connections...
const IDLE_CONNECTIONS: usize = 4096;
/// ...another's request heads, one byte a second each...
const SLOW_HEADS: usize = 256;
/// ...while these keep-alive clients send a request every `KEEP_ALIVE_PACE`.
const KEEP_ALIVE_CLIENTS: usize = 64;
const KEEP_ALIVE_PACE: Duration = Duration::from_millis(100);
/// How long the attack lasts: past the default 10 s request-head deadline, so that the slow heads
/// are cut and come back while the others are measured.
const ATTACK: Duration = Duration::from_secs(12);
/// The issue's targets: a new client's `GET /health` within a second, kv's RSS under 256 MiB.
const HEALTH_WITHIN: Duration = Duration::from_secs(1);
const MAX_RSS_BYTES: u64 = 256 * 1024 * 1024;
/// A request head long enough that one byte a second never finishes it within the attack.
const SLOW_HEAD: &[u8] =
    b"GET /health HTTP/1.1\r\nHost: slow.example\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";

/// Raises this process's open files limit to its hard limit; returns the limit now in force.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write only the struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to kv");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A keep-alive client: a `GET /health` every `KEEP_ALIVE_PACE` on one connection until `stop`.
/// Returns how many it made, or what went wrong.
fn keep_alive_client(addr: String, stop: Arc<AtomicBool>) -> Result<usize, String> {
    let mut stream = connect(&addr);
    let mut served = 0;
    while !stop.load(Ordering::SeqCst) {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .map_err(|e| format!("after {served} requests, cannot send: {e}"))?;
        let status = read_status(&mut stream)
            .map_err(|e| format!("after {served} requests, no answer: {e}"))?;
        if status != 200 {
            return Err(format!("after {served} requests, status {status}"));
        }
        served += 1;
        // The client's own pace, not a wait for the server.
        thread::sleep(KEEP_ALIVE_PACE);
    }
    Ok(served)
}

/// Reads one response to `GET /health` off a keep-alive connection; its status.
fn read_status(stream: &mut TcpStream) -> std::io::Result<u16> {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no content-length"))?;
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))
}

/// Whether kv has answered or closed a connection the client has not finished a request on.
fn answered_or_closed(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let answered = match (&*stream).read(&mut [0; 64]) {
        Ok(_) => true,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).unwrap();
    answered
}

/// The slow client: keeps `SLOW_HEADS` connections each sending one more byte of a request head
/// every second, and opens a new one whenever kv closes one; counts those in `cut`.
fn slow_heads(addr: String, stop: Arc<AtomicBool>, cut: Arc<AtomicUsize>) {
    let mut heads: Vec<(TcpStream, usize)> = (0..SLOW_HEADS).map(|_| (connect(&addr), 0)).collect();
    while !stop.load(Ordering::SeqCst) {
        for (stream, sent) in &mut heads {
            let byte = &SLOW_HEAD[*sent % (SLOW_HEAD.len() - 4)..][..1];
            if answered_or_closed(stream) || stream.write_all(byte).is_err() {
                cut.fetch_add(1, Ordering::SeqCst);
                *stream = connect(&addr);
                *sent = 0;
                continue;
            }
            *sent += 1;
        }
        // One byte a second: the attacker's pace.
        thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn no_client_can_starve_the_others() {
    let needed = (IDLE_CONNECTIONS + 2 * SLOW_HEADS + KEEP_ALIVE_CLIENTS + 256) as u64;
    let limit = raise_fd_limit();
    if limit < needed {
        eprintln!(
            "SKIPPED no_client_can_starve_the_others: this process may open {limit} files, the test needs {needed}"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path());
    let addr = s.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..KEEP_ALIVE_CLIENTS)
        .map(|_| {
            let (addr, stop) = (addr.clone(), stop.clone());
            thread::spawn(move || keep_alive_client(addr, stop))
        })
        .collect();

    let attack_started = Instant::now();
    let cut = Arc::new(AtomicUsize::new(0));
    let slow = {
        let (addr, stop, cut) = (addr.clone(), stop.clone(), cut.clone());
        thread::spawn(move || slow_heads(addr, stop, cut))
    };
    let idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS).map(|_| connect(&addr)).collect();
    eprintln!(
        "{} idle connections and {} slow heads open after {:?}",
        idle.len(),
        SLOW_HEADS,
        attack_started.elapsed()
    );

    let (mut slowest, mut probes, mut max_rss) = (Duration::ZERO, 0, 0);
    while attack_started.elapsed() < ATTACK {
        let started = Instant::now();
        let mut probe = connect(&addr);
        probe
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let resp = read_response(&mut probe);
        let took = started.elapsed();
        assert_eq!(resp.status, 200);
        assert!(
            took < HEALTH_WITHIN,
            "a new client's GET /health took {took:?}"
        );
        slowest = slowest.max(took);
        probes += 1;
        max_rss = max_rss.max(s.rss_bytes().unwrap_or(0));
        thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let served = client
            .join()
            .unwrap()
            .expect("a keep-alive client was disconnected");
        assert!(served > 0);
    }
    slow.join().unwrap();
    let rss = max_rss.max(s.rss_bytes().unwrap_or(0));
    eprintln!(
        "{probes} probes, slowest {slowest:?}; kv's RSS peaked at {:.1} MiB; {} slow heads cut",
        rss as f64 / (1024.0 * 1024.0),
        cut.load(Ordering::SeqCst)
    );
    assert!(rss < MAX_RSS_BYTES, "kv's RSS reached {rss} bytes");
    assert!(
        cut.load(Ordering::SeqCst) >= SLOW_HEADS,
        "the request-head deadline never cut the slow heads"
    );
    drop(idle);
    s.assert_healthy();
}

#[test]
fn a_request_head_has_its_own_deadline_and_an_idle_connection_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), &[("KV_HEADER_TIMEOUT_SECS", "1")]);
    let mut idle = s.connect();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    let mut slow = s.connect();
    slow.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
    let resp = read_response(&mut slow);
    assert_eq!(resp.status, 408);
    assert_eq!(resp.json()["code"], "request_timeout");
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(
        slow.read(&mut [0; 16]).unwrap(),
        0,
        "and the connection closed"
    );
    // The idle connection has waited as long, and is still served.
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
}

/// A new connection on `s` whose `GET /health` is answered; kept open.
fn served(s: &TestServer) -> TcpStream {
    let mut new = s.connect();
    new.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut new).status, 200);
    new
}

#[test]
fn at_the_cap_what_has_waited_longest_for_a_request_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), &[("KV_MAX_CONNECTIONS", "4")]);
    assert!(s.log().contains("at most 4 connections"), "{}", s.log());
    // Three connections that sent nothing, oldest first, then a request head in progress: the cap.
    let mut silent: Vec<TcpStream> = (0..3).map(|_| s.connect()).collect();
    let mut head = s.connect();
    head.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    // Each new client is served, and the connection that has waited longest makes room for it.
    let mut kept = Vec::new();
    for (i, closed) in silent.iter_mut().enumerate() {
        kept.push(served(&s));
        assert_eq!(
            closed.read(&mut [0; 16]).unwrap(),
            0,
            "silent connection {i}"
        );
    }
    // The head has waited since its connection opened, longer than the clients answered since.
    kept.push(served(&s));
    let resp = read_response(&mut head);
    assert_eq!(resp.status, 408);
    assert_eq!(resp.json()["code"], "request_timeout");
    // Then the client answered first.
    kept.push(served(&s));
    assert_eq!(kept[0].read(&mut [0; 16]).unwrap(), 0);
    for (i, open) in kept.iter_mut().enumerate().skip(1) {
        open.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(open).status, 200, "kept client {i}");
    }
    assert!(
        common::eventually(Duration::from_secs(10), || s
            .log()
            .contains("the most allowed (KV_MAX_CONNECTIONS)")),
        "{}",
        s.log()
    );
}

#[test]
fn at_the_cap_a_request_in_progress_is_never_closed_for_room() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), &[("KV_MAX_CONNECTIONS", "2")]);
    // A request in progress (an event stream: its head has been answered) and a request head.
    let mut stream = s.events("/changes", &[]);
    stream.set_timeout(Duration::from_secs(10));
    let mut head = s.connect();
    head.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    // A new client: the head makes room (with a 408 if kv had seen it start), the stream stays.
    assert_eq!(
        s.request("PUT", "/objects", Some(br#"{"key":"k","value":1}"#))
            .status,
        200
    );
    let mut rest = Vec::new();
    let _ = head.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
    let event = stream.next_event().expect("the stream was closed");
    assert_eq!(event.id.as_deref(), Some("1"));
}

/// One thread sends the answers to writes after their commit (src/http/deferred.rs), and must
/// never wait for a client to read: here one client pipelines 5,000 PUTs with long keys and reads
/// nothing, so its answers fill its socket and kv stops reading its requests, and meanwhile
/// another client's writes are answered. Then the first client reads: every answer is there, in
/// order.
#[test]
fn a_client_that_does_not_read_its_answers_holds_no_other_write() {
    const PIPELINED: usize = 5000;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), &[("RUST_LOG", "debug")]);
    let key = |i: usize| format!("{i:04}{}", "k".repeat(996));
    let mut requests = Vec::new();
    for i in 0..PIPELINED {
        let body = format!(r#"{{"key":"{}","value":{i}}}"#, key(i));
        requests.extend(common::raw_request("PUT", "/objects", &body));
    }
    let mut stalled = s.connect();
    let mut sender = stalled.try_clone().unwrap();
    let sending = thread::spawn(move || sender.write_all(&requests));
    // The stalled client's answers (about 1.1 KB each) are more than its socket buffers hold,
    // so kv's connection thread for it ends up waiting for an answer to go out.
    assert!(
        common::eventually(Duration::from_secs(20), || {
            s.get("/objects?prefix=0&limit=1000").json()["count"]
                .as_u64()
                .is_some_and(|n| n >= 100)
        }),
        "the pipelined PUTs were not being written"
    );
    for i in 0..20 {
        let put = s.put("/objects", &format!(r#"{{"key":"other{i}","value":{i}}}"#));
        assert_eq!(put.status, 200, "{}", put.json());
    }
    // One reader for all the answers: they arrive back to back.
    let mut answers = std::io::BufReader::new(&mut stalled);
    for i in 0..PIPELINED {
        let (status, body) = next_answer(&mut answers);
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["key"], key(i), "answer {i} out of order");
    }
    sending.join().unwrap().unwrap();
    assert_eq!(
        s.get(&format!("/objects/{}", key(PIPELINED - 1))).status,
        200
    );
    assert!(
        s.log().contains("sent by a thread of its own"),
        "no answer was ever left to a thread of its own"
    );
}

/// The status and body of the next answer on a keep-alive connection (bodies by Content-Length).
fn next_answer(answers: &mut impl std::io::BufRead) -> (u16, String) {
    let mut line = String::new();
    answers.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut length = 0;
    loop {
        line.clear();
        answers.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    answers.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}
