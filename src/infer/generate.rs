//! Generation parameters and their checks, and one-request generation (the CLI's): the batcher
//! with a single request, streaming text out as it is produced, on the calling thread.

use super::engine::{Engine, EngineConfig};
use super::lora_batch::AdapterLease;
use super::sampling::SamplingParams;
use super::sequence::{GenEvent, GenRequest, StepError};
use super::InferError;
use crate::model::{BaseModel, Message};
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
    /// Runs the same batcher as the server, with this one request, on the calling thread.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        adapter: Option<&AdapterLease>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation, InferError> {
        self.check_request(prompt.len(), params)?;
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut engine = Engine::new(self, EngineConfig::default(), None);
        let start = Instant::now();
        engine.submit(GenRequest {
            prompt: prompt.to_vec(),
            params: params.clone(),
            n: 1,
            first_index: 0,
            logprobs: None,
            ignore_eos: false,
            adapter: adapter.cloned(),
            events,
            received: start,
            deadline: None,
        });
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut first_token: Option<Instant> = None;
        let mut finish_reason = None;
        while engine.has_work() {
            engine.step();
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    GenEvent::Token {
                        token, text: piece, ..
                    } => {
                        first_token.get_or_insert_with(Instant::now);
                        tokens.extend(token);
                        if !piece.is_empty() {
                            on_text(&piece);
                            text.push_str(&piece);
                        }
                    }
                    GenEvent::Finished { reason, .. } => {
                        first_token.get_or_insert_with(Instant::now);
                        finish_reason = Some(reason);
                    }
                    GenEvent::Failed(e) => return Err(InferError::Step(e)),
                }
            }
        }
        let first = first_token.unwrap_or_else(Instant::now);
        Ok(Generation {
            text,
            tokens,
            prompt_tokens: prompt.len(),
            finish_reason: finish_reason.ok_or(InferError::Step(StepError::Compute(
                "generation ended without finishing".into(),
            )))?,
            prefill_time: first.duration_since(start),
            decode_time: first.elapsed(),
        })
    }

    /// The checks every request passes before it is queued: parameters, a non-empty prompt,
    /// and room for `max_tokens` in the model's context.
    pub fn check_request(
        &self,
        prompt_tokens: usize,
        params: &GenerateParams,
    ) -> Result<(), InferError> {
        params.validate()?;
        if prompt_tokens == 0 {
            return Err(InferError::EmptyPrompt);
        }
        let context = self.llama.config().max_position_embeddings;
        if prompt_tokens + params.max_tokens > context {
            return Err(InferError::ContextExceeded {
                prompt_tokens,
                max_tokens: params.max_tokens,
                context,
            });
        }
        Ok(())
    }
}

/// One prompt of a batch for [`generate_many`].
pub struct BatchPrompt {
    pub tokens: Vec<u32>,
    pub params: GenerateParams,
}

/// Generates every prompt on `engine` at once (they share batches with whatever else the engine
/// serves) and returns their texts in order. `between_steps` runs after each batch step (the
/// device thread takes new requests there); `stop` is checked at the same points.
pub fn generate_many<'m>(
    engine: &mut Engine<'m>,
    prompts: Vec<BatchPrompt>,
    adapter: Option<&AdapterLease>,
    between_steps: &mut dyn FnMut(&mut Engine<'m>),
    stop: &dyn Fn() -> bool,
) -> Result<Vec<String>, InferError> {
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let n = prompts.len();
    for (i, p) in prompts.into_iter().enumerate() {
        engine.submit(GenRequest {
            prompt: p.tokens,
            params: p.params,
            n: 1,
            first_index: i,
            logprobs: None,
            ignore_eos: false,
            adapter: adapter.cloned(),
            events: events.clone(),
            received: Instant::now(),
            deadline: None,
        });
    }
    drop(events);
    // Returning early drops `rx`: the engine then drops these sequences at its next step.
    let mut texts = vec![String::new(); n];
    let mut finished = 0;
    while finished < n {
        if stop() {
            return Err(InferError::Step(StepError::Compute("stopped".into())));
        }
        engine.step();
        between_steps(engine);
        while let Ok(ev) = rx.try_recv() {
            match ev {
                GenEvent::Token { index, text, .. } => texts[index].push_str(&text),
                GenEvent::Finished { .. } => finished += 1,
                GenEvent::Failed(e) => return Err(InferError::Step(e)),
            }
        }
    }
    Ok(texts)
}
