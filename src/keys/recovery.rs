//! The `recovery` key slot: an offline age X25519 recipient (`age1…`, as SOPS and age
//! take). Wrapping needs only the public key, so every host can add a record for it; only
//! the holder of the identity (`AGE-SECRET-KEY-1…`, on paper or a YubiKey) unwraps.
//!
//! Anyone can encrypt to a public key, so a record alone proves nothing: whoever can
//! write the backing directory could plant a file with a data key of their own that a
//! recovery mount would then read as the owner's. Each file record therefore also carries
//! an HMAC under a key derived from the authenticated volume key, which an outsider does
//! not have (docs/FORMAT.md §9, docs/THREAT-MODEL.md).

use std::str::FromStr;
use std::sync::RwLock;

use zeroize::Zeroizing;

use super::{KekVersionInfo, KeyContext, KeyProvider};
use crate::crypto::{Dek, VolumeKey};
use crate::error::{Error, Result};
use crate::format::{KeyRecord, ProviderKind, FILE_ID_LEN};

const PAYLOAD_LABEL: &[u8] = b"envelopefs recovery v1";
const RECORD_MAC_LABEL: &str = "envelopefs v3 recovery record";
const MAC_LEN: usize = 32;
/// A recovery record's only version: a recipient never changes (add another slot instead).
const VERSION: u32 = 1;

/// Parse an age X25519 recipient, refusing anything else (an SSH key, a plugin).
pub fn parse_recipient(s: &str) -> Result<age::x25519::Recipient> {
    age::x25519::Recipient::from_str(s)
        .map_err(|e| Error::new(libc::EINVAL, format!("recovery recipient {s:?} is not an age X25519 recipient: {e}")))
}

/// Read an age identity file: its first `AGE-SECRET-KEY-1…` line (comments and blank lines
/// are skipped, as age itself does).
pub fn read_identity(path: &std::path::Path) -> Result<age::x25519::Identity> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| Error::io(e, format!("reading recovery key {}", path.display())))?,
    );
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .ok_or_else(|| Error::new(libc::EINVAL, format!("{}: no AGE-SECRET-KEY-1 line", path.display())))?;
    age::x25519::Identity::from_str(line)
        .map_err(|e| Error::new(libc::EINVAL, format!("{}: not an age X25519 identity: {e}", path.display())))
}

pub struct RecoveryProvider {
    recipient: age::x25519::Recipient,
    recipient_text: String,
    identity: Option<age::x25519::Identity>,
    /// The volume key, once authenticated: keys the records' MACs.
    volume_key: RwLock<Option<VolumeKey>>,
}

impl RecoveryProvider {
    /// A slot for `recipient`; with `identity` it unwraps too (which must be its own).
    pub fn new(recipient: &str, identity: Option<age::x25519::Identity>) -> Result<Self> {
        let parsed = parse_recipient(recipient)?;
        if let Some(id) = &identity {
            if id.to_public().to_string() != parsed.to_string() {
                return Err(Error::access(format!(
                    "the recovery key is for {}, not for this volume's recipient {recipient}",
                    id.to_public()
                )));
            }
        }
        Ok(Self { recipient: parsed, recipient_text: recipient.to_owned(), identity, volume_key: RwLock::new(None) })
    }

    fn payload(ctx: &KeyContext<'_>, dek: &Dek) -> Zeroizing<Vec<u8>> {
        let mut p = Zeroizing::new(Vec::with_capacity(PAYLOAD_LABEL.len() + 16 + FILE_ID_LEN + 32));
        p.extend_from_slice(PAYLOAD_LABEL);
        p.extend_from_slice(ctx.volume_id);
        p.extend_from_slice(ctx.file_id);
        p.extend_from_slice(dek.expose());
        p
    }

    fn mac_input(ctx: &KeyContext<'_>, sealed: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(16 + FILE_ID_LEN + sealed.len());
        m.extend_from_slice(ctx.volume_id);
        m.extend_from_slice(ctx.file_id);
        m.extend_from_slice(sealed);
        m
    }

    /// The key the record's MAC is under: the bound volume key, or for the volume key's
    /// own record the key it holds (which proves only that the record is whole; the host's
    /// volume check value is what authenticates a volume key opened this way).
    fn with_mac_key<T>(&self, ctx: &KeyContext<'_>, own: Option<&Dek>, f: impl FnOnce(&VolumeKey) -> T) -> Result<T> {
        if let Some(dek) = own.filter(|_| is_volume_key(ctx)) {
            return Ok(f(&VolumeKey::from_dek(dek)));
        }
        match &*self.volume_key.read().unwrap() {
            Some(k) => Ok(f(k)),
            None => Err(Error::access("the recovery slot has no authenticated volume key yet")),
        }
    }
}

fn is_volume_key(ctx: &KeyContext<'_>) -> bool {
    *ctx.file_id == crate::format::VOLUME_KEY_FILE_ID
}

