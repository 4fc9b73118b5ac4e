//! Curfew schedules: weekly windows in the subject's IANA time zone, one-off exceptions,
//! and the computation of active intervals and next transitions.
//!
//! # Rules
//!
//! * A weekly window `{day, start, end}` starts on `day` at local `start`; when
//!   `end <= start` it ends on the next day at local `end` (so `19:00–07:00` crosses
//!   midnight, and `start == end` is a 24-hour window). `"24:00"` is accepted as an end.
//! * Windows are anchored to the wall clock, so across a DST change a `19:00–07:00`
//!   window lasts 11 real hours on the spring-forward night and 13 on the fall-back night.
//! * A local time that does not exist (skipped by a spring-forward gap, e.g. 01:30 in
//!   Europe/London on the last Sunday of March) resolves to the first instant after the
//!   gap (the moment the clock jumps). A local time that occurs twice (fall-back) resolves
//!   to its earlier occurrence. The same rule applies to window starts and ends.
//! * The zone is active while inside a weekly window or an `ExtraCurfew` exception, and
//!   not inside an `Absence` exception: an approved absence wins over everything.
//! * Order start/end dates are applied by the caller ([`crate::SubjectMonitor`] clamps to
//!   `Subject::order_start`/`order_end`); [`active_intervals`] takes the period to report.

use crate::GeofenceError;
use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset,
    TimeZone, Utc, Weekday,
};
use chrono_tz::Tz;
use em_model::{ExceptionKind, ScheduleSpec};

/// A half-open UTC interval `[start, end)`.
pub type Interval = (DateTime<Utc>, DateTime<Utc>);

/// Longest period [`active_intervals`] accepts, days.
pub const MAX_REPORT_DAYS: i64 = 3700;
/// How far [`CompiledSchedule::state_at`] looks around an instant, days.
const HORIZON_DAYS: i64 = 8;

/// Parse an IANA time zone name ("Europe/Copenhagen").
pub fn parse_timezone(name: &str) -> Result<Tz, GeofenceError> {
    name.trim()
        .parse::<Tz>()
        .map_err(|_| GeofenceError::InvalidTimezone(name.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LocalWindow {
    weekday: Weekday,
    /// Minutes after local midnight, 0..1440.
    start_min: u32,
    /// Minutes after local midnight, 0..=1440; ends the next day when `<= start_min`.
    end_min: u32,
}

/// A validated schedule, ready for evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompiledSchedule {
    windows: Vec<LocalWindow>,
    absences: Vec<Interval>,
    extras: Vec<Interval>,
}

/// Schedule state at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleState {
    pub active: bool,
    /// The active interval containing the instant (clipped to the look-around horizon).
    pub interval: Option<Interval>,
    /// The next instant the state may change: the end of the active interval, the start
    /// of the next one, or a re-check point at the horizon. Always after the instant.
    pub next_change: DateTime<Utc>,
}

fn parse_hhmm(s: &str, allow_24: bool) -> Result<u32, GeofenceError> {
    let bad = || GeofenceError::InvalidSchedule(format!("time {s:?} is not HH:MM"));
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if m >= 60 {
        return Err(bad());
    }
    match (h, m) {
        (24, 0) if allow_24 => Ok(1440),
        (h, m) if h < 24 => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

fn weekday_from_iso(day: u8) -> Result<Weekday, GeofenceError> {
    Ok(match day {
        1 => Weekday::Mon,
        2 => Weekday::Tue,
        3 => Weekday::Wed,
        4 => Weekday::Thu,
        5 => Weekday::Fri,
        6 => Weekday::Sat,
        7 => Weekday::Sun,
        _ => {
            return Err(GeofenceError::InvalidSchedule(format!(
                "day {day} is not an ISO weekday (1 = Monday .. 7 = Sunday)"
            )))
        }
    })
}

/// Resolve a local wall-clock time to an instant (see the module rules for gaps/overlaps).
pub fn resolve_local(tz: Tz, naive: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.min(b).with_timezone(&Utc),
        LocalResult::None => resolve_gap(tz, naive),
    }
}

/// First instant whose local time is at or after `naive`, which lies in a gap.
fn resolve_gap(tz: Tz, naive: NaiveDateTime) -> DateTime<Utc> {
    let off = |n: NaiveDateTime| i64::from(tz.offset_from_utc_datetime(&n).fix().local_minus_utc());
    let day = Duration::days(1);
    let before = off(naive.checked_sub_signed(day).unwrap_or(naive));
    let after = off(naive.checked_add_signed(day).unwrap_or(naive));
    let local_at = |secs: i64| {
        DateTime::<Utc>::from_timestamp(secs, 0).map(|u| u.with_timezone(&tz).naive_local())
    };
    let naive_secs = naive.and_utc().timestamp();
    if after > before {
        // local(lo) < naive <= local(hi); local time is monotone in between.
        let mut lo = naive_secs - after;
        let mut hi = naive_secs - before;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match local_at(mid) {
                Some(l) if l >= naive => hi = mid,
                _ => lo = mid,
            }
        }
        if let Some(t) = DateTime::<Utc>::from_timestamp(hi, 0) {
            return t;
        }
    }
    // Unusual data (two transitions within a day): walk forward minute by minute.
    for minutes in 1..=(48 * 60) {
        let Some(candidate) = naive.checked_add_signed(Duration::minutes(minutes)) else {
            break;
        };
        match tz.from_local_datetime(&candidate) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(a, b) => return a.min(b).with_timezone(&Utc),
            LocalResult::None => {}
        }
    }
    naive.and_utc() - Duration::seconds(before)
}

