//! Parsing and validation of the zone editor's input, with one message per offending field.
//!
//! Input (JSON object):
//! ```json
//! { "name": "Home", "kind": "inclusion", "is_curfew_home": true,
//!   "shape": "polygon", "coordinates": [[12.50,55.60],[12.51,55.60],[12.51,55.61]],
//!   "windows": [{"day":1,"start":"21:00","end":"07:00"}],
//!   "exceptions": [{"kind":"absence","start":"2024-05-01T18:00:00Z","end":"2024-05-01T23:00:00Z","note":"hospital"}] }
//! ```
//! or `"shape": "circle", "center": [lon, lat], "radius_m": 150`. `coordinates` may also be the
//! pasted text of such an array, or a list of rings (`[[[lon,lat],...], ...]`, first = exterior).
//! A dynamic (victim-protection) zone is `"shape": "dynamic", "device_id": "<victim device>",
//! "radius_m": 500` with `"kind": "exclusion"`: a circle that follows the protected person's
//! device. Whether the device exists and may be a victim device, and who may save such a zone,
//! is checked by the API (supervisors only).

use chrono::{DateTime, NaiveTime, Timelike, Utc};
use em_model::{
    ExceptionKind, LonLat, ScheduleException, ScheduleSpec, WeeklyWindow, ZoneGeometry, ZoneKind,
};
use serde_json::Value;

use crate::error::FieldErrors;

/// Largest accepted circle radius (metres).
pub const MAX_RADIUS_M: f64 = 100_000.0;
/// Smallest radius of a dynamic (victim-protection) zone, metres: below GNSS accuracy a
/// protection circle would only produce noise.
pub const MIN_DYNAMIC_RADIUS_M: f64 = 50.0;
/// Largest radius of a dynamic zone, metres.
pub const MAX_DYNAMIC_RADIUS_M: f64 = 50_000.0;
/// Most vertices accepted in one ring.
pub const MAX_RING_POINTS: usize = 2_000;

/// A validated zone, ready to become a `ZoneSpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneDraft {
    pub name: String,
    pub kind: ZoneKind,
    pub geometry: ZoneGeometry,
    pub schedule: Option<ScheduleSpec>,
    pub is_curfew_home: bool,
}

/// Parse `"HH:MM"` (00:00..23:59).
pub fn parse_hhmm(s: &str) -> Option<NaiveTime> {
    let (h, m) = s.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    NaiveTime::from_hms_opt(h, m, 0)
}

/// Validate zone editor input; `Err` holds one message per bad field.
pub fn parse_zone(input: &Value) -> Result<ZoneDraft, FieldErrors> {
    let mut errors = FieldErrors::new();
    let Some(obj) = input.as_object() else {
        errors.insert("_".into(), "expected a JSON object".into());
        return Err(errors);
    };

    let name = match obj.get("name").and_then(Value::as_str).map(str::trim) {
        Some("") => {
            errors.insert("name".into(), "must not be empty".into());
            None
        }
        Some(n) if n.chars().count() > 100 => {
            errors.insert("name".into(), "must be at most 100 characters".into());
            None
        }
        Some(n) => Some(n.to_string()),
        None => {
            errors.insert("name".into(), "is required".into());
            None
        }
    };

    let kind = match obj.get("kind").and_then(Value::as_str) {
        Some("inclusion") => Some(ZoneKind::Inclusion),
        Some("exclusion") => Some(ZoneKind::Exclusion),
        _ => {
            errors.insert(
                "kind".into(),
                "must be \"inclusion\" or \"exclusion\"".into(),
            );
            None
        }
    };

    let is_curfew_home = match obj.get("is_curfew_home") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.insert("is_curfew_home".into(), "must be true or false".into());
            false
        }
    };
    let geometry = parse_geometry(obj, &mut errors);
    // By the requested shape, so the kind is reported even when the geometry has errors too.
    if obj.get("shape").and_then(Value::as_str) == Some("dynamic") {
        if kind == Some(ZoneKind::Inclusion) {
            errors.insert(
                "kind".into(),
                "a dynamic (victim-protection) zone must be an exclusion zone".into(),
            );
        }
        if is_curfew_home {
            errors.insert(
                "is_curfew_home".into(),
                "a dynamic zone cannot be a curfew home".into(),
            );
        }
    }
    if is_curfew_home && kind == Some(ZoneKind::Exclusion) {
        errors.insert(
            "is_curfew_home".into(),
            "a curfew home zone must be an inclusion zone".into(),
        );
    }

    let schedule = parse_schedule(obj, &mut errors);
    if is_curfew_home && matches!(&schedule, Some(None)) {
        errors.insert(
            "windows".into(),
            "a curfew home zone needs at least one weekly window or exception".into(),
        );
    }

    match (name, kind, geometry, schedule) {
        (Some(name), Some(kind), Some(geometry), Some(schedule)) if errors.is_empty() => {
            Ok(ZoneDraft {
                name,
                kind,
                geometry,
                schedule,
                is_curfew_home,
            })
        }
        _ => {
            if errors.is_empty() {
                errors.insert("_".into(), "invalid zone".into());
            }
            Err(errors)
        }
    }
}

