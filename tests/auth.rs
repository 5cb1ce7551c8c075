//! End-to-end tests of bearer tokens: `kv token new` and `kv token hash`.

mod common;

use std::io::Write;
use std::process::{Command, ExitStatus, Stdio};

use serde_json::Value;

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
