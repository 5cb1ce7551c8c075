//! Objects and collections: reading them, and the writes the writer thread runs with the revision
//! it assigns. Every write keeps the tombstones and the per-collection revision in step (the
//! triggers of migration 4 keep the counts).

use rusqlite::{OptionalExtension, params};

use super::Sqlite;
use crate::store::{
    COLLECTION_DELETED, DELETED, EXPIRED, Range, Version, count, now_millis, prefix_end,
};

/// The list statements: with or without an upper bound for the prefix, with or without values.
/// An object is live until its `expires_at`. The collection and the limit are bound through
/// `(SELECT ?N)` because SQLite (built with STAT4, as rusqlite bundles it) re-prepares a statement
/// on every run when a bound LIMIT, or a bound equality that feeds an ORDER BY or max() over an
/// index, could change its plan (measured with `sqlite3_stmt_status`; a LIST of 100 objects spent
/// a third of its instructions re-preparing). The same goes for every such statement in `store/`.
/// The range starts at one bound, `?2`, the greater of the cursor and the prefix: SQLite's index
/// range takes a single lower bound, and given `key > cursor AND key >= prefix` it started at the
/// cursor, so a list of a prefix with no cursor walked every key before the prefix (measured:
/// 14 ms for 100 keys behind 300k others, against 0.7 ms for the collection's first page).
const LIST_SQL: [&str; 4] = [
    "SELECT key, NULL FROM kv WHERE collection = (SELECT ?1) AND key >= ?2 AND key IS NOT ?3
     AND (expires_at IS NULL OR expires_at > ?5) ORDER BY key LIMIT (SELECT ?6)",
    "SELECT key, value FROM kv WHERE collection = (SELECT ?1) AND key >= ?2 AND key IS NOT ?3
     AND (expires_at IS NULL OR expires_at > ?5) ORDER BY key LIMIT (SELECT ?6)",
    "SELECT key, NULL FROM kv WHERE collection = (SELECT ?1) AND key >= ?2 AND key IS NOT ?3
     AND key < ?4 AND (expires_at IS NULL OR expires_at > ?5) ORDER BY key LIMIT (SELECT ?6)",
    "SELECT key, value FROM kv WHERE collection = (SELECT ?1) AND key >= ?2 AND key IS NOT ?3
     AND key < ?4 AND (expires_at IS NULL OR expires_at > ?5) ORDER BY key LIMIT (SELECT ?6)",
];

impl Sqlite {
    /// The stored JSON text of one live object.
    #[cfg(test)]
    pub fn get(&self, collection: &str, key: &str) -> Result<Option<String>, rusqlite::Error> {
        self.get_with(collection, key, |value, _| value.to_string())
    }

    /// Hands the stored JSON text of one live object and its version to `read`, without copying
    /// the text out of SQLite first.
    pub fn get_with<T>(
        &self,
        collection: &str,
        key: &str,
        read: impl FnOnce(&str, Version) -> T,
    ) -> Result<Option<T>, rusqlite::Error> {
        self.conn
            .prepare_cached(
                "SELECT value, rev, expires_at FROM kv WHERE collection = ?1 AND key = ?2
                 AND (expires_at IS NULL OR expires_at > ?3)",
            )?
            .query_row(params![collection, key, now_millis()], |row| {
                let version = Version {
                    rev: count(row.get(1)?),
                    expires_at: row.get(2)?,
                };
                Ok(read(row.get_ref(0)?.as_str()?, version))
            })
            .optional()
    }

    /// The revision of one live object; `None` when it does not exist (or has expired).
    pub fn rev_of(&self, collection: &str, key: &str) -> Result<Option<u64>, rusqlite::Error> {
        self.conn
            .prepare_cached(
                "SELECT rev FROM kv WHERE collection = ?1 AND key = ?2
                 AND (expires_at IS NULL OR expires_at > ?3)",
            )?
            .query_row(params![collection, key, now_millis()], |row| {
                row.get(0).map(count)
            })
            .optional()
    }

