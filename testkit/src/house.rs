//! Checks of the repository's shape that keep it easy to find one's way in:
//! which source files of a crate import each other around a loop, and which
//! relative links of the Markdown pages lead nowhere. The test command runs
//! them (`testkit/tests/house.rs`), so the tree cannot drift back.
//!
//! The import graph is read from the text of the sources, not from the
//! compiler: every `crate::`, `super::` and `self::` path in a file (in `use`
//! items, brace groups expanded, and inline in code) is resolved to the file
//! of the deepest module it names, following `pub use` re-exports of `mod.rs`
//! and `lib.rs` files to where the item really lives. A file using what an
//! ancestor module defines is not an edge (a child may lean on its parent);
//! inline `#[cfg(test)]` modules are left out (tests may look anywhere).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside one crate, e.g. `["store", "model"]`.
type ModPath = Vec<String>;

/// The source files of one crate's library (or binary) tree, by module path.
#[derive(Debug, Default)]
pub struct ModuleTree {
    files: BTreeMap<ModPath, PathBuf>,
    /// Each file's code as [`code_of`] leaves it.
    texts: BTreeMap<ModPath, String>,
}

impl ModuleTree {
    /// Reads the module tree of one crate root: `root` (`lib.rs` or
    /// `main.rs`) in `src`, and every file its `mod name;` items reach.
    pub fn read(src: &Path, root: &str) -> std::io::Result<ModuleTree> {
        let mut tree = ModuleTree::default();
        let mut pending = vec![(Vec::new(), PathBuf::from(root))];
        while let Some((module, rel)) = pending.pop() {
            let text = std::fs::read_to_string(src.join(&rel))?;
            let code = code_of(&text);
            for child in declared_modules(&code) {
                let folder = match rel.file_name().and_then(|n| n.to_str()) {
                    Some("mod.rs" | "lib.rs" | "main.rs") => rel.parent().map(Path::to_path_buf).unwrap_or_default(),
                    _ => rel.with_extension(""),
                };
                let as_file = folder.join(format!("{child}.rs"));
                let as_folder = folder.join(&child).join("mod.rs");
                let child_rel = if src.join(&as_file).exists() { as_file } else { as_folder };
                pending.push(([module.clone(), vec![child]].concat(), child_rel));
            }
            tree.texts.insert(module.clone(), code);
            tree.files.insert(module, rel);
        }
        Ok(tree)
    }

    /// Builds a tree from `(relative path, text)` pairs (for tests).
    pub fn from_sources(root: &str, sources: &[(&str, &str)]) -> ModuleTree {
        let mut tree = ModuleTree::default();
        for (rel, text) in sources {
            if let Some(module) = module_path(Path::new(rel), root) {
                tree.files.insert(module.clone(), PathBuf::from(rel));
                tree.texts.insert(module, code_of(text));
            }
        }
        tree
    }

    /// The file-level import edges: `a -> b` when file `a` uses something
    /// that lives in file `b` (neither the same file nor an ancestor of `a`).
    pub fn edges(&self) -> BTreeSet<(PathBuf, PathBuf)> {
        let mut edges = BTreeSet::new();
        for (module, text) in &self.texts {
            for path in referenced_paths(text) {
                let Some(absolute) = self.absolutize(module, &path) else { continue };
                let Some(target) = self.resolve(&absolute, 0) else { continue };
                if &target == module || module.starts_with(&target) {
                    continue;
                }
                edges.insert((self.files[module].clone(), self.files[&target].clone()));
            }
        }
        edges
    }

