//! What this host trusts about each volume, kept outside the backing directory: the
//! settings that choose code (the PKCS#11 module), endpoints and keys (KMS key ARNs,
//! region, endpoint, the keyring's place), the lowest format it opens the volume as, and
//! the newest keyring and config it has seen (so a restored older one is refused).
//!
//! `init` writes the record; `envelopefs trust BACKING` writes it on a new host after
//! showing what it pins. A local volume whose keyring is inside it needs no record to
//! open: its secret authenticates everything, and the first open records what it saw.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::volume::config::{ProviderConfig, VolumeConfig, KEYRING_NAME};

pub const DEFAULT_DIR: &str = "/var/lib/envelopefs/trust";
/// Overrides DEFAULT_DIR (tests, packaging); it is the host's environment, not the volume's.
pub const DIR_ENV: &str = "ENVELOPEFS_TRUST_DIR";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustStore {
    dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustRecord {
    pub volume_id: String,
    /// The lowest format this host opens the volume as: a config swapped for an older
    /// format's is refused.
    pub format: u32,
    /// The newest local keyring version this host has seen.
    #[serde(default)]
    pub keyring_version: u64,
    /// The newest config generation this host has seen.
    #[serde(default)]
    pub config_generation: u64,
    /// The provider settings, as the host pins them (`ProviderConfig::host_view`).
    pub provider: ProviderConfig,
    /// The key slots beyond the primary (format 3), pinned the same way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<ProviderConfig>,
    /// HMAC of the volume key (`volume_check`): a volume key opened through a slot anyone
    /// can wrap to (a recovery recipient) must match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_check: Option<String>,
    /// The canonical backing paths at which this host accepts the volume. A copy of it
    /// elsewhere (another directory someone filled with its files, a restored backup, a
    /// snapshot) is refused until the admin accepts that place with `envelopefs trust`.
    /// Records from before places were kept get their first place at the next open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub places: Vec<String>,
    /// Each PKCS#11 module the volume names, as stored, and the canonical file that was
    /// checked when it was pinned: what is loaded is that file, never the stored string.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub module_files: std::collections::BTreeMap<String, String>,
    /// Block and header size (bytes) as pinned: a format-1 config has no MAC, so this is
    /// what keeps its geometry from being changed under the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geometry: Option<[u32; 2]>,
}

impl TrustRecord {
    /// What trusting `cfg` as it stands would pin.
    pub fn for_config(cfg: &VolumeConfig) -> Self {
        Self {
            volume_id: cfg.volume_id.clone(),
            format: cfg.format,
            keyring_version: 0,
            config_generation: cfg.generation,
            provider: cfg.provider.host_view(),
            slots: cfg.slots.iter().map(|s| s.provider.host_view()).collect(),
            volume_check: None,
            places: Vec::new(),
            module_files: Default::default(),
            geometry: Some([cfg.block_size, cfg.header_size]),
        }
    }

    /// Is the volume accepted at `place`? (A record that names no place yet accepts the
    /// first one it is opened at.)
    pub fn accepts_place(&self, place: &Path) -> bool {
        self.places.is_empty() || self.places.iter().any(|p| Path::new(p) == place)
    }

    pub fn add_place(&mut self, place: &Path) {
        if !self.places.iter().any(|p| Path::new(p) == place) {
            self.places.push(place.to_string_lossy().into_owned());
        }
    }
}

/// The canonical form of a backing directory: what a volume is bound to.
pub fn place_of(root: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(root).map_err(|e| Error::io(e, format!("backing directory {}", root.display())))
}

/// The refusal of a volume found at a place this host has not accepted it at.
pub fn wrong_place(rec: &TrustRecord, place: &Path) -> Error {
    Error::untrusted(format!(
        "volume {} is known on this host at {}, but this is {}: a copy of it, a restored backup or a moved \
         volume. Someone who can write this directory could have filled it with another volume's files. \
         If this copy is yours, accept it here with `envelopefs trust {}` (it then opens at both places)",
        rec.volume_id,
        rec.places.join(", "),
        place.display(),
        place.display()
    ))
}

/// A stored module path that could mean another file later: relative, or with `.` or `..`.
fn plain_absolute(stored: &str) -> bool {
    let p = Path::new(stored);
    p.is_absolute()
        && p.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)))
}

/// The check value of a volume key: shows which key a volume has, reveals nothing of it.
pub fn volume_check(key: &crate::crypto::VolumeKey) -> String {
    hex::encode(&key.mac("envelopefs volume key check", b"")[..16])
}

