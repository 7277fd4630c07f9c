//! Seeded weight initialization. Random rules hash (seed, tensor name, element
//! index) instead of drawing from a stream, so every shard computes the same
//! values for its blocks whatever the layout, and a restarted shard too.

use crate::random::{mix64, name_hash};
use ps_proto::api::Init;

/// Fills `out` with the initial values of elements `offset..offset + out.len()`
/// of a tensor. Random rules hash (seed, tensor name, element index), so every
/// shard computes the same values whatever the layout.
pub fn fill_initial(rule: &Init, tensor: &str, offset: u64, out: &mut [f32]) {
    match *rule {
        Init::Zeros | Init::Provided => out.fill(0.0),
        Init::Constant(value) => out.fill(value),
        Init::Normal { mean, std, seed } => {
            let key = stream_key(seed, tensor);
            for (i, value) in out.iter_mut().enumerate() {
                let index = offset + i as u64;
                let u1 = unit_interval(mix64(key ^ index.wrapping_mul(2)));
                let u2 = unit_interval(mix64(key ^ index.wrapping_mul(2).wrapping_add(1)));
                // Box-Muller; u1 is in (0, 1], so the log is finite.
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                *value = mean + std * z as f32;
            }
        }
        Init::Uniform { center, half_width, seed } => {
            let key = stream_key(seed, tensor);
            for (i, value) in out.iter_mut().enumerate() {
                let u = unit_interval(mix64(key ^ (offset + i as u64)));
                *value = center + half_width * (2.0 * u as f32 - 1.0);
            }
        }
    }
}

fn stream_key(seed: u64, tensor: &str) -> u64 {
    mix64(name_hash(tensor) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Maps 64 random bits to (0, 1].
fn unit_interval(bits: u64) -> f64 {
    ((bits >> 11) + 1) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_init_does_not_depend_on_the_split() {
        let rule = Init::Normal { mean: 0.0, std: 1.0, seed: 7 };
        let mut whole = vec![0.0; 1000];
        fill_initial(&rule, "w", 0, &mut whole);
        let mut tail = vec![0.0; 400];
        fill_initial(&rule, "w", 600, &mut tail);
        assert_eq!(&whole[600..], &tail[..]);
        let mean: f32 = whole.iter().sum::<f32>() / 1000.0;
        let var: f32 = whole.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "mean {mean} var {var}");
        let mut other = vec![0.0; 1000];
        fill_initial(&rule, "v", 0, &mut other);
        assert_ne!(whole, other);
        let uniform = Init::Uniform { center: 1.0, half_width: 0.5, seed: 1 };
        fill_initial(&uniform, "u", 0, &mut whole);
        assert!(whole.iter().all(|x| (0.5..1.5).contains(x)));
    }
}
