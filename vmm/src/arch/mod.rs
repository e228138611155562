//! x86_64 specifics: guest physical memory layout, boot protocol structures,
//! CPU register, CPUID and MSR set-up, and the MP table.
//!
//! vessel only runs on x86_64 hosts for now.

pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
