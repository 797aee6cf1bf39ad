//! What `/v1/completions` and `/v1/chat/completions` share: turning OpenAI's sampling fields
//! into checked parameters, resolving `model` to the base or one of the caller's adapters (a
//! lease from the adapter cache), admission (a bounded number of requests in progress), handing
//! the request to the device thread, and gathering its events into finished choices.

use super::openai::SamplingFields;
use super::AppState;
use crate::db::adapters;
use crate::db::tenants::Tenant;
use crate::error::ApiError;
use crate::infer::engine::kv_bytes_for;
use crate::infer::{
    AdapterLease, FinishReason, GenEvent, GenRequest, GenerateParams, InferError, SamplingParams,
    StepError, TokenLogprob,
};
use crate::model::BaseModel;
use crate::queue::device::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;

/// The most completions one request may ask for per prompt.
pub const MAX_N: usize = 16;
/// The most prompts in one completions request.
pub const MAX_PROMPTS: usize = 32;
/// The most alternatives per token in `logprobs`.
pub const MAX_LOGPROBS: usize = 20;

/// A 422 naming the field.
pub fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    InferError::InvalidParam {
        param,
        message: message.into(),
    }
    .into()
}

/// Checked sampling settings of a request (everything but `max_tokens`, which depends on the
/// endpoint and the prompt).
pub struct Sampling {
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Sampling {
    pub fn parse(f: SamplingFields) -> Result<Self, ApiError> {
        for (param, v) in [
            ("presence_penalty", f.presence_penalty),
            ("frequency_penalty", f.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(invalid(
                    param,
                    "is not supported; leave it out or set it to 0",
                ));
            }
        }
        if f.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(invalid("logit_bias", "is not supported; leave it out"));
        }
        let n = f.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(invalid("n", format!("must be between 1 and {MAX_N}")));
        }
        let stop = f.stop.map(|s| s.into_vec()).unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "strings must not be empty"));
        }
        if f.stream_options.is_some() && !f.stream {
            return Err(invalid(
                "stream_options",
                "is only allowed with `stream: true`",
            ));
        }
        Ok(Self {
            sampling: SamplingParams {
                temperature: f.temperature.unwrap_or(1.0),
                top_p: f.top_p.unwrap_or(1.0),
                top_k: f.top_k.unwrap_or(0),
                seed: f.seed,
            },
            stop,
            n,
            stream: f.stream,
            include_usage: f.stream_options.is_some_and(|o| o.include_usage),
            ignore_eos: f.ignore_eos,
        })
    }

    pub fn params(&self, max_tokens: usize) -> GenerateParams {
        GenerateParams {
            max_tokens,
            sampling: self.sampling.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// The loaded base model, or 503 while it loads.
pub fn base_model(state: &AppState) -> Result<Arc<BaseModel>, ApiError> {
    state
        .device
        .model()
        .ok_or_else(|| ApiError::NotReady("the base model is still loading".into()))
}

/// `model` as the base model (no adapter) or one of `tenant`'s adapters, leased from the cache.
pub async fn resolve_model(
    state: &AppState,
    tenant: &Tenant,
    base: &Arc<BaseModel>,
    name: &str,
) -> Result<Option<AdapterLease>, ApiError> {
    let base_name = state.device.model_name().unwrap_or_default();
    if name == base_name {
        return Ok(None);
    }
    let row = adapters::resolve(&state.db, tenant.id, name)
        .await?
        .ok_or_else(|| InferError::UnknownModel(name.to_string()))?;
    if row.base_model != base_name {
        return Err(ApiError::Conflict {
            code: "adapter_base_mismatch",
            message: format!(
                "the adapter `{name}` was made for the base model `{}`, but this server serves `{base_name}`",
                row.base_model
            ),
        });
    }
    Ok(Some(
        state
            .adapters
            .lease(&row, state.store.as_ref(), base)
            .await?,
    ))
}

/// Runs `f` on the blocking pool (tokenizing and template rendering stay off the runtime).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, InferError> + Send + 'static,
) -> Result<T, ApiError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

/// A checked request, ready for the device thread.
pub struct Prepared {
    pub prompts: Vec<Vec<u32>>,
    pub params: GenerateParams,
    pub n: usize,
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    pub adapter: Option<AdapterLease>,
}

/// A request in progress: its events, and its place among the requests in progress.
pub struct Submitted {
    pub events: UnboundedReceiver<GenEvent>,
    pub choices: usize,
    _permit: OwnedSemaphorePermit,
}

/// Admits the request (429 when the server is full), checks that it fits the context and the
/// KV-cache budget, and queues one batcher request per prompt (choice indices run across
/// prompts: prompt `p`'s choices are `p·n .. (p+1)·n`).
pub fn submit(state: &AppState, base: &BaseModel, req: Prepared) -> Result<Submitted, ApiError> {
    for p in &req.prompts {
        base.check_request(p.len(), &req.params)?;
    }
    let llama = &base.llama;
    let budget = state.settings.kv_cache_bytes();
    let need: usize = req
        .prompts
        .iter()
        .map(|p| {
            req.n
                * kv_bytes_for(
                    llama.config(),
                    p.len() + req.params.max_tokens,
                    llama.dtype().size_in_bytes(),
                )
        })
        .sum();
    if need > budget {
        return Err(InferError::TooLargeForCache { need, budget }.into());
    }
    let permit = state
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| InferError::Overloaded(state.settings.max_pending_requests))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let received = Instant::now();
    let deadline = received + Duration::from_secs(state.settings.request_timeout_secs.max(1));
    let choices = req.prompts.len() * req.n;
    for (i, prompt) in req.prompts.into_iter().enumerate() {
        let cmd = Command::Generate(Box::new(GenRequest {
            prompt,
            params: req.params.clone(),
            n: req.n,
            first_index: i * req.n,
            logprobs: req.logprobs,
            ignore_eos: req.ignore_eos,
            adapter: req.adapter.clone(),
            events: tx.clone(),
            received,
            deadline: Some(deadline),
        }));
        state
            .device
            .send(cmd)
            .map_err(|_| ApiError::NotReady("the device worker has stopped".into()))?;
    }
    Ok(Submitted {
        events: rx,
        choices,
        _permit: permit,
    })
}

