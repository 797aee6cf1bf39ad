//! OpenAI's request and response shapes for `/v1/completions`, `/v1/chat/completions` and
//! `/v1/models`, as the official clients send and read them. Fields OpenAI defines that we do
//! not serve are accepted when they ask for nothing (`presence_penalty: 0`) and refused with a
//! 422 naming them otherwise; unknown fields are ignored, as OpenAI-compatible servers do.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use utoipa::ToSchema;

/// A string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One stop string or up to four.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Settings both endpoints share.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    /// 0 to 2 (default 1); 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling, in (0, 1] (default 1).
    pub top_p: Option<f32>,
    /// Extension: keep the `top_k` most likely tokens (0 keeps all).
    pub top_k: Option<usize>,
    /// Completions per prompt, 1 to 16 (default 1).
    pub n: Option<usize>,
    /// Makes sampling reproducible.
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Not supported: must be absent or 0.
    pub presence_penalty: Option<f32>,
    /// Not supported: must be absent or 0.
    pub frequency_penalty: Option<f32>,
    /// Not supported: must be absent or empty.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// Extension: keep generating past end-of-sequence tokens (fixed-length benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Accepted and ignored.
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// An adapter id or name of the caller, or the base model's name (no adapter).
    #[schema(example = "sentiment-v1")]
    pub model: String,
    #[schema(value_type = Object, example = "Review: a gripping film.\nSentiment:")]
    pub prompt: PromptInput,
    /// Tokens to generate (default 16).
    pub max_tokens: Option<usize>,
    /// Return the prompt's text before the completion.
    #[serde(default)]
    pub echo: bool,
    /// Log-probabilities of each chosen token and of the `logprobs` most likely, 0 to 20.
    pub logprobs: Option<usize>,
    /// Must equal `n` if given.
    pub best_of: Option<usize>,
    /// Not supported: must be absent or empty.
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A message part (`{"type": "text", "text": …}`); only text is served.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// `system`, `developer` (as `system`), `user` or `assistant`.
    pub role: String,
    #[schema(value_type = Object)]
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// An adapter id or name of the caller, or the base model's name (no adapter).
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// Tokens to generate (default: as many as the context leaves, at most 1024).
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// Return the log-probability of each chosen token.
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs`: also the most likely alternatives, 0 to 20.
    pub top_logprobs: Option<usize>,
    /// Only `{"type": "text"}` is served.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<serde_json::Value>,
    /// Not supported: must be absent or empty.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Log-probabilities in the legacy completions shape.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<HashMap<String, f32>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` (end of sequence or a stop string) or `length` (`max_tokens`); `null` in stream
    /// chunks before the last.
    #[schema(example = "stop")]
    pub finish_reason: Option<&'static str>,
}

/// A completion, or (streaming) one chunk of it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    #[schema(example = "text_completion")]
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Always in a response; in a stream, only in the last chunk and only when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprobView {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprobView>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessageOut {
    #[schema(example = "assistant")]
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    #[schema(example = "stop")]
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    #[schema(example = "chat.completion")]
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// What a chat stream chunk adds to a choice.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// One server-sent event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    #[schema(example = "chat.completion.chunk")]
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelView {
    /// What to pass as `model`: the base model's name, or an adapter's name (its id when it
    /// has none).
    pub id: String,
    #[schema(example = "model")]
    pub object: &'static str,
    pub created: i64,
    #[schema(example = "tuneshop")]
    pub owned_by: String,
    /// For adapters: the base model they apply to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For adapters: the registry id (`GET /adapters/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_id: Option<String>,
}
