//! The bytes of one peer's update for one round.
//!
//! An update crosses the internet from a peer we do not trust, so the format
//! is built to be checked cheaply before anything is believed: a fixed header
//! (magic, version, run id, round, sender, value encoding, tensor count), then
//! per tensor its shape, chunk dimensions and top-k followed by a bit-packed
//! body, then a CRC-32 of everything before it. Decoding never panics, reads
//! every size from the header only after checking it against hard caps and
//! against the bytes actually present (so allocations never exceed a small
//! multiple of the input's length), and returns a typed error for every fault.
//! Authenticity is not this layer's job: the swarm signs announces that carry
//! the update's BLAKE3 hash.
//!
//! Layout (integers little-endian):
//! ```text
//! header   magic "SDTR" | version u16 = 1 | values u8 (0 sign, 1 bf16, 2 f32) | flags u8 = 0
//!          run_id [u8;16] | round u64 | sender [u8;32] | tensor_count u32          (68 bytes)
//! tensor   ndim u8 | dims u32 x ndim | chunk_rows u32 | chunk_cols u32 | k u32 | body_len u32
//!          body: for each chunk, LSB-first bit stream:
//!            count   bits_for(k) bits      entries in this chunk (<= k)
//!            index   bits_for(E-1) bits    x count, ascending (E = chunk_rows*chunk_cols;
//!                                          12 bits for a 64x64 chunk)
//!            value   1 / 16 / 32 bits      x count (sign: 1 = negative; bf16; f32)
//!          padded with zero bits to a whole byte
//! trailer  crc32 u32 of all bytes before it
//! ```

use crate::chunk::ChunkGrid;
use crate::optimizer::{IncomingUpdate, OutgoingUpdate, PeerId};
use crate::sparse::{SparseError, SparseTensor, ValueEncoding};

pub mod aggregate;

/// First bytes of every update.
pub const MAGIC: [u8; 4] = *b"SDTR";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const HEADER_BYTES: usize = 68;
/// Bytes of the trailer (CRC-32).
pub const TRAILER_BYTES: usize = 4;
/// Most dimensions a tensor may declare.
pub const MAX_NDIM: usize = 8;

/// Hard caps a decoder enforces before trusting any declared size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest update accepted, in bytes.
    pub max_bytes: usize,
    /// Most tensors in one update.
    pub max_tensors: usize,
    /// Most elements in one tensor.
    pub max_tensor_elems: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_tensors: 1 << 16,
            max_tensor_elems: 1 << 36,
        }
    }
}

/// Who sent an update, for what run and round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpdateHeader {
    /// The run this update belongs to.
    pub run_id: [u8; 16],
    /// The round it was computed for.
    pub round: u64,
    /// The sender's public key.
    pub sender: PeerId,
}

/// A decoded, fully validated update.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedUpdate {
    /// Sender, run and round.
    pub header: UpdateHeader,
    /// How values were encoded.
    pub values: ValueEncoding,
    /// One sparse tensor per model tensor.
    pub tensors: Vec<SparseTensor>,
}

impl DecodedUpdate {
    /// The update as the optimizer applies it.
    pub fn into_incoming(self) -> IncomingUpdate {
        IncomingUpdate {
            sender: self.header.sender,
            tensors: self.tensors,
        }
    }
}

/// Why a well-formed update does not fit the run it was sent to: what a
/// member's own encoder can never produce, so a fault of its sender.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunMismatch {
    /// The values travel in another encoding than the run's.
    #[error("values travel as {got}, the run sends {expected}")]
    Values {
        /// The run's encoding.
        expected: &'static str,
        /// The update's.
        got: &'static str,
    },
    /// A tensor declares more coefficients per chunk than the run's top-k.
    #[error("tensor {tensor} carries top-{k}, the run allows {max}")]
    TopK {
        /// Tensor index.
        tensor: usize,
        /// Its top-k.
        k: usize,
        /// The run's, for this tensor's chunks.
        max: usize,
    },
}

