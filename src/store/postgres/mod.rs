//! The PostgreSQL backend, for several kv nodes serving one dataset: the same tables and the same
//! answers as SQLite. The schema lives in `schema.rs`, objects and collections in `objects.rs`,
//! the change feed in `changes.rs`, and the copy of a snapshot into a SQLite file (the backup) in
//! `copy.rs`.
//!
//! One `Postgres` is one connection (the synchronous `postgres` client; its runtime stays inside
//! the crate). A lost connection is opened again by the next call outside a transaction, so kv
//! recovers by itself when the database comes back. Every write transaction locks the revision
//! counter's row first (`begin_write`) and keeps it until COMMIT, so writers on all nodes take
//! revisions one transaction at a time and revision order is commit order: a change feed reader
//! never sees a revision commit after a higher one (a sequence would allow that).

mod changes;
mod copy;
mod objects;
mod schema;
mod tls;

use std::cell::{Cell, RefCell, RefMut};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row, Statement};

use super::{Stats, count};

/// How long a connection attempt may take when the URL does not say (`connect_timeout=`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parameters of a statement.
type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Where the database is and how to reach it: a parsed `KV_DATABASE_URL` with its password.
#[derive(Clone)]
pub struct Target {
    config: Config,
    tls: Tls,
    /// The URL without its password, for messages.
    shown: String,
}

/// How the connection is encrypted (the URL's `sslmode`, as libpq reads it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tls {
    /// `disable`: never.
    Off,
    /// `prefer` (libpq's default): TLS if the server offers it, certificate unchecked.
    Prefer,
    /// `require`: TLS or no connection, certificate unchecked (as libpq does without a root file).
    Require,
    /// `verify-full` (and `verify-ca`, checked as strictly): TLS with a certificate for this host
    /// from a certificate authority the system trusts.
    Verify,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({})", self.shown)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Target {
    /// Parses a `postgres://` or `postgresql://` URL (libpq's forms, including
    /// `postgresql:///db?host=/run/postgresql` for a Unix socket); `password`, when given,
    /// replaces one in the URL.
    pub fn parse(url: &str, password: Option<&str>) -> Result<Target, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(
                "KV_DATABASE_URL must start with postgres:// or postgresql:// \
                 (e.g. postgres://kv@localhost/kv)"
                    .into(),
            );
        }
        // The `postgres` crate knows disable, prefer and require; kv adds libpq's verify modes.
        let mut tls = Tls::Prefer;
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", mode)) => {
                    tls = match mode {
                        "disable" => Tls::Off,
                        "allow" | "prefer" => Tls::Prefer,
                        "require" => Tls::Require,
                        "verify-ca" | "verify-full" => Tls::Verify,
                        other => {
                            return Err(format!(
                                "KV_DATABASE_URL: sslmode={other} is not one of disable, prefer, \
                                 require, verify-ca, verify-full"
                            ));
                        }
                    }
                }
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: Config = rest
            .parse()
            .map_err(|e| format!("KV_DATABASE_URL is not a PostgreSQL URL kv can use: {e}"))?;
        if let Some(password) = password {
            config.password(password);
        }
        if config.get_user().is_none() {
            // libpq's default, which peer authentication over the Unix socket relies on.
            config.user(
                &os_user()
                    .ok_or("KV_DATABASE_URL names no user, and the user kv runs as has no name")?,
            );
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("kv");
        config.ssl_mode(match tls {
            Tls::Off => postgres::config::SslMode::Disable,
            Tls::Prefer => postgres::config::SslMode::Prefer,
            Tls::Require | Tls::Verify => postgres::config::SslMode::Require,
        });
        Ok(Target {
            shown: shown(&config, tls),
            config,
            tls,
        })
    }

    fn connect(&self) -> Result<Client, postgres::Error> {
        match self.tls {
            Tls::Off => self.config.connect(NoTls),
            Tls::Prefer | Tls::Require => self.config.connect(tls::connector(false)),
            Tls::Verify => self.config.connect(tls::connector(true)),
        }
    }
}

/// The name of the user this process runs as.
fn os_user() -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `entry` and `buf`, both ours and large enough (it reports
    // ERANGE otherwise), and sets `found` to `&entry` or null.
    let status = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut entry,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() || entry.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points at a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
    name.to_str().ok().map(str::to_string)
}

