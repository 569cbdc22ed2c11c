//! Extended attributes: `user.*` names and values encrypted on a hidden-names volume,
//! others passed through.

use super::*;

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

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
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
                sealed = c.seal_xattr_value(stored.as_bytes(), value)?;
                &sealed[..]
            }
            None => value,
        };
        sys::setxattr(self.fd(&inode)?.as_raw_fd(), &stored, value, flags)
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Vec<u8>> {
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
        let value = c
            .open_xattr_value(stored.as_bytes(), &sys::getxattr(fd.as_raw_fd(), &stored, len.max(1))?)
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
