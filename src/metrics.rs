//! The Prometheus metrics: the registry, the name of every metric, and the counters the request
//! path and the writer move. Served by `GET /metrics` in the text exposition format 0.0.4.
//!
//! The request path only increments atomics: the counter of each (method, route, status) is
//! looked up in the registry once, the first time that combination occurs, and kept in a fixed
//! table after that. Gauges that describe the store (objects, bytes, revision) are read when
//! Prometheus scrapes, not kept up to date on every write.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The route patterns, the only values of the `route` label (never a key or a collection name).
pub const ROUTES: [&str; 14] = [
    "/health",
    "/ready",
    "/objects",
    "/objects/:key",
    "/collections",
    "/collections/:name",
    "/batch",
    "/changes",
    "/metrics",
    "/openapi.json",
    "/admin/backup",
    "/export",
    "/import",
    "other",
];

/// The methods kv tells apart, the values of the `method` label.
pub const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "OTHER"];

/// Statuses with a counter slot of their own; any other is still counted, through the registry.
const STATUSES: [u16; 20] = [
    200, 204, 304, 400, 401, 403, 404, 405, 408, 410, 412, 413, 417, 500, 503, 505, 507, 101, 206,
    429,
];

/// Every metric kv serves.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_slots: Vec<OnceLock<IntCounter>>,
    durations: Vec<Histogram>,
    writes: IntCounter,
    commit_seconds: Histogram,
    commit_writes: Histogram,
    storage_errors: IntCounter,
    /// Open client connections, kept by the HTTP layer.
    pub open_connections: AtomicUsize,
    gauges: Gauges,
}

/// The gauges filled in at each scrape.
struct Gauges {
    objects: IntGauge,
    collections: IntGauge,
    database_bytes: IntGauge,
    wal_bytes: IntGauge,
    revision: IntGauge,
    open_connections: IntGauge,
    change_waiters: IntGauge,
    used_bytes: IntGauge,
    max_bytes: IntGauge,
    writes_refused: IntGaugeVec,
}

/// What a scrape reads from the store and the waiters' registry.
pub struct Snapshot {
    pub objects: u64,
    pub collections: u64,
    pub database_bytes: u64,
    pub wal_bytes: u64,
    pub revision: u64,
    pub change_waiters: usize,
    /// Bytes of database pages in use, what `KV_MAX_DB_BYTES` limits.
    pub used_bytes: u64,
    pub max_bytes: Option<u64>,
    /// Why writes that add data are refused now (`storage_full`, `quota_exceeded`), if they are.
    pub writes_refused: Option<&'static str>,
}

/// Histogram buckets for durations, 100 µs to 60 s; a commit's stop at 2.5 s.
const SECONDS_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The reasons `kv_writes_refused` has a series for, each 0 or 1.
const REFUSALS: [&str; 2] = ["storage_full", "quota_exceeded"];

