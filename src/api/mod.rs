//! The HTTP API without the HTTP: a request comes in as a plain `Req`, is routed by method and path
//! and checked. A read is answered at once from a pooled read connection; a write is answered with
//! the `Op` for the writer and the function that turns its committed outcome into the response; an
//! event stream with the function that writes it. No sockets or tiny_http types here, so every
//! route is unit-tested by calling `handle`.
//!
//! This file is the routing table and the helpers every resource shares; each resource has its
//! own file (`objects`, `collections`, `changes`, `batch`); `openapi` serves the description of
//! them all, whose tests read this table.
//!
//! Access is checked here, in the routing table, so that one screen shows what every route needs:
//! the bearer token is looked up once per request, every route but `/health` needs a known one
//! (401), and each route names the right it needs on the collection it touches (403). Only what
//! a route cannot know before it reads its body or its data is checked further down: the ops of
//! a batch (batch.rs), and which collections `/collections` and `/changes` may show.
//!
//! Values travel as the JSON text the client sent: a PUT checks the syntax and stores the text, a GET
//! splices the stored text into the response without parsing it again.

mod admin;
mod batch;
mod changes;
mod collections;
mod list;
mod objects;
mod openapi;

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::AtomicBool;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::{Auth, AuthError, Principal, Right};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::space::Space;
use crate::store::Pool;
use crate::store::backup::TempFile;
use crate::watch::Watch;
use crate::writer::{Op, Outcome};

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest collection name, in bytes of UTF-8.
pub const MAX_COLLECTION_BYTES: usize = 256;
pub use crate::store::DEFAULT_COLLECTION;
/// The request headers kv reads, lower-case; the HTTP layer hands over only these.
pub const HEADERS: [&str; 5] = [
    "if-match",
    "if-none-match",
    "accept",
    "last-event-id",
    "authorization",
];

/// The request methods kv distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Put,
    Post,
    Delete,
    Other,
}

/// A request as the API sees it: the path and query still percent-encoded, the body already read
/// (or, for `POST /import`, spooled to a file), and those of its headers named in `HEADERS`
/// (name lower-case).
#[derive(Debug)]
pub struct Req<'a> {
    pub method: Method,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: Vec<(&'static str, &'a str)>,
    pub body: Vec<u8>,
    /// The body of an upload too large to hold in memory; a handler may take it.
    pub upload: RefCell<Option<TempFile>>,
}

impl Req<'_> {
    /// A header's value; several lines of the same header are one comma-separated list (RFC 9110 §5.3).
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self.headers.iter().filter(|(n, _)| *n == name);
        let (_, first) = values.next()?;
        let mut joined = Cow::Borrowed(*first);
        for (_, more) in values {
            let all = joined.to_mut();
            all.push_str(", ");
            all.push_str(more);
        }
        Some(joined)
    }
}

/// A successful answer: a status, a JSON body and any headers besides the usual ones.
#[derive(Debug, PartialEq, Eq)]
pub struct Resp {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Resp {
    fn ok(body: String) -> Resp {
        Resp {
            status: 200,
            body,
            headers: Vec::new(),
        }
    }

    /// 304: the client's copy at revision `rev` is current.
    fn not_modified(rev: u64) -> Resp {
        Resp {
            status: 304,
            body: String::new(),
            headers: Vec::new(),
        }
        .with_etag(rev)
    }

    fn with_etag(mut self, rev: u64) -> Resp {
        self.headers.push(("ETag", etag(rev)));
        self
    }
}

/// A strong entity tag for a revision: the number in quotes.
fn etag(rev: u64) -> String {
    format!("\"{rev}\"")
}

/// Turns a committed write's outcome into the response.
pub type Finish = Box<dyn FnOnce(Outcome) -> Result<Resp, Error> + Send>;

/// Writes a streamed body, as it is produced, until it ends or the client goes.
pub type WriteBody<'a> = Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + 'a>;

/// A 200 whose body is written as it is produced.
pub struct Stream<'a> {
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: WriteBody<'a>,
}

/// How a request is answered.
pub enum Answer<'a> {
    /// Now.
    Now(Resp),
    /// After the writer has committed `Op`; the response must not be sent before.
    AfterCommit(Op, Finish),
    /// As a stream, on the request's own thread.
    Stream(Stream<'a>),
}

impl From<Resp> for Answer<'_> {
    fn from(resp: Resp) -> Self {
        Answer::Now(resp)
    }
}

/// What a handler may use: the read connections, the waiters' registry, the tokens, the metrics,
/// and the limits.
pub struct Ctx<'a> {
    pub pool: &'a Pool,
    pub watch: &'a Watch,
    pub auth: &'a Auth,
    pub metrics: &'a Metrics,
    pub space: &'a Space,
    /// Set once kv is stopping.
    pub stopping: &'a AtomicBool,
    pub max_batch_ops: usize,
}

/// A request's answer, and who asked: the principal of a known token (for the access log), or
/// `None` for a request without one (or with open access, a principal without a name).
pub struct Handled<'a> {
    pub who: Option<Principal>,
    pub answer: Result<Answer<'a>, Error>,
}

