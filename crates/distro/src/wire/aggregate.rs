//! The bytes of a round's aggregate: every accepted update merged into one.
//!
//! A volunteer used to download every accepted update of a round, so its
//! download grew with the member count. The coordinator now merges them
//! (scatter-mean per coefficient, senders in canonical order: exactly what
//! [`crate::ModelLayout::merge`] hands every apply path) and publishes one
//! blob, and every replica, the coordinator's included, applies that. Merging
//! a single already-merged tensor again divides each value by one, which is
//! exact in IEEE arithmetic, so the aggregate applies bit-identically to the
//! updates it was made from.
//!
//! Two things keep the blob small and bounded:
//! - **Indices**: a chunk lists its union of positions while that is cheaper
//!   than a bitmap of the chunk, and sends the bitmap after; a chunk never
//!   costs more than its count field plus one bit per coefficient, so the
//!   aggregate stops growing once the union saturates ([`max_len`]).
//! - **Values**: the mean of `n` sign values takes one of few values (2n+1
//!   when all `n` senders chose the coefficient), so a tensor may carry its
//!   distinct values once, as a sorted palette, and every entry the palette
//!   index in the fewest bits that number them. Each tensor takes the
//!   cheapest exact form of three: a palette, bf16 (when every value is one,
//!   as in a capped aggregate) or f32. The decoded bits are the encoded bits.
//!
//! Layout (integers little-endian):
//! ```text
//! header   magic "SAGG" | version u16 = 1 | flags u16 = 0
//!          run_id [u8;16] | round u64 | updates u32 | tensor_count u32        (40 bytes)
//! tensor   ndim u8 | dims u32 x ndim | chunk_rows u32 | chunk_cols u32
//!          values u8 (0 f32, 1 bf16, 2 palette)
//!          [palette_len u32 | palette f32 x palette_len (strictly ascending)]  (palette only)
//!          body_len u32 | body: for each chunk, LSB-first:
//!            count   bits_for(E) bits                 entries in the chunk (<= E)
//!            indices count x bits_for(E-1) bits, ascending, when that is < E bits;
//!                    otherwise an E-bit map (bit i: position i is present)
//!            values  count x (32 | 16 | bits_for(palette_len-1)) bits
//!          padded with zero bits to a whole byte
//! trailer  crc32 u32 of all bytes before it
//! ```

use super::{
    BitReader, BitWriter, DecodeError, DecodeLimits, EncodeError, Reader, TRAILER_BYTES, bits_for,
    check_crc, open_record, read_shape, write_shape,
};
use crate::chunk::ChunkGrid;
use crate::sparse::SparseTensor;

/// First bytes of every aggregate.
pub const MAGIC: [u8; 4] = *b"SAGG";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const HEADER_BYTES: usize = 40;

/// Which round of which run an aggregate belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AggregateHeader {
    /// The run.
    pub run_id: [u8; 16],
    /// The round whose accepted updates it merges.
    pub round: u64,
    /// How many updates it merges.
    pub updates: u32,
}

/// A decoded, fully validated aggregate.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedAggregate {
    /// Run, round and update count.
    pub header: AggregateHeader,
    /// One merged tensor per model tensor; `k` is the largest chunk's entry count.
    pub tensors: Vec<SparseTensor>,
}

/// Most bytes an aggregate of tensors with these shapes and grids can take,
/// however many updates it merges: what a receiver may accept before
/// downloading one.
pub fn max_len<'a>(tensors: impl IntoIterator<Item = (&'a [usize], ChunkGrid)>) -> u64 {
    let mut total = (HEADER_BYTES + TRAILER_BYTES) as u64;
    for (shape, grid) in tensors {
        let elems = grid.chunk_elems() as u64;
        let chunks = grid.num_chunks() as u64;
        // Per chunk: the count, then at most one bit per coefficient for the
        // indices (a list is used only when shorter than the map), and 32
        // bits per value (a palette is used only when cheaper than that).
        let body_bits = chunks * u64::from(bits_for(elems)) + chunks * elems * (1 + 32);
        // Rank, dimensions, chunk dimensions, value form, palette length
        // (a palette is used only when it and its indices cost less than f32).
        total += (1 + 4 * shape.len() + 8 + 1 + 4 + 4) as u64 + body_bits.div_ceil(8);
    }
    total
}

