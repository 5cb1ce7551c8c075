//! End-to-end tests of bearer tokens: `kv token new` and `kv token hash`, the tokens file at
//! startup, and its reload on SIGHUP, which must never stop the server.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{TestServer, eventually, raw_request, read_response, run_to_exit};
use serde_json::{Value, json};

/// How long a reload may take to show in the log.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `kv` with `args` and `stdin`; returns its status, stdout and stderr.
fn kv(args: &[&str], stdin: &str) -> (ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kv"))
        .env_clear()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kv");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("run kv");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kv token hash` of `stdin`, which must succeed.
fn hash(stdin: &str) -> String {
    let (status, stdout, stderr) = kv(&["token", "hash"], stdin);
    assert!(status.success(), "{stdin:?}: {stderr}");
    stdout.trim_end().to_string()
}

/// Writes the tokens file `tokens.json` in `dir` with `mode`.
fn tokens_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
    let path = dir.join("tokens.json");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn file_of(entries: &[&Value]) -> String {
    json!({ "tokens": entries }).to_string()
}

/// A server on `dir` that reads its tokens from `file`.
fn server_with_tokens(dir: &Path, file: &Path) -> TestServer {
    TestServer::start_with(dir, &[("KV_TOKENS_FILE", file.to_str().unwrap())])
}

fn wait_for_log(s: &TestServer, needle: &str, times: usize) {
    assert!(
        eventually(RELOAD_TIMEOUT, || s.log().matches(needle).count() >= times),
        "{needle:?} did not appear {times} time(s); log:\n{}",
        s.log()
    );
}

#[test]
fn token_new_round_trips_through_token_hash() {
    let (status, stdout, stderr) = kv(&["token", "new", "--name", "web"], "");
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let token = lines[0];
    assert!(token.starts_with("kv_") && token.len() >= 3 + 32, "{token}");
    let entry: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(entry["name"], "web");
    assert_eq!(entry["sha256"], hash(&format!("{token}\n")));

    // The printed entry is one kv accepts as it is.
    let dir = tempfile::tempdir().unwrap();
    let file = tokens_file(dir.path(), &file_of(&[&entry]), 0o600);
    let s = server_with_tokens(dir.path(), &file);
    assert!(s.log().contains("1 token(s)"), "{}", s.log());
    s.assert_healthy();

    let (_, again, _) = kv(&["token", "new"], "");
    assert_ne!(again.lines().next(), Some(token), "tokens must be random");
}

#[test]
fn token_hash_drops_one_trailing_newline() {
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(hash("abc"), abc);
    assert_eq!(hash("abc\n"), abc);
    assert_eq!(hash("abc\r\n"), abc);
    // `echo TOKEN | kv token hash`, through a real pipe.
    let shell = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo abc | {} token hash",
            env!("CARGO_BIN_EXE_kv")
        ))
        .output();
    if let Ok(out) = shell {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), abc);
    }
    for bad in ["", "\n", "abc\n\n", "a b"] {
        let (status, stdout, stderr) = kv(&["token", "hash"], bad);
        assert_eq!(status.code(), Some(1), "{bad:?}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
}

#[test]
fn startup_refuses_a_missing_or_invalid_tokens_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let db = db.to_str().unwrap();
    let missing = dir.path().join("missing.json");
    let invalid = dir.path().join("invalid.json");
    std::fs::write(
        &invalid,
        r#"{"tokens":[{"name":"web","sha256":"not-hex","collections":{"*":"read"}}]}"#,
    )
    .unwrap();
    let unknown_right = dir.path().join("right.json");
    std::fs::write(
        &unknown_right,
        format!(
            r#"{{"tokens":[{{"name":"w","sha256":"{}","collections":{{"*":"delete"}}}}]}}"#,
            "a".repeat(64)
        ),
    )
    .unwrap();
    for (file, needle) in [
        (&missing, "cannot read tokens file"),
        (&invalid, "64 hex digits"),
        (&unknown_right, "unknown variant `delete`"),
    ] {
        let file = file.to_str().unwrap();
        for (env, args) in [
            (
                vec![("PORT", "0"), ("DB_PATH", db), ("KV_TOKENS_FILE", file)],
                vec![],
            ),
            (
                vec![("PORT", "0"), ("DB_PATH", db)],
                vec!["--tokens-file", file],
            ),
        ] {
            let (status, _, stderr) = run_to_exit(&env, &args);
            assert_eq!(status.code(), Some(1), "{file}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{file}: {stderr}");
            assert!(stderr.starts_with("error: "), "{stderr}");
            assert!(stderr.contains(needle) && stderr.contains(file), "{stderr}");
        }
    }
    assert!(
        !Path::new(db).exists(),
        "kv touched the database before checking its tokens file"
    );
}

