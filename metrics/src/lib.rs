//! The Prometheus `/metrics` endpoint shared by the Tidemark daemons: an
//! [`Exposition`] the daemon fills from a snapshot of its state on each
//! scrape, a lock-free [`Histogram`] for hot paths, and the small HTTP
//! server ([`MetricsServer`] in a tokio runtime, [`MetricsThread`] on its
//! own thread) that answers `GET /metrics`.
//!
//! Every metric is named `tidemark_<daemon>_…` and labelled by `host`,
//! `group` and `disk` where they apply.

pub mod exposition;
pub mod histogram;
pub mod server;

pub use exposition::{labels, Exposition, Format, Labels, Unit};
pub use histogram::{Histogram, HistogramSnapshot, LAG_BUCKETS, LATENCY_BUCKETS};
pub use server::{MetricsServer, MetricsThread, Render};

/// This machine's host name, for the `host` label of daemons that have no
/// configured one; `"localhost"` if it cannot be read.
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
