//! The `em` command line: help, check-config on good and bad files.

use std::process::Command;

fn em() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_em"));
    for (k, _) in em_ingest::config::ENV_OVERRIDES {
        c.env_remove(k);
    }
    c.env_remove("EM_CONFIG");
    c
}

#[test]
fn help_lists_subcommands_and_environment() {
    let out = em().arg("--help").output().expect("run em --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "run",
        "check-config",
        "EM_DATABASE_URL",
        "DATABASE_URL",
        "EM_MQTT_URL",
    ] {
        assert!(text.contains(word), "--help mentions {word}:\n{text}");
    }
}

#[test]
fn check_config_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/em.example.toml");
    let out = em()
        .args(["check-config", example])
        .output()
        .expect("run em");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_rejects_bad_files_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[listeners]\ngt06_prot = 5023\n", "gt06_prot"),
        (
            "[listeners]\ngt06_port = 5000\nh02_port = 5000\n",
            "h02_port",
        ),
        ("[database]\nurl = \"mysql://x\"\n", "database.url"),
        (
            "[health]\nlow_battery_pct = 3\nbattery_dead_pct = 5\n",
            "battery_dead_pct",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let out = em().arg("check-config").arg(&p).output().expect("run em");
        assert_eq!(out.status.code(), Some(2), "case {i} fails");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "case {i}: error names {key}: {err}");
    }
    let out = em()
        .args(["check-config", "/nonexistent/em.toml"])
        .output()
        .expect("run em");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn environment_overrides_are_validated() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/em.example.toml");
    let out = em()
        .env("EM_GT06_PORT", "not-a-port")
        .args(["check-config", example])
        .output()
        .expect("run em");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EM_GT06_PORT"));
}
