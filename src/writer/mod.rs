//! The single writer thread and its group commit.
//!
//! SQLite allows one writer at a time, and under `synchronous=FULL` every commit costs an fsync. So
//! one thread owns the only writing connection: workers submit their writes with a completion
//! callback and go back to serving requests; the writer takes everything queued, runs it in one
//! `BEGIN IMMEDIATE … COMMIT` (one fsync for the whole group), and only then calls each write's
//! callback with its outcome. Under one client that is one write per commit; under many it
//! amortises the fsync, and no worker sits idle waiting for a disk flush while reads queue up.
//! When writes come from clients that are also reading, the writer may wait a moment for more
//! before it commits (`gather.rs`).
//!
//! Checkpoints (copying committed pages from the WAL into the database file) run mostly on a
//! thread of their own: SQLite's automatic checkpoint runs inside a commit, and on a large database
//! its scattered writes held every write behind it (measured: PUT p99 349 ms at 10M objects). A
//! passive checkpoint runs beside write transactions, but under a steady stream of writes it never
//! catches up completely, and only a complete checkpoint lets the WAL start over (measured: the WAL
//! grew to 979 MB in 8 s of PUTs). So the writer still checkpoints by itself once the WAL holds
//! `WRITER_CHECKPOINT_PAGES`; by then the checkpointer has copied most of it, and the writer's
//! checkpoint finishes the tail so that the WAL starts over. Measured at 10M objects (bench/scale.sh):
//! PUT p99 349 ms with SQLite's default, 60 ms with this, and the WAL stays under ~20 MB. How often
//! the checkpointer runs: `checkpoints.rs`.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::space::Space;
use crate::store::{ReadsInProgress, Store, now_millis};
use crate::watch::Watch;

mod apply;
mod background;
mod checkpoints;
mod gather;
mod op;
mod retry;

pub use op::{Cond, Done, ImportLine, Op, Outcome, Reply, Tags};

use background::{Periodic, Poller, maintain, purge_interval, sweep};
use checkpoints::{CHECKPOINT_INTERVAL, Pace};
use gather::Gathering;
use retry::{Retries, jitter};

/// Most writes committed together, so one huge group cannot hold every reply for long.
const MAX_WRITES_PER_COMMIT: usize = 1024;
/// How often a PostgreSQL node looks for commits made through other nodes (the most a long-poll
/// on this node waits for one).
const POLL_INTERVAL_MS: u64 = 50;
/// WAL pages (4 KiB) after which the writer completes a checkpoint itself, so the WAL starts over.
const WRITER_CHECKPOINT_PAGES: u32 = 4096;
/// A WAL file larger than this is truncated when it starts over.
const MAX_IDLE_WAL_BYTES: u64 = 64 * 1024 * 1024;
/// Most tombstones one purge transaction forgets, so a purge never holds the writer for long.
const PURGE_BATCH: usize = 10_000;
/// Feed entries one compaction step looks at.
const COMPACT_WINDOW: usize = 5_000;
/// Most expired objects one sweep transaction deletes, so a sweep never holds the writer for long.
const EXPIRE_BATCH: usize = 1000;
/// How often expired objects are swept (they are absent for reads from the moment they expire;
/// the sweep makes counts, the list's ETag and the feed catch up).
const EXPIRE_INTERVAL_MS: u64 = 250;
/// Stale feed entries below which no compaction starts, however small the store.
const MIN_STALE_TO_COMPACT: u64 = 10_000;
/// Most value bytes waiting for the writer; submitters wait beyond it, so a flood of large PUTs
/// from many connections cannot pile up in memory while the disk catches up.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

struct Job {
    op: Op,
    bytes: usize,
    done: Done,
}

/// What the writer thread takes from its queue.
enum Msg {
    Write(Job),
    /// Commit what is queued before this, then exit.
    Stop,
}

/// The writer thread and its helpers: the checkpointer, the sweep of expired objects, and the
/// purge of old tombstones and compaction of the feed's log.
pub struct Writer {
    submitter: Submitter,
    reads: ReadsInProgress,
    thread: JoinHandle<()>,
    checkpointer: Periodic,
    sweeper: Periodic,
    purger: Periodic,
}

