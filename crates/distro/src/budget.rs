//! What an update costs on the wire, and the top-k that fits a budget.
//!
//! The node turns the volunteer's upload cap and the round window into a byte
//! budget per round and asks [`budget_topk`] for the largest top-k that fits,
//! so a slow link sends fewer coefficients instead of missing the deadline.
//! Sizes are exact: they come from the same formulas the encoder follows.

use crate::chunk::ChunkGrid;
use crate::sparse::ValueEncoding;
use crate::wire::{HEADER_BYTES, TRAILER_BYTES, tensor_bytes};

/// The facts about one tensor that fix its wire size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorBudget {
    /// Number of dimensions (each costs 4 header bytes).
    pub ndim: usize,
    /// Its chunking.
    pub grid: ChunkGrid,
}

impl TensorBudget {
    /// The budget entry for a tensor of `shape` chunked with target `chunk`.
    pub fn for_shape(shape: &[usize], chunk: usize) -> Self {
        Self {
            ndim: shape.len(),
            grid: ChunkGrid::for_shape(shape, chunk),
        }
    }

    /// Wire bytes of this tensor's record when every chunk sends `k`
    /// coefficients (clamped to the chunk size).
    pub fn wire_bytes(&self, topk: usize, values: ValueEncoding) -> u64 {
        let k = self.grid.clamp_topk(topk);
        let nnz = (self.grid.num_chunks() * k) as u64;
        tensor_bytes(self.ndim, &self.grid, k, nnz, values)
    }
}

/// Exact wire bytes of a full update (header, every tensor, checksum) when
/// every chunk sends `k` coefficients. Sign updates that leave out exact zeros
/// are smaller; this is the bound the budget must hold.
pub fn update_wire_bytes(tensors: &[TensorBudget], topk: usize, values: ValueEncoding) -> u64 {
    (HEADER_BYTES + TRAILER_BYTES) as u64
        + tensors
            .iter()
            .map(|t| t.wire_bytes(topk, values))
            .sum::<u64>()
}

/// The largest top-k whose update fits in `budget_bytes`, or `None` if even
/// `k = 1` does not fit. Beyond the largest chunk's size more k buys nothing,
/// so the answer never exceeds it.
pub fn budget_topk(
    tensors: &[TensorBudget],
    budget_bytes: u64,
    values: ValueEncoding,
) -> Option<usize> {
    let max_k = tensors
        .iter()
        .map(|t| t.grid.chunk_elems())
        .max()
        .unwrap_or(1)
        .max(1);
    if update_wire_bytes(tensors, 1, values) > budget_bytes {
        return None;
    }
    // Size is non-decreasing in k: binary search the last k that fits.
    let (mut lo, mut hi) = (1usize, max_k);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if update_wire_bytes(tensors, mid, values) <= budget_bytes {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::compress;
    use crate::optimizer::OutgoingUpdate;
    use crate::wire::encoded_len;
    use proptest::prelude::*;

    fn model() -> Vec<TensorBudget> {
        [vec![512, 256], vec![256], vec![1000, 64]]
            .iter()
            .map(|s| TensorBudget::for_shape(s, 64))
            .collect()
    }

    #[test]
    fn estimate_equals_encoded_length() {
        let shapes = [vec![128, 192], vec![96], vec![67, 5]];
        for values in [ValueEncoding::Sign, ValueEncoding::Bf16, ValueEncoding::F32] {
            for k in [1, 4, 32, 5000] {
                let tensors = shapes
                    .iter()
                    .map(|s| {
                        let n: usize = s.iter().product();
                        let d: Vec<f32> = (0..n)
                            .map(|i| ((i * 7919 % 211) as f32 - 105.3) * 0.1)
                            .collect();
                        compress(&d, s, k, 64).expect("compress").quantized(values)
                    })
                    .collect();
                let u = OutgoingUpdate { values, tensors };
                let b: Vec<TensorBudget> = shapes
                    .iter()
                    .map(|s| TensorBudget::for_shape(s, 64))
                    .collect();
                assert_eq!(
                    update_wire_bytes(&b, k, values),
                    encoded_len(&u),
                    "{values:?} k={k}"
                );
            }
        }
    }

    #[test]
    fn tiny_budget_fits_nothing() {
        assert_eq!(budget_topk(&model(), 10, ValueEncoding::Sign), None);
    }

    proptest! {
        #[test]
        fn budget_topk_is_the_largest_that_fits(budget in 0u64..2_000_000) {
            let m = model();
            match budget_topk(&m, budget, ValueEncoding::Sign) {
                None => prop_assert!(update_wire_bytes(&m, 1, ValueEncoding::Sign) > budget),
                Some(k) => {
                    prop_assert!(update_wire_bytes(&m, k, ValueEncoding::Sign) <= budget);
                    prop_assert!(k == 4096 || update_wire_bytes(&m, k + 1, ValueEncoding::Sign) > budget);
                }
            }
        }
    }
}
