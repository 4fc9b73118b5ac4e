//! OsmAnd / Traccar Client HTTP query format, as sent by phone apps:
//!
//! ```text
//! /?id=123456&timestamp=1700000000&lat=55.676&lon=12.568&speed=3.2&bearing=90
//!   &altitude=12&accuracy=8&batt=77&charge=true
//! ```
//!
//! or, from the current Traccar Client app, a JSON body:
//!
//! ```text
//! {"device_id":"123456","location":{"timestamp":"2025-01-01T12:00:00.000Z",
//!   "coords":{"latitude":55.676,"longitude":12.568,"accuracy":8,"speed":1.5,"heading":90,
//!             "altitude":12},"is_moving":true,"battery":{"level":0.77,"is_charging":false}}}
//! ```
//!
//! This module only parses the query (a full URL, a request line or a bare query
//! string are all accepted) or the JSON body; the HTTP server lives in the ingest service,
//! which must answer `200 OK` on success and `400` on a [`DecodeError`].
//!
//! Query parameters: `id` (or `deviceid`, required); `lat` and `lon` (or
//! `location=lat,lon`; required unless the request carries `cell` or `wifi`); `timestamp`
//! as Unix seconds, Unix milliseconds or ISO 8601 / RFC 3339 (`yyyy-mm-dd hh:mm:ss` is
//! read as UTC; missing = received time); `speed` in knots (the Traccar Client
//! convention); `bearing` (or `heading`) in degrees; `altitude` in metres; `accuracy` in
//! metres; `hdop`; `batt` (or `battery`) in %; `charge` (`true`/`false`/`1`/`0`); `valid`;
//! `cell=mcc,mnc,lac,cid[,signal]` and `wifi=mac,signal` (repeatable). Unknown parameters
//! are ignored.
//!
//! JSON body (Traccar Client docs; the location object of the background-geolocation
//! library it uses): `device_id` (string or number, required); `location` (one object or
//! an array of them): `timestamp` (ISO 8601, or Unix seconds / milliseconds),
//! `coords.latitude` / `longitude` (required), `accuracy` (m), `speed` (m/s), `heading`
//! (degrees), `altitude` (m) — negative speed / heading / accuracy mean "unknown";
//! `battery.level` (0–1; -1 = unknown) and `battery.is_charging`; `is_moving`.

use chrono::{DateTime, NaiveDateTime, Utc};
use em_model::{CellTower, FixSource, Position, Protocol, Record, WifiAccessPoint};
use serde_json::Value;

use crate::util::{hdop_to_accuracy_m, KNOTS_TO_KMH};
use crate::{DecodeError, EncodeError};

const P: Protocol = Protocol::Osmand;

/// Longest query accepted.
pub const MAX_QUERY_LEN: usize = 4096;
/// Longest request body accepted (a JSON body may carry a batch of locations).
pub const MAX_BODY_LEN: usize = 64 * 1024;
/// Most locations in one JSON body.
pub const MAX_BATCH: usize = 100;
/// Most cells / Wi-Fi access points in one report.
pub const MAX_NETWORKS: usize = 32;
/// Metres per second to knots.
const MS_TO_KNOTS: f64 = 3600.0 / 1852.0;

/// One decoded OsmAnd report.
#[derive(Debug, Clone, PartialEq)]
pub struct OsmandReport {
    pub id: String,
    pub time: Option<DateTime<Utc>>,
    /// Latitude and longitude are both present or both absent (a cell / Wi-Fi report).
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub speed_knots: Option<f64>,
    pub bearing: Option<f64>,
    pub altitude: Option<f64>,
    pub accuracy: Option<f64>,
    pub hdop: Option<f64>,
    pub battery: Option<f64>,
    pub charge: Option<bool>,
    pub valid: Option<bool>,
    /// Traccar Client's `is_moving` (not part of the record model; kept for logs).
    pub moving: Option<bool>,
    pub cells: Vec<CellTower>,
    pub wifi: Vec<WifiAccessPoint>,
}

impl OsmandReport {
    /// A report with only the required fields.
    pub fn new(id: impl Into<String>, lat: f64, lon: f64) -> Self {
        OsmandReport {
            id: id.into(),
            time: None,
            lat: Some(lat),
            lon: Some(lon),
            speed_knots: None,
            bearing: None,
            altitude: None,
            accuracy: None,
            hdop: None,
            battery: None,
            charge: None,
            valid: None,
            moving: None,
            cells: Vec::new(),
            wifi: Vec::new(),
        }
    }