fn local_instant(tz: Tz, date: NaiveDate, minutes: u32) -> Option<DateTime<Utc>> {
    let naive = date
        .and_time(NaiveTime::MIN)
        .checked_add_signed(Duration::minutes(i64::from(minutes)))?;
    Some(resolve_local(tz, naive))
}

/// Sort and merge overlapping or touching intervals.
fn merge(mut v: Vec<Interval>) -> Vec<Interval> {
    v.sort_unstable();
    let mut out: Vec<Interval> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `a` minus `b` (both sorted and merged).
fn subtract(a: Vec<Interval>, b: &[Interval]) -> Vec<Interval> {
    if b.is_empty() {
        return a;
    }
    let mut out = Vec::with_capacity(a.len());
    for (mut s, e) in a {
        for &(bs, be) in b {
            if be <= s || bs >= e {
                continue;
            }
            if bs > s {
                out.push((s, bs));
            }
            s = s.max(be);
            if s >= e {
                break;
            }
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

impl CompiledSchedule {
    /// Validate a schedule spec.
    pub fn compile(spec: &ScheduleSpec) -> Result<Self, GeofenceError> {
        let mut windows = Vec::with_capacity(spec.windows.len());
        for w in &spec.windows {
            let weekday = weekday_from_iso(w.day)?;
            let start_min = parse_hhmm(&w.start, false)?;
            let end_min = parse_hhmm(&w.end, true)?;
            windows.push(LocalWindow {
                weekday,
                start_min,
                end_min,
            });
        }
        let mut absences = Vec::new();
        let mut extras = Vec::new();
        for x in &spec.exceptions {
            if x.end <= x.start {
                return Err(GeofenceError::InvalidSchedule(format!(
                    "exception {} – {} ends before it starts",
                    x.start, x.end
                )));
            }
            match x.kind {
                ExceptionKind::Absence => absences.push((x.start, x.end)),
                ExceptionKind::ExtraCurfew => extras.push((x.start, x.end)),
            }
        }
        Ok(CompiledSchedule {
            windows,
            absences: merge(absences),
            extras: merge(extras),
        })
    }

    /// Sorted, disjoint active intervals within `[from, to)`.
    pub fn intervals(&self, tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Interval> {
        if from >= to {
            return Vec::new();
        }
        let mut raw: Vec<Interval> = Vec::new();
        if !self.windows.is_empty() {
            let from_date = from.with_timezone(&tz).date_naive();
            let first = from_date.pred_opt().unwrap_or(from_date);
            let last = to.with_timezone(&tz).date_naive();
            let mut day = Some(first);
            while let Some(d) = day.filter(|d| *d <= last) {
                let next = d.succ_opt();
                for w in self.windows.iter().filter(|w| w.weekday == d.weekday()) {
                    let end_date = if w.end_min <= w.start_min {
                        next
                    } else {
                        Some(d)
                    };
                    let (Some(s), Some(e)) = (
                        local_instant(tz, d, w.start_min),
                        end_date.and_then(|ed| local_instant(tz, ed, w.end_min)),
                    ) else {
                        continue;
                    };
                    if e > s && e > from && s < to {
                        raw.push((s, e));
                    }
                }
                day = next;
            }
        }
        raw.extend(
            self.extras
                .iter()
                .copied()
                .filter(|&(s, e)| e > from && s < to),
        );
        let merged = merge(raw);
        subtract(merged, &self.absences)
            .into_iter()
            .map(|(s, e)| (s.max(from), e.min(to)))
            .filter(|(s, e)| s < e)
            .collect()
    }

    /// State at `t` and when it may next change.
    pub fn state_at(&self, tz: Tz, t: DateTime<Utc>) -> ScheduleState {
        let horizon = Duration::days(HORIZON_DAYS);
        let from = t
            .checked_sub_signed(horizon)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let to = t
            .checked_add_signed(horizon)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let ivs = self.intervals(tz, from, to);
        if let Some(&(s, e)) = ivs.iter().find(|(s, e)| *s <= t && t < *e) {
            return ScheduleState {
                active: true,
                interval: Some((s, e)),
                next_change: e,
            };
        }
        let next = ivs.iter().map(|iv| iv.0).find(|s| *s > t).unwrap_or(to);
        ScheduleState {
            active: false,
            interval: None,
            next_change: next,
        }
    }
}

/// Required (active) intervals of `spec` for a subject in `tz` within `[from, to)`:
/// what the compliance report needs. The caller clamps `from`/`to` to the order dates.
/// Fails on an invalid schedule or a period longer than [`MAX_REPORT_DAYS`].
pub fn active_intervals(
    spec: &ScheduleSpec,
    tz: Tz,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Interval>, GeofenceError> {
    if to - from > Duration::days(MAX_REPORT_DAYS) {
        return Err(GeofenceError::InvalidSchedule(format!(
            "report period {from} – {to} is longer than {MAX_REPORT_DAYS} days"
        )));
    }
    Ok(CompiledSchedule::compile(spec)?.intervals(tz, from, to))
}
