//! Single-sequence generation: prefill the prompt, then decode token by token with the KV cache,
//! streaming text out as it is produced. Runs on whichever thread owns the model (the CLI's main
//! thread, or the device thread), never on the async runtime.

use super::sampling::{Sampler, SamplingParams};
use super::text::{StopMatcher, TextStream};
use super::InferError;
use crate::model::{last_logits, BaseModel, KvCache, LoraHook, Message, SeqInput};
use std::time::{Duration, Instant};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
        }
    }
}

impl GenerateParams {
    pub fn validate(&self) -> Result<(), InferError> {
        let s = &self.sampling;
        let bad = |param, message: &str| {
            Err(InferError::InvalidParam {
                param,
                message: message.to_string(),
            })
        };
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1");
        }
        if !(0.0..=2.0).contains(&s.temperature) {
            return bad("temperature", "must be between 0 and 2");
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad("top_p", "must be greater than 0 and at most 1");
        }
        if self.stop.len() > 4 {
            return bad("stop", "takes at most 4 strings");
        }
        Ok(())
    }
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    /// Time to process the prompt and produce the first logits.
    pub prefill_time: Duration,
    /// Time spent on the decode steps after the first token.
    pub decode_time: Duration,
}

impl BaseModel {
    /// Tokens of a plain-text prompt (BOS added when the model wants it).
    pub fn completion_prompt(&self, prompt: &str) -> Result<Vec<u32>, InferError> {
        if prompt.is_empty() {
            return Err(InferError::EmptyPrompt);
        }
        Ok(self.tokenizer.encode(prompt, true)?)
    }

    /// Tokens of a conversation rendered by the model's chat template, ready for the reply.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, InferError> {
        if messages.is_empty() || messages.iter().all(|m| m.content.is_empty()) {
            return Err(InferError::EmptyPrompt);
        }
        let template = self
            .chat_template
            .as_ref()
            .ok_or(InferError::NoChatTemplate)?;
        let text = template.render(messages, true)?;
        Ok(self.tokenizer.encode(&text, false)?)
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each new piece of text.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        lora: &dyn LoraHook,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation, InferError> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(InferError::EmptyPrompt);
        }
        let context = self.llama.config().max_position_embeddings;
        if prompt.len() + params.max_tokens > context {
            return Err(InferError::ContextExceeded {
                prompt_tokens: prompt.len(),
                max_tokens: params.max_tokens,
                context,
            });
        }
        let tok = &self.tokenizer;
        let mut sampler = Sampler::new(params.sampling.clone());
        let mut stream = TextStream::new();
        let mut stopper = StopMatcher::new(params.stop.clone());
        let mut cache = KvCache::new(self.llama.config());
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut emit = |piece: &str, text: &mut String| {
            if !piece.is_empty() {
                on_text(piece);
                text.push_str(piece);
            }
        };

        let start = Instant::now();
        let mut logits = self.step(prompt, &mut cache, lora)?;
        let prefill_time = start.elapsed();
        let decode_start = Instant::now();
        let mut finish_reason = FinishReason::Length;
        let mut stopped = false;
        loop {
            let id = sampler.sample(&logits);
            if tok.stop_ids().contains(&id) {
                finish_reason = FinishReason::Stop;
                break;
            }
            tokens.push(id);
            if let Some(delta) = stream.push(tok, id)? {
                let (out, hit) = stopper.push(&delta);
                emit(&out, &mut text);
                if hit {
                    finish_reason = FinishReason::Stop;
                    stopped = true;
                    break;
                }
            }
            if tokens.len() == params.max_tokens {
                break;
            }
            logits = self.step(&[id], &mut cache, lora)?;
        }
        if !stopped {
            let (out, hit) = stopper.push(&stream.finish(tok)?);
            emit(&out, &mut text);
            if hit {
                finish_reason = FinishReason::Stop;
            } else {
                emit(&stopper.finish(), &mut text);
            }
        }
        Ok(Generation {
            text,
            tokens,
            prompt_tokens: prompt.len(),
            finish_reason,
            prefill_time,
            decode_time: decode_start.elapsed(),
        })
    }

    /// Runs `tokens` through the model on top of `cache`; the last position's logits.
    fn step(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        lora: &dyn LoraHook,
    ) -> Result<Vec<f32>, InferError> {
        let mut seqs = [SeqInput {
            tokens,
            cache: Some(cache),
        }];
        let logits = self.llama.forward_last(&mut seqs, lora)?;
        Ok(last_logits(&logits, 0)?)
    }
}
