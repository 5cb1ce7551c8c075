//! Settings, read once at startup from the environment and the command line, validated, then frozen.
//!
//! Environment variables keep the names of the design the API comes from (`PORT`, `DB_PATH`); every
//! other setting is `KV_` + the field name. Flags override the environment. Parsing takes the
//! environment as a function so the tests need not touch the process environment.

use std::fmt;
use std::path::PathBuf;

use crate::cli;
use crate::store::Database;

/// Default TCP port.
pub const DEFAULT_PORT: u16 = 3300;
/// Default listen address: loopback, because access is open unless a tokens file is given.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default data directory.
pub const DEFAULT_DB_PATH: &str = "./data";
/// The database file's name inside the data directory.
pub const DB_FILE: &str = "kv.sqlite3";
/// Default request body limit (16 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// SQLite cannot store a value over 1,000,000,000 bytes, so no body may be larger.
pub const MAX_MAX_BODY_BYTES: usize = 1_000_000_000;
/// Default read connections per CPU (see README, Concurrency).
pub const DEFAULT_WORKERS_PER_CPU: usize = 2;
/// Default idle/stalled socket timeout.
pub const DEFAULT_IO_TIMEOUT_SECS: u64 = 30;
/// Default largest `POST /import` body (1 GiB); it is spooled to disk, never held in memory.
pub const DEFAULT_MAX_IMPORT_BYTES: u64 = 1024 * 1024 * 1024;
/// Default time a client has to send a whole request head, from its first byte.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// Default connection cap (see README, Concurrency, for what it costs).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default maximum number of ops in one `POST /batch`.
pub const DEFAULT_MAX_BATCH_OPS: usize = 1000;
/// Default time the change feed remembers deletions (7 days).
pub const DEFAULT_CHANGES_RETENTION_SECS: u64 = 7 * 24 * 3600;
/// Default maximum number of long-polls and event streams waiting at once.
pub const DEFAULT_MAX_WAITERS: usize = 1024;

/// How hard a commit is pushed to disk before the client hears 200.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// `synchronous=FULL`: a 200 survives power loss.
    Full,
    /// `synchronous=NORMAL`: a 200 survives a crash of kv, but the last commits may be lost on power loss.
    Normal,
}

impl fmt::Display for Sync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sync::Full => "full",
            Sync::Normal => "normal",
        })
    }
}

/// The validated settings of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub db_path: PathBuf,
    pub sync: Sync,
    pub workers: usize,
    pub max_body_bytes: usize,
    pub io_timeout_secs: u64,
    pub header_timeout_secs: u64,
    pub max_connections: usize,
    pub max_batch_ops: usize,
    pub max_import_bytes: u64,
    /// The storage quota; `None`: no limit.
    pub max_db_bytes: Option<u64>,
    pub changes_retention_secs: u64,
    pub max_waiters: usize,
    /// Bearer tokens and their rights; `None`: access is open.
    pub tokens_file: Option<PathBuf>,
    /// Origins whose browser pages may call kv (CORS), lower-case; `["*"]` for any; empty: none.
    pub cors_origins: Vec<String>,
    /// PostgreSQL instead of SQLite (`postgres://...`); `None`: the SQLite file in `db_path`.
    pub database_url: Option<String>,
    /// A file holding the PostgreSQL password.
    pub database_password_file: Option<PathBuf>,
    /// Tests only: each write transaction waits up to this long before COMMIT.
    pub test_write_delay_ms: u64,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Config),
    /// `kv token ...`: manage bearer tokens, then exit.
    Token(cli::Token),
    /// `kv backup ...` or `kv restore ...`: copy a database, then exit.
    Copy(cli::Copy),
    Help,
    Version,
}

/// The `--help` text; also the list of environment variables the NixOS module may set.
pub const HELP: &str = "\
kv: a small, durable key-value store with an HTTP/JSON API

