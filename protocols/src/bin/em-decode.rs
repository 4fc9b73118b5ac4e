//! `em-decode`: decode device frames into the normalised record model, as JSON lines.

use std::io::{BufRead, Write};

use clap::{Parser, ValueEnum};
use em_protocols::cli::Session;
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

/// Decode EM device frames and print one JSON object per record (or error).
///
/// Frames are taken from the arguments, or from standard input one per line: hex for
/// GT06 and Teltonika (spaces allowed), raw text for H02 and OsmAnd, `topic payload`
/// for the EM protocol. Lines share one connection state, so a GT06 login line makes
/// the following location lines decodable.
#[derive(Debug, Parser)]
#[command(name = "em-decode", version)]
struct Args {
    /// Protocol of the frames; `auto` detects it per frame.
    #[arg(long, short, value_enum, default_value = "auto")]
    protocol: ProtocolArg,
    /// Treat the GT06/Teltonika connection as already logged in with this IMEI.
    #[arg(long)]
    imei: Option<String>,
    /// Frames to decode; read from stdin when none are given.
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
    let mut session = match &args.imei {
        Some(imei) => match Session::with_imei(imei) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("em-decode: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        None => Session::new(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut errors = false;
    let mut handle = |line: &str, out: &mut dyn Write| -> std::io::Result<()> {
        for value in session.decode_line(protocol, line, chrono::Utc::now()) {
            errors |= value.get("error").is_some();
            writeln!(out, "{value}")?;
        }
        Ok(())
    };
    let result = if args.frames.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .try_for_each(|line| handle(&line?, &mut out))
    } else {
        args.frames.iter().try_for_each(|f| handle(f, &mut out))
    };
    if let Err(e) = result {
        eprintln!("em-decode: {e}");
        return std::process::ExitCode::from(2);
    }
    if errors {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
