//! Finding a GPU without crashing when there is none.
//!
//! Burn opens its wgpu device lazily and panics (on a worker thread) at the
//! first tensor operation if no adapter exists, so we ask first: wgpu's adapter
//! list for a description of what the machine has, and Burn's fallible
//! initialisation for a device we can use. The device is opened once per
//! process (Burn refuses a second initialisation) and shared.

use std::sync::OnceLock;

use burn::backend::DispatchDevice;
use burn::tensor::Device;
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

/// Why no wgpu device could be opened.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GpuInitError {
    /// wgpu found no adapter, or none it could open.
    #[error(
        "no usable GPU adapter ({0}); install a Vulkan, Metal or DirectX 12 driver \
         (on Linux without a GPU: Mesa's lavapipe, package mesa-vulkan-drivers), or use the CPU"
    )]
    NoAdapter(String),
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
                .map_err(|e| GpuInitError::NoAdapter(e.to_string()))
        })
        .clone()
}

/// True if `device` is a wgpu device (where the WGSL kernels can run).
pub fn is_wgpu(device: &Device) -> bool {
    matches!(
        device.as_dispatch(),
        DispatchDevice::Cube(cubecl::Device::Wgpu(_))
    )
}