Usage: kv [--port PORT] [--host HOST] [--db-path DIR] [--tokens-file FILE] [--database-url URL]
       kv token new [--name NAME]
       kv token hash < TOKEN
       kv backup --out FILE [--db-path DIR | --database-url URL]  a consistent copy (a SQLite
                                                 file, also of PostgreSQL), also while kv runs
       kv restore --from FILE [--db-path DIR]   checks FILE, moves the database aside, puts FILE in place
       kv --help | --version

Options (override the environment):
  --port PORT      TCP port to listen on; 0 picks a free one            [env PORT, default 3300]
  --host HOST      address to listen on; 0.0.0.0 serves the network     [env KV_HOST, default 127.0.0.1]
  --db-path DIR    data directory, holds kv.sqlite3; created if missing  [env DB_PATH, default ./data]
  --tokens-file F  JSON file of token hashes and their rights            [env KV_TOKENS_FILE, default none: open]
  --database-url URL  PostgreSQL instead of SQLite: postgres://USER@HOST:PORT/DB, or
                   postgresql:///DB?host=/run/postgresql (Unix socket); sslmode=disable, prefer
                   (default), require or verify-full (system roots)  [env KV_DATABASE_URL, default none]
  --database-password-file F  file holding the PostgreSQL password  [env KV_DATABASE_PASSWORD_FILE]
  -h, --help       print this help
  -V, --version    print the version

Tokens (with a tokens file, requests need `Authorization: Bearer TOKEN`):
  kv token new [--name NAME]  print a new random token, then its entry for the tokens file
  kv token hash               print the SHA-256 of the token on stdin (one trailing newline is dropped)
  SIGHUP re-reads the tokens file; if it is missing or invalid, the tokens in force stay.

