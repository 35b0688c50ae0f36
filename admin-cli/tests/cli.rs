//! The real `hubvault` binary driven on temporary directories: init →
//! backup → snapshots → ls → restore, and what the operator sees when data
//! is damaged, the catalog is lost, the passphrase is wrong, or a path
//! cannot be read.
//!
//! Fixtures and the tree comparison come from `tests/support`
//! (`integration-tests`); the repository library is used only to find where
//! a blob lies, so a test can damage exactly that blob.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::assert_same_tree;
use integration_tests::compare::{allocated_bytes, diff_trees, diff_trees_except, xattrs_of};
use integration_tests::fixture::{self, Meta, Node};
use serde_json::Value;
use tempfile::TempDir;

const PASSPHRASE: &str = "cli test passphrase";
/// Chunk sizes given to `repo init` (small, so the fixture stays small).
const CHUNKS: (usize, usize, usize) = (1024, 4096, 16384);

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\n{}",
                self.stdout, self.stderr
            )
        })
    }

    fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "exit code {} (expected {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// A repository made by `hubvault repo init` in a temporary directory, with
/// room beside it for sources and restore targets.
struct Hv {
    dir: TempDir,
    repo: PathBuf,
}

impl Hv {
    fn init() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        let hv = Hv { dir, repo };
        let chunks = format!("{},{},{}", CHUNKS.0, CHUNKS.1, CHUNKS.2);
        hv.run(
            "init",
            &["--kdf-memory-kib", "1024", "--chunk-sizes", &chunks],
        )
        .expect(0);
        hv
    }

    /// A path beside the repository.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `hubvault repo <sub> --repo <repo> <args>` with the right passphrase.
    fn run(&self, sub: &str, args: &[&str]) -> Run {
        self.run_with(PASSPHRASE, sub, args)
    }

    fn run_with(&self, passphrase: &str, sub: &str, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_hubvault"))
            .env_remove("HUBVAULT_REPO")
            .env_remove("HUBVAULT_PASSPHRASE_FILE")
            .env("HUBVAULT_PASSPHRASE", passphrase)
            .arg("repo")
            .arg(sub)
            .arg("--repo")
            .arg(&self.repo)
            .args(args)
            .output()
            .expect("run hubvault");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Build the standard fixture at `<dir>/<name>`; returns its path and
    /// whether the file system took its xattrs.
    fn fixture(&self, name: &str) -> (PathBuf, bool) {
        let p = self.path(name);
        let r = fixture::build(&p, &fixture::standard_tree(CHUNKS)).expect("build fixture");
        (p, r.xattrs_refused == 0)
    }

    /// `backup --json <paths>` with the expected exit code; the snapshot JSON.
    fn backup(&self, paths: &[&Path], code: i32) -> Value {
        let mut args = vec!["--json", "--threads", "2"];
        args.extend(paths.iter().map(|p| s(p)));
        self.run("backup", &args).expect(code).json()
    }

    /// `restore <snapshot> --target <target> [--path <path>]`.
    fn restore(&self, snapshot: &str, target: &Path, path: Option<&str>) -> Run {
        let mut args = vec![snapshot, "--target", s(target), "--threads", "2"];
        if let Some(p) = path {
            args.extend(["--path", p]);
        }
        self.run("restore", &args)
    }

    /// Pack files, sorted.
    fn packs(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for d in std::fs::read_dir(self.repo.join("packs")).expect("ls packs") {
            for f in std::fs::read_dir(d.expect("fan-out dir").path()).expect("ls fan-out") {
                v.push(f.expect("pack").path());
            }
        }
        v.sort();
        v
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

/// The `ls --json` row for `path`.
fn row<'a>(rows: &'a Value, path: &str) -> &'a Value {
    rows.as_array()
        .and_then(|a| a.iter().find(|r| r["path"] == path))
        .unwrap_or_else(|| panic!("no {path} in {rows}"))
}

