//! `envelopefs.toml`: the volume's parameters. It lives in the untrusted backing directory,
//! so nothing here is used before it is checked: its shape when parsed, the settings that
//! choose code, endpoints and keys against the host's trust record (`trust`), and, from
//! format 2 on, its MAC under a key only KEK holders can unwrap (docs/FORMAT.md §1).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::crypto::VolumeKey;
use crate::error::{Class, Error, Result};
use crate::format::{Geometry, KeyRecord, ProviderKind};
use crate::keys::pkcs11::Pkcs11Uri;
use crate::keys::secret::SecretKind;
use crate::keys::VolumeId;

pub const CONFIG_NAME: &str = "envelopefs.toml";
pub const KEYRING_NAME: &str = "envelopefs.keyring";
/// The format new volumes get: hidden names, xattr values bound to their file.
/// `init --plaintext-names` makes format 2 (format 3 once it has key slots), which the
/// releases before read.
pub const FORMAT: u32 = BOUND_XATTRS_FORMAT;
/// The format a plaintext-names volume starts at.
pub const PLAINTEXT_NAMES_FORMAT: u32 = 2;
/// The format a plaintext-names volume with key slots is.
pub const SLOTS_FORMAT: u32 = 3;
/// The format with hidden names (and key slots, if it has any).
pub const NAMES_FORMAT: u32 = 4;
/// How format 4 encrypts names (docs/FORMAT.md §10).
pub const NAMES_SCHEME: &str = "aes-siv";
/// The format whose config may say `shared` (several hosts mount it; docs/SHARING.md).
pub const SHARED_FORMAT: u32 = 5;
/// The format whose regular files' xattr values are bound to their file id (§12).
pub const BOUND_XATTRS_FORMAT: u32 = 6;
/// The formats this version opens.
pub const FORMATS: [u32; 6] = [1, 2, 3, 4, 5, 6];

/// What a format gives a volume: the one place a format number becomes features, so no
/// check elsewhere compares numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// An authenticated config and a volume key (format 2).
    pub authenticated: bool,
    /// Key slots beyond the primary may be listed (format 3).
    pub slots: bool,
    /// Hidden names, symlink targets and xattrs (format 4).
    pub names: bool,
    /// The config may say `shared` (format 5).
    pub shared: bool,
    /// Regular files' xattr values bound to their file id (format 6).
    pub bound_xattrs: bool,
}

impl Features {
    pub fn of(format: u32) -> Self {
        Self {
            authenticated: format >= 2,
            slots: format >= SLOTS_FORMAT,
            names: format >= NAMES_FORMAT,
            shared: format >= SHARED_FORMAT,
            bound_xattrs: format >= BOUND_XATTRS_FORMAT,
        }
    }
}
const MAC_LABEL: &str = "envelopefs v2 config mac";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub format: u32,
    pub volume_id: String,
    pub block_size: u32,
    pub header_size: u32,
    /// Bumped on every rewrite (format 2): the host refuses an older one than it has seen.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// HMAC-SHA256 over everything else (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub provider: ProviderConfig,
    /// The volume key, wrapped by the KEK like a file's DEK (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_key: Option<WrappedKey>,
    /// Key slots beyond the primary `provider` (format 3): each wraps the volume key and
    /// every file's DEK, and any one of them opens the volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<SlotConfig>,
    /// How names, symlink targets and xattrs are encrypted (format 4: "aes-siv").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<String>,
    /// Several hosts mount it at once (format 5; docs/SHARING.md).
    #[serde(default, skip_serializing_if = "is_false")]
    pub shared: bool,
    /// An `upgrade` to format 6 has not finished sealing xattr values anew: mounts are
    /// refused until `upgrade` runs to its end (format 6 only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub upgrading: bool,
}

