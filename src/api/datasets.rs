//! `/datasets`: JSONL uploads (raw body or multipart `file`), validated line by line, stored
//! with their row count, format, size and SHA-256.

use super::auth::Caller;
use super::upload::{body_to_file, content_type, field_to_file, Upload};
use super::{parse_id, secs, AppState, Deleted, List};
use crate::db::datasets::{self, Dataset, DeleteOutcome};
use crate::db::now_ms;
use crate::error::{ApiError, ErrorBody, LineProblem};
use crate::store::keys;
use crate::train::data::{parse_jsonl_with_lines, DataError};
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// Content types accepted as a raw JSONL body.
const JSONL_TYPES: [&str; 6] = [
    "application/jsonl",
    "application/x-jsonlines",
    "application/x-ndjson",
    "application/jsonlines",
    "text/plain",
    "application/octet-stream",
];

#[derive(Serialize, ToSchema)]
pub struct DatasetView {
    #[schema(example = "5b0f4a8e-3c2f-4f7e-9a51-0d4c1f1f6a10")]
    pub id: String,
    #[schema(example = "dataset")]
    pub object: &'static str,
    /// The name given at upload (display only).
    #[schema(example = "train.jsonl")]
    pub filename: String,
    /// `instruction`, `messages` or `prompt_completion`.
    #[schema(example = "messages")]
    pub format: String,
    #[schema(example = 4000)]
    pub rows: i64,
    pub bytes: i64,
    pub sha256: String,
    /// Unix seconds.
    pub created_at: i64,
}

impl From<Dataset> for DatasetView {
    fn from(d: Dataset) -> Self {
        Self {
            id: d.id.to_string(),
            object: "dataset",
            filename: d.filename,
            format: d.format,
            rows: d.rows,
            bytes: d.bytes,
            sha256: d.sha256,
            created_at: secs(d.created_at),
        }
    }
}

#[derive(Deserialize, IntoParams)]
pub struct UploadQuery {
    /// A display name for a raw-body upload.
    pub filename: Option<String>,
}

fn clean_filename(name: Option<String>) -> String {
    let name: String = name
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if name.trim().is_empty() {
        "dataset.jsonl".into()
    } else {
        name
    }
}

/// Upload a dataset.
///
/// The body is JSONL (one JSON object per line) in one of three formats:
/// `{"instruction", "input", "output"}`, `{"messages": [{"role", "content"}, …]}` or
/// `{"prompt", "completion"}`; every row must use the same one. Self-Instruct seed tasks
/// (`{"instruction", "instances": [{"input", "output"}], "is_classification"}`) are stored as
/// format `self_instruct_seeds`, for `POST /datasets/generate`. Send it raw
/// (`Content-Type: application/jsonl`) or as the `file` field of a multipart form.
#[utoipa::path(post, path = "/datasets", tag = "datasets", params(UploadQuery),
    request_body(content = String, description = "JSONL rows", content_type = "application/jsonl"),
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Stored", body = DatasetView),
        (status = 400, description = "Invalid rows; `error.lines` lists them by line number", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 413, description = "Larger than the upload limit", body = ErrorBody),
        (status = 415, description = "Neither JSONL nor multipart", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Query(q): Query<UploadQuery>,
    req: Request,
) -> Result<(StatusCode, Json<DatasetView>), ApiError> {
    let limit = state.settings.max_upload_bytes;
    let scratch = state.settings.work_dir().join("uploads");
    let (essence, full) = content_type(req.headers());
    let (upload, filename) = if essence == "multipart/form-data" {
        let mut form =
            Multipart::from_request(req, &state)
                .await
                .map_err(|e| ApiError::BadRequest {
                    code: "invalid_multipart",
                    message: format!("the multipart form cannot be read: {e}"),
                    param: None,
                })?;
        let mut found = None;
        while let Some(field) = form.next_field().await.map_err(|e| ApiError::BadRequest {
            code: "invalid_multipart",
            message: format!("the multipart form cannot be read: {e}"),
            param: None,
        })? {
            if field.name() == Some("file") {
                let name = field.file_name().map(str::to_string);
                found = Some((field_to_file(field, &scratch, limit).await?, name));
                break;
            }
        }
        found.ok_or_else(|| ApiError::BadRequest {
            code: "missing_file",
            message: "the multipart form has no `file` field".into(),
            param: Some("file".into()),
        })?
    } else if JSONL_TYPES.contains(&essence.as_str()) {
        let body: Body = req.into_body();
        (
            body_to_file(body, &scratch, limit).await?,
            q.filename.clone(),
        )
    } else {
        return Err(ApiError::UnsupportedMediaType {
            got: full,
            expected:
                "JSONL (`Content-Type: application/jsonl`) or a multipart form with a `file` field",
        });
    };
    let format = validate(&upload).await?;
    let id = Uuid::new_v4();
    let key = keys::dataset(id);
    state.store.put_file(&key, &upload.path).await?;
    let d = Dataset {
        id,
        tenant_id: tenant.id,
        filename: clean_filename(filename.or(q.filename)),
        format: format.0,
        rows: format.1 as i64,
        bytes: upload.bytes as i64,
        sha256: upload.sha256.clone(),
        store_key: key.clone(),
        created_at: now_ms(),
    };
    if let Err(e) = datasets::insert(state.db.pool(), &d).await {
        let _ = state.store.delete_prefix(&key).await;
        return Err(e.into());
    }
    tracing::info!(dataset_id = %id, rows = d.rows, bytes = d.bytes, "dataset stored");
    Ok((StatusCode::CREATED, Json(d.into())))
}

