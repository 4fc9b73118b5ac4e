//! `em-dashboard` owns the probation dashboard: the JSON REST API (documented by the OpenAPI 3
//! document at `/api/openapi.json`), login with argon2-hashed passwords and server-side sessions,
//! role and caseload enforcement (officer: own caseload; supervisor: all; admin: users, devices,
//! assignments), the audit trail of every read and change of a subject's data, live alerts over
//! server-sent events read from the store's change log (so an alert raised on any instance
//! reaches every instance's feeds), the zone/curfew editor with per-field validation (each
//! save writes its change-log entry in the same transaction; every instance's geofence engine
//! reads it there), the curfew-compliance report (JSON and CSV), and the
//! embedded single-page web UI (plain HTML/CSS/JS with an SVG map; no external resources).

mod access;
mod api;
pub mod auth;
pub mod curfew;
pub mod error;
pub mod limits;
pub mod serve;
pub mod zone_input;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use em_alerts::AlertService;
use em_store::{ChangeFeed, Store};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use auth::{ensure_user, hash_password, verify_password, AuthError, CurrentUser};
pub use error::{ApiError, FieldErrors};

/// Dashboard settings (the `[dashboard]` section of the service configuration).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// Listen address. Default `127.0.0.1:8080`.
    pub bind: SocketAddr,
    /// PEM certificate chain; with `tls_key`, the dashboard is served over HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Idle timeout of a login session, seconds. Default 8 hours.
    pub session_ttl_secs: u64,
    /// Absolute lifetime of a login session, however active, seconds. Default 12 hours.
    pub session_max_secs: u64,
    /// Password checks (argon2, ~19 MiB each) running at once; a login beyond that gets 503
    /// with Retry-After. Default 4.
    pub password_check_slots: usize,
    /// Open connections from one source address (an office behind NAT counts as one);
    /// 0 = unlimited. Default 256.
    pub max_connections_per_ip: usize,
    /// Open connections in all; 0 = unlimited. Default 10,000.
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers. Default 10.
    pub header_timeout_secs: u64,
    /// Optional XYZ raster tile URL template (`https://tiles.example/{z}/{x}/{y}.png`) drawn
    /// under the vector map; None = vector map only (offline installations).
    pub tile_url: Option<String>,
    /// Delay added to every failed login, milliseconds. Default 750.
    pub login_failure_delay_ms: u64,
    /// Mark the session cookie `Secure` even without TLS here (TLS terminated by a proxy).
    pub secure_cookie: bool,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert: None,
            tls_key: None,
            session_ttl_secs: 8 * 3600,
            session_max_secs: 12 * 3600,
            password_check_slots: 4,
            max_connections_per_ip: 256,
            max_connections: 10_000,
            header_timeout_secs: 10,
            tile_url: None,
            login_failure_delay_ms: 750,
            secure_cookie: false,
        }
    }
}

/// Settings applied from [`DashboardConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub session_ttl: Duration,
    pub session_max: Duration,
    pub password_checks: auth::PasswordChecks,
    pub tile_url: Option<String>,
    pub login_failure_delay: Duration,
    pub secure_cookie: bool,
}

impl Settings {
    fn from_config(c: &DashboardConfig) -> Self {
        Settings {
            session_ttl: Duration::from_secs(c.session_ttl_secs.max(1)),
            session_max: Duration::from_secs(c.session_max_secs.max(1)),
            password_checks: auth::PasswordChecks::new(c.password_check_slots),
            tile_url: c.tile_url.clone().filter(|u| !u.trim().is_empty()),
            login_failure_delay: Duration::from_millis(c.login_failure_delay_ms),
            secure_cookie: c.secure_cookie || (c.tls_cert.is_some() && c.tls_key.is_some()),
        }
    }
}

pub(crate) struct Inner {
    pub store: Arc<dyn Store>,
    pub alerts: Arc<AlertService>,
    /// The process's reader of the change log (live feeds); started on first use unless the
    /// service hands its own over ([`AppState::with_feed`]).
    pub feed: tokio::sync::OnceCell<Arc<ChangeFeed>>,
    /// Stops a feed this state started itself.
    pub feed_stop: CancellationToken,
    pub sessions: auth::Sessions,
    /// Login attempts per user name.
    pub throttle: auth::Throttle,
    /// Login attempts per source address.
    pub address_throttle: auth::Throttle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.feed_stop.cancel();
    }
}

