//! chasquid's files in protobuf text format (chasquid.conf, users files,
//! domaininfo records), read without protoc or a schema: parsed into a
//! tree of fields that each reader then takes apart by field name, with
//! the line of every field for its errors.
//!
//! Go's `prototext`, which wrote these files, puts `bytes` fields (salts,
//! password hashes) in strings with escapes: `\xHH` for a byte that is not
//! valid UTF-8, `\uXXXX` for U+0080–U+009F (the two UTF-8 bytes of that
//! code point, not one byte), octal, `\n`, and any other UTF-8 as it is.
//! A salt read back one byte off would make every imported password fail,
//! so strings are decoded exactly as the text format's spec and Go's
//! decoder say.

use std::fmt;

/// Nesting deeper than this is refused: chasquid's messages nest three
/// levels (users → value → scrypt), and a hostile file must not overflow
/// the stack.
const MAX_DEPTH: usize = 16;

/// A parse or type error, at a line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub line: usize,
    pub problem: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl Error {
    /// The one-line error for the file at `path`: `path:line: problem`.
    pub fn at(&self, path: &std::path::Path) -> String {
        format!("{}:{}: {}", path.display(), self.line, self.problem)
    }
}

/// One `name: value` or `name { … }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub line: usize,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A quoted string (adjacent ones joined), decoded to its bytes.
    Str(Vec<u8>),
    /// A number, an enum name or a boolean, as written.
    Word(String),
    /// A nested message.
    Message(Vec<Field>),
}

impl Field {
    /// An error about this field, at its line.
    pub fn error(&self, problem: impl fmt::Display) -> Error {
        Error {
            line: self.line,
            problem: format!("{}: {problem}", self.name),
        }
    }

    pub fn bytes(&self) -> Result<&[u8], Error> {
        match &self.value {
            Value::Str(b) => Ok(b),
            _ => Err(self.error("expected a quoted string")),
        }
    }

    /// A `string` field: UTF-8, as protobuf requires.
    pub fn string(&self) -> Result<String, Error> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| self.error("not valid UTF-8"))
    }

    pub fn message(&self) -> Result<&[Field], Error> {
        match &self.value {
            Value::Message(m) => Ok(m),
            _ => Err(self.error("expected a message in { }")),
        }
    }

    /// An enum value or other bare word.
    pub fn word(&self) -> Result<&str, Error> {
        match &self.value {
            Value::Word(w) => Ok(w),
            _ => Err(self.error("expected a name or a number")),
        }
    }

    /// An integer: decimal, `0x` hexadecimal or `0` octal, maybe negative.
    pub fn int(&self) -> Result<i128, Error> {
        let w = self.word()?;
        let (negative, digits) = match w.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, w),
        };
        let parsed = if let Some(hex) = digits
            .strip_prefix("0x")
            .or_else(|| digits.strip_prefix("0X"))
        {
            u64::from_str_radix(hex, 16)
        } else if digits.len() > 1 && digits.starts_with('0') {
            u64::from_str_radix(&digits[1..], 8)
        } else {
            digits.parse::<u64>()
        };
        let n = i128::from(parsed.map_err(|_| self.error(format!("{w:?} is not an integer")))?);
        Ok(if negative { -n } else { n })
    }

    /// An integer that must fit `T` (the field's protobuf type).
    pub fn int_as<T: TryFrom<i128>>(&self) -> Result<T, Error> {
        let n = self.int()?;
        T::try_from(n).map_err(|_| self.error(format!("{n} is out of range")))
    }

    pub fn bool(&self) -> Result<bool, Error> {
        match self.word()? {
            "true" | "True" | "t" | "1" => Ok(true),
            "false" | "False" | "f" | "0" => Ok(false),
            w => Err(self.error(format!("{w:?} is not true or false"))),
        }
    }
}

/// The one field named `name` among `fields`, if any; a second one is an
/// error, as it is for Go's decoder (a singular field set twice).
pub fn single<'a>(fields: &'a [Field], name: &str) -> Result<Option<&'a Field>, Error> {
    let mut found = fields.iter().filter(|f| f.name == name);
    let first = found.next();
    match found.next() {
        Some(again) => Err(again.error("given twice")),
        None => Ok(first),
    }
}

