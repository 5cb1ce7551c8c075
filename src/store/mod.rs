//! Storage: one interface, `Store`, over two backends with one data model. SQLite (`sqlite/`) is
//! the embedded default: one file in the data directory. PostgreSQL (`postgres/`, cargo feature
//! `postgres`) lets several kv nodes serve one dataset. Both keep the objects keyed by
//! (collection, key) with their revision and expiry, the per-collection counts, the tombstones, the
//! change feed's log and the store-wide revision, in the same tables; `backup.rs` copies whole
//! databases.
//!
//! One `Store` is one connection. Reads take one from the `Pool` (`pool.rs`); the writer thread
//! owns the one that writes (on PostgreSQL, one per node, all serialised by the revision counter's
//! row lock).
//!
//! `Store`'s methods are the list of things kv asks of a database. It is an enum over the two
//! backends rather than a trait object: the backend is chosen at run time from the settings,
//! many methods hand rows to generic callbacks (which a `dyn` trait cannot take), and each method
//! is one `match`, which the compiler checks covers both backends with the same signature.

pub mod backup;
mod error;
mod pool;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;

use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Sync;
pub use error::DbError;
#[cfg(test)]
pub(crate) use pool::tests::pool_of_one_counting;
pub use pool::{Pool, ReadsInProgress};
pub use sqlite::Sqlite;

/// The collection used when a request names none.
pub const DEFAULT_COLLECTION: &str = "default";

/// Tombstone kinds, as stored in `tombstones.kind`.
pub(crate) const DELETED: i64 = 0;
pub(crate) const EXPIRED: i64 = 1;
pub(crate) const COLLECTION_DELETED: i64 = 2;

/// Where the data lives.
#[derive(Clone, Debug)]
pub enum Database {
    /// The SQLite file, pushed to disk as `sync` says.
    Sqlite { file: PathBuf, sync: Sync },
    /// A PostgreSQL database; `spool` is the data directory, for temporary files.
    #[cfg(feature = "postgres")]
    Postgres {
        target: Box<postgres::Target>,
        spool: PathBuf,
    },
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite { file, sync } => write!(f, "{} (sync {sync})", file.display()),
            #[cfg(feature = "postgres")]
            Database::Postgres { target, .. } => write!(f, "{target}"),
        }
    }
}

/// What a read knows of an object besides its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub rev: u64,
    /// When it expires (unix ms); `None`: never.
    pub expires_at: Option<i64>,
}

/// Which part of a collection a list reads, in ascending key order.
#[derive(Clone, Copy, Debug, Default)]
pub struct Range<'a> {
    /// Only keys starting with this (empty: all).
    pub prefix: &'a str,
    /// Only keys after this one (a page's cursor).
    pub after: Option<&'a str>,
    /// At most this many objects.
    pub limit: Option<usize>,
}

/// What a change did to its key (or collection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Put,
    Delete,
    /// Deleted by expiry.
    Expired,
    /// The whole collection was deleted; the change has no key.
    DeleteCollection,
}

impl ChangeKind {
    /// The kind of a feed entry from its tombstone's kind (`None`: no tombstone, a put).
    pub(crate) fn from_tombstone(kind: Option<i64>) -> Option<ChangeKind> {
        match kind {
            None => Some(ChangeKind::Put),
            Some(DELETED) => Some(ChangeKind::Delete),
            Some(EXPIRED) => Some(ChangeKind::Expired),
            Some(COLLECTION_DELETED) => Some(ChangeKind::DeleteCollection),
            Some(_) => None,
        }
    }
}

/// One entry of the feed: the latest state of one key (or one collection delete).
#[derive(Debug)]
pub struct Change<'a> {
    pub rev: u64,
    pub collection: &'a str,
    pub key: &'a str,
    pub kind: ChangeKind,
    /// The stored JSON text, for a put when values were asked for.
    pub value: Option<&'a str>,
    /// When a put's object expires (unix ms).
    pub expires_at: Option<i64>,
}

/// What a feed read found besides its entries.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    /// Entries handed out.
    pub count: usize,
    /// The revision of the last entry, or the store's revision when there was none.
    pub last_rev: u64,
    /// Whether more entries follow `last_rev`.
    pub more: bool,
    /// The store's revision in the snapshot read.
    pub current_rev: u64,
}

impl Page {
    /// An empty page of a feed read at store revision `current_rev`.
    pub(crate) fn new(current_rev: u64) -> Page {
        Page {
            count: 0,
            last_rev: current_rev,
            more: false,
            current_rev,
        }
    }

    /// Whether one more entry fits in a page of `limit`; when it does not, the page is marked
    /// `more` (a feed read asks for one row past the limit to know).
    pub(crate) fn has_room(&mut self, limit: usize) -> bool {
        self.more = self.count == limit;
        !self.more
    }

