//! Device connections of the simulator: GT06 and Teltonika over TCP, the EM protocol over
//! MQTT. Each sends a batch of buffered [`Fix`]es the way the protocol batches them (one
//! Teltonika AVL packet, one EM JSON array per topic, back-to-back GT06 frames in one write),
//! waits for the protocol's acknowledgement and reports which sent reports it confirmed.

use super::behaviour::Report;
use super::MqttEndpoint;
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use em_model::{DeviceEventKind, Protocol};
use em_protocols::em::{EmMessage, EmPayload, EmPosition, EmTopic, TamperState, MAX_BATCH};
use em_protocols::gt06::{
    proto as gt06_proto, Gt06Cell, Gt06Codec, Gt06Frame, Gt06Gps, Gt06Message, Gt06Status, Imei,
};
use em_protocols::teltonika::{
    io as tio, AvlCodec, AvlGps, AvlPacket, AvlRecord, IoElement, IoValue, TeltonikaFrame,
};
use futures::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Framed;

/// Why a device connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("no {0} endpoint configured")]
    NoEndpoint(Protocol),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("login rejected by the server")]
    LoginRejected,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection closed by the server")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("encode: {0}")]
    Encode(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("mqtt: {0}")]
    Mqtt(String),
}

impl ConnError {
    /// Short stable label for counting.
    pub fn label(&self) -> &'static str {
        match self {
            ConnError::NoEndpoint(_) => "no_endpoint",
            ConnError::Connect(_) => "connect",
            ConnError::LoginRejected => "login_rejected",
            ConnError::Timeout(_) => "timeout",
            ConnError::Closed => "closed",
            ConnError::Io(_) => "io",
            ConnError::Encode(_) => "encode",
            ConnError::Protocol(_) => "protocol",
            ConnError::Mqtt(_) => "mqtt",
        }
    }
}

/// One report as the device recorded it: what it observed and when. Devices buffer fixes
/// and send them together ([`super::SimConfig::records_per_packet`]), oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Fix {
    pub report: Report,
    /// Device time of the observation (not of sending).
    pub time: DateTime<Utc>,
}

impl Fix {
    /// Whether the device sends this fix at once instead of buffering it: it should provoke
    /// an alert or carries a device event (alarm records are high priority on real tags).
    pub fn is_urgent(&self) -> bool {
        self.report.expect_alert.is_some() || !self.report.events.is_empty()
    }
}

/// Reports acknowledged together: `reports` reports sent at `sent_at` (one packet, or
/// one batch of GT06 frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    pub sent_at: Instant,
    pub reports: u64,
}

/// What sending one batch put on the wire.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Frames / packets / publications written.
    pub frames: u64,
    pub bytes: u64,
    /// Reports the server explicitly did not accept (Teltonika count lower than sent).
    pub rejected: u64,
}

/// Open a TCP connection from `source` (port chosen by the kernel) to `target`.
pub async fn tcp_connect(
    source: Option<IpAddr>,
    target: SocketAddr,
) -> Result<TcpStream, ConnError> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ConnError::Connect)?;
    if let Some(ip) = source {
        if ip.is_ipv4() == target.is_ipv4() {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(ConnError::Connect)?;
        }
    }
    let stream = socket.connect(target).await.map_err(ConnError::Connect)?;
    stream.set_nodelay(true).map_err(ConnError::Connect)?;
    Ok(stream)
}

/// A connected, logged-in device.
pub enum DeviceConn {
    Gt06(Gt06Conn),
    Teltonika(TeltonikaConn),
    Mqtt(Box<MqttConn>),
}

impl DeviceConn {
    /// Send `fixes` (oldest first) as one batch and wait for the acknowledgement; append the
    /// reports it confirmed to `confirmed` (a GT06 ACK also confirms earlier location frames,
    /// which carry no ACK of their own). `confirmed` is the caller's so that it is reused.
    pub async fn send(
        &mut self,
        fixes: &[Fix],
        ack_timeout: Duration,
        confirmed: &mut Vec<Confirmed>,
    ) -> Result<Sent, ConnError> {
        if fixes.is_empty() {
            return Ok(Sent::default());
        }
        match self {
            DeviceConn::Gt06(c) => c.send(fixes, ack_timeout, confirmed).await,
            DeviceConn::Teltonika(c) => c.send(fixes, ack_timeout, confirmed).await,
            DeviceConn::Mqtt(c) => c.send(fixes, ack_timeout, confirmed).await,
        }
    }

