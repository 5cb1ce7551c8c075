//! End-to-end tests of strict HTTP framing (issue 10 §5): conflicting or malformed
//! `Content-Length`, `Transfer-Encoding` with it, stalled and short bodies, absolute-form targets,
//! and a JSON body with a documented `code` on every error kv sends, also for requests the HTTP
//! library cannot read.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::Path;

use common::{Response, TestServer, read_response};
use serde_json::json;

fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path());
    (dir, s)
}

/// The codes of the README's error table.
fn documented_codes() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table = readme
        .split("### Errors")
        .nth(1)
        .and_then(|rest| rest.split("\n\n| status").nth(1))
        .and_then(|table| table.split("\n\n").next())
        .expect("the README has an error table");
    table
        .lines()
        .filter_map(|row| row.split('|').nth(2))
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Sends `raw` on a new connection; the answer, and whether kv closed the connection after it.
fn exchange(s: &TestServer, raw: &[u8]) -> (Response, bool) {
    let mut stream = s.connect();
    stream.write_all(raw).unwrap();
    let resp = read_response(&mut stream);
    let closed = matches!(stream.read(&mut [0; 64]), Ok(0) | Err(_));
    (resp, closed)
}

/// Asserts an error answer: its status, a JSON body with `code` (a documented one), and that kv
/// said and did close the connection.
fn assert_refused(s: &TestServer, raw: &[u8], status: u16, code: &str) {
    let (resp, closed) = exchange(s, raw);
    let what = String::from_utf8_lossy(raw);
    assert_eq!(resp.status, status, "{what}");
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    let body = resp.json();
    assert_eq!(body["code"], code, "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}"
    );
    assert!(
        documented_codes().contains(code),
        "{code} is not in the README's table"
    );
    assert_eq!(resp.header("connection"), Some("close"), "{what}");
    assert!(closed, "{what}: the connection stayed open");
}

#[test]
fn conflicting_or_malformed_content_length_is_refused_and_smuggles_nothing() {
    let (_dir, s) = server();
    // The second request hides in the body a proxy that reads the other Content-Length would send.
    let smuggled = r#"PUT /objects HTTP/1.1
Host: x
Content-Length: 26

{"key":"evil","value":1}"#
        .replace('\n', "\r\n");
    let body = format!(r#"{{"key":"k","value":1}}{smuggled}"#);
    for (first, second) in [(22, body.len()), (body.len(), 22)] {
        let raw = format!(
            "PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: {first}\r\nContent-Length: {second}\r\n\r\n{body}"
        );
        assert_refused(&s, raw.as_bytes(), 400, "invalid_framing");
    }
    for length in [
        "abc",
        "+22",
        "-1",
        "22, 22",
        "0x16",
        "",
        "99999999999999999999999",
    ] {
        let raw =
            format!("PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{body}");
        assert_refused(&s, raw.as_bytes(), 400, "invalid_framing");
    }
    assert_eq!(s.get("/objects/k").status, 404);
    assert_eq!(s.get("/objects/evil").status, 404);
    s.assert_healthy();
}

#[test]
fn transfer_encoding_must_be_chunked_alone() {
    let (_dir, s) = server();
    let chunked = "5\r\nhello\r\n0\r\n\r\n";
    for headers in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: abc\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked, gzip\r\n",
        "Transfer-Encoding: identity\r\n",
    ] {
        let raw = format!("PUT /objects HTTP/1.1\r\nHost: x\r\n{headers}\r\n{chunked}");
        assert_refused(&s, raw.as_bytes(), 400, "invalid_framing");
    }
    let raw = format!(
        "PUT /objects HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{chunked}"
    );
    assert_refused(&s, raw.as_bytes(), 501, "unsupported_transfer_coding");
    let raw =
        format!("PUT /objects HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}");
    assert_refused(&s, raw.as_bytes(), 400, "invalid_framing");
    // Chunked alone is fine. (Written "chunked": the HTTP library refuses "Chunked", which is
    // stricter than RFC 9112 but cannot make two parsers disagree.)
    let body = r#"{"key":"c","value":2}"#;
    let raw = format!(
        "PUT /objects HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    assert_eq!(s.raw(raw.as_bytes()).status, 200);
    assert_eq!(s.get("/objects/c").json()["value"], 2);
}

#[test]
fn stalled_bodies_of_any_size_get_a_json_408() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), &[("KV_IO_TIMEOUT_SECS", "1")]);
    // Small bodies are read with the request head, large ones as the API reads them.
    for declared in [40, 1024, 1025, 100_000] {
        let raw = format!(
            "PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n{{\"key\""
        );
        assert_refused(&s, raw.as_bytes(), 408, "request_timeout");
    }
    let chunked =
        "PUT /objects HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"key\"";
    assert_refused(&s, chunked.as_bytes(), 408, "request_timeout");
    s.assert_healthy();
}