impl Metrics {
    /// The registry with every metric, for this version of kv.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("kv_http_requests_total", "HTTP requests answered"),
            &["method", "route", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "kv_http_request_duration_seconds",
                "Time from a request's arrival to its answer being ready to send",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["route"],
        )?;
        let writes = IntCounter::new(
            "kv_writes_total",
            "Objects written (each changing op of a batch counts one)",
        )?;
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "kv_commit_duration_seconds",
                "Time one group commit took, fsync included",
            )
            .buckets(
                SECONDS_BUCKETS
                    .iter()
                    .copied()
                    .filter(|&s| s <= 2.5)
                    .collect(),
            ),
        )?;
        let commit_writes = Histogram::with_opts(
            HistogramOpts::new("kv_commit_writes", "Writes carried by one group commit").buckets(
                vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            ),
        )?;
        let storage_errors = IntCounter::new(
            "kv_storage_errors_total",
            "Storage failures (SQLite errors, failed commits)",
        )?;
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let gauges = Gauges {
            objects: gauge("kv_objects", "Objects stored (expired ones until swept)")?,
            collections: gauge("kv_collections", "Collections holding at least one object")?,
            database_bytes: gauge("kv_database_bytes", "Size of the database file")?,
            wal_bytes: gauge("kv_wal_bytes", "Size of the write-ahead log file")?,
            revision: gauge("kv_revision", "The store-wide revision")?,
            open_connections: gauge("kv_open_connections", "Open client connections")?,
            change_waiters: gauge(
                "kv_change_waiters",
                "Long-polls and event streams waiting for changes",
            )?,
            used_bytes: gauge(
                "kv_database_used_bytes",
                "Bytes of database pages in use (free pages are reused), what the quota limits",
            )?,
            max_bytes: gauge(
                "kv_database_max_bytes",
                "The quota, KV_MAX_DB_BYTES; 0 when there is none",
            )?,
            writes_refused: IntGaugeVec::new(
                Opts::new(
                    "kv_writes_refused",
                    "1 while writes that add data are refused for this reason (507), else 0",
                ),
                &["reason"],
            )?,
        };
        let build_info = IntGauge::with_opts(
            Opts::new("kv_build_info", "The kv version, as a label; always 1")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build_info.set(1);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        for metric in [&writes, &storage_errors] {
            registry.register(Box::new(metric.clone()))?;
        }
        for metric in [&commit_seconds, &commit_writes] {
            registry.register(Box::new(metric.clone()))?;
        }
        for metric in [
            &gauges.objects,
            &gauges.collections,
            &gauges.database_bytes,
            &gauges.wal_bytes,
            &gauges.revision,
            &gauges.open_connections,
            &gauges.change_waiters,
            &gauges.used_bytes,
            &gauges.max_bytes,
            &build_info,
        ] {
            registry.register(Box::new(metric.clone()))?;
        }
        registry.register(Box::new(gauges.writes_refused.clone()))?;
        let durations = ROUTES
            .iter()
            .map(|route| latency.with_label_values(&[route]))
            .collect();
        let request_slots = (0..ROUTES.len() * METHODS.len() * STATUSES.len())
            .map(|_| OnceLock::new())
            .collect();
        Ok(Metrics {
            registry,
            requests,
            request_slots,
            durations,
            writes,
            commit_seconds,
            commit_writes,
            storage_errors,
            open_connections: AtomicUsize::new(0),
            gauges,
        })
    }

    /// Counts one answered request; `route` and `method` index `ROUTES` and `METHODS`.
    pub fn request(&self, method: usize, route: usize, status: u16, took: Duration) {
        let (method, route) = (method.min(METHODS.len() - 1), route.min(ROUTES.len() - 1));
        if let Some(histogram) = self.durations.get(route) {
            histogram.observe(took.as_secs_f64());
        }
        let labels = || [METHODS[method], ROUTES[route], status_text(status)];
        match STATUSES.iter().position(|&s| s == status) {
            Some(code) => {
                let slot = (route * METHODS.len() + method) * STATUSES.len() + code;
                if let Some(slot) = self.request_slots.get(slot) {
                    slot.get_or_init(|| self.requests.with_label_values(&labels()))
                        .inc();
                }
            }
            None => self.requests.with_label_values(&labels()).inc(),
        }
    }

    /// Counts one group commit: how long it took and how many objects it wrote.
    pub fn commit(&self, took: Duration, writes: usize, objects_written: u64) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_writes.observe(writes as f64);
        self.writes.inc_by(objects_written);
    }

    /// Counts one storage failure.
    pub fn storage_error(&self) {
        self.storage_errors.inc();
    }

    /// The exposition text, with the gauges set from `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> Result<String, prometheus::Error> {
        let g = &self.gauges;
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        g.objects.set(int(snapshot.objects));
        g.collections.set(int(snapshot.collections));
        g.database_bytes.set(int(snapshot.database_bytes));
        g.wal_bytes.set(int(snapshot.wal_bytes));
        g.revision.set(int(snapshot.revision));
        g.change_waiters.set(snapshot.change_waiters as i64);
        g.used_bytes.set(int(snapshot.used_bytes));
        g.max_bytes.set(int(snapshot.max_bytes.unwrap_or(0)));
        for reason in REFUSALS {
            g.writes_refused
                .with_label_values(&[reason])
                .set(i64::from(snapshot.writes_refused == Some(reason)));
        }
        g.open_connections
            .set(self.open_connections.load(Ordering::Relaxed) as i64);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The content type of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A status as a label value, without allocating for the common ones.
