//! A handful of fresh-seeded chaos schedules against the real `server` and
//! `worker` binaries (`ps_testkit::chaos`): random faults (kills, stops,
//! cut links, full disks, whole-cluster restarts, a lost checkpoint
//! directory) and the checker's invariants. The seed is drawn fresh each run
//! and printed; `PS_CHAOS_SEED` replays one, `PS_CHAOS_SCHEDULES` sets how
//! many (default 8). A soak runs through `target/release/chaos`. The seed and
//! the last line are written past the test harness's capture, so every run's
//! log shows them.

use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use ps_testkit::chaos::{self, Binaries, Config, schedule::Rng};

#[test]
fn fresh_seeded_fault_schedules_keep_every_invariant() {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_worker"));
    let bin_dir = worker.parent().expect("the binaries' directory").to_path_buf();
    let binaries =
        Binaries::in_dir(&bin_dir).expect("server and worker built next to each other (cargo test --workspace)");
    let seed = match std::env::var("PS_CHAOS_SEED") {
        Ok(seed) => seed.parse().expect("PS_CHAOS_SEED is a number"),
        Err(_) => {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
            Rng::new(nanos ^ u64::from(std::process::id())).next_u64() % 1_000_000_000
        }
    };
    let schedules = std::env::var("PS_CHAOS_SCHEDULES").ok().and_then(|n| n.parse().ok()).unwrap_or(8);
    let dir = std::env::temp_dir().join(format!("ps-chaos-test-{seed}"));
    std::fs::create_dir_all(&dir).expect("a run directory");
    let caps = chaos::probe_capabilities(&dir);
    // Straight to the process's stderr: `eprintln!` would be captured, and shown only on failure.
    let _ = writeln!(
        std::io::stderr(),
        "chaos seed {seed} ({schedules} schedules; replay with PS_CHAOS_SEED={seed}, or one schedule with \
         `chaos --seed <schedule seed> --schedules 1`); disk faults {}",
        if caps.root { "on" } else { "off (mounting needs root)" }
    );
    let config = Config {
        seed,
        schedules: Some(schedules),
        minutes: None,
        drop_faults: Vec::new(),
        binaries,
        dir,
        caps,
        shrink: false,
        keep_logs: false,
    };
    let report = chaos::run(&config, |line| eprintln!("{line}"));
    eprintln!("\n{}", report.summary());
    let _ = writeln!(std::io::stderr(), "{}", report.summary_line());
    assert!(report.failures.is_empty(), "{}", report.summary());
    assert!(report.fault_count() > 0, "no fault was injected: the schedules' moments never came");
}
