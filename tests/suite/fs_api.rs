//! `EncryptedFs` driven directly (no mount): crash leftovers, repair, reserved names.

use crate::common;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use common::{cli, pattern, TestVolume, ROOT};
use envelopefs::fs::ROOT_INO;

#[test]
fn torn_tail_fragment_is_cut_before_the_file_grows() {
    let vol = TestVolume::new(4096);
    let fs = vol.fs();
    let (attr, fh) = fs.create(ROOT_INO, OsStr::new("f"), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
    let data = pattern(1, 8192);
    fs.write(fh, 0, &data, ROOT).unwrap();
    // A crash mid-append left 10 bytes of a third block.
    let backing = vol.backing.join("f");
    let f = OpenOptions::new().write(true).open(&backing).unwrap();
    let len = fs::metadata(&backing).unwrap().len();
    f.write_all_at(&[0xAB; 10], len).unwrap();
    assert_eq!(fs.getattr(attr.ino).unwrap().size, 8192, "the fragment is not content");
    // A write well past the end must not leave the fragment inside a non-final block.
    fs.write(fh, 5 * 4096, b"later", ROOT).unwrap();
    let all = fs.read(fh, 0, 6 * 4096).unwrap();
    assert_eq!(&all[..8192], &data[..]);
    assert!(all[8192..5 * 4096].iter().all(|&b| b == 0));
    assert_eq!(&all[5 * 4096..], b"later");
    fs.release(fh);
}

#[test]
fn fsck_repair_fixes_what_it_can_and_reports_the_rest() {
    let vol = TestVolume::new(4096);
    {
        let fs = vol.fs();
        for (name, seed) in [("torn-append", 1), ("torn-slot", 2), ("bit-flip", 3)] {
            let (_, fh) = fs.create(ROOT_INO, OsStr::new(name), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
            fs.write(fh, 0, &pattern(seed, 3 * 4096), ROOT).unwrap();
            fs.release(fh);
        }
    }
    let open = |n: &str| OpenOptions::new().write(true).open(vol.backing.join(n)).unwrap();
    // A torn append: the last block is only half written.
    open("torn-append").write_all_at(&[0x55; 2000], 4096 + 2 * 4124 + 100).unwrap();
    // A torn header copy.
    open("torn-slot").write_all_at(&[0; 1000], 50).unwrap();
    // A flipped bit in the middle block: reported, never "repaired".
    open("bit-flip").write_all_at(&[0xFF], 4096 + 4124 + 50).unwrap();

    let run = |repair: bool| {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"fsck", &"--key-file", &vol.key];
        if repair {
            args.push(&"--repair");
        }
        args.push(&vol.backing);
        let out = cli(&args);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, text) = run(false);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("torn-append: last block 2 does not authenticate"), "{text}");
    assert!(text.contains("torn-slot: header copy 0 is damaged"), "{text}");
    assert!(text.contains("bit-flip: block 1 does not authenticate"), "{text}");
    assert!(text.contains("3 problems, 0 repaired"), "{text}");

    let (code, text) = run(true);
    assert_eq!(code, Some(1), "the bit flip remains: {text}");
    assert!(text.contains("2 repaired"), "{text}");
    let (_, text) = run(false);
    assert!(text.contains("1 problems"), "{text}");

    let fs = vol.fs();
    let attr = fs.lookup(ROOT_INO, OsStr::new("torn-append")).unwrap();
    assert_eq!(attr.size, 2 * 4096);
    let fh = fs.open(attr.ino, libc::O_RDWR, ROOT).unwrap();
    assert_eq!(fs.read(fh, 0, 8192).unwrap(), pattern(1, 3 * 4096)[..8192]);
    fs.write(fh, 8192, b"appendable again", ROOT).unwrap();
    fs.release(fh);
}

