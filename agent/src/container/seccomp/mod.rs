//! OCI `linux.seccomp` compiled to a classic BPF program, loaded by the
//! container's process right before `execve` (see `child.rs`).
//!
//! Our own compiler, not `seccompiler` (rust-vmm): a `SeccompFilter` there
//! has one `match_action` for the whole filter and a mismatch action, so
//! an OCI profile (one action per rule, a per-rule errno, e.g. Docker's
//! `clone3` -> `ERRNO(ENOSYS)` next to hundreds of `ALLOW`s under a
//! default `ERRNO(EPERM)`) would need one filter per distinct action,
//! stacked, each run on every system call, with the kernel's precedence
//! between filters instead of the profile's. No libseccomp either (C).
//!
//! Shape of the program:
//!
//! 1. `arch` check: not x86_64 -> `KILL_PROCESS` (the guest kernel has no
//!    32-bit emulation; if the profile lists `SCMP_ARCH_X86`, i386 calls
//!    get `ERRNO(ENOSYS)`, what the kernel would answer without IA32).
//! 2. x32 calls (`nr & 0x40000000`) -> `KILL_PROCESS`, or `ERRNO(ENOSYS)`
//!    when the profile lists `SCMP_ARCH_X32` (we have no x32 table and the
//!    guest kernel no x32 ABI); `nr == -1` (a tracer skipped the call)
//!    gets the default action.
//! 3. A binary search (`jge`) over runs of consecutive system call numbers
//!    with the same outcome (gaps take the default action): leaves are a
//!    `ret` or, for calls with argument rules, a chain of comparisons.
//!    Docker's default profile: 170 instructions, 11 executed per allowed
//!    call on average (17 at most).
//!
//! Semantics, following runc + libseccomp: names unknown to the x86_64
//! table are skipped; a rule whose action equals the default action is
//! skipped; the conditions of a rule are ANDed, except that several
//! conditions on the same argument index become separate rules (ORed), as
//! runc does; for one call, its rules with conditions are tried in profile
//! order and the first match decides, then its unconditional rule (the
//! first one) applies, else the default action. Arguments are compared as
//! 64-bit unsigned values (two 32-bit words).

pub mod bpf;
mod syscalls;

use serde::Deserialize;
use serde_json::Value;

use bpf::{Asm, BpfError, Label, SockFilter, SockFprog, JEQ, JGE, JGT};

/// Errors in `linux.seccomp`.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Not a seccomp object.
    #[error("linux.seccomp is invalid")]
    Json(#[source] serde_json::Error),
    /// A bad value.
    #[error("linux.seccomp: {0}")]
    Invalid(String),
    /// Valid but not implemented.
    #[error("linux.seccomp: {0}")]
    Unsupported(String),
    /// The program cannot be built.
    #[error("linux.seccomp")]
    Program(#[source] BpfError),
}

fn invalid(msg: impl Into<String>) -> SeccompError {
    SeccompError::Invalid(msg.into())
}

/// `linux.seccomp`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: String,
    default_errno_ret: Option<u32>,
    architectures: Option<Vec<String>>,
    flags: Option<Vec<String>>,
    listener_path: Option<String>,
    syscalls: Option<Vec<Rule>>,
}

/// One entry of `syscalls`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    names: Option<Vec<String>>,
    action: String,
    errno_ret: Option<u32>,
    args: Option<Vec<Arg>>,
}

/// One argument condition.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Arg {
    index: u32,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: Op,
}

/// `SCMP_CMP_*`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
enum Op {
    #[serde(rename = "SCMP_CMP_NE")]
    Ne,
    #[serde(rename = "SCMP_CMP_LT")]
    Lt,
    #[serde(rename = "SCMP_CMP_LE")]
    Le,
    #[serde(rename = "SCMP_CMP_EQ")]
    Eq,
    #[serde(rename = "SCMP_CMP_GE")]
    Ge,
    #[serde(rename = "SCMP_CMP_GT")]
    Gt,
    #[serde(rename = "SCMP_CMP_MASKED_EQ")]
    MaskedEq,
}

