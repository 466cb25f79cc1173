//! InfluxDB line protocol parser.
//!
//! Parses `measurement[,tag=value…] field=value[,field=value…] [timestamp]` lines into borrowed
//! slices: names and values point into the request body and are copied only when they contain
//! escapes, so the hot path allocates nothing per field. The caller reuses one [`Line`] for a whole
//! body. Errors name the 1-based line and column and what is wrong. This module does no I/O and
//! knows nothing of schemas; `catalog` decides whether a well-formed line fits a table.

#[cfg(test)]
mod tests;

use std::borrow::Cow;

/// A field value as written; the suffix decides the type (`i` integer, `u` unsigned).
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    Float(f64),
    Integer(i64),
    UInteger(u64),
    String(Cow<'a, str>),
    Boolean(bool),
}

/// One parsed line. Reused across the lines of a body to avoid allocating per line.
#[derive(Debug, Default)]
pub struct Line<'a> {
    pub measurement: Cow<'a, str>,
    pub tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// Fields in the order written; a key written twice appears twice (the last one wins).
    pub fields: Vec<(Cow<'a, str>, FieldValue<'a>)>,
    /// The timestamp as written, in the request's precision.
    pub timestamp: Option<i64>,
}

impl Line<'_> {
    fn clear(&mut self) {
        self.measurement = Cow::Borrowed("");
        self.tags.clear();
        self.fields.clear();
        self.timestamp = None;
    }
}

/// Tags and fields one line may name: no more than a table may have columns
/// (`catalog::COLUMNS_PER_TABLE_MAX`). Checked while parsing, so the duplicate-key checks here
/// and in the catalog stay bounded (a line of 200,000 fields once took 30 s of a core).
pub const KEYS_PER_LINE_MAX: usize = 2_000;

/// The longest string field value (as written, escapes included), as InfluxDB 3: 1 MiB.
pub const STRING_BYTES_MAX: usize = 1 << 20;

/// Up to this many keys, a duplicate is found by scanning the keys so far; past it, by a map.
pub const KEYS_SCANNED_MAX: usize = 32;

impl Line<'_> {
    /// For each field, whether a later field of the same key supersedes it (the last written
    /// wins). `None` when the line repeats no key (the common case, found without allocating
    /// for short lines); linear time for long ones.
    pub fn superseded_fields(&self) -> Option<Vec<bool>> {
        let fields = &self.fields;
        if fields.len() <= KEYS_SCANNED_MAX {
            let repeats =
                (0..fields.len()).any(|i| fields[i + 1..].iter().any(|(k, _)| *k == fields[i].0));
            if !repeats {
                return None;
            }
            let superseded = (0..fields.len())
                .map(|i| fields[i + 1..].iter().any(|(k, _)| *k == fields[i].0))
                .collect();
            return Some(superseded);
        }
        let mut last: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (i, (k, _)) in fields.iter().enumerate() {
            last.insert(k.as_ref(), i);
        }
        if last.len() == fields.len() {
            return None;
        }
        Some(fields.iter().enumerate().map(|(i, (k, _))| last[k.as_ref()] != i).collect())
    }
}

/// Where and why a line is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// 1-based line number within the request body.
    pub line: usize,
    /// 1-based byte column within the line.
    pub column: usize,
    pub message: String,
}

/// Timestamp precision of a write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Nanosecond,
    Microsecond,
    Millisecond,
    Second,
    Minute,
    Hour,
    /// Guess from the magnitude, as InfluxDB 3's `precision=auto`.
    Auto,
}

impl Precision {
    /// Parses the names the v1, v2 and v3 write APIs accept.
    pub fn parse(s: &str) -> Option<Precision> {
        Some(match s {
            "" | "ns" | "n" | "nanosecond" => Precision::Nanosecond,
            "us" | "u" | "µ" | "microsecond" => Precision::Microsecond,
            "ms" | "millisecond" => Precision::Millisecond,
            "s" | "second" => Precision::Second,
            "m" | "minute" => Precision::Minute,
            "h" | "hour" => Precision::Hour,
            "auto" => Precision::Auto,
            _ => return None,
        })
    }

