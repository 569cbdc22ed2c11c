//! A volume: the backing directory's `envelopefs.toml`, its key provider and its DEK cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{AuditLog, Requester};
use crate::crypto::{fill_random, Backend, FileKey, VolumeKey};
use crate::envelope::{decode_region, FileId, Geometry, Header, KeyRecord, SlotError, FILE_ID_LEN};
use crate::error::{Class, Error, Result};
use crate::keys::aws_kms::{AwsKmsProvider, KmsSettings};
use crate::keys::cache::{CacheConfig, DekCache};
use crate::keys::local::{KdfParams, LocalProvider};
use crate::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use crate::keys::secret::SecretSource;
use crate::keys::{KeyContext, KeyProvider, VolumeId};
use crate::trust::{TrustRecord, TrustStore};

pub use crate::config::{ProviderConfig, VolumeConfig, WrappedKey, CONFIG_NAME, FORMAT, KEYRING_NAME};
/// Names in the backing root that belong to the volume, not to its users: hidden from the
/// mount, refused as targets, skipped by fsck.
pub const RESERVED: [&str; 4] = [CONFIG_NAME, KEYRING_NAME, "envelopefs.toml.tmp", "envelopefs.keyring.tmp"];
/// Suffix of the temporary a re-encryption writes beside its original.
pub const REENCRYPT_SUFFIX: &str = ".envelopefs-reencrypt";

/// Whether `name` belongs to the volume, not to its users: its own files in the root, and
/// re-encryption temporaries anywhere (a user's file of that name would be taken for a
/// leftover and removed). Such names are hidden from the mount and refused as targets.
pub fn is_reserved(name: &std::ffi::OsStr, in_root: bool) -> bool {
    (in_root && RESERVED.iter().any(|r| std::ffi::OsStr::new(r) == name))
        || name.as_encoded_bytes().ends_with(REENCRYPT_SUFFIX.as_bytes())
}

/// The file id the volume key's wrap is bound to. No file may carry it (file ids are
/// random; a header naming this one is refused), so a file header can never unwrap it.
pub const VOLUME_KEY_FILE_ID: FileId = [0; FILE_ID_LEN];

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
    let mut volume_id = [0u8; 16];
    fill_random(&mut volume_id)?;
    let (provider, made_keyring, key_store): (_, _, Arc<dyn KeyProvider>) = match &opts.provider {
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
            let p = LocalProvider::create(&path, volume_id, &secret, *kdf, opts.format)?;
            (ProviderConfig::Local { keyring: keyring_rel }, Some(path), Arc::new(p))
        }
        ProviderInit::Pkcs11 { module, uri } => {
            let parsed: Pkcs11Uri = uri.parse().map_err(|e| Error::new(libc::EINVAL, format!("--key {uri}: {e}")))?;
            let pin = secret.resolve_pin(parsed.pin_source.as_deref())?;
            let p = Pkcs11Provider::open(module, &parsed, pin, true)?;
            if opts.format >= 2 {
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
    };
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
        };
        if opts.format >= 2 {
            // The volume key is a data key like any file's, bound to a file id no file has.
            let (dek, rec) = key_store.generate(&volume_key_context(&volume_id))?;
            cfg.generation = 1;
            cfg.volume_key = Some(WrappedKey::from_record(&rec));
            cfg.seal(&VolumeKey::from_dek(&dek));
        }
        let mut trusted = TrustRecord::for_config(&cfg);
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
            // Only a mount creates files: other commands fill no pool.
            s.pool_size = opts.kms_pool.unwrap_or(0);
            if let Some(t) = opts.kms_timeout {
                s.call_timeout = t;
            }
            Arc::new(AwsKmsProvider::open(&s, volume_id)?)
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
    /// aws-kms: wrapped data keys kept ready for new files.
    pub kms_pool: Option<usize>,
    /// aws-kms: bound on one call, retries included.
    pub kms_timeout: Option<std::time::Duration>,
    /// This host's trust records.
    pub trust: TrustStore,
}