impl DecodedUpdate {
    /// Checks that this update is one a member of a run with these
    /// settings can send: the run's value encoding, and no tensor over the
    /// run's top-k (fewer, as a member on a slow link sends, is fine).
    pub fn check_run(&self, values: ValueEncoding, topk: usize) -> Result<(), RunMismatch> {
        if self.values != values {
            return Err(RunMismatch::Values {
                expected: values.name(),
                got: self.values.name(),
            });
        }
        for (tensor, t) in self.tensors.iter().enumerate() {
            let max = t.grid.clamp_topk(topk);
            if t.k > max {
                return Err(RunMismatch::TopK {
                    tensor,
                    k: t.k,
                    max,
                });
            }
        }
        Ok(())
    }
}

/// Why an update could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum EncodeError {
    /// A tensor is malformed.
    #[error("tensor {tensor}: {source}")]
    Invalid {
        /// Tensor index.
        tensor: usize,
        /// What is wrong.
        source: SparseError,
    },
    /// A value cannot be carried exactly by the chosen encoding (quantize first).
    #[error("tensor {tensor}: value {value} is not exactly representable as {encoding:?}")]
    NotQuantized {
        /// Tensor index.
        tensor: usize,
        /// The value.
        value: f32,
        /// The encoding.
        encoding: ValueEncoding,
    },
    /// A size does not fit the format's fields or caps.
    #[error("tensor {tensor}: {what} is too large for the wire format")]
    TooLarge {
        /// Tensor index.
        tensor: usize,
        /// Which field.
        what: &'static str,
    },
}

