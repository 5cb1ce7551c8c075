//! `POST /batch`: checks every op of a batch before anything runs (so a bad op is a 400 naming its
//! index, an op the token has no right for a 403 naming it, and nothing is applied), turns them
//! into one `Op::Batch` that the writer runs all-or-nothing inside one transaction, and builds the
//! response from the outcomes.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Answer, DEFAULT_COLLECTION, Name, Req, Resp, collection, json_string, json_text, key_from_json,
    object_from_str, present,
};
use crate::auth::{Principal, Right};
use crate::error::Error;
use crate::writer::{Cond, Op, Outcome, Tags};

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    collection: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ops: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawOp<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    op: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    key: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    collection: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    if_rev: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ttl: Option<&'a RawValue>,
}

#[derive(Clone, Copy)]
enum Kind {
    Put,
    Delete,
    Get,
    Check,
}

/// Checks a batch, and `who`'s right for each op, and prepares it for the writer.
pub(super) fn batch(
    req: &Req<'_>,
    who: &Principal,
    max_ops: usize,
) -> Result<Answer<'static>, Error> {
    // The parameter is checked even when the body's `collection` takes its place: a bad one is the
    // client's mistake either way, and a batch must not run as if it had not been sent.
    let query_default = collection(req.query)?;
    let body: BatchBody<'_> = object_from_str(json_text(&req.body)?)?;
    let default = match body.collection {
        Some(raw) => collection_from_json(raw)?,
        None => query_default,
    };
    let raw_ops = body
        .ops
        .ok_or_else(|| Error::bad_request("invalid_batch", "the body has no \"ops\" list"))?;
    let raw_ops: Vec<&RawValue> = serde_json::from_str(raw_ops.get())
        .map_err(|_| Error::bad_request("invalid_batch", "\"ops\" must be a list of ops"))?;
    if raw_ops.is_empty() {
        return Err(Error::bad_request("invalid_batch", "\"ops\" is empty"));
    }
    if raw_ops.len() > max_ops {
        return Err(Error::TooLarge {
            code: "too_many_ops",
            message: format!(
                "the batch has {} ops; the limit is {max_ops} (KV_MAX_BATCH_OPS)",
                raw_ops.len()
            ),
        });
    }
    let mut ops = Vec::with_capacity(raw_ops.len());
    let mut labels = Vec::with_capacity(raw_ops.len());
    for (index, raw) in raw_ops.iter().enumerate() {
        let (kind, op) = parse_op(raw, &default).map_err(|e| e.at_index(index))?;
        let (key, collection) = match &op {
            Op::Put {
                key, collection, ..
            }
            | Op::Delete {
                key, collection, ..
            }
            | Op::Get { key, collection }
            | Op::Check {
                key, collection, ..
            } => (json_string(key), collection.as_str()),
            _ => (String::new(), ""),
        };
        let right = match kind {
            Kind::Put | Kind::Delete => Right::Write,
            Kind::Get | Kind::Check => Right::Read,
        };
        who.require(right, Some(collection))
            .map_err(|e| Error::from(e).at_index(index))?;
        labels.push((kind, key));
        ops.push(op);
    }
    Ok(Answer::AfterCommit(
        Op::Batch(ops),
        Box::new(move |outcome| respond(&labels, outcome)),
    ))
}

fn parse_op(raw: &RawValue, default: &str) -> Result<(Kind, Op), Error> {
    let raw: RawOp<'_> = object_from_str(raw.get()).map_err(|e| match e {
        Error::BadRequest { message, .. } => Error::bad_request("invalid_op", message),
        other => other,
    })?;
    let kind = match raw.op.map(|op| serde_json::from_str::<String>(op.get())) {
        None => return Err(Error::bad_request("invalid_op", "the op has no \"op\"")),
        Some(Ok(op)) if op == "put" => Kind::Put,
        Some(Ok(op)) if op == "delete" => Kind::Delete,
        Some(Ok(op)) if op == "get" => Kind::Get,
        Some(Ok(op)) if op == "check" => Kind::Check,
        Some(_) => {
            return Err(Error::bad_request(
                "invalid_op",
                "\"op\" must be \"put\", \"delete\", \"get\" or \"check\"",
            ));
        }
    };
    let cond = match (kind, raw.if_rev) {
        (Kind::Get, Some(_)) => {
            return Err(Error::bad_request(
                "invalid_op",
                "a get op takes no \"if_rev\"",
            ));
        }
        (Kind::Check, None) => {
            return Err(Error::bad_request(
                "invalid_op",
                "a check op needs \"if_rev\"",
            ));
        }
        (_, None) => Cond::default(),
        (_, Some(raw)) => if_rev(raw)?,
    };
    let key = key_from_json(raw.key)?;
    let collection = match raw.collection {
        Some(raw) => collection_from_json(raw)?,
        None => default.to_string(),
    };
    let op = match kind {
        Kind::Put => {
            let value = raw.value.ok_or_else(|| {
                Error::bad_request(
                    "missing_value",
                    "a put op has no \"value\" (use \"value\": null to store null)",
                )
            })?;
            Op::Put {
                collection,
                key,
                value: value.get().to_string(),
                cond,
                ttl_secs: super::objects::ttl(raw.ttl)?,
            }
        }
        Kind::Delete => Op::Delete {
            collection,
            key,
            cond,
        },
        Kind::Get => Op::Get { collection, key },
        Kind::Check => Op::Check {
            collection,
            key,
            cond,
        },
    };
    Ok((kind, op))
}

