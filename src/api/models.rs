//! `GET /v1/models`: what a caller can pass as `model`: the base model and its own adapters.

use super::auth::Caller;
use super::generation::now_secs;
use super::openai::ModelView;
use super::{secs, AppState, List};
use crate::db::adapters;
use crate::error::{ApiError, ErrorBody};
use axum::extract::State;
use axum::Json;

/// The base model and the caller's adapters, newest first.
#[utoipa::path(get, path = "/v1/models", tag = "inference", security(("api_key" = [])),
    responses(
        (status = 200, description = "The models", body = List<ModelView>),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 503, description = "The base model is not loaded yet", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    Caller(tenant): Caller,
) -> Result<Json<List<ModelView>>, ApiError> {
    let base = state
        .device
        .model_name()
        .ok_or_else(|| ApiError::NotReady("the base model is still loading".into()))?;
    let mut data = vec![ModelView {
        id: base.clone(),
        object: "model",
        created: now_secs(),
        owned_by: "tuneshop".into(),
        parent: None,
        adapter_id: None,
    }];
    for a in adapters::list(&state.db, tenant.id).await? {
        data.push(ModelView {
            id: a.name.clone().unwrap_or_else(|| a.id.to_string()),
            object: "model",
            created: secs(a.created_at),
            owned_by: tenant.name.clone(),
            parent: Some(a.base_model),
            adapter_id: Some(a.id.to_string()),
        });
    }
    Ok(Json(List::of(data)))
}