#[test]
fn backup_ls_restore_round_trip_is_bit_exact() {
    let hv = Hv::init();
    let (src, xattrs_ok) = hv.fixture("src");
    let snap = hv.backup(&[&src], 0);
    let id = str_of(&snap, "id").to_string();
    assert_eq!(snap["issues"], Value::Array(vec![]));
    assert_eq!(snap["paths"][0], s(&src));
    assert!(snap["stats"]["files"].as_u64() > Some(20), "{snap}");

    let list = hv.run("snapshots", &["--json"]).expect(0).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["tree"], snap["tree"]);

    let top = hv.run("ls", &["latest", "--json"]).expect(0).json();
    assert_eq!(row(&top, "/src")["type"], "dir");
    let rows = hv.run("ls", &[&id[..8], "src", "--json"]).expect(0).json();
    assert_eq!(row(&rows, "/src/link-rel")["type"], "symlink");
    assert_eq!(row(&rows, "/src/link-rel")["target"], "hello.txt");
    assert_eq!(row(&rows, "/src/hello.txt")["size"], 12);
    assert_eq!(row(&rows, "/src/setuid")["mode"], "4755");
    assert_eq!(row(&rows, "/src/fifo")["type"], "fifo");
    assert_eq!(row(&rows, "/src/empty-dir")["type"], "dir");
    let one = hv
        .run("ls", &["latest", "src/hello.txt", "--json"])
        .expect(0)
        .json();
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one[0]["path"], "/src/hello.txt");
    let text = hv.run("ls", &["latest", "src/sub/deeper"]).expect(0);
    assert!(
        text.stdout.contains("/src/sub/deeper/nested.txt"),
        "{}",
        text.stdout
    );

    let target = hv.path("target");
    hv.restore(&id, &target, None).expect(0);
    let dst = target.join("src");
    assert_same_tree(&src, &dst);
    let md = |p: &str| std::fs::symlink_metadata(dst.join(p)).expect("restored entry");
    assert_eq!(md("hardlink-a").ino(), md("sub/hardlink-b").ino());
    assert!(md("fifo").file_type().is_fifo());
    // The fixture's mtime of hello.txt: 1_600_000_002.123_456_803.
    assert_eq!(
        (md("hello.txt").mtime(), md("hello.txt").mtime_nsec()),
        (1_600_000_002, 123_456_803)
    );
    assert!(allocated_bytes(&dst.join("sparse.img")) <= 256 * 1024);
    if xattrs_ok {
        let x = xattrs_of(&dst.join("hello.txt"));
        assert!(x.iter().any(|(k, _)| k == b"user.comment"), "{x:?}");
    }
    let check = hv.run("check", &["--read-data"]).expect(0);
    assert!(
        check.stdout.contains("no problems found"),
        "{}",
        check.stdout
    );
}

#[test]
fn second_backup_of_unchanged_data_adds_no_blobs() {
    let hv = Hv::init();
    let (src, _) = hv.fixture("src");
    // Files changed within a clock tick of a backup's start are read again
    // by the next one (racily clean): leave more than that.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let first = hv.backup(&[&src], 0);
    let second = hv.backup(&[&src], 0);
    let st = &second["stats"];
    assert_eq!(second["parent"], first["id"]);
    assert_eq!(st["new_blobs"], 0, "{st}");
    assert_eq!(st["files_unchanged"], st["files"], "{st}");
    assert_eq!(st["bytes_read"], 0, "{st}");
    assert!(first["stats"]["new_blobs"].as_u64() > Some(0));
}

#[test]
fn restore_of_a_subpath() {
    let hv = Hv::init();
    let (src, _) = hv.fixture("src");
    hv.backup(&[&src], 0);
    let target = hv.path("target");
    hv.restore("latest", &target, Some("src/sub")).expect(0);
    hv.restore("latest", &target, Some("/src/chunks/max+1"))
        .expect(0);
    assert_same_tree(&src.join("sub"), &target.join("sub"));
    assert_same_tree(&src.join("chunks/max+1"), &target.join("max+1"));
    let names: BTreeSet<_> = std::fs::read_dir(&target)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let miss = hv
        .restore("latest", &hv.path("t2"), Some("src/nope"))
        .expect(1);
    assert!(miss.stderr.contains("no entry"), "{}", miss.stderr);
}

