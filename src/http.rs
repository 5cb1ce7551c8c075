//! The HTTP side: the listening socket and its options, the connection threads, the worker threads,
//! the translation between tiny_http and the API's `Req`/`Resp`, the body limit, the access log and
//! the orderly stop.
//!
//! We run tiny_http's connection handling ourselves instead of through `tiny_http::Server`, because
//! its server cannot do two things kv needs: (1) its accept loop treats the timeout of a listener
//! with `SO_RCVTIMEO` as fatal, yet that option on the listener is the only way to give every
//! accepted socket a read timeout; (2) its connection pool queues a new connection behind busy
//! threads when many arrive at once (measured: 6 of 300 connections got no answer for 30 s). So one
//! accept thread takes connections (up to `MAX_CONNECTIONS`, then waits), each connection gets its
//! own thread that parses requests with tiny_http and queues them, and `workers` threads take them
//! from the queue, each with its own read connection to SQLite. A worker answers a read at once;
//! a write it hands to the writer together with the request, and goes on with other requests; the
//! writer queues the committed answer back, and whichever worker is free sends it.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::api::{self, Answer, Ctx, Method, Req, Resp};
use crate::config::Config;
use crate::error::Error;
use crate::store::Store;
use crate::writer::{Submitter, Writer};

/// Pending connections the kernel keeps before refusing new ones.
const LISTEN_BACKLOG: i32 = 1024;
/// Most connections served at once; past it, accepting pauses until one closes (idle ones close
/// after `KV_IO_TIMEOUT_SECS`), so a flood costs neither unbounded threads nor file descriptors.
const MAX_CONNECTIONS: usize = 1024;
/// Largest buffer reserved up front from a declared Content-Length; bigger bodies grow as they arrive.
const MAX_BODY_PREALLOC_BYTES: usize = 1024 * 1024;
/// Longest pause after a failed accept (out of file descriptors, say), so errors cannot spin.
const MAX_ACCEPT_BACKOFF_MS: u64 = 1000;

/// Why the server should stop.
#[derive(Debug)]
pub enum Stop {
    /// SIGINT or SIGTERM: stop gracefully, exit 0.
    Signal,
    /// The listening socket failed for good: stop, exit non-zero.
    Fatal(String),
}

/// A running server: its accept thread and workers.
pub struct Server {
    queue: Arc<Queue>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
}

/// Requests parsed by connection threads, waiting for a worker.
#[derive(Default)]
struct Queue {
    items: Mutex<VecDeque<Item>>,
    ready: Condvar,
}

enum Item {
    /// A request to handle.
    Request(tiny_http::Request),
    /// A request whose write has committed (or failed): its answer only needs sending.
    Answer(tiny_http::Request, Result<Resp, Error>, Instant),
    /// Tells one worker to exit; queued behind the requests already received, so those are handled.
    Stop,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Item>> {
        // A panic never happens while the lock is held, but a poisoned queue is still a valid queue.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, item: Item) {
        self.lock().push_back(item);
        self.ready.notify_one();
    }

    fn try_pop(&self) -> Option<Item> {
        self.lock().pop_front()
    }