/// `SECCOMP_RET_*` values.
mod ret {
    pub const KILL_PROCESS: u32 = 0x8000_0000;
    pub const KILL_THREAD: u32 = 0;
    pub const TRAP: u32 = 0x0003_0000;
    pub const ERRNO: u32 = 0x0005_0000;
    pub const TRACE: u32 = 0x7ff0_0000;
    pub const LOG: u32 = 0x7ffc_0000;
    pub const ALLOW: u32 = 0x7fff_0000;
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `seccomp(2)` operation and flags.
const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
const FLAG_TSYNC: libc::c_ulong = 1;
const FLAG_LOG: libc::c_ulong = 2;
const FLAG_SPEC_ALLOW: libc::c_ulong = 4;

/// An action as the `SECCOMP_RET_*` value of a `ret` instruction.
fn action(name: &str, errno: Option<u32>, what: &str) -> Result<u32, SeccompError> {
    let data = |default: u32| -> Result<u32, SeccompError> {
        let v = errno.unwrap_or(default);
        if v > 0xffff {
            return Err(invalid(format!("{what}: errnoRet {v} out of 0..=65535")));
        }
        Ok(v)
    };
    let no_data = |k: u32| -> Result<u32, SeccompError> {
        match errno {
            Some(_) => Err(invalid(format!(
                "{what}: errnoRet is only valid with SCMP_ACT_ERRNO and SCMP_ACT_TRACE"
            ))),
            None => Ok(k),
        }
    };
    match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => no_data(ret::KILL_THREAD),
        "SCMP_ACT_KILL_PROCESS" => no_data(ret::KILL_PROCESS),
        "SCMP_ACT_TRAP" => no_data(ret::TRAP),
        "SCMP_ACT_ERRNO" => Ok(ret::ERRNO | data(libc::EPERM as u32)?),
        "SCMP_ACT_TRACE" => Ok(ret::TRACE | data(libc::EPERM as u32)?),
        "SCMP_ACT_ALLOW" => no_data(ret::ALLOW),
        "SCMP_ACT_LOG" => no_data(ret::LOG),
        "SCMP_ACT_NOTIFY" => Err(SeccompError::Unsupported(format!(
            "{what}: SCMP_ACT_NOTIFY (no seccomp listener support)"
        ))),
        other => Err(invalid(format!("{what}: unknown action {other:?}"))),
    }
}

/// A compiled filter, ready to load.
#[derive(Debug)]
pub struct Filter {
    program: Vec<SockFilter>,
    flags: libc::c_ulong,
}

impl Filter {
    /// The instructions.
    pub fn program(&self) -> &[SockFilter] {
        &self.program
    }

    /// Installs the filter on the calling thread with `seccomp(2)` (the
    /// flags of the profile). Without `no_new_privs` this needs
    /// `CAP_SYS_ADMIN`. Does not allocate (callable in the cloned child).
    pub fn load(&self) -> Result<(), i32> {
        let prog = SockFprog {
            // At most MAX_INSNS (checked when compiled).
            len: u16::try_from(self.program.len()).unwrap_or(u16::MAX),
            filter: self.program.as_ptr(),
        };
        // SAFETY: `prog` points to a live, valid program for the duration
        // of the call; the kernel copies it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const SockFprog,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            // SAFETY: reads the thread's errno.
            Err(unsafe { *libc::__errno_location() })
        }
    }
}

/// What happens to one system call number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// `ret` this value.
    Ret(u32),
    /// Argument rules: index into the chains.
    Chain(usize),
}

/// The rules of one system call that has argument conditions.
#[derive(Debug, Default)]
struct Chain {
    /// (alternatives ORed, each a list of ANDed conditions; action).
    rules: Vec<(Vec<Vec<Arg>>, u32)>,
    /// The unconditional rule's action.
    fallback: Option<u32>,
}

