//! StorageGateway: the example manifest, serde round trips, and every validation rule
//! checked twice — by `validate()` and by evaluating the generated CRD's CEL rules (kube's
//! client-side CEL evaluator stands in for the API server, which cannot run here).

#![allow(clippy::unwrap_used, reason = "test helpers panic on broken fixtures")]

use blockgate_operator_api::crd::crds;
use blockgate_operator_api::{StorageGateway, StorageGatewaySpec};
use kube::core::cel::Validator;
use serde_json::{Value, json};

const EXAMPLE: &str = include_str!("../../../crds/examples/storagegateway.yaml");

fn example() -> StorageGateway {
    serde_saphyr::from_str(EXAMPLE).unwrap()
}

fn schema(file: &str) -> Value {
    let (_, crd) = crds().into_iter().find(|(f, _)| *f == file).unwrap();
    let schema = crd.spec.versions[0].schema.clone().unwrap();
    serde_json::to_value(schema.open_api_v3_schema.unwrap()).unwrap()
}

/// The CEL verdict on an object: the failing rules' messages, with their field paths.
fn cel_errors(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema("storagegateway.yaml"), object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

fn example_json() -> Value {
    serde_json::to_value(example()).unwrap()
}

/// Sets the value at a JSON pointer, creating objects on the way.
fn set(object: &mut Value, pointer: &str, value: Value) {
    let mut at = object;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for part in &parts[..parts.len() - 1] {
        at = match at {
            Value::Array(items) => &mut items[part.parse::<usize>().unwrap()],
            _ => at
                .as_object_mut()
                .unwrap()
                .entry(part.to_string())
                .or_insert_with(|| json!({})),
        };
    }
    let last = parts[parts.len() - 1];
    match at {
        Value::Array(items) => items[last.parse::<usize>().unwrap()] = value,
        _ => {
            at.as_object_mut().unwrap().insert(last.to_string(), value);
        }
    }
}

#[test]
fn the_example_is_valid_for_rust_and_for_cel() {
    let gateway = example();
    gateway.spec.validate().unwrap();
    assert_eq!(cel_errors(&example_json()), Vec::<String>::new());
    assert_eq!(gateway.spec.write_log_bytes(), Ok(64 << 30));
    assert_eq!(gateway.spec.cache_bytes(), Ok(256 << 30));
}

#[test]
fn defaults_fill_in_what_the_example_leaves_out() {
    let spec = example().spec;
    let credentials = &spec.object_store.credentials_secret;
    assert_eq!(credentials.access_key_id_key, "AWS_ACCESS_KEY_ID");
    assert_eq!(credentials.secret_access_key_key, "AWS_SECRET_ACCESS_KEY");
    assert_eq!(
        spec.encryption_key_secret.as_ref().unwrap().key,
        "encryption-key"
    );
    assert!(!spec.update_policy.paused);

    let mut minimal = example_json();
    minimal["spec"]
        .as_object_mut()
        .unwrap()
        .remove("updatePolicy");
    let minimal: StorageGateway = serde_json::from_value(minimal).unwrap();
    let policy = &minimal.spec.update_policy;
    assert_eq!(
        policy.max_unavailable(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)
    );
    assert!(policy.pause_on_fleet_errors);
    assert!(policy.maintenance_window.is_none());
}

#[test]
fn serde_round_trips_through_json_and_yaml() {
    let gateway = example();
    let json = serde_json::to_string(&gateway).unwrap();
    assert_eq!(
        serde_json::from_str::<StorageGateway>(&json).unwrap(),
        gateway
    );
    let yaml = serde_saphyr::to_string(&gateway).unwrap();
    assert_eq!(
        serde_saphyr::from_str::<StorageGateway>(&yaml).unwrap(),
        gateway
    );
    // Unset optional fields are left out, so a server-side apply does not claim them.
    let spec = serde_json::to_value(&StorageGateway::new("x", gateway.spec.clone()).spec).unwrap();
    assert!(spec["objectStore"].get("endpoint").is_some());
    let mut bare = gateway.spec;
    bare.bandwidth = None;
    bare.encryption_key_secret = None;
    let bare = serde_json::to_value(bare).unwrap();
    assert!(bare.get("bandwidth").is_none() && bare.get("encryptionKeySecret").is_none());
}

/// A bad value, where it goes, which field `validate()` must name and what both
/// `validate()` and the CEL rule must say.
struct Bad {
    pointer: &'static str,
    value: Value,
    field: &'static str,
    message: &'static str,
}

fn bad(pointer: &'static str, value: Value, field: &'static str, message: &'static str) -> Bad {
    Bad {
        pointer,
        value,
        field,
        message,
    }
}

fn bad_values() -> Vec<Bad> {
    vec![
        bad(
            "/spec/image",
            json!("ghcr.io/blockgate/gateway:0.1.0"),
            "spec.image",
            "without tag or digest",
        ),
        bad(
            "/spec/image",
            json!("Registry/Image"),
            "spec.image",
            "image repository",
        ),
        bad(
            "/spec/version",
            json!("latest"),
            "spec.version",
            "semantic version",
        ),
        bad(
            "/spec/version",
            json!("1.2"),
            "spec.version",
            "semantic version",
        ),
        bad(
            "/spec/imagePullSecrets",
            json!([{"name": "Bad_Name"}]),
            "spec.imagePullSecrets[0].name",
            "name of a Secret",
        ),
        bad(
            "/spec/writeLog/size",
            json!("64GB"),
            "spec.writeLog.size",
            "must be a size",
        ),
        bad(
            "/spec/writeLog/size",
            json!("-1Gi"),
            "spec.writeLog.size",
            "must be a size",
        ),
        bad(
            "/spec/writeLog/size",
            json!("100m"),
            "spec.writeLog.size",
            "must be a size",
        ),
        bad(
            "/spec/writeLog/size",
            json!("512Mi"),
            "spec.writeLog.size",
            "at least 1Gi",
        ),
        bad(
            "/spec/cache/size",
            json!("1000M"),
            "spec.cache.size",
            "at least 1Gi",
        ),
        bad(
            "/spec/cache/size",
            json!(""),
            "spec.cache.size",
            "must be a size",
        ),
        bad(
            "/spec/writeLog/path",
            json!("var/lib/log"),
            "spec.writeLog.path",
            "absolute path",
        ),
        bad(
            "/spec/writeLog/path",
            json!("/var/lib/log/"),
            "spec.writeLog.path",
            "without a trailing slash",
        ),
        bad(
            "/spec/cache/path",
            json!("/var/lib/../cache"),
            "spec.cache.path",
            "'..' segments",
        ),
        bad(
            "/spec/cache/path",
            json!("/var/lib/blockgate/write-log"),
            "spec",
            "different directories",
        ),
        bad(
            "/spec/cache/path",
            json!("/var/lib/blockgate/write-log/cache"),
            "spec",
            "neither inside the other",
        ),
        bad(
            "/spec/writeLog/path",
            json!("/var/lib/blockgate/cache/log"),
            "spec",
            "neither inside the other",
        ),
        bad(
            "/spec/objectStore/bucket",
            json!("My_Bucket"),
            "spec.objectStore.bucket",
            "S3 bucket name",
        ),
        bad(
            "/spec/objectStore/bucket",
            json!("ab"),
            "spec.objectStore.bucket",
            "3 to 63",
        ),
        bad(
            "/spec/objectStore/bucket",
            json!("my..bucket"),
            "spec.objectStore.bucket",
            "no '..'",
        ),
        bad(
            "/spec/objectStore/bucket",
            json!("192.168.1.10"),
            "spec.objectStore.bucket",
            "not an IP address",
        ),
        bad(
            "/spec/objectStore/bucket",
            json!("xn--bucket"),
            "spec.objectStore.bucket",
            "xn--",
        ),
        bad(
            "/spec/objectStore/bucket",
            json!("data-s3alias"),
            "spec.objectStore.bucket",
            "-s3alias",
        ),
        bad(
            "/spec/objectStore/prefix",
            json!("/clusters/prod"),
            "spec.objectStore.prefix",
            "not starting with '/'",
        ),
        bad(
            "/spec/objectStore/prefix",
            json!("a//b"),
            "spec.objectStore.prefix",
            "single '/'",
        ),
        bad(
            "/spec/objectStore/endpoint",
            json!("s3.example.com"),
            "spec.objectStore.endpoint",
            "http:// or https://",
        ),
        bad(
            "/spec/objectStore/endpoint",
            json!("ftp://s3.example.com"),
            "spec.objectStore.endpoint",
            "http:// or https://",
        ),
        bad(
            "/spec/objectStore/endpoint",
            json!("https://"),
            "spec.objectStore.endpoint",
            "with a host",
        ),
        bad(
            "/spec/objectStore/region",
            json!("us east"),
            "spec.objectStore.region",
            "region name",
        ),
        bad(
            "/spec/objectStore/credentialsSecret/name",
            json!("S3 Creds"),
            "spec.objectStore.credentialsSecret.name",
            "name of a Secret",
        ),
        bad(
            "/spec/objectStore/credentialsSecret/accessKeyIdKey",
            json!("bad key"),
            "spec.objectStore.credentialsSecret.accessKeyIdKey",
            "key of the Secret",
        ),
        bad(
            "/spec/encryptionKeySecret/name",
            json!("-key"),
            "spec.encryptionKeySecret.name",
            "name of a Secret",
        ),
        bad(
            "/spec/encryptionKeySecret/key",
            json!("a/b"),
            "spec.encryptionKeySecret.key",
            "key of the Secret",
        ),
        bad(
            "/spec/updatePolicy/maxUnavailable",
            json!(0),
            "spec.updatePolicy.maxUnavailable",
            "at least 1",
        ),
        bad(
            "/spec/updatePolicy/maxUnavailable",
            json!("0%"),
            "spec.updatePolicy.maxUnavailable",
            "1% to 100%",
        ),
        bad(
            "/spec/updatePolicy/maxUnavailable",
            json!("101%"),
            "spec.updatePolicy.maxUnavailable",
            "1% to 100%",
        ),
        bad(
            "/spec/updatePolicy/maxUnavailable",
            json!("two"),
            "spec.updatePolicy.maxUnavailable",
            "percentage",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/startTime",
            json!("2:00"),
            "spec.updatePolicy.maintenanceWindow.startTime",
            "HH:MM",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/startTime",
            json!("24:00"),
            "spec.updatePolicy.maintenanceWindow.startTime",
            "HH:MM",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/startTime",
            json!("12:60"),
            "spec.updatePolicy.maintenanceWindow.startTime",
            "HH:MM",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/duration",
            json!("20m"),
            "spec.updatePolicy.maintenanceWindow.duration",
            "between 30m and 24h",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/duration",
            json!("24h1m"),
            "spec.updatePolicy.maintenanceWindow.duration",
            "between 30m and 24h",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/duration",
            json!("25h"),
            "spec.updatePolicy.maintenanceWindow.duration",
            "between 30m and 24h",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/duration",
            json!("2 hours"),
            "spec.updatePolicy.maintenanceWindow.duration",
            "hours and minutes",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/timeZone",
            json!("Europe Berlin"),
            "spec.updatePolicy.maintenanceWindow.timeZone",
            "IANA time zone",
        ),
        bad(
            "/spec/updatePolicy/maintenanceWindow/timeZone",
            json!("/Berlin"),
            "spec.updatePolicy.maintenanceWindow.timeZone",
            "IANA time zone",
        ),
        bad(
            "/spec/bandwidth/uploadBytesPerSecond",
            json!("100"),
            "spec.bandwidth.uploadBytesPerSecond",
            "at least 1Mi",
        ),
        bad(
            "/spec/bandwidth/downloadBytesPerSecond",
            json!("fast"),
            "spec.bandwidth.downloadBytesPerSecond",
            "must be a size",
        ),
        bad(
            "/spec/bandwidth/timeZone",
            json!("Mars/Olympus Mons"),
            "spec.bandwidth.timeZone",
            "IANA time zone",
        ),
        bad(
            "/spec/bandwidth/schedule/0/startTime",
            json!("07:00"),
            "spec.bandwidth.schedule[0]",
            "endTime must be after startTime",
        ),
        bad(
            "/spec/bandwidth/schedule/0/endTime",
            json!("24:30"),
            "spec.bandwidth.schedule[0].endTime",
            "24:00",
        ),
        bad(
            "/spec/bandwidth/schedule/0/uploadBytesPerSecond",
            json!("1Ki"),
            "spec.bandwidth.schedule[0].uploadBytesPerSecond",
            "at least 1Mi",
        ),
        bad(
            "/spec/bandwidth/schedule/1/days",
            json!(["Fri", "Sat"]),
            "spec.bandwidth.schedule",
            "must not overlap",
        ),
    ]
}

#[test]
fn validate_rejects_each_bad_field_and_names_it() {
    for case in bad_values() {
        let mut object = example_json();
        set(&mut object, case.pointer, case.value.clone());
        let spec: StorageGatewaySpec = serde_json::from_value(object["spec"].clone())
            .unwrap_or_else(|e| panic!("{} = {}: {e}", case.pointer, case.value));
        let error = spec
            .validate()
            .expect_err(&format!("{} = {} accepted", case.pointer, case.value));
        assert!(
            error
                .0
                .iter()
                .any(|e| e.field == case.field && e.message.contains(case.message)),
            "{} = {}: want {} {:?}, got {error}",
            case.pointer,
            case.value,
            case.field,
            case.message
        );
        assert!(
            error.to_string().contains(case.field),
            "message names the field: {error}"
        );
    }
}

#[test]
fn the_crd_cel_rules_reject_the_same_values_with_the_same_messages() {
    for case in bad_values() {
        let mut object = example_json();
        set(&mut object, case.pointer, case.value.clone());
        let errors = cel_errors(&object);
        assert!(
            errors.iter().any(|e| e.contains(case.message)),
            "{} = {}: CEL said {errors:?}",
            case.pointer,
            case.value
        );
        assert!(
            errors
                .iter()
                .all(|e| !e.contains("compil") && !e.contains("no such")),
            "rules compile: {errors:?}"
        );
    }
}

#[test]
fn good_variants_pass_both_checks() {
    let goods: Vec<(&str, Value)> = vec![
        ("/spec/updatePolicy/maxUnavailable", json!(3)),
        ("/spec/updatePolicy/maxUnavailable", json!("100%")),
        ("/spec/updatePolicy/maxUnavailable", json!("1%")),
        (
            "/spec/updatePolicy/maintenanceWindow/duration",
            json!("30m"),
        ),
        (
            "/spec/updatePolicy/maintenanceWindow/duration",
            json!("1h30m"),
        ),
        (
            "/spec/updatePolicy/maintenanceWindow/duration",
            json!("24h"),
        ),
        (
            "/spec/updatePolicy/maintenanceWindow/startTime",
            json!("23:59"),
        ),
        (
            "/spec/updatePolicy/maintenanceWindow/timeZone",
            json!("America/Argentina/Buenos_Aires"),
        ),
        (
            "/spec/updatePolicy/maintenanceWindow/timeZone",
            json!("Etc/GMT+5"),
        ),
        ("/spec/objectStore/endpoint", json!("http://127.0.0.1:3900")),
        (
            "/spec/objectStore/endpoint",
            json!("https://s3.eu-west-1.amazonaws.com"),
        ),
        (
            "/spec/objectStore/endpoint",
            json!("http://minio.storage.svc:9000/s3"),
        ),
        ("/spec/objectStore/region", json!("garage")),
        ("/spec/objectStore/bucket", json!("a.b-c")),
        ("/spec/objectStore/prefix", json!("")),
        ("/spec/writeLog/size", json!("1Gi")),
        ("/spec/writeLog/size", json!("1.5Ti")),
        ("/spec/cache/size", json!("2G")),
        (
            "/spec/cache/path",
            json!("/var/lib/blockgate/write-log-cache"),
        ),
        (
            "/spec/image",
            json!("registry.local:5000/blockgate/gateway"),
        ),
        ("/spec/version", json!("0.5.0-rc.1")),
        ("/spec/bandwidth/schedule/0/endTime", json!("24:00")),
    ];
    for (pointer, value) in goods {
        let mut object = example_json();
        set(&mut object, pointer, value.clone());
        let spec: StorageGatewaySpec = serde_json::from_value(object["spec"].clone()).unwrap();
        if let Err(error) = spec.validate() {
            panic!("{pointer} = {value}: validate() said {error}");
        }
        assert_eq!(
            cel_errors(&object),
            Vec::<String>::new(),
            "{pointer} = {value}"
        );
    }
}

#[test]
fn validate_reports_every_error_at_once() {
    let mut spec = example().spec;
    spec.version = "latest".into();
    spec.object_store.bucket = "B".into();
    spec.write_log.size = "1Mi".into();
    let error = spec.validate().unwrap_err();
    assert_eq!(error.0.len(), 3, "{error}");
    assert!(error.names("spec.version"));
    assert!(error.names("spec.objectStore.bucket"));
    assert!(error.names("spec.writeLog.size"));
}
