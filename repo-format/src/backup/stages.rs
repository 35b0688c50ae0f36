//! The pipeline's threads: file workers, seal workers, the packer and the
//! tree builder, and [`run`], which wires them with bounded channels.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::backup::Shared;
use crate::backup::claims::SnapshotReader;
use crate::backup::dirty::DirtySet;
use crate::backup::walk::Walker;
use crate::blob::{BlobKind, Sealer};
use crate::catalog::Catalog;
use crate::chunker::{Chunker, ChunkerSetup};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::meta;
use crate::pack::writer::PackWriter;
use crate::tree::{self, Entry, EntryKind};

/// Files to read, each with its `lstat` metadata already in its entry.
pub(crate) struct FileJob {
    /// Consecutive files of one directory (small files travel in batches:
    /// one hand-off per batch instead of one per file).
    pub(crate) items: Vec<(PathBuf, Entry)>,
    /// The finished entries in order, `None` where a file could not be read (an issue was recorded).
    pub(crate) reply: Sender<Vec<Option<Entry>>>,
}

/// A chunk or tree to seal.
pub(crate) struct RawBlob {
    kind: BlobKind,
    id: Id,
    data: Vec<u8>,
}

/// A sealed blob for the packer.
pub(crate) struct SealedBlob {
    kind: BlobKind,
    id: Id,
    sealed: Vec<u8>,
    raw_len: u32,
}

/// What the tree builder receives, in walk order.
pub(crate) enum BuildItem {
    /// A directory begins; its entries follow until the matching `End`.
    Start(Entry),
    /// An entry whose metadata and content are final.
    Ready(Entry),
    /// A file being read by a worker.
    Pending(Receiver<Vec<Option<Entry>>>),
    /// The innermost open directory is complete.
    End,
}

/// Totals of the snapshot's content, counted by the builder.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) files: u64,
    pub(crate) dirs: u64,
    pub(crate) others: u64,
    pub(crate) bytes: u64,
}

impl Counts {
    /// Count one entry (a directory counts as one, without its contents).
    pub(crate) fn add(&mut self, e: &Entry) {
        match e.kind {
            EntryKind::File => {
                self.files += 1;
                self.bytes += e.size;
            }
            EntryKind::Dir => self.dirs += 1,
            _ => self.others += 1,
        }
    }
}

/// Run the whole pipeline; returns the root tree id, the totals of what was
/// walked and (incremental mode) the totals of the parent entries it replaced.
pub(crate) fn run(
    shared: &Shared<'_>,
    roots: Vec<(Vec<u8>, PathBuf)>,
    parent_root: Option<Vec<Entry>>,
    threads: usize,
    excludes: &crate::glob::Excludes,
    dirty: Option<&DirtySet>,
) -> Result<(Id, Counts, Counts)> {
    let repo = shared.repo;
    // Fail early, before any thread starts, if the content key is absent.
    repo.keys().content()?;
    let cat_path = repo.catalog_path();
    let setup = ChunkerSetup::new(repo.config().chunker, repo.keys().content()?.gear_seed());
    let setup = &setup;
    let (file_tx, file_rx) = bounded::<FileJob>(threads * 8);
    let (seal_tx, seal_rx) = bounded::<RawBlob>(threads * 2);
    let (pack_tx, pack_rx) = bounded::<Vec<SealedBlob>>(threads * 4);
    let (build_tx, build_rx) = bounded::<BuildItem>(4096);

    let result = std::thread::scope(|s| -> Result<(Id, Counts, Counts)> {
        let spawn_err =
            |e: std::io::Error| Error::Pipeline(format!("starting a backup thread: {e}"));
        let named = |n: String| std::thread::Builder::new().name(n);
        let packer = named("hv-packer".into())
            .spawn_scoped(s, || packer(shared, pack_rx))
            .map_err(spawn_err)?;
        for i in 0..threads {
            let rx = seal_rx.clone();
            let tx = pack_tx.clone();
            named(format!("hv-seal-{i}"))
                .spawn_scoped(s, move || seal_worker(shared, rx, tx))
                .map_err(spawn_err)?;
        }
        drop(seal_rx);
        // Twice as many readers as cores: a reader waiting for the disk
        // leaves its core to another (a cold mixed-set backup took 5.1 s
        // with 4 readers on 2 cores against 5.7-6.6 s with 2; warm, the same).
        for i in 0..threads * 2 {
            let rx = file_rx.clone();
            let tx = seal_tx.clone();
            let cat_path = cat_path.clone();
            let ptx = pack_tx.clone();
            named(format!("hv-file-{i}"))
                .spawn_scoped(s, move || {
                    file_worker(shared, rx, tx, ptx, &cat_path, setup)
                })
                .map_err(spawn_err)?;
        }
        drop(file_rx);
        drop(seal_tx);
        let ptx = pack_tx.clone();
        let builder = named("hv-trees".into())
            .spawn_scoped(s, move || {
                tree_builder(shared, build_rx, ptx).inspect_err(|e| {
                    shared.fail(Error::Pipeline(format!("tree builder: {e}")));
                })
            })
            .map_err(spawn_err)?;
        drop(pack_tx);

        let walk = Walker::new(shared, file_tx, build_tx, excludes, dirty)
            .and_then(|w| w.run(roots, parent_root));
        let replaced = match walk {
            Ok(r) => r,
            Err(e) => {
                shared.fail(e);
                Counts::default()
            }
        };
        let root = builder
            .join()
            .map_err(|_| Error::Pipeline("tree builder panicked".into()))?;
        packer
            .join()
            .map_err(|_| Error::Pipeline("packer panicked".into()))?;
        root.map(|(id, walked)| (id, walked, replaced))
    });
    // A recorded fatal error wins over the secondary errors it caused.
    if let Some(e) = shared.fatal.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }
    result
}

