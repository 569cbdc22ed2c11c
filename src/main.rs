//! The `envelopefs` command line.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::{info, warn};

use envelopefs::crypto::Backend;
use envelopefs::daemon;
use envelopefs::fs::EncryptedFs;
use envelopefs::keys::cache::CacheConfig;
use envelopefs::keys::local::KdfParams;
use envelopefs::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use envelopefs::keys::secret::{SecretSource, CREDENTIAL_NAME, PASSPHRASE_ENV, PIN_CREDENTIAL, PIN_ENV};
use envelopefs::keys::KeyProvider;
use envelopefs::mount::MountOptions;
use envelopefs::rekey;
use envelopefs::volume::{self, InitOptions, OpenOptions, Volume, CONFIG_NAME};

#[derive(Parser)]
#[command(
    name = "envelopefs",
    version,
    about = "Transparent per-file envelope encryption as a FUSE filesystem",
    long_about = "envelopefs mounts a plaintext view of a backing directory whose files are \
envelopes: each holds its own random data key (DEK), wrapped by a key-encryption key (KEK) \
that stays in its key store, followed by the content in AES-256-GCM blocks.\n\n\
A first volume, with a passphrase:\n  \
envelopefs init /srv/secret.enc\n  \
envelopefs mount /srv/secret.enc /mnt/secret\n  \
echo hello > /mnt/secret/note.txt\n  \
envelopefs umount /mnt/secret\n\n\
Logs go to stderr (or --log-file); RUST_LOG=debug shows more.",
    after_help = "Secrets are never taken on the command line. The keyring secret comes from, in order: \
--key-file, --passphrase-file, $ENVELOPEFS_PASSPHRASE, the systemd credential 'envelopefs.passphrase', \
or a prompt on the terminal."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Default)]
struct SecretArgs {
    /// Read the keyring passphrase from this file (one trailing newline is ignored).
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Unlock the keyring with a key file: 32 random bytes, or 64 hex digits.
    /// Make one with: head -c 32 /dev/urandom > volume.key
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    key_file: Option<PathBuf>,
    /// PKCS#11 volumes: read the token's user PIN from this file.
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
    /// Read the passphrase or PIN from standard input (used by a daemonizing mount for its child).
    #[arg(long, hide = true)]
    secret_stdin: bool,
}

impl SecretArgs {
    fn source(&self) -> SecretSource {
        SecretSource {
            passphrase_file: self.passphrase_file.clone(),
            key_file: self.key_file.clone(),
            stdin: self.secret_stdin,
            pin_file: self.pin_file.clone(),
        }
    }

