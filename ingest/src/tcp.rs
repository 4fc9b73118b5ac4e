//! TCP device listeners (GT06, Teltonika, H02).
//!
//! ONE task per connection, and no read buffer while the tag is quiet: an idle device costs
//! one small task and its socket (see the README's load figures). The task reads frames
//! through the protocol codec (`tokio_util::codec::FramedRead`), checks the device against the
//! registry at its login / IMEI ([`Registry::admit`]: registered, active, and registered for
//! THIS protocol; nothing is accepted before), queues each frame's records in the pipeline
//! and keeps the frame's "stored" receiver, in order, in a small queue. It waits on the oldest
//! receiver and the socket at the same time: when a frame's records are durably stored it
//! writes that frame's protocol acknowledgement (GT06 response, Teltonika record count); a
//! storage failure closes the connection without the ACK, so the device keeps the data and
//! sends it again. Reading may run ahead of the ACKs by a bounded number of frames, so a
//! device that streams frames is not slowed to one store round-trip per frame, and memory
//! stays bounded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use em_model::{Protocol, Record};
use em_protocols::{gt06, h02, teltonika, CodecError, DecodeError};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AllowList;
use crate::limits::{ConnectionLimiter, ConnectionPermit};
use crate::metrics as m;
use crate::pipeline::{IngestError, Pipeline, Stored};
use crate::registry::{Credential, Refusal, Registry};

/// Frames a connection may have queued (stored or not) ahead of their ACK.
const MAX_PENDING_FRAMES: usize = 64;
/// Read-buffer capacity taken when data arrives. Tags send frames of tens of bytes (a
/// Teltonika packet of 20 records is ~1 KiB); the buffer grows on demand for larger frames
/// and is released whenever no partial frame is held (the codec default of 8 KiB per
/// connection dominated the memory of idle devices).
const READ_BUFFER_INITIAL: usize = 256;
/// Accept backlog of the device listeners.
const LISTEN_BACKLOG: u32 = 4096;
/// Decode errors logged at WARN per connection; further ones go to DEBUG (still counted).
const MAX_WARN_LOGS: u32 = 10;

/// Settings shared by the TCP listeners.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    pub idle_timeout: Duration,
    pub login_timeout: Duration,
    /// 0 = codec default.
    pub max_frame_bytes: usize,
    pub max_connections_per_ip: usize,
    pub max_connections: usize,
    /// Source networks allowed to connect (empty = any); others are closed before any read.
    pub allow: AllowList,
}

/// What the connection does with one decoded frame.
pub struct Step {
    /// Device named by this frame (login / IMEI handshake / H02's per-frame IMEI).
    pub identifies: Option<String>,
    /// True when this frame is the login itself (only then a refusal reply is sent).
    pub is_login: bool,
    pub records: Vec<Record>,
    /// Written after the records are stored.
    pub reply: Option<Bytes>,
    /// Written instead when the device is refused at login.
    pub reject_reply: Option<Bytes>,
    /// Short frame kind, for logs.
    pub kind: &'static str,
}

/// A device protocol spoken over TCP.
pub trait TcpProtocol: Send + Sync + 'static {
    type Frame: Send;
    type Codec: Decoder<Item = Result<Self::Frame, DecodeError>, Error = CodecError>
        + Send
        + Unpin
        + 'static;
    const PROTOCOL: Protocol;
    fn codec(max_frame_bytes: usize) -> Self::Codec;
    /// Interprets a frame; `device` is the device identified on this connection so far.
    fn step(frame: Self::Frame, device: Option<&str>) -> Step;
}

pub struct Gt06;
pub struct Teltonika;
pub struct H02;

impl TcpProtocol for Gt06 {
    type Frame = gt06::Gt06Frame;
    type Codec = gt06::Gt06Codec;
    const PROTOCOL: Protocol = Protocol::Gt06;

    fn codec(max: usize) -> Self::Codec {
        let c = gt06::Gt06Codec::new();
        if max > 0 {
            c.with_max_frame_len(max)
        } else {
            c
        }
    }

