//! A volunteer's settings: limits on what Starling may take from their
//! machine and connection, and when.
//!
//! Volunteer-computing users' first requests are about control: cap the
//! bandwidth, cap the month's data, only run when I'm away, not on battery,
//! not when the GPU runs hot, only at night. These rules live here, next to
//! the node rather than in the app, so the CLI and the desktop app apply the
//! same validated settings and the rule that decides "run now or not" is a
//! pure function the tests pin down.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ts_rs::TS;

/// Why settings could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid settings JSON.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// Values out of range.
    #[error("{}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

/// One invalid field and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, TS)]
pub struct FieldError {
    /// The field's JSON name.
    pub field: String,
    /// A message for the person who typed it.
    pub message: String,
}

/// A daily window, local time, `HH:MM`; `end` before `start` wraps midnight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start, e.g. "22:00".
    pub start: String,
    /// End, e.g. "07:00".
    pub end: String,
}

/// Named settings for people who don't want to think about numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Barely noticeable: small caps, only when idle, never on battery.
    Light,
    /// A fair share of a home connection.
    Standard,
    /// Everything the machine and line can give.
    Maximum,
}

/// Everything a volunteer can set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, TS)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Upload cap in Mbit/s (`None`: unlimited).
    pub up_mbit: Option<f64>,
    /// Download cap in Mbit/s.
    pub down_mbit: Option<f64>,
    /// Data per calendar month (up + down) in GB before pausing.
    pub monthly_cap_gb: Option<f64>,
    /// `auto`, `cpu`, `wgpu:N` or `cuda:N`.
    pub device: String,
    /// Most GPU memory training may use, in GB.
    pub vram_limit_gb: Option<f64>,
    /// Run only after this many minutes without keyboard or mouse input.
    pub idle_minutes: Option<u32>,
    /// Pause while the computer runs on battery.
    pub pause_on_battery: bool,
    /// Run only inside this daily window.
    pub schedule: Option<Window>,
    /// Pause while the GPU is hotter than this (°C), where it can be read.
    pub max_gpu_temp_c: Option<u32>,
    /// Start Starling when the user logs in.
    pub start_at_login: bool,
    /// The last run joined, to rejoin after a restart.
    pub ticket: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self::preset(Preset::Standard)
    }
}

/// Why participation is paused by a rule right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, TS)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Hold {
    /// The user is at the machine.
    NotIdle {
        /// Minutes of idleness required.
        minutes: u32,
    },
    /// Running on battery.
    OnBattery,
    /// Outside the daily window.
    OutsideSchedule {
        /// The window.
        start: String,
        /// Its end.
        end: String,
    },
    /// The GPU is too hot.
    TooHot {
        /// Its temperature.
        celsius: u32,
        /// The limit.
        limit: u32,
    },
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::NotIdle { minutes } => write!(
                f,
                "waiting until the computer has been idle for {minutes} minutes"
            ),
            Hold::OnBattery => write!(f, "paused while on battery"),
            Hold::OutsideSchedule { start, end } => {
                write!(f, "outside the schedule ({start}-{end})")
            }
            Hold::TooHot { celsius, limit } => {
                write!(f, "GPU at {celsius} °C, above the {limit} °C limit")
            }
        }
    }
}

/// What the machine reports now, for [`Settings::hold`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Minutes since midnight, local time.
    pub minute_of_day: u32,
    /// Seconds since the last input, where known.
    pub idle_secs: Option<u64>,
    /// Whether on battery, where known.
    pub on_battery: Option<bool>,
    /// GPU temperature, where known.
    pub gpu_temp_c: Option<u32>,
}

/// Minutes since midnight of an `HH:MM` string.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.trim().len() <= 5).then_some(h * 60 + m)
}

impl Settings {
    /// The settings a preset stands for.
    pub fn preset(p: Preset) -> Self {
        let base = Self {
            up_mbit: None,
            down_mbit: None,
            monthly_cap_gb: None,
            device: "auto".into(),
            vram_limit_gb: None,
            idle_minutes: None,
            pause_on_battery: true,
            schedule: None,
            max_gpu_temp_c: None,
            start_at_login: false,
            ticket: None,
        };
        match p {
            Preset::Light => Self {
                up_mbit: Some(2.0),
                down_mbit: Some(20.0),
                monthly_cap_gb: Some(50.0),
                idle_minutes: Some(5),
                max_gpu_temp_c: Some(75),
                ..base
            },
            Preset::Standard => Self {
                up_mbit: Some(5.0),
                down_mbit: Some(50.0),
                monthly_cap_gb: Some(200.0),
                max_gpu_temp_c: Some(83),
                ..base
            },
            Preset::Maximum => Self {
                pause_on_battery: false,
                ..base
            },
        }
    }

