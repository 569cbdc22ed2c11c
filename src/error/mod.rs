//! One error type for the whole filesystem: an errno for the kernel plus the context a
//! person needs in the log (which file, which key, why).

use std::fmt;
use std::io;
use std::sync::Arc;

/// An error that knows which errno to reply with, how loudly to log it, and says what went
/// wrong. Cloneable, cause included: one failed key load is every waiter's error.
#[derive(Clone, Debug)]
pub struct Error {
    errno: i32,
    context: String,
    class: Option<Class>,
    /// What failed to authenticate, when that is the error.
    integrity: Option<Integrity>,
    level: Level,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// How a failure is logged where it is replied (the FUSE adapter). Decided where the error
/// is made: integrity, tampering, trust and key-store failures are faults whatever their
/// errno (a key store that did not answer may say EAGAIN); otherwise the errno decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// An answer a healthy filesystem gives all the time (ENOENT on lookup, ENOTEMPTY,
    /// EEXIST): a debug line.
    Answer,
    /// Something to look at: tampering, key trouble, a failing or full backing store. A
    /// warning, and a line in `status`.
    Fault,
}

impl Level {
    /// The level of an error made with only an errno: the errnos of faults.
    const fn of(errno: i32) -> Level {
        match errno {
            libc::EIO
            | libc::EACCES
            | libc::ENOSPC
            | libc::EDQUOT
            | libc::EROFS
            | libc::EMFILE
            | libc::ENFILE
            | libc::ESTALE => Level::Fault,
            _ => Level::Answer,
        }
    }
}

/// What did not authenticate: the metrics count integrity failures by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Integrity {
    /// A content block (tampered, moved, or torn without a journal to finish it).
    Block,
    /// A file's header (no slot authenticates, or one pasted from another file).
    Header,
    /// A hidden name, symlink target or extended attribute.
    Name,
}

impl Integrity {
    pub const fn name(self) -> &'static str {
        match self {
            Integrity::Block => "block",
            Integrity::Header => "header",
            Integrity::Name => "name",
        }
    }
}

/// What a script needs to tell failures apart; each is a distinct exit code of the binary
/// (documented in the man page). Errors without a class are told apart by errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A bad argument (what clap would call a usage error).
    Usage,
    /// The directory is not an envelopefs volume.
    NotVolume,
    /// The passphrase or key file does not unlock the keyring.
    WrongSecret,
    /// The volume names settings (code, endpoints, keys, paths) this host has not trusted.
    Untrusted,
    /// The volume's own files were changed by someone without its keys (or are damaged).
    Tampered,
    /// The key store did not answer (network, token, service).
    KeyStoreUnreachable,
    /// The mount point is missing, not a directory, or busy.
    Mountpoint,
    /// Another envelopefs process holds the volume.
    Busy,
}

impl Class {
    /// Every class, in exit-code order.
    pub const ALL: [Class; 8] = [
        Class::Usage,
        Class::NotVolume,
        Class::WrongSecret,
        Class::Mountpoint,
        Class::KeyStoreUnreachable,
        Class::Untrusted,
        Class::Tampered,
        Class::Busy,
    ];

    pub const fn exit_code(self) -> u8 {
        match self {
            Class::Usage => 2,
            Class::NotVolume => 10,
            Class::WrongSecret => 11,
            Class::Mountpoint => 12,
            Class::KeyStoreUnreachable => 13,
            Class::Untrusted => 15,
            Class::Tampered => 16,
            Class::Busy => 17,
        }
    }
}

/// The binary's exit codes and what each means (the man page's EXIT STATUS section).
pub const EXIT_STATUS: [(u8, &str); 10] = [
    (0, "success"),
    (1, "failure without a class of its own (fsck and rekey: problems remain)"),
    (
        Class::Usage.exit_code(),
        "usage: a bad argument, mount option or --config file; an unreadable secret file, a key file with no key",
    ),
    (Class::NotVolume.exit_code(), "the directory is not an envelopefs volume"),
    (Class::WrongSecret.exit_code(), "wrong passphrase or key file"),
    (Class::Mountpoint.exit_code(), "the mount point is missing, not a directory, or busy"),
    (Class::KeyStoreUnreachable.exit_code(), "the key store cannot be reached (KMS, PKCS#11 module or token)"),
    (Class::Untrusted.exit_code(), "the volume names settings this host does not trust"),
    (Class::Tampered.exit_code(), "the volume's files were tampered with or are damaged"),
    (Class::Busy.exit_code(), "the volume is in use by another envelopefs process"),
];

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(errno: i32, context: impl Into<String>) -> Self {
        Self { errno, context: context.into(), class: None, integrity: None, level: Level::of(errno), source: None }
    }

    /// An I/O error from the backing store, keeping its errno.
    pub fn io(err: io::Error, context: impl Into<String>) -> Self {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        Self { source: Some(Arc::new(err)), ..Self::new(errno, context) }
    }

    /// The volume's own files do not authenticate: edited, swapped or rolled back.
    pub fn tampered(context: impl Into<String>) -> Self {
        Self::new(libc::EIO, context).with_class(Class::Tampered)
    }

    /// Settings the host has not trusted.
    pub fn untrusted(context: impl Into<String>) -> Self {
        Self::new(libc::EACCES, context).with_class(Class::Untrusted)
    }

    pub fn with_class(mut self, class: Class) -> Self {
        self.class = Some(class);
        if matches!(class, Class::KeyStoreUnreachable | Class::Tampered | Class::Untrusted) {
            self.level = Level::Fault;
        }
        self
    }

    /// Log this one as a fault, whatever its errno.
    pub fn fault(mut self) -> Self {
        self.level = Level::Fault;
        self
    }

    pub fn level(&self) -> Level {
        self.level
    }

    pub fn class(&self) -> Option<Class> {
        self.class
    }

    /// Data that fails to authenticate: EIO, counted by what it was.
    pub fn integrity(kind: Integrity, context: impl Into<String>) -> Self {
        Self { integrity: Some(kind), ..Self::new(libc::EIO, context) }.fault()
    }

    pub fn integrity_kind(&self) -> Option<Integrity> {
        self.integrity
    }

    /// Data that does not authenticate or parse: never hand out wrong bytes.
    pub fn corrupt(context: impl Into<String>) -> Self {
        Self::new(libc::EIO, context).fault()
    }

    /// The key needed is missing, disabled or refused.
    pub fn access(context: impl Into<String>) -> Self {
        Self::new(libc::EACCES, context).fault()
    }

    /// Prefix more context (for example the path of the file concerned).
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }

    pub fn errno(&self) -> i32 {
        self.errno
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.context)?;
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// An error and its sources as one line, each distinct message once (a library's error
/// often repeats its source's text in its own), by Display only: a dependency's Debug
/// dump is no message for a person.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = err.source();
    }
    out
}

