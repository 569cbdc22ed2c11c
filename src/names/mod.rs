//! Hidden names (format 4): how file names, symlink targets and user xattrs look in the
//! backing directory. docs/FORMAT.md §10 is the contract.
//!
//! Names are encrypted deterministically with AES-SIV (RFC 5297) under a key derived from
//! the volume key, with no per-directory value: the same name encrypts the same way in
//! every directory. That costs one leak (equal names in two directories are visible as
//! equal) and buys what matters for a synced or backed-up tree: a directory rename is one
//! rename(2), no directory needs a side file that a sync tool can lose, and a name is
//! looked up by encrypting it, with no listing of the directory.

pub mod backing;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::io::{AsRawFd, RawFd};

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use zeroize::Zeroizing;

use crate::crypto::{fill_random, Aead, VolumeKey};
use crate::error::{Error, Result};
use crate::format::FileId;

/// The longest name in the plaintext view, as on every Linux filesystem.
pub const NAME_MAX: usize = 255;
/// The longest name the backing directory is asked to hold.
const BACKING_NAME_MAX: usize = 255;
/// Where symlink targets too long for a backing symlink once encrypted are kept (in the
/// volume root).
pub const TARGETS_DIR: &str = "envelopefs.targets";
/// The longest symlink target a backing filesystem holds (PATH_MAX less its NUL).
pub const BACKING_TARGET_MAX: usize = 4095;
/// The length of a spilled target's marker (see `spill_marker`): 1 mod 4, which no
/// unpadded base64 string has, so `stat` tells a marker by its length alone.
pub const MARKER_LEN: u64 = 49;
/// Names are padded to a multiple of this, so only their length class shows.
const PAD: usize = 16;
/// What marks a long name's stand-in: base64url never makes it.
const LONG_PREFIX: &str = "~";
/// The file next to a long name's stand-in that holds its whole encrypted name.
const SIDE_SUFFIX: &str = ".name";
const XATTR_PREFIX: &[u8] = b"user.";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A plaintext name as the backing directory holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingName {
    /// The directory entry: the encrypted name, or for a long one its stand-in.
    pub main: OsString,
    /// For a long name: the side file's name and what it holds (the whole encrypted name).
    pub side: Option<(OsString, Vec<u8>)>,
}

/// What a backing directory entry is, by its name alone.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// An encrypted name, decrypted from the entry itself.
    Short,
    /// A long name's stand-in: its name is in the side file.
    Long,
    /// A long name's side file, listed only through its stand-in.
    Side,
    /// Nothing this volume makes.
    Foreign,
}

/// What an xattr value is bound to (docs/FORMAT.md §10, §12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrBinding {
    /// Its stored name only: formats 4 and 5, and in format 6 what has no file header.
    Name,
    /// Its stored name and its regular file's id (format 6): a value copied to another
    /// file, or kept from before a re-encryption, does not authenticate.
    File(FileId),
}

/// Keys for names, targets and xattrs, derived from the volume key.
pub struct NameCipher {
    siv: Zeroizing<[u8; 64]>,
    xattr_values: Zeroizing<[u8; 32]>,
    /// A key of its own: a value bound by name never opens as one bound to a file.
    file_xattr_values: Zeroizing<[u8; 32]>,
}

impl NameCipher {
    pub fn new(volume_key: &VolumeKey) -> Self {
        let mut siv = Zeroizing::new([0u8; 64]);
        siv[..32].copy_from_slice(&volume_key.mac("names v4 siv mac", b""));
        siv[32..].copy_from_slice(&volume_key.mac("names v4 siv ctr", b""));
        Self {
            siv,
            xattr_values: Zeroizing::new(volume_key.mac("names v4 xattr values", b"")),
            file_xattr_values: Zeroizing::new(volume_key.mac("names v6 xattr values of a file", b"")),
        }
    }

    fn siv(&self) -> Aes256Siv {
        Aes256Siv::new(self.siv[..].into())
    }

    fn seal(&self, purpose: &[u8], plain: &[u8]) -> Vec<u8> {
        self.siv().encrypt([purpose], plain).expect("AES-SIV takes any length")
    }

    fn open(&self, purpose: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        self.siv().decrypt([purpose], sealed).ok()
    }

