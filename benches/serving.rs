//! Serving benchmark: the real server (in this process, on a port of its own) with the default
//! model, driven over HTTP like a client would.
//!
//! - aggregate decode throughput at 1, 4 and 16 concurrent streams, (a) all on the base model and
//!   (b) each stream on a different rank-8 q,v adapter, with time to first token;
//! - adapter cold-load latency (store → cache), from the server's own histogram;
//! - p50 / p99 latency of short completions while a training job runs, against idle.
//!
//! Run it through `bench/serving.sh`, which also measures llama.cpp on the same GGUF. Settings
//! come from the environment: STREAMS (default `1,4,16`), MAX_TOKENS (64), ROUNDS (3),
//! LATENCY_REQUESTS (12), LLAMA_CPP_DECODE (llama.cpp's single-stream decode tok/s, to print the
//! ratio), TUNESHOP_DATA_DIR (where the default model is, default `./data`).

use candle_core::{Device, Tensor};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tuneshop::config::Settings;
use tuneshop::lora::{peft, Adapter, LoraConfig, LoraPair};
use tuneshop::model::default_model::{self, DEFAULT_MODEL};
use tuneshop::model::{Config, LinearId, Proj};
use tuneshop::startup::{Application, INITIAL_KEY_FILE};

const PROMPT: &str = "The history of the city begins with a small fishing village on the river. \
    Merchants arrived in the twelfth century, built a bridge and a market, and the village grew into \
    a town of craftsmen, scholars and sailors. Write the next chapter of its story:";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Bench {
    http: reqwest::Client,
    base_url: String,
    key: String,
    base_model: String,
}

/// One streamed completion: time to first token and tokens generated.
struct Stream {
    ttft: Duration,
    tokens: usize,
}

