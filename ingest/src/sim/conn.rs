//! Device connections of the simulator: GT06 and Teltonika over TCP, the EM protocol over
//! MQTT. Each waits for the protocol's acknowledgement and reports which sent reports it
//! confirmed.

use super::behaviour::Report;
use super::MqttEndpoint;
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use em_model::{DeviceEventKind, Protocol};
use em_protocols::em::{EmMessage, EmPayload, EmPosition, EmTopic, TamperState};
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

/// Result of sending one report: send instants of the reports this exchange confirmed
/// (a GT06 ACK also confirms earlier location frames, which carry no ACK of their own).
#[derive(Debug, Default)]
pub struct Sent {
    pub frames: u64,
    pub bytes: u64,
    pub confirmed: Vec<Instant>,
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
    /// Send `report` (observed at `time`) and wait for its acknowledgement.
    pub async fn send(
        &mut self,
        report: &Report,
        time: DateTime<Utc>,
        ack_timeout: Duration,
    ) -> Result<Sent, ConnError> {
        match self {
            DeviceConn::Gt06(c) => c.send(report, time, ack_timeout).await,
            DeviceConn::Teltonika(c) => c.send(report, time, ack_timeout).await,
            DeviceConn::Mqtt(c) => c.send(report, time, ack_timeout).await,
        }
    }

    /// Ask for an acknowledgement of reports sent but not yet confirmed (GT06 locations
    /// since the last heartbeat) and return their send instants.
    pub async fn confirm_pending(&mut self, timeout: Duration) -> Result<Vec<Instant>, ConnError> {
        match self {
            DeviceConn::Gt06(c) => c.confirm_pending(timeout).await,
            _ => Ok(Vec::new()),
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
    unconfirmed: Vec<Instant>,
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

    async fn send(
        &mut self,
        report: &Report,
        time: DateTime<Utc>,
        timeout: Duration,
    ) -> Result<Sent, ConnError> {
        // GT06 carries seconds.
        let time = DateTime::from_timestamp(time.timestamp(), 0).unwrap_or(time);
        let gps = Self::gps(report, time);
        self.last_status = Self::status(report, 0);
        let mut sent = Sent::default();
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
        let now = Instant::now();
        let mut ack = (tamper).then_some((gt06_proto::ALARM, frame.serial));
        sent.bytes += frame
            .to_bytes()
            .map_err(|e| ConnError::Encode(e.to_string()))?
            .len() as u64;
        sent.frames += 1;
        self.framed.feed(frame).await?;
        self.unconfirmed.push(now);
        self.since_heartbeat += 1;
        // Locations are not acknowledged in GT06: a heartbeat after every
        // `heartbeat_every` reports gets an ACK that confirms everything before it
        // (the service handles one connection's frames in order).
        if ack.is_none() && self.since_heartbeat >= self.heartbeat_every {
            let hb = self.frame(Gt06Message::Status(self.last_status));
            ack = Some((gt06_proto::STATUS, hb.serial));
            sent.bytes += hb
                .to_bytes()
                .map_err(|e| ConnError::Encode(e.to_string()))?
                .len() as u64;
            sent.frames += 1;
            self.framed.feed(hb).await?;
        }
        SinkExt::<Gt06Frame>::flush(&mut self.framed).await?;
        if let Some((protocol, serial)) = ack {
            self.wait_ack(protocol, serial, timeout).await?;
            self.since_heartbeat = 0;
            sent.confirmed = std::mem::take(&mut self.unconfirmed);
        }
        Ok(sent)
    }
}

impl Gt06Conn {
    async fn confirm_pending(&mut self, timeout: Duration) -> Result<Vec<Instant>, ConnError> {
        if self.unconfirmed.is_empty() {
            return Ok(Vec::new());
        }
        let hb = self.frame(Gt06Message::Status(self.last_status));
        let serial = hb.serial;
        self.framed.send(hb).await?;
        self.wait_ack(gt06_proto::STATUS, serial, timeout).await?;
        self.since_heartbeat = 0;
        Ok(std::mem::take(&mut self.unconfirmed))
    }
}

// ---------------------------------------------------------------------------------------
// Teltonika
// ---------------------------------------------------------------------------------------

pub struct TeltonikaConn {
    stream: TcpStream,
    buf: BytesMut,
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
        })
    }

    fn packet(report: &Report, time: DateTime<Utc>) -> TeltonikaFrame {
        let p = &report.position;
        let io = vec![
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
                value: IoValue::U8(report.battery_pct.min(100)),
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
                value: IoValue::U16(3300 + u16::from(report.battery_pct.min(100)) * 9),
            },
        ];
        let record = AvlRecord {
            timestamp: time,
            priority: u8::from(report.expect_alert.is_some()),
            gps: AvlGps {
                lon: p.lon,
                lat: p.lat,
                altitude_m: p.altitude_m.unwrap_or(0.0).clamp(-1000.0, 9000.0).round() as i16,
                angle_deg: (p.course_deg.unwrap_or(0.0).rem_euclid(360.0).round() as u16).min(359),
                satellites: p.satellites.unwrap_or(0),
                speed_kmh: p.speed_kmh.unwrap_or(0.0).clamp(0.0, 400.0).round() as u16,
            },
            event_io: 0,
            io,
        };
        TeltonikaFrame::Avl(AvlPacket {
            codec: AvlCodec::Codec8Extended,
            records: vec![record],
        })
    }

    async fn send(
        &mut self,
        report: &Report,
        time: DateTime<Utc>,
        timeout: Duration,
    ) -> Result<Sent, ConnError> {
        let frame = Self::packet(report, time);
        self.buf.clear();
        frame
            .encode(&mut self.buf)
            .map_err(|e| ConnError::Encode(e.to_string()))?;
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
        let accepted = u32::from_be_bytes(ack);
        let mut sent = Sent {
            frames: 1,
            bytes: self.buf.len() as u64,
            ..Sent::default()
        };
        if accepted >= 1 {
            sent.confirmed.push(now);
        } else {
            sent.rejected = 1;
        }
        Ok(sent)
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

    async fn send(
        &mut self,
        report: &Report,
        time: DateTime<Utc>,
        timeout: Duration,
    ) -> Result<Sent, ConnError> {
        self.seq += 1;
        let (topic, payload) = em_message(&self.device_id, self.seq, report, time)?;
        let bytes = payload.len() as u64;
        let now = Instant::now();
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| ConnError::Mqtt(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + timeout;
        // One publication in flight per device: the next PUBACK is ours.
        loop {
            let ev = tokio::time::timeout_at(deadline, self.eventloop.poll())
                .await
                .map_err(|_| ConnError::Timeout("MQTT PUBACK"))?
                .map_err(|e| ConnError::Mqtt(e.to_string()))?;
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                return Ok(Sent {
                    frames: 1,
                    bytes,
                    confirmed: vec![now],
                    rejected: 0,
                });
            }
        }
    }
}

