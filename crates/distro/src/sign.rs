//! The last step of a DeMo round, `p -= lr * sign(IDCT(A))`, made bit-identical
//! on every peer whatever hardware decodes.
//!
//! The inverse DCT is a float sum whose last bits depend on the order of
//! operations, FMA contraction and subnormal handling, which differ between a
//! CPU and a GPU (and between GPUs). Only its sign is used, so we *certify*
//! each sign instead of demanding identical sums:
//!
//! - For each chunk the host computes `S = sum |A|` in f64 from the merged
//!   coefficients (identical bits everywhere) and from it a bound `E` on the
//!   error of *any* f32 evaluation of the chunk's inverse DCT:
//!   `E = gamma(r + c + 2) * S * max|Mr| * max|Mc| + (rc + r + c) * 2^-125`,
//!   where `gamma(n) = n u / (1 - n u)`, `u = 2^-24` (Higham's bound for
//!   sums of products; the second term covers GPUs that flush subnormals).
//! - An element whose f32 value `x` has `|x| > T = 2E` has the sign of the
//!   exact real value. Elements at or below `T` are recomputed on the CPU in
//!   f64 over the chunk's coefficients in canonical order: that value is within
//!   far less than `E` of the exact one, so it has the exact sign whenever any
//!   peer could certify it, and the same bits on every peer otherwise.
//!
//! So a peer decoding on a GPU and one decoding on a CPU agree on every sign,
//! and the apply itself is two correctly rounded f32 operations with
//! subnormal results flushed to +0 on every path.

use crate::chunk::ChunkGrid;
use crate::dct::BlockTransform;
use crate::sparse::SparseTensor;

/// Unit roundoff of f32.
const U32: f64 = 1.0 / 16_777_216.0;

/// The certification threshold `T = 2E` of every chunk of `merged` (see module docs).
/// A chunk with no coefficients gets `0.0`: every element of it is exactly 0.
pub fn sign_thresholds(merged: &SparseTensor, transform: &BlockTransform) -> Vec<f64> {
    let (r, c) = (transform.chunk_rows(), transform.chunk_cols());
    let max_abs = |m: &[f32]| m.iter().fold(0.0f64, |a, &v| a.max(f64::from(v.abs())));
    let scale = max_abs(&transform.row_basis().forward) * max_abs(&transform.col_basis().forward);
    let n = (r + c + 2) as f64;
    let gamma = n * U32 / (1.0 - n * U32);
    let floor = ((r * c + r + c) as f64) * 2f64.powi(-125);
    (0..merged.grid.num_chunks())
        .map(|ch| {
            let (_, vals) = merged.chunk(ch);
            let s: f64 = vals.iter().map(|v| f64::from(v.abs())).sum();
            if s == 0.0 {
                0.0
            } else {
                2.0 * (gamma * s * scale + floor)
            }
        })
        .collect()
}

/// The sign of element `(i, j)` of chunk `ch`, from an f64 sum over the chunk's
/// coefficients in index order: the deterministic tie-breaker.
pub fn exact_sign(
    merged: &SparseTensor,
    transform: &BlockTransform,
    ch: usize,
    i: usize,
    j: usize,
) -> f32 {
    let (r, c) = (transform.chunk_rows(), transform.chunk_cols());
    let (mr, mc) = (
        &transform.row_basis().forward,
        &transform.col_basis().forward,
    );
    let (idx, vals) = merged.chunk(ch);
    let mut x = 0.0f64;
    for (&flat, &v) in idx.iter().zip(vals) {
        let (a, b) = (flat as usize / c, flat as usize % c);
        x += f64::from(mr[i * r + a]) * f64::from(v) * f64::from(mc[j * c + b]);
    }
    sign_of(x)
}

