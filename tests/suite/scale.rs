//! Trees of any size within a bounded number of descriptors: the daemon runs with
//! RLIMIT_NOFILE at 256 and a 20,000-file tree is extracted, listed, read back and deleted
//! through the mount, in both ways the inode table can find its objects again (file
//! handles, and re-opening by parent and name).

use crate::common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, trust_dir, Mounted, TestVolume};

const DIRS: usize = 200;
const PER_DIR: usize = 100;

fn file_len(d: usize, f: usize) -> usize {
    (d * 7919 + f * 104_729) % 3000
}

fn file_seed(d: usize, f: usize) -> u64 {
    (d * PER_DIR + f) as u64
}

/// A 20,000-file tarball, built once outside any mount.
fn tarball(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    for d in 0..DIRS {
        let sub = src.join(format!("tree/d{d:03}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..PER_DIR {
            fs::write(sub.join(format!("f{f:03}")), pattern(file_seed(d, f), file_len(d, f))).unwrap();
        }
    }
    let tar = dir.join("tree.tar");
    let st = Command::new("tar").arg("-cf").arg(&tar).arg("-C").arg(&src).arg("tree").status().unwrap();
    assert!(st.success());
    fs::remove_dir_all(&src).unwrap();
    tar
}

/// Mount with the daemon's RLIMIT_NOFILE (soft and hard) at `nofile`.
fn mount_limited(v: &TestVolume, nofile: u64, extra: &[&str]) -> Mounted {
    let mnt = v.dir.path().join("mnt");
    Mounted::start_trusting(&trust_dir(), &v.backing, "--key-file", &v.key, &mnt, extra, move |cmd| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
}

fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Samples the daemon's descriptor count every few milliseconds until dropped.
struct FdSampler {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FdSampler {
    fn start(pid: i32) -> Self {
        let (peak, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(open_fds(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Self { peak, stop, thread: Some(thread) }
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for FdSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.take().map(|t| t.join());
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).lines().take(5).collect::<Vec<_>>().join("\n")
    );
}

/// The tree, extracted, listed, read back and removed with at most `cap` descriptors kept
/// by the inode table, whatever the kernel caches.
fn twenty_thousand_files(extra: &[&str], mode_line: &str) {
    const CAP: usize = 64;
    let v = TestVolume::new(4096);
    let tar = tarball(v.dir.path());
    let cap = CAP.to_string();
    let mut args = vec!["--max-inode-fds", cap.as_str()];
    args.extend_from_slice(extra);
    let m = mount_limited(&v, 256, &args);
    let log = m.log_text();
    assert!(log.contains(mode_line), "the daemon says how it finds inodes again: {log}");
    let baseline = open_fds(m.pid());
    let sampler = FdSampler::start(m.pid());

    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&m.mnt), "tar -x into the mount");
    let after_untar = sampler.peak();

    let out = Command::new("ls").arg("-lR").arg(m.path("tree")).output().unwrap();
    assert!(out.status.success(), "ls -lR: {}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with('-')).count();
    assert_eq!(listed, DIRS * PER_DIR, "ls -lR lists every file");

    for d in 0..DIRS {
        for f in 0..PER_DIR {
            let p = m.path(&format!("tree/d{d:03}/f{f:03}"));
            let got = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            assert!(got == pattern(file_seed(d, f), file_len(d, f)), "{} reads back exactly", p.display());
        }
    }

    run(Command::new("rm").arg("-rf").arg(m.path("tree")), "rm -rf in the mount");
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0, "the tree is gone");
    let peak = sampler.peak();
    drop(sampler);
    let errors = m.log_text().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count();
    assert_eq!(errors, 0, "no failures logged: {}", m.log_text());
    // The table's descriptors, plus one per worker thread in flight, over what the daemon
    // holds when idle.
    let bound = baseline + CAP + 8;
    eprintln!("descriptors: {baseline} idle, {after_untar} peak during untar, {peak} peak overall (bound {bound})");
    assert!(peak <= bound, "the daemon held {peak} descriptors; the bound is {bound}");
    assert!(m.unmount().success());
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_20000_file_tree_within_256_descriptors_by_file_handle() {
    twenty_thousand_files(&[], "finds inodes by file handle");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_20000_file_tree_within_256_descriptors_by_parent_and_name() {
    twenty_thousand_files(&["--file-handles", "never"], "finds inodes by parent and name");
}

/// Files held open by applications count against the daemon's limit too; when they
/// exhaust it the open fails with EMFILE and the log names the limit and the setting.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn running_out_of_descriptors_is_named() {
    let v = TestVolume::new(4096);
    let m = mount_limited(&v, 64, &[]);
    let mut held = Vec::new();
    let err = (0..200)
        .find_map(|i| {
            let p = m.path(&format!("f{i}"));
            match fs::OpenOptions::new().create(true).truncate(true).write(true).open(&p) {
                Ok(f) => {
                    held.push(f);
                    None
                }
                Err(e) => Some(e),
            }
        })
        .expect("64 descriptors cannot hold 200 open files");
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    drop(held);
    let log = m.log_text();
    assert!(log.contains("RLIMIT_NOFILE") && log.contains("--max-inode-fds"), "the log names the limit: {log}");
    fs::write(m.path("after"), b"ok").expect("descriptors come back once the files are closed");
    assert!(m.unmount().success());
}

fn requests(m: &Mounted) -> serde_json::Value {
    let out = common::cli(&[&"status", &"--json", &m.mnt]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["requests"].clone()
}

fn count(r: &serde_json::Value, op: &str) -> u64 {
    r.get(op).and_then(|v| v.as_u64()).unwrap_or(0)
}

/// A name that does not exist is asked for once per entry timeout, not once per stat, and
/// the kernel learns of a file created through the mount at once.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn missing_names_are_cached_as_negative_entries() {
    let v = TestVolume::new(4096);
    let m = v.mount(&["--entry-timeout", "30"]);
    let before = count(&requests(&m), "lookup");
    for _ in 0..5 {
        assert_eq!(fs::metadata(m.path("missing")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }
    assert_eq!(count(&requests(&m), "lookup") - before, 1, "one lookup for five stats");
    fs::write(m.path("missing"), b"now here").unwrap();
    assert_eq!(fs::read(m.path("missing")).unwrap(), b"now here");
    assert!(m.unmount().success());
}

/// Sequential readers get 1 MiB read-ahead (the kernel's default for FUSE is 128 KiB).
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn the_mount_reads_ahead_a_mebibyte() {
    use std::os::unix::fs::MetadataExt;
    let v = TestVolume::new(4096);
    let m = v.mount(&[]);
    let dev = fs::metadata(&m.mnt).unwrap().dev();
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    let start = std::time::Instant::now();
    let mut kb = String::new();
    while start.elapsed() < Duration::from_secs(5) {
        kb = fs::read_to_string(&path).unwrap();
        if kb.trim() == "1024" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(kb.trim(), "1024", "{path}");
    assert!(m.unmount().success());
}