/// Parses a whole file into its top-level fields.
pub fn parse(text: &[u8]) -> Result<Vec<Field>, Error> {
    let tokens = lex(text)?;
    let mut p = Parser { tokens, pos: 0 };
    p.message(None, 0)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(Vec<u8>),
    Punct(u8),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => write!(f, "{w:?}"),
            Token::Str(_) => f.write_str("a string"),
            Token::Punct(c) => write!(f, "'{}'", *c as char),
        }
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-')
}

fn lex(s: &[u8]) -> Result<Vec<(Token, usize)>, Error> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        match b {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b' ' | b'\t' | b'\r' | 0x0b | 0x0c => i += 1,
            b'#' => {
                while i < s.len() && s[i] != b'\n' {
                    i += 1;
                }
            }
            b':' | b'{' | b'}' | b'<' | b'>' | b'[' | b']' | b',' | b';' => {
                out.push((Token::Punct(b), line));
                i += 1;
            }
            b'"' | b'\'' => {
                let (bytes, next) = string(s, i, line)?;
                out.push((Token::Str(bytes), line));
                i = next;
            }
            _ if is_word_byte(b) => {
                let start = i;
                while i < s.len() && is_word_byte(s[i]) {
                    i += 1;
                }
                // Only ASCII bytes were taken.
                let w = String::from_utf8_lossy(&s[start..i]).into_owned();
                out.push((Token::Word(w), line));
            }
            _ => {
                return Err(Error {
                    line,
                    problem: format!("unexpected character {:?}", char::from(b)),
                });
            }
        }
    }
    Ok(out)
}

