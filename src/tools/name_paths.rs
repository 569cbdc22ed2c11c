//! Hidden names for the offline tools: plaintext paths to backing paths and back
//! (`envelopefs name`, messages), and fsck's check that every name decrypts.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::file::Finding;
use crate::names::{classify, EntryKind, NameCipher};
use crate::sys;
use crate::volume::{is_reserved, Volume};

fn cipher(vol: &Volume) -> Result<&NameCipher> {
    vol.names().ok_or_else(|| Error::new(libc::EINVAL, "this volume keeps plaintext names (format 2 or 3)"))
}

fn components(rel: &Path) -> Result<Vec<&OsStr>> {
    rel.components()
        .filter(|c| !matches!(c, Component::CurDir | Component::RootDir))
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(Error::new(libc::EINVAL, format!("{}: only plain names, no ..", rel.display()))),
        })
        .collect()
}

/// The backing path (relative to the volume root) of a plaintext path in the volume.
pub fn backing_path(vol: &Volume, plain: &Path) -> Result<PathBuf> {
    let c = cipher(vol)?;
    components(plain)?.into_iter().map(|n| c.encrypt_name(n).map(|b| PathBuf::from(b.main))).collect()
}

/// The plaintext path of a backing path (relative to the volume root, or inside it).
pub fn plain_path(vol: &Volume, backing: &Path) -> Result<PathBuf> {
    // The root as given may be relative or a symlink; the tools print absolute paths.
    let root = std::path::absolute(&vol.root).unwrap_or_else(|_| vol.root.clone());
    let rel = backing.strip_prefix(&root).or_else(|_| backing.strip_prefix(vol.place())).unwrap_or(backing);
    cipher(vol)?.plain_path(&root, rel)
}

/// A backing path with its plaintext path, for messages to the admin (never written to
/// the backing directory).
pub fn describe(vol: &Volume, backing: &Path) -> String {
    match vol.names().and_then(|_| plain_path(vol, backing).ok()) {
        Some(p) => format!("{} ({})", backing.display(), p.display()),
        None => backing.display().to_string(),
    }
}

/// fsck: every entry of the tree has a name that decrypts, every long name its side file,
/// every symlink a target that decrypts. `repair` removes orphaned side files and long
/// targets no symlink names any more.
pub fn check_names(vol: &Volume, repair: bool) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    let Some(c) = vol.names() else { return Ok(out) };
    let root = sys::openat(libc::AT_FDCWD, &sys::cstr(vol.root.as_os_str())?, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut named = std::collections::HashSet::new();
    let mut w = Walk { c, root_fd: root.as_raw_fd(), repair, problems: &mut out, named_targets: &mut named };
    walk(&mut w, root.as_raw_fd(), &vol.root, true)?;
    unnamed_targets(root.as_raw_fd(), &vol.root, repair, &named, &mut out)?;
    Ok(out)
}

/// Long targets in the store that no symlink names (their symlinks were removed).
fn unnamed_targets(
    root: RawFd,
    root_path: &Path,
    repair: bool,
    named: &std::collections::HashSet<OsString>,
    out: &mut Vec<Finding>,
) -> Result<()> {
    let store = match sys::openat(
        root,
        &sys::cstr(OsStr::new(crate::names::TARGETS_DIR))?,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    ) {
        Ok(d) => d,
        Err(e) if e.errno() == libc::ENOENT => return Ok(()),
        Err(e) => return Err(e.context("opening the long-target store")),
    };
    for e in sys::list_dir(store.as_raw_fd(), &|| "the long-target store".into())? {
        let name = e.name;
        if !named.contains(&name) {
            let repaired = repair && sys::unlinkat(store.as_raw_fd(), &sys::cstr(&name)?, 0).is_ok();
            out.push(Finding {
                path: root_path.join(crate::names::TARGETS_DIR).join(&name),
                what: "a long symlink target no symlink names any more (harmless)".into(),
                repaired,
            });
        }
    }
    Ok(())
}

struct Walk<'a> {
    c: &'a NameCipher,
    root_fd: RawFd,
    repair: bool,
    problems: &'a mut Vec<Finding>,
    /// Store files that symlinks name.
    named_targets: &'a mut std::collections::HashSet<OsString>,
}

fn walk(w: &mut Walk<'_>, dir: RawFd, path: &Path, is_root: bool) -> Result<()> {
    let mut entries: Vec<(OsString, u32)> =
        sys::list_dir(dir, &|| path.display().to_string())?.into_iter().map(|e| (e.name, e.kind)).collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let names: std::collections::HashSet<&OsStr> = entries.iter().map(|(n, _)| n.as_os_str()).collect();
    let mut problems = Vec::new();
    for (name, ft) in &entries {
        if is_reserved(name, is_root) {
            continue;
        }
        let p = path.join(name);
        let mut problem = |what: String, repaired: bool| problems.push(Finding { path: p.clone(), what, repaired });
        let decrypted = match classify(name) {
            EntryKind::Short => w.c.decrypt_name(name.as_bytes()).map(drop),
            EntryKind::Long => {
                crate::names::read_side(dir, name).and_then(|full| w.c.decrypt_side(name, &full).map(drop))
            }
            EntryKind::Side => {
                let main = crate::names::stand_in_of(name).expect("a side file's name");
                if !names.contains(main) {
                    let removed = w.repair && sys::unlinkat(dir, &sys::cstr(name)?, 0).is_ok();
                    problem("a long-name file whose entry is gone (left by a crash; harmless)".into(), removed);
                }
                continue;
            }
            EntryKind::Foreign => Err(Error::corrupt("not a name this volume encrypted")),
        };
        if let Err(e) = decrypted {
            problem(format!("name does not decrypt: {e}"), false);
            continue;
        }
        if *ft == libc::S_IFLNK {
            // Read from this directory's descriptor: a directory above swapped for a
            // symlink since the walk opened it cannot redirect the read.
            let stored = sys::open_path(dir, &sys::cstr(name)?)
                .and_then(|fd| sys::readlinkat(fd.as_raw_fd()))
                .map_err(|e| e.context(format!("readlink {}", p.display())))?;
            if let Some((_, store)) = crate::names::parse_marker(&stored) {
                w.named_targets.insert(store.to_owned());
            }
            if let Err(e) = crate::names::stored_target(w.root_fd, stored).and_then(|enc| w.c.decrypt_target(&enc)) {
                problem(format!("symlink target: {e}"), false);
            }
        } else if *ft == libc::S_IFDIR {
            match sys::openat(dir, &sys::cstr(name)?, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0) {
                Ok(sub) => walk(w, sub.as_raw_fd(), &p, false)?,
                Err(e) if [libc::ENOENT, libc::ELOOP, libc::ENOTDIR].contains(&e.errno()) => {}
                Err(e) => return Err(e.context(format!("opening directory {}", p.display()))),
            }
        }
    }
    w.problems.extend(problems);
    Ok(())
}
