//! Where the secret that unlocks a keyring comes from: a passphrase (file, systemd
//! credential, standard input, terminal prompt) or a 32-byte key file. Held in zeroizing
//! memory. Never the environment: `/proc/PID/environ` keeps the original block readable
//! for the process's whole life, whatever `unsetenv` does.

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// systemd credential name for a PKCS#11 PIN.
pub const PIN_CREDENTIAL: &str = "envelopefs.pin";
/// Name of the credential `systemd` passes with `LoadCredential=` or `LoadCredentialEncrypted=`.
pub const CREDENTIAL_NAME: &str = "envelopefs.passphrase";

/// The secret that unlocks a local keyring.
pub enum Secret {
    Passphrase(Zeroizing<Vec<u8>>),
    KeyFile(Zeroizing<[u8; 32]>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Passphrase(_) => "Secret::Passphrase(..)",
            Secret::KeyFile(_) => "Secret::KeyFile(..)",
        })
    }
}

/// How the user said to get the secret; `resolve` tries them in a fixed order.
#[derive(Clone, Debug, Default)]
pub struct SecretSource {
    pub passphrase_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Read the passphrase (or PIN) from standard input (a daemonizing mount hands a
    /// prompted secret to its child this way).
    pub stdin: bool,
    /// PKCS#11 user PIN file.
    pub pin_file: Option<PathBuf>,
}

impl SecretSource {
    /// Order: --key-file, --passphrase-file, stdin, systemd credential, terminal prompt.
    /// `confirm` asks twice on a terminal (for init).
    pub fn resolve(&self, confirm: bool) -> Result<Secret> {
        if let Some(p) = &self.key_file {
            return read_key_file(p).map(Secret::KeyFile);
        }
        if let Some(p) = &self.passphrase_file {
            let raw = Zeroizing::new(
                fs::read(p).map_err(|e| Error::io(e, format!("reading passphrase file {}", p.display())))?,
            );
            return passphrase(trim_newline(&raw), &format!("passphrase file {}", p.display()));
        }
        if self.stdin {
            use std::io::Read;
            let mut raw = Zeroizing::new(Vec::new());
            std::io::stdin().read_to_end(&mut raw).map_err(|e| Error::io(e, "reading passphrase from stdin"))?;
            return passphrase(trim_newline(&raw), "standard input");
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let p = Path::new(&dir).join(CREDENTIAL_NAME);
            if p.exists() {
                let raw = Zeroizing::new(fs::read(&p).map_err(|e| Error::io(e, format!("reading {}", p.display())))?);
                return passphrase(trim_newline(&raw), "systemd credential");
            }
        }
        if std::io::stdin().is_terminal() {
            let first = Zeroizing::new(
                rpassword::prompt_password("Passphrase: ").map_err(|e| Error::io(e, "reading passphrase"))?,
            );
            if confirm {
                let again = Zeroizing::new(
                    rpassword::prompt_password("Repeat passphrase: ")
                        .map_err(|e| Error::io(e, "reading passphrase"))?,
                );
                if *first != *again {
                    return Err(Error::new(libc::EINVAL, "the passphrases differ"));
                }
            }
            return passphrase(first.as_bytes(), "prompt");
        }
        Err(Error::new(
            libc::EINVAL,
            format!(
                "no passphrase: give --passphrase-file or --key-file, pass a systemd credential named \
                 {CREDENTIAL_NAME}, or run on a terminal"
            ),
        ))
    }
}

impl SecretSource {
    /// The PKCS#11 user PIN. Order: --pin-file, the URI's pin-source (`file:PATH` or a
    /// path; only a URI the admin typed, never one from the backing directory), stdin,
    /// systemd credential `envelopefs.pin`, prompt.
    pub fn resolve_pin(&self, uri_pin_source: Option<&str>) -> Result<Zeroizing<String>> {
        let from_file = |p: &Path| -> Result<Zeroizing<String>> {
            let raw =
                Zeroizing::new(fs::read(p).map_err(|e| Error::io(e, format!("reading PIN file {}", p.display())))?);
            pin(trim_newline(&raw))
        };
        if let Some(p) = &self.pin_file {
            return from_file(p);
        }
        if let Some(src) = uri_pin_source {
            return from_file(Path::new(src.strip_prefix("file:").unwrap_or(src)));
        }
        if self.stdin {
            use std::io::Read;
            let mut raw = Zeroizing::new(Vec::new());
            std::io::stdin().read_to_end(&mut raw).map_err(|e| Error::io(e, "reading PIN from stdin"))?;
            return pin(trim_newline(&raw));
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let p = Path::new(&dir).join(PIN_CREDENTIAL);
            if p.exists() {
                return from_file(&p);
            }
        }
        if std::io::stdin().is_terminal() {
            let v =
                Zeroizing::new(rpassword::prompt_password("PKCS#11 PIN: ").map_err(|e| Error::io(e, "reading PIN"))?);
            return pin(v.as_bytes());
        }
        Err(Error::new(
            libc::EINVAL,
            format!(
                "no PKCS#11 PIN: give --pin-file, pin-source in the key URI, pass a systemd \
                 credential named {PIN_CREDENTIAL}, or run on a terminal"
            ),
        ))
    }
}

fn pin(bytes: &[u8]) -> Result<Zeroizing<String>> {
    let s = std::str::from_utf8(bytes).map_err(|_| Error::new(libc::EINVAL, "the PIN is not UTF-8"))?;
    if s.is_empty() {
        return Err(Error::new(libc::EINVAL, "empty PIN"));
    }
    Ok(Zeroizing::new(s.to_owned()))
}

fn trim_newline(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

fn passphrase(bytes: &[u8], from: &str) -> Result<Secret> {
    if bytes.is_empty() {
        return Err(Error::new(libc::EINVAL, format!("empty passphrase from {from}")));
    }
    Ok(Secret::Passphrase(Zeroizing::new(bytes.to_vec())))
}

/// A key file holds 32 raw bytes, or 64 hex digits (a trailing newline is fine).
pub fn read_key_file(p: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let raw = Zeroizing::new(fs::read(p).map_err(|e| Error::io(e, format!("reading key file {}", p.display())))?);
    let mut key = Zeroizing::new([0u8; 32]);
    if raw.len() == 32 {
        key.copy_from_slice(&raw);
        return Ok(key);
    }
    let text = trim_newline(&raw);
    if text.len() == 64 && hex::decode_to_slice(text, &mut key[..]).is_ok() {
        return Ok(key);
    }
    Err(Error::new(
        libc::EINVAL,
        format!("key file {} must hold 32 raw bytes or 64 hex digits (got {} bytes)", p.display(), raw.len()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_raw_and_hex() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("raw");
        fs::write(&raw, [7u8; 32]).unwrap();
        assert_eq!(*read_key_file(&raw).unwrap(), [7u8; 32]);
        let hx = d.path().join("hex");
        fs::write(&hx, format!("{}\n", hex::encode([9u8; 32]))).unwrap();
        assert_eq!(*read_key_file(&hx).unwrap(), [9u8; 32]);
        let bad = d.path().join("bad");
        fs::write(&bad, b"short").unwrap();
        assert!(read_key_file(&bad).unwrap_err().to_string().contains("32 raw bytes"));
    }

    #[test]
    fn passphrase_file_drops_one_newline_and_refuses_empty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        fs::write(&p, "correct horse\n").unwrap();
        let src = SecretSource { passphrase_file: Some(p.clone()), ..Default::default() };
        match src.resolve(false).unwrap() {
            Secret::Passphrase(b) => assert_eq!(&b[..], b"correct horse"),
            other => panic!("{other:?}"),
        }
        fs::write(&p, "\n").unwrap();
        assert!(src.resolve(false).unwrap_err().to_string().contains("empty passphrase"));
    }
}
