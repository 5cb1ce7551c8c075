//! The schema and its migrations: one SQL string per version, applied in order in one transaction
//! before anything else touches the database.

use super::Sqlite;

/// The schema, one entry per version: entry N takes `user_version` from N to N+1.
/// Never edit or reorder an entry; append a new one.
pub(in crate::store) const MIGRATIONS: &[&str] = &[
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
    // 4: revisions and the change feed. Every change gets the next store-wide revision: an
    // object's `rev` is that of the write that last stored it. Each change also appends one row to
    // `changes`, the feed's log, in revision order: appending costs little, where keeping one
    // entry per key in revision order would move an index entry on every overwrite (measured in
    // SQLite: 30 us per random overwrite against 11 us before, and 14 us with the log). An entry
    // is current while its key is still at that revision (in `kv`, or as a tombstone); the feed
    // skips the others and a background compaction deletes them. Deleted objects (and deleted
    // collections, under the key '') become tombstones until the retention purge forgets them.
    // `collections.rev` only keeps a collection's revision from going back when its latest change
    // is purged. `meta` keeps the counter (no table can tell the highest revision once
    // tombstones are forgotten) and the highest revision the purge has forgotten. Objects
    // written before get revisions 1..N in (collection, key) order.
    "ALTER TABLE kv ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
    UPDATE kv SET rev = numbered.n
        FROM (SELECT rowid AS id, row_number() OVER (ORDER BY collection, key) AS n FROM kv)
        AS numbered
        WHERE kv.rowid = numbered.id;
    CREATE TABLE changes (
        rev INTEGER PRIMARY KEY,
        collection TEXT NOT NULL,
        key TEXT NOT NULL
    );
    INSERT INTO changes (rev, collection, key) SELECT rev, collection, key FROM kv ORDER BY rev;
    CREATE INDEX changes_by_collection ON changes (collection, rev);
    CREATE TABLE tombstones (
        rev INTEGER PRIMARY KEY,
        collection TEXT NOT NULL,
        key TEXT NOT NULL,
        kind INTEGER NOT NULL,
        deleted_at INTEGER NOT NULL,
        UNIQUE (collection, key)
    );
    ALTER TABLE collections ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE meta (name TEXT NOT NULL PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO meta (name, value) VALUES
        ('revision', (SELECT count(*) FROM kv)), ('compacted_rev', 0);
    DROP TRIGGER kv_counted_insert;
    CREATE TRIGGER kv_counted_insert AFTER INSERT ON kv BEGIN
        INSERT INTO collections (name, count) VALUES (NEW.collection, 1)
        ON CONFLICT (name) DO UPDATE SET count = count + 1;
        DELETE FROM tombstones WHERE collection = NEW.collection AND key = NEW.key;
    END;
    DROP TRIGGER kv_counted_delete;
    CREATE TRIGGER kv_counted_delete AFTER DELETE ON kv BEGIN
        UPDATE collections SET count = count - 1 WHERE name = OLD.collection;
    END;",
    // 5: objects that expire: `expires_at` (unix ms) is NULL for permanent objects. Reads leave
    // out an object from the moment it expires; the sweep finds the expired ones through the
    // partial index (only objects with a TTL are in it) and deletes them with a revision each.
    "ALTER TABLE kv ADD COLUMN expires_at INTEGER;
    CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;",
];

impl Sqlite {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sync;
    use crate::store::sqlite::tests::{counts, store};
    use rusqlite::Connection;

    /// A database at `version` holding `sql`'s rows, as an older kv left it.
    fn old_database(dir: &tempfile::TempDir, version: usize, sql: &str) -> Sqlite {
        let path = dir.path().join("kv.sqlite3");
        {
            let conn = Connection::open(&path).unwrap();
            for migration in &MIGRATIONS[..version] {
                conn.execute_batch(migration).unwrap();
            }
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", version as i64)
                .unwrap();
        }
        let mut s = Sqlite::open(&path, Sync::Full).unwrap();
        s.migrate().unwrap();
        s
    }

    #[test]
    fn migrating_a_version_1_database_counts_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let s = old_database(
            &dir,
            1,
            "INSERT INTO kv VALUES ('x', 'a', '1', 0), ('x', 'b', '1', 0), ('y', 'a', '1', 0);",
        );
        assert_eq!(
            counts(&s),
            [("x".to_string(), 2, 2), ("y".to_string(), 1, 3)]
        );
        assert_eq!(
            s.get("x", "b").unwrap().as_deref(),
            Some("1"),
            "objects kept"
        );
        s.put("y", "b", "1", 4, None).unwrap();
        assert_eq!(
            s.collection_count("y").unwrap(),
            Some((2, 4)),
            "triggers still count"
        );
        assert!(s.delete("x", "a", 5).unwrap());
        assert_eq!(s.collection_count("x").unwrap(), Some((1, 5)));
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
    fn migrating_a_version_3_database_numbers_its_objects_and_counts_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = old_database(
            &dir,
            3,
            "INSERT INTO kv VALUES ('b', 'z', '1', 0), ('a', 'y', '2', 0), ('b', 'a', '3', 0);",
        );
        // Revisions 1..N in (collection, key) order; the counter continues above them.
        assert_eq!(s.rev_of("a", "y").unwrap(), Some(1));
        assert_eq!(s.rev_of("b", "a").unwrap(), Some(2));
        assert_eq!(s.rev_of("b", "z").unwrap(), Some(3));
        assert_eq!(s.revision().unwrap(), 3);
        assert_eq!(s.compacted_rev().unwrap(), 0);
        assert_eq!(
            counts(&s),
            [("a".to_string(), 1, 1), ("b".to_string(), 2, 3)]
        );
        let mut feed = Vec::new();
        s.changes(0, None, 10, false, |c| {
            feed.push((c.rev, c.key.to_string()))
        })
        .unwrap();
        assert_eq!(feed, [(1, "y".into()), (2, "a".into()), (3, "z".into())]);
    }

    #[test]
    fn migrate_is_idempotent_and_refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(&dir);
        s.put("c", "k", "1", 1, None).unwrap();
        s.migrate().unwrap();
        assert_eq!(s.get("c", "k").unwrap().as_deref(), Some("1"));
        s.conn
            .pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .unwrap();
        let err = s.migrate().unwrap_err();
        assert!(err.contains("newer"), "{err}");
    }
}