    /// Ask for an acknowledgement of reports sent but not yet confirmed (GT06 locations
    /// since the last heartbeat) and append them to `confirmed`.
    pub async fn confirm_pending(
        &mut self,
        timeout: Duration,
        confirmed: &mut Vec<Confirmed>,
    ) -> Result<(), ConnError> {
        match self {
            DeviceConn::Gt06(c) => c.confirm_pending(timeout, confirmed).await,
            _ => Ok(()),
        }
    }

    /// Wait until `deadline`, keeping the connection alive (MQTT pings).
    pub async fn idle_until(&mut self, deadline: tokio::time::Instant) -> Result<(), ConnError> {
        match self {
            DeviceConn::Mqtt(c) => c.idle_until(deadline).await,
            _ => {
                tokio::time::sleep_until(deadline).await;
                Ok(())
            }
        }
    }

    /// Close the connection politely.
    pub async fn close(self) {
        match self {
            DeviceConn::Gt06(c) => {
                let mut s = c.framed.into_inner();
                let _ = s.shutdown().await;
            }
            DeviceConn::Teltonika(mut c) => {
                let _ = c.stream.shutdown().await;
            }
            DeviceConn::Mqtt(c) => {
                let MqttConn {
                    client,
                    mut eventloop,
                    ..
                } = *c;
                if client.try_disconnect().is_ok() {
                    // Let the eventloop flush the DISCONNECT (bounded).
                    let _ = tokio::time::timeout(Duration::from_millis(200), async {
                        while eventloop.poll().await.is_ok() {}
                    })
                    .await;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// GT06
// ---------------------------------------------------------------------------------------

/// Danish mobile country code, for plausible serving cells.
const MCC_DK: u16 = 238;

pub struct Gt06Conn {
    framed: Framed<TcpStream, Gt06Codec>,
    serial: u16,
    heartbeat_every: u32,
    since_heartbeat: u32,
    /// Location batches written since the last acknowledged frame.
    unconfirmed: Vec<Confirmed>,
    cell: Gt06Cell,
    last_status: Gt06Status,
}

/// Battery percentage to the GT06 0..=6 voltage level (rounded).
pub fn gt06_voltage_level(pct: u8) -> u8 {
    ((u16::from(pct.min(100)) * 6 + 50) / 100) as u8
}

impl Gt06Conn {
    /// Connect and log in as `imei`; waits for the login ACK.
    pub async fn connect(
        source: Option<IpAddr>,
        target: SocketAddr,
        imei: &str,
        heartbeat_every: u32,
        timeout: Duration,
    ) -> Result<Self, ConnError> {
        let imei_v = Imei::parse(imei)
            .ok_or_else(|| ConnError::Protocol(format!("{imei:?} is not a GT06 IMEI")))?;
        let stream = tokio::time::timeout(timeout, tcp_connect(source, target))
            .await
            .map_err(|_| ConnError::Timeout("TCP connect"))??;
        let digits: u32 = imei.bytes().map(|b| u32::from(b - b'0')).sum();
        let mut c = Gt06Conn {
            framed: Framed::new(stream, Gt06Codec::with_imei(imei_v)),
            serial: 0,
            heartbeat_every: heartbeat_every.max(1),
            since_heartbeat: 0,
            unconfirmed: Vec::new(),
            cell: Gt06Cell {
                mcc: MCC_DK,
                mnc: 1,
                lac: 1000 + (digits % 50) as u16,
                cell_id: 10_000 + (digits * 97) % 50_000,
            },
            last_status: Gt06Status::default(),
        };
        let login = c.frame(Gt06Message::Login {
            imei: imei_v,
            type_id: None,
            timezone: None,
        });
        let serial = login.serial;
        c.framed.send(login).await?;
        match c.wait_ack(gt06_proto::LOGIN, serial, timeout).await {
            Ok(()) => Ok(c),
            // A server that does not know the IMEI closes the connection without an ACK.
            Err(ConnError::Closed) | Err(ConnError::Io(_)) => Err(ConnError::LoginRejected),
            Err(e) => Err(e),
        }
    }

    fn frame(&mut self, message: Gt06Message) -> Gt06Frame {
        self.serial = self.serial.wrapping_add(1);
        Gt06Frame::new(self.serial, message)
    }

    async fn wait_ack(
        &mut self,
        protocol: u8,
        serial: u16,
        timeout: Duration,
    ) -> Result<(), ConnError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.framed.next())
                .await
                .map_err(|_| ConnError::Timeout("GT06 ACK"))?;
            match next {
                None => return Err(ConnError::Closed),
                Some(Err(e)) => return Err(ConnError::Protocol(e.to_string())),
                // Garbage or a frame we cannot parse: the codec has resynchronised; go on.
                Some(Ok(Err(_))) => continue,
                Some(Ok(Ok(Gt06Frame {
                    serial: s,
                    message: Gt06Message::Ack { protocol: p },
                }))) if p == protocol && s == serial => return Ok(()),
                Some(Ok(Ok(_))) => continue,
            }
        }
    }

    fn gps(report: &Report, time: DateTime<Utc>) -> Gt06Gps {
        let p = &report.position;
        Gt06Gps {
            time,
            info_len: 12,
            satellites: p.satellites.unwrap_or(0).min(15),
            lat: p.lat,
            lon: p.lon,
            speed_kmh: p.speed_kmh.unwrap_or(0.0).clamp(0.0, 255.0).round() as u8,
            course: (p.course_deg.unwrap_or(0.0).rem_euclid(360.0).round() as u16).min(359),
            positioned: p.valid,
            differential: false,
        }
    }

    fn status(report: &Report, alarm: u8) -> Gt06Status {
        let mut terminal_info = 0x40 | 0x01; // GPS tracking on, defence armed
        if report.charging {
            terminal_info |= 0x04;
        }
        Gt06Status {
            terminal_info,
            voltage_level: gt06_voltage_level(report.battery_pct),
            gsm_level: 4,
            alarm,
            language: 0x02,
        }
    }

    /// Append `frame`'s wire form to the connection's write buffer (written by the next
    /// flush); returns its length.
    fn buffer(&mut self, frame: &Gt06Frame) -> Result<u64, ConnError> {
        let buf = self.framed.write_buffer_mut();
        let before = buf.len();
        frame
            .encode(buf)
            .map_err(|e| ConnError::Encode(e.to_string()))?;
        Ok((buf.len() - before) as u64)
    }

    /// Write one location frame per fix (an alarm frame for a strap cut) back to back in
    /// one write, then a heartbeat when `heartbeat_every` locations have gone out since the
    /// last ACK. Locations are not acknowledged in GT06: the ACK of a heartbeat or alarm
    /// confirms everything before it (the service handles one connection's frames in order).
    async fn send(
        &mut self,
        fixes: &[Fix],
        timeout: Duration,
        confirmed: &mut Vec<Confirmed>,
    ) -> Result<Sent, ConnError> {
        let mut sent = Sent::default();
        // The frame whose ACK to wait for: the batch's last frame when it is an alarm.
        let mut ack = None;
        for fix in fixes {
            let report = &fix.report;
            // GT06 carries seconds.
            let time = DateTime::from_timestamp(fix.time.timestamp(), 0).unwrap_or(fix.time);
            let gps = Self::gps(report, time);
            self.last_status = Self::status(report, 0);
            let tamper = report.events.contains(&DeviceEventKind::StrapTamper);
            let frame = if tamper {
                // Alarm 0x16 with the vendor "removal" alarm code; it is acknowledged.
                self.frame(Gt06Message::Alarm {
                    protocol: gt06_proto::ALARM,
                    gps,
                    lbs_len: 9,
                    cell: self.cell,
                    status: Self::status(report, 0x13),
                })
            } else {
                self.frame(Gt06Message::Location {
                    protocol: gt06_proto::LOCATION,
                    gps,
                    cell: Some(self.cell),
                    acc: None,
                    upload_mode: None,
                    reupload: None,
                    mileage: None,
                })
            };
            ack = tamper.then_some((gt06_proto::ALARM, frame.serial));
            sent.bytes += self.buffer(&frame)?;
            sent.frames += 1;
            self.since_heartbeat += 1;
        }
        if ack.is_none() && self.since_heartbeat >= self.heartbeat_every {
            let hb = self.frame(Gt06Message::Status(self.last_status));
            ack = Some((gt06_proto::STATUS, hb.serial));
            sent.bytes += self.buffer(&hb)?;
            sent.frames += 1;
        }
        self.unconfirmed.push(Confirmed {
            sent_at: Instant::now(),
            reports: fixes.len() as u64,
        });
        SinkExt::<Gt06Frame>::flush(&mut self.framed).await?;
        if let Some((protocol, serial)) = ack {
            self.wait_ack(protocol, serial, timeout).await?;
            self.since_heartbeat = 0;
            confirmed.append(&mut self.unconfirmed);
        }
        Ok(sent)
    }
}

impl Gt06Conn {
    async fn confirm_pending(
        &mut self,
        timeout: Duration,
        confirmed: &mut Vec<Confirmed>,
    ) -> Result<(), ConnError> {
        if self.unconfirmed.is_empty() {
            return Ok(());
        }
        let hb = self.frame(Gt06Message::Status(self.last_status));
        let serial = hb.serial;
        self.framed.send(hb).await?;
        self.wait_ack(gt06_proto::STATUS, serial, timeout).await?;
        self.since_heartbeat = 0;
        confirmed.append(&mut self.unconfirmed);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Teltonika
// ---------------------------------------------------------------------------------------

/// Most records one Teltonika AVL packet carries (the count is one byte on the wire).
pub const TELTONIKA_MAX_RECORDS: usize = 255;

pub struct TeltonikaConn {
    stream: TcpStream,
    buf: BytesMut,
    /// Records of the last packet, refilled in place for the next one (no allocation per
    /// record once the connection has sent its first full packet).
    records: Vec<AvlRecord>,
}

/// HDOP from a 68 % accuracy radius (inverse of the usual accuracy ≈ HDOP × 5 m).
fn hdop_from_accuracy(accuracy_m: Option<f32>) -> u16 {
    let hdop = accuracy_m.unwrap_or(5.0) / 5.0;
    (hdop * 10.0).clamp(5.0, 500.0).round() as u16
}

impl TeltonikaConn {
    /// Connect and send the IMEI handshake; waits for the `0x01` accept byte.
    pub async fn connect(
        source: Option<IpAddr>,
        target: SocketAddr,
        imei: &str,
        timeout: Duration,
    ) -> Result<Self, ConnError> {
        let mut stream = tokio::time::timeout(timeout, tcp_connect(source, target))
            .await
            .map_err(|_| ConnError::Timeout("TCP connect"))??;
        let hello = TeltonikaFrame::Imei(imei.to_string())
            .to_bytes()
            .map_err(|e| ConnError::Encode(e.to_string()))?;
        stream.write_all(&hello).await?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(timeout, stream.read_exact(&mut b)).await {
            Err(_) => return Err(ConnError::Timeout("Teltonika IMEI accept")),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ConnError::LoginRejected)
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        if b[0] != 0x01 {
            return Err(ConnError::LoginRejected);
        }
        Ok(TeltonikaConn {
            stream,
            buf: BytesMut::with_capacity(256),
            records: Vec::new(),
        })
    }

    /// An empty record, to be filled by [`Self::fill_record`].
    fn blank_record() -> AvlRecord {
        AvlRecord {
            timestamp: DateTime::UNIX_EPOCH,
            priority: 0,
            gps: AvlGps {
                lon: 0.0,
                lat: 0.0,
                altitude_m: 0,
                angle_deg: 0,
                satellites: 0,
                speed_kmh: 0,
            },
            event_io: 0,
            io: Vec::with_capacity(7),
        }
    }

    /// Overwrite `record` with `fix`, reusing its IO element vector.
    fn fill_record(record: &mut AvlRecord, fix: &Fix) {
        let report = &fix.report;
        let p = &report.position;
        record.timestamp = fix.time;
        // Records that should raise an alert go out as high priority (and at once).
        record.priority = u8::from(report.expect_alert.is_some());
        record.gps = AvlGps {
            lon: p.lon,
            lat: p.lat,
            altitude_m: p.altitude_m.unwrap_or(0.0).clamp(-1000.0, 9000.0).round() as i16,
            angle_deg: (p.course_deg.unwrap_or(0.0).rem_euclid(360.0).round() as u16).min(359),
            satellites: p.satellites.unwrap_or(0),
            speed_kmh: p.speed_kmh.unwrap_or(0.0).clamp(0.0, 400.0).round() as u16,
        };
        record.event_io = 0;
        let battery = report.battery_pct.min(100);
        record.io.clear();
        record.io.extend([
            IoElement {
                id: tio::GSM_SIGNAL,
                value: IoValue::U8(4),
            },
            IoElement {
                id: tio::GNSS_STATUS,
                value: IoValue::U8(if p.valid { 1 } else { 2 }),
            },
            IoElement {
                id: tio::BATTERY_LEVEL,
                value: IoValue::U8(battery),
            },
            IoElement {
                id: tio::CHARGER_CONNECTED,
                value: IoValue::U8(u8::from(report.charging)),
            },
            IoElement {
                id: tio::MOVEMENT,
                value: IoValue::U8(u8::from(p.speed_kmh.unwrap_or(0.0) > 1.0)),
            },
            IoElement {
                id: tio::HDOP,
                value: IoValue::U16(hdop_from_accuracy(p.accuracy_m)),
            },
            IoElement {
                id: tio::BATTERY_VOLTAGE,
                value: IoValue::U16(3300 + u16::from(battery) * 9),
            },
        ]);
    }

    /// Encode `fixes` (oldest first) as one Codec 8 Extended AVL packet into `dst`
    /// (cleared first), reusing the record storage of `records` from the previous packet.
    fn encode_packet(
        records: &mut Vec<AvlRecord>,
        fixes: &[Fix],
        dst: &mut BytesMut,
    ) -> Result<(), ConnError> {
        if fixes.is_empty() || fixes.len() > TELTONIKA_MAX_RECORDS {
            return Err(ConnError::Encode(format!(
                "{} records in one AVL packet (1..={TELTONIKA_MAX_RECORDS})",
                fixes.len()
            )));
        }
        let mut recs = std::mem::take(records);
        recs.truncate(fixes.len());
        for (i, fix) in fixes.iter().enumerate() {
            match recs.get_mut(i) {
                Some(r) => Self::fill_record(r, fix),
                None => {
                    let mut r = Self::blank_record();
                    Self::fill_record(&mut r, fix);
                    recs.push(r);
                }
            }
        }
        let frame = TeltonikaFrame::Avl(AvlPacket {
            codec: AvlCodec::Codec8Extended,
            records: recs,
        });
        dst.clear();
        let res = frame
            .encode(dst)
            .map_err(|e| ConnError::Encode(e.to_string()));
        if let TeltonikaFrame::Avl(p) = frame {
            *records = p.records;
        }
        res
    }

    /// Send `fixes` in one AVL packet and wait for the accepted-record count.
    async fn send(
        &mut self,
        fixes: &[Fix],
        timeout: Duration,
        confirmed: &mut Vec<Confirmed>,
    ) -> Result<Sent, ConnError> {
        Self::encode_packet(&mut self.records, fixes, &mut self.buf)?;
        let now = Instant::now();
        self.stream.write_all(&self.buf).await?;
        let mut ack = [0u8; 4];
        match tokio::time::timeout(timeout, self.stream.read_exact(&mut ack)).await {
            Err(_) => return Err(ConnError::Timeout("Teltonika record count")),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ConnError::Closed)
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        let n = fixes.len() as u64;
        let accepted = u64::from(u32::from_be_bytes(ack)).min(n);
        if accepted > 0 {
            confirmed.push(Confirmed {
                sent_at: now,
                reports: accepted,
            });
        }
        Ok(Sent {
            frames: 1,
            bytes: self.buf.len() as u64,
            rejected: n - accepted,
        })
    }
}

// ---------------------------------------------------------------------------------------
// EM protocol over MQTT
// ---------------------------------------------------------------------------------------

pub struct MqttConn {
    client: AsyncClient,
    eventloop: EventLoop,
    device_id: String,
    seq: u64,
}

impl MqttConn {
    /// Connect as `device_id` (username = device id, password = `secret`); waits for CONNACK.
    pub async fn connect(
        endpoint: &MqttEndpoint,
        device_id: &str,
        secret: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ConnError> {
        let mut opts = MqttOptions::new(device_id, endpoint.host.clone(), endpoint.port);
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_clean_session(true);
        opts.set_inflight(16);
        if let Some(secret) = secret {
            opts.set_credentials(device_id, secret);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        eventloop
            .network_options
            .set_connection_timeout(timeout.as_secs().max(1));
        let res = tokio::time::timeout(timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        return if ack.code == rumqttc::ConnectReturnCode::Success {
                            Ok(())
                        } else {
                            Err(ConnError::LoginRejected)
                        };
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(_)) => {
                        return Err(ConnError::LoginRejected)
                    }
                    Err(rumqttc::ConnectionError::Io(e)) => return Err(ConnError::Connect(e)),
                    Err(e) => return Err(ConnError::Mqtt(e.to_string())),
                }
            }
        })
        .await
        .map_err(|_| ConnError::Timeout("MQTT CONNACK"))?;
        res?;
        Ok(MqttConn {
            client,
            eventloop,
            device_id: device_id.to_string(),
            seq: 0,
        })
    }

    async fn idle_until(&mut self, deadline: tokio::time::Instant) -> Result<(), ConnError> {
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
                ev = self.eventloop.poll() => {
                    ev.map_err(|e| ConnError::Mqtt(e.to_string()))?;
                }
            }
        }
    }

