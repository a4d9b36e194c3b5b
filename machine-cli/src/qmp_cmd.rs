//! `qemu-machine qmp [ADDRESS] COMMAND [KEY=VALUE ...]`: one command, one reply.

use serde_json::{Map, Value};

use crate::address::Address;
use crate::args::QmpArgs;
use crate::connect::{self, ConnectOptions};
use crate::error::{Error, Result};
use crate::lang;
use crate::output::{self, Style};

/// Where the words of `qmp` go: the address, the command, its `key=value` tokens.
#[derive(Debug, PartialEq)]
struct Words<'a> {
    address: Address,
    command: &'a str,
    pairs: &'a [String],
}

/// Splits the words: the first is the ADDRESS unless it is the only word or the second holds
/// a `=` (then `$QMP_SOCKET`, given as `env_address`, is the address). A command name never
/// holds `=` and a `key=value` always does, so this is never ambiguous.
fn split_words<'a>(words: &'a [String], env_address: Option<&str>) -> Result<Words<'a>> {
    let first_is_address = words.len() >= 2 && !words[1].contains('=');
    if first_is_address {
        return Ok(Words {
            address: Address::parse(&words[0]),
            command: &words[1],
            pairs: &words[2..],
        });
    }
    let Some(env_address) = env_address.filter(|a| !a.is_empty()) else {
        return Err(if words.len() == 1 && looks_like_address(&words[0]) {
            Error::MissingCommand
        } else {
            Error::MissingAddress
        });
    };
    let Some((command, pairs)) = words.split_first() else {
        return Err(Error::MissingCommand);
    };
    Ok(Words {
        address: Address::parse(env_address),
        command,
        pairs,
    })
}

/// Whether a lone word is more likely an address than a command (for the error message).
fn looks_like_address(word: &str) -> bool {
    word.contains('/') || word.contains(':')
}

/// Runs `qmp`; prints the reply's value, or fails with [`Error::Command`] on an error reply.
pub fn run(args: QmpArgs) -> Result<u8> {
    let env_address = std::env::var("QMP_SOCKET").ok();
    let words = split_words(&args.words, env_address.as_deref())?;
    let arguments = match &args.args {
        Some(text) => {
            if let Some(token) = words.pairs.first() {
                return Err(Error::ExpectedKeyValue {
                    token: format!("{token} (key=value words cannot be mixed with --args)"),
                });
            }
            Some(parse_args_json(text)?)
        }
        None => {
            let map = lang::build_arguments(words.pairs)?;
            (!map.is_empty()).then_some(map)
        }
    };
    let style = Style::choose(args.json, args.pretty);
    let options = ConnectOptions {
        connect_timeout: args.connect_timeout,
        command_timeout: args.timeout,
        skip_negotiation: args.skip_negotiation,
    };
    let mut connection = connect::connect(&words.address, &options)?;
    let result = connection.execute_with_timeout(words.command, arguments, args.timeout);
    match result {
        Ok(value) => {
            output::emit(&output::json(&value, style))?;
            connect::close(connection);
            Ok(0)
        }
        Err(error) => {
            let error = Error::from_qmp(words.command, error);
            if let (Error::Command { class, desc, .. }, true) = (&error, args.json) {
                let reply = serde_json::json!({"error": {"class": class, "desc": desc}});
                output::emit(&reply.to_string())?;
            }
            connect::close(connection);
            Err(error)
        }
    }
}

/// Parses `--args`: it must be a JSON object.
fn parse_args_json(text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::ArgsNotObject {
            text: text.to_string(),
        }),
        Err(source) => Err(Error::BadJson {
            key: None,
            text: text.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn address_then_command() {
        let w = words(&["/tmp/s", "query-status"]);
        let split = split_words(&w, Some("/env")).unwrap();
        assert_eq!(split.address, Address::Unix(PathBuf::from("/tmp/s")));
        assert_eq!(split.command, "query-status");
        assert!(split.pairs.is_empty());
        let w = words(&["h:1", "qom-get", "path=/", "property=type"]);
        let split = split_words(&w, None).unwrap();
        assert_eq!(split.address, Address::Tcp("h:1".to_string()));
        assert_eq!(split.command, "qom-get");
        assert_eq!(split.pairs.len(), 2);
    }

    #[test]
    fn command_alone_uses_the_environment() {
        let w = words(&["query-status"]);
        let split = split_words(&w, Some("/env")).unwrap();
        assert_eq!(split.address, Address::Unix(PathBuf::from("/env")));
        assert_eq!(split.command, "query-status");
        let w = words(&["qom-get", "path=/", "property=type"]);
        let split = split_words(&w, Some("/env")).unwrap();
        assert_eq!(split.command, "qom-get");
        assert_eq!(split.pairs.len(), 2);
    }

    #[test]
    fn missing_pieces() {
        assert!(matches!(
            split_words(&words(&["query-status"]), None),
            Err(Error::MissingAddress)
        ));
        assert!(matches!(
            split_words(&words(&["query-status"]), Some("")),
            Err(Error::MissingAddress)
        ));
        assert!(matches!(
            split_words(&words(&["/tmp/s"]), None),
            Err(Error::MissingCommand)
        ));
    }

    #[test]
    fn args_json() {
        assert_eq!(
            parse_args_json(r#"{"a": 1}"#).unwrap(),
            serde_json::json!({"a": 1}).as_object().unwrap().clone()
        );
        assert!(matches!(
            parse_args_json("[1]"),
            Err(Error::ArgsNotObject { .. })
        ));
        assert!(matches!(parse_args_json("{"), Err(Error::BadJson { .. })));
    }
}
