//! Opening a volume as this host trusts it: its place, the slots' key stores, the volume
//! key and the config's MAC, the keyring's and config's generations, then the key pool.

use super::*;

/// Open every slot of the policy that opens: the primary must (its store is where new
/// keys and rotations go), others that fail are logged and left out. A recovery open
/// opens the recovery slots only.
pub(super) fn open_slots(
    root: &Path,
    settings: &[ProviderConfig],
    volume_id: VolumeId,
    secret: &SecretSource,
    opts: &OpenOptions,
) -> Result<OpenedSlots> {
    let recovering = secret.recovery_key.is_some();
    let (mut slots, mut missing) = (Vec::new(), Vec::new());
    for (i, s) in settings.iter().enumerate() {
        let is_recovery = matches!(s, ProviderConfig::Recovery { .. });
        if recovering && !is_recovery {
            missing.push((i, "not opened (a recovery open)".to_owned()));
            continue;
        }
        match open_provider(root, s, volume_id, secret, opts) {
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
pub(super) fn unwrap_volume_key(root: &Path, config: &VolumeConfig, slots: &[KeySlot]) -> Result<VolumeKey> {
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
pub(super) fn check_volume_key(
    root: &Path,
    key: &VolumeKey,
    seen: &TrustRecord,
    secret: &SecretSource,
    recovering: bool,
) -> Result<()> {
    let check = crate::volume::trust::volume_check(key);
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

impl Volume {
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
        let place = crate::volume::trust::place_of(root)?;
        if let Some(t) = trusted.as_ref().filter(|t| !t.accepts_place(&place)) {
            return Err(crate::volume::trust::wrong_place(t, &place));
        }
        let settings = crate::volume::trust::settle(root, &config, trusted.as_ref(), secret.recovery_key.is_some())?;
        let (slots, missing) = open_slots(root, &settings, volume_id, secret, opts)?;
        let recovering = secret.recovery_key.is_some();
        let mut seen = trusted.clone().unwrap_or_else(|| TrustRecord::for_config(&config));
        for slot in &slots {
            let Some((ring_version, ring_format)) = slot.provider.keyring().map(|k| k.state()) else { continue };
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
                seen.volume_check = Some(crate::volume::trust::volume_check(&key));
                for s in &slots {
                    if let Some(b) = s.provider.binding() {
                        b.bind_volume_key(&key);
                    }
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
            let testable = s.settings.kind() != crate::format::ProviderKind::Recovery || recovering;
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
        let names = match config.names {
            Some(_) => volume_key.as_ref().map(|k| Arc::new(crate::names::NameCipher::new(k))),
            None => None,
        };
        Self::assemble(root, config, slots, missing, volume_key, names, seen, opts)
    }

    /// A volume whose one key slot is `provider`, trusted as its config says (tests that
    /// stand in for a key store).
    pub fn with_provider(
        root: &Path,
        config: VolumeConfig,
        provider: Arc<dyn KeyProvider>,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let slots = vec![KeySlot::new(0, config.provider.clone(), provider)];
        let trusted = TrustRecord::for_config(&config);
        Self::assemble(root, config, slots, Vec::new(), None, None, trusted, opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        root: &Path,
        config: VolumeConfig,
        slots: Vec<KeySlot>,
        missing: Vec<(usize, String)>,
        volume_key: Option<VolumeKey>,
        names: Option<Arc<crate::names::NameCipher>>,
        trusted: TrustRecord,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let (volume_id, geometry) = (config.volume_id()?, config.geometry()?);
        let audit = match &opts.audit_log {
            Some(path) => {
                let (names, root) = (names.clone(), root.to_owned());
                let plain: Option<PlainPath> = names.map(|n| -> PlainPath {
                    Box::new(move |p| n.plain_path(&root, p).ok().map(|p| p.to_string_lossy().into_owned()))
                });
                Some(AuditLog::open(path, plain)?)
            }
            None => None,
        };
        let keys = KeyService::new(volume_id, geometry, opts, slots, missing, config.policy().count(), audit);
        Ok(Self {
            root: root.to_owned(),
            place: std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned()),
            volume_id,
            geometry,
            config,
            keys,
            volume_key,
            names,
            trust: opts.trust.clone(),
            trusted,
            config_seen: std::sync::Mutex::new(None),
        })
    }

    /// A running mount follows `key rotate` run by another process: when the config file
    /// changed, it is read again and, once it authenticates under the volume key this
    /// process holds, the key objects it pins are taken (an unauthenticated config changes
    /// nothing). Run by `watch_config`'s timer, never on a request's path.
    pub fn follow_config(&self) {
        let (Some(key), Some(pins)) = (&self.volume_key, self.keys.primary().pinning()) else { return };
        if pins.pinned_objects().is_none() {
            return;
        }
        let stamp = std::fs::metadata(self.root.join(config::CONFIG_NAME)).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.ino(), m.size(), m.mtime(), m.mtime_nsec())
        });
        {
            let mut seen = self.config_seen.lock().unwrap();
            if *seen == stamp {
                return;
            }
            *seen = stamp;
        }
        let fresh = VolumeConfig::load(&self.root).and_then(|c| c.verify(key).map(|_| c));
        match fresh {
            Ok(VolumeConfig { provider: ProviderConfig::Pkcs11 { objects, .. }, .. })
                if Some(&objects) != pins.pinned_objects().as_ref() =>
            {
                tracing::info!("the volume's config now pins key objects {}", objects.join(", "));
                if let Err(e) = pins.pin(objects) {
                    tracing::warn!("{e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: {e}", self.root.display()),
        }
    }
}
