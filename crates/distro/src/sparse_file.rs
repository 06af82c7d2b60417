//! Dense and sparse tensors in safetensors files, so researchers can feed a
//! real gradient through DisTrO and compare with other implementations.
//!
//! A sparse file holds, for every original tensor `NAME`, three tensors:
//! `NAME.offsets` (u32, `num_chunks + 1`), `NAME.indices` (u32) and
//! `NAME.values` (f32): the CSR layout of [`SparseTensor`]. Chunk `c`'s
//! entries are `offsets[c]..offsets[c+1]`; indices are flat positions inside
//! the chunk's coefficient block, row-major. When every chunk holds `k`
//! entries, `indices.reshape(chunks_down, chunks_across, k)` is exactly the
//! DeMo reference's `idx` layout. The file's metadata records the format, the
//! value encoding and, per tensor, `NAME.shape`, `NAME.chunk` (`rows,cols`) and
//! `NAME.k`. Files are untrusted input: everything read is validated.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::chunk::ChunkGrid;
use crate::sparse::{SparseError, SparseTensor, ValueEncoding};

/// Metadata key naming the format of a sparse file.
pub const FORMAT_KEY: &str = "starling.format";
/// Its value for this version.
pub const FORMAT_SPARSE_V1: &str = "distro-sparse-v1";
const VALUES_KEY: &str = "starling.values";

/// A dense named tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Tensor name, as in the model.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// A sparse named tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedSparse {
    /// Name of the dense tensor it encodes.
    pub name: String,
    /// The coefficients.
    pub tensor: SparseTensor,
}

