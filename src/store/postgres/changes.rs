//! The change feed on PostgreSQL: the statements of `sqlite/changes.rs`.

use super::Postgres;
use crate::store::{Change, ChangeKind, DbError, Page, count};

/// The four shapes of the feed query: one collection or all, with or without values. An entry
/// is current when its key is still at its revision, live in `kv` or as a tombstone.
const FEED_SQL: [&str; 4] = [
    "SELECT c.rev, c.collection, c.key, NULL::text, t.kind, kv.expires_at FROM changes AS c
     LEFT JOIN kv ON kv.collection = c.collection AND kv.key = c.key AND kv.rev = c.rev
     LEFT JOIN tombstones AS t ON t.rev = c.rev
     WHERE c.rev > $1 AND (kv.rev IS NOT NULL OR t.rev IS NOT NULL) AND $2::text IS NULL
     ORDER BY c.rev LIMIT $3",
    "SELECT c.rev, c.collection, c.key, kv.value, t.kind, kv.expires_at FROM changes AS c
     LEFT JOIN kv ON kv.collection = c.collection AND kv.key = c.key AND kv.rev = c.rev
     LEFT JOIN tombstones AS t ON t.rev = c.rev
     WHERE c.rev > $1 AND (kv.rev IS NOT NULL OR t.rev IS NOT NULL) AND $2::text IS NULL
     ORDER BY c.rev LIMIT $3",
    "SELECT c.rev, c.collection, c.key, NULL::text, t.kind, kv.expires_at FROM changes AS c
     LEFT JOIN kv ON kv.collection = c.collection AND kv.key = c.key AND kv.rev = c.rev
     LEFT JOIN tombstones AS t ON t.rev = c.rev
     WHERE c.collection = $2 AND c.rev > $1 AND (kv.rev IS NOT NULL OR t.rev IS NOT NULL)
     ORDER BY c.rev LIMIT $3",
    "SELECT c.rev, c.collection, c.key, kv.value, t.kind, kv.expires_at FROM changes AS c
     LEFT JOIN kv ON kv.collection = c.collection AND kv.key = c.key AND kv.rev = c.rev
     LEFT JOIN tombstones AS t ON t.rev = c.rev
     WHERE c.collection = $2 AND c.rev > $1 AND (kv.rev IS NOT NULL OR t.rev IS NOT NULL)
     ORDER BY c.rev LIMIT $3",
];

impl Postgres {
    pub fn revision(&self) -> Result<u64, postgres::Error> {
        self.meta("revision")
    }

    pub fn compacted_rev(&self) -> Result<u64, postgres::Error> {
        self.meta("compacted_rev")
    }

    fn meta(&self, name: &str) -> Result<u64, postgres::Error> {
        let row = self.query_one("SELECT value FROM meta WHERE name = $1", &[&name])?;
        Ok(count(row.get(0)))
    }

    pub fn set_revision(&self, rev: u64) -> Result<(), postgres::Error> {
        self.execute(
            "UPDATE meta SET value = $1 WHERE name = 'revision'",
            &[&(rev as i64)],
        )?;
        Ok(())
    }

    pub fn changes(
        &self,
        since: u64,
        collection: Option<&str>,
        limit: usize,
        values: bool,
        mut each: impl FnMut(&Change<'_>),
    ) -> Result<Page, DbError> {
        let current_rev = self.revision()?;
        let sql = FEED_SQL[usize::from(collection.is_some()) * 2 + usize::from(values)];
        let mut page = Page::new(current_rev);
        let mut unknown_kind = None;
        self.for_each_row(
            sql,
            &[&(since as i64), &collection, &(limit as i64 + 1)],
            |row| {
                if !page.has_room(limit) {
                    return Ok(false);
                }
                let tombstone = row.try_get::<_, Option<i16>>(4)?.map(i64::from);
                let Some(kind) = ChangeKind::from_tombstone(tombstone) else {
                    unknown_kind = tombstone;
                    return Ok(false);
                };
                let change = Change {
                    rev: count(row.try_get(0)?),
                    collection: row.try_get(1)?,
                    key: row.try_get(2)?,
                    kind,
                    value: row.try_get(3)?,
                    expires_at: row.try_get(5)?,
                };
                each(&change);
                page.add(change.rev);
                Ok(true)
            },
        )?;
        match unknown_kind {
            // As on SQLite, a failed read rather than a page that ends early.
            Some(kind) => Err(DbError::Unreadable(format!(
                "the change log holds a tombstone of unknown kind {kind}"
            ))),
            None => Ok(page),
        }
    }

    pub fn changed_collections(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<Vec<String>, postgres::Error> {
        Ok(self
            .query(
                "SELECT DISTINCT collection FROM changes WHERE rev > $1 AND rev <= $2",
                &[&(after as i64), &(upto as i64)],
            )?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    #[cfg(test)]
    pub fn feed_log_len(&self) -> Result<i64, postgres::Error> {
        Ok(self.query_one("SELECT count(*) FROM changes", &[])?.get(0))
    }

    pub fn purge_tombstones(&self, before_ms: i64, limit: usize) -> Result<usize, postgres::Error> {
        let purged: Vec<(i64, String)> = self
            .query(
                "DELETE FROM tombstones WHERE rev IN (
                     SELECT rev FROM (SELECT rev, deleted_at FROM tombstones ORDER BY rev LIMIT $2)
                     AS oldest WHERE deleted_at < $1)
                 RETURNING rev, collection",
                &[&before_ms, &(limit as i64)],
            )?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for (rev, collection) in &purged {
            self.execute("DELETE FROM changes WHERE rev = $1", &[rev])?;
            // The collection's revision must not go back now that its entry is gone.
            self.execute(
                "UPDATE collections SET rev = GREATEST(rev, $1) WHERE name = $2",
                &[rev, collection],
            )?;
        }
        if let Some(highest) = purged.iter().map(|(rev, _)| *rev).max() {
            self.execute(
                "UPDATE meta SET value = GREATEST(value, $1) WHERE name = 'compacted_rev'",
                &[&highest],
            )?;
        }
        Ok(purged.len())
    }

    pub fn compact(
        &self,
        after: u64,
        window: usize,
    ) -> Result<(Option<u64>, usize), postgres::Error> {
        let end: Option<i64> = self
            .query_one(
                "SELECT max(rev) FROM (SELECT rev FROM changes WHERE rev > $1 ORDER BY rev LIMIT $2)
                 AS window_",
                &[&(after as i64), &(window as i64)],
            )?
            .get(0);
        let Some(end) = end else {
            return Ok((None, 0));
        };
        let removed = self.execute(
            "DELETE FROM changes WHERE rev > $1 AND rev <= $2
             AND NOT EXISTS (SELECT 1 FROM kv WHERE kv.collection = changes.collection
                             AND kv.key = changes.key AND kv.rev = changes.rev)
             AND NOT EXISTS (SELECT 1 FROM tombstones WHERE tombstones.rev = changes.rev)",
            &[&(after as i64), &end],
        )?;
        Ok((Some(count(end)), removed as usize))
    }
}
