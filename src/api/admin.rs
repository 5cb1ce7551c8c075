//! Operating kv: the probes `/health` and `/ready`, `GET /metrics` (Prometheus), and the routes
//! that move whole databases: the online backup, and NDJSON export and import.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Answer, Ctx, Name, Req, Resp, Stream, param, push_json_string};
use crate::auth::{Principal, Right};
use crate::error::Error;
use crate::metrics::{CONTENT_TYPE, Snapshot};
use crate::store::Store;
use crate::store::backup::TempFile;
use crate::writer::{ImportLine, Op, Outcome};

/// Bytes of an export gathered before each write to the socket (one chunk each).
const EXPORT_BUFFER_BYTES: usize = 64 * 1024;

/// The Prometheus exposition, with the store's gauges read now.
pub(super) fn metrics(ctx: &Ctx<'_>) -> Result<Resp, Error> {
    let store = ctx.pool.get();
    let stats = store.stats()?;
    let snapshot = Snapshot {
        objects: stats.objects,
        collections: stats.collections,
        database_bytes: stats.database_bytes,
        wal_bytes: stats.wal_bytes,
        revision: stats.revision,
        change_waiters: ctx.watch.waiters(),
        used_bytes: stats.used_bytes,
        max_bytes: ctx.space.max(),
        writes_refused: ctx.space.refusal(),
    };
    let body = ctx
        .metrics
        .render(&snapshot)
        .map_err(|e| Error::Internal(format!("cannot render the metrics: {e}")))?;
    let mut resp = Resp::ok(body);
    resp.headers
        .push(("Content-Type", CONTENT_TYPE.to_string()));
    Ok(resp)
}

