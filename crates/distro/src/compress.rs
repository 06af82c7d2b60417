//! DeMo's compression of one tensor and the decoding of several peers' updates,
//! in reference (f32) semantics on the CPU.
//!
//! The CPU path runs chunk bands in parallel (a band of `chunk_rows` full rows is
//! contiguous in memory, so bands split without copies) and computes every
//! chunk with the fixed-order loops of [`crate::dct`], so its output is the same
//! bits on every machine.

use rayon::prelude::*;

use crate::chunk::ChunkGrid;
use crate::dct::{BasisCache, BlockTransform};
use crate::sparse::{SparseError, SparseTensor};

/// Why a tensor could not be compressed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompressError {
    /// The data length is not the product of the shape.
    #[error("tensor has {len} values but shape {shape:?} needs {expected}")]
    ShapeMismatch {
        /// Shape given.
        shape: Vec<usize>,
        /// Values given.
        len: usize,
        /// Values the shape needs.
        expected: usize,
    },
    /// The input holds NaN or infinity; DeMo would spread it through the momentum.
    #[error("tensor holds a NaN or infinite value at element {index}")]
    NonFinite {
        /// First offending element.
        index: usize,
    },
}

/// Why sparse updates could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecompressError {
    /// No update was given, so there is no shape to decode to.
    #[error("no updates to decode")]
    Empty,
    /// Updates disagree on the tensor shape or chunking.
    #[error("update {index} has shape {shape:?} / grid {grid:?}, unlike the first update")]
    Mismatch {
        /// Position of the odd update.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
        /// Its chunk grid.
        grid: ChunkGrid,
    },
    /// An update is malformed.
    #[error("update {index} is malformed: {source}")]
    Invalid {
        /// Position of the malformed update.
        index: usize,
        /// What is wrong with it.
        source: SparseError,
    },
}

/// Compresses one tensor the way a DeMo peer does before sending: DCT-II of
/// every chunk, then the `topk` coefficients of largest magnitude per chunk.
///
/// - `tensor` is row-major with `shape`; `chunk` is the chunk target (DeMo: 64).
/// - `topk` is clamped to `1..=chunk_elems`.
/// - Every chunk gets exactly `k` entries: indices are flat positions in the
///   chunk's `chunk_rows x chunk_cols` coefficient block, row-major (frequency
///   down the rows first), sorted ascending; values are the f32 coefficients.
/// - Ties in magnitude go to the lower index, so the choice is deterministic.
pub fn compress(
    tensor: &[f32],
    shape: &[usize],
    topk: usize,
    chunk: usize,
) -> Result<SparseTensor, CompressError> {
    let grid = ChunkGrid::for_shape(shape, chunk);
    check_dense(tensor, shape, &grid)?;
    let transform = BlockTransform::new(&BasisCache::default(), grid.chunk_rows, grid.chunk_cols);
    let mut work = tensor.to_vec();
    Ok(compress_in_place(
        &mut work, shape, &grid, &transform, topk, false,
    ))
}

/// Checks length and finiteness of a dense tensor.
pub(crate) fn check_dense(
    tensor: &[f32],
    shape: &[usize],
    grid: &ChunkGrid,
) -> Result<(), CompressError> {
    if tensor.len() != grid.numel() {
        return Err(CompressError::ShapeMismatch {
            shape: shape.to_vec(),
            len: tensor.len(),
            expected: grid.numel(),
        });
    }
    if let Some(index) = tensor.iter().position(|v| !v.is_finite()) {
        return Err(CompressError::NonFinite { index });
    }
    Ok(())
}

/// Top-k of every chunk of `data`; with `feedback`, also subtracts what was
/// selected from `data` (DeMo's error feedback: `delta -= IDCT(sparse)`).
pub(crate) fn compress_in_place(
    data: &mut [f32],
    shape: &[usize],
    grid: &ChunkGrid,
    transform: &BlockTransform,
    topk: usize,
    feedback: bool,
) -> SparseTensor {
    let k = grid.clamp_topk(topk);
    let chunks = grid.num_chunks();
    let mut indices = Vec::with_capacity(chunks * k);
    let mut values = Vec::with_capacity(chunks * k);
    if chunks > 0 {
        let band_len = grid.chunk_rows * grid.cols;
        let bands: Vec<(Vec<u32>, Vec<f32>)> = data
            .par_chunks_mut(band_len)
            .map(|band| compress_band(band, grid, transform, k, feedback))
            .collect();
        for (i, v) in bands {
            indices.extend(i);
            values.extend(v);
        }
    }
    SparseTensor {
        shape: shape.to_vec(),
        grid: *grid,
        k,
        offsets: (0..=chunks).map(|c| (c * k) as u32).collect(),
        indices,
        values,
    }
}

