//! What `envelopefs mount` is asked to do, from its flags, a `--config FILE` (what the
//! systemd unit uses) and `-o` words (what fstab and `mount -t fuse.envelopefs` pass).
//! Pure: nothing here touches the volume or the mount point.
//!
//! `-o` takes comma-separated words. A value may hold a comma written `\,` and a backslash
//! written `\\` (`key_file=/etc/a\,b.key`); any other backslash stays as it is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::fuse::MountOptions;
use crate::keys::cache::CacheConfig;
use crate::keys::secret::SecretSource;

/// Most FUSE worker threads a mount may have (each holds a /dev/fuse descriptor and a
/// request buffer).
pub const MAX_THREADS: usize = 64;

/// What `envelopefs mount` does when not told otherwise (the command line's defaults are
/// these).
pub const DEFAULT_THREADS: usize = 4;
/// Seconds the kernel caches names and attributes.
pub const DEFAULT_TIMEOUT: f64 = 1.0;
pub const DEFAULT_CRYPTO: &str = "aws-lc";

/// The settings of one mount. `Default` is what `envelopefs mount` uses without flags.
#[derive(Clone, Debug, PartialEq)]
pub struct MountSettings {
    pub backing: Option<PathBuf>,
    pub mountpoint: Option<PathBuf>,
    pub allow_other: bool,
    /// The admin accepts that with `allow_other` the modes and owners stored in the
    /// backing directory decide who reads what: they are not authenticated.
    pub trust_backing_permissions: bool,
    pub read_only: bool,
    pub threads: usize,
    pub attr_timeout: f64,
    pub entry_timeout: f64,
    pub no_writeback_cache: bool,
    pub cache_ttl: u64,
    pub cache_tti: u64,
    pub cache_max: u64,
    pub log_file: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub kms_pool: Option<usize>,
    pub kms_timeout: Option<f64>,
    /// Files of a directory whose keys are unwrapped ahead per cache miss in a scan (None:
    /// the volume's default, see `prefetch`).
    pub prefetch_keys: Option<usize>,
    /// How changes are journaled against crashes: ordered, sync or off.
    pub journal: crate::file::journal::Mode,
    /// How the inode table finds an inode again once its descriptor is closed.
    pub file_handles: crate::fs::FileHandles,
    /// Most descriptors of known inodes the daemon keeps open.
    pub max_inode_fds: usize,
    /// Nothing but this mount changes the backing directory while it is mounted: the
    /// kernel may cache names and attributes longer.
    pub exclusive: bool,
    /// The mount's read-ahead in KiB (0: the kernel's default, 128).
    pub read_ahead_kb: u32,
    /// Where the OpenMetrics endpoint listens (host:port); off when None.
    pub metrics: Option<String>,
    /// Serve FUSE requests over io_uring where the kernel allows it (else /dev/fuse).
    pub io_uring: bool,
    pub secret: SecretSource,
}

impl Default for MountSettings {
    fn default() -> Self {
        Self {
            backing: None,
            mountpoint: None,
            allow_other: false,
            trust_backing_permissions: false,
            read_only: false,
            threads: DEFAULT_THREADS,
            attr_timeout: DEFAULT_TIMEOUT,
            entry_timeout: DEFAULT_TIMEOUT,
            no_writeback_cache: false,
            cache_ttl: crate::keys::cache::DEFAULT_TTL_SECS,
            cache_tti: crate::keys::cache::DEFAULT_TTI_SECS,
            cache_max: crate::keys::cache::DEFAULT_MAX_ENTRIES,
            log_file: None,
            audit_log: None,
            kms_pool: None,
            kms_timeout: None,
            prefetch_keys: None,
            journal: crate::file::journal::Mode::Ordered,
            file_handles: crate::fs::FileHandles::Auto,
            max_inode_fds: crate::fs::DEFAULT_MAX_INODE_FDS,
            exclusive: false,
            read_ahead_kb: crate::fuse::DEFAULT_READ_AHEAD_KB,
            metrics: None,
            io_uring: false,
            secret: SecretSource::default(),
        }
    }
}

/// Seconds the kernel caches names and attributes on an `exclusive` mount.
pub const EXCLUSIVE_TIMEOUT: f64 = 60.0;

