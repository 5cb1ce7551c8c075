//! The change feed's storage: the revision counter, the feed query (one range scan of the log in
//! revision order, skipping entries whose key has changed since), the compaction that deletes
//! those stale entries, and the purge that forgets old tombstones.

use rusqlite::params;

use super::Sqlite;
use crate::store::{Change, ChangeKind, Page, count};

/// The four shapes of the feed query: one collection or all, with or without values. An entry
/// is current when its key is still at its revision, live in `kv` or as a tombstone.
const FEED_SQL: [&str; 4] = [
    "SELECT c.rev, c.collection, c.key, NULL, t.kind, kv.expires_at FROM changes AS c
     LEFT JOIN kv ON kv.collection = c.collection AND kv.key = c.key AND kv.rev = c.rev
     LEFT JOIN tombstones AS t ON t.rev = c.rev
     WHERE c.rev > ?1 AND (kv.rev IS NOT NULL OR t.rev IS NOT NULL)
     ORDER BY c.rev LIMIT (SELECT ?3)",
    "SELECT c.rev, c.collection, c.key, kv.value, t.kind, kv.expires_at FROM changes AS c
     LEFT JOIN kv ON kv.collection = c.collection AND kv.key = c.key AND kv.rev = c.rev
     LEFT JOIN tombstones AS t ON t.rev = c.rev
     WHERE c.rev > ?1 AND (kv.rev IS NOT NULL OR t.rev IS NOT NULL)
     ORDER BY c.rev LIMIT (SELECT ?3)",
    "SELECT c.rev, c.collection, c.key, NULL, t.kind, kv.expires_at FROM changes AS c
     LEFT JOIN kv ON kv.collection = c.collection AND kv.key = c.key AND kv.rev = c.rev
     LEFT JOIN tombstones AS t ON t.rev = c.rev
     WHERE c.collection = (SELECT ?2) AND c.rev > ?1 AND (kv.rev IS NOT NULL OR t.rev IS NOT NULL)
     ORDER BY c.rev LIMIT (SELECT ?3)",
    "SELECT c.rev, c.collection, c.key, kv.value, t.kind, kv.expires_at FROM changes AS c
     LEFT JOIN kv ON kv.collection = c.collection AND kv.key = c.key AND kv.rev = c.rev
     LEFT JOIN tombstones AS t ON t.rev = c.rev
     WHERE c.collection = (SELECT ?2) AND c.rev > ?1 AND (kv.rev IS NOT NULL OR t.rev IS NOT NULL)
     ORDER BY c.rev LIMIT (SELECT ?3)",
];

impl Sqlite {
    /// Runs `read` inside one read transaction, so everything it reads comes from one snapshot.
    pub fn snapshot<T, E: From<rusqlite::Error>>(
        &self,
        read: impl FnOnce(&Sqlite) -> Result<T, E>,
    ) -> Result<T, E> {
        self.control("BEGIN")?;
        let result = read(self);
        self.control("COMMIT")?;
        result
    }

    /// The store-wide revision: the revision of the latest change ever committed.
    pub fn revision(&self) -> Result<u64, rusqlite::Error> {
        self.meta("revision")
    }

    /// The highest revision of a tombstone the purge has forgotten (0 if none): a feed read must
    /// start at or after it to miss nothing.
    pub fn compacted_rev(&self) -> Result<u64, rusqlite::Error> {
        self.meta("compacted_rev")
    }

