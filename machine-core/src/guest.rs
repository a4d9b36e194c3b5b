//! The built-in tiny test guest: a 32-bit multiboot kernel generated as bytes by our own code.
//!
//! Tests need a real guest that boots in milliseconds, talks on the serial port and answers a
//! graceful shutdown request. Nothing here is downloaded or assembled by an external tool: the
//! kernel is emitted instruction by instruction by a small in-house x86 emitter (`guest::asm`,
//! each encoding commented), so the image is the same byte for byte on every build.
//!
//! # Booting it
//!
//! [`kernel_image`] returns the kernel; [`write_kernel`] writes it to a directory;
//! [`qemu_args`] gives the QEMU arguments that boot it on a [`GuestMachine`]: the machine type,
//! its firmware, `-kernel PATH` and an `isa-debug-exit` device at I/O port
//! [`DEBUG_EXIT_IOBASE`]. The caller attaches COM1 (for example `-chardev socket,id=con,fd=N
//! -serial chardev:con`), picks the accelerator, and adds `-nodefaults -display none` and QMP
//! as it likes. QEMU's own multiboot loader (an option ROM run by the firmware) loads the image.
//!
//! # What it does
//!
//! With interrupts off for its whole life (this machine's nested KVM cannot emulate a
//! protected-mode `iret`, and polling is all a test guest needs), the kernel:
//!
//! 1. initialises COM1 (0x3f8): 115200 baud divisor, 8N1, FIFOs on and cleared, no interrupts;
//! 2. finds the ACPI PM I/O base in PCI configuration space (the ICH9 LPC bridge 00:1f.0
//!    register 0x40 on `q35`, the PIIX4 PM function 00:01.3 register 0x40 on `pc`), programs
//!    [`DEFAULT_PM_BASE`] if the firmware left it unset, enables the PM I/O space, clears and
//!    enables the power-button event (PWRBTN_EN, bit 8 of PM1a_EN at base+2);
//! 3. prints [`BANNER`] then `"\r\n"`, then [`PROMPT`];
//! 4. loops forever polling both the UART (received byte ready) and PM1a_STS (base+0) for
//!    PWRBTN_STS; on a power-button event it prints [`POWER_BUTTON_LINE`] and powers off as
//!    `poweroff` does.
//!
//! Bytes sent before the banner are lost: the FIFO reset at start-up discards them. Wait for
//! the banner (or the first prompt) before typing.
//!
//! # The command protocol
//!
//! Every received byte is echoed, except line terminators and erasures. A line ends with CR or
//! LF (CR LF counts once); the guest then writes `"\r\n"`, runs the line and writes
//! [`PROMPT`]. Backspace (0x08) and DEL (0x7f) erase the last character (echoing `"\b \b"`).
//! An empty line just gives a new prompt. Lines longer than [`LINE_MAX`] bytes are refused.
//!
//! | Line | Effect and output |
//! |---|---|
//! | `flood N` | writes exactly `N` bytes, byte `i` being `FLOOD_PATTERN[i % 64]`, as fast as the UART takes them, then `"\r\n"`, [`FLOOD_DONE`], `"\r\n"` |
//! | `exit CODE` | writes `CODE` to the `isa-debug-exit` port: QEMU exits at once with status `(CODE << 1) \| 1` (see [`exit_status_for`]); no SHUTDOWN event |
//! | `poweroff` | prints [`POWEROFF_LINE`], then ACPI S5 (SLP_EN with SLP_TYP 0, QEMU's S5, to PM1a_CNT at base+4): QEMU reports `SHUTDOWN {guest: true, reason: guest-shutdown}` |
//! | `panic` | prints [`PANIC_LINE`], then triple-faults (null IDT then `ud2`): QEMU resets the machine (event `RESET {guest: true, reason: guest-reset}`) and the guest boots again, or with `-no-reboot` QEMU reports `SHUTDOWN {guest: true, reason: guest-reset}` and exits |
//! | `help` | prints [`HELP_TEXT`], the list of these commands |
//! | anything else | an error line starting with [`ERROR_PREFIX`] |
//!
//! `N` and `CODE` are 1 to 9 decimal digits. Error lines: `ERR unknown command: LINE (try
//! help)`,
//! `ERR bad number`, `ERR line too long`, `ERR no isa-debug-exit device` (QEMU still runs one
//! second after the exit write, or at once where there is no ACPI PM timer to time it), `ERR no ACPI PM found` (no known chipset), `ERR poweroff failed` (still running one
//! second after the S5 write, timed with the ACPI PM timer).
//!
//! ```no_run
//! use machine_core::guest::{self, GuestMachine};
//!
//! let dir = std::env::temp_dir();
//! let kernel = guest::write_kernel(&dir)?;
//! let mut qemu = std::process::Command::new("qemu-system-x86_64");
//! qemu.args(guest::qemu_args(&kernel, GuestMachine::Q35))
//!     .args(["-accel", "tcg", "-nodefaults", "-display", "none", "-serial", "stdio"]);
//! // Prints the banner and a prompt; type `poweroff` to stop it.
//! let status = qemu.status()?;
//! # let _ = status;
//! # Ok::<(), std::io::Error>(())
//! ```

mod asm;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use asm::{Asm, Cond, Label, R32};

