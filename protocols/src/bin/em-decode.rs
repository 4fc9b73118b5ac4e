//! `em-decode`: decode device frames into the normalised record model, as JSON lines.

use std::io::{BufRead, Read, Write};

use clap::{Parser, ValueEnum};
use em_protocols::cli::Session;
use em_protocols::h02::{H02Profile, SensorUse};
use em_protocols::Protocol;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Gt06,
    Teltonika,
    H02,
    Osmand,
    Em,
    Auto,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum SummaryArg {
    /// A readable summary on standard error.
    Text,
    /// One `{"summary": …}` JSON line after the records, on standard output.
    Json,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SensorArg {
    Unassigned,
    Strap,
    Case,
}

impl From<SensorArg> for SensorUse {
    fn from(s: SensorArg) -> Self {
        match s {
            SensorArg::Unassigned => SensorUse::Unassigned,
            SensorArg::Strap => SensorUse::Strap,
            SensorArg::Case => SensorUse::Case,
        }
    }
}

/// Decode EM device frames and print one JSON object per record (or error).
///
/// Frames are taken from the arguments, from a file (`--file`) or from standard input, one
/// per line: hex for GT06, Teltonika and binary H02 (spaces allowed), raw text for H02 and
/// OsmAnd (query string or JSON body), `topic payload` for the EM protocol. With `--raw`
/// the input is one connection's raw byte stream instead. All frames share one connection
/// state, so a GT06 login line makes the following location lines decodable. At the end a
/// summary counts the decoded frames, the refused ones by reason and the unknown types.
/// Exit status: 0 when nothing was refused, 1 otherwise, 2 on a usage or I/O error.
#[derive(Debug, Parser)]
#[command(name = "em-decode", version)]
struct Args {
    /// Protocol of the frames; `auto` detects it per frame (per stream with `--raw`).
    #[arg(long, short, value_enum, default_value = "auto")]
    protocol: ProtocolArg,
    /// Treat the GT06/Teltonika connection as already logged in with this IMEI.
    #[arg(long)]
    imei: Option<String>,
    /// Read frames from this file (`-` = standard input) instead of the arguments.
    #[arg(long, short)]
    file: Option<std::path::PathBuf>,
    /// The input is raw binary: one connection's byte stream, not lines.
    #[arg(long)]
    raw: bool,
    /// Where the summary goes.
    #[arg(long, value_enum, default_value = "text")]
    summary: SummaryArg,
    /// Print only the summary, not one line per record.
    #[arg(long, short)]
    quiet: bool,
    /// H02 per-device setting: binary report length in bytes (0 = recognise).
    #[arg(long, default_value_t = 0)]
    h02_binary_len: usize,
    /// H02 per-device setting: what low-level sensor 1 (status bit 31) is wired to.
    #[arg(long, value_enum, default_value = "unassigned")]
    h02_sensor1: SensorArg,
    /// H02 per-device setting: what low-level sensor 2 (status bit 23) is wired to.
    #[arg(long, value_enum, default_value = "unassigned")]
    h02_sensor2: SensorArg,
    /// Frames to decode; read from stdin when none are given (and no `--file`).
    frames: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let protocol = match args.protocol {
        ProtocolArg::Gt06 => Some(Protocol::Gt06),
        ProtocolArg::Teltonika => Some(Protocol::Teltonika),
        ProtocolArg::H02 => Some(Protocol::H02),
        ProtocolArg::Osmand => Some(Protocol::Osmand),
        ProtocolArg::Em => Some(Protocol::Em),
        ProtocolArg::Auto => None,
    };
    let session = match &args.imei {
        Some(imei) => match Session::with_imei(imei) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("em-decode: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        None => Session::new(),
    };
    let mut session = session.with_h02(
        args.h02_binary_len,
        H02Profile {
            sensor1: args.h02_sensor1.into(),
            sensor2: args.h02_sensor2.into(),
        },
    );
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let quiet = args.quiet;
    let emit = |values: Vec<serde_json::Value>, out: &mut dyn Write| -> std::io::Result<()> {
        if !quiet {
            for value in values {
                writeln!(out, "{value}")?;
            }
        }
        Ok(())
    };
    let open = |path: &std::path::Path| -> std::io::Result<Box<dyn Read>> {
        if path.as_os_str() == "-" {
            Ok(Box::new(std::io::stdin().lock()))
        } else {
            Ok(Box::new(std::fs::File::open(path)?))
        }
    };
    let input: Option<Box<dyn Read>> = match (&args.file, args.frames.is_empty()) {
        (Some(path), _) => match open(path) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("em-decode: {}: {e}", path.display());
                return std::process::ExitCode::from(2);
            }
        },
        (None, true) => Some(Box::new(std::io::stdin().lock())),
        (None, false) => None,
    };
    let now = chrono::Utc::now;
    let result = match input {
        Some(mut reader) if args.raw => {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).and_then(|_| {
                let values = session.decode_stream(protocol, &bytes, now());
                emit(values, &mut out)
            })
        }
        Some(reader) => std::io::BufReader::new(reader)
            .lines()
            .try_for_each(|line| {
                let values = session.decode_line(protocol, &line?, now());
                emit(values, &mut out)
            }),
        None if args.raw => args.frames.iter().try_for_each(|f| {
            let values = session.decode_stream(protocol, f.as_bytes(), now());
            emit(values, &mut out)
        }),
        None => args.frames.iter().try_for_each(|f| {
            let values = session.decode_line(protocol, f, now());
            emit(values, &mut out)
        }),
    };
    if let Err(e) = result {
        eprintln!("em-decode: {e}");
        return std::process::ExitCode::from(2);
    }
    let summary = session.summary();
    match args.summary {
        SummaryArg::Text => eprint!("{summary}"),
        SummaryArg::Json => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({ "summary": summary.to_json() })
            );
        }
        SummaryArg::None => {}
    }
    if summary.refused_total() > 0 {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
