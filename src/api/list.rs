//! `GET /objects?collection=C`: the list of a collection, whole or a page at a time (keyset paging
//! with an opaque cursor), optionally under a key prefix, with values or keys only.
//!
//! A page (`limit`) is built in memory from a pooled connection: it is at most 10,000 objects. A
//! whole list of a large collection is streamed instead: rows go from one read transaction on a
//! connection of its own to the socket as they are read, with the count taken first in the same
//! transaction, so memory does not depend on the collection's size and a slow client holds its
//! own snapshot and connection, nothing that other requests need.

use std::io::{BufWriter, Write};

use super::{
    Answer, Ctx, Req, Resp, Stream, bool_param, collection, objects::parse_tags, param,
    push_json_string,
};
use crate::error::Error;
use crate::store::{Range, Store};
use crate::writer::Tags;

/// Most objects in one page.
const MAX_LIMIT: usize = 10_000;
/// A whole list of more objects than this is streamed; fewer are answered with a Content-Length.
const MAX_INLINE_OBJECTS: u64 = 1000;
/// Bytes of a streamed list gathered before each write to the socket (one chunk each).
const STREAM_BUFFER_BYTES: usize = 64 * 1024;

/// What a list request asks for.
struct List {
    collection: String,
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
    keys_only: bool,
    if_none_match: Option<Tags>,
}

impl List {
    fn parse(req: &Req<'_>) -> Result<List, Error> {
        let query = req.query;
        let limit = match param(query, "limit", "invalid_limit")? {
            None => None,
            Some(text) => Some(
                text.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n) && !text.starts_with('+'))
                    .ok_or_else(|| {
                        Error::bad_request(
                            "invalid_limit",
                            format!(
                                "limit must be a whole number from 1 to {MAX_LIMIT}, not {text:?}"
                            ),
                        )
                    })?,
            ),
        };
        let after = match param(query, "cursor", "invalid_cursor")? {
            None => None,
            Some(cursor) if cursor.is_empty() => None,
            Some(cursor) => Some(decode_cursor(&cursor).ok_or_else(|| {
                Error::bad_request(
                    "invalid_cursor",
                    "the cursor is not one kv gave out (pass next_cursor as it came)",
                )
            })?),
        };
        Ok(List {
            collection: collection(query)?,
            prefix: param(query, "prefix", "invalid_prefix")?.unwrap_or_default(),
            after,
            limit,
            keys_only: bool_param(query, "keys_only", "invalid_keys_only", false)?,
            if_none_match: match req.header("if-none-match") {
                Some(header) => Some(parse_tags(&header, true)?),
                None => None,
            },
        })
    }

    fn range(&self) -> Range<'_> {
        Range {
            prefix: &self.prefix,
            after: self.after.as_deref(),
            limit: self.limit,
        }
    }

    /// 304 when the client's copy is current: a collection's ETag names its state, so `*`
    /// matches even an empty collection.
    fn not_modified(&self, rev: u64) -> Option<Resp> {
        let tags = self.if_none_match.as_ref()?;
        (matches!(tags, Tags::Any) || tags.matches(Some(rev))).then(|| Resp::not_modified(rev))
    }

    /// The body up to the first object: `{"count":N,"objects":{` (or `"keys":[`).
    fn head(&self, count: u64) -> String {
        let open = if self.keys_only {
            "keys\":["
        } else {
            "objects\":{"
        };
        format!(r#"{{"count":{count},"{open}"#)
    }

    /// Appends one object (or key) after `first` others.
    fn push(&self, out: &mut String, first: bool, key: &str, value: Option<&str>) {
        if !first {
            out.push(',');
        }
        push_json_string(out, key);
        if let Some(value) = value {
            out.push(':');
            out.push_str(value);
        }
    }

    fn close(&self) -> &'static str {
        if self.keys_only { "]" } else { "}" }
    }
}

pub(super) fn list<'a>(req: &Req<'_>, ctx: &'a Ctx<'_>) -> Result<Answer<'a>, Error> {
    let list = List::parse(req)?;
    if list.limit.is_some() {
        return page(ctx, &list).map(Answer::from);
    }
    let small = ctx.pool.get().snapshot(|store| -> Result<_, Error> {
        let rev = store.collection_rev(&list.collection)?;
        if let Some(resp) = list.not_modified(rev) {
            return Ok(Some(resp));
        }
        let count = store.count_live(&list.collection, list.range())?;
        if count > MAX_INLINE_OBJECTS {
            return Ok(None);
        }
        let mut body = list.head(count);
        let mut first = true;
        store.list(
            &list.collection,
            list.range(),
            !list.keys_only,
            |key, value| {
                list.push(&mut body, first, key, value);
                first = false;
            },
        )?;
        body.push_str(list.close());
        body.push('}');
        Ok(Some(Resp::ok(body).with_etag(rev)))
    })?;
    match small {
        Some(resp) => Ok(resp.into()),
        None => stream(ctx, list),
    }
}

