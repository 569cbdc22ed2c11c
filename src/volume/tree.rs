//! The volume's tree for the offline tools (`fsck`, `rekey`, key usage), reached only
//! through directory descriptors: the backing directory is untrusted storage, and between
//! a listing and an action on a file anything in it may have been swapped for a symlink.

use std::ffi::{CStr, CString, OsStr};
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys;
use crate::volume::{REENCRYPT_SUFFIX, RESERVED};

/// The volume's tree, reached only through directory descriptors. The backing directory is
/// untrusted storage: between a listing and an action on a file, anything in it may have
/// been swapped for a symlink. So the root is opened once, every directory below it with
/// `O_NOFOLLOW | O_DIRECTORY` relative to its parent, every file with `O_NOFOLLOW` relative
/// to its directory and checked to be a regular file by `fstat` of the opened handle. Paths
/// are kept for messages only.
pub struct Tree {
    root: OwnedFd,
    /// The root as given (made absolute, symlinks not resolved): how paths are printed.
    path: PathBuf,
    /// Format 4: long names' side files are not files of the volume.
    hidden_names: bool,
}

/// A regular file (by its directory entry) met by `Tree::walk`.
pub struct Found<'a> {
    /// Its directory, opened without following symlinks.
    pub dir: RawFd,
    pub name: &'a CStr,
    /// For messages only.
    pub path: &'a Path,
}

const DIR_FLAGS: i32 = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;

impl Tree {
    /// Open the root of an opened volume. Its own path is the admin's to choose, so it is
    /// followed. Whether names are hidden comes from the volume's authenticated config.
    pub fn open(vol: &crate::volume::Volume) -> Result<Self> {
        let path = std::path::absolute(&vol.root).map_err(|e| Error::io(e, format!("{}", vol.root.display())))?;
        let c = sys::cstr(path.as_os_str())?;
        let root = sys::openat(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| e.context(format!("opening the volume root {}", path.display())))?;
        Ok(Self { root, path, hidden_names: vol.names().is_some() })
    }

    /// Call `f` for every regular file below the root, in path order, except the volume's
    /// own files in the root. Directories that are no longer directories when they are
    /// opened (swapped for a symlink since the listing) are skipped.
    pub fn walk(&self, f: &mut dyn FnMut(&Found<'_>)) -> Result<()> {
        self.walk_dir(self.root.as_raw_fd(), &self.path, true, f)
    }

    fn walk_dir(&self, dir: RawFd, path: &Path, is_root: bool, f: &mut dyn FnMut(&Found<'_>)) -> Result<()> {
        let mut entries = Vec::new();
        for e in sys::list_dir(dir, &|| path.display().to_string())? {
            let name = e.name;
            if is_root && RESERVED.iter().any(|r| OsStr::new(r) == name) {
                continue;
            }
            if self.hidden_names && crate::names::classify(&name) == crate::names::EntryKind::Side {
                continue;
            }
            if e.kind == libc::S_IFDIR || e.kind == libc::S_IFREG {
                entries.push((name, e.kind == libc::S_IFDIR));
            }
        }
        entries.sort();
        for (name, is_dir) in entries {
            let c = sys::cstr(&name)?;
            let p = path.join(&name);
            if is_dir {
                match sys::openat(dir, &c, DIR_FLAGS, 0) {
                    Ok(sub) => self.walk_dir(sub.as_raw_fd(), &p, false, f)?,
                    // Gone, or no longer a directory (a symlink now): not part of the tree.
                    Err(e) if [libc::ENOENT, libc::ELOOP, libc::ENOTDIR].contains(&e.errno()) => {}
                    Err(e) => return Err(e.context(format!("opening directory {}", p.display()))),
                }
            } else {
                f(&Found { dir, name: &c, path: &p });
            }
        }
        Ok(())
    }

    /// Every regular file of the volume (the volume's own files and stale temporaries
    /// aside), as paths for listing and messages; act on them through `resolve`.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        self.walk(&mut |e| {
            if !is_temporary(e.path) {
                out.push(e.path.to_owned());
            }
        })?;
        Ok(out)
    }

    /// The directory (opened one name at a time from the root, never following a symlink)
    /// and the name of `path`, which must lie inside the volume.
    pub fn resolve(&self, path: &Path) -> Result<(OwnedFd, CString)> {
        let abs = std::path::absolute(path).map_err(|e| Error::io(e, format!("{}", path.display())))?;
        let outside = || Error::new(libc::EINVAL, "not a file inside the volume");
        let rel = abs.strip_prefix(&self.path).map_err(|_| outside())?;
        let mut names = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => names.push(n),
                Component::CurDir => {}
                _ => return Err(outside()),
            }
        }
        let (name, dirs) = names.split_last().ok_or_else(outside)?;
        if dirs.is_empty() && RESERVED.iter().any(|r| OsStr::new(r) == *name) {
            return Err(Error::new(libc::EPERM, "one of the volume's own files"));
        }
        let mut dir = sys::openat(self.root.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        for d in dirs {
            dir = sys::openat(dir.as_raw_fd(), &sys::cstr(d)?, DIR_FLAGS, 0)
                .map_err(|e| e.context(format!("{d:?} is not a directory of the volume (a symlink?)")))?;
        }
        Ok((dir, sys::cstr(name)?))
    }
}

pub use crate::sys::open_regular;

/// Every regular file of the volume (the volume's own files and stale temporaries aside).
pub fn volume_files(vol: &crate::volume::Volume) -> Result<Vec<PathBuf>> {
    Tree::open(vol)?.files()
}

/// Remove temporaries a killed re-encryption left (their originals are intact).
pub fn remove_stale_temporaries(vol: &crate::volume::Volume) -> Result<u64> {
    let mut n = 0;
    let mut err = None;
    Tree::open(vol)?.walk(&mut |e| {
        if err.is_some() || !is_temporary(e.path) {
            return;
        }
        // unlinkat never follows a symlink; only a regular file is removed.
        let regular = sys::fstatat_nofollow(e.dir, e.name).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        if regular {
            match sys::unlinkat(e.dir, e.name, 0) {
                Ok(()) => n += 1,
                Err(x) => err = Some(x.context(format!("removing stale temporary {}", e.path.display()))),
            }
        }
    })?;
    err.map_or(Ok(n), Err)
}

/// A re-encryption's temporary (by name).
pub fn is_temporary(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.as_encoded_bytes().ends_with(REENCRYPT_SUFFIX.as_bytes()))
}