/// Shared state of the dashboard: the store, the alert service, the change-log feed,
/// sessions and settings. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
    pub(crate) settings: Arc<Settings>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("store", &self.inner.store.backend())
            .field("settings", &self.settings)
            .finish()
    }
}

impl AppState {
    /// State with the default [`DashboardConfig`] settings; [`serve`] applies its config.
    pub fn new(store: Arc<dyn Store>, alerts: Arc<AlertService>) -> Self {
        AppState {
            inner: Arc::new(Inner {
                sessions: auth::Sessions::new(store.clone()),
                store,
                alerts,
                feed: tokio::sync::OnceCell::new(),
                feed_stop: CancellationToken::new(),
                throttle: auth::Throttle::new(auth::Throttle::FREE_PER_USER),
                address_throttle: auth::Throttle::new(auth::Throttle::FREE_PER_ADDRESS),
            }),
            settings: Arc::new(Settings::from_config(&DashboardConfig::default())),
        }
    }

    /// Apply session TTL, tile URL, login delay and cookie settings from `config`.
    pub fn with_config(mut self, config: &DashboardConfig) -> Self {
        self.settings = Arc::new(Settings::from_config(config));
        self
    }

    /// Use the process's change-log feed for the live feeds (instead of starting one).
    pub fn with_feed(self, feed: Arc<ChangeFeed>) -> Self {
        // A fresh state: the cell is empty, so this cannot fail.
        let _ = self.inner.feed.set(feed);
        self
    }

    /// The change-log feed (started on first use).
    pub(crate) async fn feed(&self) -> Result<Arc<ChangeFeed>, em_store::StoreError> {
        self.inner
            .feed
            .get_or_try_init(|| {
                ChangeFeed::start(self.inner.store.clone(), self.inner.feed_stop.clone())
            })
            .await
            .cloned()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn alerts(&self) -> &Arc<AlertService> {
        &self.inner.alerts
    }

    pub(crate) fn session_ttl(&self) -> Duration {
        self.settings.session_ttl
    }

    pub(crate) fn session_max(&self) -> Duration {
        self.settings.session_max
    }
}

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
/// The OpenAPI 3 document of the API, served at `/api/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../assets/openapi.json");

/// Every API route as (path, method), in the axum path syntax (`{id}`), which is also the
/// OpenAPI syntax. The router is built from the same table.
pub fn api_routes() -> Vec<(&'static str, Method)> {
    api::route_table()
        .into_iter()
        .map(|(path, method, _)| (path, method))
        .collect()
}

/// The complete HTTP application: API, web page, security headers and CSRF protection.
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()`: logins are throttled
/// per source address too.
pub fn router(state: AppState) -> Router {
    let mut api_router: Router<AppState> = Router::new();
    for (path, _method, handler) in api::route_table() {
        api_router = api_router.route(path, handler);
    }
    let api_router = api_router
        .route(
            "/api/{*rest}",
            axum::routing::any(|| async { ApiError::NotFound("no such API route".into()) }),
        )
        .layer(middleware::from_fn(csrf_guard))
        .layer(middleware::from_fn(no_store));

    Router::new()
        .route("/", get(index))
        .route(
            "/assets/app.js",
            static_asset(APP_JS, "text/javascript; charset=utf-8"),
        )
        .route(
            "/assets/app.css",
            static_asset(APP_CSS, "text/css; charset=utf-8"),
        )
        .merge(api_router)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            security_headers,
        ))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(1024 * 1024))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

fn static_asset(body: &'static str, content_type: &'static str) -> MethodRouter<AppState> {
    get(move || async move {
        (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
    })
}

async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
}

/// Origin (`scheme://host[:port]`) of a tile URL template, for the CSP `img-src`.
fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "https" && scheme != "http" {
        return None;
    }
    let host = rest.split('/').next()?;
    if host.is_empty() || host.contains(['{', '}', ' ', '\'', ';']) {
        return None;
    }
    Some(format!("{scheme}://{host}"))
}