/// Why bytes are not a valid update. Every variant is a rejection of the
/// sender's data; none leaves partial state behind.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Larger than the decoder's cap.
    #[error("update is {len} bytes, over the cap of {max}")]
    Oversized {
        /// Bytes received.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// Ends before the structure it declares.
    #[error("update is truncated (needed {needed} more bytes at offset {offset})")]
    Truncated {
        /// Where reading stopped.
        offset: usize,
        /// Bytes missing.
        needed: usize,
    },
    /// Does not start with the magic bytes.
    #[error("not a Starling update (bad magic)")]
    BadMagic,
    /// A version this code does not read.
    #[error("unsupported update version {0}")]
    UnsupportedVersion(u16),
    /// Unknown value encoding or flags.
    #[error("unknown value encoding {encoding} or flags {flags:#04x}")]
    BadEncoding {
        /// Encoding byte.
        encoding: u8,
        /// Flags byte.
        flags: u8,
    },
    /// The checksum does not match: corrupted in transit or storage.
    #[error("checksum mismatch")]
    Checksum,
    /// More tensors than allowed.
    #[error("{count} tensors, over the cap of {max}")]
    TooManyTensors {
        /// Declared count.
        count: u64,
        /// The cap.
        max: usize,
    },
    /// A tensor header is not acceptable.
    #[error("tensor {tensor}: {reason}")]
    BadTensorHeader {
        /// Tensor index.
        tensor: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A tensor's body is inconsistent with its header.
    #[error("tensor {tensor}: body is malformed: {reason}")]
    BadBody {
        /// Tensor index.
        tensor: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The decoded tensor breaks an invariant (index range or order, NaN, ...).
    #[error("tensor {tensor}: {source}")]
    Invalid {
        /// Tensor index.
        tensor: usize,
        /// What is wrong.
        source: SparseError,
    },
    /// Bytes follow the last tensor.
    #[error("{0} unexpected bytes after the last tensor")]
    TrailingBytes(usize),
}

/// Bits needed to write any value in `0..=max`.
pub fn bits_for(max: u64) -> u32 {
    64 - max.leading_zeros()
}

/// Bits of one tensor's body before padding, for `nnz` entries.
pub fn body_bits(grid: &ChunkGrid, k: usize, nnz: u64, values: ValueEncoding) -> u64 {
    let count_bits = u64::from(bits_for(k as u64));
    let index_bits = u64::from(bits_for(grid.chunk_elems().saturating_sub(1) as u64));
    grid.num_chunks() as u64 * count_bits + nnz * (index_bits + u64::from(values.bits()))
}

/// Bytes of one tensor's record (header and padded body) with `nnz` entries.
pub fn tensor_bytes(
    ndim: usize,
    grid: &ChunkGrid,
    k: usize,
    nnz: u64,
    values: ValueEncoding,
) -> u64 {
    (1 + 4 * ndim + 16) as u64 + body_bits(grid, k, nnz, values).div_ceil(8)
}

/// Exact encoded size of an update.
pub fn encoded_len(update: &OutgoingUpdate) -> u64 {
    let body: u64 = update
        .tensors
        .iter()
        .map(|t| tensor_bytes(t.shape.len(), &t.grid, t.k, t.nnz() as u64, update.values))
        .sum();
    (HEADER_BYTES + TRAILER_BYTES) as u64 + body
}

/// Encodes `update` for the wire.
pub fn encode(header: &UpdateHeader, update: &OutgoingUpdate) -> Result<Vec<u8>, EncodeError> {
    let values = update.values;
    let mut out = Vec::with_capacity(usize::try_from(encoded_len(update)).unwrap_or(0));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(encoding_byte(values));
    out.push(0);
    out.extend_from_slice(&header.run_id);
    out.extend_from_slice(&header.round.to_le_bytes());
    out.extend_from_slice(&header.sender);
    let count = u32::try_from(update.tensors.len()).map_err(|_| EncodeError::TooLarge {
        tensor: 0,
        what: "tensor count",
    })?;
    out.extend_from_slice(&count.to_le_bytes());
    for (tensor, t) in update.tensors.iter().enumerate() {
        t.validate()
            .map_err(|source| EncodeError::Invalid { tensor, source })?;
        if let Some(&value) = t.values.iter().find(|&&v| !carries_exactly(values, v)) {
            return Err(EncodeError::NotQuantized {
                tensor,
                value,
                encoding: values,
            });
        }
        let too_large = |what| EncodeError::TooLarge { tensor, what };
        write_shape(&mut out, t, tensor)?;
        out.extend_from_slice(
            &u32::try_from(t.k)
                .map_err(|_| too_large("k"))?
                .to_le_bytes(),
        );
        let body = encode_body(t, values);
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

fn encoding_byte(v: ValueEncoding) -> u8 {
    match v {
        ValueEncoding::Sign => 0,
        ValueEncoding::Bf16 => 1,
        ValueEncoding::F32 => 2,
    }
}

fn carries_exactly(enc: ValueEncoding, v: f32) -> bool {
    match enc {
        ValueEncoding::Sign => v == 1.0 || v == -1.0,
        ValueEncoding::Bf16 => half::bf16::from_f32(v).to_f32().to_bits() == v.to_bits(),
        ValueEncoding::F32 => true,
    }
}

fn encode_body(t: &SparseTensor, values: ValueEncoding) -> Vec<u8> {
    let count_bits = bits_for(t.k as u64);
    let index_bits = bits_for(t.grid.chunk_elems().saturating_sub(1) as u64);
    let mut w = BitWriter::default();
    for c in 0..t.grid.num_chunks() {
        let (idx, val) = t.chunk(c);
        w.write(idx.len() as u64, count_bits);
        for &i in idx {
            w.write(u64::from(i), index_bits);
        }
        for &v in val {
            match values {
                ValueEncoding::Sign => w.write(u64::from(v < 0.0), 1),
                ValueEncoding::Bf16 => w.write(u64::from(half::bf16::from_f32(v).to_bits()), 16),
                ValueEncoding::F32 => w.write(u64::from(v.to_bits()), 32),
            }
        }
    }
    w.finish()
}

/// The framing every record shares: checks the size against the cap and
/// the fixed header, the magic and the version, and splits off the CRC-32
/// trailer. Returns a reader over the body (after the version) and the
/// stored checksum, which the caller checks once it has read the fields
/// whose errors say more than "corrupted".
fn open_record<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
    magic: [u8; 4],
    version: u16,
    header_bytes: usize,
) -> Result<(Reader<'a>, u32), DecodeError> {
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::Oversized {
            len: bytes.len(),
            max: limits.max_bytes,
        });
    }
    if bytes.len() < header_bytes + TRAILER_BYTES {
        if bytes.len() >= 4 && bytes[..4] != magic {
            return Err(DecodeError::BadMagic);
        }
        return Err(DecodeError::Truncated {
            offset: bytes.len(),
            needed: header_bytes + TRAILER_BYTES - bytes.len(),
        });
    }
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_BYTES);
    let mut r = Reader {
        bytes: body,
        pos: 0,
    };
    if r.take(4)? != magic {
        return Err(DecodeError::BadMagic);
    }
    let found = r.u16()?;
    if found != version {
        return Err(DecodeError::UnsupportedVersion(found));
    }
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    Ok((r, crc))
}

