//! `envelopefs key`: create (PKCS#11), rotate, status, retire.

use std::process::ExitCode;

use anyhow::Result;

use super::args::KeyCmd;
use crate::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use crate::keys::KeyProvider;
use crate::volume::lock::volume_locked;
use crate::volume::{OpenOptions, Volume};

pub fn key_cmd(cmd: KeyCmd) -> Result<ExitCode> {
    match cmd {
        KeyCmd::Create { module, key, secret } => {
            let uri: Pkcs11Uri = key.parse().map_err(|e: crate::error::Error| e.context(format!("--key {key}")))?;
            let pin = secret.source().resolve_pin(uri.pin_source.as_deref())?;
            let p = Pkcs11Provider::open(&module, &uri, pin, true)?;
            let v = p.current_version()?;
            println!("{}: version {v} is current", uri.key_id());
        }
        KeyCmd::Rotate { backing, secret } => {
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let Some(rotation) = vol.keys.primary().rotation() else {
                return Err(crate::error::usage(format!(
                    "{} has no versions to rotate: add a slot with the new key, then remove this one",
                    vol.keys.primary().describe()
                ))
                .into());
            };
            let v = rotation.rotate()?;
            vol.update_config(|_| {})?;
            println!("{}: KEK version {v} is now current; new files wrap under it", vol.keys.primary().describe());
            println!("Existing files keep the version they have until `envelopefs rekey`.");
        }
        KeyCmd::Passwd { backing, new_passphrase_file, new_key_file, kdf_memory_mib, kdf_iterations, secret } => {
            let _lock = crate::volume::lock::lock_volume(&backing)?;
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let Some(keyring) = vol.config.keyring_path(&vol.root) else {
                return Err(crate::error::usage(format!(
                    "key passwd changes a local keyring's secret; this volume's keys are in {}",
                    vol.config.provider
                ))
                .into());
            };
            let params =
                crate::keys::local::KdfParams { m_kib: kdf_memory_mib.saturating_mul(1024), t: kdf_iterations, p: 1 };
            params.check().map_err(|e| crate::error::usage(e.to_string()))?;
            let new = crate::keys::secret::SecretSource {
                passphrase_file: new_passphrase_file,
                key_file: new_key_file,
                ..Default::default()
            }
            .resolve(true)?;
            let old = secret.source().resolve(false)?;
            crate::keys::local::LocalProvider::open(&keyring, vol.volume_id, &old)?.reseal(&new, params)?;
            println!(
                "{}: the keyring is sealed under the new secret; the old one no longer opens it",
                keyring.display()
            );
        }
        KeyCmd::Retire { backing, version, force, secret } => {
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            crate::tools::retire::retire(&mut vol, version, force)?;
            println!("KEK version {version} retired: its key is gone");
        }
        KeyCmd::Slot(cmd) => return super::slots::slot_cmd(cmd),
        KeyCmd::Status { backing, secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let usage = crate::tools::check::key_usage(&vol)?;
            let current = vol.keys.primary().current_version().ok();
            println!("{}", vol.keys.primary().describe());
            if volume_locked(&backing) {
                println!("  note: the volume is mounted; a mount started before a rotation or --to-key may still");
                println!("  wrap new files under the old key until it is remounted: remount before retiring a key");
            }
            for v in vol.keys.primary().versions()? {
                let n = usage.files.get(&v.version).copied().unwrap_or(0);
                let mark = if v.current {
                    " (current)"
                } else if v.retired {
                    " (retired)"
                } else {
                    ""
                };
                println!("  version {}{mark}: {n} files", v.version);
            }
            for (v, n) in &usage.files {
                if !vol.keys.primary().versions()?.iter().any(|i| i.version == *v) {
                    println!("  version {v} (MISSING from the key store): {n} files");
                }
            }
            if vol.config.policy().count() > 1 || usage.removed_slot > 0 {
                for (i, p) in vol.config.policy().enumerate() {
                    println!("  slot {i} ({}): {} files", p.summary(), usage.per_slot[i]);
                }
                if usage.removed_slot > 0 {
                    println!(
                        "  {} files still carry a record of a removed slot: `envelopefs rekey --rewrap`",
                        usage.removed_slot
                    );
                }
            }
            println!("  {} files without a header yet (empty)", usage.empty);
            if usage.other_key > 0 {
                println!("  {} files still wrap under another key: `envelopefs rekey --rewrap`", usage.other_key);
            }
            let stale: u64 = usage.any_slot.iter().filter(|(v, _)| Some(**v) != current).map(|(_, n)| n).sum();
            if stale > 0 {
                println!(
                    "  {stale} files still reference an older version in a header copy: `envelopefs rekey --rewrap`"
                );
            }
            if usage.unreadable > 0 {
                println!("  {} files whose header could not be read (run fsck)", usage.unreadable);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
