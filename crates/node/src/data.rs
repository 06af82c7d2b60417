//! The run's training data as it travels: one blob of fixed-width token ids
//! that the host serves, and the windows a volunteer fetched from it.
//!
//! The host tokenizes once (`starling data prepare`, or the embedded corpus)
//! and serves the whole stream as a single BLAKE3-verified blob. Because ids
//! have a fixed width, a training window is a byte range, so a volunteer
//! fetches only the few kilobytes its assigned windows cover instead of the
//! dataset, and every byte it trains on is verified against the hash in the
//! run spec the host signed off on.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use starling_swarm::BlobRef;
use starling_train::{
    data::shards::{ShardError, TokenDtype, TokenStore},
    embedded_store,
};

/// Why the run's data cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The embedded corpus could not be built.
    #[error("embedded corpus: {0}")]
    Embedded(#[source] ShardError),
    /// The shard directory could not be loaded.
    #[error("shards in {}: {source}", dir.display())]
    Shards {
        /// The shard directory.
        dir: PathBuf,
        /// Why it does not load.
        #[source]
        source: ShardError,
    },
    /// The blob's size is not its token count times the id width.
    #[error("run data: {tokens} tokens of {width} bytes do not make a {size}-byte blob")]
    Size {
        /// Tokens the description claims.
        tokens: u64,
        /// Bytes per id.
        width: u64,
        /// The blob's size.
        size: u64,
    },
    /// The vocabulary does not fit the id width.
    #[error("run data: a vocabulary of {vocab_size} does not fit 16-bit ids")]
    Vocab {
        /// The vocabulary the description claims.
        vocab_size: usize,
    },
    /// The data differs from what the run was started with.
    #[error(
        "the data ({found}) is not the data this run started with ({expected}); restore the original shards"
    )]
    Changed {
        /// Hash the run expects.
        expected: String,
        /// Hash of what was given.
        found: String,
    },
    /// A fetched window is not what the spec promises.
    #[error("fetched window at token {offset}: {reason}")]
    Window {
        /// Start of the window.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// The token stream of a run as the host serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRef {
    /// The blob of little-endian ids, in stream order.
    pub blob: BlobRef,
    /// Tokens in it.
    pub tokens: u64,
    /// Width of each id.
    pub dtype: TokenDtype,
    /// Every id is below this.
    pub vocab_size: usize,
    /// Tokenizer name (informational).
    pub tokenizer: String,
}

/// Load the run's tokens: the shard directory `data` (relative to `base`)
/// or, when `data` is empty, the embedded corpus of `corpus_bytes`.
pub fn load_tokens(
    data: &str,
    corpus_bytes: usize,
    seed: u64,
    base: &Path,
) -> Result<TokenStore, DataError> {
    if data.is_empty() {
        embedded_store(corpus_bytes, seed).map_err(DataError::Embedded)
    } else {
        let dir = base.join(data);
        TokenStore::load(&dir).map_err(|source| DataError::Shards { dir, source })
    }
}

impl DataRef {
    /// Describe `store` and return the blob bytes it is served as.
    pub fn describe(store: &TokenStore) -> (Self, Vec<u8>) {
        let dtype = store.index.dtype;
        let bytes = dtype.encode(store.tokens());
        let data = Self {
            blob: BlobRef::of(&bytes),
            tokens: store.tokens().len() as u64,
            dtype,
            vocab_size: store.index.vocab_size,
            tokenizer: store.index.tokenizer.clone(),
        };
        (data, bytes)
    }

    /// Check that `store` is exactly this data; returns the blob bytes.
    pub fn matches(&self, store: &TokenStore) -> Result<Vec<u8>, DataError> {
        let (found, bytes) = Self::describe(store);
        if found != *self {
            return Err(DataError::Changed {
                expected: self.blob.hex(),
                found: found.blob.hex(),
            });
        }
        Ok(bytes)
    }

    /// Check the description is self-consistent (it came from the network).
    pub fn check(&self) -> Result<(), DataError> {
        let width = self.dtype.bytes() as u64;
        if self.tokens.checked_mul(width) != Some(self.blob.size) {
            return Err(DataError::Size {
                tokens: self.tokens,
                width,
                size: self.blob.size,
            });
        }
        if self.dtype == TokenDtype::U16 && self.vocab_size > 1 << 16 {
            return Err(DataError::Vocab {
                vocab_size: self.vocab_size,
            });
        }
        Ok(())
    }

