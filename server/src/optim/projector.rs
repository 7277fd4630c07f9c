//! Projectors onto a low-dimensional subspace of a matrix gradient, shared by
//! Subspace-Momentum and FRUGAL: whole rows or columns (index), or the top
//! singular vectors of the gradient (svd).

use super::linalg::{self, Dims, Side};
use super::{OptimizerState, StateError, StateReader, invalid};

/// A chosen subspace of an m×n matrix.
#[derive(Clone, Debug)]
pub enum Projector {
    /// Keeps whole rows (`rows = true`, low shape r×n) or whole columns (low shape m×r).
    Index {
        /// Rows or columns.
        rows: bool,
        /// Sorted indices.
        indices: Vec<usize>,
    },
    /// Top-r singular vectors: Left `A` (m×r, low shape r×n) or Right `B` (r×n, low shape m×r).
    Svd {
        /// Which factor.
        side: Side,
        /// The basis, row-major.
        basis: Vec<f32>,
        /// Its rank r.
        rank: usize,
    },
}

impl Projector {
    /// The low-dimensional view `P(g)`.
    pub fn down(&self, g: &[f32], dims: Dims) -> Vec<f32> {
        let Dims { rows: m, cols: n } = dims;
        match self {
            Projector::Index { rows: true, indices } => {
                indices.iter().flat_map(|&i| g[i * n..(i + 1) * n].iter().copied()).collect()
            }
            Projector::Index { rows: false, indices } => {
                (0..m).flat_map(|i| indices.iter().map(move |&j| g[i * n + j])).collect()
            }
            Projector::Svd { side: Side::Left, basis, rank } => {
                linalg::matmul(&linalg::transpose(basis, m, *rank), g, *rank, m, n)
            }
            Projector::Svd { side: Side::Right, basis, rank } => {
                linalg::matmul(g, &linalg::transpose(basis, *rank, n), m, n, *rank)
            }
        }
    }

    /// The share of `g`'s squared norm that `P(g)` keeps, `‖P(g)‖² / ‖g‖²` in f64:
    /// how much of a gradient the subspace captures (for an orthonormal svd
    /// basis, the exact top-r subspace captures the most).
    pub fn captured_energy(&self, g: &[f32], dims: Dims) -> f64 {
        let square_sum = |values: &[f32]| values.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        let total = square_sum(g);
        if total == 0.0 { 1.0 } else { square_sum(&self.down(g, dims)) / total }
    }

    /// Back to full shape, `Pᵀ(low)` (zeros outside the subspace for index projectors).
    pub fn up(&self, low: &[f32], dims: Dims) -> Vec<f32> {
        let Dims { rows: m, cols: n } = dims;
        match self {
            Projector::Index { rows: true, indices } => {
                let mut full = vec![0.0; m * n];
                for (r, &i) in indices.iter().enumerate() {
                    full[i * n..(i + 1) * n].copy_from_slice(&low[r * n..(r + 1) * n]);
                }
                full
            }
            Projector::Index { rows: false, indices } => {
                let mut full = vec![0.0; m * n];
                let r = indices.len();
                for i in 0..m {
                    for (c, &j) in indices.iter().enumerate() {
                        full[i * n + j] = low[i * r + c];
                    }
                }
                full
            }
            Projector::Svd { side: Side::Left, basis, rank } => linalg::matmul(basis, low, m, *rank, n),
            Projector::Svd { side: Side::Right, basis, rank } => linalg::matmul(low, basis, m, *rank, n),
        }
    }

    /// Elements of the low-dimensional view.
    pub fn low_len(&self, dims: Dims) -> usize {
        match self {
            Projector::Index { rows: true, indices } => indices.len() * dims.cols,
            Projector::Index { rows: false, indices } => dims.rows * indices.len(),
            Projector::Svd { side: Side::Left, rank, .. } => rank * dims.cols,
            Projector::Svd { side: Side::Right, rank, .. } => dims.rows * rank,
        }
    }

    /// Floats the projector itself keeps (an index costs about one).
    pub fn state_len(&self) -> usize {
        match self {
            Projector::Index { indices, .. } => indices.len(),
            Projector::Svd { basis, .. } => basis.len(),
        }
    }

