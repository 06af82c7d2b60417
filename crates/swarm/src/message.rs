//! The small signed messages a run is coordinated with.
//!
//! Gossip tells us only which neighbour forwarded a message, never who wrote
//! it, so every message carries its author's ed25519 signature. The signature
//! covers a domain tag, the run id and the round as well as the body: a valid
//! announce for round 7 of one run cannot be replayed as round 8, or into
//! another run. Messages are postcard-encoded and bounded in size before any
//! parsing, so a hostile peer can neither crash nor balloon a receiver.
//!
//! Nothing here names a coordinator: a [`Manifest`] is valid when it is signed
//! by whoever the run's state says coordinates that round, so the role can
//! rotate later without a format change.

use iroh::{EndpointId, PublicKey, SecretKey, Signature};
use serde::{Deserialize, Serialize};

/// Largest encoded message we accept (gossip's own default limit is 4096 bytes).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Domain-separation tag mixed into every signature.
const DOMAIN: &[u8] = b"starling/message/v3";

/// Identifies one training run; part of every signed message and update.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RunId(pub [u8; 16]);

impl RunId {
    /// A fresh random run id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Debug for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RunId({self})")
    }
}

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A BLAKE3 content hash of a blob (an update, a checkpoint, a data shard).
pub type BlobHash = [u8; 32];

/// A reference to a blob: its hash and its exact size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// BLAKE3 hash.
    pub hash: BlobHash,
    /// Size in bytes.
    pub size: u64,
}

impl BlobRef {
    /// The reference a blob of `bytes` will have once published.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            hash: *iroh_blobs::Hash::new(bytes).as_bytes(),
            size: bytes.len() as u64,
        }
    }

    /// The hash as lowercase hex (file names, logs).
    pub fn hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.hash)
    }
}

/// Milliseconds since the Unix epoch: the clock round deadlines are stated in.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Most addresses a member may list (a machine has a few interfaces, each
/// with an IPv4 and an IPv6 address); a join listing more is refused.
pub const MAX_MEMBER_ADDRS: usize = 8;

/// Most members one round can list (a roster of this many fits
/// [`MAX_ROSTER_BYTES`] whatever their addresses).
pub const MAX_ROSTER_MEMBERS: usize = 16_384;

/// Largest roster blob accepted: [`MAX_ROSTER_MEMBERS`] members with
/// [`MAX_MEMBER_ADDRS`] IPv6 addresses each.
pub const MAX_ROSTER_BYTES: u64 = 8 << 20;

/// Largest list of accepted updates (one entry is under 100 bytes).
pub const MAX_ACCEPTED_BYTES: u64 = 2 << 20;

/// A member of a round and the loopback/LAN addresses it can be dialled on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's endpoint id (its ed25519 public key).
    pub id: EndpointId,
    /// Direct addresses it listens on (at most [`MAX_MEMBER_ADDRS`]).
    pub addrs: Vec<std::net::SocketAddr>,
}

/// The coordinator's statement that a round is open. Its size does not
/// depend on the member count: the member list travels as a blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundOpen {
    /// The round's [`Roster`] (who may train and send updates), as a blob.
    pub roster: BlobRef,
    /// How many members the roster lists.
    pub members: u32,
    /// The round's seed, signed with the rest of the round's state (members
    /// currently draw their batches from the run seed, the round and their slot).
    pub seed: u64,
    /// Unix time in milliseconds after which no announce is accepted.
    pub deadline_ms: u64,
    /// The latest checkpoint and the round after whose apply it was taken.
    pub checkpoint: Option<(u64, BlobRef)>,
    /// Largest update (bytes) the coordinator will accept this round.
    pub max_update_bytes: u64,
    /// The coordinator's latest held-out loss and the round after whose
    /// apply it was measured (volunteers do not evaluate; this is how the
    /// run's eval curve reaches them).
    pub eval: Option<(u64, f32)>,
}

/// Why a roster or an accepted list blob was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListError {
    /// The bytes do not decode.
    #[error("malformed list: {0}")]
    Malformed(#[from] postcard::Error),
    /// The list is not sorted by id, or names an id twice.
    #[error("the list is not in canonical order")]
    NotCanonical,
    /// It holds another number of entries than the signed message says.
    #[error("the list holds {got} entries, the signed message says {expected}")]
    Count {
        /// What the signed message says.
        expected: u64,
        /// What the blob holds.
        got: u64,
    },
    /// A member lists more addresses than allowed.
    #[error("a member lists {0} addresses, the limit is {MAX_MEMBER_ADDRS}")]
    TooManyAddrs(usize),
    /// More members than a round may have.
    #[error("{0} members, the limit is {MAX_ROSTER_MEMBERS}")]
    TooManyMembers(usize),
}