    /// Turns a path used in `module` into an absolute module path, or `None`
    /// for a path into another crate. A first segment naming a child module
    /// is relative to `module` (how `use child::Item` reads since 2018).
    fn absolutize(&self, module: &ModPath, path: &[String]) -> Option<ModPath> {
        let mut base: ModPath = module.clone();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                // `super` of `a/b.rs` is `a`; of `a/mod.rs` (module `a`) the crate root.
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            Some(first) if self.files.contains_key(&[module.clone(), vec![first.to_string()]].concat()) => {}
            _ => return None,
        }
        Some([base, rest.to_vec()].concat())
    }

    /// The module whose file holds what `path` names: the deepest module
    /// prefix of it, followed through `pub use` re-exports.
    fn resolve(&self, path: &[String], depth: usize) -> Option<ModPath> {
        let mut best: Option<usize> = None;
        for len in (0..=path.len()).rev() {
            if self.files.contains_key(&path[..len]) {
                best = Some(len);
                break;
            }
        }
        let len = best?;
        let module = path[..len].to_vec();
        if depth < 8
            && let Some(item) = path.get(len)
            && let Some(target) = self.reexport(&module, item)
            && let Some(resolved) = self.resolve(&[target, path[len + 1..].to_vec()].concat(), depth + 1)
        {
            return Some(resolved);
        }
        Some(module)
    }

    /// Where `module` re-exports `item` from, as an absolute path, if it does.
    fn reexport(&self, module: &ModPath, item: &str) -> Option<ModPath> {
        let text = self.texts.get(module)?;
        for statement in use_items(text, true) {
            for path in expand_use(&statement) {
                let Some(last) = path.last() else { continue };
                if last != item && last != "*" {
                    continue;
                }
                let Some(absolute) = self.absolutize(module, &path) else { continue };
                if last == "*" {
                    let mut base = absolute;
                    base.pop();
                    base.push(item.to_string());
                    if self.files.contains_key(&base[..base.len() - 1]) && base[..base.len() - 1] != module[..] {
                        return Some(base);
                    }
                    continue;
                }
                return Some(absolute);
            }
        }
        None
    }
}

/// The names of the file modules a piece of code declares (`mod name;`,
/// with any visibility; inline `mod name { .. }` is not a file).
fn declared_modules(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while let Some(found) = code[at..].find("mod ") {
        let start = at + found;
        at = start + 4;
        if start > 0 && is_ident_char(code[..start].chars().next_back()) {
            continue;
        }
        let rest = code[at..].trim_start();
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        // A `#[cfg(test)] mod tests;` file is a test: tests may look anywhere.
        let test_only = code[..start].trim_end().ends_with("#[cfg(test)]");
        if !name.is_empty() && rest[name.len()..].trim_start().starts_with(';') && !test_only {
            names.push(name);
        }
    }
    names
}

/// The module path of a file relative to `src`, or `None` for the other
/// crate root (`main.rs` in a library tree, `lib.rs` in a binary's).
fn module_path(rel: &Path, root: &str) -> Option<ModPath> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop()?;
    if parts.is_empty() && (file == "lib.rs" || file == "main.rs") {
        return (file == root).then(Vec::new);
    }
    // A binary under src/bin is a crate of its own.
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    if file != "mod.rs" {
        parts.push(file.trim_end_matches(".rs").to_string());
    }
    Some(parts)
}

/// What of a source file counts: its code without comments, literals and
/// inline test modules.
fn code_of(text: &str) -> String {
    strip_test_modules(&strip_comments(text))
}

