//! DisTrO in its published form, DeMo (Peng, Quesnelle, Kingma 2024): each peer
//! keeps its own momentum and sends only the few largest DCT coefficients of
//! it; everyone applies the sign of the average of what was sent.
//!
//! This crate is the math and the bytes, and nothing else: no network, no GUI.
//! Its CPU path is the reference semantics (checked against the public DeMo
//! code in `reference_tests`) and is deterministic to the bit, so every peer of
//! a run holds identical weights after each round. The GPU paths in [`gpu`]
//! compute the same step on Burn tensors and end in the same certified,
//! deterministic apply (see [`sign`]).
//!
//! The pieces, in the order a round uses them:
//! - [`chunk_size`] / [`ChunkGrid`]: how a tensor is cut into DCT chunks;
//! - [`dct_basis`]: the orthonormal DCT-II, `[position][frequency]`;
//! - [`compress`] / [`decompress`]: one tensor to sparse coefficients and back;
//! - [`DistroOptimizer`]: momentum, `step` (what to send), `apply` (the round's update);
//! - [`wire`]: the compact, checked byte format of an update, and
//!   [`wire::aggregate`] that of a round's merged updates;
//! - [`robust`]: the coordinator's screen of a round's updates (empty,
//!   copied, oversized or contrary ones left out; the rest clipped);
//! - [`cap`]: the coordinator's optional top-K of that aggregate, with the
//!   remainder carried to the next round;
//! - [`budget`]: bytes per step, and the top-k that fits a bandwidth budget;
//! - [`sparse_file`]: sparse and dense tensors in safetensors files.

pub mod budget;
pub mod cap;
pub mod chunk;
pub mod compress;
pub mod dct;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod optimizer;
pub mod robust;
pub mod sign;
pub mod sparse;
pub mod sparse_file;
pub mod wire;

#[cfg(test)]
mod reference_tests;

pub use budget::{TensorBudget, budget_topk, update_wire_bytes};
pub use cap::{CapError, Residual, ResidualError};
pub use chunk::{ChunkGrid, DEFAULT_CHUNK, chunk_size};
pub use compress::{CompressError, DecompressError, aggregate, compress, decompress};
pub use dct::dct_basis;
pub use optimizer::{
    ApplyError, ApplyReport, DistroConfig, DistroOptimizer, IncomingUpdate, ModelLayout,
    OutgoingUpdate, PeerId, StepError, StepOptions, TensorLayout,
};
pub use robust::{Rejection, RobustConfig, Screening, Verdict, screen};
pub use sparse::{SparseError, SparseTensor, ValueEncoding};

/// BLAKE3 digest of a model's weights (each tensor's little-endian f32 bytes, in
/// order): what peers compare to prove their replicas are bit-identical.
pub fn weights_digest<'a>(tensors: impl IntoIterator<Item = &'a [f32]>) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for t in tensors {
        h.update(&(t.len() as u64).to_le_bytes());
        for v in t {
            h.update(&v.to_le_bytes());
        }
    }
    h.finalize()
}
