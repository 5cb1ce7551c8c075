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
    assert!(value(&after, "kv_database_bytes", &[]) > 0.0);
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
