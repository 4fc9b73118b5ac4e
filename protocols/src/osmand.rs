//! OsmAnd / Traccar Client HTTP query format, as sent by phone apps:
//!
//! ```text
//! /?id=123456&timestamp=1700000000&lat=55.676&lon=12.568&speed=3.2&bearing=90
//!   &altitude=12&accuracy=8&batt=77&charge=true
//! ```
//!
//! This module only parses the query (a full URL, a request line or a bare query
//! string are all accepted); the HTTP server lives in the ingest service, which must
//! answer `200 OK` on success and `400` on a [`DecodeError`].
//!
//! Parameters: `id` (or `deviceid`, required); `lat` and `lon` (required unless
//! `location=lat,lon`); `timestamp` as Unix seconds, Unix milliseconds or ISO 8601 /
//! RFC 3339 (`yyyy-mm-dd hh:mm:ss` is read as UTC; missing = received time);
//! `speed` in knots (the Traccar Client convention); `bearing` (or `heading`) in degrees;
//! `altitude` in metres; `accuracy` in metres; `hdop`; `batt` (or `battery`) in %;
//! `charge` (`true`/`false`/`1`/`0`); `valid`. Unknown parameters are ignored.

use chrono::{DateTime, NaiveDateTime, Utc};
use em_model::{FixSource, Position, Protocol, Record};

use crate::util::{hdop_to_accuracy_m, KNOTS_TO_KMH};
use crate::{DecodeError, EncodeError};

const P: Protocol = Protocol::Osmand;

/// Longest query accepted.
pub const MAX_QUERY_LEN: usize = 4096;

/// One decoded OsmAnd report.
#[derive(Debug, Clone, PartialEq)]
pub struct OsmandReport {
    pub id: String,
    pub time: Option<DateTime<Utc>>,
    pub lat: f64,
    pub lon: f64,
    pub speed_knots: Option<f64>,
    pub bearing: Option<f64>,
    pub altitude: Option<f64>,
    pub accuracy: Option<f64>,
    pub hdop: Option<f64>,
    pub battery: Option<f64>,
    pub charge: Option<bool>,
    pub valid: Option<bool>,
}

impl OsmandReport {
    /// A report with only the required fields.
    pub fn new(id: impl Into<String>, lat: f64, lon: f64) -> Self {
        OsmandReport {
            id: id.into(),
            time: None,
            lat,
            lon,
            speed_knots: None,
            bearing: None,
            altitude: None,
            accuracy: None,
            hdop: None,
            battery: None,
            charge: None,
            valid: None,
        }
    }

    pub fn device_id(&self) -> &str {
        &self.id
    }

    /// The normalised record (always exactly one).
    pub fn to_record(&self, received: DateTime<Utc>) -> Record {
        let mut r = Record::new(self.id.clone(), P, received);
        r.device_time = self.time.unwrap_or(received);
        let accuracy = self
            .accuracy
            .map(|a| a as f32)
            .or_else(|| self.hdop.map(|h| hdop_to_accuracy_m(h as f32)));
        r.position = Some(Position {
            lat: self.lat,
            lon: self.lon,
            accuracy_m: accuracy,
            speed_kmh: self.speed_knots.map(|s| (s * KNOTS_TO_KMH) as f32),
            course_deg: self.bearing.map(|b| b as f32),
            altitude_m: self.altitude.map(|a| a as f32),
            satellites: None,
            valid: self.valid.unwrap_or(true),
            source: FixSource::Gnss,
        });
        r.battery_pct = self.battery.map(|b| b.clamp(0.0, 100.0).round() as u8);
        r.charging = self.charge;
        r
    }

    pub fn to_records(&self, received: DateTime<Utc>) -> Vec<Record> {
        vec![self.to_record(received)]
    }

    /// Query string (without `?`) that [`decode`] reads back to `self`. Times with
    /// whole seconds are sent as Unix seconds, others as RFC 3339.
    pub fn to_query(&self) -> Result<String, EncodeError> {
        if self.id.is_empty() {
            return Err(EncodeError::new(P, "id", "empty"));
        }
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("id", &self.id);
        if let Some(t) = self.time {
            // Unix seconds only where `decode` reads them back as seconds.
            if t.timestamp_subsec_nanos() == 0 && (0..100_000_000_000).contains(&t.timestamp()) {
                q.append_pair("timestamp", &t.timestamp().to_string());
            } else {
                q.append_pair("timestamp", &t.to_rfc3339());
            }
        }
        let nums = [
            ("lat", Some(self.lat)),
            ("lon", Some(self.lon)),
            ("speed", self.speed_knots),
            ("bearing", self.bearing),
            ("altitude", self.altitude),
            ("accuracy", self.accuracy),
            ("hdop", self.hdop),
            ("batt", self.battery),
        ];
        for (k, v) in nums {
            if let Some(v) = v {
                if !v.is_finite() {
                    return Err(EncodeError::new(P, "number", format!("{k}={v}")));
                }
                q.append_pair(k, &v.to_string());
            }
        }
        if let Some(c) = self.charge {
            q.append_pair("charge", if c { "true" } else { "false" });
        }
        if let Some(v) = self.valid {
            q.append_pair("valid", if v { "true" } else { "false" });
        }
        Ok(q.finish())
    }
}