#[test]
fn the_volumes_own_files_are_out_of_reach() {
    let vol = TestVolume::new(4096);
    let fs = vol.fs();
    for name in ["envelopefs.toml", "envelopefs.keyring"] {
        assert_eq!(fs.lookup(ROOT_INO, OsStr::new(name)).unwrap_err().errno(), libc::ENOENT);
        assert_eq!(fs.unlink(ROOT_INO, OsStr::new(name)).unwrap_err().errno(), libc::EPERM);
        let e = fs.create(ROOT_INO, OsStr::new(name), 0o644, 0, libc::O_RDWR, ROOT).unwrap_err();
        assert_eq!(e.errno(), libc::EPERM);
    }
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("..")).unwrap_err().errno(), libc::ENOENT);
    let d = fs.mkdir(ROOT_INO, OsStr::new("d"), 0o755, 0, ROOT).unwrap();
    // Only the root's names are reserved.
    let (a, fh) = fs.create(d.ino, OsStr::new("envelopefs.toml"), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
    fs.release(fh);
    let e = fs.rename(d.ino, OsStr::new("envelopefs.toml"), ROOT_INO, OsStr::new("envelopefs.toml"), 0).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    let mut names = Vec::new();
    let dh = fs.opendir(ROOT_INO).unwrap();
    fs.readdir(dh, 0, |e, _| {
        names.push(e.name.clone());
        false
    })
    .unwrap();
    fs.releasedir(dh);
    names.sort();
    assert_eq!(names, vec![".", "..", "d"]);
    assert!(a.ino > 1);
    // A custom keyring location inside the backing directory is refused at init.
    let d2 = tempfile::tempdir().unwrap();
    let b = d2.path().join("b");
    fs::create_dir(&b).unwrap();
    let ring = b.join("myring");
    let out = cli(&[&"init", &"--plaintext-names", &"--key-file", &vol.key, &"--keyring", &ring, &b]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the backing directory"));
    let outside = d2.path().join("ring");
    assert!(cli(&[&"init", &"--plaintext-names", &"--key-file", &vol.key, &"--keyring", &outside, &b])
        .status
        .success());
    assert!(outside.exists());
}

#[test]
fn forgotten_inodes_release_their_descriptors() {
    let vol = TestVolume::new(4096);
    let fs = vol.fs();
    let before = fs.inode_count();
    let mut inos = Vec::new();
    for i in 0..50 {
        let (a, fh) = fs.create(ROOT_INO, OsStr::new(&format!("f{i}")), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        fs.release(fh);
        let again = fs.lookup(ROOT_INO, OsStr::new(&format!("f{i}"))).unwrap();
        assert_eq!(again.ino, a.ino);
        inos.push(a.ino);
    }
    assert_eq!(fs.inode_count(), before + 50);
    for ino in inos {
        fs.forget(ino, 2);
    }
    assert_eq!(fs.inode_count(), before);
}

#[test]
fn readdirplus_counts_a_lookup_per_entry_and_gives_back_what_does_not_fit() {
    let vol = TestVolume::new(4096);
    let fs = vol.fs();
    for i in 0..5 {
        let (a, fh) = fs.create(ROOT_INO, OsStr::new(&format!("f{i}")), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        fs.write(fh, 0, &pattern(i, 100 * (i as usize + 1)), ROOT).unwrap();
        fs.release(fh);
        fs.forget(a.ino, 1);
    }
    let base = fs.inode_count();
    let dh = fs.opendir(ROOT_INO).unwrap();
    let mut seen = Vec::new();
    // Room for ".", "..", and two files: the third file does not fit and is given back.
    fs.readdirplus(dh, 0, |e, _, a| {
        if seen.len() == 4 {
            return true;
        }
        seen.push((e.name.clone(), a.size));
        false
    })
    .unwrap();
    assert_eq!(fs.inode_count(), base + 2, "two files were handed out with a lookup each");
    let files: Vec<_> = seen.iter().filter(|(n, _)| n != "." && n != "..").collect();
    assert_eq!(files.len(), 2);
    for (name, size) in files {
        let i: u64 = name.to_str().unwrap()[1..].parse().unwrap();
        assert_eq!(*size, 100 * (i + 1), "plaintext size in the attributes");
    }
    fs.releasedir(dh);
}

/// One verdict per file: a header pasted from another file is refused by the mount (EIO on
/// open) and reported as such by fsck, which does not "repair" it by cutting blocks.
#[test]
fn a_pasted_header_gets_one_verdict_from_the_mount_and_from_fsck() {
    let vol = TestVolume::new(4096);
    {
        let fs = vol.fs();
        for (name, seed) in [("a", 1), ("b", 2)] {
            let (_, fh) = fs.create(ROOT_INO, OsStr::new(name), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
            fs.write(fh, 0, &pattern(seed, 3 * 4096), ROOT).unwrap();
            fs.release(fh);
        }
    }
    let header_a = fs::read(vol.backing.join("a")).unwrap()[..4096].to_vec();
    OpenOptions::new().write(true).open(vol.backing.join("b")).unwrap().write_all_at(&header_a, 0).unwrap();
    let len_before = fs::metadata(vol.backing.join("b")).unwrap().len();

    let fs = vol.fs();
    let b = fs.lookup(ROOT_INO, OsStr::new("b")).unwrap();
    assert_eq!(fs.open(b.ino, libc::O_RDONLY, ROOT).unwrap_err().errno(), libc::EIO);
    drop(fs);

    let out = cli(&[&"fsck", &"--repair", &"--key-file", &vol.key, &vol.backing]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("/b:")).collect();
    assert_eq!(lines.len(), 1, "one verdict for b: {text}");
    assert!(lines[0].starts_with("PROBLEM:") && lines[0].contains("pasted from another file"), "{text}");
    assert_eq!(fs::metadata(vol.backing.join("b")).unwrap().len(), len_before, "nothing was cut");
}

#[test]
fn reencryption_temporaries_are_hidden_and_refused_everywhere() {
    let vol = TestVolume::new(4096);
    fs::create_dir(vol.backing.join("d")).unwrap();
    fs::write(vol.backing.join("d/.x.envelopefs-reencrypt"), b"").unwrap();
    let fs = vol.fs();
    let d = fs.lookup(ROOT_INO, OsStr::new("d")).unwrap();
    let name = OsStr::new(".x.envelopefs-reencrypt");
    assert_eq!(fs.lookup(d.ino, name).unwrap_err().errno(), libc::ENOENT);
    let fh = fs.opendir(d.ino).unwrap();
    let mut names = Vec::new();
    fs.readdir(fh, 0, |e, _| {
        names.push(e.name.clone());
        false
    })
    .unwrap();
    assert_eq!(names, [".", ".."]);
    let e = fs.create(d.ino, OsStr::new("y.envelopefs-reencrypt"), 0o644, 0, libc::O_RDWR, ROOT).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
}

/// With room for one descriptor, every inode is found again on almost every call: after
/// renames of a directory and of files (plain and RENAME_EXCHANGE), a hard link with one
/// name removed, and an unlink of a file that stays open, each inode still reaches its own
/// object, in both ways of finding it.
fn evicted_inodes_follow_the_mounts_own_changes(handles: envelopefs::fs::FileHandles) {
    let vol = TestVolume::new(4096);
    let fs = vol.fs().with_inode_fds(handles, 1).unwrap();
    assert_eq!(fs.inode_fds().1, 1);
    let name = OsStr::new;
    let d = fs.mkdir(ROOT_INO, name("d"), 0o755, 0, ROOT).unwrap();
    let e = fs.mkdir(ROOT_INO, name("e"), 0o755, 0, ROOT).unwrap();
    let mut files = Vec::new();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let (attr, fh) = fs.create(d.ino, name(n), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        fs.write(fh, 0, &pattern(i as u64, 100 + i), ROOT).unwrap();
        fs.release(fh);
        files.push(attr.ino);
    }
    let sizes =
        |fs: &envelopefs::fs::EncryptedFs| files.iter().map(|&i| fs.getattr(i).unwrap().size).collect::<Vec<_>>();
    // The directory moves: its children are found through it, not by a path.
    fs.rename(ROOT_INO, name("d"), e.ino, name("moved"), 0).unwrap();
    assert_eq!(sizes(&fs), [100, 101, 102]);
    // Files swap names, then one moves to another directory.
    fs.rename(d.ino, name("a"), d.ino, name("b"), libc::RENAME_EXCHANGE).unwrap();
    fs.rename(d.ino, name("c"), ROOT_INO, name("c2"), 0).unwrap();
    assert_eq!(sizes(&fs), [100, 101, 102]);
    assert_eq!(fs.lookup(d.ino, name("b")).unwrap().ino, files[0], "b is now what was a");
    fs.forget(files[0], 1);
    // A second name, then the first removed: the inode lives on through the second.
    fs.link(files[1], ROOT_INO, name("link")).unwrap();
    fs.unlink(d.ino, name("a")).unwrap();
    assert_eq!(fs.getattr(files[1]).unwrap().nlink, 1);
    assert_eq!(fs.getattr(files[1]).unwrap().size, 101);
    // Unlinked while open: still readable, and its attributes still answer.
    let fh = fs.open(files[2], libc::O_RDONLY, ROOT).unwrap();
    fs.unlink(ROOT_INO, name("c2")).unwrap();
    fs.getattr(d.ino).unwrap(); // evicts c2's descriptor
    assert_eq!(fs.getattr(files[2]).unwrap().nlink, 0);
    assert_eq!(fs.read(fh, 0, 200).unwrap(), pattern(2, 102));
    fs.release(fh);
    assert!(fs.inode_fds().0 <= 1, "never more than the cap is kept");
}

#[test]
fn evicted_inodes_found_by_name_follow_the_mounts_own_changes() {
    evicted_inodes_follow_the_mounts_own_changes(envelopefs::fs::FileHandles::Never);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "needs root (open_by_handle_at): --features fuse_tests")]
fn evicted_inodes_found_by_handle_follow_the_mounts_own_changes() {
    evicted_inodes_follow_the_mounts_own_changes(envelopefs::fs::FileHandles::Always);
}
