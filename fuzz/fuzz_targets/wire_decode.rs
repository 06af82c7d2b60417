//! Fuzzes the update decoder: arbitrary bytes must give a typed error or a
//! valid update, never a panic or an allocation beyond what the input allows.
//! Inputs starting with an odd byte get a correct checksum appended (over the
//! rest), so mutations reach the parser instead of stopping at the CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_distro::wire::{DecodeLimits, TRAILER_BYTES, decode, encode};
use starling_distro::{OutgoingUpdate, aggregate, decompress};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        let mut b = rest.to_vec();
        b.extend_from_slice(&crc32(rest).to_le_bytes());
        b
    } else {
        rest.to_vec()
    };
    let limits = DecodeLimits {
        max_bytes: 1 << 20,
        ..DecodeLimits::default()
    };
    let Ok(update) = decode(&bytes, &limits) else {
        return;
    };
    // A decoded update re-encodes to the same bytes, and its tensors decode.
    let again = encode(
        &update.header,
        &OutgoingUpdate {
            values: update.values,
            tensors: update.tensors.clone(),
        },
    )
    .expect("a decoded update re-encodes");
    assert_eq!(again.len(), bytes.len());
    assert_eq!(&again[..again.len() - TRAILER_BYTES], &bytes[..bytes.len() - TRAILER_BYTES]);
    for t in &update.tensors {
        if t.grid.numel() <= 1 << 16 {
            aggregate(&[t, t]).expect("a valid tensor aggregates");
            decompress(&[t]).expect("a valid tensor decodes");
        }
    }
});

fn crc32(bytes: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE), as crc32fast computes it.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
