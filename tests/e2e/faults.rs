//! A pack store that fails mid-backup (disk full, failed fsync, a pack that
//! became visible although `put` failed): the backup returns the error, no
//! snapshot becomes visible (DESIGN.md invariant 1), nothing committed is
//! damaged (invariant 7), and the next backup on a healthy store works.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use integration_tests::fixture::{self, Node};
use integration_tests::repo::{self, TestRepo};
use integration_tests::{assert_same_tree, diff_trees};
use repo_format::store::dir::DirStore;
use repo_format::store::{PackStore, TempPack};
use repo_format::{Error, Id, Result};

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Every `put` from the N-th on fails: the disk is full.
    NoSpace,
    /// The N-th `put` fails as if its fsync had failed; later ones work.
    FsyncFails,
    /// The N-th `put` stores the pack, then fails (directory fsync failed
    /// after the rename): the pack is visible but was never acknowledged.
    FailsAfterRename,
    /// Every `create_temp` from the N-th on fails: no room for a new pack.
    NoTemp,
}

/// A [`DirStore`] with one injected fault.
struct FaultyStore {
    inner: DirStore,
    fault: Fault,
    fail_at: usize,
    puts: AtomicUsize,
    temps: AtomicUsize,
}

impl FaultyStore {
    fn new(inner: DirStore, fault: Fault, fail_at: usize) -> Self {
        FaultyStore {
            inner,
            fault,
            fail_at,
            puts: AtomicUsize::new(0),
            temps: AtomicUsize::new(0),
        }
    }

    fn calls(&self) -> usize {
        match self.fault {
            Fault::NoTemp => self.temps.load(Ordering::SeqCst),
            _ => self.puts.load(Ordering::SeqCst),
        }
    }
}

fn os_error(op: &'static str, path: &Path, errno: i32) -> Error {
    Error::io(op, path, std::io::Error::from_raw_os_error(errno))
}

impl PackStore for FaultyStore {
    fn create_temp(&self) -> Result<TempPack> {
        let n = self.temps.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fault == Fault::NoTemp && n >= self.fail_at {
            return Err(os_error(
                "creating temporary pack",
                Path::new("tmp"),
                ENOSPC,
            ));
        }
        self.inner.create_temp()
    }

    fn put(&self, tmp: TempPack, name: &Id) -> Result<()> {
        let n = self.puts.fetch_add(1, Ordering::SeqCst) + 1;
        match self.fault {
            Fault::NoSpace if n >= self.fail_at => Err(os_error("writing pack", &tmp.path, ENOSPC)),
            Fault::FsyncFails if n == self.fail_at => {
                Err(os_error("fsync of pack", &tmp.path, EIO))
            }
            Fault::FailsAfterRename if n == self.fail_at => {
                let dest = self.inner.path_of(name);
                self.inner.put(tmp, name)?;
                Err(os_error("fsync of directory", &dest, EIO))
            }
            _ => self.inner.put(tmp, name),
        }
    }

    fn read_at(&self, name: &Id, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(name, offset, buf)
    }

    fn size(&self, name: &Id) -> Result<u64> {
        self.inner.size(name)
    }

    fn remove(&self, name: &Id) -> Result<()> {
        self.inner.remove(name)
    }

    fn list(&self) -> Result<Vec<Id>> {
        self.inner.list()
    }
}

/// Commit a first snapshot, fail a backup of `data` with `fault` at call
/// `fail_at`, then check that nothing changed and that a healthy backup works.
fn fault_case(fault: Fault, fail_at: usize, data: &Node, errno: i32) {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let base = work.path().join("base");
    fixture::build(&base, &fixture::standard_tree((1024, 4096, 16384))).expect("build base");
    let first = repo::backup(&repo.open(), &[&base]);
    let snaps_before = repo.open().snapshots().expect("snapshots");
    let files_before = repo.snapshot_files();

    let bulk = work.path().join("bulk");
    fixture::build(&bulk, data).expect("build bulk");
    let store = Arc::new(FaultyStore::new(repo.dir_store(), fault, fail_at));
    {
        let r = repo.open_with_store(store.clone());
        let paths = [bulk.clone()];
        let err = repo_format::backup::backup(&r, &paths, &repo::backup_options())
            .expect_err("backup on a failing store must fail");
        assert!(store.calls() >= fail_at, "{fault:?}: fault never hit");
        let source = match &err {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        };
        assert_eq!(source, Some(errno), "{fault:?}: unexpected error {err}");
    }

    let fresh = repo.open();
    assert_eq!(
        fresh.snapshots().expect("snapshots"),
        snaps_before,
        "{fault:?}"
    );
    assert_eq!(repo.snapshot_files(), files_before, "{fault:?}");
    let report = repo_format::check::check(&fresh, true).expect("check");
    assert!(report.is_ok(), "{fault:?}: {:#?}", report.problems);
    if fault == Fault::FailsAfterRename {
        assert_eq!(report.unreferenced_packs.len(), 1, "{fault:?}");
    }

    let second = repo::backup(&fresh, &[&bulk]);
    let target = work.path().join("target");
    repo::restore_clean(&fresh, &second.id.to_hex(), &target);
    assert_same_tree(&bulk, &target.join("bulk"));
    let target = work.path().join("target-first");
    repo::restore_clean(&fresh, &first.id.to_hex(), &target);
    let d = diff_trees(&base, &target.join("base"));
    assert!(d.is_empty(), "{fault:?}: first snapshot damaged: {d:#?}");
    let report = repo_format::check::check(&fresh, true).expect("check");
    assert!(report.is_ok(), "{fault:?}: {:#?}", report.problems);
}

/// 3.5 MiB of incompressible data: four 1 MiB packs.
fn several_packs() -> Node {
    fixture::bulk_tree(8, 448 * 1024, 1000)
}

/// 256 KiB: a single pack, written when the walk is over (the final flush).
fn one_pack() -> Node {
    fixture::bulk_tree(4, 64 * 1024, 2000)
}

#[test]
fn disk_full_on_first_pack() {
    fault_case(Fault::NoSpace, 1, &several_packs(), ENOSPC);
}

#[test]
fn disk_full_after_some_packs() {
    fault_case(Fault::NoSpace, 3, &several_packs(), ENOSPC);
}

#[test]
fn disk_full_on_final_pack() {
    fault_case(Fault::NoSpace, 1, &one_pack(), ENOSPC);
}

#[test]
fn failed_fsync_is_not_retried_into_success() {
    fault_case(Fault::FsyncFails, 2, &several_packs(), EIO);
}

#[test]
fn pack_visible_but_put_failed() {
    fault_case(Fault::FailsAfterRename, 2, &several_packs(), EIO);
}

#[test]
fn no_room_for_a_new_pack() {
    fault_case(Fault::NoTemp, 2, &several_packs(), ENOSPC);
}
