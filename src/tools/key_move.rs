//! `rekey --to-key`: point a volume at another KMS key or another PKCS#11 key of the same
//! token. The config names the new key at once; records under the old key keep unwrapping
//! until rewrap has moved every file. The admin names the new key, so this host's trust
//! record follows.

use std::path::Path;
use std::sync::Arc;

use tracing::info;

use crate::error::{Error, Result};
use crate::keys::aws_kms::{AwsKmsProvider, KmsSettings};
use crate::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use crate::keys::secret::SecretSource;
use crate::keys::KeyProvider;
use crate::volume::{OpenOptions, ProviderConfig, Volume};

/// Open the volume at `backing` and switch it to `key` (a KMS key id, ARN or alias; or a
/// PKCS#11 key URI without module or PIN).
pub fn move_to_key(backing: &Path, key: &str, secret: &SecretSource, opts: &OpenOptions) -> Result<Volume> {
    let mut vol = Volume::open(backing, secret, opts)?;
    let (dest, settings) = destination(&vol, key, secret)?;
    let before = vol.config.provider.clone();
    vol.switch_provider(dest, settings)?;
    if vol.config.provider != before {
        info!("the volume now names {}; rekey moves its files", vol.keys.primary().kek_id());
    }
    Ok(vol)
}

/// The provider for the new key, and the config naming it with the old key among the
/// previous ones (and the new key no longer among them).
fn destination(vol: &Volume, key: &str, secret: &SecretSource) -> Result<(Arc<dyn KeyProvider>, ProviderConfig)> {
    match vol.config.provider.clone() {
        ProviderConfig::AwsKms { key_id, mut previous_key_ids, region, endpoint, intermediate_key } => {
            let mut settings = KmsSettings::new(key);
            settings.intermediate_key = intermediate_key;
            settings.region.clone_from(&region);
            settings.endpoint.clone_from(&endpoint);
            // Records still under the current (soon previous) key must keep unwrapping.
            settings.allowed_key_ids = std::iter::once(key_id.clone()).chain(previous_key_ids.clone()).collect();
            let p = AwsKmsProvider::open(&settings, vol.volume_id)?;
            let arn = p.arn().to_owned();
            if arn != key_id && !previous_key_ids.contains(&key_id) {
                previous_key_ids.push(key_id);
            }
            previous_key_ids.retain(|k| *k != arn);
            let cfg = ProviderConfig::AwsKms { key_id: arn, previous_key_ids, region, endpoint, intermediate_key };
            Ok((Arc::new(p), cfg))
        }
        ProviderConfig::Pkcs11 { module, key: old, objects, mut previous_keys } => {
            let uri: Pkcs11Uri = key.parse().map_err(|e: Error| e.context(format!("--to-key {key}")))?;
            check_pkcs11_target(key, &uri)?;
            let pin = secret.resolve_pin(None)?;
            let p = Pkcs11Provider::open(Path::new(&module), &uri, pin, true)?;
            let new_id = uri.key_id();
            if new_id != old && !previous_keys.contains(&old) {
                previous_keys.push(old);
            }
            previous_keys.retain(|k| *k != new_id);
            p.set_previous_keys(previous_keys.clone());
            if vol.config.features().authenticated {
                let current = p.label(p.current_version()?);
                p.pin_objects(objects.iter().cloned().chain([current]).collect())?;
            }
            let cfg = ProviderConfig::Pkcs11 { module, key: new_id, objects, previous_keys };
            Ok((Arc::new(p), cfg))
        }
        ProviderConfig::Local { .. } | ProviderConfig::Recovery { .. } => Err(Error::new(
            libc::EINVAL,
            "--to-key is for aws-kms and pkcs11 volumes; a local keyring rotates with `key rotate`",
        )),
    }
}

/// A `--to-key` URI names the key only: the PIN comes from --pin-file, the module from
/// the volume (never code or secrets from a URI that travels with the command).
fn check_pkcs11_target(key: &str, uri: &Pkcs11Uri) -> Result<()> {
    if uri.pin_source.is_some() || uri.module_path.is_some() {
        return Err(Error::new(
            libc::EINVAL,
            format!("--to-key {key}: name the key only (the PIN comes from --pin-file, the module from the volume)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::testing::{trust, volume};

    #[test]
    fn a_local_volume_has_no_key_to_move_to() {
        let d = tempfile::tempdir().unwrap();
        let (backing, secret) = volume(d.path());
        let opts = OpenOptions { trust: trust(d.path()), ..OpenOptions::default() };
        let e = move_to_key(&backing, "alias/next", &secret, &opts).err().expect("refused");
        assert!(e.to_string().contains("--to-key is for aws-kms and pkcs11 volumes"), "{e}");
        assert_eq!(e.class(), None);
    }

    #[test]
    fn a_pkcs11_target_names_the_key_only() {
        let ok: Pkcs11Uri = "pkcs11:token=t;object=next".parse().unwrap();
        check_pkcs11_target("k", &ok).unwrap();
        for bad in ["pkcs11:token=t;object=next?pin-source=file:/p", "pkcs11:token=t;object=next?module-path=/m.so"] {
            let uri: Pkcs11Uri = bad.parse().unwrap();
            let e = check_pkcs11_target(bad, &uri).unwrap_err();
            assert!(e.to_string().contains("name the key only"), "{e}");
        }
    }
}
