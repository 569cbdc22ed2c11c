//! The config's shape, MAC and endpoint rules.

use super::*;

#[test]
fn toml_errors_name_their_line() {
    let text = "format = 2\nblock_size = 4096\nheader_size = =\n";
    let e = toml::from_str::<toml::Table>(text).unwrap_err();
    assert!(toml_error(text, &e).starts_with("line 3: "), "{}", toml_error(text, &e));
    let text = "backing = 3\n[bad\n";
    let e = toml::from_str::<toml::Table>(text).unwrap_err();
    assert_eq!(toml_error(text, &e), "line 2: invalid table header; expected `.`, `]`");
}

fn kms(endpoint: Option<&str>) -> ProviderConfig {
    ProviderConfig::AwsKms {
        key_id: "arn:aws:kms:eu-west-1:1:key/a".into(),
        previous_key_ids: vec![],
        intermediate_key: false,
        region: None,
        endpoint: endpoint.map(str::to_owned),
    }
}

#[test]
fn endpoints_need_https_unless_loopback() {
    for ok in ["https://kms.eu-west-1.amazonaws.com", "http://127.0.0.1:4566", "http://[::1]:80/", "http://localhost"] {
        assert!(check_endpoint(ok).is_ok(), "{ok}");
    }
    for bad in ["http://kms.example.com", "http://10.0.0.1:80", "ftp://x", "http://127.0.0.1.evil.com"] {
        let e = check_endpoint(bad).unwrap_err();
        assert_eq!(e.class(), Some(Class::Usage), "{bad}");
    }
    assert!(kms(Some("http://evil.example")).check_stored().is_err());
}

#[test]
fn differences_name_each_setting() {
    let a = kms(None);
    let mut b = kms(Some("https://x"));
    if let ProviderConfig::AwsKms { key_id, .. } = &mut b {
        *key_id = "arn:aws:kms:eu-west-1:1:key/b".into();
    }
    let d = a.differences(&b);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d[0].starts_with("endpoint: this host trusts nothing"), "{d:?}");
    assert!(d[1].starts_with("key_id: "), "{d:?}");
    assert!(a.differences(&a).is_empty());
    let local = ProviderConfig::Local { keyring: KEYRING_NAME.into() };
    assert!(local.differences(&a).iter().any(|d| d.starts_with("kind: this host trusts \"local\"")));
    // The pinned object list is the MAC's business, not the host's.
    let p = |objects: Vec<String>| ProviderConfig::Pkcs11 {
        module: "/m.so".into(),
        key: "pkcs11:token=t;object=k".into(),
        objects,
        previous_keys: vec![],
    };
    assert!(p(vec![]).differences(&p(vec!["k/v1".into()])).is_empty());
}

#[test]
fn the_mac_covers_every_field() {
    let key = VolumeKey::generate().unwrap();
    let mut cfg = VolumeConfig {
        format: 2,
        volume_id: "00".repeat(16),
        block_size: 4096,
        header_size: 4096,
        generation: 1,
        mac: None,
        provider: kms(None),
        volume_key: Some(WrappedKey { kek_id: "k".into(), kek_version: 1, wrapped: "aa".into() }),
        slots: vec![],
        names: None,
        shared: false,
        upgrading: false,
    };
    cfg.seal(&key);
    cfg.verify(&key).unwrap();
    type Edit = Box<dyn Fn(&mut VolumeConfig)>;
    let edits: Vec<Edit> = vec![
        Box::new(|c| c.block_size = 8192),
        Box::new(|c| c.header_size = 8192),
        Box::new(|c| c.generation = 2),
        Box::new(|c| c.volume_id = "11".repeat(16)),
        Box::new(|c| c.provider = kms(Some("https://other"))),
        Box::new(|c| c.volume_key.as_mut().unwrap().kek_version = 2),
        Box::new(|c| {
            c.format = 3;
            c.slots.push(SlotConfig {
                provider: ProviderConfig::Recovery { recipient: "age1x".into() },
                volume_key: WrappedKey { kek_id: "age1x".into(), kek_version: 1, wrapped: "bb".into() },
            })
        }),
    ];
    for edit in edits {
        let mut c = cfg.clone();
        edit(&mut c);
        assert_eq!(c.verify(&key).unwrap_err().class(), Some(Class::Tampered));
    }
    assert!(cfg.verify(&VolumeKey::generate().unwrap()).is_err(), "another volume key");
}

