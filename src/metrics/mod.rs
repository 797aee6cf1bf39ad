//! Process metrics in the Prometheus text format: HTTP requests and latencies by route and
//! status, the running job's training speed, and inference (see [`InferMetrics`]). Job counts
//! come from the database when the page is rendered (they are shared by every process).

mod histogram;
mod infer;

pub use infer::InferMetrics;

use histogram::{header, Histogram, SECONDS};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Key: (method, route template, status).
type RouteKey = (String, String, u16);

#[derive(Default)]
pub struct Metrics {
    http: Mutex<BTreeMap<RouteKey, Histogram>>,
    training_tokens_per_second: AtomicU64,
    pub infer: Arc<InferMetrics>,
}

impl Metrics {
    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let Ok(mut map) = self.http.lock() else {
            return;
        };
        map.entry((method.to_string(), route.to_string(), status))
            .or_insert_with(|| Histogram::new(&SECONDS))
            .observe(seconds);
    }

    pub fn set_training_tokens_per_second(&self, v: f64) {
        self.training_tokens_per_second
            .store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn training_tokens_per_second(&self) -> f64 {
        f64::from_bits(self.training_tokens_per_second.load(Ordering::Relaxed))
    }

    /// The metrics page; `jobs` are counts by status name.
    pub fn render(&self, jobs: &[(&str, i64)], model_loaded: bool) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "tuneshop_jobs",
            "gauge",
            "Jobs by status (all tenants).",
        );
        for (status, n) in jobs {
            let _ = writeln!(out, "tuneshop_jobs{{status=\"{status}\"}} {n}");
        }
        let depth: i64 = jobs
            .iter()
            .filter(|(s, _)| *s == "queued" || *s == "validating_files")
            .map(|(_, n)| n)
            .sum();
        header(
            &mut out,
            "tuneshop_queue_depth",
            "gauge",
            "Jobs waiting to run.",
        );
        let _ = writeln!(out, "tuneshop_queue_depth {depth}");
        header(
            &mut out,
            "tuneshop_training_tokens_per_second",
            "gauge",
            "Speed of the job this process is training (0 when idle).",
        );
        let _ = writeln!(
            out,
            "tuneshop_training_tokens_per_second {}",
            self.training_tokens_per_second()
        );
        header(
            &mut out,
            "tuneshop_model_loaded",
            "gauge",
            "Whether the base model is loaded.",
        );
        let _ = writeln!(out, "tuneshop_model_loaded {}", u8::from(model_loaded));
        self.infer.render(&mut out);
        let name = "tuneshop_http_request_duration_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "HTTP requests by route and status.",
        );
        let map = self.http.lock().map(|m| m.clone()).unwrap_or_default();
        for ((method, route, status), h) in &map {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            h.render(&mut out, name, &labels);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe_http("GET", "/jobs", 200, 0.02);
        m.observe_http("GET", "/jobs", 200, 3.0);
        let text = m.render(&[("queued", 2), ("running", 1)], true);
        assert!(text.contains(
            "tuneshop_http_request_duration_seconds_bucket{method=\"GET\",route=\"/jobs\",status=\"200\",le=\"0.025\"} 1"
        ));
        assert!(text.contains(
            "tuneshop_http_request_duration_seconds_bucket{method=\"GET\",route=\"/jobs\",status=\"200\",le=\"5\"} 2"
        ));
        assert!(text.contains("tuneshop_queue_depth 2"));
        assert!(text.contains("tuneshop_model_loaded 1"));
    }
}
