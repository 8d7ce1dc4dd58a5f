//! The module graph is acyclic: a module may use another only if that one does not, directly or
//! through others, use it back.
//!
//! Cycles are what make a codebase hard to split, test in pieces, or reason about ("to change
//! the error type I must understand the access log"), and the compiler allows them silently. So
//! this reads the sources the way a reviewer would: every `.rs` file under `src/` (the binaries
//! excepted) becomes a module path (`src/http/error.rs` → `http::error`), every `crate::…`,
//! `super::…`, `self::…` and child-module path in it becomes an edge, and the edges are checked
//! at two granularities: between top-level modules, and between the submodules of `http` and of
//! `access_log`. No service is started: this is a pure source check.
//!
//! The scanner is a small lexer, not a regex, so comments, doc comments and string literals
//! never produce edges, and `use` groups (`use crate::{a::{b, c}, d};`, across lines) expand to
//! every path in them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// `from → {to}`; ordered, so failures print the same way every run.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// Top-level edges allowed to close a cycle. Empty, and it should stay so: each entry must
/// still exist and still close a cycle, or the test fails, so the list can only shrink.
const ALLOWED_TOP_LEVEL_EDGES: &[(&str, &str)] = &[];

#[test]
fn top_level_modules_form_no_cycle() {
    let crate_src = CrateSources::read();
    let mut graph = crate_src.graph(&Granularity::TopLevel);
    // A scanner that found nothing would pass vacuously; the router certainly uses the state.
    assert!(
        graph.get("http").is_some_and(|to| to.contains("state")),
        "the scanner missed http → state; graph:\n{}",
        render(&graph)
    );
    let full = graph.clone();
    for (from, to) in ALLOWED_TOP_LEVEL_EDGES {
        let closes_cycle =
            full.get(*from).is_some_and(|set| set.contains(*to)) && reaches(&full, to, from);
        assert!(
            closes_cycle,
            "allow-listed edge {from} → {to} no longer closes a cycle: delete it from \
             ALLOWED_TOP_LEVEL_EDGES"
        );
        if let Some(set) = graph.get_mut(*from) {
            set.remove(*to);
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "module cycle between top-level modules: {}\nedges:\n{}",
            cycle.join(" → "),
            render(&graph)
        );
    }
}

#[test]
fn http_submodules_form_no_cycle() {
    assert_no_cycle_inside("http");
}

#[test]
fn access_log_submodules_form_no_cycle() {
    assert_no_cycle_inside("access_log");
}

/// `core` is meant to be the transport-independent heart of delivery: it may know the wire
/// format and nothing else, so it can be tested and reused without HTTP, Redis or Postgres.
#[test]
fn core_depends_only_on_protocol() {
    let crate_src = CrateSources::read();
    assert!(
        crate_src.root.join("core").is_dir(),
        "src/core is the delivery core"
    );
    let graph = crate_src.graph(&Granularity::TopLevel);
    let allowed: BTreeSet<String> = ["protocol".to_owned()].into();
    let extra: Vec<&String> = graph
        .get("core")
        .map(|to| to.difference(&allowed).collect())
        .unwrap_or_default();
    assert!(
        extra.is_empty(),
        "core may depend on protocol only, but uses: {extra:?}"
    );
}

/// The session core reaches its connection through a trait: it never imports a transport.
#[test]
fn transports_depend_on_the_session_never_the_reverse() {
    let graph = CrateSources::read().graph(&Granularity::TopLevel);
    let session = graph.get("session").cloned().unwrap_or_default();
    for transport in ["ws", "sse", "http"] {
        assert!(
            !session.contains(transport),
            "session must not depend on {transport}; it uses: {session:?}"
        );
    }
    for transport in ["ws", "sse"] {
        let uses = graph.get(transport).cloned().unwrap_or_default();
        assert!(
            uses.contains("session"),
            "{transport} is a transport of the session: {uses:?}"
        );
        assert!(
            !uses.contains("http"),
            "{transport} must not depend on http: {uses:?}"
        );
    }
}

