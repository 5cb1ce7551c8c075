//! The writes the writer runs, as the API asks for them, and what each one did once committed.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::Error;

use crate::store::backup::TempFile;

/// One write, as the API asks for it.
#[derive(Debug)]
pub enum Op {
    Put {
        collection: String,
        key: String,
        value: String,
        cond: Cond,
        /// Seconds after its commit when the object expires; `None`: never.
        ttl_secs: Option<u64>,
    },
    Delete {
        collection: String,
        key: String,
        cond: Cond,
    },
    /// Reads inside the write transaction: only useful in a batch, where it sees the earlier ops.
    Get {
        collection: String,
        key: String,
    },
    /// Asserts a precondition without writing: only useful in a batch.
    Check {
        collection: String,
        key: String,
        cond: Cond,
    },
    DeleteCollection {
        name: String,
    },
    /// All or nothing, in order.
    Batch(Vec<Op>),
    /// Forgets up to `PURGE_BATCH` tombstones made before `before_ms` (unix ms).
    Purge {
        before_ms: i64,
    },
    /// Deletes stale feed entries, `COMPACT_WINDOW` at a time, once enough have piled up.
    Compact,
    /// Deletes up to `EXPIRE_BATCH` expired objects, each with a revision of its own.
    Expire,
    /// Stores every object of an NDJSON file the API has checked line by line (after emptying
    /// the `replace` collections), all in this one transaction.
    Import {
        upload: TempFile,
        replace: Vec<String>,
    },
}

/// One line of an import, as `GET /export` writes it; the API has checked it already.
#[derive(Deserialize)]
pub struct ImportLine<'a> {
    #[serde(borrow, default)]
    pub collection: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    #[serde(borrow)]
    pub value: &'a RawValue,
    /// Unix seconds.
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// A precondition on an object's current revision (RFC 9110 §13.1.1-2), checked in the write
/// transaction just before the write, so it sees every write queued before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cond {
    /// The object must exist (`Any`) or be at one of these revisions.
    pub if_match: Option<Tags>,
    /// The object must not exist (`Any`) or not be at any of these revisions.
    pub if_none_match: Option<Tags>,
}

/// The entity tags of a precondition header, as revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tags {
    /// `*`
    Any,
    /// A list of tags; tags that are no revision of ours are left out (they match nothing).
    Revs(Vec<u64>),
}

impl Tags {
    /// Whether an object at revision `current` (`None`: absent) matches.
    pub fn matches(&self, current: Option<u64>) -> bool {
        match self {
            Tags::Any => current.is_some(),
            Tags::Revs(revs) => current.is_some_and(|rev| revs.contains(&rev)),
        }
    }
}

impl Cond {
    /// Whether the precondition holds for an object at revision `current` (`None`: absent).
    pub fn holds(&self, current: Option<u64>) -> bool {
        self.if_match.as_ref().is_none_or(|t| t.matches(current))
            && !self
                .if_none_match
                .as_ref()
                .is_some_and(|t| t.matches(current))
    }

    /// True when there is no precondition (the common case costs no read).
    pub fn is_empty(&self) -> bool {
        self.if_match.is_none() && self.if_none_match.is_none()
    }
}

impl Op {
    /// Roughly what the op holds in memory while queued.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Op::Put {
                collection,
                key,
                value,
                ..
            } => collection.len() + key.len() + value.len(),
            Op::Delete {
                collection, key, ..
            }
            | Op::Get { collection, key }
            | Op::Check {
                collection, key, ..
            } => collection.len() + key.len(),
            Op::DeleteCollection { name } => name.len(),
            Op::Batch(ops) => ops.iter().map(Op::bytes).sum(),
            Op::Purge { .. } | Op::Compact | Op::Expire | Op::Import { .. } => 0,
        }
    }
}

/// What a committed write did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored at this revision.
    Stored(u64),
    /// The revision of the deletion, if the object existed.
    Deleted(Option<u64>),
    /// The stored JSON text and its revision, if the object exists.
    Value(Option<(String, u64)>),
    /// The precondition of a `Check` held.
    Checked,
    /// How many objects the deleted collection held, and the revision of its deletion (0 if it
    /// held none).
    DeletedCollection { count: u64, rev: u64 },
    /// One outcome per op of a batch, in order.
    Batch(Vec<Outcome>),
    /// How many tombstones were forgotten.
    Purged(usize),
    /// Whether a compaction pass is under way (call again).
    Compacting(bool),
    /// How many expired objects were deleted.
    Expired(usize),
    /// How many objects an import stored.
    Imported(u64),
}

/// The result of one write, known only after its transaction committed (or failed).
pub type Reply = Result<Outcome, Error>;

/// Called by the writer thread with the write's reply, after COMMIT has returned.
pub type Done = Box<dyn FnOnce(Reply) + Send>;