    pub fn device_id(&self) -> &str {
        &self.id
    }

    /// The normalised record (always exactly one; without a position for a cell / Wi-Fi
    /// report).
    pub fn to_record(&self, received: DateTime<Utc>) -> Record {
        let mut r = Record::new(self.id.clone(), P, received);
        r.device_time = self.time.unwrap_or(received);
        let accuracy = self
            .accuracy
            .map(|a| a as f32)
            .or_else(|| self.hdop.map(|h| hdop_to_accuracy_m(h as f32)));
        r.battery_pct = self.battery.map(|b| b.clamp(0.0, 100.0).round() as u8);
        r.charging = self.charge;
        r.cells = self.cells.clone();
        r.wifi = self.wifi.clone();
        let (Some(lat), Some(lon)) = (self.lat, self.lon) else {
            return r;
        };
        r.position = Some(Position {
            lat,
            lon,
            accuracy_m: accuracy,
            speed_kmh: self.speed_knots.map(|s| (s * KNOTS_TO_KMH) as f32),
            course_deg: self.bearing.map(|b| b as f32),
            altitude_m: self.altitude.map(|a| a as f32),
            satellites: None,
            valid: self.valid.unwrap_or(true),
            source: FixSource::Gnss,
        });
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
            ("lat", self.lat),
            ("lon", self.lon),
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
        for c in &self.cells {
            let mut v = format!("{},{},{},{}", c.mcc, c.mnc, c.lac, c.cell_id);
            if let Some(s) = c.signal {
                v.push_str(&format!(",{s}"));
            }
            q.append_pair("cell", &v);
        }
        for w in &self.wifi {
            let Some(s) = w.signal_dbm else {
                return Err(EncodeError::new(P, "wifi", "signal required"));
            };
            q.append_pair("wifi", &format!("{},{s}", w.mac));
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

/// `mcc,mnc,lac,cid[,signal]`.
fn parse_cell(v: &str) -> Result<CellTower, DecodeError> {
    let f: Vec<&str> = v.split(',').map(str::trim).collect();
    let e = || bad("cell", format!("{v:?} is not mcc,mnc,lac,cid[,signal]"));
    if !(4..=5).contains(&f.len()) {
        return Err(e());
    }
    Ok(CellTower {
        mcc: f[0].parse().map_err(|_| e())?,
        mnc: f[1].parse().map_err(|_| e())?,
        lac: f[2].parse().map_err(|_| e())?,
        cell_id: f[3].parse().map_err(|_| e())?,
        signal: match f.get(4) {
            Some(s) => Some(s.parse().map_err(|_| e())?),
            None => None,
        },
    })
}

/// `mac,signal`, the MAC with `:` or `-` separators.
fn parse_wifi(v: &str) -> Result<WifiAccessPoint, DecodeError> {
    let e = || bad("wifi", format!("{v:?} is not mac,signal"));
    let (mac, sig) = v.split_once(',').ok_or_else(e)?;
    let mac = mac.trim().replace('-', ":").to_ascii_lowercase();
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(e());
    }
    Ok(WifiAccessPoint {
        mac,
        signal_dbm: Some(sig.trim().parse().map_err(|_| e())?),
    })
}

fn check_report(rep: &OsmandReport) -> Result<(), DecodeError> {
    if rep.id.is_empty() {
        return Err(bad("id", "missing id parameter"));
    }
    if rep.id.len() > 64 {
        return Err(bad("id", "longer than 64 characters"));
    }
    match (rep.lat, rep.lon) {
        (Some(lat), Some(lon)) => {
            if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                return Err(bad(
                    "position",
                    format!("lat {lat} / lon {lon} out of range"),
                ));
            }
        }
        (None, None) if !rep.cells.is_empty() || !rep.wifi.is_empty() => {}
        _ => return Err(bad("position", "missing lat/lon (and no cell or wifi)")),
    }
    if rep.cells.len() + rep.wifi.len() > MAX_NETWORKS {
        return Err(bad("network", "too many cells / access points"));
    }
    if let Some(b) = rep.battery {
        if !(0.0..=100.0).contains(&b) {
            return Err(bad("batt", format!("{b} is not a percentage")));
        }
    }
    Ok(())
}

/// True when `input` is a JSON body rather than a query.
pub fn is_json(input: &str) -> bool {
    matches!(input.trim_start().as_bytes().first(), Some(b'{' | b'['))
}

/// Decode every report of a request: a query / form body (one report) or a Traccar
/// Client JSON body (one or more locations of one device).
pub fn decode_all(input: &str) -> Result<Vec<OsmandReport>, DecodeError> {
    if is_json(input) {
        decode_json(input.as_bytes())
    } else {
        decode(input).map(|r| vec![r])
    }
}

/// Decode a Traccar Client JSON body (see the module docs).
pub fn decode_json(body: &[u8]) -> Result<Vec<OsmandReport>, DecodeError> {
    if body.len() > MAX_BODY_LEN {
        return Err(DecodeError::Oversized {
            protocol: P,
            len: body.len(),
            max: MAX_BODY_LEN,
        });
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| bad("json", e.to_string()))?;
    let top = v.as_object().ok_or_else(|| bad("json", "not an object"))?;
    let id = match top.get("device_id").or_else(|| top.get("id")) {
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(bad("id", "missing device_id")),
    };
    let locations: Vec<&Value> = match top.get("location") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(o @ Value::Object(_)) => vec![o],
        _ => return Err(bad("location", "missing location object")),
    };
    if locations.is_empty() || locations.len() > MAX_BATCH {
        return Err(bad(
            "location",
            format!("{} locations (1..={MAX_BATCH})", locations.len()),
        ));
    }
    locations
        .into_iter()
        .map(|l| json_location(&id, l))
        .collect()
}

