//! End-to-end tests: the real `kv` binary, a temporary data directory, HTTP over loopback.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{TestServer, read_response, run_to_exit};
use serde_json::{Value, json};

fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path());
    (dir, server)
}

fn put_json(
    server: &TestServer,
    collection: Option<&str>,
    key: &str,
    value: &Value,
) -> common::Response {
    let target = match collection {
        Some(c) => format!("/objects?collection={c}"),
        None => "/objects".to_string(),
    };
    server.put(&target, &json!({"key": key, "value": value}).to_string())
}

/// Percent-encodes everything but unreserved characters, as a careful client would.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn health_is_json() {
    let (_dir, s) = server();
    let resp = s.get("/health");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.json(), json!({"status": "healthy"}));
    let head = s.request("HEAD", "/health", None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

#[test]
fn the_readme_walkthrough() {
    let (_dir, s) = server();
    let resp = s.put(
        "/objects",
        r#"{"key":"user_123","value":{"name":"John Doe","age":30}}"#,
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(
        resp.json(),
        json!({"message": "Object stored successfully", "key": "user_123", "rev": 1})
    );
    assert_eq!(resp.header("etag"), Some("\"1\""));

    let resp = s.get("/objects/user_123");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json(),
        json!({"key": "user_123", "value": {"name": "John Doe", "age": 30}})
    );

    assert_eq!(
        s.get("/objects?collection=users").json(),
        json!({"count": 0, "objects": {}})
    );
    assert_eq!(
        s.get("/objects").json(),
        json!({"count": 1, "objects": {"user_123": {"name": "John Doe", "age": 30}}})
    );
    assert_eq!(s.get("/objects/").json()["count"], 1);

    let resp = s.delete("/objects/user_123");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json(),
        json!({"message": "Object deleted successfully", "key": "user_123", "rev": 2})
    );

    let resp = s.get("/objects/user_123");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.json()["code"], "not_found");
    assert!(resp.json()["error"].as_str().unwrap().contains("not found"));
    let resp = s.delete("/objects/user_123");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.json()["code"], "not_found");
}

#[test]
fn put_overwrites() {
    let (_dir, s) = server();
    put_json(&s, None, "k", &json!(1));
    put_json(&s, None, "k", &json!({"v": 2}));
    assert_eq!(s.get("/objects/k").json()["value"], json!({"v": 2}));
    assert_eq!(s.get("/objects").json()["count"], 1);
}

