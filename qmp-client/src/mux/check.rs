//! What QEMU answers to bad client input, so that a multiplexer's clients get the same replies.
//!
//! The texts and their order were measured against QEMU 7.2 (`monitor/qmp.c`,
//! `qapi/qmp-dispatch.c`, `qobject/json-parser.c`): a JSON error gets an id-less
//! `GenericError`; a JSON object that is no valid command gets a `GenericError` that echoes the
//! object's `id`; before negotiation every command but `qmp_capabilities` is `CommandNotFound`.

use qmp_proto::{Command, ErrorClass, ErrorInfo};
use serde_json::{Map, Value};

/// `CommandNotFound` text for any command before `qmp_capabilities`.
pub(crate) const EXPECTING_NEGOTIATION: &str =
    "Expecting capabilities negotiation with 'qmp_capabilities'";

/// An error reply to send: class, description and the id to echo (`None`: no `id` member).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refusal {
    pub(crate) error: ErrorInfo,
    pub(crate) id: Option<Value>,
}

impl Refusal {
    pub(crate) fn generic(desc: impl Into<String>, id: Option<Value>) -> Refusal {
        Refusal {
            error: ErrorInfo {
                class: ErrorClass::GenericError,
                desc: desc.into(),
            },
            id,
        }
    }

    pub(crate) fn not_found(desc: impl Into<String>, id: Option<Value>) -> Refusal {
        Refusal {
            error: ErrorInfo {
                class: ErrorClass::CommandNotFound,
                desc: desc.into(),
            },
            id,
        }
    }
}

/// The reply QEMU sends for input that is not a JSON object, or not valid JSON (no `id`).
pub(crate) fn decode_refusal(err: &qmp_proto::Error) -> Refusal {
    use qmp_proto::Error as E;
    let desc = match err {
        E::NotAnObject { .. } => "QMP input must be a JSON object".to_owned(),
        E::TooDeep { .. } => "JSON nesting depth limit exceeded".to_owned(),
        E::MessageTooLarge { .. } => "JSON token size limit exceeded".to_owned(),
        E::InvalidUtf8 { .. } => "JSON parse error, stray '\u{FFFD}'".to_owned(),
        other => parse_error_desc(other.raw().unwrap_or_default()),
    };
    Refusal::generic(desc, None)
}

/// QEMU's lexer names a bare word (`garbage`) as an invalid keyword; other syntax errors
/// mostly end in "expecting value". Our decoder reports one error per bad message where QEMU's
/// lexer may report one per bad token, so only the first reply of a burst is certain to match.
fn parse_error_desc(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(raw.len());
    let word: String = raw[start..]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
        .map(|b| char::from(*b))
        .collect();
    if word.starts_with(|c: char| c.is_ascii_alphabetic()) {
        format!("JSON parse error, invalid keyword '{word}'")
    } else {
        "JSON parse error, expecting value".to_owned()
    }
}

