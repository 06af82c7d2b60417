//! A cap on the round's aggregate: the coordinator keeps only the top-K
//! coefficients of each chunk and carries the rest into the next round.
//!
//! The exact aggregate's index union grows with the member count until it
//! saturates a chunk, and so does what every volunteer downloads. With a cap
//! the download per round is fixed whatever the member count; what the cap
//! drops is not lost but kept in a residual (error feedback, as each peer
//! does for its own momentum), added to the next round's aggregate before
//! its top-K is taken. Values travel as bf16; their rounding error goes into
//! the residual too. Only the coordinator runs this, and every replica
//! applies its output, so it need not be reproducible elsewhere; it is
//! deterministic anyway (ties go to the lower position).
//!
//! The residual is the model's size in f32 and is part of the coordinator's
//! state: [`Residual::to_bytes`] writes it with the round it follows, so a
//! restarted coordinator continues with the residual of its last round.

use crate::optimizer::ModelLayout;
use crate::sparse::SparseTensor;

/// First bytes of a saved residual.
const MAGIC: [u8; 4] = *b"SRES";

/// The coordinator's carried remainder, per tensor, chunk after chunk
/// (chunk `c` of a tensor is `[c * E, (c + 1) * E)` of its vector).
#[derive(Clone, Debug, PartialEq)]
pub struct Residual {
    /// The round whose cap left this residual (`None`: before any round).
    pub round: Option<u64>,
    tensors: Vec<Vec<f32>>,
}

/// Why saved residual bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResidualError {
    /// Not a saved residual, or cut short.
    #[error("not a saved residual (bad magic or truncated)")]
    Malformed,
    /// The checksum does not match.
    #[error("saved residual checksum mismatch")]
    Checksum,
    /// Saved for a model of other shapes.
    #[error("saved residual does not fit the model (tensor {0})")]
    Shape(usize),
}

/// Why an aggregate could not be capped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CapError {
    /// The merged tensors do not fit the residual's model.
    #[error("merged tensor {0} does not fit the model")]
    Shape(usize),
    /// K is zero.
    #[error("aggregate top-k must be at least 1")]
    ZeroK,
}

impl Residual {
    /// A zero residual for the layout's model.
    pub fn zeros(layout: &ModelLayout) -> Self {
        Self {
            round: None,
            tensors: layout
                .tensors()
                .iter()
                .map(|t| vec![0.0; t.grid.num_chunks() * t.grid.chunk_elems()])
                .collect(),
        }
    }

    /// Sum of squares of what is carried (for logs and tests).
    pub fn energy(&self) -> f64 {
        self.tensors
            .iter()
            .flatten()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum()
    }

    /// Add `merged` (one sparse tensor per model tensor) to the residual,
    /// take each chunk's `k` largest magnitudes as bf16, and keep the rest
    /// (and the rounding) as the new residual of `round`.
    pub fn cap(
        &mut self,
        round: u64,
        merged: &[SparseTensor],
        k: usize,
    ) -> Result<Vec<SparseTensor>, CapError> {
        if k == 0 {
            return Err(CapError::ZeroK);
        }
        if merged.len() != self.tensors.len() {
            return Err(CapError::Shape(merged.len().min(self.tensors.len())));
        }
        let mut out = Vec::with_capacity(merged.len());
        let mut order: Vec<u32> = Vec::new();
        for (tensor, (m, acc)) in merged.iter().zip(&mut self.tensors).enumerate() {
            let elems = m.grid.chunk_elems();
            if acc.len() != m.grid.num_chunks() * elems {
                return Err(CapError::Shape(tensor));
            }
            let keep = k.min(elems);
            let mut offsets = Vec::with_capacity(m.grid.num_chunks() + 1);
            let mut indices = Vec::new();
            let mut values = Vec::new();
            offsets.push(0u32);
            for c in 0..m.grid.num_chunks() {
                let chunk = &mut acc[c * elems..(c + 1) * elems];
                let (idx, val) = m.chunk(c);
                for (&i, &v) in idx.iter().zip(val) {
                    chunk[i as usize] += v;
                }
                order.clear();
                order.extend((0..elems as u32).filter(|&i| chunk[i as usize] != 0.0));
                let larger = |a: &u32, b: &u32| {
                    let (x, y) = (chunk[*a as usize].abs(), chunk[*b as usize].abs());
                    y.total_cmp(&x).then(a.cmp(b))
                };
                if order.len() > keep {
                    order.select_nth_unstable_by(keep - 1, larger);
                    order.truncate(keep);
                }
                order.sort_unstable();
                for &i in &order {
                    let sent = half::bf16::from_f32(chunk[i as usize]).to_f32();
                    if sent == 0.0 {
                        continue;
                    }
                    chunk[i as usize] -= sent;
                    indices.push(i);
                    values.push(sent);
                }
                offsets.push(indices.len() as u32);
            }
            out.push(SparseTensor {
                shape: m.shape.clone(),
                grid: m.grid,
                k: keep,
                offsets,
                indices,
                values,
            });
        }
        self.round = Some(round);
        Ok(out)
    }

