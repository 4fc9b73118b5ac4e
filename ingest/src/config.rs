//! Service configuration: one TOML file (every key documented in `config/em.example.toml`),
//! unknown keys rejected, environment overrides applied on top, validated at start-up with
//! errors that name the key.
//!
//! Without any file, [`Config::embedded`] is the newcomer's default: SQLite in `./data/em.db`,
//! the embedded MQTT endpoint, device listeners on high ports of 127.0.0.1, the dashboard on
//! http://127.0.0.1:8080, and the demo data plus the fleet simulator.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use em_alerts::AlertConfig;
use em_dashboard::DashboardConfig;
use serde::Deserialize;

use crate::health::HealthConfig;
use crate::pipeline::PipelineConfig;

/// A configuration problem; the message names the key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("configuration file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole service configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub listeners: ListenersConfig,
    pub mqtt: MqttConfig,
    pub pipeline: PipelineConfig,
    pub health: HealthConfig,
    pub retention: RetentionConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub demo: DemoConfig,
    pub dashboard: DashboardConfig,
    pub alerts: AlertConfig,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://user@host:port/db`.
    pub url: String,
    /// PostgreSQL only: use (and create) this schema instead of the default search path.
    pub schema: Option<String>,
    /// Re-read the device registry and assignments this often (seconds).
    pub registry_refresh_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://./data/em.db".into(),
            schema: None,
            registry_refresh_secs: 30,
        }
    }
}

/// `[listeners]`: device-facing TCP and HTTP listeners.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenersConfig {
    /// Address the device listeners bind to.
    pub bind: IpAddr,
    /// GT06 / Concox TCP port; 0 = disabled.
    pub gt06_port: u16,
    /// Teltonika Codec 8/8E TCP port; 0 = disabled.
    pub teltonika_port: u16,
    /// Teltonika Codec 8/8E UDP port (its own port space; the `[listeners.teltonika]` allow
    /// list applies); 0 = disabled.
    pub teltonika_udp_port: u16,
    /// H02 TCP port; 0 = disabled.
    pub h02_port: u16,
    /// OsmAnd HTTP port; 0 = disabled.
    pub osmand_port: u16,
    /// Close a device connection silent for this long (seconds).
    pub idle_timeout_secs: u64,
    /// A device must identify itself (login / IMEI) within this many seconds of connecting.
    pub login_timeout_secs: u64,
    /// Largest accepted frame in bytes; 0 = the codec's own default.
    pub max_frame_bytes: usize,
    /// Concurrent connections from one IP address (per listener); 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Concurrent connections per listener; 0 = unlimited.
    pub max_connections: usize,
    /// Seconds given to open connections to finish their in-flight work at shutdown.
    pub shutdown_grace_secs: u64,
    /// Bind the TCP device listeners with `SO_REUSEPORT`, so several ingest processes on one
    /// host share a port and the kernel spreads new connections over them (more connections
    /// than one process's open-file limit, restarts without refusing devices). Linux / BSD.
    pub reuse_port: bool,
    /// Bind every enabled listener (device listeners, the embedded MQTT endpoint and the
    /// dashboard) to a port the operating system picks, and report the ports bound: in the
    /// log, and in `addr_file` when set. For tests and for several instances on one host
    /// without port planning. A port of 0 still means "disabled".
    pub ephemeral_ports: bool,
    /// Write the bound addresses as JSON (`{"gt06": "127.0.0.1:40123", …, "dashboard": …}`)
    /// to this file once every listener is bound (written to a temporary file and renamed,
    /// so a reader never sees half of it).
    pub addr_file: Option<std::path::PathBuf>,
    /// `[listeners.gt06]`: options of the GT06 listener.
    pub gt06: ListenerAccess,
    /// `[listeners.teltonika]`
    pub teltonika: ListenerAccess,
    /// `[listeners.h02]`
    pub h02: ListenerAccess,
    /// `[listeners.osmand]`
    pub osmand: ListenerAccess,
}

