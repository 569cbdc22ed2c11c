//! Process plumbing for the mount daemon: memory hygiene, readiness, signals.

use std::io::Write;
use std::os::unix::net::UnixDatagram;

use tracing::warn;

/// Keep secrets out of swap and core dumps: no core dumps or ptrace by other users
/// (PR_SET_DUMPABLE=0), and every page locked in RAM as it is touched (MCL_ONFAULT keeps
/// the cost to what is used). Called first thing, before any secret is read. A failure to
/// lock is returned for the caller to report (non-root users may lack RLIMIT_MEMLOCK).
pub fn harden_memory(lock: bool) -> crate::error::Result<()> {
    use crate::error::Error;
    use rustix::process::{set_dumpable_behavior, DumpableBehavior};
    set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(|e| Error::io(e.into(), "PR_SET_DUMPABLE failed"))?;
    if lock {
        use rustix::mm::{mlockall, MlockAllFlags};
        mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT).map_err(|e| {
            Error::io(e.into(), "mlockall failed: data keys may reach swap; run as root or raise RLIMIT_MEMLOCK")
        })?;
    }
    Ok(())
}

/// Modes arrive from the kernel already masked by the caller's umask and must reach the
/// backing store unchanged: whoever serves an `EncryptedFs` runs with umask 0. The mount
/// daemon calls this; the library never changes it behind its user's back.
pub fn unmask_modes() {
    rustix::process::umask(rustix::fs::Mode::empty());
}

/// Every inode the kernel knows costs one descriptor: take the hard limit.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let r = getrlimit(Resource::Nofile);
    if r.current < r.maximum {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: r.maximum, maximum: r.maximum });
    }
}

/// Tell systemd (Type=notify) something, if it is listening.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return warn!("sd_notify: {e}"),
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let res = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = res {
        warn!("sd_notify({state}): {e}");
    }
}

/// The parent of a daemonized mount waits on our stdout for this line.
pub const READY_LINE: &str = "envelopefs-ready";

/// Say the mount is ready: to systemd, and to a waiting parent (then let go of the
/// parent's stdout and stderr, so `$(envelopefs mount …)` or a pipe does not hang).
pub fn announce_ready(to_parent: bool) {
    sd_notify("READY=1");
    if to_parent {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY_LINE}");
        let _ = out.flush();
        detach_stdio();
    }
}

/// The source (for envelopefs: the backing directory) of the envelopefs mount at `path`.
pub fn mount_source(path: &std::path::Path) -> Option<std::path::PathBuf> {
    mount_source_at(&std::fs::canonicalize(path).ok()?)
}

/// Every envelopefs mount point this host lists (type `fuse.envelopefs`).
pub fn envelopefs_mounts() -> Vec<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.split_once(" - ").is_some_and(|(_, t)| t.starts_with("fuse.envelopefs ")))
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| std::path::PathBuf::from(p.replace("\\040", " ")))
        .collect()
}

/// `mount_source` of a mount point named exactly `abs` (a dead mount cannot be resolved).
pub fn mount_source_at(abs: &std::path::Path) -> Option<std::path::PathBuf> {
    let want = abs.to_string_lossy().replace(' ', "\\040");
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let line = info.lines().rev().find(|l| l.split(' ').nth(4) == Some(want.as_str()))?;
    let (_, tail) = line.split_once(" - ")?;
    let mut f = tail.split(' ');
    let fstype = f.next()?;
    let source = f.next()?;
    (fstype == "fuse.envelopefs" || fstype == "fuse").then(|| std::path::PathBuf::from(source.replace("\\040", " ")))
}

/// Is `path` the root of a mount (its device differs from its parent's, or it is listed in
/// mountinfo)? Used to refuse mounting over a busy mount point.
pub fn is_mount_point(path: &std::path::Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

static DETACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where a daemon without --log-file logs: stderr while its parent still waits (so startup
/// errors reach the user's terminal), syslog once it has detached.
#[derive(Clone, Copy, Default)]
pub struct StderrThenSyslog;

pub struct LineWriter(Vec<u8>);

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        if DETACHED.load(std::sync::atomic::Ordering::Relaxed) {
            let line = String::from_utf8_lossy(&self.0).trim_end().replace('\0', " ");
            crate::sys::syslog(&line);
        } else {
            let _ = std::io::stderr().write_all(&self.0);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrThenSyslog {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter(Vec::with_capacity(256))
    }
}

/// Log lines with control characters escaped (`error::printable`): names from the backing
/// directory can hold a newline that forges a line or escapes that rewrite the terminal.
pub struct Escaping<M>(pub M);

pub struct EscapingWriter<W>(W);

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a> for Escaping<M> {
    type Writer = EscapingWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter(self.0.make_writer())
    }
}

impl<W: Write> Write for EscapingWriter<W> {
    /// One event arrives as one write, ending in its newline.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, end) = match text.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (&*text, ""),
        };
        let out = crate::error::printable(body);
        self.0.write_all(out.as_bytes())?;
        self.0.write_all(end.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Let go of the terminal: stdout and stderr to /dev/null, later log lines to syslog.
pub fn detach_stdio() {
    crate::sys::openlog();
    DETACHED.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdout(&null);
        let _ = rustix::stdio::dup2_stderr(&null);
    }
}

/// The daemon's `--log-file`, reopened by name on SIGHUP (after logrotate moved it).
pub struct LogFile {
    path: std::path::PathBuf,
    file: std::sync::Mutex<std::fs::File>,
}

static LOG_FILE: std::sync::OnceLock<std::sync::Arc<LogFile>> = std::sync::OnceLock::new();

impl LogFile {
    fn open_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).append(true).mode(0o640).custom_flags(libc::O_NOFOLLOW).open(path)
    }

    /// Open `path` for appending; the file later reopened by `reopen_log_file`.
    pub fn open(path: &std::path::Path) -> std::io::Result<std::sync::Arc<Self>> {
        let f = Self::open_file(path)?;
        let log = std::sync::Arc::new(Self { path: path.to_owned(), file: std::sync::Mutex::new(f) });
        let _ = LOG_FILE.set(log.clone());
        Ok(log)
    }
}

/// Reopen the log file by its name, if there is one (SIGHUP).
pub fn reopen_log_file() -> std::io::Result<bool> {
    let Some(log) = LOG_FILE.get() else { return Ok(false) };
    let f = LogFile::open_file(&log.path)?;
    *log.file.lock().unwrap() = f;
    Ok(true)
}

// `Arc<LogFile>` is then a `MakeWriter` (tracing-subscriber's impl for `Arc<W>`).
impl Write for &LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.lock().unwrap().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file.lock().unwrap().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.lock().unwrap().flush()
    }
}
