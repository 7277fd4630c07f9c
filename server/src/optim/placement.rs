//! Where an optimizer's large state buffers start in memory.
//!
//! The allocator hands out large buffers at the same offset within a 4 KiB
//! page, so element `i` of the weights, the gradient and Adam's two moments
//! share their low address bits. An update that streams all four at once
//! then competes for the same cache sets. On the 2-core AMD EPYC VM
//! (`cargo bench -p ps-server --bench adam_layout`; docs/notes/performance.md,
//! "AdamW on two threads ...") an Adam pass over 8M-element arrays ran at
//! 29.9 GB/s on one thread and *15.1* on two, while with the moments at other
//! page offsets two threads always beat one; the optimizer benchmark's AdamW on
//! two threads went from 15–16 GB/s to 24–46. So the moments are placed there.

use std::ops::{Deref, DerefMut};

/// Bytes between the page offsets of consecutive lanes: 17 cache lines, so
/// that lanes 0–3 fall in distinct sets and none is a multiple of 4 KiB apart.
const LANE_BYTES: usize = 17 * 64;
const PAGE_BYTES: usize = 4096;
/// Buffers below this many elements stay in caches; they are not offset.
const MIN_STAGGERED_LEN: usize = 16 * 1024;

/// A float buffer whose first element sits at `lane · 1,088` bytes into a
/// 4 KiB page (lane 0: wherever the allocator put it). Reads as a slice.
#[derive(Debug, Default)]
pub struct Staggered {
    storage: Vec<f32>,
    start: usize,
    len: usize,
    lane: usize,
}

impl Staggered {
    /// `len` zeros in `lane` (the allocator's zeroed pages, not written until used).
    pub fn zeros(len: usize, lane: usize) -> Self {
        Self::placed(len, lane, |_| {})
    }

    /// A copy of `values` in `lane`.
    pub fn copy_of(values: &[f32], lane: usize) -> Self {
        Self::placed(values.len(), lane, |slice| slice.copy_from_slice(values))
    }

    fn placed(len: usize, lane: usize, fill: impl FnOnce(&mut [f32])) -> Self {
        if lane == 0 || len < MIN_STAGGERED_LEN {
            let mut storage = vec![0.0; len];
            fill(&mut storage);
            return Self { storage, start: 0, len, lane };
        }
        let pad = PAGE_BYTES / std::mem::size_of::<f32>();
        let mut storage = vec![0.0f32; len + pad];
        let address = storage.as_ptr() as usize;
        let target = (lane * LANE_BYTES) % PAGE_BYTES;
        let start = (target + PAGE_BYTES - address % PAGE_BYTES) % PAGE_BYTES / std::mem::size_of::<f32>();
        fill(&mut storage[start..start + len]);
        Self { storage, start, len, lane }
    }

    /// The values, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl From<Vec<f32>> for Staggered {
    /// Takes `values` where they are (lane 0), without a copy.
    fn from(values: Vec<f32>) -> Self {
        let len = values.len();
        Self { storage: values, start: 0, len, lane: 0 }
    }
}

impl Clone for Staggered {
    /// A copy placed in the same lane (a fresh allocation's page offset may differ).
    fn clone(&self) -> Self {
        Self::copy_of(self, self.lane)
    }
}

impl PartialEq for Staggered {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Deref for Staggered {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for Staggered {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_start_at_their_page_offsets_and_read_as_the_values() {
        let values: Vec<f32> = (0..MIN_STAGGERED_LEN + 5).map(|i| i as f32).collect();
        for lane in 1..4 {
            let buffer = Staggered::copy_of(&values, lane);
            assert_eq!(buffer.as_ptr() as usize % PAGE_BYTES, lane * LANE_BYTES);
            assert_eq!(&buffer[..], &values[..]);
            let copy = buffer.clone();
            assert_eq!(copy.as_ptr() as usize % PAGE_BYTES, lane * LANE_BYTES);
            assert_eq!(copy, buffer);
        }
        let zeros = Staggered::zeros(MIN_STAGGERED_LEN, 2);
        assert!(zeros.len() == MIN_STAGGERED_LEN && zeros.iter().all(|&x| x == 0.0));
        // Small buffers and lane 0 are left where the allocator puts them.
        assert_eq!(Staggered::zeros(10, 3).start, 0);
        assert_eq!(Staggered::from(values.clone()).start, 0);
    }
}
