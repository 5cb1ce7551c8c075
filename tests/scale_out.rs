//! End-to-end tests of several kv nodes on one PostgreSQL database: a follower of one node's feed
//! ends with exactly the data written through all of them, compare-and-swap through different
//! nodes never lets two writers win, an object expires once though every node sweeps, a deletion
//! one node forgets is forgotten by all, a long-poll on one node wakes on a write through another,
//! and killing a node loses no acknowledged write. They need PostgreSQL (`KV_TEST_POSTGRES_URL`,
//! see .ci/postgres); on SQLite each says so and returns.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{TestServer, eventually};
use serde_json::{Value, json};

/// The most each write transaction sleeps before COMMIT, so that commits of different nodes
/// overlap and finish out of the order in which they began.
const WRITE_DELAY_MS: &str = "5";

/// `n` kv nodes, each with a data directory of its own, on one new database; None on SQLite.
fn nodes(n: usize, env: &[(&str, &str)]) -> Option<(Vec<tempfile::TempDir>, Vec<TestServer>)> {
    common::postgres_only("several kv nodes on one database")?;
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let url = common::database_url(dirs[0].path()).expect("on PostgreSQL");
    let nodes = dirs
        .iter()
        .map(|dir| TestServer::start_node(dir.path(), &url, env))
        .collect();
    Some((dirs, nodes))
}

/// One acknowledged write: its key, its revision, the value it stored (None for a delete) and
/// when its request was sent.
#[derive(Debug, Clone)]
struct Acked {
    key: String,
    rev: u64,
    value: Option<Value>,
    sent: Instant,
}

/// One answer of the feed as the follower got it.
#[derive(Debug)]
struct Page {
    since: u64,
    last_rev: u64,
    changes: Vec<Value>,
    received: Instant,
}