impl Default for TrustStore {
    fn default() -> Self {
        Self::host()
    }
}

impl TrustStore {
    /// This host's store: $ENVELOPEFS_TRUST_DIR; else for root /var/lib/envelopefs/trust,
    /// for other users their own ($XDG_STATE_HOME, or ~/.local/state, /envelopefs/trust).
    pub fn host() -> Self {
        if let Some(d) = std::env::var_os(DIR_ENV) {
            return Self { dir: PathBuf::from(d) };
        }
        if rustix::process::geteuid().is_root() {
            return Self { dir: PathBuf::from(DEFAULT_DIR) };
        }
        let state = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")));
        Self { dir: state.map_or_else(|| PathBuf::from(DEFAULT_DIR), |s| s.join("envelopefs/trust")) }
    }

    pub fn at(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, volume_id: &str) -> Result<PathBuf> {
        if volume_id.len() != 32 || !volume_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::tampered(format!("volume id {volume_id:?} is not 32 hex digits")));
        }
        Ok(self.dir.join(format!("{}.toml", volume_id.to_ascii_lowercase())))
    }

    /// The record for a volume, if this host has one. A record others could have written
    /// (not ours, or group/world-writable) is refused like a missing trust.
    pub fn get(&self, volume_id: &str) -> Result<Option<TrustRecord>> {
        let path = self.path(volume_id)?;
        let raw = match crate::sys::atomic_file::read(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(e, format!("reading trust record {}", path.display()))),
        };
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(e, format!("{}", path.display())))?;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(Error::untrusted(format!(
                "trust record {} is not owned by uid {me} or is writable by others: fix or remove it",
                path.display()
            )));
        }
        let text = String::from_utf8_lossy(&raw);
        let rec: TrustRecord = toml::from_str(&text)
            .map_err(|e| Error::untrusted(format!("trust record {} is damaged: {}", path.display(), e.message())))?;
        if !rec.volume_id.eq_ignore_ascii_case(volume_id) {
            return Err(Error::untrusted(format!("trust record {} names another volume", path.display())));
        }
        Ok(Some(rec))
    }

    pub fn put(&self, rec: &TrustRecord) -> Result<()> {
        let path = self.path(&rec.volume_id)?;
        let ctx = |e| Error::io(e, format!("writing trust record {}", path.display()));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(ctx)?;
        }
        let text = format!(
            "# envelopefs: what this host trusts about volume {}. Written by init, trust and opens.\n{}",
            rec.volume_id,
            toml::to_string(rec).expect("record serializes")
        );
        crate::sys::atomic_file::replace(&path, text.as_bytes(), 0o600).map_err(ctx)
    }
}

