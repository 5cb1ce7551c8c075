//! End-to-end tests of lists that scale (keyset paging, prefixes, keys only, streamed whole lists)
//! and of objects that expire (TTL with strict expiry).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Client, TestServer, eventually};
use serde_json::{Value, json};

fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path());
    (dir, server)
}

/// Puts `keys` into `collection` in batches of 1000 (one commit each).
fn fill(s: &Client, collection: &str, keys: impl IntoIterator<Item = String>, value: &Value) {
    let keys: Vec<String> = keys.into_iter().collect();
    for chunk in keys.chunks(1000) {
        let ops: Vec<Value> = chunk
            .iter()
            .map(|k| json!({"op": "put", "key": k, "value": value}))
            .collect();
        let body = json!({"collection": collection, "ops": ops}).to_string();
        let resp = s.request("POST", "/batch", Some(body.as_bytes()));
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    }
}

/// Walks a collection page by page; returns every key seen, in order, and the pages' sizes.
fn walk(s: &Client, query: &str, limit: usize) -> (Vec<String>, Vec<usize>) {
    let mut keys = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor = String::new();
    loop {
        let resp = s.get(&format!("/objects?{query}&limit={limit}{cursor}"));
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let page = resp.json();
        let objects = page["objects"].as_object().unwrap();
        assert_eq!(page["count"], objects.len());
        sizes.push(objects.len());
        keys.extend(objects.keys().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => {
                let link = resp.header("link").expect("a Link header with next_cursor");
                assert!(
                    link.ends_with(&format!("&cursor={next}>; rel=\"next\"")),
                    "{link}"
                );
                assert!(link.contains(&format!("limit={limit}")), "{link}");
                cursor = format!("&cursor={next}");
            }
            None => {
                assert_eq!(resp.header("link"), None);
                return (keys, sizes);
            }
        }
    }
}

#[test]
fn paging_returns_every_object_once_in_order() {
    let (_dir, s) = server();
    fill(&s, "big", (0..2500).map(|i| format!("k{i:05}")), &json!(1));
    let (keys, sizes) = walk(&s, "collection=big", 1000);
    assert_eq!(sizes, [1000, 1000, 500]);
    let expected: Vec<String> = (0..2500).map(|i| format!("k{i:05}")).collect();
    assert_eq!(keys, expected);
    // A page that ends the collection exactly at its limit has no next cursor.
    let (_, sizes) = walk(&s, "collection=big", 500);
    assert_eq!(sizes, [500; 5]);
    let page = s.get("/objects?collection=big&limit=2").json();
    assert_eq!(
        page,
        json!({"count": 2, "objects": {"k00000": 1, "k00001": 1}, "next_cursor": page["next_cursor"]})
    );
    // A cursor without a limit continues to the end.
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest = s
        .get(&format!("/objects?collection=big&cursor={cursor}"))
        .json();
    assert_eq!(rest["count"], 2498);
    assert_eq!(rest.get("next_cursor"), None);
}

#[test]
fn paging_while_others_write_never_skips_or_repeats_a_lasting_key() {
    let (_dir, s) = server();
    fill(&s, "c", (0..3000).map(|i| format!("stay{i:05}")), &json!(1));
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (addr, stop) = (s.addr(), stop.clone());
        thread::spawn(move || {
            let c = TestServer::client(&addr);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Keys before, among and after the lasting ones, inserted and deleted.
                let key = format!(
                    "{}{:05}",
                    ["a", "stay", "z"][(i % 3) as usize],
                    i * 7 % 3000
                );
                let key = if key.starts_with("stay") {
                    format!("{key}x")
                } else {
                    key
                };
                c.put(
                    "/objects?collection=c",
                    &json!({"key": key, "value": i}).to_string(),
                );
                if i % 2 == 0 {
                    c.delete(&format!("/objects/{key}?collection=c"));
                }
                i += 1;
            }
        })
    };
    let (keys, _) = walk(&s, "collection=c", 97);
    stop.store(true, Ordering::SeqCst);
    churn.join().unwrap();
    let lasting: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("stay") && !k.ends_with('x'))
        .collect();
    assert_eq!(lasting.len(), 3000, "every lasting key exactly once");
    let unique: BTreeSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "no key twice");
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "ascending byte order");
}

