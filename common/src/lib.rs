//! Shared pieces of Ferry's daemons: config, tracing, PKI and enrollment, TLS transport,
//! shutdown, backoff, the chunk store, path safety, the one error-to-status mapping and
//! the one Prometheus exporter.

pub mod backoff;
pub mod cdc;
pub mod chunks;
pub mod cmd;
pub mod config;
pub mod enroll;
pub mod entry;
pub mod error;
pub mod guestmount;
pub mod health;
pub mod metrics;
pub mod names;
pub mod notify;
pub mod pki;
pub mod push;
pub mod revoke;
pub mod safepath;
pub mod shutdown;
pub mod sparse;
pub mod standard;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod version;
pub mod xattrs;

/// Current time as Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Cases per property test: `PROPTEST_CASES` for longer runs, `default` in CI.
#[doc(hidden)]
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
