//! Running as a service: the systemd unit, sd_notify readiness and stop, the mount helper,
//! the status socket, completions and the man page.

use crate::common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{cli, is_mounted, TestVolume, BIN};

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a unit's ExecStart line (`exec`, with `conf` for the instance's config) as systemd
/// would, and take charge of the mount once it answers at `mnt`.
fn exec_start(exec: &str, conf: &Path, mnt: &Path) -> common::Mounted {
    let argv: Vec<String> =
        exec.replace("/etc/envelopefs/%i.toml", &conf.display().to_string()).split(' ').map(str::to_owned).collect();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("ENVELOPEFS_TRUST_DIR", common::trust_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !is_mounted(mnt) || fs::metadata(mnt).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "the mount did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    common::Mounted::adopt_child(mnt, child)
}

/// `service install NAME` of `vol` under `root`.
fn install(vol: &TestVolume, name: &str, mnt: &Path, opts: &str, root: &Path, extra: &[&str]) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"service",
        &"install",
        &name,
        &"--backing",
        &vol.backing,
        &"--mountpoint",
        &mnt,
        &"-o",
        &opts,
        &"--root",
        &root,
    ];
    args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    ok(cli(&args));
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn service_install_writes_a_unit_that_systemd_accepts() {
    let vol = TestVolume::new(4096);
    let root = vol.dir.path().join("root");
    let mnt = vol.dir.path().join("mnt");
    let opts = format!("key_file={},allow_other,trust_backing_permissions", vol.key.display());
    install(&vol, "secret", &mnt, &opts, &root, &[]);
    let unit = root.join("etc/systemd/system/envelopefs@.service");
    let text = fs::read_to_string(&unit).unwrap();
    assert!(text.contains(&format!("ExecStart={BIN} mount --foreground --config /etc/envelopefs/%i.toml")), "{text}");
    assert!(text.contains("Type=notify"));
    let conf = fs::read_to_string(root.join("etc/envelopefs/secret.toml")).unwrap();
    assert!(conf.contains("allow_other"), "{conf}");
    assert_eq!(fs::read_link(root.join("sbin/mount.fuse.envelopefs")).unwrap(), Path::new(BIN));

    // systemd's own check, on an instance of the template.
    let inst = vol.dir.path().join("units");
    fs::create_dir(&inst).unwrap();
    fs::copy(&unit, inst.join("envelopefs@.service")).unwrap();
    let out =
        Command::new("systemd-analyze").arg("verify").arg(inst.join("envelopefs@secret.service")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(!err.contains("envelopefs@"), "no warnings about the unit: {err}");

    // The config the unit points at mounts.
    fs::create_dir(&mnt).unwrap();
    let conf_path = root.join("etc/envelopefs/secret.toml");
    let log = vol.dir.path().join("log");
    let out = cli(&[&"mount", &"--config", &conf_path, &"--log-file", &log]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mnt = fs::canonicalize(&mnt).unwrap();
    assert!(is_mounted(&mnt));
    fs::write(mnt.join("f"), b"via config").unwrap();
    ok(cli(&[&"umount", &mnt]));
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn notify_ready_after_the_mount_answers_and_clean_stop_on_sigterm() {
    let vol = TestVolume::new(4096);
    let mnt = vol.dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnt = fs::canonicalize(&mnt).unwrap();
    let sock_path = vol.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut child = common::bin()
        .args(["mount", "--foreground", "--key-file"])
        .arg(&vol.key)
        .arg(&vol.backing)
        .arg(&mnt)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Guard<'a>(&'a Path, &'a mut std::process::Child);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            let _ = self.1.kill();
            let _ = self.1.wait();
        }
    }
    let pid = child.id() as i32;
    let g = Guard(&mnt, &mut child);
    assert_eq!(recv(&sock), "READY=1");
    // READY means the mount already answers.
    assert!(is_mounted(&mnt));
    fs::metadata(&mnt).unwrap();
    let data = common::pattern(5, 300_000);
    fs::write(mnt.join("pending"), &data).unwrap();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(recv(&sock), "STOPPING=1");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = g.1.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mnt));
    drop(g);
    let m = vol.mount(&[]);
    assert_eq!(fs::read(m.path("pending")).unwrap(), data, "writes made before SIGTERM are there");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn mount_helper_works_with_mount_t_fuse_envelopefs() {
    let vol = TestVolume::new(4096);
    let mnt = vol.dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnt = fs::canonicalize(&mnt).unwrap();
    struct Guard<'a>(&'a Path, Option<&'static str>);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if let Some(link) = self.1 {
                let _ = fs::remove_file(link);
            }
        }
    }
    let opts = format!("key_file={},nofail,_netdev", vol.key.display());
    let check = |how: &str| {
        assert!(is_mounted(&mnt), "{how}: not mounted");
        fs::write(mnt.join("x"), how).unwrap();
        assert_eq!(fs::read_to_string(mnt.join("x")).unwrap(), how);
        ok(cli(&[&"umount", &mnt]));
    };

    // mount(8) runs /sbin/mount.fuse.envelopefs SRC MNT -o OPTS: install the helper the way
    // `service install` does, unless the system already has one.
    const HELPER: &str = "/sbin/mount.fuse.envelopefs";
    let ours = !Path::new(HELPER).exists() && std::os::unix::fs::symlink(BIN, HELPER).is_ok();
    let mut g = Guard(&mnt, ours.then_some(HELPER));
    if fs::read_link(HELPER).is_ok_and(|t| t == Path::new(BIN)) {
        let out = Command::new("mount")
            .args(["-t", "fuse.envelopefs"])
            .arg(&vol.backing)
            .arg(&mnt)
            .args(["-o", &opts])
            .output()
            .unwrap();
        assert!(out.status.success(), "mount -t fuse.envelopefs: {}", String::from_utf8_lossy(&out.stderr));
        check("mount -t fuse.envelopefs");
    }
    if ours {
        let _ = fs::remove_file(HELPER);
        g.1 = None;
    }

    // Without a dedicated helper mount(8) uses fuse3's mount.fuse3, which runs
    // `envelopefs SRC MNT -o OPTS` from PATH.
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("mount.fuse3")
        .arg(&vol.backing)
        .arg(&mnt)
        .args(["-t", "fuse.envelopefs", "-o", &opts])
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(out.status.success(), "mount.fuse3: {}", String::from_utf8_lossy(&out.stderr));
    check("mount.fuse3");

    // The helper's calling convention by hand, through a link with the helper's name.
    let link = vol.dir.path().join("mount.fuse.envelopefs");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let out = Command::new(&link).arg(&vol.backing).arg(&mnt).args(["-n", "-o", &opts]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check("helper by hand");
    drop(g);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn status_json_moves_as_files_are_used() {
    let vol = TestVolume::new(4096);
    let m = vol.mount(&[]);
    let status = || -> serde_json::Value { serde_json::from_str(&ok(cli(&[&"status", &"--json", &m.mnt]))).unwrap() };
    let s0 = status();
    assert_eq!(s0["open_files"], 0);
    assert_eq!(s0["errors"], 0);
    // Without a mount point: every envelopefs mount of the host, this one among them.
    let all: serde_json::Value = serde_json::from_str(&ok(cli(&[&"status", &"--json"]))).unwrap();
    let mnt = m.mnt.display().to_string();
    assert!(all.as_array().unwrap().iter().any(|st| st["mountpoint"] == mnt.as_str()), "{all}");
    fs::write(m.path("a"), b"hello").unwrap();
    // The kernel sends RELEASE in the background: until it arrives the inode keeps its key
    // and the next open asks no cache.
    let start = std::time::Instant::now();
    while status()["open_files"] != 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the write's handle was never released");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let f = fs::File::open(m.path("a")).unwrap();
    let s1 = status();
    assert_eq!(s1["open_files"], 1, "{s1}");
    assert!(s1["provider_calls"].as_u64().unwrap() > s0["provider_calls"].as_u64().unwrap(), "{s1}");
    assert!(s1["dek_cache_hits"].as_u64().unwrap() >= 1, "the open after the write hit the cache: {s1}");
    drop(f);
    // A tampered file shows up as an error with a reason.
    let backing = vol.backing.join("a");
    let mut raw = fs::read(&backing).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    fs::write(&backing, raw).unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap_err().raw_os_error(), Some(libc::EIO));
    let s2 = status();
    assert_eq!(s2["open_files"], 0, "{s2}");
    assert!(s2["errors"].as_u64().unwrap() >= 1, "{s2}");
    assert!(s2["last_error"].as_str().unwrap().contains("does not authenticate"), "{s2}");
    let human = ok(cli(&[&"status", &m.mnt]));
    assert!(human.contains("DEK cache") && human.contains("open files"), "{human}");
}