/// The line the guest prints once its UART is ready (followed by `"\r\n"` and [`PROMPT`]).
pub const BANNER: &str = "qemu-machine tiny guest ready";
/// The prompt written after the banner and after every line the guest runs.
pub const PROMPT: &str = "guest> ";
/// The marker line written after the `flood` bytes.
pub const FLOOD_DONE: &str = "FLOOD-DONE";
/// The line printed just before an ACPI power-off (by `poweroff` or the power button).
pub const POWEROFF_LINE: &str = "POWEROFF";
/// The line printed when the guest sees the ACPI power button (QMP `system_powerdown`).
pub const POWER_BUTTON_LINE: &str = "POWER-BUTTON";
/// The line printed just before the deliberate triple fault of `panic`.
pub const PANIC_LINE: &str = "PANIC";
/// How every error line starts.
pub const ERROR_PREFIX: &str = "ERR ";
/// The longest command line the guest accepts, in bytes.
pub const LINE_MAX: usize = 64;
/// The 64-byte cycle `flood` writes: byte `i` of the flood is `FLOOD_PATTERN[i % 64]`.
pub const FLOOD_PATTERN: &[u8; 64] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-\n";

/// The command that floods the console.
pub const CMD_FLOOD: &str = "flood";
/// The command that exits QEMU through `isa-debug-exit`.
pub const CMD_EXIT: &str = "exit";
/// The command that powers off through ACPI.
pub const CMD_POWEROFF: &str = "poweroff";
/// The command that triple-faults the guest.
pub const CMD_PANIC: &str = "panic";
/// The command that lists the commands.
pub const CMD_HELP: &str = "help";
/// What `help` prints (each line ends with `"\r\n"`).
pub const HELP_TEXT: &str = "\
flood N     write N bytes of a test pattern, then FLOOD-DONE\r
exit CODE   end QEMU through isa-debug-exit: its exit status is (CODE << 1) | 1\r
poweroff    ACPI power-off (QEMU reports a guest shutdown)\r
panic       triple fault: QEMU resets the machine (or exits with -no-reboot)\r
help        this list\r
";

/// The I/O port of the `isa-debug-exit` device [`qemu_args`] adds.
pub const DEBUG_EXIT_IOBASE: u16 = 0xf4;
/// The ACPI PM I/O base the guest programs when the firmware left it unset (QEMU's default).
pub const DEFAULT_PM_BASE: u16 = 0x600;
/// Where the kernel is loaded (1 MiB, above the legacy BIOS area).
pub const LOAD_ADDRESS: u32 = 0x0010_0000;
/// The file name [`write_kernel`] uses.
pub const KERNEL_FILE_NAME: &str = "qemu-machine-tiny-guest.bin";
/// qboot, the minimal firmware used for [`GuestMachine::Q35`] (Debian's `qemu-system-data`).
pub const QBOOT_ROM: &str = "/usr/share/qemu/qboot.rom";

/// The largest number `flood` and `exit` accept (nine decimal digits).
pub const NUMBER_MAX: u32 = 999_999_999;

/// A line for the guest's command interpreter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `flood N`: write N bytes of [`FLOOD_PATTERN`], then the [`FLOOD_DONE`] line.
    Flood(u32),
    /// `exit CODE`: QEMU exits with status `(CODE << 1) | 1`.
    Exit(u32),
    /// `poweroff`: ACPI S5.
    Poweroff,
    /// `panic`: triple fault.
    Panic,
    /// `help`: print [`HELP_TEXT`].
    Help,
}

impl Command {
    /// The command as a line to send, terminated by `"\n"`.
    pub fn to_line(&self) -> String {
        format!("{self}\n")
    }
}

impl fmt::Display for Command {
    /// The command without its line terminator, e.g. `flood 1000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Flood(n) => write!(f, "{CMD_FLOOD} {n}"),
            Command::Exit(code) => write!(f, "{CMD_EXIT} {code}"),
            Command::Poweroff => f.write_str(CMD_POWEROFF),
            Command::Panic => f.write_str(CMD_PANIC),
            Command::Help => f.write_str(CMD_HELP),
        }
    }
}

/// The exit status QEMU reports after the guest runs `exit CODE`: `(CODE << 1) | 1`, truncated
/// to the 8 bits a process exit status keeps.
pub fn exit_status_for(code: u32) -> i32 {
    ((code << 1) | 1) as i32 & 0xff
}

/// A machine type the tiny guest is known to boot on, with its firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestMachine {
    /// `-M q35` with qboot ([`QBOOT_ROM`]): the fastest boot (about 41 ms to the banner under
    /// TCG here). Chipset ICH9, ACPI PM through the LPC bridge.
    Q35,
    /// `-M pc` with QEMU's default firmware (SeaBIOS). Chipset i440FX/PIIX4, ACPI PM through
    /// function 00:01.3.
    Pc,
}

impl GuestMachine {
    /// Both machine types.
    pub const ALL: [GuestMachine; 2] = [GuestMachine::Q35, GuestMachine::Pc];

    /// The `-M` value.
    pub fn machine_type(self) -> &'static str {
        match self {
            GuestMachine::Q35 => "q35",
            GuestMachine::Pc => "pc",
        }
    }

    /// The `-bios` file, or `None` for QEMU's default (SeaBIOS).
    pub fn firmware(self) -> Option<&'static Path> {
        match self {
            GuestMachine::Q35 => Some(Path::new(QBOOT_ROM)),
            GuestMachine::Pc => None,
        }
    }
}

impl fmt::Display for GuestMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.machine_type())
    }
}

/// The QEMU arguments that boot the kernel at `kernel` on `machine`: `-M`, `-bios` when the
/// machine needs one, `-kernel` and the `isa-debug-exit` device. Accelerator, display, serial
/// and monitor are the caller's choice.
pub fn qemu_args(kernel: &Path, machine: GuestMachine) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-M".into(), machine.machine_type().into()];
    if let Some(firmware) = machine.firmware() {
        args.push("-bios".into());
        args.push(firmware.into());
    }
    args.push("-kernel".into());
    args.push(kernel.into());
    args.push("-device".into());
    args.push(format!("isa-debug-exit,iobase={DEBUG_EXIT_IOBASE:#x},iosize=0x04").into());
    args
}