#[test]
fn slots_need_format_3_and_a_recovery_recipient_is_never_primary() {
    let recipient = age::x25519::Identity::generate().to_public().to_string();
    let slot = |p: ProviderConfig| SlotConfig {
        provider: p,
        volume_key: WrappedKey { kek_id: "k".into(), kek_version: 1, wrapped: "aa".into() },
    };
    let cfg = VolumeConfig {
        format: 3,
        volume_id: "00".repeat(16),
        block_size: 4096,
        header_size: 4096,
        generation: 1,
        mac: Some("00".into()),
        provider: kms(None),
        volume_key: Some(WrappedKey { kek_id: "k".into(), kek_version: 1, wrapped: "aa".into() }),
        slots: vec![slot(ProviderConfig::Recovery { recipient: recipient.clone() })],
        names: None,
        shared: false,
        upgrading: false,
    };
    cfg.check_shape().unwrap();
    assert_eq!(cfg.policy().count(), 2);
    let mut v2 = cfg.clone();
    v2.format = 2;
    assert!(v2.check_shape().unwrap_err().to_string().contains("format 2 with key slots"));
    let mut bad = cfg.clone();
    bad.slots[0].provider = ProviderConfig::Recovery { recipient: "ssh-ed25519 AAAA".into() };
    assert_eq!(bad.check_shape().unwrap_err().class(), Some(Class::Tampered));
    let mut primary = cfg.clone();
    primary.provider = ProviderConfig::Recovery { recipient };
    assert!(primary.check_shape().unwrap_err().to_string().contains("never the primary"));
    let mut two_local = cfg.clone();
    two_local.provider = ProviderConfig::Local { keyring: KEYRING_NAME.into() };
    two_local.slots.push(slot(ProviderConfig::Local { keyring: "/elsewhere".into() }));
    assert!(two_local.check_shape().unwrap_err().to_string().contains("more than one local"));
}

#[test]
fn a_slot_claims_its_own_records_and_multi_region_replicas() {
    let rec = |p: ProviderKind, id: &str| KeyRecord { provider: p, kek_id: id.into(), kek_version: 0, wrapped: vec![] };
    let east = "arn:aws:kms:us-east-1:111122223333:key/mrk-1";
    let west = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1";
    let slot = ProviderConfig::AwsKms {
        key_id: west.into(),
        previous_key_ids: vec!["arn:aws:kms:eu-west-1:1:key/old".into()],
        intermediate_key: false,
        region: None,
        endpoint: None,
    };
    assert!(slot.claims(&rec(ProviderKind::AwsKms, west)));
    assert!(slot.claims(&rec(ProviderKind::AwsKms, east)), "a replica of the same multi-Region key");
    assert!(slot.claims(&rec(ProviderKind::AwsKms, "arn:aws:kms:eu-west-1:1:key/old")));
    assert!(!slot.claims(&rec(ProviderKind::AwsKms, "arn:aws:kms:eu-west-1:111122223333:key/other")));
    assert!(!slot.claims(&rec(ProviderKind::Pkcs11, west)), "another kind");
    let r = ProviderConfig::Recovery { recipient: "age1a".into() };
    assert!(r.claims(&rec(ProviderKind::Recovery, "age1a")) && !r.claims(&rec(ProviderKind::Recovery, "age1b")));
}

#[test]
fn stored_uris_carry_no_pin_source() {
    let p = ProviderConfig::Pkcs11 {
        module: "/m.so".into(),
        key: "pkcs11:token=t;object=k?pin-source=/etc/shadow".into(),
        objects: vec![],
        previous_keys: vec![],
    };
    assert!(p.check_stored().unwrap_err().to_string().contains("pin-source"));
    let l = ProviderConfig::Local { keyring: "../elsewhere".into() };
    assert!(l.check_stored().is_err());
}
