//! The HTTP side: the listening socket and its options, the connection threads, the translation
//! between tiny_http and the API's `Req`/`Resp`, the body limit, the access log and the orderly stop.
//!
//! We run tiny_http's connection handling ourselves instead of through `tiny_http::Server`, because
//! its server cannot do two things kv needs: (1) its accept loop treats the timeout of a listener
//! with `SO_RCVTIMEO` as fatal, yet that option on the listener is the only way to give every
//! accepted socket a read timeout; (2) its connection pool queues a new connection behind busy
//! threads when many arrive at once (measured: 6 of 300 connections got no answer for 30 s).
//!
//! One accept thread takes connections, and each connection gets its own thread (with a small
//! stack), which parses its requests with tiny_http and runs them itself: HTTP/1.1
//! without pipelining has one request in flight per connection, so that thread would be idle
//! anyway. A read takes one of `workers` SQLite read connections from a pool for as long as it
//! reads. A write is handed to the single writer, and the connection thread sleeps until the
//! group holding it has committed, then sends the answer. So a write costs two thread wakeups (to
//! the writer and back) and a read none, where a queue of workers cost four and two; and a request
//! that waits (for a commit, for changes, for a slow client) holds its own thread and nothing else.
//!
//! `conns.rs` keeps the registry of open connections that stops one client from holding them all
//! (the connection cap, the request-head deadline, and which connection to close for room);
//! `framing.rs` refuses requests whose end two parsers could see in two places; `cors.rs` holds the
//! CORS policy, which applies to every answer alike.

mod conns;
mod cors;
mod framing;

use std::cell::RefCell;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::api::{self, Answer, Ctx, Handled, Method, Req, Resp, Stream};
use crate::auth::Auth;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::{self, Metrics};
use crate::space::Space;
use crate::store::Pool;
use crate::store::backup::TempFile;
use crate::watch::Watch;
use crate::writer::{Submitter, Writer};
use conns::{Conn, Conns};
use cors::Cors;

/// Pending connections the kernel keeps before refusing new ones.
const LISTEN_BACKLOG: i32 = 1024;
/// Stack of a connection thread. The request path needs far less (see README, Concurrency); a
/// small stack keeps thousands of open connections cheap in address space.
const CONNECTION_STACK_BYTES: usize = 256 * 1024;
/// File descriptors per open connection: tiny_http's reading and writing halves, and the clone
/// kv keeps to close it.
const FDS_PER_CONNECTION: u64 = 3;
/// File descriptors kept for everything else (the database files of every SQLite connection, the
/// listener, logs); the connection cap leaves them free.
const FDS_RESERVED: u64 = 256;
/// How long the accept thread waits for a connection it closed for room to end, before it looks
/// for another (the wait ends as soon as one does).
const ROOM_WAIT_MS: u64 = 100;
/// Least time between two warnings that the connection cap is reached.
const CAP_WARNING_SECS: u64 = 60;
/// Largest buffer reserved up front from a declared Content-Length; bigger bodies grow as they arrive.
const MAX_BODY_PREALLOC_BYTES: usize = 1024 * 1024;
/// Longest pause after a failed accept (out of file descriptors, say), so errors cannot spin.
const MAX_ACCEPT_BACKOFF_MS: u64 = 1000;
/// How long a stop waits for the requests in flight to be answered.
const STOP_GRACE_SECS: u64 = 10;

/// Why the server should stop.
#[derive(Debug)]
pub enum Stop {
    /// SIGINT or SIGTERM: stop gracefully, exit 0.
    Signal,
    /// The listening socket failed for good: stop, exit non-zero.
    Fatal(String),
}

/// A running server: what its connection threads share.
pub struct Server {
    shared: Arc<Shared>,
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
}

/// Everything a connection thread needs to run requests.
struct Shared {
    pool: Pool,
    watch: Arc<Watch>,
    metrics: Arc<Metrics>,
    space: Arc<Space>,
    auth: Arc<Auth>,
    cors: Cors,
    submitter: Submitter,
    max_body_bytes: usize,
    max_batch_ops: usize,
    max_import_bytes: u64,
    /// Where uploads too large for memory are spooled (the data directory).
    spool_dir: PathBuf,
    stopping: AtomicBool,
    /// Requests received and not yet answered; a stop waits for it to reach zero.
    in_flight: AtomicUsize,
    /// The open connections.
    conns: Arc<Conns>,
}