    /// Stable one-byte code used in the WAL (see `storage-format/wal.md`).
    pub fn code(self) -> u8 {
        match self {
            Precision::Nanosecond => 0,
            Precision::Microsecond => 1,
            Precision::Millisecond => 2,
            Precision::Second => 3,
            Precision::Minute => 4,
            Precision::Hour => 5,
            Precision::Auto => 6,
        }
    }

    pub fn from_code(code: u8) -> Option<Precision> {
        Some(match code {
            0 => Precision::Nanosecond,
            1 => Precision::Microsecond,
            2 => Precision::Millisecond,
            3 => Precision::Second,
            4 => Precision::Minute,
            5 => Precision::Hour,
            6 => Precision::Auto,
            _ => return None,
        })
    }

    /// A time in nanoseconds cut down to a whole number of this precision's units: a point
    /// written without a timestamp gets the receipt time in the precision it was written in
    /// (as InfluxDB 3). `Auto` keeps nanoseconds.
    pub fn truncate(self, ns: i64) -> i64 {
        let unit = match self {
            Precision::Auto => 1,
            p => p.to_nanos(1).unwrap_or(1),
        };
        ns - ns.rem_euclid(unit)
    }

    /// Converts a timestamp in this precision to nanoseconds; `None` when it overflows i64.
    pub fn to_nanos(self, value: i64) -> Option<i64> {
        let factor: i64 = match self {
            Precision::Nanosecond => 1,
            Precision::Microsecond => 1_000,
            Precision::Millisecond => 1_000_000,
            Precision::Second => 1_000_000_000,
            Precision::Minute => 60_000_000_000,
            Precision::Hour => 3_600_000_000_000,
            Precision::Auto => {
                // As InfluxDB 3: pick the unit that puts the value near the present.
                let magnitude = value.unsigned_abs();
                if magnitude < 5_000_000_000 {
                    1_000_000_000
                } else if magnitude < 5_000_000_000_000 {
                    1_000_000
                } else if magnitude < 5_000_000_000_000_000 {
                    1_000
                } else {
                    1
                }
            }
        };
        value.checked_mul(factor)
    }
}

/// Splits a body into numbered lines, skipping blank lines and `#` comments, accepting CRLF
/// and a missing final newline. A newline inside a quoted string field value is part of the
/// value, not the end of the line (as InfluxDB 3 reads it). Yields `(line_number, bytes)`, the
/// number of the line a point starts on; UTF-8 is checked per line by [`parse_line`] so one bad
/// line does not reject its neighbours.
pub fn lines(body: &[u8]) -> Lines<'_> {
    Lines { body, pos: 0, line: 1 }
}

/// The iterator [`lines`] returns.
pub struct Lines<'a> {
    body: &'a [u8],
    pos: usize,
    /// Number of the physical line at `pos`.
    line: usize,
}

