//! GT06 / Concox alarm and status tables: the ONLY place where a GT06 alarm code becomes an
//! EM event. Each row names its source (vendor document and the section / table it is in).
//! A code that is not in a table becomes [`DeviceEventKind::UnknownAlarm`] — never silence,
//! never another alarm.
//!
//! Documents (public Concox protocol sheets):
//! * **GT06** — "GT06 GPS Tracker Communication Protocol" (GT06/GT06N), sections "Alarm
//!   packet (0x16)", table "Terminal Information Content" and table "Alarm/Language".
//! * **VL01** — Concox "JM-VL01 / X3 communication protocol" (4G family), section "Alarm
//!   packet (0x26/0x27)", table "Alarm type".
//! * **Issue 11** — field corpus of GT06-family tags (wearable and asset trackers) in which
//!   `0x0C` and `0x25` are sent when the device is removed / tampered with; public decoders map
//!   the same codes to "tampering".
//! * **JC100** — Concox JC100 dash-cam alarm message `0x95` (only as other public decoders
//!   read it; no vendor sheet at hand, so only SOS and vibration are mapped).

use em_model::DeviceEventKind;

/// What a GT06 alarm code means for electronic monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmMeaning {
    /// The code maps to this EM event.
    Event(DeviceEventKind),
    /// A documented code with no meaning for a tag (vehicle and driving alarms, "normal").
    NoEvent(&'static str),
}

use AlarmMeaning::{Event, NoEvent};
use DeviceEventKind as E;

/// The alarm byte ("former byte" of Alarm/Language) of status-bearing messages
/// (`0x13`, `0x16`, `0x19`, `0x26`, `0x27`, …). Rows: (code, meaning, source).
pub const ALARM_BYTE: &[(u8, AlarmMeaning, &str)] = &[
    (0x00, NoEvent("normal"), "GT06 Alarm/Language"),
    (0x01, Event(E::Sos), "GT06 Alarm/Language"),
    (0x02, Event(E::PowerCut), "GT06 Alarm/Language"),
    (0x03, Event(E::Vibration), "GT06 Alarm/Language (shock)"),
    (
        0x04,
        Event(E::DeviceGeofence),
        "GT06 Alarm/Language (fence in)",
    ),
    (
        0x05,
        Event(E::DeviceGeofence),
        "GT06 Alarm/Language (fence out)",
    ),
    (0x06, NoEvent("over speed"), "VL01 Alarm type"),
    (
        0x09,
        Event(E::Vibration),
        "VL01 Alarm type (displacement / moved)",
    ),
    (0x0C, Event(E::StrapTamper), "Issue 11 (removal / tamper)"),
    (0x0E, Event(E::LowBattery), "VL01 Alarm type (low battery)"),
    (
        0x0F,
        Event(E::LowBattery),
        "VL01 Alarm type (low battery protection)",
    ),
    (
        0x13,
        Event(E::StrapTamper),
        "VL01 Alarm type (tamper / disassembly)",
    ),
    (0x14, NoEvent("door"), "VL01 Alarm type"),
    (
        0x19,
        Event(E::LowBattery),
        "VL01 Alarm type (internal battery low)",
    ),
    (0x25, Event(E::StrapTamper), "Issue 11 (removal / tamper)"),
    (0x29, NoEvent("harsh acceleration"), "VL01 Alarm type"),
    (0x2A, NoEvent("sharp left turn"), "VL01 Alarm type"),
    (0x2B, NoEvent("sharp right turn"), "VL01 Alarm type"),
    (0x2C, NoEvent("collision"), "VL01 Alarm type"),
    (0x30, NoEvent("harsh braking"), "VL01 Alarm type"),
    (0xFE, NoEvent("ACC on"), "VL01 Alarm type"),
    (0xFF, NoEvent("ACC off"), "VL01 Alarm type"),
];

/// Meaning of an alarm-byte code: the table row, or "unknown alarm (code)".
pub fn alarm_byte(code: u8) -> AlarmMeaning {
    ALARM_BYTE
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, m, _)| *m)
        .unwrap_or(Event(E::UnknownAlarm {
            code: u32::from(code),
        }))
}

/// How a device model uses the terminal-information alarm bits `111` (a per-device setting:
/// the documents disagree, so it is never guessed per frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TerminalBits111 {
    /// Device removed / strap opened (wearable and personal trackers). Default.
    #[default]
    Removal,
    /// Over-speed (some vehicle trackers, e.g. VXT01): no EM event.
    OverSpeed,
}

/// Code reported in `UnknownAlarm` for terminal-information alarm bits: `0x100 | bits`, so it
/// cannot be confused with an alarm-byte code.
pub const TERMINAL_BITS_CODE: u32 = 0x100;

