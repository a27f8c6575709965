//! One scrape's worth of metrics: the daemons fill an [`Exposition`] from a
//! snapshot of their state, and it renders as OpenMetrics text (through
//! `prometheus-client`'s encoder) or, for older scrapers and `promtool`,
//! the Prometheus text format 0.0.4.
//!
//! Label sets are built per scrape, so disks, hosts and groups that come
//! and go need no registration. A state is exported the way DRBD's
//! exporter does it: one 0/1 gauge per possible state with a `state`
//! label; an info metric is a gauge named `…_info` that is always 1 (the
//! classic text format has no info type).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::histogram::HistogramSnapshot;

/// A metric's labels, in order: `(name, value)`.
pub type Labels = Vec<(String, String)>;

/// Builds [`Labels`] from string pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// The unit a metric's name ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `_seconds`.
    Seconds,
    /// `_bytes`.
    Bytes,
    /// `_ratio` (0 to 1).
    Ratio,
}

impl Unit {
    fn prometheus(self) -> prometheus_client::registry::Unit {
        use prometheus_client::registry::Unit as U;
        match self {
            Unit::Seconds => U::Seconds,
            Unit::Bytes => U::Bytes,
            Unit::Ratio => U::Other("ratio".to_string()),
        }
    }
}

/// Which text format a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (what Prometheus asks for first).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain`).
    Classic,
}

impl Format {
    /// Chooses by the request's `Accept` header: the classic format only
    /// for a scraper that asks for `text/plain` and not for OpenMetrics;
    /// OpenMetrics otherwise (also without a header, or for `*/*`).
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if !a.contains("application/openmetrics-text") && a.contains("text/plain") => {
                Format::Classic
            }
            _ => Format::OpenMetrics,
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

#[derive(Debug)]
enum Samples {
    Gauge(Vec<(Labels, f64)>),
    Counter(Vec<(Labels, u64)>),
    Histogram(Vec<(Labels, HistogramSnapshot)>),
}

#[derive(Debug)]
struct Family {
    /// Without the unit suffix (the encoder appends it).
    name: String,
    help: String,
    unit: Option<Unit>,
    samples: Samples,
}

/// The metrics of one scrape.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    fn family(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        empty: Samples,
    ) -> &mut Samples {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    help: help.to_string(),
                    unit,
                    samples: empty,
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i].samples
    }

    /// A gauge sample. `name` is without the unit suffix: a gauge `x` in
    /// [`Unit::Seconds`] is exposed as `x_seconds`. A sample for a name
    /// already used by another type is dropped.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        labels: &Labels,
        value: f64,
    ) {
        if let Samples::Gauge(v) = self.family(name, help, unit, Samples::Gauge(Vec::new())) {
            v.push((labels.clone(), value));
        }
    }

    /// A counter sample, exposed as `name[_unit]_total`.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        labels: &Labels,
        value: u64,
    ) {
        if let Samples::Counter(v) = self.family(name, help, unit, Samples::Counter(Vec::new())) {
            v.push((labels.clone(), value));
        }
    }

    /// A histogram sample (`_bucket`, `_sum`, `_count`).
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        labels: &Labels,
        value: HistogramSnapshot,
    ) {
        if let Samples::Histogram(v) = self.family(name, help, unit, Samples::Histogram(Vec::new()))
        {
            v.push((labels.clone(), value));
        }
    }

    /// A state set: one gauge per state in `states` with the extra label
    /// `state`, 1 for `current` and 0 for the others.
    pub fn state_set(
        &mut self,
        name: &str,
        help: &str,
        labels: &Labels,
        states: &[&str],
        current: &str,
    ) {
        for s in states {
            let mut l = labels.clone();
            l.push(("state".to_string(), (*s).to_string()));
            self.gauge(name, help, None, &l, if *s == current { 1.0 } else { 0.0 });
        }
    }

    /// An info metric: the gauge `name_info`, always 1, carrying `labels`.
    pub fn info(&mut self, name: &str, help: &str, labels: &Labels) {
        self.gauge(&format!("{name}_info"), help, None, labels, 1.0);
    }

    /// Renders the exposition.
    pub fn render(self, format: Format) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Collected(self.families)));
        let mut text = String::new();
        // Writing into a String cannot fail; a failing encoder would only
        // cut the body short, and the scraper then reports the scrape bad.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        match format {
            Format::OpenMetrics => text,
            Format::Classic => openmetrics_to_classic(&text),
        }
    }
}

#[derive(Debug)]
struct Collected(Vec<Family>);

