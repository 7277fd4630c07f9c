//! Worker-side state of the compressed optimizers (algorithms.md §5, §6): the
//! momentum of Signum with majority vote, and the residual of error feedback.
//! Both are per worker, never on the server, and can be saved to a state
//! directory so that a restarted worker continues where it stopped.

use std::fs;
use std::io::Write;
use std::path::Path;

use ps_proto::codec;
use ps_proto::pb::Encoding;

use crate::Tensors;

/// Signum with majority vote, worker side: `m ← β m + (1−β) g`; the worker
/// pushes sign1(m) and the server votes. With β = 0 this is signSGD.
#[derive(Clone, Debug)]
pub struct SignMomentum {
    beta: f32,
    momentum: Tensors,
}

impl SignMomentum {
    /// Zero momentum with decay `beta`.
    pub fn new(beta: f32) -> Self {
        Self { beta, momentum: Tensors::new() }
    }

    /// Folds `grads` into the momentum and returns it: what to push as signs.
    pub fn update(&mut self, grads: &Tensors) -> &Tensors {
        for (name, g) in grads {
            let m = self.momentum.entry(name.clone()).or_insert_with(|| vec![0.0; g.len()]);
            m.resize(g.len(), 0.0);
            let (beta, keep) = (self.beta, 1.0 - self.beta);
            for (m, g) in m.iter_mut().zip(g) {
                *m = beta * *m + keep * g;
            }
        }
        &self.momentum
    }

    /// The momentum buffers.
    pub fn state(&self) -> &Tensors {
        &self.momentum
    }

    /// Writes the momentum to `dir/<name>.state` atomically.
    pub fn save(&self, dir: &Path, name: &str) -> std::io::Result<()> {
        save_tensors(&dir.join(format!("{name}.state")), &self.momentum)
    }

    /// Restores the momentum saved under `name`, if there is one.
    pub fn load(&mut self, dir: &Path, name: &str) -> std::io::Result<bool> {
        load_into(&dir.join(format!("{name}.state")), &mut self.momentum)
    }
}

/// Error feedback with the scaled sign compressor, per tensor:
/// `q = η g + e;  Δ = (‖q‖₁/d)·sign(q);  e ← q − Δ`. The worker pushes q as
/// sign1 (the client sends its signs and ‖q‖₁/d as the scale, which is Δ
/// exactly) and the server applies `w ← w − mean Δ` (SGD with lr 1).
#[derive(Clone, Debug)]
pub struct ErrorFeedback {
    lr: f32,
    residual: Tensors,
}

impl ErrorFeedback {
    /// Zero residual with learning rate `lr` folded in before compression.
    pub fn new(lr: f32) -> Self {
        Self { lr, residual: Tensors::new() }
    }

    /// Returns q = η g + e for every tensor and keeps the new residual q − Δ,
    /// with Δ decoded exactly as the server will decode it.
    pub fn compress(&mut self, grads: &Tensors) -> Tensors {
        let mut pushed = Tensors::new();
        for (name, g) in grads {
            let e = self.residual.entry(name.clone()).or_insert_with(|| vec![0.0; g.len()]);
            e.resize(g.len(), 0.0);
            let q: Vec<f32> = g.iter().zip(e.iter()).map(|(g, e)| self.lr * g + e).collect();
            let mut delta = vec![0.0; q.len()];
            let sent = codec::decode_into(
                Encoding::Sign1,
                &codec::encode(Encoding::Sign1, &q),
                codec::mean_abs(&q),
                &mut delta,
            );
            debug_assert!(sent.is_ok());
            for ((e, q), d) in e.iter_mut().zip(&q).zip(&delta) {
                *e = q - d;
            }
            pushed.insert(name.clone(), q);
        }
        pushed
    }

    /// The residual buffers.
    pub fn state(&self) -> &Tensors {
        &self.residual
    }

    /// Writes the residual to `dir/<name>.state` atomically.
    pub fn save(&self, dir: &Path, name: &str) -> std::io::Result<()> {
        save_tensors(&dir.join(format!("{name}.state")), &self.residual)
    }

