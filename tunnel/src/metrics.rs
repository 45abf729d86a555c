//! Prometheus metrics of a tunnel role: bytes and connections per service, refusals,
//! reconnects and RTT, served as text on `metrics_listen`.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Counters and gauges keyed by their full series name (`name{labels}`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<BTreeMap<String, f64>>>,
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let l: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{name}{{{}}}", l.join(","))
}

impl Metrics {
    pub fn add(&self, name: &str, labels: &[(&str, &str)], v: f64) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(series(name, labels)).or_insert(0.0) += v;
    }

    pub fn inc(&self, name: &str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1.0);
    }

    pub fn set(&self, name: &str, labels: &[(&str, &str)], v: f64) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(series(name, labels), v);
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&series(name, labels)).copied().unwrap_or(0.0)
    }

    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (k, v) in m.iter() {
            out.push_str(&format!("{k} {v}\n"));
        }
        out
    }
}

/// Serves `GET /metrics` until shutdown; one short request per connection.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: CancellationToken) {
    loop {
        let Some((mut conn, _)) = crate::net::accept(&listener, &shutdown).await else {
            return;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await;
            let body = m.render();
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
