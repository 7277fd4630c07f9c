//! How the pushes of several workers become updates (the consistency mode),
//! and who a step waits for (the step contract).

use std::time::Duration;

use super::{SpecError, refuse};
use crate::pb;

/// The largest staleness bound: each step ahead keeps one more pending sum per block.
pub const MAX_STALENESS: u64 = 1000;

/// The shortest step deadline: the deadline is checked every quarter of it,
/// and below this the checks would cost more than the steps.
pub const MIN_STEP_DEADLINE: Duration = Duration::from_millis(20);

/// How the pushes of several workers become updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// One update per step, from the mean gradient of every live worker.
    #[default]
    Sync,
    /// Every push is applied as it arrives.
    Async,
    /// As sync, but a worker may push up to `staleness` steps ahead of the
    /// slowest: it computes step t on version t - staleness or newer.
    BoundedStaleness {
        /// How many steps ahead a worker may run.
        staleness: u64,
    },
    /// Federated rounds: clients push model deltas per round (the spec's round configuration).
    Federated,
}

impl Mode {
    /// Lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::BoundedStaleness { .. } => "bounded_staleness",
            Mode::Federated => "federated",
        }
    }

    /// How many steps ahead of a block's version a push may be, in the modes
    /// with a barrier (sync: 0); `None` in async and federated mode.
    pub fn window(self) -> Option<u64> {
        match self {
            Mode::Sync => Some(0),
            Mode::BoundedStaleness { staleness } => Some(staleness),
            Mode::Async | Mode::Federated => None,
        }
    }

    /// The version to pull before computing `step`: the step itself in sync
    /// mode, up to `staleness` older in bounded-staleness mode (async: any;
    /// federated: round `step + 1` trains version `step`).
    pub fn pull_version(self, step: u64) -> u64 {
        match self {
            Mode::Sync | Mode::Federated => step,
            Mode::Async => 0,
            Mode::BoundedStaleness { staleness } => step.saturating_sub(staleness),
        }
    }

    /// The wire enum and the `staleness` field.
    pub fn to_wire(self) -> (pb::ConsistencyMode, u64) {
        match self {
            Mode::Sync => (pb::ConsistencyMode::Sync, 0),
            Mode::Async => (pb::ConsistencyMode::Async, 0),
            Mode::BoundedStaleness { staleness } => (pb::ConsistencyMode::BoundedStaleness, staleness),
            Mode::Federated => (pb::ConsistencyMode::Federated, 0),
        }
    }

    /// The mode of a wire enum value and `staleness` field: unspecified is
    /// sync, and only bounded staleness takes a staleness (at most [`MAX_STALENESS`]).
    pub fn from_wire(value: i32, staleness: u64) -> Result<Self, SpecError> {
        let mode = match pb::ConsistencyMode::try_from(value) {
            Ok(pb::ConsistencyMode::Unspecified | pb::ConsistencyMode::Sync) => Mode::Sync,
            Ok(pb::ConsistencyMode::Async) => Mode::Async,
            Ok(pb::ConsistencyMode::BoundedStaleness) if staleness > MAX_STALENESS => {
                return refuse(format!("staleness {staleness} exceeds the limit {MAX_STALENESS}"));
            }
            Ok(pb::ConsistencyMode::BoundedStaleness) => return Ok(Mode::BoundedStaleness { staleness }),
            Ok(pb::ConsistencyMode::Federated) => Mode::Federated,
            Err(_) => return refuse(format!("unknown consistency mode {value}")),
        };
        if staleness > 0 {
            return refuse(format!(
                "staleness {staleness} needs CONSISTENCY_MODE_BOUNDED_STALENESS, not {}",
                mode.as_str()
            ));
        }
        Ok(mode)
    }
}

/// Who a step waits for and who may join. The default: no minimum, no
/// deadline, a quorum of one, no cap; every step waits for every live member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepContract {
    /// Sync modes: workers that must push step 0 before it is applied (0 or 1: no minimum).
    pub min_workers: u32,
    /// Sync modes: a step waits this long after its first push for the other
    /// members, then completes without them (they are dropped and must rejoin).
    pub step_deadline: Option<Duration>,
    /// Sync modes: pushes a step needs before its deadline may complete it (at least 1).
    pub quorum: u32,
    /// The most members the model accepts (0: no cap).
    pub max_workers: u32,
}

