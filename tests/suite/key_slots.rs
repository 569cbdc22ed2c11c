//! Key slots (format 3) with the real binary: a multi-Region KMS key with its replica as a
//! second slot (moto, with the fault-injection proxy in front of the primary region), an
//! offline age recovery recipient, and moving a volume local → PKCS#11 (SoftHSM2) →
//! aws-kms by slots alone.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{cli, cli_with_trust, pattern, Kms, Mounted};

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(args: &[&str]) -> Output {
    let a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>).collect();
    cli(&a)
}

/// A key in us-east-1 and one in eu-west-1: (primary ARN, second ARN). moto 5 cannot
/// decrypt under multi-Region keys (their 40-character ids overflow its ciphertext
/// header), so the second region's slot is a key of its own, not a replica.
fn keys_in_two_regions(kms: &Kms) -> (String, String) {
    let code = format!(
        "import boto3\n\
         a = boto3.client('kms', endpoint_url='{0}', region_name='us-east-1').create_key()['KeyMetadata']\n\
         b = boto3.client('kms', endpoint_url='{0}', region_name='eu-west-1').create_key()['KeyMetadata']\n\
         print(a['Arn']); print(b['Arn'])",
        kms.moto_url
    );
    let out = Command::new("python3").args(["-c", &code]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines().map(str::to_owned);
    (lines.next().unwrap(), lines.next().unwrap())
}

/// Every file's backing inode and the bytes after its header region.
fn backing_state(backing: &Path, header: usize) -> BTreeMap<String, (u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(backing).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("envelopefs.") {
            continue;
        }
        let bytes = fs::read(e.path()).unwrap();
        out.insert(name, (e.metadata().unwrap().ino(), bytes[header.min(bytes.len())..].to_vec()));
    }
    out
}

/// How many backing files' header regions contain `needle` (key ids are stored in clear).
fn headers_naming(backing: &Path, needle: &str) -> usize {
    fs::read_dir(backing)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (!name.starts_with("envelopefs.")).then(|| fs::read(e.path()).unwrap())
        })
        .filter(|b| b[..4096.min(b.len())].windows(needle.len()).any(|w| w == needle.as_bytes()))
        .count()
}

struct SlotVol {
    dir: tempfile::TempDir,
    backing: PathBuf,
    recovery_key: PathBuf,
}

