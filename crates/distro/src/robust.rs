//! Which of a round's updates to merge, and how much each may weigh, when
//! some senders are hostile.
//!
//! A plain scatter-mean lets one sender move every coefficient it sends by
//! any amount, so the screen runs before the merge, over the round's
//! distinct, admitted updates, in four steps:
//! 1. **Empty** updates (no coefficient at all) are left out: they carry no
//!    training, and a flood of them from throwaway identities would
//!    otherwise drag every statistic below towards zero.
//! 2. **Copies** of an update already taken (the same coefficients under
//!    another sender's name: a free rider, or a sybil doubling one vote) are
//!    left out; the first one in the caller's order (arrival) stays.
//! 3. **Size.** The size of an update is the RMS of its values (its L2 norm
//!    over the square root of its count), so an honest member sending fewer
//!    or more coefficients within the run's top-k is not out of line: with
//!    sign values every update's RMS is exactly 1. The reference is the
//!    median RMS of the round (of a previous round while fewer than three
//!    updates are in, since a median of two says nothing). Updates over
//!    `norm_factor` times it are left out, and every other update is scaled
//!    down to at most the reference (Templar's SparseLoCo clips each
//!    contribution to the median norm the same way), so whatever passes
//!    weighs at most as much as a typical honest member.
//! 4. **Agreement.** Honest members start from identical weights and train
//!    on batches of the same data, so their updates lean the same way where
//!    they overlap; random or negated signs do not. An update's agreement
//!    is `(agree - disagree) / compared` between the signs of its
//!    coefficients and those of the others' (clipped) sum at the same
//!    coefficients: about 0 for an update unrelated to the others, negative
//!    for a contrary one. An update is left out when its agreement is below
//!    half the round's median by more than `min_agreement` standard errors
//!    (`1 / sqrt(compared)`). Measuring against the round's own median, not
//!    a fixed bar, keeps a small honest update (few coefficients to compare,
//!    so a noisy agreement) and a round whose members agree little (early,
//!    or late in training) from being judged as attacks. This needs at least
//!    [`MIN_FOR_AGREEMENT`] updates: with two, each disagrees with the other
//!    as much as the other with it, and nothing says which one is wrong; with
//!    three or four, the others' sum is too noisy a consensus, and an honest
//!    update can look unrelated to it (measured in the 3-volunteer demo:
//!    agreement -0.004 against a median of 0.229). Below that count, size
//!    clipping alone bounds what an update can do: it weighs no more than a
//!    typical member's.
//!
//! None of this decides who is at fault: an update left out here was
//! well-formed, and an honest member can be unlucky (its update copied, an
//! odd batch). Faults are for malformed bytes, which the wire format and the
//! model checks catch before this screen.

use std::collections::{HashMap, hash_map::Entry};

use crate::optimizer::{IncomingUpdate, PeerId};

/// Fewest updates from which the round's own median sets the size
/// reference.
pub const MIN_FOR_STATISTICS: usize = 3;

/// Fewest updates from which the agreement check runs.
pub const MIN_FOR_AGREEMENT: usize = 5;

/// How strictly the screen judges a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RobustConfig {
    /// Leave out updates whose RMS is over this multiple of the reference,
    /// and scale the others down to the reference (0: neither).
    pub norm_factor: f32,
    /// Leave out updates whose sign agreement with the others is this
    /// many standard errors below half the round's median agreement
    /// (`None`: no agreement check).
    pub min_agreement: Option<f32>,
}

impl Default for RobustConfig {
    fn default() -> Self {
        Self {
            norm_factor: 5.0,
            min_agreement: Some(DEFAULT_MIN_AGREEMENT),
        }
    }
}

/// Standard errors below half the round's median agreement at which an
/// update is left out by default: were an honest update's agreement as
/// noisy as a fair coin's, it would fall that far about once in 30,000
/// updates. Honest updates spread wider than that, since their batches
/// differ, not only their coin flips: in `starling bench robust` (8 peers)
/// they agreed at 0.24 or more, and in rounds of fewer than
/// [`MIN_FOR_AGREEMENT`] updates agreement is not judged at all.
pub const DEFAULT_MIN_AGREEMENT: f32 = 4.0;

