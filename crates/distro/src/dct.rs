//! The orthonormal DCT-II that DeMo applies to every chunk, computed so that
//! every machine gets the same bits.
//!
//! Two choices keep peers bit-identical. The basis is built from a cosine made
//! of IEEE-754 `f64` additions and multiplications only (no libm, whose last bit
//! differs between platforms), then rounded to `f32`. And the block transforms
//! are plain loops with a fixed summation order: Rust never contracts `a*b+c`
//! into an FMA nor reassociates float sums, so the compiler may vectorise the
//! loops (across outputs) but the result of every element is the same on every
//! CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The `n`-point orthonormal DCT-II basis, row-major `[position][frequency]`:
/// `M[p][k] = sqrt(2/n) * c_k * cos(pi * (2p + 1) * k / (2n))` with `c_0 = 1/sqrt(2)`.
///
/// `C = M^T x` is the forward transform of a column vector `x`, and since `M` is
/// orthonormal, `x = M C` is the inverse. `n == 0` yields an empty matrix.
pub fn dct_basis(n: usize) -> Vec<f32> {
    let mut m = Vec::with_capacity(n * n);
    let nf = n as f64;
    for p in 0..n {
        for k in 0..n {
            let scale = if k == 0 {
                (1.0 / nf).sqrt()
            } else {
                (2.0 / nf).sqrt()
            };
            // The angle is pi * q / (2n) with q = (2p+1)k, reduced exactly in integers.
            let q = ((2 * p + 1) * k) as u64;
            m.push((scale * cos_half_turns(q, 2 * n as u64)) as f32);
        }
    }
    m
}

/// `cos(pi * q / d)` from exact integer range reduction and a Taylor series on
/// `[0, pi/2]`: deterministic across platforms, accurate to about 1e-16.
fn cos_half_turns(q: u64, d: u64) -> f64 {
    // A full turn is 2d half-turn units.
    let mut m = q % (2 * d);
    if m > d {
        m = 2 * d - m; // cos(2pi - a) = cos(a)
    }
    let (m, negate) = if 2 * m > d { (d - m, true) } else { (m, false) }; // cos(pi - a) = -cos(a)
    let x = std::f64::consts::PI * m as f64 / d as f64; // in [0, pi/2]
    let x2 = x * x;
    // Horner form of sum_{i=0}^{11} (-1)^i x^(2i) / (2i)!, evaluated from the top.
    let mut term = 1.0f64;
    for i in (1..=11u32).rev() {
        let denom = f64::from((2 * i - 1) * (2 * i));
        term = 1.0 - x2 / denom * term;
    }
    if negate { -term } else { term }
}

/// One chunk size's basis in the two layouts the block transforms read.
#[derive(Debug)]
pub struct DctBasis {
    /// Points of the transform.
    pub n: usize,
    /// `[position][frequency]` (the forward matrix `M`).
    pub forward: Vec<f32>,
    /// `[frequency][position]` (`M^T`, what the inverse reads row by row).
    pub inverse: Vec<f32>,
}

impl DctBasis {
    /// Builds the basis for `n` points.
    pub fn new(n: usize) -> Self {
        let forward = dct_basis(n);
        let mut inverse = vec![0.0; n * n];
        for p in 0..n {
            for k in 0..n {
                inverse[k * n + p] = forward[p * n + k];
            }
        }
        Self {
            n,
            forward,
            inverse,
        }
    }
}

/// Shares bases between tensors with the same chunk sizes.
#[derive(Debug, Default)]
pub struct BasisCache {
    bases: Mutex<HashMap<usize, Arc<DctBasis>>>,
}

impl BasisCache {
    /// The basis for `n` points, built on first use.
    pub fn get(&self, n: usize) -> Arc<DctBasis> {
        // A poisoned lock only means another thread panicked mid-insert of an
        // immutable value; the map is still consistent.
        let mut bases = self
            .bases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bases
            .entry(n)
            .or_insert_with(|| Arc::new(DctBasis::new(n)))
            .clone()
    }
}

/// The 2-D DCT of `chunk_rows x chunk_cols` blocks: `C = Mr^T X Mc`, `X = Mr C Mc^T`.
#[derive(Clone, Debug)]
pub struct BlockTransform {
    rows: Arc<DctBasis>,
    cols: Arc<DctBasis>,
}

