//! The `key` commands' shape: KEK versions, key slots and the keyring's secret.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::args::{KeySecretArgs, SecretArgs};

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Change the passphrase or key file of a `local` volume's keyring (the volume must be
    /// unmounted). The keys stay, so no file changes; the old secret no longer opens this
    /// keyring, but it still opens any copy of the old keyring file (a backup): retire
    /// keys with `key rotate`, `rekey --rewrap` and `key retire` if a secret leaked.
    Passwd {
        backing: PathBuf,
        /// The new passphrase, from this file (else asked twice on the terminal).
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// The new key file (32 random bytes, or 64 hex digits).
        #[arg(long, value_name = "FILE", conflicts_with = "new_passphrase_file")]
        new_key_file: Option<PathBuf>,
        /// Argon2id memory cost of the new passphrase, in MiB.
        #[arg(long, default_value_t = crate::keys::local::DEFAULT_KDF_MEMORY_MIB)]
        kdf_memory_mib: u32,
        /// Argon2id iterations of the new passphrase.
        #[arg(long, default_value_t = crate::keys::local::DEFAULT_KDF_ITERATIONS)]
        kdf_iterations: u32,
        /// The current passphrase or key file.
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// Create version 1 of a KEK inside a PKCS#11 token (sensitive, never extractable).
    Create {
        /// The PKCS#11 module (shared library).
        #[arg(long, value_name = "PATH")]
        module: PathBuf,
        /// The key's PKCS#11 URI, e.g. 'pkcs11:token=prod;object=envelopefs-kek'.
        #[arg(long, value_name = "URI")]
        key: String,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// Make a new KEK version current. New files wrap under it (running mounts too: they
    /// pick up the new version within seconds); old files keep opening with the version
    /// in their header until `rekey --rewrap`.
    Rotate {
        backing: PathBuf,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// List the KEK versions and how many file headers use each.
    Status {
        backing: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Key slots: further KEKs that each wrap every file's data key (another KMS region or
    /// account, an HSM, a keyring, an offline recovery recipient). Any one slot opens the
    /// volume; new files get a record for every slot. See docs/PROVIDERS.md.
    #[command(subcommand)]
    Slot(SlotCmd),
    /// Take an old KEK version out of service for good (local: its key is erased from the
    /// keyring; PKCS#11: the key object is destroyed). Running mounts stop unwrapping with
    /// it at once. Refuses while any header that authenticates still references it: run
    /// `envelopefs rekey --rewrap` first. Headers that do not authenticate (planted junk,
    /// forged records, a header pasted onto other content) never hold it back.
    Retire {
        backing: PathBuf,
        version: u32,
        /// Retire a compromised version even though files still reference it or could not
        /// be read: those that have no other record become unreadable for good.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
}

#[derive(Subcommand)]
pub enum SlotCmd {
    /// Add a key slot. The volume key is wrapped for it at once; existing files get its
    /// record with `envelopefs rekey --rewrap` (new files get it from the next mount on).
    /// The volume becomes format 3 (older envelopefs versions refuse it).
    Add {
        backing: PathBuf,
        #[command(flatten)]
        slot: NewSlotArgs,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// Remove a key slot from the policy. Refused for the primary and while any file has no
    /// record for the slots that stay. Headers keep the removed slot's records until
    /// `envelopefs rekey --rewrap`; only then is the slot's key no longer needed.
    Remove {
        backing: PathBuf,
        /// The slot's number (`key slot list`).
        slot: usize,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
    /// List the key slots (0 is the primary) and the volume's check value.
    List {
        backing: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Make a slot the primary: new keys and `key rotate` use its store; reads still try
    /// every slot, the primary first.
    Primary {
        backing: PathBuf,
        slot: usize,
        #[command(flatten)]
        secret: KeySecretArgs,
    },
}

/// Which key store a new slot uses (exactly one).
#[derive(Args)]
#[group(required = true, multiple = false, id = "slot_kind")]
pub struct NewSlotKind {
    /// A local keyring sealed by --key-file or --passphrase-file (made now; one per volume).
    #[arg(long)]
    pub local: bool,
    /// A key in a PKCS#11 token, as a URI (version 1 is created if missing); give --module.
    #[arg(long, value_name = "URI", requires = "module")]
    pub pkcs11: Option<String>,
    /// An AWS KMS key (id, ARN or alias/NAME): another region's replica of a multi-Region
    /// key, or a key in another account.
    #[arg(long, value_name = "KEY")]
    pub aws_kms: Option<String>,
    /// An offline recovery recipient: an age X25519 public key (age1…).
    #[arg(long, value_name = "AGE1")]
    pub recovery: Option<String>,
    /// Make a new recovery key pair: the identity is written to FILE (mode 0600, must not
    /// exist; keep it offline), its recipient becomes the slot.
    #[arg(long, value_name = "FILE")]
    pub new_recovery_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct NewSlotArgs {
    #[command(flatten)]
    pub kind: NewSlotKind,
    /// --local: keep the keyring here (outside the backing directory) instead of inside it.
    #[arg(long, value_name = "PATH")]
    pub keyring: Option<PathBuf>,
    /// --pkcs11: the token's PKCS#11 module.
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// --aws-kms: the key's region.
    #[arg(long)]
    pub region: Option<String>,
    /// --aws-kms: endpoint URL.
    #[arg(long, value_name = "URL")]
    pub kms_endpoint: Option<String>,
    /// --aws-kms: wrap data keys under an intermediate key of this slot's KMS key (no KMS
    /// call per file).
    #[arg(long)]
    pub kms_intermediate_key: bool,
}