/// Writes the kernel to `dir/`[`KERNEL_FILE_NAME`] and returns that path.
pub fn write_kernel(dir: &Path) -> io::Result<PathBuf> {
    let path = dir.join(KERNEL_FILE_NAME);
    std::fs::write(&path, kernel_image())?;
    Ok(path)
}

/// The kernel image: a multiboot v1 header (with the "a.out kludge" load addresses, so no ELF is
/// needed) followed by the flat code and data, loaded at [`LOAD_ADDRESS`].
pub fn kernel_image() -> Vec<u8> {
    Program::new().assemble()
}

// ---- The program ----

/// Multiboot v1 header magic.
const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// Multiboot flags: bit 16, the header's address fields are valid (flat binary, no ELF).
const MULTIBOOT_FLAGS: u32 = 1 << 16;
/// Zero-filled bytes after the image (multiboot `bss_end_addr`): the stack.
const STACK_SIZE: u32 = 4096;

const COM1: u32 = 0x3f8;
/// Interrupt enable register (DLM while DLAB is set).
const COM1_IER: u32 = COM1 + 1;
/// FIFO control register (write).
const COM1_FCR: u32 = COM1 + 2;
/// Line control register.
const COM1_LCR: u32 = COM1 + 3;
/// Modem control register.
const COM1_MCR: u32 = COM1 + 4;
/// Line status register.
const COM1_LSR: u32 = COM1 + 5;
/// LSR: a received byte is ready.
const LSR_DATA_READY: u8 = 0x01;
/// LSR: the transmit holding register (the whole transmit FIFO when FIFOs are on) is empty.
const LSR_THR_EMPTY: u8 = 0x20;
/// LSR: the transmitter is idle (FIFO and shift register empty).
const LSR_TX_IDLE: u8 = 0x40;
/// The 16550's transmit FIFO depth: after LSR_THR_EMPTY, this many bytes fit without loss.
const UART_FIFO: u32 = 16;

const PCI_CONFIG_ADDRESS: u32 = 0xcf8;
const PCI_CONFIG_DATA: u32 = 0xcfc;

/// A PCI configuration-space address for port 0xcf8 (bus 0).
const fn pci_address(device: u32, function: u32, register: u32) -> u32 {
    0x8000_0000 | (device << 11) | (function << 8) | register
}

/// Vendor/device dword of QEMU's ICH9 LPC bridge (q35).
const ICH9_LPC_ID: u32 = 0x2918_8086;
/// Vendor/device dword of QEMU's PIIX4 power-management function (pc).
const PIIX4_PM_ID: u32 = 0x7113_8086;
/// ICH9 ACPI_CNTL: bit 7 (ACPI_EN) maps the PM I/O space.
const ICH9_ACPI_EN: u32 = 0x80;
/// PIIX4 PMREGMISC: bit 0 (PMIOSE) maps the PM I/O space.
const PIIX4_PMIOSE: u32 = 0x01;
/// Base-address bits of the PM base register (bit 0 is the "I/O space" indicator).
const PM_BASE_MASK: u32 = 0xffc0;

/// PM1a_STS / PM1a_EN bit 8: power button.
const PWRBTN: u32 = 1 << 8;
/// PM1a_CNT bit 13: SLP_EN (with SLP_TYP 0, QEMU's S5 soft-off).
const SLP_EN: u32 = 1 << 13;
/// PM1a_EN offset from the PM base.
const PM1A_EN: u32 = 2;
/// PM1a_CNT offset from the PM base.
const PM1A_CNT: u32 = 4;
/// PM timer offset from the PM base (24-bit counter at 3.579545 MHz).
const PM_TMR: u32 = 8;
/// PM timer ticks per second.
const PM_TIMER_HZ: u32 = 3_579_545;

const CR: u8 = b'\r';
const LF: u8 = b'\n';
const BS: u8 = 0x08;
const DEL: u8 = 0x7f;

/// The guest program: the emitter plus the strings collected while emitting code.
///
/// Register conventions (everything runs with interrupts off on one CPU):
/// - EBX: length of the command line typed so far (may exceed LINE_MAX: overflow is counted);
/// - EBP: 1 when the last byte received was CR (so a following LF is swallowed);
/// - the subroutines preserve EBX and EBP; `putc` preserves everything but the flags.
struct Program {
    asm: Asm,
    strings: Vec<(Label, Vec<u8>)>,
}

/// The routine and variable labels, created up front so code may refer to them in any order.
struct Labels {
    entry: Label,
    image_end: Label,
    putc: Label,
    puts: Label,
    uart_drain: Label,
    pci_read: Label,
    pci_write: Label,
    pm_init: Label,
    on_char: Label,
    execute: Label,
    match_exact: Label,
    match_prefix: Label,
    parse_number: Label,
    flood: Label,
    exit: Label,
    poweroff: Label,
    panic: Label,
    help: Label,
    pm_base: Label,
    line_buf: Label,
    pattern: Label,
    null_idtr: Label,
}

impl Program {
    fn new() -> Program {
        Program {
            asm: Asm::new(LOAD_ADDRESS),
            strings: Vec::new(),
        }
    }

    /// A string constant placed in the data area; returns its label and length.
    fn string(&mut self, text: &[u8]) -> (Label, u32) {
        let label = self.asm.label();
        self.strings.push((label, text.to_vec()));
        // Strings are short literals of this file.
        (label, u32::try_from(text.len()).unwrap_or(u32::MAX))
    }