impl Default for StepContract {
    fn default() -> Self {
        Self { min_workers: 0, step_deadline: None, quorum: 1, max_workers: 0 }
    }
}

impl StepContract {
    /// The contract of a spec's wire fields; a quorum of 0 means 1.
    pub fn from_wire(spec: &pb::ModelSpec) -> Self {
        Self {
            min_workers: spec.min_workers,
            step_deadline: (spec.step_deadline_ms > 0).then(|| Duration::from_millis(spec.step_deadline_ms)),
            quorum: spec.quorum.max(1),
            max_workers: spec.max_workers,
        }
    }

    /// The wire value of the step deadline in milliseconds (0: none); a
    /// deadline under a millisecond is sent as one.
    pub fn step_deadline_ms(&self) -> u64 {
        self.step_deadline.map_or(0, |d| d.as_millis().max(1) as u64)
    }

    /// Checks the contract against the mode it is used with.
    pub fn check(&self, mode: Mode) -> Result<(), SpecError> {
        let Self { min_workers, step_deadline, max_workers, .. } = *self;
        if max_workers > 0 && min_workers > max_workers {
            return refuse(format!("min_workers {min_workers} exceeds max_workers {max_workers}"));
        }
        if mode == Mode::Async && min_workers > 1 {
            return refuse(format!("min_workers {min_workers} needs sync mode (async applies every push on arrival)"));
        }
        if mode == Mode::Federated && (min_workers > 1 || step_deadline.is_some() || max_workers > 0) {
            return refuse(
                "min_workers, step_deadline_ms and max_workers are for the step modes; a federated model sets \
                 its round deadline, quorum and population in `federated`",
            );
        }
        if mode == Mode::Async && step_deadline.is_some() {
            return refuse("step_deadline_ms needs sync mode (async steps do not wait for anyone)");
        }
        if step_deadline.is_some_and(|d| d < MIN_STEP_DEADLINE) {
            return refuse(format!("step_deadline_ms must be at least {} ms", MIN_STEP_DEADLINE.as_millis()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_cross_the_wire_and_only_bounded_staleness_takes_a_staleness() {
        for mode in [Mode::Sync, Mode::Async, Mode::BoundedStaleness { staleness: 3 }, Mode::Federated] {
            let (wire, staleness) = mode.to_wire();
            assert_eq!(Mode::from_wire(wire as i32, staleness), Ok(mode));
        }
        assert_eq!(Mode::from_wire(0, 0), Ok(Mode::Sync), "unspecified is sync");
        assert!(Mode::from_wire(pb::ConsistencyMode::Async as i32, 2).unwrap_err().0.contains("needs CONSISTENCY"));
        assert!(Mode::from_wire(pb::ConsistencyMode::BoundedStaleness as i32, 1001).is_err());
        assert!(Mode::from_wire(17, 0).unwrap_err().0.contains("unknown consistency mode 17"));
        assert_eq!(Mode::BoundedStaleness { staleness: 2 }.pull_version(5), 3);
        assert_eq!(Mode::BoundedStaleness { staleness: 9 }.pull_version(5), 0);
    }

    #[test]
    fn contracts_fit_their_modes() {
        let deadline = StepContract { step_deadline: Some(Duration::from_millis(100)), ..Default::default() };
        assert!(deadline.check(Mode::Sync).is_ok());
        assert!(deadline.check(Mode::Async).is_err());
        assert!(deadline.check(Mode::Federated).is_err());
        let short = StepContract { step_deadline: Some(Duration::from_millis(5)), ..Default::default() };
        assert!(short.check(Mode::Sync).unwrap_err().0.contains("at least 20 ms"));
        let capped = StepContract { min_workers: 3, max_workers: 2, ..Default::default() };
        assert!(capped.check(Mode::Sync).unwrap_err().0.contains("exceeds max_workers"));
        let wire = pb::ModelSpec { quorum: 0, step_deadline_ms: 250, ..Default::default() };
        let contract = StepContract::from_wire(&wire);
        assert_eq!((contract.quorum, contract.step_deadline_ms()), (1, 250));
    }
}
