//! The continuous batcher. It lives on the thread that owns the model (the device thread, or
//! the CLI's main thread) and runs one forward pass per [`Engine::step`] over every active
//! sequence at once: prompts being prefilled (in chunks, so a long prompt never stalls the
//! others) and sequences decoding their next token, each row with its own adapter. New requests
//! join between steps; finished, abandoned and timed-out sequences leave between steps, and
//! their KV caches go with them.

use super::lora_batch::BatchLora;
use super::sequence::{GenRequest, Outcome, Sequence, Shared, StepError};
use crate::metrics::InferMetrics;
use crate::model::{BaseModel, Config, KvCache, SeqInput};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// Default number of sequences decoded together.
pub const DEFAULT_MAX_BATCH: usize = 32;
/// Default prompt tokens prefilled per step (across all sequences).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;
/// Default KV-cache memory for all sequences together.
pub const DEFAULT_KV_CACHE_BYTES: usize = 2 << 30;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_batch: usize,
    pub prefill_chunk: usize,
    pub kv_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: DEFAULT_MAX_BATCH,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_cache_bytes: DEFAULT_KV_CACHE_BYTES,
        }
    }
}

/// KV-cache bytes one sequence of up to `tokens` tokens may grow to (buffers grow by doubling).
pub fn kv_bytes_for(cfg: &Config, tokens: usize, dtype_size: usize) -> usize {
    let cap = tokens
        .next_power_of_two()
        .clamp(16, cfg.max_position_embeddings.max(tokens));
    cap * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * dtype_size
}

pub struct Engine<'m> {
    model: &'m BaseModel,
    cfg: EngineConfig,
    waiting: VecDeque<Sequence>,
    active: Vec<Sequence>,
    kv_reserved: usize,
    metrics: Option<Arc<InferMetrics>>,
}

impl<'m> Engine<'m> {
    pub fn new(
        model: &'m BaseModel,
        cfg: EngineConfig,
        metrics: Option<Arc<InferMetrics>>,
    ) -> Self {
        Self {
            model,
            cfg,
            waiting: VecDeque::new(),
            active: Vec::new(),
            kv_reserved: 0,
            metrics,
        }
    }

    /// KV-cache bytes one sequence of `req` may need.
    pub fn kv_bytes_of(&self, prompt: usize, max_tokens: usize) -> usize {
        let llama = &self.model.llama;
        kv_bytes_for(
            llama.config(),
            prompt + max_tokens,
            llama.dtype().size_in_bytes(),
        )
    }

    /// Queues a request; its sequences join the batch as room frees up.
    pub fn submit(&mut self, req: GenRequest) {
        let reserved = self.kv_bytes_of(req.prompt.len(), req.params.max_tokens);
        let timeout_secs = req
            .deadline
            .map_or(0, |d| d.saturating_duration_since(req.received).as_secs());
        let shared = Arc::new(Shared {
            prompt: req.prompt.into(),
            params: req.params,
            logprobs: req.logprobs,
            ignore_eos: req.ignore_eos,
            adapter: req.adapter,
            events: req.events,
            received: req.received,
            deadline: req.deadline,
            timeout_secs,
        });
        if let Some(m) = &self.metrics {
            m.add_prompt_tokens(shared.prompt.len() * req.n);
        }
        for index in req.first_index..req.first_index + req.n.max(1) {
            let cache = KvCache::new(self.model.llama.config());
            self.waiting
                .push_back(Sequence::new(shared.clone(), index, cache, reserved));
        }
        self.publish_sizes();
    }

