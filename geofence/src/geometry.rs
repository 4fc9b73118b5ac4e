//! Zone geometry compiled from [`em_model::ZoneGeometry`]: validation, antimeridian
//! handling, bounding boxes and signed distances in metres.
//!
//! * Coordinates are WGS84 `[lon, lat]` degrees. Polygon edges are straight lines in
//!   lon/lat (as in GeoJSON, RFC 7946); containment is decided with `geo`.
//! * Distances are metres. Circle distances are haversine great-circle distances.
//!   The distance from a point to a polygon boundary is computed in a local
//!   equirectangular projection centred on the point (x scaled by `cos(lat)`), which is
//!   exact to well under 0.5 % within tens of kilometres of the point — the scale at
//!   which hysteresis thresholds (accuracy + buffer) are compared. It is never a
//!   distance in degrees.
//! * Latitudes beyond ±85° are rejected ([`GeofenceError::PolarLatitude`]).
//! * A ring whose consecutive longitudes jump by more than 180° crosses the antimeridian;
//!   its longitudes are unwrapped (e.g. 179, -179 becomes 179, 181) so the geometry is
//!   continuous in a shifted frame, and points are shifted by ±360° into that frame
//!   before testing. A zone spanning 180° of longitude or more is rejected.

use crate::GeofenceError;
use em_model::{LonLat, ZoneGeometry, ZoneId};
use geo::{
    Area, Coord, Distance, Haversine, InteriorPoint, Intersects, LineString, MultiPolygon, Point,
    Polygon,
};

/// Mean earth radius (IUGG), metres; the same value `geo`'s haversine uses.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;
/// Zones may not reach beyond this latitude (degrees).
pub const MAX_ABS_LAT: f64 = 85.0;
/// Largest circle radius accepted, metres.
pub const MAX_RADIUS_M: f64 = 1_000_000.0;
/// Metres per degree of latitude (and of longitude at the equator).
pub const M_PER_DEG: f64 = EARTH_RADIUS_M * std::f64::consts::PI / 180.0;

/// Great-circle distance between two `[lon, lat]` points, metres (haversine).
pub fn haversine_m(a: LonLat, b: LonLat) -> f64 {
    Haversine.distance(Point::new(a[0], a[1]), Point::new(b[0], b[1]))
}

/// Initial great-circle bearing from `from` to `to` (`[lon, lat]`), degrees clockwise from true
/// north in `[0, 360)`.
pub fn bearing_deg(from: LonLat, to: LonLat) -> f64 {
    let (l1, p1) = (from[0].to_radians(), from[1].to_radians());
    let (l2, p2) = (to[0].to_radians(), to[1].to_radians());
    let dl = l2 - l1;
    let y = dl.sin() * p2.cos();
    let x = p1.cos() * p2.sin() - p1.sin() * p2.cos() * dl.cos();
    y.atan2(x).to_degrees().rem_euclid(360.0)
}

/// Axis-aligned box in degrees, in the zone's own longitude frame (may exceed ±180 for
/// zones that cross the antimeridian).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BBox {
    pub min_lon: f64,
    pub min_lat: f64,
    pub max_lon: f64,
    pub max_lat: f64,
}

impl BBox {
    /// The box around `[lon, lat]` that contains every point within `radius_m` metres.
    pub fn around(lon: f64, lat: f64, radius_m: f64) -> BBox {
        let r = radius_m.max(0.0);
        let dlat = r / M_PER_DEG;
        let worst_lat = (lat.abs() + dlat).min(89.0);
        let dlon = (r / (M_PER_DEG * worst_lat.to_radians().cos())).min(180.0);
        BBox {
            min_lon: lon - dlon,
            min_lat: lat - dlat,
            max_lon: lon + dlon,
            max_lat: lat + dlat,
        }
    }

    /// Centre longitude: the reference of the zone's longitude frame.
    pub fn centre_lon(&self) -> f64 {
        (self.min_lon + self.max_lon) / 2.0
    }
}

/// A validated zone geometry.
#[derive(Debug, Clone, PartialEq)]
pub enum CompiledGeometry {
    /// One or more polygons (with holes), longitudes unwrapped into one continuous frame.
    Polygons {
        shape: MultiPolygon<f64>,
        bbox: BBox,
        /// Lower bound of the largest distance from an interior point to the boundary
        /// (inscribed radius), metres. Caps "clearly inside" margins for small zones.
        depth_m: f64,
    },
    Circle {
        center: LonLat,
        radius_m: f64,
        bbox: BBox,
    },
    /// Circle around another device's latest position.
    Dynamic { device_id: String, radius_m: f64 },
}