/// Fails with [`DecodeError::Checksum`] unless the record's body has `crc`.
fn check_crc(r: &Reader<'_>, crc: u32) -> Result<(), DecodeError> {
    if crc32fast::hash(r.bytes) == crc {
        Ok(())
    } else {
        Err(DecodeError::Checksum)
    }
}

/// Decodes and fully validates an update from untrusted bytes.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DecodedUpdate, DecodeError> {
    let (mut r, crc) = open_record(bytes, limits, MAGIC, VERSION, HEADER_BYTES)?;
    let (encoding, flags) = (r.u8()?, r.u8()?);
    let values = match (encoding, flags) {
        (0, 0) => ValueEncoding::Sign,
        (1, 0) => ValueEncoding::Bf16,
        (2, 0) => ValueEncoding::F32,
        _ => return Err(DecodeError::BadEncoding { encoding, flags }),
    };
    check_crc(&r, crc)?;
    let mut run_id = [0u8; 16];
    run_id.copy_from_slice(r.take(16)?);
    let round = r.u64()?;
    let mut sender = [0u8; 32];
    sender.copy_from_slice(r.take(32)?);
    let count = r.u32()?;
    // Each tensor record takes at least 17 bytes, so the count is bounded by the input too.
    if count as usize > limits.max_tensors || count as usize > r.remaining() / 17 + 1 {
        return Err(DecodeError::TooManyTensors {
            count: u64::from(count),
            max: limits.max_tensors.min(r.remaining() / 17 + 1),
        });
    }
    let mut tensors = Vec::with_capacity(count as usize);
    for tensor in 0..count as usize {
        tensors.push(decode_tensor(&mut r, tensor, values, limits)?);
    }
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes(r.remaining()));
    }
    Ok(DecodedUpdate {
        header: UpdateHeader {
            run_id,
            round,
            sender,
        },
        values,
        tensors,
    })
}