#[test]
fn a_tokens_file_others_may_read_gets_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let ops = json!({"name": "ops", "sha256": hash("secret"), "admin": true});
    let text = file_of(&[&ops]);

    let file = tokens_file(dir.path(), &text, 0o600);
    let s = server_with_tokens(dir.path(), &file);
    assert!(!s.log().contains("WARN"), "{}", s.log());
    drop(s);

    let file = tokens_file(dir.path(), &text, 0o644);
    let s = server_with_tokens(dir.path(), &file);
    let log = s.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("tokens.json") && warnings[0].contains("644"));
    s.assert_healthy();
}

#[test]
fn sighup_reloads_the_tokens_file_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ops = json!({"name": "ops", "sha256": hash("secret"), "admin": true});
    let web = json!({"name": "web", "sha256": hash("other"), "collections": {"app-*": "write"}});
    let file = tokens_file(dir.path(), &file_of(&[&ops]), 0o600);
    let mut s = server_with_tokens(dir.path(), &file);
    assert!(s.log().contains("1 token(s)"), "{}", s.log());

    // A keep-alive connection opened before the reload must still be answered after it.
    let mut kept = s.connect();
    kept.write_all(&raw_request("PUT", "/objects", r#"{"key":"a","value":1}"#))
        .unwrap();
    assert_eq!(read_response(&mut kept).status, 200);

    std::fs::write(&file, file_of(&[&ops, &web])).unwrap();
    s.signal_hup();
    wait_for_log(&s, "reloaded", 1);
    assert!(s.log().contains("2 token(s)"), "{}", s.log());
    s.assert_healthy();
    kept.write_all(b"GET /objects/a HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut kept);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["value"], 1);

    // A broken file: logged, the old tokens stay, the server goes on.
    std::fs::write(&file, "{\"tokens\": [").unwrap();
    s.signal_hup();
    wait_for_log(&s, "ERROR", 1);
    assert!(
        s.log().contains("2 token(s) loaded before stay"),
        "{}",
        s.log()
    );
    s.assert_healthy();

    // A vanished file: the same.
    std::fs::remove_file(&file).unwrap();
    s.signal_hup();
    wait_for_log(&s, "ERROR", 2);
    s.assert_healthy();

    // Many in a row (signals may merge, so count only that it answered each time).
    tokens_file(dir.path(), &file_of(&[&ops]), 0o600);
    for _ in 0..5 {
        s.signal_hup();
        s.assert_healthy();
    }
    wait_for_log(&s, "reloaded", 2);
    let log = s.log();
    let last = log.lines().rfind(|l| l.contains("reloaded"));
    assert!(last.is_some_and(|l| l.ends_with(": 1 token(s)")), "{log}");

    // SIGTERM still stops it, gracefully.
    let status = s.terminate(Duration::from_secs(5));
    assert!(status.success(), "{status:?}; log:\n{}", s.log());
}

#[test]
fn sighup_without_a_tokens_file_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path());
    assert!(s.log().contains("access is open"), "{}", s.log());
    s.signal_hup();
    wait_for_log(&s, "no tokens file to re-read", 1);
    s.assert_healthy();
    s.signal_int();
    let status = s.wait(Duration::from_secs(5));
    assert!(status.success(), "{status:?}; log:\n{}", s.log());
}
