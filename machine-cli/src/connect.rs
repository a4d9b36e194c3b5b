//! Opening a QMP connection to an address typed by the user, through `qmp_client`.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use log::debug;
use machine_core::qmp_client::{self, Config, Connection};

use crate::address::Address;
use crate::error::{Error, Result};

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Deadline for connecting and for the greeting.
    pub connect_timeout: Duration,
    /// Deadline for each command.
    pub command_timeout: Duration,
    /// No greeting, no `qmp_capabilities` (qemu-ga speaks QMP without them).
    pub skip_negotiation: bool,
}

impl ConnectOptions {
    /// The client configuration these options give.
    pub fn config(&self) -> Config {
        Config::default()
            .with_connect_timeout(self.connect_timeout)
            .with_greeting_timeout(self.connect_timeout)
            .with_command_timeout(self.command_timeout)
            .with_await_greeting(!self.skip_negotiation)
            .with_negotiate(!self.skip_negotiation)
    }
}

/// Connects to `address` (greeting and negotiation included, unless skipped).
pub fn connect(address: &Address, options: &ConnectOptions) -> Result<Connection> {
    if let Address::Unix(path) = address {
        check_unix_path(path)?;
    }
    let config = options.config();
    let result = match address {
        Address::Unix(path) => Connection::connect_unix(path, &config),
        Address::Tcp(addr) => Connection::connect_tcp(addr.as_str(), &config),
    };
    result.map_err(|source| Error::Connect {
        address: address.to_string(),
        source,
    })
}

/// Says plainly what is wrong with a unix path before connecting: a file that is not a socket
/// (connecting would only say "connection refused"), or a missing path that was meant as
/// `host:port` with a bad port (it would only say "no such file").
fn check_unix_path(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(Error::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let text = path.to_string_lossy();
            match text.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && !text.contains('/') => {
                    Err(Error::BadPort {
                        address: text.to_string(),
                        port: port.to_string(),
                    })
                }
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Closes a connection we are done with. A failure to close cleanly changes nothing for the
/// user (the reply is already printed), so it is only logged.
pub fn close(connection: Connection) {
    if let Err(error) = connection.close() {
        debug!("closing the QMP connection: {error}");
    }
}

/// Whether a client error means the peer went away: end of file, a socket error such as a
/// reset, or a clean close (as opposed to garbage, a bad reply or a timeout).
pub fn peer_gone(error: &qmp_client::Error) -> bool {
    matches!(
        error.root(),
        qmp_client::Error::Eof { .. } | qmp_client::Error::Io { .. } | qmp_client::Error::Closed
    )
}

/// Whether the connection is unusable after `error` (the peer went away, or the session
/// failed for good, e.g. on garbage), as opposed to one call failing (a timeout).
pub fn is_disconnect(error: &qmp_client::Error) -> bool {
    peer_gone(error) || matches!(error, qmp_client::Error::Disconnected { .. })
}
