//! Who is calling: a tenant by API key (`Authorization: Bearer ts-…`), or the administrator by
//! the admin token.

use super::AppState;
use crate::db::tenants::{self, Tenant};
use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

/// The calling tenant; every dataset, job and adapter handler takes one.
pub struct Caller(pub Tenant);

/// The administrator (tenant management).
pub struct Admin;

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(ApiError::MissingKey)?
        .to_str()
        .map_err(|_| ApiError::InvalidKey)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(ApiError::MissingKey)?
        .trim();
    if token.is_empty() {
        return Err(ApiError::MissingKey);
    }
    Ok(token)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = bearer(parts)?;
        match tenants::by_key(&state.db, key).await? {
            Some(t) => Ok(Caller(t)),
            None => Err(ApiError::InvalidKey),
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = state
            .settings
            .admin_token
            .as_deref()
            .filter(|t| !t.is_empty())
        else {
            return Err(ApiError::AdminDisabled);
        };
        let given = bearer(parts).map_err(|_| ApiError::InvalidAdminToken)?;
        // Equal-length digests compared in full: the time taken says nothing about the token.
        let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
        let same = a
            .iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0;
        if same {
            Ok(Admin)
        } else {
            Err(ApiError::InvalidAdminToken)
        }
    }
}