    /// What resolving the volume's secret would prompt for on the terminal, if anything.
    fn would_prompt(&self, cfg: &volume::VolumeConfig) -> Option<&'static str> {
        let cred =
            |name: &str| std::env::var_os("CREDENTIALS_DIRECTORY").is_some_and(|d| Path::new(&d).join(name).exists());
        if self.secret_stdin {
            return None;
        }
        match &cfg.provider {
            volume::ProviderConfig::Local { .. } => (self.passphrase_file.is_none()
                && self.key_file.is_none()
                && std::env::var_os(PASSPHRASE_ENV).is_none()
                && !cred(CREDENTIAL_NAME))
            .then_some("Passphrase: "),
            volume::ProviderConfig::Pkcs11 { key, .. } => {
                let uri_pin = key.parse::<Pkcs11Uri>().ok().and_then(|u| u.pin_source);
                (self.pin_file.is_none()
                    && uri_pin.is_none()
                    && std::env::var_os(PIN_ENV).is_none()
                    && !cred(PIN_CREDENTIAL))
                .then_some("PKCS#11 PIN: ")
            }
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ProviderArg {
    /// A keyring file sealed by a passphrase or key file (no service needed).
    Local,
    /// A key in a PKCS#11 token (HSM): give --module and --key.
    Pkcs11,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make an empty directory into an encrypted volume (writes envelopefs.toml and a keyring).
    Init {
        /// The backing directory that will hold the encrypted files. Must be empty.
        backing: PathBuf,
        /// Where the key-encryption key lives.
        #[arg(long, value_enum, default_value = "local")]
        provider: ProviderArg,
        /// Plaintext bytes per encrypted block (power of two, 512 B to 1 MiB). Larger blocks
        /// suit large sequential files; small random writes rewrite a whole block.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Bytes reserved at the start of each file for its two header slots.
        #[arg(long, default_value_t = 4096)]
        header_size: u32,
        /// Keep the keyring here instead of inside the backing directory (relative paths are
        /// relative to the backing directory).
        #[arg(long, value_name = "PATH")]
        keyring: Option<PathBuf>,
        /// Argon2id memory cost for a passphrase, in MiB.
        #[arg(long, default_value_t = 64)]
        kdf_memory_mib: u32,
        /// Argon2id iterations for a passphrase.
        #[arg(long, default_value_t = 3)]
        kdf_iterations: u32,
        /// pkcs11: the PKCS#11 module (shared library) of the token.
        #[arg(long, value_name = "PATH")]
        module: Option<PathBuf>,
        /// pkcs11: the KEK as a PKCS#11 URI, e.g. 'pkcs11:token=prod;object=envelopefs-kek'.
        /// Versions live in the token as OBJECT/v1, OBJECT/v2…; v1 is created if missing.
        #[arg(long, value_name = "URI")]
        key: Option<String>,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Key-encryption keys: create (PKCS#11), rotate, status, retire.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Move files to the current KEK. --rewrap (default) re-wraps each header's data key:
    /// cheap, data untouched, safe while mounted. --reencrypt gives each file a new data key
    /// and rewrites its content (for a suspected DEK leak): offline only. Both are
    /// crash-safe and resumable: run again after an interruption.
    Rekey {
        backing: PathBuf,
        /// Re-wrap headers under the current KEK version (the default).
        #[arg(long, conflicts_with = "reencrypt")]
        rewrap: bool,
        /// New data key and full rewrite of each file (temp file, fsync, rename).
        #[arg(long)]
        reencrypt: bool,
        /// Files to work on (backing paths); default: the whole volume.
        paths: Vec<PathBuf>,
        /// Files processed in parallel.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Append one JSON line per key operation to this file.
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Mount a volume. Returns once the mount answers, leaving a daemon behind (or stays in
    /// the foreground with --foreground).
    Mount(MountArgs),
    /// Unmount a mounted volume (waits for nothing: open files keep the old view until closed).
    Umount { mountpoint: PathBuf },
    /// Show an encrypted file's header (file id, key records, generation). Needs no secret
    /// and shows none.
    Inspect {
        /// A file in the backing directory.
        file: PathBuf,
    },
    /// Check that every header and block of a volume authenticates. Writes nothing unless
    /// --repair. Exit status 1 when problems remain.
    Fsck {
        backing: PathBuf,
        /// Rewrite damaged header slots from their good twin, cut torn trailing blocks and a
        /// last block that fails authentication (a torn append). Other blocks that fail
        /// authentication are only reported. Refuses while the volume is mounted.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create version 1 of a KEK inside a PKCS#11 token (sensitive, never extractable).
    Create {
        /// The PKCS#11 module (shared library).
        #[arg(long, value_name = "PATH")]
        module: PathBuf,
        /// The key's PKCS#11 URI, e.g. 'pkcs11:token=prod;object=envelopefs-kek'.
        #[arg(long, value_name = "URI")]
        key: String,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Make a new KEK version current. New files wrap under it; old files keep opening
    /// with the version in their header. A running mount picks it up when remounted.
    Rotate {
        backing: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// List the KEK versions and how many file headers use each.
    Status {
        backing: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Take an old KEK version out of service (local: marked retired; PKCS#11: the key
    /// object is destroyed). Refuses while any header still references it: run
    /// `envelopefs rekey --rewrap` first.
    Retire {
        backing: PathBuf,
        version: u32,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Args)]
struct MountArgs {
    /// The volume's backing directory.
    backing: PathBuf,
    /// An existing empty directory to mount on.
    mountpoint: PathBuf,
    /// Stay in the foreground (for systemd and debugging).
    #[arg(short, long)]
    foreground: bool,
    /// Mount options, comma separated: allow_other, ro, rw, writeback_cache, threads=N,
    /// attr_timeout=S, entry_timeout=S (fstab words such as _netdev, nofail, defaults,
    /// x-systemd.* are accepted and ignored).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Let other users use the mount (as root: files they create are theirs).
    /// The kernel checks permissions (default_permissions is always on).
    #[arg(long)]
    allow_other: bool,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Seconds the kernel may cache attributes.
    #[arg(long, default_value_t = 1.0)]
    attr_timeout: f64,
    /// Seconds the kernel may cache name lookups.
    #[arg(long, default_value_t = 1.0)]
    entry_timeout: f64,
    /// Let the kernel cache writes and send them in pages (faster small writes).
    #[arg(long)]
    writeback_cache: bool,
    /// AES-GCM implementation.
    #[arg(long, default_value = "aws-lc", value_parser = ["aws-lc", "rustcrypto"])]
    crypto: String,
    /// Seconds an unwrapped data key stays cached after it was loaded. Also the bound on how
    /// long files already opened keep working after their KEK is disabled.
    #[arg(long, default_value_t = 300)]
    cache_ttl: u64,
    /// Seconds an unused cached data key survives.
    #[arg(long, default_value_t = 60)]
    cache_tti: u64,
    /// Most data keys cached at once.
    #[arg(long, default_value_t = 4096)]
    cache_max: u64,
    /// Append logs to this file instead of stderr.
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Do not lock the daemon's memory (data keys could then reach swap).
    #[arg(long)]
    no_mlock: bool,
    /// Append one JSON line per key operation (wrap, unwrap) to this file (docs/AUDIT.md).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    #[command(flatten)]
    secret: SecretArgs,
}

fn init_logging(log_file: Option<&Path>) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,fuser=error".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match log_file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening log file {}", p.display()))?;
            builder.with_ansi(false).with_writer(Arc::new(f)).init();
        }
        None if std::env::var_os("ENVELOPEFS_NOTIFY_PARENT").is_some() => {
            builder.with_ansi(false).with_writer(daemon::StderrThenSyslog).init()
        }
        None => builder.with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = match &cli.cmd {
        Cmd::Mount(m) => m.log_file.clone(),
        _ => None,
    };
    if let Err(e) = init_logging(log_file.as_deref()) {
        eprintln!("envelopefs: error: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("envelopefs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Init {
            backing,
            provider,
            block_size,
            header_size,
            keyring,
            kdf_memory_mib,
            kdf_iterations,
            module,
            key,
            secret,
        } => {
            let provider = match provider {
                ProviderArg::Local => volume::ProviderInit::Local {
                    kdf: KdfParams { m_kib: kdf_memory_mib.saturating_mul(1024), t: kdf_iterations, p: 1 },
                    keyring,
                },
                ProviderArg::Pkcs11 => {
                    let uri = key.ok_or_else(|| anyhow!("--provider pkcs11 needs --key URI"))?;
                    let module = module
                        .or_else(|| uri.parse::<Pkcs11Uri>().ok()?.module_path.map(PathBuf::from))
                        .ok_or_else(|| anyhow!("--provider pkcs11 needs --module PATH (or module-path in the URI)"))?;
                    volume::ProviderInit::Pkcs11 { module, uri }
                }
            };
            let opts = InitOptions { block_size, header_size, provider };
            let cfg = volume::init(&backing, &secret.source(), &opts)?;
            println!("Created an envelopefs volume in {}", backing.display());
            println!("  volume id   {}", cfg.volume_id);
            println!("  block size  {} bytes, header {} bytes", cfg.block_size, cfg.header_size);
            match cfg.keyring_path(&backing) {
                Some(k) => {
                    println!("  keyring     {}", k.display());
                    println!("Without the keyring and its passphrase or key file the files cannot be decrypted: back them up.");
                }
                None => println!("  provider    {:?}", cfg.provider),
            }
            println!("Mount it with: envelopefs mount {} MOUNTPOINT", backing.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Mount(args) => mount(args),
        Cmd::Key(k) => key_cmd(k),
        Cmd::Rekey { backing, rewrap: _, reencrypt, paths, jobs, audit_log, secret } => {
            let mode = if reencrypt { rekey::Mode::Reencrypt } else { rekey::Mode::Rewrap };
            let opts = OpenOptions { audit_log, ..OpenOptions::default() };
            let vol = Volume::open(&backing, &secret.source(), &opts)?;
            let _lock = if mode == rekey::Mode::Reencrypt {
                Some(lock_volume(&backing).context("rekey --reencrypt rewrites files: unmount the volume first")?)
            } else {
                None
            };
            if mode == rekey::Mode::Reencrypt {
                let n = rekey::remove_stale_temporaries(&vol.root)?;
                if n > 0 {
                    info!("removed {n} temporary files left by an interrupted re-encryption");
                }
            }
            let files = if paths.is_empty() { rekey::volume_files(&vol.root)? } else { paths };
            let label = if mode == rekey::Mode::Rewrap { "rewrap" } else { "reencrypt" };
            let progress = rekey::Progress::new(files.len() as u64, label);
            let sum = rekey::run(&vol, mode, files, jobs, &|p| progress.tick(p));
            progress.finish();
            for (p, e) in &sum.failed {
                eprintln!("FAILED: {}: {e}", p.display());
            }
            println!(
                "{label}: {} files changed, {} already current, {} failed (KEK version {} is current)",
                sum.changed,
                sum.unchanged,
                sum.failed.len(),
                vol.provider.current_version()?
            );
            Ok(if sum.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Umount { mountpoint } => {
            umount(&mountpoint)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect { file } => {
            envelopefs::check::inspect(&file, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fsck { backing, repair, secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let _lock = if repair {
                Some(lock_volume(&backing).context("fsck --repair needs the volume unmounted")?)
            } else {
                None
            };
            let rep = envelopefs::check::fsck(&vol, repair)?;
            let mut remaining = 0;
            for p in &rep.problems {
                let mark = if p.repaired { "repaired" } else { "PROBLEM" };
                remaining += usize::from(!p.repaired);
                println!("{mark}: {}: {}", p.path.display(), p.what);
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
    }
}

fn key_cmd(cmd: KeyCmd) -> Result<ExitCode> {
    match cmd {
        KeyCmd::Create { module, key, secret } => {
            let uri: Pkcs11Uri = key.parse().map_err(|e: String| anyhow!("--key {key}: {e}"))?;
            let pin = secret.source().resolve_pin(uri.pin_source.as_deref())?;
            let p = Pkcs11Provider::open(&module, &uri, pin, true)?;
            let v = p.current_version()?;
            println!("{}: version {v} is current", uri.key_id());
        }
        KeyCmd::Rotate { backing, secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let v = vol.provider.rotate()?;
            println!("{}: KEK version {v} is now current; new files wrap under it", vol.provider.describe());
            println!("Existing files keep the version they have until `envelopefs rekey`.");
        }
        KeyCmd::Retire { backing, version, secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let usage = envelopefs::check::key_usage(&vol)?;
            if let Some(n) = usage.any_slot.get(&version) {
                bail!("KEK version {version} is still referenced by {n} file headers: run `envelopefs rekey --rewrap` first");
            }
            if usage.unreadable > 0 {
                bail!(
                    "{} file headers could not be read, so they might need version {version}: run fsck first",
                    usage.unreadable
                );
            }
            vol.provider.retire(version)?;
            println!("KEK version {version} retired");
        }
        KeyCmd::Status { backing, secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let usage = envelopefs::check::key_usage(&vol)?;
            let current = vol.provider.current_version().ok();
            println!("{}", vol.provider.describe());
            for v in vol.provider.versions()? {
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
                if !vol.provider.versions()?.iter().any(|i| i.version == *v) {
                    println!("  version {v} (MISSING from the key store): {n} files");
                }
            }
            println!("  {} files without a header yet (empty)", usage.empty);
            let stale: u64 = usage.any_slot.iter().filter(|(v, _)| Some(**v) != current).map(|(_, n)| n).sum();
            if stale > 0 {
                println!(
                    "  {stale} files still reference an older version in a header slot: `envelopefs rekey --rewrap`"
                );
            }
            if usage.unreadable > 0 {
                println!("  {} files whose header could not be read (run fsck)", usage.unreadable);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Unmount, then wait (bounded) for the daemon to let go of the volume, so that a mount
/// right after `umount` does not find the volume still locked.
fn umount(mountpoint: &Path) -> Result<()> {
    let backing = daemon::mount_source(mountpoint);
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EPERM) {
            bail!("unmounting {}: {err}", mountpoint.display());
        }
        let st = Command::new("fusermount3").arg("-u").arg(mountpoint).status().context("running fusermount3 -u")?;
        if !st.success() {
            bail!("fusermount3 -u {} failed", mountpoint.display());
        }
    }
    if let Some(backing) = backing {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while volume_locked(&backing) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn volume_locked(backing: &Path) -> bool {
    let Ok(f) = std::fs::File::open(backing.join(CONFIG_NAME)) else {
        return false;
    };
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
    if unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        return false;
    }
    true
}

fn mount_options(args: &MountArgs) -> Result<MountOptions> {
    let mut o = MountOptions {
        allow_other: args.allow_other,
        read_only: args.read_only,
        threads: args.threads,
        attr_timeout: Duration::from_secs_f64(args.attr_timeout),
        entry_timeout: Duration::from_secs_f64(args.entry_timeout),
        writeback_cache: args.writeback_cache,
        fsname: args.backing.display().to_string(),
        ..MountOptions::default()
    };
    for opt in args.options.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()) {
        let (k, v) = opt.split_once('=').map_or((opt, None), |(k, v)| (k, Some(v)));
        let num = |v: Option<&str>| -> Result<f64> {
            v.ok_or_else(|| anyhow!("mount option {k} needs a value"))?
                .parse()
                .map_err(|_| anyhow!("mount option {opt}: not a number"))
        };
        match k {
            "allow_other" => o.allow_other = true,
            "ro" => o.read_only = true,
            "rw" => o.read_only = false,
            "writeback_cache" => o.writeback_cache = true,
            "threads" => o.threads = num(v)? as usize,
            "attr_timeout" => o.attr_timeout = Duration::from_secs_f64(num(v)?),
            "entry_timeout" => o.entry_timeout = Duration::from_secs_f64(num(v)?),
            "default_permissions"
            | "defaults"
            | "_netdev"
            | "nofail"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "exec"
            | "noexec"
            | "suid"
            | "nosuid"
            | "dev"
            | "nodev"
            | "atime"
            | "noatime"
            | "relatime" => {}
            k if k.starts_with("x-systemd.") || k.starts_with("x-") || k.starts_with("comment=") => {}
            _ => bail!("unknown mount option {opt:?} (see envelopefs mount --help)"),
        }
    }
    Ok(o)
}

fn mount(mut args: MountArgs) -> Result<ExitCode> {
    args.backing = std::fs::canonicalize(&args.backing)
        .with_context(|| format!("backing directory {} does not exist", args.backing.display()))?;
    let opts = mount_options(&args)?;
    let meta = std::fs::metadata(&args.mountpoint)
        .with_context(|| format!("mount point {} does not exist", args.mountpoint.display()))?;
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", args.mountpoint.display());
    }
    if daemon::is_mount_point(&args.mountpoint) {
        bail!("mount point {} is busy: something is already mounted there", args.mountpoint.display());
    }
    // Fail fast (and in the caller's terminal) on a directory that is not a volume.
    volume::VolumeConfig::load(&args.backing)?;
    if !args.foreground {
        return daemonize(&args);
    }
    let backend: Backend = args.crypto.parse().map_err(|e: String| anyhow!(e))?;
    let cache = CacheConfig {
        ttl: Duration::from_secs(args.cache_ttl),
        tti: Duration::from_secs(args.cache_tti),
        max_entries: args.cache_max,
    };
    let vol = Volume::open(
        &args.backing,
        &args.secret.source(),
        &OpenOptions { backend, cache, audit_log: args.audit_log.clone() },
    )?;
    let _lock = lock_volume(&args.backing)?;
    daemon::harden_memory(!args.no_mlock);
    daemon::raise_fd_limit();
    let fs = EncryptedFs::new(Arc::new(vol))?;
    let mut session = envelopefs::mount::mount(fs, &args.mountpoint, opts)
        .with_context(|| format!("mounting on {}", args.mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    let mnt = args.mountpoint.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            info!("signal {sig}: unmounting {}", mnt.display());
            daemon::sd_notify("STOPPING=1");
            if let Err(e) = unmounter.unmount() {
                warn!("unmount of {} failed: {e}; unmounting lazily", mnt.display());
                if let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()) {
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    });
    info!("mounted {} on {}", args.backing.display(), args.mountpoint.display());
    daemon::announce_ready(std::env::var_os("ENVELOPEFS_NOTIFY_PARENT").is_some());
    session.run().context("serving the mount")?;
    info!("unmounted {}", args.mountpoint.display());
    Ok(ExitCode::SUCCESS)
}

/// One daemon per volume: two would each cache keys and headers the other changes.
fn lock_volume(backing: &Path) -> Result<std::fs::File> {
    let f = std::fs::File::open(backing.join(CONFIG_NAME))?;
    if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("{} is already mounted by another envelopefs process", backing.display());
    }
    Ok(f)
}

/// Start the same command with --foreground in a new session and wait until it says the
/// mount is ready (or exits with an error, which it has printed on our stderr).
fn daemonize(args: &MountArgs) -> Result<ExitCode> {
    let cfg = volume::VolumeConfig::load(&args.backing)?;
    let prompt = args.secret.would_prompt(&cfg);
    let passphrase = match prompt {
        Some(p) => Some(zeroize::Zeroizing::new(rpassword::prompt_password(p).context("reading secret")?.into_bytes())),
        None => None,
    };
    let mut child_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    child_args.push("--foreground".into());
    if prompt.is_some() {
        child_args.push("--secret-stdin".into());
    }
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(&child_args)
        .env("ENVELOPEFS_NOTIFY_PARENT", "1")
        .stdin(if prompt.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped());
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    if let Some(pw) = passphrase {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&pw).context("passing the passphrase to the daemon")?;
    }
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        if line.map(|l| l == daemon::READY_LINE).unwrap_or(false) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let status = child.wait()?;
    Ok(ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8))
}
