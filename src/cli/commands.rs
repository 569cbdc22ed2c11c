//! The commands that open a volume and report on it: init, trust, upgrade, rekey, fsck,
//! inspect, status.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tracing::info;

use super::args::{Cmd, NameCmd, ProviderArg};
use crate::keys::aws_kms::KmsSettings;
use crate::keys::local::KdfParams;
use crate::keys::pkcs11::Pkcs11Uri;
use crate::keys::secret::SecretSource;
use crate::tools::rekey;
use crate::volume::lock::lock_volume;
use crate::volume::{self, InitOptions, OpenOptions, Volume};

/// Run one of this module's commands.
pub fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Init {
            backing,
            provider,
            block_size,
            header_size,
            plaintext_names,
            keyring,
            kdf_memory_mib,
            kdf_iterations,
            module,
            key,
            key_id,
            region,
            kms_endpoint,
            kms_intermediate_key,
            shared,
            secret,
        } => {
            let provider = match provider {
                ProviderArg::Local => {
                    let kdf = KdfParams { m_kib: kdf_memory_mib.saturating_mul(1024), t: kdf_iterations, p: 1 };
                    kdf.check().map_err(|e| crate::error::usage(e.to_string()))?;
                    volume::ProviderInit::Local { kdf, keyring }
                }
                ProviderArg::Pkcs11 => {
                    let uri = key.ok_or_else(|| crate::error::usage("--provider pkcs11 needs --key URI"))?;
                    let module =
                        module.or_else(|| uri.parse::<Pkcs11Uri>().ok()?.module_path.map(PathBuf::from)).ok_or_else(
                            || crate::error::usage("--provider pkcs11 needs --module PATH (or module-path in the URI)"),
                        )?;
                    volume::ProviderInit::Pkcs11 { module, uri }
                }
                ProviderArg::AwsKms => {
                    let key_id = key_id.ok_or_else(|| crate::error::usage("--provider aws-kms needs --key-id"))?;
                    let mut s = KmsSettings::new(&key_id);
                    s.region = region;
                    s.endpoint = kms_endpoint;
                    s.intermediate_key = kms_intermediate_key;
                    volume::ProviderInit::AwsKms(s)
                }
            };
            let format = if plaintext_names {
                crate::volume::config::PLAINTEXT_NAMES_FORMAT
            } else {
                crate::volume::config::FORMAT
            };
            let opts = InitOptions { block_size, header_size, provider, format, shared, ..InitOptions::default() };
            init(&backing, &secret.source(), &opts)
        }
        Cmd::Trust { backing, yes, module, accept_format, accept_rollback, secret } => {
            let asked = crate::volume::trust::Pinning { module: module.as_deref(), accept_format, accept_rollback };
            trust(&backing, yes, &asked, &secret.source())
        }
        Cmd::Share { backing, off, secret } => {
            let _lock = lock_volume(&backing).context("sharing is changed with the volume unmounted on every host")?;
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let changed = vol.set_shared(!off)?;
            let now = if off { "mounted by one host at a time" } else { "shared: several hosts may mount it" };
            let was = if changed { "is now" } else { "is already" };
            println!("{} {was} {now} (format {})", backing.display(), vol.config.format);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Upgrade { backing, secret } => {
            let _lock = lock_volume(&backing).context("upgrade rewrites the config: unmount the volume first")?;
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let was_upgrading = vol.config.upgrading;
            let done = crate::tools::upgrade::upgrade(&mut vol)?;
            upgrade_report(&backing, &done, was_upgrading)
        }
        Cmd::Status { mountpoint: Some(mountpoint), json } => {
            let st = crate::daemon::control::query(&mountpoint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                crate::daemon::status::write_human(&st, &mut std::io::stdout())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { mountpoint: None, json } => {
            let mut all = Vec::new();
            for mnt in crate::daemon::process::envelopefs_mounts() {
                match crate::daemon::control::query(&mnt) {
                    Ok(st) => all.push(st),
                    Err(e) => eprintln!("{}: {}", mnt.display(), crate::error::printable(&e.to_string())),
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no envelopefs mount answers here");
            } else {
                for st in &all {
                    crate::daemon::status::write_human(st, &mut std::io::stdout())?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rekey { backing, rewrap: _, reencrypt, paths, jobs, to_key, audit_log, metrics, secret } => {
            let mode = if reencrypt { rekey::Mode::Reencrypt } else { rekey::Mode::Rewrap };
            let opts = OpenOptions { audit_log, ..OpenOptions::default() };
            let vol = match to_key {
                None => Volume::open(&backing, &secret.source(), &opts)?,
                Some(k) => crate::tools::key_move::move_to_key(&backing, &k, &secret.source(), &opts)?,
            };
            rekey_files(&vol, &backing, mode, paths, jobs, metrics.as_deref())
        }
        Cmd::Inspect { file, volume: None, .. } => {
            crate::tools::check::inspect(&file, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect { file, volume: Some(backing), secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let rel = match vol.names() {
                Some(_) => crate::tools::name_paths::backing_path(&vol, &file)?,
                None => file.clone(),
            };
            println!("path:            {}", file.display());
            crate::tools::check::inspect(&vol.root.join(rel), &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Name(NameCmd::Encrypt { backing, path, secret }) => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            println!("{}", crate::tools::name_paths::backing_path(&vol, &path)?.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Name(NameCmd::Decrypt { backing, path, secret }) => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let plain = crate::tools::name_paths::plain_path(&vol, &path)?;
            std::io::Write::write_all(&mut std::io::stdout(), plain.as_os_str().as_encoded_bytes())
                .and_then(|_| std::io::Write::write_all(&mut std::io::stdout(), b"\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fsck { backing, repair, secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let _lock = if repair {
                Some(lock_volume(&backing).context("fsck --repair needs the volume unmounted")?)
            } else {
                None
            };
            // What a crash left goes first: the journal tells a torn write from tampering.
            // A live mount's journal is its own business (it is not a crash's).
            let journal = if repair {
                crate::file::recovery::recover(&vol)?
            } else if lock_volume(&backing).is_ok() {
                crate::file::recovery::describe_pending(&vol)?
            } else {
                Vec::new()
            };
            let mut rep = crate::tools::check::fsck(&vol, repair)?;
            rep.problems.splice(0..0, journal);
            let mut remaining = 0;
            for p in &rep.problems {
                let mark = if p.repaired { "repaired" } else { "PROBLEM" };
                remaining += usize::from(!p.repaired);
                let line = format!("{}: {}", p.path.display(), p.what);
                println!("{mark}: {}", crate::error::printable(&line));
            }
            println!(
                "checked {} files, {} blocks ({} holes): {} problems, {} repaired",
                rep.files,
                rep.blocks,
                rep.holes,
                rep.problems.len(),
                rep.problems.len() - remaining
            );
            Ok(if remaining == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Mount(_)
        | Cmd::Key(_)
        | Cmd::Service(_)
        | Cmd::Umount { .. }
        | Cmd::Completions { .. }
        | Cmd::Man { .. } => {
            unreachable!("dispatched by cli::run")
        }
    }
}

fn init(backing: &Path, secret: &SecretSource, opts: &InitOptions) -> Result<ExitCode> {
    let cfg = volume::init(backing, secret, opts)?;
    println!("Created an envelopefs volume in {}", backing.display());
    println!("  volume id   {}", cfg.volume_id);
    println!("  block size  {} bytes, header {} bytes", cfg.block_size, cfg.header_size);
    match cfg.keyring_path(backing) {
        Some(k) => {
            println!("  keyring     {}", k.display());
            println!("Without the keyring and its passphrase or key file the files cannot be decrypted: back them up.");
        }
        None => println!("  key store   {}", cfg.provider),
    }
    println!("Mount it with: envelopefs mount {} MOUNTPOINT", backing.display());
    Ok(ExitCode::SUCCESS)
}

fn rekey_files(
    vol: &Volume,
    backing: &Path,
    mode: rekey::Mode,
    paths: Vec<PathBuf>,
    jobs: usize,
    metrics: Option<&str>,
) -> Result<ExitCode> {
    let _lock = if mode == rekey::Mode::Reencrypt {
        Some(lock_volume(backing).context("rekey --reencrypt rewrites files: unmount the volume first")?)
    } else {
        None
    };
    if mode == rekey::Mode::Reencrypt {
        crate::file::recovery::recover(vol)?;
        let n = crate::volume::tree::remove_stale_temporaries(&vol)?;
        if n > 0 {
            info!("removed {n} temporary files left by an interrupted re-encryption");
        }
    }
    let files = if paths.is_empty() { crate::volume::tree::volume_files(&vol)? } else { paths };
    let label = if mode == rekey::Mode::Rewrap { "rewrap" } else { "reencrypt" };
    let progress = std::sync::Arc::new(rekey::Progress::new(files.len() as u64, label));
    if let Some(addr) = metrics {
        crate::daemon::metrics::serve_rekey(addr, progress.clone())?;
    }
    let sum = rekey::run(vol, mode, files, jobs, &|p| progress.tick(p));
    progress.finish();
    for (p, e) in &sum.failed {
        let line = format!("{}: {e}", crate::tools::name_paths::describe(vol, p));
        eprintln!("FAILED: {}", crate::error::printable(&line));
    }
    println!(
        "{label}: {} files changed, {} already current, {} failed (KEK version {} is current)",
        sum.changed,
        sum.unchanged,
        sum.failed.len(),
        vol.keys.primary().current_version()?
    );
    Ok(if sum.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// What `upgrade` did, for people.
fn upgrade_report(backing: &Path, done: &crate::tools::upgrade::Upgraded, resumed: bool) -> Result<ExitCode> {
    let b = backing.display();
    for (p, name) in &done.foreign {
        eprintln!("warning: {}: xattr {name} does not authenticate: left as it is (it reads as EIO)", p.display());
    }
    for (p, e) in &done.failed {
        eprintln!("{}: {e}", p.display());
    }
    if !done.finished() {
        eprintln!(
            "{b}: the upgrade to format {} is not finished ({} files failed): mend or remove them, then run              `envelopefs upgrade` again; the volume does not mount until then",
            done.to,
            done.failed.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    if done.from == done.to && !resumed {
        // Plaintext names (2, 3): no xattr is encrypted, so format 6 has nothing to bind.
        let why =
            if !crate::volume::config::Features::of(done.to).names { ", the newest with plaintext names" } else { "" };
        println!("{b} is already format {}{why}", done.to);
        return Ok(ExitCode::SUCCESS);
    }
    let what = match done.to {
        2 => "its config is authenticated".to_owned(),
        _ => format!(
            "xattr values of regular files are bound to their file (values sealed anew: {}, in files: {}; \
             empty files given a header: {})",
            done.values, done.files, done.headers
        ),
    };
    println!("{b} is now format {}: {what}", done.to);
    Ok(ExitCode::SUCCESS)
}

/// `envelopefs trust`: show what would be pinned, ask, authenticate with it, pin it.
fn trust(
    backing: &Path,
    yes: bool,
    asked: &crate::volume::trust::Pinning<'_>,
    secret: &SecretSource,
) -> Result<ExitCode> {
    let root = std::fs::canonicalize(backing).with_context(|| format!("backing directory {}", backing.display()))?;
    let cfg = volume::VolumeConfig::load(&root)?;
    let store = crate::volume::trust::TrustStore::host();
    let existing = store.get(&cfg.volume_id)?;
    let rec = crate::volume::trust::candidate(&root, &cfg, asked, existing.as_ref())?;
    println!("{} asks this host to trust:", root.display());
    for line in crate::volume::trust::describe(&rec) {
        println!("  {line}");
    }
    if !cfg.features().authenticated {
        println!("  note: format 1: the config is not authenticated; `envelopefs upgrade` makes it format 2");
    }
    if let Some(old) = &existing {
        for d in old.provider.differences(&cfg.provider) {
            println!("  changed: {d}");
        }
        if asked.accept_rollback {
            println!(
                "  rollback: this host has seen keyring version {} and config generation {}; the volume here \
                 may be older (the versions it has are shown after it opens). An older keyring brings back \
                 KEK versions retired since, and an older config undoes key-slot changes made since",
                old.keyring_version, old.config_generation
            );
        }
        if !old.accepts_place(&root) {
            println!(
                "  place: this host knows the volume at {}; accepting it at {} too lets both copies open \
                 with the same keys (a restored backup or a snapshot; for a move, remove the old copy)",
                old.places.join(", "),
                root.display()
            );
        }
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(crate::error::usage("not pinned: confirm with --yes (no terminal to ask on)").into());
        }
        eprint!("Pin these settings for this volume on this host? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("not pinned");
        }
    }
    let vol = Volume::open_trusting(&root, cfg, Some(rec), secret, &OpenOptions::default())?;
    vol.save_trust()?;
    if asked.accept_rollback {
        let seen = vol.trust_record();
        println!("  accepted: keyring version {}, config generation {}", seen.keyring_version, seen.config_generation);
    }
    println!("pinned in {}", store.dir().display());
    Ok(ExitCode::SUCCESS)
}
