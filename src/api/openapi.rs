//! `GET /openapi.json`: the OpenAPI 3.1 description of the API, `docs/openapi.json` built into
//! the binary, so the document a client reads is the one of the kv it talks to.
//!
//! The document is hand-written JSON (no YAML crate, no code generation): the routes are a plain
//! `match` in mod.rs, not something a generator could read. Its tests keep the two in step: every
//! route of the routing table, with exactly the methods its `Allow` header names, must be in the
//! document, and every path of the document must be routed. CI's schemathesis run (.ci/run) checks
//! the rest, against the running binary.

use super::Resp;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// The document as a response; the HTTP layer sends it as `application/json`.
pub(super) fn get() -> Resp {
    Resp::ok(DOCUMENT.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::*;
    use crate::api::tests::Harness;
    use crate::api::{Method, Req};

    /// Paths the document describes ahead of their routes, while another change adds them. Once
    /// such a path is routed, the test below fails until it is removed here, so the list cannot go
    /// stale.
    const NOT_ROUTED_YET: [&str; 0] = [];

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("docs/openapi.json is valid JSON")
    }

    /// The routes of the routing table in mod.rs, as (path, example path to probe): each arm of
    /// `match (first, rest)` names its first segment as a string literal, and its rest as `None`
    /// (`/first`), `Some("")` (the same route with a trailing slash) or a binding (`/first/{…}`).
    /// Read from the source, because a `match` cannot be listed at run time.
    fn routes() -> Vec<(String, String)> {
        let source = include_str!("mod.rs");
        let table = source
            .split_once("match (first, rest) {")
            .expect("the routing table in mod.rs")
            .1;
        let mut routes = Vec::new();
        // The table ends with the function, at the first unindented `}`.
        for line in table.lines().take_while(|line| !line.starts_with('}')) {
            let line = line.trim();
            let Some(arm) = line.strip_prefix("(\"") else {
                continue;
            };
            let (first, rest) = arm.split_once("\", ").expect("an arm (\"first\", rest)");
            let rest = rest.split_once(") =>").expect("an arm ending in ) =>").0;
            if let Some(second) = rest.strip_prefix("Some(\"") {
                // A fixed second segment: `("admin", Some("backup"))` is /admin/backup.
                let second = second.split_once('"').expect("a quoted segment").0;
                routes.push((format!("/{first}/{second}"), format!("/{first}/{second}")));
            } else if rest.starts_with("Some(") {
                routes.push((format!("/{first}/{{}}"), format!("/{first}/x")));
            } else {
                assert!(
                    rest.starts_with("None"),
                    "an arm the test does not understand: {line}"
                );
                routes.push((format!("/{first}"), format!("/{first}")));
            }
        }
        assert!(routes.len() >= 8, "found only {routes:?} in mod.rs");
        routes
    }

    /// The methods a route takes, from the `Allow` header of its 405 to a method it never takes.
    fn allowed(harness: &Harness, path: &str) -> BTreeSet<String> {
        let req = Req {
            method: Method::Other,
            path,
            query: "",
            headers: vec![],
            body: vec![],
            upload: std::cell::RefCell::new(None),
        };
        let error = harness.run(&req).expect_err("a 405");
        let (name, allow) = error.headers().expect("an Allow header");
        assert_eq!((error.status(), name), (405, "Allow"), "{path}");
        allow.split(", ").map(str::to_lowercase).collect()
    }

    /// The document's paths, templates written `{}`, each with its methods.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        const METHODS: [&str; 8] = [
            "get", "head", "put", "post", "delete", "patch", "options", "trace",
        ];
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        paths
            .iter()
            .map(|(path, item)| {
                let mut template = String::new();
                let mut in_braces = false;
                for c in path.chars() {
                    match c {
                        '{' => {
                            in_braces = true;
                            template.push_str("{}");
                        }
                        '}' => in_braces = false,
                        c if !in_braces => template.push(c),
                        _ => {}
                    }
                }
                let methods = METHODS
                    .iter()
                    .filter(|m| item.get(**m).is_some())
                    .map(|m| m.to_string())
                    .collect();
                (template, methods)
            })
            .collect()
    }

    #[test]
    fn the_document_is_openapi_3_1_of_this_version() {
        let doc = document();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn every_route_is_documented_with_exactly_its_methods() {
        let harness = Harness::new();
        let mut documented = documented();
        for (path, probe) in routes() {
            let methods = allowed(&harness, &probe);
            let described = documented.remove(&path).unwrap_or_else(|| {
                panic!("{path} is routed in src/api/mod.rs but not in docs/openapi.json")
            });
            assert_eq!(
                described, methods,
                "docs/openapi.json lists other methods for {path} than its Allow header"
            );
        }
        for pending in NOT_ROUTED_YET {
            assert!(
                documented.remove(pending).is_some(),
                "{pending} is routed now (or no longer documented): take it out of NOT_ROUTED_YET \
                 and out of the exclusion in .ci/schemathesis.toml"
            );
        }
        assert!(
            documented.is_empty(),
            "docs/openapi.json describes paths kv does not route: {documented:?}"
        );
    }

    #[test]
    fn every_reference_resolves() {
        fn walk(doc: &Value, node: &Value, broken: &mut Vec<String>) {
            match node {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        let pointer = target.strip_prefix('#').unwrap_or(target);
                        if doc.pointer(pointer).is_none() {
                            broken.push(target.clone());
                        }
                    }
                    map.values().for_each(|v| walk(doc, v, broken));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(doc, v, broken)),
                _ => {}
            }
        }
        let doc = document();
        let mut broken = Vec::new();
        walk(&doc, &doc, &mut broken);
        assert!(broken.is_empty(), "unresolved $ref: {broken:?}");
    }

    #[test]
    fn it_is_served_as_it_is_in_the_repository() {
        let h = Harness::new();
        let (status, body) = h.call(Method::Get, "/openapi.json", "");
        assert_eq!(status, 200);
        assert_eq!(body, document());
    }
}
