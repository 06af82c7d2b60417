//! Writes valid inputs for the fuzz targets into `corpus/<target>/`:
//! `cargo run --bin make_seeds` from `fuzz/`.

use starling_distro::sparse_file::{NamedSparse, write_sparse};
use starling_distro::wire::{UpdateHeader, encode};
use starling_distro::{OutgoingUpdate, ValueEncoding, compress};

fn main() -> std::io::Result<()> {
    let shapes: [&[usize]; 4] = [&[128, 192], &[96], &[4, 6, 64], &[67, 5]];
    std::fs::create_dir_all("corpus/wire_decode")?;
    std::fs::create_dir_all("corpus/sparse_file")?;
    for (n, values) in [ValueEncoding::Sign, ValueEncoding::Bf16, ValueEncoding::F32].into_iter().enumerate() {
        for (m, k) in [1usize, 4, 32].into_iter().enumerate() {
            let tensors: Vec<_> = shapes
                .iter()
                .map(|s| {
                    let len: usize = s.iter().product();
                    let d: Vec<f32> = (0..len).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.01).collect();
                    compress(&d, s, k, 64).expect("compress").quantized(values)
                })
                .collect();
            let header = UpdateHeader { run_id: [1; 16], round: 7, sender: [2; 32] };
            let update = OutgoingUpdate { values, tensors: tensors.clone() };
            let bytes = encode(&header, &update).expect("encode");
            // Mode byte 0: as is (checksum included).
            let mut seed = vec![0u8];
            seed.extend_from_slice(&bytes);
            std::fs::write(format!("corpus/wire_decode/seed-{n}-{m}"), seed)?;
            // Mode byte 1: without its checksum; the target appends a correct one.
            let mut seed = vec![1u8];
            seed.extend_from_slice(&bytes[..bytes.len() - 4]);
            std::fs::write(format!("corpus/wire_decode/seed-{n}-{m}-nocrc"), seed)?;
            let named: Vec<NamedSparse> = tensors
                .into_iter()
                .enumerate()
                .map(|(i, tensor)| NamedSparse { name: format!("t{i}"), tensor })
                .collect();
            std::fs::write(format!("corpus/sparse_file/seed-{n}-{m}"), write_sparse(&named, values).expect("write"))?;
        }
    }
    Ok(())
}