fn bad(field: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError::malformed(P, field, detail)
}

fn parse_num(key: &'static str, v: &str) -> Result<f64, DecodeError> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .ok_or_else(|| bad(key, format!("{v:?} is not a number")))
}

fn parse_bool(key: &'static str, v: &str) -> Result<bool, DecodeError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(bad(key, format!("{v:?} is not a boolean"))),
    }
}

/// Unix seconds, Unix milliseconds, RFC 3339, or `yyyy-mm-dd[ T]hh:mm:ss` (UTC), between
/// 1970 and the end of year 9999.
pub fn parse_timestamp(v: &str) -> Result<DateTime<Utc>, DecodeError> {
    let t = parse_any_timestamp(v)?;
    if !(0..=253_402_300_799).contains(&t.timestamp()) {
        return Err(bad("timestamp", format!("{v:?} is outside 1970..=9999")));
    }
    Ok(t)
}

fn parse_any_timestamp(v: &str) -> Result<DateTime<Utc>, DecodeError> {
    let v = v.trim();
    let err = || bad("timestamp", format!("{v:?} is not Unix time or ISO 8601"));
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = v.parse().map_err(|_| err())?;
        // Beyond year 5138 in seconds means the value is milliseconds.
        return if n >= 100_000_000_000 {
            DateTime::from_timestamp_millis(n).ok_or_else(err)
        } else {
            DateTime::from_timestamp(n, 0).ok_or_else(err)
        };
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(v, fmt) {
            return Ok(t.and_utc());
        }
    }
    Err(err())
}

/// Extract the query from a URL, request line or bare query string.
fn query_part(input: &str) -> &str {
    let s = input.trim();
    // "GET /?a=b HTTP/1.1" → "/?a=b"
    let s = match s.split_once(' ') {
        Some((method, rest)) if method.bytes().all(|b| b.is_ascii_uppercase()) => {
            rest.split(' ').next().unwrap_or(rest)
        }
        _ => s,
    };
    let s = match s.split_once('?') {
        Some((_, q)) => q,
        None => s,
    };
    s.split('#').next().unwrap_or(s)
}

/// Decode one OsmAnd report from a URL, request line or query string.
pub fn decode(input: &str) -> Result<OsmandReport, DecodeError> {
    if input.len() > MAX_QUERY_LEN {
        return Err(DecodeError::Oversized {
            protocol: P,
            len: input.len(),
            max: MAX_QUERY_LEN,
        });
    }
    let query = query_part(input);
    let mut id = None;
    let (mut lat, mut lon) = (None, None);
    let mut rep = OsmandReport::new(String::new(), 0.0, 0.0);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "id" | "deviceid" => id = Some(v.trim().to_owned()),
            "lat" => lat = Some(parse_num("lat", &v)?),
            "lon" => lon = Some(parse_num("lon", &v)?),
            "location" => {
                let (a, b) = v
                    .split_once(',')
                    .ok_or_else(|| bad("location", format!("{v:?} is not lat,lon")))?;
                lat = Some(parse_num("location", a)?);
                lon = Some(parse_num("location", b)?);
            }
            "timestamp" => rep.time = Some(parse_timestamp(&v)?),
            "speed" => rep.speed_knots = Some(parse_num("speed", &v)?),
            "bearing" | "heading" => rep.bearing = Some(parse_num("bearing", &v)?),
            "altitude" => rep.altitude = Some(parse_num("altitude", &v)?),
            "accuracy" => rep.accuracy = Some(parse_num("accuracy", &v)?),
            "hdop" => rep.hdop = Some(parse_num("hdop", &v)?),
            "batt" | "battery" => rep.battery = Some(parse_num("batt", &v)?),
            "charge" => rep.charge = Some(parse_bool("charge", &v)?),
            "valid" => rep.valid = Some(parse_bool("valid", &v)?),
            _ => {}
        }
    }
    rep.id = id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("id", "missing id parameter"))?;
    if rep.id.len() > 64 {
        return Err(bad("id", "longer than 64 characters"));
    }
    let (Some(lat), Some(lon)) = (lat, lon) else {
        return Err(bad("position", "missing lat/lon"));
    };
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Err(bad(
            "position",
            format!("lat {lat} / lon {lon} out of range"),
        ));
    }
    rep.lat = lat;
    rep.lon = lon;
    if let Some(b) = rep.battery {
        if !(0.0..=100.0).contains(&b) {
            return Err(bad("batt", format!("{b} is not a percentage")));
        }
    }
    Ok(rep)
}
