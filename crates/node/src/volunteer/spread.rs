//! Where a volunteer fetches a round's shared blobs (the roster, the
//! aggregate) from, so that the coordinator's upload does not grow with the
//! member count.
//!
//! Every member of a round knows the same roster, so every member can compute
//! the same tree without talking: order the members by BLAKE3(blob, id) (a
//! fresh order per blob, so being an inner node, which costs upload, rotates
//! between members), give the coordinator the first [`HOST_FANOUT`] as
//! children and every member the next [`FANOUT`] after its children's turn,
//! as in a binary heap. A member asks its parent; a parent that does not
//! hold the blob yet answers at once, so the member asks again (with a
//! growing pause) until its patience, which grows with its depth, runs out,
//! and only then asks the coordinator. A parent that cannot be reached, does
//! not admit us, or serves bytes that fail BLAKE3 is replaced by its own
//! parent for the rest of the fetch (and reported, so the volunteer can say
//! who served it wrongly); one that serves slowly costs one attempt's time
//! limit.
//!
//! A member whose ancestors all failed it (gone, stuck, lying) asks a few
//! other members picked at random, once each, before the coordinator (a
//! child of the coordinator asks it at once: those members are fetching the
//! blob at the same moment, and asking them first cost a host-restart test
//! its rounds): by
//! then most of the run holds the blob, and fallbacks spread at random cost
//! each member a fraction of one copy where the coordinator would pay for
//! all of them.
//!
//! A parent still fetching the blob answers with the empty entry its store
//! keeps meanwhile, which the fetch reads as "not held yet"
//! (`ProviderFailure::NotHeld`), so an honest parent is never taken for one
//! that lies; asks reuse one connection per parent, so polling costs no
//! handshakes.
//!
//! So the coordinator uploads a blob about [`HOST_FANOUT`] times plus the
//! fetches of members that nobody else served, and a member uploads it at
//! most [`FANOUT`] times plus its share of the fallbacks. The coordinator
//! has fewer children than a member because its upload is the one that
//! every round shares, and the last fallbacks land on it: two children
//! leave room for a couple of those within four copies of a blob.

use std::time::Duration;

use rand::seq::IndexedRandom;
use starling_swarm::{BlobRef, Bytes, EndpointId, FetchError, Net, ProviderFailure};
use tokio::time::Instant;

/// Children per member in the tree.
pub const FANOUT: usize = 4;
/// The coordinator's children in the tree.
pub const HOST_FANOUT: usize = 2;
/// How soon a member asks its ancestors again while they lack the blob; the
/// pause grows by half each time, up to [`POLL_MAX`], so a deep tree does
/// not flood its inner nodes with requests.
const POLL: Duration = Duration::from_millis(200);
/// The longest pause between two asks.
const POLL_MAX: Duration = Duration::from_secs(2);
/// Patience before asking the coordinator, at depth one.
const BASE_PATIENCE: Duration = Duration::from_secs(3);
/// How many attempt limits the coordinator, the last resort, is given.
const LAST_RESORT_PATIENCE: u32 = 4;
/// The slowest transfer rate a provider may have before we try the next
/// (bytes per second): 1 Mbit/s.
const SLOWEST_RATE: u64 = 125_000;

/// The chain of ancestors of `me` in the tree of `blob` over `members`
/// (nearest first, the coordinator not included), or `None` when `me` is
/// not among `members` (then it asks the coordinator).
pub(crate) fn ancestors(
    blob: &BlobRef,
    members: &[EndpointId],
    me: &EndpointId,
) -> Option<Vec<EndpointId>> {
    let mut order: Vec<(blake3::Hash, EndpointId)> = members
        .iter()
        .map(|id| {
            let mut h = blake3::Hasher::new();
            h.update(&blob.hash);
            h.update(id.as_bytes());
            (h.finalize(), *id)
        })
        .collect();
    order.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut position = order.iter().position(|(_, id)| id == me)?;
    let mut chain = Vec::new();
    // Positions 0..HOST_FANOUT are the coordinator's children; the
    // children of position p are HOST_FANOUT + FANOUT*p ..+ FANOUT.
    while position >= HOST_FANOUT {
        position = (position - HOST_FANOUT) / FANOUT;
        chain.push(order[position].1);
    }
    Some(chain)
}

