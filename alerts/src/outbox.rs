//! Delivery of the transactional outbox (channel `oms`) to the OMS webhook: HMAC-signed POSTs,
//! per-subject order, exponential back-off with jitter, dead-lettering.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use em_store::{OutboxMessage, Store};

use crate::config::{ConfigError, OmsConfig};
use crate::lifecycle::OutboxPayload;
use crate::payload::{OmsPayload, OmsSubject, OMS_SCHEMA_VERSION};
use crate::service::AlertError;
use crate::OMS_CHANNEL;

type HmacSha256 = Hmac<Sha256>;

/// Longest error text kept on an outbox row.
const MAX_ERROR_CHARS: usize = 1000;
/// Bytes of an error response body kept for the error text.
const MAX_ERROR_BODY: usize = 512;

/// `sha256=<lower-case hex HMAC-SHA256 of body keyed with secret>` — the `X-EM-Signature` value.
pub fn sign_body(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks an `X-EM-Signature` header value against `body` in constant time (what an OMS
/// receiver does; used by the tests and offered to Rust receivers).
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the OMS has the message.
    Delivered,
    /// Network error, timeout, 5xx, 408 or 429: try again later (`Retry-After` honoured).
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Any other answer (4xx, 3xx, unusable payload): retrying cannot help; dead-letter.
    Permanent { error: String },
}

/// Classifies an HTTP status: 2xx delivered; 408, 429 and 5xx retryable; everything else
/// permanent (redirects are not followed: a POST must reach the configured URL).
pub fn classify_status(status: u16, error: String, retry_after: Option<Duration>) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        408 | 429 | 500..=599 => Outcome::Retry { error, retry_after },
        _ => Outcome::Permanent { error },
    }
}

/// Delay before the next attempt after `failures` failed attempts (≥ 1): `base · 2^(failures-1)`
/// capped at `max`, with "equal jitter" — a random point in the upper half — so that many
/// messages failing together do not retry in lock-step. `jitter` is in `[0, 1]`.
pub fn backoff_delay(base: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(40);
    let raw = base.saturating_mul(1u32 << exp.min(31));
    let capped = if exp > 31 { max } else { raw.min(max) };
    let half = capped / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

fn truncate(mut s: String, max_chars: usize) -> String {
    if let Some((idx, _)) = s.char_indices().nth(max_chars) {
        s.truncate(idx);
        s.push('…');
    }
    s
}

/// Delivers pending `oms` outbox messages to the OMS webhook.
pub struct OutboxWorker {
    store: Arc<dyn Store>,
    config: OmsConfig,
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Vec<u8>,
}

impl std::fmt::Debug for OutboxWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxWorker")
            .field("url", &self.url.as_str())
            .field("config", &self.config)
            .finish()
    }
}

/// Counts of one polling round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Round {
    attempted: usize,
    delivered: usize,
}

