//! Fuzzes the safetensors readers (sparse files, dense files, header-only
//! shapes): arbitrary bytes give a typed error or validated tensors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_distro::decompress;
use starling_distro::sparse_file::{read_dense, read_shapes, read_sparse};

fuzz_target!(|data: &[u8]| {
    let _ = read_shapes(data);
    let _ = read_dense(data);
    if let Ok((_, tensors)) = read_sparse(data) {
        for t in &tensors {
            if t.tensor.grid.numel() <= 1 << 16 {
                decompress(&[&t.tensor]).expect("a validated sparse tensor decodes");
            }
        }
    }
});