    /// Whether any sequence is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.active.is_empty() || !self.waiting.is_empty()
    }

    pub fn active(&self) -> usize {
        self.active.len()
    }

    fn publish_sizes(&self) {
        if let Some(m) = &self.metrics {
            m.set_queue(self.active.len(), self.waiting.len());
        }
    }

    /// Drops sequences whose requester left or whose time is up.
    fn reap(&mut self) {
        let now = Instant::now();
        let gone = |s: &Sequence| {
            if s.abandoned() {
                return true;
            }
            match s.shared.deadline {
                Some(d) if now >= d => {
                    s.fail(StepError::Timeout(s.shared.timeout_secs));
                    true
                }
                _ => false,
            }
        };
        let mut freed = 0;
        self.active.retain(|s| {
            let keep = !gone(s);
            if !keep {
                freed += s.reserved;
            }
            keep
        });
        self.waiting.retain(|s| !gone(s));
        self.kv_reserved -= freed;
    }

    /// Moves waiting sequences into the batch while there is room and KV-cache memory.
    fn admit(&mut self) {
        while self.active.len() < self.cfg.max_batch {
            let Some(front) = self.waiting.front() else {
                break;
            };
            // A sequence larger than the whole budget still runs when it would be alone
            // (admission control refuses those before they get here).
            let fits = self.kv_reserved + front.reserved <= self.cfg.kv_cache_bytes
                || self.active.is_empty();
            if !fits {
                break;
            }
            let Some(s) = self.waiting.pop_front() else {
                break;
            };
            self.kv_reserved += s.reserved;
            self.active.push(s);
        }
    }

    /// One forward pass over every active sequence; tokens are reported as they are chosen.
    pub fn step(&mut self) {
        self.reap();
        self.admit();
        self.publish_sizes();
        if self.active.is_empty() {
            return;
        }
        let started = Instant::now();
        // Which sequences take part, and with how many tokens.
        let mut budget = self.cfg.prefill_chunk.max(1);
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for (i, s) in self.active.iter().enumerate() {
            if s.prompt_done() {
                plan.push((i, 1));
            } else if budget > 0 {
                let n = (s.shared.prompt.len() - s.fed).min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        let result = self.forward(&plan);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "inference step failed");
                let err = StepError::Compute(e.to_string());
                for (i, _) in &plan {
                    self.active[*i].fail(err.clone());
                }
                let failed: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
                self.remove(&failed);
                return;
            }
        };
        let tok = &self.model.tokenizer;
        let mut done = Vec::new();
        let now = Instant::now();
        let mut decoded = 0;
        for ((i, n), row) in plan.iter().zip(logits) {
            let s = &mut self.active[*i];
            if s.next.is_none() {
                s.fed += n;
                if !s.prompt_done() {
                    continue;
                }
            }
            decoded += 1;
            if let Some(m) = &self.metrics {
                match s.last_token_at {
                    None => m.observe_ttft(now.duration_since(s.shared.received)),
                    Some(t) => m.observe_itl(now.duration_since(t)),
                }
            }
            s.last_token_at = Some(now);
            match s.accept(tok, &row) {
                Ok(Outcome::Continue) => {}
                Ok(Outcome::Finished) => done.push(*i),
                Err(e) => {
                    s.fail(StepError::Compute(e.to_string()));
                    done.push(*i);
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.observe_step(plan.len(), decoded, started.elapsed());
        }
        self.remove(&done);
        self.publish_sizes();
    }

    /// Runs the planned rows through the model; the last-position logits of each.
    fn forward(&mut self, plan: &[(usize, usize)]) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut tokens: Vec<Vec<u32>> = Vec::with_capacity(plan.len());
        for &(i, n) in plan {
            let s = &self.active[i];
            tokens.push(match s.next {
                Some(t) => vec![t],
                None => s.shared.prompt[s.fed..s.fed + n].to_vec(),
            });
        }
        let adapters: Vec<_> = plan
            .iter()
            .map(|&(i, _)| self.active[i].shared.adapter.clone())
            .collect();
        let mut rows = Vec::new();
        for (a, t) in adapters.iter().zip(&tokens) {
            rows.extend(std::iter::repeat_n(a.as_deref(), t.len()));
        }
        let hook = BatchLora::new(rows);
        // Each planned sequence appears once, so its cache can be borrowed mutably.
        let mut caches: Vec<Option<&mut KvCache>> =
            self.active.iter_mut().map(|s| Some(&mut s.cache)).collect();
        let mut inputs: Vec<SeqInput> = Vec::with_capacity(plan.len());
        for (&(i, _), t) in plan.iter().zip(&tokens) {
            inputs.push(SeqInput {
                tokens: t,
                cache: caches[i].take(),
            });
        }
        let logits = self.model.llama.forward_last(&mut inputs, &hook)?;
        logits.to_vec2()
    }

    fn remove(&mut self, idx: &[usize]) {
        let mut idx = idx.to_vec();
        idx.sort_unstable();
        for &i in idx.iter().rev() {
            let s = self.active.remove(i);
            self.kv_reserved -= s.reserved;
        }
    }
}
