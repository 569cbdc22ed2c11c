//! The `local` provider: a keyring file of KEK versions, sealed with AES-256-GCM under a key
//! derived from a passphrase (Argon2id) or from a 32-byte key file. The embedded default:
//! it needs nothing running.

mod keyring;

pub use keyring::decode_for_fuzzing;
use keyring::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use zeroize::Zeroizing;

use super::secret::Secret;
use super::{KekVersionInfo, KeyContext, KeyProvider, VolumeId};
use crate::crypto::{fill_random, Aead, Dek, KEY_LEN};
use crate::error::{Class, Error, Result};
use crate::format::{KeyRecord, ProviderKind, NONCE_LEN, TAG_LEN};

/// Version 1 keyrings (read only) and version 2 (written): v2 adds a version counter, the
/// format of the volume it belongs to, and erases retired keys.
const MAGIC_V1: &[u8; 8] = b"EFSKEYR1";
const MAGIC: &[u8; 8] = b"EFSKEYR2";
const KDF_ARGON2ID: u8 = 1;
const KDF_KEYFILE: u8 = 2;
/// magic, kdf, reserved, m, t, p, salt, volume id, nonce.
const PREAMBLE_LEN: usize = 8 + 1 + 3 + 4 + 4 + 4 + 16 + 16 + NONCE_LEN;
const ENTRY_LEN: usize = 4 + 1 + KEY_LEN;
const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
/// The KEK id local key records carry.
pub const KEK_ID: &str = "local";

/// Argon2id cost. The default follows the RFC 9106 second recommendation (64 MiB, t=3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

/// Argon2id costs of a new passphrase when not told otherwise.
pub const DEFAULT_KDF_MEMORY_MIB: u32 = 64;
pub const DEFAULT_KDF_ITERATIONS: u32 = 3;

impl Default for KdfParams {
    fn default() -> Self {
        Self { m_kib: DEFAULT_KDF_MEMORY_MIB * 1024, t: DEFAULT_KDF_ITERATIONS, p: 1 }
    }
}

impl KdfParams {
    /// The costs a keyring may ask for. They are read before anything authenticates them,
    /// so an edited keyring must not be able to demand hours or gigabytes; init holds new
    /// keyrings to the same bounds.
    pub const MAX_M_KIB: u32 = 1 << 20;
    pub const MAX_T: u32 = 16;
    pub const MAX_P: u32 = 8;

    pub fn check(&self) -> Result<()> {
        if self.m_kib > Self::MAX_M_KIB || self.t > Self::MAX_T || self.p > Self::MAX_P {
            return Err(Error::new(
                libc::EINVAL,
                format!(
                    "Argon2id cost {} MiB × {} passes × {} lanes is out of range (at most {} MiB, {} passes, {} lanes)",
                    self.m_kib / 1024,
                    self.t,
                    self.p,
                    Self::MAX_M_KIB / 1024,
                    Self::MAX_T,
                    Self::MAX_P
                ),
            ));
        }
        argon2::Params::new(self.m_kib, self.t, self.p, Some(32))
            .map(drop)
            .map_err(|e| Error::new(libc::EINVAL, format!("bad Argon2id parameters: {e}")))
    }
}

pub struct LocalProvider {
    path: PathBuf,
    volume_id: VolumeId,
    seal: Seal,
    ring: RwLock<Ring>,
    /// The keyring file as last read or written (mtime, inode, length).
    stamp: std::sync::Mutex<(i64, i64, u64, u64)>,
    /// Keys this process has seen retired (see `KeyProvider::revocations`).
    revoked: std::sync::atomic::AtomicU64,
}

