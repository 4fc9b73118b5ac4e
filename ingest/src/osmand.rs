//! OsmAnd over HTTP: `GET` or `POST /?id=<device>&lat=..&lon=..&timestamp=..&token=<secret>`
//! (the parameters may also come as a form body). The device must be registered and active,
//! registered AS an OsmAnd device, and present its secret: as the `token` parameter (query
//! string or form body) or as an `Authorization: Bearer <secret>` header (the header wins
//! when both are given). The response is sent only after the report is durably stored: `200`
//! stored, `400` malformed, `403` refused (unknown/inactive device, another protocol's device,
//! missing or wrong token — the reason is logged and counted, never sent), `503` storage
//! failure (the client retries). With `[listeners.osmand] allow`, connections from other
//! networks are closed before the request is read.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use chrono::Utc;
use em_model::Protocol;
use em_protocols::osmand;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AllowList;
use crate::metrics as m;
use crate::pipeline::Pipeline;
use crate::registry::{Credential, Registry};

const P: Protocol = Protocol::Osmand;

#[derive(Clone)]
struct OsmandState {
    pipeline: Pipeline,
    registry: Registry,
}

/// The OsmAnd router (exposed for tests).
pub fn router(pipeline: Pipeline, registry: Registry) -> Router {
    Router::new()
        .route("/", any(report))
        .layer(axum::extract::DefaultBodyLimit::max(osmand::MAX_BODY_LEN))
        .with_state(OsmandState { pipeline, registry })
}

/// Serves the OsmAnd endpoint on `listener` until `shutdown`; connections from sources not
/// in `allow` (when set) are closed unread.
pub async fn serve(
    listener: TcpListener,
    allow: AllowList,
    limits: em_dashboard::serve::HttpLimits,
    pipeline: Pipeline,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(protocol = %P, addr = ?listener.local_addr().ok(), "device listener started");
    em_dashboard::serve::serve_limited(
        listener,
        router(pipeline, registry),
        limits,
        None,
        move |ip| allow.permits(ip),
        |peer, why| {
            m::device_rejected(P, why.as_str());
            tracing::warn!(protocol = %P, %peer, reason = why.as_str(), "connection refused");
        },
        shutdown,
        std::time::Duration::from_secs(5),
    )
    .await;
    Ok(())
}

async fn report(
    State(st): State<OsmandState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    body: Bytes,
) -> (StatusCode, &'static str) {
    if method != Method::GET && method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n");
    }
    m::frame(P);
    // Parameters in the query string, or a form-encoded body.
    let (input, token) = match uri.query().filter(|q| !q.is_empty()) {
        Some(q) => (q.to_owned(), params.get("token").cloned()),
        None => {
            let Ok(text) = std::str::from_utf8(&body) else {
                m::decode_error(P, "malformed");
                return (StatusCode::BAD_REQUEST, "body is not UTF-8\n");
            };
            let token = form_token(text);
            (text.to_owned(), token)
        }
    };
    let token = bearer_token(&headers).or(token);
    // A query / form body is one report; a Traccar Client JSON body may hold several.
    let reports = match osmand::decode_all(&input) {
        Ok(r) => r,
        Err(e) => {
            m::decode_error(P, e.reason());
            tracing::warn!(protocol = %P, reason = e.reason(), error = %e, "malformed report");
            return (StatusCode::BAD_REQUEST, "malformed report\n");
        }
    };
    let Some(device) = reports.first().map(|r| r.device_id().to_owned()) else {
        return (StatusCode::BAD_REQUEST, "malformed report\n");
    };
    // One request, one device: the credential admits that device only.
    if reports.iter().any(|r| r.device_id() != device) {
        m::decode_error(P, "mixed_devices");
        return (
            StatusCode::BAD_REQUEST,
            "one request may carry reports of one device only\n",
        );
    }
    let credential = Credential::from(token.as_deref().filter(|t| !t.is_empty()));
    match st.registry.admit(&device, P, credential).await {
        Ok(Ok(_)) => {}
        Ok(Err(refusal)) => {
            m::device_rejected(P, refusal.as_str());
            tracing::warn!(protocol = %P, device, reason = %refusal, "device refused");
            return (StatusCode::FORBIDDEN, "device not accepted\n");
        }
        Err(e) => {
            tracing::error!(protocol = %P, device, error = %e, "registry look-up failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
        }
    }
    let now = Utc::now();
    let records = reports.iter().flat_map(|r| r.to_records(now)).collect();
    match st.pipeline.store_all(records).await {
        Ok(()) => (StatusCode::OK, "OK\n"),
        Err(e) => {
            tracing::warn!(protocol = %P, device, error = %e, "report not stored");
            (StatusCode::SERVICE_UNAVAILABLE, "not stored, try again\n")
        }
    }
}

/// The secret of an `Authorization: Bearer <secret>` header (scheme case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

fn form_token(body: &str) -> Option<String> {
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    })
}

/// Minimal `application/x-www-form-urlencoded` value decoding (`+` and `%XX`).
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes.get(i) {
            Some(b'+') => out.push(b' '),
            Some(b'%') => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            Some(b) => out.push(*b),
            None => break,
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_from_bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc123".parse().unwrap());
        assert_eq!(bearer_token(&h).as_deref(), Some("abc123"));
        h.insert(header::AUTHORIZATION, "bearer  xyz ".parse().unwrap());
        assert_eq!(bearer_token(&h).as_deref(), Some("xyz"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn token_from_form_body() {
        assert_eq!(
            form_token("id=1&lat=1&lon=2&token=a%2Bb+c").as_deref(),
            Some("a+b c")
        );
        assert_eq!(form_token("id=1&lat=1"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
