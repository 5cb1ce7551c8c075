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
    let put = String::from_utf8(raw_request("PUT", "/objects", r#"{"key":"a","value":1}"#))
        .unwrap()
        .replacen("\r\n", "\r\nAuthorization: Bearer secret\r\n", 1);
    kept.write_all(put.as_bytes()).unwrap();
    assert_eq!(read_response(&mut kept).status, 200);

    std::fs::write(&file, file_of(&[&ops, &web])).unwrap();
    s.signal_hup();
    wait_for_log(&s, "reloaded", 1);
    assert!(s.log().contains("2 token(s)"), "{}", s.log());
    s.assert_healthy();
    kept.write_all(b"GET /objects/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n\r\n")
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

/// Tokens for the access tests: `web` writes `app-*` and reads `config`, `ops` is admin, `nobody`
/// has no right; each token is its name followed by `-secret`.
fn access_file(dir: &Path) -> PathBuf {
    let web = json!({"name": "web", "sha256": hash("web-secret"),
        "collections": {"app-*": "write", "config": "read"}});
    let ops = json!({"name": "ops", "sha256": hash("ops-secret"), "admin": true});
    let nobody = json!({"name": "nobody", "sha256": hash("nobody-secret")});
    tokens_file(dir, &file_of(&[&web, &ops, &nobody]), 0o600)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A request with `token` (none for `None`) and an optional body; the response.
fn call(
    s: &TestServer,
    token: Option<&str>,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> common::Response {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|value| ("Authorization", value))
        .into_iter()
        .collect();
    s.request_with(method, target, &headers, body)
}

#[test]
fn every_route_answers_401_403_or_serves_as_the_token_allows() {
    let dir = tempfile::tempdir().unwrap();
    let file = access_file(dir.path());
    let s = server_with_tokens(dir.path(), &file);
    for c in ["app-1", "config", "secrets"] {
        let resp = call(
            &s,
            Some("ops-secret"),
            "PUT",
            &format!("/objects?collection={c}"),
            Some(r#"{"key":"k","value":1}"#),
        );
        assert_eq!(resp.status, 200);
    }
    let put = Some(r#"{"key":"k","value":2}"#);
    let batch_get = Some(r#"{"ops":[{"op":"get","key":"k"}]}"#);
    // (method, target, body, status for web); nobody gets 403 and ops what web would get at best.
    let matrix: [(&str, &str, Option<&str>, u16); 20] = [
        ("GET", "/objects/k?collection=app-1", None, 200),
        ("HEAD", "/objects/k?collection=app-1", None, 200),
        ("GET", "/objects?collection=app-1", None, 200),
        ("PUT", "/objects?collection=app-1", put, 200),
        ("DELETE", "/objects/k?collection=app-1", None, 200),
        ("GET", "/objects/k?collection=config", None, 200),
        ("GET", "/objects?collection=config", None, 200),
        ("PUT", "/objects?collection=config", put, 403),
        ("DELETE", "/objects/k?collection=config", None, 403),
        ("GET", "/objects/k?collection=secrets", None, 403),
        ("HEAD", "/objects/k?collection=secrets", None, 403),
        ("GET", "/objects/k", None, 403),
        ("GET", "/collections/config", None, 200),
        ("GET", "/collections/secrets", None, 403),
        ("DELETE", "/collections/config", None, 403),
        ("DELETE", "/collections/secrets", None, 403),
        ("POST", "/batch?collection=config", batch_get, 200),
        ("POST", "/batch?collection=secrets", batch_get, 403),
        ("GET", "/changes?collection=config", None, 200),
        ("GET", "/changes?collection=secrets", None, 403),
    ];
    for (method, target, body, web) in matrix {
        // Missing and unknown tokens: 401, and nothing changes.
        for token in [None, Some("wrong-secret")] {
            let resp = call(&s, token, method, target, body);
            let what = format!("{method} {target} as {token:?}");
            assert_eq!(resp.status, 401, "{what}");
            assert_eq!(
                resp.header("www-authenticate"),
                Some(r#"Bearer realm="kv""#),
                "{what}"
            );
            if method != "HEAD" {
                assert_eq!(resp.json()["code"], "unauthorized", "{what}");
            }
        }
        let resp = call(&s, Some("nobody-secret"), method, target, body);
        assert_eq!(resp.status, 403, "{method} {target} as nobody");
        let resp = call(&s, Some("web-secret"), method, target, body);
        assert_eq!(resp.status, web, "{method} {target} as web");
        if web == 403 && method != "HEAD" {
            assert_eq!(resp.json()["code"], "forbidden");
            assert!(resp.header("www-authenticate").is_none());
        }
        // Admin may do everything (deletes aside, which would change what later rows see).
        if method != "DELETE" {
            let resp = call(&s, Some("ops-secret"), method, target, body);
            let status = resp.status;
            assert!(
                ![401, 403].contains(&status),
                "{method} {target} as ops: {status}"
            );
        }
    }
    // The probe needs no token; a wrong method there is still a 405.
    s.assert_healthy();
    assert_eq!(s.request("POST", "/health", Some(b"{}")).status, 405);
    // Nothing a refused request asked for happened.
    let secrets = call(&s, Some("ops-secret"), "GET", "/collections/secrets", None);
    assert_eq!(secrets.json()["count"], 1);
    let resp = call(
        &s,
        Some("ops-secret"),
        "DELETE",
        "/collections/secrets",
        None,
    );
    assert_eq!(resp.status, 200);
}

#[test]
fn a_batch_with_one_forbidden_op_is_refused_whole_with_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let file = access_file(dir.path());
    let s = server_with_tokens(dir.path(), &file);
    let body = json!({"collection": "app-1", "ops": [
        {"op": "put", "key": "a", "value": 1},
        {"op": "get", "key": "c", "collection": "config"},
        {"op": "delete", "key": "c", "collection": "config"},
    ]})
    .to_string();
    let resp = call(&s, Some("web-secret"), "POST", "/batch", Some(&body));
    assert_eq!(resp.status, 403);
    let refused = resp.json();
    assert_eq!(
        (&refused["code"], &refused["index"]),
        (&json!("forbidden"), &json!(2))
    );
    let list = call(
        &s,
        Some("web-secret"),
        "GET",
        "/objects?collection=app-1",
        None,
    );
    assert_eq!(list.json()["count"], 0, "nothing was applied");
    let allowed = json!({"collection": "app-1", "ops": [
        {"op": "put", "key": "a", "value": 1},
        {"op": "get", "key": "c", "collection": "config"},
    ]})
    .to_string();
    let resp = call(&s, Some("web-secret"), "POST", "/batch", Some(&allowed));
    assert_eq!(resp.status, 200);
}

#[test]
fn lists_and_the_feed_show_only_readable_collections() {
    let dir = tempfile::tempdir().unwrap();
    let file = access_file(dir.path());
    let s = server_with_tokens(dir.path(), &file);
    // Revisions 1..=6; web may read 2 (app-1), 4 (config) and 6 (app-2).
    for (i, c) in ["secrets", "app-1", "default", "config", "secrets", "app-2"]
        .into_iter()
        .enumerate()
    {
        let body = json!({"key": format!("k{i}"), "value": i}).to_string();
        let target = format!("/objects?collection={c}");
        assert_eq!(
            call(&s, Some("ops-secret"), "PUT", &target, Some(&body)).status,
            200
        );
    }
    let names = |token| -> Vec<String> {
        let body = call(&s, Some(token), "GET", "/collections", None).json();
        body["collections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("web-secret"), ["app-1", "app-2", "config"]);
    assert_eq!(names("ops-secret").len(), 5);
    assert!(names("nobody-secret").is_empty());

    let feed = |query: &str| {
        call(
            &s,
            Some("web-secret"),
            "GET",
            &format!("/changes?{query}"),
            None,
        )
        .json()
    };
    let revs = |page: &Value| -> Vec<u64> {
        page["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["rev"].as_u64().unwrap())
            .collect()
    };
    let page = feed("since=0");
    assert_eq!(
        (revs(&page), &page["last_rev"], &page["more"]),
        (vec![2, 4, 6], &json!(6), &json!(false))
    );
    let page = feed("since=0&limit=1");
    assert_eq!(
        (revs(&page), &page["last_rev"], &page["more"]),
        (vec![2], &json!(2), &json!(true))
    );
    let page = feed("since=2&limit=1");
    assert_eq!((revs(&page), &page["last_rev"]), (vec![4], &json!(4)));
    // The feed of every collection is the same whether read at once or followed as a stream.
    let mut stream = s.events(
        "/changes?since=0",
        &[("Authorization", "Bearer web-secret")],
    );
    stream.set_timeout(Duration::from_secs(10));
    let ids: Vec<String> = (0..3).filter_map(|_| stream.next_event()?.id).collect();
    assert_eq!(ids, ["2", "4", "6"]);
    // A long-poll of every collection answers with the readable change and skips the other.
    let poll = {
        let addr = s.addr();
        std::thread::spawn(move || {
            let c = TestServer::client(&addr);
            let resp = c.request_with(
                "GET",
                "/changes?since=6&wait=10",
                &[("Authorization", "Bearer web-secret")],
                None,
            );
            resp.json()
        })
    };
    let write = |c: &str, k: &str| {
        let body = json!({"key": k, "value": 0}).to_string();
        let target = format!("/objects?collection={c}");
        assert_eq!(
            call(&s, Some("ops-secret"), "PUT", &target, Some(&body)).status,
            200
        );
    };
    write("secrets", "later");
    write("app-1", "later");
    let page = poll.join().unwrap();
    assert_eq!((revs(&page), &page["last_rev"]), (vec![8], &json!(8)));
    let event = stream.next_event().unwrap();
    assert_eq!(event.id.as_deref(), Some("8"), "the stream skipped 7 too");
}

#[test]
fn sighup_brings_in_new_tokens_and_ends_what_revoked_ones_opened() {
    let dir = tempfile::tempdir().unwrap();
    let file = access_file(dir.path());
    let s = server_with_tokens(dir.path(), &file);
    assert_eq!(
        call(&s, Some("new-secret"), "GET", "/collections", None).status,
        401
    );
    let mut stream = s.events(
        "/changes?collection=app-1",
        &[("Authorization", "Bearer web-secret")],
    );
    stream.set_timeout(Duration::from_secs(20));

    let new = json!({"name": "new", "sha256": hash("new-secret"), "collections": {"*": "read"}});
    let ops = json!({"name": "ops", "sha256": hash("ops-secret"), "admin": true});
    std::fs::write(&file, file_of(&[&new, &ops])).unwrap();
    s.signal_hup();
    wait_for_log(&s, "reloaded", 1);
    assert_eq!(
        call(&s, Some("new-secret"), "GET", "/collections", None).status,
        200
    );
    assert_eq!(
        call(&s, Some("web-secret"), "GET", "/collections", None).status,
        401
    );
    // The stream web opened ends at its next event instead of sending it.
    let body = json!({"key": "k", "value": 1}).to_string();
    let target = "/objects?collection=app-1";
    assert_eq!(
        call(&s, Some("ops-secret"), "PUT", target, Some(&body)).status,
        200
    );
    assert_eq!(
        stream.next_event(),
        None,
        "a revoked token's stream must end"
    );
}

#[test]
fn the_access_log_names_the_token_never_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = access_file(dir.path());
    let s = TestServer::start_with(
        dir.path(),
        &[
            ("KV_TOKENS_FILE", file.to_str().unwrap()),
            ("RUST_LOG", "debug"),
        ],
    );
    assert_eq!(
        call(
            &s,
            Some("web-secret"),
            "GET",
            "/objects?collection=app-1",
            None
        )
        .status,
        200
    );
    assert_eq!(
        call(
            &s,
            Some("nobody-secret"),
            "GET",
            "/objects?collection=app-1",
            None
        )
        .status,
        403
    );
    assert_eq!(
        call(&s, Some("wrong-secret"), "GET", "/collections", None).status,
        401
    );
    // Each connection thread logs after it has sent its answer, so the
    // three lines may land in any order: wait for every one of them.
    wait_for_log(&s, "GET /objects 200 (token web)", 1);
    wait_for_log(&s, "GET /objects 403 (token nobody)", 1);
    wait_for_log(&s, "GET /collections 401", 1);
    let log = s.log();
    assert!(!log.contains("secret"), "{log}");
}

#[test]
fn operations_need_their_rights_and_the_probes_none() {
    let dir = tempfile::tempdir().unwrap();
    let web = json!({"name": "web", "sha256": hash("web-secret"),
        "collections": {"app-*": "write", "config": "read"}});
    let ops = json!({"name": "ops", "sha256": hash("ops-secret"), "admin": true});
    let prom = json!({"name": "prom", "sha256": hash("prom-secret"), "metrics": true});
    let file = tokens_file(dir.path(), &file_of(&[&web, &ops, &prom]), 0o600);
    let s = server_with_tokens(dir.path(), &file);
    for c in ["app-1", "config", "secrets"] {
        let target = format!("/objects?collection={c}");
        let put = call(
            &s,
            Some("ops-secret"),
            "PUT",
            &target,
            Some(r#"{"key":"k","value":1}"#),
        );
        assert_eq!(put.status, 200);
    }
    // The probes and the API's description answer without a token.
    for target in ["/health", "/ready", "/openapi.json"] {
        assert_eq!(call(&s, None, "GET", target, None).status, 200, "{target}");
    }
    // /metrics: admin or the metrics right.
    assert_eq!(call(&s, None, "GET", "/metrics", None).status, 401);
    assert_eq!(
        call(&s, Some("web-secret"), "GET", "/metrics", None).status,
        403
    );
    assert_eq!(
        call(&s, Some("prom-secret"), "GET", "/metrics", None).status,
        200
    );
    assert_eq!(
        call(&s, Some("ops-secret"), "GET", "/metrics", None).status,
        200
    );
    // /admin/backup: admin only.
    assert_eq!(
        call(&s, Some("web-secret"), "GET", "/admin/backup", None).status,
        403
    );
    assert_eq!(
        call(&s, Some("prom-secret"), "GET", "/admin/backup", None).status,
        403
    );
    assert_eq!(
        call(&s, Some("ops-secret"), "GET", "/admin/backup", None).status,
        200
    );
    // /export: read on the collection named; without one, only the readable collections.
    let export = call(&s, Some("web-secret"), "GET", "/export", None);
    assert_eq!(export.status, 200);
    let text = String::from_utf8(export.body).unwrap();
    assert!(
        text.contains("\"app-1\"") && text.contains("\"config\""),
        "{text}"
    );
    assert!(!text.contains("secrets"), "{text}");
    let all = call(&s, Some("ops-secret"), "GET", "/export", None);
    assert!(String::from_utf8(all.body).unwrap().contains("secrets"));
    let resp = call(
        &s,
        Some("web-secret"),
        "GET",
        "/export?collection=secrets",
        None,
    );
    assert_eq!(resp.status, 403);
    // /import: write on every collection the body names, or nothing is applied.
    let line = |c: &str| format!("{{\"collection\":\"{c}\",\"key\":\"new\",\"value\":1}}\n");
    let mixed = line("app-2") + &line("config");
    assert_eq!(
        call(&s, Some("web-secret"), "POST", "/import", Some(&mixed)).status,
        403
    );
    let resp = call(
        &s,
        Some("ops-secret"),
        "GET",
        "/objects/new?collection=app-2",
        None,
    );
    assert_eq!(resp.status, 404, "nothing applied");
    let ok = call(
        &s,
        Some("web-secret"),
        "POST",
        "/import",
        Some(&line("app-2")),
    );
    assert_eq!(ok.status, 200);
}
