//! The fused WGSL kernels of `shaders/`, launched on the wgpu buffers behind
//! Burn tensors (no host copies): `distro_compress.wgsl` runs a whole DeMo step
//! of one chunk per workgroup, `distro_decode_sign.wgsl` decodes a merged
//! update and certifies its signs.
//!
//! A chunk must fit one workgroup's shared memory (`chunk_rows * chunk_cols <=
//! 4096` f32, i.e. up to 64x64, plus 1 KiB of scan space); [`fits`] checks
//! this against the adapter's limit and the caller falls back to Burn
//! operations otherwise.

use burn::backend::Wgpu;
use burn::backend::wgpu::{
    CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cubecl::prelude::KernelId;
use cubecl::server::{KernelArguments, MetadataBindingInfo};
use cubecl::{CubeCount, CubeDim};

use super::burn_ops::round_up;
use super::{GpuError, StepOutput};
use crate::ChunkGrid;
use crate::sparse::SparseTensor;

const COMMON_WGSL: &str = include_str!("../../../../shaders/distro_common.wgsl");
const COMPRESS_WGSL: &str = include_str!("../../../../shaders/distro_compress.wgsl");
const DECODE_WGSL: &str = include_str!("../../../../shaders/distro_decode_sign.wgsl");
const WORKGROUP: u32 = 256;
const MAX_CHUNK_ELEMS: usize = 4096;

/// A kernel text specialised for one chunk shape.
#[derive(Clone, Copy, Debug)]
struct ChunkKernel {
    source: &'static str,
    name: &'static str,
    rows: u32,
    cols: u32,
}

impl KernelSource for ChunkKernel {
    fn source(&self) -> SourceTemplate {
        let e = self.rows * self.cols;
        SourceTemplate::new(self.source)
            .add_template(COMMON_WGSL)
            .register("cr", self.rows.to_string())
            .register("cc", self.cols.to_string())
            .register("e", e.to_string())
            .register("per", e.div_ceil(WORKGROUP).to_string())
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.name, self.rows, self.cols))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// Shared memory the kernels need for chunks of `grid`, in bytes.
fn shared_bytes(grid: &ChunkGrid) -> usize {
    grid.chunk_elems() * 4 + WORKGROUP as usize * 4 + 16 * 4
}

/// Whether the fused kernels can run chunks of `grid` on `device`.
/// `shared_memory` is the adapter's limit from [`shared_memory_limit`].
pub fn fits(shared_memory: usize, grid: &ChunkGrid) -> bool {
    grid.chunk_elems() <= MAX_CHUNK_ELEMS
        && grid.numel() <= u32::MAX as usize
        && shared_memory >= shared_bytes(grid)
}

/// Bytes of workgroup shared memory the wgpu adapter behind `device` offers
/// (0 where `device` is not a wgpu device).
pub fn shared_memory_limit(device: &Device) -> usize {
    Tensor::<1>::zeros([1], device)
        .try_into_primitive::<Wgpu>()
        .map(|probe| probe.client.properties().hardware.max_shared_memory_size)
        .unwrap_or(0)
}

fn primitive<const D: usize>(t: &Tensor<D>) -> Result<CubeTensor, GpuError> {
    t.clone()
        .try_into_primitive::<Wgpu>()
        .map(into_contiguous)
        .map_err(GpuError::NotWgpu)
}

fn int_primitive<const D: usize>(t: &Tensor<D, Int>) -> Result<CubeTensor, GpuError> {
    t.clone()
        .try_into_primitive::<Wgpu>()
        .map(into_contiguous)
        .map_err(GpuError::NotWgpu)
}

/// Workgroup counts for `groups` workgroups, tiled into 2-D past wgpu's 65535 per dimension.
fn grid_of(groups: usize) -> CubeCount {
    let groups = groups.max(1) as u32;
    if groups <= 65_535 {
        CubeCount::Static(groups, 1, 1)
    } else {
        CubeCount::Static(65_535, groups.div_ceil(65_535), 1)
    }
}

/// Packs 32-bit words into the u64 words cubecl's info binding takes (even count).
fn words(w: &[u32]) -> Vec<u64> {
    w.chunks(2)
        .map(|p| u64::from(p[0]) | (u64::from(p.get(1).copied().unwrap_or(0)) << 32))
        .chain(std::iter::repeat(0))
        .take(w.len().div_ceil(4) * 2)
        .collect()
}

fn empty(like: &CubeTensor, shape: Vec<usize>, dtype: DType) -> CubeTensor {
    let bytes = shape.iter().product::<usize>().max(1) * 4;
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        like.client.empty(bytes),
        dtype,
    )
}

fn u32_of(v: usize, what: &str) -> Result<u32, GpuError> {
    u32::try_from(v)
        .map_err(|_| GpuError::WgslUnavailable(format!("{what} {v} does not fit 32 bits")))
}

/// Launches `source` (specialised for `grid`'s chunk shape) with one
/// workgroup per chunk, `buffers` bound in order and `params` as the uniform.
fn launch(
    on: &CubeTensor,
    source: &'static str,
    name: &'static str,
    grid: &ChunkGrid,
    buffers: &[&CubeTensor],
    params: Vec<u64>,
) -> Result<(), GpuError> {
    let kernel = ChunkKernel {
        source,
        name,
        rows: u32_of(grid.chunk_rows, "chunk rows")?,
        cols: u32_of(grid.chunk_cols, "chunk cols")?,
    };
    let args = KernelArguments::new()
        .with_buffers(buffers.iter().map(|b| b.handle.clone().binding()).collect())
        .with_info(MetadataBindingInfo::custom(params));
    on.client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(WORKGROUP))),
        grid_of(grid.num_chunks()),
        args,
    );
    Ok(())
}

