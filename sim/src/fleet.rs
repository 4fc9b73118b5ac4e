//! Generated fleets for load tests: IMEIs, protocol mix, behaviour shares, source addresses.

use super::behaviour::{Behaviour, SimDevice};
use super::track::{offset, std_normal};
use em_model::{LonLat, Protocol};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};

/// Invalid simulator option, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimConfigError {
    #[error("invalid --mix {0:?}: {1}")]
    Mix(String, String),
    #[error("invalid IMEI prefix {0:?}: {1}")]
    ImeiPrefix(String, String),
    #[error("invalid source address range {0:?}: {1}")]
    SourceIps(String, String),
    #[error("invalid behaviour shares: {0}")]
    Shares(String),
    #[error("{0}")]
    Other(String),
}

/// Luhn check digit of a digit string (IMEIs end with one).
pub fn luhn_check_digit(digits: &str) -> Option<u8> {
    let mut sum = 0u32;
    for (i, c) in digits.bytes().rev().enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        let mut d = u32::from(c - b'0');
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    Some(((10 - sum % 10) % 10) as u8)
}

/// The `index`-th 15-digit IMEI with `prefix` (up to 13 digits): prefix, zero-padded index,
/// Luhn check digit. Errors when the index does not fit in the remaining digits.
pub fn imei(prefix: &str, index: u64) -> Result<String, SimConfigError> {
    if prefix.len() > 13 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SimConfigError::ImeiPrefix(
            prefix.into(),
            "must be at most 13 decimal digits".into(),
        ));
    }
    let width = 14 - prefix.len();
    let body = format!("{prefix}{index:0width$}");
    if body.len() != 14 {
        return Err(SimConfigError::ImeiPrefix(
            prefix.into(),
            format!("index {index} does not fit in {width} digits"),
        ));
    }
    let check = luhn_check_digit(&body)
        .ok_or_else(|| SimConfigError::ImeiPrefix(prefix.into(), "not digits".into()))?;
    Ok(format!("{body}{check}"))
}

/// Relative weights of the protocols in a fleet (`gt06=40,teltonika=40,mqtt=20`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProtocolMix {
    pub gt06: u32,
    pub teltonika: u32,
    /// EM protocol over MQTT.
    pub mqtt: u32,
}

impl Default for ProtocolMix {
    fn default() -> Self {
        ProtocolMix {
            gt06: 40,
            teltonika: 40,
            mqtt: 20,
        }
    }
}

impl std::str::FromStr for ProtocolMix {
    type Err = SimConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| SimConfigError::Mix(s.into(), why);
        let mut mix = ProtocolMix {
            gt06: 0,
            teltonika: 0,
            mqtt: 0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not name=weight")))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| bad(format!("weight {weight:?} is not a whole number")))?;
            match name.trim().to_ascii_lowercase().as_str() {
                "gt06" => mix.gt06 = weight,
                "teltonika" => mix.teltonika = weight,
                "mqtt" | "em" => mix.mqtt = weight,
                other => {
                    return Err(bad(format!(
                        "unknown protocol {other:?} (expected gt06, teltonika or mqtt)"
                    )))
                }
            }
        }
        if mix.total() == 0 {
            return Err(bad("all weights are zero".into()));
        }
        Ok(mix)
    }
}

impl ProtocolMix {
    pub fn total(&self) -> u64 {
        u64::from(self.gt06) + u64::from(self.teltonika) + u64::from(self.mqtt)
    }

    /// Protocol of device `i` of `n`: contiguous blocks in proportion to the weights
    /// (largest-remainder rounding, so counts add up to `n`).
    pub fn counts(&self, n: usize) -> [(Protocol, usize); 3] {
        let total = self.total().max(1) as f64;
        let w = [
            (Protocol::Gt06, f64::from(self.gt06)),
            (Protocol::Teltonika, f64::from(self.teltonika)),
            (Protocol::Em, f64::from(self.mqtt)),
        ];
        let exact: Vec<f64> = w.iter().map(|(_, x)| x / total * n as f64).collect();
        let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
        let mut rest = n.saturating_sub(counts.iter().sum());
        let mut order: Vec<usize> = (0..3).collect();
        order.sort_by(|a, b| {
            let fa = exact[*a] - exact[*a].floor();
            let fb = exact[*b] - exact[*b].floor();
            fb.total_cmp(&fa)
        });
        for i in order {
            if rest == 0 {
                break;
            }
            if w[i].1 > 0.0 {
                counts[i] += 1;
                rest -= 1;
            }
        }
        [
            (Protocol::Gt06, counts[0]),
            (Protocol::Teltonika, counts[1]),
            (Protocol::Em, counts[2]),
        ]
    }
}