#[test]
fn prefixes_keys_only_and_bad_parameters() {
    let (_dir, s) = server();
    let keys = ["app", "app/1", "app/2", "app/3", "apple", "b", "é/1", "é/2"];
    fill(&s, "p", keys.iter().map(|k| k.to_string()), &json!(null));
    let (under, sizes) = walk(&s, "collection=p&prefix=app%2F", 2);
    assert_eq!(under, ["app/1", "app/2", "app/3"]);
    assert_eq!(sizes, [2, 1]);
    let link = s.get("/objects?collection=p&prefix=app%2F&limit=2&keys_only=true");
    let link = link.header("link").unwrap().to_string();
    assert!(
        link.contains("prefix=app%2F") && link.contains("keys_only=true"),
        "{link}"
    );
    assert_eq!(
        s.get("/objects?collection=p&prefix=%C3%A9&keys_only=true")
            .json(),
        json!({"count": 2, "keys": ["é/1", "é/2"]})
    );
    let page = s.get("/objects?collection=p&keys_only=true&limit=3").json();
    assert_eq!(page["keys"], json!(["app", "app/1", "app/2"]));
    assert!(page["next_cursor"].is_string());
    assert_eq!(
        s.get("/objects?collection=p&prefix=").json()["count"],
        8,
        "an empty prefix is none"
    );
    assert_eq!(
        s.get("/objects?collection=p&prefix=zzz").json(),
        json!({"count": 0, "objects": {}})
    );
    // NUL, which no key holds (and PostgreSQL text cannot): a prefix with it matches nothing,
    // and a cursor after "app\0" (base64url YXBwAA) sorts between "app" and "app/1".
    for query in [
        "prefix=app%00",
        "prefix=%00&limit=5",
        "prefix=a%00p&keys_only=true",
    ] {
        let resp = s.get(&format!("/objects?collection=p&{query}"));
        assert_eq!(
            (resp.status, resp.json()["count"].clone()),
            (200, json!(0)),
            "{query}"
        );
    }
    assert_eq!(
        s.get("/objects?collection=p&keys_only=true&limit=2&cursor=YXBwAA")
            .json()["keys"],
        json!(["app/1", "app/2"])
    );
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=10001", "invalid_limit"),
        ("limit=x", "invalid_limit"),
        ("limit=-1", "invalid_limit"),
        ("cursor=!!", "invalid_cursor"),
        ("cursor=Y", "invalid_cursor"),
        ("cursor=gA", "invalid_cursor"),
        ("keys_only=yes", "invalid_keys_only"),
    ] {
        let resp = s.get(&format!("/objects?collection=p&{query}"));
        assert_eq!(
            (resp.status, resp.json()["code"].clone()),
            (400, json!(code)),
            "{query}"
        );
    }
    // Every list answer carries the collection's ETag.
    let etag = s
        .get("/objects?collection=p&limit=1")
        .header("etag")
        .map(str::to_string);
    assert_eq!(
        etag,
        s.get("/objects?collection=p")
            .header("etag")
            .map(str::to_string)
    );
}

#[test]
fn a_large_list_is_streamed_from_one_snapshot() {
    let (_dir, s) = server();
    fill(
        &s,
        "big",
        (0..5000).map(|i| format!("k{i:05}")),
        &json!({"n": 1}),
    );
    let resp = s.get("/objects?collection=big");
    assert_eq!(
        resp.header("transfer-encoding"),
        Some("chunked"),
        "streamed"
    );
    assert!(resp.header("etag").is_some());
    let list = resp.json();
    assert_eq!(list["count"], 5000);
    assert_eq!(list["objects"].as_object().unwrap().len(), 5000);
    assert_eq!(list["objects"]["k04999"], json!({"n": 1}));
    let keys = s
        .get("/objects?collection=big&keys_only=true&prefix=k049")
        .json();
    assert_eq!(keys["count"], 100);
    let small = s.get("/objects?collection=big&prefix=k0000");
    assert!(
        small.header("content-length").is_some(),
        "small lists keep a Content-Length"
    );
    assert_eq!(small.json()["count"], 10);
}