impl CompiledGeometry {
    /// Validate and compile a zone geometry.
    pub fn compile(zone_id: ZoneId, geometry: &ZoneGeometry) -> Result<Self, GeofenceError> {
        match geometry {
            ZoneGeometry::Polygon { rings } => {
                compile_polygons(zone_id, std::slice::from_ref(rings))
            }
            ZoneGeometry::MultiPolygon { polygons } => compile_polygons(zone_id, polygons),
            ZoneGeometry::Circle { center, radius_m } => {
                check_radius(zone_id, *radius_m)?;
                check_point(zone_id, *center)?;
                let bbox = BBox::around(center[0], center[1], *radius_m);
                for lat in [bbox.min_lat, bbox.max_lat] {
                    if lat.abs() > MAX_ABS_LAT {
                        return Err(GeofenceError::PolarLatitude { zone_id, lat });
                    }
                }
                Ok(CompiledGeometry::Circle {
                    center: *center,
                    radius_m: *radius_m,
                    bbox,
                })
            }
            ZoneGeometry::Dynamic {
                device_id,
                radius_m,
            } => {
                check_radius(zone_id, *radius_m)?;
                if device_id.trim().is_empty() {
                    return Err(GeofenceError::InvalidGeometry {
                        zone_id,
                        reason: "dynamic zone has an empty device_id".into(),
                    });
                }
                Ok(CompiledGeometry::Dynamic {
                    device_id: device_id.clone(),
                    radius_m: *radius_m,
                })
            }
        }
    }

    /// Bounding box (None for dynamic zones, whose centre moves).
    pub fn bbox(&self) -> Option<BBox> {
        match self {
            CompiledGeometry::Polygons { bbox, .. } | CompiledGeometry::Circle { bbox, .. } => {
                Some(*bbox)
            }
            CompiledGeometry::Dynamic { .. } => None,
        }
    }

    /// Inscribed radius (lower bound), metres: how deep inside the zone a point can be.
    pub fn depth_m(&self) -> f64 {
        match self {
            CompiledGeometry::Polygons { depth_m, .. } => *depth_m,
            CompiledGeometry::Circle { radius_m, .. }
            | CompiledGeometry::Dynamic { radius_m, .. } => *radius_m,
        }
    }

    /// Signed distance from `[lon, lat]` to the zone boundary in metres: positive outside,
    /// negative inside (its magnitude is the depth inside). `None` for dynamic zones (use
    /// [`dynamic_signed_distance_m`] with the other device's position).
    pub fn signed_distance_m(&self, lon: f64, lat: f64) -> Option<f64> {
        match self {
            CompiledGeometry::Polygons { shape, bbox, .. } => {
                let x = shift_into_frame(lon, bbox.centre_lon());
                Some(polygon_signed_distance(shape, x, lat))
            }
            CompiledGeometry::Circle {
                center, radius_m, ..
            } => Some(haversine_m([lon, lat], *center) - radius_m),
            CompiledGeometry::Dynamic { .. } => None,
        }
    }
}

/// Signed distance from `point` to a circle of `radius_m` around `center`, metres.
pub fn dynamic_signed_distance_m(point: LonLat, center: LonLat, radius_m: f64) -> f64 {
    haversine_m(point, center) - radius_m
}

/// Shift `lon` by a multiple of 360° so it lies within 180° of `reference`.
pub fn shift_into_frame(lon: f64, reference: f64) -> f64 {
    let mut x = lon;
    if x - reference > 180.0 {
        x -= 360.0 * ((x - reference + 180.0) / 360.0).floor();
    } else if x - reference < -180.0 {
        x += 360.0 * ((reference - x + 180.0) / 360.0).floor();
    }
    x
}

fn check_radius(zone_id: ZoneId, radius_m: f64) -> Result<(), GeofenceError> {
    if radius_m.is_finite() && radius_m > 0.0 && radius_m <= MAX_RADIUS_M {
        Ok(())
    } else {
        Err(GeofenceError::InvalidRadius { zone_id, radius_m })
    }
}