fn sign_of(x: f64) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Certifies the signs of `decoded` (an f32 inverse DCT of `merged`, from any
/// device) in place: each element becomes -1, 0 or +1, the same on every peer.
/// Returns how many elements needed the f64 tie-breaker.
pub fn certify_signs(
    merged: &SparseTensor,
    transform: &BlockTransform,
    thresholds: &[f64],
    decoded: &mut [f32],
) -> usize {
    let grid = merged.grid;
    let mut resolved = 0;
    for (ch, &t) in thresholds.iter().enumerate().take(grid.num_chunks()) {
        for i in 0..grid.chunk_rows {
            let start = grid.element_offset(ch, i, 0);
            for (j, x) in decoded[start..start + grid.chunk_cols]
                .iter_mut()
                .enumerate()
            {
                *x = if t == 0.0 {
                    0.0
                } else if f64::from(x.abs()) > t {
                    if *x > 0.0 { 1.0 } else { -1.0 }
                } else {
                    resolved += 1;
                    exact_sign(merged, transform, ch, i, j)
                };
            }
        }
    }
    resolved
}

/// The exact signs (the f64 tie-breaker) of the elements at `offsets` (flat
/// offsets into the tensor). Used by the GPU paths, which certify on the
/// device and send only the uncertain elements here.
pub fn resolve_offsets(
    merged: &SparseTensor,
    transform: &BlockTransform,
    offsets: &[u32],
) -> Vec<f32> {
    let grid: ChunkGrid = merged.grid;
    let (across, cr, cc) = (grid.chunks_across(), grid.chunk_rows, grid.chunk_cols);
    offsets
        .iter()
        .map(|&off| {
            let (row, col) = (off as usize / grid.cols, off as usize % grid.cols);
            let ch = (row / cr) * across + col / cc;
            exact_sign(merged, transform, ch, row % cr, col % cc)
        })
        .collect()
}

/// Flushes a subnormal to +0, as GPUs may; applied on every path so all agree.
#[inline]
pub fn flush_subnormal(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x }
}

/// The deterministic apply: `p = flush(p * (1 - lr*wd))` (skipped when
/// `wd == 0`), then `p = flush(p - lr * s)` with `s` in {-1, 0, 1}, so `lr * s`
/// is exact and each step is one correctly rounded operation on any IEEE
/// hardware, fused or not.
pub fn apply_signs(params: &mut [f32], signs: &[f32], lr: f32, weight_decay: f32) {
    let keep = decay_factor(lr, weight_decay);
    for (p, &s) in params.iter_mut().zip(signs) {
        let mut v = *p;
        if let Some(keep) = keep {
            v = flush_subnormal(v * keep);
        }
        *p = flush_subnormal(v - lr * s);
    }
}

/// `1 - lr*wd` as the apply uses it, or `None` when there is no decay.
pub fn decay_factor(lr: f32, weight_decay: f32) -> Option<f32> {
    (weight_decay != 0.0).then_some(1.0 - lr * weight_decay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{aggregate, compress, decode_dense};
    use crate::dct::BasisCache;

    #[test]
    fn certified_signs_match_f64_truth() {
        let shape = [64, 128];
        let x: Vec<f32> = (0..64 * 128)
            .map(|i| ((i * 2654435761usize % 10007) as f32 - 5003.0) * 1e-3)
            .collect();
        let s = compress(&x, &shape, 8, 64).expect("compress");
        let merged = aggregate(&[&s]).expect("merge");
        let t = BlockTransform::new(&BasisCache::default(), 64, 64);
        let mut decoded = decode_dense(&merged, &t);
        let thresholds = sign_thresholds(&merged, &t);
        certify_signs(&merged, &t, &thresholds, &mut decoded);
        let g = merged.grid;
        for ch in 0..g.num_chunks() {
            for i in 0..64 {
                for j in 0..64 {
                    let want = exact_sign(&merged, &t, ch, i, j);
                    assert_eq!(decoded[g.element_offset(ch, i, j)], want);
                }
            }
        }
    }

    #[test]
    fn perturbed_decodes_certify_identically() {
        // A second "device" whose sums differ in the last bits must still agree.
        let shape = [64, 64];
        let x: Vec<f32> = (0..4096)
            .map(|i| ((i * 40503 % 4099) as f32 - 2049.0) * 1e-2)
            .collect();
        let merged = aggregate(&[&compress(&x, &shape, 32, 64).expect("c")]).expect("m");
        let t = BlockTransform::new(&BasisCache::default(), 64, 64);
        let thresholds = sign_thresholds(&merged, &t);
        let mut a = decode_dense(&merged, &t);
        let mut b: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i % 2 == 0 {
                    v.next_up()
                } else {
                    v.next_down()
                }
            })
            .collect();
        // Force a few elements to the other side of zero, inside the error bound.
        for v in b.iter_mut().take(50) {
            if v.abs() < 1e-7 {
                *v = -*v;
            }
        }
        certify_signs(&merged, &t, &thresholds, &mut a);
        certify_signs(&merged, &t, &thresholds, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn apply_is_two_rounded_steps() {
        let mut p = vec![1.0f32, -0.5, 1e-39, 3.0];
        apply_signs(&mut p, &[1.0, -1.0, 0.0, 0.0], 0.25, 0.0);
        assert_eq!(p, vec![0.75, -0.25, 0.0, 3.0]);
        let mut q = vec![2.0f32];
        apply_signs(&mut q, &[1.0], 0.5, 0.1);
        assert_eq!(q, vec![2.0 * 0.95 - 0.5]);
    }
}