    /// `mov esi, text; mov ecx, len; call puts`.
    fn print(&mut self, l: &Labels, text: &[u8]) {
        let (label, len) = self.string(text);
        self.asm.mov_addr(R32::Esi, label);
        self.asm.mov_imm(R32::Ecx, len);
        self.asm.call(l.puts);
    }

    /// Busy-waits one second of ACPI PM timer (24-bit, wrapping); the PM base must be known
    /// (clobbers EAX, ECX, EDX).
    fn wait_pm_second(&mut self, l: &Labels) {
        let a = &mut self.asm;
        a.load(R32::Edx, l.pm_base);
        a.add_imm(R32::Edx, PM_TMR);
        a.in_eax_dx();
        a.mov(R32::Ecx, R32::Eax);
        let wait = a.bound_label();
        a.in_eax_dx();
        a.sub(R32::Eax, R32::Ecx);
        a.and_imm(R32::Eax, 0x00ff_ffff);
        a.cmp_imm(R32::Eax, PM_TIMER_HZ);
        a.jcc(Cond::B, wait);
    }

    /// `mov edx, port; mov al, value; out dx, al`.
    fn outb(&mut self, port: u32, value: u8) {
        self.asm.mov_imm(R32::Edx, port);
        self.asm.mov_al(value);
        self.asm.out_dx_al();
    }

    /// `mov edx, LSR; .wait: in al, dx; test al, bit; jz .wait` (clobbers EAX, EDX).
    fn wait_lsr(&mut self, bit: u8) {
        self.asm.mov_imm(R32::Edx, COM1_LSR);
        let wait = self.asm.bound_label();
        self.asm.in_al_dx();
        self.asm.test_al(bit);
        self.asm.jcc(Cond::E, wait);
    }

    fn assemble(mut self) -> Vec<u8> {
        let a = &mut self.asm;
        let l = Labels {
            entry: a.label(),
            image_end: a.label(),
            putc: a.label(),
            puts: a.label(),
            uart_drain: a.label(),
            pci_read: a.label(),
            pci_write: a.label(),
            pm_init: a.label(),
            on_char: a.label(),
            execute: a.label(),
            match_exact: a.label(),
            match_prefix: a.label(),
            parse_number: a.label(),
            flood: a.label(),
            exit: a.label(),
            poweroff: a.label(),
            panic: a.label(),
            help: a.label(),
            pm_base: a.label(),
            line_buf: a.label(),
            pattern: a.label(),
            null_idtr: a.label(),
        };
        self.header(&l);
        self.main(&l);
        self.serial_routines(&l);
        self.pm_routines(&l);
        self.line_editor(&l);
        self.interpreter(&l);
        self.commands(&l);
        self.data(&l);
        self.asm.finish()
    }

    /// The multiboot v1 header (must sit in the first 8 KiB, 4-byte aligned: it is at 0).
    fn header(&mut self, l: &Labels) {
        let a = &mut self.asm;
        let header = a.bound_label();
        a.dd(MULTIBOOT_MAGIC);
        a.dd(MULTIBOOT_FLAGS);
        a.dd(MULTIBOOT_MAGIC.wrapping_add(MULTIBOOT_FLAGS).wrapping_neg()); // checksum
        a.dd_label(header); // header_addr
        a.dd(LOAD_ADDRESS); // load_addr: the image starts with this header
        a.dd_label(l.image_end); // load_end_addr
        a.dd_label_plus(l.image_end, STACK_SIZE); // bss_end_addr: zero-filled stack
        a.dd_label(l.entry); // entry_addr
    }

    /// Entry point and idle loop.
    fn main(&mut self, l: &Labels) {
        // entry: interrupts stay off forever; string instructions count upwards.
        self.asm.bind(l.entry);
        self.asm.cli();
        self.asm.cld();
        self.asm.mov_addr_plus(R32::Esp, l.image_end, STACK_SIZE);
        // UART: no interrupts; DLAB on; divisor 1 (115200); 8N1 (DLAB off);
        // FIFO enable + clear both + 14-byte trigger; DTR|RTS.
        self.outb(COM1_IER, 0x00);
        self.outb(COM1_LCR, 0x80);
        self.outb(COM1, 0x01);
        self.outb(COM1_IER, 0x00);
        self.outb(COM1_LCR, 0x03);
        self.outb(COM1_FCR, 0xc7);
        self.outb(COM1_MCR, 0x03);
        self.asm.call(l.pm_init);
        let banner = [BANNER.as_bytes(), b"\r\n", PROMPT.as_bytes()].concat();
        self.print(l, &banner);
        let a = &mut self.asm;
        a.xor(R32::Ebx, R32::Ebx); // empty line
        a.xor(R32::Ebp, R32::Ebp); // last byte was not CR

        // idle: poll the UART, then the power button, forever.
        let idle = a.bound_label();
        let no_rx = a.label();
        a.mov_imm(R32::Edx, COM1_LSR);
        a.in_al_dx();
        a.test_al(LSR_DATA_READY);
        a.jcc(Cond::E, no_rx);
        a.mov_imm(R32::Edx, COM1);
        a.in_al_dx();
        a.call(l.on_char);
        a.bind(no_rx);
        a.load(R32::Edx, l.pm_base); // 0 when no ACPI PM was found
        a.test(R32::Edx, R32::Edx);
        a.jcc(Cond::E, idle);
        a.in_ax_dx(); // PM1a_STS
        a.test_ax(PWRBTN as u16);
        a.jcc(Cond::E, idle);
        a.mov_imm(R32::Eax, PWRBTN);
        a.out_dx_ax(); // write 1 to clear PWRBTN_STS
        let line = [POWER_BUTTON_LINE.as_bytes(), b"\r\n"].concat();
        self.print(l, &line);
        self.asm.call(l.poweroff); // returns only if the power-off failed
        self.asm.jmp(idle);
    }

