//! The `pkcs11` provider: KEKs are non-extractable AES-256 keys inside a PKCS#11 token (an
//! HSM, or SoftHSM2 in tests). DEKs are sealed with CKM_AES_GCM inside the token, with AAD
//! binding volume id, file id and KEK version; the KEK never leaves the token.
//!
//! Versions: the KEK named by `object=NAME` in the URI has versions stored as separate key
//! objects labelled `NAME/v1`, `NAME/v2`… (CKA_ID = the version, 4 bytes big-endian). The
//! highest is current. A pre-existing key labelled exactly `NAME` is accepted as version 0.

mod objects;
mod uri;

pub use uri::Pkcs11Uri;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{KekVersionInfo, KeyContext, KeyProvider};
use crate::crypto::{fill_random, Dek, KEY_LEN};
use crate::error::{Error, Result};
use crate::format::{KeyRecord, ProviderKind, NONCE_LEN, TAG_LEN};

const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
/// Sessions kept open for reuse; more are opened under load and closed when returned.
const POOL_MAX: usize = 8;

/// One initialised context per module per process: C_Initialize may run only once.
fn context(module: &Path) -> Result<Pkcs11> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS.get_or_init(Default::default).lock().unwrap();
    if let Some(c) = map.get(module) {
        return Ok(c.clone());
    }
    let unreachable = crate::error::Class::KeyStoreUnreachable;
    let ctx = Pkcs11::new(module).map_err(|e| {
        Error::new(libc::EINVAL, format!("loading PKCS#11 module {}: {e}", module.display())).with_class(unreachable)
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(
                Error::new(libc::EIO, format!("C_Initialize of {}: {e}", module.display())).with_class(unreachable)
            )
        }
    }
    map.insert(module.to_owned(), ctx.clone());
    Ok(ctx)
}

/// EACCES for a key that is missing, refused or does not authenticate; EIO for everything
/// else, token faults (CKR_GENERAL_ERROR, CKR_DEVICE_ERROR…) included: those say nothing
/// about the key, and "key missing" would send the admin looking in the wrong place. (An
/// unwrap that fails with CKR_GENERAL_ERROR is told apart in `unwrap`.)
fn ck(e: CkError, what: impl std::fmt::Display) -> Error {
    let errno = match &e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired | RvError::UserNotLoggedIn => libc::EACCES,
            RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid | RvError::KeyFunctionNotPermitted => libc::EACCES,
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => libc::EACCES,
            _ => libc::EIO,
        },
        _ => libc::EIO,
    };
    if errno == libc::EIO && matches!(e, CkError::Pkcs11(..)) {
        return Error::new(errno, format!("PKCS#11 token failed during {what}: {e}"));
    }
    // A wrong, locked or expired PIN is the secret's fault, like a wrong passphrase: its own
    // exit code, which the unit does not restart on (a token locks after a few tries).
    if let CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired, _) = &e {
        return Error::new(errno, format!("PKCS#11 {what}: {e}: check the PIN"))
            .with_class(crate::error::Class::WrongSecret);
    }
    Error::new(errno, format!("PKCS#11 {what}: {e}"))
}

/// Errors after which a session is worth reopening (token reinserted, session closed…).
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::DeviceError,
            _
        )
    )
}

pub struct Pkcs11Provider {
    ctx: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    uri: Pkcs11Uri,
    module: PathBuf,
    pool: Mutex<Vec<Session>>,
    /// version → key object handle, refreshed when a handle stops working.
    keys: RwLock<Vec<(u32, ObjectHandle)>>,
    /// When `keys` was last read from the token: new wraps re-read it every few seconds
    /// so a rotation made by another process is picked up by a running mount.
    refreshed: Mutex<std::time::Instant>,
    /// The labels of the key objects the volume may use (format 2 pins them in its
    /// authenticated config); None for a format-1 volume, which takes any `OBJECT/vN`.
    pins: RwLock<Option<Vec<String>>>,
    /// Keys (URIs) the volume used before `rekey --to-key`; records may name only these
    /// besides the current key.
    previous: RwLock<Vec<String>>,
}

