//! FUSE over io_uring, the kernel side of it: one io_uring (128-byte SQEs) whose entries are
//! ring entries of a FUSE connection's queue. Each entry is a header buffer
//! (`struct fuse_uring_req_header`) and a payload buffer, given to the kernel once by
//! `FUSE_IO_URING_CMD_REGISTER` and handed back with each reply by
//! `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`; a completion means a request is in the buffers
//! (or, with an error, that the entry is gone). The layouts follow the uapi header
//! `include/uapi/linux/fuse.h` (7.42+); what a request and a reply contain is `fuse::uring`'s.
//!
//! Buffers live as long as the `Ring`, and the `Ring` must outlive every command the kernel
//! holds: drop it only once each registered entry has completed with an error (the
//! connection ended), or when the process exits.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// `sizeof(struct fuse_uring_req_header)`: in_out[128], op_in[128], then
/// `struct fuse_uring_ent_in_out` (flags, commit_id, payload_sz, padding, reserved: 32).
pub const HEADER_LEN: usize = 288;
/// Where `fuse_in_header` (a request) or `fuse_out_header` (a reply) is in the header.
pub const IN_OUT: usize = 0;
/// Where the opcode's own fixed argument struct is (in_args[0]).
pub const OP_IN: usize = 128;
/// `fuse_uring_ent_in_out.commit_id`: the request's unique, to commit the reply with.
pub const COMMIT_ID: usize = 256 + 8;
/// `fuse_uring_ent_in_out.payload_sz`: the payload bytes used, in either direction.
pub const PAYLOAD_SZ: usize = 256 + 16;

/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// user_data of the read that wakes the ring's thread.
const WAKE: u64 = u64::MAX;

struct Slot {
    header: Box<[u8; HEADER_LEN]>,
    payload: Box<[u8]>,
    /// iov[0] the header, iov[1] the payload: what REGISTER's `addr` points to (read by
    /// the kernel when it takes the command).
    iov: Box<[libc::iovec; 2]>,
    /// The command sent last (to send again after EAGAIN or EINTR).
    last: u32,
}

/// What a completion said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A request is in the entry's buffers.
    Request(usize),
    /// The entry's command failed (negative errno): the kernel holds it no longer.
    Failed(usize, i32),
    /// `Waker::wake` was called.
    Wake,
}

/// One io_uring serving one FUSE queue.
pub struct Ring {
    uring: IoUring<squeue::Entry128, cqueue::Entry>,
    fuse: Option<Arc<OwnedFd>>,
    qid: u16,
    payload_len: usize,
    slots: Vec<Slot>,
    wake_rx: UnixDatagram,
    wake_tx: Arc<UnixDatagram>,
    /// Leaked: a read the kernel cancels only after the ring is gone may still land here.
    wake_buf: &'static mut [u8; 8],
}

// SAFETY: the raw pointers in `Slot::iov` point into buffers the same `Slot` owns (boxed:
// they never move); nothing else shares them, so the `Ring` may move to another thread.
unsafe impl Send for Ring {}

/// Make the kernel serve the connection over /dev/fuse after all: a REGISTER for a queue
/// that does not exist is refused, and a refused REGISTER turns the connection's io_uring
/// off and wakes the requests that were waiting for every queue to have an entry (which a
/// queue left without a thread would never get). True when the kernel refused it.
pub fn refuse(fuse: Arc<OwnedFd>) -> io::Result<bool> {
    let mut ring = Ring::new(u16::MAX, 8192)?;
    ring.attach(fuse);
    ring.register()?;
    let mut events = Vec::new();
    ring.wait(&mut events)?;
    Ok(events.iter().any(|e| matches!(e, Event::Failed(0, _))))
}

/// Wakes a ring's thread from another thread (`Event::Wake`).
#[derive(Clone)]
pub struct Waker(Arc<UnixDatagram>);

impl Waker {
    pub fn wake(&self) {
        // Full means a wake is pending already.
        let _ = self.0.send(&[1]);
    }
}

impl Ring {
    /// An io_uring for queue `qid` whose entries carry `payload_len`-byte payloads. Fails
    /// where io_uring is unavailable (an old kernel, `kernel.io_uring_disabled`, seccomp).
    pub fn new(qid: u16, payload_len: usize) -> io::Result<Ring> {
        let uring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(64)?;
        let (wake_rx, wake_tx) = UnixDatagram::pair()?;
        wake_rx.set_nonblocking(true)?;
        wake_tx.set_nonblocking(true)?;
        Ok(Ring {
            uring,
            fuse: None,
            qid,
            payload_len,
            slots: Vec::new(),
            wake_rx,
            wake_tx: Arc::new(wake_tx),
            wake_buf: Box::leak(Box::new([0; 8])),
        })
    }

    /// The /dev/fuse descriptor (of the connection, after its INIT) the commands go to.
    pub fn attach(&mut self, fuse: Arc<OwnedFd>) {
        self.fuse = Some(fuse);
    }

    pub fn waker(&self) -> Waker {
        Waker(self.wake_tx.clone())
    }

    fn fuse_fd(&self) -> io::Result<RawFd> {
        self.fuse.as_ref().map(|f| f.as_raw_fd()).ok_or_else(|| io::Error::other("ring not attached"))
    }