/// Decodes the string starting with the quote at `s[start]`; returns its
/// bytes and the index after its closing quote.
fn string(s: &[u8], start: usize, line: usize) -> Result<(Vec<u8>, usize), Error> {
    let err = |problem: &str| Error {
        line,
        problem: problem.to_string(),
    };
    let quote = s[start];
    let mut out = Vec::new();
    let mut i = start + 1;
    loop {
        let Some(&b) = s.get(i) else {
            return Err(err("unterminated string"));
        };
        i += 1;
        match b {
            b'\n' => return Err(err("unterminated string")),
            _ if b == quote => return Ok((out, i)),
            b'\\' => {
                let Some(&e) = s.get(i) else {
                    return Err(err("unterminated string"));
                };
                i += 1;
                match e {
                    b'a' => out.push(0x07),
                    b'b' => out.push(0x08),
                    b'f' => out.push(0x0c),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'v' => out.push(0x0b),
                    b'\\' | b'\'' | b'"' | b'?' => out.push(e),
                    b'0'..=b'7' => {
                        // One to three octal digits, at most \377.
                        let mut v = u32::from(e - b'0');
                        for _ in 0..2 {
                            match s.get(i) {
                                Some(&d @ b'0'..=b'7') => {
                                    v = v * 8 + u32::from(d - b'0');
                                    i += 1;
                                }
                                _ => break,
                            }
                        }
                        out.push(u8::try_from(v).map_err(|_| err("octal escape above \\377"))?);
                    }
                    b'x' | b'X' => {
                        // One or two hex digits.
                        let n = s[i..]
                            .iter()
                            .take(2)
                            .take_while(|d| d.is_ascii_hexdigit())
                            .count();
                        if n == 0 {
                            return Err(err("\\x without hex digits"));
                        }
                        out.push(
                            hex(&s[i..i + n])
                                .and_then(|v| u8::try_from(v).ok())
                                .ok_or_else(|| err("bad \\x escape"))?,
                        );
                        i += n;
                    }
                    b'u' | b'U' => {
                        let n = if e == b'u' { 4 } else { 8 };
                        let mut cp = s
                            .get(i..i + n)
                            .and_then(hex)
                            .ok_or_else(|| err("bad \\u or \\U escape"))?;
                        i += n;
                        // A UTF-16 surrogate pair written as two \u escapes.
                        if (0xD800..0xDC00).contains(&cp) {
                            let low = s
                                .get(i..i + 6)
                                .filter(|t| t.starts_with(b"\\u"))
                                .and_then(|t| hex(&t[2..]))
                                .filter(|lo| (0xDC00..0xE000).contains(lo))
                                .ok_or_else(|| err("unpaired surrogate in a \\u escape"))?;
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                            i += 6;
                        }
                        // The code point's UTF-8 bytes: \u009e is C2 9E.
                        let c = char::from_u32(cp)
                            .ok_or_else(|| err("\\u escape is not a Unicode scalar value"))?;
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => return Err(err("unknown escape")),
                }
            }
            _ => out.push(b),
        }
    }
}

fn hex(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&(Token, usize)> {
        self.tokens.get(self.pos)
    }

    fn last_line(&self) -> usize {
        self.tokens.last().map_or(1, |(_, l)| *l)
    }

    fn eat(&mut self, c: u8) -> bool {
        if matches!(self.peek(), Some((Token::Punct(p), _)) if *p == c) {
            self.pos += 1;
            return true;
        }
        false
    }

    fn unexpected(&self, wanted: &str) -> Error {
        match self.peek() {
            Some((t, line)) => Error {
                line: *line,
                problem: format!("expected {wanted}, found {t}"),
            },
            None => Error {
                line: self.last_line(),
                problem: format!("expected {wanted}, found the end of the file"),
            },
        }
    }

    /// Fields until `close` (or the end of the file at the top).
    fn message(&mut self, close: Option<u8>, depth: usize) -> Result<Vec<Field>, Error> {
        if depth > MAX_DEPTH {
            return Err(self.unexpected("at most 16 nested messages"));
        }
        let mut out = Vec::new();
        loop {
            match self.peek().cloned() {
                None if close.is_none() => return Ok(out),
                Some((Token::Punct(c), _)) if Some(c) == close => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some((Token::Word(name), line)) => {
                    self.pos += 1;
                    self.field(name, line, &mut out, depth)?;
                }
                _ => {
                    let wanted = match close {
                        Some(c) => format!("a field name or '{}'", c as char),
                        None => "a field name".to_string(),
                    };
                    return Err(self.unexpected(&wanted));
                }
            }
        }
    }

    /// What follows a field's name: `: value`, `: [values]` or `{ … }`,
    /// then an optional `,` or `;`.
    fn field(
        &mut self,
        name: String,
        line: usize,
        out: &mut Vec<Field>,
        depth: usize,
    ) -> Result<(), Error> {
        let colon = self.eat(b':');
        if colon && self.eat(b'[') {
            // A list is the field repeated.
            if !self.eat(b']') {
                loop {
                    let value = self.value(depth)?;
                    out.push(Field {
                        name: name.clone(),
                        line,
                        value,
                    });
                    if self.eat(b']') {
                        break;
                    }
                    if !self.eat(b',') {
                        return Err(self.unexpected("',' or ']'"));
                    }
                }
            }
        } else if colon || matches!(self.peek(), Some((Token::Punct(b'{' | b'<'), _))) {
            let value = self.value(depth)?;
            out.push(Field { name, line, value });
        } else {
            return Err(self.unexpected(&format!("':' or '{{' after {name}")));
        }
        let _ = self.eat(b',') || self.eat(b';');
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Value, Error> {
        match self.peek().cloned() {
            Some((Token::Punct(b'{'), _)) => {
                self.pos += 1;
                Ok(Value::Message(self.message(Some(b'}'), depth + 1)?))
            }
            Some((Token::Punct(b'<'), _)) => {
                self.pos += 1;
                Ok(Value::Message(self.message(Some(b'>'), depth + 1)?))
            }
            Some((Token::Word(w), _)) => {
                self.pos += 1;
                Ok(Value::Word(w))
            }
            Some((Token::Str(_), _)) => {
                // Adjacent strings are one value ("a" "b" is "ab").
                let mut bytes = Vec::new();
                while let Some((Token::Str(s), _)) = self.peek() {
                    bytes.extend_from_slice(s);
                    self.pos += 1;
                }
                Ok(Value::Str(bytes))
            }
            _ => Err(self.unexpected("a value")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Field {
        let mut fields = parse(text.as_bytes()).unwrap();
        assert_eq!(fields.len(), 1, "{fields:?}");
        fields.remove(0)
    }

    #[test]
    fn strings_decode_as_gos_prototext_wrote_them() {
        // Lines chasquid-util 1.11 wrote: \x for bytes that are not UTF-8,
        // \u for U+0080..U+009F (two bytes each), raw UTF-8 (˧ is CB A7).
        let f = one(r#"salt: "FY\x8e\x13\xa8\x83\xff`\x18\xb1\u008eSR\x00\xf8""#);
        assert_eq!(
            f.bytes().unwrap(),
            b"FY\x8e\x13\xa8\x83\xff`\x18\xb1\xc2\x8eSR\x00\xf8"
        );
        let f = one("salt: \"\\xae5\\x19˧q͡&Fk\\x8e\\xee\\xb1\\x0e3\"");
        assert_eq!(
            f.bytes().unwrap(),
            b"\xae5\x19\xcb\xa7q\xcd\xa1&Fk\x8e\xee\xb1\x0e3"
        );
        let f = one(r#"s: 'a\'b' "\101\n\x4" '\?\"' "\ud83d\ude00\U0001F600""#);
        assert_eq!(
            f.bytes().unwrap(),
            "a'bA\n\u{4}?\"😀😀".as_bytes(),
            "octal, short hex, both quotes, a surrogate pair, adjacent strings"
        );
    }

    #[test]
    fn messages_lists_and_separators() {
        let fields = parse(
            b"# comment\nusers: { key: \"ann\" value { denied: {} } }\nusers < key: 'bob'; >\n\
              a: [1, 0x1f, -010]\nb: []\nc: true, d: TLS_SECURE;\n",
        )
        .unwrap();
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["users", "users", "a", "a", "a", "c", "d"]);
        let ann = fields[0].message().unwrap();
        assert_eq!(ann[0].string().unwrap(), "ann");
        assert_eq!(ann[1].message().unwrap()[0].name, "denied");
        assert_eq!(fields[1].line, 3);
        let ints: Vec<i128> = fields[2..5].iter().map(|f| f.int().unwrap()).collect();
        assert_eq!(ints, [1, 31, -8]);
        assert!(fields[5].bool().unwrap());
        assert_eq!(fields[6].word().unwrap(), "TLS_SECURE");
        assert!(fields[2].int_as::<u8>().is_ok());
        assert!(fields[4].int_as::<u32>().is_err());
    }

    #[test]
    fn malformed_input_is_one_clear_error_never_a_panic() {
        for (text, line, needle) in [
            ("a: \"open\n", 1, "unterminated"),
            ("a: \"x\\", 1, "unterminated"),
            ("a: \"\\q\"", 1, "unknown escape"),
            ("a: \"\\x\"", 1, "\\x"),
            ("a: \"\\400\"", 1, "octal"),
            ("a: \"\\u12\"", 1, "\\u"),
            ("a: \"\\ud800\"", 1, "surrogate"),
            ("a: \"\\U00110000\"", 1, "Unicode"),
            ("\n\na {\n b: 1\n", 4, "end of the file"),
            ("a }", 1, "':' or '{' after a"),
            ("a: }", 1, "a value"),
            ("}", 1, "a field name"),
            ("a: [1 2]", 1, "',' or ']'"),
            ("a: 1\n@", 2, "unexpected character"),
            ("a:", 1, "a value"),
            (&"a {".repeat(40), 1, "nested"),
        ] {
            let e = parse(text.as_bytes()).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.problem.contains(needle), "{text:?}: {e}");
        }
        // Type errors name the field and its line.
        let f = one("\nlogN: \"14\"");
        assert_eq!(
            f.int().unwrap_err().to_string(),
            "line 2: logN: expected a name or a number"
        );
        assert!(one("x: 99999999999999999999999").int().is_err());
        assert!(one("x: 1.5").int().is_err());
        assert!(one("x: maybe").bool().is_err());
        assert!(one("x: \"\\xff\"").string().is_err());
        assert!(one("x: 1").message().is_err());
        let twice = parse(b"a: 1\na: 2\n").unwrap();
        assert_eq!(single(&twice, "a").unwrap_err().line, 2);
        assert!(single(&twice, "b").unwrap().is_none());
    }
}