/// `[listeners.<protocol>]`: who may connect to one device listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerAccess {
    /// Source networks allowed to connect (`"10.0.0.0/8"`, `"192.168.1.0/24"`, a single
    /// address); empty = any source. A connection from elsewhere is closed before anything is
    /// read from it. GT06, Teltonika and H02 cannot carry a secret (the IMEI is their only
    /// identity), so production puts them behind a private APN/VPN and lists its networks here.
    pub allow: AllowList,
}

/// Source networks a listener accepts connections from (empty = any).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowList(Vec<ipnet::IpNet>);

impl AllowList {
    /// Parses CIDR networks or single addresses (`10.0.0.0/8`, `192.168.1.7`, `fd00::/8`).
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<AllowList, String> {
        items
            .iter()
            .map(|s| {
                let s = s.as_ref().trim();
                s.parse::<ipnet::IpNet>()
                    .map(|n| n.trunc())
                    .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        format!("{s:?} is not a network (a.b.c.d/len, an address, or IPv6)")
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(AllowList)
    }

    /// True when no list is set (every source allowed).
    pub fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    /// True when a connection from `ip` is allowed. IPv4 peers seen on an IPv6 socket
    /// (`::ffff:10.1.2.3`) are matched as IPv4.
    pub fn permits(&self, ip: IpAddr) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn networks(&self) -> &[ipnet::IpNet] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for AllowList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = Vec::<String>::deserialize(d)?;
        AllowList::parse(&items).map_err(serde::de::Error::custom)
    }
}

impl Default for ListenersConfig {
    fn default() -> Self {
        ListenersConfig {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            gt06_port: 5023,
            teltonika_port: 5027,
            teltonika_udp_port: 5027,
            h02_port: 5013,
            osmand_port: 5055,
            idle_timeout_secs: 600,
            login_timeout_secs: 60,
            max_frame_bytes: 0,
            max_connections_per_ip: 100,
            max_connections: 50_000,
            shutdown_grace_secs: 5,
            reuse_port: false,
            ephemeral_ports: false,
            addr_file: None,
            gt06: ListenerAccess::default(),
            teltonika: ListenerAccess::default(),
            h02: ListenerAccess::default(),
            osmand: ListenerAccess::default(),
        }
    }
}

/// `[mqtt]`: the open EM protocol over an MQTT broker.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Subscribe to `em/v1/+/telemetry|event|status`.
    pub enabled: bool,
    /// `mqtt://[user[:password]@]host[:port]` (port 1883 by default).
    pub url: String,
    /// Client id of this ingest instance (must be unique per instance).
    pub client_id: String,
    /// Shared-subscription group: when set, subscribes to `$share/<group>/em/v1/...` so several
    /// ingest instances split the devices between them.
    pub shared_group: Option<String>,
    /// Keep-alive, seconds.
    pub keep_alive_secs: u64,
    /// Messages in flight (received, not yet PUBACKed) from the broker.
    pub max_inflight: u16,
    /// Largest accepted MQTT payload in bytes.
    pub max_payload_bytes: usize,
    /// Publish alert notices on `em/v1/alerts/...` through this broker.
    pub publish_alerts: bool,
    /// The embedded MQTT endpoint (devices connect to `em` itself).
    pub broker: BrokerConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: "em-ingest".into(),
            shared_group: None,
            keep_alive_secs: 30,
            max_inflight: 100,
            max_payload_bytes: 64 * 1024,
            publish_alerts: true,
            broker: BrokerConfig::default(),
        }
    }
}

