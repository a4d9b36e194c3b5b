//! A tiny 32-bit x86 emitter with labels: just the instruction forms the test guest needs.
//!
//! Every method appends one instruction (encoding in its doc comment, Intel SDM notation) to a
//! flat image that will be loaded at a fixed address. Branches always use the rel32 forms, so no
//! relaxation pass is needed: the image is a few hundred bytes and speed is irrelevant. Labels
//! may be used before they are bound; [`Asm::finish`] patches every use.

/// A 32-bit general-purpose register, numbered as in the ModRM `reg`/`rm` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum R32 {
    Eax = 0,
    Ecx = 1,
    Edx = 2,
    Ebx = 3,
    Esp = 4,
    Ebp = 5,
    Esi = 6,
    Edi = 7,
}

impl R32 {
    fn num(self) -> u8 {
        self as u8
    }
}

/// A condition for `jcc`, numbered as the low nibble of its `0F 8x` opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cond {
    /// Carry set / unsigned below (`jb`, `jc`).
    B = 0x2,
    /// Carry clear / unsigned above or equal (`jae`, `jnc`).
    Ae = 0x3,
    /// Zero set / equal (`je`, `jz`).
    E = 0x4,
    /// Zero clear / not equal (`jne`, `jnz`).
    Ne = 0x5,
    /// Unsigned above (`ja`).
    A = 0x7,
}

/// A position in the image, possibly not yet known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Label(usize);

/// How a label use is patched.
#[derive(Clone, Copy, Debug)]
enum Fixup {
    /// A rel32 displacement, relative to the end of the 4-byte field.
    Rel32,
    /// The label's absolute load address.
    Abs32,
}

/// The emitter: bytes, label positions and the uses to patch.
pub(crate) struct Asm {
    base: u32,
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label, Fixup, u32)>,
}

/// ModRM byte: `mod` (2 bits), `reg` (3 bits), `rm` (3 bits).
fn modrm(md: u8, reg: u8, rm: u8) -> u8 {
    (md << 6) | (reg << 3) | rm
}

