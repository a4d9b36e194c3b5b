//! What a wait looks for ([`Pattern`]) and what it hands back ([`Match`], [`AnyMatch`]).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use crate::error::{Error, Result};

/// A substring or a regular expression to wait for in console output.
///
/// Output is raw bytes (a guest may print anything), so both kinds match bytes: a substring is
/// compared byte for byte, a regex is a [`regex::bytes::Regex`]. Patterns match anywhere,
/// including before a newline, so a prompt such as `login: ` is found as soon as it is printed.
///
/// **Incremental matching.** A wait does not rescan the whole buffer whenever new output
/// arrives. A substring of length L is searched in the new output plus the last L-1 bytes
/// already scanned, so it is found even when it is split across any number of writes. A regex
/// is re-run starting at most [`Config::regex_lookback`](crate::Config::regex_lookback) bytes
/// (default 4 KiB) before the new output. Look-behind assertions see the real text before that
/// window, so `(?m)^` and `\b` behave as on the whole output, and `\A` (or `^` without `m`)
/// matches only at the first unconsumed byte. A regex match that starts more than the
/// lookback before the newest output and was not complete when that older output was scanned
/// can be missed; raise the lookback for expressions spanning more text.
#[derive(Clone)]
pub struct Pattern {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// The needle, and a literal-only regex for it: the regex crate searches literals with
    /// SIMD (memchr's memmem). `None` only if the needle is too big to compile; then a plain
    /// byte search runs.
    Substring(Vec<u8>, Option<regex::bytes::Regex>),
    Regex(regex::bytes::Regex),
}

impl Pattern {
    /// A literal byte string (UTF-8 text or raw bytes).
    pub fn substring(needle: impl AsRef<[u8]>) -> Pattern {
        let needle = needle.as_ref().to_vec();
        let mut literal = String::with_capacity(6 + 4 * needle.len());
        literal.push_str("(?-u)");
        for byte in &needle {
            literal.push_str(&format!("\\x{byte:02x}"));
        }
        let finder = regex::bytes::Regex::new(&literal).ok();
        Pattern {
            kind: Kind::Substring(needle, finder),
        }
    }

    /// A regular expression over bytes ([`regex::bytes::Regex`] syntax).
    pub fn regex(expression: &str) -> Result<Pattern> {
        let re = regex::bytes::Regex::new(expression).map_err(|source| Error::InvalidPattern {
            pattern: expression.to_string(),
            source: Box::new(source),
        })?;
        Ok(Pattern {
            kind: Kind::Regex(re),
        })
    }

    /// How many already scanned bytes a new scan must revisit.
    pub(crate) fn overlap(&self, regex_lookback: usize) -> usize {
        match &self.kind {
            Kind::Substring(needle, _) => needle.len().saturating_sub(1),
            Kind::Regex(_) => regex_lookback,
        }
    }

    /// The first match in `hay` starting at or after `from`.
    pub(crate) fn find_at(&self, hay: &[u8], from: usize) -> Option<Range<usize>> {
        match &self.kind {
            Kind::Substring(_, Some(finder)) => finder.find_at(hay, from).map(|m| m.range()),
            Kind::Substring(needle, None) => {
                find_substring(hay, needle, from).map(|start| start..start + needle.len())
            }
            Kind::Regex(re) => re.find_at(hay, from).map(|m| m.range()),
        }
    }
}

impl From<&str> for Pattern {
    fn from(needle: &str) -> Pattern {
        Pattern::substring(needle)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Substring(needle, _) => write!(f, "{:?}", String::from_utf8_lossy(needle)),
            Kind::Regex(re) => write!(f, "/{}/", re.as_str()),
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Substring(..) => write!(f, "Pattern::substring({self})"),
            Kind::Regex(_) => write!(f, "Pattern::regex({self})"),
        }
    }
}

/// Position of the first `needle` in `hay[from..]`, as an index into `hay`.
fn find_substring(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let Some((&first, rest)) = needle.split_first() else {
        return (from <= hay.len()).then_some(from);
    };
    let last_start = hay.len().checked_sub(needle.len())?;
    let mut at = from;
    while at <= last_start {
        let candidate = at + hay[at..=last_start].iter().position(|&b| b == first)?;
        if hay[candidate + 1..candidate + needle.len()] == *rest {
            return Some(candidate);
        }
        at = candidate + 1;
    }
    None
}

/// Output consumed by a successful wait: everything up to and including the match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    text: Vec<u8>,
    start: usize,
    offset: u64,
}

