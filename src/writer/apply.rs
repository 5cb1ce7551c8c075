//! What each write does inside the writer's transaction: the ops of `op.rs` applied to the store
//! with the revisions they take, their preconditions checked first, and the housekeeping steps
//! (compaction, import) that run as writes.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader};

use super::{
    COMPACT_WINDOW, Cond, EXPIRE_BATCH, ImportLine, MIN_STALE_TO_COMPACT, Op, Outcome, PURGE_BATCH,
    Reply, Writing,
};
use crate::error::Error;
use crate::store::backup::TempFile;
use crate::store::{DEFAULT_COLLECTION, now_millis};

impl Writing {
    /// One step of compacting the feed's log: a pass starts once the stale entries could be a
    /// third of it (so the log stays within 1.5x of the live entries and a pass costs O(1) per
    /// write), and each step looks at `COMPACT_WINDOW` entries.
    pub(super) fn compact(&mut self) -> Reply {
        let after = match self.compacting {
            Some(after) => after,
            None => {
                let live = self.store.object_count()?;
                if self.stale < MIN_STALE_TO_COMPACT.max(live / 2) {
                    return Ok(Outcome::Compacting(false));
                }
                self.stale = 0;
                0
            }
        };
        let (next, removed) = self.store.compact(after, COMPACT_WINDOW)?;
        self.compacting = next;
        if removed > 0 {
            log::debug!("compacted {removed} stale change log entries");
        }
        Ok(Outcome::Compacting(next.is_some()))
    }

    fn import<'a>(
        &mut self,
        upload: &TempFile,
        replace: &'a [String],
        changed: &mut Vec<Cow<'a, str>>,
    ) -> Reply {
        let size = std::fs::metadata(upload.path()).map_or(0, |m| m.len());
        self.space.admit(size)?;
        for name in replace {
            let (count, stale) = self.store.delete_collection(name, self.rev + 1)?;
            if count > 0 {
                self.next_rev();
                self.stale += stale;
                changed.push(Cow::Borrowed(name));
            }
        }
        let unreadable =
            |e: std::io::Error| Error::Internal(format!("cannot read the import: {e}"));
        let file = File::open(upload.path()).map_err(unreadable)?;
        let mut imported = 0;
        let mut last_collection = String::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(unreadable)?;
            if line.trim().is_empty() {
                continue;
            }
            let item: ImportLine<'_> = serde_json::from_str(&line)
                .map_err(|e| Error::Internal(format!("an import line changed: {e}")))?;
            let collection = match item.collection.as_deref() {
                None | Some("") => DEFAULT_COLLECTION,
                Some(name) => name,
            };
            let expires_at = item.expires_at.map(|secs| secs.saturating_mul(1000));
            let rev = self.next_rev();
            if self
                .store
                .put(collection, &item.key, item.value.get(), rev, expires_at)?
            {
                self.stale += 1;
            }
            if collection != last_collection {
                last_collection = collection.to_string();
                changed.push(Cow::Owned(last_collection.clone()));
            }
            imported += 1;
        }
        Ok(Outcome::Imported(imported))
    }

    fn next_rev(&mut self) -> u64 {
        self.rev += 1;
        self.rev
    }

    /// SQLite's "database or disk is full" becomes `StorageFull` (and gives the reserve up);
    /// any other error stays as it is.
    pub(super) fn disk_full_is(&self, e: Error) -> Error {
        match &e {
            Error::Storage(db) if db.is_disk_full() => {
                self.space.disk_full();
                Error::StorageFull
            }
            _ => e,
        }
    }

    /// Fails with 412 unless `cond` holds for the object as it is now in the transaction.
    fn check(&self, collection: &str, key: &str, cond: &Cond) -> Result<(), Error> {
        if cond.is_empty() {
            return Ok(());
        }
        let current = self.store.rev_of(collection, key)?;
        if cond.holds(current) {
            Ok(())
        } else {
            Err(Error::PreconditionFailed {
                key: key.to_string(),
                current_rev: current,
                index: None,
            })
        }
    }

    pub(super) fn apply<'a>(&mut self, op: &'a Op, changed: &mut Vec<Cow<'a, str>>) -> Reply {
        match op {
            Op::Put {
                collection,
                key,
                value,
                cond,
                ttl_secs,
            } => {
                self.space.admit((key.len() + value.len()) as u64)?;
                self.check(collection, key, cond)?;
                let rev = self.next_rev();
                let expires_at =
                    ttl_secs.map(|secs| now_millis().saturating_add(secs as i64 * 1000));
                if self.store.put(collection, key, value, rev, expires_at)? {
                    self.stale += 1;
                }
                changed.push(Cow::Borrowed(collection));
                Ok(Outcome::Stored(rev))
            }
            Op::Delete {
                collection,
                key,
                cond,
            } => {
                self.check(collection, key, cond)?;
                if !self.store.delete(collection, key, self.rev + 1)? {
                    return Ok(Outcome::Deleted(None));
                }
                changed.push(Cow::Borrowed(collection));
                self.stale += 1;
                Ok(Outcome::Deleted(Some(self.next_rev())))
            }
            Op::Get { collection, key } => Ok(Outcome::Value(self.store.get_with(
                collection,
                key,
                |value, version| (value.to_string(), version.rev),
            )?)),
            Op::Check {
                collection,
                key,
                cond,
            } => {
                self.check(collection, key, cond)?;
                Ok(Outcome::Checked)
            }
            Op::DeleteCollection { name } => {
                let (count, stale) = self.store.delete_collection(name, self.rev + 1)?;
                if count == 0 {
                    return Ok(Outcome::DeletedCollection { count, rev: 0 });
                }
                self.stale += stale;
                changed.push(Cow::Borrowed(name));
                let rev = self.next_rev();
                Ok(Outcome::DeletedCollection { count, rev })
            }
            Op::Batch(ops) => {
                let adds: usize = ops
                    .iter()
                    .filter(|op| matches!(op, Op::Put { .. }))
                    .map(Op::bytes)
                    .sum();
                if adds > 0 {
                    self.space.admit(adds as u64)?;
                }
                // A savepoint makes the batch all-or-nothing inside the group's transaction.
                self.store.savepoint()?;
                let start_rev = self.rev;
                let mut touched = Vec::new();
                let mut outcomes = Vec::with_capacity(ops.len());
                for (index, op) in ops.iter().enumerate() {
                    match self.apply(op, &mut touched) {
                        Ok(outcome) => outcomes.push(outcome),
                        Err(e) => {
                            self.rev = start_rev;
                            if !self.store.is_autocommit() {
                                self.store.rollback_to_savepoint()?;
                            }
                            return Err(e.at_index(index));
                        }
                    }
                }
                self.store.release_savepoint()?;
                changed.extend(touched);
                Ok(Outcome::Batch(outcomes))
            }
            Op::Purge { before_ms } => Ok(Outcome::Purged(
                self.store.purge_tombstones(*before_ms, PURGE_BATCH)?,
            )),
            Op::Compact => self.compact(),
            Op::Import { upload, replace } => self.import(upload, replace, changed),
            Op::Expire => {
                let expired = self.store.expired(now_millis(), EXPIRE_BATCH)?;
                let mut n = 0;
                for (collection, key) in expired {
                    if self.store.expire(&collection, &key, self.rev + 1)? {
                        self.next_rev();
                        changed.push(Cow::Owned(collection));
                        n += 1;
                    }
                }
                Ok(Outcome::Expired(n))
            }
        }
    }
}
