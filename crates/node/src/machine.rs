//! What this machine can contribute, in words a volunteer understands.
//!
//! People who lend their GPU ask two things before anything else: "will my
//! machine work?" and "what will it do to my computer?". The preflight check
//! answers the first per device: every adapter wgpu sees (with VRAM,
//! temperature and power where NVIDIA's NVML reports them), the CPU and RAM,
//! and for each a plain verdict naming the models it can train and, where it
//! cannot, why. Memory needs are estimates (weights, gradients, DisTrO
//! momentum and activations for one micro-batch), so verdicts keep a margin.

use serde::Serialize;
use starling_train::ModelConfig;

/// Models the verdicts speak about, smallest first.
pub const MODELS: [&str; 4] = ["nano", "small", "125m", "1b"];
/// Largest model (parameters) a CPU trains fast enough to keep up with rounds.
const CPU_MAX_PARAMS: usize = 30_000_000;
/// Share of a device's memory training may plan to use.
const MEMORY_SHARE: f64 = 0.85;
/// Memory assumed for a discrete GPU whose driver does not report it.
const ASSUMED_DISCRETE_VRAM: u64 = 4 << 30;

/// The CPU and memory.
#[derive(Clone, Debug, PartialEq, Serialize, ts_rs::TS)]
pub struct CpuReport {
    /// Marketing name, e.g. "AMD Ryzen 7 5800X".
    pub brand: String,
    /// Logical cores.
    pub cores: usize,
    /// Installed RAM in bytes.
    pub ram_total: u64,
    /// RAM available now, in bytes.
    pub ram_available: u64,
}

/// One graphics adapter.
#[derive(Clone, Debug, PartialEq, Serialize, ts_rs::TS)]
pub struct GpuReport {
    /// The `--device` value that selects it (`wgpu:N`).
    pub device: String,
    /// Adapter name.
    pub name: String,
    /// Vendor name (from the PCI vendor id).
    pub vendor: String,
    /// Graphics API (Vulkan, Metal, Dx12, Gl).
    pub backend: String,
    /// Discrete, integrated, virtual, CPU (a software renderer) or other.
    pub kind: String,
    /// Driver and version.
    pub driver: String,
    /// Total memory in bytes (NVML only).
    pub vram_total: Option<u64>,
    /// Memory in use in bytes (NVML only).
    pub vram_used: Option<u64>,
    /// Core temperature in °C (NVML only).
    pub temperature_c: Option<u32>,
    /// Power draw in watts (NVML only).
    pub power_w: Option<f32>,
    /// Busy percentage over the last sample period (NVML only).
    pub utilization: Option<u32>,
}

/// Whether one model fits one device.
#[derive(Clone, Debug, PartialEq, Serialize, ts_rs::TS)]
pub struct ModelFit {
    /// Model preset.
    pub model: String,
    /// Parameters.
    pub params: usize,
    /// Estimated training memory in bytes.
    pub needs: u64,
    /// Whether this device can train it.
    pub fits: bool,
    /// Why not, when it does not.
    pub reason: Option<String>,
}

/// The plain answer for one device.
#[derive(Clone, Debug, PartialEq, Serialize, ts_rs::TS)]
pub struct Verdict {
    /// `cpu` or `wgpu:N`.
    pub device: String,
    /// What it is.
    pub name: String,
    /// Whether Starling would train on it at all.
    pub usable: bool,
    /// One sentence for the volunteer.
    pub summary: String,
    /// Per model.
    pub models: Vec<ModelFit>,
}

/// Everything the preflight check found.
#[derive(Clone, Debug, PartialEq, Serialize, ts_rs::TS)]
pub struct MachineReport {
    /// CPU and RAM.
    pub cpu: CpuReport,
    /// Every adapter wgpu found.
    pub gpus: Vec<GpuReport>,
    /// Whether NVIDIA's NVML answered (VRAM, temperature and power need it).
    pub nvml: bool,
    /// One verdict per usable-or-not device, GPUs first, the CPU last.
    pub verdicts: Vec<Verdict>,
}

/// Vendor name of a PCI vendor id.
pub fn vendor_name(id: u32) -> String {
    match id {
        0x10de => "NVIDIA".into(),
        0x1002 | 0x1022 => "AMD".into(),
        0x8086 => "Intel".into(),
        0x106b => "Apple".into(),
        0x5143 => "Qualcomm".into(),
        0x13b5 => "ARM".into(),
        0x10005 => "Mesa (software)".into(),
        0x1414 => "Microsoft".into(),
        other => format!("vendor {other:#x}"),
    }
}

