//! Starling's desktop app: a tray icon and a dashboard window over
//! `starling-node`'s [`Volunteer`]. Everything that trains, talks to peers or
//! decides when to run lives in the node crate; this shell only turns clicks
//! into volunteer calls, volunteer events into pixels, and answers the one
//! question only a desktop can: how long its user has been away.
//!
//! On Linux the tray delivers menu events only (no clicks), so every action
//! is a menu item. Closing the window hides it and training goes on; Quit
//! leaves the run cleanly. A second launch (or a `starling://join/…` link)
//! reaches the first instance, which shows its window.

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod idle;

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use starling_node::machine;
use starling_node::{
    Activity, ErrorCode, ErrorInfo, IdleTime, NodeEvent, NodeState, Preset, Settings, Status,
    Volunteer, VolunteerConfig, VolunteerPaths,
};
use tauri::image::Image;
use tauri::menu::{Menu, MenuItem, PredefinedMenuItem};
use tauri::tray::{TrayIcon, TrayIconBuilder};
use tauri::{AppHandle, Emitter, Manager, RunEvent, State, WindowEvent};
use tauri_plugin_autostart::{MacosLauncher, ManagerExt};
use tokio::sync::mpsc;

/// What a command returns to the page on failure: a code to branch on, a
/// message, and per-field messages for the settings form.
type Result<T> = std::result::Result<T, ErrorInfo>;

#[tauri::command]
async fn status(session: State<'_, Volunteer>) -> Result<Status> {
    Ok(session.status().await)
}

#[tauri::command]
async fn machine_report() -> Result<machine::MachineReport> {
    tokio::task::spawn_blocking(machine::probe)
        .await
        .map_err(|e| {
            ErrorInfo::new(
                ErrorCode::Crashed,
                format!("the hardware probe failed: {e}"),
            )
        })
}

/// Save settings, apply them to the running node and to start-at-login.
async fn apply_settings(app: &AppHandle, session: &Volunteer, settings: Settings) -> Result<()> {
    let login = settings.start_at_login;
    session.update_settings(settings).await?;
    let autostart = app.autolaunch();
    let changed = match (login, autostart.is_enabled().unwrap_or(false)) {
        (true, false) => autostart.enable(),
        (false, true) => autostart.disable(),
        _ => Ok(()),
    };
    changed.map_err(|e| {
        ErrorInfo::new(
            ErrorCode::Other,
            format!("saved, but start at login could not be changed: {e}"),
        )
    })
}

#[tauri::command]
async fn save_settings(
    app: AppHandle,
    session: State<'_, Volunteer>,
    settings: Settings,
) -> Result<()> {
    apply_settings(&app, &session, settings).await
}

#[tauri::command]
async fn apply_preset(app: AppHandle, session: State<'_, Volunteer>, preset: Preset) -> Result<()> {
    let current = session.status().await.settings;
    apply_settings(&app, &session, current.with_preset(preset)).await
}

#[tauri::command]
async fn join(session: State<'_, Volunteer>, ticket: String) -> Result<()> {
    Ok(session.join(&ticket).await?)
}

#[tauri::command]
async fn pause(session: State<'_, Volunteer>) -> Result<()> {
    session.pause().await;
    Ok(())
}

#[tauri::command]
async fn resume(session: State<'_, Volunteer>) -> Result<()> {
    Ok(session.resume().await?)
}

#[tauri::command]
async fn snooze(session: State<'_, Volunteer>, minutes: u64) -> Result<()> {
    session
        .snooze(Duration::from_secs(minutes.max(1) * 60))
        .await;
    Ok(())
}

/// A small round tray icon in the state's colour.
fn dot(rgb: [u8; 3]) -> Image<'static> {
    const N: u32 = 32;
    let mut rgba = Vec::with_capacity((N * N * 4) as usize);
    let c = (N as f32 - 1.0) / 2.0;
    for y in 0..N {
        for x in 0..N {
            let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
            let alpha = ((c + 0.5 - d).clamp(0.0, 1.0) * 255.0) as u8;
            rgba.extend_from_slice(&[rgb[0], rgb[1], rgb[2], alpha]);
        }
    }
    Image::new_owned(rgba, N, N)
}

