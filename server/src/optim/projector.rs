//! Projectors onto a low-dimensional subspace of a matrix gradient, shared by
//! Subspace-Momentum and FRUGAL: whole rows or columns (index), or the top
//! singular vectors of the gradient (svd).

use super::linalg::{self, Dims, Side};

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
