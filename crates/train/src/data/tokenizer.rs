//! Byte-level tokenization: every UTF-8 byte is a token (vocabulary 256), so
//! any text works with no vocabulary file and nothing to download.

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