#[test]
fn a_form_content_type_is_accepted() {
    let (_dir, s) = server();
    let body = r#"{"key":"f","value":true}"#;
    let raw = format!(
        "PUT /objects HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(s.raw(raw.as_bytes()).status, 200);
    assert_eq!(s.get("/objects/f").json()["value"], true);
}

#[test]
fn collections_are_isolated() {
    let (_dir, s) = server();
    assert_eq!(put_json(&s, Some("a"), "b:c", &json!("first")).status, 200);
    assert_eq!(
        put_json(&s, Some("a%3Ab"), "c", &json!("second")).status,
        200
    );
    assert_eq!(put_json(&s, Some("users"), "u1", &json!(1)).status, 200);
    assert_eq!(put_json(&s, None, "u1", &json!("default")).status, 200);

    assert_eq!(
        s.get("/objects/b%3Ac?collection=a").json()["value"],
        "first"
    );
    assert_eq!(s.get("/objects/b:c?collection=a").json()["value"], "first");
    assert_eq!(
        s.get("/objects/c?collection=a%3Ab").json()["value"],
        "second"
    );
    assert_eq!(s.get("/objects/c?collection=a").status, 404);
    assert_eq!(s.get("/objects/b%3Ac?collection=a%3Ab").status, 404);
    assert_eq!(s.get("/objects/u1?collection=users").json()["value"], 1);
    assert_eq!(s.get("/objects/u1").json()["value"], "default");
    assert_eq!(s.get("/objects/u1?collection=").json()["value"], "default");
    assert_eq!(
        s.get("/objects/u1?collection=default").json()["value"],
        "default"
    );
    assert_eq!(
        s.get("/objects?collection=a").json(),
        json!({"count": 1, "objects": {"b:c": "first"}})
    );
    assert_eq!(
        s.get("/objects?collection=nobody").json(),
        json!({"count": 0, "objects": {}})
    );

    assert_eq!(s.delete("/objects/u1?collection=users").status, 200);
    assert_eq!(s.get("/objects/u1").json()["value"], "default");
}

#[test]
fn list_is_sorted_by_key() {
    let (_dir, s) = server();
    for key in ["b", "a", "c", "aa", "B"] {
        put_json(&s, Some("sorted"), key, &json!(key));
    }
    let body = s.get("/objects?collection=sorted").body;
    let text = String::from_utf8(body).unwrap();
    assert_eq!(
        text,
        r#"{"count":5,"objects":{"B":"B","a":"a","aa":"aa","b":"b","c":"c"}}"#
    );
}

#[test]
#[allow(clippy::approx_constant)] // 3.14159 is the issue's example value, not an attempt at pi
fn every_json_type_round_trips() {
    let (_dir, s) = server();
    let order = json!({
        "orderId": "ORD-2024-001",
        "customer": {"id": "CUST-123", "name": "Jane Smith", "email": "jane@example.com",
                     "address": {"street": "123 Main St", "city": "Springfield", "zip": "12345"}},
        "items": [
            {"sku": "WIDGET-1", "name": "Blue Widget", "quantity": 2, "price": 19.99},
            {"sku": "GADGET-2", "name": "Red Gadget", "quantity": 1, "price": 49.5}
        ],
        "total": 89.48, "paid": true, "notes": null, "tags": ["priority", "gift"]
    });
    let cases = [
        ("string", json!("hello")),
        ("empty_string", json!("")),
        ("integer", json!(42)),
        ("negative", json!(-7)),
        ("float", json!(3.14159)),
        ("true", json!(true)),
        ("false", json!(false)),
        ("null", json!(null)),
        ("array", json!([1, "two", null, [3]])),
        ("empty_array", json!([])),
        ("empty_object", json!({})),
        ("unicode", json!("héllo wörld ✓ 日本語 🎉")),
        ("escapes", json!("quote \" backslash \\ newline \n tab \t")),
        ("order", order),
    ];
    for (key, value) in &cases {
        assert_eq!(put_json(&s, None, key, value).status, 200, "{key}");
    }
    for (key, value) in &cases {
        assert_eq!(
            &s.get(&format!("/objects/{key}")).json()["value"],
            value,
            "{key}"
        );
    }
    assert_eq!(s.get("/objects").json()["count"], cases.len());
}

#[test]
fn large_values_come_back_with_a_content_length() {
    let (_dir, s) = server();
    let value = "z".repeat(100 * 1024);
    assert_eq!(put_json(&s, None, "big", &json!(value)).status, 200);
    let resp = s.get("/objects/big");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("transfer-encoding"), None);
    assert_eq!(
        resp.header("content-length"),
        Some(resp.body.len().to_string().as_str())
    );
    assert_eq!(resp.json()["value"], json!(value));
}

#[test]
fn values_keep_their_exact_text() {
    let (_dir, s) = server();
    // 2^53 + 1 and a long decimal do not survive a trip through f64; the stored text must.
    let body = r#"{"key":"n","value":{"big":9007199254740993,"pi":3.141592653589793238,"deep":[[[[[[[[[[[[[[[[[[[[{"x":1e400}]]]]]]]]]]]]]]]]]]]]}}"#;
    assert_eq!(s.put("/objects", body).status, 200);
    let text = String::from_utf8(s.get("/objects/n").body).unwrap();
    assert_eq!(
        text,
        r#"{"key":"n","value":{"big":9007199254740993,"pi":3.141592653589793238,"deep":[[[[[[[[[[[[[[[[[[[[{"x":1e400}]]]]]]]]]]]]]]]]]]]]}}"#
    );
}

