//! The SQLite backend, kv's embedded default: opening a connection with the right pragmas. The
//! schema lives in `schema.rs`, objects and collections in `objects.rs`, the change feed in
//! `changes.rs`.
//!
//! One `Sqlite` is one connection. Reads take one from the pool (WAL lets readers run beside the
//! writer, so reads never queue behind writes); the writer thread owns the only one that writes.
//! Values are stored as the JSON text the client sent and handed back as that text.

mod changes;
mod objects;
pub(super) mod schema;

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{Stats, count};
use crate::config::Sync;

/// Prepared statements kept per connection: more than kv has.
const STATEMENT_CACHE_CAPACITY: usize = 64;
/// How long a connection waits for a lock before SQLite reports BUSY.
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// One SQLite connection with kv's statements.
pub struct Sqlite {
    pub(in crate::store) conn: Connection,
    sync: Sync,
}

impl Sqlite {
    /// Opens (creating if missing) the database file with WAL, the given sync mode and a busy timeout.
    pub fn open(path: &Path, sync: Sync) -> Result<Sqlite, rusqlite::Error> {
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
        Ok(Sqlite { conn, sync })
    }

    /// Another connection to the same database, with the same settings.
    pub fn reopen(&self) -> Result<Sqlite, rusqlite::Error> {
        let path = self
            .conn
            .path()
            .ok_or(rusqlite::Error::InvalidPath("".into()))?;
        Sqlite::open(Path::new(path), self.sync)
    }

    /// Creates the data directory if missing, opens the database file in it and migrates the schema:
    /// everything startup needs, with errors worded for the one line kv prints before exiting.
    pub fn open_and_migrate(file: &Path, sync: Sync) -> Result<Sqlite, String> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
        }
        let mut store = Sqlite::open(file, sync)
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
                used_bytes: s.used_bytes()?,
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

    pub fn begin_read(&self) -> Result<(), rusqlite::Error> {
        self.control("BEGIN")
    }

    pub fn end_read(&self) -> Result<(), rusqlite::Error> {
        self.control("COMMIT")
    }

    /// `BEGIN IMMEDIATE`: takes the write lock now rather than at the first write.
    pub fn begin_write(&self) -> Result<Option<u64>, rusqlite::Error> {
        self.control("BEGIN IMMEDIATE").map(|()| None)
    }

    pub fn commit(&self) -> Result<(), rusqlite::Error> {
        self.control("COMMIT")
    }

    /// Rolls back the open transaction; none is open after some errors (SQLite ended it).
    pub fn rollback(&self) -> Result<(), rusqlite::Error> {
        if self.is_autocommit() {
            return Ok(());
        }
        self.control("ROLLBACK")
    }

    pub fn savepoint(&self) -> Result<(), rusqlite::Error> {
        self.control("SAVEPOINT batch")
    }

    pub fn rollback_to_savepoint(&self) -> Result<(), rusqlite::Error> {
        self.control("ROLLBACK TO batch")?;
        self.control("RELEASE batch")
    }

    pub fn release_savepoint(&self) -> Result<(), rusqlite::Error> {
        self.control("RELEASE batch")
    }

    /// Copies the whole WAL into the database file and empties it, so a stopped kv leaves one file.
    pub fn checkpoint(&self) -> Result<(), rusqlite::Error> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }

    /// Copies what it can of the WAL into the database file without waiting for anyone; returns
    /// how many frames (pages) the WAL holds since it last started over.
    pub fn checkpoint_passive(&self) -> Result<u64, rusqlite::Error> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                // -1 when the database is not in WAL mode, which kv never leaves.
                row.get::<_, i64>(1).map(|frames| frames.max(0) as u64)
            })
    }

    /// Whether every commit syncs the WAL (`KV_SYNC=full`), so a checkpoint never has to.
    pub fn syncs_wal_at_commit(&self) -> bool {
        self.sync == Sync::Full
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A migrated store in a temporary directory.
    pub(crate) fn store(dir: &tempfile::TempDir) -> Sqlite {
        let mut store = Sqlite::open(&dir.path().join("kv.sqlite3"), Sync::Full).unwrap();
        store.migrate().unwrap();
        store
    }

    /// Every non-empty collection as (name, count, rev).
    pub(crate) fn counts(s: &Sqlite) -> Vec<(String, u64, u64)> {
        let mut all = Vec::new();
        s.collections(|name, n, rev| all.push((name.to_string(), n, rev)))
            .unwrap();
        all
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
        let err = Sqlite::open(&path, Sync::Full).err().unwrap();
        assert!(err.to_string().contains("not a database"), "{err}");
    }
}