    /// Calls `each(key, value)` for the live objects of a range of a collection in ascending key
    /// order (`value` is `None` unless `values`); returns how many, and whether more follow
    /// (looked at only when the range has a limit).
    pub fn list(
        &self,
        collection: &str,
        range: Range<'_>,
        values: bool,
        mut each: impl FnMut(&str, Option<&str>),
    ) -> Result<(usize, bool), rusqlite::Error> {
        let upper = prefix_end(range.prefix);
        let sql = LIST_SQL[usize::from(upper.is_some()) * 2 + usize::from(values)];
        let mut stmt = self.conn.prepare_cached(sql)?;
        // One more than the limit tells whether more follow; -1 is SQLite's "no limit".
        let limit = range.limit.map_or(-1, |n| n as i64 + 1);
        let lower = match range.after {
            Some(after) if after > range.prefix => after,
            _ => range.prefix,
        };
        let mut rows = stmt.query(params![
            collection,
            lower,
            range.after,
            upper,
            now_millis(),
            limit
        ])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            if range.limit == Some(n) {
                return Ok((n, true));
            }
            each(row.get_ref(0)?.as_str()?, row.get_ref(1)?.as_str_or_null()?);
            n += 1;
        }
        Ok((n, false))
    }

    /// Calls `each(collection, key, value, expires_at)` for every live object (of one collection,
    /// or of all), ordered by collection and key, until it returns false; returns how many.
    pub fn export(
        &self,
        collection: Option<&str>,
        mut each: impl FnMut(&str, &str, &str, Option<i64>) -> bool,
    ) -> Result<u64, rusqlite::Error> {
        let sql = if collection.is_some() {
            "SELECT collection, key, value, expires_at FROM kv WHERE collection = (SELECT ?1)
             AND (expires_at IS NULL OR expires_at > ?2) ORDER BY collection, key"
        } else {
            "SELECT collection, key, value, expires_at FROM kv WHERE ?1 IS NULL
             AND (expires_at IS NULL OR expires_at > ?2) ORDER BY collection, key"
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![collection, now_millis()])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            let go_on = each(
                row.get_ref(0)?.as_str()?,
                row.get_ref(1)?.as_str()?,
                row.get_ref(2)?.as_str()?,
                row.get(3)?,
            );
            n += 1;
            if !go_on {
                break;
            }
        }
        Ok(n)
    }

    /// How many live objects a range holds (its limit aside): from the counts table when the
    /// range is the whole collection, else by counting the range.
    pub fn count_live(&self, collection: &str, range: Range<'_>) -> Result<u64, rusqlite::Error> {
        let now = now_millis();
        if range.prefix.is_empty() && range.after.is_none() {
            // The counts table still counts objects that expired but are not swept yet.
            return self
                .conn
                .prepare_cached(
                    // INDEXED BY: the planner would otherwise walk the whole collection
                    // (measured: 25 ms for 200k objects) instead of the few expired ones.
                    "SELECT coalesce((SELECT count FROM collections WHERE name = ?1), 0)
                     - (SELECT count(*) FROM kv INDEXED BY kv_expiry
                        WHERE expires_at <= ?2 AND collection = ?1)",
                )?
                .query_row(params![collection, now], |row| row.get(0).map(count));
        }
        let mut n = 0;
        self.list(collection, range, false, |_, _| n += 1)?;
        Ok(n as u64)
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
                     coalesce((SELECT max(rev) FROM changes WHERE collection = (SELECT ?1)), 0))",
            )?
            .query_row(params![name], |row| row.get(0).map(count))
    }

    /// Stores one object at revision `rev`, expiring at `expires_at` (unix ms; `None`: never).
    /// The insert trigger forgets its tombstone, if any. Says whether it replaced a stored
    /// object (live or expired but not swept yet).
    pub fn put(
        &self,
        collection: &str,
        key: &str,
        value: &str,
        rev: u64,
        expires_at: Option<i64>,
    ) -> Result<bool, rusqlite::Error> {
        // UPDATE first: most writes to existing keys are overwrites, and an upsert that sets
        // `rev` measured slower than the two statements.
        let now = now_millis();
        let args = params![collection, key, value, now, rev as i64, expires_at];
        let replaced = self
            .conn
            .prepare_cached(
                "UPDATE kv SET value = ?3, updated_at = ?4, rev = ?5, expires_at = ?6
                 WHERE collection = ?1 AND key = ?2",
            )?
            .execute(args)?
            > 0;
        if !replaced {
            self.conn
                .prepare_cached(
                    "INSERT INTO kv (collection, key, value, updated_at, rev, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(args)?;
        }
        self.log(collection, key, rev)?;
        Ok(replaced)
    }

    /// Removes one live object, leaving a tombstone at revision `rev`; says whether it was there
    /// (no tombstone when it was not). An expired object is left to the sweep.
    pub fn delete(&self, collection: &str, key: &str, rev: u64) -> Result<bool, rusqlite::Error> {
        self.remove(
            "DELETE FROM kv WHERE collection = ?1 AND key = ?2
             AND (expires_at IS NULL OR expires_at > ?3)",
            (collection, key, rev),
            DELETED,
        )
    }

    /// Up to `limit` objects that have expired by `now` (unix ms), soonest first.
    pub fn expired(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, rusqlite::Error> {
        self.conn
            .prepare_cached(
                "SELECT collection, key FROM kv WHERE expires_at <= ?1 ORDER BY expires_at LIMIT (SELECT ?2)",
            )?
            .query_map(params![now, limit as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect()
    }

    /// Removes one expired object, leaving a tombstone of kind "expired" at revision `rev`; says
    /// whether it was still there and expired.
    pub fn expire(&self, collection: &str, key: &str, rev: u64) -> Result<bool, rusqlite::Error> {
        self.remove(
            "DELETE FROM kv WHERE collection = ?1 AND key = ?2 AND expires_at <= ?3",
            (collection, key, rev),
            EXPIRED,
        )
    }

    /// Runs a statement that removes one object (parameters: collection, key, now) and, if it
    /// did, leaves its tombstone of `kind` and its feed entry at revision `rev`.
    fn remove(
        &self,
        sql: &str,
        (collection, key, rev): (&str, &str, u64),
        kind: i64,
    ) -> Result<bool, rusqlite::Error> {
        let removed =
            self.conn
                .prepare_cached(sql)?
                .execute(params![collection, key, now_millis()])?;
        if removed > 0 {
            self.bury(collection, key, kind, rev)?;
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
    use super::*;
    use crate::store::sqlite::tests::{counts, store};

    #[test]
    fn put_get_overwrite_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        assert_eq!(s.get("default", "a").unwrap(), None);
        s.put("default", "a", r#"{"n":1}"#, 1, None).unwrap();
        assert_eq!(
            s.get("default", "a").unwrap().as_deref(),
            Some(r#"{"n":1}"#)
        );
        assert_eq!(s.rev_of("default", "a").unwrap(), Some(1));
        s.put("default", "a", "2", 2, None).unwrap();
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
        s.put("a", "b:c", "1", 1, None).unwrap();
        s.put("a:b", "c", "2", 2, None).unwrap();
        assert_eq!(s.get("a", "b:c").unwrap().as_deref(), Some("1"));
        assert_eq!(s.get("a:b", "c").unwrap().as_deref(), Some("2"));
        assert_eq!(s.get("a", "b").unwrap(), None);
    }

    #[test]
    fn list_is_sorted_and_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        for (rev, key) in ["b", "a", "é", "Z"].into_iter().enumerate() {
            s.put("c", key, "null", rev as u64 + 1, None).unwrap();
        }
        s.put("other", "x", "null", 9, None).unwrap();
        let keys = |range: Range<'_>| {
            let mut keys = Vec::new();
            let (_, more) = s
                .list("c", range, true, |k, v| {
                    assert_eq!(v, Some("null"));
                    keys.push(k.to_string())
                })
                .unwrap();
            (keys, more)
        };
        assert_eq!(
            keys(Range::default()),
            (
                vec!["Z", "a", "b", "é"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                false
            )
        );
        let first = Range {
            limit: Some(2),
            ..Range::default()
        };
        assert_eq!(keys(first).0, ["Z", "a"]);
        assert!(keys(first).1, "more follow");
        let rest = Range {
            after: Some("a"),
            limit: Some(2),
            ..Range::default()
        };
        assert_eq!(keys(rest), (vec!["b".to_string(), "é".to_string()], false));
        assert_eq!(
            s.list("empty", Range::default(), true, |_, _| {}).unwrap(),
            (0, false)
        );
        assert_eq!(s.count_live("c", Range::default()).unwrap(), 4);
        assert_eq!(s.count_live("c", rest).unwrap(), 2, "the limit aside");
    }

    #[test]
    fn a_prefix_bounds_the_range_byte_wise() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        for (rev, key) in ["a", "ab", "abc", "ab\u{10FFFF}", "ac", "b", "é", "éa"]
            .into_iter()
            .enumerate()
        {
            s.put("c", key, "1", rev as u64 + 1, None).unwrap();
        }
        let under = |prefix: &str| {
            let mut keys = Vec::new();
            let range = Range {
                prefix,
                ..Range::default()
            };
            s.list("c", range, false, |k, v| {
                assert_eq!(v, None, "keys only");
                keys.push(k.to_string())
            })
            .unwrap();
            assert_eq!(s.count_live("c", range).unwrap(), keys.len() as u64);
            keys
        };
        assert_eq!(under("ab"), ["ab", "abc", "ab\u{10FFFF}"]);
        assert_eq!(under("é"), ["é", "éa"]);
        assert_eq!(under("z"), Vec::<String>::new());
        assert_eq!(under("").len(), 8);
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
    }

    #[test]
    fn a_prefix_list_starts_at_the_prefix_not_at_the_first_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.control("BEGIN IMMEDIATE").unwrap();
        for i in 0..5000 {
            s.put("c", &format!("a{i:05}"), "1", i + 1, None).unwrap();
        }
        for i in 0..10 {
            s.put("c", &format!("k{i}"), "1", 6000 + i, None).unwrap();
        }
        s.control("COMMIT").unwrap();
        let keys = |prefix: &str, after: Option<&str>| {
            let mut keys = Vec::new();
            let range = Range {
                prefix,
                after,
                ..Range::default()
            };
            s.list("c", range, false, |k, _| keys.push(k.to_string()))
                .unwrap();
            keys.join(" ")
        };
        assert_eq!(keys("k", None), "k0 k1 k2 k3 k4 k5 k6 k7 k8 k9");
        let steps = s
            .conn
            .prepare_cached(LIST_SQL[2])
            .unwrap()
            .get_status(rusqlite::StatementStatus::VmStep);
        assert!(
            steps < 1000,
            "{steps} VM steps: the range walked the 5000 keys before the prefix"
        );
        assert_eq!(
            keys("k", Some("k6")),
            "k7 k8 k9",
            "a cursor inside the prefix"
        );
        assert_eq!(keys("k", Some("a")), keys("k", None), "a cursor before it");
        assert_eq!(keys("k", Some("k9")), "", "a cursor at its end");
        assert_eq!(keys("a0499", Some("a04995")), "a04996 a04997 a04998 a04999");
    }

    #[test]
    fn an_expired_object_is_absent_for_every_read_until_swept() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let past = now_millis() - 1;
        s.put("c", "gone", "1", 1, Some(past)).unwrap();
        s.put("c", "later", "2", 2, Some(now_millis() + 60_000))
            .unwrap();
        s.put("c", "always", "3", 3, None).unwrap();
        assert_eq!(s.get("c", "gone").unwrap(), None);
        assert_eq!(s.rev_of("c", "gone").unwrap(), None);
        assert!(
            !s.delete("c", "gone", 4).unwrap(),
            "deleting an expired object finds nothing"
        );
        let mut keys = Vec::new();
        s.list("c", Range::default(), false, |k, _| {
            keys.push(k.to_string())
        })
        .unwrap();
        assert_eq!(keys, ["always", "later"]);
        assert_eq!(s.count_live("c", Range::default()).unwrap(), 2);
        assert_eq!(
            s.collection_count("c").unwrap(),
            Some((3, 3)),
            "until the sweep"
        );
        let version = s.get_with("c", "later", |_, v| v).unwrap().unwrap();
        assert_eq!(version.rev, 2);
        assert!(version.expires_at.is_some());
        assert_eq!(
            s.expired(now_millis(), 10).unwrap(),
            [("c".to_string(), "gone".to_string())]
        );
        assert!(s.expire("c", "gone", 4).unwrap());
        assert!(!s.expire("c", "later", 5).unwrap(), "not expired yet");
        assert_eq!(s.collection_count("c").unwrap(), Some((2, 4)));
        // A put makes an object permanent again, and revives an expired one.
        s.put("c", "later", "2", 5, None).unwrap();
        assert_eq!(
            s.get_with("c", "later", |_, v| v.expires_at).unwrap(),
            Some(None)
        );
    }

    #[test]
    fn collection_counts_and_revisions_follow_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.put("b", "1", "1", 1, None).unwrap();
        s.put("b", "1", "2", 2, None).unwrap(); // an overwrite is not a new object
        s.put("b", "2", "1", 3, None).unwrap();
        s.put("a", "1", "1", 4, None).unwrap();
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
