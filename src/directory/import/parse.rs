//! Reading of Postfix `virtual` and Sendmail/Postfix `aliases` files into
//! entries of a key and its target tokens, each with the file and line it
//! came from. Nothing here touches the database or interprets addresses.
//!
//! Both formats share the line rules of Postfix aliases(5) and virtual(5):
//! empty lines, whitespace-only lines and lines whose first non-whitespace
//! character is `#` are ignored, and a line that starts with whitespace
//! continues the previous logical line. Sendmail's aliases(5) also joins a
//! line that ends with a backslash to the next one, which is accepted here
//! as well. A `#` later in a line is not a comment in either format.
//!
//! Targets are separated by commas or whitespace outside double quotes.
//! Inside quotes, `\"` and `\\` stand for `"` and `\`, and commas and spaces
//! are part of the target, as in `"|/usr/bin/vacation alice"`.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{Origin, Problem};

/// One target as written: quotes removed, with where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub text: String,
    pub origin: Origin,
}

/// A key with its targets, from one logical line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key as written, without quotes; not yet lowercased.
    pub key: String,
    pub targets: Vec<Token>,
    /// Position of the key.
    pub origin: Origin,
}

/// A logical line: the physical lines it spans, with their numbers.
#[derive(Clone, Debug)]
struct LogicalLine {
    segments: Vec<(usize, String)>,
}

/// Kind of a target token, told by its first characters (aliases(5)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// `|command`: delivery to a program.
    Pipe,
    /// `/path`: delivery to a file.
    File,
    /// `:include:/path`: the targets listed in that file.
    Include(String),
    /// `\name`: a local user, exempt from further aliasing.
    LocalExempt(String),
    /// Text with an `@`: an address, or `@domain` in a virtual map.
    Address,
    /// A name without `@`: a local user or another alias.
    Local,
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetKind::Pipe => "pipe command",
            TargetKind::File => "file",
            TargetKind::Include(_) => ":include: file",
            TargetKind::LocalExempt(_) | TargetKind::Local => "local name",
            TargetKind::Address => "address",
        })
    }
}

/// Prefix of an include target, matched in any letter case as Sendmail does.
const INCLUDE_PREFIX: &str = ":include:";

/// Classifies a target token by its first characters.
pub fn classify(text: &str) -> TargetKind {
    if text.starts_with('|') {
        TargetKind::Pipe
    } else if text.starts_with('/') {
        TargetKind::File
    } else if text.len() >= INCLUDE_PREFIX.len()
        && text.as_bytes()[..INCLUDE_PREFIX.len()].eq_ignore_ascii_case(INCLUDE_PREFIX.as_bytes())
    {
        TargetKind::Include(text[INCLUDE_PREFIX.len()..].trim().to_owned())
    } else if let Some(name) = text.strip_prefix('\\') {
        TargetKind::LocalExempt(name.to_owned())
    } else if text.contains('@') {
        TargetKind::Address
    } else {
        TargetKind::Local
    }
}

/// Reads a file as UTF-8 text.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    String::from_utf8(bytes).map_err(|error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the file is not UTF-8 text (invalid byte at offset {})",
                error.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Joins physical lines into logical lines, dropping comments and blank
/// lines. A continuation line before any entry is a problem.
fn logical_lines(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<LogicalLine> {
    let mut lines: Vec<LogicalLine> = Vec::new();
    // True while the previous physical line ended with a backslash.
    let mut joined = false;
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let (content, continues) = match line.strip_suffix('\\') {
            Some(head) => (head, true),
            None => (line, false),
        };
        let was_joined = std::mem::replace(&mut joined, continues);
        if was_joined {
            if let Some(last) = lines.last_mut() {
                last.segments.push((number, content.to_owned()));
            }
            continue;
        }

        let trimmed = content.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            // A comment cannot end with a backslash continuation.
            joined = false;
            continue;
        }
        if trimmed.len() < content.len() {
            match lines.last_mut() {
                Some(last) => last.segments.push((number, content.to_owned())),
                None => problems.push(Problem::at(
                    Origin::new(file, number),
                    "a continuation line (starting with whitespace) comes before any entry",
                )),
            }
            continue;
        }
        lines.push(LogicalLine {
            segments: vec![(number, content.to_owned())],
        });
    }
    lines
}

