//! One contract, every provider: the same tests run against `local` and against `pkcs11`
//! on a real SoftHSM2 token.

mod common;

use std::sync::Arc;

use envelopefs::keys::local::{KdfParams, LocalProvider};
use envelopefs::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use envelopefs::keys::secret::Secret;
use envelopefs::keys::{KeyContext, KeyProvider};
use zeroize::Zeroizing;

const VOL: [u8; 16] = [0x11; 16];

fn local() -> (tempfile::TempDir, Arc<dyn KeyProvider>) {
    let d = tempfile::tempdir().unwrap();
    let secret = Secret::KeyFile(Zeroizing::new([7; 32]));
    let p = LocalProvider::create(&d.path().join("keyring"), VOL, &secret, KdfParams::default()).unwrap();
    (d, Arc::new(p))
}

fn pkcs11(token: &str) -> Arc<dyn KeyProvider> {
    common::softhsm_token(token);
    let uri: Pkcs11Uri = format!("pkcs11:token={token};object=kek").parse().unwrap();
    let p = Pkcs11Provider::open(common::SOFTHSM_MODULE.as_ref(), &uri, Zeroizing::new("1234".into()), true).unwrap();
    Arc::new(p)
}

fn contract(p: Arc<dyn KeyProvider>) {
    let f1 = [1u8; 16];
    let f2 = [2u8; 16];
    let ctx = KeyContext { volume_id: &VOL, file_id: &f1 };
    let v1 = p.current_version().unwrap();

    // Round trip; every generate is a fresh key.
    let (dek, rec) = p.generate(&ctx).unwrap();
    assert_eq!(rec.provider, p.kind());
    assert_eq!(rec.kek_version, v1);
    assert_eq!(p.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());
    let (dek_b, _) = p.generate(&ctx).unwrap();
    assert_ne!(dek.expose(), dek_b.expose());

    // Bound to the file and the volume.
    let other_file = KeyContext { volume_id: &VOL, file_id: &f2 };
    assert_eq!(p.unwrap(&rec, &other_file).unwrap_err().errno(), libc::EACCES);
    let other_vol = KeyContext { volume_id: &[0x22; 16], file_id: &f1 };
    assert_eq!(p.unwrap(&rec, &other_vol).unwrap_err().errno(), libc::EACCES);

    // Tampered wrapped key, unknown version.
    let mut bad = rec.clone();
    let last = bad.wrapped.len() - 1;
    bad.wrapped[last] ^= 1;
    assert_eq!(p.unwrap(&bad, &ctx).unwrap_err().errno(), libc::EACCES);
    let mut missing = rec.clone();
    missing.kek_version = 999;
    assert_eq!(p.unwrap(&missing, &ctx).unwrap_err().errno(), libc::EACCES);

    // Rotation: new wraps use the new version, old records still unwrap, rewrap moves them.
    let v2 = p.rotate().unwrap();
    assert_eq!(v2, v1 + 1);
    assert_eq!(p.current_version().unwrap(), v2);
    let (_, rec2) = p.generate(&ctx).unwrap();
    assert_eq!(rec2.kek_version, v2);
    assert_eq!(p.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());
    let moved = p.rewrap(&rec, &ctx).unwrap();
    assert_eq!(moved.kek_version, v2);
    assert_eq!(p.unwrap(&moved, &ctx).unwrap().expose(), dek.expose());
    let versions = p.versions().unwrap();
    assert!(versions.iter().any(|v| v.version == v1 && !v.current));
    assert!(versions.iter().any(|v| v.version == v2 && v.current));
    assert_eq!(versions.iter().filter(|v| v.current).count(), 1);

    // Many threads at once (PKCS#11: a pool of sessions).
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let p = p.clone();
            let rec = rec.clone();
            let dek = dek.expose().to_vec();
            s.spawn(move || {
                for i in 0..25u8 {
                    let fid = [t, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    let c = KeyContext { volume_id: &VOL, file_id: &fid };
                    let (k, r) = p.generate(&c).unwrap();
                    assert_eq!(p.unwrap(&r, &c).unwrap().expose(), k.expose());
                    assert_eq!(&p.unwrap(&rec, &ctx).unwrap().expose()[..], &dek[..]);
                }
            });
        }
    });
}

#[test]
fn local_provider_meets_the_contract() {
    let (_d, p) = local();
    contract(p);
}

#[test]
fn pkcs11_provider_meets_the_contract() {
    contract(pkcs11("contract"));
}

#[test]
fn pkcs11_wrong_pin_missing_token_and_missing_key_are_clear() {
    common::softhsm_token("errors");
    let module = std::path::Path::new(common::SOFTHSM_MODULE);
    let uri: Pkcs11Uri = "pkcs11:token=errors;object=kek".parse().unwrap();
    let e = Pkcs11Provider::open(module, &uri, Zeroizing::new("0000".into()), true).err().unwrap();
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    assert!(e.to_string().contains("PIN"), "{e}");
    let nowhere: Pkcs11Uri = "pkcs11:token=no-such-token;object=kek".parse().unwrap();
    let e = Pkcs11Provider::open(module, &nowhere, Zeroizing::new("1234".into()), true).err().unwrap();
    assert!(e.to_string().contains("no PKCS#11 token matches"), "{e}");
    let e = Pkcs11Provider::open(module, &uri, Zeroizing::new("1234".into()), false).err().unwrap();
    assert!(e.to_string().contains("envelopefs key create"), "{e}");
    let e = Pkcs11Provider::open("/nonexistent/module.so".as_ref(), &uri, Zeroizing::new("1234".into()), true)
        .err()
        .unwrap();
    assert!(e.to_string().contains("loading PKCS#11 module"), "{e}");
}

#[test]
fn pkcs11_kek_is_sensitive_and_not_extractable() {
    let _ = pkcs11("attrs");
    // Ask the token itself, through OpenSC's pkcs11-tool.
    let out = std::process::Command::new("pkcs11-tool")
        .args([
            "--module",
            common::SOFTHSM_MODULE,
            "--token-label",
            "attrs",
            "--login",
            "--pin",
            "1234",
            "--list-objects",
            "--type",
            "secrkey",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kek/v1"), "{text}");
    assert!(text.contains("sensitive") && text.contains("never extractable"), "{text}");
}