impl<'a> Iterator for Lines<'a> {
    type Item = (usize, &'a [u8]);

    fn next(&mut self) -> Option<(usize, &'a [u8])> {
        while self.pos < self.body.len() {
            let rest = &self.body[self.pos..];
            let number = self.line;
            let trimmed = trim_start(rest);
            let (len, newlines) = if trimmed.first() == Some(&b'#') {
                (memchr::memchr(b'\n', rest).unwrap_or(rest.len()), 0)
            } else {
                // The parser skips leading blanks; so does the scan for where the point ends.
                let blanks = rest.len() - trimmed.len();
                let (len, newlines) = line_end(trimmed);
                (blanks + len, newlines)
            };
            let line = &rest[..len];
            // Past the line and its newline (if any).
            self.pos += (len + 1).min(rest.len());
            self.line += newlines + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let trimmed = trim_start(line);
            if !trimmed.is_empty() && trimmed[0] != b'#' {
                return Some((number, line));
            }
        }
        None
    }
}

/// Length of the point that `rest` starts with, up to (not including) the newline that ends
/// it, and how many newlines inside quoted string values it spans. Without a double quote
/// before the first newline, that newline ends it.
fn line_end(rest: &[u8]) -> (usize, usize) {
    let first = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
    if memchr::memchr(b'"', &rest[..first]).is_none() {
        return (first, 0);
    }
    #[derive(PartialEq)]
    enum At {
        /// Measurement and tags; `true` inside a tag value (where a tab is not a separator).
        Key(bool),
        /// The field set; `true` right after an unescaped `=` (where `"` opens a string).
        Fields(bool),
        String,
        /// The timestamp and after.
        Rest,
    }
    let mut at = At::Key(false);
    let mut seen_field = false;
    let mut newlines = 0;
    let mut i = 0;
    while i < rest.len() {
        let b = rest[i];
        if at == At::String {
            match b {
                b'\\' if matches!(rest.get(i + 1), Some(b'"' | b'\\')) => i += 1,
                b'"' => at = At::Fields(false),
                b'\n' => newlines += 1,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'\n' {
            return (i, newlines);
        }
        if b == b'\\' && rest.get(i + 1).is_some_and(|&next| next != b'\n') {
            // An escaped character never separates anything; skipping one that the parser
            // keeps as a literal backslash + character changes nothing either.
            i += 2;
            if let At::Fields(_) = at {
                at = At::Fields(false);
                seen_field = true;
            }
            continue;
        }
        at = match at {
            At::Key(_) if b == b' ' => At::Fields(false),
            At::Key(false) if b == b'\t' => At::Fields(false),
            At::Key(_) if b == b',' => At::Key(false),
            At::Key(_) if b == b'=' => At::Key(true),
            At::Fields(true) if b == b'"' => At::String,
            At::Fields(_) if b == b' ' || b == b'\t' => {
                if seen_field {
                    At::Rest
                } else {
                    At::Fields(false)
                }
            }
            At::Fields(_) => {
                seen_field = true;
                At::Fields(b == b'=')
            }
            other => other,
        };
        i += 1;
    }
    (rest.len(), newlines)
}

fn trim_start(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    bytes
}

/// Parses one line (as yielded by [`lines`]) into `out`, as a write is read.
#[cfg(test)]
pub fn parse_line<'a>(
    line_number: usize,
    bytes: &'a [u8],
    out: &mut Line<'a>,
) -> Result<(), ParseError> {
    parse_line_as(line_number, bytes, out, Strictness::Write)
}

/// [`parse_line`], as strict as `strictness` says.
pub fn parse_line_as<'a>(
    line_number: usize,
    bytes: &'a [u8],
    out: &mut Line<'a>,
    strictness: Strictness,
) -> Result<(), ParseError> {
    out.clear();
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            return Err(ParseError {
                line: line_number,
                column: e.valid_up_to() + 1,
                message: "invalid UTF-8".to_string(),
            })
        }
    };
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        pos: 0,
        line: line_number,
        replay: strictness == Strictness::Replay,
    };
    parser.skip_spaces();
    parser.parse(out)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    line: usize,
    /// Replaying a line an earlier version accepted: limits added since do not apply.
    replay: bool,
}

/// How strictly a line is read: as sent now, or as replayed from the WAL, where a line an
/// earlier version accepted (and acknowledged) must still be read — without the limits added
/// since (strings over [`STRING_BYTES_MAX`], tag values ending in a backslash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    Write,
    Replay,
}

/// Which characters end a name or tag value, and which may be escaped in it.
#[derive(Clone, Copy)]
enum Part {
    Measurement,
    TagKey,
    TagValue,
    FieldKey,
}

impl Part {
    fn what(self) -> &'static str {
        match self {
            Part::Measurement => "measurement",
            Part::TagKey => "tag key",
            Part::TagValue => "tag value",
            Part::FieldKey => "field key",
        }
    }

    fn is_end(self, b: u8) -> bool {
        match self {
            Part::Measurement => b == b',' || b == b' ',
            Part::TagKey | Part::FieldKey => b == b',' || b == b' ' || b == b'=',
            Part::TagValue => b == b',' || b == b' ',
        }
    }

    fn is_escapable(self, b: u8) -> bool {
        match self {
            Part::Measurement => b == b',' || b == b' ' || b == b'\\',
            _ => b == b',' || b == b' ' || b == b'=' || b == b'\\',
        }
    }
}

