//! Writing answers: a JSON response (with `Connection: close` when the connection ends after it),
//! the CORS preflight's 204, an event or list stream in chunked encoding, and the access line each
//! of them logs.

use std::io::Write;
use std::time::Instant;

use super::{cors, framing};
use crate::api::{Resp, Stream};
use crate::error::Error;
use crate::metrics::{self, Metrics};

/// Writes a response that ends its connection, saying so with `Connection: close` (RFC 9112 §9.6),
/// a header tiny_http refuses to add itself.
pub(super) fn write_closing(
    out: &mut dyn Write,
    response: tiny_http::Response<std::io::Cursor<Vec<u8>>>,
    head_only: bool,
) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    response.raw_print(
        &mut bytes,
        tiny_http::HTTPVersion(1, 1),
        None,
        head_only,
        None,
    )?;
    let after_status_line = bytes
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(0, |i| i + 2);
    bytes.splice(
        after_status_line..after_status_line,
        b"Connection: close\r\n".iter().copied(),
    );
    out.write_all(&bytes)?;
    out.flush()
}

/// A complete response with a JSON body (always with its Content-Length: tiny_http would switch
/// to chunked encoding from 32 KiB on) and these headers.
pub(super) fn response(
    status: u16,
    body: String,
    headers: &[(&'static str, String)],
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let mut response = tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_chunked_threshold(usize::MAX);
    // JSON unless the answer says otherwise.
    let json = (!headers.iter().any(|(name, _)| *name == "Content-Type"))
        .then_some(("Content-Type", "application/json"));
    let more = headers.iter().map(|(n, v)| (*n, v.as_str()));
    for (name, value) in json.into_iter().chain(more) {
        if let Ok(header) = tiny_http::Header::from_bytes(name, value) {
            response.add_header(header);
        }
    }
    response
}

/// What every answer to a request carries and logs besides its own status, body and headers.
pub(super) struct Extra {
    /// CORS headers for the request's `Origin`.
    pub(super) cors: cors::Headers,
    /// The name of the request's token, for the access line.
    pub(super) who: Option<String>,
    pub(super) started: Instant,
    /// The connection ends after this answer, which then says `Connection: close`.
    pub(super) close: bool,
}

/// ` (token NAME)` for the access line of a request with a named token, else nothing.
fn by(who: Option<&str>) -> String {
    who.map(|name| format!(" (token {name})"))
        .unwrap_or_default()
}

/// Answers a CORS preflight: 204 with the CORS headers and nothing else. Written by hand, because
/// tiny_http would add a `Content-Length`, which a 204 must not carry (RFC 9110 §8.6). Returns
/// whether the connection can go on.
pub(super) fn send_no_content(request: tiny_http::Request, extra: &Extra) -> bool {
    let line = format!("{} {} 204", request.method(), path_of(request.url()));
    let mut head = String::from("HTTP/1.1 204 No Content\r\n");
    for (name, value) in &extra.cors {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = request.into_writer();
    match out.write_all(head.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {
            log::debug!("{line} {:.1?}", extra.started.elapsed());
            true
        }
        Err(e) => {
            log::debug!("{line}: could not send the response: {e}");
            false
        }
    }
}

/// The path of a request target, without its query (and scheme and host, in absolute form).
fn path_of(url: &str) -> &str {
    framing::origin_form(url).split('?').next().unwrap_or("")
}

/// Sends the answer to a request, and logs it (with the name of its token).
pub(super) fn send(
    request: tiny_http::Request,
    result: Result<Resp, Error>,
    extra: &Extra,
    metrics: &Metrics,
) {
    let path = path_of(request.url());
    let (status, body, headers) = match result {
        Ok(resp) => (resp.status, resp.body, resp.headers),
        Err(e) => {
            if matches!(e, Error::Storage(_)) {
                metrics.storage_error();
            }
            let client_side = matches!(
                e,
                Error::TooManyWaiters
                    | Error::VersionNotSupported
                    | Error::TransferCodingNotSupported
            );
            if e.status() >= 500 && !client_side {
                log::error!("{} {path}: {e}", request.method());
            }
            let headers = e
                .headers()
                .map(|(name, value)| vec![(name, value.to_string())])
                .unwrap_or_default();
            (e.status(), e.body(), headers)
        }
    };
    let who = by(extra.who.as_deref());
    let line = log::log_enabled!(log::Level::Debug)
        .then(|| format!("{} {path} {status}{who}", request.method()));
    let mut headers = headers;
    headers.extend_from_slice(&extra.cors);
    let response = response(status, body, &headers);
    let (method, route) = (
        metrics::method_of(request.method().as_str()),
        metrics::route_of(path),
    );
    // Counted before sending, so a client that reads /metrics after its answer sees it counted.
    metrics.request(method, route, status, extra.started.elapsed());
    let sent = if extra.close {
        let head_only = request.method() == &tiny_http::Method::Head;
        write_closing(&mut *request.into_writer(), response, head_only)
    } else {
        request.respond(response)
    };
    if let Some(line) = line {
        match sent {
            Ok(()) => log::debug!("{line} {:.1?}", extra.started.elapsed()),
            Err(e) => log::debug!("{line}: could not send the response: {e}"),
        }
    }
}

/// Sends a streamed answer: the head, then the body in chunks as the stream writes it, flushed
/// whenever the stream flushes. Returns when the stream ends or the client has gone.
pub(super) fn send_stream(
    request: tiny_http::Request,
    stream: Stream<'_>,
    extra: &Extra,
    metrics: &Metrics,
) {
    let path = path_of(request.url()).to_string();
    let method = request.method().clone();
    let labels = (
        metrics::method_of(method.as_str()),
        metrics::route_of(&path),
    );
    let head_only = method == tiny_http::Method::Head;
    let mut head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n",
        stream.content_type
    );
    for (name, value) in stream.headers.iter().chain(&extra.cors) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = request.into_writer();
    let sent = out
        .write_all(head.as_bytes())
        .and_then(|()| out.flush())
        .and_then(|()| {
            if head_only {
                return Ok(());
            }
            (stream.body)(&mut Chunked(&mut *out))?;
            out.write_all(b"0\r\n\r\n")?;
            out.flush()
        });
    metrics.request(labels.0, labels.1, 200, extra.started.elapsed());
    let who = by(extra.who.as_deref());
    match sent {
        Ok(()) => log::debug!(
            "{method} {path} 200{who} (stream) {:.1?}",
            extra.started.elapsed()
        ),
        Err(e) => log::debug!("{method} {path} 200{who} (stream) ended: {e}"),
    }
}

/// Chunked transfer encoding (RFC 9112 §7.1): each write is one chunk.
pub(super) struct Chunked<'a>(&'a mut dyn Write);

impl Write for Chunked<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.0, "{:x}\r\n", buf.len())?;
        self.0.write_all(buf)?;
        self.0.write_all(b"\r\n")?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