impl Bench {
    async fn post(&self, path: &str, body: &Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    async fn stream(&self, model: &str, max_tokens: usize) -> Stream {
        let body = json!({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                          "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
        let start = Instant::now();
        let resp = self
            .http
            .post(format!("{}/v1/completions", self.base_url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        let mut chunks = resp.bytes_stream();
        let (mut ttft, mut buf, mut tokens) = (None, String::new(), 0);
        while let Some(c) = chunks.next().await {
            buf.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).unwrap();
                if v["choices"].as_array().is_some_and(|c| !c.is_empty()) && ttft.is_none() {
                    ttft = Some(start.elapsed());
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n as usize;
                }
            }
        }
        Stream {
            ttft: ttft.unwrap_or_default(),
            tokens,
        }
    }

    /// `models.len()` concurrent streams; aggregate tokens/s and the median time to first token.
    async fn concurrent(&self, models: &[String], max_tokens: usize) -> (f64, Duration) {
        let start = Instant::now();
        let runs =
            futures_util::future::join_all(models.iter().map(|m| self.stream(m, max_tokens))).await;
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = runs.iter().map(|r| r.tokens).sum();
        let mut ttfts: Vec<Duration> = runs.iter().map(|r| r.ttft).collect();
        ttfts.sort();
        (tokens as f64 / wall, ttfts[ttfts.len() / 2])
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn import(&self, dir: &std::path::Path, name: &str) {
        let part = |f: &str| reqwest::multipart::Part::bytes(std::fs::read(dir.join(f)).unwrap());
        let form = reqwest::multipart::Form::new()
            .part("adapter_config", part(peft::CONFIG_FILE))
            .part("adapter_model", part(peft::WEIGHTS_FILE))
            .text("name", name.to_string());
        let resp = self
            .http
            .post(format!("{}/adapters", self.base_url))
            .bearer_auth(&self.key)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "{}",
            resp.text().await.unwrap()
        );
    }

    /// Latencies of `n` short completions one after another, sorted.
    async fn latencies(&self, n: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for _ in 0..n {
            let start = Instant::now();
            self.post("/v1/completions", &json!({"model": self.base_model, "prompt": "Name three colors:", "max_tokens": 16, "temperature": 0, "ignore_eos": true})).await;
            out.push(start.elapsed().as_secs_f64());
        }
        out.sort_by(f64::total_cmp);
        out
    }
}

/// A rank-8 q,v adapter with PEFT-like magnitudes (values do not change the speed).
fn random_adapter(cfg: &Config, seed: u64) -> Adapter {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let r = 8;
    let mut pairs = BTreeMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for proj in [Proj::Q, Proj::V] {
            let (out, inp) = LoraConfig::shape_of(proj, cfg);
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let b: Vec<f32> = (0..out * r)
                .map(|_| rng.random_range(-0.01..0.01))
                .collect();
            pairs.insert(
                LinearId { layer, proj },
                LoraPair {
                    a: Tensor::from_vec(a, (r, inp), &Device::Cpu).unwrap(),
                    b: Tensor::from_vec(b, (out, r), &Device::Cpu).unwrap(),
                },
            );
        }
    }
    Adapter {
        config: LoraConfig::default(),
        base_model: DEFAULT_MODEL.into(),
        pairs,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Rows long enough that training steps look like a real job's.
fn training_rows() -> String {
    let text =
        "The river town grew slowly, and every generation added a street, a bridge or a song. ";
    (0..64)
        .map(|i| {
            let row = json!({"prompt": format!("Tell story {i}."), "completion": text.repeat(12)});
            format!("{row}\n")
        })
        .collect()
}

async fn latency_while_training(b: &Bench, n: usize, hyper: Value) -> Vec<f64> {
    let resp = b
        .http
        .post(format!("{}/datasets", b.base_url))
        .bearer_auth(&b.key)
        .header("content-type", "application/jsonl")
        .body(training_rows())
        .send()
        .await
        .unwrap();
    let data: Value = resp.json().await.unwrap();
    let job = b
        .post(
            "/jobs",
            &json!({"training_dataset": data["id"], "hyperparameters": hyper}),
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    loop {
        let j: Value = b
            .http
            .get(format!("{}/jobs/{id}", b.base_url))
            .bearer_auth(&b.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if j["status"] == "running" && j["progress"]["step"].as_i64().unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lat = b.latencies(n).await;
    b.post(&format!("/jobs/{id}/cancel"), &json!({})).await;
    lat
}

async fn run() {
    let data_dir = std::path::PathBuf::from(
        std::env::var("TUNESHOP_DATA_DIR").unwrap_or_else(|_| "./data".into()),
    );
    let model_path = default_model::resolve(DEFAULT_MODEL, &data_dir).expect("the default model");
    let cfg = tuneshop::model::load(&model_path, &Default::default())
        .expect("load the model")
        .llama
        .config()
        .clone();
    let work = tempfile::tempdir().unwrap();
    let mut s =
        Settings::with_defaults(work.path().to_path_buf(), model_path.display().to_string());
    s.addr = "127.0.0.1:0".into();
    s.heartbeat_ms = 1000;
    let app = Application::build(s).await.expect("build the server");
    let base_url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until(std::future::pending()));
    let http = reqwest::Client::new();
    while http
        .get(format!("{base_url}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = std::fs::read_to_string(work.path().join(INITIAL_KEY_FILE))
        .unwrap()
        .trim()
        .to_string();
    let models: Value = http
        .get(format!("{base_url}/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let base_model = models["data"][0]["id"].as_str().unwrap().to_string();
    let b = Bench {
        http,
        base_url,
        key,
        base_model,
    };

    let streams: Vec<usize> = std::env::var("STREAMS")
        .unwrap_or_else(|_| "1,4,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let max_tokens: usize = env_or("MAX_TOKENS", 64);
    let rounds: usize = env_or("ROUNDS", 3);
    let most = streams.iter().copied().max().unwrap_or(1);
    for i in 0..most {
        let dir = work.path().join(format!("adapter-{i}"));
        peft::save(&random_adapter(&cfg, i as u64), &dir).unwrap();
        b.import(&dir, &format!("a{i}")).await;
    }
    // Each adapter's one cold load, one at a time on the idle server; then a warm-up.
    let all: Vec<String> = (0..most).map(|i| format!("a{i}")).collect();
    for a in &all {
        b.stream(a, 1).await;
    }
    b.concurrent(&all, 4).await;
    b.concurrent(&vec![b.base_model.clone(); most], 4).await;
    let metrics = b.metrics().await;
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(f64::NAN)
    };
    let load_ms = 1000.0 * metric("tuneshop_adapter_load_seconds_sum")
        / metric("tuneshop_adapter_load_seconds_count");

    println!("\nServing benchmark: {DEFAULT_MODEL} (Q4_1), {} threads, prompt of {} tokens, {max_tokens} tokens per stream (greedy, EOS ignored), median of {rounds} alternating rounds\n",
        rayon::current_num_threads(), tuneshop::model::load(&model_path, &Default::default()).unwrap().completion_prompt(PROMPT).unwrap().len());
    println!("| streams | (a) base tok/s | (b) one adapter each tok/s | (b)/(a) | TTFT (a) ms | TTFT (b) ms |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut single = f64::NAN;
    let mut results = Vec::new();
    for &c in &streams {
        let (mut ta, mut tb, mut fa, mut fb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (t, f) = b
                .concurrent(&vec![b.base_model.clone(); c], max_tokens)
                .await;
            ta.push(t);
            fa.push(f.as_secs_f64() * 1000.0);
            let (t, f) = b.concurrent(&all[..c], max_tokens).await;
            tb.push(t);
            fb.push(f.as_secs_f64() * 1000.0);
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, bb, fa, fb) = (med(ta), med(tb), med(fa), med(fb));
        if c == 1 {
            single = a;
        }
        println!(
            "| {c} | {a:.1} | {bb:.1} | {:.2}x | {fa:.0} | {fb:.0} |",
            bb / a
        );
        results.push(json!({"streams": c, "base_tps": a, "adapters_tps": bb, "ttft_base_ms": fa, "ttft_adapters_ms": fb}));
    }
    println!(
        "\nAdapter cold load (store → cache, rank 8 q,v): mean {load_ms:.2} ms over {} loads",
        metric("tuneshop_adapter_load_seconds_count")
    );
    if let Some(llama) = std::env::var("LLAMA_CPP_DECODE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        println!("Single stream through the server: {single:.1} tok/s (TTFT included) vs llama.cpp decode {llama:.1} tok/s: {:.2}x", single / llama);
    }

    let n: usize = env_or("LATENCY_REQUESTS", 12);
    let idle = b.latencies(n).await;
    let plain = latency_while_training(
        &b,
        n,
        json!({"batch_size": 4, "max_seq_len": 256, "n_epochs": 10}),
    )
    .await;
    let split = latency_while_training(&b, n, json!({"batch_size": 1, "gradient_accumulation_steps": 4, "max_seq_len": 256, "n_epochs": 10})).await;
    println!("\nLatency of a 16-token completion, {n} requests one after another (inference share 0.5):\n");
    println!("| while | p50 s | p99 s |");
    println!("| --- | ---: | ---: |");
    for (what, l) in [
        ("idle", &idle),
        ("training, batch 4", &plain),
        ("training, batch 1 x 4 accumulated", &split),
    ] {
        println!(
            "| {what} | {:.2} | {:.2} |",
            percentile(l, 0.5),
            percentile(l, 0.99)
        );
    }
    println!(
        "{}",
        json!({"throughput": results, "adapter_load_ms": load_ms, "single_stream_tps": single,
        "latency_idle": idle, "latency_training": plain, "latency_training_accumulated": split})
    );
}

// The allocator and thread settings of the `tuneshop` binary, so the numbers are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tuneshop::telemetry::keep_freed_memory();
    tuneshop::telemetry::init_threads(None);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}
