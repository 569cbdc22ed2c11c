//! A volume: the backing directory's `envelopefs.toml`, its key provider and its DEK cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{AuditLog, Requester};
use crate::crypto::{fill_random, Backend, Dek, FileKey, VolumeKey};
use crate::envelope::{decode_region, FileId, Geometry, Header, KeyRecord, SlotError, FILE_ID_LEN};
use crate::error::{Class, Error, Result};
use crate::keys::aws_kms::{AwsKmsProvider, KmsSettings};
use crate::keys::cache::{CacheConfig, DekCache};
use crate::keys::local::{KdfParams, LocalProvider};
use crate::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use crate::keys::pool::{KeyPool, ReadyKey};
use crate::keys::recovery::RecoveryProvider;
use crate::keys::secret::SecretSource;
use crate::keys::{KeyContext, KeyProvider, VolumeId};
use crate::trust::{TrustRecord, TrustStore};

pub use crate::config::{ProviderConfig, VolumeConfig, WrappedKey, CONFIG_NAME, FORMAT, KEYRING_NAME};
/// Names in the backing root that belong to the volume, not to its users: hidden from the
/// mount, refused as targets, skipped by fsck.
pub const RESERVED: [&str; 5] =
    [CONFIG_NAME, KEYRING_NAME, "envelopefs.toml.tmp", "envelopefs.keyring.tmp", TARGETS_DIR];
pub use crate::names::TARGETS_DIR;
/// Suffix of the temporary a re-encryption writes beside its original.
pub use crate::sys::TEMP_SUFFIX as REENCRYPT_SUFFIX;

/// Whether `name` belongs to the volume, not to its users: its own files in the root, and
/// re-encryption temporaries anywhere (a user's file of that name would be taken for a
/// leftover and removed). Such names are hidden from the mount and refused as targets.
pub fn is_reserved(name: &std::ffi::OsStr, in_root: bool) -> bool {
    (in_root && RESERVED.iter().any(|r| std::ffi::OsStr::new(r) == name))
        || name.as_encoded_bytes().ends_with(REENCRYPT_SUFFIX.as_bytes())
}

pub use crate::envelope::VOLUME_KEY_FILE_ID;

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
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            block_size: 4096,
            header_size: 4096,
            provider: ProviderInit::Local { kdf: KdfParams::default(), keyring: None },
            format: FORMAT,
            trust: TrustStore::host(),
        }
    }
}

/// Create a volume in an empty directory. On any failure nothing is left behind.
pub fn init(root: &Path, secret: &SecretSource, opts: &InitOptions) -> Result<VolumeConfig> {
    let meta = fs::metadata(root).map_err(|e| Error::io(e, format!("backing directory {}", root.display())))?;
    if !meta.is_dir() {
        return Err(Error::new(libc::ENOTDIR, format!("{} is not a directory", root.display())));
    }
    if root.join(CONFIG_NAME).exists() {
        return Err(Error::new(libc::EEXIST, format!("{} is already an envelopefs volume", root.display())));
    }
    let mut entries = fs::read_dir(root).map_err(|e| Error::io(e, format!("listing {}", root.display())))?;
    if entries.next().is_some() {
        return Err(Error::new(
            libc::ENOTEMPTY,
            format!(
                "{} is not empty: init needs an empty directory (existing files would not be encrypted)",
                root.display()
            ),
        ));
    }
    Geometry::new(opts.header_size, opts.block_size).map_err(|e| e.with_class(Class::Usage))?;
    if !crate::config::FORMATS.contains(&opts.format) {
        return Err(Error::new(libc::EINVAL, format!("format {} is not one this version writes", opts.format)));
    }
    if let ProviderInit::AwsKms(s) = &opts.provider {
        if let Some(url) = &s.endpoint {
            crate::config::check_endpoint(url)?;
        }
    }
    if matches!(opts.provider, ProviderInit::Recovery { .. }) {
        return Err(Error::new(
            libc::EINVAL,
            "a recovery recipient is a key slot, never a volume's primary key: `envelopefs key slot add --recovery`",
        ));
    }
    let mut volume_id = [0u8; 16];
    fill_random(&mut volume_id)?;
    let (provider, made_keyring, key_store) = create_provider(root, &opts.provider, volume_id, secret, opts.format)?;
    let made = (|| -> Result<VolumeConfig> {
        self_test(key_store.as_ref(), &volume_id)?;
        let mut cfg = VolumeConfig {
            format: opts.format,
            volume_id: hex::encode(volume_id),
            block_size: opts.block_size,
            header_size: opts.header_size,
            generation: 0,
            mac: None,
            provider,
            volume_key: None,
            slots: Vec::new(),
            names: (opts.format >= crate::config::NAMES_FORMAT).then(|| crate::config::NAMES_SCHEME.to_owned()),
        };
        let mut check = None;
        if opts.format >= 2 {
            // The volume key is a data key like any file's, bound to a file id no file has.
            let (dek, rec) = key_store.generate(&volume_key_context(&volume_id))?;
            cfg.generation = 1;
            cfg.volume_key = Some(WrappedKey::from_record(&rec));
            let key = VolumeKey::from_dek(&dek);
            cfg.seal(&key);
            check = Some(crate::trust::volume_check(&key));
        }
        let mut trusted = TrustRecord::for_config(&cfg);
        trusted.volume_check = check;
        trusted.keyring_version = key_store.keyring_state().map_or(0, |(v, _)| v);
        opts.trust.put(&trusted)?;
        // The config is written last: a directory without it is not a volume.
        write_config(root, &cfg)?;
        Ok(cfg)
    })();
    if made.is_err() {
        if let Some(k) = made_keyring {
            let _ = fs::remove_file(k);
        }
    }
    made
}

