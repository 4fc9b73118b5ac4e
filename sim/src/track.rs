//! Plausible movement and GNSS observation for simulated tags.
//!
//! A [`Mover`] holds the true position of a person and advances it in time: pottering about
//! inside a home ([`Gait::Indoor`]), a bounded random walk around a centre, or following a
//! street route (axis-aligned legs on a city block grid, see [`street_route`]) at walking,
//! cycling or urban driving speed. [`GpsModel`] turns the true position into what a tag
//! reports: Gaussian error whose size matches the reported accuracy (worse indoors), speed,
//! course, satellites.

use em_model::{FixSource, LonLat, Position};
use rand::Rng;
use std::collections::VecDeque;

/// Metres per degree of latitude (mean; good to < 1 % for simulation purposes).
pub const M_PER_DEG_LAT: f64 = 111_320.0;

/// Great-circle distance in metres (haversine).
pub fn distance_m(a: LonLat, b: LonLat) -> f64 {
    const R: f64 = 6_371_008.8;
    let (lat1, lat2) = (a[1].to_radians(), b[1].to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b[0] - a[0]).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().min(1.0).asin()
}

/// The point `east_m` metres east and `north_m` metres north of `p` (local flat-earth
/// approximation, fine for the few kilometres a subject moves).
pub fn offset(p: LonLat, east_m: f64, north_m: f64) -> LonLat {
    let lat = p[1] + north_m / M_PER_DEG_LAT;
    let cos = p[1].to_radians().cos().max(1e-6);
    let lon = p[0] + east_m / (M_PER_DEG_LAT * cos);
    [lon, lat]
}

/// (east, north) metres from `from` to `to` in the local flat approximation.
pub fn delta_m(from: LonLat, to: LonLat) -> (f64, f64) {
    let cos = from[1].to_radians().cos().max(1e-6);
    (
        (to[0] - from[0]) * M_PER_DEG_LAT * cos,
        (to[1] - from[1]) * M_PER_DEG_LAT,
    )
}

/// Bearing in degrees from north, 0..360, from `from` to `to`.
pub fn bearing_deg(from: LonLat, to: LonLat) -> f64 {
    let (e, n) = delta_m(from, to);
    e.atan2(n).to_degrees().rem_euclid(360.0)
}

/// A standard normal sample (Box–Muller; `rand` 0.8 has no normal distribution built in).
pub fn std_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// How a person moves; each has a plausible speed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gait {
    /// Moving about inside a flat or house.
    Indoor,
    Walking,
    Cycling,
    /// Car or bus in town.
    Driving,
}

impl Gait {
    /// Speed range in metres per second.
    pub fn speed_range_mps(self) -> (f64, f64) {
        match self {
            Gait::Indoor => (0.0, 0.7),
            Gait::Walking => (0.9, 1.8),
            Gait::Cycling => (3.5, 6.5),
            // 20–55 km/h: urban traffic.
            Gait::Driving => (5.5, 15.3),
        }
    }

    pub fn max_speed_mps(self) -> f64 {
        self.speed_range_mps().1
    }

    fn is_indoor(self) -> bool {
        self == Gait::Indoor
    }
}

/// What the mover is doing.
#[derive(Debug, Clone, PartialEq)]
enum Motion {
    /// Random walk that never leaves `radius_m` around `centre`.
    Wander {
        centre: LonLat,
        radius_m: f64,
        gait: Gait,
    },
    /// Follow `waypoints`, then wander within `arrive_radius_m` of the last one.
    Route {
        waypoints: VecDeque<LonLat>,
        gait: Gait,
        arrive_radius_m: f64,
        arrive_gait: Gait,
    },
}

/// True position and motion of one simulated person.
#[derive(Debug, Clone, PartialEq)]
pub struct Mover {
    pos: LonLat,
    heading_deg: f64,
    speed_mps: f64,
    motion: Motion,
}

impl Mover {
    /// A person at `pos` wandering within `radius_m` of `centre` at `gait`.
    pub fn wander(pos: LonLat, centre: LonLat, radius_m: f64, gait: Gait) -> Self {
        Mover {
            pos,
            heading_deg: 0.0,
            speed_mps: 0.0,
            motion: Motion::Wander {
                centre,
                radius_m: radius_m.max(1.0),
                gait,
            },
        }
    }