/// One finished choice.
#[derive(Default)]
pub struct Choice {
    pub text: String,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    /// Byte offset in `text` where each token's text starts.
    pub offsets: Vec<usize>,
}

/// Folds one event into `choices`; `Err` when the request failed.
pub fn apply_event(choices: &mut [Choice], ev: GenEvent) -> Result<(), ApiError> {
    match ev {
        GenEvent::Token {
            index,
            text,
            logprob,
            ..
        } => {
            let c = &mut choices[index];
            if let Some(lp) = logprob {
                c.offsets.push(c.text.len());
                c.logprobs.push(lp);
            }
            c.text.push_str(&text);
        }
        GenEvent::Finished {
            index,
            reason,
            completion_tokens,
        } => {
            choices[index].finish = Some(reason);
            choices[index].completion_tokens = completion_tokens;
        }
        GenEvent::Failed(e) => return Err(InferError::Step(e).into()),
    }
    Ok(())
}

/// The error for a request whose events stopped before it finished.
pub fn ended_early() -> ApiError {
    InferError::Step(StepError::Compute(
        "the server stopped before the request finished".into(),
    ))
    .into()
}

/// Waits for every choice to finish.
pub async fn collect(mut sub: Submitted) -> Result<Vec<Choice>, ApiError> {
    let mut choices: Vec<Choice> = (0..sub.choices).map(|_| Choice::default()).collect();
    while choices.iter().any(|c| c.finish.is_none()) {
        let ev = sub.events.recv().await.ok_or_else(ended_early)?;
        apply_event(&mut choices, ev)?;
    }
    Ok(choices)
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
