//! Teltonika codec 8 / 8E over UDP. Each datagram carries its device's IMEI and one AVL packet
//! (no login); the answer datagram names the packet and how many records were accepted, and is
//! sent only after those records are stored — like every ACK of the service. A datagram the
//! service drops (malformed, unknown device, overloaded) gets no answer and the device sends it
//! again; stored records are idempotent, so a re-sent packet is not stored twice.

use std::sync::Arc;

use chrono::Utc;
use em_model::Protocol;
use em_protocols::teltonika::{self, udp::parse_udp};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::AllowList;
use crate::metrics as m;
use crate::pipeline::Pipeline;
use crate::registry::{Credential, Registry};

const P: Protocol = Protocol::Teltonika;
/// Largest datagram read (a Teltonika AVL datagram stays far below).
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams being stored at once; beyond that a datagram is dropped (the device re-sends).
const IN_FLIGHT: usize = 1024;

/// Serves the UDP socket until `shutdown`.
pub async fn serve(
    socket: UdpSocket,
    allow: AllowList,
    pipeline: Pipeline,
    registry: Registry,
    shutdown: CancellationToken,
) {
    tracing::info!(protocol = %P, addr = ?socket.local_addr().ok(), "device listener started (UDP)");
    let socket = Arc::new(socket);
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(protocol = %P, error = %e, "UDP receive failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if !allow.permits(peer.ip()) {
            m::device_rejected(P, "source_not_allowed");
            tracing::debug!(protocol = %P, %peer, "datagram from a source not allowed");
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            m::device_rejected(P, "overloaded");
            continue;
        };
        let datagram = buf[..n].to_vec();
        let (socket, pipeline, registry) = (socket.clone(), pipeline.clone(), registry.clone());
        tokio::spawn(async move {
            handle(&datagram, peer, &socket, &pipeline, &registry).await;
            drop(permit);
        });
    }
}

async fn handle(
    datagram: &[u8],
    peer: std::net::SocketAddr,
    socket: &UdpSocket,
    pipeline: &Pipeline,
    registry: &Registry,
) {
    m::frame(P);
    let packet = match parse_udp(datagram) {
        Ok(p) => p,
        Err(e) => {
            m::decode_error(P, e.reason());
            tracing::debug!(protocol = %P, %peer, error = %e, "UDP datagram not decoded");
            return;
        }
    };
    match registry.admit(&packet.imei, P, Credential::None).await {
        Ok(Ok(_)) => {}
        Ok(Err(refusal)) => {
            m::device_rejected(P, refusal.as_str());
            tracing::warn!(protocol = %P, %peer, device = packet.imei.as_str(), reason = %refusal,
                "UDP datagram refused");
            return;
        }
        Err(e) => {
            tracing::error!(protocol = %P, error = %e, "registry lookup failed; datagram dropped");
            return;
        }
    }
    if let teltonika::TeltonikaFrame::AvlPartial(p) = &packet.frame {
        m::records_rejected(P, "out_of_range", p.rejected.len() as u64);
    }
    let records = packet.frame.to_records(&packet.imei, Utc::now());
    let stored = match pipeline.submit_frame(records).await {
        Ok(rx) => matches!(rx.await, Ok(Ok(()))),
        Err(e) => {
            tracing::warn!(protocol = %P, error = %e, "pipeline refused a UDP packet");
            false
        }
    };
    if !stored {
        // No answer: the device sends the packet again.
        return;
    }
    if let Err(e) = socket.send_to(&packet.response(), peer).await {
        tracing::debug!(protocol = %P, %peer, error = %e, "UDP answer not sent");
    }
}