/// The URL as messages show it: user, hosts, database and TLS mode, never the password.
fn shown(config: &Config, tls: Tls) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
            postgres::config::Host::Unix(dir) => format!("{}", dir.display()),
        })
        .collect();
    let tls = match tls {
        Tls::Off => "disable",
        Tls::Prefer => "prefer",
        Tls::Require => "require",
        Tls::Verify => "verify-full",
    };
    format!(
        "postgres://{}@{}/{} (sslmode {tls})",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// The server is gone or cannot be reached: the request gets 503, the writer retries.
pub(crate) fn is_unavailable(e: &postgres::Error) -> bool {
    match e.code() {
        // No SQLSTATE: the error is the connection's (refused, reset, closed, timed out).
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                    SqlState::READ_ONLY_SQL_TRANSACTION,
                ]
                .contains(code)
        }
    }
}

/// A serialization failure or a deadlock: the transaction may simply run again.
pub(crate) fn is_transient(e: &postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
    })
}

pub(crate) fn is_disk_full(e: &postgres::Error) -> bool {
    e.code().is_some_and(|code| *code == SqlState::DISK_FULL)
}

/// One connection to PostgreSQL with kv's statements.
pub struct Postgres {
    target: Arc<Target>,
    spool: PathBuf,
    client: RefCell<Client>,
    /// Prepared statements of this connection, by their SQL.
    statements: RefCell<HashMap<&'static str, Statement>>,
    /// A transaction is open: a lost connection must fail it, never be silently replaced.
    in_transaction: Cell<bool>,
    /// The latest change this connection wrote: (revision, collection, key).
    last_change: RefCell<Option<(u64, String, String)>>,
}

impl Postgres {
    /// Connects to the database.
    pub fn connect(target: &Target, spool: &Path) -> Result<Postgres, postgres::Error> {
        Ok(Postgres {
            client: RefCell::new(target.connect()?),
            target: Arc::new(target.clone()),
            spool: spool.to_path_buf(),
            statements: RefCell::new(HashMap::new()),
            in_transaction: Cell::new(false),
            last_change: RefCell::new(None),
        })
    }

    /// Connects and brings the schema up to date, with errors worded for kv's one startup line.
    pub fn open_and_migrate(target: &Target, spool: &Path) -> Result<Postgres, String> {
        std::fs::create_dir_all(spool)
            .map_err(|e| format!("cannot create the data directory {}: {e}", spool.display()))?;
        let mut store = Postgres::connect(target, spool)
            .map_err(|e| format!("cannot connect to {target}: {}", describe(&e)))?;
        store
            .migrate()
            .map_err(|e| format!("cannot use the database {target}: {e}"))?;
        Ok(store)
    }

    /// Another connection to the same database.
    pub fn reopen(&self) -> Result<Postgres, postgres::Error> {
        Postgres::connect(&self.target, &self.spool)
    }

    /// The data directory (for temporary files).
    pub fn spool(&self) -> &Path {
        &self.spool
    }