/// The text with every inline `#[cfg(test)] mod name { ... }` removed.
fn strip_test_modules(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_inline_mod = trimmed.starts_with("mod ") && {
            let head_end = trimmed.find(['{', ';']).unwrap_or(trimmed.len());
            trimmed[head_end..].starts_with('{')
        };
        if !is_inline_mod {
            out.push_str("#[cfg(test)]");
            rest = after;
            continue;
        }
        let open = after.find('{').expect("checked above");
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The code of a text with comments (doc comments included), string and
/// character literals blanked out, so that paths and braces in prose or in
/// messages do not count. Line breaks are kept.
fn strip_comments(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && matches!(next, Some('"') | Some('#'))
            && !is_ident_char(i.checked_sub(1).map(|j| chars[j]))
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < chars.len() {
                if chars[j] == '"' && (0..hashes).all(|h| chars.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                out.push(blank(chars[j]));
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if let Some(&c) = chars.get(i) {
                    out.push(blank(c));
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}'), or a lifetime ('a).
            let close = if next == Some('\\') {
                (i + 2..chars.len().min(i + 12)).find(|&j| chars[j] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(end) => {
                    out.push_str("' '");
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident_char(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// Expands a `use` tree with its aliases already removed (`a::{b, c::{d, e}}`)
/// into its paths.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    fn expand(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
        let tree = tree.trim();
        if tree.is_empty() {
            return;
        }
        if let Some(open) = tree.find('{') {
            let head: Vec<String> = tree[..open].split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let base = [prefix.to_vec(), head].concat();
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&base, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand(&base, &inner[start..], out);
        } else {
            let segments: Vec<String> = tree.split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
            let segments = if segments.last().is_some_and(|s| s == "self") {
                segments[..segments.len() - 1].to_vec()
            } else {
                segments
            };
            out.push([prefix.to_vec(), segments].concat());
        }
    }
    let mut out = Vec::new();
    expand(&[], tree, &mut out);
    out
}

/// The paths a text uses: every expanded `use` item, and the inline paths
/// starting with `crate::`, `super::` or `self::` in code.
fn referenced_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for statement in use_items(code, false) {
        paths.extend(expand_use(&statement));
    }
    // Inline paths: `crate::a::b`, `super::super::x`, in expressions and types.
    let bytes = code.as_bytes();
    for anchor in ["crate::", "super::", "self::"] {
        let mut at = 0;
        while let Some(found) = code[at..].find(anchor) {
            let start = at + found;
            at = start + anchor.len();
            if start > 0
                && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b':')
            {
                continue;
            }
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
            {
                end += 1;
            }
            let segments: Vec<String> =
                code[start..end].split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
            paths.push(segments);
        }
    }
    paths
}

/// The `use` items of code without comments, each as its tree with the
/// spaces and the `as` aliases removed (`a::{b as c}` gives `a::{b}`: the
/// item lives under its own name). With `only_pub`, only re-exports.
fn use_items(code: &str, only_pub: bool) -> Vec<String> {
    let mut statements = Vec::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while let Some(found) = code[at..].find("use ") {
        let start = at + found;
        at = start + 4;
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let prefix = code[..start].trim_end();
        // An item starts after `;`, a brace, an attribute, or a visibility.
        let at_item_start = prefix.is_empty()
            || prefix.ends_with([';', '{', '}', ']'])
            || prefix.ends_with("pub")
            || prefix.ends_with(')') && prefix.rfind("pub(").is_some_and(|p| !prefix[p..].contains(';'));
        if !at_item_start {
            continue;
        }
        if only_pub && !(prefix.ends_with("pub") || prefix.ends_with(')') && prefix.contains("pub(")) {
            continue;
        }
        if let Some(end) = code[at..].find(';') {
            let words: Vec<&str> = code[at..at + end].split_whitespace().collect();
            let mut tree = String::new();
            let mut skip_next = false;
            for word in words {
                if skip_next {
                    // The alias itself, possibly followed by `,` or `}`.
                    tree.extend(word.chars().filter(|c| matches!(c, ',' | '}')));
                    skip_next = false;
                    continue;
                }
                if word == "as" {
                    skip_next = true;
                    continue;
                }
                tree.push_str(word);
            }
            statements.push(tree);
            at += end;
        }
    }
    statements
}

/// The loops of a graph's edges: its strongly connected components of more
/// than one file, each sorted.
pub fn circles(edges: &BTreeSet<(PathBuf, PathBuf)>) -> Vec<Vec<PathBuf>> {
    let mut nodes: BTreeSet<&PathBuf> = BTreeSet::new();
    let mut next: BTreeMap<&PathBuf, Vec<&PathBuf>> = BTreeMap::new();
    for (a, b) in edges {
        nodes.insert(a);
        nodes.insert(b);
        next.entry(a).or_default().push(b);
    }
    // Tarjan's algorithm, iteratively small enough to be recursive here.
    struct State<'a> {
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        on_stack: BTreeSet<&'a PathBuf>,
        stack: Vec<&'a PathBuf>,
        counter: usize,
        components: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(node: &'a PathBuf, next: &BTreeMap<&'a PathBuf, Vec<&'a PathBuf>>, state: &mut State<'a>) {
        state.index.insert(node, state.counter);
        state.low.insert(node, state.counter);
        state.counter += 1;
        state.stack.push(node);
        state.on_stack.insert(node);
        for &target in next.get(node).map(Vec::as_slice).unwrap_or(&[]) {
            if !state.index.contains_key(target) {
                visit(target, next, state);
                let low = state.low[node].min(state.low[target]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(target) {
                let low = state.low[node].min(state.index[target]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(top) = state.stack.pop() {
                state.on_stack.remove(top);
                component.push(top.clone());
                if top == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                state.components.push(component);
            }
        }
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on_stack: BTreeSet::new(),
        stack: Vec::new(),
        counter: 0,
        components: Vec::new(),
    };
    for node in nodes {
        if !state.index.contains_key(node) {
            visit(node, &next, &mut state);
        }
    }
    state.components
}

/// The relative links of a Markdown text (`[text](target)`, no scheme, no
/// pure `#anchor`), with the line each stands on; anchors are cut off.
pub fn relative_links(markdown: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    let mut in_fence = false;
    for (number, line) in markdown.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(close) = after.find(')') else { break };
            let target = after[..close].trim();
            let target = target.split_whitespace().next().unwrap_or("");
            rest = &after[close..];
            if target.is_empty() || target.starts_with('#') || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let path = target.split('#').next().unwrap_or(target);
            links.push((number + 1, path.to_string()));
        }
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(circles: &[Vec<PathBuf>]) -> Vec<Vec<String>> {
        circles.iter().map(|c| c.iter().map(|p| p.to_string_lossy().into_owned()).collect()).collect()
    }

    #[test]
    fn siblings_importing_each_other_are_a_circle() {
        let tree = ModuleTree::from_sources(
            "lib.rs",
            &[
                ("lib.rs", "mod a; mod b;"),
                ("a.rs", "use crate::b::B;\npub struct A;"),
                ("b.rs", "pub struct B;\nfn f() -> crate::a::A { todo!() }"),
            ],
        );
        assert_eq!(names(&circles(&tree.edges())), vec![vec!["a.rs", "b.rs"]]);
    }

    #[test]
    fn a_loop_through_a_reexport_and_a_brace_group_is_found() {
        let tree = ModuleTree::from_sources(
            "lib.rs",
            &[
                ("lib.rs", "mod store; mod rpc;\npub use store::Registry;"),
                ("store/mod.rs", "mod registry;\npub use registry::Registry;"),
                ("store/registry.rs", "use crate::rpc::{convert::{self, Wire as W}, Other};\npub struct Registry;"),
                ("rpc/mod.rs", "pub mod convert;\npub struct Other;"),
                ("rpc/convert.rs", "use crate::Registry;\npub struct Wire;"),
            ],
        );
        let found = names(&circles(&tree.edges()));
        assert_eq!(found, vec![vec!["rpc/convert.rs", "store/registry.rs"]]);
    }

    #[test]
    fn a_child_using_its_parent_and_test_modules_are_not_circles() {
        let tree = ModuleTree::from_sources(
            "lib.rs",
            &[
                ("lib.rs", "mod store;"),
                ("store/mod.rs", "mod block;\npub use block::Block;\npub struct Limits;"),
                ("store/block.rs", "use super::Limits;\npub struct Block;"),
                ("other.rs", "pub fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::store::Block;\n}\n"),
                ("store/deep.rs", "// crate::other::f is only named in a comment\npub fn g() {}"),
            ],
        );
        assert!(circles(&tree.edges()).is_empty(), "{:?}", tree.edges());
    }

    #[test]
    fn super_of_a_file_is_its_folder() {
        let tree = ModuleTree::from_sources(
            "lib.rs",
            &[
                ("lib.rs", "mod store;"),
                ("store/mod.rs", "mod a; mod b;"),
                ("store/a.rs", "use super::b::thing;"),
                ("store/b.rs", "pub fn thing() { super::a::other() }"),
            ],
        );
        assert_eq!(names(&circles(&tree.edges())), vec![vec!["store/a.rs", "store/b.rs"]]);
    }

    #[test]
    fn relative_links_skip_urls_anchors_and_code() {
        let text =
            "See [docs](docs/a.md#x) and [web](https://x.org) [top](#top).\n```\n[no](nope.md)\n```\n[b](../b.md)";
        assert_eq!(relative_links(text), vec![(1, "docs/a.md".to_string()), (5, "../b.md".to_string())]);
    }
}
