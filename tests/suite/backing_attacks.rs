//! Attacks from the backing directory: it is untrusted storage (a sync service, an NFS
//! server can write it), and the attacker waits for the admin to run `mount`, `fsck`,
//! `rekey`. Each test plays the attack against the real binary and checks that it fails.

use crate::common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cli, pattern, TestVolume, HEADER, STORED};

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Swaps two names atomically (RENAME_EXCHANGE) in a loop until dropped.
struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Swapper {
    fn start(a: &Path, b: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b, s) = (cstr(a), cstr(b), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut swaps = 0;
            while !s.load(Ordering::Relaxed) {
                // SAFETY: both are valid NUL-terminated paths that outlive the call.
                let r = unsafe {
                    libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE)
                };
                swaps += u64::from(r == 0);
            }
            swaps
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stop swapping; returns how many swaps were made.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `d` is a directory of the volume and `d_link` a symlink to `outside`; the attacker
/// keeps exchanging the two names while the admin's tool runs.
fn swapped_dir(v: &TestVolume) -> (PathBuf, Swapper) {
    let outside = v.dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::create_dir(v.backing.join("d")).unwrap();
    std::os::unix::fs::symlink(&outside, v.backing.join("d_link")).unwrap();
    let s = Swapper::start(&v.backing.join("d"), &v.backing.join("d_link"));
    (outside, s)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Item: path races in the offline tools. `fsck --repair` cuts a torn last block with no
/// key needed; a directory swapped for a symlink between the listing and the repair once
/// made it cut a file outside the volume.
#[test]
fn fsck_repair_through_a_swapped_directory_leaves_outside_files_alone() {
    let v = TestVolume::new(4096);
    let (outside, swapper) = swapped_dir(&v);
    // A file with a torn trailing fragment (10 bytes after the header): what repair cuts.
    let torn = pattern(1, HEADER as usize + 10);
    fs::write(outside.join("f"), &torn).unwrap();
    fs::write(v.backing.join("d/f"), &torn).unwrap();
    let start = Instant::now();
    let mut runs = 0;
    while runs < 200 && start.elapsed() < Duration::from_secs(20) {
        runs += 1;
        let out = cli(&[&"fsck", &"--repair", &"--key-file", &v.key, &v.backing]);
        assert!(out.status.code().is_some(), "fsck crashed: {}", text(&out));
        assert!(
            fs::read(outside.join("f")).unwrap() == torn,
            "fsck --repair cut a file outside the volume (run {runs})"
        );
        // Give the inside file its torn fragment back, wherever the swap left it.
        for d in ["d", "d_link"] {
            let p = v.backing.join(d).join("f");
            if fs::symlink_metadata(v.backing.join(d)).is_ok_and(|m| m.is_dir()) {
                let _ = fs::write(p, &torn);
            }
        }
    }
    assert!(swapper.stop() > 1000, "the attacker did not get to swap");
    assert!(fs::read(outside.join("f")).unwrap() == torn);
}

/// The same race against `rekey --reencrypt`, which reads a file, writes a temporary beside
/// it and renames it over the original: through a swapped directory that replaced a file
/// outside the volume (here a copy of one of the volume's envelopes, so it decrypts).
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn reencrypt_through_a_swapped_directory_leaves_outside_files_alone() {
    let v = TestVolume::new(4096);
    {
        let m = v.mount(&[]);
        fs::write(m.path("seed"), pattern(2, 3 * 4096 + 5)).unwrap();
        m.unmount();
    }
    let (outside, swapper) = swapped_dir(&v);
    let envelope = fs::read(v.backing.join("seed")).unwrap();
    fs::write(outside.join("f"), &envelope).unwrap();
    fs::rename(v.backing.join("seed"), v.backing.join("d/f")).unwrap_or_else(|_| {
        fs::write(v.backing.join("d_link/f"), &envelope).unwrap();
    });
    let start = Instant::now();
    let mut runs = 0;
    while runs < 100 && start.elapsed() < Duration::from_secs(30) {
        runs += 1;
        let out = cli(&[&"rekey", &"--reencrypt", &"--key-file", &v.key, &v.backing]);
        assert!(out.status.code().is_some(), "rekey crashed: {}", text(&out));
        let names: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["f"], "rekey --reencrypt wrote into a directory outside the volume (run {runs})");
        assert!(
            fs::read(outside.join("f")).unwrap() == envelope,
            "rekey --reencrypt replaced a file outside the volume (run {runs})"
        );
    }
    assert!(swapper.stop() > 1000, "the attacker did not get to swap");
}

/// Item: re-encryption leaves written all-zero blocks as holes (revealing which blocks are
/// zero, and leaving them unauthenticated). After the fix every block that was sealed is
/// sealed again; never-written regions stay holes, as the normal write path leaves them.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn reencrypt_seals_zero_blocks() {
    let v = TestVolume::new(4096);
    let mut data = pattern(3, 3 * 4096);
    data[4096..8192].fill(0);
    {
        let m = v.mount(&[]);
        fs::write(m.path("zeros"), &data).unwrap();
        // Grown by truncate: never written, a hole in the normal write path too.
        fs::File::create(m.path("sparse")).unwrap().set_len(2 * 4096).unwrap();
        m.unmount();
    }
    let block = |name: &str, i: u64| {
        let mut b = vec![0u8; STORED as usize];
        fs::File::open(v.backing.join(name)).unwrap().read_exact_at(&mut b, HEADER + i * STORED).unwrap();
        b
    };
    assert!(block("zeros", 1).iter().any(|&b| b != 0), "the write path seals written zeros");
    let out = cli(&[&"rekey", &"--reencrypt", &"--key-file", &v.key, &v.backing]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 files changed"), "{}", text(&out));
    assert!(block("zeros", 1).iter().any(|&b| b != 0), "re-encryption left a written zero block as a hole");
    assert!(block("sparse", 0).iter().all(|&b| b == 0), "a never-written block stays a hole");
    assert!(block("sparse", 1).iter().all(|&b| b == 0), "a never-written block stays a hole");

    let m = v.mount(&[]);
    assert!(fs::read(m.path("zeros")).unwrap() == data);
    assert!(fs::read(m.path("sparse")).unwrap() == vec![0u8; 2 * 4096]);
    drop(m);
    // Tamper one byte of the re-sealed zero block: reading it fails, it is not zeros.
    let f = fs::OpenOptions::new().write(true).open(v.backing.join("zeros")).unwrap();
    let mut b = block("zeros", 1);
    b[100] ^= 1;
    f.write_all_at(&b, HEADER + STORED).unwrap();
    drop(f);
    let m = v.mount(&[]);
    let mut buf = vec![0u8; 4096];
    let e = fs::File::open(m.path("zeros")).unwrap().read_exact_at(&mut buf, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let mut first = vec![0u8; 4096];
    fs::File::open(m.path("zeros")).unwrap().read_exact_at(&mut first, 0).unwrap();
    assert!(first == data[..4096]);
}

/// Item: copies of one backing file share its file id and data key; fsck says so.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn fsck_reports_files_that_share_a_file_id() {
    let v = TestVolume::new(4096);
    {
        let m = v.mount(&[]);
        fs::write(m.path("orig"), pattern(4, 5000)).unwrap();
        fs::write(m.path("other"), pattern(5, 5000)).unwrap();
        fs::hard_link(m.path("other"), m.path("other-link")).unwrap();
        m.unmount();
    }
    fs::create_dir(v.backing.join("sub")).unwrap();
    fs::copy(v.backing.join("orig"), v.backing.join("sub/copy")).unwrap();
    let out = cli(&[&"fsck", &"--key-file", &v.key, &v.backing]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("PROBLEM")).collect();
    assert_eq!(lines.len(), 1, "one problem, and hard links are not copies: {t}");
    let (orig, copy) = (v.backing.join("orig"), v.backing.join("sub/copy"));
    assert!(
        lines[0].contains(&*orig.to_string_lossy())
            && lines[0].contains(&*copy.to_string_lossy())
            && lines[0].contains("file id"),
        "{t}"
    );
    // What the line advises: the copy gets its own file id and key.
    let out = cli(&[&"rekey", &"--reencrypt", &"--key-file", &v.key, &v.backing, &copy]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&[&"fsck", &"--key-file", &v.key, &v.backing]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Item: status sockets are removed when the mount goes away.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn status_socket_is_removed_on_unmount() {
    let v = TestVolume::new(4096);
    let run = v.dir.path().join("run");
    // The runtime directory is given to this daemon and this status query only: the suites
    // share one process, and its environment.
    let m = common::Mounted::start_trusting(
        &common::trust_dir(),
        &v.backing,
        "--key-file",
        &v.key,
        &v.dir.path().join("mnt"),
        &[],
        |c| {
            c.env("ENVELOPEFS_RUNTIME_DIR", &run);
        },
    );
    let socket = || {
        fs::read_dir(&run)
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path()).find(|p| p.extension() == Some("sock".as_ref())))
    };
    let start = Instant::now();
    let sock = loop {
        if let Some(s) = socket() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no status socket in {}", run.display());
        std::thread::sleep(Duration::from_millis(20));
    };
    let out =
        common::bin().env("ENVELOPEFS_RUNTIME_DIR", &run).args(["status", "--json"]).arg(&m.mnt).output().unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["pid"].as_i64(), Some(m.pid() as i64), "{st}");
    assert!(m.unmount().success());
    assert!(fs::symlink_metadata(&sock).is_err(), "status socket {} left after unmount", sock.display());
}