/// Share (0.0..=1.0) of a generated fleet given each misbehaviour; the rest roam or stay home.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BehaviourShares {
    /// Leave home (curfew violation when their curfew is active).
    pub leave_home: f64,
    pub strap_cut: f64,
    pub battery_drain: f64,
    pub go_silent: f64,
    /// Of the remaining, share staying at home (the others roam).
    pub at_home: f64,
}

impl Default for BehaviourShares {
    fn default() -> Self {
        BehaviourShares {
            leave_home: 0.02,
            strap_cut: 0.01,
            battery_drain: 0.02,
            go_silent: 0.01,
            at_home: 0.5,
        }
    }
}

impl BehaviourShares {
    /// All shares zero except staying at home/roaming: a pure load fleet.
    pub fn none() -> Self {
        BehaviourShares {
            leave_home: 0.0,
            strap_cut: 0.0,
            battery_drain: 0.0,
            go_silent: 0.0,
            at_home: 0.5,
        }
    }

    pub fn validate(&self) -> Result<(), SimConfigError> {
        let all = [
            self.leave_home,
            self.strap_cut,
            self.battery_drain,
            self.go_silent,
            self.at_home,
        ];
        if all.iter().any(|x| !x.is_finite() || *x < 0.0 || *x > 1.0) {
            return Err(SimConfigError::Shares(
                "each share must be between 0 and 1".into(),
            ));
        }
        let mis = self.leave_home + self.strap_cut + self.battery_drain + self.go_silent;
        if mis > 1.0 + 1e-9 {
            return Err(SimConfigError::Shares(format!(
                "misbehaviour shares add up to {mis:.3} > 1"
            )));
        }
        Ok(())
    }
}

/// Description of a generated load fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSpec {
    pub devices: usize,
    pub mix: ProtocolMix,
    /// Up to 13 digits; device `i` gets [`imei`]`(prefix, i)`.
    pub imei_prefix: String,
    /// Index of the first device (to run several simulators on disjoint IMEIs).
    pub first_index: u64,
    /// Homes are scattered around this point…
    pub centre: LonLat,
    /// …within this radius (metres).
    pub spread_m: f64,
    pub shares: BehaviourShares,
    /// Shared MQTT password of generated EM devices (None = none).
    pub mqtt_secret: Option<String>,
    pub seed: u64,
    /// Seconds after start before scripted misbehaviours begin (spread up to twice this).
    pub misbehave_after_secs: u32,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            devices: 100,
            mix: ProtocolMix::default(),
            imei_prefix: "35".into(),
            first_index: 0,
            // Copenhagen city hall square.
            centre: [12.5683, 55.6761],
            spread_m: 6000.0,
            shares: BehaviourShares::default(),
            mqtt_secret: None,
            seed: 1,
            misbehave_after_secs: 20,
        }
    }
}