fn parse_lonlat(v: &Value) -> Result<LonLat, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| "each point must be [lon, lat]".to_string())?;
    if arr.len() != 2 {
        return Err("each point must be [lon, lat]".into());
    }
    let (Some(lon), Some(lat)) = (
        arr.first().and_then(Value::as_f64),
        arr.get(1).and_then(Value::as_f64),
    ) else {
        return Err("point coordinates must be numbers".into());
    };
    if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
        return Err(format!("longitude {lon} is outside -180..180"));
    }
    if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
        return Err(format!(
            "latitude {lat} is outside -90..90 (points are [lon, lat])"
        ));
    }
    Ok([lon, lat])
}

fn parse_geometry(
    obj: &serde_json::Map<String, Value>,
    errors: &mut FieldErrors,
) -> Option<ZoneGeometry> {
    match obj.get("shape").and_then(Value::as_str) {
        Some("polygon") => {
            let raw = match obj.get("coordinates") {
                Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                    Ok(v) => v,
                    Err(e) => {
                        errors.insert(
                            "coordinates".into(),
                            format!("not valid JSON: {e} (paste [[lon,lat],...])"),
                        );
                        return None;
                    }
                },
                Some(v) => v.clone(),
                None => {
                    errors.insert("coordinates".into(), "is required for a polygon".into());
                    return None;
                }
            };
            // A pasted GeoJSON geometry object.
            let raw = match raw.get("coordinates") {
                Some(inner) if raw.is_object() => inner.clone(),
                _ => raw,
            };
            match parse_rings(&raw) {
                Ok(rings) => Some(ZoneGeometry::Polygon { rings }),
                Err(msg) => {
                    errors.insert("coordinates".into(), msg);
                    None
                }
            }
        }
        Some("circle") => {
            let center = match obj.get("center").map(parse_lonlat) {
                Some(Ok(c)) => Some(c),
                Some(Err(msg)) => {
                    errors.insert("center".into(), msg);
                    None
                }
                None => {
                    errors.insert("center".into(), "is required for a circle".into());
                    None
                }
            };
            let radius = match obj.get("radius_m").and_then(Value::as_f64) {
                Some(r) if !r.is_finite() || r <= 0.0 => {
                    errors.insert("radius_m".into(), "must be > 0".into());
                    None
                }
                Some(r) if r > MAX_RADIUS_M => {
                    errors.insert(
                        "radius_m".into(),
                        format!("must be at most {MAX_RADIUS_M} m"),
                    );
                    None
                }
                Some(r) => Some(r),
                None => {
                    errors.insert("radius_m".into(), "must be a number of metres".into());
                    None
                }
            };
            Some(ZoneGeometry::Circle {
                center: center?,
                radius_m: radius?,
            })
        }
        Some("dynamic") => {
            let device_id = match obj.get("device_id").and_then(Value::as_str).map(str::trim) {
                Some(d) if valid_device_id(d) => Some(d.to_string()),
                Some(_) => {
                    errors.insert(
                        "device_id".into(),
                        "must be a device id (1-64 letters, digits, - _ . :)".into(),
                    );
                    None
                }
                None => {
                    errors.insert(
                        "device_id".into(),
                        "is required for a dynamic zone (the protected person's device)".into(),
                    );
                    None
                }
            };
            let radius = match obj.get("radius_m").and_then(Value::as_f64) {
                Some(r)
                    if r.is_finite()
                        && (MIN_DYNAMIC_RADIUS_M..=MAX_DYNAMIC_RADIUS_M).contains(&r) =>
                {
                    Some(r)
                }
                Some(_) => {
                    errors.insert(
                        "radius_m".into(),
                        format!(
                            "must be between {MIN_DYNAMIC_RADIUS_M} and {MAX_DYNAMIC_RADIUS_M} m"
                        ),
                    );
                    None
                }
                None => {
                    errors.insert("radius_m".into(), "must be a number of metres".into());
                    None
                }
            };
            Some(ZoneGeometry::Dynamic {
                device_id: device_id?,
                radius_m: radius?,
            })
        }
        _ => {
            errors.insert(
                "shape".into(),
                "must be \"polygon\", \"circle\" or \"dynamic\"".into(),
            );
            None
        }
    }
}

