//! HTTP handlers of the JSON API and the route table the router and the OpenAPI test share.

mod admin;
mod alerts;
mod reports;
mod session;
mod subjects;
mod victims;

use std::collections::HashMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::Method;
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Json;
use chrono::{DateTime, NaiveDate, Utc};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Every API route: (path, method, handler). Paths use `{param}`, as OpenAPI does.
pub(crate) fn route_table() -> Vec<(&'static str, Method, MethodRouter<AppState>)> {
    use Method as M;
    vec![
        ("/api/health", M::GET, get(session::health)),
        ("/api/openapi.json", M::GET, get(session::openapi)),
        ("/api/login", M::POST, post(session::login)),
        ("/api/logout", M::POST, post(session::logout)),
        ("/api/me", M::GET, get(session::me)),
        ("/api/me/password", M::POST, post(session::change_password)),
        ("/api/subjects", M::GET, get(subjects::list)),
        ("/api/subjects", M::POST, post(subjects::create)),
        ("/api/subjects/{id}", M::GET, get(subjects::detail)),
        ("/api/subjects/{id}", M::PUT, put(subjects::update)),
        ("/api/subjects/{id}/trail", M::GET, get(subjects::trail)),
        ("/api/subjects/{id}/zones", M::GET, get(subjects::zones)),
        (
            "/api/subjects/{id}/zones",
            M::POST,
            post(subjects::create_zone),
        ),
        ("/api/zones/{id}", M::GET, get(subjects::get_zone)),
        ("/api/zones/{id}", M::PUT, put(subjects::update_zone)),
        ("/api/zones/{id}", M::DELETE, delete(subjects::delete_zone)),
        ("/api/map", M::GET, get(subjects::map)),
        ("/api/alerts", M::GET, get(alerts::list)),
        ("/api/alerts/stream", M::GET, get(alerts::stream)),
        ("/api/alerts/{id}/ack", M::POST, post(alerts::acknowledge)),
        ("/api/alerts/{id}/resolve", M::POST, post(alerts::resolve)),
        ("/api/reports/curfew", M::GET, get(reports::curfew)),
        ("/api/audit", M::GET, get(reports::audit)),
        ("/api/users", M::GET, get(admin::list_users)),
        ("/api/users", M::POST, post(admin::create_user)),
        ("/api/users/{id}", M::PUT, put(admin::update_user)),
        ("/api/devices", M::GET, get(admin::list_devices)),
        ("/api/devices", M::POST, post(admin::upsert_device)),
        (
            "/api/devices/{id}/assign",
            M::POST,
            post(admin::assign_device),
        ),
        (
            "/api/devices/{id}/unassign",
            M::POST,
            post(admin::unassign_device),
        ),
        ("/api/devices/{id}/class", M::PUT, put(victims::set_class)),
        (
            "/api/victim-devices/{id}/positions",
            M::GET,
            get(victims::positions),
        ),
    ]
}

/// A JSON request body whose rejection is rendered as an [`ApiError`] (JSON), not plain text.
pub(crate) struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
        }
    }
}

/// A path parameter whose rejection (`/api/subjects/abc`) is rendered as an [`ApiError`]
/// (400, JSON), not plain text.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub(crate) struct Path<T>(pub T);

/// Query parameters whose rejection is rendered as an [`ApiError`] (400, JSON).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub(crate) struct Query<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(format!("path: {}", rejection.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::BadRequest(format!("query: {}", rejection.body_text()))
    }
}

/// Raw query parameters (parsed per field so that errors name the field).
pub(crate) type Params = HashMap<String, String>;

/// Parse an RFC 3339 instant or a `YYYY-MM-DD` date (midnight UTC) from query `field`.
pub(crate) fn time_param(q: &Params, field: &str) -> ApiResult<Option<DateTime<Utc>>> {
    let Some(raw) = q.get(field).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    if let Some(t) = NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
    {
        return Ok(Some(t.and_utc()));
    }
    Err(ApiError::field(
        field,
        "must be a date-time (2024-05-01T18:00:00Z) or a date (2024-05-01)",
    ))
}

/// Parse an integer query parameter.
pub(crate) fn int_param(q: &Params, field: &str) -> ApiResult<Option<i64>> {
    match q.get(field).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(raw) => raw
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::field(field, "must be an integer")),
    }
}

/// Parse a `from`/`to` period with a default length and a maximum length.
pub(crate) fn period(
    q: &Params,
    default: chrono::Duration,
    max: chrono::Duration,
) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
    let to = time_param(q, "to")?.unwrap_or_else(Utc::now);
    let from = time_param(q, "from")?.unwrap_or(to - default);
    if to <= from {
        return Err(ApiError::field("to", "must be after from"));
    }
    if to - from > max {
        return Err(ApiError::field(
            "to",
            format!("the period may be at most {} days", max.num_days()),
        ));
    }
    Ok((from, to))
}
