//! The keyring file (docs/FORMAT.md §1.1): its unauthenticated preamble, checked before
//! any key is derived, the sealed body and its entries (one per KEK version).

use super::*;

pub(super) struct Entry {
    pub(super) version: u32,
    /// None once retired: the key material is erased from the keyring.
    pub(super) key: Option<Zeroizing<[u8; KEY_LEN]>>,
}

pub(super) struct Ring {
    /// Bumped on every write: the host refuses a keyring older than one it has seen.
    pub(super) version: u64,
    /// The format of the volume this keyring belongs to (a v2 volume's config swapped for
    /// a v1 one is caught here on a host that never saw the volume).
    pub(super) volume_format: u32,
    pub(super) current: u32,
    pub(super) entries: Vec<Entry>,
}

/// How the keyring file is sealed, kept so rotation can write it back the same way.
pub(super) struct Seal {
    pub(super) kdf: u8,
    pub(super) params: KdfParams,
    pub(super) salt: [u8; 16],
    pub(super) key: Zeroizing<[u8; 32]>,
}

/// The keyring's unauthenticated preamble, checked before any key is derived from it.
pub(super) struct Preamble {
    pub(super) magic: [u8; 8],
    pub(super) kdf: u8,
    pub(super) params: KdfParams,
    pub(super) salt: [u8; 16],
    pub(super) volume_id: VolumeId,
}

impl Preamble {
    /// The preamble, or why it is not one (class Tampered: the caller names the file).
    pub(super) fn parse(raw: &[u8]) -> crate::error::Result<Self> {
        let bad = |why: String| crate::error::Error::tampered(why);
        if raw.len() < PREAMBLE_LEN + TAG_LEN || (&raw[..8] != MAGIC && &raw[..8] != MAGIC_V1) {
            return Err(bad("not an envelopefs keyring".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap());
        let p = Preamble {
            magic: raw[..8].try_into().unwrap(),
            kdf: raw[8],
            params: KdfParams { m_kib: u32_at(12), t: u32_at(16), p: u32_at(20) },
            salt: raw[24..40].try_into().unwrap(),
            volume_id: raw[40..56].try_into().unwrap(),
        };
        if raw[9..12] != [0; 3] {
            return Err(bad("reserved bytes are not zero".into()));
        }
        match p.kdf {
            // Read before anything authenticates them: refuse costs no sane init would choose.
            KDF_ARGON2ID => {
                p.params.check().map_err(|e| bad(format!("its KDF cost is refused before deriving anything: {e}")))?
            }
            KDF_KEYFILE => {}
            _ => return Err(bad("unknown key derivation".into())),
        }
        Ok(p)
    }
}

/// The keyring decoders on untrusted bytes, for the fuzz target: the preamble, and the
/// body as if it had decrypted to what follows the preamble. Never panics.
pub fn decode_for_fuzzing(raw: &[u8]) -> bool {
    match Preamble::parse(raw) {
        Ok(p) => Ring::decode(&p.magic, &raw[PREAMBLE_LEN..]).is_some(),
        Err(_) => false,
    }
}

/// Decrypt a keyring file's body with the sealing key (None if it does not authenticate).
pub(super) fn open_sealed(raw: &[u8], key: &[u8; 32]) -> Option<Zeroizing<Vec<u8>>> {
    if raw.len() < PREAMBLE_LEN + TAG_LEN {
        return None;
    }
    let nonce: [u8; NONCE_LEN] = raw[56..PREAMBLE_LEN].try_into().ok()?;
    let body = &raw[PREAMBLE_LEN..];
    let (ct, tag) = body.split_at(body.len() - TAG_LEN);
    let mut plain = Zeroizing::new(vec![0u8; ct.len()]);
    Aead::new(key).open(&nonce, &raw[..PREAMBLE_LEN], ct, tag.try_into().ok()?, &mut plain).ok()?;
    Some(plain)
}

impl Seal {
    pub(super) fn derive(secret: &Secret, params: KdfParams, salt: [u8; 16]) -> Result<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        let kdf = match secret {
            Secret::Passphrase(pw) => {
                let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
                    .map_err(|e| Error::new(libc::EINVAL, format!("bad Argon2id parameters: {e}")))?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p)
                    .hash_password_into(pw, &salt, &mut key[..])
                    .map_err(|e| Error::new(libc::EINVAL, format!("Argon2id failed: {e}")))?;
                KDF_ARGON2ID
            }
            Secret::KeyFile(k) => {
                // A key file is already full-entropy: one HMAC binds it to this keyring's salt.
                let t = aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &k[..]), &salt);
                key.copy_from_slice(t.as_ref());
                KDF_KEYFILE
            }
        };
        Ok(Seal { kdf, params, salt, key })
    }
}

impl Entry {
    pub(super) fn key(&self) -> Result<&[u8; KEY_LEN]> {
        self.key
            .as_deref()
            .ok_or_else(|| Error::access(format!("local KEK version {} is retired (its key was erased)", self.version)))
    }
}

impl Ring {
    pub(super) fn get(&self, version: u32) -> Result<&Entry> {
        let e = self.entries.iter().find(|e| e.version == version);
        let e = e.ok_or_else(|| Error::access(format!("local KEK version {version} is not in the keyring")))?;
        e.key()?;
        Ok(e)
    }

    /// Version 2 body: ring version (u64) ‖ volume format (u32) ‖ current (u32) ‖ count
    /// (u32) ‖ count × (version (u32) ‖ retired (u8) ‖ KEK (32, zero once retired)).
    pub(super) fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(Vec::with_capacity(20 + self.entries.len() * ENTRY_LEN));
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.volume_format.to_le_bytes());
        b.extend_from_slice(&self.current.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            b.extend_from_slice(&e.version.to_le_bytes());
            b.push(e.key.is_none() as u8);
            b.extend_from_slice(e.key.as_deref().unwrap_or(&[0u8; KEY_LEN]));
        }
        b
    }

    /// Both versions; a v1 body is `current ‖ count ‖ entries` (ring version 0, format 1).
    pub(super) fn decode(magic: &[u8], b: &[u8]) -> Option<Ring> {
        let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let (version, volume_format, at) = if magic == MAGIC {
            (u64::from_le_bytes(b.get(0..8)?.try_into().ok()?), u32_at(8)?, 12)
        } else {
            (0, 1, 0)
        };
        let current = u32_at(at)?;
        let count = u32_at(at + 4)? as usize;
        if b.len() != at + 8 + count.checked_mul(ENTRY_LEN)? {
            return None;
        }
        let entries = b[at + 8..]
            .chunks_exact(ENTRY_LEN)
            .map(|c| {
                let retired = c[4] != 0;
                let key = (!retired).then(|| {
                    let mut key = Zeroizing::new([0u8; KEY_LEN]);
                    key.copy_from_slice(&c[5..]);
                    key
                });
                Entry { version: u32::from_le_bytes(c[..4].try_into().unwrap()), key }
            })
            .collect::<Vec<_>>();
        let current_ok = entries.iter().any(|e| e.version == current && e.key.is_some());
        current_ok.then_some(Ring { version, volume_format, current, entries })
    }
}
