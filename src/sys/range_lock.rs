//! Byte-range locks of open file descriptions (OFD locks). They belong to the description,
//! not the process, so two opens in one daemon conflict as two hosts do; and NFSv4,
//! CephFS, GlusterFS and JuiceFS carry them to their other clients.

use std::os::fd::AsFd;

use nix::fcntl::{fcntl, FcntlArg};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Unlock,
}

impl Kind {
    fn raw(self) -> libc::c_short {
        (match self {
            Kind::Read => libc::F_RDLCK,
            Kind::Write => libc::F_WRLCK,
            Kind::Unlock => libc::F_UNLCK,
        }) as libc::c_short
    }

    /// From an `l_type` (`F_RDLCK`, `F_WRLCK`, `F_UNLCK`).
    pub fn from_raw(t: i32) -> Option<Self> {
        match t {
            libc::F_RDLCK => Some(Kind::Read),
            libc::F_WRLCK => Some(Kind::Write),
            libc::F_UNLCK => Some(Kind::Unlock),
            _ => None,
        }
    }

    pub fn to_raw(self) -> i32 {
        self.raw() as i32
    }
}

/// A range from `start`, `len` bytes long; `len` 0 reaches past any end.
fn flock(kind: Kind, start: u64, len: u64) -> Result<libc::flock> {
    let too_far = || Error::new(libc::EOVERFLOW, format!("lock range {start}+{len} is past the largest offset"));
    // SAFETY: flock is plain integers, for which all-zero bytes are a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind.raw();
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = i64::try_from(start).map_err(|_| too_far())?;
    l.l_len = i64::try_from(len).map_err(|_| too_far())?;
    Ok(l)
}

/// Take (or with `Kind::Unlock` drop) a lock. `wait`: block until it is granted; else
/// `Ok(false)` when another description holds a conflicting one.
pub fn set(fd: impl AsFd, kind: Kind, start: u64, len: u64, wait: bool) -> Result<bool> {
    let l = flock(kind, start, len)?;
    loop {
        let arg = if wait { FcntlArg::F_OFD_SETLKW(&l) } else { FcntlArg::F_OFD_SETLK(&l) };
        match fcntl(fd.as_fd(), arg) {
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) if !wait => return Ok(false),
            Err(e) => return Err(Error::new(e as i32, format!("byte-range lock {start}+{len}"))),
        }
    }
}

/// The first lock that would conflict with `kind` over the range: (kind, start, len).
pub fn conflict(fd: impl AsFd, kind: Kind, start: u64, len: u64) -> Result<Option<(Kind, u64, u64)>> {
    let mut l = flock(kind, start, len)?;
    fcntl(fd.as_fd(), FcntlArg::F_OFD_GETLK(&mut l))
        .map_err(|e| Error::new(e as i32, format!("testing byte-range lock {start}+{len}")))?;
    Ok(match Kind::from_raw(l.l_type as i32) {
        None | Some(Kind::Unlock) => None,
        Some(k) => Some((k, l.l_start as u64, l.l_len as u64)),
    })
}

/// A new open of a locked file, to read and write through while the lock is held: a
/// client of a shared filesystem may go on serving, within one open, what it read before
/// the lock was granted (JuiceFS does), while a new open that bypasses the page cache
/// sees every change flushed before (close-to-open). The kernel's cached pages of the
/// locked range (`len` bytes from `start`, 0: to the end) are dropped too.
pub fn reopen_fresh(file: &std::fs::File, start: u64, len: u64) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let direct = if bypass_page_cache(file) { rustix::fs::OFlags::DIRECT } else { rustix::fs::OFlags::empty() };
    let open = |flags| {
        rustix::fs::open(&path, flags | direct | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
            .map(std::fs::File::from)
    };
    let fresh = open(rustix::fs::OFlags::RDWR)
        .or_else(|_| open(rustix::fs::OFlags::RDONLY))
        .map_err(|e| Error::io(e.into(), "opening a locked file again"))?;
    rustix::fs::fadvise(&fresh, start, std::num::NonZeroU64::new(len), rustix::fs::Advice::DontNeed)
        .map_err(|e| Error::io(e.into(), "dropping cached pages of a locked range"))?;
    Ok(fresh)
}

/// Whether opens of `file` for other hosts' bytes must bypass the page cache (`O_DIRECT`):
/// on a FUSE filesystem (JuiceFS keeps a file's cached pages across a new open while its
/// attribute cache says the file is unchanged) and on NFS. FUSE takes unaligned direct
/// I/O (JuiceFS, seen here), as NFS does by its documentation (not tested here); local
/// filesystems need neither.
pub fn bypass_page_cache(file: &impl AsFd) -> bool {
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    const NFS_SUPER_MAGIC: i64 = 0x6969;
    rustix::fs::fstatfs(file).is_ok_and(|st| [FUSE_SUPER_MAGIC, NFS_SUPER_MAGIC].contains(&(st.f_type as i64)))
}

/// The file's length as the filesystem has it now (`AT_STATX_FORCE_SYNC`).
pub fn fresh_len(file: &std::fs::File) -> Result<u64> {
    use rustix::fs::{AtFlags, StatxFlags};
    rustix::fs::statx(file, "", AtFlags::EMPTY_PATH | AtFlags::STATX_FORCE_SYNC, StatxFlags::SIZE)
        .map(|st| st.stx_size)
        .map_err(|e| Error::io(e.into(), "statx"))
}

/// A lock held until dropped.
#[must_use = "the lock is dropped at once"]
pub struct Held<'a, F: AsFd> {
    fd: &'a F,
    start: u64,
    len: u64,
}

/// Take a lock and hold it for the guard's life (waiting for it as long as it takes).
pub fn hold<F: AsFd>(fd: &F, kind: Kind, start: u64, len: u64) -> Result<Held<'_, F>> {
    set(fd, kind, start, len, true)?;
    Ok(Held { fd, start, len })
}

impl<F: AsFd> Drop for Held<'_, F> {
    fn drop(&mut self) {
        if let Err(e) = set(self.fd, Kind::Unlock, self.start, self.len, false) {
            tracing::warn!("dropping a byte-range lock: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn two_opens_of_one_file_conflict_on_overlapping_ranges_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let open = || OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p).unwrap();
        let (a, b) = (open(), open());
        let held = hold(&a, Kind::Write, 100, 50).unwrap();
        assert!(!set(&b, Kind::Read, 120, 1, false).unwrap());
        assert_eq!(conflict(&b, Kind::Read, 0, 0).unwrap(), Some((Kind::Write, 100, 50)));
        assert!(set(&b, Kind::Write, 150, 10, false).unwrap(), "an adjacent range is free");
        assert!(set(&b, Kind::Unlock, 150, 10, false).unwrap());
        // Readers share.
        drop(held);
        let _r = hold(&a, Kind::Read, 0, 0).unwrap();
        assert!(set(&b, Kind::Read, 10, 10, false).unwrap());
        assert!(!set(&b, Kind::Write, 1 << 62, 0, false).unwrap(), "a lock with no end reaches any offset");
        assert_eq!(set(&b, Kind::Write, u64::MAX, 1, false).unwrap_err().errno(), libc::EOVERFLOW);
    }
}