/// The settings of every key slot to use for `cfg` (the primary first), from the host:
/// the record's, after checking the volume says the same; or, with no record, the
/// volume's own only where they choose no code, no endpoint and no key (a local keyring
/// inside the volume, which its secret authenticates; a recovery recipient, used only to
/// wrap once the config has authenticated).
///
/// A recovery open (`recovering`) uses only the recovery slots, so on a host with no
/// record the others need no pinning (the volume check value authenticates the volume).
pub fn settle(
    root: &Path,
    cfg: &VolumeConfig,
    trusted: Option<&TrustRecord>,
    recovering: bool,
) -> Result<Vec<ProviderConfig>> {
    match trusted {
        Some(t) => {
            let mut diffs = t.provider.differences(&cfg.provider);
            if t.slots.len() != cfg.slots.len() {
                diffs.push(format!(
                    "key slots: this host trusts {}, the volume has {}",
                    t.slots.len() + 1,
                    cfg.slots.len() + 1
                ));
            } else {
                for (i, (a, b)) in t.slots.iter().zip(&cfg.slots).enumerate() {
                    diffs.extend(a.differences(&b.provider).into_iter().map(|d| format!("slot {}: {d}", i + 1)));
                }
            }
            if !diffs.is_empty() {
                return Err(Error::untrusted(format!(
                    "{}/envelopefs.toml names provider settings this host does not trust ({}). \
                     If the change is yours (a --to-key or key slot change on another host), check it and run \
                     `envelopefs trust {}`",
                    root.display(),
                    diffs.join("; "),
                    root.display()
                )));
            }
            if t.geometry.is_some_and(|g| g != [cfg.block_size, cfg.header_size]) {
                return Err(Error::tampered(format!(
                    "{}/envelopefs.toml says block size {} and header size {}, not what this host pinned ({:?})",
                    root.display(),
                    cfg.block_size,
                    cfg.header_size,
                    t.geometry
                )));
            }
            if cfg.format < t.format {
                return Err(Error::tampered(format!(
                    "{}/envelopefs.toml says format {} but this host opens this volume as format {}: \
                     a config swapped for an older format's is refused",
                    root.display(),
                    cfg.format,
                    t.format
                )));
            }
            // The stored object lists are authenticated by the MAC; the rest is the host's,
            // and a module is loaded from the file checked when it was pinned.
            let with_objects = |host: &ProviderConfig, stored: &ProviderConfig| -> Result<ProviderConfig> {
                let mut p = host.clone();
                if let (ProviderConfig::Pkcs11 { objects, module, .. }, ProviderConfig::Pkcs11 { objects: o, .. }) =
                    (&mut p, stored)
                {
                    objects.clone_from(o);
                    match t.module_files.get(module.as_str()) {
                        Some(file) => *module = file.clone(),
                        None if plain_absolute(module) => {}
                        None => {
                            return Err(Error::untrusted(format!(
                                "this host's record pins PKCS#11 module {module:?}, not a plain absolute path: \
                                 never loaded; pin the module again with `envelopefs trust --module FILE {}`",
                                root.display()
                            )))
                        }
                    }
                }
                Ok(p)
            };
            std::iter::once(with_objects(&t.provider, &cfg.provider))
                .chain(t.slots.iter().zip(&cfg.slots).map(|(h, s)| with_objects(h, &s.provider)))
                .collect()
        }
        None => {
            for p in cfg.policy() {
                match p {
                    ProviderConfig::Local { keyring } if keyring == KEYRING_NAME => {}
                    ProviderConfig::Recovery { .. } => {}
                    _ if recovering => {}
                    other => {
                        return Err(Error::untrusted(format!(
                            "this host does not trust volume {} in {} yet: its {} settings choose {}. \
                             Check them and pin them with `envelopefs trust {}`",
                            cfg.volume_id,
                            root.display(),
                            other.kind().name(),
                            match other {
                                ProviderConfig::Pkcs11 { .. } => "code to load (a PKCS#11 module) and a key",
                                ProviderConfig::AwsKms { .. } => "a KMS key and where to reach it",
                                _ => "a keyring outside the volume",
                            },
                            root.display()
                        )))
                    }
                }
            }
            Ok(cfg.policy().cloned().collect())
        }
    }
}

/// What the admin said to `envelopefs trust` beyond "yes".
#[derive(Default)]
pub struct Pinning<'a> {
    /// The PKCS#11 module they confirm (for one p11-kit does not list).
    pub module: Option<&'a Path>,
    /// The format they accept for a config that has no MAC (format 1).
    pub accept_format: Option<u32>,
    /// Accept a keyring and config older than this host has seen (a restored backup).
    pub accept_rollback: bool,
}

