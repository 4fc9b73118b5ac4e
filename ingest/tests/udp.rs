//! Teltonika over UDP (issue 11): datagrams built with the protocol's own encoder from the
//! codec 8 layout in Teltonika's documentation (UDP channel header: length, packet id, packet
//! type 0x01, AVL packet id, IMEI length + IMEI, then the AVL data), sent to the real socket.

mod common;

use std::time::Duration;

use chrono::Duration as ChronoDuration;
use common::*;
use em_model::Protocol;
use em_protocols::teltonika;
use tokio::net::UdpSocket;

fn datagram(imei: &str, packet_id: u16, avl_id: u8, n: usize) -> Vec<u8> {
    let start = now_s() - ChronoDuration::minutes(5);
    let records = (0..n)
        .map(|i| {
            teltonika_record(
                start + ChronoDuration::seconds(i as i64),
                55.6 + i as f64 * 1e-5,
                12.5,
            )
        })
        .collect();
    teltonika::udp::UdpPacket {
        packet_id,
        avl_packet_id: avl_id,
        imei: imei.into(),
        frame: teltonika::TeltonikaFrame::Avl(teltonika::AvlPacket {
            codec: teltonika::AvlCodec::Codec8,
            records,
        }),
    }
    .encode()
    .expect("encode")
    .to_vec()
}

async fn answer(sock: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp_records_are_stored_then_acknowledged(db: TestDb) {
    register(&*db.store, "352094000000500", Protocol::Teltonika, None).await;
    let svc = start(test_config(&db)).await;
    let addr = svc.addrs.teltonika_udp.expect("UDP listener");
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.connect(addr).await.expect("connect");

    let d = datagram("352094000000500", 0xCAFE, 7, 3);
    sock.send(&d).await.expect("send");
    let ack = answer(&sock, Duration::from_secs(10))
        .await
        .expect("answered");
    assert_eq!(ack, teltonika::udp::udp_ack(0xCAFE, 7, 3).to_vec());
    // The answer came after the store: the records are there.
    assert_eq!(
        db.store
            .count_records("352094000000500")
            .await
            .expect("count"),
        3
    );
    // A re-sent datagram is answered again and stored once.
    sock.send(&d).await.expect("resend");
    assert!(answer(&sock, Duration::from_secs(10)).await.is_some());
    assert_eq!(
        db.store
            .count_records("352094000000500")
            .await
            .expect("count"),
        3
    );

    // An unknown device and a malformed datagram get no answer; the listener goes on.
    sock.send(&datagram("352094000000999", 1, 1, 1))
        .await
        .expect("send");
    assert_eq!(answer(&sock, Duration::from_millis(800)).await, None);
    sock.send(&[0x00, 0x05, 0xFF]).await.expect("send garbage");
    assert_eq!(answer(&sock, Duration::from_millis(800)).await, None);
    sock.send(&datagram("352094000000500", 2, 8, 2))
        .await
        .expect("send");
    assert_eq!(
        answer(&sock, Duration::from_secs(10)).await,
        Some(teltonika::udp::udp_ack(2, 8, 2).to_vec())
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_records_are_stored_then_acknowledged_sqlite() {
    udp_records_are_stored_then_acknowledged(sqlite_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_records_are_stored_then_acknowledged_postgres() {
    if let Some(db) = postgres_db().await {
        udp_records_are_stored_then_acknowledged(db).await;
    }
}
