//! Splitting one tensor's update across threads. Work is cut into tasks of
//! whole runs (rows, chunks or single coordinates) of about [`GRAIN`]
//! elements; every coordinate's arithmetic is the same in any task, so a
//! result does not depend on the number of threads. A tensor of one task runs
//! inline, without touching the pool.

use rayon::prelude::*;

/// Elements per task: 256 KiB of each array, enough that a task's work
/// (tens of microseconds) dwarfs the cost of handing it to a thread.
pub(crate) const GRAIN: usize = 1 << 16;

/// Runs of `run` elements that make one task (at least one).
pub(crate) fn runs_per_task(run: usize) -> usize {
    (GRAIN / run.max(1)).max(1)
}

/// One task's slices: weights, gradient, the momentum if one is kept, and
/// the task's share of a per-run statistic (empty when none is split).
pub(crate) type Task<'a> = (((&'a mut [f32], &'a [f32]), Option<&'a mut [f32]>), &'a mut [f32]);

/// How many elements of each array one task takes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shares {
    /// Of the weights and the gradient.
    pub(crate) w: usize,
    /// Of the momentum (when one is given).
    pub(crate) m: usize,
    /// Of the per-run statistic (0: every task gets an empty share).
    pub(crate) v: usize,
}

impl Shares {
    /// Every array cut like the weights.
    pub(crate) fn even(len: usize) -> Self {
        Self { w: len, m: len, v: len }
    }

    /// These shares with `v` elements of the statistic per task.
    pub(crate) fn with_v(self, v: usize) -> Self {
        Self { v, ..self }
    }

    /// Weights and momentum cut alike, no statistic.
    pub(crate) fn weights(len: usize) -> Self {
        Self { w: len, m: len, v: 0 }
    }
}

/// Cuts `w` and `g`, `m` (when not empty) and `v` (when not empty) into one
/// share per task as `shares` says, and runs `task` on each with its index,
/// in parallel when there are several.
pub(crate) fn zip_tasks<F>(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], shares: Shares, task: F)
where
    F: Fn(usize, Task<'_>) + Sync + Send,
{
    let len = shares.w.max(1);
    let tasks = w.len().div_ceil(len);
    let m_shares: Vec<Option<&mut [f32]>> = if m.is_empty() {
        (0..tasks).map(|_| None).collect()
    } else {
        let mut cut: Vec<_> = m.chunks_mut(shares.m.max(1)).map(Some).collect();
        cut.resize_with(tasks, || Some(<&mut [f32]>::default()));
        cut
    };
    let v_shares: Vec<&mut [f32]> = if shares.v == 0 || v.is_empty() {
        (0..tasks).map(|_| <&mut [f32]>::default()).collect()
    } else {
        let mut cut: Vec<_> = v.chunks_mut(shares.v).collect();
        cut.resize_with(tasks, <&mut [f32]>::default);
        cut
    };
    if tasks <= 1 {
        w.chunks_mut(len).zip(g.chunks(len)).zip(m_shares).zip(v_shares).enumerate().for_each(|(i, t)| task(i, t));
    } else {
        w.par_chunks_mut(len)
            .zip(g.par_chunks(len))
            .zip(m_shares.into_par_iter())
            .zip(v_shares.into_par_iter())
            .enumerate()
            .for_each(|(i, t)| task(i, t));
    }
}

/// Per-column sums of squares (in f64) of a row-major matrix with `cols`
/// columns. Threads take column ranges and walk every row, so each column is
/// summed in row order, exactly as one thread would.
pub(crate) fn column_sums_of_squares(g: &[f32], cols: usize) -> Vec<f64> {
    let cols = cols.max(1);
    let mut sums = vec![0.0f64; cols];
    // Ranges of at least 256 columns (1 KiB of each row), two per thread.
    let width = cols.div_ceil(2 * rayon::current_num_threads()).max(256);
    let add = |start: usize, sums: &mut [f64]| {
        let end = start + sums.len();
        for row in g.chunks_exact(cols) {
            for (s, x) in sums.iter_mut().zip(&row[start..end]) {
                *s += f64::from(*x) * f64::from(*x);
            }
        }
    };
    if g.len() <= GRAIN || width >= cols {
        add(0, &mut sums);
    } else {
        sums.par_chunks_mut(width).enumerate().for_each(|(i, sums)| add(i * width, sums));
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_sums_match_one_thread_in_every_bit() {
        let (rows, cols) = (300, 1000);
        let g: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect();
        let mut expected = vec![0.0f64; cols];
        for row in g.chunks(cols) {
            for (s, x) in expected.iter_mut().zip(row) {
                *s += f64::from(*x) * f64::from(*x);
            }
        }
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            assert_eq!(pool.install(|| column_sums_of_squares(&g, cols)), expected, "{threads} threads");
        }
    }

    #[test]
    fn tasks_cover_every_element_once_with_their_shares() {
        let n = 3 * GRAIN + 17;
        let mut w = vec![0.0f32; n];
        let g = vec![1.0f32; n];
        let mut m = vec![0.0f32; n];
        let runs = n.div_ceil(64);
        let mut v = vec![0.0f32; runs];
        let per_task = runs_per_task(64);
        zip_tasks(&mut w, &g, &mut m, &mut v, Shares::even(per_task * 64).with_v(per_task), |_, (((w, g), m), v)| {
            let m = m.expect("a momentum was given");
            assert_eq!(v.len(), w.len().div_ceil(64));
            for ((w, g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
                *w += g;
                *m += 2.0 * g;
            }
            v.iter_mut().for_each(|v| *v += 1.0);
        });
        assert!(w.iter().all(|&x| x == 1.0) && m.iter().all(|&x| x == 2.0) && v.iter().all(|&x| x == 1.0));
        let mut none: [f32; 0] = [];
        zip_tasks(&mut w, &g, &mut [], &mut none, Shares::weights(GRAIN), |_, (((_, _), m), v)| {
            assert!(m.is_none() && v.is_empty());
        });
    }
}
