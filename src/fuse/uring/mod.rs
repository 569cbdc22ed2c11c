//! FUSE over io_uring (`--io-uring`): fuser still mounts, answers INIT (asking for
//! FUSE_OVER_IO_URING), and reads /dev/fuse for what the kernel keeps sending there (FORGET,
//! INTERRUPT). Everything else arrives on io_uring queues registered here on the session's
//! /dev/fuse descriptor: one queue per possible CPU (the kernel sends a request to the
//! queue of the CPU it was issued on, and uses the ring only once every queue has an entry),
//! each served by threads of their own, each thread one io_uring with its entries.
//!
//! Where the kernel refuses (INIT without FUSE_OVER_IO_URING, or a REGISTER failing: the
//! kernel then goes back to /dev/fuse by itself), the mount is served over /dev/fuse, with
//! one warning saying why.

mod abi;
mod serve;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::{InitFlags, KernelConfig};
use tracing::{debug, info, warn};

use crate::sys::fuse_ring::{Event, Ring};

use super::ops::Core;
use serve::{Deferred, Poster, Served};

const ENABLE: &str = "echo Y > /sys/module/fuse/parameters/enable_uring";

/// The rings, made before mounting, so that FUSE_OVER_IO_URING is asked for only when they
/// exist (once granted, the kernel waits for every queue's entries before serving anything).
pub struct Plan {
    rings: Vec<Vec<Ring>>,
    /// Whether INIT granted FUSE_OVER_IO_URING.
    granted: Arc<AtomicBool>,
}

/// What `FuseFs::init` needs: whether to ask, and where to say it was granted.
pub struct InitHook {
    ask: bool,
    granted: Arc<AtomicBool>,
}

impl InitHook {
    pub fn init(&self, config: &mut KernelConfig) {
        if !self.ask {
            return;
        }
        match config.add_capabilities(InitFlags::FUSE_OVER_IO_URING) {
            Ok(()) => self.granted.store(true, Ordering::SeqCst),
            Err(_) => warn!(
                "io_uring: the kernel does not offer FUSE over io_uring (FUSE_OVER_IO_URING), so the mount is \
                 served over /dev/fuse; as root, enable it with `{ENABLE}` (a kernel built with CONFIG_FUSE_IO_URING) \
                 and mount again"
            ),
        }
    }
}

/// The possible CPUs: the kernel makes one queue for each.
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().split(',').filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok()).max())
        .map(|last| last + 1)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Bytes a ring entry's payload needs: the kernel refuses an entry smaller than the
/// largest request or reply (max_write, or max_pages of a read, here 1 MiB at most).
fn payload_len(max_write: u32) -> usize {
    (max_write as usize).max(1 << 20)
}

impl Plan {
    /// The rings for `threads` threads spread over the queues, or none (with the reason
    /// logged) when `wanted` is false or io_uring is unavailable.
    pub fn new(wanted: bool, threads: usize, max_write: u32) -> (Plan, InitHook) {
        let granted = Arc::new(AtomicBool::new(false));
        let mut rings = Vec::new();
        if wanted {
            let queues = possible_cpus();
            let per_queue = (threads / queues).max(1);
            let made: std::io::Result<Vec<Vec<Ring>>> = (0..queues)
                .map(|q| (0..per_queue).map(|_| Ring::new(q as u16, payload_len(max_write))).collect())
                .collect();
            match made {
                Ok(r) => rings = r,
                Err(e) => warn!(
                    "io_uring: no ring could be set up ({e}; kernel.io_uring_disabled, seccomp or an old kernel), \
                     so the mount is served over /dev/fuse"
                ),
            }
        }
        let hook = InitHook { ask: !rings.is_empty(), granted: granted.clone() };
        (Plan { rings, granted }, hook)
    }

