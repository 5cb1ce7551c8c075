//! `GET /changes`: the change feed, answered at once, as a long-poll (`wait=S`), or as a stream of
//! Server-Sent Events (`Accept: text/event-stream`).
//!
//! Each read is one snapshot of one merged range scan (store/changes.rs). A long-poll or a stream
//! that has nothing to send gives its read connection back and parks its own thread in the
//! `Watch` until a commit touches what it follows, so waiting costs no read connection and no
//! worker; the number waiting at once is capped by `KV_MAX_WAITERS`.
//!
//! A token that may read only some collections and names none gets the feed filtered: entries of
//! other collections are skipped (within the same snapshot, until `limit` readable ones are found
//! or `MAX_SKIPPED` were skipped), and `last_rev` still moves past them, so the next `since` misses
//! nothing readable and never reads them again. An event stream checks before each send that its
//! token is still in force, so revoking a token (and SIGHUP) ends the streams it opened.

use std::io::Write;
use std::time::{Duration, Instant};

use super::{
    Answer, Ctx, Name, Req, Resp, Stream, bool_param, number_param, param, push_json_string,
};
use crate::auth::{Principal, Right};
use crate::error::Error;
use crate::store::{Change, ChangeKind, Page};
use crate::watch::{Lease, Wake};

/// Most changes in one answer, and the default.
const MAX_LIMIT: u64 = 10_000;
const DEFAULT_LIMIT: u64 = 1000;
/// Highest `since` (or `Last-Event-ID`): revisions are SQLite integers, so none is higher.
const MAX_SINCE: u64 = i64::MAX as u64;
/// Longest long-poll, in seconds.
const MAX_WAIT_SECS: u64 = 60;
/// An event stream sends a comment at least this often, so proxies keep it open and a client that
/// has gone is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Changes read at a time for an event stream.
const STREAM_PAGE: usize = 1000;
/// Most entries of unreadable collections one filtered read skips before it answers with what it
/// has (`more` then says to ask again), so that one read holds its snapshot for a bounded time.
const MAX_SKIPPED: usize = 100_000;

/// What a feed request asks for.
struct Feed {
    since: u64,
    /// `None`: every collection.
    collection: Option<String>,
    /// Whose feed it is.
    who: Principal,
    /// Every collection asked for, but the token may read only some: skip the others.
    filtered: bool,
    limit: usize,
    wait: Duration,
    values: bool,
}

impl Feed {
    /// The request's parameters; 403 when the token may not read the named collection, or names
    /// none and may read no collection at all.
    fn parse(req: &Req<'_>, who: &Principal) -> Result<Feed, Error> {
        let query = req.query;
        let collection = match param(query, "collection", "invalid_collection")? {
            None => None,
            Some(name) if name.is_empty() => None,
            Some(name) => Some(Name::Collection.check(name)?),
        };
        who.require(Right::Read, collection.as_deref())?;
        let filtered = collection.is_none() && !who.can_read_all();
        Ok(Feed {
            since: number_param(query, "since", "invalid_since", (0, MAX_SINCE, 0))?,
            collection,
            who: who.clone(),
            filtered,
            limit: number_param(
                query,
                "limit",
                "invalid_limit",
                (1, MAX_LIMIT, DEFAULT_LIMIT),
            )? as usize,
            wait: Duration::from_secs(number_param(
                query,
                "wait",
                "invalid_wait",
                (0, MAX_WAIT_SECS, 0),
            )?),
            values: bool_param(query, "values", "invalid_values", true)?,
        })
    }

    /// The JSON answer of one read from `since`, and what the read found.
    fn answer(&self, ctx: &Ctx<'_>) -> Result<(String, Page), Error> {
        let mut body = String::from(r#"{"changes":["#);
        let page = self.read(ctx, self.since, self.limit, |change| {
            if !body.ends_with('[') {
                body.push(',');
            }
            push_change(&mut body, change);
        })?;
        body.push_str(&format!(
            r#"],"last_rev":{},"more":{}}}"#,
            page.last_rev, page.more
        ));
        Ok((body, page))
    }

    /// One read: the entries after `since` as JSON objects (each appended by `entry`), in one
    /// snapshot; 410 when deletions after `since` may have been forgotten.
    fn read(
        &self,
        ctx: &Ctx<'_>,
        since: u64,
        limit: usize,
        mut entry: impl FnMut(&Change<'_>),
    ) -> Result<Page, Error> {
        ctx.pool.get().snapshot(|store| {
            let oldest_rev = store.compacted_rev()?;
            if since > 0 && since < oldest_rev {
                return Err(Error::Compacted { oldest_rev });
            }
            if !self.filtered {
                return Ok(store.changes(
                    since,
                    self.collection.as_deref(),
                    limit,
                    self.values,
                    &mut entry,
                )?);
            }
            // Filtered: read on past the skipped entries until `limit` readable ones are found.
            let (mut from, mut found, mut skipped) = (since, 0, 0);
            loop {
                let page = store.changes(from, None, limit - found, self.values, |change| {
                    if self.who.can_read(change.collection) {
                        found += 1;
                        entry(change);
                    } else {
                        skipped += 1;
                    }
                })?;
                from = page.last_rev;
                if !page.more || found == limit || skipped >= MAX_SKIPPED {
                    return Ok(Page {
                        count: found,
                        ..page
                    });
                }
            }
        })
    }
}

pub(super) fn changes<'a>(
    req: &Req<'_>,
    ctx: &'a Ctx<'_>,
    who: &Principal,
) -> Result<Answer<'a>, Error> {
    let feed = Feed::parse(req, who)?;
    if req
        .header("accept")
        .is_some_and(|accept| accept.contains("text/event-stream"))
    {
        return stream(req, ctx, feed);
    }
    let deadline = Instant::now() + feed.wait;
    let mut lease = None;
    let mut waited_in_vain = false;
    loop {
        // A long-poll outlives a reload: a token revoked meanwhile gets no answer from the feed.
        if lease.is_some() && !ctx.auth.is_current(&feed.who) {
            return Err(Error::Unauthorized);
        }
        let (body, page) = feed.answer(ctx)?;
        // After a wait that timed out (or a stop), this read gives `last_rev` as of the answer.
        if page.count > 0 || waited_in_vain || Instant::now() >= deadline {
            return Ok(Resp::ok(body).into());
        }
        let lease = match &lease {
            Some(lease) => lease,
            // Only a request that has to wait takes a lease: one answered at once is never refused.
            None => lease.insert(ctx.watch.lease()?),
        };
        let following = feed.collection.as_deref();
        match ctx.watch.wait(lease, following, page.current_rev, deadline) {
            Wake::Changed => {}
            Wake::Timeout | Wake::Stopping => waited_in_vain = true,
        }
    }
}