/// Seed and multiplier of the per-device home generator (any fixed values).
const HOME_SEED: u64 = 0x454d_2d48_4f4d_4553;
const HOME_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// Generate the devices of `spec`, deterministically for its seed.
pub fn generate_fleet(spec: &FleetSpec) -> Result<Vec<SimDevice>, SimConfigError> {
    spec.shares.validate()?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut out = Vec::with_capacity(spec.devices);
    let counts = spec.mix.counts(spec.devices);
    let mut i = 0u64;
    for (protocol, n) in counts {
        for _ in 0..n {
            let index = spec.first_index + i;
            let device_id = imei(&spec.imei_prefix, index)?;
            i += 1;
            // Homes: uniform over the disc, drawn from the device's index alone (not the seed,
            // mix or shares), so a fleet registered with `--register` and a later run with other
            // settings agree on where each subject lives (else every curfew is "violated").
            let mut home_rng = StdRng::seed_from_u64(HOME_SEED ^ index.wrapping_mul(HOME_MIX));
            let r = spec.spread_m * home_rng.gen::<f64>().sqrt();
            let a = home_rng.gen_range(0.0..std::f64::consts::TAU);
            let home = offset(spec.centre, r * a.sin(), r * a.cos());
            let home_radius_m = home_rng.gen_range(80.0..150.0);
            let after =
                spec.misbehave_after_secs + rng.gen_range(0..=spec.misbehave_after_secs.max(1));
            let s = &spec.shares;
            let x: f64 = rng.gen();
            let mut behaviour = if x < s.leave_home {
                let dist = 800.0 + std_normal(&mut rng).abs() * 800.0;
                let b = rng.gen_range(0.0..std::f64::consts::TAU);
                Behaviour::LeaveHome {
                    after_secs: after,
                    to: offset(home, dist * b.sin(), dist * b.cos()),
                }
            } else if x < s.leave_home + s.strap_cut {
                Behaviour::StrapCut { after_secs: after }
            } else if x < s.leave_home + s.strap_cut + s.battery_drain {
                Behaviour::BatteryDrain {
                    start_pct: rng.gen_range(25..=35),
                    drop_per_fix: 1,
                    min_pct: 5,
                }
            } else if x < s.leave_home + s.strap_cut + s.battery_drain + s.go_silent {
                Behaviour::GoSilent { after_secs: after }
            } else if rng.gen_bool(s.at_home.clamp(0.0, 1.0)) {
                Behaviour::AtHome
            } else {
                Behaviour::Roam {
                    radius_m: rng.gen_range(300.0..1500.0),
                }
            };
            // Teltonika AVL IO has no strap element: those tags drain their battery instead.
            if protocol == Protocol::Teltonika && matches!(behaviour, Behaviour::StrapCut { .. }) {
                behaviour = Behaviour::BatteryDrain {
                    start_pct: 30,
                    drop_per_fix: 1,
                    min_pct: 5,
                };
            }
            out.push(SimDevice {
                secret: (protocol == Protocol::Em)
                    .then(|| spec.mqtt_secret.clone())
                    .flatten(),
                device_id,
                protocol,
                subject_id: None,
                home,
                home_radius_m,
                behaviour,
            });
        }
    }
    Ok(out)
}