    /// Wait for the next PUBACK (one device has only its own publications in flight, and
    /// the broker acknowledges them in order).
    async fn wait_puback(&mut self, deadline: tokio::time::Instant) -> Result<(), ConnError> {
        loop {
            let ev = tokio::time::timeout_at(deadline, self.eventloop.poll())
                .await
                .map_err(|_| ConnError::Timeout("MQTT PUBACK"))?
                .map_err(|e| ConnError::Mqtt(e.to_string()))?;
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                return Ok(());
            }
        }
    }

    /// Publish `fixes`: one message per run of consecutive fixes on the same topic
    /// (`telemetry`, or `event` for fixes with events), a JSON array when a run holds more
    /// than one report (at most [`MAX_BATCH`] each); wait for every PUBACK.
    async fn send(
        &mut self,
        fixes: &[Fix],
        timeout: Duration,
        confirmed: &mut Vec<Confirmed>,
    ) -> Result<Sent, ConnError> {
        /// Publications in flight before waiting for a PUBACK (below the client's queue).
        const PIPELINE: usize = 8;
        let now = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = Sent::default();
        let mut in_flight = 0;
        let runs = fixes
            .chunk_by(|a, b| a.report.events.is_empty() == b.report.events.is_empty())
            .flat_map(|run| run.chunks(MAX_BATCH));
        for run in runs {
            if in_flight == PIPELINE {
                self.wait_puback(deadline).await?;
                in_flight -= 1;
            }
            let (topic, payload) = em_message(&self.device_id, self.seq + 1, run)?;
            self.seq += run.len() as u64;
            sent.bytes += payload.len() as u64;
            sent.frames += 1;
            self.client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .map_err(|e| ConnError::Mqtt(e.to_string()))?;
            in_flight += 1;
        }
        for _ in 0..in_flight {
            self.wait_puback(deadline).await?;
        }
        confirmed.push(Confirmed {
            sent_at: now,
            reports: fixes.len() as u64,
        });
        Ok(sent)
    }
}