/// One key slot beyond the primary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    pub provider: ProviderConfig,
    /// The volume key, wrapped by this slot's KEK.
    pub volume_key: WrappedKey,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum ProviderConfig {
    /// A keyring file; a relative path is relative to the backing directory.
    #[serde(rename = "local")]
    Local { keyring: String },
    /// A key in a PKCS#11 token: the module to load and the key's URI (no PIN).
    #[serde(rename = "pkcs11")]
    Pkcs11 {
        module: String,
        key: String,
        /// The key objects (labels) the volume was created with or rotated to (format 2):
        /// no other object in the token is ever used.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        objects: Vec<String>,
        /// Keys (URIs) of the same token the volume used before `rekey --to-key`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        previous_keys: Vec<String>,
    },
    /// An AWS KMS key (its ARN). Region and endpoint are optional: the usual AWS settings
    /// (AWS_REGION, profiles, AWS_ENDPOINT_URL_KMS) apply when absent.
    #[serde(rename = "aws-kms")]
    AwsKms {
        key_id: String,
        /// Keys the volume used before `rekey --to-key`: records naming them still unwrap.
        /// Records naming any other key are refused, whatever the KMS would allow.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        previous_key_ids: Vec<String>,
        /// Wrap DEKs under a KMS-wrapped intermediate key (S3-Bucket-Key style).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        intermediate_key: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
    /// An offline recovery recipient (age X25519, `age1…`): a key slot only, never the
    /// primary; wrapping needs no secret, unwrapping needs the identity.
    #[serde(rename = "recovery")]
    Recovery { recipient: String },
}

impl std::fmt::Display for ProviderConfig {
    /// For people: what the volume's keys live in (no secrets are in a config).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProviderConfig::Local { keyring } => write!(f, "local keyring {keyring}"),
            ProviderConfig::Pkcs11 { module, key, .. } => write!(f, "PKCS#11 key {key} (module {module})"),
            ProviderConfig::AwsKms { key_id, intermediate_key, region, endpoint, .. } => {
                write!(f, "AWS KMS key {key_id}")?;
                if let Some(r) = region {
                    write!(f, ", region {r}")?;
                }
                if let Some(e) = endpoint {
                    write!(f, ", endpoint {e}")?;
                }
                if *intermediate_key {
                    write!(f, ", through an intermediate key")?;
                }
                Ok(())
            }
            ProviderConfig::Recovery { recipient } => write!(f, "offline recovery recipient {recipient}"),
        }
    }
}

/// A TOML error with the line it is on, for people editing or reading the file.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    // The parser's message may run over lines ("invalid table header\nexpected …"): one
    // line, since error output escapes control characters.
    let message = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    match e.span() {
        Some(span) => format!("line {}: {message}", text[..span.start.min(text.len())].matches('\n').count() + 1),
        None => message,
    }
}

/// A wrapped key as the config stores it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    pub kek_id: String,
    pub kek_version: u32,
    /// Hex.
    pub wrapped: String,
}

impl WrappedKey {
    pub fn from_record(r: &KeyRecord) -> Self {
        Self { kek_id: r.kek_id.clone(), kek_version: r.kek_version, wrapped: hex::encode(&r.wrapped) }
    }

    pub fn record(&self, provider: ProviderKind) -> Result<KeyRecord> {
        let wrapped = hex::decode(&self.wrapped)
            .map_err(|_| Error::tampered(format!("{CONFIG_NAME}: volume_key.wrapped is not hex")))?;
        Ok(KeyRecord { provider, kek_id: self.kek_id.clone(), kek_version: self.kek_version, wrapped })
    }
}

