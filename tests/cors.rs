//! End-to-end tests of CORS (`KV_CORS_ORIGINS`): preflights, the headers on simple requests, on
//! errors and on event streams, origins not listed, and no CORS at all without the variable.

mod common;

use std::io::Write;
use std::path::Path;

use common::{TestServer, read_response};

const APP: &str = "https://app.example.com";

fn server(dir: &Path, origins: Option<&str>) -> TestServer {
    match origins {
        Some(origins) => TestServer::start_with(dir, &[("KV_CORS_ORIGINS", origins)]),
        None => TestServer::start(dir),
    }
}

fn preflight(s: &TestServer, origin: &str, target: &str) -> common::Response {
    s.request_with(
        "OPTIONS",
        target,
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "PUT"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
        None,
    )
}

/// The names of the `Access-Control-*` headers of a response.
fn cors_headers(resp: &common::Response) -> Vec<String> {
    resp.headers
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .filter(|name| name.starts_with("access-control-"))
        .collect()
}

#[test]
fn a_preflight_from_a_listed_origin_gets_204_with_what_it_may_do() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), Some(&format!("{APP}, http://localhost:5173")));
    for target in [
        "/objects?collection=app",
        "/objects/a%2Fb",
        "/batch",
        "/changes",
        "/nope",
    ] {
        let resp = preflight(&s, APP, target);
        assert_eq!(resp.status, 204, "{target}");
        assert_eq!(resp.header("access-control-allow-origin"), Some(APP));
        assert_eq!(resp.header("vary"), Some("Origin"));
        let methods = resp.header("access-control-allow-methods").unwrap();
        for method in ["GET", "HEAD", "PUT", "POST", "DELETE"] {
            assert!(methods.contains(method), "{methods}");
        }
        let allowed = resp.header("access-control-allow-headers").unwrap();
        for header in [
            "Authorization",
            "Content-Type",
            "If-Match",
            "If-None-Match",
            "Last-Event-ID",
        ] {
            assert!(allowed.contains(header), "{allowed}");
        }
        assert_eq!(resp.header("access-control-max-age"), Some("3600"));
        assert!(
            resp.header("content-length").is_none(),
            "a 204 has no Content-Length"
        );
        assert!(resp.body.is_empty());
    }
    // The preflight needs no token and leaves the connection usable. (One request at a time:
    // read_response reads ahead, so a second answer already sent could be lost to it.)
    let mut stream = s.connect();
    stream
        .write_all(
            b"OPTIONS /objects HTTP/1.1\r\nHost: x\r\nOrigin: http://localhost:5173\r\n\
              Access-Control-Request-Method: DELETE\r\n\r\n",
        )
        .unwrap();
    let first = read_response(&mut stream);
    assert_eq!(first.status, 204);
    assert_eq!(
        first.header("access-control-allow-origin"),
        Some("http://localhost:5173")
    );
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream).status, 200);
}

#[test]
fn answers_to_a_listed_origin_carry_cors_headers_errors_and_streams_included() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"tokens":[]}"#).unwrap();
    let s = TestServer::start_with(
        dir.path(),
        &[
            ("KV_CORS_ORIGINS", APP),
            ("KV_TOKENS_FILE", tokens.to_str().unwrap()),
        ],
    );
    let check = |resp: &common::Response, what: &str| {
        assert_eq!(
            resp.header("access-control-allow-origin"),
            Some(APP),
            "{what}"
        );
        assert_eq!(resp.header("vary"), Some("Origin"), "{what}");
        assert_eq!(
            resp.header("access-control-expose-headers"),
            Some("ETag, Link, Kv-Expires-At, Retry-After"),
            "{what}"
        );
    };
    let health = s.request_with("GET", "/health", &[("Origin", APP)], None);
    assert_eq!(health.status, 200);
    check(&health, "GET /health");
    // A 401 carries them too, so that the page can read why it was refused.
    let refused = s.request_with("GET", "/objects/k", &[("Origin", APP)], None);
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["code"], "unauthorized");
    check(&refused, "401");
    let wrong = s.request_with("PATCH", "/health", &[("Origin", APP)], None);
    assert_eq!(wrong.status, 405);
    check(&wrong, "405");
    // An OPTIONS that is not a preflight is an ordinary request.
    let options = s.request_with("OPTIONS", "/health", &[("Origin", APP)], None);
    assert_eq!(options.status, 405);
    check(&options, "OPTIONS without Access-Control-Request-Method");
}

#[test]
fn an_event_stream_to_a_listed_origin_carries_cors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), Some(APP));
    let stream = s.events("/changes", &[("Origin", APP)]);
    assert!(stream.head[0].contains("200"), "{:?}", stream.head);
    let head = stream.head.join("\n").to_ascii_lowercase();
    assert!(
        head.contains(&format!("access-control-allow-origin: {APP}")),
        "{head}"
    );
    assert!(
        head.contains("access-control-expose-headers: etag"),
        "{head}"
    );
    assert!(head.contains("vary: origin"), "{head}");
}

#[test]
fn an_origin_not_listed_gets_no_cors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), Some(APP));
    for origin in [
        "https://evil.example",
        "https://app.example.com.evil",
        "http://app.example.com",
        "null",
    ] {
        let resp = preflight(&s, origin, "/objects");
        assert_eq!(resp.status, 204, "{origin}");
        assert!(
            cors_headers(&resp).is_empty(),
            "{origin}: {:?}",
            resp.headers
        );
        let resp = s.request_with("GET", "/health", &[("Origin", origin)], None);
        assert_eq!(resp.status, 200);
        assert!(
            cors_headers(&resp).is_empty(),
            "{origin}: {:?}",
            resp.headers
        );
    }
    let resp = s.get("/health");
    assert!(
        cors_headers(&resp).is_empty(),
        "no Origin: {:?}",
        resp.headers
    );
}

#[test]
fn a_star_allows_any_origin() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), Some("*"));
    let resp = preflight(&s, "https://anything.example", "/objects");
    assert_eq!(resp.status, 204);
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
    let resp = s.request_with(
        "GET",
        "/health",
        &[("Origin", "https://anything.example")],
        None,
    );
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
}

#[test]
fn without_the_variable_there_is_no_cors_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), None);
    let resp = preflight(&s, APP, "/objects");
    assert_eq!(resp.status, 405, "no preflight is answered");
    assert!(cors_headers(&resp).is_empty(), "{:?}", resp.headers);
    let resp = s.request_with("GET", "/health", &[("Origin", APP)], None);
    assert_eq!(resp.status, 200);
    assert!(cors_headers(&resp).is_empty(), "{:?}", resp.headers);
    assert!(resp.header("vary").is_none());
}

#[test]
fn a_malformed_origin_list_stops_kv_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().to_str().unwrap();
    let (status, _, stderr) = common::run_to_exit(
        &[
            ("PORT", "0"),
            ("DB_PATH", db),
            ("KV_CORS_ORIGINS", "https://app.example.com/"),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: KV_CORS_ORIGINS"), "{stderr}");
}
