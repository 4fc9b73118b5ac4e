//! Login, logout, the current user, health and the OpenAPI document.

use std::sync::OnceLock;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::JsonBody;
use crate::auth::{hash_password, CurrentUser, MIN_PASSWORD_LEN, SESSION_COOKIE};
use crate::error::{ApiError, ApiResult};
use crate::{AppState, OPENAPI_JSON};

pub(crate) async fn health(State(st): State<AppState>) -> Response {
    match st.inner.store.get_user(0).await {
        Ok(_) => Json(json!({
            "status": "ok",
            "store": st.inner.store.backend(),
            "change_log": st.inner.feed.get().map(|f| f.position()),
        }))
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard health check: store unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(
                    json!({ "status": "degraded", "store": st.inner.store.backend(),
                             "error": "store unreachable" }),
                ),
            )
                .into_response()
        }
    }
}

pub(crate) async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginRequest {
    username: String,
    password: String,
    /// Also return the session token in the body, for API clients using `Authorization: Bearer`.
    #[serde(default)]
    bearer: bool,
}

/// A hash to verify against when the user does not exist, so both cases cost the same time.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password("no such user: constant-time filler").unwrap_or_default())
}

fn cookie(st: &AppState, value: &str, clear: bool) -> Option<HeaderValue> {
    let mut c = format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict");
    if clear {
        c.push_str("; Max-Age=0");
    }
    if st.settings.secure_cookie {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).ok()
}

pub(crate) async fn login(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    JsonBody(req): JsonBody<LoginRequest>,
) -> ApiResult<Response> {
    let username = req.username.trim().to_string();
    if username.is_empty() || username.len() > 128 || req.password.len() > 1024 {
        tokio::time::sleep(st.settings.login_failure_delay).await;
        return Err(ApiError::BadCredentials);
    }
    // Counted now, before the (costly) check: parallel guesses wait like serial ones.
    let address = format!("ip:{}", peer.ip().to_canonical());
    let user_key = format!("user:{username}");
    let throttled = st
        .inner
        .address_throttle
        .attempt(&address)
        .map_err(|r| (r, "address"))
        .and_then(|()| {
            st.inner.throttle.attempt(&user_key).map_err(|r| {
                // Not checked after all: the address gets its attempt back.
                st.inner.address_throttle.refund(&address);
                (r, "user")
            })
        });
    if let Err((refused, by)) = throttled {
        if refused.first {
            // One audit row per back-off period, however many attempts it refuses.
            st.audit_as(
                None,
                &username,
                "auth.login_throttled",
                "user",
                None,
                None,
                json!({ "retry_after_secs": refused.retry_after_secs, "by": by,
                        "source": peer.ip().to_canonical().to_string() }),
            )
            .await?;
        }
        return Err(ApiError::TooManyRequests {
            retry_after_secs: refused.retry_after_secs,
        });
    }
    let user = st.inner.store.get_user_by_name(&username).await?;
    let (hash, usable) = match &user {
        Some(u) if u.active => (u.password_hash.clone(), true),
        _ => (dummy_hash().to_string(), false),
    };
    let verified = st
        .settings
        .password_checks
        .verify(req.password, hash)
        .await?;
    let user = match user {
        Some(u) if usable && verified => u,
        other => {
            st.audit_as(
                other.as_ref().map(|u| u.id),
                &username,
                "auth.login_failed",
                "user",
                other.as_ref().map(|u| u.id.to_string()),
                None,
                json!({ "reason": if other.is_none() { "unknown user" }
                        else if !usable { "user deactivated" } else { "wrong password" },
                        "source": peer.ip().to_canonical().to_string() }),
            )
            .await?;
            tokio::time::sleep(st.settings.login_failure_delay).await;
            return Err(ApiError::BadCredentials);
        }
    };
    st.inner.throttle.succeeded(&user_key);
    st.inner.address_throttle.refund(&address);
    let ttl = st.session_ttl();
    let token = st
        .inner
        .sessions
        .create(user.id, ttl, st.session_max())
        .await?;
    st.audit_as(
        Some(user.id),
        &user.username,
        "auth.login",
        "user",
        Some(user.id.to_string()),
        None,
        json!({ "bearer": req.bearer }),
    )
    .await?;
    let mut body = json!({ "user": user, "session_ttl_secs": ttl.as_secs() });
    if req.bearer {
        body["token"] = json!(token);
    }
    let mut res = Json(body).into_response();
    if let Some(c) = cookie(&st, &token, false) {
        res.headers_mut().insert(header::SET_COOKIE, c);
    }
    Ok(res)
}

pub(crate) async fn logout(State(st): State<AppState>, me: CurrentUser) -> ApiResult<Response> {
    st.inner.sessions.remove(&me.token).await?;
    st.audit(
        &me,
        "auth.logout",
        "user",
        Some(me.id().to_string()),
        None,
        json!({}),
    )
    .await?;
    let mut res = Json(json!({ "ok": true })).into_response();
    if let Some(c) = cookie(&st, "", true) {
        res.headers_mut().insert(header::SET_COOKIE, c);
    }
    Ok(res)
}

pub(crate) async fn me(State(st): State<AppState>, me: CurrentUser) -> Json<serde_json::Value> {
    Json(json!({
        "user": me.user,
        "resolution_codes": st.inner.alerts.config().resolution_codes,
        "tile_url": st.settings.tile_url,
        "session_ttl_secs": st.session_ttl().as_secs(),
    }))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PasswordChange {
    current_password: String,
    new_password: String,
}

/// `POST /api/me/password`: the caller changes their own password. The current password is
/// required (checked like a login: counted first, bounded); every other session of the user
/// ends, the one making the change stays.
pub(crate) async fn change_password(
    State(st): State<AppState>,
    me: CurrentUser,
    JsonBody(req): JsonBody<PasswordChange>,
) -> ApiResult<Json<serde_json::Value>> {
    if req.new_password.chars().count() < MIN_PASSWORD_LEN || req.new_password.len() > 1024 {
        return Err(ApiError::field(
            "new_password",
            format!("must be {MIN_PASSWORD_LEN} to 1024 characters"),
        ));
    }
    let user_key = format!("user:{}", me.user.username);
    if let Err(refused) = st.inner.throttle.attempt(&user_key) {
        return Err(ApiError::TooManyRequests {
            retry_after_secs: refused.retry_after_secs,
        });
    }
    let ok = st
        .settings
        .password_checks
        .verify(req.current_password, me.user.password_hash.clone())
        .await?;
    if !ok {
        st.audit(
            &me,
            "auth.password_change_failed",
            "user",
            Some(me.id().to_string()),
            None,
            json!({ "reason": "wrong current password" }),
        )
        .await?;
        return Err(ApiError::field(
            "current_password",
            "is not your current password",
        ));
    }
    st.inner.throttle.succeeded(&user_key);
    let mut user = me.user.clone();
    user.password_hash = st.settings.password_checks.hash(req.new_password).await?;
    st.inner.store.upsert_user(&user).await?;
    st.inner
        .sessions
        .remove_user_except(user.id, &me.token)
        .await?;
    st.audit(
        &me,
        "auth.password_change",
        "user",
        Some(user.id.to_string()),
        None,
        json!({ "other_sessions_ended": true }),
    )
    .await?;
    Ok(Json(json!({ "changed": true })))
}