/// One page: at most `limit` objects, and the cursor of the next page when more follow.
fn page(ctx: &Ctx<'_>, list: &List) -> Result<Resp, Error> {
    ctx.pool.get().snapshot(|store| {
        let rev = store.collection_rev(&list.collection)?;
        if let Some(resp) = list.not_modified(rev) {
            return Ok(resp);
        }
        let mut items = String::new();
        let mut last = String::new();
        let (count, more) = store.list(
            &list.collection,
            list.range(),
            !list.keys_only,
            |key, value| {
                list.push(&mut items, last.is_empty(), key, value);
                last.clear();
                last.push_str(key);
            },
        )?;
        let mut body = list.head(count as u64);
        body.push_str(&items);
        body.push_str(list.close());
        let mut resp = Resp::ok(String::new());
        if more {
            let cursor = encode_cursor(&last);
            body.push_str(&format!(r#","next_cursor":"{cursor}""#));
            resp.headers.push(("Link", next_link(list, &cursor)));
        }
        body.push('}');
        resp.body = body;
        Ok(resp.with_etag(rev))
    })
}

/// A whole list too large to hold: its count and ETag from a snapshot taken now, its rows written
/// from that same snapshot as the client takes them.
fn stream<'a>(ctx: &'a Ctx<'_>, list: List) -> Result<Answer<'a>, Error> {
    let store = ctx.pool.dedicated()?;
    store.begin_read()?;
    let rev = store.collection_rev(&list.collection)?;
    let count = store.count_live(&list.collection, list.range())?;
    Ok(Answer::Stream(Stream {
        content_type: "application/json",
        headers: vec![("ETag", super::etag(rev))],
        body: Box::new(move |out| send_list(&store, &list, count, out)),
    }))
}

fn send_list(store: &Store, list: &List, count: u64, out: &mut dyn Write) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(STREAM_BUFFER_BYTES, out);
    out.write_all(list.head(count).as_bytes())?;
    let mut item = String::new();
    let mut first = true;
    let mut failed = Ok(());
    let listed = store.list(
        &list.collection,
        list.range(),
        !list.keys_only,
        |key, value| {
            if failed.is_err() {
                return;
            }
            item.clear();
            list.push(&mut item, first, key, value);
            first = false;
            failed = out.write_all(item.as_bytes());
        },
    );
    failed?;
    match listed {
        // The snapshot ends here, so the checkpoint can move past it.
        Ok(_) => {
            let _ = store.end_read();
        }
        Err(e) => {
            // The 200 is on its way: breaking the chunked body is how the client learns.
            log::error!("GET /objects (streamed list): {e}");
            return Err(std::io::Error::other(e));
        }
    }
    out.write_all(list.close().as_bytes())?;
    out.write_all(b"}")?;
    out.flush()
}

/// The `Link` header of the next page (RFC 8288), with the request's other parameters.
fn next_link(list: &List, cursor: &str) -> String {
    let mut target = format!("/objects?collection={}", query_encode(&list.collection));
    if !list.prefix.is_empty() {
        target.push_str(&format!("&prefix={}", query_encode(&list.prefix)));
    }
    if list.keys_only {
        target.push_str("&keys_only=true");
    }
    if let Some(limit) = list.limit {
        target.push_str(&format!("&limit={limit}"));
    }
    format!("<{target}&cursor={cursor}>; rel=\"next\"")
}

/// Percent-encodes all but the unreserved characters (RFC 3986 §2.3).
fn query_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A cursor: the last key of a page in unpadded base64url, opaque to clients and safe in a URL.
fn encode_cursor(key: &str) -> String {
    let mut out = String::with_capacity(key.len().div_ceil(3) * 4);
    for chunk in key.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(BASE64URL[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The key a cursor stands for; `None` for anything kv could not have given out.
fn decode_cursor(cursor: &str) -> Option<String> {
    if cursor.len() % 4 == 1 {
        return None;
    }
    let mut bytes = Vec::with_capacity(cursor.len() * 3 / 4);
    for chunk in cursor.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let digit = BASE64URL.iter().position(|&d| d == c)? as u32;
            n |= digit << (18 - 6 * i);
        }
        let whole = chunk.len() - 1;
        // Bits past the last whole byte must be zero, as the encoder leaves them.
        if n & ((1 << (24 - 8 * whole)) - 1) != 0 {
            return None;
        }
        bytes.extend((0..whole).map(|i| (n >> (16 - 8 * i)) as u8));
    }
    String::from_utf8(bytes).ok().filter(|key| !key.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_what_kv_never_gives_out() {
        for key in [
            "a",
            "ab",
            "abc",
            "abcd",
            "ü 日本 🎉",
            "a/b?c=d&e",
            &"k".repeat(1024),
        ] {
            let cursor = encode_cursor(key);
            assert!(cursor.bytes().all(|b| BASE64URL.contains(&b)), "{cursor}");
            assert_eq!(decode_cursor(&cursor).as_deref(), Some(key));
        }
        assert_eq!(encode_cursor("abc"), "YWJj");
        assert_eq!(encode_cursor("ab"), "YWI");
        for bad in ["Y", "YW=", "Y!I", "YWJ", "_w", "gA"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(query_encode("a b&c/é"), "a%20b%26c%2F%C3%A9");
    }
}