#[test]
fn completions_and_man_page() {
    let bash = ok(cli(&[&"completions", &"bash"]));
    assert!(bash.contains("envelopefs") && bash.contains("rekey"), "{}", &bash[..200.min(bash.len())]);
    let man = ok(cli(&[&"man"]));
    assert!(man.starts_with(".ie") || man.contains(".TH envelopefs"), "{}", &man[..200.min(man.len())]);
    // A page per subcommand: every page the top one refers to exists.
    let dir = tempfile::tempdir().unwrap();
    ok(cli(&[&"man", &"--dir", &dir.path()]));
    for page in [
        "envelopefs.1",
        "envelopefs-init.1",
        "envelopefs-mount.1",
        "envelopefs-key-passwd.1",
        "envelopefs-key-slot-add.1",
    ] {
        assert!(dir.path().join(page).exists(), "{page}");
    }
    let top = fs::read_to_string(dir.path().join("envelopefs.1")).unwrap();
    assert!(top.contains("EXIT STATUS"), "the top page has the exit codes");
    for referred in top.split("envelopefs\\-").skip(1) {
        let name: String =
            referred.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '\\' || *c == '-').collect();
        let file = format!("envelopefs-{}.1", name.replace("\\-", "-").trim_end_matches('-'));
        assert!(dir.path().join(&file).exists(), "the top page refers to {file}, which is missing");
    }
}

