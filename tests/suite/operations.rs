//! The day-2 procedures of docs/OPERATIONS.md, each run as written: a backup of a live
//! volume, its restore after the keys moved on, a move to another directory.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{cli, TestVolume};

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

fn copy_tree(from: &Path, to: &Path) {
    let out = Command::new("cp").arg("-a").arg(from).arg(to).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// Backup of a live volume (a copy of the backing directory, checked with fsck), then
/// `key rotate`, `rekey --rewrap` and `key retire` on the original, then the backup
/// restored in place: refused as a rollback until `trust --accept-rollback`, then it
/// reads as it was.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_backup_restored_after_the_keys_moved_on_opens_once_accepted() {
    let v = TestVolume::new(4096);
    let m = v.mount(&[]);
    fs::write(m.path("ledger"), b"as backed up").unwrap();
    // The backup, taken while mounted, after the writers synced.
    let backup = v.dir.path().join("backup");
    copy_tree(&v.backing, &backup);
    drop(m);
    let key = [&"--key-file" as &dyn AsRef<std::ffi::OsStr>, &v.key];
    ok(cli(&[&"fsck", key[0], key[1], &v.backing]));
    ok(cli(&[&"key", &"rotate", key[0], key[1], &v.backing]));
    ok(cli(&[&"rekey", &"--rewrap", key[0], key[1], &v.backing]));
    ok(cli(&[&"key", &"retire", key[0], key[1], &v.backing, &"1"]));

    // Restore in place.
    fs::remove_dir_all(&v.backing).unwrap();
    copy_tree(&backup, &v.backing);
    let out = cli(&[&"fsck", key[0], key[1], &v.backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", text(&out));
    assert!(text(&out).contains("older"), "says it is a rollback: {}", text(&out));
    let shown = ok(cli(&[&"trust", &"--yes", &"--accept-rollback", key[0], key[1], &v.backing]));
    assert!(shown.contains("rollback: this host has seen keyring version 3"), "{shown}");
    assert!(shown.contains("accepted: keyring version 1"), "{shown}");
    ok(cli(&[&"fsck", key[0], key[1], &v.backing]));
    let m = v.mount(&[]);
    assert_eq!(fs::read(m.path("ledger")).unwrap(), b"as backed up");
}

/// A volume moved to another directory: refused at the new place until `trust` accepts
/// it there; then it mounts, and its crash journal is its own.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_moved_volume_opens_at_its_new_place_once_accepted() {
    let v = TestVolume::new(4096);
    let m = v.mount(&[]);
    fs::write(m.path("f"), b"moved").unwrap();
    drop(m);
    let moved = v.dir.path().join("moved");
    fs::rename(&v.backing, &moved).unwrap();
    let key = [&"--key-file" as &dyn AsRef<std::ffi::OsStr>, &v.key];
    let out = cli(&[&"fsck", key[0], key[1], &moved]);
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", text(&out));
    ok(cli(&[&"trust", &"--yes", key[0], key[1], &moved]));
    let m = common::Mounted::start(&moved, &v.key, &v.dir.path().join("mnt2"), &[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"moved");
}

/// `key passwd`: a local volume's passphrase changes in place; the old one no longer opens
/// it, the files read as before, and a mounted volume is left alone (exit 17).
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn key_passwd_changes_the_passphrase_and_keeps_the_files() {
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = d.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let (old, new) = (d.path().join("old"), d.path().join("new"));
    fs::write(&old, "old passphrase\n").unwrap();
    fs::write(&new, "new passphrase\n").unwrap();
    let cheap = ["--kdf-memory-mib", "8", "--kdf-iterations", "1"];
    let mut init: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"init", &"--passphrase-file", &old];
    init.extend(cheap.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    init.push(&backing);
    ok(cli(&init));
    let mnt = d.path().join("mnt");
    let m = common::Mounted::start_with(&backing, "--passphrase-file", &old, &mnt, &[]);
    fs::write(m.path("f"), b"kept").unwrap();
    let mut passwd: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"key", &"passwd", &"--passphrase-file", &old, &"--new-passphrase-file", &new];
    passwd.extend(cheap.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    passwd.push(&backing);
    let out = cli(&passwd);
    assert_eq!(out.status.code(), Some(17), "changed under a running mount: {}", text(&out));
    assert!(m.unmount().success());
    ok(cli(&passwd));
    let out = cli(&[&"fsck", &"--passphrase-file", &old, &backing]);
    assert_eq!(out.status.code(), Some(11), "the old passphrase still opens it: {}", text(&out));
    let m = common::Mounted::start_with(&backing, "--passphrase-file", &new, &mnt, &[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"kept");
}
