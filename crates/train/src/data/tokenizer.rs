//! Tokenization. Byte-level needs nothing: every UTF-8 byte is a token
//! (vocabulary 256), so any text works with no file and nothing to download.
//! Real models use a Hugging Face `tokenizer.json`, read from a local file
//! (never fetched) through the `tokenizers` crate.

use std::path::{Path, PathBuf};

/// The byte-level tokenizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Vocabulary size: one token per byte value.
    pub const VOCAB: usize = 256;

    /// Token ids of `text`: its UTF-8 bytes.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Text of `tokens`; ids above 255 and invalid UTF-8 become U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let bytes: Vec<u8> = tokens
            .iter()
            .map(|&t| u8::try_from(t).unwrap_or(b'?'))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The file is missing or not a valid `tokenizer.json`.
    #[error("{path}: not a usable tokenizer.json: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the library said (its errors are opaque boxes).
        #[source]
        source: tokenizers::Error,
    },
    /// Encoding a text failed.
    #[error("cannot tokenize: {0}")]
    Encode(#[source] tokenizers::Error),
}

/// Any tokenizer Starling can prepare data with.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One token per byte.
    Bytes,
    /// A Hugging Face `tokenizer.json`, with the file name it came from.
    HuggingFace {
        /// The loaded tokenizer.
        inner: Box<tokenizers::Tokenizer>,
        /// File name, recorded in the shard index.
        name: String,
    },
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|source| TokenizerError::Load {
                path: path.to_path_buf(),
                source,
            })?;
        let name = path.file_name().map_or_else(
            || "tokenizer.json".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Self::HuggingFace {
            inner: Box::new(inner),
            name,
        })
    }

    /// The name recorded in a shard index: `bytes`, or `hf:<file name>`.
    pub fn name(&self) -> String {
        match self {
            Self::Bytes => "bytes".into(),
            Self::HuggingFace { name, .. } => format!("hf:{name}"),
        }
    }

    /// Every id is below this.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => ByteTokenizer::VOCAB,
            Self::HuggingFace { inner, .. } => inner.get_vocab_size(true),
        }
    }

    /// Token ids of one document (with the tokenizer's own special tokens,
    /// e.g. a beginning-of-sequence marker, where it adds them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Bytes => Ok(ByteTokenizer.encode(text)),
            Self::HuggingFace { inner, .. } => inner
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(TokenizerError::Encode),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small word-level tokenizer.json, made here (nothing downloaded).
    pub(crate) fn word_tokenizer(dir: &Path) -> PathBuf {
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {
                "type": "WordLevel",
                "vocab": {"[UNK]": 0, "the": 1, "cow": 2, "says": 3, "moo": 4, ".": 5},
                "unk_token": "[UNK]"
            }
        });
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    #[test]
    fn hugging_face_tokenizer_files_load_and_encode() {
        let dir = std::env::temp_dir().join(format!("starling-tok-{}", std::process::id()));
        let t = Tokenizer::from_file(&word_tokenizer(&dir)).unwrap();
        assert_eq!(t.name(), "hf:tokenizer.json");
        assert_eq!(t.vocab_size(), 6);
        assert_eq!(t.encode("the cow says moo.").unwrap(), vec![1, 2, 3, 4, 5]);
        assert_eq!(t.encode("the dog").unwrap(), vec![1, 0]);
        std::fs::write(dir.join("bad.json"), "{not json").unwrap();
        let err = Tokenizer::from_file(&dir.join("bad.json")).unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
        assert!(Tokenizer::from_file(&dir.join("missing.json")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn roundtrip(text in ".{0,200}") {
            let t = ByteTokenizer;
            let ids = t.encode(&text);
            prop_assert!(ids.iter().all(|&i| (i as usize) < ByteTokenizer::VOCAB));
            prop_assert_eq!(t.decode(&ids), text);
        }
    }
}