fn encode_with_labels(
    encoder: &mut MetricEncoder<'_>,
    labels: &Labels,
    f: impl FnOnce(&mut MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    if labels.is_empty() {
        f(encoder)
    } else {
        f(&mut encoder.encode_family(labels)?)
    }
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for fam in &self.0 {
            let unit = fam.unit.map(Unit::prometheus);
            let kind = match fam.samples {
                Samples::Gauge(_) => MetricType::Gauge,
                Samples::Counter(_) => MetricType::Counter,
                Samples::Histogram(_) => MetricType::Histogram,
            };
            let mut m = encoder.encode_descriptor(&fam.name, &fam.help, unit.as_ref(), kind)?;
            match &fam.samples {
                Samples::Gauge(v) => {
                    for (l, x) in v {
                        encode_with_labels(&mut m, l, |e| e.encode_gauge(x))?;
                    }
                }
                Samples::Counter(v) => {
                    for (l, x) in v {
                        encode_with_labels(&mut m, l, |e| {
                            e.encode_counter::<NoLabelSet, _, u64>(x, None)
                        })?;
                    }
                }
                Samples::Histogram(v) => {
                    for (l, h) in v {
                        encode_with_labels(&mut m, l, |e| {
                            e.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Turns OpenMetrics text into the Prometheus text format 0.0.4: the
/// `# UNIT` and `# EOF` lines go, and a counter's `# HELP` and `# TYPE`
/// name its samples (`x_total`), not its OpenMetrics family (`x`). The
/// rest (samples, escaping, histograms, gauges) is the same in both.
pub fn openmetrics_to_classic(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Histogram;
    use std::time::Duration;

    fn sample() -> Exposition {
        let mut e = Exposition::new();
        let l = labels(&[("host", "db1"), ("group", "g\"1")]);
        e.gauge("tidemark_lag", "Lag.", Some(Unit::Seconds), &l, 1.5);
        e.counter(
            "tidemark_written",
            "Bytes written.",
            Some(Unit::Bytes),
            &l,
            42,
        );
        e.counter("tidemark_writes", "Writes.", None, &l, 7);
        e.state_set("tidemark_state", "State.", &l, &["a", "b"], "b");
        e.info(
            "tidemark_error",
            "Last error.",
            &labels(&[("class", "none")]),
        );
        e.gauge("tidemark_up", "Up.", None, &Vec::new(), 1.0);
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(5));
        e.histogram(
            "tidemark_latency",
            "Latency.",
            Some(Unit::Seconds),
            &l,
            h.snapshot(),
        );
        e
    }

    #[test]
    fn openmetrics_text_has_the_samples_and_ends_with_eof() {
        let t = sample().render(Format::OpenMetrics);
        for want in [
            "# TYPE tidemark_lag_seconds gauge\n",
            "# UNIT tidemark_lag_seconds seconds\n",
            "tidemark_lag_seconds{host=\"db1\",group=\"g\\\"1\"} 1.5\n",
            "# TYPE tidemark_written_bytes counter\n",
            "tidemark_written_bytes_total{host=\"db1\",group=\"g\\\"1\"} 42\n",
            "tidemark_writes_total{host=\"db1\",group=\"g\\\"1\"} 7\n",
            "tidemark_state{host=\"db1\",group=\"g\\\"1\",state=\"a\"} 0",
            "tidemark_state{host=\"db1\",group=\"g\\\"1\",state=\"b\"} 1",
            "tidemark_error_info{class=\"none\"} 1",
            "\ntidemark_up 1",
            "tidemark_latency_seconds_count{host=\"db1\",group=\"g\\\"1\"} 2\n",
            "tidemark_latency_seconds_bucket{le=\"0.1\",host=\"db1\",group=\"g\\\"1\"} 1\n",
            "tidemark_latency_seconds_bucket{le=\"+Inf\",host=\"db1\",group=\"g\\\"1\"} 2\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert!(t.ends_with("# EOF\n"), "{t}");
    }

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let t = sample().render(Format::Classic);
        assert!(
            t.contains("# HELP tidemark_written_bytes_total Bytes written.\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE tidemark_written_bytes_total counter\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE tidemark_writes_total counter\n"), "{t}");
        assert!(t.contains("# TYPE tidemark_lag_seconds gauge\n"), "{t}");
        assert!(!t.contains("# EOF"), "{t}");
        assert!(!t.contains("# UNIT"), "{t}");
        // Every sample line is unchanged.
        let om = sample().render(Format::OpenMetrics);
        let samples = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        assert_eq!(samples(&t), samples(&om));
    }

    #[test]
    fn a_name_reused_with_another_type_is_dropped() {
        let mut e = Exposition::new();
        e.gauge("tidemark_x", "X.", None, &Vec::new(), 1.0);
        e.counter("tidemark_x", "X.", None, &Vec::new(), 3);
        let t = e.render(Format::OpenMetrics);
        assert_eq!(t.matches("# TYPE").count(), 1, "{t}");
        assert!(!t.contains("_total"), "{t}");
    }

    #[test]
    fn format_follows_the_accept_header() {
        assert_eq!(Format::from_accept(None), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::OpenMetrics);
        assert_eq!(
            Format::from_accept(Some("text/plain;version=0.0.4")),
            Format::Classic
        );
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"
            )),
            Format::OpenMetrics
        );
    }
}
