//! Answers to writes, sent once the write they answer has committed, without the connection
//! thread waiting for them.
//!
//! A connection thread that waited for its write's commit cost two thread switches per write: it
//! slept until the writer woke it, only to send a few hundred bytes and go back to reading its
//! connection. Instead, it hands the request to the writer along with the write and goes straight
//! back to reading. After COMMIT (never before: a 200 still means the write is durable) the writer
//! passes the group's answers to one answering thread, waking it at most once per group, and goes
//! on to the next group; the answering thread sends them. Measured in README "Concurrency".
//!
//! The answering thread must never wait for a client, or one client that stops reading would
//! hold every other write's answer. It sends an answer only when the answer is small and the
//! socket's send queue is empty (the client has acknowledged every earlier byte), so the send
//! cannot block; any other answer is sent by a short-lived thread of its own. A connection starts
//! its next request only once the answer before it has been sent, so answers stay in order and a
//! pipelined read sees the write before it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use super::accept::CONNECTION_STACK_BYTES;
use super::conns::SharedSocket;
use super::send::{Extra, send};
use super::{Conn, Shared};
use crate::api::{Finish, Resp};
use crate::error::Error;
use crate::writer::Op;

/// Largest answer the answering thread sends itself: well under the smallest send buffer Linux
/// gives a socket (4608 bytes), so that, into an empty send queue, the send cannot block.
const MAX_INLINE_ANSWER_BYTES: usize = 2048;
/// Room for the status line and the headers every answer carries (Server, Date, Content-Type,
/// Content-Length).
const HEAD_BYTES: usize = 256;

/// Whether a connection still owes an answer; its thread waits on it before its next request.
#[derive(Default)]
pub(super) struct Latch {
    state: Mutex<LatchState>,
    sent: Condvar,
}

#[derive(Default)]
struct LatchState {
    owed: bool,
    waiting: bool,
}

impl Latch {
    /// Waits until the answer owed (if any) has been sent.
    pub(super) fn wait(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.owed {
            state.waiting = true;
            state = self.sent.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting = false;
    }

    fn owe(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).owed = true;
    }

    fn settle(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.owed = false;
        // Usually nobody waits: the client reads this answer before it sends another request.
        if state.waiting {
            self.sent.notify_all();
        }
    }
}

/// An answer still to be sent. However it ends (sent, or dropped on a panic), the connection is
/// released and the request stops counting as in flight.
struct Owed {
    request: Option<tiny_http::Request>,
    extra: Extra,
    shared: Arc<Shared>,
    latch: Arc<Latch>,
    socket: SharedSocket,
}

impl Owed {
    fn send(mut self, result: Result<Resp, Error>) {
        if let Some(request) = self.request.take() {
            send(request, result, &self.extra, &self.shared.metrics);
        }
    }