/// Entries below `dir` (at any depth) whose name has `.tmp-` in it.
fn temporary_entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                out.push(e.path());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Start `restore` and kill -9 it as soon as `caught` holds (polled):
/// false when the restore ended first.
fn kill_restore_when(hv: &Hv, target: &Path, caught: impl Fn() -> bool) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubvault"))
        .env("HUBVAULT_PASSPHRASE", PASSPHRASE)
        .args(["repo", "restore", "--repo", s(&hv.repo), "latest"])
        .args(["--target", s(target), "--threads", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn restore");
    loop {
        if caught() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
            return true;
        }
        if child.try_wait().expect("try_wait").is_some() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// A restore killed mid-way (SIGKILL) leaves only `.NAME.tmp-*` entries,
/// never a partial file under a real name, and the next restore into the
/// same place removes them and ends bit-exact: into an empty target (the
/// staged top directory is left) and over an earlier restore (the file
/// being replaced keeps its complete old content; its temporary is left).
#[test]
fn restore_killed_midway_is_cleaned_up_by_the_next() {
    let hv = Hv::init();
    let (src, _) = hv.fixture("src");
    // Big enough that the restore is caught while writing it.
    let big = fixture::content(64 << 20, 7, fixture::Fill::Random);
    std::fs::write(src.join("big.bin"), &big).expect("write big");
    hv.backup(&[&src], 0);
    let target = hv.path("target");

    // Into an empty target: killed while big.bin is written in the staged directory.
    let caught = kill_restore_when(&hv, &target, || {
        temporary_entries(&target)
            .iter()
            .any(|p| p.join("big.bin").exists())
    });
    assert!(caught, "the restore ended before it could be killed");
    assert!(
        !target.join("src").exists(),
        "nothing under its real name before it is complete"
    );
    assert_eq!(temporary_entries(&target).len(), 1);
    // (--sync: the flush at the end runs, and is no error.)
    let again = hv
        .run("restore", &["latest", "--target", s(&target), "--sync"])
        .expect(0);
    assert!(
        again.stderr.contains("removed 1 temporary entries"),
        "{}",
        again.stderr
    );
    assert_same_tree(&src, &target.join("src"));
    assert_eq!(temporary_entries(&target), Vec::<PathBuf>::new());

    // Over the complete restore: killed while big.bin's replacement is written.
    let dst = target.join("src");
    let caught = kill_restore_when(&hv, &target, || {
        std::fs::read_dir(&dst).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".big.bin.tmp-"))
        })
    });
    assert!(caught, "the restore ended before it could be killed");
    assert!(
        std::fs::read(dst.join("big.bin")).expect("read big") == big,
        "the file under its real name keeps its complete content"
    );
    assert!(!temporary_entries(&dst).is_empty());
    // A name like ours for a name the snapshot does not have is not ours.
    let foreign = dst.join(".not-in-snapshot.tmp-0123456789abcdef");
    std::fs::write(&foreign, b"user data").expect("write foreign");
    let again = hv.restore("latest", &target, None).expect(0);
    assert!(again.stderr.contains("removed"), "{}", again.stderr);
    assert_eq!(temporary_entries(&target), vec![foreign]);
    let skip = [Path::new(".not-in-snapshot.tmp-0123456789abcdef")];
    assert_eq!(diff_trees_except(&src, &dst, &skip), Vec::<String>::new());
}

#[test]
fn wrong_passphrase_is_refused() {
    let hv = Hv::init();
    let (src, _) = hv.fixture("src");
    for (sub, args) in [("snapshots", vec![]), ("backup", vec![s(&src)])] {
        let r = hv.run_with("not the passphrase", sub, &args).expect(1);
        assert!(r.stderr.contains("wrong passphrase"), "{sub}: {}", r.stderr);
    }
    assert_eq!(
        std::fs::read_dir(hv.repo.join("snapshots"))
            .expect("ls")
            .count(),
        0
    );
}

