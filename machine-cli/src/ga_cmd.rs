//! `qemu-machine ga ADDRESS COMMAND`: QEMU's `qemu-ga-client` through the guest agent client
//! of qmp-client (`Agent`: sync with `0xFF` and a random id, deadlines, stale replies skipped).
//!
//! The commands are `qemu-ga-client`'s: `cat FILE`, `fsfreeze status|freeze|thaw`,
//! `fstrim [MINIMUM]`, `ifconfig`, `info`, `ping`, `suspend disk|ram|hybrid`, `shutdown`,
//! `powerdown`, `halt`, `reboot`; plus `exec PROGRAM [ARGS...]`, whose exit status is the
//! guest command's own. ADDRESS (a unix path or host:port of the agent's chardev socket) may
//! be left out when `$QGA_CLIENT_ADDRESS` is set. As in `qemu-ga-client`, `shutdown` and
//! `suspend` count a timeout as success (the agent does not answer them when they work).

use std::io::Write;
use std::time::Duration;

use machine_core::qmp_client::{Agent, AgentConfig, SuspendMode};
use serde_json::{json, Value};

use crate::address::Address;
use crate::args::GaArgs;
use crate::error::{Error, Result};
use crate::output::{self, Style};

/// The commands, for telling an ADDRESS from a command.
const COMMANDS: &[&str] = &[
    "cat",
    "fsfreeze",
    "fstrim",
    "ifconfig",
    "info",
    "ping",
    "suspend",
    "shutdown",
    "powerdown",
    "halt",
    "reboot",
    "exec",
];

/// Runs `ga`; the exit status is 0, or the guest command's for `exec`.
pub fn run(args: GaArgs) -> Result<u8> {
    let env = std::env::var("QGA_CLIENT_ADDRESS").ok();
    let (address, words) = split_address(&args.words, env.as_deref())?;
    let command = parse(words)?;
    let config = AgentConfig::default()
        .with_command_timeout(args.timeout)
        .with_connect_timeout(args.connect_timeout);
    let connect_err = |source| Error::Connect {
        address: address.to_string(),
        source,
    };
    let mut agent = match &address {
        Address::Unix(path) => Agent::connect_unix(path, &config).map_err(connect_err)?,
        Address::Tcp(addr) => Agent::connect_tcp(addr.as_str(), &config).map_err(connect_err)?,
    };
    let style = Style::choose(args.json, false);
    execute(&mut agent, command, args.json, style, args.timeout)
}

/// ADDRESS and the command words: the first word is the address unless it is a command and
/// `$QGA_CLIENT_ADDRESS` is set.
fn split_address<'w>(words: &'w [String], env: Option<&str>) -> Result<(Address, &'w [String])> {
    match (words.first(), env) {
        (Some(first), Some(env)) if COMMANDS.contains(&first.as_str()) => {
            Ok((Address::parse(env), words))
        }
        (Some(first), _) if words.len() > 1 => Ok((Address::parse(first), &words[1..])),
        _ => Err(Error::BadGaCommand {
            text: words.join(" "),
            why: "give ADDRESS COMMAND (ADDRESS may come from $QGA_CLIENT_ADDRESS)",
        }),
    }
}

/// One parsed command.
#[derive(Debug, PartialEq, Eq)]
enum GaCommand {
    Cat(String),
    Fsfreeze(String),
    Fstrim(u64),
    Ifconfig,
    Info,
    Ping,
    Suspend(SuspendMode),
    Shutdown(&'static str),
    Exec(String, Vec<String>),
}

fn parse(words: &[String]) -> Result<GaCommand> {
    let bad = |why: &'static str| Error::BadGaCommand {
        text: words.join(" "),
        why,
    };
    let rest = &words[1.min(words.len())..];
    let one = |why| match rest {
        [only] => Ok(only.clone()),
        _ => Err(bad(why)),
    };
    Ok(match words.first().map(String::as_str) {
        Some("cat") => GaCommand::Cat(one("cat takes one FILE")?),
        Some("fsfreeze") => {
            let mode = one("fsfreeze takes status, freeze or thaw")?;
            if !["status", "freeze", "thaw"].contains(&mode.as_str()) {
                return Err(bad("fsfreeze takes status, freeze or thaw"));
            }
            GaCommand::Fsfreeze(mode)
        }
        Some("fstrim") => match rest {
            [] => GaCommand::Fstrim(0),
            [minimum] => GaCommand::Fstrim(
                minimum
                    .parse()
                    .map_err(|_| bad("fstrim takes a minimum size in bytes"))?,
            ),
            _ => return Err(bad("fstrim takes at most a minimum size")),
        },
        Some("ifconfig") if rest.is_empty() => GaCommand::Ifconfig,
        Some("info") if rest.is_empty() => GaCommand::Info,
        Some("ping") if rest.is_empty() => GaCommand::Ping,
        Some("suspend") => {
            GaCommand::Suspend(match one("suspend takes disk, ram or hybrid")?.as_str() {
                "disk" => SuspendMode::Disk,
                "ram" => SuspendMode::Ram,
                "hybrid" => SuspendMode::Hybrid,
                _ => return Err(bad("suspend takes disk, ram or hybrid")),
            })
        }
        Some("shutdown" | "powerdown") if rest.is_empty() => GaCommand::Shutdown("powerdown"),
        Some("halt") if rest.is_empty() => GaCommand::Shutdown("halt"),
        Some("reboot") if rest.is_empty() => GaCommand::Shutdown("reboot"),
        Some("exec") => match rest {
            [program, args @ ..] => GaCommand::Exec(program.clone(), args.to_vec()),
            [] => return Err(bad("exec takes a PROGRAM and its arguments")),
        },
        _ => return Err(bad("unknown command or extra arguments")),
    })
}