/// A way to the writer; cheap to clone.
#[derive(Clone)]
pub struct Submitter {
    jobs: Sender<Msg>,
    queued: Arc<QueuedBytes>,
}

/// Value bytes submitted but not yet committed.
#[derive(Default)]
struct QueuedBytes {
    bytes: Mutex<usize>,
    drained: Condvar,
}

impl QueuedBytes {
    fn add(&self, n: usize) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        // One write larger than the whole budget still goes through, alone.
        while *bytes > 0 && *bytes + n > MAX_QUEUED_BYTES {
            bytes = self.drained.wait(bytes).unwrap_or_else(|e| e.into_inner());
        }
        *bytes += n;
    }

    fn remove(&self, n: usize) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        *bytes = bytes.saturating_sub(n);
        self.drained.notify_all();
    }
}

impl Writer {
    /// Starts the writer thread on the given (write) connection, the checkpointer on another, and
    /// the purge that forgets deletions after `retention`. Each commit is published to `watch`.
    pub fn start(
        store: Store,
        watch: Arc<Watch>,
        metrics: Arc<Metrics>,
        space: Arc<Space>,
        settings: Settings,
    ) -> std::io::Result<Writer> {
        let rev = store.revision().map_err(std::io::Error::other)?;
        // SQLite: checkpoints on a connection of their own. PostgreSQL: a poller that wakes this
        // node's waiters on commits made through other nodes (kv does not depend on LISTEN, which
        // PostgreSQL-compatible engines lack).
        let companion = if store.is_sqlite() {
            let own_connection = store
                .reopen()
                .and_then(|c| {
                    store.limit_wal(WRITER_CHECKPOINT_PAGES, MAX_IDLE_WAL_BYTES)?;
                    Ok(c)
                })
                .map_err(std::io::Error::other)?;
            let mut pace = Pace::new(own_connection.syncs_wal_at_commit(), Instant::now());
            Periodic::paced("kv-checkpoint", CHECKPOINT_INTERVAL, move |_| {
                checkpoints::pass(&own_connection, &mut pace)
            })?
        } else {
            let polls = store.reopen().map_err(std::io::Error::other)?;
            let mut poller = Poller::new(polls, watch.clone(), rev);
            Periodic::start(
                "kv-poll",
                Duration::from_millis(POLL_INTERVAL_MS),
                move |_| poller.poll(),
            )?
        };
        let peeks = store.reopen().map_err(std::io::Error::other)?;
        let (jobs, queue) = channel::<Msg>();
        let queued = Arc::new(QueuedBytes::default());
        let submitter = Submitter { jobs, queued };
        let thread_queued = submitter.queued.clone();
        let reads = ReadsInProgress::default();
        let writing = Writing {
            store,
            watch,
            metrics,
            space: space.clone(),
            rev,
            stale: 0,
            compacting: None,
            write_delay_ms: settings.write_delay_ms,
            reads: reads.clone(),
            gathering: Gathering::default(),
        };
        let thread = thread::Builder::new()
            .name("kv-writer".into())
            .spawn(move || run(writing, queue, &thread_queued))?;
        let sweeps = submitter.clone();
        let sweeper = Periodic::start(
            "kv-expire",
            Duration::from_millis(EXPIRE_INTERVAL_MS),
            move |stopping| {
                space.recover();
                // A sweep is a write transaction (on PostgreSQL one that locks the revision
                // counter and syncs its commit): look first, on a connection of the sweep's own.
                let due = peeks.expired(now_millis(), 1);
                if matches!(due, Ok(due) if !due.is_empty()) {
                    sweep(&sweeps, stopping)
                }
            },
        )?;
        let purges = submitter.clone();
        let retention = settings.retention;
        let purger = Periodic::start("kv-maintain", purge_interval(retention), move |stopping| {
            maintain(&purges, retention, stopping)
        })?;
        Ok(Writer {
            submitter,
            reads,
            thread,
            checkpointer: companion,
            sweeper,
            purger,
        })
    }

