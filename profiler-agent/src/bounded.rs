//! An LRU cache whose bound is a limit, not an allocation.
//!
//! `lru::LruCache::new(n)` reserves its hash table for `n` entries up front,
//! and hashing spreads the first few thousand entries over every page of
//! it, so the address cache (bounded at 262144) cost its full ~9 MB from the
//! first export on an idle host (heaptrack on `run --off-cpu`; idle RSS in
//! `cargo xtask bench churn`). [`GrowingLru`] starts small and doubles its
//! capacity as it fills, up to the bound; at the bound it evicts the least
//! recently used entry exactly as `LruCache` does.
//!
//! Reads go to the inner cache through `Deref`; the inherent `push`, `put`
//! and `cap` here shadow the inner ones, so every insertion grows first and
//! `cap` is the bound.

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::ops::{Deref, DerefMut};

use lru::LruCache;

/// Entries reserved at first: a host's few dozen processes or a short
/// profile's addresses fit without growing.
const INITIAL: usize = 64;

pub struct GrowingLru<K: Hash + Eq, V> {
    inner: LruCache<K, V>,
    bound: NonZeroUsize,
}

impl<K: Hash + Eq, V> GrowingLru<K, V> {
    pub fn new(bound: NonZeroUsize) -> Self {
        let first = NonZeroUsize::new(INITIAL.min(bound.get())).unwrap_or(bound);
        Self { inner: LruCache::new(first), bound }
    }

    /// The bound: at most this many entries are kept.
    pub fn cap(&self) -> NonZeroUsize {
        self.bound
    }

    /// Makes room for one more entry below the bound without evicting.
    fn grow_for(&mut self, k: &K) {
        let cap = self.inner.cap();
        if self.inner.len() == cap.get() && cap < self.bound && !self.inner.contains(k) {
            let doubled = cap.get().saturating_mul(2).min(self.bound.get());
            self.inner.resize(NonZeroUsize::new(doubled).unwrap_or(self.bound));
        }
    }

    /// As [`LruCache::push`]: the old value of `k`, or the evicted entry.
    pub fn push(&mut self, k: K, v: V) -> Option<(K, V)> {
        self.grow_for(&k);
        self.inner.push(k, v)
    }

    /// As [`LruCache::put`]: the old value of `k`, if any.
    pub fn put(&mut self, k: K, v: V) -> Option<V> {
        self.grow_for(&k);
        self.inner.put(k, v)
    }
}

impl<K: Hash + Eq, V> Deref for GrowingLru<K, V> {
    type Target = LruCache<K, V>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl<K: Hash + Eq, V> DerefMut for GrowingLru<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn grows_to_the_bound_then_evicts_the_least_recent() {
        let mut c = GrowingLru::new(nz(200));
        for i in 0..200 {
            assert_eq!(c.push(i, i), None, "no eviction below the bound ({i})");
        }
        assert_eq!(c.len(), 200);
        assert_eq!(c.inner.cap().get(), 200);
        c.get(&0);
        assert_eq!(c.push(200, 200), Some((1, 1)), "1 is the least recently used");
        assert_eq!(c.len(), 200);
        assert_eq!(c.cap().get(), 200);
    }

    #[test]
    fn replacing_a_key_at_the_inner_capacity_does_not_grow() {
        let mut c = GrowingLru::new(nz(1000));
        for i in 0..INITIAL {
            c.put(i, 0);
        }
        assert_eq!(c.put(0, 1), Some(0));
        assert_eq!(c.inner.cap().get(), INITIAL);
    }

    proptest! {
        // Against the preallocating cache it replaces: the same entries in
        // the same order after any sequence of pushes, puts and gets.
        #[test]
        fn behaves_like_a_full_size_lru(bound in 1usize..300, ops in prop::collection::vec((0u8..3, 0u16..400), 0..2000)) {
            let mut ours = GrowingLru::new(nz(bound));
            let mut theirs = LruCache::new(nz(bound));
            for (op, k) in ops {
                match op {
                    0 => prop_assert_eq!(ours.push(k, k), theirs.push(k, k)),
                    1 => prop_assert_eq!(ours.put(k, k), theirs.put(k, k)),
                    _ => prop_assert_eq!(ours.get(&k), theirs.get(&k)),
                }
                prop_assert!(ours.len() <= bound);
            }
            let a: Vec<_> = ours.iter().map(|(k, v)| (*k, *v)).collect();
            let b: Vec<_> = theirs.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(a, b);
        }
    }
}
