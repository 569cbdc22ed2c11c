//! Moving files to the current KEK. `rewrap` re-wraps each header's DEK (data untouched,
//! safe while mounted); `reencrypt` gives each file a new DEK and rewrites its content
//! (offline). Both are crash-safe and resumable: a rerun finishes what is left.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::file::envelope_file::EnvelopeFile;
use crate::file::xattrs::reseal;
use crate::format::{is_hole, Geometry, BLOCK_OVERHEAD};
use crate::names::XattrBinding;
use crate::sys;
use crate::volume::Volume;

use crate::volume::tree::{open_regular, Tree};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Rewrap,
    Reencrypt,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub changed: u64,
    pub unchanged: u64,
    pub failed: Vec<(PathBuf, Error)>,
}

/// Run `mode` over `files` with `jobs` threads; `progress` is told after each file.
pub fn run(vol: &Volume, mode: Mode, files: Vec<PathBuf>, jobs: usize, progress: &(dyn Fn(&Path) + Sync)) -> Summary {
    let tree = match Tree::open(vol) {
        Ok(t) => t,
        Err(e) => return Summary { failed: vec![(vol.root.clone(), e)], ..Summary::default() },
    };
    let queue = Mutex::new(files.into_iter());
    let summary = Mutex::new(Summary::default());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let Some(path) = queue.lock().unwrap().next() else { break };
                let res = match mode {
                    Mode::Rewrap => rewrap_file(vol, &tree, &path),
                    Mode::Reencrypt => reencrypt_file(vol, &tree, &path),
                };
                let mut sum = summary.lock().unwrap();
                match res {
                    Ok(true) => sum.changed += 1,
                    Ok(false) => sum.unchanged += 1,
                    Err(e) => sum.failed.push((path.clone(), e)),
                }
                drop(sum);
                progress(&path);
            });
        }
    });
    let mut s = summary.into_inner().unwrap();
    s.failed.sort_by(|a, b| a.0.cmp(&b.0));
    s
}

fn describe(path: &Path) -> impl Fn() -> String + '_ {
    move || path.display().to_string()
}

/// Re-wrap one header under the current KEK version (`EnvelopeFile::rewrap`). Returns
/// whether anything changed.
pub fn rewrap_file(vol: &Volume, tree: &Tree, path: &Path) -> Result<bool> {
    let ctx_err = |e: Error| e.context(path.display());
    let (dir, name) = tree.resolve(path).map_err(ctx_err)?;
    let (f, _) = open_regular(dir.as_raw_fd(), &name, libc::O_RDWR)
        .map_err(|e| e.context(format!("opening {}", path.display())))?
        .ok_or_else(|| ctx_err(not_regular()))?;
    EnvelopeFile { vol, file: &f, describe: &describe(path), who: None }.rewrap().map_err(ctx_err)
}

