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
//! reads. A write is handed to the single writer with its request, and its answer is sent once
//! the group holding it has committed (`deferred.rs`), while the connection thread goes back to
//! reading. So a write costs a thread wakeup or two per group and a read none, where a queue of
//! workers cost four and two per request; and a request that waits (for changes, for a slow
//! client) holds its own thread and nothing else.
//!
//! `conns.rs` keeps the registry of open connections that stops one client from holding them all
//! (the connection cap, the request-head deadline, and which connection to close for room);
//! `framing.rs` refuses requests whose end two parsers could see in two places; `cors.rs` holds the
//! CORS policy, which applies to every answer alike.

mod accept;
mod conns;
mod cors;
mod deferred;
mod framing;
mod send;

use std::cell::RefCell;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use crate::api::{self, Answer, Ctx, Handled, Method, Req};
use crate::auth::Auth;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::space::Space;
use crate::store::backup::TempFile;
use crate::store::{Database, Pool};
use crate::watch::Watch;
use crate::writer::{Submitter, Writer};
use accept::{accept, listen, max_connections};
use conns::{Conn, Conns};
use cors::Cors;
use deferred::{Latch, answer_after_commit};
use send::{Extra, response, send, send_no_content, send_stream, write_closing};

/// Largest buffer reserved up front from a declared Content-Length; bigger bodies grow as they arrive.
const MAX_BODY_PREALLOC_BYTES: usize = 1024 * 1024;
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
    /// Sends the answers to writes once they have committed.
    answerer: Arc<deferred::Answerer>,
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

/// What the requests share besides the database and the writer.
pub struct Services {
    pub watch: Arc<Watch>,
    pub metrics: Arc<Metrics>,
    pub space: Arc<Space>,
    pub auth: Arc<Auth>,
}

/// Binds, opens the read connections to `database` and starts the accept thread.
pub fn serve(
    config: &Config,
    database: &Database,
    writer: &Writer,
    services: Services,
    stops: Sender<Stop>,
) -> Result<Server, String> {
    let listener = listen(config)?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let pool = Pool::open(database, config.workers, writer.reads())
        .map_err(|e| format!("cannot open {database}: {e}"))?;
    let Services {
        watch,
        metrics,
        space,
        auth,
    } = services;
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
        answerer: deferred::Answerer::start()
            .map_err(|e| format!("cannot start the answering thread: {e}"))?,
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

/// Runs one connection's requests in order, until the client leaves, kv closes it, or kv stops.
fn serve_connection(
    mut connection: tiny_http::ClientConnection,
    conn: &Conn,
    shared: &Arc<Shared>,
) {
    shared
        .metrics
        .open_connections
        .fetch_add(1, Ordering::Relaxed);
    let _open = OpenConnection(&shared.metrics);
    // Set while this connection's last request still waits for its answer to be sent.
    let owed = Arc::new(Latch::default());
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
            Some(Err(e)) => {
                owed.wait();
                return answer_unreadable(&e, conn);
            }
            None => return,
        };
        // A pipelined request waits for the answer before it (usually sent already).
        owed.wait();
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
        if !handle(request, shared, extra, conn, &owed) || !conn.idle() {
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

/// Handles one request: reads its body, runs it, answers (most answers to writes go out after the
/// commit, from `deferred.rs`). Returns false when the connection must close (after a stream, or a
/// body that cannot be read).
fn handle(
    mut request: tiny_http::Request,
    shared: &Arc<Shared>,
    mut extra: Extra,
    conn: &Conn,
    owed: &Arc<Latch>,
) -> bool {
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
        Ok(Answer::AfterCommit(op, finish)) if deferred::suits(&op, &extra) => {
            answer_after_commit(request, op, finish, extra, shared, conn, owed);
            return true;
        }
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