    /// The residual's bytes: magic, round (u64::MAX: none), tensor count,
    /// each tensor's length and f32 values (little-endian), CRC-32.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len: usize = self.tensors.iter().map(|t| 8 + 4 * t.len()).sum();
        let mut out = Vec::with_capacity(20 + len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.round.unwrap_or(u64::MAX).to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            out.extend_from_slice(&(t.len() as u64).to_le_bytes());
            for v in t {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Read a saved residual for the layout's model.
    pub fn from_bytes(bytes: &[u8], layout: &ModelLayout) -> Result<Self, ResidualError> {
        let body_len = bytes.len().checked_sub(4).ok_or(ResidualError::Malformed)?;
        let (body, crc) = bytes.split_at(body_len);
        if body.len() < 16 || body[..4] != MAGIC {
            return Err(ResidualError::Malformed);
        }
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != crc {
            return Err(ResidualError::Checksum);
        }
        let mut pos = 4;
        let mut take = |n: usize| take_bytes(body, &mut pos, n);
        let u64_at = |b: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        };
        let round = u64_at(take(8)?);
        let mut count = [0u8; 4];
        count.copy_from_slice(take(4)?);
        let count = u32::from_le_bytes(count) as usize;
        let model = layout.tensors();
        if count != model.len() {
            return Err(ResidualError::Shape(count.min(model.len())));
        }
        let mut tensors = Vec::with_capacity(count);
        for (tensor, t) in model.iter().enumerate() {
            let len = u64_at(take(8)?);
            let want = (t.grid.num_chunks() * t.grid.chunk_elems()) as u64;
            if len != want {
                return Err(ResidualError::Shape(tensor));
            }
            let raw = take(want as usize * 4)?;
            tensors.push(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            );
        }
        if take(1).is_ok() {
            return Err(ResidualError::Malformed);
        }
        Ok(Self {
            round: (round != u64::MAX).then_some(round),
            tensors,
        })
    }
}

/// The next `n` bytes of `body` from `pos`, advancing it.
fn take_bytes<'a>(body: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], ResidualError> {
    let end = pos.checked_add(n).ok_or(ResidualError::Malformed)?;
    let s = body.get(*pos..end).ok_or(ResidualError::Malformed)?;
    *pos = end;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::DistroConfig;
    use crate::{ChunkGrid, compress};

    fn layout() -> ModelLayout {
        ModelLayout::new(&[vec![64, 128], vec![96]], DistroConfig::default())
    }

    fn merged(seed: usize, k: usize) -> Vec<SparseTensor> {
        layout()
            .tensors()
            .iter()
            .map(|t| {
                let n: usize = t.shape.iter().product();
                let d: Vec<f32> = (0..n)
                    .map(|i| (((i * 7919 + seed * 31) % 1013) as f32 - 506.0) * 0.001)
                    .collect();
                compress(&d, &t.shape, k, 64).expect("compress")
            })
            .collect()
    }

    #[test]
    fn the_cap_keeps_k_per_chunk_and_loses_nothing() {
        let mut residual = Residual::zeros(&layout());
        let input = merged(1, 40);
        let capped = residual.cap(0, &input, 8).expect("cap");
        for (t, c) in capped.iter().enumerate() {
            c.validate().expect("valid");
            let g: ChunkGrid = c.grid;
            for chunk in 0..g.num_chunks() {
                assert!(
                    c.chunk(chunk).0.len() <= 8.min(g.chunk_elems()),
                    "tensor {t}"
                );
            }
        }
        // What was sent plus what is carried is what came in, per coefficient.
        let mut check = residual.clone();
        for (t, c) in capped.iter().enumerate() {
            let elems = c.grid.chunk_elems();
            for chunk in 0..c.grid.num_chunks() {
                let (idx, val) = c.chunk(chunk);
                for (&i, &v) in idx.iter().zip(val) {
                    check.tensors[t][chunk * elems + i as usize] += v;
                }
            }
        }
        let mut want = Residual::zeros(&layout());
        for (t, m) in input.iter().enumerate() {
            let elems = m.grid.chunk_elems();
            for chunk in 0..m.grid.num_chunks() {
                let (idx, val) = m.chunk(chunk);
                for (&i, &v) in idx.iter().zip(val) {
                    want.tensors[t][chunk * elems + i as usize] += v;
                }
            }
        }
        for (a, b) in check
            .tensors
            .iter()
            .flatten()
            .zip(want.tensors.iter().flatten())
        {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        // The largest coefficients went first.
        assert!(residual.energy() < want.energy());
    }

    #[test]
    fn carried_coefficients_are_sent_in_later_rounds() {
        let mut residual = Residual::zeros(&layout());
        residual.cap(0, &merged(1, 40), 4).expect("cap");
        let before = residual.energy();
        let empty: Vec<SparseTensor> = merged(1, 40)
            .into_iter()
            .map(|mut t| {
                t.indices.clear();
                t.values.clear();
                t.offsets.iter_mut().for_each(|o| *o = 0);
                t
            })
            .collect();
        let later = residual.cap(1, &empty, 4).expect("cap");
        assert!(later.iter().any(|t| t.nnz() > 0));
        assert!(residual.energy() < before);
        assert_eq!(residual.round, Some(1));
    }

    #[test]
    fn saved_residuals_round_trip_and_bad_bytes_are_refused() {
        let mut residual = Residual::zeros(&layout());
        residual.cap(3, &merged(2, 20), 2).expect("cap");
        let bytes = residual.to_bytes();
        assert_eq!(Residual::from_bytes(&bytes, &layout()), Ok(residual));
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert_eq!(
            Residual::from_bytes(&flipped, &layout()),
            Err(ResidualError::Checksum)
        );
        for n in 0..bytes.len() {
            assert!(Residual::from_bytes(&bytes[..n], &layout()).is_err());
        }
        let other = ModelLayout::new(&[vec![64, 64]], DistroConfig::default());
        assert!(Residual::from_bytes(&bytes, &other).is_err());
        assert_eq!(Residual::zeros(&layout()).round, None);
    }
}
