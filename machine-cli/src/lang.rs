//! The qmp-shell command language, parsed without any I/O so every rule is unit-tested.
//!
//! # QMP mode
//!
//! A line is `COMMAND [KEY=VALUE ...]`, sent as `{"execute": COMMAND, "arguments": {...}}`.
//! Tokens are separated by blanks; a quoted string (`"..."` or `'...'`) or a JSON object or
//! array (`{...}`, `[...]`) may contain blanks. A value is, in this order:
//!
//! - a quoted string: `"a b"` (JSON escapes) or `'a b'` (`\'` and `\\` escapes), always a string,
//!   so `"42"` is the string `42`;
//! - an integer (`42`, `-1`) or a JSON number (`1.5`, `1e3`);
//! - `true` / `false` in any case, or `null`;
//! - a JSON object or array (`{"driver":"null-co"}`, `[1,2]`), which must be valid JSON;
//! - anything else, as a bare string (`node-name=drive0`, `filename=/tmp/x.img`).
//!
//! Dotted keys build nested objects: `a.b=1 a.c=2` gives `{"a":{"b":1,"c":2}}`. A key cannot be
//! both a leaf and a node (`a=1 a.b=2`), and cannot be set twice (`a=1 a=2`).
//!
//! A line starting with `{` is taken as a whole QMP command object
//! (`{"execute":"query-status"}`), with only `execute` and `arguments` keys.
//!
//! Transactions: `transaction(` opens a transaction; each following line is one action
//! `TYPE [KEY=VALUE ...]` (becoming `{"type": TYPE, "data": {...}}`) and a line `)` sends
//! `{"execute":"transaction","arguments":{"actions":[...]}}`. The one-line form
//! `transaction( TYPE k=v ... ; TYPE k=v ... )` does the same, actions separated by `;`
//! (a `;` token, or a `;` ending a token). A line ending with `)` also closes the transaction.
//! A line that fails to parse inside a transaction adds nothing; the transaction stays open.
//!
//! Blank lines are nothing at all, in every mode.
//!
//! # HMP mode
//!
//! Each line is sent as `human-monitor-command` with its `command-line`. The local command
//! `cpu N` selects the CPU that later lines run on (sent as `cpu-index`); until then no
//! `cpu-index` is sent, so machines without CPUs work.

use machine_core::qmp_proto;
use serde_json::{Map, Value};
use std::collections::HashSet;

use crate::error::{Error, Result};

/// A QMP command produced by a line of input.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The command name (`execute`).
    pub execute: String,
    /// Its arguments; `None` when the line gave none.
    pub arguments: Option<Map<String, Value>>,
}

impl Request {
    /// The command as the JSON object sent on the wire (without an id).
    pub fn to_value(&self) -> Value {
        let mut object = Map::new();
        object.insert("execute".to_string(), Value::String(self.execute.clone()));
        if let Some(arguments) = &self.arguments {
            object.insert("arguments".to_string(), Value::Object(arguments.clone()));
        }
        Value::Object(object)
    }
}

/// The state of the QMP-mode parser: whether a transaction is open and what it holds.
#[derive(Debug, Default)]
pub struct QmpParser {
    /// The actions of the open transaction, if one is open.
    actions: Option<Vec<Value>>,
}

impl QmpParser {
    /// A parser outside any transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a multi-line transaction is open (the shell shows a different prompt).
    pub fn in_transaction(&self) -> bool {
        self.actions.is_some()
    }

    /// Drops an open transaction (Ctrl-C in the shell); returns whether one was open.
    pub fn cancel_transaction(&mut self) -> bool {
        self.actions.take().is_some()
    }

