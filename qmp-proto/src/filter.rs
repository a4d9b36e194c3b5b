//! Helpers from `qemu.machine`: matching events against patterns, and `conv_keys`.

use serde_json::{Map, Value};

use crate::message::Event;

/// Whether `value` matches `pattern`, with the semantics of `qemu.machine`'s `event_match`:
///
/// - a JSON `null` in the pattern is a wildcard: it matches anything, including a missing
///   member's parent being present with any value;
/// - an object pattern matches an object value that has every key of the pattern, each
///   value matching recursively (extra keys in the value are fine: a recursive subset);
/// - anything else compares by equality (arrays included, element by element).
///
/// As in the original, a pattern cannot require a value to be `null`. Unlike the Python
/// version, a string pattern never matches as a substring: non-objects compare only by
/// equality.
///
/// ```
/// use qmp_proto::event_match;
/// use serde_json::json;
///
/// let event = json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "job0", "len": 16}});
/// assert!(event_match(&event, &json!(null)));
/// assert!(event_match(&event, &json!({"data": {"device": "job0"}})));
/// assert!(event_match(&event, &json!({"data": {"len": null}})));
/// assert!(!event_match(&event, &json!({"data": {"device": "job1"}})));
/// assert!(!event_match(&event, &json!({"data": {"offset": null}})));
/// ```
pub fn event_match(value: &Value, pattern: &Value) -> bool {
    match (pattern, value) {
        (Value::Null, _) => true,
        (Value::Object(pattern), Value::Object(value)) => pattern.iter().all(|(key, sub)| {
            value
                .get(key)
                .is_some_and(|member| event_match(member, sub))
        }),
        _ => pattern == value,
    }
}

/// A typed event filter: an event name plus an optional [`event_match`] pattern applied to the
/// whole event object (`{"event": ..., "data": ..., "timestamp": ...}`), as `qemu.machine`'s
/// `event_wait(name, match=...)` does.
///
/// ```
/// use qmp_proto::{Event, EventFilter, Timestamp};
/// use serde_json::json;
///
/// let event = Event {
///     event: "SHUTDOWN".into(),
///     data: Some(json!({"guest": false, "reason": "host-qmp-quit"})),
///     timestamp: Timestamp { seconds: 1, microseconds: 2 },
/// };
/// assert!(EventFilter::new("SHUTDOWN").matches(&event));
/// let guest = EventFilter::new("SHUTDOWN").with_pattern(json!({"data": {"guest": true}}));
/// assert!(!guest.matches(&event));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EventFilter {
    /// The event name that must match exactly.
    pub name: String,
    /// The pattern the whole event object must match; `None` accepts any.
    pub pattern: Option<Value>,
}

impl EventFilter {
    /// A filter accepting every event called `name`.
    pub fn new(name: impl Into<String>) -> EventFilter {
        EventFilter {
            name: name.into(),
            pattern: None,
        }
    }

    /// Adds a pattern (see [`event_match`]) on the whole event object.
    pub fn with_pattern(mut self, pattern: Value) -> EventFilter {
        self.pattern = Some(pattern);
        self
    }

    /// Whether `event` has this name and matches the pattern.
    pub fn matches(&self, event: &Event) -> bool {
        if event.event != self.name {
            return false;
        }
        match &self.pattern {
            None | Some(Value::Null) => true,
            // Match member by member so the event need not be turned into a `Value`.
            Some(Value::Object(pattern)) => pattern.iter().all(|(key, sub)| match key.as_str() {
                "event" => event_match(&Value::String(event.event.clone()), sub),
                "data" => event
                    .data
                    .as_ref()
                    .is_some_and(|data| event_match(data, sub)),
                "timestamp" => event_match(&event.timestamp_value(), sub),
                _ => false,
            }),
            Some(other) => *other == event.to_value(),
        }
    }
}