    /// The bytes of the `len` tokens from `offset`.
    pub fn byte_range(&self, offset: u64, len: u64) -> Range<u64> {
        let width = self.dtype.bytes() as u64;
        offset.saturating_mul(width)..offset.saturating_add(len).saturating_mul(width)
    }

    /// Decode a fetched window of `len` tokens, checking its length and ids.
    pub fn decode_window(
        &self,
        offset: u64,
        len: u64,
        bytes: &[u8],
    ) -> Result<Vec<u32>, DataError> {
        let bad = |reason: String| DataError::Window { offset, reason };
        let expected = self.byte_range(offset, len);
        if bytes.len() as u64 != expected.end - expected.start {
            return Err(bad(format!(
                "{} bytes, expected {}",
                bytes.len(),
                expected.end - expected.start
            )));
        }
        let tokens = self.dtype.decode(bytes);
        if let Some(id) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(bad(format!(
                "id {id} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        Ok(tokens)
    }
}

/// The tokens a replica can read.
#[derive(Debug)]
pub enum Tokens {
    /// The whole stream (the host, or a test).
    All(TokenStore),
    /// Windows fetched from the host, by start offset; each is dropped once
    /// trained on.
    Fetched(HashMap<u64, Vec<u32>>),
}

impl Tokens {
    /// Windows fetched on demand (a volunteer).
    pub fn fetched() -> Self {
        Self::Fetched(HashMap::new())
    }

    /// The `len` tokens from `offset`, if held.
    pub fn window(&self, offset: u64, len: u64) -> Option<&[u32]> {
        match self {
            Self::All(store) => store.window(offset, len),
            Self::Fetched(windows) => windows
                .get(&offset)
                .filter(|w| w.len() as u64 == len)
                .map(Vec::as_slice),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> TokenStore {
        TokenStore::from_tokens((0..5000u32).map(|i| i % 256).collect(), "bytes", 256).unwrap()
    }

    #[test]
    fn windows_round_trip_through_byte_ranges() {
        let s = store();
        let (data, bytes) = DataRef::describe(&s);
        data.check().unwrap();
        assert_eq!(data.matches(&s).unwrap(), bytes);
        let r = data.byte_range(1000, 65);
        let w = data
            .decode_window(1000, 65, &bytes[r.start as usize..r.end as usize])
            .unwrap();
        assert_eq!(w, s.window(1000, 65).unwrap());
        let mut fetched = Tokens::fetched();
        if let Tokens::Fetched(m) = &mut fetched {
            m.insert(1000, w);
        }
        assert_eq!(fetched.window(1000, 65), s.window(1000, 65));
        assert_eq!(fetched.window(1000, 64), None);
        assert_eq!(fetched.window(999, 65), None);
    }

    #[test]
    fn bad_windows_and_descriptions_are_errors() {
        let s = store();
        let (data, _) = DataRef::describe(&s);
        assert!(data.decode_window(0, 4, &[0; 7]).is_err());
        let small = DataRef {
            vocab_size: 10,
            ..data.clone()
        };
        assert!(matches!(
            small.decode_window(0, 2, &[200, 0, 1, 0]),
            Err(DataError::Window { .. })
        ));
        let lying = DataRef {
            tokens: data.tokens + 1,
            ..data.clone()
        };
        let err = lying.check().unwrap_err();
        assert!(matches!(err, DataError::Size { .. }), "{err}");
        assert!(err.to_string().contains("5001 tokens"), "{err}");
        let wide = DataRef {
            dtype: TokenDtype::U16,
            tokens: data.blob.size / 2,
            vocab_size: 1 << 17,
            ..data.clone()
        };
        assert!(matches!(wide.check(), Err(DataError::Vocab { .. })));
        let other = TokenStore::from_tokens(vec![1, 2, 3], "bytes", 256).unwrap();
        assert!(matches!(
            data.matches(&other),
            Err(DataError::Changed { .. })
        ));
    }
}