/// Encodes merged tensors (the output of a merge: valid, any entry count
/// per chunk) as the round's aggregate.
pub fn encode(header: &AggregateHeader, tensors: &[SparseTensor]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&header.run_id);
    out.extend_from_slice(&header.round.to_le_bytes());
    out.extend_from_slice(&header.updates.to_le_bytes());
    let count = u32::try_from(tensors.len()).map_err(|_| EncodeError::TooLarge {
        tensor: 0,
        what: "tensor count",
    })?;
    out.extend_from_slice(&count.to_le_bytes());
    for (tensor, t) in tensors.iter().enumerate() {
        t.validate()
            .map_err(|source| EncodeError::Invalid { tensor, source })?;
        let too_large = |what| EncodeError::TooLarge { tensor, what };
        write_shape(&mut out, t, tensor)?;
        let form = Form::cheapest(&t.values);
        match &form {
            Form::F32 => out.push(0),
            Form::Bf16 => out.push(1),
            Form::Palette(palette) => {
                out.push(2);
                let len = u32::try_from(palette.len()).map_err(|_| too_large("palette"))?;
                out.extend_from_slice(&len.to_le_bytes());
                for v in palette {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let body = encode_body(t, &form);
        out.extend_from_slice(
            &u32::try_from(body.len())
                .map_err(|_| too_large("body"))?
                .to_le_bytes(),
        );
        out.extend_from_slice(&body);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// How a tensor's values travel.
enum Form {
    /// Every value as f32.
    F32,
    /// Every value as bf16 (each one is exactly a bf16).
    Bf16,
    /// Distinct values once, ascending; each entry numbers one.
    Palette(Vec<f32>),
}

impl Form {
    /// The cheapest form that carries `values` exactly.
    fn cheapest(values: &[f32]) -> Self {
        let mut distinct: Vec<f32> = values.to_vec();
        distinct.sort_by(f32::total_cmp);
        distinct.dedup_by(|a, b| a.to_bits() == b.to_bits());
        let n = values.len() as u64;
        let p = distinct.len() as u64;
        let palette = 32 * p + n * u64::from(index_bits(p));
        let bf16 = values
            .iter()
            .all(|v| half::bf16::from_f32(*v).to_f32().to_bits() == v.to_bits())
            .then_some(16 * n);
        let best_plain = bf16.unwrap_or(32 * n);
        if p > 0 && palette < best_plain {
            Self::Palette(distinct)
        } else if bf16.is_some() {
            Self::Bf16
        } else {
            Self::F32
        }
    }

    /// Bits of one value in the body.
    fn bits(&self) -> u32 {
        match self {
            Self::F32 => 32,
            Self::Bf16 => 16,
            Self::Palette(p) => index_bits(p.len() as u64),
        }
    }
}

/// Bits of one palette index for a palette of `len` values.
fn index_bits(len: u64) -> u32 {
    bits_for(len.saturating_sub(1))
}

/// Whether a chunk with `count` entries lists its positions (else: a bitmap).
fn lists_positions(count: u64, grid: &ChunkGrid) -> bool {
    let elems = grid.chunk_elems() as u64;
    count * u64::from(bits_for(elems - 1)) < elems
}

fn encode_body(t: &SparseTensor, form: &Form) -> Vec<u8> {
    let elems = t.grid.chunk_elems();
    let count_bits = bits_for(elems as u64);
    let position_bits = bits_for(elems as u64 - 1);
    let value_bits = form.bits();
    let mut w = BitWriter::default();
    let mut map = vec![false; elems];
    for c in 0..t.grid.num_chunks() {
        let (idx, val) = t.chunk(c);
        w.write(idx.len() as u64, count_bits);
        if lists_positions(idx.len() as u64, &t.grid) {
            for &i in idx {
                w.write(u64::from(i), position_bits);
            }
        } else {
            map.fill(false);
            for &i in idx {
                map[i as usize] = true;
            }
            for &present in &map {
                w.write(u64::from(present), 1);
            }
        }
        for &v in val {
            let raw = match form {
                Form::F32 => u64::from(v.to_bits()),
                Form::Bf16 => u64::from(half::bf16::from_f32(v).to_bits()),
                // Every value is in the palette (it was built from them).
                Form::Palette(palette) => palette
                    .binary_search_by(|p| p.total_cmp(&v))
                    .unwrap_or_default() as u64,
            };
            w.write(raw, value_bits);
        }
    }
    w.finish()
}

/// Decodes and fully validates an aggregate from untrusted bytes.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DecodedAggregate, DecodeError> {
    let (mut r, crc) = open_record(bytes, limits, MAGIC, VERSION, HEADER_BYTES)?;
    let flags = r.u16()?;
    if flags != 0 {
        return Err(DecodeError::BadEncoding {
            encoding: 0,
            flags: flags.min(255) as u8,
        });
    }
    check_crc(&r, crc)?;
    let run_id: [u8; 16] = r.array()?;
    let round = r.u64()?;
    let updates = r.u32()?;
    let count = r.u32()?;
    // Each tensor record takes at least 17 bytes: the count is bounded by the input too.
    let most = limits.max_tensors.min(r.remaining() / 17 + 1);
    if count as usize > most {
        return Err(DecodeError::TooManyTensors {
            count: u64::from(count),
            max: most,
        });
    }
    let mut tensors = Vec::with_capacity(count as usize);
    for tensor in 0..count as usize {
        tensors.push(decode_tensor(&mut r, tensor, limits)?);
    }
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes(r.remaining()));
    }
    Ok(DecodedAggregate {
        header: AggregateHeader {
            run_id,
            round,
            updates,
        },
        tensors,
    })
}

fn decode_tensor(
    r: &mut Reader<'_>,
    tensor: usize,
    limits: &DecodeLimits,
) -> Result<SparseTensor, DecodeError> {
    let (shape, grid) = read_shape(r, tensor, limits)?;
    let bad_body = |reason| DecodeError::BadBody { tensor, reason };
    let form = match r.u8()? {
        0 => Form::F32,
        1 => Form::Bf16,
        2 => {
            let len = r.u32()? as usize;
            if len == 0 || len > r.remaining() / 4 {
                return Err(bad_body("palette empty or longer than the bytes left"));
            }
            let mut palette = Vec::with_capacity(len);
            for _ in 0..len {
                palette.push(f32::from_bits(r.u32()?));
            }
            if palette.windows(2).any(|w| w[0].total_cmp(&w[1]).is_ge())
                || palette.iter().any(|v| !v.is_finite())
            {
                return Err(bad_body("palette is not strictly ascending finite values"));
            }
            Form::Palette(palette)
        }
        _ => {
            return Err(DecodeError::BadTensorHeader {
                tensor,
                reason: "unknown value form",
            });
        }
    };
    let body_len = r.u32()? as usize;
    let body = r.take(body_len)?;
    let elems = grid.chunk_elems();
    let count_bits = bits_for(elems as u64);
    let position_bits = bits_for(elems as u64 - 1);
    let value_bits = form.bits();
    let chunks = grid.num_chunks();
    let body_bits = body_len as u64 * 8;
    // Every chunk costs its count field: refuse before allocating per chunk.
    if chunks as u64 * u64::from(count_bits) > body_bits {
        return Err(bad_body("body too short for its chunk count"));
    }
    let short = || bad_body("body ends early");
    let mut br = BitReader::new(body);
    let mut offsets = Vec::with_capacity(chunks + 1);
    let mut indices: Vec<u32> = Vec::new();
    let mut values: Vec<f32> = Vec::new();
    let mut k = 1;
    offsets.push(0u32);
    for _ in 0..chunks {
        let n = br.read(count_bits).ok_or_else(short)?;
        if n > elems as u64 {
            return Err(bad_body("chunk count above the chunk's size"));
        }
        k = k.max(n as usize);
        if lists_positions(n, &grid) {
            for _ in 0..n {
                indices.push(br.read(position_bits).ok_or_else(short)? as u32);
            }
        } else {
            let before = indices.len();
            for i in 0..elems as u32 {
                if br.read(1).ok_or_else(short)? == 1 {
                    indices.push(i);
                }
            }
            if (indices.len() - before) as u64 != n {
                return Err(bad_body("chunk bitmap disagrees with its count"));
            }
        }
        for _ in 0..n {
            let raw = br.read(value_bits).ok_or_else(short)?;
            let v = match &form {
                Form::F32 => f32::from_bits(raw as u32),
                Form::Bf16 => half::bf16::from_bits(raw as u16).to_f32(),
                Form::Palette(palette) => *palette
                    .get(raw as usize)
                    .ok_or(bad_body("palette index out of range"))?,
            };
            values.push(v);
        }
        offsets.push(u32::try_from(indices.len()).map_err(|_| short())?);
    }
    if !br.rest_is_padding() {
        return Err(bad_body("trailing bits in body"));
    }
    let t = SparseTensor {
        shape,
        grid,
        k,
        offsets,
        indices,
        values,
    };
    t.validate()
        .map_err(|source| DecodeError::Invalid { tensor, source })?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{aggregate, compress};
    use crate::sparse::ValueEncoding;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn header() -> AggregateHeader {
        AggregateHeader {
            run_id: [3; 16],
            round: 11,
            updates: 5,
        }
    }

    /// `peers` peers' sign updates of two tensors, merged as the coordinator merges them.
    fn merged(peers: usize, k: usize, values: ValueEncoding) -> Vec<SparseTensor> {
        let shapes: [&[usize]; 2] = [&[128, 192], &[96]];
        shapes
            .iter()
            .map(|shape| {
                let len: usize = shape.iter().product();
                let parts: Vec<SparseTensor> = (0..peers)
                    .map(|p| {
                        let mut rng = StdRng::seed_from_u64(p as u64);
                        let d: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
                        compress(&d, shape, k, 64)
                            .expect("compress")
                            .quantized(values)
                    })
                    .collect();
                let refs: Vec<&SparseTensor> = parts.iter().collect();
                aggregate(&refs).expect("aggregate")
            })
            .collect()
    }

    fn bounds(tensors: &[SparseTensor]) -> u64 {
        max_len(tensors.iter().map(|t| (t.shape.as_slice(), t.grid)))
    }

    #[test]
    fn round_trips_bit_exactly_for_every_encoding() {
        for values in [ValueEncoding::Sign, ValueEncoding::Bf16, ValueEncoding::F32] {
            for peers in [1, 3, 40] {
                let tensors = merged(peers, 4, values);
                let bytes = encode(&header(), &tensors).expect("encode");
                assert!(bytes.len() as u64 <= bounds(&tensors));
                let d = decode(&bytes, &DecodeLimits::default()).expect("decode");
                assert_eq!(d.header, header());
                assert_eq!(d.tensors.len(), tensors.len());
                for (a, b) in d.tensors.iter().zip(&tensors) {
                    assert_eq!(a.indices, b.indices);
                    assert_eq!(a.offsets, b.offsets);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a.values), bits(&b.values));
                }
            }
        }
    }

    #[test]
    fn sign_means_take_few_bits_and_saturated_chunks_use_a_bitmap() {
        // 40 senders of top-4 signs: the values are means of at most 40
        // signs, so the palette numbers them in a few bits, well under f32.
        let tensors = merged(40, 4, ValueEncoding::Sign);
        let bytes = encode(&header(), &tensors).expect("encode");
        let nnz: usize = tensors.iter().map(SparseTensor::nnz).sum();
        assert!(
            (bytes.len() as f64) < nnz as f64 * (12.0 + 8.0) / 8.0,
            "{} bytes for {nnz} entries",
            bytes.len()
        );
        // A full chunk costs its map, not 12 bits per position.
        let full = SparseTensor {
            shape: vec![64, 64],
            grid: ChunkGrid::for_shape(&[64, 64], 64),
            k: 4096,
            offsets: vec![0, 4096],
            indices: (0..4096).collect(),
            values: vec![1.0; 4096],
        };
        let bytes = encode(&header(), std::slice::from_ref(&full)).expect("encode");
        // Rank, dims, chunk dims, form, palette of one value, body length,
        // 13 count bits + 4096 map bits + 4096 x 0 value bits, checksum.
        assert_eq!(
            bytes.len(),
            HEADER_BYTES + 1 + 8 + 8 + 1 + 4 + 4 + 4 + 514 + 4
        );
        let d = decode(&bytes, &DecodeLimits::default()).expect("decode");
        assert_eq!(d.tensors[0], full);
    }

    #[test]
    fn every_truncation_and_flip_is_an_error_or_exact() {
        let tensors = merged(3, 4, ValueEncoding::Sign);
        let bytes = encode(&header(), &tensors).expect("encode");
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n], &DecodeLimits::default()).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[HEADER_BYTES + 3] ^= 1;
        assert_eq!(
            decode(&flipped, &DecodeLimits::default()),
            Err(DecodeError::Checksum)
        );
        let limits = DecodeLimits {
            max_bytes: bytes.len() - 1,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode(&bytes, &limits),
            Err(DecodeError::Oversized { .. })
        ));
    }

    #[test]
    fn an_update_is_not_an_aggregate() {
        let u = crate::OutgoingUpdate {
            values: ValueEncoding::Sign,
            tensors: vec![merged(1, 4, ValueEncoding::Sign)[1].clone()],
        };
        let header = super::super::UpdateHeader {
            run_id: [3; 16],
            round: 11,
            sender: [1; 32],
        };
        let bytes = super::super::encode(&header, &u).expect("encode");
        assert_eq!(
            decode(&bytes, &DecodeLimits::default()),
            Err(DecodeError::BadMagic)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes, &DecodeLimits::default());
        }

        #[test]
        fn any_merge_round_trips(peers in 1usize..12, k in 1usize..40, seed in 0usize..1000) {
            let shape = [64usize, 130];
            let parts: Vec<SparseTensor> = (0..peers)
                .map(|p| {
                    let d: Vec<f32> = (0..shape[0] * shape[1])
                        .map(|i| (((i * 31 + p * 977 + seed) % 211) as f32 - 105.0) * 0.5)
                        .collect();
                    compress(&d, &shape, k, 64).expect("compress").quantized(ValueEncoding::Sign)
                })
                .collect();
            let refs: Vec<&SparseTensor> = parts.iter().collect();
            let m = aggregate(&refs).expect("aggregate");
            let bytes = encode(&header(), std::slice::from_ref(&m)).expect("encode");
            prop_assert!(bytes.len() as u64 <= bounds(std::slice::from_ref(&m)));
            let d = decode(&bytes, &DecodeLimits::default()).expect("decode");
            prop_assert_eq!(&d.tensors[0].indices, &m.indices);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&d.tensors[0].values), bits(&m.values));
        }
    }
}
