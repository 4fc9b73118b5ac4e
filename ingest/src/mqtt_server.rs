//! The embedded MQTT endpoint (`[mqtt.broker]`): an MQTT 3.1.1 server inside `em` that
//! devices speaking the open EM protocol connect to directly, so the embedded default gives
//! the same promise as the TCP listeners: **a device's PUBACK is written only after the
//! message's records are durably stored** (the pipeline's completion). Nothing is held in
//! memory on the device's behalf, so a kill -9 loses nothing a device saw acknowledged: what
//! was not acknowledged, the device sends again.
//!
//! Packets are framed and decoded with the MQTT 3.1.1 codec of `rumqttc`
//! (`rumqttc::mqttbytes::v4`); the EM payloads go through the same decoder and pipeline as the
//! MQTT subscriber (`crate::mqtt`).
//!
//! - **CONNECT**: username = device id, password = the device's secret, checked by the device
//!   registry ([`admit_device`], the one admission call). A device without a secret cannot
//!   connect. Refusals get CONNACK 5 "not authorised" (3 "server unavailable" when the registry
//!   cannot be read; 1 for MQTT 3.1 / 5 clients) and are counted
//!   (`em_devices_rejected_total{protocol="em",reason}`) and logged with the reason. Service
//!   clients (e.g. a consumer of the alert feed) log in as the configured feed user. A second
//!   connection of the same device replaces the first. Sessions are not kept after a
//!   connection ends (CONNACK `session_present` is always 0); last-will messages are ignored.
//! - **PUBLISH** (QoS 0, 1 and 2) from a device, only on its own `em/v1/{id}/…` topics: QoS 1
//!   is PUBACKed (QoS 2 PUBRECed) in order, each after its records are stored. A store failure
//!   closes the connection without the acknowledgement (the device re-sends). Messages that can
//!   never be stored — malformed, oversized payload, another device's topic, any publish by the
//!   feed user — are acknowledged and dropped, counted (`em_mqtt_messages_total{result}`) and
//!   logged, as MQTT 3.1.1 allows (§3.3.5: acknowledge or disconnect), so the connection of a
//!   device that sent one bad message stays up. A packet that breaks the MQTT framing (or is
//!   larger than twice `mqtt.max_payload_bytes`) closes the connection, as the standard
//!   requires.
//! - **SUBSCRIBE / UNSUBSCRIBE** with `+`/`#` wildcards: the feed user may subscribe to any
//!   filter, a device only below `em/v1/{its id}/`. Subscribers receive what the service itself
//!   publishes through [`Router::publish`] — the alert feed `em/v1/alerts/{subject}/{kind}` —
//!   at QoS 0 or 1 (QoS 2 is granted as 1). Device messages are not forwarded to subscribers
//!   (a victim's tag reports positions; they never leave the store through a feed).
//! - Keep-alive (1.5 × the client's value; the listeners' idle timeout when it is 0),
//!   PINGREQ/PINGRESP, DISCONNECT; the same connection limits and login timeout as the TCP
//!   listeners (`[listeners]`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use em_model::{Device, Protocol};
use em_protocols::em;
use em_store::StoreError;
use rumqttc::mqttbytes::{self, v4, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::ConnectionLimiter;
use crate::metrics as m;
use crate::pipeline::{IngestError, Pipeline, Stored};
use crate::registry::{Credential, Registry};

const P: Protocol = Protocol::Em;
/// Messages a connection may have queued for storage ahead of their acknowledgement; past
/// this the connection stops reading (backpressure to the device).
const MAX_PENDING: usize = 64;
/// Deliveries queued for one subscriber; a subscriber that falls further behind loses
/// notices (counted), it never slows the service.
const DELIVERY_QUEUE: usize = 1024;
/// A write to a client that does not read for this long closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the endpoint (from `[mqtt]`, `[mqtt.broker]` and `[listeners]`).
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    /// A client must send CONNECT within this time.
    pub login_timeout: Duration,
    /// Silence allowed when the client asks for no keep-alive (keep-alive 0).
    pub idle_timeout: Duration,
    pub max_connections_per_ip: usize,
    pub max_connections: usize,
    /// Larger payloads are acknowledged and dropped; packets over twice this close the
    /// connection.
    pub max_payload_bytes: usize,
    /// The service-client login (subscribe only), if any.
    pub feed: Option<FeedLogin>,
}

