//! Classic BPF for seccomp: the instruction format, a tiny assembler with
//! symbolic forward labels, and (in tests) an interpreter.
//!
//! Conditional jumps in classic BPF have 8-bit offsets (at most 255
//! instructions forward); the assembler places the program back to front,
//! so every target is already placed when a jump to it is, and inserts an
//! unconditional `ja` (32-bit offset) as a trampoline when a target is out
//! of reach.

/// The kernel's limit on a filter's length (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

// Instruction classes and fields (linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_AND: u16 = 0x50;
const BPF_JA: u16 = 0x00;
const BPF_K: u16 = 0x00;

/// `A = *(u32 *)(seccomp_data + k)`.
pub const LD_ABS: u16 = BPF_LD | BPF_W | BPF_ABS;
/// `A &= k`.
pub const AND_K: u16 = BPF_ALU | BPF_AND | BPF_K;
/// `pc += k`.
pub const JA: u16 = BPF_JMP | BPF_JA;
/// `pc += (A == k) ? jt : jf`.
pub const JEQ: u16 = BPF_JMP | 0x10 | BPF_K;
/// `pc += (A > k) ? jt : jf` (unsigned).
pub const JGT: u16 = BPF_JMP | 0x20 | BPF_K;
/// `pc += (A >= k) ? jt : jf` (unsigned).
pub const JGE: u16 = BPF_JMP | 0x30 | BPF_K;
/// `return k`.
pub const RET_K: u16 = BPF_RET | BPF_K;

/// One instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Offset if true.
    pub jt: u8,
    /// Offset if false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// `struct sock_fprog`.
#[repr(C)]
pub struct SockFprog {
    /// Number of instructions.
    pub len: u16,
    /// The instructions.
    pub filter: *const SockFilter,
}

/// Errors of the assembler (bugs of the compiler, or a too long program).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BpfError {
    /// More than [`MAX_INSNS`] instructions.
    #[error("the program has {0} instructions, more than the kernel's limit of 4096")]
    TooLong(usize),
    /// A jump to a label that was never placed, or placed behind the jump.
    #[error("jump to an unplaced or backward label {0}")]
    BadLabel(usize),
}

/// A jump target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label(usize);

#[derive(Debug)]
enum Item {
    Stmt(u16, u32),
    Jump {
        code: u16,
        k: u32,
        jt: Label,
        jf: Label,
    },
    Mark(Label),
}

/// A program under construction.
#[derive(Debug, Default)]
pub struct Asm {
    items: Vec<Item>,
    labels: usize,
}

impl Asm {
    /// A new label, to be placed with [`Asm::mark`] after the jumps to it.
    pub fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }

    /// Places `l` before the next instruction.
    pub fn mark(&mut self, l: Label) {
        self.items.push(Item::Mark(l));
    }

    /// `A = 32-bit word at offset` of `seccomp_data`.
    pub fn load(&mut self, offset: u32) {
        self.items.push(Item::Stmt(LD_ABS, offset));
    }

    /// `A &= k`.
    pub fn and(&mut self, k: u32) {
        self.items.push(Item::Stmt(AND_K, k));
    }

    /// `return k`.
    pub fn ret(&mut self, k: u32) {
        self.items.push(Item::Stmt(RET_K, k));
    }

    /// Conditional jump (`JEQ`, `JGT`, `JGE`) comparing A with `k`.
    pub fn jump(&mut self, code: u16, k: u32, jt: Label, jf: Label) {
        self.items.push(Item::Jump { code, k, jt, jf });
    }

    /// Resolves the labels into offsets.
    pub fn assemble(self) -> Result<Vec<SockFilter>, BpfError> {
        // `at[l]`: number of instructions from l's target to the end of
        // the program (the target is `rev[at[l] - 1]`).
        let mut at: Vec<Option<usize>> = vec![None; self.labels];
        let mut rev: Vec<SockFilter> = Vec::with_capacity(self.items.len());
        let target = |at: &[Option<usize>], l: Label| -> Result<usize, BpfError> {
            match at.get(l.0).copied().flatten() {
                Some(d) if d > 0 => Ok(d),
                _ => Err(BpfError::BadLabel(l.0)),
            }
        };
        let ja = |rev: &Vec<SockFilter>, d: usize| -> Result<SockFilter, BpfError> {
            Ok(SockFilter {
                code: JA,
                jt: 0,
                jf: 0,
                k: u32::try_from(rev.len() - d).map_err(|_| BpfError::TooLong(rev.len()))?,
            })
        };
        for item in self.items.iter().rev() {
            match *item {
                Item::Mark(l) => {
                    if let Some(slot) = at.get_mut(l.0) {
                        *slot = Some(rev.len());
                    }
                }
                Item::Stmt(code, k) => rev.push(SockFilter {
                    code,
                    jt: 0,
                    jf: 0,
                    k,
                }),
                Item::Jump { code, k, jt, jf } => {
                    // A trampoline when the target could be out of reach
                    // once up to two trampolines sit in between.
                    let mut reach = |d: usize| -> Result<usize, BpfError> {
                        if rev.len() + 2 - d > usize::from(u8::MAX) {
                            let insn = ja(&rev, d)?;
                            rev.push(insn);
                            Ok(rev.len())
                        } else {
                            Ok(d)
                        }
                    };
                    let f = reach(target(&at, jf)?)?;
                    let t = reach(target(&at, jt)?)?;
                    let off =
                        |d: usize| u8::try_from(rev.len() - d).map_err(|_| BpfError::BadLabel(0));
                    let insn = SockFilter {
                        code,
                        jt: off(t)?,
                        jf: off(f)?,
                        k,
                    };
                    rev.push(insn);
                }
            }
            if rev.len() > MAX_INSNS {
                return Err(BpfError::TooLong(rev.len()));
            }
        }
        rev.reverse();
        Ok(rev)
    }
}

