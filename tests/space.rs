//! End-to-end tests of running out of room: the storage quota, a full disk (on a small tmpfs,
//! where this machine lets the test mount one), and `/ready`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Client, TestServer, eventually};
use serde_json::json;

fn put(s: &Client, key: usize, bytes: usize) -> common::Response {
    let body = json!({"key": format!("k{key:06}"), "value": "x".repeat(bytes)}).to_string();
    s.put("/objects", &body)
}

#[test]
fn the_quota_refuses_writes_past_it_and_deletes_make_room() {
    if common::sqlite_only("KV_MAX_DB_BYTES limits the SQLite file in DB_PATH") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(dir.path(), &[("KV_MAX_DB_BYTES", "300000")]);
    let ready = s.get("/ready");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    assert_eq!(ready.json()["max_database_bytes"], 300000);
    assert!(ready.json()["database_bytes"].as_u64().unwrap() > 0);
    let mut stored = 0;
    let refused = loop {
        let resp = put(&s, stored, 2000);
        if resp.status != 200 {
            break resp;
        }
        stored += 1;
        assert!(stored < 1000, "the quota never applied");
    };
    assert_eq!(refused.status, 507);
    assert_eq!(refused.json()["code"], "quota_exceeded");
    assert_eq!(refused.header("retry-after"), None, "waiting does not help");
    let ready = s.get("/ready");
    assert_eq!(
        (ready.status, ready.json()["reason"].clone()),
        (503, json!("quota_exceeded"))
    );
    let metrics = metric_lines(&s);
    for line in [
        r#"kv_writes_refused{reason="quota_exceeded"} 1"#,
        r#"kv_writes_refused{reason="storage_full"} 0"#,
        "kv_database_max_bytes 300000",
    ] {
        assert!(
            metrics.iter().any(|l| l == line),
            "{line:?} not in {metrics:?}"
        );
    }
    let used = metrics
        .iter()
        .find_map(|l| l.strip_prefix("kv_database_used_bytes "))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("kv_database_used_bytes");
    assert!(used > 250_000 && used <= 300_000, "used {used}");
    assert_eq!(s.get("/health").status, 200, "still alive");
    assert_eq!(s.get("/objects/k000000").status, 200, "reads work");
    // Deletes always work, and the pages they free are reused.
    for key in 0..stored / 2 {
        assert_eq!(s.delete(&format!("/objects/k{key:06}")).status, 200);
    }
    assert_eq!(put(&s, 999_999, 2000).status, 200);
    assert!(eventually(Duration::from_secs(5), || s
        .get("/ready")
        .status
        == 200));
    let metrics = metric_lines(&s);
    assert!(
        metrics
            .iter()
            .any(|l| l == r#"kv_writes_refused{reason="quota_exceeded"} 0"#),
        "{metrics:?}"
    );
}

/// The lines of `GET /metrics` that are samples, not comments.
fn metric_lines(s: &Client) -> Vec<String> {
    let resp = s.get("/metrics");
    assert_eq!(resp.status, 200);
    String::from_utf8(resp.body)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Mounts a tmpfs of `size` at `dir`; false (with a message) where this machine does not allow it.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output();
    match out {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "skipped: cannot mount a tmpfs here ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("skipped: cannot run mount ({e})");
            false
        }
    }
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

#[test]
fn a_full_disk_answers_507_keeps_deletes_working_and_recovers_without_a_restart() {
    if common::sqlite_only("the disk that fills is the one under the SQLite file in DB_PATH") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !mount_tmpfs(dir.path(), "16m") {
        return;
    }
    let _unmount = Unmount(dir.path());
    let mut s = TestServer::start(dir.path());
    let mut acknowledged = Vec::new();
    let refused = loop {
        let resp = put(&s, acknowledged.len(), 50_000);
        if resp.status != 200 {
            break resp;
        }
        acknowledged.push(acknowledged.len());
        assert!(acknowledged.len() < 1000, "the disk never filled");
    };
    assert_eq!(
        refused.status,
        507,
        "{:?}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.json()["code"], "storage_full");
    assert!(refused.header("retry-after").is_some());
    let ready = s.get("/ready");
    assert_eq!(
        (ready.status, ready.json()["reason"].clone()),
        (503, json!("storage_full"))
    );
    let metrics = metric_lines(&s);
    assert!(
        metrics
            .iter()
            .any(|l| l == r#"kv_writes_refused{reason="storage_full"} 1"#),
        "{metrics:?}"
    );
    assert_eq!(s.get("/health").status, 200, "alive");
    assert_eq!(s.get("/objects/k000000").status, 200, "reads work");
    // Deletes work on a full disk: that is how space is freed through the API.
    for key in acknowledged.iter().take(5) {
        assert_eq!(s.delete(&format!("/objects/k{key:06}")).status, 200);
    }
    assert_eq!(put(&s, 999_999, 10).status, 507, "still full");
    // Space returns: writes succeed again within seconds, without a restart.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(grown.success());
    assert!(eventually(Duration::from_secs(10), || put(&s, 999_999, 10)
        .status
        == 200));
    assert_eq!(s.get("/ready").status, 200);
    // A checkpoint pass that ran while the disk was full failed (the database file could not
    // grow; in about two runs of three the disk fills under a pass rather than a commit). The
    // checkpointer goes on: the file grows to hold every value still stored.
    let stored_bytes = ((acknowledged.len() - 5) * 50_000) as u64;
    let file = dir.path().join("kv.sqlite3");
    assert!(
        eventually(Duration::from_secs(10), || std::fs::metadata(&file)
            .is_ok_and(|m| m.len() >= stored_bytes)),
        "the database file holds {:?} bytes of {stored_bytes} stored; log:\n{}",
        std::fs::metadata(&file).map(|m| m.len()),
        s.log()
    );
    // Nothing acknowledged was lost, and the database is sound.
    assert!(s.terminate(Duration::from_secs(10)).success());
    let db = rusqlite::Connection::open(dir.path().join("kv.sqlite3")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let count: i64 = db
        .query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count as usize, acknowledged.len() - 5 + 1);
}
