//! A volume: the backing directory's `envelopefs.toml`, its key provider and its DEK cache.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::audit::AuditLog;
use crate::crypto::{fill_random, Backend, FileKey};
use crate::envelope::{decode_region, FileId, Geometry, Header, KeyRecord, SlotError, FILE_ID_LEN};
use crate::error::{Error, Result};
use crate::keys::aws_kms::{AwsKmsProvider, KmsSettings};
use crate::keys::cache::{CacheConfig, DekCache};
use crate::keys::local::{KdfParams, LocalProvider};
use crate::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use crate::keys::secret::SecretSource;
use crate::keys::{KeyContext, KeyProvider, VolumeId};

pub const CONFIG_NAME: &str = "envelopefs.toml";
pub const KEYRING_NAME: &str = "envelopefs.keyring";
pub const FORMAT: u32 = 1;
/// Names in the backing root that belong to the volume, not to its users: hidden from the
/// mount, refused as targets, skipped by fsck.
pub const RESERVED: [&str; 4] = [CONFIG_NAME, KEYRING_NAME, "envelopefs.toml.tmp", "envelopefs.keyring.tmp"];

/// `envelopefs.toml`: everything needed to open a volume except secrets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub format: u32,
    pub volume_id: String,
    pub block_size: u32,
    pub header_size: u32,
    pub provider: ProviderConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum ProviderConfig {
    /// A keyring file; a relative path is relative to the backing directory.
    #[serde(rename = "local")]
    Local { keyring: String },
    /// A key in a PKCS#11 token: the module to load and the key's URI (no PIN).
    #[serde(rename = "pkcs11")]
    Pkcs11 { module: String, key: String },
    /// An AWS KMS key (its ARN). Region and endpoint are optional: the usual AWS settings
    /// (AWS_REGION, profiles, AWS_ENDPOINT_URL_KMS) apply when absent.
    #[serde(rename = "aws-kms")]
    AwsKms {
        key_id: String,
        /// Keys the volume used before `rekey --to-key`: records naming them still unwrap.
        /// Records naming any other key are refused, whatever the KMS would allow.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        previous_key_ids: Vec<String>,
        /// Wrap DEKs under a KMS-wrapped intermediate key (S3-Bucket-Key style).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        intermediate_key: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
}

impl VolumeConfig {
    pub fn load(root: &Path) -> Result<Self> {
        let path = root.join(CONFIG_NAME);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    libc::ENOENT,
                    format!(
                        "{} is not an envelopefs volume (no {CONFIG_NAME}); create one with `envelopefs init`",
                        root.display()
                    ),
                ))
            }
            Err(e) => return Err(Error::io(e, format!("reading {}", path.display()))),
        };
        let cfg: VolumeConfig = toml::from_str(&text)
            .map_err(|e| Error::new(libc::EINVAL, format!("{} is damaged: {}", path.display(), e.message())))?;
        if cfg.format != FORMAT {
            return Err(Error::new(
                libc::EINVAL,
                format!(
                    "{}: format {} is not supported by this version (it reads format {FORMAT})",
                    path.display(),
                    cfg.format
                ),
            ));
        }
        cfg.volume_id()?;
        cfg.geometry()?;
        Ok(cfg)
    }

    pub fn volume_id(&self) -> Result<VolumeId> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(&self.volume_id, &mut id)
            .map_err(|_| Error::new(libc::EINVAL, format!("{CONFIG_NAME}: volume_id must be 32 hex digits")))?;
        Ok(id)
    }

    pub fn geometry(&self) -> Result<Geometry> {
        Geometry::new(self.header_size, self.block_size).map_err(|e| e.context(CONFIG_NAME))
    }

    /// The local keyring's path, for local volumes.
    pub fn keyring_path(&self, root: &Path) -> Option<PathBuf> {
        match &self.provider {
            ProviderConfig::Local { keyring } => Some(root.join(keyring)),
            ProviderConfig::Pkcs11 { .. } | ProviderConfig::AwsKms { .. } => None,
        }
    }
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
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            block_size: 4096,
            header_size: 4096,
            provider: ProviderInit::Local { kdf: KdfParams::default(), keyring: None },
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
    Geometry::new(opts.header_size, opts.block_size)?;
    let mut volume_id = [0u8; 16];
    fill_random(&mut volume_id)?;
    let (provider, made_keyring) = match &opts.provider {
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
            LocalProvider::create(&path, volume_id, &secret, *kdf)?;
            (ProviderConfig::Local { keyring: keyring_rel }, Some(path))
        }
        ProviderInit::Pkcs11 { module, uri } => {
            let parsed: Pkcs11Uri = uri.parse().map_err(|e| Error::new(libc::EINVAL, format!("--key {uri}: {e}")))?;
            let pin = secret.resolve_pin(parsed.pin_source.as_deref())?;
            let p = Pkcs11Provider::open(module, &parsed, pin, true)?;
            self_test(&p, &volume_id)?;
            (ProviderConfig::Pkcs11 { module: module.to_string_lossy().into_owned(), key: parsed.key_id() }, None)
        }
        ProviderInit::AwsKms(settings) => {
            let p = AwsKmsProvider::open(settings, volume_id)?;
            self_test(&p, &volume_id)?;
            let cfg = ProviderConfig::AwsKms {
                key_id: p.arn().to_owned(),
                previous_key_ids: Vec::new(),
                intermediate_key: settings.intermediate_key,
                region: settings.region.clone(),
                endpoint: settings.endpoint.clone(),
            };
            (cfg, None)
        }
    };
    let cfg = VolumeConfig {
        format: FORMAT,
        volume_id: hex::encode(volume_id),
        block_size: opts.block_size,
        header_size: opts.header_size,
        provider,
    };
    // The config is written last: a volume without it is not a volume, so a failure here
    // leaves only the keyring, which is removed.
    if let Err(e) = write_config(root, &cfg) {
        if let Some(k) = made_keyring {
            let _ = fs::remove_file(k);
        }
        return Err(Error::io(e, format!("writing {}", root.join(CONFIG_NAME).display())));
    }
    Ok(cfg)
}

