//! The house rule that keeps the data flow readable: no module of the crate depends,
//! directly or through others, on a module that depends on it. Read from the source:
//! every `crate::NAME` a module mentions outside its tests is an edge to `NAME`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module and the top-level modules it mentions.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap();
        let module = rel.iter().next().unwrap().to_str().unwrap();
        let module = module.strip_suffix(".rs").unwrap_or(module).to_owned();
        if ["lib", "main", "module_graph"].contains(&module.as_str())
            || rel.file_name().is_some_and(|f| f == "tests.rs")
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Test modules sit at the end of a file and may use anything.
        let code = text.split("\n#[cfg(test)]\nmod ").next().unwrap();
        // Comments (and so doc links) are not dependencies.
        let code: String = code
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let uses = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                uses.insert(name);
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one; `done` holds modules already known to lead
/// back to it by no path.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in graph.get(path.last()?)? {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(next.clone());
            return Some(cycle);
        }
        if done.insert(next.clone()) {
            path.push(next.clone());
            if let Some(c) = cycle_from(graph, start, path, done) {
                return Some(c);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn no_module_depends_on_itself_through_others() {
    let graph = graph();
    assert!(graph.contains_key("serve") && graph["serve"].contains("admit"));
    for module in graph.keys() {
        let mut done = BTreeSet::new();
        if let Some(cycle) = cycle_from(&graph, module, &mut vec![module.clone()], &mut done) {
            panic!("import circle: {}", cycle.join(" → "));
        }
    }
}