/// Username and password of the feed user.
#[derive(Clone, PartialEq, Eq)]
pub struct FeedLogin {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for FeedLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedLogin")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Admission of a device connecting to the embedded endpoint: THE one call into the device
/// registry for MQTT logins (switch it here when the registry's admission API changes). The
/// device must be registered, active and have a secret, and `password` must be that secret.
/// `Ok(Err(reason))` is a refusal, with the reason used in logs and metrics.
pub async fn admit_device(
    registry: &Registry,
    device_id: &str,
    password: &str,
) -> Result<Result<Device, &'static str>, StoreError> {
    // The one admission rule of every device entry point: registered, active, registered for
    // THIS protocol, and (EM devices always have one) presenting their secret.
    Ok(
        match registry
            .admit(device_id, Protocol::Em, Credential::Secret(password))
            .await?
        {
            Ok(dev) => Ok(dev),
            Err(refusal) => Err(refusal.as_str()),
        },
    )
}

// -------------------------------------------------------------------------------------------
// Routing of the service's own publications to subscribers
// -------------------------------------------------------------------------------------------

/// One message for a subscriber.
#[derive(Debug, Clone)]
struct Delivery {
    topic: Arc<str>,
    payload: Bytes,
    qos: QoS,
}

struct Subscriber {
    filters: Vec<(String, QoS)>,
    tx: mpsc::Sender<Delivery>,
}

/// Subscriptions of the connected clients; cheap to clone. [`Router::publish`] delivers a
/// message to every client with a matching filter (`+` and `#` wildcards).
#[derive(Clone, Default)]
pub struct Router {
    subscribers: Arc<RwLock<HashMap<u64, Subscriber>>>,
}