    /// A new way to submit writes.
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// The count of reads in progress that the read pool keeps for the writer (see `gather.rs`).
    pub fn reads(&self) -> ReadsInProgress {
        self.reads.clone()
    }

    /// Waits for the writer to commit what is queued, answer it, and close its connection. A write
    /// submitted after this gets a 503.
    pub fn stop(self) {
        self.checkpointer.stop();
        self.sweeper.stop();
        self.purger.stop();
        let _ = self.submitter.jobs.send(Msg::Stop);
        if self.thread.join().is_err() {
            log::error!("the writer thread panicked");
        }
    }
}

impl Submitter {
    /// Queues one write; `done` gets its reply once it has been committed (or has failed).
    pub fn submit(&self, op: Op, done: Done) {
        let bytes = op.bytes();
        self.queued.add(bytes);
        if let Err(rejected) = self.jobs.send(Msg::Write(Job { op, bytes, done })) {
            self.queued.remove(bytes);
            if let Msg::Write(job) = rejected.0 {
                (job.done)(Err(Error::Unavailable("the writer has stopped".into())));
            }
        }
    }

    /// Queues one write and blocks until it has been committed (or has failed).
    pub fn write(&self, op: Op) -> Reply {
        let (tx, rx) = channel();
        self.submit(
            op,
            Box::new(move |reply| {
                let _ = tx.send(reply);
            }),
        );
        rx.recv()
            .map_err(|_| Error::Internal("the writer thread dropped a write".into()))?
    }
}

fn run(mut writing: Writing, queue: Receiver<Msg>, queued: &QueuedBytes) {
    let mut group = Vec::with_capacity(MAX_WRITES_PER_COMMIT);
    let mut stopping = false;
    while !stopping {
        match queue.recv() {
            Ok(Msg::Write(job)) => group.push(job),
            Ok(Msg::Stop) | Err(_) => break,
        }
        stopping = fill_group(
            &queue,
            &mut group,
            &mut writing.gathering,
            &writing.reads,
            thread::sleep,
        );
        let bytes: usize = group.iter().map(|job| job.bytes).sum();
        let rev = writing.rev;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| writing.commit(&mut group))) {
            log::error!("the writer {}", Error::from_panic(panic));
            let _ = writing.store.rollback();
            writing.rev = rev;
            fail_all(&mut group, "the writer panicked");
        }
        queued.remove(bytes);
    }
    // Writes that raced the stop get a clear refusal rather than a dropped callback.
    while let Ok(msg) = queue.try_recv() {
        if let Msg::Write(job) = msg {
            (job.done)(Err(Error::Unavailable("the writer has stopped".into())));
        }
    }
    match writing.store.checkpoint() {
        Ok(()) => log::info!("writer stopped, WAL checkpointed"),
        Err(e) => log::warn!("writer stopped, but the WAL checkpoint failed: {e}"),
    }
}

/// Moves what is queued into `group` and, when `gathering` says a wait can pay, waits (`sleep`)
/// and takes what arrived meanwhile; true if the writer was asked to stop.
fn fill_group(
    queue: &Receiver<Msg>,
    group: &mut Vec<Job>,
    gathering: &mut Gathering,
    reads: &ReadsInProgress,
    sleep: impl FnOnce(Duration),
) -> bool {
    if take_queued(queue, group) {
        return true;
    }
    let Some(wait) = gathering.delay(group.len(), reads.any()) else {
        return false;
    };
    sleep(wait);
    let before = group.len();
    let stopping = take_queued(queue, group);
    gathering.gathered(group.len() - before);
    stopping
}

/// Moves what is queued into `group`, up to the most one commit holds; true if the writer was
/// asked to stop.
fn take_queued(queue: &Receiver<Msg>, group: &mut Vec<Job>) -> bool {
    while group.len() < MAX_WRITES_PER_COMMIT {
        match queue.try_recv() {
            Ok(Msg::Write(job)) => group.push(job),
            Ok(Msg::Stop) => return true,
            Err(_) => break,
        }
    }
    false
}

