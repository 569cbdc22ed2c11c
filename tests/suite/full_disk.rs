//! A full backing disk is an error, never a loss: on a small tmpfs, writes that find no
//! space fail with ENOSPC, and every byte fsynced before the disk filled reads back, in
//! every cache and journal mode, before and after a remount, with fsck clean.

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use envelopefs::volume::{self, InitOptions};

/// A tmpfs of `mib` MiB, unmounted when dropped (after whatever is mounted above it).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn new(at: PathBuf, mib: u32) -> Self {
        fs::create_dir_all(&at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        SmallDisk(at)
    }

    /// Fill it with a file outside the volume until a write fails with ENOSPC.
    fn fill(&self) {
        let mut f = File::create(self.0.join("filler")).unwrap();
        let chunk = vec![0x5au8; 64 << 10];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                    break;
                }
            }
        }
        // Small writes take the last partial page too.
        while f.write(&[1u8; 512]).map(|n| n > 0).unwrap_or(false) {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A volume whose backing directory is on a fresh 8 MiB tmpfs.
fn volume_on_small_disk() -> (TestVolume, SmallDisk) {
    let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let disk = SmallDisk::new(dir.path().join("disk"), 8);
    let backing = disk.0.join("backing");
    fs::create_dir(&backing).unwrap();
    let key = new_key_file(dir.path());
    let opts = InitOptions { block_size: 4096, trust: test_trust(), ..InitOptions::default() };
    volume::init(&backing, &TestVolume::source_for(&key), &opts).unwrap();
    (TestVolume { dir, backing, key }, disk)
}

/// `pwrite` then `fsync`; the first errno, if any.
fn write_sync(f: &File, data: &[u8], at: Option<u64>) -> Result<(), i32> {
    let r = match at {
        Some(off) => f.write_all_at(data, off),
        None => (&*f).write_all(data),
    };
    r.and_then(|_| f.sync_all()).map_err(|e| e.raw_os_error().unwrap_or(0))
}

fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(p).unwrap().read_to_end(&mut v).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    v
}

/// What one file must read back as: bytes that were durable before the disk filled, and
/// ranges a failed write may have changed to its own bytes (block by block, as the kernel
/// may write some pages of it back before the one that finds no space).
struct Expect {
    durable: Vec<u8>,
    maybe: Vec<(u64, Vec<u8>)>,
}

impl Expect {
    fn check(&self, name: &str, got: &[u8]) {
        for (i, &b) in got.iter().enumerate() {
            let i = i as u64;
            let old = self.durable.get(i as usize).copied();
            let new = self
                .maybe
                .iter()
                .find(|(off, d)| i >= *off && i < off + d.len() as u64)
                .map(|(off, d)| d[(i - off) as usize]);
            assert!(
                // Past what was durable, a live mount may read zeros where the kernel's cached
                // size ran ahead of a write-back that failed.
                Some(b) == old || Some(b) == new || (old.is_none() && b == 0),
                "{name}: byte {i} is {b:#x}, was {old:?}, a failed write had {new:?}"
            );
        }
        assert!(got.len() >= self.durable.len(), "{name}: {} bytes, {} were durable", got.len(), self.durable.len());
    }
}