/// One flipped bit in a pack: `check --read-data` names exactly the blob
/// and the snapshot path using it; a restore still writes every other file
/// bit-exact and fails loudly on that one, leaving nothing of it behind.
#[test]
fn flipped_bit_is_named_by_check_and_confined_to_its_file() {
    let hv = Hv::init();
    let (src, _) = hv.fixture("src");
    // Under the minimum chunk size, unique: exactly one blob, used once.
    let victim = fixture::content(1000, 4242, fixture::Fill::Random);
    std::fs::write(src.join("victim.bin"), &victim).expect("write victim");
    let snap = hv.backup(&[&src], 0);
    let sid = str_of(&snap, "id").to_string();

    let (blob, pack) = {
        let r = repo_format::Repository::open(
            &hv.repo,
            PASSPHRASE.as_bytes(),
            repo_format::LockMode::Shared,
        )
        .expect("open");
        let id = r.keys().content().expect("content key").id_of(&victim);
        let loc = r
            .catalog()
            .expect("catalog")
            .lookup(&id)
            .expect("lookup")
            .expect("catalogued");
        let hex = loc.pack.to_hex();
        let path = hv.repo.join("packs").join(&hex[..2]).join(&hex);
        flip_bit(&path, loc.offset + u64::from(loc.length) / 2);
        (id.to_hex(), hex)
    };

    let report = hv.run("check", &["--read-data", "--json"]).expect(1).json();
    let problems = report["problems"].as_array().expect("problems");
    let blobs: Vec<&Value> = problems.iter().filter(|p| p["what"] == "blob").collect();
    assert_eq!(blobs.len(), 1, "{report:#}");
    assert_eq!(blobs[0]["id"], blob.as_str());
    assert_eq!(
        blobs[0]["used_by"],
        serde_json::json!([[sid, "/src/victim.bin"]]),
        "{report:#}"
    );
    for p in problems.iter().filter(|p| p["what"] != "blob") {
        assert_eq!(p["what"], "pack", "{p}");
        assert_eq!(p["id"], pack.as_str(), "{p}");
    }

    let target = hv.path("target");
    let r = hv.restore("latest", &target, None).expect(1);
    assert!(r.stderr.contains("victim.bin"), "{}", r.stderr);
    let d = diff_trees_except(&src, &target.join("src"), &[Path::new("victim.bin")]);
    assert!(d.is_empty(), "{d:#?}");
    assert!(!target.join("src/victim.bin").exists());

    let sub = hv.path("sub");
    hv.restore("latest", &sub, Some("src/sub")).expect(0);
    assert_same_tree(&src.join("sub"), &sub.join("sub"));
    hv.restore("latest", &hv.path("v"), Some("src/victim.bin"))
        .expect(1);
}

fn flip_bit(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .expect("open pack");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0x10;
    f.write_all_at(&b, at).expect("write byte");
}

fn truncate(path: &Path, len: u64) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .expect("truncate pack");
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(OsStr::to_str).expect("pack name")
}

#[test]
fn truncated_packs_are_reported_by_check() {
    let hv = Hv::init();
    let (one, _) = hv.fixture("one");
    let two = hv.path("two");
    fixture::build(&two, &fixture::bulk_tree(3, 20_000, 99)).expect("build");
    let s1 = hv.backup(&[&one], 0);
    let s2 = hv.backup(&[&two], 0);
    let mut packs = hv.packs();
    assert_eq!(packs.len(), 4, "a data pack and a tree pack per backup");
    // The two data packs (trees and data never share a pack; trees are tiny here).
    packs.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).expect("stat").len()));
    packs.truncate(2);
    truncate(&packs[0], 0);
    let half = std::fs::metadata(&packs[1]).expect("stat").len() / 2;
    truncate(&packs[1], half);

    for args in [&["--json"][..], &["--read-data", "--json"][..]] {
        let report = hv.run("check", args).expect(1).json();
        let problems = report["problems"].as_array().expect("problems");
        let damaged: BTreeSet<&str> = problems
            .iter()
            .filter(|p| p["what"] == "pack")
            .filter_map(|p| p["id"].as_str())
            .collect();
        let want: BTreeSet<&str> = packs.iter().map(|p| file_name(p)).collect();
        assert_eq!(damaged, want, "{report:#}");
        // Every lost blob is named with the snapshots that need it: both.
        let users: BTreeSet<String> = problems
            .iter()
            .filter(|p| p["what"] == "blob")
            .flat_map(|p| p["used_by"].as_array().cloned().unwrap_or_default())
            .filter_map(|u| u[0].as_str().map(String::from))
            .collect();
        let both = BTreeSet::from([str_of(&s1, "id").into(), str_of(&s2, "id").into()]);
        assert_eq!(users, both, "{report:#}");
    }
    let text = hv.run("check", &[]).expect(1);
    assert!(text.stdout.contains("DAMAGED pack"), "{}", text.stdout);
}

