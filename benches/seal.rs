//! Per-chunk CPU costs on 1 MiB chunks (the default average chunk) of random
//! and text-like data: the keyed BLAKE3 id ([`KeySet::id_of`]), sealing
//! ([`Sealer::seal`]: zstd, keep the smaller, XChaCha20-Poly1305), sealing
//! with the read-back check the backup uses ([`Sealer::seal_verified`]), at
//! zstd levels 3 (the default) and 1, and opening ([`blob::open`]: decrypt,
//! decompress, re-derive and compare the id). All single-threaded.

use std::hint::black_box;
use std::time::Duration;

use benches::{MIB, random_bytes, text_bytes};
use criterion::{BenchmarkId, Criterion, Throughput};
use repo_format::blob::{self, BlobKind, Sealer};
use repo_format::crypto::KeySet;

/// zstd levels compared: the repository default and the fastest.
const LEVELS: [i32; 2] = [3, 1];

fn inputs() -> [(&'static str, Vec<u8>); 2] {
    [
        ("random", random_bytes(MIB, 11)),
        ("text", text_bytes(MIB, 12)),
    ]
}

fn keys() -> KeySet {
    KeySet::from_keys([1; 32], [2; 32])
}

fn id(c: &mut Criterion) {
    let keys = keys();
    let mut g = c.benchmark_group("id");
    g.throughput(Throughput::Bytes(MIB as u64));
    for (name, data) in inputs() {
        g.bench_function(name, |b| b.iter(|| keys.id_of(black_box(&data))));
    }
    g.finish();
}

fn seal(c: &mut Criterion) {
    let keys = keys();
    for verified in [false, true] {
        let mut g = c.benchmark_group(if verified { "seal_verified" } else { "seal" });
        g.throughput(Throughput::Bytes(MIB as u64));
        for level in LEVELS {
            let mut sealer = Sealer::new(level).expect("zstd context");
            for (name, data) in inputs() {
                let id = keys.id_of(&data);
                let sealed = sealer
                    .seal(&keys, BlobKind::Data, &id, &data)
                    .expect("seal");
                if !verified {
                    eprintln!(
                        "zstd{level}/{name}: sealed {} of {} bytes ({:.2}x)",
                        sealed.len(),
                        data.len(),
                        data.len() as f64 / sealed.len() as f64
                    );
                }
                let bench_id = BenchmarkId::new(format!("zstd{level}"), name);
                g.bench_function(bench_id, |b| {
                    b.iter(|| {
                        if verified {
                            sealer.seal_verified(&keys, BlobKind::Data, &id, black_box(&data))
                        } else {
                            sealer.seal(&keys, BlobKind::Data, &id, black_box(&data))
                        }
                        .expect("seal")
                    })
                });
            }
        }
        g.finish();
    }
}

fn open(c: &mut Criterion) {
    let keys = keys();
    let mut g = c.benchmark_group("open");
    g.throughput(Throughput::Bytes(MIB as u64));
    for level in LEVELS {
        let mut sealer = Sealer::new(level).expect("zstd context");
        for (name, data) in inputs() {
            let id = keys.id_of(&data);
            let sealed = sealer
                .seal(&keys, BlobKind::Data, &id, &data)
                .expect("seal");
            let bench_id = BenchmarkId::new(format!("zstd{level}"), name);
            g.bench_function(bench_id, |b| {
                b.iter(|| blob::open(&keys, BlobKind::Data, &id, black_box(&sealed)).expect("open"))
            });
        }
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    id(&mut c);
    seal(&mut c);
    open(&mut c);
    c.final_summary();
}
