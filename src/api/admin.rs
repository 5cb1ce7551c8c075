//! Operating kv: `GET /metrics` (Prometheus), and the routes that move whole databases.

use std::fs::File;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Answer, Ctx, Resp, Stream};
use crate::error::Error;
use crate::metrics::{CONTENT_TYPE, Snapshot};
use crate::store::backup::TempFile;

/// The Prometheus exposition, with the store's gauges read now.
pub(super) fn metrics(ctx: &Ctx<'_>) -> Result<Resp, Error> {
    let stats = ctx.pool.get().stats()?;
    let snapshot = Snapshot {
        objects: stats.objects,
        collections: stats.collections,
        database_bytes: stats.database_bytes,
        wal_bytes: stats.wal_bytes,
        revision: stats.revision,
        change_waiters: ctx.watch.waiters(),
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
