//! The house stays one-way: every module of `src/` sits on one floor (values, policy,
//! backends, layers), imports only from its own floor and the floors below, and no two
//! modules import each other, directly or through others. Read from the sources, so that a
//! new `use` that runs upward fails here before any reviewer sees it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The floors, bottom first, and what stands on each (a top-level module, or one file of
/// `ratelimit`, which holds both the limiter stores and the layer).
const FLOORS: &[(&str, &[&str])] = &[
    (
        "values",
        &[
            "answer", "clock", "error", "head", "key", "passage", "quota", "record",
        ],
    ),
    ("policy", &["bypass", "extract", "reject", "validate"]),
    (
        "backends",
        &[
            "lookup",
            "store",
            "ratelimit/decision",
            "ratelimit/gcra",
            "ratelimit/headers",
            "ratelimit/memory",
            "ratelimit/redis",
            "ratelimit/store",
        ],
    ),
    (
        "layers",
        &[
            "flow",
            "auth",
            "ratelimit",
            "ratelimit/key_fn",
            "ratelimit/layer",
            "ratelimit/service",
            "ratelimit/shared",
            "ratelimit/future",
            "keygate",
            "axum",
        ],
    ),
    ("service", &["service"]),
];

fn floor_of(unit: &str) -> Option<usize> {
    FLOORS.iter().position(|(_, units)| units.contains(&unit))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The unit a file belongs to: its top-level module, or `ratelimit/<file>`.
fn unit_of(relative: &Path) -> Option<String> {
    let parts: Vec<String> = relative
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned()
        })
        .collect();
    match parts.as_slice() {
        [only] if only == "lib" => None,
        [only] => Some(only.clone()),
        [dir, file] if dir == "ratelimit" && file != "mod" && file != "tests" => {
            Some(format!("ratelimit/{file}"))
        }
        [dir, ..] => Some(dir.clone()),
        [] => None,
    }
}

/// The code of a file without comments and without its test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The units a file's code names: `crate::x` (and `crate::ratelimit::y`), and for files of
/// `ratelimit`, `super::y`.
fn imports(unit: &str, code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |rest: &str| -> String {
        rest.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let name = ident(&code[at + 7..]);
        if name == "ratelimit" {
            let after = &code[at + 7 + name.len()..];
            let sub = after.strip_prefix("::").map(ident).unwrap_or_default();
            let file = format!("ratelimit/{sub}");
            found.insert(if floor_of(&file).is_some() {
                file
            } else {
                name
            });
        } else if !name.is_empty() {
            found.insert(name);
        }
    }
    if unit.starts_with("ratelimit") {
        for (at, _) in code.match_indices("super::") {
            let name = ident(&code[at + 7..]);
            let file = format!("ratelimit/{name}");
            if floor_of(&file).is_some() {
                found.insert(file);
            } else {
                found.insert("ratelimit".to_owned());
            }
        }
    }
    found.remove(unit);
    found
}

#[test]
fn every_import_runs_down_or_across_and_no_module_imports_itself_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&root).expect("under src");
        let Some(unit) = unit_of(relative) else {
            continue;
        };
        if relative.ends_with("tests.rs") {
            continue;
        }
        let floor = floor_of(&unit).unwrap_or_else(|| {
            panic!(
                "{} is on no floor: add `{unit}` to FLOORS",
                relative.display()
            )
        });
        let text = std::fs::read_to_string(file).expect("read");
        let uses = imports(&unit, &code(&text));
        for used in &uses {
            let Some(used_floor) = floor_of(used) else {
                continue;
            };
            if used_floor > floor {
                upward.push(format!(
                    "{} ({}) imports {used} ({})",
                    relative.display(),
                    FLOORS[floor].0,
                    FLOORS[used_floor].0
                ));
            }
        }
        // Units, for the cycle check: files of ratelimit count one by one, so that three
        // of them importing each other in a ring are caught too.
        let entry = graph.entry(unit.clone()).or_default();
        for used in uses {
            if used != unit && floor_of(&used).is_some() {
                entry.insert(used);
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that run upward:\n{}",
        upward.join("\n")
    );

    // No cycle: a depth-first walk never meets a module on its own path.
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(at) = path.iter().position(|m| m == module) {
            panic!(
                "modules import each other: {} -> {module}",
                path[at..].join(" -> ")
            );
        }
        if done.contains(module) {
            return;
        }
        path.push(module.to_owned());
        for next in graph.get(module).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(module.to_owned());
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done);
    }
    // The check sees the imports it is meant to see.
    assert!(graph["auth"].contains("lookup"), "{graph:?}");
    assert!(graph["keygate"].contains("auth"), "{graph:?}");
}
