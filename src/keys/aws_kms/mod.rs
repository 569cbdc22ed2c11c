//! The `aws-kms` provider on the real `aws-sdk-kms` client. GenerateDataKey wraps, Decrypt
//! unwraps, ReEncrypt re-wraps (the DEK never leaves KMS in plaintext for that), always with
//! the encryption context {"envelopefs:volume": …, "envelopefs:file": …}.
//!
//! Creates need not wait on KMS: a mount keeps keys made ahead (`keys::pool`), each a
//! GenerateDataKey for a pre-drawn file id. KEK "versions" are KMS's rotations of the key
//! (ListKeyRotations); the key id never changes.

mod wire;

pub use wire::mrk_equivalent;
use wire::*;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_sdk_kms::Client;
use zeroize::Zeroizing;

use super::{KekVersionInfo, KeyContext, KeyProvider, VolumeId};
use crate::crypto::{fill_random, Dek};
use crate::error::{Error, Result};
use crate::format::{FileId, KeyRecord, ProviderKind, FILE_ID_LEN};

/// How to reach KMS (credentials come from the standard chain: environment, profile, web
/// identity, container, instance metadata).
#[derive(Clone, Debug, Default)]
pub struct KmsSettings {
    /// Key id, ARN or alias/…; resolved to the key ARN at open.
    pub key_id: String,
    pub region: Option<String>,
    /// A VPC endpoint or a local KMS-compatible server.
    pub endpoint: Option<String>,
    /// Opened by a mount, which creates files: an intermediate key is made before the
    /// first create.
    pub for_mount: bool,
    /// Attempts per call (throttling and 5xx are retried with backoff and jitter).
    pub max_attempts: u32,
    /// Bound on one call, retries included: a KMS outage is EIO after this.
    pub call_timeout: Duration,
    /// Other key ARNs whose records may be unwrapped (keys the volume used before).
    pub allowed_key_ids: Vec<String>,
    /// S3-Bucket-Key style: wrap DEKs locally under an intermediate key that KMS wraps
    /// (one KMS call per intermediate key instead of one per file). See docs/FORMAT.md.
    pub intermediate_key: bool,
}

impl KmsSettings {
    pub fn new(key_id: &str) -> Self {
        Self {
            key_id: key_id.to_owned(),
            region: None,
            endpoint: None,
            for_mount: false,
            max_attempts: 6,
            call_timeout: Duration::from_secs(20),
            allowed_key_ids: Vec::new(),
            intermediate_key: false,
        }
    }
}

type Ready = (FileId, Dek, KeyRecord);

/// Marks a wrapped DEK made under an intermediate key (KMS ciphertext blobs never start so).
const IK_MAGIC: &[u8; 4] = b"EFIK";
/// A new intermediate key after this long or this many files.
const IK_LIFETIME: Duration = Duration::from_secs(15 * 60);
const IK_MAX_FILES: u64 = 100_000;

/// The intermediate key new files wrap under.
struct Intermediate {
    id: [u8; 16],
    key: Arc<Zeroizing<[u8; 32]>>,
    blob: Vec<u8>,
    kek_id: String,
    version: u32,
    born: std::time::Instant,
    files: u64,
}

pub struct AwsKmsProvider {
    rt: tokio::runtime::Runtime,
    client: Client,
    /// The key's ARN as DescribeKey answered it.
    arn: String,
    volume_id: VolumeId,
    /// Rotations of the key seen at start (and after our own rotate): the "version".
    rotations: AtomicU32,
    /// Key ARNs a record may name: ours and the volume's previous keys. A header naming
    /// any other key is refused before KMS is asked (an attacker who can write the backing
    /// store must not be able to bring a key of their own that our role may use).
    allowed: Vec<String>,
    intermediate: bool,
    current_ik: Mutex<Option<Intermediate>>,
    /// Unwrapped intermediate keys by id; wiped on eviction like DEKs.
    ik_cache: moka::sync::Cache<[u8; 16], Arc<Zeroizing<[u8; 32]>>>,
    /// Requests sent to KMS, retries included.
    requests: RequestCounter,
}