impl Pkcs11Provider {
    /// Open the token named by the URI, log in, and find the KEK versions. `create` makes
    /// version 1 when the token has none.
    pub fn open(module: &Path, uri: &Pkcs11Uri, pin: Zeroizing<String>, create: bool) -> Result<Self> {
        let ctx = context(module)?;
        let slot = find_slot(&ctx, uri)?;
        let mechs = ctx.get_mechanism_list(slot).map_err(|e| ck(e, "listing mechanisms"))?;
        if !mechs.contains(&MechanismType::AES_GCM) || !mechs.contains(&MechanismType::AES_KEY_GEN) {
            return Err(Error::new(
                libc::EINVAL,
                format!("token {} lacks CKM_AES_GCM or CKM_AES_KEY_GEN", describe_uri(uri)),
            ));
        }
        let p = Self {
            ctx,
            slot,
            pin: AuthPin::from(pin.as_str().to_owned()),
            uri: uri.clone(),
            module: module.to_owned(),
            pool: Mutex::new(Vec::new()),
            keys: RwLock::new(Vec::new()),
            refreshed: Mutex::new(std::time::Instant::now()),
            pins: RwLock::new(None),
            previous: RwLock::new(Vec::new()),
        };
        p.refresh_keys()?;
        if p.keys.read().unwrap().is_empty() {
            if !create {
                return Err(Error::access(format!(
                    "no key labelled {:?} (or {:?}/vN) in token {}: create one with `envelopefs key create`",
                    uri.object,
                    uri.object,
                    describe_uri(uri)
                )));
            }
            p.generate_version(1)?;
        }
        Ok(p)
    }

    fn open_session(&self) -> std::result::Result<Session, CkError> {
        let s = self.ctx.open_rw_session(self.slot)?;
        match s.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(s),
            Err(e) => Err(e),
        }
    }

    /// Run `f` on a pooled, logged-in session; a lost session is reopened and `f` retried once.
    fn with_session<T>(&self, what: &str, f: impl Fn(&Session) -> std::result::Result<T, CkError>) -> Result<T> {
        for attempt in 0..2 {
            let pooled = self.pool.lock().unwrap().pop();
            let s = match pooled {
                Some(s) => s,
                None => self.open_session().map_err(|e| ck(e, format!("{what}: opening a session")))?,
            };
            match f(&s) {
                Ok(v) => {
                    let mut pool = self.pool.lock().unwrap();
                    if pool.len() < POOL_MAX {
                        pool.push(s);
                    }
                    return Ok(v);
                }
                Err(e) if attempt == 0 && session_lost(&e) => {
                    tracing::warn!("PKCS#11 session lost during {what} ({e}); reopening");
                    self.pool.lock().unwrap().clear();
                }
                Err(e) => return Err(ck(e, what)),
            }
        }
        unreachable!()
    }

    fn aad(&self, ctx: &KeyContext<'_>, version: u32) -> Vec<u8> {
        let mut aad = b"envelopefs pkcs11 wrap v1".to_vec();
        aad.extend_from_slice(ctx.volume_id);
        aad.extend_from_slice(ctx.file_id);
        aad.extend_from_slice(&version.to_le_bytes());
        aad
    }

    fn wrap_under(&self, dek: &Dek, ctx: &KeyContext<'_>, version: u32) -> Result<KeyRecord> {
        let h = self.handle(version)?;
        let aad = self.aad(ctx, version);
        let mut iv = [0u8; NONCE_LEN];
        fill_random(&mut iv)?;
        let ct = self.with_session("wrapping a data key", |s| {
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, &aad, 128.into())?;
            s.encrypt(&Mechanism::AesGcm(params), h, dek.expose())
        })?;
        if ct.len() != KEY_LEN + TAG_LEN {
            return Err(Error::new(libc::EIO, format!("PKCS#11 AES-GCM returned {} bytes", ct.len())));
        }
        let mut wrapped = iv.to_vec();
        wrapped.extend_from_slice(&ct);
        Ok(KeyRecord { provider: ProviderKind::Pkcs11, kek_id: self.uri.key_id(), kek_version: version, wrapped })
    }
}

