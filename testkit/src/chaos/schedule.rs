//! Seeded fault schedules: the workload a schedule trains and the faults it
//! injects, drawn from one seed, so any schedule can be replayed exactly, and
//! what the checker may expect of it.

use std::fmt;

use ps_server::random::SplitMix;

/// The schedules' only source of randomness: the project's SplitMix64
/// (`ps_server::random`), so a seed means the same schedule on every machine
/// and in every version of the dependencies.
#[derive(Clone, Debug)]
pub struct Rng(SplitMix);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix::new(seed, 0))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// One of `weights.len()` choices, each with its weight.
    pub fn pick(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut draw = self.next_u64() % total.max(1);
        for (i, &w) in weights.iter().enumerate() {
            if draw < w {
                return i;
            }
            draw -= w;
        }
        weights.len() - 1
    }
}

/// The seed of schedule `index` of a run with seed `seed`: the first is the
/// run's seed itself, so `--seed S --schedules 1` replays a schedule whose
/// seed is S.
pub fn schedule_seed(seed: u64, index: u64) -> u64 {
    if index == 0 {
        return seed;
    }
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
    rng.next_u64()
}

/// How the workers of a schedule train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Bulk-synchronous steps.
    Sync,
    /// Bounded staleness 2: workers may run two steps ahead of the slowest.
    Staleness,
    /// SCAFFOLD rounds with 6 clients in 2 processes.
    Federated,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Staleness => "bounded-staleness",
            Mode::Federated => "federated",
        })
    }
}

/// What a schedule trains: the same for its faulty run and its reference run.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    /// Consistency mode.
    pub mode: Mode,
    /// Shard processes.
    pub shards: usize,
    /// Worker processes (federated: client processes).
    pub workers: usize,
    /// Versions the run trains (federated: rounds).
    pub steps: u64,
    /// Checkpoints every this many versions.
    pub checkpoint_every: u64,
    /// Checkpoints each shard keeps (`--checkpoint-keep`).
    pub checkpoint_keep: u64,
    /// The shards' worker lease.
    pub lease_ms: u64,
    /// Whether workers reach the shards through the local channel (shared memory) or TCP.
    pub local: bool,
}

impl Workload {
    /// The one thing a fault-free run of this workload is used for: its final weights.
    pub fn reference_key(&self) -> (Mode, usize, usize, u64) {
        (self.mode, self.shards, self.workers, self.steps)
    }
}

/// What a fault does to its target.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// SIGKILL, then started again after `down_ms`.
    Kill {
        /// Time between the kill and the restart.
        down_ms: u64,
    },
    /// SIGTERM (a shard writes a last checkpoint), then started again after `down_ms`.
    Term {
        /// Time between the exit and the restart.
        down_ms: u64,
    },
    /// SIGSTOP for `ms`, then SIGCONT: a stalled machine, a VM pause.
    Pause {
        /// How long the process does not run.
        ms: u64,
    },
    /// A shard killed, its checkpoint directory lost, and started again: it
    /// must refuse to fork the run (the schedule ends there).
    LoseCheckpoints,
    /// A shard's checkpoint file system is full for `ms` (needs root: tmpfs).
    DiskFull {
        /// How long.
        ms: u64,
    },
    /// A shard's checkpoint file system is read-only for `ms` (needs root).
    ReadOnly {
        /// How long.
        ms: u64,
    },
    /// The workers' connections to a shard are cut and refused for `ms`.
    LinkCut {
        /// How long.
        ms: u64,
    },
    /// The workers' connections to a shard carry at most `kib_per_s` for `ms`.
    LinkSlow {
        /// How long.
        ms: u64,
        /// The rate, KiB/s each way.
        kib_per_s: u64,
    },
    /// Every shard and every worker SIGKILLed, then started again after
    /// `down_ms` with the same commands (workers as identical replicas:
    /// no rank, new ids), as `docker-compose down` then `up` does.
    RestartAll {
        /// Time between the kill and the restart.
        down_ms: u64,
    },
}

/// What a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Shard `i`.
    Shard(usize),
    /// Worker (or client) process `i`.
    Worker(usize),
    /// Everything.
    All,
}

/// When a fault starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Once shard 0 reports the model at this version (federated: round).
    AtVersion(u64),
    /// This long after the previous fault started (overlapping it).
    AfterPrevious(u64),
}

/// One fault of a schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// When it starts.
    pub trigger: Trigger,
    /// What it hits.
    pub target: Target,
    /// What it does.
    pub kind: FaultKind,
}