/// Counts a connection as open until dropped.
struct OpenConnection<'a>(&'a Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one request as in flight until dropped, however its handling ends.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> InFlight<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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

/// Binds, opens the read connections and starts the accept thread.
pub fn serve(
    config: &Config,
    writer: &Writer,
    watch: Arc<Watch>,
    metrics: Arc<Metrics>,
    space: Arc<Space>,
    auth: Arc<Auth>,
    stops: Sender<Stop>,
) -> Result<Server, String> {
    let listener = listen(config)?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let pool = Pool::open(&config.db_file(), config.sync, config.workers)
        .map_err(|e| format!("cannot open {}: {e}", config.db_file().display()))?;
    let max = max_connections(config.max_connections);
    let header_timeout = Duration::from_secs(config.header_timeout_secs);
    let conns = Conns::start(max, header_timeout)
        .map_err(|e| format!("cannot start the reaper thread: {e}"))?;
    let shared = Arc::new(Shared {
        pool,
        watch,
        metrics,
        space,
        auth,
        cors: Cors::new(&config.cors_origins),
        submitter: writer.submitter(),
        max_body_bytes: config.max_body_bytes,
        max_batch_ops: config.max_batch_ops,
        max_import_bytes: config.max_import_bytes,
        spool_dir: config.db_path.clone(),
        stopping: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        conns,
    });
    let accept_shared = shared.clone();
    thread::Builder::new()
        .name("kv-accept".into())
        .spawn(move || accept(&listener, &accept_shared, &stops))
        .map_err(|e| format!("cannot start the accept thread: {e}"))?;
    Ok(Server { shared, addr })
}

impl Server {
    /// Stops accepting, waits until every request already received has been answered (the
    /// writer still commits meanwhile), then stops the writer: nothing received before the stop
    /// is left unanswered, and a request that arrives after it gets a 503.
    pub fn stop(self, writer: Writer) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Long-polls answer now with what they have, and streams end.
        self.shared.watch.stop();
        // Connections waiting for a request end now rather than at their timeout.
        self.shared.conns.close_waiting();
        let deadline = Instant::now() + Duration::from_secs(STOP_GRACE_SECS);
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                log::warn!("stopping with requests still unanswered after {STOP_GRACE_SECS} s");
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        log::info!("requests answered");
        writer.stop();
    }
}

fn shutting_down() -> Error {
    Error::Unavailable("the server is shutting down".into())
}

/// The connection cap: `KV_MAX_CONNECTIONS`, or fewer if the file descriptor limit (raised to its
/// hard limit first) leaves room for fewer. Logs what it decided.
fn max_connections(wanted: usize) -> usize {
    let fds = match conns::raise_fd_limit() {
        Ok((fds, Some(before))) => {
            log::info!("raised the open files limit from {before} to {fds}");
            fds
        }
        Ok((fds, None)) => fds,
        Err(e) => {
            log::warn!("cannot read or raise the open files limit: {e}");
            return wanted;
        }
    };
    let room = fds.saturating_sub(FDS_RESERVED) / FDS_PER_CONNECTION;
    let max = wanted
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .max(1);
    // Information, not a warning: the cap still protects kv, it is only lower than asked.
    if max < wanted {
        log::info!(
            "at most {max} connections, not {wanted} (KV_MAX_CONNECTIONS): the open files limit \
             is {fds} and each connection takes {FDS_PER_CONNECTION} (LimitNOFILE, ulimit -n)"
        );
    } else {
        log::info!("at most {max} connections (open files limit {fds})");
    }
    max
}

/// Takes connections and starts a thread for each. When one more than the cap are open, makes room
/// before taking the next (see conns.rs); if every connection has a request in progress, the next
/// ones wait in the kernel's backlog until one ends.
fn accept(listener: &TcpListener, shared: &Arc<Shared>, stops: &Sender<Stop>) {
    let conns = &shared.conns;
    let mut backoff_ms = 0;
    let mut warned: Option<Instant> = None;
    while !shared.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                backoff_ms = 0;
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Some(newcomer) = start_connection(stream, shared) else {
                    continue;
                };
                while conns.count() > conns.max && !shared.stopping.load(Ordering::SeqCst) {
                    // Once a minute at most: under a flood this would be every connection.
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(CAP_WARNING_SECS))
                    {
                        log::warn!(
                            "{} connections are open, the most allowed (KV_MAX_CONNECTIONS): \
                             closing those that have waited longest for a request",
                            conns.max
                        );
                        warned = Some(Instant::now());
                    }
                    conns.make_room(&newcomer);
                    conns.wait_for_room(Duration::from_millis(ROOM_WAIT_MS));
                }
            }
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

