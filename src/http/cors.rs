//! CORS (`KV_CORS_ORIGINS`): which web pages may call kv from a browser, and the headers that tell
//! the browser so. Off unless configured: then kv sends no CORS header at all.
//!
//! It lives in the HTTP layer, not in the API, because it applies to every answer alike (errors,
//! the 401 of a missing token, event streams) and because a preflight must be answered before the
//! API asks for a token: browsers never send one with it.

/// What a preflight may ask for: every method kv routes.
const ALLOW_METHODS: &str = "GET, HEAD, PUT, POST, DELETE";
/// The request headers kv reads that are not CORS-safelisted (`Accept` is).
const ALLOW_HEADERS: &str = "Authorization, Content-Type, If-Match, If-None-Match, Last-Event-ID";
/// The response headers a page may read besides the safelisted ones.
const EXPOSE_HEADERS: &str = "ETag, Link, Kv-Expires-At, Retry-After";
/// How long a browser may reuse a preflight's answer: fewer preflights, and a changed
/// `KV_CORS_ORIGINS` reaches every browser within the hour.
const MAX_AGE_SECS: u32 = 3600;

/// The origins allowed to call kv from a browser.
#[derive(Debug)]
pub enum Cors {
    /// No `KV_CORS_ORIGINS`: no CORS headers.
    Off,
    /// `*`: every origin; `Access-Control-Allow-Origin: *`, the same for all, so no `Vary`.
    Any,
    /// These origins (lower-case), echoed back to a matching one with `Vary: Origin`.
    List(Vec<String>),
}

/// Response headers, as the HTTP layer sends them.
pub type Headers = Vec<(&'static str, String)>;

impl Cors {
    /// The policy for `KV_CORS_ORIGINS` as config.rs parsed it.
    pub fn new(origins: &[String]) -> Cors {
        match origins {
            [] => Cors::Off,
            [any] if any == "*" => Cors::Any,
            list => Cors::List(list.to_vec()),
        }
    }

    /// Whether a request is a preflight kv answers itself: CORS is on and the browser asks
    /// (`OPTIONS` with `Origin` and `Access-Control-Request-Method`).
    pub fn is_preflight(&self, options: bool, origin: Option<&str>, asks: bool) -> bool {
        !matches!(self, Cors::Off) && options && origin.is_some() && asks
    }

    /// The headers of a 204 answer to a preflight from `origin`: none for an origin not allowed,
    /// so the browser refuses the real request.
    pub fn preflight(&self, origin: Option<&str>) -> Headers {
        let mut headers = self.allow(origin);
        if headers
            .iter()
            .any(|(name, _)| *name == "Access-Control-Allow-Origin")
        {
            headers.push(("Access-Control-Allow-Methods", ALLOW_METHODS.into()));
            headers.push(("Access-Control-Allow-Headers", ALLOW_HEADERS.into()));
            headers.push(("Access-Control-Max-Age", MAX_AGE_SECS.to_string()));
        }
        headers
    }

    /// The headers every other answer to a request from `origin` carries.
    pub fn simple(&self, origin: Option<&str>) -> Headers {
        let mut headers = self.allow(origin);
        if headers
            .iter()
            .any(|(name, _)| *name == "Access-Control-Allow-Origin")
        {
            headers.push(("Access-Control-Expose-Headers", EXPOSE_HEADERS.into()));
        }
        headers
    }

    fn allow(&self, origin: Option<&str>) -> Headers {
        match self {
            Cors::Off => Vec::new(),
            Cors::Any if origin.is_some() => vec![("Access-Control-Allow-Origin", "*".into())],
            Cors::Any => Vec::new(),
            Cors::List(allowed) => {
                // Whether the answer allows the page depends on Origin, so caches must key on it,
                // also for the answers that do not allow it.
                let mut headers = vec![("Vary", "Origin".to_string())];
                if let Some(origin) =
                    origin.filter(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o)))
                {
                    headers.insert(0, ("Access-Control-Allow-Origin", origin.to_string()));
                }
                headers
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(headers: &Headers) -> Vec<&str> {
        headers.iter().map(|(name, _)| *name).collect()
    }

    fn value<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn off_sends_nothing_and_answers_no_preflight() {
        let cors = Cors::new(&[]);
        assert!(cors.simple(Some("https://a.example")).is_empty());
        assert!(cors.preflight(Some("https://a.example")).is_empty());
        assert!(!cors.is_preflight(true, Some("https://a.example"), true));
    }

    #[test]
    fn a_listed_origin_is_echoed_with_vary() {
        let cors = Cors::new(&["https://a.example".into(), "http://localhost:5173".into()]);
        assert!(cors.is_preflight(true, Some("https://a.example"), true));
        assert!(!cors.is_preflight(false, Some("https://a.example"), true));
        assert!(!cors.is_preflight(true, None, true));
        assert!(!cors.is_preflight(true, Some("https://a.example"), false));
        let simple = cors.simple(Some("https://A.example"));
        assert_eq!(
            value(&simple, "Access-Control-Allow-Origin"),
            Some("https://A.example")
        );
        assert_eq!(value(&simple, "Vary"), Some("Origin"));
        assert_eq!(
            value(&simple, "Access-Control-Expose-Headers"),
            Some(EXPOSE_HEADERS)
        );
        let preflight = cors.preflight(Some("http://localhost:5173"));
        assert_eq!(
            names(&preflight),
            [
                "Access-Control-Allow-Origin",
                "Vary",
                "Access-Control-Allow-Methods",
                "Access-Control-Allow-Headers",
                "Access-Control-Max-Age"
            ]
        );
        for needed in [
            "Authorization",
            "Content-Type",
            "If-Match",
            "If-None-Match",
            "Last-Event-ID",
        ] {
            assert!(ALLOW_HEADERS.contains(needed), "{needed}");
        }
    }

    #[test]
    fn an_unlisted_origin_gets_no_cors_header() {
        let cors = Cors::new(&["https://a.example".into()]);
        for origin in [
            Some("https://b.example"),
            Some("https://a.example.evil"),
            Some("http://a.example"),
            Some("null"),
            None,
        ] {
            for headers in [cors.simple(origin), cors.preflight(origin)] {
                assert_eq!(names(&headers), ["Vary"], "{origin:?}");
            }
        }
    }

    #[test]
    fn a_star_allows_every_origin_alike() {
        let cors = Cors::new(&["*".into()]);
        let simple = cors.simple(Some("https://anything.example"));
        assert_eq!(value(&simple, "Access-Control-Allow-Origin"), Some("*"));
        assert_eq!(value(&simple, "Vary"), None);
        assert!(cors.simple(None).is_empty(), "not a CORS request");
        let preflight = cors.preflight(Some("https://anything.example"));
        assert_eq!(value(&preflight, "Access-Control-Max-Age"), Some("3600"));
    }
}