#[test]
fn odd_keys_work() {
    let (_dir, s) = server();
    let keys = [
        "with space",
        "ünïcödé-日本",
        "a/b",
        ".",
        "..",
        "a+b",
        "100%",
        "?&=#",
        "emoji🎉",
        &"k".repeat(1024),
    ];
    for key in keys {
        assert_eq!(put_json(&s, None, key, &json!(key)).status, 200, "{key}");
        let resp = s.get(&format!("/objects/{}", encode(key)));
        assert_eq!(resp.status, 200, "{key}");
        assert_eq!(resp.json(), json!({"key": key, "value": key}));
    }
    assert_eq!(s.get("/objects/a%2Fb").json()["value"], "a/b");
    assert_eq!(
        s.get("/objects/a/b").json()["value"],
        "a/b",
        "a raw slash is part of the key"
    );
    assert_eq!(s.get("/objects/with%20space").json()["value"], "with space");
    assert_eq!(
        s.get("/objects/a+b").json()["value"],
        "a+b",
        "+ in a path stays a plus"
    );
    let listed = s.get("/objects").json();
    assert_eq!(listed["count"], keys.len());
    for key in keys {
        assert_eq!(
            s.delete(&format!("/objects/{}", encode(key))).status,
            200,
            "{key}"
        );
    }
    assert_eq!(s.get("/objects").json()["count"], 0);
}

#[test]
fn oversized_and_control_keys_are_refused() {
    let (_dir, s) = server();
    let resp = put_json(&s, None, &"k".repeat(1025), &json!(1));
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["code"], "invalid_key");
    let resp = s.get(&format!("/objects/{}", "k".repeat(1025)));
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["code"], "invalid_key");
    let resp = s.get("/objects/a%0Ab");
    assert_eq!(
        (resp.status, resp.json()["code"].clone()),
        (400, json!("invalid_key"))
    );
    let resp = s.get("/objects/%E0%A4");
    assert_eq!(
        (resp.status, resp.json()["code"].clone()),
        (400, json!("invalid_key"))
    );
    let resp = s.get(&format!("/objects/k?collection={}", "c".repeat(257)));
    assert_eq!(
        (resp.status, resp.json()["code"].clone()),
        (400, json!("invalid_collection"))
    );
    assert_eq!(
        put_json(&s, Some(&"c".repeat(256)), "k", &json!(1)).status,
        200
    );
    s.assert_healthy();
}

