//! One Starling node's runtime, shared by the `starling` CLI and the desktop
//! app: a coordinator ([`host`]) or a volunteer ([`volunteer`]) wired from the
//! swarm (network) and train (model) layers, reporting one [`NodeEvent`]
//! stream.

pub mod caps;
pub mod data;
pub mod events;
pub mod host;
pub mod keyfile;
pub mod machine;
pub mod metrics;
pub mod replica;
pub mod session;
pub mod settings;
pub mod spec;
pub mod usage;
pub mod volunteer;

pub use events::{NodeEvent, NodeState, PeerView};
pub use host::{Host, HostError, HostOptions};
pub use spec::{RunFile, RunSpec, SpecError};
pub use starling_swarm::{EndpointId, SecretKey, Ticket, Traffic};
pub use usage::{MonthlyCap, Usage};
pub use volunteer::{VolunteerError, VolunteerOptions, run_volunteer};

/// A short, stable name for a node in logs.
pub fn short(id: &EndpointId) -> String {
    id.fmt_short().to_string()
}