fn compress_band(
    band: &mut [f32],
    grid: &ChunkGrid,
    transform: &BlockTransform,
    k: usize,
    feedback: bool,
) -> (Vec<u32>, Vec<f32>) {
    let elems = grid.chunk_elems();
    let across = grid.chunks_across();
    let (mut block, mut coeffs, mut scratch) =
        (vec![0.0; elems], vec![0.0; elems], vec![0.0; elems]);
    let mut order: Vec<u32> = Vec::with_capacity(elems);
    let mut indices = Vec::with_capacity(across * k);
    let mut values = Vec::with_capacity(across * k);
    // Inside a band, chunk bx of the band is chunk bx of a one-band grid.
    let band_grid = ChunkGrid {
        rows: grid.chunk_rows,
        ..*grid
    };
    for bx in 0..across {
        band_grid.gather_chunk(band, bx, &mut block);
        transform.forward(&block, &mut coeffs, &mut scratch);
        select_top_k(&coeffs, k, &mut order);
        for &i in &order[..k] {
            indices.push(i);
            values.push(coeffs[i as usize]);
        }
        if feedback {
            // Keep only the selected coefficients, decode them and take them out.
            scratch.fill(0.0);
            for &i in &order[..k] {
                scratch[i as usize] = coeffs[i as usize];
            }
            transform.inverse(&scratch, &mut block, &mut coeffs);
            for i in 0..grid.chunk_rows {
                let start = band_grid.element_offset(bx, i, 0);
                let row = &mut band[start..start + grid.chunk_cols];
                for (d, s) in row.iter_mut().zip(&block[i * grid.chunk_cols..]) {
                    *d -= s;
                }
            }
        }
    }
    (indices, values)
}

/// Puts the positions of the `k` largest `|coeffs|` (ties: lower position
/// first) in `order[..k]`, ascending.
pub(crate) fn select_top_k(coeffs: &[f32], k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..coeffs.len() as u32);
    let rank = |a: &u32, b: &u32| {
        let (va, vb) = (coeffs[*a as usize].abs(), coeffs[*b as usize].abs());
        vb.total_cmp(&va).then(a.cmp(b))
    };
    if k < order.len() {
        order.select_nth_unstable_by(k, rank);
    }
    order[..k].sort_unstable();
}

/// Scatter-mean of several peers' sparse tensors: each coefficient becomes the
/// mean of the values sent for it, over the peers that sent it (DeMo's
/// `scatter_reduce(mean, include_self=False)`), summed in the order given.
///
/// The result is itself a sparse tensor (the union of the inputs' positions),
/// with `k` the number of positions its fullest chunk holds.
pub fn aggregate(updates: &[&SparseTensor]) -> Result<SparseTensor, DecompressError> {
    let first = updates.first().ok_or(DecompressError::Empty)?;
    for (index, u) in updates.iter().enumerate() {
        if u.shape != first.shape || u.grid != first.grid {
            return Err(DecompressError::Mismatch {
                index,
                shape: u.shape.clone(),
                grid: u.grid,
            });
        }
        u.validate()
            .map_err(|source| DecompressError::Invalid { index, source })?;
    }
    let grid = first.grid;
    let elems = grid.chunk_elems();
    let mut sum = vec![0.0f32; elems];
    let mut count = vec![0u32; elems];
    let mut touched: Vec<u32> = Vec::new();
    let mut offsets = Vec::with_capacity(grid.num_chunks() + 1);
    let mut indices = Vec::new();
    let mut values = Vec::new();
    let mut k = 1;
    offsets.push(0);
    for c in 0..grid.num_chunks() {
        touched.clear();
        for u in updates {
            let (idx, val) = u.chunk(c);
            for (&i, &v) in idx.iter().zip(val) {
                let slot = i as usize;
                if count[slot] == 0 {
                    touched.push(i);
                }
                sum[slot] += v;
                count[slot] += 1;
            }
        }
        touched.sort_unstable();
        for &i in &touched {
            let slot = i as usize;
            indices.push(i);
            values.push(sum[slot] / count[slot] as f32);
            sum[slot] = 0.0;
            count[slot] = 0;
        }
        k = k.max(touched.len());
        offsets.push(indices.len() as u32);
    }
    Ok(SparseTensor {
        shape: first.shape.clone(),
        grid,
        k,
        offsets,
        indices,
        values,
    })
}

/// Decodes several peers' sparse updates of one tensor to the dense tensor:
/// [`aggregate`] (scatter-mean over senders), then the inverse DCT of every
/// chunk. With one update this is what that peer's update decodes to.
pub fn decompress(updates: &[&SparseTensor]) -> Result<Vec<f32>, DecompressError> {
    let merged = aggregate(updates)?;
    let transform = BlockTransform::new(
        &BasisCache::default(),
        merged.grid.chunk_rows,
        merged.grid.chunk_cols,
    );
    Ok(decode_dense(&merged, &transform))
}