impl<'a> Parser<'a> {
    fn error(&self, column_pos: usize, message: impl Into<String>) -> ParseError {
        ParseError { line: self.line, column: column_pos + 1, message: message.into() }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_spaces(&mut self) -> bool {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.pos > start
    }

    fn parse(&mut self, out: &mut Line<'a>) -> Result<(), ParseError> {
        let start = self.pos;
        // Past a few tags, a duplicate is found through a set rather than by scanning the tags
        // so far, so a line of many tags costs linear time.
        let mut tag_keys: Option<std::collections::HashSet<String>> = None;
        out.measurement = self.name(Part::Measurement)?;
        if out.measurement.is_empty() {
            return Err(self.error(start, "missing measurement"));
        }
        while self.peek() == Some(b',') {
            self.pos += 1;
            let key_pos = self.pos;
            let key = self.key(Part::TagKey)?;
            let value_pos = self.pos;
            let value = self.name(Part::TagValue)?;
            if value.is_empty() {
                return Err(self.error(value_pos, format!("missing value for tag \"{key}\"")));
            }
            if value.ends_with('\\') && !self.replay {
                // It would escape whatever follows it wherever tags are written out again.
                return Err(
                    self.error(value_pos, format!("value of tag \"{key}\" ends in a backslash"))
                );
            }
            if key == "time" {
                return Err(self.error(key_pos, "\"time\" cannot be a tag key"));
            }
            if out.tags.len() >= KEYS_PER_LINE_MAX {
                return Err(self.error(key_pos, format!("more than {KEYS_PER_LINE_MAX} tags")));
            }
            let duplicate = if out.tags.len() < KEYS_SCANNED_MAX {
                out.tags.iter().any(|(k, _)| *k == key)
            } else {
                let seen = tag_keys
                    .get_or_insert_with(|| out.tags.iter().map(|(k, _)| k.to_string()).collect());
                !seen.insert(key.to_string())
            };
            if duplicate {
                return Err(self.error(key_pos, format!("duplicate tag key \"{key}\"")));
            }
            out.tags.push((key, value));
        }
        if !self.skip_spaces() || self.peek().is_none() {
            return Err(self.error(self.pos, "missing field set"));
        }
        loop {
            let key_pos = self.pos;
            let key = self.key(Part::FieldKey)?;
            if key == "time" {
                return Err(self.error(key_pos, "\"time\" cannot be a field key"));
            }
            if out.tags.len() + out.fields.len() >= KEYS_PER_LINE_MAX {
                return Err(self.error(
                    key_pos,
                    format!("more than {KEYS_PER_LINE_MAX} tags and fields in one line"),
                ));
            }
            let value = self.field_value(&key)?;
            out.fields.push((key, value));
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b' ' | b'\t') | None => break,
                Some(_) => {
                    return Err(self.error(self.pos, "expected ',' or ' ' after field value"))
                }
            }
        }
        self.skip_spaces();
        if self.peek().is_some() {
            let ts_pos = self.pos;
            let end = self.bytes[ts_pos..]
                .iter()
                .position(|&b| b == b' ' || b == b'\t')
                .map_or(self.bytes.len(), |n| ts_pos + n);
            let digits = &self.text[ts_pos..end];
            out.timestamp =
                Some(parse_timestamp(digits).ok_or_else(|| {
                    self.error(ts_pos, format!("invalid timestamp \"{digits}\""))
                })?);
            self.pos = end;
            self.skip_spaces();
            if self.peek().is_some() {
                return Err(self.error(self.pos, "unexpected text after timestamp"));
            }
        }
        Ok(())
    }

    /// Reads a tag or field key and the `=` after it.
    fn key(&mut self, part: Part) -> Result<Cow<'a, str>, ParseError> {
        let start = self.pos;
        let key = self.name(part)?;
        if key.is_empty() {
            return Err(self.error(start, format!("missing {}", part.what())));
        }
        if self.peek() != Some(b'=') {
            return Err(
                self.error(self.pos, format!("missing '=' after {} \"{key}\"", part.what()))
            );
        }
        self.pos += 1;
        Ok(key)
    }

    /// Reads a measurement, key or tag value up to its unescaped terminator.
    fn name(&mut self, part: Part) -> Result<Cow<'a, str>, ParseError> {
        let start = self.pos;
        let mut escaped = false;
        while let Some(b) = self.peek() {
            if b == b'\\' {
                if let Some(next) = self.bytes.get(self.pos + 1) {
                    if part.is_escapable(*next) {
                        escaped = true;
                        self.pos += 2;
                        continue;
                    }
                }
                self.pos += 1;
                continue;
            }
            if b == b'\t' && !matches!(part, Part::TagValue) {
                break;
            }
            if part.is_end(b) {
                break;
            }
            self.pos += 1;
        }
        let raw = &self.text[start..self.pos];
        if !escaped {
            return Ok(Cow::Borrowed(raw));
        }
        Ok(Cow::Owned(unescape(raw, |c| c.is_ascii() && part.is_escapable(c as u8))))
    }

    fn field_value(&mut self, key: &str) -> Result<FieldValue<'a>, ParseError> {
        let start = self.pos;
        match self.peek() {
            None | Some(b',' | b' ' | b'\t') => {
                Err(self.error(start, format!("missing value for field \"{key}\"")))
            }
            Some(b'"') => self.string_value(key),
            Some(_) => {
                while let Some(b) = self.peek() {
                    if b == b',' || b == b' ' || b == b'\t' {
                        break;
                    }
                    self.pos += 1;
                }
                let raw = &self.text[start..self.pos];
                parse_scalar(raw).map_err(|problem| {
                    self.error(start, format!("{problem} \"{raw}\" for field \"{key}\""))
                })
            }
        }
    }

    fn string_value(&mut self, key: &str) -> Result<FieldValue<'a>, ParseError> {
        let open = self.pos;
        self.pos += 1;
        let start = self.pos;
        let mut escaped = false;
        loop {
            match self.peek() {
                None => {
                    return Err(self.error(open, format!("unterminated string for field \"{key}\"")))
                }
                Some(b'\\') if matches!(self.bytes.get(self.pos + 1), Some(b'"' | b'\\')) => {
                    escaped = true;
                    self.pos += 2;
                }
                Some(b'"') => break,
                Some(_) => self.pos += 1,
            }
        }
        let raw = &self.text[start..self.pos];
        if raw.len() > STRING_BYTES_MAX && !self.replay {
            return Err(self.error(
                open,
                format!("string for field \"{key}\" longer than {STRING_BYTES_MAX} bytes"),
            ));
        }
        self.pos += 1; // closing quote
        if !escaped {
            return Ok(FieldValue::String(Cow::Borrowed(raw)));
        }
        Ok(FieldValue::String(Cow::Owned(unescape(raw, |c| c == '"' || c == '\\'))))
    }
}