    /// The basis-invariant projection matrix `QQᵀ` (m×m for Left, n×n for Right); empty for index projectors.
    pub fn projection_matrix(&self, dims: Dims) -> Vec<f32> {
        match self {
            Projector::Index { .. } => Vec::new(),
            Projector::Svd { side: Side::Left, basis, rank } => {
                linalg::matmul(basis, &linalg::transpose(basis, dims.rows, *rank), dims.rows, *rank, dims.rows)
            }
            Projector::Svd { side: Side::Right, basis, rank } => {
                linalg::matmul(&linalg::transpose(basis, *rank, dims.cols), basis, dims.cols, *rank, dims.cols)
            }
        }
    }

    /// The kept indices, as floats (for state comparison).
    pub fn indices(&self) -> Vec<f32> {
        match self {
            Projector::Index { indices, .. } => indices.iter().map(|&i| i as f32).collect(),
            Projector::Svd { .. } => Vec::new(),
        }
    }
}

/// The projector an optimizer instance would build, against which an imported one is checked.
pub(super) enum ProjectorShape<'a> {
    /// Whole rows or columns.
    Index {
        /// Rows or columns.
        rows: bool,
        /// Number of rows or columns to choose from.
        bound: usize,
        /// Which index lists the instance can hold.
        choice: IndexChoice<'a>,
    },
    /// A singular basis.
    Svd {
        /// Which factor.
        side: Side,
        /// The rank the instance asks for.
        rank: usize,
        /// Floats of the basis the SVD returns (fewer than the rank asks when the matrix is thinner).
        basis_len: usize,
    },
}

/// The index lists an instance can hold.
pub(super) enum IndexChoice<'a> {
    /// This many distinct indices below the bound, ascending (seeded or top-k picks).
    Ascending(usize),
    /// One of these lists, verbatim (an injected schedule).
    OneOf(&'a [Vec<usize>]),
}

const INDEX: u64 = 1;
const SVD: u64 = 2;

fn side_code(side: Side) -> u64 {
    match side {
        Side::Left => 0,
        Side::Right => 1,
    }
}

impl Projector {
    /// Writes `projector_kind` (1 index, 2 svd) and the fields of that kind:
    /// `projector_rows` and `projector_indices`, or `projector_side` (0 left,
    /// 1 right), `projector_rank` and the buffer `projector_basis`.
    pub(super) fn export_into(&self, state: &mut OptimizerState) {
        match self {
            Projector::Index { rows, indices } => {
                state.put_integer("projector_kind", INDEX);
                state.put_integer("projector_rows", u64::from(*rows));
                state.put_integers("projector_indices", indices.iter().map(|&i| i as u64).collect());
            }
            Projector::Svd { side, basis, rank } => {
                state.put_integer("projector_kind", SVD);
                state.put_integer("projector_side", side_code(*side));
                state.put_integer("projector_rank", *rank as u64);
                state.put_buffer("projector_basis", basis);
            }
        }
    }

