//! A node's identity on disk: its ed25519 secret key, created once, kept
//! across restarts so a volunteer that crashes rejoins as the same member.

use std::{io, path::Path};

use starling_swarm::SecretKey;
use starling_train::atomic::write_atomic;

/// Read the key at `path`, or create and save a new one.
pub fn load_or_create(path: &Path) -> io::Result<SecretKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse::<SecretKey>().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("not a secret key: {e}"))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            write_atomic(path, hex.as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = std::env::temp_dir().join(format!("starling-key-{}", std::process::id()));
        let path = dir.join("node.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_or_create(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
