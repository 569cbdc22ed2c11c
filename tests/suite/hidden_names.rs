//! Hidden names (format 4) through a real mount: nothing the user named shows in the
//! backing directory, every name of every legal length comes back after a remount, names
//! changed in the backing directory are refused, and a kill -9 during renames of long
//! names leaves no orphaned side file and no name that does not resolve.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use common::{cli, TestVolume};

const MARK: &[u8] = b"ZQXJMARK";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn name(parts: &[&[u8]]) -> std::ffi::OsString {
    OsStr::from_bytes(&parts.concat()).to_owned()
}

/// Every path, symlink target, xattr name and value and file byte below `root`.
fn backing_leaks(root: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
            if contains(&rel, needle) {
                out.push(format!("path {p:?}"));
            }
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                if contains(fs::read_link(&p).unwrap().as_os_str().as_bytes(), needle) {
                    out.push(format!("symlink target of {p:?}"));
                }
                continue;
            }
            for x in xattr_names(&p) {
                if contains(&x, needle) {
                    out.push(format!("xattr name on {p:?}"));
                }
                if contains(&xattr_value(&p, &x), needle) {
                    out.push(format!("xattr value on {p:?}"));
                }
            }
            if meta.is_dir() {
                stack.push(p);
            } else if contains(&fs::read(&p).unwrap(), needle) {
                out.push(format!("content of {p:?}"));
            }
        }
    }
    out
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn xattr_names(p: &Path) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: the path is NUL-terminated and `buf` is writable for its length.
    let n = unsafe { libc::llistxattr(cpath(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {p:?}");
    buf[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()).map(<[u8]>::to_vec).collect()
}

fn xattr_value(p: &Path, name: &[u8]) -> Vec<u8> {
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: both strings are NUL-terminated and `buf` is writable for its length.
    let len = unsafe { libc::lgetxattr(cpath(p).as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(len >= 0, "lgetxattr {p:?}");
    buf.truncate(len as usize);
    buf
}

fn set_xattr(p: &Path, name: &[u8], value: &[u8]) {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated and `value` is readable for its length.
    let r = unsafe { libc::setxattr(cpath(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {p:?}: {}", std::io::Error::last_os_error());
}

/// Side files (`~….name`) whose entry is missing.
fn orphans(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let n = e.file_name();
            let b = n.as_bytes();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if b.starts_with(b"~") && b.ends_with(b".name") {
                let main = dir.join(OsStr::from_bytes(&b[..b.len() - 5]));
                if fs::symlink_metadata(&main).is_err() {
                    out.push(e.path());
                }
            }
        }
    }
    out
}

fn fsck(vol: &TestVolume) -> std::process::Output {
    cli(&[&"fsck", &"--key-file", &vol.key, &vol.backing])
}

fn assert_fsck_clean(vol: &TestVolume) {
    let out = fsck(vol);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fsck: {text}");
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn no_name_target_or_xattr_shows_in_the_backing_directory_and_all_come_back() {
    let vol = TestVolume::hidden(4096);
    let long = name(&[MARK, &[b'n'; 247]]);
    assert_eq!(long.len(), 255);
    let long_dir = name(&[MARK, b"-dir-", &[b'd'; 190]]);
    let non_utf8 = name(&[MARK, b"\xff\xfe-bytes"]);
    let target = [MARK, b"-target/../x"].concat();
    let audit = vol.dir.path().join("audit.log");
    {
        let m = vol.mount(&["--audit-log", audit.to_str().unwrap()]);
        fs::create_dir(m.path("ZQXJMARK-dir")).unwrap();
        fs::write(m.path("ZQXJMARK-dir/ZQXJMARK-file"), b"short name").unwrap();
        fs::write(m.mnt.join(&long), b"255 bytes").unwrap();
        fs::write(m.mnt.join(&non_utf8), b"not utf-8").unwrap();
        fs::create_dir(m.mnt.join(&long_dir)).unwrap();
        fs::write(m.mnt.join(&long_dir).join(&long), b"long in long").unwrap();
        std::os::unix::fs::symlink(OsStr::from_bytes(&target), m.path("ZQXJMARK-link")).unwrap();
        set_xattr(&m.path("ZQXJMARK-dir/ZQXJMARK-file"), b"user.ZQXJMARK", b"ZQXJMARK-value");
        // Long names through link, rename (long to long, long to short, short to long) and unlink.
        let long2 = name(&[MARK, &[b'o'; 200]]);
        fs::hard_link(m.mnt.join(&long), m.mnt.join(&long2)).unwrap();
        fs::rename(m.mnt.join(&long2), m.path("ZQXJMARK-dir/ZQXJMARK-was-long")).unwrap();
        let long3 = name(&[MARK, &[b'p'; 230]]);
        fs::write(m.path("ZQXJMARK-short"), b"becomes long").unwrap();
        fs::rename(m.path("ZQXJMARK-short"), m.mnt.join(&long3)).unwrap();
        let gone = name(&[MARK, &[b'q'; 220]]);
        fs::write(m.mnt.join(&gone), b"removed").unwrap();
        fs::remove_file(m.mnt.join(&gone)).unwrap();

        let too_long = name(&[MARK, &[b'n'; 248]]);
        let e = fs::write(m.mnt.join(&too_long), b"").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "{e}");
        assert_eq!(fs::symlink_metadata(m.path("ZQXJMARK-link")).unwrap().len(), target.len() as u64);
        assert!(m.unmount().success());
    }
    // The audit log (host state) names files as the mount shows them.
    let log = fs::read_to_string(&audit).unwrap();
    assert!(log.contains("\"plain_path\":\"ZQXJMARK-dir/ZQXJMARK-file\""), "{log}");
    let leaks = backing_leaks(&vol.backing, MARK);
    assert!(leaks.is_empty(), "the marker shows in the backing directory: {leaks:#?}");
    assert!(orphans(&vol.backing).is_empty(), "{:?}", orphans(&vol.backing));

    let m = vol.mount(&[]);
    let mut top: Vec<_> = fs::read_dir(&m.mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    top.sort();
    let mut want = vec![
        OsStr::new("ZQXJMARK-dir").to_owned(),
        OsStr::new("ZQXJMARK-link").to_owned(),
        long.clone(),
        long_dir.clone(),
        non_utf8.clone(),
        name(&[MARK, &[b'p'; 230]]),
    ];
    want.sort();
    assert_eq!(top, want);
    assert_eq!(fs::read(m.path("ZQXJMARK-dir/ZQXJMARK-file")).unwrap(), b"short name");
    assert_eq!(fs::read(m.mnt.join(&long)).unwrap(), b"255 bytes");
    assert_eq!(fs::read(m.mnt.join(&non_utf8)).unwrap(), b"not utf-8");
    assert_eq!(fs::read(m.mnt.join(&long_dir).join(&long)).unwrap(), b"long in long");
    assert_eq!(fs::read(m.path("ZQXJMARK-dir/ZQXJMARK-was-long")).unwrap(), b"255 bytes");
    assert_eq!(fs::read_link(m.path("ZQXJMARK-link")).unwrap().as_os_str().as_bytes(), &target[..]);
    let xp = m.path("ZQXJMARK-dir/ZQXJMARK-file");
    assert_eq!(xattr_names(&xp), vec![b"user.ZQXJMARK".to_vec()]);
    assert_eq!(xattr_value(&xp, b"user.ZQXJMARK"), b"ZQXJMARK-value");
    assert_eq!(fs::metadata(m.mnt.join(&long)).unwrap().nlink(), 2);
    drop(m);
    assert_fsck_clean(&vol);
}

use std::os::unix::fs::MetadataExt;

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn names_changed_in_the_backing_directory_are_left_out_and_fsck_names_them() {
    let vol = TestVolume::hidden(4096);
    let long_a = name(&[&[b'a'; 200]]);
    let long_b = name(&[&[b'b'; 200]]);
    {
        let m = vol.mount(&[]);
        for n in ["keep", "renamed-behind", "x"] {
            fs::write(m.path(n), n.as_bytes()).unwrap();
        }
        fs::write(m.mnt.join(&long_a), b"a").unwrap();
        fs::write(m.mnt.join(&long_b), b"b").unwrap();
    }
    let entries: Vec<PathBuf> = fs::read_dir(&vol.backing).unwrap().map(|e| e.unwrap().path()).collect();
    let mains: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| {
            let n = p.file_name().unwrap().as_bytes();
            !n.starts_with(b"envelopefs") && !n.starts_with(b"~") && !n.starts_with(b".")
        })
        .collect();
    assert_eq!(mains.len(), 3);
    // One entry renamed to another valid-looking name, a file planted, one long name's side
    // file given the other's content.
    let victim = mains[0];
    let mut changed = victim.file_name().unwrap().as_bytes().to_vec();
    changed[5] = if changed[5] == b'A' { b'B' } else { b'A' };
    fs::rename(victim, vol.backing.join(OsStr::from_bytes(&changed))).unwrap();
    fs::write(vol.backing.join("planted.txt"), b"not ours").unwrap();
    let sides: Vec<&PathBuf> = entries.iter().filter(|p| p.to_string_lossy().ends_with(".name")).collect();
    assert_eq!(sides.len(), 2);
    fs::copy(sides[0], sides[1]).unwrap();

    let m = vol.mount(&[]);
    let listed: Vec<_> = fs::read_dir(&m.mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(listed.len(), 3, "only the untouched names are listed: {listed:?}");
    assert!(!listed.iter().any(|n| n == "planted.txt"));
    let log = fs::read_to_string(&m.log).unwrap();
    assert!(log.contains("planted.txt: left out of the listing"), "{log}");
    assert!(log.contains("holds another name"), "{log}");
    drop(m);
    let out = fsck(&vol);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("planted.txt") && text.contains("name does not decrypt"), "{text}");
    assert!(text.contains("holds another name"), "{text}");
}

/// kill -9 of the daemon while a process renames long names back and forth (and through
/// short ones): after a remount every name resolves, a listing leaves no side file without
/// its entry, and fsck is clean.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_kill_during_renames_of_long_names_leaves_every_name_resolving_and_no_orphans() {
    let vol = TestVolume::hidden(4096);
    let n = 24;
    let long = |i: usize, gen: usize| format!("{i:02}-{gen}-{}", "L".repeat(180 + i));
    let mut m = vol.mount(&[]);
    for i in 0..n {
        fs::write(m.mnt.join(long(i, 0)), format!("file {i}")).unwrap();
    }
    let mnt = m.mnt.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = done.clone();
    let storm = std::thread::spawn(move || {
        let mut cur: Vec<String> = (0..n).map(|i| long(i, 0)).collect();
        for round in 1.. {
            for (i, c) in cur.iter_mut().enumerate() {
                let to = if round % 3 == 0 { format!("{i:02}-{round}-short") } else { long(i, round) };
                if fs::rename(mnt.join(&*c), mnt.join(&to)).is_err() {
                    return round;
                }
                *c = to;
            }
            counter.store(round, std::sync::atomic::Ordering::SeqCst);
        }
        unreachable!()
    });
    // Kill in the middle of a round, after every kind of rename (long to long, long to
    // short, short to long) has run.
    let start = std::time::Instant::now();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 4 {
        assert!(start.elapsed().as_secs() < 120, "the storm did not get going");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(3));
    m.kill9();
    let rounds = storm.join().unwrap();
    assert!(rounds > 4, "the storm ran {rounds} rounds before the kill");
    drop(m);

    let m = vol.mount(&[]);
    let names: Vec<String> =
        fs::read_dir(&m.mnt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.len(), n, "{names:?}");
    for i in 0..n {
        let mine: Vec<&String> = names.iter().filter(|s| s.starts_with(&format!("{i:02}-"))).collect();
        assert_eq!(mine.len(), 1, "file {i}: {mine:?}");
        assert_eq!(fs::read(m.mnt.join(mine[0])).unwrap(), format!("file {i}").as_bytes());
    }
    drop(m);
    assert!(orphans(&vol.backing).is_empty(), "{:?}", orphans(&vol.backing));
    assert_fsck_clean(&vol);
}

/// What a crash between a side file and its stand-in leaves: fsck reports it, a listing
/// of its directory removes it, and fsck is then clean.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn an_orphaned_side_file_is_reported_then_removed_by_a_listing() {
    let vol = TestVolume::hidden(4096);
    {
        let m = vol.mount(&[]);
        fs::create_dir(m.path("d")).unwrap();
        fs::write(m.path("d").join("L".repeat(200)), b"x").unwrap();
    }
    let d = fs::read_dir(&vol.backing).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).expect("the directory");
    let side =
        fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().ends_with(".name")).unwrap();
    let stand_in = PathBuf::from(side.to_string_lossy().trim_end_matches(".name"));
    // As if the daemon died after writing the side file, before making the entry.
    fs::remove_file(&stand_in).unwrap();
    assert_eq!(orphans(&vol.backing), vec![side.clone()]);
    let out = fsck(&vol);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("whose entry is gone"));
    {
        let m = vol.mount(&[]);
        assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 0);
    }
    assert!(orphans(&vol.backing).is_empty());
    assert_fsck_clean(&vol);
}