/// Estimated bytes to train `model` with `micro_batch` sequences of
/// `seq_len` tokens: fp32 weights, gradients, DisTrO momentum and the
/// autodiff copies (16 bytes a parameter), plus one micro-batch of
/// activations and logits, with a quarter on top for the allocator.
pub fn training_bytes(model: &ModelConfig, micro_batch: usize, seq_len: usize) -> u64 {
    let params = model.param_count() as f64;
    let tokens = (micro_batch * seq_len) as f64;
    let per_layer_token = (10 * model.dim + 3 * model.ffn_dim + 2 * model.heads * seq_len) as f64;
    let activations = tokens * per_layer_token * model.layers as f64;
    let logits = 3.0 * tokens * model.vocab_size as f64;
    ((16.0 * params + 4.0 * (activations + logits)) * 1.25) as u64
}

/// Bytes training may use on a GPU with `vram_total` bytes under the
/// volunteer's `limit_gb`: the smaller of 85 % of the memory and the limit;
/// `None` when neither is known.
pub fn memory_budget(vram_total: Option<u64>, limit_gb: Option<f64>) -> Option<u64> {
    let share = vram_total.map(|t| (t as f64 * MEMORY_SHARE) as u64);
    let limit = limit_gb.map(|gb| (gb * 1e9) as u64);
    match (share, limit) {
        (Some(s), Some(l)) => Some(s.min(l)),
        (s, l) => s.or(l),
    }
}

/// [`memory_budget`] for the device named `device` ("wgpu:N" as in
/// [`probe`]; "cpu" trains in RAM, so the RAM's size stands for its memory).
/// The volunteer's limit applies to every device.
pub fn device_memory_budget(device: &str, limit_gb: Option<f64>) -> Option<u64> {
    let vram = if device == "cpu" {
        sysinfo::System::new().ok().map(|mut sys| {
            sys.refresh_memory();
            sys.total_memory()
        })
    } else if device.starts_with("wgpu:") {
        probe()
            .gpus
            .into_iter()
            .find(|g| g.device == device)
            .and_then(|g| g.vram_total)
    } else {
        None
    };
    memory_budget(vram, limit_gb)
}

/// A human-readable size ("3.2 GB").
pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0} MB", n / 1e6)
    } else {
        format!("{:.0} kB", n / 1e3)
    }
}

fn fits(
    model: &ModelConfig,
    budget: u64,
    what: &str,
    extra: impl Fn(&ModelConfig) -> Option<String>,
) -> ModelFit {
    let needs = training_bytes(model, 1, model.max_seq_len.min(512));
    let mut reason = (needs > budget).then(|| {
        format!(
            "needs about {} for training, {what} has {} to spare",
            human_bytes(needs),
            human_bytes(budget)
        )
    });
    if reason.is_none() {
        reason = extra(model);
    }
    ModelFit {
        model: model.name.clone(),
        params: model.param_count(),
        needs,
        fits: reason.is_none(),
        reason,
    }
}

fn summary(name: &str, models: &[ModelFit]) -> String {
    let ok: Vec<&str> = models
        .iter()
        .filter(|m| m.fits)
        .map(|m| m.model.as_str())
        .collect();
    match ok.as_slice() {
        [] => format!("{name} cannot train any of Starling's models"),
        [only] => format!("{name} can train {only}"),
        many => format!("{name} can train {}", many.join(", ")),
    }
}

