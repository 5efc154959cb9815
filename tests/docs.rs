//! The documentation cannot go stale: the configuration reference is generated from the CRD
//! schema and compared here, and the operations guide names every metric the operator exports.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn doc(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fields whose type is a Kubernetes core type: documented as one row, not field by field.
const OPAQUE: &[&str] = &["spec.network.resourceQuota", "spec.network.limitRange"];

/// One row per field: (path, type, required, default, description).
fn rows(schema: &Value, path: &str, required: bool, out: &mut Vec<[String; 5]>) {
    let opaque = OPAQUE.contains(&path);
    if !path.is_empty() && path.contains('.') {
        out.push([
            format!("`{path}`"),
            type_of(schema, opaque),
            if required {
                "yes".into()
            } else {
                String::new()
            },
            schema
                .get("default")
                .map(|d| format!("`{d}`"))
                .unwrap_or_default(),
            cell(
                schema
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            ),
        ]);
    }
    if opaque {
        return;
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        let req: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (name, s) in props {
            rows(
                s,
                &format!("{path}.{name}"),
                req.contains(&name.as_str()),
                out,
            );
        }
    }
    if let Some(items) = schema
        .get("items")
        .filter(|i| i.get("properties").is_some())
    {
        rows(items, &format!("{path}[]"), false, out);
    }
}

