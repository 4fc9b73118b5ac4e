//! The one error type of the HTTP API and how it is rendered as JSON.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use em_store::StoreError;
use serde_json::json;

/// Per-field validation messages, keyed by the field's path in the request
/// (`"radius_m"`, `"schedule.windows[0].start"`).
pub type FieldErrors = BTreeMap<String, String>;

/// Every way an API call can fail; each maps to one HTTP status and a JSON body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not logged in or session expired")]
    Unauthorized,
    #[error("wrong username or password")]
    BadCredentials,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("validation failed")]
    Validation(FieldErrors),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("too many failed logins; retry in {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// Every password check slot is busy (the check is memory-hard and bounded).
    #[error("the server is busy checking passwords; retry in {retry_after_secs} s")]
    Busy { retry_after_secs: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A validation error on one field.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        let mut errors = FieldErrors::new();
        errors.insert(field.to_string(), message.into());
        ApiError::Validation(errors)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized | ApiError::BadCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(what),
            StoreError::Conflict(what) => ApiError::Conflict(what),
            StoreError::Invalid(what) => ApiError::BadRequest(what),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<em_alerts::AlertError> for ApiError {
    fn from(e: em_alerts::AlertError) -> Self {
        use em_alerts::AlertError as E;
        match e {
            E::Store(inner) => ApiError::from(inner),
            E::NotFound(id) => ApiError::NotFound(format!("alert {id}")),
            E::UnknownSubject(id) => ApiError::NotFound(format!("subject {id}")),
            E::InvalidTransition { .. } => ApiError::Conflict(e.to_string()),
            E::UnknownResolutionCode { .. } => ApiError::field("code", e.to_string()),
            E::InactiveUser(_) => ApiError::Forbidden(e.to_string()),
            E::Invalid(msg) => ApiError::BadRequest(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Validation(errors) => json!({ "errors": errors }),
            ApiError::Internal(detail) => {
                // Details go to the log, not to the client.
                tracing::error!(error = %detail, "internal error in dashboard API");
                json!({ "error": "internal error" })
            }
            other => json!({ "error": other.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::TooManyRequests { retry_after_secs }
        | ApiError::Busy { retry_after_secs } = self
        {
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
