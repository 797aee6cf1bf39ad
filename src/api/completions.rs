//! `POST /v1/completions` and `POST /v1/chat/completions`, OpenAI-compatible: `model` names the
//! base model or one of the caller's adapters, and the request joins the continuous batcher on
//! the device thread, where rows of different adapters share one batch. Answers come whole, or
//! streamed as server-sent events ending with `data: [DONE]`.

use super::auth::Caller;
use super::generation::{
    apply_event, base_model, blocking, collect, ended_early, invalid, now_secs, resolve_model,
    submit, Choice, Prepared, Sampling, Submitted, MAX_LOGPROBS, MAX_PROMPTS,
};
use super::json::ApiJson;
use super::openai::*;
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::infer::{GenEvent, InferError, TokenLogprob};
use crate::model::Message;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::HashMap;

/// `max_tokens` of a completion when the request leaves it out (as OpenAI's).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// The most tokens a chat completion generates when the request sets no limit (the KV cache is
/// reserved for the worst case, so "the rest of the context" would crowd out other requests).
pub const DEFAULT_CHAT_TOKENS: usize = 1024;

fn usage(prompts: usize, choices: &[Choice]) -> Usage {
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    Usage {
        prompt_tokens: prompts,
        completion_tokens,
        total_tokens: prompts + completion_tokens,
    }
}

fn reason(c: &Choice) -> &'static str {
    c.finish.map_or("stop", |r| r.as_str())
}

