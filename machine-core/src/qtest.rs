//! QEMU's qtest channel: a typed client for the qtest line protocol and a machine that adds
//! the channel to a QEMU launch (parity with `qemu.machine.qtest`).
//!
//! [`QtestProtocol`] speaks the protocol over any connected unix stream: port and memory
//! access (`outb`..`inl`, `readb`..`writeq`, `read`/`write`, `b64read`/`b64write`,
//! `memset`), virtual clock control (`clock_step`, `clock_set`, with `-accel qtest`), IRQ
//! interception (`irq_intercept_in`/`irq_intercept_out`, `set_irq_in`) and raw commands. Every
//! command has a deadline, and the asynchronous `IRQ raise N` / `IRQ lower N` lines QEMU writes
//! after an intercept are delivered as [`IrqEvent`]s, never taken for a reply (the weak point
//! of the Python original, which reads exactly one line per command).
//!
//! [`QtestMachine`] wraps a [`crate::Machine`]: each launch adds a fresh socketpair as
//! `-chardev socket,id=qtest,fd=N -qtest chardev:qtest` (and `-accel qtest` unless told
//! otherwise, see [`QtestAccel`]) and exposes the protocol through [`QtestMachine::qtest`].
//!
//! Errors of this module are [`Error`]; they convert into the crate's [`crate::Error`]
//! (`Error::Qtest`) with `?`, so one function can drive QMP and qtest.
//!
//! ```no_run
//! use std::os::unix::net::UnixStream;
//! use std::time::Duration;
//! use machine_core::qtest::{Config, IrqEdge, QtestProtocol};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // One end of a socketpair whose other end QEMU got as
//! // `-chardev socket,id=qtest,fd=N -qtest chardev:qtest`.
//! # let (ours, _qemus) = UnixStream::pair()?;
//! let mut qtest = QtestProtocol::from_unix_stream(ours, Config::default())?;
//! // ACPI PM base of the PIIX4 PM function (0:1.3, register 0x40) through 0xcf8/0xcfc.
//! qtest.outl(0xcf8, 0x8000_0b40)?;
//! let pm_base = qtest.inl(0xcfc)? & 0xffc0;
//! // Watch the ISA IRQs: the i8042 raises IRQ 1 when its output buffer fills.
//! qtest.irq_intercept_in("ioapic")?;
//! qtest.outb(0x64, 0xd2)?;
//! qtest.outb(0x60, 0x5a)?;
//! qtest.wait_irq(1, IrqEdge::Raise, Duration::from_secs(1))?;
//! assert!(qtest.irq_level(1));
//! # let _ = pm_base;
//! # Ok(())
//! # }
//! ```

mod error;
mod machine;
mod protocol;
mod wire;

pub use error::{Error, Result};
pub use machine::{QtestAccel, QtestMachine};
pub use protocol::{Config, Endianness, QtestProtocol};
pub use wire::{IrqEdge, IrqEvent};
