//! A bounded cache of symbolization results keyed by file identity and file
//! offset, so each unique address of each binary is resolved once across
//! intervals and across every process that maps the same file.

use std::{num::NonZeroUsize, sync::Arc};

use crate::bounded::GrowingLru;

use crate::process::FileKey;

/// One function at an address: the real one, or one inlined into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymFrame {
    pub name: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Inlined into the next frame of the list.
    pub inlined: bool,
}

/// Frames at one address, innermost (most deeply inlined) first. Empty when
/// no symbol covers the address; that answer is cached too.
pub type Resolved = Arc<[SymFrame]>;

/// Hit, miss and eviction counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// LRU cache of [`Resolved`] addresses.
pub struct SymbolCache {
    entries: GrowingLru<(FileKey, u64), Resolved>,
    stats: CacheStats,
}

impl SymbolCache {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self { entries: GrowingLru::new(capacity), stats: CacheStats::default() }
    }

    /// Looks up an address, counting a hit or a miss.
    pub fn get(&mut self, file: &FileKey, offset: u64) -> Option<Resolved> {
        // The key is cloned for the lookup; build ids are 20 bytes, so this
        // is cheaper than an entry API over borrowed keys would save.
        match self.entries.get(&(file.clone(), offset)) {
            Some(r) => {
                self.stats.hits += 1;
                Some(r.clone())
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Stores a result, evicting the least recently used one when full.
    pub fn insert(&mut self, file: FileKey, offset: u64, resolved: Resolved) {
        let key = (file, offset);
        let replaced_same = self.entries.contains(&key);
        if self.entries.push(key, resolved).is_some() && !replaced_same {
            self.stats.evictions += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str) -> Resolved {
        Arc::from(vec![SymFrame { name: name.into(), file: None, line: None, inlined: false }])
    }

    #[test]
    fn counts_hits_misses_and_evictions() {
        let f = FileKey::BuildId(vec![1, 2, 3]);
        let g = FileKey::Inode { dev: 1, inode: 2, mtime: 3 };
        let mut c = SymbolCache::new(NonZeroUsize::new(2).unwrap());
        assert!(c.get(&f, 0x10).is_none());
        c.insert(f.clone(), 0x10, frame("a"));
        c.insert(g.clone(), 0x10, frame("b"));
        assert_eq!(c.get(&f, 0x10).unwrap()[0].name, "a");
        assert_eq!(c.get(&g, 0x10).unwrap()[0].name, "b", "same offset, other file");
        // f was used before g, so f is the least recently used and goes.
        c.insert(f.clone(), 0x20, frame("c"));
        assert!(c.get(&f, 0x10).is_none());
        assert_eq!(c.stats(), CacheStats { hits: 2, misses: 2, evictions: 1 });
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn replacing_a_key_is_not_an_eviction() {
        let f = FileKey::BuildId(vec![9]);
        let mut c = SymbolCache::new(NonZeroUsize::new(1).unwrap());
        c.insert(f.clone(), 1, frame("a"));
        c.insert(f.clone(), 1, frame("b"));
        assert_eq!(c.stats().evictions, 0);
        assert_eq!(c.get(&f, 1).unwrap()[0].name, "b");
    }
}
