//! The single writer thread and its group commit.
//!
//! SQLite allows one writer at a time, and under `synchronous=FULL` every commit costs an fsync. So
//! one thread owns the only writing connection: workers hand it their writes and wait for the reply;
//! it takes everything queued, runs it in one `BEGIN IMMEDIATE … COMMIT` (one fsync for the whole
//! group), and only then answers each worker. Under one client that is one write per commit; under
//! many it amortises the fsync. A 200 is therefore never sent before its COMMIT has returned.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::{self, JoinHandle};

use crate::error::Error;
use crate::store::Store;

/// Most writes committed together, so one huge group cannot hold every worker's reply for long.
const MAX_WRITES_PER_COMMIT: usize = 1024;

/// One write, as the API asks for it.
#[derive(Debug)]
pub enum Op {
    Put {
        collection: String,
        key: String,
        value: String,
    },
    Delete {
        collection: String,
        key: String,
    },
}

/// What a committed write did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// Whether the object existed.
    Deleted(bool),
}

type Reply = Result<Outcome, Error>;

struct Job {
    op: Op,
    reply: Sender<Reply>,
}

/// The writer thread; `stop` waits for it once every `WriteHandle` is gone.
pub struct Writer {
    jobs: Sender<Job>,
    thread: JoinHandle<()>,
}

/// A worker's way to the writer: a sender of jobs plus the worker's own reply channel.
pub struct WriteHandle {
    jobs: Sender<Job>,
    reply_tx: Sender<Reply>,
    reply_rx: Receiver<Reply>,
}

impl Writer {
    /// Starts the writer thread on the given (write) connection.
    pub fn start(store: Store) -> std::io::Result<Writer> {
        let (jobs, queue) = channel::<Job>();
        let thread = thread::Builder::new()
            .name("kv-writer".into())
            .spawn(move || run(store, queue))?;
        Ok(Writer { jobs, thread })
    }

    /// A new handle for one worker thread.
    pub fn handle(&self) -> WriteHandle {
        let (reply_tx, reply_rx) = channel();
        WriteHandle {
            jobs: self.jobs.clone(),
            reply_tx,
            reply_rx,
        }
    }

    /// Waits for the writer to finish the queued writes and close its connection. Every
    /// `WriteHandle` must have been dropped first, or this waits for ever.
    pub fn stop(self) {
        drop(self.jobs);
        if self.thread.join().is_err() {
            log::error!("the writer thread panicked");
        }
    }
}

impl WriteHandle {
    /// Queues one write and blocks until it has been committed (or has failed).
    pub fn write(&self, op: Op) -> Reply {
        let job = Job {
            op,
            reply: self.reply_tx.clone(),
        };
        self.jobs
            .send(job)
            .map_err(|_| Error::Internal("the writer thread has stopped".into()))?;
        self.reply_rx
            .recv()
            .map_err(|_| Error::Internal("the writer thread dropped a write".into()))?
    }
}

fn run(store: Store, queue: Receiver<Job>) {
    let mut group = Vec::with_capacity(MAX_WRITES_PER_COMMIT);
    while let Ok(first) = queue.recv() {
        group.push(first);
        while group.len() < MAX_WRITES_PER_COMMIT {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| commit(&store, &mut group))) {
            log::error!("the writer {}", Error::from_panic(panic));
            if !store.is_autocommit() {
                let _ = store.control("ROLLBACK");
            }
            fail_all(&mut group, "the writer panicked");
        }
    }
    match store.checkpoint() {
        Ok(()) => log::info!("writer stopped, WAL checkpointed"),
        Err(e) => log::warn!("writer stopped, but the WAL checkpoint failed: {e}"),
    }
}

/// Runs every queued write in one transaction, then answers each job.
fn commit(store: &Store, group: &mut Vec<Job>) {
    if let Err(e) = store.control("BEGIN IMMEDIATE") {
        log::error!("cannot begin a write transaction: {e}");
        return fail_all(group, "cannot begin a write transaction");
    }
    let mut replies = Vec::with_capacity(group.len());
    for job in group.iter() {
        let reply = apply(store, &job.op);
        if let Err(e) = &reply {
            log::error!("write failed: {e}");
            if store.is_autocommit() {
                // SQLite rolled the whole transaction back (e.g. disk full): nothing in it committed.
                return fail_all(group, "the transaction was rolled back");
            }
        }
        replies.push(reply);
    }
    if let Err(e) = store.control("COMMIT") {
        log::error!("commit failed: {e}");
        if !store.is_autocommit() {
            let _ = store.control("ROLLBACK");
        }
        return fail_all(group, "commit failed");
    }
    for (job, reply) in group.drain(..).zip(replies) {
        // A worker that vanished cannot be told; its write is committed all the same.
        let _ = job.reply.send(reply);
    }
}

fn apply(store: &Store, op: &Op) -> Reply {
    match op {
        Op::Put {
            collection,
            key,
            value,
        } => {
            store.put(collection, key, value)?;
            Ok(Outcome::Stored)
        }
        Op::Delete { collection, key } => Ok(Outcome::Deleted(store.delete(collection, key)?)),
    }
}

fn fail_all(group: &mut Vec<Job>, why: &str) {
    for job in group.drain(..) {
        let _ = job.reply.send(Err(Error::Internal(why.to_string())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sync;

    fn writer(dir: &tempfile::TempDir) -> (Writer, Store) {
        let path = dir.path().join("kv.sqlite3");
        let mut store = Store::open(&path, Sync::Normal).unwrap();
        store.migrate().unwrap();
        let reader = Store::open(&path, Sync::Normal).unwrap();
        (Writer::start(store).unwrap(), reader)
    }

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            collection: "c".into(),
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn writes_are_visible_to_readers_once_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let handle = writer.handle();
        assert_eq!(handle.write(put("k", "1")).unwrap(), Outcome::Stored);
        assert_eq!(reader.get("c", "k").unwrap().as_deref(), Some("1"));
        let delete = || Op::Delete {
            collection: "c".into(),
            key: "k".into(),
        };
        assert_eq!(handle.write(delete()).unwrap(), Outcome::Deleted(true));
        assert_eq!(handle.write(delete()).unwrap(), Outcome::Deleted(false));
        drop(handle);
        writer.stop();
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let handle = writer.handle();
                thread::spawn(move || {
                    for i in 0..100 {
                        handle.write(put(&format!("{t}-{i}"), "true")).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        writer.stop();
        assert_eq!(reader.list("c", |_, _| {}).unwrap(), 800);
    }
}
