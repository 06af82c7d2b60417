//! DeMo on Burn tensors, so gradients that live on a GPU are compressed there
//! and only the few selected coefficients come back to the host.
//!
//! Two layers, as the training engine needs both:
//! - [`burn_ops`]: the step written as Burn tensor operations (batched matrix
//!   products with the DCT basis, `topk_with_indices`, gather, scatter). It runs
//!   on every Burn backend: wgpu, CUDA, the CPU.
//! - [`wgsl`]: fused WGSL kernels (`shaders/`) launched on Burn's own wgpu
//!   buffers: one workgroup per chunk does momentum, DCT, top-k, compaction and
//!   error feedback without leaving shared memory; a second decodes and signs.
//!
//! Both end in the same apply as the CPU (see [`crate::sign`]): the signs are
//! certified against a rigorous error bound and the few uncertain ones are
//! settled on the host in f64, so a GPU peer's weights equal a CPU peer's to
//! the bit. The apply itself is two correctly rounded elementwise operations.

pub mod burn_ops;
pub mod probe;
pub mod wgsl;

use burn::tensor::{Device, Int, PrimitiveConversionError, Tensor, TensorData, TensorReadError};

use crate::optimizer::{
    ApplyError, ApplyReport, DistroConfig, IncomingUpdate, ModelLayout, OutgoingUpdate, StepError,
    StepOptions, TensorLayout,
};
use crate::sign::{decay_factor, resolve_offsets, sign_thresholds};
use crate::sparse::{SparseError, SparseTensor};

pub use probe::{
    AdapterSummary, GpuInitError, is_wgpu, list_adapters, wgpu_device, wgpu_device_at,
};

/// Which implementation runs the GPU step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelPath {
    /// Fused WGSL kernels where the device is wgpu, a chunk fits a
    /// workgroup's shared memory and a one-time timing on this adapter shows
    /// them faster than the Burn operations; Burn operations otherwise.
    #[default]
    Auto,
    /// Burn tensor operations only (any backend).
    BurnOps,
    /// Fused WGSL kernels only; an error where they cannot run.
    Wgsl,
}

/// Why a GPU step or apply failed. Momentum and weights are unchanged when it does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// The inputs were rejected before any work (same checks as the CPU path).
    #[error(transparent)]
    Step(#[from] StepError),
    /// The updates or parameters were rejected.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A tensor's shape does not match the model.
    #[error("tensor {tensor}: shape {got:?}, the model expects {expected:?}")]
    Shape {
        /// Model tensor index.
        tensor: usize,
        /// Expected `[rows, cols]`.
        expected: [usize; 2],
        /// Given shape.
        got: Vec<usize>,
    },
    /// A tensor lives on another device than the optimizer's momentum.
    #[error("tensor {tensor} is on another device than the optimizer")]
    WrongDevice {
        /// Model tensor index.
        tensor: usize,
    },
    /// Reading a result back from the device failed.
    #[error("reading a result from the device failed: {0}")]
    Read(#[from] TensorReadError),
    /// The device returned a selection of the wrong size (a kernel bug).
    #[error(
        "tensor {tensor}: expected {expected} selected coefficients from the device, \
         read {indices} indices and {values} values"
    )]
    SelectionSize {
        /// Model tensor index.
        tensor: usize,
        /// Entries expected: chunks times k.
        expected: usize,
        /// Indices read.
        indices: usize,
        /// Values read.
        values: usize,
    },
    /// The device returned a coefficient index outside any chunk (a kernel bug).
    #[error("tensor {tensor}: the device returned coefficient index {index}, out of range")]
    SelectionIndex {
        /// Model tensor index.
        tensor: usize,
        /// The index read.
        index: i64,
    },
    /// The device returned a selection that breaks a sparse tensor's invariants (a kernel bug).
    #[error("tensor {tensor}: the device returned an invalid selection: {source}")]
    Selection {
        /// Model tensor index.
        tensor: usize,
        /// What is wrong.
        #[source]
        source: SparseError,
    },
    /// The device produced NaN or infinity: the gradient was not finite.
    #[error("tensor {tensor}: the gradient holds NaN or infinite values")]
    NonFinite {
        /// Model tensor index.
        tensor: usize,
    },
    /// The fused kernels were requested where they cannot run.
    #[error("the WGSL kernels cannot run here: {0}")]
    WgslUnavailable(String),
    /// A tensor given to the fused kernels is not a wgpu tensor.
    #[error("the WGSL kernels cannot run here: tensor is not on a wgpu device: {0:?}")]
    NotWgpu(PrimitiveConversionError),
}

