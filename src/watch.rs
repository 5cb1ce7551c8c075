//! Who is waiting for changes, and waking them when a commit makes some.
//!
//! Long-polls and event streams of the change feed park their own connection thread here (never a
//! read connection), registered under the collection they follow (or all collections). The writer
//! publishes each commit's revision and the collections it changed; only the waiters of those
//! collections, and those following every collection, are woken, so a write to one collection does
//! not stir a thousand idle waiters of others. A waiter registers with the revision its last read
//! saw, and returns at once if a newer one was published meanwhile, so no commit slips between a
//! read that found nothing and the wait that follows it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::Instant;

use crate::error::Error;

/// The registry of waiters and the latest published revision.
pub struct Watch {
    state: Mutex<State>,
    /// Leases out (long-polls while they wait, streams while they run).
    leased: AtomicUsize,
    max_waiters: usize,
}

#[derive(Default)]
struct State {
    rev: u64,
    stopping: bool,
    /// Parked waiters by the collection they follow; `None` follows every collection.
    parked: HashMap<Option<String>, Vec<Arc<Parked>>>,
}

struct Parked {
    thread: Thread,
    woken: AtomicBool,
}

impl Parked {
    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Why a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A commit changed what the waiter follows (or may have: read again to see).
    Changed,
    /// The deadline passed.
    Timeout,
    /// kv is stopping: answer with what there is.
    Stopping,
}

/// The right to wait, one of `max_waiters`; given back when dropped.
pub struct Lease<'a>(&'a Watch);

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.0.leased.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Watch {
    /// A registry that lets at most `max_waiters` requests wait at once, starting at revision `rev`.
    pub fn new(rev: u64, max_waiters: usize) -> Watch {
        Watch {
            state: Mutex::new(State {
                rev,
                ..State::default()
            }),
            leased: AtomicUsize::new(0),
            max_waiters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lease to wait, or 503 `too_many_waiters` when `max_waiters` are out.
    pub fn lease(&self) -> Result<Lease<'_>, Error> {
        let taken = self
            .leased
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_waiters).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Lease(self)),
            Err(_) => Err(Error::TooManyWaiters),
        }
    }

    /// How many leases are out (waiting long-polls and running streams).
    pub fn waiters(&self) -> usize {
        self.leased.load(Ordering::SeqCst)
    }

    /// Parks the calling thread until a commit after `seen_rev` touches `collection` (any
    /// collection for `None`), the deadline passes, or kv stops.
    pub fn wait(
        &self,
        _lease: &Lease<'_>,
        collection: Option<&str>,
        seen_rev: u64,
        deadline: Instant,
    ) -> Wake {
        let parked = Arc::new(Parked {
            thread: thread::current(),
            woken: AtomicBool::new(false),
        });
        let key = collection.map(str::to_string);
        {
            let mut state = self.lock();
            if state.stopping {
                return Wake::Stopping;
            }
            if state.rev > seen_rev {
                return Wake::Changed;
            }
            state
                .parked
                .entry(key.clone())
                .or_default()
                .push(parked.clone());
        }
        let woken = loop {
            if parked.woken.load(Ordering::Acquire) {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            thread::park_timeout(deadline - now);
        };
        let mut state = self.lock();
        if !woken {
            if let Some(list) = state.parked.get_mut(&key) {
                list.retain(|p| !Arc::ptr_eq(p, &parked));
                if list.is_empty() {
                    state.parked.remove(&key);
                }
            }
        }
        match (state.stopping, woken) {
            (true, _) => Wake::Stopping,
            (false, true) => Wake::Changed,
            (false, false) => Wake::Timeout,
        }
    }

    /// Called by the writer after a commit: the new revision and the collections it changed.
    pub fn publish<'c>(&self, rev: u64, collections: impl IntoIterator<Item = &'c str>) {
        let mut state = self.lock();
        state.rev = state.rev.max(rev);
        if state.parked.is_empty() {
            return;
        }
        let mut woken = state.parked.remove(&None).unwrap_or_default();
        for collection in collections {
            if let Some(list) = state.parked.remove(&Some(collection.to_string())) {
                woken.extend(list);
            }
        }
        drop(state);
        for parked in woken {
            parked.wake();
        }
    }

    /// Wakes every waiter with `Stopping`, and makes every later wait return at once.
    pub fn stop(&self) {
        let mut state = self.lock();
        state.stopping = true;
        let woken: Vec<_> = state.parked.drain().flat_map(|(_, list)| list).collect();
        drop(state);
        for parked in woken {
            parked.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    fn waiter(
        watch: &Arc<Watch>,
        collection: Option<&'static str>,
        seen: u64,
    ) -> std::sync::mpsc::Receiver<Wake> {
        let (tx, rx) = channel();
        let watch = watch.clone();
        let (ready_tx, ready) = channel();
        thread::spawn(move || {
            let lease = watch.lease().unwrap();
            ready_tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            tx.send(watch.wait(&lease, collection, seen, deadline))
                .unwrap();
        });
        ready.recv().unwrap();
        rx
    }

    fn parked(watch: &Watch) -> usize {
        watch.lock().parked.values().map(Vec::len).sum()
    }

    fn until_parked(watch: &Watch, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while parked(watch) < n {
            assert!(Instant::now() < deadline, "waiters never parked");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_commit_wakes_its_collection_and_the_followers_of_all_but_not_others() {
        let watch = Arc::new(Watch::new(5, 10));
        let users = waiter(&watch, Some("users"), 5);
        let all = waiter(&watch, None, 5);
        let other = waiter(&watch, Some("other"), 5);
        until_parked(&watch, 3);
        watch.publish(6, ["users"]);
        let within = Duration::from_secs(5);
        assert_eq!(users.recv_timeout(within), Ok(Wake::Changed));
        assert_eq!(all.recv_timeout(within), Ok(Wake::Changed));
        // A wrong wake shows up here as a value, never as a flake.
        assert!(other.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(parked(&watch), 1);
        watch.stop();
        assert_eq!(other.recv_timeout(within), Ok(Wake::Stopping));
    }

    #[test]
    fn a_revision_published_before_the_wait_returns_at_once() {
        let watch = Watch::new(7, 10);
        let lease = watch.lease().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(watch.wait(&lease, Some("c"), 6, deadline), Wake::Changed);
    }

    #[test]
    fn a_wait_times_out_and_leaves_nothing_behind() {
        let watch = Watch::new(1, 10);
        let lease = watch.lease().unwrap();
        let deadline = Instant::now() + Duration::from_millis(20);
        assert_eq!(watch.wait(&lease, None, 1, deadline), Wake::Timeout);
        assert_eq!(parked(&watch), 0);
    }

    #[test]
    fn leases_are_capped_and_given_back() {
        let watch = Watch::new(0, 2);
        let a = watch.lease().unwrap();
        let _b = watch.lease().unwrap();
        assert!(matches!(watch.lease(), Err(Error::TooManyWaiters)));
        assert_eq!(watch.waiters(), 2);
        drop(a);
        assert!(watch.lease().is_ok());
    }

    #[test]
    fn after_stop_every_wait_returns_at_once() {
        let watch = Watch::new(0, 2);
        watch.stop();
        let lease = watch.lease().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(watch.wait(&lease, None, 0, deadline), Wake::Stopping);
    }
}
