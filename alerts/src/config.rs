//! Alert configuration: per-kind rules, escalation times, resolution codes and OMS delivery.
//!
//! Everything is TOML-deserialisable with `deny_unknown_fields`, and [`AlertConfig::validate`]
//! checks the values, so a typo or a nonsensical value stops the service at start-up with a
//! message naming the key instead of silently running with defaults.

use std::collections::HashMap;
use std::time::Duration;

use em_model::{AlertKind, Severity};
use serde::{Deserialize, Serialize};

/// A configuration value is missing, unknown or out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range or inconsistent; the message names the key.
    #[error("invalid alert configuration: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// Rules of the alert engine. `Default` gives the production defaults documented on each field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    /// Reason codes an officer may choose when resolving an alert. Must be non-empty, unique,
    /// and contain `auto_resolve_code`.
    pub resolution_codes: Vec<String>,
    /// Code recorded when an alert is resolved automatically because its condition ended.
    pub auto_resolve_code: String,
    /// Accepted for compatibility and not used: the live feeds read the store's change log,
    /// where a slow reader catches up instead of losing notices.
    pub notice_buffer: usize,
    /// Per-kind overrides; kinds not listed use [`KindRule`] defaults from [`default_rule`].
    pub kinds: HashMap<AlertKind, KindRule>,
    pub escalation: EscalationConfig,
    pub oms: OmsConfig,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            resolution_codes: [
                "condition_ended",
                "subject_contacted",
                "false_alarm",
                "device_fault",
                "approved_absence",
                "police_notified",
                "breach_reported",
                "other",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            auto_resolve_code: "condition_ended".into(),
            notice_buffer: 1024,
            kinds: HashMap::new(),
            escalation: EscalationConfig::default(),
            oms: OmsConfig::default(),
        }
    }
}

/// Overrides of one alert kind's rule. Every field is optional; unset fields keep the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindRule {
    /// False = signals of this kind are ignored (no alert is raised).
    pub enabled: Option<bool>,
    pub severity: Option<Severity>,
    /// Resolve the alert automatically when the condition ends (the end is recorded either way).
    pub auto_resolve: Option<bool>,
    /// Escalate when not acknowledged within this many seconds (overrides the severity's time).
    pub escalate_after_secs: Option<i64>,
    /// False = never escalate this kind.
    pub escalate: Option<bool>,
}

/// The effective rule of one kind after defaults and overrides are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveRule {
    pub enabled: bool,
    pub severity: Severity,
    pub auto_resolve: bool,
    /// None = this alert never escalates.
    pub escalate_after: Option<Duration>,
}

/// Built-in defaults per kind: (severity, auto_resolve).
///
/// Zone, curfew, victim and tamper alerts need a human decision and are not resolved
/// automatically (their end is still recorded); technical conditions that clear themselves
/// (battery, charger, communication, clock, missing fix) are.
pub fn default_rule(kind: AlertKind) -> (Severity, bool) {
    use AlertKind::*;
    match kind {
        InclusionZoneExit => (Severity::High, false),
        ExclusionZoneEntry => (Severity::High, false),
        VictimProximity => (Severity::Critical, false),
        CurfewViolation => (Severity::High, false),
        NoFixDuringCurfew => (Severity::Medium, true),
        StrapTamper => (Severity::Critical, false),
        CaseTamper => (Severity::High, false),
        LowBattery => (Severity::Low, true),
        BatteryDead => (Severity::High, true),
        ChargerNotConnected => (Severity::Low, true),
        LostCommunication => (Severity::High, true),
        GpsJammingSuspected => (Severity::High, false),
        DeviceClockWrong => (Severity::Low, true),
        // An alarm we cannot read may be a tamper or an SOS: a person looks at it.
        UnknownAlarm => (Severity::High, false),
    }
}

/// Time within which an open alert must be acknowledged, per severity, before it goes to the
/// supervisor level. An unset severity never escalates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationConfig {
    /// Default 300 (5 minutes).
    pub critical_secs: Option<i64>,
    /// Default 900 (15 minutes).
    pub high_secs: Option<i64>,
    /// Default 3600 (1 hour).
    pub medium_secs: Option<i64>,
    /// Default unset: low-severity alerts are not escalated.
    pub low_secs: Option<i64>,
    /// How often the escalation task looks for overdue alerts. Default 30.
    pub check_interval_secs: i64,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        EscalationConfig {
            critical_secs: Some(300),
            high_secs: Some(900),
            medium_secs: Some(3600),
            low_secs: None,
            check_interval_secs: 30,
        }
    }
}

