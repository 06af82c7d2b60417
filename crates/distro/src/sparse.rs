//! One peer's compressed tensor: a few DCT coefficients per chunk.
//!
//! The layout is compressed-sparse-row over chunks: chunk `c` owns entries
//! `offsets[c]..offsets[c+1]`, whose `indices` are flat positions inside the
//! chunk's `chunk_rows x chunk_cols` coefficient block (row-major, so index
//! `a * chunk_cols + b` is frequency `a` down the rows and `b` across), strictly
//! ascending. A chunk may hold fewer than `k` entries: 1-bit updates leave out
//! coefficients that are exactly zero, since a sign cannot say "nothing".

use crate::chunk::ChunkGrid;

/// How coefficient values travel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ValueEncoding {
    /// One sign bit per value; receivers read +1 or -1 (Psyche's default).
    #[default]
    Sign,
    /// bfloat16, rounded to nearest even.
    Bf16,
    /// Full f32, as the DeMo reference sends.
    F32,
}

impl ValueEncoding {
    /// Bits each value costs on the wire.
    pub fn bits(self) -> u32 {
        match self {
            Self::Sign => 1,
            Self::Bf16 => 16,
            Self::F32 => 32,
        }
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sign => "sign",
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
        }
    }

    /// Parses `sign`, `bf16` or `f32`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sign" => Some(Self::Sign),
            "bf16" => Some(Self::Bf16),
            "f32" => Some(Self::F32),
            _ => None,
        }
    }

    /// The value a receiver reads for `v`; `None` if it is not sent at all.
    pub fn quantize(self, v: f32) -> Option<f32> {
        match self {
            Self::Sign if v == 0.0 => None,
            Self::Sign => Some(if v > 0.0 { 1.0 } else { -1.0 }),
            Self::Bf16 => Some(half::bf16::from_f32(v).to_f32()),
            Self::F32 => Some(v),
        }
    }
}

/// Sparse DCT coefficients of one tensor, as one peer sends them.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseTensor {
    /// Shape of the dense tensor.
    pub shape: Vec<usize>,
    /// How the tensor is chunked.
    pub grid: ChunkGrid,
    /// The sender's top-k: no chunk holds more entries.
    pub k: usize,
    /// `num_chunks + 1` entry offsets.
    pub offsets: Vec<u32>,
    /// Flat coefficient positions inside each chunk, ascending within a chunk.
    pub indices: Vec<u32>,
    /// The coefficient values, one per index.
    pub values: Vec<f32>,
}

/// Why a sparse tensor is not well formed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SparseError {
    /// The chunk dimensions do not tile the shape.
    #[error("chunk grid {chunk_rows}x{chunk_cols} does not tile shape {shape:?}")]
    BadGrid {
        /// Dense shape.
        shape: Vec<usize>,
        /// Chunk height.
        chunk_rows: usize,
        /// Chunk width.
        chunk_cols: usize,
    },
    /// `k` is zero or larger than a chunk.
    #[error("top-k {k} is outside 1..={chunk_elems}")]
    BadK {
        /// Declared k.
        k: usize,
        /// Coefficients per chunk.
        chunk_elems: usize,
    },
    /// Offsets are not `num_chunks + 1` non-decreasing values ending at the entry count.
    #[error("chunk offsets are malformed")]
    BadOffsets,
    /// A chunk holds more than `k` entries.
    #[error("chunk {chunk} holds {count} entries, more than k = {k}")]
    TooManyEntries {
        /// Chunk number.
        chunk: usize,
        /// Entries found.
        count: usize,
        /// Declared k.
        k: usize,
    },
    /// An index is outside the chunk or not strictly ascending.
    #[error("chunk {chunk}: index {index} is out of range or out of order")]
    BadIndex {
        /// Chunk number.
        chunk: usize,
        /// The offending index.
        index: u32,
    },
    /// A value is NaN or infinite.
    #[error("chunk {chunk}: value is not finite")]
    NonFinite {
        /// Chunk number.
        chunk: usize,
    },
    /// `indices` and `values` differ in length.
    #[error("{indices} indices but {values} values")]
    LengthMismatch {
        /// Index count.
        indices: usize,
        /// Value count.
        values: usize,
    },
}

impl SparseTensor {
    /// Entries of chunk `c` as `(indices, values)`.
    pub fn chunk(&self, c: usize) -> (&[u32], &[f32]) {
        let (s, e) = (self.offsets[c] as usize, self.offsets[c + 1] as usize);
        (&self.indices[s..e], &self.values[s..e])
    }

