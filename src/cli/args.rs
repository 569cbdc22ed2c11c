//! The command line's shape: every command, flag and help text (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use super::key_args::{KeyCmd, NewSlotArgs, NewSlotKind, SlotCmd};
use crate::daemon::options::MountSettings;
use crate::keys::secret::SecretSource;

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
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The volume's secret, for the commands that make volumes or change keys.
#[derive(Args, Clone, Default)]
pub struct KeySecretArgs {
    /// Read the keyring passphrase from this file (one trailing newline is ignored).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Unlock the keyring with a key file: 32 random bytes, or 64 hex digits.
    /// Make one with: head -c 32 /dev/urandom > volume.key
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// PKCS#11 volumes: read the token's user PIN from this file.
    #[arg(long, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// Read the passphrase or PIN from standard input (used by a daemonizing mount for its child).
    #[arg(long, hide = true)]
    pub secret_stdin: bool,
}

/// The volume's secret, or its offline recovery key, for the commands that read a volume.
#[derive(Args, Clone, Default)]
pub struct SecretArgs {
    #[command(flatten)]
    pub key: KeySecretArgs,
    /// Open the volume with only its offline recovery key (an age identity file,
    /// AGE-SECRET-KEY-1…), for the day its key stores are gone. A mount is then read-only.
    #[arg(long, value_name = "FILE")]
    pub recovery_key: Option<PathBuf>,
    /// With --recovery-key on a host that has no record of the volume: its volume check
    /// value (shown by `envelopefs key slot list`), proving the volume is the one you own.
    #[arg(long, value_name = "HEX", requires = "recovery_key")]
    pub volume_check: Option<String>,
}

impl KeySecretArgs {
    pub fn source(&self) -> SecretSource {
        SecretSource {
            passphrase_file: self.passphrase_file.clone(),
            key_file: self.key_file.clone(),
            stdin: self.secret_stdin,
            pin_file: self.pin_file.clone(),
            ..Default::default()
        }
    }
}