/// Creates a completion for a prompt (or several).
#[utoipa::path(post, path = "/v1/completions", tag = "inference", security(("api_key" = [])),
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream: true`, server-sent events of `CompletionResponse` chunks ending with `data: [DONE]`",
            content((CompletionResponse = "application/json"), (CompletionResponse = "text/event-stream"))),
        (status = 400, description = "Malformed JSON, an empty prompt, or a prompt and `max_tokens` beyond the context (`context_length_exceeded`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "`model` is neither the base model nor one of the caller's adapters", body = ErrorBody),
        (status = 408, description = "The request took longer than the server's limit", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid; `error.param` names it", body = ErrorBody),
        (status = 429, description = "Too many requests in progress (`overloaded`)", body = ErrorBody),
        (status = 503, description = "The base model is not loaded yet", body = ErrorBody),
    ))]
pub async fn completions(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let base = base_model(&state)?;
    let s = Sampling::parse(req.sampling)?;
    if req.suffix.as_deref().is_some_and(|x| !x.is_empty()) {
        return Err(invalid("suffix", "is not supported; leave it out"));
    }
    if req.best_of.is_some_and(|b| b != s.n) {
        return Err(invalid("best_of", "must equal `n` when given"));
    }
    let logprobs = req.logprobs;
    if logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
        return Err(invalid(
            "logprobs",
            format!("must be between 0 and {MAX_LOGPROBS}"),
        ));
    }
    if req.echo && logprobs.is_some() {
        return Err(invalid(
            "logprobs",
            "cannot be combined with `echo` (prompt log-probabilities are not computed)",
        ));
    }
    let max_tokens = req.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS);
    let adapter = resolve_model(&state, &tenant, &base, &req.model).await?;
    let model = base.clone();
    let (prompts, texts) = blocking(move || tokenize_prompts(&model, req.prompt)).await?;
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let sub = submit(
        &state,
        &base,
        Prepared {
            prompts,
            params: s.params(max_tokens),
            n: s.n,
            logprobs,
            ignore_eos: s.ignore_eos,
            adapter,
        },
    )?;
    let echo: Vec<String> = if req.echo { texts } else { Vec::new() };
    let head = Head {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: now_secs(),
        model: req.model,
    };
    if s.stream {
        let stream = stream_completion(head, sub, s.n, echo, prompt_tokens, s.include_usage);
        return Ok(sse(stream));
    }
    let choices = collect(sub).await?;
    let usage = usage(prompt_tokens, &choices);
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let prefix = echo.get(index / s.n).map_or("", String::as_str);
            CompletionChoice {
                index,
                logprobs: logprobs
                    .map(|_| completion_logprobs(&c.logprobs, &c.offsets, prefix.len())),
                finish_reason: Some(reason(&c)),
                text: format!("{prefix}{}", c.text),
            }
        })
        .collect();
    Ok(Json(CompletionResponse {
        id: head.id,
        object: "text_completion",
        created: head.created,
        model: head.model,
        choices,
        usage: Some(usage),
    })
    .into_response())
}

/// Tokens of each prompt, and its text (for `echo`).
fn tokenize_prompts(
    model: &crate::model::BaseModel,
    prompt: PromptInput,
) -> Result<(Vec<Vec<u32>>, Vec<String>), InferError> {
    let empty = || InferError::InvalidParam {
        param: "prompt",
        message: "must not be empty".into(),
    };
    let (texts, tokens) = match prompt {
        PromptInput::Text(t) => (vec![t], None),
        PromptInput::Texts(ts) => (ts, None),
        PromptInput::Tokens(ids) => (Vec::new(), Some(vec![ids])),
        PromptInput::TokenLists(lists) => (Vec::new(), Some(lists)),
    };
    let count = tokens.as_ref().map_or(texts.len(), Vec::len);
    if count == 0 {
        return Err(empty());
    }
    if count > MAX_PROMPTS {
        return Err(InferError::InvalidParam {
            param: "prompt",
            message: format!("takes at most {MAX_PROMPTS} prompts"),
        });
    }
    match tokens {
        None => {
            let mut out = Vec::with_capacity(texts.len());
            for t in &texts {
                if t.is_empty() {
                    return Err(empty());
                }
                out.push(model.completion_prompt(t)?);
            }
            Ok((out, texts))
        }
        Some(lists) => {
            let vocab = model.llama.config().vocab_size;
            let mut texts = Vec::with_capacity(lists.len());
            for ids in &lists {
                if ids.is_empty() {
                    return Err(empty());
                }
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(InferError::InvalidParam {
                        param: "prompt",
                        message: format!("token id {bad} is outside the vocabulary of {vocab}"),
                    });
                }
                texts.push(model.tokenizer.decode(ids, false)?);
            }
            Ok((lists, texts))
        }
    }
}

fn completion_logprobs(
    lps: &[TokenLogprob],
    offsets: &[usize],
    shift: usize,
) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: lps.iter().map(|l| l.token.clone()).collect(),
        token_logprobs: lps.iter().map(|l| l.logprob).collect(),
        top_logprobs: lps
            .iter()
            .map(|l| l.top.iter().cloned().collect::<HashMap<_, _>>())
            .collect(),
        text_offset: offsets.iter().map(|o| o + shift).collect(),
    }
}

fn chat_logprobs(lps: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: lps
            .iter()
            .map(|l| TokenLogprobView {
                token: l.token.clone(),
                logprob: l.logprob,
                bytes: l.token.as_bytes().to_vec(),
                top_logprobs: l
                    .top
                    .iter()
                    .map(|(t, lp)| TopLogprob {
                        token: t.clone(),
                        logprob: *lp,
                        bytes: t.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Creates a chat completion: `messages` are rendered with the base model's chat template.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "inference", security(("api_key" = [])),
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream: true`, server-sent events of `ChatCompletionChunk`s ending with `data: [DONE]`",
            content((ChatCompletionResponse = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        (status = 400, description = "Malformed JSON, no messages, a model without a chat template, or too long for the context (`context_length_exceeded`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "`model` is neither the base model nor one of the caller's adapters", body = ErrorBody),
        (status = 408, description = "The request took longer than the server's limit", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid; `error.param` names it", body = ErrorBody),
        (status = 429, description = "Too many requests in progress (`overloaded`)", body = ErrorBody),
        (status = 503, description = "The base model is not loaded yet", body = ErrorBody),
    ))]
pub async fn chat_completions(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let base = base_model(&state)?;
    let s = Sampling::parse(req.sampling)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(invalid("tools", "are not supported; leave them out"));
    }
    if let Some(f) = &req.response_format {
        if f.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(invalid(
                "response_format",
                "only `{\"type\": \"text\"}` is supported",
            ));
        }
    }
    let top = req.top_logprobs.unwrap_or(0);
    if top > MAX_LOGPROBS {
        return Err(invalid(
            "top_logprobs",
            format!("must be between 0 and {MAX_LOGPROBS}"),
        ));
    }
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(invalid("top_logprobs", "needs `logprobs: true`"));
    }
    let messages = chat_messages(req.messages)?;
    let adapter = resolve_model(&state, &tenant, &base, &req.model).await?;
    let model = base.clone();
    let prompt = blocking(move || model.chat_prompt(&messages)).await?;
    let context = base.llama.config().max_position_embeddings;
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or_else(|| {
            context
                .saturating_sub(prompt.len())
                .clamp(1, DEFAULT_CHAT_TOKENS)
        });
    let prompt_tokens = prompt.len();
    let sub = submit(
        &state,
        &base,
        Prepared {
            prompts: vec![prompt],
            params: s.params(max_tokens),
            n: s.n,
            logprobs: req.logprobs.then_some(top),
            ignore_eos: s.ignore_eos,
            adapter,
        },
    )?;
    let head = Head {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: now_secs(),
        model: req.model,
    };
    if s.stream {
        let stream = stream_chat(head, sub, prompt_tokens, s.include_usage);
        return Ok(sse(stream));
    }
    let choices = collect(sub).await?;
    let usage = usage(prompt_tokens, &choices);
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| ChatChoice {
            index,
            logprobs: req.logprobs.then(|| chat_logprobs(&c.logprobs)),
            finish_reason: reason(&c),
            message: ChatMessageOut {
                role: "assistant",
                content: c.text,
            },
        })
        .collect();
    Ok(Json(ChatCompletionResponse {
        id: head.id,
        object: "chat.completion",
        created: head.created,
        model: head.model,
        choices,
        usage,
    })
    .into_response())
}