/// `mount --config FILE`: one mount, as a systemd unit instance describes it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MountConfigFile {
    backing: PathBuf,
    mountpoint: PathBuf,
    #[serde(default)]
    options: String,
}

/// Words mount(8), fstab and systemd pass that mean nothing to envelopefs (the kernel
/// checks permissions anyway: `default_permissions` is always on).
const IGNORED: [&str; 20] = [
    "default_permissions",
    "defaults",
    "_netdev",
    "nofail",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "relatime",
    "subtype",
    "fsname",
];

fn usage(msg: String) -> Error {
    crate::error::usage(msg)
}

/// Split one `-o` string into words at unescaped commas, undoing `\,` and `\\`. Empty
/// words (`a,,b`, a trailing comma) are dropped.
pub fn split_words(options: &str) -> Vec<String> {
    let (mut words, mut word) = (Vec::new(), String::new());
    let mut chars = options.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(',' | '\\')) => word.push(chars.next().expect("peeked")),
            ',' => words.push(std::mem::take(&mut word)),
            c => word.push(c),
        }
    }
    words.push(word);
    words.retain(|w| !w.is_empty());
    words
}

/// Apply one `-o` word: it sets the same field as its flag; fstab words are ignored;
/// anything else is refused (class [`Class::Usage`]).
pub fn apply_word(s: &mut MountSettings, word: &str) -> Result<()> {
    let (k, v) = word.split_once('=').map_or((word, None), |(k, v)| (k, Some(v)));
    let val = || v.ok_or_else(|| usage(format!("mount option {k} needs a value")));
    let num = || -> Result<f64> { val()?.parse().map_err(|_| usage(format!("mount option {word}: not a number"))) };
    let path = || val().map(PathBuf::from);
    match k {
        "allow_other" => s.allow_other = true,
        "trust_backing_permissions" => s.trust_backing_permissions = true,
        "ro" => s.read_only = true,
        "rw" => s.read_only = false,
        "writeback_cache" => s.no_writeback_cache = false,
        "no_writeback_cache" => s.no_writeback_cache = true,
        "threads" => s.threads = num()? as usize,
        "attr_timeout" => s.attr_timeout = num()?,
        "entry_timeout" => s.entry_timeout = num()?,
        "cache_ttl" => s.cache_ttl = num()? as u64,
        "cache_tti" => s.cache_tti = num()? as u64,
        "cache_max" => s.cache_max = num()? as u64,
        // One AES-GCM implementation is left; the word stays for fstab lines that name it.
        "crypto" => match val()? {
            DEFAULT_CRYPTO => {}
            other => return Err(usage(format!("crypto={other}: the only AES-GCM implementation is {DEFAULT_CRYPTO}"))),
        },
        "key_file" => s.secret.key_file = Some(path()?),
        "passphrase_file" => s.secret.passphrase_file = Some(path()?),
        "pin_file" => s.secret.pin_file = Some(path()?),
        "recovery_key" => s.secret.recovery_key = Some(path()?),
        "volume_check" => s.secret.volume_check = Some(val()?.to_owned()),
        "log_file" => s.log_file = Some(path()?),
        "audit_log" => s.audit_log = Some(path()?),
        "kms_pool" => s.kms_pool = Some(num()? as usize),
        "kms_timeout" => s.kms_timeout = Some(num()?),
        "prefetch_keys" => s.prefetch_keys = Some(num()? as usize),
        "journal" => s.journal = val()?.parse().map_err(|e: Error| e.context(format!("mount option {word}")))?,
        "file_handles" => {
            s.file_handles = val()?.parse().map_err(|e: Error| e.context(format!("mount option {word}")))?
        }
        "max_inode_fds" => s.max_inode_fds = num()? as usize,
        "exclusive" => s.exclusive = true,
        "read_ahead_kb" => s.read_ahead_kb = num()? as u32,
        "metrics" => s.metrics = Some(val()?.to_owned()),
        "io_uring" => s.io_uring = true,
        "no_io_uring" => s.io_uring = false,
        k if IGNORED.contains(&k) || k == "comment" || k.starts_with("x-") => {}
        _ => return Err(usage(format!("unknown mount option {word:?} (see envelopefs mount --help)"))),
    }
    Ok(())
}