fn run(extra: &[&str]) {
    let (vol, disk) = volume_on_small_disk();
    let m = vol.mount(extra);
    let tail = pattern(1, 6000); // a partial last block
    let big = pattern(2, 100 << 10);
    let small = b"fits".to_vec();
    for (name, data) in [("tail", &tail), ("big", &big), ("small", &small)] {
        let f = File::create(m.path(name)).unwrap();
        write_sync(&f, data, Some(0)).unwrap();
    }
    disk.fill();

    let mut errnos = Vec::new();
    // An append that grows the partial last block and adds many more.
    let append = pattern(3, 200_000);
    let f = OpenOptions::new().append(true).open(m.path("tail")).unwrap();
    errnos.push(("append", write_sync(&f, &append, None)));
    drop(f);
    // A large write that starts inside the file and runs far past its end.
    let large = pattern(4, 1 << 20);
    let f = OpenOptions::new().write(true).open(m.path("big")).unwrap();
    errnos.push(("large write", write_sync(&f, &large, Some(50 << 10))));
    drop(f);
    // A write into the middle of a block.
    let mid = pattern(5, 100);
    let f = OpenOptions::new().write(true).open(m.path("small")).unwrap();
    let mid_res = write_sync(&f, &mid, Some(2));
    drop(f);
    // A new file on a full disk.
    let fresh = pattern(6, 20_000);
    let fresh_res = File::create(m.path("fresh"))
        .map_err(|e| e.raw_os_error().unwrap())
        .and_then(|f| write_sync(&f, &fresh, Some(0)));

    for (what, r) in &errnos {
        assert_eq!(*r, Err(libc::ENOSPC), "{what} on a full disk ({extra:?})");
    }
    if let Err(e) = mid_res {
        assert_eq!(e, libc::ENOSPC, "write in a block ({extra:?})");
    }
    if let Err(e) = fresh_res {
        assert_eq!(e, libc::ENOSPC, "new file ({extra:?})");
    }
    let tail_x = Expect { durable: tail.clone(), maybe: vec![(tail.len() as u64, append.clone())] };
    let big_x = Expect { durable: big.clone(), maybe: vec![(50 << 10, large.clone())] };
    let small_x = Expect { durable: small.clone(), maybe: vec![(2, mid.clone())] };
    let fresh_x = Expect { durable: Vec::new(), maybe: vec![(0, fresh.clone())] };
    let check = |root: &Path| {
        tail_x.check("tail", &read_all(&root.join("tail")));
        big_x.check("big", &read_all(&root.join("big")));
        small_x.check("small", &read_all(&root.join("small")));
        if root.join("fresh").exists() {
            fresh_x.check("fresh", &read_all(&root.join("fresh")));
        }
    };
    check(&m.mnt);
    assert!(m.log_text().contains("No space left on device"), "the log says why: {}", m.log_text());
    m.unmount();

    disk.free();
    let out = cli(&[&"fsck", &"--key-file", &vol.key, &vol.backing]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fsck after the disk filled ({extra:?}): {text}");
    let m = vol.mount(extra);
    check(&m.mnt);
    // With space again, the files take writes as before.
    let f = OpenOptions::new().append(true).open(m.path("tail")).unwrap();
    write_sync(&f, b"more", None).unwrap();
    drop(f);
    m.unmount();
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_full_disk_loses_nothing_with_the_writeback_cache() {
    run(&[]);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_full_disk_loses_nothing_without_the_writeback_cache() {
    run(&["--no-writeback-cache"]);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_full_disk_loses_nothing_with_a_synced_journal() {
    run(&["--journal", "sync"]);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_full_disk_loses_nothing_without_a_journal() {
    run(&["--no-writeback-cache", "--journal", "off"]);
}

/// With the writeback cache (the default) write(2) only fills the page cache, so a full
/// disk cannot fail it: a new file fails at its create (so a shell's `>` fails), and a
/// write to an existing file fails at close, without fsync, as ENOSPC.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn with_the_writeback_cache_a_full_disk_fails_the_create_and_the_close() {
    let (vol, disk) = volume_on_small_disk();
    let m = vol.mount(&[]);
    let kept = pattern(9, 6000);
    for name in ["kept", "scratch"] {
        write_sync(&File::create(m.path(name)).unwrap(), &kept, Some(0)).unwrap();
    }
    disk.fill();

    let e = File::create(m.path("new.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "create: {e}");
    let sh = std::process::Command::new("sh").arg("-c").arg("echo hi > new.txt").current_dir(&m.mnt).output().unwrap();
    assert!(!sh.status.success(), "echo hi > new.txt on a full disk");
    assert!(String::from_utf8_lossy(&sh.stderr).contains("No space left on device"), "{sh:?}");
    assert!(!m.path("new.txt").exists());
    assert!(m.log_text().contains("no room for a new file"), "{}", m.log_text());

    let more = pattern(10, 100_000);
    let f = OpenOptions::new().append(true).open(m.path("kept")).unwrap();
    (&f).write_all(&more).expect("write(2) goes to the page cache");
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    // SAFETY: closing the descriptor just taken out of its File.
    let closed = unsafe { libc::close(fd) };
    assert_eq!((closed, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENOSPC)), "close");

    // Truncating an existing file frees its space: not refused.
    drop(OpenOptions::new().write(true).truncate(true).open(m.path("scratch")).unwrap());
    let kept_x = Expect { durable: kept.clone(), maybe: vec![(kept.len() as u64, more)] };
    kept_x.check("kept", &read_all(&m.path("kept")));
    m.unmount();

    disk.free();
    let out = cli(&[&"fsck", &"--key-file", &vol.key, &vol.backing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let m = vol.mount(&[]);
    kept_x.check("kept", &read_all(&m.path("kept")));
    assert!(!m.path("new.txt").exists());
    m.unmount();
}

/// Without the writeback cache each write(2) reaches the daemon, which fails it.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn without_the_writeback_cache_write_itself_fails_with_enospc() {
    let (vol, disk) = volume_on_small_disk();
    let m = vol.mount(&["--no-writeback-cache"]);
    let kept = pattern(11, 6000);
    write_sync(&File::create(m.path("kept")).unwrap(), &kept, Some(0)).unwrap();
    disk.fill();
    let f = OpenOptions::new().append(true).open(m.path("kept")).unwrap();
    let e = (&f).write_all(&pattern(12, 100_000)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "write(2): {e}");
    drop(f);
    assert_eq!(read_all(&m.path("kept")), kept);
    m.unmount();
}

/// The trust directory full (it holds the crash journal): a change whose record cannot be
/// written fails with ENOSPC before anything in the backing directory is touched.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_full_trust_directory_fails_writes_with_enospc_and_loses_nothing() {
    let vol = TestVolume::new(4096);
    let disk = SmallDisk::new(vol.dir.path().join("trust-disk"), 8);
    let trust = disk.0.join("trust");
    fs::create_dir(&trust).unwrap();
    let mnt = vol.dir.path().join("mnt");
    let m =
        Mounted::start_trusting(&trust, &vol.backing, "--key-file", &vol.key, &mnt, &["--no-writeback-cache"], |_| {});
    let kept = pattern(7, 6000);
    let f = File::create(m.path("kept")).unwrap();
    write_sync(&f, &kept, Some(0)).unwrap();
    disk.fill();
    assert_eq!(
        write_sync(&f, &pattern(8, 100_000), Some(3000)),
        Err(libc::ENOSPC),
        "a write with no room to journal it"
    );
    drop(f);
    assert_eq!(read_all(&m.path("kept")), kept, "nothing was touched");
    assert!(m.log_text().contains("No space left on device"), "{}", m.log_text());
    disk.free();
    m.unmount();
    let out = cli_with_trust(&trust, &[&"fsck", &"--key-file", &vol.key, &vol.backing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
