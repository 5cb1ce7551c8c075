//! The open connections: how many there may be, what each one is doing, and which one to close
//! when a new client needs room, so that no client can starve the others by holding connections.
//!
//! Each connection has its own thread, which sleeps in a read while it waits; an open connection
//! costs a small thread stack and three file descriptors, no CPU, so kv can keep thousands open.
//! What a client must not do is keep them from others:
//! - a request head must be complete within `KV_HEADER_TIMEOUT_SECS` of its first byte; the reaper
//!   thread closes the reading side of a connection that takes longer (its thread answers 408);
//! - a connection idle between requests is closed after `KV_IO_TIMEOUT_SECS` by its socket's read
//!   timeout, like a body that stops arriving;
//! - at `max` connections, a new one makes room: kv closes the connection that has waited longest
//!   without a complete request, counted from when it was accepted or last answered, whether it
//!   is idle or its request head is arriving. A connection whose request kv has received is never
//!   closed: that request gets its answer.
//!
//! Each connection's phase and since when it has waited are one atomic word that its own thread
//! updates without a lock, with compare-and-swap against `Closed`, so a connection that kv closes
//! and one that moves on at the same moment agree on which happened. The registry's lock is taken
//! only when a connection opens or ends, and by the reaper and the evictor to read the words.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// How often the reaper looks for request heads past their deadline; a head is closed at most
/// this much after its deadline.
const REAP_INTERVAL_MS: u64 = 200;
/// Bits of a state word that hold the phase; the rest hold milliseconds since `Conns::epoch`.
const PHASE_BITS: u32 = 2;

/// What a connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request (new, or between requests).
    Idle = 0,
    /// A request head is arriving; its deadline runs.
    Head = 1,
    /// Its request is received; kv owes it an answer.
    Busy = 2,
    /// kv closed its reading side: the head deadline passed, or another client needed room.
    Closed = 3,
}

impl Phase {
    fn of(word: u64) -> Phase {
        match word & ((1 << PHASE_BITS) - 1) {
            0 => Phase::Idle,
            1 => Phase::Head,
            2 => Phase::Busy,
            _ => Phase::Closed,
        }
    }
}

fn word(phase: Phase, since_ms: u64) -> u64 {
    (since_ms << PHASE_BITS) | phase as u64
}

fn since_ms(word: u64) -> u64 {
    word >> PHASE_BITS
}

/// One open connection, as the registry sees it.
struct Entry {
    /// A clone of the connection's socket, to shut its reading side from another thread.
    socket: TcpStream,
    /// Its phase, and since when it has waited for a complete request (accepted, or answered).
    state: AtomicU64,
    /// When the first byte of its current request head arrived: the deadline counts from here.
    head_started_ms: AtomicU64,
}

impl Entry {
    /// Closes the reading side if the connection's state is still `seen`; its thread's blocked
    /// read then ends at once. Returns whether it did.
    fn close(&self, seen: u64) -> bool {
        let closed = word(Phase::Closed, since_ms(seen));
        if self
            .state
            .compare_exchange(seen, closed, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        if let Err(e) = self.socket.shutdown(Shutdown::Read) {
            // The client has gone already (NotConnected): its thread is ending anyway.
            log::debug!("closing a connection: {e}");
        }
        true
    }
}

/// A connection's socket, held open by whoever still has an answer to write on it.
pub struct SharedSocket(Arc<Entry>);

impl SharedSocket {
    pub fn get(&self) -> &TcpStream {
        &self.0.socket
    }
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    open: HashMap<u64, Arc<Entry>>,
}

/// The registry of open connections and the rules above.
pub struct Conns {
    registry: Mutex<Registry>,
    /// Signalled when a connection ends.
    freed: Condvar,
    /// Most connections open before a new one makes room.
    pub max: usize,
    header_timeout_ms: u64,
    epoch: Instant,
    stopping: AtomicBool,
}

/// One open connection, held by its thread; it leaves the registry when dropped, however the
/// thread ends.
pub struct Conn {
    conns: Arc<Conns>,
    id: u64,
    entry: Arc<Entry>,
}

impl Conns {
    /// A registry for up to `max` connections whose request heads get `header_timeout`; starts
    /// the reaper thread.
    pub fn start(max: usize, header_timeout: Duration) -> io::Result<Arc<Conns>> {
        let conns = Arc::new(Conns {
            registry: Mutex::new(Registry::default()),
            freed: Condvar::new(),
            max,
            header_timeout_ms: u64::try_from(header_timeout.as_millis()).unwrap_or(u64::MAX),
            epoch: Instant::now(),
            stopping: AtomicBool::new(false),
        });
        let reaper = Arc::clone(&conns);
        thread::Builder::new()
            .name("kv-reaper".into())
            .spawn(move || reaper.reap())?;
        Ok(conns)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX >> PHASE_BITS)
    }