impl SlotVol {
    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

fn kms_mount(v: &SlotVol, extra: &[&str]) -> Mounted {
    Mounted::start_with(&v.backing, "", Path::new(""), &v.mnt(), extra)
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn a_second_region_slot_serves_through_a_primary_outage_and_the_recovery_key_through_the_loss_of_every_kms() {
    let kms = Kms::start();
    let (primary, second) = keys_in_two_regions(&kms);
    let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let b = backing.to_str().unwrap();
    ok(run(&[
        "init",
        "--plaintext-names",
        "--provider",
        "aws-kms",
        "--key-id",
        &primary,
        "--region",
        "us-east-1",
        "--kms-endpoint",
        &kms.proxy_url,
        b,
    ]));
    let v = SlotVol { recovery_key: dir.path().join("recovery.key"), dir, backing: backing.clone() };

    // Files made while the volume had one slot: only the primary region's record.
    let m = kms_mount(&v, &[]);
    for i in 0..10 {
        fs::write(m.path(&format!("old{i}")), pattern(i, 3000)).unwrap();
    }
    drop(m);

    let added = ok(run(&[
        "key",
        "slot",
        "add",
        "--aws-kms",
        &second,
        "--region",
        "eu-west-1",
        "--kms-endpoint",
        &kms.moto_url,
        b,
    ]));
    assert!(added.contains("slot 1 added: aws-kms arn:aws:kms:eu-west-1:"), "{added}");
    let rk = v.recovery_key.to_str().unwrap();
    let added = ok(run(&["key", "slot", "add", "--new-recovery-key", rk, b]));
    assert!(added.contains("slot 2 added: recovery age1"), "{added}");
    let check =
        added.lines().find_map(|l| l.strip_prefix("volume check ")).unwrap().split(' ').next().unwrap().to_owned();
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(cfg.contains("format = 3") && cfg.contains("[[slots]]"), "{cfg}");
    let list = ok(run(&["key", "slot", "list", b]));
    assert!(
        list.contains("0  primary  aws-kms arn:aws:kms:us-east-1:") && list.contains("2  slot     recovery age1"),
        "{list}"
    );

    // Existing files get the new slots' records; nothing else in them changes.
    assert_eq!(headers_naming(&backing, &second), 0);
    let before = backing_state(&backing, 4096);
    let out = ok(run(&["rekey", "--rewrap", b]));
    assert!(out.contains("10 files changed"), "{out}");
    assert_eq!(backing_state(&backing, 4096), before, "same inodes, same blocks");
    assert_eq!(headers_naming(&backing, &second), 10);

    // New files carry a record per slot, made concurrently and ahead of the creates.
    let m = kms_mount(&v, &[]);
    for i in 0..10 {
        fs::write(m.path(&format!("new{i}")), pattern(100 + i, 3000)).unwrap();
    }
    drop(m);
    let inspect = ok(cli(&[&"inspect", &backing.join("new3")]));
    assert_eq!(
        inspect.matches("provider aws-kms").count(),
        4,
        "two KMS records in each of two header copies: {inspect}"
    );
    assert_eq!(inspect.matches("provider recovery").count(), 2, "{inspect}");
    let status = ok(run(&["key", "status", b]));
    assert!(status.contains("slot 1 (aws-kms arn:aws:kms:eu-west-1:") && status.contains("): 20 files"), "{status}");

    // The primary region goes down during a mount: reads of files not in the DEK cache go
    // on through the second region's slot, each within the KMS timeout.
    let audit = v.dir.path().join("audit.jsonl");
    let m = kms_mount(&v, &["--kms-timeout", "2", "--audit-log", audit.to_str().unwrap()]);
    kms.proxy(r#"{"mode": "down"}"#);
    let t = Instant::now();
    assert_eq!(fs::read(m.path("old0")).unwrap(), pattern(0, 3000));
    assert!(t.elapsed() < Duration::from_secs(4), "the first read failed over within the timeout: {:?}", t.elapsed());
    let t = Instant::now();
    for i in 0..10 {
        assert_eq!(fs::read(m.path(&format!("old{i}"))).unwrap(), pattern(i, 3000));
        assert_eq!(fs::read(m.path(&format!("new{i}"))).unwrap(), pattern(100 + i, 3000));
    }
    assert!(t.elapsed() < Duration::from_secs(4), "a slot that failed is tried last: {:?}", t.elapsed());
    // A create takes a record set made ahead (one record per slot), so it does not wait
    // on the region that is down; a file is never made with fewer records than slots.
    fs::write(m.path("during-outage"), b"x").unwrap();
    // The audit log is written by a thread of its own; a daemon that stops writes what it
    // queued first.
    assert!(m.unmount().success());
    let log = fs::read_to_string(&audit).unwrap();
    let served: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["op"] == "unwrap" && e["result"] == "ok")
        .collect();
    assert_eq!(served.len(), 20, "{log}");
    assert!(served.iter().all(|e| e["slot"] == 1 && e["key_id"] == second.as_str()), "the second slot served: {log}");
    assert!(
        log.lines().any(|l| l.contains(r#""slot":0"#) && l.contains(r#""result":"error""#)),
        "the primary's failure is logged"
    );
    kms.proxy(r#"{"mode": "ok"}"#);
    let inspect = ok(cli(&[&"inspect", &backing.join("during-outage")]));
    assert_eq!(
        inspect.matches("provider aws-kms").count() + inspect.matches("provider recovery").count(),
        6,
        "{inspect}"
    );

    // The primary key is deleted and no KMS answers at all: the recovery key reads every file.
    let code = format!(
        "import boto3; c = boto3.client('kms', endpoint_url='{}', region_name='us-east-1'); \
         c.schedule_key_deletion(KeyId='{}', PendingWindowInDays=7)",
        kms.moto_url,
        primary.rsplit('/').next().unwrap()
    );
    assert!(Command::new("python3").args(["-c", &code]).status().unwrap().success());
    drop(kms);
    let m = kms_mount(&v, &["--recovery-key", rk]);
    for i in 0..10 {
        assert_eq!(fs::read(m.path(&format!("old{i}"))).unwrap(), pattern(i, 3000));
        assert_eq!(fs::read(m.path(&format!("new{i}"))).unwrap(), pattern(100 + i, 3000));
    }
    let e = fs::write(m.path("x"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "a recovery mount is read-only");
    drop(m);
    let refused = run(&["mount", "--recovery-key", rk, "-o", "rw", b, v.mnt().to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(common::EXIT_USAGE), "{}", String::from_utf8_lossy(&refused.stderr));

    // On a host that never saw the volume, the recovery key alone is not enough: anyone
    // can encrypt to the recipient, so the volume check value must be given.
    let fresh = tempfile::tempdir().unwrap();
    let out = cli_with_trust(fresh.path(), &[&"fsck", &"--recovery-key", &rk, &b]);
    assert_eq!(out.status.code(), Some(common::EXIT_UNTRUSTED), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--volume-check"));
    let wrong = "00".repeat(16);
    let out = cli_with_trust(fresh.path(), &[&"fsck", &"--recovery-key", &rk, &"--volume-check", &wrong, &b]);
    assert_eq!(out.status.code(), Some(common::EXIT_TAMPERED), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli_with_trust(fresh.path(), &[&"fsck", &"--recovery-key", &rk, &"--volume-check", &check, &b]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn a_file_planted_with_the_public_recovery_recipient_does_not_open() {
    // The attacker has write access to the backing directory and the volume's public
    // recipient (it is in envelopefs.toml), but not the volume key.
    let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let key = dir.path().join("volume.key");
    fs::write(&key, [7u8; 32]).unwrap();
    let (b, k) = (backing.to_str().unwrap(), key.to_str().unwrap());
    ok(run(&["init", "--plaintext-names", "--key-file", k, b]));
    let rk = dir.path().join("recovery.key");
    ok(run(&["key", "slot", "add", "--new-recovery-key", rk.to_str().unwrap(), "--key-file", k, b]));
    let m = Mounted::start(&backing, &key, &dir.path().join("mnt"), &[]);
    fs::write(m.path("real"), b"the owner's data").unwrap();
    drop(m);

    let mut cfg = envelopefs::volume::VolumeConfig::load(&backing).unwrap();
    let recipient = cfg
        .slots
        .iter()
        .find_map(|s| match &s.provider {
            envelopefs::volume::config::ProviderConfig::Recovery { recipient } => Some(recipient.clone()),
            _ => None,
        })
        .unwrap();
    // The forger's own view of the volume: one slot, the recipient.
    cfg.slots.clear();
    let forger = envelopefs::keys::recovery::RecoveryProvider::new(&recipient, None).unwrap();
    envelopefs::keys::VolumeBinding::bind_volume_key(&forger, &envelopefs::crypto::VolumeKey::generate().unwrap());
    let vol =
        envelopefs::volume::Volume::with_provider(&backing, cfg, std::sync::Arc::new(forger), &common::open_options())
            .unwrap();
    let fs_ = envelopefs::fs::EncryptedFs::new(std::sync::Arc::new(vol)).unwrap();
    let root = envelopefs::fs::Caller { uid: 0, gid: 0, pid: 1 };
    let (_, fh) =
        fs_.create(envelopefs::fs::ROOT_INO, std::ffi::OsStr::new("planted"), 0o644, 0, libc::O_RDWR, root).unwrap();
    fs_.write(fh, 0, b"the attacker's data", root).unwrap();
    fs_.release(fh);
    drop(fs_);

    let m = Mounted::start_with(&backing, "--recovery-key", &rk, &dir.path().join("mnt"), &[]);
    assert_eq!(fs::read(m.path("real")).unwrap(), b"the owner's data");
    let e = fs::read(m.path("planted")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "a record anyone could make is refused: {e}");
    assert!(m.log_text().contains("does not authenticate under the volume key"), "{}", m.log_text());
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2 and moto: --features fuse_tests,pkcs11_tests,kms_tests"
)]
fn a_volume_moves_local_to_pkcs11_to_aws_kms_by_slots_alone() {
    const FILES: u64 = 1000;
    let kms = Kms::start();
    let kms_arn = kms.create_key("migration");
    let pin = common::softhsm_token("slot-spare");
    let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let key = dir.path().join("volume.key");
    fs::write(&key, [9u8; 32]).unwrap();
    let (b, k, p) = (backing.to_str().unwrap(), key.to_str().unwrap(), pin.to_str().unwrap());
    ok(run(&["init", "--plaintext-names", "--key-file", k, b]));
    let m = Mounted::start(&backing, &key, &dir.path().join("mnt"), &[]);
    for i in 0..FILES {
        fs::write(m.path(&format!("f{i:04}")), pattern(i, 100 + (i as usize * 37) % 9000)).unwrap();
    }
    drop(m);
    let before = backing_state(&backing, 4096);
    assert_eq!(before.len() as u64, FILES);

    // local → pkcs11.
    let uri = "pkcs11:token=spare;object=migrated";
    ok(run(&[
        "key",
        "slot",
        "add",
        "--pkcs11",
        uri,
        "--module",
        common::SOFTHSM_MODULE,
        "--pin-file",
        p,
        "--key-file",
        k,
        b,
    ]));
    let refused = run(&["key", "slot", "remove", b, "0", "--key-file", k, "--pin-file", p]);
    assert_eq!(refused.status.code(), Some(2), "the primary is not removed");
    ok(run(&["key", "slot", "primary", b, "1", "--key-file", k, "--pin-file", p]));
    let refused = run(&["key", "slot", "remove", b, "1", "--key-file", k, "--pin-file", p]);
    assert_eq!(
        refused.status.code(),
        Some(17),
        "files without a pkcs11 record: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("rekey --rewrap"));
    assert!(ok(run(&["rekey", "--rewrap", "--key-file", k, "--pin-file", p, b]))
        .contains(&format!("{FILES} files changed")));
    ok(run(&["key", "slot", "remove", b, "1", "--key-file", k, "--pin-file", p]));
    let status = ok(run(&["key", "status", "--pin-file", p, b]));
    assert!(status.contains(&format!("{FILES} files still carry a record of a removed slot")), "{status}");
    ok(run(&["rekey", "--rewrap", "--pin-file", p, b]));
    let status = ok(run(&["key", "status", "--pin-file", p, b]));
    assert!(!status.contains("removed slot"), "no header carries the local record any more: {status}");

    // pkcs11 → aws-kms.
    ok(run(&["key", "slot", "add", "--aws-kms", &kms_arn, "--kms-endpoint", &kms.moto_url, "--pin-file", p, b]));
    assert!(ok(run(&["rekey", "--rewrap", "--pin-file", p, b])).contains(&format!("{FILES} files changed")));
    ok(run(&["key", "slot", "primary", b, "1", "--pin-file", p]));
    ok(run(&["key", "slot", "remove", b, "1", "--pin-file", p]));
    assert_eq!(
        headers_naming(&backing, uri),
        FILES as usize,
        "until rewrap the headers keep the removed slot's record"
    );
    assert!(ok(run(&["rekey", "--rewrap", b])).contains(&format!("{FILES} files changed")));
    assert_eq!(headers_naming(&backing, uri), 0, "no header names the removed pkcs11 key");
    let status = ok(run(&["key", "status", b]));
    assert!(
        !status.contains("removed slot") && status.contains(&format!("version 0 (current): {FILES} files")),
        "{status}"
    );

    // No file was rewritten: the same inodes, the same block bytes; and the KMS key alone reads them.
    assert_eq!(backing_state(&backing, 4096), before);
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(!cfg.contains("[[slots]]") && cfg.contains("kind = \"aws-kms\""), "{cfg}");
    let m = Mounted::start_with(&backing, "", Path::new(""), &dir.path().join("mnt"), &[]);
    for i in 0..FILES {
        assert_eq!(fs::read(m.path(&format!("f{i:04}"))).unwrap(), pattern(i, 100 + (i as usize * 37) % 9000));
    }
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2: --features fuse_tests,pkcs11_tests"
)]
fn making_a_second_pkcs11_slot_primary_keeps_each_slots_own_key_objects() {
    let (_d, backing, pin, _) = common::pkcs11_volume("pins", "alpha");
    let (b, p) = (backing.to_str().unwrap(), pin.to_str().unwrap());
    ok(run(&[
        "key",
        "slot",
        "add",
        "--pkcs11",
        "pkcs11:token=pins;object=beta",
        "--module",
        common::SOFTHSM_MODULE,
        "--pin-file",
        p,
        b,
    ]));
    ok(run(&["key", "slot", "primary", b, "1", "--pin-file", p]));
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(cfg.contains(r#"objects = ["beta/v1"]"#) && cfg.contains(r#"objects = ["alpha/v1"]"#), "{cfg}");
    let list = ok(run(&["key", "slot", "list", b, "--pin-file", p]));
    assert!(list.contains("0  primary  pkcs11 pkcs11:token=pins;object=beta"), "{list}");
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run_in(trust: &Path, args: &[&str]) -> Output {
    let a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>).collect();
    cli_with_trust(trust, &a)
}

/// A volume under a key file: (its directory, backing, key file).
fn key_file_volume() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let key = dir.path().join("volume.key");
    fs::write(&key, [7u8; 32]).unwrap();
    ok(run(&["init", "--plaintext-names", "--key-file", key.to_str().unwrap(), backing.to_str().unwrap()]));
    (dir, backing, key)
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn each_of_two_recovery_keys_opens_the_volume_alone() {
    let (dir, backing, key) = key_file_volume();
    let (b, k) = (backing.to_str().unwrap(), key.to_str().unwrap());
    let ids = [dir.path().join("r1.age"), dir.path().join("r2.age")];
    for id in &ids {
        ok(run(&["key", "slot", "add", "--new-recovery-key", id.to_str().unwrap(), "--key-file", k, b]));
    }
    for (i, id) in ids.iter().enumerate() {
        let out = run(&["key", "slot", "list", b, "--recovery-key", id.to_str().unwrap()]);
        assert!(out.status.success(), "recovery key {} does not open the volume: {}", i + 1, text(&out));
    }
    let stranger = dir.path().join("stranger.age");
    ok(run(&["key", "slot", "add", "--new-recovery-key", stranger.to_str().unwrap(), "--key-file", k, b]));
    ok(run(&["key", "slot", "remove", b, "3", "--key-file", k]));
    let out = run(&["key", "slot", "list", b, "--recovery-key", stranger.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(11), "an identity of no slot must be a wrong secret: {}", text(&out));
    assert!(text(&out).contains("no recovery slot of this volume"), "{}", text(&out));
}

/// A slot change while the volume is mounted would leave the mount making files with the
/// old slot set; after the old slot is removed no slot would open them.
#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2: --features fuse_tests,pkcs11_tests"
)]
fn slot_changes_wait_for_the_volume_to_be_unmounted() {
    let (dir, backing, key) = key_file_volume();
    let pin = common::softhsm_token("stale");
    let (b, k, p) = (backing.to_str().unwrap(), key.to_str().unwrap(), pin.to_str().unwrap());
    let hsm = "pkcs11:token=stale;object=k";
    let rk = dir.path().join("r.age");
    ok(run(&["key", "slot", "add", "--new-recovery-key", rk.to_str().unwrap(), "--key-file", k, b]));
    let m = Mounted::start(&backing, &key, &dir.path().join("mnt"), &[]);
    fs::write(m.path("old"), b"before").unwrap();
    let add = [
        "key",
        "slot",
        "add",
        "--pkcs11",
        hsm,
        "--module",
        common::SOFTHSM_MODULE,
        "--pin-file",
        p,
        "--key-file",
        k,
        b,
    ];
    let out = run(&add);
    assert_eq!(out.status.code(), Some(17), "slot add while mounted: {}", text(&out));
    assert!(text(&out).contains("mounted"), "{}", text(&out));
    drop(m);
    ok(run(&add));
    // A mount that cannot open the new slot (no PIN) refuses to make a file at open(2),
    // where the caller sees it, and still reads.
    let m = Mounted::start(&backing, &key, &dir.path().join("mnt"), &[]);
    let e = fs::OpenOptions::new().write(true).create_new(true).open(m.path("lacking")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = fs::OpenOptions::new().write(true).truncate(true).open(m.path("old")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = fs::OpenOptions::new().write(true).open(m.path("old")).unwrap().set_len(0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = Command::new("truncate").args(["-s", "0"]).arg(m.path("old")).output().unwrap();
    assert!(!e.status.success(), "truncate(2) by path emptied a file no new key can refill");
    assert_eq!(fs::read(m.path("old")).unwrap(), b"before");
    assert!(!backing.join("lacking").exists());
    drop(m);
    let m = Mounted::start(&backing, &key, &dir.path().join("mnt"), &["--pin-file", p]);
    for cmd in [
        &["key", "slot", "primary", b, "2", "--key-file", k, "--pin-file", p][..],
        &["key", "slot", "remove", b, "1", "--key-file", k, "--pin-file", p],
    ] {
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(17), "{cmd:?} while mounted: {}", text(&out));
    }
    fs::write(m.path("new"), b"made with every slot").unwrap();
    drop(m);
    ok(run(&["key", "slot", "primary", b, "2", "--key-file", k, "--pin-file", p]));
    // "old" has records for the key file and the recovery recipient only: without the key
    // file's slot it would open only offline.
    let out = run(&["key", "slot", "remove", b, "2", "--key-file", k, "--pin-file", p]);
    assert_eq!(out.status.code(), Some(17), "{}", text(&out));
    assert!(text(&out).contains("online slots"), "{}", text(&out));
    ok(run(&["rekey", "--rewrap", "--key-file", k, "--pin-file", p, b]));
    ok(run(&["key", "slot", "remove", b, "2", "--key-file", k, "--pin-file", p]));
    let m = Mounted::start_with(&backing, "--pin-file", &pin, &dir.path().join("mnt2"), &[]);
    assert_eq!(fs::read(m.path("old")).unwrap(), b"before");
    assert_eq!(fs::read(m.path("new")).unwrap(), b"made with every slot");
}

/// A recovery open on a host that never saw the volume authenticates it by the check
/// value only; it must not pin the other slots' settings (a PKCS#11 module to load) as
/// if `envelopefs trust` had been run.
#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "pkcs11_tests")),
    ignore = "needs FUSE mounts as root and SoftHSM2: --features fuse_tests,pkcs11_tests"
)]
fn a_recovery_open_pins_nothing_on_a_host_without_a_record() {
    let (dir, backing, pin, _) = common::pkcs11_volume("fresh", "k");
    let (b, p) = (backing.to_str().unwrap(), pin.to_str().unwrap());
    let rk = dir.path().join("r.age");
    let out = ok(run(&["key", "slot", "add", "--new-recovery-key", rk.to_str().unwrap(), "--pin-file", p, b]));
    let check = out
        .lines()
        .find_map(|l| l.strip_prefix("volume check "))
        .and_then(|l| l.split_whitespace().next())
        .expect("slot add prints the volume check value")
        .to_owned();
    let fresh = dir.path().join("fresh-host");
    let normal = ["key", "slot", "list", b, "--pin-file", p];
    assert_eq!(run_in(&fresh, &normal).status.code(), Some(15), "an unknown PKCS#11 volume is untrusted");
    ok(run_in(&fresh, &["key", "slot", "list", b, "--recovery-key", rk.to_str().unwrap(), "--volume-check", &check]));
    let after = run_in(&fresh, &normal);
    assert_eq!(after.status.code(), Some(15), "the module was never approved on this host: {}", text(&after));
    assert!(text(&after).contains("envelopefs trust"), "{}", text(&after));
}
