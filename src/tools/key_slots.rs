//! Key slots (format 3): a volume's key policy is a primary KEK and any number of further
//! slots, each wrapping the volume key and every file's DEK. Any one slot opens the volume
//! and reads every file; new files get a record for every slot. Adding, removing and
//! reordering slots rewrites only the config; `rekey --rewrap` then brings each header to
//! the policy (docs/PROVIDERS.md: moving between key stores without re-encrypting).

use crate::error::{Error, Result};
use crate::format::{decode_region, Header, ProviderKind, FILE_ID_LEN, HEADER_TAG_LEN};
use crate::keys::secret::SecretSource;
use crate::keys::KeyContext;
use crate::tools::check::{walk_headers, HeaderRead};
use crate::volume::config::{ProviderConfig, SlotConfig, SLOTS_FORMAT};
use crate::volume::{create_provider, KeySlot, ProviderInit, Volume, WrappedKey, VOLUME_KEY_FILE_ID};

fn usage(why: impl Into<String>) -> Error {
    Error::new(libc::EINVAL, why.into()).with_class(crate::error::Class::Usage)
}

/// Add a slot for the store `init` names (made if it is new: a keyring, a PKCS#11 key
/// version 1). The volume moves to format 3. Returns the new slot's number.
pub fn add(vol: &mut Volume, init: &ProviderInit, secret: &SecretSource) -> Result<usize> {
    let Some(volume_key) = vol.volume_key() else {
        return Err(usage("a format-1 volume has no volume key: run `envelopefs upgrade` first"));
    };
    let volume_key = crate::crypto::VolumeKey::from_dek(&volume_key.as_dek());
    if matches!(init, ProviderInit::Local { .. })
        && vol.config.policy().any(|p| matches!(p, ProviderConfig::Local { .. }))
    {
        return Err(usage("the volume has a local keyring slot already (one per volume)"));
    }
    let (settings, made_keyring, provider) = create_provider(&vol.root, init, vol.volume_id, secret, SLOTS_FORMAT)?;
    let mut opened = None;
    let added = (|| -> Result<usize> {
        if vol.config.policy().any(|p| p.host_view() == settings.host_view()) {
            return Err(Error::new(libc::EEXIST, format!("the volume has a slot for {} already", settings.summary())));
        }
        if let Some(b) = provider.binding() {
            b.bind_volume_key(&volume_key);
        }
        let ctx = KeyContext { volume_id: &vol.volume_id, file_id: &VOLUME_KEY_FILE_ID };
        let rec = vol.keys.count(provider.wrap(&volume_key.as_dek(), &ctx))?;
        if provider.kind() != ProviderKind::Recovery {
            let back = vol.keys.count(provider.unwrap(&rec, &ctx))?;
            if back.expose() != volume_key.as_dek().expose() {
                return Err(Error::new(
                    libc::EIO,
                    format!("{} unwrapped another key than it wrapped", provider.describe()),
                ));
            }
        }
        check_fits(vol, &rec)?;
        let index = vol.config.policy().count();
        let slot = SlotConfig { provider: settings.clone(), volume_key: WrappedKey::from_record(&rec) };
        vol.keys.add_slot(KeySlot::new(index, settings.clone(), provider.clone()));
        opened = Some(index);
        vol.update_config_with(|c| {
            c.format = c.format.max(SLOTS_FORMAT);
            c.slots.push(slot);
        })?;
        for s in vol.keys.slots() {
            if let Some(k) = s.provider.keyring() {
                k.mark_volume_format(SLOTS_FORMAT)?;
            }
        }
        Ok(index)
    })();
    // Once the config on disk names the slot, its keyring stays, whatever failed after.
    let named = || {
        crate::volume::VolumeConfig::load(&vol.root)
            .is_ok_and(|c| c.policy().any(|p| p.host_view() == settings.host_view()))
    };
    if added.is_err() && !named() {
        if let Some(index) = opened {
            vol.keys.remove_slot(index);
        }
        if let Some(k) = made_keyring {
            let _ = std::fs::remove_file(k);
        }
    }
    added
}

