// Decode of a round's merged update and certified sign, one workgroup per chunk:
//   X = Mr A Mc^T                (inverse 2-D DCT of the chunk's merged coefficients)
//   s = sign(X) where |X| > T    (T: the chunk's certification threshold, from the host)
//   otherwise s = 0 and the element's offset is appended to a list the host
//   resolves exactly (see crates/distro/src/sign.rs for why this makes every
//   peer agree to the bit).
//
// Chunk constants and offset_of: distro_common.wgsl.

// Every buffer is declared read_write, even those only read: cubecl sub-allocates
// tensors from shared wgpu buffers, and wgpu refuses one buffer bound both
// read-only and read-write in a dispatch.

struct Params {
    cols: u32,
    chunks_across: u32,
    num_chunks: u32,
    capacity: u32,      // length of `unsure`
}

@group(0) @binding(0) var<storage, read_write> offsets: array<u32>;     // num_chunks + 1
@group(0) @binding(1) var<storage, read_write> idx: array<u32>;
@group(0) @binding(2) var<storage, read_write> val: array<f32>;
@group(0) @binding(3) var<storage, read_write> threshold: array<f32>;   // per chunk, rounded up
@group(0) @binding(4) var<storage, read_write> basis_r: array<f32>;
@group(0) @binding(5) var<storage, read_write> basis_c: array<f32>;
@group(0) @binding(6) var<storage, read_write> signs: array<f32>;
@group(0) @binding(7) var<storage, read_write> unsure_count: array<atomic<u32>>;
@group(0) @binding(8) var<storage, read_write> unsure: array<u32>;
@group(0) @binding(9) var<uniform> params: Params;

var<workgroup> blk: array<f32, {{ e }}>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let chunk = wid.x + wid.y * nwg.x;
    if (chunk >= params.num_chunks) {
        return;
    }
    let first = lid * PER;
    var u: array<f32, {{ per }}>;
    for (var t = 0u; t < PER; t = t + 1u) {
        if (first + t < E) {
            blk[first + t] = 0.0;
        }
    }
    workgroupBarrier();
    let start = offsets[chunk];
    let end = offsets[chunk + 1u];
    for (var p = start + lid; p < end; p = p + 256u) {
        blk[idx[p]] = val[p];
    }
    workgroupBarrier();
    // U = A Mc^T
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            u[t] = times_mc_t(e);
        }
    }
    workgroupBarrier();
    for (var t = 0u; t < PER; t = t + 1u) {
        if (first + t < E) {
            blk[first + t] = u[t];
        }
    }
    workgroupBarrier();
    let limit = threshold[chunk];
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            let acc = mr_times(e);
            let g = offset_of(chunk, e);
            var s = 0.0;
            if (limit > 0.0) {
                if (abs(acc) > limit) {
                    s = sign(acc);
                } else {
                    let slot = atomicAdd(&unsure_count[0], 1u);
                    if (slot < params.capacity) {
                        unsure[slot] = g;
                    }
                }
            }
            signs[g] = s;
        }
    }
}