/// Fold a `--config FILE` and the `-o` strings into the settings the flags gave. The file
/// fills the backing directory and mount point only where the command line named none;
/// its options come before the command line's `-o`, so a later word wins. Every failure
/// is class [`Class::Usage`].
pub fn resolve(mut s: MountSettings, config: Option<&Path>, options: &[String]) -> Result<MountSettings> {
    let mut all: Vec<&str> = Vec::new();
    let file_options;
    if let Some(path) = config {
        let text = std::fs::read_to_string(path).map_err(|e| usage(format!("reading {}: {e}", path.display())))?;
        let c: MountConfigFile = toml::from_str(&text)
            .map_err(|e| usage(format!("{}: {}", path.display(), crate::volume::config::toml_error(&text, &e))))?;
        s.backing.get_or_insert(c.backing);
        s.mountpoint.get_or_insert(c.mountpoint);
        file_options = c.options;
        all.push(&file_options);
    }
    all.extend(options.iter().map(String::as_str));
    for word in all.into_iter().flat_map(split_words) {
        apply_word(&mut s, &word)?;
    }
    if s.backing.is_none() || s.mountpoint.is_none() {
        return Err(usage("mount needs BACKING and MOUNTPOINT (or --config FILE)".into()));
    }
    if !(1..=MAX_THREADS).contains(&s.threads) {
        return Err(usage(format!("threads={}: from 1 to {MAX_THREADS}", s.threads)));
    }
    if s.allow_other && !s.trust_backing_permissions {
        return Err(usage(
            "allow_other lets local users in by the modes and owners stored in the backing directory, \
             which envelopefs does not authenticate: whoever can write the backing directory could let any \
             local user read any file. If only trusted admins can write it, say so: add \
             trust_backing_permissions (--trust-backing-permissions)"
                .into(),
        ));
    }
    if s.secret.recovery_key.is_some() {
        if !s.read_only && options.iter().flat_map(|o| split_words(o)).any(|w| w == "rw") {
            return Err(usage(
                "a mount with --recovery-key is read-only: new files could not be wrapped for the volume's \
                 other key slots (to move to a new key store, add it as a slot: docs/PROVIDERS.md)"
                    .into(),
            ));
        }
        s.read_only = true;
    }
    Ok(s)
}

impl MountSettings {
    /// The backing directory (set once [`resolve`] succeeded).
    pub fn backing(&self) -> &Path {
        self.backing.as_deref().expect("resolved")
    }

    /// The mount point (set once [`resolve`] succeeded).
    pub fn mountpoint(&self) -> &Path {
        self.mountpoint.as_deref().expect("resolved")
    }

    /// How the mount behaves towards the kernel.
    pub fn mount_options(&self) -> MountOptions {
        // An exclusive mount sees every change the kernel would have to learn of: the
        // 1-second defaults become EXCLUSIVE_TIMEOUT (a timeout given otherwise is kept).
        let timeout = |t: f64| if self.exclusive && t == 1.0 { EXCLUSIVE_TIMEOUT } else { t };
        MountOptions {
            allow_other: self.allow_other,
            read_only: self.read_only,
            threads: self.threads,
            attr_timeout: Duration::from_secs_f64(timeout(self.attr_timeout)),
            entry_timeout: Duration::from_secs_f64(timeout(self.entry_timeout)),
            read_ahead_kb: self.read_ahead_kb,
            writeback_cache: !self.no_writeback_cache,
            io_uring: self.io_uring,
            fsname: self.backing().display().to_string(),
            ..MountOptions::default()
        }
    }

    /// How far the mount unwraps keys ahead of a scan's opens: by default only where an
    /// unwrap waits on another machine (`remote`: per-file KMS, an HSM).
    pub fn prefetch(&self, remote: bool) -> crate::fs::PrefetchConfig {
        use crate::fs::PrefetchConfig;
        match self.prefetch_keys {
            Some(0) => PrefetchConfig::OFF,
            Some(files) => PrefetchConfig { files, ..PrefetchConfig::REMOTE },
            None if remote => PrefetchConfig::REMOTE,
            None => PrefetchConfig::OFF,
        }
    }

    /// The DEK cache the mount keeps.
    pub fn cache(&self) -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_secs(self.cache_ttl),
            tti: Duration::from_secs(self.cache_tti),
            max_entries: self.cache_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Class;

