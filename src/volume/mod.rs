//! A volume: the backing directory's `envelopefs.toml`, its key provider and its DEK cache.

pub mod audit;
pub mod config;
mod keys;

pub use keys::{KeyService, KeySlot};
mod init;
pub mod lock;
mod open;
mod stores;
#[cfg(test)]
pub mod testing;
pub mod tree;
pub mod trust;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::{fill_random, Dek, FileKey, VolumeKey};
use crate::error::{Class, Error, Result};
use crate::format::{decode_region, FileId, Geometry, Header, KeyRecord, SlotError, FILE_ID_LEN};
use crate::keys::aws_kms::{AwsKmsProvider, KmsSettings};
use crate::keys::cache::{CacheConfig, DekCache};
use crate::keys::local::{KdfParams, LocalProvider};
use crate::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use crate::keys::pool::{KeyPool, ReadyKey};
use crate::keys::recovery::RecoveryProvider;
use crate::keys::secret::SecretSource;
use crate::keys::{KeyContext, KeyProvider, VolumeId};
use crate::volume::audit::{AuditLog, PlainPath, Requester};
use crate::volume::trust::{TrustRecord, TrustStore};

pub use crate::volume::config::{ProviderConfig, VolumeConfig, WrappedKey, CONFIG_NAME, FORMAT, KEYRING_NAME};
/// Names in the backing root that belong to the volume, not to its users: hidden from the
/// mount, refused as targets, skipped by fsck.
pub const RESERVED: [&str; 6] =
    [CONFIG_NAME, KEYRING_NAME, "envelopefs.toml.tmp", "envelopefs.keyring.tmp", TARGETS_DIR, lock::LOCK_NAME];
pub use crate::names::TARGETS_DIR;
/// Suffix of the temporary a re-encryption writes beside its original.
pub use crate::sys::TEMP_SUFFIX as REENCRYPT_SUFFIX;

/// Follow changes another process makes to the config of `vol` (`Volume::follow_config`)
/// every `every`, for as long as the volume is open; nothing to do for a volume whose key
/// store pins nothing.
pub fn watch_config(vol: &Arc<Volume>, every: std::time::Duration) {
    if vol.keys.primary().pinning().and_then(|p| p.pinned_objects()).is_none() {
        return;
    }
    let weak = Arc::downgrade(vol);
    let _ = std::thread::Builder::new().name("config-watch".into()).spawn(move || loop {
        std::thread::sleep(every);
        match weak.upgrade() {
            Some(v) => v.follow_config(),
            None => return,
        }
    });
}

/// Whether `name` belongs to the volume, not to its users: its own files in the root, and
/// re-encryption temporaries anywhere (a user's file of that name would be taken for a
/// leftover and removed). Such names are hidden from the mount and refused as targets.
pub fn is_reserved(name: &std::ffi::OsStr, in_root: bool) -> bool {
    (in_root && RESERVED.iter().any(|r| std::ffi::OsStr::new(r) == name))
        || name.as_encoded_bytes().ends_with(REENCRYPT_SUFFIX.as_bytes())
}

pub use crate::format::VOLUME_KEY_FILE_ID;
pub use init::{init, write_config};
pub use stores::create_provider;
use stores::{open_provider, self_test, wrap_for_all};

fn volume_key_context(volume_id: &VolumeId) -> KeyContext<'_> {
    KeyContext { volume_id, file_id: &VOLUME_KEY_FILE_ID }
}

/// Which key store a new volume uses.
#[derive(Clone, Debug)]
pub enum ProviderInit {
    Local {
        kdf: KdfParams,
        /// Where the keyring goes; default inside the backing directory.
        keyring: Option<PathBuf>,
    },
    Pkcs11 {
        module: PathBuf,
        uri: String,
    },
    AwsKms(KmsSettings),
    /// An offline recovery recipient (a key slot only).
    Recovery {
        recipient: String,
    },
}