/// `[rows, cols]` of the matrix view a tensor's gradient must be given in.
pub fn matrix_shape(t: &TensorLayout) -> [usize; 2] {
    [t.grid.rows, t.grid.cols]
}

/// DeMo with the momentum on a Burn device.
#[derive(Debug)]
pub struct GpuDistro {
    layout: ModelLayout,
    device: Device,
    wgsl: Vec<bool>,
    deltas: Vec<Tensor<2>>,
    bases: Vec<(Tensor<2>, Tensor<2>)>,
}

impl GpuDistro {
    /// Zero momentum on `device` for tensors of the given shapes.
    pub fn new(
        shapes: &[Vec<usize>],
        config: DistroConfig,
        device: &Device,
        path: KernelPath,
    ) -> Result<Self, GpuError> {
        let layout = ModelLayout::new(shapes, config);
        if path == KernelPath::Wgsl && !is_wgpu(device) {
            return Err(GpuError::WgslUnavailable(
                "the device is not a wgpu device".into(),
            ));
        }
        let deltas = layout
            .tensors()
            .iter()
            .map(|t| Tensor::zeros(matrix_shape(t), device))
            .collect();
        // One device copy per chunk size, shared by every tensor that uses it.
        let mut uploaded: std::collections::HashMap<usize, Tensor<2>> =
            std::collections::HashMap::new();
        let mut upload = |b: &crate::dct::DctBasis| {
            uploaded
                .entry(b.n)
                .or_insert_with(|| {
                    Tensor::<2>::from_data(TensorData::new(b.forward.clone(), [b.n, b.n]), device)
                })
                .clone()
        };
        let bases = layout
            .tensors()
            .iter()
            .map(|t| {
                (
                    upload(t.transform.row_basis()),
                    upload(t.transform.col_basis()),
                )
            })
            .collect();
        let shared = match path {
            KernelPath::BurnOps => 0,
            _ if is_wgpu(device) => wgsl::shared_memory_limit(device),
            _ => 0,
        };
        let wgsl = layout
            .tensors()
            .iter()
            .map(|t| match path {
                KernelPath::BurnOps => Ok(false),
                KernelPath::Auto => Ok(is_wgpu(device)
                    && wgsl::fits(shared, &t.grid)
                    && wgsl_is_faster(device, &t.grid)),
                KernelPath::Wgsl if wgsl::fits(shared, &t.grid) => Ok(true),
                KernelPath::Wgsl => Err(GpuError::WgslUnavailable(format!(
                    "chunks of {}x{} do not fit a workgroup here",
                    t.grid.chunk_rows, t.grid.chunk_cols
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            layout,
            device: device.clone(),
            wgsl,
            deltas,
            bases,
        })
    }

    /// The model layout and settings.
    pub fn layout(&self) -> &ModelLayout {
        &self.layout
    }

    /// The device the momentum lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The momentum of tensor `i`, `[rows, cols]`.
    pub fn momentum(&self, i: usize) -> Option<&Tensor<2>> {
        self.deltas.get(i)
    }

    /// Restores the momentum of tensor `i` (`[rows, cols]`, on this device) from a checkpoint.
    pub fn set_momentum(&mut self, i: usize, delta: Tensor<2>) -> Result<(), GpuError> {
        let expected = self.deltas.len();
        let Some(t) = self.layout.tensors().get(i) else {
            return Err(StepError::TensorCount {
                expected,
                got: i + 1,
            }
            .into());
        };
        self.check_tensor(i, t, &delta)?;
        self.deltas[i] = delta;
        Ok(())
    }

    /// A gradient or parameter must have the tensor's matrix shape and live on our device.
    fn check_tensor(&self, tensor: usize, t: &TensorLayout, x: &Tensor<2>) -> Result<(), GpuError> {
        if x.dims() != matrix_shape(t) {
            return Err(GpuError::Shape {
                tensor,
                expected: matrix_shape(t),
                got: x.dims().to_vec(),
            });
        }
        if x.device() != self.device {
            return Err(GpuError::WrongDevice { tensor });
        }
        Ok(())
    }

    /// Whether tensor `i`'s step runs the fused WGSL kernel.
    pub fn uses_wgsl(&self, i: usize) -> bool {
        self.wgsl.get(i).copied().unwrap_or(false)
    }

    /// One DeMo step on gradients given in each tensor's `[rows, cols]` view
    /// (see [`matrix_shape`]), sending `options.topk` coefficients per chunk.
    /// Only the selected coefficients are read back. On error the momentum is
    /// unchanged.
    pub fn step(
        &mut self,
        grads: &[Tensor<2>],
        lr: f32,
        options: StepOptions,
    ) -> Result<OutgoingUpdate, GpuError> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(StepError::LearningRate(lr).into());
        }
        let tensors = self.layout.tensors();
        if grads.len() != tensors.len() {
            return Err(StepError::TensorCount {
                expected: tensors.len(),
                got: grads.len(),
            }
            .into());
        }
        for (tensor, (t, g)) in tensors.iter().zip(grads).enumerate() {
            self.check_tensor(tensor, t, g)?;
        }
        let StepOptions { topk } = options;
        let DistroConfig { decay, values, .. } = *self.layout.config();
        let mut new_deltas = Vec::with_capacity(tensors.len());
        let mut sent = Vec::with_capacity(tensors.len());
        for (i, (t, g)) in tensors.iter().zip(grads).enumerate() {
            let k = t.grid.clamp_topk(topk);
            let (mr, mc) = &self.bases[i];
            let out = if self.uses_wgsl(i) {
                wgsl::compress_step(&self.deltas[i], g, mr, mc, &t.grid, k, decay, lr)?
            } else {
                burn_ops::compress_step(&self.deltas[i], g, mr, mc, &t.grid, k, decay, lr)
            };
            let sparse = out.read(i, t, k)?;
            new_deltas.push(out.delta);
            sent.push(sparse.quantized(values));
        }
        // Commit only once every tensor succeeded.
        self.deltas = new_deltas;
        Ok(OutgoingUpdate {
            values,
            tensors: sent,
        })
    }

    /// Applies the round's accepted updates to `params` (each in its `[rows,
    /// cols]` view), with the same bits as [`crate::DistroOptimizer::apply`].
    pub fn apply(
        &self,
        params: &mut [Tensor<2>],
        updates: &[IncomingUpdate],
        lr: f32,
    ) -> Result<ApplyReport, GpuError> {
        let merged = self.layout.merge(updates, lr)?;
        self.layout
            .check_params(params.iter().map(|p| p.shape().num_elements()))?;
        for (tensor, (t, p)) in self.layout.tensors().iter().zip(params.iter()).enumerate() {
            self.check_tensor(tensor, t, p)?;
        }
        let keep = decay_factor(lr, self.layout.config().weight_decay);
        let mut updated = Vec::with_capacity(params.len());
        let mut tie_breaks = 0;
        for (i, (t, m)) in self.layout.tensors().iter().zip(&merged).enumerate() {
            let thresholds = sign_thresholds(m, &t.transform);
            let (mr, mc) = &self.bases[i];
            let decoded = if self.uses_wgsl(i) {
                wgsl::decode_signs(m, &thresholds, mr, mc, &self.device)?
            } else {
                burn_ops::decode_signs(m, &thresholds, mr, mc, &self.device)?
            };
            let (signs, unsure) = decoded;
            tie_breaks += unsure.len();
            let signs = patch_signs(signs, m, t, &unsure, &self.device);
            updated.push(apply_signs(params[i].clone(), signs, lr, keep));
        }
        for (p, u) in params.iter_mut().zip(updated) {
            *p = u;
        }
        Ok(ApplyReport {
            updates: updates.len(),
            tie_breaks,
        })
    }
}

/// Times both step implementations once per chunk shape on this device (a
/// 64-chunk probe, second run of each so shader compilation is excluded) and
/// remembers whether the fused kernel won. Which is faster depends on the
/// adapter: on Mesa's lavapipe Burn's tuned matmuls beat the fused kernel.
fn wgsl_is_faster(device: &Device, grid: &crate::ChunkGrid) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static CHOICES: Mutex<Option<HashMap<(usize, usize), bool>>> = Mutex::new(None);
    let key = (grid.chunk_rows, grid.chunk_cols);
    let mut choices = CHOICES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(&wgsl) = choices.get_or_insert_with(HashMap::new).get(&key) {
        return wgsl;
    }
    let probe = crate::ChunkGrid::with_chunks(&[8 * key.0, 8 * key.1], key.0, key.1);
    let Some(probe) = probe else { return false };
    let shape = [probe.rows, probe.cols];
    let t = TensorLayout {
        shape: shape.to_vec(),
        grid: probe,
        transform: crate::dct::BlockTransform::new(
            &crate::dct::BasisCache::default(),
            key.0,
            key.1,
        ),
    };
    let basis = |b: &crate::dct::DctBasis| {
        Tensor::<2>::from_data(TensorData::new(b.forward.clone(), [b.n, b.n]), device)
    };
    let (mr, mc) = (
        basis(t.transform.row_basis()),
        basis(t.transform.col_basis()),
    );
    let grad: Vec<f32> = (0..probe.numel())
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3)
        .collect();
    let grad = Tensor::<2>::from_data(TensorData::new(grad, shape), device);
    let delta = Tensor::<2>::zeros(shape, device);
    let k = probe.clamp_topk(32);
    let time = |fused: bool| -> Option<Duration> {
        let mut best = None;
        for _ in 0..2 {
            let start = Instant::now();
            let out = if fused {
                wgsl::compress_step(&delta, &grad, &mr, &mc, &probe, k, 0.9, 1e-3).ok()?
            } else {
                burn_ops::compress_step(&delta, &grad, &mr, &mc, &probe, k, 0.9, 1e-3)
            };
            out.read(0, &t, k).ok()?;
            best = Some(start.elapsed());
        }
        best
    };
    let wgsl = match (time(true), time(false)) {
        (Some(fused), Some(ops)) => fused < ops,
        _ => false,
    };
    choices.get_or_insert_with(HashMap::new).insert(key, wgsl);
    wgsl
}