    fn push(&mut self, sqe: squeue::Entry128) -> io::Result<()> {
        if self.uring.submission().is_full() {
            self.uring.submit()?;
        }
        // SAFETY: every buffer an SQE names (a slot's header, payload and iovecs, the wake
        // buffer) is boxed and owned by this Ring, which outlives the command (module doc).
        unsafe { self.uring.submission().push(&sqe) }.map_err(|_| io::Error::other("submission queue full"))
    }

    /// The 80-byte command area: `struct fuse_uring_cmd_req` (flags, commit_id, qid).
    fn cmd(&self, commit_id: u64) -> [u8; 80] {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        cmd
    }

    /// Give the kernel one more entry (`FUSE_IO_URING_CMD_REGISTER`); its index. Submitted
    /// by the next `submit` or `wait`.
    pub fn register(&mut self) -> io::Result<usize> {
        let mut header = Box::new([0u8; HEADER_LEN]);
        let mut payload = vec![0u8; self.payload_len].into_boxed_slice();
        let iov = Box::new([
            libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: HEADER_LEN },
            libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() },
        ]);
        let idx = self.slots.len();
        self.slots.push(Slot { header, payload, iov, last: CMD_REGISTER });
        self.send(idx, CMD_REGISTER)?;
        Ok(idx)
    }

    /// Hand entry `slot` back with the reply written in it, and take the next request
    /// (`FUSE_IO_URING_CMD_COMMIT_AND_FETCH`).
    pub fn commit(&mut self, slot: usize) -> io::Result<()> {
        self.send(slot, CMD_COMMIT_AND_FETCH)
    }

    /// Send entry `slot`'s last command again (it completed with EAGAIN or EINTR).
    pub fn resend(&mut self, slot: usize) -> io::Result<()> {
        self.send(slot, self.slots[slot].last)
    }

    fn send(&mut self, slot: usize, cmd_op: u32) -> io::Result<()> {
        let s = &mut self.slots[slot];
        s.last = cmd_op;
        let commit_id = match cmd_op {
            CMD_COMMIT_AND_FETCH => u64::from_ne_bytes(s.header[COMMIT_ID..COMMIT_ID + 8].try_into().unwrap()),
            _ => 0,
        };
        let addr = s.iov.as_ptr() as u64;
        let sqe = opcode::UringCmd80::new(types::Fd(self.fuse_fd()?), cmd_op)
            .cmd(self.cmd(commit_id))
            .addr(Some(addr))
            .build()
            .user_data(slot as u64);
        // REGISTER reads two iovecs at `addr`; COMMIT_AND_FETCH reads neither.
        self.push(with_len(sqe, 2))
    }

    /// Listen for `Waker::wake`.
    pub fn arm_waker(&mut self) -> io::Result<()> {
        let sqe = opcode::Read::new(types::Fd(self.wake_rx.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE);
        self.push(sqe.into())
    }

    /// Submit what is queued without waiting; the completions already there (a REGISTER
    /// the kernel refused completes at once).
    pub fn submit(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        self.uring.submit()?;
        self.drain(out);
        Ok(())
    }

    /// Submit what is queued and wait for at least one completion.
    pub fn wait(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        loop {
            match self.uring.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            self.drain(out);
            if !out.is_empty() {
                return Ok(());
            }
        }
    }

    fn drain(&mut self, out: &mut Vec<Event>) {
        for cqe in self.uring.completion() {
            out.push(match (cqe.user_data(), cqe.result()) {
                (WAKE, _) => {
                    // Empty the socket: one wake covers all that were sent.
                    let mut b = [0u8; 8];
                    while self.wake_rx.recv(&mut b).is_ok_and(|n| n > 0) {}
                    Event::Wake
                }
                (slot, r) if r < 0 => Event::Failed(slot as usize, -r),
                (slot, _) => Event::Request(slot as usize),
            });
        }
    }

    pub fn header(&self, slot: usize) -> &[u8; HEADER_LEN] {
        &self.slots[slot].header
    }

    /// The header (to write the reply's) and the payload, at once.
    pub fn buffers_mut(&mut self, slot: usize) -> (&mut [u8; HEADER_LEN], &mut [u8]) {
        let s = &mut self.slots[slot];
        (&mut s.header, &mut s.payload)
    }

    pub fn payload(&self, slot: usize) -> &[u8] {
        &self.slots[slot].payload
    }

    /// Give up the ring but not its entries' buffers: for a ring whose entries the kernel
    /// may still hold (the connection alive), so it never writes into freed memory.
    pub fn leak(mut self) {
        std::mem::forget(std::mem::take(&mut self.slots));
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }
}

/// Run the calling thread on `cpu` only (a queue's thread beside the requests of its CPU,
/// as libfuse does); false where that is refused.
pub fn pin_to_cpu(cpu: usize) -> bool {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).is_ok()
}

/// Set an SQE's `len` (offset 24 of `struct io_uring_sqe` in `include/uapi/linux/io_uring.h`):
/// REGISTER needs 2 (the iovecs), and the crate's `UringCmd80` has no setter for it.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: `Entry128` is `#[repr(C)]`: the 64-byte `io_uring_sqe` and 64 more bytes of
    // command, 128 bytes in all (the crate tests this); every bit pattern is a valid SQE.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: the same layout, back.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}
