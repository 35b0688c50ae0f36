//! Catalog lookups at 10⁵ and 10⁷ blobs: [`Catalog::contains`] (one id, as
//! the backup's claim does per chunk), the same inside one long read
//! transaction ([`Catalog::hold_read_snapshot`], as the backup's walker
//! does), and [`Catalog::missing`] on batches of 1 000 ids, half catalogued
//! and half not (as a collector answers "which of these do you need?").
//! Throughput is in ids, so criterion's time per element is the cost per id.
//!
//! The catalogs are built once through [`Catalog::insert_pack`] (packs of
//! 1 000 entries) and kept under `target/bench-data/`; the 10⁷ one takes
//! about 20 s on a fast disk (10 000 fsynced transactions) and 1.1 GB. Ids
//! are uniformly spread, random-looking 32-byte values, but blob `i` sorts
//! before blob `i + 1`, so inserting them in order appends to the B-tree
//! instead of rewriting random pages: that keeps generation short. The
//! resulting pages are fuller than those of a catalog grown by random
//! inserts (about 2/3 full), which makes the file smaller, not the tree
//! shallower, so lookups cost about the same.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use benches::{Rng, bench_data_dir, quick_mode};
use criterion::{Criterion, Throughput};
use repo_format::Id;
use repo_format::blob::BlobKind;
use repo_format::catalog::Catalog;
use repo_format::pack::PackEntry;

/// Blobs per pack, as the brief's 10 000 packs × 1 000 entries.
const PACK_ENTRIES: u64 = 1_000;
/// Ids per `missing` batch.
const BATCH: usize = 1_000;
/// Distinct ids (or batches × batch) the lookups cycle through: enough that
/// the 10⁷ catalog's pages do not all sit in SQLite's 64 MiB cache.
const LOOKUP_IDS: usize = 200_000;

/// Salt of catalogued ids; any other salt gives ids that are not catalogued.
const PRESENT: u64 = 0;
const ABSENT: u64 = 1;

/// The `i`-th of `n` ids: the first 8 bytes (big-endian, as SQLite compares
/// blobs bytewise) fall in the `i`-th of `n` equal slices of the key space,
/// the rest is pseudo-random; `salt` picks another id in the same slice.
fn blob_id(i: u64, n: u64, salt: u64) -> Id {
    let stride = u64::MAX / n;
    let mut rng = Rng::new(i.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (salt << 56));
    let mut id = [0u8; 32];
    let prefix = i * stride + rng.below(stride);
    id[..8].copy_from_slice(&prefix.to_be_bytes());
    rng.fill(&mut id[8..]);
    Id(id)
}

/// The catalog of `n` blobs, built on first use.
fn cached_catalog(n: u64) -> PathBuf {
    let dir = bench_data_dir();
    let path = dir.join(format!("catalog-{n}-v1.db"));
    if path.exists() {
        return path;
    }
    // Build under a temporary name: a catalog with the final name is complete.
    let tmp = dir.join(format!("catalog-{n}-v1.db.partial"));
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", tmp.display()));
        if p.exists() {
            std::fs::remove_file(&p).expect("removing a partial catalog");
        }
    }
    build_catalog(&tmp, n);
    assert!(
        !Path::new(&format!("{}-wal", tmp.display())).exists(),
        "the catalog's WAL outlived its connection"
    );
    std::fs::rename(&tmp, &path).expect("renaming the built catalog");
    path
}

fn build_catalog(path: &Path, n: u64) {
    let started = Instant::now();
    eprintln!("catalog: building {n} blobs in {}", path.display());
    let mut cat = Catalog::create(path).expect("creating catalog");
    let mut names = Rng::new(n);
    let packs = n.div_ceil(PACK_ENTRIES);
    for p in 0..packs {
        let entries: Vec<PackEntry> = (p * PACK_ENTRIES..((p + 1) * PACK_ENTRIES).min(n))
            .enumerate()
            .map(|(j, i)| PackEntry {
                kind: BlobKind::Data,
                id: blob_id(i, n, PRESENT),
                offset: 8 + j as u64 * 700_000,
                length: 700_000,
                raw_length: 1 << 20,
            })
            .collect();
        let mut name = [0u8; 32];
        names.fill(&mut name);
        let size = 8 + entries.len() as u64 * 700_000;
        cat.insert_pack(&Id(name), size, &entries)
            .expect("inserting pack");
        if n >= 1_000_000 && (p + 1) % (packs / 20) == 0 {
            eprintln!(
                "catalog: {} of {n} blobs, {:.0} s",
                (p + 1) * PACK_ENTRIES,
                started.elapsed().as_secs_f64()
            );
        }
    }
    drop(cat);
    eprintln!(
        "catalog: built in {:.0} s, {:.0} MB",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(path).map_or(0, |m| m.len()) as f64 / 1e6
    );
}

/// Ids to look up: `LOOKUP_IDS` of them, present and absent alternating.
fn lookup_ids(n: u64) -> Vec<Id> {
    let mut rng = Rng::new(0x100c);
    (0..LOOKUP_IDS)
        .map(|k| {
            let salt = if k % 2 == 0 { PRESENT } else { ABSENT };
            blob_id(rng.below(n), n, salt)
        })
        .collect()
}

fn bench_size(c: &mut Criterion, n: u64, label: &str) {
    let path = cached_catalog(n);
    // A writer keeps the WAL index alive for the read-only connection, as in a backup.
    let _writer = Catalog::open(&path).expect("opening catalog");
    let mut cat = Catalog::open_reader(&path).expect("opening catalog reader");
    let ids = lookup_ids(n);
    let present: Vec<Id> = ids.iter().step_by(2).copied().collect();
    let absent: Vec<Id> = ids.iter().skip(1).step_by(2).copied().collect();
    assert!(cat.contains(&present[0]).expect("contains"));
    assert!(!cat.contains(&absent[0]).expect("contains"));

    let mut g = c.benchmark_group(format!("catalog_{label}"));
    g.throughput(Throughput::Elements(1));
    for (name, set) in [("contains_present", &present), ("contains_absent", &absent)] {
        let mut k = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                k = (k + 1) % set.len();
                cat.contains(black_box(&set[k])).expect("contains")
            })
        });
    }
    // One read transaction for every lookup: no lock taken per statement.
    let snap = Catalog::open_reader(&path).expect("opening catalog reader");
    snap.hold_read_snapshot().expect("read snapshot");
    let mut k = 0;
    g.bench_function("contains_present_in_snapshot", |b| {
        b.iter(|| {
            k = (k + 1) % present.len();
            snap.contains(black_box(&present[k])).expect("contains")
        })
    });
    g.throughput(Throughput::Elements(BATCH as u64));
    let batches: Vec<&[Id]> = ids.chunks(BATCH).collect();
    assert_eq!(
        cat.missing(batches[0]).expect("missing").len(),
        BATCH / 2,
        "half of a batch is catalogued"
    );
    let mut k = 0;
    g.bench_function("missing_1000_half", |b| {
        b.iter(|| {
            k = (k + 1) % batches.len();
            cat.missing(black_box(batches[k])).expect("missing")
        })
    });
    g.finish();
}

fn catalog(c: &mut Criterion) {
    if quick_mode() {
        bench_size(c, 20_000, "20k");
    } else {
        bench_size(c, 100_000, "100k");
        bench_size(c, 10_000_000, "10M");
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    catalog(&mut c);
    c.final_summary();
}