/// What a compress kernel leaves on the device.
pub(crate) struct StepOutput {
    /// New momentum, `[rows, cols]`.
    pub delta: Tensor<2>,
    /// Selected positions per chunk, `[num_chunks, k]` (any order within a chunk).
    pub indices: Tensor<2, Int>,
    /// Their coefficients, same layout.
    pub values: Tensor<2>,
}

impl StepOutput {
    /// Reads the (small) selection of model tensor `tensor` back and puts each
    /// chunk in ascending index order.
    fn read(&self, tensor: usize, t: &TensorLayout, k: usize) -> Result<SparseTensor, GpuError> {
        let idx = self.indices.clone().try_into_vec_as::<i64>()?;
        let vals = self.values.clone().try_into_vec_as::<f32>()?;
        let chunks = t.grid.num_chunks();
        if idx.len() != chunks * k || vals.len() != chunks * k {
            return Err(GpuError::SelectionSize {
                tensor,
                expected: chunks * k,
                indices: idx.len(),
                values: vals.len(),
            });
        }
        if vals.iter().any(|v| !v.is_finite()) {
            return Err(GpuError::NonFinite { tensor });
        }
        let mut indices = Vec::with_capacity(chunks * k);
        let mut values = Vec::with_capacity(chunks * k);
        let mut order: Vec<usize> = Vec::with_capacity(k);
        for c in 0..chunks {
            let (ci, cv) = (&idx[c * k..(c + 1) * k], &vals[c * k..(c + 1) * k]);
            order.clear();
            order.extend(0..k);
            order.sort_unstable_by_key(|&j| ci[j]);
            for &j in &order {
                indices.push(u32::try_from(ci[j]).map_err(|_| GpuError::SelectionIndex {
                    tensor,
                    index: ci[j],
                })?);
                values.push(cv[j]);
            }
        }
        let sparse = SparseTensor {
            shape: t.shape.clone(),
            grid: t.grid,
            k,
            offsets: (0..=chunks).map(|c| (c * k) as u32).collect(),
            indices,
            values,
        };
        sparse
            .validate()
            .map_err(|source| GpuError::Selection { tensor, source })?;
        Ok(sparse)
    }
}

