//! The namespace: lookups, creating, linking, removing and renaming names, each prepared
//! the same way (the plaintext name's backing name, its parent's descriptor).

use super::*;

impl EncryptedFs {
    /// The backing name of a name to make, change or remove in `parent`. With plaintext
    /// names the volume's own files are out of reach; encrypted names never meet them.
    pub(super) fn backing_name(&self, parent: u64, name: &OsStr) -> Result<BackingName> {
        if self.vol.names().is_none() && is_reserved(name, parent == ROOT_INO) {
            return Err(Error::new(libc::EPERM, format!("{name:?} is reserved for the volume's own files")));
        }
        backing::resolve(self.vol.names(), name)
    }

    /// Hold the long-name lock if `names` has a long one.
    pub(super) fn long_name_guard(&self, names: &[&BackingName]) -> Result<Option<backing::LongNamesHeld<'_>>> {
        names.iter().any(|b| b.side.is_some()).then(|| self.long_names.hold()).transpose()
    }

    /// Make the entry of `b` in `dir` with `make`, its side file first if it is long.
    pub(super) fn make_named(
        &self,
        dir: RawFd,
        b: &BackingName,
        make: impl FnOnce(&std::ffi::CStr) -> Result<()>,
    ) -> Result<()> {
        let _g = self.long_name_guard(&[b])?;
        backing::put_side(dir, b)?;
        let made = make(&sys::cstr(&b.main)?);
        if made.is_err() {
            let _ = backing::drop_side(dir, b);
        }
        made
    }

    pub(super) fn lookup_fd(&self, parent: &Arc<Inode>, backing: &OsStr) -> Result<Attr> {
        let c = sys::cstr(backing)?;
        let fd = sys::open_path(self.fd(parent)?.as_raw_fd(), &c)?;
        if self.vol.config.shared {
            sys::sync_attrs(fd.as_raw_fd())?;
        }
        let st = sys::fstat(fd.as_raw_fd())?;
        let attr = self.attr_at(0, &st, fd.as_raw_fd());
        let inode = self.intern(fd, &st, parent, backing);
        Ok(Attr { ino: inode.ino, ..attr })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        if name == "." || name == ".." {
            // Only sent for NFS export, which is off; never step above the backing root.
            return Err(Error::new(libc::ENOENT, "no lookup of . or .."));
        }
        let b = match self.vol.names() {
            None if is_reserved(name, parent == ROOT_INO) => return Err(Error::new(libc::ENOENT, "reserved name")),
            names => backing::resolve(names, name)?,
        };
        let p = self.inode(parent)?;
        self.lookup_fd(&p, &b.main)
    }

    /// Owner of a new object: the caller, with the group inherited from a set-gid parent.
    pub(super) fn owner_for(&self, parent: RawFd, caller: Caller) -> Result<(u32, u32)> {
        let caller = self.creator(caller);
        let pst = sys::fstat(parent)?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 { pst.st_gid } else { caller.gid };
        Ok((caller.uid, gid))
    }

    /// Look up what `make` just created as the caller (see `sys::FsIds`). Nothing is
    /// chowned or chmodded by name: an object swapped into the name in between keeps its
    /// owner and mode, and is refused unless it is of the kind made and the caller's.
    pub(super) fn finish_new(
        &self,
        parent: &Arc<Inode>,
        dir: RawFd,
        name: &OsStr,
        caller: Caller,
        kind: u32,
    ) -> Result<Attr> {
        let fd = sys::open_path(dir, &sys::cstr(name)?)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != kind || st.st_uid != self.creator(caller).uid {
            return Err(Error::new(libc::EAGAIN, format!("{name:?} was replaced while it was being created")));
        }
        let attr = self.attr_at(0, &st, fd.as_raw_fd());
        let inode = self.intern(fd, &st, parent, name);
        Ok(Attr { ino: inode.ino, ..attr })
    }

    /// Make an object with this thread's filesystem ids set to the caller's: it is theirs
    /// from the moment it exists (group and set-gid directories by the kernel's rule for a
    /// set-gid parent, set-id bits as asked).
    pub(super) fn make_as(&self, caller: Caller, make: impl FnOnce() -> Result<()>) -> Result<()> {
        let caller = self.creator(caller);
        let _ids = sys::FsIds::switch(caller.uid, caller.gid)?;
        make()
    }

    /// Whom a new object belongs to: the caller, or for a daemon that is not root, its
    /// own user (it cannot give objects away).
    pub(super) fn creator(&self, caller: Caller) -> Caller {
        match self.own_ids {
            None => caller,
            Some((uid, gid)) => Caller { uid, gid, ..caller },
        }
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, umask: u32, caller: Caller) -> Result<Attr> {
        let b = self.backing_name(parent, name)?;
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let mode = mode & !umask & 0o7777;
        self.make_named(dir.as_raw_fd(), &b, |c| self.make_as(caller, || sys::mkdirat(dir.as_raw_fd(), c, mode)))?;
        self.finish_new(&p, dir.as_raw_fd(), &b.main, caller, libc::S_IFDIR)
    }

    /// ENOSPC where the backing filesystem has no room for a new file's header and one
    /// stored block. With the writeback cache a write(2) only fills pages and its ENOSPC
    /// comes at fsync or close, which a shell's `>` never checks: failing the create is the
    /// one error such a writer sees. (root's reserved blocks count: the daemon may use them.)
    pub(super) fn room_for_a_file(&self, dir: RawFd) -> Result<()> {
        let geo = &self.vol.geometry;
        let s = sys::fstatvfs(dir)?;
        let unit = s.f_frsize.max(1);
        let need = geo.header_size.div_ceil(unit) + (geo.backing_size(1) - geo.header_size).div_ceil(unit);
        if s.f_bfree < need {
            return Err(Error::new(
                libc::ENOSPC,
                format!(
                    "no room for a new file: the backing filesystem has {} bytes free, its header and first block \
                     take {}",
                    s.f_bfree * unit,
                    need * unit
                ),
            ));
        }
        Ok(())
    }

    /// Regular files, fifos, sockets and device nodes. A regular file starts empty, with
    /// no header: its first write creates one.
    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, umask: u32, rdev: u32, caller: Caller) -> Result<Attr> {
        let b = self.backing_name(parent, name)?;
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        if mode & libc::S_IFMT == libc::S_IFREG {
            self.room_for_a_file(dir.as_raw_fd())?;
        }
        let perm = mode & !umask & 0o7777;
        self.make_named(dir.as_raw_fd(), &b, |c| {
            self.make_as(caller, || sys::mknodat(dir.as_raw_fd(), c, (mode & libc::S_IFMT) | perm, rdev as u64))
        })?;
        self.finish_new(&p, dir.as_raw_fd(), &b.main, caller, mode & libc::S_IFMT)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, caller: Caller) -> Result<Attr> {
        let b = self.backing_name(parent, name)?;
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let t = match self.vol.names() {
            Some(c) => {
                let mut enc = c.encrypt_target(target.as_bytes());
                if enc.len() > crate::names::BACKING_TARGET_MAX {
                    enc = crate::names::spill_target(self.root_fd.as_raw_fd(), target.len(), &enc)?;
                }
                std::ffi::CString::new(enc).expect("base64 has no NUL")
            }
            None => sys::cstr(target)?,
        };
        self.make_named(dir.as_raw_fd(), &b, |c| self.make_as(caller, || sys::symlinkat(&t, dir.as_raw_fd(), c)))?;
        self.finish_new(&p, dir.as_raw_fd(), &b.main, caller, libc::S_IFLNK)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        let stored = sys::readlinkat(self.fd(&inode)?.as_raw_fd())?;
        match self.vol.names() {
            Some(c) => crate::names::stored_target(self.root_fd.as_raw_fd(), stored)
                .and_then(|enc| c.decrypt_target(&enc))
                .map_err(|e| e.context(self.describe_inode(&inode))),
            None => Ok(stored),
        }
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let b = self.backing_name(newparent, newname)?;
        let inode = self.inode(ino)?;
        let np = self.inode(newparent)?;
        let fd = self.fd(&inode)?;
        let newdir = self.fd(&np)?;
        self.make_named(newdir.as_raw_fd(), &b, |c| sys::linkat_fd(fd.as_raw_fd(), newdir.as_raw_fd(), c))?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let inode = self.table.add_lookup(&inode);
        inode.add_name(&np, &b.main);
        Ok(self.attr_at(inode.ino, &st, fd.as_raw_fd()))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, 0)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, libc::AT_REMOVEDIR)
    }

    pub(super) fn remove(&self, parent: u64, name: &OsStr, flags: i32) -> Result<()> {
        let b = self.backing_name(parent, name)?;
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let c = sys::cstr(&b.main)?;
        let _g = self.long_name_guard(&[&b])?;
        let gone = self.known_at(dir.as_raw_fd(), &c);
        sys::unlinkat(dir.as_raw_fd(), &c, flags)?;
        backing::drop_side_after(dir.as_raw_fd(), &b);
        if let Some((node, fd)) = gone {
            node.drop_name(&p, &b.main, &fd);
        }
        Ok(())
    }

    /// The known inode at `name` in `dir`, with its descriptor, before the mount changes
    /// that name: its names follow the change, and if it loses its last name the
    /// descriptor is kept for as long as the kernel knows the inode.
    pub(super) fn known_at(&self, dir: RawFd, name: &std::ffi::CStr) -> Option<(Arc<Inode>, Arc<OwnedFd>)> {
        let st = sys::fstatat_nofollow(dir, name).ok()?;
        let node = self.table.find((st.st_dev, st.st_ino))?;
        let fd = self.fd(&node).ok()?;
        Some((node, fd))
    }

    /// `flags`: RENAME_NOREPLACE and RENAME_EXCHANGE pass through; RENAME_WHITEOUT is refused.
    /// A long name's side file is written before the rename and the old one removed after
    /// it (see `names::backing`); an exchange keeps both names, so both side files stay.
    pub fn rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32) -> Result<()> {
        let from = self.backing_name(parent, name)?;
        let to = self.backing_name(newparent, newname)?;
        let (name, newname) = (from.main.as_os_str(), to.main.as_os_str());
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(Error::new(libc::EINVAL, "unsupported rename flags"));
        }
        let p = self.inode(parent)?;
        let np = self.inode(newparent)?;
        let (dir, newdir) = (self.fd(&p)?, self.fd(&np)?);
        let (c, newc) = (sys::cstr(name)?, sys::cstr(newname)?);
        let _g = self.long_name_guard(&[&from, &to])?;
        let moved = self.known_at(dir.as_raw_fd(), &c);
        let other = self.known_at(newdir.as_raw_fd(), &newc);
        backing::put_side(newdir.as_raw_fd(), &to)?;
        if let Err(e) = sys::renameat2(dir.as_raw_fd(), &c, newdir.as_raw_fd(), &newc, flags) {
            let _ = backing::drop_side(newdir.as_raw_fd(), &to);
            return Err(e);
        }
        backing::drop_side_after(dir.as_raw_fd(), &from);
        // Found again by name, a moved inode follows its new name. Renaming a directory
        // changes no name beneath it: children name their parent's inode, not a path.
        if let Some((n, _)) = moved {
            n.drop_name_only(&p, name);
            n.add_name(&np, newname);
        }
        if let Some((n, fd)) = other {
            if flags & libc::RENAME_EXCHANGE != 0 {
                n.drop_name_only(&np, newname);
                n.add_name(&p, name);
            } else {
                n.drop_name(&np, newname, &fd);
            }
        }
        Ok(())
    }
}