/// How long one provider may take to deliver `size` bytes before the next
/// is asked.
fn attempt_limit(size: u64) -> Duration {
    Duration::from_secs(5) + Duration::from_secs(size / SLOWEST_RATE)
}

/// A blob fetched through the tree, who served it, and the providers on
/// the way whose bytes failed verification (for the caller to report).
pub(crate) struct Fetched {
    /// The blob's bytes.
    pub(crate) bytes: Bytes,
    /// The provider whose fetch returned them (a blob already held here
    /// returns at once, from the first provider asked).
    pub(crate) from: EndpointId,
    /// Providers that served bytes which are not the blob.
    pub(crate) corrupt: Vec<EndpointId>,
}

/// Members picked at random and asked once each when every ancestor failed.
const OTHERS_ASKED: usize = 4;

/// Fetch `blob` through its tree over `members`: from this node's ancestors
/// (polling the parent while it lacks the blob), then, once patience runs
/// out, from a few other members, then from `host`; at most `max` bytes,
/// kept under `tag`. A node that is not among `members` asks `host` alone.
pub(crate) async fn fetch(
    net: &Net,
    blob: &BlobRef,
    members: &[EndpointId],
    host: EndpointId,
    max: u64,
    tag: &str,
) -> Result<Fetched, FetchError> {
    let me = net.id();
    let mut chain = ancestors(blob, members, &me).unwrap_or_default();
    // A child of the coordinator has no ancestor to wait for: it asks the
    // coordinator at once, as its tree place says, not members that are
    // fetching the blob at the same moment.
    let others: Vec<EndpointId> = if chain.is_empty() {
        Vec::new()
    } else {
        let rest: Vec<EndpointId> = members
            .iter()
            .filter(|id| **id != me && !chain.contains(id))
            .copied()
            .collect();
        rest.choose_multiple(&mut rand::rng(), OTHERS_ASKED)
            .copied()
            .collect()
    };
    let limit = attempt_limit(blob.size);
    let patience = BASE_PATIENCE + limit.min(Duration::from_secs(30)) * chain.len() as u32;
    let started = Instant::now();
    let mut pause = POLL;
    let mut corrupt = Vec::new();
    // Only the nearest reachable ancestor is asked: asking the next one up
    // while the parent merely lacks the blob would have every grandparent
    // serve its grandchildren too, and the fan-out bound would be gone.
    while let Some(&nearest) = chain.first() {
        if started.elapsed() >= patience {
            break;
        }
        match net.fetch(blob, &[nearest], max, tag, limit).await {
            Ok(bytes) => {
                return Ok(Fetched {
                    bytes,
                    from: nearest,
                    corrupt,
                });
            }
            Err(FetchError::Unavailable { last: Some(e), .. }) if e.failure.is_corrupt() => {
                corrupt.push(nearest);
                chain.remove(0);
                continue;
            }
            Err(FetchError::Unavailable { last: Some(e), .. }) if unreachable(&e.failure) => {
                chain.remove(0);
                continue;
            }
            Err(FetchError::Unavailable { .. }) => {}
            // Over the limit or not the declared size: nobody can fix that.
            Err(e) => return Err(e),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 3 / 2).min(POLL_MAX);
    }
    // Patience ran out: the parent may be stuck, its ancestors most likely
    // hold the blob by now, and so do most members. Each ancestor is asked
    // once, nearest first, then a few others, then the coordinator, the
    // last resort, given longer than a member.
    let tries = chain
        .iter()
        .skip(1)
        .chain(&others)
        .map(|&a| (a, limit))
        .chain([(host, limit * LAST_RESORT_PATIENCE)]);
    let mut last = None;
    for (provider, limit) in tries {
        match net.fetch(blob, &[provider], max, tag, limit).await {
            Ok(bytes) => {
                return Ok(Fetched {
                    bytes,
                    from: provider,
                    corrupt,
                });
            }
            Err(e @ FetchError::Unavailable { .. }) => {
                if let FetchError::Unavailable { last: Some(p), .. } = &e
                    && p.failure.is_corrupt()
                {
                    corrupt.push(provider);
                }
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(FetchError::Unavailable {
        blob: *blob,
        last: None,
    }))
}

/// How long a joiner keeps asking members for a blob they should hold (the
/// checkpoint) before it asks the coordinator: members admit a joiner once
/// they hold the roster that lists it, a second or two after the round opens.
const MEMBERS_PATIENCE: Duration = Duration::from_secs(10);
/// Members asked, at most.
const MEMBERS_ASKED: usize = 8;

/// Fetch `blob`, which most of `members` hold, from a few of them picked at
/// random (so joiners spread over the run), then from `host`. `progress`
/// sees the bytes as they arrive.
pub(crate) async fn fetch_from_members(
    net: &Net,
    blob: &BlobRef,
    members: &[EndpointId],
    host: EndpointId,
    max: u64,
    tag: &str,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Fetched, FetchError> {
    let limit = attempt_limit(blob.size);
    let mut asked: Vec<EndpointId> = members
        .choose_multiple(&mut rand::rng(), MEMBERS_ASKED)
        .copied()
        .collect();
    let started = Instant::now();
    let mut corrupt = Vec::new();
    while !asked.is_empty() && started.elapsed() < MEMBERS_PATIENCE {
        let mut i = 0;
        while i < asked.len() {
            let member = asked[i];
            match net
                .fetch_observed(blob, &[member], max, tag, limit, progress)
                .await
            {
                Ok(bytes) => {
                    return Ok(Fetched {
                        bytes,
                        from: member,
                        corrupt,
                    });
                }
                Err(FetchError::Unavailable { last: Some(e), .. }) if e.failure.is_corrupt() => {
                    corrupt.push(member);
                    asked.remove(i);
                }
                // Lacks it, or does not admit us yet: ask the next.
                Err(FetchError::Unavailable { .. }) => i += 1,
                Err(e) => return Err(e),
            }
        }
        tokio::time::sleep(POLL_MAX).await;
    }
    let bytes = net
        .fetch_observed(
            blob,
            &[host],
            max,
            tag,
            limit * LAST_RESORT_PATIENCE,
            progress,
        )
        .await?;
    Ok(Fetched {
        bytes,
        from: host,
        corrupt,
    })
}

/// Whether a provider's failure means asking it again is pointless.
fn unreachable(failure: &ProviderFailure) -> bool {
    matches!(
        failure,
        ProviderFailure::ConnectTimeout { .. }
            | ProviderFailure::Connect { .. }
            | ProviderFailure::NotAdmitted
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use starling_swarm::SecretKey;

    use super::*;

    #[test]
    fn every_member_has_one_parent_and_no_node_more_than_fanout_children() {
        let members: Vec<EndpointId> = (0..300u16)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..2].copy_from_slice(&i.to_le_bytes());
                SecretKey::from_bytes(&seed).public()
            })
            .collect();
        for blob in [BlobRef::of(b"one"), BlobRef::of(b"two")] {
            let mut children: HashMap<Option<EndpointId>, usize> = HashMap::new();
            let mut deepest = 0;
            for me in &members {
                let chain = ancestors(&blob, &members, me).expect("a member");
                assert!(!chain.contains(me));
                deepest = deepest.max(chain.len());
                *children.entry(chain.first().copied()).or_default() += 1;
            }
            assert!(children.values().all(|&n| n <= FANOUT), "{children:?}");
            assert_eq!(children[&None], HOST_FANOUT, "the coordinator's children");
            // 300 members, 4 children each under the coordinator's 2:
            // 2 + 8 + 32 + 128 fill depths 1 to 4, the last 130 are at 5.
            assert_eq!(deepest, 4);
        }
        let stranger = SecretKey::from_bytes(&[0xee; 32]).public();
        assert!(ancestors(&BlobRef::of(b"one"), &members, &stranger).is_none());
    }

    #[test]
    fn trees_differ_per_blob_so_inner_nodes_rotate() {
        let members: Vec<EndpointId> = (1..=40u8)
            .map(|i| SecretKey::from_bytes(&[i; 32]).public())
            .collect();
        let parents = |blob: &BlobRef| -> Vec<Option<EndpointId>> {
            members
                .iter()
                .map(|m| ancestors(blob, &members, m).and_then(|c| c.first().copied()))
                .collect()
        };
        assert_ne!(parents(&BlobRef::of(b"a")), parents(&BlobRef::of(b"b")));
    }
}
