//! The continuous batcher on the tiny model, driven directly: rows of different adapters in one
//! batch get what they get alone, requests join and leave between steps, abandoned and
//! timed-out sequences are dropped.

use crate::helpers::{load, tiny};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tuneshop::infer::{
    AdapterLease, Engine, EngineConfig, FinishReason, GenEvent, GenRequest, GenerateParams,
    ServedAdapter, StepError,
};
use tuneshop::lora::{Adapter, LoraConfig, LoraPair};
use tuneshop::model::{BaseModel, LinearId, Proj};
use uuid::Uuid;

/// An adapter with random A and B (a trained one, as far as the batcher can tell).
pub fn random_adapter(m: &BaseModel, seed: u64, r: usize, targets: &[Proj]) -> Adapter {
    use rand::{Rng, SeedableRng};
    let cfg = m.llama.config();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pairs = BTreeMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for &proj in targets {
            let (out, inp) = LoraConfig::shape_of(proj, cfg);
            let mut v =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let a = Tensor::from_vec(v(r * inp), (r, inp), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(v(out * r), (out, r), &Device::Cpu).unwrap();
            pairs.insert(LinearId { layer, proj }, LoraPair { a, b });
        }
    }
    Adapter {
        config: LoraConfig {
            r,
            alpha: 4.0 * r as f64,
            targets: targets.to_vec(),
            ..LoraConfig::default()
        },
        base_model: "tiny".into(),
        pairs,
    }
}

fn lease(m: &BaseModel, a: &Adapter) -> AdapterLease {
    Arc::new(ServedAdapter::new(Uuid::new_v4(), a, m.llama.device()).unwrap())
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..Default::default()
    }
}

fn request(
    prompt: &[u32],
    params: GenerateParams,
    adapter: Option<AdapterLease>,
) -> (GenRequest, UnboundedReceiver<GenEvent>) {
    let (events, rx) = unbounded_channel();
    let req = GenRequest {
        prompt: prompt.to_vec(),
        params,
        n: 1,
        first_index: 0,
        logprobs: None,
        ignore_eos: true,
        adapter,
        events,
        received: Instant::now(),
        deadline: None,
    };
    (req, rx)
}

/// The text and finish reason a request's events add up to.
fn outcome(rx: &mut UnboundedReceiver<GenEvent>) -> (String, Option<FinishReason>) {
    let (mut text, mut finish) = (String::new(), None);
    while let Ok(ev) = rx.try_recv() {
        match ev {
            GenEvent::Token { text: t, .. } => text.push_str(&t),
            GenEvent::Finished { reason, .. } => finish = Some(reason),
            GenEvent::Failed(e) => panic!("failed: {e}"),
        }
    }
    (text, finish)
}

fn run_to_end(engine: &mut Engine) {
    let mut steps = 0;
    while engine.has_work() {
        engine.step();
        steps += 1;
        assert!(steps < 10_000, "the batcher never finished");
    }
}