Environment:
  PORT                 see --port
  KV_HOST              see --host
  DB_PATH              see --db-path
  KV_TOKENS_FILE       see --tokens-file; without it every client may do everything
  KV_DATABASE_URL      see --database-url; several kv nodes may share one PostgreSQL database
  KV_DATABASE_PASSWORD_FILE  see --database-password-file (one trailing newline is dropped)
  KV_SYNC              full (default): a 200 survives power loss; normal: it survives a crash of kv only
  KV_WORKERS           read connections, requests reading at once (default 2 per CPU)
  KV_MAX_BODY_BYTES    largest request body in bytes (default 16777216); larger gets 413
  KV_IO_TIMEOUT_SECS   idle or stalled client connections are closed after this many seconds (default 30)
  KV_HEADER_TIMEOUT_SECS  a request head must arrive within this many seconds of its first byte
                       (default 10); a slower one gets 408
  KV_MAX_CONNECTIONS   most open connections (default 4096, fewer if the open files limit is lower);
                       at the cap a new one closes the longest-waiting idle or slow one
  KV_MAX_BATCH_OPS     most ops in one POST /batch (default 1000); more gets 413
  KV_MAX_IMPORT_BYTES  largest POST /import body in bytes (default 1073741824); larger gets 413
  KV_MAX_DB_BYTES      storage quota: database pages in use, in bytes (default: no limit); a write past it gets 507
  KV_CHANGES_RETENTION_SECS  how long GET /changes remembers deletions (default 604800, 7 days)
  KV_MAX_WAITERS       most long-polls and event streams of GET /changes at once (default 1024)
  KV_CORS_ORIGINS      origins whose web pages may call kv, comma-separated (https://app.example.com),
                       or * for any; default none: no CORS headers
  RUST_LOG             log filter: error, warn, info (default), debug (one line per request)
  KV_TEST_WRITE_DELAY_MS  tests only: each write transaction waits up to this many ms before COMMIT
";

impl Config {
    /// Parses the environment (looked up through `env`) and the arguments after the program name.
    pub fn parse(env: impl Fn(&str) -> Option<String>, args: &[String]) -> Result<Command, String> {
        if let Some((first, rest)) = args.split_first() {
            let defaults = || cli::CopyDefaults {
                db_path: env("DB_PATH")
                    .map_or_else(|| PathBuf::from(DEFAULT_DB_PATH), PathBuf::from),
                database_url: env("KV_DATABASE_URL").filter(|u| !u.trim().is_empty()),
                password_file: env("KV_DATABASE_PASSWORD_FILE")
                    .filter(|f| !f.trim().is_empty())
                    .map(PathBuf::from),
            };
            match first.as_str() {
                "token" => return cli::parse_token(rest).map(Command::Token),
                "backup" => return cli::parse_copy(false, rest, defaults()).map(Command::Copy),
                "restore" => return cli::parse_copy(true, rest, defaults()).map(Command::Copy),
                _ => {}
            }
        }
        let mut port = env("PORT");
        let mut host = env("KV_HOST");
        let mut db_path = env("DB_PATH");
        let mut tokens_file = env("KV_TOKENS_FILE");
        let mut database_url = env("KV_DATABASE_URL");
        let mut database_password_file = env("KV_DATABASE_PASSWORD_FILE");
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
                _ => (arg.as_str(), None),
            };
            let slot = match flag {
                "-h" | "--help" => return Ok(Command::Help),
                "-V" | "--version" => return Ok(Command::Version),
                "--port" => &mut port,
                "--host" => &mut host,
                "--db-path" => &mut db_path,
                "--tokens-file" => &mut tokens_file,
                "--database-url" => &mut database_url,
                "--database-password-file" => &mut database_password_file,
                _ => return Err(format!("unknown argument '{arg}' (see kv --help)")),
            };
            let value = match inline {
                Some(value) => value,
                None => rest
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))?,
            };
            *slot = Some(value);
        }
        if args.iter().any(|a| a.starts_with("--database-url")) {
            refuse_password_in_flag(database_url.as_deref())?;
        }

        let config = Config {
            host: match host {
                Some(h) if h.trim().is_empty() => return Err("KV_HOST must not be empty".into()),
                Some(h) => h.trim().to_string(),
                None => DEFAULT_HOST.to_string(),
            },
            port: parse_number("PORT", port, DEFAULT_PORT, 0, u16::MAX)?,
            db_path: match db_path {
                Some(p) if p.is_empty() => return Err("DB_PATH must not be empty".into()),
                Some(p) => PathBuf::from(p),
                None => PathBuf::from(DEFAULT_DB_PATH),
            },
            sync: match env("KV_SYNC").as_deref().map(str::trim) {
                None | Some("") => Sync::Full,
                Some(s) if s.eq_ignore_ascii_case("full") => Sync::Full,
                Some(s) if s.eq_ignore_ascii_case("normal") => Sync::Normal,
                Some(other) => {
                    return Err(format!("KV_SYNC must be 'full' or 'normal', not '{other}'"));
                }
            },
            workers: parse_number("KV_WORKERS", env("KV_WORKERS"), default_workers(), 1, 1024)?,
            max_body_bytes: parse_number(
                "KV_MAX_BODY_BYTES",
                env("KV_MAX_BODY_BYTES"),
                DEFAULT_MAX_BODY_BYTES,
                1,
                MAX_MAX_BODY_BYTES,
            )?,
            io_timeout_secs: parse_number(
                "KV_IO_TIMEOUT_SECS",
                env("KV_IO_TIMEOUT_SECS"),
                DEFAULT_IO_TIMEOUT_SECS,
                1,
                86_400,
            )?,
            header_timeout_secs: parse_number(
                "KV_HEADER_TIMEOUT_SECS",
                env("KV_HEADER_TIMEOUT_SECS"),
                DEFAULT_HEADER_TIMEOUT_SECS,
                1,
                3600,
            )?,
            max_connections: parse_number(
                "KV_MAX_CONNECTIONS",
                env("KV_MAX_CONNECTIONS"),
                DEFAULT_MAX_CONNECTIONS,
                1,
                1_000_000,
            )?,
            max_batch_ops: parse_number(
                "KV_MAX_BATCH_OPS",
                env("KV_MAX_BATCH_OPS"),
                DEFAULT_MAX_BATCH_OPS,
                1,
                1_000_000,
            )?,
            max_import_bytes: parse_number(
                "KV_MAX_IMPORT_BYTES",
                env("KV_MAX_IMPORT_BYTES"),
                DEFAULT_MAX_IMPORT_BYTES,
                1,
                u64::MAX / 2,
            )?,
            max_db_bytes: match env("KV_MAX_DB_BYTES") {
                Some(raw) if !raw.trim().is_empty() => Some(parse_number(
                    "KV_MAX_DB_BYTES",
                    Some(raw),
                    0,
                    4096,
                    u64::MAX / 2,
                )?),
                _ => None,
            },
            changes_retention_secs: parse_number(
                "KV_CHANGES_RETENTION_SECS",
                env("KV_CHANGES_RETENTION_SECS"),
                DEFAULT_CHANGES_RETENTION_SECS,
                1,
                100 * 365 * 24 * 3600,
            )?,
            max_waiters: parse_number(
                "KV_MAX_WAITERS",
                env("KV_MAX_WAITERS"),
                DEFAULT_MAX_WAITERS,
                0,
                1_000_000,
            )?,
            tokens_file: match tokens_file {
                // Empty is refused rather than read as "open": a typo must not open access.
                Some(f) if f.trim().is_empty() => {
                    return Err(
                        "KV_TOKENS_FILE must not be empty (unset it for open access)".into(),
                    );
                }
                Some(f) => Some(PathBuf::from(f)),
                None => None,
            },
            cors_origins: parse_origins(env("KV_CORS_ORIGINS").as_deref())?,
            database_url: parse_database_url(database_url)?,
            database_password_file: database_password_file
                .filter(|f| !f.trim().is_empty())
                .map(PathBuf::from),
            test_write_delay_ms: parse_number(
                "KV_TEST_WRITE_DELAY_MS",
                env("KV_TEST_WRITE_DELAY_MS"),
                0,
                0,
                10_000,
            )?,
        };
        Ok(Command::Run(config))
    }

    /// Reads the real process environment.
    pub fn from_process(args: &[String]) -> Result<Command, String> {
        Config::parse(|name| std::env::var(name).ok(), args)
    }

    /// Where the data lives: PostgreSQL when a URL is set (reading the password file now), else
    /// the SQLite file in the data directory.
    pub fn database(&self) -> Result<Database, String> {
        database(
            self.database_url.as_deref(),
            self.database_password_file.as_deref(),
            &self.db_path,
            self.sync,
        )
    }
}