/// The verdicts for what was found (pure: no probing; tested directly).
pub fn verdicts(cpu: &CpuReport, gpus: &[GpuReport]) -> Vec<Verdict> {
    let models: Vec<ModelConfig> = MODELS
        .iter()
        .filter_map(|m| ModelConfig::preset(m).ok())
        .collect();
    let mut out = Vec::new();
    for (i, g) in gpus.iter().enumerate() {
        // wgpu lists a GPU once per graphics API; point at the better one.
        if let Some(twin) = gpus[..i]
            .iter()
            .find(|o| o.name == g.name && o.backend != g.backend && g.backend == "Gl")
        {
            out.push(Verdict {
                device: g.device.clone(),
                name: g.name.clone(),
                usable: false,
                summary: format!(
                    "the same adapter as {} through OpenGL, which Starling does not train on; use {}",
                    twin.device, twin.device
                ),
                models: Vec::new(),
            });
            continue;
        }
        if g.kind == "Cpu" {
            out.push(Verdict {
                device: g.device.clone(),
                name: g.name.clone(),
                usable: false,
                summary: format!(
                    "{} is a software renderer (the CPU pretending to be a GPU): slower than training on the CPU directly, so Starling does not use it",
                    g.name
                ),
                models: Vec::new(),
            });
            continue;
        }
        let (budget, what) = match (g.vram_total, g.vram_used) {
            (Some(total), used) => (
                ((total as f64 * MEMORY_SHARE) as u64).saturating_sub(used.unwrap_or(0)),
                "this GPU".to_string(),
            ),
            (None, _) if g.kind == "IntegratedGpu" => (
                (cpu.ram_available as f64 * 0.5) as u64,
                "this integrated GPU (sharing system RAM)".to_string(),
            ),
            (None, _) => (
                ASSUMED_DISCRETE_VRAM,
                format!(
                    "this GPU (its driver does not report memory; assuming {})",
                    human_bytes(ASSUMED_DISCRETE_VRAM)
                ),
            ),
        };
        let models: Vec<ModelFit> = models
            .iter()
            .map(|m| fits(m, budget, &what, |_| None))
            .collect();
        out.push(Verdict {
            device: g.device.clone(),
            name: g.name.clone(),
            usable: models.iter().any(|m| m.fits),
            summary: summary(&g.name, &models),
            models,
        });
    }
    let budget = (cpu.ram_available as f64 * 0.5) as u64;
    let slow = |m: &ModelConfig| {
        (m.param_count() > CPU_MAX_PARAMS).then(|| {
            format!(
                "fits in RAM, but a CPU is too slow for {} parameters to finish a round in time",
                m.param_count()
            )
        })
    };
    let models: Vec<ModelFit> = models
        .iter()
        .map(|m| fits(m, budget, "the CPU's RAM", slow))
        .collect();
    let name = if cpu.brand.is_empty() {
        "this CPU".to_string()
    } else {
        cpu.brand.clone()
    };
    out.push(Verdict {
        device: "cpu".into(),
        name: name.clone(),
        usable: models.iter().any(|m| m.fits),
        summary: format!(
            "{} (slowly: a GPU is 10-100x faster)",
            summary(&name, &models)
        ),
        models,
    });
    out
}

/// NVML's numbers for the adapters it knows, matched by name.
fn nvml_readings(gpus: &mut [GpuReport]) -> bool {
    use nvml_wrapper::{Nvml, enum_wrappers::device::TemperatureSensor};
    let Ok(nvml) = Nvml::init() else {
        return false;
    };
    let count = nvml.device_count().unwrap_or(0);
    let mut taken = vec![false; count as usize];
    for g in gpus.iter_mut().filter(|g| g.vendor == "NVIDIA") {
        for i in 0..count {
            if taken[i as usize] {
                continue;
            }
            let Ok(d) = nvml.device_by_index(i) else {
                continue;
            };
            let name = d.name().unwrap_or_default();
            if !(g.name.contains(&name) || name.contains(&g.name)) {
                continue;
            }
            taken[i as usize] = true;
            if let Ok(m) = d.memory_info() {
                g.vram_total = Some(m.total);
                g.vram_used = Some(m.used);
            }
            g.temperature_c = d.temperature(TemperatureSensor::Gpu).ok();
            g.power_w = d.power_usage().ok().map(|mw| mw as f32 / 1000.0);
            g.utilization = d.utilization_rates().ok().map(|u| u.gpu);
            break;
        }
    }
    true
}

/// A live reading of the first NVIDIA GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, ts_rs::TS)]
pub struct GpuSample {
    /// Busy percentage.
    pub util: Option<u32>,
    /// Core temperature in °C.
    pub temp_c: Option<u32>,
    /// Memory in use, bytes.
    pub mem_used: Option<u64>,
    /// Total memory, bytes.
    pub mem_total: Option<u64>,
}

/// Samples the GPU once a second for the dashboard and the temperature
/// rule; NVML is opened once (it is slow to open) and only where it exists.
pub struct GpuMonitor(Option<nvml_wrapper::Nvml>);

impl GpuMonitor {
    /// Open NVML if this machine has it.
    pub fn open() -> Self {
        Self(nvml_wrapper::Nvml::init().ok())
    }

    /// The first GPU's numbers (all `None` without NVML).
    pub fn sample(&self) -> GpuSample {
        use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
        let Some(d) = self.0.as_ref().and_then(|n| n.device_by_index(0).ok()) else {
            return GpuSample::default();
        };
        let mem = d.memory_info().ok();
        GpuSample {
            util: d.utilization_rates().ok().map(|u| u.gpu),
            temp_c: d.temperature(TemperatureSensor::Gpu).ok(),
            mem_used: mem.as_ref().map(|m| m.used),
            mem_total: mem.as_ref().map(|m| m.total),
        }
    }
}

