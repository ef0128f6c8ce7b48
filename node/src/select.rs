//! Partial pulls and pins (`--include`, `--exclude`): which files of a version to take.
//!
//! Patterns are globs ([`globset`]) matched against paths from the version's root
//! (`train/n01/img_1.jpg`); `*` crosses `/`, as in Hugging Face's `allow_patterns`, so
//! `*.jpg` takes every JPEG at any depth; a pattern ending in `/` means everything under that
//! directory, as does the directory's own name. A file is taken when its path, or the path of a directory above it, matches an
//! include (or there are none) and nothing it or its directories match is excluded.

use crate::error::{Error, Result};
use crate::walk::Walked;
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Most patterns of one kind a selection takes (each is compiled into an automaton).
pub const MAX_PATTERNS: usize = 256;

/// Which files of a version to take: see the module docs. Empty: every file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

impl Selection {
    /// The whole version.
    pub fn is_all(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// The patterns compiled; a bad one is an error naming it.
    pub fn matcher(&self) -> Result<Matcher> {
        Ok(Matcher {
            include: (!self.include.is_empty())
                .then(|| set("--include", &self.include))
                .transpose()?,
            exclude: set("--exclude", &self.exclude)?,
        })
    }

    /// As the user would write it, for messages.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .include
            .iter()
            .map(|p| format!("--include {p:?}"))
            .collect();
        parts.extend(self.exclude.iter().map(|p| format!("--exclude {p:?}")));
        parts.join(" ")
    }
}

fn set(flag: &str, patterns: &[String]) -> Result<GlobSet> {
    if patterns.len() > MAX_PATTERNS {
        return Err(Error::Usage(format!(
            "{} {flag} patterns; at most {MAX_PATTERNS}",
            patterns.len()
        )));
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        // A directory's pattern takes what is under it (see `Matcher::takes`).
        let p = p.trim_start_matches('/').trim_end_matches('/');
        let glob = Glob::new(p)
            .map_err(|e| Error::Usage(format!("{flag} {p:?} is not a valid pattern: {e}")))?;
        b.add(glob);
    }
    b.build()
        .map_err(|e| Error::Usage(format!("{flag} patterns: {e}")))
}

/// A compiled [`Selection`].
pub struct Matcher {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Matcher {
    /// Whether every path is taken (no pattern given).
    pub fn takes_all(&self) -> bool {
        self.include.is_none() && self.exclude.is_empty()
    }

    /// Whether the file at `path` is taken.
    pub fn takes(&self, path: &str) -> bool {
        let mut prefixes = path
            .match_indices('/')
            .map(|(i, _)| &path[..i])
            .chain(std::iter::once(path));
        let included = match &self.include {
            None => true,
            Some(inc) => prefixes.clone().any(|p| inc.is_match(p)),
        };
        included && !prefixes.any(|p| self.exclude.is_match(p))
    }

    /// The files and symlinks of `tree` this selection takes, the directories above them,
    /// and directories it takes themselves (empty ones included; tree nodes are kept whole:
    /// they were read to find the files).
    pub fn select(&self, tree: Walked) -> Walked {
        let files: Vec<_> = tree
            .files
            .into_iter()
            .filter(|f| self.takes(&f.path))
            .collect();
        let symlinks: Vec<_> = tree
            .symlinks
            .into_iter()
            .filter(|(p, _)| self.takes(p))
            .collect();
        let mut parents: BTreeSet<&str> = BTreeSet::new();
        for p in files
            .iter()
            .map(|f| &*f.path)
            .chain(symlinks.iter().map(|(p, _)| p.as_str()))
        {
            parents.extend(p.match_indices('/').map(|(i, _)| &p[..i]));
        }
        let dirs = tree
            .dirs
            .into_iter()
            .filter(|(d, _)| parents.contains(d.as_str()) || self.takes(d))
            .collect();
        Walked {
            dirs,
            files,
            symlinks,
            nodes: tree.nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(include: &[&str], exclude: &[&str]) -> Matcher {
        Selection {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
        }
        .matcher()
        .unwrap()
    }

    #[test]
    fn globs_cross_directories_and_directories_take_what_is_under_them() {
        let m = sel(&["*.jpg"], &[]);
        assert!(m.takes("a.jpg") && m.takes("train/x/b.jpg") && !m.takes("train/x/b.png"));
        let m = sel(&["train"], &[]);
        assert!(m.takes("train/x/b.png") && m.takes("train") && !m.takes("trainx/a"));
        let m = sel(&["train/"], &["*.txt"]);
        assert!(m.takes("train/a.jpg") && !m.takes("train/notes.txt") && !m.takes("val/a.jpg"));
        let m = sel(&[], &["val/**", "tmp"]);
        assert!(m.takes("train/a") && !m.takes("val/a/b") && !m.takes("tmp/x"));
        let m = sel(&["/shards/s[0-1]"], &[]);
        assert!(m.takes("shards/s0") && m.takes("shards/s1") && !m.takes("shards/s2"));
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let e = Selection {
            include: vec!["a[".into()],
            exclude: vec![],
        }
        .matcher()
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("--include") && e.contains("a["), "{e}");
    }
}
