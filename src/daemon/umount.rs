//! `envelopefs umount`: unmount, then wait (bounded) for the daemon to let go of the
//! volume, so that a mount right after `umount` does not find the volume still locked.

use std::path::Path;
use std::process::Command;

use rustix::mount::UnmountFlags;
use std::time::{Duration, Instant};

use crate::daemon::process::mount_source;
use crate::error::{Class, Error, Result};
use crate::volume::lock::volume_locked;

/// How long `umount` waits for the daemon to release the volume.
pub const RELEASE_WAIT: Duration = Duration::from_secs(10);
/// How long `umount --lazy` waits (the daemon may be serving files still open).
const LAZY_WAIT: Duration = Duration::from_secs(2);

/// Unmount `mountpoint` (with fusermount3 when this user may not unmount; lazily with
/// `lazy`), then wait for the daemon of the volume that was mounted there to let go of it.
pub fn umount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let refuse = |errno, why: String| Err(Error::new(errno, why).with_class(Class::Mountpoint));
    let Some(backing) = mount_source(mountpoint) else {
        return refuse(libc::EINVAL, format!("{} is not an envelopefs mount", mountpoint.display()));
    };
    // The daemon to wait for: on a shared volume other hosts' daemons hold its lock too.
    let daemon = crate::daemon::control::query(mountpoint).ok().map(|st| st.pid);
    let flags = if lazy { UnmountFlags::DETACH } else { UnmountFlags::empty() };
    match rustix::mount::unmount(mountpoint, flags) {
        Ok(()) => {}
        Err(rustix::io::Errno::BUSY) => {
            return refuse(
                libc::EBUSY,
                format!("{} is busy: files are open on it (close them, or `umount --lazy`)", mountpoint.display()),
            )
        }
        Err(rustix::io::Errno::PERM) => {
            let mut c = Command::new("fusermount3");
            c.arg("-u");
            if lazy {
                c.arg("-z");
            }
            let st = c
                .arg(mountpoint)
                .status()
                .map_err(|e| Error::new(libc::EIO, format!("running fusermount3 -u: {e}")))?;
            if !st.success() {
                return Err(Error::new(libc::EIO, format!("fusermount3 -u {} failed", mountpoint.display())));
            }
        }
        Err(e) => {
            return Err(Error::new(
                e.raw_os_error(),
                format!("unmounting {}: {}", mountpoint.display(), std::io::Error::from(e)),
            ))
        }
    }
    // After a lazy unmount with files open the daemon goes on serving them: a short wait.
    let wait = if lazy { LAZY_WAIT } else { RELEASE_WAIT };
    let released = match daemon {
        Some(pid) => wait_exited(pid, Instant::now() + wait),
        None => wait_released(&backing, Instant::now() + wait),
    };
    if !released && !lazy {
        tracing::warn!("the daemon of {} has not exited yet", backing.display());
    }
    Ok(())
}

/// Wait until process `pid` has exited (a zombie has), or until `deadline`; says which.
fn wait_exited(pid: u32, deadline: Instant) -> bool {
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z')))
            .unwrap_or(true)
    };
    while !gone() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Wait until nobody holds the volume's lock, or until `deadline`; says which.
pub fn wait_released(backing: &Path, deadline: Instant) -> bool {
    loop {
        if !volume_locked(backing) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::lock::lock_volume;
    use crate::volume::testing::volume;

    #[test]
    fn waiting_ends_when_the_lock_goes_or_at_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        let (backing, _) = volume(d.path());
        assert!(wait_released(&backing, Instant::now()));
        let lock = lock_volume(&backing).unwrap();
        assert!(!wait_released(&backing, Instant::now() + Duration::from_millis(50)));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(lock);
        });
        assert!(wait_released(&backing, Instant::now() + Duration::from_secs(5)));
        t.join().unwrap();
    }

    #[test]
    fn a_directory_that_is_not_mounted_cannot_be_unmounted() {
        let d = tempfile::tempdir().unwrap();
        let e = umount(d.path(), false).unwrap_err();
        assert_eq!(e.class(), Some(crate::error::Class::Mountpoint), "{e}");
    }
}
