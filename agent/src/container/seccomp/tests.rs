//! The compiler checked with a BPF interpreter on synthetic
//! `seccomp_data`, plus one filter loaded for real in a forked child.

use serde_json::json;

use super::bpf::{run, SeccompData};
use super::*;

const EPERM: u32 = ret::ERRNO | 1;

fn call(nr: u32, args: [u64; 6]) -> SeccompData {
    SeccompData {
        nr,
        arch: AUDIT_ARCH_X86_64,
        ip: 0,
        args,
    }
}

fn eval(f: &Filter, nr: u32, args: [u64; 6]) -> u32 {
    run(f.program(), &call(nr, args)).0
}

fn nr(name: &str) -> u32 {
    syscalls::number(name).unwrap()
}

#[test]
fn deny_list_with_custom_errno() {
    let f = compile(&json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42},
            {"names": ["chown32", "no_such_call"], "action": "SCMP_ACT_KILL"},
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["uname"], "action": "SCMP_ACT_TRACE", "errnoRet": 7},
            {"names": ["sync"], "action": "SCMP_ACT_TRAP"},
            {"names": ["syncfs"], "action": "SCMP_ACT_LOG"},
            {"names": ["rmdir"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
        ]
    }))
    .unwrap();
    let z = [0; 6];
    assert_eq!(eval(&f, nr("mkdir"), z), ret::ERRNO | 42);
    assert_eq!(eval(&f, nr("mkdirat"), z), ret::ERRNO | 42);
    assert_eq!(eval(&f, nr("rmdir"), z), EPERM);
    assert_eq!(eval(&f, nr("getppid"), z), ret::KILL_PROCESS);
    assert_eq!(eval(&f, nr("uname"), z), ret::TRACE | 7);
    assert_eq!(eval(&f, nr("sync"), z), ret::TRAP);
    assert_eq!(eval(&f, nr("syncfs"), z), ret::LOG);
    for n in [0, 1, 2, 82, 84, 300, 462, 463, 1000, 0x3fff_ffff] {
        if n != nr("rmdir") {
            assert_eq!(eval(&f, n, z), ret::ALLOW, "nr {n}");
        }
    }
    // Foreign architecture and x32 calls: not listed -> kill.
    let mut d = call(nr("getpid"), z);
    d.arch = AUDIT_ARCH_I386;
    assert_eq!(run(f.program(), &d).0, ret::KILL_PROCESS);
    assert_eq!(eval(&f, X32_SYSCALL_BIT | 39, z), ret::KILL_PROCESS);
    assert_eq!(eval(&f, u32::MAX, z), ret::ALLOW);
    assert_eq!(f.flags, 0);
}

#[test]
fn listed_x86_and_x32_get_enosys_and_flags_are_kept() {
    let f = compile(&json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
        "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]
    }))
    .unwrap();
    let enosys = ret::ERRNO | libc::ENOSYS as u32;
    let mut d = call(0, [0; 6]);
    d.arch = AUDIT_ARCH_I386;
    assert_eq!(run(f.program(), &d).0, enosys);
    d.arch = 0xc000_00b7; // aarch64
    assert_eq!(run(f.program(), &d).0, ret::KILL_PROCESS);
    assert_eq!(eval(&f, X32_SYSCALL_BIT, [0; 6]), enosys);
    assert_eq!(eval(&f, 0, [0; 6]), ret::ALLOW);
    assert_eq!(eval(&f, 1, [0; 6]), EPERM);
    assert_eq!(f.flags, 7);
}

