//! The one stream of facts a node reports: the CLI prints it, `--json`
//! serialises it, the metrics endpoint aggregates it and the desktop app draws
//! it. One typed enum keeps the three faces telling the same story.

use serde::Serialize;
use ts_rs::TS;

/// What a node is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Reaching the coordinator.
    Connecting,
    /// Downloading the checkpoint and the rounds since.
    CatchingUp,
    /// Waiting to be included in a round.
    Waiting,
    /// The first step on this device: kernels compile, memory is laid out.
    WarmingUp,
    /// Computing this round's update.
    Training,
    /// Waiting for the round's manifest and applying it.
    Syncing,
    /// Coordinating rounds (a host).
    Coordinating,
    /// Not taking part (user pause or data cap).
    Paused,
    /// Finished or shut down.
    Stopped,
}

/// One peer as a node saw it on its last transfers.
#[derive(Clone, Debug, PartialEq, Serialize, TS)]
pub struct PeerView {
    /// Short id.
    pub peer: String,
    /// Whether it is the run's coordinator.
    pub host: bool,
    /// Round-trip time on the path in use, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Whether that path goes through a relay.
    pub relayed: bool,
    /// Bytes received from it since this node started.
    pub bytes_down: u64,
    /// Rate of its last sizeable transfer, bytes per second.
    pub down_bytes_per_sec: Option<f64>,
}

/// One event from a node.
#[derive(Clone, Debug, PartialEq, Serialize, TS)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeEvent {
    /// The node's state changed.
    State {
        /// Which node (short id).
        node: String,
        /// The new state.
        state: NodeState,
        /// A human-readable detail.
        detail: String,
    },
    /// A host started or a volunteer joined a run.
    Joined {
        /// Which node.
        node: String,
        /// The run's name.
        run: String,
        /// Model parameters.
        params: usize,
        /// First round this node takes part in.
        round: u64,
        /// Rounds the run lasts (0: no set end).
        total_rounds: u64,
    },
    /// The coordinator opened a round.
    RoundOpened {
        /// Which node saw it.
        node: String,
        /// The round.
        round: u64,
        /// Members of the round.
        members: usize,
    },
    /// This node computed and published its update.
    Trained {
        /// Which node.
        node: String,
        /// The round.
        round: u64,
        /// Training loss on its batch.
        loss: f32,
        /// Tokens trained.
        tokens: u64,
        /// Top-k chosen to fit the upload cap.
        topk: usize,
        /// Update size in bytes.
        bytes: u64,
        /// Seconds the training step took on this node's device.
        secs: f64,
    },
    /// A round's manifest was applied (or, on the host, signed).
    RoundApplied {
        /// Which node.
        node: String,
        /// The round.
        round: u64,
        /// Updates applied.
        updates: usize,
        /// Mean reported training loss of the applied updates.
        loss: Option<f32>,
        /// Held-out loss after applying, when evaluated.
        eval_loss: Option<f32>,
        /// Weight digest after applying.
        digest: u64,
        /// Bytes this node sent during the round, on the wire (every
        /// datagram with its IP and UDP headers, not only the blobs).
        bytes_up: u64,
        /// Bytes this node received during the round, on the wire.
        bytes_down: u64,
        /// Bytes a fp32 all-reduce would have moved per member.
        allreduce_bytes: u64,
        /// Tokens the applied updates were trained on.
        tokens: u64,
        /// Tokens the run has trained on through this round (the coordinator's count).
        run_tokens: u64,
    },
    /// An update or message was refused.
    Rejected {
        /// Which node refused it.
        node: String,
        /// The round.
        round: u64,
        /// The peer it came from.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The host recomputed the loss and tokens of some of a round's updates.
    SpotChecked {
        /// The host.
        node: String,
        /// The round.
        round: u64,
        /// Updates checked.
        checked: usize,
        /// Of those, announced numbers that did not match (faults).
        mismatches: usize,
        /// What the checks cost, in milliseconds of the host's replica.
        millis: u64,
    },
    /// A member was removed from the run after repeated faults.
    Dropped {
        /// The host.
        node: String,
        /// The removed peer.
        peer: String,
        /// Faults counted.
        faults: u32,
    },
    /// The peers this node fetched from, after each applied round.
    Peers {
        /// Which node.
        node: String,
        /// Most recent first (at most 32).
        peers: Vec<PeerView>,
    },
    /// Progress of a large download (the checkpoint), a few times a second.
    Fetching {
        /// Which node.
        node: String,
        /// What is downloaded.
        what: String,
        /// Verified bytes received so far.
        done: u64,
        /// Its size in bytes.
        total: u64,
    },
    /// The coordinator's held-out loss after a round (volunteers learn it
    /// from the next round's open, usually after their own apply event).
    Evaluated {
        /// Which node heard it.
        node: String,
        /// The round after whose apply it was measured.
        round: u64,
        /// The held-out loss.
        eval_loss: f32,
    },
    /// A replica's weights differ from the coordinator's.
    Diverged {
        /// Which node noticed.
        node: String,
        /// The diverged peer.
        peer: String,
        /// The round compared.
        round: u64,
    },
    /// A checkpoint was written and published.
    Checkpoint {
        /// The host that wrote it, or the volunteer that loaded it.
        node: String,
        /// Last round it includes.
        round: u64,
        /// Its size.
        bytes: u64,
        /// Who served it to a volunteer: a member's short id, or `host`
        /// (`None` on the host, which wrote it).
        from: Option<String>,
    },
    /// This month's data use (after each round).
    Usage {
        /// Which node.
        node: String,
        /// The month (`YYYY-MM`, UTC).
        month: String,
        /// Bytes sent this month.
        up: u64,
        /// Bytes received this month.
        down: u64,
        /// The monthly cap in bytes, if any.
        cap: Option<u64>,
        /// Bytes both ways today (UTC).
        today: u64,
    },
    /// Something went wrong that the node survived.
    Warning {
        /// Which node.
        node: String,
        /// What happened.
        message: String,
    },
    /// The bandwidth caps changed while running.
    Caps {
        /// Which node.
        node: String,
        /// Upload cap in Mbit/s (`None`: unlimited).
        up_mbit: Option<f64>,
        /// Download cap in Mbit/s.
        down_mbit: Option<f64>,
    },
}