/// Compiles `linux.seccomp`.
pub fn compile(value: &Value) -> Result<Filter, SeccompError> {
    let profile: Profile = serde_json::from_value(value.clone()).map_err(SeccompError::Json)?;
    let default = action(
        &profile.default_action,
        profile.default_errno_ret,
        "defaultAction",
    )?;
    let (mut x86, mut x32) = (false, false);
    for a in profile.architectures.iter().flatten() {
        match a.as_str() {
            "SCMP_ARCH_X86_64" => {}
            "SCMP_ARCH_X86" => x86 = true,
            "SCMP_ARCH_X32" => x32 = true,
            // Other machines' architectures: a process in this guest
            // cannot make their system calls.
            "SCMP_ARCH_ARM"
            | "SCMP_ARCH_AARCH64"
            | "SCMP_ARCH_MIPS"
            | "SCMP_ARCH_MIPS64"
            | "SCMP_ARCH_MIPS64N32"
            | "SCMP_ARCH_MIPSEL"
            | "SCMP_ARCH_MIPSEL64"
            | "SCMP_ARCH_MIPSEL64N32"
            | "SCMP_ARCH_PPC"
            | "SCMP_ARCH_PPC64"
            | "SCMP_ARCH_PPC64LE"
            | "SCMP_ARCH_S390"
            | "SCMP_ARCH_S390X"
            | "SCMP_ARCH_PARISC"
            | "SCMP_ARCH_PARISC64"
            | "SCMP_ARCH_RISCV64"
            | "SCMP_ARCH_LOONGARCH64"
            | "SCMP_ARCH_M68K"
            | "SCMP_ARCH_SH"
            | "SCMP_ARCH_SHEB" => {}
            other => return Err(invalid(format!("unknown architecture {other:?}"))),
        }
    }
    let mut flags = 0;
    for f in profile.flags.iter().flatten() {
        flags |= match f.as_str() {
            "SECCOMP_FILTER_FLAG_TSYNC" => FLAG_TSYNC,
            "SECCOMP_FILTER_FLAG_LOG" => FLAG_LOG,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => FLAG_SPEC_ALLOW,
            "SECCOMP_FILTER_FLAG_NEW_LISTENER"
            | "SECCOMP_FILTER_FLAG_TSYNC_ESRCH"
            | "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV" => {
                return Err(SeccompError::Unsupported(format!("flag {f}")))
            }
            other => return Err(invalid(format!("unknown flag {other:?}"))),
        };
    }
    if profile
        .listener_path
        .as_deref()
        .is_some_and(|p| !p.is_empty())
    {
        return Err(SeccompError::Unsupported(
            "listenerPath (no seccomp listener support)".into(),
        ));
    }

    // Per system call number: unconditional action, conditional rules.
    let mut chains: std::collections::BTreeMap<u32, Chain> = Default::default();
    for (i, rule) in profile.syscalls.iter().flatten().enumerate() {
        let what = format!("syscalls[{i}]");
        let act = action(&rule.action, rule.errno_ret, &what)?;
        let args = rule.args.as_deref().unwrap_or_default();
        for a in args {
            if a.index > 5 {
                return Err(invalid(format!(
                    "{what}: argument index {} out of 0..=5",
                    a.index
                )));
            }
        }
        let names = rule.names.as_deref().unwrap_or_default();
        if names.is_empty() {
            return Err(invalid(format!("{what}: no names")));
        }
        if act == default {
            continue;
        }
        let same_index = args
            .iter()
            .enumerate()
            .any(|(j, a)| args[..j].iter().any(|b| b.index == a.index));
        let alternatives: Vec<Vec<Arg>> = if same_index {
            args.iter().map(|a| vec![*a]).collect()
        } else {
            vec![args.to_vec()]
        };
        for name in names {
            let Some(nr) = syscalls::number(name) else {
                continue;
            };
            let chain = chains.entry(nr).or_default();
            if args.is_empty() {
                chain.fallback.get_or_insert(act);
            } else {
                chain.rules.push((alternatives.clone(), act));
            }
        }
    }

    // Runs of numbers with the same outcome over [0, X32_SYSCALL_BIT).
    let mut complex: Vec<&Chain> = Vec::new();
    let mut runs: Vec<(u32, Outcome)> = vec![(0, Outcome::Ret(default))];
    let push = |runs: &mut Vec<(u32, Outcome)>, start: u32, o: Outcome| match runs.last_mut() {
        Some(last) if last.1 == o => {}
        Some(last) if last.0 == start => last.1 = o,
        _ => runs.push((start, o)),
    };
    for (&nr, chain) in &chains {
        let o = if chain.rules.is_empty() {
            Outcome::Ret(chain.fallback.unwrap_or(default))
        } else {
            complex.push(chain);
            Outcome::Chain(complex.len() - 1)
        };
        push(&mut runs, nr, o);
        push(&mut runs, nr + 1, Outcome::Ret(default));
    }
    // A merge can leave two equal neighbours when a chain replaced a
    // default run start; drop them.
    runs.dedup_by(|b, a| a.1 == b.1 && matches!(a.1, Outcome::Ret(_)));

    let mut asm = Asm::default();
    let native = asm.label();
    let foreign = asm.label();
    asm.load(4);
    asm.jump(JEQ, AUDIT_ARCH_X86_64, native, foreign);
    asm.mark(foreign);
    if x86 {
        let i386 = asm.label();
        let kill = asm.label();
        asm.jump(JEQ, AUDIT_ARCH_I386, i386, kill);
        asm.mark(i386);
        asm.ret(ret::ERRNO | libc::ENOSYS as u32);
        asm.mark(kill);
    }
    asm.ret(ret::KILL_PROCESS);
    asm.mark(native);
    asm.load(0);
    let x32_label = asm.label();
    let tree = asm.label();
    asm.jump(JGE, X32_SYSCALL_BIT, x32_label, tree);
    asm.mark(tree);
    emit_tree(&mut asm, &runs, &complex, default);
    asm.mark(x32_label);
    // -1: a tracer skipping the call (seen by seccomp after ptrace since
    // Linux 4.8); no rule names it, so the default action, as libseccomp.
    let skipped = asm.label();
    let not_skipped = asm.label();
    asm.jump(JEQ, u32::MAX, skipped, not_skipped);
    asm.mark(skipped);
    asm.ret(default);
    asm.mark(not_skipped);
    asm.ret(if x32 {
        ret::ERRNO | libc::ENOSYS as u32
    } else {
        ret::KILL_PROCESS
    });
    let program = asm.assemble().map_err(SeccompError::Program)?;
    Ok(Filter { program, flags })
}