/// Splits text into targets at commas and whitespace outside double quotes.
fn tokenize(
    file: &Path,
    segments: &[(usize, String)],
    first_column: usize,
    problems: &mut Vec<Problem>,
) -> Vec<Token> {
    let mut tokens = Vec::new();
    for (position, (number, text)) in segments.iter().enumerate() {
        let origin = Origin::new(file, *number);
        let text = if position == 0 {
            text.get(first_column..).unwrap_or("")
        } else {
            text.as_str()
        };
        let mut current = String::new();
        let mut in_token = false;
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => {
                    in_token = true;
                    let mut closed = false;
                    while let Some(inner) = chars.next() {
                        match inner {
                            '"' => {
                                closed = true;
                                break;
                            }
                            '\\' => {
                                if let Some(escaped) = chars.next() {
                                    current.push(escaped);
                                }
                            }
                            other => current.push(other),
                        }
                    }
                    if !closed {
                        problems.push(Problem::at(
                            origin.clone(),
                            format!("unterminated double quote in {:?}", text.trim()),
                        ));
                    }
                }
                ',' => {
                    if in_token {
                        tokens.push(Token {
                            text: std::mem::take(&mut current),
                            origin: origin.clone(),
                        });
                        in_token = false;
                    }
                }
                c if c.is_whitespace() => {
                    if in_token {
                        tokens.push(Token {
                            text: std::mem::take(&mut current),
                            origin: origin.clone(),
                        });
                        in_token = false;
                    }
                }
                other => {
                    in_token = true;
                    current.push(other);
                }
            }
        }
        if in_token {
            tokens.push(Token {
                text: current,
                origin,
            });
        }
    }
    join_include_paths(tokens)
}

/// Joins `:include:` written alone with the path token after it, as in
/// `:include: /etc/mail/staff`.
fn join_include_paths(tokens: Vec<Token>) -> Vec<Token> {
    let mut joined: Vec<Token> = Vec::with_capacity(tokens.len());
    let mut iter = tokens.into_iter().peekable();
    while let Some(mut token) = iter.next() {
        if token.text.eq_ignore_ascii_case(INCLUDE_PREFIX)
            && let Some(path) = iter.next()
        {
            token.text.push_str(&path.text);
        }
        joined.push(token);
    }
    joined
}