impl LocalProvider {
    /// Create a keyring with one fresh KEK (version 1). Fails if the file exists.
    pub fn create(
        path: &Path,
        volume_id: VolumeId,
        secret: &Secret,
        params: KdfParams,
        volume_format: u32,
    ) -> Result<Self> {
        params.check()?;
        let mut salt = [0u8; 16];
        fill_random(&mut salt)?;
        let seal = Seal::derive(secret, params, salt)?;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut key[..])?;
        let ring = Ring { version: 0, volume_format, current: 1, entries: vec![Entry { version: 1, key: Some(key) }] };
        let p = Self {
            path: path.to_owned(),
            volume_id,
            seal,
            ring: RwLock::new(ring),
            stamp: Default::default(),
            revoked: Default::default(),
        };
        p.write_file(true)?;
        Ok(p)
    }

    /// Open and unlock an existing keyring (never through a symlink).
    pub fn open(path: &Path, volume_id: VolumeId, secret: &Secret) -> Result<Self> {
        let raw = crate::sys::atomic_file::read(path)
            .map_err(|e| Error::io(e, format!("reading keyring {}", path.display())).with_class(Class::NotVolume))?;
        let bad = |why: &str| Error::tampered(format!("keyring {} is damaged: {why}", path.display()));
        let Preamble { kdf, params, salt, volume_id: theirs, .. } =
            Preamble::parse(&raw).map_err(|e| bad(&e.to_string()))?;
        if theirs != volume_id {
            return Err(bad("it belongs to another volume"));
        }
        match (kdf, secret) {
            (KDF_ARGON2ID, Secret::KeyFile(_)) => {
                return Err(Error::access("this keyring is sealed with a passphrase, not a key file")
                    .with_class(Class::WrongSecret))
            }
            (KDF_KEYFILE, Secret::Passphrase(_)) => {
                return Err(Error::access("this keyring is sealed with a key file: pass --key-file")
                    .with_class(Class::WrongSecret))
            }
            (KDF_ARGON2ID | KDF_KEYFILE, _) => {}
            _ => return Err(bad("unknown key derivation")),
        }
        let seal = Seal::derive(secret, params, salt)?;
        let plain = open_sealed(&raw, &seal.key).ok_or_else(|| {
            Error::access("wrong passphrase or key file (the keyring does not decrypt)").with_class(Class::WrongSecret)
        })?;
        let ring = Ring::decode(&raw[..8], &plain).ok_or_else(|| bad("its contents do not parse"))?;
        let stamp = fs::symlink_metadata(path).map(|m| file_stamp(&m)).unwrap_or_default();
        Ok(Self {
            path: path.to_owned(),
            volume_id,
            seal,
            ring: RwLock::new(ring),
            stamp: std::sync::Mutex::new(stamp),
            revoked: Default::default(),
        })
    }

    /// The keyring's version counter (bumped on every write).
    pub fn ring_version(&self) -> u64 {
        self.ring.read().unwrap().version
    }

    /// The format of the volume this keyring says it belongs to (1 for a v1 keyring).
    pub fn volume_format(&self) -> u32 {
        self.ring.read().unwrap().volume_format
    }

    /// Record that the volume is now of `format` (upgrade).
    /// Seal the keyring under a new passphrase or key file (a fresh salt; `params` for a
    /// passphrase). The KEKs and their versions stay: no file changes. The old secret no
    /// longer opens the keyring, but a copy of the old keyring file still opens with it.
    pub fn reseal(self, secret: &Secret, params: KdfParams) -> Result<Self> {
        params.check()?;
        let mut salt = [0u8; 16];
        fill_random(&mut salt)?;
        let resealed = Self { seal: Seal::derive(secret, params, salt)?, ..self };
        resealed.write_file(false)?;
        Ok(resealed)
    }

    pub fn set_volume_format(&self, format: u32) -> Result<()> {
        self.ring.write().unwrap().volume_format = format;
        self.write_file(false)
    }

    /// Seal the keyring and replace the file atomically (temp file, fsync, rename, fsync dir).
    fn write_file(&self, create_new: bool) -> Result<()> {
        self.ring.write().unwrap().version += 1;
        let ring = self.ring.read().unwrap();
        let mut out = Vec::with_capacity(PREAMBLE_LEN + 64);
        out.extend_from_slice(MAGIC);
        out.push(self.seal.kdf);
        out.extend_from_slice(&[0; 3]);
        for v in [self.seal.params.m_kib, self.seal.params.t, self.seal.params.p] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.seal.salt);
        out.extend_from_slice(&self.volume_id);
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        out.extend_from_slice(&nonce);
        let mut body = ring.encode();
        let tag = Aead::new(&self.seal.key).seal(&nonce, &out, &mut body);
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag);
        let ctx = |what: &str| format!("{what} keyring {}", self.path.display());
        if create_new && fs::symlink_metadata(&self.path).is_ok() {
            return Err(Error::new(libc::EEXIST, ctx("refusing to overwrite")));
        }
        crate::sys::atomic_file::replace(&self.path, &out, 0o600).map_err(|e| Error::io(e, ctx("writing")))?;
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            *self.stamp.lock().unwrap() = file_stamp(&m);
        }
        Ok(())
    }

    fn wrap_aad(&self, ctx: &KeyContext<'_>, version: u32) -> Vec<u8> {
        let mut aad = b"envelopefs local wrap v1".to_vec();
        aad.extend_from_slice(ctx.volume_id);
        aad.extend_from_slice(ctx.file_id);
        aad.extend_from_slice(&version.to_le_bytes());
        aad
    }

    fn wrap_under(&self, dek: &Dek, ctx: &KeyContext<'_>, version: u32) -> Result<KeyRecord> {
        let ring = self.ring.read().unwrap();
        let entry = ring.get(version)?;
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut wrapped = Vec::with_capacity(WRAPPED_LEN);
        wrapped.extend_from_slice(&nonce);
        let mut ct = Zeroizing::new(dek.expose().to_vec());
        let tag = Aead::new(entry.key()?).seal(&nonce, &self.wrap_aad(ctx, version), &mut ct);
        wrapped.extend_from_slice(&ct);
        wrapped.extend_from_slice(&tag);
        Ok(KeyRecord { provider: ProviderKind::Local, kek_id: KEK_ID.into(), kek_version: version, wrapped })
    }

    /// Re-read the keyring if another process (`key rotate`, `key retire`) changed it, so a
    /// running mount wraps new files under the new current version, and stops unwrapping
    /// with a retired one, at once. An older keyring put in its place is not taken.
    fn reload_if_changed(&self) -> Result<()> {
        let Ok(meta) = fs::symlink_metadata(&self.path) else { return Ok(()) };
        let stamp = file_stamp(&meta);
        if *self.stamp.lock().unwrap() == stamp {
            return Ok(());
        }
        let raw = crate::sys::atomic_file::read(&self.path)
            .map_err(|e| Error::io(e, format!("reading keyring {}", self.path.display())))?;
        let plain = open_sealed(&raw, &self.seal.key).ok_or_else(|| {
            Error::access(format!("keyring {} changed and no longer opens with our key", self.path.display()))
        })?;
        let ring = Ring::decode(&raw[..8], &plain).ok_or_else(|| Error::corrupt("keyring contents do not parse"))?;
        *self.stamp.lock().unwrap() = stamp;
        let ours = self.ring.read().unwrap().version;
        if ring.version < ours {
            tracing::error!(
                "keyring {} was replaced by an older one (version {} < {ours}): ignored, the newer keys stay in use",
                self.path.display(),
                ring.version
            );
            return Ok(());
        }
        let usable = |r: &Ring| r.entries.iter().filter(|e| e.key.is_some()).map(|e| e.version).collect::<Vec<_>>();
        let before = usable(&self.ring.read().unwrap());
        let after = usable(&ring);
        if before.iter().any(|v| !after.contains(v)) {
            self.revoked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        *self.ring.write().unwrap() = ring;
        tracing::info!(
            "reloaded keyring {} (current KEK version {})",
            self.path.display(),
            self.ring.read().unwrap().current
        );
        Ok(())
    }
}

