//! The token's key objects: versions found by label, the pins that limit the store to the
//! volume's own, and rotation and retirement, which make and destroy them.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};

use super::{describe_uri, Pkcs11Provider, Pkcs11Uri};
use crate::error::{Error, Result};
use crate::keys::KeyProvider;

impl Pkcs11Provider {
    /// The label of a version's key object.
    pub fn label(&self, version: u32) -> String {
        if version == 0 {
            self.uri.object.clone()
        } else {
            format!("{}/v{version}", self.uri.object)
        }
    }

    /// Limit the volume to these key objects (labels), as its config pins them.
    pub fn pin_objects(&self, labels: Vec<String>) -> Result<()> {
        *self.pins.write().unwrap() = Some(labels);
        self.refresh_keys()?;
        if self.keys.read().unwrap().is_empty() {
            return Err(Error::access(format!(
                "none of the key objects the volume pins ({}) is in token {}",
                self.pins.read().unwrap().as_deref().unwrap_or_default().join(", "),
                describe_uri(&self.uri)
            )));
        }
        Ok(())
    }

    /// Pin the current version alone (a new volume).
    pub fn pin_current(&self) -> Result<()> {
        let label = self.label(self.current_version()?);
        self.pin_objects(vec![label])
    }

    pub fn set_previous_keys(&self, keys: Vec<String>) {
        *self.previous.write().unwrap() = keys;
    }

    pub(super) fn pinned(&self, label: &str) -> bool {
        self.pins.read().unwrap().as_ref().is_none_or(|p| p.iter().any(|l| l == label))
    }

    pub(super) fn refresh_keys(&self) -> Result<()> {
        let base = self.uri.object.clone();
        let found = self.with_session("finding keys", |s| {
            let handles =
                s.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(KeyType::AES)])?;
            let mut out = Vec::new();
            for h in handles {
                let attrs = s.get_attributes(h, &[AttributeType::Label])?;
                if let Some(Attribute::Label(l)) = attrs.first() {
                    let l = String::from_utf8_lossy(l);
                    if l == base {
                        out.push((0, h));
                    } else if let Some(v) = l.strip_prefix(&format!("{base}/v")).and_then(|v| v.parse::<u32>().ok()) {
                        out.push((v, h));
                    }
                }
            }
            Ok(out)
        })?;
        let mut found: Vec<(u32, ObjectHandle)> =
            found.into_iter().filter(|(v, _)| self.pinned(&self.label(*v))).collect();
        found.sort_by_key(|(v, _)| *v);
        *self.keys.write().unwrap() = found;
        *self.refreshed.lock().unwrap() = std::time::Instant::now();
        Ok(())
    }

    pub(super) fn handle(&self, version: u32) -> Result<ObjectHandle> {
        let find = || self.keys.read().unwrap().iter().find(|(v, _)| *v == version).map(|(_, h)| *h);
        if let Some(h) = find() {
            return Ok(h);
        }
        self.refresh_keys()?;
        find().ok_or_else(|| {
            Error::access(format!("PKCS#11 key {:?} is not in token {}", self.label(version), describe_uri(&self.uri)))
        })
    }

    /// The key object for a record: one of our versions, or (after `rekey --to-key`) a
    /// version of the key the volume used before, in the same token.
    pub(super) fn handle_for(&self, kek_id: &str, version: u32) -> Result<ObjectHandle> {
        if kek_id == self.uri.key_id() {
            return self.handle(version);
        }
        if self.pins.read().unwrap().is_some() && !self.previous.read().unwrap().iter().any(|k| k == kek_id) {
            return Err(Error::access(format!(
                "key record names {kek_id:?}, which is not a key of this volume (not pinned in its config)"
            )));
        }
        let other: Pkcs11Uri =
            kek_id.parse().map_err(|e| Error::access(format!("key record names {kek_id:?}: {e}")))?;
        if other.token != self.uri.token || other.serial != self.uri.serial || other.slot_id != self.uri.slot_id {
            return Err(Error::access(format!("key record names a key in another token: {kek_id}")));
        }
        let label = if version == 0 { other.object.clone() } else { format!("{}/v{version}", other.object) };
        if !self.pinned(&label) {
            return Err(Error::access(format!("PKCS#11 key {label:?} is not pinned in the volume's config")));
        }
        let found = self.with_session("finding a key", |s| {
            s.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.clone().into_bytes())])
        })?;
        found.first().copied().ok_or_else(|| Error::access(format!("PKCS#11 key {label:?} is not in the token")))
    }

    pub(super) fn generate_version(&self, version: u32) -> Result<()> {
        let label = self.label(version);
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Id(version.to_be_bytes().to_vec()),
        ];
        self.with_session("generating a key", |s| s.generate_key(&Mechanism::AesKeyGen, &template))?;
        self.refresh_keys()?;
        tracing::info!("created PKCS#11 key {label:?} in token {}", describe_uri(&self.uri));
        Ok(())
    }
}

impl crate::keys::Rotation for Pkcs11Provider {
    fn rotate(&self) -> Result<u32> {
        // Past every version in the token, pinned or not, so a label is never reused.
        let highest = self.with_session("finding keys", |s| {
            let handles =
                s.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(KeyType::AES)])?;
            let prefix = format!("{}/v", self.uri.object);
            let mut max = 0;
            for h in handles {
                if let Some(Attribute::Label(l)) = s.get_attributes(h, &[AttributeType::Label])?.first() {
                    if let Some(v) = String::from_utf8_lossy(l).strip_prefix(&prefix).and_then(|v| v.parse().ok()) {
                        max = max.max(v);
                    }
                }
            }
            Ok(max)
        })?;
        let next = highest.max(self.current_version()?) + 1;
        if let Some(p) = self.pins.write().unwrap().as_mut() {
            p.push(self.label(next));
        }
        self.generate_version(next)?;
        Ok(next)
    }
}

impl crate::keys::Retirement for Pkcs11Provider {
    /// Destroys the key object: irreversible, like retiring a key in any HSM.
    fn retire(&self, version: u32) -> Result<()> {
        self.refresh_keys()?;
        if self.current_version()? == version {
            return Err(Error::new(libc::EBUSY, format!("KEK version {version} is current: rotate first")));
        }
        let h = self.handle(version)?;
        self.with_session("destroying a key", |s| s.destroy_object(h))?;
        let label = self.label(version);
        if let Some(p) = self.pins.write().unwrap().as_mut() {
            p.retain(|l| *l != label);
        }
        self.refresh_keys()
    }
}

impl crate::keys::Pinning for Pkcs11Provider {
    fn pinned_objects(&self) -> Option<Vec<String>> {
        self.pins.read().unwrap().clone()
    }

    fn pin(&self, objects: Vec<String>) -> Result<()> {
        self.pin_objects(objects)
    }

    fn pin_found(&self) -> Result<()> {
        if self.pinned_objects().is_some() {
            return Ok(());
        }
        let labels = self.keys.read().unwrap().iter().map(|(v, _)| self.label(*v)).collect();
        self.pin_objects(labels)
    }
}
