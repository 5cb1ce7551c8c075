//! Unit tests of the PostgreSQL backend: URLs, and (with `KV_TEST_POSTGRES_URL`) what only a
//! server can show: migrations under concurrency, the counter's lock, a lost COMMIT's answer.

use super::*;
use crate::store::DbError;

/// A fresh database on the server of `KV_TEST_POSTGRES_URL` (dropped with the value), or
/// `None` when it is unset: the end-to-end suite runs on PostgreSQL in CI, and so do these.
struct Fresh {
    target: Target,
    admin: Target,
    name: String,
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if let Ok(mut client) = self.admin.connect() {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn fresh_database() -> Option<Fresh> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Ok(url) = std::env::var("KV_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("KV_TEST_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "KV_TEST_REQUIRE_POSTGRES=1 but KV_TEST_POSTGRES_URL is not set"
        );
        return None;
    };
    let name = format!(
        "kv_unit_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let admin = Target::parse(&url, None).unwrap();
    let mut client = admin.connect().unwrap();
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let mut config = admin.config.clone();
    config.dbname(&name);
    let target = Target {
        shown: shown(&config, admin.tls),
        config,
        tls: admin.tls,
    };
    Some(Fresh {
        target,
        admin,
        name,
    })
}

#[test]
fn nodes_that_start_together_migrate_once() {
    let Some(fresh) = fresh_database() else {
        return;
    };
    let target = &fresh.target;
    let dir = tempfile::tempdir().unwrap();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let (target, dir) = (target.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || Postgres::open_and_migrate(&target, &dir).map(|_| ()))
        })
        .collect();
    for start in starts {
        start.join().unwrap().unwrap();
    }
    let store = Postgres::connect(target, dir.path()).unwrap();
    let version: i32 = store
        .query_one("SELECT version FROM kv_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version as usize, schema::MIGRATIONS.len());
    assert_eq!(store.revision().unwrap(), 0);
}

#[test]
fn a_commit_whose_answer_was_lost_is_found_and_a_rolled_back_one_is_not() {
    let Some(fresh) = fresh_database() else {
        return;
    };
    let target = &fresh.target;
    let dir = tempfile::tempdir().unwrap();
    let store = Postgres::open_and_migrate(target, dir.path()).unwrap();
    assert!(!store.committed(1).unwrap(), "nothing written yet");
    let rev = store.begin_write().unwrap().unwrap() + 1;
    store.put("c", "k", "1", rev, None).unwrap();
    store.set_revision(rev).unwrap();
    store.commit().unwrap();
    assert!(store.committed(rev).unwrap());
    // Another node's writer takes the next revision for another key; ours rolls back.
    let other = Postgres::connect(target, dir.path()).unwrap();
    let rev = store.begin_write().unwrap().unwrap() + 1;
    store.put("c", "mine", "2", rev, None).unwrap();
    store.rollback().unwrap();
    let theirs = other.begin_write().unwrap().unwrap() + 1;
    assert_eq!(theirs, rev, "the rolled-back revision is free again");
    other.put("c", "theirs", "3", theirs, None).unwrap();
    other.set_revision(theirs).unwrap();
    other.commit().unwrap();
    assert!(
        !store.committed(rev).unwrap(),
        "revision {rev} is in, but it is not our change"
    );
}

#[test]
fn the_counter_row_serialises_writers_and_revisions_follow_commit_order() {
    let Some(fresh) = fresh_database() else {
        return;
    };
    let target = &fresh.target;
    let dir = tempfile::tempdir().unwrap();
    let first = Postgres::open_and_migrate(target, dir.path()).unwrap();
    let second = Postgres::connect(target, dir.path()).unwrap();
    assert_eq!(first.begin_write().unwrap(), Some(0));
    first.put("c", "a", "1", 1, None).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiting = std::thread::spawn(move || {
        // Blocks on the counter's row lock until `first` commits, then sees its revision.
        let rev = second.begin_write().unwrap();
        tx.send(rev).unwrap();
        second.rollback().unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a second writer got the counter while the first held it"
    );
    first.set_revision(1).unwrap();
    first.commit().unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Some(1));
    waiting.join().unwrap();
}

#[test]
fn urls_parse_with_their_tls_mode_and_never_show_the_password() {
    let t = Target::parse(
        "postgres://kv:secret@db.example:6543/kv?sslmode=verify-full",
        None,
    )
    .unwrap();
    assert_eq!(t.tls, Tls::Verify);
    assert_eq!(
        t.to_string(),
        "postgres://kv@db.example:6543/kv (sslmode verify-full)"
    );
    assert!(!format!("{t:?}").contains("secret"));
    let t = Target::parse("postgresql:///kv?host=/run/postgresql", Some("pw")).unwrap();
    assert_eq!(t.tls, Tls::Prefer);
    let me = os_user().unwrap();
    assert_eq!(
        t.to_string(),
        format!("postgres://{me}@/run/postgresql/kv (sslmode prefer)")
    );
    assert_eq!(t.config.get_password(), Some(&b"pw"[..]));
    let t = Target::parse("postgres://kv@h/kv?sslmode=require&connect_timeout=2", None).unwrap();
    assert_eq!(t.tls, Tls::Require);
    assert_eq!(
        t.config.get_connect_timeout(),
        Some(&Duration::from_secs(2))
    );
}

#[test]
fn bad_urls_are_refused_with_the_reason() {
    let e = Target::parse("mysql://kv@h/kv", None).unwrap_err();
    assert!(e.contains("postgres://"), "{e}");
    let e = Target::parse("postgres://kv@h/kv?sslmode=always", None).unwrap_err();
    assert!(e.contains("sslmode=always"), "{e}");
    let e = Target::parse("postgres://kv@h/kv?nonsense=1", None).unwrap_err();
    assert!(e.contains("not a PostgreSQL URL"), "{e}");
}

#[test]
fn a_tombstone_of_an_unknown_kind_fails_the_feed_read_instead_of_ending_the_page() {
    let Some(fresh) = fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Postgres::open_and_migrate(&fresh.target, dir.path()).unwrap();
    store.put("c", "a", "1", 1, None).unwrap();
    store
        .control(
            "INSERT INTO tombstones (rev, collection, key, kind, deleted_at) VALUES (2, 'c', 'b', 9, 0);
             INSERT INTO changes (rev, collection, key) VALUES (2, 'c', 'b');
             UPDATE meta SET value = 2 WHERE name = 'revision'",
        )
        .unwrap();
    let mut seen = Vec::new();
    let read = store.changes(0, None, 10, false, |c| seen.push(c.rev));
    assert!(
        matches!(&read, Err(DbError::Unreadable(why)) if why.contains("kind 9")),
        "{read:?}"
    );
    assert_eq!(seen, [1]);
}