/// What `init` needs to know.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub block_size: u32,
    pub header_size: u32,
    pub provider: ProviderInit,
    /// The on-disk format (1 only for making fixtures of the old format).
    pub format: u32,
    /// Where this host records that it trusts the new volume.
    pub trust: TrustStore,
    /// Several hosts will mount it (format 5; docs/SHARING.md).
    pub shared: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            block_size: crate::format::DEFAULT_BLOCK_SIZE,
            header_size: crate::format::DEFAULT_HEADER_SIZE,
            provider: ProviderInit::Local { kdf: KdfParams::default(), keyring: None },
            format: FORMAT,
            trust: TrustStore::host(),
            shared: false,
        }
    }
}

/// Runtime options of an opened volume.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub cache: CacheConfig,
    /// Append one JSON line per key operation here.
    pub audit_log: Option<PathBuf>,
    /// aws-kms: wrapped data keys kept ready for new files (several slots: whole record
    /// sets kept ready).
    pub kms_pool: Option<usize>,
    /// aws-kms: bound on one call, retries included.
    pub kms_timeout: Option<std::time::Duration>,
    /// This host's trust records.
    pub trust: TrustStore,
}

/// An unlocked volume: its config, geometry, names and key service.
pub struct Volume {
    pub root: PathBuf,
    pub config: VolumeConfig,
    pub volume_id: VolumeId,
    pub geometry: Geometry,
    /// The key service: slots, DEK cache, keys made ahead, audit log.
    pub keys: KeyService,
    /// Format 2: the authenticated volume key (None for format 1).
    volume_key: Option<VolumeKey>,
    /// Format 4: the keys of names, symlink targets and xattrs.
    names: Option<Arc<crate::names::NameCipher>>,
    trust: TrustStore,
    /// What this host trusts and has seen of the volume (written back when it grows).
    trusted: TrustRecord,
    /// The canonical backing path the volume was opened at.
    place: PathBuf,
    /// When the config was last looked at for key objects pinned by another process.
    /// The config file as `follow_config` last read it (inode, size, mtime).
    config_seen: std::sync::Mutex<Option<(u64, u64, i64, i64)>>,
}

/// The outcome of reading an envelope's header: its key and the slot it came from.
pub struct OpenedHeader {
    pub key: Arc<FileKey>,
    pub header: Header,
    pub slot: usize,
}

impl Volume {
    /// Where this host keeps the volume's crash journal (beside its trust records).
    pub fn journal_dir(&self) -> PathBuf {
        self.trust.dir().to_owned()
    }

    /// The canonical backing path the volume was opened at.
    pub fn place(&self) -> &Path {
        &self.place
    }

    /// Whether this is the first place the host accepted the volume at (where releases
    /// before places ran it).
    pub fn at_first_place(&self) -> bool {
        self.trusted.places.first().map(Path::new) == Some(self.place.as_path())
    }

    /// Record the volume's format in its keyring, for stores that keep one.
    fn mark_keyring_format(&self) -> Result<()> {
        self.keys.primary().keyring().map_or(Ok(()), |k| k.mark_volume_format(self.config.format))
    }

    /// What this host trusts and has seen of the volume.
    pub fn trust_record(&self) -> &TrustRecord {
        &self.trusted
    }

    /// Save what this host trusts and has seen of the volume (`envelopefs trust`).
    pub fn save_trust(&self) -> Result<()> {
        self.trust.put(&self.trusted)
    }

    pub fn volume_key(&self) -> Option<&VolumeKey> {
        self.volume_key.as_ref()
    }

    /// Format 4: how names look in the backing directory (None: as they are).
    pub fn names(&self) -> Option<&crate::names::NameCipher> {
        self.names.as_deref()
    }

    /// Rewrite the config after a change of keys (`key rotate`, `key retire`, `rekey
    /// --to-key`): the volume key re-wrapped under the current KEK, the pinned key objects,
    /// a new generation and MAC; and tell the trust record (this host made the change).
    pub fn update_config(&mut self, change: impl FnOnce(&mut ProviderConfig)) -> Result<()> {
        self.update_config_with(|c| change(&mut c.provider))
    }

