//! `envelopefs mount`: check the mount point, then daemonize, or serve in the foreground
//! until unmounted or signalled.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::daemon::options::MountSettings;
use crate::daemon::process;
use crate::error::{Class, Error};
use crate::file::journal::{Journal, Mode, DEFAULT_LIMIT};
use crate::fs::EncryptedFs;
use crate::volume::lock::{lock, Access};
use crate::volume::{OpenOptions, Volume, VolumeConfig};

/// Lazily detach the mount at `path` (when it cannot be unmounted cleanly).
fn detach(path: &std::path::Path) {
    let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
}

/// Where a detached daemon's log lines go (syslog(3)).
const SYSLOG_SOCKET: &str = "/dev/log";

/// Detach a dead FUSE mount at `mnt` left by a daemon of the volume at `backing`; any
/// other dead mount is left for the admin, with the reason.
fn clear_dead_mount(mnt: &std::path::Path, backing: &std::path::Path) -> Result<(), Error> {
    let why = |msg: String| Error::new(libc::ENOTCONN, msg);
    let abs = std::path::absolute(mnt).map_err(|e| Error::io(e, "its absolute path"))?;
    match process::mount_source_at(&abs) {
        Some(src) if src == backing => {
            warn!(
                "mount point {} had a dead FUSE connection of this volume (its daemon exited without unmounting): \
                 detaching it",
                abs.display()
            );
            rustix::mount::unmount(&abs, rustix::mount::UnmountFlags::DETACH)
                .map_err(|e| why(format!("has a dead FUSE connection that could not be detached: {e}")))
        }
        Some(src) => Err(why(format!(
            "has a dead FUSE connection of {}, not of this volume: detach it with `umount -l`",
            src.display()
        ))),
        None => Err(why("does not answer (ENOTCONN) and is not a mount this host lists".into())),
    }
}

