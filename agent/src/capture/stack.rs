//! What older kernels' verifiers refuse, checked on the host before any of
//! them boots: the BPF stack of a program together with the functions it
//! calls. Every kernel allows 512 bytes for a call chain, but 5.10 to 6.1
//! round each frame up to 32 bytes and count a function without a stack
//! (`memcpy`, `memset`) as 32 (`check_max_stack_depth`). A change that let
//! the compiler split `on_established` out of `sock_ops` with a larger
//! frame loaded here (6.18) and on 5.10, and was refused by 6.1: "combined
//! stack size of 3 calls is 544. Too large". The depth of each function is
//! read from its instructions (the lowest `r10` offset it touches, as the
//! verifier counts it); the check assumes the worst chain: a program, the
//! deepest shared function, and a stackless leaf.

use object::{Object, ObjectSection, ObjectSymbol, SectionFlags, SymbolKind, elf};

/// The verifier's limit for a call chain.
const MAX_STACK: i64 = 512;

/// The deepest stack offset below `r10` the instructions touch: loads and
/// stores through `r10`, or through a register set from it (`rX = r10;
/// rX += -N`, the way a stack address is handed to a helper).
fn stack_depth(code: &[u8]) -> i64 {
    let mut fp: [Option<i64>; 16] = [None; 16];
    let mut depth = 0i64;
    let mut i = 0;
    while i + 8 <= code.len() {
        fp[10] = Some(0); // r10 is read-only
        let op = code[i];
        let (dst, src) = (
            usize::from(code[i + 1] & 0x0f),
            usize::from(code[i + 1] >> 4),
        );
        let off = i64::from(i16::from_le_bytes([code[i + 2], code[i + 3]]));
        let imm = i64::from(i32::from_le_bytes([
            code[i + 4],
            code[i + 5],
            code[i + 6],
            code[i + 7],
        ]));
        let mut touch = |base: Option<i64>| {
            if let Some(o) = base {
                depth = depth.max(-o);
            }
        };
        match op & 0x07 {
            // LDX: dst = *(src + off)
            0x01 => {
                touch(fp[src].map(|o| o + off));
                fp[dst] = None;
            }
            // ST, STX: *(dst + off) = ...
            0x02 | 0x03 => touch(fp[dst].map(|o| o + off)),
            // ALU64
            0x07 => {
                fp[dst] = match (op & 0xf0, op & 0x08 != 0) {
                    (0xb0, true) => fp[src],                   // mov dst, src
                    (0x00, false) => fp[dst].map(|o| o + imm), // add dst, imm
                    (0x10, false) => fp[dst].map(|o| o - imm), // sub dst, imm
                    _ => None,
                };
                touch(fp[dst]);
            }
            // JMP: a call clobbers r0 to r5.
            0x05 if op == 0x85 => fp[..6].fill(None),
            // LD (lddw, two slots), ALU32: dst no longer points at the stack.
            0x00 | 0x04 => fp[dst] = None,
            _ => {}
        }
        i += if op == 0x18 { 16 } else { 8 };
    }
    depth
}

fn frame(depth: i64) -> i64 {
    (depth.max(1) + 31) / 32 * 32
}

#[test]
fn every_program_s_call_chain_fits_the_verifier_s_stack_on_old_kernels() {
    let obj = object::File::parse(super::EBPF_OBJECT).expect("the embedded eBPF object parses");
    let mut programs = Vec::new();
    let mut shared = Vec::new();
    for sym in obj.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Some(section) = sym
            .section_index()
            .and_then(|i| obj.section_by_index(i).ok())
        else {
            continue;
        };
        let executable = matches!(section.flags(), SectionFlags::Elf { sh_flags }
            if sh_flags & u64::from(elf::SHF_EXECINSTR) != 0);
        if !executable {
            continue;
        }
        let data = section.data().expect("section bytes");
        let start = usize::try_from(sym.address() - section.address()).unwrap();
        let end = start + usize::try_from(sym.size()).unwrap();
        let depth = stack_depth(&data[start..end]);
        let name = sym.name().unwrap_or("?").to_owned();
        if section.name() == Ok(".text") {
            shared.push((name, depth));
        } else {
            programs.push((name, depth));
        }
    }
    assert!(
        programs.iter().any(|(n, _)| n == "flowaudit_sock_ops"),
        "no sock_ops program found in the object: {programs:?}"
    );
    let (deepest, deepest_depth) = shared
        .iter()
        .max_by_key(|(_, d)| *d)
        .cloned()
        .unwrap_or_else(|| ("(none)".to_owned(), 0));
    for (name, depth) in &programs {
        let chain = frame(*depth) + frame(deepest_depth) + frame(0);
        assert!(
            chain <= MAX_STACK,
            "{name} uses {depth} bytes of stack; with {deepest} ({deepest_depth} bytes) and a \
             stackless leaf below it, the chain is {chain} > {MAX_STACK} bytes as 5.10 to 6.1 \
             count it, and their verifiers refuse the program: keep large values off the stack \
             or let the function be inlined (all functions: {shared:?})"
        );
    }
}

#[test]
fn stack_depth_follows_r10_and_registers_derived_from_it() {
    // r1 = r10; r1 += -40; *(u64 *)(r10 - 16) = 0; exit
    let code: Vec<u8> = [
        [0xbf, 0xa1, 0, 0, 0, 0, 0, 0],
        [0x07, 0x01, 0, 0, 0xd8, 0xff, 0xff, 0xff],
        [0x7a, 0x0a, 0xf0, 0xff, 0, 0, 0, 0],
        [0x95, 0, 0, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(stack_depth(&code), 40);
    assert_eq!(stack_depth(&code[16..]), 16);
    assert_eq!((frame(0), frame(168), frame(256)), (32, 192, 256));
}
