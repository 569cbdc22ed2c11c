//! Names in the backing directory as the frontend uses them: a plaintext name's entry (its
//! encryption, in format 4), and for a long name the side file that holds it whole.
//!
//! A side file is named after a hash of what it holds, so it is checked by its name and
//! can be left behind only as an orphan: it is written (and synced) before its entry is
//! made, and removed after its entry is gone. A crash in between leaves a side file
//! without an entry, which no lookup reaches and the next listing of the directory
//! removes.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;

use crate::error::{Error, Result};
use crate::names::{BackingName, EntryKind, NameCipher};
use crate::sys;
use crate::sys::range_lock::{self, Held, Kind};

/// The range of the volume's lock file (`envelopefs.lock`) whose lock a shared volume's
/// hosts hold while they change a long name (docs/FORMAT.md §11); byte 0 is the volume's.
pub const LONG_NAMES_LOCK: (u64, u64) = (1, 1);

/// Held by whoever changes a long name or removes orphaned side files, so that a side
/// file written for an entry about to be made is never taken for an orphan. On a shared
/// volume it reaches every host: a lock of the volume's lock file.
pub struct LongNames {
    local: std::sync::Mutex<()>,
    fleet: Option<std::fs::File>,
}

/// A held [`LongNames`].
pub struct LongNamesHeld<'a> {
    _fleet: Option<Held<'a, std::fs::File>>,
    _local: std::sync::MutexGuard<'a, ()>,
}

impl LongNames {
    /// `fleet`: the volume's lock file, on a shared volume.
    pub fn new(fleet: Option<std::fs::File>) -> Self {
        Self { local: std::sync::Mutex::new(()), fleet }
    }

    pub fn hold(&self) -> Result<LongNamesHeld<'_>> {
        let local = self.local.lock().unwrap();
        let fleet = match &self.fleet {
            Some(f) => Some(range_lock::hold(f, Kind::Write, LONG_NAMES_LOCK.0, LONG_NAMES_LOCK.1)?),
            None => None,
        };
        Ok(LongNamesHeld { _fleet: fleet, _local: local })
    }
}

/// A plaintext name resolved to the backing directory.
pub fn resolve(cipher: Option<&NameCipher>, name: &OsStr) -> Result<BackingName> {
    match cipher {
        Some(c) => c.encrypt_name(name),
        None => Ok(BackingName { main: name.to_owned(), side: None }),
    }
}

/// Write a long name's side file, before its entry is made.
pub fn put_side(dir: RawFd, b: &BackingName) -> Result<()> {
    let Some((side, content)) = &b.side else { return Ok(()) };
    // The same name always has the same side file: one already there (the name exists,
    // or an orphan) is kept as it is, never truncated under a live entry.
    if crate::names::read_side(dir, &b.main).is_ok_and(|have| have == *content) {
        return Ok(());
    }
    // Made anew and renamed into place: whatever was planted at the name (a hard link to
    // a file outside the volume, a FIFO) is replaced, never opened or truncated.
    sys::write_new_at(dir, &sys::cstr(side)?, content, 0o644)
        .map_err(|e| e.context(format!("writing long-name file {side:?}")))
}

/// `drop_side` once the change to the entry is made: a side file left behind is an orphan
/// (a listing or fsck removes it), so failing to remove it is logged, not returned.
pub fn drop_side_after(dir: RawFd, b: &BackingName) {
    if let Err(e) = drop_side(dir, b) {
        tracing::warn!("{}: left for a listing to remove: {e}", sys::describe_fd(dir));
    }
}

/// Remove a long name's side file if its entry is not there (gone, never made, or a
/// rename that did nothing); returns whether it removed one.
pub fn drop_side(dir: RawFd, b: &BackingName) -> Result<bool> {
    let Some((side, _)) = &b.side else { return Ok(false) };
    if sys::fstatat_nofollow(dir, &sys::cstr(&b.main)?).is_ok() {
        return Ok(false);
    }
    match sys::unlinkat(dir, &sys::cstr(side)?, 0) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == libc::ENOENT => Ok(false),
        Err(e) => Err(e),
    }
}

/// One entry of a backing directory, named as the plaintext view shows it, with what the
/// caller listed with it.
pub struct Listed<T> {
    pub name: OsString,
    pub backing: OsString,
    pub with: T,
}

/// The plaintext names of a format-4 directory's entries; entries that are not this
/// volume's (or do not decrypt) are logged and left out, orphaned side files removed
/// (under `long_names`).
pub fn list<T>(
    cipher: &NameCipher,
    dir: RawFd,
    entries: Vec<(OsString, T)>,
    long_names: &LongNames,
    describe: &dyn Fn() -> String,
) -> Vec<Listed<T>> {
    let mut out = Vec::with_capacity(entries.len());
    let mut sides = Vec::new();
    // The stand-ins whose names decrypted: the side files that are not orphans.
    let mut stand_ins = std::collections::HashSet::new();
    for (e, with) in entries {
        let kind = crate::names::classify(&e);
        let name = match kind {
            EntryKind::Short => cipher.decrypt_name(e.as_encoded_bytes()),
            EntryKind::Long => crate::names::read_side(dir, &e).and_then(|full| cipher.decrypt_side(&e, &full)),
            EntryKind::Side => {
                sides.push(e);
                continue;
            }
            EntryKind::Foreign => Err(Error::corrupt("not a name this volume makes")),
        };
        match name {
            Ok(name) => {
                if kind == EntryKind::Long {
                    stand_ins.insert(e.clone());
                }
                out.push(Listed { name, backing: e, with });
            }
            Err(err) => tracing::warn!("{}/{}: left out of the listing: {err}", describe(), e.to_string_lossy()),
        }
    }
    let held = if sides.is_empty() { None } else { long_names.hold().inspect_err(|e| tracing::warn!("{e}")).ok() };
    for side in sides.into_iter().filter(|_| held.is_some()) {
        let Some(main) = crate::names::stand_in_of(&side) else { continue };
        if !stand_ins.contains(main) {
            let b = BackingName { main: main.to_owned(), side: Some((side.clone(), Vec::new())) };
            match drop_side(dir, &b) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!("{}/{}: removed an orphaned long-name file", describe(), side.to_string_lossy())
                }
                Err(e) => tracing::warn!("{}/{}: orphaned long-name file: {e}", describe(), side.to_string_lossy()),
            }
        }
    }
    out
}