/// Replaces `_` with `-` in the top-level keys of `arguments`, like `qemu.machine`'s
/// `conv_keys` (Python keyword arguments cannot contain `-`, QMP names usually do).
/// Nested objects are left alone.
///
/// ```
/// use qmp_proto::conv_keys;
/// use serde_json::json;
///
/// let args = json!({"node_name": "drive0", "opts": {"read_only": true}});
/// let args = conv_keys(args.as_object().unwrap().clone());
/// assert_eq!(serde_json::Value::Object(args), json!({"node-name": "drive0", "opts": {"read_only": true}}));
/// ```
pub fn conv_keys(arguments: Map<String, Value>) -> Map<String, Value> {
    arguments
        .into_iter()
        .map(|(key, value)| (key.replace('_', "-"), value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Timestamp;
    use serde_json::json;

    /// The examples of `qemu.machine`'s `event_match` docstring.
    #[test]
    fn python_docstring_examples() {
        assert!(event_match(&json!({"foo": {"bar": 1}}), &json!(null)));
        assert!(event_match(
            &json!({"foo": {"bar": 1}}),
            &json!({"foo": null})
        ));
        assert!(event_match(&json!({"foo": 5}), &json!({"foo": null})));
        assert!(!event_match(
            &json!({"foo": {"bar": 1}}),
            &json!({"foo": {"abc": null}})
        ));
        assert!(event_match(
            &json!({"foo": {"bar": 1, "rab": 2}}),
            &json!({"foo": {"rab": 2}})
        ));
    }

    #[test]
    fn non_objects_compare_by_equality() {
        assert!(event_match(&json!(5), &json!(5)));
        assert!(!event_match(&json!(5), &json!(6)));
        assert!(!event_match(&json!("foobar"), &json!("foo")));
        assert!(event_match(&json!([1, 2]), &json!([1, 2])));
        assert!(!event_match(&json!([1, 2, 3]), &json!([1, 2])));
        assert!(!event_match(&json!({"a": 1}), &json!("a")));
        assert!(!event_match(&json!(1), &json!({"a": 1})));
        assert!(!event_match(&json!(null), &json!({})));
        assert!(event_match(&json!({}), &json!({})));
    }

    fn event(data: Option<Value>) -> Event {
        Event {
            event: "JOB_STATUS_CHANGE".into(),
            data,
            timestamp: Timestamp {
                seconds: 10,
                microseconds: 20,
            },
        }
    }

    #[test]
    fn filter_matches_the_whole_event_object() {
        let e = event(Some(json!({"id": "job0", "status": "concluded"})));
        assert!(EventFilter::new("JOB_STATUS_CHANGE").matches(&e));
        assert!(!EventFilter::new("STOP").matches(&e));
        let by_data = EventFilter::new("JOB_STATUS_CHANGE")
            .with_pattern(json!({"data": {"status": "concluded"}}));
        assert!(by_data.matches(&e));
        let by_other = EventFilter::new("JOB_STATUS_CHANGE")
            .with_pattern(json!({"data": {"status": "running"}}));
        assert!(!by_other.matches(&e));
        let by_time = EventFilter::new("JOB_STATUS_CHANGE")
            .with_pattern(json!({"timestamp": {"seconds": 10}, "event": "JOB_STATUS_CHANGE"}));
        assert!(by_time.matches(&e));
        let unknown_key = EventFilter::new("JOB_STATUS_CHANGE").with_pattern(json!({"x": null}));
        assert!(!unknown_key.matches(&e));
        let null_pattern = EventFilter::new("JOB_STATUS_CHANGE").with_pattern(json!(null));
        assert!(null_pattern.matches(&e));
        let whole = EventFilter::new("JOB_STATUS_CHANGE").with_pattern(e.to_value());
        assert!(whole.matches(&e));
    }

    #[test]
    fn filter_data_wildcard_needs_data_present() {
        let pattern = json!({"data": null});
        assert!(EventFilter::new("JOB_STATUS_CHANGE")
            .with_pattern(pattern.clone())
            .matches(&event(Some(json!({})))));
        assert!(!EventFilter::new("JOB_STATUS_CHANGE")
            .with_pattern(pattern)
            .matches(&event(None)));
    }

    #[test]
    fn conv_keys_top_level_only() {
        let map = json!({"a_b_c": 1, "plain": {"x_y": 2}, "-already-": 3});
        let converted = conv_keys(map.as_object().unwrap().clone());
        assert_eq!(
            Value::Object(converted),
            json!({"a-b-c": 1, "plain": {"x_y": 2}, "-already-": 3})
        );
    }
}