    /// Counts an entry handed out.
    pub(crate) fn add(&mut self, rev: u64) {
        self.count += 1;
        self.last_rev = rev;
    }
}

/// What `/metrics` reports of the store.
pub struct Stats {
    pub objects: u64,
    pub collections: u64,
    pub database_bytes: u64,
    pub wal_bytes: u64,
    /// What `used_bytes` answers, read in the same snapshot.
    pub used_bytes: u64,
    pub revision: u64,
}

/// One connection to the database, of either backend.
pub enum Store {
    Sqlite(Sqlite),
    #[cfg(feature = "postgres")]
    Postgres(Box<postgres::Postgres>),
}

impl From<Sqlite> for Store {
    fn from(s: Sqlite) -> Store {
        Store::Sqlite(s)
    }
}

/// Runs the same expression on whichever backend `$store` is, with its error made a `DbError`.
macro_rules! on_backend {
    ($store:expr, $s:ident => $e:expr) => {
        match $store {
            Store::Sqlite($s) => $e.map_err(DbError::from),
            #[cfg(feature = "postgres")]
            Store::Postgres($s) => $e.map_err(DbError::from),
        }
    };
}

impl Store {
    /// Opens a connection without touching the schema.
    pub fn open(db: &Database) -> Result<Store, DbError> {
        match db {
            Database::Sqlite { file, sync } => Ok(Store::Sqlite(Sqlite::open(file, *sync)?)),
            #[cfg(feature = "postgres")]
            Database::Postgres { target, spool } => Ok(Store::Postgres(Box::new(
                postgres::Postgres::connect(target, spool)?,
            ))),
        }
    }

    /// Opens the database (creating what is missing) and migrates its schema: everything startup
    /// needs, with errors worded for the one line kv prints before exiting.
    pub fn open_and_migrate(db: &Database) -> Result<Store, String> {
        match db {
            Database::Sqlite { file, sync } => {
                Ok(Store::Sqlite(Sqlite::open_and_migrate(file, *sync)?))
            }
            #[cfg(feature = "postgres")]
            Database::Postgres { target, spool } => Ok(Store::Postgres(Box::new(
                postgres::Postgres::open_and_migrate(target, spool)?,
            ))),
        }
    }

    /// Another connection to the same database.
    pub fn reopen(&self) -> Result<Store, DbError> {
        match self {
            Store::Sqlite(s) => Ok(Store::Sqlite(s.reopen()?)),
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => Ok(Store::Postgres(Box::new(p.reopen()?))),
        }
    }

    /// True for the embedded SQLite file (checkpoints, the WAL and the file's size exist only there).
    pub fn is_sqlite(&self) -> bool {
        matches!(self, Store::Sqlite(_))
    }

    pub fn stats(&self) -> Result<Stats, DbError> {
        on_backend!(self, s => s.stats())
    }

    /// Bytes the database takes (SQLite: pages in use; PostgreSQL: the database's size).
    pub fn used_bytes(&self) -> Result<u64, DbError> {
        on_backend!(self, s => s.used_bytes())
    }

    /// Checks the connection can read the schema (for `/health`).
    pub fn ping(&self) -> Result<(), DbError> {
        on_backend!(self, s => s.ping())
    }

    /// Starts a read transaction: everything read until `end_read` comes from one snapshot.
    pub fn begin_read(&self) -> Result<(), DbError> {
        on_backend!(self, s => s.begin_read())
    }

    /// Ends a read transaction.
    pub fn end_read(&self) -> Result<(), DbError> {
        on_backend!(self, s => s.end_read())
    }

    /// Starts the writer's transaction. On PostgreSQL it also locks the revision counter until
    /// COMMIT (so revision order is commit order across nodes) and returns its value; SQLite's one
    /// writer knows the revision already and gets `None`.
    pub fn begin_write(&self) -> Result<Option<u64>, DbError> {
        on_backend!(self, s => s.begin_write())
    }

    pub fn commit(&self) -> Result<(), DbError> {
        on_backend!(self, s => s.commit())
    }

    /// Rolls back the open transaction, if there is one.
    pub fn rollback(&self) -> Result<(), DbError> {
        on_backend!(self, s => s.rollback())
    }

    /// Marks a point the open transaction can roll back to (one batch).
    pub fn savepoint(&self) -> Result<(), DbError> {
        on_backend!(self, s => s.savepoint())
    }

    /// Undoes everything since `savepoint` and forgets it.
    pub fn rollback_to_savepoint(&self) -> Result<(), DbError> {
        on_backend!(self, s => s.rollback_to_savepoint())
    }

    /// Keeps everything since `savepoint` and forgets it.
    pub fn release_savepoint(&self) -> Result<(), DbError> {
        on_backend!(self, s => s.release_savepoint())
    }

