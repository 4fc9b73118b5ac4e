//! Plain-words alert messages for officers.
//!
//! A message is built from the alert kind, the time of the evidence in the subject's own time
//! zone, the zone (name and schedule) and the optional evidence keys documented on
//! [`crate::Signal::evidence`]. Missing evidence only shortens the message; it never fails.

use chrono::{DateTime, Datelike, NaiveTime, Utc};
use chrono_tz::Tz;
use em_model::{AlertKind, ZoneGeometry, ZoneSpec};
use serde_json::Value;

/// Everything a message is made from.
#[derive(Debug, Clone)]
pub struct MessageContext<'a> {
    pub kind: AlertKind,
    /// Time of the evidence.
    pub at: DateTime<Utc>,
    /// "Now" when the message is written (decides whether the date is shown).
    pub now: DateTime<Utc>,
    /// The subject's time zone (UTC when unknown).
    pub tz: Tz,
    pub zone: Option<&'a ZoneSpec>,
    pub evidence: &'a Value,
}

/// Parses an IANA zone name, falling back to UTC for an empty or unknown one.
pub fn parse_tz(name: &str) -> (Tz, bool) {
    match name.parse::<Tz>() {
        Ok(tz) => (tz, true),
        Err(_) => (Tz::UTC, false),
    }
}

/// "23:14", or "23:14 on 3 Mar" when not on the same local day as `now`.
pub fn local_time(at: DateTime<Utc>, now: DateTime<Utc>, tz: Tz) -> String {
    let l = at.with_timezone(&tz);
    let n = now.with_timezone(&tz);
    if l.date_naive() == n.date_naive() {
        l.format("%H:%M").to_string()
    } else if l.year() == n.year() {
        l.format("%H:%M on %-d %b").to_string()
    } else {
        l.format("%H:%M on %-d %b %Y").to_string()
    }
}

/// Human duration: "45 s", "12 min", "3 h 5 min", "2 days 4 h".
pub fn duration_words(secs: i64) -> String {
    let secs = secs.max(0);
    if secs < 60 {
        format!("{secs} s")
    } else if secs < 3600 {
        let (m, s) = (secs / 60, secs % 60);
        if s == 0 || m >= 10 {
            format!("{m} min")
        } else {
            format!("{m} min {s} s")
        }
    } else if secs < 86_400 {
        let (h, m) = (secs / 3600, (secs % 3600) / 60);
        if m == 0 {
            format!("{h} h")
        } else {
            format!("{h} h {m} min")
        }
    } else {
        let (d, h) = (secs / 86_400, (secs % 86_400) / 3600);
        let days = if d == 1 { "day" } else { "days" };
        if h == 0 {
            format!("{d} {days}")
        } else {
            format!("{d} {days} {h} h")
        }
    }
}

fn ev_f64(ev: &Value, key: &str) -> Option<f64> {
    ev.get(key)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
}