/// Where the data lives, from a database URL (if any), a password file and the data directory.
pub fn database(
    url: Option<&str>,
    password_file: Option<&std::path::Path>,
    db_path: &std::path::Path,
    sync: Sync,
) -> Result<Database, String> {
    let Some(url) = url else {
        return Ok(Database::Sqlite {
            file: db_path.join(DB_FILE),
            sync,
        });
    };
    #[cfg(feature = "postgres")]
    {
        let password = match password_file {
            Some(file) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    format!(
                        "cannot read KV_DATABASE_PASSWORD_FILE {}: {e}",
                        file.display()
                    )
                })?;
                let text = text.strip_suffix('\n').unwrap_or(&text);
                Some(text.strip_suffix('\r').unwrap_or(text).to_string())
            }
            None => None,
        };
        Ok(Database::Postgres {
            target: Box::new(crate::store::postgres::Target::parse(
                url,
                password.as_deref(),
            )?),
            spool: db_path.to_path_buf(),
        })
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = (url, password_file);
        Err(
            "KV_DATABASE_URL is set, but this kv was built without PostgreSQL \
             (cargo feature \"postgres\")"
                .into(),
        )
    }
}

/// A password in `--database-url` would be on the command line, which every user of the machine
/// can read (`ps`): refused, with where to put it instead.
pub fn refuse_password_in_flag(url: Option<&str>) -> Result<(), String> {
    let Some(url) = url else { return Ok(()) };
    let authority = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split(['/', '?']).next().unwrap_or(""));
    match authority.rsplit_once('@') {
        Some((userinfo, _)) if userinfo.contains(':') => Err(
            "--database-url must not carry a password (the command line is visible to every \
             user): put it in a file named by KV_DATABASE_PASSWORD_FILE, or the URL in \
             KV_DATABASE_URL"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// `KV_DATABASE_URL`: empty means unset; the URL itself is parsed when the database is opened.
fn parse_database_url(url: Option<String>) -> Result<Option<String>, String> {
    match url.map(|u| u.trim().to_string()) {
        None => Ok(None),
        Some(u) if u.is_empty() => Ok(None),
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => Ok(Some(u)),
        Some(_) => Err(
            "KV_DATABASE_URL must start with postgres:// or postgresql:// \
             (e.g. postgres://kv@localhost/kv)"
                .into(),
        ),
    }
}

/// Two read connections per CPU: a read holds one only while it reads, so more only add memory,
/// but a spare one per CPU keeps a slow read (a LIST of a huge collection) from stalling the rest.
pub fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * DEFAULT_WORKERS_PER_CPU).clamp(2, 64)
}

