//! The one error type of the request path, and how each kind maps to an HTTP status and a JSON body.
//!
//! Client mistakes carry a stable snake_case `code` for scripts and a sentence for people; storage
//! failures become a 500 whose body says only "internal error" while the cause goes to the log.

use std::fmt;

/// Everything a request can fail with.
#[derive(Debug)]
pub enum Error {
    /// 400: the request is malformed; `index` names the offending batch op, if any.
    BadRequest {
        code: &'static str,
        message: String,
        index: Option<usize>,
    },
    /// 401: no token, a malformed `Authorization` header, or a token the tokens file does not know.
    /// The HTTP layer adds `WWW-Authenticate: Bearer realm="kv"` to this answer.
    Unauthorized,
    /// 403: a known token without the right this request needs; `message` says which right,
    /// `index` names the batch op that needs it, if any.
    Forbidden {
        message: String,
        index: Option<usize>,
    },
    /// 400: line `line` (from 1) of an NDJSON import is not an object kv can store.
    InvalidLine { line: usize, message: String },
    /// 404: no such object, collection or route.
    NotFound { code: &'static str, message: String },
    /// 405: the path exists but not with this method; `allow` lists the methods it takes.
    MethodNotAllowed { allow: &'static str },
    /// 413: the body or the batch is over its limit.
    TooLarge { code: &'static str, message: String },
    /// 408: the client took too long to send its request; the sentence says which part.
    Timeout(&'static str),
    /// 417: an `Expect` header other than `100-continue`.
    ExpectationFailed,
    /// 505: a request line of an HTTP version other than 1.0 and 1.1.
    VersionNotSupported,
    /// 501: a `Transfer-Encoding` other than `chunked` alone (RFC 9112 §6.1).
    TransferCodingNotSupported,
    /// 410: the change feed no longer remembers every deletion after the requested revision;
    /// `oldest_rev` is the lowest `since` it accepts now.
    Compacted { oldest_rev: u64 },
    /// 412: a precondition on the object's revision failed; nothing was changed. `index` names the
    /// failing op of a batch.
    PreconditionFailed {
        key: String,
        current_rev: Option<u64>,
        index: Option<usize>,
    },
    /// 500: the database failed; the cause is logged, never sent.
    Storage(crate::store::DbError),
    /// 503: the database server cannot be reached (PostgreSQL); kv reconnects by itself.
    DatabaseUnavailable(String),
    /// 503: the database cannot be read (for `/health`), or kv is stopping; the cause is logged.
    Unavailable(String),
    /// 503: `KV_MAX_WAITERS` requests already wait for changes; sent with `Retry-After`.
    TooManyWaiters,
    /// 507: the disk is full; writes that add data are refused until it has room (deletes go on).
    StorageFull,
    /// 507: the write would take the database past `KV_MAX_DB_BYTES`; deletes make room.
    QuotaExceeded { max_bytes: u64 },
    /// 500: a bug (a handler panicked or a thread vanished); the cause is logged, never sent.
    Internal(String),
}

impl Error {
    /// A 400 with the given code and sentence.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Error {
        Error::BadRequest {
            code,
            message: message.into(),
            index: None,
        }
    }

    /// A 404 with the given code and sentence.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Error {
        Error::NotFound {
            code,
            message: message.into(),
        }
    }

    /// A 500 for a caught panic, keeping its message for the log.
    pub fn from_panic(panic: Box<dyn std::any::Any + Send>) -> Error {
        let message = match panic.downcast::<String>() {
            Ok(s) => *s,
            Err(panic) => match panic.downcast::<&str>() {
                Ok(s) => s.to_string(),
                Err(_) => "unknown payload".to_string(),
            },
        };
        Error::Internal(format!("panicked: {message}"))
    }

    /// The same error, naming the batch op it comes from (client errors only).
    pub fn at_index(self, index: usize) -> Error {
        match self {
            Error::BadRequest { code, message, .. } => Error::BadRequest {
                code,
                message: format!("op {index}: {message}"),
                index: Some(index),
            },
            Error::PreconditionFailed {
                key, current_rev, ..
            } => Error::PreconditionFailed {
                key,
                current_rev,
                index: Some(index),
            },
            Error::Forbidden { message, .. } => Error::Forbidden {
                message: format!("op {index}: {message}"),
                index: Some(index),
            },
            other => other,
        }
    }

    /// The HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest { .. } | Error::InvalidLine { .. } => 400,
            Error::Unauthorized => 401,
            Error::Forbidden { .. } => 403,
            Error::NotFound { .. } => 404,
            Error::MethodNotAllowed { .. } => 405,
            Error::Timeout(_) => 408,
            Error::ExpectationFailed => 417,
            Error::VersionNotSupported => 505,
            Error::TransferCodingNotSupported => 501,
            Error::Compacted { .. } => 410,
            Error::PreconditionFailed { .. } => 412,
            Error::TooLarge { .. } => 413,
            Error::Storage(_) | Error::Internal(_) => 500,
            Error::Unavailable(_) | Error::DatabaseUnavailable(_) | Error::TooManyWaiters => 503,
            Error::StorageFull | Error::QuotaExceeded { .. } => 507,
        }
    }