/// A round's members, sorted by id: the blob a [`RoundOpen`] names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// The members, ascending by id, no id twice.
    pub members: Vec<Member>,
}

impl Roster {
    /// The blob's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decode a roster blob and check it against the open that names it.
    pub fn from_bytes(bytes: &[u8], expected: u32) -> Result<Self, ListError> {
        let roster: Roster = postcard::from_bytes(bytes)?;
        if roster.members.len() > MAX_ROSTER_MEMBERS {
            return Err(ListError::TooManyMembers(roster.members.len()));
        }
        if roster.members.len() != expected as usize {
            return Err(ListError::Count {
                expected: u64::from(expected),
                got: roster.members.len() as u64,
            });
        }
        if !roster.members.windows(2).all(|w| w[0].id < w[1].id) {
            return Err(ListError::NotCanonical);
        }
        if let Some(m) = roster
            .members
            .iter()
            .find(|m| m.addrs.len() > MAX_MEMBER_ADDRS)
        {
            return Err(ListError::TooManyAddrs(m.addrs.len()));
        }
        Ok(roster)
    }

    /// The slot (position) of `id` in the round, if it is a member.
    pub fn slot(&self, id: &EndpointId) -> Option<usize> {
        self.members.binary_search_by(|m| m.id.cmp(id)).ok()
    }
}

/// A member's statement that its update for a round is available as a blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Announce {
    /// The update blob.
    pub update: BlobRef,
    /// Tokens the sender trained on for it.
    pub tokens: u64,
    /// The sender's local training loss for the round.
    pub loss: f32,
}

/// One accepted update, as the round's accepted list records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Who computed it.
    pub sender: EndpointId,
    /// The update blob.
    pub update: BlobRef,
    /// Tokens it was trained on.
    pub tokens: u64,
    /// The sender's reported loss.
    pub loss: f32,
}

/// The updates a round accepted, sorted by sender: the blob a [`Manifest`]
/// names, for whoever wants to audit a round (replicas apply the aggregate).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AcceptedList {
    /// Accepted updates, ascending by sender, no sender twice.
    pub entries: Vec<ManifestEntry>,
}

impl AcceptedList {
    /// The blob's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decode an accepted list and check it against the manifest naming it.
    pub fn from_bytes(bytes: &[u8], expected: u32) -> Result<Self, ListError> {
        let list: AcceptedList = postcard::from_bytes(bytes)?;
        if list.entries.len() != expected as usize {
            return Err(ListError::Count {
                expected: u64::from(expected),
                got: list.entries.len() as u64,
            });
        }
        if !list.entries.windows(2).all(|w| w[0].sender < w[1].sender) {
            return Err(ListError::NotCanonical);
        }
        Ok(list)
    }

    /// Tokens the accepted updates were trained on (saturating: the counts
    /// come from the senders).
    pub fn tokens(&self) -> u64 {
        self.entries
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.tokens))
    }

    /// Mean of the senders' reported training losses (`None` for an empty round).
    pub fn mean_loss(&self) -> Option<f32> {
        (!self.entries.is_empty())
            .then(|| self.entries.iter().map(|e| e.loss).sum::<f32>() / self.entries.len() as f32)
    }
}

/// What every replica applies for a round: the coordinator's aggregate of
/// the accepted updates. Fixed-size, whatever the member count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The merged update every replica applies (`None`: nothing was accepted).
    pub aggregate: Option<BlobRef>,
    /// The [`AcceptedList`] blob (`None` when nothing was accepted).
    pub accepted: Option<BlobRef>,
    /// How many updates were accepted (and merged).
    pub updates: u32,
    /// Tokens this round's accepted updates were trained on.
    pub tokens: u64,
    /// Mean of the accepted senders' reported training losses.
    pub loss: Option<f32>,
    /// Tokens the run has trained on up to and including this round, so a
    /// volunteer that joined late still shows the whole run's progress.
    pub run_tokens: u64,
}

/// A replica's hash of its weights after applying a round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightReport {
    /// Digest of the weights (the trainer's digest).
    pub digest: u64,
}