    /// The backing name of a plaintext name.
    pub fn encrypt_name(&self, name: &OsStr) -> Result<BackingName> {
        let b = name.as_bytes();
        if b.len() > NAME_MAX {
            return Err(Error::new(libc::ENAMETOOLONG, format!("a name of {} bytes (at most {NAME_MAX})", b.len())));
        }
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
            return Err(Error::new(libc::EINVAL, format!("{name:?} is not a name")));
        }
        let pad = PAD - b.len() % PAD;
        let mut padded = Zeroizing::new(Vec::with_capacity(b.len() + pad));
        padded.extend_from_slice(b);
        padded.resize(b.len() + pad, pad as u8);
        let encoded = URL_SAFE_NO_PAD.encode(self.seal(b"name", &padded));
        if encoded.len() <= BACKING_NAME_MAX {
            return Ok(BackingName { main: encoded.into(), side: None });
        }
        let main = long_stand_in(encoded.as_bytes());
        let side = side_name(&main);
        Ok(BackingName { main, side: Some((side, encoded.into_bytes())) })
    }

    /// The plaintext name of an encrypted one (a short entry, or a side file's content).
    pub fn decrypt_name(&self, encoded: &[u8]) -> Result<OsString> {
        let bad = || {
            Error::integrity(
                crate::error::Integrity::Name,
                format!("{:?} is not a name this volume encrypted", OsStr::from_bytes(encoded)),
            )
        };
        let sealed = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| bad())?;
        let mut padded = Zeroizing::new(self.open(b"name", &sealed).ok_or_else(bad)?);
        let pad = *padded.last().ok_or_else(bad)? as usize;
        if pad == 0
            || pad > PAD
            || pad > padded.len()
            || padded[padded.len() - pad..].iter().any(|&p| p as usize != pad)
        {
            return Err(bad());
        }
        let n = padded.len() - pad;
        padded.truncate(n);
        Ok(OsString::from_vec(padded.to_vec()))
    }

    /// The plaintext of a long name's side file, checked against the stand-in it sits by.
    pub fn decrypt_side(&self, main: &OsStr, side: &[u8]) -> Result<OsString> {
        if long_stand_in(side) != main {
            return Err(Error::corrupt(format!("the side file of {main:?} holds another name")));
        }
        self.decrypt_name(side)
    }

    /// A symlink target encrypted. Targets are not padded, so that `stat` tells their
    /// length without decrypting (see `target_len`). One longer than `BACKING_TARGET_MAX`
    /// once encrypted is spilled (see `spill_marker`).
    pub fn encrypt_target(&self, target: &[u8]) -> Vec<u8> {
        URL_SAFE_NO_PAD.encode(self.seal(b"symlink", target)).into_bytes()
    }

    pub fn decrypt_target(&self, stored: &[u8]) -> Result<Vec<u8>> {
        let bad = || {
            Error::integrity(
                crate::error::Integrity::Name,
                "the symlink target does not decrypt (not made by this volume, or changed)",
            )
        };
        let sealed = URL_SAFE_NO_PAD.decode(stored).map_err(|_| bad())?;
        self.open(b"symlink", &sealed).ok_or_else(bad)
    }

    /// A `user.` xattr name as stored: `user.` and the encrypted rest.
    pub fn encrypt_xattr_name(&self, name: &[u8]) -> Result<Vec<u8>> {
        let rest = name.strip_prefix(XATTR_PREFIX).ok_or_else(|| Error::new(libc::EOPNOTSUPP, "not a user xattr"))?;
        let mut out = XATTR_PREFIX.to_vec();
        out.extend_from_slice(URL_SAFE_NO_PAD.encode(self.seal(b"xattr name", rest)).as_bytes());
        if out.len() > 255 {
            return Err(Error::new(
                libc::ERANGE,
                format!("an xattr name of {} bytes is too long to encrypt", name.len()),
            ));
        }
        Ok(out)
    }

    pub fn decrypt_xattr_name(&self, stored: &[u8]) -> Option<Vec<u8>> {
        let rest = stored.strip_prefix(XATTR_PREFIX)?;
        let plain = self.open(b"xattr name", &URL_SAFE_NO_PAD.decode(rest).ok()?)?;
        let mut out = XATTR_PREFIX.to_vec();
        out.extend_from_slice(&plain);
        Some(out)
    }

    /// The key and additional data of a value of `stored_name` bound by `binding`.
    fn xattr_aead(&self, binding: XattrBinding, stored_name: &[u8]) -> (Aead, Vec<u8>) {
        match binding {
            XattrBinding::Name => (Aead::new(&self.xattr_values), stored_name.to_vec()),
            XattrBinding::File(id) => {
                // The file id has a fixed length: file id ‖ name is unambiguous.
                let aad = [&id[..], stored_name].concat();
                (Aead::new(&self.file_xattr_values), aad)
            }
        }
    }

    /// An xattr value: AES-256-GCM under a random nonce, bound to its (stored) name and,
    /// by `binding`, to its file.
    pub fn seal_xattr_value(&self, binding: XattrBinding, stored_name: &[u8], value: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let (c, aad) = self.xattr_aead(binding, stored_name);
        let mut out = nonce.to_vec();
        out.extend_from_slice(value);
        let tag = c.seal(&nonce, &aad, &mut out[NONCE_LEN..]);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    pub fn open_xattr_value(&self, binding: XattrBinding, stored_name: &[u8], stored: &[u8]) -> Result<Vec<u8>> {
        let bad = || {
            Error::integrity(
                crate::error::Integrity::Name,
                match binding {
                    XattrBinding::Name => "an xattr value does not authenticate (changed, or moved from another name)",
                    XattrBinding::File(_) => {
                        "an xattr value does not authenticate (changed, or moved from another name or file)"
                    }
                },
            )
        };
        if stored.len() < NONCE_LEN + TAG_LEN {
            return Err(bad());
        }
        let (c, aad) = self.xattr_aead(binding, stored_name);
        let (nonce, rest) = stored.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plain = vec![0u8; ct.len()];
        c.open(nonce.try_into().unwrap(), &aad, ct, tag.try_into().unwrap(), &mut plain).map_err(|_| bad())?;
        Ok(plain)
    }
}

