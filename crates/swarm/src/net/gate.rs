//! The membership gate.
//!
//! A run's blobs, gossip and coordinator are for its members only, and a
//! check inside each protocol would be one check to forget. The gate runs in
//! iroh's after-handshake hook instead: once per connection, in both
//! directions and for every protocol, so a non-member never reaches any of
//! them. The close code it refuses with lets a caller tell "not admitted"
//! from "unreachable".

use std::{
    collections::HashSet,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use iroh::{
    EndpointId,
    endpoint::{AfterHandshakeOutcome, Connection, ConnectionError, EndpointHooks, VarInt},
};
use tokio::sync::mpsc;

use super::NetEvent;

/// Code a gate closes refused connections with.
const REFUSED_CODE: u32 = 403;

/// Whether `e` is a gate's refusal (the remote does not admit this node).
pub(super) fn refused_by_gate(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(REFUSED_CODE))
}

/// Who may connect: everyone (an open run) or the current members.
#[derive(Debug)]
pub(super) struct Gate {
    open: AtomicBool,
    allowed: RwLock<HashSet<EndpointId>>,
    events: mpsc::Sender<NetEvent>,
}

impl Gate {
    /// A gate admitting everyone if `open`, else `allowed`; refusals are
    /// reported on `events`.
    pub(super) fn new(
        open: bool,
        allowed: impl IntoIterator<Item = EndpointId>,
        events: mpsc::Sender<NetEvent>,
    ) -> Self {
        Self {
            open: AtomicBool::new(open),
            allowed: RwLock::new(allowed.into_iter().collect()),
            events,
        }
    }

    /// Admit exactly `allowed` from now on (an open gate stays open).
    pub(super) fn set_allowed(&self, allowed: HashSet<EndpointId>) {
        *self.allowed.write().unwrap_or_else(|e| e.into_inner()) = allowed;
    }

    fn allows(&self, id: &EndpointId) -> bool {
        self.open.load(Ordering::Relaxed)
            || self
                .allowed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(id)
    }
}

/// The endpoint hook that asks the [`Gate`] after every handshake.
#[derive(Debug)]
pub(super) struct GateHook(pub(super) Arc<Gate>);

impl EndpointHooks for GateHook {
    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        let remote = conn.remote_id();
        if self.0.allows(&remote) {
            AfterHandshakeOutcome::Accept
        } else {
            let _ = self.0.events.try_send(NetEvent::Refused(remote));
            AfterHandshakeOutcome::Reject {
                error_code: REFUSED_CODE.into(),
                reason: b"not a member of this run".to_vec(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use iroh::SecretKey;

    use super::*;

    fn id(seed: u8) -> EndpointId {
        SecretKey::from_bytes(&[seed; 32]).public()
    }

    #[test]
    fn a_closed_gate_admits_exactly_its_members() {
        let (tx, _rx) = mpsc::channel(1);
        let gate = Gate::new(false, [id(1)], tx);
        assert!(gate.allows(&id(1)));
        assert!(!gate.allows(&id(2)));
        gate.set_allowed([id(2)].into_iter().collect());
        assert!(!gate.allows(&id(1)));
        assert!(gate.allows(&id(2)));
    }

    #[test]
    fn an_open_gate_admits_anyone() {
        let (tx, _rx) = mpsc::channel(1);
        let gate = Gate::new(true, [], tx);
        assert!(gate.allows(&id(3)));
        gate.set_allowed(HashSet::new());
        assert!(gate.allows(&id(3)));
    }
}
