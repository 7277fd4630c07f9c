//! The chaos harness: many seeded, randomly drawn fault schedules against the
//! real `server` and `worker` processes, each checked by what must hold
//! whatever happened (`check`). Every schedule's seed derives from the run's,
//! a failure prints its seed and schedule, `--seed` replays it exactly, and a
//! failing schedule is shrunk by dropping its faults one at a time.
//!
//! `testkit/src/bin/chaos.rs` is its command line (a soak runs there);
//! `worker/tests/chaos.rs` runs a handful of fresh-seeded schedules in the
//! test command.

pub mod check;
pub mod cluster;
pub mod faults;
pub mod observe;
pub mod proxy;
pub mod run;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use check::{Reference, check};
pub use cluster::Binaries;
pub use run::Outcome;
pub use schedule::{Capabilities, Fault, FaultKind, Mode, Schedule, Target, Trigger, Workload, schedule_seed};

/// What a harness run does.
#[derive(Clone, Debug)]
pub struct Config {
    /// The run's seed; schedule `i` has seed [`schedule_seed`]`(seed, i)`.
    pub seed: u64,
    /// Stop after this many schedules.
    pub schedules: Option<u64>,
    /// Stop starting schedules after this long.
    pub minutes: Option<f64>,
    /// Faults of the schedule to leave out (by index), for replaying a shrunk failure.
    pub drop_faults: Vec<usize>,
    /// The binaries under test.
    pub binaries: Binaries,
    /// Where runs keep their logs.
    pub dir: PathBuf,
    /// What the machine allows.
    pub caps: Capabilities,
    /// Shrink a failing schedule toward the fewest faults that still fail.
    pub shrink: bool,
    /// Keep the logs of runs that held (those of failures are always kept).
    pub keep_logs: bool,
}

/// A schedule that broke an invariant.
#[derive(Debug)]
pub struct Failure {
    /// The schedule, as drawn.
    pub schedule: Schedule,
    /// What did not hold.
    pub violations: Vec<String>,
    /// The smallest schedule found that still fails, and the faults dropped to get it.
    pub shrunk: Option<(Schedule, Vec<usize>)>,
    /// The failing run's logs.
    pub dir: PathBuf,
}

/// What a harness run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Schedules run.
    pub schedules: u64,
    /// Faults injected, by class.
    pub faults: BTreeMap<&'static str, u64>,
    /// Schedules that broke an invariant.
    pub failures: Vec<Failure>,
    /// The longest time from a shard restart to every shard serving again.
    pub slowest_recovery: Option<Duration>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    /// Faults injected in all.
    pub fn fault_count(&self) -> u64 {
        self.faults.values().sum()
    }

    /// Invariant violations in all.
    pub fn violation_count(&self) -> usize {
        self.failures.iter().map(|f| f.violations.len()).sum()
    }

    /// The last line every run prints.
    pub fn summary_line(&self) -> String {
        format!(
            "chaos: {} schedules, {} faults, {} violations",
            self.schedules,
            self.fault_count(),
            self.violation_count()
        )
    }

    /// The whole summary: counts by class, the slowest recovery, every failure with its replay command.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("schedules run      {}\n", self.schedules));
        out.push_str(&format!("faults injected    {}\n", self.fault_count()));
        for (class, count) in &self.faults {
            out.push_str(&format!("  {class:<28} {count}\n"));
        }
        out.push_str(&format!("violations         {}\n", self.violation_count()));
        if let Some(slowest) = self.slowest_recovery {
            out.push_str(&format!(
                "slowest recovery   {:.1} s (a shard restart until every shard served)\n",
                slowest.as_secs_f64()
            ));
        }
        out.push_str(&format!("wall time          {:.0} s\n", self.elapsed.as_secs_f64()));
        for failure in &self.failures {
            out.push_str(&format!("\nFAILED {}", failure.schedule));
            for violation in &failure.violations {
                out.push_str(&format!("  violation: {violation}\n"));
            }
            out.push_str(&format!("  logs: {}\n", failure.dir.display()));
            out.push_str(&format!("  replay: chaos --seed {} --schedules 1\n", failure.schedule.seed));
            if let Some((shrunk, dropped)) = &failure.shrunk {
                let flags: String = dropped.iter().map(|i| format!(" --drop-fault {i}")).collect();
                out.push_str(&format!(
                    "  smallest failing schedule (chaos --seed {} --schedules 1{flags}):\n{shrunk}",
                    shrunk.seed
                ));
            }
        }
        out
    }
}

/// Whether this process may mount file systems (a tmpfs in `dir`): what the disk faults need.
pub fn probe_capabilities(dir: &Path) -> Capabilities {
    let probe = dir.join("mount-probe");
    if std::fs::create_dir_all(&probe).is_err() {
        return Capabilities::default();
    }
    let path = probe.to_string_lossy().to_string();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", &path])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        let _ = std::process::Command::new("umount").arg(&path).status();
    }
    std::fs::remove_dir(&probe).ok();
    Capabilities { root: mounted }
}