/// `[mqtt.broker]`: the embedded MQTT endpoint (`crate::mqtt_server`). Devices connect with
/// username = device id and password = their secret; a device's PUBACK follows the durable
/// store. The feed user may subscribe (e.g. to the alert feed `em/v1/alerts/#`), not publish.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Run the MQTT endpoint inside this process.
    pub enabled: bool,
    /// Its listen address.
    pub bind: SocketAddr,
    /// Username of the feed user (service clients that subscribe).
    pub feed_username: String,
    /// Password of the feed user. Unset: no feed login, except with `demo.enabled`, where a
    /// random one is made at start-up and printed with the demo logins.
    pub feed_password: Option<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            enabled: false,
            bind: SocketAddr::from(([127, 0, 0, 1], 18830)),
            feed_username: "em-feed".into(),
            feed_password: None,
        }
    }
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub enabled: bool,
    /// Delete positions older than this many days.
    pub positions_days: u32,
    /// Delete resolved alerts older than this many days (unset = keep).
    pub alerts_days: Option<u32>,
    /// Delete audit records older than this many days (unset = keep).
    pub audit_days: Option<u32>,
    /// How often the retention job runs (seconds).
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            enabled: true,
            positions_days: 365,
            alerts_days: None,
            audit_days: None,
            interval_secs: 3600,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics on `http://<bind>/metrics`.
    pub enabled: bool,
    pub bind: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            bind: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` env-filter directives, e.g. `info,em_ingest=debug`.
    pub filter: String,
    /// One JSON object per line instead of human-readable lines.
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            json: false,
        }
    }
}

/// `[demo]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Seed demo users, subjects, devices, zones and curfews (idempotent).
    pub enabled: bool,
    /// Also run the fleet simulator in-process, feeding the listeners.
    pub simulate: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            enabled: false,
            simulate: true,
        }
    }
}

/// Parsed `mqtt://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl MqttUrl {
    pub fn parse(url: &str) -> Result<MqttUrl, String> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| {
                format!("{url:?}: expected mqtt://[user[:password]@]host[:port] (TLS: terminate in front of the broker)")
            })?;
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
                None => (Some(a.to_owned()), None),
            },
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            // [ipv6]:port
            let (h, p) = h
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unterminated IPv6 address"))?;
            (h.to_owned(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (hostport.to_owned(), None),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("{url:?}: missing or invalid host"));
        }
        let port = match port {
            None => 1883,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url:?}: invalid port {p:?}"))?,
        };
        Ok(MqttUrl {
            host,
            port,
            username,
            password,
        })
    }

    /// Whether this URL names `addr` (same port; same IP, both loopback, `localhost`, or an
    /// unspecified `addr`).
    pub fn is_address(&self, addr: SocketAddr) -> bool {
        if self.port != addr.port() {
            return false;
        }
        match self.host.parse::<IpAddr>() {
            Ok(ip) => {
                ip == addr.ip()
                    || addr.ip().is_unspecified()
                    || (ip.is_loopback() && addr.ip().is_loopback())
            }
            Err(_) => {
                self.host.eq_ignore_ascii_case("localhost")
                    && (addr.ip().is_loopback() || addr.ip().is_unspecified())
            }
        }
    }
}

/// Environment variables that override the file (name, what they set).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("EM_DATABASE_URL", "database.url (wins over DATABASE_URL)"),
    ("DATABASE_URL", "database.url"),
    ("EM_MQTT_URL", "mqtt.url"),
    ("EM_MQTT_SHARED_GROUP", "mqtt.shared_group"),
    ("EM_MQTT_CLIENT_ID", "mqtt.client_id"),
    ("EM_MQTT_FEED_PASSWORD", "mqtt.broker.feed_password"),
    ("EM_DASHBOARD_BIND", "dashboard.bind"),
    ("EM_METRICS_BIND", "metrics.bind"),
    ("EM_LISTEN_ADDR", "listeners.bind"),
    ("EM_GT06_PORT", "listeners.gt06_port"),
    ("EM_TELTONIKA_PORT", "listeners.teltonika_port"),
    ("EM_H02_PORT", "listeners.h02_port"),
    ("EM_OSMAND_PORT", "listeners.osmand_port"),
    (
        "EM_GT06_ALLOW",
        "listeners.gt06.allow (comma-separated networks)",
    ),
    ("EM_TELTONIKA_ALLOW", "listeners.teltonika.allow"),
    ("EM_H02_ALLOW", "listeners.h02.allow"),
    ("EM_OSMAND_ALLOW", "listeners.osmand.allow"),
    ("EM_LOG", "log.filter"),
    ("EM_LOG_JSON", "log.json"),
    ("EM_DEMO", "demo.enabled"),
    ("EM_OMS_SECRET", "alerts.oms.secret"),
];

