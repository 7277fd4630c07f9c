//! Module buffers (BatchNorm's running statistics, counters): tensors the
//! shards keep but do not train. The "gradient" of a step is the value the
//! workers agreed on (rank 0's, or their mean), and the update assigns it.

use super::{Optimizer, OptimizerState, StateError, StateReader, StepContext};

/// The update rule of a buffer group: no state, the new value replaces the old.
pub struct Assign;

impl Optimizer for Assign {
    fn step(&mut self, param: &mut [f32], value: &[f32], _: &StepContext) {
        param.copy_from_slice(value);
    }

    fn state_bytes(&self) -> usize {
        0
    }

    fn state(&self) -> Vec<(&'static str, Vec<f32>)> {
        Vec::new()
    }

    fn export_state(&self) -> OptimizerState {
        OptimizerState::default()
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), StateError> {
        StateReader::new(state).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_assigns_the_value_whatever_the_lr_scale() {
        let mut buffer = Assign;
        let mut running_mean = [0.5f32, -1.0, 3.0];
        buffer.step(&mut running_mean, &[0.25, 2.0, -0.0], &StepContext { t: 7, lr_scale: 0.0 });
        assert_eq!(running_mean, [0.25, 2.0, -0.0]);
        let foreign =
            OptimizerState { buffers: [("momentum".to_string(), Default::default())].into(), ..Default::default() };
        assert!(buffer.import_state(&foreign).is_err(), "another optimizer's state does not fit a buffer");
    }
}
