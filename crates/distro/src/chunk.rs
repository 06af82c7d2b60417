//! How a tensor is cut into DCT chunks.
//!
//! DeMo transforms every tensor in small independent blocks so the DCT stays a
//! pair of tiny matrix products and the top-k is local. The block edge along each
//! dimension is the largest divisor of that dimension not above a target (64 by
//! default), so blocks tile the tensor exactly with no padding: 96 -> 48,
//! 50280 -> 60, and a prime above the target -> 1.
//!
//! Every tensor is seen as a row-major matrix: a 1-D tensor of `n` elements is a
//! `1 x n` matrix cut into `1 x c` chunks (a DCT over a length-1 axis is the
//! identity, so this is exactly DeMo's 1-D case), a 2-D tensor is itself, and a
//! tensor with more dimensions has its leading dimensions flattened into rows.

/// The default chunk edge, as in DeMo and Psyche.
pub const DEFAULT_CHUNK: usize = 64;

/// Largest divisor of `dim` that is at most `target` (DeMo's `_get_smaller_split`).
///
/// `dim == 0` yields 1 (an empty tensor has no chunks to size) and `target == 0`
/// is treated as 1.
pub fn chunk_size(dim: usize, target: usize) -> usize {
    let target = target.max(1);
    if dim <= target {
        return dim.max(1);
    }
    (1..=target)
        .rev()
        .find(|&c| dim.is_multiple_of(c))
        .unwrap_or(1)
}

/// The chunk tiling of one tensor, seen as a `rows x cols` row-major matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkGrid {
    /// Rows of the matrix view (product of all leading dimensions; 1 for 1-D).
    pub rows: usize,
    /// Columns of the matrix view (the last dimension).
    pub cols: usize,
    /// Chunk height: divides `rows`.
    pub chunk_rows: usize,
    /// Chunk width: divides `cols`.
    pub chunk_cols: usize,
}

impl ChunkGrid {
    /// The grid DeMo uses for a tensor of `shape` with chunk target `target`.
    pub fn for_shape(shape: &[usize], target: usize) -> Self {
        // A shape whose element count overflows cannot hold data; saturate
        // rather than panic (with_chunks rejects such shapes outright).
        let (rows, cols) = matrix_view(shape).unwrap_or((usize::MAX, 1));
        let chunk_rows = if shape.len() <= 1 {
            1
        } else {
            chunk_size(rows, target)
        };
        Self {
            rows,
            cols,
            chunk_rows,
            chunk_cols: chunk_size(cols, target),
        }
    }

    /// Builds a grid from explicit chunk dimensions, checking that they tile
    /// the matrix and that the element count fits `usize`.
    pub fn with_chunks(shape: &[usize], chunk_rows: usize, chunk_cols: usize) -> Option<Self> {
        let (rows, cols) = matrix_view(shape)?;
        rows.checked_mul(cols)?;
        let tiles = |n: usize, c: usize| c >= 1 && c <= n.max(1) && n.is_multiple_of(c);
        (tiles(rows, chunk_rows) && tiles(cols, chunk_cols)).then_some(Self {
            rows,
            cols,
            chunk_rows,
            chunk_cols,
        })
    }

    /// Number of chunks down the rows.
    pub fn chunks_down(&self) -> usize {
        self.rows / self.chunk_rows
    }

    /// Number of chunks across the columns.
    pub fn chunks_across(&self) -> usize {
        self.cols / self.chunk_cols
    }

    /// Total number of chunks.
    pub fn num_chunks(&self) -> usize {
        self.chunks_down() * self.chunks_across()
    }

    /// Coefficients (and elements) in one chunk.
    pub fn chunk_elems(&self) -> usize {
        self.chunk_rows * self.chunk_cols
    }

    /// Elements in the whole tensor.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// `k` clamped to `1..=chunk_elems`, as DeMo's `_clamp_topk` does.
    pub fn clamp_topk(&self, k: usize) -> usize {
        k.clamp(1, self.chunk_elems().max(1))
    }

    /// Offset in the row-major tensor of element `(i, j)` of chunk `chunk`.
    ///
    /// Chunks are numbered row-major over the grid: `chunk = by * chunks_across + bx`.
    pub fn element_offset(&self, chunk: usize, i: usize, j: usize) -> usize {
        let across = self.chunks_across();
        let (by, bx) = (chunk / across, chunk % across);
        (by * self.chunk_rows + i) * self.cols + bx * self.chunk_cols + j
    }

    /// Copies chunk `chunk` of `tensor` into `block` (row-major `chunk_rows x chunk_cols`).
    pub fn gather_chunk(&self, tensor: &[f32], chunk: usize, block: &mut [f32]) {
        for i in 0..self.chunk_rows {
            let start = self.element_offset(chunk, i, 0);
            block[i * self.chunk_cols..(i + 1) * self.chunk_cols]
                .copy_from_slice(&tensor[start..start + self.chunk_cols]);
        }
    }
}

/// `(rows, cols)` of the matrix view of `shape`; `None` if the row count overflows.
fn matrix_view(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [] => Some((1, 1)),
        [n] => Some((1, *n)),
        [lead @ .., last] => Some((
            lead.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?,
            *last,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunk_sizes_match_demo() {
        assert_eq!(chunk_size(96, 64), 48);
        assert_eq!(chunk_size(50280, 64), 60);
        assert_eq!(chunk_size(67, 64), 1);
        assert_eq!(chunk_size(4096, 64), 64);
        assert_eq!(chunk_size(32, 64), 32);
        assert_eq!(chunk_size(1, 64), 1);
    }

    #[test]
    fn grids_for_each_rank() {
        let g = ChunkGrid::for_shape(&[96], 64);
        assert_eq!((g.rows, g.cols, g.chunk_rows, g.chunk_cols), (1, 96, 1, 48));
        let g = ChunkGrid::for_shape(&[128, 192], 64);
        assert_eq!(
            (g.chunks_down(), g.chunks_across(), g.chunk_elems()),
            (2, 3, 4096)
        );
        let g = ChunkGrid::for_shape(&[2, 3, 64], 64);
        assert_eq!((g.rows, g.cols, g.chunk_rows, g.chunk_cols), (6, 64, 6, 64));
        let g = ChunkGrid::for_shape(&[], 64);
        assert_eq!(g.numel(), 1);
        // Found by fuzzing: leading dimensions whose product overflows, with a zero last one.
        let huge = u32::MAX as usize;
        assert_eq!(ChunkGrid::with_chunks(&[huge, huge, huge, 0], 1, 1), None);
    }

    proptest! {
        #[test]
        fn chunk_size_is_largest_divisor(dim in 1usize..5000, target in 1usize..130) {
            let c = chunk_size(dim, target);
            prop_assert!(c >= 1 && c <= target.max(1) && dim % c == 0);
            prop_assert!(((c + 1)..=target.min(dim)).all(|d| dim % d != 0));
        }
    }
}