/// A crashed daemon comes back under systemd: after `kill -9` the mount point holds a dead
/// connection (ENOTCONN), and the unit's own ExecStart line, run again as
/// `Restart=on-failure` runs it, clears it and mounts the volume again.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn the_units_exec_start_brings_a_killed_daemon_back() {
    let vol = TestVolume::new(4096);
    let root = vol.dir.path().join("root");
    let mnt = vol.dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let opts = format!("key_file={}", vol.key.display());
    install(&vol, "crash", &mnt, &opts, &root, &[]);
    let unit = fs::read_to_string(root.join("etc/systemd/system/envelopefs@.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let conf = root.join("etc/envelopefs/crash.toml");
    let start = || exec_start(exec, &conf, &mnt);
    let mut m = start();
    fs::write(m.path("kept"), b"before the crash").unwrap();
    m.kill9();
    let err = fs::metadata(&mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "a dead connection is left");
    // Left as a crash leaves it: dropping the guard would detach the dead mount.
    std::mem::forget(m);
    let m = start();
    assert_eq!(fs::read(m.path("kept")).unwrap(), b"before the crash");
    assert!(m.unmount().success());
    // What a restart cannot fix is not retried (a wrong PIN would lock an HSM's token).
    assert!(unit.contains("RestartPreventExitStatus=2 10 11 12 15 16"), "{unit}");
}

/// `status` on a mount whose daemon was killed says the daemon is gone and what clears the
/// dead connection, with the mount-point exit code.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn status_of_a_killed_daemon_says_it_is_gone() {
    let vol = TestVolume::new(4096);
    let mut m = vol.mount(&[]);
    m.kill9();
    // Dropping `m` detaches the dead mount (umount -l), whatever fails below.
    let out = cli(&[&"status", &m.mnt]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(12), "{err}");
    let want = format!(
        "envelopefs: error: the envelopefs daemon of {} is gone (killed or crashed): its FUSE connection is dead \
         (ENOTCONN); the next `envelopefs mount` of the volume there (or the unit's restart) clears it",
        m.mnt.display()
    );
    assert!(err.starts_with(&want), "{err}");
    assert!(!err.contains("Connection refused"), "{err}");
}