impl EscalationConfig {
    pub fn for_severity(&self, severity: Severity) -> Option<i64> {
        match severity {
            Severity::Critical => self.critical_secs,
            Severity::High => self.high_secs,
            Severity::Medium => self.medium_secs,
            Severity::Low => self.low_secs,
        }
    }

    /// Interval of the escalation task.
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.check_interval_secs.max(1).unsigned_abs())
    }
}

/// Delivery of alert changes to the offender-management system (OMS) over a signed webhook.
///
/// Disabled unless `enabled = true`; then `url` and `secret` are required. When disabled no
/// outbox rows are written for the OMS and the outbox worker must not be started.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OmsConfig {
    pub enabled: bool,
    /// Webhook URL (http or https), e.g. `https://oms.example.org/em/webhook`.
    pub url: Option<String>,
    /// Shared HMAC secret (at least 16 bytes). Never logged.
    pub secret: Option<String>,
    /// Per-request timeout (connect + response). Default 10.
    pub timeout_secs: i64,
    /// Attempts before a message is dead-lettered. Default 200: with the default back-off the
    /// last attempt comes 16–32 hours after the first, so a day-long OMS outage loses nothing.
    pub max_attempts: i32,
    /// First retry delay. Default 2000 ms.
    pub backoff_base_ms: i64,
    /// Upper bound of the retry delay. Default 600000 ms (10 minutes).
    pub backoff_max_ms: i64,
    /// How often the worker polls the outbox when idle. Default 1000 ms.
    pub poll_interval_ms: i64,
    /// Messages fetched per poll (at most one per subject). Default 100.
    pub batch_size: i64,
    /// Deliveries in flight at once (always different subjects). Default 8.
    pub concurrency: usize,
}

impl std::fmt::Debug for OmsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OmsConfig")
            .field("enabled", &self.enabled)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("timeout_secs", &self.timeout_secs)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base_ms", &self.backoff_base_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("batch_size", &self.batch_size)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl Default for OmsConfig {
    fn default() -> Self {
        OmsConfig {
            enabled: false,
            url: None,
            secret: None,
            timeout_secs: 10,
            max_attempts: 200,
            backoff_base_ms: 2000,
            backoff_max_ms: 600_000,
            poll_interval_ms: 1000,
            batch_size: 100,
            concurrency: 8,
        }
    }
}

/// Minimum length of the OMS shared secret.
pub const MIN_SECRET_LEN: usize = 16;

impl OmsConfig {
    /// Checks the values; when `enabled` also that `url` and `secret` are present and sane.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("oms.timeout_secs", self.timeout_secs)?;
        positive("oms.backoff_base_ms", self.backoff_base_ms)?;
        positive("oms.backoff_max_ms", self.backoff_max_ms)?;
        positive("oms.poll_interval_ms", self.poll_interval_ms)?;
        positive("oms.batch_size", self.batch_size)?;
        if self.max_attempts <= 0 {
            return Err(invalid(format!(
                "oms.max_attempts must be at least 1 (got {})",
                self.max_attempts
            )));
        }
        if self.concurrency == 0 {
            return Err(invalid("oms.concurrency must be at least 1 (got 0)"));
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err(invalid(format!(
                "oms.backoff_max_ms ({}) must not be smaller than oms.backoff_base_ms ({})",
                self.backoff_max_ms, self.backoff_base_ms
            )));
        }
        if !self.enabled {
            return Ok(());
        }
        let url = self.url.as_deref().unwrap_or("").trim();
        if url.is_empty() {
            return Err(invalid(
                "oms.enabled = true but oms.url is not set (set the OMS webhook URL, or enabled = false)",
            ));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| invalid(format!("oms.url {url:?} is not a valid URL: {e}")))?;
        if parsed.scheme() != "http" && parsed.scheme() != "https" {
            return Err(invalid(format!(
                "oms.url {url:?} must use http or https (got {:?})",
                parsed.scheme()
            )));
        }
        match self.secret.as_deref() {
            None => Err(invalid(
                "oms.enabled = true but oms.secret is not set (the shared HMAC secret)",
            )),
            Some(s) if s.len() < MIN_SECRET_LEN => Err(invalid(format!(
                "oms.secret is too short ({} bytes; at least {MIN_SECRET_LEN} required)",
                s.len()
            ))),
            Some(_) => Ok(()),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1).unsigned_abs())
    }
    pub fn backoff_base(&self) -> Duration {
        Duration::from_millis(self.backoff_base_ms.max(1).unsigned_abs())
    }
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms.max(1).unsigned_abs())
    }
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(1).unsigned_abs())
    }
}