/// Every operator against a reference evaluation, on values around the
/// 32-bit word boundaries.
#[test]
fn argument_comparisons_are_64_bit() {
    let values: [u64; 10] = [
        0,
        1,
        0xffff_fffe,
        0xffff_ffff,
        0x1_0000_0000,
        0x1_0000_0001,
        0x2_0000_0000,
        0xffff_ffff_0000_0000,
        0xffff_ffff_ffff_ffff,
        0x7e02_0000,
    ];
    type Reference = fn(u64, u64, u64) -> bool;
    let ops: [(&str, Reference); 7] = [
        ("SCMP_CMP_EQ", |a, v, _| a == v),
        ("SCMP_CMP_NE", |a, v, _| a != v),
        ("SCMP_CMP_LT", |a, v, _| a < v),
        ("SCMP_CMP_LE", |a, v, _| a <= v),
        ("SCMP_CMP_GT", |a, v, _| a > v),
        ("SCMP_CMP_GE", |a, v, _| a >= v),
        ("SCMP_CMP_MASKED_EQ", |a, m, w| a & m == w),
    ];
    for (op, reference) in ops {
        for v in values {
            let two = v & 0x1_0000_ffff;
            let f = compile(&json!({
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["ioctl"], "action": "SCMP_ACT_ALLOW",
                              "args": [{"index": 3, "value": v, "valueTwo": two, "op": op}]}]
            }))
            .unwrap();
            for a in values {
                let mut args = [0xdead_beef; 6];
                args[3] = a;
                let want = if reference(a, v, two) {
                    ret::ALLOW
                } else {
                    EPERM
                };
                assert_eq!(
                    eval(&f, nr("ioctl"), args),
                    want,
                    "{op} arg {a:#x} value {v:#x}"
                );
            }
        }
    }
}

#[test]
fn and_within_a_rule_or_on_the_same_index_and_order_of_rules() {
    let f = compile(&json!({
        "defaultAction": "SCMP_ACT_KILL_PROCESS",
        "syscalls": [
            // AND: arg0 == 1 && arg1 > 10.
            {"names": ["kill"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                      {"index": 1, "value": 10, "op": "SCMP_CMP_GT"}]},
            // Same index twice: OR (runc).
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
            // Unconditional rule listed first: conditional rules win.
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97},
            {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]}
        ]
    }))
    .unwrap();
    let a = |x: u64, y: u64| [x, y, 0, 0, 0, 0];
    assert_eq!(eval(&f, nr("kill"), a(1, 11)), ret::ALLOW);
    assert_eq!(eval(&f, nr("kill"), a(1, 10)), ret::KILL_PROCESS);
    assert_eq!(eval(&f, nr("kill"), a(2, 11)), ret::KILL_PROCESS);
    assert_eq!(eval(&f, nr("personality"), a(8, 0)), ret::ALLOW);
    assert_eq!(eval(&f, nr("personality"), a(0, 0)), ret::ALLOW);
    assert_eq!(eval(&f, nr("personality"), a(4, 0)), ret::KILL_PROCESS);
    assert_eq!(eval(&f, nr("socket"), a(1, 0)), ret::ALLOW);
    assert_eq!(eval(&f, nr("socket"), a(2, 0)), ret::ERRNO | 97);
}

/// Docker's default profile (rendered for a container without extra
/// capabilities): size and instructions executed per system call.
#[test]
fn docker_default_profile_is_small_and_fast() {
    let profile: Value = serde_json::from_str(include_str!(
        "../../../../tests/data/seccomp-docker-default.json"
    ))
    .unwrap();
    let f = compile(&profile).unwrap();
    let len = f.program().len();
    let z = [0; 6];
    assert_eq!(eval(&f, nr("read"), z), ret::ALLOW);
    assert_eq!(eval(&f, nr("mkdir"), z), ret::ALLOW);
    assert_eq!(eval(&f, nr("mount"), z), EPERM);
    assert_eq!(eval(&f, nr("unshare"), z), EPERM);
    assert_eq!(eval(&f, nr("clone3"), z), ret::ERRNO | 38);
    assert_eq!(eval(&f, nr("socket"), [40, 0, 0, 0, 0, 0]), EPERM);
    assert_eq!(eval(&f, nr("socket"), [2, 0, 0, 0, 0, 0]), ret::ALLOW);
    // fork(): clone(SIGCHLD) is allowed, clone(CLONE_NEWUSER) is not.
    assert_eq!(eval(&f, nr("clone"), [17, 0, 0, 0, 0, 0]), ret::ALLOW);
    assert_eq!(eval(&f, nr("clone"), [0x1000_0011, 0, 0, 0, 0, 0]), EPERM);
    assert_eq!(
        eval(&f, nr("personality"), [0xffff_ffff, 0, 0, 0, 0, 0]),
        ret::ALLOW
    );
    assert_eq!(eval(&f, nr("personality"), [1, 0, 0, 0, 0, 0]), EPERM);

    let (mut max, mut sum, mut n) = (0, 0, 0);
    for &(_, nr) in syscalls::X86_64 {
        let (r, steps) = run(f.program(), &call(nr, z));
        if r == ret::ALLOW {
            max = max.max(steps);
            sum += steps;
            n += 1;
        }
    }
    eprintln!(
        "docker default profile: {len} instructions; allowed calls ({n}): {:.1} executed on average, {max} at most",
        sum as f64 / n as f64
    );
    assert!(len < 400, "{len} instructions");
    assert!(max <= 20, "{max} instructions executed");
}

