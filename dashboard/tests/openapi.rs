//! The OpenAPI document describes every route of the router, and nothing that does not exist.

use serde_json::Value;

#[test]
fn every_route_is_documented() {
    let doc: Value =
        serde_json::from_str(em_dashboard::OPENAPI_JSON).expect("openapi.json is JSON");
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    let paths = doc["paths"].as_object().expect("paths");
    let routes = em_dashboard::api_routes();
    assert!(routes.len() > 20);
    for (path, method) in &routes {
        let m = method.as_str().to_ascii_lowercase();
        assert!(
            paths.get(*path).and_then(|p| p.get(&m)).is_some(),
            "{} {path} is not in openapi.json",
            method
        );
    }
    // And the document lists no route the router lacks.
    for (path, item) in paths {
        for m in item.as_object().expect("path item").keys() {
            assert!(
                routes
                    .iter()
                    .any(|(p, rm)| p == path && rm.as_str().eq_ignore_ascii_case(m)),
                "openapi.json documents {m} {path}, which the router does not serve"
            );
        }
    }
}

#[test]
fn schema_references_resolve() {
    let text = em_dashboard::OPENAPI_JSON;
    let doc: Value = serde_json::from_str(text).expect("JSON");
    let mut refs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let pointer = r.trim_start_matches('#');
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}