impl Pkcs11Provider {
    /// Seal and open a random value under key `h`: Ok when the token and the key work.
    fn probe(&self, h: ObjectHandle) -> Result<()> {
        let aad = b"envelopefs pkcs11 probe v1".to_vec();
        let mut iv = [0u8; NONCE_LEN];
        let mut value = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut iv)?;
        fill_random(&mut value[..])?;
        let back = self.with_session("a test round trip", |s| {
            let mut iv1 = iv;
            let ct = s.encrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv1, &aad, 128.into())?), h, &value[..])?;
            let mut iv2 = iv;
            s.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv2, &aad, 128.into())?), h, &ct)
        })?;
        let back = Zeroizing::new(back);
        if back[..] != value[..] {
            return Err(Error::new(libc::EIO, "PKCS#11 token failed: a test round trip returned other bytes"));
        }
        Ok(())
    }
}

fn describe_uri(uri: &Pkcs11Uri) -> String {
    uri.token.clone().or_else(|| uri.serial.clone()).unwrap_or_else(|| "(first token)".into())
}

/// A token's info. SoftHSM2 answers CKR_GENERAL_ERROR now and then while another process
/// rewrites one of its token files (seen with several processes on one token directory);
/// the read is idempotent, so it is tried a few times before that counts as a fault.
fn token_info(ctx: &Pkcs11, slot: Slot) -> Result<cryptoki::slot::TokenInfo> {
    let mut attempt = 0;
    loop {
        match ctx.get_token_info(slot) {
            Err(CkError::Pkcs11(RvError::GeneralError, _)) if attempt < 5 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
            }
            r => return r.map_err(|e| ck(e, "reading token info")),
        }
    }
}

fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot> {
    let slots = ctx.get_slots_with_token().map_err(|e| ck(e, "listing slots"))?;
    for slot in slots {
        if uri.slot_id.is_some_and(|id| id != slot.id()) {
            continue;
        }
        let info = token_info(ctx, slot)?;
        if uri.token.as_deref().is_some_and(|t| t != info.label().trim_end()) {
            continue;
        }
        if uri.serial.as_deref().is_some_and(|t| t != info.serial_number().trim_end()) {
            continue;
        }
        return Ok(slot);
    }
    Err(Error::new(libc::ENODEV, format!("no PKCS#11 token matches {}", uri.key_id()))
        .with_class(crate::error::Class::KeyStoreUnreachable))
}

