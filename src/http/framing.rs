//! Where a request ends and what it targets, checked strictly: a server behind a proxy must agree
//! with the proxy on where each request ends, or a request can be smuggled inside another's body
//! (RFC 9112 §6.3, §11.2). tiny_http reads only the first line of each header and takes an
//! unparsable `Content-Length` for "no body"; kv sees every line (`Headers::iter`, its patch) and
//! refuses what two parsers could read two ways, before anything of the body is read.
//!
//! The absolute form of a request target (`GET http://host/health HTTP/1.1`), which a server must
//! accept (RFC 9112 §3.2.2), is reduced here to the origin form the API routes on.

use crate::error::Error;

/// Refuses a request (its HTTP version and every header line, names in any case) whose framing
/// is ambiguous or unsupported: 505 for an HTTP version before 1.0; 400 `invalid_framing` for more
/// than one `Content-Length`, one that is not a plain decimal number, any with
/// `Transfer-Encoding`, more than one `Transfer-Encoding` line, or one in an HTTP/1.0 request; 501
/// for a transfer coding other than `chunked` alone.
pub fn check<'a>(
    version: (u8, u8),
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), Error> {
    if version < (1, 0) {
        return Err(Error::VersionNotSupported);
    }
    let (mut lengths, mut encodings) = (Vec::new(), Vec::new());
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            lengths.push(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            encodings.push(value);
        }
    }
    let invalid = |message: &str| Err(Error::bad_request("invalid_framing", message));
    if lengths.len() > 1 {
        return invalid("the request has more than one Content-Length");
    }
    if let Some(length) = lengths.first() {
        let digits = !length.is_empty() && length.bytes().all(|b| b.is_ascii_digit());
        if !digits || length.parse::<u64>().is_err() {
            return invalid("Content-Length must be a decimal number of bytes");
        }
    }
    match encodings.as_slice() {
        [] => Ok(()),
        [_] if !lengths.is_empty() => {
            invalid("a request may have Content-Length or Transfer-Encoding, not both")
        }
        [_] if version == (1, 0) => {
            invalid("HTTP/1.0 has no Transfer-Encoding; send Content-Length")
        }
        [coding] if coding.trim().eq_ignore_ascii_case("chunked") => Ok(()),
        [_] => Err(Error::TransferCodingNotSupported),
        _ => invalid("the request has more than one Transfer-Encoding"),
    }
}

/// The origin form (`/path?query`) of a request target; an absolute-form target
/// (`http://host:port/path?query`) loses its scheme and authority, and without a path it is `/`.
pub fn origin_form(target: &str) -> &str {
    let Some((scheme, rest)) = target.split_once("://") else {
        return target;
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return target;
    }
    match rest.find(['/', '?']) {
        Some(at) if rest[at..].starts_with('/') => &rest[at..],
        _ => "/",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(version: (u8, u8), headers: &[(&str, &str)]) -> Option<&'static str> {
        check(version, headers.iter().copied())
            .err()
            .map(|e| e.code())
    }

    #[test]
    fn plain_framing_passes() {
        assert_eq!(code((1, 1), &[]), None);
        assert_eq!(code((1, 1), &[("Content-Length", "5")]), None);
        assert_eq!(code((1, 1), &[("content-length", "0")]), None);
        assert_eq!(code((1, 0), &[("Content-Length", "12")]), None);
        assert_eq!(code((1, 1), &[("Transfer-Encoding", "chunked")]), None);
        assert_eq!(code((1, 1), &[("Transfer-Encoding", "Chunked")]), None);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for headers in [
            &[("Content-Length", "5"), ("Content-Length", "6")][..],
            &[("Content-Length", "5"), ("content-length", "5")],
            &[("Content-Length", "+5")],
            &[("Content-Length", "-5")],
            &[("Content-Length", "5, 5")],
            &[("Content-Length", "0x10")],
            &[("Content-Length", "abc")],
            &[("Content-Length", "99999999999999999999999")],
            &[("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
            &[("Content-Length", "abc"), ("Transfer-Encoding", "chunked")],
            &[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked"),
            ],
            &[
                ("Transfer-Encoding", "gzip"),
                ("Transfer-Encoding", "chunked"),
            ],
        ] {
            assert_eq!(
                code((1, 1), headers),
                Some("invalid_framing"),
                "{headers:?}"
            );
        }
        assert_eq!(
            code((1, 0), &[("Transfer-Encoding", "chunked")]),
            Some("invalid_framing")
        );
    }

    #[test]
    fn other_codings_and_versions_are_not_supported() {
        assert_eq!(
            code((1, 1), &[("Transfer-Encoding", "gzip, chunked")]),
            Some("unsupported_transfer_coding")
        );
        assert_eq!(code((0, 9), &[]), Some("http_version_not_supported"));
    }

    #[test]
    fn absolute_targets_become_origin_form() {
        for (target, origin) in [
            ("/health", "/health"),
            ("/objects/a?collection=b", "/objects/a?collection=b"),
            ("http://kv.example/health", "/health"),
            (
                "HTTP://kv.example:3300/objects/k?collection=c",
                "/objects/k?collection=c",
            ),
            ("https://kv.example/objects/http://x", "/objects/http://x"),
            ("http://kv.example", "/"),
            ("http://kv.example?x=1", "/"),
            ("*", "*"),
            ("ftp://kv.example/health", "ftp://kv.example/health"),
        ] {
            assert_eq!(origin_form(target), origin, "{target}");
        }
    }
}