impl BlockTransform {
    /// A transform for blocks of `chunk_rows x chunk_cols`.
    pub fn new(cache: &BasisCache, chunk_rows: usize, chunk_cols: usize) -> Self {
        Self {
            rows: cache.get(chunk_rows),
            cols: cache.get(chunk_cols),
        }
    }

    /// Block height.
    pub fn chunk_rows(&self) -> usize {
        self.rows.n
    }

    /// Block width.
    pub fn chunk_cols(&self) -> usize {
        self.cols.n
    }

    /// Basis along the rows (block height).
    pub fn row_basis(&self) -> &DctBasis {
        &self.rows
    }

    /// Basis along the columns (block width).
    pub fn col_basis(&self) -> &DctBasis {
        &self.cols
    }

    /// `out = Mr^T x Mc`. `scratch` and `out` hold a block each.
    pub fn forward(&self, x: &[f32], out: &mut [f32], scratch: &mut [f32]) {
        let (r, c) = (self.rows.n, self.cols.n);
        // T = X Mc: row i of T is sum_j X[i][j] * (row j of Mc).
        scratch[..r * c].fill(0.0);
        for i in 0..r {
            let t = &mut scratch[i * c..(i + 1) * c];
            for j in 0..c {
                axpy(t, x[i * c + j], &self.cols.forward[j * c..(j + 1) * c]);
            }
        }
        // C = Mr^T T: row a of C is sum_i Mr[i][a] * (row i of T).
        out[..r * c].fill(0.0);
        for a in 0..r {
            let o = &mut out[a * c..(a + 1) * c];
            for i in 0..r {
                axpy(
                    o,
                    self.rows.forward[i * r + a],
                    &scratch[i * c..(i + 1) * c],
                );
            }
        }
    }

    /// `out = Mr coeffs Mc^T`. `scratch` and `out` hold a block each. Zero
    /// coefficients are skipped, so a sparse block costs little.
    pub fn inverse(&self, coeffs: &[f32], out: &mut [f32], scratch: &mut [f32]) {
        let (r, c) = (self.rows.n, self.cols.n);
        // U = C Mc^T: row a of U is sum_b C[a][b] * (row b of Mc^T).
        scratch[..r * c].fill(0.0);
        let mut nonzero_rows = 0u64; // bit a set if row a of U is non-zero (r <= 64 fast path)
        for a in 0..r {
            let u = &mut scratch[a * c..(a + 1) * c];
            for b in 0..c {
                let v = coeffs[a * c + b];
                if v != 0.0 {
                    axpy(u, v, &self.cols.inverse[b * c..(b + 1) * c]);
                    if a < 64 {
                        nonzero_rows |= 1 << a;
                    }
                }
            }
        }
        // X = Mr U: row i of X is sum_a Mr[i][a] * (row a of U).
        out[..r * c].fill(0.0);
        for i in 0..r {
            let o = &mut out[i * c..(i + 1) * c];
            for a in 0..r {
                if a < 64 && nonzero_rows & (1 << a) == 0 {
                    continue; // adding a zero row changes no bit: skipping it keeps the result
                }
                axpy(
                    o,
                    self.rows.forward[i * r + a],
                    &scratch[a * c..(a + 1) * c],
                );
            }
        }
    }
}

/// `y += a * x`, element by element (never fused, so the same bits everywhere).
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_is_accurate() {
        for d in 1..200u64 {
            for q in 0..(5 * d) {
                // Reduce first: libm's own argument error grows with q.
                let want = (std::f64::consts::PI * (q % (2 * d)) as f64 / d as f64).cos();
                let got = cos_half_turns(q, d);
                assert!((want - got).abs() < 1e-14, "q={q} d={d}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn basis_is_orthonormal() {
        for n in [1, 2, 7, 48, 60, 64] {
            let m = dct_basis(n);
            for a in 0..n {
                for b in 0..n {
                    let dot: f64 = (0..n)
                        .map(|p| f64::from(m[p * n + a]) * f64::from(m[p * n + b]))
                        .sum();
                    let want = if a == b { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-6, "n={n} a={a} b={b} dot={dot}");
                }
            }
        }
    }

    #[test]
    fn forward_then_inverse_is_identity() {
        let cache = BasisCache::default();
        let t = BlockTransform::new(&cache, 6, 64);
        let x: Vec<f32> = (0..6 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (mut c, mut back, mut s) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
        t.forward(&x, &mut c, &mut s);
        t.inverse(&c, &mut back, &mut s);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