impl AwsKmsProvider {
    /// Connect and resolve the key (DescribeKey).
    pub fn open(settings: &KmsSettings, volume_id: VolumeId) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kms")
            .enable_all()
            .build()
            .map_err(|e| Error::io(e, "starting the KMS runtime"))?;
        let counter = RequestCounter::default();
        let client = rt.block_on(async {
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .retry_config(
                    RetryConfig::standard()
                        .with_max_attempts(settings.max_attempts.max(1))
                        .with_initial_backoff(Duration::from_millis(50)),
                )
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(3))
                        .operation_attempt_timeout(Duration::from_secs(5))
                        .operation_timeout(settings.call_timeout)
                        .build(),
                );
            if let Some(r) = &settings.region {
                loader = loader.region(aws_config::Region::new(r.clone()));
            }
            if let Some(e) = &settings.endpoint {
                loader = loader.endpoint_url(e.clone());
            }
            let shared = loader.load().await;
            let conf = aws_sdk_kms::config::Builder::from(&shared).interceptor(counter.clone()).build();
            Client::from_conf(conf)
        });
        let key_id = settings.key_id.clone();
        let described = rt
            .block_on(client.describe_key().key_id(&key_id).send())
            .map_err(|e| kms_error(e, &format!("DescribeKey {key_id}")))?;
        let meta = described
            .key_metadata()
            .ok_or_else(|| Error::new(libc::EIO, format!("KMS DescribeKey {key_id}: no key metadata")))?;
        let arn = meta.arn().unwrap_or(&key_id).to_owned();
        if !meta.enabled() {
            return Err(Error::access(format!("KMS key {arn} is not enabled ({:?})", meta.key_state())));
        }
        let p = Self {
            rt,
            client,
            arn: arn.clone(),
            volume_id,
            rotations: AtomicU32::new(0),
            allowed: std::iter::once(arn.clone()).chain(settings.allowed_key_ids.iter().cloned()).collect(),
            intermediate: settings.intermediate_key,
            current_ik: Mutex::new(None),
            ik_cache: moka::sync::Cache::builder().max_capacity(1024).time_to_live(Duration::from_secs(300)).build(),
            requests: counter,
        };
        p.rotations.store(p.count_rotations()?, Ordering::Relaxed);
        if p.intermediate && settings.for_mount {
            p.intermediate_key()?; // ready before the first create
        }
        Ok(p)
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// The current intermediate key, made (one GenerateDataKey) when missing or old.
    fn intermediate_key(&self) -> Result<([u8; 16], Arc<Zeroizing<[u8; 32]>>, Vec<u8>, String, u32)> {
        let mut cur = self.current_ik.lock().unwrap();
        let stale = cur.as_ref().is_none_or(|ik| ik.born.elapsed() > IK_LIFETIME || ik.files >= IK_MAX_FILES);
        if stale {
            let mut id = [0u8; 16];
            fill_random(&mut id)?;
            let out = self
                .rt
                .block_on(
                    self.client
                        .generate_data_key()
                        .key_id(&self.arn)
                        .key_spec(DataKeySpec::Aes256)
                        .set_encryption_context(Some(ik_context(&self.volume_id, &id)))
                        .send(),
                )
                .map_err(|e| kms_error(e, "GenerateDataKey (intermediate key)"))?;
            let mut key = Zeroizing::new([0u8; 32]);
            let plain = out.plaintext().map(|b| b.as_ref()).unwrap_or_default();
            if plain.len() != 32 {
                return Err(Error::new(libc::EIO, "KMS GenerateDataKey: bad plaintext length"));
            }
            key.copy_from_slice(plain);
            let key = Arc::new(key);
            self.ik_cache.insert(id, key.clone());
            *cur = Some(Intermediate {
                id,
                key,
                blob: out.ciphertext_blob().map(|b| b.as_ref().to_vec()).unwrap_or_default(),
                kek_id: out.key_id().unwrap_or(&self.arn).to_owned(),
                version: self.rotations.load(Ordering::Relaxed),
                born: std::time::Instant::now(),
                files: 0,
            });
        }
        let ik = cur.as_mut().unwrap();
        ik.files += 1;
        Ok((ik.id, ik.key.clone(), ik.blob.clone(), ik.kek_id.clone(), ik.version))
    }

    fn wrap_under_ik(&self, volume_id: &VolumeId, file_id: &FileId) -> Result<(Dek, KeyRecord)> {
        let dek = Dek::generate()?;
        let rec = self.wrap_dek_under_ik(&dek, volume_id, file_id)?;
        Ok((dek, rec))
    }

    fn wrap_dek_under_ik(&self, dek: &Dek, volume_id: &VolumeId, file_id: &FileId) -> Result<KeyRecord> {
        let (id, key, blob, kek_id, version) = self.intermediate_key()?;
        let mut nonce = [0u8; 12];
        fill_random(&mut nonce)?;
        let mut ct = Zeroizing::new(dek.expose().to_vec());
        let tag = crate::crypto::Aead::new(&key).seal(&nonce, &ik_aad(volume_id, file_id, &id), &mut ct);
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ct);
        sealed.extend_from_slice(&tag);
        let rec = KeyRecord {
            provider: ProviderKind::AwsKms,
            kek_id,
            kek_version: version,
            wrapped: build_ik(&id, &blob, &sealed),
        };
        Ok(rec)
    }

    /// Whether a record naming `kek_id` is ours to unwrap: our key, a key the volume used
    /// before, or a multi-Region replica of one of them in another region (same account,
    /// same `mrk-` key id: KMS decrypts either's ciphertext with the other). Returns the
    /// key to ask: ours for a replica, so the call goes to this client's region.
    fn decrypting_key<'a>(&'a self, kek_id: &'a str) -> Result<&'a str> {
        if self.allowed.iter().any(|a| a == kek_id) {
            return Ok(kek_id);
        }
        if self.allowed.iter().any(|a| mrk_equivalent(a, kek_id)) {
            return Ok(&self.arn);
        }
        Err(Error::access(format!("key record names KMS key {kek_id}, which this volume does not use")))
    }

    /// KMS Decrypt of a blob under `key_id` with an encryption context.
    fn decrypt(
        &self,
        key_id: &str,
        blob: &[u8],
        ec: HashMap<String, String>,
        what: &str,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let out = self
            .rt
            .block_on(
                self.client
                    .decrypt()
                    .key_id(key_id)
                    .ciphertext_blob(Blob::new(blob.to_vec()))
                    .set_encryption_context(Some(ec))
                    .send(),
            )
            .map_err(|e| kms_error(e, &format!("Decrypt ({what}) with {key_id}")))?;
        Ok(Zeroizing::new(out.plaintext().map(|b| b.as_ref().to_vec()).unwrap_or_default()))
    }

    fn unwrap_ik(&self, key_id: &str, w: IkWrapped<'_>, ctx: &KeyContext<'_>) -> Result<Dek> {
        let key = self
            .ik_cache
            .try_get_with(w.ik_id, || -> Result<_> {
                let plain = self.decrypt(key_id, w.blob, ik_context(ctx.volume_id, &w.ik_id), "intermediate key")?;
                let mut key = Zeroizing::new([0u8; 32]);
                if plain.len() != 32 {
                    return Err(Error::access("KMS returned an intermediate key of the wrong length"));
                }
                key.copy_from_slice(&plain);
                Ok(Arc::new(key))
            })
            .map_err(|e: Arc<Error>| (*e).clone())?;
        let (nonce, rest) = w.sealed.split_at(12);
        let (ct, tag) = rest.split_at(32);
        let mut plain = Zeroizing::new([0u8; 32]);
        crate::crypto::Aead::new(&key)
            .open(
                nonce.try_into().unwrap(),
                &ik_aad(ctx.volume_id, ctx.file_id, &w.ik_id),
                ct,
                tag.try_into().unwrap(),
                &mut plain[..],
            )
            .map_err(|_| {
                Error::access(
                    "wrapped key does not authenticate under its intermediate key (copied from another file?)",
                )
            })?;
        Dek::from_slice(&plain[..])
    }

    fn count_rotations(&self) -> Result<u32> {
        let mut n = 0u32;
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .rt
                .block_on(self.client.list_key_rotations().key_id(&self.arn).set_marker(marker.clone()).send())
                .map_err(|e| kms_error(e, "ListKeyRotations"))?;
            n += out.rotations().len() as u32;
            match out.next_marker() {
                Some(m) if out.truncated() => marker = Some(m.to_owned()),
                _ => return Ok(n),
            }
        }
    }

    /// GenerateDataKey for a new file id (drawn here when `file_id` is None).
    async fn generate_one(
        client: Client,
        arn: String,
        volume_id: VolumeId,
        file_id: Option<FileId>,
        version: u32,
    ) -> Result<Ready> {
        let file_id = match file_id {
            Some(f) => f,
            None => {
                let mut f = [0u8; FILE_ID_LEN];
                fill_random(&mut f)?;
                f
            }
        };
        let out = client
            .generate_data_key()
            .key_id(&arn)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context_map(&volume_id, &file_id)))
            .send()
            .await
            .map_err(|e| kms_error(e, "GenerateDataKey"))?;
        let plain = out.plaintext().ok_or_else(|| Error::new(libc::EIO, "KMS GenerateDataKey: no plaintext"))?;
        let plain = Zeroizing::new(plain.as_ref().to_vec());
        let dek = Dek::from_slice(&plain)?;
        let blob = out.ciphertext_blob().ok_or_else(|| Error::new(libc::EIO, "KMS GenerateDataKey: no ciphertext"))?;
        let rec = KeyRecord {
            provider: ProviderKind::AwsKms,
            kek_id: out.key_id().unwrap_or(&arn).to_owned(),
            kek_version: version,
            wrapped: blob.as_ref().to_vec(),
        };
        Ok((file_id, dek, rec))
    }
}

