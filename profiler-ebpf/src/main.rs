//! The profiler's kernel programs. One module per program family; shared
//! maps live in `maps.rs`.
#![no_std]
#![no_main]
// Atomic adds on shared map values (`offcpu::atomic_add`); the crate is
// built with nightly anyway (build-std).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod filter;
mod maps;
mod offcpu;
mod oncpu;
mod probe;
mod process;
mod python;
mod stack;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach a panic, so this is never
    // executed; it only satisfies `no_std`.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