/// Bits 3–5 of the terminal-information byte ("GT06 Terminal Information Content": 100 SOS,
/// 011 low battery, 010 power cut, 001 shock, 000 normal; 111 removal per issue 11 /
/// [`TerminalBits111`]). `101` and `110` are undocumented: unknown alarm.
pub fn terminal_bits(bits: u8, bits111: TerminalBits111) -> AlarmMeaning {
    match bits & 0x07 {
        0b000 => NoEvent("normal"),
        0b001 => Event(E::Vibration),
        0b010 => Event(E::PowerCut),
        0b011 => Event(E::LowBattery),
        0b100 => Event(E::Sos),
        0b111 => match bits111 {
            TerminalBits111::Removal => Event(E::StrapTamper),
            TerminalBits111::OverSpeed => NoEvent("over speed"),
        },
        other => Event(E::UnknownAlarm {
            code: TERMINAL_BITS_CODE | u32::from(other),
        }),
    }
}

/// Code prefix of `0x95` alarm types in `UnknownAlarm` (`0x9500 | type`).
pub const MSG_95_CODE: u32 = 0x9500;

/// Alarm type of the `0x95` alarm message. `extended` is true when the message carries a
/// position (the short form's `0x01` is a generic alarm, not an SOS).
pub fn msg95_alarm(code: u8, extended: bool) -> AlarmMeaning {
    match (code, extended) {
        (0x01, true) => Event(E::Sos),                // JC100, extended form
        (0x80, _) => Event(E::Vibration),             // JC100
        (0x87, _) => NoEvent("over speed"),           // JC100
        (0x90..=0x93, _) => NoEvent("driving event"), // JC100 (acceleration, braking, turn, crash)
        _ => Event(E::UnknownAlarm {
            code: MSG_95_CODE | u32::from(code),
        }),
    }
}

/// How a device reports its battery in the "voltage level" byte (a per-device setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatteryScale {
    /// Levels 0–6 as in the GT06 document ("Voltage Level": 0 no power … 6 very high); a
    /// value above 6 cannot be a level and is read as a percentage (0–100, many 4G devices);
    /// above 100 it is unknown. Default.
    #[default]
    Auto,
    /// Only the 0–6 level scale; anything above 6 is unknown.
    Levels,
    /// Percent 0–100 (the device never uses the level scale).
    Percent,
}

/// Battery reading of the voltage byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Battery {
    /// A 0–6 level (GT06 "Voltage Level").
    Level(u8),
    Percent(u8),
    Unknown,
}

impl Battery {
    pub fn read(value: u8, scale: BatteryScale) -> Battery {
        match scale {
            BatteryScale::Levels if value <= 6 => Battery::Level(value),
            BatteryScale::Auto if value <= 6 => Battery::Level(value),
            BatteryScale::Auto | BatteryScale::Percent if value <= 100 => Battery::Percent(value),
            _ => Battery::Unknown,
        }
    }

    pub fn pct(self) -> Option<u8> {
        match self {
            Battery::Level(l) => Some(((u16::from(l) * 100 + 3) / 6) as u8),
            Battery::Percent(p) => Some(p),
            Battery::Unknown => None,
        }
    }

    /// Events the GT06 document attaches to a level: 0 "no power (shut down)" is battery
    /// dead, 1 "extremely low" and 2 "very low (low battery alarm)" are low battery.
    /// Percentages raise nothing here: the health rules apply their thresholds.
    pub fn event(self) -> Option<DeviceEventKind> {
        match self {
            Battery::Level(0) => Some(E::BatteryDead),
            Battery::Level(1 | 2) => Some(E::LowBattery),
            _ => None,
        }
    }
}

/// Per-device GT06 settings (from the device registry; the default fits the GT06 document).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gt06Profile {
    pub battery: BatteryScale,
    pub terminal_bits_111: TerminalBits111,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_no_duplicate_codes_and_unknown_codes_stay_unknown() {
        for (i, (c, _, _)) in ALARM_BYTE.iter().enumerate() {
            assert!(
                ALARM_BYTE[i + 1..].iter().all(|(d, _, _)| d != c),
                "duplicate {c:#04x}"
            );
        }
        for code in 0..=255u8 {
            let m = alarm_byte(code);
            if !ALARM_BYTE.iter().any(|(c, _, _)| *c == code) {
                assert_eq!(
                    m,
                    Event(E::UnknownAlarm {
                        code: u32::from(code)
                    })
                );
            }
        }
    }

    #[test]
    fn battery_scales() {
        assert_eq!(Battery::read(5, BatteryScale::Auto).pct(), Some(83));
        assert_eq!(Battery::read(93, BatteryScale::Auto).pct(), Some(93));
        assert_eq!(Battery::read(93, BatteryScale::Levels).pct(), None);
        assert_eq!(Battery::read(5, BatteryScale::Percent).pct(), Some(5));
        assert_eq!(Battery::read(101, BatteryScale::Auto).pct(), None);
        assert_eq!(
            Battery::read(0, BatteryScale::Auto).event(),
            Some(E::BatteryDead)
        );
        assert_eq!(Battery::read(0, BatteryScale::Percent).event(), None);
    }
}