impl KeyProvider for RecoveryProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Recovery
    }

    fn describe(&self) -> String {
        format!("recovery recipient {}", self.recipient_text)
    }

    fn kek_id(&self) -> String {
        self.recipient_text.clone()
    }

    fn generate(&self, ctx: &KeyContext<'_>) -> Result<(Dek, KeyRecord)> {
        let dek = Dek::generate()?;
        let rec = self.wrap(&dek, ctx)?;
        Ok((dek, rec))
    }

    fn wrap(&self, dek: &Dek, ctx: &KeyContext<'_>) -> Result<KeyRecord> {
        let mut wrapped = age::encrypt(&self.recipient, &Self::payload(ctx, dek))
            .map_err(|e| Error::new(libc::EIO, format!("age encryption to {}: {e}", self.recipient_text)))?;
        let tag = self.with_mac_key(ctx, Some(dek), |k| k.mac(RECORD_MAC_LABEL, &Self::mac_input(ctx, &wrapped)))?;
        wrapped.extend_from_slice(&tag);
        Ok(KeyRecord {
            provider: ProviderKind::Recovery,
            kek_id: self.recipient_text.clone(),
            kek_version: VERSION,
            wrapped,
        })
    }

    fn unwrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<Dek> {
        if record.provider != ProviderKind::Recovery || record.kek_id != self.recipient_text {
            return Err(Error::access(format!("key record is for {} {}", record.provider.name(), record.kek_id)));
        }
        let Some(identity) = &self.identity else {
            return Err(Error::access("the recovery slot unwraps only with its recovery key (--recovery-key)"));
        };
        if record.wrapped.len() <= MAC_LEN {
            return Err(Error::access("recovery record is too short"));
        }
        let (sealed, tag) = record.wrapped.split_at(record.wrapped.len() - MAC_LEN);
        let plain = Zeroizing::new(
            age::decrypt(identity, sealed).map_err(|e| Error::access(format!("recovery record does not open: {e}")))?,
        );
        let expect_len = PAYLOAD_LABEL.len() + 16 + FILE_ID_LEN + 32;
        let bound = plain.len() == expect_len
            && plain.starts_with(PAYLOAD_LABEL)
            && plain[PAYLOAD_LABEL.len()..PAYLOAD_LABEL.len() + 16] == ctx.volume_id[..]
            && plain[PAYLOAD_LABEL.len() + 16..expect_len - 32] == ctx.file_id[..];
        if !bound {
            return Err(Error::access("recovery record belongs to another file or volume"));
        }
        let dek = Dek::from_slice(&plain[expect_len - 32..])?;
        let ok =
            self.with_mac_key(ctx, Some(&dek), |k| k.verify(RECORD_MAC_LABEL, &Self::mac_input(ctx, sealed), tag))?;
        if !ok {
            return Err(Error::access(
                "recovery record does not authenticate under the volume key: it was not made by this volume \
                 (anyone can encrypt to the recipient)",
            ));
        }
        Ok(dek)
    }

    fn current_version(&self) -> Result<u32> {
        Ok(VERSION)
    }

    fn versions(&self) -> Result<Vec<KekVersionInfo>> {
        Ok(vec![KekVersionInfo { version: VERSION, current: true, retired: false }])
    }

    fn rewrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<KeyRecord> {
        let dek = self.unwrap(record, ctx)?;
        self.wrap(&dek, ctx)
    }

    fn binding(&self) -> Option<&dyn super::VolumeBinding> {
        Some(self)
    }
}

impl super::VolumeBinding for RecoveryProvider {
    fn bind_volume_key(&self, key: &VolumeKey) {
        *self.volume_key.write().unwrap() = Some(VolumeKey::from_dek(&key.as_dek()));
    }
}

/// A new recovery key pair, for `envelopefs key slot add --recovery new` and tests: the
/// identity file text (to print or store offline) and the recipient.
pub fn generate_identity() -> (Zeroizing<String>, String) {
    let id = age::x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    use age::secrecy::ExposeSecret;
    let text = Zeroizing::new(format!(
        "# envelopefs recovery key\n# public key: {recipient}\n{}\n",
        id.to_string().expose_secret()
    ));
    (text, recipient)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (age::x25519::Identity, String) {
        let id = age::x25519::Identity::generate();
        let r = id.to_public().to_string();
        (id, r)
    }

    #[test]
    fn records_bind_file_volume_and_volume_key() {
        let (id, r) = pair();
        let vk = VolumeKey::generate().unwrap();
        let writer = RecoveryProvider::new(&r, None).unwrap();
        crate::keys::VolumeBinding::bind_volume_key(&writer, &vk);
        let vol = [7u8; 16];
        let (file, other) = ([1u8; FILE_ID_LEN], [2u8; FILE_ID_LEN]);
        let ctx = KeyContext { volume_id: &vol, file_id: &file };
        let (dek, rec) = writer.generate(&ctx).unwrap();
        assert!(writer.unwrap(&rec, &ctx).unwrap_err().to_string().contains("--recovery-key"), "no identity");

        let reader = RecoveryProvider::new(&r, Some(id)).unwrap();
        assert!(reader.unwrap(&rec, &ctx).is_err(), "no volume key bound yet");
        crate::keys::VolumeBinding::bind_volume_key(&reader, &vk);
        assert_eq!(reader.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());
        let moved = KeyContext { volume_id: &vol, file_id: &other };
        assert_eq!(reader.unwrap(&rec, &moved).unwrap_err().errno(), libc::EACCES, "copied to another file");

        // A record made by someone with only the public key (and another volume key).
        let forger = RecoveryProvider::new(&r, None).unwrap();
        crate::keys::VolumeBinding::bind_volume_key(&forger, &VolumeKey::generate().unwrap());
        let (_, forged) = forger.generate(&ctx).unwrap();
        let e = reader.unwrap(&forged, &ctx).unwrap_err();
        assert!(e.to_string().contains("does not authenticate under the volume key"), "{e}");
    }

    #[test]
    fn an_identity_for_another_recipient_is_refused() {
        let (_, r) = pair();
        let (other, _) = pair();
        assert_eq!(RecoveryProvider::new(&r, Some(other)).err().unwrap().errno(), libc::EACCES);
        assert!(parse_recipient("ssh-ed25519 AAAA").is_err());
    }
}
