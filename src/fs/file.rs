//! Open files: handles, the key a write needs (a header made lazily), reads, writes,
//! allocation, fsync and release.

use super::*;

impl EncryptedFs {
    /// The key for a change to `file` (see `EnvelopeFile::key_for_write`), kept in the
    /// inode while it is open.
    pub(super) fn key_for_write(
        &self,
        st: &mut ContentState,
        file: &File,
        needs_header: bool,
        who: Caller,
        journal: Option<&Target<'_>>,
    ) -> Result<Option<Arc<FileKey>>> {
        let describe = || sys::describe_fd(file.as_raw_fd());
        let env = EnvelopeFile { vol: &self.vol, file, describe: &describe, who: Some(who.requester()) };
        let key = env.key_for_write(st.key.as_ref(), needs_header, journal)?;
        if st.opens > 0 && st.key.is_none() {
            st.key.clone_from(&key);
        }
        Ok(key)
    }

    /// The key of a non-empty envelope (see `EnvelopeFile::load`).
    pub(super) fn load_key(&self, file: &File, len: u64, who: Caller) -> Result<Arc<FileKey>> {
        let describe = || sys::describe_fd(file.as_raw_fd());
        let env = EnvelopeFile { vol: &self.vol, file, describe: &describe, who: Some(who.requester()) };
        Ok(env.load(len)?.key)
    }

    pub(super) fn handle(&self, fh: u64) -> Result<Handle> {
        self.handles.read().unwrap().get(&fh).cloned().ok_or_else(|| Error::new(libc::EBADF, "unknown handle"))
    }

    pub(super) fn file_handle(&self, fh: u64) -> Result<Arc<FileHandle>> {
        match self.handle(fh)? {
            Handle::File(h) => Ok(h),
            Handle::Dir(_) => Err(Error::new(libc::EISDIR, "handle is a directory")),
        }
    }

    /// Some handle open on `inode`, if any.
    pub(super) fn open_handle_of(&self, inode: &Arc<Inode>) -> Option<Arc<FileHandle>> {
        self.handles.read().unwrap().values().find_map(|h| match h {
            Handle::File(f) if Arc::ptr_eq(&f.inode, inode) => Some(f.clone()),
            _ => None,
        })
    }