fn check_point(zone_id: ZoneId, p: LonLat) -> Result<(), GeofenceError> {
    let [lon, lat] = p;
    if !lon.is_finite() || !lat.is_finite() {
        return Err(GeofenceError::InvalidCoordinate {
            zone_id,
            reason: format!("non-finite coordinate [{lon}, {lat}]"),
        });
    }
    if lat.abs() > MAX_ABS_LAT {
        return Err(GeofenceError::PolarLatitude { zone_id, lat });
    }
    if lon.abs() > 180.0 {
        return Err(GeofenceError::InvalidCoordinate {
            zone_id,
            reason: format!("longitude {lon} outside -180..=180"),
        });
    }
    Ok(())
}

/// Validate one ring, drop the closing point and repeated points, unwrap longitudes so
/// consecutive points never differ by more than 180°.
fn clean_ring(
    zone_id: ZoneId,
    polygon: usize,
    ring: usize,
    pts: &[LonLat],
) -> Result<Vec<Coord<f64>>, GeofenceError> {
    let mut out: Vec<Coord<f64>> = Vec::with_capacity(pts.len());
    for p in pts {
        check_point(zone_id, *p)?;
        let mut x = p[0];
        if let Some(prev) = out.last() {
            x = shift_into_frame(x, prev.x);
            if x == prev.x && p[1] == prev.y {
                continue;
            }
        }
        out.push(Coord { x, y: p[1] });
    }
    if out.len() > 1 {
        if let (Some(first), Some(last)) = (out.first().copied(), out.last().copied()) {
            if (last.x - first.x).abs() < 1e-12 && last.y == first.y {
                out.pop();
            }
        }
    }
    let distinct = out.len();
    if distinct < 3 {
        return Err(GeofenceError::RingTooShort {
            zone_id,
            polygon,
            ring,
            points: distinct,
        });
    }
    Ok(out)
}

fn compile_polygons(
    zone_id: ZoneId,
    polygons: &[Vec<Vec<LonLat>>],
) -> Result<CompiledGeometry, GeofenceError> {
    if polygons.is_empty() {
        return Err(GeofenceError::InvalidGeometry {
            zone_id,
            reason: "no polygons".into(),
        });
    }
    // Clean and unwrap every ring, then align each ring to the first ring's frame.
    let mut reference: Option<f64> = None;
    let mut cleaned: Vec<Vec<Vec<Coord<f64>>>> = Vec::with_capacity(polygons.len());
    for (pi, rings) in polygons.iter().enumerate() {
        if rings.is_empty() {
            return Err(GeofenceError::InvalidGeometry {
                zone_id,
                reason: format!("polygon {pi} has no exterior ring"),
            });
        }
        let mut out_rings = Vec::with_capacity(rings.len());
        for (ri, ring) in rings.iter().enumerate() {
            let mut c = clean_ring(zone_id, pi, ri, ring)?;
            let first_x = c.first().map(|p| p.x).unwrap_or(0.0);
            let r = *reference.get_or_insert(first_x);
            let shift = shift_into_frame(first_x, r) - first_x;
            if shift != 0.0 {
                c.iter_mut().for_each(|p| p.x += shift);
            }
            out_rings.push(c);
        }
        cleaned.push(out_rings);
    }
    let mut bbox = BBox {
        min_lon: f64::INFINITY,
        min_lat: f64::INFINITY,
        max_lon: f64::NEG_INFINITY,
        max_lat: f64::NEG_INFINITY,
    };
    for c in cleaned.iter().flatten().flatten() {
        bbox.min_lon = bbox.min_lon.min(c.x);
        bbox.max_lon = bbox.max_lon.max(c.x);
        bbox.min_lat = bbox.min_lat.min(c.y);
        bbox.max_lat = bbox.max_lat.max(c.y);
    }
    if bbox.max_lon - bbox.min_lon >= 180.0 {
        return Err(GeofenceError::InvalidGeometry {
            zone_id,
            reason: format!(
                "zone spans {:.1}° of longitude (must be less than 180°)",
                bbox.max_lon - bbox.min_lon
            ),
        });
    }
    // Keep the frame centre within -180..=180.
    let centre = bbox.centre_lon();
    let shift = shift_into_frame(centre, 0.0) - centre;
    if shift != 0.0 {
        bbox.min_lon += shift;
        bbox.max_lon += shift;
        cleaned
            .iter_mut()
            .flatten()
            .flatten()
            .for_each(|c| c.x += shift);
    }

    let mut polys = Vec::with_capacity(cleaned.len());
    for (pi, rings) in cleaned.into_iter().enumerate() {
        let mut it = rings.into_iter();
        let Some(ext) = it.next() else { continue };
        let exterior = Polygon::new(LineString::new(ext), vec![]);
        if exterior.unsigned_area() <= 0.0 {
            return Err(GeofenceError::InvalidGeometry {
                zone_id,
                reason: format!("polygon {pi}: exterior ring has zero area"),
            });
        }
        let mut holes = Vec::new();
        for (hi, hole) in it.enumerate() {
            let hole_poly = Polygon::new(LineString::new(hole), vec![]);
            if hole_poly.unsigned_area() <= 0.0 {
                return Err(GeofenceError::InvalidGeometry {
                    zone_id,
                    reason: format!("polygon {pi}: hole {} has zero area", hi + 1),
                });
            }
            if !hole_poly
                .exterior()
                .coords()
                .all(|c| exterior.intersects(c))
            {
                return Err(GeofenceError::InvalidGeometry {
                    zone_id,
                    reason: format!(
                        "polygon {pi}: hole {} is not inside the exterior ring",
                        hi + 1
                    ),
                });
            }
            let (ls, _) = hole_poly.into_inner();
            holes.push(ls);
        }
        let (ext_ls, _) = exterior.into_inner();
        polys.push(Polygon::new(ext_ls, holes));
    }
    let shape = MultiPolygon::new(polys);
    let depth_m = estimate_depth(&shape, &bbox);
    Ok(CompiledGeometry::Polygons {
        shape,
        bbox,
        depth_m,
    })
}