    pub fn position(&self) -> LonLat {
        self.pos
    }

    pub fn speed_mps(&self) -> f64 {
        self.speed_mps
    }

    pub fn heading_deg(&self) -> f64 {
        self.heading_deg
    }

    pub fn gait(&self) -> Gait {
        match &self.motion {
            Motion::Wander { gait, .. } | Motion::Route { gait, .. } => *gait,
        }
    }

    /// True while following a route (not yet arrived).
    pub fn travelling(&self) -> bool {
        matches!(self.motion, Motion::Route { .. })
    }

    /// Switch to wandering around `centre`.
    pub fn set_wander(&mut self, centre: LonLat, radius_m: f64, gait: Gait) {
        self.motion = Motion::Wander {
            centre,
            radius_m: radius_m.max(1.0),
            gait,
        };
    }

    /// Travel along `waypoints` at `gait`, then wander within `arrive_radius_m` of the last
    /// waypoint at `arrive_gait`.
    pub fn set_route(
        &mut self,
        waypoints: Vec<LonLat>,
        gait: Gait,
        arrive_radius_m: f64,
        arrive_gait: Gait,
    ) {
        if waypoints.is_empty() {
            self.set_wander(self.pos, arrive_radius_m, arrive_gait);
            return;
        }
        self.motion = Motion::Route {
            waypoints: waypoints.into(),
            gait,
            arrive_radius_m: arrive_radius_m.max(1.0),
            arrive_gait,
        };
    }

    fn next_speed<R: Rng + ?Sized>(&self, gait: Gait, rng: &mut R) -> f64 {
        let (lo, hi) = gait.speed_range_mps();
        let mid = (lo + hi) / 2.0;
        let current = if self.speed_mps >= lo && self.speed_mps <= hi {
            self.speed_mps
        } else {
            mid
        };
        // Smooth speed changes; indoors people often stand still.
        if gait.is_indoor() && rng.gen_bool(0.3) {
            return 0.0;
        }
        (current + std_normal(rng) * (hi - lo) * 0.15).clamp(lo, hi)
    }

    /// Advance the true position by `dt_s` seconds.
    pub fn step<R: Rng + ?Sized>(&mut self, dt_s: f64, rng: &mut R) {
        let dt_s = if dt_s.is_finite() { dt_s.max(0.0) } else { 0.0 };
        match self.motion.clone() {
            Motion::Wander {
                centre,
                radius_m,
                gait,
            } => {
                self.speed_mps = self.next_speed(gait, rng);
                let step = (self.speed_mps * dt_s).min(radius_m);
                self.heading_deg = (self.heading_deg + std_normal(rng) * 30.0).rem_euclid(360.0);
                let rad = self.heading_deg.to_radians();
                let next = offset(self.pos, step * rad.sin(), step * rad.cos());
                let d_now = distance_m(self.pos, centre);
                if distance_m(next, centre) <= radius_m {
                    self.pos = next;
                } else if d_now > radius_m {
                    // Outside (e.g. just switched to wandering): head straight back in.
                    self.heading_deg = bearing_deg(self.pos, centre);
                    self.pos = self.toward(centre, step.min(d_now));
                } else {
                    // Bounce: turn towards the centre, move at most to the far side.
                    self.heading_deg =
                        (bearing_deg(self.pos, centre) + std_normal(rng) * 20.0).rem_euclid(360.0);
                    let rad = self.heading_deg.to_radians();
                    let next = offset(self.pos, step * rad.sin(), step * rad.cos());
                    if distance_m(next, centre) <= radius_m {
                        self.pos = next;
                    } else {
                        self.heading_deg = bearing_deg(self.pos, centre);
                        self.pos = self.toward(centre, step.min(d_now));
                    }
                }
            }
            Motion::Route {
                mut waypoints,
                gait,
                arrive_radius_m,
                arrive_gait,
            } => {
                self.speed_mps = self.next_speed(gait, rng);
                let mut left = self.speed_mps * dt_s;
                while left > 0.0 {
                    let Some(&wp) = waypoints.front() else { break };
                    let d = distance_m(self.pos, wp);
                    if d <= left {
                        self.pos = wp;
                        left -= d;
                        waypoints.pop_front();
                    } else {
                        self.heading_deg = bearing_deg(self.pos, wp);
                        self.pos = self.toward(wp, left);
                        left = 0.0;
                    }
                }
                if waypoints.is_empty() {
                    self.motion = Motion::Wander {
                        centre: self.pos,
                        radius_m: arrive_radius_m,
                        gait: arrive_gait,
                    };
                } else {
                    self.motion = Motion::Route {
                        waypoints,
                        gait,
                        arrive_radius_m,
                        arrive_gait,
                    };
                }
            }
        }
    }