    /// Restores the residual saved under `name`, if there is one.
    pub fn load(&mut self, dir: &Path, name: &str) -> std::io::Result<bool> {
        load_into(&dir.join(format!("{name}.state")), &mut self.residual)
    }
}

const MAGIC: &[u8] = b"PSSTATE1\n";

/// Saves tensors as a magic line, a JSON line of (name, length) and the f32
/// values little-endian; written to a temporary file, synced, then renamed.
pub fn save_tensors(path: &Path, tensors: &Tensors) -> std::io::Result<()> {
    let header: Vec<(&str, usize)> = tensors.iter().map(|(n, v)| (n.as_str(), v.len())).collect();
    let temporary = path.with_extension("tmp");
    {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(MAGIC)?;
        file.write_all(serde_json::to_string(&header).map_err(std::io::Error::other)?.as_bytes())?;
        file.write_all(b"\n")?;
        for values in tensors.values() {
            file.write_all(&codec::encode_f32(values))?;
        }
        file.sync_all()?;
    }
    fs::rename(&temporary, path)
}

/// Reads a file written by [`save_tensors`] into `tensors`; false if there is no file.
pub fn load_into(path: &Path, tensors: &mut Tensors) -> std::io::Result<bool> {
    let data = match fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    let body = data.strip_prefix(MAGIC).ok_or_else(|| bad("not a state file"))?;
    let newline = body.iter().position(|b| *b == b'\n').ok_or_else(|| bad("no header"))?;
    let header: Vec<(String, usize)> = serde_json::from_slice(&body[..newline]).map_err(|_| bad("bad header"))?;
    let mut values = &body[newline + 1..];
    let mut loaded = Tensors::new();
    for (name, len) in header {
        if values.len() < len * 4 {
            return Err(bad("truncated"));
        }
        let mut out = vec![0.0; len];
        codec::decode_into(Encoding::F32, &values[..len * 4], 0.0, &mut out).map_err(|_| bad("bad values"))?;
        values = &values[len * 4..];
        loaded.insert(name, out);
    }
    *tensors = loaded;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(values: &[(&str, Vec<f32>)]) -> Tensors {
        values.iter().map(|(n, v)| (n.to_string(), v.clone())).collect()
    }

    #[test]
    fn error_feedback_keeps_the_sum_identity() {
        // Σ Δ_t + e_T = η Σ g_t (algorithms.md §6).
        let mut ef = ErrorFeedback::new(0.1);
        let grads = [tensors(&[("w", vec![1.0, -2.0, 0.5])]), tensors(&[("w", vec![-0.3, 0.7, 2.5])])];
        let mut applied = [0.0f32; 3];
        for g in &grads {
            let q = ef.compress(g);
            let scale = codec::mean_abs(&q["w"]);
            for (a, q) in applied.iter_mut().zip(&q["w"]) {
                *a += if *q < 0.0 { -scale } else { scale };
            }
        }
        for i in 0..3 {
            let want = 0.1 * (grads[0]["w"][i] + grads[1]["w"][i]);
            assert!((applied[i] + ef.state()["w"][i] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("ps-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut ef = ErrorFeedback::new(0.5);
        ef.compress(&tensors(&[("a", vec![1.0, -3.0]), ("b", vec![0.25])]));
        ef.save(&dir, "worker-0.ef").unwrap();
        let mut restarted = ErrorFeedback::new(0.5);
        assert!(restarted.load(&dir, "worker-0.ef").unwrap());
        assert_eq!(restarted.state(), ef.state());
        assert!(!restarted.load(&dir, "nobody").unwrap());
        let mut momentum = SignMomentum::new(0.9);
        momentum.update(&tensors(&[("a", vec![1.0])]));
        assert!((momentum.state()["a"][0] - 0.1).abs() < 1e-6);
        fs::remove_dir_all(&dir).unwrap();
    }
}
