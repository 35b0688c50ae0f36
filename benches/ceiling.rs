//! The ceiling of a backup on this machine: what the codec work alone costs.
//!
//! Reads every file under a directory with as many threads as a backup
//! uses, and per chunk does exactly the work a backup cannot skip: FastCDC,
//! the keyed BLAKE3 id, zstd at level 3 where it shrinks the chunk, and
//! XChaCha20-Poly1305; with `--verified`, also the read-back check the
//! writer makes before storing (decrypt, decompress, compare). Nothing is
//! written, deduplicated, catalogued or fsynced. A backup's wall time over
//! this one's is the share of it that is overhead (walk, packs, catalog,
//! trees, scheduling); README.md ("Performance") quotes both.
//!
//! Usage (release): `cargo bench -p benches --bench ceiling -- DIR [--threads N] [--verified]`.
//! Prints one line: files, bytes, wall seconds, MB/s. Without a DIR (as
//! `cargo test --benches` runs it) it measures nothing and exits.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use repo_format::blob::{BlobKind, Sealer};
use repo_format::chunker::{Chunker, ChunkerSetup};
use repo_format::config::ChunkerParams;
use repo_format::crypto::KeySet;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut verified = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--threads N")
            }
            "--verified" => verified = true,
            "--bench" | "--test" => {}
            other if !other.starts_with('-') => dir = Some(PathBuf::from(other)),
            other => panic!("unknown argument {other}"),
        }
    }
    let Some(dir) = dir else {
        eprintln!("ceiling: no directory given, nothing measured");
        return;
    };
    let mut files = Vec::new();
    list(&dir, &mut files);
    // Large files first, so no thread is left with one at the end.
    let mut sized: Vec<(u64, PathBuf)> = files
        .into_iter()
        .map(|p| (std::fs::metadata(&p).map_or(0, |m| m.len()), p))
        .collect();
    sized.sort_by_key(|s| std::cmp::Reverse(s.0));
    let total: u64 = sized.iter().map(|s| s.0).sum();
    let n = sized.len();
    let queue = Mutex::new(sized.into_iter());
    let setup = ChunkerSetup::new(ChunkerParams::default(), 0x5eed);
    let keys = KeySet::from_keys([1; 32], [2; 32]);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut sealer = Sealer::new(3).expect("zstd context");
                let mut buf = Vec::new();
                loop {
                    let next = queue.lock().expect("queue").next();
                    let Some((_, path)) = next else { break };
                    let Ok(f) = std::fs::File::open(&path) else {
                        continue;
                    };
                    let mut c = Chunker::new(f, &setup, std::mem::take(&mut buf));
                    while let Ok(Some(chunk)) = c.next_chunk() {
                        let id = keys.id_of(&chunk);
                        let sealed = if verified {
                            sealer.seal_verified(&keys, BlobKind::Data, &id, &chunk)
                        } else {
                            sealer.seal(&keys, BlobKind::Data, &id, &chunk)
                        };
                        std::hint::black_box(sealed.expect("seal"));
                    }
                    buf = c.into_buffer();
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ceiling{}: {n} files, {total} bytes, {threads} threads: {secs:.2} s, {:.0} MB/s",
        if verified { " (verified)" } else { "" },
        total as f64 / secs / 1e6
    );
}

/// Every regular file below `dir` (symlinks not followed).
fn list(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => list(&e.path(), out),
            Ok(t) if t.is_file() => out.push(e.path()),
            _ => {}
        }
    }
}