fn status_text(status: u16) -> &'static str {
    match status {
        200 => "200",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        410 => "410",
        412 => "412",
        413 => "413",
        417 => "417",
        500 => "500",
        503 => "503",
        505 => "505",
        507 => "507",
        101 => "101",
        206 => "206",
        429 => "429",
        _ => "other",
    }
}

/// The index in `ROUTES` of a request path's route pattern.
pub fn route_of(path: &str) -> usize {
    let path = path.split('?').next().unwrap_or("");
    let pattern = match path.trim_start_matches('/').split_once('/') {
        None => match path {
            "/objects" => "/objects",
            "/collections" => "/collections",
            other => other,
        },
        Some(("objects", "")) => "/objects",
        Some(("objects", _)) => "/objects/:key",
        Some(("collections", "")) => "/collections",
        Some(("collections", _)) => "/collections/:name",
        Some(("admin", "backup")) => "/admin/backup",
        Some(_) => "other",
    };
    ROUTES
        .iter()
        .position(|r| *r == pattern)
        .unwrap_or(ROUTES.len() - 1)
}

/// The index in `METHODS` of a method's name.
pub fn method_of(name: &str) -> usize {
    METHODS
        .iter()
        .position(|m| *m == name)
        .unwrap_or(METHODS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_patterns_never_keys() {
        assert_eq!(ROUTES[route_of("/objects/secret-key")], "/objects/:key");
        assert_eq!(ROUTES[route_of("/objects/a/b")], "/objects/:key");
        assert_eq!(ROUTES[route_of("/objects")], "/objects");
        assert_eq!(ROUTES[route_of("/objects/?collection=x")], "/objects");
        assert_eq!(ROUTES[route_of("/collections/users")], "/collections/:name");
        assert_eq!(ROUTES[route_of("/health")], "/health");
        assert_eq!(ROUTES[route_of("/changes?since=1")], "/changes");
        assert_eq!(ROUTES[route_of("/some/thing")], "other");
        assert_eq!(ROUTES[route_of("/nope")], "other");
        assert_eq!(METHODS[method_of("PATCH")], "OTHER");
    }

    #[test]
    fn counters_move_and_render_in_the_text_format() {
        let m = Metrics::new().unwrap();
        m.request(0, route_of("/objects/k"), 200, Duration::from_millis(2));
        m.request(0, route_of("/objects/k"), 200, Duration::from_millis(3));
        m.request(2, route_of("/objects"), 599, Duration::from_millis(1));
        m.commit(Duration::from_millis(4), 3, 3);
        let snapshot = Snapshot {
            objects: 5,
            collections: 2,
            database_bytes: 4096,
            wal_bytes: 0,
            revision: 9,
            change_waiters: 1,
            used_bytes: 3072,
            max_bytes: None,
            writes_refused: Some("quota_exceeded"),
        };
        let text = m.render(&snapshot).unwrap();
        for line in [
            r#"kv_http_requests_total{code="200",method="GET",route="/objects/:key"} 2"#,
            r#"kv_http_requests_total{code="other",method="PUT",route="/objects"} 1"#,
            "kv_writes_total 3",
            "kv_objects 5",
            "kv_revision 9",
            "kv_change_waiters 1",
            "kv_database_used_bytes 3072",
            "kv_database_max_bytes 0",
            r#"kv_writes_refused{reason="quota_exceeded"} 1"#,
            r#"kv_writes_refused{reason="storage_full"} 0"#,
            r#"kv_build_info{version=""#,
            "# TYPE kv_commit_duration_seconds histogram",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
