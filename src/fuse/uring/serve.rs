//! One request from a ring entry: decoded, answered through `ops::Core` (the same calls,
//! logs, timers and TTLs as the /dev/fuse path), and the reply encoded back into the entry.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::fs::{Caller, SetAttr, SetTime};
use crate::sys::fuse_ring::{Ring, IN_OUT, OP_IN, PAYLOAD_SZ};

use super::super::ops::{Core, Xattr};
use super::abi::{self, Bytes, InHeader};

/// What became of a request.
pub enum Served {
    /// The reply is in the entry: commit it.
    Replied,
    /// F_SETLKW: a thread of its own waits for the lock and posts the reply later (`Deferred`).
    Waiting,
}

/// A reply posted from another thread: the entry, the request's unique, the result.
pub type Deferred = (usize, u64, Result<(), i32>);

/// Posts a deferred reply to the entry's queue thread.
pub type Poster = std::sync::Arc<dyn Fn(Deferred) + Send + Sync>;

/// Names in the payload, each NUL-terminated, in order.
fn names(payload: &[u8]) -> impl Iterator<Item = &OsStr> {
    payload.split(|b| *b == 0).map(OsStr::from_bytes)
}

fn time(valid: u32, now: u32, set: u32, secs: u64, nsecs: u32) -> Option<SetTime> {
    if valid & now != 0 {
        Some(SetTime::Now)
    } else if valid & set != 0 {
        let t = match secs as i64 {
            s if s >= 0 => std::time::UNIX_EPOCH + std::time::Duration::new(s as u64, nsecs),
            s => std::time::UNIX_EPOCH - std::time::Duration::new(s.unsigned_abs(), nsecs),
        };
        Some(SetTime::At(t))
    } else {
        None
    }
}

/// Write the reply (an errno, or the payload bytes) into entry `slot`.
pub fn reply(ring: &mut Ring, slot: usize, unique: u64, r: Result<&[u8], i32>) {
    let (header, payload) = ring.buffers_mut(slot);
    let (error, n) = match r {
        Ok(b) => {
            payload[..b.len()].copy_from_slice(b);
            (0, b.len())
        }
        Err(e) => (e, 0),
    };
    header[IN_OUT..IN_OUT + 16].copy_from_slice(&abi::out_header(unique, error, n));
    header[PAYLOAD_SZ..PAYLOAD_SZ + 4].copy_from_slice(&(n as u32).to_ne_bytes());
}

/// Requests the kernel may send without a caller's uid (fuser lets these through its
/// owner check, and so does this).
fn without_uid(opcode: u32) -> bool {
    use abi::*;
    matches!(opcode, READ | READDIR | READDIRPLUS | WRITE | FSYNC | FSYNCDIR | RELEASE | RELEASEDIR | DESTROY)
}

/// Serve the request in entry `slot`. `owner` is the uid allowed in when only the mount's
/// owner may use it (`None`: everyone, allow_other).
pub fn serve(core: &Core, ring: &mut Ring, slot: usize, owner: Option<u32>, post: &Poster) -> Served {
    let h = InHeader::parse(Bytes(&ring.header(slot)[IN_OUT..IN_OUT + 40]));
    if owner.is_some_and(|o| o != h.uid) && !without_uid(h.opcode) {
        reply(ring, slot, h.unique, Err(libc::EACCES));
        return Served::Replied;
    }
    let used = Bytes(&ring.header(slot)[..]).u32(PAYLOAD_SZ) as usize;
    let header = ring.header(slot);
    let op = Bytes(&header[OP_IN..OP_IN + 128]);
    let payload = &ring.payload(slot)[..used.min(ring.payload(slot).len())];
    let r = answer(core, &h, op, payload, post, slot);
    match r {
        Some(r) => {
            let r = r.as_deref().map_err(|e| *e);
            reply(ring, slot, h.unique, r);
            Served::Replied
        }
        None => Served::Waiting,
    }
}

fn entry_bytes(e: &super::super::ops::Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    abi::entry_out(&mut out, e);
    out
}