fn ev_str<'v>(ev: &'v Value, key: &str) -> Option<&'v str> {
    ev.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn ev_time(ev: &Value, key: &str) -> Option<DateTime<Utc>> {
    ev_str(ev, key)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn metres(m: f64) -> String {
    if m >= 10_000.0 {
        format!("{:.0} km", m / 1000.0)
    } else if m >= 1000.0 {
        format!("{:.1} km", m / 1000.0)
    } else {
        format!("{:.0} m", m.max(0.0))
    }
}

/// The schedule window of `zone` that contains `at` (local time), as "19:00–07:00".
pub fn active_window(zone: &ZoneSpec, at: DateTime<Utc>, tz: Tz) -> Option<String> {
    let schedule = zone.schedule.as_ref()?;
    let local = at.with_timezone(&tz);
    let today = local.weekday().number_from_monday();
    let yesterday = if today == 1 { 7 } else { today - 1 };
    let t = local.time();
    let hm = |s: &str| NaiveTime::parse_from_str(s.trim(), "%H:%M").ok();
    for w in &schedule.windows {
        let (Some(start), Some(end)) = (hm(&w.start), hm(&w.end)) else {
            continue;
        };
        let day = u32::from(w.day);
        let crosses = end <= start;
        let inside = if crosses {
            (day == today && t >= start) || (day == yesterday && t < end)
        } else {
            day == today && t >= start && t < end
        };
        if inside {
            return Some(format!("{}–{}", start.format("%H:%M"), end.format("%H:%M")));
        }
    }
    None
}

/// Builds the plain-words message of an alert.
pub fn describe(ctx: &MessageContext<'_>) -> String {
    let ev = ctx.evidence;
    let when = |t: DateTime<Utc>| local_time(t, ctx.now, ctx.tz);
    let at = when(ctx.at);
    let fix_time = ev_time(ev, "fix_time").unwrap_or(ctx.at);
    let zone_name = ev_str(ev, "zone_name")
        .map(str::to_owned)
        .or_else(|| ctx.zone.map(|z| z.name.clone()));
    let window = ev_str(ev, "window")
        .map(str::to_owned)
        .or_else(|| {
            let (start, end) = (ev_time(ev, "window_start")?, ev_time(ev, "window_end")?);
            Some(format!(
                "{}–{}",
                start.with_timezone(&ctx.tz).format("%H:%M"),
                end.with_timezone(&ctx.tz).format("%H:%M")
            ))
        })
        .or_else(|| ctx.zone.and_then(|z| active_window(z, ctx.at, ctx.tz)));
    // Distances are magnitudes in messages ("240 m outside", "35 m inside").
    let distance = ev_f64(ev, "distance_m").map(f64::abs);
    let radius = ev_f64(ev, "radius_m").or_else(|| match ctx.zone.map(|z| &z.geometry) {
        Some(ZoneGeometry::Dynamic { radius_m, .. }) => Some(*radius_m),
        _ => None,
    });
    let battery = ev_f64(ev, "battery_pct");

    // "(Home, curfew 19:00–07:00)" / "(Work, hours 08:00–16:00)" / "(Home)" / ""
    let zone_part = |window_word: &str| -> String {
        match (&zone_name, &window) {
            (Some(n), Some(w)) => format!(" ({n}, {window_word} {w})"),
            (Some(n), None) => format!(" ({n})"),
            (None, Some(w)) => format!(" ({window_word} {w})"),
            (None, None) => String::new(),
        }
    };
    let last_position = |rel: &str| -> String {
        match distance {
            Some(d) => format!(
                " Last position {} {rel} the zone at {}.",
                metres(d),
                when(fix_time)
            ),
            None => format!(" Last position at {}.", when(fix_time)),
        }
    };

    use AlertKind::*;
    match ctx.kind {
        CurfewViolation => format!(
            "Left home during curfew{}.{}",
            zone_part("curfew"),
            last_position("outside")
        ),
        InclusionZoneExit => format!(
            "Left a zone they must stay in{}.{}",
            zone_part("hours"),
            last_position("outside")
        ),
        ExclusionZoneEntry => format!(
            "Entered a zone they must keep out of{}.{}",
            zone_part("hours"),
            last_position("inside")
        ),
        VictimProximity => {
            let who = zone_name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            match (distance, radius) {
                (Some(d), Some(r)) => format!(
                    "Came within {} of the protected person{who} at {} (allowed distance {}).",
                    metres(d),
                    when(fix_time),
                    metres(r)
                ),
                (Some(d), None) => format!(
                    "Came within {} of the protected person{who} at {}.",
                    metres(d),
                    when(fix_time)
                ),
                _ => format!(
                    "Came too close to the protected person{who} at {}.",
                    when(fix_time)
                ),
            }
        }
        NoFixDuringCurfew => {
            let since = ev_time(ev, "last_fix_time")
                .map(|t| format!(" The last position was at {}.", when(t)))
                .unwrap_or_default();
            format!(
                "No location from the tag during curfew{} since {at}, and the home unit does not confirm the subject is at home.{since}",
                zone_part("curfew")
            )
        }
        StrapTamper => {
            format!("The tag reports its strap was opened or cut at {at}. Check on the subject now.")
        }
        CaseTamper => format!("The tag reports its case was opened or damaged at {at}."),
        LowBattery => match battery {
            Some(b) => format!(
                "Tag battery is low ({b:.0} %) at {at}. The subject needs to charge the tag."
            ),
            None => format!("Tag battery is low at {at}. The subject needs to charge the tag."),
        },
        BatteryDead => format!(
            "Tag battery is empty at {at}. The tag will stop reporting until it is charged."
        ),
        ChargerNotConnected => match battery {
            Some(b) => format!(
                "The tag was not put on charge when due (battery {b:.0} % at {at})."
            ),
            None => format!("The tag was not put on charge when due ({at})."),
        },
        LostCommunication => {
            let last = ev_time(ev, "last_contact").unwrap_or(ctx.at);
            let silent = ev_f64(ev, "silent_secs")
                .map(|s| s as i64)
                .unwrap_or_else(|| (ctx.now - last).num_seconds());
            format!(
                "No contact from the tag since {} ({}).",
                when(last),
                duration_words(silent)
            )
        }
        GpsJammingSuspected => format!(
            "Possible GPS jamming at {at}: the tag lost its satellite position while its mobile connection kept working."
        ),
        DeviceClockWrong => match ev_f64(ev, "offset_secs") {
            Some(o) => format!(
                "The tag's clock is {} {} (checked at {at}). Times it reports may be wrong.",
                duration_words(o.abs() as i64),
                if o >= 0.0 { "fast" } else { "slow" }
            ),
            None => format!("The tag's clock is wrong (checked at {at}). Times it reports may be wrong."),
        },
        UnknownAlarm => {
            let proto = ev_str(ev, "protocol")
                .map(|p| format!("{} ", p.to_uppercase()))
                .unwrap_or_default();
            let code = ev_f64(ev, "code")
                .map(|c| format!(" ({proto}code {:#04x})", c as i64))
                .unwrap_or_default();
            format!(
                "The tag sent an alarm this system does not recognise{code} at {at}. It may be a tamper or an SOS: check the tag and the subject."
            )
        }
    }
}

/// Note written when an alert is resolved automatically.
pub fn auto_resolve_note(
    kind: AlertKind,
    ended: DateTime<Utc>,
    now: DateTime<Utc>,
    tz: Tz,
) -> String {
    let at = local_time(ended, now, tz);
    use AlertKind::*;
    let what = match kind {
        CurfewViolation => "Back inside the curfew zone",
        InclusionZoneExit => "Back inside the zone",
        ExclusionZoneEntry => "Left the forbidden zone",
        VictimProximity => "No longer near the protected person",
        NoFixDuringCurfew => "Location or home-unit contact is back",
        StrapTamper => "Strap reported intact again",
        CaseTamper => "Case reported intact again",
        LowBattery | BatteryDead => "Battery charged again",
        ChargerNotConnected => "Charger connected",
        LostCommunication => "Tag back in contact",
        GpsJammingSuspected => "Satellite position back",
        DeviceClockWrong => "Tag clock correct again",
        UnknownAlarm => "Unknown alarm cleared",
    };
    format!("{what} at {at}; resolved automatically.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use em_model::{ScheduleSpec, WeeklyWindow, ZoneKind};
    use serde_json::json;

    fn home() -> ZoneSpec {
        ZoneSpec {
            id: 7,
            subject_id: Some(1),
            group: None,
            name: "Home".into(),
            kind: ZoneKind::Inclusion,
            geometry: ZoneGeometry::Circle {
                center: [12.5, 55.6],
                radius_m: 100.0,
            },
            schedule: Some(ScheduleSpec {
                windows: (1..=7)
                    .map(|day| WeeklyWindow {
                        day,
                        start: "19:00".into(),
                        end: "07:00".into(),
                    })
                    .collect(),
                exceptions: vec![],
            }),
            is_curfew_home: true,
        }
    }

    #[test]
    fn curfew_message_uses_subject_time_zone_zone_and_window() {
        let tz: Tz = "Europe/Copenhagen".parse().unwrap();
        // 22:14 UTC on a winter day = 23:14 in Copenhagen.
        let at = Utc.with_ymd_and_hms(2025, 1, 15, 22, 14, 0).unwrap();
        let zone = home();
        let ev = json!({"distance_m": 240.4});
        let msg = describe(&MessageContext {
            kind: AlertKind::CurfewViolation,
            at,
            now: at,
            tz,
            zone: Some(&zone),
            evidence: &ev,
        });
        assert_eq!(
            msg,
            "Left home during curfew (Home, curfew 19:00–07:00). Last position 240 m outside the zone at 23:14."
        );
    }

    #[test]
    fn window_crossing_midnight_is_found_after_midnight() {
        let tz: Tz = "Europe/Copenhagen".parse().unwrap();
        let zone = home();
        // 01:30 local on Thursday belongs to Wednesday's 19:00–07:00 window.
        let at = Utc.with_ymd_and_hms(2025, 1, 16, 0, 30, 0).unwrap();
        assert_eq!(active_window(&zone, at, tz).as_deref(), Some("19:00–07:00"));
        // 12:00 local is outside every window.
        let noon = Utc.with_ymd_and_hms(2025, 1, 16, 11, 0, 0).unwrap();
        assert_eq!(active_window(&zone, noon, tz), None);
    }

    #[test]
    fn date_is_shown_when_not_today() {
        let tz = Tz::UTC;
        let at = Utc.with_ymd_and_hms(2025, 3, 3, 8, 5, 0).unwrap();
        let now = Utc.with_ymd_and_hms(2025, 3, 4, 9, 0, 0).unwrap();
        assert_eq!(local_time(at, now, tz), "08:05 on 3 Mar");
    }

    #[test]
    fn every_kind_has_a_message_without_evidence() {
        let at = Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap();
        let ev = Value::Null;
        for kind in AlertKind::ALL {
            let msg = describe(&MessageContext {
                kind,
                at,
                now: at,
                tz: Tz::UTC,
                zone: None,
                evidence: &ev,
            });
            assert!(msg.len() > 20, "{kind:?}: {msg}");
            assert!(msg.contains("12:00"), "{kind:?} lacks the time: {msg}");
            assert!(!msg.contains("None") && !msg.contains("null"), "{msg}");
            assert!(!auto_resolve_note(kind, at, at, Tz::UTC).is_empty());
        }
    }

    #[test]
    fn technical_messages_use_evidence() {
        let at = Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap();
        let mk = |kind, ev: Value, now| {
            describe(&MessageContext {
                kind,
                at,
                now,
                tz: Tz::UTC,
                zone: None,
                evidence: &ev,
            })
        };
        assert!(mk(AlertKind::LowBattery, json!({"battery_pct": 12}), at).contains("(12 %)"));
        let m = mk(
            AlertKind::LostCommunication,
            json!({"last_contact": "2025-06-01T11:15:00Z"}),
            at,
        );
        assert_eq!(m, "No contact from the tag since 11:15 (45 min).");
        let m = mk(
            AlertKind::DeviceClockWrong,
            json!({"offset_secs": -725}),
            at,
        );
        assert!(m.contains("12 min slow"), "{m}");
        let m = mk(
            AlertKind::VictimProximity,
            json!({"distance_m": 180, "radius_m": 500}),
            at,
        );
        assert!(m.contains("within 180 m") && m.contains("500 m"), "{m}");
        let m = mk(
            AlertKind::UnknownAlarm,
            json!({"code": 0x37, "protocol": "gt06"}),
            at,
        );
        assert!(m.contains("does not recognise (GT06 code 0x37)"), "{m}");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_words(5), "5 s");
        assert_eq!(duration_words(125), "2 min 5 s");
        assert_eq!(duration_words(3600 * 3 + 300), "3 h 5 min");
        assert_eq!(duration_words(86_400 * 2 + 3600 * 4), "2 days 4 h");
        assert_eq!(duration_words(-3), "0 s");
    }

    #[test]
    fn unknown_time_zone_falls_back_to_utc() {
        assert_eq!(parse_tz("Mars/Olympus"), (Tz::UTC, false));
        assert!(parse_tz("Europe/Copenhagen").1);
    }
}