    fn toward(&self, target: LonLat, metres: f64) -> LonLat {
        let d = distance_m(self.pos, target);
        if d <= metres || d <= f64::EPSILON {
            return target;
        }
        let f = metres / d;
        [
            self.pos[0] + (target[0] - self.pos[0]) * f,
            self.pos[1] + (target[1] - self.pos[1]) * f,
        ]
    }
}

/// A route from `from` to `to` along a street grid: alternating east–west and north–south
/// legs (2–4 turns) whose lengths add up to the displacement, like driving or walking round
/// city blocks. The last waypoint is `to`.
pub fn street_route<R: Rng + ?Sized>(from: LonLat, to: LonLat, rng: &mut R) -> Vec<LonLat> {
    let (de, dn) = delta_m(from, to);
    if de.abs() < 1.0 && dn.abs() < 1.0 {
        return vec![to];
    }
    let turns = rng.gen_range(2..=4usize);
    // Split each axis into `legs` random positive fractions.
    let legs = turns / 2 + 1;
    let split = |rng: &mut R, total: f64| -> Vec<f64> {
        let mut w: Vec<f64> = (0..legs).map(|_| rng.gen_range(0.3..1.0)).collect();
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x = *x / s * total);
        w
    };
    let east = split(rng, de);
    let north = split(rng, dn);
    let east_first = rng.gen_bool(0.5);
    let mut pts = Vec::with_capacity(2 * legs + 1);
    let mut cur = from;
    for i in 0..legs {
        let (a, b) = if east_first {
            ((east[i], 0.0), (0.0, north[i]))
        } else {
            ((0.0, north[i]), (east[i], 0.0))
        };
        cur = offset(cur, a.0, a.1);
        pts.push(cur);
        cur = offset(cur, b.0, b.1);
        pts.push(cur);
    }
    // Snap the end exactly onto the destination (removes flat-earth rounding).
    if let Some(last) = pts.last_mut() {
        *last = to;
    }
    pts
}

/// GNSS observation model: turns a true position into a reported fix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpsModel {
    /// Typical 68 % horizontal accuracy outdoors, metres.
    pub outdoor_accuracy_m: f64,
    /// Typical accuracy indoors (home), metres.
    pub indoor_accuracy_m: f64,
    /// Altitude of the area, metres.
    pub altitude_m: f64,
}

impl Default for GpsModel {
    fn default() -> Self {
        GpsModel {
            outdoor_accuracy_m: 5.0,
            indoor_accuracy_m: 15.0,
            altitude_m: 12.0,
        }
    }
}