/// Routes one request and runs it (reads) or prepares it for the writer (writes).
pub fn handle<'a>(req: &Req<'_>, ctx: &'a Ctx<'_>) -> Handled<'a> {
    let who = ctx
        .auth
        .authenticate(req.header("authorization").as_deref());
    let answer = route(req, ctx, &who);
    Handled {
        who: who.ok(),
        answer,
    }
}

/// The principal of a request with a known token, or 401.
fn known(who: &Result<Principal, AuthError>) -> Result<&Principal, Error> {
    who.as_ref().map_err(|_| Error::Unauthorized)
}

/// 401 without a known token; 403 unless it has `right` on the request's `?collection=`.
fn may(who: &Result<Principal, AuthError>, right: Right, req: &Req<'_>) -> Result<(), Error> {
    let who = known(who)?;
    Ok(who.require(right, Some(&collection(req.query)?))?)
}

/// 401 without a known token; 403 unless it has `right` on the collection named in the path.
fn may_on_path(
    who: &Result<Principal, AuthError>,
    right: Right,
    encoded_name: &str,
) -> Result<(), Error> {
    let who = known(who)?;
    Ok(who.require(right, Some(&Name::Collection.parse_path(encoded_name)?))?)
}

fn route<'a>(
    req: &Req<'_>,
    ctx: &'a Ctx<'_>,
    who: &Result<Principal, AuthError>,
) -> Result<Answer<'a>, Error> {
    let path = req
        .path
        .strip_prefix('/')
        .ok_or_else(|| Error::bad_request("invalid_path", "the path must start with '/'"))?;
    let (first, rest) = match path.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (path, None),
    };
    // Every route but the probes and the API's description needs a known token before anything
    // else is looked at.
    if !matches!((first, rest), ("health" | "ready" | "openapi.json", None)) {
        known(who)?;
    }
    match (first, rest) {
        ("health", None) => match req.method {
            Method::Get | Method::Head => admin::health(&ctx.pool.get()).map(Answer::from),
            _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
        },
        ("ready", None) => match req.method {
            Method::Get | Method::Head => Ok(admin::ready(ctx).into()),
            _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
        },
        ("objects", None | Some("")) => match req.method {
            Method::Get | Method::Head => {
                may(who, Right::Read, req)?;
                list::list(req, ctx)
            }
            Method::Put => {
                may(who, Right::Write, req)?;
                objects::put(req)
            }
            _ => Err(Error::MethodNotAllowed {
                allow: "GET, HEAD, PUT",
            }),
        },
        ("objects", Some(encoded_key)) => match req.method {
            Method::Get | Method::Head => {
                may(who, Right::Read, req)?;
                objects::get(req, ctx, encoded_key).map(Answer::from)
            }
            Method::Delete => {
                may(who, Right::Write, req)?;
                objects::delete(req, encoded_key)
            }
            _ => Err(Error::MethodNotAllowed {
                allow: "GET, HEAD, DELETE",
            }),
        },
        ("collections", None | Some("")) => match req.method {
            // Lists only the collections the token may read.
            Method::Get | Method::Head => collections::list(ctx, known(who)?).map(Answer::from),
            _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
        },
        ("collections", Some(encoded_name)) => match req.method {
            Method::Get | Method::Head => {
                may_on_path(who, Right::Read, encoded_name)?;
                collections::count(ctx, encoded_name).map(Answer::from)
            }
            Method::Delete => {
                may_on_path(who, Right::Write, encoded_name)?;
                collections::delete(encoded_name)
            }
            _ => Err(Error::MethodNotAllowed {
                allow: "GET, HEAD, DELETE",
            }),
        },
        // Each op needs its own right on its own collection, checked as the ops are read.
        ("batch", None) => match req.method {
            Method::Post => batch::batch(req, known(who)?, ctx.max_batch_ops),
            _ => Err(Error::MethodNotAllowed { allow: "POST" }),
        },
        ("admin", Some("backup")) => match req.method {
            Method::Get => {
                known(who)?.require(Right::Admin, None)?;
                admin::backup(ctx)
            }
            _ => Err(Error::MethodNotAllowed { allow: "GET" }),
        },
        // Read on the named collection, or, without one, only the collections the token may read.
        ("export", None) => match req.method {
            Method::Get | Method::Head => admin::export(req, ctx, known(who)?),
            _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
        },
        // Write on every collection the file names, checked as its lines are read.
        ("import", None) => match req.method {
            Method::Post => admin::import(req, known(who)?),
            _ => Err(Error::MethodNotAllowed { allow: "POST" }),
        },
        ("metrics", None) => match req.method {
            Method::Get | Method::Head => {
                known(who)?.require(Right::Metrics, None)?;
                admin::metrics(ctx).map(Answer::from)
            }
            _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
        },
        // Read on the named collection, or, without one, only the changes of readable collections.
        ("changes", None) => match req.method {
            Method::Get | Method::Head => changes::changes(req, ctx, known(who)?),
            _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
        },
        ("openapi.json", None) => match req.method {
            Method::Get | Method::Head => Ok(openapi::get().into()),
            _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
        },
        _ => Err(Error::not_found(
            "not_found",
            format!("no such path: {}", req.path),
        )),
    }
}