/// A listing read a few entries at a time, with creates and deletes in between, gives each
/// name that was there at opendir exactly once, at stable offsets (the kernel resumes a
/// listing at the offset of the last entry it took).
#[test]
fn readdir_offsets_stay_stable_across_concurrent_creates_and_deletes() {
    use envelopefs::fs::{Caller, ROOT_INO};
    const ROOT: Caller = common::ROOT;
    let vol = TestVolume::hidden(4096);
    let fs = vol.fs();
    let names: Vec<String> =
        (0..40).map(|i| if i % 4 == 0 { format!("{i}-{}", "l".repeat(190)) } else { format!("{i}") }).collect();
    for n in &names {
        let (_, fh) = fs.create(ROOT_INO, OsStr::new(n), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        fs.release(fh);
    }
    let dh = fs.opendir(ROOT_INO).unwrap();
    let (mut seen, mut offset, mut round) = (Vec::new(), 0u64, 0);
    loop {
        let mut got = 0;
        fs.readdir(dh, offset, |e, off| {
            seen.push(e.name.to_string_lossy().into_owned());
            offset = off;
            got += 1;
            got == 3
        })
        .unwrap();
        if got == 0 {
            break;
        }
        round += 1;
        fs.unlink(ROOT_INO, OsStr::new(&names[(round * 7) % names.len()])).ok();
        let (_, fh) = fs.create(ROOT_INO, OsStr::new(&format!("new-{round}")), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        fs.release(fh);
    }
    fs.releasedir(dh);
    let mut want: Vec<String> = names.clone();
    want.extend([".".into(), "..".into()]);
    want.sort();
    seen.sort();
    assert_eq!(seen, want);
}

/// Targets up to PATH_MAX − 1 bytes: one too long for a backing symlink once encrypted is
/// kept in the volume's target store, and still reads back, with its length in `lstat`.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn symlink_targets_of_every_legal_length_work() {
    let vol = TestVolume::hidden(4096);
    let targets: Vec<Vec<u8>> = [1usize, 3055, 3056, 4000, 4095]
        .iter()
        .map(|&n| [MARK.to_vec(), vec![b't'; n.saturating_sub(MARK.len())]].concat()[..n].to_vec())
        .collect();
    {
        let m = vol.mount(&[]);
        for (i, t) in targets.iter().enumerate() {
            std::os::unix::fs::symlink(OsStr::from_bytes(t), m.path(&format!("l{i}"))).unwrap();
        }
        let too_long = vec![b't'; 4096];
        let e = std::os::unix::fs::symlink(OsStr::from_bytes(&too_long), m.path("x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    }
    assert!(backing_leaks(&vol.backing, MARK).is_empty());
    let m = vol.mount(&[]);
    for (i, t) in targets.iter().enumerate() {
        let p = m.path(&format!("l{i}"));
        assert_eq!(fs::read_link(&p).unwrap().as_os_str().as_bytes(), &t[..], "target of {} bytes", t.len());
        assert_eq!(fs::symlink_metadata(&p).unwrap().len(), t.len() as u64, "lstat size of a {}-byte target", t.len());
    }
    drop(m);
    assert_fsck_clean(&vol);
    // A removed symlink's long target stays in the store until fsck --repair.
    {
        let m = vol.mount(&[]);
        fs::remove_file(m.path("l4")).unwrap();
    }
    let out = fsck(&vol);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no symlink names any more"));
    let out = cli(&[&"fsck", &"--repair", &"--key-file", &vol.key, &vol.backing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_fsck_clean(&vol);
    let m = vol.mount(&[]);
    assert_eq!(fs::read_link(m.path("l3")).unwrap().as_os_str().as_bytes(), &targets[3][..]);
}

/// A side file replaced by a symlink out of the volume, or by a FIFO: nothing outside the
/// backing directory is opened, nothing waits on the FIFO (a lookup, a listing, the audit
/// log's plain path and fsck all finish), and the names are left out and reported.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn side_files_swapped_for_a_symlink_or_a_fifo_are_neither_followed_nor_waited_on() {
    let vol = TestVolume::hidden(4096);
    let (a, b) = ("A".repeat(200), "B".repeat(200));
    {
        let m = vol.mount(&[]);
        fs::create_dir(m.path("d")).unwrap();
        fs::write(m.path("d").join(&a), b"secret").unwrap();
        fs::write(m.path("d").join(&b), b"other").unwrap();
    }
    let d = fs::read_dir(&vol.backing).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
    let sides: Vec<PathBuf> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".name"))
        .collect();
    assert_eq!(sides.len(), 2);
    let fifo = |p: &Path| {
        let c = cpath(p);
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    };
    let outside = vol.dir.path().join("outside-fifo");
    fifo(&outside);
    fs::remove_file(&sides[0]).unwrap();
    std::os::unix::fs::symlink(&outside, &sides[0]).unwrap();
    fs::remove_file(&sides[1]).unwrap();
    fifo(&sides[1]);

    let audit = vol.dir.path().join("audit.log");
    let m = vol.mount(&["--audit-log", audit.to_str().unwrap()]);
    let timed = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new("timeout")
            .env("ENVELOPEFS_TRUST_DIR", common::trust_dir())
            .arg("10")
            .args(args)
            .output()
            .unwrap()
    };
    for n in [&a, &b] {
        let out = timed(&["cat".as_ref(), m.path("d").join(n).as_os_str()]);
        assert_ne!(out.status.code(), Some(124), "reading a file by its name hung");
    }
    let out = timed(&["ls".as_ref(), m.path("d").as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "listing: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "both names are left out");
    fs::write(m.path("still-works"), b"x").unwrap();
    // The audit writer resolved those names too: a daemon that stops waits for it.
    assert!(m.unmount().success());
    let out = timed(&[
        common::BIN.as_ref(),
        "fsck".as_ref(),
        "--key-file".as_ref(),
        vol.key.as_os_str(),
        vol.backing.as_os_str(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not a regular file"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Logs and `status` name a failing file by its plaintext path (host-side only), beside
/// its backing path, so an incident needs no `name decrypt` step.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn failures_are_logged_with_the_plaintext_path() {
    let vol = TestVolume::hidden(4096);
    let m = vol.mount(&[]);
    fs::create_dir(m.path("payroll")).unwrap();
    fs::write(m.path("payroll/salaries.txt"), vec![7u8; 9000]).unwrap();
    drop(m);
    let rel = String::from_utf8(
        cli(&[&"name", &"encrypt", &"--key-file", &vol.key, &vol.backing, &"payroll/salaries.txt"]).stdout,
    )
    .unwrap();
    let backing = std::path::PathBuf::from(rel.trim());
    let backing = if backing.is_absolute() { backing } else { vol.backing.join(backing) };
    let mut raw = fs::read(&backing).unwrap();
    let n = raw.len();
    raw[n - 20] ^= 1;
    fs::write(&backing, raw).unwrap();
    let m = vol.mount(&[]);
    let err = fs::read(m.path("payroll/salaries.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(m.log_text().contains("/payroll/salaries.txt (backing "), "{}", m.log_text());
    let status = String::from_utf8_lossy(&cli(&[&"status", &m.mnt]).stdout).into_owned();
    assert!(status.contains("/payroll/salaries.txt"), "{status}");
    drop(m);
    // fsck names it too, with BACKING given relative, as typed in its parent.
    let out = common::bin()
        .current_dir(vol.dir.path())
        .args(["fsck", "--key-file", "volume.key", "backing"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(payroll/salaries.txt)"), "{text}");
}

/// A temporary a crash left (a side file being written when the daemon died) is removed
/// by the next mount's crash recovery, so fsck finds the volume clean. The crash is a
/// kill -9; the temporary is put where the killed write would have left it.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_temporary_a_crash_left_goes_at_the_next_mount() {
    let vol = TestVolume::hidden(4096);
    let mut m = vol.mount(&[]);
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"x").unwrap();
    m.kill9();
    drop(m);
    let dir = fs::read_dir(&vol.backing).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
    let tmp = dir.join(".0123456789abcdef.envelopefs-reencrypt");
    fs::write(&tmp, b"half a side file").unwrap();
    let m = vol.mount(&[]);
    assert!(!tmp.exists(), "the crash's temporary is still there");
    assert_eq!(fs::read(m.path("d/f")).unwrap(), b"x");
    drop(m);
    assert_fsck_clean(&vol);
}