#[test]
fn a_batch_mixing_adapters_gives_each_row_what_it_gets_alone() {
    let m = load(&tiny().gguf_quantized);
    let x = lease(&m, &random_adapter(&m, 1, 4, &[Proj::Q, Proj::V]));
    let y = lease(&m, &random_adapter(&m, 2, 8, &Proj::ALL));
    let prompts: Vec<Vec<u32>> = [
        "the quick brown fox",
        "what is the capital of",
        "a lazy dog",
    ]
    .iter()
    .map(|p| m.completion_prompt(p).unwrap())
    .collect();
    let adapters = [Some(x.clone()), Some(y.clone()), None];

    // Alone: one request at a time.
    let mut alone = Vec::new();
    for (p, a) in prompts.iter().zip(&adapters) {
        let mut engine = Engine::new(&m, EngineConfig::default(), None);
        let (req, mut rx) = request(p, greedy(40), a.clone());
        engine.submit(req);
        run_to_end(&mut engine);
        let (text, finish) = outcome(&mut rx);
        assert_eq!(finish, Some(FinishReason::Length));
        alone.push(text);
    }
    // The adapters really change the output, or this test would prove nothing.
    let base_of = |p: &[u32]| {
        let mut engine = Engine::new(&m, EngineConfig::default(), None);
        let (req, mut rx) = request(p, greedy(40), None);
        engine.submit(req);
        run_to_end(&mut engine);
        outcome(&mut rx).0
    };
    assert_ne!(alone[0], base_of(&prompts[0]), "adapter X changes nothing");
    assert_ne!(alone[1], base_of(&prompts[1]), "adapter Y changes nothing");

    // Together: all three join before the first step, so every step batches them. A small
    // prefill chunk makes prompts prefill over several steps while others decode.
    let cfg = EngineConfig {
        prefill_chunk: 3,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&m, cfg, None);
    let mut rxs = Vec::new();
    for (p, a) in prompts.iter().zip(&adapters) {
        let (req, rx) = request(p, greedy(40), a.clone());
        engine.submit(req);
        rxs.push(rx);
    }
    engine.step();
    assert_eq!(engine.active(), 3);
    run_to_end(&mut engine);
    for (i, rx) in rxs.iter_mut().enumerate() {
        let (text, _) = outcome(rx);
        assert_eq!(text, alone[i], "row {i} differs in the mixed batch");
    }
}

#[test]
fn requests_join_between_steps_and_leave_when_done_abandoned_or_late() {
    let m = load(&tiny().gguf_quantized);
    let prompt = m.completion_prompt("the quick brown fox").unwrap();
    let mut engine = Engine::new(&m, EngineConfig::default(), None);
    let (long, mut long_rx) = request(&prompt, greedy(60), None);
    engine.submit(long);
    for _ in 0..5 {
        engine.step();
    }
    // A request that arrives mid-way joins the running batch.
    let (short, mut short_rx) = request(&prompt, greedy(8), None);
    engine.submit(short);
    engine.step();
    assert_eq!(engine.active(), 2);
    // A requester that goes away is dropped at the next step.
    let (gone, gone_rx) = request(&prompt, greedy(60), None);
    engine.submit(gone);
    engine.step();
    assert_eq!(engine.active(), 3);
    drop(gone_rx);
    engine.step();
    assert_eq!(engine.active(), 2);
    // A request past its deadline ends with a timeout.
    let (mut late, mut late_rx) = request(&prompt, greedy(60), None);
    late.deadline = Some(Instant::now() - Duration::from_millis(1));
    engine.submit(late);
    run_to_end(&mut engine);
    let failed = std::iter::from_fn(|| late_rx.try_recv().ok())
        .any(|e| matches!(e, GenEvent::Failed(StepError::Timeout(_))));
    assert!(failed, "the late request did not time out");
    assert_eq!(outcome(&mut short_rx).1, Some(FinishReason::Length));
    assert_eq!(outcome(&mut long_rx).1, Some(FinishReason::Length));
}

#[test]
fn sequences_wait_for_room_in_the_batch_and_the_kv_cache() {
    let m = load(&tiny().gguf_quantized);
    let prompt = m.completion_prompt("the quick brown fox").unwrap();
    let probe = Engine::new(&m, EngineConfig::default(), None);
    let one = probe.kv_bytes_of(prompt.len(), 20);
    // Room for two sequences' caches: the third waits until one finishes.
    let cfg = EngineConfig {
        kv_cache_bytes: 2 * one,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&m, cfg, None);
    let mut rxs = Vec::new();
    for _ in 0..3 {
        let (req, rx) = request(&prompt, greedy(20), None);
        engine.submit(req);
        rxs.push(rx);
    }
    engine.step();
    assert_eq!(engine.active(), 2);
    run_to_end(&mut engine);
    let texts: Vec<String> = rxs.iter_mut().map(|rx| outcome(rx).0).collect();
    assert!(texts.iter().all(|t| t == &texts[0]), "{texts:?}");
}
