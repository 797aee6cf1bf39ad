//! `/adapters`: the registry of LoRA adapters (trained here or imported), their PEFT files as a
//! zip, and imports that are validated against the base model before they are accepted.

use super::auth::Caller;
use super::upload::{content_type, field_to_file, Upload};
use super::{secs, AppState, Deleted, List};
use crate::db::adapters::{self, AdapterRow};
use crate::db::now_ms;
use crate::error::{ApiError, ErrorBody};
use crate::lora::peft;
use crate::store::keys;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::io::Write;
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Serialize, ToSchema)]
pub struct AdapterView {
    pub id: String,
    #[schema(example = "adapter")]
    pub object: &'static str,
    /// Unique within the tenant; usable wherever the id is.
    pub name: Option<String>,
    /// `job` (trained here) or `import`.
    #[schema(example = "job")]
    pub source: String,
    pub job_id: Option<String>,
    pub base_model: String,
    #[schema(example = 8)]
    pub lora_r: i64,
    #[schema(example = 16.0)]
    pub lora_alpha: f64,
    #[schema(example = json!(["q_proj", "v_proj"]))]
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    /// Trainable parameters (A and B of every adapted projection).
    pub parameters: i64,
    /// Size of the PEFT files.
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
}

impl From<AdapterRow> for AdapterView {
    fn from(a: AdapterRow) -> Self {
        Self {
            id: a.id.to_string(),
            object: "adapter",
            name: a.name,
            source: a.source,
            job_id: a.job_id.map(|j| j.to_string()),
            base_model: a.base_model,
            lora_r: a.lora_r,
            lora_alpha: a.lora_alpha,
            target_modules: a.target_modules,
            use_rslora: a.use_rslora,
            parameters: a.parameters,
            bytes: a.bytes,
            created_at: secs(a.created_at),
        }
    }
}

async fn owned(state: &AppState, tenant: Uuid, id_or_name: &str) -> Result<AdapterRow, ApiError> {
    adapters::resolve(&state.db, tenant, id_or_name)
        .await?
        .ok_or_else(|| ApiError::not_found("adapter", id_or_name))
}

/// List the caller's adapters, newest first.
#[utoipa::path(get, path = "/adapters", tag = "adapters", security(("api_key" = [])),
    responses(
        (status = 200, description = "The adapters", body = List<AdapterView>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    Caller(tenant): Caller,
) -> Result<Json<List<AdapterView>>, ApiError> {
    let all = adapters::list(&state.db, tenant.id).await?;
    Ok(Json(List::of(all.into_iter().map(Into::into).collect())))
}

/// One adapter, by id or name.
#[utoipa::path(get, path = "/adapters/{id}", tag = "adapters", security(("api_key" = [])),
    params(("id" = String, Path, description = "Adapter id or name")),
    responses(
        (status = 200, description = "The adapter", body = AdapterView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such adapter for this tenant", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<AdapterView>, ApiError> {
    Ok(Json(owned(&state, tenant.id, &id).await?.into()))
}

/// Delete an adapter and its files.
#[utoipa::path(delete, path = "/adapters/{id}", tag = "adapters", security(("api_key" = [])),
    params(("id" = String, Path, description = "Adapter id or name")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such adapter for this tenant", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let a = owned(&state, tenant.id, &id).await?;
    if !adapters::delete(&state.db, tenant.id, a.id).await? {
        return Err(ApiError::not_found("adapter", &id));
    }
    // Requests that hold it keep their lease; new ones cannot resolve it any more.
    state.adapters.remove(a.id);
    if let Err(e) = state.store.delete_prefix(&a.store_key).await {
        tracing::warn!(adapter_id = %a.id, error = %e, "removing adapter files failed");
    }
    Ok(Json(Deleted {
        id: a.id.to_string(),
        object: "adapter",
        deleted: true,
    }))
}

/// Download the adapter's PEFT files (`adapter_config.json`, `adapter_model.safetensors`) as a
/// zip, ready for `PeftModel.from_pretrained` once unpacked.
#[utoipa::path(get, path = "/adapters/{id}/download", tag = "adapters", security(("api_key" = [])),
    params(("id" = String, Path, description = "Adapter id or name")),
    responses(
        (status = 200, description = "A zip of the PEFT files", content_type = "application/zip", body = Vec<u8>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such adapter for this tenant", body = ErrorBody),
    ))]
pub async fn download(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let a = owned(&state, tenant.id, &id).await?;
    let mut files = Vec::new();
    for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
        files.push((f, state.store.read(&keys::adapter_file(a.id, f)).await?));
    }
    let zip = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in files {
            w.start_file(name, opts).map_err(ApiError::internal)?;
            w.write_all(&bytes).map_err(ApiError::internal)?;
        }
        Ok(w.finish().map_err(ApiError::internal)?.into_inner())
    })
    .await
    .map_err(ApiError::internal)??;
    let name = a.name.clone().unwrap_or_else(|| a.id.to_string());
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.zip\""),
            ),
        ],
        zip,
    )
        .into_response())
}

/// The multipart form of an import (documentation only).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ImportForm {
    /// The PEFT `adapter_config.json`.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    adapter_config: String,
    /// The PEFT `adapter_model.safetensors`.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    adapter_model: String,
    /// Optional name, unique within the tenant.
    name: Option<String>,
}

fn form_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_multipart",
        message: format!("the multipart form cannot be read: {e}"),
        param: None,
    }
}

