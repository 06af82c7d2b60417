//! Choosing where the model trains, and saying why.
//!
//! A volunteer's machine may have a discrete GPU, only an integrated one, only
//! a software renderer (lavapipe/llvmpipe: correct, but slower than the CPU
//! backend), or nothing usable at all. Automatic choice prefers CUDA (when
//! built in), then a hardware wgpu adapter, then the CPU, and always returns
//! the reason so the user sees it.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use starling_distro::gpu::{GpuInitError, list_adapters, wgpu_device, wgpu_device_at};

/// What the user asked for (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The best device found.
    #[default]
    Auto,
    /// Burn's CPU backend.
    Cpu,
    /// wgpu: the default adapter, or adapter `N` of `starling check`'s list.
    Wgpu(Option<usize>),
    /// CUDA device `N` (builds with the `cuda` feature).
    Cuda(usize),
}

/// Why a `--device` value or the device it names cannot be used.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The text is not a device name.
    #[error("unknown device {0:?}: use auto, cpu, wgpu, wgpu:N or cuda:N")]
    Parse(String),
    /// The device exists in name but cannot be opened here.
    #[error("{0}")]
    Unavailable(String),
    /// No wgpu device could be opened.
    #[error(transparent)]
    Wgpu(#[from] GpuInitError),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceError::Parse(s.to_string());
        let index = |n: &str| n.parse::<usize>().map_err(|_| bad());
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" | "ndarray" => Ok(Self::Cpu),
            "wgpu" | "gpu" => Ok(Self::Wgpu(None)),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.split_once(':') {
                Some(("wgpu", n)) => Ok(Self::Wgpu(Some(index(n)?))),
                Some(("cuda", n)) => Ok(Self::Cuda(index(n)?)),
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu(None) => write!(f, "wgpu"),
            Self::Wgpu(Some(n)) => write!(f, "wgpu:{n}"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device to train on and why it was chosen.
#[derive(Clone, Debug)]
pub struct SelectedDevice {
    /// The Burn device (without autodiff).
    pub device: Device,
    /// Short name: `cpu`, `wgpu`, `wgpu:N`, `cuda:N`.
    pub name: String,
    /// One sentence for the user.
    pub reason: String,
}

#[allow(deprecated)] // burn-ndarray is the CPU backend that builds offline everywhere
fn cpu() -> Device {
    Device::ndarray()
}

fn cpu_with(reason: String) -> SelectedDevice {
    SelectedDevice {
        device: cpu(),
        name: "cpu".into(),
        reason,
    }
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device, DeviceError> {
    use burn::tensor::Tensor;
    let device = Device::cuda(index);
    // CUDA opens lazily and panics on the first operation without a driver.
    std::panic::catch_unwind(|| {
        Tensor::<1>::ones([1], &device)
            .try_into_vec_as::<f32>()
            .is_ok()
    })
    .ok()
    .filter(|ok| *ok)
    .map(|_| device.clone())
    .ok_or_else(|| {
        DeviceError::Unavailable(format!(
            "CUDA device {index} cannot be opened (no NVIDIA driver, or no such device)"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::Unavailable(
        "this build has no CUDA support: rebuild with `--features cuda` (see the README), \
         or use --device wgpu"
            .into(),
    ))
}

/// Opens the device `choice` names. `Auto` never fails: it falls back to the CPU.
pub fn select_device(choice: DeviceChoice) -> Result<SelectedDevice, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu_with("the CPU, as asked".into())),
        DeviceChoice::Cuda(n) => Ok(SelectedDevice {
            device: cuda(n)?,
            name: format!("cuda:{n}"),
            reason: format!("CUDA device {n}, as asked"),
        }),
        DeviceChoice::Wgpu(index) => {
            let device = match index {
                None => wgpu_device(),
                Some(n) => wgpu_device_at(n),
            }?;
            let adapters = list_adapters();
            let what = index
                .and_then(|n| adapters.get(n))
                .or_else(|| adapters.iter().find(|a| !a.is_software()))
                .or(adapters.first())
                .map(|a| format!("{} ({}, {})", a.name, a.device_type, a.backend))
                .unwrap_or_else(|| "the default adapter".into());
            Ok(SelectedDevice {
                device,
                name: choice.to_string(),
                reason: format!("wgpu on {what}, as asked"),
            })
        }
        DeviceChoice::Auto => Ok(auto()),
    }
}

fn auto() -> SelectedDevice {
    if cfg!(feature = "cuda")
        && let Ok(device) = cuda(0)
    {
        return SelectedDevice {
            device,
            name: "cuda:0".into(),
            reason: "CUDA device 0 (an NVIDIA GPU with a working driver)".into(),
        };
    }
    let adapters = list_adapters();
    let hardware = adapters.iter().position(|a| !a.is_software());
    match hardware {
        Some(i) => match wgpu_device_at(i) {
            Ok(device) => {
                let a = &adapters[i];
                SelectedDevice {
                    device,
                    name: format!("wgpu:{i}"),
                    reason: format!(
                        "wgpu on {} ({}, {}): the first hardware GPU found",
                        a.name, a.device_type, a.backend
                    ),
                }
            }
            Err(e) => cpu_with(format!(
                "training on the CPU: the GPU {} was found but cannot be opened ({e})",
                adapters[i].name
            )),
        },
        None if adapters.is_empty() => cpu_with(
            "training on the CPU: no GPU adapter found (install a Vulkan, Metal or \
             DirectX 12 driver to use a GPU)"
                .into(),
        ),
        None => cpu_with(format!(
            "training on the CPU: the only adapter is {}, a software renderer slower than \
             the CPU backend (--device wgpu uses it anyway)",
            adapters[0].name
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("wgpu", DeviceChoice::Wgpu(None)),
            ("wgpu:1", DeviceChoice::Wgpu(Some(1))),
            ("cuda:0", DeviceChoice::Cuda(0)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), choice);
            assert_eq!(choice.to_string(), text);
        }
        assert_eq!(
            "CUDA".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        for bad in ["", "tpu", "wgpu:x", "cuda:-1", "wgpu:1:2"] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_always_gives_a_device_and_a_reason() {
        let s = select_device(DeviceChoice::Auto).unwrap();
        assert!(!s.reason.is_empty());
        // On CI (lavapipe only) the software renderer is passed over for the CPU.
        if list_adapters().iter().all(|a| a.is_software()) {
            assert_eq!(s.name, "cpu");
        }
    }

    #[test]
    fn missing_devices_are_clear_errors() {
        let err = select_device(DeviceChoice::Wgpu(Some(999))).unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = select_device(DeviceChoice::Cuda(0)).unwrap_err();
            assert!(err.to_string().contains("--features cuda"), "{err}");
        }
    }

    #[test]
    fn a_numbered_adapter_opens() {
        if list_adapters().is_empty() {
            assert!(std::env::var_os("STARLING_REQUIRE_GPU").is_none());
            return;
        }
        let s = select_device(DeviceChoice::Wgpu(Some(0))).unwrap();
        assert!(starling_distro::gpu::is_wgpu(&s.device));
    }
}
