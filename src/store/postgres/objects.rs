//! Objects and collections on PostgreSQL: the statements of `sqlite/objects.rs`, each write one
//! round trip (data-modifying CTEs do what SQLite does in several statements).

use postgres::Row;

use super::Postgres;
use crate::store::{
    COLLECTION_DELETED, DELETED, EXPIRED, Range, Version, count, now_millis, prefix_end,
};

/// The list statements: with or without an upper bound for the prefix, with or without values.
/// A NULL limit is no limit.
const LIST_SQL: [&str; 4] = [
    "SELECT key, NULL::text FROM kv WHERE collection = $1 AND key > $2 AND key >= $3
     AND (expires_at IS NULL OR expires_at > $5) AND $4::text IS NULL ORDER BY key LIMIT $6",
    "SELECT key, value FROM kv WHERE collection = $1 AND key > $2 AND key >= $3
     AND (expires_at IS NULL OR expires_at > $5) AND $4::text IS NULL ORDER BY key LIMIT $6",
    "SELECT key, NULL::text FROM kv WHERE collection = $1 AND key > $2 AND key >= $3 AND key < $4
     AND (expires_at IS NULL OR expires_at > $5) ORDER BY key LIMIT $6",
    "SELECT key, value FROM kv WHERE collection = $1 AND key > $2 AND key >= $3 AND key < $4
     AND (expires_at IS NULL OR expires_at > $5) ORDER BY key LIMIT $6",
];

/// The statement that removes the object ($1 collection, $2 key) if `$cond` holds (with $3 now)
/// and, if it did, leaves its tombstone of kind $5 and its feed entry at revision $4, in one
/// round trip; it returns how many objects it removed.
macro_rules! remove_and_bury {
    ($cond:literal) => {
        concat!(
            "WITH gone AS (
                 DELETE FROM kv WHERE collection = $1 AND key = $2 AND ",
            $cond,
            " RETURNING 1),
             buried AS (
                 INSERT INTO tombstones (rev, collection, key, kind, deleted_at)
                 SELECT $4, $1, $2, $5, $3 FROM gone),
             logged AS (INSERT INTO changes (rev, collection, key) SELECT $4, $1, $2 FROM gone)
             SELECT count(*) FROM gone"
        )
    };
}

impl Postgres {
    pub fn get_with<T>(
        &self,
        collection: &str,
        key: &str,
        read: impl FnOnce(&str, Version) -> T,
    ) -> Result<Option<T>, postgres::Error> {
        let row = self.query_opt(
            "SELECT value, rev, expires_at FROM kv WHERE collection = $1 AND key = $2
             AND (expires_at IS NULL OR expires_at > $3)",
            &[&collection, &key, &now_millis()],
        )?;
        Ok(row.map(|row| {
            let version = Version {
                rev: count(row.get(1)),
                expires_at: row.get(2),
            };
            read(row.get(0), version)
        }))
    }

    pub fn rev_of(&self, collection: &str, key: &str) -> Result<Option<u64>, postgres::Error> {
        Ok(self
            .query_opt(
                "SELECT rev FROM kv WHERE collection = $1 AND key = $2
                 AND (expires_at IS NULL OR expires_at > $3)",
                &[&collection, &key, &now_millis()],
            )?
            .map(|row| count(row.get(0))))
    }

    pub fn list(
        &self,
        collection: &str,
        range: Range<'_>,
        values: bool,
        mut each: impl FnMut(&str, Option<&str>),
    ) -> Result<(usize, bool), postgres::Error> {
        // PostgreSQL text cannot hold NUL, and no key contains one (names refuse control
        // characters): a prefix with NUL matches nothing, and a cursor key cut at its NUL sorts
        // against every key as the whole one does.
        if range.prefix.contains('\0') {
            return Ok((0, false));
        }
        let after = range.after.map(|a| a.split('\0').next().unwrap_or(""));
        let upper = prefix_end(range.prefix);
        let sql = LIST_SQL[usize::from(upper.is_some()) * 2 + usize::from(values)];
        // One more than the limit tells whether more follow.
        let limit = range.limit.map(|n| n as i64 + 1);
        let (mut n, mut more) = (0, false);
        self.for_each_row(
            sql,
            &[
                &collection,
                &after.unwrap_or(""),
                &range.prefix,
                &upper,
                &now_millis(),
                &limit,
            ],
            |row| {
                if range.limit == Some(n) {
                    more = true;
                    return Ok(false);
                }
                each(row.try_get(0)?, row.try_get(1)?);
                n += 1;
                Ok(true)
            },
        )?;
        Ok((n, more))
    }

    pub fn export(
        &self,
        collection: Option<&str>,
        mut each: impl FnMut(&str, &str, &str, Option<i64>) -> bool,
    ) -> Result<u64, postgres::Error> {
        let now = now_millis();
        let mut n = 0;
        let mut row_out = |row: &Row| -> Result<bool, postgres::Error> {
            n += 1;
            Ok(each(
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            ))
        };
        match collection {
            Some(name) => self.for_each_row(
                "SELECT collection, key, value, expires_at FROM kv WHERE collection = $1
                 AND (expires_at IS NULL OR expires_at > $2) ORDER BY collection, key",
                &[&name, &now],
                &mut row_out,
            )?,
            None => self.for_each_row(
                "SELECT collection, key, value, expires_at FROM kv
                 WHERE expires_at IS NULL OR expires_at > $1 ORDER BY collection, key",
                &[&now],
                &mut row_out,
            )?,
        }
        Ok(n)
    }

