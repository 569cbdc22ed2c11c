//! The `envelopefs` command line.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::{info, warn};

use envelopefs::control;
use envelopefs::crypto::Backend;
use envelopefs::daemon;
use envelopefs::error::Class;
use envelopefs::fs::EncryptedFs;
use envelopefs::keys::cache::CacheConfig;
use envelopefs::keys::local::KdfParams;
use envelopefs::keys::pkcs11::{Pkcs11Provider, Pkcs11Uri};
use envelopefs::keys::secret::{SecretSource, CREDENTIAL_NAME, PIN_CREDENTIAL};
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
--key-file, --passphrase-file, the systemd credential 'envelopefs.passphrase', or a prompt on the \
terminal (never the environment).\n\n\
The backing directory is untrusted: what code to load, which KMS key and endpoint to use come \
from this host (init records them; `envelopefs trust` pins them on a new host).\n\n\
Exit status: 0 ok; 1 failure (fsck: problems remain); 2 usage; 10 not a volume; 11 wrong \
passphrase or key file; 12 mount point missing or busy; 13 key store unreachable; 15 settings \
this host does not trust; 16 volume files tampered with or damaged; 17 volume in use."
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
        // Without a terminal there is nobody to ask: the daemon says what is missing.
        if self.secret_stdin || !std::io::stdin().is_terminal() {
            return None;
        }
        match &cfg.provider {
            volume::ProviderConfig::Local { .. } => {
                (self.passphrase_file.is_none() && self.key_file.is_none() && !cred(CREDENTIAL_NAME))
                    .then_some("Passphrase: ")
            }
            volume::ProviderConfig::AwsKms { .. } => None,
            volume::ProviderConfig::Pkcs11 { .. } => {
                (self.pin_file.is_none() && !cred(PIN_CREDENTIAL)).then_some("PKCS#11 PIN: ")
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
    /// An AWS KMS key: give --key-id (key id, ARN or alias/...).
    AwsKms,
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
        /// aws-kms: the KMS key (id, ARN, or alias/NAME). Its ARN is stored.
        #[arg(long, value_name = "KEY")]
        key_id: Option<String>,
        /// aws-kms: region (default: the usual AWS settings).
        #[arg(long)]
        region: Option<String>,
        /// aws-kms: endpoint URL (a VPC endpoint, or a local KMS-compatible server).
        #[arg(long, value_name = "URL")]
        kms_endpoint: Option<String>,
        /// aws-kms: wrap each file's DEK locally under an intermediate key that KMS wraps
        /// (S3-Bucket-Key style, rotated every 15 min): creates and opens make no KMS call
        /// per file. The per-file encryption context then binds the intermediate key, and
        /// the file binding is local (AAD). Default: one KMS call per file.
        #[arg(long)]
        kms_intermediate_key: bool,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Key-encryption keys: create (PKCS#11), rotate, status, retire.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Pin a volume's key-store settings on this host: the PKCS#11 module to load, the KMS
    /// key ARNs and endpoint, the keyring's place. `init` does this for the host that made
    /// the volume; on another host run this once. It shows what it will pin, asks (or takes
    /// --yes), authenticates the volume with those settings, and only then records them
    /// under /var/lib/envelopefs/trust (or $ENVELOPEFS_TRUST_DIR).
    Trust {
        backing: PathBuf,
        /// Pin without asking.
        #[arg(long)]
        yes: bool,
        /// pkcs11: the module the volume names, confirmed by you (needed when it is not
        /// registered with p11-kit on this host).
        #[arg(long, value_name = "PATH")]
        module: Option<PathBuf>,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Move a format-1 volume to format 2 (authenticated config, pinned keys). Offline;
    /// files are untouched. Older envelopefs versions cannot open the volume afterwards.
    Upgrade {
        backing: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
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
        /// Move the volume to another key: a KMS key (ReEncrypt), e.g. alias/app/next, or a
        /// PKCS#11 key URI in the same token. The config names the new key at once; files
        /// move as rekey proceeds; disable or delete the old key when `key status` shows
        /// none left on it.
        #[arg(long, value_name = "KEY", requires = "rewrap")]
        to_key: Option<String>,
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
    /// Ask a running mount how it is doing: uptime, open files, DEK cache, key-store calls,
    /// errors.
    Status {
        mountpoint: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Install as a systemd service: the unit template, /etc/envelopefs/NAME.toml, and the
    /// mount helper for `mount -t fuse.envelopefs` and fstab.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout: envelopefs man | man -l -
    Man,
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
enum ServiceCmd {
    /// Write envelopefs@.service, /etc/envelopefs/NAME.toml and /sbin/mount.fuse.envelopefs,
    /// then print how to enable the unit.
    Install {
        /// The instance name: envelopefs@NAME.service, /etc/envelopefs/NAME.toml.
        name: String,
        #[arg(long)]
        backing: PathBuf,
        #[arg(long)]
        mountpoint: PathBuf,
        /// Mount options for the instance, as for `mount -o` (e.g. key_file=/etc/envelopefs/NAME.key,allow_other).
        #[arg(short = 'o', default_value = "")]
        options: String,
        /// Install under this root instead of / (for packaging and tests).
        #[arg(long, default_value = "/")]
        root: PathBuf,
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
    /// Make a new KEK version current. New files wrap under it (running mounts too: they
    /// pick up the new version within seconds); old files keep opening with the version
    /// in their header until `rekey --rewrap`.
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
    /// Take an old KEK version out of service for good (local: its key is erased from the
    /// keyring; PKCS#11: the key object is destroyed). Running mounts stop unwrapping with
    /// it at once. Refuses while any header still references it: run
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
    backing: Option<PathBuf>,
    /// An existing empty directory to mount on.
    mountpoint: Option<PathBuf>,
    /// Read backing, mountpoint and options from a TOML file (what the systemd unit uses):
    /// backing = "...", mountpoint = "...", options = "allow_other,key_file=..."
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Stay in the foreground (for systemd and debugging).
    #[arg(short, long)]
    foreground: bool,
    /// Mount options, comma separated, for fstab and `mount -t fuse.envelopefs`: allow_other,
    /// ro, rw, no_writeback_cache, threads=N, attr_timeout=S, entry_timeout=S, key_file=F,
    /// passphrase_file=F, pin_file=F, log_file=F, audit_log=F, cache_ttl=S, cache_tti=S,
    /// cache_max=N, crypto=aws-lc|rustcrypto (fstab words such as _netdev, nofail, defaults,
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
    /// Let the kernel cache writes and send them in pages (the default; kept for scripts).
    #[arg(long, hide = true)]
    writeback_cache: bool,
    /// Send every write straight to the daemon instead of through the kernel's writeback
    /// cache (slower small writes; see docs/PERFORMANCE.md).
    #[arg(long)]
    no_writeback_cache: bool,
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
    /// aws-kms: wrapped data keys generated ahead for new files (default 256; 0 = none).
    #[arg(long, value_name = "N")]
    kms_pool: Option<usize>,
    /// aws-kms: seconds one KMS call may take, retries included (default 20); an outage
    /// longer than this is EIO.
    #[arg(long, value_name = "S")]
    kms_timeout: Option<f64>,
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
                .mode(0o640)
                .custom_flags(libc::O_NOFOLLOW)
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

/// The arguments as parsed (after mount-helper rewriting), for the daemon's child.
static ARGS: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();

const SUBCOMMANDS: [&str; 13] = [
    "init",
    "mount",
    "umount",
    "key",
    "trust",
    "upgrade",
    "rekey",
    "status",
    "inspect",
    "fsck",
    "service",
    "completions",
    "man",
];

/// mount(8) runs `mount.fuse.envelopefs SRC MNT [-sfnv] [-o OPTS]`, and mount.fuse3 runs
/// `envelopefs SRC MNT -o OPTS`: both become `envelopefs mount SRC MNT -o OPTS`.
fn helper_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let argv0 = args.first().map(|a| Path::new(a).file_name().unwrap_or_default().to_string_lossy().into_owned());
    let as_helper = argv0.as_deref().is_some_and(|n| n.starts_with("mount.fuse.envelopefs") || n == "mount.envelopefs");
    let looks_like_mount = args.len() >= 3 && {
        let first = args[1].to_string_lossy();
        !first.starts_with('-') && !SUBCOMMANDS.contains(&first.as_ref()) && Path::new(&args[1]).is_dir()
    };
    if !as_helper && !looks_like_mount {
        return args;
    }
    let mut out = vec!["envelopefs".into(), "mount".into()];
    let mut it = args.into_iter().skip(1);
    while let Some(a) = it.next() {
        match a.to_string_lossy().as_ref() {
            "-o" => out.extend(["-o".into(), it.next().unwrap_or_default()]),
            "-t" => drop(it.next()),
            "-s" | "-f" | "-n" | "-v" => {}
            _ => out.push(a),
        }
    }
    out
}

fn main() -> ExitCode {
    let args = helper_args(std::env::args_os().collect());
    ARGS.set(args.clone()).ok();
    let mut cli = Cli::parse_from(args);
    // Before any secret is read, in every command: no core dumps, no ptrace by others, and
    // pages locked in RAM (a mount may opt out with --no-mlock; others warn nowhere).
    let lock = !matches!(&cli.cmd, Cmd::Mount(m) if m.no_mlock);
    let hardened = daemon::harden_memory(lock);
    if let Cmd::Mount(m) = &mut cli.cmd {
        if let Err(e) = resolve_mount_args(m) {
            eprintln!("envelopefs: error: {e:#}");
            return ExitCode::from(Class::Usage.exit_code());
        }
    }
    let log_file = match &cli.cmd {
        Cmd::Mount(m) => m.log_file.clone(),
        _ => None,
    };
    if let Err(e) = init_logging(log_file.as_deref()) {
        eprintln!("envelopefs: error: {e:#}");
        return ExitCode::FAILURE;
    }
    if let (Err(e), Cmd::Mount(_)) = (&hardened, &cli.cmd) {
        warn!("{e}");
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("envelopefs: error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code of a failure: its class, where the library gave one (see --help).
fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain()
        .filter_map(|c| c.downcast_ref::<envelopefs::error::Error>())
        .find_map(|e| e.class())
        .map_or(1, |c| c.exit_code())
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
            key_id,
            region,
            kms_endpoint,
            kms_intermediate_key,
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
                ProviderArg::AwsKms => {
                    let key_id = key_id.ok_or_else(|| anyhow!("--provider aws-kms needs --key-id"))?;
                    let mut s = envelopefs::keys::aws_kms::KmsSettings::new(&key_id);
                    s.region = region;
                    s.endpoint = kms_endpoint;
                    s.pool_size = 0;
                    s.intermediate_key = kms_intermediate_key;
                    volume::ProviderInit::AwsKms(s)
                }
            };
            let opts = InitOptions { block_size, header_size, provider, ..InitOptions::default() };
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
        Cmd::Trust { backing, yes, module, secret } => trust_cmd(&backing, yes, module.as_deref(), &secret.source()),
        Cmd::Upgrade { backing, secret } => {
            let _lock = lock_volume(&backing).context("upgrade rewrites the config: unmount the volume first")?;
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            if vol.upgrade()? {
                println!("{} is now format {}: its config is authenticated", backing.display(), vol.config.format);
            } else {
                println!("{} is already format {}", backing.display(), vol.config.format);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { mountpoint, json } => {
            let st = control::query(&mountpoint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("{} on {} (pid {}, up {} s)", st.backing, st.mountpoint, st.pid, st.uptime_secs);
                println!("  key store      {}", st.provider);
                println!("  open files     {}", st.open_files);
                println!(
                    "  DEK cache      {} keys, {} hits, {} misses ({:.0}% hit rate)",
                    st.dek_cache_entries,
                    st.dek_cache_hits,
                    st.dek_cache_misses,
                    st.dek_cache_hit_rate * 100.0
                );
                println!("  key-store calls {} ({} failed)", st.provider_calls, st.provider_errors);
                println!("  errors         {}", st.errors);
                if let (Some(e), Some(ago)) = (&st.last_error, st.last_error_secs_ago) {
                    println!("  last error     {ago} s ago: {e}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Service(ServiceCmd::Install { name, backing, mountpoint, options, root }) => {
            service_install(&name, &backing, &mountpoint, &options, &root)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "envelopefs",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rekey { backing, rewrap: _, reencrypt, paths, jobs, to_key, audit_log, secret } => {
            let mode = if reencrypt { rekey::Mode::Reencrypt } else { rekey::Mode::Rewrap };
            let opts = OpenOptions { audit_log, ..OpenOptions::default() };
            let vol = match to_key {
                None => Volume::open(&backing, &secret.source(), &opts)?,
                Some(k) => move_to_key(&backing, &k, &secret.source(), &opts)?,
            };
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

/// `rekey --to-key`: point the volume at another KMS key or PKCS#11 key, then rewrap
/// moves the files (records under the old key keep unwrapping meanwhile). The admin names
/// the new key here, so this host's trust record follows.
fn move_to_key(backing: &Path, key: &str, secret: &SecretSource, opts: &OpenOptions) -> Result<Volume> {
    let mut vol = Volume::open(backing, secret, opts)?;
    let volume_id = vol.volume_id;
    let (dest, settings): (Arc<dyn KeyProvider>, volume::ProviderConfig) = match vol.config.provider.clone() {
        volume::ProviderConfig::AwsKms { key_id, mut previous_key_ids, region, endpoint, intermediate_key } => {
            let mut settings = envelopefs::keys::aws_kms::KmsSettings::new(key);
            settings.intermediate_key = intermediate_key;
            settings.region.clone_from(&region);
            settings.endpoint.clone_from(&endpoint);
            settings.pool_size = 0;
            // Records still under the current (soon previous) key must keep unwrapping.
            settings.allowed_key_ids = std::iter::once(key_id.clone()).chain(previous_key_ids.clone()).collect();
            let p = envelopefs::keys::aws_kms::AwsKmsProvider::open(&settings, volume_id)?;
            let arn = p.arn().to_owned();
            if arn != key_id && !previous_key_ids.contains(&key_id) {
                previous_key_ids.push(key_id);
            }
            previous_key_ids.retain(|k| *k != arn);
            let cfg =
                volume::ProviderConfig::AwsKms { key_id: arn, previous_key_ids, region, endpoint, intermediate_key };
            (Arc::new(p), cfg)
        }
        volume::ProviderConfig::Pkcs11 { module, key: old, objects, mut previous_keys } => {
            let uri: Pkcs11Uri = key.parse().map_err(|e: String| anyhow!("--to-key {key}: {e}"))?;
            if uri.pin_source.is_some() || uri.module_path.is_some() {
                bail!("--to-key {key}: name the key only (the PIN comes from --pin-file, the module from the volume)");
            }
            let pin = secret.resolve_pin(None)?;
            let p = Pkcs11Provider::open(Path::new(&module), &uri, pin, true)?;
            let new_id = uri.key_id();
            if new_id != old && !previous_keys.contains(&old) {
                previous_keys.push(old);
            }
            previous_keys.retain(|k| *k != new_id);
            p.set_previous_keys(previous_keys.clone());
            if vol.config.format >= 2 {
                let current = p.label(p.current_version()?);
                p.pin_objects(objects.iter().cloned().chain([current]).collect())?;
            }
            let cfg = volume::ProviderConfig::Pkcs11 { module, key: new_id, objects, previous_keys };
            (Arc::new(p), cfg)
        }
        volume::ProviderConfig::Local { .. } => {
            bail!("--to-key is for aws-kms and pkcs11 volumes; a local keyring rotates with `key rotate`")
        }
    };
    let before = vol.config.provider.clone();
    vol.switch_provider(dest, settings)?;
    if vol.config.provider != before {
        info!("the volume now names {}; rekey moves its files", vol.provider.kek_id());
    }
    Ok(vol)
}

/// `envelopefs trust`: show what would be pinned, ask, authenticate with it, pin it.
fn trust_cmd(backing: &Path, yes: bool, module: Option<&Path>, secret: &SecretSource) -> Result<ExitCode> {
    let root = std::fs::canonicalize(backing).with_context(|| format!("backing directory {}", backing.display()))?;
    let cfg = volume::VolumeConfig::load(&root)?;
    let store = envelopefs::trust::TrustStore::host();
    let existing = store.get(&cfg.volume_id)?;
    let rec = envelopefs::trust::candidate(&root, &cfg, module, existing.as_ref())?;
    println!("{} asks this host to trust:", root.display());
    for line in envelopefs::trust::describe(&rec) {
        println!("  {line}");
    }
    if cfg.format < 2 {
        println!("  note: format 1: the config is not authenticated; `envelopefs upgrade` makes it format 2");
    }
    if let Some(old) = &existing {
        for d in old.provider.differences(&cfg.provider) {
            println!("  changed: {d}");
        }
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("not pinned: confirm with --yes (no terminal to ask on)");
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
    println!("pinned in {}", store.dir().display());
    Ok(ExitCode::SUCCESS)
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
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let v = vol.provider.rotate()?;
            vol.update_config(|_| {})?;
            println!("{}: KEK version {v} is now current; new files wrap under it", vol.provider.describe());
            println!("Existing files keep the version they have until `envelopefs rekey`.");
        }
        KeyCmd::Retire { backing, version, secret } => {
            let mut vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            if vol.config.volume_key.as_ref().is_some_and(|k| k.kek_version == version) {
                bail!("KEK version {version} still wraps the volume key: run `envelopefs key rotate` first");
            }
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
            vol.update_config(|_| {})?;
            println!("KEK version {version} retired: its key is gone");
        }
        KeyCmd::Status { backing, secret } => {
            let vol = Volume::open(&backing, &secret.source(), &OpenOptions::default())?;
            let usage = envelopefs::check::key_usage(&vol)?;
            let current = vol.provider.current_version().ok();
            println!("{}", vol.provider.describe());
            if volume_locked(&backing) {
                println!("  note: the volume is mounted; a mount started before a rotation or --to-key may still");
                println!("  wrap new files under the old key until it is remounted: remount before retiring a key");
            }
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
            if usage.other_key > 0 {
                println!("  {} files still wrap under another key: `envelopefs rekey --rewrap`", usage.other_key);
            }
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
    if !backing.join(CONFIG_NAME).exists() {
        return false;
    }
    let Ok(f) = std::fs::File::open(backing) else {
        return false;
    };
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
    if unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        return false;
    }
    true
}

/// `mount --config FILE`: one mount, as a systemd unit instance describes it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MountConfigFile {
    backing: PathBuf,
    mountpoint: PathBuf,
    #[serde(default)]
    options: String,
}

/// Fold --config and -o options into the arguments (flags given on the command line win
/// over nothing; -o words set the same fields as their flags).
fn resolve_mount_args(a: &mut MountArgs) -> Result<()> {
    if let Some(path) = &a.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: MountConfigFile = toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e.message()))?;
        a.backing.get_or_insert(c.backing);
        a.mountpoint.get_or_insert(c.mountpoint);
        a.options.insert(0, c.options);
    }
    let words: Vec<String> =
        a.options.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    for opt in &words {
        let (k, v) = opt.split_once('=').map_or((opt.as_str(), None), |(k, v)| (k, Some(v)));
        let val = || v.ok_or_else(|| anyhow!("mount option {k} needs a value"));
        let num = || -> Result<f64> { val()?.parse().map_err(|_| anyhow!("mount option {opt}: not a number")) };
        let path = || val().map(PathBuf::from);
        match k {
            "allow_other" => a.allow_other = true,
            "ro" => a.read_only = true,
            "rw" => a.read_only = false,
            "writeback_cache" => a.no_writeback_cache = false,
            "no_writeback_cache" => a.no_writeback_cache = true,
            "threads" => a.threads = num()? as usize,
            "attr_timeout" => a.attr_timeout = num()?,
            "entry_timeout" => a.entry_timeout = num()?,
            "cache_ttl" => a.cache_ttl = num()? as u64,
            "cache_tti" => a.cache_tti = num()? as u64,
            "cache_max" => a.cache_max = num()? as u64,
            "crypto" => a.crypto = val()?.to_owned(),
            "key_file" => a.secret.key_file = Some(path()?),
            "passphrase_file" => a.secret.passphrase_file = Some(path()?),
            "pin_file" => a.secret.pin_file = Some(path()?),
            "log_file" => a.log_file = Some(path()?),
            "audit_log" => a.audit_log = Some(path()?),
            "kms_pool" => a.kms_pool = Some(num()? as usize),
            "kms_timeout" => a.kms_timeout = Some(num()?),
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
            | "relatime"
            | "subtype"
            | "fsname" => {}
            k if k.starts_with("x-") || k.starts_with("comment=") => {}
            _ => bail!("unknown mount option {opt:?} (see envelopefs mount --help)"),
        }
    }
    if a.backing.is_none() || a.mountpoint.is_none() {
        bail!("mount needs BACKING and MOUNTPOINT (or --config FILE)");
    }
    Ok(())
}

fn mount_options(args: &MountArgs) -> MountOptions {
    MountOptions {
        allow_other: args.allow_other,
        read_only: args.read_only,
        threads: args.threads,
        attr_timeout: Duration::from_secs_f64(args.attr_timeout),
        entry_timeout: Duration::from_secs_f64(args.entry_timeout),
        writeback_cache: !args.no_writeback_cache,
        fsname: backing(args).display().to_string(),
        ..MountOptions::default()
    }
}

fn backing(a: &MountArgs) -> &Path {
    a.backing.as_deref().expect("resolved")
}

fn mountpoint(a: &MountArgs) -> &Path {
    a.mountpoint.as_deref().expect("resolved")
}

fn mount(mut args: MountArgs) -> Result<ExitCode> {
    let b = backing(&args).to_owned();
    args.backing =
        Some(std::fs::canonicalize(&b).with_context(|| format!("backing directory {} does not exist", b.display()))?);
    let opts = mount_options(&args);
    let mnt_err = |errno, why: &str| {
        envelopefs::error::Error::new(errno, format!("mount point {} {why}", mountpoint(&args).display()))
            .with_class(Class::Mountpoint)
    };
    let meta = std::fs::metadata(mountpoint(&args)).map_err(|_| mnt_err(libc::ENOENT, "does not exist"))?;
    if !meta.is_dir() {
        return Err(mnt_err(libc::ENOTDIR, "is not a directory").into());
    }
    if daemon::is_mount_point(mountpoint(&args)) {
        return Err(mnt_err(libc::EBUSY, "is busy: something is already mounted there").into());
    }
    // Fail fast (and in the caller's terminal) on a directory that is not a volume.
    volume::VolumeConfig::load(backing(&args))?;
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
        backing(&args),
        &args.secret.source(),
        &OpenOptions {
            backend,
            cache,
            audit_log: args.audit_log.clone(),
            kms_pool: Some(args.kms_pool.unwrap_or(envelopefs::keys::aws_kms::DEFAULT_POOL)),
            kms_timeout: args.kms_timeout.map(Duration::from_secs_f64),
            ..OpenOptions::default()
        },
    )?;
    let _lock = lock_volume(backing(&args))?;
    daemon::raise_fd_limit();
    let fs = Arc::new(EncryptedFs::new(Arc::new(vol))?);
    let mut session = envelopefs::mount::mount(fs.clone(), mountpoint(&args), opts)
        .with_context(|| format!("mounting on {}", mountpoint(&args).display()))?;
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    let mnt = mountpoint(&args).to_owned();
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
    let status = status_fn(fs, backing(&args), mountpoint(&args));
    // Removed when this function returns, that is once the mount is gone.
    let _socket = match control::serve(mountpoint(&args), status) {
        Ok(s) => {
            info!("status socket {}", s.path().display());
            Some(s)
        }
        Err(e) => {
            warn!("no status socket: {e}");
            None
        }
    };
    // Ready means "answers": stat the mount point through the running session first.
    let (probe, mnt) = (mountpoint(&args).to_owned(), mountpoint(&args).display().to_string());
    let back = backing(&args).display().to_string();
    let sock = _socket.as_ref().map(|s| s.path().to_owned());
    std::thread::spawn(move || match std::fs::metadata(&probe) {
        Ok(_) => {
            info!("mounted {back} on {mnt}");
            daemon::announce_ready(std::env::var_os("ENVELOPEFS_NOTIFY_PARENT").is_some());
        }
        Err(e) => {
            tracing::error!("the new mount does not answer a stat: {e}; giving up");
            if let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) {
                // SAFETY: `c` is NUL-terminated and outlives the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            // exit() runs no destructors: the socket this process bound goes by hand.
            if let Some(p) = sock {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(1);
        }
    });
    session.run().context("serving the mount")?;
    info!("unmounted {}", mountpoint(&args).display());
    Ok(ExitCode::SUCCESS)
}

fn status_fn(fs: Arc<EncryptedFs>, backing: &Path, mnt: &Path) -> Arc<dyn Fn() -> control::Status + Send + Sync> {
    use std::sync::atomic::Ordering::Relaxed;
    let (backing, mountpoint) = (backing.display().to_string(), mnt.display().to_string());
    let started = std::time::Instant::now();
    Arc::new(move || {
        let v = fs.volume();
        let (hits, misses) = (v.cache.stats.hits.load(Relaxed), v.cache.stats.misses.load(Relaxed));
        let last = fs.stats.last_error.lock().unwrap().clone();
        control::Status {
            pid: std::process::id(),
            backing: backing.clone(),
            mountpoint: mountpoint.clone(),
            provider: v.provider.describe(),
            uptime_secs: started.elapsed().as_secs(),
            open_files: fs.open_files(),
            dek_cache_entries: v.cache.entry_count(),
            dek_cache_hits: hits,
            dek_cache_misses: misses,
            dek_cache_hit_rate: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            provider_calls: v.provider_calls.load(Relaxed),
            provider_errors: v.provider_errors.load(Relaxed),
            errors: fs.stats.errors.load(Relaxed),
            last_error_secs_ago: last.as_ref().and_then(|(t, _)| t.elapsed().ok()).map(|d| d.as_secs()),
            last_error: last.map(|(_, e)| e),
        }
    })
}

const UNIT_TEMPLATE: &str = include_str!("../systemd/envelopefs@.service");

fn service_install(name: &str, backing: &Path, mountpoint: &Path, options: &str, root: &Path) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("instance name {name:?}: use letters, digits, '-', '_' and '.'");
    }
    volume::VolumeConfig::load(backing)?;
    let exe = std::env::current_exe()?;
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    let write = |path: PathBuf, text: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        println!("wrote {}", path.display());
        Ok(())
    };
    let conf = format!(
        "# envelopefs@{name}.service: `envelopefs mount --config` reads this.\nbacking = {:?}\nmountpoint = {:?}\noptions = {:?}\n",
        std::fs::canonicalize(backing)?.display().to_string(),
        mountpoint.display().to_string(),
        options
    );
    write(under(&format!("/etc/envelopefs/{name}.toml")), &conf, 0o600)?;
    let unit = UNIT_TEMPLATE.replace("/usr/local/bin/envelopefs", &exe.display().to_string());
    write(under("/etc/systemd/system/envelopefs@.service"), &unit, 0o644)?;
    let helper = under("/sbin/mount.fuse.envelopefs");
    std::fs::create_dir_all(helper.parent().unwrap())?;
    let _ = std::fs::remove_file(&helper);
    std::os::unix::fs::symlink(&exe, &helper).with_context(|| format!("linking {}", helper.display()))?;
    println!("linked {} -> {}", helper.display(), exe.display());
    println!("Now: systemctl daemon-reload && systemctl enable --now envelopefs@{name}");
    println!("Units that need it: RequiresMountsFor={}", mountpoint.display());
    Ok(())
}

/// One daemon per volume: two would each cache keys and headers the other changes.
/// The lock is on the backing directory itself, which nothing ever replaces (the config
/// file is replaced by rename when `rekey --to-key` updates it).
fn lock_volume(backing: &Path) -> Result<std::fs::File> {
    volume::VolumeConfig::load(backing)?;
    let f = std::fs::File::open(backing)?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(envelopefs::error::Error::new(
            libc::EBUSY,
            format!("{} is in use: mounted (or being repaired) by another envelopefs process", backing.display()),
        )
        .with_class(Class::Busy)
        .into());
    }
    Ok(f)
}

/// Start the same command with --foreground in a new session and wait until it says the
/// mount is ready (or exits with an error, which it has printed on our stderr).
fn daemonize(args: &MountArgs) -> Result<ExitCode> {
    let cfg = volume::VolumeConfig::load(backing(args))?;
    let prompt = args.secret.would_prompt(&cfg);
    let passphrase = match prompt {
        Some(p) => Some(zeroize::Zeroizing::new(rpassword::prompt_password(p).context("reading secret")?.into_bytes())),
        None => None,
    };
    let mut child_args: Vec<std::ffi::OsString> = ARGS.get().expect("set in main").iter().skip(1).cloned().collect();
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
