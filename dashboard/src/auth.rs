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

/// Dashboard sessions, kept in the store so that every instance knows them: a login on one
/// instance is valid on all, and a logout, password change or deactivation ends sessions
/// everywhere. Keyed by the SHA-256 of the token, so the store never holds a usable token.
/// Each use moves the idle expiry forward by the TTL, never past the absolute end.
pub(crate) struct Sessions {
    store: std::sync::Arc<dyn Store>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

fn hash_hex(token: &str) -> String {
    hex::encode(token_key(token))
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Sessions {
    pub(crate) fn new(store: std::sync::Arc<dyn Store>) -> Self {
        Sessions { store }
    }

    /// Start a session; returns the token to hand to the client.
    pub(crate) async fn create(
        &self,
        user_id: UserId,
        ttl: Duration,
        max_life: Duration,
    ) -> Result<String, ApiError> {
        let token = new_token();
        let now = chrono::Utc::now();
        // Expired sessions go now and then (about one login in fifty).
        if OsRng.next_u32().is_multiple_of(50) {
            let _ = self.store.purge_sessions(now).await;
        }
        self.store
            .create_session(&em_store::NewSession {
                token_hash: hash_hex(&token),
                user_id,
                created_at: now,
                expires_at: now + chrono_of(ttl),
                ends_at: now + chrono_of(max_life),
            })
            .await?;
        Ok(token)
    }

    /// The user of a live session, extending it.
    pub(crate) async fn touch(
        &self,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<UserId>, ApiError> {
        let now = chrono::Utc::now();
        Ok(self
            .store
            .touch_session(&hash_hex(token), now, now + chrono_of(ttl))
            .await?)
    }

    /// Whether a session is live, without extending it (used by long-lived SSE streams).
    pub(crate) async fn is_live(&self, token: &str) -> bool {
        self.store
            .session_live(&hash_hex(token), chrono::Utc::now())
            .await
            .unwrap_or(false)
    }

    pub(crate) async fn remove(&self, token: &str) -> Result<(), ApiError> {
        Ok(self.store.delete_session(&hash_hex(token)).await?)
    }

    /// End every session of a user (deactivation, password change by an admin).
    pub(crate) async fn remove_user(&self, user_id: UserId) -> Result<(), ApiError> {
        self.store.delete_user_sessions(user_id, None).await?;
        Ok(())
    }

    /// End every session of a user but the one carrying `keep` (their own password change).
    pub(crate) async fn remove_user_except(
        &self,
        user_id: UserId,
        keep: &str,
    ) -> Result<(), ApiError> {
        self.store
            .delete_user_sessions(user_id, Some(&hash_hex(keep)))
            .await?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    /// Attempts counted (before their password was checked) since the last success.
    count: u32,
    last: Instant,
    /// A refusal was already reported (audited) for the current back-off.
    refusal_reported: bool,
}

/// Why an attempt may not go ahead now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub retry_after_secs: u64,
    /// The first refusal of this back-off period (audit it; later ones are counted only).
    pub first: bool,
}

/// Login throttle, per key (a user name, a source address). Each attempt is counted when it
/// starts, before the password is checked, so parallel guesses are throttled like serial
/// ones: after `free` attempts each further one must wait an exponentially growing back-off
/// (capped) from the last, or is refused. A success clears the key.
#[derive(Debug)]
pub(crate) struct Throttle {
    map: Mutex<HashMap<String, Failures>>,
    free: u32,
}

impl Throttle {
    /// Attempts per user name before the back-off starts.
    pub(crate) const FREE_PER_USER: u32 = 3;
    /// Attempts per source address (offices share one) before the back-off starts.
    pub(crate) const FREE_PER_ADDRESS: u32 = 20;
    const MAX_BACKOFF: Duration = Duration::from_secs(300);
    /// Failures older than this are forgotten.
    const WINDOW: Duration = Duration::from_secs(900);

    pub(crate) fn new(free: u32) -> Self {
        Throttle {
            map: Mutex::new(HashMap::new()),
            free,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failures>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backoff(&self, count: u32) -> Duration {
        if count < self.free {
            return Duration::ZERO;
        }
        let exp = (count - self.free).min(16);
        Duration::from_secs(1u64 << exp).min(Self::MAX_BACKOFF)
    }

    /// Counts an attempt for `key` now, or refuses it (the key must wait).
    pub(crate) fn attempt(&self, key: &str) -> Result<(), Refused> {
        let now = Instant::now();
        let key = key.to_lowercase();
        let mut map = self.lock();
        map.retain(|_, f| now.duration_since(f.last) < Self::WINDOW);
        let f = map.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            refusal_reported: false,
        });
        let allowed_at = f.last + self.backoff(f.count);
        if f.count > 0 && allowed_at > now {
            let first = !f.refusal_reported;
            f.refusal_reported = true;
            return Err(Refused {
                retry_after_secs: allowed_at.duration_since(now).as_secs().max(1),
                first,
            });
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        f.refusal_reported = false;
        Ok(())
    }

    /// A successful login: the key starts afresh.
    pub(crate) fn succeeded(&self, key: &str) {
        self.lock().remove(&key.to_lowercase());
    }

    /// A counted attempt turned out legitimate: it no longer counts (per-address keys, where
    /// one success must not wipe the failures of others behind the same address).
    pub(crate) fn refund(&self, key: &str) {
        if let Some(f) = self.lock().get_mut(&key.to_lowercase()) {
            f.count = f.count.saturating_sub(1);
        }
    }
}

/// Password checks (argon2, ~19 MiB each) run on a bounded number of blocking threads at
/// once; beyond that a login is refused with 503 and Retry-After instead of queueing memory.
#[derive(Debug, Clone)]
pub(crate) struct PasswordChecks {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
}

impl PasswordChecks {
    pub(crate) fn new(slots: usize) -> Self {
        PasswordChecks {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(slots.max(1))),
        }
    }

    /// A free slot, or 503 at once when every slot is busy.
    fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Busy {
                retry_after_secs: 1,
            })
    }

    /// Verifies `password` against the PHC string `hash` on a blocking thread, or refuses at
    /// once when every slot is busy.
    pub(crate) async fn verify(&self, password: String, hash: String) -> Result<bool, ApiError> {
        let permit = self.slot()?;
        tokio::task::spawn_blocking(move || {
            let ok = verify_password(&password, &hash);
            drop(permit);
            ok
        })
        .await
        .map_err(|e| ApiError::Internal(format!("password check task: {e}")))
    }

    /// Hashes a new password under the same bound.
    pub(crate) async fn hash(&self, password: String) -> Result<String, ApiError> {
        let permit = self.slot()?;
        tokio::task::spawn_blocking(move || {
            let h = hash_password(&password);
            drop(permit);
            h
        })
        .await
        .map_err(|e| ApiError::Internal(format!("password hashing task: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))
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
            .await?
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
                state.inner.sessions.remove(&token).await?;
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

    #[tokio::test]
    async fn sessions_expire_and_end() {
        let hour = Duration::from_secs(3600);
        let s = Sessions::new(em_store::testing::sqlite_store().await);
        let t = s
            .create(7, Duration::from_secs(60), hour)
            .await
            .expect("create");
        assert_eq!(t.len(), 64);
        assert_eq!(
            s.touch(&t, Duration::from_secs(60)).await.expect("touch"),
            Some(7)
        );
        assert_eq!(
            s.touch("other", Duration::from_secs(60))
                .await
                .expect("touch"),
            None
        );
        s.remove(&t).await.expect("remove");
        assert_eq!(
            s.touch(&t, Duration::from_secs(60)).await.expect("touch"),
            None
        );
        let t2 = s.create(8, Duration::ZERO, hour).await.expect("create");
        assert_eq!(
            s.touch(&t2, Duration::from_secs(60)).await.expect("touch"),
            None
        );
        let t3 = s
            .create(9, Duration::from_secs(60), hour)
            .await
            .expect("create");
        s.remove_user(9).await.expect("remove user");
        assert!(!s.is_live(&t3).await);
        // However busy, a session ends at its absolute lifetime.
        let t4 = s
            .create(10, Duration::from_secs(60), Duration::ZERO)
            .await
            .expect("create");
        assert_eq!(
            s.touch(&t4, Duration::from_secs(60)).await.expect("touch"),
            None
        );
        // A password change ends the user's other sessions, not the one making it.
        let a = s.create(11, hour, hour).await.expect("create");
        let b = s.create(11, hour, hour).await.expect("create");
        let other = s.create(12, hour, hour).await.expect("create");
        s.remove_user_except(11, &a).await.expect("remove others");
        assert!(s.is_live(&a).await);
        assert!(!s.is_live(&b).await);
        assert!(s.is_live(&other).await);
    }

    #[test]
    fn throttle_counts_attempts_before_they_are_checked() {
        let th = Throttle::new(Throttle::FREE_PER_USER);
        // Attempts in flight count: the fourth parallel guess is refused before any check.
        for _ in 0..Throttle::FREE_PER_USER {
            assert!(th.attempt("user:Alice").is_ok());
        }
        let r = th.attempt("user:ALICE").expect_err("throttled");
        assert!(r.first, "the first refusal is reported");
        assert!(r.retry_after_secs >= 1);
        let again = th.attempt("user:alice").expect_err("still throttled");
        assert!(!again.first, "later refusals of the same back-off are not");
        assert!(th.attempt("user:bob").is_ok());
        th.succeeded("user:alice");
        assert!(th.attempt("user:alice").is_ok());
        assert_eq!(th.backoff(100), Throttle::MAX_BACKOFF);
        // A refund takes back one attempt, no more.
        let ip = Throttle::new(2);
        assert!(ip.attempt("ip:10.0.0.1").is_ok());
        assert!(ip.attempt("ip:10.0.0.1").is_ok());
        ip.refund("ip:10.0.0.1");
        assert!(ip.attempt("ip:10.0.0.1").is_ok());
        assert!(ip.attempt("ip:10.0.0.1").is_err());
    }

    #[tokio::test]
    async fn password_checks_are_bounded() {
        let checks = PasswordChecks::new(1);
        let hash = hash_password("correct horse battery").expect("hash");
        let held = checks.permits.clone().try_acquire_owned().expect("slot");
        assert!(matches!(
            checks.verify("x".into(), hash.clone()).await,
            Err(ApiError::Busy { .. })
        ));
        drop(held);
        assert!(checks
            .verify("correct horse battery".into(), hash)
            .await
            .expect("checked"));
    }
}
