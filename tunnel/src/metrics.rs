//! Prometheus metrics of a tunnel role: bytes and connections per service, refusals,
//! reconnects and RTT, as typed families registered once; `ferry_common::metrics` serves
//! them on `metrics_listen`.
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// A series' labels in the order its family declares them; the encoder escapes values.
type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// Every metric a role exports: name as scraped, kind, label names, help.
const DEFS: &[(&str, Kind, &[&str], &str)] = &[
    (
        "ferry_tunnel_bytes_total",
        Kind::Counter,
        &["service", "direction"],
        "Bytes relayed per service and direction",
    ),
    (
        "ferry_tunnel_connections_total",
        Kind::Counter,
        &["service"],
        "Connections relayed per service",
    ),
    (
        "ferry_tunnel_active_connections",
        Kind::Gauge,
        &["service"],
        "Connections open now per service",
    ),
    (
        "ferry_tunnel_refused_total",
        Kind::Counter,
        &["reason"],
        "Connections or requests refused, by reason",
    ),
    (
        "ferry_tunnel_udp_dropped_total",
        Kind::Counter,
        &["service"],
        "UDP datagrams that could not be sent on, per service",
    ),
    (
        "ferry_tunnel_reconnects_total",
        Kind::Counter,
        &[],
        "Tunnel sessions dialled again after one ended or failed",
    ),
    (
        "ferry_tunnel_rtt_seconds",
        Kind::Gauge,
        &[],
        "Round-trip time of the last heartbeat",
    ),
    (
        "ferry_tunnel_path_rtt_seconds",
        Kind::Gauge,
        &[],
        "Smallest round trip of the session, which sizes channel windows",
    ),
    (
        "ferry_tunnel_channel_window_peak_bytes",
        Kind::Gauge,
        &[],
        "Largest receive window a channel was offered",
    ),
    (
        "ferry_tunnel_sized_channels",
        Kind::Gauge,
        &[],
        "Open channels whose receive windows are being sized (those that carried data)",
    ),
    (
        "ferry_tunnel_up",
        Kind::Gauge,
        &[],
        "1 while the tunnel session is established",
    ),
];

#[derive(Debug)]
enum Series {
    Counter(Family<Labels, Counter>),
    Gauge(Family<Labels, Gauge<f64, AtomicU64>>),
}

#[derive(Debug)]
struct Def {
    keys: &'static [&'static str],
    series: Series,
}

/// The role's registry and its families, keyed by scraped name; clones share them.
///
/// A series appears on `/metrics` once it is first touched, as before the families.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    defs: Arc<HashMap<&'static str, Def>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut defs = HashMap::new();
        for &(name, kind, keys, help) in DEFS {
            let series = match kind {
                Kind::Counter => {
                    let f = Family::default();
                    // The encoder appends `_total` to counters.
                    let base = name.strip_suffix("_total").unwrap_or(name);
                    registry.register(base, help, f.clone());
                    Series::Counter(f)
                }
                Kind::Gauge => {
                    let f = Family::default();
                    registry.register(name, help, f.clone());
                    Series::Gauge(f)
                }
            };
            defs.insert(name, Def { keys, series });
        }
        Metrics {
            registry: Arc::new(registry),
            defs: Arc::new(defs),
        }
    }
}

impl Metrics {
    /// What `ferry_common::metrics::serve` renders.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    fn def(&self, name: &str, labels: &[(&str, &str)]) -> Option<(&Def, Labels)> {
        let def = self.defs.get(name);
        debug_assert!(def.is_some(), "metric {name} is not declared in DEFS");
        let def = def?;
        debug_assert!(
            labels.len() == def.keys.len() && labels.iter().all(|(k, _)| def.keys.contains(k)),
            "metric {name} takes labels {:?}, not {labels:?}",
            def.keys
        );
        let values = def
            .keys
            .iter()
            .map(|&k| {
                let v = labels.iter().find(|(l, _)| *l == k).map(|(_, v)| *v);
                (k, v.unwrap_or_default().to_string())
            })
            .collect();
        Some((def, values))
    }

    /// Adds `v`; counters only go up, so a negative `v` adds nothing to them.
    pub fn add(&self, name: &str, labels: &[(&str, &str)], v: f64) {
        let Some((def, l)) = self.def(name, labels) else {
            return;
        };
        match &def.series {
            Series::Counter(f) => {
                f.get_or_create(&l).inc_by(v as u64);
            }
            Series::Gauge(f) => {
                f.get_or_create(&l).inc_by(v);
            }
        }
    }

    pub fn inc(&self, name: &str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1.0);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], v: f64) {
        let Some((def, l)) = self.def(name, labels) else {
            return;
        };
        match &def.series {
            Series::Gauge(f) => {
                f.get_or_create(&l).set(v);
            }
            Series::Counter(_) => debug_assert!(false, "metric {name} is a counter"),
        }
    }

    /// The series' value, 0 when it was never touched.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let Some((def, l)) = self.def(name, labels) else {
            return 0.0;
        };
        match &def.series {
            Series::Counter(f) => f.get(&l).map_or(0.0, |c| c.get() as f64),
            Series::Gauge(f) => f.get(&l).map_or(0.0, |g| g.get()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_keep_the_scraped_names_and_label_order() {
        let m = Metrics::default();
        m.add(
            "ferry_tunnel_bytes_total",
            &[("direction", "out"), ("service", "pg \"main\"")],
            10.0,
        );
        m.inc("ferry_tunnel_connections_total", &[("service", "dns")]);
        m.add(
            "ferry_tunnel_active_connections",
            &[("service", "dns")],
            1.0,
        );
        m.add(
            "ferry_tunnel_active_connections",
            &[("service", "dns")],
            -1.0,
        );
        m.inc("ferry_tunnel_reconnects_total", &[]);
        m.set("ferry_tunnel_rtt_seconds", &[], 0.25);
        let text = ferry_common::metrics::render(&m.registry()).unwrap();
        for line in [
            r#"ferry_tunnel_bytes_total{service="pg \"main\"",direction="out"} 10"#,
            r#"ferry_tunnel_connections_total{service="dns"} 1"#,
            r#"ferry_tunnel_active_connections{service="dns"} 0.0"#,
            "ferry_tunnel_reconnects_total 1",
            "ferry_tunnel_rtt_seconds 0.25",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // Untouched series stay out of the scrape, as the end-to-end tests expect.
        assert!(!text.contains("ferry_tunnel_up"), "{text}");
        assert_eq!(
            m.get(
                "ferry_tunnel_bytes_total",
                &[("service", "pg \"main\""), ("direction", "out")]
            ),
            10.0
        );
        assert_eq!(m.get("ferry_tunnel_rtt_seconds", &[]), 0.25);
        assert_eq!(m.get("ferry_tunnel_refused_total", &[("reason", "x")]), 0.0);
    }
}