    /// Apply a preset's limits, keeping device, login start and ticket.
    pub fn with_preset(&self, p: Preset) -> Self {
        Self {
            device: self.device.clone(),
            vram_limit_gb: self.vram_limit_gb,
            start_at_login: self.start_at_login,
            ticket: self.ticket.clone(),
            ..Self::preset(p)
        }
    }

    /// Every invalid field with a message saying what is allowed.
    pub fn check(&self) -> Result<(), SettingsError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.into(),
                message,
            })
        };
        for (field, v, max) in [
            ("up_mbit", self.up_mbit, 100_000.0),
            ("down_mbit", self.down_mbit, 100_000.0),
            ("monthly_cap_gb", self.monthly_cap_gb, 1_000_000.0),
            ("vram_limit_gb", self.vram_limit_gb, 10_000.0),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0 && v <= max)
            {
                bad(
                    field,
                    format!("must be a number above 0 and at most {max}, or empty for no limit"),
                );
            }
        }
        if let Some(up) = self.up_mbit
            && up.is_finite()
            && up > 0.0
            && up < 0.1
        {
            bad(
                "up_mbit",
                "below 0.1 Mbit/s no update fits a round; use at least 0.1".into(),
            );
        }
        if self.device.parse::<starling_train::DeviceChoice>().is_err() {
            bad(
                "device",
                format!("{:?} is not auto, cpu, wgpu:N or cuda:N", self.device),
            );
        }
        if let Some(m) = self.idle_minutes
            && !(1..=1440).contains(&m)
        {
            bad("idle_minutes", "must be between 1 and 1440 minutes".into());
        }
        if let Some(w) = &self.schedule {
            for (field, v) in [("schedule.start", &w.start), ("schedule.end", &w.end)] {
                if parse_hhmm(v).is_none() {
                    bad(field, format!("{v:?} is not a time like 22:00"));
                }
            }
            if w.start == w.end {
                bad("schedule.end", "must differ from the start".into());
            }
        }
        if let Some(t) = self.max_gpu_temp_c
            && !(40..=105).contains(&t)
        {
            bad("max_gpu_temp_c", "must be between 40 and 105 °C".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SettingsError::Invalid(errors))
        }
    }

    /// The monthly cap in bytes.
    pub fn monthly_cap_bytes(&self) -> Option<u64> {
        self.monthly_cap_gb.map(|gb| (gb * 1e9) as u64)
    }

    /// The first rule that holds participation back now, if any. Unknown
    /// conditions (no battery sensor, unreadable temperature) hold nothing.
    pub fn hold(&self, now: &Conditions) -> Option<Hold> {
        if let Some(w) = &self.schedule
            && let (Some(start), Some(end)) = (parse_hhmm(&w.start), parse_hhmm(&w.end))
        {
            let t = now.minute_of_day;
            let inside = if start < end {
                (start..end).contains(&t)
            } else {
                t >= start || t < end
            };
            if !inside {
                return Some(Hold::OutsideSchedule {
                    start: w.start.clone(),
                    end: w.end.clone(),
                });
            }
        }
        if self.pause_on_battery && now.on_battery == Some(true) {
            return Some(Hold::OnBattery);
        }
        if let (Some(limit), Some(celsius)) = (self.max_gpu_temp_c, now.gpu_temp_c)
            && celsius > limit
        {
            return Some(Hold::TooHot { celsius, limit });
        }
        if let (Some(minutes), Some(idle)) = (self.idle_minutes, now.idle_secs)
            && idle < u64::from(minutes) * 60
        {
            return Some(Hold::NotIdle { minutes });
        }
        None
    }

    /// Read settings; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(SettingsError::Io {
                    path: path.into(),
                    source,
                });
            }
        };
        let s: Self = serde_json::from_slice(&bytes).map_err(|source| SettingsError::Format {
            path: path.into(),
            source,
        })?;
        s.check()?;
        Ok(s)
    }

    /// Check, then write atomically (a crash leaves the old file).
    pub fn save(&self, path: &Path) -> Result<(), SettingsError> {
        self.check()?;
        let io = |source| SettingsError::Io {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        starling_train::atomic::write_atomic(path, &text).map_err(io)
    }
}

/// Where the node's key, data-use ledger and port live: the platform's data
/// directory (`~/.local/share/starling` on Linux).
pub fn data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("org", "Starling", "starling")
        .map(|d| d.data_dir().to_path_buf())
}