/// An EventSource stream: every change after `since` (or after `Last-Event-ID`), then each new
/// one as it commits, until kv stops or the client goes.
fn stream<'a>(req: &Req<'_>, ctx: &'a Ctx<'_>, feed: Feed) -> Result<Answer<'a>, Error> {
    let since = match req.header("last-event-id") {
        // Bounded like `since`: past i64::MAX the store would read it as a negative revision
        // and replay the whole feed.
        Some(id) => id
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|rev| *rev <= MAX_SINCE)
            .ok_or_else(|| {
                Error::bad_request(
                    "invalid_since",
                    format!("Last-Event-ID must be a revision from 0 to {MAX_SINCE}, not {id:?}"),
                )
            })?,
        None => feed.since,
    };
    let lease = ctx.watch.lease()?;
    Ok(Answer::Stream(Stream {
        content_type: "text/event-stream",
        headers: vec![("Cache-Control", "no-cache".to_string())],
        body: Box::new(move |out| send_events(ctx, &feed, &lease, since, out)),
    }))
}

fn send_events(
    ctx: &Ctx<'_>,
    feed: &Feed,
    lease: &Lease<'_>,
    mut since: u64,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    loop {
        if !ctx.auth.is_current(&feed.who) {
            log::debug!("GET /changes (stream): its token is no longer in force");
            return Ok(());
        }
        let mut events = String::new();
        let read = feed.read(ctx, since, STREAM_PAGE, |change| {
            events.push_str(&format!("id: {}\nevent: change\ndata: ", change.rev));
            push_change(&mut events, change);
            events.push_str("\n\n");
        });
        let page = match read {
            Ok(page) => page,
            Err(Error::Compacted { oldest_rev }) => {
                let event = format!(
                    "event: compacted\ndata: {{\"code\":\"changes_compacted\",\"oldest_rev\":{oldest_rev}}}\n\n"
                );
                out.write_all(event.as_bytes())?;
                return out.flush();
            }
            Err(e) => {
                log::error!("GET /changes (stream): {e}");
                return Ok(());
            }
        };
        if page.count > 0 {
            out.write_all(events.as_bytes())?;
            out.flush()?;
        }
        // Also past entries a filtered read skipped, so they are not read again.
        since = since.max(page.last_rev);
        if page.more {
            continue;
        }
        let following = feed.collection.as_deref();
        match ctx.watch.wait(
            lease,
            following,
            page.current_rev,
            Instant::now() + KEEPALIVE,
        ) {
            Wake::Changed => {}
            // Writing the comment is how a client that has gone is noticed.
            Wake::Timeout => {
                out.write_all(b": keepalive\n\n")?;
                out.flush()?;
            }
            Wake::Stopping => return Ok(()),
        }
    }
}

/// Appends one feed entry as a JSON object.
fn push_change(out: &mut String, change: &Change<'_>) {
    out.push_str(&format!(r#"{{"rev":{},"collection":"#, change.rev));
    push_json_string(out, change.collection);
    if change.kind != ChangeKind::DeleteCollection {
        out.push_str(r#","key":"#);
        push_json_string(out, change.key);
    }
    out.push_str(match change.kind {
        ChangeKind::Put => r#","op":"put""#,
        ChangeKind::Delete => r#","op":"delete""#,
        ChangeKind::Expired => r#","op":"delete","expired":true"#,
        ChangeKind::DeleteCollection => r#","op":"delete_collection""#,
    });
    if let Some(ms) = change.expires_at {
        out.push_str(&format!(r#","expires_at":{}"#, (ms + 999).div_euclid(1000)));
    }
    if let Some(value) = change.value {
        out.push_str(r#","value":"#);
        out.push_str(value);
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use crate::api::Method;
    use crate::api::tests::Harness;

    #[test]
    fn a_last_event_id_past_the_highest_revision_is_refused_like_since() {
        let h = Harness::new();
        for id in ["9223372036854775808", "18446744073709551615", "-1", "x"] {
            let (status, body, _) = h.call_with(
                Method::Get,
                "/changes",
                &[("accept", "text/event-stream"), ("last-event-id", id)],
                "",
            );
            assert_eq!(
                (status, &body["code"]),
                (400, &"invalid_since".into()),
                "{id}"
            );
        }
        let (status, body) = h.call(Method::Get, "/changes?since=9223372036854775808", "");
        assert_eq!((status, &body["code"]), (400, &"invalid_since".into()));
    }
}