impl Router {
    /// Delivers `payload` on `topic` to every matching subscriber (once per subscriber, at the
    /// highest QoS of its matching filters, capped by `qos`); returns how many got it.
    pub fn publish(&self, topic: &str, payload: Bytes, qos: QoS) -> usize {
        let subs = self.subscribers.read().unwrap_or_else(|e| e.into_inner());
        if subs.is_empty() {
            return 0;
        }
        let topic: Arc<str> = Arc::from(topic);
        let mut delivered = 0;
        for s in subs.values() {
            let best = s
                .filters
                .iter()
                .filter(|(f, _)| mqttbytes::matches(&topic, f))
                .map(|(_, q)| *q)
                .fold(None, |acc: Option<QoS>, q| match acc {
                    Some(a) if a >= q => Some(a),
                    _ => Some(q),
                });
            let Some(granted) = best else { continue };
            let d = Delivery {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: if granted < qos { granted } else { qos },
            };
            match s.tx.try_send(d) {
                Ok(()) => {
                    delivered += 1;
                    m::mqtt_delivery("sent");
                }
                Err(mpsc::error::TrySendError::Full(_)) => m::mqtt_delivery("subscriber_lagging"),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
    }

    fn subscribe(&self, session: u64, tx: &mpsc::Sender<Delivery>, filter: String, qos: QoS) {
        let mut subs = self.subscribers.write().unwrap_or_else(|e| e.into_inner());
        let s = subs.entry(session).or_insert_with(|| Subscriber {
            filters: Vec::new(),
            tx: tx.clone(),
        });
        match s.filters.iter_mut().find(|(f, _)| *f == filter) {
            Some(existing) => existing.1 = qos,
            None => s.filters.push((filter, qos)),
        }
    }

    fn unsubscribe(&self, session: u64, filter: &str) {
        let mut subs = self.subscribers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = subs.get_mut(&session) {
            s.filters.retain(|(f, _)| f != filter);
            if s.filters.is_empty() {
                subs.remove(&session);
            }
        }
    }

    fn remove(&self, session: u64) {
        self.subscribers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session);
    }
}

/// Publishes every alert change of the change log (made on any instance) on
/// `em/v1/alerts/{subject}/{kind}` (QoS 1) to this endpoint's subscribers, from now on, until
/// `shutdown`. Each instance serves its own subscribers, so each reads the log itself.
pub async fn forward_alerts(
    router: Router,
    feed: std::sync::Arc<em_store::ChangeFeed>,
    shutdown: CancellationToken,
) {
    let mut notices = em_alerts::AlertNotices::new(feed.follow_live());
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            n = notices.next() => n,
        };
        match next {
            Ok((_, n)) => {
                let topic = em_alerts::alert_topic(n.alert.subject_id, n.alert.kind);
                match serde_json::to_vec(&n) {
                    Ok(payload) => {
                        router.publish(&topic, Bytes::from(payload), QoS::AtLeastOnce);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot serialise alert notice"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "embedded MQTT alert feed cannot read the change log; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
// Listener
// -------------------------------------------------------------------------------------------

/// The bound endpoint, ready to serve.
pub struct MqttEndpoint {
    listener: TcpListener,
    router: Router,
}

impl MqttEndpoint {
    /// Binds (with `SO_REUSEADDR`, so a restart is not refused while old connections linger).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(MqttEndpoint {
            listener: socket.listen(1024)?,
            router: Router::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The publishing handle (for the alert feed).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Accepts clients until `shutdown`; connection tasks run on `tracker`, stop reading at
    /// `shutdown` and still write the acknowledgements of what they queued.
    pub async fn serve(
        self,
        settings: EndpointSettings,
        pipeline: Pipeline,
        registry: Registry,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let limiter =
            ConnectionLimiter::new(settings.max_connections_per_ip, settings.max_connections);
        let shared = Arc::new(Shared {
            max_packet: settings.max_payload_bytes.saturating_mul(2) + 1024,
            settings,
            pipeline,
            registry,
            router: self.router.clone(),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown: shutdown.clone(),
        });
        tracing::info!(addr = ?self.listener.local_addr().ok(), "embedded MQTT endpoint listening");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(protocol = %P, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = match limiter.try_acquire(peer.ip()) {
                Ok(p) => p,
                Err(limit) => {
                    m::connection_refused(P, limit.as_str());
                    tracing::warn!(protocol = %P, %peer, reason = limit.as_str(),
                        "connection refused: limit reached");
                    continue;
                }
            };
            let shared = shared.clone();
            tracker.spawn(async move {
                let _permit = permit;
                run_connection(shared, stream, peer).await;
            });
        }
        tracing::info!("embedded MQTT endpoint stopped accepting");
    }
}

struct Shared {
    settings: EndpointSettings,
    max_packet: usize,
    pipeline: Pipeline,
    registry: Registry,
    router: Router,
    /// Live session per device (or feed client id): a new login replaces the old one.
    sessions: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_id: AtomicU64,
    shutdown: CancellationToken,
}

/// Who is logged in on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Device(String),
    Feed,
}

impl Role {
    fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Role::Feed => true,
            Role::Device(id) => filter
                .strip_prefix("em/v1/")
                .and_then(|r| r.strip_prefix(id.as_str()))
                .is_some_and(|r| r.starts_with('/')),
        }
    }

    fn device(&self) -> Option<&str> {
        match self {
            Role::Device(id) => Some(id),
            Role::Feed => None,
        }
    }
}

#[derive(Debug)]
enum ReadError {
    Eof,
    Io(std::io::Error),
    TooLarge(usize),
    Malformed(mqttbytes::Error),
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Eof,
    KeepAlive,
    Disconnect,
    Shutdown,
    TakenOver,
    ProtocolError,
    NotStored,
    WriteFailed,
}

impl Stop {
    fn as_str(self) -> &'static str {
        match self {
            Stop::Eof => "eof",
            Stop::KeepAlive => "keep_alive_timeout",
            Stop::Disconnect => "disconnect",
            Stop::Shutdown => "shutdown",
            Stop::TakenOver => "taken_over",
            Stop::ProtocolError => "protocol_error",
            Stop::NotStored => "not_stored",
            Stop::WriteFailed => "write_failed",
        }
    }
}

/// A received QoS 1/2 message whose acknowledgement is not written yet, in arrival order.
struct Pending {
    /// None: nothing to store (dropped message), acknowledged in turn.
    stored: Option<Stored>,
    pkid: u16,
    qos: QoS,
}

/// Waits until the oldest pending message is stored (or failed). Pending forever when empty.
async fn oldest(pending: &mut VecDeque<Pending>) -> Result<(), IngestError> {
    match pending.front_mut() {
        Some(Pending {
            stored: Some(rx), ..
        }) => rx.await.unwrap_or(Err(IngestError::Closed)),
        Some(_) => Ok(()),
        None => std::future::pending().await,
    }
}

/// Reads until one whole packet is buffered in `buf` (not decoded yet).
async fn fill_packet(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(), ReadError> {
    loop {
        match mqttbytes::check(buf.iter(), max) {
            Ok(_) => return Ok(()),
            Err(mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n.max(64));
                match stream.read_buf(buf).await {
                    Ok(0) => return Err(ReadError::Eof),
                    Ok(_) => {}
                    Err(e) => return Err(ReadError::Io(e)),
                }
            }
            Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => {
                return Err(ReadError::TooLarge(n))
            }
            Err(e) => return Err(ReadError::Malformed(e)),
        }
    }
}

/// Reads and decodes the next packet.
async fn read_packet(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<v4::Packet, ReadError> {
    fill_packet(stream, buf, max).await?;
    v4::Packet::read(buf, max).map_err(ReadError::Malformed)
}

/// The protocol level of a CONNECT packet buffered at the start of `buf` (4 = MQTT 3.1.1,
/// 3 = MQTT 3.1, 5 = MQTT 5), looked at before decoding so that clients of another version
/// get CONNACK 1 instead of a dropped connection.
fn connect_protocol_level(buf: &[u8]) -> Option<u8> {
    // Fixed header: type byte, then 1..=4 bytes of remaining length.
    let mut i = 1;
    while buf.get(i)? & 0x80 != 0 {
        i += 1;
        if i > 4 {
            return None;
        }
    }
    i += 1;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    buf.get(i + 2 + name_len).copied()
}

/// Encodes and writes one packet (bounded in time).
async fn write_packet(
    stream: &mut TcpStream,
    encode: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>,
) -> Result<(), Stop> {
    let mut out = BytesMut::with_capacity(16);
    if let Err(e) = encode(&mut out) {
        tracing::error!(error = %e, "MQTT packet could not be encoded");
        return Err(Stop::ProtocolError);
    }
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Stop::WriteFailed),
    }
}

