//! AES-256-GCM per block, the header tag, and the key types.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::format::{block_aad, FileId, HEADER_TAG_LEN, NONCE_LEN, TAG_LEN};

pub const KEY_LEN: usize = 32;

/// A 256-bit data-encryption key. Wiped when dropped; `Debug` never shows it.
#[derive(Clone)]
pub struct Dek(Box<Zeroizing<[u8; KEY_LEN]>>);

impl Dek {
    pub fn generate() -> Result<Self> {
        let mut k = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        fill_random(&mut k[..])?;
        Ok(Self(k))
    }

    /// Take ownership of key bytes; the caller's copy should itself be zeroizing.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != KEY_LEN {
            return Err(Error::corrupt(format!("a data key is {KEY_LEN} bytes, got {}", bytes.len())));
        }
        let mut k = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        k.copy_from_slice(bytes);
        Ok(Self(k))
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(..)")
    }
}

/// The volume key (format 2): random, wrapped by the KEK in the config. Keys for each
/// purpose are derived from it (HMAC-SHA256(volume key, purpose)), never used raw.
pub struct VolumeKey(Zeroizing<[u8; KEY_LEN]>);

impl VolumeKey {
    pub fn generate() -> Result<Self> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut k[..])?;
        Ok(Self(k))
    }

    pub fn from_dek(dek: &Dek) -> Self {
        Self(Zeroizing::new(*dek.expose()))
    }

    /// The key as a DEK, to be wrapped by a provider.
    pub fn as_dek(&self) -> Dek {
        Dek(Box::new(self.0.clone()))
    }

    fn subkey(&self, purpose: &str) -> aws_lc_rs::hmac::Key {
        let k = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.0[..]),
            purpose.as_bytes(),
        );
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, k.as_ref())
    }

    /// HMAC-SHA256 of `data` under the key derived for `purpose`.
    pub fn mac(&self, purpose: &str, data: &[u8]) -> [u8; 32] {
        aws_lc_rs::hmac::sign(&self.subkey(purpose), data).as_ref().try_into().unwrap()
    }

    /// Constant-time check of a `mac`.
    pub fn verify(&self, purpose: &str, data: &[u8], tag: &[u8]) -> bool {
        aws_lc_rs::hmac::verify(&self.subkey(purpose), data, tag).is_ok()
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey(..)")
    }
}

pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| Error::new(libc::EIO, format!("system random source failed: {e}")))
}

/// A sealed block that does not open under its key, index and file id: tampered, moved,
/// torn, or another file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("does not authenticate")]
pub struct Unauthentic;

/// AES-256-GCM with a detached tag, in place: aws-lc-rs (assembly AES-GCM, VAES/AVX-512
/// where the CPU has it; the TLS stack of the KMS client is aws-lc too).
pub struct Aead(aws_lc_rs::aead::LessSafeKey);

impl Aead {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        let k = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key)
            .expect("a 32-byte key is a valid AES-256 key");
        Self(aws_lc_rs::aead::LessSafeKey::new(k))
    }

    pub fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        use aws_lc_rs::aead::{Aad, Nonce};
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .expect("AES-GCM seal of a block cannot fail");
        tag.as_ref().try_into().unwrap()
    }

    /// Decrypt `ct` into `out` (same length). `Err` when the tag does not verify; `out`
    /// is then unspecified.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ct: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> Result<(), Unauthentic> {
        use aws_lc_rs::aead::{Aad, Nonce};
        self.0
            .open_separate_gather(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), ct, tag, out)
            .map_err(|_| Unauthentic)
    }
}

/// Everything needed to read and write one file's content: its id and its keyed ciphers.
/// Cached and shared by `Arc`; the key schedule and the header key are wiped on drop.
pub struct FileKey {
    pub file_id: FileId,
    aead: Aead,
    header_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileKey({})", hex::encode(self.file_id))
    }
}