    /// The connection, opened again first if it was lost (never inside a transaction).
    fn client(&self) -> Result<RefMut<'_, Client>, postgres::Error> {
        let mut client = self.client.borrow_mut();
        if client.is_closed() && !self.in_transaction.get() {
            self.statements.borrow_mut().clear();
            *client = self.target.connect()?;
            log::info!("connected to {} again", self.target);
        }
        Ok(client)
    }

    /// The statement for `sql`, prepared once per connection.
    fn statement(
        &self,
        client: &mut Client,
        sql: &'static str,
    ) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql)?;
        self.statements.borrow_mut().insert(sql, statement.clone());
        Ok(statement)
    }

    fn query(&self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        let mut client = self.client()?;
        let statement = self.statement(&mut client, sql)?;
        client.query(&statement, params)
    }

    fn query_opt(
        &self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, postgres::Error> {
        let mut client = self.client()?;
        let statement = self.statement(&mut client, sql)?;
        client.query_opt(&statement, params)
    }

    fn query_one(&self, sql: &'static str, params: &Params<'_>) -> Result<Row, postgres::Error> {
        let mut client = self.client()?;
        let statement = self.statement(&mut client, sql)?;
        client.query_one(&statement, params)
    }

    fn execute(&self, sql: &'static str, params: &Params<'_>) -> Result<u64, postgres::Error> {
        let mut client = self.client()?;
        let statement = self.statement(&mut client, sql)?;
        client.execute(&statement, params)
    }

    /// Calls `each` with the rows as they arrive from the server (never all held at once), until
    /// it returns false.
    fn for_each_row(
        &self,
        sql: &'static str,
        params: &Params<'_>,
        mut each: impl FnMut(&Row) -> Result<bool, postgres::Error>,
    ) -> Result<(), postgres::Error> {
        use postgres::fallible_iterator::FallibleIterator;
        let mut client = self.client()?;
        let statement = self.statement(&mut client, sql)?;
        let mut rows = client.query_raw(&statement, params.iter().copied())?;
        while let Some(row) = rows.next()? {
            if !each(&row)? {
                break;
            }
        }
        Ok(())
    }

    /// Runs transaction control statements (no parameters, one round trip).
    fn control(&self, sql: &str) -> Result<(), postgres::Error> {
        self.client()?.batch_execute(sql)
    }

    pub fn begin_read(&self) -> Result<(), postgres::Error> {
        self.control("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
        self.in_transaction.set(true);
        Ok(())
    }

    pub fn end_read(&self) -> Result<(), postgres::Error> {
        self.in_transaction.set(false);
        self.control("COMMIT")
    }

    /// Begins the writer's transaction and locks the revision counter until it ends, returning
    /// the counter: no other node's writer can take a revision meanwhile.
    pub fn begin_write(&self) -> Result<Option<u64>, postgres::Error> {
        self.control("BEGIN")?;
        self.in_transaction.set(true);
        let row = self.query_one(
            "UPDATE meta SET value = value WHERE name = 'revision' RETURNING value",
            &[],
        )?;
        Ok(Some(count(row.get(0))))
    }

    pub fn commit(&self) -> Result<(), postgres::Error> {
        let committed = self.control("COMMIT");
        self.in_transaction.set(false);
        committed
    }

    pub fn rollback(&self) -> Result<(), postgres::Error> {
        if !self.in_transaction.get() {
            return Ok(());
        }
        self.in_transaction.set(false);
        if self.client.borrow().is_closed() {
            // The server rolled it back when the connection went.
            return Ok(());
        }
        self.control("ROLLBACK")
    }

    pub fn savepoint(&self) -> Result<(), postgres::Error> {
        self.control("SAVEPOINT batch")
    }

    pub fn rollback_to_savepoint(&self) -> Result<(), postgres::Error> {
        self.control("ROLLBACK TO SAVEPOINT batch; RELEASE SAVEPOINT batch")
    }

    pub fn release_savepoint(&self) -> Result<(), postgres::Error> {
        self.control("RELEASE SAVEPOINT batch")
    }

    /// Remembers the latest change written, to tell later whether its COMMIT got through.
    fn wrote(&self, rev: u64, collection: &str, key: &str) {
        *self.last_change.borrow_mut() = Some((rev, collection.to_string(), key.to_string()));
    }

    /// After the connection went during the COMMIT of a transaction whose last change took
    /// revision `rev`: whether that change is in (so the COMMIT got through). Revisions are
    /// unique store-wide, so the change log's entry at `rev` is this transaction's only if it
    /// names the same key.
    pub fn committed(&self, rev: u64) -> Result<bool, postgres::Error> {
        let Some((last, collection, key)) = self.last_change.borrow().clone() else {
            return Ok(false);
        };
        if last != rev {
            return Ok(false);
        }
        let row = self.query_one(
            "SELECT EXISTS (SELECT 1 FROM changes WHERE rev = $1 AND collection = $2 AND key = $3)",
            &[&(rev as i64), &collection, &key],
        )?;
        Ok(row.get(0))
    }

    pub fn is_autocommit(&self) -> bool {
        !self.in_transaction.get()
    }

    pub fn ping(&self) -> Result<(), postgres::Error> {
        self.query("SELECT 1 FROM kv LIMIT 0", &[]).map(|_| ())
    }

    /// The database's size on disk (tables, indexes and their free space).
    pub fn used_bytes(&self) -> Result<u64, postgres::Error> {
        let row = self.query_one("SELECT pg_database_size(current_database())", &[])?;
        Ok(count(row.get(0)))
    }

    /// Sizes and counts for the metrics, from one snapshot. PostgreSQL's WAL is the server's, not
    /// kv's: it reports 0.
    pub fn stats(&self) -> Result<Stats, postgres::Error> {
        self.begin_read()?;
        let stats = (|| {
            let database_bytes = self.used_bytes()?;
            Ok(Stats {
                objects: self.object_count()?,
                collections: count(
                    self.query_one("SELECT count(*) FROM collections WHERE count > 0", &[])?
                        .get(0),
                ),
                database_bytes,
                wal_bytes: 0,
                used_bytes: database_bytes,
                revision: self.revision()?,
            })
        })();
        self.end_read()?;
        stats
    }
}

/// A connection error worded for a person: the server's message when there is one.
pub(crate) fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests;
