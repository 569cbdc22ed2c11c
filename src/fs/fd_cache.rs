//! The descriptors the inode table keeps open: at most `capacity`, the least recently used
//! closed first. An inode whose descriptor was closed is found again by its locator (see
//! `fs::locate`), so the number of inodes the kernel knows no longer sets the number of
//! descriptors the daemon holds.
//!
//! A descriptor handed out stays open while its user holds it, even if it is evicted
//! meanwhile, so the daemon's count is bounded by the capacity plus one per request in
//! flight.

use std::num::NonZeroUsize;
use std::os::unix::io::OwnedFd;

use lru::LruCache;

use std::sync::{Arc, Mutex};

pub struct FdCache {
    lru: Mutex<LruCache<u64, Arc<OwnedFd>>>,
}

impl FdCache {
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).expect("at least one");
        Self { lru: Mutex::new(LruCache::new(cap)) }
    }

    pub fn get(&self, id: u64) -> Option<Arc<OwnedFd>> {
        self.lru.lock().unwrap().get(&id).cloned()
    }

    /// Keep `fd` for `id`, closing the least recently used one if the cache is full.
    pub fn put(&self, id: u64, fd: Arc<OwnedFd>) {
        let evicted = self.lru.lock().unwrap().push(id, fd);
        drop(evicted); // closed outside the lock
    }

    pub fn remove(&self, id: u64) {
        let gone = self.lru.lock().unwrap().pop(&id);
        drop(gone);
    }

    pub fn contains(&self, id: u64) -> bool {
        self.lru.lock().unwrap().contains(&id)
    }

    pub fn len(&self) -> usize {
        self.lru.lock().unwrap().len()
    }

    pub fn capacity(&self) -> usize {
        self.lru.lock().unwrap().cap().get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> Arc<OwnedFd> {
        Arc::new(std::fs::File::open("/").unwrap().into())
    }

    // Whether a descriptor is still open is seen through who holds it, never by probing a
    // number another thread may have been given meanwhile.

    #[test]
    fn keeps_at_most_its_capacity_and_closes_the_least_recently_used() {
        let c = FdCache::new(2);
        let (a, b, d) = (fd(), fd(), fd());
        let watch_a = Arc::downgrade(&a);
        c.put(1, a);
        c.put(2, b);
        assert!(c.get(2).is_some());
        c.put(3, d);
        assert_eq!(c.len(), 2);
        assert!(!c.contains(1), "1 was used least recently");
        assert!(c.contains(2) && c.contains(3));
        assert_eq!(watch_a.strong_count(), 0, "an evicted descriptor nobody holds is closed");
    }

    #[test]
    fn a_descriptor_in_use_outlives_its_eviction() {
        let c = FdCache::new(1);
        c.put(1, fd());
        let held = c.get(1).unwrap();
        let watch = Arc::downgrade(&held);
        c.put(2, fd());
        assert!(!c.contains(1));
        assert_eq!(watch.strong_count(), 1, "still open while held");
        drop(held);
        assert_eq!(watch.strong_count(), 0, "closed once let go");
        c.remove(2);
        assert_eq!(c.len(), 0);
        assert_eq!(c.capacity(), 1);
    }
}
