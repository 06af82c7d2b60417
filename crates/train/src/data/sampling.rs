//! Which tokens a peer trains on: a pure function of (run seed, round, slot).
//!
//! Nothing about timing, arrival order or the machine enters the choice, so a
//! run replays exactly and the host can recompute any peer's batch to check
//! what it claims to have trained on. The last part of the token stream is
//! held out for evaluation and never sampled for training.

use super::rng::splitmix64 as mix;

/// Which part of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training part.
    Train,
    /// The held-out part.
    Eval,
}

/// Why a sampler cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SamplerError {
    /// Too few tokens for one window in each split.
    #[error(
        "{tokens} tokens cannot hold a {window}-token window in both the training and the held-out part"
    )]
    TooFewTokens {
        /// Tokens available.
        tokens: u64,
        /// Window length (sequence length + 1).
        window: u64,
    },
    /// The held-out fraction is not in (0, 1).
    #[error("held-out fraction {0} must be between 0 and 1")]
    EvalFraction(f64),
}

/// Deterministic windows over a token stream of known length.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampler {
    seed: u64,
    window: u64,
    train_tokens: u64,
    eval_tokens: u64,
}

/// A uniform integer below `n` from 64 random bits (multiply-shift, no modulo bias to speak of).
fn below(bits: u64, n: u64) -> u64 {
    ((u128::from(bits) * u128::from(n)) >> 64) as u64
}

impl Sampler {
    /// Windows of `seq_len + 1` tokens (inputs and their next-token targets)
    /// over `tokens` tokens, the last `eval_fraction` of which are held out.
    pub fn new(
        tokens: u64,
        seq_len: usize,
        eval_fraction: f64,
        seed: u64,
    ) -> Result<Self, SamplerError> {
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(SamplerError::EvalFraction(eval_fraction));
        }
        let window = seq_len as u64 + 1;
        let eval_tokens = ((tokens as f64) * eval_fraction).ceil() as u64;
        let train_tokens = tokens.saturating_sub(eval_tokens);
        if train_tokens < window || eval_tokens < window {
            return Err(SamplerError::TooFewTokens { tokens, window });
        }
        Ok(Self {
            seed,
            window,
            train_tokens,
            eval_tokens,
        })
    }

    /// Tokens per window.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Start offsets of the `batch` training windows peer `slot` uses in `round`.
    pub fn train_windows(&self, round: u64, slot: u32, batch: usize) -> Vec<u64> {
        let starts = self.train_tokens - self.window + 1;
        let key = mix(self.seed ^ mix(round ^ mix(u64::from(slot) ^ 0x5EED)));
        (0..batch as u64)
            .map(|i| below(mix(key ^ i), starts))
            .collect()
    }

    /// `count` fixed held-out windows, evenly spread over the held-out part
    /// (the same for every peer and round, so eval losses compare).
    pub fn eval_windows(&self, count: usize) -> Vec<u64> {
        let starts = self.eval_tokens - self.window + 1;
        let count = count.max(1) as u64;
        (0..count)
            .map(|i| self.train_tokens + i * starts / count)
            .collect()
    }

    /// The split an offset falls in.
    pub fn split_of(&self, offset: u64) -> Split {
        if offset < self.train_tokens {
            Split::Train
        } else {
            Split::Eval
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn batches_are_a_pure_function_of_seed_round_and_slot() {
        let s = Sampler::new(100_000, 64, 0.1, 7).expect("sampler");
        assert_eq!(
            s.train_windows(3, 1, 8),
            Sampler::new(100_000, 64, 0.1, 7)
                .expect("s")
                .train_windows(3, 1, 8)
        );
        assert_ne!(s.train_windows(3, 1, 8), s.train_windows(3, 2, 8));
        assert_ne!(s.train_windows(3, 1, 8), s.train_windows(4, 1, 8));
        assert_ne!(
            s.train_windows(3, 1, 8),
            Sampler::new(100_000, 64, 0.1, 8)
                .expect("s")
                .train_windows(3, 1, 8)
        );
    }

    #[test]
    fn bad_settings_are_errors() {
        assert_eq!(
            Sampler::new(100, 64, 0.1, 0),
            Err(SamplerError::TooFewTokens {
                tokens: 100,
                window: 65
            })
        );
        assert!(matches!(
            Sampler::new(10_000, 8, 0.0, 0),
            Err(SamplerError::EvalFraction(_))
        ));
        assert!(matches!(
            Sampler::new(10_000, 8, f64::NAN, 0),
            Err(SamplerError::EvalFraction(_))
        ));
    }

    proptest! {
        #[test]
        fn windows_never_cross_the_split(tokens in 10_000u64..1_000_000, seq in 1usize..256, round in any::<u64>(), slot in any::<u32>()) {
            let built = Sampler::new(tokens, seq, 0.05, 1);
            // Too small a stream for this window is an error, never a bad window.
            prop_assume!(built.is_ok());
            let s = built.expect("checked");
            for o in s.train_windows(round, slot, 16) {
                prop_assert!(o + s.window() <= s.train_tokens);
            }
            for o in s.eval_windows(8) {
                prop_assert!(o >= s.train_tokens && o + s.window() <= tokens);
                prop_assert_eq!(s.split_of(o), Split::Eval);
            }
        }
    }
}