    /// The stable token scripts branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest { code, .. }
            | Error::NotFound { code, .. }
            | Error::TooLarge { code, .. } => code,
            Error::Unauthorized => "unauthorized",
            Error::Forbidden { .. } => "forbidden",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::Timeout(_) => "request_timeout",
            Error::ExpectationFailed => "expectation_failed",
            Error::VersionNotSupported => "http_version_not_supported",
            Error::TransferCodingNotSupported => "unsupported_transfer_coding",
            Error::Compacted { .. } => "changes_compacted",
            Error::InvalidLine { .. } => "invalid_line",
            Error::PreconditionFailed { .. } => "precondition_failed",
            Error::Storage(_) | Error::Internal(_) => "internal_error",
            Error::Unavailable(_) => "unavailable",
            Error::DatabaseUnavailable(_) => "database_unavailable",
            Error::TooManyWaiters => "too_many_waiters",
            Error::StorageFull => "storage_full",
            Error::QuotaExceeded { .. } => "quota_exceeded",
        }
    }

    /// Headers the response must carry besides the body's.
    pub fn headers(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Error::Unauthorized => Some(("WWW-Authenticate", r#"Bearer realm="kv""#)),
            Error::MethodNotAllowed { allow } => Some(("Allow", allow)),
            Error::TooManyWaiters | Error::DatabaseUnavailable(_) => Some(("Retry-After", "1")),
            Error::StorageFull => Some(("Retry-After", "5")),
            _ => None,
        }
    }

    /// The JSON body sent to the client: `{"error": "...", "code": "..."}`, plus the fields that
    /// say more (`index` of a batch op, `key` and `current_rev` of a failed precondition, ...).
    pub fn body(&self) -> String {
        let message = match self {
            Error::BadRequest { message, .. }
            | Error::NotFound { message, .. }
            | Error::TooLarge { message, .. } => message.clone(),
            Error::InvalidLine { line, message } => format!("line {line}: {message}"),
            Error::Unauthorized => "a valid bearer token is required".into(),
            Error::Forbidden { message, .. } => message.clone(),
            Error::MethodNotAllowed { .. } => "method not allowed on this path".into(),
            Error::Timeout(what) => (*what).into(),
            Error::ExpectationFailed => {
                "the Expect header asks for something kv does not do (only 100-continue)".into()
            }
            Error::VersionNotSupported => "kv speaks HTTP/1.1 (and HTTP/1.0)".into(),
            Error::TransferCodingNotSupported => {
                "kv takes a request body as it is or chunked (Transfer-Encoding: chunked), no other coding".into()
            }
            Error::Compacted { oldest_rev } => format!(
                "the change feed has forgotten deletions after this revision; \
                 start over from since=0 (the oldest since accepted now is {oldest_rev})"
            ),
            Error::PreconditionFailed {
                key, current_rev, ..
            } => match current_rev {
                Some(rev) => format!("precondition failed: {key:?} is at revision {rev}"),
                None => format!("precondition failed: {key:?} does not exist"),
            },
            Error::Storage(_) | Error::Internal(_) => "internal error".into(),
            Error::Unavailable(_) => "service unavailable".into(),
            Error::DatabaseUnavailable(_) => {
                "the database cannot be reached; kv reconnects by itself, retry shortly".into()
            }
            Error::TooManyWaiters => {
                "too many requests are waiting for changes; retry in a second".into()
            }
            Error::StorageFull => {
                "the disk is full; deletes still work, writes resume when it has room".into()
            }
            Error::QuotaExceeded { max_bytes } => format!(
                "the write would take the database past its quota of {max_bytes} bytes \
                 (KV_MAX_DB_BYTES); delete objects to make room"
            ),
        };
        let mut body = serde_json::json!({ "error": message, "code": self.code() });
        match self {
            Error::BadRequest {
                index: Some(index), ..
            }
            | Error::Forbidden {
                index: Some(index), ..
            } => body["index"] = (*index).into(),
            Error::PreconditionFailed {
                key,
                current_rev,
                index,
            } => {
                if let Some(index) = index {
                    body["index"] = (*index).into();
                }
                body["key"] = key.as_str().into();
                body["current_rev"] = (*current_rev).into();
            }
            Error::Compacted { oldest_rev } => body["oldest_rev"] = (*oldest_rev).into(),
            Error::InvalidLine { line, .. } => body["line"] = (*line).into(),
            _ => {}
        }
        body.to_string()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Storage(e) => write!(f, "storage error: {e}"),
            Error::Unavailable(why) => write!(f, "unavailable: {why}"),
            Error::DatabaseUnavailable(why) => write!(f, "database unavailable: {why}"),
            Error::Internal(cause) => write!(f, "internal error: {cause}"),
            other => write!(f, "{} ({})", other.status(), other.code()),
        }
    }
}