/// Make (or reach) the key store `init` names, for a new volume or a new key slot: its
/// settings as the config stores them, the keyring file made (to remove on failure), and
/// the store.
pub fn create_provider(
    root: &Path,
    init: &ProviderInit,
    volume_id: VolumeId,
    secret: &SecretSource,
    format: u32,
) -> Result<(ProviderConfig, Option<PathBuf>, Arc<dyn KeyProvider>)> {
    Ok(match init {
        ProviderInit::Local { kdf, keyring } => {
            let keyring_rel = match keyring {
                // Only the default name is hidden from the mount: anywhere else inside the
                // backing directory the keyring would be visible (and deletable) through it.
                Some(p)
                    if p.is_relative()
                        || p.starts_with(root)
                        || fs::canonicalize(root).is_ok_and(|r| p.starts_with(r)) =>
                {
                    return Err(Error::new(
                        libc::EINVAL,
                        format!(
                            "--keyring {}: keep a custom keyring outside the backing directory (or omit --keyring)",
                            p.display()
                        ),
                    ));
                }
                Some(p) => p.to_string_lossy().into_owned(),
                None => KEYRING_NAME.to_owned(),
            };
            let path = root.join(&keyring_rel);
            let secret = secret.resolve(true)?;
            let p = LocalProvider::create(&path, volume_id, &secret, *kdf, format)?;
            (ProviderConfig::Local { keyring: keyring_rel }, Some(path), Arc::new(p))
        }
        ProviderInit::Pkcs11 { module, uri } => {
            let parsed: Pkcs11Uri = uri.parse().map_err(|e| Error::new(libc::EINVAL, format!("--key {uri}: {e}")))?;
            let pin = secret.resolve_pin(parsed.pin_source.as_deref())?;
            let p = Pkcs11Provider::open(module, &parsed, pin, true)?;
            if format >= 2 {
                p.pin_current()?;
            }
            let cfg = ProviderConfig::Pkcs11 {
                module: module.to_string_lossy().into_owned(),
                key: parsed.key_id(),
                objects: p.pinned_objects().unwrap_or_default(),
                previous_keys: Vec::new(),
            };
            (cfg, None, Arc::new(p))
        }
        ProviderInit::AwsKms(settings) => {
            if let Some(url) = &settings.endpoint {
                crate::config::check_endpoint(url)?;
            }
            let p = AwsKmsProvider::open(settings, volume_id)?;
            let cfg = ProviderConfig::AwsKms {
                key_id: p.arn().to_owned(),
                previous_key_ids: Vec::new(),
                intermediate_key: settings.intermediate_key,
                region: settings.region.clone(),
                endpoint: settings.endpoint.clone(),
            };
            (cfg, None, Arc::new(p))
        }
        ProviderInit::Recovery { recipient } => {
            let p = RecoveryProvider::new(recipient, None)?;
            (ProviderConfig::Recovery { recipient: recipient.clone() }, None, Arc::new(p))
        }
    })
}

/// Replace `envelopefs.toml` atomically (temp file, fsync, rename, fsync of the directory;
/// never through a planted symlink).
pub fn write_config(root: &Path, cfg: &VolumeConfig) -> Result<()> {
    let text = format!(
        "# envelopefs volume. Holds no secrets; do not edit (the format is in docs/FORMAT.md).\n{}",
        toml::to_string(cfg).expect("config serializes")
    );
    let path = root.join(CONFIG_NAME);
    crate::atomic_file::replace(&path, text.as_bytes(), 0o644)
        .map_err(|e| Error::io(e, format!("writing {}", path.display())))
}

/// The key store named by host-trusted `settings`.
fn open_provider(
    root: &Path,
    settings: &ProviderConfig,
    volume_id: VolumeId,
    secret: &SecretSource,
    opts: &OpenOptions,
    pooled: bool,
) -> Result<Arc<dyn KeyProvider>> {
    Ok(match settings {
        ProviderConfig::Local { keyring } => {
            let secret = secret.resolve(false)?;
            Arc::new(LocalProvider::open(&root.join(keyring), volume_id, &secret)?)
        }
        ProviderConfig::Pkcs11 { module, key, objects, previous_keys } => {
            let uri: Pkcs11Uri = key
                .parse()
                .map_err(|e| Error::new(libc::EINVAL, format!("{CONFIG_NAME}: provider key {key:?}: {e}")))?;
            // The URI came from the host's record, which never holds a PIN source.
            let pin = secret.resolve_pin(None)?;
            let p = Pkcs11Provider::open(Path::new(module), &uri, pin, false)?;
            p.set_previous_keys(previous_keys.clone());
            if !objects.is_empty() {
                p.pin_objects(objects.clone())?;
            }
            Arc::new(p)
        }
        ProviderConfig::AwsKms { key_id, previous_key_ids, intermediate_key, region, endpoint } => {
            let mut s = KmsSettings::new(key_id);
            s.intermediate_key = *intermediate_key;
            s.region.clone_from(region);
            s.endpoint.clone_from(endpoint);
            s.allowed_key_ids = previous_key_ids.clone();
            // Only a mount creates files: other commands fill no pool. A volume with several
            // slots pools its keys itself (`KeyPool`), whole records sets at a time.
            let pool = opts.kms_pool.unwrap_or(0);
            s.pool_size = if pooled || *intermediate_key { pool } else { 0 };
            if let Some(t) = opts.kms_timeout {
                s.call_timeout = t;
            }
            Arc::new(AwsKmsProvider::open(&s, volume_id)?)
        }
        ProviderConfig::Recovery { recipient } => {
            let identity = secret.recovery_key.as_deref().map(crate::keys::recovery::read_identity).transpose()?;
            Arc::new(RecoveryProvider::new(recipient, identity)?)
        }
    })
}