/// An unlocked volume: geometry, provider, DEK cache.
pub struct Volume {
    pub root: PathBuf,
    pub config: VolumeConfig,
    pub volume_id: VolumeId,
    pub geometry: Geometry,
    pub provider: Arc<dyn KeyProvider>,
    pub cache: DekCache,
    pub backend: Backend,
    pub audit: Option<AuditLog>,
    /// Calls to the key store (wraps and unwraps) and how many failed, for `status`.
    pub provider_calls: std::sync::atomic::AtomicU64,
    pub provider_errors: std::sync::atomic::AtomicU64,
    /// Format 2: the authenticated volume key (None for format 1).
    volume_key: Option<VolumeKey>,
    trust: TrustStore,
    /// What this host trusts and has seen of the volume (written back when it grows).
    trusted: TrustRecord,
    /// The provider's revocation counter when the DEK cache was last known good.
    revocations_seen: std::sync::atomic::AtomicU64,
    /// When the config was last looked at for key objects pinned by another process.
    config_checked: std::sync::Mutex<std::time::Instant>,
}

/// The outcome of reading an envelope's header: its key and the slot it came from.
pub struct OpenedHeader {
    pub key: Arc<FileKey>,
    pub header: Header,
    pub slot: usize,
}

impl Volume {
    /// Open a volume as this host trusts it (docs/THREAT-MODEL.md): the settings that
    /// choose code, endpoints and keys come from the trust record, and a format-2 config
    /// must authenticate under its volume key before anything in it is used.
    /// Where this host keeps the volume's crash journal (beside its trust records).
    pub fn journal_dir(&self) -> PathBuf {
        self.trust.dir().to_owned()
    }

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
        let settings = crate::trust::settle(root, &config, trusted.as_ref())?;
        let provider = open_provider(root, &settings, volume_id, secret, opts)?;
        let mut seen = trusted.clone().unwrap_or_else(|| TrustRecord::for_config(&config));
        if let Some((ring_version, ring_format)) = provider.keyring_state() {
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
            Some(wrapped) => {
                let rec = wrapped.record(provider.kind())?;
                let dek = provider.unwrap(&rec, &volume_key_context(&volume_id)).map_err(|e| {
                    e.context(format!("unwrapping the volume key of {} ({CONFIG_NAME})", root.display()))
                })?;
                let key = VolumeKey::from_dek(&dek);
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
                seen.config_generation = config.generation;
                Some(key)
            }
            None => None,
        };
        seen.format = seen.format.max(config.format);
        // Fail now, with a clear message, rather than at the first open.
        self_test(provider.as_ref(), &volume_id)?;
        if trusted.as_ref() != Some(&seen) {
            opts.trust.put(&seen)?;
        }
        let mut vol = Self::with_provider(root, config, provider, opts)?;
        vol.volume_key = volume_key;
        vol.trusted = seen;
        Ok(vol)
    }

    pub fn with_provider(
        root: &Path,
        config: VolumeConfig,
        provider: Arc<dyn KeyProvider>,
        opts: &OpenOptions,
    ) -> Result<Self> {
        Ok(Self {
            root: root.to_owned(),
            volume_id: config.volume_id()?,
            geometry: config.geometry()?,
            trusted: TrustRecord::for_config(&config),
            config,
            provider,
            cache: DekCache::new(opts.cache),
            backend: opts.backend,
            audit: opts.audit_log.as_deref().map(AuditLog::open).transpose()?,
            provider_calls: Default::default(),
            provider_errors: Default::default(),
            volume_key: None,
            trust: opts.trust.clone(),
            revocations_seen: Default::default(),
            config_checked: std::sync::Mutex::new(std::time::Instant::now()),
        })
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

    /// Rewrite the config after a change of keys (`key rotate`, `key retire`, `rekey
    /// --to-key`): the volume key re-wrapped under the current KEK, the pinned key objects,
    /// a new generation and MAC; and tell the trust record (this host made the change).
    pub fn update_config(&mut self, change: impl FnOnce(&mut ProviderConfig)) -> Result<()> {
        let mut cfg = self.config.clone();
        change(&mut cfg.provider);
        if let ProviderConfig::Pkcs11 { objects, .. } = &mut cfg.provider {
            if let Some(pinned) = self.provider.pinned_objects() {
                *objects = pinned;
            }
        }
        if let Some(key) = &self.volume_key {
            let wrapped = cfg.volume_key.as_ref().expect("format 2 has a volume key");
            let rec = wrapped.record(self.provider.kind())?;
            if rec.kek_id != self.provider.kek_id() || rec.kek_version != self.provider.current_version()? {
                let moved = self.count(self.provider.rewrap(&rec, &volume_key_context(&self.volume_id)))?;
                cfg.volume_key = Some(WrappedKey::from_record(&moved));
            }
            cfg.generation += 1;
            cfg.seal(key);
        }
        let mut seen = self.trusted.clone();
        seen.format = seen.format.max(cfg.format);
        seen.provider = cfg.provider.host_view();
        seen.config_generation = cfg.generation;
        if let Some((v, _)) = self.provider.keyring_state() {
            seen.keyring_version = seen.keyring_version.max(v);
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
        self.provider = dest;
        self.update_config(|p| *p = settings)
    }

    fn count<T>(&self, r: Result<T>) -> Result<T> {
        use std::sync::atomic::Ordering::Relaxed;
        self.provider_calls.fetch_add(1, Relaxed);
        if r.is_err() {
            self.provider_errors.fetch_add(1, Relaxed);
        }
        r
    }

    /// Record a key operation in the audit log, if there is one, as `who`'s (None: this
    /// process's).
    pub fn audit(
        &self,
        op: &str,
        file_id: &FileId,
        path: &dyn Fn() -> String,
        rec: &KeyRecord,
        result: Result<(), &Error>,
        who: Option<Requester>,
    ) {
        if let Some(a) = &self.audit {
            a.record(op, &self.volume_id, file_id, Some(&path()), rec, result, who);
        }
    }

    /// A new header for a new envelope: random file id, fresh DEK wrapped by the provider.
    /// Returns the header region (two identical slots) and the key. For this process.
    pub fn new_header(&self, path: &dyn Fn() -> String) -> Result<(Vec<u8>, Arc<FileKey>)> {
        self.new_header_for(path, None)
    }

    /// `new_header` on behalf of `who` (a FUSE request's process).
    pub fn new_header_for(&self, path: &dyn Fn() -> String, who: Option<Requester>) -> Result<(Vec<u8>, Arc<FileKey>)> {
        self.follow_pinned_objects();
        let (file_id, dek, record) = self.count(self.provider.generate_file_key(&self.volume_id))?;
        self.audit("wrap", &file_id, path, &record, Ok(()), who);
        let key = Arc::new(FileKey::new(self.backend, file_id, &dek));
        let header =
            Header { generation: 1, file_id, block_size: self.geometry.block_size as u32, records: vec![record] };
        let slot = header.encode_slot(self.geometry.slot_size(), |b| key.header_tag(b))?;
        let mut region = slot.clone();
        region.extend_from_slice(&slot);
        self.cache.insert(header.generation, key.clone());
        Ok((region, key))
    }

    /// Find the newest slot that decodes, unwraps and authenticates. A torn or tampered
    /// newest slot falls back to the other one.
    pub fn open_header(&self, region: &[u8], path: &dyn Fn() -> String) -> Result<OpenedHeader> {
        self.open_header_for(region, path, None)
    }

    /// `open_header` on behalf of `who` (a FUSE request's process).
    pub fn open_header_for(
        &self,
        region: &[u8],
        path: &dyn Fn() -> String,
        who: Option<Requester>,
    ) -> Result<OpenedHeader> {
        let revocations = self.provider.revocations();
        if self.revocations_seen.swap(revocations, std::sync::atomic::Ordering::SeqCst) != revocations {
            tracing::info!("a KEK version was retired: dropping every cached data key");
            self.cache.clear();
        }
        let mut first_err: Option<Error> = None;
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
            let loaded = self.cache.get_or_load(h.file_id, h.generation, || self.unwrap_any(h, path, who));
            match loaded {
                Ok(key) if key.verify_header_tag(&view.authenticated, &view.tag) => {
                    return Ok(OpenedHeader { key, header: view.header, slot: idx })
                }
                Ok(_) => {
                    first_err.get_or_insert(Error::corrupt(format!("header slot {idx} does not authenticate")));
                }
                Err(e) => {
                    first_err.get_or_insert(e.context(format!("header slot {idx}")));
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::corrupt("no header slot holds a header")))
    }

    /// Try each key record in turn; the first that unwraps wins.
    fn unwrap_any(&self, h: &Header, path: &dyn Fn() -> String, who: Option<Requester>) -> Result<FileKey> {
        let ctx = KeyContext { volume_id: &self.volume_id, file_id: &h.file_id };
        let mut last = None;
        for rec in &h.records {
            if rec.provider != self.provider.kind() {
                continue;
            }
            let res = self.count(self.provider.unwrap(rec, &ctx));
            self.audit("unwrap", &h.file_id, path, rec, res.as_ref().map(drop), who);
            match res {
                Ok(dek) => return Ok(FileKey::new(self.backend, h.file_id, &dek)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::access(format!("no key record for provider {} in the header", self.provider.kind().name()))
        }))
    }
}
