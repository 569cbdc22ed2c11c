//! Objects planted in the backing directory (hard links, FIFOs) are never written through
//! nor waited on, and the one remedy for a leaked key, re-encryption, reaches every name.

use crate::common;

use std::ffi::{CString, OsString};
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// Wait (bounded) for a child; kill it and fail if it hangs.
fn finishes(mut child: Child, what: &str) -> std::process::Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("{what} hung on a planted FIFO");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A root-only file outside the volume on the same filesystem (so it can be hard-linked).
fn victim(vol: &TestVolume) -> PathBuf {
    let v = vol.dir.path().join("victim.conf");
    fs::write(&v, b"secret=keep\n").unwrap();
    fs::set_permissions(&v, fs::Permissions::from_mode(0o600)).unwrap();
    v
}

fn new_entries(dir: &Path, before: &[PathBuf]) -> Vec<PathBuf> {
    let mut now: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    now.retain(|p| !before.contains(p));
    now
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_hard_link_at_a_side_file_name_is_replaced_not_written_through() {
    let vol = TestVolume::hidden(4096);
    let victim = victim(&vol);
    let long = OsString::from_vec(vec![b'L'; 240]);
    let m = vol.mount(&[]);
    let before: Vec<PathBuf> = fs::read_dir(&vol.backing).unwrap().map(|e| e.unwrap().path()).collect();
    fs::write(m.path("").join(&long), b"first").unwrap();
    let side = new_entries(&vol.backing, &before)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".name"))
        .expect("a long name has a side file");
    fs::remove_file(m.path("").join(&long)).unwrap();
    assert!(!side.exists(), "the side file goes with its name");
    // The attacker's link, at the name the next create of that name writes.
    fs::hard_link(&victim, &side).unwrap();
    fs::write(m.path("").join(&long), b"second").unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "secret=keep\n", "the daemon wrote through a planted hard link");
    assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1, "the link was replaced by the daemon's own file");
    assert_eq!(fs::read(m.path("").join(&long)).unwrap(), b"second");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_hard_link_in_the_long_target_store_is_replaced_not_written_through() {
    let vol = TestVolume::hidden(4096);
    let victim = victim(&vol);
    let target = "t/".repeat(2000);
    let m = vol.mount(&[]);
    std::os::unix::fs::symlink(&target, m.path("l1")).unwrap();
    let store = vol.backing.join("envelopefs.targets");
    let stored: Vec<PathBuf> = fs::read_dir(&store).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(stored.len(), 1, "a long target is kept in the store");
    fs::remove_file(m.path("l1")).unwrap();
    // fsck --repair would remove the unused store file; the attacker replaces it first.
    fs::remove_file(&stored[0]).unwrap();
    fs::hard_link(&victim, &stored[0]).unwrap();
    std::os::unix::fs::symlink(&target, m.path("l2")).unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "secret=keep\n", "the daemon wrote through a planted hard link");
    assert_eq!(fs::read_link(m.path("l2")).unwrap(), Path::new(&target));
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_fifo_in_place_of_the_keyring_or_config_wedges_nothing() {
    let vol = TestVolume::hidden(4096);
    let m = vol.mount(&[]);
    fs::write(m.path("f"), b"data").unwrap();
    m.unmount();
    let m = vol.mount(&[]);
    let keyring = vol.backing.join("envelopefs.keyring");
    let aside = vol.dir.path().join("keyring.real");
    fs::rename(&keyring, &aside).unwrap();
    mkfifo(&keyring);
    // A cold open reads the keyring again: it must answer, not wait for a FIFO writer.
    let cat = Command::new("cat").arg(m.path("f")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let out = finishes(cat, "cat through the mount");
    if !out.status.success() {
        assert!(m.log_text().contains("keyring"), "the log names the keyring: {}", m.log_text());
    }
    drop(m);
    fs::remove_file(&keyring).unwrap();
    fs::rename(&aside, &keyring).unwrap();
    let config = vol.backing.join("envelopefs.toml");
    fs::rename(&config, vol.dir.path().join("config.real")).unwrap();
    mkfifo(&config);
    for cmd in [&["fsck"][..], &["key", "status"]] {
        let child = bin()
            .args(cmd)
            .arg("--key-file")
            .arg(&vol.key)
            .arg(&vol.backing)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = finishes(child, &format!("{cmd:?}"));
        assert!(!out.status.success(), "{cmd:?} accepted a FIFO as the config");
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn reencrypt_reaches_names_near_name_max() {
    for vol in [TestVolume::hidden(4096), TestVolume::new(4096)] {
        let m = vol.mount(&[]);
        let mut names = Vec::new();
        for len in [144usize, 150, 159, 200, 255] {
            let n = OsString::from_vec(vec![b'n'; len]);
            fs::write(m.path("").join(&n), pattern(len as u64, 5000)).unwrap();
            names.push((n, len));
        }
        m.unmount();
        let out = cli(&[&"rekey", &"--reencrypt", &"--key-file", &vol.key, &vol.backing]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rekey --reencrypt: {text}");
        let m = vol.mount(&[]);
        for (n, len) in &names {
            assert_eq!(fs::read(m.path("").join(n)).unwrap(), pattern(*len as u64, 5000));
        }
        m.unmount();
    }
}