/// Wrap and unwrap a throwaway key: proves the KEK is there and usable.
fn self_test(p: &dyn KeyProvider, volume_id: &VolumeId) -> Result<()> {
    let file_id = [0xEE; FILE_ID_LEN];
    let ctx = KeyContext { volume_id, file_id: &file_id };
    let check = || -> Result<()> {
        let (dek, rec) = p.generate(&ctx)?;
        if p.unwrap(&rec, &ctx)?.expose() != dek.expose() {
            return Err(Error::new(libc::EIO, "unwrapped key differs"));
        }
        Ok(())
    };
    check().map_err(|e| e.context(format!("self-test of {}", p.describe())))
}

/// Runtime options of an opened volume.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub backend: Backend,
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

/// How long a slot whose store did not answer is tried last.
const SLOT_DOWN_FOR: std::time::Duration = std::time::Duration::from_secs(30);
/// Record sets made at once while filling the key pool of a volume with several slots.
const POOL_CONCURRENCY: usize = 16;

/// One key slot opened in this process.
pub struct KeySlot {
    /// Its number in the volume's key policy (0: the primary).
    pub index: usize,
    /// Its settings, as this host trusts them.
    pub settings: ProviderConfig,
    pub provider: Arc<dyn KeyProvider>,
    /// Until when it is tried last (its store failed to answer).
    down_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl KeySlot {
    pub(crate) fn new(index: usize, settings: ProviderConfig, provider: Arc<dyn KeyProvider>) -> Self {
        Self { index, settings, provider, down_until: std::sync::Mutex::new(None) }
    }

    fn is_down(&self) -> bool {
        self.down_until.lock().unwrap().is_some_and(|t| t > std::time::Instant::now())
    }

    fn mark(&self, res: &Result<Dek>) {
        let down = match res {
            Ok(_) => None,
            Err(e) if e.errno() == libc::EACCES => return,
            Err(_) => Some(std::time::Instant::now() + SLOT_DOWN_FOR),
        };
        let mut d = self.down_until.lock().unwrap();
        if d.is_some() != down.is_some() {
            match down {
                Some(_) => tracing::warn!(
                    "key slot {} ({}) failed: trying the others first",
                    self.index,
                    self.settings.summary()
                ),
                None => tracing::info!("key slot {} ({}) answers again", self.index, self.settings.summary()),
            }
        }
        *d = down;
    }

    /// Whether `rec` is this slot's, wrapped under its current KEK.
    fn current(&self, rec: &KeyRecord) -> bool {
        rec.provider == self.provider.kind()
            && rec.kek_id == self.provider.kek_id()
            && self.provider.current_version().is_ok_and(|v| v == rec.kek_version)
    }
}

/// A DEK for a new file wrapped by every slot at once: a store that talks to a network
/// service is called concurrently with the others, so a create costs one round trip.
fn wrap_for_all(providers: &[Arc<dyn KeyProvider>], volume_id: &VolumeId) -> Result<ReadyKey> {
    let mut file_id = [0u8; FILE_ID_LEN];
    fill_random(&mut file_id)?;
    let dek = Dek::generate()?;
    let ctx = KeyContext { volume_id, file_id: &file_id };
    // With two or more remote wraps each gets a thread; local wraps (and a lone remote
    // one) run here.
    let concurrent = providers.iter().filter(|p| p.wraps_remotely()).count() > 1;
    let records: Vec<Result<KeyRecord>> = std::thread::scope(|s| {
        let started: Vec<_> = providers
            .iter()
            .map(|p| (concurrent && p.wraps_remotely()).then(|| s.spawn(|| p.wrap(&dek, &ctx))))
            .collect();
        // The inline wraps first, while the threads' calls are in flight; then join.
        let inline: Vec<Option<Result<KeyRecord>>> =
            started.iter().zip(providers).map(|(h, p)| h.is_none().then(|| p.wrap(&dek, &ctx))).collect();
        started
            .into_iter()
            .zip(inline)
            .map(|(h, r)| match (h, r) {
                (Some(h), _) => h.join().unwrap_or_else(|_| Err(Error::new(libc::EIO, "wrap panicked"))),
                (None, r) => r.expect("wrapped inline"),
            })
            .collect()
    });
    let records = records
        .into_iter()
        .zip(providers)
        .map(|(r, p)| r.map_err(|e| e.context(format!("wrapping a new data key under {}", p.describe()))))
        .collect::<Result<Vec<_>>>()?;
    Ok((file_id, dek, records))
}

/// An unlocked volume: geometry, provider, DEK cache.
pub struct Volume {
    pub root: PathBuf,
    pub config: VolumeConfig,
    pub volume_id: VolumeId,
    pub geometry: Geometry,
    /// The primary slot's store (in a recovery open, the recovery slot's).
    pub provider: Arc<dyn KeyProvider>,
    /// Every slot opened here, in policy order (the primary first).
    pub slots: Vec<KeySlot>,
    /// Slots of the policy not opened here, and why: new files cannot be made without them.
    pub missing: Vec<(usize, String)>,
    pub cache: DekCache,
    pub backend: Backend,
    pub audit: Option<AuditLog>,
    /// Calls to the key store (wraps and unwraps) and how many failed, for `status`.
    pub provider_calls: std::sync::atomic::AtomicU64,
    pub provider_errors: std::sync::atomic::AtomicU64,
    /// Format 2: the authenticated volume key (None for format 1).
    volume_key: Option<VolumeKey>,
    /// Format 4: the keys of names, symlink targets and xattrs.
    names: Option<crate::names::NameCipher>,
    trust: TrustStore,
    /// What this host trusts and has seen of the volume (written back when it grows).
    trusted: TrustRecord,
    /// The canonical backing path the volume was opened at.
    place: PathBuf,
    /// The provider's revocation counter when the DEK cache was last known good.
    revocations_seen: std::sync::atomic::AtomicU64,
    /// When the config was last looked at for key objects pinned by another process.
    config_checked: std::sync::Mutex<std::time::Instant>,
    /// Several slots: record sets made ahead for new files.
    pool: Option<KeyPool>,
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

