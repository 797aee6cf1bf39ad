//! The OpenAPI document, generated from the handlers, and the router built alongside it with
//! the cross-cutting layers (metrics, request ids, timeouts, body limits, tracing).

use super::{
    adapters, client_ip, completions, datasets, generate, health, jobs, models, tenants, AppState,
};
use crate::error::{ApiError, ErrorBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use std::time::{Duration, Instant};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tuneshop",
        description = "Self-hosted LoRA fine-tuning-as-a-service for LLaMA-family models. \
            Upload datasets, create jobs, and get PEFT adapters trained on one shared frozen base \
            model, and serve them through OpenAI-compatible completions. Errors are \
            `{\"error\": {\"code\", \"type\", \"message\", \"param\"}}`.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    tags(
        (name = "datasets", description = "JSONL training data"),
        (name = "jobs", description = "LoRA fine-tuning jobs: one queue, one device, in order"),
        (name = "adapters", description = "The adapter registry (PEFT format)"),
        (name = "inference", description = "OpenAI-compatible completions; `model` is the base model or an adapter"),
        (name = "tenants", description = "Administration (admin token)"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let bearer = |what: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(what.to_string()))
                    .build(),
            )
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("api_key", bearer("A tenant's API key (`ts-…`)"));
        components.add_security_scheme("admin_token", bearer("The server's TUNESHOP_ADMIN_TOKEN"));
    }
}

fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(datasets::create, datasets::list))
        .routes(routes!(datasets::get, datasets::delete))
        .routes(routes!(generate::generate))
        .routes(routes!(jobs::create, jobs::list))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::events))
        .routes(routes!(jobs::checkpoints))
        .routes(routes!(adapters::import, adapters::list))
        .routes(routes!(adapters::get, adapters::delete))
        .routes(routes!(adapters::download))
        .routes(routes!(completions::completions))
        .routes(routes!(completions::chat_completions))
        .routes(routes!(models::list))
        .routes(routes!(tenants::create, tenants::list))
        .routes(routes!(tenants::delete))
        .routes(routes!(tenants::rotate_key))
}

/// The OpenAPI document (what `/openapi.json` serves and `openapi/openapi.json` holds).
pub fn openapi_spec() -> utoipa::openapi::OpenApi {
    let (_, mut spec) = documented().split_for_parts();
    spec.info.version = env!("CARGO_PKG_VERSION").to_string();
    spec
}

/// Ends a request that takes longer than the limit with a JSON 408 (a stream counts until its
/// headers are sent; generation itself is bounded by the batcher's deadline).
async fn time_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let secs = state.settings.request_timeout_secs.max(1);
    match tokio::time::timeout(Duration::from_secs(secs), next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(secs).into_response(),
    }
}

/// Records every request's latency by route template and status.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    state.metrics.observe_http(
        &method,
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

/// The full router: documented routes, `/openapi.json`, a JSON 404 for everything else, and
/// the layers.
pub fn router(state: AppState) -> Router {
    let (router, _) = documented().split_for_parts();
    let spec = openapi_spec();
    let request_id = HeaderName::from_static("x-request-id");
    // Uploads stream past axum's default body limit; they enforce their own.
    let body_limit = state.settings.max_upload_bytes as usize + 1024 * 1024;
    // Checked when the server starts (`Application::build`).
    let trusted =
        client_ip::TrustedProxies::parse(&state.settings.trusted_proxies).unwrap_or_default();
    router
        .route("/openapi.json", get(move || async move { Json(spec) }))
        .fallback(|req: Request| async move {
            ApiError::RouteNotFound {
                method: req.method().to_string(),
                path: req.uri().path().to_string(),
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            time_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(move |req, next| {
            client_ip::record(trusted.clone(), req, next)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        // Server errors are logged where they happen, with their cause; 503s while the model
        // loads are expected and stay out of the error log.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        uri = %req.uri(),
                        request_id = %id,
                        client_ip = tracing::field::Empty,
                    )
                })
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}