/// `struct seccomp_data` for the interpreter.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SeccompData {
    /// System call number.
    pub nr: u32,
    /// AUDIT_ARCH_*.
    pub arch: u32,
    /// Instruction pointer.
    pub ip: u64,
    /// Arguments.
    pub args: [u64; 6],
}

#[cfg(test)]
impl SeccompData {
    fn word(&self, off: u32) -> Option<u32> {
        let lo = |v: u64| (v & 0xffff_ffff) as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match off {
            0 => Some(self.nr),
            4 => Some(self.arch),
            8 => Some(lo(self.ip)),
            12 => Some(hi(self.ip)),
            16..=63 if off.is_multiple_of(4) => {
                let a = self.args[((off - 16) / 8) as usize];
                Some(if off.is_multiple_of(8) { lo(a) } else { hi(a) })
            }
            _ => None,
        }
    }
}

/// Runs `prog` on `data` like the kernel: the return value and the number
/// of instructions executed. Panics on what the kernel's checker refuses.
#[cfg(test)]
pub fn run(prog: &[SockFilter], data: &SeccompData) -> (u32, usize) {
    let mut a: u32 = 0;
    let mut pc = 0usize;
    let mut steps = 0usize;
    loop {
        let i = prog[pc];
        steps += 1;
        pc += 1;
        match i.code {
            LD_ABS => a = data.word(i.k).expect("bad load offset"),
            AND_K => a &= i.k,
            RET_K => return (i.k, steps),
            JA => pc += i.k as usize,
            JEQ | JGT | JGE => {
                let c = match i.code {
                    JEQ => a == i.k,
                    JGT => a > i.k,
                    _ => a >= i.k,
                };
                pc += usize::from(if c { i.jt } else { i.jf });
            }
            c => panic!("unexpected opcode {c:#x}"),
        }
        assert!(pc < prog.len(), "fell off the end");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_targets_get_trampolines() {
        let mut asm = Asm::default();
        let far = asm.label();
        let near = asm.label();
        asm.load(0);
        asm.jump(JEQ, 7, far, near);
        asm.mark(near);
        for _ in 0..300 {
            asm.ret(1);
        }
        asm.mark(far);
        asm.ret(2);
        let prog = asm.assemble().unwrap();
        assert_eq!(prog.len(), 304);
        let data = |nr| SeccompData {
            nr,
            ..SeccompData::default()
        };
        assert_eq!(run(&prog, &data(7)).0, 2);
        assert_eq!(run(&prog, &data(8)).0, 1);
    }

    #[test]
    fn unplaced_labels_and_long_programs_are_errors() {
        let mut asm = Asm::default();
        let l = asm.label();
        asm.jump(JEQ, 0, l, l);
        asm.ret(0);
        assert_eq!(asm.assemble(), Err(BpfError::BadLabel(0)));
        let mut asm = Asm::default();
        for _ in 0..=MAX_INSNS {
            asm.ret(0);
        }
        assert!(matches!(asm.assemble(), Err(BpfError::TooLong(_))));
    }
}