/// The bucket QEMU's `QDict` puts `key` in (`tdb_hash` modulo 512): QEMU checks a command's
/// members in bucket order, so with several bad members this says which one it names.
fn qdict_bucket(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, byte) in key.bytes().enumerate() {
        value = value.wrapping_add(u32::from(byte) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// A client's command, checked as QEMU's `qmp_dispatch_check_obj` does (`allow_oob`: the
/// client negotiated `oob`). On success the command carries no id; the client's id (any JSON
/// value, or none) comes back beside it.
pub(crate) fn check_command(
    object: Map<String, Value>,
    allow_oob: bool,
) -> Result<(Command, Option<Value>), Refusal> {
    let id = object.get("id").cloned();
    let mut keys: Vec<&String> = object.keys().collect();
    keys.sort_by_key(|k| qdict_bucket(k));
    let mut exec_key: Option<&str> = None;
    for key in keys {
        let value = &object[key];
        match key.as_str() {
            "execute" | "exec-oob" if key == "execute" || allow_oob => {
                if !value.is_string() {
                    return Err(Refusal::generic(
                        format!("QMP input member '{key}' must be a string"),
                        id,
                    ));
                }
                if let Some(first) = exec_key {
                    return Err(Refusal::generic(
                        format!("QMP input member '{key}' clashes with '{first}'"),
                        id,
                    ));
                }
                exec_key = Some(key);
            }
            "arguments" if !value.is_object() => {
                return Err(Refusal::generic(
                    "QMP input member 'arguments' must be an object",
                    id,
                ))
            }
            "arguments" | "id" => {}
            other => {
                return Err(Refusal::generic(
                    format!("QMP input member '{other}' is unexpected"),
                    id,
                ))
            }
        }
    }
    if exec_key.is_none() {
        return Err(Refusal::generic("QMP input lacks member 'execute'", id));
    }
    match Command::from_object(object) {
        Ok(mut command) => {
            command.id = None;
            Ok((command, id))
        }
        // Unreachable after the checks above; answered like QEMU's generic case all the same.
        Err(e) => Err(Refusal::generic(e.to_string(), id)),
    }
}

/// Checks `qmp_capabilities`' arguments as QEMU does before negotiation, with `offered` the
/// capabilities of the greeting. Returns whether `oob` is enabled.
pub(crate) fn check_capabilities(
    command: &Command,
    id: &Option<Value>,
    offered: &[String],
) -> Result<bool, Refusal> {
    let refuse = |desc: String| Err(Refusal::generic(desc, id.clone()));
    let mut oob = false;
    let Some(arguments) = &command.arguments else {
        return Ok(false);
    };
    if let Some(other) = arguments.keys().find(|k| *k != "enable") {
        return refuse(format!("Parameter '{other}' is unexpected"));
    }
    let Some(enable) = arguments.get("enable") else {
        return Ok(false);
    };
    let Some(items) = enable.as_array() else {
        return refuse("Invalid parameter type for 'enable', expected: array".into());
    };
    let mut unavailable = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let Some(name) = item.as_str() else {
            return refuse(format!(
                "Invalid parameter type for 'enable[{index}]', expected: string"
            ));
        };
        // QEMU 7.2's only capability; its enum visitor names the element 'null'.
        if name != "oob" {
            return refuse(format!("Parameter 'null' does not accept value '{name}'"));
        }
        if offered.iter().any(|c| c == name) {
            oob = true;
        } else if !unavailable.contains(&name) {
            unavailable.push(name);
        }
    }
    if !unavailable.is_empty() {
        return refuse(format!(
            "Capability {} not available",
            unavailable.join(", ")
        ));
    }
    Ok(oob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(text: &str) -> Map<String, Value> {
        match serde_json::from_str(text) {
            Ok(Value::Object(map)) => map,
            other => panic!("not an object: {other:?}"),
        }
    }

    /// Inputs and QEMU 7.2's measured answers (command mode; `oob` as the client negotiated).
    #[test]
    fn structural_errors_match_qemu() {
        let table: &[(&str, bool, &str, Option<Value>)] = &[
            ("{}", true, "QMP input lacks member 'execute'", None),
            (
                r#"{"id":5}"#,
                true,
                "QMP input lacks member 'execute'",
                Some(json!(5)),
            ),
            (
                r#"{"execute":5,"id":6}"#,
                true,
                "QMP input member 'execute' must be a string",
                Some(json!(6)),
            ),
            (
                r#"{"execute":"query-status","foo":1,"id":7}"#,
                true,
                "QMP input member 'foo' is unexpected",
                Some(json!(7)),
            ),
            (
                r#"{"execute":"query-status","arguments":[],"id":8}"#,
                true,
                "QMP input member 'arguments' must be an object",
                Some(json!(8)),
            ),
            (
                r#"{"exec-oob":"query-status","id":9}"#,
                false,
                "QMP input member 'exec-oob' is unexpected",
                Some(json!(9)),
            ),
            (
                r#"{"exec-oob":"query-status","execute":"x","id":21}"#,
                true,
                "QMP input member 'execute' clashes with 'exec-oob'",
                Some(json!(21)),
            ),
            (
                r#"{"exec-oob":"query-status","execute":"x","id":21}"#,
                false,
                "QMP input member 'exec-oob' is unexpected",
                Some(json!(21)),
            ),
            // QEMU names the member its hash table lists first, not the first one written.
            (
                r#"{"execute":"query-status","arguments":{},"foo":1,"zzz":2,"id":9}"#,
                true,
                "QMP input member 'zzz' is unexpected",
                Some(json!(9)),
            ),
        ];
        for (input, oob, desc, id) in table {
            match check_command(object(input), *oob) {
                Err(refusal) => {
                    assert_eq!(refusal.error.class, ErrorClass::GenericError, "{input}");
                    assert_eq!(refusal.error.desc, *desc, "{input}");
                    assert_eq!(&refusal.id, id, "{input}");
                }
                Ok(ok) => panic!("{input} accepted: {ok:?}"),
            }
        }
    }

    #[test]
    fn valid_commands_lose_their_id_and_keep_it_aside() {
        let (command, id) = check_command(
            object(r#"{"execute":"x","arguments":{"a":1},"id":{"k":[1,2.5,null]}}"#),
            false,
        )
        .unwrap();
        assert_eq!(command.execute, "x");
        assert_eq!(command.id, None);
        assert!(!command.oob);
        assert_eq!(id, Some(json!({"k": [1, 2.5, null]})));
        let (command, id) = check_command(object(r#"{"exec-oob":"y","id":null}"#), true).unwrap();
        assert!(command.oob);
        assert_eq!(id, Some(Value::Null));
        let (_, id) = check_command(object(r#"{"execute":"z"}"#), true).unwrap();
        assert_eq!(id, None);
    }

    #[test]
    fn capabilities_arguments_match_qemu() {
        let offered = vec!["oob".to_owned()];
        let check = |args: Value| {
            let mut command = Command::new("qmp_capabilities");
            if let Value::Object(map) = args {
                command = command.with_arguments(map);
            }
            check_capabilities(&command, &Some(json!(1)), &offered)
        };
        assert_eq!(check(Value::Null), Ok(false));
        assert_eq!(check(json!({"enable": []})), Ok(false));
        assert_eq!(check(json!({"enable": ["oob", "oob"]})), Ok(true));
        let desc = |r: Result<bool, Refusal>| r.unwrap_err().error.desc;
        assert_eq!(
            desc(check(json!({"enable": ["foo"]}))),
            "Parameter 'null' does not accept value 'foo'"
        );
        assert_eq!(
            desc(check(json!({"bar": 1}))),
            "Parameter 'bar' is unexpected"
        );
        assert_eq!(
            desc(check(json!({"enable": "oob"}))),
            "Invalid parameter type for 'enable', expected: array"
        );
        assert_eq!(
            desc(check(json!({"enable": null}))),
            "Invalid parameter type for 'enable', expected: array"
        );
        assert_eq!(
            desc(check(json!({"enable": [1]}))),
            "Invalid parameter type for 'enable[0]', expected: string"
        );
        let command =
            Command::new("qmp_capabilities").with_arguments(object(r#"{"enable":["oob"]}"#));
        assert_eq!(
            check_capabilities(&command, &None, &[])
                .unwrap_err()
                .error
                .desc,
            "Capability oob not available"
        );
    }

    #[test]
    fn decode_errors_match_qemu() {
        let mut decoder = qmp_proto::Decoder::new();
        decoder.feed(b"garbage\n{\"execute\":}\n[1,2]\n42\n\xff\n");
        let mut descs = Vec::new();
        while let Some(item) = decoder.next_object() {
            descs.push(decode_refusal(&item.unwrap_err()));
        }
        let texts: Vec<_> = descs.iter().map(|r| r.error.desc.as_str()).collect();
        assert_eq!(
            texts,
            [
                "JSON parse error, invalid keyword 'garbage'",
                "JSON parse error, expecting value",
                "QMP input must be a JSON object",
                "QMP input must be a JSON object",
                "JSON parse error, stray '\u{FFFD}'",
            ]
        );
        assert!(descs.iter().all(|r| r.id.is_none()));
    }
}