    fn step(frame: Self::Frame, device: Option<&str>) -> Step {
        let now = Utc::now();
        let kind = frame.kind();
        let reply = frame.response();
        match &frame.message {
            gt06::Gt06Message::Login { imei, .. } => {
                let id = imei.to_string();
                Step {
                    records: frame.to_records(&id, now),
                    identifies: Some(id),
                    is_login: true,
                    reply,
                    reject_reply: None,
                    kind,
                }
            }
            _ => Step {
                records: device.map_or_else(Vec::new, |d| frame.to_records(d, now)),
                identifies: None,
                is_login: false,
                reply,
                reject_reply: None,
                kind,
            },
        }
    }
}

impl TcpProtocol for Teltonika {
    type Frame = teltonika::TeltonikaFrame;
    type Codec = teltonika::TeltonikaCodec;
    const PROTOCOL: Protocol = Protocol::Teltonika;

    fn codec(max: usize) -> Self::Codec {
        let c = teltonika::TeltonikaCodec::new();
        if max > 0 {
            c.with_max_packet_len(max)
        } else {
            c
        }
    }

    fn step(frame: Self::Frame, device: Option<&str>) -> Step {
        let now = Utc::now();
        let kind = frame.kind();
        if let teltonika::TeltonikaFrame::AvlPartial(p) = &frame {
            // Out-of-range records are dropped and counted; the packet is ACKed in full so
            // the device does not resend it forever.
            m::records_rejected(Protocol::Teltonika, "out_of_range", p.rejected.len() as u64);
            tracing::warn!(protocol = %Protocol::Teltonika, device = device, rejected = ?p.rejected,
                "AVL records out of range dropped");
        }
        match &frame {
            teltonika::TeltonikaFrame::Imei(imei) => Step {
                records: frame.to_records(imei, now),
                identifies: Some(imei.clone()),
                is_login: true,
                reply: Some(teltonika::imei_response(true)),
                reject_reply: Some(teltonika::imei_response(false)),
                kind,
            },
            _ => Step {
                records: device.map_or_else(Vec::new, |d| frame.to_records(d, now)),
                identifies: None,
                is_login: false,
                reply: frame.response(),
                reject_reply: None,
                kind,
            },
        }
    }
}

impl TcpProtocol for H02 {
    type Frame = h02::H02Frame;
    type Codec = h02::H02Codec;
    const PROTOCOL: Protocol = Protocol::H02;

    fn codec(max: usize) -> Self::Codec {
        let c = h02::H02Codec::new();
        if max > 0 {
            c.with_max_frame_len(max)
        } else {
            c
        }
    }

    fn step(frame: Self::Frame, device: Option<&str>) -> Step {
        // H02 has no login: every frame carries the IMEI, the first one identifies the device.
        let now = Utc::now();
        let id = frame.device_id().to_owned();
        Step {
            records: frame.to_records(&id, now),
            is_login: device.is_none(),
            identifies: Some(id),
            reply: frame.response(),
            reject_reply: None,
            kind: frame.kind(),
        }
    }
}

/// A bound TCP listener, ready to serve.
pub struct TcpServer<P: TcpProtocol> {
    listener: TcpListener,
    _p: std::marker::PhantomData<P>,
}

