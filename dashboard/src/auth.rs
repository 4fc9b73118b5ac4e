//! Passwords (argon2), server-side sessions, failed-login throttling and the
//! [`CurrentUser`] extractor every protected handler takes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use em_model::{Role, User, UserId};
use em_store::Store;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::AppState;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "em_session";

/// Errors of password hashing and user seeding.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("invalid user: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] em_store::StoreError),
}

/// Hash a password with argon2id (default parameters, random salt) into a PHC string.
pub fn hash_password(pw: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Check a password against a PHC string. A malformed hash never matches.
pub fn verify_password(pw: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(pw.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Minimum password length accepted for new or changed passwords.
pub const MIN_PASSWORD_LEN: usize = 10;

/// Create the user if `username` does not exist yet, else update display name, role and
/// password and re-activate it. Returns the user's id. Used to seed demo and test users.
pub async fn ensure_user(
    store: &dyn Store,
    username: &str,
    display_name: &str,
    role: Role,
    password: &str,
) -> Result<UserId, AuthError> {
    let username = username.trim();
    if username.is_empty() {
        return Err(AuthError::Invalid("username must not be empty".into()));
    }
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(AuthError::Invalid(format!(
            "password must have at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    let existing = store.get_user_by_name(username).await?;
    let pw = password.to_string();
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&pw))
        .await
        .map_err(|e| AuthError::Hash(e.to_string()))??;
    let user = User {
        id: existing.as_ref().map(|u| u.id).unwrap_or(0),
        username: username.to_string(),
        display_name: display_name.to_string(),
        role,
        password_hash,
        active: true,
    };
    Ok(store.upsert_user(&user).await?)
}

/// A fresh 256-bit random token, hex encoded.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Sessions are keyed by the SHA-256 of the token, so the map never holds usable tokens.
fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Debug, Clone)]
struct Session {
    user_id: UserId,
    expires_at: Instant,
}

/// The server-side session map (idle timeout: each use extends the session by the TTL).
#[derive(Debug)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
}

impl Sessions {
    pub(crate) fn new() -> Self {
        Sessions {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts/removes).
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a session; returns the token to hand to the client.
    pub(crate) fn create(&self, user_id: UserId, ttl: Duration) -> String {
        let token = new_token();
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| s.expires_at > now);
        map.insert(
            token_key(&token),
            Session {
                user_id,
                expires_at: now + ttl,
            },
        );
        token
    }

    /// The user of a live session, extending it; expired sessions are removed.
    pub(crate) fn touch(&self, token: &str, ttl: Duration) -> Option<UserId> {
        let key = token_key(token);
        let now = Instant::now();
        let mut map = self.lock();
        match map.get_mut(&key) {
            Some(s) if s.expires_at > now => {
                s.expires_at = now + ttl;
                Some(s.user_id)
            }
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Whether a session is live, without extending it (used by long-lived SSE streams).
    pub(crate) fn is_live(&self, token: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .get(&token_key(token))
            .is_some_and(|s| s.expires_at > now)
    }

    pub(crate) fn remove(&self, token: &str) {
        self.lock().remove(&token_key(token));
    }

    /// End every session of a user (deactivation, password change).
    pub(crate) fn remove_user(&self, user_id: UserId) {
        self.lock().retain(|_, s| s.user_id != user_id);
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Failed-login throttle per username: after [`Throttle::FREE_ATTEMPTS`] failures, each further
/// attempt must wait an exponentially growing back-off (capped), or gets 429.
#[derive(Debug)]
pub(crate) struct Throttle {
    map: Mutex<HashMap<String, Failures>>,
}

impl Throttle {
    const FREE_ATTEMPTS: u32 = 3;
    const MAX_BACKOFF: Duration = Duration::from_secs(300);
    /// Failures older than this are forgotten.
    const WINDOW: Duration = Duration::from_secs(900);

    pub(crate) fn new() -> Self {
        Throttle {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failures>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backoff(count: u32) -> Duration {
        if count < Self::FREE_ATTEMPTS {
            return Duration::ZERO;
        }
        let exp = (count - Self::FREE_ATTEMPTS).min(16);
        Duration::from_secs(1u64 << exp).min(Self::MAX_BACKOFF)
    }

    /// `Err(seconds to wait)` when this username must wait before trying again.
    pub(crate) fn check(&self, username: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, f| now.duration_since(f.last) < Self::WINDOW);
        if let Some(f) = map.get(&username.to_lowercase()) {
            let allowed_at = f.last + Self::backoff(f.count);
            if allowed_at > now {
                return Err(allowed_at.duration_since(now).as_secs().max(1));
            }
        }
        Ok(())
    }

    pub(crate) fn failed(&self, username: &str) {
        let mut map = self.lock();
        let entry = map.entry(username.to_lowercase()).or_insert(Failures {
            count: 0,
            last: Instant::now(),
        });
        entry.count = entry.count.saturating_add(1);
        entry.last = Instant::now();
    }

    pub(crate) fn succeeded(&self, username: &str) {
        self.lock().remove(&username.to_lowercase());
    }
}

/// The authenticated caller of a request (from the session cookie or a bearer token).
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub user: User,
    /// The session token the request carried (to end it on logout, or watch it in SSE).
    pub(crate) token: String,
    /// True when authenticated by `Authorization: Bearer` rather than the cookie.
    pub via_bearer: bool,
}

impl CurrentUser {
    pub fn id(&self) -> UserId {
        self.user.id
    }
    pub fn role(&self) -> Role {
        self.user.role
    }
}

/// The session token of a request: bearer header first, then the session cookie.
pub(crate) fn request_token(parts: &Parts) -> Option<(String, bool)> {
    if let Some(v) = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            let t = t.trim();
            if !t.is_empty() {
                return Some((t.to_string(), true));
            }
        }
    }
    for v in parts.headers.get_all(COOKIE) {
        let Ok(s) = v.to_str() else { continue };
        for pair in s.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                if name == SESSION_COOKIE && !value.is_empty() {
                    return Some((value.to_string(), false));
                }
            }
        }
    }
    None
}

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (token, via_bearer) = request_token(parts).ok_or(ApiError::Unauthorized)?;
        let user_id = state
            .inner
            .sessions
            .touch(&token, state.session_ttl())
            .ok_or(ApiError::Unauthorized)?;
        // Re-read the user on every request so deactivation and role changes apply at once.
        let user = state.inner.store.get_user(user_id).await?;
        match user {
            Some(user) if user.active => Ok(CurrentUser {
                user,
                token,
                via_bearer,
            }),
            _ => {
                state.inner.sessions.remove(&token);
                Err(ApiError::Unauthorized)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::new();
        let t = s.create(7, Duration::from_secs(60));
        assert_eq!(t.len(), 64);
        assert_eq!(s.touch(&t, Duration::from_secs(60)), Some(7));
        assert_eq!(s.touch("other", Duration::from_secs(60)), None);
        s.remove(&t);
        assert_eq!(s.touch(&t, Duration::from_secs(60)), None);
        let t2 = s.create(8, Duration::ZERO);
        assert_eq!(s.touch(&t2, Duration::from_secs(60)), None);
        let t3 = s.create(9, Duration::from_secs(60));
        s.remove_user(9);
        assert!(!s.is_live(&t3));
    }

    #[test]
    fn throttle_backs_off_after_free_attempts() {
        let th = Throttle::new();
        for _ in 0..Throttle::FREE_ATTEMPTS {
            assert!(th.check("Alice").is_ok());
            th.failed("alice");
        }
        assert!(th.check("ALICE").is_err());
        assert!(th.check("bob").is_ok());
        th.succeeded("alice");
        assert!(th.check("alice").is_ok());
        assert_eq!(Throttle::backoff(100), Throttle::MAX_BACKOFF);
    }
}