/// Checks every line; returns the format name and the row count.
async fn validate(upload: &Upload) -> Result<(String, usize), ApiError> {
    let path = upload.path.clone();
    tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path).map_err(ApiError::internal)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            ApiError::InvalidDataset {
                message: format!("the file is not UTF-8 text (line {line})"),
                lines: vec![LineProblem {
                    line,
                    message: "not valid UTF-8".into(),
                }],
            }
        })?;
        if is_seed_file(&text) {
            return seed_format(&text);
        }
        match parse_jsonl_with_lines(&text) {
            Ok((rows, _)) => {
                let format = serde_json::to_value(rows[0].format())
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                Ok((format, rows.len()))
            }
            Err(e) => Err(dataset_error(&e)),
        }
    })
    .await
    .map_err(ApiError::internal)?
}

/// The format name of Self-Instruct seed files (they seed `POST /datasets/generate`; they are
/// not training data).
pub const SEED_FORMAT: &str = "self_instruct_seeds";

/// Whether the first row is a Self-Instruct seed task (it has `instances`).
fn is_seed_file(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .is_some_and(|v| v.get("instances").is_some())
}

fn seed_format(text: &str) -> Result<(String, usize), ApiError> {
    match crate::selfinstruct::parse_seeds(text) {
        Ok(seeds) => Ok((SEED_FORMAT.to_string(), seeds.len())),
        Err(crate::selfinstruct::SelfInstructError::BadSeed { line, message }) => {
            Err(ApiError::InvalidDataset {
                message: format!("the seed tasks have an invalid row: line {line}: {message}"),
                lines: vec![LineProblem { line, message }],
            })
        }
        Err(e) => Err(ApiError::InvalidDataset {
            message: e.to_string(),
            lines: Vec::new(),
        }),
    }
}

/// A data error as a 400 that lists the lines at fault.
pub fn dataset_error(e: &DataError) -> ApiError {
    ApiError::InvalidDataset {
        message: e.to_string(),
        lines: e
            .lines()
            .iter()
            .map(|l| LineProblem {
                line: l.line,
                message: l.message.clone(),
            })
            .collect(),
    }
}

/// List the caller's datasets, newest first.
#[utoipa::path(get, path = "/datasets", tag = "datasets", security(("api_key" = [])),
    responses(
        (status = 200, description = "The datasets", body = List<DatasetView>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    Caller(tenant): Caller,
) -> Result<Json<List<DatasetView>>, ApiError> {
    let all = datasets::list(&state.db, tenant.id).await?;
    Ok(Json(List::of(all.into_iter().map(Into::into).collect())))
}

/// One dataset.
#[utoipa::path(get, path = "/datasets/{id}", tag = "datasets", security(("api_key" = [])),
    params(("id" = String, Path, description = "Dataset id")),
    responses(
        (status = 200, description = "The dataset", body = DatasetView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such dataset for this tenant", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<DatasetView>, ApiError> {
    let uuid = parse_id("dataset", &id)?;
    let d = datasets::get(&state.db, tenant.id, uuid)
        .await?
        .ok_or_else(|| ApiError::not_found("dataset", &id))?;
    Ok(Json(d.into()))
}

/// Delete a dataset (refused while a job that has not finished uses it).
#[utoipa::path(delete, path = "/datasets/{id}", tag = "datasets", security(("api_key" = [])),
    params(("id" = String, Path, description = "Dataset id")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such dataset for this tenant", body = ErrorBody),
        (status = 409, description = "A queued or running job uses it", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let uuid = parse_id("dataset", &id)?;
    match datasets::delete(&state.db, tenant.id, uuid).await? {
        DeleteOutcome::Deleted(d) => {
            if let Err(e) = state.store.delete_prefix(&d.store_key).await {
                tracing::warn!(dataset_id = %uuid, error = %e, "removing the dataset file failed");
            }
            Ok(Json(Deleted {
                id,
                object: "dataset",
                deleted: true,
            }))
        }
        DeleteOutcome::NotFound => Err(ApiError::not_found("dataset", &id)),
        DeleteOutcome::InUse(job) => Err(ApiError::Conflict {
            code: "dataset_in_use",
            message: format!(
                "dataset `{id}` is used by job `{job}`, which has not finished; cancel it or wait"
            ),
        }),
    }
}