    /// SQLite: copies the whole WAL into the database file and empties it. Nothing elsewhere.
    pub fn checkpoint(&self) -> Result<(), DbError> {
        match self {
            Store::Sqlite(s) => Ok(s.checkpoint()?),
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => Ok(()),
        }
    }

    /// SQLite: copies what it can of the WAL into the database file, and returns how many frames
    /// the WAL holds. Nothing elsewhere (0).
    pub fn checkpoint_passive(&self) -> Result<u64, DbError> {
        match self {
            Store::Sqlite(s) => Ok(s.checkpoint_passive()?),
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => Ok(0),
        }
    }

    /// SQLite: whether every commit syncs the WAL (see `Sqlite::syncs_wal_at_commit`). Elsewhere
    /// there is no WAL of kv's to checkpoint: true.
    pub fn syncs_wal_at_commit(&self) -> bool {
        match self {
            Store::Sqlite(s) => s.syncs_wal_at_commit(),
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => true,
        }
    }

    /// SQLite: see `Sqlite::limit_wal`. Nothing elsewhere.
    pub fn limit_wal(&self, pages: u32, max_wal_bytes: u64) -> Result<(), DbError> {
        match self {
            Store::Sqlite(s) => Ok(s.limit_wal(pages, max_wal_bytes)?),
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => Ok(()),
        }
    }

    /// After the connection went during a COMMIT whose last change took revision `rev`: whether
    /// the COMMIT got through (PostgreSQL; SQLite never loses a COMMIT's answer).
    pub fn committed(&self, rev: u64) -> Result<bool, DbError> {
        let _ = rev;
        match self {
            Store::Sqlite(_) => Ok(false),
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => Ok(p.committed(rev)?),
        }
    }

    /// True when no transaction is open.
    pub fn is_autocommit(&self) -> bool {
        match self {
            Store::Sqlite(s) => s.is_autocommit(),
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => p.is_autocommit(),
        }
    }

    /// The stored JSON text of one live object.
    #[cfg(test)]
    pub fn get(&self, collection: &str, key: &str) -> Result<Option<String>, DbError> {
        self.get_with(collection, key, |value, _| value.to_string())
    }

    /// Hands the stored JSON text of one live object and its version to `read`.
    pub fn get_with<T>(
        &self,
        collection: &str,
        key: &str,
        read: impl FnOnce(&str, Version) -> T,
    ) -> Result<Option<T>, DbError> {
        on_backend!(self, s => s.get_with(collection, key, read))
    }

    /// The revision of one live object; `None` when it does not exist (or has expired).
    pub fn rev_of(&self, collection: &str, key: &str) -> Result<Option<u64>, DbError> {
        on_backend!(self, s => s.rev_of(collection, key))
    }

    /// Calls `each(key, value)` for the live objects of a range of a collection in ascending key
    /// order (`value` is `None` unless `values`); returns how many, and whether more follow
    /// (looked at only when the range has a limit).
    pub fn list(
        &self,
        collection: &str,
        range: Range<'_>,
        values: bool,
        each: impl FnMut(&str, Option<&str>),
    ) -> Result<(usize, bool), DbError> {
        on_backend!(self, s => s.list(collection, range, values, each))
    }

    /// Calls `each(collection, key, value, expires_at)` for every live object (of one collection,
    /// or of all), ordered by collection and key, until it returns false; returns how many.
    pub fn export(
        &self,
        collection: Option<&str>,
        each: impl FnMut(&str, &str, &str, Option<i64>) -> bool,
    ) -> Result<u64, DbError> {
        on_backend!(self, s => s.export(collection, each))
    }

    /// How many live objects a range holds (its limit aside).
    pub fn count_live(&self, collection: &str, range: Range<'_>) -> Result<u64, DbError> {
        on_backend!(self, s => s.count_live(collection, range))
    }

    /// Calls `each(name, count, rev)` for every non-empty collection in ascending name order;
    /// returns how many.
    pub fn collections(&self, each: impl FnMut(&str, u64, u64)) -> Result<usize, DbError> {
        on_backend!(self, s => s.collections(each))
    }

    /// How many objects a collection holds and its latest revision; `None` when it holds none.
    pub fn collection_count(&self, name: &str) -> Result<Option<(u64, u64)>, DbError> {
        on_backend!(self, s => s.collection_count(name))
    }

    /// How many objects there are in all.
    pub fn object_count(&self) -> Result<u64, DbError> {
        on_backend!(self, s => s.object_count())
    }

    /// The revision of the latest change in a collection (0 if it never had one).
    pub fn collection_rev(&self, name: &str) -> Result<u64, DbError> {
        on_backend!(self, s => s.collection_rev(name))
    }