    /// Number of entries (coefficients actually carried).
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Re-encodes the values as `encoding` would deliver them (dropping what it cannot carry).
    pub fn quantized(&self, encoding: ValueEncoding) -> SparseTensor {
        let mut offsets = Vec::with_capacity(self.offsets.len());
        let mut indices = Vec::with_capacity(self.indices.len());
        let mut values = Vec::with_capacity(self.values.len());
        offsets.push(0);
        for c in 0..self.grid.num_chunks() {
            let (idx, val) = self.chunk(c);
            for (&i, &v) in idx.iter().zip(val) {
                if let Some(q) = encoding.quantize(v) {
                    indices.push(i);
                    values.push(q);
                }
            }
            offsets.push(indices.len() as u32);
        }
        SparseTensor {
            shape: self.shape.clone(),
            grid: self.grid,
            k: self.k,
            offsets,
            indices,
            values,
        }
    }

    /// Checks every invariant a receiver relies on; data from a peer must pass this.
    pub fn validate(&self) -> Result<(), SparseError> {
        let g = self.grid;
        if ChunkGrid::with_chunks(&self.shape, g.chunk_rows, g.chunk_cols) != Some(g) {
            return Err(SparseError::BadGrid {
                shape: self.shape.clone(),
                chunk_rows: g.chunk_rows,
                chunk_cols: g.chunk_cols,
            });
        }
        let elems = g.chunk_elems();
        if self.k == 0 || self.k > elems {
            return Err(SparseError::BadK {
                k: self.k,
                chunk_elems: elems,
            });
        }
        if self.indices.len() != self.values.len() {
            return Err(SparseError::LengthMismatch {
                indices: self.indices.len(),
                values: self.values.len(),
            });
        }
        let chunks = g.num_chunks();
        if self.offsets.len() != chunks + 1
            || self.offsets.first() != Some(&0)
            || self.offsets.last().map(|&o| o as usize) != Some(self.indices.len())
            || self.offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(SparseError::BadOffsets);
        }
        for c in 0..chunks {
            let (idx, val) = self.chunk(c);
            if idx.len() > self.k {
                return Err(SparseError::TooManyEntries {
                    chunk: c,
                    count: idx.len(),
                    k: self.k,
                });
            }
            let mut prev: Option<u32> = None;
            for &i in idx {
                if i as usize >= elems || prev.is_some_and(|p| p >= i) {
                    return Err(SparseError::BadIndex { chunk: c, index: i });
                }
                prev = Some(i);
            }
            if val.iter().any(|v| !v.is_finite()) {
                return Err(SparseError::NonFinite { chunk: c });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SparseTensor {
        let grid = ChunkGrid::for_shape(&[4, 8], 4);
        SparseTensor {
            shape: vec![4, 8],
            grid,
            k: 2,
            offsets: vec![0, 2, 3],
            indices: vec![1, 5, 0],
            values: vec![0.5, -2.0, 0.0],
        }
    }

    #[test]
    fn valid_sample_passes() {
        assert_eq!(sample().validate(), Ok(()));
    }

    #[test]
    fn sign_quantization_drops_zeros() {
        let q = sample().quantized(ValueEncoding::Sign);
        assert_eq!(q.offsets, vec![0, 2, 2]);
        assert_eq!(q.values, vec![1.0, -1.0]);
        assert_eq!(q.validate(), Ok(()));
    }

    #[test]
    fn invalid_inputs_are_named() {
        let mut s = sample();
        s.indices[1] = 1;
        assert!(matches!(s.validate(), Err(SparseError::BadIndex { .. })));
        let mut s = sample();
        s.indices[2] = 16;
        assert!(matches!(s.validate(), Err(SparseError::BadIndex { .. })));
        let mut s = sample();
        s.values[0] = f32::NAN;
        assert!(matches!(s.validate(), Err(SparseError::NonFinite { .. })));
        let mut s = sample();
        s.offsets = vec![0, 3, 3];
        s.indices.push(2);
        s.values.push(1.0);
        assert!(matches!(
            s.validate(),
            Err(SparseError::BadOffsets | SparseError::TooManyEntries { .. })
        ));
        let mut s = sample();
        s.k = 17;
        assert!(matches!(s.validate(), Err(SparseError::BadK { .. })));
        let mut s = sample();
        s.grid.chunk_cols = 3;
        assert!(matches!(s.validate(), Err(SparseError::BadGrid { .. })));
    }
}
