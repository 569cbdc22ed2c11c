//! The command line: clear errors and exit codes for bad input, never a panic or a
//! half-made volume; daemonized mounts that return when ready.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{cli, is_mounted, Mounted, TestVolume};

/// Fails with exit `code` (the classes in `envelopefs --help`) and says `needle`.
fn fails_with(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit status; stderr: {err}");
    assert!(err.contains(needle), "stderr should mention {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

const FAST_KDF: [&str; 4] = ["--kdf-memory-mib", "8", "--kdf-iterations", "1"];

fn init_with_passphrase(dir: &Path, pass: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let backing = dir.join("b");
    fs::create_dir(&backing).unwrap();
    let pw = dir.join("pw");
    fs::write(&pw, format!("{pass}\n")).unwrap();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"init", &"--passphrase-file", &pw];
    for a in &FAST_KDF {
        args.push(a);
    }
    args.push(&backing);
    let out = cli(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (backing, pw)
}

#[test]
fn init_refuses_a_non_empty_dir_and_leaves_it_alone() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("k");
    fs::write(&key, [1u8; 32]).unwrap();
    let b = d.path().join("b");
    fs::create_dir(&b).unwrap();
    fs::write(b.join("existing"), b"data").unwrap();
    fails_with(&cli(&[&"init", &"--key-file", &key, &b]), 1, "not empty");
    let names: Vec<_> = fs::read_dir(&b).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("existing")]);
    fails_with(&cli(&[&"init", &"--key-file", &key, &d.path().join("missing")]), 1, "backing directory");
    fails_with(
        &cli(&[&"init", &"--key-file", &key, &"--block-size", &"1000", &d.path().join("k")]),
        1,
        "not a directory",
    );
    let e = d.path().join("e");
    fs::create_dir(&e).unwrap();
    fails_with(&cli(&[&"init", &"--key-file", &key, &"--block-size", &"1000", &e]), 2, "power of two");
    assert_eq!(fs::read_dir(&e).unwrap().count(), 0, "a refused init leaves nothing behind");
    assert!(cli(&[&"init", &"--key-file", &key, &e]).status.success());
    fails_with(&cli(&[&"init", &"--key-file", &key, &e]), 1, "already an envelopefs volume");
    // A key file that is not 32 bytes.
    let f = d.path().join("f");
    fs::create_dir(&f).unwrap();
    let short = d.path().join("short");
    fs::write(&short, b"short").unwrap();
    fails_with(&cli(&[&"init", &"--key-file", &short, &f]), 2, "32 raw bytes");
    assert_eq!(fs::read_dir(&f).unwrap().count(), 0);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn mount_errors_are_clear() {
    let vol = TestVolume::new(4096);
    let d = vol.dir.path();
    let mnt = d.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let not_volume = d.join("plain");
    fs::create_dir(&not_volume).unwrap();
    fails_with(&cli(&[&"mount", &"--key-file", &vol.key, &not_volume, &mnt]), 10, "not an envelopefs volume");
    fails_with(&cli(&[&"mount", &"--key-file", &vol.key, &vol.backing, &d.join("nope")]), 12, "does not exist");
    let wrong = d.join("wrong.key");
    fs::write(&wrong, [9u8; 32]).unwrap();
    fails_with(&cli(&[&"mount", &"--key-file", &wrong, &vol.backing, &mnt]), 11, "wrong passphrase or key file");
    assert!(!is_mounted(&fs::canonicalize(&mnt).unwrap()));
    fails_with(
        &cli(&[&"mount", &"--key-file", &vol.key, &"-o", &"bogus", &vol.backing, &mnt]),
        2,
        "unknown mount option",
    );

    // Busy: something is mounted there already; and the volume is in use.
    let m = vol.mount(&[]);
    fails_with(&cli(&[&"mount", &"--key-file", &vol.key, &vol.backing, &m.mnt]), 12, "busy");
    let other = d.join("other");
    fs::create_dir(&other).unwrap();
    fails_with(&cli(&[&"mount", &"--foreground", &"--key-file", &vol.key, &vol.backing, &other]), 17, "is in use");
    drop(m);

    // A damaged config.
    fs::write(vol.backing.join("envelopefs.toml"), "format = 1\nvolume_id = \"zz\"\n").unwrap();
    fails_with(&cli(&[&"mount", &"--key-file", &vol.key, &vol.backing, &mnt]), 16, "envelopefs.toml is damaged");
    fs::write(vol.backing.join("envelopefs.toml"), "\u{0}\u{1}garbage").unwrap();
    fails_with(&cli(&[&"fsck", &"--key-file", &vol.key, &vol.backing]), 16, "damaged");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn passphrase_volume_daemonizes_and_stops_on_umount() {
    let d = tempfile::tempdir().unwrap();
    let (backing, pw) = init_with_passphrase(d.path(), "correct horse battery staple");
    let keyring = fs::read(backing.join("envelopefs.keyring")).unwrap();
    assert!(!keyring.windows(7).any(|w| w == b"correct"), "passphrase is not stored");
    let mnt = d.path().join("m");
    fs::create_dir(&mnt).unwrap();
    let bad = d.path().join("bad");
    fs::write(&bad, "incorrect\n").unwrap();
    fails_with(&cli(&[&"mount", &"--passphrase-file", &bad, &backing, &mnt]), 11, "wrong passphrase");

    // Without --foreground: returns once the mount answers, leaving the daemon running.
    let log = d.path().join("log");
    let out = cli(&[&"mount", &"--passphrase-file", &pw, &"--log-file", &log, &backing, &mnt]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mnt = fs::canonicalize(&mnt).unwrap();
    // A guard so a failing assertion still unmounts.
    struct Guard<'a>(&'a Path);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _g = Guard(&mnt);
    assert!(is_mounted(&mnt));
    fs::write(mnt.join("x"), b"hello").unwrap();
    assert_eq!(fs::read(mnt.join("x")).unwrap(), b"hello");
    assert!(cli(&[&"umount", &mnt]).status.success());
    assert!(!is_mounted(&mnt));
    // The daemon notices and exits.
    let start = Instant::now();
    while !fs::read_to_string(&log).unwrap_or_default().contains("unmounted") {
        assert!(start.elapsed() < Duration::from_secs(10), "daemon did not log its exit");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The environment is not a secret source (it stays readable in /proc/PID/environ).
    let out = common::bin()
        .args(["mount", "--log-file"])
        .arg(&log)
        .arg(&backing)
        .arg(&mnt)
        .env("ENVELOPEFS_PASSPHRASE", "correct horse battery staple")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no passphrase"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!is_mounted(&mnt));

    // The passphrase piped in (`--passphrase-file /dev/stdin`), without --foreground: the
    // daemon gets it from the command that started it.
    let mut c = common::bin()
        .args(["mount", "--passphrase-file", "/dev/stdin", "--log-file"])
        .arg(&log)
        .arg(&backing)
        .arg(&mnt)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), b"correct horse battery staple\n").unwrap();
    let out = c.wait_with_output().unwrap();
    let _g = Guard(&mnt);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(is_mounted(&mnt));
    assert_eq!(fs::read(mnt.join("x")).unwrap(), b"hello");
    assert!(cli(&[&"umount", &mnt]).status.success());

    // Detached without --log-file where there is no syslog: said at start, not silent.
    if !Path::new("/dev/log").exists() {
        let out = cli(&[&"mount", &"--passphrase-file", &pw, &backing, &mnt]);
        let _g = Guard(&mnt);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no syslog here"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(cli(&[&"umount", &mnt]).status.success());
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn sigterm_unmounts_cleanly() {
    let vol = TestVolume::new(4096);
    let m = vol.mount(&[]);
    fs::write(m.path("f"), b"data").unwrap();
    let (mnt, log) = (m.mnt.clone(), m.log.clone());
    unsafe { libc::kill(m.pid(), libc::SIGTERM) };
    let status = m.wait_exit();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
    let log = fs::read_to_string(log).unwrap();
    assert!(log.contains("signal 15") && log.contains("unmounted"), "{log}");
    let m2 = Mounted::start(&vol.backing, &vol.key, &vol.dir.path().join("mnt"), &[]);
    assert_eq!(fs::read(m2.path("f")).unwrap(), b"data");
}

#[test]
fn help_teaches() {
    let out = cli(&[&"--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("envelopefs init") && text.contains("envelopefs mount"), "{text}");
    let out = cli(&[&"mount", &"--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--allow-other") && text.contains("--cache-ttl"), "{text}");
    // The recovery key opens a volume to read it; commands that make volumes or change
    // keys do not offer it.
    assert!(text.contains("--recovery-key"), "{text}");
    for cmd in [&["init"][..], &["trust"], &["rekey"], &["key", "rotate"], &["key", "passwd"], &["key", "slot", "add"]]
    {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = cmd.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>).collect();
        args.push(&"--help");
        let text = String::from_utf8_lossy(&cli(&args).stdout).into_owned();
        assert!(text.contains("--passphrase-file") && !text.contains("--recovery-key "), "{cmd:?}: {text}");
    }
}

/// Every documented exit status (`envelopefs man`, EXIT STATUS) and a case that produces
/// it. None of these needs FUSE, SoftHSM2 or moto; 13 is also played against an
/// unreachable KMS in `tests/suite/aws_kms.rs`.
#[test]
fn every_documented_exit_status_has_a_case() {
    let v = TestVolume::new(4096);
    let d = v.dir.path();
    let empty = d.join("empty");
    fs::create_dir(&empty).unwrap();
    let a_file = d.join("a-file");
    fs::write(&a_file, b"x").unwrap();
    let wrong_key = d.join("wrong.key");
    fs::write(&wrong_key, [9u8; 32]).unwrap();
    let mnt = d.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let damaged = TestVolume::new(4096);
    fs::write(damaged.backing.join("junk"), vec![1u8; 5000]).unwrap();
    let copy = d.join("copy");
    let out = std::process::Command::new("cp").arg("-a").arg(&v.backing).arg(&copy).output().unwrap();
    assert!(out.status.success());
    assert!(cli(&[&"fsck", &"--key-file", &v.key, &v.backing]).status.success(), "the original is known here now");
    let tampered = TestVolume::new(4096);
    let cfg = tampered.backing.join("envelopefs.toml");
    let text = fs::read_to_string(&cfg).unwrap().replace("block_size = 4096", "block_size = 8192");
    fs::write(&cfg, text).unwrap();
    let busy = fs::File::open(&v.backing).unwrap();
    let held = rustix_flock(&busy);
    let k = &v.key;
    let svc_root = d.join("svc-root");
    let full_mnt = d.join("full-mnt");
    fs::create_dir(&full_mnt).unwrap();
    fs::write(full_mnt.join("hidden-by-a-mount"), b"x").unwrap();
    let (missing, no_mnt, no_module) = (d.join("missing"), d.join("no-mnt"), d.join("no-module.so"));
    #[rustfmt::skip]
    let table: Vec<(i32, Vec<&dyn AsRef<std::ffi::OsStr>>, &str)> = vec![
        (0, vec![&"key", &"status", &"--key-file", &damaged.key, &damaged.backing], "version 1"),
        (1, vec![&"fsck", &"--key-file", &damaged.key, &damaged.backing], "PROBLEM"),
        (2, vec![&"fsck", &"--no-such-flag", &v.backing], "--no-such-flag"),
        (2, vec![&"mount", &"--key-file", k, &"--allow-other", &v.backing, &mnt], "trust_backing_permissions"),
        (2, vec![&"mount", &"--key-file", k, &"--threads", &"0", &v.backing, &mnt], "threads"),
        (2, vec![&"init", &"--key-file", k, &"--kdf-memory-mib", &"100000", &empty], "out of range"),
        (2, vec![&"fsck", &"--key-file", &missing, &v.backing], "reading key file"),
        (2, vec![&"service", &"install", &"x", &"--backing", &v.backing, &"--mountpoint", &mnt, &"-o", &"frob=1", &"--root", &svc_root], "frob"),
        (10, vec![&"fsck", &"--key-file", k, &empty], "not an envelopefs volume"),
        (10, vec![&"fsck", &"--key-file", k, &a_file], "not an envelopefs volume"),
        (10, vec![&"mount", &"--key-file", k, &missing, &mnt], "missing"),
        (11, vec![&"fsck", &"--key-file", &wrong_key, &damaged.backing], "key"),
        (12, vec![&"mount", &"--key-file", k, &damaged.backing, &no_mnt], "does not exist"),
        (12, vec![&"umount", &mnt], "not an envelopefs mount"),
        (12, vec![&"mount", &"--key-file", k, &damaged.backing, &full_mnt], "not empty"),
        (12, vec![&"mount", &"--key-file", &damaged.key, &damaged.backing, &damaged.backing], "overlaps"),
        (13, vec![&"init", &"--provider", &"pkcs11", &"--module", &no_module, &"--key", &"pkcs11:token=t;object=o", &"--pin-file", &wrong_key, &empty], "PKCS#11 module"),
        (15, vec![&"fsck", &"--key-file", k, &copy], "known on this host"),
        (16, vec![&"fsck", &"--key-file", &tampered.key, &tampered.backing], "envelopefs.toml"),
        (17, vec![&"fsck", &"--repair", &"--key-file", k, &v.backing], "in use"),
    ];
    for (code, args, needle) in &table {
        let out = cli(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        assert_eq!(out.status.code(), Some(*code), "envelopefs {}: {text}", shown.join(" "));
        assert!(text.contains(needle), "envelopefs {} should say {needle:?}: {text}", shown.join(" "));
    }
    let documented: std::collections::BTreeSet<i32> =
        envelopefs::error::EXIT_STATUS.iter().map(|(c, _)| *c as i32).collect();
    let played: std::collections::BTreeSet<i32> = table.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(played, documented, "every documented status has a case");
    drop(held);
}

/// An exclusive flock on the directory `f`, held until the guard drops (as a mount holds
/// the volume).
fn rustix_flock(f: &fs::File) -> impl Drop + '_ {
    struct Held<'a>(&'a fs::File);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            // SAFETY: flock on a descriptor borrowed for the guard's life.
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(self.0), libc::LOCK_UN) };
        }
    }
    // SAFETY: flock on a descriptor borrowed for the guard's life.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(f), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    Held(f)
}

