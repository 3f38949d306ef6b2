//! docs/openapi.json stays in step with the real routes, error codes and wire types, and
//! docs/protocol.md's sample verifier with what the appliance signs.

use std::collections::BTreeSet;

use keygate_sdk::wire::*;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::helpers::*;

fn document() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("openapi.json is JSON")
}

#[test]
fn the_documented_routes_are_the_served_routes() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .filter(|(method, _)| ["get", "post", "put", "delete", "patch"].contains(&method.as_str()))
        .collect();
    let served: BTreeSet<(String, String)> = keygate::protocol::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);

    // And each listed route is really there (an empty body is refused by the handler, not
    // unknown to the router).
    let f = Fixture::new(&item("reader", "per_device", 1, ""));
    for (method, path) in keygate::protocol::ROUTES {
        let status = match *method {
            "get" => get_json(&f.app.agent, &f.app.url(path)).0,
            _ => post_json(&f.app.agent, &f.app.url(path), &json!({})).0,
        };
        assert!(status == 200 || status == 400, "{method} {path}: {status}");
    }
}

#[test]
fn the_documented_error_codes_are_the_codes() {
    let doc = document();
    let documented: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(documented, codes);
}

/// Every free-text field's pattern takes what the appliance takes and refuses what it
/// refuses (`types::label`: control and bidirectional formatting characters), and the usage
/// answer's list of renewal errors names the codes its description names.
#[test]
fn the_documented_text_patterns_and_renewal_codes_are_the_appliances() {
    let doc = document();
    let mut patterns = Vec::new();
    let mut walk = vec![&doc];
    while let Some(value) = walk.pop() {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(p)) = map.get("pattern")
                    && p.contains("\\u0000")
                {
                    patterns.push(p.clone());
                }
                walk.extend(map.values());
            }
            Value::Array(list) => walk.extend(list),
            _ => {}
        }
    }
    assert_eq!(patterns.len(), 7, "the free-text fields");
    let chars = ('\u{0}'..='\u{2100}').chain(['\u{1F600}', '\u{FEFF}']);
    for pattern in &patterns {
        let re = regex_lite::Regex::new(pattern).unwrap();
        for c in chars.clone() {
            let text = format!("a{c}b");
            let taken = keygate::licensing::types::label("field", Some(&text), 999).is_ok();
            assert_eq!(re.is_match(&text), taken, "{pattern} on U+{:04X}", c as u32);
        }
    }

    let ok = &doc["paths"]["/api/v1/usage"]["post"]["responses"]["200"];
    let listed: BTreeSet<&str> = ok["x-renewal-error-codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let described: BTreeSet<&str> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| ok["description"].as_str().unwrap().contains(c))
        .collect();
    assert_eq!(listed, described);
}