/// Runs schedules as `config` says, telling `log` what happens.
pub fn run(config: &Config, mut log: impl FnMut(&str)) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    let mut references: HashMap<(Mode, usize, usize, u64), Reference> = HashMap::new();
    std::fs::create_dir_all(&config.dir).ok();
    for index in 0.. {
        if config.schedules.is_some_and(|n| index >= n)
            || config.minutes.is_some_and(|m| started.elapsed() >= Duration::from_secs_f64(m * 60.0))
        {
            break;
        }
        let seed = schedule_seed(config.seed, index);
        let mut schedule = Schedule::generate(seed, config.caps);
        let mut dropped = config.drop_faults.clone();
        dropped.sort_unstable();
        for &i in dropped.iter().rev() {
            if i < schedule.faults.len() {
                schedule = schedule.without(i);
            }
        }
        log(format!("{schedule}").trim_end());
        let key = schedule.workload.reference_key();
        if let std::collections::hash_map::Entry::Vacant(slot) = references.entry(key) {
            log(&format!(
                "  fault-free reference run of {} mode, {} shards",
                schedule.workload.mode, schedule.workload.shards
            ));
            let outcome = run::run(&schedule, false, &config.binaries, &config.dir, Duration::from_secs(600));
            match Reference::from_outcome(&outcome, schedule.workload.mode) {
                Ok(reference) => {
                    if !config.keep_logs {
                        std::fs::remove_dir_all(&outcome.dir).ok();
                    }
                    slot.insert(reference);
                }
                Err(problem) => {
                    report.schedules += 1;
                    report.failures.push(Failure {
                        schedule,
                        violations: vec![problem],
                        shrunk: None,
                        dir: outcome.dir,
                    });
                    continue;
                }
            }
        }
        let reference = references[&key].clone();
        let (outcome, violations) = attempt(&schedule, &reference, config);
        report.schedules += 1;
        for &index in &outcome.injected {
            *report.faults.entry(schedule.faults[index].class()).or_default() += 1;
        }
        if let Some(slowest) = outcome.recoveries.iter().max() {
            report.slowest_recovery = Some(report.slowest_recovery.map_or(*slowest, |s| s.max(*slowest)));
        }
        if violations.is_empty() {
            log(&format!(
                "  held ({:.1} s, {} faults injected)",
                outcome.elapsed.as_secs_f64(),
                outcome.injected.len()
            ));
            if !config.keep_logs {
                std::fs::remove_dir_all(&outcome.dir).ok();
            }
            continue;
        }
        for violation in &violations {
            log(&format!("  VIOLATION: {violation}"));
        }
        for event in &outcome.events {
            log(&format!("    {event}"));
        }
        // Moved aside: the shrinking runs the same seed in the run's own directory.
        let kept = outcome.dir.with_file_name(format!("{}-failed", schedule.seed));
        std::fs::remove_dir_all(&kept).ok();
        let dir = if std::fs::rename(&outcome.dir, &kept).is_ok() { kept } else { outcome.dir };
        log(&format!("  logs in {}", dir.display()));
        let shrunk = if config.shrink { shrink(&schedule, &reference, config, &mut log) } else { None };
        report.failures.push(Failure { schedule, violations, shrunk, dir });
    }
    report.elapsed = started.elapsed();
    report
}

/// One faulty run of `schedule` and what it broke.
fn attempt(schedule: &Schedule, reference: &Reference, config: &Config) -> (Outcome, Vec<String>) {
    let bound = Duration::from_millis(schedule.time_bound_ms(reference.elapsed.as_millis() as u64));
    let outcome = run::run(schedule, true, &config.binaries, &config.dir, bound);
    let violations = check(schedule, &outcome, reference, bound);
    (outcome, violations)
}

/// Drops faults one at a time while the schedule still fails; the smallest
/// failing schedule found and the original indices of the faults dropped.
fn shrink(
    schedule: &Schedule,
    reference: &Reference,
    config: &Config,
    log: &mut impl FnMut(&str),
) -> Option<(Schedule, Vec<usize>)> {
    let mut current = schedule.clone();
    let mut kept: Vec<usize> = (0..schedule.faults.len()).collect();
    let mut shrank = false;
    'smaller: while current.faults.len() > 1 {
        for i in 0..current.faults.len() {
            let candidate = current.without(i);
            log(&format!("  shrinking: without fault {} ({} left)", kept[i], candidate.faults.len()));
            let (outcome, violations) = attempt(&candidate, reference, config);
            let still_fails = !violations.is_empty();
            log(if still_fails { "    still fails" } else { "    held" });
            if !config.keep_logs {
                std::fs::remove_dir_all(&outcome.dir).ok();
            }
            if still_fails {
                current = candidate;
                kept.remove(i);
                shrank = true;
                continue 'smaller;
            }
        }
        break;
    }
    let dropped: Vec<usize> = (0..schedule.faults.len()).filter(|i| !kept.contains(i)).collect();
    shrank.then_some((current, dropped))
}