/// The report object of one fix.
fn em_payload(seq: u64, fix: &Fix) -> EmPayload {
    let report = &fix.report;
    let p = &report.position;
    let mut payload = EmPayload::new(seq, fix.time);
    payload.position = Some(EmPosition {
        accuracy_m: p.accuracy_m,
        source: p.source,
        valid: p.valid,
        speed_kmh: p.speed_kmh,
        course_deg: p.course_deg.map(|c| c.rem_euclid(360.0)),
        altitude_m: p.altitude_m,
        satellites: p.satellites,
        ..EmPosition::new(p.lat, p.lon)
    });
    payload.battery_pct = Some(report.battery_pct.min(100));
    payload.charging = Some(report.charging);
    payload.gsm_signal = Some(80);
    payload.strap = Some(if report.strap_intact {
        TamperState::Intact
    } else {
        TamperState::Tampered
    });
    payload.events = report.events.clone();
    payload
}

/// Topic and JSON payload of `fixes` (oldest first, numbered from `first_seq`) in the open
/// EM protocol: one report object for one fix, else a store-and-forward array of up to
/// [`MAX_BATCH`]. The topic is `event` when the fixes carry device events, else `telemetry`;
/// all fixes of one message must agree (every object of an `event` message needs an event).
pub fn em_message(
    device_id: &str,
    first_seq: u64,
    fixes: &[Fix],
) -> Result<(String, Vec<u8>), ConnError> {
    let Some(first) = fixes.first() else {
        return Err(ConnError::Encode("an EM message needs a report".into()));
    };
    if fixes.len() > MAX_BATCH {
        return Err(ConnError::Encode(format!(
            "{} reports in one EM message (at most {MAX_BATCH})",
            fixes.len()
        )));
    }
    let events = !first.report.events.is_empty();
    if fixes.iter().any(|f| f.report.events.is_empty() == events) {
        return Err(ConnError::Encode(
            "reports with and without events cannot share an EM message".into(),
        ));
    }
    let kind = if events {
        EmTopic::Event
    } else {
        EmTopic::Telemetry
    };
    let msg = EmMessage {
        device_id: device_id.to_string(),
        topic: kind,
        payloads: fixes
            .iter()
            .zip(first_seq..)
            .map(|(fix, seq)| em_payload(seq, fix))
            .collect(),
        batch: fixes.len() > 1,
    };
    let topic = msg.topic().map_err(|e| ConnError::Encode(e.to_string()))?;
    let body = msg
        .payload()
        .map_err(|e| ConnError::Encode(e.to_string()))?;
    Ok((topic, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use em_model::{AlertKind, FixSource, Position};
    use em_protocols::teltonika::TeltonikaCodec;
    use tokio_util::codec::Decoder;

    fn report(events: Vec<DeviceEventKind>, strap_intact: bool) -> Report {
        Report {
            position: Position {
                lat: 55.6761,
                lon: 12.5683,
                accuracy_m: Some(6.5),
                speed_kmh: Some(4.2),
                course_deg: Some(359.7),
                altitude_m: Some(12.0),
                satellites: Some(9),
                valid: true,
                source: FixSource::Gnss,
            },
            battery_pct: 18,
            charging: false,
            strap_intact,
            events,
            expect_alert: None,
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_750_000_000, 0).unwrap()
    }

    /// `n` fixes 2.5 s apart, each a little further east and with its own battery level.
    fn track(n: usize) -> Vec<Fix> {
        (0..n)
            .map(|i| {
                let mut r = report(vec![], true);
                r.position.lon += i as f64 * 1e-4;
                r.battery_pct = (100 - i % 100) as u8;
                Fix {
                    report: r,
                    time: t0() + chrono::TimeDelta::milliseconds(2500 * i as i64),
                }
            })
            .collect()
    }

    #[test]
    fn em_messages_decode_with_the_service_codec() {
        let t = t0();
        let one = [Fix {
            report: report(vec![], true),
            time: t,
        }];
        let (topic, body) = em_message("864425000000046", 7, &one).unwrap();
        assert_eq!(topic, "em/v1/864425000000046/telemetry");
        assert_eq!(body.first(), Some(&b'{'), "a single report is an object");
        let msg = em_protocols::em::decode(&topic, &body).unwrap();
        assert!(!msg.batch);
        let recs = msg.to_records(t);
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.seq, Some(7));
        assert_eq!(r.battery_pct, Some(18));
        assert_eq!(r.device_time, t);
        let p = r.position.unwrap();
        assert!((p.lat - 55.6761).abs() < 1e-9 && p.accuracy_m == Some(6.5));
        assert!(r.events.is_empty());

        let tamper = [Fix {
            report: report(vec![DeviceEventKind::StrapTamper], false),
            time: t,
        }];
        let (topic, body) = em_message("864425000000046", 8, &tamper).unwrap();
        assert_eq!(topic, "em/v1/864425000000046/event");
        let r = &em_protocols::em::decode(&topic, &body)
            .unwrap()
            .to_records(t)[0];
        assert_eq!(r.events, vec![DeviceEventKind::StrapTamper]);
    }

    #[test]
    fn em_batches_decode_into_one_record_per_report_in_order() {
        let fixes = track(MAX_BATCH);
        let (topic, body) = em_message("864425000000046", 41, &fixes).unwrap();
        assert_eq!(topic, "em/v1/864425000000046/telemetry");
        assert_eq!(body.first(), Some(&b'['), "a batch is a JSON array");
        let msg = em_protocols::em::decode(&topic, &body).unwrap();
        assert!(msg.batch);
        let recs = msg.to_records(t0());
        assert_eq!(recs.len(), MAX_BATCH);
        for (i, (r, f)) in recs.iter().zip(&fixes).enumerate() {
            assert_eq!(r.seq, Some(41 + i as u64));
            assert_eq!(r.device_time, f.time);
            assert_eq!(r.battery_pct, Some(f.report.battery_pct));
            assert!((r.position.unwrap().lon - f.report.position.lon).abs() < 1e-9);
        }
        // More than the protocol allows, none, or telemetry mixed with events: refused.
        assert!(em_message("864425000000046", 1, &track(MAX_BATCH + 1)).is_err());
        assert!(em_message("864425000000046", 1, &[]).is_err());
        let mut mixed = track(2);
        mixed[1].report.events.push(DeviceEventKind::StrapTamper);
        assert!(em_message("864425000000046", 1, &mixed).is_err());
    }

    fn decode_avl(buf: &mut BytesMut) -> TeltonikaFrame {
        let mut codec = TeltonikaCodec::with_imei("352094000000015");
        let frame = codec.decode(buf).unwrap().unwrap().unwrap();
        assert!(buf.is_empty(), "one packet, nothing left over");
        frame
    }

    #[test]
    fn teltonika_packets_decode_with_the_service_codec() {
        let t = t0();
        let mut records = Vec::new();
        let mut buf = BytesMut::new();
        let fix = Fix {
            report: report(vec![], true),
            time: t,
        };
        TeltonikaConn::encode_packet(&mut records, &[fix], &mut buf).unwrap();
        let frame = decode_avl(&mut buf);
        let recs = frame.to_records("352094000000015", t);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].battery_pct, Some(18));
        let p = recs[0].position.unwrap();
        assert!((p.lon - 12.5683).abs() < 1e-6 && p.valid);
        assert_eq!(frame.response().unwrap().as_ref(), &[0, 0, 0, 1]);
    }

    #[test]
    fn teltonika_multi_record_packets_decode_in_order() {
        let mut records = Vec::new();
        let mut buf = BytesMut::new();
        // A full packet, then a shorter one reusing the record storage, then the maximum.
        for n in [25, 3, TELTONIKA_MAX_RECORDS] {
            let mut fixes = track(n);
            fixes[n - 1].report.expect_alert = Some(AlertKind::CurfewViolation);
            TeltonikaConn::encode_packet(&mut records, &fixes, &mut buf).unwrap();
            let frame = decode_avl(&mut buf);
            let TeltonikaFrame::Avl(packet) = &frame else {
                panic!("not an AVL packet")
            };
            assert_eq!(packet.records.len(), n);
            // Only the alerting (last) record is high priority.
            assert!(packet.records[..n - 1].iter().all(|r| r.priority == 0));
            assert_eq!(packet.records[n - 1].priority, 1);
            let recs = frame.to_records("352094000000015", t0());
            assert_eq!(recs.len(), n);
            for (r, f) in recs.iter().zip(&fixes) {
                assert_eq!(r.device_time, f.time);
                assert_eq!(r.battery_pct, Some(f.report.battery_pct));
                assert!((r.position.unwrap().lon - f.report.position.lon).abs() < 1e-6);
            }
            assert!(recs.windows(2).all(|w| w[0].device_time < w[1].device_time));
            let ack = (n as u32).to_be_bytes();
            assert_eq!(frame.response().unwrap().as_ref(), &ack);
        }
        assert!(TeltonikaConn::encode_packet(
            &mut records,
            &track(TELTONIKA_MAX_RECORDS + 1),
            &mut buf
        )
        .is_err());
        assert!(TeltonikaConn::encode_packet(&mut records, &[], &mut buf).is_err());
    }

    #[test]
    fn urgent_fixes() {
        let mut f = track(1).remove(0);
        assert!(!f.is_urgent());
        f.report.expect_alert = Some(AlertKind::LowBattery);
        assert!(f.is_urgent());
        f.report.expect_alert = None;
        f.report.events.push(DeviceEventKind::StrapTamper);
        assert!(f.is_urgent());
    }

    #[test]
    fn gt06_voltage_levels() {
        assert_eq!(gt06_voltage_level(100), 6);
        assert_eq!(gt06_voltage_level(0), 0);
        assert_eq!(gt06_voltage_level(18), 1);
        assert_eq!(gt06_voltage_level(60), 4);
        assert_eq!(gt06_voltage_level(255), 6);
    }
}