impl NameCipher {
    /// The plaintext path of a backing path (inside `root`, or relative to it). Long names
    /// are read from their side files, which must be where the path says.
    pub fn plain_path(&self, root: &std::path::Path, backing: &std::path::Path) -> Result<std::path::PathBuf> {
        use std::path::Component;
        let rel = backing.strip_prefix(root).unwrap_or(backing);
        // Each directory is opened from its parent without following a symlink: the path
        // comes from the backing directory and must not lead out of it.
        let mut dir = crate::sys::openat(
            libc::AT_FDCWD,
            &crate::sys::cstr(root.as_os_str())?,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        let mut out = std::path::PathBuf::new();
        let parts: Vec<&OsStr> = rel
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .map(|c| match c {
                Component::Normal(n) => Ok(n),
                _ => Err(Error::new(libc::EINVAL, format!("{}: not a path inside the volume", rel.display()))),
            })
            .collect::<Result<_>>()?;
        for (i, n) in parts.iter().enumerate() {
            let plain = match classify(n) {
                EntryKind::Short => self.decrypt_name(n.as_bytes())?,
                EntryKind::Long => self.decrypt_side(n, &read_side(dir.as_raw_fd(), n)?)?,
                _ => return Err(Error::corrupt(format!("{n:?} is not a name this volume encrypted"))),
            };
            out.push(plain);
            if i + 1 < parts.len() {
                dir = crate::sys::openat(
                    dir.as_raw_fd(),
                    &crate::sys::cstr(n)?,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
            }
        }
        Ok(out)
    }
}

/// Keep an encrypted symlink target too long for a backing symlink in the volume's
/// target store (written and synced before the symlink is made); returns the marker the
/// symlink holds. A store file is named by its content's hash, so targets share one.
pub fn spill_target(root: RawFd, plain_len: usize, encoded: &[u8]) -> Result<Vec<u8>> {
    let (marker, name) = spill_marker(plain_len, encoded);
    let dir_name = crate::sys::cstr(OsStr::new(TARGETS_DIR))?;
    match crate::sys::mkdirat(root, &dir_name, 0o755) {
        Err(e) if e.errno() != libc::EEXIST => return Err(e.context("making the long-target store")),
        _ => {}
    }
    let dir = crate::sys::openat(root, &dir_name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
    crate::sys::write_new_at(dir.as_raw_fd(), &crate::sys::cstr(&name)?, encoded, 0o644)
        .map_err(|e| e.context("writing a long symlink target"))?;
    std::fs::File::from(dir).sync_all().map_err(|e| Error::io(e, "syncing the long-target store"))?;
    Ok(marker)
}

/// The encrypted target a backing symlink stands for: its own text, or for a marker the
/// store file it names, checked against the name.
pub fn stored_target(root: RawFd, stored: Vec<u8>) -> Result<Vec<u8>> {
    let Some((_, name)) = parse_marker(&stored) else { return Ok(stored) };
    // Neither the store nor the file is followed if it is a symlink, and a file that is
    // not regular is not used: nothing outside the backing directory is read.
    let dir = crate::sys::openat(
        root,
        &crate::sys::cstr(OsStr::new(TARGETS_DIR))?,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
    .map_err(|e| e.context("reading a long symlink target"))?;
    let encoded = read_small(dir.as_raw_fd(), name, 8192).map_err(|e| e.context("reading a long symlink target"))?;
    if !spilled_matches(name, &encoded) {
        return Err(Error::corrupt("a long symlink target's store file holds another target"));
    }
    Ok(encoded)
}

/// A long name's side file, read from `dir` without following a symlink.
pub fn read_side(dir: RawFd, main: &OsStr) -> Result<Vec<u8>> {
    let side = side_name(main);
    read_small(dir, &side, 1024).map_err(|e| e.context(format!("reading long-name file {side:?}")))
}

/// At most `max` bytes of one of the volume's own small files.
fn read_small(dir: RawFd, name: &OsStr, max: usize) -> Result<Vec<u8>> {
    let cname = crate::sys::cstr(name)?;
    let (f, _) = crate::sys::open_regular(dir, &cname, libc::O_RDONLY)?
        .ok_or_else(|| Error::corrupt(format!("{name:?} is not a regular file")))?;
    let mut buf = vec![0u8; max];
    let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf, 0).map_err(|e| Error::io(e, "reading"))?;
    buf.truncate(n);
    Ok(buf)
}

/// The decoders of hidden names on arbitrary bytes, for the fuzz target: backing entry
/// names, side files, symlink targets and their store markers, xattr names and values,
/// under a fixed key. Never panics. What decrypts is checked to round-trip, and the
/// padding check runs on arbitrary plaintexts sealed under the key.
pub fn decode_for_fuzzing(data: &[u8]) {
    let c = NameCipher::new(&VolumeKey::from_dek(&crate::crypto::Dek::from_slice(&[7u8; 32]).expect("32 bytes")));
    let entry = OsStr::from_bytes(data);
    let _ = classify(entry);
    let _ = stand_in_of(entry);
    let _ = parse_marker(data);
    if let Ok(name) = c.decrypt_name(data) {
        assert_eq!(c.encrypt_name(&name).ok().map(|b| b.main), Some(entry.to_owned()), "a short name round-trips");
    }
    let _ = c.decrypt_side(&long_stand_in(data), data);
    let _ = c.decrypt_target(data);
    let _ = c.decrypt_xattr_name(data);
    let (name, value) = data.split_at(data.len() / 2);
    let _ = c.open_xattr_value(XattrBinding::Name, name, value);
    let _ = c.open_xattr_value(XattrBinding::File([7; 16]), name, value);
    // Plaintexts with any padding: only a well-formed one decrypts, to itself unpadded.
    let sealed = URL_SAFE_NO_PAD.encode(c.seal(b"name", data));
    if let Ok(name) = c.decrypt_name(sealed.as_bytes()) {
        let pad = *data.last().expect("a decrypted name has padding") as usize;
        assert_eq!(name.as_bytes(), &data[..data.len() - pad]);
    }
}

/// The overhead a stored xattr value carries.
pub const XATTR_VALUE_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The length of a symlink target from its backing symlink's length.
pub fn target_len(stored_len: u64) -> u64 {
    (stored_len * 3 / 4).saturating_sub(TAG_LEN as u64)
}

/// For a target too long for a backing symlink once encrypted: what the symlink holds
/// instead (`~`, the plaintext length in 4 digits, the store file's name, `~`), and the
/// name of the store file that holds the encrypted target.
pub fn spill_marker(plain_len: usize, encoded: &[u8]) -> (Vec<u8>, OsString) {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, encoded);
    let name = URL_SAFE_NO_PAD.encode(digest.as_ref());
    (format!("~{plain_len:04}{name}~").into_bytes(), name.into())
}

/// A spilled target's (plaintext length, store file name), if `stored` is a marker.
pub fn parse_marker(stored: &[u8]) -> Option<(u64, &OsStr)> {
    if stored.len() as u64 != MARKER_LEN || stored[0] != b'~' || stored[48] != b'~' {
        return None;
    }
    let len = std::str::from_utf8(&stored[1..5]).ok()?.parse().ok()?;
    Some((len, OsStr::from_bytes(&stored[5..48])))
}

/// Whether `encoded` is what a store file named `name` must hold.
pub fn spilled_matches(name: &OsStr, encoded: &[u8]) -> bool {
    spill_marker(0, encoded).1 == name
}

fn long_stand_in(encoded: &[u8]) -> OsString {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, encoded);
    format!("{LONG_PREFIX}{}", URL_SAFE_NO_PAD.encode(digest.as_ref())).into()
}

/// The side file of a long name's stand-in.
pub fn side_name(main: &OsStr) -> OsString {
    let mut s = main.to_owned();
    s.push(SIDE_SUFFIX);
    s
}

/// The stand-in a side file belongs to.
pub fn stand_in_of(side: &OsStr) -> Option<&OsStr> {
    side.as_bytes().strip_suffix(SIDE_SUFFIX.as_bytes()).map(OsStr::from_bytes)
}

pub fn classify(entry: &OsStr) -> EntryKind {
    let b = entry.as_bytes();
    let b64 = |s: &[u8]| !s.is_empty() && s.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_');
    if let Some(rest) = b.strip_prefix(LONG_PREFIX.as_bytes()) {
        match rest.strip_suffix(SIDE_SUFFIX.as_bytes()) {
            Some(h) if h.len() == 43 && b64(h) => EntryKind::Side,
            None if rest.len() == 43 && b64(rest) => EntryKind::Long,
            _ => EntryKind::Foreign,
        }
    } else if b64(b) {
        EntryKind::Short
    } else {
        EntryKind::Foreign
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> NameCipher {
        NameCipher::new(&VolumeKey::from_dek(&crate::crypto::Dek::generate().unwrap()))
    }

    #[test]
    fn names_of_every_length_round_trip_and_long_ones_get_a_side_file() {
        let c = cipher();
        for len in 1..=NAME_MAX {
            let name: Vec<u8> = (0..len).map(|i| [b'a', 0xff, b' ', b'.'][i % 4]).collect();
            let n = OsStr::from_bytes(&name);
            let b = c.encrypt_name(n).unwrap();
            assert!(b.main.len() <= BACKING_NAME_MAX, "{len}");
            assert!(!b.main.as_bytes().windows(3).any(|w| w == b"aa "), "{len}");
            let back = match &b.side {
                None => {
                    assert_eq!(classify(&b.main), EntryKind::Short);
                    c.decrypt_name(b.main.as_bytes()).unwrap()
                }
                Some((side, full)) => {
                    assert!(len > 150, "{len} bytes should fit a short name");
                    assert_eq!(classify(&b.main), EntryKind::Long);
                    assert_eq!(classify(side), EntryKind::Side);
                    assert_eq!(stand_in_of(side), Some(b.main.as_os_str()));
                    c.decrypt_side(&b.main, full).unwrap()
                }
            };
            assert_eq!(back, n, "{len}");
            assert_eq!(c.encrypt_name(n).unwrap(), b, "deterministic");
        }
        let e = c.encrypt_name(OsStr::from_bytes(&[b'x'; 256])).unwrap_err();
        assert_eq!(e.errno(), libc::ENAMETOOLONG);
    }

    #[test]
    fn padding_hides_lengths_within_sixteen_bytes() {
        let c = cipher();
        let len = |n: usize| c.encrypt_name(OsStr::from_bytes(&vec![b'x'; n])).unwrap().main.len();
        assert_eq!(len(1), len(15));
        assert_ne!(len(15), len(16));
    }

    #[test]
    fn changed_names_side_files_targets_and_values_are_refused() {
        let c = cipher();
        let b = c.encrypt_name(OsStr::new("report.pdf")).unwrap();
        let mut m = b.main.into_vec();
        m[3] = if m[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(c.decrypt_name(&m).unwrap_err().errno(), libc::EIO);
        assert!(c.decrypt_name(b"not-ours").is_err());
        let other = cipher().encrypt_name(OsStr::new("report.pdf")).unwrap();
        assert!(c.decrypt_name(other.main.as_bytes()).is_err(), "another volume's name");

        let long = c.encrypt_name(OsStr::from_bytes(&[b'L'; 200])).unwrap();
        let long2 = c.encrypt_name(OsStr::from_bytes(&[b'M'; 200])).unwrap();
        assert!(c.decrypt_side(&long.main, &long2.side.unwrap().1).is_err(), "a side file swapped in");

        let t = c.encrypt_target(b"../secret/target");
        assert_eq!(target_len(t.len() as u64), 16);
        assert_eq!(c.decrypt_target(&t).unwrap(), b"../secret/target");
        assert!(c.decrypt_target(b"AAAA").is_err());

        let n = c.encrypt_xattr_name(b"user.comment").unwrap();
        assert!(n.starts_with(b"user.") && !n.windows(7).any(|w| w == b"comment"));
        assert_eq!(c.decrypt_xattr_name(&n).unwrap(), b"user.comment");
        let by_name = XattrBinding::Name;
        let v = c.seal_xattr_value(by_name, &n, b"value").unwrap();
        assert_eq!(v.len(), 5 + XATTR_VALUE_OVERHEAD);
        assert_eq!(c.open_xattr_value(by_name, &n, &v).unwrap(), b"value");
        let n2 = c.encrypt_xattr_name(b"user.other").unwrap();
        assert!(c.open_xattr_value(by_name, &n2, &v).is_err(), "a value moved to another name");
    }

    #[test]
    fn values_bound_to_a_file_open_on_that_file_only() {
        let c = cipher();
        let n = c.encrypt_xattr_name(b"user.note").unwrap();
        let (a, b) = (XattrBinding::File([1; 16]), XattrBinding::File([2; 16]));
        let v = c.seal_xattr_value(a, &n, b"a's note").unwrap();
        assert_eq!(v.len(), 8 + XATTR_VALUE_OVERHEAD, "no longer than a value bound by name");
        assert_eq!(c.open_xattr_value(a, &n, &v).unwrap(), b"a's note");
        assert_eq!(c.open_xattr_value(b, &n, &v).unwrap_err().errno(), libc::EIO, "another file");
        assert!(c.open_xattr_value(XattrBinding::Name, &n, &v).is_err(), "read as bound by name");
        let by_name = c.seal_xattr_value(XattrBinding::Name, &n, b"d").unwrap();
        assert!(c.open_xattr_value(a, &n, &by_name).is_err(), "a name-bound value put on a file");
    }

    #[test]
    fn long_targets_get_a_marker_of_the_one_length_base64_never_has() {
        let c = cipher();
        assert!(c.encrypt_target(&[b'a'; 3055]).len() <= BACKING_TARGET_MAX);
        let enc = c.encrypt_target(&[b'a'; 4095]);
        assert!(enc.len() > BACKING_TARGET_MAX);
        let (marker, name) = spill_marker(4095, &enc);
        assert_eq!(marker.len() as u64, MARKER_LEN);
        assert_eq!(MARKER_LEN % 4, 1);
        assert_eq!(parse_marker(&marker), Some((4095, name.as_os_str())));
        assert!(spilled_matches(&name, &enc));
        assert!(!spilled_matches(&name, &c.encrypt_target(&[b'b'; 4095])));
        for len in 0..300 {
            assert_ne!(c.encrypt_target(&vec![b'x'; len]).len() as u64 % 4, 1, "{len}");
        }
    }

    #[test]
    fn classify_tells_the_volumes_entries_from_others() {
        assert_eq!(classify(OsStr::new("envelopefs.toml")), EntryKind::Foreign);
        assert_eq!(classify(OsStr::new("~abc")), EntryKind::Foreign);
        assert_eq!(classify(OsStr::new("x.name")), EntryKind::Foreign);
    }
}
