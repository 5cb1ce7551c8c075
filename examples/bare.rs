//! The reference server for `bench/run.sh`: tiny_http with nothing behind it. It reads each request's
//! body (as kv does) and answers every request, whatever its method and path, with the same fixed
//! JSON body, so kv's throughput can be read as a fraction of what its HTTP layer alone allows on the
//! same machine in the same run.
//!
//! Usage: `bare [PORT [WORKERS [BODY_BYTES]]]`, or the environment variables `PORT` (default 3301; 0
//! picks a free port), `WORKERS` (default 8, like kv) and `BODY_BYTES` (default 100). The body is
//! `{"key":"k1","value":"xxx…"}` padded to `BODY_BYTES`. It prints
//! `bare listening on http://127.0.0.1:PORT …` on stderr once it accepts connections.
//!
//! The listening socket is ours, with TCP_NODELAY, because tiny_http's own listener has none and
//! then a response over ~1 KiB (written as separate header and body writes) waits ~40 ms for a
//! delayed ACK. Accepted sockets inherit the option on Linux.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use socket2::{Domain, Protocol, Socket, Type};

const DEFAULT_PORT: u16 = 3301;
const DEFAULT_WORKERS: usize = 8;
const DEFAULT_BODY_BYTES: usize = 100;
/// Connection threads started up front: tiny_http's default pool of 4 answers a burst of new
/// keep-alive connections late (it starts more threads only as earlier ones are taken).
const MIN_CONNECTION_THREADS: usize = 64;
/// Largest request body read (a bigger one is read this far and answered anyway), as kv's default.
const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
const LISTEN_BACKLOG: i32 = 1024;
/// The shortest body: `{"key":"k1","value":""}`.
const MIN_BODY_BYTES: usize = 23;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The positional argument at `index`, else the environment variable `name`, else `default`.
fn setting<T: std::str::FromStr>(
    args: &[String],
    index: usize,
    name: &str,
    default: T,
) -> Result<T, String> {
    let text = args
        .get(index)
        .cloned()
        .or_else(|| std::env::var(name).ok());
    match text {
        None => Ok(default),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{name} must be a number, not {text:?}")),
    }
}

/// `{"key":"k1","value":"xxx…"}` of exactly `bytes` bytes (at least `MIN_BODY_BYTES`).
fn body_of(bytes: usize) -> String {
    let padding = bytes.saturating_sub(MIN_BODY_BYTES);
    format!(r#"{{"key":"k1","value":"{}"}}"#, "x".repeat(padding))
}

fn listen(port: u16) -> Result<TcpListener, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let cannot = |e: std::io::Error| format!("cannot listen on {addr}: {e}");
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(cannot)?;
    socket.set_reuse_address(true).map_err(cannot)?;
    socket.set_tcp_nodelay(true).map_err(cannot)?;
    socket.bind(&addr.into()).map_err(cannot)?;
    socket.listen(LISTEN_BACKLOG).map_err(cannot)?;
    Ok(socket.into())
}

fn run(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: bare [PORT [WORKERS [BODY_BYTES]]] (or env PORT, WORKERS, BODY_BYTES)");
        return Ok(());
    }
    let port: u16 = setting(args, 0, "PORT", DEFAULT_PORT)?;
    let workers: usize = setting(args, 1, "WORKERS", DEFAULT_WORKERS)?;
    let body_bytes: usize = setting(args, 2, "BODY_BYTES", DEFAULT_BODY_BYTES)?;
    if workers == 0 {
        return Err("WORKERS must be at least 1".into());
    }
    let body = body_of(body_bytes);
    let json = tiny_http::Header::from_bytes("Content-Type", "application/json")
        .map_err(|e| format!("cannot build the Content-Type header: {e:?}"))?;

    let listener = listen(port)?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let config = tiny_http::ServerConfig::new_http(addr)
        .map_err(|e| e.to_string())?
        .set_min_threads(MIN_CONNECTION_THREADS);
    let server =
        tiny_http::Server::from_listener(listener, tiny_http::ListenAddr::IP(addr), config)
            .map_err(|e| format!("cannot start the server: {e}"))?;
    let server = Arc::new(server);

    let mut handles = Vec::with_capacity(workers);
    for n in 0..workers {
        let (server, body, json) = (server.clone(), body.clone(), json.clone());
        let handle = thread::Builder::new()
            .name(format!("bare-worker-{n}"))
            .spawn(move || serve(&server, &body, &json))
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        handles.push(handle);
    }
    eprintln!(
        "bare listening on http://{addr} ({workers} workers, {} byte body)",
        body.len()
    );
    let mut failed = false;
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("error: {e}");
                failed = true;
            }
            Err(_) => {
                eprintln!("error: a worker thread panicked");
                failed = true;
            }
        }
    }
    if failed {
        Err("the server stopped".into())
    } else {
        Ok(())
    }
}

/// Answers requests until the server fails (tiny_http stops accepting after an accept error).
fn serve(server: &tiny_http::Server, body: &str, json: &tiny_http::Header) -> Result<(), String> {
    let mut scratch = Vec::new();
    loop {
        let mut request = match server.recv() {
            Ok(Ok(request)) => request,
            // A malformed request: tiny_http has answered it (400) or the client left.
            Ok(Err(_)) => continue,
            Err(e) => return Err(format!("cannot receive requests: {e}")),
        };
        // Read the body as kv does, so a PUT costs the same transfer here as there.
        scratch.clear();
        if request
            .as_reader()
            .take(MAX_BODY_BYTES)
            .read_to_end(&mut scratch)
            .is_err()
        {
            continue;
        }
        // The same calls kv makes, so the response headers are the same too.
        let mut response = tiny_http::Response::from_string(body)
            .with_status_code(200)
            .with_chunked_threshold(usize::MAX);
        response.add_header(json.clone());
        // The client may have gone away; that is its business.
        let _ = request.respond(response);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_requested_size_and_is_json() {
        for bytes in [0, MIN_BODY_BYTES, 60, 100, 4096, 65_536] {
            let body = body_of(bytes);
            assert_eq!(body.len(), bytes.max(MIN_BODY_BYTES));
            assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
        }
    }
}
