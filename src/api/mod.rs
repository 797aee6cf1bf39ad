//! HTTP: thin handlers, one file per resource, routes registered through utoipa so none goes
//! undocumented. Handlers parse and check requests, talk to the database and the store, and
//! hand work to the queue; tensor work never happens here.

pub mod adapters;
pub mod auth;
pub mod client_ip;
pub mod completions;
pub mod datasets;
pub mod generate;
mod generation;
pub mod health;
pub mod job_view;
pub mod jobs;
pub mod json;
pub mod models;
pub mod openai;
mod openapi;
pub mod tenants;
mod upload;

pub use openapi::{openapi_spec, router};

use crate::db::Db;
use crate::infer::AdapterCache;
use crate::metrics::Metrics;
use crate::queue::device::DeviceHandle;
use crate::queue::JobQueue;
use crate::store::ArtifactStore;
use std::sync::Arc;
use tokio::sync::watch;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub device: DeviceHandle,
    pub queue: JobQueue,
    pub store: Arc<dyn ArtifactStore>,
    pub metrics: Arc<Metrics>,
    /// Adapters resident for serving.
    pub adapters: Arc<AdapterCache>,
    /// One permit per inference request in progress; none left is a 429.
    pub admission: Arc<tokio::sync::Semaphore>,
    pub settings: Arc<crate::config::Settings>,
    /// This process's name in job claims.
    pub worker_id: Arc<str>,
    /// Turns true when the server starts shutting down (live streams end).
    pub shutdown: watch::Receiver<bool>,
}

/// `{"object": "list", "data": [...]}` as OpenAI lists things.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct List<T> {
    #[schema(example = "list")]
    pub object: &'static str,
    pub data: Vec<T>,
    /// More items exist after the last one (pagination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub has_more: Option<bool>,
}

impl<T> List<T> {
    pub fn of(data: Vec<T>) -> Self {
        Self {
            object: "list",
            data,
            has_more: None,
        }
    }
}

/// `{"id", "object", "deleted": true}`
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// Parses a path id; anything that is not a UUID is as unknown as a missing one.
pub fn parse_id(what: &'static str, raw: &str) -> Result<uuid::Uuid, crate::error::ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| crate::error::ApiError::not_found(what, raw))
}

/// Unix seconds from the database's milliseconds (the API's time unit, as in OpenAI's).
pub fn secs(ms: i64) -> i64 {
    ms / 1000
}