    fn with(words: &str) -> Result<MountSettings> {
        let base = MountSettings { backing: Some("/b".into()), mountpoint: Some("/m".into()), ..Default::default() };
        resolve(base, None, &[words.to_owned()])
    }

    #[test]
    fn words_split_at_unescaped_commas() {
        let cases: [(&str, &[&str]); 9] = [
            ("", &[]),
            ("ro", &["ro"]),
            ("ro,allow_other", &["ro", "allow_other"]),
            ("ro,,allow_other,", &["ro", "allow_other"]),
            (r"key_file=/etc/a\,b.key,ro", &["key_file=/etc/a,b.key", "ro"]),
            (r"key_file=/etc/a\\,ro", &[r"key_file=/etc/a\", "ro"]),
            (r"key_file=/etc/a\\\,b", &[r"key_file=/etc/a\,b"]),
            (r"log_file=/x\y", &[r"log_file=/x\y"]),
            (r"log_file=/x\", &[r"log_file=/x\"]),
        ];
        for (input, want) in cases {
            assert_eq!(split_words(input), want, "{input:?}");
        }
    }

    #[test]
    fn every_option_word_sets_its_field() {
        type Check = fn(&MountSettings) -> bool;
        let cases: Vec<(&str, Check)> = vec![
            ("allow_other,trust_backing_permissions", |s| s.allow_other && s.trust_backing_permissions),
            ("ro", |s| s.read_only),
            ("ro,rw", |s| !s.read_only),
            ("no_writeback_cache", |s| s.no_writeback_cache),
            ("no_writeback_cache,writeback_cache", |s| !s.no_writeback_cache),
            ("threads=8", |s| s.threads == 8),
            ("attr_timeout=2.5", |s| s.attr_timeout == 2.5),
            ("entry_timeout=0", |s| s.entry_timeout == 0.0),
            ("cache_ttl=10", |s| s.cache_ttl == 10),
            ("cache_tti=5", |s| s.cache_tti == 5),
            ("cache_max=7", |s| s.cache_max == 7),
            ("key_file=/k", |s| s.secret.key_file.as_deref() == Some(Path::new("/k"))),
            ("passphrase_file=/p", |s| s.secret.passphrase_file.as_deref() == Some(Path::new("/p"))),
            ("pin_file=/pin", |s| s.secret.pin_file.as_deref() == Some(Path::new("/pin"))),
            ("log_file=/l", |s| s.log_file.as_deref() == Some(Path::new("/l"))),
            ("audit_log=/a", |s| s.audit_log.as_deref() == Some(Path::new("/a"))),
            ("kms_pool=0", |s| s.kms_pool == Some(0)),
            ("kms_timeout=1.5", |s| s.kms_timeout == Some(1.5)),
            ("prefetch_keys=0", |s| s.prefetch_keys == Some(0)),
            ("journal=sync", |s| s.journal == crate::file::journal::Mode::Sync),
            ("journal=off", |s| s.journal == crate::file::journal::Mode::Off),
            ("file_handles=never", |s| s.file_handles == crate::fs::FileHandles::Never),
            ("max_inode_fds=64", |s| s.max_inode_fds == 64),
            ("exclusive", |s| s.exclusive),
            ("read_ahead_kb=0", |s| s.read_ahead_kb == 0),
            ("metrics=127.0.0.1:9100", |s| s.metrics.as_deref() == Some("127.0.0.1:9100")),
            ("io_uring", |s| s.io_uring && s.mount_options().io_uring),
            ("io_uring,no_io_uring", |s| !s.io_uring),
            (r"key_file=/etc/a\,b.key", |s| s.secret.key_file.as_deref() == Some(Path::new("/etc/a,b.key"))),
            (r"key_file=/etc/a\\b.key", |s| s.secret.key_file.as_deref() == Some(Path::new(r"/etc/a\b.key"))),
            ("threads=2,threads=3", |s| s.threads == 3),
        ];
        for (words, check) in cases {
            let s = with(words).unwrap_or_else(|e| panic!("{words}: {e}"));
            assert!(check(&s), "{words}: {s:?}");
        }
    }

    #[test]
    fn allow_other_alone_is_refused() {
        let e = with("allow_other").unwrap_err();
        assert_eq!(e.class(), Some(Class::Usage));
        assert!(e.to_string().contains("trust_backing_permissions"), "{e}");
    }

    #[test]
    fn fstab_words_are_ignored() {
        let words = [
            "defaults",
            "_netdev",
            "nofail",
            "auto",
            "noauto",
            "user",
            "nouser",
            "users",
            "exec",
            "noexec",
            "suid",
            "nosuid",
            "dev",
            "nodev",
            "atime",
            "noatime",
            "relatime",
            "default_permissions",
            "subtype=envelopefs",
            "fsname=/srv/a",
            "x-systemd.automount",
            "x-systemd.requires=network-online.target",
            "comment=systemd.automount",
            r"comment=a\,b",
        ];
        let plain = with("").unwrap();
        for w in words {
            assert_eq!(with(w).unwrap_or_else(|e| panic!("{w}: {e}")), plain, "{w}");
        }
    }

    #[test]
    fn bad_words_are_refused_as_usage_errors() {
        let cases = [
            ("bogus", "unknown mount option \"bogus\""),
            ("ro,bogus=1", "unknown mount option \"bogus=1\""),
            ("allowother", "unknown mount option"),
            ("threads", "mount option threads needs a value"),
            ("key_file", "mount option key_file needs a value"),
            ("threads=many", "mount option threads=many: not a number"),
            ("attr_timeout=1s", "not a number"),
            ("kms_timeout=", "not a number"),
            ("journal=maybe", "expected ordered, sync or off"),
            ("crypto=rustcrypto", "the only AES-GCM implementation is aws-lc"),
            ("file_handles=sometimes", "expected auto, always or never"),
            ("cache_max=0x10", "not a number"),
        ];
        for (words, needle) in cases {
            let e = with(words).unwrap_err();
            assert!(e.to_string().contains(needle), "{words}: {e}");
            assert_eq!(e.class(), Some(Class::Usage), "{words}");
        }
    }

    #[test]
    fn config_file_fills_what_the_command_line_left_open() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("a.toml");
        std::fs::write(&conf, "backing = \"/srv/a\"\nmountpoint = \"/mnt/a\"\noptions = \"ro,threads=2\"\n").unwrap();
        let s = resolve(MountSettings::default(), Some(&conf), &[]).unwrap();
        assert_eq!(s.backing(), Path::new("/srv/a"));
        assert_eq!(s.mountpoint(), Path::new("/mnt/a"));
        assert!(s.read_only);
        assert_eq!(s.threads, 2);
        // Command-line paths and -o words win.
        let flags = MountSettings { mountpoint: Some("/elsewhere".into()), ..Default::default() };
        let s = resolve(flags, Some(&conf), &["rw".into(), "threads=9".into()]).unwrap();
        assert_eq!(s.backing(), Path::new("/srv/a"));
        assert_eq!(s.mountpoint(), Path::new("/elsewhere"));
        assert!(!s.read_only);
        assert_eq!(s.threads, 9);
        // Unknown keys, a missing file, and no paths at all are usage errors.
        std::fs::write(&conf, "backing = \"/a\"\nmountpoint = \"/b\"\nbogus = 1\n").unwrap();
        let e = resolve(MountSettings::default(), Some(&conf), &[]).unwrap_err();
        assert_eq!(e.class(), Some(Class::Usage));
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = resolve(MountSettings::default(), Some(&d.path().join("missing.toml")), &[]).unwrap_err();
        assert_eq!(e.class(), Some(Class::Usage));
        assert!(e.to_string().contains("reading"), "{e}");
        let e = resolve(MountSettings::default(), None, &["ro".into()]).unwrap_err();
        assert!(e.to_string().contains("needs BACKING and MOUNTPOINT"), "{e}");
    }

    #[test]
    fn settings_become_mount_and_cache_options() {
        let s =
            with("allow_other,trust_backing_permissions,ro,no_writeback_cache,threads=3,attr_timeout=2,cache_ttl=9")
                .unwrap();
        let m = s.mount_options();
        assert!(m.allow_other && m.read_only && !m.writeback_cache);
        assert_eq!((m.threads, m.attr_timeout, m.fsname.as_str()), (3, Duration::from_secs(2), "/b"));
        assert_eq!(s.cache().ttl, Duration::from_secs(9));
        let m = with("exclusive,entry_timeout=5").unwrap().mount_options();
        assert_eq!((m.attr_timeout, m.entry_timeout), (Duration::from_secs(60), Duration::from_secs(5)));
    }
}
