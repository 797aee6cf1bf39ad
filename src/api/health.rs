//! Liveness and readiness.

use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::queue::device::{ModelInfo, ModelState};
use axum::extract::State;
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
    pub model: ModelInfo,
}

/// Ready to take work: the database answers and the base model is loaded.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Model still loading, failed to load, or database unreachable", body = ErrorBody),
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
    state
        .db
        .ping()
        .await
        .map_err(|e| ApiError::NotReady(format!("the database is unreachable: {e}")))?;
    Ok(Json(Readiness {
        status: "ready".into(),
        database: state.db.backend().into(),
        model,
    }))
}