#[test]
fn every_bad_body_is_a_400() {
    let (_dir, s) = server();
    let cases: &[(&[u8], &str)] = &[
        (b"", "invalid_json"),
        (b"not json", "invalid_json"),
        (b"{\"key\":\"a\",\"value\":", "invalid_json"),
        (b"{\"key\":\"a\",\"value\":1}}", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[\"a\", 1]", "invalid_body"),
        (b"42", "invalid_body"),
        (b"null", "invalid_body"),
        (b"{\"value\":1}", "missing_key"),
        (b"{\"key\":\"a\"}", "missing_value"),
        (b"{\"key\":7,\"value\":1}", "invalid_key"),
        (b"{\"key\":[\"a\"],\"value\":1}", "invalid_key"),
        (b"{\"key\":\"\",\"value\":1}", "invalid_key"),
        (b"{\"key\":\"tab\\there\",\"value\":1}", "invalid_key"),
    ];
    for (body, code) in cases {
        let resp = s.request("PUT", "/objects", Some(body));
        assert_eq!(resp.status, 400, "{:?}", String::from_utf8_lossy(body));
        let json = resp.json();
        assert_eq!(
            json["code"],
            *code,
            "{:?}: {json}",
            String::from_utf8_lossy(body)
        );
        assert!(!json["error"].as_str().unwrap().is_empty());
    }
    // A PUT without any body at all (no Content-Length).
    let resp = s.request("PUT", "/objects", None);
    assert_eq!(
        (resp.status, resp.json()["code"].clone()),
        (400, json!("invalid_json"))
    );
    // Extra fields are ignored; null is a value.
    assert_eq!(
        s.put("/objects", r#"{"key":"x","value":null,"extra":[1]}"#)
            .status,
        200
    );
    assert_eq!(
        s.get("/objects/x").json(),
        json!({"key": "x", "value": null})
    );
    assert_eq!(
        s.get("/objects").json()["count"],
        1,
        "no failed PUT stored anything"
    );
    s.assert_healthy();
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() {
    let (_dir, s) = server();
    for path in ["/", "/nope", "/health/x", "/object/a", "/objectsx"] {
        let resp = s.get(path);
        assert_eq!(resp.status, 404, "{path}");
        assert_eq!(resp.json()["code"], "not_found");
    }
    for (method, path, allow) in [
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/objects", "GET, HEAD, PUT"),
        ("POST", "/objects", "GET, HEAD, PUT"),
        ("PUT", "/objects/a", "GET, HEAD, DELETE"),
        ("PATCH", "/objects/a", "GET, HEAD, DELETE"),
    ] {
        let resp = s.request(method, path, Some(b"{}"));
        assert_eq!(resp.status, 405, "{method} {path}");
        assert_eq!(resp.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(resp.json()["code"], "method_not_allowed");
    }
    s.assert_healthy();
}

#[test]
fn a_body_over_the_limit_is_413() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), &[("KV_MAX_BODY_BYTES", "1000")]);
    let value = "x".repeat(2000);
    let resp = put_json(&s, None, "big", &json!(value));
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["code"], "body_too_large");
    // A chunked body declares no length: it is cut off after the limit instead.
    let body = json!({"key": "big", "value": value}).to_string();
    let mut raw = b"PUT /objects HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in body.as_bytes().chunks(300) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let resp = s.raw(&raw);
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["code"], "body_too_large");
    // Just under the limit is fine, chunked or not.
    let small = json!({"key": "small", "value": "y".repeat(900)}).to_string();
    assert!(small.len() <= 1000);
    assert_eq!(s.put("/objects", &small).status, 200);
    assert_eq!(s.get("/objects/big").status, 404);
    s.assert_healthy();
}

#[test]
fn a_huge_declared_content_length_does_not_kill_the_server() {
    // tiny_http 0.12.0 allocates the declared length when it drops such a request and aborts.
    let (_dir, s) = server();
    let mut stream = s.connect();
    stream
        .write_all(b"PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\n\r\n{\"key\":")
        .unwrap();
    let resp = read_response(&mut stream);
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["code"], "body_too_large");
    drop(stream);
    s.assert_healthy();
    assert_eq!(put_json(&s, None, "after", &json!(1)).status, 200);
}