/// Why an update was left out of the merge.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// It carries no coefficient.
    #[error("the update is empty")]
    Empty,
    /// It repeats an update taken before it.
    #[error("the update is a copy of one taken before it")]
    Duplicate {
        /// Whose update it copies.
        of: PeerId,
    },
    /// Its values are far larger than the round's.
    #[error("its values are {ratio:.1}x the round's typical size (limit {factor}x)")]
    Oversized {
        /// Its RMS over the reference.
        ratio: f32,
        /// The limit.
        factor: f32,
    },
    /// Its signs do not lean the way the others' do.
    #[error(
        "its signs agree with the others' at {agreement:.3}, the round's median is {median:.3} \
         ({z:.1} standard errors below half of it, {min} allowed)"
    )]
    Disagrees {
        /// Its agreement, from -1 to 1.
        agreement: f32,
        /// The round's median agreement.
        median: f32,
        /// Standard errors below half the median.
        z: f32,
        /// The limit.
        min: f32,
    },
}

/// What the screen decided for one update.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The factor its values are multiplied by before the merge (at most
    /// 1), or why it is left out.
    pub result: Result<f32, Rejection>,
    /// Its sign agreement with the others, from -1 to 1, when computed.
    pub agreement: Option<f32>,
}

/// The screen of one round.
#[derive(Clone, Debug, PartialEq)]
pub struct Screening {
    /// One verdict per update, in the order given.
    pub verdicts: Vec<Verdict>,
    /// The size reference used (the round's median RMS, or the previous
    /// one); pass it to the next round's screen.
    pub reference: Option<f32>,
}

impl Screening {
    /// How many updates are kept.
    pub fn kept(&self) -> usize {
        self.verdicts.iter().filter(|v| v.result.is_ok()).count()
    }
}

/// Screen a round's updates (distinct senders, each already checked
/// against the model; in arrival order, which decides which of two copies
/// stays). `previous` is the last round's [`Screening::reference`].
pub fn screen(
    updates: &[&IncomingUpdate],
    config: &RobustConfig,
    previous: Option<f32>,
) -> Screening {
    let mut verdicts: Vec<Verdict> = updates
        .iter()
        .map(|_| Verdict {
            result: Ok(1.0),
            agreement: None,
        })
        .collect();
    let rms: Vec<Option<f32>> = updates.iter().map(|u| rms(u)).collect();

    // 1 and 2: empty updates and copies.
    let mut seen: HashMap<blake3::Hash, PeerId> = HashMap::new();
    for ((u, v), r) in updates.iter().zip(&mut verdicts).zip(&rms) {
        if r.is_none() {
            v.result = Err(Rejection::Empty);
        } else {
            match seen.entry(content_digest(u)) {
                Entry::Occupied(first) => {
                    v.result = Err(Rejection::Duplicate { of: *first.get() });
                }
                Entry::Vacant(slot) => {
                    slot.insert(u.sender);
                }
            }
        }
    }

    // 3: size, against the round's median (or the last one).
    let candidates: Vec<f32> = verdicts
        .iter()
        .zip(&rms)
        .filter(|(v, _)| v.result.is_ok())
        .filter_map(|(_, r)| *r)
        .collect();
    let reference = if candidates.len() >= MIN_FOR_STATISTICS {
        upper_median(candidates)
    } else {
        previous
    };
    if let (Some(reference), true) = (reference, config.norm_factor > 0.0) {
        for (v, r) in verdicts.iter_mut().zip(&rms) {
            let (Ok(scale), Some(r)) = (&mut v.result, r) else {
                continue;
            };
            let ratio = r / reference;
            if ratio > config.norm_factor {
                v.result = Err(Rejection::Oversized {
                    ratio,
                    factor: config.norm_factor,
                });
            } else if ratio > 1.0 {
                *scale = reference / r;
            }
        }
    }

    // 4: sign agreement with the others.
    if let Some(min) = config.min_agreement {
        let scales: Vec<Option<f32>> = verdicts.iter().map(|v| v.result.clone().ok()).collect();
        if scales.iter().flatten().count() >= MIN_FOR_AGREEMENT {
            let tallies = agreement(updates, &scales);
            let fraction = |&(net, compared): &(i64, u64)| net as f64 / compared as f64;
            let median = upper_median(
                tallies
                    .iter()
                    .flatten()
                    .map(|t| fraction(t) as f32)
                    .collect(),
            );
            for (v, tally) in verdicts.iter_mut().zip(&tallies) {
                let (Some(tally), Some(median)) = (tally, median) else {
                    continue;
                };
                let agreement = fraction(tally);
                v.agreement = Some(agreement as f32);
                let z = (f64::from(median) / 2.0 - agreement) * (tally.1 as f64).sqrt();
                if v.result.is_ok() && z > f64::from(min) {
                    v.result = Err(Rejection::Disagrees {
                        agreement: agreement as f32,
                        median,
                        z: z as f32,
                        min,
                    });
                }
            }
        }
    }
    Screening {
        verdicts,
        reference,
    }
}