impl Asm {
    /// An empty image whose first byte will be loaded at `base`.
    pub(crate) fn new(base: u32) -> Asm {
        Asm {
            base,
            code: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    /// The current offset from the start of the image.
    #[cfg(test)]
    pub(crate) fn offset(&self) -> usize {
        self.code.len()
    }

    fn address_of_offset(&self, offset: usize) -> u32 {
        // The image is a few KiB: the offset always fits, checked by the unit tests.
        self.base + u32::try_from(offset).unwrap_or(u32::MAX)
    }

    /// A new, unbound label.
    pub(crate) fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the current position. Binding twice is a bug in the program text.
    pub(crate) fn bind(&mut self, label: Label) {
        assert!(self.labels[label.0].is_none(), "label bound twice");
        self.labels[label.0] = Some(self.code.len());
    }

    /// A new label bound here.
    pub(crate) fn bound_label(&mut self) -> Label {
        let label = self.label();
        self.bind(label);
        label
    }

    /// Raw bytes (data).
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    /// A little-endian 32-bit value (data).
    pub(crate) fn dd(&mut self, value: u32) {
        self.code.extend_from_slice(&value.to_le_bytes());
    }

    /// Pads with zero bytes up to a multiple of `align`.
    pub(crate) fn align(&mut self, align: usize) {
        while self.code.len() % align != 0 {
            self.code.push(0);
        }
    }

    fn use_label(&mut self, label: Label, fixup: Fixup) {
        self.use_label_plus(label, fixup, 0);
    }

    fn use_label_plus(&mut self, label: Label, fixup: Fixup, addend: u32) {
        self.fixups.push((self.code.len(), label, fixup, addend));
        self.dd(0);
    }

    /// The absolute address of `label` as a 32-bit data word.
    pub(crate) fn dd_label(&mut self, label: Label) {
        self.use_label(label, Fixup::Abs32);
    }

    /// The absolute address of `label` plus `addend` as a 32-bit data word (for addresses past
    /// the end of the image, such as the top of the stack in the zero-filled area).
    pub(crate) fn dd_label_plus(&mut self, label: Label, addend: u32) {
        self.use_label_plus(label, Fixup::Abs32, addend);
    }

    /// Resolves every label use and returns the image. An unbound label is a bug in the program
    /// text, caught by the unit tests.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        for &(at, label, fixup, addend) in &self.fixups {
            let target = self.labels[label.0].expect("label used but never bound");
            let value = match fixup {
                Fixup::Abs32 => self.address_of_offset(target).wrapping_add(addend),
                Fixup::Rel32 => {
                    let next = i64::try_from(at + 4).unwrap_or(i64::MAX);
                    let target = i64::try_from(target).unwrap_or(i64::MAX);
                    // Two's complement of the signed distance, as the CPU adds it.
                    (target - next) as u32
                }
            };
            self.code[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        self.code
    }

    // ---- Control ----

    /// `cli`: `FA`.
    pub(crate) fn cli(&mut self) {
        self.bytes(&[0xfa]);
    }

    /// `cld`: `FC`.
    pub(crate) fn cld(&mut self) {
        self.bytes(&[0xfc]);
    }

    /// `clc`: `F8`.
    pub(crate) fn clc(&mut self) {
        self.bytes(&[0xf8]);
    }

    /// `stc`: `F9`.
    pub(crate) fn stc(&mut self) {
        self.bytes(&[0xf9]);
    }

    /// `hlt`: `F4`.
    pub(crate) fn hlt(&mut self) {
        self.bytes(&[0xf4]);
    }

    /// `ud2`: `0F 0B`.
    pub(crate) fn ud2(&mut self) {
        self.bytes(&[0x0f, 0x0b]);
    }

    /// `lidt [abs32]`: `0F 01 /3`, ModRM mod=00 rm=101 (disp32 only).
    pub(crate) fn lidt(&mut self, descriptor: Label) {
        self.bytes(&[0x0f, 0x01, modrm(0b00, 3, 0b101)]);
        self.use_label(descriptor, Fixup::Abs32);
    }

    /// `jmp rel32`: `E9 cd`.
    pub(crate) fn jmp(&mut self, target: Label) {
        self.bytes(&[0xe9]);
        self.use_label(target, Fixup::Rel32);
    }

    /// `jcc rel32`: `0F 80+cc cd`.
    pub(crate) fn jcc(&mut self, cond: Cond, target: Label) {
        self.bytes(&[0x0f, 0x80 | cond as u8]);
        self.use_label(target, Fixup::Rel32);
    }

    /// `call rel32`: `E8 cd`.
    pub(crate) fn call(&mut self, target: Label) {
        self.bytes(&[0xe8]);
        self.use_label(target, Fixup::Rel32);
    }

    /// `ret`: `C3`.
    pub(crate) fn ret(&mut self) {
        self.bytes(&[0xc3]);
    }

    /// `push r32`: `50+rd`.
    pub(crate) fn push(&mut self, reg: R32) {
        self.bytes(&[0x50 + reg.num()]);
    }

    /// `pop r32`: `58+rd`.
    pub(crate) fn pop(&mut self, reg: R32) {
        self.bytes(&[0x58 + reg.num()]);
    }

    // ---- Moves ----

    /// `mov r32, imm32`: `B8+rd id`.
    pub(crate) fn mov_imm(&mut self, dst: R32, imm: u32) {
        self.bytes(&[0xb8 + dst.num()]);
        self.dd(imm);
    }

    /// `mov r32, imm32` with a label's absolute address: `B8+rd id`.
    pub(crate) fn mov_addr(&mut self, dst: R32, label: Label) {
        self.bytes(&[0xb8 + dst.num()]);
        self.use_label(label, Fixup::Abs32);
    }

    /// `mov r32, imm32` with a label's absolute address plus `addend`: `B8+rd id`.
    pub(crate) fn mov_addr_plus(&mut self, dst: R32, label: Label, addend: u32) {
        self.bytes(&[0xb8 + dst.num()]);
        self.use_label_plus(label, Fixup::Abs32, addend);
    }

    /// `mov r32, r32`: `89 /r`, ModRM mod=11 reg=src rm=dst.
    pub(crate) fn mov(&mut self, dst: R32, src: R32) {
        self.bytes(&[0x89, modrm(0b11, src.num(), dst.num())]);
    }

    /// `mov al, imm8`: `B0 ib`.
    pub(crate) fn mov_al(&mut self, imm: u8) {
        self.bytes(&[0xb0, imm]);
    }

    /// `mov r32, [abs32]`: `8B /r`, ModRM mod=00 rm=101 (disp32 only).
    pub(crate) fn load(&mut self, dst: R32, var: Label) {
        self.bytes(&[0x8b, modrm(0b00, dst.num(), 0b101)]);
        self.use_label(var, Fixup::Abs32);
    }

    /// `mov [abs32], r32`: `89 /r`, ModRM mod=00 rm=101 (disp32 only).
    pub(crate) fn store(&mut self, var: Label, src: R32) {
        self.bytes(&[0x89, modrm(0b00, src.num(), 0b101)]);
        self.use_label(var, Fixup::Abs32);
    }

    /// `mov al, [abs32 + index]`: `8A /r`, ModRM mod=10 reg=al rm=index (disp32 + register).
    /// `index` must not be ESP (that rm value means "SIB byte follows").
    pub(crate) fn load_al_indexed(&mut self, table: Label, index: R32) {
        assert_ne!(index, R32::Esp, "esp cannot be a ModRM base without SIB");
        self.bytes(&[0x8a, modrm(0b10, R32::Eax.num(), index.num())]);
        self.use_label(table, Fixup::Abs32);
    }

    /// `mov [abs32 + index], al`: `88 /r`, ModRM mod=10 reg=al rm=index (disp32 + register).
    /// `index` must not be ESP.
    pub(crate) fn store_al_indexed(&mut self, table: Label, index: R32) {
        assert_ne!(index, R32::Esp, "esp cannot be a ModRM base without SIB");
        self.bytes(&[0x88, modrm(0b10, R32::Eax.num(), index.num())]);
        self.use_label(table, Fixup::Abs32);
    }

    /// `movzx r32, byte [r32]`: `0F B6 /r`, ModRM mod=00 reg=dst rm=src. `src` must not be
    /// ESP or EBP (those rm values mean SIB and disp32).
    pub(crate) fn movzx_byte(&mut self, dst: R32, src: R32) {
        assert!(
            src != R32::Esp && src != R32::Ebp,
            "no SIB/disp32 forms here"
        );
        self.bytes(&[0x0f, 0xb6, modrm(0b00, dst.num(), src.num())]);
    }

    /// `lodsb`: `AC` (al = [esi], esi += 1 with DF clear).
    pub(crate) fn lodsb(&mut self) {
        self.bytes(&[0xac]);
    }

    /// `repe cmpsb`: `F3 A6` (compare [esi] with [edi] while equal and ecx != 0).
    pub(crate) fn repe_cmpsb(&mut self) {
        self.bytes(&[0xf3, 0xa6]);
    }

    // ---- Arithmetic and logic ----

    /// `xor r32, r32`: `31 /r`, ModRM mod=11 reg=src rm=dst.
    pub(crate) fn xor(&mut self, dst: R32, src: R32) {
        self.bytes(&[0x31, modrm(0b11, src.num(), dst.num())]);
    }

    /// `add r32, r32`: `01 /r`, ModRM mod=11 reg=src rm=dst.
    pub(crate) fn add(&mut self, dst: R32, src: R32) {
        self.bytes(&[0x01, modrm(0b11, src.num(), dst.num())]);
    }

    /// `sub r32, r32`: `29 /r`, ModRM mod=11 reg=src rm=dst.
    pub(crate) fn sub(&mut self, dst: R32, src: R32) {
        self.bytes(&[0x29, modrm(0b11, src.num(), dst.num())]);
    }

    /// `cmp r32, r32`: `39 /r`, ModRM mod=11 reg=src rm=dst (flags of dst - src).
    pub(crate) fn cmp(&mut self, dst: R32, src: R32) {
        self.bytes(&[0x39, modrm(0b11, src.num(), dst.num())]);
    }

    /// `or r32, r32`: `09 /r`, ModRM mod=11 reg=src rm=dst.
    pub(crate) fn or(&mut self, dst: R32, src: R32) {
        self.bytes(&[0x09, modrm(0b11, src.num(), dst.num())]);
    }

    /// `test r32, r32`: `85 /r`, ModRM mod=11 reg=src rm=dst.
    pub(crate) fn test(&mut self, dst: R32, src: R32) {
        self.bytes(&[0x85, modrm(0b11, src.num(), dst.num())]);
    }

    /// The group-1 immediate forms: `83 /digit ib` when the value fits a sign-extended byte,
    /// else `81 /digit id`.
    fn group1_imm(&mut self, digit: u8, dst: R32, imm: u32) {
        let signed = imm as i32;
        if (-128..=127).contains(&signed) {
            self.bytes(&[0x83, modrm(0b11, digit, dst.num()), signed as i8 as u8]);
        } else {
            self.bytes(&[0x81, modrm(0b11, digit, dst.num())]);
            self.dd(imm);
        }
    }

    /// `add r32, imm`: `83 /0 ib` or `81 /0 id`.
    pub(crate) fn add_imm(&mut self, dst: R32, imm: u32) {
        self.group1_imm(0, dst, imm);
    }

    /// `and r32, imm`: `83 /4 ib` or `81 /4 id`.
    pub(crate) fn and_imm(&mut self, dst: R32, imm: u32) {
        self.group1_imm(4, dst, imm);
    }

    /// `sub r32, imm`: `83 /5 ib` or `81 /5 id`.
    pub(crate) fn sub_imm(&mut self, dst: R32, imm: u32) {
        self.group1_imm(5, dst, imm);
    }

    /// `cmp r32, imm`: `83 /7 ib` or `81 /7 id`.
    pub(crate) fn cmp_imm(&mut self, dst: R32, imm: u32) {
        self.group1_imm(7, dst, imm);
    }

    /// `cmp al, imm8`: `3C ib`.
    pub(crate) fn cmp_al(&mut self, imm: u8) {
        self.bytes(&[0x3c, imm]);
    }

    /// `test al, imm8`: `A8 ib`.
    pub(crate) fn test_al(&mut self, imm: u8) {
        self.bytes(&[0xa8, imm]);
    }

    /// `test ax, imm16`: `66 A9 iw`.
    pub(crate) fn test_ax(&mut self, imm: u16) {
        self.bytes(&[0x66, 0xa9]);
        self.bytes(&imm.to_le_bytes());
    }

    /// `inc r32`: `40+rd` (the one-byte form, valid outside 64-bit mode).
    pub(crate) fn inc(&mut self, reg: R32) {
        self.bytes(&[0x40 + reg.num()]);
    }

    /// `dec r32`: `48+rd` (the one-byte form, valid outside 64-bit mode).
    pub(crate) fn dec(&mut self, reg: R32) {
        self.bytes(&[0x48 + reg.num()]);
    }

    /// `imul r32, r32, imm8`: `6B /r ib`, ModRM mod=11 reg=dst rm=src.
    pub(crate) fn imul_imm8(&mut self, dst: R32, src: R32, imm: i8) {
        self.bytes(&[0x6b, modrm(0b11, dst.num(), src.num()), imm as u8]);
    }

    // ---- Port I/O (the port is always in DX) ----

    /// `in al, dx`: `EC`.
    pub(crate) fn in_al_dx(&mut self) {
        self.bytes(&[0xec]);
    }

    /// `in ax, dx`: `66 ED`.
    pub(crate) fn in_ax_dx(&mut self) {
        self.bytes(&[0x66, 0xed]);
    }

    /// `in eax, dx`: `ED`.
    pub(crate) fn in_eax_dx(&mut self) {
        self.bytes(&[0xed]);
    }

    /// `out dx, al`: `EE`.
    pub(crate) fn out_dx_al(&mut self) {
        self.bytes(&[0xee]);
    }

    /// `out dx, ax`: `66 EF`.
    pub(crate) fn out_dx_ax(&mut self) {
        self.bytes(&[0x66, 0xef]);
    }

    /// `out dx, eax`: `EF`.
    pub(crate) fn out_dx_eax(&mut self) {
        self.bytes(&[0xef]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_the_manual() {
        // Reference bytes checked against GNU as (`as --32`) while writing the emitter; for
        // `and eax, imm32` as picks the equivalent short `25 id` form, which we never emit.
        let mut asm = Asm::new(0x100000);
        asm.mov_imm(R32::Esp, 0x0010_2000); // bc 00 20 10 00
        asm.mov(R32::Ecx, R32::Edi); // 89 f9
        asm.cmp_imm(R32::Ecx, 9); // 83 f9 09
        asm.and_imm(R32::Eax, 0xffc0); // 81 e0 c0 ff 00 00
        asm.imul_imm8(R32::Eax, R32::Eax, 10); // 6b c0 0a
        asm.movzx_byte(R32::Ecx, R32::Esi); // 0f b6 0e
        asm.test_ax(0x100); // 66 a9 00 01
        asm.load_al_indexed(Label(0), R32::Eax); // 8a 80 <abs32>
        let start = asm.bound_label();
        assert_eq!(asm.offset(), 32);
        asm.jcc(Cond::Ne, start); // 0f 85 fa ff ff ff
        let image = asm.finish();
        assert_eq!(
            image,
            [
                0xbc, 0x00, 0x20, 0x10, 0x00, //
                0x89, 0xf9, //
                0x83, 0xf9, 0x09, //
                0x81, 0xe0, 0xc0, 0xff, 0x00, 0x00, //
                0x6b, 0xc0, 0x0a, //
                0x0f, 0xb6, 0x0e, //
                0x66, 0xa9, 0x00, 0x01, //
                0x8a, 0x80, 0x20, 0x00, 0x10, 0x00, //
                0x0f, 0x85, 0xfa, 0xff, 0xff, 0xff,
            ]
        );
    }
}
