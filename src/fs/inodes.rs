//! The inode table: which backing objects the kernel knows, under which inode numbers, and
//! how many lookups it holds on each. Every change of a lookup count happens under the
//! table's lock, so a `forget` racing a lookup (or a `link`) can never drop an inode the
//! kernel was just handed.

use std::collections::HashMap;

use crate::sys::sync::{Arc, AtomicU64, Mutex, Ordering};

/// One known inode and what the filesystem keeps with it.
pub struct Node<T> {
    pub ino: u64,
    /// (device, inode) of the backing object.
    pub key: (u64, u64),
    lookups: AtomicU64,
    pub value: T,
}

impl<T> std::ops::Deref for Node<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Node<T> {
    #[cfg(all(test, feature = "shuttle"))]
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::SeqCst)
    }
}

struct Maps<T> {
    by_ino: HashMap<u64, Arc<Node<T>>>,
    by_key: HashMap<(u64, u64), u64>,
}

pub struct InodeTable<T> {
    maps: Mutex<Maps<T>>,
    root: u64,
}

impl<T> InodeTable<T> {
    /// A table that knows the root (which is never forgotten).
    pub fn new(root: u64, key: (u64, u64), value: T) -> Self {
        let node = Arc::new(Node { ino: root, key, lookups: AtomicU64::new(1), value });
        let maps = Maps { by_ino: HashMap::from([(root, node)]), by_key: HashMap::from([(key, root)]) };
        Self { maps: Mutex::new(maps), root }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node<T>>> {
        self.maps.lock().unwrap().by_ino.get(&ino).cloned()
    }

    /// The node for backing object `key`, with one more lookup: the known one if `same`
    /// says it is still that object, or a new one holding `make()`. A new node is numbered
    /// `preferred` unless a live node has that number (a backing inode number reused while
    /// the kernel still knows the old object), else `fresh()`.
    ///
    /// `same` may make syscalls (finding an object again), so it runs without the table's
    /// lock; its answer counts only if the table still maps `key` to the node it judged.
    pub fn intern(
        &self,
        key: (u64, u64),
        same: impl Fn(&Node<T>) -> bool,
        preferred: Option<u64>,
        fresh: impl FnOnce() -> u64,
        make: impl FnOnce() -> T,
    ) -> Arc<Node<T>> {
        let mut judged = self.find(key).map(|n| {
            let is = same(&n);
            (n, is)
        });
        let mut m = loop {
            let m = self.maps.lock().unwrap();
            let now = m.by_key.get(&key).and_then(|i| m.by_ino.get(i)).cloned();
            match (now, &judged) {
                (Some(n), Some((j, true))) if Arc::ptr_eq(&n, j) => {
                    n.lookups.fetch_add(1, Ordering::SeqCst);
                    return n;
                }
                // Another object now has the number, or the node went: a new one.
                (Some(n), Some((j, false))) if Arc::ptr_eq(&n, j) => break m,
                (None, _) => break m,
                // A node made for `key` since it was judged: judge that one.
                (Some(n), _) => {
                    drop(m);
                    let is = same(&n);
                    judged = Some((n, is));
                }
            }
        };
        let ino = preferred.filter(|p| !m.by_ino.contains_key(p)).unwrap_or_else(fresh);
        let node = Arc::new(Node { ino, key, lookups: AtomicU64::new(1), value: make() });
        m.by_key.insert(key, ino);
        m.by_ino.insert(ino, node.clone());
        node
    }

    /// The node the table knows for backing object `key`, if any.
    pub fn find(&self, key: (u64, u64)) -> Option<Arc<Node<T>>> {
        let m = self.maps.lock().unwrap();
        m.by_key.get(&key).and_then(|i| m.by_ino.get(i)).cloned()
    }

    /// One more lookup on a node the caller holds (a `link` reply hands out its inode
    /// again), returning the node the table now knows for that object: if a concurrent
    /// `forget` dropped it meanwhile it is known again, and if the object was looked up
    /// anew since, the lookup counts on that node.
    pub fn add_lookup(&self, node: &Arc<Node<T>>) -> Arc<Node<T>> {
        let mut m = self.maps.lock().unwrap();
        let current = m.by_key.get(&node.key).and_then(|i| m.by_ino.get(i)).cloned();
        match current {
            Some(c) => {
                c.lookups.fetch_add(1, Ordering::SeqCst);
                c
            }
            None => {
                node.lookups.fetch_add(1, Ordering::SeqCst);
                m.by_key.insert(node.key, node.ino);
                m.by_ino.insert(node.ino, node.clone());
                node.clone()
            }
        }
    }

    /// The kernel gives back `n` lookups; at zero the inode is forgotten, and returned.
    pub fn forget(&self, ino: u64, n: u64) -> Option<Arc<Node<T>>> {
        if ino == self.root {
            return None;
        }
        let mut m = self.maps.lock().unwrap();
        let node = m.by_ino.get(&ino).cloned()?;
        let left = node.lookups.load(Ordering::SeqCst).saturating_sub(n);
        node.lookups.store(left, Ordering::SeqCst);
        if left > 0 {
            return None;
        }
        m.by_ino.remove(&ino);
        if m.by_key.get(&node.key) == Some(&ino) {
            m.by_key.remove(&node.key);
        }
        Some(node)
    }

    pub fn len(&self) -> usize {
        self.maps.lock().unwrap().by_ino.len()
    }
}

#[cfg(all(test, feature = "shuttle"))]
mod tests {
    use super::*;

