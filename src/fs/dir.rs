//! Directory handles: listings (names decrypted, entries that are not the volume's left
//! out) with stable offsets, and directory fsync.

use super::*;

impl EncryptedFs {
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let inode = self.inode(ino)?;
        let dir = sys::reopen(&*self.fd(&inode)?, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let describe = || sys::describe_fd(dir.as_raw_fd());
        let mut entries = vec![
            DirEntry { ino, kind: libc::S_IFDIR, name: ".".into(), backing: ".".into() },
            DirEntry { ino: ROOT_INO, kind: libc::S_IFDIR, name: "..".into(), backing: "..".into() },
        ];
        let mut raw = Vec::new();
        for e in sys::list_dir(dir.as_raw_fd(), &describe)? {
            if is_reserved(&e.name, ino == ROOT_INO) {
                continue;
            }
            if self.vol.names().is_some() && crate::names::classify(&e.name) == crate::names::EntryKind::Side {
                raw.push((e.name, (0, 0)));
                continue;
            }
            raw.push((e.name, (e.ino, e.kind)));
        }
        match self.vol.names() {
            None => entries.extend(raw.into_iter().map(|(name, (ino, kind))| DirEntry {
                ino,
                kind,
                backing: name.clone(),
                name,
            })),
            Some(c) => {
                let listed = backing::list(c, dir.as_raw_fd(), raw, &self.long_names, &describe);
                entries.extend(listed.into_iter().map(|l| DirEntry {
                    ino: l.with.0,
                    kind: l.with.1,
                    name: l.name,
                    backing: l.backing,
                }));
            }
        }
        Ok(self.add_handle(Handle::Dir(Arc::new(DirHandle { inode, entries }))))
    }

    /// Entries from position `offset` on; an entry's position is its index + 1.
    pub fn readdir(&self, fh: u64, offset: u64, mut add: impl FnMut(&DirEntry, u64) -> bool) -> Result<()> {
        let Handle::Dir(dir) = self.handle(fh)? else {
            return Err(Error::new(libc::ENOTDIR, "not a directory handle"));
        };
        for (i, e) in dir.entries.iter().enumerate().skip(offset as usize) {
            if add(e, i as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    /// Entries with their attributes (READDIRPLUS: saves a lookup per entry). Every entry
    /// handed out counts as a lookup, except `.` and `..`, which the kernel ignores; an
    /// entry that no longer fits the reply is given back.
    pub fn readdirplus(&self, fh: u64, offset: u64, mut add: impl FnMut(&DirEntry, u64, &Attr) -> bool) -> Result<()> {
        let Handle::Dir(dir) = self.handle(fh)? else {
            return Err(Error::new(libc::ENOTDIR, "not a directory handle"));
        };
        let dir_attr = self.attr_of(dir.inode.ino, &sys::fstat(self.fd(&dir.inode)?.as_raw_fd())?);
        let mut added = 0;
        for (i, e) in dir.entries.iter().enumerate().skip(offset as usize) {
            if e.name == "." || e.name == ".." {
                if add(e, i as u64 + 1, &Attr { ino: e.ino, ..dir_attr }) {
                    break;
                }
                added += 1;
                continue;
            }
            let attr = match self.lookup_fd(&dir.inode, &e.backing) {
                Ok(a) => a,
                Err(err) if err.errno() == libc::ENOENT => continue, // removed since opendir
                // Hand back what is already in the reply; the next call starts at this entry
                // and reports the error (EMFILE, EIO…) instead of silently skipping it.
                Err(_) if added > 0 => break,
                Err(err) => return Err(err.context(format!("readdirplus of {}", self.describe_inode(&dir.inode)))),
            };
            if add(e, i as u64 + 1, &attr) {
                self.forget(attr.ino, 1);
                break;
            }
            added += 1;
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.write().unwrap().remove(&fh);
    }

    pub fn fsyncdir(&self, ino: u64) -> Result<()> {
        let inode = self.inode(ino)?;
        sys::reopen(&*self.fd(&inode)?, libc::O_RDONLY | libc::O_DIRECTORY)?
            .sync_all()
            .map_err(|e| Error::io(e, "fsync directory"))
    }
}
