//! `tuneshop bench`: prompt-processing and decode throughput of the base model, measured the
//! way llama.cpp's numbers are (prefill of N prompt tokens; greedy single-stream decode of M
//! tokens), so `bench/` can put both side by side.

use crate::infer::sampling::argmax;
use crate::infer::InferError;
use crate::model::{last_logits, BaseModel, KvCache, NoLora, SeqInput};
use serde::Serialize;
use std::time::Instant;

/// Text repeated to build prompts of any length.
const FILLER: &str = "The history of the city begins with a small fishing village on the river. \
    Merchants arrived in the twelfth century, built a bridge and a market, and the village grew \
    into a town of craftsmen, scholars and sailors. ";

#[derive(Debug, Clone)]
pub struct BenchParams {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
    /// Median over runs.
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub threads: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(model: &BaseModel, p: &BenchParams) -> Result<BenchResult, InferError> {
    let cfg = model.llama.config();
    if p.prompt_tokens == 0 || p.decode_tokens == 0 || p.runs == 0 {
        return Err(InferError::InvalidParam {
            param: "prompt_tokens/decode_tokens/runs",
            message: "must all be at least 1".into(),
        });
    }
    if p.prompt_tokens + p.decode_tokens > cfg.max_position_embeddings {
        return Err(InferError::ContextExceeded {
            prompt_tokens: p.prompt_tokens,
            max_tokens: p.decode_tokens,
            context: cfg.max_position_embeddings,
        });
    }
    let mut prompt = Vec::new();
    while prompt.len() < p.prompt_tokens {
        prompt.extend(model.tokenizer.encode(FILLER, false)?);
    }
    prompt.truncate(p.prompt_tokens);
    let mut prefill = Vec::with_capacity(p.runs);
    let mut decode = Vec::with_capacity(p.runs);
    // One warm-up run (page faults, allocator) that is not counted.
    for run in 0..=p.runs {
        let mut cache = KvCache::new(cfg);
        let t0 = Instant::now();
        let logits = model.llama.forward_last(
            &mut [SeqInput {
                tokens: &prompt,
                cache: Some(&mut cache),
            }],
            &NoLora,
        )?;
        let mut next = argmax(&last_logits(&logits, 0)?);
        let t1 = Instant::now();
        for _ in 0..p.decode_tokens {
            let logits = model.llama.forward_last(
                &mut [SeqInput {
                    tokens: &[next],
                    cache: Some(&mut cache),
                }],
                &NoLora,
            )?;
            next = argmax(&last_logits(&logits, 0)?);
        }
        let t2 = Instant::now();
        if run > 0 {
            prefill.push(p.prompt_tokens as f64 / (t1 - t0).as_secs_f64());
            decode.push(p.decode_tokens as f64 / (t2 - t1).as_secs_f64());
        }
    }
    Ok(BenchResult {
        prompt_tokens: p.prompt_tokens,
        decode_tokens: p.decode_tokens,
        runs: p.runs,
        prefill_tokens_per_second: median(prefill),
        decode_tokens_per_second: median(decode),
        threads: rayon::current_num_threads(),
    })
}
