//! Fixture volumes made by released format versions. Every later version must still open
//! them and read back the same bytes. Regenerate only for a new format version:
//! `ENVELOPEFS_WRITE_FIXTURES=1 cargo test --test suite --features fuse_tests -- --ignored fixtures::make_fixtures`.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{cli, pattern, Mounted};

/// (path in the volume, expected content). `None`: a symlink to small.txt.
fn expected() -> Vec<(&'static str, Option<Vec<u8>>)> {
    let mut sparse = vec![0u8; 1 << 20];
    sparse[..5].copy_from_slice(b"start");
    sparse[(1 << 20) - 3..].copy_from_slice(b"end");
    vec![
        ("empty", Some(Vec::new())),
        ("small.txt", Some(b"hello from envelopefs format v1\n".to_vec())),
        ("one-block", Some(pattern(1, 4096))),
        ("multi", Some(pattern(2, 3 * 4096 + 1000))),
        ("sparse", Some(sparse)),
        ("dir/nested/file", Some(pattern(3, 5000))),
        ("link", None),
    ]
}

struct Fixture {
    name: &'static str,
    block_size: u32,
    /// Unlock arguments, relative to the fixture directory.
    secret: (&'static str, &'static str),
}

const FIXTURES: [Fixture; 6] = [
    Fixture { name: "v1-keyfile-4k", block_size: 4096, secret: ("--key-file", "volume.key") },
    Fixture { name: "v1-passphrase-1k", block_size: 1024, secret: ("--passphrase-file", "passphrase") },
    Fixture { name: "v2-keyfile-4k", block_size: 4096, secret: ("--key-file", "volume.key") },
    // Format 4: hidden names, with a long name (a side file) beside the common tree.
    Fixture { name: "v4-names-keyfile-4k", block_size: 4096, secret: ("--key-file", "volume.key") },
    // Format 5: a shared volume (`init --shared`), otherwise as format 4.
    Fixture { name: "v5-shared-keyfile-4k", block_size: 4096, secret: ("--key-file", "volume.key") },
    // Format 6: xattr values bound to their file (`XATTRS`), otherwise as format 4.
    Fixture { name: "v6-bound-xattrs-keyfile-4k", block_size: 4096, secret: ("--key-file", "volume.key") },
];

/// The `user.note` values of format 6's fixture: a file, an empty file (given a header by
/// its value), a directory (bound by name).
const XATTRS: [(&str, &[u8]); 3] =
    [("small.txt", b"bound to small.txt"), ("empty", b"bound to an empty file"), ("dir", b"on a directory")];

/// Whether a fixture has hidden names (formats 4 to 6).
fn hidden_names(fx: &Fixture) -> bool {
    ["v4", "v5", "v6"].iter().any(|v| fx.name.starts_with(v))
}