/// Registers an accepted connection and starts its thread; on failure the connection is closed.
/// Returns the connection, for the accept thread to tell it from those it may close for room.
fn start_connection(stream: TcpStream, shared: &Arc<Shared>) -> Option<Arc<Conn>> {
    let conn = match stream.try_clone() {
        Ok(handle) => Arc::new(shared.conns.open(handle)),
        Err(e) => {
            log::warn!("cannot keep a handle on a new connection ({e}); closing it");
            return None;
        }
    };
    let (ours, shared) = (conn.clone(), shared.clone());
    let connection = tiny_http::ClientConnection::from_tcp(stream).without_error_answers();
    let spawned = thread::Builder::new()
        .name("kv-conn".into())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || serve_connection(connection, &conn, &shared));
    match spawned {
        Ok(_) => Some(ours),
        Err(e) => {
            log::warn!("cannot start a connection thread ({e}); closing the connection");
            None
        }
    }
}

/// Runs one connection's requests in order, until the client leaves, kv closes it, or kv stops.
fn serve_connection(mut connection: tiny_http::ClientConnection, conn: &Conn, shared: &Shared) {
    shared
        .metrics
        .open_connections
        .fetch_add(1, Ordering::Relaxed);
    let _open = OpenConnection(&shared.metrics);
    loop {
        // Idle (since it was accepted, or since the last answer) until the first byte of the next
        // request; the socket's read timeout (KV_IO_TIMEOUT_SECS) ends a long wait, and kv may
        // close it for room.
        match connection.wait_for_request() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::debug!("connection idle too long or gone: {e}");
                return;
            }
        }
        // A request head is arriving: the reaper gives it KV_HEADER_TIMEOUT_SECS.
        if !conn.head() {
            return;
        }
        let request = match connection.next() {
            Some(Ok(request)) => request,
            Some(Err(e)) => return answer_unreadable(&e, conn),
            None => return,
        };
        // Counted before the stop flag is read: a stop either waits for this request or this
        // request sees the flag (both are SeqCst).
        let _in_flight = InFlight::enter(&shared.in_flight);
        let header = |name| request.headers().get(name).map(|v| v.as_str());
        let origin = header("Origin");
        let mut extra = Extra {
            cors: shared.cors.simple(origin),
            who: None,
            started: Instant::now(),
            close: false,
        };
        if !conn.busy() {
            // The head came in as its deadline passed: answered, but too late to be served.
            extra.close = true;
            send(request, Err(head_too_slow()), &extra, &shared.metrics);
            return;
        }
        if shared.stopping.load(Ordering::SeqCst) {
            extra.close = true;
            send(request, Err(shutting_down()), &extra, &shared.metrics);
            return;
        }
        let version = request.http_version();
        let lines = request.headers().iter();
        let framing = lines.map(|h| (h.field.as_str().as_str(), h.value.as_str()));
        if let Err(e) = framing::check((version.0, version.1), framing) {
            // Nothing of its body is read: it may be the start of a smuggled request.
            extra.close = true;
            stop_reading(conn);
            send(request, Err(e), &extra, &shared.metrics);
            return;
        }
        let options = request.method() == &tiny_http::Method::Options;
        let asks = header("Access-Control-Request-Method").is_some();
        if shared.cors.is_preflight(options, origin, asks) {
            extra.cors = shared.cors.preflight(origin);
            if !send_no_content(request, &extra) || !conn.idle() {
                return;
            }
            continue;
        }
        if !handle(request, shared, extra, conn) || !conn.idle() {
            return;
        }
    }
}

/// Ends the reading side of a connection whose request kv will answer and then close, so that
/// tiny_http does not read and discard the rest of its body first.
fn stop_reading(conn: &Conn) {
    if let Err(e) = conn.socket().shutdown(Shutdown::Read) {
        log::debug!("closing the reading side: {e}");
    }
}

fn head_too_slow() -> Error {
    Error::Timeout("the request head did not arrive in time (KV_HEADER_TIMEOUT_SECS)")
}

