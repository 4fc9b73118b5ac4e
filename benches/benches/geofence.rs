//! Geofence engine throughput: fixes evaluated per second on one core.
//!
//! World: `N` shared exclusion zones (half circles of 50–500 m, half polygons of
//! 100–800 m) spread over Denmark in 100 groups, plus 100,000 subjects, each with its own
//! home curfew circle (19:00–07:00 in Europe/Copenhagen) and bound to 3 groups. Fixes
//! every 10 s per subject: 75 % of the time at home (±100 m jitter), otherwise on a trip
//! to a random place in the country, walking 20 m per fix; subjects are fed round-robin
//! (100k subjects: every fix touches cold per-subject state) during the curfew window.
//!
//! * `geofence/on_record/zones=N`: full `SubjectMonitor::on_record` per fix (one read
//!   guard per batch of 1,000 fixes), for N = 100 .. 100,000 shared zones.
//! * `geofence/on_record_lock_per_fix`: the same with one `RwLock` read per fix.
//! * `geofence/lookup/{rtree,brute_force}/zones=N`: `ZoneIndex::zones_for` against the
//!   no-R-tree baseline `zones_for_brute_force` over the same index.
//!
//! Run: `cargo bench -p em-benches --bench geofence -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use chrono::{DateTime, Duration, TimeZone, Utc};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use em_geofence::{SharedZoneIndex, SubjectMonitor, ZoneIndex};
use em_model::{
    BreachRules, FixSource, Position, Protocol, Record, ScheduleSpec, Subject, WeeklyWindow,
    ZoneGeometry, ZoneKind, ZoneSpec,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SUBJECTS: usize = 100_000;
const GROUPS: usize = 100;
const BATCH: usize = 1000;
const M_PER_DEG: f64 = 111_195.0;

fn random_point(rng: &mut StdRng) -> [f64; 2] {
    [rng.gen_range(8.1..12.6), rng.gen_range(54.7..57.6)]
}

fn offset(p: [f64; 2], north_m: f64, east_m: f64) -> [f64; 2] {
    [
        p[0] + east_m / (M_PER_DEG * p[1].to_radians().cos()),
        p[1] + north_m / M_PER_DEG,
    ]
}

struct World {
    index: SharedZoneIndex,
    subjects: Vec<Subject>,
    monitors: Vec<SubjectMonitor>,
    records: Vec<Record>,
    homes: Vec<[f64; 2]>,
    points: Vec<[f64; 2]>,
    next: usize,
    step: usize,
}

fn nightly() -> ScheduleSpec {
    ScheduleSpec {
        windows: (1..=7)
            .map(|day| WeeklyWindow {
                day,
                start: "19:00".into(),
                end: "07:00".into(),
            })
            .collect(),
        exceptions: vec![],
    }
}

fn build_world(shared_zones: usize) -> World {
    let mut rng = StdRng::seed_from_u64(7);
    let mut index = ZoneIndex::new();
    for id in 0..shared_zones {
        let c = random_point(&mut rng);
        let geometry = if id % 2 == 0 {
            ZoneGeometry::Circle {
                center: c,
                radius_m: rng.gen_range(50.0..500.0),
            }
        } else {
            let r = rng.gen_range(50.0..400.0);
            let ring = (0..6)
                .map(|k| {
                    let a = k as f64 / 6.0 * std::f64::consts::TAU;
                    offset(c, r * a.cos(), r * a.sin())
                })
                .collect();
            ZoneGeometry::Polygon { rings: vec![ring] }
        };
        index
            .upsert(&ZoneSpec {
                id: id as i64,
                subject_id: None,
                group: Some(format!("g{}", id % GROUPS)),
                name: format!("shared {id}"),
                kind: ZoneKind::Exclusion,
                geometry,
                schedule: None,
                is_curfew_home: false,
            })
            .expect("valid zone");
    }
    let t0 = Utc.with_ymd_and_hms(2024, 6, 3, 20, 0, 0).unwrap();
    let mut subjects = Vec::with_capacity(SUBJECTS);
    let mut homes = Vec::with_capacity(SUBJECTS);
    let mut records = Vec::with_capacity(SUBJECTS);
    for s in 0..SUBJECTS {
        let id = s as i64 + 1;
        let home = random_point(&mut rng);
        index
            .upsert(&ZoneSpec {
                id: 1_000_000 + id,
                subject_id: Some(id),
                group: None,
                name: "home".into(),
                kind: ZoneKind::Inclusion,
                geometry: ZoneGeometry::Circle {
                    center: home,
                    radius_m: 150.0,
                },
                schedule: Some(nightly()),
                is_curfew_home: true,
            })
            .expect("valid home");
        for _ in 0..3 {
            index.bind_group(id, &format!("g{}", rng.gen_range(0..GROUPS)));
        }
        subjects.push(Subject {
            id,
            reference: format!("case-{id}"),
            display_name: "bench".into(),
            officer_id: None,
            timezone: "Europe/Copenhagen".into(),
            order_start: None,
            order_end: None,
            rules: BreachRules::default(),
        });
        homes.push(home);
        let mut r = Record::new(format!("dev{id}"), Protocol::Em, t0);
        r.position = Some(Position {
            lat: home[1],
            lon: home[0],
            accuracy_m: Some(8.0),
            speed_kmh: None,
            course_deg: None,
            altitude_m: None,
            satellites: Some(9),
            valid: true,
            source: FixSource::Gnss,
        });
        records.push(r);
    }
    // Pack the tree once after the initial load (what a service does at start-up).
    index.rebuild_tree();
    let points = (0..65_536).map(|_| random_point(&mut rng)).collect();
    let monitors = subjects
        .iter()
        .map(|s| SubjectMonitor::new(s).expect("valid tz"))
        .collect();
    let mut w = World {
        index: SharedZoneIndex::new(index),
        subjects,
        monitors,
        records,
        homes,
        points,
        next: 0,
        step: 0,
    };
    // Warm every monitor (schedule caches, tracks) before measuring.
    let idx = w.index.clone();
    let guard = idx.read();
    for _ in 0..SUBJECTS {
        w.one_fix(&guard);
    }
    drop(guard);
    w
}

impl World {
    /// Evaluate the next subject's next fix; returns the number of events.
    fn one_fix(&mut self, index: &ZoneIndex) -> usize {
        let i = self.next;
        self.next += 1;
        if self.next == SUBJECTS {
            self.next = 0;
        }
        self.step = self.step.wrapping_add(1);
        let step = self.step;
        let r = &mut self.records[i];
        let t: DateTime<Utc> = r.device_time + Duration::seconds(10);
        r.device_time = t;
        r.received_time = t;
        // Per subject: at home (±100 m jitter) 75 % of the time; every fourth 5-minute
        // period on a trip somewhere in the country, walking 20 m per fix.
        let k = (t.timestamp() / 10) as usize;
        let p = if (k / 30) % 4 != 3 {
            let h = self.homes[i];
            offset(
                h,
                ((step * 37) % 200) as f64 - 100.0,
                ((step * 53) % 200) as f64 - 100.0,
            )
        } else {
            let dest = self.points[(i * 7 + k / 120) & 0xffff];
            offset(dest, 0.0, (k % 30) as f64 * 20.0)
        };
        if let Some(pos) = r.position.as_mut() {
            pos.lon = p[0];
            pos.lat = p[1];
        }
        self.monitors[i]
            .on_record(index, &self.subjects[i], r)
            .len()
    }
}

fn bench_on_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("geofence/on_record");
    g.throughput(Throughput::Elements(BATCH as u64));
    for n in [100usize, 1_000, 10_000, 100_000] {
        let mut world = build_world(n);
        let shared = world.index.clone();
        g.bench_function(BenchmarkId::from_parameter(format!("zones={n}")), |b| {
            b.iter(|| {
                let guard = shared.read();
                let mut events = 0;
                for _ in 0..BATCH {
                    events += world.one_fix(&guard);
                }
                black_box(events)
            })
        });
        if n == 10_000 {
            g.bench_function("lock_per_fix/zones=10000", |b| {
                b.iter(|| {
                    let mut events = 0;
                    for _ in 0..BATCH {
                        let guard = shared.read();
                        events += world.one_fix(&guard);
                    }
                    black_box(events)
                })
            });
        }
    }
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("geofence/lookup");
    g.sample_size(10);
    for n in [100usize, 1_000, 10_000, 100_000] {
        let world = build_world(n);
        let idx = world.index.read();
        let mut rng = StdRng::seed_from_u64(99);
        let queries: Vec<(i64, [f64; 2])> = (0..1024)
            .map(|_| (rng.gen_range(1..=SUBJECTS as i64), random_point(&mut rng)))
            .collect();
        g.throughput(Throughput::Elements(queries.len() as u64));
        g.bench_function(BenchmarkId::new("rtree", format!("zones={n}")), |b| {
            b.iter(|| {
                let mut hits = 0;
                for (s, p) in &queries {
                    hits += idx.zones_for(*s, p[0], p[1], 33.0).len();
                }
                black_box(hits)
            })
        });
        g.throughput(Throughput::Elements(16));
        g.bench_function(BenchmarkId::new("brute_force", format!("zones={n}")), |b| {
            b.iter(|| {
                let mut hits = 0;
                for (s, p) in &queries[..16] {
                    hits += idx.zones_for_brute_force(*s, p[0], p[1], 33.0).len();
                }
                black_box(hits)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_on_record, bench_lookup);
criterion_main!(benches);