async fn run_connection(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    m::connection_opened(P);
    let _ = stream.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mut buf = BytesMut::with_capacity(256);
    if let Some(session) = login(&shared, &mut stream, &mut buf, peer, id).await {
        let stop = Box::pin(session.run(&shared, &mut stream, &mut buf, peer)).await;
        shared.router.remove(id);
        {
            let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if sessions.get(&session.key).map(|(s, _)| *s) == Some(id) {
                sessions.remove(&session.key);
            }
        }
        tracing::debug!(protocol = %P, %peer, device = session.role.device(),
            reason = stop.as_str(), "MQTT connection closed");
    }
    let _ = stream.shutdown().await;
    m::connection_closed(P);
}

fn session_key_of(role: &Role, client_id: &str) -> String {
    match role {
        Role::Device(d) => format!("device:{d}"),
        Role::Feed => format!("feed:{client_id}"),
    }
}

/// A logged-in connection.
struct Session {
    id: u64,
    role: Role,
    /// Key in `Shared::sessions`.
    key: String,
    keep_alive: Duration,
    taken_over: CancellationToken,
}

/// Reads the CONNECT (within the login timeout), authenticates and answers with a CONNACK.
/// None = refused or gone (already answered / counted / logged).
async fn login(
    shared: &Shared,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    peer: SocketAddr,
    id: u64,
) -> Option<Session> {
    let refuse = |reason: &'static str, device: Option<&str>| {
        m::device_rejected(P, reason);
        tracing::warn!(protocol = %P, %peer, device, reason, "MQTT connection refused");
    };
    let filled = tokio::time::timeout(
        shared.settings.login_timeout,
        fill_packet(stream, buf, shared.max_packet),
    )
    .await;
    match filled {
        Err(_) => {
            refuse("no_login", None);
            return None;
        }
        Ok(Err(ReadError::Eof | ReadError::Io(_))) => return None,
        Ok(Err(e)) => {
            m::decode_error(P, "malformed_packet");
            refuse("no_login", None);
            tracing::debug!(%peer, error = ?e, "MQTT: unreadable first packet");
            return None;
        }
        Ok(Ok(())) => {}
    }
    if buf.first().map(|b| b >> 4) == Some(1) {
        match connect_protocol_level(buf) {
            Some(4) => {}
            level => {
                refuse("protocol_version", None);
                tracing::info!(%peer, ?level, "MQTT client of another protocol version (the endpoint speaks MQTT 3.1.1)");
                let ack = v4::ConnAck::new(v4::ConnectReturnCode::RefusedProtocolVersion, false);
                let _ = write_packet(stream, |b| ack.write(b)).await;
                return None;
            }
        }
    }
    let connect = match v4::Packet::read(buf, shared.max_packet) {
        Ok(v4::Packet::Connect(c)) => c,
        Ok(other) => {
            m::decode_error(P, "not_connect");
            refuse("no_login", None);
            tracing::debug!(%peer, packet = ?other, "MQTT: first packet is not CONNECT");
            return None;
        }
        Err(e) => {
            m::decode_error(P, "malformed_packet");
            refuse("no_login", None);
            tracing::debug!(%peer, error = %e, "MQTT: malformed CONNECT");
            return None;
        }
    };
    let refused = |code: v4::ConnectReturnCode| v4::ConnAck::new(code, false);
    let Some(login) = connect.login.as_ref() else {
        refuse("no_credentials", None);
        let ack = refused(v4::ConnectReturnCode::NotAuthorized);
        let _ = write_packet(stream, |b| ack.write(b)).await;
        return None;
    };
    let role = match &shared.settings.feed {
        Some(feed) if feed.username == login.username => {
            if constant_time_eq(feed.password.as_bytes(), login.password.as_bytes()) {
                Role::Feed
            } else {
                refuse("bad_secret", None);
                let ack = refused(v4::ConnectReturnCode::NotAuthorized);
                let _ = write_packet(stream, |b| ack.write(b)).await;
                return None;
            }
        }
        _ => match admit_device(&shared.registry, &login.username, &login.password).await {
            Ok(Ok(dev)) => Role::Device(dev.device_id),
            Ok(Err(reason)) => {
                refuse(reason, Some(&login.username));
                let ack = refused(v4::ConnectReturnCode::NotAuthorized);
                let _ = write_packet(stream, |b| ack.write(b)).await;
                return None;
            }
            Err(e) => {
                tracing::error!(%peer, device = %login.username, error = %e,
                    "registry look-up failed; MQTT login refused (the device will retry)");
                m::device_rejected(P, "registry_unavailable");
                let ack = refused(v4::ConnectReturnCode::ServiceUnavailable);
                let _ = write_packet(stream, |b| ack.write(b)).await;
                return None;
            }
        },
    };
    let mut client_id = connect.client_id.clone();
    if client_id.is_empty() {
        if !connect.clean_session {
            // MQTT 3.1.1 §3.1.3.1: a zero-byte client id needs clean session.
            refuse("bad_client_id", role.device());
            let ack = refused(v4::ConnectReturnCode::BadClientId);
            let _ = write_packet(stream, |b| ack.write(b)).await;
            return None;
        }
        client_id = format!("em-anon-{id}");
    }
    let taken_over = CancellationToken::new();
    let key = session_key_of(&role, &client_id);
    {
        let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, old)) = sessions.insert(key.clone(), (id, taken_over.clone())) {
            old.cancel();
        }
    }
    let ack = v4::ConnAck::new(v4::ConnectReturnCode::Success, false);
    if write_packet(stream, |b| ack.write(b)).await.is_err() {
        return None;
    }
    tracing::debug!(protocol = %P, %peer, device = role.device(), client_id, "MQTT client logged in");
    let keep_alive = if connect.keep_alive > 0 {
        Duration::from_millis(u64::from(connect.keep_alive) * 1500)
    } else {
        shared.settings.idle_timeout
    };
    Some(Session {
        id,
        role,
        key,
        keep_alive,
        taken_over,
    })
}

