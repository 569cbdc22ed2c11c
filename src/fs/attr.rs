//! Attributes: what `stat` shows of a backing object (sizes in plaintext), and `setattr`
//! (mode, owner, size, times).

use super::*;

pub(super) fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs((-sec) as u64) + Duration::from_nanos(nsec as u64)
    }
}

pub(super) fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        Some(SetTime::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        Some(SetTime::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 },
            Err(e) => {
                let d = e.duration();
                let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if n < 0 {
                    s -= 1;
                    n += 1_000_000_000;
                }
                libc::timespec { tv_sec: s, tv_nsec: n }
            }
        },
    }
}

impl EncryptedFs {
    pub(super) fn attr_of(&self, ino: u64, st: &libc::stat) -> Attr {
        let mut size = st.st_size as u64;
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            size = match self.vol.geometry.plain_size(size) {
                Ok(s) => s,
                Err(e) => e.readable_size(),
            };
        } else if st.st_mode & libc::S_IFMT == libc::S_IFLNK && self.vol.names().is_some() {
            size = crate::names::target_len(size);
        }
        // (A spilled target's length is in its marker: `attr_at` reads it.)
        Attr {
            ino,
            size,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: self.vol.geometry.block_size as u32,
        }
    }

    /// `attr_of` for the object open at `fd`, with the length of a spilled symlink target
    /// read from its marker.
    pub(super) fn attr_at(&self, ino: u64, st: &libc::stat, fd: RawFd) -> Attr {
        let mut attr = self.attr_of(ino, st);
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK
            && self.vol.names().is_some()
            && st.st_size as u64 == crate::names::MARKER_LEN
        {
            if let Some((len, _)) = sys::readlinkat(fd).ok().as_deref().and_then(crate::names::parse_marker) {
                attr.size = len;
            }
        }
        attr
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let fd = self.fd(&inode)?;
        if self.vol.config.shared {
            sys::sync_attrs(fd.as_raw_fd())?;
        }
        let st = sys::fstat(fd.as_raw_fd())?;
        Ok(self.attr_at(ino, &st, fd.as_raw_fd()))
    }

    pub fn setattr(&self, ino: u64, set: SetAttr, caller: Caller) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let fd = self.fd(&inode)?;
        if let Some(mode) = set.mode {
            if !inode.is_symlink() {
                sys::chmod_fd(fd.as_raw_fd(), mode & 0o7777)?;
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            sys::fchown_fd(fd.as_raw_fd(), set.uid.unwrap_or(u32::MAX), set.gid.unwrap_or(u32::MAX))?;
        }
        if let Some(size) = set.size {
            self.truncate(&inode, &fd, size, set.fh, caller)?;
        }
        // Through the caller's open file when there is one: a backing filesystem may drop
        // a removed file's name at once (JuiceFS), and the kernel still writes back times
        // of a file open after its last name went.
        let open = set.fh.and_then(|fh| self.file_handle(fh).ok());
        let target = open.as_ref().map_or(fd.as_raw_fd(), |h| h.file.as_raw_fd());
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [timespec(set.atime), timespec(set.mtime)];
            let set_times = match &open {
                Some(h) => sys::futimens(h.file.as_raw_fd(), &times),
                None => sys::utimens_fd(fd.as_raw_fd(), inode.is_symlink(), &times),
            };
            match set_times {
                // Removed through this mount and gone from the backing filesystem: through
                // a handle still open on it, else there is nothing left to set times on.
                Err(e) if e.errno() == libc::ENOENT && inode.pinned.lock().unwrap().is_some() => {
                    let Some(h) = self.open_handle_of(&inode) else {
                        tracing::debug!("times of a removed file are dropped: {e}");
                        let mut gone = Attr::absent();
                        (gone.ino, gone.mode) = (ino, inode.fmt);
                        return Ok(gone);
                    };
                    sys::futimens(h.file.as_raw_fd(), &times)?;
                    return Ok(self.attr_at(ino, &sys::fstat(h.file.as_raw_fd())?, fd.as_raw_fd()));
                }
                r => r?,
            }
        }
        let st = sys::fstat(target)?;
        Ok(self.attr_at(ino, &st, fd.as_raw_fd()))
    }

    pub(super) fn truncate(
        &self,
        inode: &Arc<Inode>,
        fd: &OwnedFd,
        size: u64,
        fh: Option<u64>,
        caller: Caller,
    ) -> Result<()> {
        match inode.fmt {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(Error::new(libc::EISDIR, "truncate of a directory")),
            _ => return Err(Error::new(libc::EINVAL, "truncate of a special file")),
        }
        let handle = fh.and_then(|fh| self.file_handle(fh).ok()).filter(|h| h.writable);
        let own;
        let file = match &handle {
            Some(h) => &h.file,
            None => {
                own = sys::reopen(fd, libc::O_RDWR)?;
                &own
            }
        };
        let mut st = inode.content.write().unwrap();
        if size == 0 && (st.key.is_some() || file.metadata().is_ok_and(|m| m.len() > 0)) {
            // An emptied file gets a new data key at its next write: without one to give,
            // emptying it would leave content that can no longer be written.
            self.vol.keys.can_make_keys(&|| sys::describe_fd(file.as_raw_fd()))?;
        }
        let who = handle.as_ref().map_or(caller, |h| h.writer(caller));
        self.journaled(inode, |journal| {
            let describe = || sys::describe_fd(file.as_raw_fd());
            let key = self.key_for_write(&mut st, file, size > 0, who, journal).map_err(|e| e.context(describe()))?;
            if key.is_none() {
                return Ok(()); // empty, headerless, and staying empty
            }
            let c =
                Content { file, geo: self.vol.geometry, key: key.as_deref(), journal, shared: self.vol.config.shared };
            c.truncate(size).map_err(|e| e.context(describe()))
        })
    }
}
