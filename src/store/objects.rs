//! Objects and collections: reading them, and the writes the writer thread runs with the revision
//! it assigns. Every write keeps the tombstones and the per-collection revision in step (the
//! triggers of migration 4 keep the counts).

use rusqlite::{OptionalExtension, params};

use super::{Store, count, now_millis};

/// Tombstone kinds, as stored in `tombstones.kind`.
pub(super) const DELETED: i64 = 0;
pub(super) const EXPIRED: i64 = 1;
pub(super) const COLLECTION_DELETED: i64 = 2;

impl Store {
    /// The stored JSON text of one object.
    #[cfg(test)]
    pub fn get(&self, collection: &str, key: &str) -> Result<Option<String>, rusqlite::Error> {
        self.get_with(collection, key, |value, _| value.to_string())
    }

    /// Hands the stored JSON text of one object and its revision to `read`, without copying the
    /// text out of SQLite first.
    pub fn get_with<T>(
        &self,
        collection: &str,
        key: &str,
        read: impl FnOnce(&str, u64) -> T,
    ) -> Result<Option<T>, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT value, rev FROM kv WHERE collection = ?1 AND key = ?2")?
            .query_row(params![collection, key], |row| {
                Ok(read(row.get_ref(0)?.as_str()?, count(row.get(1)?)))
            })
            .optional()
    }

    /// The revision of one object; `None` when it does not exist.
    pub fn rev_of(&self, collection: &str, key: &str) -> Result<Option<u64>, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT rev FROM kv WHERE collection = ?1 AND key = ?2")?
            .query_row(params![collection, key], |row| row.get(0).map(count))
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

    /// Calls `each(name, count, rev)` for every non-empty collection in ascending name order;
    /// returns how many.
    pub fn collections(
        &self,
        mut each: impl FnMut(&str, u64, u64),
    ) -> Result<usize, rusqlite::Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, count, max(rev,
                 coalesce((SELECT max(rev) FROM changes WHERE collection = name), 0))
             FROM collections WHERE count > 0 ORDER BY name",
        )?;
        let mut rows = stmt.query([])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            each(
                row.get_ref(0)?.as_str()?,
                count(row.get(1)?),
                count(row.get(2)?),
            );
            n += 1;
        }
        Ok(n)
    }

    /// How many objects a collection holds and its latest revision; `None` when it holds none.
    pub fn collection_count(&self, name: &str) -> Result<Option<(u64, u64)>, rusqlite::Error> {
        let Some(n) = self
            .conn
            .prepare_cached("SELECT count FROM collections WHERE name = ?1 AND count > 0")?
            .query_row(params![name], |row| row.get(0).map(count))
            .optional()?
        else {
            return Ok(None);
        };
        Ok(Some((n, self.collection_rev(name)?)))
    }

    /// How many objects there are in all.
    pub fn object_count(&self) -> Result<u64, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT coalesce(sum(count), 0) FROM collections")?
            .query_row([], |row| row.get(0).map(count))
    }

    /// The revision of the latest change in a collection (0 if it never had one); it never goes
    /// back, also when that change was a deletion the purge has since forgotten.
    pub fn collection_rev(&self, name: &str) -> Result<u64, rusqlite::Error> {
        self.conn
            .prepare_cached(
                "SELECT max(
                     coalesce((SELECT rev FROM collections WHERE name = ?1), 0),
                     coalesce((SELECT max(rev) FROM changes WHERE collection = ?1), 0))",
            )?
            .query_row(params![name], |row| row.get(0).map(count))
    }

    /// Stores one object at revision `rev` (the insert trigger forgets its tombstone, if any);
    /// says whether it replaced a live object.
    pub fn put(
        &self,
        collection: &str,
        key: &str,
        value: &str,
        rev: u64,
    ) -> Result<bool, rusqlite::Error> {
        // UPDATE first: most writes to existing keys are overwrites, and an upsert that sets
        // `rev` measured slower than the two statements.
        let now = now_millis();
        let replaced = self
            .conn
            .prepare_cached(
                "UPDATE kv SET value = ?3, updated_at = ?4, rev = ?5
                 WHERE collection = ?1 AND key = ?2",
            )?
            .execute(params![collection, key, value, now, rev as i64])?
            > 0;
        if !replaced {
            self.conn
                .prepare_cached(
                    "INSERT INTO kv (collection, key, value, updated_at, rev)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![collection, key, value, now, rev as i64])?;
        }
        self.log(collection, key, rev)?;
        Ok(replaced)
    }

    /// Removes one object, leaving a tombstone at revision `rev`; says whether it was there (no
    /// tombstone when it was not).
    pub fn delete(&self, collection: &str, key: &str, rev: u64) -> Result<bool, rusqlite::Error> {
        let removed = self
            .conn
            .prepare_cached("DELETE FROM kv WHERE collection = ?1 AND key = ?2")?
            .execute(params![collection, key])?;
        if removed > 0 {
            self.bury(collection, key, DELETED, rev)?;
        }
        Ok(removed > 0)
    }

    /// Removes every object of a collection and every tombstone it had, leaving one tombstone for
    /// the whole collection at revision `rev`; returns how many objects there were (nothing
    /// changes when there were none), and how many feed entries that made stale.
    pub fn delete_collection(&self, name: &str, rev: u64) -> Result<(u64, u64), rusqlite::Error> {
        let removed = self
            .conn
            .prepare_cached("DELETE FROM kv WHERE collection = ?1")?
            .execute(params![name])?;
        if removed == 0 {
            return Ok((0, 0));
        }
        let buried = self
            .conn
            .prepare_cached("DELETE FROM tombstones WHERE collection = ?1")?
            .execute(params![name])?;
        self.bury(name, "", COLLECTION_DELETED, rev)?;
        Ok((removed as u64, (removed + buried) as u64))
    }

    /// Leaves a tombstone (and its feed entry) at revision `rev`.
    fn bury(
        &self,
        collection: &str,
        key: &str,
        kind: i64,
        rev: u64,
    ) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached(
                "INSERT INTO tombstones (rev, collection, key, kind, deleted_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![rev as i64, collection, key, kind, now_millis()])?;
        self.log(collection, key, rev)
    }

    /// Appends a change to the feed's log.
    fn log(&self, collection: &str, key: &str, rev: u64) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("INSERT INTO changes (rev, collection, key) VALUES (?1, ?2, ?3)")?
            .execute(params![rev as i64, collection, key])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::store::tests::{counts, store};

    #[test]
    fn put_get_overwrite_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        assert_eq!(s.get("default", "a").unwrap(), None);
        s.put("default", "a", r#"{"n":1}"#, 1).unwrap();
        assert_eq!(
            s.get("default", "a").unwrap().as_deref(),
            Some(r#"{"n":1}"#)
        );
        assert_eq!(s.rev_of("default", "a").unwrap(), Some(1));
        s.put("default", "a", "2", 2).unwrap();
        assert_eq!(s.get("default", "a").unwrap().as_deref(), Some("2"));
        assert_eq!(s.rev_of("default", "a").unwrap(), Some(2));
        assert!(s.delete("default", "a", 3).unwrap());
        assert!(!s.delete("default", "a", 4).unwrap());
        assert_eq!(s.get("default", "a").unwrap(), None);
        assert_eq!(s.rev_of("default", "a").unwrap(), None);
    }

    #[test]
    fn collections_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.put("a", "b:c", "1", 1).unwrap();
        s.put("a:b", "c", "2", 2).unwrap();
        assert_eq!(s.get("a", "b:c").unwrap().as_deref(), Some("1"));
        assert_eq!(s.get("a:b", "c").unwrap().as_deref(), Some("2"));
        assert_eq!(s.get("a", "b").unwrap(), None);
    }

    #[test]
    fn list_is_sorted_and_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        for (rev, key) in ["b", "a", "é", "Z"].into_iter().enumerate() {
            s.put("c", key, "null", rev as u64 + 1).unwrap();
        }
        s.put("other", "x", "null", 9).unwrap();
        let mut keys = Vec::new();
        let n = s.list("c", |k, _| keys.push(k.to_string())).unwrap();
        assert_eq!(n, 4);
        assert_eq!(keys, ["Z", "a", "b", "é"]);
        assert_eq!(s.list("empty", |_, _| {}).unwrap(), 0);
    }

    #[test]
    fn collection_counts_and_revisions_follow_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.put("b", "1", "1", 1).unwrap();
        s.put("b", "1", "2", 2).unwrap(); // an overwrite is not a new object
        s.put("b", "2", "1", 3).unwrap();
        s.put("a", "1", "1", 4).unwrap();
        assert_eq!(
            counts(&s),
            [("a".to_string(), 1, 4), ("b".to_string(), 2, 3)]
        );
        assert_eq!(s.collection_count("b").unwrap(), Some((2, 3)));
        assert!(s.delete("b", "1", 5).unwrap());
        assert!(!s.delete("b", "1", 6).unwrap());
        assert_eq!(s.collection_count("b").unwrap(), Some((1, 5)));
        assert!(s.delete("a", "1", 7).unwrap());
        assert_eq!(
            s.collection_count("a").unwrap(),
            None,
            "an emptied collection disappears"
        );
        assert_eq!(s.collection_rev("a").unwrap(), 7, "but keeps its revision");
        assert_eq!(s.delete_collection("b", 8).unwrap(), (1, 2));
        assert_eq!(s.delete_collection("b", 9).unwrap(), (0, 0));
        assert_eq!(s.collection_rev("b").unwrap(), 8);
        assert_eq!(s.collection_rev("never").unwrap(), 0);
        assert!(counts(&s).is_empty());
    }
}