#[test]
fn invalid_profiles_are_refused_with_a_reason() {
    let cases = [
        (json!({"defaultAction": "SCMP_ACT_BOGUS"}), "unknown action"),
        (
            json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
            "SCMP_ACT_NOTIFY",
        ),
        (
            json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}),
            "unknown architecture",
        ),
        (
            json!({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}),
            "flag",
        ),
        (
            json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/l.sock"}),
            "listenerPath",
        ),
        (
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "errnoRet": 1}]}),
            "errnoRet is only valid",
        ),
        (
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 70000}]}),
            "out of 0..=65535",
        ),
        (
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_KILL"}]}),
            "no names",
        ),
        (
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL",
            "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}),
            "argument index 6",
        ),
    ];
    for (profile, want) in cases {
        let e = compile(&profile).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    let e = compile(&json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
        "action": "SCMP_ACT_KILL", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_SOMETIMES"}]}]}))
    .unwrap_err();
    assert!(matches!(e, SeccompError::Json(_)), "{e:?}");
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("SCMP_CMP_SOMETIMES"), "{chain}");
}

/// Loads a filter in a forked child of the test process (after
/// `no_new_privs`, so it needs no privilege) and checks that the denied
/// call fails with the profile's errno and others still work.
#[test]
fn a_loaded_filter_denies_with_the_errno() {
    let f = compile(&json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdirat", "mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42}]
    }))
    .unwrap();
    let dir =
        std::ffi::CString::new(format!("/tmp/vessel-seccomp-test-{}", std::process::id())).unwrap();
    // SAFETY: the child only makes raw system calls on data prepared
    // before the fork, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: (whole block) prctl, seccomp, mkdir, getpid in the child.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                libc::_exit(100);
            }
            if f.load().is_err() {
                libc::_exit(101);
            }
            if libc::getpid() <= 0 {
                libc::_exit(102);
            }
            let r = libc::mkdir(dir.as_ptr(), 0o700);
            let e = *libc::__errno_location();
            libc::_exit(if r == -1 { e } else { 103 });
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 42);
    assert!(!std::path::Path::new(dir.to_str().unwrap()).exists());
}

