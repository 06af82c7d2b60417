//! Pins our conventions to the public DeMo reference's outputs
//! (`testdata/demo_vectors.json`, see its README).

use serde::Deserialize;

use crate::{ChunkGrid, chunk_size, compress, dct_basis, decompress};

#[derive(Deserialize)]
struct Vectors {
    dct8_forward_matrix: Vec<Vec<f32>>,
    param_2d: Vec<Vec<f32>>,
    encoded_2d_shape: Vec<usize>,
    topk: usize,
    idx_2d_sorted: Vec<Vec<Vec<u32>>>,
    val_2d_by_sorted_idx: Vec<Vec<Vec<f32>>>,
    decoded_2d: Vec<Vec<f32>>,
    param_1d: Vec<f32>,
    encoded_1d_shape: Vec<usize>,
    idx_1d_sorted: Vec<Vec<u32>>,
    val_1d_by_sorted_idx: Vec<Vec<f32>>,
}

fn vectors() -> Vectors {
    let text = include_str!("../testdata/demo_vectors.json");
    serde_json::from_str(text).expect("reference vectors parse")
}

const TOL: f32 = 1e-5;

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= TOL * (1.0 + b.abs())
}

#[test]
fn dct_basis_matches_reference() {
    let v = vectors();
    let m = dct_basis(8);
    for (p, row) in v.dct8_forward_matrix.iter().enumerate() {
        for (k, &want) in row.iter().enumerate() {
            assert!(
                close(m[p * 8 + k], want),
                "M[{p}][{k}] = {} vs {want}",
                m[p * 8 + k]
            );
        }
    }
}

#[test]
fn compress_2d_matches_reference() {
    let v = vectors();
    let shape = [v.param_2d.len(), v.param_2d[0].len()];
    let flat: Vec<f32> = v.param_2d.concat();
    let grid = ChunkGrid::for_shape(&shape, 64);
    assert_eq!(
        [
            grid.chunks_down(),
            grid.chunks_across(),
            grid.chunk_rows,
            grid.chunk_cols
        ],
        v.encoded_2d_shape[..]
    );
    let s = compress(&flat, &shape, v.topk, 64).expect("compress");
    for y in 0..grid.chunks_down() {
        for x in 0..grid.chunks_across() {
            let (idx, val) = s.chunk(y * grid.chunks_across() + x);
            assert_eq!(idx, &v.idx_2d_sorted[y][x][..], "chunk ({y},{x})");
            for (a, b) in val.iter().zip(&v.val_2d_by_sorted_idx[y][x]) {
                assert!(close(*a, *b), "chunk ({y},{x}): {a} vs {b}");
            }
        }
    }
    let decoded = decompress(&[&s]).expect("decompress");
    for (a, b) in decoded.iter().zip(v.decoded_2d.concat()) {
        assert!(close(*a, b), "decoded {a} vs {b}");
    }
}

#[test]
fn compress_1d_matches_reference() {
    let v = vectors();
    assert_eq!(chunk_size(v.param_1d.len(), 64), v.encoded_1d_shape[1]);
    let s = compress(&v.param_1d, &[v.param_1d.len()], v.topk, 64).expect("compress");
    assert_eq!(s.grid.num_chunks(), v.encoded_1d_shape[0]);
    for c in 0..s.grid.num_chunks() {
        let (idx, val) = s.chunk(c);
        assert_eq!(idx, &v.idx_1d_sorted[c][..]);
        for (a, b) in val.iter().zip(&v.val_1d_by_sorted_idx[c]) {
            assert!(close(*a, *b), "{a} vs {b}");
        }
    }
}
