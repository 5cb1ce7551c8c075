//! End-to-end tests of what only a database server can do to kv: go away and come back. Each test
//! starts a PostgreSQL cluster of its own with .ci/postgres, because stopping the one the other
//! tests share would fail them. They need PostgreSQL (`KV_TEST_POSTGRES_URL`, which also says
//! that this machine can run one); on SQLite each says so and returns.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TestServer, eventually};
use serde_json::json;

/// A throwaway cluster from .ci/postgres, deleted when dropped.
struct Cluster {
    dir: String,
    url: String,
    /// The certificate authority that signed the cluster's TLS certificate.
    ca: String,
}

impl Cluster {
    /// A new cluster; None (after saying why) where .ci/postgres cannot make one, say against a
    /// developer's own server without root, unless KV_TEST_REQUIRE_POSTGRES=1 makes that a failure.
    fn start() -> Option<Cluster> {
        // Durable: an immediate stop would otherwise lose the commits of the last moment, which
        // synchronous_commit=off acknowledges before they are in the WAL.
        let out = Command::new(Cluster::script())
            .args(["start", "--durable"])
            .output()
            .expect("run .ci/postgres");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let why = format!(
                ".ci/postgres start failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!common::postgres_required(), "{why}");
            eprintln!("skipped: {why}");
            return None;
        }
        let export = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("no {name} in {stdout:?}"))
                .to_string()
        };
        Some(Cluster {
            dir: export("KV_TEST_POSTGRES_DIR"),
            url: export("KV_TEST_POSTGRES_URL"),
            ca: export("KV_TEST_POSTGRES_CA"),
        })
    }

    fn script() -> &'static str {
        concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres")
    }

    fn run(&self, command: &str) {
        let status = Command::new(Cluster::script())
            .args([command, &self.dir])
            .status()
            .expect("run .ci/postgres");
        assert!(status.success(), ".ci/postgres {command} failed");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(Cluster::script())
            .args(["stop", &self.dir])
            .status();
    }
}

#[test]
fn a_database_that_goes_away_answers_503_and_kv_reconnects_by_itself() {
    if common::postgres_only("stopping PostgreSQL").is_none() {
        return;
    }
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_node(dir.path(), &cluster.url, &[]);
    assert_eq!(s.put("/objects", r#"{"key":"a","value":1}"#).status, 200);
    assert_eq!(s.get("/ready").status, 200);

    // Stopped as a crash would stop it: no goodbye to kv's connections.
    cluster.run("pause");
    assert!(
        eventually(Duration::from_secs(15), || s.get("/ready").status == 503),
        "still ready without a database"
    );
    assert_eq!(s.get("/ready").json()["reason"], "database_unavailable");
    for (method, target, body) in [
        ("PUT", "/objects", Some(r#"{"key":"b","value":2}"#)),
        ("GET", "/objects/a", None),
        ("GET", "/objects", None),
        ("DELETE", "/objects/a", None),
        ("GET", "/changes?since=0", None),
    ] {
        let resp = s.request(method, target, body.map(str::as_bytes));
        assert_eq!(
            (resp.status, resp.json()["code"].clone()),
            (503, json!("database_unavailable")),
            "{method} {target}: {:?}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.header("retry-after"), Some("1"), "{method} {target}");
    }

    // Back, without restarting kv.
    cluster.run("resume");
    assert!(
        eventually(Duration::from_secs(30), || s.get("/ready").status == 200),
        "not ready again; log:\n{}",
        s.log()
    );
    let resp = s.get("/objects/a");
    assert_eq!(
        (resp.status, resp.json()["value"].clone()),
        (200, json!(1)),
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    let resp = s.put("/objects", r#"{"key":"b","value":2}"#);
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json()["rev"],
        2,
        "the writes that failed took no revision"
    );
    assert_eq!(s.delete("/objects/a").json()["rev"], 3);
    assert_eq!(
        s.get("/changes?since=0").json(),
        json!({"changes": [
            {"rev": 2, "collection": "default", "key": "b", "op": "put", "value": 2},
            {"rev": 3, "collection": "default", "key": "a", "op": "delete"}
        ], "last_rev": 3, "more": false})
    );
}

/// Whether every connection kv (application_name kv) has open to the cluster is encrypted, and
/// how many there are.
fn kv_connections_encrypted(cluster: &Cluster) -> (bool, i64) {
    let mut client = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    let row = client
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false), count(*) FROM pg_stat_activity a
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'kv'",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn tls_encrypts_by_default_and_verify_full_checks_the_certificate() {
    if common::postgres_only("TLS to PostgreSQL").is_none() {
        return;
    }
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Without sslmode (prefer) and with require: encrypted, the certificate not checked.
    for mode in ["", "?sslmode=require"] {
        let s = TestServer::start_node(dir.path(), &format!("{}{mode}", cluster.url), &[]);
        assert_eq!(s.put("/objects", r#"{"key":"a","value":1}"#).status, 200);
        let (encrypted, n) = kv_connections_encrypted(&cluster);
        assert!(
            encrypted && n >= 2,
            "{mode:?}: {n} connections, encrypted: {encrypted}"
        );
        drop(s);
    }
    // verify-full against the system's roots, here the cluster's own authority...
    let url = format!("{}?sslmode=verify-full", cluster.url);
    let s = TestServer::start_node(dir.path(), &url, &[("SSL_CERT_FILE", &cluster.ca)]);
    assert_eq!(s.get("/objects/a").json()["value"], 1);
    drop(s);
    // ...and against roots that do not include it: kv refuses to start, in one line.
    let no_roots = dir.path().join("no-roots.pem");
    std::fs::write(&no_roots, "").unwrap();
    let data = dir.path().join("data");
    let (status, _, stderr) = common::run_to_exit(
        &[
            ("KV_DATABASE_URL", &url),
            ("DB_PATH", data.to_str().unwrap()),
            ("PORT", "0"),
            ("SSL_CERT_FILE", no_roots.to_str().unwrap()),
        ],
        &[],
    );
    assert!(!status.success());
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("");
    assert!(
        line.contains("cannot connect") && line.contains("certificate"),
        "{stderr}"
    );
}