#[test]
fn a_body_cut_short_is_refused_not_stored() {
    let (_dir, s) = server();
    for declared in [100, 5000] {
        let mut stream = s.connect();
        let raw = format!(
            "PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n{{\"key\":\"short\",\"value\":1}}"
        );
        stream.write_all(raw.as_bytes()).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer);
        // Small bodies end inside the library (nobody to answer), large ones in kv (a 400).
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{declared}: {answer}"
        );
        if !answer.is_empty() {
            assert!(answer.contains("invalid_framing"), "{answer}");
        }
    }
    assert_eq!(s.get("/objects/short").status, 404);
}

#[test]
fn absolute_form_targets_are_served_like_origin_form() {
    let (_dir, s) = server();
    let (resp, _) = exchange(
        &s,
        b"GET http://localhost/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        (resp.status, resp.json()),
        (200, json!({"status": "healthy"}))
    );
    let body = r#"{"key":"a b","value":7}"#;
    let raw = format!(
        "PUT HTTP://kv.example:3300/objects?collection=c HTTP/1.1\r\nHost: kv.example\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(s.raw(raw.as_bytes()).status, 200);
    let (resp, _) = exchange(
        &s,
        b"GET https://kv.example/objects/a%20b?collection=c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.json(), json!({"key": "a b", "value": 7}));
    let (resp, _) = exchange(
        &s,
        b"GET http://kv.example HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 404, "no path is /");
    assert_eq!(resp.json()["code"], "not_found");
}

#[test]
fn requests_the_library_cannot_read_get_json_with_a_documented_code() {
    let (_dir, s) = server();
    for (raw, status, code) in [
        (&b"GARBAGE\r\n\r\n"[..], 400, "invalid_request"),
        (
            b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n",
            400,
            "invalid_request",
        ),
        (
            b"GET /health HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
            400,
            "invalid_request",
        ),
        (
            b"GET /health HTTP/1.1\r\nX: a\nb\r\n\r\n",
            400,
            "invalid_request",
        ),
        (
            b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
            505,
            "http_version_not_supported",
        ),
        (
            b"GET /health HTTP/0.9\r\nHost: x\r\n\r\n",
            505,
            "http_version_not_supported",
        ),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n",
            417,
            "expectation_failed",
        ),
    ] {
        assert_refused(&s, raw, status, code);
    }
    // And kv's own errors keep their codes, all documented.
    for (method, target, status, code) in [
        ("BREW", "/objects", 405, "method_not_allowed"),
        ("OPTIONS", "*", 400, "invalid_path"),
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/changes?since=x", 400, "invalid_since"),
    ] {
        let resp = s.request(method, target, None);
        assert_eq!(resp.status, status, "{method} {target}");
        assert_eq!(resp.json()["code"], code);
        assert!(documented_codes().contains(code), "{code}");
    }
    s.assert_healthy();
}

#[test]
fn a_header_given_on_several_lines_is_read_as_one_list() {
    let (_dir, s) = server();
    assert_eq!(s.put("/objects", r#"{"key":"k","value":1}"#).status, 200);
    // The object is at revision 1: the second line of If-Match holds the match.
    let put = |if_match: &str| {
        let body = r#"{"key":"k","value":2}"#;
        let raw = format!(
            "PUT /objects HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{if_match}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.raw(raw.as_bytes()).status
    };
    assert_eq!(put("If-Match: \"7\"\r\n"), 412);
    assert_eq!(put("If-Match: \"7\"\r\nIf-Match: \"1\"\r\n"), 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (_dir, s) = server();
    let body = r#"{"key":"p","value":1}"#;
    let raw = format!(
        "PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}\
         GET /objects/p HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = s.connect();
    stream.write_all(raw.as_bytes()).unwrap();
    let mut answers = String::new();
    stream.read_to_string(&mut answers).unwrap();
    let bodies: Vec<&str> = answers
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|answer| answer.rsplit("\r\n").next().unwrap())
        .collect();
    assert_eq!(
        bodies,
        [
            r#"{"message":"Object stored successfully","key":"p","rev":1}"#,
            r#"{"key":"p","value":1}"#,
            r#"{"status":"healthy"}"#
        ]
    );
}

#[test]
fn the_readme_documents_every_code() {
    let codes = documented_codes();
    for code in [
        "invalid_request",
        "invalid_path",
        "invalid_framing",
        "request_timeout",
        "expectation_failed",
        "http_version_not_supported",
        "unsupported_transfer_coding",
        "unauthorized",
        "forbidden",
    ] {
        assert!(codes.contains(code), "{code} missing from {codes:?}");
    }
}