fn json_num(v: Option<&Value>, key: &'static str) -> Result<Option<f64>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| bad(key, "not a finite number")),
        Some(Value::String(s)) => parse_num(key, s).map(Some),
        Some(_) => Err(bad(key, "not a number")),
    }
}

fn json_bool(v: Option<&Value>, key: &'static str) -> Result<Option<bool>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => parse_bool(key, s).map(Some),
        Some(Value::Number(n)) => Ok(Some(n.as_f64() != Some(0.0))),
        Some(_) => Err(bad(key, "not a boolean")),
    }
}

/// Negative values mean "unknown" in the location library's schema.
fn known(v: Option<f64>) -> Option<f64> {
    v.filter(|x| *x >= 0.0)
}

fn json_location(id: &str, l: &Value) -> Result<OsmandReport, DecodeError> {
    let coords = l
        .get("coords")
        .ok_or_else(|| bad("coords", "missing location.coords"))?;
    let lat = json_num(coords.get("latitude"), "latitude")?;
    let lon = json_num(coords.get("longitude"), "longitude")?;
    let mut rep = OsmandReport::new(id, 0.0, 0.0);
    rep.lat = lat;
    rep.lon = lon;
    rep.time = match l.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_timestamp(s)?),
        Some(Value::Number(n)) => Some(parse_timestamp(&n.to_string())?),
        Some(_) => return Err(bad("timestamp", "not a string or number")),
    };
    rep.accuracy = known(json_num(coords.get("accuracy"), "accuracy")?);
    rep.speed_knots = known(json_num(coords.get("speed"), "speed")?).map(|ms| ms * MS_TO_KNOTS);
    rep.bearing = known(json_num(coords.get("heading"), "heading")?);
    rep.altitude = json_num(coords.get("altitude"), "altitude")?;
    if let Some(b) = l.get("battery") {
        // 0–1 fraction; -1 = unknown.
        rep.battery = known(json_num(b.get("level"), "battery.level")?).map(|f| {
            if f <= 1.0 {
                f * 100.0
            } else {
                f
            }
        });
        rep.charge = json_bool(b.get("is_charging"), "battery.is_charging")?;
    }
    rep.moving = json_bool(l.get("is_moving"), "is_moving")?;
    check_report(&rep)?;
    Ok(rep)
}

/// Decode one OsmAnd report from a URL, request line, query string, or a JSON body with
/// exactly one location.
pub fn decode(input: &str) -> Result<OsmandReport, DecodeError> {
    if is_json(input) {
        let mut all = decode_json(input.as_bytes())?;
        if all.len() != 1 {
            return Err(bad("location", "several locations: use decode_all"));
        }
        return Ok(all.remove(0));
    }
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
    rep.lat = None;
    rep.lon = None;
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
            "cell" if rep.cells.len() < MAX_NETWORKS => rep.cells.push(parse_cell(&v)?),
            "wifi" if rep.wifi.len() < MAX_NETWORKS => rep.wifi.push(parse_wifi(&v)?),
            "cell" | "wifi" => return Err(bad("network", "too many cells / access points")),
            _ => {}
        }
    }
    rep.id = id.unwrap_or_default();
    rep.lat = lat;
    rep.lon = lon;
    check_report(&rep)?;
    Ok(rep)
}