/// `update` with every value multiplied by `scale` (unchanged for 1).
pub fn scaled(mut update: IncomingUpdate, scale: f32) -> IncomingUpdate {
    if scale != 1.0 {
        for t in &mut update.tensors {
            for v in &mut t.values {
                *v *= scale;
            }
        }
    }
    update
}

/// RMS of an update's values; `None` when it has none.
fn rms(update: &IncomingUpdate) -> Option<f32> {
    let (sum, count) = update
        .tensors
        .iter()
        .flat_map(|t| &t.values)
        .fold((0.0f64, 0u64), |(s, n), &v| {
            (s + f64::from(v) * f64::from(v), n + 1)
        });
    (count > 0).then(|| (sum / count as f64).sqrt() as f32)
}

/// What an update says, without who says it.
fn content_digest(update: &IncomingUpdate) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for t in &update.tensors {
        h.update(&(t.offsets.len() as u64).to_le_bytes());
        h.update(bytemuck::cast_slice(&t.offsets));
        h.update(bytemuck::cast_slice(&t.indices));
        for v in &t.values {
            h.update(&v.to_bits().to_le_bytes());
        }
    }
    h.finalize()
}

fn upper_median(mut values: Vec<f32>) -> Option<f32> {
    values.sort_by(f32::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Each kept update's sign agreement with the sum of the other kept ones
/// (values times their scale), over the coefficients both carry, as
/// (agreeing minus disagreeing, compared); `None` for updates left out, or
/// that share no coefficient with the others.
fn agreement(updates: &[&IncomingUpdate], scales: &[Option<f32>]) -> Vec<Option<(i64, u64)>> {
    use rayon::prelude::*;
    let kept: Vec<(usize, f32)> = scales
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .collect();
    let tensors = updates.first().map_or(0, |u| u.tensors.len());
    // Per tensor, per kept update: (agreeing minus disagreeing, compared).
    let per_tensor: Vec<Vec<(i64, u64)>> = (0..tensors)
        .into_par_iter()
        .map(|t| {
            let mut tally = vec![(0i64, 0u64); kept.len()];
            let Some(grid) = updates.first().map(|u| u.tensors[t].grid) else {
                return tally;
            };
            let elems = grid.chunk_elems();
            let mut sum = vec![0.0f64; elems];
            let mut count = vec![0u32; elems];
            let mut touched = Vec::new();
            for c in 0..grid.num_chunks() {
                touched.clear();
                for &(i, s) in &kept {
                    let (idx, val) = updates[i].tensors[t].chunk(c);
                    for (&p, &v) in idx.iter().zip(val) {
                        let p = p as usize;
                        if count[p] == 0 {
                            touched.push(p);
                        }
                        sum[p] += f64::from(v * s);
                        count[p] += 1;
                    }
                }
                for (slot, &(i, s)) in kept.iter().enumerate() {
                    let (idx, val) = updates[i].tensors[t].chunk(c);
                    for (&p, &v) in idx.iter().zip(val) {
                        let p = p as usize;
                        if count[p] < 2 || v == 0.0 {
                            continue;
                        }
                        let others = sum[p] - f64::from(v * s);
                        if others != 0.0 {
                            let agrees = (others > 0.0) == (v > 0.0);
                            tally[slot].0 += if agrees { 1 } else { -1 };
                            tally[slot].1 += 1;
                        }
                    }
                }
                for &p in &touched {
                    sum[p] = 0.0;
                    count[p] = 0;
                }
            }
            tally
        })
        .collect();
    let mut out = vec![None; updates.len()];
    for (slot, &(i, _)) in kept.iter().enumerate() {
        let (net, compared) = per_tensor
            .iter()
            .fold((0i64, 0u64), |(n, c), t| (n + t[slot].0, c + t[slot].1));
        if compared > 0 {
            out[i] = Some((net, compared));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkGrid;
    use crate::sparse::SparseTensor;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const ROWS: usize = 256;
    const COLS: usize = 512;
    const K: usize = 32;

    fn id(n: u8) -> PeerId {
        [n; 32]
    }

    /// A peer's update: its top-`k` positions of a shared direction plus its
    /// own noise, per 64x64 chunk, like honest members on one model.
    fn honest(sender: u8, k: usize, seed: u64, noise: f32) -> IncomingUpdate {
        let grid = ChunkGrid::for_shape(&[ROWS, COLS], 64);
        let mut shared = StdRng::seed_from_u64(seed);
        let mut own = StdRng::seed_from_u64(seed ^ (u64::from(sender) << 32));
        let elems = grid.chunk_elems();
        let mut offsets = vec![0u32];
        let mut indices = Vec::new();
        let mut values = Vec::new();
        for _ in 0..grid.num_chunks() {
            let dense: Vec<f32> = (0..elems)
                .map(|_| shared.random_range(-1.0f32..1.0) + noise * own.random_range(-1.0f32..1.0))
                .collect();
            let mut order: Vec<usize> = (0..elems).collect();
            order.sort_by(|&a, &b| dense[b].abs().total_cmp(&dense[a].abs()));
            let mut top: Vec<usize> = order[..k].to_vec();
            top.sort_unstable();
            for p in top {
                indices.push(p as u32);
                values.push(dense[p]);
            }
            offsets.push(indices.len() as u32);
        }
        IncomingUpdate {
            sender: id(sender),
            tensors: vec![SparseTensor {
                shape: vec![ROWS, COLS],
                grid,
                k,
                offsets,
                indices,
                values,
            }],
        }
    }

    fn map_values(mut u: IncomingUpdate, mut f: impl FnMut(f32) -> f32) -> IncomingUpdate {
        for t in &mut u.tensors {
            for v in &mut t.values {
                *v = f(*v);
            }
        }
        u
    }

    fn sign(u: IncomingUpdate) -> IncomingUpdate {
        map_values(u, f32::signum)
    }

    fn empty(sender: u8) -> IncomingUpdate {
        let mut u = honest(sender, 1, 0, 0.0);
        let t = &mut u.tensors[0];
        t.offsets.iter_mut().for_each(|o| *o = 0);
        t.indices.clear();
        t.values.clear();
        u
    }

    fn honest_round(n: u8) -> Vec<IncomingUpdate> {
        (0..n).map(|i| honest(i, K, 7, 0.5)).collect()
    }

    fn run(updates: &[IncomingUpdate], config: &RobustConfig, previous: Option<f32>) -> Screening {
        screen(&updates.iter().collect::<Vec<_>>(), config, previous)
    }

    fn results(s: &Screening) -> Vec<Result<f32, Rejection>> {
        s.verdicts.iter().map(|v| v.result.clone()).collect()
    }

    #[test]
    fn an_honest_round_is_kept_whole() {
        let updates = honest_round(8);
        let s = run(&updates, &RobustConfig::default(), None);
        assert_eq!(s.kept(), 8, "{:?}", s.verdicts);
        for v in &s.verdicts {
            assert!(v.agreement.unwrap() > 0.3, "{v:?}");
        }
        // Signs: nobody is scaled, so the merge is DeMo's plain mean.
        let signs: Vec<_> = updates.into_iter().map(sign).collect();
        let s = run(&signs, &RobustConfig::default(), None);
        assert!(results(&s).iter().all(|r| *r == Ok(1.0)), "{s:?}");
    }

    #[test]
    fn fewer_or_more_sign_coefficients_are_never_held_against_a_member() {
        let mut updates: Vec<_> = (0..5).map(|i| sign(honest(i, 1, 7, 0.5))).collect();
        updates.push(sign(honest(9, K, 7, 0.5)));
        let s = run(&updates, &RobustConfig::default(), None);
        assert_eq!(s.verdicts[5].result, Ok(1.0), "{s:?}");
    }

    #[test]
    fn scaled_random_negated_copied_and_empty_updates_are_left_out() {
        let mut updates = honest_round(6);
        updates.push(map_values(honest(6, K, 7, 0.5), |v| v * 1000.0));
        let mut rng = StdRng::seed_from_u64(3);
        updates.push(map_values(honest(7, K, 7, 0.5), |v| {
            if rng.random::<bool>() { v } else { -v }
        }));
        updates.push(map_values(honest(8, K, 7, 0.5), |v| -v));
        let mut copy = updates[0].clone();
        copy.sender = id(9);
        updates.push(copy);
        updates.push(empty(10));
        let s = run(&updates, &RobustConfig::default(), None);
        let r = results(&s);
        assert!(r[..6].iter().all(Result::is_ok), "{r:?}");
        assert!(matches!(r[6], Err(Rejection::Oversized { .. })), "{r:?}");
        assert!(matches!(r[7], Err(Rejection::Disagrees { .. })), "{r:?}");
        assert!(matches!(r[8], Err(Rejection::Disagrees { .. })), "{r:?}");
        assert_eq!(r[9], Err(Rejection::Duplicate { of: id(0) }));
        assert_eq!(r[10], Err(Rejection::Empty));
    }

    #[test]
    fn a_flood_of_empty_updates_moves_nothing() {
        let mut updates = honest_round(3);
        updates.extend((10..60).map(empty));
        let s = run(&updates, &RobustConfig::default(), None);
        assert_eq!(s.kept(), 3);
        let honest_only = run(&honest_round(3), &RobustConfig::default(), None);
        assert_eq!(s.reference, honest_only.reference);
    }

    #[test]
    fn updates_above_the_median_are_clipped_to_it() {
        let updates: Vec<_> = (0..5u8)
            .map(|i| map_values(honest(i, K, 7, 0.5), move |v| v * f32::from(i + 1)))
            .collect();
        let s = run(&updates, &RobustConfig::default(), None);
        let r = results(&s);
        assert_eq!(&r[..3], &[Ok(1.0), Ok(1.0), Ok(1.0)]);
        let reference = s.reference.unwrap();
        for (u, r) in updates.iter().zip(&r).skip(3) {
            let clipped = rms(&scaled(u.clone(), *r.as_ref().unwrap())).unwrap();
            assert!(
                (clipped - reference).abs() < 1e-3 * reference,
                "{clipped} vs {reference}"
            );
        }
    }

    #[test]
    fn with_two_updates_the_last_reference_holds_and_agreement_is_not_judged() {
        let honest = honest(0, K, 7, 0.5);
        let reference = rms(&honest);
        let big = map_values(honest.clone(), |v| -v * 100.0);
        let mut big = big;
        big.sender = id(1);
        let s = run(
            &[honest.clone(), big.clone()],
            &RobustConfig::default(),
            reference,
        );
        let r = results(&s);
        assert_eq!(r[0], Ok(1.0));
        assert!(matches!(r[1], Err(Rejection::Oversized { .. })), "{r:?}");
        // Without a reference, nothing can be judged from two updates.
        let s = run(&[honest, big], &RobustConfig::default(), None);
        assert_eq!(s.kept(), 2);
        assert!(s.verdicts.iter().all(|v| v.agreement.is_none()));
    }

    #[test]
    fn below_five_updates_agreement_is_not_judged() {
        let mut updates = honest_round(3);
        updates.push(map_values(honest(3, K, 7, 0.5), |v| -v));
        let s = run(&updates, &RobustConfig::default(), None);
        assert_eq!(s.kept(), 4, "{s:?}");
        assert!(s.verdicts.iter().all(|v| v.agreement.is_none()));
        // A fifth update brings the check in, and the negated one is out.
        updates.push(honest(4, K, 7, 0.5));
        let s = run(&updates, &RobustConfig::default(), None);
        assert!(
            matches!(results(&s)[3], Err(Rejection::Disagrees { .. })),
            "{s:?}"
        );
    }

    #[test]
    fn turned_off_it_keeps_everything_but_empty_updates_and_copies() {
        let off = RobustConfig {
            norm_factor: 0.0,
            min_agreement: None,
        };
        let mut updates = honest_round(4);
        updates.push(map_values(honest(4, K, 7, 0.5), |v| -v * 1000.0));
        updates.push(empty(5));
        let s = run(&updates, &off, None);
        assert_eq!(s.kept(), 5);
        assert!(results(&s)[..5].iter().all(|r| *r == Ok(1.0)));
    }
}
