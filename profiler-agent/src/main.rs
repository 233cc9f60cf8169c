fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));
    let mut ebpf = aya::Ebpf::load(obj).unwrap();
    for (n, _) in ebpf.programs() { println!("{n}"); }
}