/// OpenAI messages as the chat template's messages.
fn chat_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(invalid("messages", "must hold at least one message"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(invalid(
                        "messages",
                        format!(
                        "message {i} has role `{other}`; use system, developer, user or assistant"
                    ),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(invalid(
                                    "messages",
                                    format!(
                                    "message {i} has a `{kind}` part; only text parts are served"
                                ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(Message::new(role, &content))
        })
        .collect()
}

/// What every chunk of one response repeats.
struct Head {
    id: String,
    created: i64,
    model: String,
}

type SseStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<Event, std::convert::Infallible>> + Send>,
>;

fn sse(stream: SseStream) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn data<T: serde::Serialize>(v: &T) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_default())
}

/// The error event that ends a failed stream (the status line was already sent).
fn error_event(e: ApiError) -> Event {
    data(&e.body())
}

fn stream_completion(
    head: Head,
    sub: Submitted,
    n: usize,
    echo: Vec<String>,
    prompt_tokens: usize,
    include_usage: bool,
) -> SseStream {
    let chunk = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
        id: head.id.clone(),
        object: "text_completion",
        created: head.created,
        model: head.model.clone(),
        choices,
        usage,
    };
    Box::pin(async_stream::stream! {
        // The whole request moves in, its admission permit too: it is held until the end.
        let mut sub = sub;
        let mut done: Vec<Choice> = (0..sub.choices).map(|_| Choice::default()).collect();
        for (index, text) in (0..sub.choices).filter_map(|i| echo.get(i / n).map(|t| (i, t.clone()))) {
            yield Ok(data(&chunk(vec![CompletionChoice { index, text, logprobs: None, finish_reason: None }], None)));
        }
        while done.iter().any(|c| c.finish.is_none()) {
            let Some(ev) = sub.events.recv().await else {
                yield Ok(error_event(ended_early()));
                return;
            };
            let piece = match &ev {
                GenEvent::Token { index, text, logprob, .. } => Some(CompletionChoice {
                    index: *index,
                    text: text.clone(),
                    logprobs: logprob.as_ref().map(|l| {
                        let offset = done[*index].text.len();
                        completion_logprobs(std::slice::from_ref(l), &[offset], 0)
                    }),
                    finish_reason: None,
                }),
                GenEvent::Finished { index, reason, .. } => Some(CompletionChoice {
                    index: *index,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(reason.as_str()),
                }),
                GenEvent::Failed(_) => None,
            };
            if let Err(e) = apply_event(&mut done, ev) {
                yield Ok(error_event(e));
                return;
            }
            if let Some(c) = piece.filter(|c| !c.text.is_empty() || c.finish_reason.is_some() || c.logprobs.is_some()) {
                yield Ok(data(&chunk(vec![c], None)));
            }
        }
        if include_usage {
            yield Ok(data(&chunk(Vec::new(), Some(usage(prompt_tokens, &done)))));
        }
        yield Ok(Event::default().data("[DONE]"));
    })
}

fn stream_chat(head: Head, sub: Submitted, prompt_tokens: usize, include_usage: bool) -> SseStream {
    let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
        id: head.id.clone(),
        object: "chat.completion.chunk",
        created: head.created,
        model: head.model.clone(),
        choices,
        usage,
    };
    Box::pin(async_stream::stream! {
        // The whole request moves in, its admission permit too: it is held until the end.
        let mut sub = sub;
        let mut done: Vec<Choice> = (0..sub.choices).map(|_| Choice::default()).collect();
        for index in 0..sub.choices {
            let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()) };
            yield Ok(data(&chunk(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: None }], None)));
        }
        while done.iter().any(|c| c.finish.is_none()) {
            let Some(ev) = sub.events.recv().await else {
                yield Ok(error_event(ended_early()));
                return;
            };
            let piece = match &ev {
                GenEvent::Token { index, text, logprob, .. } => Some(ChatChunkChoice {
                    index: *index,
                    delta: ChatDelta { role: None, content: Some(text.clone()) },
                    logprobs: logprob.as_ref().map(|l| chat_logprobs(std::slice::from_ref(l))),
                    finish_reason: None,
                }),
                GenEvent::Finished { index, reason, .. } => Some(ChatChunkChoice {
                    index: *index,
                    delta: ChatDelta::default(),
                    logprobs: None,
                    finish_reason: Some(reason.as_str()),
                }),
                GenEvent::Failed(_) => None,
            };
            if let Err(e) = apply_event(&mut done, ev) {
                yield Ok(error_event(e));
                return;
            }
            let worth_sending = |c: &ChatChunkChoice| {
                c.finish_reason.is_some() || c.logprobs.is_some() || c.delta.content.as_deref().is_some_and(|t| !t.is_empty())
            };
            if let Some(c) = piece.filter(worth_sending) {
                yield Ok(data(&chunk(vec![c], None)));
            }
        }
        if include_usage {
            yield Ok(data(&chunk(Vec::new(), Some(usage(prompt_tokens, &done)))));
        }
        yield Ok(Event::default().data("[DONE]"));
    })
}
