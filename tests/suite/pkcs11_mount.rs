//! Mounted volumes whose KEK lives in a real PKCS#11 token (SoftHSM2).

use crate::common;

use std::fs;
use std::process::Command;

use common::{cli, pattern, Mounted, SOFTHSM_MODULE};

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2: --features fuse_tests,pkcs11_tests"
)]
fn pkcs11_volume_round_trip_rotate_and_deleted_key() {
    let (d, backing, pin, text) = common::pkcs11_volume("mount", "kek");
    assert!(
        text.contains("key store   PKCS#11 key pkcs11:token=mount;object=kek") && !text.contains("Pkcs11 {"),
        "{text}"
    );
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(cfg.contains("kind = \"pkcs11\"") && !cfg.contains("1234"), "{cfg}");
    assert!(!backing.join("envelopefs.keyring").exists());
    let mnt = d.path().join("mnt");
    let mount = || Mounted::start_with(&backing, "--pin-file", &pin, &mnt, &[]);

    let a = pattern(1, 10_000);
    let m = mount();
    fs::write(m.path("a"), &a).unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), a);
    assert!(m.unmount().success());
    let m = mount();
    assert_eq!(fs::read(m.path("a")).unwrap(), a, "after a restart");
    drop(m);
    let inspect = ok(cli(&[&"inspect", &backing.join("a")]));
    assert!(inspect.contains("provider pkcs11, KEK \"pkcs11:token=mount;object=kek\" version 1"), "{inspect}");

    // Rotate: new files use version 2, old ones still open.
    let text = ok(cli(&[&"key", &"rotate", &"--pin-file", &pin, &backing]));
    assert!(text.contains("version 2 is now current"), "{text}");
    let m = mount();
    fs::write(m.path("b"), b"after rotation").unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), a);
    drop(m);
    assert!(ok(cli(&[&"inspect", &backing.join("b")])).contains("version 2"));
    let out = cli(&[&"key", &"status", &"--pin-file", &pin, &backing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("ERROR"), "a healthy token logs no ERROR lines: {err}");
    let status = ok(out);
    // Nor under a RUST_LOG that does not name the cryptoki crate.
    let out = Command::new(common::BIN)
        .env("ENVELOPEFS_TRUST_DIR", common::trust_dir())
        .env("RUST_LOG", "info")
        .args(["key", "status", "--pin-file"])
        .arg(&pin)
        .arg(&backing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("ERROR"), "RUST_LOG=info: {err}");
    assert!(status.contains("version 1: 1 files") && status.contains("version 2 (current): 1 files"), "{status}");

    // A wrong PIN is refused at mount, clearly.
    let wrong = common::softhsm().join("wrong-pin");
    let out = cli(&[&"mount", &"--pin-file", &wrong, &backing, &mnt]);
    assert_eq!(out.status.code(), Some(11), "a wrong PIN is a wrong secret");
    assert!(String::from_utf8_lossy(&out.stderr).contains("PIN"), "{}", String::from_utf8_lossy(&out.stderr));

    // Delete version 1 from the token: files wrapped by it are EACCES, the rest work.
    let out = Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM_MODULE, "--token-label", "mount", "--login", "--pin", "1234"])
        .args(["--delete-object", "--type", "secrkey", "--label", "kek/v1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = mount();
    let e = fs::File::open(m.path("a")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"after rotation");
    let log = m.log_text();
    assert!(log.contains("/a") && log.contains("kek/v1"), "the log names the file and the key: {log}");
    drop(m);
    let out = cli(&[&"key", &"status", &"--pin-file", &pin, &backing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("ERROR"), "a healthy token logs no ERROR lines: {err}");
    let status = ok(out);
    assert!(status.contains("version 1 (MISSING from the key store): 1 files"), "{status}");
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2: --features fuse_tests,pkcs11_tests"
)]
fn pkcs11_key_create_then_init_uses_it() {
    let pin = common::softhsm_token("rotate");
    let text = ok(cli(&[
        &"key",
        &"create",
        &"--module",
        &SOFTHSM_MODULE,
        &"--key",
        &"pkcs11:token=rotate;object=app",
        &"--pin-file",
        &pin,
    ]));
    assert!(text.contains("version 1 is current"), "{text}");
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("b");
    fs::create_dir(&backing).unwrap();
    // The PIN through the URI's pin-source this time.
    let uri = format!("pkcs11:token=rotate;object=app?pin-source=file:{}&module-path={SOFTHSM_MODULE}", pin.display());
    ok(cli(&[&"init", &"--plaintext-names", &"--provider", &"pkcs11", &"--key", &uri, &backing]));
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(!cfg.contains("pin-source"), "the PIN source is not stored: {cfg}");
    let m = Mounted::start_with(&backing, "--pin-file", &pin, &d.path().join("m"), &[]);
    fs::write(m.path("x"), b"x").unwrap();
    assert_eq!(fs::read(m.path("x")).unwrap(), b"x");
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2: --features fuse_tests,pkcs11_tests"
)]
fn pkcs11_rekey_to_another_key_then_the_old_one_can_go() {
    let (d, backing, pin, _) = common::pkcs11_volume("deleted", "old");
    let mnt = d.path().join("mnt");
    let m = Mounted::start_with(&backing, "--pin-file", &pin, &mnt, &[]);
    let files: Vec<_> = (0..6).map(|i| (format!("f{i}"), pattern(70 + i, 6000))).collect();
    for (n, data) in &files {
        fs::write(m.path(n), data).unwrap();
    }
    drop(m);
    let new = "pkcs11:token=deleted;object=new";
    let text = ok(cli(&[&"rekey", &"--rewrap", &"--to-key", &new, &"--pin-file", &pin, &backing]));
    assert!(text.contains("6 files changed"), "{text}");
    assert!(fs::read_to_string(backing.join("envelopefs.toml")).unwrap().contains("object=new"));
    let out = cli(&[&"key", &"status", &"--pin-file", &pin, &backing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("ERROR"), "a healthy token logs no ERROR lines: {err}");
    let status = ok(out);
    assert!(status.contains("version 1 (current): 6 files") && !status.contains("another key"), "{status}");
    let out = Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM_MODULE, "--token-label", "deleted", "--login", "--pin", "1234"])
        .args(["--delete-object", "--type", "secrkey", "--label", "old/v1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = Mounted::start_with(&backing, "--pin-file", &pin, &mnt, &[]);
    for (n, data) in &files {
        assert_eq!(&fs::read(m.path(n)).unwrap(), data, "{n}");
    }
}