impl Config {
    /// The embedded default used when no configuration file is given.
    pub fn embedded() -> Config {
        let mut c = Config::default();
        c.listeners.bind = IpAddr::V4(Ipv4Addr::LOCALHOST);
        // Devices connect to the embedded endpoint, which stores before it acknowledges and
        // publishes the alert feed itself: no external broker client.
        c.mqtt.enabled = false;
        c.mqtt.publish_alerts = false;
        c.mqtt.broker.enabled = true;
        c.demo.enabled = true;
        c.demo.simulate = true;
        c
    }

    /// Parses TOML text (no environment overrides, no validation).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads a TOML file (no environment overrides, no validation).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The file at `path`, or the embedded default when `None`; then the environment
    /// overrides, then validation.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut c = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::embedded(),
        };
        c.apply_env(|k| std::env::var(k).ok())?;
        c.validate()?;
        Ok(c)
    }

    /// Applies the overrides of [`ENV_OVERRIDES`], reading variables through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("EM_DATABASE_URL").or_else(|| get("DATABASE_URL")) {
            self.database.url = v;
        }
        if let Some(v) = get("EM_MQTT_URL") {
            self.mqtt.url = v;
        }
        if let Some(v) = get("EM_MQTT_SHARED_GROUP") {
            self.mqtt.shared_group = Some(v);
        }
        if let Some(v) = get("EM_MQTT_CLIENT_ID") {
            self.mqtt.client_id = v;
        }
        if let Some(v) = get("EM_MQTT_FEED_PASSWORD") {
            self.mqtt.broker.feed_password = Some(v);
        }
        if let Some(v) = get("EM_DASHBOARD_BIND") {
            self.dashboard.bind = parse_env("EM_DASHBOARD_BIND", &v)?;
        }
        if let Some(v) = get("EM_METRICS_BIND") {
            self.metrics.bind = parse_env("EM_METRICS_BIND", &v)?;
        }
        if let Some(v) = get("EM_LISTEN_ADDR") {
            self.listeners.bind = parse_env("EM_LISTEN_ADDR", &v)?;
        }
        if let Some(v) = get("EM_GT06_PORT") {
            self.listeners.gt06_port = parse_env("EM_GT06_PORT", &v)?;
        }
        if let Some(v) = get("EM_TELTONIKA_PORT") {
            self.listeners.teltonika_port = parse_env("EM_TELTONIKA_PORT", &v)?;
        }
        if let Some(v) = get("EM_H02_PORT") {
            self.listeners.h02_port = parse_env("EM_H02_PORT", &v)?;
        }
        if let Some(v) = get("EM_OSMAND_PORT") {
            self.listeners.osmand_port = parse_env("EM_OSMAND_PORT", &v)?;
        }
        for (var, access) in [
            ("EM_GT06_ALLOW", &mut self.listeners.gt06),
            ("EM_TELTONIKA_ALLOW", &mut self.listeners.teltonika),
            ("EM_H02_ALLOW", &mut self.listeners.h02),
            ("EM_OSMAND_ALLOW", &mut self.listeners.osmand),
        ] {
            if let Some(v) = get(var) {
                let items: Vec<&str> = v.split(',').filter(|s| !s.trim().is_empty()).collect();
                access.allow = AllowList::parse(&items)
                    .map_err(|message| ConfigError::Env { var, message })?;
            }
        }
        if let Some(v) = get("EM_LOG") {
            self.log.filter = v;
        }
        if let Some(v) = get("EM_LOG_JSON") {
            self.log.json = parse_bool("EM_LOG_JSON", &v)?;
        }
        if let Some(v) = get("EM_DEMO") {
            self.demo.enabled = parse_bool("EM_DEMO", &v)?;
        }
        if let Some(v) = get("EM_OMS_SECRET") {
            self.alerts.oms.secret = Some(v);
        }
        Ok(())
    }

    /// Checks every section; the first problem is returned with the key it concerns.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = ConfigError::Invalid;
        let url = self.database.url.as_str();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(inv(format!(
                "database.url {:?}: expected sqlite://PATH or postgres://...",
                redact_url(url)
            )));
        }
        if let Some(schema) = &self.database.schema {
            if !url.starts_with("postgres") {
                return Err(inv(
                    "database.schema is only valid with a postgres:// url".into()
                ));
            }
            let ok = !schema.is_empty()
                && schema.len() <= 63
                && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return Err(inv(format!(
                    "database.schema {schema:?}: use lower-case letters, digits and '_' (max 63)"
                )));
            }
        }
        if self.database.registry_refresh_secs == 0 {
            return Err(inv("database.registry_refresh_secs must be > 0".into()));
        }
        let l = &self.listeners;
        let ports = [
            ("listeners.gt06_port", l.gt06_port),
            ("listeners.teltonika_port", l.teltonika_port),
            ("listeners.h02_port", l.h02_port),
            ("listeners.osmand_port", l.osmand_port),
        ];
        for (i, (ka, a)) in ports.iter().enumerate() {
            for (kb, b) in ports.iter().skip(i + 1) {
                // With ephemeral ports each listener gets its own port from the OS.
                if *a != 0 && a == b && !l.ephemeral_ports {
                    return Err(inv(format!("{ka} and {kb} are both {a}")));
                }
            }
        }
        if l.idle_timeout_secs == 0 {
            return Err(inv("listeners.idle_timeout_secs must be > 0".into()));
        }
        if l.login_timeout_secs == 0 {
            return Err(inv("listeners.login_timeout_secs must be > 0".into()));
        }
        if l.max_frame_bytes != 0 && !(64..=1024 * 1024).contains(&l.max_frame_bytes) {
            return Err(inv(
                "listeners.max_frame_bytes must be 0 (codec default) or 64..=1048576".into(),
            ));
        }
        if self.mqtt.enabled || self.mqtt.publish_alerts {
            MqttUrl::parse(&self.mqtt.url).map_err(|e| inv(format!("mqtt.url {e}")))?;
            if self.mqtt.client_id.trim().is_empty() {
                return Err(inv("mqtt.client_id must not be empty".into()));
            }
        }
        if let Some(g) = &self.mqtt.shared_group {
            if g.is_empty() || g.contains(['/', '+', '#']) {
                return Err(inv(format!(
                    "mqtt.shared_group {g:?} must be a non-empty name without '/', '+' or '#'"
                )));
            }
        }
        let b = &self.mqtt.broker;
        if b.enabled {
            if b.feed_username.trim().is_empty() {
                return Err(inv("mqtt.broker.feed_username must not be empty".into()));
            }
            if b.feed_password.as_deref().is_some_and(|p| p.len() < 12) {
                return Err(inv(
                    "mqtt.broker.feed_password must be at least 12 characters".into(),
                ));
            }
            if (self.mqtt.enabled || self.mqtt.publish_alerts)
                && MqttUrl::parse(&self.mqtt.url).is_ok_and(|u| u.is_address(b.bind))
            {
                return Err(inv(format!(
                    "mqtt.url {} is the embedded MQTT endpoint (mqtt.broker.bind), which stores device \
                     messages and publishes the alert feed itself: set mqtt.enabled = false and \
                     mqtt.publish_alerts = false, or point mqtt.url at an external broker",
                    redact_url(&self.mqtt.url)
                )));
            }
        }
        if self.mqtt.keep_alive_secs < 5 {
            return Err(inv("mqtt.keep_alive_secs must be at least 5".into()));
        }
        if self.mqtt.max_inflight == 0 {
            return Err(inv("mqtt.max_inflight must be > 0".into()));
        }
        if self.mqtt.max_payload_bytes < 128 {
            return Err(inv("mqtt.max_payload_bytes must be at least 128".into()));
        }
        self.pipeline.validate().map_err(inv)?;
        self.health.validate().map_err(inv)?;
        let r = &self.retention;
        if r.enabled {
            if r.positions_days == 0 {
                return Err(inv("retention.positions_days must be > 0".into()));
            }
            if r.alerts_days == Some(0) || r.audit_days == Some(0) {
                return Err(inv(
                    "retention.alerts_days / audit_days must be > 0 (leave unset to keep forever)"
                        .into(),
                ));
            }
            if r.interval_secs < 60 {
                return Err(inv("retention.interval_secs must be at least 60".into()));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(inv(format!("log.filter {:?}: {e}", self.log.filter)));
        }
        self.alerts
            .validate()
            .map_err(|e| inv(format!("[alerts] {e}")))?;
        if self.demo.enabled
            && self.demo.simulate
            && self.listeners.gt06_port == 0
            && self.listeners.teltonika_port == 0
        {
            return Err(inv(
                "demo.simulate needs the GT06 or Teltonika listener (a port > 0)".into(),
            ));
        }
        Ok(())
    }
}