/// The checks above are only worth something if they can fail.
#[test]
fn cycle_finder_reports_the_cycle_path() {
    let graph = graph_of(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("x", "a")]);
    assert_eq!(
        find_cycle(&graph),
        Some(
            vec!["a", "b", "c", "a"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    let self_loop = graph_of(&[("a", "a")]);
    assert_eq!(
        find_cycle(&self_loop),
        Some(vec!["a".to_owned(), "a".to_owned()])
    );
    let dag = graph_of(&[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]);
    assert_eq!(find_cycle(&dag), None);
    assert!(reaches(&graph, "b", "a"));
    assert!(!reaches(&dag, "d", "a"));
}

#[test]
fn scanner_reads_use_groups_and_inline_paths_but_not_comments_or_strings() {
    let known: BTreeSet<Vec<String>> = ["a", "b", "c", "d", "e", "m", "m::kid", "m::sub", "s"]
        .iter()
        .map(|m| split(m))
        .collect();
    let text = r##"
        //! Uses [`crate::nope`] in a doc comment.
        use crate::{
            a::{self, X},
            b::{deep::{Y, Z as W}},
        };
        use std::fmt; // crate::nope
        /* crate::nope /* nested */ crate::nope */
        pub(crate) use kid::Thing;
        fn f<'a>(x: &'a str) -> char {
            let _ = "crate::nope";
            let _ = r#"crate::nope"#;
            let _ = b"crate::nope";
            let _ = crate::c::call(x);
            let _ = super::s::Item;
            let _ = axum::kid::NotOurs;
            sub::run();
            '{'
        }
        #[cfg(test)]
        mod tests {
            use super::*;
            use crate::d::Q;
        }
        fn g() -> u8 { crate::e::E }
    "##;
    let refs = references(&split("m"), text, &known);
    let found: BTreeSet<(String, String)> = refs
        .into_iter()
        .map(|(from, to)| (from.join("::"), to.join("::")))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("m", "a"),
        ("m", "a::X"),
        ("m", "b::deep::Y"),
        ("m", "b::deep::Z"),
        ("m", "m::kid::Thing"),
        ("m", "c::call"),
        ("m", "s::Item"),
        ("m", "m::sub::run"),
        ("m::tests", "m"),
        ("m::tests", "d::Q"),
        ("m", "e::E"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    assert_eq!(found, expected);
}

fn assert_no_cycle_inside(parent: &str) {
    let crate_src = CrateSources::read();
    let graph = crate_src.graph(&Granularity::Inside(parent.to_owned()));
    // An empty graph would pass vacuously: both modules have submodules that use each other.
    assert!(
        !graph.is_empty(),
        "the scanner found no edges inside {parent}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "module cycle inside {parent}: {}\nedges:\n{}",
            cycle.join(" → "),
            render(&graph)
        );
    }
}

/// How a module path is collapsed into a graph node.
enum Granularity {
    /// `http::error` → `http`; the crate root is not a node.
    TopLevel,
    /// Inside `http`: `http::error::tests` → `http::error`, `http` (its `mod.rs`) stays `http`;
    /// paths outside `http` are not nodes. The parent is a node like any other: it assembles
    /// its children, so a child that uses the parent's items closes a cycle.
    Inside(String),
}

impl Granularity {
    fn node(&self, module: &[String]) -> Option<String> {
        match self {
            Self::TopLevel => module.first().cloned(),
            Self::Inside(parent) => {
                if module.first() != Some(parent) {
                    return None;
                }
                Some(
                    module
                        .iter()
                        .take(2)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("::"),
                )
            }
        }
    }
}

/// Every library source file, by module path.
struct CrateSources {
    root: PathBuf,
    files: Vec<(Vec<String>, String)>,
    modules: BTreeSet<Vec<String>>,
}

impl CrateSources {
    fn read() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut paths = Vec::new();
        collect_rs_files(&root, &mut paths);
        let mut files = Vec::new();
        for path in paths {
            let relative = path.strip_prefix(&root).expect("under src/");
            let Some(module) = module_path(relative) else {
                continue;
            };
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
            files.push((module, text));
        }
        let modules = files.iter().map(|(module, _)| module.clone()).collect();
        Self {
            root,
            files,
            modules,
        }
    }

    /// Edges between distinct nodes; references that resolve outside the graph are dropped.
    fn graph(&self, granularity: &Granularity) -> Graph {
        let mut graph = Graph::new();
        for (module, text) in &self.files {
            for (user, path) in references(module, text, &self.modules) {
                let used = self.module_of(&path);
                let (Some(from), Some(to)) = (granularity.node(&user), granularity.node(used))
                else {
                    continue;
                };
                if from != to {
                    graph.entry(from).or_default().insert(to);
                }
            }
        }
        graph
    }

    /// The module an absolute path lives in: its longest prefix that is a module
    /// (`http::error::ApiError` → `http::error`, `http::openapi` → `http`).
    fn module_of<'p>(&self, path: &'p [String]) -> &'p [String] {
        (0..=path.len())
            .rev()
            .map(|len| &path[..len])
            .find(|prefix| self.modules.contains(*prefix))
            .unwrap_or(&[])
    }
}