/// The property names a serialized value has, with every optional field present.
fn keys(value: impl serde::Serialize) -> BTreeSet<String> {
    serde_json::to_value(value)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn the_documented_bodies_have_the_wire_types_fields() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    let documented = |name: &str| -> BTreeSet<String> {
        schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}"))
            .keys()
            .cloned()
            .collect()
    };
    let t = OffsetDateTime::UNIX_EPOCH;
    let s = || "x".to_string();
    let detail = ErrorDetail {
        code: ErrorCode::Internal,
        message: s(),
    };
    let cases: Vec<(&str, BTreeSet<String>)> = vec![
        (
            "AuthorizeRequest",
            keys(AuthorizeRequest {
                organization_id: Some(s()),
                handshake_code: Some(s()),
                session_password: Some(s()),
                product: s(),
                device: DeviceInfo::default(),
                validation: Some(Validation::default()),
                nonce: s(),
            }),
        ),
        (
            "DeviceInfo",
            keys(DeviceInfo {
                uuid: s(),
                instance: Some(s()),
                user: Some(s()),
                name: Some(s()),
            }),
        ),
        (
            "Validation",
            keys(Validation {
                domain: Some(s()),
                process: Some(s()),
            }),
        ),
        (
            "AuthorizeResponse",
            keys(AuthorizeResponse {
                authorization: s(),
                license: s(),
                refresh_after_s: 1,
            }),
        ),
        (
            "UsageRequest",
            keys(UsageRequest {
                lease_id: s(),
                device_uuid: s(),
                stream: s(),
                reports: vec![],
            }),
        ),
        (
            "UsageReport",
            keys(UsageReport {
                seq: 1,
                item_id: s(),
                from: t,
                to: t,
                counters: Default::default(),
            }),
        ),
        (
            "UsageResponse",
            keys(UsageResponse {
                accepted: 0,
                duplicates: 0,
                acked_seq: 0,
                authorization: Some(s()),
                renewal_error: Some(detail.clone()),
            }),
        ),
        (
            "ReleaseRequest",
            keys(ReleaseRequest {
                lease_id: s(),
                device_uuid: s(),
            }),
        ),
        ("ReleaseResponse", keys(ReleaseResponse { released: true })),
        (
            "ApplianceInfo",
            keys(ApplianceInfo {
                installation_id: s(),
                public_key: s(),
                version: s(),
                time: t,
            }),
        ),
        ("ErrorDetail", keys(detail.clone())),
        (
            "Authorization",
            keys(Authorization {
                v: 1,
                lease_id: s(),
                installation_id: s(),
                organization_id: s(),
                handshake_code: s(),
                product: s(),
                device_uuid: s(),
                instance: Some(s()),
                user: Some(s()),
                items: vec![],
                issued_at: t,
                expires_at: t,
                nonce: s(),
                state: AuthorizationState::Ok,
            }),
        ),
    ];
    for (name, fields) in cases {
        assert_eq!(documented(name), fields, "{name}");
    }
}

/// docs/protocol.md's Python verifier (jwcrypto) accepts what the appliance answers, and
/// refuses an authorization the appliance key signed past the license's terms (rule 4),
/// as the SDK does.
#[test]
fn the_documented_python_verifier_checks_the_whole_chain() {
    let f =
        Fixture::new(&item("reader", "per_device", 10, "")).restart_at(OffsetDateTime::now_utc());
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/protocol.md"),
    )
    .unwrap();
    let sample = doc
        .split("the whole of rules 1 to 4:\n\n```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the sample in docs/protocol.md");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("check.py");
    std::fs::write(
        &script,
        format!(
            "{sample}\nimport sys\n\
             check(json.load(open(sys.argv[1])), open(sys.argv[2], 'rb').read(), sys.argv[3], sys.argv[4])\n"
        ),
    )
    .unwrap();
    let (status, answer) = f.authorize(&f.request("reader", 1));
    assert_eq!(status, 200, "{answer}");
    let run = |answer: &Value, n: u32| {
        let path = dir.path().join("answer.json");
        std::fs::write(&path, answer.to_string()).unwrap();
        let out = std::process::Command::new(python())
            .arg(&script)
            .arg(&path)
            .arg(f.vendor.pub_path())
            // The device's UUID as it may hold it (any form), not as the appliance writes it.
            .arg(format!("{{{}}}", device_uuid(n).to_uppercase()))
            .arg(NONCE)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stderr) = run(&answer, 1);
    assert!(ok, "{stderr}");
    // The same answer with the authorization stretched past the item's 7 offline days, signed
    // by the appliance's own key (which sits on the customer's machine).
    let payload = f.verify(&answer, 1);
    let mut stretched = serde_json::to_value(&payload).unwrap();
    let later = payload.issued_at + time::Duration::days(30);
    stretched["expires_at"] = json!(keygate::licensing::rfc3339(later));
    let mut forged = answer.clone();
    forged["authorization"] = json!(
        f.app
            .state
            .appliance
            .sign(keygate_sdk::jws::Typ::Authorization, &stretched)
    );
    let (ok, stderr) = run(&forged, 1);
    assert!(!ok && stderr.contains("AssertionError"), "{stderr}");
    // A public trial's answer (no item, no organization: a device never seen) verifies too.
    assert!(keygate(&f.data, &["trial", "on"]).ok);
    let (status, trial) = f.authorize(&json!({
        "product": "reader",
        "device": {"uuid": device_uuid(2)},
        "nonce": NONCE,
    }));
    assert_eq!(status, 200, "{trial}");
    let (ok, stderr) = run(&trial, 2);
    assert!(ok, "{stderr}");
}
