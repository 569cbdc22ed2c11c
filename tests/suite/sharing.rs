//! Several hosts, one volume (docs/SHARING.md): two daemons, each with its own trust store
//! and crash journal, serve one backing directory at two mount points, as two hosts would
//! over a shared filesystem. Races are made deterministic by a third party holding the
//! backing range the daemons must lock: both writers are seen waiting (in /proc/locks)
//! before it lets go.

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{cli_with_trust, new_key_file, pattern, Mounted, BIN, HEADER, STORED};
use tempfile::TempDir;

/// A volume and two hosts that trust it.
struct Fleet {
    dir: TempDir,
    backing: PathBuf,
    key: PathBuf,
}

impl Fleet {
    fn new(shared: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
        let backing = dir.path().join("backing");
        fs::create_dir(&backing).unwrap();
        let key = new_key_file(dir.path());
        let f = Fleet { dir, backing, key };
        let mut init: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"init", &"--key-file", &f.key, &f.backing];
        if shared {
            init.push(&"--shared");
        }
        let out = cli_with_trust(&f.trust(1), &init);
        assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
        let out = cli_with_trust(&f.trust(2), &[&"trust", &"--yes", &"--key-file", &f.key, &f.backing]);
        assert!(out.status.success(), "trust: {}", String::from_utf8_lossy(&out.stderr));
        f
    }

    fn trust(&self, host: u32) -> PathBuf {
        let t = self.dir.path().join(format!("host{host}"));
        fs::create_dir_all(&t).unwrap();
        t
    }

    fn mnt(&self, host: u32) -> PathBuf {
        self.dir.path().join(format!("mnt{host}"))
    }

    fn mount(&self, host: u32) -> Mounted {
        Mounted::start_trusting(&self.trust(host), &self.backing, "--key-file", &self.key, &self.mnt(host), &[], |_| {})
    }

    /// The one user file in the backing root (names are hidden).
    fn backing_file(&self) -> PathBuf {
        let files: Vec<PathBuf> = fs::read_dir(&self.backing)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("envelopefs."))
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    }
}

/// An OFD lock this test holds on a backing range, as a third host would.
fn hold(file: &File, start: u64, len: u64) {
    let l = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start as i64,
        l_len: len as i64,
        l_pid: 0,
    };
    assert_eq!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) }, 0);
}

