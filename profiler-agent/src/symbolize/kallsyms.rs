//! Kernel symbols from `/proc/kallsyms`. Addresses there are already
//! relocated (KASLR applied), so they match what `bpf_get_stack` returns.

/// A sorted kernel symbol table.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// (address, name), sorted by address.
    syms: Vec<(u64, String)>,
}

impl KernelSymbols {
    /// Parses kallsyms text. Only text symbols (`t`/`T`, `w`/`W`) are kept;
    /// lines that do not parse are skipped. All-zero addresses (what an
    /// unprivileged reader sees) are dropped, leaving an empty table.
    pub fn parse(text: &str) -> Self {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut it = line.split_ascii_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                let text_sym = matches!(kind, "t" | "T" | "w" | "W");
                (addr != 0 && text_sym).then(|| (addr, name.to_owned()))
            })
            .collect();
        syms.sort_unstable_by_key(|s| s.0);
        Self { syms }
    }

    /// Reads `/proc/kallsyms`; an empty table if it cannot be read.
    pub fn load() -> Self {
        std::fs::read_to_string("/proc/kallsyms").map(|t| Self::parse(&t)).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// The symbol containing `addr`: the last one starting at or below it.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let i = self.syms.partition_point(|s| s.0 <= addr);
        Some(self.syms.get(i.checked_sub(1)?)?.1.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_the_enclosing_symbol() {
        let k = KernelSymbols::parse(
            "ffffffff81000000 T _stext\nffffffff81000100 t do_one\nffffffff81000200 D some_data\n\
             ffffffff81000300 T x64_sys_call\tffffffffc0000000 [kvm]\nbroken line\n",
        );
        assert_eq!(k.lookup(0xffffffff81000150), Some("do_one"));
        assert_eq!(k.lookup(0xffffffff81000250), Some("do_one"), "data symbols are skipped");
        assert_eq!(k.lookup(0xffffffff81000300), Some("x64_sys_call"));
        assert_eq!(k.lookup(0x10), None);
    }

    #[test]
    fn zeroed_addresses_give_an_empty_table() {
        assert!(KernelSymbols::parse("0000000000000000 T _stext\n").is_empty());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*", addr in any::<u64>()) {
            let _ = KernelSymbols::parse(&s).lookup(addr);
        }
    }
}
