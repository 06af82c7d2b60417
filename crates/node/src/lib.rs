//! One Starling node's runtime, shared by the `starling` CLI and the desktop
//! app: a coordinator ([`Host`]) or a volunteer ([`Volunteer`]) wired from the
//! swarm (network) and train (model) layers, reporting one [`NodeEvent`]
//! stream.
//!
//! The surface is small on purpose: the two faces (CLI and app) see the
//! façade, the host, the events, the run spec and the settings and machine
//! report they render; how a round is played stays inside, free to change.

mod caps;
mod data;
mod events;
mod host;
mod keyfile;
pub mod machine;
mod metrics;
mod replica;
pub mod settings;
mod spec;
mod swarm_bench;
mod usage;
mod volunteer;

#[cfg(test)]
mod ts_types;

pub use caps::{Caps, CapsError, watch_caps};
pub use events::{NodeEvent, NodeState, PeerView};
pub use host::{Host, HostError, HostOptions};
pub use keyfile::load_or_create as load_or_create_key;
pub use metrics::{Metrics, serve as serve_metrics};
pub use settings::{Preset, Settings, SettingsError, Window};
pub use spec::{RunFile, RunSpec, SpecError};
pub use starling_swarm::{EndpointId, SecretKey, Ticket, Traffic, unix_ms};
pub use swarm_bench::{
    Bookkeeping as HostBookkeeping, RoundReport as SwarmRoundReport, SwarmBenchError,
    SwarmBenchOptions, measure_bookkeeping as bench_host_bookkeeping, process_rss,
    run as bench_swarm,
};
/// The shape of the tree a round's shared blobs spread through: children
/// per member, and the coordinator's children.
pub use volunteer::spread::{FANOUT as TREE_FANOUT, HOST_FANOUT as TREE_HOST_FANOUT};
pub use volunteer::{
    Activity, ErrorCode, ErrorInfo, IdleTime, NoIdleTime, SessionError, Status, Tick, Volunteer,
    VolunteerConfig, VolunteerError, VolunteerPaths,
};

#[cfg(test)]
pub(crate) use {
    usage::MonthlyCap,
    volunteer::{VolunteerOptions, run_volunteer},
};

/// A short, stable name for a node in logs.
pub fn short(id: &EndpointId) -> String {
    id.fmt_short().to_string()
}
