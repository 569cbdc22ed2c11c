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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretSource {
    pub passphrase_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Read the passphrase (or PIN) from standard input (a daemonizing mount hands a
    /// prompted secret to its child this way).
    pub stdin: bool,
    /// PKCS#11 user PIN file.
    pub pin_file: Option<PathBuf>,
    /// An age identity file for the volume's recovery slot: open through it alone.
    pub recovery_key: Option<PathBuf>,
    /// The volume check value a recovery open must match on a host with no record of it.
    pub volume_check: Option<String>,
}

/// What a secret unlocks: a local keyring (passphrase or key file) or a PKCS#11 token (PIN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    Keyring,
    Pin,
}

impl SecretKind {
    /// What the terminal prompt says.
    pub fn prompt(self) -> &'static str {
        match self {
            SecretKind::Keyring => "Passphrase: ",
            SecretKind::Pin => "PKCS#11 PIN: ",
        }
    }

    fn credential(self) -> &'static str {
        match self {
            SecretKind::Keyring => CREDENTIAL_NAME,
            SecretKind::Pin => PIN_CREDENTIAL,
        }
    }
}

/// Where a secret is read from: the first of the user's choices in the lookup order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// A keyring key file (32 bytes or 64 hex digits).
    KeyFile(PathBuf),
    /// A passphrase or PIN file.
    File(PathBuf),
    Stdin,
    /// A systemd credential file (present in `$CREDENTIALS_DIRECTORY`).
    Credential(PathBuf),
    /// Ask on the terminal.
    Prompt,
    /// Nothing given and nobody to ask.
    Nowhere,
}

fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

impl SecretSource {
    /// The one lookup order. Keyring: --key-file, --passphrase-file, stdin, systemd
    /// credential `envelopefs.passphrase`, terminal prompt. PIN: --pin-file, the URI's
    /// pin-source (`file:PATH` or a path; only a URI the admin typed, never one from the
    /// backing directory), stdin, systemd credential `envelopefs.pin`, prompt. Never the
    /// environment.
    pub fn place(
        &self,
        kind: SecretKind,
        uri_pin_source: Option<&str>,
        credentials: Option<&Path>,
        stdin_is_terminal: bool,
    ) -> Place {
        match kind {
            SecretKind::Keyring => {
                if let Some(p) = &self.key_file {
                    return Place::KeyFile(p.clone());
                }
                if let Some(p) = &self.passphrase_file {
                    return Place::File(p.clone());
                }
            }
            SecretKind::Pin => {
                if let Some(p) = &self.pin_file {
                    return Place::File(p.clone());
                }
                if let Some(src) = uri_pin_source {
                    return Place::File(PathBuf::from(src.strip_prefix("file:").unwrap_or(src)));
                }
            }
        }
        if self.stdin {
            return Place::Stdin;
        }
        if let Some(p) = credentials.map(|d| d.join(kind.credential())).filter(|p| p.exists()) {
            return Place::Credential(p);
        }
        if stdin_is_terminal {
            return Place::Prompt;
        }
        Place::Nowhere
    }

