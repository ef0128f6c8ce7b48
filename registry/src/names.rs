//! Dataset names and references: `imagenet`, `org/laion@v3`, `imagenet@latest`,
//! `imagenet@b3:<root id>`.

use shoal_chunker::Hash;
use std::fmt;
use std::str::FromStr;

/// A dataset name: one or two `/`-separated segments of `[a-z0-9][a-z0-9._-]*`, at most 128
/// bytes in all (`imagenet`, `org/laion-400m`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatasetName(String);

/// A version or tag name: `[A-Za-z0-9][A-Za-z0-9._+-]*`, at most 128 bytes (`v3`, `2024-06-01`,
/// `latest`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

/// A string that is not a valid name or reference; the message says which rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct NameError {
    pub what: &'static str,
    pub input: String,
    pub reason: String,
}

fn name_err(what: &'static str, input: &str, reason: impl Into<String>) -> NameError {
    NameError {
        what,
        input: input.to_string(),
        reason: reason.into(),
    }
}

impl DatasetName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DatasetName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let e = |r: &str| Err(name_err("dataset name", s, r));
        if s.is_empty() {
            return e("it is empty");
        }
        if s.len() > 128 {
            return e("longer than 128 bytes");
        }
        let segs: Vec<&str> = s.split('/').collect();
        if segs.len() > 2 {
            return e("at most one '/' (org/name)");
        }
        for seg in segs {
            let mut chars = seg.chars();
            match chars.next() {
                None => return e("empty segment around '/'"),
                Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() => {}
                Some(_) => return e("each segment must start with a lowercase letter or digit"),
            }
            if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)) {
                return e("only lowercase letters, digits, '.', '_' and '-' are allowed");
            }
        }
        Ok(DatasetName(s.to_string()))
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Label {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn parse(s: &str, what: &'static str) -> Result<Self, NameError> {
        let e = |r: &str| Err(name_err(what, s, r));
        let mut chars = s.chars();
        match chars.next() {
            None => return e("it is empty"),
            Some(c) if c.is_ascii_alphanumeric() => {}
            Some(_) => return e("must start with a letter or digit"),
        }
        if s.len() > 128 {
            return e("longer than 128 bytes");
        }
        if s.starts_with("b3:") {
            return e("names starting with 'b3:' are root ids");
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c)) {
            return e("only letters, digits, '.', '_', '+' and '-' are allowed");
        }
        Ok(Label(s.to_string()))
    }
}

impl FromStr for Label {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Label::parse(s, "version or tag name")
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What follows the `@` of a reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rev {
    /// A version name, or failing that a tag name.
    Label(Label),
    /// A root tree id (`b3:<64 hex>`): names exactly one snapshot of the content.
    Root(Hash),
}

/// `NAME@VERSION`, `NAME@TAG` or `NAME@b3:<root id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DatasetRef {
    pub dataset: DatasetName,
    pub rev: Rev,
}

/// `NAME@VERSION` where the version must be a plain name (publish, tag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VersionRef {
    pub dataset: DatasetName,
    pub version: Label,
}

fn split_ref(s: &str) -> Result<(&str, &str), NameError> {
    let e = |r: &str| name_err("reference", s, r);
    let (name, rev) = s
        .split_once('@')
        .ok_or_else(|| e("expected NAME@VERSION"))?;
    if name.is_empty() {
        return Err(e("missing dataset name before '@'"));
    }
    if rev.is_empty() {
        return Err(e("missing version, tag or b3:<root> after '@'"));
    }
    if rev.contains('@') {
        return Err(e("more than one '@'"));
    }
    Ok((name, rev))
}

impl FromStr for DatasetRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (name, rev) = split_ref(s)?;
        let dataset = name.parse()?;
        let rev = match rev.strip_prefix("b3:") {
            Some(hex) => Rev::Root(hex.parse().map_err(|_| {
                name_err("reference", s, "a root id is b3: followed by 64 hex digits")
            })?),
            None => Rev::Label(rev.parse()?),
        };
        Ok(DatasetRef { dataset, rev })
    }
}

impl FromStr for VersionRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (name, rev) = split_ref(s)?;
        Ok(VersionRef {
            dataset: name.parse()?,
            version: Label::parse(rev, "version name")?,
        })
    }
}

impl fmt::Display for Rev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rev::Label(l) => write!(f, "{l}"),
            Rev::Root(h) => write!(f, "b3:{h}"),
        }
    }
}

impl fmt::Display for DatasetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.dataset, self.rev)
    }
}

impl fmt::Display for VersionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.dataset, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One helper for every case: `Ok(display)` or `Err(substring of the message)`.
    fn check(input: &str, expected: Result<&str, &str>) {
        match (input.parse::<DatasetRef>(), expected) {
            (Ok(r), Ok(want)) => assert_eq!(r.to_string(), want, "{input}"),
            (Err(e), Err(want)) => {
                assert!(e.to_string().contains(want), "{input}: {e} lacks {want:?}")
            }
            (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn refs() {
        let root = "5f".repeat(32);
        check("imagenet@v3", Ok("imagenet@v3"));
        check("org/laion-400m@latest", Ok("org/laion-400m@latest"));
        check(
            &format!("imagenet@b3:{root}"),
            Ok(&format!("imagenet@b3:{root}")),
        );
        check("imagenet@", Err("missing version"));
        check("@v1", Err("missing dataset name"));
        check("a@b@c", Err("more than one '@'"));
        check("imagenet", Err("expected NAME@VERSION"));
        check("ImageNet@v1", Err("lowercase"));
        check("a/b/c@v1", Err("at most one '/'"));
        check("a/@v1", Err("empty segment"));
        check("../x@v1", Err("must start with"));
        check("x@../v", Err("must start with"));
        check("x@v 1", Err("only letters"));
        check("x@b3:abc", Err("64 hex digits"));
        check("x@-v", Err("must start with"));
    }

    #[test]
    fn version_refs_reject_root_ids() {
        assert!("x@v1".parse::<VersionRef>().is_ok());
        assert!(format!("x@b3:{}", "0".repeat(64))
            .parse::<VersionRef>()
            .is_err());
    }
}
