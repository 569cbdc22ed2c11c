//! The aws-kms provider, driven by the real aws-sdk-kms client against moto's KMS server on
//! 127.0.0.1. Behaviours moto does not have (disabled keys, throttling, outages) come from
//! the fault-injection proxy in tests/support/kms_proxy.py.

use crate::common;

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cli, pattern, Kms, Mounted};
use envelopefs::keys::aws_kms::{AwsKmsProvider, KmsSettings};

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[cfg_attr(not(feature = "kms_tests"), ignore = "needs moto: --features kms_tests")]
fn aws_kms_provider_meets_the_contract() {
    let kms = Kms::start();
    kms.create_key("contract");
    let mut s = KmsSettings::new("alias/contract");
    s.endpoint = Some(kms.moto_url.clone());
    let p = AwsKmsProvider::open(&s, [0x11; 16]).unwrap();
    assert!(p.arn().starts_with("arn:aws:kms:"), "the alias resolves to the key ARN: {}", p.arn());
    common::provider_contract(Arc::new(p), false);

    // The same contract with DEKs wrapped under an intermediate key.
    kms.create_key("contract-ik");
    let mut ik = KmsSettings::new("alias/contract-ik");
    ik.endpoint = Some(kms.moto_url.clone());
    ik.intermediate_key = true;
    common::provider_contract(Arc::new(AwsKmsProvider::open(&ik, [0x11; 16]).unwrap()), false);

    // A header naming a KMS key the volume does not use is refused before KMS is asked,
    // even though this role could decrypt with that key.
    kms.create_key("foreign");
    let mut f = KmsSettings::new("alias/foreign");
    f.endpoint = Some(kms.moto_url.clone());
    let foreign = AwsKmsProvider::open(&f, [0x11; 16]).unwrap();
    let ctx = envelopefs::keys::KeyContext { volume_id: &[0x11; 16], file_id: &[9; 16] };
    let (_, rec) = envelopefs::keys::KeyProvider::generate(&foreign, &ctx).unwrap();
    let ours = AwsKmsProvider::open(&s, [0x11; 16]).unwrap();
    let e = envelopefs::keys::KeyProvider::unwrap(&ours, &rec, &ctx).unwrap_err();
    assert_eq!(e.errno(), libc::EACCES);
    assert!(e.to_string().contains("does not use"), "{e}");
}

struct KmsVol {
    dir: tempfile::TempDir,
    backing: PathBuf,
}

/// A volume on a KMS key reached through the proxy.
fn kms_volume(kms: &Kms, alias: &str) -> KmsVol {
    let arn = kms.create_key(alias);
    let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let key = format!("alias/{alias}");
    ok(cli(&[
        &"init",
        &"--plaintext-names",
        &"--provider",
        &"aws-kms",
        &"--key-id",
        &key,
        &"--kms-endpoint",
        &kms.proxy_url,
        &backing,
    ]));
    let cfg = fs::read_to_string(backing.join("envelopefs.toml")).unwrap();
    assert!(cfg.contains(&arn), "the key ARN is stored: {cfg}");
    KmsVol { dir, backing }
}