/// Replace `envelopefs.toml` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_config(root: &Path, cfg: &VolumeConfig) -> std::io::Result<()> {
    let text = format!(
        "# envelopefs volume. Holds no secrets; do not edit (the format is in docs/FORMAT.md).\n{}",
        toml::to_string(cfg).expect("config serializes")
    );
    let tmp = root.join(format!("{CONFIG_NAME}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, root.join(CONFIG_NAME))?;
    fs::File::open(root)?.sync_all()
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
}

/// The outcome of reading an envelope's header: its key and the slot it came from.
pub struct OpenedHeader {
    pub key: Arc<FileKey>,
    pub header: Header,
    pub slot: usize,
}

impl Volume {
    pub fn open(root: &Path, secret: &SecretSource, opts: &OpenOptions) -> Result<Self> {
        let config = VolumeConfig::load(root)?;
        let volume_id = config.volume_id()?;
        let provider: Arc<dyn KeyProvider> = match &config.provider {
            ProviderConfig::Local { keyring } => {
                let secret = secret.resolve(false)?;
                Arc::new(LocalProvider::open(&root.join(keyring), volume_id, &secret)?)
            }
            ProviderConfig::Pkcs11 { module, key } => {
                let uri: Pkcs11Uri = key
                    .parse()
                    .map_err(|e| Error::new(libc::EINVAL, format!("{CONFIG_NAME}: provider key {key:?}: {e}")))?;
                let pin = secret.resolve_pin(uri.pin_source.as_deref())?;
                Arc::new(Pkcs11Provider::open(Path::new(module), &uri, pin, false)?)
            }
            ProviderConfig::AwsKms { key_id, previous_key_ids, intermediate_key, region, endpoint } => {
                let mut settings = KmsSettings::new(key_id);
                settings.intermediate_key = *intermediate_key;
                settings.region.clone_from(region);
                settings.endpoint.clone_from(endpoint);
                settings.allowed_key_ids = previous_key_ids.clone();
                // Only a mount creates files: other commands fill no pool.
                settings.pool_size = opts.kms_pool.unwrap_or(0);
                if let Some(t) = opts.kms_timeout {
                    settings.call_timeout = t;
                }
                Arc::new(AwsKmsProvider::open(&settings, volume_id)?)
            }
        };
        // Fail now, with a clear message, rather than at the first open.
        self_test(provider.as_ref(), &volume_id)?;
        Self::with_provider(root, config, provider, opts)
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
            config,
            provider,
            cache: DekCache::new(opts.cache),
            backend: opts.backend,
            audit: opts.audit_log.as_deref().map(AuditLog::open).transpose()?,
            provider_calls: Default::default(),
            provider_errors: Default::default(),
        })
    }

    fn count<T>(&self, r: Result<T>) -> Result<T> {
        use std::sync::atomic::Ordering::Relaxed;
        self.provider_calls.fetch_add(1, Relaxed);
        if r.is_err() {
            self.provider_errors.fetch_add(1, Relaxed);
        }
        r
    }

    /// Record a key operation in the audit log, if there is one.
    pub fn audit(
        &self,
        op: &str,
        file_id: &FileId,
        path: &dyn Fn() -> String,
        rec: &KeyRecord,
        result: Result<(), &Error>,
    ) {
        if let Some(a) = &self.audit {
            a.record(op, &self.volume_id, file_id, Some(&path()), rec, result);
        }
    }

    /// A new header for a new envelope: random file id, fresh DEK wrapped by the provider.
    /// Returns the header region (two identical slots) and the key.
    pub fn new_header(&self, path: &dyn Fn() -> String) -> Result<(Vec<u8>, Arc<FileKey>)> {
        let (file_id, dek, record) = self.count(self.provider.generate_file_key(&self.volume_id))?;
        self.audit("wrap", &file_id, path, &record, Ok(()));
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
            if h.block_size as u64 != self.geometry.block_size {
                first_err.get_or_insert(Error::corrupt(format!(
                    "header slot {idx} says block size {} but the volume uses {}",
                    h.block_size, self.geometry.block_size
                )));
                continue;
            }
            let loaded = self.cache.get_or_load(h.file_id, h.generation, || self.unwrap_any(h, path));
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
    fn unwrap_any(&self, h: &Header, path: &dyn Fn() -> String) -> Result<FileKey> {
        let ctx = KeyContext { volume_id: &self.volume_id, file_id: &h.file_id };
        let mut last = None;
        for rec in &h.records {
            if rec.provider != self.provider.kind() {
                continue;
            }
            let res = self.count(self.provider.unwrap(rec, &ctx));
            self.audit("unwrap", &h.file_id, path, rec, res.as_ref().map(drop));
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
