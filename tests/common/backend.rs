//! Which database the kv under test stores in: SQLite in its data directory, as a newcomer's
//! `cargo test` runs it, or PostgreSQL when `KV_TEST_POSTGRES_URL` names a server (`.ci/postgres`
//! starts a throwaway one). On PostgreSQL every data directory gets a database of its own, named
//! from the directory, so a kv stopped and started again on the same directory sees its data, as
//! with SQLite; several nodes share one database by being given its URL.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// How long the tests wait for the PostgreSQL server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Every test database's name starts with this, then the test process's pid.
const DATABASE_PREFIX: &str = "kvt_";

/// The storage the tests run kv on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    /// The URL of a PostgreSQL server's maintenance database, from `KV_TEST_POSTGRES_URL`.
    Postgres(String),
}

/// The backend of this test run; panics when `KV_TEST_POSTGRES_URL` names a server that cannot be
/// reached, or when `KV_TEST_REQUIRE_POSTGRES=1` is set without one, so that CI fails instead of
/// quietly testing SQLite twice.
pub fn backend() -> &'static Backend {
    static BACKEND: OnceLock<Result<Backend, String>> = OnceLock::new();
    match BACKEND.get_or_init(find_backend) {
        Ok(backend) => backend,
        Err(e) => panic!("{e}"),
    }
}

/// True when kv runs on PostgreSQL in this test run.
pub fn on_postgres() -> bool {
    matches!(backend(), Backend::Postgres(_))
}

/// For a test that is about SQLite by nature: true (after saying why on stderr) when this run is on
/// PostgreSQL and the test should return at once. `if common::sqlite_only("…") { return; }`
pub fn sqlite_only(why: &str) -> bool {
    if on_postgres() {
        eprintln!("skipped on PostgreSQL: {why}");
        return true;
    }
    false
}

/// For a test that needs PostgreSQL: the server's URL, or None (after saying so on stderr) on
/// SQLite, where the test should return. With `KV_TEST_REQUIRE_POSTGRES=1` `backend` has already
/// failed the test instead.
pub fn postgres_only(why: &str) -> Option<String> {
    match backend() {
        Backend::Postgres(url) => Some(url.clone()),
        Backend::Sqlite => {
            eprintln!(
                "skipped: {why} needs PostgreSQL; set KV_TEST_POSTGRES_URL (see .ci/postgres)"
            );
            None
        }
    }
}

/// The `KV_DATABASE_URL` for a kv on the data directory `dir`: None on SQLite; on PostgreSQL the
/// URL of the directory's own database, created on first use.
pub fn database_url(dir: &Path) -> Option<String> {
    let Backend::Postgres(server) = backend() else {
        return None;
    };
    let name = database_name(dir);
    let mut client = connect(server).unwrap_or_else(|e| panic!("{e}"));
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .expect("look up a test database")
        .is_some();
    if !exists {
        // The name is ours ([a-z0-9_]), so it needs no quoting.
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    }
    Some(with_database(server, &name))
}

/// True when `KV_TEST_REQUIRE_POSTGRES=1`: what would skip for want of PostgreSQL fails instead.
pub fn postgres_required() -> bool {
    std::env::var("KV_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

fn find_backend() -> Result<Backend, String> {
    let required = postgres_required();
    let url = match std::env::var("KV_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ if required => {
            return Err("KV_TEST_REQUIRE_POSTGRES=1 but KV_TEST_POSTGRES_URL is not set".into());
        }
        _ => return Ok(Backend::Sqlite),
    };
    let mut client = connect(&url)?;
    drop_stale_databases(&mut client);
    Ok(Backend::Postgres(url))
}

fn connect(url: &str) -> Result<postgres::Client, String> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| format!("KV_TEST_POSTGRES_URL={url} is not a PostgreSQL URL: {e}"))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.connect(postgres::NoTls).map_err(|e| {
        // The error's own text is generic ("error connecting to server"); its source says why.
        let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
        format!("cannot reach PostgreSQL at KV_TEST_POSTGRES_URL={url}: {e}{cause}")
    })
}

/// `kvt_<pid>_<hash of the directory>`: the same for a directory all through one test process.
fn database_name(dir: &Path) -> String {
    // FNV-1a, 64 bits: stable across runs and Rust versions, unlike DefaultHasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{DATABASE_PREFIX}{}_{hash:016x}", std::process::id())
}

/// `server` with its database name replaced by `name`.
fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{host_part}/{name}?{query}"),
        None => format!("{host_part}/{name}"),
    }
}

/// Drops the databases of test processes that have ended, so that a developer's long-lived
/// cluster does not fill up run after run. A live process's databases are never touched; FORCE
/// ends the connections of any kv such a process left running when it was killed.
fn drop_stale_databases(client: &mut postgres::Client) {
    let Ok(rows) = client.query(
        "SELECT datname FROM pg_database WHERE datname LIKE $1",
        &[&format!("{DATABASE_PREFIX}%")],
    ) else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let pid = name
            .strip_prefix(DATABASE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok());
        let Some(pid) = pid else { continue };
        // SAFETY: signal 0 sends nothing; kill(2) only reports whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            // Another test process may be dropping it at the same moment; either one wins.
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}