    /// Reads a projector written by [`Projector::export_into`] that must have `shape`.
    pub(super) fn import_from(reader: &mut StateReader, shape: &ProjectorShape) -> Result<Self, StateError> {
        let kind = reader.integer("projector_kind")?;
        match shape {
            ProjectorShape::Index { rows, bound, choice } => {
                if kind != INDEX {
                    return Err(invalid(
                        "projector_kind",
                        format!("this instance keeps an index projector ({INDEX}), got {kind}"),
                    ));
                }
                if reader.flag("projector_rows")? != *rows {
                    let what = if *rows { "rows" } else { "columns" };
                    return Err(invalid("projector_rows", format!("this instance keeps whole {what}")));
                }
                let field = "projector_indices";
                let raw = match choice {
                    IndexChoice::Ascending(len) => reader.integers(field, *len)?,
                    IndexChoice::OneOf(lists) => {
                        let raw = reader.any_integers(field)?;
                        if let [only] = lists {
                            super::check_len(field, only.len(), raw.len())?;
                        }
                        raw
                    }
                };
                let mut indices = Vec::with_capacity(raw.len());
                for &i in raw {
                    match usize::try_from(i) {
                        Ok(i) if i < *bound => indices.push(i),
                        _ => return Err(invalid(field, format!("index {i} is not below {bound}"))),
                    }
                }
                match choice {
                    IndexChoice::Ascending(_) if !indices.is_sorted_by(|a, b| a < b) => {
                        return Err(invalid(field, "indices must be distinct and ascending"));
                    }
                    IndexChoice::OneOf(lists) if !lists.contains(&indices) => {
                        return Err(invalid(field, "not one of the configured schedule's selections"));
                    }
                    _ => {}
                }
                Ok(Projector::Index { rows: *rows, indices })
            }
            ProjectorShape::Svd { side, rank, basis_len } => {
                if kind != SVD {
                    return Err(invalid(
                        "projector_kind",
                        format!("this instance keeps an SVD projector ({SVD}), got {kind}"),
                    ));
                }
                let code = reader.integer("projector_side")?;
                if code != side_code(*side) {
                    return Err(invalid(
                        "projector_side",
                        format!("this instance's side is {}, got {code}", side_code(*side)),
                    ));
                }
                let got = reader.count("projector_rank")?;
                if got != *rank {
                    return Err(invalid("projector_rank", format!("this instance's rank is {rank}, got {got}")));
                }
                let basis = reader.buffer("projector_basis", *basis_len)?.to_vec();
                Ok(Projector::Svd { side: *side, basis, rank: *rank })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::SvdSolver;
    use crate::random::SplitMix;
    use linalg::{matmul, top_singular_basis, transpose};

    /// `rank` exact singular directions with values `decay^k`, plus uniform noise
    /// of scale `noise`: the shape of a gradient whose spectrum falls off.
    fn spectrum_matrix(dims: Dims, rank: usize, decay: f32, noise: f32, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix::new(seed, 1);
        let mut uniform = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let u: Vec<f32> = (0..dims.rows * rank).map(|_| uniform()).collect();
        let v: Vec<f32> = (0..rank * dims.cols).map(|_| uniform()).collect();
        let mut g = vec![0.0f32; dims.rows * dims.cols];
        for k in 0..rank {
            let scale = decay.powi(k as i32);
            for i in 0..dims.rows {
                for j in 0..dims.cols {
                    g[i * dims.cols + j] += scale * u[i * rank + k] * v[k * dims.cols + j];
                }
            }
        }
        g.iter_mut().for_each(|x| *x += noise * uniform());
        g
    }

    #[test]
    fn randomized_basis_is_orthonormal_seeded_and_near_the_exact_subspace() {
        for dims in [Dims { rows: 96, cols: 40 }, Dims { rows: 40, cols: 96 }] {
            let side = if dims.rows >= dims.cols { Side::Right } else { Side::Left };
            let g = spectrum_matrix(dims, 30, 0.85, 0.01, 7);
            let rank = 8;
            let exact = top_singular_basis(&g, dims, rank, side, SvdSolver::Exact, &mut SplitMix::new(1, 2));
            let randomized = top_singular_basis(&g, dims, rank, side, SvdSolver::Randomized, &mut SplitMix::new(1, 2));
            let again = top_singular_basis(&g, dims, rank, side, SvdSolver::Randomized, &mut SplitMix::new(1, 2));
            assert_eq!(randomized, again, "the same probes give the same basis, bit for bit");
            assert_eq!(randomized.len(), exact.len());
            // Basis vectors are the rows of B (Right) or the columns of A (Left).
            let (vectors, len) = match side {
                Side::Right => (randomized.clone(), dims.cols),
                Side::Left => (transpose(&randomized, dims.rows, rank), dims.rows),
            };
            let gram = matmul(&vectors, &transpose(&vectors, rank, len), rank, len, rank);
            for (k, x) in gram.iter().enumerate() {
                let want = if k / rank == k % rank { 1.0 } else { 0.0 };
                assert!((x - want).abs() < 1e-4, "{dims:?}: gram[{k}] = {x}");
            }
            let best = Projector::Svd { side, basis: exact, rank }.captured_energy(&g, dims);
            let got = Projector::Svd { side, basis: randomized, rank }.captured_energy(&g, dims);
            assert!(got <= best * (1.0 + 1e-5) && got >= 0.99 * best, "{dims:?}: captured {got} against {best}");
        }
    }
}
