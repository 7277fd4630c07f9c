//! Block placement: how tensors are split into row-aligned blocks and which
//! shard owns each block, given each tensor's largest block. Every shard
//! computes the same [`plan`] from a spec, so no coordinator is needed; the
//! largest block of each tensor is the server's decision (its optimizer may
//! need whole tensors), and clients learn the result from PlanLayout or GetLayout.

use crate::pb;

/// One block of a tensor and the shard that owns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    /// Index of the tensor in the model spec.
    pub tensor: usize,
    /// Index of the block within its tensor.
    pub block: u32,
    /// Shard that stores and updates this block.
    pub shard: u32,
    /// First row of the tensor in this block.
    pub row_start: u64,
    /// Rows in this block.
    pub rows: u64,
    /// First flat (row-major) element of the block.
    pub offset: u64,
    /// Elements in the block.
    pub length: u64,
}

impl BlockPlan {
    /// The wire form, naming the tensor by `tensor`.
    pub fn to_wire(&self, tensor: &str) -> pb::BlockPlacement {
        let &BlockPlan { block, shard, row_start, rows, offset, length, .. } = self;
        pb::BlockPlacement { tensor: tensor.to_string(), block, shard, row_start, rows, offset, length }
    }

    /// From the wire, given the index of the tensor the placement names.
    pub fn from_wire(wire: &pb::BlockPlacement, tensor: usize) -> Self {
        let &pb::BlockPlacement { block, shard, row_start, rows, offset, length, .. } = wire;
        BlockPlan { tensor, block, shard, row_start, rows, offset, length }
    }
}

/// Number of elements of a tensor with this shape (1 for a scalar).
pub fn num_elements(shape: &[u64]) -> u64 {
    shape.iter().product()
}

/// Elements in one row: everything but the first dimension.
pub fn row_length(shape: &[u64]) -> u64 {
    shape.iter().skip(1).product()
}

/// Splits one tensor into row-aligned blocks of at most `max_block_elements`
/// elements (a single row larger than that becomes one block of its own).
/// Returns `(row_start, rows)` for each block.
pub fn split_rows(shape: &[u64], max_block_elements: u64) -> Vec<(u64, u64)> {
    let total_rows = shape.first().copied().unwrap_or(1);
    let rows_per_block = (max_block_elements / row_length(shape).max(1)).max(1);
    (0..total_rows.div_ceil(rows_per_block))
        .map(|i| {
            let start = i * rows_per_block;
            (start, rows_per_block.min(total_rows - start))
        })
        .collect()
}

/// Number of blocks [`split_rows`] makes of a tensor, without making them.
pub fn block_count(shape: &[u64], max_block_elements: u64) -> u64 {
    let total_rows = shape.first().copied().unwrap_or(1);
    let rows_per_block = (max_block_elements / row_length(shape).max(1)).max(1);
    total_rows.div_ceil(rows_per_block)
}

/// Splits every tensor (given by shape, in spec order, with its largest block
/// in elements) into blocks and places them on `num_shards` shards.
/// Placement is greedy largest-first onto the least-loaded shard (ties go to
/// the lower index), which keeps the element count per shard within one block
/// of balanced and is fully deterministic. The result is ordered by tensor,
/// then block.
pub fn plan(shapes: &[&[u64]], limits: &[u64], num_shards: u32) -> Vec<BlockPlan> {
    assert!(num_shards > 0, "a layout needs at least one shard");
    assert_eq!(shapes.len(), limits.len(), "one block limit per tensor");
    let mut blocks = Vec::new();
    for (tensor, (shape, &limit)) in shapes.iter().zip(limits).enumerate() {
        let row_len = row_length(shape);
        for (block, (row_start, rows)) in split_rows(shape, limit).into_iter().enumerate() {
            blocks.push(BlockPlan {
                tensor,
                block: block as u32,
                shard: 0,
                row_start,
                rows,
                offset: row_start * row_len,
                length: rows * row_len,
            });
        }
    }
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by(|&a, &b| blocks[b].length.cmp(&blocks[a].length).then(a.cmp(&b)));
    let mut load = vec![0u64; num_shards as usize];
    for index in order {
        let shard = (0..load.len()).min_by_key(|&s| (load[s], s)).unwrap_or(0);
        load[shard] += blocks[index].length;
        blocks[index].shard = shard as u32;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_row_aligned_and_cover_the_tensor() {
        let shape = [10u64, 7];
        let rows = split_rows(&shape, 20);
        assert_eq!(rows, vec![(0, 2), (2, 2), (4, 2), (6, 2), (8, 2)]);
        assert_eq!(block_count(&shape, 20), 5);
        assert_eq!(block_count(&[1 << 34], 1), 1 << 34, "counted without allocating");
        let one_d = split_rows(&[5], 2);
        assert_eq!(one_d, vec![(0, 2), (2, 2), (4, 1)]);
        // A row wider than the limit still forms a block of its own.
        assert_eq!(split_rows(&[3, 100], 10), vec![(0, 1), (1, 1), (2, 1)]);
        // A scalar is one block of one element.
        assert_eq!(split_rows(&[], 10), vec![(0, 1)]);
    }

    #[test]
    fn plan_is_deterministic_and_balanced() {
        let shapes: Vec<Vec<u64>> = vec![vec![64, 64], vec![64], vec![10, 64], vec![10], vec![300, 17]];
        let refs: Vec<&[u64]> = shapes.iter().map(|s| s.as_slice()).collect();
        let limits = vec![1000; refs.len()];
        let a = plan(&refs, &limits, 3);
        let b = plan(&refs, &limits, 3);
        assert_eq!(a, b);
        let total: u64 = shapes.iter().map(|s| num_elements(s)).sum();
        assert_eq!(a.iter().map(|b| b.length).sum::<u64>(), total);
        let largest = a.iter().map(|b| b.length).max().unwrap();
        let mut load = [0u64; 3];
        for block in &a {
            load[block.shard as usize] += block.length;
        }
        let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
        assert!(max - min <= largest, "unbalanced: {load:?}");
        // Ordered by tensor then block, with contiguous offsets.
        for pair in a.windows(2) {
            if pair[0].tensor == pair[1].tensor {
                assert_eq!(pair[0].offset + pair[0].length, pair[1].offset);
            }
        }
    }

    #[test]
    fn one_shard_owns_everything() {
        let shapes: Vec<&[u64]> = vec![&[4, 4], &[4]];
        assert!(plan(&shapes, &[4, 4], 1).iter().all(|b| b.shard == 0));
        // A whole-tensor limit keeps the tensor in one block.
        assert_eq!(plan(&shapes, &[u64::MAX, 4], 2).iter().filter(|b| b.tensor == 0).count(), 1);
    }
}
