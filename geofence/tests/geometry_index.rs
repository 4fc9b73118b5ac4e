//! Geometry validation, distances, antimeridian handling and the R-tree index.

use em_geofence::geometry::M_PER_DEG;
use em_geofence::{CompiledGeometry, GeofenceError, ZoneIndex};
use em_model::{ZoneGeometry, ZoneKind, ZoneSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn square(lon: f64, lat: f64, half_deg: f64) -> Vec<[f64; 2]> {
    vec![
        [lon - half_deg, lat - half_deg],
        [lon + half_deg, lat - half_deg],
        [lon + half_deg, lat + half_deg],
        [lon - half_deg, lat + half_deg],
    ]
}

fn spec(
    id: i64,
    subject: Option<i64>,
    group: Option<&str>,
    kind: ZoneKind,
    geometry: ZoneGeometry,
) -> ZoneSpec {
    ZoneSpec {
        id,
        subject_id: subject,
        group: group.map(str::to_string),
        name: format!("zone {id}"),
        kind,
        geometry,
        schedule: None,
        is_curfew_home: false,
    }
}

fn compile(g: ZoneGeometry) -> Result<CompiledGeometry, GeofenceError> {
    CompiledGeometry::compile(7, &g)
}

#[test]
fn polygon_with_hole_contains_and_measures_in_metres() {
    let g = compile(ZoneGeometry::Polygon {
        rings: vec![square(12.5, 55.68, 0.01), square(12.5, 55.68, 0.002)],
    })
    .unwrap();
    // In the hole: outside the zone, by the distance to the hole's edge.
    let d_hole = g.signed_distance_m(12.5, 55.68).unwrap();
    let expected = 0.002 * M_PER_DEG; // nearest hole edge is the north/south one (lat metres)
    let lon_edge = 0.002 * M_PER_DEG * 55.68f64.to_radians().cos();
    assert!(d_hole > 0.0, "point in the hole is outside: {d_hole}");
    assert!(
        (d_hole - expected.min(lon_edge)).abs() < 2.0,
        "{d_hole} vs {}",
        expected.min(lon_edge)
    );
    // Between hole and exterior: inside.
    let d_in = g.signed_distance_m(12.5, 55.686).unwrap();
    assert!(d_in < 0.0);
    // 1 km east of the exterior's east edge, at this latitude: ~1000 m, not degrees.
    let east_edge = 12.51;
    let dlon = 1000.0 / (M_PER_DEG * 55.68f64.to_radians().cos());
    let d_out = g.signed_distance_m(east_edge + dlon, 55.68).unwrap();
    assert!((d_out - 1000.0).abs() < 3.0, "distance {d_out}");
}

#[test]
fn multipolygon_and_circle() {
    let g = compile(ZoneGeometry::MultiPolygon {
        polygons: vec![
            vec![square(10.0, 56.0, 0.01)],
            vec![square(10.1, 56.0, 0.01)],
        ],
    })
    .unwrap();
    assert!(g.signed_distance_m(10.0, 56.0).unwrap() < 0.0);
    assert!(g.signed_distance_m(10.1, 56.0).unwrap() < 0.0);
    assert!(g.signed_distance_m(10.05, 56.0).unwrap() > 0.0);
    assert!(g.depth_m() > 400.0, "depth {}", g.depth_m());

    let c = compile(ZoneGeometry::Circle {
        center: [12.5, 55.68],
        radius_m: 150.0,
    })
    .unwrap();
    let north_200 = 55.68 + 200.0 / M_PER_DEG;
    let d = c.signed_distance_m(12.5, north_200).unwrap();
    assert!((d - 50.0).abs() < 0.5, "{d}");
    assert!((c.signed_distance_m(12.5, 55.68).unwrap() + 150.0).abs() < 1e-6);
}

#[test]
fn polar_and_invalid_rings_are_rejected_with_clear_errors() {
    let err = compile(ZoneGeometry::Polygon {
        rings: vec![square(15.0, 86.0, 0.5)],
    })
    .unwrap_err();
    assert!(matches!(err, GeofenceError::PolarLatitude { .. }));
    assert!(err.to_string().contains("85"), "{err}");
    let err = compile(ZoneGeometry::Circle {
        center: [0.0, -84.99],
        radius_m: 5000.0,
    })
    .unwrap_err();
    assert!(matches!(err, GeofenceError::PolarLatitude { .. }), "{err}");

    let err = compile(ZoneGeometry::Polygon {
        rings: vec![vec![[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]],
    })
    .unwrap_err();
    assert!(
        matches!(err, GeofenceError::RingTooShort { points: 2, .. }),
        "{err}"
    );

    let err = compile(ZoneGeometry::Polygon {
        rings: vec![vec![[1.0, 1.0], [f64::NAN, 2.0], [2.0, 1.0]]],
    })
    .unwrap_err();
    assert!(
        matches!(err, GeofenceError::InvalidCoordinate { .. }),
        "{err}"
    );

    let err = compile(ZoneGeometry::Polygon {
        rings: vec![square(10.0, 50.0, 0.01), square(10.5, 50.0, 0.001)],
    })
    .unwrap_err();
    assert!(err.to_string().contains("hole"), "{err}");

    let err = compile(ZoneGeometry::Polygon {
        rings: vec![vec![[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]],
    })
    .unwrap_err();
    assert!(err.to_string().contains("zero area"), "{err}");

    for r in [0.0, -5.0, f64::INFINITY] {
        assert!(matches!(
            compile(ZoneGeometry::Circle {
                center: [1.0, 1.0],
                radius_m: r
            }),
            Err(GeofenceError::InvalidRadius { .. })
        ));
    }
    assert!(compile(ZoneGeometry::Polygon { rings: vec![] }).is_err());
}

#[test]
fn antimeridian_polygon_and_circle() {
    // Fiji-like box from 179.5 E to 179.5 W, given with the longitude jump.
    let rings = vec![vec![
        [179.5, -17.0],
        [-179.5, -17.0],
        [-179.5, -16.0],
        [179.5, -16.0],
    ]];
    let g = compile(ZoneGeometry::Polygon {
        rings: rings.clone(),
    })
    .unwrap();
    assert!(g.signed_distance_m(179.9, -16.5).unwrap() < 0.0);
    assert!(g.signed_distance_m(-179.9, -16.5).unwrap() < 0.0);
    assert!(g.signed_distance_m(180.0, -16.5).unwrap() < 0.0);
    assert!(
        g.signed_distance_m(0.0, -16.5).unwrap() > 1e6,
        "the other side of the world is outside"
    );
    let d = g.signed_distance_m(179.0, -16.5).unwrap();
    let expected = 0.5 * M_PER_DEG * 16.5f64.to_radians().cos();
    assert!((d - expected).abs() < 100.0, "{d} vs {expected}");
    let bbox = g.bbox().unwrap();
    assert!(
        bbox.max_lon - bbox.min_lon < 1.5,
        "unwrapped, not spanning the globe: {bbox:?}"
    );

    let c = compile(ZoneGeometry::Circle {
        center: [179.999, 10.0],
        radius_m: 1000.0,
    })
    .unwrap();
    assert!(c.signed_distance_m(-179.999, 10.0).unwrap() < 0.0);

    // Through the index, from both sides.
    let mut idx = ZoneIndex::new();
    idx.upsert(&spec(
        1,
        Some(1),
        None,
        ZoneKind::Exclusion,
        ZoneGeometry::Polygon { rings },
    ))
    .unwrap();
    idx.upsert(&spec(
        2,
        Some(1),
        None,
        ZoneKind::Exclusion,
        ZoneGeometry::Circle {
            center: [-179.9995, 10.0],
            radius_m: 500.0,
        },
    ))
    .unwrap();
    for lon in [179.9, -179.9, 179.6, -179.6] {
        let hits = idx.zones_for(1, lon, -16.5, 0.0);
        assert_eq!(
            hits.iter().map(|m| m.zone.id).collect::<Vec<_>>(),
            vec![1],
            "lon {lon}"
        );
    }
    let hits = idx.zones_for(1, 179.9998, 10.0, 10.0);
    assert_eq!(hits.iter().map(|m| m.zone.id).collect::<Vec<_>>(), vec![2]);
    assert!(idx.zones_for(1, 170.0, -16.5, 0.0).is_empty());
}

#[test]
fn index_updates_incrementally_and_respects_owners() {
    let mut idx = ZoneIndex::new();
    let circle = |lon, lat| ZoneGeometry::Circle {
        center: [lon, lat],
        radius_m: 300.0,
    };
    idx.upsert(&spec(
        1,
        Some(10),
        None,
        ZoneKind::Exclusion,
        circle(12.0, 55.0),
    ))
    .unwrap();
    idx.upsert(&spec(
        2,
        None,
        Some("schools"),
        ZoneKind::Exclusion,
        circle(12.0, 55.0),
    ))
    .unwrap();
    assert_eq!(idx.zones_for(10, 12.0, 55.0, 0.0).len(), 1);
    assert_eq!(idx.zones_for(11, 12.0, 55.0, 0.0).len(), 0);
    idx.bind_group(11, "schools");
    assert_eq!(idx.zones_for(11, 12.0, 55.0, 0.0)[0].zone.id, 2);
    // Move zone 1: old place is empty, new place found.
    idx.upsert(&spec(
        1,
        Some(10),
        None,
        ZoneKind::Exclusion,
        circle(13.0, 55.0),
    ))
    .unwrap();
    assert!(idx.zones_for(10, 12.0, 55.0, 0.0).is_empty());
    assert_eq!(idx.zones_for(10, 13.0, 55.0, 0.0).len(), 1);
    // A failed upsert leaves the zone as it was.
    assert!(idx
        .upsert(&spec(
            1,
            Some(10),
            None,
            ZoneKind::Exclusion,
            circle(13.0, 89.0)
        ))
        .is_err());
    assert_eq!(idx.zones_for(10, 13.0, 55.0, 0.0).len(), 1);
    assert!(idx.remove(1));
    assert!(!idx.remove(1));
    assert!(idx.zones_for(10, 13.0, 55.0, 0.0).is_empty());
    let errors = idx.upsert_many(&[
        spec(4, Some(10), None, ZoneKind::Exclusion, circle(14.0, 55.0)),
        spec(5, Some(10), None, ZoneKind::Exclusion, circle(14.0, 88.0)),
    ]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].0, 5);
    assert_eq!(idx.zones_for(10, 14.0, 55.0, 0.0)[0].zone.id, 4);
    idx.unbind_group(11, "schools");
    assert!(idx.zones_for(11, 12.0, 55.0, 0.0).is_empty());
    assert!(matches!(
        idx.upsert(&spec(3, None, None, ZoneKind::Exclusion, circle(1.0, 1.0))),
        Err(GeofenceError::NoOwner { .. })
    ));
}

#[test]
fn rtree_matches_brute_force_on_thousands_of_random_zones() {
    let mut rng = StdRng::seed_from_u64(0x6e0f_e4ce);
    let mut idx = ZoneIndex::new();
    let groups = ["a", "b", "c", "d"];
    for s in 0..50i64 {
        idx.bind_group(s, groups[(s % 4) as usize]);
    }
    let random_zone = |rng: &mut StdRng, id: i64| {
        // Denmark-sized area plus a band across the antimeridian.
        let (lon, lat) = if rng.gen_bool(0.1) {
            (rng.gen_range(-180.0..180.0), rng.gen_range(-60.0..60.0))
        } else {
            (rng.gen_range(8.0..13.0), rng.gen_range(54.5..57.8))
        };
        let owner_subject = rng.gen_bool(0.5);
        let geometry = if rng.gen_bool(0.5) {
            ZoneGeometry::Circle {
                center: [lon, lat],
                radius_m: rng.gen_range(20.0..3000.0),
            }
        } else {
            let n = rng.gen_range(3..9);
            let r = rng.gen_range(0.001..0.05);
            let ring: Vec<[f64; 2]> = (0..n)
                .map(|i| {
                    let a = i as f64 / n as f64 * std::f64::consts::TAU;
                    let rr = r * rng.gen_range(0.5..1.0);
                    let x = lon + rr * a.cos();
                    let x = if x > 180.0 {
                        x - 360.0
                    } else if x < -180.0 {
                        x + 360.0
                    } else {
                        x
                    };
                    [x, lat + rr * a.sin()]
                })
                .collect();
            ZoneGeometry::Polygon { rings: vec![ring] }
        };
        spec(
            id,
            owner_subject.then(|| rng.gen_range(0..50)),
            (!owner_subject).then(|| groups[rng.gen_range(0..4)]),
            if rng.gen_bool(0.7) {
                ZoneKind::Exclusion
            } else {
                ZoneKind::Inclusion
            },
            geometry,
        )
    };
    for id in 0..4000 {
        let z = random_zone(&mut rng, id);
        idx.upsert(&z).unwrap();
    }
    // Churn: replace and remove some, so the incremental paths are covered.
    for _ in 0..500 {
        let id = rng.gen_range(0..4000);
        if rng.gen_bool(0.5) {
            idx.remove(id);
        } else {
            let z = random_zone(&mut rng, id);
            idx.upsert(&z).unwrap();
        }
    }
    let mut non_empty = 0;
    for q in 0..3000 {
        if q == 1500 {
            // A bulk-loaded tree gives the same answers.
            idx.rebuild_tree();
        }
        let (lon, lat) = if rng.gen_bool(0.1) {
            (rng.gen_range(-180.0..180.0), rng.gen_range(-60.0..60.0))
        } else {
            (rng.gen_range(8.0..13.0), rng.gen_range(54.5..57.8))
        };
        let subject = rng.gen_range(0..50);
        let radius = rng.gen_range(0.0..500.0);
        let a: Vec<_> = idx
            .zones_for(subject, lon, lat, radius)
            .iter()
            .map(|m| m.zone.id)
            .collect();
        let b: Vec<_> = idx
            .zones_for_brute_force(subject, lon, lat, radius)
            .iter()
            .map(|m| m.zone.id)
            .collect();
        assert_eq!(a, b, "subject {subject} at [{lon}, {lat}] r {radius}");
        non_empty += usize::from(!a.is_empty());
    }
    assert!(
        non_empty > 100,
        "the test must exercise hits, got {non_empty}"
    );
}