/// The fused DeMo step of one tensor (see `shaders/distro_compress.wgsl`).
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
) -> Result<StepOutput, GpuError> {
    let (d, gr, mr, mc) = (
        primitive(delta)?,
        primitive(grad)?,
        primitive(basis_r)?,
        primitive(basis_c)?,
    );
    let n = g.num_chunks();
    let new_delta = empty(&d, vec![g.rows, g.cols], DType::F32);
    let idx = empty(&d, vec![n, k], DType::I32);
    let val = empty(&d, vec![n, k], DType::F32);
    if n > 0 {
        let params = words(&[
            u32_of(g.cols, "columns")?,
            u32_of(g.chunks_across(), "chunks")?,
            u32_of(n, "chunks")?,
            u32_of(k, "top-k")?,
            decay.to_bits(),
            lr.to_bits(),
            0,
            0,
        ]);
        launch(
            &d,
            COMPRESS_WGSL,
            "compress",
            g,
            &[&d, &gr, &mr, &mc, &new_delta, &idx, &val],
            params,
        )?;
    }
    Ok(StepOutput {
        delta: Tensor::from_primitive::<Wgpu>(new_delta),
        indices: Tensor::from_primitive::<Wgpu>(idx),
        values: Tensor::from_primitive::<Wgpu>(val),
    })
}

/// Decode and certified sign of a merged update (see `shaders/distro_decode_sign.wgsl`).
/// Returns the signs (`[rows, cols]`, 0 where uncertain) and the uncertain offsets.
pub(crate) fn decode_signs(
    merged: &SparseTensor,
    thresholds: &[f64],
    basis_r: &Tensor<2>,
    basis_c: &Tensor<2>,
    device: &Device,
) -> Result<(Tensor<2>, Vec<u32>), GpuError> {
    let g = merged.grid;
    let n = g.num_chunks();
    let ints = |v: Vec<i64>| {
        let len = v.len().max(1);
        let mut v = v;
        v.resize(len, 0);
        Tensor::<1, Int>::from_data(TensorData::new(v, [len]), device)
    };
    let floats = |v: Vec<f32>| {
        let len = v.len().max(1);
        let mut v = v;
        v.resize(len, 0.0);
        Tensor::<1>::from_data(TensorData::new(v, [len]), device)
    };
    let offsets = int_primitive(&ints(
        merged.offsets.iter().map(|&o| i64::from(o)).collect(),
    ))?;
    let idx = int_primitive(&ints(
        merged.indices.iter().map(|&i| i64::from(i)).collect(),
    ))?;
    let val = primitive(&floats(merged.values.clone()))?;
    let limits = primitive(&floats(thresholds.iter().map(|&t| round_up(t)).collect()))?;
    let (mr, mc) = (primitive(basis_r)?, primitive(basis_c)?);
    // Room for 1/64 of the elements to be uncertain; far more than the bound
    // allows in practice, and if exceeded the host decodes the tensor itself.
    let capacity = (g.numel() / 64).max(1024);
    let counter = int_primitive(&Tensor::<1, Int>::zeros([1], device))?;
    let unsure = empty(&mr, vec![capacity], DType::I32);
    let signs = empty(&mr, vec![g.rows, g.cols], DType::F32);
    if n > 0 {
        let params = words(&[
            u32_of(g.cols, "columns")?,
            u32_of(g.chunks_across(), "chunks")?,
            u32_of(n, "chunks")?,
            u32_of(capacity, "capacity")?,
        ]);
        launch(
            &mr,
            DECODE_WGSL,
            "decode_sign",
            &g,
            &[
                &offsets, &idx, &val, &limits, &mr, &mc, &signs, &counter, &unsure,
            ],
            params,
        )?;
    }
    let count = Tensor::<1, Int>::from_primitive::<Wgpu>(counter)
        .try_into_vec_as::<i64>()?
        .first()
        .copied()
        .unwrap_or(0) as usize;
    let signs = Tensor::<2>::from_primitive::<Wgpu>(signs);
    if count > capacity {
        // Too many to list: settle the whole tensor on the host, exactly as the CPU does.
        let t = crate::dct::BlockTransform::new(
            &crate::dct::BasisCache::default(),
            g.chunk_rows,
            g.chunk_cols,
        );
        let mut host = crate::compress::decode_dense(merged, &t);
        crate::sign::certify_signs(merged, &t, thresholds, &mut host);
        let all = Tensor::<2>::from_data(TensorData::new(host, [g.rows, g.cols]), device);
        return Ok((all, Vec::new()));
    }
    if count == 0 {
        return Ok((signs, Vec::new()));
    }
    let list = Tensor::<1, Int>::from_primitive::<Wgpu>(unsure)
        .narrow(0, 0, count)
        .try_into_vec_as::<i64>()?;
    Ok((signs, list.into_iter().map(|o| o as u32).collect()))
}