/// Lower bound of the inscribed radius: the best boundary distance over an interior
/// point and a grid of samples.
fn estimate_depth(shape: &MultiPolygon<f64>, bbox: &BBox) -> f64 {
    const N: usize = 12;
    let mut best = 0.0f64;
    let mut consider = |x: f64, y: f64| {
        let d = polygon_signed_distance(shape, x, y);
        if d < 0.0 {
            best = best.max(-d);
        }
    };
    for p in &shape.0 {
        if let Some(ip) = p.interior_point() {
            consider(ip.x(), ip.y());
        }
    }
    for i in 0..N {
        for j in 0..N {
            let fx = (i as f64 + 0.5) / N as f64;
            let fy = (j as f64 + 0.5) / N as f64;
            consider(
                bbox.min_lon + fx * (bbox.max_lon - bbox.min_lon),
                bbox.min_lat + fy * (bbox.max_lat - bbox.min_lat),
            );
        }
    }
    best
}

/// Signed distance (metres, negative inside) from `(x, y)` (already in the shape's frame)
/// to the boundary, in a local equirectangular projection centred on the point.
fn polygon_signed_distance(shape: &MultiPolygon<f64>, x: f64, y: f64) -> f64 {
    let ky = M_PER_DEG;
    let kx = M_PER_DEG * y.to_radians().cos();
    let mut best2 = f64::INFINITY;
    for poly in &shape.0 {
        for ring in std::iter::once(poly.exterior()).chain(poly.interiors()) {
            let cs = &ring.0;
            let n = cs.len();
            if n < 2 {
                continue;
            }
            let mut prev = cs[n - 1];
            for &c in cs {
                let (ax, ay) = ((prev.x - x) * kx, (prev.y - y) * ky);
                let (bx, by) = ((c.x - x) * kx, (c.y - y) * ky);
                best2 = best2.min(segment_origin_dist2(ax, ay, bx, by));
                prev = c;
            }
        }
    }
    let d = best2.sqrt();
    if shape.intersects(&Coord { x, y }) {
        -d
    } else {
        d
    }
}

/// Squared distance from the origin to segment a–b.
#[inline]
fn segment_origin_dist2(ax: f64, ay: f64, bx: f64, by: f64) -> f64 {
    let (dx, dy) = (bx - ax, by - ay);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (-(ax * dx + ay * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (cx, cy) = (ax + t * dx, ay + t * dy);
    cx * cx + cy * cy
}
