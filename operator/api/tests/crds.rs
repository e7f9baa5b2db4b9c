//! The generated CRDs: what `kubectl` and the API server rely on is in them, and the
//! checked-in `crds/*.yaml` are what the generator writes now.

#![allow(clippy::unwrap_used, reason = "test helpers panic on broken fixtures")]

use blockgate_operator_api::crd::{crds, render};
use blockgate_operator_api::gateway::{AttachedVolume, SpaceUsage, UploadStatus, VolumeMode};
use blockgate_operator_api::{Gateway, GatewaySpec, GatewayStatus};
use kube::core::cel::Validator;
use serde_json::{Value, json};

fn crd_json(file: &str) -> Value {
    let (_, crd) = crds().into_iter().find(|(f, _)| *f == file).unwrap();
    serde_json::to_value(crd).unwrap()
}

fn version(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]
}

fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(value, |v, key| &v[*key])
}

#[test]
fn checked_in_crds_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    for (file, yaml) in render().unwrap() {
        let on_disk = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            on_disk == yaml,
            "crds/{file} is stale: run `cargo run -p blockgate-operator-api --bin crdgen`"
        );
    }
}

#[test]
fn rendering_is_deterministic() {
    assert_eq!(render().unwrap(), render().unwrap());
}

#[test]
fn names_scope_and_subresources() {
    for (file, kind, plural, short) in [
        (
            "storagegateway.yaml",
            "StorageGateway",
            "storagegateways",
            "sgw",
        ),
        ("gateway.yaml", "Gateway", "gateways", "bgw"),
    ] {
        let crd = crd_json(file);
        assert_eq!(crd["metadata"]["name"], format!("{plural}.blockgate.io"));
        assert_eq!(crd["spec"]["group"], "blockgate.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["kind"], kind);
        assert_eq!(crd["spec"]["names"]["shortNames"], json!([short]));
        assert_eq!(crd["spec"]["names"]["categories"], json!(["blockgate"]));
        let version = version(&crd);
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(version["served"], true);
        assert_eq!(version["storage"], true);
        assert_eq!(version["subresources"]["status"], json!({}), "{file}");
    }
}

#[test]
fn conditions_are_list_maps_keyed_by_type() {
    for file in ["storagegateway.yaml", "gateway.yaml"] {
        let crd = crd_json(file);
        let schema = &version(&crd)["schema"]["openAPIV3Schema"];
        let conditions = at(
            schema,
            &["properties", "status", "properties", "conditions"],
        );
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{file}");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
        let required = conditions["items"]["required"].as_array().unwrap();
        for field in ["type", "status", "lastTransitionTime", "reason", "message"] {
            assert!(required.contains(&json!(field)), "{file}: {field} required");
        }
        assert!(conditions["items"]["properties"]["observedGeneration"].is_object());
    }
    let crd = crd_json("gateway.yaml");
    let status = at(
        &version(&crd)["schema"]["openAPIV3Schema"],
        &["properties", "status", "properties"],
    );
    assert_eq!(
        status["volumes"]["x-kubernetes-list-map-keys"],
        json!(["volumeId"])
    );
    assert_eq!(
        status["findings"]["x-kubernetes-list-map-keys"],
        json!(["analyzer"])
    );
}

#[test]
fn printer_columns_make_kubectl_get_useful() {
    let columns = |file: &str| -> Vec<(String, String)> {
        version(&crd_json(file))["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["jsonPath"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let fleet = columns("storagegateway.yaml");
    for (name, path) in [
        ("Version", ".spec.version"),
        ("Ready", ".status.readyGateways"),
        ("Up-To-Date", ".status.updatedGateways"),
        ("Rollout", ".status.rollout.phase"),
        ("Age", ".metadata.creationTimestamp"),
    ] {
        assert!(
            fleet.contains(&(name.into(), path.into())),
            "{name}: {fleet:?}"
        );
    }
    let node = columns("gateway.yaml");
    for (name, path) in [
        ("Node", ".spec.nodeName"),
        ("Version", ".status.runningVersion"),
        ("Activation", ".status.activation"),
        ("Connection", ".status.connection"),
        ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
        ("Volumes", ".status.volumeCount"),
        ("Log-Used", ".status.writeLog.usedPercent"),
        ("Backlog", ".status.upload.backlog"),
    ] {
        assert!(
            node.contains(&(name.into(), path.into())),
            "{name}: {node:?}"
        );
    }
}

/// Every rule in the schema, as (rule, message).
fn rules(value: &Value, found: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(rules_here)) = map.get("x-kubernetes-validations") {
                for rule in rules_here {
                    found.push((
                        rule["rule"].as_str().unwrap().to_owned(),
                        rule["message"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
            map.values().for_each(|v| rules(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| rules(v, found)),
        _ => {}
    }
}

#[test]
fn cel_rules_are_in_the_schema_each_with_a_message() {
    let mut found = Vec::new();
    rules(
        &version(&crd_json("storagegateway.yaml"))["schema"],
        &mut found,
    );
    for expected in [
        "self.cache.path != self.writeLog.path",
        "duration(self) >= duration('30m')",
        "string(self).matches('^[1-9][0-9]{0,5}$')",
        "quantity(self.size).compareTo(quantity('1Gi')) >= 0",
        "quantity(self).compareTo(quantity('1Mi')) >= 0",
        "self.endTime > self.startTime",
        "isURL(self)",
        "!self.startsWith('xn--')",
    ] {
        assert!(
            found.iter().any(|(rule, _)| rule.contains(expected)),
            "{expected} missing"
        );
    }
    assert!(found.len() > 30, "{}", found.len());
    for (rule, message) in &found {
        assert!(!message.is_empty(), "{rule} has no message");
    }
}

#[test]
fn every_string_and_list_under_a_cel_rule_is_bounded() {
    // The API server estimates each rule's worst-case cost from maxLength and maxItems and
    // refuses a CRD whose rules could cost too much; unbounded inputs are the usual cause.
    fn walk(value: &Value, path: &str, unbounded: &mut Vec<String>) {
        let Value::Object(map) = value else { return };
        if map.contains_key("x-kubernetes-validations") {
            match map.get("type").and_then(Value::as_str) {
                Some("string") if !map.contains_key("maxLength") => unbounded.push(path.into()),
                Some("array") if !map.contains_key("maxItems") => unbounded.push(path.into()),
                _ => {}
            }
        }
        if let Some(Value::Object(properties)) = map.get("properties") {
            for (name, schema) in properties {
                walk(schema, &format!("{path}.{name}"), unbounded);
            }
        }
        if let Some(items) = map.get("items") {
            walk(items, &format!("{path}[]"), unbounded);
        }
    }
    for file in ["storagegateway.yaml", "gateway.yaml"] {
        let mut unbounded = Vec::new();
        walk(
            &version(&crd_json(file))["schema"]["openAPIV3Schema"],
            "",
            &mut unbounded,
        );
        assert!(unbounded.is_empty(), "{file}: {unbounded:?}");
    }
}

fn gateway() -> Gateway {
    let mut gateway = Gateway::new(
        "fleet-node-1",
        GatewaySpec {
            storage_gateway: "fleet".into(),
            node_name: "node-1".into(),
            version: "0.1.0".into(),
        },
    );
    gateway.status = Some(GatewayStatus {
        volumes: vec![AttachedVolume {
            volume_id: "vol-1".into(),
            mode: VolumeMode::Cached,
            device: Some("/dev/nbd0".into()),
            size_bytes: 10 << 30,
        }],
        volume_count: Some(1),
        write_log: Some(SpaceUsage::new(64 << 30, 16 << 30)),
        upload: Some(UploadStatus::new(3 << 29, 50 << 20)),
        ..GatewayStatus::default()
    });
    gateway
}

#[test]
fn gateway_round_trips_and_reports_for_people() {
    let gateway = gateway();
    let json = serde_json::to_value(&gateway).unwrap();
    assert_eq!(json["apiVersion"], "blockgate.io/v1alpha1");
    assert_eq!(json["kind"], "Gateway");
    assert_eq!(json["status"]["writeLog"]["usedPercent"], 25);
    assert_eq!(json["status"]["upload"]["backlog"], "1.5Gi");
    assert_eq!(json["status"]["volumes"][0]["mode"], "cached");
    assert_eq!(serde_json::from_value::<Gateway>(json).unwrap(), gateway);
    gateway.spec.validate().unwrap();
}

#[test]
fn gateway_spec_rules() {
    let mut spec = gateway().spec;
    spec.version = "main".into();
    spec.node_name.clear();
    let error = spec.validate().unwrap_err();
    assert!(
        error.names("spec.version") && error.names("spec.nodeName"),
        "{error}"
    );

    // The owner and node cannot change under a running gateway.
    let crd = crd_json("gateway.yaml");
    let schema = &version(&crd)["schema"]["openAPIV3Schema"];
    let old = serde_json::to_value(gateway()).unwrap();
    let mut moved = old.clone();
    moved["spec"]["nodeName"] = json!("node-2");
    let errors = Validator::new()
        .validate(schema, &moved, Some(&old))
        .unwrap_err()
        .into_vec();
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("nodeName is immutable")),
        "{errors:?}"
    );
    Validator::new().validate(schema, &old, Some(&old)).unwrap();
}
