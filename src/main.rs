//! kv: wiring only. Read the settings (or run a `kv token`, `kv backup` or `kv restore`
//! subcommand), load the tokens, open and migrate the database, start the writer and the HTTP
//! connection threads, wait for a signal (or a fatal error), stop in order, and turn the outcome
//! into an exit code.

mod api;
mod auth;
mod cli;
mod config;
mod error;
mod http;
mod metrics;
mod space;
mod store;
mod watch;
mod writer;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::Duration;

use config::{Command, Config};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match Config::from_process(&args) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Token(token)) => return exit(cli::token(&token)),
        Ok(Command::Copy(copy)) => return exit(cli::copy(&copy)),
        Ok(Command::Help) => return print(config::HELP),
        Ok(Command::Version) => return print(&format!("kv {}\n", env!("CARGO_PKG_VERSION"))),
        Err(e) => return fail(&e),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        // The PostgreSQL client logs every statement with its parameters (values, at debug).
        .filter_module("tokio_postgres", log::LevelFilter::Warn)
        .filter_module("postgres", log::LevelFilter::Warn)
        .init();
    exit(run(&config))
}

fn run(config: &Config) -> Result<(), String> {
    let auth = Arc::new(auth::Auth::from_config(config)?);
    // First, before any thread starts: every later thread must inherit SIGHUP blocked (see auth.rs).
    auth::reload_on_sighup(&auth)?;
    let database = config.database()?;
    let store = store::Store::open_and_migrate(&database)?;
    // Held until exit: `kv restore` refuses to replace the database of a running kv.
    let _lock = store::backup::DirLock::acquire(&config.db_path)?;
    let rev = store
        .revision()
        .map_err(|e| format!("cannot read the revision: {e}"))?;
    let watch = Arc::new(watch::Watch::new(rev, config.max_waiters));
    let retention = Duration::from_secs(config.changes_retention_secs);
    let metrics =
        Arc::new(metrics::Metrics::new().map_err(|e| format!("cannot set up the metrics: {e}"))?);
    let used = store
        .used_bytes()
        .map_err(|e| format!("cannot read the database size: {e}"))?;
    let space = Arc::new(space::Space::new(
        &config.db_path,
        used,
        config.max_db_bytes,
    ));
    let writer = writer::Writer::start(
        store,
        watch.clone(),
        metrics.clone(),
        space.clone(),
        writer::Settings {
            retention,
            write_delay_ms: config.test_write_delay_ms,
        },
    )
    .map_err(|e| format!("cannot start the writer: {e}"))?;
    let (stops, stop) = channel();
    let on_signal = stops.clone();
    ctrlc::set_handler(move || {
        let _ = on_signal.send(http::Stop::Signal);
    })
    .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    let services = http::Services {
        watch,
        metrics,
        space,
        auth,
    };
    let server = http::serve(config, &database, &writer, services, stops)?;
    log::info!(
        "kv {} listening on http://{} (database {database}, {} read connections)",
        env!("CARGO_PKG_VERSION"),
        server.addr,
        config.workers
    );
    let reason = stop.recv().unwrap_or(http::Stop::Signal);
    log::info!("stopping ({reason:?})");
    server.stop(writer);
    log::info!("stopped");
    match reason {
        http::Stop::Signal => Ok(()),
        http::Stop::Fatal(e) => Err(e),
    }
}

fn exit(outcome: Result<(), String>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn print(text: &str) -> ExitCode {
    print!("{text}");
    ExitCode::SUCCESS
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}
