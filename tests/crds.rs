//! The committed CRD YAML is exactly what the Rust types generate, and documents every field.

use std::path::Path;

fn committed(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn crds_dir_matches_the_types() {
    let generated = bulkhead::api::crds_yaml().expect("render");
    assert!(
        committed("crds/bulkhead.dev.yaml") == generated,
        "crds/bulkhead.dev.yaml is stale: run `make crds` (cargo run -- crd > crds/bulkhead.dev.yaml)"
    );
}

fn undocumented(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (k, v) in props {
            let p = format!("{path}.{k}");
            if v.get("description")
                .and_then(|d| d.as_str())
                .is_none_or(str::is_empty)
            {
                out.push(p.clone());
            }
            undocumented(v, &p, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(items, &format!("{path}[]"), out);
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        undocumented(extra, &format!("{path}{{}}"), out);
    }
}

#[test]
fn every_field_has_a_description() {
    for crd in bulkhead::api::crds() {
        let v = serde_json::to_value(&crd).unwrap();
        let schema = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        undocumented(&schema["properties"]["spec"], "spec", &mut missing);
        undocumented(&schema["properties"]["status"], "status", &mut missing);
        assert!(
            missing.is_empty(),
            "{}: fields without description: {missing:?}",
            crd.spec.names.kind
        );
    }
}

#[test]
fn printer_columns_show_org_id_ready_verified_and_age() {
    let org = bulkhead::api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "Organization")
        .unwrap();
    let cols: Vec<String> = org.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    for want in ["OrgID", "Ready", "Verified", "Age"] {
        assert!(
            cols.iter().any(|c| c == want),
            "missing column {want}: {cols:?}"
        );
    }
}
