//! `/jobs`: create a LoRA fine-tuning job (checked in full before it is accepted), poll it,
//! cancel it, read or stream its events, list its checkpoints.

use super::auth::Caller;
use super::job_view::{view, JobView};
use super::json::ApiJson;
use super::{parse_id, secs, AppState, List};
use crate::db::events::{self, Event, EventType, Level};
use crate::db::jobs::{self, CancelOutcome, Job, JobKind, NewJob};
use crate::db::{adapters, datasets};
use crate::error::{ApiError, ErrorBody};
use crate::queue::StopReason;
use crate::train::TrainParams;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// Id of the training dataset.
    pub training_dataset: String,
    /// Id of a validation dataset (loss and token accuracy are reported on it).
    pub validation_dataset: Option<String>,
    /// The base model's name; it must be the one this server serves (the default).
    #[schema(example = "smollm2-135m-instruct")]
    pub base_model: Option<String>,
    /// Name for the resulting adapter (unique within the tenant): letters, digits, `-`, `_`, `.`.
    #[schema(example = "sentiment-v1")]
    pub suffix: Option<String>,
    /// Seeds initialization, data order and dropout (overrides `hyperparameters.seed`).
    pub seed: Option<u64>,
    /// Absent fields take their defaults (`max_seq_len`: 512, or the model's context if shorter).
    #[schema(value_type = Option<TrainParams>)]
    pub hyperparameters: Option<serde_json::Value>,
}

/// 429 when `tenant` already has as many jobs waiting or running as a tenant may.
pub(super) async fn ensure_room(state: &AppState, tenant: Uuid) -> Result<(), ApiError> {
    let active = jobs::count_active(&state.db, tenant).await?;
    if active >= state.settings.max_active_jobs as i64 {
        return Err(ApiError::TooManyRequests(format!(
            "this tenant already has {active} jobs waiting or running (the limit is {}); wait for some to finish",
            state.settings.max_active_jobs
        )));
    }
    Ok(())
}

fn valid_suffix(s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && Uuid::parse_str(s).is_err();
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "suffix",
            "`suffix` must be 1 to 64 letters, digits, `-`, `_` or `.` (and not a UUID)",
        ))
    }
}

async fn owned_dataset(
    state: &AppState,
    tenant: Uuid,
    param: &'static str,
    raw: &str,
) -> Result<Uuid, ApiError> {
    let missing = || {
        ApiError::invalid(
            param,
            format!("`{param}`: no dataset `{raw}` (upload it with POST /datasets)"),
        )
    };
    let id = Uuid::parse_str(raw).map_err(|_| missing())?;
    let d = datasets::get(&state.db, tenant, id)
        .await?
        .ok_or_else(missing)?;
    if d.format == super::datasets::SEED_FORMAT {
        return Err(ApiError::invalid(
            param,
            format!("`{param}`: `{raw}` holds Self-Instruct seed tasks, not training rows; grow a dataset from them with POST /datasets/generate"),
        ));
    }
    Ok(id)
}