fn file_stamp(m: &fs::Metadata) -> (i64, i64, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.mtime(), m.mtime_nsec(), m.ino(), m.len())
}

impl KeyProvider for LocalProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    fn kek_id(&self) -> String {
        KEK_ID.to_owned()
    }

    fn describe(&self) -> String {
        format!("local keyring {}", self.path.display())
    }

    fn generate(&self, ctx: &KeyContext<'_>) -> Result<(Dek, KeyRecord)> {
        self.reload_if_changed()?;
        let dek = Dek::generate()?;
        let version = self.ring.read().unwrap().current;
        let rec = self.wrap_under(&dek, ctx, version)?;
        Ok((dek, rec))
    }

    fn wrap(&self, dek: &Dek, ctx: &KeyContext<'_>) -> Result<KeyRecord> {
        self.reload_if_changed()?;
        let version = self.ring.read().unwrap().current;
        self.wrap_under(dek, ctx, version)
    }

    fn unwrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<Dek> {
        if record.provider != ProviderKind::Local {
            return Err(Error::access(format!("key record is for provider {}", record.provider.name())));
        }
        if record.wrapped.len() != WRAPPED_LEN {
            return Err(Error::access(format!(
                "wrapped key has {} bytes, expected {WRAPPED_LEN}",
                record.wrapped.len()
            )));
        }
        self.reload_if_changed()?;
        let ring = self.ring.read().unwrap();
        let entry = ring.get(record.kek_version)?;
        let nonce: [u8; NONCE_LEN] = record.wrapped[..NONCE_LEN].try_into().unwrap();
        let ct = &record.wrapped[NONCE_LEN..NONCE_LEN + KEY_LEN];
        let tag: &[u8; TAG_LEN] = record.wrapped[NONCE_LEN + KEY_LEN..].try_into().unwrap();
        let mut plain = Zeroizing::new([0u8; KEY_LEN]);
        Aead::new(entry.key()?)
            .open(&nonce, &self.wrap_aad(ctx, record.kek_version), ct, tag, &mut plain[..])
            .map_err(|_| {
                Error::access(format!(
                    "wrapped key does not authenticate under local KEK version {} (copied from another file or volume?)",
                    record.kek_version
                ))
            })?;
        Dek::from_slice(&plain[..])
    }

    fn current_version(&self) -> Result<u32> {
        Ok(self.ring.read().unwrap().current)
    }

    fn versions(&self) -> Result<Vec<KekVersionInfo>> {
        let ring = self.ring.read().unwrap();
        Ok(ring
            .entries
            .iter()
            .map(|e| KekVersionInfo {
                version: e.version,
                current: e.version == ring.current,
                retired: e.key.is_none(),
            })
            .collect())
    }

    fn rewrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<KeyRecord> {
        let dek = self.unwrap(record, ctx)?;
        let version = self.current_version()?;
        self.wrap_under(&dek, ctx, version)
    }

    fn keyring(&self) -> Option<&dyn super::KeyringFile> {
        Some(self)
    }

    fn rotation(&self) -> Option<&dyn super::Rotation> {
        Some(self)
    }

    fn retirement(&self) -> Option<&dyn super::Retirement> {
        Some(self)
    }
}