    /// Stores one object at revision `rev`; says whether it replaced a stored object.
    pub fn put(
        &self,
        collection: &str,
        key: &str,
        value: &str,
        rev: u64,
        expires_at: Option<i64>,
    ) -> Result<bool, DbError> {
        on_backend!(self, s => s.put(collection, key, value, rev, expires_at))
    }

    /// Removes one live object, leaving a tombstone at revision `rev`; says whether it was there.
    pub fn delete(&self, collection: &str, key: &str, rev: u64) -> Result<bool, DbError> {
        on_backend!(self, s => s.delete(collection, key, rev))
    }

    /// Up to `limit` objects that have expired by `now` (unix ms), soonest first.
    pub fn expired(&self, now: i64, limit: usize) -> Result<Vec<(String, String)>, DbError> {
        on_backend!(self, s => s.expired(now, limit))
    }

    /// Removes one expired object, leaving a tombstone of kind "expired" at revision `rev`.
    pub fn expire(&self, collection: &str, key: &str, rev: u64) -> Result<bool, DbError> {
        on_backend!(self, s => s.expire(collection, key, rev))
    }

    /// Removes every object of a collection, leaving one tombstone for it at revision `rev`;
    /// returns how many objects there were and how many feed entries that made stale.
    pub fn delete_collection(&self, name: &str, rev: u64) -> Result<(u64, u64), DbError> {
        on_backend!(self, s => s.delete_collection(name, rev))
    }

    /// Runs `read` inside one read transaction, so everything it reads comes from one snapshot.
    pub fn snapshot<T, E: From<DbError>>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, E>,
    ) -> Result<T, E> {
        self.begin_read()?;
        let result = read(self);
        self.end_read()?;
        result
    }

    /// The store-wide revision: the revision of the latest change ever committed.
    pub fn revision(&self) -> Result<u64, DbError> {
        on_backend!(self, s => s.revision())
    }

    /// The highest revision of a tombstone the purge has forgotten (0 if none).
    pub fn compacted_rev(&self) -> Result<u64, DbError> {
        on_backend!(self, s => s.compacted_rev())
    }

    /// Records the store-wide revision (the writer, once per transaction).
    pub fn set_revision(&self, rev: u64) -> Result<(), DbError> {
        on_backend!(self, s => s.set_revision(rev))
    }

    /// Calls `each` for up to `limit` entries after revision `since`, in revision order, of one
    /// collection or of all. Call it inside `snapshot` so that `current_rev` matches the entries.
    pub fn changes(
        &self,
        since: u64,
        collection: Option<&str>,
        limit: usize,
        values: bool,
        each: impl FnMut(&Change<'_>),
    ) -> Result<Page, DbError> {
        on_backend!(self, s => s.changes(since, collection, limit, values, each))
    }

    /// The collections changed by revisions in `(after, upto]` (for waking other nodes' waiters).
    pub fn changed_collections(&self, after: u64, upto: u64) -> Result<Vec<String>, DbError> {
        on_backend!(self, s => s.changed_collections(after, upto))
    }

    /// How many entries the feed's log holds, stale ones included.
    #[cfg(test)]
    pub fn feed_log_len(&self) -> Result<i64, DbError> {
        on_backend!(self, s => s.feed_log_len())
    }

    /// Forgets up to `limit` of the oldest tombstones made before `before_ms` (unix ms).
    pub fn purge_tombstones(&self, before_ms: i64, limit: usize) -> Result<usize, DbError> {
        on_backend!(self, s => s.purge_tombstones(before_ms, limit))
    }

    /// Deletes the stale entries among the (up to) `window` feed entries after revision `after`.
    pub fn compact(&self, after: u64, window: usize) -> Result<(Option<u64>, usize), DbError> {
        on_backend!(self, s => s.compact(after, window))
    }

    /// Writes a consistent copy of the whole database to `target` (which must not exist) as a
    /// SQLite file, from one read snapshot, while writes go on.
    pub fn backup_into(&self, target: &std::path::Path) -> Result<(), DbError> {
        match self {
            Store::Sqlite(s) => Ok(s.backup_into(target)?),
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => p.backup_into(target),
        }
    }

    /// A directory for temporary files (beside the SQLite file; the data directory otherwise).
    pub fn directory(&self) -> PathBuf {
        match self {
            Store::Sqlite(s) => s.directory(),
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => p.spool().to_path_buf(),
        }
    }
}

/// Database integers are signed; a count or revision is never negative.
pub(crate) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The wall clock in unix milliseconds.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The least string above every string that starts with `prefix` (None when there is none, or
/// the prefix is empty): the prefix with its last character raised by one code point. UTF-8 byte
/// order is code point order, so this bounds the prefix's range in byte-wise order (SQLite's, and
/// PostgreSQL's `COLLATE "C"`).
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 {
            0xD7FF => Some('\u{E000}'),
            c => char::from_u32(c + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}
