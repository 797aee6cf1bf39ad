//! `/tenants`: administration with the admin token. Creating a tenant or a key returns the
//! key once; only its hash is kept.

use super::auth::Admin;
use super::json::ApiJson;
use super::{parse_id, secs, AppState, Deleted, List};
use crate::db::{adapters, datasets, tenants};
use crate::error::{ApiError, ErrorBody};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    #[schema(example = "acme")]
    pub name: String,
}

#[derive(Serialize, ToSchema)]
pub struct TenantView {
    pub id: String,
    #[schema(example = "tenant")]
    pub object: &'static str,
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
}

impl From<tenants::Tenant> for TenantView {
    fn from(t: tenants::Tenant) -> Self {
        Self {
            id: t.id.to_string(),
            object: "tenant",
            name: t.name,
            created_at: secs(t.created_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct NewTenantView {
    #[serde(flatten)]
    pub tenant: TenantView,
    /// The tenant's API key. Shown this once: store it now.
    #[schema(example = "ts-3f9a…")]
    pub api_key: String,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RotateKey {
    /// Keep the tenant's existing keys working (default: revoke them).
    pub keep_existing: bool,
}

#[derive(Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    #[schema(example = "api_key")]
    pub object: &'static str,
    pub tenant_id: String,
    /// Shown this once.
    pub api_key: String,
    /// Whether the tenant's older keys were revoked.
    pub revoked_existing: bool,
}

/// Create a tenant and its first API key.
#[utoipa::path(post, path = "/tenants", tag = "tenants", request_body = CreateTenant,
    security(("admin_token" = [])),
    responses(
        (status = 201, description = "Created; `api_key` is shown only here", body = NewTenantView),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "Administration is off (no TUNESHOP_ADMIN_TOKEN)", body = ErrorBody),
        (status = 422, description = "Bad name", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(req): ApiJson<CreateTenant>,
) -> Result<(StatusCode, Json<NewTenantView>), ApiError> {
    let name = req.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::invalid(
            "name",
            "`name` must be 1 to 100 characters",
        ));
    }
    let (tenant, key) = tenants::create(&state.db, name).await?;
    tracing::info!(tenant_id = %tenant.id, "tenant created");
    Ok((
        StatusCode::CREATED,
        Json(NewTenantView {
            tenant: tenant.into(),
            api_key: key.key,
        }),
    ))
}

/// List tenants.
#[utoipa::path(get, path = "/tenants", tag = "tenants", security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every tenant", body = List<TenantView>),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "Administration is off", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<List<TenantView>>, ApiError> {
    let all = tenants::list(&state.db).await?;
    Ok(Json(List::of(all.into_iter().map(Into::into).collect())))
}

/// Delete a tenant with its keys, datasets, jobs and adapters (a job it is running stops at
/// its next step).
#[utoipa::path(delete, path = "/tenants/{id}", tag = "tenants", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "Administration is off", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let uuid = parse_id("tenant", &id)?;
    let mut keys = datasets::list_all_keys(&state.db, uuid).await?;
    keys.extend(adapters::store_keys_of_tenant(&state.db, uuid).await?);
    if !tenants::delete(&state.db, uuid).await? {
        return Err(ApiError::not_found("tenant", &id));
    }
    for key in keys {
        if let Err(e) = state.store.delete_prefix(&key).await {
            tracing::warn!(tenant_id = %uuid, error = %e, "removing a tenant's file failed");
        }
    }
    tracing::info!(tenant_id = %uuid, "tenant deleted");
    Ok(Json(Deleted {
        id,
        object: "tenant",
        deleted: true,
    }))
}

/// Issue a new API key (by default the older keys stop working at once).
#[utoipa::path(post, path = "/tenants/{id}/keys", tag = "tenants", request_body = RotateKey,
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 201, description = "The new key, shown only here", body = KeyView),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "Administration is off", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
pub async fn rotate_key(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<KeyView>), ApiError> {
    let uuid = parse_id("tenant", &id)?;
    tenants::get(&state.db, uuid)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant", &id))?;
    // The body is optional: none means the defaults.
    let req: RotateKey = if body.iter().all(u8::is_ascii_whitespace) {
        RotateKey::default()
    } else {
        super::json::parse(&body)?
    };
    let key = tenants::rotate_key(&state.db, uuid, !req.keep_existing).await?;
    Ok((
        StatusCode::CREATED,
        Json(KeyView {
            id: key.id.to_string(),
            object: "api_key",
            tenant_id: id,
            api_key: key.key,
            revoked_existing: !req.keep_existing,
        }),
    ))
}