    /// putc, puts, uart_drain.
    fn serial_routines(&mut self, l: &Labels) {
        // putc(al): wait for room, write al. Preserves all registers.
        self.asm.bind(l.putc);
        self.asm.push(R32::Edx);
        self.asm.push(R32::Eax);
        self.wait_lsr(LSR_THR_EMPTY);
        let a = &mut self.asm;
        a.pop(R32::Eax);
        a.mov_imm(R32::Edx, COM1);
        a.out_dx_al();
        a.pop(R32::Edx);
        a.ret();

        // puts(esi = bytes, ecx = length). Clobbers EAX, ECX, ESI.
        a.bind(l.puts);
        let done = a.label();
        a.test(R32::Ecx, R32::Ecx);
        a.jcc(Cond::E, done);
        let next = a.bound_label();
        a.lodsb();
        a.call(l.putc);
        a.dec(R32::Ecx);
        a.jcc(Cond::Ne, next);
        a.bind(done);
        a.ret();

        // uart_drain: wait until every written byte has left the UART (before a reset or
        // power-off would discard the FIFO). Clobbers EAX, EDX.
        a.bind(l.uart_drain);
        self.wait_lsr(LSR_TX_IDLE);
        self.asm.ret();
    }

    /// pci_read, pci_write, pm_init.
    fn pm_routines(&mut self, l: &Labels) {
        let a = &mut self.asm;
        // pci_read(eax = config address) -> eax = dword. Clobbers EDX.
        a.bind(l.pci_read);
        a.mov_imm(R32::Edx, PCI_CONFIG_ADDRESS);
        a.out_dx_eax();
        a.mov_imm(R32::Edx, PCI_CONFIG_DATA);
        a.in_eax_dx();
        a.ret();

        // pci_write(eax = config address, ecx = dword). Clobbers EAX, EDX.
        a.bind(l.pci_write);
        a.mov_imm(R32::Edx, PCI_CONFIG_ADDRESS);
        a.out_dx_eax();
        a.mov(R32::Eax, R32::Ecx);
        a.mov_imm(R32::Edx, PCI_CONFIG_DATA);
        a.out_dx_eax();
        a.ret();

        // pm_init: find the chipset's PM function; ESI = its base register, EDI = its enable
        // register, EBX = the enable bit. Leaves pm_base at 0 when neither chipset is found.
        // Runs before EBX/EBP take their global roles.
        a.bind(l.pm_init);
        let piix = a.label();
        let found = a.label();
        let have_base = a.label();
        let none = a.label();
        a.mov_imm(R32::Eax, pci_address(0x1f, 0, 0x00));
        a.call(l.pci_read);
        a.cmp_imm(R32::Eax, ICH9_LPC_ID);
        a.jcc(Cond::Ne, piix);
        a.mov_imm(R32::Esi, pci_address(0x1f, 0, 0x40)); // PMBASE
        a.mov_imm(R32::Edi, pci_address(0x1f, 0, 0x44)); // ACPI_CNTL
        a.mov_imm(R32::Ebx, ICH9_ACPI_EN);
        a.jmp(found);
        a.bind(piix);
        a.mov_imm(R32::Eax, pci_address(0x01, 3, 0x00));
        a.call(l.pci_read);
        a.cmp_imm(R32::Eax, PIIX4_PM_ID);
        a.jcc(Cond::Ne, none);
        a.mov_imm(R32::Esi, pci_address(0x01, 3, 0x40)); // PMBA
        a.mov_imm(R32::Edi, pci_address(0x01, 3, 0x80)); // PMREGMISC
        a.mov_imm(R32::Ebx, PIIX4_PMIOSE);
        a.bind(found);
        a.mov(R32::Eax, R32::Esi);
        a.call(l.pci_read);
        a.and_imm(R32::Eax, PM_BASE_MASK);
        a.jcc(Cond::Ne, have_base);
        // The firmware left it unset: program QEMU's default.
        a.mov(R32::Eax, R32::Esi);
        a.mov_imm(R32::Ecx, u32::from(DEFAULT_PM_BASE) | 1);
        a.call(l.pci_write);
        a.mov_imm(R32::Eax, u32::from(DEFAULT_PM_BASE));
        a.bind(have_base);
        a.store(l.pm_base, R32::Eax);
        // Map the PM I/O space: enable register |= enable bit.
        a.mov(R32::Eax, R32::Edi);
        a.call(l.pci_read);
        a.or(R32::Eax, R32::Ebx);
        a.mov(R32::Ecx, R32::Eax);
        a.mov(R32::Eax, R32::Edi);
        a.call(l.pci_write);
        // Clear a stale PWRBTN_STS (write 1), then set PWRBTN_EN.
        a.load(R32::Edx, l.pm_base);
        a.mov_imm(R32::Eax, PWRBTN);
        a.out_dx_ax();
        a.add_imm(R32::Edx, PM1A_EN);
        a.out_dx_ax();
        a.bind(none);
        a.ret();
    }

