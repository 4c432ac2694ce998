//! The committed CRD is exactly what `chronflow crd` prints, and every sample ChronTask reads as
//! one. (Admission of the samples by a real apiserver is tested in tests/cluster.)

use std::process::Command;

use chronflow::ChronTask;

#[test]
fn committed_crd_matches_generated() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/chronflow.io_chrontasks.yaml"
    ))
    .expect("crds/chronflow.io_chrontasks.yaml exists");
    let printed = Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .arg("crd")
        .output()
        .expect("chronflow crd runs");
    assert!(printed.status.success());
    assert!(
        committed == String::from_utf8_lossy(&printed.stdout),
        "crds/chronflow.io_chrontasks.yaml is stale: run `cargo run -- crd > crds/chronflow.io_chrontasks.yaml`"
    );
    assert_eq!(committed, chronflow::crd::crd_yaml().unwrap());
}

#[test]
fn crd_names_columns_and_selectable_fields() {
    let crd = chronflow::crd::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some(chronflow::crd::CRD_NAME));
    assert_eq!(crd.spec.names.short_names, Some(vec!["ct".to_string()]));
    assert_eq!(
        crd.spec.names.categories,
        Some(vec!["chronflow".to_string()])
    );
    let version = &crd.spec.versions[0];
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Schedule", "Paused", "Phase", "Last Run", "Next Run", "Runs", "Success", "Age"
        ]
    );
    let selectable: Vec<_> = version
        .selectable_fields
        .iter()
        .flatten()
        .map(|f| f.json_path.as_str())
        .collect();
    assert_eq!(selectable, [".status.phase", ".spec.paused"]);
    assert!(version.subresources.as_ref().unwrap().status.is_some());
}

#[test]
fn every_sample_reads_as_a_chrontask() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/samples");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let task: ChronTask = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not a ChronTask: {e}", path.display()));
        assert!(
            task.metadata.name.is_some(),
            "{} has a name",
            path.display()
        );
        count += 1;
    }
    assert!(count >= 5, "expected at least 5 samples, found {count}");
}

#[test]
fn reserved_header_rule_lists_every_reserved_header() {
    let crd = serde_json::to_value(chronflow::crd::crd()).unwrap();
    let name = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["action"]["properties"]["http"]["properties"]["headers"]["items"]["properties"]["name"];
    let rules = name["x-kubernetes-validations"]
        .as_array()
        .unwrap_or_else(|| panic!("no CEL rule on header names: {name}"));
    let rule = rules
        .iter()
        .filter_map(|rule| rule["rule"].as_str())
        .find(|rule| rule.contains("lowerAscii()"))
        .expect("a rule comparing the lower-cased name");
    for reserved in chronflow::executor::http::RESERVED_HEADERS {
        let quoted = format!("'{}'", reserved.to_ascii_lowercase());
        assert!(rule.contains(&quoted), "{rule} lacks {quoted}");
    }
    let listed = rule.matches('\'').count() / 2;
    assert_eq!(
        listed,
        chronflow::executor::http::RESERVED_HEADERS.len(),
        "{rule}"
    );
}

#[test]
fn a_failed_write_to_stdout_exits_1() {
    let full = std::fs::File::create("/dev/full").expect("/dev/full exists on Linux");
    let output = Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .arg("crd")
        .stdout(full)
        .output()
        .expect("chronflow crd runs");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "chronflow: cannot write stdout: No space left on device (os error 28)\n"
    );
}
