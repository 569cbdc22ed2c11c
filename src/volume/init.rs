//! `envelopefs init`: a new volume's id, key store, volume key, config and trust record.

use super::*;

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
    if !crate::volume::config::FORMATS.contains(&opts.format) {
        return Err(Error::new(libc::EINVAL, format!("format {} is not one this version writes", opts.format)));
    }
    let has = crate::volume::config::Features::of(opts.format);
    if opts.shared && !has.shared {
        return Err(Error::new(
            libc::EINVAL,
            format!("a shared volume is format {} or later", crate::volume::config::SHARED_FORMAT),
        )
        .with_class(Class::Usage));
    }
    if let ProviderInit::AwsKms(s) = &opts.provider {
        if let Some(url) = &s.endpoint {
            crate::volume::config::check_endpoint(url)?;
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
            names: has.names.then(|| crate::volume::config::NAMES_SCHEME.to_owned()),
            shared: opts.shared,
            upgrading: false,
        };
        let mut check = None;
        if has.authenticated {
            // The volume key is a data key like any file's, bound to a file id no file has.
            let (dek, rec) = key_store.generate(&volume_key_context(&volume_id))?;
            cfg.generation = 1;
            cfg.volume_key = Some(WrappedKey::from_record(&rec));
            let key = VolumeKey::from_dek(&dek);
            cfg.seal(&key);
            check = Some(crate::volume::trust::volume_check(&key));
        }
        let mut trusted = TrustRecord::for_config(&cfg);
        trusted.volume_check = check;
        trusted.keyring_version = key_store.keyring().map_or(0, |k| k.state().0);
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
    crate::sys::atomic_file::replace(&path, text.as_bytes(), 0o644)
        .map_err(|e| Error::io(e, format!("writing {}", path.display())))
}

impl Volume {}