    /// After INIT: register every queue's entries on `fuse` (the session's /dev/fuse) and
    /// serve them, or say why the mount stays on /dev/fuse. Never fails the mount.
    pub fn start(self, fuse: impl AsFd, core: &Core, owner: Option<u32>) -> Queues {
        let mut queues = Queues { threads: Vec::new(), transport: "/dev/fuse" };
        // Fault injection for tests: the threads of this queue are not started.
        let unserved: Option<u16> =
            std::env::var("ENVELOPEFS_TEST_URING_UNSERVED_QUEUE").ok().and_then(|q| q.parse().ok());
        if self.rings.is_empty() || !self.granted.load(Ordering::SeqCst) {
            return queues;
        }
        let fd = match fuse.as_fd().try_clone_to_owned() {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                warn!("io_uring: the /dev/fuse descriptor could not be duplicated ({e})");
                // Granted but never registered, the kernel would wait for the queues forever.
                match fuse.as_fd().try_clone_to_owned() {
                    Ok(fd) => fall_back(Arc::new(fd), "no queue could start"),
                    Err(e) => tracing::error!(
                        "io_uring: the kernel waits for ring entries that cannot be given ({e}): unmount this mount"
                    ),
                }
                return queues;
            }
        };
        let nqueues = self.rings.len();
        let started_wanted = self.rings.iter().map(Vec::len).sum::<usize>();
        let (tx, rx) = mpsc::channel();
        for ring in self.rings.into_iter().flatten().filter(|r| Some(r.qid()) != unserved) {
            let (core, tx, fd) = (core.clone(), tx.clone(), fd.clone());
            let spawned =
                std::thread::Builder::new().name("fuse-uring".into()).spawn(move || run(ring, fd, core, owner, tx));
            match spawned {
                Ok(t) => queues.threads.push(t),
                Err(e) => warn!("io_uring: a queue thread could not start: {e}"),
            }
        }
        drop(tx);
        let all_started = queues.threads.len() == started_wanted;
        let reports: Vec<Report> = rx.iter().take(queues.threads.len()).collect();
        let refused: Vec<i32> = reports.iter().filter_map(|(_, r)| r.err()).collect();
        // A queue none of whose threads registered leaves every request waiting.
        let served: std::collections::HashSet<u16> =
            reports.iter().filter(|(_, r)| r.is_ok()).map(|(q, _)| *q).collect();
        match refused.first() {
            None if served.len() == nqueues => {
                queues.transport = "io_uring";
                info!("serving FUSE requests over io_uring: {nqueues} queues, {} threads", queues.threads.len());
                if !all_started {
                    warn!("io_uring: {} of {started_wanted} queue threads started", queues.threads.len());
                }
            }
            None => fall_back(fd, &format!("{} of {nqueues} queues have a thread", served.len())),
            Some(&errno) => warn!(
                "io_uring: the kernel refused a ring entry ({}), so the mount is served over /dev/fuse; {}",
                std::io::Error::from_raw_os_error(errno),
                if errno == libc::EOPNOTSUPP {
                    format!("as root, enable it with `{ENABLE}` and mount again")
                } else {
                    "see the kernel log (dmesg) for the reason".into()
                }
            ),
        }
        queues
    }
}

/// What a queue thread tells `start`: its queue, and whether the kernel took its entry.
type Report = (u16, Result<(), i32>);

/// Turn the connection's io_uring off (`why` a queue is left without entries), so its
/// requests come over /dev/fuse.
fn fall_back(fuse: Arc<OwnedFd>, why: &str) {
    match crate::sys::fuse_ring::refuse(fuse) {
        Ok(true) => warn!("io_uring: {why}, so the mount is served over /dev/fuse"),
        r => tracing::error!(
            "io_uring: {why}, and the kernel would not turn the ring off ({r:?}): requests wait; unmount this mount"
        ),
    }
}

/// The running queue threads.
pub struct Queues {
    threads: Vec<JoinHandle<()>>,
    transport: &'static str,
}