/// `/ready`: 200 when kv can read and write, else 503 with the reason; both with the sizes.
pub(super) fn ready(ctx: &Ctx<'_>) -> Resp {
    let space = ctx.space;
    let used = ctx.pool.get().used_bytes();
    let reason = if ctx.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        Some("shutting_down")
    } else if used.is_err() {
        Some("database_unavailable")
    } else {
        space.refusal()
    };
    let max = space
        .max()
        .map_or("null".to_string(), |max| max.to_string());
    let used = used.unwrap_or_else(|_| space.used());
    let sizes = format!(r#""database_bytes":{used},"max_database_bytes":{max}"#);
    match reason {
        None => Resp::ok(format!(r#"{{"status":"ready",{sizes}}}"#)),
        Some(reason) => Resp {
            status: 503,
            body: format!(r#"{{"status":"not_ready","reason":"{reason}",{sizes}}}"#),
            headers: Vec::new(),
        },
    }
}

pub(super) fn health(store: &Store) -> Result<Resp, Error> {
    store.ping().map_err(|e| match Error::from(e) {
        unreachable @ Error::DatabaseUnavailable(_) => unreachable,
        other => Error::Unavailable(format!("the database cannot be read: {other}")),
    })?;
    Ok(Resp::ok(r#"{"status":"healthy"}"#.to_string()))
}

/// `GET /admin/backup`: a consistent copy of the whole database as a SQLite file, made from one
/// read snapshot into a temporary file beside the database (writes go on meanwhile), then
/// streamed and deleted.
pub(super) fn backup<'a>(ctx: &'a Ctx<'_>) -> Result<Answer<'a>, Error> {
    let store = ctx.pool.dedicated()?;
    let copy = TempFile::new_in(&store.directory(), "kv-backup");
    store.backup_into(copy.path())?;
    let file = File::open(copy.path())
        .map_err(|e| Error::Internal(format!("cannot read the backup just made: {e}")))?;
    let name = format!("kv-{}.sqlite3", utc_timestamp(unix_secs()));
    Ok(Answer::Stream(Stream {
        content_type: "application/vnd.sqlite3",
        headers: vec![(
            "Content-Disposition",
            format!("attachment; filename=\"{name}\""),
        )],
        body: Box::new(move |out| {
            let _delete_when_sent = copy;
            std::io::copy(&mut &file, out).map(|_| ())
        }),
    }))
}

/// `GET /export[?collection=C]`: every live object (of C, or of all), one NDJSON line each, from
/// one read snapshot on a connection of its own, written as it is read.
pub(super) fn export<'a>(
    req: &Req<'_>,
    ctx: &'a Ctx<'_>,
    who: &Principal,
) -> Result<Answer<'a>, Error> {
    let collection = match param(req.query, "collection", "invalid_collection")? {
        Some(name) if !name.is_empty() => Some(Name::Collection.check(name)?),
        _ => None,
    };
    who.require(Right::Read, collection.as_deref())?;
    // Without a collection, a token that may not read everything gets what it may read.
    let only_readable = (collection.is_none() && !who.can_read_all()).then(|| who.clone());
    let store = ctx.pool.dedicated()?;
    Ok(Answer::Stream(Stream {
        content_type: "application/x-ndjson",
        headers: Vec::new(),
        body: Box::new(move |out| {
            let mut out = BufWriter::with_capacity(EXPORT_BUFFER_BYTES, out);
            let mut line = String::new();
            let mut failed = Ok(());
            let exported = store.snapshot(|s| {
                s.export(
                    collection.as_deref(),
                    |collection, key, value, expires_at| {
                        if only_readable
                            .as_ref()
                            .is_some_and(|w| !w.can_read(collection))
                        {
                            return true;
                        }
                        line.clear();
                        line.push_str(r#"{"collection":"#);
                        push_json_string(&mut line, collection);
                        line.push_str(r#","key":"#);
                        push_json_string(&mut line, key);
                        line.push_str(r#","value":"#);
                        line.push_str(value);
                        if let Some(ms) = expires_at {
                            line.push_str(&format!(
                                r#","expires_at":{}"#,
                                (ms + 999).div_euclid(1000)
                            ));
                        }
                        line.push_str("}\n");
                        failed = out.write_all(line.as_bytes());
                        failed.is_ok()
                    },
                )
            });
            failed?;
            if let Err(e) = exported {
                // The 200 is on its way: breaking the chunked body is how the client learns.
                log::error!("GET /export: {e}");
                return Err(std::io::Error::other(e));
            }
            out.flush()
        }),
    }))
}

/// `POST /import[?mode=replace]`: the body (spooled to a file by the HTTP layer) is checked line
/// by line here, so a bad line is a 400 naming it and nothing is applied; then the writer stores
/// every object in one transaction (after emptying the collections the file names, with
/// `mode=replace`).
pub(super) fn import(req: &Req<'_>, who: &Principal) -> Result<Answer<'static>, Error> {
    let replace = match param(req.query, "mode", "invalid_mode")?.as_deref() {
        None | Some("merge") => false,
        Some("replace") => true,
        Some(other) => {
            return Err(Error::bad_request(
                "invalid_mode",
                format!("mode must be merge or replace, not {other:?}"),
            ));
        }
    };
    let upload = req
        .upload
        .borrow_mut()
        .take()
        .ok_or_else(|| Error::Internal("the import body was not spooled".into()))?;
    let unreadable = |e: std::io::Error| Error::Internal(format!("cannot read the import: {e}"));
    let file = File::open(upload.path()).map_err(unreadable)?;
    let mut collections = BTreeSet::new();
    let mut reader = BufReader::new(file);
    let mut raw = Vec::new();
    let mut number = 0;
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw).map_err(unreadable)? == 0 {
            break;
        }
        number += 1;
        let bad = |message: String| Error::InvalidLine {
            line: number,
            message,
        };
        let line = std::str::from_utf8(&raw).map_err(|_| bad("not valid UTF-8".into()))?;
        if line.trim().is_empty() {
            continue;
        }
        let collection = check_line(line).map_err(bad)?;
        if !collections.contains(&collection) {
            who.require(Right::Write, Some(&collection))?;
            collections.insert(collection);
        }
    }
    let replace = if replace {
        collections.into_iter().collect()
    } else {
        Vec::new()
    };
    Ok(Answer::AfterCommit(
        Op::Import { upload, replace },
        Box::new(|outcome| match outcome {
            Outcome::Imported(n) => Ok(Resp::ok(format!(r#"{{"imported":{n}}}"#))),
            other => Err(super::objects::unexpected(&other)),
        }),
    ))
}

/// Checks one import line: a JSON object with a valid `key`, a `value`, and optionally a valid
/// `collection` and `expires_at`; returns its collection.
fn check_line(line: &str) -> Result<String, String> {
    if !line.trim_start().starts_with('{') {
        return Err("not a JSON object".into());
    }
    let item: ImportLine<'_> = serde_json::from_str(line).map_err(|e| {
        format!("not an object with \"key\" and \"value\" (and optionally \"collection\", \"expires_at\"): {e}")
    })?;
    let message = |e: Error| match e {
        Error::BadRequest { message, .. } => message,
        other => other.to_string(),
    };
    Name::Key.check(item.key.into_owned()).map_err(message)?;
    match item.collection {
        None => Ok(crate::store::DEFAULT_COLLECTION.to_string()),
        Some(name) if name.is_empty() => Ok(crate::store::DEFAULT_COLLECTION.to_string()),
        Some(name) => Name::Collection.check(name.into_owned()).map_err(message),
    }
}

fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `20261127T101500Z` for a unix time (UTC, proleptic Gregorian calendar).
fn utc_timestamp(secs: i64) -> String {
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "19700101T000000Z");
        assert_eq!(utc_timestamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_timestamp(1_795_782_896), "20261127T123456Z");
    }
}
