//! Who may use a volume at once. A volume that is not shared has one daemon (or one
//! offline tool): two would each cache keys and headers the other changes. A shared volume
//! (`init --shared`) has any number of mounting hosts, which follow each other's changes
//! (docs/SHARING.md), and no tool that rewrites it while any host mounts it.
//!
//! The lock is an OFD lock on `envelopefs.lock` in the backing directory: NFSv4, CephFS,
//! GlusterFS and JuiceFS carry it to every client, where a directory's `flock` stays on
//! its host (JuiceFS). A `flock` on the directory is taken too, the lock of earlier
//! releases. Both belong to an open file description: two opens conflict even in one
//! process.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Class, Error, Result};
use crate::sys::range_lock::{self, Kind};
use crate::volume::{VolumeConfig, CONFIG_NAME};

/// The lock file's name in the backing root (made at the first lock).
pub const LOCK_NAME: &str = "envelopefs.lock";
/// The range of the lock file that is the volume's lock (others: `names::backing`).
pub const VOLUME_LOCK: (u64, u64) = (0, 1);

/// How a lock holder uses the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Alone: the mount of a volume that is not shared, and every tool that rewrites one.
    Alone,
    /// Beside other mounts of a shared volume.
    Shared,
}

/// Held for as long as the volume is in use; the locks go with the descriptors when this
/// is dropped.
#[derive(Debug)]
pub struct VolumeLock {
    _dir: File,
    _file: Option<File>,
    pub access: Access,
}

/// Take the volume's lock to use it alone, or fail with class [`Class::Busy`] when any
/// process (on any host the lock reaches) holds it. Fails as `VolumeConfig::load` does
/// on a directory that is not a volume.
pub fn lock_volume(backing: &Path) -> Result<VolumeLock> {
    lock(backing, Access::Alone)
}

/// Take the volume's lock with `access`.
pub fn lock(backing: &Path, access: Access) -> Result<VolumeLock> {
    VolumeConfig::load(backing)?;
    let dir = File::open(backing).map_err(|e| Error::io(e, format!("opening {}", backing.display())))?;
    let busy = || {
        let why = match access {
            Access::Alone => "mounted (here or on another host of a shared volume) or being repaired",
            Access::Shared => "mounted or being rewritten by an envelopefs that has it alone",
        };
        Error::new(libc::EBUSY, format!("{} is in use: {why}", backing.display())).with_class(Class::Busy)
    };
    let op = match access {
        Access::Alone => rustix::fs::FlockOperation::NonBlockingLockExclusive,
        Access::Shared => rustix::fs::FlockOperation::NonBlockingLockShared,
    };
    if rustix::fs::flock(&dir, op).is_err() {
        return Err(busy());
    }
    let file = open_lock_file(backing)?;
    if let Some(f) = &file {
        let kind = if access == Access::Alone { Kind::Write } else { Kind::Read };
        if !range_lock::set(f, kind, VOLUME_LOCK.0, VOLUME_LOCK.1, false)? {
            return Err(busy());
        }
    }
    Ok(VolumeLock { _dir: dir, _file: file, access })
}

/// The lock file, made if missing. Whoever writes the backing directory may have put
/// anything there: only a regular file is used. `None` on a read-only backing directory,
/// which nobody can rewrite.
pub fn open_lock_file(backing: &Path) -> Result<Option<File>> {
    let path = backing.join(LOCK_NAME);
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => return Ok(None),
        Err(e) => return Err(Error::io(e, format!("opening the volume's lock file {}", path.display()))),
    };
    let meta = file.metadata().map_err(|e| Error::io(e, format!("fstat {}", path.display())))?;
    if !meta.file_type().is_file() {
        return Err(Error::tampered(format!("{} is not a regular file", path.display())));
    }
    Ok(Some(file))
}

/// Whether some process holds the volume's lock (a directory that is not a volume, or
/// that cannot be opened, is not locked).
pub fn volume_locked(backing: &Path) -> bool {
    if !backing.join(CONFIG_NAME).exists() {
        return false;
    }
    let Ok(dir) = File::open(backing) else {
        return false;
    };
    if rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return true;
    }
    let _ = rustix::fs::flock(&dir, rustix::fs::FlockOperation::Unlock);
    match File::open(backing.join(LOCK_NAME)) {
        Ok(f) => range_lock::conflict(&f, Kind::Write, VOLUME_LOCK.0, VOLUME_LOCK.1).is_ok_and(|c| c.is_some()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::testing::volume;

    #[test]
    fn a_second_lock_is_refused_as_busy_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let (backing, _) = volume(d.path());
        assert!(!volume_locked(&backing));
        let first = lock_volume(&backing).unwrap();
        assert!(volume_locked(&backing));
        let err = lock_volume(&backing).unwrap_err();
        assert_eq!(err.class(), Some(Class::Busy));
        assert_eq!(err.errno(), libc::EBUSY);
        assert!(err.to_string().contains("is in use"), "{err}");
        assert_eq!(lock(&backing, Access::Shared).unwrap_err().class(), Some(Class::Busy));
        drop(first);
        assert!(!volume_locked(&backing));
        let _again = lock_volume(&backing).unwrap();
    }

    #[test]
    fn shared_holders_exclude_only_one_that_wants_the_volume_alone() {
        let d = tempfile::tempdir().unwrap();
        let (backing, _) = volume(d.path());
        let a = lock(&backing, Access::Shared).unwrap();
        let b = lock(&backing, Access::Shared).unwrap();
        assert!(volume_locked(&backing));
        assert_eq!(lock_volume(&backing).unwrap_err().class(), Some(Class::Busy));
        drop(a);
        assert_eq!(lock_volume(&backing).unwrap_err().class(), Some(Class::Busy));
        drop(b);
        let _alone = lock_volume(&backing).unwrap();
    }

    /// Another host's lock reaches this one through the lock file alone: the directory's
    /// flock does not cross hosts on JuiceFS. A lock on the file by another description
    /// stands in for that host.
    #[test]
    fn the_lock_file_alone_keeps_a_second_host_out() {
        let d = tempfile::tempdir().unwrap();
        let (backing, _) = volume(d.path());
        drop(lock_volume(&backing).unwrap());
        let other_host = File::options().read(true).write(true).open(backing.join(LOCK_NAME)).unwrap();
        assert!(range_lock::set(&other_host, Kind::Read, 0, 0, false).unwrap());
        assert!(volume_locked(&backing));
        assert_eq!(lock_volume(&backing).unwrap_err().class(), Some(Class::Busy));
        let _shared = lock(&backing, Access::Shared).unwrap();
    }

    #[test]
    fn a_planted_lock_file_that_is_not_a_regular_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (backing, _) = volume(d.path());
        std::os::unix::fs::symlink("/etc/passwd", backing.join(LOCK_NAME)).unwrap();
        let err = lock_volume(&backing).unwrap_err();
        assert_eq!(err.errno(), libc::ELOOP, "{err}");
        std::fs::remove_file(backing.join(LOCK_NAME)).unwrap();
        std::fs::create_dir(backing.join(LOCK_NAME)).unwrap();
        assert!(lock_volume(&backing).is_err());
    }

    #[test]
    fn a_directory_that_is_not_a_volume_is_neither_locked_nor_lockable() {
        let d = tempfile::tempdir().unwrap();
        assert!(!volume_locked(d.path()));
        assert!(!volume_locked(&d.path().join("missing")));
        let err = lock_volume(d.path()).unwrap_err();
        assert_eq!(err.class(), Some(Class::NotVolume));
    }
}
