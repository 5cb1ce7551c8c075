//! End-to-end tests of operating kv: Prometheus metrics (read with a real parser, and checked by
//! `promtool check metrics` where it is installed).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Client, TestServer};
use serde_json::json;

fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path());
    (dir, server)
}

fn scrape(s: &Client) -> (String, prometheus_parse::Scrape) {
    let resp = s.get("/metrics");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(resp.body).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the text format parses");
    (text, scrape)
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.last().map_or(0.0, |b| b.count)
            }
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
        .unwrap_or(0.0)
}

#[test]
fn counters_move_with_requests_and_labels_name_routes_not_keys() {
    let (_dir, s) = server();
    let (_, before) = scrape(&s);
    let misses = [
        ("method", "GET"),
        ("route", "/objects/:key"),
        ("code", "404"),
    ];
    let start = value(&before, "kv_http_requests_total", &misses);
    for key in ["secret-1", "secret-2", "secret-3"] {
        assert_eq!(
            s.get(&format!("/objects/{key}?collection=private")).status,
            404
        );
    }
    let batch = json!({"collection": "c", "ops": [
        {"op": "put", "key": "a", "value": 1},
        {"op": "put", "key": "b", "value": 2},
        {"op": "delete", "key": "a"},
        {"op": "get", "key": "b"}
    ]});
    assert_eq!(
        s.request("POST", "/batch", Some(batch.to_string().as_bytes()))
            .status,
        200
    );
    let (text, after) = scrape(&s);
    assert_eq!(
        value(&after, "kv_http_requests_total", &misses),
        start + 3.0
    );
    assert_eq!(
        value(&after, "kv_writes_total", &[]),
        3.0,
        "the get wrote nothing"
    );
    assert_eq!(value(&after, "kv_objects", &[]), 1.0);
    assert_eq!(value(&after, "kv_collections", &[]), 1.0);
    assert_eq!(value(&after, "kv_revision", &[]), 3.0);
    // Pages in use may still be only in the WAL (SQLite; PostgreSQL reports no WAL).
    let files = value(&after, "kv_database_bytes", &[]) + value(&after, "kv_wal_bytes", &[]);
    let used = value(&after, "kv_database_used_bytes", &[]);
    assert!(
        used > 0.0 && used <= files,
        "pages in use {used}, database and WAL {files}"
    );
    assert!(
        value(&after, "kv_open_connections", &[]) >= 1.0,
        "this scrape's own"
    );
    assert_eq!(value(&after, "kv_change_waiters", &[]), 0.0);
    assert_eq!(
        value(
            &after,
            "kv_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(
        value(&after, "kv_commit_writes", &[]) >= 1.0,
        "a histogram of group commits"
    );
    assert!(
        value(
            &after,
            "kv_http_request_duration_seconds",
            &[("route", "/batch")]
        ) >= 1.0
    );
    for secret in ["secret-1", "private", "\"c\""] {
        assert!(!text.contains(secret), "{secret} leaked into a label");
    }
    for name in [
        "kv_http_requests_total",
        "kv_http_request_duration_seconds",
        "kv_writes_total",
        "kv_commit_duration_seconds",
        "kv_commit_writes",
        "kv_storage_errors_total",
        "kv_wal_bytes",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
}

#[test]
fn promtool_accepts_the_metrics() {
    let (_dir, s) = server();
    s.put("/objects", r#"{"key":"k","value":1}"#);
    s.get("/objects/k");
    let (text, _) = scrape(&s);
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut promtool = match promtool {
        Ok(child) => child,
        Err(e) if std::env::var_os("KV_TEST_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("skipped: promtool is not installed ({e}); CI installs it");
            return;
        }
        Err(e) => panic!("KV_TEST_REQUIRE_PROMTOOL is set but promtool cannot run: {e}"),
    };
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_online_backup_restores_into_a_fresh_kv_with_exactly_its_data() {
    let (dir, s) = server();
    s.put("/objects?collection=a", r#"{"key":"k1","value":{"n":1}}"#);
    s.put("/objects?collection=b", r#"{"key":"ü","value":[1,"x"]}"#);
    // Over HTTP, while kv runs.
    let resp = s.get("/admin/backup");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/vnd.sqlite3"));
    let disposition = resp.header("content-disposition").unwrap();
    assert!(
        disposition.starts_with("attachment; filename=\"kv-"),
        "{disposition}"
    );
    assert!(resp.body.starts_with(b"SQLite format 3\0"));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "the temporary copy is deleted");
    let http_copy = dir.path().join("http-copy.sqlite3");
    std::fs::write(&http_copy, &resp.body).unwrap();
    // From the command line, against the database of the running kv.
    let cli_copy = dir.path().join("cli-copy.sqlite3");
    let db = dir.path().to_str().unwrap();
    let mut args = vec![
        "backup",
        "--out",
        cli_copy.to_str().unwrap(),
        "--db-path",
        db,
    ];
    if let Some(url) = &s.database_url {
        args.extend(["--database-url", url]);
    }
    let (status, stdout, stderr) = common::run_to_exit(&[], &args);
    assert!(status.success(), "{stdout}{stderr}");
    // A restore refuses while that kv runs, and changes nothing; into PostgreSQL, it always does.
    let mut args = vec![
        "restore",
        "--from",
        cli_copy.to_str().unwrap(),
        "--db-path",
        db,
    ];
    if let Some(url) = &s.database_url {
        args.extend(["--database-url", url]);
    }
    let (status, _, stderr) = common::run_to_exit(&[], &args);
    assert_eq!(status.code(), Some(1));
    let refusal = if common::on_postgres() {
        "not into PostgreSQL"
    } else {
        "another kv is running"
    };
    assert!(stderr.contains(refusal), "{stderr}");
    assert_eq!(
        s.get("/objects/k1?collection=a").json()["value"],
        json!({"n": 1})
    );
    for copy in [&http_copy, &cli_copy] {
        let fresh = tempfile::tempdir().unwrap();
        let target = fresh.path().to_str().unwrap();
        let (status, stdout, stderr) = common::run_to_exit(
            &[("DB_PATH", target)],
            &["restore", "--from", copy.to_str().unwrap()],
        );
        assert!(status.success(), "{stdout}{stderr}");
        // A restore makes a SQLite data directory, also from a kv on PostgreSQL.
        let restored = TestServer::start_sqlite(fresh.path(), &[]);
        assert_eq!(
            restored.get("/objects/k1?collection=a").json()["value"],
            json!({"n": 1})
        );
        assert_eq!(
            restored.get("/objects/%C3%BC?collection=b").json()["value"],
            json!([1, "x"])
        );
        assert_eq!(restored.get("/changes").json()["last_rev"], 2);
    }
}

#[test]
fn restore_keeps_the_database_it_replaces_and_refuses_junk() {
    if common::sqlite_only(
        "a restore replaces the SQLite file in DB_PATH; none goes into PostgreSQL",
    ) {
        return;
    }
    let (dir, s) = server();
    s.put("/objects", r#"{"key":"old","value":1}"#);
    let copy = dir.path().join("copy.sqlite3");
    std::fs::write(&copy, s.get("/admin/backup").body).unwrap();
    s.put("/objects", r#"{"key":"new","value":2}"#);
    drop(s);
    let db = dir.path().to_str().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a database at all, just some bytes").unwrap();
    let (status, _, stderr) = common::run_to_exit(
        &[],
        &["restore", "--from", junk.to_str().unwrap(), "--db-path", db],
    );
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("not a sound kv database"), "{stderr}");
    let (status, stdout, stderr) = common::run_to_exit(
        &[],
        &["restore", "--from", copy.to_str().unwrap(), "--db-path", db],
    );
    assert!(status.success(), "{stdout}{stderr}");
    assert!(dir.path().join("kv.sqlite3.before-restore").exists());
    let s = TestServer::start(dir.path());
    assert_eq!(s.get("/objects/old").status, 200);
    assert_eq!(
        s.get("/objects/new").status,
        404,
        "exactly the backup's data"
    );
}

#[test]
fn a_second_kv_on_the_same_directory_is_refused() {
    let (dir, s) = server();
    let mut env = vec![("PORT", "0"), ("DB_PATH", dir.path().to_str().unwrap())];
    if let Some(url) = &s.database_url {
        env.push(("KV_DATABASE_URL", url));
    }
    let (status, _, stderr) = common::run_to_exit(&env, &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("another kv is running"), "{stderr}");
}

#[test]
fn an_export_imports_into_an_empty_kv_as_identical_data() {
    let (_dir, s) = server();
    let odd_keys = [
        "plain",
        "with space",
        "ü 日本 🎉",
        "a/b?c=d&e",
        "quote\"back\\slash",
        ".",
    ];
    let values = [
        json!(null),
        json!(true),
        json!(1.25e-7),
        json!(9007199254740993u64),
        json!("text"),
        json!({"deep": [[{"a": []}]], "n": -1}),
    ];
    let mut ops = Vec::new();
    for (i, key) in odd_keys.iter().enumerate() {
        let collection = ["a", "b:c", "ü"][i % 3];
        ops.push(json!({"op": "put", "key": key, "value": values[i], "collection": collection}));
    }
    let batch = json!({"ops": ops}).to_string();
    assert_eq!(
        s.request("POST", "/batch", Some(batch.as_bytes())).status,
        200
    );
    s.put(
        "/objects?collection=ttl",
        r#"{"key":"t","value":1,"ttl":3600}"#,
    );
    let export = s.get("/export");
    assert_eq!(export.status, 200);
    assert_eq!(export.header("content-type"), Some("application/x-ndjson"));
    let text = String::from_utf8(export.body.clone()).unwrap();
    assert_eq!(text.lines().count(), 7);
    let ttl_line: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["collection"] == "ttl")
        .unwrap();
    assert!(ttl_line["expires_at"].as_i64().is_some(), "{ttl_line}");
    let one = s.get("/export?collection=b%3Ac");
    assert_eq!(String::from_utf8(one.body).unwrap().lines().count(), 2);

    let (_dir2, fresh) = server();
    let resp = fresh.request("POST", "/import", Some(&export.body));
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json(), json!({"imported": 7}));
    assert_eq!(fresh.get("/export").body, export.body, "identical data");
    for c in ["a", "b%3Ac", "%C3%BC"] {
        assert_eq!(
            fresh.get(&format!("/objects?collection={c}")).body,
            s.get(&format!("/objects?collection={c}")).body,
            "exact value text"
        );
    }
}

#[test]
fn a_bad_line_names_itself_and_nothing_is_imported() {
    let (_dir, s) = server();
    s.put("/objects?collection=c", r#"{"key":"keep","value":1}"#);
    let body = "{\"collection\":\"c\",\"key\":\"a\",\"value\":1}\n\n   \n{\"collection\":\"c\",\"key\":\"b\"}\n";
    let resp = s.request("POST", "/import", Some(body.as_bytes()));
    assert_eq!(resp.status, 400);
    assert_eq!(
        (resp.json()["code"].clone(), resp.json()["line"].clone()),
        (json!("invalid_line"), json!(4))
    );
    for (body, line) in [
        ("[1]\n", 1),
        ("{\"key\":\"\",\"value\":1}\n", 1),
        ("{\"key\":\"k\",\"value\":1,\"collection\":7}\n", 1),
        ("{\"key\":\"k\",\"value\":1}\nnot json\n", 2),
        ("{\"key\":\"k\",\"value\":1,\"expires_at\":\"soon\"}\n", 1),
    ] {
        let resp = s.request("POST", "/import", Some(body.as_bytes()));
        assert_eq!(
            (
                resp.status,
                resp.json()["code"].clone(),
                resp.json()["line"].clone()
            ),
            (400, json!("invalid_line"), json!(line)),
            "{body:?}"
        );
    }
    assert_eq!(
        s.get("/objects/a?collection=c").status,
        404,
        "nothing applied"
    );
    assert_eq!(s.get("/objects/k").status, 404);
    // Blank lines are skipped; mode=replace empties the collections the file names first.
    s.put("/objects?collection=other", r#"{"key":"stays","value":1}"#);
    let body = "\n{\"collection\":\"c\",\"key\":\"new\",\"value\":2}\n\n";
    let resp = s.request("POST", "/import?mode=replace", Some(body.as_bytes()));
    assert_eq!(resp.json(), json!({"imported": 1}));
    assert_eq!(s.get("/objects/keep?collection=c").status, 404, "replaced");
    assert_eq!(s.get("/objects/new?collection=c").json()["value"], 2);
    assert_eq!(s.get("/objects/stays?collection=other").status, 200);
    let resp = s.request("POST", "/import?mode=upsert", Some(b"\n"));
    assert_eq!(resp.json()["code"], "invalid_mode");
}

#[test]
fn an_import_over_its_own_limit_is_413() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(
        dir.path(),
        &[("KV_MAX_IMPORT_BYTES", "100"), ("KV_MAX_BODY_BYTES", "20")],
    );
    let line = "{\"key\":\"k\",\"value\":\"0123456789\"}\n";
    assert_eq!(
        s.request("POST", "/import", Some(line.as_bytes())).status,
        200,
        "not held to KV_MAX_BODY_BYTES"
    );
    let big = line.repeat(4);
    let resp = s.request("POST", "/import", Some(big.as_bytes()));
    assert_eq!(
        (resp.status, resp.json()["code"].clone()),
        (413, json!("body_too_large"))
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp"))
    );
}