/// The record `envelopefs trust` would pin for `cfg`: its settings as they stand, after
/// the checks a host makes before trusting code. A PKCS#11 module must be registered with
/// p11-kit or named by the admin (`module`), and never lies inside the backing directory.
/// What this host has seen already (keyring and config generations) is kept.
pub fn candidate(
    root: &Path,
    cfg: &VolumeConfig,
    asked: &Pinning<'_>,
    existing: Option<&TrustRecord>,
) -> Result<TrustRecord> {
    let (module, accept_format) = (asked.module, asked.accept_format);
    // Format 1 has no MAC: anyone who can write the backing directory can present any
    // volume's config as format 1 (names in the clear, nothing authenticated).
    if !cfg.features().authenticated && accept_format != Some(cfg.format) {
        return Err(Error::untrusted(format!(
            "{}/envelopefs.toml says format {}: unauthenticated, and what a downgrade would look like. \
             If this volume is really that old, say so with `envelopefs trust --accept-format {} {}`, \
             then make it format 2 with `envelopefs upgrade`",
            root.display(),
            cfg.format,
            cfg.format,
            root.display()
        )));
    }
    let mut rec = TrustRecord::for_config(cfg);
    if let Some(old) = existing {
        // Accepting a rollback (a restored backup) forgets the newest keyring and config
        // this host saw; the open that follows records the ones there now.
        if !asked.accept_rollback {
            rec.keyring_version = old.keyring_version;
            rec.config_generation = rec.config_generation.max(old.config_generation);
        }
        rec.format = rec.format.max(old.format);
        // The volume key does not change: what was recorded keeps checking it.
        rec.volume_check.clone_from(&old.volume_check);
    }
    let modules: Vec<&String> = std::iter::once(&rec.provider)
        .chain(&rec.slots)
        .filter_map(|p| match p {
            ProviderConfig::Pkcs11 { module, .. } => Some(module),
            _ => None,
        })
        .collect();
    let mut files = Vec::new();
    for stored in modules {
        if !plain_absolute(stored) {
            return Err(Error::untrusted(format!(
                "the volume names PKCS#11 module {:?}: not a plain absolute path (no `.` or `..`), never loaded",
                stored
            )));
        }
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let stored_c = canon(Path::new(stored));
        files.push((stored.clone(), stored_c.to_string_lossy().into_owned()));
        if stored_c.starts_with(canon(root)) {
            return Err(Error::untrusted(format!(
                "the volume names PKCS#11 module {stored}, inside its own backing directory: never loaded"
            )));
        }
        match module {
            Some(m) if canon(m) == stored_c => {}
            Some(m) => {
                return Err(Error::untrusted(format!(
                    "the volume names PKCS#11 module {stored}, not {}: check which one this host should load",
                    m.display()
                )))
            }
            None if p11kit_modules().contains(&stored_c) => {}
            None => {
                return Err(Error::untrusted(format!(
                    "PKCS#11 module {stored} is not registered with p11-kit on this host; \
                     if you trust it, name it: envelopefs trust --module {stored} {}",
                    root.display()
                )))
            }
        }
    }
    rec.module_files = files.into_iter().collect();
    if let Some(old) = existing {
        rec.places.clone_from(&old.places);
    }
    rec.add_place(root);
    Ok(rec)
}

/// What a record pins, one setting a line, for a person to confirm.
pub fn describe(rec: &TrustRecord) -> Vec<String> {
    let mut out = vec![format!("volume    {}", rec.volume_id), format!("format    {}", rec.format)];
    match &rec.provider {
        ProviderConfig::Local { keyring } => out.push(format!("keyring   {keyring}")),
        ProviderConfig::Pkcs11 { module, key, previous_keys, .. } => {
            out.push(format!("module    {module}  (code this host will load)"));
            out.push(format!("key       {key}"));
            out.extend(previous_keys.iter().map(|k| format!("previous  {k}")));
        }
        ProviderConfig::AwsKms { key_id, previous_key_ids, intermediate_key, region, endpoint } => {
            out.push(format!("KMS key   {key_id}"));
            out.extend(previous_key_ids.iter().map(|k| format!("previous  {k}")));
            out.push(format!("region    {}", region.as_deref().unwrap_or("(the AWS defaults)")));
            out.push(format!("endpoint  {}", endpoint.as_deref().unwrap_or("(the AWS defaults)")));
            out.push(format!("mode      {}", if *intermediate_key { "intermediate key" } else { "per-file keys" }));
        }
        ProviderConfig::Recovery { recipient } => out.push(format!("recovery  {recipient}")),
    }
    for (i, s) in rec.slots.iter().enumerate() {
        out.push(format!("slot {}    {}", i + 1, s.summary()));
        if let ProviderConfig::Pkcs11 { module, .. } = s {
            out.push(format!("          {module}  (code this host will load)"));
        }
        if let ProviderConfig::AwsKms { endpoint, .. } = s {
            out.push(format!("          endpoint {}", endpoint.as_deref().unwrap_or("(the AWS defaults)")));
        }
    }
    out
}

/// Modules registered with p11-kit, the host's list of trusted PKCS#11 modules
/// (`module:` lines of `*.module` files), as canonical paths.
pub fn p11kit_modules() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["/etc/pkcs11/modules", "/usr/share/p11-kit/modules"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            if e.path().extension().is_none_or(|x| x != "module") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
            for line in text.lines() {
                if let Some(m) = line.trim().strip_prefix("module:") {
                    let m = Path::new(m.trim());
                    let full = if m.is_absolute() { m.to_owned() } else { p11kit_default_dir().join(m) };
                    if let Ok(c) = std::fs::canonicalize(full) {
                        out.push(c);
                    }
                }
            }
        }
    }
    out
}

