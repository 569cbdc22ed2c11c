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

    /// A new file's id and key at once. Providers that pre-generate keys (KMS, whose
    /// wraps bind the file id) hand out a ready one; the default draws an id and generates.
    fn generate_file_key(&self, volume_id: &VolumeId) -> Result<(FileId, Dek, KeyRecord)> {
        let mut file_id = [0u8; crate::format::FILE_ID_LEN];
        crate::crypto::fill_random(&mut file_id)?;
        let (dek, rec) = self.generate(&KeyContext { volume_id, file_id: &file_id })?;
        Ok((file_id, dek, rec))
    }

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

    /// Make a new KEK version current and return it.
    fn rotate(&self) -> Result<u32>;

    /// Every KEK version the store knows.
    fn versions(&self) -> Result<Vec<KekVersionInfo>>;

    /// Take a KEK version out of service: it no longer unwraps. The caller has checked that
    /// no header still needs it.
    fn retire(&self, version: u32) -> Result<()>;

    /// Wrap the same DEK under the current KEK (header re-wrap). Providers that can do it
    /// without the plaintext DEK leaving the store (KMS ReEncrypt) override this.
    fn rewrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<KeyRecord>;

    /// The key objects this store is limited to, for stores that hold other keys too
    /// (PKCS#11 tokens): the volume's authenticated config pins them.
    fn pinned_objects(&self) -> Option<Vec<String>> {
        None
    }

    /// Limit the store to these key objects (the config's authenticated list).
    fn pin(&self, _objects: Vec<String>) -> Result<()> {
        Ok(())
    }

    /// A keyring file's (version counter, volume format), for the host's rollback check.
    fn keyring_state(&self) -> Option<(u64, u32)> {
        None
    }

    /// A counter that grows whenever the store takes a key out of service (a retire seen
    /// by this process): data keys cached before then are dropped, so none unwrapped with
    /// a retired KEK keeps serving new opens.
    fn revocations(&self) -> u64 {
        0
    }

    /// Record in the store that the volume is now of `format` (stores that keep it).
    fn mark_volume_format(&self, _format: u32) -> Result<()> {
        Ok(())
    }

    /// Give the store the authenticated volume key, for stores whose records it binds
    /// (recovery recipients: anyone can encrypt to a public key).
    fn bind_volume_key(&self, _key: &VolumeKey) {}

    /// Pin every key object the volume can use now (upgrading a volume that pinned none).
    fn pin_found(&self) -> Result<()> {
        Ok(())
    }
}
