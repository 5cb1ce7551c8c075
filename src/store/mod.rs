//! SQLite storage: opening a connection with the right pragmas, and the pool of read connections.
//! The schema lives in `schema.rs`, objects and collections in `objects.rs`, the change feed in
//! `changes.rs`.
//!
//! One `Store` is one connection. Reads take one from the `Pool` (WAL lets readers run beside the
//! writer, so reads never queue behind writes); the writer thread owns the only one that writes.
//! Values are stored as the JSON text the client sent and handed back as that text.

pub mod backup;
mod changes;
mod objects;
mod schema;

pub use changes::{Change, ChangeKind, Page};
pub use objects::Range;

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};

use crate::config::Sync;

/// The collection used when a request names none.
pub const DEFAULT_COLLECTION: &str = "default";

/// Prepared statements kept per connection: more than kv has.
const STATEMENT_CACHE_CAPACITY: usize = 64;
/// How long a connection waits for a lock before SQLite reports BUSY.
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// One SQLite connection with kv's statements.
pub struct Store {
    conn: Connection,
    sync: Sync,
}

impl Store {
    /// Opens (creating if missing) the database file with WAL, the given sync mode and a busy timeout.
    pub fn open(path: &Path, sync: Sync) -> Result<Store, rusqlite::Error> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!(
                    "cannot switch the database to WAL mode (it stays in '{mode}' mode)"
                )),
            ));
        }
        let synchronous = match sync {
            Sync::Full => "FULL",
            Sync::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        // Every statement kv runs stays prepared: rusqlite keeps 16 by default, fewer than the
        // writer alone uses, and a miss costs a full parse (callgrind: 2,187 prepares for 2,000
        // PUTs before this).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        Ok(Store { conn, sync })
    }

    /// Another connection to the same database, with the same settings.
    pub fn reopen(&self) -> Result<Store, rusqlite::Error> {
        let path = self
            .conn
            .path()
            .ok_or(rusqlite::Error::InvalidPath("".into()))?;
        Store::open(Path::new(path), self.sync)
    }

    /// Creates the data directory if missing, opens the database file in it and migrates the schema:
    /// everything startup needs, with errors worded for the one line kv prints before exiting.
    pub fn open_and_migrate(file: &Path, sync: Sync) -> Result<Store, String> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
        }
        let mut store = Store::open(file, sync)
            .map_err(|e| format!("cannot open the database {}: {e}", file.display()))?;
        store
            .migrate()
            .map_err(|e| format!("cannot use the database {}: {e}", file.display()))?;
        Ok(store)
    }

    /// Sizes and counts for the metrics, from one snapshot.
    pub fn stats(&self) -> Result<Stats, rusqlite::Error> {
        self.snapshot(|s| {
            let file = |suffix: &str| -> u64 {
                s.conn
                    .path()
                    .and_then(|p| std::fs::metadata(format!("{p}{suffix}")).ok())
                    .map_or(0, |m| m.len())
            };
            Ok(Stats {
                objects: s.object_count()?,
                collections: s.conn.query_row(
                    "SELECT count(*) FROM collections WHERE count > 0",
                    [],
                    |row| row.get::<_, i64>(0).map(count),
                )?,
                database_bytes: file(""),
                wal_bytes: file("-wal"),
                revision: s.revision()?,
            })
        })
    }

    /// Bytes of database pages in use: free pages left by deletes are reused, so they do not count.
    pub fn used_bytes(&self) -> Result<u64, rusqlite::Error> {
        self.conn
            .prepare_cached(
                "SELECT (page_count - freelist_count) * page_size
                 FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()",
            )?
            .query_row([], |row| row.get(0).map(count))
    }

    /// Checks the connection can read the schema (for `/health`).
    pub fn ping(&self) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT 1 FROM kv LIMIT 0")?
            .query([])?
            .next()?;
        Ok(())
    }

    /// Runs a statement that controls transactions (`BEGIN IMMEDIATE`, `COMMIT`, `SAVEPOINT s`, ...).
    pub fn control(&self, sql: &str) -> Result<(), rusqlite::Error> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// Copies the whole WAL into the database file and empties it, so a stopped kv leaves one file.
    pub fn checkpoint(&self) -> Result<(), rusqlite::Error> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }

    /// Copies what it can of the WAL into the database file without waiting for anyone.
    pub fn checkpoint_passive(&self) -> Result<(), rusqlite::Error> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
    }

    /// Makes this connection checkpoint by itself only once the WAL holds `pages` pages, and
    /// truncate a WAL file that grew past `max_wal_bytes` when it starts over.
    pub fn limit_wal(&self, pages: u32, max_wal_bytes: u64) -> Result<(), rusqlite::Error> {
        self.conn
            .query_row(&format!("PRAGMA wal_autocheckpoint = {pages}"), [], |_| {
                Ok(())
            })?;
        self.conn.query_row(
            &format!("PRAGMA journal_size_limit = {max_wal_bytes}"),
            [],
            |_| Ok(()),
        )
    }

    /// True when no transaction is open (SQLite rolls one back by itself after some errors).
    pub fn is_autocommit(&self) -> bool {
        self.conn.is_autocommit()
    }
}