fn collect_rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|err| panic!("read {}: {err}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_rs_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
    out.sort();
}

/// `http/error.rs` → `http::error`, `pubsub/mod.rs` → `pubsub`, `lib.rs` → the root (empty).
/// Binaries (`main.rs`, `bin/`) are other crates that use this one by name, so they are skipped.
fn module_path(relative: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if parts.first().is_some_and(|first| first == "bin") || parts == ["main.rs"] {
        return None;
    }
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    if !matches!(stem, "mod" | "lib") {
        parts.push(stem.to_owned());
    }
    Some(parts)
}

fn split(path: &str) -> Vec<String> {
    path.split("::").map(str::to_owned).collect()
}

fn graph_of(edges: &[(&str, &str)]) -> Graph {
    let mut graph = Graph::new();
    for (from, to) in edges {
        graph
            .entry((*from).to_owned())
            .or_default()
            .insert((*to).to_owned());
    }
    graph
}

fn render(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(from, to)| {
            let to: Vec<&str> = to.iter().map(String::as_str).collect();
            format!("  {from} → {}\n", to.join(", "))
        })
        .collect()
}

/// Whether `to` can be reached from `from` along the graph's edges.
fn reaches(graph: &Graph, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from];
    while let Some(node) = todo.pop() {
        if node == to {
            return true;
        }
        if seen.insert(node) {
            todo.extend(graph.get(node).into_iter().flatten().map(String::as_str));
        }
    }
    false
}

/// The first cycle found, as a path that starts and ends at the same node.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        /// On the current DFS path.
        Open,
        /// Fully explored: no cycle through it.
        Done,
    }

    fn visit<'g>(
        node: &'g str,
        graph: &'g Graph,
        marks: &mut BTreeMap<&'g str, Mark>,
        path: &mut Vec<&'g str>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| *n == node)?;
                let mut cycle: Vec<String> =
                    path[start..].iter().map(|n| (*n).to_owned()).collect();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node, Mark::Open);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node, Mark::Done);
        None
    }

    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

/// A token of Rust source, as far as paths are concerned.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Punct(char),
}

/// Rust tokens without comments, string, char or number literals.
fn lex(text: &str) -> Vec<Tok> {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i);
        } else if c == '\'' {
            if at(i + 1) == '\\' {
                // An escaped char literal: '\n', '\'', '\u{1F600}'.
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or label: drop the quote, the name lexes as an identifier.
                i += 1;
            }
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            if raw_prefix && (at(i) == '"' || at(i) == '#') {
                let mut hashes = 0;
                while at(i + hashes) == '#' {
                    hashes += 1;
                }
                if at(i + hashes) == '"' {
                    i = skip_raw_string(&chars, i + hashes + 1, hashes);
                    continue;
                }
                // `r#ident`: a raw identifier.
                if word == "r" && hashes == 1 {
                    i += 1;
                    continue;
                }
            }
            if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                i = skip_string(&chars, i);
                continue;
            }
            if word == "b" && at(i) == '\'' {
                // A byte literal: b'x' or b'\n'.
                i += 1;
                if at(i + 1) == '\\' {
                    i += 2;
                }
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
                continue;
            }
            toks.push(Tok::Ident(word));
        } else {
            let tok = match c {
                ':' if at(i + 1) == ':' => {
                    i += 1;
                    Tok::Sep
                }
                '{' => Tok::Open,
                '}' => Tok::Close,
                ',' => Tok::Comma,
                ';' => Tok::Semi,
                '*' => Tok::Star,
                other => Tok::Punct(other),
            };
            toks.push(tok);
            i += 1;
        }
    }
    toks
}