/// Give one file a new file id and DEK and rewrite its content: a temporary beside it,
/// fsync, rename over the original, fsync the directory. A crash leaves the old file or
/// the new one, never neither. Hard-linked files are refused (a rename would split them).
pub fn reencrypt_file(vol: &Volume, tree: &Tree, path: &Path) -> Result<bool> {
    let ctx_err = |e: Error| e.context(path.display());
    let (dir_fd, name) = tree.resolve(path).map_err(ctx_err)?;
    let dir = dir_fd.as_raw_fd();
    let (old, old_st) = open_regular(dir, &name, libc::O_RDONLY)
        .map_err(|e| e.context(format!("opening {}", path.display())))?
        .ok_or_else(|| ctx_err(not_regular()))?;
    let meta = old.metadata().map_err(|e| Error::io(e, "fstat"))?;
    if meta.len() == 0 {
        return Ok(false);
    }
    if meta.nlink() > 1 {
        return Err(ctx_err(Error::new(libc::EMLINK, "has hard links; re-encrypting it would split them")));
    }
    let geo = vol.geometry;
    let describe = describe(path);
    let source = EnvelopeFile { vol, file: &old, describe: &describe, who: None };
    let opened = source.load(meta.len()).map_err(ctx_err)?;
    let src = source.content(Some(&opened.key));
    let size = src.size().map_err(ctx_err)?;

    // A temporary of fixed length: one named after the original would not fit beside a
    // name near NAME_MAX.
    let tmp = sys::temporary_name()?;
    let tmp_path = path.with_file_name(OsStr::from_bytes(tmp.to_bytes()));
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let new = File::from(
        sys::openat(dir, &tmp, flags, 0o600)
            .map_err(|e| ctx_err(e.context(format!("creating {}", tmp_path.display()))))?,
    );
    let result = (|| -> Result<()> {
        let target = EnvelopeFile { vol, file: &new, describe: &describe, who: None };
        let new_key = target.create_header(None)?;
        let dst = target.content(Some(&new_key));
        const CHUNK: u64 = 1 << 20;
        let mut off = 0;
        while off < size {
            let data = src.read(off, CHUNK.min(size - off) as usize)?;
            // Every block that was sealed is sealed again, zero blocks included: a hole would
            // show which blocks are zero and leave them unauthenticated. Only blocks stored as
            // holes (never written: the write path leaves them so too) stay holes.
            let bs = geo.block_size as usize;
            let holes = stored_holes(&old, geo, off / bs as u64, data.len().div_ceil(bs), size)?;
            let mut run_start = None;
            for (i, &hole) in holes.iter().enumerate() {
                match (hole, run_start) {
                    (false, None) => run_start = Some(i),
                    (true, Some(first)) => {
                        dst.write(off + (first * bs) as u64, &data[first * bs..i * bs])?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
            if let Some(first) = run_start {
                dst.write(off + (first * bs) as u64, &data[first * bs..])?;
            }
            off += CHUNK;
        }
        dst.truncate(size)?;
        copy_metadata(&old, &new, &meta)?;
        // Format 6: the values were bound to the old file id; bound to the new one now.
        if let (true, Some(names)) = (vol.config.features().bound_xattrs, vol.names()) {
            let (was, now) = (XattrBinding::File(opened.header.file_id), XattrBinding::File(new_key.file_id));
            let done = reseal(names, old.as_raw_fd(), new.as_raw_fd(), was, now)?;
            for n in done.foreign {
                tracing::warn!("{}: xattr {n} does not authenticate: copied as it is (it reads as EIO)", describe());
            }
        }
        new.sync_all().map_err(|e| Error::io(e, "fsync"))?;
        // The name must still be the file that was read (a swap inside the volume is
        // refused rather than overwritten); the rename never leaves this directory.
        let now = sys::fstatat_nofollow(dir, &name)?;
        if (now.st_dev, now.st_ino) != (old_st.st_dev, old_st.st_ino) {
            return Err(Error::new(libc::EAGAIN, "was replaced while being re-encrypted; run rekey again"));
        }
        sys::renameat2(dir, &tmp, dir, &name, 0).map_err(|e| e.context("renaming over the original"))?;
        rustix::fs::fsync(&dir_fd).map_err(|e| Error::io(e.into(), "fsync of the directory"))?;
        let rec = &opened.header.records[0];
        vol.keys.audit("reencrypt", &opened.header.file_id, &describe, rec, Ok(()), None, None);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = sys::unlinkat(dir, &tmp, 0);
        return Err(ctx_err(e));
    }
    Ok(true)
}

/// For blocks `first..first + n` of `f` (a file of `size` plaintext bytes): which are
/// stored as holes (all-zero stored bytes).
fn stored_holes(f: &File, geo: Geometry, first: u64, n: usize, size: u64) -> Result<Vec<bool>> {
    let last = first + n as u64 - 1;
    let start = geo.block_offset(first);
    let end = geo.block_offset(last) + geo.block_len(last, size) + BLOCK_OVERHEAD;
    let mut stored = vec![0u8; (end - start) as usize];
    f.read_exact_at(&mut stored, start).map_err(|e| Error::io(e, format!("reading blocks {first}..={last}")))?;
    Ok((first..=last)
        .map(|i| {
            let at = (geo.block_offset(i) - start) as usize;
            is_hole(&stored[at..at + (geo.block_len(i, size) + BLOCK_OVERHEAD) as usize])
        })
        .collect())
}

fn not_regular() -> Error {
    Error::new(libc::EINVAL, "is not a regular file (any more)")
}

/// Owner, mode, user.* xattrs and times of `from` onto `to`.
fn copy_metadata(from: &File, to: &File, meta: &fs::Metadata) -> Result<()> {
    use rustix::fs::{
        fchmod, fchown, fgetxattr, flistxattr, fsetxattr, futimens, Gid, Mode, Timestamps, Uid, XattrFlags,
    };
    let io = |what: &'static str| move |e: rustix::io::Errno| Error::io(e.into(), what);
    fchown(to, Some(Uid::from_raw(meta.uid())), Some(Gid::from_raw(meta.gid()))).map_err(io("copying the owner"))?;
    fchmod(to, Mode::from_raw_mode(meta.mode() & 0o7777)).map_err(io("copying the mode"))?;
    let n = flistxattr(from, &mut [0u8; 0][..]).unwrap_or(0);
    if n > 0 {
        let mut names = vec![0u8; n];
        let n = flistxattr(from, &mut names[..]).unwrap_or(0);
        for name in names[..n.min(names.len())].split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
            let name = std::ffi::CString::new(name).expect("split at NUL");
            let Ok(len) = fgetxattr(from, &name, &mut [0u8; 0][..]) else { continue };
            let mut v = vec![0u8; len];
            if let Ok(len) = fgetxattr(from, &name, &mut v[..]) {
                fsetxattr(to, &name, &v[..len.min(v.len())], XattrFlags::empty())
                    .map_err(io("copying extended attributes"))?;
            }
        }
    }
    let at = |sec, nsec| rustix::fs::Timespec { tv_sec: sec, tv_nsec: nsec };
    let times = Timestamps {
        last_access: at(meta.atime(), meta.atime_nsec()),
        last_modification: at(meta.mtime(), meta.mtime_nsec()),
    };
    futimens(to, &times).map_err(io("copying times"))
}

/// A progress reporter: a bar on a terminal, a log line every few seconds otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    done: AtomicU64,
    total: u64,
    start: Instant,
    last_line: Mutex<Instant>,
}

impl Progress {
    pub fn new(total: u64, label: &str) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} files, {per_sec}, ETA {eta}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            b.set_message(label.to_owned());
            b
        });
        Self { bar, done: AtomicU64::new(0), total, start: Instant::now(), last_line: Mutex::new(Instant::now()) }
    }

    /// Files done so far, and in all.
    pub fn counts(&self) -> (u64, u64) {
        (self.done.load(Ordering::Relaxed), self.total)
    }

    pub fn tick(&self, _path: &Path) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(b) = &self.bar {
            b.inc(1);
            return;
        }
        let mut last = self.last_line.lock().unwrap();
        if last.elapsed() >= Duration::from_secs(2) || done == self.total {
            *last = Instant::now();
            let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-3);
            tracing::info!("{done}/{} files ({rate:.0} files/s)", self.total);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
