//! Fleet simulator: drives simulated devices over GT06, Teltonika and MQTT.