/// Answers a request that could not be read, on the connection's own socket (tiny_http leaves
/// that to kv), and ends the connection: after an unreadable request nothing can tell where the
/// next one would start.
fn answer_unreadable(e: &tiny_http::ReadError, conn: &Conn) {
    use tiny_http::ReadError;
    let error = match e {
        // kv closed it: the head deadline passed, or another client needed the room.
        _ if conn.is_closed() => head_too_slow(),
        ReadError::ReadIoError(io)
            if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
        {
            Error::Timeout("the client stopped sending its request (KV_IO_TIMEOUT_SECS)")
        }
        // The client closed the connection or reset it: nobody to answer.
        ReadError::ReadIoError(io) => {
            log::debug!("connection ended mid-request: {io}");
            return;
        }
        ReadError::ExpectationFailed(_) => Error::ExpectationFailed,
        ReadError::UnsupportedVersion(_) => Error::VersionNotSupported,
        ReadError::InvalidFraming => Error::bad_request(
            "invalid_framing",
            "Transfer-Encoding must be chunked alone, without Content-Length",
        ),
        ReadError::WrongRequestLine
        | ReadError::WrongHeader(_)
        | ReadError::ProtocolViolation(_) => Error::bad_request(
            "invalid_request",
            "the request line or a header is malformed",
        ),
    };
    log::debug!("unreadable request ({e}): {}", error.status());
    let response = response(error.status(), error.body(), &[]);
    if let Err(e) = write_closing(&mut conn.socket(), response, false) {
        log::debug!("could not answer an unreadable request: {e}");
    }
}

/// Writes a response that ends its connection, saying so with `Connection: close` (RFC 9112 §9.6),
/// a header tiny_http refuses to add itself.
fn write_closing(
    out: &mut dyn Write,
    response: tiny_http::Response<std::io::Cursor<Vec<u8>>>,
    head_only: bool,
) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    response.raw_print(
        &mut bytes,
        tiny_http::HTTPVersion(1, 1),
        None,
        head_only,
        None,
    )?;
    let after_status_line = bytes
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(0, |i| i + 2);
    bytes.splice(
        after_status_line..after_status_line,
        b"Connection: close\r\n".iter().copied(),
    );
    out.write_all(&bytes)?;
    out.flush()
}

/// A complete response with a JSON body (always with its Content-Length: tiny_http would switch
/// to chunked encoding from 32 KiB on) and these headers.
fn response(
    status: u16,
    body: String,
    headers: &[(&'static str, String)],
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let mut response = tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_chunked_threshold(usize::MAX);
    // JSON unless the answer says otherwise.
    let json = (!headers.iter().any(|(name, _)| *name == "Content-Type"))
        .then_some(("Content-Type", "application/json"));
    let more = headers.iter().map(|(n, v)| (*n, v.as_str()));
    for (name, value) in json.into_iter().chain(more) {
        if let Ok(header) = tiny_http::Header::from_bytes(name, value) {
            response.add_header(header);
        }
    }
    response
}

/// What every answer to a request carries and logs besides its own status, body and headers.
struct Extra {
    /// CORS headers for the request's `Origin`.
    cors: cors::Headers,
    /// The name of the request's token, for the access line.
    who: Option<String>,
    started: Instant,
    /// The connection ends after this answer, which then says `Connection: close`.
    close: bool,
}

/// Handles one request: reads its body, runs it, waits for the commit of a write, answers.
/// Returns false when the connection must close (after a stream, or a body that cannot be read).
fn handle(mut request: tiny_http::Request, shared: &Shared, mut extra: Extra, conn: &Conn) -> bool {
    let method = match request.method() {
        tiny_http::Method::Get => Method::Get,
        tiny_http::Method::Head => Method::Head,
        tiny_http::Method::Put => Method::Put,
        tiny_http::Method::Post => Method::Post,
        tiny_http::Method::Delete => Method::Delete,
        _ => Method::Other,
    };
    let import = method == Method::Post && request.url().split('?').next() == Some("/import");
    let mut upload = None;
    let body = if import {
        spool_body(&mut request, shared.max_import_bytes, &shared.spool_dir).map(|file| {
            upload = Some(file);
            Vec::new()
        })
    } else if matches!(method, Method::Put | Method::Post) {
        read_body(&mut request, shared.max_body_bytes)
    } else {
        Ok(Vec::new())
    };
    match &body {
        // A body that stopped or ended short: where the next request would start is unknown.
        Err(Error::Timeout(_) | Error::BadRequest { .. }) => {
            extra.close = true;
            stop_reading(conn);
        }
        // Too large: with a Content-Length, tiny_http reads and discards the rest when the
        // request is dropped, and the connection serves on; the client may have more to send
        // before it reads the 413, so closing now could lose it. That rest holds no request, so
        // the connection may be closed for room meanwhile. A chunked body is not discarded, so
        // its connection ends.
        Err(Error::TooLarge { .. }) => {
            conn.idle();
            if request.body_length().is_none() {
                extra.close = true;
            }
        }
        _ => {}
    }
    let ctx = Ctx {
        pool: &shared.pool,
        watch: &shared.watch,
        metrics: &shared.metrics,
        space: &shared.space,
        stopping: &shared.stopping,
        auth: &shared.auth,
        max_batch_ops: shared.max_batch_ops,
    };
    // A refused body is left unread; tiny_http reads and discards the rest when the request is
    // dropped, on this connection's own thread, so a client trickling a huge body holds nothing
    // that other clients need.
    let handled = body.map(|body| {
        let target = framing::origin_form(request.url());
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        // Every line of the headers the API reads (several lines of one are one list).
        let headers = request
            .headers()
            .iter()
            .filter_map(|header| {
                let name = api::HEADERS.iter().find(|name| header.field.equiv(name))?;
                Some((*name, header.value.as_str()))
            })
            .collect();
        let req = Req {
            method,
            path,
            query,
            headers,
            body,
            upload: RefCell::new(upload),
        };
        catch_unwind(AssertUnwindSafe(|| api::handle(&req, &ctx))).unwrap_or_else(|panic| Handled {
            who: None,
            answer: Err(Error::from_panic(panic)),
        })
    });
    let (who, answer) = match handled {
        Ok(Handled { who, answer }) => (who, answer),
        Err(e) => (None, Err(e)),
    };
    // The access line names the token's entry, never the token.
    extra.who = who.as_ref().and_then(|who| who.name()).map(str::to_string);
    let result = match answer {
        Ok(Answer::Now(resp)) => Ok(resp),
        Err(e) => Err(e),
        Ok(Answer::AfterCommit(op, finish)) => shared.submitter.write(op).and_then(finish),
        Ok(Answer::Stream(stream)) => {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| {
                send_stream(request, stream, &extra, &shared.metrics)
            })) {
                log::error!("a stream {}", Error::from_panic(panic));
            }
            return false;
        }
    };
    send(request, result, &extra, &shared.metrics);
    true
}