/// Text that may hold bytes from the backing directory (names, paths), made safe to show
/// on a terminal or in a log: control characters (ESC sequences that move the cursor or
/// erase a line, CR, a newline that would forge a log line, C1 controls) are escaped.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let shown_escaped = |c: char| c.is_control();
    if !s.chars().any(shown_escaped) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if shown_escaped(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A bad argument: exit code 2, whichever layer noticed it.
pub fn usage(context: impl Into<String>) -> Error {
    Error::new(libc::EINVAL, context).with_class(Class::Usage)
}

/// Turn the last OS error into an `Error` with context.
pub fn last_os(context: impl Into<String>) -> Error {
    Error::io(io::Error::last_os_error(), context)
}

/// Run a libc call returning -1 on failure.
pub fn cvt(ret: libc::c_int, context: impl FnOnce() -> String) -> Result<libc::c_int> {
    if ret == -1 {
        Err(Error::io(io::Error::last_os_error(), context()))
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_errno_and_context() {
        let e = Error::io(io::Error::from_raw_os_error(libc::ENOENT), "open a/b");
        assert_eq!(e.errno(), libc::ENOENT);
        assert!(e.to_string().starts_with("open a/b: "));
        assert_eq!(e.level(), Level::Answer);
        let e = Error::corrupt("block 3 does not authenticate").context("file x");
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(e.to_string(), "file x: block 3 does not authenticate");
        assert_eq!(e.level(), Level::Fault);
    }

    #[test]
    fn the_level_is_decided_where_the_error_is_made_and_a_clone_keeps_the_cause() {
        assert_eq!(Error::new(libc::ENOTEMPTY, "rmdir").level(), Level::Answer);
        assert_eq!(Error::new(libc::EAGAIN, "store").with_class(Class::KeyStoreUnreachable).level(), Level::Fault);
        assert_eq!(Error::new(libc::EEXIST, "planted").fault().level(), Level::Fault);
        let e = Error::io(io::Error::from_raw_os_error(libc::ENOSPC), "append").context("file a");
        let shared = e.clone();
        assert_eq!(shared.level(), Level::Fault);
        assert_eq!(chain(&shared), chain(&e));
        let cause = std::error::Error::source(&shared).unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(cause.raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn a_chain_names_each_distinct_cause_once() {
        let inner = Error::io(io::Error::from_raw_os_error(libc::ECONNREFUSED), "io error");
        let outer = Error { source: Some(Arc::new(inner)), ..Error::new(libc::EIO, "dispatch failure") };
        assert_eq!(chain(&outer), "dispatch failure: io error: Connection refused (os error 111)");
    }

    #[test]
    fn printable_escapes_what_a_terminal_or_a_log_would_act_on() {
        assert_eq!(printable("a/b c.txt"), "a/b c.txt");
        assert_eq!(printable("x\r\x1b[1A\x1b[2Kok"), "x\\r\\u{1b}[1A\\u{1b}[2Kok");
        assert_eq!(printable("forged\nWARN line"), "forged\\nWARN line");
        assert_eq!(printable("c1\u{9b}2J"), "c1\\u{9b}2J");
    }

    #[test]
    fn every_class_has_a_distinct_documented_exit_code() {
        let documented: Vec<u8> = EXIT_STATUS.iter().map(|(c, _)| *c).collect();
        let mut codes: Vec<u8> = Class::ALL.iter().map(|c| c.exit_code()).collect();
        for c in &codes {
            assert!(documented.contains(c), "exit code {c} is not documented");
            assert!(*c > 1, "exit code {c} is taken by success or plain failure");
        }
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Class::ALL.len(), "two classes share an exit code");
        assert_eq!(documented.len(), Class::ALL.len() + 2);
    }
}