impl GpsModel {
    /// Observe `mover`: the reported position has a 2-D Gaussian error consistent with the
    /// reported accuracy (68 % radius ≈ 1.5 σ), clipped at 3 σ per axis.
    pub fn observe<R: Rng + ?Sized>(&self, mover: &Mover, rng: &mut R) -> Position {
        let indoor = mover.gait().is_indoor();
        let typical = if indoor {
            self.indoor_accuracy_m
        } else {
            self.outdoor_accuracy_m
        };
        let accuracy =
            (typical * (1.0 + 0.35 * std_normal(rng))).clamp(typical * 0.5, typical * 2.5);
        let sigma = accuracy / 1.5;
        let ex = (std_normal(rng) * sigma).clamp(-3.0 * sigma, 3.0 * sigma);
        let ny = (std_normal(rng) * sigma).clamp(-3.0 * sigma, 3.0 * sigma);
        let p = offset(mover.position(), ex, ny);
        let sats = if indoor {
            rng.gen_range(4..=7)
        } else {
            rng.gen_range(7..=12)
        };
        let speed_kmh = (mover.speed_mps() * 3.6 + std_normal(rng) * 0.5).max(0.0);
        Position {
            lat: p[1],
            lon: p[0],
            accuracy_m: Some(accuracy as f32),
            speed_kmh: Some(speed_kmh as f32),
            course_deg: Some(mover.heading_deg() as f32),
            altitude_m: Some((self.altitude_m + std_normal(rng) * 3.0) as f32),
            satellites: Some(sats),
            valid: true,
            source: FixSource::Gnss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const CPH: LonLat = [12.5683, 55.6761];

    #[test]
    fn offset_and_distance_agree() {
        let p = offset(CPH, 300.0, 400.0);
        let d = distance_m(CPH, p);
        assert!((d - 500.0).abs() < 2.0, "{d}");
        let (e, n) = delta_m(CPH, p);
        assert!((e - 300.0).abs() < 0.5 && (n - 400.0).abs() < 0.5);
        let b = bearing_deg(CPH, offset(CPH, 100.0, 0.0));
        assert!((b - 90.0).abs() < 0.5, "{b}");
    }

    #[test]
    fn wander_stays_within_radius_at_plausible_speeds() {
        for (seed, gait, radius) in [
            (1u64, Gait::Indoor, 20.0),
            (2, Gait::Walking, 300.0),
            (3, Gait::Cycling, 800.0),
            (4, Gait::Driving, 2000.0),
        ] {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut m = Mover::wander(CPH, CPH, radius, gait);
            let dt = 5.0;
            for _ in 0..2000 {
                let before = m.position();
                m.step(dt, &mut rng);
                let moved = distance_m(before, m.position());
                assert!(
                    moved <= gait.max_speed_mps() * dt * 1.01 + 1e-6,
                    "{gait:?} moved {moved} m in {dt} s"
                );
                let from_centre = distance_m(CPH, m.position());
                assert!(
                    from_centre <= radius * 1.01 + 0.01,
                    "{gait:?} left radius: {from_centre}"
                );
            }
        }
    }

    #[test]
    fn route_reaches_destination_at_route_speed() {
        let mut rng = StdRng::seed_from_u64(7);
        let to = offset(CPH, 1200.0, -800.0);
        let route = street_route(CPH, to, &mut rng);
        assert_eq!(route.last().copied(), Some(to));
        // Grid legs: the path is at least as long as the straight line, at most the
        // Manhattan distance (plus rounding).
        let mut len = 0.0;
        let mut prev = CPH;
        for p in &route {
            len += distance_m(prev, *p);
            prev = *p;
        }
        assert!(len >= distance_m(CPH, to) - 1.0);
        assert!(len <= 2000.0 + 5.0, "route length {len}");

        let mut m = Mover::wander(CPH, CPH, 10.0, Gait::Indoor);
        m.set_route(route, Gait::Cycling, 30.0, Gait::Walking);
        let mut t = 0.0;
        while m.travelling() && t < 3600.0 {
            let before = m.position();
            m.step(2.0, &mut rng);
            assert!(distance_m(before, m.position()) <= Gait::Cycling.max_speed_mps() * 2.0 + 1e-6);
            t += 2.0;
        }
        assert!(!m.travelling(), "did not arrive within an hour");
        assert!(distance_m(m.position(), to) < 1.0);
        // 2 km at 3.5–6.5 m/s takes 5–10 minutes.
        assert!((250.0..=700.0).contains(&t), "took {t} s");
    }

    #[test]
    fn gps_noise_matches_reported_accuracy() {
        let mut rng = StdRng::seed_from_u64(11);
        let m = Mover::wander(CPH, CPH, 50.0, Gait::Walking);
        let model = GpsModel::default();
        let mut within = 0;
        let n = 5000;
        for _ in 0..n {
            let p = model.observe(&m, &mut rng);
            let acc = f64::from(p.accuracy_m.unwrap());
            assert!((2.5..=12.5).contains(&acc), "accuracy {acc}");
            let err = distance_m(CPH, [p.lon, p.lat]);
            assert!(err <= 3.0 * acc / 1.5 * std::f64::consts::SQRT_2 + 0.1);
            if err <= acc {
                within += 1;
            }
            assert!(p.valid);
            assert!((7..=12).contains(&p.satellites.unwrap()));
        }
        // About 63 % of 2-D Gaussian errors fall within 1.5 σ.
        let share = f64::from(within) / f64::from(n);
        assert!(
            (0.55..0.75).contains(&share),
            "share within accuracy {share}"
        );
    }
}
