//! Attacks by someone who can write the backing directory and then waits for the admin's
//! usual `mount`, `fsck`, `key` or `rekey`. Each test plays the attack against the real
//! binary and checks that it now fails (docs/THREAT-MODEL.md, "An attacker with the backing
//! directory").

use crate::common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{cli, pattern, Kms, Mounted, TestVolume};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of the format-1 key-file fixture: (its temp dir, backing directory, key file).
fn v1_fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-keyfile-4k");
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = d.path().join("backing");
    let out = Command::new("cp").arg("-a").arg(src.join("backing")).arg(&backing).output().unwrap();
    assert!(out.status.success());
    (d, backing, src.join("volume.key"))
}

/// A local volume made by the binary (so this host trusts it, as after a real `init`).
fn local_volume() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = d.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let key = d.path().join("volume.key");
    fs::write(&key, pattern(7, 32)).unwrap();
    ok(cli(&[&"init", &"--plaintext-names", &"--key-file", &key, &backing]));
    (d, backing, key)
}

/// A change an attacker makes to the config.
type Edit<'a> = Box<dyn Fn(&mut toml::Table) + 'a>;

fn edit_config(backing: &Path, f: impl FnOnce(&mut toml::Table)) {
    let path = backing.join("envelopefs.toml");
    let mut t: toml::Table = fs::read_to_string(&path).unwrap().parse().unwrap();
    f(&mut t);
    fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
}

/// A shared library whose constructor leaves a marker file: proof that it was loaded.
fn evil_module(dir: &Path, marker: &Path) -> PathBuf {
    let src = dir.join("evil.c");
    fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void own(void) {{ \
             FILE *f = fopen(\"{}\", \"w\"); if (f) {{ fputs(\"loaded\", f); fclose(f); }} }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let so = dir.join("backing/evil.so");
    let out = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&so).arg(&src).output().unwrap();
    assert!(out.status.success(), "cc: {}", stderr(&out));
    so
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_planted_pkcs11_module_is_never_loaded() {
    let (d, backing, key) = local_volume();
    let marker = d.path().join("module-was-loaded");
    let so = evil_module(d.path(), &marker);
    let original = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    let plant = |key_uri: String| {
        fs::write(backing.join("envelopefs.toml"), &original).unwrap();
        edit_config(&backing, |t| {
            let mut p = toml::Table::new();
            p.insert("kind".into(), "pkcs11".into());
            p.insert("module".into(), so.display().to_string().into());
            p.insert("key".into(), key_uri.into());
            t.insert("provider".into(), p.into());
        });
    };
    // The attacker's URI names a PIN file of theirs, so nothing stops before loading
    // (before the fix this loaded the module as root): a stored pin-source is refused.
    fs::write(backing.join("pin"), "1234").unwrap();
    plant(format!("pkcs11:token=x;object=y?pin-source={}", backing.join("pin").display()));
    let out = cli(&[&"fsck", &"--key-file", &key, &backing]);
    assert!(!marker.exists(), "fsck loaded a module named by the backing directory");
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", stderr(&out));
    assert!(stderr(&out).contains("pin-source"), "{}", stderr(&out));
    // With the PIN from the admin's own flag, the planted module differs from the host's
    // trust: refused by name, for every command.
    plant("pkcs11:token=x;object=y".into());
    let pin = d.path().join("admin-pin");
    fs::write(&pin, "1234").unwrap();
    for args in [vec!["fsck"], vec!["key", "status"], vec!["rekey", "--rewrap"]] {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>).collect();
        a.extend([&"--pin-file" as &dyn AsRef<std::ffi::OsStr>, &pin, &backing]);
        let out = cli(&a);
        assert!(!marker.exists(), "`{}` loaded a module named by the backing directory", args.join(" "));
        assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", stderr(&out));
        let e = stderr(&out);
        assert!(e.contains("kind: this host trusts \"local\"") && e.contains("module"), "names the difference: {e}");
    }
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = cli(&[&"mount", &"--pin-file", &pin, &backing, &mnt]);
    assert!(!marker.exists(), "mount loaded a module named by the backing directory");
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", stderr(&out));
    // `trust` will not pin a module inside the backing directory either.
    let out = cli(&[&"trust", &"--yes", &"--module", &so, &"--pin-file", &pin, &backing]);
    assert!(!marker.exists(), "trust loaded a module named by the backing directory");
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", stderr(&out));
    assert!(stderr(&out).contains("inside its own backing directory"), "{}", stderr(&out));
    // The volume itself was never touched: with its config back (and the planted files
    // gone, which fsck would rightly call damaged envelopes) it checks clean.
    fs::write(backing.join("envelopefs.toml"), &original).unwrap();
    fs::remove_file(&so).unwrap();
    fs::remove_file(backing.join("pin")).unwrap();
    ok(cli(&[&"fsck", &"--key-file", &key, &backing]));
}

#[test]
#[cfg_attr(not(feature = "pkcs11_tests"), ignore = "needs SoftHSM2: --features pkcs11_tests")]
fn a_pin_source_in_the_stored_key_uri_is_refused() {
    // Even on a host that trusts the module, the stored URI's pin-source never chooses a file.
    let uri: Result<envelopefs::keys::pkcs11::Pkcs11Uri, _> = "pkcs11:token=t;object=k?pin-source=/etc/shadow".parse();
    let uri = uri.unwrap();
    let e = envelopefs::volume::ProviderConfig::Pkcs11 {
        module: common::SOFTHSM_MODULE.into(),
        key: format!("{}?pin-source=/etc/shadow", uri.key_id()),
        objects: vec![],
        previous_keys: vec![],
    }
    .check_stored()
    .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("pin-source"), "{e}");
}

#[test]
fn every_edit_of_the_config_is_refused_naming_the_file() {
    let (_d, backing, key) = local_volume();
    let original = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    let edits: [(&str, Edit); 3] = [
        ("block size", Box::new(|t| drop(t.insert("block_size".into(), 8192.into())))),
        ("header size", Box::new(|t| drop(t.insert("header_size".into(), 8192.into())))),
        ("mac", Box::new(|t| drop(t.insert("mac".into(), "00".repeat(32).into())))),
    ];
    for (what, edit) in edits {
        fs::write(backing.join("envelopefs.toml"), &original).unwrap();
        edit_config(&backing, edit);
        let out = cli(&[&"fsck", &"--key-file", &key, &backing]);
        assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains("envelopefs.toml"), "{what}: {}", stderr(&out));
    }
    fs::write(backing.join("envelopefs.toml"), &original).unwrap();
    ok(cli(&[&"fsck", &"--key-file", &key, &backing]));
}