/// Wait until `n` lock requests on the inode of `path` are blocked.
fn wait_for_waiters(path: &Path, n: usize) {
    let ino = format!(":{} ", fs::metadata(path).unwrap().ino());
    let start = Instant::now();
    loop {
        let locks = fs::read_to_string("/proc/locks").unwrap();
        let waiting = locks.lines().filter(|l| l.contains("->") && l.contains(&ino)).count();
        if waiting >= n {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{waiting} of {n} waiters:\n{locks}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_volume_that_is_not_shared_refuses_a_second_host() {
    let fleet = Fleet::new(false);
    let _h1 = fleet.mount(1);
    fs::create_dir_all(fleet.mnt(2)).unwrap();
    let out = std::process::Command::new(BIN)
        .env("ENVELOPEFS_TRUST_DIR", fleet.trust(2))
        .args(["mount", "--foreground", "--key-file"])
        .arg(&fleet.key)
        .arg(&fleet.backing)
        .arg(fleet.mnt(2))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(17), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use"));
    // Sharing is turned on with the volume unmounted everywhere.
    let out = cli_with_trust(&fleet.trust(2), &[&"share", &"--key-file", &fleet.key, &fleet.backing]);
    assert_eq!(out.status.code(), Some(17), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_shared_volume_is_mounted_by_both_and_rewritten_by_neither_while_mounted() {
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    fs::write(h1.path("a"), b"written on host 1").unwrap();
    assert_eq!(fs::read(h2.path("a")).unwrap(), b"written on host 1");
    let out = cli_with_trust(&fleet.trust(1), &[&"rekey", &"--reencrypt", &"--key-file", &fleet.key, &fleet.backing]);
    assert_eq!(out.status.code(), Some(17), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli_with_trust(&fleet.trust(2), &[&"share", &"--off", &"--key-file", &fleet.key, &fleet.backing]);
    assert_eq!(out.status.code(), Some(17), "{}", String::from_utf8_lossy(&out.stderr));
    h1.unmount();
    h2.unmount();
    let out = cli_with_trust(&fleet.trust(2), &[&"share", &"--off", &"--key-file", &fleet.key, &fleet.backing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let h1 = fleet.mount(1);
    assert_eq!(fs::read(h1.path("a")).unwrap(), b"written on host 1");
    // Sharing turned off keeps the format `init --shared` made (6), never an older one.
    assert!(fs::read_to_string(fleet.backing.join("envelopefs.toml")).unwrap().contains("format = 6"));
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn concurrent_first_writes_from_two_hosts_agree_on_one_header() {
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    File::create(h1.path("f")).unwrap();
    let (f1, f2) = (rw(&h1.path("f")), rw(&h2.path("f")));
    let backing = fleet.backing_file();
    assert_eq!(fs::metadata(&backing).unwrap().len(), 0);
    let third = rw(&backing);
    hold(&third, 0, HEADER);
    let (a, b) = (pattern(1, 3000), pattern(2, 3000));
    std::thread::scope(|s| {
        s.spawn(|| f1.write_all_at(&a, 0).unwrap());
        s.spawn(|| f2.write_all_at(&b, 10_000).unwrap());
        // Both found the file empty and wait to make its header.
        wait_for_waiters(&backing, 2);
        drop(third);
    });
    let mut want = vec![0u8; 13_000];
    want[..3000].copy_from_slice(&a);
    want[10_000..].copy_from_slice(&b);
    for h in [&h1, &h2] {
        assert_eq!(fs::read(h.path("f")).unwrap(), want);
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn disjoint_bytes_of_one_block_written_by_two_hosts_both_survive() {
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    let base = pattern(3, 4096);
    fs::write(h1.path("f"), &base).unwrap();
    let (f1, f2) = (rw(&h1.path("f")), rw(&h2.path("f")));
    let backing = fleet.backing_file();
    let third = rw(&backing);
    hold(&third, HEADER, STORED);
    std::thread::scope(|s| {
        s.spawn(|| {
            f1.write_all_at(&[b'A'; 16], 0).unwrap();
            f1.sync_all().unwrap();
        });
        s.spawn(|| {
            f2.write_all_at(&[b'B'; 16], 100).unwrap();
            f2.sync_all().unwrap();
        });
        // Both read the block only once it is theirs.
        wait_for_waiters(&backing, 2);
        drop(third);
    });
    let mut want = base;
    want[..16].fill(b'A');
    want[100..116].fill(b'B');
    for h in [&h1, &h2] {
        assert_eq!(fs::read(h.path("f")).unwrap(), want);
    }
}

/// F_SETLKW over the whole file, or F_UNLCK.
fn posix_lock(f: &File, typ: i32, wait: bool) -> std::io::Result<()> {
    let l = libc::flock { l_type: typ as i16, l_whence: libc::SEEK_SET as i16, l_start: 0, l_len: 0, l_pid: 0 };
    let cmd = if wait { libc::F_SETLKW } else { libc::F_SETLK };
    match unsafe { libc::fcntl(f.as_raw_fd(), cmd, &l) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_lock_taken_on_one_host_holds_on_the_other() {
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    fs::write(h1.path("f"), b"x").unwrap();
    let (f1, f2) = (rw(&h1.path("f")), rw(&h2.path("f")));
    posix_lock(&f1, libc::F_WRLCK, false).unwrap();
    assert_eq!(posix_lock(&f2, libc::F_WRLCK, false).unwrap_err().raw_os_error(), Some(libc::EAGAIN));
    assert_eq!(posix_lock(&f2, libc::F_RDLCK, false).unwrap_err().raw_os_error(), Some(libc::EAGAIN));
    let mut l = libc::flock { l_type: libc::F_RDLCK as i16, l_whence: 0, l_start: 10, l_len: 5, l_pid: 0 };
    assert_eq!(unsafe { libc::fcntl(f2.as_raw_fd(), libc::F_GETLK, &mut l) }, 0);
    assert_eq!((l.l_type as i32, l.l_start, l.l_len), (libc::F_WRLCK, 0, 0));
    // The holder's close drops its lock.
    drop(f1);
    posix_lock(&f2, libc::F_WRLCK, false).unwrap();
    posix_lock(&f2, libc::F_UNLCK, false).unwrap();
    // flock too.
    let g1 = rw(&h1.path("f"));
    let g2 = rw(&h2.path("f"));
    assert_eq!(unsafe { libc::flock(g1.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    assert_eq!(unsafe { libc::flock(g2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EWOULDBLOCK));
    // (A close drops a flock too, but the kernel says so to the daemon after close returns.)
    assert_eq!(unsafe { libc::flock(g1.as_raw_fd(), libc::LOCK_UN) }, 0);
    assert_eq!(unsafe { libc::flock(g2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn appends_from_two_hosts_under_an_fcntl_lock_all_land() {
    const N: usize = 40;
    const REC: usize = 100;
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    File::create(h1.path("log")).unwrap();
    std::thread::scope(|s| {
        for (host, mnt) in [(1, &h1), (2, &h2)] {
            s.spawn(move || {
                let f = rw(&mnt.path("log"));
                for i in 0..N {
                    let mut rec = format!("host {host} record {i}").into_bytes();
                    rec.resize(REC - 1, b'.');
                    rec.push(b'\n');
                    posix_lock(&f, libc::F_WRLCK, true).unwrap();
                    let end = f.metadata().unwrap().len();
                    f.write_all_at(&rec, end).unwrap();
                    posix_lock(&f, libc::F_UNLCK, false).unwrap();
                }
            });
        }
    });
    for h in [&h1, &h2] {
        let text = fs::read_to_string(h.path("log")).unwrap();
        assert_eq!(text.len(), 2 * N * REC);
        let mut recs: Vec<&str> = text.lines().map(|l| l.trim_end_matches('.')).collect();
        recs.sort();
        let mut want: Vec<String> =
            (1..=2).flat_map(|host| (0..N).map(move |i| format!("host {host} record {i}"))).collect();
        want.sort();
        assert_eq!(recs, want);
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_file_open_on_one_host_survives_its_rename_and_unlink_on_the_other() {
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    let data = pattern(4, 9000);
    fs::write(h1.path("f"), &data).unwrap();
    let open1 = File::open(h1.path("f")).unwrap();
    fs::rename(h2.path("f"), h2.path("g")).unwrap();
    assert_eq!(fs::metadata(h1.path("f")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    assert_eq!(fs::read(h1.path("g")).unwrap(), data);
    let mut buf = vec![0u8; data.len()];
    open1.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data);
    fs::remove_file(h2.path("g")).unwrap();
    assert_eq!(fs::metadata(h1.path("g")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    open1.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data, "an open file is read to its end after its last name is gone");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn recovery_after_a_kill_never_undoes_a_later_write_of_the_other_host() {
    let fleet = Fleet::new(true);
    let mut h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    let base = pattern(5, 3 * 4096);
    fs::write(h1.path("f"), &base).unwrap();
    // Host 1's last change to the file is an overwrite of block 1, still in its journal
    // when it is killed.
    let f = rw(&h1.path("f"));
    f.write_all_at(&[b'1'; 4096], 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    h1.kill9();
    drop(h1);
    // Host 2 writes the same block afterwards, and appends.
    let f = rw(&h2.path("f"));
    f.write_all_at(&[b'2'; 4096], 4096).unwrap();
    f.write_all_at(&[b'3'; 100], 3 * 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let h1 = fleet.mount(1);
    let mut want = base;
    want[4096..8192].fill(b'2');
    want.extend_from_slice(&[b'3'; 100]);
    assert_eq!(fs::read(h1.path("f")).unwrap(), want);
    assert_eq!(fs::read(h2.path("f")).unwrap(), want);
    assert!(!h1.log_text().contains("crash recovery: "), "{}", h1.log_text());
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_torn_write_of_a_killed_host_is_still_finished_on_a_shared_volume() {
    let fleet = Fleet::new(true);
    let mut h1 = fleet.mount(1);
    let base = pattern(6, 2 * 4096);
    fs::write(h1.path("f"), &base).unwrap();
    let f = rw(&h1.path("f"));
    f.write_all_at(&[b'1'; 4096], 0).unwrap();
    drop(f);
    h1.kill9();
    drop(h1);
    // A crash tore block 0: half of it is old bytes.
    let backing = fleet.backing_file();
    let stored = rw(&backing);
    let mut half = vec![0u8; 2048];
    stored.read_exact_at(&mut half, HEADER + 2048).unwrap();
    half.iter_mut().for_each(|b| *b ^= 0x5a);
    stored.write_all_at(&half, HEADER + 2048).unwrap();
    drop(stored);
    let h1 = fleet.mount(1);
    let mut want = base;
    want[..4096].fill(b'1');
    assert_eq!(fs::read(h1.path("f")).unwrap(), want);
    assert!(h1.log_text().contains("finished from the journal"), "{}", h1.log_text());
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_key_rotation_and_rewrap_on_one_host_reach_the_other_without_a_remount() {
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    fs::write(h1.path("old"), b"before the rotation").unwrap();
    let out = cli_with_trust(&fleet.trust(1), &[&"key", &"rotate", &"--key-file", &fleet.key, &fleet.backing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Each host makes a file under the new KEK version; the other opens it.
    fs::write(h1.path("new1"), b"made on host 1").unwrap();
    fs::write(h2.path("new2"), b"made on host 2").unwrap();
    assert_eq!(fs::read(h2.path("new1")).unwrap(), b"made on host 1");
    assert_eq!(fs::read(h1.path("new2")).unwrap(), b"made on host 2");
    for name in ["new1", "new2"] {
        let out = cli_with_trust(
            &fleet.trust(1),
            &[&"inspect", &"--volume", &fleet.backing, &"--key-file", &fleet.key, &name],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("KEK \"local\" version 2"), "{name}: {text}");
    }
    let out = cli_with_trust(&fleet.trust(2), &[&"rekey", &"--rewrap", &"--key-file", &fleet.key, &fleet.backing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for h in [&h1, &h2] {
        assert_eq!(fs::read(h.path("old")).unwrap(), b"before the rotation");
        assert_eq!(fs::read(h.path("new1")).unwrap(), b"made on host 1");
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn long_names_are_changed_under_a_lock_every_host_sees() {
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    let long = "n".repeat(220);
    let lock_file = fleet.backing.join("envelopefs.lock");
    let third = rw(&lock_file);
    hold(&third, 1, 1);
    std::thread::scope(|s| {
        s.spawn(|| fs::write(h1.path(&long), b"a long name").unwrap());
        wait_for_waiters(&lock_file, 1);
        drop(third);
    });
    assert_eq!(fs::read(h2.path(&long)).unwrap(), b"a long name");
    let names: Vec<String> =
        fs::read_dir(&h2.mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, [long.clone()]);
    fs::remove_file(h2.path(&long)).unwrap();
    assert_eq!(fs::read_dir(&h1.mnt).unwrap().count(), 0);
    let left: Vec<_> = fs::read_dir(&fleet.backing).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 3, "only the volume's own files are left: {left:?}");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn long_symlink_targets_made_on_two_hosts_at_once_read_back_on_both() {
    let fleet = Fleet::new(true);
    let h1 = fleet.mount(1);
    let h2 = fleet.mount(2);
    // Too long for a backing symlink: kept in the volume's target store, one file per
    // target, which both hosts write at once.
    let target = format!("/{}", "t/".repeat(1500));
    std::thread::scope(|s| {
        for (n, h) in [(1, &h1), (2, &h2)] {
            let target = &target;
            s.spawn(move || {
                for i in 0..20 {
                    std::os::unix::fs::symlink(target, h.path(&format!("l{n}-{i}"))).unwrap();
                }
            });
        }
    });
    for h in [&h1, &h2] {
        for n in 1..=2 {
            for i in 0..20 {
                assert_eq!(fs::read_link(h.path(&format!("l{n}-{i}"))).unwrap(), PathBuf::from(&target));
            }
        }
    }
}