    /// The name of this volume's journal here: its id and its place, so two copies of a
    /// volume (a restored backup beside the original) never share one.
    pub fn journal_name(&self) -> String {
        crate::journal::name_for(&self.config.volume_id, &self.place)
    }

    /// The journal name of releases that keyed it by volume id alone: recovered at the
    /// volume's first accepted place, where that release ran.
    pub fn legacy_journal_name(&self) -> Option<String> {
        (self.trusted.places.first().map(Path::new) == Some(self.place.as_path()))
            .then(|| self.config.volume_id.to_ascii_lowercase())
    }

    /// Open a volume as this host trusts it (docs/THREAT-MODEL.md): the settings that
    /// choose code, endpoints and keys come from the trust record, and a format-2 config
    /// must authenticate under its volume key before anything in it is used.
    pub fn open(root: &Path, secret: &SecretSource, opts: &OpenOptions) -> Result<Self> {
        let config = VolumeConfig::load(root)?;
        let trusted = opts.trust.get(&config.volume_id)?;
        Self::open_trusting(root, config, trusted, secret, opts)
    }

    /// Open with `trusted` as the host's record (`envelopefs trust` passes the one it is
    /// about to pin); the record is saved once the volume has authenticated.
    pub fn open_trusting(
        root: &Path,
        config: VolumeConfig,
        trusted: Option<TrustRecord>,
        secret: &SecretSource,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let volume_id = config.volume_id()?;
        // Bound to its place before any key store is asked: a copy of a volume this host
        // knows, found elsewhere, is refused.
        let place = crate::trust::place_of(root)?;
        if let Some(t) = trusted.as_ref().filter(|t| !t.accepts_place(&place)) {
            return Err(crate::trust::wrong_place(t, &place));
        }
        let settings = crate::trust::settle(root, &config, trusted.as_ref(), secret.recovery_key.is_some())?;
        let (slots, missing) = open_slots(root, &settings, volume_id, secret, opts)?;
        let recovering = secret.recovery_key.is_some();
        let mut seen = trusted.clone().unwrap_or_else(|| TrustRecord::for_config(&config));
        for slot in &slots {
            let Some((ring_version, ring_format)) = slot.provider.keyring_state() else { continue };
            if ring_format > config.format {
                return Err(Error::tampered(format!(
                    "{}/{CONFIG_NAME} says format {} but its keyring belongs to a format-{ring_format} volume: \
                     a config swapped for an older format's is refused",
                    root.display(),
                    config.format
                )));
            }
            if ring_version < seen.keyring_version {
                return Err(Error::tampered(format!(
                    "the keyring of {} is older (version {ring_version}) than the newest this host has seen \
                     (version {}): an older keyring was put back, which could revive retired keys; restore the newest",
                    root.display(),
                    seen.keyring_version
                )));
            }
            seen.keyring_version = ring_version;
        }
        let volume_key = match &config.volume_key {
            Some(_) => {
                let key = unwrap_volume_key(root, &config, &slots)?;
                config.verify(&key).map_err(|e| e.context(root.display()))?;
                if config.generation < seen.config_generation {
                    return Err(Error::tampered(format!(
                        "{}/{CONFIG_NAME} is generation {}, older than generation {} this host has seen: \
                         an older config was put back",
                        root.display(),
                        config.generation,
                        seen.config_generation
                    )));
                }
                check_volume_key(root, &key, &seen, secret, recovering)?;
                seen.config_generation = config.generation;
                seen.volume_check = Some(crate::trust::volume_check(&key));
                for s in &slots {
                    s.provider.bind_volume_key(&key);
                }
                Some(key)
            }
            None if recovering => {
                return Err(Error::new(libc::EINVAL, "a format-1 volume has no key slots to recover through"))
            }
            None => None,
        };
        seen.format = seen.format.max(config.format);
        seen.add_place(&place);
        seen.geometry.get_or_insert([config.block_size, config.header_size]);
        // Fail now, with a clear message, rather than at the first open; a further slot
        // that fails is left out like one that did not open.
        let (mut slots, mut missing) = (slots, missing);
        let mut tested = Vec::with_capacity(slots.len());
        for s in slots.drain(..) {
            let testable = s.settings.kind() != crate::envelope::ProviderKind::Recovery || recovering;
            match if testable { self_test(s.provider.as_ref(), &volume_id) } else { Ok(()) } {
                Ok(()) => tested.push(s),
                Err(e) if tested.is_empty() => return Err(e.context(format!("key slot {}", s.index))),
                Err(e) => {
                    tracing::warn!(
                        "key slot {} failed its self-test: {e}; new files cannot be made until it works",
                        s.index
                    );
                    missing.push((s.index, e.to_string()));
                }
            }
        }
        let slots = tested;
        // A recovery open on a host with no record authenticated the volume by its check
        // value alone; pinning the other slots' settings here would approve their modules
        // and endpoints without `envelopefs trust`.
        if trusted.as_ref() != Some(&seen) && !(recovering && trusted.is_none()) {
            opts.trust.put(&seen)?;
        }
        let primary = slots[0].provider.clone();
        let mut vol = Self::with_provider(root, config, primary, opts)?;
        if vol.config.names.is_some() {
            vol.names = volume_key.as_ref().map(crate::names::NameCipher::new);
        }
        vol.volume_key = volume_key;
        vol.trusted = seen;
        vol.slots = slots;
        vol.missing = missing;
        vol.start_pool(opts);
        Ok(vol)
    }

