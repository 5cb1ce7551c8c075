//! `GET /collections`, `GET /collections/:name` and `DELETE /collections/:name`: counts come from
//! the counts table (no scan), each with the collection's latest revision. The list shows only
//! the collections the token may read.

use super::{Answer, Ctx, Name, Resp, json_string, objects::unexpected, push_json_string};
use crate::auth::Principal;
use crate::error::Error;
use crate::writer::{Op, Outcome};

pub(super) fn list(ctx: &Ctx<'_>, who: &Principal) -> Result<Resp, Error> {
    let mut list = String::from("[");
    let mut shown = 0;
    ctx.pool.get().collections(|name, count, rev| {
        if !who.can_read(name) {
            return;
        }
        shown += 1;
        if list.len() > 1 {
            list.push(',');
        }
        list.push_str(r#"{"name":"#);
        push_json_string(&mut list, name);
        list.push_str(&format!(r#","count":{count},"rev":{rev}}}"#));
    })?;
    list.push(']');
    Ok(Resp::ok(format!(
        r#"{{"count":{shown},"collections":{list}}}"#
    )))
}

pub(super) fn count(ctx: &Ctx<'_>, encoded_name: &str) -> Result<Resp, Error> {
    let name = Name::Collection.parse_path(encoded_name)?;
    let (count, rev) = ctx
        .pool
        .get()
        .collection_count(&name)?
        .ok_or_else(|| not_found(&name))?;
    Ok(Resp::ok(format!(
        r#"{{"name":{},"count":{count},"rev":{rev}}}"#,
        json_string(&name)
    )))
}

pub(super) fn delete(encoded_name: &str) -> Result<Answer<'static>, Error> {
    let name = Name::Collection.parse_path(encoded_name)?;
    let absent = not_found(&name);
    let quoted = json_string(&name);
    Ok(Answer::AfterCommit(
        Op::DeleteCollection { name },
        Box::new(move |outcome| match outcome {
            Outcome::DeletedCollection { count: 0, .. } => Err(absent),
            Outcome::DeletedCollection { count, rev } => Ok(Resp::ok(format!(
                r#"{{"message":"Collection deleted successfully","name":{quoted},"deleted":{count},"rev":{rev}}}"#
            ))),
            other => Err(unexpected(&other)),
        }),
    ))
}

fn not_found(name: &str) -> Error {
    Error::not_found(
        "not_found",
        format!("Collection not found: {name:?} holds no object"),
    )
}