/// Whether the machine runs on battery: `None` where it cannot tell (no
/// mains adapter reported; only Linux's `/sys/class/power_supply` is read).
pub fn on_battery() -> Option<bool> {
    let dir = std::fs::read_dir("/sys/class/power_supply").ok()?;
    let mut mains = None;
    for entry in dir.flatten() {
        let p = entry.path();
        let kind = std::fs::read_to_string(p.join("type")).unwrap_or_default();
        if kind.trim() == "Mains" {
            let online = std::fs::read_to_string(p.join("online")).unwrap_or_default();
            // Any adapter online means not on battery.
            mains = Some(mains.unwrap_or(true) && online.trim() != "1");
        }
    }
    mains
}

/// What the settings' rules look at, now. Idle time is the desktop's to
/// tell (the app asks it); here it is `None`, so the idle rule holds nothing.
pub fn conditions(gpu: &GpuSample) -> crate::settings::Conditions {
    use chrono::Timelike;
    let now = chrono::Local::now();
    crate::settings::Conditions {
        minute_of_day: now.hour() * 60 + now.minute(),
        idle_secs: None,
        on_battery: on_battery(),
        gpu_temp_c: gpu.temp_c,
    }
}

/// Probe this machine: adapters, NVML, CPU and RAM, and the verdicts.
pub fn probe() -> MachineReport {
    let cpu = match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_memory();
            sys.refresh_cpu_all();
            CpuReport {
                brand: sys
                    .cpus()
                    .first()
                    .map(|c| c.brand().trim().to_string())
                    .unwrap_or_default(),
                cores: sys.cpus().len(),
                ram_total: sys.total_memory(),
                ram_available: sys.available_memory(),
            }
        }
        // No system information on this platform: say nothing rather than guess.
        Err(_) => CpuReport {
            brand: String::new(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ram_total: 0,
            ram_available: 0,
        },
    };
    let mut gpus: Vec<GpuReport> = starling_distro::gpu::list_adapters()
        .into_iter()
        .enumerate()
        .map(|(i, a)| GpuReport {
            device: format!("wgpu:{i}"),
            vendor: vendor_name(a.vendor),
            name: a.name,
            backend: a.backend,
            kind: a.device_type,
            driver: a.driver,
            vram_total: None,
            vram_used: None,
            temperature_c: None,
            power_w: None,
            utilization: None,
        })
        .collect();
    let nvml = nvml_readings(&mut gpus);
    let verdicts = verdicts(&cpu, &gpus);
    MachineReport {
        cpu,
        gpus,
        nvml,
        verdicts,
    }
}