impl super::Rotation for LocalProvider {
    fn rotate(&self) -> Result<u32> {
        self.reload_if_changed()?;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut key[..])?;
        let version = {
            let mut ring = self.ring.write().unwrap();
            let version = ring.entries.iter().map(|e| e.version).max().unwrap_or(0) + 1;
            ring.entries.push(Entry { version, key: Some(key) });
            ring.current = version;
            version
        };
        self.write_file(false)?;
        Ok(version)
    }
}

impl super::Retirement for LocalProvider {
    fn retire(&self, version: u32) -> Result<()> {
        {
            let mut ring = self.ring.write().unwrap();
            if ring.current == version {
                return Err(Error::new(libc::EBUSY, format!("KEK version {version} is current: rotate first")));
            }
            let e = ring.entries.iter_mut().find(|e| e.version == version);
            e.ok_or_else(|| Error::new(libc::ENOENT, format!("no KEK version {version}")))?.key = None;
        }
        self.revoked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.write_file(false)
    }
}

impl super::KeyringFile for LocalProvider {
    fn revocations(&self) -> u64 {
        if let Err(e) = self.reload_if_changed() {
            tracing::warn!("{e}");
        }
        self.revoked.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn state(&self) -> (u64, u32) {
        (self.ring_version(), self.volume_format())
    }

    fn mark_volume_format(&self, format: u32) -> Result<()> {
        if self.volume_format() < format {
            self.set_volume_format(format)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Retirement, Rotation};

    fn fast() -> KdfParams {
        KdfParams { m_kib: 256, t: 1, p: 1 }
    }

    fn pw(s: &str) -> Secret {
        Secret::Passphrase(Zeroizing::new(s.as_bytes().to_vec()))
    }

    #[test]
    fn wrap_unwrap_rotate_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.keyring");
        let vol = [1u8; 16];
        let p = LocalProvider::create(&path, vol, &pw("hunter2"), fast(), 2).unwrap();
        let fid = [2u8; 16];
        let ctx = KeyContext { volume_id: &vol, file_id: &fid };
        let (dek, rec) = p.generate(&ctx).unwrap();
        assert_eq!(rec.kek_version, 1);
        assert_eq!(p.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());

        // Bound to the file id: another file's context does not unwrap it.
        let other = [3u8; 16];
        let err = p.unwrap(&rec, &KeyContext { volume_id: &vol, file_id: &other }).unwrap_err();
        assert_eq!(err.errno(), libc::EACCES);

        assert_eq!(p.rotate().unwrap(), 2);
        let (_, rec2) = p.generate(&ctx).unwrap();
        assert_eq!(rec2.kek_version, 2);
        let rewrapped = p.rewrap(&rec, &ctx).unwrap();
        assert_eq!(rewrapped.kek_version, 2);

        // Reopen from disk: both versions are there and unwrap.
        let q = LocalProvider::open(&path, vol, &pw("hunter2")).unwrap();
        assert_eq!(q.current_version().unwrap(), 2);
        assert_eq!(q.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());
        assert_eq!(q.unwrap(&rewrapped, &ctx).unwrap().expose(), dek.expose());

        let v1_key = *q.ring.read().unwrap().get(1).unwrap().key().unwrap();
        q.retire(1).unwrap();
        let r = LocalProvider::open(&path, vol, &pw("hunter2")).unwrap();
        assert_eq!(r.unwrap(&rec, &ctx).unwrap_err().errno(), libc::EACCES);
        assert!(r.retire(2).is_err(), "the current version cannot be retired");
        // Retiring erases: the sealed body no longer holds version 1's key.
        let body = r.ring.read().unwrap().encode();
        assert!(!body.windows(KEY_LEN).any(|w| w == v1_key), "a retired key stays in the keyring");
        assert_eq!(r.ring_version(), 3, "create, rotate and retire each bump the version");
    }

    #[test]
    fn reseal_changes_the_secret_and_keeps_the_keys() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("kr");
        let vol = [5u8; 16];
        let p = LocalProvider::create(&path, vol, &pw("old"), fast(), 2).unwrap();
        let ctx = KeyContext { volume_id: &vol, file_id: &[1; 16] };
        let (dek, rec) = p.generate(&ctx).unwrap();
        let p = p.reseal(&pw("new"), fast()).unwrap();
        assert_eq!(p.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());
        assert!(LocalProvider::open(&path, vol, &pw("old")).is_err(), "the old passphrase no longer opens it");
        let q = LocalProvider::open(&path, vol, &pw("new")).unwrap();
        assert_eq!(q.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());
    }