/// Parses a Postfix virtual alias map: `key target, target …` per logical
/// line, the key ending at the first whitespace.
pub fn parse_virtual(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<Entry> {
    let mut entries = Vec::new();
    for line in logical_lines(file, text, problems) {
        let (number, first) = &line.segments[0];
        let key_end = first.find(char::is_whitespace).unwrap_or(first.len());
        let key = first[..key_end].to_owned();
        let targets = tokenize(file, &line.segments, key_end, problems);
        entries.push(Entry {
            key,
            targets,
            origin: Origin::new(file, *number),
        });
    }
    entries
}

/// Parses an aliases file: `name: target, target …` per logical line. The
/// name may be in double quotes when it contains special characters.
pub fn parse_aliases(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<Entry> {
    let mut entries = Vec::new();
    for line in logical_lines(file, text, problems) {
        let (number, first) = &line.segments[0];
        let origin = Origin::new(file, *number);
        let Some((key, value_start)) = split_alias_key(first) else {
            problems.push(Problem::at(
                origin,
                format!(
                    "expected `name: target, …` but found no ':' after the name in {:?}",
                    first.trim()
                ),
            ));
            continue;
        };
        if key.is_empty() {
            problems.push(Problem::at(origin, "the alias name before ':' is empty"));
            continue;
        }
        let targets = tokenize(file, &line.segments, value_start, problems);
        entries.push(Entry {
            key,
            targets,
            origin,
        });
    }
    entries
}

/// Returns the alias name and the byte offset after its ':'.
fn split_alias_key(line: &str) -> Option<(String, usize)> {
    if let Some(rest) = line.strip_prefix('"') {
        let close = rest.find('"')?;
        let name = rest[..close].to_owned();
        let after = &rest[close + 1..];
        let colon = after.find(':')?;
        // Only whitespace may separate the closing quote and the colon.
        if !after[..colon].trim().is_empty() {
            return None;
        }
        return Some((name, 1 + close + 1 + colon + 1));
    }
    let colon = line.find(':')?;
    Some((line[..colon].trim().to_owned(), colon + 1))
}

/// Parses an `:include:` file: every logical line contains targets only, with
/// the same syntax as the right-hand side of an alias (aliases(5)).
pub fn parse_include(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<Token> {
    logical_lines(file, text, problems)
        .into_iter()
        .flat_map(|line| tokenize(file, &line.segments, 0, problems))
        .collect()
}

/// Resolves an include path: relative paths are taken from the directory of
/// the file that names them.
pub fn include_path(including_file: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        return path.to_owned();
    }
    including_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(tokens: &[Token]) -> Vec<&str> {
        tokens.iter().map(|t| t.text.as_str()).collect()
    }

    #[test]
    fn virtual_lines_comments_and_continuations() {
        let mut problems = Vec::new();
        let text = "# comment\n\nalice@example.com  alice@example.org,\n   bob@example.org\n  # indented comment\n@example.com catchall@example.org\nexample.net anything\n";
        let entries = parse_virtual(Path::new("virtual"), text, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].key, "alice@example.com");
        assert_eq!(
            texts(&entries[0].targets),
            ["alice@example.org", "bob@example.org"]
        );
        assert_eq!(entries[0].targets[1].origin.line, 4);
        assert_eq!(entries[1].key, "@example.com");
        assert_eq!(entries[1].origin.line, 6);
        assert_eq!(entries[2].key, "example.net");
    }

    #[test]
    fn aliases_quotes_and_includes() {
        let mut problems = Vec::new();
        let text = "Postmaster: root\nstaff: :include:staff.list, \"|/usr/bin/log staff, now\"\n\"odd name\": x@example.org\nlist: :include: /etc/list\n";
        let entries = parse_aliases(Path::new("aliases"), text, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(entries[0].key, "Postmaster");
        assert_eq!(texts(&entries[0].targets), ["root"]);
        assert_eq!(
            texts(&entries[1].targets),
            [":include:staff.list", "|/usr/bin/log staff, now"]
        );
        assert_eq!(entries[2].key, "odd name");
        assert_eq!(texts(&entries[3].targets), [":include:/etc/list"]);
    }

    #[test]
    fn aliases_backslash_continuation() {
        let mut problems = Vec::new();
        let text = "team: a@example.org, \\\nb@example.org\n";
        let entries = parse_aliases(Path::new("aliases"), text, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            texts(&entries[0].targets),
            ["a@example.org", "b@example.org"]
        );
    }

    #[test]
    fn aliases_missing_colon_is_reported_with_line() {
        let mut problems = Vec::new();
        let text = "ok: a@example.org\nbroken a@example.org\n";
        let entries = parse_aliases(Path::new("aliases"), text, &mut problems);
        assert_eq!(entries.len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].to_string().starts_with("aliases:2: "),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn leading_continuation_and_open_quote_are_problems() {
        let mut problems = Vec::new();
        parse_aliases(
            Path::new("aliases"),
            "  a@example.org\nx: \"|cmd\n",
            &mut problems,
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].to_string().starts_with("aliases:1: "));
        assert!(problems[1].to_string().starts_with("aliases:2: "));
    }

    #[test]
    fn classify_target_kinds() {
        assert_eq!(classify("|/bin/cmd"), TargetKind::Pipe);
        assert_eq!(classify("/var/log/mail"), TargetKind::File);
        assert_eq!(
            classify(":INCLUDE:/etc/x"),
            TargetKind::Include("/etc/x".into())
        );
        assert_eq!(classify("\\alice"), TargetKind::LocalExempt("alice".into()));
        assert_eq!(classify("a@example.org"), TargetKind::Address);
        assert_eq!(classify("@example.org"), TargetKind::Address);
        assert_eq!(classify("root"), TargetKind::Local);
    }

    #[test]
    fn include_paths_relative_to_including_file() {
        assert_eq!(
            include_path(Path::new("/etc/mail/aliases"), "lists/staff"),
            PathBuf::from("/etc/mail/lists/staff")
        );
        assert_eq!(
            include_path(Path::new("/etc/mail/aliases"), "/srv/staff"),
            PathBuf::from("/srv/staff")
        );
    }
}
