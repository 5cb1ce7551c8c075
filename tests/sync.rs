//! End-to-end tests of kv as a sync server: revisions and ETags, conditional requests, the change
//! feed (polling, long-polling, Server-Sent Events), its retention, and the sync property: a
//! follower that applies the feed ends with exactly the server's data.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, TestServer, eventually};
use serde_json::{Value, json};

fn server_with(env: &[(&str, &str)]) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), env);
    (dir, server)
}

fn put(s: &Client, collection: &str, key: &str, value: Value) -> u64 {
    let resp = s.put(
        &format!("/objects?collection={collection}"),
        &json!({"key": key, "value": value}).to_string(),
    );
    assert_eq!(
        resp.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    let rev = resp.json()["rev"].as_u64().unwrap();
    assert_eq!(resp.header("etag"), Some(format!("\"{rev}\"").as_str()));
    rev
}

#[test]
fn every_write_gets_the_next_revision_and_reads_carry_it_as_etag() {
    let (_dir, s) = server_with(&[]);
    assert_eq!(put(&s, "c", "a", json!(1)), 1);
    assert_eq!(put(&s, "c", "b", json!(2)), 2);
    assert_eq!(put(&s, "c", "a", json!(3)), 3);
    let get = s.get("/objects/a?collection=c");
    assert_eq!(get.header("etag"), Some("\"3\""));
    assert_eq!(
        get.json(),
        json!({"key": "a", "value": 3}),
        "body unchanged"
    );
    let head = s.request("HEAD", "/objects/a?collection=c", None);
    assert_eq!((head.status, head.header("etag")), (200, Some("\"3\"")));
    let deleted = s.delete("/objects/b?collection=c");
    assert_eq!(
        deleted.json(),
        json!({"message": "Object deleted successfully", "key": "b", "rev": 4})
    );
    assert_eq!(s.delete("/objects/b?collection=c").status, 404);
    assert_eq!(put(&s, "d", "x", json!(null)), 5, "a miss took no revision");
    let list = s.get("/objects?collection=c");
    assert_eq!(
        list.header("etag"),
        Some("\"4\""),
        "the collection's latest change"
    );
    assert_eq!(
        s.get("/objects?collection=never").header("etag"),
        Some("\"0\"")
    );
    assert_eq!(s.get("/collections/c").json()["rev"], 4);
}

#[test]
fn conditional_reads_answer_304() {
    let (_dir, s) = server_with(&[]);
    put(&s, "default", "k", json!("v"));
    for tag in ["\"1\"", "W/\"1\"", "\"7\", \"1\"", "*"] {
        let resp = s.request_with("GET", "/objects/k", &[("If-None-Match", tag)], None);
        assert_eq!(resp.status, 304, "{tag}");
        assert!(resp.body.is_empty());
        assert_eq!(resp.header("etag"), Some("\"1\""));
    }
    let resp = s.request_with("GET", "/objects/k", &[("If-None-Match", "\"2\"")], None);
    assert_eq!(resp.status, 200);
    let resp = s.request_with("GET", "/objects/nope", &[("If-None-Match", "*")], None);
    assert_eq!(resp.status, 404);
    let list = s.request_with("GET", "/objects", &[("If-None-Match", "\"1\"")], None);
    assert_eq!((list.status, list.header("etag")), (304, Some("\"1\"")));
    put(&s, "default", "j", json!(1));
    let list = s.request_with("GET", "/objects", &[("If-None-Match", "\"1\"")], None);
    assert_eq!((list.status, list.json()["count"].clone()), (200, json!(2)));
    let resp = s.request_with("GET", "/objects/k", &[("If-Match", "\"9\"")], None);
    assert_eq!(resp.status, 412);
}

#[test]
fn conditional_writes_succeed_only_when_their_precondition_holds() {
    let (_dir, s) = server_with(&[]);
    let put_if = |header: &str, tag: &str, value: i64| {
        s.request_with(
            "PUT",
            "/objects",
            &[(header, tag)],
            Some(&json!({"key": "k", "value": value}).to_string()),
        )
    };
    // Create-only.
    assert_eq!(put_if("If-None-Match", "*", 1).status, 200);
    let resp = put_if("If-None-Match", "*", 2);
    assert_eq!(resp.status, 412);
    assert_eq!(
        resp.json(),
        json!({"error": resp.json()["error"], "code": "precondition_failed", "key": "k", "current_rev": 1})
    );
    // Compare-and-swap.
    assert_eq!(put_if("If-Match", "\"1\"", 3).status, 200);
    assert_eq!(put_if("If-Match", "\"1\"", 4).json()["current_rev"], 2);
    assert_eq!(put_if("If-Match", "\"5\", \"2\"", 5).status, 200);
    assert_eq!(
        put_if("If-Match", "W/\"3\"", 6).status,
        412,
        "weak never matches"
    );
    assert_eq!(put_if("If-Match", "*", 7).status, 200);
    assert_eq!(put_if("If-None-Match", "\"4\"", 8).status, 412);
    assert_eq!(put_if("If-None-Match", "\"1\"", 9).status, 200);
    assert_eq!(s.get("/objects/k").json()["value"], 9);
    // Against an absent key.
    let absent = s.request_with(
        "PUT",
        "/objects",
        &[("If-Match", "*")],
        Some(r#"{"key":"new","value":1}"#),
    );
    assert_eq!(absent.status, 412);
    assert_eq!(absent.json()["current_rev"], Value::Null);
    let del = s.request_with("DELETE", "/objects/new", &[("If-Match", "\"1\"")], None);
    assert_eq!(
        (del.status, del.json()["code"].clone()),
        (412, json!("precondition_failed"))
    );
    let del = s.request_with("DELETE", "/objects/k", &[("If-None-Match", "\"5\"")], None);
    assert_eq!(del.status, 412);
    let del = s.request_with("DELETE", "/objects/k", &[("If-Match", "\"5\"")], None);
    assert_eq!(del.json()["rev"], 6);
    assert_eq!(s.get("/objects/k").status, 404);
    // Malformed headers, on any method.
    for bad in ["", "5", "\"5", "*, \"5\"", "\"5\" \"6\""] {
        for (method, target, header, body) in [
            ("GET", "/objects/k", "If-Match", None),
            ("GET", "/objects", "If-None-Match", None),
            ("DELETE", "/objects/k", "If-Match", None),
            (
                "PUT",
                "/objects",
                "If-None-Match",
                Some(r#"{"key":"k","value":1}"#),
            ),
        ] {
            let resp = s.request_with(method, target, &[(header, bad)], body);
            assert_eq!(
                (resp.status, resp.json()["code"].clone()),
                (400, json!("invalid_precondition")),
                "{method} {target} {header}: {bad:?}"
            );
        }
    }
    assert_eq!(
        s.get("/objects/k").status,
        404,
        "no malformed write went through"
    );
}

#[test]
fn batch_conditions_apply_all_or_nothing() {
    let (_dir, s) = server_with(&[]);
    put(&s, "default", "a", json!(1));
    let batch = |ops: Value| {
        s.request(
            "POST",
            "/batch",
            Some(json!({"ops": ops}).to_string().as_bytes()),
        )
    };
    let resp = batch(json!([
        {"op": "put", "key": "b", "value": 2, "if_rev": 0},
        {"op": "check", "key": "a", "if_rev": 1},
        {"op": "delete", "key": "a", "if_rev": 1}
    ]));
    assert_eq!(
        resp.json()["results"],
        json!([
            {"op": "put", "key": "b", "status": 200, "rev": 2},
            {"op": "check", "key": "a", "ok": true},
            {"op": "delete", "key": "a", "found": true, "rev": 3}
        ])
    );
    let resp = batch(json!([
        {"op": "put", "key": "c", "value": 3},
        {"op": "put", "key": "b", "value": 4, "if_rev": 2},
        {"op": "check", "key": "a", "if_rev": 1}
    ]));
    assert_eq!(resp.status, 412);
    let body = resp.json();
    assert_eq!(
        (
            &body["code"],
            &body["index"],
            &body["key"],
            &body["current_rev"]
        ),
        (
            &json!("precondition_failed"),
            &json!(2),
            &json!("a"),
            &Value::Null
        )
    );
    assert_eq!(s.get("/objects/c").status, 404, "nothing applied");
    assert_eq!(s.get("/objects/b").json()["value"], 2);
    for (op, index) in [
        (json!({"op": "get", "key": "a", "if_rev": 1}), 0),
        (json!({"op": "check", "key": "a"}), 0),
        (
            json!({"op": "put", "key": "a", "value": 1, "if_rev": -1}),
            0,
        ),
        (json!({"op": "delete", "key": "a", "if_rev": 1.5}), 0),
        (json!({"op": "delete", "key": "a", "if_rev": "1"}), 0),
    ] {
        let resp = batch(json!([op]));
        assert_eq!(
            (
                resp.status,
                resp.json()["code"].clone(),
                resp.json()["index"].clone()
            ),
            (400, json!("invalid_op"), json!(index)),
            "{op}"
        );
    }
    assert_eq!(
        s.changes("")["last_rev"],
        3,
        "no failed batch took a revision"
    );
}

#[test]
fn the_feed_bootstraps_a_client_and_pages_in_revision_order() {
    let (_dir, s) = server_with(&[]);
    put(&s, "users", "u1", json!({"n": 1}));
    put(&s, "users", "u2", json!(2));
    put(&s, "teams", "t1", json!(3));
    put(&s, "users", "u1", json!({"n": 4}));
    s.delete("/objects/u2?collection=users");
    assert_eq!(
        s.changes("since=0"),
        json!({"changes": [
            {"rev": 3, "collection": "teams", "key": "t1", "op": "put", "value": 3},
            {"rev": 4, "collection": "users", "key": "u1", "op": "put", "value": {"n": 4}},
            {"rev": 5, "collection": "users", "key": "u2", "op": "delete"}
        ], "last_rev": 5, "more": false})
    );
    assert_eq!(
        s.changes("since=3&collection=users&values=false"),
        json!({"changes": [
            {"rev": 4, "collection": "users", "key": "u1", "op": "put"},
            {"rev": 5, "collection": "users", "key": "u2", "op": "delete"}
        ], "last_rev": 5, "more": false})
    );
    let page = s.changes("limit=2");
    assert_eq!(
        (page["last_rev"].clone(), page["more"].clone()),
        (json!(4), json!(true))
    );
    let page = s.changes("since=4&limit=1");
    assert_eq!(
        (page["last_rev"].clone(), page["more"].clone()),
        (json!(5), json!(false))
    );
    assert_eq!(
        s.changes("since=5"),
        json!({"changes": [], "last_rev": 5, "more": false})
    );
    assert_eq!(s.changes("since=4&collection=teams")["last_rev"], 5);
    assert_eq!(s.delete("/collections/users").json()["rev"], 6);
    assert_eq!(
        s.changes("since=0")["changes"],
        json!([
            {"rev": 3, "collection": "teams", "key": "t1", "op": "put", "value": 3},
            {"rev": 6, "collection": "users", "op": "delete_collection"}
        ])
    );
    for (query, code) in [
        ("since=-1", "invalid_since"),
        ("since=x", "invalid_since"),
        ("limit=0", "invalid_limit"),
        ("limit=10001", "invalid_limit"),
        ("wait=61", "invalid_wait"),
        ("wait=1.5", "invalid_wait"),
        ("values=yes", "invalid_values"),
        ("collection=a%00b", "invalid_collection"),
    ] {
        let resp = s.get(&format!("/changes?{query}"));
        assert_eq!(
            (resp.status, resp.json()["code"].clone()),
            (400, json!(code)),
            "{query}"
        );
    }
    assert_eq!(s.request("PUT", "/changes", None).status, 405);
}

#[test]
fn a_long_poll_wakes_on_a_write_to_its_collection_and_times_out_empty() {
    let (_dir, s) = server_with(&[]);
    put(&s, "a", "k", json!(1));
    let addr = s.addr();
    let started = Instant::now();
    let poll = thread::spawn(move || {
        let s = TestServer::client(&addr);
        let body = s.changes("since=1&collection=a&wait=20");
        (body, Instant::now())
    });
    // A write elsewhere does not answer it; one to its collection does, within milliseconds.
    thread::sleep(Duration::from_millis(300));
    put(&s, "b", "k", json!(2));
    thread::sleep(Duration::from_millis(300));
    assert!(!poll.is_finished(), "woken by another collection's write");
    let wrote = Instant::now();
    put(&s, "a", "k", json!(3));
    let (body, answered) = poll.join().unwrap();
    assert_eq!(body["changes"][0]["rev"], 3);
    assert!(
        answered.duration_since(wrote) < Duration::from_secs(1),
        "woke after {:?}",
        answered.duration_since(wrote)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let started = Instant::now();
    let body = s.changes("since=3&wait=1");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(body, json!({"changes": [], "last_rev": 3, "more": false}));
}

#[test]
fn waiters_are_capped_but_an_answer_at_hand_is_never_refused() {
    let (_dir, s) = server_with(&[("KV_MAX_WAITERS", "1")]);
    put(&s, "c", "k", json!(1));
    let addr = s.addr();
    // The waiter retries while the probe below holds the only lease.
    let poll = thread::spawn(move || {
        let c = TestServer::client(&addr);
        loop {
            let resp = c.get("/changes?since=1&wait=30");
            if resp.status != 503 {
                return resp.json();
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    assert!(eventually(Duration::from_secs(10), || {
        s.get("/changes?since=1&wait=1").status == 503
    }));
    let resp = s.get("/changes?since=1&wait=5");
    assert_eq!(
        (
            resp.status,
            resp.json()["code"].clone(),
            resp.header("retry-after")
        ),
        (503, json!("too_many_waiters"), Some("1"))
    );
    assert_eq!(
        s.get("/changes?since=0&wait=5").status,
        200,
        "has an answer"
    );
    let sse = s.events("/changes?since=1", &[]);
    assert!(sse.head[0].contains("503"), "{:?}", sse.head);
    put(&s, "c", "k", json!(2));
    assert_eq!(poll.join().unwrap()["last_rev"], 2);
}

#[test]
fn sigterm_answers_waiters_at_once_and_exits_zero() {
    let (_dir, mut s) = server_with(&[]);
    put(&s, "c", "k", json!(1));
    let addr = s.addr();
    let polls: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || TestServer::client(&addr).get("/changes?since=1&wait=60"))
        })
        .collect();
    let mut stream = s.events("/changes?since=1", &[]);
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = s.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for poll in polls {
        let resp = poll.join().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["changes"], json!([]));
    }
    assert!(stream.next_event().is_none(), "the stream ended");
}

#[test]
fn forgotten_deletions_answer_410_and_since_0_starts_over() {
    let (_dir, s) = server_with(&[("KV_CHANGES_RETENTION_SECS", "1")]);
    put(&s, "c", "a", json!(1));
    put(&s, "c", "b", json!(2));
    assert_eq!(s.delete("/objects/a?collection=c").json()["rev"], 3);
    assert_eq!(s.changes("since=1")["changes"][1]["op"], "delete");
    assert!(
        eventually(Duration::from_secs(10), || s.get("/changes?since=1").status
            == 410),
        "the deletion was never forgotten"
    );
    let resp = s.get("/changes?since=2");
    assert_eq!(resp.json()["code"], "changes_compacted");
    assert_eq!(resp.json()["oldest_rev"], 3);
    assert_eq!(s.changes("since=3")["changes"], json!([]));
    assert_eq!(
        s.changes("since=0")["changes"],
        json!([{"rev": 2, "collection": "c", "key": "b", "op": "put", "value": 2}])
    );
    let mut sse = s.events("/changes?since=1", &[]);
    let event = sse.next_event().unwrap();
    assert_eq!(event.event.as_deref(), Some("compacted"));
    assert_eq!(
        serde_json::from_str::<Value>(&event.data).unwrap(),
        json!({"code": "changes_compacted", "oldest_rev": 3})
    );
    assert!(sse.next_event().is_none(), "closed after compacted");
}

#[test]
fn revisions_survive_a_restart_and_keep_increasing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = TestServer::start(dir.path());
        put(&s, "c", "a", json!(1));
        put(&s, "c", "b", json!(1));
        s.delete("/objects/b?collection=c");
        assert!(s.terminate(Duration::from_secs(10)).success());
    }
    let s = TestServer::start(dir.path());
    assert_eq!(
        s.get("/objects/a?collection=c").header("etag"),
        Some("\"1\"")
    );
    assert_eq!(s.changes("since=0")["last_rev"], 3);
    assert_eq!(put(&s, "c", "z", json!(1)), 4);
}

#[test]
fn an_event_stream_sends_history_then_live_changes_and_resumes_from_last_event_id() {
    let (_dir, s) = server_with(&[]);
    put(&s, "c", "a", json!(1));
    put(&s, "other", "x", json!(1));
    let mut sse = s.events("/changes?collection=c", &[]);
    assert!(sse.head[0].contains("200"), "{:?}", sse.head);
    assert!(
        sse.head
            .iter()
            .any(|h| h.eq_ignore_ascii_case("content-type: text/event-stream"))
    );
    sse.set_timeout(Duration::from_secs(10));
    let first = sse.next_event().unwrap();
    assert_eq!(first.id.as_deref(), Some("1"));
    assert_eq!(first.event.as_deref(), Some("change"));
    assert_eq!(
        serde_json::from_str::<Value>(&first.data).unwrap(),
        json!({"rev": 1, "collection": "c", "key": "a", "op": "put", "value": 1})
    );
    put(&s, "c", "b", json!(2));
    let live = sse.next_event().unwrap();
    assert_eq!(live.id.as_deref(), Some("3"));
    let mut resumed = s.events("/changes", &[("Last-Event-ID", "2")]);
    resumed.set_timeout(Duration::from_secs(10));
    assert_eq!(resumed.next_event().unwrap().id.as_deref(), Some("3"));
}

/// What a follower knows: collection -> key -> value.
type Replica = BTreeMap<String, BTreeMap<String, Value>>;

fn apply(replica: &mut Replica, change: &Value) {
    let collection = change["collection"].as_str().unwrap().to_string();
    match change["op"].as_str().unwrap() {
        "put" => {
            let key = change["key"].as_str().unwrap().to_string();
            replica
                .entry(collection)
                .or_default()
                .insert(key, change["value"].clone());
        }
        "delete" => {
            if let Some(c) = replica.get_mut(&collection) {
                c.remove(change["key"].as_str().unwrap());
            }
        }
        "delete_collection" => {
            replica.remove(&collection);
        }
        other => panic!("unknown op {other}"),
    }
}

fn server_data(s: &Client) -> Replica {
    let mut data = Replica::new();
    for c in s.get("/collections").json()["collections"]
        .as_array()
        .unwrap()
    {
        let name = c["name"].as_str().unwrap();
        let list = s.get(&format!("/objects?collection={name}")).json();
        let objects = list["objects"].as_object().unwrap();
        data.insert(
            name.to_string(),
            objects
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
    }
    data
}

/// Eight writers of random puts, deletes, conditional puts, batches and the odd collection delete
/// over three collections, for `duration`; returns the highest revision acknowledged.
fn write_randomly(s: &TestServer, duration: Duration) -> u64 {
    let highest = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let addr = s.addr();
            let highest = highest.clone();
            thread::spawn(move || {
                let s = TestServer::client(&addr);
                let mut seed = w * 7919 + 13;
                let mut next = move |n: u64| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 33) % n
                };
                let deadline = Instant::now() + duration;
                while Instant::now() < deadline {
                    let collection = ["c0", "c1", "c2"][next(3) as usize];
                    let key = format!("k{}", next(20));
                    let target = format!("/objects?collection={collection}");
                    let body = json!({"key": key, "value": {"w": w, "n": next(1000)}}).to_string();
                    let resp = match next(20) {
                        0..=8 => s.put(&target, &body),
                        9..=12 => s.delete(&format!("/objects/{key}?collection={collection}")),
                        13..=15 => {
                            let current = s.get(&format!("/objects/{key}?collection={collection}"));
                            let tag = current.header("etag").unwrap_or("\"0\"").to_string();
                            s.request_with("PUT", &target, &[("If-Match", &tag)], Some(&body))
                        }
                        16..=18 => {
                            let ops = json!({"collection": collection, "ops": [
                                {"op": "put", "key": key, "value": w},
                                {"op": "delete", "key": format!("k{}", next(20))},
                                {"op": "put", "key": format!("k{}", next(20)), "value": [w], "collection": "c2"}
                            ]});
                            s.request("POST", "/batch", Some(ops.to_string().as_bytes()))
                        }
                        _ => s.delete(&format!("/collections/{collection}")),
                    };
                    assert!(
                        matches!(resp.status, 200 | 404 | 412),
                        "{}: {:?}",
                        resp.status,
                        String::from_utf8_lossy(&resp.body)
                    );
                    if resp.status == 200 {
                        let body = resp.json();
                        let results = body["results"].as_array().cloned().unwrap_or_default();
                        let rev = results
                            .iter()
                            .chain(std::iter::once(&body))
                            .filter_map(|r| r["rev"].as_u64())
                            .max()
                            .unwrap_or(0);
                        highest.fetch_max(rev, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    highest.load(Ordering::SeqCst)
}

/// Follows the feed by long-polling with `limit` until told to stop and caught up.
fn follow_by_polling(s: &TestServer, limit: usize) {
    let addr = s.addr();
    let done = Arc::new(AtomicBool::new(false));
    let replica = Arc::new(Mutex::new(Replica::new()));
    let last = Arc::new(AtomicU64::new(0));
    let follower = {
        let (done, replica, last) = (done.clone(), replica.clone(), last.clone());
        thread::spawn(move || {
            let s = TestServer::client(&addr);
            let mut since = 0;
            loop {
                let page = s.changes(&format!("since={since}&wait=5&limit={limit}"));
                let mut replica = replica.lock().unwrap();
                for change in page["changes"].as_array().unwrap() {
                    let rev = change["rev"].as_u64().unwrap();
                    assert!(rev > since, "revision {rev} after {since}");
                    apply(&mut replica, change);
                    since = rev;
                }
                since = page["last_rev"].as_u64().unwrap().max(since);
                last.store(since, Ordering::SeqCst);
                if done.load(Ordering::SeqCst) && !page["more"].as_bool().unwrap() {
                    return;
                }
            }
        })
    };
    let highest = write_randomly(s, Duration::from_secs(3));
    assert!(eventually(Duration::from_secs(20), || last
        .load(Ordering::SeqCst)
        >= highest));
    done.store(true, Ordering::SeqCst);
    put(s, "wake", "up", json!(1));
    follower.join().unwrap();
    let mut replica = replica.lock().unwrap().clone();
    replica.retain(|_, objects| !objects.is_empty());
    replica.remove("wake");
    let mut data = server_data(s);
    data.remove("wake");
    assert_eq!(replica, data);
}

#[test]
fn a_long_polling_follower_ends_with_exactly_the_servers_data() {
    let (_dir, s) = server_with(&[]);
    follow_by_polling(&s, 1000);
}

#[test]
fn a_follower_with_small_pages_ends_with_exactly_the_servers_data() {
    let (_dir, s) = server_with(&[]);
    follow_by_polling(&s, 7);
}

#[test]
fn an_event_stream_follower_ends_with_exactly_the_servers_data() {
    let (_dir, s) = server_with(&[]);
    let mut sse = s.events("/changes?since=0", &[]);
    sse.set_timeout(Duration::from_secs(20));
    let highest = write_randomly(&s, Duration::from_secs(3));
    let mut replica = Replica::new();
    let mut last = 0;
    while last < highest {
        let event = sse.next_event().expect("the stream ended early");
        if event.comment.is_some() {
            continue;
        }
        let change: Value = serde_json::from_str(&event.data).unwrap();
        let rev = change["rev"].as_u64().unwrap();
        assert!(rev > last);
        assert_eq!(event.id, Some(rev.to_string()));
        apply(&mut replica, &change);
        last = rev;
    }
    replica.retain(|_, objects| !objects.is_empty());
    assert_eq!(replica, server_data(&s));
}

#[test]
fn compare_and_swap_counts_exactly_and_blind_writes_lose_updates() {
    let (_dir, s) = server_with(&[]);
    let increments = |conditional: bool| {
        put(&s, "default", "counter", json!(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let addr = s.addr();
                thread::spawn(move || {
                    let s = TestServer::client(&addr);
                    for _ in 0..20 {
                        loop {
                            let current = s.get("/objects/counter");
                            let n = current.json()["value"].as_i64().unwrap();
                            let tag = current.header("etag").unwrap().to_string();
                            let body = json!({"key": "counter", "value": n + 1}).to_string();
                            let headers: &[(&str, &str)] = if conditional {
                                &[("If-Match", &tag)]
                            } else {
                                &[]
                            };
                            let resp = s.request_with("PUT", "/objects", headers, Some(&body));
                            match resp.status {
                                200 => break,
                                412 => continue,
                                other => panic!("{other}"),
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        s.get("/objects/counter").json()["value"].as_i64().unwrap()
    };
    assert_eq!(increments(true), 320);
    let blind = increments(false);
    // Shown, not asserted: how many of 320 increments survive without If-Match.
    println!("without If-Match: {blind} of 320 increments survived");
}