fn decode_tensor(
    r: &mut Reader<'_>,
    tensor: usize,
    values: ValueEncoding,
    limits: &DecodeLimits,
) -> Result<SparseTensor, DecodeError> {
    let bad = |reason| DecodeError::BadTensorHeader { tensor, reason };
    let (shape, grid) = read_shape(r, tensor, limits)?;
    let k = r.u32()? as usize;
    if k == 0 || k > grid.chunk_elems() {
        return Err(bad("top-k outside 1..=chunk elements"));
    }
    let body_len = r.u32()? as usize;
    let body = r.take(body_len)?;
    let count_bits = bits_for(k as u64);
    let index_bits = bits_for(grid.chunk_elems().saturating_sub(1) as u64);
    let entry_bits = u64::from(index_bits + values.bits());
    let chunks = grid.num_chunks();
    let body_bits = body_len as u64 * 8;
    // Every chunk costs its count field: refuse before allocating per chunk.
    if chunks as u64 * u64::from(count_bits) > body_bits {
        return Err(DecodeError::BadBody {
            tensor,
            reason: "body too short for its chunk count",
        });
    }
    let max_entries = ((body_bits - chunks as u64 * u64::from(count_bits)) / entry_bits) as usize;
    let mut offsets = Vec::with_capacity(chunks + 1);
    let mut indices = Vec::with_capacity(max_entries.min(chunks.saturating_mul(k)));
    let mut vals = Vec::with_capacity(indices.capacity());
    let short = || DecodeError::BadBody {
        tensor,
        reason: "body ends early",
    };
    let mut br = BitReader::new(body);
    offsets.push(0u32);
    for _ in 0..chunks {
        let n = br.read(count_bits).ok_or_else(short)? as usize;
        if n > k {
            return Err(DecodeError::BadBody {
                tensor,
                reason: "chunk count above k",
            });
        }
        for _ in 0..n {
            indices.push(br.read(index_bits).ok_or_else(short)? as u32);
        }
        for _ in 0..n {
            let v = match values {
                ValueEncoding::Sign => {
                    if br.read(1).ok_or_else(short)? == 1 {
                        -1.0
                    } else {
                        1.0
                    }
                }
                ValueEncoding::Bf16 => {
                    half::bf16::from_bits(br.read(16).ok_or_else(short)? as u16).to_f32()
                }
                ValueEncoding::F32 => f32::from_bits(br.read(32).ok_or_else(short)? as u32),
            };
            vals.push(v);
        }
        offsets.push(u32::try_from(indices.len()).map_err(|_| short())?);
    }
    if !br.rest_is_padding() {
        return Err(DecodeError::BadBody {
            tensor,
            reason: "trailing bits in body",
        });
    }
    let t = SparseTensor {
        shape,
        grid,
        k,
        offsets,
        indices,
        values: vals,
    };
    t.validate()
        .map_err(|source| DecodeError::Invalid { tensor, source })?;
    Ok(t)
}

/// Reads a tensor record's rank, dimensions and chunk dimensions, checked
/// against the caps and for a grid that tiles the shape.
fn read_shape(
    r: &mut Reader<'_>,
    tensor: usize,
    limits: &DecodeLimits,
) -> Result<(Vec<usize>, ChunkGrid), DecodeError> {
    let bad = |reason| DecodeError::BadTensorHeader { tensor, reason };
    let ndim = r.u8()? as usize;
    if ndim > MAX_NDIM {
        return Err(bad("too many dimensions"));
    }
    let mut shape = Vec::with_capacity(ndim);
    let mut numel: u64 = 1;
    for _ in 0..ndim {
        let d = r.u32()?;
        numel = numel.saturating_mul(u64::from(d));
        shape.push(d as usize);
    }
    if numel > limits.max_tensor_elems {
        return Err(bad("more elements than the cap"));
    }
    let (chunk_rows, chunk_cols) = (r.u32()? as usize, r.u32()? as usize);
    let grid = ChunkGrid::with_chunks(&shape, chunk_rows, chunk_cols)
        .ok_or(bad("chunk dimensions do not tile the shape"))?;
    Ok((shape, grid))
}

