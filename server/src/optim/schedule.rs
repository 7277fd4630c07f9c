//! Learning-rate schedules: a factor on the configured learning rate per step.

/// A learning-rate schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum LrSchedule {
    /// Factor 1.
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
}
