//! HTTP: thin handlers, one file per resource, routes registered through utoipa so none goes
//! undocumented.

pub mod health;
mod openapi;

pub use openapi::{openapi_spec, router};

use crate::db::Db;
use crate::queue::device::DeviceHandle;
use std::sync::Arc;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub device: DeviceHandle,
    pub settings: Arc<crate::config::Settings>,
}