    /// Registers a new connection, idle, with a clone of its socket.
    pub fn open(self: &Arc<Self>, socket: TcpStream) -> Conn {
        let entry = Arc::new(Entry {
            socket,
            state: AtomicU64::new(word(Phase::Idle, self.now_ms())),
            head_started_ms: AtomicU64::new(0),
        });
        let mut registry = self.lock();
        registry.next_id += 1;
        let id = registry.next_id;
        registry.open.insert(id, Arc::clone(&entry));
        Conn {
            conns: Arc::clone(self),
            id,
            entry,
        }
    }

    /// How many connections are open.
    pub fn count(&self) -> usize {
        self.lock().open.len()
    }

    /// Closes the connection that has waited longest without a complete request (idle, or its
    /// head arriving), other than `newcomer`, the one room is made for. Returns whether there was
    /// one.
    pub fn make_room(&self, newcomer: &Conn) -> bool {
        let registry = self.lock();
        // Ties (the same millisecond) go to the connection opened first.
        let oldest = registry
            .open
            .iter()
            .filter(|(id, _)| **id != newcomer.id)
            .map(|(id, entry)| (*id, entry, entry.state.load(Ordering::SeqCst)))
            .filter(|(_, _, seen)| matches!(Phase::of(*seen), Phase::Idle | Phase::Head))
            .min_by_key(|(id, _, seen)| (since_ms(*seen), *id));
        // A connection that moved on meanwhile is not closed; the caller asks again.
        oldest.is_some_and(|(_, entry, seen)| entry.close(seen))
    }

    /// Waits until fewer than `max + 1` connections are open (room for the one just accepted),
    /// or `timeout` passes.
    pub fn wait_for_room(&self, timeout: Duration) {
        let registry = self.lock();
        let _unused = self
            .freed
            .wait_timeout_while(registry, timeout, |registry| registry.open.len() > self.max);
    }

    /// Closes every connection that is waiting for a request (kv is stopping); those with a
    /// request received finish it.
    pub fn close_waiting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for entry in self.lock().open.values() {
            let seen = entry.state.load(Ordering::SeqCst);
            if matches!(Phase::of(seen), Phase::Idle | Phase::Head) {
                entry.close(seen);
            }
        }
    }

    /// The reaper: closes request heads past their deadline, until kv stops.
    fn reap(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(REAP_INTERVAL_MS));
            let now = self.now_ms();
            let mut reaped = 0;
            for entry in self.lock().open.values() {
                let seen = entry.state.load(Ordering::SeqCst);
                if Phase::of(seen) != Phase::Head {
                    continue;
                }
                // Written before the phase became Head, so it belongs to this head.
                let started = entry.head_started_ms.load(Ordering::SeqCst);
                if now.saturating_sub(started) >= self.header_timeout_ms && entry.close(seen) {
                    reaped += 1;
                }
            }
            if reaped > 0 {
                log::debug!("closed {reaped} connection(s) whose request head took too long");
            }
        }
    }
}

impl Conn {
    /// Answered: waiting for the next request from now. False if kv has closed the connection.
    pub fn idle(&self) -> bool {
        self.enter(Phase::Idle, true)
    }

    /// The first byte of a request head has arrived: its deadline starts (it has waited for a
    /// complete request since before). False if kv has closed the connection.
    pub fn head(&self) -> bool {
        let now = self.conns.now_ms();
        self.entry.head_started_ms.store(now, Ordering::SeqCst);
        self.enter(Phase::Head, false)
    }

    /// The request head is complete: from now on the connection is not closed to make room.
    /// False if kv closed it first (its deadline passed, or another client needed room).
    pub fn busy(&self) -> bool {
        self.enter(Phase::Busy, false)
    }

    /// Whether kv has closed this connection's reading side.
    pub fn is_closed(&self) -> bool {
        Phase::of(self.entry.state.load(Ordering::SeqCst)) == Phase::Closed
    }

    /// The socket, to answer on when the HTTP library cannot.
    pub fn socket(&self) -> &TcpStream {
        &self.entry.socket
    }

    /// A handle on the socket that keeps it open for as long as the handle lives, even after the
    /// connection's thread has ended.
    pub fn shared_socket(&self) -> SharedSocket {
        SharedSocket(Arc::clone(&self.entry))
    }

