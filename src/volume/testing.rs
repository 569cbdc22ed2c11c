//! Helpers for the library's unit tests: volumes in temp dirs that never touch the host's
//! trust store.

use std::path::{Path, PathBuf};

use crate::keys::secret::SecretSource;
use crate::volume::trust::TrustStore;
use crate::volume::{init, InitOptions, OpenOptions, Volume};

/// The trust store of a test under `dir`.
pub fn trust(dir: &Path) -> TrustStore {
    TrustStore::at(&dir.join("trust"))
}

/// A local-keyring volume in `dir/backing`, unlocked by the key file `dir/volume.key`.
pub fn volume(dir: &Path) -> (PathBuf, SecretSource) {
    let backing = dir.join("backing");
    std::fs::create_dir(&backing).unwrap();
    let key = dir.join("volume.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let secret = SecretSource { key_file: Some(key), ..Default::default() };
    let opts = InitOptions { trust: trust(dir), ..InitOptions::default() };
    init(&backing, &secret, &opts).unwrap();
    (backing, secret)
}

/// Open the volume [`volume`] made.
pub fn open(dir: &Path) -> Volume {
    let secret = SecretSource { key_file: Some(dir.join("volume.key")), ..Default::default() };
    Volume::open(&dir.join("backing"), &secret, &OpenOptions { trust: trust(dir), ..OpenOptions::default() }).unwrap()
}