pub fn mount(mut s: MountSettings, foreground: bool, argv: &[OsString]) -> Result<ExitCode> {
    let b = s.backing().to_owned();
    s.backing = Some(
        std::fs::canonicalize(&b)
            .map_err(|e| Error::io(e, format!("backing directory {}", b.display())).with_class(Class::NotVolume))?,
    );
    // The daemon works from / once it serves: every path it keeps must be absolute.
    let mnt = s.mountpoint().to_owned();
    s.mountpoint = Some(std::path::absolute(&mnt).map_err(|e| Error::io(e, format!("mount point {}", mnt.display())))?);
    let mut opts = s.mount_options();
    let mnt_err = |errno, why: &str| {
        Error::new(errno, format!("mount point {} {why}", s.mountpoint().display())).with_class(Class::Mountpoint)
    };
    // statfs always asks the daemon; a stat may be answered from the kernel's cache for up
    // to a second after the daemon died.
    let dead = rustix::fs::statvfs(s.mountpoint()).is_err_and(crate::sys::is_dead_fuse);
    let meta = match std::fs::metadata(s.mountpoint()) {
        // The daemon of the last mount here died (kill -9, OOM, a panic): what is left is
        // a connection nobody serves. Clear it if it was this volume's, then mount again,
        // so that systemd's Restart=on-failure brings the volume back.
        _ if dead => {
            clear_dead_mount(s.mountpoint(), s.backing()).map_err(|e| mnt_err(libc::ENOTCONN, &e.to_string()))?;
            std::fs::metadata(s.mountpoint()).map_err(|_| mnt_err(libc::ENOENT, "does not exist"))?
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            clear_dead_mount(s.mountpoint(), s.backing()).map_err(|e| mnt_err(libc::ENOTCONN, &e.to_string()))?;
            std::fs::metadata(s.mountpoint()).map_err(|_| mnt_err(libc::ENOENT, "does not exist"))?
        }
        r => r.map_err(|_| mnt_err(libc::ENOENT, "does not exist"))?,
    };
    if !meta.is_dir() {
        return Err(mnt_err(libc::ENOTDIR, "is not a directory").into());
    }
    if process::is_mount_point(s.mountpoint()) {
        return Err(mnt_err(libc::EBUSY, "is busy: something is already mounted there").into());
    }
    let mnt_real = std::fs::canonicalize(s.mountpoint()).map_err(|_| mnt_err(libc::ENOENT, "does not exist"))?;
    if mnt_real.starts_with(s.backing()) || s.backing().starts_with(&mnt_real) {
        return Err(mnt_err(libc::EINVAL, &format!("overlaps the backing directory {}", s.backing().display())).into());
    }
    if std::fs::read_dir(&mnt_real).map(|mut d| d.next().is_some()).unwrap_or(false) {
        return Err(mnt_err(libc::ENOTEMPTY, "is not empty: its files would be hidden under the mount").into());
    }
    // Fail fast (and in the caller's terminal) on a directory that is not a volume.
    VolumeConfig::load(s.backing())?;
    if !foreground {
        // Detached, the daemon logs to syslog: where there is none (many containers and
        // minimal images), say so now, while someone reads this terminal.
        if s.log_file.is_none() && !std::path::Path::new(SYSLOG_SOCKET).exists() {
            warn!(
                "no syslog here ({SYSLOG_SOCKET} is missing): the daemon's log (tampering, key-store outages, \
                 a full disk) will be lost; give --log-file FILE, or run it in the foreground under systemd"
            );
        }
        return Ok(ExitCode::from(crate::daemon::daemonize::daemonize(s.backing(), &s.secret, argv)?));
    }
    // The volume is this daemon's (or, shared, this host's among others) before anything
    // of it is opened. The config is authenticated only by `Volume::open`: the lock's kind
    // is checked against it there.
    let access = if VolumeConfig::load(s.backing())?.shared { Access::Shared } else { Access::Alone };
    let _lock = lock(s.backing(), access)?;
    let vol = Arc::new(Volume::open(
        s.backing(),
        &s.secret,
        &OpenOptions {
            cache: s.cache(),
            audit_log: s.audit_log.clone(),
            // A read-only mount makes no files: keys made ahead would be KMS calls for nothing.
            kms_pool: Some(if s.read_only { 0 } else { s.kms_pool.unwrap_or(crate::keys::pool::DEFAULT_SIZE) }),
            kms_timeout: s.kms_timeout.map(Duration::from_secs_f64),
            ..OpenOptions::default()
        },
    )?);
    // Crash recovery below may unwrap keys already: their audit lines are written out
    // whichever way this returns.
    let _audit = FlushAudit(vol.clone());
    if vol.config.shared != (access == Access::Shared) {
        return Err(Error::tampered("envelopefs.toml changed while the volume was being opened").into());
    }
    if vol.config.shared {
        if s.exclusive {
            return Err(crate::error::usage("-o exclusive: a shared volume is changed by other hosts").into());
        }
        opts = opts.shared();
        info!("shared volume: names and attributes are not cached, locks reach every host (docs/SHARING.md)");
    }
    process::raise_fd_limit();
    process::unmask_modes();
    let (journal, recovered) = start_journal(&vol, &s)?;
    let prefetch = s.prefetch(vol.keys.unwraps_remotely());
    let mut fs = EncryptedFs::new(vol.clone())?.with_inode_fds(s.file_handles, s.max_inode_fds)?;
    info!("{}", fs.inode_fds_summary());
    if prefetch.files > 0 {
        info!(
            "keys unwrapped ahead in a scan: up to {} files of a directory per miss, {} at a time (--prefetch-keys)",
            prefetch.files, prefetch.parallel
        );
        fs = fs.with_prefetch(prefetch);
    }
    if let Some(j) = &journal {
        fs = fs.with_journal(j.clone());
    }
    let fs = Arc::new(fs);
    crate::volume::watch_config(&vol, Duration::from_secs(2));
    if let Some(addr) = &s.metrics {
        crate::daemon::metrics::serve(addr, fs.clone(), journal.clone(), recovered)?;
    }
    let mut session = crate::fuse::mount(fs.clone(), s.mountpoint(), opts)
        .with_context(|| format!("mounting on {}", s.mountpoint().display()))?;
    let mut unmounter = session.unmount_callable();
    // The mount exists from here on: an error must not leave it behind without a daemon.
    let mut signals = match signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            detach(s.mountpoint());
            return Err(e.into());
        }
    };
    let mnt = s.mountpoint().to_owned();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            // SIGHUP is logrotate's: reopen the log file by its name, keep serving.
            if sig == libc::SIGHUP {
                match process::reopen_log_file() {
                    Ok(true) => info!("signal {sig}: log file reopened"),
                    Ok(false) => info!("signal {sig}: no log file to reopen"),
                    Err(e) => warn!("signal {sig}: log file not reopened: {e}"),
                }
                continue;
            }
            info!("signal {sig}: unmounting {}", mnt.display());
            process::sd_notify("STOPPING=1");
            let res = match rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()) {
                // Mounted by fusermount3 (not root): it unmounts too.
                Err(rustix::io::Errno::PERM) => unmounter.unmount(),
                r => r.map_err(std::io::Error::from),
            };
            if let Err(e) = res {
                warn!("unmount of {} failed: {e}; unmounting lazily", mnt.display());
                detach(&mnt);
            }
            break;
        }
    });
    let status = crate::daemon::status::reporter(fs, s.backing(), s.mountpoint());
    // Removed when this function returns, that is once the mount is gone.
    let socket = match crate::daemon::control::serve(s.mountpoint(), status) {
        Ok(sock) => {
            info!("status socket {}", sock.path().display());
            Some(sock)
        }
        Err(e) => {
            warn!("no status socket: {e}");
            None
        }
    };
    // Ready means "answers": stat the mount point through the running session first.
    let (probe, mnt) = (s.mountpoint().to_owned(), s.mountpoint().display().to_string());
    let back = s.backing().display().to_string();
    let sock = socket.as_ref().map(|s| s.path().to_owned());
    let read_ahead_kb = s.read_ahead_kb;
    let audited = vol.clone();
    // From a child process: see `sys::probe` (a kill -9 meanwhile would hang the mount).
    std::thread::spawn(move || match crate::sys::probe::stat_in_child(&probe) {
        Ok(st) => {
            if read_ahead_kb > 0 {
                if let Err(e) = crate::fuse::set_read_ahead(st.st_dev, read_ahead_kb) {
                    warn!("read-ahead left at the kernel's default: {e}");
                }
            }
            info!("mounted {back} on {mnt}");
            process::announce_ready(std::env::var_os("ENVELOPEFS_NOTIFY_PARENT").is_some());
        }
        Err(e) => {
            tracing::error!("the new mount does not answer a stat: {e}; giving up");
            detach(&probe);
            // exit() runs no destructors: the socket this process bound goes by hand.
            if let Some(p) = sock {
                let _ = std::fs::remove_file(p);
            }
            audited.keys.flush_audit();
            std::process::exit(1);
        }
    });
    // Keep no directory of the host busy (everything given by path is open by now).
    let _ = std::env::set_current_dir("/");
    let served = session.run().context("serving the mount");
    if let Some(j) = journal {
        // Every change is durable before the journal that covers it goes.
        if let Err(e) = j.close() {
            warn!("crash journal not closed ({e}); the next mount checks what it names");
        }
    }
    served?;
    info!("unmounted {}", s.mountpoint().display());
    Ok(ExitCode::SUCCESS)
}