/// Drops the backslash before each character `escapable` accepts; other backslashes stay.
fn unescape(raw: &str, escapable: impl Fn(char) -> bool) -> String {
    let mut owned = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match chars.peek() {
            Some(&next) if c == '\\' && escapable(next) => {
                owned.push(next);
                chars.next();
            }
            _ => owned.push(c),
        }
    }
    owned
}

fn parse_timestamp(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Numbers and booleans: `1`, `1.`, `-0.5e-3` (float), `12i`, `12u`, `t`/`true`/….
fn parse_scalar(raw: &str) -> Result<FieldValue<'static>, &'static str> {
    const INVALID: &str = "invalid value";
    match raw {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(FieldValue::Boolean(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(FieldValue::Boolean(false)),
        _ => {}
    }
    let bytes = raw.as_bytes();
    let Some(&last) = bytes.last() else { return Err(INVALID) };
    if last == b'i' {
        let digits = &raw[..raw.len() - 1];
        if !is_integer(digits, true) {
            return Err(INVALID);
        }
        return digits.parse().map(FieldValue::Integer).map_err(|_| "integer out of range");
    }
    if last == b'u' {
        let digits = &raw[..raw.len() - 1];
        if !is_integer(digits, false) {
            return Err(INVALID);
        }
        return digits
            .parse()
            .map(FieldValue::UInteger)
            .map_err(|_| "unsigned integer out of range");
    }
    // Rust's float parser also takes "inf", "NaN" and "infinity"; line protocol does not.
    let first = bytes[0];
    let starts_numeric = first.is_ascii_digit() || first == b'-' || first == b'+' || first == b'.';
    if !starts_numeric || !bytes.iter().all(|b| b.is_ascii_digit() || b"+-.eE".contains(b)) {
        return Err(INVALID);
    }
    let value: f64 = raw.parse().map_err(|_| INVALID)?;
    if value.is_finite() {
        Ok(FieldValue::Float(value))
    } else {
        Err("float out of range")
    }
}

fn is_integer(s: &str, signed: bool) -> bool {
    let digits = if signed { s.strip_prefix('-').unwrap_or(s) } else { s };
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}