/// Where the settings live: the platform's config directory
/// (`~/.config/starling/settings.json` on Linux).
pub fn default_path() -> Option<PathBuf> {
    directories::ProjectDirs::from("org", "Starling", "starling")
        .map(|d| d.config_dir().join("settings.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_ordered() {
        let l = Settings::preset(Preset::Light);
        let s = Settings::preset(Preset::Standard);
        let m = Settings::preset(Preset::Maximum);
        for p in [&l, &s, &m] {
            p.check().unwrap();
        }
        assert!(l.up_mbit < s.up_mbit && m.up_mbit.is_none());
        let mut mine = s.clone();
        mine.device = "cpu".into();
        mine.ticket = Some("t".into());
        let light = mine.with_preset(Preset::Light);
        assert_eq!(light.device, "cpu");
        assert_eq!(light.ticket.as_deref(), Some("t"));
        assert_eq!(light.up_mbit, Some(2.0));
    }

    #[test]
    fn bad_values_name_their_field_and_what_is_allowed() {
        let s = Settings {
            up_mbit: Some(-1.0),
            down_mbit: Some(f64::NAN),
            device: "quantum".into(),
            idle_minutes: Some(0),
            schedule: Some(Window {
                start: "25:00".into(),
                end: "7".into(),
            }),
            max_gpu_temp_c: Some(200),
            ..Settings::default()
        };
        let Err(SettingsError::Invalid(errors)) = s.check() else {
            panic!("accepted");
        };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "up_mbit",
                "down_mbit",
                "device",
                "idle_minutes",
                "schedule.start",
                "schedule.end",
                "max_gpu_temp_c"
            ]
        );
        assert!(errors[2].message.contains("auto, cpu"));
    }

    #[test]
    fn rules_hold_participation_in_order() {
        let s = Settings {
            schedule: Some(Window {
                start: "22:00".into(),
                end: "07:00".into(),
            }),
            idle_minutes: Some(5),
            max_gpu_temp_c: Some(80),
            ..Settings::default()
        };
        let night = Conditions {
            minute_of_day: 23 * 60,
            idle_secs: Some(600),
            on_battery: Some(false),
            gpu_temp_c: Some(60),
        };
        assert_eq!(s.hold(&night), None);
        let early = Conditions {
            minute_of_day: 6 * 60 + 59,
            ..night
        };
        assert_eq!(s.hold(&early), None);
        let day = Conditions {
            minute_of_day: 12 * 60,
            ..night
        };
        assert!(matches!(s.hold(&day), Some(Hold::OutsideSchedule { .. })));
        let battery = Conditions {
            on_battery: Some(true),
            ..night
        };
        assert_eq!(s.hold(&battery), Some(Hold::OnBattery));
        let hot = Conditions {
            gpu_temp_c: Some(90),
            ..night
        };
        assert_eq!(
            s.hold(&hot),
            Some(Hold::TooHot {
                celsius: 90,
                limit: 80
            })
        );
        let busy = Conditions {
            idle_secs: Some(30),
            ..night
        };
        assert_eq!(s.hold(&busy), Some(Hold::NotIdle { minutes: 5 }));
        // Unknown sensors hold nothing.
        let unknown = Conditions {
            idle_secs: None,
            on_battery: None,
            gpu_temp_c: None,
            ..night
        };
        assert_eq!(s.hold(&unknown), None);
        assert_eq!(
            Hold::TooHot {
                celsius: 90,
                limit: 80
            }
            .to_string(),
            "GPU at 90 °C, above the 80 °C limit"
        );
    }

    #[test]
    fn files_round_trip_and_bad_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("starling-settings-{}", std::process::id()));
        let path = dir.join("nested").join("settings.json");
        assert_eq!(Settings::load(&path).unwrap(), Settings::default());
        let s = Settings::preset(Preset::Light);
        s.save(&path).unwrap();
        assert_eq!(Settings::load(&path).unwrap(), s);
        std::fs::write(&path, "{\"up_mbit\": \"fast\"}").unwrap();
        assert!(matches!(
            Settings::load(&path),
            Err(SettingsError::Format { .. })
        ));
        std::fs::write(&path, "{\"up_mbit\": -3}").unwrap();
        assert!(matches!(
            Settings::load(&path),
            Err(SettingsError::Invalid(_))
        ));
        let bad = Settings {
            up_mbit: Some(0.0),
            ..s
        };
        assert!(bad.save(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