/// `"if_rev": N`: the object must be at revision N, or (N = 0) must not exist.
fn if_rev(raw: &RawValue) -> Result<Cond, Error> {
    let rev: u64 = serde_json::from_str(raw.get()).map_err(|_| {
        Error::bad_request(
            "invalid_op",
            format!("\"if_rev\" must be a whole number >= 0, not {}", raw.get()),
        )
    })?;
    Ok(match rev {
        0 => Cond {
            if_match: None,
            if_none_match: Some(Tags::Any),
        },
        rev => Cond {
            if_match: Some(Tags::Revs(vec![rev])),
            if_none_match: None,
        },
    })
}

/// A collection given in the body: a string, where empty means `default`.
fn collection_from_json(raw: &RawValue) -> Result<String, Error> {
    if raw.get() == "\"\"" {
        return Ok(DEFAULT_COLLECTION.to_string());
    }
    Name::Collection.parse_json(raw)
}

/// `{"ok":true,"results":[...]}`, one result per op, values spliced in as stored.
fn respond(labels: &[(Kind, String)], outcome: Outcome) -> Result<Resp, Error> {
    let Outcome::Batch(outcomes) = outcome else {
        return Err(Error::Internal(
            "the writer answered a batch with a single outcome".into(),
        ));
    };
    let mut body = String::from(r#"{"ok":true,"results":["#);
    for (i, ((kind, key), outcome)) in labels.iter().zip(outcomes).enumerate() {
        if i > 0 {
            body.push(',');
        }
        match (kind, outcome) {
            (Kind::Put, Outcome::Stored(rev)) => {
                body.push_str(&format!(
                    r#"{{"op":"put","key":{key},"status":200,"rev":{rev}}}"#
                ));
            }
            (Kind::Delete, Outcome::Deleted(Some(rev))) => {
                body.push_str(&format!(
                    r#"{{"op":"delete","key":{key},"found":true,"rev":{rev}}}"#
                ));
            }
            (Kind::Delete, Outcome::Deleted(None)) => {
                body.push_str(&format!(r#"{{"op":"delete","key":{key},"found":false}}"#));
            }
            (Kind::Get, Outcome::Value(Some((value, rev)))) => {
                body.push_str(&format!(
                    r#"{{"op":"get","key":{key},"found":true,"rev":{rev},"value":"#
                ));
                body.push_str(&value);
                body.push('}');
            }
            (Kind::Get, Outcome::Value(None)) => {
                body.push_str(&format!(r#"{{"op":"get","key":{key},"found":false}}"#));
            }
            (Kind::Check, Outcome::Checked) => {
                body.push_str(&format!(r#"{{"op":"check","key":{key},"ok":true}}"#));
            }
            (_, other) => {
                return Err(Error::Internal(format!(
                    "the writer answered op {i} with {other:?}"
                )));
            }
        }
    }
    body.push_str("]}");
    Ok(Resp::ok(body))
}

#[cfg(test)]
mod tests {
    use crate::api::Method;
    use crate::api::tests::Harness;

    #[test]
    fn a_bad_collection_parameter_is_refused_even_when_the_body_names_one() {
        let h = Harness::new();
        let body = r#"{"collection":"c","ops":[{"op":"put","key":"k","value":1}]}"#;
        let (status, resp) = h.call(Method::Post, "/batch?collection=%C2%84", body);
        assert_eq!((status, &resp["code"]), (400, &"invalid_collection".into()));
        let (status, _) = h.call(Method::Get, "/objects/k?collection=c", "");
        assert_eq!(status, 404, "nothing applied");
        let (status, _) = h.call(Method::Post, "/batch?collection=q", body);
        assert_eq!(
            status, 200,
            "a good parameter still gives way to the body's"
        );
        assert_eq!(h.call(Method::Get, "/objects/k?collection=c", "").0, 200);
    }
}