#[test]
fn lost_catalog_is_refused_then_rebuilt() {
    let hv = Hv::init();
    let (src, _) = hv.fixture("src");
    let s1 = hv.backup(&[&src], 0);
    fixture::build(
        &src.join("more"),
        &Node::dir(
            Meta::new(0o755, 1_000_000_000_000_000_000),
            vec![(b"new", Node::file(50_000, 5, Meta::new(0o600, 7)))],
        ),
    )
    .expect("build more");
    let s2 = hv.backup(&[&src], 0);
    let listed = hv.run("snapshots", &["--json"]).expect(0).json();
    let ids = [str_of(&s1, "id"), str_of(&s2, "id")];
    for (i, id) in ids.iter().enumerate() {
        hv.restore(id, &hv.path(&format!("before-{i}")), None)
            .expect(0);
    }

    for f in std::fs::read_dir(&hv.repo).expect("ls repo") {
        let f = f.expect("entry");
        if f.file_name().to_string_lossy().starts_with("catalog.db") {
            std::fs::remove_file(f.path()).expect("rm catalog");
        }
    }
    let t = hv.path("refused");
    for (sub, args) in [
        ("snapshots", vec![]),
        ("ls", vec!["latest"]),
        ("restore", vec!["latest", "--target", s(&t)]),
        ("backup", vec![s(&src)]),
        ("check", vec![]),
    ] {
        let r = hv.run(sub, &args).expect(1);
        assert!(r.stderr.contains("rebuild-catalog"), "{sub}: {}", r.stderr);
    }
    assert!(!t.exists(), "a refused restore created its target");

    let report = hv.run("rebuild-catalog", &["--json"]).expect(0).json();
    assert_eq!(report["snapshots"], 2, "{report}");
    assert_eq!(report["skipped"], Value::Array(vec![]), "{report}");
    assert_eq!(report["packs"].as_u64(), Some(hv.packs().len() as u64));
    assert_eq!(hv.run("snapshots", &["--json"]).expect(0).json(), listed);
    for (i, id) in ids.iter().enumerate() {
        let after = hv.path(&format!("after-{i}"));
        hv.restore(id, &after, None).expect(0);
        let before = hv.path(&format!("before-{i}"));
        let d = diff_trees(&before.join("src"), &after.join("src"));
        assert!(d.is_empty(), "snapshot {i}: {d:#?}");
    }
    hv.run("check", &["--read-data"]).expect(0);
}

/// `/proc/self/mem` opens, but reading it at offset 0 fails with EIO, even
/// for root: a real unreadable file. The backup commits a partial snapshot
/// (exit 3) that records the issue and restores everything else.
#[test]
fn unreadable_path_gives_a_partial_snapshot() {
    let hv = Hv::init();
    let (src, _) = hv.fixture("src");
    let snap = hv.backup(&[&src, Path::new("/proc/self/mem")], 3);
    let issues = snap["issues"].as_array().expect("issues");
    assert_eq!(issues.len(), 1, "{snap:#}");
    assert!(str_of(&issues[0], "path").ends_with("/mem"), "{snap:#}");
    assert!(!str_of(&issues[0], "reason").is_empty());
    let list = hv.run("snapshots", &[]).expect(0);
    assert!(list.stdout.contains("(partial)"), "{}", list.stdout);

    let target = hv.path("target");
    hv.restore(str_of(&snap, "id"), &target, None).expect(0);
    assert_same_tree(&src, &target.join("src"));
    let names: Vec<_> = std::fs::read_dir(&target)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec!["src"]);
}

#[test]
fn excluded_entries_are_left_out() {
    let hv = Hv::init();
    let src = hv.path("src");
    std::fs::create_dir_all(src.join("build")).expect("mkdir");
    std::fs::create_dir_all(src.join("keep")).expect("mkdir");
    std::fs::write(src.join("a.txt"), b"a").expect("w");
    std::fs::write(src.join("b.tmp"), b"b").expect("w");
    std::fs::write(src.join("build").join("out.o"), b"o").expect("w");
    std::fs::write(src.join("keep").join("c.tmp"), b"c").expect("w");
    hv.run(
        "backup",
        &["--exclude", "*.tmp", "--exclude", "build", s(&src)],
    )
    .expect(0);
    let target = hv.path("target");
    hv.restore("latest", &target, None).expect(0);
    let r = target.join("src");
    assert!(r.join("a.txt").exists());
    assert!(r.join("keep").is_dir());
    for gone in ["b.tmp", "build", "keep/c.tmp"] {
        assert!(!r.join(gone).exists(), "{gone} must be excluded");
    }
}

/// Copy the directory tree at `from` (directories and regular files: a
/// repository holds nothing else) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy directory");
    for e in std::fs::read_dir(from).expect("ls for copy") {
        let e = e.expect("entry to copy");
        let dst = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy file");
        }
    }
}

/// Set the pack size target in the config of the (still empty) repository at
/// `repo`: `repo init` has no option for it, and 1 MiB (the least allowed)
/// makes a backup of a few MiB write several packs.
fn set_pack_target(repo: &Path, bytes: u64) {
    let path = repo.join("config");
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read config")).expect("config JSON");
    cfg["pack_target"] = Value::from(bytes);
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("config JSON"))
        .expect("write config");
}