fn positive(key: &str, v: i64) -> Result<(), ConfigError> {
    if v <= 0 {
        Err(invalid(format!(
            "{key} must be greater than zero (got {v})"
        )))
    } else {
        Ok(())
    }
}

impl AlertConfig {
    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.resolution_codes.is_empty() {
            return Err(invalid("resolution_codes must not be empty"));
        }
        let mut seen = std::collections::HashSet::new();
        for code in &self.resolution_codes {
            let ok = !code.is_empty()
                && code.len() <= 64
                && code
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return Err(invalid(format!(
                    "resolution code {code:?} must be 1–64 characters of a-z, 0-9 and _"
                )));
            }
            if !seen.insert(code.as_str()) {
                return Err(invalid(format!("resolution code {code:?} is listed twice")));
            }
        }
        if !self.resolution_codes.contains(&self.auto_resolve_code) {
            return Err(invalid(format!(
                "auto_resolve_code {:?} is not one of resolution_codes",
                self.auto_resolve_code
            )));
        }
        if self.notice_buffer == 0 {
            return Err(invalid("notice_buffer must be at least 1 (got 0)"));
        }
        let e = &self.escalation;
        for (key, v) in [
            ("escalation.critical_secs", e.critical_secs),
            ("escalation.high_secs", e.high_secs),
            ("escalation.medium_secs", e.medium_secs),
            ("escalation.low_secs", e.low_secs),
        ] {
            if let Some(v) = v {
                positive(key, v)?;
            }
        }
        positive("escalation.check_interval_secs", e.check_interval_secs)?;
        for (kind, rule) in &self.kinds {
            if let Some(v) = rule.escalate_after_secs {
                positive(&format!("kinds.{}.escalate_after_secs", kind.as_str()), v)?;
                if rule.escalate == Some(false) {
                    return Err(invalid(format!(
                        "kinds.{}: escalate = false contradicts escalate_after_secs",
                        kind.as_str()
                    )));
                }
            }
        }
        self.oms.validate()
    }

    /// The effective rule of `kind` (defaults merged with the `[kinds.<kind>]` override).
    pub fn rule(&self, kind: AlertKind) -> EffectiveRule {
        let (severity, auto_resolve) = default_rule(kind);
        let over = self.kinds.get(&kind).cloned().unwrap_or_default();
        let severity = over.severity.unwrap_or(severity);
        let escalate_after = self.escalate_after(kind, severity);
        EffectiveRule {
            enabled: over.enabled.unwrap_or(true),
            severity,
            auto_resolve: over.auto_resolve.unwrap_or(auto_resolve),
            escalate_after,
        }
    }

    /// How long an alert of this kind and severity may stay unacknowledged before it is
    /// escalated: the kind's `escalate_after_secs`, else its severity's time; None = never.
    pub fn escalate_after(&self, kind: AlertKind, severity: Severity) -> Option<Duration> {
        let over = self.kinds.get(&kind);
        if over.and_then(|r| r.escalate) == Some(false) {
            return None;
        }
        over.and_then(|r| r.escalate_after_secs)
            .or_else(|| self.escalation.for_severity(severity))
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s.unsigned_abs()))
    }

    /// Outbox channels written with every alert change: `["oms"]` when OMS delivery is enabled.
    pub fn outbox_channels(&self) -> &'static [&'static str] {
        if self.oms.enabled {
            &[crate::OMS_CHANNEL]
        } else {
            &[]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AlertConfig, String> {
        let cfg: AlertConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn defaults_are_valid_and_oms_is_off() {
        let cfg = AlertConfig::default();
        cfg.validate().unwrap();
        assert!(!cfg.oms.enabled);
        assert!(cfg.outbox_channels().is_empty());
        assert_eq!(parse("").unwrap(), cfg);
        // Every kind has a rule; critical ones escalate fastest.
        for kind in AlertKind::ALL {
            assert!(cfg.rule(kind).enabled);
        }
        let tamper = cfg.rule(AlertKind::StrapTamper);
        assert_eq!(tamper.severity, Severity::Critical);
        assert_eq!(tamper.escalate_after, Some(Duration::from_secs(300)));
        assert_eq!(cfg.rule(AlertKind::LowBattery).escalate_after, None);
    }

    #[test]
    fn full_example_parses() {
        let cfg = parse(
            r#"
            resolution_codes = ["condition_ended", "false_alarm", "other"]
            auto_resolve_code = "condition_ended"
            notice_buffer = 256

            [kinds.low_battery]
            enabled = false
            [kinds.strap_tamper]
            severity = "critical"
            auto_resolve = false
            escalate_after_secs = 120
            [kinds.device_clock_wrong]
            escalate = false

            [escalation]
            critical_secs = 300
            high_secs = 900
            medium_secs = 3600
            low_secs = 86400
            check_interval_secs = 15

            [oms]
            enabled = true
            url = "https://oms.example.org/em/webhook"
            secret = "0123456789abcdef0123"
            timeout_secs = 5
            max_attempts = 10
            backoff_base_ms = 500
            backoff_max_ms = 60000
            poll_interval_ms = 250
            batch_size = 50
            concurrency = 4
            "#,
        )
        .unwrap();
        assert!(!cfg.rule(AlertKind::LowBattery).enabled);
        assert_eq!(
            cfg.rule(AlertKind::StrapTamper).escalate_after,
            Some(Duration::from_secs(120))
        );
        assert_eq!(cfg.rule(AlertKind::DeviceClockWrong).escalate_after, None);
        assert_eq!(
            cfg.escalate_after(AlertKind::LowBattery, Severity::Low),
            Some(Duration::from_secs(86400))
        );
        assert_eq!(cfg.outbox_channels(), &["oms"]);
        assert!(!format!("{:?}", cfg.oms).contains("0123456789abcdef0123"));
    }

    #[test]
    fn bad_configuration_fails_with_a_clear_message() {
        let cases: &[(&str, &str)] = &[
            (
                "[kinds.teleportation]\nseverity = \"high\"",
                "teleportation",
            ),
            (
                "[kinds.strap_tamper]\nseverity = \"apocalyptic\"",
                "apocalyptic",
            ),
            (
                "[kinds.strap_tamper]\nescalate_within = 5",
                "escalate_within",
            ),
            (
                "[escalation]\nhigh_secs = -5",
                "escalation.high_secs must be greater than zero",
            ),
            (
                "[escalation]\ncritical_secs = 0",
                "escalation.critical_secs must be greater than zero",
            ),
            ("[escalation]\nurgent_secs = 60", "urgent_secs"),
            (
                "[kinds.strap_tamper]\nescalate_after_secs = 0",
                "kinds.strap_tamper.escalate_after_secs",
            ),
            (
                "[kinds.strap_tamper]\nescalate = false\nescalate_after_secs = 5",
                "contradicts",
            ),
            (
                "[oms]\nbackoff_base_ms = 5000\nbackoff_max_ms = 1000",
                "must not be smaller",
            ),
            ("[oms]\ntimeout_secs = 0", "oms.timeout_secs"),
            ("[oms]\nmax_attempts = 0", "oms.max_attempts"),
            (
                "[oms]\nenabled = true\nsecret = \"0123456789abcdef\"",
                "oms.url is not set",
            ),
            (
                "[oms]\nenabled = true\nurl = \"https://x.example\"",
                "oms.secret is not set",
            ),
            (
                "[oms]\nenabled = true\nurl = \"https://x.example\"\nsecret = \"short\"",
                "too short",
            ),
            (
                "[oms]\nenabled = true\nurl = \"ftp://x.example\"\nsecret = \"0123456789abcdef\"",
                "http or https",
            ),
            (
                "[oms]\nenabled = true\nurl = \"not a url\"\nsecret = \"0123456789abcdef\"",
                "not a valid URL",
            ),
            ("[oms]\nendpoint = \"https://x\"", "endpoint"),
            ("resolution_codes = []", "must not be empty"),
            ("resolution_codes = [\"other\"]", "auto_resolve_code"),
            (
                "resolution_codes = [\"condition_ended\", \"Bad Code\"]",
                "Bad Code",
            ),
            (
                "resolution_codes = [\"condition_ended\", \"condition_ended\"]",
                "twice",
            ),
            ("notice_buffer = 0", "notice_buffer"),
            ("colour = \"red\"", "colour"),
        ];
        for (text, needle) in cases {
            match parse(text) {
                Ok(_) => panic!("accepted bad config:\n{text}"),
                Err(e) => assert!(e.contains(needle), "error for\n{text}\nwas: {e}"),
            }
        }
    }
}
