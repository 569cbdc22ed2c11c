//! Rotation and re-keying, per provider, plus crash safety under kill -9.

use crate::common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{cli, pattern, Mounted, SOFTHSM_MODULE};

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A volume plus how to unlock it, for any provider.
struct Vol {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    flag: &'static str,
    secret: PathBuf,
}

impl Vol {
    fn local() -> Self {
        let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
        let secret = dir.path().join("key");
        fs::write(&secret, pattern(42, 32)).unwrap();
        Self::init(dir, "--key-file", secret, &[])
    }

    fn pkcs11(token: &str) -> Self {
        let pin = common::softhsm_token(token);
        let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
        let uri = format!("pkcs11:token={token};object=kek");
        Self::init(dir, "--pin-file", pin, &["--provider", "pkcs11", "--module", SOFTHSM_MODULE, "--key", &uri])
    }

    fn init(dir: tempfile::TempDir, flag: &'static str, secret: PathBuf, extra: &[&str]) -> Self {
        let backing = dir.path().join("backing");
        fs::create_dir(&backing).unwrap();
        let mut c = common::bin();
        c.arg("init").arg("--plaintext-names").arg(flag).arg(&secret).args(extra).arg(&backing);
        ok(c.output().unwrap());
        let mnt = dir.path().join("mnt");
        Self { _dir: dir, backing, mnt, flag, secret }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut c = common::bin();
        c.args(&args[..args.len() - 1]).arg(self.flag).arg(&self.secret);
        c.arg(args[args.len() - 1]);
        c.stdin(Stdio::null()).output().unwrap()
    }

    fn backing_str(&self) -> &str {
        self.backing.to_str().unwrap()
    }

    fn mount(&self, extra: &[&str]) -> Mounted {
        Mounted::start_with(&self.backing, self.flag, &self.secret, &self.mnt, extra)
    }
}