impl NodeEvent {
    /// One readable log line.
    pub fn line(&self) -> String {
        match self {
            NodeEvent::State {
                node,
                state,
                detail,
            } => format!("[{node}] {state:?}: {detail}"),
            NodeEvent::Joined {
                node,
                run,
                params,
                round,
                ..
            } => {
                format!("[{node}] joined run \"{run}\" ({params} parameters) at round {round}")
            }
            NodeEvent::RoundOpened {
                node,
                round,
                members,
            } => {
                format!("[{node}] round {round} open with {members} members")
            }
            NodeEvent::Trained {
                node,
                round,
                loss,
                tokens,
                topk,
                bytes,
                secs,
            } => format!(
                "[{node}] round {round}: trained {tokens} tokens in {secs:.2} s, loss {loss:.4}, sent top-{topk} update of {bytes} bytes"
            ),
            NodeEvent::RoundApplied {
                node,
                round,
                updates,
                loss,
                eval_loss,
                digest,
                bytes_up,
                bytes_down,
                ..
            } => {
                let loss = loss.map(|l| format!(", loss {l:.4}")).unwrap_or_default();
                let eval = eval_loss
                    .map(|l| format!(", eval {l:.4}"))
                    .unwrap_or_default();
                format!(
                    "[{node}] round {round}: applied {updates} updates{loss}{eval}, weights {digest:016x}, up {bytes_up} B, down {bytes_down} B"
                )
            }
            NodeEvent::Rejected {
                node,
                round,
                peer,
                reason,
            } => {
                format!("[{node}] round {round}: rejected {peer}: {reason}")
            }
            NodeEvent::SpotChecked {
                node,
                round,
                checked,
                mismatches,
                millis,
            } => format!(
                "[{node}] round {round}: recomputed the loss of {checked} updates in {millis} ms, \
                 {mismatches} announced other numbers"
            ),
            NodeEvent::Dropped { node, peer, faults } => {
                format!("[{node}] removed {peer} from the run after {faults} faults")
            }
            NodeEvent::Evaluated {
                node,
                round,
                eval_loss,
            } => format!("[{node}] round {round}: run eval loss {eval_loss:.4}"),
            NodeEvent::Fetching {
                node,
                what,
                done,
                total,
            } => format!("[{node}] {what}: {done} of {total} bytes"),
            NodeEvent::Peers { node, peers } => {
                let list: Vec<String> = peers
                    .iter()
                    .map(|p| match p.rtt_ms {
                        Some(ms) => format!("{} {ms:.0} ms", p.peer),
                        None => p.peer.clone(),
                    })
                    .collect();
                format!("[{node}] peers: {}", list.join(", "))
            }
            NodeEvent::Diverged { node, peer, round } => {
                format!("[{node}] {peer}'s weights differ from the coordinator's at round {round}")
            }
            NodeEvent::Checkpoint {
                node,
                round,
                bytes,
                from: None,
            } => format!("[{node}] checkpoint after round {round} ({bytes} bytes)"),
            NodeEvent::Checkpoint {
                node,
                round,
                bytes,
                from: Some(from),
            } => format!(
                "[{node}] loaded the checkpoint after round {round} ({bytes} bytes, from {from})"
            ),
            NodeEvent::Usage {
                node,
                month,
                up,
                down,
                cap,
                ..
            } => {
                let cap = cap.map(|c| format!(" of {c}")).unwrap_or_default();
                format!(
                    "[{node}] {month}: {} bytes used{cap} ({up} up, {down} down)",
                    up + down
                )
            }
            NodeEvent::Warning { node, message } => format!("[{node}] warning: {message}"),
            NodeEvent::Caps {
                node,
                up_mbit,
                down_mbit,
            } => {
                let cap = |c: &Option<f64>| {
                    c.map(|v| format!("{v} Mbit/s"))
                        .unwrap_or_else(|| "unlimited".into())
                };
                format!(
                    "[{node}] caps now: upload {}, download {}",
                    cap(up_mbit),
                    cap(down_mbit)
                )
            }
        }
    }
}
