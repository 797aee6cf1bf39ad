//! Inference metrics: time to first token, inter-token latency, tokens, batch sizes, the
//! queue, and the adapter cache. Written by the batcher (device thread) and the adapter cache.

use super::histogram::{header, Histogram, SECONDS, SIZES};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back the tokens-per-second gauge looks.
const RATE_WINDOW: Duration = Duration::from_secs(10);

pub struct InferMetrics {
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    step: Mutex<Histogram>,
    batch: Mutex<Histogram>,
    adapter_load: Mutex<Histogram>,
    /// (when, tokens) of recent steps, for the throughput gauge.
    recent: Mutex<Vec<(Instant, usize)>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    active: AtomicU64,
    waiting: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    resident: AtomicU64,
    resident_bytes: AtomicU64,
}

impl Default for InferMetrics {
    fn default() -> Self {
        Self {
            ttft: Mutex::new(Histogram::new(&SECONDS)),
            itl: Mutex::new(Histogram::new(&SECONDS)),
            step: Mutex::new(Histogram::new(&SECONDS)),
            batch: Mutex::new(Histogram::new(&SIZES)),
            adapter_load: Mutex::new(Histogram::new(&SECONDS)),
            recent: Mutex::new(Vec::new()),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            active: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            resident: AtomicU64::new(0),
            resident_bytes: AtomicU64::new(0),
        }
    }
}

fn observe(h: &Mutex<Histogram>, v: f64) {
    if let Ok(mut h) = h.lock() {
        h.observe(v);
    }
}

fn snapshot(h: &Mutex<Histogram>) -> Option<Histogram> {
    h.lock().ok().map(|h| h.clone())
}

impl InferMetrics {
    pub fn observe_ttft(&self, d: Duration) {
        observe(&self.ttft, d.as_secs_f64());
    }

    pub fn observe_itl(&self, d: Duration) {
        observe(&self.itl, d.as_secs_f64());
    }

    /// One forward pass over `sequences`, of which `decoded` produced a token.
    pub fn observe_step(&self, sequences: usize, decoded: usize, d: Duration) {
        observe(&self.step, d.as_secs_f64());
        observe(&self.batch, sequences as f64);
        self.generated_tokens
            .fetch_add(decoded as u64, Ordering::Relaxed);
        if let Ok(mut r) = self.recent.lock() {
            let now = Instant::now();
            r.retain(|(t, _)| now.duration_since(*t) < RATE_WINDOW);
            r.push((now, decoded));
        }
    }

    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn set_queue(&self, active: usize, waiting: usize) {
        self.active.store(active as u64, Ordering::Relaxed);
        self.waiting.store(waiting as u64, Ordering::Relaxed);
    }

    pub fn observe_adapter_load(&self, d: Duration) {
        observe(&self.adapter_load, d.as_secs_f64());
    }

    pub fn cache_hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn cache_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    pub fn cache_eviction(&self) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_cache_size(&self, adapters: usize, bytes: usize) {
        self.resident.store(adapters as u64, Ordering::Relaxed);
        self.resident_bytes.store(bytes as u64, Ordering::Relaxed);
    }

    /// (hits, misses, evictions).
    pub fn cache_counts(&self) -> (u64, u64, u64) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (get(&self.hits), get(&self.misses), get(&self.evictions))
    }

    /// Mean adapter cold-load time so far, in seconds (`None` before the first load).
    pub fn mean_adapter_load_seconds(&self) -> Option<f64> {
        let h = snapshot(&self.adapter_load)?;
        (h.count() > 0).then(|| h.sum() / h.count() as f64)
    }

    /// Generated tokens per second over the last few seconds.
    pub fn tokens_per_second(&self) -> f64 {
        let Ok(r) = self.recent.lock() else {
            return 0.0;
        };
        let now = Instant::now();
        let tokens: usize = r
            .iter()
            .filter(|(t, _)| now.duration_since(*t) < RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        tokens as f64 / RATE_WINDOW.as_secs_f64()
    }

    pub fn render(&self, out: &mut String) {
        let hists = [
            (
                "tuneshop_time_to_first_token_seconds",
                "From a request's arrival to its first generated token.",
                &self.ttft,
            ),
            (
                "tuneshop_inter_token_latency_seconds",
                "Between consecutive tokens of one sequence.",
                &self.itl,
            ),
            (
                "tuneshop_inference_step_seconds",
                "One batched forward pass (prefill chunks and decode rows together).",
                &self.step,
            ),
            (
                "tuneshop_inference_batch_size",
                "Sequences in one batched forward pass.",
                &self.batch,
            ),
            (
                "tuneshop_adapter_load_seconds",
                "Loading an adapter from the store into the cache (a miss).",
                &self.adapter_load,
            ),
        ];
        for (name, help, h) in hists {
            header(out, name, "histogram", help);
            if let Some(h) = snapshot(h) {
                h.render(out, name, "");
            }
        }
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "tuneshop_prompt_tokens_total",
                "Prompt tokens admitted.",
                get(&self.prompt_tokens),
            ),
            (
                "tuneshop_generated_tokens_total",
                "Tokens generated.",
                get(&self.generated_tokens),
            ),
            (
                "tuneshop_adapter_cache_hits_total",
                "Requests whose adapter was resident.",
                get(&self.hits),
            ),
            (
                "tuneshop_adapter_cache_misses_total",
                "Requests whose adapter was loaded from the store.",
                get(&self.misses),
            ),
            (
                "tuneshop_adapter_cache_evictions_total",
                "Adapters evicted to stay within the cache bounds.",
                get(&self.evictions),
            ),
        ];
        for (name, help, v) in counters {
            header(out, name, "counter", help);
            let _ = writeln!(out, "{name} {v}");
        }
        let gauges = [
            (
                "tuneshop_generated_tokens_per_second",
                "Generation throughput over the last 10 seconds.",
                self.tokens_per_second(),
            ),
            (
                "tuneshop_inference_active_sequences",
                "Sequences in the batch.",
                get(&self.active) as f64,
            ),
            (
                "tuneshop_inference_waiting_sequences",
                "Sequences admitted but waiting for room in the batch.",
                get(&self.waiting) as f64,
            ),
            (
                "tuneshop_adapter_cache_adapters",
                "Adapters resident in memory.",
                get(&self.resident) as f64,
            ),
            (
                "tuneshop_adapter_cache_bytes",
                "Bytes of resident adapters.",
                get(&self.resident_bytes) as f64,
            ),
        ];
        for (name, help, v) in gauges {
            header(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
    }
}