/// The writer thread's state: the only writing connection and the store-wide revision.
struct Writing {
    store: Store,
    watch: Arc<Watch>,
    metrics: Arc<Metrics>,
    space: Arc<Space>,
    /// The revision of the latest change applied (committed, or in the open transaction).
    rev: u64,
    /// Feed entries made stale since the last compaction (counted from this start on).
    stale: u64,
    /// Where the compaction pass under way has got to.
    compacting: Option<u64>,
    /// Tests only: each transaction waits up to this long before COMMIT.
    write_delay_ms: u64,
    /// Reads in progress, and what recent groups were like: whether to wait for more writes.
    reads: ReadsInProgress,
    gathering: Gathering,
}

/// How the writer runs, from the settings.
pub struct Settings {
    /// How long the feed remembers deletions.
    pub retention: Duration,
    /// Tests only (`KV_TEST_WRITE_DELAY_MS`): each transaction waits up to this long before
    /// COMMIT, holding the revision counter, to provoke out-of-order commits across nodes.
    pub write_delay_ms: u64,
}

impl Writing {
    /// Runs every queued write in one transaction, then answers each job. A write that fails in
    /// SQLite rolls the whole transaction back, and the others run again without it, so nothing
    /// half-done is ever committed and one bad write does not fail its neighbours.
    fn commit(&mut self, group: &mut Vec<Job>) {
        let started = Instant::now();
        let mut failed: Vec<Option<Error>> = group.iter().map(|_| None).collect();
        let mut start_rev = self.rev;
        let mut retries = Retries::default();
        let (replies, changed) = 'attempt: loop {
            match self.store.begin_write() {
                // PostgreSQL: the counter as other nodes left it, locked until COMMIT.
                Ok(Some(rev)) => start_rev = rev,
                Ok(None) => {}
                Err(e) => {
                    let e = Error::from(e);
                    if retries.again(&e) {
                        let _ = self.store.rollback();
                        continue 'attempt;
                    }
                    log::error!("cannot begin a write transaction: {e}");
                    return fail_all_with(group, &e);
                }
            }
            self.rev = start_rev;
            let mut replies = Vec::with_capacity(group.len());
            let mut changed = Vec::new();
            for (i, job) in group.iter().enumerate() {
                if failed[i].is_some() {
                    replies.push(None);
                    continue;
                }
                match self.apply(&job.op, &mut changed) {
                    Err(e) if retries.again(&e) => {
                        let _ = self.store.rollback();
                        continue 'attempt;
                    }
                    Err(e @ (Error::Storage(_) | Error::DatabaseUnavailable(_))) => {
                        log::error!("write failed: {e}");
                        self.metrics.storage_error();
                        let e = self.disk_full_is(e);
                        let _ = self.store.rollback();
                        failed[i] = Some(e);
                        continue 'attempt;
                    }
                    reply => replies.push(Some(reply)),
                }
            }
            if self.write_delay_ms > 0 {
                thread::sleep(Duration::from_millis(jitter(self.write_delay_ms)));
            }
            let committing = Instant::now();
            let finished = if self.rev == start_rev {
                self.store.commit()
            } else {
                self.store
                    .set_revision(self.rev)
                    .and_then(|()| self.store.commit())
            };
            let commit_took = committing.elapsed();
            if let Err(e) = finished {
                let e = Error::from(e);
                let _ = self.store.rollback();
                if retries.again(&e) {
                    // A lost connection may have lost the COMMIT's answer, not the COMMIT: look
                    // before running the group again, never replay what is in.
                    // A group that changed nothing can simply run again.
                    let got_through = if self.rev == start_rev {
                        Ok(false)
                    } else {
                        self.store.committed(self.rev)
                    };
                    match got_through {
                        Ok(true) => {
                            log::warn!("the connection went during COMMIT, which got through");
                            break (replies, collection_names(changed));
                        }
                        Ok(false) => continue 'attempt,
                        Err(e) => log::error!("cannot tell whether a commit got through: {e}"),
                    }
                }
                log::error!("commit failed: {e}");
                self.metrics.storage_error();
                self.rev = start_rev;
                match self.disk_full_is(e) {
                    Error::StorageFull => {
                        for job in group.drain(..) {
                            (job.done)(Err(Error::StorageFull));
                        }
                        return;
                    }
                    e => return fail_all_with(group, &e),
                }
            }
            // Only a quota needs the size after every commit; /ready and /metrics read it then.
            if self.space.max().is_some() {
                match self.store.used_bytes() {
                    Ok(bytes) => self.space.set_used(bytes),
                    Err(e) => log::warn!("cannot read the database size: {e}"),
                }
            }
            self.gathering.committed(group.len(), commit_took);
            break (replies, collection_names(changed));
        };
        if self.rev != start_rev {
            self.watch
                .publish(self.rev, changed.iter().map(String::as_str));
        }
        self.metrics
            .commit(started.elapsed(), group.len(), self.rev - start_rev);
        for ((job, reply), failure) in group.drain(..).zip(replies).zip(failed) {
            let reply = match (reply, failure) {
                (Some(reply), _) => reply,
                (None, Some(e)) => Err(e),
                (None, None) => Err(Error::Internal("a write got no reply".into())),
            };
            // The op goes first (an import's spooled file with it), then the writer hears back.
            let Job { op, done, .. } = job;
            drop(op);
            done(reply);
        }
    }
}

