//! `em-ingest` owns the running service: TCP listeners per device protocol and the MQTT
//! subscriber, the device-sharded pipeline (decode → store → ACK → geofence → alerts),
//! device-health monitoring, configuration, the embedded demo and the fleet simulator.

pub mod demo;
pub mod sim;