impl Fault {
    /// How long the fault holds its target, end to end.
    pub fn duration_ms(&self) -> u64 {
        match self.kind {
            FaultKind::Kill { down_ms } | FaultKind::Term { down_ms } | FaultKind::RestartAll { down_ms } => down_ms,
            FaultKind::Pause { ms }
            | FaultKind::DiskFull { ms }
            | FaultKind::ReadOnly { ms }
            | FaultKind::LinkCut { ms }
            | FaultKind::LinkSlow { ms, .. } => ms,
            FaultKind::LoseCheckpoints => 0,
        }
    }

    /// A short name of the kind, for the soak's counts.
    pub fn class(&self) -> &'static str {
        match (&self.kind, self.target) {
            (FaultKind::Kill { .. }, Target::Worker(_)) => "worker SIGKILL",
            (FaultKind::Kill { .. }, _) => "shard SIGKILL",
            (FaultKind::Term { .. }, _) => "shard SIGTERM",
            (FaultKind::Pause { .. }, Target::Worker(_)) => "worker SIGSTOP",
            (FaultKind::Pause { .. }, _) => "shard SIGSTOP",
            (FaultKind::LoseCheckpoints, _) => "lost checkpoint directory",
            (FaultKind::DiskFull { .. }, _) => "checkpoint disk full",
            (FaultKind::ReadOnly { .. }, _) => "checkpoint disk read-only",
            (FaultKind::LinkCut { .. }, _) => "link cut",
            (FaultKind::LinkSlow { .. }, _) => "link slow",
            (FaultKind::RestartAll { .. }, _) => "whole cluster restarted",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.trigger {
            Trigger::AtVersion(v) => write!(f, "at version {v:>3}: ")?,
            Trigger::AfterPrevious(ms) => write!(f, "{ms:>5} ms later: ")?,
        }
        let target = match self.target {
            Target::Shard(i) => format!("shard {i}"),
            Target::Worker(i) => format!("worker {i}"),
            Target::All => "every process".to_string(),
        };
        match &self.kind {
            FaultKind::Kill { down_ms } => write!(f, "SIGKILL {target}, restart after {down_ms} ms"),
            FaultKind::Term { down_ms } => write!(f, "SIGTERM {target}, restart after {down_ms} ms"),
            FaultKind::Pause { ms } => write!(f, "SIGSTOP {target} for {ms} ms"),
            FaultKind::LoseCheckpoints => write!(f, "SIGKILL {target}, delete its checkpoints, restart"),
            FaultKind::DiskFull { ms } => write!(f, "fill {target}'s checkpoint disk for {ms} ms"),
            FaultKind::ReadOnly { ms } => write!(f, "make {target}'s checkpoint disk read-only for {ms} ms"),
            FaultKind::LinkCut { ms } => write!(f, "cut the workers' links to {target} for {ms} ms"),
            FaultKind::LinkSlow { ms, kib_per_s } => {
                write!(f, "slow the workers' links to {target} to {kib_per_s} KiB/s for {ms} ms")
            }
            FaultKind::RestartAll { down_ms } => write!(f, "SIGKILL {target}, restart all after {down_ms} ms"),
        }
    }
}

/// What this machine lets a schedule do.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capabilities {
    /// Root: tmpfs checkpoint disks that can fill up or turn read-only.
    pub root: bool,
}

/// A workload and its faults.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// The seed it was drawn from.
    pub seed: u64,
    /// What it trains.
    pub workload: Workload,
    /// What it injects, in order.
    pub faults: Vec<Fault>,
}

/// Time a restarted worker process needs before it heart-beats again
/// (start, connect, load its data), with room for a busy machine.
pub const WORKER_START_MS: u64 = 2000;

impl Schedule {
    /// The schedule of `seed`.
    pub fn generate(seed: u64, caps: Capabilities) -> Self {
        let mut rng = Rng::new(seed);
        let mode = [Mode::Sync, Mode::Staleness, Mode::Federated][rng.pick(&[5, 2, 3])];
        let federated = mode == Mode::Federated;
        let workload = Workload {
            mode,
            shards: rng.range(2, 3) as usize,
            workers: if federated { 2 } else { 3 },
            steps: if federated { 200 } else { 600 },
            checkpoint_every: if federated { 2 } else { 5 },
            checkpoint_keep: 2,
            lease_ms: 3000,
            local: rng.chance(0.5),
        };
        let mut faults = Vec::new();
        let count = rng.range(1, 3);
        let mut at = workload.steps * 15 / 100;
        for _ in 0..count {
            let trigger = if faults.is_empty() || rng.chance(0.5) {
                let latest = workload.steps * 70 / 100;
                if at >= latest {
                    Trigger::AfterPrevious(rng.range(200, 3000))
                } else {
                    at = rng.range(at, latest);
                    Trigger::AtVersion(at)
                }
            } else {
                Trigger::AfterPrevious(rng.range(200, 3000))
            };
            let fault = draw_fault(&mut rng, &workload, caps, trigger);
            let terminal = fault.kind == FaultKind::LoseCheckpoints;
            faults.push(fault);
            if terminal {
                break;
            }
        }
        let mut schedule = Schedule { seed, workload, faults };
        if schedule.faults.iter().any(|f| matches!(f.kind, FaultKind::LinkCut { .. } | FaultKind::LinkSlow { .. })) {
            // Link faults act on TCP: the local channel would go around them.
            schedule.workload.local = false;
        }
        schedule
    }

