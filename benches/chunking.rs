//! FastCDC throughput: [`Chunker`] over 64 MiB of random and of text-like
//! data with the default parameters (256 KiB / 1 MiB / 4 MiB), from memory.
//! Each iteration includes the copy of every chunk out of the read buffer;
//! the buffer itself is reused across iterations, as the backup's file
//! workers reuse theirs across files.

use std::hint::black_box;
use std::time::Duration;

use benches::{MIB, quick_mode, random_bytes, text_bytes};
use criterion::{Criterion, Throughput};
use repo_format::chunker::{Chunker, ChunkerSetup};
use repo_format::config::ChunkerParams;

/// Chunk all of `data` with `setup`, reusing `buf`; returns the number of chunks.
fn chunk_all(setup: &ChunkerSetup, buf: &mut Vec<u8>, data: &[u8]) -> usize {
    let mut c = Chunker::new(data, setup, std::mem::take(buf));
    let mut n = 0;
    while let Some(chunk) = c.next_chunk().expect("reading from memory cannot fail") {
        black_box(&chunk);
        n += 1;
    }
    *buf = c.into_buffer();
    n
}

fn chunking(c: &mut Criterion) {
    let len = if quick_mode() { 4 * MIB } else { 64 * MIB };
    let setup = ChunkerSetup::new(ChunkerParams::default(), 0x0123_4567_89ab_cdef);
    let mut buf = Vec::new();
    let mut g = c.benchmark_group("chunking");
    g.throughput(Throughput::Bytes(len as u64));
    for (name, data) in [
        ("random", random_bytes(len, 1)),
        ("text", text_bytes(len, 2)),
    ] {
        eprintln!(
            "chunking/{name}: {} chunks in {} MiB",
            chunk_all(&setup, &mut buf, &data),
            len / MIB
        );
        g.bench_function(name, |b| {
            b.iter(|| chunk_all(&setup, &mut buf, black_box(&data)))
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .configure_from_args();
    chunking(&mut c);
    c.final_summary();
}