/// logrotate's `postrotate kill -HUP`: the daemon reopens its log file by name and keeps
/// serving (SIGHUP used to unmount). The mount's type is `fuse.envelopefs`, so findmnt and
/// `umount -a -t fuse.envelopefs` find it.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn sighup_reopens_the_log_file_and_the_mount_stays() {
    let vol = TestVolume::new(4096);
    let m = vol.mount(&[]);
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some(m.mnt.to_str().unwrap())).unwrap();
    assert_eq!(line.split(" - ").nth(1).unwrap().split(' ').next(), Some("fuse.envelopefs"), "{line}");
    let rotated = m.log.with_extension("log.1");
    fs::rename(&m.log, &rotated).unwrap();
    // SAFETY: kill(2) of the daemon this test started.
    assert_eq!(unsafe { libc::kill(m.pid(), libc::SIGHUP) }, 0);
    let t = Instant::now();
    while !fs::read_to_string(&m.log).unwrap_or_default().contains("log file reopened") {
        assert!(t.elapsed() < Duration::from_secs(10), "no new log file: {}", fs::read_to_string(&rotated).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    fs::write(m.path("still"), b"serving").unwrap();
    assert_eq!(fs::read(m.path("still")).unwrap(), b"serving");
    assert!(!fs::read_to_string(&rotated).unwrap().contains("reopened"), "the old file got the new lines");
    assert!(m.unmount().success());
}

/// Upgrading the binary under a running mount (docs/OPERATIONS.md): the unit names the
/// binary by a version symlink; switching the link leaves the running daemon serving, and
/// the next start runs the new version.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn an_upgrade_under_a_running_mount_takes_effect_at_the_next_start() {
    let vol = TestVolume::new(4096);
    let (root, mnt, bin) = (vol.dir.path().join("root"), vol.dir.path().join("mnt"), vol.dir.path().join("bin"));
    fs::create_dir_all(&bin).unwrap();
    fs::create_dir(&mnt).unwrap();
    for v in ["envelopefs-1", "envelopefs-2"] {
        fs::copy(BIN, bin.join(v)).unwrap();
    }
    let link = bin.join("envelopefs");
    std::os::unix::fs::symlink("envelopefs-1", &link).unwrap();
    let opts = format!("key_file={}", vol.key.display());
    let link_s = link.display().to_string();
    install(&vol, "up", &mnt, &opts, &root, &["--exe", &link_s]);
    let unit = fs::read_to_string(root.join("etc/systemd/system/envelopefs@.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    assert!(exec.starts_with(&link_s), "the unit names the link, not what it points at: {exec}");
    let conf = root.join("etc/envelopefs/up.toml");
    let start = || exec_start(exec, &conf, &mnt);
    let exe_of = |m: &common::Mounted| fs::read_link(format!("/proc/{}/exe", m.pid())).unwrap();
    let m = start();
    assert_eq!(exe_of(&m), bin.join("envelopefs-1"));
    fs::write(m.path("f"), b"across the upgrade").unwrap();
    // The upgrade: the link now points at the new version.
    let next = bin.join("envelopefs.next");
    std::os::unix::fs::symlink("envelopefs-2", &next).unwrap();
    fs::rename(&next, &link).unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"across the upgrade", "the running daemon serves on");
    assert_eq!(exe_of(&m), bin.join("envelopefs-1"));
    assert!(m.unmount().success());
    let m = start();
    assert_eq!(exe_of(&m), bin.join("envelopefs-2"), "the next start runs the new version");
    assert_eq!(fs::read(m.path("f")).unwrap(), b"across the upgrade");
    assert!(m.unmount().success());
}