    /// Moves to `phase` (waiting since now, or since as before) unless closed.
    fn enter(&self, phase: Phase, restart_clock: bool) -> bool {
        let now = self.conns.now_ms();
        self.entry
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |seen| {
                let since = if restart_clock { now } else { since_ms(seen) };
                (Phase::of(seen) != Phase::Closed).then_some(word(phase, since))
            })
            .is_ok()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.conns.lock().open.remove(&self.id);
        self.conns.freed.notify_all();
    }
}

/// Raises the soft limit on open files to the hard limit, since every connection takes three;
/// returns the limit in force (and what it was, if it was raised).
pub fn raise_fd_limit() -> io::Result<(u64, Option<u64>)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct it is given, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if before >= limit.rlim_max {
        return Ok((before, None));
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((raised.rlim_cur, Some(before)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// A connected pair: kv's side (registered) and the client's.
    fn pair(conns: &Arc<Conns>, listener: &TcpListener) -> (Conn, TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let conn = conns.open(server.try_clone().unwrap());
        (conn, server, client)
    }

    fn conns(max: usize, header_timeout: Duration) -> Arc<Conns> {
        Conns::start(max, header_timeout).unwrap()
    }

    #[test]
    fn states_pack_into_one_word() {
        for phase in [Phase::Idle, Phase::Head, Phase::Busy, Phase::Closed] {
            let w = word(phase, 123_456_789);
            assert_eq!((Phase::of(w), since_ms(w)), (phase, 123_456_789));
        }
    }

    #[test]
    fn room_is_made_by_closing_what_has_waited_longest_for_a_request() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let conns = conns(2, Duration::from_secs(60));
        let (busy, _s1, _c1) = pair(&conns, &listener);
        assert!(busy.head() && busy.busy());
        let (old_head, mut s2, _c2) = pair(&conns, &listener);
        let (old_idle, _s3, _c3) = pair(&conns, &listener);
        // A head that started later still counts from when its connection was accepted.
        assert!(old_head.head());
        let (young_head, _s4, _c4) = pair(&conns, &listener);
        assert!(young_head.head());
        let (answered, _s5, _c5) = pair(&conns, &listener);
        assert!(answered.head() && answered.busy() && answered.idle());
        let (newcomer, _s6, _c6) = pair(&conns, &listener);
        assert_eq!(conns.count(), 6);

        let closed = |c: &Conn| c.is_closed();
        assert!(conns.make_room(&newcomer));
        assert!(closed(&old_head) && !closed(&old_idle));
        // Its thread's blocked read ends at once.
        assert_eq!(s2.read(&mut [0; 8]).unwrap(), 0);
        assert!(conns.make_room(&newcomer));
        assert!(closed(&old_idle) && !closed(&young_head));
        assert!(conns.make_room(&newcomer));
        assert!(closed(&young_head) && !closed(&answered));
        assert!(conns.make_room(&newcomer));
        assert!(closed(&answered));
        assert!(
            !conns.make_room(&newcomer),
            "never the one room is made for"
        );
        assert!(
            !closed(&newcomer) && !closed(&busy),
            "nor a received request"
        );
        // A closed connection cannot move on.
        assert!(!old_idle.head() && !old_head.busy() && !answered.idle());
        drop((old_idle, answered, old_head, young_head));
        assert_eq!(conns.count(), 2);
        conns.wait_for_room(Duration::from_secs(5));
    }

    #[test]
    fn the_reaper_closes_heads_past_their_deadline_only() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let conns = conns(100, Duration::from_millis(300));
        let (head, _s1, _c1) = pair(&conns, &listener);
        assert!(head.head());
        let (idle, _s2, _c2) = pair(&conns, &listener);
        let (busy, _s3, _c3) = pair(&conns, &listener);
        assert!(busy.head() && busy.busy());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !head.is_closed() {
            assert!(Instant::now() < deadline, "the head was never reaped");
            thread::sleep(Duration::from_millis(20));
        }
        assert!(!idle.is_closed() && !busy.is_closed());
        assert!(!head.busy(), "too late: kv answers 408");
    }

    #[test]
    fn stopping_closes_what_waits_for_a_request() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let conns = conns(100, Duration::from_secs(60));
        let (idle, _s1, _c1) = pair(&conns, &listener);
        let (busy, _s2, _c2) = pair(&conns, &listener);
        assert!(busy.head() && busy.busy());
        conns.close_waiting();
        assert!(idle.is_closed() && !busy.is_closed());
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let (now, _) = raise_fd_limit().unwrap();
        let (again, raised) = raise_fd_limit().unwrap();
        assert_eq!((again, raised), (now, None));
    }
}
