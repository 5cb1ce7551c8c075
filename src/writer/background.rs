//! The writer's background threads: each runs its task every so often, and the expiry sweep and
//! the housekeeping (purge, compaction) submit ordinary writes so they never hold the writer long.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{EXPIRE_BATCH, Op, Outcome, PURGE_BATCH, Submitter};
use crate::store::{Store, now_millis};
use crate::watch::Watch;

/// The purge runs at least once a minute, and every second while the retention is under a minute.
pub(super) fn purge_interval(retention: Duration) -> Duration {
    Duration::from_secs(if retention < Duration::from_secs(60) {
        1
    } else {
        60
    })
}
/// A thread that runs a task every `interval` until stopped.
/// The task is told whether a stop is under way, so a long task can end early.
pub(super) struct Periodic {
    stop: Sender<()>,
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Periodic {
    pub(super) fn start(
        name: &str,
        interval: Duration,
        mut task: impl FnMut(&AtomicBool) + Send + 'static,
    ) -> std::io::Result<Periodic> {
        Periodic::paced(name, interval, move |stopping| {
            task(stopping);
            interval
        })
    }

    /// Like `start`, but each run of the task says how long to wait before the next; the first
    /// run comes after `first`.
    pub(super) fn paced(
        name: &str,
        first: Duration,
        mut task: impl FnMut(&AtomicBool) -> Duration + Send + 'static,
    ) -> std::io::Result<Periodic> {
        let (stop, stopped) = channel::<()>();
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let thread = thread::Builder::new().name(name.into()).spawn(move || {
            let mut wait = first;
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(wait) {
                wait = task(&flag);
            }
        })?;
        Ok(Periodic {
            stop,
            stopping,
            thread,
        })
    }

    pub(super) fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            log::error!("a background thread of the writer panicked");
        }
    }
}

/// Deletes expired objects, `EXPIRE_BATCH` per transaction, until none is left.
pub(super) fn sweep(submitter: &Submitter, stopping: &AtomicBool) {
    while !stopping.load(Ordering::SeqCst) {
        match submitter.write(Op::Expire) {
            Ok(Outcome::Expired(n)) if n == EXPIRE_BATCH => continue,
            Ok(_) => return,
            Err(e) => return log::warn!("deleting expired objects failed (it is retried): {e}"),
        }
    }
}

/// The writer's housekeeping, each step an ordinary write so it never holds the writer for long:
/// forgets tombstones older than the retention, `PURGE_BATCH` at a time, then compacts the
/// feed's log if enough of it is stale.
pub(super) fn maintain(submitter: &Submitter, retention: Duration, stopping: &AtomicBool) {
    while !stopping.load(Ordering::SeqCst) {
        let before_ms = now_millis() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match submitter.write(Op::Purge { before_ms }) {
            Ok(Outcome::Purged(n)) if n == PURGE_BATCH => continue,
            Ok(_) => break,
            Err(e) => return log::warn!("purging old deletions failed (it is retried): {e}"),
        }
    }
    while !stopping.load(Ordering::SeqCst) {
        match submitter.write(Op::Compact) {
            Ok(Outcome::Compacting(true)) => continue,
            Ok(_) => return,
            Err(e) => return log::warn!("compacting the change log failed (it is retried): {e}"),
        }
    }
}

/// Wakes this node's waiters on commits made through other nodes sharing the database: reads the
/// store-wide revision, and when it has moved, which collections the new revisions changed. One
/// poller per node, however many clients wait.
pub(super) struct Poller {
    store: Store,
    watch: Arc<Watch>,
    seen: u64,
    /// Whether the last poll failed, so an outage is logged once, not every poll.
    failing: bool,
}

impl Poller {
    pub(super) fn new(store: Store, watch: Arc<Watch>, seen: u64) -> Poller {
        Poller {
            store,
            watch,
            seen,
            failing: false,
        }
    }

    pub(super) fn poll(&mut self) {
        let polled = self.store.revision().and_then(|rev| {
            if rev <= self.seen {
                return Ok(None);
            }
            Ok(Some((rev, self.store.changed_collections(self.seen, rev)?)))
        });
        match polled {
            Ok(news) => {
                if self.failing {
                    log::info!("the database answers again");
                    self.failing = false;
                }
                if let Some((rev, collections)) = news {
                    self.watch
                        .publish(rev, collections.iter().map(String::as_str));
                    self.seen = rev;
                }
            }
            Err(e) if !self.failing => {
                log::warn!("cannot poll the database for changes (it is retried): {e}");
                self.failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    #[test]
    fn a_paced_task_waits_as_long_as_its_last_run_asked() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let periodic = Periodic::paced("kv-test-paced", Duration::from_millis(1), move |_| {
            if counted.fetch_add(1, Ordering::SeqCst) + 1 < 3 {
                Duration::from_millis(1)
            } else {
                Duration::from_secs(3600)
            }
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "the task ran {runs:?} times");
            thread::sleep(Duration::from_millis(1));
        }
        // Long enough for dozens of runs, had the hour asked for been ignored.
        thread::sleep(Duration::from_millis(50));
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        periodic.stop();
    }
}