/// ` (token NAME)` for the access line of a request with a named token, else nothing.
fn by(who: Option<&str>) -> String {
    who.map(|name| format!(" (token {name})"))
        .unwrap_or_default()
}

/// Answers a CORS preflight: 204 with the CORS headers and nothing else. Written by hand, because
/// tiny_http would add a `Content-Length`, which a 204 must not carry (RFC 9110 §8.6). Returns
/// whether the connection can go on.
fn send_no_content(request: tiny_http::Request, extra: &Extra) -> bool {
    let line = format!("{} {} 204", request.method(), path_of(request.url()));
    let mut head = String::from("HTTP/1.1 204 No Content\r\n");
    for (name, value) in &extra.cors {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = request.into_writer();
    match out.write_all(head.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {
            log::debug!("{line} {:.1?}", extra.started.elapsed());
            true
        }
        Err(e) => {
            log::debug!("{line}: could not send the response: {e}");
            false
        }
    }
}

/// The path of a request target, without its query (and scheme and host, in absolute form).
fn path_of(url: &str) -> &str {
    framing::origin_form(url).split('?').next().unwrap_or("")
}

/// Sends the answer to a request, and logs it (with the name of its token).
fn send(
    request: tiny_http::Request,
    result: Result<Resp, Error>,
    extra: &Extra,
    metrics: &Metrics,
) {
    let path = path_of(request.url());
    let (status, body, headers) = match result {
        Ok(resp) => (resp.status, resp.body, resp.headers),
        Err(e) => {
            if matches!(e, Error::Storage(_)) {
                metrics.storage_error();
            }
            let client_side = matches!(
                e,
                Error::TooManyWaiters
                    | Error::VersionNotSupported
                    | Error::TransferCodingNotSupported
            );
            if e.status() >= 500 && !client_side {
                log::error!("{} {path}: {e}", request.method());
            }
            let headers = e
                .headers()
                .map(|(name, value)| vec![(name, value.to_string())])
                .unwrap_or_default();
            (e.status(), e.body(), headers)
        }
    };
    let who = by(extra.who.as_deref());
    let line = log::log_enabled!(log::Level::Debug)
        .then(|| format!("{} {path} {status}{who}", request.method()));
    let mut headers = headers;
    headers.extend_from_slice(&extra.cors);
    let response = response(status, body, &headers);
    let (method, route) = (
        metrics::method_of(request.method().as_str()),
        metrics::route_of(path),
    );
    // Counted before sending, so a client that reads /metrics after its answer sees it counted.
    metrics.request(method, route, status, extra.started.elapsed());
    let sent = if extra.close {
        let head_only = request.method() == &tiny_http::Method::Head;
        write_closing(&mut *request.into_writer(), response, head_only)
    } else {
        request.respond(response)
    };
    if let Some(line) = line {
        match sent {
            Ok(()) => log::debug!("{line} {:.1?}", extra.started.elapsed()),
            Err(e) => log::debug!("{line}: could not send the response: {e}"),
        }
    }
}

/// Sends a streamed answer: the head, then the body in chunks as the stream writes it, flushed
/// whenever the stream flushes. Returns when the stream ends or the client has gone.
fn send_stream(request: tiny_http::Request, stream: Stream<'_>, extra: &Extra, metrics: &Metrics) {
    let path = path_of(request.url()).to_string();
    let method = request.method().clone();
    let labels = (
        metrics::method_of(method.as_str()),
        metrics::route_of(&path),
    );
    let head_only = method == tiny_http::Method::Head;
    let mut head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n",
        stream.content_type
    );
    for (name, value) in stream.headers.iter().chain(&extra.cors) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = request.into_writer();
    let sent = out
        .write_all(head.as_bytes())
        .and_then(|()| out.flush())
        .and_then(|()| {
            if head_only {
                return Ok(());
            }
            (stream.body)(&mut Chunked(&mut *out))?;
            out.write_all(b"0\r\n\r\n")?;
            out.flush()
        });
    metrics.request(labels.0, labels.1, 200, extra.started.elapsed());
    let who = by(extra.who.as_deref());
    match sent {
        Ok(()) => log::debug!(
            "{method} {path} 200{who} (stream) {:.1?}",
            extra.started.elapsed()
        ),
        Err(e) => log::debug!("{method} {path} 200{who} (stream) ended: {e}"),
    }
}