/// Why a safetensors file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// Not a readable safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// A tensor's dtype cannot be read as floats.
    #[error("tensor {name}: dtype {dtype:?} is not a float type")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// The file is not a Starling sparse file, or its metadata is malformed.
    #[error("sparse file metadata: {0}")]
    Metadata(String),
    /// The header could not be read (the file is shorter than it says).
    #[error("sparse file metadata: {what}: {source}")]
    HeaderRead {
        /// Which part of the header.
        what: &'static str,
        /// What the reader said.
        #[source]
        source: std::io::Error,
    },
    /// The header is not JSON.
    #[error("sparse file metadata: header is not JSON: {0}")]
    HeaderJson(#[source] serde_json::Error),
    /// A sparse tensor is missing a part or its parts disagree.
    #[error("sparse tensor {name}: {reason}")]
    Sparse {
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A sparse tensor breaks an invariant.
    #[error("sparse tensor {name}: {source}")]
    Invalid {
        /// Tensor name.
        name: String,
        /// What is wrong.
        source: SparseError,
    },
}

/// Reads every float tensor of a safetensors file as f32 (F32, F64, F16 and
/// BF16 are converted), sorted by name.
pub fn read_dense(bytes: &[u8]) -> Result<Vec<NamedTensor>, FileError> {
    let st = SafeTensors::deserialize(bytes)?;
    let mut out: Vec<NamedTensor> = st
        .iter()
        .map(|(name, view)| {
            Ok(NamedTensor {
                name: name.to_string(),
                shape: view.shape().to_vec(),
                data: floats(name, &view)?,
            })
        })
        .collect::<Result<_, FileError>>()?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn floats(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, FileError> {
    let d = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        dtype => {
            return Err(FileError::Dtype {
                name: name.to_string(),
                dtype,
            });
        }
    })
}

fn u32s(view: &TensorView<'_>) -> Option<Vec<u32>> {
    (view.dtype() == Dtype::U32).then(|| {
        view.data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

/// Reads only the header of a safetensors file and returns each tensor's name
/// and shape, sorted by name: enough to size an update without loading weights.
pub fn read_shapes(mut reader: impl std::io::Read) -> Result<Vec<(String, Vec<usize>)>, FileError> {
    const MAX_HEADER: u64 = 100 << 20;
    let mut len = [0u8; 8];
    reader
        .read_exact(&mut len)
        .map_err(|source| FileError::HeaderRead {
            what: "cannot read header length",
            source,
        })?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(FileError::Metadata(format!(
            "header of {n} bytes is over the {MAX_HEADER}-byte cap"
        )));
    }
    let mut header = vec![0u8; n as usize];
    reader
        .read_exact(&mut header)
        .map_err(|source| FileError::HeaderRead {
            what: "header is truncated",
            source,
        })?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(FileError::HeaderJson)?;
    let obj = json
        .as_object()
        .ok_or_else(|| FileError::Metadata("header is not a JSON object".into()))?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| FileError::Metadata(format!("tensor {name} has no valid shape")))?;
        out.push((name.clone(), shape));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Writes dense tensors as an F32 safetensors file.
pub fn write_dense(tensors: &[NamedTensor]) -> Result<Vec<u8>, FileError> {
    let views = tensors
        .iter()
        .map(|t| {
            Ok((
                t.name.clone(),
                TensorView::new(Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.data))?,
            ))
        })
        .collect::<Result<Vec<_>, FileError>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Writes sparse tensors (see the module docs for the layout).
pub fn write_sparse(tensors: &[NamedSparse], values: ValueEncoding) -> Result<Vec<u8>, FileError> {
    let mut meta = HashMap::new();
    meta.insert(FORMAT_KEY.to_string(), FORMAT_SPARSE_V1.to_string());
    meta.insert(VALUES_KEY.to_string(), values.name().to_string());
    let mut views = Vec::with_capacity(tensors.len() * 3);
    for NamedSparse { name, tensor: t } in tensors {
        let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        meta.insert(format!("{name}.shape"), join(&t.shape));
        meta.insert(
            format!("{name}.chunk"),
            join(&[t.grid.chunk_rows, t.grid.chunk_cols]),
        );
        meta.insert(format!("{name}.k"), t.k.to_string());
        views.push((
            format!("{name}.offsets"),
            TensorView::new(
                Dtype::U32,
                vec![t.offsets.len()],
                bytemuck::cast_slice(&t.offsets),
            )?,
        ));
        views.push((
            format!("{name}.indices"),
            TensorView::new(
                Dtype::U32,
                vec![t.indices.len()],
                bytemuck::cast_slice(&t.indices),
            )?,
        ));
        views.push((
            format!("{name}.values"),
            TensorView::new(
                Dtype::F32,
                vec![t.values.len()],
                bytemuck::cast_slice(&t.values),
            )?,
        ));
    }
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Reads and validates a sparse file; tensors come sorted by name.
pub fn read_sparse(bytes: &[u8]) -> Result<(ValueEncoding, Vec<NamedSparse>), FileError> {
    let (_, metadata) = SafeTensors::read_metadata(bytes)?;
    let meta = metadata
        .metadata()
        .clone()
        .ok_or_else(|| FileError::Metadata("no metadata: not a Starling sparse file".into()))?;
    if meta.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT_SPARSE_V1) {
        return Err(FileError::Metadata(format!(
            "{FORMAT_KEY} is not {FORMAT_SPARSE_V1}"
        )));
    }
    let values = meta
        .get(VALUES_KEY)
        .and_then(|v| ValueEncoding::from_name(v))
        .ok_or_else(|| FileError::Metadata(format!("{VALUES_KEY} missing or unknown")))?;
    let st = SafeTensors::deserialize(bytes)?;
    let mut parts: BTreeMap<String, [Option<TensorView<'_>>; 3]> = BTreeMap::new();
    for (name, view) in st.iter() {
        let (base, slot) = if let Some(b) = name.strip_suffix(".offsets") {
            (b, 0)
        } else if let Some(b) = name.strip_suffix(".indices") {
            (b, 1)
        } else if let Some(b) = name.strip_suffix(".values") {
            (b, 2)
        } else {
            return Err(FileError::Metadata(format!("unexpected tensor {name}")));
        };
        parts.entry(base.to_string()).or_default()[slot] = Some(view);
    }
    let mut out = Vec::with_capacity(parts.len());
    for (name, [offsets, indices, vals]) in parts {
        let bad = |reason: &str| FileError::Sparse {
            name: name.clone(),
            reason: reason.to_string(),
        };
        let (Some(offsets), Some(indices), Some(vals)) = (offsets, indices, vals) else {
            return Err(bad("needs .offsets, .indices and .values"));
        };
        let list = |key: &str| -> Result<Vec<usize>, FileError> {
            let text = meta
                .get(&format!("{name}.{key}"))
                .ok_or_else(|| bad(&format!("metadata {key} missing")))?;
            if text.is_empty() {
                return Ok(Vec::new());
            }
            text.split(',')
                .map(|s| {
                    s.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(&format!("metadata {key} is not a list of sizes")))
                })
                .collect()
        };
        let shape = list("shape")?;
        let chunk = list("chunk")?;
        let k = list("k")?;
        let (&[chunk_rows, chunk_cols], &[k]) = (chunk.as_slice(), k.as_slice()) else {
            return Err(bad("chunk must be rows,cols and k one number"));
        };
        if shape.len() > crate::wire::MAX_NDIM
            || shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .is_none()
        {
            return Err(bad("shape is too large"));
        }
        let grid = ChunkGrid::with_chunks(&shape, chunk_rows, chunk_cols)
            .ok_or_else(|| bad("chunk dimensions do not tile the shape"))?;
        let tensor = SparseTensor {
            shape,
            grid,
            k,
            offsets: u32s(&offsets).ok_or_else(|| bad(".offsets must be U32"))?,
            indices: u32s(&indices).ok_or_else(|| bad(".indices must be U32"))?,
            values: if vals.dtype() == Dtype::F32 {
                floats(&name, &vals)?
            } else {
                return Err(bad(".values must be F32"));
            },
        };
        tensor.validate().map_err(|source| FileError::Invalid {
            name: name.clone(),
            source,
        })?;
        out.push(NamedSparse { name, tensor });
    }
    Ok((values, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{compress, decompress};

    #[test]
    fn sparse_roundtrip_through_a_file() {
        let x: Vec<f32> = (0..96 * 64).map(|i| (i as f32 * 0.01).cos()).collect();
        let s = compress(&x, &[96, 64], 8, 64).expect("compress");
        let named = vec![NamedSparse {
            name: "layers.0.w".into(),
            tensor: s.clone(),
        }];
        let bytes = write_sparse(&named, ValueEncoding::F32).expect("write");
        let (values, back) = read_sparse(&bytes).expect("read");
        assert_eq!(values, ValueEncoding::F32);
        assert_eq!(back, named);
        assert_eq!(
            decompress(&[&back[0].tensor]).expect("d"),
            decompress(&[&s]).expect("d")
        );
    }

    #[test]
    fn dense_roundtrip_and_bf16_input() {
        let t = NamedTensor {
            name: "g".into(),
            shape: vec![2, 3],
            data: vec![1.0, -2.0, 3.5, 0.0, 1e-3, 7.0],
        };
        let bytes = write_dense(std::slice::from_ref(&t)).expect("write");
        assert_eq!(read_dense(&bytes).expect("read"), vec![t]);
        let raw: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let view = TensorView::new(Dtype::BF16, vec![2], &raw).expect("view");
        let bytes = safetensors::serialize([("h", view)], None).expect("ser");
        assert_eq!(read_dense(&bytes).expect("read")[0].data, vec![1.5, -2.0]);
    }

    #[test]
    fn shapes_come_from_the_header_alone() {
        let t = NamedTensor {
            name: "w".into(),
            shape: vec![3, 2],
            data: vec![0.0; 6],
        };
        let bytes = write_dense(&[t]).expect("write");
        let header_only = &bytes[..bytes.len() - 24];
        assert_eq!(
            read_shapes(header_only).expect("shapes"),
            vec![("w".to_string(), vec![3, 2])]
        );
        let err = read_shapes(&bytes[..5]).expect_err("truncated");
        assert!(
            matches!(&err, FileError::HeaderRead { source, .. }
                if source.kind() == std::io::ErrorKind::UnexpectedEof),
            "{err}"
        );
    }

    #[test]
    fn hostile_sparse_files_are_refused() {
        let s = compress(&[1.0, 2.0, 3.0, 4.0], &[4], 2, 64).expect("compress");
        let mut bad = s.clone();
        bad.indices[0] = 9;
        let named = vec![NamedSparse {
            name: "t".into(),
            tensor: bad,
        }];
        let bytes = write_sparse(&named, ValueEncoding::F32).expect("write");
        assert!(matches!(
            read_sparse(&bytes),
            Err(FileError::Invalid { .. })
        ));
        assert!(read_sparse(b"garbage").is_err());
        let dense = write_dense(&[NamedTensor {
            name: "t".into(),
            shape: vec![1],
            data: vec![1.0],
        }])
        .expect("w");
        assert!(matches!(read_sparse(&dense), Err(FileError::Metadata(_))));
    }
}
