//! Exclude patterns for backups, matched without a regex engine.
//!
//! A pattern without `/` matches any entry whose *name* matches (`*.tmp`,
//! `node_modules`); a pattern with `/` matches the path relative to the
//! backed-up root (`build/*`, `src/*/target`). `*` matches any run of
//! characters except `/`, `?` one character except `/`, `**` any run
//! including `/`. Matching is on raw bytes.

/// A compiled exclude list.
#[derive(Debug, Clone, Default)]
pub struct Excludes {
    names: Vec<Vec<u8>>,
    paths: Vec<Vec<u8>>,
}

impl Excludes {
    /// Compile `patterns`.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        let mut e = Excludes::default();
        for p in patterns {
            let p = p.as_ref().trim_start_matches('/').as_bytes().to_vec();
            if p.is_empty() {
                continue;
            }
            if p.contains(&b'/') {
                e.paths.push(p);
            } else {
                e.names.push(p);
            }
        }
        e
    }

    /// True when nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.paths.is_empty()
    }

    /// Is the entry `name` at `rel` (path below the root, `/`-separated) excluded?
    pub fn excluded(&self, name: &[u8], rel: &[u8]) -> bool {
        self.names.iter().any(|p| glob(p, name)) || self.paths.iter().any(|p| glob(p, rel))
    }
}

/// Match `text` against `pat` (`*`, `?`, `**`).
pub fn glob(pat: &[u8], text: &[u8]) -> bool {
    match pat.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) if rest.first() == Some(&b'*') => {
            let rest = &rest[1..];
            (0..=text.len()).any(|i| glob(rest, &text[i..]))
        }
        Some((b'*', rest)) => {
            let stop = text.iter().position(|&c| c == b'/').unwrap_or(text.len());
            (0..=stop).any(|i| glob(rest, &text[i..]))
        }
        Some((b'?', rest)) => text.first().is_some_and(|&c| c != b'/') && glob(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(glob(b"*.tmp", b"a.tmp"));
        assert!(!glob(b"*.tmp", b"a.tmpx"));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a*c", b"a/c"));
        assert!(glob(b"a/**/c", b"a/x/y/c"));
        let e = Excludes::new(&["*.o", "build/*", "/cache"]);
        assert!(e.excluded(b"x.o", b"src/x.o"));
        assert!(e.excluded(b"out", b"build/out"));
        assert!(!e.excluded(b"out", b"src/build/out"));
        assert!(e.excluded(b"cache", b"deep/cache"));
        assert!(!e.excluded(b"main.rs", b"src/main.rs"));
    }
}