fn fail_all(group: &mut Vec<Job>, why: &str) {
    for job in group.drain(..) {
        (job.done)(Err(Error::Internal(why.to_string())));
    }
}

/// Fails every write of the group: 503 when the database is unreachable, else 500.
fn fail_all_with(group: &mut Vec<Job>, e: &Error) {
    match e {
        Error::DatabaseUnavailable(why) => {
            for job in group.drain(..) {
                (job.done)(Err(Error::DatabaseUnavailable(why.clone())));
            }
        }
        _ => fail_all(group, "the write transaction failed"),
    }
}

/// The collections a group changed, each once, for the waiters.
fn collection_names(mut changed: Vec<Cow<'_, str>>) -> Vec<String> {
    changed.sort_unstable();
    changed.dedup();
    changed.into_iter().map(Cow::into_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sync;
    use crate::store::{Range, Sqlite};

    fn writer(dir: &tempfile::TempDir) -> (Writer, Store) {
        let path = dir.path().join("kv.sqlite3");
        let mut store = Sqlite::open(&path, Sync::Normal).unwrap();
        store.migrate().unwrap();
        // Storage failures on demand: writing key "boom" fails that statement, "doom" makes
        // SQLite roll back the whole transaction.
        store
            .control(
                "CREATE TEMP TRIGGER fail_on_boom BEFORE INSERT ON kv WHEN NEW.key = 'boom'
                 BEGIN SELECT RAISE(ABORT, 'boom'); END",
            )
            .unwrap();
        store
            .control(
                "CREATE TEMP TRIGGER fail_on_doom BEFORE INSERT ON kv WHEN NEW.key = 'doom'
                 BEGIN SELECT RAISE(ROLLBACK, 'doom'); END",
            )
            .unwrap();
        let reader = Store::from(Sqlite::open(&path, Sync::Normal).unwrap());
        let watch = Arc::new(Watch::new(0, 4));
        let metrics = Arc::new(Metrics::new().unwrap());
        let space = Arc::new(Space::new(dir.path(), 0, None));
        let writer = Writer::start(
            store.into(),
            watch,
            metrics,
            space,
            Settings {
                retention: Duration::from_secs(3600),
                write_delay_ms: 0,
            },
        )
        .unwrap();
        (writer, reader)
    }

    /// A queue holding `writes` writes, the writer's way into it, and a group with its first.
    fn queued(writes: usize) -> (Sender<Msg>, Receiver<Msg>, Vec<Job>) {
        let (tx, rx) = channel();
        for i in 0..writes {
            let _ = tx.send(job(&format!("k{i}")));
        }
        let first = match rx.recv().unwrap() {
            Msg::Write(job) => job,
            Msg::Stop => unreachable!(),
        };
        (tx, rx, vec![first])
    }

    fn job(key: &str) -> Msg {
        Msg::Write(Job {
            op: put(key, "1"),
            bytes: 1,
            done: Box::new(|_| {}),
        })
    }

    /// Reads in progress as a real pool of one connection counts them: one while `held`, else none.
    fn reading(dir: &tempfile::TempDir, held: bool, run: impl FnOnce(&ReadsInProgress)) {
        let reads = ReadsInProgress::default();
        let pool = crate::store::pool_of_one_counting(dir, reads.clone());
        let read = held.then(|| pool.get());
        run(&reads);
        drop(read);
    }

    /// The writer's memory right after a group of three writes whose COMMIT took 300 µs.
    fn after_a_group_of_three() -> Gathering {
        let mut gathering = Gathering::default();
        gathering.committed(3, Duration::from_micros(300));
        gathering
    }

    #[test]
    fn a_group_waits_for_writes_only_while_clients_are_reading() {
        let dir = tempfile::tempdir().unwrap();
        let mut gathering = after_a_group_of_three();
        reading(&dir, true, |reads| {
            let (tx, rx, mut group) = queued(2);
            let mut slept = None;
            let stopping = fill_group(&rx, &mut group, &mut gathering, reads, |wait| {
                slept = Some(wait);
                let _ = tx.send(job("late"));
            });
            assert!(!stopping);
            assert_eq!(slept, Some(Duration::from_micros(600)));
            assert_eq!(
                group.len(),
                3,
                "the write sent during the wait joined the group"
            );
            // A wait that gathers nothing stops the next one.
            let (_tx, rx, mut group) = queued(1);
            fill_group(&rx, &mut group, &mut gathering, reads, |_| {});
            let (_tx, rx, mut group) = queued(1);
            fill_group(&rx, &mut group, &mut gathering, reads, |_| {
                panic!("waited after a fruitless wait")
            });
        });
        reading(&dir, false, |reads| {
            let mut gathering = after_a_group_of_three();
            let (_tx, rx, mut group) = queued(2);
            fill_group(&rx, &mut group, &mut gathering, reads, |_| {
                panic!("waited with no read in progress")
            });
            assert_eq!(group.len(), 2, "what was queued");
        });
    }

    #[test]
    fn a_stop_that_arrives_during_the_wait_ends_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut gathering = after_a_group_of_three();
        reading(&dir, true, |reads| {
            let (tx, rx, mut group) = queued(1);
            let stopping = fill_group(&rx, &mut group, &mut gathering, reads, |_| {
                let _ = tx.send(job("late"));
                let _ = tx.send(Msg::Stop);
            });
            assert!(stopping);
            assert_eq!(group.len(), 2, "the write before the stop is in the group");
        });
    }

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            collection: "c".into(),
            key: key.into(),
            value: value.into(),
            cond: Cond::default(),
            ttl_secs: None,
        }
    }

    fn delete(key: &str) -> Op {
        Op::Delete {
            collection: "c".into(),
            key: key.into(),
            cond: Cond::default(),
        }
    }

    fn if_rev(rev: u64) -> Cond {
        Cond {
            if_match: Some(Tags::Revs(vec![rev])),
            if_none_match: None,
        }
    }

    #[test]
    fn writes_are_visible_to_readers_once_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let handle = writer.submitter();
        assert_eq!(handle.write(put("k", "1")).unwrap(), Outcome::Stored(1));
        assert_eq!(reader.get("c", "k").unwrap().as_deref(), Some("1"));
        assert_eq!(
            handle.write(delete("k")).unwrap(),
            Outcome::Deleted(Some(2))
        );
        assert_eq!(handle.write(delete("k")).unwrap(), Outcome::Deleted(None));
        assert_eq!(reader.revision().unwrap(), 2, "no revision for a miss");
        drop(handle);
        writer.stop();
    }

    #[test]
    fn preconditions_are_checked_against_the_state_in_the_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let w = writer.submitter();
        let create_only = Cond {
            if_match: None,
            if_none_match: Some(Tags::Any),
        };
        let put_if = |key: &str, cond: Cond| Op::Put {
            collection: "c".into(),
            key: key.into(),
            value: "1".into(),
            cond,
            ttl_secs: None,
        };
        assert_eq!(
            w.write(put_if("k", create_only.clone())).unwrap(),
            Outcome::Stored(1)
        );
        let failed = w.write(put_if("k", create_only)).unwrap_err();
        assert!(
            matches!(
                &failed,
                Error::PreconditionFailed {
                    current_rev: Some(1),
                    ..
                }
            ),
            "{failed:?}"
        );
        assert_eq!(w.write(put_if("k", if_rev(1))).unwrap(), Outcome::Stored(2));
        assert!(w.write(put_if("k", if_rev(1))).is_err(), "rev 1 is gone");
        let absent = w.write(put_if("nope", if_rev(1))).unwrap_err();
        assert!(matches!(
            absent,
            Error::PreconditionFailed {
                current_rev: None,
                ..
            }
        ));
        assert_eq!(
            reader.revision().unwrap(),
            2,
            "failed writes take no revision"
        );
        drop(w);
        writer.stop();
    }

    #[test]
    fn a_failed_check_in_a_batch_undoes_it_and_names_the_op() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let w = writer.submitter();
        w.write(put("a", "1")).unwrap();
        let check = Op::Check {
            collection: "c".into(),
            key: "a".into(),
            cond: if_rev(7),
        };
        let failed = w
            .write(Op::Batch(vec![put("b", "2"), delete("a"), check]))
            .unwrap_err();
        assert!(
            matches!(
                &failed,
                Error::PreconditionFailed {
                    index: Some(2),
                    current_rev: None,
                    ..
                }
            ),
            "a sees the delete before it: {failed:?}"
        );
        assert_eq!(reader.get("c", "b").unwrap(), None);
        assert_eq!(reader.get("c", "a").unwrap().as_deref(), Some("1"));
        // Consecutive revisions in op order, with no gap left by the failed batch.
        assert_eq!(
            w.write(Op::Batch(vec![put("b", "2"), delete("a")]))
                .unwrap(),
            Outcome::Batch(vec![Outcome::Stored(2), Outcome::Deleted(Some(3))])
        );
        drop(w);
        writer.stop();
    }

    #[test]
    fn a_batch_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let w = writer.submitter();
        let get = |key: &str| Op::Get {
            collection: "c".into(),
            key: key.into(),
        };
        let outcome = w
            .write(Op::Batch(vec![put("a", "1"), get("a"), put("b", "2")]))
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Batch(vec![
                Outcome::Stored(1),
                Outcome::Value(Some(("1".into(), 1))),
                Outcome::Stored(2)
            ])
        );
        // The third op fails in SQLite: the first two vanish with it.
        let failed = w.write(Op::Batch(vec![
            put("c", "3"),
            put("a", "changed"),
            put("boom", "1"),
        ]));
        assert!(matches!(failed, Err(Error::Storage(_))), "{failed:?}");
        assert_eq!(reader.get("c", "c").unwrap(), None);
        assert_eq!(reader.get("c", "a").unwrap().as_deref(), Some("1"));
        // The writer goes on, and a batch beside a failing one is unaffected.
        assert_eq!(w.write(put("e", "5")).unwrap(), Outcome::Stored(3));
        assert_eq!(
            w.write(Op::DeleteCollection { name: "c".into() }).unwrap(),
            Outcome::DeletedCollection { count: 3, rev: 4 }
        );
        drop(w);
        writer.stop();
    }

    #[test]
    fn a_rolled_back_group_fails_every_write_in_it_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let w = writer.submitter();
        assert!(matches!(w.write(put("boom", "1")), Err(Error::Storage(_))));
        assert!(matches!(w.write(put("doom", "1")), Err(Error::Storage(_))));
        assert_eq!(reader.get("c", "doom").unwrap(), None);
        assert_eq!(w.write(put("fine", "1")).unwrap(), Outcome::Stored(1));
        assert_eq!(reader.get("c", "fine").unwrap().as_deref(), Some("1"));
        drop(w);
        writer.stop();
    }

    #[test]
    fn a_failing_write_rolls_back_its_group_and_the_others_commit_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let w = writer.submitter();
        let (tx, rx) = channel();
        // Queued together, so they land in one group (the writer takes all that is queued).
        for key in ["a", "boom", "b", "doom", "c"] {
            let tx = tx.clone();
            let key = key.to_string();
            w.submit(
                put(&key, "1"),
                Box::new(move |reply| tx.send((key, reply)).unwrap()),
            );
        }
        let mut replies: Vec<_> = (0..5).map(|_| rx.recv().unwrap()).collect();
        replies.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, reply) in &replies {
            match key.as_str() {
                "boom" | "doom" => assert!(matches!(reply, Err(Error::Storage(_))), "{key}"),
                _ => assert!(matches!(reply, Ok(Outcome::Stored(_))), "{key}: {reply:?}"),
            }
        }
        let mut revs: Vec<u64> = ["a", "b", "c"]
            .iter()
            .map(|k| reader.rev_of("c", k).unwrap().unwrap())
            .collect();
        revs.sort();
        assert_eq!(revs.last(), Some(&reader.revision().unwrap()));
        assert_eq!(reader.get("c", "boom").unwrap(), None);
        drop(w);
        writer.stop();
    }

    #[test]
    fn the_checkpointer_moves_commits_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kv.sqlite3");
        let (writer, _reader) = writer(&dir);
        let w = writer.submitter();
        let before = std::fs::metadata(&file).unwrap().len();
        let value = format!("\"{}\"", "v".repeat(1000));
        for i in 0..1000 {
            w.write(put(&format!("k{i}"), &value)).unwrap();
        }
        // 1000 pages are below the writer's own checkpoint threshold: only the checkpointer can
        // have grown the file.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&file).unwrap().len() < before + 1_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint within 10 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
        drop(w);
        writer.stop();
        let wal = dir.path().join("kv.sqlite3-wal");
        assert!(
            !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
            "stop truncates the WAL"
        );
    }

    #[test]
    fn compaction_starts_once_enough_is_stale_and_keeps_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let w = writer.submitter();
        let entries = || -> i64 { reader.snapshot(|s| s.feed_log_len()).unwrap() };
        for i in 0..MIN_STALE_TO_COMPACT / 2 {
            w.write(put(&format!("k{}", i % 2), "1")).unwrap();
        }
        assert_eq!(w.write(Op::Compact).unwrap(), Outcome::Compacting(false));
        // Two inserts, then overwrites and a delete: MIN_STALE_TO_COMPACT stale entries.
        for i in 0..MIN_STALE_TO_COMPACT / 2 + 1 {
            w.write(put(&format!("k{}", i % 2), "1")).unwrap();
        }
        w.write(delete("k1")).unwrap();
        let feed = |s: &Store| {
            let mut all = Vec::new();
            s.changes(0, None, 100, true, |c| all.push((c.rev, c.kind)))
                .unwrap();
            all
        };
        let before = feed(&reader);
        assert_eq!(entries(), MIN_STALE_TO_COMPACT as i64 + 2);
        while w.write(Op::Compact).unwrap() == Outcome::Compacting(true) {}
        assert_eq!(entries(), 2, "one put and one tombstone are current");
        assert_eq!(feed(&reader), before);
        drop(w);
        writer.stop();
    }

    #[test]
    fn queued_bytes_hold_submitters_back_past_the_budget() {
        let queued = Arc::new(QueuedBytes::default());
        // One write larger than the whole budget still goes through when nothing else is queued.
        queued.add(MAX_QUEUED_BYTES + 1);
        let (added_tx, added) = channel();
        let waiting = queued.clone();
        let submitter = thread::spawn(move || {
            waiting.add(10);
            added_tx.send(()).unwrap();
        });
        // It cannot pass while the budget is spent (a wrong pass shows up here, never a flake).
        assert!(added.recv_timeout(Duration::from_millis(200)).is_err());
        queued.remove(MAX_QUEUED_BYTES + 1);
        added.recv_timeout(Duration::from_secs(10)).unwrap();
        submitter.join().unwrap();
        assert_eq!(*queued.bytes.lock().unwrap(), 10);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = writer(&dir);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let handle = writer.submitter();
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
        assert_eq!(reader.count_live("c", Range::default()).unwrap(), 800);
    }
}