/// Create a fine-tuning job.
///
/// Everything is checked before the job is accepted: the datasets exist and belong to the
/// caller, the hyperparameters are within their limits for the base model. The job then
/// passes `validating_files` (its rows are tokenized as training will) and waits in the one
/// queue shared by every tenant; jobs run one at a time, in creation order.
#[utoipa::path(post, path = "/jobs", tag = "jobs", request_body = CreateJob,
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Accepted", body = JobView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 409, description = "The `suffix` names an existing adapter or a job in progress", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid; `error.param` names it", body = ErrorBody),
        (status = 429, description = "Too many jobs waiting or running for this tenant", body = ErrorBody),
        (status = 503, description = "The base model is not loaded yet", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    ApiJson(req): ApiJson<CreateJob>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let model = state
        .device
        .model()
        .ok_or_else(|| ApiError::NotReady("the base model is still loading".into()))?;
    let served = state.device.model_name().unwrap_or_default();
    let base_model = req.base_model.clone().unwrap_or_else(|| served.clone());
    if base_model != served {
        return Err(ApiError::invalid(
            "base_model",
            format!("`base_model`: this server fine-tunes `{served}`, not `{base_model}`"),
        ));
    }
    let train = owned_dataset(&state, tenant.id, "training_dataset", &req.training_dataset).await?;
    let valid = match &req.validation_dataset {
        Some(raw) => Some(owned_dataset(&state, tenant.id, "validation_dataset", raw).await?),
        None => None,
    };
    let raw = req.hyperparameters.unwrap_or_else(|| serde_json::json!({}));
    let mut params: TrainParams =
        super::json::parse(raw.to_string().as_bytes()).map_err(|e| match e {
            ApiError::Invalid { param, message } if param.is_empty() => {
                ApiError::invalid("hyperparameters", message)
            }
            ApiError::Invalid { param, message } => {
                ApiError::invalid(format!("hyperparameters.{param}"), message)
            }
            _ => ApiError::invalid("hyperparameters", "`hyperparameters` must be an object"),
        })?;
    if raw.get("max_seq_len").is_none() {
        params.max_seq_len = params
            .max_seq_len
            .min(model.llama.config().max_position_embeddings);
    }
    if let Some(seed) = req.seed {
        params.seed = seed;
    }
    if params.seed > i64::MAX as u64 {
        return Err(ApiError::invalid(
            "seed",
            format!("`seed` must be at most {}", i64::MAX),
        ));
    }
    params
        .validate(model.llama.config())
        .map_err(|e| ApiError::invalid(format!("hyperparameters.{}", e.param), e.to_string()))?;
    if let Some(s) = &req.suffix {
        valid_suffix(s)?;
        if adapters::name_taken(&state.db, tenant.id, s).await?
            || jobs::suffix_in_use(&state.db, tenant.id, s).await?
        {
            return Err(ApiError::Conflict {
                code: "name_taken",
                message: format!("an adapter or a job in progress already uses the name `{s}`; pick another `suffix`"),
            });
        }
    }
    ensure_room(&state, tenant.id).await?;
    let job = jobs::insert(
        &state.db,
        &NewJob {
            id: Uuid::new_v4(),
            tenant_id: tenant.id,
            kind: JobKind::FineTune,
            base_model,
            training_dataset_id: train,
            validation_dataset_id: valid,
            suffix: req.suffix,
            seed: params.seed as i64,
            hyperparameters: serde_json::to_string(&params).map_err(ApiError::internal)?,
        },
    )
    .await?;
    events::insert(
        &state.db,
        job.id,
        Level::Info,
        EventType::Message,
        "Job created; validating its files",
        None,
    )
    .await?;
    state.queue.validate.notify_one();
    tracing::info!(job_id = %job.id, tenant_id = %tenant.id, "job created");
    Ok((StatusCode::CREATED, Json(view(&state, job).await?)))
}

#[derive(Deserialize, IntoParams)]
pub struct ListQuery {
    /// Return jobs created before this job id (the last one of the previous page).
    pub after: Option<String>,
    /// Page size, 1 to 100 (default 20).
    pub limit: Option<i64>,
}

/// List the caller's jobs, newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", params(ListQuery), security(("api_key" = [])),
    responses(
        (status = 200, description = "A page of jobs", body = List<JobView>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 422, description = "Bad `limit` or `after`", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<List<JobView>>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            "`limit` must be between 1 and 100",
        ));
    }
    let after = match &q.after {
        None => None,
        Some(raw) => {
            let id = Uuid::parse_str(raw)
                .map_err(|_| ApiError::invalid("after", format!("`after`: no job `{raw}`")))?;
            jobs::get(&state.db, tenant.id, id)
                .await?
                .ok_or_else(|| ApiError::invalid("after", format!("`after`: no job `{raw}`")))?;
            Some(id)
        }
    };
    let mut page = jobs::list(&state.db, tenant.id, after, limit + 1).await?;
    let has_more = page.len() as i64 > limit;
    page.truncate(limit as usize);
    let mut data = Vec::with_capacity(page.len());
    for job in page {
        data.push(view(&state, job).await?);
    }
    Ok(Json(List {
        object: "list",
        data,
        has_more: Some(has_more),
    }))
}

async fn owned_job(state: &AppState, tenant: Uuid, raw: &str) -> Result<Job, ApiError> {
    let id = parse_id("job", raw)?;
    jobs::get(&state.db, tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", raw))
}

/// One job: status, queue position, progress, result.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", security(("api_key" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = owned_job(&state, tenant.id, &id).await?;
    Ok(Json(view(&state, job).await?))
}

/// Cancel a job: a waiting one at once, a running one at its next step (its checkpoints stay).
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs", security(("api_key" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled, or (running) stopping at its next step", body = JobView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
        (status = 409, description = "The job has already finished", body = ErrorBody),
    ))]
