//! Operating kv: `GET /metrics` (Prometheus), and the routes that move whole databases.

use super::{Ctx, Resp};
use crate::error::Error;
use crate::metrics::{CONTENT_TYPE, Snapshot};

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