    /// `update_config` for changes beyond the primary's settings (key slots): every slot
    /// opened here whose wrap of the volume key is not under its current KEK is re-wrapped.
    pub fn update_config_with(&mut self, change: impl FnOnce(&mut VolumeConfig)) -> Result<()> {
        let mut cfg = self.config.clone();
        change(&mut cfg);
        // Each PKCS#11 slot pins its own store's objects (found by its settings: a change
        // may have moved slots, as `key slot primary` does).
        for slot in self.keys.slots() {
            let Some(i) = cfg.policy().position(|p| p.host_view() == slot.settings.host_view()) else { continue };
            let settings = if i == 0 { &mut cfg.provider } else { &mut cfg.slots[i - 1].provider };
            if let (ProviderConfig::Pkcs11 { objects, .. }, Some(pinned)) =
                (settings, slot.provider.pinning().and_then(|p| p.pinned_objects()))
            {
                *objects = pinned;
            }
        }
        if let Some(key) = &self.volume_key {
            let ctx = volume_key_context(&self.volume_id);
            for slot in self.keys.slots() {
                let Some(i) = cfg.policy().position(|p| p.host_view() == slot.settings.host_view()) else { continue };
                let wrapped = cfg.slot_volume_key(i).expect("format 2 has a volume key");
                let rec = wrapped.record(slot.provider.kind())?;
                if !slot.current(&rec) {
                    let moved = self.keys.count(slot.provider.wrap(&key.as_dek(), &ctx))?;
                    let w = WrappedKey::from_record(&moved);
                    match i {
                        0 => cfg.volume_key = Some(w),
                        n => cfg.slots[n - 1].volume_key = w,
                    }
                }
            }
            cfg.generation += 1;
            cfg.seal(key);
        }
        let mut seen = self.trusted.clone();
        seen.format = seen.format.max(cfg.format);
        seen.provider = cfg.provider.host_view();
        seen.slots = cfg.slots.iter().map(|s| s.provider.host_view()).collect();
        seen.config_generation = cfg.generation;
        if let Some(key) = &self.volume_key {
            seen.volume_check = Some(crate::volume::trust::volume_check(key));
        }
        for slot in self.keys.slots() {
            if let Some((v, _)) = slot.provider.keyring().map(|k| k.state()) {
                seen.keyring_version = seen.keyring_version.max(v);
            }
        }
        if cfg != self.config {
            write_config(&self.root, &cfg)?;
        }
        self.keys.set_policy_len(cfg.policy().count());
        if seen != self.trusted {
            self.trust.put(&seen)?;
        }
        self.config = cfg;
        self.trusted = seen;
        Ok(())
    }

    /// Move a format-1 volume to format 2: a volume key, an authenticated config, pinned
    /// key objects. The config is written before the keyring is marked, so a crash in
    /// between leaves a volume that opens (and `upgrade` run again finishes it).
    pub fn upgrade(&mut self) -> Result<bool> {
        let was = self.config.format;
        if was < 2 {
            if let Some(p) = self.keys.primary().pinning() {
                p.pin_found()?;
            }
            let (dek, rec) = self.keys.count(self.keys.primary().generate(&volume_key_context(&self.volume_id)))?;
            self.volume_key = Some(VolumeKey::from_dek(&dek));
            self.config.format = 2;
            self.config.volume_key = Some(WrappedKey::from_record(&rec));
            self.update_config(|_| {})?;
        }
        self.mark_keyring_format()?;
        Ok(was < 2)
    }

    /// Mark an upgrade to format 6 as begun (`on`) or finished (the caller holds the volume
    /// alone; `tools::upgrade` does the files between). From the start the config says
    /// format 6 under its MAC and the keyring names it, so neither a release before 6 nor a
    /// format-5 config put back opens the volume; mounts wait for the finish.
    pub fn set_upgrading(&mut self, on: bool) -> Result<()> {
        use crate::volume::config::BOUND_XATTRS_FORMAT;
        self.update_config_with(|c| {
            c.format = c.format.max(BOUND_XATTRS_FORMAT);
            c.upgrading = on;
        })?;
        self.mark_keyring_format()
    }