fn mount(v: &KmsVol, extra: &[&str]) -> Mounted {
    // KMS volumes need no secret: credentials come from the AWS chain.
    Mounted::start_with(&v.backing, "", std::path::Path::new(""), &v.dir.path().join("mnt"), extra)
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn kms_volume_round_trip_context_binding_and_header_paste() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "roundtrip");
    let m = mount(&v, &[]);
    let (a, b) = (pattern(1, 20_000), pattern(2, 20_000));
    fs::write(m.path("a"), &a).unwrap();
    fs::write(m.path("b"), &b).unwrap();
    assert!(m.unmount().success());
    let m = mount(&v, &[]);
    assert_eq!(fs::read(m.path("a")).unwrap(), a);
    let inspect = ok(cli(&[&"inspect", &v.backing.join("a")]));
    assert!(inspect.contains("provider aws-kms, KEK \"arn:aws:kms:"), "{inspect}");
    // The header of a pasted onto b: its key unwraps (its own context), but not for b's content.
    let ha = fs::read(v.backing.join("a")).unwrap()[..4096].to_vec();
    let fb = fs::OpenOptions::new().write(true).open(v.backing.join("b")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&fb, &ha, 0).unwrap();
    assert_eq!(fs::File::open(m.path("b")).unwrap_err().raw_os_error(), Some(libc::EIO));
    // A wrapped key moved into another file's header (its context) does not unwrap at KMS.
    drop(m);
    let out = cli(&[&"fsck", &v.backing]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn disabled_key_is_eacces_for_new_opens_while_cached_keys_serve_until_the_ttl() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "disabled");
    let m = mount(&v, &[]);
    fs::write(m.path("cached"), b"cached").unwrap();
    fs::write(m.path("cold"), b"cold").unwrap();
    drop(m);
    let m = mount(&v, &["--cache-ttl", "3", "--cache-tti", "3"]);
    assert_eq!(fs::read(m.path("cached")).unwrap(), b"cached");
    kms.proxy(r#"{"mode": "disabled"}"#);
    assert_eq!(fs::read(m.path("cached")).unwrap(), b"cached", "a cached key keeps serving");
    let e = fs::File::open(m.path("cold")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let log = m.log_text();
    assert!(log.contains("/cold") && log.contains("DisabledException") && log.contains("arn:aws:kms"), "{log}");
    // Once the 3-second TTL has passed, the cached key is gone too.
    let start = Instant::now();
    let e = loop {
        match fs::File::open(m.path("cached")) {
            Err(e) => break e,
            Ok(_) => assert!(start.elapsed() < Duration::from_secs(15), "the cached key outlived its TTL"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "after the TTL: {e}");
    kms.proxy(r#"{"mode": "ok"}"#);
    assert_eq!(fs::read(m.path("cold")).unwrap(), b"cold");
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn outage_is_eio_within_the_bound_then_recovers_and_throttling_is_survived() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "outage");
    let m = mount(&v, &[]);
    let data = pattern(3, 50_000);
    fs::write(m.path("f"), &data).unwrap();
    drop(m);
    let m = mount(&v, &["--kms-timeout", "3"]);
    kms.proxy(r#"{"mode": "down"}"#);
    let t = Instant::now();
    let e = fs::File::open(m.path("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "bounded: {:?}", t.elapsed());
    // A KMS that hangs: EIO once --kms-timeout (3 s) has passed, once, not for each copy of
    // the header.
    kms.proxy(r#"{"mode": "ok", "latency_ms": 20000}"#);
    let t = Instant::now();
    let e = fs::File::open(m.path("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(t.elapsed() < Duration::from_millis(5000), "one timeout, not two: {:?}", t.elapsed());
    kms.proxy(r#"{"mode": "ok", "latency_ms": 0}"#);
    assert_eq!(fs::read(m.path("f")).unwrap(), data, "recovered, nothing lost");
    // A throttling storm: the next 4 calls are refused with ThrottlingException.
    drop(m);
    let m = mount(&v, &[]);
    kms.proxy(r#"{"throttle": 4}"#);
    assert_eq!(fs::read(m.path("f")).unwrap(), data, "retried with backoff");
    for i in 0..20 {
        fs::write(m.path(&format!("new{i}")), b"x").unwrap();
    }
    assert_eq!(fs::read(m.path("new19")).unwrap(), b"x");
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn creates_use_pre_generated_keys_and_opens_hit_kms_once_per_file() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "pool");
    let m = mount(&v, &[]);
    // Let the pool fill, then every create with content takes a ready key.
    let start = Instant::now();
    while kms.calls("GenerateDataKey") < 257 {
        assert!(start.elapsed() < Duration::from_secs(20), "pool did not fill");
        std::thread::sleep(Duration::from_millis(50));
    }
    kms.proxy(r#"{"latency_ms": 200}"#);
    let t = Instant::now();
    for i in 0..10 {
        fs::write(m.path(&format!("f{i}")), b"data").unwrap();
    }
    assert!(t.elapsed() < Duration::from_millis(1500), "creates did not wait on 200 ms KMS calls: {:?}", t.elapsed());
    kms.proxy(r#"{"latency_ms": 0}"#);
    drop(m);
    let m = mount(&v, &[]);
    let before = kms.calls("Decrypt");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..10 {
                    assert_eq!(fs::read(m.path(&format!("f{i}"))).unwrap(), b"data");
                }
            });
        }
    });
    assert_eq!(kms.calls("Decrypt") - before, 10, "one Decrypt per file, shared by concurrent opens");
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn kms_rotate_rewrap_with_reencrypt_then_move_to_another_key_and_disable_the_old_one() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "first");
    let first = fs::read_to_string(v.backing.join("envelopefs.toml")).unwrap();
    let first_arn = first.split("key_id = \"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let m = mount(&v, &[]);
    let mut expect = Vec::new();
    for i in 0..5 {
        let data = pattern(50 + i, 9000);
        fs::write(m.path(&format!("f{i}")), &data).unwrap();
        expect.push((format!("f{i}"), data));
    }
    drop(m);
    // Rotation keeps the key id; ReEncrypt moves headers to the new rotation.
    assert!(ok(cli(&[&"key", &"rotate", &v.backing])).contains("version 1 is now current"));
    let before = kms.calls("ReEncrypt");
    assert!(ok(cli(&[&"rekey", &"--rewrap", &v.backing])).contains("5 files changed"));
    assert_eq!(kms.calls("ReEncrypt") - before, 5, "re-wrapped by ReEncrypt, the DEK never left KMS");
    let status = ok(cli(&[&"key", &"status", &v.backing]));
    assert!(status.contains("version 1 (current): 5 files") && status.contains("version 0: 0 files"), "{status}");
    // KMS keeps every rotation: retiring one is a request this store has no answer to.
    let out = cli(&[&"key", &"retire", &v.backing, &"0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(common::EXIT_USAGE), "{err}");
    assert!(err.contains("retire the whole key in KMS"), "{err}");

    // Move to another key, then disable the first: every file still opens.
    let second_arn = kms.create_key("second");
    let m = mount(&v, &[]);
    let text = ok(cli(&[&"rekey", &"--rewrap", &"--to-key", &"alias/second", &v.backing]));
    assert!(text.contains("5 files changed"), "{text}");
    // The config was replaced under the running mount: the volume is still locked.
    let other = v.dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let out = cli(&[&"mount", &"--foreground", &v.backing, &other]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use"), "{}", String::from_utf8_lossy(&out.stderr));
    drop(m);
    let cfg = fs::read_to_string(v.backing.join("envelopefs.toml")).unwrap();
    assert!(cfg.contains(&second_arn), "{cfg}");
    assert!(ok(cli(&[&"inspect", &v.backing.join("f0")])).contains(&second_arn));
    kms.proxy(&format!(r#"{{"disabled_keys": ["{first_arn}"]}}"#));
    let m = mount(&v, &[]);
    for (name, data) in &expect {
        assert_eq!(&fs::read(m.path(name)).unwrap(), data, "{name}");
    }
    fs::write(m.path("new"), b"on the second key").unwrap();
    drop(m);
    assert!(ok(cli(&[&"inspect", &v.backing.join("new")])).contains(&second_arn));
}

#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn intermediate_key_volume_makes_no_kms_call_per_create_or_open() {
    let kms = Kms::start();
    let arn = kms.create_key("ik");
    let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    ok(cli(&[
        &"init",
        &"--plaintext-names",
        &"--provider",
        &"aws-kms",
        &"--key-id",
        &arn,
        &"--kms-intermediate-key",
        &"--kms-endpoint",
        &kms.proxy_url,
        &backing,
    ]));
    assert!(fs::read_to_string(backing.join("envelopefs.toml")).unwrap().contains("intermediate_key = true"));
    let v = KmsVol { dir, backing };
    let m = mount(&v, &[]);
    kms.proxy(r#"{"latency_ms": 200}"#);
    let gen = kms.calls("GenerateDataKey");
    let t = Instant::now();
    for i in 0..50 {
        fs::write(m.path(&format!("f{i}")), pattern(i, 3000)).unwrap();
    }
    assert!(t.elapsed() < Duration::from_millis(1500), "creates did not wait on 200 ms KMS calls: {:?}", t.elapsed());
    assert_eq!(kms.calls("GenerateDataKey"), gen, "no KMS call per create");
    drop(m);
    let m = mount(&v, &[]);
    let dec = kms.calls("Decrypt");
    for i in 0..50 {
        assert_eq!(fs::read(m.path(&format!("f{i}"))).unwrap(), pattern(i, 3000));
    }
    assert_eq!(kms.calls("Decrypt") - dec, 1, "one Decrypt for the intermediate key, none per file");
    kms.proxy(r#"{"latency_ms": 0}"#);
    drop(m);
    // Rotation and ReEncrypt work on intermediate-key records too.
    ok(cli(&[&"key", &"rotate", &v.backing]));
    assert!(ok(cli(&[&"rekey", &"--rewrap", &v.backing])).contains("50 files changed"));
    let m = mount(&v, &[]);
    assert_eq!(fs::read(m.path("f7")).unwrap(), pattern(7, 3000));
}

#[test]
#[cfg_attr(not(feature = "kms_tests"), ignore = "needs moto: --features kms_tests")]
fn an_unreachable_kms_is_its_own_exit_code() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "unreachable");
    kms.proxy(r#"{"mode": "down"}"#);
    let out = cli(&[&"fsck", &v.backing]);
    assert_eq!(out.status.code(), Some(13), "{}", String::from_utf8_lossy(&out.stderr));
    kms.proxy(r#"{"mode": "ok"}"#);
    ok(cli(&[&"fsck", &v.backing]));
}

/// A KMS that refuses connections is said as a chain of messages, each once, not as the
/// SDK's Debug dump. Needs no moto: nothing listens on the port.
#[test]
fn a_refused_kms_connection_is_said_plainly() {
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_REGION", "us-east-1");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out =
        cli(&[&"init", &"--provider", &"aws-kms", &"--key-id", &"alias/x", &"--kms-endpoint", &endpoint, &d.path()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(13), "{err}");
    assert!(err.contains("Connection refused (os error 111)"), "{err}");
    assert!(!err.contains('{') && !err.contains("DispatchFailure("), "no Debug dump: {err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "each cause once: {err}");
}

/// `GET /metrics` on the running daemon, as text.
/// Cold opens of different files run their key-store round trips at the same time: the
/// KMS stand-in answers no Decrypt until four are in flight (else each waits 10 s and the
/// count shows one at a time).
#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn cold_opens_of_different_files_unwrap_in_parallel() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "parallel");
    let m = mount(&v, &["--kms-pool", "0"]);
    for i in 0..4 {
        fs::write(m.path(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    drop(m);
    // Nothing unwrapped ahead: the overlap must come from the opens themselves.
    let m = mount(&v, &["--kms-pool", "0", "--prefetch-keys", "0", "--threads", "4"]);
    kms.proxy(r#"{"hold_decrypts": 4, "decrypts_in_flight_max": 0}"#);
    let before = kms.calls("Decrypt");
    std::thread::scope(|s| {
        for i in 0..4 {
            let m = &m;
            s.spawn(move || assert_eq!(fs::read_to_string(m.path(&format!("f{i}"))).unwrap(), format!("file {i}")));
        }
    });
    assert_eq!(kms.calls("Decrypt") - before, 4);
    assert_eq!(kms.proxy_state(&["decrypts_in_flight_max"]), 4, "the four Decrypts were in flight at once");
}

/// A scan (opens one after another, each missing the DEK cache) has the rest of its
/// directory unwrapped ahead, a window per miss; every file still costs one Decrypt.
#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn a_scan_has_keys_unwrapped_ahead_and_each_file_costs_one_decrypt() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "ahead");
    let m = mount(&v, &["--kms-pool", "0"]);
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..40 {
        fs::write(m.path(&format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    drop(m);
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let m = mount(&v, &["--kms-pool", "0", "--prefetch-keys", "16", "--metrics", &addr]);
    let before = kms.calls("Decrypt");
    let read = |i: usize| assert_eq!(fs::read_to_string(m.path(&format!("d/f{i}"))).unwrap(), format!("file {i}"));
    // One miss alone is an open, not a scan.
    read(0);
    // A second one makes it a scan: a window of 16 files (f0 and f1 may be among them).
    read(1);
    let start = Instant::now();
    while kms.calls("Decrypt") - before < 16 {
        assert!(start.elapsed() < Duration::from_secs(20), "nothing unwrapped ahead: {}", scrape(port));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sample(&scrape(port), "envelopefs_prefetch_files_total") >= 16);
    for i in 0..40 {
        read(i);
    }
    assert_eq!(kms.calls("Decrypt") - before, 40, "one Decrypt per file: none asked twice");
    assert_eq!(sample(&scrape(port), "envelopefs_prefetch_failures_total"), 0);
    drop(m);

    // Off: a scan's opens each wait for their own Decrypt, and nothing more is asked.
    let m = mount(&v, &["--kms-pool", "0", "--prefetch-keys", "0", "--metrics", &addr]);
    let before = kms.calls("Decrypt");
    for i in 0..3 {
        assert_eq!(fs::read_to_string(m.path(&format!("d/f{i}"))).unwrap(), format!("file {i}"));
    }
    assert_eq!(sample(&scrape(port), "envelopefs_prefetch_files_total"), 0);
    assert_eq!(kms.calls("Decrypt") - before, 3);
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    std::io::Read::read_to_string(&mut s, &mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp.split("\r\n\r\n").nth(1).unwrap().to_owned()
}

/// One sample's value (`name{labels} value`, the line as OpenMetrics writes it).
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// Every KMS request the proxy has seen, whatever the operation.
fn all_calls(kms: &Kms) -> u64 {
    ["DescribeKey", "GenerateDataKey", "Decrypt", "Encrypt", "ReEncrypt", "ListKeyRotations"]
        .iter()
        .map(|op| kms.calls(op))
        .sum()
}

/// The metrics endpoint counts what a workload did: creates, cache hits and misses, and
/// KMS requests exactly as the KMS (the proxy in front of moto) saw them; a read-only
/// mount makes no keys ahead.
#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn the_metrics_endpoint_counts_what_the_workload_did() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "metrics");
    let port = common::free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let port: u16 = port.parse().unwrap();

    let before = all_calls(&kms);
    let m = mount(&v, &["--metrics", &addr]);
    let start = Instant::now();
    while kms.calls("GenerateDataKey") < 257 {
        assert!(start.elapsed() < Duration::from_secs(20), "pool did not fill");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..5 {
        fs::write(m.path(&format!("f{i}")), b"data").unwrap();
    }
    // The pool refills what the creates took: the counts agree once it is done.
    let start = Instant::now();
    let text = loop {
        let text = scrape(port);
        if sample(&text, "envelopefs_kms_requests_total") == all_calls(&kms) - before {
            break text;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "KMS requests counted: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(sample(&text, r#"envelopefs_fuse_requests_total{op="create"}"#), 5);
    assert_eq!(sample(&text, "envelopefs_key_pool_fallbacks_total"), 0, "every create took a key made ahead");
    assert!(text.contains(r#"envelopefs_fuse_request_seconds_count{op="write"}"#), "{text}");
    fs::write(m.path("tampered"), pattern(9, 6000)).unwrap(); // two blocks: the second is tampered
    drop(m);
    let t = v.backing.join("tampered");
    let mut raw = fs::read(&t).unwrap();
    let n = raw.len();
    raw[n - 1] ^= 1;
    fs::write(&t, raw).unwrap();

    // Read-only: no keys made ahead; each file's key unwrapped once, then cached.
    let gen = kms.calls("GenerateDataKey");
    let before = all_calls(&kms);
    // Exact counts per open: nothing unwrapped ahead (that has its own test).
    let m = mount(&v, &["--read-only", "--metrics", &addr, "--prefetch-keys", "0"]);
    for _ in 0..2 {
        for i in 0..5 {
            assert_eq!(fs::read(m.path(&format!("f{i}"))).unwrap(), b"data");
        }
    }
    let text = scrape(port);
    // The open's self-test makes one; a pool would make hundreds.
    assert!(
        kms.calls("GenerateDataKey") - gen <= 1,
        "a read-only mount made keys ahead: {}",
        kms.calls("GenerateDataKey") - gen
    );
    assert_eq!(sample(&text, "envelopefs_dek_cache_misses_total"), 5, "{text}");
    assert_eq!(sample(&text, "envelopefs_dek_cache_hits_total"), 5, "{text}");
    assert_eq!(sample(&text, "envelopefs_kms_requests_total"), all_calls(&kms) - before, "{text}");
    let slot0 = r#"{slot="0",kind="aws-kms"}"#;
    assert_eq!(sample(&text, &format!("envelopefs_key_slot_operations_total{slot0}")), 5, "one unwrap per file");
    assert_eq!(sample(&text, &format!("envelopefs_key_slot_seconds_count{slot0}")), 5, "each timed");
    // A tampered block: EIO, counted as an integrity failure of a block.
    assert_eq!(fs::read(m.path("tampered")).unwrap_err().raw_os_error(), Some(libc::EIO));
    let text = scrape(port);
    assert!(sample(&text, r#"envelopefs_integrity_failures_total{cause="block"}"#) >= 1, "{text}");
}

/// `rekey --metrics`: the run's progress can be scraped while it runs (here slowed by a
/// KMS that answers in 300 ms, one file at a time).
#[test]
#[cfg_attr(
    not(all(feature = "fuse_tests", feature = "kms_tests")),
    ignore = "needs FUSE mounts as root and moto: --features fuse_tests,kms_tests"
)]
fn rekey_progress_is_scraped_while_it_runs() {
    let kms = Kms::start();
    let v = kms_volume(&kms, "progress");
    let m = mount(&v, &[]);
    for i in 0..12 {
        fs::write(m.path(&format!("f{i}")), b"data").unwrap();
    }
    drop(m);
    let port = common::free_port();
    kms.proxy(r#"{"latency_ms": 300}"#);
    let mut child = common::bin()
        .args(["rekey", "--reencrypt", "--jobs", "1", "--metrics", &format!("127.0.0.1:{port}")])
        .arg(&v.backing)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let text = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            drop(std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
            let mut resp = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut resp);
            if let Some(body) = resp.split("\r\n\r\n").nth(1) {
                if body.contains("envelopefs_rekey_files_done_total")
                    && sample(body, "envelopefs_rekey_files_done_total") >= 1
                {
                    break body.to_owned();
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no progress to scrape");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sample(&text, "envelopefs_rekey_files"), 12, "{text}");
    assert!(sample(&text, "envelopefs_rekey_files_done_total") < 12, "scraped mid-run: {text}");
    assert!(child.wait().unwrap().success());
    kms.proxy(r#"{"latency_ms": 0}"#);
}