    /// on_char(al): echo, line editing, and running the line at CR or LF.
    fn line_editor(&mut self, l: &Labels) {
        let a = &mut self.asm;
        let cr = a.label();
        let lf = a.label();
        let erase = a.label();
        let full = a.label();
        let run = a.label();
        let done = a.label();
        a.bind(l.on_char);
        a.cmp_al(CR);
        a.jcc(Cond::E, cr);
        a.cmp_al(LF);
        a.jcc(Cond::E, lf);
        a.xor(R32::Ebp, R32::Ebp);
        a.cmp_al(BS);
        a.jcc(Cond::E, erase);
        a.cmp_al(DEL);
        a.jcc(Cond::E, erase);
        // An ordinary byte: store it if it fits, count it anyway, echo it.
        a.cmp_imm(R32::Ebx, LINE_MAX as u32);
        a.jcc(Cond::Ae, full);
        a.store_al_indexed(l.line_buf, R32::Ebx);
        a.bind(full);
        a.inc(R32::Ebx);
        a.call(l.putc);
        a.ret();

        a.bind(erase);
        a.test(R32::Ebx, R32::Ebx);
        a.jcc(Cond::E, done);
        a.dec(R32::Ebx);
        self.print(l, b"\x08 \x08");
        let a = &mut self.asm;
        a.bind(done);
        a.ret();

        // LF right after CR closes the same line: swallow it.
        a.bind(lf);
        a.test(R32::Ebp, R32::Ebp);
        a.jcc(Cond::E, run);
        a.xor(R32::Ebp, R32::Ebp);
        a.ret();

        a.bind(cr);
        a.mov_imm(R32::Ebp, 1);
        a.bind(run);
        self.print(l, b"\r\n");
        self.asm.call(l.execute);
        self.asm.xor(R32::Ebx, R32::Ebx);
        self.print(l, PROMPT.as_bytes());
        self.asm.ret();
    }

    /// execute, match_exact, match_prefix, parse_number.
    fn interpreter(&mut self, l: &Labels) {
        let too_long = self.asm.label();
        let flood = self.asm.label();
        let exit = self.asm.label();
        let bad_number = self.asm.label();
        let empty = self.asm.label();

        // execute: run line_buf[..ebx]. Clobbers EAX, ECX, EDX, ESI, EDI.
        self.asm.bind(l.execute);
        self.asm.test(R32::Ebx, R32::Ebx);
        self.asm.jcc(Cond::E, empty);
        self.asm.cmp_imm(R32::Ebx, LINE_MAX as u32);
        self.asm.jcc(Cond::A, too_long);
        for (name, target, matcher) in [
            (CMD_POWEROFF.to_string(), l.poweroff, l.match_exact),
            (CMD_PANIC.to_string(), l.panic, l.match_exact),
            (CMD_HELP.to_string(), l.help, l.match_exact),
            (format!("{CMD_FLOOD} "), flood, l.match_prefix),
            (format!("{CMD_EXIT} "), exit, l.match_prefix),
        ] {
            let (literal, len) = self.string(name.as_bytes());
            self.asm.mov_addr(R32::Edi, literal);
            self.asm.mov_imm(R32::Ecx, len);
            self.asm.call(matcher);
            // Tail jump: the command returns straight to execute's caller.
            self.asm.jcc(Cond::E, target);
        }
        self.print(l, b"ERR unknown command: ");
        self.asm.mov_addr(R32::Esi, l.line_buf);
        self.asm.mov(R32::Ecx, R32::Ebx);
        self.asm.call(l.puts);
        self.print(l, b" (try help)\r\n");
        self.asm.bind(empty);
        self.asm.ret();

        self.asm.bind(too_long);
        self.print(l, b"ERR line too long\r\n");
        self.asm.ret();

        self.asm.bind(flood);
        self.asm.call(l.parse_number);
        self.asm.jcc(Cond::B, bad_number);
        self.asm.jmp(l.flood);
        self.asm.bind(exit);
        self.asm.call(l.parse_number);
        self.asm.jcc(Cond::B, bad_number);
        self.asm.jmp(l.exit);
        self.asm.bind(bad_number);
        self.print(l, b"ERR bad number\r\n");
        self.asm.ret();

        let a = &mut self.asm;
        // match_exact(edi = literal, ecx = length) -> ZF: the line equals the literal.
        let out = a.label();
        a.bind(l.match_exact);
        a.cmp(R32::Ebx, R32::Ecx);
        a.jcc(Cond::Ne, out);
        a.mov_addr(R32::Esi, l.line_buf);
        a.repe_cmpsb();
        a.bind(out);
        a.ret();

        // match_prefix(edi = literal, ecx = length) -> ZF: the line starts with the literal;
        // ESI then points just past it. A line shorter than the literal fails with ZF clear
        // (the `cmp` that detected it found them unequal).
        let out = a.label();
        a.bind(l.match_prefix);
        a.cmp(R32::Ebx, R32::Ecx);
        a.jcc(Cond::B, out);
        a.mov_addr(R32::Esi, l.line_buf);
        a.repe_cmpsb();
        a.bind(out);
        a.ret();

        // parse_number(esi = first digit; the line ends at line_buf + ebx) -> eax, CF on error.
        // One to nine digits, so the value cannot overflow. Clobbers ECX, EDX, ESI.
        let bad = a.label();
        let ok = a.label();
        a.bind(l.parse_number);
        a.mov_addr(R32::Edx, l.line_buf);
        a.add(R32::Edx, R32::Ebx); // end of line
        a.mov(R32::Ecx, R32::Edx);
        a.sub(R32::Ecx, R32::Esi); // digit count
        a.jcc(Cond::E, bad);
        a.cmp_imm(R32::Ecx, 9);
        a.jcc(Cond::A, bad);
        a.xor(R32::Eax, R32::Eax);
        let digit = a.bound_label();
        a.cmp(R32::Esi, R32::Edx);
        a.jcc(Cond::Ae, ok);
        a.movzx_byte(R32::Ecx, R32::Esi);
        a.inc(R32::Esi);
        a.sub_imm(R32::Ecx, u32::from(b'0'));
        a.cmp_imm(R32::Ecx, 9);
        a.jcc(Cond::A, bad); // unsigned: catches bytes below '0' too
        a.imul_imm8(R32::Eax, R32::Eax, 10);
        a.add(R32::Eax, R32::Ecx);
        a.jmp(digit);
        a.bind(ok);
        a.clc();
        a.ret();
        a.bind(bad);
        a.stc();
        a.ret();
    }

