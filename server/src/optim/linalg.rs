//! Small dense helpers over row-major slices for the projected optimizers:
//! gathering and scattering rows or columns, products with a basis, and the
//! top singular vectors (nalgebra's SVD, in f32 as the reference code does, or
//! a seeded randomized range finder).

use nalgebra::{DMatrix, DMatrixView};
use ps_proto::api::SvdSolver;

use crate::random::SplitMix;

/// A row-major `rows × cols` view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Rows (out_features).
    pub rows: usize,
    /// Columns (in_features).
    pub cols: usize,
}

/// `a (m×k) · b (k×n)`, row-major, through nalgebra's blocked kernel.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    // A row-major m×k slice is the column-major k×m matrix aᵀ, so aᵀ·... is
    // computed as (bᵀ·aᵀ)ᵀ = a·b without copying the inputs.
    let a_t = nalgebra::DMatrixView::from_slice(a, k, m);
    let b_t = nalgebra::DMatrixView::from_slice(b, n, k);
    let product_t = b_t * a_t; // n×m column-major = m×n row-major
    product_t.as_slice().to_vec()
}

/// Transpose of a row-major `m × n` matrix.
pub fn transpose(a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[j * m + i] = a[i * n + j];
        }
    }
    out
}

/// Which factor of the SVD spans the subspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Top-r left singular vectors `A` (m×r): `P(g) = Aᵀ g`.
    Left,
    /// Top-r right singular vectors `B` (r×n): `P(g) = g Bᵀ`.
    Right,
}

/// The basis of the top-`rank` singular subspace of `g` on `side`, row-major:
/// `A` as m×r for Left, `B` as r×n for Right. `Randomized` draws its probes
/// from `rng`, so a seeded caller gets the same basis on every shard and run.
pub fn top_singular_basis(
    g: &[f32],
    dims: Dims,
    rank: usize,
    side: Side,
    solver: SvdSolver,
    rng: &mut SplitMix,
) -> Vec<f32> {
    match solver {
        SvdSolver::Exact => exact_basis(g, dims, rank, side),
        SvdSolver::Randomized => randomized_basis(g, dims, rank, side, rng),
    }
}

fn exact_basis(g: &[f32], dims: Dims, rank: usize, side: Side) -> Vec<f32> {
    let matrix = DMatrix::from_row_slice(dims.rows, dims.cols, g);
    let svd = matrix.svd(side == Side::Left, side == Side::Right);
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
    let rank = rank.min(order.len());
    match side {
        Side::Left => {
            let u = svd.u.expect("left vectors were requested");
            let mut a = vec![0.0f32; dims.rows * rank];
            for (c, &k) in order[..rank].iter().enumerate() {
                for i in 0..dims.rows {
                    a[i * rank + c] = u[(i, k)];
                }
            }
            a
        }
        Side::Right => {
            let v_t = svd.v_t.expect("right vectors were requested");
            let mut b = vec![0.0f32; rank * dims.cols];
            for (r, &k) in order[..rank].iter().enumerate() {
                for j in 0..dims.cols {
                    b[r * dims.cols + j] = v_t[(k, j)];
                }
            }
            b
        }
    }
}

/// Probes beyond the rank (Halko, Martinsson & Tropp 2011, §4.2: 5–10 suffice).
pub const RANDOMIZED_OVERSAMPLING: usize = 10;
/// Power iterations, each re-orthonormalized (their Algorithm 4.4): they
/// sharpen a slowly decaying spectrum, as `torch.svd_lowrank`'s default 2 does.
pub const RANDOMIZED_POWER_ITERATIONS: usize = 2;