pub async fn cancel(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let uuid = parse_id("job", &id)?;
    match jobs::request_cancel(&state.db, tenant.id, uuid).await? {
        CancelOutcome::Cancelled => {
            events::insert(
                &state.db,
                uuid,
                Level::Info,
                EventType::Message,
                "Cancelled before it started",
                None,
            )
            .await?;
            state.queue.events.notify_waiters();
        }
        CancelOutcome::Requested => {
            state.queue.stop_local(uuid, StopReason::Cancel);
            events::insert(
                &state.db,
                uuid,
                Level::Info,
                EventType::Message,
                "Cancel requested; stopping at the next step",
                None,
            )
            .await?;
            state.queue.events.notify_waiters();
        }
        CancelOutcome::AlreadyFinished(status) => {
            return Err(ApiError::Conflict {
                code: "job_finished",
                message: format!("job `{id}` has already finished ({})", status.as_str()),
            })
        }
        CancelOutcome::NotFound => return Err(ApiError::not_found("job", &id)),
    }
    let job = owned_job(&state, tenant.id, &id).await?;
    Ok(Json(view(&state, job).await?))
}

#[derive(Serialize, ToSchema)]
pub struct EventView {
    /// Increasing; pass it as `after` (or `Last-Event-ID`) to continue.
    pub seq: i64,
    #[schema(example = "fine_tuning.job.event")]
    pub object: &'static str,
    /// Unix milliseconds.
    pub created_at: i64,
    pub level: Level,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

impl From<Event> for EventView {
    fn from(e: Event) -> Self {
        Self {
            seq: e.seq,
            object: "fine_tuning.job.event",
            created_at: e.created_at,
            level: e.level,
            kind: e.kind,
            message: e.message,
            data: e.data,
        }
    }
}

#[derive(Deserialize, IntoParams)]
pub struct EventsQuery {
    /// Only events after this `seq`.
    pub after: Option<i64>,
    /// At most this many (1 to 1000, default 100); ignored when streaming.
    pub limit: Option<i64>,
}

/// A job's events (messages and per-step metrics), oldest first.
///
/// With `Accept: text/event-stream` the events stream live as server-sent events (`id` is the
/// event's `seq`) until the job has ended, then the stream closes.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", params(("id" = String, Path, description = "Job id"), EventsQuery),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Events (JSON list, or an SSE stream)", body = List<EventView>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
        (status = 422, description = "Bad `limit`", body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = owned_job(&state, tenant.id, &id).await?;
    let wants_stream = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let after = resume.or(q.after).unwrap_or(0);
    if wants_stream {
        return Ok(stream_events(state, job.id, after).into_response());
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            "`limit` must be between 1 and 1000",
        ));
    }
    let mut page = events::list(&state.db, job.id, after, limit + 1).await?;
    let has_more = page.len() as i64 > limit;
    page.truncate(limit as usize);
    Ok(Json(List {
        object: "list",
        data: page.into_iter().map(EventView::from).collect::<Vec<_>>(),
        has_more: Some(has_more),
    })
    .into_response())
}

/// Streams events as they are written, until the job has ended and every event is out (or
/// the server shuts down).
fn stream_events(
    state: AppState,
    job: Uuid,
    mut after: i64,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let stream = async_stream::stream! {
        let mut shutdown = state.shutdown.clone();
        loop {
            let notified = state.queue.events.notified();
            // The status is read before the events: once it is final, every event is written.
            let finished = match jobs::get_any(&state.db, job).await {
                Ok(Some(j)) => j.status.is_terminal(),
                _ => true,
            };
            let batch = match events::list(&state.db, job, after, 500).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(job_id = %job, error = %e, "reading events failed");
                    break;
                }
            };
            let full = batch.len() == 500;
            for e in batch {
                after = e.seq;
                let view = EventView::from(e);
                let data = serde_json::to_string(&view).unwrap_or_default();
                yield Ok(SseEvent::default().id(view.seq.to_string()).data(data));
            }
            if full {
                continue;
            }
            if finished || *shutdown.borrow() {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => {}
            }
        }
    };
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Serialize, ToSchema)]
pub struct CheckpointView {
    pub id: String,
    #[schema(example = "fine_tuning.job.checkpoint")]
    pub object: &'static str,
    pub step: i64,
    pub train_loss: Option<f64>,
    pub valid_loss: Option<f64>,
    /// Unix seconds.
    pub created_at: i64,
}

/// The checkpoints a job has written (a restarted or resumed job continues from the last).
#[utoipa::path(get, path = "/jobs/{id}/checkpoints", tag = "jobs", security(("api_key" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Checkpoints by step", body = List<CheckpointView>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
    ))]
pub async fn checkpoints(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<List<CheckpointView>>, ApiError> {
    let job = owned_job(&state, tenant.id, &id).await?;
    let list = jobs::checkpoints(&state.db, job.id).await?;
    Ok(Json(List::of(
        list.into_iter()
            .map(|c| CheckpointView {
                id: c.id.to_string(),
                object: "fine_tuning.job.checkpoint",
                step: c.step,
                train_loss: c.train_loss,
                valid_loss: c.valid_loss,
                created_at: secs(c.created_at),
            })
            .collect(),
    )))
}
