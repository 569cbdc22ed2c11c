//! Key-encryption keys live in a key store ("provider"); data keys are generated per file,
//! wrapped by the provider, and cached unwrapped in memory for a bounded time.

pub mod aws_kms;
pub mod cache;
pub mod local;
pub mod pkcs11;
pub mod pool;
pub mod recovery;
pub mod secret;

use crate::crypto::{Dek, VolumeKey};
use crate::error::Result;
use crate::format::{FileId, KeyRecord, ProviderKind};

pub const VOLUME_ID_LEN: usize = 16;
pub type VolumeId = [u8; VOLUME_ID_LEN];

/// What a wrapped key is bound to. Providers must authenticate it with the wrap (AAD for
/// local and PKCS#11, the encryption context for KMS), so a wrapped key copied into another
/// file or volume does not unwrap.
#[derive(Clone, Copy, Debug)]
pub struct KeyContext<'a> {
    pub volume_id: &'a VolumeId,
    pub file_id: &'a FileId,
}

impl KeyContext<'_> {
    /// The encryption-context pairs a KMS binds (`envelopefs:volume`, `envelopefs:file`).
    pub fn pairs(&self) -> [(&'static str, String); 2] {
        [("envelopefs:volume", hex::encode(self.volume_id)), ("envelopefs:file", hex::encode(self.file_id))]
    }
}

/// One KEK version as `key status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekVersionInfo {
    pub version: u32,
    pub current: bool,
    pub retired: bool,
}

/// A key store. The surface is synchronous: FUSE worker threads call it directly, and a
/// provider that talks to a network service blocks on its own runtime (never the caller's).
pub trait KeyProvider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// A short description for logs and `inspect` (never a secret).
    fn describe(&self) -> String;

    /// The KEK id new key records carry (with `current_version`, what "current" means).
    fn kek_id(&self) -> String;

    /// A fresh DEK and its wrapped form under the current KEK (like KMS GenerateDataKey).
    fn generate(&self, ctx: &KeyContext<'_>) -> Result<(Dek, KeyRecord)>;

    /// Wrap a DEK drawn elsewhere under the current KEK (key slots: one DEK, one record per
    /// slot, like KMS Encrypt beside GenerateDataKey).
    fn wrap(&self, dek: &Dek, ctx: &KeyContext<'_>) -> Result<KeyRecord>;

    /// Whether a wrap waits on another machine (a KMS call per file, an HSM): such wraps
    /// for several slots run concurrently, local ones inline.
    fn wraps_remotely(&self) -> bool {
        false
    }

    /// Requests sent to a remote key service so far (KMS bills and throttles these; a
    /// cache, a pool or an intermediate key make them differ from the operations asked
    /// for). None for a store that is not a service.
    fn requests_sent(&self) -> Option<u64> {
        None
    }

    /// Recover a DEK. A missing, retired or refusing KEK is `EACCES`; a wrapped key that
    /// does not authenticate against `ctx` is `EACCES` as well (it is not ours to open).
    fn unwrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<Dek>;

    /// The KEK version new wraps use.
    fn current_version(&self) -> Result<u32>;

    /// Every KEK version the store knows.
    fn versions(&self) -> Result<Vec<KekVersionInfo>>;

    /// Wrap the same DEK under the current KEK (header re-wrap). Providers that can do it
    /// without the plaintext DEK leaving the store (KMS ReEncrypt) override this.
    fn rewrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<KeyRecord>;

    /// The store makes new KEK versions (not a recovery recipient: it has one key, and a new
    /// one is a new slot).
    fn rotation(&self) -> Option<&dyn Rotation> {
        None
    }

    /// The store takes KEK versions out of service (not KMS, which keeps every rotation of a
    /// key; not a recovery recipient).
    fn retirement(&self) -> Option<&dyn Retirement> {
        None
    }

    /// The store limits itself to key objects the volume's config pins (PKCS#11 tokens,
    /// which hold other keys too).
    fn pinning(&self) -> Option<&dyn Pinning> {
        None
    }

    /// The store keeps a keyring file of its own (local).
    fn keyring(&self) -> Option<&dyn KeyringFile> {
        None
    }

    /// The store's records are bound to the volume key (recovery recipients: anyone can
    /// encrypt to a public key).
    fn binding(&self) -> Option<&dyn VolumeBinding> {
        None
    }
}

/// A new file's id and key at once, under `p`'s current KEK.
pub fn new_file_key(p: &dyn KeyProvider, volume_id: &VolumeId) -> Result<(FileId, Dek, KeyRecord)> {
    let mut file_id = [0u8; crate::format::FILE_ID_LEN];
    crate::crypto::fill_random(&mut file_id)?;
    let (dek, rec) = p.generate(&KeyContext { volume_id, file_id: &file_id })?;
    Ok((file_id, dek, rec))
}

/// New KEK versions.
pub trait Rotation {
    /// Make a new KEK version current and return it.
    fn rotate(&self) -> Result<u32>;
}

/// KEK versions taken out of service.
pub trait Retirement {
    /// Take a KEK version out of service: it no longer unwraps. The caller has checked that
    /// no header still needs it.
    fn retire(&self, version: u32) -> Result<()>;
}

/// Key objects a store is limited to (the config's authenticated list).
pub trait Pinning {
    /// The objects pinned now; None before any are (a volume that pinned none yet).
    fn pinned_objects(&self) -> Option<Vec<String>>;

    /// Limit the store to these key objects.
    fn pin(&self, objects: Vec<String>) -> Result<()>;

    /// Pin every key object the volume can use now (upgrading a volume that pinned none).
    fn pin_found(&self) -> Result<()>;
}

/// A keyring file the store keeps, which the host's rollback check follows.
pub trait KeyringFile {
    /// The keyring's (version counter, volume format).
    fn state(&self) -> (u64, u32);

    /// A counter that grows whenever a key is taken out of service (a retire seen by this
    /// process): data keys cached before then are dropped, so none unwrapped with a
    /// retired KEK keeps serving new opens.
    fn revocations(&self) -> u64;

    /// Record in the keyring that the volume is now of `format`.
    fn mark_volume_format(&self, format: u32) -> Result<()>;
}

/// Records bound to the authenticated volume key.
pub trait VolumeBinding {
    fn bind_volume_key(&self, key: &VolumeKey);
}