/// For optional body fields: keeps `"field": null` (present, JSON null) apart from a missing field.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The request body as UTF-8 text, or a 400 that says what is wrong with it.
fn json_text(body: &[u8]) -> Result<&str, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::bad_request(
            "invalid_json",
            r#"the request body is empty; expected a JSON object like {"key": "k", "value": 1}"#,
        ));
    }
    std::str::from_utf8(body)
        .map_err(|_| Error::bad_request("invalid_json", "the request body is not valid UTF-8"))
}

/// Parses a JSON object into `T`. serde would also take a JSON array for a struct, so anything but
/// an object is refused here, after a syntax check so that broken JSON is still called broken JSON.
fn object_from_str<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, Error> {
    if !text.trim_start().starts_with('{') {
        let shape = serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| body_error(&e))
            .err();
        return Err(shape.unwrap_or_else(|| {
            Error::bad_request("invalid_body", "the request body must be a JSON object")
        }));
    }
    serde_json::from_str(text).map_err(|e| body_error(&e))
}

/// Tells a syntax error apart from valid JSON of the wrong shape.
fn body_error(e: &serde_json::Error) -> Error {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => Error::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        ),
        Category::Data => Error::bad_request(
            "invalid_body",
            format!(r#"the request body must be a JSON object with "key" and "value": {e}"#),
        ),
    }
}

/// The two kinds of names a request carries, with their limits and error codes.
#[derive(Clone, Copy)]
enum Name {
    Key,
    Collection,
}

impl Name {
    fn what(self) -> &'static str {
        match self {
            Name::Key => "key",
            Name::Collection => "collection name",
        }
    }

    fn max_bytes(self) -> usize {
        match self {
            Name::Key => MAX_KEY_BYTES,
            Name::Collection => MAX_COLLECTION_BYTES,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Name::Key => "invalid_key",
            Name::Collection => "invalid_collection",
        }
    }

    fn error(self, message: String) -> Error {
        Error::bad_request(self.code(), message)
    }

    /// Keys and collection names: non-empty UTF-8 without control characters, up to a byte limit.
    fn check(self, name: String) -> Result<String, Error> {
        let (what, max) = (self.what(), self.max_bytes());
        if name.is_empty() {
            return Err(self.error(format!("the {what} must not be empty")));
        }
        if name.len() > max {
            let len = name.len();
            return Err(self.error(format!(
                "the {what} is {len} bytes long; the limit is {max}"
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(self.error(format!("the {what} must not contain control characters")));
        }
        Ok(name)
    }

    /// A name given as a percent-encoded path segment.
    fn parse_path(self, encoded: &str) -> Result<String, Error> {
        let name = percent_decode(encoded, false).ok_or_else(|| {
            let what = self.what();
            self.error(format!(
                "the {what} in the path is not validly percent-encoded UTF-8"
            ))
        })?;
        self.check(name)
    }

    /// A name given as a JSON value, which must be a string.
    fn parse_json(self, raw: &RawValue) -> Result<String, Error> {
        let name = serde_json::from_str(raw.get())
            .map_err(|_| self.error(format!("the {} must be a JSON string", self.what())))?;
        self.check(name)
    }
}

fn key_from_json(raw: Option<&RawValue>) -> Result<String, Error> {
    let raw = raw.ok_or_else(|| Error::bad_request("missing_key", "the body has no \"key\""))?;
    Name::Key.parse_json(raw)
}

/// The `collection` query parameter; absent or empty means `default`.
fn collection(query: &str) -> Result<String, Error> {
    match param(query, "collection", "invalid_collection")? {
        None => Ok(DEFAULT_COLLECTION.to_string()),
        Some(name) if name.is_empty() => Ok(DEFAULT_COLLECTION.to_string()),
        Some(name) => Name::Collection.check(name),
    }
}

/// One query parameter, decoded; a parameter given twice or badly encoded is a 400 with `code`.
fn param(query: &str, wanted: &str, code: &'static str) -> Result<Option<String>, Error> {
    let mut found = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(name, true).as_deref() != Some(wanted) {
            continue;
        }
        if found.is_some() {
            return Err(Error::bad_request(
                code,
                format!("the {wanted} parameter is given more than once"),
            ));
        }
        found = Some(percent_decode(value, true).ok_or_else(|| {
            Error::bad_request(
                code,
                format!("the {wanted} parameter is not validly percent-encoded UTF-8"),
            )
        })?);
    }
    Ok(found)
}

/// A whole-number query parameter in `min..=max`, `default` when absent.
fn number_param(
    query: &str,
    wanted: &str,
    code: &'static str,
    (min, max, default): (u64, u64, u64),
) -> Result<u64, Error> {
    match param(query, wanted, code)? {
        None => Ok(default),
        Some(text) => text
            .parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n) && !text.starts_with('+'))
            .ok_or_else(|| {
                Error::bad_request(
                    code,
                    format!("{wanted} must be a whole number from {min} to {max}, not {text:?}"),
                )
            }),
    }
}

/// A `true`/`false` query parameter, `default` when absent.
fn bool_param(query: &str, wanted: &str, code: &'static str, default: bool) -> Result<bool, Error> {
    match param(query, wanted, code)?.as_deref() {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(Error::bad_request(
            code,
            format!("{wanted} must be true or false, not {other:?}"),
        )),
    }
}

/// Decodes `%XX` escapes (and, in a query, `+` as a space). `None` for a bad escape or bad UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A string as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_json_string(&mut out, s);
    out
}