/// Packs catalogued in the repository at `repo`.
fn catalogued_packs(repo: &Path) -> BTreeSet<repo_format::Id> {
    let cat =
        repo_format::catalog::Catalog::open_reader(&repo.join("catalog.db")).expect("open catalog");
    cat.packs()
        .expect("list catalogued packs")
        .into_iter()
        .map(|p| p.0)
        .collect()
}

/// What the catalog holds in packs not in `before`: (packs, blobs, sealed bytes).
fn catalogued_since(repo: &Path, before: &BTreeSet<repo_format::Id>) -> (usize, u64, u64) {
    let cat =
        repo_format::catalog::Catalog::open_reader(&repo.join("catalog.db")).expect("open catalog");
    let (mut packs, mut blobs, mut bytes) = (0, 0, 0);
    cat.for_each_blob_by_pack(|name, rows| {
        if !before.contains(&name) {
            packs += 1;
            blobs += rows.len() as u64;
            bytes += rows.iter().map(|r| u64::from(r.length)).sum::<u64>();
        }
        Ok(())
    })
    .expect("pass over blob rows");
    (packs, blobs, bytes)
}

/// Names in `<repo>/snapshots`: (snapshot files, temporaries).
fn snapshot_dir(repo: &Path) -> (Vec<String>, Vec<String>) {
    let (mut files, mut temps) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(repo.join("snapshots")).expect("ls snapshots") {
        let name = e.expect("snapshot entry").file_name();
        let name = name.to_string_lossy().into_owned();
        if name.starts_with('.') {
            temps.push(name);
        } else {
            files.push(name);
        }
    }
    files.sort();
    (files, temps)
}

impl Hv {
    /// A copy of this repository in a directory of its own (sources stay
    /// where they are: a backup from the copy names the same paths).
    fn copy(&self) -> Hv {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        copy_tree(&self.repo, &repo);
        Hv { dir, repo }
    }
}

/// Start `backup --threads 2 <src>` and kill -9 it as soon as `caught`
/// holds (polled every 50 µs): true when the kill ended it, false when the
/// backup had ended on its own first.
fn kill_backup_when(hv: &Hv, src: &Path, mut caught: impl FnMut() -> bool) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubvault"))
        .env_remove("HUBVAULT_REPO")
        .env_remove("HUBVAULT_PASSPHRASE_FILE")
        .env("HUBVAULT_PASSPHRASE", PASSPHRASE)
        .args(["repo", "backup", "--repo", s(&hv.repo), "--threads", "2"])
        .arg(src)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn backup");
    loop {
        if caught() {
            // Already exited but not reaped: the signal reaches a zombie
            // and the status says how it really ended.
            child.kill().expect("kill -9");
            let status = child.wait().expect("reap");
            assert!(
                status.success() || status.signal() == Some(9),
                "backup ended with {status}"
            );
            return status.signal() == Some(9);
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "backup ended with {status}");
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// When a sweep point kills the backup.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// Once this many new pack files are under `packs/`.
    NewPacks(usize),
    /// Once the snapshot's temporary file is in `snapshots/` (just before the rename).
    SnapshotTemp,
    /// Once the new snapshot file is in `snapshots/` (its catalog row may not be).
    SnapshotFile,
    /// This long after the start.
    After(std::time::Duration),
}