fn rotation_flow(v: Vol) {
    let b = v.backing_str().to_owned();
    let m = v.mount(&[]);
    let mut expect = HashMap::new();
    for i in 0..12 {
        let data = pattern(i, 1000 + 3000 * i as usize);
        fs::write(m.path(&format!("f{i}")), &data).unwrap();
        expect.insert(format!("f{i}"), data);
    }
    // Rotate while mounted: the running mount wraps new files under the new version at once.
    let text = ok(v.run(&["key", "rotate", &b]));
    assert!(text.contains("version 2 is now current"), "{text}");
    // A PKCS#11 mount takes the new key object once its config watch sees the change
    // (every 2 s): until then a new file may still be made under version 1.
    let start = std::time::Instant::now();
    loop {
        fs::write(m.path("new"), b"after rotation").unwrap();
        if ok(cli(&[&"inspect", &v.backing.join("new")])).contains("version 2") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the mount never took the rotation");
        fs::remove_file(m.path("new")).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    expect.insert("new".into(), b"after rotation".to_vec());

    let status = ok(v.run(&["key", "status", &b]));
    assert!(status.contains("version 1: 12 files"), "{status}");
    let out = v.run(&["key", "retire", &b, "1"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("still referenced"),
        "retire refuses"
    );

    // Rewrap online, then retire the old version: every file still opens, identical.
    let text = ok(v.run(&["rekey", "--rewrap", &b]));
    assert!(text.contains("12 files changed"), "{text}");
    let text = ok(v.run(&["rekey", "--rewrap", &b]));
    assert!(text.contains("0 files changed"), "a second run has nothing left: {text}");
    let status = ok(v.run(&["key", "status", &b]));
    assert!(status.contains("version 2 (current): 13 files") && !status.contains("version 1: 1"), "{status}");
    drop(m);
    let mut c = common::bin();
    c.args(["key", "retire"]).arg(v.flag).arg(&v.secret).arg(&v.backing).arg("1");
    ok(c.output().unwrap());
    let m = v.mount(&[]);
    for (name, data) in &expect {
        assert_eq!(&fs::read(m.path(name)).unwrap(), data, "{name}");
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn local_rotate_rewrap_retire() {
    rotation_flow(Vol::local());
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn pkcs11_rotate_rewrap_retire() {
    rotation_flow(Vol::pkcs11("spare"));
}

/// A tiny deterministic PRNG for kill timings.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn kill_after(mut cmd: Command, ms: u64) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn online_rewrap_survives_kill_9_while_writers_append() {
    let v = Vol::local();
    let b = v.backing_str().to_owned();
    let m = v.mount(&[]);
    for i in 0..150 {
        fs::write(m.path(&format!("s{i}")), pattern(i, 5000)).unwrap();
    }
    ok(v.run(&["key", "rotate", &b]));
    let stop = AtomicBool::new(false);
    let written = std::thread::scope(|s| {
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let (p, stop) = (m.path(&format!("log{w}")), &stop);
                s.spawn(move || {
                    use std::io::Write;
                    let mut all = Vec::new();
                    let mut f = fs::OpenOptions::new().create(true).append(true).open(&p).unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let chunk = pattern(w * 100_000 + n, 777);
                        f.write_all(&chunk).unwrap();
                        all.extend_from_slice(&chunk);
                        n += 1;
                    }
                    f.sync_all().unwrap();
                    (p, all)
                })
            })
            .collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..8 {
            let mut c = common::bin();
            c.args(["rekey", "--rewrap"]).arg(v.flag).arg(&v.secret).arg(&v.backing);
            kill_after(c, 5 + next(&mut seed) % 150);
        }
        ok(v.run(&["rekey", "--rewrap", &b]));
        stop.store(true, Ordering::Relaxed);
        writers.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
    });
    for (p, all) in written {
        assert!(all.len() > 777, "writers made progress");
        assert_eq!(fs::read(&p).unwrap(), all, "{}", p.display());
    }
    for i in 0..150 {
        assert_eq!(fs::read(m.path(&format!("s{i}"))).unwrap(), pattern(i, 5000));
    }
    drop(m);
    let status = ok(v.run(&["key", "status", &b]));
    assert!(!status.contains("version 1: 1") && !status.contains("older version"), "{status}");
    let fsck = ok(v.run(&["fsck", &b]));
    assert!(fsck.contains("0 problems"), "{fsck}");
}

fn file_id(backing: &Path, name: &str) -> String {
    let text = ok(cli(&[&"inspect", &backing.join(name)]));
    let line = text.lines().find(|l| l.starts_with("header copy 0:")).unwrap().to_owned();
    line.split("file id ").nth(1).unwrap().split(',').next().unwrap().to_owned()
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn reencrypt_is_offline_crash_safe_and_changes_the_key() {
    let v = Vol::local();
    let b = v.backing_str().to_owned();
    let m = v.mount(&[]);
    let mut expect = HashMap::new();
    for i in 0..120 {
        let data = pattern(1000 + i, 20_000 + (i as usize % 7) * 4096);
        fs::write(m.path(&format!("f{i}")), &data).unwrap();
        expect.insert(format!("f{i}"), data);
    }
    let sparse = m.path("sparse");
    let f = fs::File::create(&sparse).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", (8 << 20) - 3).unwrap();
    drop(f);
    // Refused while mounted.
    let out = v.run(&["rekey", "--reencrypt", &b]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unmount"), "{out:?}");
    drop(m);
    let before: HashMap<_, _> = expect.keys().map(|n| (n.clone(), file_id(&v.backing, n))).collect();
    let raw_before = fs::read(v.backing.join("f0")).unwrap();

    let mut seed = 0x1234_5678_9abc_def1u64;
    for _ in 0..8 {
        let mut c = common::bin();
        c.args(["rekey", "--reencrypt"]).arg(v.flag).arg(&v.secret).arg(&v.backing);
        kill_after(c, 5 + next(&mut seed) % 300);
        // After any kill, every file is either the old or the new one, and opens.
        let m = v.mount(&[]);
        for (name, data) in &expect {
            assert_eq!(&fs::read(m.path(name)).unwrap(), data, "{name}");
        }
    }
    // What a kill left is named by fsck (it used to say nothing of it).
    let temps = fs::read_dir(&v.backing)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".envelopefs-reencrypt"))
        .count();
    let out = v.run(&["fsck", &b]);
    let said = String::from_utf8_lossy(&out.stdout).matches("interrupted re-encryption").count();
    assert_eq!(said, temps, "{}", String::from_utf8_lossy(&out.stdout));
    let text = ok(v.run(&["rekey", "--reencrypt", &b]));
    assert!(text.contains("0 failed"), "{text}");
    let leftovers: Vec<_> = fs::read_dir(&v.backing)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("reencrypt"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for (name, old) in &before {
        assert_ne!(&file_id(&v.backing, name), old, "{name} has a new file id");
    }
    let raw_after = fs::read(v.backing.join("f0")).unwrap();
    assert_ne!(raw_before[..2048], raw_after[..2048], "new header (new wrapped DEK)");
    let m = v.mount(&[]);
    for (name, data) in &expect {
        assert_eq!(&fs::read(m.path(name)).unwrap(), data, "{name}");
    }
    let mut tail = [0u8; 3];
    std::os::unix::fs::FileExt::read_exact_at(&fs::File::open(m.path("sparse")).unwrap(), &mut tail, (8 << 20) - 3)
        .unwrap();
    assert_eq!(&tail, b"end");
    use std::os::unix::fs::MetadataExt;
    assert!(fs::metadata(v.backing.join("sparse")).unwrap().blocks() < 1024, "holes stay holes");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn audit_log_records_wrap_unwrap_and_rewrap() {
    let v = Vol::local();
    let b = v.backing_str().to_owned();
    let log = v._dir.path().join("audit.jsonl");
    let log_s = log.to_str().unwrap().to_owned();
    let m = v.mount(&["--audit-log", &log_s]);
    fs::write(m.path("audited.txt"), b"x").unwrap();
    // A daemon that stops writes every audit line it queued first.
    assert!(m.unmount().success());
    let m = v.mount(&["--audit-log", &log_s]);
    assert_eq!(fs::read(m.path("audited.txt")).unwrap(), b"x");
    assert!(m.unmount().success());
    ok(v.run(&["key", "rotate", &b]));
    ok(v.run(&["rekey", "--audit-log", &log_s, &b]));
    let events: Vec<serde_json::Value> =
        fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ops: Vec<&str> = events.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert!(ops.contains(&"wrap") && ops.contains(&"unwrap") && ops.contains(&"rewrap"), "{ops:?}");
    for e in &events {
        assert!(e["path"].as_str().unwrap().ends_with("audited.txt"), "{e}");
        assert_eq!(e["result"], "ok");
        assert_eq!(e["provider"], "local");
        assert_eq!(e["file_id"].as_str().unwrap().len(), 32);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert!(e["uid"].is_u64() && e["pid"].is_u64());
    }
    let wrap = events.iter().find(|e| e["op"] == "wrap").unwrap();
    assert_eq!(wrap["key_version"], 1);
    let rewrap = events.iter().find(|e| e["op"] == "rewrap").unwrap();
    assert_eq!(rewrap["key_version"], 1, "the version it was moved from");
}
