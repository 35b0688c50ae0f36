//! Shared helpers for hubvault's criterion benches.
//!
//! Everything here is deterministic: the same seed gives the same bytes, so
//! runs compare. Two kinds of content stand in for what a backup meets:
//! *random* bytes (already-compressed media, encrypted files: zstd gives up
//! on them) and *text-like* bytes (words of a Zipf-skewed vocabulary in
//! lines, which zstd level 3 shrinks about as much as prose or logs).
//!
//! Bench files (one `[[bench]]` each, `harness = false`):
//! `chunking.rs` (FastCDC), `seal.rs` (id, compress+encrypt, open),
//! `pipeline.rs` (whole backup, re-backup, restore) and `catalog.rs`
//! (SQLite lookups at 10⁵ and 10⁷ blobs). Data too slow to make on every
//! run is cached under [`bench_data_dir`].

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// One mebibyte.
pub const MIB: usize = 1024 * 1024;

/// A small, fast, seedable generator (SplitMix64); plenty for bench data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose whole output is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0; the slight modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// `len` random (incompressible) bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Text-like generator: a fixed vocabulary of pseudo-words drawn with a
/// Zipf-like skew, in sentences and lines of varying length.
#[derive(Debug, Clone)]
pub struct TextGen {
    rng: Rng,
    words: Vec<Vec<u8>>,
}

impl TextGen {
    /// Words in the vocabulary.
    const VOCABULARY: usize = 8192;

    /// A generator seeded with `seed` (the vocabulary is the same for every seed).
    pub fn new(seed: u64) -> Self {
        const SYLLABLES: [&str; 24] = [
            "a", "e", "in", "on", "re", "de", "ta", "lo", "ment", "er", "st", "th", "ion", "ar",
            "ch", "ke", "vi", "so", "pro", "con", "al", "ing", "ed", "ly",
        ];
        let mut vocab_rng = Rng::new(0x7e87);
        let words = (0..Self::VOCABULARY)
            .map(|_| {
                let n = 1 + vocab_rng.below(4) as usize;
                (0..n)
                    .flat_map(|_| SYLLABLES[vocab_rng.below(24) as usize].bytes())
                    .collect()
            })
            .collect();
        TextGen {
            rng: Rng::new(seed),
            words,
        }
    }

    /// Append at least `len` bytes of text to `out`, then cut it to exactly `len` more.
    pub fn append(&mut self, out: &mut Vec<u8>, len: usize) {
        let end = out.len() + len;
        let mut in_line = 0usize;
        let mut line_len = 40 + self.rng.below(60) as usize;
        while out.len() < end {
            // Cubing a uniform number skews the choice towards low indices,
            // so a few words are common and most are rare, as in prose.
            let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let w = &self.words[(u * u * u * Self::VOCABULARY as f64) as usize];
            out.extend_from_slice(w);
            in_line += w.len() + 1;
            let r = self.rng.below(16);
            if in_line >= line_len {
                out.push(b'\n');
                in_line = 0;
                line_len = 40 + self.rng.below(60) as usize;
            } else if r == 0 {
                out.extend_from_slice(b". ");
            } else if r == 1 {
                out.extend_from_slice(b", ");
            } else {
                out.push(b' ');
            }
        }
        out.truncate(end);
    }
}

/// `len` bytes of text-like content.
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    TextGen::new(seed).append(&mut v, len);
    v
}

/// True when criterion will not measure: it runs the benches as tests
/// (`cargo test --benches`, which passes no `--bench`, or `cargo bench --
/// --test`: each routine runs once) or only lists them. The benches then
/// shrink their data sets instead of generating gigabytes.
pub fn quick_mode() -> bool {
    let has = |flag: &str| std::env::args().any(|a| a == flag);
    !has("--bench") || has("--test") || has("--list")
}

/// `target/bench-data` (or `$CARGO_TARGET_DIR/bench-data`), created if missing:
/// where data that is slow to generate is kept between runs.
///
/// # Panics
/// When the directory cannot be created (a bench cannot go on without it).
pub fn bench_data_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("bench-data");
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating bench data dir {}: {e}", dir.display()));
    dir
}

/// What [`make_mixed_tree`] wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeStats {
    /// Regular files written.
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Write a mixed source tree of about `total` bytes under `root` (created):
/// 3/8 large text-like files, 5/16 large random files, 1/16 medium files
/// (256 KiB, alternating text and random) and 1/4 small files (0.5–16 KiB,
/// alternating) spread over 64 directories, as a home directory mixes logs,
/// media and many small configs.
///
/// # Errors
/// Any I/O error writing the tree.
pub fn make_mixed_tree(root: &Path, total: usize, seed: u64) -> io::Result<TreeStats> {
    let mut stats = TreeStats::default();
    let mut rng = Rng::new(seed);
    let mut text = TextGen::new(seed ^ 0x5eed);
    let write = |path: PathBuf, data: &[u8], stats: &mut TreeStats| -> io::Result<()> {
        fs::create_dir_all(path.parent().unwrap_or(root))?;
        fs::File::create(&path)?.write_all(data)?;
        stats.files += 1;
        stats.bytes += data.len() as u64;
        Ok(())
    };
    let large = (total / 32).max(1);
    let mut buf = Vec::new();
    for i in 0..12 {
        buf.clear();
        text.append(&mut buf, large);
        write(root.join(format!("text/log-{i:02}.txt")), &buf, &mut stats)?;
    }
    for i in 0..10 {
        buf.resize(large, 0);
        rng.fill(&mut buf);
        write(
            root.join(format!("media/blob-{i:02}.bin")),
            &buf,
            &mut stats,
        )?;
    }
    let medium = 256 * 1024;
    for i in 0..(total / 16 / medium).max(1) {
        buf.clear();
        fill_alternating(&mut buf, medium, i, &mut rng, &mut text);
        write(root.join(format!("docs/doc-{i:03}.dat")), &buf, &mut stats)?;
    }
    let small_budget = (total / 4) as u64;
    let mut small_bytes = 0u64;
    let mut i = 0usize;
    while small_bytes < small_budget {
        let len = 512 + rng.below(16 * 1024 - 512) as usize;
        buf.clear();
        fill_alternating(&mut buf, len, i, &mut rng, &mut text);
        let path = root.join(format!("conf/d{:02}/f{i:05}.cfg", i % 64));
        write(path, &buf, &mut stats)?;
        small_bytes += len as u64;
        i += 1;
    }
    Ok(stats)
}

/// Even `i`: text; odd `i`: random.
fn fill_alternating(buf: &mut Vec<u8>, len: usize, i: usize, rng: &mut Rng, text: &mut TextGen) {
    if i.is_multiple_of(2) {
        text.append(buf, len);
    } else {
        buf.resize(len, 0);
        rng.fill(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic_and_exact() {
        assert_eq!(random_bytes(1001, 3), random_bytes(1001, 3));
        assert_ne!(random_bytes(64, 3), random_bytes(64, 4));
        let t = text_bytes(10_000, 1);
        assert_eq!(t.len(), 10_000);
        assert_eq!(t, text_bytes(10_000, 1));
        assert!(t.iter().all(|b| b.is_ascii()));
    }

    #[test]
    fn mixed_tree_has_about_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let s = make_mixed_tree(dir.path(), 8 * MIB, 1).unwrap();
        assert!(
            s.bytes >= 7 * MIB as u64 && s.bytes <= 9 * MIB as u64,
            "{s:?}"
        );
        assert!(s.files > 100);
    }
}