    /// What the checker may hold this schedule to.
    pub fn expectations(&self) -> Expectations {
        let lease = self.workload.lease_ms;
        let refusal = self.faults.iter().any(|f| f.kind == FaultKind::LoseCheckpoints);
        // Drops that let a step go ahead without a live worker (the run then
        // differs), and drops of members a whole-cluster restart left behind
        // (their processes are gone: no step goes ahead without them).
        let mut step_drop = false;
        let mut restart_drop = false;
        let mut must_drop = 0;
        for fault in &self.faults {
            match (&fault.kind, fault.target) {
                (FaultKind::Pause { ms }, Target::Worker(_)) if self.workload.mode != Mode::Federated => {
                    // A margin either side: the reaper judges every quarter lease.
                    if *ms + 1000 >= lease {
                        step_drop = true;
                    }
                    if *ms >= lease + 2000 {
                        must_drop += 1;
                    }
                }
                (FaultKind::Kill { down_ms }, Target::Worker(_))
                    if self.workload.mode != Mode::Federated && down_ms + WORKER_START_MS + 1000 >= lease =>
                {
                    step_drop = true;
                }
                (FaultKind::LinkCut { ms }, _) if self.workload.mode != Mode::Federated && *ms + 2000 >= lease => {
                    step_drop = true;
                }
                (FaultKind::RestartAll { .. }, _) => restart_drop = true,
                _ => {}
            }
        }
        Expectations {
            identical: self.workload.mode != Mode::Staleness && !refusal && !step_drop,
            refusal,
            // A refused run ends its workers, whose leases then lapse on the shards that kept the model.
            may_drop: step_drop || restart_drop || refusal,
            must_drop,
        }
    }

    /// The same schedule with only the faults `indices` (those a run injected).
    pub fn only(&self, indices: &[usize]) -> Self {
        let faults = self.faults.iter().enumerate().filter(|(i, _)| indices.contains(i)).map(|(_, f)| f.clone());
        Schedule { faults: faults.collect(), ..self.clone() }
    }

    /// The same schedule without fault `index` (for shrinking a failure).
    pub fn without(&self, index: usize) -> Self {
        let mut smaller = self.clone();
        smaller.faults.remove(index);
        if let Some(next) = smaller.faults.get_mut(index)
            && let Trigger::AfterPrevious(_) = next.trigger
            && index == 0
        {
            next.trigger = Trigger::AtVersion(self.workload.steps * 15 / 100);
        }
        smaller
    }

    /// The longest a faulty run of this schedule may take, given its fault-free run's time.
    pub fn time_bound_ms(&self, reference_ms: u64) -> u64 {
        let faults: u64 = self.faults.iter().map(Fault::duration_ms).sum();
        // A restart costs a process start, a restore and the recovery's rounds of asking the peers.
        let restarts = self
            .faults
            .iter()
            .filter(|f| {
                matches!(f.kind, FaultKind::Kill { .. } | FaultKind::Term { .. } | FaultKind::RestartAll { .. })
            })
            .count() as u64;
        // Pauses and cuts longer than a lease make workers rejoin, and a lost
        // lease may hold a step until the reaper's next look.
        3 * reference_ms
            + 2 * faults
            + restarts * 20_000
            + self.faults.len() as u64 * 2 * self.workload.lease_ms
            + 30_000
    }
}

/// What the checker holds a schedule's run to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expectations {
    /// The final weights must equal, bit for bit, those of the fault-free run.
    pub identical: bool,
    /// The run must end in the documented refusal (`not-restored`), not finish.
    pub refusal: bool,
    /// Some fault may make a shard drop a worker (a lease or deadline may lapse).
    pub may_drop: bool,
    /// Worker pauses long enough that a drop must be counted.
    pub must_drop: u64,
}

