//! `envelopefs upgrade`: a volume to the newest format its names allow. Format 1 becomes
//! 2 (the config only); a volume with hidden names (4, 5) becomes 6, whose regular files'
//! xattr values are bound to their file id (docs/FORMAT.md §12). Plaintext names (2, 3)
//! stay: their xattrs are not encrypted, so there is nothing to bind.
//!
//! To 6, in this order: the config says format 6 and `upgrading` (under its MAC; the
//! keyring and the host's record name format 6), then every regular file with a `user.*`
//! value gets a header if it had none and each value is sealed anew, then `upgrading` is
//! dropped. An interruption leaves `upgrading` set: mounts are refused and `upgrade` run
//! again finishes (a value already bound is left as it is).

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::file::envelope_file::EnvelopeFile;
use crate::file::xattrs::reseal;
use crate::names::XattrBinding;
use crate::volume::tree::{open_regular, Tree};
use crate::volume::Volume;

/// What an upgrade did.
#[derive(Debug, Default)]
pub struct Upgraded {
    pub from: u32,
    pub to: u32,
    /// Files whose values were sealed anew, and how many values.
    pub files: u64,
    pub values: u64,
    /// Empty files given a header to bind their values to.
    pub headers: u64,
    /// Values that authenticate under neither binding (changed outside, or planted): left
    /// as they are; they read as EIO, as they did before.
    pub foreign: Vec<(PathBuf, String)>,
    /// Files that could not be done: the upgrade stays unfinished.
    pub failed: Vec<(PathBuf, Error)>,
}

impl Upgraded {
    /// Whether the volume is at its newest format with nothing left to do.
    pub fn finished(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Upgrade `vol` (opened by a caller that holds the volume lock).
pub fn upgrade(vol: &mut Volume) -> Result<Upgraded> {
    let mut done = Upgraded { from: vol.config.format, ..Upgraded::default() };
    vol.upgrade()?;
    if vol.config.features().names && !vol.config.features().bound_xattrs {
        vol.set_upgrading(true)?;
    }
    if vol.config.upgrading {
        let tree = Tree::open(vol)?;
        for path in tree.files()? {
            if let Err(e) = reseal_file(vol, &tree, &path, &mut done) {
                done.failed.push((path, e));
            }
        }
        if done.failed.is_empty() {
            vol.set_upgrading(false)?;
        }
    }
    done.to = vol.config.format;
    Ok(done)
}

/// Bind one file's values to its file id.
fn reseal_file(vol: &Volume, tree: &Tree, path: &Path, done: &mut Upgraded) -> Result<()> {
    let (dir, name) = tree.resolve(path)?;
    let Some((f, _)) = open_regular(dir.as_raw_fd(), &name, libc::O_RDWR)? else { return Ok(()) };
    let listed = crate::sys::listxattr(f.as_raw_fd())?;
    if !listed.split(|&b| b == 0).any(|n| n.starts_with(b"user.")) {
        return Ok(());
    }
    let describe = || path.display().to_string();
    let env = EnvelopeFile { vol, file: &f, describe: &describe, who: None };
    let len = env.backing_len()?;
    if len > 0 && len < vol.geometry.header_size && is_zero_prefix(&f, len)? {
        // A header this upgrade was writing to an empty file when it was cut: the file
        // was empty, so it becomes empty again and gets its header anew.
        f.set_len(0).map_err(|e| Error::io(e, "cutting a torn header"))?;
    }
    let made = env.backing_len()? == 0;
    let binding = env.xattr_binding(true, None)?.expect("made on demand");
    if made {
        // Durable before any value is bound to it.
        f.sync_all().map_err(|e| Error::io(e, "fsync of a new header"))?;
        done.headers += 1;
    }
    let names = vol.names().expect("format 6 has hidden names");
    let r = reseal(names, f.as_raw_fd(), f.as_raw_fd(), XattrBinding::Name, binding)?;
    f.sync_all().map_err(|e| Error::io(e, "fsync"))?;
    if r.sealed > 0 {
        done.files += 1;
        done.values += r.sealed;
    }
    done.foreign.extend(r.foreign.into_iter().map(|n| (path.to_owned(), n)));
    Ok(())
}

/// Whether a file shorter than a header region holds only what a torn header write
/// leaves: a prefix of a header slot (its magic) or zeros.
fn is_zero_prefix(f: &std::fs::File, len: u64) -> Result<bool> {
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, 0).map_err(|e| Error::io(e, "reading"))?;
    let magic = &crate::format::SLOT_MAGIC[..];
    Ok(b.iter().all(|&x| x == 0) || b.starts_with(&magic[..magic.len().min(b.len())]))
}
