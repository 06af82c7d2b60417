//! Bandwidth caps a running node picks up from a small JSON file.
//!
//! A server operator changes a node's caps without restarting it (a restart
//! costs a round and a catch-up): edit the file, or write it from a script or
//! a scheduler, and the node applies the new caps within a second. A file
//! rather than a network endpoint, because file permissions already say who
//! may change them. The desktop app changes caps through `Traffic::set_caps`
//! directly.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use starling_swarm::Traffic;
use tokio::sync::mpsc;

use crate::events::NodeEvent;
use crate::settings::{Preset, Settings, SettingsError};

/// Why a caps file was not applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CapsError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not the expected JSON.
    #[error(
        "{path}: {source} (expected {{\"up_mbit\": 10, \"down_mbit\": 100}}; null means unlimited)"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// Caps out of range.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which cap and what is allowed.
        source: SettingsError,
    },
}

/// Upload and download caps in Mbit/s (`None`: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caps {
    /// Upload cap.
    #[serde(default)]
    pub up_mbit: Option<f64>,
    /// Download cap.
    #[serde(default)]
    pub down_mbit: Option<f64>,
}

impl Caps {
    /// Check both caps with the same rules as the settings' caps.
    pub fn check(&self) -> Result<(), SettingsError> {
        Settings {
            up_mbit: self.up_mbit,
            down_mbit: self.down_mbit,
            ..Settings::preset(Preset::Maximum)
        }
        .check()
    }

    /// Read and check a caps file.
    pub fn load(path: &Path) -> Result<Self, CapsError> {
        let bytes = std::fs::read(path).map_err(|source| CapsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let caps: Caps = serde_json::from_slice(&bytes).map_err(|source| CapsError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        caps.check().map_err(|source| CapsError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(caps)
    }

    /// Write a caps file atomically.
    pub fn save(&self, path: &Path) -> Result<(), CapsError> {
        let text = serde_json::to_vec_pretty(self).map_err(|source| CapsError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        starling_train::atomic::write_atomic(path, &text).map_err(|source| CapsError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Apply to a node's traffic.
    pub fn apply(&self, traffic: &Traffic) {
        traffic.set_caps(self.up_mbit, self.down_mbit);
    }
}

/// Notices edits of a caps file by its modification time and size.
#[derive(Debug)]
pub struct CapsWatcher {
    path: PathBuf,
    every: Duration,
    seen: Option<(SystemTime, u64)>,
    first: bool,
}

impl CapsWatcher {
    /// Watch `path`, looking every `every`.
    pub fn new(path: PathBuf, every: Duration) -> Self {
        Self {
            path,
            every,
            seen: None,
            first: true,
        }
    }

    /// The file's caps: at once on the first call, then after each change.
    pub async fn next(&mut self) -> Result<Caps, CapsError> {
        loop {
            if !std::mem::take(&mut self.first) {
                tokio::time::sleep(self.every).await;
            }
            let now = stamp(&self.path);
            if now != self.seen {
                self.seen = now;
                return Caps::load(&self.path);
            }
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Apply the caps in `path` to `traffic` now and again whenever the file
/// changes (checked every `every`), reporting each change (or why one was
/// refused: the old caps stay) as events from `node`. Ends when the event
/// receiver is gone. (A host's caps; a volunteer's go through its settings:
/// `Volunteer::watch_caps_file`.)
pub async fn watch_caps(
    path: PathBuf,
    traffic: Traffic,
    node: String,
    out: mpsc::UnboundedSender<NodeEvent>,
    every: Duration,
) {
    let mut watcher = CapsWatcher::new(path, every);
    loop {
        let next = tokio::select! {
            next = watcher.next() => next,
            () = out.closed() => return,
        };
        let event = match next {
            Ok(caps) => {
                caps.apply(&traffic);
                NodeEvent::Caps {
                    node: node.clone(),
                    up_mbit: caps.up_mbit,
                    down_mbit: caps.down_mbit,
                }
            }
            Err(e) => NodeEvent::Warning {
                node: node.clone(),
                message: format!("caps not changed: {e}"),
            },
        };
        if out.send(event).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn edits_apply_live_and_bad_edits_keep_the_old_caps() {
        let dir = std::env::temp_dir().join(format!("starling-caps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("caps.json");
        Caps {
            up_mbit: Some(10.0),
            down_mbit: None,
        }
        .save(&path)
        .unwrap();
        let traffic = Traffic::new(Some(10.0), None);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(watch_caps(
            path.clone(),
            traffic.clone(),
            "n".into(),
            tx,
            Duration::from_millis(20),
        ));
        let e = rx.recv().await.unwrap();
        assert!(matches!(e, NodeEvent::Caps { up_mbit: Some(v), .. } if v == 10.0));
        std::fs::write(&path, r#"{"up_mbit": 2, "down_mbit": 40}"#).unwrap();
        let e = rx.recv().await.unwrap();
        assert_eq!(
            e,
            NodeEvent::Caps {
                node: "n".into(),
                up_mbit: Some(2.0),
                down_mbit: Some(40.0)
            }
        );
        assert_eq!(traffic.up.rate(), Some(250_000.0));
        assert_eq!(traffic.down.rate(), Some(5_000_000.0));
        for bad in [r#"{"up_mbit": -1}"#, "{\"up\": 3}", "not json"] {
            std::fs::write(&path, bad).unwrap();
            match rx.recv().await.unwrap() {
                NodeEvent::Warning { message, .. } => {
                    assert!(message.contains("caps not changed"), "{message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
            assert_eq!(traffic.up.rate(), Some(250_000.0), "{bad}");
        }
        std::fs::write(&path, r#"{"up_mbit": null}"#).unwrap();
        assert!(matches!(rx.recv().await.unwrap(), NodeEvent::Caps { .. }));
        assert_eq!(traffic.up.rate(), None);
        assert_eq!(traffic.down.rate(), None);
        drop(rx);
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