/// Import a PEFT LoRA adapter trained elsewhere.
///
/// A multipart form with `adapter_config` (adapter_config.json), `adapter_model`
/// (adapter_model.safetensors) and an optional `name`. It is checked against the base model
/// now (shapes, layers, target modules, rank limit; DoRA, `modules_to_save` and bias training
/// are refused), so an accepted adapter is one the server can serve.
#[utoipa::path(post, path = "/adapters", tag = "adapters", security(("api_key" = [])),
    request_body(content = ImportForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Imported", body = AdapterView),
        (status = 400, description = "A file is missing", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 413, description = "Larger than the upload limit", body = ErrorBody),
        (status = 415, description = "Not a multipart form", body = ErrorBody),
        (status = 422, description = "The adapter does not fit the base model or uses an unsupported feature", body = ErrorBody),
        (status = 503, description = "The base model is not loaded yet", body = ErrorBody),
    ))]
pub async fn import(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    req: Request,
) -> Result<(StatusCode, Json<AdapterView>), ApiError> {
    let model = state
        .device
        .model()
        .ok_or_else(|| ApiError::NotReady("the base model is still loading".into()))?;
    let (essence, full) = content_type(req.headers());
    if essence != "multipart/form-data" {
        return Err(ApiError::UnsupportedMediaType {
            got: full,
            expected: "a multipart form with `adapter_config` and `adapter_model` files",
        });
    }
    let limit = state.settings.max_upload_bytes;
    let scratch = state.settings.work_dir().join("uploads");
    let mut form = Multipart::from_request(req, &state)
        .await
        .map_err(form_error)?;
    let (mut config, mut weights, mut name): (Option<Upload>, Option<Upload>, Option<String>) =
        (None, None, None);
    while let Some(field) = form.next_field().await.map_err(form_error)? {
        match field.name().unwrap_or("") {
            "adapter_config" => config = Some(field_to_file(field, &scratch, limit).await?),
            "adapter_model" => weights = Some(field_to_file(field, &scratch, limit).await?),
            "name" => name = Some(field.text().await.map_err(form_error)?),
            _ => {}
        }
    }
    let missing = |field: &str| ApiError::BadRequest {
        code: "missing_file",
        message: format!("the form has no `{field}` file"),
        param: Some(field.to_string()),
    };
    let config = config.ok_or_else(|| missing("adapter_config"))?;
    let weights = weights.ok_or_else(|| missing("adapter_model"))?;
    let name = name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    if let Some(n) = &name {
        let ok = n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && Uuid::parse_str(n).is_err();
        if !ok {
            return Err(ApiError::invalid(
                "name",
                "`name` must be 1 to 64 letters, digits, `-`, `_` or `.` (and not a UUID)",
            ));
        }
        if adapters::name_taken(&state.db, tenant.id, n).await? {
            return Err(ApiError::Conflict {
                code: "name_taken",
                message: format!("an adapter named `{n}` already exists"),
            });
        }
    }
    // Lay the files out as a PEFT directory and load it: the same checks serving will make.
    let dir = scratch.join(format!("import-{}", Uuid::new_v4().simple()));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(ApiError::internal)?;
    let _cleanup = DirGuard(dir.clone());
    tokio::fs::copy(&config.path, dir.join(peft::CONFIG_FILE))
        .await
        .map_err(ApiError::internal)?;
    tokio::fs::copy(&weights.path, dir.join(peft::WEIGHTS_FILE))
        .await
        .map_err(ApiError::internal)?;
    let check_dir = dir.clone();
    let base = model.clone();
    let adapter = tokio::task::spawn_blocking(move || {
        peft::load(&check_dir, base.llama.config(), &candle_core::Device::Cpu)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| {
        ApiError::invalid(
            "adapter_model",
            format!("the adapter cannot be served on this base model: {e}"),
        )
    })?;

    let id = Uuid::new_v4();
    let prefix = keys::adapter_dir(id);
    let mut bytes = 0;
    for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
        bytes += state
            .store
            .put_file(&keys::adapter_file(id, f), &dir.join(f))
            .await?;
    }
    let c = &adapter.config;
    let row = AdapterRow {
        id,
        tenant_id: tenant.id,
        name,
        source: "import".into(),
        job_id: None,
        base_model: state.device.model_name().unwrap_or_default(),
        lora_r: c.r as i64,
        lora_alpha: c.alpha,
        target_modules: c.targets.iter().map(|p| p.hf_name().to_string()).collect(),
        use_rslora: c.use_rslora,
        parameters: adapter.parameter_count() as i64,
        bytes: bytes as i64,
        store_key: prefix.clone(),
        created_at: now_ms(),
    };
    let inserted = async {
        let mut tx = state.db.pool().begin().await?;
        adapters::insert(&mut tx, &row).await?;
        tx.commit().await?;
        Ok::<_, crate::db::DbError>(())
    }
    .await;
    if let Err(e) = inserted {
        let _ = state.store.delete_prefix(&prefix).await;
        return Err(match &row.name {
            Some(n) if e.to_string().to_lowercase().contains("unique") => ApiError::Conflict {
                code: "name_taken",
                message: format!("an adapter named `{n}` already exists"),
            },
            _ => e.into(),
        });
    }
    tracing::info!(adapter_id = %id, "adapter imported");
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// Removes a scratch directory when dropped.
struct DirGuard(std::path::PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
