//! Kernel symbols from `/proc/kallsyms`. Addresses there are already
//! relocated (KASLR applied), so they match what `bpf_get_stack` returns.

/// A sorted kernel symbol table. Names live in one arena: a kernel has
/// ~200k text symbols, and a `String` each would cost ~5 MB of headers and
/// allocator slack in an agent that aims to stay under 50 MB.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// (address, name start, name end in `names`), sorted by address.
    syms: Vec<(u64, u32, u32)>,
    names: String,
}

impl KernelSymbols {
    /// Parses kallsyms text. Only text symbols (`t`/`T`, `w`/`W`) are kept;
    /// lines that do not parse are skipped. All-zero addresses (what an
    /// unprivileged reader sees) are dropped, leaving an empty table.
    pub fn parse(text: &str) -> Self {
        Self::from_lines(text.lines())
    }

    fn from_lines<L: AsRef<str>>(lines: impl Iterator<Item = L>) -> Self {
        let mut names = String::new();
        let mut syms: Vec<(u64, u32, u32)> = Vec::new();
        for line in lines {
            let line = line.as_ref();
            let mut it = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else { continue };
            let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
            if addr == 0 || !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let start = names.len();
            names.push_str(name);
            let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(names.len())) else { break };
            syms.push((addr, start, end));
        }
        syms.sort_unstable_by_key(|s| s.0);
        syms.shrink_to_fit();
        names.shrink_to_fit();
        Self { syms, names }
    }

    /// Reads `/proc/kallsyms` line by line (the file is ~12 MB of text; it
    /// is never held whole); an empty table if it cannot be read.
    pub fn load() -> Self {
        use std::io::BufRead;
        match std::fs::File::open("/proc/kallsyms") {
            Ok(f) => Self::from_lines(std::io::BufReader::new(f).lines().map_while(Result::ok)),
            Err(_) => Self::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// The symbol containing `addr`: the last one starting at or below it.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let i = self.syms.partition_point(|s| s.0 <= addr);
        let &(_, start, end) = self.syms.get(i.checked_sub(1)?)?;
        self.names.get(start as usize..end as usize)
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