async fn security_headers(
    State(state): State<AppState>,
    req: Request<Body>,
    next: Next,
) -> Response {
    let mut res = next.run(req).await;
    let img_src = match state.settings.tile_url.as_deref().and_then(url_origin) {
        Some(origin) => format!("'self' data: {origin}"),
        None => "'self' data:".to_string(),
    };
    let csp = format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src {img_src}; \
         connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    );
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// Every error of the API has the JSON error body (`{"error": …}`): an error response under
/// `/api/` that is not JSON (a rejection of axum or tower-http, such as 405 or 413) gets the
/// body of its status; headers (`Allow`, `Retry-After`) are kept.
async fn json_errors(req: Request<Body>, next: Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let res = next.run(req).await;
    let status = res.status();
    if !api || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return res;
    }
    let (mut parts, _) = res.into_parts();
    let message = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase();
    let body = serde_json::json!({ "error": message }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

async fn no_store(req: Request<Body>, next: Next) -> Response {
    let mut res = next.run(req).await;
    res.headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}

/// CSRF protection for mutating API requests: besides the SameSite=Strict cookie, a request
/// must carry a JSON content type, an `X-Requested-With` header, or a bearer token — none of
/// which a cross-site form can send without a CORS preflight (which this server never grants).
async fn csrf_guard(req: Request<Body>, next: Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let h = req.headers();
        let json = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        let xrw = h.contains_key("x-requested-with");
        let bearer = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Bearer "));
        if !(json || xrw || bearer) {
            return (
                StatusCode::FORBIDDEN,
                axum::Json(serde_json::json!({
                    "error": "mutating requests need a JSON content type or an X-Requested-With header (CSRF protection)"
                })),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Binds `config.bind` and serves the dashboard until `shutdown` (see [`serve_on`]).
pub async fn serve(
    config: DashboardConfig,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = bind(&config)?;
    serve_on(listener, config, state, shutdown).await
}

/// Binds the dashboard's listen address (port 0: one the OS picks; read it back with
/// `local_addr`). Binding before serving lets a service fail its start cleanly on a taken port
/// and report the real address.
pub fn bind(config: &DashboardConfig) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(config.bind)
        .with_context(|| format!("binding the dashboard to {}", config.bind))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the dashboard on an already bound `listener` (HTTPS when `tls_cert` and `tls_key`
/// are set) until `shutdown`, letting requests in flight finish.
pub async fn serve_on(
    listener: std::net::TcpListener,
    config: DashboardConfig,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = state.with_config(&config);
    let router = router(state);
    let limits = serve::HttpLimits {
        max_connections_per_ip: config.max_connections_per_ip,
        max_connections: config.max_connections,
        header_timeout: Duration::from_secs(config.header_timeout_secs.max(1)),
    };
    let local = listener.local_addr()?;
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            // Use ring as the process-wide rustls provider unless the binary chose one already.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!(
                        "loading dashboard TLS certificate {} and key {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            let listener = tokio::net::TcpListener::from_std(listener)
                .with_context(|| format!("dashboard listener on {local}"))?;
            tracing::info!(bind = %local, "dashboard listening (HTTPS)");
            serve::serve_limited(
                listener,
                router,
                limits,
                Some(tls.get_inner()),
                |_| true,
                |peer, why| {
                    tracing::warn!(%peer, reason = why.as_str(), "dashboard connection refused")
                },
                shutdown,
                Duration::from_secs(10),
            )
            .await;
        }
        (None, None) => {
            let listener = tokio::net::TcpListener::from_std(listener)
                .with_context(|| format!("dashboard listener on {local}"))?;
            tracing::info!(bind = %local, "dashboard listening (HTTP)");
            serve::serve_limited(
                listener,
                router,
                limits,
                None,
                |_| true,
                |peer, why| {
                    tracing::warn!(%peer, reason = why.as_str(), "dashboard connection refused")
                },
                shutdown,
                Duration::from_secs(10),
            )
            .await;
        }
        _ => anyhow::bail!("dashboard: tls_cert and tls_key must be set together"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_parsing() {
        let c = DashboardConfig::default();
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        let c: DashboardConfig =
            serde_json::from_str(r#"{"bind":"0.0.0.0:9000","session_ttl_secs":60}"#)
                .expect("parse");
        assert_eq!(c.bind.port(), 9000);
        assert_eq!(c.session_ttl_secs, 60);
        assert!(serde_json::from_str::<DashboardConfig>(r#"{"nope":1}"#).is_err());
    }

    #[test]
    fn tile_origin() {
        assert_eq!(
            url_origin("https://tiles.example.org/{z}/{x}/{y}.png").as_deref(),
            Some("https://tiles.example.org")
        );
        assert_eq!(url_origin("javascript:alert(1)"), None);
        assert_eq!(url_origin("https://a b/x"), None);
    }
}
