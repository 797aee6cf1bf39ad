//! The JSON body extractor: our error body for every rejection, and the field at fault named
//! by its path (`hyperparameters.lora_r`).

use crate::error::ApiError;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

/// Largest JSON request body (datasets and adapters are uploads, not JSON).
const MAX_JSON_BYTES: usize = 1024 * 1024;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType {
                got: content_type,
                expected: "`Content-Type: application/json`",
            });
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON_BYTES)
            .await
            .map_err(|_| ApiError::TooLarge {
                limit: MAX_JSON_BYTES as u64,
            })?;
        parse(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body: malformed JSON is a 400, a wrong field a 422 naming it.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::BadRequest {
                code: "invalid_json",
                message: format!("the body is not valid JSON: {inner}"),
                param: None,
            }
        } else {
            let param = if path == "." { String::new() } else { path };
            // serde names unknown and missing fields in the message itself.
            let message = inner.to_string();
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_string();
            // An unknown field is named by serde, inside the object at `path`.
            let named = field_in(&message).filter(|_| message.starts_with("unknown field"));
            let param = match (param.is_empty(), named) {
                (true, _) => field_in(&message).unwrap_or_default(),
                (false, Some(field)) if !param.ends_with(&field) => format!("{param}.{field}"),
                (false, _) => param,
            };
            ApiError::invalid(param, message)
        }
    })
}

/// The field serde names in "missing field `x`" / "unknown field `x`".
fn field_in(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        inner: Option<Inner>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse::<Body>(br#"{"name":"x","inner":{"n":"three"}}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { param, .. } if param == "inner.n"),
            "{e:?}"
        );
        let e = parse::<Body>(br#"{"inner":null}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { param, .. } if param == "name"),
            "{e:?}"
        );
        let e = parse::<Body>(br#"{"name":"x","bogus":1}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { param, .. } if param == "bogus"),
            "{e:?}"
        );
        let e = parse::<Body>(br#"{"name":"x","inner":{"n":1,"extra":2}}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { param, .. } if param == "inner.extra"),
            "{e:?}"
        );
        let e = parse::<Body>(b"{not json").unwrap_err();
        assert!(matches!(
            e,
            ApiError::BadRequest {
                code: "invalid_json",
                ..
            }
        ));
    }
}