/// The body of a signed message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Body {
    /// A round opens.
    RoundOpen(RoundOpen),
    /// A member's update is ready.
    Announce(Announce),
    /// The set of updates to apply for the round.
    Manifest(Manifest),
    /// A weight hash after applying the round.
    WeightReport(WeightReport),
}

impl Body {
    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::RoundOpen(_) => "round-open",
            Body::Announce(_) => "announce",
            Body::Manifest(_) => "manifest",
            Body::WeightReport(_) => "weight-report",
        }
    }
}

/// A verified message: who signed it, for which run and round, and what it says.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Run it belongs to.
    pub run_id: RunId,
    /// Round it belongs to.
    pub round: u64,
    /// The signer.
    pub author: EndpointId,
    /// The content.
    pub body: Body,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    run_id: RunId,
    round: u64,
    author: PublicKey,
    body: Body,
}

/// Why a received message was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// Bigger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    /// Shorter than a signature.
    #[error("message too short to carry a signature")]
    Truncated,
    /// The bytes do not decode.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    /// The signature does not match the author's key.
    #[error("bad signature on a message claiming to be from {0}")]
    BadSignature(EndpointId),
    /// The message belongs to a different run.
    #[error("message for run {got}, this run is {expected}")]
    WrongRun {
        /// This node's run.
        expected: RunId,
        /// The run the message names.
        got: RunId,
    },
}

impl Message {
    /// Encode and sign a message as `key`; fails only if it would be too large to send.
    pub fn sign(
        key: &SecretKey,
        run_id: RunId,
        round: u64,
        body: Body,
    ) -> Result<Vec<u8>, MessageError> {
        let envelope = Envelope {
            run_id,
            round,
            author: key.public(),
            body,
        };
        let mut bytes = postcard::to_stdvec(&envelope)?;
        let signature = key.sign(&signed_bytes(&bytes));
        bytes.extend_from_slice(&signature.to_bytes());
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Check size, decode, check run and verify the signature.
    pub fn verify(bytes: &[u8], run_id: RunId) -> Result<Message, MessageError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge(bytes.len()));
        }
        let Some(split) = bytes.len().checked_sub(Signature::LENGTH) else {
            return Err(MessageError::Truncated);
        };
        let (payload, sig) = bytes.split_at(split);
        let envelope: Envelope = postcard::from_bytes(payload)?;
        let mut sig_bytes = [0u8; Signature::LENGTH];
        sig_bytes.copy_from_slice(sig);
        let signature = Signature::from_bytes(&sig_bytes);
        envelope
            .author
            .verify(&signed_bytes(payload), &signature)
            .map_err(|_| MessageError::BadSignature(envelope.author))?;
        if envelope.run_id != run_id {
            return Err(MessageError::WrongRun {
                expected: run_id,
                got: envelope.run_id,
            });
        }
        Ok(Message {
            run_id: envelope.run_id,
            round: envelope.round,
            author: envelope.author,
            body: envelope.body,
        })
    }
}

