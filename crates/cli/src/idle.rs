//! Idle time for `starling join --idle-only` on a machine with no desktop to
//! ask: the newest use of any terminal, as `w` reports it.
//!
//! The kernel stamps a terminal's access time whenever someone types into it
//! (consoles and SSH sessions alike, whatever the mount options), so the
//! youngest stamp among `/dev/tty*` and `/dev/pts/*` says how long the
//! machine's people have been away. Input devices are not used: their
//! stamps follow the mount's `relatime` rule and lag by up to a day.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use starling_node::IdleTime;

/// Reads terminal access times under `/dev` (or a test's stand-in).
#[derive(Clone, Debug)]
pub struct TerminalIdle {
    dev: PathBuf,
}

impl Default for TerminalIdle {
    fn default() -> Self {
        Self::under(Path::new("/dev"))
    }
}

impl TerminalIdle {
    /// Terminals under `dev` (`tty*` files and the `pts` folder).
    pub fn under(dev: &Path) -> Self {
        Self { dev: dev.into() }
    }

    /// The newest access time among the terminals, if any can be read.
    fn newest_use(&self) -> Option<SystemTime> {
        let ttys = std::fs::read_dir(&self.dev)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tty"))
            .map(|e| e.path());
        let pts = std::fs::read_dir(self.dev.join("pts"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name() != "ptmx")
            .map(|e| e.path());
        ttys.chain(pts)
            .filter_map(|p| std::fs::metadata(p).and_then(|m| m.accessed()).ok())
            .max()
    }
}

impl IdleTime for TerminalIdle {
    fn idle_secs(&self) -> Option<u64> {
        let newest = self.newest_use()?;
        Some(
            SystemTime::now()
                .duration_since(newest)
                .map_or(0, |d| d.as_secs()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, FileTimes};
    use std::time::Duration;

    fn touch(path: &Path, ago: Duration) {
        let f = File::create(path).unwrap();
        let t = SystemTime::now() - ago;
        f.set_times(FileTimes::new().set_accessed(t).set_modified(t))
            .unwrap();
    }

    #[test]
    fn the_youngest_terminal_sets_the_idle_time() {
        let dev = std::env::temp_dir().join(format!("starling-idle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dev);
        std::fs::create_dir_all(dev.join("pts")).unwrap();
        let idle = TerminalIdle::under(&dev);
        assert_eq!(idle.idle_secs(), None, "no terminals: unknown");
        touch(&dev.join("tty1"), Duration::from_secs(3600));
        touch(&dev.join("null"), Duration::ZERO);
        let secs = idle.idle_secs().unwrap();
        assert!((3599..=3610).contains(&secs), "{secs}");
        touch(&dev.join("pts").join("3"), Duration::from_secs(120));
        touch(&dev.join("pts").join("ptmx"), Duration::ZERO);
        let secs = idle.idle_secs().unwrap();
        assert!((119..=130).contains(&secs), "{secs}");
        let _ = std::fs::remove_dir_all(&dev);
    }
}
