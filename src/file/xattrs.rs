//! What a regular file's `user.*` xattr values are bound to (docs/FORMAT.md §12), and
//! sealing them anew for another binding: `rekey --reencrypt` (a new file id) and
//! `upgrade` to format 6 (from the name to the file).

use std::ffi::CString;
use std::os::unix::io::RawFd;

use crate::error::Result;
use crate::file::envelope_file::EnvelopeFile;
use crate::file::journal::Target;
use crate::names::{NameCipher, XattrBinding};

impl EnvelopeFile<'_> {
    /// The binding of this regular file's values: on a volume of format 6 its file id,
    /// from the header that authenticated and owns its content; before, its name only.
    /// With `make`, an empty file gets its header first (so a value set on it is bound);
    /// without, an empty file of format 6 has none: `None`, and no value of it is genuine.
    pub fn xattr_binding(&self, make: bool, journal: Option<&Target<'_>>) -> Result<Option<XattrBinding>> {
        if !self.vol.config.features().bound_xattrs {
            return Ok(Some(XattrBinding::Name));
        }
        Ok(self.key_for_write(None, make, journal)?.map(|k| XattrBinding::File(k.file_id)))
    }
}

/// What `reseal` did.
#[derive(Debug, Default)]
pub struct Resealed {
    /// Values sealed anew under the new binding.
    pub sealed: u64,
    /// Values that already opened under it.
    pub current: u64,
    /// Stored names of values that open under neither binding: copied as they are (they
    /// stay unreadable, as evidence) and named here.
    pub foreign: Vec<String>,
}

/// Every `user.*` value of the file `from` sealed for `to` under `new`: a value that opens
/// under `old` is sealed anew; one that opens under `new` already, or under neither, is
/// kept as it is. `from` and `to` may be one file (an upgrade in place): each value is
/// replaced by one setxattr, so an interruption leaves every value under one binding or
/// the other, and a rerun finishes.
pub fn reseal(names: &NameCipher, from: RawFd, to: RawFd, old: XattrBinding, new: XattrBinding) -> Result<Resealed> {
    let mut done = Resealed::default();
    let all = crate::sys::listxattr(from)?;
    for name in all.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let c = CString::new(name).expect("split at NUL");
        let len = crate::sys::getxattr(from, &c, 0)?.len();
        let stored = crate::sys::getxattr(from, &c, len.max(1))?;
        let value = if names.open_xattr_value(new, name, &stored).is_ok() {
            done.current += 1;
            stored
        } else if let Ok(plain) = names.open_xattr_value(old, name, &stored) {
            done.sealed += 1;
            names.seal_xattr_value(new, name, &plain)?
        } else {
            done.foreign.push(String::from_utf8_lossy(name).into_owned());
            stored
        };
        crate::sys::setxattr(to, &c, &value, 0)?;
    }
    Ok(done)
}
