//! Throughput of a DisTrO step (momentum, chunked DCT, top-k, error feedback:
//! "compress") and of an apply (scatter-mean, inverse DCT, certified sign,
//! weight update: "decompress") on the CPU and, where an adapter exists, on
//! wgpu through both GPU paths. Reported as parameters per second.
//!
//! `cargo bench -p starling-distro`; `STARLING_BENCH_SIZES=2048x2048` picks sizes.

#![allow(clippy::expect_used, missing_docs)]

use std::time::Duration;

use burn::tensor::{Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use starling_distro::gpu::{GpuDistro, KernelPath, matrix_shape, wgpu_device};
use starling_distro::{DistroConfig, DistroOptimizer, ValueEncoding};

fn sizes() -> Vec<(usize, usize)> {
    let spec = std::env::var("STARLING_BENCH_SIZES")
        .unwrap_or_else(|_| "2048x2048,2048x8192,50304x2048".into());
    spec.split(',')
        .filter_map(|s| {
            let (r, c) = s.split_once('x')?;
            Some((r.trim().parse().ok()?, c.trim().parse().ok()?))
        })
        .collect()
}

fn gradient(n: usize) -> Vec<f32> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn config() -> DistroConfig {
    DistroConfig {
        topk: 32,
        values: ValueEncoding::Sign,
        ..DistroConfig::default()
    }
}

fn label(r: usize, c: usize) -> String {
    format!("{r}x{c}")
}

fn cpu(crit: &mut Criterion) {
    let options = config().step_options();
    let mut group = crit.benchmark_group("cpu");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for (r, c) in sizes() {
        let shapes = vec![vec![r, c]];
        let grad = gradient(r * c);
        let mut opt = DistroOptimizer::new(&shapes, config());
        group.throughput(Throughput::Elements((r * c) as u64));
        group.bench_function(BenchmarkId::new("compress", label(r, c)), |b| {
            b.iter(|| opt.step(&[&grad], 1e-3, options).expect("step"))
        });
        let update = opt
            .step(&[&grad], 1e-3, options)
            .expect("step")
            .into_incoming([1; 32]);
        let mut params = vec![0.0f32; r * c];
        group.bench_function(BenchmarkId::new("decompress", label(r, c)), |b| {
            b.iter(|| {
                opt.apply(
                    &mut [params.as_mut_slice()],
                    std::slice::from_ref(&update),
                    1e-3,
                )
                .expect("apply")
            })
        });
    }
    group.finish();
}

fn gpu(crit: &mut Criterion) {
    let device = match wgpu_device() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no wgpu benchmarks: {e}");
            return;
        }
    };
    let options = config().step_options();
    let mut group = crit.benchmark_group("wgpu");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for (r, c) in sizes() {
        for path in [KernelPath::Wgsl, KernelPath::BurnOps] {
            let shapes = vec![vec![r, c]];
            let mut opt = GpuDistro::new(&shapes, config(), &device, path).expect("gpu optimizer");
            let shape = matrix_shape(&opt.layout().tensors()[0]);
            let grad = Tensor::<2>::from_data(TensorData::new(gradient(r * c), shape), &device);
            let name = format!("{path:?}").to_lowercase();
            group.throughput(Throughput::Elements((r * c) as u64));
            // Some adapters cannot hold a tensor this large (lavapipe refuses
            // buffers of a few hundred MB): report it and move on.
            let update = match opt.step(std::slice::from_ref(&grad), 1e-3, options) {
                Ok(u) => u.into_incoming([1; 32]),
                Err(e) => {
                    eprintln!("wgpu {name} {}: cannot run here: {e}", label(r, c));
                    continue;
                }
            };
            // A step reads its selection back, so each iteration waits for the GPU.
            group.bench_function(
                BenchmarkId::new(format!("{name}/compress"), label(r, c)),
                |b| {
                    b.iter(|| {
                        opt.step(std::slice::from_ref(&grad), 1e-3, options)
                            .expect("step")
                    })
                },
            );
            let mut params = vec![Tensor::<2>::zeros(shape, &device)];
            group.bench_function(
                BenchmarkId::new(format!("{name}/decompress"), label(r, c)),
                |b| {
                    b.iter(|| {
                        opt.apply(&mut params, std::slice::from_ref(&update), 1e-3)
                            .expect("apply");
                        device.sync().expect("sync");
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, cpu, gpu);
criterion_main!(benches);