/// Six writers, two per node, PUT and DELETE over twelve keys of collection `c` for `duration`;
/// returns every write that got a 200, by revision.
fn write_through_all(nodes: &[TestServer], duration: Duration) -> BTreeMap<u64, Acked> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..6u64)
        .map(|w| {
            let addr = nodes[w as usize % nodes.len()].addr();
            let acked = acked.clone();
            thread::spawn(move || {
                let s = TestServer::client(&addr);
                let mut seed = w * 7919 + 13;
                let mut next = move |n: u64| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 33) % n
                };
                let deadline = Instant::now() + duration;
                let mut i = 0;
                while Instant::now() < deadline {
                    i += 1;
                    let key = format!("k{}", next(12));
                    let value = json!({"w": w, "i": i});
                    let sent = Instant::now();
                    let (resp, stored) = if next(3) < 2 {
                        let body = json!({"key": key, "value": value}).to_string();
                        (s.put("/objects?collection=c", &body), Some(value))
                    } else {
                        (s.delete(&format!("/objects/{key}?collection=c")), None)
                    };
                    match resp.status {
                        200 => {
                            let rev = resp.json()["rev"].as_u64().expect("a rev");
                            acked.lock().unwrap().push(Acked {
                                key,
                                rev,
                                value: stored,
                                sent,
                            });
                        }
                        404 if stored.is_none() => {}
                        other => panic!("{other}: {:?}", String::from_utf8_lossy(&resp.body)),
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut by_rev = BTreeMap::new();
    for write in acked.lock().unwrap().drain(..) {
        let rev = write.rev;
        if let Some(earlier) = by_rev.insert(rev, write) {
            panic!(
                "revision {rev} was given to two writes: {earlier:?} and {:?}",
                by_rev[&rev]
            );
        }
    }
    by_rev
}

#[test]
fn a_follower_of_one_node_ends_with_exactly_what_three_nodes_wrote() {
    let Some((_dirs, nodes)) = nodes(3, &[("KV_TEST_WRITE_DELAY_MS", WRITE_DELAY_MS)]) else {
        return;
    };
    let done = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let follower = {
        let (addr, done, last) = (nodes[1].addr(), done.clone(), last.clone());
        thread::spawn(move || {
            let s = TestServer::client(&addr);
            let mut since = 0;
            let mut replica = BTreeMap::<String, Value>::new();
            let mut pages = Vec::new();
            loop {
                // Small pages, so that `more` and the page boundaries are exercised too.
                let page = s.changes(&format!("since={since}&collection=c&wait=2&limit=20"));
                let received = Instant::now();
                let mut seen = since;
                for change in page["changes"].as_array().unwrap() {
                    let rev = change["rev"].as_u64().unwrap();
                    assert!(rev > seen, "revision {rev} after {seen}");
                    seen = rev;
                    let key = change["key"].as_str().unwrap().to_string();
                    match change["op"].as_str().unwrap() {
                        "put" => replica.insert(key, change["value"].clone()),
                        "delete" => replica.remove(&key),
                        other => panic!("unexpected op {other}: {change}"),
                    };
                }
                let last_rev = page["last_rev"].as_u64().unwrap();
                assert!(
                    last_rev >= seen,
                    "last_rev {last_rev} below a change {seen}"
                );
                pages.push(Page {
                    since,
                    last_rev,
                    changes: page["changes"].as_array().unwrap().clone(),
                    received,
                });
                since = last_rev;
                last.store(since, Ordering::SeqCst);
                if done.load(Ordering::SeqCst) && !page["more"].as_bool().unwrap() {
                    return (replica, pages);
                }
            }
        })
    };
    let writes = write_through_all(&nodes, Duration::from_secs(3));
    let highest = *writes.keys().last().expect("some writes");
    assert!(
        eventually(Duration::from_secs(20), || last.load(Ordering::SeqCst)
            >= highest),
        "the follower stopped at {} of {highest}",
        last.load(Ordering::SeqCst)
    );
    done.store(true, Ordering::SeqCst);
    let (replica, pages) = follower.join().unwrap();

    // Gap-free: the writes took every revision from 1 to the highest, each once.
    let missing: Vec<u64> = (1..=highest).filter(|r| !writes.contains_key(r)).collect();
    assert!(missing.is_empty(), "no write got revisions {missing:?}");

    // Every change in the feed is the write that took its revision.
    let mut shown = BTreeSet::new();
    for change in pages.iter().flat_map(|p| &p.changes) {
        let rev = change["rev"].as_u64().unwrap();
        let write = &writes[&rev];
        assert_eq!(change["key"], json!(write.key), "{change}");
        match &write.value {
            Some(value) => assert_eq!((&change["op"], &change["value"]), (&json!("put"), value)),
            None => assert_eq!(change["op"], "delete", "{change}"),
        }
        shown.insert(rev);
    }
    // The feed leaves a revision out only for a key written again later, and that later write
    // must have been under way before the page that left it out was answered; otherwise the
    // revision was invisible when a higher one was read, and a follower would miss it for good.
    for page in &pages {
        for rev in page.since + 1..=page.last_rev {
            if shown.contains(&rev) {
                continue;
            }
            let skipped = &writes[&rev];
            let superseded = writes
                .range(rev + 1..)
                .any(|(_, w)| w.key == skipped.key && w.sent < page.received);
            assert!(
                superseded,
                "revision {rev} ({skipped:?}) is missing from the page ({}, {}] and nothing \
                 overwrote its key before that page was read",
                page.since, page.last_rev
            );
        }
    }

    // And the follower's copy is the data, as every node lists it.
    for node in &nodes {
        let list = node.get("/objects?collection=c").json();
        let data: BTreeMap<String, Value> = list["objects"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(replica, data);
        assert_eq!(
            node.changes(&format!("since={highest}"))["last_rev"],
            highest
        );
    }
    println!(
        "{} writes over 3 nodes, {} pages, {} changes shown",
        writes.len(),
        pages.len(),
        shown.len()
    );
}

#[test]
fn a_long_poll_on_one_node_wakes_on_a_write_through_another() {
    let Some((_dirs, nodes)) = nodes(2, &[]) else {
        return;
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(
        a.put("/objects?collection=a", r#"{"key":"k","value":1}"#)
            .status,
        200
    );
    let addr = b.addr();
    let poll = thread::spawn(move || {
        let body = TestServer::client(&addr).changes("since=1&collection=a&wait=30");
        (body, Instant::now())
    });
    // A write to another collection does not answer it.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        a.put("/objects?collection=b", r#"{"key":"k","value":2}"#)
            .status,
        200
    );
    thread::sleep(Duration::from_millis(700));
    assert!(!poll.is_finished(), "woken by another collection's write");
    let wrote = Instant::now();
    assert_eq!(
        a.put("/objects?collection=a", r#"{"key":"k","value":3}"#)
            .status,
        200
    );
    let (body, answered) = poll.join().unwrap();
    assert_eq!(
        body,
        json!({"changes": [{"rev": 3, "collection": "a", "key": "k", "op": "put", "value": 3}],
               "last_rev": 3, "more": false})
    );
    let latency = answered.duration_since(wrote);
    // Functional, not a speed limit: woken by the write, long before its 30 s were up.
    assert!(latency < Duration::from_secs(10), "woke after {latency:?}");
    println!("a write through node A woke node B's long-poll after {latency:?}");
}

#[test]
fn compare_and_swap_through_three_nodes_counts_exactly() {
    let Some((_dirs, nodes)) = nodes(3, &[("KV_TEST_WRITE_DELAY_MS", WRITE_DELAY_MS)]) else {
        return;
    };
    assert_eq!(
        nodes[0]
            .put("/objects", r#"{"key":"counter","value":0}"#)
            .status,
        200
    );
    let (threads, increments) = (6, 20);
    let conflicts = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let addr = nodes[t % nodes.len()].addr();
            let conflicts = conflicts.clone();
            thread::spawn(move || {
                let s = TestServer::client(&addr);
                for _ in 0..increments {
                    loop {
                        let current = s.get("/objects/counter");
                        let n = current.json()["value"].as_i64().unwrap();
                        let tag = current.header("etag").unwrap().to_string();
                        let body = json!({"key": "counter", "value": n + 1}).to_string();
                        let resp =
                            s.request_with("PUT", "/objects", &[("If-Match", &tag)], Some(&body));
                        match resp.status {
                            200 => break,
                            412 => conflicts.fetch_add(1, Ordering::SeqCst),
                            other => panic!("{other}: {:?}", String::from_utf8_lossy(&resp.body)),
                        };
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Two writers through different nodes never both win against the same revision.
    let expected = (threads * increments) as i64;
    for node in &nodes {
        let resp = node.get("/objects/counter");
        assert_eq!(resp.json()["value"], expected);
        assert_eq!(
            resp.header("etag"),
            Some(format!("\"{}\"", expected + 1).as_str())
        );
    }
    println!(
        "{expected} increments through 3 nodes, {} lost races answered 412",
        conflicts.load(Ordering::SeqCst)
    );
}

#[test]
fn objects_expire_once_though_every_node_sweeps() {
    let Some((_dirs, nodes)) = nodes(3, &[]) else {
        return;
    };
    let expiring = 30;
    for i in 0..expiring {
        let body = json!({"key": format!("t{i}"), "value": i, "ttl": 1}).to_string();
        assert_eq!(nodes[i % 3].put("/objects?collection=c", &body).status, 200);
    }
    assert_eq!(
        nodes[0]
            .put("/objects?collection=c", r#"{"key":"stays","value":1}"#)
            .status,
        200
    );
    for node in &nodes {
        assert!(
            eventually(Duration::from_secs(15), || node
                .get("/collections/c")
                .json()["count"]
                == 1),
            "{:?}",
            node.get("/collections/c").json()
        );
    }
    // Each expiry took one revision, whichever node's sweep found it first.
    let expected_rev = (expiring + 1 + expiring) as u64;
    for node in &nodes {
        let feed = node.changes("since=0");
        assert_eq!(feed["last_rev"], expected_rev, "{feed}");
        let entries = feed["changes"].as_array().unwrap();
        assert_eq!(entries.len(), expiring + 1, "{feed}");
        let expired = entries
            .iter()
            .filter(|c| c["expired"] == json!(true))
            .count();
        assert_eq!(expired, expiring, "{feed}");
        assert_eq!(node.get("/collections/c").json()["rev"], expected_rev);
    }
}

#[test]
fn deletions_forgotten_by_one_node_are_forgotten_by_all() {
    let Some((_dirs, nodes)) = nodes(2, &[("KV_CHANGES_RETENTION_SECS", "1")]) else {
        return;
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(
        a.put("/objects?collection=c", r#"{"key":"a","value":1}"#)
            .status,
        200
    );
    assert_eq!(
        b.put("/objects?collection=c", r#"{"key":"b","value":2}"#)
            .status,
        200
    );
    assert_eq!(a.delete("/objects/a?collection=c").json()["rev"], 3);
    for node in [a, b] {
        assert!(
            eventually(Duration::from_secs(10), || node
                .get("/changes?since=1")
                .status
                == 410),
            "the deletion was never forgotten"
        );
        let resp = node.get("/changes?since=2");
        assert_eq!(
            (
                resp.json()["code"].clone(),
                resp.json()["oldest_rev"].clone()
            ),
            (json!("changes_compacted"), json!(3))
        );
        assert_eq!(
            node.changes("since=0")["changes"],
            json!([{"rev": 2, "collection": "c", "key": "b", "op": "put", "value": 2}])
        );
    }
}

/// PUTs `body` to `addr` on a connection of its own; true when kv answered 200. Any failure
/// (refused, reset, cut off) is false: the node may be dead.
fn try_put(addr: &str, body: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let raw = format!(
        "PUT /objects?collection=crash HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(raw.as_bytes()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    response.starts_with(b"HTTP/1.1 200")
}

#[test]
fn killing_a_node_under_load_loses_no_acknowledged_write() {
    let Some((dirs, mut nodes)) = nodes(3, &[("KV_TEST_WRITE_DELAY_MS", WRITE_DELAY_MS)]) else {
        return;
    };
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
    // key -> value of every 200, and how many 200s each node gave.
    let acked = Arc::new(Mutex::new(BTreeMap::<String, Value>::new()));
    let per_node: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..6usize)
        .map(|w| {
            let (addrs, acked, per_node, stop) =
                (addrs.clone(), acked.clone(), per_node.clone(), stop.clone());
            thread::spawn(move || {
                // A client of one node that moves to the next when its node stops answering.
                let mut node = w % addrs.len();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("w{w}-{i}");
                    let value = json!({"w": w, "i": i, "node": node});
                    let body = json!({"key": key, "value": value}).to_string();
                    if try_put(&addrs[node], &body) {
                        acked.lock().unwrap().insert(key, value);
                        per_node[node].fetch_add(1, Ordering::SeqCst);
                    } else {
                        node = (node + 1) % addrs.len();
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let total = || {
        per_node
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .sum::<u64>()
    };
    assert!(
        eventually(Duration::from_secs(30), || per_node[2]
            .load(Ordering::SeqCst)
            >= 100),
        "node 2 acknowledged only {} writes",
        per_node[2].load(Ordering::SeqCst)
    );
    nodes[2].kill();
    let at_kill: Vec<u64> = per_node.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    // The other two go on answering, for the writers that were theirs and those that moved over.
    let survivors_moved_on = eventually(Duration::from_secs(30), || {
        (0..2).all(|n| per_node[n].load(Ordering::SeqCst) >= at_kill[n] + 100)
    });
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        survivors_moved_on,
        "after the kill at {at_kill:?} the nodes acknowledged only {:?}",
        per_node
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    );
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len() as u64, total());

    let check = |node: &TestServer, name: &str| {
        let listed = node.get("/objects?collection=crash").json();
        let stored = listed["objects"].as_object().unwrap();
        let lost: Vec<_> = acked
            .iter()
            .filter(|(k, v)| stored.get(k.as_str()) != Some(v))
            .collect();
        assert!(
            lost.is_empty(),
            "{name}: {} of {} acknowledged writes lost or changed, e.g. {:?}",
            lost.len(),
            acked.len(),
            lost.first()
        );
        assert_eq!(stored.len(), listed["count"].as_u64().unwrap() as usize);
    };
    check(&nodes[0], "node 0");
    check(&nodes[1], "node 1");
    // The killed node, started again on its directory and the same database, sees them too.
    let url = nodes[2].database_url.clone().unwrap();
    nodes[2] = TestServer::start_node(dirs[2].path(), &url, &[]);
    check(&nodes[2], "node 2 restarted");
    println!(
        "{} writes acknowledged; per node at the kill {at_kill:?}",
        acked.len()
    );
}