    pub fn count_live(&self, collection: &str, range: Range<'_>) -> Result<u64, postgres::Error> {
        if range.prefix.is_empty() && range.after.is_none() {
            // The counts table still counts objects that expired but are not swept yet.
            let row = self.query_one(
                "SELECT coalesce((SELECT count FROM collections WHERE name = $1), 0)
                 - (SELECT count(*) FROM kv WHERE expires_at <= $2 AND collection = $1)",
                &[&collection, &now_millis()],
            )?;
            return Ok(count(row.get(0)));
        }
        let mut n = 0;
        self.list(collection, range, false, |_, _| n += 1)?;
        Ok(n as u64)
    }

    pub fn collections(
        &self,
        mut each: impl FnMut(&str, u64, u64),
    ) -> Result<usize, postgres::Error> {
        let rows = self.query(
            "SELECT name, count, GREATEST(rev,
                 coalesce((SELECT max(rev) FROM changes WHERE changes.collection = collections.name), 0))
             FROM collections WHERE count > 0 ORDER BY name",
            &[],
        )?;
        for row in &rows {
            each(row.get(0), count(row.get(1)), count(row.get(2)));
        }
        Ok(rows.len())
    }

    pub fn collection_count(&self, name: &str) -> Result<Option<(u64, u64)>, postgres::Error> {
        let Some(row) = self.query_opt(
            "SELECT count FROM collections WHERE name = $1 AND count > 0",
            &[&name],
        )?
        else {
            return Ok(None);
        };
        Ok(Some((count(row.get(0)), self.collection_rev(name)?)))
    }

    pub fn object_count(&self) -> Result<u64, postgres::Error> {
        let row = self.query_one(
            "SELECT coalesce(sum(count), 0)::bigint FROM collections",
            &[],
        )?;
        Ok(count(row.get(0)))
    }

    pub fn collection_rev(&self, name: &str) -> Result<u64, postgres::Error> {
        let row = self.query_one(
            "SELECT GREATEST(
                 coalesce((SELECT rev FROM collections WHERE name = $1), 0),
                 coalesce((SELECT max(rev) FROM changes WHERE collection = $1), 0))",
            &[&name],
        )?;
        Ok(count(row.get(0)))
    }

    /// Stores one object at revision `rev` and logs the change, in one statement; says whether
    /// it replaced a stored object. The insert trigger forgets the key's tombstone, if any.
    pub fn put(
        &self,
        collection: &str,
        key: &str,
        value: &str,
        rev: u64,
        expires_at: Option<i64>,
    ) -> Result<bool, postgres::Error> {
        let row = self.query_one(
            "WITH old AS (SELECT 1 FROM kv WHERE collection = $1 AND key = $2),
             stored AS (
                 INSERT INTO kv (collection, key, value, updated_at, rev, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (collection, key) DO UPDATE SET value = EXCLUDED.value,
                     updated_at = EXCLUDED.updated_at, rev = EXCLUDED.rev,
                     expires_at = EXCLUDED.expires_at),
             logged AS (INSERT INTO changes (rev, collection, key) VALUES ($5, $1, $2))
             SELECT EXISTS (SELECT 1 FROM old)",
            &[
                &collection,
                &key,
                &value,
                &now_millis(),
                &(rev as i64),
                &expires_at,
            ],
        )?;
        self.wrote(rev, collection, key);
        Ok(row.get(0))
    }

    /// Removes one live object, leaving a tombstone at revision `rev`; says whether it was there.
    pub fn delete(&self, collection: &str, key: &str, rev: u64) -> Result<bool, postgres::Error> {
        self.bury(
            remove_and_bury!("(expires_at IS NULL OR expires_at > $3)"),
            (collection, key, rev),
            DELETED,
        )
    }

    pub fn expired(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, postgres::Error> {
        Ok(self
            .query(
                "SELECT collection, key FROM kv WHERE expires_at <= $1
                 ORDER BY expires_at LIMIT $2",
                &[&now, &(limit as i64)],
            )?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    /// Removes one expired object, leaving a tombstone of kind "expired" at revision `rev`.
    pub fn expire(&self, collection: &str, key: &str, rev: u64) -> Result<bool, postgres::Error> {
        self.bury(
            remove_and_bury!("expires_at <= $3"),
            (collection, key, rev),
            EXPIRED,
        )
    }

    /// Runs a statement that removes one object and, if it did, leaves its tombstone of `kind`
    /// and its feed entry at revision `rev` (parameters: collection, key, now, rev, kind).
    fn bury(
        &self,
        sql: &'static str,
        (collection, key, rev): (&str, &str, u64),
        kind: i64,
    ) -> Result<bool, postgres::Error> {
        let row = self.query_one(
            sql,
            &[
                &collection,
                &key,
                &now_millis(),
                &(rev as i64),
                &(kind as i16),
            ],
        )?;
        let removed = row.get::<_, i64>(0) > 0;
        if removed {
            self.wrote(rev, collection, key);
        }
        Ok(removed)
    }

    pub fn delete_collection(&self, name: &str, rev: u64) -> Result<(u64, u64), postgres::Error> {
        let removed = self.execute("DELETE FROM kv WHERE collection = $1", &[&name])?;
        if removed == 0 {
            return Ok((0, 0));
        }
        let buried = self.execute("DELETE FROM tombstones WHERE collection = $1", &[&name])?;
        self.execute(
            "WITH buried AS (
                 INSERT INTO tombstones (rev, collection, key, kind, deleted_at)
                 VALUES ($1, $2, '', $3, $4))
             INSERT INTO changes (rev, collection, key) VALUES ($1, $2, '')",
            &[
                &(rev as i64),
                &name,
                &(COLLECTION_DELETED as i16),
                &now_millis(),
            ],
        )?;
        self.wrote(rev, name, "");
        Ok((removed, removed + buried))
    }
}