    /// flood, exit, poweroff, panic, help.
    fn commands(&mut self, l: &Labels) {
        // help: the list of commands.
        self.asm.bind(l.help);
        self.print(l, HELP_TEXT.as_bytes());
        self.asm.ret();

        // flood(eax = N): EDI = bytes left, ESI = index into the pattern cycle. Waits for an
        // empty transmit FIFO, then writes up to 16 bytes without looking: one status read per
        // 16 bytes instead of one per byte, and never more than the FIFO holds, so a slow
        // reader throttles the guest instead of losing bytes.
        self.asm.bind(l.flood);
        self.asm.mov(R32::Edi, R32::Eax);
        self.asm.xor(R32::Esi, R32::Esi);
        let outer = self.asm.bound_label();
        let finished = self.asm.label();
        self.asm.test(R32::Edi, R32::Edi);
        self.asm.jcc(Cond::E, finished);
        self.wait_lsr(LSR_THR_EMPTY);
        let a = &mut self.asm;
        let burst = a.label();
        a.mov(R32::Ecx, R32::Edi);
        a.cmp_imm(R32::Ecx, UART_FIFO);
        a.jcc(Cond::B, burst);
        a.mov_imm(R32::Ecx, UART_FIFO);
        a.bind(burst);
        a.sub(R32::Edi, R32::Ecx);
        a.mov_imm(R32::Edx, COM1);
        let byte = a.bound_label();
        a.mov(R32::Eax, R32::Esi);
        a.and_imm(R32::Eax, (FLOOD_PATTERN.len() - 1) as u32);
        a.load_al_indexed(l.pattern, R32::Eax);
        a.out_dx_al();
        a.inc(R32::Esi);
        a.dec(R32::Ecx);
        a.jcc(Cond::Ne, byte);
        a.jmp(outer);
        a.bind(finished);
        let marker = [b"\r\n", FLOOD_DONE.as_bytes(), b"\r\n"].concat();
        self.print(l, &marker);
        self.asm.ret();

        // exit(eax = CODE): on QEMU 7.2 the isa-debug-exit write ends QEMU synchronously; from
        // QEMU 10 on it is a shutdown request that QEMU's main loop carries out a little later,
        // while this vCPU runs on. So wait up to one second of ACPI PM timer (where there is
        // one) before saying there is no such device.
        let no_device = self.asm.label();
        self.asm.bind(l.exit);
        let a = &mut self.asm;
        a.mov_imm(R32::Edx, u32::from(DEBUG_EXIT_IOBASE));
        a.out_dx_eax();
        a.load(R32::Edx, l.pm_base);
        a.test(R32::Edx, R32::Edx);
        a.jcc(Cond::E, no_device);
        self.wait_pm_second(l);
        self.asm.bind(no_device);
        self.print(l, b"ERR no isa-debug-exit device\r\n");
        self.asm.ret();

        // poweroff: S5 through PM1a_CNT. QEMU acts on the request asynchronously, so wait up to
        // one second of PM timer (24-bit, wrapping) before declaring failure.
        let no_pm = self.asm.label();
        self.asm.bind(l.poweroff);
        self.asm.load(R32::Edx, l.pm_base);
        self.asm.test(R32::Edx, R32::Edx);
        self.asm.jcc(Cond::E, no_pm);
        let line = [POWEROFF_LINE.as_bytes(), b"\r\n"].concat();
        self.print(l, &line);
        self.asm.call(l.uart_drain);
        let a = &mut self.asm;
        a.load(R32::Edx, l.pm_base);
        a.add_imm(R32::Edx, PM1A_CNT);
        a.mov_imm(R32::Eax, SLP_EN);
        a.out_dx_ax();
        self.wait_pm_second(l);
        self.print(l, b"ERR poweroff failed\r\n");
        self.asm.ret();
        self.asm.bind(no_pm);
        self.print(l, b"ERR no ACPI PM found\r\n");
        self.asm.ret();

        // panic: an IDT of limit 0 turns the #UD into #GP, then #DF, then a triple fault, which
        // QEMU turns into a machine reset.
        self.asm.bind(l.panic);
        let line = [PANIC_LINE.as_bytes(), b"\r\n"].concat();
        self.print(l, &line);
        self.asm.call(l.uart_drain);
        let a = &mut self.asm;
        a.lidt(l.null_idtr);
        a.ud2();
        let stop = a.bound_label();
        a.hlt();
        a.jmp(stop);
    }

