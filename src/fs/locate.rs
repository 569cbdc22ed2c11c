//! Finding a known inode's backing object: its cached descriptor, or its `Locator` (a
//! file handle, or a parent and name checked to hold the same object); interning new
//! inodes and forgetting them.

use super::*;

impl EncryptedFs {
    /// The O_PATH descriptor of `inode`: cached, or found again and cached.
    pub(super) fn fd(&self, inode: &Inode) -> Result<Arc<OwnedFd>> {
        if matches!(inode.locator, Locator::Root) {
            return Ok(self.root_fd.clone());
        }
        if let Some(fd) = self.fds.get(inode.id) {
            return Ok(fd);
        }
        if let Some(fd) = inode.pinned.lock().unwrap().clone() {
            return Ok(fd);
        }
        let fd = Arc::new(self.find_again(inode)?);
        self.fds.put(inode.id, fd.clone());
        Ok(fd)
    }

    /// Open `inode`'s object anew. A name is taken only if what it holds now has the
    /// object's device, inode number and type, so a rename behind the mount's back never
    /// redirects an inode to another file; it gives ESTALE instead.
    pub(super) fn find_again(&self, inode: &Inode) -> Result<OwnedFd> {
        let stale = || {
            Error::new(
                libc::ESTALE,
                format!("inode {} is not at any name the mount knows (changed behind its back)", inode.ino),
            )
        };
        match &inode.locator {
            Locator::Root => sys::path_handle(self.root_fd.as_raw_fd()),
            Locator::Handle(h) => sys::open_by_handle(self.root_dir.as_raw_fd(), h, libc::O_PATH).map_err(|e| {
                if e.errno() == libc::EMFILE {
                    e
                } else {
                    stale().context(e)
                }
            }),
            Locator::Names(names) => {
                let names = names.lock().unwrap().clone();
                for (parent, name) in names {
                    let Ok(dir) = self.fd(&parent) else { continue };
                    let fd = match sys::open_path(dir.as_raw_fd(), &sys::cstr(&name)?) {
                        Ok(fd) => fd,
                        Err(e) if e.errno() == libc::EMFILE => return Err(e),
                        Err(_) => continue,
                    };
                    let st = sys::fstat(fd.as_raw_fd())?;
                    if (st.st_dev, st.st_ino) == inode.key && st.st_mode & libc::S_IFMT == inode.fmt {
                        return Ok(fd);
                    }
                }
                // No name leads to it any more, but a file open through the mount still does.
                let open = self.handles.read().unwrap().values().find_map(|h| match h {
                    Handle::File(f) if f.inode.id == inode.id => Some(f.clone()),
                    _ => None,
                });
                match open {
                    Some(f) => sys::path_handle(f.file.as_raw_fd()),
                    None => Err(stale()),
                }
            }
        }
    }

    /// A path for messages: where `inode`'s object is now, or its number.
    pub(super) fn describe_inode(&self, inode: &Inode) -> String {
        self.fd(inode).map_or_else(|_| format!("inode {}", inode.ino), |fd| sys::describe_fd(fd.as_raw_fd()))
    }

    pub(super) fn inode(&self, ino: u64) -> Result<Arc<Inode>> {
        self.table.get(ino).ok_or_else(|| Error::new(libc::ESTALE, format!("unknown inode {ino}")))
    }

    /// The inode of the object `fd` (with stat `st`) opened as `name` in `parent`.
    ///
    /// Inode numbers are the backing inode numbers where that is unambiguous, so `stat`
    /// and `readdir` agree; others (another device, 1, or a backing number reused while the
    /// kernel still knows the object that had it) get numbers from the top half.
    pub(super) fn intern(&self, fd: OwnedFd, st: &libc::stat, parent: &Arc<Inode>, name: &OsStr) -> Arc<Inode> {
        let fmt = st.st_mode & libc::S_IFMT;
        let handle =
            (self.by_handle && st.st_dev == self.root_dev).then(|| sys::name_to_handle(fd.as_raw_fd()).ok()).flatten();
        // A known node is this object if its handle matches, or if its descriptor is still
        // open (which keeps the backing number from being reused), or if it was known by
        // this very name (which just led to an object of that number), or if one of its
        // other names still does.
        let same = |n: &Inode| {
            n.fmt == fmt
                && match (&n.locator, &handle) {
                    (Locator::Root, _) => true,
                    (Locator::Handle(a), Some(b)) => a == b,
                    (Locator::Names(_), None) => {
                        self.fds.contains(n.id) || n.has_name(parent, name) || self.find_again(n).is_ok()
                    }
                    _ => false,
                }
        };
        let preferred =
            (st.st_dev == self.root_dev && st.st_ino > ROOT_INO && st.st_ino < (1 << 63)).then_some(st.st_ino);
        let make = || InodeData {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            locator: match handle.clone() {
                Some(h) => Locator::Handle(h),
                None => Locator::Names(Mutex::new(Vec::new())),
            },
            pinned: Mutex::new(None),
            fmt,
            parent: Mutex::new(std::sync::Weak::new()),
            content: RwLock::new(ContentState { key: None, opens: 0, fresh: None }),
        };
        let fresh = || self.next_ino.fetch_add(1, Ordering::Relaxed);
        let node = self.table.intern((st.st_dev, st.st_ino), same, preferred, fresh, make);
        node.add_name(parent, name);
        if fmt == libc::S_IFREG {
            *node.parent.lock().unwrap() = Arc::downgrade(parent);
        }
        if !matches!(node.locator, Locator::Root) {
            self.fds.put(node.id, Arc::new(fd));
        }
        node
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if let Some(gone) = self.table.forget(ino, n) {
            self.fds.remove(gone.id);
            // A node may outlive this in its children's names, but not its descriptor.
            gone.pinned.lock().unwrap().take();
        }
    }
}