/// Finish what a crash left (the journal of the last mount, `recovery`), then start this
/// mount's journal. A read-only mount changes nothing: it only says what is pending.
/// The journal, and how many files the recovery settled.
fn start_journal(vol: &Volume, s: &MountSettings) -> Result<(Option<Arc<Journal>>, u64)> {
    if s.read_only {
        let pending = crate::file::recovery::describe_pending(vol)?;
        for p in &pending {
            warn!("{}: {} (mounted read-only: not recovered)", p.path.display(), p.what);
        }
        return Ok((None, 0));
    }
    let touched = crate::file::recovery::recover(vol)?;
    if !touched.is_empty() {
        info!("crash recovery touched {} file(s); each is logged above", touched.len());
    }
    let recovered = touched.len() as u64;
    if s.journal == Mode::Off {
        return Ok((None, recovered));
    }
    let j = Journal::create(
        &vol.journal_dir(),
        &crate::file::journal::name_of(&vol),
        &vol.config.volume_id,
        &vol.root,
        s.journal,
        DEFAULT_LIMIT,
        None,
    )
    .with_context(|| format!("starting the crash journal in {}", vol.journal_dir().display()))?;
    Ok((Some(j), recovered))
}

/// Writes out the audit lines queued so far when dropped (the daemon's volume lives on in
/// its threads, so the log's own drop never comes).
struct FlushAudit(Arc<Volume>);

impl Drop for FlushAudit {
    fn drop(&mut self) {
        self.0.keys.flush_audit();
    }
}
