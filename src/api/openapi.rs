//! The OpenAPI document, generated from the handlers, and the router built alongside it.

use super::{health, AppState};
use crate::error::{ApiError, ErrorBody};
use axum::extract::Request;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tuneshop",
        description = "Self-hosted LoRA fine-tuning-as-a-service for LLaMA-family models.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    tags((name = "operations", description = "Health, readiness, metrics"))
)]
struct ApiDoc;

fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
}

/// The OpenAPI document (what `/openapi.json` serves and `openapi/openapi.json` holds).
pub fn openapi_spec() -> utoipa::openapi::OpenApi {
    let (_, mut spec) = documented().split_for_parts();
    spec.info.version = env!("CARGO_PKG_VERSION").to_string();
    spec
}

/// The full router: documented routes, `/openapi.json`, and a JSON 404 for everything else.
pub fn router(state: AppState) -> Router {
    let (router, _) = documented().split_for_parts();
    let spec = openapi_spec();
    router
        .route("/openapi.json", get(move || async move { Json(spec) }))
        .fallback(|req: Request| async move {
            ApiError::RouteNotFound {
                method: req.method().to_string(),
                path: req.uri().path().to_string(),
            }
        })
        .with_state(state)
}
