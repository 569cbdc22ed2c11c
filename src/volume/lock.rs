//! One daemon per volume: two would each cache keys and headers the other changes. The
//! lock is an exclusive `flock` on the backing directory itself, which nothing ever
//! replaces (the config file is replaced by rename when `rekey --to-key` updates it).
//! `flock` locks belong to an open file description: two separate opens conflict, even in
//! one process.

use std::fs::File;
use std::path::Path;

use crate::error::{Class, Error, Result};
use crate::volume::{VolumeConfig, CONFIG_NAME};

/// Held for as long as the volume must not be served or rewritten by anyone else; the
/// lock goes with the descriptor when this is dropped.
#[derive(Debug)]
pub struct VolumeLock {
    _dir: File,
}

/// Take the volume's lock, or fail with class [`Class::Busy`] when another process (or
/// another lock in this one) holds it. Fails as `VolumeConfig::load` does on a directory
/// that is not a volume.
pub fn lock_volume(backing: &Path) -> Result<VolumeLock> {
    VolumeConfig::load(backing)?;
    let dir = File::open(backing).map_err(|e| Error::io(e, format!("opening {}", backing.display())))?;
    if rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(Error::new(
            libc::EBUSY,
            format!("{} is in use: mounted (or being repaired) by another envelopefs process", backing.display()),
        )
        .with_class(Class::Busy));
    }
    Ok(VolumeLock { _dir: dir })
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
    if rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockShared).is_ok() {
        let _ = rustix::fs::flock(&dir, rustix::fs::FlockOperation::Unlock);
        return false;
    }
    true
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
        drop(first);
        assert!(!volume_locked(&backing));
        let _again = lock_volume(&backing).unwrap();
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
