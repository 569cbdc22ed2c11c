//! One envelope file: its header and key (`envelope_file`), its content as sealed blocks
//! (`content`), the crash journal every change is recorded in first (`journal`), what
//! a crash left (`recovery`), and what its xattr values are bound to (`xattrs`).

pub mod content;
pub mod envelope_file;
pub mod journal;
pub mod recovery;
pub mod xattrs;

use std::fs::File;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// One thing a check of the volume found (fsck, crash recovery, the name check), and
/// whether it was put right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    pub what: String,
    pub repaired: bool,
}

/// A backing file's length; with `shared` (other hosts change it), as its filesystem has
/// it now rather than as the kernel cached it.
pub fn backing_len(file: &File, shared: bool) -> Result<u64> {
    if shared {
        return crate::sys::range_lock::fresh_len(file);
    }
    Ok(file.metadata().map_err(|e| Error::io(e, "fstat"))?.len())
}