    /// What resolving this secret would prompt for on the terminal, if anything (a
    /// daemonizing mount asks before it forks and hands the answer to its child).
    pub fn would_prompt(&self, kind: SecretKind, stdin_is_terminal: bool) -> Option<&'static str> {
        (self.place(kind, None, credentials_dir().as_deref(), stdin_is_terminal) == Place::Prompt)
            .then(|| kind.prompt())
    }

    /// The keyring secret, from the first place in [`SecretSource::place`]'s order.
    /// `confirm` asks twice on a terminal (for init).
    pub fn resolve(&self, confirm: bool) -> Result<Secret> {
        let secret = self.resolve_once(confirm)?;
        // A new passphrase (init, key passwd) guards a keyring anyone with the backing
        // directory can copy and attack offline.
        if let (true, Secret::Passphrase(p)) = (confirm, &secret) {
            if p.len() < WEAK_PASSPHRASE {
                tracing::warn!(
                    "a passphrase of {} characters is weak against offline guessing of a copied keyring: use {} or \
                     more, or a key file",
                    p.len(),
                    WEAK_PASSPHRASE
                );
            }
        }
        Ok(secret)
    }

    fn resolve_once(&self, confirm: bool) -> Result<Secret> {
        let place = self.place(SecretKind::Keyring, None, credentials_dir().as_deref(), std::io::stdin().is_terminal());
        match place {
            Place::KeyFile(p) => read_key_file(&p).map(Secret::KeyFile),
            Place::File(p) => {
                let raw = Zeroizing::new(
                    fs::read(&p).map_err(|e| unreadable(e, format!("reading passphrase file {}", p.display())))?,
                );
                passphrase(trim_newline(&raw), &format!("passphrase file {}", p.display()))
            }
            Place::Stdin => {
                use std::io::Read;
                let mut raw = Zeroizing::new(Vec::new());
                std::io::stdin().read_to_end(&mut raw).map_err(|e| Error::io(e, "reading passphrase from stdin"))?;
                passphrase(trim_newline(&raw), "standard input")
            }
            Place::Credential(p) => {
                let raw = Zeroizing::new(fs::read(&p).map_err(|e| Error::io(e, format!("reading {}", p.display())))?);
                passphrase(trim_newline(&raw), "systemd credential")
            }
            Place::Prompt => {
                let first = Zeroizing::new(
                    rpassword::prompt_password(SecretKind::Keyring.prompt())
                        .map_err(|e| Error::io(e, "reading passphrase"))?,
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
                passphrase(first.as_bytes(), "prompt")
            }
            Place::Nowhere => Err(Error::new(
                libc::EINVAL,
                format!(
                    "no passphrase: give --passphrase-file or --key-file, pass a systemd credential named \
                     {CREDENTIAL_NAME}, or run on a terminal"
                ),
            )),
        }
    }

    /// The PKCS#11 user PIN, from the first place in [`SecretSource::place`]'s order.
    pub fn resolve_pin(&self, uri_pin_source: Option<&str>) -> Result<Zeroizing<String>> {
        let from_file = |p: &Path| -> Result<Zeroizing<String>> {
            let raw =
                Zeroizing::new(fs::read(p).map_err(|e| unreadable(e, format!("reading PIN file {}", p.display())))?);
            pin(trim_newline(&raw))
        };
        let place =
            self.place(SecretKind::Pin, uri_pin_source, credentials_dir().as_deref(), std::io::stdin().is_terminal());
        match place {
            Place::File(p) | Place::Credential(p) | Place::KeyFile(p) => from_file(&p),
            Place::Stdin => {
                use std::io::Read;
                let mut raw = Zeroizing::new(Vec::new());
                std::io::stdin().read_to_end(&mut raw).map_err(|e| Error::io(e, "reading PIN from stdin"))?;
                pin(trim_newline(&raw))
            }
            Place::Prompt => {
                let v = Zeroizing::new(
                    rpassword::prompt_password(SecretKind::Pin.prompt()).map_err(|e| Error::io(e, "reading PIN"))?,
                );
                pin(v.as_bytes())
            }
            Place::Nowhere => Err(Error::new(
                libc::EINVAL,
                format!(
                    "no PKCS#11 PIN: give --pin-file, pin-source in the key URI, pass a systemd \
                     credential named {PIN_CREDENTIAL}, or run on a terminal"
                ),
            )),
        }
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

/// New passphrases shorter than this get a warning.
const WEAK_PASSPHRASE: usize = 12;

/// A key file holds 32 raw bytes, or 64 hex digits (a trailing newline is fine).
pub fn read_key_file(p: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let raw = Zeroizing::new(fs::read(p).map_err(|e| unreadable(e, format!("reading key file {}", p.display())))?);
    if let Ok(m) = fs::metadata(p) {
        use std::os::unix::fs::PermissionsExt;
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "key file {} is readable or writable by others (mode {:o}): it opens the volume; chmod 600 it",
                p.display(),
                m.permissions().mode() & 0o777
            );
        }
    }
    let mut key = Zeroizing::new([0u8; 32]);
    if raw.len() == 32 {
        key.copy_from_slice(&raw);
        return Ok(key);
    }
    let text = trim_newline(&raw);
    if text.len() == 64 && hex::decode_to_slice(text, &mut key[..]).is_ok() {
        return Ok(key);
    }
    Err(crate::error::usage(format!(
        "key file {} must hold 32 raw bytes or 64 hex digits (got {} bytes)",
        p.display(),
        raw.len()
    )))
}