/// Inverse DCT of every chunk of an (already aggregated, valid) sparse tensor.
pub(crate) fn decode_dense(sparse: &SparseTensor, transform: &BlockTransform) -> Vec<f32> {
    let grid = sparse.grid;
    let mut out = vec![0.0f32; grid.numel()];
    if grid.num_chunks() == 0 {
        return out;
    }
    let across = grid.chunks_across();
    let band_grid = ChunkGrid {
        rows: grid.chunk_rows,
        ..grid
    };
    out.par_chunks_mut(grid.chunk_rows * grid.cols)
        .enumerate()
        .for_each(|(by, band)| {
            let elems = grid.chunk_elems();
            let (mut coeffs, mut block, mut scratch) =
                (vec![0.0; elems], vec![0.0; elems], vec![0.0; elems]);
            for bx in 0..across {
                let (idx, val) = sparse.chunk(by * across + bx);
                if idx.is_empty() {
                    continue;
                }
                coeffs.fill(0.0);
                for (&i, &v) in idx.iter().zip(val) {
                    coeffs[i as usize] = v;
                }
                transform.inverse(&coeffs, &mut block, &mut scratch);
                for i in 0..grid.chunk_rows {
                    let start = band_grid.element_offset(bx, i, 0);
                    band[start..start + grid.chunk_cols]
                        .copy_from_slice(&block[i * grid.chunk_cols..(i + 1) * grid.chunk_cols]);
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 100.0)
            .collect()
    }

    #[test]
    fn full_k_roundtrips() {
        let shape = [12, 20];
        let x = ramp(240);
        let s = compress(&x, &shape, usize::MAX, 64).expect("compress");
        assert_eq!(s.k, 240);
        let back = decompress(&[&s]).expect("decompress");
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn top_k_picks_largest_with_low_index_ties() {
        let mut order = Vec::new();
        select_top_k(&[1.0, -3.0, 3.0, 0.5, -3.0], 2, &mut order);
        assert_eq!(&order[..2], &[1, 2]);
    }

    #[test]
    fn mean_is_over_senders_of_each_coefficient() {
        let grid = ChunkGrid::for_shape(&[4], 64);
        let mk = |idx: Vec<u32>, val: Vec<f32>| SparseTensor {
            shape: vec![4],
            grid,
            k: 2,
            offsets: vec![0, idx.len() as u32],
            indices: idx,
            values: val,
        };
        let (a, b) = (
            mk(vec![0, 1], vec![2.0, 4.0]),
            mk(vec![1, 3], vec![6.0, 1.0]),
        );
        let m = aggregate(&[&a, &b]).expect("aggregate");
        assert_eq!(m.indices, vec![0, 1, 3]);
        assert_eq!(m.values, vec![2.0, 5.0, 1.0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            compress(&[1.0, 2.0], &[3], 1, 64),
            Err(CompressError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            compress(&[1.0, f32::NAN], &[2], 1, 64),
            Err(CompressError::NonFinite { index: 1 })
        ));
        assert_eq!(decompress(&[]), Err(DecompressError::Empty));
        let a = compress(&[1.0; 8], &[8], 2, 64).expect("a");
        let b = compress(&[1.0; 8], &[2, 4], 2, 64).expect("b");
        assert!(matches!(
            decompress(&[&a, &b]),
            Err(DecompressError::Mismatch { index: 1, .. })
        ));
    }

    proptest::proptest! {
        /// With every coefficient kept, compress then decompress is the identity
        /// (up to f32 rounding), for any shape and chunk target.
        #[test]
        fn full_k_roundtrip_any_shape(
            dims in proptest::collection::vec(1usize..40, 1..4),
            chunk in 1usize..70,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let n: usize = dims.iter().product();
            let x: Vec<f32> = (0..n as u64)
                .map(|i| ((i.wrapping_mul(seed | 1) >> 9) % 2001) as f32 * 1e-3 - 1.0)
                .collect();
            let s = compress(&x, &dims, usize::MAX, chunk).expect("compress");
            proptest::prop_assert_eq!(s.nnz(), n);
            let back = decompress(&[&s]).expect("decompress");
            for (a, b) in x.iter().zip(&back) {
                proptest::prop_assert!((a - b).abs() < 1e-5, "{} vs {}", a, b);
            }
        }

        /// Keeping k coefficients keeps the k largest: the energy left out is
        /// never more than what any other choice of k would leave out.
        #[test]
        fn top_k_keeps_the_most_energy(k in 1usize..64, seed in proptest::prelude::any::<u64>()) {
            let x: Vec<f32> = (0..64u64).map(|i| ((i.wrapping_mul(seed | 1) >> 7) % 997) as f32 - 498.0).collect();
            let s = compress(&x, &[64], k, 64).expect("compress");
            let all = compress(&x, &[64], 64, 64).expect("all");
            let mut mags: Vec<f32> = all.values.iter().map(|v| v.abs()).collect();
            mags.sort_by(|a, b| b.total_cmp(a));
            let kept: f32 = s.values.iter().map(|v| v.abs()).sum();
            let best: f32 = mags[..k].iter().sum();
            proptest::prop_assert!((kept - best).abs() <= 1e-3 * best.max(1.0));
        }
    }

    #[test]
    fn empty_tensor_compresses() {
        let s = compress(&[], &[0, 5], 4, 64).expect("compress");
        assert_eq!(s.nnz(), 0);
        assert_eq!(decompress(&[&s]).expect("decode").len(), 0);
    }
}