/// Parse a list of local source addresses: comma-separated addresses or IPv4 ranges
/// (`127.0.0.1-127.0.0.20`). Each address gives its own ~28,000 ephemeral ports, so
/// 100,000 connections need four or more.
pub fn parse_source_ips(s: &str) -> Result<Vec<IpAddr>, SimConfigError> {
    let bad = |why: String| SimConfigError::SourceIps(s.into(), why);
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            None => out.push(
                part.parse::<IpAddr>()
                    .map_err(|e| bad(format!("{part:?}: {e}")))?,
            ),
            Some((a, b)) => {
                let a: Ipv4Addr = a.trim().parse().map_err(|e| bad(format!("{a:?}: {e}")))?;
                let b: Ipv4Addr = b.trim().parse().map_err(|e| bad(format!("{b:?}: {e}")))?;
                let (lo, hi) = (u32::from(a), u32::from(b));
                if hi < lo {
                    return Err(bad(format!("{b} comes before {a}")));
                }
                if hi - lo >= 65_536 {
                    return Err(bad("more than 65,536 addresses".into()));
                }
                out.extend((lo..=hi).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
            }
        }
    }
    if out.is_empty() {
        return Err(bad("no address given".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_lives_at_the_same_home_whatever_the_seed_mix_or_shares() {
        let base = FleetSpec {
            devices: 50,
            ..FleetSpec::default()
        };
        let other = FleetSpec {
            devices: 50,
            seed: 7,
            mix: "gt06=1,teltonika=3".parse().expect("mix"),
            shares: BehaviourShares::none(),
            ..FleetSpec::default()
        };
        let a = generate_fleet(&base).expect("fleet");
        let b = generate_fleet(&other).expect("fleet");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.device_id, y.device_id);
            assert_eq!(x.home, y.home, "{}", x.device_id);
            assert_eq!(x.home_radius_m, y.home_radius_m);
        }
        // Different devices, different homes.
        assert_ne!(a[0].home, a[1].home);
    }

    #[test]
    fn imeis_are_15_digits_with_valid_luhn() {
        // A published example IMEI: 49015420323751 + check digit 8.
        assert_eq!(luhn_check_digit("49015420323751"), Some(8));
        let a = imei("35", 0).unwrap();
        assert_eq!(a.len(), 15);
        assert_eq!(&a[..14], "35000000000000");
        let b = imei("3563070", 1234).unwrap();
        assert_eq!(b.len(), 15);
        let (body, check) = b.split_at(14);
        assert_eq!(luhn_check_digit(body), check.parse::<u8>().ok());
        assert!(imei("12345678901234", 0).is_err());
        assert!(imei("35a", 0).is_err());
        assert!(imei("1234567890123", 10).is_err());
        assert!(imei("1234567890123", 9).is_ok());
    }

    #[test]
    fn mix_parses_and_splits_exactly() {
        let m: ProtocolMix = "gt06=40,teltonika=40,mqtt=20".parse().unwrap();
        assert_eq!(m, ProtocolMix::default());
        let c = m.counts(1001);
        assert_eq!(c.iter().map(|(_, n)| n).sum::<usize>(), 1001);
        assert_eq!(c[2], (Protocol::Em, 200));
        let only: ProtocolMix = "mqtt=1".parse().unwrap();
        assert_eq!(only.counts(7)[2].1, 7);
        assert_eq!(only.counts(7)[0].1, 0);
        assert!("gt06=x".parse::<ProtocolMix>().is_err());
        assert!("foo=3".parse::<ProtocolMix>().is_err());
        assert!("gt06=0".parse::<ProtocolMix>().is_err());
        assert!("gt06".parse::<ProtocolMix>().is_err());
    }

    #[test]
    fn source_ip_ranges() {
        let v = parse_source_ips("127.0.0.1-127.0.0.20").unwrap();
        assert_eq!(v.len(), 20);
        assert_eq!(v[19], "127.0.0.20".parse::<IpAddr>().unwrap());
        let w = parse_source_ips("127.0.0.1, 127.0.1.0-127.0.1.1").unwrap();
        assert_eq!(w.len(), 3);
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_source_ips("nope").is_err());
        assert!(parse_source_ips("").is_err());
    }

    #[test]
    fn fleet_respects_mix_shares_and_area() {
        let spec = FleetSpec {
            devices: 2000,
            shares: BehaviourShares {
                leave_home: 0.1,
                strap_cut: 0.1,
                battery_drain: 0.1,
                go_silent: 0.1,
                at_home: 0.5,
            },
            ..FleetSpec::default()
        };
        let fleet = generate_fleet(&spec).unwrap();
        assert_eq!(fleet.len(), 2000);
        let ids: std::collections::HashSet<_> = fleet.iter().map(|d| &d.device_id).collect();
        assert_eq!(ids.len(), 2000, "IMEIs must be unique");
        let count = |p| fleet.iter().filter(|d| d.protocol == p).count();
        assert_eq!(count(Protocol::Gt06), 800);
        assert_eq!(count(Protocol::Teltonika), 800);
        assert_eq!(count(Protocol::Em), 400);
        let share = |name: &str| {
            fleet.iter().filter(|d| d.behaviour.name() == name).count() as f64 / 2000.0
        };
        assert!((0.07..0.13).contains(&share("leave_home")));
        assert!((0.07..0.13).contains(&share("go_silent")));
        // No Teltonika device cuts its strap.
        assert!(fleet
            .iter()
            .all(|d| d.protocol != Protocol::Teltonika || d.behaviour.name() != "strap_cut"));
        for d in &fleet {
            assert!(super::super::track::distance_m(spec.centre, d.home) <= spec.spread_m + 1.0);
        }
        assert_eq!(generate_fleet(&spec).unwrap(), fleet, "deterministic");
        let bad = FleetSpec {
            shares: BehaviourShares {
                leave_home: 0.9,
                strap_cut: 0.9,
                ..BehaviourShares::default()
            },
            ..FleetSpec::default()
        };
        assert!(generate_fleet(&bad).is_err());
    }
}
