//! Extended-attribute values bound to their file (format 6, docs/FORMAT.md §12): a value
//! copied in the backing directory from one file to another, or back onto its own file
//! after `rekey --reencrypt`, reads as EIO with a log line; `upgrade` from format 5 keeps
//! every value readable; the limits THREAT-MODEL.md states (directories) hold as stated.

use crate::common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use common::{cli, cli_with_trust, Mounted, TestVolume};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The `user.*` names of a backing object, as stored.
fn raw_names(p: &Path) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: the path is NUL-terminated and `buf` is writable for its length.
    let n = unsafe { libc::llistxattr(cpath(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {p:?}: {}", std::io::Error::last_os_error());
    buf[..n as usize].split(|&b| b == 0).filter(|n| n.starts_with(b"user.")).map(<[u8]>::to_vec).collect()
}

/// getxattr(2): the value, or the errno.
fn get(p: &Path, name: &[u8]) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: both strings are NUL-terminated and `buf` is writable for its length.
    let len = unsafe { libc::lgetxattr(cpath(p).as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

fn set(p: &Path, name: &[u8], value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated and `value` is readable for its length.
    let r = unsafe { libc::lsetxattr(cpath(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {p:?}: {}", std::io::Error::last_os_error());
}

/// The one stored `user.*` xattr of a backing object: (stored name, stored value).
fn raw_one(p: &Path) -> (Vec<u8>, Vec<u8>) {
    let names = raw_names(p);
    assert_eq!(names.len(), 1, "{p:?}: {names:?}");
    let v = get(p, &names[0]).unwrap();
    (names[0].clone(), v)
}

/// A volume as `init` makes it now.
fn current_volume() -> TestVolume {
    TestVolume::with_format(4096, envelopefs::volume::config::FORMAT)
}

/// The backing path of `rel` (names are hidden).
fn backing_of(backing: &Path, key: &Path, rel: &str) -> PathBuf {
    let out = cli(&[&"name", &"encrypt", &backing, &rel, &"--key-file", &key]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    backing.join(String::from_utf8_lossy(&out.stdout).trim())
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The attack of issue #24, item 9: `user.note` of a, copied onto b in the backing
/// directory, read through the mount. Before format 6 it read a's value.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn an_xattr_value_copied_to_another_file_reads_as_eio() {
    let v = current_volume();
    let m = v.mount(&[]);
    fs::write(m.path("a"), b"content of a").unwrap();
    fs::write(m.path("b"), b"content of b").unwrap();
    fs::write(m.path("empty"), b"").unwrap();
    set(&m.path("a"), b"user.note", b"a's secret note");
    set(&m.path("b"), b"user.note", b"b's own note");
    set(&m.path("empty"), b"user.note", b"on an empty file");
    drop(m);

    let (ba, bb, be) = (
        backing_of(&v.backing, &v.key, "a"),
        backing_of(&v.backing, &v.key, "b"),
        backing_of(&v.backing, &v.key, "empty"),
    );
    assert_eq!(fs::metadata(&be).unwrap().len(), common::HEADER, "an xattr gives an empty file its header");
    let (name, a_value) = raw_one(&ba);
    set(&bb, &name, &a_value);
    set(&be, &name, &a_value);

    let m = v.mount(&[]);
    assert_eq!(get(&m.path("a"), b"user.note").unwrap(), b"a's secret note");
    assert_eq!(get(&m.path("b"), b"user.note"), Err(libc::EIO), "a's value must not read on b");
    assert_eq!(get(&m.path("empty"), b"user.note"), Err(libc::EIO), "nor on a file that was empty");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"content of b", "the content is untouched");
    let log = m.log_text();
    assert!(log.contains("does not authenticate"), "{log}");
    assert!(log.contains("user.note"), "the log line names the attribute: {log}");
    drop(m);
    let out = cli(&[&"fsck", &"--key-file", &v.key, &v.backing]);
    assert_eq!(out.status.code(), Some(1), "fsck finds both: {}", text(&out));
    assert_eq!(text(&out).matches("xattr").count(), 2, "{}", text(&out));
}

/// `rekey --reencrypt` gives a file a new file id: its values are sealed again under it,
/// and a value saved before (the old binding) pasted back reads as EIO.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn reencrypt_reseals_xattrs_and_the_old_value_pasted_back_is_eio() {
    let v = current_volume();
    let m = v.mount(&[]);
    fs::write(m.path("f"), b"some content").unwrap();
    set(&m.path("f"), b"user.note", b"before the rekey");
    drop(m);
    let bf = backing_of(&v.backing, &v.key, "f");
    let (name, old) = raw_one(&bf);

    let out = cli(&[&"rekey", &"--reencrypt", &"--key-file", &v.key, &v.backing]);
    assert!(out.status.success(), "{}", text(&out));
    let (_, new) = raw_one(&bf);
    assert_ne!(new, old, "sealed again");
    let m = v.mount(&[]);
    assert_eq!(get(&m.path("f"), b"user.note").unwrap(), b"before the rekey");
    drop(m);

    set(&bf, &name, &old);
    let m = v.mount(&[]);
    assert_eq!(get(&m.path("f"), b"user.note"), Err(libc::EIO), "the old file id's value");
    assert!(m.log_text().contains("does not authenticate"), "{}", m.log_text());
}

/// What format 6 leaves bound by name only (THREAT-MODEL.md): directories. A value moved
/// from a file to a directory does not read there either (another key), and one moved
/// between directories does (the limit stated).
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn values_move_between_directories_only() {
    let v = current_volume();
    let m = v.mount(&[]);
    fs::write(m.path("f"), b"x").unwrap();
    for d in ["d1", "d2"] {
        fs::create_dir(m.path(d)).unwrap();
        set(&m.path(d), b"user.note", d.as_bytes());
    }
    set(&m.path("f"), b"user.note", b"file");
    drop(m);
    let (bf, d1, d2) = (
        backing_of(&v.backing, &v.key, "f"),
        backing_of(&v.backing, &v.key, "d1"),
        backing_of(&v.backing, &v.key, "d2"),
    );
    let (name, fv) = raw_one(&bf);
    let (_, d1v) = raw_one(&d1);
    set(&d2, &name, &fv);
    let m = v.mount(&[]);
    assert_eq!(get(&m.path("d2"), b"user.note"), Err(libc::EIO), "a file's value on a directory");
    drop(m);
    set(&d2, &name, &d1v);
    set(&bf, &name, &d1v);
    let m = v.mount(&[]);
    assert_eq!(get(&m.path("d2"), b"user.note").unwrap(), b"d1", "the stated limit: directories");
    assert_eq!(get(&m.path("f"), b"user.note"), Err(libc::EIO), "a directory's value on a file");
}

/// A format-5 volume (the v5 fixture) with xattrs on a file, an empty file and a
/// directory, written by this release's format-5 code, then `upgrade`d: format 6, every
/// value reads back, the empty file has a header, and the file's value no longer moves.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn upgrade_from_format_5_reseals_every_file_xattr() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v5-shared-keyfile-4k"), tmp.path());
    let backing = tmp.path().join("backing");
    let key = tmp.path().join("volume.key");
    let host = tmp.path().join("trust");
    let mnt = tmp.path().join("mnt");
    let mount = || Mounted::start_trusting(&host, &backing, "--key-file", &key, &mnt, &[], |_| {});
    let m = mount();
    set(&m.path("small.txt"), b"user.note", b"on a file");
    set(&m.path("empty"), b"user.note", b"on an empty file");
    set(&m.path("dir"), b"user.note", b"on a directory");
    set(&m.path("multi"), b"user.other", b"second file");
    drop(m);
    let be = backing_of(&backing, &key, "empty");
    assert_eq!(fs::metadata(&be).unwrap().len(), 0, "format 5 makes no header for an xattr");

    let out = cli_with_trust(&host, &[&"upgrade", &"--key-file", &key, &backing]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("format 6"), "{}", text(&out));
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(cfg.contains("format = 6") && cfg.contains("shared = true"), "{cfg}");
    assert_eq!(fs::metadata(&be).unwrap().len(), common::HEADER, "upgrade gave the empty file a header");
    let again = cli_with_trust(&host, &[&"upgrade", &"--key-file", &key, &backing]);
    assert!(again.status.success() && text(&again).contains("already format 6"), "{}", text(&again));
    let out = cli_with_trust(&host, &[&"fsck", &"--key-file", &key, &backing]);
    assert!(out.status.success(), "{}", text(&out));

    let m = mount();
    assert_eq!(get(&m.path("small.txt"), b"user.note").unwrap(), b"on a file");
    assert_eq!(get(&m.path("empty"), b"user.note").unwrap(), b"on an empty file");
    assert_eq!(get(&m.path("dir"), b"user.note").unwrap(), b"on a directory");
    assert_eq!(get(&m.path("multi"), b"user.other").unwrap(), b"second file");
    assert_eq!(fs::read(m.path("small.txt")).unwrap(), b"hello from envelopefs format v1\n");
    // A new empty file of the shared volume gets its header (under the header lock) too.
    fs::write(m.path("new-empty"), b"").unwrap();
    set(&m.path("new-empty"), b"user.note", b"made after the upgrade");
    assert_eq!(get(&m.path("new-empty"), b"user.note").unwrap(), b"made after the upgrade");
    drop(m);
    assert_eq!(fs::metadata(backing_of(&backing, &key, "new-empty")).unwrap().len(), common::HEADER);
    let (name, value) = raw_one(&backing_of(&backing, &key, "small.txt"));
    set(&backing_of(&backing, &key, "one-block"), &name, &value);
    let m = mount();
    assert_eq!(get(&m.path("one-block"), b"user.note"), Err(libc::EIO));
}

/// An `upgrade` cut off after the config said format 6 (`upgrading`), with one file's value
/// still bound by name: mounts are refused (exit 17), fsck says so, and `upgrade` run
/// again finishes; every value reads back.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn an_interrupted_upgrade_refuses_mounts_until_run_again() {
    use envelopefs::names::XattrBinding;
    let v = current_volume();
    let m = v.mount(&[]);
    fs::write(m.path("f"), b"content").unwrap();
    fs::write(m.path("e"), b"").unwrap();
    set(&m.path("f"), b"user.note", b"bound before");
    drop(m);
    let be = backing_of(&v.backing, &v.key, "e");
    {
        // The state a cut `upgrade` leaves: `upgrading` set, a value of format 5's kind.
        let src = TestVolume::source_for(&v.key);
        let mut vol = envelopefs::volume::Volume::open(&v.backing, &src, &common::open_options()).unwrap();
        vol.set_upgrading(true).unwrap();
        let names = vol.names().unwrap();
        let stored = names.encrypt_xattr_name(b"user.note").unwrap();
        set(&be, &stored, &names.seal_xattr_value(XattrBinding::Name, &stored, b"not yet bound").unwrap());
    }
    let mnt = v.dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = cli(&[&"mount", &"--key-file", &v.key, &v.backing, &mnt]);
    if out.status.success() {
        let _m = Mounted::adopt(&mnt);
        panic!("mounted during an unfinished upgrade");
    }
    assert_eq!(out.status.code(), Some(17), "{}", text(&out));
    assert!(text(&out).contains("did not finish"), "{}", text(&out));
    let out = cli(&[&"fsck", &"--key-file", &v.key, &v.backing]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("did not finish"), "{}", text(&out));

    let out = cli(&[&"upgrade", &"--key-file", &v.key, &v.backing]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("values sealed anew: 1, in files: 1; empty files given a header: 1"), "{}", text(&out));
    assert!(!fs::read_to_string(v.backing.join("envelopefs.toml")).unwrap().contains("upgrading"));
    let m = v.mount(&[]);
    assert_eq!(get(&m.path("f"), b"user.note").unwrap(), b"bound before");
    assert_eq!(get(&m.path("e"), b"user.note").unwrap(), b"not yet bound");
}