/// `KV_CORS_ORIGINS`: `*`, or a comma-separated list of origins (`scheme://host[:port]`, no path),
/// lower-cased as browsers send them. A malformed entry is an error rather than skipped, because an
/// origin that can never match would fail in browsers with no word on the server.
fn parse_origins(raw: Option<&str>) -> Result<Vec<String>, String> {
    let Some(raw) = raw.map(str::trim).filter(|raw| !raw.is_empty()) else {
        return Ok(Vec::new());
    };
    if raw == "*" {
        return Ok(vec!["*".to_string()]);
    }
    raw.split(',')
        .map(str::trim)
        .map(|origin| {
            let bad = |why: &str| format!("KV_CORS_ORIGINS: {origin:?} {why}");
            if origin == "*" {
                return Err(bad("may only stand alone: * allows every origin"));
            }
            let (scheme, host) = origin
                .split_once("://")
                .ok_or_else(|| bad("is not an origin like https://app.example.com"))?;
            let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            if !scheme_ok {
                return Err(bad("has no valid scheme (like https://)"));
            }
            if host.is_empty() || host.contains(['/', '?', '#', ' ', '*']) {
                return Err(bad(
                    "must be scheme://host[:port] only, without a path or a trailing /",
                ));
            }
            Ok(origin.to_ascii_lowercase())
        })
        .collect()
}