fn draw_fault(rng: &mut Rng, workload: &Workload, caps: Capabilities, trigger: Trigger) -> Fault {
    let shard = Target::Shard(rng.range(0, workload.shards as u64 - 1) as usize);
    let worker = Target::Worker(rng.range(0, workload.workers as u64 - 1) as usize);
    let lease = workload.lease_ms;
    // Weights: shard kill, shard term, shard pause, worker kill, worker pause,
    // link cut, link slow, disk full, read-only, lose checkpoints, restart all.
    let disk = if caps.root { 3 } else { 0 };
    let weights = [6, 3, 5, 3, 4, 3, 2, disk, disk, 1, 2];
    match rng.pick(&weights) {
        0 => Fault { trigger, target: shard, kind: FaultKind::Kill { down_ms: rng.range(100, 3000) } },
        1 => Fault { trigger, target: shard, kind: FaultKind::Term { down_ms: rng.range(100, 2000) } },
        2 => Fault { trigger, target: shard, kind: FaultKind::Pause { ms: rng.range(500, 2 * lease + 1000) } },
        3 => Fault { trigger, target: worker, kind: FaultKind::Kill { down_ms: rng.range(0, 500) } },
        // Mostly under the lease (no drop), sometimes well past it.
        4 => {
            let ms =
                if rng.chance(0.75) { rng.range(200, lease - 1500) } else { rng.range(lease + 2000, lease + 4000) };
            Fault { trigger, target: worker, kind: FaultKind::Pause { ms } }
        }
        5 => Fault { trigger, target: shard, kind: FaultKind::LinkCut { ms: rng.range(200, lease / 2 - 500) } },
        6 => Fault {
            trigger,
            target: shard,
            kind: FaultKind::LinkSlow { ms: rng.range(500, 3000), kib_per_s: rng.range(64, 1024) },
        },
        7 => Fault { trigger, target: shard, kind: FaultKind::DiskFull { ms: rng.range(1000, 6000) } },
        8 => Fault { trigger, target: shard, kind: FaultKind::ReadOnly { ms: rng.range(1000, 6000) } },
        9 => Fault { trigger, target: shard, kind: FaultKind::LoseCheckpoints },
        _ => Fault { trigger, target: Target::All, kind: FaultKind::RestartAll { down_ms: rng.range(100, 1500) } },
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        writeln!(
            f,
            "schedule {}: {} mode, {} shards, {} {}, {} {}, checkpoints every {} (keep {}), lease {} ms, {}",
            self.seed,
            w.mode,
            w.shards,
            w.workers,
            if w.mode == Mode::Federated { "client processes" } else { "workers" },
            w.steps,
            if w.mode == Mode::Federated { "rounds" } else { "steps" },
            w.checkpoint_every,
            w.checkpoint_keep,
            w.lease_ms,
            if w.local { "local channel" } else { "TCP" },
        )?;
        for (i, fault) in self.faults.iter().enumerate() {
            writeln!(f, "  fault {i}: {fault}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_draws_the_same_schedule_and_schedule_zero_is_the_run_seed() {
        let caps = Capabilities { root: true };
        for seed in [1u64, 42, 0xdead_beef] {
            assert_eq!(Schedule::generate(seed, caps), Schedule::generate(seed, caps));
            assert_eq!(schedule_seed(seed, 0), seed);
            assert_ne!(schedule_seed(seed, 1), schedule_seed(seed, 2));
        }
        let kinds: std::collections::BTreeSet<&str> =
            (0..400u64).flat_map(|s| Schedule::generate(schedule_seed(7, s), caps).faults).map(|f| f.class()).collect();
        assert_eq!(kinds.len(), 11, "every class of fault is drawn: {kinds:?}");
    }

    #[test]
    fn without_root_no_disk_fault_is_drawn() {
        let caps = Capabilities { root: false };
        for s in 0..300u64 {
            for fault in Schedule::generate(schedule_seed(3, s), caps).faults {
                assert!(!matches!(fault.kind, FaultKind::DiskFull { .. } | FaultKind::ReadOnly { .. }), "{fault}");
            }
        }
    }

    #[test]
    fn expectations_follow_the_faults() {
        let workload = Workload {
            mode: Mode::Sync,
            shards: 2,
            workers: 3,
            steps: 80,
            checkpoint_every: 5,
            checkpoint_keep: 2,
            lease_ms: 3000,
            local: false,
        };
        let schedule = |kind, target| Schedule {
            seed: 0,
            workload: workload.clone(),
            faults: vec![Fault { trigger: Trigger::AtVersion(10), target, kind }],
        };
        let shard_pause = schedule(FaultKind::Pause { ms: 7000 }, Target::Shard(1)).expectations();
        assert!(shard_pause.identical && !shard_pause.may_drop, "a shard's pause must not drop anyone");
        let short = schedule(FaultKind::Pause { ms: 500 }, Target::Worker(0)).expectations();
        assert!(short.identical && !short.may_drop);
        let long = schedule(FaultKind::Pause { ms: 6000 }, Target::Worker(0)).expectations();
        assert!(!long.identical && long.may_drop && long.must_drop == 1);
        let lost = schedule(FaultKind::LoseCheckpoints, Target::Shard(0)).expectations();
        assert!(lost.refusal && !lost.identical && lost.may_drop);
        let all = schedule(FaultKind::RestartAll { down_ms: 500 }, Target::All).expectations();
        assert!(all.identical && all.may_drop);
    }
}
