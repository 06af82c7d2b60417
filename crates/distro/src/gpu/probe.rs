//! Finding a GPU without crashing when there is none.
//!
//! Burn opens its wgpu device lazily and panics (on a worker thread) at the
//! first tensor operation if no adapter exists, so we ask first: wgpu's adapter
//! list for a description of what the machine has, and Burn's fallible
//! initialisation for a device we can use. The device is opened once per
//! process (Burn refuses a second initialisation) and shared.

use std::sync::{Arc, OnceLock};

use burn::backend::DispatchDevice;
use burn::tensor::Device;
use burn::tensor::wgpu::WgpuInitError;
use cubecl::wgpu::wgpu;

/// One adapter wgpu can see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    /// Adapter name, e.g. "NVIDIA GeForce RTX 3060" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// PCI vendor id (0x10de NVIDIA, 0x1002 AMD, 0x8086 Intel, 0x10005 Mesa software).
    pub vendor: u32,
    /// Graphics API: Vulkan, Metal, Dx12, Gl.
    pub backend: String,
    /// Discrete, integrated, virtual, CPU (software) or other.
    pub device_type: String,
    /// Driver name and version, when the driver says.
    pub driver: String,
}

impl AdapterSummary {
    /// True for software rasterisers (lavapipe, llvmpipe, WARP): correct but slow.
    pub fn is_software(&self) -> bool {
        self.device_type == "Cpu"
    }
}

/// Every adapter wgpu finds on this machine, on every graphics API.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|a| {
            let info = a.get_info();
            AdapterSummary {
                name: info.name,
                vendor: info.vendor,
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: format!("{} {}", info.driver, info.driver_info)
                    .trim()
                    .to_string(),
            }
        })
        .collect()
}

/// Why no wgpu device could be opened. (`Clone`: the process's device, or
/// why there is none, is opened once and shared.)
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuInitError {
    /// wgpu found no adapter (or not the one asked for).
    #[error(
        "no usable GPU adapter ({0}); install a Vulkan, Metal or DirectX 12 driver \
         (on Linux without a GPU: Mesa's lavapipe, package mesa-vulkan-drivers), or use the CPU"
    )]
    NoAdapter(String),
    /// wgpu lists the adapter but Burn could not open a device on it.
    #[error(
        "no usable GPU adapter ({adapter}: {source}); install a Vulkan, Metal or DirectX 12 \
         driver (on Linux without a GPU: Mesa's lavapipe, package mesa-vulkan-drivers), or use \
         the CPU"
    )]
    Open {
        /// Which adapter: `the default adapter` or `adapter N (name)`.
        adapter: String,
        /// What Burn said.
        #[source]
        source: Arc<WgpuInitError>,
    },
}

/// The process's default wgpu device, opened on first use, or why there is none.
pub fn wgpu_device() -> Result<Device, GpuInitError> {
    static DEVICE: OnceLock<Result<Device, GpuInitError>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            if list_adapters().is_empty() {
                return Err(GpuInitError::NoAdapter("wgpu lists no adapter".into()));
            }
            Device::wgpu_options()
                .init()
                .map_err(|e| GpuInitError::Open {
                    adapter: "the default adapter".into(),
                    source: Arc::new(e),
                })
        })
        .clone()
}

/// The wgpu device on adapter `index` of [`list_adapters`] (on that adapter's
/// own graphics API), opened once per process and shared.
pub fn wgpu_device_at(index: usize) -> Result<Device, GpuInitError> {
    use burn::tensor::DeviceKind;
    use burn::tensor::wgpu::WgpuBackend;
    static DEVICES: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut opened = DEVICES
        .lock()
        .map_err(|_| GpuInitError::NoAdapter("an earlier attempt to open a GPU crashed".into()))?;
    if let Some((_, d)) = opened.iter().find(|(i, _)| *i == index) {
        return Ok(d.clone());
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let infos: Vec<wgpu::AdapterInfo> =
        cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .iter()
            .map(wgpu::Adapter::get_info)
            .collect();
    let info = infos.get(index).ok_or_else(|| {
        GpuInitError::NoAdapter(format!(
            "there is no adapter {index}: wgpu lists {} (numbered from 0)",
            infos.len()
        ))
    })?;
    // Burn numbers adapters per type within one graphics API.
    let rank = infos[..index]
        .iter()
        .filter(|a| a.backend == info.backend && a.device_type == info.device_type)
        .count();
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(rank),
        wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(rank),
        wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(rank),
        wgpu::DeviceType::Cpu => DeviceKind::Cpu,
        wgpu::DeviceType::Other => {
            return Err(GpuInitError::NoAdapter(format!(
                "adapter {index} ({}) is of no known type",
                info.name
            )));
        }
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan => WgpuBackend::Vulkan,
        wgpu::Backend::Metal => WgpuBackend::Metal,
        wgpu::Backend::Dx12 => WgpuBackend::Dx12,
        wgpu::Backend::Gl => WgpuBackend::Gl,
        _ => WgpuBackend::Auto,
    };
    let device = Device::wgpu_options()
        .device_kind(kind)
        .graphics_api(api)
        .init()
        .map_err(|e| GpuInitError::Open {
            adapter: format!("adapter {index} ({})", info.name),
            source: Arc::new(e),
        })?;
    opened.push((index, device.clone()));
    Ok(device)
}

/// True if `device` is a wgpu device (where the WGSL kernels can run).
pub fn is_wgpu(device: &Device) -> bool {
    matches!(
        device.as_dispatch(),
        DispatchDevice::Cube(cubecl::Device::Wgpu(_))
    )
}