impl FileKey {
    pub fn new(file_id: FileId, dek: &Dek) -> Self {
        // The header tag uses a key derived from the DEK so one key never serves two
        // algorithms: HMAC-SHA256(DEK, label).
        let derived = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, dek.expose()),
            b"envelopefs v1 header authentication key",
        );
        let mut header_key = Zeroizing::new([0u8; 32]);
        header_key.copy_from_slice(derived.as_ref());
        Self { file_id, aead: Aead::new(dek.expose()), header_key }
    }

    pub fn header_tag(&self, bytes: &[u8]) -> [u8; HEADER_TAG_LEN] {
        let t = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.header_key[..]),
            bytes,
        );
        t.as_ref().try_into().unwrap()
    }

    /// Whether `other` was made from the same DEK.
    pub fn same_key(&self, other: &FileKey) -> bool {
        self.file_id == other.file_id && self.header_key[..] == other.header_key[..]
    }

    pub fn verify_header_tag(&self, bytes: &[u8], tag: &[u8; HEADER_TAG_LEN]) -> bool {
        aws_lc_rs::hmac::verify(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.header_key[..]),
            bytes,
            tag,
        )
        .is_ok()
    }

    /// Seal `plain` as block `index` into `out` (nonce ‖ ciphertext ‖ tag).
    pub fn seal_block(&self, index: u64, plain: &[u8], nonce: &[u8; NONCE_LEN], out: &mut [u8]) {
        let n = plain.len();
        debug_assert_eq!(out.len(), n + NONCE_LEN + TAG_LEN);
        out[..NONCE_LEN].copy_from_slice(nonce);
        let body = &mut out[NONCE_LEN..NONCE_LEN + n];
        body.copy_from_slice(plain);
        let tag = self.aead.seal(nonce, &block_aad(&self.file_id, index), body);
        out[NONCE_LEN + n..].copy_from_slice(&tag);
    }

    /// Open stored block `index` (nonce ‖ ciphertext ‖ tag) into `out`.
    pub fn open_block(&self, index: u64, stored: &[u8], out: &mut [u8]) -> Result<(), Unauthentic> {
        if stored.len() <= NONCE_LEN + TAG_LEN {
            return Err(Unauthentic);
        }
        let n = stored.len() - NONCE_LEN - TAG_LEN;
        debug_assert_eq!(out.len(), n);
        let nonce: &[u8; NONCE_LEN] = stored[..NONCE_LEN].try_into().unwrap();
        let tag: &[u8; TAG_LEN] = stored[NONCE_LEN + n..].try_into().unwrap();
        let res = self.aead.open(nonce, &block_aad(&self.file_id, index), &stored[NONCE_LEN..NONCE_LEN + n], tag, out);
        if res.is_err() {
            out.zeroize();
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AES-256-GCM test case 16 of McGrew & Viega (the GCM spec).
    const KEY: &str = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
    const NONCE: &str = "cafebabefacedbaddecaf888";
    const PLAIN: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
    const AAD: &str = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
    const CIPHER: &str = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662";
    const TAG: &str = "76fc6ece0f4e1768cddf8853bb2d551b";

    #[test]
    fn the_cipher_matches_the_spec_vector() {
        let key: [u8; 32] = hex::decode(KEY).unwrap().try_into().unwrap();
        let nonce: [u8; 12] = hex::decode(NONCE).unwrap().try_into().unwrap();
        let aad = hex::decode(AAD).unwrap();
        let aead = Aead::new(&key);
        let mut buf = hex::decode(PLAIN).unwrap();
        let tag = aead.seal(&nonce, &aad, &mut buf);
        assert_eq!(hex::encode(&buf), CIPHER);
        assert_eq!(hex::encode(tag), TAG);
        let mut out = vec![0u8; buf.len()];
        aead.open(&nonce, &aad, &buf, &tag, &mut out).unwrap();
        assert_eq!(hex::encode(&out), PLAIN);
        let mut bad = tag;
        bad[0] ^= 1;
        assert!(aead.open(&nonce, &aad, &buf, &bad, &mut out).is_err());
    }

    /// An independent implementation (RustCrypto's `aes-gcm`, a test dependency only) opens
    /// every block aws-lc seals, and seals what aws-lc opens: same bytes, same AAD rule.
    #[test]
    fn blocks_agree_with_an_independent_aes_gcm() {
        use aes_gcm::aead::AeadInPlace;
        use aes_gcm::KeyInit;
        let dek = Dek::generate().unwrap();
        let other = aes_gcm::Aes256Gcm::new(dek.expose().into());
        let fid = [3u8; 16];
        let key = FileKey::new(fid, &dek);
        let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut stored = vec![0u8; plain.len() + 28];
        key.seal_block(5, &plain, &[9; 12], &mut stored);
        let (nonce, rest) = stored.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(plain.len());
        let mut theirs = ct.to_vec();
        other.decrypt_in_place_detached(nonce.into(), &block_aad(&fid, 5), &mut theirs, tag.into()).unwrap();
        assert_eq!(theirs, plain);
        let mut sealed = plain.clone();
        let tag = other.encrypt_in_place_detached((&[1u8; 12]).into(), &block_aad(&fid, 6), &mut sealed).unwrap();
        let mut mine = [1u8; 12].to_vec();
        mine.extend_from_slice(&sealed);
        mine.extend_from_slice(&tag);
        let mut out = vec![0u8; plain.len()];
        key.open_block(6, &mine, &mut out).unwrap();
        assert_eq!(out, plain);
        // Same block at another index, or in another file, must not open.
        assert!(key.open_block(5, &mine, &mut out).is_err());
        assert!(out.iter().all(|&b| b == 0), "failed open leaves no plaintext");
        assert!(FileKey::new([4u8; 16], &dek).open_block(6, &mine, &mut out).is_err());
        assert!(key.verify_header_tag(b"x", &key.header_tag(b"x")));
        assert!(!key.verify_header_tag(b"y", &key.header_tag(b"x")));
    }

    #[test]
    fn dek_debug_hides_the_key() {
        let d = Dek::from_slice(&[0xAB; 32]).unwrap();
        assert_eq!(format!("{d:?}"), "Dek(..)");
        assert!(Dek::from_slice(&[0; 31]).is_err());
    }
}