fn get_xattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let (p, n) = (std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap(), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and `buf` is writable for its length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// A name of format 4's long kind (a stand-in and a side file), in `v4-…` only.
fn long_name() -> String {
    format!("long-{}", "n".repeat(200))
}

/// Format 3 (key slots), made from `v2-keyfile-4k` by `key slot add --new-recovery-key`
/// and `rekey --rewrap`: the local keyring and an age recovery recipient.
const V3: Fixture = Fixture { name: "v3-slots-keyfile-4k", block_size: 4096, secret: ("--key-file", "volume.key") };

/// Broken volumes, made from `v2-keyfile-4k` (or `v3-…`, `v6-…`): each must be refused
/// with exit 16 (tampered) and a message naming what is wrong.
const BROKEN: [(&str, &str); 13] = [
    ("broken-v2-edited-config", "does not authenticate under the volume key"),
    ("broken-v2-config-as-v1", "format 1"),
    ("broken-v2-old-keyring-cost", "KDF cost is refused"),
    // Made when format 3 did not exist yet; the MAC covers the format.
    ("broken-format-3", "does not authenticate under the volume key"),
    // Made when format 4 did not exist yet: a format-2 config claiming 4 lacks its names.
    ("broken-format-4", "format 4 without its names scheme"),
    // Made when format 5 did not exist yet: a format-2 config claiming 5 lacks its names.
    ("broken-format-5", "format 5 without its names scheme"),
    // Made when format 6 did not exist yet: a format-2 config claiming 6 lacks its names.
    ("broken-format-6", "format 6 without its names scheme"),
    ("broken-format-7", "format 7 is not supported"),
    // Format 6's config edited to say 5 (values read by name only): its keyring knows better
    // (and the MAC covers the format).
    ("broken-v6-format-as-5", "belongs to a format-6 volume"),
    // Format 5's config with `shared` removed: the MAC covers it.
    ("broken-v5-sharing-dropped", "does not authenticate under the volume key"),
    // Format 4's config with its names field removed (a silent downgrade to plaintext names).
    ("broken-v4-names-dropped", "format 4 without its names scheme"),
    ("broken-v3-slots-as-v2", "format 2 with key slots"),
    // The v2 config put back over a v3 volume (a downgrade): its keyring knows better.
    ("broken-v3-config-rolled-back-to-v2", "belongs to a format-3 volume"),
];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A fixture copied to `to`, with its xattrs put back (see `save_xattrs`).
fn copy_fixture(from: &Path, to: &Path) {
    common::copy_tree(from, to);
    let Ok(list) = fs::read_to_string(to.join("xattrs")) else { return };
    for line in list.lines() {
        let mut f = line.split('\t');
        let (path, name, value) = (f.next().unwrap(), f.next().unwrap(), hex::decode(f.next().unwrap()).unwrap());
        let p = std::ffi::CString::new(to.join(path).into_os_string().into_encoded_bytes()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        // SAFETY: both strings are NUL-terminated and `value` is readable for its length.
        let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        assert_eq!(r, 0, "{path}: {}", std::io::Error::last_os_error());
    }
}

/// Git keeps no xattrs: a fixture's are listed in `xattrs` beside `backing` (a line each:
/// backing path, stored name, value in hex) and put back on every copy.
fn save_xattrs(dir: &Path) {
    let mut lines = Vec::new();
    let mut stack = vec![dir.join("backing")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            let p = std::ffi::CString::new(e.path().into_os_string().into_encoded_bytes()).unwrap();
            let mut names = vec![0u8; 65536];
            // SAFETY: the path is NUL-terminated and `names` is writable for its length.
            let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
            for name in names[..n.max(0) as usize].split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
                let c = std::ffi::CString::new(name).unwrap();
                let mut v = vec![0u8; 65536];
                // SAFETY: both strings are NUL-terminated and `v` is writable for its length.
                let len = unsafe { libc::lgetxattr(p.as_ptr(), c.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
                assert!(len >= 0);
                let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                lines.push(format!("{rel}\t{}\t{}\n", String::from_utf8_lossy(name), hex::encode(&v[..len as usize])));
            }
        }
    }
    lines.sort();
    fs::write(dir.join("xattrs"), lines.concat()).unwrap();
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn every_fixture_volume_still_opens_and_reads_back() {
    for fx in FIXTURES.into_iter().chain([V3]) {
        let src = fixture_dir(fx.name);
        assert!(src.join("backing/envelopefs.toml").is_file(), "fixture {} is missing", fx.name);
        let tmp = tempfile::tempdir().unwrap();
        copy_fixture(&src, tmp.path());
        let backing = tmp.path().join("backing");
        let secret = tmp.path().join(fx.secret.1);

        // Fixtures made from one another share a volume id, as a restored backup would, so
        // each is opened as on a host that sees only it.
        let host = tmp.path().join("trust");
        let out = common::cli_with_trust(&host, &[&"fsck", &fx.secret.0, &secret, &backing]);
        assert!(
            out.status.success(),
            "{}: fsck: {}{}",
            fx.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let mnt = tmp.path().join("mnt");
        let m = Mounted::start_trusting(&host, &backing, fx.secret.0, &secret, &mnt, &["--read-only"], |_| {});
        for (path, content) in expected() {
            let p = m.path(path);
            match content {
                Some(c) => assert_eq!(fs::read(&p).unwrap(), c, "{}: {path}", fx.name),
                None => {
                    assert_eq!(fs::read_link(&p).unwrap(), PathBuf::from("small.txt"));
                    assert_eq!(fs::read(&p).unwrap(), b"hello from envelopefs format v1\n");
                }
            }
        }
        let e = fs::write(m.path("new"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "read-only mount refuses writes");
        if hidden_names(&fx) {
            assert_eq!(fs::read(m.path(&long_name())).unwrap(), b"a long name", "{}", fx.name);
            assert!(!backing.join("small.txt").exists() && !backing.join("dir").exists(), "names are hidden");
            let names = cli(&[&"name", &"encrypt", &backing, &"dir/nested/file", &fx.secret.0, &secret]);
            let rel = String::from_utf8_lossy(&names.stdout).trim().to_owned();
            assert!(backing.join(&rel).is_file(), "{}: name encrypt gave {rel:?}", fx.name);
            let back = cli(&[&"name", &"decrypt", &backing, &rel, &fx.secret.0, &secret]);
            assert_eq!(String::from_utf8_lossy(&back.stdout).trim(), "dir/nested/file");
        }
        if fx.name.starts_with("v6") {
            for (path, value) in XATTRS {
                assert_eq!(get_xattr(&m.path(path), "user.note").unwrap(), value, "{}: {path}", fx.name);
            }
        }
    }
}

#[test]
fn broken_fixtures_are_refused_as_tampered() {
    for (name, why) in BROKEN {
        let src = fixture_dir(name);
        assert!(src.join("backing/envelopefs.toml").is_file(), "fixture {name} is missing");
        let tmp = tempfile::tempdir().unwrap();
        common::copy_tree(&src, tmp.path());
        let backing = tmp.path().join("backing");
        // On a host that never saw the volume: the files themselves must give it away.
        let fresh = tempfile::tempdir().unwrap();
        let key = tmp.path().join("volume.key");
        let out = common::cli_with_trust(fresh.path(), &[&"fsck", &"--key-file", &key, &backing]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{name}: {err}");
        assert!(err.contains(why), "{name}: {err}");
    }
}

/// The format-3 fixture also opens with its recovery key alone: on a host that never saw
/// it, with its volume check value; and every file reads back.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn the_v3_fixture_opens_with_its_recovery_key() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_tree(&fixture_dir(V3.name), tmp.path());
    let backing = tmp.path().join("backing");
    let rk = tmp.path().join("recovery.key");
    let check = fs::read_to_string(tmp.path().join("volume-check")).unwrap().trim().to_owned();
    let inspect = String::from_utf8_lossy(&cli(&[&"inspect", &backing.join("multi")]).stdout).into_owned();
    assert_eq!(inspect.matches("provider recovery").count(), 2, "{inspect}");
    let host = tmp.path().join("trust");
    let m = Mounted::start_trusting(
        &host,
        &backing,
        "--recovery-key",
        &rk,
        &tmp.path().join("mnt"),
        &["--volume-check", &check],
        |_| {},
    );
    for (path, content) in expected() {
        if let Some(c) = content {
            assert_eq!(fs::read(m.path(path)).unwrap(), c, "{path}");
        }
    }
}

/// A volume whose headers were rewritten twice by `rekey --rewrap` after a rotation: its
/// slots are at generations 2 and 3, under KEK version 2. It opens and reads back.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_rewrapped_fixture_at_generation_3_opens() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_tree(&fixture_dir("v2-rewrapped-gen3"), tmp.path());
    let backing = tmp.path().join("backing");
    let key = tmp.path().join("volume.key");
    let inspect = String::from_utf8_lossy(&cli(&[&"inspect", &backing.join("multi")]).stdout).into_owned();
    assert!(inspect.contains("generation 3") && inspect.contains("generation 2"), "{inspect}");
    assert!(inspect.contains("version 2,"), "{inspect}");
    let host = tmp.path().join("trust");
    let out = common::cli_with_trust(&host, &[&"fsck", &"--key-file", &key, &backing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let m =
        Mounted::start_trusting(&host, &backing, "--key-file", &key, &tmp.path().join("mnt"), &["--read-only"], |_| {});
    for (path, content) in expected() {
        if let Some(c) = content {
            assert_eq!(fs::read(m.path(path)).unwrap(), c, "{path}");
        }
    }
}

/// A volume with the damage fsck exists for: a torn header copy, a torn append and a
/// flipped bit in a middle block. fsck names each; `--repair` fixes the first two and
/// only reports the third.
#[test]
fn fsck_of_the_broken_fixture_names_each_problem() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_tree(&fixture_dir("broken-for-fsck"), tmp.path());
    let backing = tmp.path().join("backing");
    let key = tmp.path().join("volume.key");
    let run = |repair: bool| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"fsck", &"--key-file", &key];
        if repair {
            args.push(&"--repair");
        }
        args.push(&backing);
        let out = common::cli_with_trust(&tmp.path().join("trust"), &args);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = run(false);
    assert_eq!(code, Some(1), "{text}");
    let problems: Vec<&str> = text.lines().filter(|l| l.starts_with("PROBLEM")).collect();
    assert_eq!(problems.len(), 3, "{text}");
    assert!(text.contains("/small.txt: header copy 0 is damaged"), "{text}");
    assert!(text.contains("/one-block: last block 0") || text.contains("/one-block: block 0"), "{text}");
    assert!(text.contains("/multi: block 1 does not authenticate"), "{text}");
    let (code, text) = run(true);
    assert_eq!(code, Some(1), "the bit flip stays: {text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("repaired")).count(), 2, "{text}");
    let (_, text) = run(false);
    assert_eq!(text.lines().filter(|l| l.starts_with("PROBLEM")).count(), 1, "{text}");
}

#[test]
#[ignore = "writes the fixtures (mounting, as root); run only for a new format version"]
fn make_fixtures() {
    if std::env::var_os("ENVELOPEFS_WRITE_FIXTURES").is_none() {
        return;
    }
    for fx in FIXTURES {
        let dir = fixture_dir(fx.name);
        if dir.exists() {
            continue; // fixtures are never rewritten
        }
        let backing = dir.join("backing");
        fs::create_dir_all(&backing).unwrap();
        let secret = dir.join(fx.secret.1);
        if fx.secret.0 == "--key-file" {
            fs::write(&secret, pattern(99, 32)).unwrap();
        } else {
            fs::write(&secret, "fixture passphrase, not a secret\n").unwrap();
        }
        let bs = fx.block_size.to_string();
        let mut init: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"init",
            &fx.secret.0,
            &secret,
            &"--block-size",
            &bs,
            &"--kdf-memory-mib",
            &"8",
            &"--kdf-iterations",
            &"1",
            &backing,
        ];
        if fx.name.starts_with("v5") {
            init.push(&"--shared");
        }
        let out = cli(&init);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let tmp = tempfile::tempdir().unwrap();
        let m = Mounted::start_with(&backing, fx.secret.0, &secret, &tmp.path().join("mnt"), &[]);
        for (path, content) in expected() {
            let p = m.path(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            match content {
                Some(c) if path == "sparse" => {
                    let f = fs::File::create(&p).unwrap();
                    f.set_len(c.len() as u64).unwrap();
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&c[..5], 0).unwrap();
                    f.write_all_at(&c[c.len() - 3..], c.len() as u64 - 3).unwrap();
                }
                Some(c) => fs::write(&p, c).unwrap(),
                None => std::os::unix::fs::symlink("small.txt", &p).unwrap(),
            }
        }
        if hidden_names(&fx) {
            fs::write(m.path(&long_name()), b"a long name").unwrap();
        }
        if fx.name.starts_with("v6") {
            for (path, value) in XATTRS {
                use std::os::unix::ffi::OsStrExt;
                let (p, n) = (std::ffi::CString::new(m.path(path).as_os_str().as_bytes()).unwrap(), c"user.note");
                // SAFETY: both strings are NUL-terminated and `value` is readable for its length.
                let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
                assert_eq!(r, 0, "{path}: {}", std::io::Error::last_os_error());
            }
            drop(m);
            save_xattrs(&dir);
        }
    }
    make_broken_fixtures();
    make_v3_fixtures();
}

fn make_v3_fixtures() {
    let src = fixture_dir("v2-keyfile-4k");
    let v3 = fixture_dir(V3.name);
    if !v3.exists() {
        common::copy_tree(&src, &v3);
        let (b, key, rk) = (v3.join("backing"), v3.join("volume.key"), v3.join("recovery.key"));
        let trust = tempfile::tempdir().unwrap();
        let out = common::cli_with_trust(
            trust.path(),
            &[&"key", &"slot", &"add", &"--new-recovery-key", &rk, &"--key-file", &key, &b],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let check = text.lines().find_map(|l| l.strip_prefix("volume check ")).unwrap().split(' ').next().unwrap();
        fs::write(v3.join("volume-check"), format!("{check}\n")).unwrap();
        let out = common::cli_with_trust(trust.path(), &[&"rekey", &"--rewrap", &"--key-file", &key, &b]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let edit = |name: &str, from: &Path, f: &dyn Fn(&Path)| {
        let dir = fixture_dir(name);
        if !dir.exists() {
            common::copy_tree(from, &dir);
            f(&dir.join("backing"));
        }
    };
    let config = |b: &Path| b.join("envelopefs.toml");
    edit("broken-format-4", &src, &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("format = 2", "format = 4");
        fs::write(config(b), text).unwrap();
    });
    edit("broken-v3-slots-as-v2", &v3, &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("format = 3", "format = 2");
        fs::write(config(b), text).unwrap();
    });
    edit("broken-v3-config-rolled-back-to-v2", &v3, &|b| {
        fs::copy(src.join("backing/envelopefs.toml"), config(b)).unwrap();
    });
    edit("broken-format-5", &src, &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("format = 2", "format = 5");
        fs::write(config(b), text).unwrap();
    });
    edit("broken-format-6", &src, &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("format = 2", "format = 6");
        fs::write(config(b), text).unwrap();
    });
    edit("broken-format-7", &src, &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("format = 2", "format = 7");
        fs::write(config(b), text).unwrap();
    });
    edit("broken-v6-format-as-5", &fixture_dir("v6-bound-xattrs-keyfile-4k"), &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("format = 6", "format = 5");
        fs::write(config(b), text).unwrap();
    });
    edit("broken-v5-sharing-dropped", &fixture_dir("v5-shared-keyfile-4k"), &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("shared = true\n", "");
        fs::write(config(b), text).unwrap();
    });
    edit("broken-v4-names-dropped", &fixture_dir("v4-names-keyfile-4k"), &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("names = \"aes-siv\"\n", "");
        fs::write(config(b), text).unwrap();
    });
}