    pub fn with_provider(
        root: &Path,
        config: VolumeConfig,
        provider: Arc<dyn KeyProvider>,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let slots = vec![KeySlot::new(0, config.provider.clone(), provider.clone())];
        Ok(Self {
            root: root.to_owned(),
            place: std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned()),
            volume_id: config.volume_id()?,
            geometry: config.geometry()?,
            trusted: TrustRecord::for_config(&config),
            config,
            provider,
            slots,
            missing: Vec::new(),
            cache: DekCache::new(opts.cache),
            backend: opts.backend,
            audit: opts.audit_log.as_deref().map(AuditLog::open).transpose()?,
            provider_calls: Default::default(),
            provider_errors: Default::default(),
            volume_key: None,
            names: None,
            trust: opts.trust.clone(),
            revocations_seen: Default::default(),
            config_checked: std::sync::Mutex::new(std::time::Instant::now()),
            pool: None,
        })
    }

    /// Several slots, one of them a KMS key called per file, in a mount: keep record sets
    /// ready, so creates wait on no store.
    fn start_pool(&mut self, opts: &OpenOptions) {
        let size = opts.kms_pool.unwrap_or(0);
        let per_file_kms =
            self.slots.iter().any(|s| matches!(s.settings, ProviderConfig::AwsKms { intermediate_key: false, .. }));
        if self.slots.len() < 2 || !self.missing.is_empty() || size == 0 || !per_file_kms {
            return;
        }
        let providers: Vec<_> = self.slots.iter().map(|s| s.provider.clone()).collect();
        let volume_id = self.volume_id;
        self.pool = Some(KeyPool::new(size, POOL_CONCURRENCY, Box::new(move || wrap_for_all(&providers, &volume_id))));
    }

    /// Whether this process holds every slot of the policy (and so may make new files).
    pub fn has_every_slot(&self) -> bool {
        self.missing.is_empty() && self.slots.len() == self.config.policy().count()
    }