    /// Parses one line: `Ok(Some(request))` when there is something to send, `Ok(None)` for a
    /// blank line or a transaction line that only added actions.
    pub fn parse_line(&mut self, line: &str) -> Result<Option<Request>> {
        let tokens = tokenize(line)?;
        let Some(first) = tokens.first() else {
            return Ok(None);
        };
        if self.actions.is_none() && first.starts_with('{') {
            return parse_raw_command(line).map(Some);
        }
        let mut rest: &[String] = &tokens;
        let opened_here = first == "transaction(";
        if opened_here {
            if self.actions.is_some() {
                return Err(Error::NestedTransaction);
            }
            rest = &rest[1..];
        } else if self.actions.is_none() {
            if first == ")" {
                return Err(Error::CloseOutsideTransaction);
            }
            let arguments = build_arguments(&tokens[1..])?;
            return Ok(Some(Request {
                execute: first.clone(),
                arguments: (!arguments.is_empty()).then_some(arguments),
            }));
        }
        let close = rest.last().is_some_and(|t| t == ")");
        if close {
            rest = &rest[..rest.len() - 1];
        }
        if rest.iter().any(|t| t == ")") {
            return Err(Error::TextAfterClose);
        }
        // Parse the whole line before touching the state, so a bad line adds nothing.
        let new_actions = parse_actions(rest)?;
        let mut actions = self.actions.take().unwrap_or_default();
        actions.extend(new_actions);
        if close {
            let mut arguments = Map::new();
            arguments.insert("actions".to_string(), Value::Array(actions));
            Ok(Some(Request {
                execute: "transaction".to_string(),
                arguments: Some(arguments),
            }))
        } else {
            self.actions = Some(actions);
            Ok(None)
        }
    }
}

/// Splits transaction tokens into actions at `;` and parses each.
fn parse_actions(tokens: &[String]) -> Result<Vec<Value>> {
    let mut actions = Vec::new();
    let mut group: Vec<String> = Vec::new();
    let mut finish = |group: &mut Vec<String>| -> Result<()> {
        if let Some((kind, args)) = group.split_first() {
            let mut action = Map::new();
            action.insert("type".to_string(), Value::String(kind.clone()));
            action.insert("data".to_string(), Value::Object(build_arguments(args)?));
            actions.push(Value::Object(action));
        }
        group.clear();
        Ok(())
    };
    for token in tokens {
        match token.strip_suffix(';') {
            Some(head) => {
                if !head.is_empty() {
                    group.push(head.to_string());
                }
                finish(&mut group)?;
            }
            None => group.push(token.clone()),
        }
    }
    finish(&mut group)?;
    Ok(actions)
}

/// Parses a line that is a whole JSON command object.
fn parse_raw_command(line: &str) -> Result<Request> {
    let value: Value = serde_json::from_str(line.trim()).map_err(|source| Error::BadJson {
        key: None,
        text: line.trim().to_string(),
        source,
    })?;
    let Value::Object(mut object) = value else {
        return Err(Error::BadRawCommand {
            reason: "not a JSON object".to_string(),
        });
    };
    if let Some(key) = object
        .keys()
        .find(|k| k.as_str() != "execute" && k.as_str() != "arguments")
    {
        return Err(Error::BadRawCommand {
            reason: format!("unsupported key `{key}` (only execute and arguments)"),
        });
    }
    let execute = match object.remove("execute") {
        Some(Value::String(name)) => name,
        _ => {
            return Err(Error::BadRawCommand {
                reason: "`execute` must be a string".to_string(),
            })
        }
    };
    let arguments = match object.remove("arguments") {
        None => None,
        Some(Value::Object(map)) => Some(map),
        Some(_) => {
            return Err(Error::BadRawCommand {
                reason: "`arguments` must be an object".to_string(),
            })
        }
    };
    Ok(Request { execute, arguments })
}

/// Deepest an arguments object may nest (the object itself counts as one level): QEMU's limit
/// ([`qmp_proto::MAX_NESTING`], which the QMP client enforces on every command it sends) less
/// the levels around it in the deepest command we build, a transaction (command object, its
/// `arguments`, the `actions` array, one action object, then this as its `data`).
pub const MAX_ARGUMENT_NESTING: usize = qmp_proto::MAX_NESTING - 4;