#[test]
fn a_client_trickling_an_oversized_body_holds_no_worker() {
    let dir = tempfile::tempdir().unwrap();
    // One worker: if answering the 413 kept it busy discarding the body, nothing else would run.
    let s = TestServer::start_with(
        dir.path(),
        &[("KV_WORKERS", "1"), ("KV_MAX_BODY_BYTES", "1000")],
    );
    let mut stream = s.connect();
    stream
        .write_all(b"PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\nxx")
        .unwrap();
    assert_eq!(read_response(&mut stream).status, 413);
    let trickle = thread::spawn(move || {
        for _ in 0..30 {
            if stream.write_all(&[b'x'; 100]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    for _ in 0..5 {
        let started = Instant::now();
        s.assert_healthy();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        thread::sleep(Duration::from_millis(200));
    }
    trickle.join().unwrap();
}

#[test]
fn malformed_http_gets_400_and_the_server_lives() {
    let (_dir, s) = server();
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
        b"PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ] {
        let mut stream = s.connect();
        stream.write_all(raw).unwrap();
        let resp = read_response(&mut stream);
        assert_eq!(resp.status, 400, "{:?}", String::from_utf8_lossy(raw));
    }
    s.assert_healthy();
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let (_dir, s) = server();
    let mut stream = s.connect();
    for i in 0..50 {
        let body = json!({"key": format!("k{i}"), "value": i}).to_string();
        stream
            .write_all(&common::raw_request("PUT", "/objects", &body))
            .unwrap();
        assert_eq!(read_response(&mut stream).status, 200);
    }
    stream
        .write_all(b"GET /objects HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream).json()["count"], 50);
}

#[test]
fn idle_connections_do_not_block_new_ones() {
    let (_dir, s) = server();
    // 64 keep-alive connections that each made one request and then went quiet.
    let mut idle: Vec<TcpStream> = (0..64).map(|_| s.connect()).collect();
    for stream in &mut idle {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
    }
    for stream in &mut idle {
        assert_eq!(read_response(stream).status, 200);
    }
    let started = Instant::now();
    let mut fresh = s.connect();
    fresh
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    fresh
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut fresh);
    assert_eq!(resp.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // A burst of new connections at once is answered too, with the idle ones still open.
    let burst: Vec<_> = (0..64)
        .map(|_| {
            let addr = s.addr();
            thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                stream
                    .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                read_response(&mut stream).status
            })
        })
        .collect();
    for t in burst {
        assert_eq!(t.join().unwrap(), 200);
    }
}

#[test]
fn idle_and_stalled_clients_are_closed_after_the_io_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), &[("KV_IO_TIMEOUT_SECS", "1")]);
    // Quiet for longer than the timeout: the accept loop must survive its own timeout.
    thread::sleep(Duration::from_millis(1500));
    s.assert_healthy();
    // A client that promises a body and never sends it gets cut off, not waited for.
    let mut stream = s.connect();
    stream
        .write_all(b"PUT /objects HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"key\"")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stalled client held for {:?}",
        started.elapsed()
    );
    s.assert_healthy();
}