impl KeyProvider for AwsKmsProvider {
    fn requests_sent(&self) -> Option<u64> {
        Some(self.requests.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::AwsKms
    }

    fn kek_id(&self) -> String {
        self.arn.clone()
    }

    fn describe(&self) -> String {
        format!("AWS KMS key {}", self.arn)
    }

    fn generate(&self, ctx: &KeyContext<'_>) -> Result<(Dek, KeyRecord)> {
        if self.intermediate {
            return self.wrap_under_ik(ctx.volume_id, ctx.file_id);
        }
        let version = self.rotations.load(Ordering::Relaxed);
        let (_, dek, rec) = self.rt.block_on(Self::generate_one(
            self.client.clone(),
            self.arn.clone(),
            *ctx.volume_id,
            Some(*ctx.file_id),
            version,
        ))?;
        Ok((dek, rec))
    }

    fn unwrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<Dek> {
        if record.provider != ProviderKind::AwsKms {
            return Err(Error::access(format!("key record is for provider {}", record.provider.name())));
        }
        let key_id = self.decrypting_key(&record.kek_id)?;
        if let Some(w) = parse_ik(&record.wrapped) {
            return self.unwrap_ik(key_id, w, ctx);
        }
        let plain = self.decrypt(key_id, &record.wrapped, context_map(ctx.volume_id, ctx.file_id), "data key")?;
        Dek::from_slice(&plain)
    }

    fn wraps_remotely(&self) -> bool {
        !self.intermediate
    }

    /// KMS Encrypt under the encryption context (per-file mode), or a local wrap under the
    /// intermediate key, which carries the slot (no KMS call per file).
    fn wrap(&self, dek: &Dek, ctx: &KeyContext<'_>) -> Result<KeyRecord> {
        if self.intermediate {
            return self.wrap_dek_under_ik(dek, ctx.volume_id, ctx.file_id);
        }
        let out = self
            .rt
            .block_on(
                self.client
                    .encrypt()
                    .key_id(&self.arn)
                    .plaintext(Blob::new(dek.expose().to_vec()))
                    .set_encryption_context(Some(context_map(ctx.volume_id, ctx.file_id)))
                    .send(),
            )
            .map_err(|e| kms_error(e, "Encrypt"))?;
        let blob = out.ciphertext_blob().ok_or_else(|| Error::new(libc::EIO, "KMS Encrypt: no ciphertext"))?;
        Ok(KeyRecord {
            provider: ProviderKind::AwsKms,
            kek_id: out.key_id().unwrap_or(&self.arn).to_owned(),
            kek_version: self.rotations.load(Ordering::Relaxed),
            wrapped: blob.as_ref().to_vec(),
        })
    }

    fn current_version(&self) -> Result<u32> {
        Ok(self.rotations.load(Ordering::Relaxed))
    }

    fn versions(&self) -> Result<Vec<KekVersionInfo>> {
        let n = self.count_rotations()?;
        Ok((0..=n).map(|v| KekVersionInfo { version: v, current: v == n, retired: false }).collect())
    }

    /// ReEncrypt: the DEK is re-wrapped inside KMS and never seen here.
    fn rewrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<KeyRecord> {
        let source = self.decrypting_key(&record.kek_id)?.to_owned();
        // Per-file records carry the DEK's blob; intermediate-key records the intermediate
        // key's blob (the DEK's local wrap stays as it is). Either way KMS re-wraps it.
        let ik = parse_ik(&record.wrapped);
        let (blob, ec) = match &ik {
            Some(w) => (w.blob.to_vec(), ik_context(ctx.volume_id, &w.ik_id)),
            None => (record.wrapped.clone(), context_map(ctx.volume_id, ctx.file_id)),
        };
        let out = self
            .rt
            .block_on(
                self.client
                    .re_encrypt()
                    .ciphertext_blob(Blob::new(blob))
                    .source_key_id(&source)
                    .set_source_encryption_context(Some(ec.clone()))
                    .destination_key_id(&self.arn)
                    .set_destination_encryption_context(Some(ec))
                    .send(),
            )
            .map_err(|e| kms_error(e, "ReEncrypt"))?;
        let new_blob = out.ciphertext_blob().map(|b| b.as_ref().to_vec()).unwrap_or_default();
        Ok(KeyRecord {
            provider: ProviderKind::AwsKms,
            kek_id: out.key_id().unwrap_or(&self.arn).to_owned(),
            kek_version: self.rotations.load(Ordering::Relaxed),
            wrapped: match ik {
                Some(w) => build_ik(&w.ik_id, &new_blob, w.sealed),
                None => new_blob,
            },
        })
    }

    fn rotation(&self) -> Option<&dyn super::Rotation> {
        Some(self)
    }
}

impl super::Rotation for AwsKmsProvider {
    fn rotate(&self) -> Result<u32> {
        self.rt
            .block_on(self.client.rotate_key_on_demand().key_id(&self.arn).send())
            .map_err(|e| kms_error(e, "RotateKeyOnDemand"))?;
        let n = self.count_rotations()?;
        self.rotations.store(n, Ordering::Relaxed);
        *self.current_ik.lock().unwrap() = None;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::mrk_equivalent;

    #[test]
    fn only_replicas_of_one_multi_region_key_are_equivalent() {
        let a = "arn:aws:kms:us-east-1:111122223333:key/mrk-1234abcd";
        let b = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1234abcd";
        assert!(mrk_equivalent(a, b));
        assert!(!mrk_equivalent(a, "arn:aws:kms:eu-west-1:444455556666:key/mrk-1234abcd"), "another account");
        assert!(!mrk_equivalent(a, "arn:aws:kms:eu-west-1:111122223333:key/mrk-99"), "another key");
        assert!(!mrk_equivalent(a, "arn:aws-cn:kms:eu-west-1:111122223333:key/mrk-1234abcd"), "another partition");
        let single = "arn:aws:kms:us-east-1:111122223333:key/1234abcd";
        assert!(!mrk_equivalent(single, "arn:aws:kms:eu-west-1:111122223333:key/1234abcd"), "single-Region");
        assert!(!mrk_equivalent("alias/x", "alias/x"));
    }
}