fn type_of(s: &Value, opaque: bool) -> String {
    if opaque {
        let name = s
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = if name.contains("LimitRange") {
            "LimitRangeSpec"
        } else {
            "ResourceQuotaSpec"
        };
        return format!("object (Kubernetes `{kind}`)");
    }
    let base = match s.get("type").and_then(Value::as_str) {
        Some("array") => {
            let item = s
                .get("items")
                .and_then(|i| i.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("object");
            format!("[]{item}")
        }
        Some("object") if s.get("additionalProperties").is_some() => "map[string]string".to_owned(),
        Some(t) => t.to_owned(),
        None if s.get("x-kubernetes-int-or-string").is_some() => "int or string".to_owned(),
        None => "any".to_owned(),
    };
    let mut extra = Vec::new();
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        extra.push(
            e.iter()
                .filter_map(Value::as_str)
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let bound = |lo: &str, hi: &str, unit: &str| match (s.get(lo), s.get(hi)) {
        (Some(a), Some(b)) => Some(format!("{a}–{b}{unit}")),
        (Some(a), None) => Some(format!("≥ {a}{unit}")),
        (None, Some(b)) => Some(format!("≤ {b}{unit}")),
        (None, None) => None,
    };
    extra.extend(bound("minLength", "maxLength", " chars"));
    extra.extend(bound("minItems", "maxItems", " items"));
    extra.extend(bound("minimum", "maximum", ""));
    if let Some(p) = s.get("pattern").and_then(Value::as_str) {
        extra.push(format!("pattern `{p}`"));
    }
    if let Some(rules) = s.get("x-kubernetes-validations").and_then(Value::as_array) {
        extra.extend(
            rules
                .iter()
                .filter_map(|r| r.get("message").and_then(Value::as_str))
                .map(str::to_owned),
        );
    }
    if extra.is_empty() {
        base
    } else {
        cell(&format!("{base}; {}", extra.join("; ")))
    }
}

/// Text safe inside one Markdown table cell.
fn cell(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn table(kind: &str, part: &str) -> String {
    let crd = bulkhead::api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("crd");
    let v = serde_json::to_value(&crd).expect("crd json");
    let schema = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][part];
    let mut out = Vec::new();
    rows(schema, part, false, &mut out);
    let mut text = String::from(
        "| Field | Type | Required | Default | Description |\n|---|---|---|---|---|\n",
    );
    for r in out {
        text.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    text
}

const BLOCKS: [(&str, &str); 4] = [
    ("IsolationPlatform", "spec"),
    ("IsolationPlatform", "status"),
    ("Organization", "spec"),
    ("Organization", "status"),
];

fn markers(kind: &str, part: &str) -> (String, String) {
    (
        format!(
            "<!-- BEGIN GENERATED {kind} {part}: BULKHEAD_BLESS=1 cargo test --test docs -->\n"
        ),
        format!("<!-- END GENERATED {kind} {part} -->"),
    )
}

/// The document with every generated block replaced by what the CRD schema says now.
fn regenerated(text: &str) -> String {
    let mut text = text.to_owned();
    for (kind, part) in BLOCKS {
        let (begin, end) = markers(kind, part);
        let start = text
            .find(&begin)
            .unwrap_or_else(|| panic!("docs/configuration.md lacks the marker {begin:?}"))
            + begin.len();
        let stop = start
            + text[start..]
                .find(&end)
                .unwrap_or_else(|| panic!("docs/configuration.md lacks the marker {end:?}"));
        text.replace_range(start..stop, &table(kind, part));
    }
    text
}

#[test]
fn configuration_reference_is_the_crd_schema() {
    let path = doc("configuration.md");
    let text = read(&path);
    let want = regenerated(&text);
    if text != want {
        if std::env::var_os("BULKHEAD_BLESS").is_some() {
            std::fs::write(&path, want).expect("write docs/configuration.md");
            return;
        }
        panic!(
            "docs/configuration.md does not match the CRD schema: run `BULKHEAD_BLESS=1 cargo test --test docs`"
        );
    }
}

#[test]
fn configuration_reference_names_every_field() {
    // Independent of the generator: walk the schema again and look for each path.
    fn paths(s: &Value, path: &str, out: &mut Vec<String>) {
        out.push(path.to_owned());
        if OPAQUE.contains(&path) {
            return;
        }
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                paths(v, &format!("{path}.{k}"), out);
            }
        }
        if let Some(items) = s.get("items") {
            paths(items, &format!("{path}[]"), out);
        }
    }
    let text = read(&doc("configuration.md"));
    let mut missing = Vec::new();
    for crd in bulkhead::api::crds() {
        let v = serde_json::to_value(&crd).expect("crd json");
        for part in ["spec", "status"] {
            let mut all = Vec::new();
            paths(
                &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][part],
                part,
                &mut all,
            );
            // Arrays of scalars have no row of their own for their items.
            let scalar_items = |p: &String| p.ends_with("[]");
            missing.extend(
                all.iter()
                    .filter(|p| p.contains('.') && !scalar_items(p))
                    .filter(|p| !text.contains(&format!("`{p}`")))
                    .map(|p| format!("{}: {p}", crd.spec.names.kind)),
            );
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document: {missing:?}"
    );
}

#[test]
fn operations_guide_names_every_metric() {
    let text = read(&doc("operations.md"));
    use bulkhead::telemetry::{KindLabel, LayerLabels, Metrics, ProbeLabels};
    // Families without a sample are not exported: give each one.
    let m = Metrics::default();
    drop(m.reconcile_timer("organization"));
    m.failure("organization", "KubernetesError");
    m.probes
        .get_or_create(&ProbeLabels {
            layer: "database".into(),
            result: "passed".into(),
        })
        .inc();
    m.repairs
        .get_or_create(&LayerLabels {
            layer: "database".into(),
        })
        .inc();
    m.status_patches
        .get_or_create(&KindLabel {
            kind: "organization".into(),
        })
        .inc();
    let exported = m.encode();
    let mut names: Vec<String> = Vec::new();
    for line in exported.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.push(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            });
        }
    }
    assert!(
        names.len() >= 8,
        "the metrics registry exported only {names:?}"
    );
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !text.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not describe {missing:?}"
    );
}

#[test]
fn docs_link_only_to_files_that_exist() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for name in [
        "concepts.md",
        "configuration.md",
        "security-model.md",
        "operations.md",
        "migration.md",
        "database.md",
        "storage.md",
        "cache.md",
        "network.md",
    ] {
        // Inline code (a regex, say) is not a link.
        let text: String = read(&dir.join(name))
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, part)| part)
            .collect::<Vec<_>>()
            .join(" ");
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            assert!(
                dir.join(target).exists(),
                "{name} links to {target}, which does not exist"
            );
        }
    }
}
