//! The DeMo step as plain Burn tensor operations: portable to every Burn
//! backend (wgpu, CUDA, the CPU), and the fallback where the fused kernels do
//! not fit. Chunks become a batch: `[rows, cols]` is viewed as
//! `[num_chunks, chunk_rows, chunk_cols]` and the 2-D DCT of every chunk is two
//! batched matrix products with the basis.

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use super::{GpuError, StepOutput, from_blocks, to_blocks};
use crate::ChunkGrid;
use crate::sparse::SparseTensor;

/// Momentum update, top-k of the chunked DCT, error feedback.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compress_step(
    delta: &Tensor<2>,
    grad: &Tensor<2>,
    basis_r: &Tensor<2>,
    basis_c: &Tensor<2>,
    g: &ChunkGrid,
    k: usize,
    decay: f32,
    lr: f32,
) -> StepOutput {
    let n = g.num_chunks();
    let e = g.chunk_elems();
    let d = delta
        .clone()
        .mul_scalar(decay)
        .add(grad.clone().mul_scalar(lr));
    let mr: Tensor<3> = basis_r.clone().unsqueeze();
    let mc: Tensor<3> = basis_c.clone().unsqueeze();
    // C = Mr^T X Mc per chunk.
    let coeffs = mr
        .clone()
        .transpose()
        .matmul(to_blocks(d.clone(), g))
        .matmul(mc.clone())
        .reshape([n, e]);
    let (_, indices) = coeffs.clone().abs().topk_with_indices(k, 1);
    let values = coeffs.clone().gather(1, indices.clone());
    let kept = coeffs
        .zeros_like()
        .scatter(1, indices.clone(), values.clone(), IndexingUpdateOp::Assign)
        .reshape([n, g.chunk_rows, g.chunk_cols]);
    // delta -= Mr Csel Mc^T
    let sent = mr.matmul(kept).matmul(mc.transpose());
    StepOutput {
        delta: d.sub(from_blocks(sent, g)),
        indices,
        values,
    }
}

/// The inverse DCT of a merged update and its certified signs: returns the
/// sign tensor (`[rows, cols]`, 0 where uncertain) and the flat offsets of the
/// uncertain elements, which the caller settles on the host.
pub(crate) fn decode_signs(
    merged: &SparseTensor,
    thresholds: &[f64],
    basis_r: &Tensor<2>,
    basis_c: &Tensor<2>,
    device: &Device,
) -> Result<(Tensor<2>, Vec<u32>), GpuError> {
    let g = merged.grid;
    let (n, e) = (g.num_chunks(), g.chunk_elems());
    let mut at = Vec::with_capacity(merged.nnz());
    for c in 0..n {
        let (idx, _) = merged.chunk(c);
        at.extend(idx.iter().map(|&i| (c * e) as i64 + i64::from(i)));
    }
    let nnz = at.len();
    let at = Tensor::<1, Int>::from_data(TensorData::new(at, [nnz]), device);
    let vals = Tensor::<1>::from_data(TensorData::new(merged.values.clone(), [nnz]), device);
    let coeffs = Tensor::<1>::zeros([n * e], device)
        .scatter(0, at, vals, IndexingUpdateOp::Assign)
        .reshape([n, g.chunk_rows, g.chunk_cols]);
    let mr: Tensor<3> = basis_r.clone().unsqueeze();
    let mc: Tensor<3> = basis_c.clone().unsqueeze();
    let x = mr.matmul(coeffs).matmul(mc.transpose()).reshape([n, e]);
    let limits: Vec<f32> = thresholds.iter().map(|&t| round_up(t)).collect();
    let limits = Tensor::<2>::from_data(TensorData::new(limits, [n, 1]), device).expand([n, e]);
    let certain = x.clone().abs().greater(limits.clone());
    // Uncertain: not certain, in a chunk that has coefficients at all.
    let unsure = certain
        .clone()
        .bool_not()
        .bool_and(limits.greater_elem(0.0));
    let signs = x.sign().mask_fill(certain.bool_not(), 0.0);
    let positions = unsure.argwhere().try_into_vec_as::<i64>()?;
    // argwhere gives (chunk, element) pairs; turn them into tensor offsets.
    let unsure = positions
        .chunks_exact(2)
        .map(|p| {
            let (c, el) = (p[0] as usize, p[1] as usize);
            g.element_offset(c, el / g.chunk_cols, el % g.chunk_cols) as u32
        })
        .collect();
    Ok((
        from_blocks(signs.reshape([n, g.chunk_rows, g.chunk_cols]), &g),
        unsure,
    ))
}

/// The smallest f32 not below `t` (thresholds must never shrink).
pub(crate) fn round_up(t: f64) -> f32 {
    let f = t as f32;
    if f64::from(f) < t { f.next_up() } else { f }
}
