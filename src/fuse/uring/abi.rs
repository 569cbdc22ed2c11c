//! The FUSE messages the ring carries, as bytes: only what `serve` reads and writes. Layouts
//! follow the uapi header `include/uapi/linux/fuse.h` (ABI 7.45 here); offsets are noted per
//! field. Native byte order, as the kernel writes them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::fs::Attr;

use super::super::ops::Entry;

pub const LOOKUP: u32 = 1;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const GETLK: u32 = 31;
pub const SETLK: u32 = 32;
pub const SETLKW: u32 = 33;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const DESTROY: u32 = 38;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;

/// `fuse_setattr_in.valid` bits.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_FH: u32 = 1 << 6;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;
/// `fuse_release_in.release_flags`.
pub const RELEASE_FLOCK_UNLOCK: u32 = 1 << 1;
/// `fuse_fsync_in.fsync_flags`.
pub const FSYNC_FDATASYNC: u32 = 1 << 0;

/// `struct fuse_in_header` (40 bytes): len 0, opcode 4, unique 8, nodeid 16, uid 24,
/// gid 28, pid 32, total_extlen 36.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Reads native-endian fields out of a byte slice; past its end reads zero (a short
/// argument the kernel did not send).
#[derive(Clone, Copy)]
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    fn get<const N: usize>(&self, at: usize) -> [u8; N] {
        self.0.get(at..at + N).and_then(|b| b.try_into().ok()).unwrap_or([0; N])
    }
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.get(at))
    }
    pub fn u64(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.get(at))
    }
    pub fn i32(&self, at: usize) -> i32 {
        i32::from_ne_bytes(self.get(at))
    }
}

impl InHeader {
    pub fn parse(b: Bytes<'_>) -> Self {
        Self { opcode: b.u32(4), unique: b.u64(8), nodeid: b.u64(16), uid: b.u32(24), gid: b.u32(28), pid: b.u32(32) }
    }
}

/// `struct fuse_out_header` (16 bytes): len, error (0 or a negative errno), unique.
pub fn out_header(unique: u64, error: i32, payload: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&((16 + payload) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&(-error).to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// Seconds and nanoseconds from the epoch, before it negative (as fuser writes them).
fn time(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs().min(i64::MAX as u64), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            match d.subsec_nanos() {
                0 => ((-(d.as_secs() as i64)) as u64, 0),
                n => ((-(d.as_secs() as i64) - 1) as u64, 1_000_000_000 - n),
            }
        }
    }
}

/// Type bits as fuser sends them: an unknown type is a regular file.
pub fn type_bits(mode: u32) -> u32 {
    match mode & libc::S_IFMT {
        t @ (libc::S_IFDIR | libc::S_IFLNK | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) => t,
        _ => libc::S_IFREG,
    }
}

/// `struct fuse_attr` (88 bytes).
pub fn attr(out: &mut Vec<u8>, a: &Attr) {
    let (at, atn) = time(a.atime);
    let (mt, mtn) = time(a.mtime);
    let (ct, ctn) = time(a.ctime);
    for v in [a.ino, a.size, a.blocks, at, mt, ct] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    let mode = type_bits(a.mode) | (a.mode & 0o7777);
    for v in [atn, mtn, ctn, mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, 0] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
}

fn ttl(out: &mut Vec<u8>, d: Duration) {
    out.extend_from_slice(&d.as_secs().to_ne_bytes());
}

/// `struct fuse_attr_out` (104 bytes): attr_valid, attr_valid_nsec, dummy, attr.
pub fn attr_out(a: &Attr, valid: Duration) -> Vec<u8> {
    let mut out = Vec::with_capacity(104);
    ttl(&mut out, valid);
    out.extend_from_slice(&valid.subsec_nanos().to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut out, a);
    out
}

