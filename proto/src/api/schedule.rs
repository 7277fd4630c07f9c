//! Learning-rate schedules: a factor on the configured learning rate per step.

use super::{SpecError, refuse};
use crate::pb;

/// A learning-rate schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum LrSchedule {
    /// Factor 1.
    #[default]
    Constant,
    /// Linear warm-up from 0, then cosine decay to `min_factor` at `total` steps.
    WarmupCosine {
        /// Warm-up steps.
        warmup: u64,
        /// Steps until the end of the decay.
        total: u64,
        /// Factor at the end.
        min_factor: f32,
    },
    /// Linear warm-up, constant, then linear decay to `min_factor` over the last `decay` of `total` steps.
    WarmupStableDecay {
        /// Warm-up steps.
        warmup: u64,
        /// Steps until the end of the decay.
        total: u64,
        /// Length of the final decay.
        decay: u64,
        /// Factor at the end.
        min_factor: f32,
    },
}

impl LrSchedule {
    /// The factor for step `t` (1-based).
    pub fn factor(&self, t: u64) -> f32 {
        let warm = |warmup: u64| if warmup > 0 && t <= warmup { Some(t as f64 / warmup as f64) } else { None };
        let factor = match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::WarmupCosine { warmup, total, min_factor } => warm(warmup).unwrap_or_else(|| {
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((t.saturating_sub(warmup)) as f64 / span).min(1.0);
                let min = f64::from(min_factor);
                min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }),
            LrSchedule::WarmupStableDecay { warmup, total, decay, min_factor } => warm(warmup).unwrap_or_else(|| {
                let start = total.saturating_sub(decay);
                if t <= start || decay == 0 {
                    1.0
                } else {
                    let progress = ((t - start) as f64 / decay as f64).min(1.0);
                    1.0 - (1.0 - f64::from(min_factor)) * progress
                }
            }),
        };
        factor as f32
    }

    /// The schedule of a wire `LrSchedule` (absent: constant), checked.
    pub fn from_wire(schedule: Option<pb::LrSchedule>) -> Result<Self, SpecError> {
        let Some(s) = schedule else { return Ok(LrSchedule::Constant) };
        let min_factor = s.min_factor as f32;
        let schedule = match pb::ScheduleKind::try_from(s.kind) {
            Ok(pb::ScheduleKind::Constant) => LrSchedule::Constant,
            Ok(pb::ScheduleKind::WarmupCosine) => {
                LrSchedule::WarmupCosine { warmup: s.warmup_steps, total: s.total_steps, min_factor }
            }
            Ok(pb::ScheduleKind::WarmupStableDecay) => LrSchedule::WarmupStableDecay {
                warmup: s.warmup_steps,
                total: s.total_steps,
                decay: s.decay_steps,
                min_factor,
            },
            Err(_) => return refuse(format!("unknown schedule kind {}", s.kind)),
        };
        schedule.check()?;
        Ok(schedule)
    }

    /// Rejects a final factor outside [0, 1] and a decay longer than the run.
    pub fn check(&self) -> Result<(), SpecError> {
        match *self {
            LrSchedule::WarmupCosine { min_factor, .. } | LrSchedule::WarmupStableDecay { min_factor, .. }
                if !(0.0..=1.0).contains(&min_factor) =>
            {
                refuse(format!("schedule min_factor must be in [0, 1], got {min_factor}"))
            }
            LrSchedule::WarmupStableDecay { total, decay, .. } if decay > total => {
                refuse("decay_steps exceed total_steps")
            }
            _ => Ok(()),
        }
    }
}

impl From<&LrSchedule> for Option<pb::LrSchedule> {
    fn from(schedule: &LrSchedule) -> Self {
        match *schedule {
            LrSchedule::Constant => None,
            LrSchedule::WarmupCosine { warmup, total, min_factor } => Some(pb::LrSchedule {
                kind: pb::ScheduleKind::WarmupCosine as i32,
                warmup_steps: warmup,
                total_steps: total,
                decay_steps: 0,
                min_factor: f64::from(min_factor),
            }),
            LrSchedule::WarmupStableDecay { warmup, total, decay, min_factor } => Some(pb::LrSchedule {
                kind: pb::ScheduleKind::WarmupStableDecay as i32,
                warmup_steps: warmup,
                total_steps: total,
                decay_steps: decay,
                min_factor: f64::from(min_factor),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_have_their_shapes() {
        let cosine = LrSchedule::WarmupCosine { warmup: 10, total: 110, min_factor: 0.1 };
        assert_eq!(cosine.factor(5), 0.5);
        assert_eq!(cosine.factor(10), 1.0);
        assert!((cosine.factor(60) - 0.55).abs() < 1e-6, "half way: the mean of 1 and 0.1");
        assert!((cosine.factor(110) - 0.1).abs() < 1e-6);
        assert!((cosine.factor(500) - 0.1).abs() < 1e-6);
        let wsd = LrSchedule::WarmupStableDecay { warmup: 10, total: 100, decay: 20, min_factor: 0.0 };
        assert_eq!(wsd.factor(50), 1.0);
        assert!((wsd.factor(90) - 0.5).abs() < 1e-6);
        assert_eq!(wsd.factor(100), 0.0);
        assert_eq!(LrSchedule::Constant.factor(7), 1.0);
    }

    #[test]
    fn schedules_cross_the_wire_and_bad_ones_are_refused() {
        for schedule in [
            LrSchedule::Constant,
            LrSchedule::WarmupCosine { warmup: 10, total: 110, min_factor: 0.1 },
            LrSchedule::WarmupStableDecay { warmup: 10, total: 100, decay: 20, min_factor: 0.0 },
        ] {
            assert_eq!(LrSchedule::from_wire((&schedule).into()), Ok(schedule));
        }
        let long_decay = LrSchedule::WarmupStableDecay { warmup: 0, total: 10, decay: 20, min_factor: 0.0 };
        assert!(LrSchedule::from_wire((&long_decay).into()).is_err());
        let above_one = LrSchedule::WarmupCosine { warmup: 0, total: 10, min_factor: 1.5 };
        assert!(LrSchedule::from_wire((&above_one).into()).unwrap_err().0.contains("[0, 1]"));
    }
}