/// A tiny deterministic PRNG (xorshift64*), to avoid a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random profiles: the compiled program against a direct evaluation of
/// the same rules, for every call number and a few argument vectors
/// (checks the runs, the search tree, the chains and the trampolines).
#[test]
fn random_profiles_match_a_direct_evaluation() {
    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    let actions = [
        ("SCMP_ACT_ALLOW", None),
        ("SCMP_ACT_ERRNO", Some(38)),
        ("SCMP_ACT_ERRNO", None),
        ("SCMP_ACT_KILL_PROCESS", None),
        ("SCMP_ACT_LOG", None),
        ("SCMP_ACT_TRAP", None),
    ];
    let ops = [
        "SCMP_CMP_EQ",
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_GT",
        "SCMP_CMP_GE",
        "SCMP_CMP_MASKED_EQ",
    ];
    let values = [0u64, 1, 2, 0xffff_ffff, 0x1_0000_0000, u64::MAX];
    // Numbers in a few dense clusters, so that runs touch each other.
    let pool: Vec<(&str, u32)> = syscalls::X86_64
        .iter()
        .copied()
        .filter(|(_, n)| *n < 40 || (200..230).contains(n) || *n > 430)
        .collect();
    let mut longest = 0;
    for round in 0..60 {
        let (default_name, default_errno) = actions[rng.below(actions.len())];
        let mut rules = Vec::new();
        for _ in 0..(1 + rng.below(if round % 10 == 0 { 300 } else { 25 })) {
            let names: Vec<&str> = (0..1 + rng.below(4))
                .map(|_| pool[rng.below(pool.len())].0)
                .collect();
            let (a, e) = actions[rng.below(actions.len())];
            let args: Vec<Value> = (0..rng.below(3))
                .map(|_| {
                    json!({"index": rng.below(3), "value": values[rng.below(values.len())],
                           "valueTwo": values[rng.below(values.len())],
                           "op": ops[rng.below(ops.len())]})
                })
                .collect();
            let mut r = json!({"names": names, "action": a, "args": args});
            if let Some(e) = e {
                r["errnoRet"] = json!(e);
            }
            rules.push(r);
        }
        let mut profile = json!({"defaultAction": default_name, "syscalls": rules});
        if let Some(e) = default_errno {
            profile["defaultErrnoRet"] = json!(e);
        }
        let f = compile(&profile).unwrap_or_else(|e| panic!("{profile}: {e}"));
        longest = longest.max(f.program().len());
        let parsed: Profile = serde_json::from_value(profile.clone()).unwrap();
        let default = action(&parsed.default_action, parsed.default_errno_ret, "").unwrap();
        let rules: Vec<(Vec<u32>, u32, Vec<Arg>)> = parsed
            .syscalls
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                (
                    r.names.unwrap_or_default().iter().map(|n| nr(n)).collect(),
                    action(&r.action, r.errno_ret, "").unwrap(),
                    r.args.unwrap_or_default(),
                )
            })
            .filter(|(_, a, _)| *a != default)
            .collect();
        let holds = |c: &Arg, args: &[u64; 6]| {
            let a = args[c.index as usize];
            match c.op {
                Op::Eq => a == c.value,
                Op::Ne => a != c.value,
                Op::Lt => a < c.value,
                Op::Le => a <= c.value,
                Op::Gt => a > c.value,
                Op::Ge => a >= c.value,
                Op::MaskedEq => a & c.value == c.value_two,
            }
        };
        let expect = |n: u32, args: &[u64; 6]| -> u32 {
            let mine = rules.iter().filter(|(names, _, _)| names.contains(&n));
            for (_, act, conds) in mine.clone().filter(|(_, _, c)| !c.is_empty()) {
                let same_index = conds
                    .iter()
                    .enumerate()
                    .any(|(j, a)| conds[..j].iter().any(|b| b.index == a.index));
                let m = if same_index {
                    conds.iter().any(|c| holds(c, args))
                } else {
                    conds.iter().all(|c| holds(c, args))
                };
                if m {
                    return *act;
                }
            }
            mine.clone()
                .find(|(_, _, c)| c.is_empty())
                .map_or(default, |(_, a, _)| *a)
        };
        let arg_sets: Vec<[u64; 6]> = (0..6)
            .map(|_| std::array::from_fn(|_| values[rng.below(values.len())]))
            .collect();
        for n in 0..470 {
            for args in &arg_sets {
                assert_eq!(
                    eval(&f, n, *args),
                    expect(n, args),
                    "round {round}, nr {n}, args {args:x?}, profile {profile}"
                );
            }
        }
    }
    // Long enough for jumps beyond 255 instructions (trampolines).
    assert!(longest > 1000, "longest program {longest}");
}
