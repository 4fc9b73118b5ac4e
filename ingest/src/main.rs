//! `em` — the EM service binary.
//!
//! `em` / `em run [--config FILE]` runs the service (without a file: the embedded default with
//! SQLite, the embedded MQTT endpoint, demo data and the fleet simulator);
//! `em check-config FILE` validates a configuration file and exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use em_ingest::config::{Config, ENV_OVERRIDES};
use em_ingest::service::Service;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "em",
    version,
    about = "Electronic-monitoring service: device ingest, geofences, alerts, dashboard",
    after_help = env_help()
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service (the default). Without --config: the embedded demo setup.
    Run {
        /// TOML configuration file (see config/em.example.toml).
        #[arg(long, short, env = "EM_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (with the environment overrides applied) and exit.
    CheckConfig {
        /// TOML configuration file.
        file: PathBuf,
    },
}

fn env_help() -> String {
    let mut s = String::from("Environment overrides:\n");
    for (k, v) in ENV_OVERRIDES {
        s.push_str(&format!("  {k:<22} {v}\n"));
    }
    s
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match Config::load(Some(&file)) {
            Ok(_) => {
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Run { config }) => run(config),
        None => run(std::env::var_os("EM_CONFIG").map(PathBuf::from)),
    }
}

/// glibc gives threads their own malloc arenas (up to 8 per core). The long-lived
/// allocations of idle device connections then spread over arenas whose free space is not
/// shared, which measured ~25 % more memory per idle connection (README, load figures);
/// with one arena (threads keep glibc's per-thread cache for small blocks) no throughput
/// difference was measurable. An operator's `MALLOC_ARENA_MAX` takes precedence.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists; mallopt only
        // changes an allocator tuning parameter.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn run(config: Option<PathBuf>) -> ExitCode {
    let cfg = match Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mut cfg = cfg;
        if cfg.metrics.enabled {
            let mut bind = cfg.metrics.bind;
            if cfg.listeners.ephemeral_ports {
                bind.set_port(0);
            }
            match em_ingest::metrics::install(bind) {
                // The service reports the address bound (addr_file, logs).
                Ok(bound) => cfg.metrics.bind = bound,
                Err(e) => {
                    tracing::error!(error = %e, "metrics exporter");
                    return ExitCode::FAILURE;
                }
            }
            tracing::info!(bind = %cfg.metrics.bind, "Prometheus metrics on /metrics");
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        let svc = match Service::start(cfg, shutdown).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("start-up failed: {e:#}");
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        svc.wait().await;
        ExitCode::SUCCESS
    })
}

async fn signal_shutdown(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
    token.cancel();
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if cfg.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}