    #[test]
    fn wrong_secret_and_wrong_volume_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.keyring");
        let vol = [1u8; 16];
        LocalProvider::create(&path, vol, &pw("right"), fast(), 2).unwrap();
        let e = LocalProvider::open(&path, vol, &pw("wrong")).err().unwrap();
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
        let e = LocalProvider::open(&path, [9u8; 16], &pw("right")).err().unwrap();
        assert!(e.to_string().contains("another volume"), "{e}");
        let e = LocalProvider::open(&path, vol, &Secret::KeyFile(Zeroizing::new([0; 32]))).err().unwrap();
        assert!(e.to_string().contains("passphrase"), "{e}");
        assert!(LocalProvider::create(&path, vol, &pw("x"), fast(), 2).is_err(), "never overwrite a keyring");
    }

    #[test]
    fn key_file_keyring() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.keyring");
        let vol = [5u8; 16];
        let kf = || Secret::KeyFile(Zeroizing::new([8u8; 32]));
        LocalProvider::create(&path, vol, &kf(), fast(), 2).unwrap();
        assert!(LocalProvider::open(&path, vol, &kf()).is_ok());
        assert!(LocalProvider::open(&path, vol, &Secret::KeyFile(Zeroizing::new([9u8; 32]))).is_err());
        let raw = fs::read(&path).unwrap();
        assert!(!raw.windows(4).any(|w| w == [8u8; 4]), "key file bytes never stored");
    }
}