    /// Make the volume shared by several hosts, or no longer shared (the caller holds the
    /// volume alone). Sharing needs an authenticated config with hidden names (format 4);
    /// it makes the volume format 5 at least, which releases before it do not open. Returns whether
    /// anything changed.
    pub fn set_shared(&mut self, on: bool) -> Result<bool> {
        use crate::volume::config::SHARED_FORMAT;
        if self.config.shared == on {
            return Ok(false);
        }
        if on && !self.config.features().names {
            return Err(Error::new(
                libc::EINVAL,
                format!(
                    "format {} cannot be shared: a shared volume has hidden names (make a new volume with init --shared)",
                    self.config.format
                ),
            )
            .with_class(Class::Usage));
        }
        self.update_config_with(|c| {
            c.shared = on;
            c.format = c.format.max(SHARED_FORMAT);
        })?;
        // The keyring names the format too: a format-4 config put back is refused.
        self.mark_keyring_format()?;
        Ok(true)
    }

    /// Use another key store from now on (`rekey --to-key`): records of the old key keep
    /// unwrapping through `dest` while files move.
    pub fn switch_provider(&mut self, dest: Arc<dyn KeyProvider>, settings: ProviderConfig) -> Result<()> {
        self.keys.switch_primary(dest, settings.clone());
        self.update_config(|p| *p = settings)
    }
}

/// The slots opened, and those not opened with why.
type OpenedSlots = (Vec<KeySlot>, Vec<(usize, String)>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ProviderKind;
    use crate::keys::KekVersionInfo;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store whose wraps take a while and count how many run at once.
    struct Slow {
        remote: bool,
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
    }

    impl KeyProvider for Slow {
        fn kind(&self) -> ProviderKind {
            ProviderKind::Local
        }
        fn describe(&self) -> String {
            "slow".into()
        }
        fn kek_id(&self) -> String {
            "slow".into()
        }
        fn generate(&self, ctx: &KeyContext<'_>) -> Result<(Dek, KeyRecord)> {
            let d = Dek::generate()?;
            let r = self.wrap(&d, ctx)?;
            Ok((d, r))
        }
        fn wraps_remotely(&self) -> bool {
            self.remote
        }
        fn wrap(&self, dek: &Dek, _: &KeyContext<'_>) -> Result<KeyRecord> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(100));
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(KeyRecord {
                provider: ProviderKind::Local,
                kek_id: "slow".into(),
                kek_version: 1,
                wrapped: dek.expose().to_vec(),
            })
        }
        fn unwrap(&self, r: &KeyRecord, _: &KeyContext<'_>) -> Result<Dek> {
            Dek::from_slice(&r.wrapped)
        }
        fn current_version(&self) -> Result<u32> {
            Ok(1)
        }
        fn versions(&self) -> Result<Vec<KekVersionInfo>> {
            Ok(vec![])
        }
        fn rewrap(&self, r: &KeyRecord, _: &KeyContext<'_>) -> Result<KeyRecord> {
            Ok(r.clone())
        }
    }

    #[test]
    fn remote_wraps_for_several_slots_run_at_once_and_local_ones_inline() {
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let slow = |remote| -> Arc<dyn KeyProvider> { Arc::new(Slow { remote, now: now.clone(), most: most.clone() }) };
        let providers = [slow(true), slow(false), slow(true), slow(true)];
        let (_, dek, records) = wrap_for_all(&providers, &[3; 16]).unwrap();
        assert_eq!(records.len(), 4);
        assert!(records.iter().all(|r| r.wrapped == dek.expose()), "one DEK, a record per slot, in order");
        // The three remote wraps overlap, and the local one runs beside them on this thread.
        assert_eq!(most.load(Ordering::SeqCst), 4);
        most.store(0, Ordering::SeqCst);
        wrap_for_all(&[slow(false), slow(false)], &[3; 16]).unwrap();
        assert_eq!(most.load(Ordering::SeqCst), 1, "local wraps run one after the other, no thread");
    }
}