#[test]
fn a_client_reading_a_streamed_list_slowly_does_not_stop_writes() {
    let (_dir, s) = server();
    let value = json!("v".repeat(1000));
    fill(&s, "big", (0..20_000).map(|i| format!("k{i:05}")), &value);
    let mut slow = s.connect();
    slow.write_all(b"GET /objects?collection=big HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 512];
    let n = slow.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    // 20 MB are on their way and the client reads no more; writes go on.
    let started = Instant::now();
    for i in 0..200 {
        let body = json!({"key": i.to_string(), "value": i}).to_string();
        let resp = s.put("/objects?collection=other", &body);
        assert_eq!(resp.status, 200);
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(s.get("/collections/other").json()["count"], 200);
    // The slow client still gets the whole list, from the snapshot it started with.
    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).unwrap();
    assert!(rest.len() > 20_000_000);
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn an_object_with_a_ttl_vanishes_from_every_read_when_it_expires() {
    let (_dir, s) = server();
    let resp = s.put(
        "/objects?collection=sessions",
        r#"{"key":"s1","value":{"user":"ann"},"ttl":1}"#,
    );
    assert_eq!(resp.status, 200);
    let put_at = Instant::now();
    s.put(
        "/objects?collection=sessions",
        r#"{"key":"keep","value":1}"#,
    );
    let got = s.get("/objects/s1?collection=sessions");
    assert_eq!(got.status, 200, "readable at once");
    let expires: f64 = got.header("kv-expires-at").unwrap().parse().unwrap();
    assert!(
        expires >= unix_now() && expires <= unix_now() + 2.0,
        "{expires}"
    );
    assert_eq!(s.get("/objects?collection=sessions").json()["count"], 2);
    assert!(eventually(Duration::from_secs(5), || {
        s.get("/objects/s1?collection=sessions").status == 404
    }));
    assert!(
        put_at.elapsed() >= Duration::from_millis(900),
        "not before its time"
    );
    // Strict: every read agrees at once.
    assert_eq!(
        s.get("/objects?collection=sessions").json(),
        json!({"count": 1, "objects": {"keep": 1}})
    );
    let batch = json!({"ops": [{"op": "get", "key": "s1", "collection": "sessions"}]}).to_string();
    assert_eq!(
        s.request("POST", "/batch", Some(batch.as_bytes())).json()["results"][0]["found"],
        false
    );
    // Counts and the feed catch up within a second or two.
    assert!(eventually(Duration::from_secs(2), || {
        s.get("/collections/sessions").json()["count"] == 1
    }));
    let feed = s.get("/changes?since=0&collection=sessions").json();
    let expired = feed["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "s1")
        .cloned()
        .unwrap();
    assert_eq!(expired["op"], "delete");
    assert_eq!(expired["expired"], true);
    assert_eq!(expired["rev"], 3, "a revision of its own");
}

#[test]
fn a_put_without_ttl_makes_an_object_permanent_and_expiry_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let expires = {
        let mut s = TestServer::start(dir.path());
        s.put("/objects", r#"{"key":"a","value":1,"ttl":1}"#);
        s.put("/objects", r#"{"key":"a","value":2}"#);
        assert_eq!(s.get("/objects/a").header("kv-expires-at"), None);
        s.put("/objects", r#"{"key":"b","value":1,"ttl":3600,"x":0}"#);
        s.put("/objects", r#"{"key":"n","value":1,"ttl":null}"#);
        let feed = s.get("/changes?collection=default").json();
        let b = feed["changes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["key"] == "b")
            .cloned()
            .unwrap();
        let expires = s
            .get("/objects/b")
            .header("kv-expires-at")
            .unwrap()
            .to_string();
        assert_eq!(
            b["expires_at"].to_string(),
            expires,
            "the feed carries expires_at"
        );
        assert!(s.terminate(Duration::from_secs(10)).success());
        expires
    };
    let s = TestServer::start(dir.path());
    assert_eq!(
        s.get("/objects/b").header("kv-expires-at"),
        Some(expires.as_str())
    );
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(s.get("/objects/a").json()["value"], 2, "permanent again");
    assert_eq!(s.get("/objects/n").header("kv-expires-at"), None);
}

#[test]
fn an_expired_object_is_absent_for_preconditions_too() {
    let (_dir, s) = server();
    s.put("/objects", r#"{"key":"lock","value":"me","ttl":1}"#);
    let taken = s.request_with(
        "PUT",
        "/objects",
        &[("If-None-Match", "*")],
        Some(r#"{"key":"lock","value":"you","ttl":60}"#),
    );
    assert_eq!(taken.status, 412, "held while it lives");
    assert!(eventually(Duration::from_secs(5), || {
        s.request_with(
            "PUT",
            "/objects",
            &[("If-None-Match", "*")],
            Some(r#"{"key":"lock","value":"you","ttl":60}"#),
        )
        .status
            == 200
    }));
    assert_eq!(s.get("/objects/lock").json()["value"], "you");
}

#[test]
fn bad_ttls_are_refused() {
    let (_dir, s) = server();
    for ttl in [
        "0",
        "-1",
        "1.5",
        "1.0",
        "1e3",
        "\"1\"",
        "true",
        "315360001",
        "[]",
    ] {
        let resp = s.put(
            "/objects",
            &format!(r#"{{"key":"k","value":1,"ttl":{ttl}}}"#),
        );
        assert_eq!(
            (resp.status, resp.json()["code"].clone()),
            (400, json!("invalid_ttl")),
            "ttl {ttl}"
        );
        let batch = format!(
            r#"{{"ops":[{{"op":"put","key":"a","value":1}},{{"op":"put","key":"k","value":1,"ttl":{ttl}}}]}}"#
        );
        let resp = s.request("POST", "/batch", Some(batch.as_bytes()));
        assert_eq!(
            (
                resp.status,
                resp.json()["code"].clone(),
                resp.json()["index"].clone()
            ),
            (400, json!("invalid_ttl"), json!(1)),
            "batch ttl {ttl}"
        );
    }
    assert_eq!(s.get("/objects/k").status, 404);
    assert_eq!(
        s.put("/objects", r#"{"key":"k","value":1,"ttl":315360000}"#)
            .status,
        200
    );
}
