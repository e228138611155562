//! Strips the symbol table from the release agent for the guest (musl):
//! the binary is copied into every initramfs, which the guest kernel unpacks
//! at emulated speed on some hosts, and symbols are of no use there.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let musl = std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl");
    if release && musl {
        println!("cargo::rustc-link-arg-bins=-Wl,--strip-all");
    }
}