fn state_colour(state: NodeState) -> [u8; 3] {
    match state {
        NodeState::WarmingUp | NodeState::Training | NodeState::Syncing => [22, 163, 74],
        NodeState::Paused => [202, 138, 4],
        NodeState::Stopped => [220, 38, 38],
        _ => [107, 114, 128],
    }
}

fn show_window(app: &AppHandle) {
    if let Some(w) = app.get_webview_window("main") {
        let _ = w.show();
        let _ = w.unminimize();
        let _ = w.set_focus();
    }
}

/// A `starling://join/…` link among a launch's arguments.
fn link_in(args: &[String]) -> Option<String> {
    args.iter().find(|a| a.starts_with("starling://")).cloned()
}

fn build_tray(app: &AppHandle) -> tauri::Result<(TrayIcon, MenuItem<tauri::Wry>)> {
    let open = MenuItem::with_id(app, "open", "Open dashboard", true, None::<&str>)?;
    let pause = MenuItem::with_id(app, "pause", "Pause", true, None::<&str>)?;
    let snooze = MenuItem::with_id(app, "snooze", "Snooze 1 hour", true, None::<&str>)?;
    let quit = MenuItem::with_id(app, "quit", "Quit Starling", true, None::<&str>)?;
    let menu = Menu::with_items(
        app,
        &[
            &open,
            &PredefinedMenuItem::separator(app)?,
            &pause,
            &snooze,
            &PredefinedMenuItem::separator(app)?,
            &quit,
        ],
    )?;
    let tray = TrayIconBuilder::with_id("starling")
        .icon(dot(state_colour(NodeState::Waiting)))
        .tooltip("Starling: idle")
        .menu(&menu)
        .on_menu_event(|app, event| {
            let app = app.clone();
            let session = app.state::<Volunteer>().inner().clone();
            match event.id.as_ref() {
                "open" => show_window(&app),
                "pause" => {
                    tauri::async_runtime::spawn(async move {
                        match session.status().await.activity {
                            Activity::Running | Activity::Held { .. } => session.pause().await,
                            _ => {
                                let _ = session.resume().await;
                            }
                        }
                    });
                }
                "snooze" => {
                    tauri::async_runtime::spawn(async move {
                        session.snooze(Duration::from_secs(3600)).await;
                    });
                }
                "quit" => {
                    tauri::async_runtime::spawn(async move {
                        session.shutdown().await;
                        app.exit(0);
                    });
                }
                _ => {}
            }
        })
        .build(app)?;
    Ok((tray, pause))
}

/// Forward node events to the page and keep the tray in step.
fn forward_events(
    app: AppHandle,
    mut rx: mpsc::UnboundedReceiver<NodeEvent>,
    tray: Option<(TrayIcon, MenuItem<tauri::Wry>)>,
) {
    tauri::async_runtime::spawn(async move {
        while let Some(event) = rx.recv().await {
            if let (NodeEvent::State { state, detail, .. }, Some((tray, pause))) = (&event, &tray) {
                let _ = tray.set_icon(Some(dot(state_colour(*state))));
                let _ = tray.set_tooltip(Some(format!("Starling: {detail}")));
                let label = if *state == NodeState::Paused || *state == NodeState::Stopped {
                    "Resume"
                } else {
                    "Pause"
                };
                let _ = pause.set_text(label);
            }
            let _ = app.emit("node-event", &event);
        }
    });
}

/// The desktop's idle time (GNOME, Plasma, any X11 session).
struct DesktopIdle;

impl IdleTime for DesktopIdle {
    fn idle_secs(&self) -> Option<u64> {
        idle::idle_secs()
    }
}