/// Appends `s` as a JSON string literal; most keys need no escaping and are copied as they are.
fn push_json_string(out: &mut String, s: &str) {
    if s.bytes()
        .any(|b| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f)
    {
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string()));
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::Sync;
    use crate::store::{Database, Store};
    use crate::writer::{Settings, Submitter, Writer};
    use serde_json::{Value, json};

    pub(super) struct Harness {
        _dir: tempfile::TempDir,
        pool: Pool,
        watch: std::sync::Arc<Watch>,
        auth: Auth,
        metrics: std::sync::Arc<Metrics>,
        space: std::sync::Arc<Space>,
        writer: Option<Writer>,
        submitter: Option<Submitter>,
    }

    impl Harness {
        pub(super) fn new() -> Harness {
            Harness::with_auth(Auth::open())
        }

        /// A harness whose requests need a token of `tokens` (a tokens file's text).
        pub(super) fn with_tokens(tokens: &str) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("tokens.json");
            std::fs::write(&file, tokens).unwrap();
            Harness::with_auth(Auth::from_file(&file).unwrap())
        }

        fn with_auth(auth: Auth) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::Sqlite {
                file: dir.path().join("kv.sqlite3"),
                sync: Sync::Normal,
            };
            let w = Store::open_and_migrate(&db).unwrap();
            let watch = std::sync::Arc::new(Watch::new(0, 4));
            let retention = std::time::Duration::from_secs(3600);
            let metrics = std::sync::Arc::new(Metrics::new().unwrap());
            let space = std::sync::Arc::new(Space::new(dir.path(), 0, None));
            let settings = Settings {
                retention,
                write_delay_ms: 0,
            };
            let writer =
                Writer::start(w, watch.clone(), metrics.clone(), space.clone(), settings).unwrap();
            let submitter = writer.submitter();
            Harness {
                pool: Pool::open(&db, 2, Default::default()).unwrap(),
                watch,
                auth,
                metrics,
                space,
                _dir: dir,
                writer: Some(writer),
                submitter: Some(submitter),
            }
        }

        pub(super) fn call(&self, method: Method, target: &str, body: &str) -> (u16, Value) {
            let (status, body, _) = self.call_with(method, target, &[], body);
            (status, body)
        }

        /// A request with headers; the answer's status, JSON body (null when empty) and headers.
        pub(super) fn call_with(
            &self,
            method: Method,
            target: &str,
            headers: &[(&'static str, &str)],
            body: &str,
        ) -> (u16, Value, Vec<(&'static str, String)>) {
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let req = Req {
                method,
                path,
                query,
                headers: headers.to_vec(),
                body: body.as_bytes().to_vec(),
                upload: RefCell::new(None),
            };
            let json = |body: &str| match body {
                "" => Value::Null,
                body => serde_json::from_str(body).unwrap(),
            };
            match self.run(&req) {
                Ok(resp) => (resp.status, json(&resp.body), resp.headers),
                Err(e) => {
                    let headers = e.headers().map(|(n, v)| (n, v.to_string()));
                    (e.status(), json(&e.body()), headers.into_iter().collect())
                }
            }
        }

        /// Handles a request as a connection thread and the writer together would.
        pub(super) fn run(&self, req: &Req<'_>) -> Result<Resp, Error> {
            let ctx = Ctx {
                pool: &self.pool,
                watch: &self.watch,
                auth: &self.auth,
                metrics: &self.metrics,
                space: &self.space,
                stopping: &AtomicBool::new(false),
                max_batch_ops: 5,
            };
            match handle(req, &ctx).answer? {
                Answer::Now(resp) => Ok(resp),
                Answer::AfterCommit(op, finish) => {
                    finish(self.submitter.as_ref().unwrap().write(op)?)
                }
                Answer::Stream(_) => panic!("streams are tested end to end"),
            }
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.submitter.take();
            self.writer.take().unwrap().stop();
        }
    }

    #[test]
    fn put_get_list_delete() {
        let h = Harness::new();
        let (status, body) = h.call(
            Method::Put,
            "/objects",
            r#"{"key":"user_123","value":{"name":"John Doe","age":30}}"#,
        );
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"message":"Object stored successfully","key":"user_123","rev":1})
        );
        let (status, body) = h.call(Method::Get, "/objects/user_123", "");
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"key":"user_123","value":{"name":"John Doe","age":30}})
        );
        let (_, body) = h.call(Method::Get, "/objects", "");
        assert_eq!(
            body,
            json!({"count":1,"objects":{"user_123":{"name":"John Doe","age":30}}})
        );
        let (status, body) = h.call(Method::Delete, "/objects/user_123", "");
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"message":"Object deleted successfully","key":"user_123","rev":2})
        );
        let (status, body) = h.call(Method::Delete, "/objects/user_123", "");
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
        let (status, _) = h.call(Method::Get, "/objects/user_123", "");
        assert_eq!(status, 404);
    }

    #[test]
    fn collections_are_isolated_and_default_when_empty() {
        let h = Harness::new();
        h.call(
            Method::Put,
            "/objects?collection=a",
            r#"{"key":"b:c","value":1}"#,
        );
        h.call(
            Method::Put,
            "/objects?collection=a:b",
            r#"{"key":"c","value":2}"#,
        );
        h.call(
            Method::Put,
            "/objects?collection=",
            r#"{"key":"d","value":3}"#,
        );
        assert_eq!(
            h.call(Method::Get, "/objects/b:c?collection=a", "").1["value"],
            1
        );
        assert_eq!(
            h.call(Method::Get, "/objects/c?collection=a%3Ab", "").1["value"],
            2
        );
        assert_eq!(h.call(Method::Get, "/objects/c?collection=a", "").0, 404);
        assert_eq!(h.call(Method::Get, "/objects/d", "").1["value"], 3);
        assert_eq!(
            h.call(Method::Get, "/objects/d?collection=default", "").1["value"],
            3
        );
        assert_eq!(
            h.call(Method::Get, "/objects?collection=nope", "").1,
            json!({"count":0,"objects":{}})
        );
    }

    #[test]
    fn path_keys_are_percent_decoded_but_plus_stays() {
        let h = Harness::new();
        for key in ["a/b", "a b", "a+b", "ü", ".", ".."] {
            let body = json!({"key": key, "value": key}).to_string();
            assert_eq!(h.call(Method::Put, "/objects", &body).0, 200);
        }
        assert_eq!(h.call(Method::Get, "/objects/a%2Fb", "").1["value"], "a/b");
        assert_eq!(h.call(Method::Get, "/objects/a%20b", "").1["value"], "a b");
        assert_eq!(h.call(Method::Get, "/objects/a+b", "").1["value"], "a+b");
        assert_eq!(h.call(Method::Get, "/objects/%C3%BC", "").1["value"], "ü");
        assert_eq!(h.call(Method::Get, "/objects/%2E%2E", "").1["value"], "..");
        assert_eq!(h.call(Method::Get, "/objects/%zz", "").0, 400);
        assert_eq!(h.call(Method::Get, "/objects/%FF", "").0, 400);
    }

    #[test]
    fn every_bad_put_body_is_a_400_with_its_code() {
        let h = Harness::new();
        for (body, code) in [
            ("", "invalid_json"),
            ("  \n", "invalid_json"),
            ("{", "invalid_json"),
            ("{\"key\":\"a\",\"value\":1} x", "invalid_json"),
            ("[1,2]", "invalid_body"),
            ("\"key\"", "invalid_body"),
            (r#"{"value":1}"#, "missing_key"),
            (r#"{"key":"a"}"#, "missing_value"),
            (r#"{"key":1,"value":1}"#, "invalid_key"),
            (r#"{"key":null,"value":1}"#, "invalid_key"),
            (r#"{"key":"","value":1}"#, "invalid_key"),
            (r#"{"key":"a\nb","value":1}"#, "invalid_key"),
            (r#"{"key":"a\u0000","value":1}"#, "invalid_key"),
            (r#"{"key":"a","key":"b","value":1}"#, "invalid_body"),
        ] {
            let (status, resp) = h.call(Method::Put, "/objects", body);
            assert_eq!(
                (status, resp["code"].as_str()),
                (400, Some(code)),
                "{body:?}: {resp}"
            );
            assert!(resp["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let (status, resp) = h.call(
            Method::Put,
            "/objects",
            &json!({"key": long, "value": 1}).to_string(),
        );
        assert_eq!((status, resp["code"].as_str()), (400, Some("invalid_key")));
        let (status, _) = h.call(
            Method::Put,
            "/objects",
            &json!({"key": "k".repeat(MAX_KEY_BYTES), "value": 1}).to_string(),
        );
        assert_eq!(status, 200);
        let long = "c".repeat(MAX_COLLECTION_BYTES + 1);
        let (status, resp) = h.call(
            Method::Put,
            &format!("/objects?collection={long}"),
            r#"{"key":"a","value":1}"#,
        );
        assert_eq!(
            (status, resp["code"].as_str()),
            (400, Some("invalid_collection"))
        );
        let (status, _) = h.call(
            Method::Put,
            "/objects?collection=a&collection=b",
            r#"{"key":"a","value":1}"#,
        );
        assert_eq!(status, 400);
    }

    #[test]
    fn null_and_extra_fields_are_fine() {
        let h = Harness::new();
        assert_eq!(
            h.call(
                Method::Put,
                "/objects",
                r#"{"key":"n","value":null,"ttl":5}"#
            )
            .0,
            200
        );
        let (status, body) = h.call(Method::Get, "/objects/n", "");
        assert_eq!(status, 200);
        assert_eq!(body, json!({"key":"n","value":null}));
    }

    #[test]
    fn values_round_trip_as_sent() {
        let h = Harness::new();
        let value = r#"{"pi":3.14159,"big":9007199254740993,"s":"ü\"\\","deep":[[[[{"a":[]}]]]],"t":true,"f":false,"n":null}"#;
        h.call(
            Method::Put,
            "/objects",
            &format!(r#"{{"key":"v","value":{value}}}"#),
        );
        let req = Req {
            method: Method::Get,
            path: "/objects/v",
            query: "",
            headers: vec![],
            body: vec![],
            upload: RefCell::new(None),
        };
        let resp = h.run(&req).unwrap();
        assert_eq!(resp.body, format!(r#"{{"key":"v","value":{value}}}"#));
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let h = Harness::new();
        assert_eq!(h.call(Method::Get, "/nope", "").0, 404);
        assert_eq!(h.call(Method::Get, "/health/x", "").0, 404);
        assert_eq!(h.call(Method::Get, "/", "").0, 404);
        assert_eq!(h.call(Method::Post, "/health", "").0, 405);
        assert_eq!(h.call(Method::Delete, "/objects", "").0, 405);
        assert_eq!(h.call(Method::Post, "/objects/a", "").0, 405);
        assert_eq!(
            h.call(Method::Other, "/objects/a", "").1["code"],
            "method_not_allowed"
        );
        assert_eq!(
            h.call(Method::Get, "/health", "").1,
            json!({"status":"healthy"})
        );
    }

    #[test]
    fn a_batch_runs_in_order_and_reports_each_op() {
        let h = Harness::new();
        h.call(
            Method::Put,
            "/objects?collection=users",
            r#"{"key":"b","value":"old"}"#,
        );
        let body = r#"{"collection":"users","ops":[
            {"op":"put","key":"a","value":{"n":1}},
            {"op":"delete","key":"b"},
            {"op":"get","key":"a"},
            {"op":"put","key":"x","value":true,"collection":"flags"},
            {"op":"delete","key":"nope"}]}"#;
        let (status, resp) = h.call(Method::Post, "/batch", body);
        assert_eq!(status, 200, "{resp}");
        assert_eq!(
            resp,
            json!({"ok": true, "results": [
                {"op":"put","key":"a","status":200,"rev":2},
                {"op":"delete","key":"b","found":true,"rev":3},
                {"op":"get","key":"a","found":true,"rev":2,"value":{"n":1}},
                {"op":"put","key":"x","status":200,"rev":4},
                {"op":"delete","key":"nope","found":false}]})
        );
        assert_eq!(
            h.call(Method::Get, "/objects/x?collection=flags", "").1["value"],
            true
        );
        assert_eq!(
            h.call(Method::Get, "/objects/b?collection=users", "").0,
            404
        );
        let (_, resp) = h.call(
            Method::Post,
            "/batch",
            r#"{"ops":[{"op":"get","key":"a"}]}"#,
        );
        assert_eq!(
            resp["results"][0],
            json!({"op":"get","key":"a","found":false}),
            "default collection"
        );
    }

    #[test]
    fn a_bad_op_rejects_the_whole_batch_with_its_index() {
        let h = Harness::new();
        for (ops, index, code) in [
            (
                r#"[{"op":"put","key":"a","value":1},{"op":"put","key":"b","value":2},{"op":"frob","key":"c"}]"#,
                2,
                "invalid_op",
            ),
            (
                r#"[{"op":"put","key":"a","value":1},{"op":"put","key":"b"}]"#,
                1,
                "missing_value",
            ),
            (
                r#"[{"op":"put","key":"a","value":1},{"op":"get"}]"#,
                1,
                "missing_key",
            ),
            (r#"[{"op":"delete","key":""}]"#, 0, "invalid_key"),
            (
                r#"[{"op":"get","key":"a","collection":7}]"#,
                0,
                "invalid_collection",
            ),
            (r#"[{"key":"a"}]"#, 0, "invalid_op"),
            (r#"[1]"#, 0, "invalid_op"),
        ] {
            let (status, resp) = h.call(Method::Post, "/batch", &format!(r#"{{"ops":{ops}}}"#));
            assert_eq!(
                (status, &resp["code"], &resp["index"]),
                (400, &json!(code), &json!(index)),
                "{ops}: {resp}"
            );
        }
        assert_eq!(
            h.call(Method::Get, "/objects/a", "").0,
            404,
            "nothing applied"
        );
        for (body, status, code) in [
            (r#"{"ops":[]}"#, 400, "invalid_batch"),
            (r#"{"collection":"c"}"#, 400, "invalid_batch"),
            (r#"{"ops":{"op":"get"}}"#, 400, "invalid_batch"),
            (
                r#"{"ops":[{"op":"get","key":"a"}],"collection":""}"#,
                200,
                "",
            ),
            (
                r#"{"ops":[{"op":"get","key":"a"}],"collection":5}"#,
                400,
                "invalid_collection",
            ),
            ("[]", 400, "invalid_body"),
            ("{", 400, "invalid_json"),
        ] {
            let (got, resp) = h.call(Method::Post, "/batch", body);
            assert_eq!(got, status, "{body}: {resp}");
            if status != 200 {
                assert_eq!(resp["code"], code, "{body}");
            }
        }
        let six = [r#"{"op":"get","key":"a"}"#; 6].join(",");
        let (status, resp) = h.call(Method::Post, "/batch", &format!(r#"{{"ops":[{six}]}}"#));
        assert_eq!((status, &resp["code"]), (413, &json!("too_many_ops")));
        assert_eq!(h.call(Method::Get, "/batch", "").0, 405);
    }

    #[test]
    fn collections_are_listed_counted_and_deleted() {
        let h = Harness::new();
        assert_eq!(
            h.call(Method::Get, "/collections", "").1,
            json!({"count":0,"collections":[]})
        );
        for (c, k) in [("users", "a"), ("users", "b"), ("a:b", "c"), ("users", "a")] {
            h.call(
                Method::Put,
                &format!("/objects?collection={c}"),
                &json!({"key": k, "value": 1}).to_string(),
            );
        }
        assert_eq!(
            h.call(Method::Get, "/collections", "").1,
            json!({"count":2,"collections":[{"name":"a:b","count":1,"rev":3},{"name":"users","count":2,"rev":4}]})
        );
        assert_eq!(
            h.call(Method::Get, "/collections/users", "").1,
            json!({"name":"users","count":2,"rev":4})
        );
        assert_eq!(h.call(Method::Get, "/collections/a%3Ab", "").1["count"], 1);
        assert_eq!(h.call(Method::Get, "/collections/none", "").0, 404);
        assert_eq!(
            h.call(Method::Delete, "/collections/users", "").1,
            json!({"message":"Collection deleted successfully","name":"users","deleted":2,"rev":5})
        );
        assert_eq!(h.call(Method::Delete, "/collections/users", "").0, 404);
        assert_eq!(
            h.call(Method::Get, "/objects/c?collection=a:b", "").1["value"],
            1
        );
        assert_eq!(h.call(Method::Get, "/collections/", "").1["count"], 1);
        assert_eq!(h.call(Method::Put, "/collections/x", "").0, 405);
        assert_eq!(
            h.call(
                Method::Get,
                &format!("/collections/{}", "c".repeat(257)),
                ""
            )
            .0,
            400
        );
    }

    #[test]
    fn json_strings_are_escaped_only_when_needed() {
        for s in [
            "plain",
            "",
            "ü 日本",
            "quote \" in",
            "back\\slash",
            "ctl\u{1}",
            "del\u{7f}",
        ] {
            let mut out = String::from("x");
            push_json_string(&mut out, s);
            let parsed: String = serde_json::from_str(&out[1..]).unwrap();
            assert_eq!(parsed, s);
            assert_eq!(json_string(s), out[1..]);
        }
    }

    /// A tokens file: `web` writes `app-*` and reads `config`, `ops` is admin, `nobody` has no right.
    fn tokens() -> String {
        use crate::auth::sha256_hex;
        json!({"tokens": [
            {"name": "web", "sha256": sha256_hex("web-secret"),
             "collections": {"app-*": "write", "config": "read"}},
            {"name": "ops", "sha256": sha256_hex("ops-secret"), "admin": true},
            {"name": "nobody", "sha256": sha256_hex("nobody-secret")},
        ]})
        .to_string()
    }

    const WEB: (&str, &str) = ("authorization", "Bearer web-secret");
    const OPS: (&str, &str) = ("authorization", "Bearer ops-secret");
    const NOBODY: (&str, &str) = ("authorization", "Bearer nobody-secret");

    fn status_as(h: &Harness, who: (&'static str, &str), method: Method, target: &str) -> u16 {
        let body = match method {
            Method::Put => r#"{"key":"k","value":1}"#,
            Method::Post => r#"{"ops":[{"op":"get","key":"k"}]}"#,
            _ => "",
        };
        h.call_with(method, target, &[who], body).0
    }

    #[test]
    fn every_route_but_health_needs_a_known_token() {
        let h = Harness::with_tokens(&tokens());
        let routes = [
            (Method::Get, "/objects/k?collection=app-1"),
            (Method::Head, "/objects/k?collection=app-1"),
            (Method::Put, "/objects?collection=app-1"),
            (Method::Delete, "/objects/k?collection=app-1"),
            (Method::Get, "/objects?collection=app-1"),
            (Method::Get, "/collections"),
            (Method::Get, "/collections/app-1"),
            (Method::Delete, "/collections/app-1"),
            (Method::Post, "/batch"),
            (Method::Get, "/changes"),
            (Method::Get, "/nope"),
            (Method::Post, "/objects/k"),
        ];
        for (method, target) in routes {
            for header in [None, Some("Bearer wrong"), Some("web-secret"), Some("")] {
                let headers: Vec<_> = header.map(|v| ("authorization", v)).into_iter().collect();
                let (status, body, resp_headers) = h.call_with(method, target, &headers, "");
                assert_eq!(
                    (status, body["code"].as_str()),
                    (401, Some("unauthorized")),
                    "{method:?} {target} {header:?}"
                );
                assert!(
                    resp_headers
                        .iter()
                        .any(|(n, v)| *n == "WWW-Authenticate" && v == r#"Bearer realm="kv""#)
                );
            }
        }
        assert_eq!(h.call(Method::Get, "/health", "").0, 200);
        assert_eq!(h.call(Method::Post, "/health", "").0, 405);
    }

    #[test]
    fn each_route_needs_its_right_on_its_collection() {
        let h = Harness::with_tokens(&tokens());
        // (method, target, web may, nobody may); ops (admin) may do everything.
        let matrix = [
            (Method::Put, "/objects?collection=app-1", true),
            (Method::Get, "/objects/k?collection=app-1", true),
            (Method::Head, "/objects/k?collection=app-1", true),
            (Method::Get, "/objects?collection=app-1", true),
            (Method::Delete, "/objects/k?collection=app-1", true),
            (Method::Get, "/objects/k?collection=config", true),
            (Method::Get, "/objects?collection=config", true),
            (Method::Put, "/objects?collection=config", false),
            (Method::Delete, "/objects/k?collection=config", false),
            (Method::Get, "/objects/k", false),
            (Method::Put, "/objects", false),
            (Method::Get, "/objects/k?collection=app", false),
            (Method::Get, "/collections/config", true),
            (Method::Get, "/collections/app-2", true),
            (Method::Get, "/collections/secrets", false),
            (Method::Delete, "/collections/config", false),
            (Method::Delete, "/collections/secrets", false),
            (Method::Get, "/changes?collection=config", true),
            (Method::Get, "/changes?collection=secrets", false),
        ];
        for (method, target, web_may) in matrix {
            for (who, may) in [(WEB, web_may), (NOBODY, false), (OPS, true)] {
                let status = status_as(&h, who, method, target);
                if may {
                    assert_ne!(status, 403, "{} {method:?} {target}", who.1);
                    assert_ne!(status, 401, "{} {method:?} {target}", who.1);
                } else {
                    assert_eq!(status, 403, "{} {method:?} {target}", who.1);
                }
            }
        }
        let (status, body, _) =
            h.call_with(Method::Put, "/objects?collection=config", &[WEB], r#"{}"#);
        assert_eq!(
            (status, body),
            (
                403,
                json!({"error": "this token may not write collection \"config\"", "code": "forbidden"})
            )
        );
    }

    #[test]
    fn a_batch_needs_every_ops_right_and_names_the_first_it_lacks() {
        let h = Harness::with_tokens(&tokens());
        let body = r#"{"collection":"app-1","ops":[
            {"op":"put","key":"a","value":1},
            {"op":"get","key":"c","collection":"config"},
            {"op":"put","key":"c","value":2,"collection":"config"},
            {"op":"delete","key":"x","collection":"secrets"}]}"#;
        let (status, resp, _) = h.call_with(Method::Post, "/batch", &[WEB], body);
        assert_eq!(
            (status, &resp["code"], &resp["index"]),
            (403, &json!("forbidden"), &json!(2)),
            "{resp}"
        );
        assert!(resp["error"].as_str().unwrap().starts_with("op 2: "));
        let (_, list, _) = h.call_with(Method::Get, "/objects?collection=app-1", &[WEB], "");
        assert_eq!(list["count"], 0, "nothing applied");
        let (status, _, _) = h.call_with(Method::Post, "/batch", &[OPS], body);
        assert_eq!(status, 200);
        let check = r#"{"ops":[{"op":"check","key":"k","if_rev":0,"collection":"secrets"}]}"#;
        let (status, resp, _) = h.call_with(Method::Post, "/batch", &[WEB], check);
        assert_eq!((status, &resp["index"]), (403, &json!(0)));
    }

    #[test]
    fn collections_lists_only_what_the_token_may_read() {
        let h = Harness::with_tokens(&tokens());
        for c in ["app-1", "app-2", "config", "secrets", "default"] {
            let (status, _, _) = h.call_with(
                Method::Put,
                &format!("/objects?collection={c}"),
                &[OPS],
                r#"{"key":"k","value":1}"#,
            );
            assert_eq!(status, 200);
        }
        let names = |who| {
            let (status, body, _) = h.call_with(Method::Get, "/collections", &[who], "");
            assert_eq!(status, 200);
            let names: Vec<String> = body["collections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(body["count"], names.len());
            names
        };
        assert_eq!(names(WEB), ["app-1", "app-2", "config"]);
        assert_eq!(names(OPS).len(), 5);
        assert!(names(NOBODY).is_empty());
    }

    #[test]
    fn the_feed_of_every_collection_skips_what_the_token_may_not_read() {
        let h = Harness::with_tokens(&tokens());
        // Revisions 1..=7; web may read 2, 4 and 7.
        let collections = [
            "secrets", "app-1", "secrets", "config", "default", "secrets", "app-2",
        ];
        for (i, c) in collections.into_iter().enumerate() {
            // A new key each time, so that every revision stays in the feed.
            let body = json!({"key": format!("k{i}"), "value": c}).to_string();
            let target = format!("/objects?collection={c}");
            assert_eq!(h.call_with(Method::Put, &target, &[OPS], &body).0, 200);
        }
        let feed = |who, query: &str| {
            let (status, body, _) =
                h.call_with(Method::Get, &format!("/changes?{query}"), &[who], "");
            assert_eq!(status, 200, "{body}");
            let revs: Vec<u64> = body["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["rev"].as_u64().unwrap())
                .collect();
            (
                revs,
                body["last_rev"].as_u64().unwrap(),
                body["more"].clone(),
            )
        };
        assert_eq!(feed(OPS, "since=0").0.len(), 7);
        assert_eq!(feed(WEB, "since=0"), (vec![2, 4, 7], 7, json!(false)));
        assert_eq!(feed(WEB, "since=0&limit=2"), (vec![2, 4], 4, json!(true)));
        assert_eq!(feed(WEB, "since=4&limit=2"), (vec![7], 7, json!(false)));
        // Only unreadable entries after `since`: none shown, but `last_rev` moves past them.
        assert_eq!(feed(WEB, "since=4&limit=1"), (vec![7], 7, json!(false)));
        assert_eq!(feed(WEB, "since=7"), (vec![], 7, json!(false)));
        assert_eq!(
            feed(WEB, "since=0&collection=config"),
            (vec![4], 4, json!(false))
        );
        let (status, body, _) = h.call_with(Method::Get, "/changes", &[NOBODY], "");
        assert_eq!((status, &body["code"]), (403, &json!("forbidden")));
    }
}
