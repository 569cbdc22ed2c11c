//! Mounts served over io_uring (`--io-uring`): the requests really come over the ring, the
//! files behave as over /dev/fuse, the kernel's refusal falls back to /dev/fuse with one
//! warning, and a killed daemon leaves a mount that fails instead of hanging.
//!
//! Each test sets /sys/module/fuse/parameters/enable_uring and puts the old value back.

use crate::common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{cli, pattern, Mounted, TestVolume};

const ENABLE: &str = "/sys/module/fuse/parameters/enable_uring";

/// Tests of this file change one kernel parameter: one at a time.
static PARAMETER: Mutex<()> = Mutex::new(());

/// enable_uring set for as long as this lives, then put back.
struct EnableUring {
    before: String,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl EnableUring {
    fn set(on: bool) -> Self {
        let guard = PARAMETER.lock().unwrap_or_else(|e| e.into_inner());
        let before = fs::read_to_string(ENABLE).expect("a kernel with CONFIG_FUSE_IO_URING");
        fs::write(ENABLE, if on { "Y" } else { "N" }).unwrap();
        EnableUring { before: before.trim().to_owned(), _one_at_a_time: guard }
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = fs::write(ENABLE, &self.before);
    }
}

/// `envelopefs status --json` of the mount, as text.
fn status(m: &Mounted) -> String {
    let out = cli(&[&"status", &m.mnt, &"--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A number field of the status JSON.
fn field(json: &str, name: &str) -> u64 {
    let at = json.find(&format!("\"{name}\": ")).unwrap_or_else(|| panic!("no {name} in {json}")) + name.len() + 4;
    json[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
}

/// The mount asked for io_uring and got /dev/fuse: no request came over a ring, and one
/// warning, saying `why`, was logged. Unmounts it.
fn served_over_dev_fuse(m: Mounted, why: &str) {
    let st = status(&m);
    assert!(st.contains("\"transport\": \"/dev/fuse\""), "{st}");
    assert_eq!(field(&st, "ring_requests"), 0);
    let log = m.log_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains(why), "{log}");
    assert!(m.unmount().success());
}

/// What a user does with a mount, checked as it goes.
fn file_work(m: &Mounted) {
    fs::write(m.path("a.txt"), b"hello ring").unwrap();
    assert_eq!(fs::read(m.path("a.txt")).unwrap(), b"hello ring");
    fs::create_dir(m.path("dir")).unwrap();
    fs::rename(m.path("a.txt"), m.path("dir/b.txt")).unwrap();
    assert!(!m.path("a.txt").exists());
    assert_eq!(fs::read(m.path("dir/b.txt")).unwrap(), b"hello ring");
    // A few MiB through 1 MiB writes and reads, and one byte changed in its middle.
    let big = pattern(7, 5 * 1024 * 1024 + 123);
    fs::write(m.path("dir/big"), &big).unwrap();
    let mut back = Vec::new();
    File::open(m.path("dir/big")).unwrap().read_to_end(&mut back).unwrap();
    assert!(back == big, "the big file read back differs");
    let mut f = fs::OpenOptions::new().write(true).open(m.path("dir/big")).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"X", 3 << 20).unwrap();
    f.flush().unwrap();
    f.sync_all().unwrap();
    drop(f);
    let back = fs::read(m.path("dir/big")).unwrap();
    assert_eq!(back.len(), big.len());
    assert_eq!(back[3 << 20], b'X');
    assert_eq!(back[..3 << 20], big[..3 << 20]);
    // Listing, symlinks, hard links, modes, truncation, xattrs, statfs.
    let mut names: Vec<String> =
        fs::read_dir(m.path("dir")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["b.txt", "big"]);
    std::os::unix::fs::symlink("dir/b.txt", m.path("link")).unwrap();
    assert_eq!(fs::read_link(m.path("link")).unwrap(), Path::new("dir/b.txt"));
    assert_eq!(fs::read(m.path("link")).unwrap(), b"hello ring");
    fs::hard_link(m.path("dir/b.txt"), m.path("hard")).unwrap();
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 2);
    fs::set_permissions(m.path("hard"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.path("dir/b.txt")).unwrap().mode() & 0o777, 0o640);
    fs::OpenOptions::new().write(true).open(m.path("hard")).unwrap().set_len(5).unwrap();
    assert_eq!(fs::read(m.path("dir/b.txt")).unwrap(), b"hello");
    let ok = |c: &mut std::process::Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(std::process::Command::new("setfattr").args(["-n", "user.color", "-v", "blue"]).arg(m.path("hard")));
    let got = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "user.color"])
        .arg(m.path("hard"))
        .output()
        .unwrap();
    assert_eq!(got.stdout, b"blue");
    ok(std::process::Command::new("setfattr").args(["-x", "user.color"]).arg(m.path("hard")));
    assert!(rustix::fs::statvfs(&m.mnt).unwrap().f_blocks > 0);
    // A name that is not there: ENOENT (the negative entry) twice.
    for _ in 0..2 {
        assert_eq!(fs::metadata(m.path("nothing")).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
    fs::remove_file(m.path("hard")).unwrap();
    fs::remove_file(m.path("link")).unwrap();
    fs::remove_file(m.path("dir/b.txt")).unwrap();
    fs::remove_file(m.path("dir/big")).unwrap();
    fs::remove_dir(m.path("dir")).unwrap();
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn with_io_uring_the_requests_come_over_the_ring_and_files_behave() {
    let _on = EnableUring::set(true);
    let vol = TestVolume::new(4096);
    let m = vol.mount(&["--io-uring"]);
    assert!(m.log_text().contains("serving FUSE requests over io_uring"), "{}", m.log_text());
    let before = status(&m);
    assert!(before.contains("\"transport\": \"io_uring\""), "{before}");
    file_work(&m);
    let after = status(&m);
    let (ring, writes) = (field(&after, "ring_requests"), field(&after, "write"));
    assert!(ring > field(&before, "ring_requests") + 100, "{after}");
    assert!(writes >= 5, "5 MiB in 1 MiB writes: {after}");
    assert!(!m.log_text().contains("WARN"), "{}", m.log_text());
    assert!(m.unmount().success());
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn the_io_uring_word_of_dash_o_asks_for_the_ring_too() {
    let _on = EnableUring::set(true);
    let vol = TestVolume::new(4096);
    let m = vol.mount(&["-o", "io_uring"]);
    fs::write(m.path("f"), b"x").unwrap();
    assert!(status(&m).contains("\"transport\": \"io_uring\""));
    assert!(m.unmount().success());
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn when_the_kernel_refuses_the_ring_the_mount_is_served_over_dev_fuse_and_says_why() {
    let _off = EnableUring::set(false);
    let vol = TestVolume::new(4096);
    let m = vol.mount(&["--io-uring"]);
    file_work(&m);
    served_over_dev_fuse(m, "echo Y > /sys/module/fuse/parameters/enable_uring");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_killed_io_uring_daemon_leaves_a_mount_that_fails_instead_of_hanging() {
    let _on = EnableUring::set(true);
    let vol = TestVolume::new(4096);
    let mut m = vol.mount(&["--io-uring", "--no-writeback-cache"]);
    // Requests in flight while it dies: a writer and a reader of the mount.
    let (path, stop) = (m.path("busy"), std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let (p, s) = (path.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let Ok(mut f) = File::create(&p) else { return };
        while !s.load(std::sync::atomic::Ordering::Relaxed) && f.write_all(&[7u8; 65536]).is_ok() {}
    });
    std::thread::sleep(Duration::from_millis(300));
    m.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // The kernel ends the connection: every access fails, none waits. (A request the
    // ring had queued when the daemon died ends with ECONNABORTED, later ones ENOTCONN.)
    let (tx, rx) = std::sync::mpsc::channel();
    let mnt = m.mnt.clone();
    // statfs always asks the daemon (a stat may be answered from the attribute cache).
    let statfs = |p: &Path| rustix::fs::statvfs(p).map(drop).map_err(|e| e.raw_os_error());
    std::thread::spawn(move || tx.send(statfs(&mnt)).unwrap());
    let start = Instant::now();
    let got = rx.recv_timeout(Duration::from_secs(10)).expect("a statfs of the dead mount hung");
    assert!([libc::ENOTCONN, libc::ECONNABORTED].contains(&got.unwrap_err()), "{got:?}");
    assert_eq!(statfs(&m.mnt), Err(libc::ENOTCONN));
    assert!(start.elapsed() < Duration::from_secs(10));
    writer.join().unwrap();
    drop(m);
    // Detached (as the next `mount` would), a new daemon serves again, over the ring.
    let m = vol.mount(&["--io-uring"]);
    fs::write(m.path("again"), b"up").unwrap();
    assert!(status(&m).contains("\"transport\": \"io_uring\""));
    assert!(m.unmount().success());
}

/// Locks reach the daemon only on a shared volume, and a granted lock's page invalidation
/// could wait on a write queued behind its own ring thread: such a volume stays on
/// /dev/fuse, and says so once.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_shared_volume_is_served_over_dev_fuse_even_when_io_uring_is_asked_for() {
    let _on = EnableUring::set(true);
    let vol = TestVolume::new(4096);
    // A shared volume beside the one TestVolume made, under the same key file.
    let backing = vol.dir.path().join("shared");
    fs::create_dir(&backing).unwrap();
    let out = cli(&[&"init", &"--key-file", &vol.key, &"--shared", &backing]);
    assert!(out.status.success(), "init --shared: {}", String::from_utf8_lossy(&out.stderr));
    let m = Mounted::start(&backing, &vol.key, &vol.dir.path().join("mnt-shared"), &["--io-uring"]);
    fs::write(m.path("f"), b"on a shared volume").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"on a shared volume");
    served_over_dev_fuse(m, "a shared volume is served over /dev/fuse");
}

/// The kernel uses the ring only once every queue has an entry, and holds every request
/// until then: a queue whose threads never start (here by the daemon's fault-injection
/// switch) must turn the ring off, or the mount would answer nothing.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_queue_left_without_a_thread_turns_the_ring_off_instead_of_holding_every_request() {
    let _on = EnableUring::set(true);
    let vol = TestVolume::new(4096);
    let m = Mounted::start_trusting(
        &common::trust_dir(),
        &vol.backing,
        "--key-file",
        &vol.key,
        &vol.dir.path().join("mnt"),
        &["--io-uring"],
        |c| {
            c.env("ENVELOPEFS_TEST_URING_UNSERVED_QUEUE", "0");
        },
    );
    file_work(&m);
    served_over_dev_fuse(m, "queues have a thread, so the mount is served over /dev/fuse");
}