    fn table() -> Arc<InodeTable<u32>> {
        Arc::new(InodeTable::new(1, (0, 1), 0))
    }

    /// Lookups and forgets of one object from several threads, in every interleaving shuttle
    /// tries: when all are given back, only the root is left, and while any is held the
    /// inode resolves.
    #[test]
    fn concurrent_lookups_and_forgets_balance() {
        shuttle::check_random(
            || {
                let t = table();
                let threads: Vec<_> = (0..3)
                    .map(|_| {
                        let t = t.clone();
                        shuttle::thread::spawn(move || {
                            let n = t.intern((0, 7), |_| true, Some(7), || 8, || 70);
                            assert_eq!(t.get(n.ino).map(|x| x.ino), Some(7), "held, so known");
                            t.forget(n.ino, 1);
                        })
                    })
                    .collect();
                for th in threads {
                    th.join().unwrap();
                }
                assert_eq!(t.len(), 1, "only the root is left");
            },
            2000,
        );
    }

    /// A `link` reply adds a lookup to a node obtained earlier while the kernel forgets the
    /// last lookup it had: the new lookup must keep the inode known.
    #[test]
    fn a_link_racing_the_last_forget_keeps_the_inode() {
        shuttle::check_random(
            || {
                let t = table();
                let node = t.intern((0, 9), |_| true, Some(9), || 10, || 90);
                let forgetter = {
                    let t = t.clone();
                    shuttle::thread::spawn(move || drop(t.forget(9, 1)))
                };
                let linker = {
                    let t = t.clone();
                    shuttle::thread::spawn(move || drop(t.add_lookup(&node)))
                };
                forgetter.join().unwrap();
                linker.join().unwrap();
                let known = t.get(9).expect("the link's lookup keeps it");
                assert_eq!(known.lookups(), 1);
            },
            2000,
        );
    }

    /// `same` runs without the lock: one thread judges the known node while another
    /// replaces it (a reused backing number). Each gets a node the table knows, and a node
    /// judged "same" is the one its lookup counts on.
    #[test]
    fn a_node_judged_without_the_lock_is_judged_again_if_replaced() {
        shuttle::check_random(
            || {
                let t = table();
                let first = t.intern((0, 5), |_| true, Some(5), || 6, || 1);
                let keeper = {
                    let t = t.clone();
                    shuttle::thread::spawn(move || t.intern((0, 5), |n| n.value == 1, Some(5), || 7, || 9))
                };
                let replacer = {
                    let t = t.clone();
                    shuttle::thread::spawn(move || t.intern((0, 5), |_| false, Some(5), || 8, || 2))
                };
                let (k, r) = (keeper.join().unwrap(), replacer.join().unwrap());
                assert!(t.get(k.ino).is_some() && t.get(r.ino).is_some(), "both held, so known");
                assert_eq!(r.value, 2);
                // The keeper counted on the first node, or judged the replacement (not it) anew.
                assert!(Arc::ptr_eq(&k, &first) || k.value == 9, "{}", k.value);
                let held: u64 = [&first, &k, &r].iter().map(|n| n.lookups()).sum();
                assert!(held >= 3);
            },
            2000,
        );
    }

    #[test]
    fn the_root_is_never_forgotten_and_numbers_are_stable() {
        shuttle::check_random(
            || {
                let t = table();
                t.forget(1, 100);
                assert!(t.get(1).is_some());
                let a = t.intern((0, 5), |_| true, Some(5), || 6, || 1);
                let b = t.intern((0, 5), |_| true, Some(6), || 7, || 2);
                assert_eq!((a.ino, b.ino, b.value), (5, 5, 1), "a known object keeps its number and value");
                assert_eq!(a.lookups(), 2);
                // The backing number now names another object while the kernel still
                // knows the old one: a new node, under a number of its own.
                let c = t.intern((0, 5), |_| false, Some(5), || 1 << 63, || 3);
                assert_eq!((c.ino, c.value), (1 << 63, 3));
                assert_eq!(t.find((0, 5)).map(|n| n.ino), Some(1 << 63));
                assert!(t.forget(5, 2).is_some(), "the old node goes with its last lookup");
                assert_eq!(t.find((0, 5)).map(|n| n.ino), Some(1 << 63), "and leaves the new one known");
            },
            10,
        );
    }
}
