//! How a tensor's first values are made.

use super::{SpecError, refuse};
use crate::pb;

/// How a tensor's first values are made. Random rules are deterministic in
/// (seed, tensor name, element index), so they do not depend on the layout.
/// Values are f32, as the weights are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// Every element equals the value.
    Constant(f32),
    /// Normal with this mean and standard deviation.
    Normal {
        /// Mean.
        mean: f32,
        /// Standard deviation.
        std: f32,
        /// Seed.
        seed: u64,
    },
    /// Uniform on [center - half_width, center + half_width).
    Uniform {
        /// Center.
        center: f32,
        /// Half of the width.
        half_width: f32,
        /// Seed.
        seed: u64,
    },
    /// The client sends the values with the registration.
    Provided,
}

impl Init {
    /// The rule of a wire `InitRule` (absent: zeros), with its value and
    /// scale finite and the scale not negative.
    pub fn from_wire(tensor: &str, rule: Option<pb::InitRule>) -> Result<Self, SpecError> {
        let rule = rule.unwrap_or_default();
        let (value, scale) = (rule.value as f32, rule.scale as f32);
        let kind = pb::InitKind::try_from(rule.kind)
            .map_err(|_| SpecError(format!("tensor '{tensor}': unknown init kind {}", rule.kind)))?;
        let init = match kind {
            pb::InitKind::Zeros => Init::Zeros,
            pb::InitKind::Constant => Init::Constant(value),
            pb::InitKind::Normal => Init::Normal { mean: value, std: scale, seed: rule.seed },
            pb::InitKind::Uniform => Init::Uniform { center: value, half_width: scale, seed: rule.seed },
            pb::InitKind::Provided => Init::Provided,
        };
        init.check(tensor)?;
        Ok(init)
    }

    /// Rejects a value or scale that is not finite, and a negative scale.
    pub fn check(&self, tensor: &str) -> Result<(), SpecError> {
        let (value, scale) = match *self {
            Init::Constant(value) => (value, 0.0),
            Init::Normal { mean, std, .. } => (mean, std),
            Init::Uniform { center, half_width, .. } => (center, half_width),
            Init::Zeros | Init::Provided => (0.0, 0.0),
        };
        if !value.is_finite() || !scale.is_finite() || scale < 0.0 {
            return refuse(format!("tensor '{tensor}': init value and scale must be finite, scale >= 0"));
        }
        Ok(())
    }
}

impl From<&Init> for pb::InitRule {
    fn from(init: &Init) -> Self {
        let rule = |kind: pb::InitKind, value: f32, scale: f32, seed| pb::InitRule {
            kind: kind as i32,
            value: f64::from(value),
            scale: f64::from(scale),
            seed,
        };
        match *init {
            Init::Zeros => rule(pb::InitKind::Zeros, 0.0, 0.0, 0),
            Init::Constant(value) => rule(pb::InitKind::Constant, value, 0.0, 0),
            Init::Normal { mean, std, seed } => rule(pb::InitKind::Normal, mean, std, seed),
            Init::Uniform { center, half_width, seed } => rule(pb::InitKind::Uniform, center, half_width, seed),
            Init::Provided => rule(pb::InitKind::Provided, 0.0, 0.0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cross_the_wire_and_bad_numbers_are_refused() {
        let rules = [
            Init::Zeros,
            Init::Constant(0.5),
            Init::Normal { mean: 0.0, std: 0.02, seed: 7 },
            Init::Uniform { center: 1.0, half_width: 0.1, seed: 3 },
            Init::Provided,
        ];
        for rule in rules {
            assert_eq!(Init::from_wire("t", Some((&rule).into())), Ok(rule));
        }
        assert_eq!(Init::from_wire("t", None), Ok(Init::Zeros));
        let huge = pb::InitRule { kind: pb::InitKind::Constant as i32, value: 1e300, ..Default::default() };
        assert!(Init::from_wire("t", Some(huge)).unwrap_err().0.contains("must be finite"), "1e300 is inf in f32");
        let negative = pb::InitRule { kind: pb::InitKind::Normal as i32, scale: -1.0, ..Default::default() };
        assert!(Init::from_wire("t", Some(negative)).is_err());
        let unknown = pb::InitRule { kind: 9, ..Default::default() };
        assert!(Init::from_wire("w", Some(unknown)).unwrap_err().0.contains("tensor 'w': unknown init kind 9"));
    }
}