    /// A running mount follows `key rotate` run by another process: every couple of
    /// seconds it re-reads the config and, once it authenticates under the volume key it
    /// holds, takes the key objects it pins (an unauthenticated config changes nothing).
    fn follow_pinned_objects(&self) {
        let (Some(key), Some(_)) = (&self.volume_key, self.provider.pinned_objects()) else { return };
        {
            let mut last = self.config_checked.lock().unwrap();
            if last.elapsed() < std::time::Duration::from_secs(2) {
                return;
            }
            *last = std::time::Instant::now();
        }
        let fresh = VolumeConfig::load(&self.root).and_then(|c| c.verify(key).map(|_| c));
        match fresh {
            Ok(VolumeConfig { provider: ProviderConfig::Pkcs11 { objects, .. }, .. })
                if Some(&objects) != self.provider.pinned_objects().as_ref() =>
            {
                tracing::info!("the volume's config now pins key objects {}", objects.join(", "));
                if let Err(e) = self.provider.pin(objects) {
                    tracing::warn!("{e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: {e}", self.root.display()),
        }
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
        self.names.as_ref()
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
        for slot in &self.slots {
            let Some(i) = cfg.policy().position(|p| p.host_view() == slot.settings.host_view()) else { continue };
            let settings = if i == 0 { &mut cfg.provider } else { &mut cfg.slots[i - 1].provider };
            if let (ProviderConfig::Pkcs11 { objects, .. }, Some(pinned)) = (settings, slot.provider.pinned_objects()) {
                *objects = pinned;
            }
        }
        if let Some(key) = &self.volume_key {
            let ctx = volume_key_context(&self.volume_id);
            for slot in &self.slots {
                let Some(i) = cfg.policy().position(|p| p.host_view() == slot.settings.host_view()) else { continue };
                let wrapped = cfg.slot_volume_key(i).expect("format 2 has a volume key");
                let rec = wrapped.record(slot.provider.kind())?;
                if !slot.current(&rec) {
                    let moved = self.count(slot.provider.wrap(&key.as_dek(), &ctx))?;
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
            seen.volume_check = Some(crate::trust::volume_check(key));
        }
        for slot in &self.slots {
            if let Some((v, _)) = slot.provider.keyring_state() {
                seen.keyring_version = seen.keyring_version.max(v);
            }
        }
        if cfg != self.config {
            write_config(&self.root, &cfg)?;
        }
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
            self.provider.pin_found()?;
            let (dek, rec) = self.count(self.provider.generate(&volume_key_context(&self.volume_id)))?;
            self.volume_key = Some(VolumeKey::from_dek(&dek));
            self.config.format = 2;
            self.config.volume_key = Some(WrappedKey::from_record(&rec));
            self.update_config(|_| {})?;
        }
        self.provider.mark_volume_format(self.config.format)?;
        Ok(was < 2)
    }

    /// Use another key store from now on (`rekey --to-key`): records of the old key keep
    /// unwrapping through `dest` while files move.
    pub fn switch_provider(&mut self, dest: Arc<dyn KeyProvider>, settings: ProviderConfig) -> Result<()> {
        self.provider = dest.clone();
        self.slots[0].provider = dest;
        self.slots[0].settings = settings.clone();
        self.update_config(|p| *p = settings)
    }

    pub(crate) fn count<T>(&self, r: Result<T>) -> Result<T> {
        use std::sync::atomic::Ordering::Relaxed;
        self.provider_calls.fetch_add(1, Relaxed);
        if r.is_err() {
            self.provider_errors.fetch_add(1, Relaxed);
        }
        r
    }

    /// Record a key operation in the audit log, if there is one, as `who`'s (None: this
    /// process's), naming the key slot that did it on a volume with several.
    #[allow(clippy::too_many_arguments)]
    pub fn audit(
        &self,
        op: &str,
        file_id: &FileId,
        path: &dyn Fn() -> String,
        rec: &KeyRecord,
        result: Result<(), &Error>,
        who: Option<Requester>,
        slot: Option<usize>,
    ) {
        if let Some(a) = &self.audit {
            let path = path();
            let plain = self.names().and_then(|c| c.plain_path(&self.root, Path::new(&path)).ok());
            let plain = plain.as_ref().map(|p| p.to_string_lossy());
            a.record(op, &self.volume_id, file_id, Some(&path), plain.as_deref(), rec, result, who, slot);
        }
    }

    /// A new header for a new envelope: random file id, fresh DEK wrapped by the provider.
    /// Returns the header region (two identical slots) and the key. For this process.
    pub fn new_header(&self, path: &dyn Fn() -> String) -> Result<(Vec<u8>, Arc<FileKey>)> {
        self.new_header_for(path, None)
    }

    /// Whether new data keys can be made here: every key slot must be open, since a file is
    /// never made with fewer records than the policy has slots. The frontend asks before
    /// creating or emptying a file, so the error reaches the caller and not a deferred
    /// write-back.
    pub fn can_make_keys(&self, path: &dyn Fn() -> String) -> Result<()> {
        if self.has_every_slot() {
            return Ok(());
        }
        let (i, why) = self.missing.first().cloned().unwrap_or((0, "not opened (a recovery open)".into()));
        Err(Error::new(
            libc::EIO,
            format!("{}: new files need every key slot, and slot {i} is not open here: {why}", path()),
        ))
    }

    /// `new_header` on behalf of `who` (a FUSE request's process). With several key slots
    /// the DEK carries one record per slot, in policy order: a file is never made with
    /// fewer than the policy names.
    pub fn new_header_for(&self, path: &dyn Fn() -> String, who: Option<Requester>) -> Result<(Vec<u8>, Arc<FileKey>)> {
        self.follow_pinned_objects();
        let (file_id, dek, records) = if self.slots.len() == 1 && self.has_every_slot() {
            let (file_id, dek, record) = self.count(self.provider.generate_file_key(&self.volume_id))?;
            (file_id, dek, vec![record])
        } else {
            self.can_make_keys(path)?;
            let fresh = |k: &ReadyKey| k.2.iter().zip(&self.slots).all(|(r, s)| s.current(r));
            match self.pool.as_ref().and_then(|p| p.take(fresh)) {
                Some(ready) => ready,
                None => {
                    let providers: Vec<_> = self.slots.iter().map(|s| s.provider.clone()).collect();
                    self.count(wrap_for_all(&providers, &self.volume_id))?
                }
            }
        };
        for (i, record) in records.iter().enumerate() {
            self.audit("wrap", &file_id, path, record, Ok(()), who, Some(i).filter(|_| records.len() > 1));
        }
        let key = Arc::new(FileKey::new(self.backend, file_id, &dek));
        let header = Header { generation: 1, file_id, block_size: self.geometry.block_size as u32, records };
        let slot = header.encode_slot(self.geometry.slot_size(), |b| key.header_tag(b))?;
        let mut region = slot.clone();
        region.extend_from_slice(&slot);
        self.cache.insert(header.generation, key.clone());
        Ok((region, key))
    }

    /// Find the newest slot that decodes, unwraps and authenticates. A torn or tampered
    /// newest slot falls back to the other one.
    pub fn open_header(&self, region: &[u8], path: &dyn Fn() -> String) -> Result<OpenedHeader> {
        self.open_header_for(region, path, None, &|_| Ok(true)).map(|(h, _)| h)
    }

    /// `open_header` on behalf of `who` (a FUSE request's process), preferring a slot whose
    /// key `belongs` to the content: a slot pasted from another file verifies under its own
    /// key, so the next slot that verifies is tried before it is taken. The flag says
    /// whether the slot returned belongs (false: none that verifies does).
    pub fn open_header_for(
        &self,
        region: &[u8],
        path: &dyn Fn() -> String,
        who: Option<Requester>,
        belongs: &dyn Fn(&FileKey) -> Result<bool>,
    ) -> Result<(OpenedHeader, bool)> {
        let revocations = self.provider.revocations();
        if self.revocations_seen.swap(revocations, std::sync::atomic::Ordering::SeqCst) != revocations {
            tracing::info!("a KEK version was retired: dropping every cached data key");
            self.cache.clear();
        }
        let mut first_err: Option<Error> = None;
        let mut foreign: Option<OpenedHeader> = None;
        for (idx, slot) in decode_region(region) {
            let view = match slot {
                Ok(v) => v,
                Err(SlotError::Empty) => continue,
                Err(e) => {
                    first_err.get_or_insert(Error::corrupt(format!("header slot {idx}: {e}")));
                    continue;
                }
            };
            let h = &view.header;
            if h.file_id == VOLUME_KEY_FILE_ID {
                first_err.get_or_insert(Error::corrupt(format!("header slot {idx} names the volume key's file id")));
                continue;
            }
            if h.block_size as u64 != self.geometry.block_size {
                first_err.get_or_insert(Error::corrupt(format!(
                    "header slot {idx} says block size {} but the volume uses {}",
                    h.block_size, self.geometry.block_size
                )));
                continue;
            }
            let loaded = self.cache.get_or_load(h.file_id, h.generation, || {
                self.unwrap_any(h, path, who).map(|dek| FileKey::new(self.backend, h.file_id, &dek))
            });
            match loaded {
                Ok(key) if key.verify_header_tag(&view.authenticated, &view.tag) => {
                    if belongs(&key)? {
                        return Ok((OpenedHeader { key, header: view.header, slot: idx }, true));
                    }
                    foreign.get_or_insert(OpenedHeader { key, header: view.header, slot: idx });
                }
                Ok(_) => {
                    first_err.get_or_insert(Error::corrupt(format!("header slot {idx} does not authenticate")));
                }
                Err(e) => {
                    first_err.get_or_insert(e.context(format!("header slot {idx}")));
                }
            }
        }
        if let Some(h) = foreign {
            return Ok((h, false));
        }
        Err(first_err.unwrap_or_else(|| Error::corrupt("no header slot holds a header")))
    }

    /// The header's DEK from the first key slot that unwraps one of its records: slots in
    /// policy order, those whose store just failed to answer last. An outage of one store
    /// is an error only when no other slot serves (EIO then; EACCES when every slot refused).
    pub fn unwrap_any(&self, h: &Header, path: &dyn Fn() -> String, who: Option<Requester>) -> Result<Dek> {
        let ctx = KeyContext { volume_id: &self.volume_id, file_id: &h.file_id };
        let mut order: Vec<&KeySlot> = self.slots.iter().collect();
        order.sort_by_key(|s| s.is_down());
        let several = self.config.policy().count() > 1;
        let (mut refused, mut failed): (Option<Error>, Option<Error>) = (None, None);
        for slot in order {
            for rec in h.records.iter().filter(|r| slot.settings.claims(r)) {
                let res = self.count(slot.provider.unwrap(rec, &ctx));
                slot.mark(&res);
                let served = Some(slot.index).filter(|_| several);
                self.audit("unwrap", &h.file_id, path, rec, res.as_ref().map(drop), who, served);
                match res {
                    Ok(dek) => return Ok(dek),
                    Err(e) if e.errno() == libc::EACCES => refused = Some(e),
                    Err(e) => {
                        failed.get_or_insert(e.context(format!(
                            "key slot {} ({})",
                            slot.index,
                            slot.settings.summary()
                        )));
                    }
                }
            }
        }
        Err(failed.or(refused).unwrap_or_else(|| {
            let kinds: Vec<&str> = self.slots.iter().map(|s| s.provider.kind().name()).collect();
            Error::access(format!("no key record in the header for the key slots open here ({})", kinds.join(", ")))
        }))
    }

    /// The key records `h` should carry under the volume's key policy now, or None when it
    /// carries them already: one per slot in policy order, each under its slot's current
    /// KEK; records of slots no longer in the policy are dropped. A slot not open here keeps
    /// the record it has. `key` is the header's authenticated key: a DEK unwrapped to wrap
    /// it for a new slot must be that one.
    pub fn records_for_policy(
        &self,
        h: &Header,
        key: &FileKey,
        path: &dyn Fn() -> String,
        who: Option<Requester>,
    ) -> Result<Option<Vec<KeyRecord>>> {
        let ctx = KeyContext { volume_id: &self.volume_id, file_id: &h.file_id };
        let mut dek: Option<Dek> = None;
        let mut out = Vec::new();
        for (i, settings) in self.config.policy().enumerate() {
            let slot = self.slots.iter().find(|s| s.index == i);
            // A slot may claim another slot's record too (multi-Region replicas of one key):
            // its own current record first, or every pass would rewrap it.
            let have = h
                .records
                .iter()
                .find(|r| slot.is_some_and(|s| s.current(r)))
                .or_else(|| h.records.iter().find(|r| settings.claims(r)));
            let rec = match (slot, have) {
                (Some(s), Some(r)) if s.current(r) => r.clone(),
                (Some(s), Some(r)) if s.settings.kind() != crate::envelope::ProviderKind::Recovery => {
                    let res = self.count(s.provider.rewrap(r, &ctx));
                    self.audit("rewrap", &h.file_id, path, r, res.as_ref().map(drop), who, Some(i));
                    res?
                }
                (Some(s), _) => {
                    if dek.is_none() {
                        let d = self.unwrap_any(h, path, who)?;
                        if !FileKey::new(self.backend, h.file_id, &d).same_key(key) {
                            return Err(Error::corrupt("a key record holds another key than the header's"));
                        }
                        dek = Some(d);
                    }
                    let res = self.count(s.provider.wrap(dek.as_ref().unwrap(), &ctx));
                    if let Ok(r) = &res {
                        self.audit("wrap", &h.file_id, path, r, Ok(()), who, Some(i));
                    }
                    res.map_err(|e| e.context(format!("key slot {i}")))?
                }
                (None, Some(r)) => r.clone(),
                (None, None) => {
                    return Err(Error::new(
                        libc::EIO,
                        format!(
                            "key slot {i} ({}) is not open here and the file has no record for it",
                            settings.summary()
                        ),
                    ))
                }
            };
            out.push(rec);
        }
        Ok((out != h.records).then_some(out))
    }
}

/// The slots opened, and those not opened with why.
type OpenedSlots = (Vec<KeySlot>, Vec<(usize, String)>);

/// Open every slot of the policy that opens: the primary must (its store is where new
/// keys and rotations go), others that fail are logged and left out. A recovery open
/// opens the recovery slots only.
fn open_slots(
    root: &Path,
    settings: &[ProviderConfig],
    volume_id: VolumeId,
    secret: &SecretSource,
    opts: &OpenOptions,
) -> Result<OpenedSlots> {
    let recovering = secret.recovery_key.is_some();
    let pooled = settings.len() == 1;
    let (mut slots, mut missing) = (Vec::new(), Vec::new());
    for (i, s) in settings.iter().enumerate() {
        let is_recovery = matches!(s, ProviderConfig::Recovery { .. });
        if recovering && !is_recovery {
            missing.push((i, "not opened (a recovery open)".to_owned()));
            continue;
        }
        match open_provider(root, s, volume_id, secret, opts, pooled) {
            Ok(p) => slots.push(KeySlot::new(i, s.clone(), p)),
            // A volume may have several recovery slots; the identity given is for one.
            Err(e) if recovering => missing.push((i, e.to_string())),
            Err(e) if i == 0 => {
                return Err(e.context(format!("key slot {i} ({})", s.summary())));
            }
            Err(e) => {
                tracing::warn!(
                    "key slot {i} ({}) did not open: {e}; new files cannot be made until it does",
                    s.summary()
                );
                missing.push((i, e.to_string()));
            }
        }
    }
    if slots.is_empty() {
        let why = match missing.iter().find(|(i, _)| matches!(settings[*i], ProviderConfig::Recovery { .. })) {
            Some((i, e)) => format!("the recovery key is for no recovery slot of this volume (slot {i}: {e})"),
            None => "the volume has no recovery slot: --recovery-key cannot open it".to_owned(),
        };
        return Err(Error::access(format!("{}: {why}", root.display())).with_class(crate::error::Class::WrongSecret));
    }
    Ok((slots, missing))
}

/// The volume key from the first slot that unwraps its wrap of it.
fn unwrap_volume_key(root: &Path, config: &VolumeConfig, slots: &[KeySlot]) -> Result<VolumeKey> {
    let volume_id = config.volume_id()?;
    let ctx = volume_key_context(&volume_id);
    let mut first = None;
    for s in slots {
        let Some(wrapped) = config.slot_volume_key(s.index) else { continue };
        let res = wrapped.record(s.provider.kind()).and_then(|rec| s.provider.unwrap(&rec, &ctx));
        match res {
            Ok(dek) => return Ok(VolumeKey::from_dek(&dek)),
            Err(e) => {
                first.get_or_insert(e.context(format!("key slot {} ({})", s.index, s.settings.summary())));
            }
        }
    }
    Err(first
        .unwrap_or_else(|| Error::access("no key slot opened here wraps the volume key"))
        .context(format!("unwrapping the volume key of {} ({CONFIG_NAME})", root.display())))
}

/// A volume key must be the one this host knows. Opened through a recovery recipient,
/// which anyone can encrypt to, it must be matched against a known check value: the
/// host's, or the one the user gives (--volume-check) on a host that never saw the volume.
fn check_volume_key(
    root: &Path,
    key: &VolumeKey,
    seen: &TrustRecord,
    secret: &SecretSource,
    recovering: bool,
) -> Result<()> {
    let check = crate::trust::volume_check(key);
    let known = seen.volume_check.as_deref().or(secret.volume_check.as_deref());
    match known {
        Some(k) if k.eq_ignore_ascii_case(&check) => Ok(()),
        Some(k) => Err(Error::tampered(format!(
            "the volume key of {} has check value {check}, not {k} as this host knows it: the volume \
             (or its recovery record) was replaced",
            root.display()
        ))),
        None if recovering => Err(Error::untrusted(format!(
            "this host has no record of volume {}: a recovery open needs its volume check value \
             (`envelopefs key slot list` shows it; give it as --volume-check), since anyone can \
             encrypt to a recovery recipient",
            root.display()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::ProviderKind;
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
        fn rotate(&self) -> Result<u32> {
            Ok(1)
        }
        fn versions(&self) -> Result<Vec<KekVersionInfo>> {
            Ok(vec![])
        }
        fn retire(&self, _: u32) -> Result<()> {
            Ok(())
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