    fn pop(&self) -> Item {
        let mut items = self.lock();
        loop {
            if let Some(item) = items.pop_front() {
                return item;
            }
            items = self.ready.wait(items).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Counts open connections; `acquire` waits while `MAX_CONNECTIONS` are open.
#[derive(Default)]
struct Slots {
    open: Mutex<usize>,
    freed: Condvar,
}

/// One open connection's slot, given back when the connection thread ends, however it ends.
struct Slot(Arc<Slots>);

impl Slots {
    fn acquire(slots: &Arc<Slots>) -> Slot {
        let mut open = slots.open.lock().unwrap_or_else(|e| e.into_inner());
        while *open >= MAX_CONNECTIONS {
            open = slots.freed.wait(open).unwrap_or_else(|e| e.into_inner());
        }
        *open += 1;
        Slot(slots.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.open.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// Binds the listening socket with the options every accepted socket inherits: TCP_NODELAY (so a
/// response's separate header and body writes do not wait ~40 ms for a delayed ACK) and read/write
/// timeouts (so idle and stalled clients are closed).
fn listen(config: &Config) -> Result<TcpListener, String> {
    let target = format!("{}:{}", config.host, config.port);
    let bracketed = format!("[{}]:{}", config.host, config.port);
    let addr = target
        .to_socket_addrs()
        .or_else(|_| bracketed.to_socket_addrs())
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("cannot resolve the listen address '{}'", config.host))?;
    let cannot = |e: std::io::Error| format!("cannot listen on {addr}: {e}");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(cannot)?;
    let timeout = Some(Duration::from_secs(config.io_timeout_secs));
    socket.set_reuse_address(true).map_err(cannot)?;
    socket.set_tcp_nodelay(true).map_err(cannot)?;
    socket.set_read_timeout(timeout).map_err(cannot)?;
    socket.set_write_timeout(timeout).map_err(cannot)?;
    socket.bind(&addr.into()).map_err(cannot)?;
    socket.listen(LISTEN_BACKLOG).map_err(cannot)?;
    Ok(socket.into())
}

/// Binds, then starts the workers (each opens its own read connection first) and the accept thread.
pub fn serve(config: &Config, writer: &Writer, stops: Sender<Stop>) -> Result<Server, String> {
    let listener = listen(config)?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let queue = Arc::new(Queue::default());
    let stopping = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::with_capacity(config.workers);
    for n in 0..config.workers {
        let store = Store::open(&config.db_file(), config.sync)
            .map_err(|e| format!("cannot open {}: {e}", config.db_file().display()))?;
        let submitter = writer.submitter();
        let queue = queue.clone();
        let (max_body_bytes, max_batch_ops) = (config.max_body_bytes, config.max_batch_ops);
        let worker = thread::Builder::new()
            .name(format!("kv-worker-{n}"))
            .spawn(move || {
                let ctx = Ctx {
                    store: &store,
                    max_batch_ops,
                };
                loop {
                    match queue.pop() {
                        Item::Request(request) => {
                            handle(request, &ctx, &submitter, &queue, max_body_bytes)
                        }
                        Item::Answer(request, result, started) => send(request, result, started),
                        Item::Stop => return,
                    }
                }
            })
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        workers.push(worker);
    }
    let (accept_queue, accept_stopping) = (queue.clone(), stopping.clone());
    thread::Builder::new()
        .name("kv-accept".into())
        .spawn(move || accept(listener.into(), &accept_queue, &accept_stopping, &stops))
        .map_err(|e| format!("cannot start the accept thread: {e}"))?;
    Ok(Server {
        queue,
        workers,
        stopping,
        addr,
    })
}

impl Server {
    /// Stops accepting, handles every request already received, lets the writer commit every write
    /// and sends the answers: nothing received before the stop is left unanswered.
    pub fn stop(self, writer: Writer) {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in &self.workers {
            self.queue.push(Item::Stop);
        }
        for worker in self.workers {
            if worker.join().is_err() {
                log::error!("a worker thread panicked");
            }
        }
        log::info!("workers stopped");
        writer.stop();
        while let Some(item) = self.queue.try_pop() {
            match item {
                Item::Answer(request, result, started) => send(request, result, started),
                Item::Request(request) => send(request, Err(shutting_down()), Instant::now()),
                Item::Stop => {}
            }
        }
    }
}

fn shutting_down() -> Error {
    Error::Unavailable("the server is shutting down".into())
}

fn accept(
    listener: tiny_http::Listener,
    queue: &Arc<Queue>,
    stopping: &Arc<AtomicBool>,
    stops: &Sender<Stop>,
) {
    let slots = Arc::new(Slots::default());
    let no_tls = match tiny_http::SslContextWrap::build_ssl_capabilities(None) {
        Ok(no_tls) => no_tls,
        Err(e) => {
            let _ = stops.send(Stop::Fatal(format!("cannot set up connections: {e}")));
            return;
        }
    };
    let mut backoff_ms = 0;
    while !stopping.load(Ordering::SeqCst) {
        let slot = Slots::acquire(&slots);
        match tiny_http::Server::accept_connection(&listener, &no_tls) {
            Ok(Some(connection)) => {
                backoff_ms = 0;
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let queue = queue.clone();
                let stopping = stopping.clone();
                let spawned = thread::Builder::new()
                    .name("kv-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        for parsed in connection {
                            match parsed {
                                Ok(request) if stopping.load(Ordering::SeqCst) => {
                                    send(request, Err(shutting_down()), Instant::now());
                                    return;
                                }
                                Ok(request) => queue.push(Item::Request(request)),
                                // tiny_http has answered a malformed request itself (400) or the client left.
                                Err(e) => log::debug!("connection ended: {e}"),
                            }
                        }
                    });
                if let Err(e) = spawned {
                    log::warn!("cannot start a connection thread, dropping the connection: {e}");
                }
            }
            Ok(None) => {}
            // The listener's read timeout (it exists for the accepted sockets to inherit) or a
            // client that gave up before we took it: nothing is wrong.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock
                        | ErrorKind::TimedOut
                        | ErrorKind::Interrupted
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                ) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::InvalidInput | ErrorKind::NotConnected | ErrorKind::Unsupported
                ) =>
            {
                let _ = stops.send(Stop::Fatal(format!("the listening socket failed: {e}")));
                return;
            }
            Err(e) => {
                // Out of file descriptors or memory: wait for connections to close instead of spinning.
                backoff_ms = (backoff_ms * 2).clamp(10, MAX_ACCEPT_BACKOFF_MS);
                log::warn!("cannot accept a connection ({e}); retrying in {backoff_ms} ms");
                thread::sleep(Duration::from_millis(backoff_ms));
            }
        }
    }
}

/// Handles one request: a read is answered now, a write is handed to the writer, which queues its
/// answer back once committed.
fn handle(
    mut request: tiny_http::Request,
    ctx: &Ctx<'_>,
    submitter: &Submitter,
    queue: &Arc<Queue>,
    max_body_bytes: usize,
) {
    let started = Instant::now();
    let method = match request.method() {
        tiny_http::Method::Get => Method::Get,
        tiny_http::Method::Head => Method::Head,
        tiny_http::Method::Put => Method::Put,
        tiny_http::Method::Post => Method::Post,
        tiny_http::Method::Delete => Method::Delete,
        _ => Method::Other,
    };
    let body = if matches!(method, Method::Put | Method::Post) {
        read_body(&mut request, max_body_bytes)
    } else {
        Ok(Vec::new())
    };
    if let Err(e @ (Error::TooLarge { .. } | Error::Timeout)) = body {
        // The body was left unread, and tiny_http reads and discards it when the request is
        // dropped, for as long as the client keeps sending. Do that off the worker, so a client
        // trickling a huge body cannot hold one. (One per connection at most: tiny_http reads
        // nothing more from a connection until then.)
        let drain = move || send(request, Err(e), started);
        if let Err(spawn) = thread::Builder::new().name("kv-drain".into()).spawn(drain) {
            log::warn!("cannot start a thread to answer an oversized request: {spawn}");
        }
        return;
    }
    let answer = body.and_then(|body| {
        let (path, query) = request.url().split_once('?').unwrap_or((request.url(), ""));
        let req = Req {
            method,
            path,
            query,
            body,
        };
        catch_unwind(AssertUnwindSafe(|| api::handle(&req, ctx)))
            .unwrap_or_else(|panic| Err(Error::from_panic(panic)))
    });
    match answer {
        Ok(Answer::Now(resp)) => send(request, Ok(resp), started),
        Err(e) => send(request, Err(e), started),
        Ok(Answer::AfterCommit(op, finish)) => {
            let queue = queue.clone();
            submitter.submit(
                op,
                Box::new(move |reply| {
                    let result = reply.and_then(finish);
                    queue.push(Item::Answer(request, result, started));
                }),
            );
        }
    }
}

/// Sends the answer to a request, and logs it.
fn send(request: tiny_http::Request, result: Result<Resp, Error>, started: Instant) {
    let path = request.url().split('?').next().unwrap_or("");
    let (status, body, allow) = match result {
        Ok(resp) => (resp.status, resp.body, None),
        Err(e) => {
            if e.status() >= 500 {
                log::error!("{} {path}: {e}", request.method());
            }
            let allow = match e {
                Error::MethodNotAllowed { allow } => Some(allow),
                _ => None,
            };
            (e.status(), e.body(), allow)
        }
    };
    let line = log::log_enabled!(log::Level::Debug)
        .then(|| format!("{} {path} {status}", request.method()));
    // The whole body is in memory, so always send its Content-Length; tiny_http would otherwise
    // switch to chunked encoding from 32 KiB on.
    let mut response = tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_chunked_threshold(usize::MAX);
    for (name, value) in [("Content-Type", Some("application/json")), ("Allow", allow)] {
        if let Some(header) = value.and_then(|v| tiny_http::Header::from_bytes(name, v).ok()) {
            response.add_header(header);
        }
    }
    let sent = request.respond(response);
    if let Some(line) = line {
        match sent {
            Ok(()) => log::debug!("{line} {:.1?}", started.elapsed()),
            Err(e) => log::debug!("{line}: could not send the response: {e}"),
        }
    }
}

/// Reads the body, refusing (413) one over the limit: from Content-Length before reading anything,
/// and for a chunked body after at most `limit + 1` bytes, so nothing unbounded is buffered.
fn read_body(request: &mut tiny_http::Request, limit: usize) -> Result<Vec<u8>, Error> {
    let too_large = || Error::TooLarge {
        code: "body_too_large",
        message: format!("the request body is larger than the limit of {limit} bytes"),
    };
    let declared = request.body_length();
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(MAX_BODY_PREALLOC_BYTES));
    request
        .as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout,
            _ => Error::bad_request("invalid_body", format!("cannot read the request body: {e}")),
        })?;
    if body.len() > limit {
        return Err(too_large());
    }
    Ok(body)
}
