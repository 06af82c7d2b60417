//! How long the person at this computer has not touched it, for the "only
//! when idle" rule.
//!
//! Linux has no desktop-neutral way to ask: X11's screensaver extension is
//! blind to Wayland input, and Wayland leaves idle time to each compositor.
//! So the reading is asked in this order: GNOME's Mutter IdleMonitor on the
//! session bus (X11 and Wayland); on Wayland, the `org.freedesktop.ScreenSaver`
//! service where it reports idle time (KDE Plasma); on X11, the server's
//! screensaver extension (every X11 desktop). A Wayland session of another
//! compositor reports nothing, and then the rule holds nothing (the settings
//! form and docs/APP.md say so).

/// Mutter's idle monitor: bus name and interface.
#[cfg(target_os = "linux")]
const MUTTER: &str = "org.gnome.Mutter.IdleMonitor";
/// Its object for the core (whole-session) monitor.
#[cfg(target_os = "linux")]
const MUTTER_CORE: &str = "/org/gnome/Mutter/IdleMonitor/Core";
/// The freedesktop screensaver service: bus name and interface.
#[cfg(target_os = "linux")]
const SCREENSAVER: &str = "org.freedesktop.ScreenSaver";
/// Its object.
#[cfg(target_os = "linux")]
const SCREENSAVER_PATH: &str = "/org/freedesktop/ScreenSaver";