    pub(super) fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().unwrap().insert(fh, h);
        fh
    }

    pub(super) fn open_inode(&self, inode: Arc<Inode>, flags: i32, file: Option<File>, caller: Caller) -> Result<u64> {
        if inode.fmt != libc::S_IFREG {
            return Err(Error::new(
                if inode.fmt == libc::S_IFDIR { libc::EISDIR } else { libc::EINVAL },
                "not a regular file",
            ));
        }
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        // A file just created is empty: no key to load.
        let created = file.is_some();
        // Partial-block writes read the block first, so writers always get read access.
        let file = match file {
            Some(f) => f,
            None => {
                let fd = self.fd(&inode)?;
                let mode = if writable { libc::O_RDWR } else { libc::O_RDONLY };
                // Close-to-open on a shared filesystem: past pages cached of an older open.
                let direct = self.vol.config.shared && sys::range_lock::bypass_page_cache(&*fd);
                sys::reopen(&fd, mode | if direct { libc::O_DIRECT } else { 0 })?
            }
        };
        let trunc = writable && flags & libc::O_TRUNC != 0;
        // The key store's round trip runs without the inode's lock: the DEK cache keeps
        // what it unwrapped, and the load under the lock (the file may have changed) finds
        // it there.
        let warm = match inode.content.read().unwrap().key {
            None if !created => match self.warm_key(&inode, &file, caller) {
                Ok(w) => w,
                // A key store's answer is final (asking again would wait out its timeout
                // twice). Anything else may be a read while a writer (a truncate, the first
                // write) was changing the file: the load under the lock gives the verdict.
                Err(e) if e.errno() == libc::EACCES || e.class() == Some(crate::error::Class::KeyStoreUnreachable) => {
                    return Err(e)
                }
                Err(_) => None,
            },
            _ => None,
        };
        {
            let mut st = inode.content.write().unwrap();
            if st.key.is_none() {
                let (len, now) = self.length_and_stamp(&file)?;
                match warm {
                    // Unchanged since: the key loaded is still the header's.
                    Some((key, was)) if !self.vol.config.shared && now == was => st.key = Some(key),
                    _ if len > 0 => {
                        st.key = Some(
                            self.load_key(&file, len, caller)
                                .map_err(|e| e.context(sys::describe_fd(file.as_raw_fd())))?,
                        );
                    }
                    _ => {}
                }
            }
            // Content written to an empty file needs a new data key.
            if writable && (trunc || st.key.is_none()) {
                self.vol.keys.can_make_keys(&|| sys::describe_fd(file.as_raw_fd()))?;
            }
            st.opens += 1;
        }
        let path = if trunc { Some(sys::path_handle(file.as_raw_fd())?) } else { None };
        let handle = FileHandle { inode: inode.clone(), file, writable, opener: caller };
        let fh = self.add_handle(Handle::File(Arc::new(handle)));
        if let Some(path) = path {
            if let Err(e) = self.truncate(&inode, &path, 0, Some(fh), caller) {
                self.release(fh);
                return Err(e);
            }
        }
        Ok(fh)
    }

    /// The key of `inode`'s file (open as `file`) and the file's stamp when it was read
    /// (None: empty). An open that had to wait for the key store tells the prefetcher,
    /// which may unwrap the directory's other files ahead.
    fn warm_key(&self, inode: &Inode, file: &File, caller: Caller) -> Result<Option<(Arc<FileKey>, Stamp)>> {
        let (len, was) = self.length_and_stamp(file)?;
        if len == 0 {
            return Ok(None);
        }
        let loads = crate::keys::cache::loads_on_this_thread();
        let key = self.load_key(file, len, caller).map_err(|e| e.context(sys::describe_fd(file.as_raw_fd())))?;
        if crate::keys::cache::loads_on_this_thread() != loads {
            if let Some(parent) = inode.parent.lock().unwrap().upgrade() {
                self.prefetch.missed(parent.id, || self.fd(&parent), matches!(parent.locator, Locator::Root));
            }
        }
        Ok(Some((key, was)))
    }

    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Result<u64> {
        let inode = self.inode(ino)?;
        self.open_inode(inode, flags, None, caller)
    }

    /// Create and open a regular file. It starts without a header (see `mknod`).
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64)> {
        let b = self.backing_name(parent, name)?;
        let name = b.main.as_os_str();
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let perm = mode & !umask & 0o7777;
        self.vol.keys.can_make_keys(&|| format!("{}/{}", sys::describe_fd(dir.as_raw_fd()), name.to_string_lossy()))?;
        self.room_for_a_file(dir.as_raw_fd())?;
        let mut made = None;
        let res = self.make_named(dir.as_raw_fd(), &b, |c| {
            made = Some(sys::openat(
                dir.as_raw_fd(),
                c,
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW,
                perm,
            )?);
            Ok(())
        });
        match res.map(|()| made.expect("made on success")) {
            Ok(fd) => {
                // Owner and mode go to the descriptor just created, never to whatever the
                // name holds by now.
                let (uid, gid) = self.owner_for(dir.as_raw_fd(), caller)?;
                sys::fchown_fd(fd.as_raw_fd(), uid, gid)?;
                let st = sys::fstat(fd.as_raw_fd())?;
                // chown clears set-id bits of executables even for root: put them back.
                if st.st_mode & 0o7777 != perm {
                    sys::fchmod(fd.as_raw_fd(), perm)?;
                }
                let st = sys::fstat(fd.as_raw_fd())?;
                let inode = self.intern(sys::path_handle(fd.as_raw_fd())?, &st, &p, name);
                let attr = self.attr_of(inode.ino, &st);
                // The reply carries a lookup only on success: give it back on failure.
                let fh = self
                    .open_inode(inode, flags & !libc::O_TRUNC, Some(File::from(fd)), caller)
                    .inspect_err(|_| self.forget(attr.ino, 1))?;
                Ok((attr, fh))
            }
            // The kernel asked to create because it believed the name absent; something
            // arrived since. Opening it here would skip the caller's permission check (the
            // kernel makes it, with supplementary groups the daemon never sees). ESTALE makes
            // the kernel look the name up again and open it as any existing file.
            Err(e) if e.errno() == libc::EEXIST && flags & libc::O_EXCL == 0 => {
                Err(Error::new(libc::ESTALE, "the name exists by now: the kernel looks it up again"))
            }
            Err(e) => Err(e),
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.file_handle(fh)?;
        if self.vol.config.shared && h.inode.content.read().unwrap().key.is_none() {
            // Opened empty; another host may have given it a header and content since.
            let mut st = h.inode.content.write().unwrap();
            let len = crate::file::backing_len(&h.file, self.vol.config.shared)?;
            if st.key.is_none() && len > 0 {
                st.key = Some(self.load_key(&h.file, len, h.opener).map_err(|e| e.context(h.describe()))?);
            }
        }
        let st = h.inode.content.read().unwrap();
        let c = Content {
            file: st.fresh.as_deref().unwrap_or(&h.file),
            geo: self.vol.geometry,
            key: st.key.as_deref(),
            journal: None,
            shared: self.vol.config.shared,
        };
        c.read(offset, size as usize).map_err(|e| e.context(h.describe()))
    }

    /// Write at `offset`. For O_APPEND the kernel has already resolved the offset against
    /// the file size (and pages of shared mappings come back at their own offsets through
    /// any handle), so the offset is always taken as given.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], caller: Caller) -> Result<u32> {
        let h = self.file_handle(fh)?;
        if !h.writable {
            return Err(Error::new(libc::EBADF, "handle is read-only"));
        }
        self.change_content(&h, caller, |c| c.write(offset, data))?;
        Ok(data.len() as u32)
    }

    /// Run `change` on the content behind handle `h` with the file's content lock held
    /// alone, its key (a header made if it had none) and the journal.
    pub(super) fn change_content(
        &self,
        h: &FileHandle,
        caller: Caller,
        change: impl FnOnce(&Content<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut st = h.inode.content.write().unwrap();
        self.journaled(&h.inode, |journal| {
            let key = self
                .key_for_write(&mut st, &h.file, true, h.writer(caller), journal)
                .map_err(|e| e.context(h.describe()))?;
            let c = Content {
                file: &h.file,
                geo: self.vol.geometry,
                key: key.as_deref(),
                journal,
                shared: self.vol.config.shared,
            };
            change(&c).map_err(|e| e.context(h.describe()))
        })
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32, caller: Caller) -> Result<()> {
        if mode != 0 {
            return Err(Error::new(libc::EOPNOTSUPP, "only fallocate mode 0 is supported"));
        }
        let h = self.file_handle(fh)?;
        self.change_content(&h, caller, |c| c.allocate(offset, len))
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.file_handle(fh)?;
        let r = if datasync { h.file.sync_data() } else { h.file.sync_all() };
        r.map_err(|e| Error::io(e, format!("fsync {}", h.describe())))
    }

    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.write().unwrap().remove(&fh) else {
            return;
        };
        if let Handle::File(h) = h {
            let mut st = h.inode.content.write().unwrap();
            st.opens = st.opens.saturating_sub(1);
            if st.opens == 0 {
                // The cache keeps it for its TTL; the inode does not outlive the opens.
                st.key = None;
                st.fresh = None;
            }
        }
    }
}

/// What changes whenever the backing file's header may have: its size and change time.
type Stamp = (i64, i64, i64);

impl EncryptedFs {
    /// The backing file's length and stamp from one fstat (a shared volume's length is read
    /// fresh from its filesystem, and its stamp is not used).
    fn length_and_stamp(&self, file: &File) -> Result<(u64, Stamp)> {
        let st = sys::fstat(file.as_raw_fd())?;
        let len = match self.vol.config.shared {
            true => crate::file::backing_len(file, true)?,
            false => st.st_size as u64,
        };
        Ok((len, (st.st_size, st.st_ctime, st.st_ctime_nsec)))
    }
}
