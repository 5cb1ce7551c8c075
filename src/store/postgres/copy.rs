//! The backup of a PostgreSQL store: one read snapshot copied, table by table, into a new SQLite
//! file with kv's schema. The result is what a SQLite kv's backup is (`kv restore` takes it, and
//! a SQLite kv started on it serves the same data, revisions and feed), so it is also the way
//! from a PostgreSQL kv back to a single node. `pg_dump` remains the database-level backup.

use std::path::Path;

use rusqlite::params;

use super::Postgres;
use crate::config::Sync;
use crate::store::{DbError, Sqlite};

impl Postgres {
    /// Writes the whole database, as of one snapshot, to a new SQLite file at `target`.
    pub fn backup_into(&self, target: &Path) -> Result<(), DbError> {
        let mut copy = Sqlite::open(target, Sync::Normal)?;
        copy.migrate().map_err(|e| {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                Some(e),
            ))
        })?;
        self.begin_read()?;
        let copied = self.copy_snapshot(&copy);
        let ended = self.end_read();
        copied?;
        ended?;
        // The copy is complete only once on disk as one file.
        copy.checkpoint()?;
        Ok(())
    }

    fn copy_snapshot(&self, copy: &Sqlite) -> Result<(), DbError> {
        let conn = &copy.conn;
        conn.execute_batch("BEGIN")?;
        let mut failed: Option<rusqlite::Error> = None;
        {
            let mut insert = conn.prepare(
                "INSERT INTO kv (collection, key, value, updated_at, rev, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            self.for_each_row(
                "SELECT collection, key, value, updated_at, rev, expires_at FROM kv",
                &[],
                |row| {
                    let inserted = insert.execute(params![
                        row.try_get::<_, &str>(0)?,
                        row.try_get::<_, &str>(1)?,
                        row.try_get::<_, &str>(2)?,
                        row.try_get::<_, i64>(3)?,
                        row.try_get::<_, i64>(4)?,
                        row.try_get::<_, Option<i64>>(5)?,
                    ]);
                    Ok(keep_going(inserted, &mut failed))
                },
            )?;
        }
        {
            let mut insert = conn.prepare(
                "INSERT INTO tombstones (rev, collection, key, kind, deleted_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            self.for_each_row(
                "SELECT rev, collection, key, kind, deleted_at FROM tombstones",
                &[],
                |row| {
                    let inserted = insert.execute(params![
                        row.try_get::<_, i64>(0)?,
                        row.try_get::<_, &str>(1)?,
                        row.try_get::<_, &str>(2)?,
                        i64::from(row.try_get::<_, i16>(3)?),
                        row.try_get::<_, i64>(4)?,
                    ]);
                    Ok(keep_going(inserted, &mut failed))
                },
            )?;
        }
        {
            let mut insert =
                conn.prepare("INSERT INTO changes (rev, collection, key) VALUES (?1, ?2, ?3)")?;
            self.for_each_row("SELECT rev, collection, key FROM changes", &[], |row| {
                let inserted = insert.execute(params![
                    row.try_get::<_, i64>(0)?,
                    row.try_get::<_, &str>(1)?,
                    row.try_get::<_, &str>(2)?,
                ]);
                Ok(keep_going(inserted, &mut failed))
            })?;
        }
        {
            // The counts are the triggers' (they counted the objects just inserted); the
            // revisions that outlive a collection's purged changes come from PostgreSQL.
            let mut upsert = conn.prepare(
                "INSERT INTO collections (name, count, rev) VALUES (?1, 0, ?2)
                 ON CONFLICT (name) DO UPDATE SET rev = ?2",
            )?;
            self.for_each_row("SELECT name, rev FROM collections", &[], |row| {
                let inserted = upsert.execute(params![
                    row.try_get::<_, &str>(0)?,
                    row.try_get::<_, i64>(1)?,
                ]);
                Ok(keep_going(inserted, &mut failed))
            })?;
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        let mut meta = conn.prepare("UPDATE meta SET value = ?2 WHERE name = ?1")?;
        for name in ["revision", "compacted_rev"] {
            let value = self.query_one("SELECT value FROM meta WHERE name = $1", &[&name])?;
            meta.execute(params![name, value.get::<_, i64>(0)])?;
        }
        conn.execute_batch("COMMIT")?;
        Ok(())
    }
}

/// Whether a row copied; a failure is kept (and ends the copy) to be returned once the server's
/// rows have stopped.
fn keep_going(
    inserted: Result<usize, rusqlite::Error>,
    failed: &mut Option<rusqlite::Error>,
) -> bool {
    match inserted {
        Ok(_) => true,
        Err(e) => {
            *failed = Some(e);
            false
        }
    }
}