/// The randomized range finder: `Q` spans `X Ω` for `rank + p` seeded ±1
/// probes `Ω`, refined by power iterations `Q ← orth(X orth(Xᵀ Q))`; then an
/// exact SVD of the small `Qᵀ X` gives the top vectors as `Q Ũ`. `X` is the
/// operator whose left singular vectors are wanted: `Gᵀ` for the right side of
/// `G`, `G` itself for the left. Costs `2(2q + 2)` products of `G` with a
/// thin `(·)×(rank + p)` matrix, against a full SVD's `O(m n min(m, n))`.
fn randomized_basis(g: &[f32], dims: Dims, rank: usize, side: Side, rng: &mut SplitMix) -> Vec<f32> {
    let Dims { rows: m, cols: n } = dims;
    let rank = rank.min(m.min(n));
    let probes = (rank + RANDOMIZED_OVERSAMPLING).min(m.min(n));
    // The row-major m×n slice is the column-major n×m matrix Gᵀ.
    let g_t = DMatrixView::from_slice(g, n, m);
    // X·v and Xᵀ·v without copying G: X = Gᵀ on the right side, G on the left.
    let (rows_of_x, cols_of_x) = if side == Side::Right { (n, m) } else { (m, n) };
    let apply = |v: &DMatrix<f32>| if side == Side::Right { g_t * v } else { g_t.tr_mul(v) };
    let apply_t = |v: &DMatrix<f32>| if side == Side::Right { g_t.tr_mul(v) } else { g_t * v };
    let omega = DMatrix::from_fn(cols_of_x, probes, |_, _| if rng.next_u64() >> 63 == 0 { 1.0f32 } else { -1.0f32 });
    let mut q = apply(&omega).qr().q();
    for _ in 0..RANDOMIZED_POWER_ITERATIONS {
        let z = apply_t(&q).qr().q();
        q = apply(&z).qr().q();
    }
    // Qᵀ X is probes × cols_of_x; its left vectors Ũ rotate Q onto X's top ones.
    let small = apply_t(&q).transpose();
    let svd = small.svd(true, false);
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
    let u_small = svd.u.expect("left vectors were requested");
    let rotation = DMatrix::from_fn(u_small.nrows(), rank, |i, c| u_small[(i, order[c])]);
    let top = q * rotation; // rows_of_x × rank, column-major
    debug_assert_eq!(top.nrows(), rows_of_x);
    match side {
        // Column c of `top` is basis row c of B (r×n, row-major).
        Side::Right => top.as_slice().to_vec(),
        // A is m×r row-major: the transpose of the column-major m×r `top`.
        Side::Left => top.transpose().as_slice().to_vec(),
    }
}

/// Python's `round` (half to even) of a non-negative value.
pub fn round_half_even(x: f64) -> usize {
    let floor = x.floor();
    let diff = x - floor;
    let rounded = if diff > 0.5 || (diff == 0.5 && floor % 2.0 != 0.0) { floor + 1.0 } else { floor };
    rounded.max(0.0) as usize
}

/// `sign0`: −1, 0 or +1.
pub fn sign0(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_python() {
        assert_eq!([0.5, 1.5, 2.5, 2.4, 2.6, 3.0].map(round_half_even), [0, 2, 2, 2, 3, 3]);
    }

    #[test]
    fn svd_basis_spans_the_top_direction() {
        // Rank-one matrix u vᵀ: the top left vector is ±u/|u|, the top right ±v/|v|.
        let (u, v) = ([1.0f32, 2.0, 2.0], [3.0f32, 4.0]);
        let g: Vec<f32> = u.iter().flat_map(|a| v.iter().map(move |b| a * b)).collect();
        let dims = Dims { rows: 3, cols: 2 };
        let mut rng = SplitMix::new(0, 0);
        for solver in [SvdSolver::Exact, SvdSolver::Randomized] {
            let a = top_singular_basis(&g, dims, 1, Side::Left, solver, &mut rng);
            assert!((a[0].abs() - 1.0 / 3.0).abs() < 1e-5 && (a[1].abs() - 2.0 / 3.0).abs() < 1e-5, "{solver:?}");
            let b = top_singular_basis(&g, dims, 1, Side::Right, solver, &mut rng);
            assert!((b[0].abs() - 0.6).abs() < 1e-5 && (b[1].abs() - 0.8).abs() < 1e-5, "{solver:?}");
        }
        assert_eq!(matmul(&[1.0, 2.0], &[3.0, 4.0], 1, 2, 1), vec![11.0]);
        assert_eq!(transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