/// Builds an arguments object from `key=value` tokens (dotted keys nest). Arguments nested
/// deeper than [`MAX_ARGUMENT_NESTING`] (a dotted key of a thousand parts) are refused here,
/// while the line is parsed: QEMU would answer with an id-less error that ends the session.
pub fn build_arguments(tokens: &[String]) -> Result<Map<String, Value>> {
    let root = build_nested(tokens)?;
    let depth = nesting(&root);
    if depth > MAX_ARGUMENT_NESTING {
        return Err(Error::TooDeep {
            depth,
            limit: MAX_ARGUMENT_NESTING,
        });
    }
    Ok(root)
}

/// Levels of objects and arrays in `map`, itself included, counted as QMP's encoder does.
fn nesting(map: &Map<String, Value>) -> usize {
    1 + map.values().map(qmp_proto::nesting).max().unwrap_or(0)
}

fn build_nested(tokens: &[String]) -> Result<Map<String, Value>> {
    let mut root = Map::new();
    let mut leaves: HashSet<String> = HashSet::new();
    let mut nodes: HashSet<String> = HashSet::new();
    for token in tokens {
        let Some((key, raw)) = token.split_once('=') else {
            return Err(Error::ExpectedKeyValue {
                token: token.clone(),
            });
        };
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(Error::BadKey {
                key: key.to_string(),
            });
        }
        let value = parse_value(key, raw)?;
        let mut object = &mut root;
        for depth in 0..parts.len() - 1 {
            let path = parts[..=depth].join(".");
            if leaves.contains(&path) {
                return Err(Error::LeafAndNode { key: path });
            }
            nodes.insert(path);
            let child = object
                .entry(parts[depth].to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            object = match child {
                Value::Object(map) => map,
                // Unreachable through the sets above, but never panic on user input.
                _ => {
                    return Err(Error::LeafAndNode {
                        key: parts[..=depth].join("."),
                    })
                }
            };
        }
        if nodes.contains(key) {
            return Err(Error::LeafAndNode {
                key: key.to_string(),
            });
        }
        if !leaves.insert(key.to_string()) {
            return Err(Error::SetTwice {
                key: key.to_string(),
            });
        }
        object.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(root)
}

/// Parses one value of a `key=value` token (see the module docs for the order of the rules).
pub fn parse_value(key: &str, raw: &str) -> Result<Value> {
    if raw.starts_with('"') {
        return serde_json::from_str::<String>(raw)
            .map(Value::String)
            .map_err(|_| Error::BadString {
                key: key.to_string(),
                text: raw.to_string(),
            });
    }
    if let Some(body) = raw.strip_prefix('\'') {
        return unquote_single(body)
            .map(Value::String)
            .ok_or_else(|| Error::BadString {
                key: key.to_string(),
                text: raw.to_string(),
            });
    }
    if let Ok(n) = raw.parse::<i64>() {
        return Ok(Value::from(n));
    }
    if let Ok(n) = raw.parse::<u64>() {
        return Ok(Value::from(n));
    }
    if raw.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
        if let Ok(number @ Value::Number(_)) = serde_json::from_str::<Value>(raw) {
            return Ok(number);
        }
    }
    if raw.eq_ignore_ascii_case("true") {
        return Ok(Value::Bool(true));
    }
    if raw.eq_ignore_ascii_case("false") {
        return Ok(Value::Bool(false));
    }
    if raw == "null" {
        return Ok(Value::Null);
    }
    if raw.starts_with('{') || raw.starts_with('[') {
        return serde_json::from_str(raw).map_err(|source| Error::BadJson {
            key: Some(key.to_string()),
            text: raw.to_string(),
            source,
        });
    }
    Ok(Value::String(raw.to_string()))
}