/// What woke the connection task.
enum Wake {
    Shutdown,
    TakenOver,
    Stored(Result<(), IngestError>),
    Deliver(Delivery),
    Read(Result<Result<v4::Packet, ReadError>, tokio::time::error::Elapsed>),
}

/// Waits for the next delivery; pending forever when the client subscribed to nothing.
async fn next_delivery(rx: &mut Option<mpsc::Receiver<Delivery>>) -> Delivery {
    match rx {
        Some(rx) => match rx.recv().await {
            Some(d) => d,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl Session {
    /// Serves a logged-in client until it leaves; returns why.
    async fn run(
        &self,
        shared: &Shared,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        peer: SocketAddr,
    ) -> Stop {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut deliveries: Option<mpsc::Receiver<Delivery>> = None;
        let mut delivery_tx: Option<mpsc::Sender<Delivery>> = None;
        let mut next_pkid: u16 = 0;
        let mut last_read = Instant::now();
        let stop = loop {
            let can_read = pending.len() < MAX_PENDING;
            let wake = tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => Wake::Shutdown,
                _ = self.taken_over.cancelled() => Wake::TakenOver,
                r = oldest(&mut pending), if !pending.is_empty() => Wake::Stored(r),
                d = next_delivery(&mut deliveries) => Wake::Deliver(d),
                r = tokio::time::timeout_at(last_read + self.keep_alive,
                        read_packet(stream, buf, shared.max_packet)), if can_read => Wake::Read(r),
            };
            let packet = match wake {
                Wake::Shutdown => break Stop::Shutdown,
                Wake::TakenOver => {
                    tracing::info!(protocol = %P, %peer, device = self.role.device(),
                        "MQTT session taken over by a new connection of the same client");
                    break Stop::TakenOver;
                }
                Wake::Stored(r) => match acknowledge(stream, &mut pending, r, peer).await {
                    Ok(()) => continue,
                    Err(stop) => break stop,
                },
                Wake::Deliver(d) => {
                    let pkid = if d.qos == QoS::AtMostOnce {
                        0
                    } else {
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                        next_pkid
                    };
                    let p = v4::Publish {
                        dup: false,
                        qos: d.qos,
                        retain: false,
                        topic: d.topic.to_string(),
                        pkid,
                        payload: d.payload,
                    };
                    match write_packet(stream, |b| p.write(b)).await {
                        Ok(()) => continue,
                        Err(stop) => break stop,
                    }
                }
                Wake::Read(Err(_)) => break Stop::KeepAlive,
                Wake::Read(Ok(Err(ReadError::Eof))) => break Stop::Eof,
                Wake::Read(Ok(Err(ReadError::Io(e)))) => {
                    tracing::debug!(protocol = %P, %peer, device = self.role.device(), error = %e,
                        "MQTT connection read error");
                    break Stop::Eof;
                }
                Wake::Read(Ok(Err(ReadError::TooLarge(n)))) => {
                    m::decode_error(P, "oversized");
                    tracing::warn!(protocol = %P, %peer, device = self.role.device(), len = n,
                        max = shared.max_packet, "MQTT packet too large; closing");
                    break Stop::ProtocolError;
                }
                Wake::Read(Ok(Err(ReadError::Malformed(e)))) => {
                    m::decode_error(P, "malformed_packet");
                    tracing::warn!(protocol = %P, %peer, device = self.role.device(), error = %e,
                        "malformed MQTT packet; closing");
                    break Stop::ProtocolError;
                }
                Wake::Read(Ok(Ok(packet))) => packet,
            };
            last_read = Instant::now();
            let handled = match packet {
                v4::Packet::Publish(p) => {
                    Box::pin(self.on_publish(shared, p, &mut pending, peer)).await
                }
                v4::Packet::PubRel(r) => {
                    let c = v4::PubComp::new(r.pkid);
                    write_packet(stream, |b| c.write(b)).await
                }
                v4::Packet::PingReq => write_packet(stream, |b| v4::PingResp.write(b)).await,
                v4::Packet::Subscribe(s) => {
                    let tx = delivery_tx.get_or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
                        deliveries = Some(rx);
                        tx
                    });
                    let ack = self.on_subscribe(shared, s, tx, peer);
                    write_packet(stream, |b| ack.write(b)).await
                }
                v4::Packet::Unsubscribe(u) => {
                    for t in &u.topics {
                        shared.router.unsubscribe(self.id, t);
                    }
                    let ack = v4::UnsubAck::new(u.pkid);
                    write_packet(stream, |b| ack.write(b)).await
                }
                v4::Packet::Disconnect => Err(Stop::Disconnect),
                // Acknowledgements of our deliveries: nothing is retransmitted (no sessions).
                v4::Packet::PubAck(_) | v4::Packet::PubRec(_) | v4::Packet::PubComp(_) => Ok(()),
                other => {
                    m::decode_error(P, "unexpected_packet");
                    tracing::warn!(protocol = %P, %peer, device = self.role.device(),
                        packet = ?other, "unexpected MQTT packet; closing");
                    Err(Stop::ProtocolError)
                }
            };
            if let Err(stop) = handled {
                break stop;
            }
        };
        // Write the acknowledgements of everything already queued (the pipeline drains at
        // shutdown, so this ends), unless the socket or the store already failed.
        if !matches!(stop, Stop::NotStored | Stop::WriteFailed) {
            while !pending.is_empty() {
                let r = oldest(&mut pending).await;
                if acknowledge(stream, &mut pending, r, peer).await.is_err() {
                    break;
                }
            }
        }
        stop
    }

    /// Handles one PUBLISH: queues its records (the acknowledgement follows the store) or
    /// drops it (acknowledged in turn). `Err` ends the connection.
    async fn on_publish(
        &self,
        shared: &Shared,
        p: v4::Publish,
        pending: &mut VecDeque<Pending>,
        peer: SocketAddr,
    ) -> Result<(), Stop> {
        m::frame(P);
        let stored = match self.accept(shared, &p, peer).await {
            Ok(stored) => Some(stored),
            Err(None) => None,
            Err(Some(stop)) => return Err(stop),
        };
        if p.qos != QoS::AtMostOnce {
            pending.push_back(Pending {
                stored,
                pkid: p.pkid,
                qos: p.qos,
            });
        }
        Ok(())
    }

    /// `Err(None)`: dropped for good (acknowledge it); `Err(Some(stop))`: end the connection.
    async fn accept(
        &self,
        shared: &Shared,
        p: &v4::Publish,
        peer: SocketAddr,
    ) -> Result<Stored, Option<Stop>> {
        let Role::Device(own) = &self.role else {
            m::mqtt_message("forbidden_topic");
            tracing::warn!(protocol = %P, %peer, topic = %p.topic,
                "publish by the feed user (subscribe only); dropped");
            return Err(None);
        };
        if let Ok((device, _)) = em::parse_topic(&p.topic) {
            if device != own.as_str() {
                m::mqtt_message("forbidden_topic");
                m::device_rejected(P, "foreign_topic");
                tracing::warn!(protocol = %P, %peer, device = %own, topic = %p.topic,
                    "device published on another device's topic; dropped");
                return Err(None);
            }
        }
        if p.payload.len() > shared.settings.max_payload_bytes {
            m::decode_error(P, "oversized");
            m::mqtt_message("oversized");
            tracing::warn!(protocol = %P, %peer, device = %own, topic = %p.topic,
                len = p.payload.len(), max = shared.settings.max_payload_bytes,
                "MQTT payload too large; dropped");
            return Err(None);
        }
        let msg = match em::decode(&p.topic, &p.payload) {
            Ok(msg) => msg,
            Err(e) => {
                m::decode_error(P, e.reason());
                m::mqtt_message("malformed");
                tracing::warn!(protocol = %P, %peer, device = %own, topic = %p.topic,
                    reason = e.reason(), error = %e, "malformed EM message; dropped");
                return Err(None);
            }
        };
        // One message (a report or a batch of up to 100) is one frame: one completion.
        match shared
            .pipeline
            .submit_frame(msg.to_records(Utc::now()))
            .await
        {
            Ok(stored) => {
                m::mqtt_message("accepted");
                Ok(stored)
            }
            Err(_) => Err(Some(Stop::Shutdown)),
        }
    }

    fn on_subscribe(
        &self,
        shared: &Shared,
        s: v4::Subscribe,
        tx: &mpsc::Sender<Delivery>,
        peer: SocketAddr,
    ) -> v4::SubAck {
        let codes = s
            .filters
            .into_iter()
            .map(|f| {
                if mqttbytes::valid_filter(&f.path) && self.role.may_subscribe(&f.path) {
                    let qos = if f.qos == QoS::AtMostOnce {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    shared.router.subscribe(self.id, tx, f.path, qos);
                    v4::SubscribeReasonCode::Success(qos)
                } else {
                    m::mqtt_message("subscribe_refused");
                    tracing::warn!(protocol = %P, %peer, device = self.role.device(),
                        filter = %f.path, "MQTT subscription refused");
                    v4::SubscribeReasonCode::Failure
                }
            })
            .collect();
        v4::SubAck::new(s.pkid, codes)
    }
}

/// The oldest pending message is stored (or failed): write its acknowledgement, and those of
/// the messages after it that are already done.
async fn acknowledge(
    stream: &mut TcpStream,
    pending: &mut VecDeque<Pending>,
    first: Result<(), IngestError>,
    peer: SocketAddr,
) -> Result<(), Stop> {
    let mut result = first;
    loop {
        let Some(p) = pending.pop_front() else {
            return Ok(());
        };
        if let Err(e) = result {
            m::mqtt_message("store_failed");
            if e != IngestError::Closed {
                tracing::warn!(protocol = %P, %peer, error = %e,
                    "EM message not stored; closing without PUBACK (the device re-sends)");
            }
            return Err(Stop::NotStored);
        }
        if p.qos == QoS::ExactlyOnce {
            let ack = v4::PubRec::new(p.pkid);
            write_packet(stream, |b| ack.write(b)).await?;
        } else {
            let ack = v4::PubAck::new(p.pkid);
            write_packet(stream, |b| ack.write(b)).await?;
        }
        let Some(next) = pending.front_mut() else {
            return Ok(());
        };
        result = match &mut next.stored {
            None => Ok(()),
            Some(rx) => match rx.try_recv() {
                Ok(r) => r,
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => Err(IngestError::Closed),
            },
        };
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_subscribe_only_below_their_own_topics() {
        let d = Role::Device("tag-1".into());
        assert!(d.may_subscribe("em/v1/tag-1/#"));
        assert!(d.may_subscribe("em/v1/tag-1/cmd"));
        assert!(!d.may_subscribe("em/v1/tag-1"));
        assert!(!d.may_subscribe("em/v1/tag-10/#"));
        assert!(!d.may_subscribe("em/v1/+/telemetry"));
        assert!(!d.may_subscribe("em/v1/alerts/#"));
        assert!(!d.may_subscribe("#"));
        assert!(Role::Feed.may_subscribe("em/v1/alerts/#"));
    }

    #[test]
    fn protocol_level_of_connect() {
        let mut b = BytesMut::new();
        v4::Connect::new("x").write(&mut b).unwrap();
        assert_eq!(connect_protocol_level(&b), Some(4));
        let mut c = v4::Connect::new("x");
        c.protocol = mqttbytes::Protocol::V5;
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        assert_eq!(connect_protocol_level(&b), Some(5));
        // MQTT 3.1: "MQIsdp", level 3.
        let v31 = [
            0x10, 12, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 10, 0, 0,
        ];
        assert_eq!(connect_protocol_level(&v31), Some(3));
        assert_eq!(connect_protocol_level(&[0x10]), None);
        assert_eq!(
            connect_protocol_level(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    #[test]
    fn router_matches_wildcards_once_per_subscriber() {
        let r = Router::default();
        let (tx, mut rx) = mpsc::channel(8);
        r.subscribe(1, &tx, "em/v1/alerts/#".into(), QoS::AtLeastOnce);
        r.subscribe(
            1,
            &tx,
            "em/v1/alerts/+/strap_tamper".into(),
            QoS::AtMostOnce,
        );
        let (tx2, mut rx2) = mpsc::channel(8);
        r.subscribe(2, &tx2, "em/v1/other/#".into(), QoS::AtLeastOnce);
        assert_eq!(
            r.publish(
                "em/v1/alerts/7/strap_tamper",
                Bytes::from_static(b"{}"),
                QoS::AtLeastOnce
            ),
            1
        );
        let d = rx.try_recv().unwrap();
        assert_eq!(&*d.topic, "em/v1/alerts/7/strap_tamper");
        assert_eq!(d.qos, QoS::AtLeastOnce);
        assert!(rx.try_recv().is_err(), "one delivery per subscriber");
        assert!(rx2.try_recv().is_err());
        r.unsubscribe(1, "em/v1/alerts/#");
        r.publish(
            "em/v1/alerts/7/strap_tamper",
            Bytes::from_static(b"{}"),
            QoS::AtLeastOnce,
        );
        assert_eq!(rx.try_recv().unwrap().qos, QoS::AtMostOnce);
        r.remove(1);
        assert_eq!(
            r.publish("em/v1/alerts/7/x", Bytes::new(), QoS::AtLeastOnce),
            0
        );
    }

    #[test]
    fn the_packet_codec_does_not_panic_on_garbage() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..64);
            let mut bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if let Some(b) = bytes.first_mut() {
                // Mostly valid packet types, so the decoders themselves are exercised.
                *b = (rng.gen_range(1u8..=14) << 4) | (*b & 0x0f);
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = connect_protocol_level(&buf);
            let _ = v4::Packet::read(&mut buf, 1024);
        }
    }
}