/// Chunked transfer encoding (RFC 9112 §7.1): each write is one chunk.
struct Chunked<'a>(&'a mut dyn Write);

impl Write for Chunked<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.0, "{:x}\r\n", buf.len())?;
        self.0.write_all(buf)?;
        self.0.write_all(b"\r\n")?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Writes the body to a temporary file in `dir`, refusing (413) one over `limit` bytes, from
/// Content-Length before reading anything and for a chunked body once it passes the limit.
fn spool_body(request: &mut tiny_http::Request, limit: u64, dir: &Path) -> Result<TempFile, Error> {
    let too_large = || Error::TooLarge {
        code: "body_too_large",
        message: format!(
            "the import is larger than the limit of {limit} bytes (KV_MAX_IMPORT_BYTES)"
        ),
    };
    if request.body_length().is_some_and(|n| n as u64 > limit) {
        return Err(too_large());
    }
    let spool = TempFile::new_in(dir, "kv-import");
    let cannot = |e: std::io::Error| Error::Internal(format!("cannot spool the import: {e}"));
    let mut file = std::io::BufWriter::new(File::create(spool.path()).map_err(cannot)?);
    let copied =
        std::io::copy(&mut request.as_reader().take(limit + 1), &mut file).map_err(|e| match e
            .kind()
        {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                Error::Timeout("the client stopped sending its import (KV_IO_TIMEOUT_SECS)")
            }
            _ => Error::bad_request("invalid_body", format!("cannot read the request body: {e}")),
        })?;
    if copied > limit {
        return Err(too_large());
    }
    file.flush().map_err(cannot)?;
    Ok(spool)
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
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                Error::Timeout("the client stopped sending its request body (KV_IO_TIMEOUT_SECS)")
            }
            _ => Error::bad_request("invalid_body", format!("cannot read the request body: {e}")),
        })?;
    if body.len() > limit {
        return Err(too_large());
    }
    // tiny_http takes the end of the stream for the end of the body.
    if declared.is_some_and(|n| body.len() < n) {
        return Err(Error::bad_request(
            "invalid_framing",
            format!(
                "the connection ended after {} of the {} bytes of Content-Length",
                body.len(),
                declared.unwrap_or(0)
            ),
        ));
    }
    Ok(body)
}