/// Same rule as the device registry's ids.
fn valid_device_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// `[[lon,lat],...]` (one ring) or `[[[lon,lat],...],...]` (exterior + holes).
fn parse_rings(v: &Value) -> Result<Vec<Vec<LonLat>>, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| "must be a list of [lon, lat] points".to_string())?;
    let nested = arr
        .first()
        .and_then(Value::as_array)
        .and_then(|p| p.first())
        .is_some_and(Value::is_array);
    let ring_values: Vec<&Value> = if nested {
        arr.iter().collect()
    } else {
        vec![v]
    };
    let mut rings = Vec::with_capacity(ring_values.len());
    for (ri, rv) in ring_values.into_iter().enumerate() {
        let label = if ri == 0 {
            "outer ring".to_string()
        } else {
            format!("hole {ri}")
        };
        let pts = rv
            .as_array()
            .ok_or_else(|| format!("{label}: must be a list of [lon, lat] points"))?;
        if pts.len() > MAX_RING_POINTS {
            return Err(format!("{label}: more than {MAX_RING_POINTS} points"));
        }
        let mut ring = Vec::with_capacity(pts.len());
        for (pi, p) in pts.iter().enumerate() {
            ring.push(parse_lonlat(p).map_err(|m| format!("{label}, point {}: {m}", pi + 1))?);
        }
        if ring.len() > 1 && ring.first() == ring.last() {
            ring.pop();
        }
        ring.dedup();
        if ring.len() < 3 {
            return Err(format!("{label}: needs at least 3 distinct points"));
        }
        if let Some((a, b)) = self_intersection(&ring) {
            return Err(format!(
                "{label}: edges {} and {} cross each other",
                a + 1,
                b + 1
            ));
        }
        if ring_area_m2(&ring) < 1.0 {
            return Err(format!("{label}: has no area (points are on one line)"));
        }
        rings.push(ring);
    }
    Ok(rings)
}

/// Approximate planar area (m²) using a local equirectangular projection.
fn ring_area_m2(ring: &[LonLat]) -> f64 {
    let lat0 = ring.iter().map(|p| p[1]).sum::<f64>() / ring.len() as f64;
    let k = 111_320.0;
    let kx = k * lat0.to_radians().cos();
    let mut s = 0.0;
    for (i, a) in ring.iter().enumerate() {
        let b = ring[(i + 1) % ring.len()];
        s += (a[0] * kx) * (b[1] * k) - (b[0] * kx) * (a[1] * k);
    }
    (s / 2.0).abs()
}