#[test]
fn thirty_two_concurrent_writers_lose_nothing() {
    let (_dir, s) = server();
    let s = Arc::new(s);
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let s = s.clone();
            thread::spawn(move || {
                for i in 0..40 {
                    let resp = put_json(
                        &s,
                        Some("load"),
                        &format!("w{t}-{i}"),
                        &json!({"t": t, "i": i}),
                    );
                    assert_eq!(resp.status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let listed = s.get("/objects?collection=load").json();
    assert_eq!(listed["count"], 32 * 40);
    for t in 0..32 {
        for i in 0..40 {
            assert_eq!(
                listed["objects"][format!("w{t}-{i}")],
                json!({"t": t, "i": i})
            );
        }
    }
}

#[test]
fn sixty_four_keep_alive_writers_times_500_puts_lose_nothing() {
    let (_dir, s) = server();
    let addr = s.addr();
    let writers: Vec<_> = (0..64)
        .map(|t| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut stream = TcpStream::connect(&addr).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                for i in 0..500 {
                    let body = json!({"key": format!("w{t}-{i}"), "value": i}).to_string();
                    let raw = common::raw_request("PUT", "/objects?collection=many", &body);
                    stream.write_all(&raw).unwrap();
                    let resp = read_response(&mut stream);
                    assert_eq!(resp.status, 200, "writer {t}, put {i}");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(s.get("/collections/many").json()["count"], 64 * 500);
    let listed = s.get("/objects?collection=many").json();
    assert_eq!(listed["count"], 64 * 500);
    assert_eq!(listed["objects"]["w63-499"], 499);
    assert_eq!(listed["objects"]["w0-0"], 0);
}

#[test]
fn data_survives_sigterm_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path());
    put_json(&s, Some("c"), "kept", &json!({"a": [1, 2]}));
    put_json(&s, None, "gone", &json!(1));
    s.delete("/objects/gone");
    // Idle keep-alive clients must not hold up the stop.
    let idle: Vec<TcpStream> = (0..8).map(|_| s.connect()).collect();
    let started = Instant::now();
    let status = s.terminate(Duration::from_secs(5));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        s.log()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(s.log().contains("stopped"), "{}", s.log());
    drop(idle);
    // SQLite's WAL; PostgreSQL keeps its own.
    assert!(
        !dir.path().join("kv.sqlite3-wal").exists()
            || std::fs::metadata(dir.path().join("kv.sqlite3-wal"))
                .unwrap()
                .len()
                == 0,
        "the WAL was checkpointed"
    );

    let s = TestServer::start(dir.path());
    assert_eq!(
        s.get("/objects/kept?collection=c").json()["value"],
        json!({"a": [1, 2]})
    );
    assert_eq!(s.get("/objects/gone").status, 404);
}

#[test]
fn sigint_stops_gracefully_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path());
    put_json(&s, None, "k", &json!(1));
    s.signal_int();
    let status = s.wait(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    let s = TestServer::start(dir.path());
    assert_eq!(s.get("/objects/k").json()["value"], 1);
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    acknowledged_writes_survive(|s| s.kill());
}

#[test]
fn acknowledged_writes_survive_sigterm_mid_stream() {
    acknowledged_writes_survive(|s| {
        let status = s.terminate(Duration::from_secs(5));
        assert!(status.success(), "{status:?}");
    });
}

/// Writers PUT continuously while `stop` ends the server; every PUT that got a 200 must be there
/// after a restart.
fn acknowledged_writes_survive(stop_server: impl FnOnce(&mut TestServer)) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path());
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = s.addr();
    // 16 writers at once, so that commits carry groups of writes.
    let writers: Vec<_> = (0..16)
        .map(|t| {
            let (acked, stop, addr) = (acked.clone(), stop.clone(), addr.clone());
            thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("t{t}-{i}");
                    let body = json!({"key": key, "value": {"i": i}}).to_string();
                    let raw = format!(
                        "PUT /objects?collection=crash HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let Ok(mut stream) = TcpStream::connect(&addr) else { break };
                    if stream.write_all(raw.as_bytes()).is_err() {
                        break;
                    }
                    let mut response = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut stream, &mut response);
                    if response.starts_with(b"HTTP/1.1 200") {
                        acked.lock().unwrap().insert(key);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    assert!(common::eventually(Duration::from_secs(20), || acked
        .lock()
        .unwrap()
        .len()
        >= 200));
    stop_server(&mut s);
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 200);

    let s = TestServer::start(dir.path());
    let listed = s.get("/objects?collection=crash").json();
    let stored: BTreeSet<String> = listed["objects"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}

#[test]
fn startup_failures_exit_nonzero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().to_str().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let not_sqlite = dir.path().join("not-sqlite");
    std::fs::create_dir(&not_sqlite).unwrap();
    std::fs::write(not_sqlite.join("kv.sqlite3"), vec![b'x'; 4096]).unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let under_file = file.join("sub");

    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("PORT", "abc"), ("DB_PATH", db)], "PORT"),
        (vec![("PORT", "99999"), ("DB_PATH", db)], "PORT"),
        (vec![("PORT", &busy_port), ("DB_PATH", db)], "cannot listen"),
        (
            vec![("PORT", "0"), ("DB_PATH", file.to_str().unwrap())],
            "cannot create the data directory",
        ),
        (
            vec![("PORT", "0"), ("DB_PATH", under_file.to_str().unwrap())],
            "cannot create the data directory",
        ),
        (
            vec![("PORT", "0"), ("DB_PATH", not_sqlite.to_str().unwrap())],
            "not a database",
        ),
        (
            vec![("PORT", "0"), ("DB_PATH", db), ("KV_SYNC", "maybe")],
            "KV_SYNC",
        ),
        (
            vec![
                ("PORT", "0"),
                ("DB_PATH", db),
                ("KV_HOST", "no such host.invalid"),
            ],
            "listen address",
        ),
    ];
    for (env, needle) in cases {
        let started = Instant::now();
        let (status, _, stderr) = run_to_exit(&env, &[]);
        assert_eq!(status.code(), Some(1), "{env:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "{env:?}: {stderr}");
        assert!(errors[0].contains(needle), "{env:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{env:?}: {stderr}");
    }
    drop(busy);
}

#[test]
fn help_and_version() {
    // The unit tests check that the help names every variable; here, that the binary prints it.
    let (status, stdout, _) = run_to_exit(&[], &["--help"]);
    assert!(status.success());
    assert!(
        stdout.starts_with("kv: ") && stdout.contains("Usage: kv") && stdout.contains("KV_SYNC")
    );
    let (status, stdout, _) = run_to_exit(&[], &["--version"]);
    assert!(status.success());
    assert_eq!(stdout.trim(), format!("kv {}", env!("CARGO_PKG_VERSION")));
    let (status, _, stderr) = run_to_exit(&[], &["--bogus"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.starts_with("error: "), "{stderr}");
}

#[test]
fn flags_override_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("PORT", "abc"),
        ("DB_PATH", other.path().to_str().unwrap()),
        ("KV_HOST", "0.0.0.0"),
    ];
    let mut args = vec![
        "--port",
        "0",
        "--db-path",
        dir.path().to_str().unwrap(),
        "--host=127.0.0.1",
    ];
    // On PostgreSQL the database comes from a flag too, over a variable naming no server.
    let database_flag = common::database_url(dir.path()).map(|url| format!("--database-url={url}"));
    if let Some(flag) = &database_flag {
        env.push(("KV_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"));
        args.push(flag);
    }
    let s = TestServer::launch(dir.path(), &env, &args);
    s.assert_healthy();
    assert!(
        s.log().contains("listening on http://127.0.0.1:"),
        "{}",
        s.log()
    );
    assert_eq!(s.put("/objects", r#"{"key":"k","value":1}"#).status, 200);
    if !common::on_postgres() {
        assert!(dir.path().join("kv.sqlite3").exists());
    }
    assert!(!other.path().join("kv.sqlite3").exists());
}

#[test]
fn a_batch_applies_every_op_in_one_go() {
    let (_dir, s) = server();
    put_json(&s, Some("users"), "b", &json!("old"));
    let body = json!({"collection": "users", "ops": [
        {"op": "put", "key": "a", "value": {"n": 1}},
        {"op": "delete", "key": "b"},
        {"op": "get", "key": "a"},
        {"op": "put", "key": "x", "value": true, "collection": "flags"},
        {"op": "delete", "key": "never"},
        {"op": "get", "key": "never"}
    ]});
    let resp = s.request("POST", "/batch", Some(body.to_string().as_bytes()));
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json(),
        json!({"ok": true, "results": [
            {"op": "put", "key": "a", "status": 200, "rev": 2},
            {"op": "delete", "key": "b", "found": true, "rev": 3},
            {"op": "get", "key": "a", "found": true, "rev": 2, "value": {"n": 1}},
            {"op": "put", "key": "x", "status": 200, "rev": 4},
            {"op": "delete", "key": "never", "found": false},
            {"op": "get", "key": "never", "found": false}
        ]})
    );
    assert_eq!(
        s.get("/objects/a?collection=users").json()["value"],
        json!({"n": 1})
    );
    assert_eq!(s.get("/objects/b?collection=users").status, 404);
    assert_eq!(s.get("/objects/x?collection=flags").json()["value"], true);
}

#[test]
fn an_invalid_op_leaves_no_trace_of_the_others() {
    let (_dir, s) = server();
    let body = json!({"ops": [
        {"op": "put", "key": "one", "value": 1},
        {"op": "delete", "key": "two"},
        {"op": "put", "key": "three"},
        {"op": "put", "key": "four", "value": 4}
    ]});
    put_json(&s, None, "two", &json!(2));
    let resp = s.request("POST", "/batch", Some(body.to_string().as_bytes()));
    assert_eq!(resp.status, 400);
    let json = resp.json();
    assert_eq!(json["index"], 2);
    assert_eq!(json["code"], "missing_value");
    assert!(json["error"].as_str().unwrap().contains("op 2"));
    assert_eq!(s.get("/objects/one").status, 404);
    assert_eq!(s.get("/objects/two").json()["value"], 2);
    assert_eq!(s.get("/objects/four").status, 404);

    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"op": "get", "key": format!("k{i}")}))
        .collect();
    let resp = s.request(
        "POST",
        "/batch",
        Some(json!({"ops": too_many}).to_string().as_bytes()),
    );
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["code"], "too_many_ops");
    let resp = s.request("POST", "/batch", Some(br#"{"ops":[]}"#));
    assert_eq!(
        (resp.status, resp.json()["code"].clone()),
        (400, json!("invalid_batch"))
    );
    let resp = s.request("PUT", "/batch", Some(br#"{"ops":[]}"#));
    assert_eq!((resp.status, resp.header("allow")), (405, Some("POST")));
    s.assert_healthy();
}

#[test]
fn a_batch_killed_midway_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let value = "v".repeat(8000);
    for (round, delay_ms) in [0u64, 5, 20, 60].into_iter().enumerate() {
        let mut s = TestServer::start(dir.path());
        let collection = format!("crash{round}");
        let ops: Vec<Value> = (0..1000)
            .map(|i| json!({"op": "put", "key": format!("k{i}"), "value": value}))
            .collect();
        let body = json!({"collection": collection, "ops": ops}).to_string();
        let mut stream = s.connect();
        let head = format!(
            "POST /batch HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        thread::sleep(Duration::from_millis(delay_ms));
        s.kill();
        drop(stream);

        let s = TestServer::start(dir.path());
        let resp = s.get(&format!("/collections/{collection}"));
        let count = if resp.status == 404 {
            0
        } else {
            resp.json()["count"].as_u64().unwrap()
        };
        assert!(
            count == 0 || count == 1000,
            "round {round}: {count} of 1000 ops survived"
        );
        let listed = s.get(&format!("/objects?collection={collection}")).json();
        assert_eq!(
            listed["count"].as_u64().unwrap(),
            count,
            "the count table agrees with the data"
        );
    }
}

#[test]
fn collections_are_counted_through_every_kind_of_write() {
    let (_dir, s) = server();
    assert_eq!(
        s.get("/collections").json(),
        json!({"count": 0, "collections": []})
    );
    for i in 0..5 {
        put_json(&s, Some("users"), &format!("u{i}"), &json!(i));
    }
    put_json(&s, Some("users"), "u0", &json!("overwrite"));
    put_json(&s, Some("a%3Ab"), "c", &json!(1));
    put_json(&s, None, "d", &json!(1));
    s.delete("/objects/u4?collection=users");
    let batch = json!({"collection": "sessions", "ops": [
        {"op": "put", "key": "s1", "value": 1},
        {"op": "put", "key": "s2", "value": 2},
        {"op": "delete", "key": "u3", "collection": "users"}
    ]});
    assert_eq!(
        s.request("POST", "/batch", Some(batch.to_string().as_bytes()))
            .status,
        200
    );
    assert_eq!(
        s.get("/collections").json(),
        json!({"count": 4, "collections": [
            {"name": "a:b", "count": 1, "rev": 7},
            {"name": "default", "count": 1, "rev": 8},
            {"name": "sessions", "count": 2, "rev": 11},
            {"name": "users", "count": 3, "rev": 12}
        ]})
    );
    assert_eq!(
        s.get("/collections/users").json(),
        json!({"name": "users", "count": 3, "rev": 12})
    );
    assert_eq!(s.get("/collections/a%3Ab").json()["count"], 1);
    assert_eq!(s.get("/collections/nobody").status, 404);

    let resp = s.delete("/collections/users");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json(),
        json!({"message": "Collection deleted successfully", "name": "users", "deleted": 3, "rev": 13})
    );
    assert_eq!(s.delete("/collections/users").status, 404);
    assert_eq!(
        s.get("/objects?collection=users").json(),
        json!({"count": 0, "objects": {}})
    );
    assert_eq!(s.get("/objects/s2?collection=sessions").json()["value"], 2);
    assert_eq!(s.get("/objects/c?collection=a%3Ab").json()["value"], 1);
    assert_eq!(s.get("/collections").json()["count"], 3);
    let resp = s.request("POST", "/collections", None);
    assert_eq!(
        (resp.status, resp.header("allow")),
        (405, Some("GET, HEAD"))
    );
}
