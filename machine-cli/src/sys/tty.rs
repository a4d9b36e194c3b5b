//! The terminal mode of `run`: keys go to the guest as they are typed, the guest echoes them,
//! and Ctrl-C still raises SIGINT. The previous mode comes back when the guard drops.

use std::io::IsTerminal;

use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};

use crate::error::{Error, Result};

/// Restores the terminal's previous mode on drop.
pub struct KeysToGuest {
    saved: Termios,
}

impl KeysToGuest {
    /// Turns off line editing and local echo on stdin (keeping signals), if stdin is a
    /// terminal; `None` otherwise.
    pub fn enable() -> Result<Option<KeysToGuest>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin).map_err(|errno| Error::Io {
            what: "reading the terminal mode",
            source: errno.into(),
        })?;
        let mut keys = saved.clone();
        keys.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO);
        keys.local_flags.insert(LocalFlags::ISIG);
        keys.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        keys.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &keys).map_err(|errno| Error::Io {
            what: "setting the terminal mode",
            source: errno.into(),
        })?;
        Ok(Some(KeysToGuest { saved }))
    }
}

impl Drop for KeysToGuest {
    fn drop(&mut self) {
        if let Err(errno) = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved) {
            log::warn!("cannot restore the terminal mode: {errno}");
        }
    }
}
