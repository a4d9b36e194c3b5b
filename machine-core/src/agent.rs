//! The guest agent channel: a socketpair handed to QEMU as the chardev of a guest port, and the
//! [`qmp_client::Agent`] on our end, reachable through [`Machine::agent`].

use std::ffi::OsString;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use qmp_client::{Agent, AgentConfig};

use crate::error::{Error, Result};
use crate::machine::Machine;

/// The chardev id of the agent channel.
pub const AGENT_CHARDEV: &str = "qga0";

/// Which guest device carries the agent channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentChannel {
    /// An ISA serial port (`-device isa-serial,chardev=qga0`): the guest sees the next free
    /// `ttyS` (`ttyS1` when the console is the first serial port) and runs
    /// `qemu-ga -m isa-serial -p /dev/ttyS1`. Needs no guest module (the 8250 UART is built
    /// into common kernels), unlike virtio-serial.
    #[default]
    IsaSerial,
}

/// The agent settings a [`crate::MachineBuilder`] keeps.
#[derive(Clone, Debug)]
pub(crate) struct AgentSettings {
    pub(crate) channel: AgentChannel,
    pub(crate) config: AgentConfig,
}

/// A fresh socketpair for one launch: our end, and QEMU's end moved to fd 3 or above.
pub(crate) fn agent_pair() -> Result<(UnixStream, OwnedFd)> {
    let (ours, theirs) = UnixStream::pair().map_err(Error::os("agent socketpair"))?;
    let theirs = crate::sys::above_stdio(OwnedFd::from(theirs))
        .map_err(Error::os("dup of the agent socket"))?;
    Ok((ours, theirs))
}

/// The QEMU arguments of the channel on QEMU's end `fd`.
pub(crate) fn agent_args(channel: AgentChannel, fd: RawFd) -> Vec<OsString> {
    match channel {
        AgentChannel::IsaSerial => vec![
            "-chardev".into(),
            format!("socket,id={AGENT_CHARDEV},fd={fd}").into(),
            "-device".into(),
            format!("isa-serial,chardev={AGENT_CHARDEV}").into(),
        ],
    }
}

/// Our end of the channel as an [`Agent`].
pub(crate) fn agent_client(stream: UnixStream, settings: &AgentSettings) -> Result<Agent> {
    Agent::from_unix_stream(stream, &settings.config).map_err(|source| Error::Agent { source })
}

impl Machine {
    /// The guest agent of the running machine (see [`crate::MachineBuilder::guest_agent`]).
    ///
    /// [`Error::NoAgent`] when the machine has no agent channel, [`Error::NotRunning`] before
    /// the first launch. After QEMU exits, calls on it fail with a closed channel.
    pub fn agent(&mut self) -> Result<&mut Agent> {
        if self.config().agent.is_none() {
            return Err(Error::NoAgent);
        }
        self.agent_slot().as_mut().ok_or(Error::NotRunning)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MachineBuilder;

    #[test]
    fn a_machine_without_the_channel_says_so_and_one_with_it_adds_the_device() {
        let mut plain = MachineBuilder::new("qemu-system-x86_64").build();
        assert!(matches!(plain.agent(), Err(Error::NoAgent)));
        let mut with = MachineBuilder::new("qemu-system-x86_64")
            .guest_agent(AgentChannel::IsaSerial)
            .build();
        assert!(matches!(with.agent(), Err(Error::NotRunning)));
        assert_eq!(
            agent_args(AgentChannel::IsaSerial, 7),
            [
                "-chardev",
                "socket,id=qga0,fd=7",
                "-device",
                "isa-serial,chardev=qga0"
            ]
            .map(OsString::from)
        );
    }
}