/// Overwrites the uncertain elements (flat offsets into the tensor) with their
/// exact signs, computed on the host.
fn patch_signs(
    signs: Tensor<2>,
    merged: &SparseTensor,
    t: &TensorLayout,
    unsure: &[u32],
    device: &Device,
) -> Tensor<2> {
    if unsure.is_empty() {
        return signs;
    }
    let exact = resolve_offsets(merged, &t.transform, unsure);
    let [rows, cols] = matrix_shape(t);
    let at: Vec<i64> = unsure.iter().map(|&o| i64::from(o)).collect();
    let n = at.len();
    let at = Tensor::<1, Int>::from_data(TensorData::new(at, [n]), device);
    let exact = Tensor::<1>::from_data(TensorData::new(exact, [n]), device);
    signs
        .reshape([rows * cols])
        .scatter(0, at, exact, burn::tensor::IndexingUpdateOp::Assign)
        .reshape([rows, cols])
}

/// `p = flush(p * keep)` (when decaying), then `p = flush(p - lr * s)`: two
/// correctly rounded elementwise operations, subnormals to +0, as on the CPU.
fn apply_signs(p: Tensor<2>, signs: Tensor<2>, lr: f32, keep: Option<f32>) -> Tensor<2> {
    let p = match keep {
        Some(keep) => flush(p.mul_scalar(keep)),
        None => p,
    };
    flush(p.sub(signs.mul_scalar(lr)))
}