/// Topic and JSON payload of one report in the open EM protocol: `event` when the report
/// carries device events, else `telemetry`.
pub fn em_message(
    device_id: &str,
    seq: u64,
    report: &Report,
    time: DateTime<Utc>,
) -> Result<(String, Vec<u8>), ConnError> {
    let p = &report.position;
    let mut payload = EmPayload::new(seq, time);
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
    let kind = if report.events.is_empty() {
        EmTopic::Telemetry
    } else {
        EmTopic::Event
    };
    let msg = EmMessage::new(device_id, kind, payload);
    let topic = msg.topic().map_err(|e| ConnError::Encode(e.to_string()))?;
    let body = msg
        .payload()
        .map_err(|e| ConnError::Encode(e.to_string()))?;
    Ok((topic, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use em_model::{FixSource, Position};

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

    #[test]
    fn em_messages_decode_with_the_service_codec() {
        let t = DateTime::from_timestamp(1_750_000_000, 0).unwrap();
        let (topic, body) = em_message("864425000000046", 7, &report(vec![], true), t).unwrap();
        assert_eq!(topic, "em/v1/864425000000046/telemetry");
        let msg = em_protocols::em::decode(&topic, &body).unwrap();
        let recs = msg.to_records(t);
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.seq, Some(7));
        assert_eq!(r.battery_pct, Some(18));
        assert_eq!(r.device_time, t);
        let p = r.position.unwrap();
        assert!((p.lat - 55.6761).abs() < 1e-9 && p.accuracy_m == Some(6.5));
        assert!(r.events.is_empty());

        let (topic, body) = em_message(
            "864425000000046",
            8,
            &report(vec![DeviceEventKind::StrapTamper], false),
            t,
        )
        .unwrap();
        assert_eq!(topic, "em/v1/864425000000046/event");
        let r = &em_protocols::em::decode(&topic, &body)
            .unwrap()
            .to_records(t)[0];
        assert_eq!(r.events, vec![DeviceEventKind::StrapTamper]);
    }

    #[test]
    fn teltonika_packets_decode_with_the_service_codec() {
        use em_protocols::teltonika::TeltonikaCodec;
        use tokio_util::codec::Decoder;
        let t = DateTime::from_timestamp(1_750_000_000, 0).unwrap();
        let mut codec = TeltonikaCodec::with_imei("352094000000015");
        let mut buf = BytesMut::new();
        TeltonikaConn::packet(&report(vec![], true), t)
            .encode(&mut buf)
            .unwrap();
        let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
        let recs = frame.to_records("352094000000015", t);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].battery_pct, Some(18));
        let p = recs[0].position.unwrap();
        assert!((p.lon - 12.5683).abs() < 1e-6 && p.valid);
        assert_eq!(frame.response().unwrap().as_ref(), &[0, 0, 0, 1]);
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