impl Match {
    pub(crate) fn new(text: Vec<u8>, range: Range<usize>, stream_start: u64) -> Match {
        Match {
            offset: stream_start + range.start as u64,
            start: range.start,
            text,
        }
    }

    /// All consumed output: what came before the match, then the match itself.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// The output consumed before the match.
    pub fn before(&self) -> &[u8] {
        &self.text[..self.start]
    }

    /// The matched bytes.
    pub fn matched(&self) -> &[u8] {
        &self.text[self.start..]
    }

    /// Position of the first matched byte in the whole console stream (bytes since creation).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// [`text`](Self::text) as UTF-8, invalid sequences replaced.
    pub fn text_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.text)
    }

    /// Takes the consumed output.
    pub fn into_text(self) -> Vec<u8> {
        self.text
    }
}

/// The failure pattern QEMU's functional tests use for Linux guests: the first words of the
/// line a panicking kernel prints.
pub const KERNEL_PANIC: &str = "Kernel panic - not syncing";

/// Which list the pattern that matched in [`Console::wait_for_any`](crate::Console::wait_for_any)
/// came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// One of the success patterns.
    Success,
    /// One of the failure patterns.
    Failure,
}

/// The result of [`Console::wait_for_any`](crate::Console::wait_for_any).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AnyMatch {
    /// Whether a success or a failure pattern matched.
    pub outcome: Outcome,
    /// Index of the matching pattern within its list.
    pub index: usize,
    /// The consumed output and the match.
    pub found: Match,
}

impl AnyMatch {
    /// True when a success pattern matched.
    pub fn is_success(&self) -> bool {
        self.outcome == Outcome::Success
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substring_search_finds_first_occurrence_from_offset() {
        type Case<'a> = (&'a [u8], &'a [u8], usize, Option<usize>);
        let cases: &[Case<'_>] = &[
            (b"hello world", b"world", 0, Some(6)),
            (b"hello world", b"world", 6, Some(6)),
            (b"hello world", b"world", 7, None),
            (b"aaab", b"aab", 0, Some(1)),
            (b"ab", b"abc", 0, None),
            (b"", b"x", 0, None),
            (b"abc", b"", 2, Some(2)),
            (b"abc", b"", 3, Some(3)),
            (b"abc", b"", 4, None),
            (b"xyxyz", b"xyz", 0, Some(2)),
            (b"\xff\x00\xfe", b"\x00\xfe", 0, Some(1)),
        ];
        for &(hay, needle, from, want) in cases {
            assert_eq!(
                find_substring(hay, needle, from),
                want,
                "{hay:?} {needle:?} {from}"
            );
        }
    }

    #[test]
    fn substring_patterns_match_raw_bytes_literally() {
        for needle in [&b"a.b*"[..], b"\xff\x00(", b"login: "] {
            let p = Pattern::substring(needle);
            let mut hay = b"xx".to_vec();
            hay.extend_from_slice(needle);
            assert_eq!(p.find_at(&hay, 0), Some(2..2 + needle.len()), "{needle:?}");
        }
        assert_eq!(Pattern::substring("a.b").find_at(b"axb a.b", 0), Some(4..7));
        assert_eq!(Pattern::substring("").find_at(b"abc", 2), Some(2..2));
    }

    #[test]
    fn overlap_is_length_minus_one_for_substrings_and_lookback_for_regexes() {
        assert_eq!(Pattern::substring("login: ").overlap(4096), 6);
        assert_eq!(Pattern::substring("").overlap(4096), 0);
        assert_eq!(Pattern::regex("a+").unwrap().overlap(77), 77);
    }

    #[test]
    fn invalid_regex_is_a_typed_error() {
        match Pattern::regex("(unclosed") {
            Err(Error::InvalidPattern { pattern, .. }) => assert_eq!(pattern, "(unclosed"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn regex_anchors_see_the_whole_haystack() {
        let re = Pattern::regex(r"\Aab").unwrap();
        assert_eq!(re.find_at(b"abab", 0), Some(0..2));
        assert_eq!(re.find_at(b"abab", 1), None);
    }

    #[test]
    fn match_accessors_split_before_and_matched() {
        let m = Match::new(b"boot ok login: ".to_vec(), 8..15, 100);
        assert_eq!(m.before(), b"boot ok ");
        assert_eq!(m.matched(), b"login: ");
        assert_eq!(m.offset(), 108);
        assert_eq!(m.text_lossy(), "boot ok login: ");
    }
}