/// The text of a single-quoted string given without its opening quote; `None` unless the
/// closing quote ends the text.
fn unquote_single(body: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                c @ ('\'' | '\\') => out.push(c),
                other => {
                    out.push('\\');
                    out.push(other);
                }
            },
            '\'' => return chars.next().is_none().then_some(out),
            c => out.push(c),
        }
    }
    None
}

/// Splits a line into tokens at blanks outside quotes and outside `{}` / `[]`. Quotes and
/// escapes stay in the tokens (values are unquoted later); only an unterminated quote fails.
pub fn tokenize(line: &str) -> Result<Vec<String>> {
    let mut tokens = Vec::new();
    let mut token = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut depth: usize = 0;
    for c in line.chars() {
        if let Some(q) = quote {
            token.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => {
                quote = Some(c);
                token.push(c);
            }
            '{' | '[' => {
                depth += 1;
                token.push(c);
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                token.push(c);
            }
            c if c.is_whitespace() && depth == 0 => {
                if !token.is_empty() {
                    tokens.push(std::mem::take(&mut token));
                }
            }
            c => token.push(c),
        }
    }
    if quote.is_some() {
        return Err(Error::UnterminatedQuote {
            line: line.to_string(),
        });
    }
    if !token.is_empty() {
        tokens.push(token);
    }
    Ok(tokens)
}

/// One line of HMP-mode input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HmpLine {
    /// A blank line: nothing to do.
    Empty,
    /// The local `cpu N` command: select the CPU for later commands.
    SelectCpu(u64),
    /// A line for the human monitor, trimmed.
    Command(String),
}

/// Parses one HMP-mode line.
pub fn parse_hmp_line(line: &str) -> Result<HmpLine> {
    let trimmed = line.trim();
    let mut words = trimmed.split_whitespace();
    match words.next() {
        None => Ok(HmpLine::Empty),
        Some("cpu") => {
            let index = words.next();
            match (index.map(str::parse::<u64>), words.next()) {
                (Some(Ok(n)), None) => Ok(HmpLine::SelectCpu(n)),
                _ => Err(Error::BadCpuIndex {
                    text: trimmed.to_string(),
                }),
            }
        }
        Some(_) => Ok(HmpLine::Command(trimmed.to_string())),
    }
}