/// Where settings and node files live: the platform's directories, or
/// `STARLING_APP_DIR` (tests, portable installs).
fn volunteer_paths() -> anyhow::Result<VolunteerPaths> {
    if let Some(dir) = std::env::var_os("STARLING_APP_DIR") {
        let dir = PathBuf::from(dir);
        return Ok(VolunteerPaths::in_dir(
            &dir.join("data"),
            Some(dir.join("config").join("settings.json")),
        ));
    }
    let settings = starling_node::settings::default_path()
        .ok_or_else(|| anyhow::anyhow!("this system has no home directory for settings"))?;
    let data_dir = starling_node::settings::data_dir()
        .ok_or_else(|| anyhow::anyhow!("this system has no home directory for data"))?;
    Ok(VolunteerPaths::in_dir(&data_dir, Some(settings)))
}

fn main() -> anyhow::Result<()> {
    let paths = volunteer_paths()?;
    let app = tauri::Builder::default()
        .plugin(tauri_plugin_single_instance::init(|app, args, _cwd| {
            show_window(app);
            if let Some(link) = link_in(&args) {
                let _ = app.emit("deep-link", link);
            }
        }))
        .plugin(tauri_plugin_deep_link::init())
        .plugin(tauri_plugin_autostart::init(
            MacosLauncher::LaunchAgent,
            Some(vec!["--minimized"]),
        ))
        .setup(move |app| {
            let (tx, rx) = mpsc::unbounded_channel();
            let session = tauri::async_runtime::block_on(Volunteer::open(
                VolunteerConfig::new(paths.clone()),
                tx,
            ))
            .map_err(|e| anyhow::anyhow!("cannot start Starling: {e}"))?;
            app.manage(session.clone());
            let handle = app.handle().clone();
            // Some Linux desktops have no tray: the window is the way in.
            let tray = match build_tray(&handle) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("no system tray ({e}); use the window");
                    None
                }
            };
            forward_events(handle.clone(), rx, tray);
            let ticks = handle.clone();
            let watcher = session.clone();
            tauri::async_runtime::spawn(async move {
                watcher
                    .watch_machine(Arc::new(DesktopIdle), move |tick| {
                        let _ = ticks.emit("tick", tick);
                    })
                    .await;
            });
            let args: Vec<String> = std::env::args().collect();
            if args.iter().any(|a| a == "--minimized")
                && let Some(w) = app.get_webview_window("main")
            {
                let _ = w.hide();
            }
            if let Some(link) = link_in(&args) {
                let _ = handle.emit("deep-link", link);
            }
            // Rejoin the last run after a restart.
            tauri::async_runtime::spawn(async move {
                if session.status().await.ticket.is_some() {
                    let _ = session.resume().await;
                }
            });
            Ok(())
        })
        .on_window_event(|window, event| {
            if let WindowEvent::CloseRequested { api, .. } = event {
                // Keep training in the background; Quit is in the tray.
                if window.app_handle().tray_by_id("starling").is_some() {
                    let _ = window.hide();
                    api.prevent_close();
                }
            }
        })
        .invoke_handler(tauri::generate_handler![
            status,
            machine_report,
            save_settings,
            apply_preset,
            join,
            pause,
            resume,
            snooze
        ])
        .build(tauri::generate_context!())?;
    app.run(|app, event| {
        if let RunEvent::ExitRequested { .. } = event {
            let session = app.state::<Volunteer>().inner().clone();
            tauri::async_runtime::block_on(session.shutdown());
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_found_among_launch_arguments() {
        let args = vec![
            "starling-app".to_string(),
            "starling://join/starling1abc".to_string(),
        ];
        assert_eq!(
            link_in(&args).as_deref(),
            Some("starling://join/starling1abc")
        );
        assert_eq!(link_in(&args[..1]), None);
    }

    #[test]
    fn tray_dots_are_round_and_coloured() {
        let img = dot([1, 2, 3]);
        let rgba = img.rgba();
        assert_eq!(rgba.len(), 32 * 32 * 4);
        assert_eq!(rgba[3], 0, "corners are transparent");
        let centre = ((16 * 32 + 16) * 4) as usize;
        assert_eq!(&rgba[centre..centre + 4], &[1, 2, 3, 255]);
    }
}
