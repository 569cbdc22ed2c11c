//! `envelopefs umount`: unmount, then wait (bounded) for the daemon to let go of the
//! volume, so that a mount right after `umount` does not find the volume still locked.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::daemon::process::mount_source;
use crate::error::{Error, Result};
use crate::volume::lock::volume_locked;

/// How long `umount` waits for the daemon to release the volume.
pub const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Unmount `mountpoint` (with fusermount3 when this user may not unmount), then wait for
/// the daemon of the volume that was mounted there to let go of it.
pub fn umount(mountpoint: &Path) -> Result<()> {
    let backing = mount_source(mountpoint);
    if let Err(e) = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty()) {
        if e != rustix::io::Errno::PERM {
            let err = std::io::Error::from(e);
            return Err(Error::new(e.raw_os_error(), format!("unmounting {}: {err}", mountpoint.display())));
        }
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(mountpoint)
            .status()
            .map_err(|e| Error::new(libc::EIO, format!("running fusermount3 -u: {e}")))?;
        if !st.success() {
            return Err(Error::new(libc::EIO, format!("fusermount3 -u {} failed", mountpoint.display())));
        }
    }
    if let Some(backing) = backing {
        wait_released(&backing, Instant::now() + RELEASE_WAIT);
    }
    Ok(())
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
        assert!(umount(d.path()).is_err());
    }
}