fn as_nobody(cmd: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new("setpriv");
    // A system PATH: the caller's may lead through directories uid 65534 cannot enter.
    c.env("PATH", "/usr/local/bin:/usr/bin:/bin").args(["--reuid=65534", "--regid=65534", "--clear-groups", cmd]);
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

fn allow_other_volume() -> (TestVolume, common::Mounted) {
    let v = TestVolume::new(4096);
    // Let uid 65534 reach the mount point.
    fs::set_permissions(v.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = v.mount(&["--allow-other", "--trust-backing-permissions"]);
    (v, m)
}

/// Item: new objects belong to their creator, with set-gid group inheritance and set-id
/// bits as requested. The daemon creates them with the caller's filesystem ids (or, for
/// regular files, chowns the descriptor it created), never by name afterwards.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn allow_other_creates_are_owned_by_the_caller() {
    let (v, m) = allow_other_volume();
    fs::create_dir(m.path("pub")).unwrap();
    fs::set_permissions(m.path("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(m.path("sg")).unwrap();
    std::os::unix::fs::chown(m.path("sg"), None, Some(100)).unwrap();
    fs::set_permissions(m.path("sg"), fs::Permissions::from_mode(0o2777)).unwrap();
    let code = "import os, sys\n\
                for d in sys.argv[1:]:\n\
                \x20   os.close(os.open(d + '/file', os.O_CREAT | os.O_WRONLY, 0o644))\n\
                \x20   os.close(os.open(d + '/setid', os.O_CREAT | os.O_WRONLY, 0o4755))\n\
                \x20   os.mkdir(d + '/dir', 0o755)\n\
                \x20   os.symlink('target', d + '/link')\n\
                \x20   os.mkfifo(d + '/fifo', 0o644)\n\
                \x20   os.mknod(d + '/node', 0o644 | 0o100000)\n";
    let out = as_nobody("python3", &[&"-c", &code, &m.path("pub"), &m.path("sg")]);
    assert!(out.status.success(), "{}", text(&out));
    for (dir, gid) in [("pub", 65534), ("sg", 100)] {
        for name in ["file", "setid", "dir", "link", "fifo", "node"] {
            let b = fs::symlink_metadata(v.backing.join(dir).join(name)).unwrap();
            let mnt = fs::symlink_metadata(m.path(&format!("{dir}/{name}"))).unwrap();
            assert_eq!((b.uid(), b.gid()), (65534, gid), "backing {dir}/{name}");
            assert_eq!((mnt.uid(), mnt.gid()), (65534, gid), "mounted {dir}/{name}");
        }
        let mode = |n: &str| fs::symlink_metadata(v.backing.join(dir).join(n)).unwrap().mode() & 0o7777;
        assert_eq!(mode("file"), 0o644, "{dir}");
        assert_eq!(mode("setid"), 0o4755, "{dir}: set-uid bit kept");
        let dmode = if dir == "sg" { 0o2755 } else { 0o755 };
        assert_eq!(mode("dir"), dmode, "{dir}: a set-gid parent makes set-gid directories");
    }
    // Write access through a supplementary group (which the daemon is never told): the
    // kernel checked it on the mount, the backing store does not refuse it.
    fs::create_dir(m.path("grp")).unwrap();
    std::os::unix::fs::chown(m.path("grp"), None, Some(100)).unwrap();
    fs::set_permissions(m.path("grp"), fs::Permissions::from_mode(0o770)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--groups=100", "mkdir"])
        .arg(m.path("grp/dir"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let b = fs::symlink_metadata(v.backing.join("grp/dir")).unwrap();
    assert_eq!((b.uid(), b.gid()), (65534, 65534));
}

/// Item: the creation race itself. The daemon used to create as root, then look the name
/// up again and chown what it found: an attacker exchanging a root-owned directory into
/// that name in between got it handed to the creating user. The window is a few syscalls
/// wide; the attacker below exchanges names non-stop while uid 65534 makes directories.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn allow_other_mkdir_race_does_not_give_away_another_directory() {
    let (v, m) = allow_other_volume();
    let public = v.backing.join("pub");
    fs::create_dir(&public).unwrap();
    fs::set_permissions(&public, fs::Permissions::from_mode(0o777)).unwrap();
    let victim = public.join("victim");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("marker"), b"root's").unwrap();
    let swapper = Swapper::start(&public.join("x"), &victim);
    // Stops early once the victim (seen in the backing directory) has changed hands.
    let code = "import os, sys, time\n\
                end = time.time() + float(sys.argv[3])\n\
                def given_away():\n\
                \x20   for n in ('x', 'victim'):\n\
                \x20       try: fd = os.open(sys.argv[2] + '/' + n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)\n\
                \x20       except OSError: continue\n\
                \x20       try:\n\
                \x20           if 'marker' in os.listdir(fd) and os.fstat(fd).st_uid != 0: return True\n\
                \x20       finally: os.close(fd)\n\
                \x20   return False\n\
                n = 0\n\
                while time.time() < end and not given_away():\n\
                \x20   n += 1\n\
                \x20   for f in (os.mkdir, os.rmdir):\n\
                \x20       try: f(sys.argv[1] + '/x')\n\
                \x20       except OSError: pass\n\
                print(n, 'attempts')\n";
    let out = as_nobody("python3", &[&"-c", &code, &m.path("pub"), &public, &"6"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(swapper.stop() > 0, "the attacker did not get to swap");
    let marked: Vec<_> = ["x", "victim"].iter().map(|n| public.join(n)).filter(|p| p.join("marker").exists()).collect();
    assert_eq!(marked.len(), 1);
    let owner = fs::symlink_metadata(&marked[0]).unwrap().uid();
    assert_eq!(owner, 0, "root's directory was handed to uid 65534 by a create ({})", text(&out).trim());
    // Before the fix the victim changed hands within a few dozen attempts.
    let attempts: u64 = text(&out).split_whitespace().next().unwrap().parse().unwrap();
    assert!(attempts > 1000, "only {attempts} creates were tried");
    drop(m);
}

/// Item: PKCS#11 error mapping. SoftHSM2 answers CKR_GENERAL_ERROR (also its word for a
/// token fault) when a wrapped key's GCM tag does not verify; the provider tells the two
/// apart with a round trip under the same key. A tampered wrapped key (CRC fixed up, so the
/// slot decodes) is a key that does not authenticate: EACCES, and the log says so. A token
/// fault cannot be provoked in SoftHSM2; its mapping to EIO is a unit test in the module.
#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2: --features fuse_tests,pkcs11_tests"
)]
fn pkcs11_tampered_wrapped_key_is_eacces_and_says_why() {
    let (dir, backing, pin, _) = common::pkcs11_volume("retire", "kek");
    let mnt = dir.path().join("mnt");
    let m = common::Mounted::start_with(&backing, "--pin-file", &pin, &mnt, &[]);
    fs::write(m.path("f"), b"secret").unwrap();
    m.unmount();
    let mut region = vec![0u8; HEADER as usize];
    let f = fs::OpenOptions::new().read(true).write(true).open(backing.join("f")).unwrap();
    f.read_exact_at(&mut region, 0).unwrap();
    for slot in region.chunks_mut(HEADER as usize / 2) {
        let body = u16::from_le_bytes([slot[10], slot[11]]) as usize;
        slot[body - 1] ^= 1; // the wrapped key's last byte (its GCM tag)
        let crc = crc32fast::hash(&slot[..body + 32]);
        slot[body + 32..body + 36].copy_from_slice(&crc.to_le_bytes());
    }
    f.write_all_at(&region, 0).unwrap();
    drop(f);
    let m = common::Mounted::start_with(&backing, "--pin-file", &pin, &mnt, &[]);
    let e = fs::read(m.path("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let log = m.log_text();
    assert!(log.contains("does not authenticate") && log.contains("the token works"), "{log}");
}

/// The inode table closes descriptors it no longer has room for and finds the objects
/// again later. The attacker renames things in the backing directory so that the name an
/// evicted inode was found by now holds another object, then waits for the user to
/// `fchmod` through a descriptor they hold. The change must never reach the other object:
/// by file handle it reaches the original wherever it now is; by parent and name, a file
/// open through the mount is still reached through its open descriptor, and a directory
/// (whose handle keeps no descriptor) is found to be gone: ESTALE.
fn evicted_inode_is_not_redirected_by_a_backing_rename(mode: &str) {
    let v = TestVolume::new(4096);
    let m = v.mount(&["--file-handles", mode, "--max-inode-fds", "1"]);
    for d in ["a", "b", "a/d", "b/e"] {
        fs::create_dir(m.path(d)).unwrap();
    }
    fs::write(m.path("a/x"), b"victim").unwrap();
    fs::write(m.path("b/y"), b"other").unwrap();
    let file = fs::File::open(m.path("a/x")).unwrap();
    let dir = fs::File::open(m.path("a/d")).unwrap();
    for p in ["b/y", "b/e", "a", "b"] {
        fs::metadata(m.path(p)).unwrap(); // one descriptor is kept: a/x and a/d are evicted
    }
    let mode_of = |p: &str| fs::symlink_metadata(v.backing.join(p)).unwrap().mode() & 0o7777;
    for (victim, other) in [("a/x", "b/y"), ("a/d", "b/e")] {
        fs::rename(v.backing.join(victim), v.backing.join(format!("{victim}.moved"))).unwrap();
        fs::rename(v.backing.join(other), v.backing.join(victim)).unwrap();
    }
    let (other_file, other_dir) = (mode_of("a/x"), mode_of("a/d"));

    file.set_permissions(fs::Permissions::from_mode(0o600)).expect("an open file is reached through its descriptor");
    let r = dir.set_permissions(fs::Permissions::from_mode(0o700));

    assert_eq!((mode_of("a/x"), mode_of("a/d")), (other_file, other_dir), "what the attacker moved in is untouched");
    assert_eq!(mode_of("a/x.moved"), 0o600, "the change reaches the original file");
    if mode == "never" {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ESTALE));
        assert!(m.log_text().contains("not at any name the mount knows"), "{}", m.log_text());
    } else {
        r.unwrap();
        assert_eq!(mode_of("a/d.moved"), 0o700, "the change reaches the original directory");
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn evicted_inode_found_by_name_is_not_redirected_by_a_backing_rename() {
    evicted_inode_is_not_redirected_by_a_backing_rename("never");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn evicted_inode_found_by_handle_is_not_redirected_by_a_backing_rename() {
    evicted_inode_is_not_redirected_by_a_backing_rename("always");
}

/// Item: `open(O_CREAT)` without O_EXCL of a name the kernel still caches as absent. A
/// root-only file that arrives in the backing directory meanwhile (a sync delivering it)
/// must not be opened for a user the kernel would refuse: the daemon answers ESTALE, the
/// kernel looks the name up again and checks the caller's permissions itself.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn create_without_excl_of_an_arrived_file_checks_the_callers_access() {
    let v = TestVolume::new(4096);
    fs::set_permissions(v.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = v.mount(&["--allow-other", "--trust-backing-permissions", "--entry-timeout", "600"]);
    fs::create_dir(m.path("pub")).unwrap();
    fs::set_permissions(m.path("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    // The kernel learns that pub/secret does not exist, and keeps that for 600 s.
    assert!(fs::symlink_metadata(m.path("pub/secret")).is_err());
    // A root-only envelope arrives behind the mount's back.
    fs::write(m.path("src"), b"salary=1").unwrap();
    fs::set_permissions(m.path("src"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(v.backing.join("src"), v.backing.join("pub/secret")).unwrap();
    let code = "import os, sys\n\
                try:\n\
                \x20   os.close(os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644))\n\
                \x20   print('opened')\n\
                except OSError as e:\n\
                \x20   print(e.errno)\n";
    let out = as_nobody("python3", &[&"-c", &code, &m.path("pub/secret")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), libc::EACCES.to_string(), "{}", text(&out));
    // Root, whom the mode lets in, still opens it without O_EXCL.
    let f = fs::OpenOptions::new().create(true).append(true).open(m.path("pub/secret")).unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("pub/secret")).unwrap(), b"salary=1");
}

/// Item: a half-pasted header. Slot 0 of Y's header is overwritten with Z's (which
/// authenticates under Z's key); Y's slot 1 and block 0 are intact. The loader takes Y's
/// own slot, the mount reads Y, and `fsck --repair` restores slot 0 instead of cutting Y.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_half_pasted_header_falls_back_to_the_genuine_slot() {
    let v = TestVolume::new(4096);
    let slot = v.open().geometry.slot_size();
    let m = v.mount(&[]);
    fs::write(m.path("y"), b"the real y").unwrap();
    fs::write(m.path("z"), b"zzz").unwrap();
    drop(m);
    let z = fs::read(v.backing.join("z")).unwrap();
    let y = fs::OpenOptions::new().write(true).open(v.backing.join("y")).unwrap();
    y.write_all_at(&z[..slot], 0).unwrap();
    drop(y);
    let m = v.mount(&[]);
    assert_eq!(fs::read(m.path("y")).unwrap(), b"the real y");
    drop(m);
    let out = cli(&[&"fsck", &"--repair", &"--key-file", &v.key, &v.backing]);
    assert!(text(&out).contains("header copy 0 is damaged; copy 1 is good"), "{}", text(&out));
    let out = cli(&[&"fsck", &"--key-file", &v.key, &v.backing]);
    assert!(out.status.success(), "{}", text(&out));
    let m = v.mount(&[]);
    assert_eq!(fs::read(m.path("y")).unwrap(), b"the real y");
    fs::OpenOptions::new().append(true).open(m.path("y")).unwrap().write_all_at(b"!", 10).unwrap();
    assert_eq!(fs::read(m.path("y")).unwrap(), b"the real y!");
}

/// Item: names from the backing directory are escaped wherever they are shown. A planted
/// file whose name holds CR, cursor-moving escapes and a newline can neither hide fsck's
/// PROBLEM line on a terminal nor forge a line of the log.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn control_characters_in_backing_names_are_escaped_in_fsck_and_the_log() {
    let v = TestVolume::new(4096);
    let evil = "bad\r\x1b[1A\x1b[2K\nFORGED: all good";
    fs::write(v.backing.join(evil), vec![7u8; 5000]).unwrap();
    let out = cli(&[&"fsck", &"--key-file", &v.key, &v.backing]);
    let shown = text(&out);
    assert!(!out.status.success(), "the damaged file is a problem: {shown}");
    assert!(shown.contains("PROBLEM"), "{shown}");
    assert!(!shown.contains('\x1b') && !shown.contains('\r'), "raw control characters reached the terminal: {shown:?}");
    assert!(!shown.lines().any(|l| l.starts_with("FORGED")), "a name forged a line: {shown}");
    let m = v.mount(&[]);
    let err = fs::read(m.path(evil)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let log = m.log_text();
    assert!(log.contains("FORGED"), "the failure is logged with its name: {log}");
    assert!(!log.contains('\x1b') && !log.contains('\r'), "raw control characters in the log: {log:?}");
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "a name forged a log line: {log}");
}

/// Item: with `--allow-other` the kernel lets local users in by the modes and owners the
/// backing directory holds, which are not authenticated: `chmod 644` there opens a
/// root-only file to everyone. So `--allow-other` needs the admin's word that only trusted
/// admins can write the backing directory, and with it the consequence is as documented.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn allow_other_needs_the_admins_word_that_backing_permissions_are_trusted() {
    let v = TestVolume::new(4096);
    fs::set_permissions(v.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = v.dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    for how in [&["--allow-other"][..], &["-o", "allow_other"]] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"mount", &"--key-file", &v.key];
        args.extend(how.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        args.extend([&v.backing as &dyn AsRef<std::ffi::OsStr>, &mnt]);
        let out = cli(&args);
        assert_eq!(out.status.code(), Some(common::EXIT_USAGE), "{how:?}: {}", text(&out));
        assert!(text(&out).contains("trust_backing_permissions"), "says what to add: {}", text(&out));
        assert!(!common::is_mounted(&mnt));
    }
    let m = v.mount(&["--allow-other", "--trust-backing-permissions"]);
    fs::write(m.path("secret"), b"root only").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_nobody("cat", &[&m.path("secret")]);
    assert!(!out.status.success(), "a 0600 root file was readable: {}", text(&out));
    // What the admin accepted: a mode changed in the backing directory is what the kernel checks.
    fs::set_permissions(v.backing.join("secret"), fs::Permissions::from_mode(0o644)).unwrap();
    let start = Instant::now();
    loop {
        let out = as_nobody("cat", &[&m.path("secret")]);
        if out.status.success() {
            assert_eq!(out.stdout, b"root only");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the backing mode never reached the kernel");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Item: `key retire` cannot be held back by what was planted. Junk of a header's size
/// and a short file name no version; a genuine old copy of a file (restored from a backup
/// the attacker holds) does, and `--force` retires a compromised version anyway: the copy
/// then stays unreadable, the volume's own files read as before.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn key_retire_is_not_held_back_by_planted_files() {
    let v = TestVolume::new(4096);
    let m = v.mount(&[]);
    fs::write(m.path("f"), b"current data").unwrap();
    drop(m);
    let old_copy = fs::read(v.backing.join("f")).unwrap();
    // `args` with the key file and BACKING before the rest (`key retire BACKING VERSION`).
    let run = |args: &[&str]| {
        let (cmd, rest) = args.split_at(args.iter().position(|a| *a == "retire").map_or(args.len(), |i| i + 1));
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = cmd.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>).collect();
        a.extend([&"--key-file" as &dyn AsRef<std::ffi::OsStr>, &v.key, &v.backing]);
        a.extend(rest.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>));
        cli(&a)
    };
    assert!(run(&["key", "rotate"]).status.success());
    let out = run(&["rekey", "--rewrap"]);
    assert!(out.status.success(), "{}", text(&out));
    fs::write(v.backing.join("junk"), vec![0xA5u8; 4096]).unwrap();
    fs::write(v.backing.join("short"), b"x").unwrap();
    // Its header on content it does not own (the block's last byte changed).
    let mut pasted = old_copy.clone();
    let n = pasted.len();
    pasted[n - 1] ^= 1;
    fs::write(v.backing.join("pasted"), &pasted).unwrap();
    fs::write(v.backing.join("restored"), &old_copy).unwrap();
    let out = run(&["key", "retire", "1"]);
    assert!(!out.status.success(), "retired with a genuine file still on version 1");
    assert!(text(&out).contains("referenced by 1 file headers"), "only the genuine copy counts: {}", text(&out));
    let out = run(&["key", "retire", "1", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    let m = v.mount(&[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"current data");
    let err = fs::read(m.path("restored")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "the old copy needs the retired version");
}