/// What `/metrics` reports of the store.
pub struct Stats {
    pub objects: u64,
    pub collections: u64,
    pub database_bytes: u64,
    pub wal_bytes: u64,
    pub revision: u64,
}

/// A fixed set of read connections shared by the connection threads: a request takes one for as
/// long as it reads (never while it waits for a commit or for changes) and gives it back.
pub struct Pool {
    idle: Mutex<Vec<Store>>,
    returned: Condvar,
    path: PathBuf,
    sync: Sync,
}

/// A read connection checked out of a `Pool`; goes back when dropped.
pub struct Pooled<'a> {
    pool: &'a Pool,
    store: Option<Store>,
}

impl Pool {
    /// Opens `size` read connections to the database file.
    pub fn open(path: &Path, sync: Sync, size: usize) -> Result<Pool, rusqlite::Error> {
        let idle = (0..size)
            .map(|_| Store::open(path, sync))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pool {
            idle: Mutex::new(idle),
            returned: Condvar::new(),
            path: path.to_path_buf(),
            sync,
        })
    }

    /// A connection of its own, outside the pool, for a read that may take long (a list streamed
    /// to a slow client must not keep a pooled connection from the others).
    pub fn dedicated(&self) -> Result<Store, rusqlite::Error> {
        Store::open(&self.path, self.sync)
    }

    /// A connection, waiting for one to come back when all are in use.
    pub fn get(&self) -> Pooled<'_> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(store) = idle.pop() {
                return Pooled {
                    pool: self,
                    store: Some(store),
                };
            }
            idle = self.returned.wait(idle).unwrap_or_else(|e| e.into_inner());
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
        if let Some(store) = self.store.take() {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push(store);
            drop(idle);
            self.pool.returned.notify_one();
        }
    }
}

/// SQLite integers are signed; a count is never negative.
fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The wall clock in unix milliseconds.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A migrated store in a temporary directory.
    pub(crate) fn store(dir: &tempfile::TempDir) -> Store {
        let mut store = Store::open(&dir.path().join("kv.sqlite3"), Sync::Full).unwrap();
        store.migrate().unwrap();
        store
    }

    /// Every non-empty collection as (name, count, rev).
    pub(crate) fn counts(s: &Store) -> Vec<(String, u64, u64)> {
        let mut all = Vec::new();
        s.collections(|name, n, rev| all.push((name.to_string(), n, rev)))
            .unwrap();
        all
    }

    #[test]
    fn the_pool_lends_each_connection_to_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.sqlite3");
        store(&dir);
        let pool = std::sync::Arc::new(Pool::open(&path, Sync::Full, 1).unwrap());
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
    fn wal_mode_and_schema_version_are_set() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let mode: String = s
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = s
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, schema::MIGRATIONS.len() as i64);
        let sync: i64 = s
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.sqlite3");
        std::fs::write(&path, vec![b'x'; 8192]).unwrap();
        let err = Store::open(&path, Sync::Full).err().unwrap();
        assert!(err.to_string().contains("not a database"), "{err}");
    }
}
