//! The read connections the connection threads share.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};

use super::{Database, DbError, Store};

/// A fixed set of read connections shared by the connection threads: a request takes one for as
/// long as it reads (never while it waits for a commit or for changes) and gives it back. A
/// connection given back goes straight to the thread that has waited longest: with a plain
/// condition variable the thread that gave it back could take it again before the one it woke
/// ran, and on PostgreSQL (where a read holds its connection for a network round trip) some
/// requests waited seconds behind the others.
pub struct Pool {
    state: Mutex<PoolState>,
    db: Database,
    reads: ReadsInProgress,
}

/// How many reads hold a pooled connection, or wait for one, right now. The writer looks at it to
/// tell whether clients are busy with something other than waiting for their writes (see
/// `writer/gather.rs`).
#[derive(Clone, Default)]
pub struct ReadsInProgress(Arc<AtomicUsize>);

impl ReadsInProgress {
    /// Whether any read is in progress.
    pub fn any(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

struct PoolState {
    /// Connections nobody holds; never any while a thread waits.
    idle: Vec<Store>,
    /// The threads waiting for a connection, oldest first.
    waiting: VecDeque<Arc<Waiter>>,
}

/// A thread waiting for a connection, and where it finds the one handed to it.
struct Waiter {
    thread: Thread,
    handed: Mutex<Option<Store>>,
}

/// A read connection checked out of a `Pool`; goes back when dropped.
pub struct Pooled<'a> {
    pool: &'a Pool,
    store: Option<Store>,
}

impl Pool {
    /// Opens `size` read connections to the database; `reads` counts the reads that hold one or
    /// wait for one.
    pub fn open(db: &Database, size: usize, reads: ReadsInProgress) -> Result<Pool, DbError> {
        let idle = (0..size)
            .map(|_| Store::open(db))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pool {
            state: Mutex::new(PoolState {
                idle,
                waiting: VecDeque::new(),
            }),
            db: db.clone(),
            reads,
        })
    }

    /// A connection of its own, outside the pool, for a read that may take long (a list streamed
    /// to a slow client must not keep a pooled connection from the others).
    pub fn dedicated(&self) -> Result<Store, DbError> {
        Store::open(&self.db)
    }

    /// A connection, waiting (behind those who came first) for one to come back when all are in
    /// use.
    pub fn get(&self) -> Pooled<'_> {
        self.reads.0.fetch_add(1, Ordering::Relaxed);
        let waiter = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(store) = state.idle.pop() {
                return Pooled {
                    pool: self,
                    store: Some(store),
                };
            }
            let waiter = Arc::new(Waiter {
                thread: thread::current(),
                handed: Mutex::new(None),
            });
            state.waiting.push_back(waiter.clone());
            waiter
        };
        loop {
            if let Some(store) = waiter
                .handed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                return Pooled {
                    pool: self,
                    store: Some(store),
                };
            }
            thread::park();
        }
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Store;

    fn deref(&self) -> &Store {
        // Present from `get` until `drop`.
        self.store
            .as_ref()
            .expect("a pooled store is present until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        self.pool.reads.0.fetch_sub(1, Ordering::Relaxed);
        if let Some(store) = self.store.take() {
            let mut state = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.waiting.pop_front() {
                Some(waiter) => {
                    drop(state);
                    *waiter.handed.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
                    waiter.thread.unpark();
                }
                None => state.idle.push(store),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Sync;
    use std::time::Duration;

    /// A pool of one connection to a new SQLite database in `dir`.
    fn pool_of_one(dir: &tempfile::TempDir) -> Arc<Pool> {
        pool_of_one_counting(dir, ReadsInProgress::default())
    }

    /// The same, counting its reads in `reads`.
    pub(crate) fn pool_of_one_counting(
        dir: &tempfile::TempDir,
        reads: ReadsInProgress,
    ) -> Arc<Pool> {
        crate::store::sqlite::tests::store(dir);
        let db = Database::Sqlite {
            file: dir.path().join("kv.sqlite3"),
            sync: Sync::Full,
        };
        Arc::new(Pool::open(&db, 1, reads).unwrap())
    }

    #[test]
    fn the_pool_lends_each_connection_to_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_of_one(&dir);
        let held = pool.get();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = pool.clone();
        let t = std::thread::spawn(move || {
            let store = waiting.get();
            store.ping().unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "lent twice"
        );
        drop(held);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn reads_in_progress_count_holders_and_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let reads = ReadsInProgress::default();
        let pool = pool_of_one_counting(&dir, reads.clone());
        assert!(!reads.any());
        let held = pool.get();
        assert!(reads.any());
        let waiting = pool.clone();
        let t = std::thread::spawn(move || drop(waiting.get()));
        while pool.state.lock().unwrap().waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(reads.0.load(Ordering::Relaxed), 2, "one holds, one waits");
        drop(held);
        t.join().unwrap();
        assert_eq!(reads.0.load(Ordering::Relaxed), 0, "every read ended");
    }

    #[test]
    fn a_connection_given_back_goes_to_the_longest_waiting_thread() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_of_one(&dir);
        let held = pool.get();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while pool.state.lock().unwrap().waiting.len() < n {
                assert!(std::time::Instant::now() < deadline, "no waiter {n}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let threads: Vec<_> = ["first", "second"]
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let (pool, tx) = (pool.clone(), tx.clone());
                let t = std::thread::spawn(move || {
                    let store = pool.get();
                    tx.send(name).unwrap();
                    drop(store);
                });
                waiting(i + 1);
                t
            })
            .collect();
        drop(held);
        let order: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(order, ["first", "second"]);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.state.lock().unwrap().idle.len(), 1);
    }
}
