//! The run's gossip topic: joining it, and turning what arrives into events.
//!
//! Gossip tells a node only which neighbour forwarded a message, and any
//! neighbour may forward anything. So nothing leaves this module unverified:
//! each frame is checked (size, signature, run) before the node sees it, and
//! the receive loop never blocks, because gossip is best effort and whatever
//! matters is re-sent or fetched again.

use bytes::Bytes;
use iroh::EndpointId;
use iroh_blobs::Hash;
use iroh_gossip::{
    Gossip, TopicId,
    api::{ApiError, Event, GossipReceiver, GossipSender},
};
use n0_future::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::NetEvent;
use crate::message::{MAX_MESSAGE_BYTES, Message, MessageError, RunId};

/// Gossip frame limit, identical on every node (a larger frame drops the link).
pub(super) const GOSSIP_MAX_MESSAGE: usize = MAX_MESSAGE_BYTES + 1024;

/// Why a gossip broadcast failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BroadcastError {
    /// The gossip actor did not take the message (it stopped, or the topic closed).
    #[error("gossip broadcast failed: {source:#}")]
    Gossip {
        /// What the gossip layer reported.
        #[source]
        source: ApiError,
    },
}

/// The gossip topic of a run.
fn topic_of(run_id: RunId) -> TopicId {
    let mut seed = b"starling/topic/".to_vec();
    seed.extend_from_slice(&run_id.0);
    TopicId::from_bytes(*Hash::new(seed).as_bytes())
}

/// Join `run_id`'s topic through `bootstrap` and forward its verified
/// messages to `events`; returns the sending half.
pub(super) async fn join(
    gossip: &Gossip,
    run_id: RunId,
    bootstrap: Vec<EndpointId>,
    events: mpsc::Sender<NetEvent>,
) -> Result<GossipSender, ApiError> {
    let topic = gossip.subscribe(topic_of(run_id), bootstrap).await?;
    let (sender, receiver) = topic.split();
    tokio::spawn(forward(receiver, run_id, events));
    Ok(sender)
}

/// Send `signed` to the topic.
pub(super) async fn broadcast(
    sender: &GossipSender,
    signed: Vec<u8>,
) -> Result<(), BroadcastError> {
    sender
        .broadcast(Bytes::from(signed))
        .await
        .map_err(|source| BroadcastError::Gossip { source })
}

/// Verify every received frame and pass it on, until the topic ends.
async fn forward(mut receiver: GossipReceiver, run_id: RunId, events: mpsc::Sender<NetEvent>) {
    while let Some(event) = receiver.next().await {
        let event = match event {
            Ok(Event::Received(msg)) => match Message::verify(&msg.content, run_id) {
                Ok(m) => NetEvent::Message(m),
                Err(MessageError::WrongRun { .. }) => continue,
                Err(e) => NetEvent::BadMessage {
                    via: msg.delivered_from,
                    error: e.to_string(),
                },
            },
            Ok(Event::Lagged) => {
                warn!("gossip receiver lagged; messages were dropped");
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                debug!("gossip receiver ended: {e}");
                break;
            }
        };
        // Never block the receive loop: gossip is best effort and
        // everything that matters is re-sent or fetched again.
        if events.try_send(event).is_err() {
            warn!("event queue full; dropped a gossip message");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_run_has_its_own_stable_topic() {
        let a = topic_of(RunId([1; 16]));
        assert_eq!(a, topic_of(RunId([1; 16])));
        assert_ne!(a, topic_of(RunId([2; 16])));
    }
}