/// `struct fuse_entry_out` (128 bytes): nodeid, generation 0, entry_valid, attr_valid,
/// their nanoseconds, attr.
pub fn entry_out(out: &mut Vec<u8>, e: &Entry) {
    out.extend_from_slice(&e.attr.ino.to_ne_bytes());
    out.extend_from_slice(&0u64.to_ne_bytes());
    ttl(out, e.entry_ttl);
    ttl(out, e.attr_ttl);
    out.extend_from_slice(&e.entry_ttl.subsec_nanos().to_ne_bytes());
    out.extend_from_slice(&e.attr_ttl.subsec_nanos().to_ne_bytes());
    attr(out, &e.attr);
}

/// `struct fuse_open_out` (16 bytes): fh, open_flags 0, backing_id 0.
pub fn open_out(out: &mut Vec<u8>, fh: u64) {
    out.extend_from_slice(&fh.to_ne_bytes());
    out.extend_from_slice(&[0; 8]);
}

/// `struct fuse_dirent`: ino, off, namelen, type, the name, zeros to 8 bytes. False (and
/// nothing written) when it would not fit in `max` bytes.
pub fn dirent(out: &mut Vec<u8>, max: usize, ino: u64, next: u64, mode: u32, name: &[u8]) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if out.len() + len > max {
        return false;
    }
    out.extend_from_slice(&ino.to_ne_bytes());
    out.extend_from_slice(&next.to_ne_bytes());
    out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    out.extend_from_slice(&(type_bits(mode) >> 12).to_ne_bytes());
    out.extend_from_slice(name);
    out.resize(out.len() + len - 24 - name.len(), 0);
    true
}

/// `struct fuse_direntplus`: the entry, then its dirent; false when it would not fit.
pub fn direntplus(out: &mut Vec<u8>, max: usize, e: &Entry, next: u64, name: &[u8]) -> bool {
    let len = 128 + (24 + name.len()).next_multiple_of(8);
    if out.len() + len > max {
        return false;
    }
    entry_out(out, e);
    dirent(out, usize::MAX, e.attr.ino, next, e.attr.mode, name)
}

/// `struct fuse_statfs_out` (80 bytes).
pub fn statfs_out(s: &crate::fs::StatFs) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    for v in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    for v in [s.bsize, s.namelen, s.frsize] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out.resize(80, 0);
    out
}

/// `struct fuse_lk_out`: `struct fuse_file_lock` (start, end, type, pid 0).
pub fn lk_out(typ: i32, start: u64, end: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(&start.to_ne_bytes());
    out.extend_from_slice(&end.to_ne_bytes());
    out.extend_from_slice(&typ.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out
}

/// A u32 and 4 bytes of padding: `fuse_write_out`, `fuse_getxattr_out`.
pub fn u32_out(n: u32) -> Vec<u8> {
    let mut out = n.to_ne_bytes().to_vec();
    out.extend_from_slice(&[0; 4]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_uapi_sizes() {
        let a = Attr { ino: 5, ..Attr::absent() };
        assert_eq!(attr_out(&a, Duration::from_secs(1)).len(), 104);
        let mut e = Vec::new();
        entry_out(&mut e, &Entry { attr: a, attr_ttl: Duration::ZERO, entry_ttl: Duration::from_millis(1500) });
        assert_eq!(e.len(), 128);
        assert_eq!(u32::from_ne_bytes(e[32..36].try_into().unwrap()), 500_000_000);
        let mut d = Vec::new();
        assert!(dirent(&mut d, 4096, 7, 1, libc::S_IFDIR, b"abc"));
        assert_eq!(d.len(), 32);
        assert!(!dirent(&mut d, 40, 7, 2, libc::S_IFREG, b"x"));
        let s =
            crate::fs::StatFs { blocks: 1, bfree: 1, bavail: 1, files: 1, ffree: 1, bsize: 1, namelen: 1, frsize: 1 };
        assert_eq!(statfs_out(&s).len(), 80);
        assert_eq!(time(UNIX_EPOCH - Duration::from_millis(1500)), ((-2i64) as u64, 500_000_000));
    }
}