fn p11kit_default_dir() -> PathBuf {
    let multiarch = format!("/usr/lib/{}-linux-gnu/pkcs11", std::env::consts::ARCH);
    if Path::new(&multiarch).is_dir() {
        PathBuf::from(multiarch)
    } else {
        PathBuf::from("/usr/lib/pkcs11")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(provider: ProviderConfig) -> VolumeConfig {
        VolumeConfig {
            format: 2,
            volume_id: "ab".repeat(16),
            block_size: 4096,
            header_size: 4096,
            generation: 1,
            mac: None,
            provider,
            volume_key: None,
            slots: vec![],
            names: None,
            shared: false,
            upgrading: false,
        }
    }

    #[test]
    fn records_round_trip_and_others_records_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let store = TrustStore::at(&d.path().join("trust"));
        let c = cfg(ProviderConfig::Local { keyring: KEYRING_NAME.into() });
        assert_eq!(store.get(&c.volume_id).unwrap(), None);
        let rec = TrustRecord::for_config(&c);
        store.put(&rec).unwrap();
        assert_eq!(store.get(&c.volume_id).unwrap(), Some(rec));
        let path = d.path().join("trust").join(format!("{}.toml", c.volume_id));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(store.get(&c.volume_id).unwrap_err().class(), Some(crate::error::Class::Untrusted));
        assert!(store.get("../../etc/passwd").is_err());
    }

    #[test]
    fn without_a_record_only_an_inside_keyring_opens() {
        let root = Path::new("/b");
        let local = cfg(ProviderConfig::Local { keyring: KEYRING_NAME.into() });
        assert!(settle(root, &local, None, false).is_ok());
        let outside = cfg(ProviderConfig::Local { keyring: "/etc/k".into() });
        assert!(settle(root, &outside, None, false).unwrap_err().to_string().contains("envelopefs trust"));
        let p11 = cfg(ProviderConfig::Pkcs11 {
            module: "/x.so".into(),
            key: "pkcs11:token=t;object=k".into(),
            objects: vec![],
            previous_keys: vec![],
        });
        assert!(settle(root, &p11, None, false).is_err());
        // With a record: the host's settings, and the downgrade rule.
        let rec = TrustRecord::for_config(&local);
        let mut v1 = local.clone();
        v1.format = 1;
        assert!(settle(root, &v1, Some(&rec), false).unwrap_err().to_string().contains("format 1"));
        assert!(settle(root, &p11, Some(&rec), false).unwrap_err().to_string().contains("kind: this host trusts"));
    }

    #[test]
    fn key_slots_are_pinned_like_the_primary() {
        let root = Path::new("/b");
        let recipient = age::x25519::Identity::generate().to_public().to_string();
        let wrapped = crate::volume::config::WrappedKey { kek_id: "k".into(), kek_version: 1, wrapped: "aa".into() };
        let slot = |p: ProviderConfig| crate::volume::config::SlotConfig { provider: p, volume_key: wrapped.clone() };
        let mut local = cfg(ProviderConfig::Local { keyring: KEYRING_NAME.into() });
        local.format = 3;
        local.slots.push(slot(ProviderConfig::Recovery { recipient }));
        // A recovery recipient chooses no code and no endpoint: no record needed.
        assert_eq!(settle(root, &local, None, false).unwrap().len(), 2);
        let rec = TrustRecord::for_config(&local);
        let mut more = local.clone();
        more.slots.push(slot(ProviderConfig::AwsKms {
            key_id: "arn:aws:kms:eu-west-1:1:key/x".into(),
            previous_key_ids: vec![],
            intermediate_key: false,
            region: None,
            endpoint: Some("https://evil.example".into()),
        }));
        let e = settle(root, &more, Some(&rec), false).unwrap_err();
        assert_eq!(e.class(), Some(crate::error::Class::Untrusted));
        assert!(e.to_string().contains("key slots: this host trusts 2, the volume has 3"), "{e}");
        assert!(settle(root, &more, None, false).unwrap_err().to_string().contains("envelopefs trust"));
        // A recovery open uses only the recovery slots: the others need no pinning.
        assert!(settle(root, &more, None, true).is_ok());
        let mut other = TrustRecord::for_config(&more);
        if let ProviderConfig::AwsKms { endpoint, .. } = &mut other.slots[1] {
            *endpoint = None;
        }
        assert!(settle(root, &more, Some(&other), false).unwrap_err().to_string().contains("slot 2: endpoint"));
    }
}