#[test]
fn a_v2_volume_whose_config_is_swapped_for_v1_does_not_open_as_v1() {
    let (_d, backing, key) = local_volume();
    edit_config(&backing, |t| {
        t.insert("format".into(), 1.into());
        t.remove("mac");
        t.remove("generation");
        t.remove("volume_key");
    });
    let out = cli(&[&"fsck", &"--key-file", &key, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", stderr(&out));
    assert!(stderr(&out).contains("format 1"), "{}", stderr(&out));
    // On a host that never saw the volume the keyring says it belongs to a format-2 volume.
    let fresh = tempfile::tempdir().unwrap();
    let out = common::cli_with_trust(fresh.path(), &[&"fsck", &"--key-file", &key, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", stderr(&out));
    assert!(stderr(&out).contains("format 1"), "{}", stderr(&out));
}

#[test]
fn a_symlinked_keyring_temp_file_is_not_followed() {
    let (d, backing, key) = local_volume();
    let victim = d.path().join("victim");
    fs::write(&victim, b"root-owned file elsewhere").unwrap();
    std::os::unix::fs::symlink(&victim, backing.join("envelopefs.keyring.tmp")).unwrap();
    std::os::unix::fs::symlink(&victim, backing.join("envelopefs.toml.tmp")).unwrap();
    ok(cli(&[&"key", &"rotate", &"--key-file", &key, &backing]));
    assert_eq!(fs::read(&victim).unwrap(), b"root-owned file elsewhere");
    for name in ["envelopefs.keyring", "envelopefs.toml"] {
        let m = fs::symlink_metadata(backing.join(name)).unwrap();
        assert!(m.file_type().is_file(), "{name} stays a regular file");
    }
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_restored_older_keyring_is_refused_and_a_retired_key_is_gone() {
    let (d, backing, key) = local_volume();
    let mnt = d.path().join("mnt");
    let old = fs::read(backing.join("envelopefs.keyring")).unwrap();
    let m = Mounted::start(&backing, &key, &mnt, &[]);
    fs::write(m.path("f"), b"before rotation").unwrap();
    let old_header = fs::read(backing.join("f")).unwrap()[..4096].to_vec();
    ok(cli(&[&"key", &"rotate", &"--key-file", &key, &backing]));
    ok(cli(&[&"rekey", &"--rewrap", &"--key-file", &key, &backing]));
    ok(cli(&[&"key", &"retire", &"--key-file", &key, &backing, &"1"]));
    // The running mount stops unwrapping with version 1 at once: an old header pasted back
    // (same DEK, record under version 1) no longer opens.
    let f = fs::OpenOptions::new().write(true).open(backing.join("f")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &old_header, 0).unwrap();
    drop(f);
    let e = fs::read(m.path("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    drop(m);
    // Restoring the keyring from before the retire brings nothing back.
    fs::write(backing.join("envelopefs.keyring"), &old).unwrap();
    let out = cli(&[&"fsck", &"--key-file", &key, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", stderr(&out));
    assert!(stderr(&out).contains("older"), "{}", stderr(&out));
}

#[test]
fn an_absurd_kdf_cost_in_the_keyring_is_refused_before_deriving() {
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = d.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let pw = d.path().join("pw");
    fs::write(&pw, "correct horse").unwrap();
    init_cheap_passphrase(&pw, &backing);
    let path = backing.join("envelopefs.keyring");
    let mut raw = fs::read(&path).unwrap();
    raw[12..16].copy_from_slice(&(2u32 << 20).to_le_bytes()); // 2 GiB
    raw[16..20].copy_from_slice(&64u32.to_le_bytes());
    fs::write(&path, &raw).unwrap();
    let t = Instant::now();
    let out = cli(&[&"fsck", &"--passphrase-file", &pw, &backing]);
    assert!(t.elapsed() < Duration::from_secs(10), "refused without deriving: {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", stderr(&out));
    assert!(stderr(&out).contains("cost"), "{}", stderr(&out));
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn the_passphrase_never_comes_from_the_environment() {
    let (d, backing, _key) = local_volume();
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = common::bin()
        .args(["mount", "--foreground"])
        .arg(&backing)
        .arg(&mnt)
        .env("ENVELOPEFS_PASSPHRASE", "anything")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!common::is_mounted(&mnt));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no passphrase"), "{}", stderr(&out));
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn kms_key_substitution_and_endpoint_are_refused() {
    let kms = Kms::start();
    let arn = kms.create_key("real");
    let evil = kms.create_key("substitute");
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = d.path().join("backing");
    fs::create_dir(&backing).unwrap();
    ok(cli(&[
        &"init",
        &"--plaintext-names",
        &"--provider",
        &"aws-kms",
        &"--key-id",
        &"alias/real",
        &"--kms-endpoint",
        &kms.moto_url,
        &backing,
    ]));
    let original = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    let mnt = d.path().join("mnt");
    let attacks: [(&str, Edit<'_>); 3] = [
        (
            "key_id",
            Box::new(|t| {
                let p = t["provider"].as_table_mut().unwrap();
                p.insert("key_id".into(), evil.clone().into());
                p.insert("previous_key_ids".into(), vec![toml::Value::from(arn.clone())].into());
            }),
        ),
        (
            "endpoint",
            Box::new(|t| {
                let p = t["provider"].as_table_mut().unwrap();
                p.insert("endpoint".into(), kms.proxy_url.clone().into());
            }),
        ),
        (
            "intermediate_key",
            Box::new(|t| drop(t["provider"].as_table_mut().unwrap().insert("intermediate_key".into(), true.into()))),
        ),
    ];
    for (what, attack) in attacks {
        fs::write(backing.join("envelopefs.toml"), &original).unwrap();
        edit_config(&backing, attack);
        fs::create_dir_all(&mnt).unwrap();
        let out = cli(&[&"mount", &backing, &mnt]);
        if common::is_mounted(&mnt) {
            // The attack worked: show what a new file got before failing.
            let m = Mounted::adopt(&mnt);
            fs::write(m.path("new"), b"secret").unwrap();
            drop(m);
            panic!(
                "{what}: a mount opened with an edited KMS setting: {}",
                ok(cli(&[&"inspect", &backing.join("new")]))
            );
        }
        assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains(what), "{what}: the error names the difference: {}", stderr(&out));
    }
}

#[test]
fn plain_http_to_a_remote_kms_endpoint_is_refused() {
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = d.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let out = cli(&[
        &"init",
        &"--plaintext-names",
        &"--provider",
        &"aws-kms",
        &"--key-id",
        &"alias/x",
        &"--kms-endpoint",
        &"http://kms.example.com",
        &backing,
    ]);
    assert_eq!(out.status.code(), Some(common::EXIT_USAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("https"), "{}", stderr(&out));
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn writeback_wraps_are_attributed_to_the_process_that_opened_the_file() {
    let (d, backing, key) = local_volume();
    let audit = d.path().join("audit.jsonl");
    let m = Mounted::start(
        &backing,
        &key,
        &d.path().join("mnt"),
        &["--allow-other", "--trust-backing-permissions", "--audit-log", audit.to_str().unwrap()],
    );
    fs::set_permissions(&m.mnt, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let target = m.path("nobody-file");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"])
        .arg(format!("printf hello > {}", target.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::metadata(&target).unwrap().uid(), 65534);
    assert!(m.unmount().success());
    let text = fs::read_to_string(&audit).unwrap();
    let wraps: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["op"] == "wrap" && v["path"].as_str().is_some_and(|p| p.ends_with("nobody-file")))
        .collect();
    assert_eq!(wraps.len(), 1, "{text}");
    assert_eq!(wraps[0]["uid"], 65534, "{text}");
    assert_ne!(wraps[0]["pid"], 0, "{text}");
}

#[test]
fn fixture_style_library_volume_still_opens() {
    // A volume made through the library (as the other suites do) opens with no trust step:
    // a local volume with its keyring inside is authenticated by its own secret.
    let v = TestVolume::new(4096);
    drop(v.open());
}

#[test]
#[cfg_attr(not(feature = "pkcs11_tests"), ignore = "needs SoftHSM2: --features pkcs11_tests")]
fn a_new_host_pins_a_pkcs11_volume_once_with_trust() {
    let (_d, backing, pin, _) = common::pkcs11_volume("trust", "kek");
    let uri = "pkcs11:token=trust;object=kek";
    ok(cli(&[&"fsck", &"--pin-file", &pin, &backing]));
    // Another host: nothing trusted yet, so nothing is loaded.
    let other = tempfile::tempdir().unwrap();
    let on_other = |args: &[&dyn AsRef<std::ffi::OsStr>]| common::cli_with_trust(other.path(), args);
    let out = on_other(&[&"fsck", &"--pin-file", &pin, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", stderr(&out));
    assert!(stderr(&out).contains("envelopefs trust"), "the error says what to do: {}", stderr(&out));
    // `trust` shows what it pins and wants a yes.
    let out = on_other(&[&"trust", &"--pin-file", &pin, &backing]);
    assert!(!out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("module") && shown.contains(uri), "{shown}");
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    // SoftHSM2 is registered with p11-kit here, so its module needs no --module.
    ok(on_other(&[&"trust", &"--yes", &"--pin-file", &pin, &backing]));
    ok(on_other(&[&"fsck", &"--pin-file", &pin, &backing]));
    // A module the host has not registered needs the admin's word: --module.
    edit_config(&backing, |t| {
        t["provider"]
            .as_table_mut()
            .unwrap()
            .insert("module".into(), "/usr/lib/softhsm/../softhsm/libsofthsm2.so".into());
    });
    let out = on_other(&[&"fsck", &"--pin-file", &pin, &backing]);
    assert_eq!(
        out.status.code(),
        Some(common::EXIT_UNTRUSTED),
        "a changed module path is a changed setting: {}",
        stderr(&out)
    );
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn upgrade_makes_a_v1_volume_authenticated_and_refuses_the_old_config_after() {
    let (d, backing, key) = v1_fixture();
    let v1_config = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    let text = ok(cli(&[&"upgrade", &"--key-file", &key, &backing]));
    assert!(text.contains("now format 2"), "{text}");
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(cfg.contains("format = 2") && cfg.contains("mac = "), "{cfg}");
    assert!(ok(cli(&[&"upgrade", &"--key-file", &key, &backing])).contains("already format 2"));
    ok(cli(&[&"fsck", &"--key-file", &key, &backing]));
    let m = Mounted::start(&backing, &key, &d.path().join("mnt"), &["--read-only"]);
    assert_eq!(fs::read(m.path("small.txt")).unwrap(), b"hello from envelopefs format v1\n");
    drop(m);
    // Putting the v1 config back is a downgrade: refused here and on a fresh host.
    fs::write(backing.join("envelopefs.toml"), &v1_config).unwrap();
    let out = cli(&[&"fsck", &"--key-file", &key, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", stderr(&out));
    let fresh = tempfile::tempdir().unwrap();
    let out = common::cli_with_trust(fresh.path(), &[&"fsck", &"--key-file", &key, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", stderr(&out));
    assert!(stderr(&out).contains("format 1"), "{}", stderr(&out));
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2: --features fuse_tests,pkcs11_tests"
)]
fn a_key_object_the_volume_did_not_pin_is_never_used() {
    let (d, backing, pin, _) = common::pkcs11_volume("trust-pins", "kek");
    // Someone with access to the token (not to the volume's keys) adds `kek/v9`: by its
    // label it would be the newest version.
    let out = Command::new("pkcs11-tool")
        .args(["--module", common::SOFTHSM_MODULE, "--token-label", "trust-pins", "--login", "--pin", "1234"])
        .args(["--keygen", "--key-type", "AES:32", "--label", "kek/v9", "--id", "00000009"])
        .output()
        .unwrap();
    assert!(out.status.success(), "pkcs11-tool: {}", stderr(&out));
    let status = ok(cli(&[&"key", &"status", &"--pin-file", &pin, &backing]));
    assert!(!status.contains("version 9"), "an unpinned object is no version of the volume: {status}");
    let m = Mounted::start_with(&backing, "--pin-file", &pin, &d.path().join("mnt"), &[]);
    fs::write(m.path("new"), b"secret").unwrap();
    drop(m);
    let inspect = ok(cli(&[&"inspect", &backing.join("new")]));
    assert!(inspect.contains("version 1,"), "new files wrap under the pinned current version: {inspect}");
    // A rotation skips past the planted label and pins its own.
    ok(cli(&[&"key", &"rotate", &"--pin-file", &pin, &backing]));
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(cfg.contains("kek/v10") && !cfg.contains("kek/v9"), "{cfg}");
}

/// Hardening comes before the first secret is read, in every command: while `fsck` waits
/// for its passphrase (a FIFO nobody writes yet), the process is already non-dumpable,
/// which the kernel shows by handing its /proc directory to root.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn commands_are_hardened_before_they_read_a_secret() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let backing = d.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let pw = d.path().join("pw");
    fs::write(&pw, "correct horse").unwrap();
    init_cheap_passphrase(&pw, &backing);
    for f in ["envelopefs.toml", "envelopefs.keyring"] {
        fs::set_permissions(backing.join(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let trust = d.path().join("trust");
    fs::create_dir(&trust).unwrap();
    fs::set_permissions(&trust, fs::Permissions::from_mode(0o777)).unwrap();
    let fifo = d.path().join("secret.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    for cmd in [&["fsck"][..], &["key", "status"], &["rekey", "--rewrap"]] {
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", common::BIN])
            .args(cmd)
            .arg("--passphrase-file")
            .arg(&fifo)
            .arg(&backing)
            .env("ENVELOPEFS_TRUST_DIR", &trust)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let proc_dir = PathBuf::from(format!("/proc/{}", child.id()));
        // Wait until it is envelopefs (not setpriv) blocked on the FIFO.
        let start = Instant::now();
        loop {
            let exe = fs::read_link(proc_dir.join("exe")).unwrap_or_default();
            let wchan = fs::read_to_string(proc_dir.join("wchan")).unwrap_or_default();
            if exe.ends_with("envelopefs") && (wchan.contains("pipe") || wchan.contains("partner")) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{cmd:?} never waited on the FIFO (wchan {wchan})");
            std::thread::sleep(Duration::from_millis(10));
        }
        let owner = fs::metadata(proc_dir.join("status")).unwrap().uid();
        // Feed it the passphrase so it finishes normally.
        fs::write(&fifo, "correct horse\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(owner, 0, "{cmd:?} ran dumpable while reading its secret (its /proc files belong to uid {owner})");
        assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    }
}

/// A user other than root keeps the host's trust in their own state directory.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn other_users_keep_their_trust_records_at_home() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let home = d.path().join("home");
    let backing = d.path().join("backing");
    for dir in [&home, &backing] {
        fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
    }
    let key = d.path().join("volume.key");
    fs::write(&key, pattern(3, 32)).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::BIN,
            "init",
            "--plaintext-names",
            "--key-file",
        ])
        .arg(&key)
        .arg(&backing)
        .env_remove("ENVELOPEFS_TRUST_DIR")
        .env_remove("XDG_STATE_HOME")
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let records: Vec<_> = fs::read_dir(home.join(".local/state/envelopefs/trust")).unwrap().collect();
    assert_eq!(records.len(), 1);
}

/// A passphrase volume with a cheap KDF (the cost is not what these tests are about).
fn init_cheap_passphrase(pw: &Path, backing: &Path) {
    ok(cli(&[
        &"init",
        &"--plaintext-names",
        &"--passphrase-file",
        &pw,
        &"--kdf-memory-mib",
        &"8",
        &"--kdf-iterations",
        &"1",
        &backing,
    ]));
}

/// A volume is bound to its place. Someone who can write backing directory B and read A
/// copies A's files into B; the admin's routine mount of B must not serve volume A (here
/// both are opened by one key file, as an admin with one key for all volumes would).
/// Accepting a copy is explicit (`trust`), and a copy mounted beside the original never
/// touches the original's crash journal.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_copy_of_a_volume_at_another_place_is_refused_until_accepted() {
    let a = TestVolume::new(4096);
    let m = a.mount(&[]);
    fs::write(m.path("salaries.txt"), b"alice=1\n").unwrap();
    drop(m);
    let b_dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let b = b_dir.path().join("backing");
    let out = Command::new("cp").arg("-a").arg(&a.backing).arg(&b).output().unwrap();
    assert!(out.status.success());
    let mnt_b = b_dir.path().join("mnt");
    fs::create_dir(&mnt_b).unwrap();
    let mount_b = || cli(&[&"mount", &"--key-file", &a.key, &b, &mnt_b]);
    let out = mount_b();
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "a copy was mounted: {}", stderr(&out));
    let a_place = fs::canonicalize(&a.backing).unwrap();
    assert!(stderr(&out).contains(&a_place.display().to_string()), "names where it is known: {}", stderr(&out));
    assert!(stderr(&out).contains("envelopefs trust"), "says how to accept it: {}", stderr(&out));
    let out = cli(&[&"fsck", &"--key-file", &a.key, &b]);
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "fsck of a copy: {}", stderr(&out));

    // The original, mounted and writing: its journal is live.
    let ma = a.mount(&[]);
    let f = fs::OpenOptions::new().append(true).open(ma.path("salaries.txt")).unwrap();
    use std::io::Write;
    (&f).write_all(b"bob=2\n").unwrap();
    let journals = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(common::trust_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".journal."))
            .collect();
        v.sort();
        v
    };
    let before = journals();
    // The admin accepts the copy (a restored backup, say) and mounts it beside the original.
    let text = ok(cli(&[&"trust", &"--yes", &"--key-file", &a.key, &b]));
    assert!(text.contains(&a_place.display().to_string()), "trust shows where it is known already: {text}");
    let mb = Mounted::adopt(&mnt_b);
    let out = mount_b();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::read(mb.path("salaries.txt")).unwrap(), b"alice=1\n");
    let with_b = journals();
    assert!(before.iter().all(|p| with_b.contains(p)), "mounting the copy replaced the original's journal");
    ok(cli(&[&"umount", &mnt_b]));
    drop(mb);
    assert_eq!(journals(), before, "the copy's unmount removed the original's journal");
    (&f).write_all(b"carol=3\n").unwrap();
    drop(f);
    drop(ma);
    let ma = a.mount(&[]);
    assert_eq!(fs::read(ma.path("salaries.txt")).unwrap(), b"alice=1\nbob=2\ncarol=3\n");
}

/// The module loaded is the one that was checked. A stored module path that leads through
/// the backing directory (`BACKING/s/../../…`) names the registered module when `trust`
/// checks it, and a planted library once `s` is swapped for a symlink before the load. So
/// such a path is refused before anything is loaded, and a pinned module is loaded from
/// the canonical file the check resolved, never from the stored string.
#[test]
#[cfg_attr(not(feature = "pkcs11_tests"), ignore = "needs SoftHSM2: --features pkcs11_tests")]
fn a_module_path_through_the_backing_directory_is_never_loaded() {
    let (_d, backing, pin, _) = common::pkcs11_volume("dotdot", "dotdot");
    let real = fs::canonicalize(common::SOFTHSM_MODULE).unwrap();
    fs::create_dir(backing.join("s")).unwrap();
    let ups = "../".repeat(backing.components().count());
    let stored = format!("{}/s/{ups}{}", backing.display(), real.strip_prefix("/").unwrap().display());
    assert_eq!(fs::canonicalize(&stored).unwrap(), real, "the stored path names the real module as it stands");
    edit_config(&backing, |t| {
        t["provider"].as_table_mut().unwrap().insert("module".into(), stored.clone().into());
    });
    let fresh = tempfile::tempdir().unwrap();
    let out = common::cli_with_trust(fresh.path(), &[&"trust", &"--yes", &"--pin-file", &pin, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", stderr(&out));
    assert!(stderr(&out).contains("plain absolute path"), "{}", stderr(&out));

    // A module pinned through a symlink (as /usr/lib/softhsm/libsofthsm2.so is on Debian)
    // is recorded with the canonical file that was checked.
    let (_d2, backing2, pin2, _) = common::pkcs11_volume("canon", "canon");
    let host = tempfile::tempdir().unwrap();
    ok(common::cli_with_trust(host.path(), &[&"trust", &"--yes", &"--pin-file", &pin2, &backing2]));
    let rec: String = fs::read_dir(host.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    assert!(rec.contains(&format!("{:?} = {:?}", common::SOFTHSM_MODULE, real.display().to_string())), "{rec}");
    ok(common::cli_with_trust(host.path(), &[&"fsck", &"--pin-file", &pin2, &backing2]));
}

/// A format downgrade on a host that has never seen the volume: someone rewrites a
/// PKCS#11 volume's config as format 1 (no MAC, no volume key, plaintext names). `trust`
/// refuses it unless the admin names that format, and pins nothing.
#[test]
#[cfg_attr(not(feature = "pkcs11_tests"), ignore = "needs SoftHSM2: --features pkcs11_tests")]
fn trust_refuses_a_format_1_config_unless_the_admin_names_it() {
    let (_d, backing, pin, _) = common::pkcs11_volume("downgrade", "downgrade");
    edit_config(&backing, |t| {
        t.insert("format".into(), 1.into());
        for k in ["mac", "volume_key", "names", "generation"] {
            t.remove(k);
        }
    });
    let fresh = tempfile::tempdir().unwrap();
    let out = common::cli_with_trust(fresh.path(), &[&"trust", &"--yes", &"--pin-file", &pin, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", stderr(&out));
    assert!(stderr(&out).contains("--accept-format 1"), "says how to accept it: {}", stderr(&out));
    assert_eq!(fs::read_dir(fresh.path()).unwrap().count(), 0, "nothing was pinned");
    let out = common::cli_with_trust(fresh.path(), &[&"fsck", &"--pin-file", &pin, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", stderr(&out));
}

/// A format-1 config has no MAC: the block geometry it states is checked against what the
/// host pinned at its first open.
#[test]
fn a_format_1_volume_keeps_the_geometry_its_host_pinned() {
    let (d, backing, key) = v1_fixture();
    let host = d.path().join("trust");
    ok(common::cli_with_trust(&host, &[&"fsck", &"--key-file", &key, &backing]));
    edit_config(&backing, |t| {
        t.insert("block_size".into(), 1024.into());
    });
    let out = common::cli_with_trust(&host, &[&"fsck", &"--key-file", &key, &backing]);
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", stderr(&out));
    assert!(stderr(&out).contains("block size 1024"), "{}", stderr(&out));
}
