//! `POST /datasets/generate`: a Self-Instruct job that grows a dataset of (instruction, input,
//! output) rows from seed tasks, written by the base model or one of the caller's adapters. It
//! waits in the same queue as fine-tuning jobs and reports the same way; its result is a new
//! dataset of the caller (`result_dataset_id`).

use super::auth::Caller;
use super::job_view::{view, JobView};
use super::json::ApiJson;
use super::AppState;
use crate::db::events::{self, EventType, Level};
use crate::db::jobs::{self, JobKind, NewJob};
use crate::db::{adapters, datasets};
use crate::error::{ApiError, ErrorBody};
use crate::infer::InferError;
use crate::selfinstruct::{self, Params, SelfInstructError, SelfInstructSpec};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateDataset {
    /// Instructions to generate, 1 to 1000.
    #[schema(example = 50)]
    pub num_instructions: usize,
    /// A dataset of seed tasks (Self-Instruct seed format, or instruction/input/output rows);
    /// default: the 175 seed tasks of the Self-Instruct paper.
    pub seed_dataset: Option<String>,
    /// Who writes: the base model (default) or an adapter id or name of the caller.
    pub model: Option<String>,
    /// Name of the resulting dataset (`.jsonl` is added): letters, digits, `-`, `_`, `.`.
    pub name: Option<String>,
    /// Sampling temperature of instruction generation (default 0.7).
    pub temperature: Option<f32>,
    /// Nucleus sampling of instruction generation (default 0.5).
    pub top_p: Option<f32>,
    /// Generation prompts per round, run as one batch (default 8).
    pub prompts_per_round: Option<usize>,
    /// Seeds the choice of examples and the sampling (default 0).
    pub seed: Option<u64>,
}

fn invalid(e: SelfInstructError) -> ApiError {
    match e {
        SelfInstructError::Invalid { param, message } => {
            ApiError::invalid(param, format!("`{param}` {message}"))
        }
        other => ApiError::invalid("seed_dataset", format!("`seed_dataset`: {other}")),
    }
}

/// Generate a dataset with Self-Instruct.
///
/// Creates a job of kind `self_instruct` in the one queue: it passes `validating_files` (the
/// seed tasks are read), waits its turn, then runs rounds of instruction generation, filtering
/// (ROUGE-L against the pool, length, unservable tasks), classification and instance
/// generation on the batcher, next to the requests it serves. Progress counts accepted
/// instructions; every accepted one is an event with its provenance. When it succeeds,
/// `result_dataset_id` is a new dataset of the caller, ready to train on.
#[utoipa::path(post, path = "/datasets/generate", tag = "datasets", request_body = GenerateDataset,
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Accepted: the job", body = JobView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "`model` is neither the base model nor one of the caller's adapters", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid (`error.param` names it), or the seed dataset holds no seed tasks", body = ErrorBody),
        (status = 429, description = "Too many jobs waiting or running for this tenant", body = ErrorBody),
        (status = 503, description = "The base model is not loaded yet", body = ErrorBody),
    ))]
pub async fn generate(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    ApiJson(req): ApiJson<GenerateDataset>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let base = state
        .device
        .model_name()
        .ok_or_else(|| ApiError::NotReady("the base model is still loading".into()))?;
    let defaults = Params::new(req.num_instructions);
    let params = Params {
        num_instructions: req.num_instructions,
        temperature: req.temperature.unwrap_or(defaults.temperature),
        top_p: req.top_p.unwrap_or(defaults.top_p),
        prompts_per_round: req.prompts_per_round.unwrap_or(defaults.prompts_per_round),
        seed: req.seed.unwrap_or(0),
    };
    params.validate().map_err(invalid)?;
    if params.seed > i64::MAX as u64 {
        return Err(ApiError::invalid(
            "seed",
            format!("`seed` must be at most {}", i64::MAX),
        ));
    }
    if let Some(n) = &req.name {
        let ok = !n.is_empty()
            && n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(ApiError::invalid(
                "name",
                "`name` must be 1 to 64 letters, digits, `-`, `_` or `.`",
            ));
        }
    }
    // Who writes: resolved now, so an unknown model is refused at once (kept by id).
    let model = match req.model.as_deref() {
        None => base.clone(),
        Some(m) if m == base => base.clone(),
        Some(m) => adapters::resolve(&state.db, tenant.id, m)
            .await?
            .ok_or_else(|| InferError::UnknownModel(m.to_string()))?
            .id
            .to_string(),
    };
    let seeds = match &req.seed_dataset {
        None => Uuid::nil(),
        Some(raw) => {
            let missing = || {
                ApiError::invalid(
                    "seed_dataset",
                    format!("`seed_dataset`: no dataset `{raw}` (upload it with POST /datasets)"),
                )
            };
            let id = Uuid::parse_str(raw).map_err(|_| missing())?;
            let d = datasets::get(&state.db, tenant.id, id)
                .await?
                .ok_or_else(missing)?;
            let text = String::from_utf8_lossy(&state.store.read(&d.store_key).await?).into_owned();
            tokio::task::spawn_blocking(move || selfinstruct::parse_seeds(&text))
                .await
                .map_err(ApiError::internal)?
                .map_err(invalid)?;
            id
        }
    };
    super::jobs::ensure_room(&state, tenant.id).await?;
    let spec = SelfInstructSpec { model, params };
    let job = jobs::insert(
        &state.db,
        &NewJob {
            id: Uuid::new_v4(),
            tenant_id: tenant.id,
            kind: JobKind::SelfInstruct,
            base_model: base,
            training_dataset_id: seeds,
            validation_dataset_id: None,
            suffix: req.name,
            seed: spec.params.seed as i64,
            hyperparameters: serde_json::to_string(&spec).map_err(ApiError::internal)?,
        },
    )
    .await?;
    events::insert(
        &state.db,
        job.id,
        Level::Info,
        EventType::Message,
        "Self-Instruct job created; reading its seed tasks",
        None,
    )
    .await?;
    state.queue.validate.notify_one();
    tracing::info!(job_id = %job.id, tenant_id = %tenant.id, "self-instruct job created");
    Ok((StatusCode::CREATED, Json(view(&state, job).await?)))
}