fn flush(x: Tensor<2>) -> Tensor<2> {
    let tiny = x.clone().abs().lower_elem(f32::MIN_POSITIVE);
    x.mask_fill(tiny, 0.0)
}

/// `[rows, cols]` to `[num_chunks, chunk_rows, chunk_cols]`, chunks row-major.
pub(crate) fn to_blocks(x: Tensor<2>, g: &crate::ChunkGrid) -> Tensor<3> {
    x.reshape([
        g.chunks_down(),
        g.chunk_rows,
        g.chunks_across(),
        g.chunk_cols,
    ])
    .swap_dims(1, 2)
    .reshape([g.num_chunks(), g.chunk_rows, g.chunk_cols])
}

/// Inverse of [`to_blocks`].
pub(crate) fn from_blocks(x: Tensor<3>, g: &crate::ChunkGrid) -> Tensor<2> {
    x.reshape([
        g.chunks_down(),
        g.chunks_across(),
        g.chunk_rows,
        g.chunk_cols,
    ])
    .swap_dims(1, 2)
    .reshape([g.rows, g.cols])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::compress;
    use crate::{DistroOptimizer, ValueEncoding, weights_digest};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// The wgpu device, or `None` (test skipped) where the machine has no
    /// adapter, unless `STARLING_REQUIRE_GPU` is set, as CI does.
    fn gpu() -> Option<Device> {
        match wgpu_device() {
            Ok(d) => Some(d),
            Err(e) => {
                assert!(std::env::var_os("STARLING_REQUIRE_GPU").is_none(), "{e}");
                eprintln!("skipping GPU test: {e}");
                None
            }
        }
    }

    #[allow(deprecated)]
    fn cpu_backend() -> Device {
        Device::ndarray()
    }

    fn shapes() -> Vec<Vec<usize>> {
        vec![vec![128, 192], vec![96], vec![4, 6, 64], vec![67, 5]]
    }

    fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    fn upload(v: &[f32], t: &TensorLayout, device: &Device) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), matrix_shape(t)), device)
    }

    fn read(t: &Tensor<2>) -> Vec<f32> {
        t.clone().try_into_vec_as::<f32>().expect("read back")
    }

    /// Runs two steps on the CPU optimizer and on `device` with `path`, and
    /// checks the selections (sets equal except near-ties), values and momentum.
    fn step_matches_cpu(device: &Device, path: KernelPath) {
        let config = DistroConfig {
            topk: 8,
            decay: 0.9,
            values: ValueEncoding::F32,
            ..DistroConfig::default()
        };
        let mut cpu = DistroOptimizer::new(&shapes(), config);
        let mut gpu = GpuDistro::new(&shapes(), config, device, path).expect("gpu optimizer");
        let mut rng = StdRng::seed_from_u64(3);
        for step in 0..2 {
            let grads: Vec<Vec<f32>> = shapes()
                .iter()
                .map(|s| random(&mut rng, s.iter().product(), 1.0))
                .collect();
            // The CPU momentum before feedback, to judge near-ties.
            let before: Vec<Vec<f32>> = (0..grads.len())
                .map(|i| {
                    let m = cpu.momentum(i).expect("momentum");
                    m.iter()
                        .zip(&grads[i])
                        .map(|(d, g)| 0.9 * d + 0.01 * g)
                        .collect()
                })
                .collect();
            let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            let want = cpu
                .step(&refs, 0.01, config.step_options())
                .expect("cpu step");
            let layout = gpu.layout().clone();
            let dev_grads: Vec<Tensor<2>> = layout
                .tensors()
                .iter()
                .zip(&grads)
                .map(|(t, g)| upload(g, t, device))
                .collect();
            let got = gpu
                .step(&dev_grads, 0.01, config.step_options())
                .expect("gpu step");
            for (i, t) in layout.tensors().iter().enumerate() {
                let (w, g) = (&want.tensors[i], &got.tensors[i]);
                let all = compress(&before[i], &t.shape, usize::MAX, config.chunk)
                    .expect("all coefficients");
                let gpu_delta = read(gpu.momentum(i).expect("momentum"));
                let cpu_delta = cpu.momentum(i).expect("momentum");
                for c in 0..t.grid.num_chunks() {
                    let (wi, wv) = w.chunk(c);
                    let (gi, gv) = g.chunk(c);
                    let (_, coeffs) = all.chunk(c);
                    let scale = coeffs.iter().fold(0f32, |a, v| a.max(v.abs()));
                    if wi == gi {
                        for (a, b) in wv.iter().zip(gv) {
                            assert!(
                                (a - b).abs() <= 1e-4 * scale,
                                "step {step} tensor {i} chunk {c}: {a} vs {b}"
                            );
                        }
                        for r in 0..t.grid.chunk_rows {
                            let o = t.grid.element_offset(c, r, 0);
                            for j in o..o + t.grid.chunk_cols {
                                let (a, b) = (cpu_delta[j], gpu_delta[j]);
                                assert!(
                                    (a - b).abs() <= 1e-4 * scale + 1e-7,
                                    "momentum {i}/{j}: {a} vs {b}"
                                );
                            }
                        }
                    } else {
                        // A different choice is only allowed between near-equal magnitudes.
                        let mut mags: Vec<f32> = coeffs.iter().map(|v| v.abs()).collect();
                        mags.sort_by(|a, b| b.total_cmp(a));
                        let kth = mags[wi.len() - 1];
                        for &x in wi
                            .iter()
                            .filter(|x| !gi.contains(x))
                            .chain(gi.iter().filter(|x| !wi.contains(x)))
                        {
                            let m = coeffs[x as usize].abs();
                            assert!(
                                (m - kth).abs() <= 1e-4 * scale,
                                "tensor {i} chunk {c}: {x} is no near-tie"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Three peers' updates applied on the CPU and on `device`: identical bits.
    fn apply_matches_cpu(device: &Device, path: KernelPath, values: ValueEncoding) {
        let config = DistroConfig {
            topk: 16,
            values,
            weight_decay: 0.1,
            ..DistroConfig::default()
        };
        let mut rng = StdRng::seed_from_u64(11);
        let init: Vec<Vec<f32>> = shapes()
            .iter()
            .map(|s| random(&mut rng, s.iter().product(), 0.1))
            .collect();
        let mut peers: Vec<DistroOptimizer> = (0..3)
            .map(|_| DistroOptimizer::new(&shapes(), config))
            .collect();
        let replica = DistroOptimizer::new(&shapes(), config);
        let gpu = GpuDistro::new(&shapes(), config, device, path).expect("gpu optimizer");
        let mut cpu_w = init.clone();
        let mut gpu_w: Vec<Tensor<2>> = gpu
            .layout()
            .tensors()
            .iter()
            .zip(&init)
            .map(|(t, v)| upload(v, t, device))
            .collect();
        let mut tie_breaks = 0;
        for round in 0..3 {
            let updates: Vec<IncomingUpdate> = peers
                .iter_mut()
                .enumerate()
                .map(|(p, opt)| {
                    let grads: Vec<Vec<f32>> = shapes()
                        .iter()
                        .map(|s| random(&mut rng, s.iter().product(), 1.0))
                        .collect();
                    let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
                    opt.step(&refs, 0.01, config.step_options())
                        .expect("step")
                        .into_incoming([p as u8 + 1; 32])
                })
                .collect();
            let mut refs: Vec<&mut [f32]> = cpu_w.iter_mut().map(Vec::as_mut_slice).collect();
            replica.apply(&mut refs, &updates, 0.01).expect("cpu apply");
            tie_breaks += gpu
                .apply(&mut gpu_w, &updates, 0.01)
                .expect("gpu apply")
                .tie_breaks;
            let back: Vec<Vec<f32>> = gpu_w.iter().map(read).collect();
            assert_eq!(
                weights_digest(back.iter().map(Vec::as_slice)),
                weights_digest(cpu_w.iter().map(Vec::as_slice)),
                "round {round}: GPU and CPU weights differ"
            );
        }
        eprintln!("{path:?} {values:?}: {tie_breaks} elements settled on the host");
    }

    #[test]
    fn burn_ops_on_the_cpu_backend_match_the_reference() {
        step_matches_cpu(&cpu_backend(), KernelPath::BurnOps);
        apply_matches_cpu(&cpu_backend(), KernelPath::BurnOps, ValueEncoding::Sign);
    }

    #[test]
    fn wgpu_paths_match_the_reference() {
        let Some(device) = gpu() else { return };
        for path in [KernelPath::Wgsl, KernelPath::BurnOps] {
            step_matches_cpu(&device, path);
            apply_matches_cpu(&device, path, ValueEncoding::Sign);
            apply_matches_cpu(&device, path, ValueEncoding::F32);
        }
        // Auto times both on this adapter and must still match the reference.
        step_matches_cpu(&device, KernelPath::Auto);
        // All-zero chunks tie everywhere: the fused kernel must take the lowest indices, as the CPU does.
        let config = DistroConfig {
            topk: 5,
            values: ValueEncoding::F32,
            ..DistroConfig::default()
        };
        let mut fused =
            GpuDistro::new(&[vec![64, 128]], config, &device, KernelPath::Wgsl).expect("wgsl");
        let zeros = Tensor::<2>::zeros([64, 128], &device);
        let sent = fused
            .step(&[zeros], 0.01, config.step_options())
            .expect("step");
        assert_eq!(sent.tensors[0].indices, vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    }

    /// Runs in a child process whose graphics drivers are hidden (see below).
    #[test]
    #[ignore = "run by no_adapter_is_a_clear_error_not_a_crash in a child process"]
    fn child_without_adapters() {
        let err = wgpu_device().expect_err("the drivers are hidden, so no adapter should open");
        let msg = err.to_string();
        assert!(
            msg.contains("no usable GPU adapter") && msg.contains("mesa-vulkan-drivers"),
            "{msg}"
        );
        // The CPU optimizer needs no adapter.
        let config = DistroConfig::default();
        let mut opt = DistroOptimizer::new(&[vec![64, 64]], config);
        opt.step(&[&[0.5; 4096]], 0.01, config.step_options())
            .expect("cpu step");
    }

    #[test]
    fn no_adapter_is_a_clear_error_not_a_crash() {
        // Hide the Vulkan ICDs and the EGL vendors (GL) from a child test process.
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--ignored",
                "--exact",
                "gpu::tests::child_without_adapters",
                "--nocapture",
            ])
            .env("VK_ICD_FILENAMES", "/nonexistent.json")
            .env("VK_DRIVER_FILES", "/nonexistent.json")
            .env("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent.json")
            .env("LIBGL_ALWAYS_SOFTWARE", "0")
            .output()
            .expect("run child");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    #[test]
    fn bad_gradients_leave_the_momentum_untouched() {
        let device = cpu_backend();
        let mut gpu = GpuDistro::new(
            &[vec![8, 8]],
            DistroConfig::default(),
            &device,
            KernelPath::BurnOps,
        )
        .expect("new");
        let t = gpu.layout().tensors()[0].clone();
        let options = DistroConfig::default().step_options();
        let mut bad = vec![1.0f32; 64];
        bad[5] = f32::NAN;
        assert!(matches!(
            gpu.step(&[upload(&bad, &t, &device)], 0.1, options),
            Err(GpuError::NonFinite { tensor: 0 })
        ));
        assert!(read(gpu.momentum(0).expect("m")).iter().all(|&v| v == 0.0));
        let wrong = Tensor::<2>::zeros([4, 16], &device);
        assert!(matches!(
            gpu.step(&[wrong], 0.1, options),
            Err(GpuError::Shape { .. })
        ));
        assert!(matches!(
            GpuDistro::new(
                &[vec![8, 8]],
                DistroConfig::default(),
                &device,
                KernelPath::Wgsl
            ),
            Err(GpuError::WgslUnavailable(_))
        ));
    }
}