/// A header with a record for every slot must fit in a header slot.
fn check_fits(vol: &Volume, new: &crate::format::KeyRecord) -> Result<()> {
    let mut records = Vec::new();
    for (i, p) in vol.config.policy().enumerate() {
        records.push(vol.config.slot_volume_key(i).expect("format 2 has a volume key").record(p.kind())?);
    }
    records.push(new.clone());
    let h = Header { generation: 1, file_id: [1; FILE_ID_LEN], block_size: vol.geometry.block_size as u32, records };
    h.encode_slot(vol.geometry.slot_size(), |_| [0; HEADER_TAG_LEN]).map(drop).map_err(|e| {
        usage(format!(
            "a header with a record for each of {} slots does not fit in this volume's header size ({} bytes): {e}",
            h.records.len(),
            vol.geometry.header_size
        ))
    })
}

/// Remove slot `index` from the policy. Refused for the primary, and while any file has no
/// record for the slots that stay (run `rekey --rewrap` first): no file is ever left that
/// no slot opens. Headers keep the removed slot's records until `rekey --rewrap`.
pub fn remove(vol: &mut Volume, index: usize) -> Result<ProviderConfig> {
    let n = vol.config.policy().count();
    if index == 0 {
        return Err(usage("slot 0 is the primary: make another slot primary first (`envelopefs key slot primary N`)"));
    }
    if index >= n {
        return Err(usage(format!("the volume has slots 0 to {}", n - 1)));
    }
    let staying: Vec<ProviderConfig> =
        vol.config.policy().enumerate().filter(|(i, _)| *i != index).map(|(_, p)| p.clone()).collect();
    let stranded = files_without_records(vol, &staying)?;
    if !stranded.is_empty() {
        return Err(Error::new(
            libc::EBUSY,
            format!(
                "{} file(s) have no record for the online slots that would stay (first: {}): run \
                 `envelopefs rekey --rewrap` first, so every file opens without slot {index}",
                stranded.len(),
                stranded[0]
            ),
        )
        .with_class(crate::error::Class::Busy));
    }
    let removed = vol.config.slots[index - 1].provider.clone();
    vol.update_config_with(|c| {
        c.slots.remove(index - 1);
    })?;
    vol.keys.remove_slot(index);
    Ok(removed)
}

/// Make slot `index` the primary (new keys and rotations go to its store); the old primary
/// takes its place.
pub fn make_primary(vol: &mut Volume, index: usize) -> Result<()> {
    let n = vol.config.policy().count();
    if index >= n {
        return Err(usage(format!("the volume has slots 0 to {}", n - 1)));
    }
    if index == 0 {
        return Ok(());
    }
    if matches!(vol.config.slots[index - 1].provider, ProviderConfig::Recovery { .. }) {
        return Err(usage("a recovery recipient cannot be the primary: it wraps, but only its offline key unwraps"));
    }
    if !vol.keys.slots().iter().any(|s| s.index == index) {
        return Err(Error::access(format!("slot {index} is not open here: it cannot become the primary")));
    }
    vol.update_config_with(|c| {
        let s = &mut c.slots[index - 1];
        std::mem::swap(&mut c.provider, &mut s.provider);
        let old = c.volume_key.replace(s.volume_key.clone()).expect("format 3 has a volume key");
        s.volume_key = old;
    })?;
    vol.keys.swap_primary(index);
    Ok(())
}

/// A recovery record does not count as coverage: a file it alone opens could be read only
/// offline, through a read-only recovery mount.
fn online(p: &ProviderConfig) -> bool {
    !matches!(p, ProviderConfig::Recovery { .. })
}

/// Backing paths of files with a header slot that has no record any online slot of
/// `policy` claims (or whose header cannot be read: such a file is not known to be safe).
fn files_without_records(vol: &Volume, policy: &[ProviderConfig]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    walk_headers(vol, &mut |path, read| {
        let covered = match read {
            HeaderRead::Empty => true,
            HeaderRead::Unreadable | HeaderRead::Short => false,
            HeaderRead::Region(region, _) => decode_region(region)
                .into_iter()
                .filter_map(|(_, s)| s.ok())
                .all(|v| v.header.records.iter().any(|r| policy.iter().any(|p| online(p) && p.claims(r)))),
        };
        if !covered {
            out.push(path.display().to_string());
        }
    })?;
    Ok(out)
}

/// One line per slot for `key slot list`.
pub fn describe(vol: &Volume) -> Vec<String> {
    vol.config
        .policy()
        .enumerate()
        .map(|(i, p)| {
            let role = if i == 0 { "primary" } else { "slot" };
            let open = if vol.keys.slots().iter().any(|s| s.index == i) { "" } else { "  (not open here)" };
            format!("{i}  {role:7}  {}{open}", p.summary())
        })
        .collect()
}
