// DeMo compression of one tensor, fused: one workgroup per chunk does
//   delta = decay*delta + lr*grad          (momentum, written to a new buffer)
//   C     = Mr^T X Mc                      (orthonormal 2-D DCT-II of the chunk)
//   top-k of |C|, ties to the lower index  (4-bit radix select on the float bits)
//   write (index, value) ascending         (compaction by workgroup prefix sums)
//   delta -= Mr Csel Mc^T                  (error feedback)
//
// Chunk constants CR, CC (chunk rows / cols), E = CR*CC <= 4096 and PER, and
// offset_of, come from distro_common.wgsl. WG = 256
// threads, PER = ceil(E / WG) elements per thread. Thread `lid` owns the
// contiguous elements [lid*PER, lid*PER + PER) of the chunk (row-major), so
// prefix sums in index order need one workgroup scan.

// Every buffer is declared read_write, even those only read: cubecl sub-allocates
// tensors from shared wgpu buffers, and wgpu refuses one buffer bound both
// read-only and read-write in a dispatch.

struct Params {
    cols: u32,           // columns of the tensor's matrix view
    chunks_across: u32,  // chunks per band of CR rows
    num_chunks: u32,
    k: u32,              // entries per chunk, 1..=E
    decay: f32,
    lr: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> delta_in: array<f32>;
@group(0) @binding(1) var<storage, read_write> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> basis_r: array<f32>;   // CR x CR, [position][frequency]
@group(0) @binding(3) var<storage, read_write> basis_c: array<f32>;   // CC x CC
@group(0) @binding(4) var<storage, read_write> delta_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_idx: array<u32>;
@group(0) @binding(6) var<storage, read_write> out_val: array<f32>;
@group(0) @binding(7) var<uniform> params: Params;

const WG: u32 = 256u;

var<workgroup> blk: array<f32, {{ e }}>;
var<workgroup> scan: array<u32, 256>;
var<workgroup> hist: array<atomic<u32>, 16>;

// Exclusive prefix sum of `v` over the workgroup; also returns the total.
fn exclusive_scan(lid: u32, v: u32) -> vec2<u32> {
    scan[lid] = v;
    workgroupBarrier();
    for (var off = 1u; off < WG; off = off * 2u) {
        var add = 0u;
        if (lid >= off) {
            add = scan[lid - off];
        }
        workgroupBarrier();
        scan[lid] = scan[lid] + add;
        workgroupBarrier();
    }
    let inclusive = scan[lid];
    let total = scan[WG - 1u];
    workgroupBarrier();
    return vec2<u32>(inclusive - v, total);
}

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
    var x: array<f32, {{ per }}>;   // updated momentum of my elements
    var c: array<f32, {{ per }}>;   // work registers

    // 1. Momentum update, into registers and shared memory.
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            let g = offset_of(chunk, e);
            let d = params.decay * delta_in[g] + params.lr * grad[g];
            x[t] = d;
            blk[e] = d;
        }
    }
    workgroupBarrier();

    // 2. T = X Mc.
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            c[t] = times_mc(e);
        }
    }
    workgroupBarrier();
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            blk[e] = c[t];
        }
    }
    workgroupBarrier();

    // 3. C = Mr^T T, kept in registers.
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            c[t] = mr_t_times(e);
        }
    }

    // 4. Radix select, 4 bits a pass from the top: tau = the k-th largest key,
    //    keys = bits of |C| (non-negative floats order like their bit patterns).
    //    Every thread reads the 16-bin histogram and makes the same choice, so a
    //    pass costs three barriers.
    let k = params.k;
    var tau = 0u;        // the high bits decided so far
    var decided = 0u;    // mask of those bits
    var remaining = k;   // how many of the keys matching `tau` on `decided` are still to take
    for (var shift = 28i; shift >= 0i; shift = shift - 4i) {
        let s = u32(shift);
        if (lid < 16u) {
            atomicStore(&hist[lid], 0u);
        }
        workgroupBarrier();
        for (var t = 0u; t < PER; t = t + 1u) {
            if (first + t < E) {
                let key = bitcast<u32>(abs(c[t]));
                if ((key & decided) == tau) {
                    atomicAdd(&hist[(key >> s) & 15u], 1u);
                }
            }
        }
        workgroupBarrier();
        var seen = 0u;
        var digit = 0u;
        var before = 0u;
        var found = false;
        for (var b = 15i; b >= 0i; b = b - 1i) {
            let h = atomicLoad(&hist[b]);
            if (!found && seen + h >= remaining) {
                digit = u32(b);
                before = seen;
                found = true;
            }
            seen = seen + h;
        }
        remaining = remaining - before;
        tau = tau | (digit << s);
        decided = decided | (15u << s);
        workgroupBarrier();
    }

    // 5. Keys above tau are in; of the keys equal to tau, the lowest indices
    //    fill up to k. One scan carries both counts (above: low 16 bits).
    var above = 0u;
    var equal = 0u;
    for (var t = 0u; t < PER; t = t + 1u) {
        if (first + t < E) {
            let key = bitcast<u32>(abs(c[t]));
            above = above + select(0u, 1u, key > tau);
            equal = equal + select(0u, 1u, key == tau);
        }
    }
    let counts = exclusive_scan(lid, above | (equal << 16u));
    let need = k - (counts.y & 0xFFFFu);
    var tie_rank = counts.x >> 16u;
    var selected = 0u;
    var flags = 0u;   // bit t: element first+t is selected (PER <= 16)
    for (var t = 0u; t < PER; t = t + 1u) {
        if (first + t < E) {
            let key = bitcast<u32>(abs(c[t]));
            var take = key > tau;
            if (key == tau) {
                take = tie_rank < need;
                tie_rank = tie_rank + 1u;
            }
            if (take) {
                flags = flags | (1u << t);
                selected = selected + 1u;
            }
        }
    }
    var pos = exclusive_scan(lid, selected).x;

    // 6. Write the selected entries in index order and keep only them in shared memory.
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            if ((flags & (1u << t)) != 0u) {
                out_idx[chunk * k + pos] = e;
                out_val[chunk * k + pos] = c[t];
                pos = pos + 1u;
                blk[e] = c[t];
            } else {
                blk[e] = 0.0;
            }
        }
    }
    workgroupBarrier();

    // 7. Error feedback: U = Csel Mc^T, then X' = Mr U, delta = x - X'.
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            c[t] = times_mc_t(e);
        }
    }
    workgroupBarrier();
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            blk[e] = c[t];
        }
    }
    workgroupBarrier();
    for (var t = 0u; t < PER; t = t + 1u) {
        let e = first + t;
        if (e < E) {
            delta_out[offset_of(chunk, e)] = x[t] - mr_times(e);
        }
    }
}
