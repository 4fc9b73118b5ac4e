//! `em-ingest` owns the running service: TCP listeners per device protocol, the MQTT
//! subscriber and the embedded MQTT endpoint, the device-sharded pipeline (decode → store → ACK → geofence → alerts),
//! device-health monitoring, configuration and the embedded default (which runs the demo fleet
//! of `em-sim`).

pub mod alert_lanes;
pub mod config;
pub mod evaluate;
/// The device-health rules live with the other alert rules in `em-alerts`.
pub use em_alerts::health;
/// Connection limits: one policy for every listener (kept beside the HTTP server).
pub use em_dashboard::limits;
pub mod metrics;
pub mod mqtt;
pub mod mqtt_server;
pub mod osmand;
pub mod pipeline;
pub mod registry;
pub mod service;
pub mod tcp;
pub mod udp;