/// A secret file named on the command line that cannot be read is a bad argument (exit
/// 2), whatever its errno: no retry of the same command can succeed.
fn unreadable(e: std::io::Error, context: String) -> Error {
    Error::io(e, context).with_class(crate::error::Class::Usage)
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

    #[test]
    fn the_lookup_order_is_flags_then_stdin_then_credential_then_prompt() {
        let d = tempfile::tempdir().unwrap();
        let creds = d.path();
        let (kf, pf, pin) = (PathBuf::from("k"), PathBuf::from("p"), PathBuf::from("pin"));
        let all = SecretSource {
            key_file: Some(kf.clone()),
            passphrase_file: Some(pf.clone()),
            stdin: true,
            pin_file: Some(pin.clone()),
            ..Default::default()
        };
        let none = SecretSource::default();
        let stdin = SecretSource { stdin: true, ..Default::default() };
        let pass = SecretSource { passphrase_file: Some(pf.clone()), ..Default::default() };
        let no_creds: Option<&Path> = None;
        use SecretKind::{Keyring, Pin};
        // (source, kind, uri pin-source, credential present, terminal) -> place
        type Case<'a> = (&'a SecretSource, SecretKind, Option<&'a str>, bool, bool, Place);
        let cases: Vec<Case> = vec![
            (&all, Keyring, None, true, true, Place::KeyFile(kf.clone())),
            (&pass, Keyring, None, true, true, Place::File(pf.clone())),
            (&stdin, Keyring, None, true, true, Place::Stdin),
            (&none, Keyring, None, true, true, Place::Credential(creds.join(CREDENTIAL_NAME))),
            (&none, Keyring, None, false, true, Place::Prompt),
            (&none, Keyring, None, false, false, Place::Nowhere),
            (&all, Pin, Some("file:/u"), true, true, Place::File(pin.clone())),
            (&none, Pin, Some("file:/u"), true, true, Place::File(PathBuf::from("/u"))),
            (&none, Pin, Some("/u"), true, true, Place::File(PathBuf::from("/u"))),
            (&stdin, Pin, None, true, true, Place::Stdin),
            (&pass, Pin, None, true, true, Place::Credential(creds.join(PIN_CREDENTIAL))),
            (&pass, Pin, None, false, true, Place::Prompt),
            (&pass, Pin, None, false, false, Place::Nowhere),
        ];
        for (i, (src, kind, uri, cred, tty, want)) in cases.into_iter().enumerate() {
            for name in [CREDENTIAL_NAME, PIN_CREDENTIAL] {
                let p = creds.join(name);
                if cred {
                    fs::write(&p, "x").unwrap();
                } else {
                    let _ = fs::remove_file(&p);
                }
            }
            assert_eq!(src.place(kind, uri, Some(creds), tty), want, "case {i}");
        }
        // Without a credentials directory the credential step is skipped.
        assert_eq!(none.place(Keyring, None, no_creds, true), Place::Prompt);
    }

    #[test]
    fn would_prompt_only_on_a_terminal_and_only_when_nothing_was_given() {
        let none = SecretSource::default();
        let key = SecretSource { key_file: Some("k".into()), ..Default::default() };
        let pin = SecretSource { pin_file: Some("p".into()), ..Default::default() };
        let stdin = SecretSource { stdin: true, ..Default::default() };
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_some() {
            return; // run under a systemd unit with credentials: the answers differ
        }
        assert_eq!(none.would_prompt(SecretKind::Keyring, true), Some("Passphrase: "));
        assert_eq!(none.would_prompt(SecretKind::Pin, true), Some("PKCS#11 PIN: "));
        assert_eq!(none.would_prompt(SecretKind::Keyring, false), None);
        assert_eq!(key.would_prompt(SecretKind::Keyring, true), None);
        assert_eq!(key.would_prompt(SecretKind::Pin, true), Some("PKCS#11 PIN: "));
        assert_eq!(pin.would_prompt(SecretKind::Pin, true), None);
        assert_eq!(pin.would_prompt(SecretKind::Keyring, true), Some("Passphrase: "));
        assert_eq!(stdin.would_prompt(SecretKind::Keyring, true), None);
        assert_eq!(stdin.would_prompt(SecretKind::Pin, true), None);
    }
}