fn signed_bytes(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + payload.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_bytes(&[seed; 32])
    }

    fn announce() -> Body {
        Body::Announce(Announce {
            update: BlobRef {
                hash: [7; 32],
                size: 1234,
            },
            tokens: 4096,
            loss: 3.5,
        })
    }

    #[test]
    fn round_trip_keeps_everything() {
        let run = RunId([1; 16]);
        let bytes = Message::sign(&key(3), run, 9, announce()).unwrap();
        let msg = Message::verify(&bytes, run).unwrap();
        assert_eq!(msg.author, key(3).public());
        assert_eq!(msg.round, 9);
        assert_eq!(msg.body, announce());
    }

    #[test]
    fn tampered_round_or_body_is_rejected() {
        let run = RunId([1; 16]);
        let bytes = Message::sign(&key(3), run, 9, announce()).unwrap();
        // Re-encode the same envelope with another round but the old signature.
        let split = bytes.len() - Signature::LENGTH;
        let mut env: Envelope = postcard::from_bytes(&bytes[..split]).unwrap();
        env.round = 10;
        let mut forged = postcard::to_stdvec(&env).unwrap();
        forged.extend_from_slice(&bytes[split..]);
        assert!(matches!(
            Message::verify(&forged, run),
            Err(MessageError::BadSignature(_))
        ));
        // Claiming another author fails too.
        env.round = 9;
        env.author = key(4).public();
        let mut forged = postcard::to_stdvec(&env).unwrap();
        forged.extend_from_slice(&bytes[split..]);
        assert!(matches!(
            Message::verify(&forged, run),
            Err(MessageError::BadSignature(_))
        ));
    }

    #[test]
    fn other_run_is_rejected() {
        let bytes = Message::sign(&key(3), RunId([1; 16]), 9, announce()).unwrap();
        assert!(matches!(
            Message::verify(&bytes, RunId([2; 16])),
            Err(MessageError::WrongRun { .. })
        ));
    }

    #[test]
    fn oversized_is_rejected_before_parsing() {
        let bytes = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            Message::verify(&bytes, RunId([0; 16])),
            Err(MessageError::TooLarge(_))
        ));
    }

    #[test]
    fn lists_must_be_canonical_and_match_their_count() {
        let mut ids: Vec<_> = (1..4).map(|i| key(i).public()).collect();
        ids.sort();
        let entry = |sender| ManifestEntry {
            sender,
            update: BlobRef {
                hash: [0; 32],
                size: 1,
            },
            tokens: u64::MAX / 2,
            loss: 1.0,
        };
        let good = AcceptedList {
            entries: ids.iter().map(|&i| entry(i)).collect(),
        };
        let back = AcceptedList::from_bytes(&good.to_bytes(), 3).unwrap();
        assert_eq!(back, good);
        assert_eq!(good.mean_loss(), Some(1.0));
        assert_eq!(good.tokens(), u64::MAX, "sums of sender counts saturate");
        assert!(matches!(
            AcceptedList::from_bytes(&good.to_bytes(), 4),
            Err(ListError::Count { .. })
        ));
        assert_eq!(AcceptedList::default().mean_loss(), None);
        let dup = AcceptedList {
            entries: vec![entry(ids[0]), entry(ids[0])],
        };
        assert!(matches!(
            AcceptedList::from_bytes(&dup.to_bytes(), 2),
            Err(ListError::NotCanonical)
        ));

        let member = |id, addrs: usize| Member {
            id,
            addrs: (0..addrs)
                .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p as u16)))
                .collect(),
        };
        let roster = Roster {
            members: ids.iter().map(|&i| member(i, 2)).collect(),
        };
        let back = Roster::from_bytes(&roster.to_bytes(), 3).unwrap();
        assert_eq!(back.slot(&ids[2]), Some(2));
        assert_eq!(back.slot(&key(9).public()), None);
        let mut reversed = roster.clone();
        reversed.members.reverse();
        assert!(matches!(
            Roster::from_bytes(&reversed.to_bytes(), 3),
            Err(ListError::NotCanonical)
        ));
        let wide = Roster {
            members: vec![member(ids[0], MAX_MEMBER_ADDRS + 1)],
        };
        assert!(matches!(
            Roster::from_bytes(&wide.to_bytes(), 1),
            Err(ListError::TooManyAddrs(_))
        ));
        assert!(Roster::from_bytes(b"\xff\xff\xff", 0).is_err());
    }

    #[test]
    fn the_largest_messages_of_any_run_fit_a_gossip_message() {
        let blob = BlobRef {
            hash: [0xff; 32],
            size: u64::MAX,
        };
        let bodies = [
            Body::RoundOpen(RoundOpen {
                roster: blob,
                members: u32::MAX,
                seed: u64::MAX,
                deadline_ms: u64::MAX,
                checkpoint: Some((u64::MAX, blob)),
                max_update_bytes: u64::MAX,
                eval: Some((u64::MAX, f32::MAX)),
            }),
            Body::Manifest(Manifest {
                aggregate: Some(blob),
                accepted: Some(blob),
                updates: u32::MAX,
                tokens: u64::MAX,
                loss: Some(f32::MAX),
                run_tokens: u64::MAX,
            }),
            announce(),
            Body::WeightReport(WeightReport { digest: u64::MAX }),
        ];
        for body in bodies {
            let bytes = Message::sign(&key(1), RunId([1; 16]), u64::MAX, body).unwrap();
            assert!(bytes.len() <= 512, "{} bytes", bytes.len());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::verify(&bytes, RunId([1; 16]));
        }

        #[test]
        fn any_single_bit_flip_is_rejected(pos in 0usize..10_000, bit in 0u8..8) {
            let run = RunId([1; 16]);
            let mut bytes = Message::sign(&key(3), run, 9, announce()).unwrap();
            let pos = pos % bytes.len();
            bytes[pos] ^= 1 << bit;
            prop_assert!(Message::verify(&bytes, run).is_err());
        }
    }
}
