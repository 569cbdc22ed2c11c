//! One contract, every provider: the same tests run against `local` and against `pkcs11`
//! on a real SoftHSM2 token.

use crate::common;

use std::sync::Arc;

use envelopefs::keys::local::{KdfParams, LocalProvider};
use envelopefs::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use envelopefs::keys::secret::Secret;
use envelopefs::keys::KeyProvider;
use zeroize::Zeroizing;

const VOL: [u8; 16] = [0x11; 16];

fn local() -> (tempfile::TempDir, Arc<dyn KeyProvider>) {
    let d = tempfile::tempdir().unwrap();
    let secret = Secret::KeyFile(Zeroizing::new([7; 32]));
    let p = LocalProvider::create(&d.path().join("keyring"), VOL, &secret, KdfParams::default(), 2).unwrap();
    (d, Arc::new(p))
}

fn pkcs11(token: &str) -> Arc<dyn KeyProvider> {
    common::softhsm_token(token);
    let uri: Pkcs11Uri = format!("pkcs11:token={token};object=kek").parse().unwrap();
    let p = Pkcs11Provider::open(common::SOFTHSM_MODULE.as_ref(), &uri, Zeroizing::new("1234".into()), true).unwrap();
    Arc::new(p)
}

fn contract(p: Arc<dyn KeyProvider>) {
    common::provider_contract(p, true);
}

#[test]
fn local_provider_meets_the_contract() {
    let (_d, p) = local();
    contract(p);
}

#[test]
#[cfg_attr(not(feature = "pkcs11_tests"), ignore = "needs SoftHSM2: --features pkcs11_tests")]
fn pkcs11_provider_meets_the_contract() {
    contract(pkcs11("contract"));
}

#[test]
#[cfg_attr(not(feature = "pkcs11_tests"), ignore = "needs SoftHSM2: --features pkcs11_tests")]
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
#[cfg_attr(not(feature = "pkcs11_tests"), ignore = "needs SoftHSM2: --features pkcs11_tests")]
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