    /// True if this answer can go out now without any chance of blocking.
    fn fits(&self, result: &Result<Resp, Error>) -> bool {
        let headers =
            |h: &[(&str, String)]| -> usize { h.iter().map(|(n, v)| n.len() + v.len() + 4).sum() };
        let bytes = HEAD_BYTES
            + headers(&self.extra.cors)
            + match result {
                Ok(resp) => resp.body.len() + headers(&resp.headers),
                Err(e) => e.body().len() + 64,
            };
        bytes <= MAX_INLINE_ANSWER_BYTES && unsent_bytes(self.socket.get()) == Some(0)
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        self.latch.settle();
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether this write's answer goes out after its commit without its connection thread waiting.
/// Not a batch's: its answer holds the values its reads found, of any size, and would often need a
/// thread started for it alone, so its connection thread waits and sends it. Nor an answer that
/// ends its connection, nor any on a system where kv cannot read a socket's send queue.
pub(super) fn suits(op: &Op, extra: &Extra) -> bool {
    cfg!(target_os = "linux") && !extra.close && !matches!(op, Op::Batch(_))
}

/// Hands a write to the writer together with its request, whose answer goes out after the
/// commit. The connection's thread may go on reading as soon as this returns.
pub(super) fn answer_after_commit(
    mut request: tiny_http::Request,
    op: Op,
    finish: Finish,
    extra: Extra,
    shared: &Arc<Shared>,
    conn: &Conn,
    latch: &Arc<Latch>,
) {
    if let Err(e) = request.release_body() {
        log::debug!("reading the rest of a request body: {e}");
    }
    latch.owe();
    // Counted before the connection's own count of this request ends, so a stop waits for it.
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let owed = Owed {
        request: Some(request),
        extra,
        shared: Arc::clone(shared),
        latch: Arc::clone(latch),
        socket: conn.shared_socket(),
    };
    shared.submitter.submit(
        op,
        Box::new(move |reply| {
            let result = reply.and_then(finish);
            let answerer = Arc::clone(&owed.shared.answerer);
            answerer.push(owed, result);
        }),
    );
}

/// The thread that sends the answers of each committed group, so that the writer goes on to the
/// next group at once: sending is about a third of the work of a write, and a workload bound by
/// the writer (deletes scattered over a large table) lost up to 17 % of its throughput when the
/// writer sent the answers itself. The writer wakes it at most once per group.
#[derive(Default)]
pub(super) struct Answerer {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    answers: Vec<(Owed, Result<Resp, Error>)>,
    asleep: bool,
}

impl Answerer {
    /// Starts the thread; it lives as long as the process (every answer it is handed counts as
    /// in flight, so a stop waits for it to send them).
    pub(super) fn start() -> std::io::Result<Arc<Answerer>> {
        let answerer = Arc::new(Answerer::default());
        let ours = Arc::clone(&answerer);
        thread::Builder::new()
            .name("kv-answers".into())
            .spawn(move || ours.run())?;
        Ok(answerer)
    }

    fn push(&self, owed: Owed, result: Result<Resp, Error>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.answers.push((owed, result));
        if queue.asleep {
            queue.asleep = false;
            self.ready.notify_one();
        }
    }

    fn run(&self) {
        let mut sending = Vec::new();
        loop {
            {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                while queue.answers.is_empty() {
                    queue.asleep = true;
                    queue = self.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                std::mem::swap(&mut queue.answers, &mut sending);
            }
            for (owed, result) in sending.drain(..) {
                if owed.fits(&result) {
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| owed.send(result))) {
                        log::error!("sending an answer {}", Error::from_panic(panic));
                    }
                } else {
                    send_aside(owed, result);
                }
            }
        }
    }
}

/// Sends an answer that could block on a thread of its own, never on the answering thread.
fn send_aside(owed: Owed, result: Result<Resp, Error>) {
    log::debug!("an answer waits for its client to read earlier ones: sent by a thread of its own");
    let handoff = Arc::new(Mutex::new(Some((owed, result))));
    let taken = Arc::clone(&handoff);
    // A thread per connection at most (the connection waits for this answer), with a connection
    // thread's small stack: sending an answer needs less than serving the request did.
    let spawned = thread::Builder::new()
        .name("kv-answer".into())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || {
            if let Some((owed, result)) = taken.lock().unwrap_or_else(|e| e.into_inner()).take() {
                owed.send(result);
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start a thread to send an answer ({e}); sending it here");
        if let Some((owed, result)) = handoff.lock().unwrap_or_else(|e| e.into_inner()).take() {
            owed.send(result);
        }
    }
}

/// Bytes the socket has yet to send or have acknowledged (`SIOCOUTQ`), if the system says.
#[cfg(target_os = "linux")]
fn unsent_bytes(socket: &std::net::TcpStream) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut unsent: libc::c_int = 0;
    // SIOCOUTQ is TIOCOUTQ's number on sockets. SAFETY: the ioctl writes one int into `unsent`,
    // and the descriptor stays open while `socket` is borrowed.
    let done = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut unsent) };
    (done == 0).then(|| usize::try_from(unsent).unwrap_or(usize::MAX))
}

#[cfg(not(target_os = "linux"))]
fn unsent_bytes(_socket: &std::net::TcpStream) -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    #[test]
    fn a_latch_lets_the_next_request_wait_for_the_answer_before_it() {
        let latch = Arc::new(Latch::default());
        latch.wait();
        latch.owe();
        let settles = Arc::clone(&latch);
        let settler = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            settles.settle();
        });
        let started = std::time::Instant::now();
        latch.wait();
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "waited for the answer"
        );
        settler.join().unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn unsent_bytes_sees_a_client_that_does_not_read() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        (&client).read_exact(&mut got).unwrap();
        // Acknowledged once the client's kernel has it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while unsent_bytes(&server) != Some(0) && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(unsent_bytes(&server), Some(0));
        // A client that stops reading: its receive window fills, and bytes stay queued here.
        server.set_nonblocking(true).unwrap();
        let chunk = [b'x'; 65536];
        while server.write(&chunk).is_ok() {}
        assert!(unsent_bytes(&server).unwrap() > 0);
    }
}