fn parse_number<T>(name: &str, raw: Option<String>, default: T, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(raw) = raw else {
        return Ok(default);
    };
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(default);
    }
    match trimmed.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(format!(
            "{name} must be a whole number from {min} to {max}, not '{raw}'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(env: &[(&str, &str)], args: &[&str]) -> Result<Command, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Config::parse(|name| env.get(name).cloned(), &args)
    }

    fn config(env: &[(&str, &str)], args: &[&str]) -> Config {
        match parse(env, args) {
            Ok(Command::Run(c)) => c,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn a_database_url_is_taken_from_env_or_flag_but_a_password_only_from_the_env() {
        let url = "postgres://kv@db.example/kv";
        assert_eq!(
            config(&[("KV_DATABASE_URL", url)], &[])
                .database_url
                .as_deref(),
            Some(url)
        );
        assert_eq!(
            config(
                &[("KV_DATABASE_URL", "postgres://x@y/z")],
                &["--database-url", url]
            )
            .database_url
            .as_deref(),
            Some(url)
        );
        assert_eq!(config(&[("KV_DATABASE_URL", " ")], &[]).database_url, None);
        let secret = "postgres://kv:hunter2@db.example/kv";
        let err = parse(&[], &["--database-url", secret]).unwrap_err();
        assert!(err.contains("KV_DATABASE_PASSWORD_FILE"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse(&[], &[&format!("--database-url={secret}")]).unwrap_err();
        assert!(err.contains("must not carry a password"), "{err}");
        assert!(parse(&[], &["backup", "--out", "f", "--database-url", secret]).is_err());
        // From the environment, where other users cannot read it, it is accepted.
        assert_eq!(
            config(&[("KV_DATABASE_URL", secret)], &[])
                .database_url
                .as_deref(),
            Some(secret)
        );
        let err = parse(&[("KV_DATABASE_URL", "mysql://kv@h/kv")], &[]).unwrap_err();
        assert!(err.contains("postgres://"), "{err}");
    }

    #[test]
    fn defaults_are_embedded() {
        let c = config(&[], &[]);
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 3300);
        assert_eq!(c.db_path, PathBuf::from("./data"));
        match c.database().unwrap() {
            Database::Sqlite { file, sync } => {
                assert_eq!(
                    (file, sync),
                    (PathBuf::from("./data/kv.sqlite3"), Sync::Full)
                )
            }
            #[cfg(feature = "postgres")]
            other => panic!("{other}"),
        }
        assert_eq!(c.sync, Sync::Full);
        assert_eq!(c.workers, default_workers());
        assert!(c.workers >= 2);
        assert_eq!(c.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.io_timeout_secs, 30);
        assert_eq!(c.header_timeout_secs, 10);
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.max_batch_ops, 1000);
        assert_eq!(c.changes_retention_secs, 604_800);
        assert_eq!(c.max_waiters, 1024);
        assert_eq!(c.tokens_file, None);
        assert!(c.cors_origins.is_empty());
    }

    #[test]
    fn cors_origins_are_a_list_or_a_star() {
        let origins = |raw: &str| config(&[("KV_CORS_ORIGINS", raw)], &[]).cors_origins;
        assert_eq!(
            origins(" https://App.example.com , http://localhost:5173,tauri://localhost"),
            [
                "https://app.example.com",
                "http://localhost:5173",
                "tauri://localhost"
            ]
        );
        assert_eq!(origins("*"), ["*"]);
        assert!(origins("").is_empty());
        for bad in [
            "https://a.example,*",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://",
            "null",
            "1http://a",
            "https://a.example,,https://b.example",
            "https://*.example.com",
        ] {
            let err = parse(&[("KV_CORS_ORIGINS", bad)], &[]).unwrap_err();
            assert!(err.starts_with("KV_CORS_ORIGINS"), "{bad}: {err}");
        }
    }

    #[test]
    fn environment_is_read() {
        let c = config(
            &[
                ("PORT", "0"),
                ("KV_HOST", "0.0.0.0"),
                ("DB_PATH", "/var/lib/kv"),
                ("KV_SYNC", "normal"),
                ("KV_WORKERS", "3"),
                ("KV_MAX_BODY_BYTES", "1024"),
                ("KV_IO_TIMEOUT_SECS", "5"),
                ("KV_HEADER_TIMEOUT_SECS", "2"),
                ("KV_MAX_CONNECTIONS", "64"),
                ("KV_MAX_BATCH_OPS", "10"),
                ("KV_CHANGES_RETENTION_SECS", "1"),
                ("KV_MAX_WAITERS", "0"),
                ("KV_TOKENS_FILE", "/etc/kv/tokens.json"),
            ],
            &[],
        );
        assert_eq!(c.port, 0);
        assert_eq!(c.host, "0.0.0.0");
        assert_eq!(c.db_path, PathBuf::from("/var/lib/kv"));
        assert_eq!(c.sync, Sync::Normal);
        assert_eq!(c.workers, 3);
        assert_eq!(c.max_body_bytes, 1024);
        assert_eq!(c.io_timeout_secs, 5);
        assert_eq!(c.header_timeout_secs, 2);
        assert_eq!(c.max_connections, 64);
        assert_eq!(c.max_batch_ops, 10);
        assert_eq!(c.changes_retention_secs, 1);
        assert_eq!(c.max_waiters, 0);
        assert_eq!(c.tokens_file, Some(PathBuf::from("/etc/kv/tokens.json")));
    }

    #[test]
    fn flags_override_environment() {
        let c = config(
            &[
                ("PORT", "1"),
                ("KV_HOST", "::1"),
                ("DB_PATH", "/a"),
                ("KV_TOKENS_FILE", "/t1"),
            ],
            &[
                "--port",
                "4000",
                "--host=0.0.0.0",
                "--db-path",
                "/b",
                "--tokens-file",
                "/t2",
            ],
        );
        assert_eq!(c.port, 4000);
        assert_eq!(c.host, "0.0.0.0");
        assert_eq!(c.db_path, PathBuf::from("/b"));
        assert_eq!(c.tokens_file, Some(PathBuf::from("/t2")));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&[], &["--help"]), Ok(Command::Help));
        assert_eq!(parse(&[], &["-h"]), Ok(Command::Help));
        assert_eq!(parse(&[], &["--version"]), Ok(Command::Version));
        assert_eq!(parse(&[], &["-V"]), Ok(Command::Version));
    }

    #[test]
    fn token_is_a_subcommand() {
        assert_eq!(
            parse(&[], &["token", "hash"]),
            Ok(Command::Token(cli::Token::Hash))
        );
        // Only in first place: a flag's value "token" is just a value.
        assert_eq!(config(&[], &["--host", "token"]).host, "token");
    }

    #[test]
    fn bad_values_are_refused_with_their_name() {
        for (env, needle) in [
            (("PORT", "abc"), "PORT"),
            (("PORT", "70000"), "PORT"),
            (("PORT", "-1"), "PORT"),
            (("KV_SYNC", "sometimes"), "KV_SYNC"),
            (("KV_WORKERS", "0"), "KV_WORKERS"),
            (("KV_MAX_BODY_BYTES", "2000000000"), "KV_MAX_BODY_BYTES"),
            (("KV_IO_TIMEOUT_SECS", "0"), "KV_IO_TIMEOUT_SECS"),
            (("KV_HEADER_TIMEOUT_SECS", "0"), "KV_HEADER_TIMEOUT_SECS"),
            (("KV_MAX_CONNECTIONS", "0"), "KV_MAX_CONNECTIONS"),
            (("KV_MAX_BATCH_OPS", "x"), "KV_MAX_BATCH_OPS"),
            (
                ("KV_CHANGES_RETENTION_SECS", "0"),
                "KV_CHANGES_RETENTION_SECS",
            ),
            (("KV_MAX_WAITERS", "-1"), "KV_MAX_WAITERS"),
            (("DB_PATH", ""), "DB_PATH"),
            (("KV_TOKENS_FILE", " "), "KV_TOKENS_FILE"),
        ] {
            let err = parse(&[env], &[]).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        assert!(
            parse(&[], &["--port"])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            parse(&[], &["--frobnicate"])
                .unwrap_err()
                .contains("unknown")
        );
    }

    #[test]
    fn help_documents_every_variable() {
        for name in [
            "PORT",
            "KV_HOST",
            "DB_PATH",
            "KV_SYNC",
            "KV_WORKERS",
            "KV_MAX_BODY_BYTES",
            "KV_IO_TIMEOUT_SECS",
            "KV_HEADER_TIMEOUT_SECS",
            "KV_MAX_CONNECTIONS",
            "KV_MAX_BATCH_OPS",
            "KV_MAX_IMPORT_BYTES",
            "KV_MAX_DB_BYTES",
            "KV_CHANGES_RETENTION_SECS",
            "KV_MAX_WAITERS",
            "KV_TOKENS_FILE",
            "KV_CORS_ORIGINS",
            "RUST_LOG",
        ] {
            assert!(HELP.contains(name), "{name} missing from --help");
        }
    }
}