impl OutboxWorker {
    /// Validates `config`; fails when OMS delivery is disabled (then the worker must not run).
    pub fn new(store: Arc<dyn Store>, config: OmsConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        if !config.enabled {
            return Err(ConfigError::Invalid(
                "OMS delivery is disabled (oms.enabled = false); the outbox worker is not started"
                    .into(),
            ));
        }
        let url_text = config.url.clone().unwrap_or_default();
        let url = reqwest::Url::parse(url_text.trim())
            .map_err(|e| ConfigError::Invalid(format!("oms.url {url_text:?}: {e}")))?;
        let secret = config.secret.clone().unwrap_or_default().into_bytes();
        let client = reqwest::Client::builder()
            .timeout(config.timeout())
            .connect_timeout(config.timeout())
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("em-alerts/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::Invalid(format!("cannot build the OMS HTTP client: {e}")))?;
        Ok(OutboxWorker {
            store,
            config,
            client,
            url,
            secret,
        })
    }

    /// Polls and delivers until `shutdown` is cancelled. A round in progress is finished
    /// (bounded by the request timeout) so no delivery is left half-recorded.
    pub async fn run(self, shutdown: CancellationToken) {
        Arc::new(self).run_shared(shutdown).await
    }

    /// [`OutboxWorker::run`] on a shared worker (restarted under a lease without rebuilding it).
    /// Woken at once by new changes in the store's change log (an alert change writes its
    /// outbox rows in the same transaction), and every `poll_interval` for retries.
    pub async fn run_shared(self: Arc<Self>, shutdown: CancellationToken) {
        info!(url = self.url.as_str(), "OMS outbox delivery started");
        let full = usize::try_from(self.config.batch_size).unwrap_or(usize::MAX);
        let mut wake = self.store.change_wakeups();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let pause = match self.round().await {
                // A full batch: there is probably more waiting; go again at once.
                Ok(r) if r.attempted >= full => Duration::ZERO,
                Ok(_) => self.config.poll_interval(),
                Err(e) => {
                    error!(error = %e, "OMS outbox poll failed; retrying");
                    self.config.poll_interval()
                }
            };
            if pause > Duration::ZERO {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                    changed = wake.changed() => {
                        if changed.is_err() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            }
        }
        info!("OMS outbox delivery stopped");
    }

    pub async fn run_once(&self) -> Result<usize, AlertError> {
        Ok(self.round().await?.delivered)
    }

    async fn round(&self) -> Result<Round, AlertError> {
        let due = self
            .store
            .due_outbox(OMS_CHANNEL, Utc::now(), self.config.batch_size)
            .await?;
        let attempted = due.len();
        let results: Vec<Result<bool, AlertError>> = futures::stream::iter(due)
            .map(|m| self.process(m))
            .buffer_unordered(self.config.concurrency)
            .collect()
            .await;
        let mut delivered = 0;
        let mut first_err = None;
        for r in results {
            match r {
                Ok(true) => delivered += 1,
                Ok(false) => {}
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(Round {
                attempted,
                delivered,
            }),
        }
    }

    /// Builds the signed body of a message (what is POSTed).
    pub async fn body(&self, m: &OutboxMessage) -> Result<Vec<u8>, Outcome> {
        let stored: OutboxPayload =
            serde_json::from_value(m.payload.clone()).map_err(|e| Outcome::Permanent {
                error: format!("outbox payload is not an alert change: {e}"),
            })?;
        let subject = self
            .store
            .get_subject(stored.alert.subject_id)
            .await
            .map_err(|e| Outcome::Retry {
                error: format!("cannot load subject {}: {e}", stored.alert.subject_id),
                retry_after: None,
            })?;
        let payload = OmsPayload {
            schema_version: OMS_SCHEMA_VERSION,
            id: m.idempotency_key.clone(),
            event: stored.event,
            alert_version: stored.version,
            occurred_at: m.created_at,
            subject: OmsSubject {
                id: stored.alert.subject_id,
                reference: subject.map(|s| s.reference),
            },
            alert: stored.alert,
        };
        serde_json::to_vec(&payload).map_err(|e| Outcome::Permanent {
            error: format!("cannot serialise the OMS payload: {e}"),
        })
    }

    async fn attempt(&self, m: &OutboxMessage, body: Vec<u8>) -> Outcome {
        let signature = sign_body(&self.secret, &body);
        let event = m
            .payload
            .get("event")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-EM-Signature", signature)
            .header("X-EM-Timestamp", Utc::now().timestamp().to_string())
            .header("Idempotency-Key", m.idempotency_key.as_str())
            .header("X-EM-Event", event)
            .header("X-EM-Attempt", (m.attempts.saturating_add(1)).to_string())
            .body(body)
            .send()
            .await;
        let mut response = match response {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                return Outcome::Retry {
                    error: format!("OMS {what}: {e}"),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Outcome::Delivered;
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut text = Vec::new();
        while text.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => text.extend_from_slice(&chunk),
                _ => break,
            }
        }
        text.truncate(MAX_ERROR_BODY);
        let body_text = String::from_utf8_lossy(&text).trim().to_string();
        let mut error = format!("OMS answered HTTP {status}");
        if let Some(loc) = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        {
            error.push_str(&format!(" (redirect to {loc}; fix oms.url)"));
        }
        if !body_text.is_empty() {
            error.push_str(": ");
            error.push_str(&body_text);
        }
        classify_status(status.as_u16(), error, retry_after)
    }

    /// Delivers one message and records the outcome. Ok(true) = delivered.
    async fn process(&self, m: OutboxMessage) -> Result<bool, AlertError> {
        let outcome = match self.body(&m).await {
            Ok(body) => self.attempt(&m, body).await,
            Err(o) => o,
        };
        let now = Utc::now();
        let failures = u32::try_from(m.attempts.saturating_add(1))
            .unwrap_or(1)
            .max(1);
        match outcome {
            Outcome::Delivered => {
                self.store.mark_outbox_delivered(m.id, now).await?;
                metrics::counter!("em_oms_delivered_total").increment(1);
                debug!(
                    id = m.id,
                    key = m.idempotency_key.as_str(),
                    "OMS message delivered"
                );
                Ok(true)
            }
            Outcome::Retry { error, retry_after } => {
                let limit = u32::try_from(self.config.max_attempts).unwrap_or(1);
                if failures >= limit {
                    let error = truncate(
                        format!("gave up after {failures} attempts; last error: {error}"),
                        MAX_ERROR_CHARS,
                    );
                    error!(
                        id = m.id,
                        key = m.idempotency_key.as_str(),
                        error,
                        "OMS message dead-lettered"
                    );
                    metrics::counter!("em_oms_dead_letter_total").increment(1);
                    self.store
                        .mark_outbox_failed(m.id, &error, now, true)
                        .await?;
                    return Ok(false);
                }
                let jitter = rand::thread_rng().gen_range(0.0..=1.0);
                let mut delay = backoff_delay(
                    self.config.backoff_base(),
                    self.config.backoff_max(),
                    failures,
                    jitter,
                );
                if let Some(ra) = retry_after {
                    delay = delay.max(ra.min(self.config.backoff_max()));
                }
                let next = now
                    + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(60));
                warn!(
                    id = m.id,
                    key = m.idempotency_key.as_str(),
                    attempt = failures,
                    retry_in_ms = delay.as_millis() as u64,
                    error,
                    "OMS delivery failed; will retry"
                );
                metrics::counter!("em_oms_retries_total").increment(1);
                self.store
                    .mark_outbox_failed(m.id, &truncate(error, MAX_ERROR_CHARS), next, false)
                    .await?;
                Ok(false)
            }
            Outcome::Permanent { error } => {
                let error = truncate(error, MAX_ERROR_CHARS);
                error!(
                    id = m.id,
                    key = m.idempotency_key.as_str(),
                    error,
                    "OMS rejected the message; dead-lettered"
                );
                metrics::counter!("em_oms_dead_letter_total").increment(1);
                self.store
                    .mark_outbox_failed(m.id, &error, now, true)
                    .await?;
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips_and_rejects_tampering() {
        let sig = sign_body(b"0123456789abcdef", b"{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(verify_signature(b"0123456789abcdef", b"{\"a\":1}", &sig));
        assert!(!verify_signature(b"0123456789abcdef", b"{\"a\":2}", &sig));
        assert!(!verify_signature(b"other-secret-0000", b"{\"a\":1}", &sig));
        assert!(!verify_signature(
            b"0123456789abcdef",
            b"{\"a\":1}",
            "md5=00"
        ));
        assert!(!verify_signature(
            b"0123456789abcdef",
            b"{\"a\":1}",
            "sha256=zz"
        ));
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign_body(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn status_classes() {
        let c = |s| classify_status(s, String::new(), None);
        assert_eq!(c(200), Outcome::Delivered);
        assert_eq!(c(204), Outcome::Delivered);
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(c(s), Outcome::Retry { .. }), "{s}");
        }
        for s in [301, 400, 401, 403, 404, 409, 410, 422] {
            assert!(matches!(c(s), Outcome::Permanent { .. }), "{s}");
        }
    }

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let base = Duration::from_millis(1000);
        let max = Duration::from_millis(60_000);
        assert_eq!(
            backoff_delay(base, max, 1, 1.0),
            Duration::from_millis(1000)
        );
        assert_eq!(backoff_delay(base, max, 1, 0.0), Duration::from_millis(500));
        assert_eq!(
            backoff_delay(base, max, 3, 1.0),
            Duration::from_millis(4000)
        );
        assert_eq!(backoff_delay(base, max, 10, 1.0), max);
        assert_eq!(backoff_delay(base, max, 10, 0.0), max / 2);
        // Huge attempt counts neither overflow nor exceed the cap.
        assert_eq!(backoff_delay(base, max, u32::MAX, 1.0), max);
        for n in 1..50 {
            let d = backoff_delay(base, max, n, 0.37);
            assert!(d <= max && d >= Duration::from_millis(250), "{n}: {d:?}");
        }
    }

    #[test]
    fn long_errors_are_truncated_on_a_char_boundary() {
        let s = truncate("é".repeat(2000), 10);
        assert_eq!(s.chars().count(), 11);
    }
}