/// From the opening `"`, past the closing one.
fn skip_string(chars: &[char], open: usize) -> usize {
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// From just after `r##"`, past the closing `"##`.
fn skip_raw_string(chars: &[char], body: usize, hashes: usize) -> usize {
    let mut i = body;
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

/// Every path in a file that names something of this crate, as `(module using it, absolute
/// path)`. The user is the file's module, or an inline module inside it (`mod tests { … }`).
/// `known` is every module of the crate, for paths relative to a child module (`error::X`).
fn references(
    file_module: &[String],
    text: &str,
    known: &BTreeSet<Vec<String>>,
) -> Vec<(Vec<String>, Vec<String>)> {
    let toks = lex(text);
    let mut refs = Vec::new();
    // Inline modules currently open, with the brace depth outside them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let current: Vec<String> = file_module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(name, _)| name.clone()))
            .collect();
        let after_sep_or_dot = i > 0 && matches!(toks[i - 1], Tok::Sep | Tok::Punct('.'));
        match &toks[i] {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, outside)| *outside == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(word) if word == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Open)) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Tok::Ident(word) if word == "use" => {
                let mut paths = Vec::new();
                i = parse_use_tree(&toks, i + 1, Vec::new(), &mut paths);
                for path in paths {
                    if let Some(absolute) = resolve(&current, &path, known) {
                        refs.push((current.clone(), absolute));
                    }
                }
                continue;
            }
            Tok::Ident(_) if !after_sep_or_dot && toks.get(i + 1) == Some(&Tok::Sep) => {
                let (path, next) = read_path(&toks, i);
                if let Some(absolute) = resolve(&current, &path, known) {
                    refs.push((current.clone(), absolute));
                }
                i = next;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

/// `a::b::{c, d::{e, f as g}, *}` from `start`, into `out` as full paths (an alias is dropped,
/// `self` names the prefix itself, a glob names the module globbed). Returns the index after the
/// tree: after the `;` of a top-level `use`, or at the `,`/`}` ending a nested tree.
fn parse_use_tree(
    toks: &[Tok],
    start: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix;
    let mut i = start;
    // `use ::std::…`: a leading separator, external by definition.
    if toks.get(i) == Some(&Tok::Sep) {
        i += 1;
    }
    loop {
        match toks.get(i) {
            Some(Tok::Ident(word)) if word == "self" && !path.is_empty() => {
                out.push(path.clone());
                i += 1;
            }
            Some(Tok::Ident(word)) if word == "as" => {
                // The alias that follows names nothing new.
                i += 2;
            }
            Some(Tok::Ident(word)) => {
                path.push(word.clone());
                i += 1;
                if toks.get(i) != Some(&Tok::Sep) {
                    out.push(path.clone());
                }
            }
            Some(Tok::Sep) => i += 1,
            Some(Tok::Star) => {
                out.push(path.clone());
                i += 1;
            }
            Some(Tok::Open) => {
                i += 1;
                while i < toks.len() && toks[i] != Tok::Close {
                    i = parse_use_tree(toks, i, path.clone(), out);
                    if toks.get(i) == Some(&Tok::Comma) {
                        i += 1;
                    }
                }
                i += 1;
            }
            Some(Tok::Comma | Tok::Close) | None => return i,
            Some(Tok::Semi) => return i + 1,
            Some(_) => i += 1,
        }
    }
}

/// The path starting at `start` (`a::b::c`, stopping before anything that is not `:: ident`),
/// and the index after it.
fn read_path(toks: &[Tok], start: usize) -> (Vec<String>, usize) {
    let mut path = Vec::new();
    let mut i = start;
    while let Some(Tok::Ident(word)) = toks.get(i) {
        path.push(word.clone());
        i += 1;
        if toks.get(i) == Some(&Tok::Sep) && matches!(toks.get(i + 1), Some(Tok::Ident(_))) {
            i += 1;
        } else {
            break;
        }
    }
    (path, i)
}

/// The absolute path (from the crate root) a path names when used in `current`, or `None` if it
/// names something outside the crate (or a local name this scanner cannot see through).
fn resolve(
    current: &[String],
    path: &[String],
    known: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let first = path.first()?;
    let mut base: Vec<String> = current.to_vec();
    let mut rest = path;
    match first.as_str() {
        "crate" => {
            base.clear();
            rest = &path[1..];
        }
        "self" => rest = &path[1..],
        "super" => {
            while rest.first().is_some_and(|seg| seg == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        child => {
            let mut as_child = current.to_vec();
            as_child.push(child.to_owned());
            if !known.contains(&as_child) {
                return None;
            }
        }
    }
    base.extend(rest.iter().cloned());
    Some(base)
}
