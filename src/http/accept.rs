//! Taking connections: the listening socket and the options every accepted socket inherits, the
//! connection cap (and the file descriptors it needs), and the accept thread that starts a thread
//! per connection and makes room when the cap is reached.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::conns::{self, Conn};
use super::{Shared, Stop, serve_connection};
use crate::config::Config;

/// Pending connections the kernel keeps before refusing new ones.
const LISTEN_BACKLOG: i32 = 1024;
/// Stack of a connection thread. The request path needs far less (see README, Concurrency); a
/// small stack keeps thousands of open connections cheap in address space.
pub(super) const CONNECTION_STACK_BYTES: usize = 256 * 1024;
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
/// Longest pause after a failed accept (out of file descriptors, say), so errors cannot spin.
const MAX_ACCEPT_BACKOFF_MS: u64 = 1000;

/// Binds the listening socket with the options every accepted socket inherits: TCP_NODELAY (so a
/// response's separate header and body writes do not wait ~40 ms for a delayed ACK) and read/write
/// timeouts (so idle and stalled clients are closed).
pub(super) fn listen(config: &Config) -> Result<TcpListener, String> {
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

/// The connection cap: `KV_MAX_CONNECTIONS`, or fewer if the file descriptor limit (raised to its
/// hard limit first) leaves room for fewer. Logs what it decided.
pub(super) fn max_connections(wanted: usize) -> usize {
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
pub(super) fn accept(listener: &TcpListener, shared: &Arc<Shared>, stops: &Sender<Stop>) {
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
pub(super) fn start_connection(stream: TcpStream, shared: &Arc<Shared>) -> Option<Arc<Conn>> {
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
