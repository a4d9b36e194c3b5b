//! Drives a QMP [`Session`] from tokio against real QEMU: the protocol state does no I/O, so
//! an async runtime only moves the bytes.
//!
//! ```text
//! cargo run -p qmp-client --example tokio_session -- [/path/to/qemu-system-x86_64]
//! ```
//!
//! It starts QEMU (`-M none`) with a QMP server socket, connects with tokio's `UnixStream`,
//! and runs the handshake, `query-status`, `stop` with its `STOP` event, and `quit` (whose
//! end-of-file is the clean close), all through one `Session`. Another runtime does the same
//! with its own socket type: write `pending_output()` and `consume_output(n)`, `feed()` what
//! was read (`feed_eof()` at the end), then take replies and events.

use std::path::Path;
use std::time::{Duration, Instant};

use qmp_client::{Config, Session};
use qmp_proto::{Command, EventFilter, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How long any one wait may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let qemu = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "qemu-system-x86_64".to_owned());
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qmp.sock");
    let mut child = std::process::Command::new(&qemu)
        .args(["-M", "none", "-nodefaults", "-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", path.display()))
        .spawn()
        .map_err(|e| format!("cannot start {qemu}: {e}"))?;
    let outcome = talk(&path).await;
    // QEMU has quit when all went well; never leave it behind otherwise.
    if outcome.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    outcome?;
    println!("qemu exited: {status}");
    Ok(())
}

/// The whole conversation, on one session.
async fn talk(path: &Path) -> Result<()> {
    let mut stream = connect(path).await?;
    let mut session = Session::new(&Config::default());
    drive(&mut stream, &mut session, |s| s.is_ready().then_some(())).await?;
    if let Some(greeting) = session.greeting() {
        println!("connected to QEMU {}", greeting.version.qemu);
    }

    let status = request(&mut stream, &mut session, Command::new("query-status")).await?;
    println!("query-status: {}", status.to_value());

    // An event after a command: STOP follows `stop`; events are queued, never lost.
    let since = session.event_seq();
    request(&mut stream, &mut session, Command::new("stop")).await?;
    let filters = [EventFilter::new("STOP")];
    let event = drive(&mut stream, &mut session, |s| {
        s.take_matching_event(&filters, since)
    })
    .await?;
    println!("event: {}", event.event);

    // After our `quit`, QEMU's end-of-file completes the request cleanly.
    request(&mut stream, &mut session, Command::new("quit")).await?;
    println!("quit acknowledged");
    Ok(())
}

/// Connects once QEMU has created its socket (within [`TIMEOUT`]).
async fn connect(path: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot connect to {}: {e}", path.display()).into())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Sends `command` and waits for its reply (a QMP error reply is an error here).
async fn request(
    stream: &mut UnixStream,
    session: &mut Session,
    command: Command,
) -> Result<ServerMessage> {
    let name = command.execute.clone();
    let id = session.send(command)?;
    let reply = drive(stream, session, |s| s.take_reply(id)).await??;
    if let ServerMessage::Error(e) = &reply {
        return Err(format!("{name}: {}: {}", e.error.class.as_str(), e.error.desc).into());
    }
    Ok(reply)
}

/// The whole I/O side: write what the session wants written, read and feed until `done`
/// returns a value, each read within [`TIMEOUT`].
async fn drive<T>(
    stream: &mut UnixStream,
    session: &mut Session,
    mut done: impl FnMut(&mut Session) -> Option<T>,
) -> Result<T> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(value) = done(session) {
            return Ok(value);
        }
        if let Some(failure) = session.failure() {
            return Err(failure.to_string().into());
        }
        while session.wants_write() {
            let n = stream.write(session.pending_output()).await?;
            session.consume_output(n);
        }
        match tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await {
            Err(_) => return Err("QEMU went silent".into()),
            Ok(Ok(0)) => session.feed_eof(),
            Ok(Ok(n)) => session.feed(&buf[..n]),
            Ok(Err(e)) => session.feed_io_error("read", e),
        }
    }
}