impl Queues {
    /// "io_uring" or "/dev/fuse": what serves the mount's requests.
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// Wait for the threads, which end with the connection (their entries fail with
    /// ENOTCONN), as long as they take: a request still being served finishes its change
    /// before the journal closes. Every `nag` a thread is still busy is logged.
    pub fn join(self, nag: Duration) {
        for t in self.threads {
            let mut since = std::time::Instant::now();
            while !t.is_finished() {
                if since.elapsed() >= nag {
                    warn!("io_uring: a queue thread is still serving a request after the unmount; waiting for it");
                    since = std::time::Instant::now();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = t.join();
        }
    }
}

/// One thread: register its entries, report whether the kernel took them, then serve
/// until the kernel holds none of them any more.
fn run(mut ring: Ring, fuse: Arc<OwnedFd>, core: Core, owner: Option<u32>, report: mpsc::Sender<Report>) {
    // Its requests are issued on its CPU: served there, they stay in that CPU's caches.
    if !crate::sys::fuse_ring::pin_to_cpu(ring.qid().into()) {
        debug!("io_uring: queue {} not pinned to its CPU", ring.qid());
    }
    ring.attach(fuse);
    let mailbox: Arc<Mutex<Vec<Deferred>>> = Arc::default();
    let waker = ring.waker();
    let post: Poster = {
        let mailbox = mailbox.clone();
        Arc::new(move |d| {
            mailbox.lock().unwrap().push(d);
            waker.wake();
        })
    };
    let mut events = Vec::new();
    let registered = ring.register().and_then(|_| ring.arm_waker()).and_then(|()| ring.submit(&mut events));
    let refused = match registered {
        Err(e) => Some(e.raw_os_error().unwrap_or(libc::EIO)),
        Ok(()) => events.iter().find_map(|e| match e {
            Event::Failed(_, errno) if ![libc::EAGAIN, libc::EINTR].contains(errno) => Some(*errno),
            _ => None,
        }),
    };
    let _ = report.send((ring.qid(), refused.map_or(Ok(()), Err)));
    if refused.is_some() {
        return;
    }
    // Entries the kernel holds (registered or committed, not yet failed).
    let mut live = ring.slots();
    loop {
        for ev in events.drain(..) {
            match ev {
                Event::Request(slot) => {
                    core.fs.stats.ring_request();
                    match serve::serve(&core, &mut ring, slot, owner, &post) {
                        Served::Replied => live -= usize::from(ring.commit(slot).is_err()),
                        // Its entry is out until the lock is granted: one more keeps the
                        // queue's capacity (the unlock must get through).
                        Served::Waiting => live = live - 1 + usize::from(ring.register().is_ok()),
                    }
                }
                // Not taken this time (the kernel said so): send it again.
                Event::Failed(slot, libc::EAGAIN | libc::EINTR) => {
                    live -= usize::from(ring.resend(slot).is_err());
                }
                Event::Failed(_, errno) => {
                    live = live.saturating_sub(1);
                    if ![libc::ENOTCONN, libc::ENODEV, libc::ECANCELED, libc::ECONNABORTED].contains(&errno) {
                        warn!("io_uring: a ring entry failed: {}", std::io::Error::from_raw_os_error(errno));
                    }
                }
                Event::Wake => {
                    for (slot, unique, r) in std::mem::take(&mut *mailbox.lock().unwrap()) {
                        serve::reply(&mut ring, slot, unique, r.map(|()| &[][..]));
                        live += usize::from(ring.commit(slot).is_ok());
                    }
                    let _ = ring.arm_waker();
                }
            }
        }
        if live == 0 {
            debug!("io_uring queue thread done: the connection ended");
            return;
        }
        if let Err(e) = ring.wait(&mut events) {
            warn!("io_uring: waiting for requests failed: {e}; this queue thread stops");
            // The kernel may still write into the entries it holds.
            return ring.leak();
        }
    }
}
