//! The key stores a volume's settings name: made at `init`, opened at every open (with a
//! self-test), and the records a new DEK gets from all of them at once.

use super::*;

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
            if crate::volume::config::Features::of(format).authenticated {
                p.pin_current()?;
            }
            let cfg = ProviderConfig::Pkcs11 {
                module: module.to_string_lossy().into_owned(),
                key: parsed.key_id(),
                objects: p.pinning().and_then(|x| x.pinned_objects()).unwrap_or_default(),
                previous_keys: Vec::new(),
            };
            (cfg, None, Arc::new(p))
        }
        ProviderInit::AwsKms(settings) => {
            if let Some(url) = &settings.endpoint {
                crate::volume::config::check_endpoint(url)?;
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

/// The key store named by host-trusted `settings`.
pub(super) fn open_provider(
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
            // Only a mount creates files (its keys made ahead are the volume's `KeyPool`).
            s.for_mount = opts.kms_pool.unwrap_or(0) > 0;
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
pub(super) fn self_test(p: &dyn KeyProvider, volume_id: &VolumeId) -> Result<()> {
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

/// A DEK for a new file wrapped by every slot at once: a store that talks to a network
/// service is called concurrently with the others, so a create costs one round trip.
pub(super) fn wrap_for_all(providers: &[Arc<dyn KeyProvider>], volume_id: &VolumeId) -> Result<ReadyKey> {
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

impl Volume {}