fn make_broken_fixtures() {
    let src = fixture_dir("v2-keyfile-4k");
    let key = src.join("volume.key");
    let edit = |name: &str, f: &dyn Fn(&Path)| {
        let dir = fixture_dir(name);
        if dir.exists() {
            return;
        }
        common::copy_tree(&src, &dir);
        f(&dir.join("backing"));
    };
    let config = |b: &Path| b.join("envelopefs.toml");
    edit("broken-v2-edited-config", &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("block_size = 4096", "block_size = 8192");
        fs::write(config(b), text).unwrap();
    });
    edit("broken-v2-config-as-v1", &|b| {
        let mut t: toml::Table = fs::read_to_string(config(b)).unwrap().parse().unwrap();
        t.insert("format".into(), 1.into());
        for k in ["generation", "mac", "volume_key"] {
            t.remove(k);
        }
        fs::write(config(b), toml::to_string(&t).unwrap()).unwrap();
    });
    edit("broken-format-3", &|b| {
        let text = fs::read_to_string(config(b)).unwrap().replace("format = 2", "format = 3");
        fs::write(config(b), text).unwrap();
    });
    edit("v2-rewrapped-gen3", &|b| {
        let trust = tempfile::tempdir().unwrap();
        for args in [&["key", "rotate"][..], &["rekey", "--rewrap"]] {
            let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> =
                args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>).collect();
            all.extend([&"--key-file" as &dyn AsRef<std::ffi::OsStr>, &key, &b]);
            let out = common::cli_with_trust(trust.path(), &all);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    });
    edit("broken-for-fsck", &|b| {
        use std::os::unix::fs::FileExt;
        let open = |n: &str| fs::OpenOptions::new().write(true).open(b.join(n)).unwrap();
        open("small.txt").write_all_at(&[0; 100], 40).unwrap(); // a torn header copy
        let one = b.join("one-block");
        let len = fs::metadata(&one).unwrap().len();
        open("one-block").write_all_at(&[0x55; 60], len - 100).unwrap(); // a torn (re)write of its last block
        open("multi").write_all_at(&[0xFF], 4096 + 4124 + 77).unwrap(); // a flipped bit in block 1
    });
    edit("broken-v2-old-keyring-cost", &|b| {
        // A keyring demanding an absurd Argon2id cost (sealed by a key file, but the cost
        // is refused before the kind of seal matters).
        let k = b.join("envelopefs.keyring");
        let mut raw = fs::read(&k).unwrap();
        raw[8] = 1;
        raw[12..16].copy_from_slice(&(4u32 << 20).to_le_bytes());
        raw[16..20].copy_from_slice(&64u32.to_le_bytes());
        fs::write(&k, raw).unwrap();
    });
}
