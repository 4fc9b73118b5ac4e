//! The curfew-compliance report: for each subject and period, the hours the curfew required
//! (from the curfew-home zones' schedules, in the subject's time zone, via
//! [`em_geofence::active_intervals`]), how many of them were compliant, and the violations
//! (curfew-violation and no-fix-during-curfew alerts) with the part of their duration that
//! fell inside required time. Rolled up per officer; exported as JSON or CSV.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use em_model::{Alert, AlertId, AlertKind, Subject, SubjectId, UserId, ZoneSpec};
use serde::Serialize;

/// A half-open UTC interval.
pub type Interval = (DateTime<Utc>, DateTime<Utc>);

/// Alert kinds that count as curfew violations.
pub const VIOLATION_KINDS: [AlertKind; 2] =
    [AlertKind::CurfewViolation, AlertKind::NoFixDuringCurfew];
/// Resolution codes meaning "this was not a violation": such alerts are not counted.
pub const NOT_A_VIOLATION_CODES: [&str; 2] = ["false_alarm", "approved_absence"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ViolationRow {
    pub alert_id: AlertId,
    pub kind: AlertKind,
    pub started_at: DateTime<Utc>,
    /// End of the condition (or the resolution time); None while ongoing.
    pub ended_at: Option<DateTime<Utc>>,
    /// Seconds of this violation inside required curfew time within the period.
    pub duration_secs: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubjectCurfew {
    pub subject_id: SubjectId,
    pub reference: String,
    pub display_name: String,
    pub officer_id: Option<UserId>,
    pub officer_name: Option<String>,
    pub required_secs: i64,
    pub compliant_secs: i64,
    /// Union of violation time inside required time (overlapping alerts count once).
    pub violation_secs: i64,
    pub violation_count: usize,
    /// compliant / required × 100; None when nothing was required.
    pub compliance_pct: Option<f64>,
    pub violations: Vec<ViolationRow>,
    /// Why the subject could not be computed (e.g. an invalid time zone or schedule).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OfficerCurfew {
    pub officer_id: Option<UserId>,
    pub officer_name: String,
    pub subjects: usize,
    pub required_secs: i64,
    pub compliant_secs: i64,
    pub violation_secs: i64,
    pub violation_count: usize,
    pub compliance_pct: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurfewReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub generated_at: DateTime<Utc>,
    pub subjects: Vec<SubjectCurfew>,
    pub officers: Vec<OfficerCurfew>,
}

/// Sort and merge overlapping or touching intervals; drops empty ones.
pub fn merge(mut ivs: Vec<Interval>) -> Vec<Interval> {
    ivs.retain(|(s, e)| e > s);
    ivs.sort();
    let mut out: Vec<Interval> = Vec::with_capacity(ivs.len());
    for (s, e) in ivs {
        match out.last_mut() {
            Some(last) if s <= last.1 => {
                if e > last.1 {
                    last.1 = e;
                }
            }
            _ => out.push((s, e)),
        }
    }
    out
}

/// Intersection of two merged interval lists.
pub fn intersect(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while let (Some(x), Some(y)) = (a.get(i), b.get(j)) {
        let s = x.0.max(y.0);
        let e = x.1.min(y.1);
        if e > s {
            out.push((s, e));
        }
        if x.1 < y.1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

pub fn total_secs(ivs: &[Interval]) -> i64 {
    ivs.iter().map(|(s, e)| (*e - *s).num_seconds()).sum()
}

fn pct(compliant: i64, required: i64) -> Option<f64> {
    (required > 0).then(|| (compliant as f64 * 1000.0 / required as f64).round() / 10.0)
}

/// Required curfew intervals of a subject within `[from, to)`, clipped to the order dates.
pub fn required_intervals(
    subject: &Subject,
    zones: &[ZoneSpec],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Interval>, String> {
    let from = subject.order_start.map_or(from, |s| s.max(from));
    let to = subject.order_end.map_or(to, |e| e.min(to));
    if to <= from {
        return Ok(Vec::new());
    }
    let tz = em_geofence::parse_timezone(&subject.timezone).map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    for zone in zones.iter().filter(|z| z.is_curfew_home) {
        let Some(schedule) = &zone.schedule else {
            continue;
        };
        let ivs = em_geofence::active_intervals(schedule, tz, from, to)
            .map_err(|e| format!("zone {} ({}): {e}", zone.id, zone.name))?;
        all.extend(ivs);
    }
    Ok(merge(all))
}

/// Compute one subject's row. `now` caps ongoing violations and future required time.
pub fn subject_report(
    subject: &Subject,
    officer_name: Option<String>,
    zones: &[ZoneSpec],
    alerts: &[Alert],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> SubjectCurfew {
    let to = to.min(now);
    let mut row = SubjectCurfew {
        subject_id: subject.id,
        reference: subject.reference.clone(),
        display_name: subject.display_name.clone(),
        officer_id: subject.officer_id,
        officer_name,
        required_secs: 0,
        compliant_secs: 0,
        violation_secs: 0,
        violation_count: 0,
        compliance_pct: None,
        violations: Vec::new(),
        error: None,
    };
    if to <= from {
        return row;
    }
    let required = match required_intervals(subject, zones, from, to) {
        Ok(r) => r,
        Err(e) => {
            row.error = Some(e);
            return row;
        }
    };
    let mut violation_ivs = Vec::new();
    for alert in alerts.iter().filter(|a| {
        a.subject_id == subject.id
            && VIOLATION_KINDS.contains(&a.kind)
            && !a
                .resolution_code
                .as_deref()
                .is_some_and(|c| NOT_A_VIOLATION_CODES.contains(&c))
    }) {
        let end = alert.ended_at.or(alert.resolved_at).unwrap_or(now);
        if alert.started_at >= to || end <= from {
            continue;
        }
        let own = merge(vec![(alert.started_at.max(from), end.min(to))]);
        let inside = intersect(&own, &required);
        row.violations.push(ViolationRow {
            alert_id: alert.id,
            kind: alert.kind,
            started_at: alert.started_at,
            ended_at: alert.ended_at.or(alert.resolved_at),
            duration_secs: total_secs(&inside),
        });
        violation_ivs.extend(inside);
    }
    row.violations.sort_by_key(|v| v.started_at);
    row.required_secs = total_secs(&required);
    row.violation_secs = total_secs(&merge(violation_ivs));
    row.compliant_secs = (row.required_secs - row.violation_secs).max(0);
    row.violation_count = row.violations.len();
    row.compliance_pct = pct(row.compliant_secs, row.required_secs);
    row
}

/// Per-officer totals of subject rows (subjects without an officer are grouped as "unassigned").
pub fn officer_rollup(subjects: &[SubjectCurfew]) -> Vec<OfficerCurfew> {
    let mut by: BTreeMap<Option<UserId>, OfficerCurfew> = BTreeMap::new();
    for s in subjects {
        let o = by.entry(s.officer_id).or_insert_with(|| OfficerCurfew {
            officer_id: s.officer_id,
            officer_name: s
                .officer_name
                .clone()
                .unwrap_or_else(|| "(unassigned)".to_string()),
            subjects: 0,
            required_secs: 0,
            compliant_secs: 0,
            violation_secs: 0,
            violation_count: 0,
            compliance_pct: None,
        });
        o.subjects += 1;
        o.required_secs += s.required_secs;
        o.compliant_secs += s.compliant_secs;
        o.violation_secs += s.violation_secs;
        o.violation_count += s.violation_count;
    }
    let mut out: Vec<OfficerCurfew> = by.into_values().collect();
    for o in &mut out {
        o.compliance_pct = pct(o.compliant_secs, o.required_secs);
    }
    out
}

fn hours(secs: i64) -> String {
    format!("{:.2}", secs as f64 / 3600.0)
}

/// Neutralise spreadsheet formulas in text cells (CSV injection).
fn text_cell(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

/// CSV export: one `subject` row per subject, one `violation` row per violation (under its
/// subject), and one `officer` row per officer.
pub fn to_csv(report: &CurfewReport) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "row_type",
        "subject_id",
        "reference",
        "subject_name",
        "officer",
        "required_hours",
        "compliant_hours",
        "violation_hours",
        "violation_count",
        "compliance_pct",
        "alert_id",
        "alert_kind",
        "violation_start",
        "violation_end",
        "note",
    ])?;
    let opt_pct = |p: Option<f64>| p.map(|p| format!("{p:.1}")).unwrap_or_default();
    for s in &report.subjects {
        let officer = text_cell(s.officer_name.as_deref().unwrap_or(""));
        w.write_record([
            "subject".to_string(),
            s.subject_id.to_string(),
            text_cell(&s.reference),
            text_cell(&s.display_name),
            officer.clone(),
            hours(s.required_secs),
            hours(s.compliant_secs),
            hours(s.violation_secs),
            s.violation_count.to_string(),
            opt_pct(s.compliance_pct),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            text_cell(s.error.as_deref().unwrap_or("")),
        ])?;
        for v in &s.violations {
            w.write_record([
                "violation".to_string(),
                s.subject_id.to_string(),
                text_cell(&s.reference),
                text_cell(&s.display_name),
                officer.clone(),
                String::new(),
                String::new(),
                hours(v.duration_secs),
                String::new(),
                String::new(),
                v.alert_id.to_string(),
                v.kind.as_str().to_string(),
                v.started_at.to_rfc3339(),
                v.ended_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                if v.ended_at.is_none() {
                    "ongoing".to_string()
                } else {
                    String::new()
                },
            ])?;
        }
    }
    for o in &report.officers {
        w.write_record([
            "officer".to_string(),
            String::new(),
            String::new(),
            String::new(),
            text_cell(&o.officer_name),
            hours(o.required_secs),
            hours(o.compliant_secs),
            hours(o.violation_secs),
            o.violation_count.to_string(),
            opt_pct(o.compliance_pct),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            format!("{} subjects", o.subjects),
        ])?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| csv::Error::from(std::io::Error::other(e.to_string())))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use em_model::{
        AlertState, BreachRules, ScheduleSpec, Severity, WeeklyWindow, ZoneGeometry, ZoneKind,
    };

    fn t(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, d, h, m, 0)
            .single()
            .expect("valid time")
    }

    fn subject() -> Subject {
        Subject {
            id: 1,
            reference: "=CASE-1".into(),
            display_name: "A, B".into(),
            officer_id: Some(5),
            timezone: "UTC".into(),
            order_start: None,
            order_end: None,
            rules: BreachRules::default(),
        }
    }

    fn home() -> ZoneSpec {
        // 2024-01-01 is a Monday: curfew every day 20:00-06:00 UTC.
        ZoneSpec {
            id: 9,
            subject_id: Some(1),
            group: None,
            name: "Home".into(),
            kind: ZoneKind::Inclusion,
            geometry: ZoneGeometry::Circle {
                center: [0.0, 0.0],
                radius_m: 50.0,
            },
            schedule: Some(ScheduleSpec {
                windows: (1..=7)
                    .map(|day| WeeklyWindow {
                        day,
                        start: "20:00".into(),
                        end: "06:00".into(),
                    })
                    .collect(),
                exceptions: vec![],
            }),
            is_curfew_home: true,
        }
    }

    fn alert(id: i64, start: DateTime<Utc>, end: Option<DateTime<Utc>>) -> Alert {
        Alert {
            id,
            subject_id: 1,
            device_id: None,
            kind: AlertKind::CurfewViolation,
            severity: Severity::High,
            state: AlertState::Open,
            zone_id: Some(9),
            message: "out".into(),
            started_at: start,
            created_at: start,
            last_seen_at: start,
            ended_at: end,
            escalated: false,
            acknowledged_by: None,
            acknowledged_at: None,
            resolved_by: None,
            resolved_at: None,
            resolution_code: None,
            resolution_note: None,
            evidence: serde_json::Value::Null,
            occurrences: 1,
        }
    }

    #[test]
    fn interval_algebra() {
        let m = merge(vec![
            (t(1, 3, 0), t(1, 4, 0)),
            (t(1, 1, 0), t(1, 2, 0)),
            (t(1, 1, 30), t(1, 3, 0)),
        ]);
        assert_eq!(m, vec![(t(1, 1, 0), t(1, 4, 0))]);
        let i = intersect(&m, &[(t(1, 0, 0), t(1, 2, 0)), (t(1, 3, 30), t(1, 5, 0))]);
        assert_eq!(i, vec![(t(1, 1, 0), t(1, 2, 0)), (t(1, 3, 30), t(1, 4, 0))]);
        assert_eq!(total_secs(&i), 5400);
    }

    #[test]
    fn report_counts_required_compliant_and_violations() {
        // Period: Mon 12:00 .. Wed 12:00 → two nights of 10 h required.
        let from = t(1, 12, 0);
        let to = t(3, 12, 0);
        let alerts = vec![
            // 21:00-23:00 on Monday night: 2 h inside curfew.
            alert(1, t(1, 21, 0), Some(t(1, 23, 0))),
            // 18:00-20:30 Tuesday: only 30 min inside curfew.
            alert(2, t(2, 18, 0), Some(t(2, 20, 30))),
            // False alarm: not counted.
            Alert {
                resolution_code: Some("false_alarm".into()),
                ..alert(3, t(2, 22, 0), Some(t(2, 23, 0)))
            },
        ];
        let r = subject_report(
            &subject(),
            Some("Olsen".into()),
            &[home()],
            &alerts,
            from,
            to,
            t(9, 0, 0),
        );
        assert_eq!(r.required_secs, 20 * 3600);
        assert_eq!(r.violation_secs, 2 * 3600 + 1800);
        assert_eq!(r.compliant_secs, 20 * 3600 - 2 * 3600 - 1800);
        assert_eq!(r.violation_count, 2);
        assert_eq!(r.violations[1].duration_secs, 1800);
        assert_eq!(r.compliance_pct, Some(87.5));
        let officers = officer_rollup(std::slice::from_ref(&r));
        assert_eq!(officers.len(), 1);
        assert_eq!(officers[0].required_secs, 20 * 3600);

        let report = CurfewReport {
            from,
            to,
            generated_at: to,
            subjects: vec![r],
            officers,
        };
        let csv = to_csv(&report).expect("csv");
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[0].starts_with("row_type,subject_id,reference"));
        assert!(
            lines[1].starts_with("subject,1,'=CASE-1,\"A, B\",Olsen,20.00,17.50,2.50,2,87.5"),
            "{}",
            lines[1]
        );
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("violation,")).count(),
            2
        );
        assert!(lines.last().is_some_and(|l| l.starts_with("officer,")));
    }

    #[test]
    fn ongoing_violation_is_capped_at_now_and_future_not_required() {
        let now = t(1, 22, 0);
        let r = subject_report(
            &subject(),
            None,
            &[home()],
            &[alert(1, t(1, 21, 0), None)],
            t(1, 0, 0),
            t(2, 0, 0),
            now,
        );
        // Required so far: 00:00-06:00 (Sunday's window) + 20:00-22:00.
        assert_eq!(r.required_secs, 8 * 3600);
        assert_eq!(r.violation_secs, 3600);
        assert_eq!(r.violations[0].ended_at, None);
    }

    #[test]
    fn bad_timezone_is_reported_not_panicked() {
        let s = Subject {
            timezone: "Mars/Olympus".into(),
            ..subject()
        };
        let r = subject_report(&s, None, &[home()], &[], t(1, 0, 0), t(2, 0, 0), t(9, 0, 0));
        assert!(r.error.is_some());
        assert_eq!(r.required_secs, 0);
    }
}
