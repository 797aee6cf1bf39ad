//! Process metrics in the Prometheus text format: HTTP requests and latencies by route and
//! status, and the running job's training speed. Job counts come from the database when the
//! page is rendered (they are shared by every process).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Key: (method, route template, status).
type RouteKey = (String, String, u16);

#[derive(Default)]
pub struct Metrics {
    http: Mutex<BTreeMap<RouteKey, Histogram>>,
    training_tokens_per_second: AtomicU64,
}

impl Metrics {
    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let Ok(mut map) = self.http.lock() else {
            return;
        };
        let h = map
            .entry((method.to_string(), route.to_string(), status))
            .or_default();
        h.count += 1;
        h.sum += seconds;
        for (slot, &bound) in h.counts.iter_mut().zip(BUCKETS.iter()) {
            if seconds <= bound {
                *slot += 1;
            }
        }
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
        let _ = writeln!(out, "# HELP tuneshop_jobs Jobs by status (all tenants).");
        let _ = writeln!(out, "# TYPE tuneshop_jobs gauge");
        for (status, n) in jobs {
            let _ = writeln!(out, "tuneshop_jobs{{status=\"{status}\"}} {n}");
        }
        let depth: i64 = jobs
            .iter()
            .filter(|(s, _)| *s == "queued" || *s == "validating_files")
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(out, "# HELP tuneshop_queue_depth Jobs waiting to run.");
        let _ = writeln!(out, "# TYPE tuneshop_queue_depth gauge");
        let _ = writeln!(out, "tuneshop_queue_depth {depth}");
        let _ = writeln!(
            out,
            "# HELP tuneshop_training_tokens_per_second Speed of the job this process is training (0 when idle)."
        );
        let _ = writeln!(out, "# TYPE tuneshop_training_tokens_per_second gauge");
        let _ = writeln!(
            out,
            "tuneshop_training_tokens_per_second {}",
            self.training_tokens_per_second()
        );
        let _ = writeln!(out, "# HELP tuneshop_model_loaded Whether the base model is loaded.");
        let _ = writeln!(out, "# TYPE tuneshop_model_loaded gauge");
        let _ = writeln!(out, "tuneshop_model_loaded {}", u8::from(model_loaded));
        let _ = writeln!(
            out,
            "# HELP tuneshop_http_request_duration_seconds HTTP requests by route and status."
        );
        let _ = writeln!(out, "# TYPE tuneshop_http_request_duration_seconds histogram");
        let map = self.http.lock().map(|m| m.clone()).unwrap_or_default();
        for ((method, route, status), h) in &map {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            for (count, bound) in h.counts.iter().zip(BUCKETS.iter()) {
                let _ = writeln!(
                    out,
                    "tuneshop_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "tuneshop_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "tuneshop_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "tuneshop_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
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