fn parse_env<T: std::str::FromStr>(var: &'static str, v: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse::<T>().map_err(|e| ConfigError::Env {
        var,
        message: format!("{v:?}: {e}"),
    })
}

fn parse_bool(var: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Env {
            var,
            message: format!("{v:?}: expected true or false"),
        }),
    }
}

/// The URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.rsplit_once('@') {
            if let Some((user, _)) = auth.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn example_file_parses_and_validates() {
        let text = include_str!("../../config/em.example.toml");
        let c = Config::from_toml(text, "em.example.toml").expect("example parses");
        c.validate().expect("example validates");
    }

    #[test]
    fn embedded_default_validates() {
        let c = Config::embedded();
        c.validate().expect("embedded default is valid");
        assert!(c.mqtt.broker.enabled && c.demo.enabled);
        // Devices' messages reach the pipeline through the endpoint, not a loop-back client.
        assert!(!c.mqtt.enabled && !c.mqtt.publish_alerts);
        assert_eq!(c.database.url, "sqlite://./data/em.db");
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_key_name() {
        let err = Config::from_toml("[listeners]\ngt06_prot = 1\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("gt06_prot"), "{err}");
        let err = Config::from_toml("[nope]\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn env_overrides_apply_and_em_database_url_wins() {
        let env: HashMap<&str, &str> = [
            ("DATABASE_URL", "postgres://a/b"),
            ("EM_DATABASE_URL", "sqlite://x.db"),
            ("EM_MQTT_URL", "mqtt://broker:1884"),
            ("EM_DASHBOARD_BIND", "0.0.0.0:9000"),
            ("EM_GT06_PORT", "0"),
            ("EM_LOG_JSON", "true"),
        ]
        .into_iter()
        .collect();
        let mut c = Config::default();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.database.url, "sqlite://x.db");
        assert_eq!(c.mqtt.url, "mqtt://broker:1884");
        assert_eq!(c.dashboard.bind.port(), 9000);
        assert_eq!(c.listeners.gt06_port, 0);
        assert!(c.log.json);

        let mut c = Config::default();
        c.apply_env(|k| (k == "DATABASE_URL").then(|| "postgres://h/db".to_string()))
            .unwrap();
        assert_eq!(c.database.url, "postgres://h/db");

        let err = Config::default()
            .apply_env(|k| (k == "EM_GT06_PORT").then(|| "abc".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("EM_GT06_PORT"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::default();
        c.listeners.h02_port = c.listeners.gt06_port;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("gt06_port") && err.contains("h02_port"),
            "{err}"
        );

        let mut c = Config::default();
        c.database.url = "mysql://x".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("database.url"));

        let mut c = Config::default();
        c.mqtt.url = "http://x".into();
        assert!(c.validate().unwrap_err().to_string().contains("mqtt.url"));

        let mut c = Config::default();
        c.pipeline.batch_max_records = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("batch_max_records"));

        let mut c = Config::default();
        c.log.filter = "info,[[".into();
        assert!(c.validate().unwrap_err().to_string().contains("log.filter"));
    }

    #[test]
    fn listener_allow_lists() {
        let c = Config::from_toml(
            "[listeners.gt06]\nallow = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::/8\"]\n",
            "x.toml",
        )
        .unwrap();
        let a = &c.listeners.gt06.allow;
        assert!(a.permits("10.1.2.3".parse().unwrap()));
        assert!(a.permits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(a.permits("192.168.1.7".parse().unwrap()));
        assert!(!a.permits("192.168.1.8".parse().unwrap()));
        assert!(!a.permits("127.0.0.1".parse().unwrap()));
        assert!(a.permits("fd12::1".parse().unwrap()));
        assert!(c.listeners.h02.allow.is_any());
        assert!(c.listeners.h02.allow.permits("127.0.0.1".parse().unwrap()));

        let err = Config::from_toml("[listeners.h02]\nallow = [\"10.0.0/8\"]\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow") && err.contains("10.0.0/8"), "{err}");

        let mut c = Config::default();
        c.apply_env(|k| (k == "EM_OSMAND_ALLOW").then(|| "10.0.0.0/8, 127.0.0.1".into()))
            .unwrap();
        assert!(c
            .listeners
            .osmand
            .allow
            .permits("127.0.0.1".parse().unwrap()));
        assert_eq!(c.listeners.osmand.allow.networks().len(), 2);
        let err = Config::default()
            .apply_env(|k| (k == "EM_GT06_ALLOW").then(|| "nope".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("EM_GT06_ALLOW"), "{err}");
    }

    #[test]
    fn mqtt_url_parsing() {
        assert_eq!(
            MqttUrl::parse("mqtt://127.0.0.1").unwrap(),
            MqttUrl {
                host: "127.0.0.1".into(),
                port: 1883,
                username: None,
                password: None
            }
        );
        let u = MqttUrl::parse("mqtt://ingest:s3cret@broker.local:8883/").unwrap();
        assert_eq!(u.host, "broker.local");
        assert_eq!(u.port, 8883);
        assert_eq!(u.username.as_deref(), Some("ingest"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(MqttUrl::parse("mqtt://[::1]:1884").unwrap().host, "::1");
        assert!(MqttUrl::parse("mqtt://host:0").is_err());
        assert!(MqttUrl::parse("mqtt://host:abc").is_err());
        assert!(MqttUrl::parse("ws://host").is_err());
        assert!(MqttUrl::parse("mqtt://").is_err());
    }

    #[test]
    fn an_external_client_of_the_embedded_endpoint_is_refused() {
        let mut c = Config::embedded();
        c.mqtt.enabled = true;
        c.mqtt.url = "mqtt://localhost:18830".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("embedded MQTT endpoint"), "{err}");
        c.mqtt.url = "mqtt://broker.example:18830".into();
        c.validate().expect("an external broker is fine");
        c.mqtt.broker.feed_password = Some("short".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("feed_password"));
        let u = MqttUrl::parse("mqtt://127.0.0.1:18830").unwrap();
        assert!(u.is_address(SocketAddr::from(([0, 0, 0, 0], 18830))));
        assert!(!u.is_address(SocketAddr::from(([127, 0, 0, 1], 1883))));
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("sqlite://./x.db"), "sqlite://./x.db");
    }
}