impl From<crate::store::DbError> for Error {
    fn from(e: crate::store::DbError) -> Error {
        if e.is_unavailable() {
            Error::DatabaseUnavailable(e.to_string())
        } else {
            Error::Storage(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_carry_their_sentence_and_code() {
        let e = Error::bad_request("invalid_key", "key must not be empty");
        assert_eq!(e.status(), 400);
        let body: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "key must not be empty", "code": "invalid_key"})
        );
    }

    #[test]
    fn batch_errors_name_the_op() {
        let e = Error::BadRequest {
            code: "invalid_op",
            message: "unknown op".into(),
            index: Some(2),
        };
        let body: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(body["index"], 2);
    }

    #[test]
    fn auth_errors_are_401_and_403() {
        let e = Error::Unauthorized;
        assert_eq!(e.status(), 401);
        assert_eq!(
            e.body(),
            r#"{"code":"unauthorized","error":"a valid bearer token is required"}"#
        );
        assert_eq!(
            e.headers(),
            Some(("WWW-Authenticate", r#"Bearer realm="kv""#))
        );
        let e = Error::Forbidden {
            message: r#"this token may not write collection "config""#.into(),
            index: None,
        };
        assert_eq!(e.status(), 403);
        let body: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": r#"this token may not write collection "config""#, "code": "forbidden"})
        );
        let body: serde_json::Value = serde_json::from_str(&e.at_index(3).body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": r#"op 3: this token may not write collection "config""#,
                "code": "forbidden", "index": 3})
        );
    }

    #[test]
    fn protocol_errors_have_their_status_and_code() {
        for (e, status, code) in [
            (Error::Timeout("too slow"), 408, "request_timeout"),
            (Error::ExpectationFailed, 417, "expectation_failed"),
            (
                Error::TransferCodingNotSupported,
                501,
                "unsupported_transfer_coding",
            ),
            (
                Error::VersionNotSupported,
                505,
                "http_version_not_supported",
            ),
        ] {
            assert_eq!((e.status(), e.code()), (status, code));
            let body: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
            assert_eq!(body["code"], code);
            assert!(body["error"].as_str().is_some_and(|s| !s.is_empty()));
        }
    }

    #[test]
    fn storage_errors_hide_their_cause() {
        let e = Error::from(crate::store::DbError::from(rusqlite::Error::InvalidQuery));
        assert_eq!(e.status(), 500);
        assert_eq!(
            e.body(),
            r#"{"code":"internal_error","error":"internal error"}"#
        );
        assert!(e.to_string().contains("storage error"));
    }
}
