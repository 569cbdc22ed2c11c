//! Extended attributes: `user.*` names and values encrypted on a hidden-names volume,
//! others passed through. From format 6 a regular file's values are bound to its file id.

use super::*;
use crate::names::XattrBinding;

impl EncryptedFs {
    /// Only `user.*` extended attributes pass through: as they are with plaintext names,
    /// else with names and values encrypted (see `names`).
    pub(super) fn xattr_name(&self, name: &OsStr) -> Result<std::ffi::CString> {
        if !name.as_bytes().starts_with(b"user.") {
            return Err(Error::new(libc::EOPNOTSUPP, "only user.* extended attributes are supported"));
        }
        match self.vol.names() {
            Some(c) => Ok(std::ffi::CString::new(c.encrypt_xattr_name(name.as_bytes())?).expect("base64 has no NUL")),
            None => sys::cstr(name),
        }
    }

    /// The stored name of an xattr to read or remove: one too long to encrypt was never
    /// stored (ENODATA, as for any absent name).
    pub(super) fn stored_xattr_name(&self, name: &OsStr) -> Result<std::ffi::CString> {
        self.xattr_name(name).map_err(|e| {
            if e.errno() == libc::ERANGE {
                Error::new(libc::ENODATA, "no such attribute")
            } else {
                e
            }
        })
    }

    /// What `inode`'s values are bound to (see `EnvelopeFile::xattr_binding`): a regular
    /// file of format 6 by its file id, read from its header (the key the inode holds while
    /// open, or through the DEK cache); with `make`, an empty one gets its header first,
    /// recorded in the journal like a first write. `None`: an empty file of format 6.
    fn xattr_binding(&self, inode: &Arc<Inode>, make: bool, caller: Caller) -> Result<Option<XattrBinding>> {
        if inode.fmt != libc::S_IFREG || !self.vol.config.features().bound_xattrs {
            return Ok(Some(XattrBinding::Name));
        }
        if let Some(k) = &inode.content.read().unwrap().key {
            return Ok(Some(XattrBinding::File(k.file_id)));
        }
        let fd = self.fd(inode)?;
        let file = sys::reopen(&fd, if make { libc::O_RDWR } else { libc::O_RDONLY })?;
        if !make {
            let describe = || sys::describe_fd(file.as_raw_fd());
            let env = EnvelopeFile { vol: &self.vol, file: &file, describe: &describe, who: Some(caller.requester()) };
            return env.xattr_binding(false, None);
        }
        // A header made here is a change to the content: under its lock, journaled.
        let mut st = inode.content.write().unwrap();
        let key = self.journaled(inode, |journal| self.key_for_write(&mut st, &file, true, caller, journal))?;
        Ok(key.map(|k| XattrBinding::File(k.file_id)))
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32, caller: Caller) -> Result<()> {
        let inode = self.inode(ino)?;
        if inode.is_symlink() {
            return Err(Error::new(libc::EPERM, "no user xattrs on symlinks"));
        }
        let stored = self.xattr_name(name)?;
        let sealed;
        let value = match self.vol.names() {
            Some(c) => {
                if value.len() + crate::names::XATTR_VALUE_OVERHEAD > 65536 {
                    return Err(Error::new(libc::E2BIG, "an xattr value this long does not fit once encrypted"));
                }
                let binding = self
                    .xattr_binding(&inode, true, caller)
                    .map_err(|e| e.context(format!("xattr {name:?} of {}", self.describe_inode(&inode))))?
                    .expect("made on demand");
                sealed = c.seal_xattr_value(binding, stored.as_bytes(), value)?;
                &sealed[..]
            }
            None => value,
        };
        sys::setxattr(self.fd(&inode)?.as_raw_fd(), &stored, value, flags)
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32, caller: Caller) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if !name.as_bytes().starts_with(b"user.") || inode.is_symlink() {
            return Err(Error::new(libc::ENODATA, "no such attribute"));
        }
        let fd = self.fd(&inode)?;
        let Some(c) = self.vol.names() else {
            return sys::getxattr(fd.as_raw_fd(), &sys::cstr(name)?, size as usize);
        };
        let stored = self.stored_xattr_name(name)?;
        let len = sys::getxattr(fd.as_raw_fd(), &stored, 0)?.len();
        let sealed = sys::getxattr(fd.as_raw_fd(), &stored, len.max(1))?;
        let value = self
            .xattr_binding(&inode, false, caller)
            .and_then(|b| {
                // Format 6 gives a file its header before its first value: a value on an
                // empty file was put there from outside.
                let b = b.ok_or_else(|| {
                    Error::integrity(
                        crate::error::Integrity::Name,
                        "an xattr value on an empty file with no header does not authenticate (put there from outside)",
                    )
                })?;
                c.open_xattr_value(b, stored.as_bytes(), &sealed)
            })
            .map_err(|e| e.context(format!("xattr {name:?} of {}", self.describe_inode(&inode))))?;
        match size as usize {
            0 => Ok(vec![0u8; value.len()]),
            n if n < value.len() => Err(Error::new(libc::ERANGE, "xattr value larger than the buffer")),
            _ => Ok(value),
        }
    }

    /// The NUL-separated list of `user.*` names.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if inode.is_symlink() {
            return Ok(Vec::new());
        }
        let all = sys::listxattr(self.fd(&inode)?.as_raw_fd())?;
        let mut out = Vec::new();
        for n in all.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
            match self.vol.names() {
                None => out.extend_from_slice(n),
                Some(c) => match c.decrypt_xattr_name(n) {
                    Some(plain) => out.extend_from_slice(&plain),
                    None => {
                        tracing::warn!(
                            "{}: xattr {:?} is not one this volume encrypted: left out",
                            self.describe_inode(&inode),
                            OsStr::from_bytes(n)
                        );
                        continue;
                    }
                },
            }
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        let inode = self.inode(ino)?;
        if inode.is_symlink() {
            return Err(Error::new(libc::EPERM, "no user xattrs on symlinks"));
        }
        sys::removexattr(self.fd(&inode)?.as_raw_fd(), &self.stored_xattr_name(name)?)
    }
}