    fn meta(&self, name: &str) -> Result<u64, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE name = ?1")?
            .query_row(params![name], |row| row.get(0).map(count))
    }

    /// Records the store-wide revision (the writer, once per transaction).
    pub fn set_revision(&self, rev: u64) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'revision'")?
            .execute(params![rev as i64])?;
        Ok(())
    }

    /// Calls `each` for up to `limit` entries after revision `since`, in revision order, of one
    /// collection or of all. Call it inside `snapshot` so that `current_rev` matches the entries.
    pub fn changes(
        &self,
        since: u64,
        collection: Option<&str>,
        limit: usize,
        values: bool,
        mut each: impl FnMut(&Change<'_>),
    ) -> Result<Page, rusqlite::Error> {
        let current_rev = self.revision()?;
        let sql = FEED_SQL[usize::from(collection.is_some()) * 2 + usize::from(values)];
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![
            since as i64,
            collection.unwrap_or(""),
            limit as i64 + 1
        ])?;
        let mut page = Page::new(current_rev);
        while let Some(row) = rows.next()? {
            if !page.has_room(limit) {
                break;
            }
            let tombstone = row.get::<_, Option<i64>>(4)?;
            let kind = ChangeKind::from_tombstone(tombstone).ok_or(
                rusqlite::Error::IntegralValueOutOfRange(4, tombstone.unwrap_or(0)),
            )?;
            let change = Change {
                rev: count(row.get(0)?),
                collection: row.get_ref(1)?.as_str()?,
                key: row.get_ref(2)?.as_str()?,
                kind,
                value: row.get_ref(3)?.as_str_or_null()?,
                expires_at: row.get(5)?,
            };
            each(&change);
            page.add(change.rev);
        }
        Ok(page)
    }

    /// The collections changed by revisions in `(after, upto]`.
    pub fn changed_collections(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<Vec<String>, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT DISTINCT collection FROM changes WHERE rev > ?1 AND rev <= ?2")?
            .query_map(params![after as i64, upto as i64], |row| row.get(0))?
            .collect()
    }

    /// How many entries the feed's log holds, stale ones included.
    #[cfg(test)]
    pub fn feed_log_len(&self) -> Result<i64, rusqlite::Error> {
        self.conn
            .query_row("SELECT count(*) FROM changes", [], |row| row.get(0))
    }

    /// Forgets up to `limit` of the oldest tombstones made before `before_ms` (unix ms), with
    /// their feed entries, raising the compacted revision to the highest one forgotten; returns
    /// how many were forgotten.
    pub fn purge_tombstones(&self, before_ms: i64, limit: usize) -> Result<usize, rusqlite::Error> {
        // Only the oldest `limit` tombstones by revision are looked at, so a purge costs the same
        // however many are young (revision order is deletion-time order, unless the clock went
        // back, which only keeps some tombstones longer).
        let purged: Vec<(i64, String)> = self
            .conn
            .prepare_cached(
                "DELETE FROM tombstones WHERE rev IN (
                     SELECT rev FROM (SELECT rev, deleted_at FROM tombstones ORDER BY rev LIMIT (SELECT ?2))
                     WHERE deleted_at < ?1)
                 RETURNING rev, collection",
            )?
            .query_map(params![before_ms, limit as i64], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        for (rev, collection) in &purged {
            self.conn
                .prepare_cached("DELETE FROM changes WHERE rev = ?1")?
                .execute(params![rev])?;
            // The collection's revision must not go back now that its entry is gone.
            self.conn
                .prepare_cached("UPDATE collections SET rev = max(rev, ?1) WHERE name = ?2")?
                .execute(params![rev, collection])?;
        }
        if let Some(highest) = purged.iter().map(|(rev, _)| *rev).max() {
            self.conn
                .prepare_cached(
                    "UPDATE meta SET value = max(value, ?1) WHERE name = 'compacted_rev'",
                )?
                .execute(params![highest])?;
        }
        Ok(purged.len())
    }

    /// Deletes the stale entries among the (up to) `window` feed entries after revision `after`;
    /// returns the revision to continue after (`None` at the end of the log) and how many went.
    pub fn compact(
        &self,
        after: u64,
        window: usize,
    ) -> Result<(Option<u64>, usize), rusqlite::Error> {
        let end: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT max(rev) FROM (SELECT rev FROM changes WHERE rev > ?1 ORDER BY rev LIMIT (SELECT ?2))",
            )?
            .query_row(params![after as i64, window as i64], |row| row.get(0))?;
        let Some(end) = end else {
            return Ok((None, 0));
        };
        let removed = self
            .conn
            .prepare_cached(
                "DELETE FROM changes WHERE rev > ?1 AND rev <= ?2
                 AND NOT EXISTS (SELECT 1 FROM kv WHERE kv.collection = changes.collection
                                 AND kv.key = changes.key AND kv.rev = changes.rev)
                 AND NOT EXISTS (SELECT 1 FROM tombstones WHERE tombstones.rev = changes.rev)",
            )?
            .execute(params![after as i64, end])?;
        Ok((Some(count(end)), removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::store;

    fn feed(s: &Sqlite, since: u64, collection: Option<&str>, limit: usize) -> (Vec<String>, Page) {
        let mut seen = Vec::new();
        let page = s
            .snapshot(|s| {
                s.changes(since, collection, limit, true, |c| {
                    seen.push(format!(
                        "{} {:?} {}/{} {}",
                        c.rev,
                        c.kind,
                        c.collection,
                        c.key,
                        c.value.unwrap_or("-")
                    ))
                })
            })
            .unwrap();
        (seen, page)
    }

    fn write<T>(s: &Sqlite, rev: u64, f: impl FnOnce(&Sqlite) -> T) {
        s.control("BEGIN IMMEDIATE").unwrap();
        f(s);
        s.set_revision(rev).unwrap();
        s.control("COMMIT").unwrap();
    }

    #[test]
    fn the_feed_holds_the_latest_state_of_each_key_in_revision_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        write(&s, 1, |s| s.put("c", "a", "1", 1, None).unwrap());
        write(&s, 2, |s| s.put("c", "b", "2", 2, None).unwrap());
        write(&s, 3, |s| s.put("d", "a", "3", 3, None).unwrap());
        write(&s, 4, |s| s.put("c", "a", "4", 4, None).unwrap());
        write(&s, 5, |s| assert!(s.delete("c", "b", 5).unwrap()));
        let (all, page) = feed(&s, 0, None, 10);
        assert_eq!(all, ["3 Put d/a 3", "4 Put c/a 4", "5 Delete c/b -"]);
        assert_eq!(
            page,
            Page {
                count: 3,
                last_rev: 5,
                more: false,
                current_rev: 5
            }
        );
        let (c, page) = feed(&s, 3, Some("c"), 1);
        assert_eq!(c, ["4 Put c/a 4"]);
        assert!(page.more);
        let (none, page) = feed(&s, 5, None, 10);
        assert!(none.is_empty());
        assert_eq!((page.last_rev, page.more), (5, false));
        // A put revives a deleted key: its tombstone goes.
        write(&s, 6, |s| s.put("c", "b", "6", 6, None).unwrap());
        assert_eq!(feed(&s, 0, Some("c"), 10).0, ["4 Put c/a 4", "6 Put c/b 6"]);
        // A collection delete supersedes everything before it in that collection.
        write(&s, 7, |s| {
            assert_eq!(s.delete_collection("c", 7).unwrap(), (2, 2))
        });
        assert_eq!(
            feed(&s, 0, None, 10).0,
            ["3 Put d/a 3", "7 DeleteCollection c/ -"]
        );
    }

    #[test]
    fn the_purge_forgets_old_tombstones_and_remembers_how_far() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        write(&s, 2, |s| {
            s.put("c", "a", "1", 1, None).unwrap();
            s.put("c", "b", "1", 2, None).unwrap();
        });
        write(&s, 4, |s| {
            s.delete("c", "a", 3).unwrap();
            s.delete("c", "b", 4).unwrap();
        });
        assert_eq!(s.compacted_rev().unwrap(), 0);
        assert_eq!(s.purge_tombstones(0, 100).unwrap(), 0, "none is that old");
        assert_eq!(s.purge_tombstones(i64::MAX, 1).unwrap(), 1);
        assert_eq!(s.compacted_rev().unwrap(), 3);
        assert_eq!(s.purge_tombstones(i64::MAX, 100).unwrap(), 1);
        assert_eq!(s.compacted_rev().unwrap(), 4);
        assert_eq!(s.revision().unwrap(), 4, "the revision stays");
        assert!(feed(&s, 0, None, 10).0.is_empty());
        assert_eq!(
            s.collection_rev("c").unwrap(),
            4,
            "nor does the collection's"
        );
    }

    #[test]
    fn compaction_deletes_only_stale_entries_and_changes_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        write(&s, 1, |s| assert!(!s.put("c", "a", "1", 1, None).unwrap()));
        write(&s, 2, |s| assert!(s.put("c", "a", "2", 2, None).unwrap()));
        write(&s, 3, |s| {
            s.put("c", "b", "3", 3, None).unwrap();
        });
        write(&s, 4, |s| assert!(s.delete("c", "b", 4).unwrap()));
        write(&s, 5, |s| {
            s.put("d", "x", "5", 5, None).unwrap();
        });
        let before = feed(&s, 0, None, 10).0;
        let entries = |s: &Sqlite| s.feed_log_len().unwrap();
        assert_eq!(entries(&s), 5);
        s.control("BEGIN IMMEDIATE").unwrap();
        assert_eq!(s.compact(0, 2).unwrap(), (Some(2), 1), "rev 1 is stale");
        assert_eq!(s.compact(2, 10).unwrap(), (Some(5), 1), "rev 3 is stale");
        assert_eq!(s.compact(5, 10).unwrap(), (None, 0));
        s.control("COMMIT").unwrap();
        assert_eq!(entries(&s), 3);
        assert_eq!(feed(&s, 0, None, 10).0, before);
    }
}
