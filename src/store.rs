//! SQLite storage: opening a connection with the right pragmas, the schema migrations, and every
//! statement kv runs.
//!
//! One `Store` is one connection. Each HTTP worker owns one for reads (WAL lets readers run beside the
//! writer, so reads never queue behind writes); the writer thread owns the only one that writes.
//! Values are stored as the JSON text the client sent and handed back as that text.

use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::config::Sync;

/// How long a connection waits for a lock before SQLite reports BUSY.
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// The schema, one entry per version: entry N takes `user_version` from N to N+1.
/// Never edit or reorder an entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the objects. The collection is its own column so no two (collection, key) pairs can collide.
    "CREATE TABLE kv (
        collection TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (collection, key)
    ) WITHOUT ROWID;",
    // 2: object counts per collection, kept by triggers in the same transaction as every write, so
    // counting a collection of a million objects is one lookup instead of a scan. A collection
    // appears here while it holds at least one object.
    "CREATE TABLE collections (
        name TEXT NOT NULL PRIMARY KEY,
        count INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TRIGGER kv_counted_insert AFTER INSERT ON kv BEGIN
        INSERT INTO collections (name, count) VALUES (NEW.collection, 1)
        ON CONFLICT (name) DO UPDATE SET count = count + 1;
    END;
    CREATE TRIGGER kv_counted_delete AFTER DELETE ON kv BEGIN
        UPDATE collections SET count = count - 1 WHERE name = OLD.collection;
        DELETE FROM collections WHERE name = OLD.collection AND count <= 0;
    END;
    INSERT INTO collections (name, count) SELECT collection, count(*) FROM kv GROUP BY collection;",
    // 3: the objects move to a rowid table (its PRIMARY KEY becomes a separate unique index). In a
    // WITHOUT ROWID table every interior b-tree cell holds a copy of the whole row, up to ~1 KB of
    // it, so large values made the tree deep: measured with 10k objects each of 100 B, 4 KiB and
    // 64 KiB, point reads of the 100 B ones fell from 376k/s to 102k/s, and 64 KiB reads ran at
    // 6.9k/s against 48k/s in a rowid table. Small-only tables read at the same speed either way.
    "CREATE TABLE kv_rowid (
        collection TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (collection, key)
    );
    INSERT INTO kv_rowid (collection, key, value, updated_at)
        SELECT collection, key, value, updated_at FROM kv ORDER BY collection, key;
    DROP TABLE kv;
    ALTER TABLE kv_rowid RENAME TO kv;
    CREATE TRIGGER kv_counted_insert AFTER INSERT ON kv BEGIN
        INSERT INTO collections (name, count) VALUES (NEW.collection, 1)
        ON CONFLICT (name) DO UPDATE SET count = count + 1;
    END;
    CREATE TRIGGER kv_counted_delete AFTER DELETE ON kv BEGIN
        UPDATE collections SET count = count - 1 WHERE name = OLD.collection;
        DELETE FROM collections WHERE name = OLD.collection AND count <= 0;
    END;",
];

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

    /// Brings the schema up to date in one transaction; refuses a database made by a newer kv.
    pub fn migrate(&mut self) -> Result<(), String> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| format!("cannot write to the database: {e}"))?;
        let version: usize = tx
            .pragma_query_value(None, "user_version", |row| row.get::<_, i64>(0))
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|_| "the database has a negative schema version".to_string())?;
        if version > MIGRATIONS.len() {
            return Err(format!(
                "the database has schema version {version}, newer than this kv knows ({}); \
                 refusing to touch it (run the newer kv)",
                MIGRATIONS.len()
            ));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            if version > 0 {
                log::info!("migrating the database to schema version {}", i + 1);
            }
            tx.execute_batch(sql)
                .map_err(|e| format!("migration to schema version {} failed: {e}", i + 1))?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)
            .map_err(|e| e.to_string())?;
        tx.commit()
            .map_err(|e| format!("cannot commit the schema: {e}"))
    }

    /// Checks the connection can read the schema (for `/health`).
    pub fn ping(&self) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT 1 FROM kv LIMIT 0")?
            .query([])?
            .next()?;
        Ok(())
    }

    /// The stored JSON text of one object.
    pub fn get(&self, collection: &str, key: &str) -> Result<Option<String>, rusqlite::Error> {
        self.get_with(collection, key, str::to_string)
    }

    /// Hands the stored JSON text of one object to `read` without copying it out of SQLite first.
    pub fn get_with<T>(
        &self,
        collection: &str,
        key: &str,
        read: impl FnOnce(&str) -> T,
    ) -> Result<Option<T>, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT value FROM kv WHERE collection = ?1 AND key = ?2")?
            .query_row(params![collection, key], |row| {
                Ok(read(row.get_ref(0)?.as_str()?))
            })
            .optional()
    }

    /// Calls `each(key, value)` for every object of a collection in ascending key order; returns the count.
    pub fn list(
        &self,
        collection: &str,
        mut each: impl FnMut(&str, &str),
    ) -> Result<usize, rusqlite::Error> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, value FROM kv WHERE collection = ?1 ORDER BY key")?;
        let mut rows = stmt.query(params![collection])?;
        let mut count = 0;
        while let Some(row) = rows.next()? {
            let key = row.get_ref(0)?.as_str()?;
            let value = row.get_ref(1)?.as_str()?;
            each(key, value);
            count += 1;
        }
        Ok(count)
    }

    /// Calls `each(name, count)` for every non-empty collection in ascending name order; returns how many.
    pub fn collections(&self, mut each: impl FnMut(&str, u64)) -> Result<usize, rusqlite::Error> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, count FROM collections ORDER BY name")?;
        let mut rows = stmt.query([])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            each(row.get_ref(0)?.as_str()?, count(row.get(1)?));
            n += 1;
        }
        Ok(n)
    }

    /// How many objects a collection holds; `None` when it holds none.
    pub fn collection_count(&self, name: &str) -> Result<Option<u64>, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT count FROM collections WHERE name = ?1")?
            .query_row(params![name], |row| row.get(0).map(count))
            .optional()
    }

    /// Removes every object of a collection; returns how many there were.
    pub fn delete_collection(&self, name: &str) -> Result<u64, rusqlite::Error> {
        let removed = self
            .conn
            .prepare_cached("DELETE FROM kv WHERE collection = ?1")?
            .execute(params![name])?;
        Ok(removed as u64)
    }

    /// Inserts or replaces one object.
    pub fn put(&self, collection: &str, key: &str, value: &str) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached(
                "INSERT INTO kv (collection, key, value, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (collection, key) DO UPDATE
                 SET value = excluded.value, updated_at = excluded.updated_at",
            )?
            .execute(params![collection, key, value, now_millis()])?;
        Ok(())
    }

    /// Removes one object; says whether it was there.
    pub fn delete(&self, collection: &str, key: &str) -> Result<bool, rusqlite::Error> {
        let removed = self
            .conn
            .prepare_cached("DELETE FROM kv WHERE collection = ?1 AND key = ?2")?
            .execute(params![collection, key])?;
        Ok(removed > 0)
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

/// A fixed set of read connections shared by the connection threads: a request takes one for as
/// long as it reads (never while it waits for a commit or for changes) and gives it back.
pub struct Pool {
    idle: Mutex<Vec<Store>>,
    returned: Condvar,
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
        })
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

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir) -> Store {
        let mut store = Store::open(&dir.path().join("kv.sqlite3"), Sync::Full).unwrap();
        store.migrate().unwrap();
        store
    }

    #[test]
    fn put_get_overwrite_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        assert_eq!(s.get("default", "a").unwrap(), None);
        s.put("default", "a", r#"{"n":1}"#).unwrap();
        assert_eq!(
            s.get("default", "a").unwrap().as_deref(),
            Some(r#"{"n":1}"#)
        );
        s.put("default", "a", "2").unwrap();
        assert_eq!(s.get("default", "a").unwrap().as_deref(), Some("2"));
        assert!(s.delete("default", "a").unwrap());
        assert!(!s.delete("default", "a").unwrap());
        assert_eq!(s.get("default", "a").unwrap(), None);
    }

    #[test]
    fn collections_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.put("a", "b:c", "1").unwrap();
        s.put("a:b", "c", "2").unwrap();
        assert_eq!(s.get("a", "b:c").unwrap().as_deref(), Some("1"));
        assert_eq!(s.get("a:b", "c").unwrap().as_deref(), Some("2"));
        assert_eq!(s.get("a", "b").unwrap(), None);
    }

    #[test]
    fn list_is_sorted_and_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        for key in ["b", "a", "é", "Z"] {
            s.put("c", key, "null").unwrap();
        }
        s.put("other", "x", "null").unwrap();
        let mut keys = Vec::new();
        let n = s.list("c", |k, _| keys.push(k.to_string())).unwrap();
        assert_eq!(n, 4);
        assert_eq!(keys, ["Z", "a", "b", "é"]);
        assert_eq!(s.list("empty", |_, _| {}).unwrap(), 0);
    }

    fn counts(s: &Store) -> Vec<(String, u64)> {
        let mut all = Vec::new();
        s.collections(|name, n| all.push((name.to_string(), n)))
            .unwrap();
        all
    }

    #[test]
    fn collection_counts_follow_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.put("b", "1", "1").unwrap();
        s.put("b", "1", "2").unwrap(); // an overwrite is not a new object
        s.put("b", "2", "1").unwrap();
        s.put("a", "1", "1").unwrap();
        assert_eq!(counts(&s), [("a".to_string(), 1), ("b".to_string(), 2)]);
        assert_eq!(s.collection_count("b").unwrap(), Some(2));
        assert!(s.delete("b", "1").unwrap());
        assert!(!s.delete("b", "1").unwrap());
        assert_eq!(s.collection_count("b").unwrap(), Some(1));
        assert!(s.delete("a", "1").unwrap());
        assert_eq!(
            s.collection_count("a").unwrap(),
            None,
            "an emptied collection disappears"
        );
        assert_eq!(s.delete_collection("b").unwrap(), 1);
        assert_eq!(s.delete_collection("b").unwrap(), 0);
        assert!(counts(&s).is_empty());
    }

    #[test]
    fn migrating_a_version_1_database_counts_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.sqlite3");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "INSERT INTO kv VALUES ('x', 'a', '1', 0), ('x', 'b', '1', 0), ('y', 'a', '1', 0);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let mut s = Store::open(&path, Sync::Full).unwrap();
        s.migrate().unwrap();
        assert_eq!(counts(&s), [("x".to_string(), 2), ("y".to_string(), 1)]);
        assert_eq!(
            s.get("x", "b").unwrap().as_deref(),
            Some("1"),
            "objects kept"
        );
        s.put("y", "b", "1").unwrap();
        assert_eq!(
            s.collection_count("y").unwrap(),
            Some(2),
            "triggers still count"
        );
        assert!(s.delete("x", "a").unwrap());
        assert_eq!(s.collection_count("x").unwrap(), Some(1));
        let without_rowid: i64 = s
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'kv' AND sql LIKE '%WITHOUT ROWID%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(without_rowid, 0, "kv is a rowid table from version 3 on");
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
        assert_eq!(version, MIGRATIONS.len() as i64);
        let sync: i64 = s
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
    }

    #[test]
    fn migrate_is_idempotent_and_refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(&dir);
        s.put("c", "k", "1").unwrap();
        s.migrate().unwrap();
        assert_eq!(s.get("c", "k").unwrap().as_deref(), Some("1"));
        s.conn
            .pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .unwrap();
        let err = s.migrate().unwrap_err();
        assert!(err.contains("newer"), "{err}");
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