/// The reply's bytes; None when a thread will post it (F_SETLKW).
fn answer(
    core: &Core,
    h: &InHeader,
    op: Bytes<'_>,
    payload: &[u8],
    post: &Poster,
    slot: usize,
) -> Option<Result<Vec<u8>, i32>> {
    let caller = Caller { uid: h.uid, gid: h.gid, pid: h.pid };
    let ino = h.nodeid;
    let mut all = names(payload);
    let mut name = || all.next().unwrap_or_default();
    let empty = |r: Result<(), i32>| r.map(|()| Vec::new());
    let entry = |r: Result<super::super::ops::Entry, i32>| r.map(|e| entry_bytes(&e));
    let xattr = |r: Result<Xattr, i32>| {
        r.map(|x| match x {
            Xattr::Size(n) => abi::u32_out(n),
            Xattr::Data(v) => v,
        })
    };
    Some(match h.opcode {
        abi::LOOKUP => entry(core.lookup(ino, name()).0),
        abi::GETATTR => core.getattr(ino).0.map(|(a, ttl)| abi::attr_out(&a, ttl)),
        abi::SETATTR => {
            let valid = op.u32(0);
            let has = |bit: u32| valid & bit != 0;
            let set = SetAttr {
                mode: has(abi::FATTR_MODE).then(|| op.u32(68)),
                uid: has(abi::FATTR_UID).then(|| op.u32(76)),
                gid: has(abi::FATTR_GID).then(|| op.u32(80)),
                size: has(abi::FATTR_SIZE).then(|| op.u64(16)),
                atime: time(valid, abi::FATTR_ATIME_NOW, abi::FATTR_ATIME, op.u64(32), op.u32(56)),
                mtime: time(valid, abi::FATTR_MTIME_NOW, abi::FATTR_MTIME, op.u64(40), op.u32(60)),
                fh: has(abi::FATTR_FH).then(|| op.u64(8)),
            };
            let (r, _timer) = core.setattr(ino, set, caller);
            r.map(|(a, ttl)| abi::attr_out(&a, ttl))
        }
        abi::READLINK => core.readlink(ino).0,
        abi::SYMLINK => {
            let (link, target) = (name(), name());
            entry(core.symlink(ino, link, target, caller).0)
        }
        abi::MKNOD => entry(core.mknod(ino, name(), op.u32(0), op.u32(8), op.u32(4), caller).0),
        abi::MKDIR => entry(core.mkdir(ino, name(), op.u32(0), op.u32(4), caller).0),
        abi::UNLINK => empty(core.unlink(ino, name()).0),
        abi::RMDIR => empty(core.rmdir(ino, name()).0),
        abi::RENAME | abi::RENAME2 => {
            let flags = if h.opcode == abi::RENAME2 { op.u32(8) } else { 0 };
            let (from, to) = (name(), name());
            empty(core.rename(ino, from, op.u64(0), to, flags).0)
        }
        abi::LINK => entry(core.link(op.u64(0), ino, name()).0),
        abi::OPEN | abi::OPENDIR => {
            let (r, _timer) = if h.opcode == abi::OPEN { core.open(ino, op.i32(0), caller) } else { core.opendir(ino) };
            r.map(|fh| {
                let mut out = Vec::with_capacity(16);
                abi::open_out(&mut out, fh);
                out
            })
        }
        abi::READ => core.read(ino, op.u64(0), op.u64(8), op.u32(16)).0,
        abi::WRITE => {
            let size = (op.u32(16) as usize).min(payload.len());
            core.write(ino, op.u64(0), op.u64(8), &payload[..size], caller).0.map(abi::u32_out)
        }
        abi::STATFS => core.statfs(ino).0.map(|s| abi::statfs_out(&s)),
        abi::RELEASE => {
            let owner = (op.u32(12) & abi::RELEASE_FLOCK_UNLOCK != 0).then(|| op.u64(16));
            empty(core.release(ino, op.u64(0), owner).0)
        }
        abi::RELEASEDIR => empty(core.releasedir(op.u64(0)).0),
        abi::FSYNC => empty(core.fsync(ino, op.u64(0), op.u32(8) & abi::FSYNC_FDATASYNC != 0).0),
        abi::FSYNCDIR => empty(core.fsyncdir(ino).0),
        abi::FLUSH => empty(core.flush(ino, op.u64(16)).0),
        // No FUSE_SETXATTR_EXT asked for: `fuse_setxattr_in` is its 8-byte compat form.
        abi::SETXATTR => {
            let n = payload.split(|b| *b == 0).next().map_or(0, <[u8]>::len) + 1;
            let size = (op.u32(0) as usize).min(payload.len().saturating_sub(n));
            empty(core.setxattr(ino, name(), &payload[n..n + size], op.i32(4), caller).0)
        }
        abi::GETXATTR => xattr(core.getxattr(ino, name(), op.u32(0), caller).0),
        abi::LISTXATTR => xattr(core.listxattr(ino, op.u32(0)).0),
        abi::REMOVEXATTR => empty(core.removexattr(ino, name()).0),
        abi::ACCESS => empty(core.access().0),
        abi::CREATE => {
            let (r, _timer) = core.create(ino, name(), op.u32(4), op.u32(8), op.i32(0), caller);
            r.map(|(e, fh)| {
                let mut out = entry_bytes(&e);
                abi::open_out(&mut out, fh);
                out
            })
        }
        abi::FALLOCATE => empty(core.fallocate(ino, op.u64(0), op.u64(8), op.u64(16), op.i32(24), caller).0),
        abi::READDIR | abi::READDIRPLUS => {
            let (fh, offset, max) = (op.u64(0), op.u64(8), op.u32(16) as usize);
            let mut out = Vec::with_capacity(max);
            let (r, _timer) = if h.opcode == abi::READDIR {
                core.readdir(ino, fh, offset, |e, next| {
                    !abi::dirent(&mut out, max, e.ino, next, e.kind, e.name.as_bytes())
                })
            } else {
                core.readdirplus(ino, fh, offset, |e, next, a| {
                    !abi::direntplus(&mut out, max, a, next, e.name.as_bytes())
                })
            };
            r.map(|()| out)
        }
        abi::GETLK => {
            let (owner, start, end, typ) = (op.u64(8), op.u64(16), op.u64(24), op.i32(32));
            core.getlk(ino, owner, start, end, typ).0.map(|(t, s, e)| abi::lk_out(t, s, e))
        }
        abi::SETLK => empty(core.setlk(ino, op.u64(8), op.u64(16), op.u64(24), op.i32(32)).0),
        abi::SETLKW => {
            // A wait may last as long as another host holds the lock: not on a queue's thread.
            let (core, post, unique) = (core.clone(), post.clone(), h.unique);
            let (owner, start, end, typ) = (op.u64(8), op.u64(16), op.u64(24), op.i32(32));
            std::thread::spawn(move || post((slot, unique, core.setlkw(ino, owner, start, end, typ))));
            return None;
        }
        abi::DESTROY => Ok(Vec::new()),
        // What the adapter does not serve, fuser answers ENOSYS too.
        _ => Err(libc::ENOSYS),
    })
}
