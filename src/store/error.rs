//! The storage error of either backend, and what kv needs to know of it: is the disk full, is
//! the database unreachable, may the transaction simply run again.

use std::fmt;

#[cfg(feature = "postgres")]
use super::postgres;

/// A storage failure, from either backend.
#[derive(Debug)]
pub enum DbError {
    Sqlite(rusqlite::Error),
    #[cfg(feature = "postgres")]
    Postgres(::postgres::Error),
    /// The database holds something this kv cannot read (written by a newer one, or damaged).
    #[cfg(feature = "postgres")]
    Unreadable(String),
}

impl DbError {
    /// The disk (or the database server's) is full: writes that add data cannot succeed now.
    pub fn is_disk_full(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(failure, _)) => {
                failure.code == rusqlite::ErrorCode::DiskFull
            }
            DbError::Sqlite(_) => false,
            #[cfg(feature = "postgres")]
            DbError::Postgres(e) => postgres::is_disk_full(e),
            #[cfg(feature = "postgres")]
            DbError::Unreadable(_) => false,
        }
    }

    /// The database cannot be reached (PostgreSQL down, connection lost): 503, and worth retrying.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Sqlite(_) => false,
            #[cfg(feature = "postgres")]
            DbError::Postgres(e) => postgres::is_unavailable(e),
            #[cfg(feature = "postgres")]
            DbError::Unreadable(_) => false,
        }
    }

    /// The transaction lost a race (serialization failure, deadlock) and may simply run again.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlite(_) => false,
            #[cfg(feature = "postgres")]
            DbError::Postgres(e) => postgres::is_transient(e),
            #[cfg(feature = "postgres")]
            DbError::Unreadable(_) => false,
        }
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Sqlite(e) => write!(f, "{e}"),
            #[cfg(feature = "postgres")]
            DbError::Postgres(e) => f.write_str(&postgres::describe(e)),
            #[cfg(feature = "postgres")]
            DbError::Unreadable(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for DbError {}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        DbError::Sqlite(e)
    }
}

#[cfg(feature = "postgres")]
impl From<::postgres::Error> for DbError {
    fn from(e: ::postgres::Error) -> DbError {
        DbError::Postgres(e)
    }
}