/// Writes a tensor record's rank, dimensions and chunk dimensions.
fn write_shape(out: &mut Vec<u8>, t: &SparseTensor, tensor: usize) -> Result<(), EncodeError> {
    let too_large = |what| EncodeError::TooLarge { tensor, what };
    if t.shape.len() > MAX_NDIM {
        return Err(too_large("rank"));
    }
    out.push(t.shape.len() as u8);
    for &d in t
        .shape
        .iter()
        .chain([&t.grid.chunk_rows, &t.grid.chunk_cols])
    {
        out.extend_from_slice(
            &u32::try_from(d)
                .map_err(|_| too_large("dimension"))?
                .to_le_bytes(),
        );
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// LSB-first bit packer.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    filled: u32,
}

impl BitWriter {
    fn write(&mut self, value: u64, bits: u32) {
        let mut value = if bits == 64 {
            value
        } else {
            value & ((1u64 << bits) - 1)
        };
        let mut bits = bits;
        while bits > 0 {
            let take = bits.min(64 - self.filled).min(32);
            let part = value & ((1u64 << take) - 1);
            self.acc |= part << self.filled;
            self.filled += take;
            value >>= take;
            bits -= take;
            while self.filled >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.filled -= 8;
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// LSB-first bit reader that reports running out instead of panicking.
struct BitReader<'a> {
    bytes: &'a [u8],
    bit: u64,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, bit: 0 }
    }

    fn read(&mut self, bits: u32) -> Option<u64> {
        if bits > 56 {
            let low = self.read(32)?;
            return Some(low | (self.read(bits - 32)? << 32));
        }
        if bits == 0 {
            return Some(0);
        }
        if self.bit + u64::from(bits) > self.bytes.len() as u64 * 8 {
            return None;
        }
        // One little-endian load of the 8 bytes from the current byte covers
        // the field: at most 7 bits of offset plus 56 bits.
        let start = (self.bit / 8) as usize;
        let tail = self.bytes.get(start..)?;
        let mut word = [0u8; 8];
        let n = tail.len().min(8);
        word[..n].copy_from_slice(&tail[..n]);
        let v = (u64::from_le_bytes(word) >> (self.bit % 8)) & ((1u64 << bits) - 1);
        self.bit += u64::from(bits);
        Some(v)
    }

    /// True when fewer than 8 bits remain and all of them are zero.
    fn rest_is_padding(&self) -> bool {
        let total = self.bytes.len() as u64 * 8;
        if total - self.bit >= 8 {
            return false;
        }
        (self.bit..total).all(|b| (self.bytes[(b / 8) as usize] >> (b % 8)) & 1 == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::compress;
    use proptest::prelude::*;

    fn header() -> UpdateHeader {
        UpdateHeader {
            run_id: [7; 16],
            round: 42,
            sender: [9; 32],
        }
    }

    fn update(values: ValueEncoding) -> OutgoingUpdate {
        let a: Vec<f32> = (0..128 * 192)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01)
            .collect();
        let b: Vec<f32> = (0..96).map(|i| (i as f32).sin()).collect();
        OutgoingUpdate {
            values,
            tensors: vec![
                compress(&a, &[128, 192], 4, 64)
                    .expect("a")
                    .quantized(values),
                compress(&b, &[96], 32, 64).expect("b").quantized(values),
            ],
        }
    }

    /// Re-seals `bytes` with a valid checksum after a test edits them.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let n = bytes.len() - TRAILER_BYTES;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// An update of one `1 x 48` tensor with a hand-written body (k = 2).
    fn one_tensor(values: ValueEncoding, body: impl FnOnce(&mut BitWriter)) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(encoding_byte(values));
        out.push(0);
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&[1; 32]);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.push(1);
        for v in [48u32, 1, 48, 2] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let mut w = BitWriter::default();
        body(&mut w);
        let body = w.finish();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&[0; 4]);
        reseal(out)
    }

    #[test]
    fn an_update_over_the_runs_topk_or_in_another_encoding_does_not_fit_it() {
        let bytes = encode(&header(), &update(ValueEncoding::Bf16)).expect("encode");
        let d = decode(&bytes, &DecodeLimits::default()).expect("decode");
        assert_eq!(d.check_run(ValueEncoding::Bf16, 32), Ok(()));
        // Fewer coefficients than the run's top-k is a slow link, not a fault.
        assert_eq!(d.check_run(ValueEncoding::Bf16, 64), Ok(()));
        assert_eq!(
            d.check_run(ValueEncoding::Bf16, 3),
            Err(RunMismatch::TopK {
                tensor: 0,
                k: 4,
                max: 3
            })
        );
        assert_eq!(
            d.check_run(ValueEncoding::Sign, 32),
            Err(RunMismatch::Values {
                expected: "sign",
                got: "bf16"
            })
        );
    }

    #[test]
    fn roundtrip_every_encoding() {
        for values in [ValueEncoding::Sign, ValueEncoding::Bf16, ValueEncoding::F32] {
            let u = update(values);
            let bytes = encode(&header(), &u).expect("encode");
            assert_eq!(bytes.len() as u64, encoded_len(&u));
            let d = decode(&bytes, &DecodeLimits::default()).expect("decode");
            assert_eq!(d.header, header());
            assert_eq!(d.values, values);
            assert_eq!(d.tensors, u.tensors);
        }
    }

    #[test]
    fn sixty_four_square_chunks_use_twelve_bit_indices() {
        let u = update(ValueEncoding::Sign);
        let t = &u.tensors[0];
        // 6 chunks x (3 count bits + 4 x (12 + 1)) = 330 bits = 42 bytes.
        assert_eq!(
            body_bits(&t.grid, t.k, t.nnz() as u64, ValueEncoding::Sign),
            330
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&header(), &update(ValueEncoding::Bf16)).expect("encode");
        for n in 0..bytes.len() {
            assert!(
                decode(&bytes[..n], &DecodeLimits::default()).is_err(),
                "prefix {n}"
            );
            // Even with a valid checksum over the cut, a truncated body is refused.
            // (Cutting exactly the checksum and resealing restores the original.)
            if n > HEADER_BYTES + TRAILER_BYTES && n != bytes.len() - TRAILER_BYTES {
                let mut cut = bytes[..n].to_vec();
                cut.extend_from_slice(&[0; 4]);
                assert!(
                    decode(&reseal(cut), &DecodeLimits::default()).is_err(),
                    "resealed prefix {n}"
                );
            }
        }
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let bytes = encode(&header(), &update(ValueEncoding::F32)).expect("encode");
        let limits = DecodeLimits {
            max_bytes: 100,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode(&bytes, &limits),
            Err(DecodeError::Oversized { .. })
        ));
    }

    #[test]
    fn corruption_fails_the_checksum() {
        let mut bytes = encode(&header(), &update(ValueEncoding::Sign)).expect("encode");
        bytes[HEADER_BYTES + 10] ^= 0x10;
        assert_eq!(
            decode(&bytes, &DecodeLimits::default()),
            Err(DecodeError::Checksum)
        );
    }

    #[test]
    fn out_of_range_index_is_refused() {
        // 1x48 chunk: 6-bit indices can name 48..63, which do not exist.
        let bytes = one_tensor(ValueEncoding::Sign, |w| {
            w.write(2, 2);
            w.write(3, 6);
            w.write(50, 6);
            w.write(0, 2);
        });
        assert!(matches!(
            decode(&bytes, &DecodeLimits::default()),
            Err(DecodeError::Invalid {
                source: SparseError::BadIndex { index: 50, .. },
                ..
            })
        ));
        let unordered = one_tensor(ValueEncoding::Sign, |w| {
            w.write(2, 2);
            w.write(9, 6);
            w.write(3, 6);
            w.write(0, 2);
        });
        assert!(decode(&unordered, &DecodeLimits::default()).is_err());
    }

    #[test]
    fn nan_and_infinite_values_are_refused() {
        for bad in [f32::NAN, f32::INFINITY] {
            let bytes = one_tensor(ValueEncoding::F32, |w| {
                w.write(1, 2);
                w.write(5, 6);
                w.write(u64::from(bad.to_bits()), 32);
            });
            assert!(matches!(
                decode(&bytes, &DecodeLimits::default()),
                Err(DecodeError::Invalid {
                    source: SparseError::NonFinite { .. },
                    ..
                })
            ));
        }
    }

    #[test]
    fn counts_above_k_and_trailing_bits_are_refused() {
        let over = one_tensor(ValueEncoding::Sign, |w| w.write(3, 2));
        assert!(matches!(
            decode(&over, &DecodeLimits::default()),
            Err(DecodeError::BadBody { .. })
        ));
        let trailing = one_tensor(ValueEncoding::Sign, |w| {
            w.write(0, 2);
            w.write(1, 3);
        });
        assert!(matches!(
            decode(&trailing, &DecodeLimits::default()),
            Err(DecodeError::BadBody { .. })
        ));
    }

    #[test]
    fn wrong_shapes_and_huge_declarations_are_refused() {
        let mut bytes = encode(&header(), &update(ValueEncoding::Sign)).expect("encode");
        // First tensor: ndim at 68, dims at 69..77, chunk_rows at 77: 64 -> 60 does not tile 128.
        bytes[77] = 60;
        assert!(matches!(
            decode(&reseal(bytes.clone()), &DecodeLimits::default()),
            Err(DecodeError::BadTensorHeader { .. })
        ));
        // A declared tensor count far beyond the bytes present.
        let mut bytes = encode(&header(), &update(ValueEncoding::Sign)).expect("encode");
        bytes[64..68].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&reseal(bytes), &DecodeLimits::default()),
            Err(DecodeError::TooManyTensors { .. })
        ));
        // A gigantic shape with 1x1 chunks: refused by the element cap or the body size,
        // before any per-chunk allocation.
        let mut bytes = one_tensor(ValueEncoding::Sign, |w| w.write(0, 2));
        bytes[69..73].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes[77..81].copy_from_slice(&1u32.to_le_bytes());
        bytes[81..85].copy_from_slice(&1u32.to_le_bytes());
        assert!(decode(&reseal(bytes), &DecodeLimits::default()).is_err());
    }

    #[test]
    fn fuzz_regressions_are_errors() {
        // A fuzz find: a zero last dimension under leading dimensions whose product
        // overflows usize. The file holds the fuzz target's mode byte, then the
        // update without its checksum.
        let raw = include_bytes!("../testdata/fuzz-wire-overflow.bin");
        let mut bytes = raw[1..].to_vec();
        bytes.extend_from_slice(&crc32fast::hash(&raw[1..]).to_le_bytes());
        assert!(decode(&bytes, &DecodeLimits::default()).is_err());
    }

    #[test]
    fn unquantized_values_are_not_encoded() {
        let mut u = update(ValueEncoding::Sign);
        u.tensors[1].values[0] = 0.5;
        assert!(matches!(
            encode(&header(), &u),
            Err(EncodeError::NotQuantized { .. })
        ));
    }

    fn arb_update() -> impl Strategy<Value = OutgoingUpdate> {
        let shape = prop_oneof![
            (1usize..200).prop_map(|n| vec![n]),
            (1usize..40, 1usize..70).prop_map(|(a, b)| vec![a, b]),
            (1usize..4, 1usize..9, 1usize..20).prop_map(|(a, b, c)| vec![a, b, c]),
        ];
        let values = prop_oneof![
            Just(ValueEncoding::Sign),
            Just(ValueEncoding::Bf16),
            Just(ValueEncoding::F32)
        ];
        (
            proptest::collection::vec((shape, 1usize..40, 1usize..70, any::<u64>()), 1..4),
            values,
        )
            .prop_map(|(tensors, values)| OutgoingUpdate {
                values,
                tensors: tensors
                    .into_iter()
                    .map(|(shape, k, chunk, seed)| {
                        let n: usize = shape.iter().product();
                        let data: Vec<f32> = (0..n as u64)
                            .map(|i| ((i.wrapping_mul(seed | 1) >> 7) % 2001) as f32 - 1000.0)
                            .collect();
                        compress(&data, &shape, k, chunk)
                            .expect("compress")
                            .quantized(values)
                    })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn encode_decode_roundtrip(u in arb_update(), round in any::<u64>()) {
            let h = UpdateHeader { round, ..header() };
            let bytes = encode(&h, &u).expect("encode");
            prop_assert_eq!(bytes.len() as u64, encoded_len(&u));
            let d = decode(&bytes, &DecodeLimits::default()).expect("decode");
            prop_assert_eq!(d.header, h);
            prop_assert_eq!(d.tensors, u.tensors);
        }

        #[test]
        fn mutated_bytes_never_panic(u in arb_update(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = encode(&header(), &u).expect("encode");
            let n = bytes.len() - TRAILER_BYTES;
            for (pos, val) in flips {
                bytes[pos % n] = val;
            }
            // Resealed so the mutation reaches the parser rather than stopping at the checksum.
            let _ = decode(&reseal(bytes), &DecodeLimits::default());
        }
    }
}