    /// Variables, tables and strings; then the end of the loaded image.
    fn data(&mut self, l: &Labels) {
        let a = &mut self.asm;
        a.align(4);
        a.bind(l.pm_base);
        a.dd(0);
        a.bind(l.null_idtr); // limit 0, base 0
        a.bytes(&[0; 6]);
        a.align(64);
        a.bind(l.pattern);
        a.bytes(FLOOD_PATTERN);
        a.bind(l.line_buf);
        a.bytes(&[0; LINE_MAX]);
        for (label, text) in std::mem::take(&mut self.strings) {
            self.asm.bind(label);
            self.asm.bytes(&text);
        }
        self.asm.align(16);
        self.asm.bind(l.image_end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(image: &[u8], index: usize) -> u32 {
        let at = index * 4;
        u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]])
    }

    #[test]
    fn multiboot_header_checksums_and_flags() {
        let image = kernel_image();
        assert_eq!(word(&image, 0), MULTIBOOT_MAGIC);
        assert_eq!(word(&image, 1), 1 << 16, "only the address-fields flag");
        assert_eq!(
            word(&image, 0)
                .wrapping_add(word(&image, 1))
                .wrapping_add(word(&image, 2)),
            0
        );
    }

    #[test]
    fn multiboot_addresses_describe_the_image() {
        let image = kernel_image();
        let len = u32::try_from(image.len()).unwrap();
        assert_eq!(
            word(&image, 3),
            LOAD_ADDRESS,
            "header_addr: header at offset 0"
        );
        assert_eq!(word(&image, 4), LOAD_ADDRESS, "load_addr");
        assert_eq!(word(&image, 5), LOAD_ADDRESS + len, "load_end_addr");
        assert_eq!(word(&image, 6), LOAD_ADDRESS + len + STACK_SIZE, "bss_end");
        let entry = word(&image, 7);
        assert_eq!(entry, LOAD_ADDRESS + 32, "code right after the header");
        // The entry starts with `cli; cld; mov esp, top_of_stack`.
        assert_eq!(&image[32..35], &[0xfa, 0xfc, 0xbc]);
        assert_eq!(word(&image[35..], 0), LOAD_ADDRESS + len + STACK_SIZE);
        assert_eq!(image.len() % 16, 0);
    }

    #[test]
    fn image_is_small_and_not_mistaken_for_linux() {
        let image = kernel_image();
        assert!(
            image.len() < 8192,
            "header and code within 8 KiB: {}",
            image.len()
        );
        // QEMU treats a file with "HdrS" at 0x202 as a Linux kernel.
        assert_ne!(image.get(0x202..0x206), Some(&b"HdrS"[..]));
        // Not an ELF either: the a.out kludge path must be taken.
        assert_ne!(&image[..4], b"\x7fELF");
    }

    #[test]
    fn image_is_deterministic() {
        assert_eq!(kernel_image(), kernel_image());
    }

    #[test]
    fn image_carries_the_texts_the_protocol_promises() {
        let image = kernel_image();
        let contains = |needle: &[u8]| image.windows(needle.len()).any(|w| w == needle);
        let banner = [BANNER.as_bytes(), b"\r\n", PROMPT.as_bytes()].concat();
        assert!(contains(&banner));
        assert!(contains(FLOOD_PATTERN));
        for text in [FLOOD_DONE, POWEROFF_LINE, POWER_BUTTON_LINE, PANIC_LINE] {
            assert!(contains(text.as_bytes()), "{text}");
        }
        assert!(contains(HELP_TEXT.as_bytes()));
        for command in ["poweroff", "panic", "help", "flood ", "exit "] {
            assert!(contains(command.as_bytes()), "{command}");
        }
    }

    #[test]
    fn flood_pattern_is_a_power_of_two_cycle_ending_in_newline() {
        assert!(FLOOD_PATTERN.len().is_power_of_two());
        assert_eq!(FLOOD_PATTERN.last(), Some(&b'\n'));
        assert!(!FLOOD_PATTERN
            .windows(FLOOD_DONE.len())
            .any(|w| w == FLOOD_DONE.as_bytes()));
    }

    #[test]
    fn commands_format_as_the_guest_parses_them() {
        assert_eq!(Command::Flood(1000).to_line(), "flood 1000\n");
        assert_eq!(Command::Exit(5).to_string(), "exit 5");
        assert_eq!(Command::Poweroff.to_string(), "poweroff");
        assert_eq!(Command::Panic.to_string(), "panic");
        assert_eq!(Command::Help.to_string(), "help");
        // Every command is listed by `help`, in its own line.
        for command in [CMD_FLOOD, CMD_EXIT, CMD_POWEROFF, CMD_PANIC, CMD_HELP] {
            assert!(
                HELP_TEXT
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(command)),
                "{command}"
            );
        }
        assert!(HELP_TEXT.split_inclusive('\n').all(|l| l.ends_with("\r\n")));
    }

    #[test]
    fn exit_status_follows_isa_debug_exit() {
        assert_eq!(exit_status_for(5), 11);
        assert_eq!(exit_status_for(0), 1);
        assert_eq!(exit_status_for(127), 255);
        assert_eq!(exit_status_for(128), 1, "only 8 bits survive");
    }

    #[test]
    fn qemu_args_boot_each_machine() {
        let kernel = Path::new("/k/guest.bin");
        let q35 = qemu_args(kernel, GuestMachine::Q35);
        let expected: Vec<OsString> = [
            "-M",
            "q35",
            "-bios",
            QBOOT_ROM,
            "-kernel",
            "/k/guest.bin",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(q35, expected);
        let pc = qemu_args(kernel, GuestMachine::Pc);
        assert_eq!(&pc[..2], &[OsString::from("-M"), OsString::from("pc")]);
        assert!(
            !pc.iter().any(|a| a == "-bios"),
            "pc uses SeaBIOS, the default"
        );
    }

    #[test]
    fn write_kernel_writes_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_kernel(dir.path()).unwrap();
        assert_eq!(path, dir.path().join(KERNEL_FILE_NAME));
        assert_eq!(std::fs::read(&path).unwrap(), kernel_image());
    }
}