/// Seconds since the last keyboard or pointer input, where the desktop tells.
/// Blocking (a D-Bus or X11 round trip of at most half a second).
pub fn idle_secs() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let bus = dbus::blocking::Connection::new_session().ok();
        if let Some(secs) = bus.as_ref().and_then(mutter_idle_secs) {
            return Some(secs);
        }
        if wayland_session() {
            // GNOME's own org.freedesktop.ScreenSaver does not report idle
            // time and older screensavers count it in seconds; Plasma's, the
            // one Wayland desktop that answers here, counts milliseconds.
            bus.as_ref().and_then(screensaver_idle_secs)
        } else {
            x11_idle_secs(None)
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Whether this is a Wayland session (where X11's idle time only counts
/// input to X11 windows).
#[cfg(target_os = "linux")]
fn wayland_session() -> bool {
    std::env::var_os("WAYLAND_DISPLAY").is_some()
        || std::env::var("XDG_SESSION_TYPE").is_ok_and(|t| t == "wayland")
}

/// Ask Mutter's idle monitor on `conn`'s bus; `None` when it does not answer.
#[cfg(target_os = "linux")]
fn mutter_idle_secs(conn: &dbus::blocking::Connection) -> Option<u64> {
    let proxy = conn.with_proxy(MUTTER, MUTTER_CORE, std::time::Duration::from_millis(500));
    let (ms,): (u64,) = proxy.method_call(MUTTER, "GetIdletime", ()).ok()?;
    Some(ms / 1000)
}

/// Ask the freedesktop screensaver service on `conn`'s bus (milliseconds,
/// as Plasma reports them); `None` when it does not answer.
#[cfg(target_os = "linux")]
fn screensaver_idle_secs(conn: &dbus::blocking::Connection) -> Option<u64> {
    let proxy = conn.with_proxy(
        SCREENSAVER,
        SCREENSAVER_PATH,
        std::time::Duration::from_millis(500),
    );
    let (ms,): (u32,) = proxy
        .method_call(SCREENSAVER, "GetSessionIdleTime", ())
        .ok()?;
    Some(u64::from(ms) / 1000)
}

/// Ask the X server on `display` (default: `$DISPLAY`) through its
/// screensaver extension; `None` without a server or the extension.
#[cfg(target_os = "linux")]
fn x11_idle_secs(display: Option<&str>) -> Option<u64> {
    use x11rb::connection::Connection as _;
    use x11rb::protocol::screensaver::ConnectionExt as _;
    let (conn, screen) = x11rb::connect(display).ok()?;
    let root = conn.setup().roots.get(screen)?.root;
    let info = conn.screensaver_query_info(root).ok()?.reply().ok()?;
    Some(u64::from(info.ms_since_user_input) / 1000)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    // The stand-in services and servers below are test scaffolding: a
    // failure there is a failed test.
    #![allow(clippy::unwrap_used, clippy::expect_used)]
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

    /// A stand-in desktop service on `address`: owns `name` and answers
    /// `member` calls with `reply` until dropped.
    struct Service {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Service {
        fn start<R>(address: &str, name: &'static str, member: &'static str, reply: R) -> Self
        where
            R: dbus::arg::Append + Copy + Send + 'static,
        {
            let stop = Arc::new(AtomicBool::new(false));
            let (address, stopped) = (address.to_string(), stop.clone());
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let thread = std::thread::spawn(move || {
                let conn = Connection::new_address(&address).unwrap();
                conn.request_name(name, false, true, true).unwrap();
                conn.start_receive(
                    MatchRule::new_method_call(),
                    Box::new(move |msg, conn| {
                        if msg.member().as_deref() == Some(member) {
                            let _ = conn.send(msg.method_return().append1(reply));
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
            Self {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Service {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn reads_gnome_and_plasma_idle_time_and_nothing_without_them() {
        // Debian's dbus-daemon package (test.sh installs it).
        let bus = Bus::start().unwrap();
        let client = Connection::new_address(&bus.1).unwrap();
        assert_eq!(mutter_idle_secs(&client), None, "no Mutter on this bus yet");
        assert_eq!(screensaver_idle_secs(&client), None);

        // Stand-ins for GNOME's compositor (idle for 90.5 s, in ms as u64)
        // and Plasma's screensaver (idle for 42.9 s, in ms as u32).
        let mutter = Service::start(&bus.1, MUTTER, "GetIdletime", 90_500u64);
        assert_eq!(mutter_idle_secs(&client), Some(90));
        let plasma = Service::start(&bus.1, SCREENSAVER, "GetSessionIdleTime", 42_900u32);
        assert_eq!(screensaver_idle_secs(&client), Some(42));
        drop((mutter, plasma));
    }

    /// An X server of its own (Debian's `xvfb`), stopped on drop.
    struct Xvfb(std::process::Child, String);

    impl Xvfb {
        fn start() -> Self {
            // A display number of this process's own, clear of xvfb-run's 99 up.
            let display = format!(":{}", 1000 + std::process::id() % 30_000);
            let child = Command::new("Xvfb")
                .args([
                    display.as_str(),
                    // Without it the server resets when its last client
                    // leaves, and a connection made during the reset reads
                    // EOF (seen in CI: "failed to read whole buffer").
                    "-noreset",
                    "-nolisten",
                    "tcp",
                    "-screen",
                    "0",
                    "64x64x24",
                ])
                .stderr(Stdio::null())
                .spawn()
                .expect("Xvfb (the xvfb package) starts");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while x11rb::connect(Some(&display)).is_err() {
                assert!(std::time::Instant::now() < deadline, "Xvfb did not come up");
                std::thread::sleep(Duration::from_millis(100));
            }
            Self(child, display)
        }
    }

    impl Drop for Xvfb {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn reads_x11_idle_time_which_input_resets() {
        use x11rb::connection::Connection as _;
        use x11rb::protocol::xproto::MOTION_NOTIFY_EVENT;
        use x11rb::protocol::xtest::ConnectionExt as _;
        use x11rb::wrapper::ConnectionExt as _;

        assert_eq!(x11_idle_secs(Some(":58999")), None, "no server there");
        let x = Xvfb::start();
        // Nobody has touched the new server: idle time grows.
        std::thread::sleep(Duration::from_millis(2200));
        let before = x11_idle_secs(Some(&x.1)).expect("Xvfb has the screensaver extension");
        assert!(before >= 2, "idle {before} s after 2.2 s untouched");
        // Move the pointer (XTEST, as a real mouse would): idle starts over.
        let (conn, screen) = x11rb::connect(Some(&x.1)).unwrap();
        let root = conn.setup().roots[screen].root;
        conn.xtest_fake_input(MOTION_NOTIFY_EVENT, 0, 0, root, 10, 10, 0)
            .unwrap();
        conn.sync().unwrap();
        let after = x11_idle_secs(Some(&x.1)).unwrap();
        assert!(
            after < before,
            "idle {after} s after input, {before} s before"
        );
    }
}
