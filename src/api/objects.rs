//! `PUT /objects`, `GET`/`HEAD`/`DELETE /objects/:key` and the list `GET /objects`, with their
//! conditional forms (RFC 9110 §13): `ETag` is the object's revision (the list's: the collection's
//! latest revision), `If-None-Match` on a read answers 304, and `If-Match`/`If-None-Match` on a
//! write become a `Cond` that the writer checks in the write's own transaction.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Answer, Ctx, Name, Req, Resp, collection, json_string, json_text, key_from_json,
    object_from_str, present, push_json_string,
};
use crate::error::Error;
use crate::writer::{Cond, Op, Outcome, Tags};

/// The body of `PUT /objects`. `present` keeps `"value": null` apart from a missing value.
#[derive(Deserialize)]
struct PutBody<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    key: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ttl: Option<&'a RawValue>,
}

pub(super) fn put(req: &Req<'_>) -> Result<Answer<'static>, Error> {
    let cond = preconditions(req)?;
    let collection = collection(req.query)?;
    let text = json_text(&req.body)?;
    let body: PutBody<'_> = object_from_str(text)?;
    let key = key_from_json(body.key)?;
    let value = body.value.ok_or_else(|| {
        Error::bad_request(
            "missing_value",
            "the body has no \"value\" (use \"value\": null to store null)",
        )
    })?;
    let ttl_secs = ttl(body.ttl)?;
    let quoted = json_string(&key);
    let op = Op::Put {
        collection,
        key,
        value: value.get().to_string(),
        cond,
        ttl_secs,
    };
    Ok(Answer::AfterCommit(
        op,
        Box::new(move |outcome| match outcome {
            Outcome::Stored(rev) => Ok(Resp::ok(format!(
                r#"{{"message":"Object stored successfully","key":{quoted},"rev":{rev}}}"#
            ))
            .with_etag(rev)),
            other => Err(unexpected(&other)),
        }),
    ))
}

pub(super) fn get(req: &Req<'_>, ctx: &Ctx<'_>, encoded_key: &str) -> Result<Resp, Error> {
    let cond = preconditions(req)?;
    let collection = collection(req.query)?;
    let key = Name::Key.parse_path(encoded_key)?;
    let found = ctx
        .pool
        .get()
        .get_with(&collection, &key, |value, version| {
            if !cond.holds(Some(version.rev)) {
                return (version, None);
            }
            let mut body = String::with_capacity(key.len() + value.len() + 20);
            body.push_str(r#"{"key":"#);
            push_json_string(&mut body, &key);
            body.push_str(r#","value":"#);
            body.push_str(value);
            body.push('}');
            (version, Some(body))
        })?;
    match found {
        None if cond.if_match.is_some() => Err(precondition_failed(&key, None)),
        None => Err(object_not_found(&key, &collection)),
        Some((version, Some(body))) => {
            let mut resp = Resp::ok(body).with_etag(version.rev);
            if let Some(ms) = version.expires_at {
                // Whole seconds, rounded up: the object is surely gone at that second.
                let secs = (ms + 999).div_euclid(1000);
                resp.headers.push(("Kv-Expires-At", secs.to_string()));
            }
            Ok(resp)
        }
        Some((version, None)) => read_precondition_failed(&cond, &key, version.rev),
    }
}

/// Longest time to live: ten years, in seconds.
const MAX_TTL_SECS: u64 = 315_360_000;

/// The optional `"ttl"` of a put: whole seconds from 1 to `MAX_TTL_SECS`; `null` is no ttl.
pub(super) fn ttl(raw: Option<&RawValue>) -> Result<Option<u64>, Error> {
    let Some(raw) = raw.filter(|raw| raw.get() != "null") else {
        return Ok(None);
    };
    // serde refuses 1.0, 1e3, -1, "1" and true as a u64, as it should.
    match serde_json::from_str::<u64>(raw.get()) {
        Ok(secs) if (1..=MAX_TTL_SECS).contains(&secs) => Ok(Some(secs)),
        _ => Err(Error::bad_request(
            "invalid_ttl",
            format!(
                "\"ttl\" must be a whole number of seconds from 1 to {MAX_TTL_SECS}, not {}",
                raw.get()
            ),
        )),
    }
}

/// A read whose precondition failed: 412 for `If-Match`, 304 for `If-None-Match` (RFC 9110 §13.2.2).
fn read_precondition_failed(cond: &Cond, key: &str, rev: u64) -> Result<Resp, Error> {
    if cond
        .if_match
        .as_ref()
        .is_some_and(|t| !t.matches(Some(rev)))
    {
        return Err(precondition_failed(key, Some(rev)));
    }
    Ok(Resp::not_modified(rev))
}

pub(super) fn delete(req: &Req<'_>, encoded_key: &str) -> Result<Answer<'static>, Error> {
    let cond = preconditions(req)?;
    let collection = collection(req.query)?;
    let key = Name::Key.parse_path(encoded_key)?;
    let quoted = json_string(&key);
    let absent = object_not_found(&key, &collection);
    let op = Op::Delete {
        collection,
        key,
        cond,
    };
    Ok(Answer::AfterCommit(
        op,
        Box::new(move |outcome| match outcome {
            Outcome::Deleted(Some(rev)) => Ok(Resp::ok(format!(
                r#"{{"message":"Object deleted successfully","key":{quoted},"rev":{rev}}}"#
            ))),
            _ => Err(absent),
        }),
    ))
}

/// The `If-Match` and `If-None-Match` headers of a request, checked for syntax.
fn preconditions(req: &Req<'_>) -> Result<Cond, Error> {
    let if_match = match req.header("if-match") {
        // If-Match compares strongly: a weak tag never matches (RFC 9110 §13.1.1).
        Some(header) => Some(parse_tags(&header, false)?),
        None => None,
    };
    let if_none_match = match req.header("if-none-match") {
        Some(header) => Some(parse_tags(&header, true)?),
        None => None,
    };
    Ok(Cond {
        if_match,
        if_none_match,
    })
}

/// Parses `*` or a list of entity tags (`"5", W/"6"`) into revisions. Tags that are not decimal
/// revisions are valid but match nothing; weak tags are kept only when `weak_matches`.
pub(super) fn parse_tags(header: &str, weak_matches: bool) -> Result<Tags, Error> {
    let invalid = || {
        Error::bad_request(
            "invalid_precondition",
            format!(
                "If-Match and If-None-Match take * or a list of quoted entity tags such as \"5\", not {header:?}"
            ),
        )
    };
    if header.trim() == "*" {
        return Ok(Tags::Any);
    }
    let mut revs = Vec::new();
    let mut rest = header.trim_start_matches([' ', '\t', ',']);
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let (weak, tagged) = match rest.strip_prefix("W/") {
            Some(tagged) => (true, tagged),
            None => (false, rest),
        };
        let inner = tagged.strip_prefix('"').ok_or_else(invalid)?;
        let end = inner.find('"').ok_or_else(invalid)?;
        let tag = &inner[..end];
        // etagc: %x21 / %x23-7E / obs-text (RFC 9110 §8.8.3)
        if tag.bytes().any(|b| b < 0x21 || b == 0x7f) {
            return Err(invalid());
        }
        if (weak_matches || !weak) && !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(rev) = tag.parse::<u64>() {
                revs.push(rev);
            }
        }
        let after = inner[end + 1..].trim_start_matches([' ', '\t']);
        rest = match after.strip_prefix(',') {
            Some(more) => more.trim_start_matches([' ', '\t', ',']),
            None if after.is_empty() => after,
            None => return Err(invalid()),
        };
    }
    Ok(Tags::Revs(revs))
}

pub(super) fn precondition_failed(key: &str, current_rev: Option<u64>) -> Error {
    Error::PreconditionFailed {
        key: key.to_string(),
        current_rev,
        index: None,
    }
}

fn object_not_found(key: &str, collection: &str) -> Error {
    Error::not_found(
        "not_found",
        format!("Object not found: no key {key:?} in collection {collection:?}"),
    )
}

/// The writer answered with an outcome of another op: a bug.
pub(super) fn unexpected(outcome: &Outcome) -> Error {
    Error::Internal(format!("the writer answered with {outcome:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_tag_lists_parse() {
        assert_eq!(parse_tags("*", false).unwrap(), Tags::Any);
        assert_eq!(parse_tags(r#""5""#, false).unwrap(), Tags::Revs(vec![5]));
        assert_eq!(
            parse_tags(r#""3", "5" ,"x",W/"7""#, true).unwrap(),
            Tags::Revs(vec![3, 5, 7])
        );
        assert_eq!(
            parse_tags(r#"W/"7", "8""#, false).unwrap(),
            Tags::Revs(vec![8]),
            "a weak tag never matches strongly"
        );
        assert_eq!(
            parse_tags(r#""a,b""#, true).unwrap(),
            Tags::Revs(vec![]),
            "a comma inside a tag is part of it"
        );
        for bad in [
            "",
            " ",
            "5",
            r#""5"#,
            r#"* , "5""#,
            r#""5" "6""#,
            r#"W/5"#,
            "\"a b\"",
        ] {
            let e = parse_tags(bad, true).unwrap_err();
            assert_eq!(e.code(), "invalid_precondition", "{bad:?}");
        }
    }
}