/// An error whose text runs over lines prints as one line, not with a literal `\n`.
#[test]
fn a_bad_config_file_is_said_on_one_line() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.toml");
    fs::write(&bad, "backing = \"/b\"\nmountpoint = \"/m\"\n[bad\n").unwrap();
    let out = cli(&[&"mount", &"--config", &bad]);
    fails_with(&out, 2, "bad.toml: line 3: invalid table header; expected `.`, `]`");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("\\n") && err.trim_end().lines().count() == 1, "{err}");
}

/// A weak new passphrase and a key file others can read are said, not silently taken.
#[test]
fn weak_secrets_are_warned_about() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    let pw = d.path().join("pw");
    fs::write(&pw, "abc\n").unwrap();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"init", &"--passphrase-file", &pw];
    args.extend(FAST_KDF.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    args.push(&a);
    let out = cli(&args);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("weak"), "{}", String::from_utf8_lossy(&out.stderr));
    let key = d.path().join("key");
    fs::write(&key, [3u8; 32]).unwrap();
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = cli(&[&"init", &"--key-file", &key, &b]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Relative paths, as a person types them: the daemon works from / once it serves, so it
/// must have made every path it keeps absolute first.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn relative_paths_mount_and_serve() {
    let v = TestVolume::new(4096);
    fs::create_dir(v.dir.path().join("m")).unwrap();
    let out = common::bin()
        .current_dir(v.dir.path())
        .args(["mount", "--key-file", "volume.key", "--log-file", "log", "backing", "m"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _m = common::Mounted::adopt(&v.dir.path().join("m"));
    fs::write(v.dir.path().join("m/hello"), b"hi").unwrap();
    assert_eq!(fs::read(v.dir.path().join("m/hello")).unwrap(), b"hi");
    let out = common::bin().current_dir(v.dir.path()).args(["umount", "m"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
