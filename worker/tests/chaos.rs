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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ps_testkit::chaos::{
    self, Binaries, Config, Fault, FaultKind, Mode, Reference, Schedule, Target, Trigger, Workload, check, run,
    schedule::Rng,
};

fn binaries() -> Binaries {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_worker"));
    let bin_dir = worker.parent().expect("the binaries' directory").to_path_buf();
    Binaries::in_dir(&bin_dir).expect("server and worker built next to each other (cargo test --workspace)")
}

#[test]
fn fresh_seeded_fault_schedules_keep_every_invariant() {
    let binaries = binaries();
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

/// CI's seed 1801412886678708609 (federated, local channel): shard 0 was
/// killed, the whole cluster restarted while it was down, and then the first
/// fault's own restart started a second shard 0 beside the running one, which
/// the harness then killed by replacing it in its slot; the second had found
/// the first's sockets served and exited, so shard 0 was gone for good. A
/// supervisor that finds its process running leaves it: each shard here is
/// started twice (at the start and by the whole restart), never three times,
/// and the run keeps every invariant.
#[test]
fn a_shard_restarted_by_an_overlapping_whole_restart_is_not_started_twice() {
    let binaries = binaries();
    let dir = std::env::temp_dir().join(format!("ps-chaos-overlap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a run directory");
    let schedule = Schedule {
        seed: 1_801_412_886,
        workload: Workload {
            mode: Mode::Sync,
            shards: 2,
            workers: 3,
            steps: 600,
            checkpoint_every: 5,
            checkpoint_keep: 2,
            lease_ms: 3000,
            local: true,
        },
        faults: vec![
            Fault {
                trigger: Trigger::AtVersion(150),
                target: Target::Shard(0),
                kind: FaultKind::Kill { down_ms: 2500 },
            },
            Fault {
                trigger: Trigger::AfterPrevious(500),
                target: Target::All,
                kind: FaultKind::RestartAll { down_ms: 300 },
            },
        ],
    };
    let reference = run::run(&schedule, false, &binaries, &dir, Duration::from_secs(600));
    let reference = Reference::from_outcome(&reference, schedule.workload.mode).expect("a fault-free run");
    let bound = Duration::from_millis(schedule.time_bound_ms(reference.elapsed.as_millis() as u64));
    let outcome = run::run(&schedule, true, &binaries, &dir, bound);
    let violations = check(&schedule, &outcome, &reference, bound);
    assert_eq!(outcome.injected, vec![0, 1], "both faults ran: {:?}", outcome.events);
    assert!(violations.is_empty(), "{violations:?}; events {:?}; logs in {}", outcome.events, outcome.dir.display());
    assert_eq!(outcome.shard_starts, vec![2, 2], "events {:?}", outcome.events);
    std::fs::remove_dir_all(&dir).ok();
}
