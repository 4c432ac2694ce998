//! The run path's core never names `kube` or `k8s-openapi`: standalone mode and embedders use
//! it without a cluster (docs/architecture.md).

use std::path::Path;

const CORE: &[&str] = &[
    "src/schedule",
    "src/engine",
    "src/executor",
    "src/ledger",
    "src/run.rs",
    "src/policy.rs",
    "src/clock.rs",
    "src/core.rs",
];

fn rust_files(path: &Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("a readable directory") {
            rust_files(&entry.expect("an entry").path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn the_core_does_not_depend_on_kube() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for part in CORE {
        rust_files(&root.join(part), &mut files);
    }
    assert!(files.len() >= 10, "found only {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a readable file");
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            let names_kube = code
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|word| word == "kube" || word == "k8s_openapi" || word == "kube_runtime");
            // Nor does it reach into the crate's kube side.
            let kube_side = [
                "crd",
                "controller",
                "leader",
                "operator",
                "status",
                "server",
            ]
            .iter()
            .any(|module| code.contains(&format!("crate::{module}")));
            assert!(
                !kube_side,
                "{}:{}: the kube-free core uses a kube-side module: {line}",
                file.display(),
                number + 1
            );
            assert!(
                !names_kube,
                "{}:{}: the kube-free core names kube: {line}",
                file.display(),
                number + 1
            );
        }
    }
}