/// The `human-monitor-command` request carrying an HMP line.
pub fn hmp_request(command_line: &str, cpu_index: Option<u64>) -> Request {
    let mut arguments = Map::new();
    arguments.insert(
        "command-line".to_string(),
        Value::String(command_line.to_string()),
    );
    if let Some(cpu) = cpu_index {
        arguments.insert("cpu-index".to_string(), Value::from(cpu));
    }
    Request {
        execute: "human-monitor-command".to_string(),
        arguments: Some(arguments),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(line: &str) -> Result<Option<Request>> {
        QmpParser::new().parse_line(line)
    }

    fn value_of(line: &str) -> Value {
        one(line).unwrap().unwrap().to_value()
    }

    #[test]
    fn command_without_arguments_has_no_arguments_key() {
        assert_eq!(value_of("query-status"), json!({"execute": "query-status"}));
        assert_eq!(
            value_of("   query-status   "),
            json!({"execute": "query-status"})
        );
    }

    #[test]
    fn blank_lines_are_nothing() {
        for line in ["", " ", "\t", "  \t  \r"] {
            assert_eq!(one(line).unwrap(), None, "{line:?}");
        }
    }

    #[test]
    fn value_kinds() {
        let v = value_of(
            "cmd i=42 n=-7 big=18446744073709551615 f=1.5 e=1e3 t=TRUE f2=false z=null \
             s=drive0 p=/tmp/x.img q=\"a b\" sq='it\\'s' qn=\"42\" o={\"a\":[1,2]} a=[1,\"x\"]",
        );
        assert_eq!(
            v,
            json!({"execute": "cmd", "arguments": {
                "i": 42, "n": -7, "big": 18446744073709551615u64, "f": 1.5, "e": 1000.0,
                "t": true, "f2": false, "z": null, "s": "drive0", "p": "/tmp/x.img",
                "q": "a b", "sq": "it's", "qn": "42", "o": {"a": [1, 2]}, "a": [1, "x"]
            }})
        );
    }

    #[test]
    fn json_values_may_contain_blanks() {
        assert_eq!(
            value_of(r#"blockdev-add options={"driver": "null-co", "node-name": "n 0"} x=1"#),
            json!({"execute": "blockdev-add", "arguments": {
                "options": {"driver": "null-co", "node-name": "n 0"}, "x": 1}})
        );
    }

    #[test]
    fn words_that_look_like_values_but_are_not() {
        let v = value_of("cmd a=Null b=nan c=inf d=0x10 e=- f=1.2.3 g=");
        assert_eq!(
            v,
            json!({"execute": "cmd", "arguments": {
                "a": "Null", "b": "nan", "c": "inf", "d": "0x10", "e": "-", "f": "1.2.3", "g": ""}})
        );
    }

    #[test]
    fn equals_in_value_is_kept() {
        assert_eq!(
            value_of("cmd opt=a=b"),
            json!({"execute": "cmd", "arguments": {"opt": "a=b"}})
        );
    }

    #[test]
    fn dotted_keys_nest() {
        assert_eq!(
            value_of("cmd a.b=1 a.c.d=x e=2"),
            json!({"execute": "cmd", "arguments": {"a": {"b": 1, "c": {"d": "x"}}, "e": 2}})
        );
    }

    #[test]
    fn key_errors() {
        assert!(matches!(one("cmd a=1 a.b=2"), Err(Error::LeafAndNode { key }) if key == "a"));
        assert!(matches!(one("cmd a.b=2 a=1"), Err(Error::LeafAndNode { key }) if key == "a"));
        assert!(
            matches!(one("cmd a.b.c=2 a.b=1"), Err(Error::LeafAndNode { key }) if key == "a.b")
        );
        assert!(matches!(one("cmd a=1 a=2"), Err(Error::SetTwice { key }) if key == "a"));
        assert!(matches!(one("cmd a.b=1 a.b=2"), Err(Error::SetTwice { key }) if key == "a.b"));
        assert!(matches!(one("cmd a={} a.b=1"), Err(Error::LeafAndNode { key }) if key == "a"));
        assert!(
            matches!(one("cmd novalue"), Err(Error::ExpectedKeyValue { token }) if token == "novalue")
        );
        for bad in ["cmd =1", "cmd a..b=1", "cmd .a=1", "cmd a.=1"] {
            assert!(matches!(one(bad), Err(Error::BadKey { .. })), "{bad}");
        }
    }

    /// Found by the `shell_line` fuzz target: dotted keys nest without bound, and QEMU answers
    /// a command nested deeper than 1024 levels with an id-less error that ends the session.
    #[test]
    fn arguments_deeper_than_qemu_accepts_are_refused() {
        let key = |parts: usize| vec!["k"; parts].join(".");
        let mut p = QmpParser::new();
        let ok = p
            .parse_line(&format!("cmd {}=1", key(MAX_ARGUMENT_NESTING)))
            .unwrap()
            .unwrap();
        assert_eq!(
            nesting(ok.arguments.as_ref().unwrap()),
            MAX_ARGUMENT_NESTING
        );
        match p.parse_line(&format!("cmd {}=1", key(MAX_ARGUMENT_NESTING + 1))) {
            Err(Error::TooDeep { depth, limit }) => {
                assert_eq!(
                    (depth, limit),
                    (MAX_ARGUMENT_NESTING + 1, MAX_ARGUMENT_NESTING)
                )
            }
            other => panic!("{other:?}"),
        }
        // A JSON value counts too, and a transaction keeps room for its own levels.
        let deep_value = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let line = format!("cmd {}={deep_value}", key(MAX_ARGUMENT_NESTING - 99));
        assert!(matches!(p.parse_line(&line), Err(Error::TooDeep { .. })));
        let line = format!("transaction( t {}=1 )", key(MAX_ARGUMENT_NESTING));
        let request = p.parse_line(&line).unwrap().unwrap();
        let text = serde_json::to_string(&request.to_value()).unwrap();
        assert_eq!(text.matches('{').count() + text.matches('[').count(), 1024);
        assert!(!p.in_transaction());
    }

    #[test]
    fn value_errors() {
        assert!(matches!(
            one("cmd o={\"a\":}"),
            Err(Error::BadJson { key: Some(k), .. }) if k == "o"
        ));
        assert!(matches!(one("cmd o=[1,"), Err(Error::BadJson { .. })));
        assert!(matches!(one("cmd s=\"a\"b"), Err(Error::BadString { .. })));
        assert!(matches!(one("cmd s='a'b"), Err(Error::BadString { .. })));
        assert!(matches!(
            one("cmd s=\"abc"),
            Err(Error::UnterminatedQuote { .. })
        ));
        assert!(matches!(
            one("cmd s='abc"),
            Err(Error::UnterminatedQuote { .. })
        ));
    }

    #[test]
    fn tokenizer_keeps_quotes_and_brackets_together() {
        assert_eq!(
            tokenize(r#"a b="x y" c='p q' d={"k": [1, 2]} e=[ 1 ]"#).unwrap(),
            vec![
                "a",
                r#"b="x y""#,
                "c='p q'",
                r#"d={"k": [1, 2]}"#,
                "e=[ 1 ]"
            ]
        );
        assert_eq!(tokenize(r#"a="x\" y""#).unwrap(), vec![r#"a="x\" y""#]);
        // A stray closing bracket does not swallow the rest of the line.
        assert_eq!(tokenize("a=} b=1").unwrap(), vec!["a=}", "b=1"]);
    }

    #[test]
    fn raw_json_command() {
        assert_eq!(
            value_of(r#"{"execute": "qom-list", "arguments": {"path": "/"}}"#),
            json!({"execute": "qom-list", "arguments": {"path": "/"}})
        );
        assert!(matches!(
            one(r#"{"execute": 1}"#),
            Err(Error::BadRawCommand { .. })
        ));
        assert!(matches!(
            one(r#"{"execute": "x", "id": 1}"#),
            Err(Error::BadRawCommand { .. })
        ));
        assert!(matches!(
            one(r#"{"execute": "x", "arguments": []}"#),
            Err(Error::BadRawCommand { .. })
        ));
        assert!(matches!(
            one(r#"{"execute": "#),
            Err(Error::BadJson { key: None, .. })
        ));
    }

    #[test]
    fn multi_line_transaction() {
        let mut p = QmpParser::new();
        assert_eq!(p.parse_line("transaction(").unwrap(), None);
        assert!(p.in_transaction());
        assert_eq!(
            p.parse_line("block-dirty-bitmap-add node=drive0 name=bitmap1")
                .unwrap(),
            None
        );
        assert_eq!(p.parse_line("   ").unwrap(), None);
        assert_eq!(
            p.parse_line("block-dirty-bitmap-clear node=drive0 name=bitmap0")
                .unwrap(),
            None
        );
        let request = p.parse_line(")").unwrap().unwrap();
        assert!(!p.in_transaction());
        assert_eq!(
            request.to_value(),
            json!({"execute": "transaction", "arguments": {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "bitmap1"}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": "drive0", "name": "bitmap0"}}
            ]}})
        );
    }

    #[test]
    fn transaction_closed_by_last_action_line() {
        let mut p = QmpParser::new();
        p.parse_line("transaction(").unwrap();
        let request = p.parse_line("abort )").unwrap().unwrap();
        assert_eq!(
            request.to_value(),
            json!({"execute": "transaction", "arguments": {"actions": [
                {"type": "abort", "data": {}}]}})
        );
    }

    #[test]
    fn one_line_transactions() {
        assert_eq!(
            value_of("transaction( block-dirty-bitmap-add node=d0 name=b1 )"),
            json!({"execute": "transaction", "arguments": {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}}]}})
        );
        assert_eq!(
            value_of("transaction( a x=1; b y.z=2 ; c )"),
            json!({"execute": "transaction", "arguments": {"actions": [
                {"type": "a", "data": {"x": 1}},
                {"type": "b", "data": {"y": {"z": 2}}},
                {"type": "c", "data": {}}]}})
        );
        assert_eq!(
            value_of("transaction( )"),
            json!({"execute": "transaction", "arguments": {"actions": []}})
        );
    }

    #[test]
    fn transaction_errors_leave_state_sane() {
        let mut p = QmpParser::new();
        assert!(matches!(
            p.parse_line(")"),
            Err(Error::CloseOutsideTransaction)
        ));
        p.parse_line("transaction(").unwrap();
        p.parse_line("a x=1").unwrap();
        // A bad action line adds nothing, the transaction stays open.
        assert!(matches!(
            p.parse_line("b y=1 y=2"),
            Err(Error::SetTwice { .. })
        ));
        assert!(p.in_transaction());
        assert!(matches!(
            p.parse_line("transaction("),
            Err(Error::NestedTransaction)
        ));
        assert!(matches!(p.parse_line(") junk"), Err(Error::TextAfterClose)));
        let request = p.parse_line(")").unwrap().unwrap();
        assert_eq!(
            request.to_value(),
            json!({"execute": "transaction", "arguments": {"actions": [
                {"type": "a", "data": {"x": 1}}]}})
        );
        // A one-line transaction with a bad action leaves no transaction open.
        let mut p = QmpParser::new();
        assert!(p.parse_line("transaction( a bad )").is_err());
        assert!(!p.in_transaction());
        // Ctrl-C drops an open transaction.
        p.parse_line("transaction(").unwrap();
        assert!(p.cancel_transaction());
        assert!(!p.in_transaction());
        assert!(!p.cancel_transaction());
    }

    /// Lines made of the characters that matter to the parser, in every combination a small
    /// deterministic generator reaches: parsing never panics, and what parses re-encodes.
    #[test]
    fn arbitrary_lines_never_panic() {
        const ALPHABET: &[u8] = b"ab=.\"'\\{}[]() ;,:-1 0tTn\t";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let line: String = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize] as char)
                .collect();
            let mut parser = QmpParser::new();
            for prefix in ["", "transaction( ", "cmd "] {
                if let Ok(Some(request)) = parser.parse_line(&format!("{prefix}{line}")) {
                    let encoded = request.to_value().to_string();
                    assert!(serde_json::from_str::<Value>(&encoded).is_ok(), "{line:?}");
                }
            }
            let _ = parse_hmp_line(&line);
        }
    }

    #[test]
    fn hmp_lines() {
        assert_eq!(parse_hmp_line("").unwrap(), HmpLine::Empty);
        assert_eq!(parse_hmp_line("   \t ").unwrap(), HmpLine::Empty);
        assert_eq!(
            parse_hmp_line("  info  status ").unwrap(),
            HmpLine::Command("info  status".to_string())
        );
        assert_eq!(parse_hmp_line("cpu 1").unwrap(), HmpLine::SelectCpu(1));
        for bad in ["cpu", "cpu x", "cpu -1", "cpu 1 2"] {
            assert!(
                matches!(parse_hmp_line(bad), Err(Error::BadCpuIndex { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            hmp_request("info version", None).to_value(),
            json!({"execute": "human-monitor-command",
                   "arguments": {"command-line": "info version"}})
        );
        assert_eq!(
            hmp_request("info registers", Some(2)).to_value(),
            json!({"execute": "human-monitor-command",
                   "arguments": {"command-line": "info registers", "cpu-index": 2}})
        );
    }
}
