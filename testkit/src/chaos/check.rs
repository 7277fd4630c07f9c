//! What must hold after a schedule, whatever its faults did: the run
//! finished in time (or ended in the documented refusal), every shard ends on
//! one version and epoch, no version was served with two contents, the final
//! weights equal the fault-free run's where the faults leave nothing to
//! chance, no worker was dropped that the faults did not drop, memory stayed
//! under the limit, and nothing was left behind.

use std::collections::BTreeMap;
use std::time::Duration;

use super::cluster::MEMORY_LIMIT;
use super::observe::contents_by_version;
use super::run::Outcome;
use super::schedule::{Mode, Schedule};

/// The fault-free run of a workload, for comparison.
#[derive(Clone, Debug)]
pub struct Reference {
    /// Its final weights.
    pub bits: Vec<(String, Vec<u32>)>,
    /// How long it took.
    pub elapsed: Duration,
    /// The content each version was served with (sync runs trace their pulls).
    pub contents: BTreeMap<u64, u64>,
}

impl Reference {
    /// The reference a fault-free outcome of a `mode` run gives, or why it gives none.
    pub fn from_outcome(outcome: &Outcome, mode: Mode) -> Result<Self, String> {
        let bits = outcome.final_bits.clone().ok_or_else(|| {
            format!("the fault-free run did not reach its last version; logs in {}", outcome.dir.display())
        })?;
        if outcome.worker_exits.iter().any(|e| !e.is_some_and(|s| s.success())) {
            return Err(format!("a worker of the fault-free run failed; logs in {}", outcome.dir.display()));
        }
        // Only a sync pull reads every block at its version: in bounded
        // staleness the version a pull reports is its oldest block's.
        let pulls = if mode == Mode::Sync { outcome.pulls.as_slice() } else { &[] };
        let contents = contents_by_version(pulls).into_iter().map(|((_, v), h)| (v, h)).collect::<Vec<_>>();
        let mut by_version = BTreeMap::new();
        for (version, hashes) in contents {
            if hashes.len() != 1 {
                return Err(format!("the fault-free run served version {version} with {} contents", hashes.len()));
            }
            by_version.insert(version, *hashes.iter().next().expect("one hash"));
        }
        Ok(Self { bits, elapsed: outcome.elapsed, contents: by_version })
    }
}

/// The violations of `schedule`'s invariants in `outcome` (none: it held).
pub fn check(schedule: &Schedule, outcome: &Outcome, reference: &Reference, bound: Duration) -> Vec<String> {
    // A fault whose moment did not come before the run ended did nothing.
    let schedule = &schedule.only(&outcome.injected);
    let expect = schedule.expectations();
    let w = &schedule.workload;
    let mut violations = Vec::new();
    let mut fail = |what: String| violations.push(what);
    // 3. Progress, or the refusal a lost checkpoint directory must end in.
    if outcome.timed_out {
        fail(format!("the run did not end within {:.0} s (the bound for this schedule)", bound.as_secs_f64()));
    }
    if expect.refusal {
        // 5. A shard that lost its checkpoints refuses to fork the run.
        if !outcome.refusal_seen {
            fail("after a shard lost its checkpoints, a fresh registration was not refused with not-restored".into());
        }
        let emptied_holds_model = outcome.shards.iter().any(|s| s.answered && !s.has_model);
        let forked =
            outcome.shards.iter().filter(|s| s.has_model).any(|s| {
                outcome.version_at_loss.is_some_and(|at| s.versions.1 < at.saturating_sub(w.checkpoint_every))
            });
        if !emptied_holds_model {
            fail("no shard is empty after one lost its checkpoints: the model was registered there afresh".into());
        }
        if forked {
            fail("a shard went back before the version the run had reached when a shard lost its checkpoints".into());
        }
    } else {
        for (slot, exit) in outcome.worker_exits.iter().enumerate() {
            if !exit.is_some_and(|s| s.success()) {
                let how = exit.map_or("did not end".to_string(), |s| s.to_string());
                fail(format!("worker {slot} did not finish: {how}"));
            }
        }
        // 2. Every shard on the last version, one epoch, nothing recovering.
        for (index, shard) in outcome.shards.iter().enumerate() {
            if !shard.answered {
                fail(format!("shard {index} did not answer at the end"));
            } else if !shard.has_model {
                fail(format!("shard {index} does not hold the model at the end"));
            } else {
                if shard.recovering {
                    fail(format!("shard {index} is still recovering at the end"));
                }
                if shard.versions != (w.steps, w.steps) {
                    fail(format!(
                        "shard {index} ends at versions {}..={}, not {}",
                        shard.versions.0, shard.versions.1, w.steps
                    ));
                }
            }
        }
        let epochs: std::collections::BTreeSet<u64> =
            outcome.shards.iter().filter(|s| s.has_model).map(|s| s.epoch).collect();
        if epochs.len() > 1 {
            fail(format!("the shards end on different epochs: {epochs:?}"));
        }
        // 1. The same weights as the fault-free run, bit for bit (unless a
        // worker said it could not redo a step exactly: a documented limit).
        if expect.identical && !outcome.inexact {
            match &outcome.final_bits {
                None => fail("the final weights could not be read".into()),
                Some(bits) => {
                    for ((name, got), (_, want)) in bits.iter().zip(&reference.bits) {
                        let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
                        if differing > 0 {
                            fail(format!(
                                "{differing} of {} weights of '{name}' differ from the fault-free run",
                                got.len()
                            ));
                        }
                    }
                }
            }
        }
    }
    // 2. No version was served with two contents: within an epoch ever, and
    // across epochs where the run must equal the fault-free one (where it
    // must also equal what the fault-free run served).
    if w.mode == Mode::Sync {
        let contents = contents_by_version(&outcome.pulls);
        for ((epoch, version), hashes) in &contents {
            if hashes.len() > 1 {
                fail(format!("version {version} was served with {} different contents in epoch {epoch}", hashes.len()));
            }
        }
        if expect.identical && !outcome.inexact {
            for ((_, version), hashes) in &contents {
                if let Some(want) = reference.contents.get(version)
                    && hashes.iter().any(|h| h != want)
                {
                    fail(format!("version {version} was served with other contents than in the fault-free run"));
                }
            }
        }
    }
    // 3. Drops only where the faults allow them, and those they force.
    let drops: u64 = outcome.shards.iter().map(|s| s.drops).max().unwrap_or(0);
    if !expect.may_drop && drops > 0 {
        fail(format!("a shard dropped {drops} worker(s) though no fault could have made a lease or deadline lapse"));
    }
    let restarted_shard = schedule.faults.iter().any(|f| {
        matches!(
            f.kind,
            super::schedule::FaultKind::Kill { .. }
                | super::schedule::FaultKind::Term { .. }
                | super::schedule::FaultKind::RestartAll { .. }
                | super::schedule::FaultKind::LoseCheckpoints
        ) && !matches!(f.target, super::schedule::Target::Worker(_))
    });
    if expect.must_drop > 0 && drops == 0 && !restarted_shard && !expect.refusal {
        fail(format!("{} worker pause(s) well past the lease, but no shard counted a drop", expect.must_drop));
    }
    // 4. Memory under the limit, nothing left behind.
    for (index, rss) in outcome.max_rss.iter().enumerate() {
        if *rss > MEMORY_LIMIT {
            fail(format!("shard {index} reached {} MiB resident, over its --memory-limit", rss >> 20));
        }
    }
    for stray in &outcome.strays {
        fail(stray.clone());
    }
    violations
}
