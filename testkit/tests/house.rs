//! The shape of the repository, checked by the test command: no two source
//! files of a crate import each other (directly or around a loop), no
//! hand-written source file grows past 700 lines, the README stays a front
//! door, and every relative link of the README and `docs/` leads somewhere.

use std::path::{Path, PathBuf};

use ps_testkit::house::{ModuleTree, circles, relative_links};

/// The repository root (this crate sits one level below it).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit is inside the repository").to_path_buf()
}

/// Every crate source tree the rule covers, with its root file.
const TREES: &[(&str, &str)] = &[
    ("proto/src", "lib.rs"),
    ("client/src", "lib.rs"),
    ("server/src", "lib.rs"),
    ("server/src", "main.rs"),
    ("worker/src", "lib.rs"),
    ("worker/src", "main.rs"),
    ("ctl/src", "main.rs"),
    ("testkit/src", "lib.rs"),
];

#[test]
fn no_file_level_import_circles() {
    let mut found = Vec::new();
    for (src, root) in TREES {
        let tree = ModuleTree::read(&repo().join(src), root).expect("read sources");
        for circle in circles(&tree.edges()) {
            let files: Vec<String> = circle.iter().map(|p| format!("{src}/{}", p.display())).collect();
            found.push(files.join(" <-> "));
        }
    }
    assert!(found.is_empty(), "files that import each other around a loop:\n  {}", found.join("\n  "));
}

/// Hand-written Rust sources (tests and generated code aside) stay readable in one sitting.
const MAX_SOURCE_LINES: usize = 700;

#[test]
fn no_source_file_over_the_line_limit() {
    let mut long = Vec::new();
    for (src, _) in TREES {
        for file in rust_files(&repo().join(src)) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "tests.rs" || file.components().any(|c| c.as_os_str() == "tests") {
                continue;
            }
            let lines = std::fs::read_to_string(&file).expect("read source").lines().count();
            if lines > MAX_SOURCE_LINES {
                long.push(format!("{} ({lines} lines)", file.strip_prefix(repo()).unwrap_or(&file).display()));
            }
        }
    }
    long.sort();
    long.dedup();
    assert!(long.is_empty(), "source files over {MAX_SOURCE_LINES} lines:\n  {}", long.join("\n  "));
}

/// The README is the front door: what it is, the two commands, where to read on.
const MAX_README_LINES: usize = 350;

#[test]
fn the_readme_is_a_front_door() {
    let lines = std::fs::read_to_string(repo().join("README.md")).expect("README.md").lines().count();
    assert!(lines <= MAX_README_LINES, "README.md has {lines} lines; move reference and results into docs/");
}

#[test]
fn every_relative_link_resolves() {
    let mut pages = vec![repo().join("README.md"), repo().join("CONTRIBUTING.md")];
    pages.extend(markdown_files(&repo().join("docs")));
    pages.extend(markdown_files(&repo().join("client/python")));
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        for (line, target) in relative_links(&text) {
            checked += 1;
            let resolved = page.parent().expect("a page is in a folder").join(&target);
            if !resolved.exists() {
                broken.push(format!("{}:{line}: {target}", page.strip_prefix(repo()).unwrap_or(page).display()));
            }
        }
    }
    assert!(checked > 0, "no relative link found: the link reader is broken");
    assert!(broken.is_empty(), "links that lead nowhere:\n  {}", broken.join("\n  "));
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    files_with(dir, "rs")
}

fn markdown_files(dir: &Path) -> Vec<PathBuf> {
    files_with(dir, "md")
}

fn files_with(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().and_then(|e| e.to_str()) == Some(extension) {
                found.push(path);
            }
        }
    }
    found
}
