//! The INI layout of the patent's Tables A and B: optional `[section]` headers, `key=value`
//! lines, `#`/`;` comments. Every section and key keeps its line number so that errors
//! can name the line, the way `sshd -t` does.

/// One `key=value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// A section; the lines before the first header form a section named "".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub line: usize,
    pub entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {msg}")]
pub struct IniError {
    pub line: usize,
    pub msg: String,
}

pub fn err(line: usize, msg: impl Into<String>) -> IniError {
    IniError {
        line,
        msg: msg.into(),
    }
}

/// Parses the text; duplicate sections and duplicate keys within a section are errors,
/// since a silently shadowed value is how a wrong port goes unnoticed.
pub fn parse(text: &str) -> Result<Vec<Section>, IniError> {
    let mut out = vec![Section {
        name: String::new(),
        line: 0,
        entries: Vec::new(),
    }];
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(rest) = t.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| err(line, "section header without a closing `]`"))?
                .trim();
            if name.is_empty() {
                return Err(err(line, "empty section name"));
            }
            if let Some(s) = out.iter().find(|s| s.name == name) {
                return Err(err(
                    line,
                    format!("section [{name}] repeats the one on line {}", s.line),
                ));
            }
            out.push(Section {
                name: name.to_string(),
                line,
                entries: Vec::new(),
            });
            continue;
        }
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| err(line, format!("expected key=value, found {t:?}")))?;
        let key = k.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err(line, format!("bad key {key:?}")));
        }
        let section = out.last_mut().expect("the top section always exists");
        if let Some(e) = section.entries.iter().find(|e| e.key == key) {
            return Err(err(
                line,
                format!("key {key} repeats the one on line {}", e.line),
            ));
        }
        section.entries.push(Entry {
            key: key.to_string(),
            value: v.trim().to_string(),
            line,
        });
    }
    if out[0].entries.is_empty() {
        out.remove(0);
    }
    Ok(out)
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Refuses keys outside `known`, naming the line (the `deny_unknown_fields` rule).
    pub fn only(&self, known: &[&str]) -> Result<(), IniError> {
        match self
            .entries
            .iter()
            .find(|e| !known.contains(&e.key.as_str()))
        {
            Some(e) => Err(err(
                e.line,
                format!(
                    "unknown key {} in {} (known: {})",
                    e.key,
                    self.label(),
                    known.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn require(&self, key: &str) -> Result<&Entry, IniError> {
        self.get(key).ok_or_else(|| {
            err(
                self.line.max(1),
                format!("{} lacks the key {key}", self.label()),
            )
        })
    }

    fn label(&self) -> String {
        if self.name.is_empty() {
            "the file".to_string()
        } else {
            format!("section [{}]", self.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_keys_and_lines() {
        let s = parse("# c\na=1\n\n[x]\nb = two words \n; c\n[y]\n").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "");
        assert_eq!(s[0].get("a").unwrap().line, 2);
        assert_eq!(s[1].get("b").unwrap().value, "two words");
        assert_eq!(s[2].line, 7);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("[a]\nnot a pair\n").unwrap_err().line, 2);
        assert_eq!(parse("[a\n").unwrap_err().line, 1);
        assert_eq!(parse("[a]\nk=1\nk=2\n").unwrap_err().line, 3);
        assert_eq!(parse("[a]\n[a]\n").unwrap_err().line, 2);
        assert_eq!(parse("b@d=1\n").unwrap_err().line, 1);
    }
}