impl MachineReport {
    /// The report as lines for a terminal.
    pub fn render(&self) -> String {
        let c = &self.cpu;
        let mut out = format!(
            "CPU: {} ({} cores), RAM {} ({} available)\n",
            if c.brand.is_empty() {
                "unknown"
            } else {
                &c.brand
            },
            c.cores,
            human_bytes(c.ram_total),
            human_bytes(c.ram_available)
        );
        if self.gpus.is_empty() {
            out.push_str("GPUs: none found (no Vulkan, Metal or DX12 driver answered)\n");
        }
        for g in &self.gpus {
            out.push_str(&format!(
                "{}: {} — {}, {} via {}, driver {}\n",
                g.device, g.name, g.vendor, g.kind, g.backend, g.driver
            ));
            let mut live = Vec::new();
            if let (Some(t), Some(u)) = (g.vram_total, g.vram_used) {
                live.push(format!(
                    "VRAM {} of {} in use",
                    human_bytes(u),
                    human_bytes(t)
                ));
            }
            if let Some(t) = g.temperature_c {
                live.push(format!("{t} °C"));
            }
            if let Some(p) = g.power_w {
                live.push(format!("{p:.0} W"));
            }
            if let Some(u) = g.utilization {
                live.push(format!("{u}% busy"));
            }
            if !live.is_empty() {
                out.push_str(&format!("    {}\n", live.join(", ")));
            }
        }
        if !self.nvml && self.gpus.iter().any(|g| g.vendor == "NVIDIA") {
            out.push_str("    (NVIDIA's NVML library did not answer: no VRAM, temperature or power readings)\n");
        }
        out.push_str("\nVerdict:\n");
        for v in &self.verdicts {
            out.push_str(&format!("  {}: {}\n", v.device, v.summary));
            for m in v.models.iter().filter(|m| !m.fits) {
                if let Some(r) = &m.reason {
                    out.push_str(&format!("      {}: {r}\n", m.model));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_budget_is_the_smaller_of_the_vram_share_and_the_limit() {
        assert_eq!(memory_budget(None, None), None);
        assert_eq!(
            memory_budget(Some(8_000_000_000), None),
            Some(6_800_000_000)
        );
        assert_eq!(memory_budget(None, Some(4.0)), Some(4_000_000_000));
        assert_eq!(
            memory_budget(Some(8_000_000_000), Some(4.0)),
            Some(4_000_000_000)
        );
        assert_eq!(
            memory_budget(Some(8_000_000_000), Some(12.0)),
            Some(6_800_000_000)
        );
        // A CPU trains in RAM: the limit applies there too.
        assert_eq!(device_memory_budget("cpu", Some(1.0)), Some(1_000_000_000));
    }

    fn cpu(ram_gb: u64) -> CpuReport {
        CpuReport {
            brand: "Test CPU".into(),
            cores: 8,
            ram_total: ram_gb << 30,
            ram_available: ram_gb << 30,
        }
    }

    fn gpu(kind: &str, vram_gb: Option<u64>) -> GpuReport {
        GpuReport {
            device: "wgpu:0".into(),
            name: "Test GPU".into(),
            vendor: "NVIDIA".into(),
            backend: "Vulkan".into(),
            kind: kind.into(),
            driver: String::new(),
            vram_total: vram_gb.map(|g| g << 30),
            vram_used: Some(0),
            temperature_c: None,
            power_w: None,
            utilization: None,
        }
    }

    fn fit<'a>(v: &'a Verdict, model: &str) -> &'a ModelFit {
        v.models.iter().find(|m| m.model == model).unwrap()
    }

    #[test]
    fn memory_decides_which_models_a_gpu_trains() {
        let big = &verdicts(&cpu(32), &[gpu("DiscreteGpu", Some(80))])[0];
        assert!(big.usable);
        assert!(MODELS.iter().all(|m| fit(big, m).fits), "{big:?}");
        let small = &verdicts(&cpu(32), &[gpu("DiscreteGpu", Some(6))])[0];
        assert!(fit(small, "125m").fits);
        assert!(!fit(small, "1b").fits);
        let why = fit(small, "1b").reason.as_deref().unwrap();
        assert!(why.contains("needs about") && why.contains("GB"), "{why}");
        assert!(
            small.summary.contains("nano, small, 125m"),
            "{}",
            small.summary
        );
    }

    #[test]
    fn software_renderers_are_refused_and_the_cpu_is_slow_for_big_models() {
        let v = verdicts(&cpu(64), &[gpu("Cpu", None)]);
        assert!(!v[0].usable);
        assert!(v[0].summary.contains("software renderer"));
        let c = &v[1];
        assert_eq!(c.device, "cpu");
        assert!(fit(c, "nano").fits && fit(c, "small").fits);
        assert!(
            fit(c, "125m")
                .reason
                .as_deref()
                .unwrap()
                .contains("too slow")
        );
        let tiny = &verdicts(&cpu(0), &[])[0];
        assert!(!tiny.usable);
        let mut gl = gpu("DiscreteGpu", Some(8));
        gl.device = "wgpu:1".into();
        gl.backend = "Gl".into();
        let twins = verdicts(&cpu(16), &[gpu("DiscreteGpu", Some(8)), gl]);
        assert!(twins[0].usable && !twins[1].usable);
        assert!(
            twins[1].summary.contains("use wgpu:0"),
            "{}",
            twins[1].summary
        );
    }

    #[test]
    fn estimates_grow_with_the_model_and_stay_plausible() {
        let need = |m: &str| {
            let c = ModelConfig::preset(m).unwrap();
            training_bytes(&c, 1, c.max_seq_len.min(512))
        };
        assert!(need("nano") < need("small") && need("small") < need("125m"));
        // 1B parameters at 16 bytes each, plus activations: 16-40 GB.
        assert!(
            (16e9..40e9).contains(&(need("1b") as f64)),
            "{}",
            need("1b")
        );
    }

    #[test]
    fn render_names_every_device_and_reason() {
        let report = MachineReport {
            cpu: cpu(16),
            gpus: vec![gpu("DiscreteGpu", Some(8))],
            nvml: true,
            verdicts: verdicts(&cpu(16), &[gpu("DiscreteGpu", Some(8))]),
        };
        let text = report.render();
        assert!(text.contains("wgpu:0: Test GPU"), "{text}");
        assert!(
            text.contains("cpu: Test CPU can train nano, small"),
            "{text}"
        );
        assert!(text.contains("1b: needs about"), "{text}");
    }
}
