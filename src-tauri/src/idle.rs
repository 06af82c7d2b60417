//! How long the person at this computer has not touched it, for the "only
//! when idle" rule.
//!
//! Linux has no desktop-neutral way to ask: X11's screensaver extension is
//! blind to Wayland input, and Wayland leaves idle time to each compositor.
//! GNOME answers on both X11 and Wayland through Mutter's IdleMonitor on the
//! session bus, which is what is read here; on other desktops the reading is
//! `None` and the rule holds nothing (docs/APP.md says so).

/// Mutter's idle monitor: bus name and interface.
#[cfg(target_os = "linux")]
const MUTTER: &str = "org.gnome.Mutter.IdleMonitor";
/// Its object for the core (whole-session) monitor.
#[cfg(target_os = "linux")]
const MUTTER_CORE: &str = "/org/gnome/Mutter/IdleMonitor/Core";

/// Seconds since the last keyboard or pointer input, where the desktop tells.
/// Blocking (a D-Bus round trip of at most half a second).
pub fn idle_secs() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let conn = dbus::blocking::Connection::new_session().ok()?;
        mutter_idle_secs(&conn)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Ask Mutter's idle monitor on `conn`'s bus; `None` when it does not answer.
#[cfg(target_os = "linux")]
fn mutter_idle_secs(conn: &dbus::blocking::Connection) -> Option<u64> {
    let proxy = conn.with_proxy(MUTTER, MUTTER_CORE, std::time::Duration::from_millis(500));
    let (ms,): (u64,) = proxy.method_call(MUTTER, "GetIdletime", ()).ok()?;
    Some(ms / 1000)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use dbus::blocking::Connection;
    use dbus::channel::{MatchingReceiver, Sender};
    use dbus::message::MatchRule;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// A private session bus (Debian's `dbus-daemon`), stopped on drop.
    struct Bus(std::process::Child, String);

    impl Bus {
        fn start() -> std::io::Result<Self> {
            let mut child = Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--print-address=1"])
                .stdout(Stdio::piped())
                .spawn()?;
            let mut address = String::new();
            if let Some(stdout) = child.stdout.take() {
                BufReader::new(stdout).read_line(&mut address)?;
            }
            Ok(Self(child, address.trim().to_string()))
        }
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn reads_gnome_idle_time_and_nothing_without_gnome() {
        // Debian's dbus-daemon package (test.sh installs it).
        let bus = Bus::start().unwrap();
        let client = Connection::new_address(&bus.1).unwrap();
        assert_eq!(mutter_idle_secs(&client), None, "no Mutter on this bus yet");

        // A stand-in for GNOME's compositor: idle for 90.5 s.
        let stop = Arc::new(AtomicBool::new(false));
        let (address, stopped) = (bus.1.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let conn = Connection::new_address(&address).unwrap();
            conn.request_name(MUTTER, false, true, true).unwrap();
            conn.start_receive(
                MatchRule::new_method_call(),
                Box::new(|msg, conn| {
                    if msg.member().as_deref() == Some("GetIdletime") {
                        let _ = conn.send(msg.method_return().append1(90_500u64));
                    }
                    true
                }),
            );
            ready_tx.send(()).unwrap();
            while !stopped.load(Ordering::Relaxed) {
                conn.process(Duration::from_millis(50)).unwrap();
            }
        });
        ready_rx.recv().unwrap();
        assert_eq!(mutter_idle_secs(&client), Some(90));
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }
}