fn file_worker(
    shared: &Shared<'_>,
    rx: Receiver<FileJob>,
    tx: Sender<RawBlob>,
    pack_tx: Sender<Vec<SealedBlob>>,
    cat: &std::path::Path,
    setup: &ChunkerSetup,
) {
    let mut sealer = match Sealer::new(shared.repo.config().zstd_level) {
        Ok(s) => s,
        Err(e) => {
            shared.fail(e);
            for _ in rx {}
            return;
        }
    };
    let mut reader =
        match Catalog::open_reader(cat).and_then(|c| SnapshotReader::new(c, &shared.claims)) {
            Ok(r) => Some(r),
            Err(e) => {
                shared.fail(e);
                None
            }
        };
    // One read buffer per worker, reused for every file.
    let mut buf = Vec::new();
    for job in rx {
        // After an abort keep draining so the walker never blocks.
        let Some(reader) = reader.as_mut().filter(|_| !shared.aborted()) else {
            continue;
        };
        // One catalog snapshot per batch of files (renewed within a long one).
        if let Err(e) = reader.begin() {
            shared.fail(e);
            continue;
        }
        let mut ctx = FileCtx {
            shared,
            reader,
            tx: &tx,
            sealer: &mut sealer,
            setup,
            buf: &mut buf,
            out: Vec::new(),
        };
        let mut done = Vec::with_capacity(job.items.len());
        let mut failed = None;
        for (path, entry) in &job.items {
            match ctx.read_file(path, entry) {
                Ok(e) => done.push(e),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let out = std::mem::take(&mut ctx.out);
        // Idle workers hold no snapshot back (see `claims`).
        if let Err(e) = reader.end() {
            failed.get_or_insert(e);
        }
        // Blobs sealed here go to the packer in one message per batch.
        if !out.is_empty() && pack_tx.send(out).is_err() {
            failed.get_or_insert(Error::Pipeline("packer stopped".into()));
        }
        match failed {
            None => {
                let _ = job.reply.send(done);
            }
            Some(e) => shared.fail(e),
        }
    }
}

/// Read a file the walk saw with `expected` bytes, in one `read` call when
/// it still has that size. `read_to_end` would first `fstat` and `lseek` for
/// a size hint and then read again to see the end: three extra calls per
/// file, a tenth of a many-small-files backup. A read that returns exactly
/// `expected` bytes is taken as the end (a regular file reads short only
/// there); the caller's `fstat` after the read catches a file that grew.
/// A file that reads longer than expected is read to its end.
fn read_small(file: &std::fs::File, expected: usize) -> std::io::Result<Vec<u8>> {
    let mut data = vec![0u8; expected + 1];
    let mut got = 0;
    loop {
        match (&*file).read(&mut data[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == expected && expected > 0 {
                    break;
                }
                if got == data.len() {
                    // Longer than the walk saw: take the rest too.
                    data.truncate(got);
                    (&*file).read_to_end(&mut data)?;
                    return Ok(data);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(got);
    Ok(data)
}

/// Chunks below this size are sealed by the file worker itself: handing a
/// small file's only chunk to another thread costs more than sealing it.
const INLINE_SEAL: usize = 128 * 1024;

struct FileCtx<'a, 's, 'r> {
    shared: &'s Shared<'r>,
    reader: &'a mut SnapshotReader<'s>,
    tx: &'a Sender<RawBlob>,
    sealer: &'a mut Sealer,
    /// Blobs sealed inline, sent to the packer when the batch is done.
    out: Vec<SealedBlob>,
    setup: &'a ChunkerSetup,
    buf: &'a mut Vec<u8>,
}

impl FileCtx<'_, '_, '_> {
    /// Take one chunk: record its id and, unless already stored, seal it
    /// here (small) or hand it to the seal workers (large).
    fn chunk(&mut self, entry: &mut Entry, chunk: Vec<u8>) -> Result<()> {
        let keys = self.shared.repo.keys().content()?;
        let id = keys.id_of(&chunk);
        self.shared
            .progress
            .bytes_done
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        entry.chunks.push(id);
        let reader = &mut *self.reader;
        if !self.shared.claim(&id, |id| reader.contains(id))? {
            return Ok(());
        }
        if chunk.len() < INLINE_SEAL {
            let sealed = self
                .sealer
                .seal_verified(keys, BlobKind::Data, &id, &chunk)?;
            let b = SealedBlob {
                kind: BlobKind::Data,
                id,
                raw_len: chunk.len() as u32,
                sealed,
            };
            self.out.push(b);
            Ok(())
        } else {
            let blob = RawBlob {
                kind: BlobKind::Data,
                id,
                data: chunk,
            };
            self.tx
                .send(blob)
                .map_err(|_| Error::Pipeline("seal stage stopped".into()))
        }
    }

    /// Read and chunk the content of `file` into `entry`; `Ok(Err(reason))` = unreadable.
    fn content(
        &mut self,
        file: &std::fs::File,
        entry: &mut Entry,
    ) -> Result<std::result::Result<u64, String>> {
        let min = self.setup.params().min as u64;
        if entry.size < min {
            // Small file: one exact-size read, no chunker buffer.
            let data = match read_small(file, entry.size as usize) {
                Ok(d) => d,
                Err(e) => return Ok(Err(format!("read failed: {e}"))),
            };
            let n = data.len() as u64;
            if n == 0 {
                // An empty file has no chunks, however it was read.
            } else if n < min {
                self.chunk(entry, data)?;
            } else {
                // It grew while we looked: chunk what we read.
                let mut c = Chunker::new(&data[..], self.setup, std::mem::take(self.buf));
                while let Ok(Some(chunk)) = c.next_chunk() {
                    self.chunk(entry, chunk)?;
                }
                *self.buf = c.into_buffer();
            }
            return Ok(Ok(n));
        }
        let mut c = Chunker::new(file, self.setup, std::mem::take(self.buf));
        let mut size = 0u64;
        let res = loop {
            match c.next_chunk() {
                Ok(Some(chunk)) => {
                    size += chunk.len() as u64;
                    if let Err(e) = self.chunk(entry, chunk) {
                        break Err(e);
                    }
                    if self.shared.aborted() {
                        break Err(Error::Pipeline("backup aborted".into()));
                    }
                }
                Ok(None) => break Ok(Ok(size)),
                Err(e) => break Ok(Err(format!("read failed after {size} bytes: {e}"))),
            }
        };
        *self.buf = c.into_buffer();
        res
    }

    /// Read, chunk and claim one file. `Ok(None)` = unreadable (issue recorded);
    /// `Err` = the backup must stop.
    fn read_file(&mut self, path: &std::path::Path, entry: &Entry) -> Result<Option<Entry>> {
        let shared = self.shared;
        let mut entry = entry.clone();
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                shared.issue(path, format!("cannot open: {e}"));
                return Ok(None);
            }
        };
        let size = match self.content(&file, &mut entry)? {
            Ok(n) => n,
            Err(reason) => {
                shared.issue(path, reason);
                return Ok(None);
            }
        };
        shared.bytes_read.fetch_add(size, Ordering::Relaxed);
        // Compared with what the walk saw (no fstat before the read): a
        // file changed between the walk and the read is reported too.
        let after = file
            .metadata()
            .ok()
            .map(|a| meta::entry_from_metadata(entry.name.clone(), &a));
        let changed = match &after {
            Some(a) => entry.size != a.size || entry.mtime_ns != a.mtime_ns || a.size != size,
            None => true,
        };
        if changed {
            shared.issue(
                path,
                "changed while being read; stored content may be inconsistent",
            );
        }
        if let Some(fresh) = &after {
            entry.mtime_ns = fresh.mtime_ns;
            // ctime 0 never matches: a file that changed while read is read again next time.
            entry.ctime_ns = if changed { 0 } else { fresh.ctime_ns };
            entry.mode = fresh.mode;
            entry.uid = fresh.uid;
            entry.gid = fresh.gid;
        }
        entry.size = size;
        match meta::read_xattrs_of(&file) {
            Ok(x) => entry.xattrs = x,
            Err(e) => shared.issue(path, format!("cannot read xattrs: {e}")),
        }
        shared.progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok(Some(entry))
    }
}

fn seal_worker(shared: &Shared<'_>, rx: Receiver<RawBlob>, tx: Sender<Vec<SealedBlob>>) {
    let mut sealer = match Sealer::new(shared.repo.config().zstd_level) {
        Ok(s) => Some(s),
        Err(e) => {
            shared.fail(e);
            None
        }
    };
    for raw in rx {
        let Some(sealer) = sealer.as_mut().filter(|_| !shared.aborted()) else {
            continue;
        };
        let sealed = shared
            .repo
            .keyset(raw.kind)
            .and_then(|k| sealer.seal_verified(k, raw.kind, &raw.id, &raw.data));
        match sealed {
            Ok(sealed) => {
                let b = SealedBlob {
                    kind: raw.kind,
                    id: raw.id,
                    raw_len: raw.data.len() as u32,
                    sealed,
                };
                if tx.send(vec![b]).is_err() {
                    shared.fail(Error::Pipeline("packer stopped".into()));
                }
            }
            Err(e) => shared.fail(e),
        }
    }
}

/// Writes sealed blobs into packs, tree blobs and data blobs in packs of
/// their own (as restic does): an agent can then drop uploaded data packs
/// from its spool while keeping every tree, and a reader of metadata never
/// pulls data packs into its cache.
fn packer(shared: &Shared<'_>, rx: Receiver<Vec<SealedBlob>>) {
    let repo = shared.repo;
    let target = repo.config().pack_target;
    // [data, tree]
    let mut writers: [Option<PackWriter>; 2] = [None, None];
    let slot = |kind: BlobKind| usize::from(kind == BlobKind::Tree);
    let finish = |w: PackWriter| -> Result<()> {
        let fp = w.finish(repo.store().as_ref(), &repo.keys().metadata)?;
        repo.catalog()?
            .insert_pack(&fp.name, fp.size, &fp.entries)?;
        shared.claims.catalogued(fp.entries.iter().map(|e| e.id));
        if let Some(sink) = &shared.on_pack {
            (sink.0)(fp.name, &fp.entries);
        }
        Ok(())
    };
    for b in rx.into_iter().flatten() {
        if shared.aborted() {
            writers = [None, None];
            continue;
        }
        let step = (|| -> Result<()> {
            let writer = &mut writers[slot(b.kind)];
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(PackWriter::new(repo.store().as_ref())?),
            };
            w.add(b.kind, b.id, &b.sealed, b.raw_len)?;
            shared.new_blobs.fetch_add(1, Ordering::Relaxed);
            shared
                .new_bytes
                .fetch_add(b.raw_len as u64, Ordering::Relaxed);
            shared
                .new_bytes_stored
                .fetch_add(b.sealed.len() as u64, Ordering::Relaxed);
            shared
                .progress
                .bytes_stored
                .fetch_add(b.sealed.len() as u64, Ordering::Relaxed);
            if w.size() >= target
                && let Some(w) = writer.take()
            {
                finish(w)?;
            }
            Ok(())
        })();
        if let Err(e) = step {
            writers = [None, None];
            shared.fail(e);
        }
    }
    // The last data pack before the last tree pack (mid-run, a tree pack may
    // fill before the data its trees point to; harmless: the snapshot
    // commits last, and an agent uploads trees only after their subtrees).
    for w in writers {
        if let Some(w) = w.filter(|w| !w.is_empty() && !shared.aborted())
            && let Err(e) = finish(w)
        {
            shared.fail(e);
            break;
        }
    }
}

fn tree_builder(
    shared: &Shared<'_>,
    rx: Receiver<BuildItem>,
    tx: Sender<Vec<SealedBlob>>,
) -> Result<(Id, Counts)> {
    let repo = shared.repo;
    let reader = Catalog::open_reader(&repo.catalog_path())?;
    let mut sealer = Sealer::new(repo.config().zstd_level)?;
    let meta_keys = &repo.keys().metadata;
    let mut counts = Counts::default();
    // The root is a directory without an entry of its own.
    let mut stack: Vec<(Option<Entry>, Vec<Entry>)> = vec![(None, Vec::new())];
    let mut root = None;
    for item in rx {
        if shared.aborted() {
            return Err(Error::Pipeline("backup aborted".into()));
        }
        let top = stack
            .last_mut()
            .ok_or_else(|| Error::Pipeline("builder stack empty".into()))?;
        match item {
            BuildItem::Start(e) => stack.push((Some(e), Vec::new())),
            BuildItem::Ready(e) => {
                counts.add(&e);
                top.1.push(e);
            }
            BuildItem::Pending(reply) => match reply.recv() {
                Ok(done) => {
                    for e in done.into_iter().flatten() {
                        counts.add(&e);
                        top.1.push(e);
                    }
                }
                Err(_) => return Err(Error::Pipeline("file worker stopped".into())),
            },
            BuildItem::End => {
                let (dir, entries) = stack
                    .pop()
                    .ok_or_else(|| Error::Pipeline("unbalanced tree end".into()))?;
                let bytes = tree::encode(&entries)?;
                let id = meta_keys.id_of(&bytes);
                if shared.claim(&id, |id| reader.contains(id))? {
                    let sealed = sealer.seal_verified(meta_keys, BlobKind::Tree, &id, &bytes)?;
                    let b = SealedBlob {
                        kind: BlobKind::Tree,
                        id,
                        raw_len: bytes.len() as u32,
                        sealed,
                    };
                    tx.send(vec![b])
                        .map_err(|_| Error::Pipeline("packer stopped".into()))?;
                }
                match dir {
                    Some(mut d) => {
                        d.subtree = Some(id);
                        counts.add(&d);
                        stack
                            .last_mut()
                            .ok_or_else(|| Error::Pipeline("unbalanced tree end".into()))?
                            .1
                            .push(d);
                    }
                    None => root = Some(id),
                }
            }
        }
    }
    root.map(|r| (r, counts))
        .ok_or_else(|| Error::Pipeline("walk ended before the root tree was complete".into()))
}

#[cfg(test)]
mod tests {
    use super::read_small;

    /// `read_small` returns the file's bytes whatever size the walk saw:
    /// the same, smaller (the file grew), larger (it shrank), or zero (a
    /// pseudo-file that reports no size).
    #[test]
    fn read_small_returns_what_the_file_holds_whatever_size_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        for expected in [5000, 4999, 100, 1, 0, 5001, 9000] {
            let f = std::fs::File::open(&path).unwrap();
            assert_eq!(
                read_small(&f, expected).unwrap(),
                content,
                "expected {expected}"
            );
        }
        std::fs::write(&path, b"").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        assert!(read_small(&f, 0).unwrap().is_empty());
    }
}
