//! `envelopefs mount`: check the mount point, then daemonize, or serve in the foreground
//! until unmounted or signalled.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tracing::{info, warn};

use crate::crypto::Backend;
use crate::daemon::options::MountSettings;
use crate::daemon::process;
use crate::error::{Class, Error};
use crate::file::journal::{Journal, Mode, DEFAULT_LIMIT};
use crate::fs::EncryptedFs;
use crate::volume::lock::lock_volume;
use crate::volume::{OpenOptions, Volume, VolumeConfig};

/// Lazily detach the mount at `path` (when it cannot be unmounted cleanly).
fn detach(path: &std::path::Path) {
    let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
}

pub fn mount(mut s: MountSettings, foreground: bool, argv: &[OsString]) -> Result<ExitCode> {
    let b = s.backing().to_owned();
    s.backing =
        Some(std::fs::canonicalize(&b).with_context(|| format!("backing directory {} does not exist", b.display()))?);
    let opts = s.mount_options();
    let mnt_err = |errno, why: &str| {
        Error::new(errno, format!("mount point {} {why}", s.mountpoint().display())).with_class(Class::Mountpoint)
    };
    let meta = std::fs::metadata(s.mountpoint()).map_err(|_| mnt_err(libc::ENOENT, "does not exist"))?;
    if !meta.is_dir() {
        return Err(mnt_err(libc::ENOTDIR, "is not a directory").into());
    }
    if process::is_mount_point(s.mountpoint()) {
        return Err(mnt_err(libc::EBUSY, "is busy: something is already mounted there").into());
    }
    // Fail fast (and in the caller's terminal) on a directory that is not a volume.
    VolumeConfig::load(s.backing())?;
    if !foreground {
        return Ok(ExitCode::from(crate::daemon::daemonize::daemonize(s.backing(), &s.secret, argv)?));
    }
    let backend: Backend = s.crypto.parse().map_err(|e: String| anyhow!(e))?;
    let vol = Volume::open(
        s.backing(),
        &s.secret,
        &OpenOptions {
            backend,
            cache: s.cache(),
            audit_log: s.audit_log.clone(),
            kms_pool: Some(s.kms_pool.unwrap_or(crate::keys::aws_kms::DEFAULT_POOL)),
            kms_timeout: s.kms_timeout.map(Duration::from_secs_f64),
            ..OpenOptions::default()
        },
    )?;
    let _lock = lock_volume(s.backing())?;
    process::raise_fd_limit();
    let journal = start_journal(&vol, &s)?;
    let mut fs = EncryptedFs::new(Arc::new(vol))?.with_inode_fds(s.file_handles, s.max_inode_fds)?;
    info!("{}", fs.inode_fds_summary());
    if let Some(j) = &journal {
        fs = fs.with_journal(j.clone());
    }
    let fs = Arc::new(fs);
    let mut session = crate::fuse::mount(fs.clone(), s.mountpoint(), opts)
        .with_context(|| format!("mounting on {}", s.mountpoint().display()))?;
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    let mnt = s.mountpoint().to_owned();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            info!("signal {sig}: unmounting {}", mnt.display());
            process::sd_notify("STOPPING=1");
            if let Err(e) = unmounter.unmount() {
                warn!("unmount of {} failed: {e}; unmounting lazily", mnt.display());
                detach(&mnt);
            }
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
    std::thread::spawn(move || match std::fs::metadata(&probe) {
        Ok(md) => {
            if read_ahead_kb > 0 {
                use std::os::unix::fs::MetadataExt;
                if let Err(e) = crate::fuse::set_read_ahead(md.dev(), read_ahead_kb) {
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
            std::process::exit(1);
        }
    });
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
fn start_journal(vol: &Volume, s: &MountSettings) -> Result<Option<Arc<Journal>>> {
    if s.read_only {
        let pending = crate::file::recovery::describe_pending(vol)?;
        for p in &pending {
            warn!("{}: {} (mounted read-only: not recovered)", p.path.display(), p.what);
        }
        return Ok(None);
    }
    let touched = crate::file::recovery::recover(vol)?;
    if !touched.is_empty() {
        info!("crash recovery touched {} file(s); each is logged above", touched.len());
    }
    if s.journal == Mode::Off {
        return Ok(None);
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
    Ok(Some(j))
}