impl<P: TcpProtocol> TcpServer<P> {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Self::bind_with(addr, false).await
    }

    /// Binds with `SO_REUSEADDR` (restart while old connections linger in TIME_WAIT) and,
    /// when `reuse_port`, `SO_REUSEPORT` (several processes share the port). The accept
    /// backlog is [`LISTEN_BACKLOG`] so a reconnect storm after an outage is queued, not
    /// refused (the kernel caps it at `net.core.somaxconn`).
    pub async fn bind_with(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Self> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuse_port {
            #[cfg(all(unix, not(target_os = "solaris"), not(target_os = "illumos")))]
            socket.set_reuseport(true)?;
            #[cfg(not(all(unix, not(target_os = "solaris"), not(target_os = "illumos"))))]
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "listeners.reuse_port is not supported on this platform",
            ));
        }
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        Ok(TcpServer {
            listener,
            _p: std::marker::PhantomData,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown`; connection tasks are spawned on `tracker` and
    /// stop reading at `shutdown` (their queued ACKs are still written).
    pub async fn serve(
        self,
        settings: TcpSettings,
        pipeline: Pipeline,
        registry: Registry,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let proto = P::PROTOCOL;
        let limiter =
            ConnectionLimiter::new(settings.max_connections_per_ip, settings.max_connections);
        let shared = Arc::new(Shared {
            settings,
            pipeline,
            registry,
            shutdown: shutdown.clone(),
        });
        tracing::info!(protocol = %proto, addr = ?self.listener.local_addr().ok(), "device listener started");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(protocol = %proto, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !shared.settings.allow.permits(peer.ip()) {
                // IMEI-only protocols: the network is the control. Nothing is read.
                let refusal = Refusal::SourceNotAllowed;
                m::device_rejected(proto, refusal.as_str());
                tracing::warn!(protocol = %proto, %peer, reason = %refusal,
                    "connection refused: source not in the listener's allow list");
                drop(stream);
                continue;
            }
            let permit = match limiter.try_acquire(peer.ip()) {
                Ok(p) => p,
                Err(limit) => {
                    m::connection_refused(proto, limit.as_str());
                    tracing::warn!(protocol = %proto, %peer, reason = limit.as_str(),
                        "connection refused: limit reached");
                    drop(stream);
                    continue;
                }
            };
            let conn = Connection::<P> {
                peer,
                shared: shared.clone(),
                _permit: permit,
                _p: std::marker::PhantomData,
            };
            tracker.spawn(conn.run(stream));
        }
        tracing::info!(protocol = %proto, "device listener stopped accepting");
    }
}

/// What every connection of a listener shares (one pointer per connection).
struct Shared {
    settings: TcpSettings,
    pipeline: Pipeline,
    registry: Registry,
    shutdown: CancellationToken,
}

/// One device connection: everything it owns lives in its single task.
struct Connection<P: TcpProtocol> {
    peer: SocketAddr,
    shared: Arc<Shared>,
    _permit: ConnectionPermit,
    _p: std::marker::PhantomData<P>,
}

/// A frame queued for storage whose ACK is not written yet, in frame order.
struct Pending {
    stored: Stored,
    reply: Option<Bytes>,
}

enum Stop {
    Eof,
    Idle,
    LoginTimeout,
    Shutdown,
    Fatal,
    Refused,
    /// Records not stored (or the pipeline closed): no ACK, the device re-sends.
    NotStored,
    WriteFailed,
}

impl Stop {
    fn as_str(&self) -> &'static str {
        match self {
            Stop::Eof => "eof",
            Stop::Idle => "idle_timeout",
            Stop::LoginTimeout => "login_timeout",
            Stop::Shutdown => "shutdown",
            Stop::Fatal => "fatal_decode_error",
            Stop::Refused => "refused",
            Stop::NotStored => "not_stored",
            Stop::WriteFailed => "write_failed",
        }
    }
}

/// What woke the connection task.
enum Wake<T> {
    Shutdown,
    /// The oldest pending frame finished storing.
    Stored(Result<(), IngestError>),
    Read(Result<Option<T>, tokio::time::error::Elapsed>),
}

type Frames<P> = FramedRead<TcpStream, <P as TcpProtocol>::Codec>;
type Item<P> = Result<Result<<P as TcpProtocol>::Frame, DecodeError>, CodecError>;

impl<P: TcpProtocol> Connection<P> {
    async fn run(self, stream: TcpStream) {
        let proto = P::PROTOCOL;
        m::connection_opened(proto);
        let _ = stream.set_nodelay(true);
        // No read buffer until the device sends something (see `next_item`).
        let mut frames: Frames<P> =
            FramedRead::with_capacity(stream, P::codec(self.shared.settings.max_frame_bytes), 0);
        // Empty until the first frame: an idle device holds no allocation here.
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let connected = tokio::time::Instant::now();
        let mut device: Option<String> = None;
        let mut warn_logs = 0u32;

        let stop = loop {
            let deadline = if device.is_none() {
                (connected + self.shared.settings.login_timeout)
                    .min(tokio::time::Instant::now() + self.shared.settings.idle_timeout)
            } else {
                tokio::time::Instant::now() + self.shared.settings.idle_timeout
            };
            let can_read = pending.len() < MAX_PENDING_FRAMES;
            let wake: Wake<Item<P>> = tokio::select! {
                biased;
                _ = self.shared.shutdown.cancelled() => Wake::Shutdown,
                r = oldest(&mut pending), if !pending.is_empty() => Wake::Stored(r),
                r = tokio::time::timeout_at(deadline, next_item::<P>(&mut frames)), if can_read => Wake::Read(r),
            };
            let item = match wake {
                Wake::Shutdown => break Stop::Shutdown,
                // Boxed (one allocation per ACK): awaited inline, the write future would enlarge
                // every connection's task, idle ones included.
                Wake::Stored(r) => {
                    match Box::pin(self.acknowledge(&mut frames, &mut pending, r)).await {
                        Ok(()) => continue,
                        Err(stop) => break stop,
                    }
                }
                Wake::Read(Err(_)) if device.is_none() => break Stop::LoginTimeout,
                Wake::Read(Err(_)) => break Stop::Idle,
                Wake::Read(Ok(None)) => break Stop::Eof,
                Wake::Read(Ok(Some(item))) => item,
            };
            // Everything done with a frame runs in one boxed future (one allocation per
            // frame): held inline, its state (decoded frame, step, registry look-up, queueing)
            // would enlarge every connection's task, idle ones included.
            let handled = Box::pin(self.on_item(
                item,
                &mut device,
                &mut warn_logs,
                &mut frames,
                &mut pending,
            ))
            .await;
            if let Err(stop) = handled {
                break stop;
            }
        };
        let reason = stop.as_str();
        if matches!(stop, Stop::LoginTimeout) {
            m::device_rejected(proto, "no_login");
        }
        // Write the ACKs of everything already queued (the pipeline drains its queues at
        // shutdown, so this ends), unless the socket or the store already failed.
        if !matches!(stop, Stop::NotStored | Stop::WriteFailed) {
            Box::pin(self.drain(&mut frames, &mut pending)).await;
        }
        let _ = Box::pin(frames.get_mut().shutdown()).await;
        tracing::debug!(protocol = %proto, peer = %self.peer, device = device.as_deref(), reason,
            "connection closed");
        m::connection_closed(proto);
    }

    /// Handles one item read from the socket: a frame (login check, queueing its records and
    /// its pending ACK) or a decode error. `Err` ends the connection.
    async fn on_item(
        &self,
        item: Item<P>,
        device: &mut Option<String>,
        warn_logs: &mut u32,
        frames: &mut Frames<P>,
        pending: &mut VecDeque<Pending>,
    ) -> Result<(), Stop> {
        let proto = P::PROTOCOL;
        let frame = match item {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => {
                m::decode_error(proto, e.reason());
                if let DecodeError::UnknownType { kind, .. } = &e {
                    m::unknown_message_type(proto, kind);
                }
                log_decode(warn_logs, proto, self.peer, device.as_deref(), &e, false);
                return Ok(());
            }
            Err(CodecError::Fatal(e)) => {
                m::decode_error(proto, e.reason());
                log_decode(warn_logs, proto, self.peer, device.as_deref(), &e, true);
                return Err(Stop::Fatal);
            }
            Err(CodecError::Io(e)) => {
                tracing::debug!(protocol = %proto, peer = %self.peer, device = device.as_deref(),
                    error = %e, "connection read error");
                return Err(Stop::Eof);
            }
        };
        m::frame(proto);
        let step = P::step(frame, device.as_deref());

        if let Some(id) = step.identifies.as_deref() {
            match device.as_deref() {
                Some(current) if current != id => {
                    m::device_rejected(proto, "id_changed");
                    tracing::warn!(protocol = %proto, peer = %self.peer, device = current,
                        claimed = id, "device id changed mid-connection; closing");
                    return Err(Stop::Refused);
                }
                Some(_) => {}
                None => match self
                    .shared
                    .registry
                    .admit(id, proto, Credential::None)
                    .await
                {
                    Ok(Ok(_)) => {
                        tracing::debug!(protocol = %proto, peer = %self.peer, device = id, "device logged in");
                        *device = Some(id.to_owned());
                    }
                    Ok(Err(refusal)) => {
                        m::device_rejected(proto, refusal.as_str());
                        tracing::warn!(protocol = %proto, peer = %self.peer, device = id,
                            reason = %refusal, "device refused");
                        if step.is_login {
                            if let Some(reply) = step.reject_reply {
                                // Earlier frames' ACKs first (none before a login, but keep
                                // the order rule in one place).
                                self.drain(frames, pending).await;
                                let _ = frames.get_mut().write_all(&reply).await;
                            }
                        }
                        return Err(Stop::Refused);
                    }
                    Err(e) => {
                        tracing::error!(protocol = %proto, peer = %self.peer, device = id,
                            error = %e, "registry look-up failed; closing (device will retry)");
                        return Err(Stop::Refused);
                    }
                },
            }
        }
        if device.is_none() {
            // Data before login: the codecs report this as an error already; anything
            // else that slips through is dropped the same way.
            m::decode_error(proto, "not_logged_in");
            return Ok(());
        }

        let Ok(stored) = self.shared.pipeline.submit_frame(step.records).await else {
            return Err(Stop::Shutdown);
        };
        tracing::trace!(protocol = %proto, device = device.as_deref(), kind = step.kind, "frame queued");
        pending.push_back(Pending {
            stored,
            reply: step.reply,
        });
        Ok(())
    }

    /// The oldest pending frame is stored (or failed): write its ACK, and those of the frames
    /// after it that are already stored.
    async fn acknowledge(
        &self,
        frames: &mut Frames<P>,
        pending: &mut VecDeque<Pending>,
        first: Result<(), IngestError>,
    ) -> Result<(), Stop> {
        let mut result = first;
        loop {
            let Some(p) = pending.pop_front() else {
                return Ok(());
            };
            if let Err(e) = result {
                if e != IngestError::Closed {
                    tracing::warn!(protocol = %P::PROTOCOL, peer = %self.peer, error = %e,
                        "records not stored; closing without ACK (device will re-send)");
                }
                return Err(Stop::NotStored);
            }
            if let Some(reply) = p.reply {
                if let Err(e) = frames.get_mut().write_all(&reply).await {
                    tracing::debug!(protocol = %P::PROTOCOL, peer = %self.peer, error = %e, "ACK write failed");
                    return Err(Stop::WriteFailed);
                }
            }
            // Next one only if it is already done; otherwise back to the select.
            let Some(next) = pending.front_mut() else {
                return Ok(());
            };
            result = match next.stored.try_recv() {
                Ok(r) => r,
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => Err(IngestError::Closed),
            };
        }
    }

    /// Waits for every pending frame in order and writes its ACK; stops at the first failure.
    async fn drain(&self, frames: &mut Frames<P>, pending: &mut VecDeque<Pending>) {
        while !pending.is_empty() {
            let r = oldest(pending).await;
            if self.acknowledge(frames, pending, r).await.is_err() {
                return;
            }
        }
    }
}

/// Next item from the socket. While no partial frame is buffered, the connection holds NO
/// read buffer: it waits for readability first and only then takes a small buffer (which
/// grows on demand for larger frames), so a quiet tag costs no buffer at all.
async fn next_item<P: TcpProtocol>(frames: &mut Frames<P>) -> Option<Item<P>> {
    if frames.read_buffer().is_empty() {
        *frames.read_buffer_mut() = BytesMut::new();
        // An error here (socket gone) is reported by the read that follows.
        // `poll_read_ready` rather than `readable()`: its future is a few bytes, not ~150,
        // and it sits in every idle connection's task.
        let stream = frames.get_ref();
        let _ = std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await;
        frames.read_buffer_mut().reserve(READ_BUFFER_INITIAL);
    }
    frames.next().await
}

/// Waits until the oldest pending frame is stored (or failed). Pending forever when empty
/// (callers guard on that).
async fn oldest(pending: &mut VecDeque<Pending>) -> Result<(), IngestError> {
    match pending.front_mut() {
        Some(p) => (&mut p.stored).await.unwrap_or(Err(IngestError::Closed)),
        None => std::future::pending().await,
    }
}

fn log_decode(
    count: &mut u32,
    proto: Protocol,
    peer: SocketAddr,
    device: Option<&str>,
    e: &DecodeError,
    fatal: bool,
) {
    *count += 1;
    if *count <= MAX_WARN_LOGS || fatal {
        tracing::warn!(protocol = %proto, %peer, device, reason = e.reason(), fatal, error = %e,
            "malformed frame");
    } else {
        tracing::debug!(protocol = %proto, %peer, device, reason = e.reason(), fatal, error = %e,
            "malformed frame");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reuse_port_lets_two_processes_share_a_listener_port() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let first = TcpServer::<Gt06>::bind_with(any, true).await.expect("bind");
        let addr = first.local_addr().expect("addr");
        // Without SO_REUSEPORT on both, the port is taken.
        let plain = TcpServer::<Gt06>::bind_with(addr, false).await;
        assert!(plain.is_err(), "second plain bind must fail");
        let second = TcpServer::<Gt06>::bind_with(addr, true)
            .await
            .expect("second SO_REUSEPORT bind shares the port");
        assert_eq!(second.local_addr().expect("addr"), addr);
        // Both accept: connections are spread by the kernel; at least one of them gets one.
        let mut clients = Vec::new();
        for _ in 0..16 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let accepted = async {
            let mut n = 0;
            for _ in 0..16 {
                tokio::select! {
                    r = first.listener.accept() => { r.expect("accept"); }
                    r = second.listener.accept() => { r.expect("accept"); }
                }
                n += 1;
            }
            n
        };
        let n = tokio::time::timeout(Duration::from_secs(5), accepted)
            .await
            .expect("accepted in time");
        assert_eq!(n, 16);
    }
}
#[cfg(test)]
mod size_tests {
    use super::*;

    /// The task of an idle connection is the bulk of its memory (with the 256-byte read
    /// buffer and the socket's registration). Large per-frame state must stay out of it
    /// (boxed), or every idle device pays for it.
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let store = em_store::testing::sqlite_store().await;
        let registry = Registry::load(store.clone()).await.expect("registry");
        let (pipeline, _workers) =
            Pipeline::start(&Default::default(), store, registry.clone(), |_| {
                Box::new(crate::pipeline::NoopProcessor)
            });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            settings: TcpSettings {
                idle_timeout: Duration::from_secs(1),
                login_timeout: Duration::from_secs(1),
                max_frame_bytes: 0,
                max_connections_per_ip: 0,
                max_connections: 0,
                allow: AllowList::default(),
            },
            pipeline,
            registry,
            shutdown: CancellationToken::new(),
        });
        let limiter = ConnectionLimiter::new(0, 0);
        let gt06 = Connection::<Gt06> {
            peer: addr,
            shared: shared.clone(),
            _permit: limiter.try_acquire(addr.ip()).expect("permit"),
            _p: std::marker::PhantomData,
        }
        .run(TcpStream::connect(addr).await.expect("connect"));
        let telt = Connection::<Teltonika> {
            peer: addr,
            shared,
            _permit: limiter.try_acquire(addr.ip()).expect("permit"),
            _p: std::marker::PhantomData,
        }
        .run(TcpStream::connect(addr).await.expect("connect"));
        let (a, b) = (std::mem::size_of_val(&gt06), std::mem::size_of_val(&telt));
        eprintln!("connection task future: GT06 {a} bytes, Teltonika {b} bytes");
        assert!(
            a <= 900 && b <= 900,
            "connection future grew: {a} / {b} bytes"
        );
    }
}