impl VolumeConfig {
    /// Read and check the shape of `envelopefs.toml` (never through a symlink). Nothing in
    /// it is authenticated yet.
    pub fn load(root: &Path) -> Result<Self> {
        let path = root.join(CONFIG_NAME);
        let raw = match crate::sys::atomic_file::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(Error::new(
                    libc::ENOENT,
                    format!(
                        "{} is not an envelopefs volume (no {CONFIG_NAME}); create one with `envelopefs init`",
                        root.display()
                    ),
                )
                .with_class(Class::NotVolume))
            }
            Err(e) => return Err(Error::io(e, format!("reading {}", path.display())).with_class(Class::Tampered)),
        };
        Self::parse(&raw).map_err(|e| e.context(format!("{} is damaged", path.display())))
    }

    /// Parse and check the shape of a config's bytes (the fuzz target's entry point).
    pub fn parse(raw: &[u8]) -> Result<Self> {
        let damaged = |why: String| Error::tampered(why);
        let text = std::str::from_utf8(raw).map_err(|_| damaged("not UTF-8".into()))?;
        let cfg: VolumeConfig = toml::from_str(text).map_err(|e| damaged(toml_error(text, &e)))?;
        cfg.check_shape()?;
        Ok(cfg)
    }

    fn check_shape(&self) -> Result<()> {
        if !FORMATS.contains(&self.format) {
            return Err(Error::new(
                libc::EINVAL,
                format!("format {} is not supported by this version (it reads formats 1 to 6)", self.format),
            )
            .with_class(Class::Tampered));
        }
        let has = self.features();
        let v2_fields = self.generation > 0 && self.mac.is_some() && self.volume_key.is_some();
        let v1_fields = self.generation == 0 && self.mac.is_none() && self.volume_key.is_none();
        if (has.authenticated && !v2_fields) || (!has.authenticated && !v1_fields) {
            return Err(Error::tampered(format!(
                "format {} with the fields of another format (generation, mac, volume_key)",
                self.format
            )));
        }
        if !self.slots.is_empty() && !has.slots {
            return Err(Error::tampered(format!("format {} with key slots (format 3 has them)", self.format)));
        }
        match (&self.names, has.names) {
            (None, false) => {}
            (Some(n), true) if n == NAMES_SCHEME => {}
            (Some(n), true) => {
                return Err(Error::tampered(format!("names = {n:?} is not a scheme this version knows")))
            }
            (_, true) => return Err(Error::tampered(format!("format {} without its names scheme", self.format))),
            (Some(_), false) => {
                return Err(Error::tampered(format!("format {} with hidden names (format 4 has them)", self.format)))
            }
        }
        if self.shared && !has.shared {
            return Err(Error::tampered(format!("format {} that says shared (format 5 does)", self.format)));
        }
        if self.upgrading && !has.bound_xattrs {
            return Err(Error::tampered(format!("format {} that says upgrading (format 6 does)", self.format)));
        }
        if matches!(self.provider, ProviderConfig::Recovery { .. }) {
            return Err(Error::tampered("a recovery recipient is never the primary key slot"));
        }
        let locals = self.policy().filter(|p| matches!(p, ProviderConfig::Local { .. })).count();
        if locals > 1 {
            return Err(Error::tampered("more than one local keyring slot"));
        }
        self.volume_id()?;
        self.geometry()?;
        self.policy().try_for_each(ProviderConfig::check_stored)
    }

    /// What the volume's format gives it.
    pub fn features(&self) -> Features {
        Features::of(self.format)
    }

    /// Every key slot's settings, the primary first (slot 0).
    pub fn policy(&self) -> impl Iterator<Item = &ProviderConfig> {
        std::iter::once(&self.provider).chain(self.slots.iter().map(|s| &s.provider))
    }

    /// Slot `i`'s wrapped volume key (format 2 and later).
    pub fn slot_volume_key(&self, i: usize) -> Option<&WrappedKey> {
        match i {
            0 => self.volume_key.as_ref(),
            n => self.slots.get(n - 1).map(|s| &s.volume_key),
        }
    }

    pub fn volume_id(&self) -> Result<VolumeId> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(&self.volume_id, &mut id)
            .map_err(|_| Error::tampered(format!("{CONFIG_NAME}: volume_id must be 32 hex digits")))?;
        Ok(id)
    }

    pub fn geometry(&self) -> Result<Geometry> {
        Geometry::new(self.header_size, self.block_size).map_err(|e| e.context(CONFIG_NAME).with_class(Class::Tampered))
    }

    /// The local keyring's path, for local volumes.
    pub fn keyring_path(&self, root: &Path) -> Option<std::path::PathBuf> {
        self.policy().find_map(|p| match p {
            ProviderConfig::Local { keyring } => Some(root.join(keyring)),
            _ => None,
        })
    }

    /// What the MAC covers: every field but the MAC, in a fixed encoding.
    fn mac_input(&self) -> Vec<u8> {
        let mut unsealed = self.clone();
        unsealed.mac = None;
        let mut out = b"envelopefs config v2\n".to_vec();
        out.extend(serde_json::to_vec(&unsealed).expect("config serializes"));
        out
    }

    /// Set the MAC (format 2).
    pub fn seal(&mut self, key: &VolumeKey) {
        self.mac = Some(hex::encode(key.mac(MAC_LABEL, &self.mac_input())));
    }

    /// Check the MAC: any edit of any field fails here.
    pub fn verify(&self, key: &VolumeKey) -> Result<()> {
        let tag = self.mac.as_deref().and_then(|m| hex::decode(m).ok()).unwrap_or_default();
        if key.verify(MAC_LABEL, &self.mac_input(), &tag) {
            Ok(())
        } else {
            Err(Error::tampered(format!(
                "{CONFIG_NAME} does not authenticate under the volume key: it was edited outside envelopefs \
                 (restore it from a backup)"
            )))
        }
    }
}

impl ProviderConfig {
    /// The secret opening the volume needs from the user, if any (KMS needs none).
    pub fn secret_kind(&self) -> Option<SecretKind> {
        match self {
            ProviderConfig::Local { .. } => Some(SecretKind::Keyring),
            ProviderConfig::Pkcs11 { .. } => Some(SecretKind::Pin),
            ProviderConfig::AwsKms { .. } | ProviderConfig::Recovery { .. } => None,
        }
    }

    pub fn kind(&self) -> ProviderKind {
        match self {
            ProviderConfig::Local { .. } => ProviderKind::Local,
            ProviderConfig::Pkcs11 { .. } => ProviderKind::Pkcs11,
            ProviderConfig::AwsKms { .. } => ProviderKind::AwsKms,
            ProviderConfig::Recovery { .. } => ProviderKind::Recovery,
        }
    }

