//! Liveness, readiness and metrics.

use super::AppState;
use crate::db::jobs;
use crate::error::{ApiError, ErrorBody};
use crate::queue::device::{ModelInfo, ModelState};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    #[schema(example = "ready")]
    pub status: String,
    /// `sqlite` or `postgres`.
    pub database: String,
    /// Where artifacts live, e.g. `dir:/data/store`.
    pub store: String,
    /// This process's name in job claims.
    pub worker_id: String,
    pub model: ModelInfo,
}

/// Ready to take work: the database answers, the base model is loaded and the device worker
/// is alive.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Model still loading, failed to load, worker stopped, or database unreachable", body = ErrorBody),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    let model = match state.device.state() {
        ModelState::Ready(info) => info,
        ModelState::Loading => {
            return Err(ApiError::NotReady("the base model is still loading".into()))
        }
        ModelState::Failed(e) => {
            return Err(ApiError::NotReady(format!(
                "the base model failed to load: {e}"
            )))
        }
    };
    if !state.device.is_alive() {
        return Err(ApiError::NotReady("the device worker has stopped".into()));
    }
    state
        .db
        .ping()
        .await
        .map_err(|e| ApiError::NotReady(format!("the database is unreachable: {e}")))?;
    Ok(Json(Readiness {
        status: "ready".into(),
        database: state.db.backend().into(),
        store: state.store.describe(),
        worker_id: state.worker_id.to_string(),
        model,
    }))
}

/// Prometheus metrics: jobs by status, queue depth, training speed, HTTP latency by route.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 500, description = "The database could not be read", body = ErrorBody),
    ))]
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let counts = jobs::count_by_status(&state.db).await?;
    let named: Vec<(&str, i64)> = counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let loaded = matches!(state.device.state(), ModelState::Ready(_));
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&named, loaded),
    ))
}
