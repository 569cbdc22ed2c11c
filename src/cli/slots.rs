//! `envelopefs key slot`: add, remove, list, primary.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::args::{NewSlotArgs, SlotCmd};
use crate::keys::aws_kms::KmsSettings;
use crate::keys::local::KdfParams;
use crate::volume::{OpenOptions, ProviderInit, Volume};

pub fn slot_cmd(cmd: SlotCmd) -> Result<ExitCode> {
    match cmd {
        SlotCmd::Add { backing, slot, secret } => {
            let _lock = locked(&backing)?;
            let init = new_slot(&slot)?;
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let i = crate::tools::key_slots::add(&mut vol, &init, &secret.source())?;
            println!("slot {i} added: {}", vol.config.policy().nth(i).expect("just added").summary());
            println!("New files get its record from the next mount on; give existing files theirs with:");
            println!("  envelopefs rekey --rewrap {}", backing.display());
            print_check(&vol);
        }
        SlotCmd::Remove { backing, slot, secret } => {
            let _lock = locked(&backing)?;
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let gone = crate::tools::key_slots::remove(&mut vol, slot)?;
            println!("slot {slot} removed: {}", gone.summary());
            println!("Headers keep its records until `envelopefs rekey --rewrap {}`;", backing.display());
            println!("its key can be disabled once `envelopefs key status` shows no file still carrying it.");
        }
        SlotCmd::List { backing, secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            for line in crate::tools::key_slots::describe(&vol) {
                println!("{line}");
            }
            print_check(&vol);
        }
        SlotCmd::Primary { backing, slot, secret } => {
            let _lock = locked(&backing)?;
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            crate::tools::key_slots::make_primary(&mut vol, slot)?;
            println!("slot {slot} is now the primary: {}", vol.config.provider.summary());
            println!(
                "The old primary is slot {slot}; once `envelopefs rekey --rewrap` has given every file the new \
                 primary's record, remove it with `envelopefs key slot remove {} {slot}`.",
                backing.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A mount keeps the slot set it opened with: a change under it would have it make files
/// without the new slot's record, or with only a removed slot's.
fn locked(backing: &std::path::Path) -> Result<crate::volume::lock::VolumeLock> {
    crate::volume::lock::lock_volume(backing)
        .context("a key slot change needs the volume unmounted (a mount keeps the slot set it opened with)")
}

fn print_check(vol: &Volume) {
    if let Some(k) = vol.volume_key() {
        println!(
            "volume check {}  (give it as --volume-check to a recovery open on a new host)",
            crate::volume::trust::volume_check(k)
        );
    }
}

/// The store a new slot names; a new recovery key pair is made (and written) here.
fn new_slot(a: &NewSlotArgs) -> Result<ProviderInit> {
    let k = &a.kind;
    Ok(if k.local {
        ProviderInit::Local { kdf: KdfParams::default(), keyring: a.keyring.clone() }
    } else if let Some(uri) = &k.pkcs11 {
        ProviderInit::Pkcs11 { module: a.module.clone().expect("clap requires --module"), uri: uri.clone() }
    } else if let Some(key) = &k.aws_kms {
        let mut s = KmsSettings::new(key);
        s.region.clone_from(&a.region);
        s.endpoint.clone_from(&a.kms_endpoint);
        s.intermediate_key = a.kms_intermediate_key;
        ProviderInit::AwsKms(s)
    } else if let Some(r) = &k.recovery {
        ProviderInit::Recovery { recipient: r.clone() }
    } else {
        let path = k.new_recovery_key.as_ref().expect("clap requires one slot kind");
        let (identity, recipient) = crate::keys::recovery::generate_identity();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating recovery key {}", path.display()))?;
        f.write_all(identity.as_bytes()).and_then(|_| f.sync_all())?;
        println!("recovery key written to {}: keep it offline (it opens every file)", path.display());
        ProviderInit::Recovery { recipient }
    })
}