    /// Whether a header's key record is this slot's (its key, or one it moved from);
    /// records of no slot are dropped by `rekey --rewrap`.
    pub fn claims(&self, rec: &KeyRecord) -> bool {
        if rec.provider != self.kind() {
            return false;
        }
        match self {
            ProviderConfig::Local { .. } => true,
            ProviderConfig::Pkcs11 { key, previous_keys, .. } => {
                rec.kek_id == *key || previous_keys.contains(&rec.kek_id)
            }
            ProviderConfig::AwsKms { key_id, previous_key_ids, .. } => std::iter::once(key_id)
                .chain(previous_key_ids)
                .any(|k| *k == rec.kek_id || crate::keys::aws_kms::mrk_equivalent(k, &rec.kek_id)),
            ProviderConfig::Recovery { recipient } => rec.kek_id == *recipient,
        }
    }

    /// One line naming the slot's key, for `key slot list` and logs.
    pub fn summary(&self) -> String {
        match self {
            ProviderConfig::Local { keyring } => format!("local keyring {keyring}"),
            ProviderConfig::Pkcs11 { module, key, .. } => format!("pkcs11 {key} via {module}"),
            ProviderConfig::AwsKms { key_id, region, intermediate_key, .. } => format!(
                "aws-kms {key_id}{}{}",
                region.as_ref().map(|r| format!(" in {r}")).unwrap_or_default(),
                if *intermediate_key { " (intermediate key)" } else { "" }
            ),
            ProviderConfig::Recovery { recipient } => format!("recovery {recipient}"),
        }
    }

    /// Refuse stored settings no host should ever take from a backing directory: a PIN
    /// source or module path inside a stored key URI, a relative keyring path other than
    /// the default, plain http to a remote KMS endpoint.
    pub fn check_stored(&self) -> Result<()> {
        let bad = |why: String| Error::new(libc::EINVAL, format!("{CONFIG_NAME}: {why}")).with_class(Class::Tampered);
        match self {
            ProviderConfig::Local { keyring } => {
                let p = Path::new(keyring);
                if p.is_relative() && keyring != KEYRING_NAME {
                    return Err(bad(format!("keyring {keyring:?}: a keyring inside the volume has the default name")));
                }
            }
            ProviderConfig::Pkcs11 { key, previous_keys, objects, .. } => {
                for k in std::iter::once(key).chain(previous_keys) {
                    let uri: Pkcs11Uri = k.parse().map_err(|e| bad(format!("key {k:?}: {e}")))?;
                    if uri.pin_source.is_some() || uri.module_path.is_some() || uri.key_id() != *k {
                        return Err(bad(format!(
                            "key {k:?}: a stored key URI names the key only (no pin-source, no module-path)"
                        )));
                    }
                }
                if let Some(o) = objects.iter().find(|o| o.is_empty() || o.contains(['\0', '\n'])) {
                    return Err(bad(format!("object label {o:?}")));
                }
            }
            ProviderConfig::AwsKms { endpoint, .. } => {
                if let Some(url) = endpoint {
                    check_endpoint(url).map_err(|e| e.context(CONFIG_NAME).with_class(Class::Tampered))?;
                }
            }
            ProviderConfig::Recovery { recipient } => {
                crate::keys::recovery::parse_recipient(recipient).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The settings a host pins: everything but the PKCS#11 object list, which the
    /// volume's MAC covers and rotation changes.
    pub fn host_view(&self) -> ProviderConfig {
        let mut v = self.clone();
        if let ProviderConfig::Pkcs11 { objects, .. } = &mut v {
            objects.clear();
        }
        v
    }

    /// Each setting in which `stored` differs from this (trusted) one, named.
    pub fn differences(&self, stored: &ProviderConfig) -> Vec<String> {
        let as_map = |p: &ProviderConfig| match serde_json::to_value(p.host_view()) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => Default::default(),
        };
        let (a, b) = (as_map(self), as_map(stored));
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&serde_json::Value>| v.map_or("nothing".to_owned(), |v| v.to_string());
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| format!("{k}: this host trusts {}, the volume says {}", show(a.get(k)), show(b.get(k))))
            .collect()
    }
}

/// KMS endpoints: https, or plain http to this machine only (a local proxy or test
/// server); data keys cross the wire in the clear under http.
pub fn check_endpoint(url: &str) -> Result<()> {
    if url.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return Ok(());
        }
    }
    Err(Error::new(libc::EINVAL, format!("KMS endpoint {url:?}: use https (plain http only to a loopback address)"))
        .with_class(Class::Usage))
}

#[cfg(test)]
mod tests;