impl SecretArgs {
    pub fn source(&self) -> SecretSource {
        SecretSource {
            recovery_key: self.recovery_key.clone(),
            volume_check: self.volume_check.clone(),
            ..self.key.source()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ProviderArg {
    /// A keyring file sealed by a passphrase or key file (no service needed).
    Local,
    /// A key in a PKCS#11 token (HSM): give --module and --key.
    Pkcs11,
    /// An AWS KMS key: give --key-id (key id, ARN or alias/...).
    AwsKms,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Make an empty directory into an encrypted volume (writes envelopefs.toml and a keyring).
    Init {
        /// The backing directory that will hold the encrypted files. Must be empty.
        backing: PathBuf,
        /// Where the key-encryption key lives.
        #[arg(long, value_enum, default_value = "local")]
        provider: ProviderArg,
        /// Plaintext bytes per encrypted block (power of two, 512 B to 1 MiB). Larger blocks
        /// suit large sequential files; small random writes rewrite a whole block.
        #[arg(long, default_value_t = crate::format::DEFAULT_BLOCK_SIZE)]
        block_size: u32,
        /// Bytes reserved at the start of each file for its two header copies.
        #[arg(long, default_value_t = crate::format::DEFAULT_HEADER_SIZE)]
        header_size: u32,
        /// Keep file names, symlink targets and xattrs in the clear in the backing
        /// directory (format 2, which older releases read). By default they are encrypted
        /// (format 4): the backing directory shows only the tree's shape, sizes and times.
        #[arg(long)]
        plaintext_names: bool,
        /// Keep the keyring here instead of inside the backing directory (relative paths are
        /// relative to the backing directory).
        #[arg(long, value_name = "PATH")]
        keyring: Option<PathBuf>,
        /// Argon2id memory cost for a passphrase, in MiB.
        #[arg(long, default_value_t = crate::keys::local::DEFAULT_KDF_MEMORY_MIB)]
        kdf_memory_mib: u32,
        /// Argon2id iterations for a passphrase.
        #[arg(long, default_value_t = crate::keys::local::DEFAULT_KDF_ITERATIONS)]
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
        /// Several hosts will mount this volume at once, from a shared filesystem (NFSv4,
        /// CephFS, GlusterFS, JuiceFS): they lock what they change and follow each other's
        /// changes (docs/SHARING.md). Makes format 5.
        #[arg(long, conflicts_with = "plaintext_names")]
        shared: bool,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// Let several hosts mount a volume at once (format 5; docs/SHARING.md), or with --off
    /// only one again. Needs the volume unmounted on every host. Each host then runs
    /// `envelopefs trust` once and mounts it.
    Share {
        backing: PathBuf,
        /// One host at a time again.
        #[arg(long)]
        off: bool,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// Key-encryption keys: create (PKCS#11), rotate, status, retire.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Pin a volume's key-store settings on this host: the PKCS#11 module to load, the KMS
    /// key ARNs and endpoint, the keyring's place. `init` does this for the host that made
    /// the volume; on another host run this once. It shows what it will pin, asks (or takes
    /// --yes), authenticates the volume with those settings, and only then records them
    /// under /var/lib/envelopefs/trust (other users: ~/.local/state/envelopefs/trust;
    /// $ENVELOPEFS_TRUST_DIR overrides both).
    Trust {
        backing: PathBuf,
        /// Pin without asking.
        #[arg(long)]
        yes: bool,
        /// pkcs11: the module the volume names, confirmed by you (needed when it is not
        /// registered with p11-kit on this host).
        #[arg(long, value_name = "PATH")]
        module: Option<PathBuf>,
        /// Trust a volume whose config says format 1 (unauthenticated: no MAC, plaintext
        /// names). A volume made by this release is format 4 (or 2 with --plaintext-names),
        /// and someone who can write the backing directory can rewrite any config as
        /// format 1; say `--accept-format 1` only for a volume you know is that old.
        #[arg(long, value_name = "N")]
        accept_format: Option<u32>,
        /// Accept a keyring and config older than the newest this host has seen: a backup
        /// restored after `key rotate`, `key retire` or a key-slot change. KEK versions
        /// retired since come back with the older keyring; accept only a backup you
        /// restored yourself.
        #[arg(long)]
        accept_rollback: bool,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// Move a volume to the newest format its names allow: format 1 to 2 (authenticated
    /// config, pinned keys; files untouched); hidden names (4, 5) to 6 (xattr values of
    /// regular files bound to their file: each sealed anew, an empty file with values gets
    /// a header). Offline. Interrupted, it is run again; the volume does not mount
    /// meanwhile. Older envelopefs versions cannot open the volume afterwards.
    Upgrade {
        backing: PathBuf,
        #[command(flatten)]
        secret: KeySecretArgs,
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
        /// Serve the run's progress as OpenMetrics at http://ADDR/metrics while it runs
        /// (envelopefs_rekey_files, envelopefs_rekey_files_done).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// Mount a volume. Returns once the mount answers, leaving a daemon behind (or stays in
    /// the foreground with --foreground).
    Mount(MountArgs),
    /// Unmount a mounted volume and wait (up to 10 s) for its daemon to finish: every
    /// change is durable and the volume free for the next mount when it returns. With files
    /// still open it fails (EBUSY, exit 12) unless --lazy.
    Umount {
        mountpoint: PathBuf,
        /// Detach now; the daemon serves files still open until they are closed, then exits.
        /// Waits only for that if nothing is open.
        #[arg(long)]
        lazy: bool,
    },
    /// Ask a running mount how it is doing: uptime, open files, DEK cache, key-store operations and KMS requests,
    /// errors.
    Status {
        /// A mount point; without one, every envelopefs mount on this host, one after another.
        mountpoint: Option<PathBuf>,
        /// Machine-readable output (a JSON array without MOUNTPOINT).
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
    Man {
        /// Write a page per subcommand (envelopefs.1, envelopefs-mount.1,
        /// envelopefs-key-slot-add.1…) into DIR instead, for /usr/share/man/man1.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// Show an encrypted file's header (file id, key records, generation). Needs no secret
    /// and shows none, unless --volume names the file by its plaintext path.
    Inspect {
        /// A file in the backing directory; with --volume, a path inside the volume as the
        /// mount shows it (hidden names are encrypted to find it, which needs the secret).
        file: PathBuf,
        /// The backing directory `FILE` is a plaintext path of.
        #[arg(long, value_name = "BACKING")]
        volume: Option<PathBuf>,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Hidden names (format 4) for admins and incident response: the backing path of a
    /// path in the volume, or the other way round. Prints to standard output only; nothing
    /// plaintext is written to the backing directory.
    #[command(subcommand)]
    Name(NameCmd),
    /// Check that every header and block of a volume authenticates. Writes nothing unless
    /// --repair. Exit status 1 when problems remain.
    Fsck {
        backing: PathBuf,
        /// Rewrite damaged header copies from their good twin, cut torn trailing blocks and a
        /// last block that fails authentication (a torn append). Other blocks that fail
        /// authentication are only reported. Refuses while the volume is mounted.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Subcommand)]
pub enum ServiceCmd {
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
        /// Replace an instance config that exists (the old one is shown first).
        #[arg(long)]
        force: bool,
        /// The binary the unit runs, as a path that stays valid across upgrades (a symlink
        /// to the current version is kept as a symlink). Default: the path this was run as.
        #[arg(long, value_name = "PATH")]
        exe: Option<PathBuf>,
    },
    /// Remove an instance's config (/etc/envelopefs/NAME.toml). The unit template and the
    /// mount helper stay while other instances use them. Stop the unit first.
    Uninstall {
        name: String,
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// List the installed instances: name, backing directory, mount point, and whether it
    /// is mounted now.
    List {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

#[derive(Args)]
pub struct MountArgs {
    /// The volume's backing directory.
    pub backing: Option<PathBuf>,
    /// An existing empty directory to mount on.
    pub mountpoint: Option<PathBuf>,
    /// Read backing, mountpoint and options from a TOML file (what the systemd unit uses):
    /// backing = "...", mountpoint = "...", options = "allow_other,trust_backing_permissions,key_file=..."
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Stay in the foreground (for systemd and debugging).
    #[arg(short, long)]
    pub foreground: bool,
    /// Mount options, comma separated, for fstab and `mount -t fuse.envelopefs`: allow_other, trust_backing_permissions,
    /// ro, rw, no_writeback_cache, threads=N, attr_timeout=S, entry_timeout=S, key_file=F,
    /// passphrase_file=F, pin_file=F, log_file=F, audit_log=F, cache_ttl=S, cache_tti=S,
    /// cache_max=N, journal=ordered|sync|off, file_handles=auto|always|never, max_inode_fds=N, exclusive, read_ahead_kb=N, io_uring (fstab words such as _netdev, nofail, defaults,
    /// x-systemd.*, comment=… are accepted and ignored). In a value, write a comma as \, and
    /// a backslash as \\.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Let other users use the mount (as root: files they create are theirs).
    /// The kernel checks permissions (default_permissions is always on) against the modes
    /// and owners in the backing directory, which are not authenticated: needs
    /// --trust-backing-permissions.
    #[arg(long)]
    pub allow_other: bool,
    /// With --allow-other: accept that whoever can write the backing directory decides,
    /// through modes and owners, which local users may read and write each file.
    #[arg(long)]
    pub trust_backing_permissions: bool,
    /// Mount read-only.
    #[arg(long)]
    pub read_only: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = crate::daemon::options::DEFAULT_THREADS)]
    pub threads: usize,
    /// Seconds the kernel may cache attributes.
    #[arg(long, default_value_t = crate::daemon::options::DEFAULT_TIMEOUT)]
    pub attr_timeout: f64,
    /// Seconds the kernel may cache name lookups.
    #[arg(long, default_value_t = crate::daemon::options::DEFAULT_TIMEOUT)]
    pub entry_timeout: f64,
    /// Let the kernel cache writes and send them in pages (the default; kept for scripts).
    #[arg(long, hide = true)]
    pub writeback_cache: bool,
    /// Send every write straight to the daemon instead of through the kernel's writeback
    /// cache (slower small writes; see docs/PERFORMANCE.md).
    #[arg(long)]
    pub no_writeback_cache: bool,
    /// AES-GCM implementation: aws-lc, the only one (the word is kept for scripts that
    /// name it).
    #[arg(long, hide = true, default_value = crate::daemon::options::DEFAULT_CRYPTO, value_parser = [crate::daemon::options::DEFAULT_CRYPTO])]
    pub crypto: String,
    /// Seconds an unwrapped data key stays cached after it was loaded. Also the bound on how
    /// long files already opened keep working after their KEK is disabled.
    #[arg(long, default_value_t = crate::keys::cache::DEFAULT_TTL_SECS)]
    pub cache_ttl: u64,
    /// Seconds an unused cached data key survives.
    #[arg(long, default_value_t = crate::keys::cache::DEFAULT_TTI_SECS)]
    pub cache_tti: u64,
    /// Most data keys cached at once.
    #[arg(long, default_value_t = crate::keys::cache::DEFAULT_MAX_ENTRIES)]
    pub cache_max: u64,
    /// Append logs to this file instead of stderr.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Do not lock the daemon's memory (data keys could then reach swap).
    #[arg(long)]
    pub no_mlock: bool,
    /// Append one JSON line per key operation (wrap, unwrap) to this file (docs/AUDIT.md).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// aws-kms: wrapped data keys generated ahead for new files (default 256; 0 = none).
    /// When creates empty it, the pool grows, up to 16 times this (at most 4096).
    #[arg(long, value_name = "N")]
    pub kms_pool: Option<usize>,
    /// aws-kms: seconds one KMS call may take, retries included (default 20); an outage
    /// longer than this is EIO.
    #[arg(long, value_name = "S")]
    pub kms_timeout: Option<f64>,
    /// When opens in a scan (grep -r, a backup, a build) keep waiting for the key store,
    /// unwrap the keys of up to N more files of the directory ahead, in the background.
    /// Each costs a key-store call even if the file is never opened. Default 64 where an
    /// unwrap waits on another machine (per-file aws-kms, pkcs11), else 0 (off).
    #[arg(long, value_name = "N")]
    pub prefetch_keys: Option<usize>,
    /// Crash journal (docs/FORMAT.md §8): every change to a file is recorded on this host
    /// before it is made, so a crash inside a write never leaves a block that reads as EIO.
    /// `ordered` (default) covers a killed daemon, and power cuts on storage that keeps
    /// writes in order; `sync` flushes each record first and covers any power cut (slower
    /// writes); `off` keeps no journal.
    #[arg(long, value_name = "MODE", default_value = "ordered", value_parser = ["ordered", "sync", "off"])]
    pub journal: String,
    /// How the daemon finds a file again after closing its descriptor (it keeps at most
    /// --max-inode-fds open, whatever the size of the tree): `always` by kernel file handle
    /// (needs root, or CAP_DAC_READ_SEARCH); `never` by its parent and name, checked to be
    /// the same object; `auto` (default) takes file handles where the kernel grants them.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub file_handles: String,
    /// Most descriptors of files and directories the daemon keeps open for the kernel
    /// (at most half of RLIMIT_NOFILE is used). Files held open through the mount come on top.
    #[arg(long, value_name = "N", default_value_t = crate::fs::DEFAULT_MAX_INODE_FDS)]
    pub max_inode_fds: usize,
    /// Promise that nothing but this mount changes the backing directory while it is
    /// mounted (no sync service, no second host): the kernel then caches names and
    /// attributes for 60 s instead of 1 s, and metadata-heavy work (ls -lR, find, rm -rf)
    /// makes fewer round trips. Changes made behind the mount's back may go unseen that long.
    #[arg(long)]
    pub exclusive: bool,
    /// Read-ahead of the mount in KiB (as root; 0 leaves the kernel's 128): how large the
    /// read requests of a sequential reader are.
    #[arg(long, value_name = "KIB", default_value_t = crate::fuse::DEFAULT_READ_AHEAD_KB)]
    pub read_ahead_kb: u32,
    /// Serve OpenMetrics at http://ADDR/metrics (e.g. 127.0.0.1:9101): FUSE requests and
    /// their latency by opcode, errors by errno, DEK cache hits and misses, key-store
    /// operations, KMS requests, journal records, open files. Off by default; it names no
    /// file, but bind it to an address only your monitoring reaches.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Serve FUSE requests over io_uring (FUSE_OVER_IO_URING, Linux 6.14+) instead of
    /// reading and writing /dev/fuse: one queue per CPU, fewer syscalls per request. The
    /// kernel allows it only after `echo Y > /sys/module/fuse/parameters/enable_uring` (as
    /// root); where it refuses, the mount is served over /dev/fuse and the log says why.
    /// `envelopefs status` shows which transport serves the mount.
    #[arg(long)]
    pub io_uring: bool,
    #[command(flatten)]
    pub secret: SecretArgs,
}

impl MountArgs {
    /// The mount's settings as the flags give them (before `--config` and `-o` fold in).
    pub fn settings(&self) -> MountSettings {
        MountSettings {
            backing: self.backing.clone(),
            mountpoint: self.mountpoint.clone(),
            allow_other: self.allow_other,
            trust_backing_permissions: self.trust_backing_permissions,
            read_only: self.read_only,
            threads: self.threads,
            attr_timeout: self.attr_timeout,
            entry_timeout: self.entry_timeout,
            no_writeback_cache: self.no_writeback_cache,
            cache_ttl: self.cache_ttl,
            cache_tti: self.cache_tti,
            cache_max: self.cache_max,
            log_file: self.log_file.clone(),
            audit_log: self.audit_log.clone(),
            kms_pool: self.kms_pool,
            kms_timeout: self.kms_timeout,
            prefetch_keys: self.prefetch_keys,
            journal: self.journal.parse().unwrap_or_default(),
            file_handles: self.file_handles.parse().unwrap_or(crate::fs::FileHandles::Auto),
            max_inode_fds: self.max_inode_fds,
            exclusive: self.exclusive,
            read_ahead_kb: self.read_ahead_kb,
            metrics: self.metrics.clone(),
            io_uring: self.io_uring,
            secret: self.secret.source(),
        }
    }
}

#[derive(Subcommand)]
pub enum NameCmd {
    /// Print the backing path (relative to BACKING) of PATH, a path in the volume.
    Encrypt {
        backing: PathBuf,
        path: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Print the path in the volume of PATH, a backing path (relative to BACKING, or
    /// inside it). Long names are read from their side files.
    Decrypt {
        backing: PathBuf,
        path: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
}