/// Binary search over `runs` (sorted by start; the first starts at the
/// lowest number that can reach here). `A` holds the system call number.
fn emit_tree(asm: &mut Asm, runs: &[(u32, Outcome)], chains: &[&Chain], default: u32) {
    match runs {
        [] => asm.ret(default),
        [(_, o)] => match *o {
            Outcome::Ret(k) => asm.ret(k),
            Outcome::Chain(i) => match chains.get(i) {
                Some(c) => emit_chain(asm, c, default),
                None => asm.ret(default),
            },
        },
        _ => {
            let mid = runs.len() / 2;
            let (left, right) = runs.split_at(mid);
            let l = asm.label();
            let r = asm.label();
            asm.jump(JGE, right[0].0, r, l);
            asm.mark(l);
            emit_tree(asm, left, chains, default);
            asm.mark(r);
            emit_tree(asm, right, chains, default);
        }
    }
}

/// The argument rules of one system call.
fn emit_chain(asm: &mut Asm, chain: &Chain, default: u32) {
    for (alternatives, act) in &chain.rules {
        for conds in alternatives {
            let next = asm.label();
            for c in conds {
                let ok = asm.label();
                emit_cond(asm, c, ok, next);
                asm.mark(ok);
            }
            asm.ret(*act);
            asm.mark(next);
        }
    }
    asm.ret(chain.fallback.unwrap_or(default));
}

/// One 64-bit comparison of argument `c.index`: to `ok` when it holds,
/// else to `fail`.
fn emit_cond(asm: &mut Asm, c: &Arg, ok: Label, fail: Label) {
    let lo_off = 16 + 8 * c.index;
    let hi_off = lo_off + 4;
    let split = |v: u64| ((v >> 32) as u32, (v & 0xffff_ffff) as u32);
    let (vhi, vlo) = split(c.value);
    let lo = asm.label();
    asm.load(hi_off);
    match c.op {
        Op::Eq => {
            asm.jump(JEQ, vhi, lo, fail);
            asm.mark(lo);
            asm.load(lo_off);
            asm.jump(JEQ, vlo, ok, fail);
        }
        Op::Ne => {
            asm.jump(JEQ, vhi, lo, ok);
            asm.mark(lo);
            asm.load(lo_off);
            asm.jump(JEQ, vlo, fail, ok);
        }
        Op::Gt | Op::Ge => {
            let eq = asm.label();
            asm.jump(JGT, vhi, ok, eq);
            asm.mark(eq);
            asm.jump(JEQ, vhi, lo, fail);
            asm.mark(lo);
            asm.load(lo_off);
            asm.jump(if c.op == Op::Gt { JGT } else { JGE }, vlo, ok, fail);
        }
        Op::Lt | Op::Le => {
            let eq = asm.label();
            asm.jump(JGT, vhi, fail, eq);
            asm.mark(eq);
            asm.jump(JEQ, vhi, lo, ok);
            asm.mark(lo);
            asm.load(lo_off);
            // lo < v  <=>  !(lo >= v);  lo <= v  <=>  !(lo > v)
            asm.jump(if c.op == Op::Lt { JGE } else { JGT }, vlo, fail, ok);
        }
        Op::MaskedEq => {
            let (mhi, mlo) = (vhi, vlo);
            let (whi, wlo) = split(c.value_two);
            asm.and(mhi);
            asm.jump(JEQ, whi, lo, fail);
            asm.mark(lo);
            asm.load(lo_off);
            asm.and(mlo);
            asm.jump(JEQ, wlo, ok, fail);
        }
    }
}

#[cfg(test)]
mod tests;