/// A local backup killed with SIGKILL at several points (kill -9 sweep;
/// RELIABILITY.md scenario 3 "crash in the middle", through the real
/// binary). Every point starts from a copy of one repository holding S1 and
/// backs up the changed source (files modified, added and deleted) with
/// 1 MiB packs. After each kill:
/// - no lock is left (the next command, and an exclusive open, succeed);
/// - `check --read-data` passes: packs the kill left uncatalogued are only
///   counted as leftovers;
/// - S1 is listed and restores bit-exact; at most one new snapshot is
///   listed, and it is complete and restores bit-exact to the changed source;
/// - a rerun succeeds, restores bit-exact, and stores exactly what the full
///   backup stores minus the blobs the killed run already catalogued.
#[test]
fn backup_killed_at_any_point_leaves_s1_intact_and_the_rerun_resumes() {
    let started = std::time::Instant::now();
    let hv = Hv::init();
    set_pack_target(&hv.repo, 1 << 20);
    let (src, _) = hv.fixture("src");
    fixture::build(&src.join("bulk"), &fixture::bulk_tree(4, 600_000, 500)).expect("build bulk");
    let s1 = hv.backup(&[&src], 0);
    let s1_id = str_of(&s1, "id").to_string();
    let ref1 = hv.path("ref1");
    hv.restore(&s1_id, &ref1, None).expect(0);
    assert_same_tree(&src, &ref1.join("src"));
    let s1_packs = catalogued_packs(&hv.repo);

    // The change: one file rewritten in the middle, one rewritten whole,
    // two deleted, 10 MiB of new files (about ten 1 MiB packs).
    let bulk0 = src.join("bulk/bulk-000");
    let mut bytes = std::fs::read(&bulk0).expect("read bulk-000");
    bytes[200_000..264_000].copy_from_slice(&fixture::content(64_000, 77, fixture::Fill::Random));
    std::fs::write(&bulk0, &bytes).expect("rewrite bulk-000");
    std::fs::write(src.join("hello.txt"), b"hello again, changed").expect("rewrite hello");
    std::fs::remove_file(src.join("bulk/bulk-001")).expect("rm bulk-001");
    std::fs::remove_file(src.join("chunks/min")).expect("rm chunks/min");
    std::fs::create_dir(src.join("new")).expect("mkdir new");
    for i in 0..5u64 {
        let data = fixture::content(2 << 20, 900 + i, fixture::Fill::Random);
        std::fs::write(src.join(format!("new/big-{i}")), data).expect("write new file");
    }
    std::fs::write(src.join("new/small.txt"), b"a new small file").expect("write small");

    // The uninterrupted backup of the change, to compare the reruns with.
    let (full, wall) = {
        let r = hv.copy();
        let t0 = std::time::Instant::now();
        let snap = r.backup(&[&src], 0);
        let wall = t0.elapsed();
        let t = r.path("t");
        r.restore(str_of(&snap, "id"), &t, None).expect(0);
        assert_same_tree(&src, &t.join("src"));
        let packs = r.packs().len() - hv.packs().len();
        println!(
            "full backup of the change: {packs} packs in {wall:?}, {}",
            snap["stats"]
        );
        (snap["stats"].clone(), wall)
    };
    let full_stored = full["new_bytes_stored"].as_u64().expect("new_bytes_stored");
    let full_blobs = full["new_blobs"].as_u64().expect("new_blobs");

    // Fixed delays: while the process starts, and at half and nine tenths
    // of the uninterrupted run (the packs are written in its last half).
    let points = [
        KillAt::After(std::time::Duration::from_millis(5)),
        KillAt::After(wall / 2),
        KillAt::After(wall * 9 / 10),
        KillAt::NewPacks(1),
        KillAt::NewPacks(4),
        KillAt::NewPacks(8),
        KillAt::SnapshotTemp,
        // Most likely after the end: the kill then finds the snapshot committed.
        KillAt::After(wall * 3),
        // The narrowest window: the snapshot file is in place, its catalog
        // row is being written (Repository::commit_snapshot).
        KillAt::SnapshotFile,
    ];
    for at in points {
        let r = hv.copy();
        let before = r.packs().len();
        let t0 = std::time::Instant::now();
        let killed = kill_backup_when(&r, &src, || match at {
            KillAt::NewPacks(n) => r.packs().len() >= before + n,
            KillAt::SnapshotTemp => !snapshot_dir(&r.repo).1.is_empty(),
            KillAt::SnapshotFile => snapshot_dir(&r.repo).0.len() > 1,
            KillAt::After(d) => t0.elapsed() >= d,
        });
        let at_ms = t0.elapsed().as_millis();
        let new_packs = r.packs().len() - before;
        let (snap_files, snap_temps) = snapshot_dir(&r.repo);
        let tmp_left = std::fs::read_dir(r.repo.join("tmp"))
            .expect("ls tmp")
            .count();
        let what = format!(
            "{at:?}: {} after {at_ms} ms with {new_packs} new pack files, \
             {} snapshot files, {} snapshot temporaries, {tmp_left} in tmp/",
            if killed {
                "killed"
            } else {
                "finished before the kill"
            },
            snap_files.len(),
            snap_temps.len()
        );

        // (a) The next command runs (no lock left) and finds no problem.
        let check = r.run("check", &["--read-data", "--json"]);
        let listed = r.run("snapshots", &["--json"]).expect(0).json();
        let ids: Vec<&str> = listed
            .as_array()
            .expect("snapshot list")
            .iter()
            .map(|v| str_of(v, "id"))
            .collect();
        if check.code != 0 {
            let text = r.run("check", &[]);
            panic!(
                "{what}: check fails after the kill (exit {})\nsnapshot files: {snap_files:?}\n\
                 listed: {ids:?}\n{}{}",
                check.code, text.stdout, text.stderr
            );
        }
        let report = check.json();
        let unreferenced = report["unreferenced_packs"].as_array().map_or(0, Vec::len);
        drop(
            repo_format::Repository::open(
                &r.repo,
                PASSPHRASE.as_bytes(),
                repo_format::LockMode::Exclusive,
            )
            .unwrap_or_else(|e| panic!("{what}: the killed backup left a lock: {e}")),
        );

        // (b) S1 is listed and restores bit-exact; (c) at most one new
        // snapshot, complete and bit-exact.
        assert!(
            ids.contains(&s1_id.as_str()),
            "{what}: S1 not listed: {listed:#}"
        );
        assert!(
            ids.len() <= 2,
            "{what}: more than one new snapshot: {listed:#}"
        );
        assert_eq!(
            snap_files.len(),
            ids.len(),
            "{what}: snapshot files {snap_files:?}, listed {ids:?}"
        );
        let t1 = r.path("s1");
        r.restore(&s1_id, &t1, None).expect(0);
        let d = diff_trees(&ref1.join("src"), &t1.join("src"));
        assert!(d.is_empty(), "{what}: S1 restores differently: {d:#?}");
        let new_snapshot = ids.iter().find(|i| **i != s1_id).map(|i| i.to_string());
        if let Some(id) = &new_snapshot {
            let v = &listed[ids.iter().position(|i| i == id).expect("listed")];
            assert_eq!(v["issues"], Value::Array(vec![]), "{what}: {v}");
            let t2 = r.path("s2");
            r.restore(id, &t2, None).expect(0);
            let d = diff_trees(&src, &t2.join("src"));
            assert!(
                d.is_empty(),
                "{what}: the new snapshot restores differently: {d:#?}"
            );
        }
        let (kept_packs, kept_blobs, kept_bytes) = catalogued_since(&r.repo, &s1_packs);

        // (e) What the killed run left in tmp/ (its writer is gone) is
        // deleted by the next backup once a minute old, not a day: aged here.
        let a_minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        for e in std::fs::read_dir(r.repo.join("tmp"))
            .expect("ls tmp")
            .flatten()
        {
            std::fs::File::options()
                .write(true)
                .open(e.path())
                .and_then(|f| f.set_modified(a_minute_ago))
                .expect("age a temporary");
        }

        // (d) The rerun completes, restores bit-exact, and stores only what
        // the killed run did not catalogue.
        let rerun = r.backup(&[&src], 0);
        let tmp_after: Vec<_> = std::fs::read_dir(r.repo.join("tmp"))
            .expect("ls tmp")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(tmp_after.is_empty(), "{what}: left in tmp/: {tmp_after:?}");
        let t3 = r.path("rerun");
        r.restore(str_of(&rerun, "id"), &t3, None).expect(0);
        let d = diff_trees(&src, &t3.join("src"));
        assert!(
            d.is_empty(),
            "{what}: the rerun restores differently: {d:#?}"
        );
        let st = &rerun["stats"];
        let stored = st["new_bytes_stored"].as_u64().expect("new_bytes_stored");
        let blobs = st["new_blobs"].as_u64().expect("new_blobs");
        let line = format!(
            "{what}; check: {} packs, {unreferenced} not in the catalog; \
             snapshot visible: {}; the killed run catalogued {kept_packs} packs \
             ({kept_blobs} blobs, {kept_bytes} B); the rerun stored {blobs} blobs, \
             {stored} B (full: {full_blobs} blobs, {full_stored} B)",
            report["packs"],
            new_snapshot.is_some()
        );
        println!("{line}");
        assert_eq!(
            (blobs + kept_blobs, stored + kept_bytes),
            (full_blobs, full_stored),
            "{line}: the rerun stores what was already catalogued, or misses some"
        );
        if kept_bytes > 0 {
            assert!(stored < full_stored, "{line}");
        }
        r.run("check", &[]).expect(0);
    }
    println!(
        "kill sweep: {} points in {:.1} s",
        points.len(),
        started.elapsed().as_secs_f64()
    );
}