fn agent_err(command: &str) -> impl FnOnce(machine_core::qmp_client::Error) -> Error + '_ {
    move |e| Error::from_qmp(command, e)
}

fn print(value: &Value, style: Style) -> Result<()> {
    output::emit(&output::json(value, style))
}

fn execute(
    agent: &mut Agent,
    command: GaCommand,
    json: bool,
    style: Style,
    timeout: Duration,
) -> Result<u8> {
    match command {
        GaCommand::Cat(file) => {
            let data = agent
                .read_file(&file)
                .map_err(agent_err("guest-file-read"))?;
            if json {
                print(&json!({ "data": String::from_utf8_lossy(&data) }), style)?;
            } else {
                let mut stdout = std::io::stdout().lock();
                stdout
                    .write_all(&data)
                    .and_then(|()| stdout.flush())
                    .map_err(|source| Error::Io {
                        what: "writing to stdout",
                        source,
                    })?;
            }
        }
        GaCommand::Fsfreeze(mode) => {
            let value = match mode.as_str() {
                "status" => json!(agent
                    .fsfreeze_status()
                    .map_err(agent_err("guest-fsfreeze-status"))?),
                "freeze" => json!(agent
                    .fsfreeze_freeze()
                    .map_err(agent_err("guest-fsfreeze-freeze"))?),
                _ => json!(agent
                    .fsfreeze_thaw()
                    .map_err(agent_err("guest-fsfreeze-thaw"))?),
            };
            print(&value, style)?;
        }
        GaCommand::Fstrim(minimum) => print(
            &agent.fstrim(minimum).map_err(agent_err("guest-fstrim"))?,
            style,
        )?,
        GaCommand::Ifconfig => print(
            &agent
                .network_interfaces()
                .map_err(agent_err("guest-network-get-interfaces"))?,
            style,
        )?,
        GaCommand::Info => {
            let info = agent.info().map_err(agent_err("guest-info"))?;
            if json {
                print(&info, style)?;
            } else {
                output::emit(&format!(
                    "version: {}",
                    info["version"].as_str().unwrap_or("?")
                ))?;
                for cmd in info["supported_commands"].as_array().into_iter().flatten() {
                    if cmd["enabled"] == true {
                        output::emit(cmd["name"].as_str().unwrap_or("?"))?;
                    }
                }
            }
        }
        GaCommand::Ping => {
            agent.ping().map_err(agent_err("guest-ping"))?;
            if json {
                print(&json!({}), style)?;
            }
        }
        GaCommand::Suspend(mode) => agent.suspend(mode).map_err(agent_err(mode.command()))?,
        GaCommand::Shutdown(mode) => agent.shutdown(mode).map_err(agent_err("guest-shutdown"))?,
        GaCommand::Exec(program, args) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let done = agent
                .run(&program, &args, timeout)
                .map_err(agent_err("guest-exec"))?;
            if json {
                print(
                    &json!({
                        "exitcode": done.exit_code,
                        "signal": done.signal,
                        "stdout": String::from_utf8_lossy(&done.stdout),
                        "stderr": String::from_utf8_lossy(&done.stderr),
                    }),
                    style,
                )?;
            } else {
                let written = std::io::stdout()
                    .write_all(&done.stdout)
                    .and_then(|()| std::io::stdout().flush());
                written.map_err(|source| Error::Io {
                    what: "writing to stdout",
                    source,
                })?;
                // The guest's stderr is data, not a diagnostic of ours: copied as is.
                let _ = std::io::stderr().write_all(&done.stderr);
            }
            return Ok(match (done.exit_code, done.signal) {
                (Some(code), _) => (code & 0xff) as u8,
                (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
                (None, None) => 1,
            });
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_address_comes_first_or_from_the_environment() {
        let w = words("/tmp/qga.sock ping");
        let (address, rest) = split_address(&w, None).expect("address");
        assert_eq!(address, Address::Unix("/tmp/qga.sock".into()));
        assert_eq!(rest, &w[1..]);
        let w = words("ping");
        let (address, rest) = split_address(&w, Some("localhost:4444")).expect("env");
        assert_eq!(address, Address::Tcp("localhost:4444".into()));
        assert_eq!(rest, &w[..]);
        assert!(split_address(&words("ping"), None).is_err());
    }

    #[test]
    fn commands_parse_and_bad_ones_say_why() {
        assert_eq!(parse(&words("ping")).ok(), Some(GaCommand::Ping));
        assert_eq!(
            parse(&words("exec /bin/sh -c true")).ok(),
            Some(GaCommand::Exec("/bin/sh".into(), words("-c true")))
        );
        assert_eq!(
            parse(&words("powerdown")).ok(),
            Some(GaCommand::Shutdown("powerdown"))
        );
        assert_eq!(
            parse(&words("fstrim 4096")).ok(),
            Some(GaCommand::Fstrim(4096))
        );
        for bad in [
            "fsfreeze melt",
            "cat",
            "ping extra",
            "suspend nap",
            "frobnicate",
            "exec",
        ] {
            let err = parse(&words(bad)).expect_err(bad);
            assert!(matches!(err, Error::BadGaCommand { .. }), "{bad}: {err}");
        }
    }
}