impl KeyProvider for Pkcs11Provider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Pkcs11
    }

    fn kek_id(&self) -> String {
        self.uri.key_id()
    }

    fn describe(&self) -> String {
        format!("PKCS#11 key {} via {}", self.uri.key_id(), self.module.display())
    }

    fn generate(&self, ctx: &KeyContext<'_>) -> Result<(Dek, KeyRecord)> {
        if self.refreshed.lock().unwrap().elapsed() > std::time::Duration::from_secs(2) {
            self.refresh_keys()?;
        }
        let dek = Dek::generate()?;
        let rec = self.wrap_under(&dek, ctx, self.current_version()?)?;
        Ok((dek, rec))
    }

    fn wraps_remotely(&self) -> bool {
        true
    }

    fn wrap(&self, dek: &Dek, ctx: &KeyContext<'_>) -> Result<KeyRecord> {
        if self.refreshed.lock().unwrap().elapsed() > std::time::Duration::from_secs(2) {
            self.refresh_keys()?;
        }
        self.wrap_under(dek, ctx, self.current_version()?)
    }

    fn unwrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<Dek> {
        if record.provider != ProviderKind::Pkcs11 {
            return Err(Error::access(format!("key record is for provider {}", record.provider.name())));
        }
        if record.wrapped.len() != WRAPPED_LEN {
            return Err(Error::access(format!(
                "wrapped key has {} bytes, expected {WRAPPED_LEN}",
                record.wrapped.len()
            )));
        }
        let h = self.handle_for(&record.kek_id, record.kek_version)?;
        let aad = self.aad(ctx, record.kek_version);
        let label = self.label(record.kek_version);
        let plain = self
            .with_session("unwrapping a data key", |s| {
                let mut iv: [u8; NONCE_LEN] = record.wrapped[..NONCE_LEN].try_into().unwrap();
                let params = GcmParams::new(&mut iv, &aad, 128.into())?;
                match s.decrypt(&Mechanism::AesGcm(params), h, &record.wrapped[NONCE_LEN..]) {
                    Err(CkError::Pkcs11(RvError::GeneralError, _)) => Ok(None),
                    r => r.map(Some),
                }
            })
            .map_err(|e| e.context(format!("key {label:?} (does the wrapped key belong to this file?)")))?;
        // CKR_GENERAL_ERROR on the decrypt of a record of the right length is ambiguous:
        // SoftHSM2 (and other tokens) answer it for a GCM tag that does not verify (a
        // tampered record, or another file's), and a failing token says it too. A round trip
        // under the same key tells them apart: if the token seals and opens a probe fine,
        // the record does not authenticate (EACCES); if not, the token is at fault (EIO).
        let Some(plain) = plain else {
            return Err(match self.probe(h) {
                Ok(()) => Error::access(format!(
                    "PKCS#11 key {label:?}: the wrapped key does not authenticate (tampered, or from another \
                     file or volume); the token works (it answered CKR_GENERAL_ERROR, and a test round trip \
                     under the same key succeeded)"
                )),
                Err(e) => e.context(format!(
                    "PKCS#11 token failed: unwrapping under key {label:?} answered CKR_GENERAL_ERROR and a test \
                     round trip under the same key failed too"
                )),
            });
        };
        let plain = Zeroizing::new(plain);
        Dek::from_slice(&plain)
    }

    fn current_version(&self) -> Result<u32> {
        let v = self.keys.read().unwrap().last().map(|(v, _)| *v);
        v.ok_or_else(|| Error::access(format!("no PKCS#11 key {:?} in the token", self.uri.object)))
    }

    fn versions(&self) -> Result<Vec<KekVersionInfo>> {
        self.refresh_keys()?;
        let keys = self.keys.read().unwrap();
        let last = keys.last().map(|(v, _)| *v);
        Ok(keys
            .iter()
            .map(|(v, _)| KekVersionInfo { version: *v, current: Some(*v) == last, retired: false })
            .collect())
    }

    fn rewrap(&self, record: &KeyRecord, ctx: &KeyContext<'_>) -> Result<KeyRecord> {
        let dek = self.unwrap(record, ctx)?;
        self.wrap_under(&dek, ctx, self.current_version()?)
    }

    fn pinning(&self) -> Option<&dyn super::Pinning> {
        Some(self)
    }

    fn rotation(&self) -> Option<&dyn super::Rotation> {
        Some(self)
    }

    fn retirement(&self) -> Option<&dyn super::Retirement> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_faults_are_eio_not_a_missing_key() {
        let fault = |rv| ck(CkError::Pkcs11(rv, cryptoki::context::Function::Encrypt), "wrapping a data key");
        for rv in [RvError::GeneralError, RvError::DeviceError, RvError::DeviceMemory, RvError::FunctionFailed] {
            let e = fault(rv);
            assert_eq!(e.errno(), libc::EIO, "{rv:?}");
            assert!(e.to_string().contains("token failed"), "{e}");
        }
        for rv in [RvError::EncryptedDataInvalid, RvError::KeyHandleInvalid, RvError::PinIncorrect] {
            assert_eq!(fault(rv).errno(), libc::EACCES, "{rv:?}");
        }
    }

    #[test]
    fn uris_parse_and_print_without_secrets() {
        let u: Pkcs11Uri =
            "pkcs11:token=My%20Token;object=kek;type=secret-key?pin-source=file:/run/pin&module-path=/x.so"
                .parse()
                .unwrap();
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.object, "kek");
        assert_eq!(u.pin_source.as_deref(), Some("file:/run/pin"));
        assert_eq!(u.module_path.as_deref(), Some("/x.so"));
        assert_eq!(u.key_id(), "pkcs11:token=My%20Token;object=kek");
        assert!("pkcs11:token=t".parse::<Pkcs11Uri>().unwrap_err().to_string().contains("object="));
        assert!("token=t;object=k".parse::<Pkcs11Uri>().is_err());
        assert!("pkcs11:object=k?pin-value=1234".parse::<Pkcs11Uri>().unwrap_err().to_string().contains("pin-source"));
        assert!("pkcs11:object=a/b".parse::<Pkcs11Uri>().is_err());
        assert!("pkcs11:object=k;bogus=1".parse::<Pkcs11Uri>().is_err());
    }
}