fn orient(a: LonLat, b: LonLat, c: LonLat) -> f64 {
    (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
}

fn segments_cross(p1: LonLat, p2: LonLat, q1: LonLat, q2: LonLat) -> bool {
    let d1 = orient(q1, q2, p1);
    let d2 = orient(q1, q2, p2);
    let d3 = orient(p1, p2, q1);
    let d4 = orient(p1, p2, q2);
    ((d1 > 0.0 && d2 < 0.0) || (d1 < 0.0 && d2 > 0.0))
        && ((d3 > 0.0 && d4 < 0.0) || (d3 < 0.0 && d4 > 0.0))
}

/// First pair of non-adjacent edges that properly cross, if any.
fn self_intersection(ring: &[LonLat]) -> Option<(usize, usize)> {
    let n = ring.len();
    for i in 0..n {
        let (a1, a2) = (ring[i], ring[(i + 1) % n]);
        for j in (i + 2)..n {
            if i == 0 && j == n - 1 {
                continue; // adjacent through the closing edge
            }
            let (b1, b2) = (ring[j], ring[(j + 1) % n]);
            if segments_cross(a1, a2, b1, b2) {
                return Some((i, j));
            }
        }
    }
    None
}

/// `Some(None)` = no schedule (always active); `Some(Some(_))` = schedule; `None` = errors.
const WEEK_MIN: u32 = 7 * 24 * 60;

/// A weekly window as [start, start + length) in minutes from Monday 00:00 (the end may pass
/// the end of the week: the week is a circle).
fn week_span(w: &WeeklyWindow) -> Option<(u32, u32)> {
    let minutes = |t: &str| parse_hhmm(t).map(|t| t.hour() * 60 + t.minute());
    let (s, e) = (minutes(&w.start)?, minutes(&w.end)?);
    let start = (u32::from(w.day).checked_sub(1)?) * 24 * 60 + s;
    let len = if e > s { e - s } else { e + 24 * 60 - s };
    Some((start, start + len))
}

/// Whether two spans of the weekly circle share a minute.
fn spans_overlap(a: (u32, u32), b: (u32, u32)) -> bool {
    let w = i64::from(WEEK_MIN);
    let (a0, a1) = (i64::from(a.0), i64::from(a.1));
    [-w, 0, w].iter().any(|k| {
        let (b0, b1) = (i64::from(b.0) + k, i64::from(b.1) + k);
        a0 < b1 && b0 < a1
    })
}

/// Whether two zone geometries overlap, by points of each tested against the other (circle
/// centres and rims, polygon vertices and ring centres). Dynamic zones move and are not
/// compared.
pub fn geometries_overlap(a: &ZoneGeometry, b: &ZoneGeometry) -> bool {
    use em_geofence::CompiledGeometry;
    fn probes(g: &ZoneGeometry) -> Vec<LonLat> {
        match g {
            ZoneGeometry::Circle { center, radius_m } => {
                let mut v = vec![*center];
                let dlat = radius_m / 111_320.0;
                let dlon = dlat / center[1].to_radians().cos().max(0.01);
                for k in 0..8 {
                    let t = f64::from(k) * std::f64::consts::FRAC_PI_4;
                    v.push([center[0] + dlon * t.cos(), center[1] + dlat * t.sin()]);
                }
                v
            }
            ZoneGeometry::Polygon { rings } => ring_probes(rings),
            ZoneGeometry::MultiPolygon { polygons } => {
                polygons.iter().flat_map(|r| ring_probes(r)).collect()
            }
            ZoneGeometry::Dynamic { .. } => Vec::new(),
        }
    }
    fn ring_probes(rings: &[Vec<LonLat>]) -> Vec<LonLat> {
        let Some(outer) = rings.first() else {
            return Vec::new();
        };
        let mut v = outer.clone();
        if !outer.is_empty() {
            let n = outer.len() as f64;
            let c = outer
                .iter()
                .fold([0.0, 0.0], |acc, p| [acc[0] + p[0] / n, acc[1] + p[1] / n]);
            v.push(c);
        }
        v
    }
    let (Ok(ca), Ok(cb)) = (
        CompiledGeometry::compile(0, a),
        CompiledGeometry::compile(0, b),
    ) else {
        return false;
    };
    let inside = |g: &CompiledGeometry, p: &LonLat| {
        g.signed_distance_m(p[0], p[1]).is_some_and(|d| d <= 0.0)
    };
    probes(a).iter().any(|p| inside(&cb, p)) || probes(b).iter().any(|p| inside(&ca, p))
}

fn parse_schedule(
    obj: &serde_json::Map<String, Value>,
    errors: &mut FieldErrors,
) -> Option<Option<ScheduleSpec>> {
    let before = errors.len();
    let mut windows = Vec::new();
    // Where each kept window stands in the input (errors name the input's index).
    let mut positions: Vec<usize> = Vec::new();
    match obj.get("windows") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, w) in items.iter().enumerate() {
                let day = w.get("day").and_then(Value::as_u64);
                let day = match day {
                    Some(d @ 1..=7) => Some(d as u8),
                    _ => {
                        errors.insert(
                            format!("windows[{i}].day"),
                            "must be 1 (Monday) .. 7 (Sunday)".into(),
                        );
                        None
                    }
                };
                let mut time = |field: &str| -> Option<String> {
                    let s = w.get(field).and_then(Value::as_str).unwrap_or("");
                    match parse_hhmm(s) {
                        Some(t) => Some(t.format("%H:%M").to_string()),
                        None => {
                            errors.insert(
                                format!("windows[{i}].{field}"),
                                "must be a time HH:MM (00:00-23:59)".into(),
                            );
                            None
                        }
                    }
                };
                let start = time("start");
                let end = time("end");
                if let (Some(day), Some(start), Some(end)) = (day, start, end) {
                    if start == end {
                        // 22:00-22:00 could mean nothing or a whole day: say which.
                        errors.insert(
                            format!("windows[{i}].end"),
                            "must differ from start (for a whole day, use 00:00-23:59 or two windows)"
                                .into(),
                        );
                    } else {
                        positions.push(i);
                        windows.push(WeeklyWindow { day, start, end });
                    }
                }
            }
        }
        Some(_) => {
            errors.insert("windows".into(), "must be a list of weekly windows".into());
        }
    }
    // Windows of one zone must not overlap (on the weekly circle, across midnight and Sunday
    // to Monday): an overlap is a typing mistake, and it makes the required hours count twice.
    let spans: Vec<(usize, (u32, u32))> = positions
        .iter()
        .zip(&windows)
        .filter_map(|(&at, w)| week_span(w).map(|span| (at, span)))
        .collect();
    for (j, &(at_j, span_j)) in spans.iter().enumerate() {
        if let Some(&(at_i, _)) = spans[..j]
            .iter()
            .find(|(_, span_i)| spans_overlap(*span_i, span_j))
        {
            errors.insert(
                format!("windows[{at_j}].start"),
                format!("overlaps windows[{at_i}]"),
            );
        }
    }
    let mut exceptions = Vec::new();
    match obj.get("exceptions") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, x) in items.iter().enumerate() {
                let kind = match x.get("kind").and_then(Value::as_str) {
                    Some("absence") => Some(ExceptionKind::Absence),
                    Some("extra_curfew") => Some(ExceptionKind::ExtraCurfew),
                    _ => {
                        errors.insert(
                            format!("exceptions[{i}].kind"),
                            "must be \"absence\" or \"extra_curfew\"".into(),
                        );
                        None
                    }
                };
                let mut instant = |field: &str| -> Option<DateTime<Utc>> {
                    let s = x.get(field).and_then(Value::as_str).unwrap_or("");
                    match DateTime::parse_from_rfc3339(s.trim()) {
                        Ok(t) => Some(t.with_timezone(&Utc)),
                        Err(_) => {
                            errors.insert(
                                format!("exceptions[{i}].{field}"),
                                "must be a date-time like 2024-05-01T18:00:00Z".into(),
                            );
                            None
                        }
                    }
                };
                let start = instant("start");
                let end = instant("end");
                let note = match x.get("note") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) if s.chars().count() <= 500 => {
                        Some(s.trim().to_string()).filter(|s| !s.is_empty())
                    }
                    Some(_) => {
                        errors.insert(
                            format!("exceptions[{i}].note"),
                            "must be text of at most 500 characters".into(),
                        );
                        None
                    }
                };
                if let (Some(s), Some(e)) = (start, end) {
                    if e <= s {
                        errors.insert(
                            format!("exceptions[{i}].end"),
                            "must be after the start".into(),
                        );
                    } else if e - s > chrono::Duration::days(366) {
                        errors.insert(
                            format!("exceptions[{i}].end"),
                            "an exception may last at most 366 days".into(),
                        );
                    } else if let Some(kind) = kind {
                        exceptions.push(ScheduleException {
                            kind,
                            start: s,
                            end: e,
                            note,
                        });
                    }
                }
            }
        }
        Some(_) => {
            errors.insert("exceptions".into(), "must be a list of exceptions".into());
        }
    }
    if errors.len() != before {
        return None;
    }
    if windows.is_empty() && exceptions.is_empty() {
        Some(None)
    } else {
        Some(Some(ScheduleSpec {
            windows,
            exceptions,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn circle_ok_and_radius_error() {
        let ok = parse_zone(&json!({"name":"Home","kind":"inclusion","shape":"circle",
            "center":[12.5,55.6],"radius_m":150}))
        .expect("valid");
        assert_eq!(
            ok.geometry,
            ZoneGeometry::Circle {
                center: [12.5, 55.6],
                radius_m: 150.0
            }
        );
        assert_eq!(ok.schedule, None);
        let err = parse_zone(&json!({"name":"Home","kind":"inclusion","shape":"circle",
            "center":[12.5,55.6],"radius_m":0}))
        .expect_err("invalid");
        assert_eq!(err.get("radius_m").map(String::as_str), Some("must be > 0"));
    }

    #[test]
    fn polygon_text_and_errors() {
        let ok = parse_zone(&json!({"name":"Park","kind":"exclusion","shape":"polygon",
            "coordinates":"[[12.5,55.6],[12.51,55.6],[12.51,55.61],[12.5,55.61],[12.5,55.6]]"}))
        .expect("valid");
        match ok.geometry {
            ZoneGeometry::Polygon { rings } => assert_eq!(rings[0].len(), 4),
            other => panic!("unexpected {other:?}"),
        }
        let bow = parse_zone(&json!({"name":"X","kind":"exclusion","shape":"polygon",
            "coordinates":[[0.0,0.0],[1.0,1.0],[1.0,0.0],[0.0,1.0]]}))
        .expect_err("self-intersecting");
        assert!(bow["coordinates"].contains("cross"), "{bow:?}");
        let line = parse_zone(&json!({"name":"X","kind":"exclusion","shape":"polygon",
            "coordinates":[[0.0,0.0],[1.0,1.0],[2.0,2.0]]}))
        .expect_err("collinear");
        assert!(line["coordinates"].contains("no area"));
        let swapped = parse_zone(&json!({"name":"X","kind":"exclusion","shape":"polygon",
            "coordinates":[[55.6,120.0],[1.0,1.0],[2.0,0.0]]}))
        .expect_err("lat out of range");
        assert!(swapped["coordinates"].contains("latitude"));
    }

    #[test]
    fn schedule_errors_are_per_field() {
        let err = parse_zone(&json!({"name":"","kind":"sideways","shape":"circle",
            "center":[12.5,55.6],"radius_m":10,
            "windows":[{"day":8,"start":"21:00","end":"7am"}],
            "exceptions":[{"kind":"absence","start":"2024-05-02T00:00:00Z","end":"2024-05-01T00:00:00Z"}]}))
        .expect_err("invalid");
        for f in [
            "name",
            "kind",
            "windows[0].day",
            "windows[0].end",
            "exceptions[0].end",
        ] {
            assert!(err.contains_key(f), "missing {f} in {err:?}");
        }
        assert!(!err.contains_key("windows[0].start"));
    }

    fn windows(ws: serde_json::Value) -> Result<ZoneDraft, FieldErrors> {
        parse_zone(&json!({"name":"Home","kind":"inclusion","shape":"circle",
            "center":[12.5,55.6],"radius_m":100, "windows": ws}))
    }

    #[test]
    fn empty_and_overlapping_windows_are_refused() {
        let err = windows(json!([{"day":1,"start":"22:00","end":"22:00"}])).expect_err("0 or 24 h");
        assert!(err.contains_key("windows[0].end"), "{err:?}");
        // Monday 21:00-07:00 runs into Tuesday; Tuesday 06:00-08:00 overlaps it.
        let err = windows(json!([{"day":1,"start":"21:00","end":"07:00"},
                                 {"day":2,"start":"06:00","end":"08:00"}]))
        .expect_err("overlap");
        assert_eq!(
            err.get("windows[1].start").map(String::as_str),
            Some("overlaps windows[0]")
        );
        // Sunday night into Monday morning overlaps a Monday window (the week is a circle).
        let err = windows(json!([{"day":1,"start":"05:00","end":"06:00"},
                                 {"day":7,"start":"22:00","end":"06:00"}]))
        .expect_err("wraps the week");
        assert!(err.contains_key("windows[1].start"), "{err:?}");
        // Back to back is fine, and so is every night of the week.
        windows(json!([{"day":1,"start":"21:00","end":"07:00"},
                       {"day":2,"start":"07:00","end":"08:00"}]))
        .expect("adjacent");
        let nights: Vec<_> = (1..=7)
            .map(|d| json!({"day": d, "start": "21:00", "end": "07:00"}))
            .collect();
        windows(json!(nights)).expect("every night");
    }

    #[test]
    fn overlapping_geometries_are_found() {
        let home = ZoneGeometry::Circle {
            center: [12.5, 55.6],
            radius_m: 50.0,
        };
        let over = ZoneGeometry::Circle {
            center: [12.5005, 55.6],
            radius_m: 200.0,
        };
        let far = ZoneGeometry::Circle {
            center: [12.6, 55.6],
            radius_m: 200.0,
        };
        let square = ZoneGeometry::Polygon {
            rings: vec![vec![
                [12.49, 55.59],
                [12.51, 55.59],
                [12.51, 55.61],
                [12.49, 55.61],
                [12.49, 55.59],
            ]],
        };
        assert!(geometries_overlap(&home, &over));
        assert!(geometries_overlap(&over, &home));
        assert!(!geometries_overlap(&home, &far));
        assert!(
            geometries_overlap(&square, &home),
            "the home inside a large square"
        );
        assert!(!geometries_overlap(&square, &far));
    }

    #[test]
    fn curfew_home_needs_schedule_and_inclusion() {
        let err = parse_zone(
            &json!({"name":"Home","kind":"exclusion","is_curfew_home":true,
            "shape":"circle","center":[12.5,55.6],"radius_m":50}),
        )
        .expect_err("invalid");
        assert!(err.contains_key("is_curfew_home"));
        assert!(err.contains_key("windows"));
        let ok = parse_zone(
            &json!({"name":"Home","kind":"inclusion","is_curfew_home":true,
            "shape":"circle","center":[12.5,55.6],"radius_m":50,
            "windows":[{"day":1,"start":"21:00","end":"07:00"}]}),
        )
        .expect("valid");
        assert_eq!(ok.schedule.map(|s| s.windows.len()), Some(1));
    }

    #[test]
    fn dynamic_zone_shape() {
        let ok = parse_zone(
            &json!({"name":"Victim","kind":"exclusion","shape":"dynamic",
            "device_id":"victim-7","radius_m":500}),
        )
        .expect("valid");
        assert_eq!(
            ok.geometry,
            ZoneGeometry::Dynamic {
                device_id: "victim-7".into(),
                radius_m: 500.0
            }
        );
        let err = parse_zone(
            &json!({"name":"Victim","kind":"inclusion","shape":"dynamic",
            "device_id":"bad id!","radius_m":10}),
        )
        .expect_err("invalid");
        for f in ["kind", "device_id", "radius_m"] {
            assert!(err.contains_key(f), "missing {f} in {err:?}");
        }
        let err = parse_zone(
            &json!({"name":"Victim","kind":"exclusion","shape":"dynamic",
            "radius_m":60000}),
        )
        .expect_err("invalid");
        assert!(err.contains_key("device_id") && err.contains_key("radius_m"));
        let err = parse_zone(&json!({"name":"V","kind":"exclusion","shape":"square"}))
            .expect_err("invalid");
        assert!(err["shape"].contains("dynamic"));
    }

    #[test]
    fn hhmm() {
        assert!(parse_hhmm("23:59").is_some());
        assert!(parse_hhmm("24:00").is_none());
        assert!(parse_hhmm("7:00").is_none());
        assert!(parse_hhmm("ab:cd").is_none());
    }
}
