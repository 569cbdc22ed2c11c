//! Locks taken through the mount of a shared volume: `fcntl` byte-range locks (POSIX and
//! OFD) and `flock`. Each is an OFD lock on the backing file, held by a description of
//! the file this daemon keeps for the lock's owner, so it reaches every host the backing
//! filesystem carries locks to (docs/SHARING.md).
//!
//! The owner's locks lie `USER_LOCKS` bytes up the backing file: past any stored block and
//! any lock this daemon takes to change blocks (`file::content`), which would otherwise
//! wait for the very process that asked to write. `flock` arrives as a
//! lock of the whole file (the kernel says which, but fuser does not pass it on), so it
//! conflicts with byte-range locks of other owners, as on NFS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::sys::range_lock::{self, Kind};

/// Where the owners' locks begin in the backing file.
pub const USER_LOCKS: u64 = crate::file::content::CONTENT_LOCKS_END;

/// A lock's end as the kernel gives it for "to the end of the file".
const OFFSET_MAX: u64 = i64::MAX as u64;

/// The descriptions that hold each owner's locks, by (inode, owner).
#[derive(Default)]
pub(super) struct Owners(Mutex<HashMap<(u64, u64), Arc<File>>>);

/// A lock's range in the backing file: start and length (0: to the end).
fn backing_range(start: u64, end: u64) -> Result<(u64, u64)> {
    if end < start {
        return Err(Error::new(libc::EINVAL, "lock range ends before it starts"));
    }
    let from = USER_LOCKS
        .checked_add(start)
        .filter(|f| *f <= OFFSET_MAX)
        .ok_or_else(|| Error::new(libc::EOVERFLOW, format!("a lock at {start} is past what a shared volume locks")))?;
    Ok((from, if end >= OFFSET_MAX { 0 } else { end - start + 1 }))
}

impl EncryptedFs {
    /// The description holding `owner`'s locks on inode `ino` (opened at first use).
    fn lock_owner(&self, ino: u64, owner: u64) -> Result<Arc<File>> {
        if let Some(f) = self.locks.0.lock().unwrap().get(&(ino, owner)) {
            return Ok(f.clone());
        }
        let inode = self.inode(ino)?;
        let fd = self.fd(&inode)?;
        let file = sys::reopen(&fd, libc::O_RDWR).or_else(|_| sys::reopen(&fd, libc::O_RDONLY))?;
        Ok(self.locks.0.lock().unwrap().entry((ino, owner)).or_insert_with(|| Arc::new(file)).clone())
    }

    /// The first lock of another owner that conflicts with a lock of `typ` (`F_RDLCK`,
    /// `F_WRLCK`) over `start..=end`: its type, start and end.
    pub fn get_lock(&self, ino: u64, owner: u64, start: u64, end: u64, typ: i32) -> Result<Option<(i32, u64, u64)>> {
        let kind = Kind::from_raw(typ).ok_or_else(|| Error::new(libc::EINVAL, "unknown lock type"))?;
        let (from, len) = backing_range(start, end)?;
        let held = self.lock_owner(ino, owner)?;
        Ok(range_lock::conflict(&*held, kind, from, len)?.map(|(k, s, l)| {
            let s = s.saturating_sub(USER_LOCKS);
            (k.to_raw(), s, if l == 0 { OFFSET_MAX } else { s + l - 1 })
        }))
    }

    /// Take, change or drop (`F_UNLCK`) `owner`'s lock over `start..=end`. `wait`: block
    /// until no other owner's lock is in the way (else EAGAIN).
    pub fn set_lock(&self, ino: u64, owner: u64, start: u64, end: u64, typ: i32, wait: bool) -> Result<()> {
        let kind = Kind::from_raw(typ).ok_or_else(|| Error::new(libc::EINVAL, "unknown lock type"))?;
        let (from, len) = backing_range(start, end)?;
        let held = self.lock_owner(ino, owner)?;
        if !range_lock::set(&*held, kind, from, len, wait)? {
            return Err(Error::new(libc::EAGAIN, "held by another owner"));
        }
        // The owner closed the file while this waited: what was granted goes with it.
        let current = self.locks.0.lock().unwrap().get(&(ino, owner)).is_some_and(|f| Arc::ptr_eq(f, &held));
        if !current {
            range_lock::set(&*held, Kind::Unlock, from, len, false)?;
            return Err(Error::new(libc::EINTR, "the file was closed while the lock was awaited"));
        }
        // What other hosts wrote before they let go is what the owner reads now (as NFS
        // gives at a lock): reads of the file go through a new open from here on.
        if kind != Kind::Unlock {
            let fresh = Arc::new(range_lock::reopen_fresh(&*held, 0, 0)?);
            let inode = self.inode(ino)?;
            let mut st = inode.content.write().unwrap();
            if st.opens > 0 {
                st.fresh = Some(fresh);
            }
        }
        Ok(())
    }

    /// Drop every lock `owner` holds on `ino` (the kernel says so at close).
    pub fn drop_locks(&self, ino: u64, owner: u64) {
        self.locks.0.lock().unwrap().remove(&(ino, owner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ranges_lie_above_every_block_and_keep_their_length() {
        assert_eq!(backing_range(0, OFFSET_MAX).unwrap(), (USER_LOCKS, 0));
        assert_eq!(backing_range(10, 19).unwrap(), (USER_LOCKS + 10, 10));
        assert_eq!(backing_range(5, u64::MAX).unwrap(), (USER_LOCKS + 5, 0));
        assert_eq!(backing_range(USER_LOCKS, USER_LOCKS).unwrap_err().errno(), libc::EOVERFLOW);
        assert_eq!(backing_range(9, 8).unwrap_err().errno(), libc::EINVAL);
    }
}
