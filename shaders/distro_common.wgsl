
// ---- distro_common.wgsl: appended to every chunk kernel by gpu/wgsl.rs ----
// Chunk shape constants (filled per chunk shape) and the chunk-to-tensor
// offset map. Each kernel's `Params` must have `cols` and `chunks_across`.

const CR: u32 = {{ cr }}u;      // chunk rows
const CC: u32 = {{ cc }}u;      // chunk columns
const E: u32 = {{ e }}u;        // elements per chunk, <= 4096
const PER: u32 = {{ per }}u;    // elements per thread: ceil(E / 256)

// Offset in the row-major tensor of element `e` (row-major in the chunk) of chunk `chunk`.
fn offset_of(chunk: u32, e: u32) -> u32 {
    let by = chunk / params.chunks_across;
    let bx = chunk % params.chunks_across;
    return (by * CR + e / CC) * params.cols + bx * CC + e % CC;
}

// The four stages of the chunk DCT, for element `e = (row, col)` of the chunk
// held in `blk` (each kernel declares `blk`, `basis_r`, `basis_c`, the bases
// `[position][frequency]`). Forward: C = Mr^T (X Mc); inverse: X = Mr (C Mc^T).

// (X Mc)[i][b] = sum_j X[i][j] Mc[j][b]
fn times_mc(e: u32) -> f32 {
    let i = e / CC;
    let b = e % CC;
    var acc = 0.0;
    for (var j = 0u; j < CC; j = j + 1u) {
        acc = acc + blk[i * CC + j] * basis_c[j * CC + b];
    }
    return acc;
}

// (Mr^T T)[a][b] = sum_i Mr[i][a] T[i][b]
fn mr_t_times(e: u32) -> f32 {
    let a = e / CC;
    let b = e % CC;
    var acc = 0.0;
    for (var i = 0u; i < CR; i = i + 1u) {
        acc = acc + basis_r[i * CR + a] * blk[i * CC + b];
    }
    return acc;
}

// (C Mc^T)[a][j] = sum_b C[a][b] Mc[j][b]
fn times_mc_t(e: u32) -> f32 {
    let a = e / CC;
    let j = e % CC;
    var acc = 0.0;
    for (var b = 0u; b < CC; b = b + 1u) {
        acc = acc + blk[a * CC + b] * basis_c[j * CC + b];
    }
    return acc;
}

// (Mr U)[i][j] = sum_a Mr[i][a] U[a][j]
fn mr_times(e: u32) -> f32 {
    let i = e / CC;
    let j = e % CC;
    var acc = 0.0;
    for (var a = 0u; a < CR; a = a + 1u) {
        acc = acc + basis_r[i * CR + a] * blk[a * CC + j];
    }
    return acc;
}
