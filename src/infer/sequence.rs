//! One sequence being generated: its prompt, its KV cache, how it picks tokens and turns them
//! into text, and what it tells the requester. The batcher owns many of these; this module
//! knows nothing about batching.

use super::lora_batch::AdapterLease;
use super::sampling::{Sampler, SamplingParams};
use super::text::{StopMatcher, TextStream};
use super::{FinishReason, GenerateParams};
use crate::model::{KvCache, ModelError, Tokenizer};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// A generation request for the batcher, already validated and tokenized.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Independent completions of the same prompt (OpenAI's `n`).
    pub n: usize,
    /// The choice index of the first of the `n` (requests of several prompts share a channel).
    pub first_index: usize,
    /// `Some(k)`: report each chosen token's log-probability and the `k` most likely ones.
    pub logprobs: Option<usize>,
    /// Keep going past end-of-sequence tokens (benchmarks that need fixed lengths).
    pub ignore_eos: bool,
    /// The adapter every row of this request applies; `None` for the base model.
    pub adapter: Option<AdapterLease>,
    pub events: UnboundedSender<GenEvent>,
    /// When the request arrived (time to first token counts from here).
    pub received: Instant,
    /// Past this, the request is ended with [`StepError::Timeout`].
    pub deadline: Option<Instant>,
}

/// What the requester hears, per choice (`index` is in `first_index..first_index + n`).
#[derive(Debug, Clone)]
pub enum GenEvent {
    /// A generated token and the text it completed (empty while a UTF-8 character or a
    /// possible stop string is pending). `token` is `None` for text released at the end.
    Token {
        index: usize,
        token: Option<u32>,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        completion_tokens: usize,
    },
    /// The request ended without finishing; no more events follow for any choice.
    Failed(StepError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    #[error("the request took longer than the server's limit of {0} seconds; lower `max_tokens` or raise TUNESHOP_REQUEST_TIMEOUT_SECS")]
    Timeout(u64),
    #[error("generation failed: {0}")]
    Compute(String),
}

/// The log-probability of a chosen token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What a request's sequences share.
pub(super) struct Shared {
    pub prompt: Arc<[u32]>,
    pub params: GenerateParams,
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    pub adapter: Option<AdapterLease>,
    pub events: UnboundedSender<GenEvent>,
    pub received: Instant,
    pub deadline: Option<Instant>,
    /// Seconds until the deadline, for the timeout message.
    pub timeout_secs: u64,
}

/// One choice of one request.
pub(super) struct Sequence {
    pub shared: Arc<Shared>,
    pub index: usize,
    pub cache: KvCache,
    /// Prompt tokens already in the cache.
    pub fed: usize,
    /// The token to feed next, once the prompt is in.
    pub next: Option<u32>,
    pub generated: usize,
    /// KV-cache bytes set aside for this sequence at admission.
    pub reserved: usize,
    pub last_token_at: Option<Instant>,
    sampler: Sampler,
    stream: TextStream,
    stopper: StopMatcher,
}

/// How a sampled token ended (or did not end) its sequence.
pub(super) enum Outcome {
    Continue,
    Finished,
}

impl Sequence {
    pub fn new(shared: Arc<Shared>, index: usize, cache: KvCache, reserved: usize) -> Self {
        let mut sampling: SamplingParams = shared.params.sampling.clone();
        // Each choice of a seeded request draws its own reproducible stream.
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
        let stopper = StopMatcher::new(shared.params.stop.clone());
        Self {
            shared,
            index,
            cache,
            fed: 0,
            next: None,
            generated: 0,
            reserved,
            last_token_at: None,
            sampler: Sampler::new(sampling),
            stream: TextStream::new(),
            stopper,
        }
    }

    /// Whether the requester has gone away (a dropped stream or response).
    pub fn abandoned(&self) -> bool {
        self.shared.events.is_closed()
    }

    pub fn prompt_done(&self) -> bool {
        self.fed == self.shared.prompt.len()
    }

    fn send(&self, ev: GenEvent) {
        // A requester that went away is noticed before the next step.
        let _ = self.shared.events.send(ev);
    }

    /// Picks the next token from `logits` and reports it.
    pub fn accept(&mut self, tok: &Tokenizer, logits: &[f32]) -> Result<Outcome, ModelError> {
        let id = self.sampler.sample(logits);
        if !self.shared.ignore_eos && tok.stop_ids().contains(&id) {
            return self.finish(tok, FinishReason::Stop);
        }
        self.generated += 1;
        let logprob = self
            .shared
            .logprobs
            .map(|k| token_logprob(tok, logits, id, k));
        let (text, hit) = match self.stream.push(tok, id)? {
            Some(delta) => self.stopper.push(&delta),
            None => (String::new(), false),
        };
        self.send(GenEvent::Token {
            index: self.index,
            token: Some(id),
            text,
            logprob,
        });
        if hit {
            return Ok(self.finished(FinishReason::Stop));
        }
        if self.generated == self.shared.params.max_tokens {
            return self.finish(tok, FinishReason::Length);
        }
        self.next = Some(id);
        Ok(Outcome::Continue)
    }

    /// Releases text still held back, then reports the end.
    fn finish(&mut self, tok: &Tokenizer, reason: FinishReason) -> Result<Outcome, ModelError> {
        let (mut text, hit) = self.stopper.push(&self.stream.finish(tok)?);
        if !hit {
            text.push_str(&self.stopper.finish());
        }
        if !text.is_empty() {
            self.send(GenEvent::Token {
                index: self.index,
                token: None,
                text,
                logprob: None,
            });
        }
        let reason = if hit { FinishReason::Stop } else { reason };
        Ok(self.finished(reason))
    }

    fn finished(&self, reason: FinishReason) -> Outcome {
        self.send(GenEvent::Finished {
            index: self.index,
            reason,
            completion_tokens: self.generated,
        });
        Outcome::Finished
    }

    pub fn fail(&self, e: StepError) {
        self.send(GenEvent::Failed(e));
    }
}

/// `log p(id)` under `logits` and the `k` most likely tokens.
fn token_logprob(tok: &Tokenizer, logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
    let mut top: Vec<u32> = (0..logits.len() as u32).collect();
    if k > 0 && k < top.len() {
        top.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
    }
    top.truncate(k);
    top.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    TokenLogprob {
        token: text(id),
        logprob: logits[id as usize] - lse,
        top: top
            .into_iter()
            .map(|t| (text(t), logits[t as usize] - lse))
            .collect(),
    }
}
